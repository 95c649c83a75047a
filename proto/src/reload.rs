//! A value built from files (a TLS setup from certificate, key, CA bundle and revocation list),
//! rebuilt on SIGHUP and when the files change, for the agent and for `ferry serve`.
//!
//! Readers take the current value for each new use (a connection); what they took stays valid, so
//! nothing in flight is dropped. A change is applied once the files have stayed the same for one
//! poll (a certificate and its key are rarely written at the same instant). A rebuild that fails
//! keeps the previous value; the same files are not retried until they change again or the next
//! SIGHUP, so a bad file is reported once.
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// How often the files are checked for a change.
pub const POLL: Duration = Duration::from_secs(5);

/// Identifies a version of each file: (device, inode, size, mtime s, mtime ns), None if missing.
pub type Stamp = Vec<Option<(u64, u64, u64, i64, i64)>>;

type Build<T> = Box<dyn Fn() -> Result<(T, String), String> + Send + Sync>;

pub struct Reloadable<T> {
    files: Vec<PathBuf>,
    /// Builds the value and a line saying what was loaded.
    build: Build<T>,
    current: RwLock<Arc<T>>,
    loaded: Mutex<Stamp>,
    seen: Mutex<Stamp>,
}

impl<T: Send + Sync + 'static> Reloadable<T> {
    /// Starts from `initial` (built by the caller, who reports its errors its own way), rebuilt
    /// from `files` by `build` from then on.
    pub fn new(
        initial: T,
        files: Vec<PathBuf>,
        build: impl Fn() -> Result<(T, String), String> + Send + Sync + 'static,
    ) -> Reloadable<T> {
        let now = stamp(&files);
        Reloadable {
            files,
            build: Box::new(build),
            current: RwLock::new(Arc::new(initial)),
            loaded: Mutex::new(now.clone()),
            seen: Mutex::new(now),
        }
    }

    /// The value for a new use.
    pub fn current(&self) -> Arc<T> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Rebuilds the value now; answers what was loaded, or why the previous value stays.
    pub fn reload(&self) -> Result<String, String> {
        *self.loaded.lock().unwrap_or_else(|p| p.into_inner()) = stamp(&self.files);
        let (value, what) = (self.build)()?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(value);
        Ok(what)
    }

    /// Whether the files changed since they were loaded and stayed the same since the last poll.
    fn settled_change(&self) -> bool {
        let now = stamp(&self.files);
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let settled = *seen == now;
        *seen = now.clone();
        settled && *self.loaded.lock().unwrap_or_else(|p| p.into_inner()) != now
    }
}

/// The current version of each of `files`: equal stamps, unchanged files.
pub fn stamp(files: &[PathBuf]) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    files
        .iter()
        .map(|p| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec())))
        .collect()
}

/// Why a reload happened, and how it went: for the caller's log.
pub struct Reloaded {
    pub why: &'static str,
    pub result: Result<String, String>,
}

/// Rebuilds `value` on each SIGHUP (if `hangup` is given) and when its files change, until
/// `stop` resolves; `report` hears of each attempt.
pub async fn watch<T: Send + Sync + 'static>(
    value: Arc<Reloadable<T>>,
    mut hangup: Option<tokio::signal::unix::Signal>,
    stop: impl std::future::Future<Output = ()>,
    report: impl Fn(Reloaded),
) {
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        let why = tokio::select! {
            _ = &mut stop => return,
            Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => "SIGHUP",
            _ = poll.tick() => {
                if !value.settled_change() {
                    continue;
                }
                "the files changed"
            }
        };
        let v = value.clone();
        let result = match tokio::task::spawn_blocking(move || v.reload()).await {
            Ok(r) => r,
            Err(e) => Err(format!("the reload task failed: {e}")),
        };
        report(Reloaded { why, result });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_applied_once_settled_and_a_failed_build_keeps_the_value() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("value");
        std::fs::write(&file, "1").expect("write");
        let path = file.clone();
        let r = Reloadable::new(1u32, vec![file.clone()], move || {
            let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
            let n: u32 = text.trim().parse().map_err(|_| format!("{text:?} is not a number"))?;
            Ok((n, format!("loaded {n}")))
        });
        assert!(!r.settled_change(), "nothing changed");
        std::fs::write(&file, "22").expect("write");
        assert!(!r.settled_change(), "changed since the last poll: not settled yet");
        assert!(r.settled_change(), "the same as at the last poll: settled");
        assert_eq!(r.reload(), Ok("loaded 22".into()));
        assert_eq!(*r.current(), 22);
        assert!(!r.settled_change(), "loaded");
        std::fs::write(&file, "x").expect("write");
        let _ = r.settled_change();
        assert!(r.settled_change());
        assert!(r.reload().is_err());
        assert_eq!(*r.current(), 22, "a failed build keeps the previous value");
        assert!(!r.settled_change(), "the bad file is not retried until it changes");
    }
}
