//! A scripted fleet in memory, for engine tests and benchmarks: each host keeps a list of releases
//! and a current one, as an agent's release store does, answers as its [`Script`] says, and every
//! request is recorded ([`Fake::calls`]) so a test asserts on what the engine asked, in order, and
//! on how many activations ran at once ([`Fake::max_active`]).
//!
//! It keeps the agent's contract that the engine relies on: staging adds a release without
//! changing the current one; activating the current release is a no-op (`changed = false`);
//! activating a release that was never staged fails; a failed activation can leave the host on
//! its previous release (`RolledBack`), and a rollback goes to a release the host keeps.
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::future::BoxFuture;

use super::{Activation, Fleet, Release, StageNote, Staged, Swap, Target, Transfer};
use crate::client::{ErrorKind, HostError};
use crate::config::Host;

/// How a host answers one kind of request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Behave {
    #[default]
    Ok,
    /// Fails with this kind and message (`RolledBack` on an activation: the host went back).
    Fail(ErrorKind, String),
    /// Never answers (a host stuck mid-step).
    Hang,
}

/// How a host answers, per request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Script {
    pub status: Behave,
    pub stage: Behave,
    pub activate: Behave,
    pub rollback: Behave,
    /// How long an activation takes (health probes, restarts).
    pub activate_for: Duration,
    /// How long staging takes; it sends a byte every minute meanwhile (a slow link).
    pub stage_for: Duration,
}

/// One request the engine made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Status { host: String },
    Stage { host: String, release: String },
    Activate { host: String, release: String },
    Rollback { host: String, target: Target },
}

impl Call {
    pub fn host(&self) -> &str {
        match self {
            Call::Status { host }
            | Call::Stage { host, .. }
            | Call::Activate { host, .. }
            | Call::Rollback { host, .. } => host,
        }
    }
}

#[derive(Debug, Default)]
struct FakeHost {
    /// Kept releases, oldest first.
    releases: Vec<String>,
    current: Option<String>,
    script: Script,
}

/// The scripted fleet.
#[derive(Debug, Default)]
pub struct Fake {
    hosts: Mutex<HashMap<String, FakeHost>>,
    calls: Mutex<Vec<Call>>,
    active: AtomicUsize,
    max_active: AtomicUsize,
    /// Keep no call log (benchmarks of many hosts measure the engine, not this log).
    quiet: bool,
}

impl Fake {
    pub fn new() -> Fake {
        Fake::default()
    }

    /// A fleet that keeps no call log (for many hosts).
    pub fn quiet() -> Fake {
        Fake { quiet: true, ..Fake::default() }
    }

    /// `host` runs `release` (and keeps it), before the deployment.
    pub fn runs(&self, host: &str, release: &str) {
        if let Ok(mut hosts) = self.hosts.lock() {
            let h = hosts.entry(host.to_string()).or_default();
            h.releases.push(release.to_string());
            h.current = Some(release.to_string());
        }
    }

    /// How `host` answers from now on.
    pub fn script(&self, host: &str, script: Script) {
        if let Ok(mut hosts) = self.hosts.lock() {
            hosts.entry(host.to_string()).or_default().script = script;
        }
    }

    /// The release `host` runs now.
    pub fn current(&self, host: &str) -> Option<String> {
        self.hosts.lock().ok()?.get(host)?.current.clone()
    }

    /// Every request so far, in the order they were made.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// The most activations and rollbacks that ran at the same time.
    pub fn max_active(&self) -> usize {
        self.max_active.load(Ordering::SeqCst)
    }

    fn record(&self, call: Call) {
        if !self.quiet
            && let Ok(mut calls) = self.calls.lock()
        {
            calls.push(call);
        }
    }

    fn script_of(&self, host: &str) -> Script {
        self.hosts.lock().ok().and_then(|h| h.get(host).map(|h| h.script.clone())).unwrap_or_default()
    }

    /// Waits as `behave` says; the error it ends with, if any.
    async fn answer(host: &Host, behave: &Behave) -> Result<(), HostError> {
        match behave {
            Behave::Ok => Ok(()),
            Behave::Fail(kind, message) => Err(HostError::new(host, *kind, message.clone())),
            Behave::Hang => std::future::pending().await,
        }
    }

    fn with_host<T>(&self, host: &Host, f: impl FnOnce(&mut FakeHost) -> Result<T, String>) -> Result<T, HostError> {
        let mut hosts =
            self.hosts.lock().map_err(|_| HostError::new(host, ErrorKind::Failed, "the fake fleet is poisoned"))?;
        f(hosts.entry(host.name.clone()).or_default()).map_err(|m| HostError::new(host, ErrorKind::Failed, m))
    }

    /// Counts a swap in flight while `work` runs.
    async fn swapping<T>(&self, work: impl Future<Output = T>) -> T {
        let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_active.fetch_max(now, Ordering::SeqCst);
        // Let every swap of a batch start before any ends, as real hosts overlap.
        tokio::task::yield_now().await;
        let out = work.await;
        self.active.fetch_sub(1, Ordering::SeqCst);
        out
    }
}

impl Fleet for Fake {
    fn current_release<'a>(&'a self, host: &'a Host) -> BoxFuture<'a, Result<String, HostError>> {
        Box::pin(async move {
            self.record(Call::Status { host: host.name.clone() });
            Self::answer(host, &self.script_of(&host.name).status).await?;
            self.with_host(host, |h| Ok(h.current.clone().unwrap_or_default()))
        })
    }

    fn stage<'a>(
        &'a self,
        host: &'a Host,
        release: &'a Release,
        sent: &'a Transfer,
        note: &'a (dyn Fn(StageNote) + Sync),
    ) -> BoxFuture<'a, Result<Staged, HostError>> {
        Box::pin(async move {
            let release_id = release.artifact.release_id(&release.version);
            self.record(Call::Stage { host: host.name.clone(), release: release_id.clone() });
            let script = self.script_of(&host.name);
            let mut left = script.stage_for;
            while !left.is_zero() {
                let step = left.min(Duration::from_secs(60));
                tokio::time::sleep(step).await;
                sent.bytes.fetch_add(1, Ordering::Relaxed);
                left -= step;
            }
            Self::answer(host, &script.stage).await?;
            let current = self.with_host(host, |h| {
                if !h.releases.contains(&release_id) {
                    h.releases.push(release_id.clone());
                }
                Ok(h.current.clone().unwrap_or_default())
            })?;
            sent.bytes.fetch_add(release.artifact.total_bytes, Ordering::Relaxed);
            note(StageNote::Committed { release: release_id.clone() });
            Ok(Staged { current, release_id, unfinished: false })
        })
    }

    fn activate<'a>(&'a self, host: &'a Host, activation: &'a Activation) -> BoxFuture<'a, Result<Swap, HostError>> {
        Box::pin(self.swapping(async move {
            let release = activation.release_id.clone();
            self.record(Call::Activate { host: host.name.clone(), release: release.clone() });
            let script = self.script_of(&host.name);
            tokio::time::sleep(script.activate_for).await;
            Self::answer(host, &script.activate).await?;
            self.with_host(host, |h| {
                if !h.releases.contains(&release) {
                    return Err(format!("release {release} was never staged here"));
                }
                let from = h.current.replace(release.clone());
                Ok(Swap { changed: from.as_deref() != Some(release.as_str()), from, to: release, agent_ms: 1 })
            })
        }))
    }

    fn rollback<'a>(
        &'a self,
        host: &'a Host,
        target: &'a Target,
        _deployment_id: &'a str,
    ) -> BoxFuture<'a, Result<Swap, HostError>> {
        Box::pin(self.swapping(async move {
            self.record(Call::Rollback { host: host.name.clone(), target: target.clone() });
            Self::answer(host, &self.script_of(&host.name).rollback).await?;
            self.with_host(host, |h| {
                let current = h.current.clone();
                let to = match target {
                    Target::Previous => {
                        let at = current.as_ref().and_then(|c| h.releases.iter().position(|r| r == c));
                        at.and_then(|i| i.checked_sub(1)).map(|i| h.releases[i].clone())
                    }
                    Target::Release(id) => h.releases.iter().find(|r| *r == id).cloned(),
                    Target::Version(v) => h.releases.iter().rev().find(|r| r.starts_with(&format!("{v}-"))).cloned(),
                };
                let to = to.ok_or_else(|| format!("no kept release matches {target:?}"))?;
                h.current = Some(to.clone());
                Ok(Swap { changed: current.as_deref() != Some(to.as_str()), from: current, to, agent_ms: 1 })
            })
        }))
    }
}
