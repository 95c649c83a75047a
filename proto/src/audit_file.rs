//! An append-only JSON-lines audit file, rotated by size: what the agent's audit log and `ferry
//! serve`'s API audit log are written with.
//!
//! Each line is written whole with one `write(2)` on an `O_APPEND` descriptor and `fdatasync`'d
//! before the append returns, so a line reported written survives a crash or power loss. When the
//! next line would take the file past `max_bytes` it is rotated: `NAME.N` … `NAME.1` move up one
//! (the oldest beyond `keep` is deleted), `NAME` becomes `NAME.1`, the directory is fsync'd, a new
//! file begins.
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Why the audit log could not be written.
#[derive(Debug, thiserror::Error)]
#[error("audit log {path}: {action}: {source}")]
pub struct AuditError {
    pub path: PathBuf,
    pub action: &'static str,
    #[source]
    pub source: io::Error,
}

/// The append-only, rotated audit file.
///
/// The file is opened for each line and closed again: the process holds no descriptor to it
/// between lines, so an idle one never keeps the filesystem busy (a remount, an unmount), and a
/// file moved away by an outside tool is simply created anew.
pub struct AuditFile {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    /// Serializes appends and rotations.
    lock: Mutex<()>,
}

impl AuditFile {
    /// Opens (creating it and its directory if needed) the log at `path`: a start-up check that
    /// the process can write its audit log at all.
    pub fn open(path: &Path, max_bytes: u64, keep: u32) -> Result<AuditFile, AuditError> {
        let log = AuditFile { path: path.to_path_buf(), max_bytes, keep: keep.max(1), lock: Mutex::new(()) };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| log.err("create its directory", e))?;
        }
        log.open_file()?;
        Ok(log)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn err(&self, action: &'static str, source: io::Error) -> AuditError {
        AuditError { path: self.path.clone(), action, source }
    }

    /// The file, opened for appending, and its size.
    fn open_file(&self) -> Result<(File, u64), AuditError> {
        let existed = self.path.exists();
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o640)
            .open(&self.path)
            .map_err(|e| self.err("open", e))?;
        let size = file.metadata().map_err(|e| self.err("stat", e))?.len();
        if !existed {
            self.sync_dir()?;
        }
        Ok((file, size))
    }

    fn sync_dir(&self) -> Result<(), AuditError> {
        crate::durable::sync_dir(self.path.parent().unwrap_or(Path::new("/")))
            .map_err(|e| self.err("fsync its directory", e))
    }

    /// `path.N`.
    pub fn rotated(path: &Path, n: u32) -> PathBuf {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }

    fn rotate(&self) -> Result<(), AuditError> {
        let _ = std::fs::remove_file(Self::rotated(&self.path, self.keep));
        for n in (1..self.keep).rev() {
            let from = Self::rotated(&self.path, n);
            if from.exists() {
                std::fs::rename(&from, Self::rotated(&self.path, n + 1)).map_err(|e| self.err("rotate", e))?;
            }
        }
        std::fs::rename(&self.path, Self::rotated(&self.path, 1)).map_err(|e| self.err("rotate", e))?;
        self.sync_dir()
    }

    /// Appends `line` (one JSON record ending in a newline) and waits until it is on disk.
    /// Blocking.
    pub fn append(&self, line: &[u8]) -> Result<(), AuditError> {
        let _serial = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let (mut file, size) = self.open_file()?;
        if size > 0 && size + line.len() as u64 > self.max_bytes {
            drop(file);
            self.rotate()?;
            file = self.open_file()?.0;
        }
        file.write_all(line).and_then(|()| file.sync_data()).map_err(|e| self.err("append", e))
    }
}

/// The window refusals are sampled over.
pub const REFUSAL_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);
/// Addresses of unrecorded refusals remembered per window (for the summary's count).
const REFUSAL_SOURCES: usize = 10_000;

/// Which refusals (of connections, of calls without credentials) an audit log records one by
/// one: in each [`REFUSAL_WINDOW`], the first `per_source` of each address, at most `total` in
/// all; the rest are summed up in one line when the next window starts. So a flood writes at most
/// `total + 1` lines a window and cannot rotate the records of real commands away. Memory is
/// bounded too (at most `total` recorded and 10,000 unrecorded addresses remembered).
#[derive(Debug)]
pub struct RefusalSampler {
    per_source: usize,
    total: usize,
    started: Option<std::time::Instant>,
    recorded: std::collections::HashMap<std::net::IpAddr, usize>,
    lines: usize,
    suppressed: u64,
    suppressed_from: std::collections::HashSet<std::net::IpAddr>,
}

impl RefusalSampler {
    pub fn new(per_source: usize, total: usize) -> RefusalSampler {
        RefusalSampler {
            per_source,
            total,
            started: None,
            recorded: Default::default(),
            lines: 0,
            suppressed: 0,
            suppressed_from: Default::default(),
        }
    }

    /// Whether to record a refusal from `ip` at `now`, and the summary (count, addresses) of the
    /// window that just ended, if it left refusals unrecorded.
    pub fn admit(&mut self, ip: std::net::IpAddr, now: std::time::Instant) -> (bool, Option<(u64, usize)>) {
        let mut summary = None;
        if self.started.is_none_or(|s| now.duration_since(s) >= REFUSAL_WINDOW) {
            if self.suppressed > 0 {
                summary = Some((self.suppressed, self.suppressed_from.len()));
            }
            *self = RefusalSampler { started: Some(now), ..RefusalSampler::new(self.per_source, self.total) };
        }
        let from_here = self.recorded.get(&ip).copied().unwrap_or(0);
        if from_here < self.per_source && self.lines < self.total {
            self.recorded.insert(ip, from_here + 1);
            self.lines += 1;
            return (true, summary);
        }
        self.suppressed += 1;
        if self.suppressed_from.len() < REFUSAL_SOURCES {
            self.suppressed_from.insert(ip);
        }
        (false, summary)
    }
}

#[cfg(test)]
mod sampler_tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};
    use std::time::{Duration, Instant};

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))
    }

    /// Regression: every refusal was its own fsync'd audit line, so ~10,000 refusals a second
    /// rotated every command record away. Now a window records the first refusals of each address,
    /// up to its cap, and the next window starts with one line summing up the rest.
    #[test]
    fn a_refusal_flood_writes_a_few_lines_a_window() {
        let mut s = RefusalSampler::new(1, 10);
        let t0 = Instant::now();
        let mut lines = 0;
        for i in 0..10_000u32 {
            let (record, summary) = s.admit(ip(i % 50), t0 + Duration::from_millis(u64::from(i) / 1000));
            assert_eq!(summary, None);
            lines += usize::from(record);
        }
        assert_eq!(lines, 10);
        // The next window sums up the 9,990 refusals from the 50 addresses it did not record.
        let (record, summary) = s.admit(ip(7), t0 + REFUSAL_WINDOW + Duration::from_secs(1));
        assert!(record);
        assert_eq!(summary, Some((9_990, 50)));
        // One address alone is recorded `per_source` times per window.
        assert!(!s.admit(ip(7), t0 + REFUSAL_WINDOW + Duration::from_secs(2)).0);
        let mut api = RefusalSampler::new(10, 60);
        let recorded = (0..100).filter(|_| api.admit(ip(1), t0).0).count();
        assert_eq!(recorded, 10);
    }
}
