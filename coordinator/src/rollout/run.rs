//! The run loop: ask [`state::next`] what to do from the persisted host states, do it on the
//! fleet, record the outcome, ask again. Deployments and rollbacks take the same loop; only what
//! "activate a host" means differs ([`Work`]).
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{Engine, Error, Event, Stored, hooks};
use crate::client::{ErrorKind, HostError};
use crate::config::Host;
use crate::fleet::{Activation, Release, Target, Transfer};
use crate::gate::Point;
use crate::notify::Kind;
use crate::plan::{Pause, Strategy};
use crate::registry::{DeploymentRow, HostRow, HostUpdate};
use crate::state::{self, DeploymentStatus, HostState, Limits, Next, Outcome};

/// What activating a host of the deployment means.
pub(super) enum Work {
    /// Stage the release, then activate it.
    Deploy { release: Release, activation: Activation },
    /// Switch to a release the host keeps.
    Rollback { target: Target },
}

fn failures(rows: &[HostRow]) -> usize {
    rows.iter().filter(|h| h.state.is_failure()).count()
}

/// The registry's host rows as the state machine sees them.
fn machine_view(rows: &[HostRow]) -> Vec<state::Host> {
    rows.iter().map(|h| state::Host { state: h.state, batch: usize::try_from(h.batch).unwrap_or(0) }).collect()
}

/// The pause after batch `n` of `total` under `strategy`.
fn pause_after(strategy: &Strategy, n: usize, total: usize) -> Option<Pause> {
    if n + 1 >= total {
        return None;
    }
    match strategy {
        Strategy::Canary { pause, .. } => Some(*pause),
        Strategy::Rolling { .. } | Strategy::AllAtOnce | Strategy::BlueGreen => None,
    }
}

impl Engine<'_> {
    /// The hosts of the environment by name, all of deployment `id`'s (`rows`) among them (or
    /// which are no longer in fleet.toml).
    fn inventory_of(&self, id: &str, rows: &[HostRow]) -> Result<HashMap<String, Host>, Error> {
        let inventory = self.inventory()?;
        let missing: Vec<String> =
            rows.iter().filter(|h| !inventory.contains_key(&h.host)).map(|h| h.host.clone()).collect();
        if !missing.is_empty() {
            return Err(Error::HostsGone { id: id.to_string(), env: self.env.to_string(), hosts: missing });
        }
        Ok(inventory)
    }

    /// The time limits of the environment's host steps.
    pub(super) fn limits(&self) -> Limits {
        let deadline = self
            .config
            .environments
            .get(self.env)
            .map_or(crate::config::DEFAULT_PROGRESS_DEADLINE, |e| self.config.progress_deadline(e));
        Limits::all(deadline)
    }

    /// Runs one host step, failing the host when the whole step outlasts the limit of `state`.
    pub(super) async fn bounded<T>(
        &self,
        host: &Host,
        state: HostState,
        work: impl Future<Output = Result<T, HostError>>,
    ) -> Result<T, HostError> {
        let Some(limit) = state.time_limit(&self.limits()) else { return work.await };
        tokio::time::timeout(limit, work)
            .await
            .unwrap_or_else(|_| Err(self.stuck(host, state, "did not finish within", limit)))
    }

    /// Runs one host step, failing the host when `progress` (a counter that moves while the step
    /// does) stands still for the limit of `state`.
    pub(super) async fn watched<T>(
        &self,
        host: &Host,
        state: HostState,
        work: impl Future<Output = Result<T, HostError>>,
        progress: &(dyn Fn() -> u64 + Sync),
    ) -> Result<T, HostError> {
        let Some(limit) = state.time_limit(&self.limits()) else { return work.await };
        let mut work = std::pin::pin!(work);
        let check = (limit / 20).clamp(Duration::from_millis(50), Duration::from_secs(5));
        let (mut seen, mut since) = (progress(), tokio::time::Instant::now());
        loop {
            tokio::select! {
                result = &mut work => return result,
                () = tokio::time::sleep(check) => {
                    let now = progress();
                    if now != seen {
                        (seen, since) = (now, tokio::time::Instant::now());
                    } else if since.elapsed() >= limit {
                        return Err(self.stuck(host, state, "made no progress for", limit));
                    }
                }
            }
        }
    }

    /// A host failed for outlasting its state's limit.
    fn stuck(&self, host: &Host, state: HostState, what: &str, limit: Duration) -> HostError {
        HostError::new(
            host,
            ErrorKind::Failed,
            format!(
                "{} {what} {} (progress_deadline of environment {}); the host may still be at it: check it with `ferry status`",
                state.step(),
                humantime::format_duration(limit),
                self.env
            ),
        )
    }

    /// Drives deployment `d` from whatever state it is in to its end (or a pause), renewing the
    /// environment's lock all along (so a coordinator elsewhere sees this one is alive).
    pub(super) async fn drive(
        &self,
        d: &DeploymentRow,
        plan: &Stored,
        work: &Work,
    ) -> Result<super::DeployReport, Error> {
        let renew = async {
            loop {
                tokio::time::sleep(crate::registry::LOCK_RENEW).await;
                if let Err(e) = self.registry.renew_lock(self.env, &d.id) {
                    tracing::warn!("cannot renew the lock of {}: {e}", self.env);
                }
            }
        };
        tokio::select! {
            r = self.drive_held(d, plan, work) => r,
            () = renew => unreachable!("the renewal never ends"),
        }
    }

    async fn drive_held(&self, d: &DeploymentRow, plan: &Stored, work: &Work) -> Result<super::DeployReport, Error> {
        let id = d.id.as_str();
        let rows = self.registry.hosts(id)?;
        let inventory = self.inventory_of(id, &rows)?;
        self.registry.set_status(id, DeploymentStatus::Running, None)?;
        let transfers: HashMap<String, Arc<Transfer>> =
            rows.iter().map(|h| (h.host.clone(), Arc::new(Transfer::default()))).collect();
        if let Work::Deploy { .. } = work {
            for h in &rows {
                // In plan order: the live view lists hosts as they come.
                self.emit(&Event::Transfer { host: &h.host, transfer: &transfers[&h.host] });
            }
        }
        let view = machine_view(&rows);
        let total = view.iter().map(|h| h.batch + 1).max().unwrap_or(0);
        let rules = state::Rules {
            max_failures: plan.max_failures,
            stage: matches!(work, Work::Deploy { .. }),
            prestage: plan.prestage,
            pauses: (0..total).map(|n| pause_after(&plan.strategy, n, total)).collect(),
        };
        let deploying = matches!(work, Work::Deploy { .. });
        let gated = deploying && !self.environment()?.gates.is_empty();
        // A paused canary going on: its before_promotion webhooks first.
        if deploying
            && d.status == DeploymentStatus::Paused
            && let Some(reason) = self.webhooks(id, Point::BeforePromotion, None).await?
        {
            return self.halt(id, plan, &transfers, Some(&reason)).await;
        }
        // A coordinator that died mid-bake: the last batch it activated is baked again.
        if gated
            && let Some(last) = rows.iter().filter(|h| h.state == HostState::Healthy).map(|h| h.batch).max()
            && let Ok(last) = usize::try_from(last)
            && !self.baked(id, last)?
            && let Some(reason) = self.bake(id, last, None).await?
        {
            return self.halt(id, plan, &transfers, Some(&reason)).await;
        }
        let mut just_activated = None;
        loop {
            let rows = self.registry.hosts(id)?;
            match state::next(&machine_view(&rows), &rules, just_activated, self.cancel.is_cancelled()) {
                Next::Stage(ix) => {
                    let Work::Deploy { release, .. } = work else {
                        return Err(Error::Corrupt {
                            id: id.to_string(),
                            reason: "a rollback has nothing to stage".into(),
                        });
                    };
                    let hosts: Vec<&Host> = ix.iter().map(|&i| &inventory[&rows[i].host]).collect();
                    self.stage_all(id, &hosts, release, &transfers).await?;
                }
                Next::Activate { batch, hosts } => {
                    if deploying
                        && self.registry.activated_hosts(id)?.is_empty()
                        && let Some(reason) = self.webhooks(id, Point::BeforeActivation, None).await?
                    {
                        return self.halt(id, plan, &transfers, Some(&reason)).await;
                    }
                    let names: Vec<&str> = hosts.iter().map(|&i| rows[i].host.as_str()).collect();
                    self.emit(&Event::Batch { number: batch + 1, total, hosts: &names });
                    let steps = names.iter().map(|name| {
                        let host = &inventory[*name];
                        async move {
                            match work {
                                Work::Deploy { activation, .. } => self.activate_one(id, activation, host).await,
                                Work::Rollback { target } => self.revert_one(id, target, host).await,
                            }
                        }
                    });
                    for r in futures_util::future::join_all(steps).await {
                        r?;
                    }
                    // Past the failure budget the state machine halts next; otherwise the batch
                    // is judged from outside before the rollout goes on.
                    if deploying && failures(&self.registry.hosts(id)?) <= plan.max_failures {
                        if let Some(reason) = self.bake(id, batch, None).await? {
                            return self.halt(id, plan, &transfers, Some(&reason)).await;
                        }
                        if let Some(reason) = self.webhooks(id, Point::AfterBatch, Some(batch)).await? {
                            return self.halt(id, plan, &transfers, Some(&reason)).await;
                        }
                    }
                    self.notify(Kind::BatchDone, id, Some(batch), None);
                    just_activated = Some(batch);
                }
                Next::Pause { after, pause: Pause::Manual } => {
                    self.registry.set_status(id, DeploymentStatus::Paused, None)?;
                    self.emit(&Event::Paused { after: after + 1, total, env: self.env });
                    self.notify(Kind::Paused, id, Some(after), None);
                    return self.report(id, &transfers);
                }
                Next::Pause { after, pause: Pause::For(wait) } => {
                    self.emit(&Event::Waiting { wait });
                    self.registry.event(id, None, "pause", &humantime::format_duration(wait).to_string())?;
                    let until = tokio::time::Instant::now() + wait;
                    // The metric gates keep measuring the batch through the pause (none: no wait).
                    if deploying && let Some(reason) = self.bake(id, after, Some(wait)).await? {
                        return self.halt(id, plan, &transfers, Some(&reason)).await;
                    }
                    // Woken by the cancel itself, not by polling for it.
                    tokio::select! {
                        () = tokio::time::sleep_until(until) => {}
                        () = self.cancel.cancelled() => {}
                    }
                    just_activated = None;
                }
                Next::Halt => {
                    return match work {
                        Work::Deploy { .. } => self.halt(id, plan, &transfers, None).await,
                        Work::Rollback { .. } => self.finish(
                            id,
                            DeploymentStatus::Failed,
                            Some("a host could not be rolled back"),
                            &transfers,
                        ),
                    };
                }
                Next::Cancel => {
                    return self.finish(id, DeploymentStatus::Cancelled, Some("cancelled by the operator"), &transfers);
                }
                Next::Finish(outcome) => {
                    return match (work, &plan.switch, outcome) {
                        // A rollback within its failure budget did what it could: every host it
                        // reached is back.
                        (Work::Rollback { .. }, _, _) | (Work::Deploy { .. }, None, Outcome::Succeeded) => {
                            self.finish(id, DeploymentStatus::Succeeded, None, &transfers)
                        }
                        (Work::Deploy { .. }, None, Outcome::Failed) => {
                            self.finish(id, DeploymentStatus::Failed, None, &transfers)
                        }
                        (Work::Deploy { .. }, Some(sw), Outcome::Succeeded) => {
                            self.switch_over(id, plan, sw, &d.version, &transfers).await
                        }
                        // Never switch to a group with a failed host.
                        (Work::Deploy { .. }, Some(sw), Outcome::Failed) => {
                            let reason = format!("group {} is not healthy on every host: not switching", sw.to);
                            self.halt(id, plan, &transfers, Some(&reason)).await
                        }
                    };
                }
            }
        }
    }

    /// Stages the release on `hosts` in parallel (at most `parallelism` at once). Staging changes
    /// nothing a host runs.
    async fn stage_all(
        &self,
        id: &str,
        hosts: &[&Host],
        release: &Release,
        transfers: &HashMap<String, Arc<Transfer>>,
    ) -> Result<(), Error> {
        let limit = tokio::sync::Semaphore::new(self.config.parallelism.max(1));
        let staging = hosts.iter().map(|&host| {
            let (transfer, limit) = (transfers[&host.name].clone(), &limit);
            async move {
                let _permit = limit.acquire().await;
                self.host_state(id, &host.name, HostState::Staging, &HostUpdate::default())?;
                let steps = std::sync::atomic::AtomicU64::new(0);
                let note = |note: crate::fleet::StageNote| {
                    steps.fetch_add(1, Ordering::Relaxed);
                    self.emit(&Event::Stage { host: &host.name, note: &note });
                };
                // Staging may take long on a slow link: only time without a step or a byte counts.
                let moved = || steps.load(Ordering::Relaxed) + transfer.bytes.load(Ordering::Relaxed);
                let work = self.fleet.stage(host, release, &transfer, &note);
                let staged = self.watched(host, HostState::Staging, work, &moved).await;
                let bytes = transfer.bytes.load(Ordering::Relaxed);
                match staged {
                    Ok(s) => {
                        // With secrets, the host is asked even on its release: only it can tell
                        // whether a value changed (and then restarts the units).
                        let unchanged =
                            s.current == s.release_id && !s.unfinished && release.artifact.secrets.is_empty();
                        let state = if unchanged { HostState::Unchanged } else { HostState::Staged };
                        let previous = (!s.current.is_empty()).then_some(s.current.as_str());
                        let update = HostUpdate { previous_release: previous, bytes, ..Default::default() };
                        self.host_state(id, &host.name, state, &update)
                    }
                    Err(e) => self.host_failed(id, host, &e, bytes),
                }
            }
        });
        for r in futures_util::future::join_all(staging).await {
            r?;
        }
        Ok(())
    }

    pub(super) fn host_failed(&self, id: &str, host: &Host, e: &HostError, bytes: u64) -> Result<(), Error> {
        let state = match e.kind {
            ErrorKind::RolledBack => HostState::RolledBack,
            _ if e.is_unreachable() => HostState::Unreachable,
            _ => HostState::Failed,
        };
        self.emit(&Event::HostFailed { host: &host.name, state, message: &e.message });
        let error = e.to_string();
        self.host_state(id, &host.name, state, &HostUpdate { bytes, error: Some(&error), ..Default::default() })
    }

    /// Runs a coordinator hook of the environment for `host`.
    async fn host_hook(&self, name: &str, cmd: &str, host: &Host, version: &str) -> Result<(), String> {
        let vars = [
            ("FERRY_HOST", host.name.clone()),
            ("FERRY_ADDR", host.endpoint()),
            ("FERRY_VERSION", version.to_string()),
            ("FERRY_ENV", self.env.to_string()),
        ];
        hooks::run(name, cmd, &vars).await
    }

    /// before_host hook → activate → after_host hook, recorded.
    async fn activate_one(&self, id: &str, activation: &Activation, host: &Host) -> Result<(), Error> {
        let env = self.environment()?;
        if let Some(cmd) = &env.before_host
            && let Err(e) = self.host_hook("before_host", cmd, host, &activation.version).await
        {
            return self.host_failed(id, host, &HostError::new(host, ErrorKind::Failed, e), 0);
        }
        self.host_state(id, &host.name, HostState::Activating, &HostUpdate::default())?;
        match self.bounded(host, HostState::Activating, self.fleet.activate(host, activation)).await {
            Ok(swap) => {
                self.emit(&Event::Activated { host: &host.name, swap: &swap });
                let update = HostUpdate { activate_ms: Some(swap.agent_ms), ..Default::default() };
                // With secrets every host on the release is asked (staging cannot tell); one that
                // found nothing to do (healthy, its secrets the same) is unchanged. Without, an
                // agent's no-op is a resumed host this deployment had switched already.
                let same = !swap.changed && !activation.secrets.is_empty();
                let state = if same { HostState::Unchanged } else { HostState::Healthy };
                self.host_state(id, &host.name, state, &update)?;
            }
            Err(e) => return self.host_failed(id, host, &e, 0),
        }
        if let Some(cmd) = &env.after_host
            && let Err(e) = self.host_hook("after_host", cmd, host, &activation.version).await
        {
            return self.host_failed(id, host, &HostError::new(host, ErrorKind::Failed, e), 0);
        }
        Ok(())
    }

    /// A rollback's host: switched to `target`, recorded with the release it left and the one it
    /// went to.
    async fn revert_one(&self, id: &str, target: &Target, host: &Host) -> Result<(), Error> {
        self.host_state(id, &host.name, HostState::Activating, &HostUpdate::default())?;
        match self.bounded(host, HostState::Activating, self.fleet.rollback(host, target, id)).await {
            Ok(swap) => {
                self.emit(&Event::Reverted { host: &host.name, swap: &swap });
                let state = if swap.changed { HostState::Healthy } else { HostState::Unchanged };
                let update = HostUpdate {
                    previous_release: swap.from.as_deref(),
                    release: Some(&swap.to),
                    ..Default::default()
                };
                self.host_state(id, &host.name, state, &update)
            }
            Err(e) => self.host_failed(id, host, &e, 0),
        }
    }

    /// Too many failures: stop; with auto_rollback, send every host this deployment updated back
    /// to its previous release.
    pub(super) async fn halt(
        &self,
        id: &str,
        plan: &Stored,
        transfers: &HashMap<String, Arc<Transfer>>,
        reason: Option<&str>,
    ) -> Result<super::DeployReport, Error> {
        let rows = self.registry.hosts(id)?;
        let mut reason = reason.map_or_else(
            || format!("{} host(s) failed, more than max_failures = {}", failures(&rows), plan.max_failures),
            str::to_string,
        );
        self.emit(&Event::Halting { reason: &reason });
        self.notify(Kind::Halted, id, None, Some(&reason));
        // Unwinding a blue-green deployment whose switch went through: the old group goes back first.
        if let Some(sw) = &plan.switch
            && self.registry.live_group(self.env)?.is_some_and(|(group, by)| group == sw.to && by == id)
        {
            let version = self.registry.deployment(id)?.map(|d| d.version).unwrap_or_default();
            reason = self.switch_back(id, sw, &version, &reason).await?;
        }
        if !plan.auto_rollback {
            return self.finish(id, DeploymentStatus::Failed, Some(&reason), transfers);
        }
        let inventory = self.inventory_of(id, &rows)?;
        // Every host whose swap began may run the new release: healthy ones, ones caught mid-swap
        // or mid-rollback, and ones that failed or went silent after it (an after_host hook, a
        // lost connection). Hosts that failed before (staging, before_host) were never changed.
        let activated = self.registry.activated_hosts(id)?;
        let updated: Vec<&HostRow> = rows
            .iter()
            .filter(|h| match h.state {
                HostState::Healthy | HostState::Activating | HostState::RollingBack => true,
                HostState::Failed | HostState::Unreachable => activated.contains(&h.host),
                HostState::Pending
                | HostState::Staging
                | HostState::Staged
                | HostState::Unchanged
                | HostState::RolledBack
                | HostState::Skipped => false,
            })
            .collect();
        let mut all_back = true;
        for h in updated {
            let host = &inventory[&h.host];
            let Some(previous) = h.previous_release.as_deref() else {
                self.emit(&Event::NoPrevious { host: &h.host });
                all_back = false;
                continue;
            };
            self.host_state(id, &h.host, HostState::RollingBack, &HostUpdate::default())?;
            let target = Target::Release(previous.to_string());
            match self.bounded(host, HostState::RollingBack, self.fleet.rollback(host, &target, id)).await {
                Ok(swap) => {
                    self.emit(&Event::RolledBack { host: &h.host, swap: &swap });
                    let update = HostUpdate { error: Some("rolled back: the rollout halted"), ..Default::default() };
                    self.host_state(id, &h.host, HostState::RolledBack, &update)?;
                }
                Err(e) => {
                    all_back = false;
                    self.host_failed(id, host, &e, 0)?;
                }
            }
        }
        let status = if all_back { DeploymentStatus::RolledBack } else { DeploymentStatus::Failed };
        self.finish(id, status, Some(&reason), transfers)
    }
}
