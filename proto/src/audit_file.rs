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
