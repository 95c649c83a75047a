//! The audit log: one JSON line per command a coordinator sent (and per connection refused), who
//! sent it (the certificate's name), what it asked and how it ended.
//!
//! Append-only: the file is opened with `O_APPEND` and never rewritten; each line is written
//! whole with one `write(2)` and `fdatasync`'d before the append returns, so a line that was
//! reported written survives a crash or power loss. When the next line would take the file past
//! `max_bytes` it is rotated: `audit.log.N` … `audit.log.1` move up one (the oldest beyond `keep`
//! is deleted), `audit.log` becomes `audit.log.1`, the directory is fsync'd, a new file begins.
//! A failed write is returned to the caller (the agent logs it loudly, counts it and reports it
//! in `/health`) but never stops a command: an unwritable audit disk must not strand a rollout
//! half-way.
use std::fs::File;
use std::io::{self, BufRead, Seek};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use ferry_proto::audit_file::AuditFile;

use serde::{Deserialize, Serialize};

/// One audit record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// When the command ended (or the connection was refused), RFC 3339 UTC.
    pub time: String,
    /// The peer's certificate name (common name); empty when it presented none.
    pub peer: String,
    /// The peer's address and port.
    pub peer_addr: String,
    /// The RPC (`Prepare`, `Upload`, `Commit`, `Activate`, `Rollback`, `GetStatus`,
    /// `ListReleases`), or `connect` for a connection refused in the TLS handshake.
    pub rpc: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub app: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub deployment: String,
    /// The release acted on, when there is one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub release: String,
    /// `ok`; an activation's outcome (`healthy`, `unchanged`, `rolled_back`, `failed`); `refused`
    /// (a connection, or a command while the agent stops); `suppressed` (the refusals of the
    /// previous minute not recorded one by one, summed up); or `error: <gRPC code>`.
    pub result: String,
    /// The cause of a failure or refusal, or a short summary of what was done.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

impl Entry {
    /// A record of `rpc` from `peer` at `peer_addr`, stamped now.
    pub fn new(rpc: &str, peer: &str, peer_addr: &str) -> Entry {
        Entry {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            peer: peer.to_string(),
            peer_addr: peer_addr.to_string(),
            rpc: rpc.to_string(),
            ..Entry::default()
        }
    }

    /// The record as one human-readable line (`ferry-agent audit tail`).
    pub fn human(&self) -> String {
        let mut s =
            format!("{} {} ({}) {} -> {}", self.time, or_dash(&self.peer), self.peer_addr, self.rpc, self.result);
        for (k, v) in [
            ("app", &self.app),
            ("version", &self.version),
            ("release", &self.release),
            ("deployment", &self.deployment),
        ] {
            if !v.is_empty() {
                s.push_str(&format!(" {k}={v}"));
            }
        }
        if !self.detail.is_empty() {
            s.push_str(&format!(": {}", self.detail.replace('\n', " | ")));
        }
        // The peer's name comes from a certificate nobody verified (a refused one): a newline or
        // ESC in it must not fake a record or rewrite the terminal.
        ferry_proto::text::printable(&s).into_owned()
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

pub use ferry_proto::audit_file::AuditError;

/// The agent's audit log: [`Entry`] records in an [`AuditFile`].
pub struct AuditLog(AuditFile);

impl AuditLog {
    pub fn open(path: &Path, max_bytes: u64, keep: u32) -> Result<AuditLog, AuditError> {
        AuditFile::open(path, max_bytes, keep).map(AuditLog)
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// `path.N`.
    pub fn rotated(path: &Path, n: u32) -> PathBuf {
        AuditFile::rotated(path, n)
    }

    /// Appends `entry` as one line and waits until it is on disk. Blocking: call from
    /// `spawn_blocking`.
    pub fn append(&self, entry: &Entry) -> Result<(), AuditError> {
        let mut line = serde_json::to_vec(entry)
            .map_err(|e| self.0.err("encode a record", io::Error::new(io::ErrorKind::InvalidData, e)))?;
        line.push(b'\n');
        self.0.append(&line)
    }
}

/// The last `n` lines of the log at `path`, oldest first, reaching into rotated files (`path.1`,
/// `path.2`, …) when the current one has fewer.
pub fn tail(path: &Path, n: usize) -> io::Result<Vec<String>> {
    let mut lines: Vec<String> = Vec::new();
    let mut k = 0;
    loop {
        let file = if k == 0 { path.to_path_buf() } else { AuditLog::rotated(path, k) };
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound && k > 0 => break,
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", file.display()))),
        };
        let mut older: Vec<String> = text.lines().map(str::to_string).collect();
        older.append(&mut lines);
        lines = older;
        if lines.len() >= n {
            break;
        }
        k += 1;
    }
    let skip = lines.len().saturating_sub(n);
    Ok(lines.split_off(skip))
}

/// The most rotated files a follower looks through for the one it was reading.
const MAX_ROTATED: u32 = 1000;

/// Reads the lines appended to a log after it was opened, across rotations.
pub struct Follower {
    path: PathBuf,
    reader: io::BufReader<File>,
    ino: u64,
    partial: String,
}

impl Follower {
    /// Starts at the current end of the log at `path`.
    pub fn open(path: &Path) -> io::Result<Follower> {
        let (mut reader, ino) = Self::open_file(path)?;
        reader.seek(io::SeekFrom::End(0))?;
        Ok(Follower { path: path.to_path_buf(), reader, ino, partial: String::new() })
    }

    fn open_file(p: &Path) -> io::Result<(io::BufReader<File>, u64)> {
        let file = File::open(p).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))?;
        let ino = file.metadata()?.ino();
        Ok((io::BufReader::new(file), ino))
    }

    /// Complete lines written since the last call (none if nothing new); never blocks.
    pub fn poll(&mut self) -> io::Result<Vec<String>> {
        let mut lines = Vec::new();
        loop {
            self.read_available(&mut lines)?;
            // Rotated: the old file is read to its end above. Files rotated since (when more than
            // one rotation happened between two polls) are read whole, then the current one.
            match std::fs::metadata(&self.path) {
                Ok(m) if m.ino() != self.ino => {
                    let k = (1..=MAX_ROTATED).find(|&k| {
                        std::fs::metadata(AuditLog::rotated(&self.path, k)).is_ok_and(|m| m.ino() == self.ino)
                    });
                    self.partial.clear();
                    for newer in (1..k.unwrap_or(1)).rev() {
                        let text = std::fs::read_to_string(AuditLog::rotated(&self.path, newer)).unwrap_or_default();
                        lines.extend(text.lines().map(str::to_string));
                    }
                    (self.reader, self.ino) = Self::open_file(&self.path)?;
                }
                _ => return Ok(lines),
            }
        }
    }

    fn read_available(&mut self, lines: &mut Vec<String>) -> io::Result<()> {
        let mut chunk = String::new();
        while self.reader.read_line(&mut chunk)? > 0 {
            self.partial.push_str(&chunk);
            chunk.clear();
            if self.partial.ends_with('\n') {
                lines.push(self.partial.trim_end_matches('\n').to_string());
                self.partial.clear();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: usize) -> Entry {
        Entry {
            app: "web".into(),
            version: format!("{i}"),
            result: "ok".into(),
            detail: "x".repeat(100),
            ..Entry::new("Activate", "ctl", "10.0.0.2:40000")
        }
    }

    /// Regression: the raw common name of a refused certificate reached `audit tail`, so a CN
    /// with a newline or ESC faked a record.
    #[test]
    fn a_hostile_certificate_name_cannot_fake_a_record() {
        let e = Entry {
            result: "refused".into(),
            ..Entry::new("connect", "x\n2026-01-01T00:00:00Z ctl Activate -> ok\u{1b}[1A", "10.0.0.9:1")
        };
        let line = e.human();
        assert!(!line.contains('\n') && !line.contains('\u{1b}'), "{line:?}");
        assert!(line.contains("x\\n2026") && line.ends_with("-> refused"), "{line}");
    }

    #[test]
    fn lines_are_json_and_read_back_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/audit.log");
        let log = AuditLog::open(&path, 1 << 20, 3).expect("open");
        for i in 0..5 {
            log.append(&entry(i)).expect("append");
        }
        let lines = tail(&path, 3).expect("tail");
        let got: Vec<Entry> = lines.iter().map(|l| serde_json::from_str(l).expect("json")).collect();
        assert_eq!(got.iter().map(|e| e.version.as_str()).collect::<Vec<_>>(), ["2", "3", "4"]);
        assert_eq!(got[0].peer, "ctl");
        assert!(got[0].time.ends_with('Z'), "{}", got[0].time);
        // Reopening appends; it never truncates.
        drop(log);
        let log = AuditLog::open(&path, 1 << 20, 3).expect("reopen");
        log.append(&entry(5)).expect("append");
        assert_eq!(tail(&path, 100).expect("tail").len(), 6);
    }

    #[test]
    fn rotation_keeps_at_most_keep_files_and_tail_reads_across_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.log");
        let line_len = serde_json::to_vec(&entry(10)).expect("json").len() as u64 + 1;
        // Four lines per file.
        let log = AuditLog::open(&path, line_len * 4, 2).expect("open");
        for i in 10..30 {
            log.append(&entry(i)).expect("append");
        }
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        assert!(size(&path) <= line_len * 4);
        assert_eq!(size(&AuditLog::rotated(&path, 1)), line_len * 4);
        assert_eq!(size(&AuditLog::rotated(&path, 2)), line_len * 4);
        assert!(!AuditLog::rotated(&path, 3).exists(), "only `keep` rotated files stay");
        // The newest 12 lines: the current file's 4 and both rotated files'.
        let lines = tail(&path, 100).expect("tail");
        assert_eq!(lines.len(), 12);
        let last: Entry = serde_json::from_str(&lines[11]).expect("json");
        let first: Entry = serde_json::from_str(&lines[0]).expect("json");
        assert_eq!((first.version.as_str(), last.version.as_str()), ("18", "29"));
        assert_eq!(tail(&path, 6).expect("tail").len(), 6);
    }

    #[test]
    fn follower_sees_only_new_lines_across_a_rotation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.log");
        let line_len = serde_json::to_vec(&entry(10)).expect("json").len() as u64 + 1;
        let log = AuditLog::open(&path, line_len * 2, 5).expect("open");
        log.append(&entry(10)).expect("append");
        let mut follower = Follower::open(&path).expect("follow");
        assert!(follower.poll().expect("poll").is_empty(), "lines written before following are not repeated");
        for i in 11..16 {
            log.append(&entry(i)).expect("append");
        }
        let seen: Vec<String> = follower
            .poll()
            .expect("poll")
            .iter()
            .map(|l| serde_json::from_str::<Entry>(l).expect("json").version)
            .collect();
        assert_eq!(seen, ["11", "12", "13", "14", "15"]);
        assert!(AuditLog::rotated(&path, 2).exists(), "the lines crossed two rotations");
        assert!(follower.poll().expect("poll").is_empty());
    }

    #[test]
    fn unwritable_log_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A directory where the file should be: open fails for root too.
        let path = dir.path().join("audit.log");
        std::fs::create_dir(&path).expect("mkdir");
        let err = AuditLog::open(&path, 1 << 20, 1).err().expect("must fail").to_string();
        assert!(err.contains("audit.log") && err.contains("open"), "{err}");
    }
}
