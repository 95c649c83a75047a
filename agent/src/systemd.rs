//! systemd unit control over D-Bus (`org.freedesktop.systemd1` on the system bus).
//!
//! A restart subscribes to `JobRemoved` *before* asking for the job (so the signal cannot be
//! missed) and waits for the job's result. For `Type=simple`/`exec` units the job is done at exec
//! time, so a process that dies right after must still count as a failed start: the activation
//! then keeps a [`UnitWatch`] on its units while their health is checked (hooks, probes,
//! `min_healthy_time`), and a unit that stops or restarts meanwhile fails it at once. An app with
//! nothing to check its health watches its units for [`SETTLE`] instead. A failure carries the
//! unit's `ActiveState`, `SubState`, `Result`, `ExecMainStatus` and its last journal lines.
//!
//! Before a restart the unit's failed state and start-rate counter are reset: a deploy's restart
//! must not be refused because earlier restarts used up `StartLimitBurst`.
//!
//! Callers only ever pass units that the app declares in `agent.toml` (checked by the service).
use std::time::Duration;

use ferry_proto::v1;
use tokio_stream::StreamExt;
use zbus::proxy::CacheProperties;
use zbus_systemd::systemd1::{ManagerProxy, ServiceProxy, UnitProxy};

/// How long the units of an app without health probes or validate hook must stay up after their
/// restart: the only proof of their health there is.
pub const SETTLE: Duration = Duration::from_millis(500);

/// How often a [`UnitWatch`] looks at its units.
const WATCH_EVERY: Duration = Duration::from_millis(25);

#[derive(Debug, thiserror::Error)]
pub enum UnitError {
    #[error("cannot reach systemd over D-Bus: {0}")]
    Bus(String),
    #[error("unit {unit}: {action} failed: {reason}")]
    Failed { unit: String, action: &'static str, reason: String, state: Box<v1::UnitState> },
    #[error("unit {unit}: {action} did not finish within {timeout:?}")]
    Timeout { unit: String, action: &'static str, timeout: Duration, state: Box<v1::UnitState> },
}

impl UnitError {
    pub fn state(&self) -> Option<&v1::UnitState> {
        match self {
            UnitError::Bus(_) => None,
            UnitError::Failed { state, .. } | UnitError::Timeout { state, .. } => Some(state),
        }
    }
}

fn bus(e: impl std::fmt::Display) -> UnitError {
    UnitError::Bus(e.to_string())
}

/// Whether the host's systemd answers on the system bus: its version (for `/health`).
pub async fn ping() -> Result<String, UnitError> {
    let conn = zbus::Connection::system().await.map_err(bus)?;
    ManagerProxy::new(&conn).await.map_err(bus)?.version().await.map_err(bus)
}

/// A connection to the host's systemd.
pub struct Systemd {
    conn: zbus::Connection,
}

impl Systemd {
    pub async fn connect() -> Result<Systemd, UnitError> {
        let conn = zbus::Connection::system().await.map_err(bus)?;
        // Job signals are only sent to subscribed clients; systemd refuses a second Subscribe on
        // the same connection, so it is done once, here.
        ManagerProxy::new(&conn).await.map_err(bus)?.subscribe().await.map_err(bus)?;
        Ok(Systemd { conn })
    }

    async fn manager(&self) -> Result<ManagerProxy<'_>, UnitError> {
        ManagerProxy::new(&self.conn).await.map_err(bus)
    }

    /// Restarts `unit` (starting it if it was stopped) and waits until it runs.
    pub async fn restart(&self, unit: &str, timeout: Duration) -> Result<(), UnitError> {
        self.job(unit, "restart", timeout).await
    }

    /// Reloads `unit` (its ExecReload) and waits until it is active again.
    pub async fn reload(&self, unit: &str, timeout: Duration) -> Result<(), UnitError> {
        self.job(unit, "reload", timeout).await
    }

    /// Reloads `unit` if it supports reloading, else restarts it.
    pub async fn reload_or_restart(&self, unit: &str, timeout: Duration) -> Result<(), UnitError> {
        self.job(unit, "reload-or-restart", timeout).await
    }

    /// Runs `action` ("restart", "reload" or "reload-or-restart") on `unit`.
    pub async fn apply(&self, action: &str, unit: &str, timeout: Duration) -> Result<(), UnitError> {
        match action {
            "reload" => self.reload(unit, timeout).await,
            "reload-or-restart" => self.reload_or_restart(unit, timeout).await,
            _ => self.restart(unit, timeout).await,
        }
    }

    async fn job(&self, unit: &str, action: &'static str, timeout: Duration) -> Result<(), UnitError> {
        let manager = self.manager().await?;
        // A deliberate restart must not be refused by the start rate limit that earlier deploys
        // (or a crash loop of the broken release) used up: reset it, like `systemctl
        // reset-failed`. Fails harmlessly for a unit that is not failed.
        let _ = manager.reset_failed_unit(unit.to_string()).await;
        let mut removed = manager.receive_job_removed().await.map_err(bus)?;
        let job = match action {
            "reload" => manager.reload_unit(unit.to_string(), "replace".into()).await,
            "reload-or-restart" => manager.reload_or_restart_unit(unit.to_string(), "replace".into()).await,
            _ => manager.restart_unit(unit.to_string(), "replace".into()).await,
        }
        .map_err(|e| UnitError::Failed {
            unit: unit.to_string(),
            action,
            reason: format!("systemd refused the job: {e}"),
            state: Box::new(v1::UnitState { unit: unit.to_string(), ..Default::default() }),
        })?;
        let result = tokio::time::timeout(timeout, async {
            while let Some(signal) = removed.next().await {
                if let Ok(args) = signal.args()
                    && args.job == job
                {
                    return Some(args.result.clone());
                }
            }
            None
        })
        .await;
        let result = match result {
            Ok(Some(r)) => r,
            Ok(None) => return Err(bus("the JobRemoved signal stream ended")),
            Err(_) => {
                return Err(UnitError::Timeout {
                    unit: unit.to_string(),
                    action,
                    timeout,
                    state: Box::new(self.state(unit).await),
                });
            }
        };
        if result != "done" {
            return Err(UnitError::Failed {
                unit: unit.to_string(),
                action,
                reason: format!("the job ended with result {result:?}"),
                state: Box::new(self.state(unit).await),
            });
        }
        // The job is done at exec time for simple/exec units: the process may already be gone.
        // (That it stays up is the watch's part: see `watch`.)
        let (active, sub) = self.active_state(unit).await;
        if up(&active) {
            return Ok(());
        }
        Err(UnitError::Failed {
            unit: unit.to_string(),
            action,
            reason: format!("it is {active} ({sub}) right after starting"),
            state: Box::new(self.state(unit).await),
        })
    }

    /// `ActiveState` and `SubState` of `unit` (empty when systemd does not answer).
    async fn active_state(&self, unit: &str) -> (String, String) {
        let Some((u, _)) = self.proxies(unit).await else { return Default::default() };
        (u.active_state().await.unwrap_or_default(), u.sub_state().await.unwrap_or_default())
    }

    /// Uncached proxies of `unit` (every read asks systemd): the unit, and for a `.service` its
    /// service interface.
    async fn proxies(&self, unit: &str) -> Option<(UnitProxy<'static>, Option<ServiceProxy<'static>>)> {
        let path = self.manager().await.ok()?.load_unit(unit.to_string()).await.ok()?;
        let u = UnitProxy::builder(&self.conn).path(path.clone()).cache_properties(CacheProperties::No).build();
        let u = u.await.ok()?;
        let service = match unit.ends_with(".service") {
            true => {
                ServiceProxy::builder(&self.conn).path(path).cache_properties(CacheProperties::No).build().await.ok()
            }
            false => None,
        };
        Some((u, service))
    }

    /// Starts watching `units` (just restarted or reloaded): from now on, one that stops being
    /// active, or that systemd restarts (its `NRestarts` grows: it died and `Restart=` brought
    /// it back), is a failure of the activation.
    pub async fn watch(&self, units: &[String]) -> UnitWatch {
        let mut watched = Vec::new();
        for name in units {
            let (unit, service) = self.proxies(name).await.unzip();
            let service = service.flatten();
            let restarts = match &service {
                Some(s) => s.n_restarts().await.unwrap_or(0),
                None => 0,
            };
            watched.push(Watched { name: name.clone(), unit, service, restarts });
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (sd, looking) = (Systemd { conn: self.conn.clone() }, watched.clone());
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(WATCH_EVERY).await;
                if let Some(e) = sd.look(&looking).await {
                    let _ = tx.send(e);
                    return;
                }
            }
        });
        UnitWatch { sd: Systemd { conn: self.conn.clone() }, watched, failed: rx, task }
    }

    /// One look at the watched units: the first that failed, with its state and journal.
    async fn look(&self, watched: &[Watched]) -> Option<UnitError> {
        for w in watched {
            let active = match &w.unit {
                Some(u) => u.active_state().await.unwrap_or_default(),
                None => String::new(),
            };
            let restarts = match &w.service {
                Some(s) => s.n_restarts().await.unwrap_or(w.restarts),
                None => w.restarts,
            };
            if up(&active) && restarts <= w.restarts {
                continue;
            }
            let state = self.state(&w.name).await;
            let reason = if restarts > w.restarts {
                format!(
                    "it died and systemd restarted it while its health was checked (NRestarts {} -> {restarts})",
                    w.restarts
                )
            } else {
                format!("it became {} ({}) while its health was checked", state.active_state, state.sub_state)
            };
            return Some(UnitError::Failed { unit: w.name.clone(), action: "watch", reason, state: Box::new(state) });
        }
        None
    }

    /// The unit's state and its last journal lines (best effort: missing fields stay empty).
    pub async fn state(&self, unit: &str) -> v1::UnitState {
        let mut s = v1::UnitState { unit: unit.to_string(), ..Default::default() };
        if let Some((u, service)) = self.proxies(unit).await {
            s.active_state = u.active_state().await.unwrap_or_default();
            s.sub_state = u.sub_state().await.unwrap_or_default();
            if let Some(svc) = service {
                s.result = svc.result().await.unwrap_or_default();
                s.exec_main_status = svc.exec_main_status().await.unwrap_or_default();
            }
        }
        let name = unit.to_string();
        s.journal = tokio::task::spawn_blocking(move || journal_tail(&name, 15)).await.unwrap_or_default();
        s
    }
}

fn up(active_state: &str) -> bool {
    matches!(active_state, "active" | "activating" | "reloading")
}

/// A unit being watched, and its `NRestarts` when the watch began.
#[derive(Clone)]
struct Watched {
    name: String,
    unit: Option<UnitProxy<'static>>,
    service: Option<ServiceProxy<'static>>,
    restarts: u32,
}

/// Units watched while an activation checks their health (see [`Systemd::watch`]); stops when
/// dropped.
pub struct UnitWatch {
    sd: Systemd,
    watched: Vec<Watched>,
    failed: tokio::sync::oneshot::Receiver<UnitError>,
    task: tokio::task::JoinHandle<()>,
}

impl UnitWatch {
    /// Resolves when a watched unit fails; never, if none does.
    pub async fn failed(&mut self) -> UnitError {
        match (&mut self.failed).await {
            Ok(e) => e,
            Err(_) => std::future::pending().await,
        }
    }

    /// Ends the watch with one last look: the checks passed, and every unit must still be up.
    pub async fn finish(mut self) -> Result<(), UnitError> {
        self.task.abort();
        if let Ok(e) = self.failed.try_recv() {
            return Err(e);
        }
        match self.sd.look(&self.watched).await {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for UnitWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Without libsystemd (the fuzzers' build), no journal lines.
#[cfg(not(feature = "sd-notify"))]
pub fn journal_tail(_unit: &str, _n: usize) -> Vec<String> {
    Vec::new()
}

/// The last `n` journal lines of `unit` (oldest first), from the system journal.
#[cfg(feature = "sd-notify")]
pub fn journal_tail(unit: &str, n: usize) -> Vec<String> {
    use systemd::journal;
    let Ok(mut j) = journal::OpenOptions::default().system(true).local_only(true).open() else {
        return Vec::new();
    };
    // The unit's own output (_SYSTEMD_UNIT) or systemd's messages about it (UNIT), as `journalctl -u`.
    let matched =
        j.match_add("_SYSTEMD_UNIT", unit).is_ok() && j.match_or().is_ok() && j.match_add("UNIT", unit).is_ok();
    if !matched || j.seek_tail().is_err() {
        return Vec::new();
    }
    let mut lines = Vec::new();
    while lines.len() < n {
        match j.previous_entry() {
            Ok(Some(entry)) => {
                if let Some(msg) = entry.get("MESSAGE") {
                    lines.push(msg.clone());
                }
            }
            _ => break,
        }
    }
    lines.reverse();
    lines
}
