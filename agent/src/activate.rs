//! Activation on this host (shared/DESIGN.md §4): swap → restart the app's units → health probes →
//! prune; streamed as step events.
//!
//! Any failure after the swap puts the previous release back (swap, restart, probe) and ends
//! `ROLLED_BACK` with the cause: the failed step and the unit's state and journal lines, or the
//! probe's last answer. If the previous release does not come back healthy either, the end is
//! `FAILED`, said loudly: the host needs a human. Activating the release that is already current,
//! with its units running and its probes passing, does nothing (`UNCHANGED`).
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_proto::v1::{self, Outcome, Step, StepState};
use tokio::sync::mpsc;
use tonic::Status;

use crate::config::AgentConfig;
use crate::store::Swap;
use crate::systemd::{Systemd, UnitError};
use crate::{failpoint, hooks, probe};

/// What to do.
pub struct Plan {
    pub app: String,
    /// `None`: the release before the current one (rollback).
    pub target: Option<String>,
    pub deployment_id: String,
    pub units: Vec<String>,
    pub probes: Vec<v1::HealthProbe>,
    /// Prune to this many releases after a success (activations only).
    pub keep: Option<usize>,
    pub rollback_on_failure: bool,
    pub unit_timeout: Duration,
    /// "restart", "reload" or "reload-or-restart".
    pub unit_action: String,
    /// Lifecycle hooks of the release being activated (activations only).
    pub hooks: Option<v1::Hooks>,
    pub version: String,
    /// The release's secrets, from the coordinator (activations; empty for a rollback, which
    /// uses the values the release kept). Never logged.
    pub secrets: Vec<v1::Var>,
}

type Tx = mpsc::Sender<Result<v1::StepEvent, Status>>;

struct Emitter {
    tx: Tx,
    started: Instant,
    /// The final event or refusal sent, for the caller's audit record and metrics.
    ended: std::sync::Mutex<Option<Result<v1::Final, Status>>>,
    probe_failures: std::sync::atomic::AtomicU32,
}

/// How a plan ended.
#[derive(Debug)]
pub struct Ended {
    /// The final event, or the refusal sent before anything changed.
    pub result: Result<v1::Final, Status>,
    /// Health probes that failed along the way.
    pub probe_failures: u32,
}

impl Emitter {
    /// Refuses the plan before anything changed.
    async fn refuse(&self, status: Status) {
        *self.ended.lock().unwrap_or_else(|p| p.into_inner()) = Some(Err(status.clone()));
        let _ = self.tx.send(Err(status)).await;
    }

    async fn send(&self, step: Step, state: StepState, message: impl Into<String>, step_started: Option<Instant>) {
        let ev = v1::StepEvent {
            step: step as i32,
            state: state as i32,
            message: message.into(),
            elapsed_ms: self.started.elapsed().as_millis() as u64,
            step_ms: step_started.map_or(0, |s| s.elapsed().as_millis() as u64),
            ..Default::default()
        };
        let _ = self.tx.send(Ok(ev)).await;
    }

    async fn send_output(
        &self,
        step: Step,
        state: StepState,
        message: String,
        step_started: Option<Instant>,
        output: String,
    ) {
        let ev = v1::StepEvent {
            step: step as i32,
            state: state as i32,
            message,
            elapsed_ms: self.started.elapsed().as_millis() as u64,
            step_ms: step_started.map_or(0, |s| s.elapsed().as_millis() as u64),
            output,
            ..Default::default()
        };
        let _ = self.tx.send(Ok(ev)).await;
    }

    async fn finish(&self, fin: v1::Final) {
        *self.ended.lock().unwrap_or_else(|p| p.into_inner()) = Some(Ok(fin.clone()));
        let ev = v1::StepEvent {
            elapsed_ms: self.started.elapsed().as_millis() as u64,
            message: fin.cause.clone(),
            r#final: Some(fin),
            ..Default::default()
        };
        let _ = self.tx.send(Ok(ev)).await;
    }
}

/// A step that failed: what to tell the coordinator.
struct Failure {
    cause: String,
    units: Vec<v1::UnitState>,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, String> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(format!("worker failed: {e}")),
    }
}

/// Runs the plan, sending step events and a final event into `tx`. Errors before anything
/// changed on the host are sent as a status instead. Returns how it ended.
pub async fn run(config: Arc<AgentConfig>, plan: Plan, tx: Tx) -> Ended {
    let em = Emitter {
        tx,
        started: Instant::now(),
        ended: std::sync::Mutex::new(None),
        probe_failures: std::sync::atomic::AtomicU32::new(0),
    };
    run_plan(config, plan, &em).await;
    let result = em.ended.lock().unwrap_or_else(|p| p.into_inner()).take();
    Ended {
        result: result.unwrap_or_else(|| Err(Status::internal("the activation ended without a result"))),
        probe_failures: em.probe_failures.load(std::sync::atomic::Ordering::Relaxed),
    }
}

async fn run_plan(config: Arc<AgentConfig>, plan: Plan, em: &Emitter) {
    let Some(store) = config.store(&plan.app) else {
        em.refuse(Status::not_found(format!("app {:?} is not declared", plan.app))).await;
        return;
    };
    // Exec probes run in the release that is current at the time.
    let root = config.app_dir(&plan.app).join("current");
    let systemd = if plan.units.is_empty() {
        None
    } else {
        match Systemd::connect().await {
            Ok(s) => Some(s),
            Err(e) => {
                em.refuse(Status::unavailable(format!("{e}; nothing was changed"))).await;
                return;
            }
        }
    };

    // Resolve what to switch to.
    let current = store.current().ok().flatten();
    let target = match &plan.target {
        Some(t) => t.clone(),
        None => match store.previous() {
            Ok(Some(p)) => p,
            Ok(None) => {
                em.refuse(Status::failed_precondition("there is no previous release on this host to roll back to"))
                    .await;
                return;
            }
            Err(e) => {
                em.refuse(Status::internal(e.to_string())).await;
                return;
            }
        },
    };

    // The release's app user runs its hooks and exec probes; it must exist before anything changes.
    let (owner, secret_names) = match release_facts(&store, &target) {
        Ok(facts) => facts,
        Err(e) => {
            em.refuse(Status::failed_precondition(format!("{e}; nothing was changed"))).await;
            return;
        }
    };

    // The release's secrets are in place before anything runs; a changed value is a change.
    let secrets_changed = match place_secrets(&config, &plan, &secret_names, &target, owner.as_ref()) {
        Ok(changed) => changed,
        Err(e) => {
            em.refuse(Status::failed_precondition(format!("secrets of {target}: {e}; nothing was changed"))).await;
            return;
        }
    };

    // Idempotence: already current, its activation ran to its end, running and healthy →
    // nothing to do. (An activation cut short after the swap left the units on the old code:
    // that one is run again.)
    if current.as_deref() == Some(target.as_str())
        && store.activated().as_deref() == Some(target.as_str())
        && !secrets_changed
    {
        let units_up = match &systemd {
            Some(sd) => {
                let mut all = true;
                for u in &plan.units {
                    all &= sd.state(u).await.active_state == "active";
                }
                all
            }
            None => true,
        };
        if units_up && health(em, &plan.probes, &root, owner.as_ref(), Step::Health).await.is_ok() {
            em.send(Step::Swap, StepState::Skipped, format!("{target} is already current and healthy"), None).await;
            em.finish(v1::Final {
                outcome: Outcome::Unchanged as i32,
                release_id: target,
                previous_release_id: store.previous().ok().flatten().unwrap_or_default(),
                ..Default::default()
            })
            .await;
            return;
        }
    }

    // Hooks before anything changes: a failure here leaves the host as it was.
    let release_dir = config.app_dir(&plan.app).join("releases").join(&target);
    let previous_dir = current.as_ref().map(|c| config.app_dir(&plan.app).join("releases").join(c));
    let hook_env = hooks::HookEnv {
        app: &plan.app,
        version: &plan.version,
        release_dir: &release_dir,
        previous_release_dir: previous_dir.as_deref(),
        deployment_id: &plan.deployment_id,
        owner: owner.as_ref(),
        as_root: plan.hooks.as_ref().map_or(&[], |h| h.as_root.as_slice()),
    };
    let hook_plan = plan.hooks.clone().unwrap_or_default();
    let hook_timeout = Duration::from_millis(if hook_plan.timeout_ms == 0 { 60_000 } else { hook_plan.timeout_ms });
    for (step, name, rel) in [
        (Step::BeforeBlockTraffic, "before_block_traffic", &hook_plan.before_block_traffic),
        (Step::BeforeInstall, "before_install", &hook_plan.before_install),
    ] {
        if let Err(f) = hook(em, step, name, rel, &hook_env, hook_timeout).await {
            em.finish(v1::Final {
                outcome: Outcome::Failed as i32,
                release_id: current.clone().unwrap_or_default(),
                cause: format!("{} (nothing was changed: {target} was not switched in)", f.cause),
                ..Default::default()
            })
            .await;
            return;
        }
    }

    // Swap.
    let t = Instant::now();
    em.send(Step::Swap, StepState::Started, format!("switching to {target}"), None).await;
    let (t2, dep) = (target.clone(), plan.deployment_id.clone());
    let store2 = config.store(&plan.app);
    let action_is_rollback = plan.target.is_none();
    let swap: Swap = match blocking(move || {
        let s = store2.ok_or_else(|| crate::store::StoreError::NoSuchRelease(t2.clone()))?;
        if action_is_rollback { s.rollback(Some(&t2), &dep) } else { s.activate(&t2, &dep) }
    })
    .await
    {
        Ok(s) => s,
        Err(e) => {
            em.send(Step::Swap, StepState::Failed, e.clone(), Some(t)).await;
            // Say what is true: the store puts `current` back when it can, and says when it could not.
            let now = config.store(&plan.app).and_then(|s| s.current().ok().flatten());
            let cause = if now == current { format!("swap: {e} (nothing was changed)") } else { format!("swap: {e}") };
            em.finish(v1::Final {
                outcome: Outcome::Failed as i32,
                release_id: now.unwrap_or_default(),
                cause,
                ..Default::default()
            })
            .await;
            return;
        }
    };
    let swap_us = t.elapsed().as_micros();
    tracing::info!(app = plan.app, from = ?swap.from, to = swap.to, swap_us, "swapped current");
    em.send(
        Step::Swap,
        StepState::Succeeded,
        format!("current: {} -> {} in {swap_us} µs", swap.from.as_deref().unwrap_or("(none)"), swap.to),
        Some(t),
    )
    .await;
    failpoint::hit("after-swap");

    // after_install, restart, validate, probe, after_allow_traffic: any failure rolls back.
    let result = async {
        hook(em, Step::AfterInstall, "after_install", &hook_plan.after_install, &hook_env, hook_timeout).await?;
        restart(em, systemd.as_ref(), &plan.units, &plan.unit_action, plan.unit_timeout, Step::RestartUnits).await?;
        failpoint::hit("after-restart");
        let checks = async {
            hook(em, Step::Validate, "validate", &hook_plan.validate, &hook_env, hook_timeout).await?;
            health(em, &plan.probes, &root, owner.as_ref(), Step::Health).await
        };
        let nothing_to_check = hook_plan.validate.is_empty() && plan.probes.is_empty();
        watched(em, systemd.as_ref(), &plan.units, nothing_to_check, checks, Step::Health).await?;
        hook(
            em,
            Step::AfterAllowTraffic,
            "after_allow_traffic",
            &hook_plan.after_allow_traffic,
            &hook_env,
            hook_timeout,
        )
        .await
    }
    .await;
    match result {
        Ok(()) => {
            mark_activated(&config, &plan.app, &swap.to).await;
            if secrets_changed {
                crate::secrets::forget_previous(&config.secrets_dir(&plan.app).join(&swap.to));
            }
            let mut pruned = Vec::new();
            if let Some(keep) = plan.keep {
                let t = Instant::now();
                let store3 = config.store(&plan.app);
                match blocking(move || store3.map_or(Ok(Vec::new()), |s| s.prune(keep))).await {
                    Ok(p) => pruned = p,
                    Err(e) => tracing::warn!(app = plan.app, "pruning old releases failed: {e}"),
                }
                for id in &pruned {
                    crate::secrets::remove(&config.secrets_dir(&plan.app).join(id));
                }
                if !pruned.is_empty() {
                    em.send(Step::Prune, StepState::Succeeded, format!("removed {}", pruned.join(", ")), Some(t)).await;
                }
            }
            em.finish(v1::Final {
                outcome: Outcome::Healthy as i32,
                release_id: swap.to,
                previous_release_id: swap.from.unwrap_or_default(),
                ..Default::default()
            })
            .await;
        }
        Err(failure) => {
            let Some(previous) = swap.from.clone().filter(|_| plan.rollback_on_failure) else {
                em.finish(v1::Final {
                    outcome: Outcome::Failed as i32,
                    release_id: swap.to,
                    previous_release_id: swap.from.unwrap_or_default(),
                    cause: format!(
                        "{} (no previous release to go back to: the host runs the failed release)",
                        failure.cause
                    ),
                    units: failure.units,
                })
                .await;
                return;
            };
            // A release activated again for new secret values goes back to the values it had.
            if previous == swap.to && secrets_changed {
                let dir = config.secrets_dir(&plan.app).join(&previous);
                if let Err(e) = crate::secrets::restore(&dir) {
                    tracing::error!(app = plan.app, "cannot put the previous secret values back: {e}");
                }
            }
            roll_back(em, &config, &plan, systemd.as_ref(), &root, &swap, &previous, failure).await;
        }
    }
}

/// What release `id` says of itself, read from its manifest once: its app user and the secrets
/// it reads. Nothing for a release not kept here (the swap reports it).
fn release_facts(
    store: &crate::store::AppStore,
    id: &str,
) -> Result<(Option<crate::owner::Owner>, Vec<String>), String> {
    if !store.has_release(id) {
        return Ok((None, Vec::new()));
    }
    let m = store.manifest(id).map_err(|e| e.to_string())?;
    Ok((crate::owner::Owner::of(&m)?, m.secrets))
}

/// Writes the secrets the coordinator sent for `target`, or (when it sent none: a rollback)
/// checks the release still has its own. Whether a value changed.
fn place_secrets(
    config: &AgentConfig,
    plan: &Plan,
    names: &[String],
    target: &str,
    owner: Option<&crate::owner::Owner>,
) -> Result<bool, String> {
    if names.is_empty() && plan.secrets.is_empty() {
        return Ok(false);
    }
    let dir = config.secrets_dir(&plan.app).join(target);
    if plan.secrets.is_empty() {
        crate::secrets::present(&dir, names).map(|()| false)
    } else {
        crate::secrets::write(&dir, names, &plan.secrets, owner)
    }
}

#[allow(clippy::too_many_arguments)]
async fn roll_back(
    em: &Emitter,
    config: &Arc<AgentConfig>,
    plan: &Plan,
    systemd: Option<&Systemd>,
    root: &std::path::Path,
    swap: &Swap,
    previous: &str,
    failure: Failure,
) {
    let t = Instant::now();
    em.send(Step::RollbackSwap, StepState::Started, format!("going back to {previous}"), None).await;
    let (p, dep, store) = (previous.to_string(), plan.deployment_id.clone(), config.store(&plan.app));
    let back = blocking(move || {
        let s = store.ok_or_else(|| crate::store::StoreError::NoSuchRelease(p.clone()))?;
        s.rollback(Some(&p), &dep)
    })
    .await;
    if let Err(e) = back {
        em.send(Step::RollbackSwap, StepState::Failed, e.clone(), Some(t)).await;
        em.finish(v1::Final {
            outcome: Outcome::Failed as i32,
            release_id: swap.to.clone(),
            previous_release_id: previous.to_string(),
            cause: format!("{}; AND swapping back to {previous} failed: {e}", failure.cause),
            units: failure.units,
        })
        .await;
        return;
    }
    em.send(Step::RollbackSwap, StepState::Succeeded, format!("current: {} -> {previous}", swap.to), Some(t)).await;
    // Going back always restarts: a reload could leave the failed release's code running.
    let again = match restart(em, systemd, &plan.units, "restart", plan.unit_timeout, Step::RollbackRestart).await {
        // The probes run in the release gone back to, as its own user.
        Ok(()) => {
            let owner = config
                .store(&plan.app)
                .map_or(Ok(None), |s| release_facts(&s, previous).map(|f| f.0))
                .unwrap_or_else(|e| {
                    tracing::warn!(app = plan.app, "{e}; the probes of {previous} run as root");
                    None
                });
            let checks = health(em, &plan.probes, root, owner.as_ref(), Step::RollbackHealth);
            watched(em, systemd, &plan.units, plan.probes.is_empty(), checks, Step::RollbackHealth).await
        }
        Err(f) => Err(f),
    };
    match again {
        Ok(()) => {
            mark_activated(config, &plan.app, previous).await;
            em.finish(v1::Final {
                outcome: Outcome::RolledBack as i32,
                release_id: previous.to_string(),
                previous_release_id: swap.to.clone(),
                cause: failure.cause,
                units: failure.units,
            })
            .await;
        }
        Err(second) => {
            tracing::error!(app = plan.app, "the previous release {previous} is unhealthy too: {}", second.cause);
            let mut units = failure.units;
            units.extend(second.units);
            em.finish(v1::Final {
                outcome: Outcome::Failed as i32,
                release_id: previous.to_string(),
                previous_release_id: swap.to.clone(),
                cause: format!(
                    "{}; rolled back to {previous}, but it is UNHEALTHY TOO: {} — this host needs attention",
                    failure.cause, second.cause
                ),
                units,
            })
            .await;
        }
    }
}

/// Records a finished activation; a failure is logged (the next deployment of the same release
/// then restarts the units once more, which is safe).
async fn mark_activated(config: &Arc<AgentConfig>, app: &str, release: &str) {
    let (store, id) = (config.store(app), release.to_string());
    if let Err(e) = blocking(move || store.map_or(Ok(()), |s| s.mark_activated(&id))).await {
        tracing::warn!(app, release, "{e}");
    }
}

async fn restart(
    em: &Emitter,
    systemd: Option<&Systemd>,
    units: &[String],
    action: &str,
    timeout: Duration,
    step: Step,
) -> Result<(), Failure> {
    let Some(sd) = systemd else { return Ok(()) };
    for unit in units {
        let t = Instant::now();
        em.send(step, StepState::Started, format!("{action} {unit}"), None).await;
        match sd.apply(action, unit, timeout).await {
            Ok(()) => em.send(step, StepState::Succeeded, format!("{unit} is active"), Some(t)).await,
            Err(e) => return Err(unit_failure(em, step, &e, t).await),
        }
    }
    Ok(())
}

/// A unit's failure at `step`, reported, with its state and last journal lines.
async fn unit_failure(em: &Emitter, step: Step, e: &UnitError, t: Instant) -> Failure {
    em.send(step, StepState::Failed, e.to_string(), Some(t)).await;
    let units = match e {
        UnitError::Bus(_) => Vec::new(),
        other => other.state().cloned().into_iter().collect(),
    };
    let journal = units.first().map(|s| s.journal.join("\n")).unwrap_or_default();
    let state = units
        .first()
        .map(|s| {
            format!(
                " [ActiveState={} SubState={} Result={} ExecMainStatus={}]",
                s.active_state, s.sub_state, s.result, s.exec_main_status
            )
        })
        .unwrap_or_default();
    Failure {
        cause: format!(
            "{}: {e}{state}{}",
            step_name(step),
            if journal.is_empty() { String::new() } else { format!("\nlast journal lines:\n{journal}") }
        ),
        units,
    }
}

/// Runs `checks` (the validate hook, the health probes) while watching the units just restarted:
/// a unit that stops or is restarted by systemd meanwhile fails them at once, and every unit must
/// still be up when they pass. With `nothing_to_check` the units are watched for
/// [`crate::systemd::SETTLE`] instead: staying up is then the only proof of health.
async fn watched(
    em: &Emitter,
    systemd: Option<&Systemd>,
    units: &[String],
    nothing_to_check: bool,
    checks: impl Future<Output = Result<(), Failure>>,
    step: Step,
) -> Result<(), Failure> {
    let Some(sd) = systemd.filter(|_| !units.is_empty()) else { return checks.await };
    let t = Instant::now();
    let mut watch = sd.watch(units).await;
    let checks = async {
        checks.await?;
        if nothing_to_check {
            tokio::time::sleep(crate::systemd::SETTLE).await;
        }
        Ok(())
    };
    let passed = tokio::select! {
        passed = checks => passed,
        e = watch.failed() => return Err(unit_failure(em, step, &e, t).await),
    };
    passed?;
    match watch.finish().await {
        Ok(()) => Ok(()),
        Err(e) => Err(unit_failure(em, step, &e, t).await),
    }
}

async fn health(
    em: &Emitter,
    probes: &[v1::HealthProbe],
    cwd: &std::path::Path,
    owner: Option<&crate::owner::Owner>,
    step: Step,
) -> Result<(), Failure> {
    for p in probes {
        let t = Instant::now();
        em.send(step, StepState::Started, format!("probing {}", p.name), None).await;
        match probe::run(p, cwd, owner).await {
            Ok(()) => em.send(step, StepState::Succeeded, format!("{} is healthy", p.name), Some(t)).await,
            Err(e) => {
                em.probe_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                em.send(step, StepState::Failed, e.to_string(), Some(t)).await;
                return Err(Failure { cause: format!("{}: {e}", step_name(step)), units: Vec::new() });
            }
        }
    }
    Ok(())
}

/// Runs one hook if the release configures it (an empty path means none).
async fn hook(
    em: &Emitter,
    step: Step,
    name: &str,
    rel: &str,
    env: &hooks::HookEnv<'_>,
    timeout: Duration,
) -> Result<(), Failure> {
    if rel.is_empty() {
        return Ok(());
    }
    let t = Instant::now();
    em.send(step, StepState::Started, format!("running {name} hook {rel}"), None).await;
    match hooks::run(name, rel, env, timeout).await {
        Ok(run) => {
            em.send_output(step, StepState::Succeeded, format!("{name} hook passed"), Some(t), run.output).await;
            Ok(())
        }
        Err(e) => {
            em.send_output(step, StepState::Failed, e.to_string(), Some(t), e.output.clone()).await;
            Err(Failure { cause: e.to_string(), units: Vec::new() })
        }
    }
}

fn step_name(step: Step) -> &'static str {
    match step {
        Step::RestartUnits => "units",
        Step::Health => "health",
        Step::RollbackRestart => "units after rollback",
        Step::RollbackHealth => "health after rollback",
        _ => "step",
    }
}
