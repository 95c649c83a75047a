//! Active/standby `ferry serve` on a shared (PostgreSQL) registry: the instances compete for the
//! registry's leader lease ([`crate::registry::SERVE_LEASE`]); the holder is the leader, renews
//! the lease every third of its length and steps down at once when it cannot, or when a renewal
//! has not come back before the lease would lapse by its own clock (its rollouts stop after
//! their hosts in flight); the others are standbys. A standby that takes the lease over (the
//! leader died, or lost the registry) has the next epoch, which fences the old leader out of
//! every host it then touches and out of the registry (its writes are refused:
//! [`crate::registry::Registry::fence_writes`]), and resumes each deployment the old leader left
//! running at once, taking over its locks (a paused canary stays paused). A standby answers
//! reads; writes get 503 with the leader's address.
//!
//! On a SQLite registry there is one server and no lease: it is always the leader, epoch 0.
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::registry::SERVE_LEASE;
use crate::state::{DeploymentKind, DeploymentStatus};

/// This server's part in the lease.
pub struct Leadership {
    /// A shared registry: leadership is contested.
    pub contested: bool,
    /// Who this server is in the lease (host, pid, start).
    pub holder: String,
    /// Where clients reach this server (`[server] advertise`).
    pub address: String,
    pub lease: Duration,
    leader: AtomicBool,
    epoch: AtomicI64,
    /// The leader's address as last read (a standby's 503 names it).
    seen: Mutex<Option<String>>,
    /// Every other holder of the lease this server has seen: their locks are taken over at once
    /// when this server leads.
    others: Mutex<Vec<String>>,
    /// Until when this server's lease holds by its own clock (its last renewal's start plus
    /// the lease, less a margin): past it, it is no longer the leader even before it hears so.
    holds_until: Mutex<Option<Instant>>,
}

impl Leadership {
    pub fn new(contested: bool, address: String, lease: Duration) -> Leadership {
        let holder =
            format!("{}:{}:{}", crate::registry::this_hostname(), std::process::id(), crate::registry::now_ms());
        Leadership {
            contested,
            holder,
            address,
            lease,
            leader: AtomicBool::new(!contested),
            epoch: AtomicI64::new(0),
            seen: Mutex::new(None),
            others: Mutex::new(Vec::new()),
            holds_until: Mutex::new(None),
        }
    }

    /// Whether this server may run rollouts and take writes.
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::SeqCst)
            && (!self.contested || self.holds_until.lock().ok().and_then(|h| *h).is_some_and(|t| Instant::now() < t))
    }

    /// Whether `lock` is held by a `ferry serve` that had the lease before this one took it (it
    /// stepped down before its lease lapsed, and the agents and the registry refuse it now).
    fn deposed(&self, lock: &crate::registry::Lock) -> bool {
        let Ok(others) = self.others.lock() else { return false };
        others.iter().any(|h| {
            let mut parts = h.rsplitn(3, ':');
            let (_, pid, host) = (parts.next(), parts.next(), parts.next());
            host == Some(lock.hostname.as_str()) && pid == Some(lock.pid.to_string().as_str())
        })
    }

    /// The epoch this server's commands carry.
    pub fn epoch(&self) -> i64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// The leader's address, as this server last saw it.
    pub fn leader_address(&self) -> Option<String> {
        if self.is_leader() {
            return Some(self.address.clone());
        }
        self.seen.lock().ok().and_then(|s| s.clone())
    }

    pub fn role(&self) -> &'static str {
        if self.is_leader() { "leader" } else { "standby" }
    }
}

/// Contests the lease until `shutdown`, then gives it up if held.
pub async fn run(state: Shared, shutdown: CancellationToken) {
    let me = &state.leadership;
    if !me.contested {
        return;
    }
    let every = (me.lease / 3).max(Duration::from_millis(200));
    // Clocks drift and a renewal takes time: step down a little before the lease lapses.
    let margin = (me.lease / 10).max(Duration::from_millis(100));
    loop {
        let started = Instant::now();
        // A leader's renewal must come back while its lease still holds; a standby's try is
        // bounded by the registry's own retries.
        let limit = match (me.leader.load(Ordering::SeqCst), me.holds_until.lock().ok().and_then(|h| *h)) {
            (true, Some(until)) => until,
            _ => started + me.lease.max(Duration::from_secs(60)),
        };
        let (registry, holder, address, ttl) =
            (state.registry.clone(), me.holder.clone(), me.address.clone(), me.lease);
        let call = tokio::task::spawn_blocking(move || registry.acquire_lease(SERVE_LEASE, &holder, &address, ttl));
        match tokio::time::timeout_at(limit, call).await {
            Ok(Ok(Ok(lease))) if lease.holder == me.holder => {
                if let Ok(mut until) = me.holds_until.lock() {
                    *until = Some(started + me.lease.saturating_sub(margin));
                }
                me.epoch.store(lease.epoch, Ordering::SeqCst);
                if !me.leader.swap(true, Ordering::SeqCst) {
                    tracing::warn!(epoch = lease.epoch, "this server is the leader now");
                }
                // Every tick, not only at the takeover: a lock the old leader held goes stale
                // only once its own lease lapses.
                take_over(&state).await;
            }
            Ok(Ok(Ok(lease))) => {
                if let Ok(mut seen) = me.seen.lock() {
                    *seen = Some(lease.address.clone());
                }
                if let Ok(mut others) = me.others.lock()
                    && !others.contains(&lease.holder)
                {
                    others.push(lease.holder.clone());
                }
                step_down(&state, &format!("{} holds the lease (epoch {})", lease.holder, lease.epoch));
            }
            Ok(Ok(Err(e))) => step_down(&state, &format!("cannot renew the lease: {e}")),
            Ok(Err(e)) => step_down(&state, &format!("cannot renew the lease: {e}")),
            Err(_) => step_down(&state, "the registry did not answer before the lease would lapse"),
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => break,
        }
    }
    if me.leader.swap(false, Ordering::SeqCst)
        && let Err(e) = state.registry.release_lease(SERVE_LEASE, &me.holder)
    {
        tracing::warn!("cannot give the lease up: {e}");
    }
}

/// No longer the leader: the rollouts this server runs stop after their hosts in flight.
fn step_down(state: &Shared, why: &str) {
    if let Ok(mut until) = state.leadership.holds_until.lock() {
        *until = None;
    }
    if state.leadership.leader.swap(false, Ordering::SeqCst) {
        tracing::error!("this server is a standby now: {why}; its rollouts stop after their hosts in flight");
        state.jobs.cancel_running();
    }
}

/// Resumes every deployment of the registry that is running but not run here (its server is
/// gone, or was deposed: its lock is broken at once). Paused ones stay paused; ones whose lock
/// is still live wait for the next tick.
async fn take_over(state: &Shared) {
    for env in state.config.environments.keys() {
        if state.jobs.runs_in(env) {
            continue;
        }
        let Ok(Some(lock)) = state.registry.lock_of(env) else { continue };
        let Ok(Some(d)) = state.registry.deployment(&lock.deployment_id) else { continue };
        let running = matches!(d.status, DeploymentStatus::Running | DeploymentStatus::Pending);
        let deposed = state.leadership.deposed(&lock);
        if !running || d.kind != DeploymentKind::Deploy || !(lock.stale() || lock.mine() || deposed) {
            continue;
        }
        if deposed && !lock.stale() {
            match state.registry.lock(env, &d.id, true) {
                Ok(_) => tracing::warn!(
                    deployment_id = d.id,
                    environment = env,
                    "took over the lock of {} (pid {}), the leader before this one",
                    lock.hostname,
                    lock.pid
                ),
                Err(e) => {
                    tracing::warn!(environment = env, "cannot take over the lock of deployment {}: {e}", d.id);
                    continue;
                }
            }
        }
        let Ok(app) = state.app_of(&d) else { continue };
        let app = app.clone();
        let op = super::jobs::Op::Resume { paused_only: false };
        match super::jobs::start(state, &app, env, "leader takeover", None, op).await {
            Ok(id) => tracing::warn!(deployment_id = id, environment = env, "resumed the deployment its server left"),
            Err(e) => tracing::warn!(environment = env, "cannot resume deployment {} yet: {}", d.id, e.message),
        }
    }
}
