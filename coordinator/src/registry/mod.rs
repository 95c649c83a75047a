//! The registry: every deployment, its hosts' steps (with timings and bytes) and events, the
//! environment locks, and what `ferry serve` adds (versions, smoke runs, approvals).
//!
//! [`Registry`] is the narrow trait the engine, the use cases and the API work through; nothing
//! above it knows how it is stored. [`sqlite::Sqlite`] keeps it in an embedded SQLite database
//! (`registry` in fleet.toml; default `~/.local/state/ferry/registry.db`). Invariants every
//! implementation keeps: a transition is durable before the call returns (the engine acts only
//! after), a host moves only along [`crate::state::legal`] steps, and an environment has at most one lock.
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::state::{DeploymentKind, DeploymentStatus, HostState};

pub mod migrate;
pub mod postgres;
pub mod sqlite;
#[cfg(test)]
pub(crate) mod suite;
#[cfg(test)]
pub(crate) mod testpg;

/// The registry fleet.toml names: PostgreSQL for a `postgres://` URL, else the SQLite file.
pub fn open(config: &crate::config::FleetConfig) -> Result<std::sync::Arc<dyn Registry>, RegistryError> {
    if let Some(pg) = config.postgres_registry() {
        return Ok(std::sync::Arc::new(postgres::Postgres::open_with(pg)?));
    }
    let path = config.registry_path().ok_or_else(|| RegistryError::Open {
        registry: "(none)".into(),
        reason: "set `registry` in fleet.toml (there is no HOME to default to)".into(),
    })?;
    Ok(std::sync::Arc::new(sqlite::Sqlite::open(&path)?))
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The store failed (I/O, corruption, a full disk); `registry` names it.
    #[error("registry {registry}: {message}")]
    Storage { registry: String, message: String },
    #[error("registry {registry}: cannot prepare the database: {reason}")]
    Open { registry: String, reason: String },
    /// The database could not be reached, or went away mid-call (retried for a while first).
    #[error("registry {registry}: cannot reach the database: {message}")]
    Unreachable { registry: String, message: String },
    /// A `ferry serve` that no longer holds the leader lease tried to write: refused.
    #[error(
        "registry {registry}: this server no longer holds the leader lease ({} has it, epoch {epoch}): the write was refused",
        if holder.is_empty() { "nobody" } else { holder.as_str() }
    )]
    Fenced { registry: String, holder: String, epoch: i64 },
    #[error("registry: a panic while it was in use left it unusable in this process; restart ferry")]
    Poisoned,
    #[error(
        "environment {env} is locked by deployment {} ({} on {}, pid {}, since {}){}; run `ferry resume` to continue it, `ferry rollback` to unwind it, or pass --force-unlock if it is gone",
        lock.deployment_id, lock.owner, lock.hostname, lock.pid, when(lock.since_ms), lock.lease_note()
    )]
    Locked { env: String, lock: Box<Lock> },
    #[error(
        "registry: deployment {deployment} host {host}: {from} → {to} is not a legal step (a bug, or two coordinators on one deployment)"
    )]
    Illegal { deployment: String, host: String, from: String, to: HostState },
}

/// The record of every deployment. Every method is one durable step.
pub trait Registry: Send + Sync {
    /// Where it is kept, for messages.
    fn describe(&self) -> String;

    /// From now on this process writes only while `holder` has the `ferry serve` leader lease
    /// ([`SERVE_LEASE`]); any other write is refused ([`RegistryError::Fenced`]), so a leader
    /// that lost the lease cannot change the record. A shared registry only; SQLite has one
    /// server and ignores it.
    fn fence_writes(&self, _holder: &str) {}

    /// The lock of an environment, if held.
    fn lock_of(&self, env: &str) -> Result<Option<Lock>, RegistryError>;
    /// Takes the environment for `deployment_id`. A lock held by the same deployment whose process
    /// is gone (or is this process) is taken over; any other lock refuses ([`RegistryError::Locked`]),
    /// unless `force`, which breaks it and returns it (the caller warns).
    fn lock(&self, env: &str, deployment_id: &str, force: bool) -> Result<Option<Lock>, RegistryError>;
    /// Releases the environment if `deployment_id` holds it.
    fn unlock(&self, env: &str, deployment_id: &str) -> Result<(), RegistryError>;
    /// Renews `deployment_id`'s lock of `env` (a no-op if it holds none).
    fn renew_lock(&self, env: &str, deployment_id: &str) -> Result<(), RegistryError>;
    /// Takes or renews lease `name` for `holder` (reachable at `address`) for `ttl`, atomically:
    /// free or lapsed, it becomes `holder`'s with the next epoch; `holder`'s own, it is renewed
    /// (same epoch); another's that holds, it is returned as it is (see [`Lease::holder`]).
    fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        address: &str,
        ttl: std::time::Duration,
    ) -> Result<Lease, RegistryError>;
    /// Lease `name` as recorded, if it was ever taken.
    fn lease_of(&self, name: &str) -> Result<Option<Lease>, RegistryError>;
    /// Gives lease `name` up if `holder` has it (it lapses at once; the epoch stays).
    fn release_lease(&self, name: &str, holder: &str) -> Result<(), RegistryError>;

    /// Records a new deployment (`pending`) and its hosts (`pending`), at once.
    fn create(&self, d: &NewDeployment<'_>) -> Result<(), RegistryError>;
    /// Sets a deployment's status (finished ones also set `finished_ms`) and logs the event.
    fn set_status(&self, id: &str, status: DeploymentStatus, error: Option<&str>) -> Result<(), RegistryError>;
    /// Moves a host to `to` (refused unless [`crate::state::legal`]), with what is known so far.
    /// `staging` (re)starts its clock; terminal states stop it.
    fn set_host(&self, id: &str, host: &str, to: HostState, update: &HostUpdate<'_>) -> Result<(), RegistryError>;
    fn event(&self, id: &str, host: Option<&str>, kind: &str, message: &str) -> Result<(), RegistryError>;
    fn deployment(&self, id: &str) -> Result<Option<DeploymentRow>, RegistryError>;
    /// The hosts of a deployment, in plan order.
    fn hosts(&self, id: &str) -> Result<Vec<HostRow>, RegistryError>;
    /// The hosts of a deployment whose activation began (they may run its release).
    fn activated_hosts(&self, id: &str) -> Result<std::collections::HashSet<String>, RegistryError>;
    /// The newest deployments (of `env`, of `app`, when given), newest first.
    fn history(&self, env: Option<&str>, app: Option<&str>, limit: usize) -> Result<Vec<DeploymentRow>, RegistryError>;
    /// Per-environment success and rollback rates and durations of finished deployments.
    fn report(&self, env: Option<&str>) -> Result<Vec<EnvReport>, RegistryError>;
    /// The newest deployment of `env` (of any kind; of `app`, when given), if any.
    fn latest_deployment(&self, env: &str, app: Option<&str>) -> Result<Option<String>, RegistryError>;
    /// Events of deployment `id` after sequence number `after` (0: all), oldest first.
    fn events_since(&self, id: &str, after: i64) -> Result<Vec<EventRow>, RegistryError>;

    /// blue-green: the live group of `env` and the deployment that made it live.
    fn live_group(&self, env: &str) -> Result<Option<(String, String)>, RegistryError>;
    /// blue-green: records `group` as the live group of `env`, switched by `deployment_id`.
    fn set_live_group(&self, env: &str, group: &str, deployment_id: &str) -> Result<(), RegistryError>;

    /// Records `v`; if the version is already registered, returns the existing row instead
    /// (the caller compares the manifest hashes).
    fn register_version(&self, v: &VersionRow) -> Result<Option<VersionRow>, RegistryError>;
    fn version(&self, app: &str, version: &str) -> Result<Option<VersionRow>, RegistryError>;
    /// Registered versions (of `app`, or of every app), newest first.
    fn versions(&self, app: Option<&str>, limit: usize) -> Result<Vec<VersionRow>, RegistryError>;
    /// Gives the versions registered before there were several apps to `app` (the only app of
    /// the fleet that serves them); how many it took.
    fn claim_versions(&self, app: &str) -> Result<usize, RegistryError>;
    /// Who asked for deployment `id` through the API (the first asker is kept), and the
    /// deployment it was promoted from.
    fn set_requested_by(&self, id: &str, by: &str, promoted_from: Option<&str>) -> Result<(), RegistryError>;
    /// Records a smoke run; its sequence number.
    fn record_smoke(&self, run: &SmokeRun) -> Result<i64, RegistryError>;
    /// The smoke runs of a deployment, oldest first.
    fn smoke_runs(&self, deployment_id: &str) -> Result<Vec<SmokeRun>, RegistryError>;
    fn approve(&self, deployment_id: &str, environment: &str, by: &str) -> Result<(), RegistryError>;
    /// Marks `by`'s approval of promoting `deployment_id` to `environment` used by `promotion`.
    fn use_approval(
        &self,
        deployment_id: &str,
        environment: &str,
        by: &str,
        promotion: &str,
    ) -> Result<(), RegistryError>;
    fn approvals(&self, deployment_id: &str) -> Result<Vec<Approval>, RegistryError>;
    /// Records a metric gate's measurement of a deployment.
    fn record_measurement(&self, m: &Measurement) -> Result<(), RegistryError>;
    /// The measurements of a deployment, oldest first.
    fn measurements(&self, deployment_id: &str) -> Result<Vec<Measurement>, RegistryError>;
}

/// The three hosts of (environment, app) slowest on average over finished deploys: `$1`/`?1`
/// the environment, `$2`/`?2` the app (the same text works on both backends).
pub(crate) const SLOWEST_HOSTS: &str = "SELECT h.host, CAST(AVG(h.finished_ms - h.started_ms) AS DOUBLE PRECISION) AS mean FROM hosts h JOIN deployments d ON d.id = h.deployment_id
     WHERE d.environment = $1 AND d.app = $2 AND d.kind = 'deploy' AND h.started_ms IS NOT NULL AND h.finished_ms IS NOT NULL
     GROUP BY h.host ORDER BY mean DESC LIMIT 3";

/// Per (environment, app): rates and durations of the finished deploys among `deployments`;
/// `rolled_back` names those a host of which went back; `slowest` asks the backend for an
/// environment's and app's slowest hosts.
pub(crate) fn build_report(
    deployments: Vec<DeploymentRow>,
    rolled_back: &std::collections::HashSet<String>,
    mut slowest: impl FnMut(&str, &str) -> Result<Vec<SlowHost>, RegistryError>,
) -> Result<Vec<EnvReport>, RegistryError> {
    let finished: Vec<DeploymentRow> =
        deployments.into_iter().filter(|d| d.kind == DeploymentKind::Deploy && d.finished_ms.is_some()).collect();
    let mut envs: Vec<(String, String)> = finished.iter().map(|d| (d.environment.clone(), d.app.clone())).collect();
    envs.sort();
    envs.dedup();
    let now = now_ms();
    let mut out = Vec::new();
    for (e, app) in envs {
        let ds: Vec<&DeploymentRow> = finished.iter().filter(|d| d.environment == e && d.app == app).collect();
        let count = |s: DeploymentStatus| ds.iter().filter(|d| d.status == s).count() as u64;
        let went_back =
            ds.iter().filter(|d| d.status == DeploymentStatus::RolledBack || rolled_back.contains(&d.id)).count()
                as u64;
        let mut durations: Vec<u64> =
            ds.iter().map(|d| (d.finished_ms.unwrap_or(d.started_ms) - d.started_ms).max(0) as u64).collect();
        durations.sort_unstable();
        let n = ds.len() as u64;
        let recent = ds.iter().filter(|d| now - d.started_ms <= 28 * 86_400_000).count();
        let slowest_hosts = slowest(&e, &app)?;
        out.push(EnvReport {
            environment: e,
            app,
            deployments: n,
            deployments_per_week: recent as f64 / 4.0,
            succeeded: count(DeploymentStatus::Succeeded),
            failed: count(DeploymentStatus::Failed),
            rolled_back: count(DeploymentStatus::RolledBack),
            cancelled: count(DeploymentStatus::Cancelled),
            success_rate: count(DeploymentStatus::Succeeded) as f64 / n.max(1) as f64,
            rollback_rate: went_back as f64 / n.max(1) as f64,
            mean_duration_ms: durations.iter().sum::<u64>() / n.max(1),
            p95_duration_ms: percentile(&durations, 95),
            slowest_hosts,
        });
    }
    Ok(out)
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], p: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (sorted.len() * p).div_ceil(100).max(1);
    sorted[rank - 1]
}

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// A unix-milliseconds time as RFC 3339 (UTC), for messages and tables.
pub fn when(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ms / 1000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| ms.to_string())
}

pub(crate) fn this_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// Whether process `pid` of this machine has ended: it does not exist, or it is a zombie (it has
/// exited and only waits for its parent to reap it; `kill(pid, 0)` still succeeds on one).
fn process_gone(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else { return false };
    // kill(pid, 0), not /proc alone: a sandboxed service (ProtectProc=invisible) sees no other
    // user's /proc entries, but the kernel still says whether the process exists (EPERM: it
    // does, and belongs to someone else).
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None) {
        Err(nix::errno::Errno::ESRCH) => true,
        _ => zombie(pid),
    }
}

/// `/proc/PID/stat`'s state is `Z` (or `X`, dead). The state follows the command name, which is in
/// parentheses and may itself hold spaces or parentheses: read after the last `)`.
fn zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')').is_some_and(|(_, rest)| matches!(rest.trim_start().chars().next(), Some('Z' | 'X')))
    })
}

/// Who holds an environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Lock {
    pub deployment_id: String,
    pub owner: String,
    pub hostname: String,
    pub pid: u32,
    pub since_ms: i64,
    /// When its holder last renewed it (every [`LOCK_RENEW`] while the deployment runs).
    pub renewed_ms: i64,
}

// What `ferry registry migrate` copies between backends ([`migrate`]).

/// A column's kind, for reading it from SQLite and binding it for PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Int,
    Real,
    Text,
    Bool,
}

/// One value of a copied row.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(Option<i64>),
    Real(Option<f64>),
    Text(Option<String>),
    Bool(Option<bool>),
}

/// A table's name, columns and rows, as copied.
pub type Table<'a> = (&'a str, &'a [(&'a str, Kind)], Vec<Vec<Value>>);

/// The name of `ferry serve`'s leader lease, whose epoch fences the agents.
pub const SERVE_LEASE: &str = "serve";

/// A lease (the `ferry serve` leader's): who holds it, where it is reached, its fencing epoch
/// (one more each time it changes hands) and until when it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Lease {
    pub name: String,
    pub holder: String,
    pub address: String,
    pub epoch: i64,
    pub expires_ms: i64,
}

impl Lease {
    pub fn live(&self) -> bool {
        self.expires_ms >= now_ms()
    }
}

/// The lease decision both backends make, from the row as read (in their transaction): the
/// row to write, if any, and the lease as it stands after.
pub(crate) fn lease_step(
    row: Option<Lease>,
    name: &str,
    holder: &str,
    address: &str,
    ttl: std::time::Duration,
) -> (bool, Lease) {
    let now = now_ms();
    let until = now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
    let mine =
        |epoch| Lease { name: name.into(), holder: holder.into(), address: address.into(), epoch, expires_ms: until };
    match row {
        None => (true, mine(1)),
        Some(l) if l.holder == holder => (true, mine(l.epoch)),
        Some(l) if l.expires_ms < now => (true, mine(l.epoch + 1)),
        Some(l) => (false, l),
    }
}

/// How long a lock holds without renewal before a holder on another machine counts as gone.
pub const LOCK_LEASE: std::time::Duration = std::time::Duration::from_secs(20);
/// How often a running deployment renews its environment's lock.
pub const LOCK_RENEW: std::time::Duration = std::time::Duration::from_secs(5);

impl Lock {
    /// Its holder is gone: on this machine, its process has exited; on another, it has not
    /// renewed the lock for [`LOCK_LEASE`] (it died, or lost the registry).
    pub fn stale(&self) -> bool {
        if self.hostname == this_hostname() {
            process_gone(self.pid)
        } else {
            now_ms() - self.renewed_ms > i64::try_from(LOCK_LEASE.as_millis()).unwrap_or(i64::MAX)
        }
    }

    /// Why the holder counts as gone, or how long until it would ("" on this machine, alive).
    pub fn lease_note(&self) -> String {
        let ago = (now_ms() - self.renewed_ms).max(0) / 1000;
        let lease = LOCK_LEASE.as_secs();
        match (self.hostname == this_hostname(), self.stale()) {
            (true, true) => ": that process is gone".into(),
            (true, false) => String::new(),
            (false, true) => format!(": its holder has not renewed it for {ago} s (the lease is {lease} s)"),
            (false, false) => format!(
                "; renewed {ago} s ago: if that coordinator died, `ferry resume` takes over once {lease} s pass without a renewal"
            ),
        }
    }

    /// The holder is this process.
    pub fn mine(&self) -> bool {
        self.hostname == this_hostname() && self.pid == std::process::id()
    }
}

/// A deployment as recorded.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct DeploymentRow {
    pub id: String,
    pub kind: DeploymentKind,
    pub environment: String,
    pub version: String,
    pub release_id: String,
    pub artifact: String,
    pub manifest_hash: String,
    /// The strategy, as JSON (see `plan::Strategy`), plus max_failures and auto_rollback.
    #[serde(default)]
    pub strategy: String,
    pub status: DeploymentStatus,
    pub started_ms: i64,
    pub finished_ms: Option<i64>,
    pub error: Option<String>,
    pub bytes_sent: i64,
    pub hosts_failed: i64,
    /// `ferry serve`: who asked for it (`cert:NAME` or `token:NAME`); none when the CLI ran it.
    #[serde(default)]
    pub requested_by: Option<String>,
    /// `ferry serve`: the deployment it was promoted from.
    #[serde(default)]
    pub promoted_from: Option<String>,
    /// The app it deploys ("" in registries from before fleet.toml could hold several).
    #[serde(default)]
    pub app: String,
}

/// A host of a deployment as recorded.
#[derive(Debug, Clone, Serialize)]
pub struct HostRow {
    pub host: String,
    pub batch: i64,
    pub state: HostState,
    pub previous_release: Option<String>,
    pub started_ms: Option<i64>,
    pub finished_ms: Option<i64>,
    pub bytes_sent: i64,
    pub error: Option<String>,
    pub activate_ms: Option<i64>,
    /// The release the host was switched to, where it is not the deployment's own (a rollback's
    /// hosts each go back to a release of their own).
    pub release: Option<String>,
}

/// Per-environment figures for `ferry report`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct EnvReport {
    pub environment: String,
    /// The app ("" for deployments recorded before fleet.toml could hold several).
    #[serde(default)]
    pub app: String,
    pub deployments: u64,
    /// Deployments (not rollbacks) started in the last 28 days, divided by 4.
    pub deployments_per_week: f64,
    pub succeeded: u64,
    pub failed: u64,
    pub rolled_back: u64,
    pub cancelled: u64,
    /// Succeeded / finished.
    pub success_rate: f64,
    /// Deployments in which any host went back to its previous release / finished.
    pub rollback_rate: f64,
    pub mean_duration_ms: u64,
    pub p95_duration_ms: u64,
    /// Hosts by mean time per deployment, slowest first (at most 3).
    pub slowest_hosts: Vec<SlowHost>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct SlowHost {
    pub host: String,
    pub mean_ms: u64,
}

/// What a new deployment records.
pub struct NewDeployment<'a> {
    pub id: &'a str,
    pub kind: DeploymentKind,
    pub environment: &'a str,
    pub version: &'a str,
    pub release_id: &'a str,
    pub artifact: &'a str,
    pub manifest_hash: &'a str,
    pub strategy: &'a str,
    /// The app deployed (fleet.toml's `app.name`).
    pub app: &'a str,
    /// (host, batch index), in plan order.
    pub hosts: &'a [(String, usize)],
}

/// What a host transition records besides its state.
#[derive(Debug, Default)]
pub struct HostUpdate<'a> {
    pub previous_release: Option<&'a str>,
    pub bytes: u64,
    pub error: Option<&'a str>,
    /// The agent's time for the activation.
    pub activate_ms: Option<u64>,
    /// The release the host now runs, where it is not the deployment's own.
    pub release: Option<&'a str>,
}

/// A version registered for deployment: its artifact and what it hashed to when registered.
#[derive(Debug, Clone, Serialize)]
pub struct VersionRow {
    /// The app it is a build of (versions are named per app).
    pub app: String,
    pub version: String,
    pub artifact: String,
    pub release_id: String,
    pub manifest_hash: String,
    pub total_bytes: i64,
    pub files: i64,
    pub registered_by: String,
    pub registered_ms: i64,
    /// Free-form strings (git commit, pipeline URL, …).
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

/// One run of a deployment's smoke tests.
#[derive(Debug, Clone, Serialize)]
pub struct SmokeRun {
    pub id: i64,
    pub deployment_id: String,
    pub run_by: String,
    pub started_ms: i64,
    pub finished_ms: i64,
    pub passed: bool,
    pub results: serde_json::Value,
    /// The environment's own `smoke` checks ran (not checks sent with the request): only such
    /// runs count for promotion.
    pub env_checks: bool,
}

/// One measurement of a metric gate ([`crate::gate`]) during a deployment.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Measurement {
    pub deployment_id: String,
    /// The batch it judged (from 1).
    pub batch: u32,
    pub gate: String,
    pub at_ms: i64,
    pub outcome: crate::gate::Outcome,
    /// The value that decided, and a baseline gate's baseline.
    pub value: Option<f64>,
    pub baseline: Option<f64>,
    /// How it was judged, or why it is inconclusive.
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Approval {
    pub deployment_id: String,
    /// The environment the approval lets the deployment's version be promoted into.
    pub environment: String,
    pub approved_by: String,
    pub time_ms: i64,
    /// The promotion that used this approval (an approval is good for one promotion).
    pub used_by: Option<String>,
}

/// A recorded event of a deployment (state changes, pauses, switches, …).
#[derive(Debug, Clone, Serialize)]
pub struct EventRow {
    pub seq: i64,
    pub time_ms: i64,
    pub host: Option<String>,
    pub kind: String,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A coordinator killed by kill -9 is a zombie until its parent reaps it; `kill(0)` succeeds on
    /// a zombie, so its lock looked alive and `ferry resume` was refused.
    #[test]
    fn a_zombie_coordinator_holds_a_stale_lock() {
        let child = std::process::Command::new("true").spawn().expect("spawn");
        let pid = child.id();
        // Not reaped: it stays a zombie until `child` is waited for.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !zombie(pid) {
            assert!(std::time::Instant::now() < deadline, "the child never became a zombie");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let lock = Lock {
            deployment_id: "d-1".into(),
            owner: "ci".into(),
            hostname: this_hostname(),
            pid,
            since_ms: 0,
            renewed_ms: 0,
        };
        assert!(lock.stale(), "a zombie's lock is stale");
        let me = Lock { pid: std::process::id(), ..lock.clone() };
        assert!(!me.stale() && me.mine());
        let mut child = child;
        child.wait().expect("reap");
        assert!(lock.stale(), "a reaped process's lock is stale");
    }
}
