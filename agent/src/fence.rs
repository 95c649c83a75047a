//! Fencing: every command a coordinator sends carries its epoch (`ferry-epoch` metadata; none
//! is epoch 0). The agent keeps the highest epoch it has seen in `<data_dir>/epoch` (written
//! durably before the command runs) and refuses commands of a lower one, so a coordinator that
//! lost its leadership (partitioned away, then back) cannot touch this host any more.
use std::path::PathBuf;
use std::sync::Mutex;

use ferry_proto::durable::{self, Existing};
use tonic::{Request, Status};

/// The metadata key a coordinator's epoch travels in.
pub const EPOCH_KEY: &str = "ferry-epoch";

pub struct Fence {
    path: PathBuf,
    highest: Mutex<u64>,
    /// The highest epoch, for the uploads in progress to stop at once when a newer coordinator
    /// comes ([`Fence::overtaken`]).
    seen: tokio::sync::watch::Sender<u64>,
}

/// The epoch `req` carries (0 without one).
pub fn epoch_of<T>(req: &Request<T>) -> Result<u64, Status> {
    match req.metadata().get(EPOCH_KEY) {
        None => Ok(0),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| Status::invalid_argument(format!("{EPOCH_KEY} must be a number, got {v:?}"))),
    }
}

impl Fence {
    /// The fence kept in `data_dir` (epoch 0 before the first fenced command).
    pub fn open(data_dir: &std::path::Path) -> Fence {
        let path = data_dir.join("epoch");
        let highest = match std::fs::read_to_string(&path) {
            Ok(text) => text.trim().parse().unwrap_or_else(|_| {
                tracing::error!(
                    "{}: {text:?} is not an epoch; keeping 0 until a coordinator sends one",
                    path.display()
                );
                0
            }),
            Err(_) => 0,
        };
        Fence { path, highest: Mutex::new(highest), seen: tokio::sync::watch::Sender::new(highest) }
    }

    /// The highest epoch seen.
    pub fn highest(&self) -> u64 {
        self.highest.lock().map_or(0, |h| *h)
    }

    /// Lets a command of `epoch` through (recording a new highest one durably first), or refuses
    /// it as coming from a coordinator older than one this host already follows.
    pub fn check(&self, epoch: u64) -> Result<(), Status> {
        let mut highest = self.highest.lock().map_err(|_| Status::internal("the epoch lock is poisoned"))?;
        if epoch < *highest {
            return Err(Status::failed_precondition(format!(
                "fenced: this host follows coordinator epoch {}, and this command carries epoch {epoch}: it comes from a coordinator that is no longer the leader (or one that does not read the shared registry); nothing was changed",
                *highest
            )));
        }
        if epoch > *highest {
            durable::write(&self.path, format!("{epoch}\n").as_bytes(), 0o644, Existing::Replace).map_err(|e| {
                Status::internal(format!("cannot record epoch {epoch} in {}: {e}", self.path.display()))
            })?;
            tracing::info!(epoch, previous = *highest, "following a new coordinator epoch");
            *highest = epoch;
            self.seen.send_replace(epoch);
        }
        Ok(())
    }

    /// Resolves once a coordinator of a higher epoch than `epoch` has been let through: a
    /// command of `epoch` still in progress (an upload from a leader cut off mid-transfer) is
    /// stopped then, and frees its app for the new leader at once.
    pub async fn overtaken(&self, epoch: u64) -> Status {
        let mut seen = self.seen.subscribe();
        let newer = seen.wait_for(|h| *h > epoch).await.map(|h| *h);
        match newer {
            Ok(h) => Status::failed_precondition(format!(
                "fenced: coordinator epoch {h} took over while this command of epoch {epoch} was in progress; it was stopped, and nothing this host runs changed"
            )),
            // The fence is gone with its service: nothing newer will come.
            Err(_) => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lower_epoch_is_refused_and_the_highest_survives_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = Fence::open(dir.path());
        f.check(0).expect("no epoch yet");
        f.check(5).expect("a newer leader");
        let e = f.check(3).expect_err("an older one");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(e.message().contains("follows coordinator epoch 5") && e.message().contains("carries epoch 3"), "{e}");
        f.check(0).expect_err("none at all is the oldest");
        let again = Fence::open(dir.path());
        assert_eq!(again.highest(), 5);
        again.check(5).expect("the same leader");
        let mut req = Request::new(());
        req.metadata_mut().insert(EPOCH_KEY, "7".parse().expect("value"));
        assert_eq!(epoch_of(&req).expect("parsed"), 7);
        req.metadata_mut().insert(EPOCH_KEY, "x".parse().expect("value"));
        assert!(epoch_of(&req).is_err());
        assert_eq!(epoch_of(&Request::new(())).expect("none"), 0);
    }

    /// A command in progress is stopped when a newer epoch comes, not by its own epoch again.
    #[tokio::test]
    async fn a_command_in_progress_is_overtaken_by_a_newer_epoch_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = Fence::open(dir.path());
        f.check(2).expect("leader 2");
        let waiting = f.overtaken(2);
        tokio::pin!(waiting);
        f.check(2).expect("leader 2 again");
        let quiet = tokio::time::timeout(std::time::Duration::from_millis(50), &mut waiting).await;
        assert!(quiet.is_err(), "overtaken by its own epoch");
        f.check(3).expect("leader 3");
        let s = tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await.expect("overtaken");
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        assert!(s.message().contains("epoch 3 took over while this command of epoch 2"), "{s}");
    }
}
