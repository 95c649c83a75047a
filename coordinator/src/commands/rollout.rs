//! The rollout engine: `ferry deploy`, `ferry resume` / `ferry promote` and `ferry rollback` over an
//! environment, following its strategy, recorded in the registry.
//!
//! A deployment first stages the release on every host in parallel (bounded by `parallelism`;
//! staging changes nothing a host runs), then activates batch by batch as the plan says, pausing
//! where a canary pauses. Every host transition is committed to the registry before it is acted
//! on (`staging` before the transfer, `activating` before the swap), so a coordinator killed at
//! any point leaves a record that `ferry resume` continues from: hosts already healthy are left
//! alone, a host caught `activating` is activated again (the agent treats a repeated activation of
//! its current release as a no-op). More than `max_failures` failed hosts halt the rollout; with
//! `auto_rollback` every host it updated goes back to its previous release. Ctrl-C lets the batch
//! in flight finish (each host ends healthy or rolled back by its agent) and records `cancelled`.
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::deploy::{
    DeployReport, DeploymentStatus, HostOutcome, HostResult, Progress, Send, Target, Transfer, activate_host,
    current_release, new_deployment_id, rollback_host, stage_host,
};
use crate::artifact::Artifact;
use crate::cache::Cache;
use crate::client::{ErrorKind, HostError};
use crate::config::{FleetConfig, Host};
use crate::plan::{self, Batch, Pause, Strategy};
use crate::registry::{DeploymentRow, HostRow, HostUpdate, NewDeployment, Registry};
use crate::state::{self, HostState, Next, Outcome};
use crate::tls::ClientTls;

/// Everything a rollout command works with.
pub struct Ctx<'a> {
    pub config: &'a FleetConfig,
    pub env: &'a str,
    pub tls: &'a ClientTls,
    pub registry: &'a Mutex<Registry>,
    pub progress: Progress<'a>,
    /// Set by Ctrl-C: finish the batch in flight, then stop.
    pub cancel: &'a AtomicBool,
    /// Break another deployment's lock on the environment (it is named in a warning).
    pub force_unlock: bool,
}

/// How a deployment was planned, as the registry keeps it (so `resume` follows the same plan).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    #[serde(flatten)]
    strategy: Strategy,
    max_failures: usize,
    auto_rollback: bool,
    total_bytes: u64,
    /// Stage every host before the first activation (`--no-prestage`: each batch just before it).
    #[serde(default = "yes")]
    prestage: bool,
    /// blue-green: the group this deployment makes live, and the one live before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    switch: Option<Switch>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Switch {
    to: String,
    from: Option<String>,
}

fn yes() -> bool {
    true
}

impl Ctx<'_> {
    fn reg<T>(&self, f: impl FnOnce(&mut Registry) -> Result<T, crate::registry::RegistryError>) -> anyhow::Result<T> {
        let mut reg = self.registry.lock().map_err(|_| anyhow::anyhow!("the registry is poisoned by a panic"))?;
        Ok(f(&mut reg)?)
    }

    fn host_state(&self, id: &str, host: &str, state: HostState, update: &HostUpdate<'_>) -> anyhow::Result<()> {
        self.reg(|r| r.set_host(id, host, state, update))?;
        self.progress.state(host, state);
        Ok(())
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// The hosts of the environment, by name.
    fn inventory(&self) -> anyhow::Result<HashMap<String, Host>> {
        Ok(self.config.hosts(self.env)?.into_iter().map(|h| (h.name.clone(), h)).collect())
    }

    fn take_lock(&self, id: &str) -> anyhow::Result<()> {
        if let Some(broken) = self.reg(|r| r.lock(self.env, id, self.force_unlock))? {
            self.progress.line(
                "ferry",
                &format!(
                    "WARNING: broke the lock of deployment {} ({} on {}, pid {}); if it is still running, two rollouts now touch {}",
                    broken.deployment_id, broken.owner, broken.hostname, broken.pid, self.env
                ),
            );
        }
        Ok(())
    }
}

/// `ferry deploy`: a new deployment of `artifact` as `version`.
pub async fn deploy(
    ctx: &Ctx<'_>,
    artifact: Arc<Artifact>,
    version: &str,
    cache: Option<&Cache>,
    prestage: bool,
) -> anyhow::Result<DeployReport> {
    ferry_proto::manifest::check_version(version).map_err(|e| anyhow::anyhow!("--version: {e}"))?;
    let env = ctx.config.environments.get(ctx.env).context("unknown environment")?;
    let strategy = env.strategy().map_err(|p| anyhow::anyhow!("environments.{}: {}", ctx.env, p[0]))?;
    let mut hosts = ctx.config.hosts(ctx.env)?;
    let mut switch = None;
    if strategy == Strategy::BlueGreen {
        // Only the idle group is deployed to; the live one serves until the switch.
        let live = ctx.reg(|r| r.live_group(ctx.env))?.map(|(group, _)| group);
        let (idle, members) = env.idle_group(live.as_deref()).context("blue-green needs two groups")?;
        hosts.retain(|h| members.contains(&h.name));
        ctx.progress.line(
            "ferry",
            &format!(
                "blue-green: {} is live; deploying to {idle} ({}), then switching",
                live.as_deref().unwrap_or("no group"),
                members.join(", ")
            ),
        );
        switch = Some(Switch { to: idle, from: live });
    }
    let batches = plan::plan(&strategy, hosts.len());
    let id = new_deployment_id();
    let release_id = artifact.release_id(version);
    if let Some(cache) = cache {
        cache.save_manifest(&release_id, &artifact.manifest);
    }
    ctx.take_lock(&id)?;
    let stored = Stored {
        strategy,
        max_failures: env.max_failures,
        auto_rollback: env.auto_rollback,
        total_bytes: artifact.total_bytes,
        prestage,
        switch,
    };
    let placed: Vec<(String, usize)> = batches
        .iter()
        .enumerate()
        .flat_map(|(b, batch)| batch.hosts.iter().map(move |&i| (i, b)))
        .map(|(i, b)| (hosts[i].name.clone(), b))
        .collect();
    let artifact_path = std::fs::canonicalize(&artifact.source).unwrap_or_else(|_| artifact.source.clone());
    ctx.reg(|r| {
        r.create(&NewDeployment {
            id: &id,
            kind: "deploy",
            environment: ctx.env,
            version,
            release_id: &release_id,
            artifact: &artifact_path.to_string_lossy(),
            manifest_hash: &hex::encode(artifact.manifest_hash),
            strategy: &serde_json::to_string(&stored).unwrap_or_default(),
            hosts: &placed,
        })
    })?;
    ctx.progress.started(&id);
    run(ctx, &id, artifact, cache).await
}

/// `ferry resume` / `ferry promote`: continues the environment's unfinished deployment (one whose
/// coordinator died, or one paused at a canary step) from what the registry says.
pub async fn resume(ctx: &Ctx<'_>, cache: Option<&Cache>, paused_only: bool) -> anyhow::Result<DeployReport> {
    let lock =
        ctx.reg(|r| r.lock_of(ctx.env))?.with_context(|| format!("no deployment of {} is in progress", ctx.env))?;
    let d = ctx.reg(|r| r.deployment(&lock.deployment_id))?.with_context(|| {
        format!("the lock names deployment {}, which the registry does not know", lock.deployment_id)
    })?;
    if d.kind != "deploy" || !matches!(d.status.as_str(), "pending" | "running" | "paused") {
        anyhow::bail!("deployment {} is {} ({}); there is nothing to continue", d.id, d.status, d.kind);
    }
    if paused_only && d.status != "paused" {
        anyhow::bail!(
            "deployment {} is {}, not paused at a canary step (use `ferry resume` if its coordinator died)",
            d.id,
            d.status
        );
    }
    if !paused_only && d.status != "paused" && !lock.stale() && !lock.mine() && !ctx.force_unlock {
        anyhow::bail!(
            "deployment {} is still running ({} on {}, pid {}); resume only what a dead coordinator left (or pass --force-unlock)",
            d.id,
            lock.owner,
            lock.hostname,
            lock.pid
        );
    }
    let path = std::path::PathBuf::from(&d.artifact);
    let scan_cache = cache.cloned();
    let artifact = tokio::task::spawn_blocking(move || Artifact::scan(&path, scan_cache.as_ref()))
        .await?
        .with_context(|| format!("deployment {} needs its artifact {} again", d.id, d.artifact))?;
    if hex::encode(artifact.manifest_hash) != d.manifest_hash {
        anyhow::bail!(
            "artifact {} changed since deployment {} started (its manifest no longer hashes to the release {}); deploy it as a new version instead",
            d.artifact,
            d.id,
            d.release_id
        );
    }
    // Taking over: the holder is gone (or paused, which leaves the lock with its deployment).
    let broken = ctx.reg(|r| {
        if lock.mine() || lock.stale() || d.status == "paused" {
            r.unlock(ctx.env, &d.id)?;
        }
        r.lock(ctx.env, &d.id, ctx.force_unlock)
    })?;
    if let Some(b) = broken {
        ctx.progress.line("ferry", &format!("WARNING: broke the lock of deployment {}", b.deployment_id));
    }
    ctx.progress.line("ferry", &format!("continuing deployment {} of {} to {}", d.id, d.version, d.environment));
    ctx.reg(|r| r.event(&d.id, None, "resumed", &format!("by pid {}", std::process::id())))?;
    ctx.progress.started(&d.id);
    run(ctx, &d.id, Arc::new(artifact), cache).await
}

/// Records the environment's paused deployment `cancelled` without touching a host or needing its
/// artifact: hosts it already activated keep the new release, the others are `skipped`.
pub fn cancel_paused(ctx: &Ctx<'_>) -> anyhow::Result<DeployReport> {
    let lock =
        ctx.reg(|r| r.lock_of(ctx.env))?.with_context(|| format!("no deployment of {} is in progress", ctx.env))?;
    let d = ctx.reg(|r| r.deployment(&lock.deployment_id))?.with_context(|| {
        format!("the lock names deployment {}, which the registry does not know", lock.deployment_id)
    })?;
    if d.status != "paused" {
        anyhow::bail!("deployment {} is {}, not paused at a canary step", d.id, d.status);
    }
    ctx.progress.started(&d.id);
    ctx.progress
        .line("ferry", &format!("cancelling deployment {} (paused); hosts not yet activated are skipped", d.id));
    finish(ctx, &d.id, "cancelled", Some("cancelled while paused"), &HashMap::new())
}

fn stored(strategy: &str) -> anyhow::Result<Stored> {
    serde_json::from_str(strategy).context("the registry's record of the rollout plan is unreadable")
}

fn failures(rows: &[HostRow]) -> usize {
    rows.iter().filter(|h| h.state.is_failure()).count()
}

/// The registry's host rows as the state machine sees them.
fn machine_view(rows: &[HostRow]) -> Vec<state::Host> {
    rows.iter().map(|h| state::Host { state: h.state, batch: usize::try_from(h.batch).unwrap_or(0) }).collect()
}

/// Drives a recorded deployment to its end (or to a pause) from whatever state it is in: asks the
/// state machine what is next, does it, records it, asks again.
#[tracing::instrument(name = "deployment", skip_all, fields(deployment_id = id, environment = ctx.env, app = %ctx.config.app.name, version = tracing::field::Empty))]
async fn run(ctx: &Ctx<'_>, id: &str, artifact: Arc<Artifact>, cache: Option<&Cache>) -> anyhow::Result<DeployReport> {
    let d = ctx.reg(|r| r.deployment(id))?.context("deployment vanished from the registry")?;
    tracing::Span::current().record("version", d.version.as_str());
    let plan = stored(&d.strategy)?;
    let inventory = ctx.inventory()?;
    let rows = ctx.reg(|r| r.hosts(id))?;
    let missing: Vec<&str> =
        rows.iter().filter(|h| !inventory.contains_key(&h.host)).map(|h| h.host.as_str()).collect();
    if !missing.is_empty() {
        anyhow::bail!("deployment {id} includes hosts no longer in environment {}: {}", ctx.env, missing.join(", "));
    }
    ctx.reg(|r| r.set_status(id, "running", None))?;
    let transfers: HashMap<String, Arc<Transfer>> =
        rows.iter().map(|h| (h.host.clone(), Arc::new(Transfer::default()))).collect();
    for h in &rows {
        // In plan order: the live view lists hosts as they come.
        ctx.progress.transfer(&h.host, &transfers[&h.host]);
    }
    let send = Send { artifact: &artifact, version: &d.version, deployment_id: id, cache };
    let view = machine_view(&rows);
    let total = view.iter().map(|h| h.batch + 1).max().unwrap_or(0);
    let rules = state::Rules {
        max_failures: plan.max_failures,
        prestage: plan.prestage,
        pauses: (0..total).map(|n| pause_after(&plan.strategy, n, total)).collect(),
    };
    let mut just_activated = None;
    loop {
        let rows = ctx.reg(|r| r.hosts(id))?;
        let next = state::next(&machine_view(&rows), &rules, just_activated, ctx.cancelled());
        match next {
            Next::Stage(ix) => {
                let hosts: Vec<&Host> = ix.iter().map(|&i| &inventory[&rows[i].host]).collect();
                stage_all(ctx, id, &hosts, &send, &transfers).await?;
            }
            Next::Activate { batch, hosts } => {
                let names: Vec<&str> = hosts.iter().map(|&i| rows[i].host.as_str()).collect();
                ctx.progress.line("ferry", &format!("batch {} of {total}: {}", batch + 1, names.join(", ")));
                let activations =
                    names.iter().map(|name| activate_one(ctx, id, &d.version, &d.release_id, &inventory[*name]));
                for r in futures_util::future::join_all(activations).await {
                    r?;
                }
                just_activated = Some(batch);
            }
            Next::Pause { after, pause: Pause::Manual } => {
                ctx.reg(|r| r.set_status(id, "paused", None))?;
                ctx.progress.line(
                    "ferry",
                    &format!(
                        "paused after batch {} of {total}: check it, then `ferry promote --env {}` to go on (or `ferry rollback --env {}`)",
                        after + 1,
                        ctx.env,
                        ctx.env
                    ),
                );
                return report(ctx, id, &transfers);
            }
            Next::Pause { pause: Pause::For(wait), .. } => {
                ctx.progress
                    .line("ferry", &format!("pausing {} before the next batch", humantime::format_duration(wait)));
                ctx.reg(|r| r.event(id, None, "pause", &humantime::format_duration(wait).to_string()))?;
                let until = tokio::time::Instant::now() + wait;
                while tokio::time::Instant::now() < until && !ctx.cancelled() {
                    tokio::time::sleep(Duration::from_millis(200).min(until - tokio::time::Instant::now())).await;
                }
                just_activated = None;
            }
            Next::Halt => return halt(ctx, id, &plan, &transfers, None).await,
            Next::Cancel => return finish(ctx, id, "cancelled", Some("cancelled by the operator"), &transfers),
            Next::Finish(outcome) => {
                return match (&plan.switch, outcome) {
                    (None, Outcome::Failed) => finish(ctx, id, "failed", None, &transfers),
                    (None, Outcome::Succeeded) => finish(ctx, id, "succeeded", None, &transfers),
                    (Some(sw), Outcome::Succeeded) => switch_over(ctx, id, &plan, sw, &d.version, &transfers).await,
                    // Never switch to a group with a failed host.
                    (Some(sw), Outcome::Failed) => {
                        let reason = format!("group {} is not healthy on every host: not switching", sw.to);
                        halt(ctx, id, &plan, &transfers, Some(&reason)).await
                    }
                };
            }
        }
    }
}

/// Stages the release on `hosts` in parallel (at most `parallelism` at once). Staging changes
/// nothing a host runs.
async fn stage_all(
    ctx: &Ctx<'_>,
    id: &str,
    hosts: &[&Host],
    send: &Send<'_>,
    transfers: &HashMap<String, Arc<Transfer>>,
) -> anyhow::Result<()> {
    let limit = Arc::new(tokio::sync::Semaphore::new(ctx.config.parallelism.max(1)));
    let staging = hosts.iter().map(|&host| {
        let (transfer, limit) = (transfers[&host.name].clone(), limit.clone());
        async move {
            let _permit = limit.acquire().await;
            ctx.host_state(id, &host.name, HostState::Staging, &HostUpdate::default())?;
            let staged = stage_host(ctx.config, host, ctx.tls, send, &transfer, ctx.progress).await;
            let bytes = transfer.bytes.load(Ordering::Relaxed);
            match staged {
                Ok(s) => {
                    let state = if s.current == s.release_id { HostState::Unchanged } else { HostState::Staged };
                    let previous = (!s.current.is_empty()).then_some(s.current.as_str());
                    ctx.host_state(
                        id,
                        &host.name,
                        state,
                        &HostUpdate { previous_release: previous, bytes, ..Default::default() },
                    )
                }
                Err(e) => host_failed(ctx, id, host, &e, bytes),
            }
        }
    });
    for r in futures_util::future::join_all(staging).await {
        r?;
    }
    Ok(())
}

/// The pause after batch `n` of `total` under `strategy`.
fn pause_after(strategy: &Strategy, n: usize, total: usize) -> Option<Pause> {
    if n + 1 >= total {
        return None;
    }
    match strategy {
        Strategy::Canary { pause, .. } => Some(*pause),
        _ => None,
    }
}

fn host_failed(ctx: &Ctx<'_>, id: &str, host: &Host, e: &HostError, bytes: u64) -> anyhow::Result<()> {
    let state = match e.kind {
        ErrorKind::RolledBack => HostState::RolledBack,
        _ if e.is_unreachable() => HostState::Unreachable,
        _ => HostState::Failed,
    };
    let label = if state == HostState::RolledBack { "ROLLED BACK" } else { "FAILED" };
    ctx.progress.line(&host.name, &format!("{label}: {}", e.message));
    ctx.host_state(id, &host.name, state, &HostUpdate { bytes, error: Some(&e.to_string()), ..Default::default() })
}

/// before_host hook → activate → after_host hook, recorded.
async fn activate_one(ctx: &Ctx<'_>, id: &str, version: &str, release_id: &str, host: &Host) -> anyhow::Result<()> {
    let env = &ctx.config.environments[ctx.env];
    if let Some(cmd) = &env.before_host
        && let Err(e) = run_hook(ctx, "before_host", cmd, host, version).await
    {
        return host_failed(ctx, id, host, &HostError::new(host, ErrorKind::Failed, e), 0);
    }
    ctx.host_state(id, &host.name, HostState::Activating, &HostUpdate::default())?;
    match activate_host(ctx.config, host, ctx.tls, release_id, version, id).await {
        Ok(swap) => {
            ctx.progress.line(&host.name, &format!("activated ({})", swap.summary()));
            let update = HostUpdate { activate_ms: Some(swap.agent_ms), ..Default::default() };
            ctx.host_state(id, &host.name, HostState::Healthy, &update)?;
        }
        Err(e) => return host_failed(ctx, id, host, &e, 0),
    }
    if let Some(cmd) = &env.after_host
        && let Err(e) = run_hook(ctx, "after_host", cmd, host, version).await
    {
        return host_failed(ctx, id, host, &HostError::new(host, ErrorKind::Failed, e), 0);
    }
    Ok(())
}

/// How long a coordinator hook may run.
const HOOK_TIMEOUT: Duration = Duration::from_secs(300);

/// Process groups of the coordinator hooks running now.
static RUNNING_HOOKS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Kills every coordinator hook running now, with everything it started (the second Ctrl-C).
pub fn kill_hooks() {
    if let Ok(running) = RUNNING_HOOKS.lock() {
        for &pgid in running.iter() {
            if let Ok(pgid) = i32::try_from(pgid) {
                let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

/// Runs a coordinator hook (`sh -c`) with the host in its environment.
async fn run_hook(ctx: &Ctx<'_>, name: &str, cmd: &str, host: &Host, version: &str) -> Result<(), String> {
    let vars = [
        ("FERRY_HOST", host.name.clone()),
        ("FERRY_ADDR", host.endpoint()),
        ("FERRY_VERSION", version.to_string()),
        ("FERRY_ENV", ctx.env.to_string()),
    ];
    run_command(name, cmd, &vars).await
}

/// Runs a command of fleet.toml (`sh -c`) where `ferry` runs, with `vars` in its environment and
/// [`HOOK_TIMEOUT`] to finish; a failure names the hook, the command and its stderr's tail.
///
/// Each hook runs in a process group of its own: a Ctrl-C at the terminal means "stop after the
/// hosts in flight", so a drain or undrain hook in flight runs to its end instead of dying
/// half-way (a second Ctrl-C kills them: [`kill_hooks`]).
async fn run_command(name: &str, cmd: &str, vars: &[(&str, String)]) -> Result<(), String> {
    let child = tokio::process::Command::new("/bin/sh")
        .args(["-c", cmd])
        .envs(vars.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("{name} hook {cmd:?} could not start: {e}"))?;
    let pid = child.id();
    if let (Some(pid), Ok(mut running)) = (pid, RUNNING_HOOKS.lock()) {
        running.push(pid);
    }
    let result = tokio::time::timeout(HOOK_TIMEOUT, child.wait_with_output()).await;
    if let (Some(pid), Ok(mut running)) = (pid, RUNNING_HOOKS.lock()) {
        running.retain(|&p| p != pid);
    }
    match result {
        Err(_) => Err(format!("{name} hook {cmd:?} did not finish within {HOOK_TIMEOUT:?}")),
        Ok(Err(e)) => Err(format!("{name} hook {cmd:?} could not start: {e}")),
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => {
            let tail = String::from_utf8_lossy(&out.stderr);
            let tail: String = tail.chars().rev().take(500).collect::<Vec<_>>().into_iter().rev().collect();
            Err(format!("{name} hook {cmd:?} failed ({}): {}", out.status, tail.trim()))
        }
    }
}

/// blue-green: runs `switch` to make `to` live, `from` being the group live until now, and with
/// `check`, `after_switch` after it. (A switch back to the group that served a moment ago is not
/// checked: there is nothing further to fall back to.)
async fn run_switch(ctx: &Ctx<'_>, to: &str, from: Option<&str>, version: &str, check: bool) -> Result<(), String> {
    let env = &ctx.config.environments[ctx.env];
    let members = env.group_hosts(to);
    let inventory = ctx.inventory().map_err(|e| e.to_string())?;
    let addrs: Vec<String> = members.iter().filter_map(|h| inventory.get(h)).map(Host::endpoint).collect();
    let vars = [
        ("FERRY_GROUP", to.to_string()),
        ("FERRY_PREVIOUS_GROUP", from.unwrap_or_default().to_string()),
        ("FERRY_HOSTS", members.join(" ")),
        ("FERRY_ADDRS", addrs.join(" ")),
        ("FERRY_VERSION", version.to_string()),
        ("FERRY_ENV", ctx.env.to_string()),
    ];
    let cmd = env.switch.as_deref().ok_or("blue-green environment without a switch command")?;
    run_command("switch", cmd, &vars).await?;
    if let Some(after) = env.after_switch.as_deref().filter(|_| check) {
        run_command("after_switch", after, &vars).await?;
    }
    Ok(())
}

/// blue-green: the idle group is healthy: make it live. If the switch or its check fails, the
/// group live before is switched back in and the deployment halts (rolling the group back with
/// auto_rollback).
async fn switch_over(
    ctx: &Ctx<'_>,
    id: &str,
    plan: &Stored,
    sw: &Switch,
    version: &str,
    transfers: &HashMap<String, Arc<Transfer>>,
) -> anyhow::Result<DeployReport> {
    ctx.reg(|r| r.event(id, None, "switching", &sw.to))?;
    ctx.progress.line("ferry", &format!("switching {} live", sw.to));
    match run_switch(ctx, &sw.to, sw.from.as_deref(), version, true).await {
        Ok(()) => {
            ctx.reg(|r| r.set_live_group(ctx.env, &sw.to, id))?;
            ctx.progress.line("ferry", &format!("{} is live", sw.to));
            finish(ctx, id, "succeeded", None, transfers)
        }
        Err(e) => {
            ctx.progress.line("ferry", &format!("switch to {} FAILED: {e}", sw.to));
            let reason = switch_back(ctx, id, sw, version, &e).await?;
            halt(ctx, id, plan, transfers, Some(&reason)).await
        }
    }
}

/// Switches `sw.from` back in after `why`; returns the whole story for the deployment's error.
async fn switch_back(ctx: &Ctx<'_>, id: &str, sw: &Switch, version: &str, why: &str) -> anyhow::Result<String> {
    let Some(from) = &sw.from else {
        return Ok(format!("{why}; no group was live before, so none was switched back"));
    };
    Ok(match run_switch(ctx, from, Some(&sw.to), version, false).await {
        Ok(()) => {
            ctx.reg(|r| r.set_live_group(ctx.env, from, id))?;
            ctx.progress.line("ferry", &format!("switched {from} back in"));
            format!("{why}; switched {from} back in")
        }
        Err(back) => {
            ctx.reg(|r| r.event(id, None, "switch_back_failed", &back))?;
            format!("{why}; switching {from} back in FAILED too ({back}): check the load balancer by hand")
        }
    })
}

/// Too many failures: stop; with auto_rollback, send every host this deployment updated back to
/// its previous release.
async fn halt(
    ctx: &Ctx<'_>,
    id: &str,
    plan: &Stored,
    transfers: &HashMap<String, Arc<Transfer>>,
    reason: Option<&str>,
) -> anyhow::Result<DeployReport> {
    let rows = ctx.reg(|r| r.hosts(id))?;
    let reason = reason.map_or_else(
        || format!("{} host(s) failed, more than max_failures = {}", failures(&rows), plan.max_failures),
        str::to_string,
    );
    ctx.progress.line("ferry", &format!("halting: {reason}"));
    // Unwinding a blue-green deployment whose switch went through: the old group goes back first.
    let mut reason = reason;
    if let Some(sw) = &plan.switch
        && ctx.reg(|r| r.live_group(ctx.env))?.is_some_and(|(group, by)| group == sw.to && by == id)
    {
        let version = ctx.reg(|r| r.deployment(id))?.map(|d| d.version).unwrap_or_default();
        reason = switch_back(ctx, id, sw, &version, &reason).await?;
    }
    if !plan.auto_rollback {
        return finish(ctx, id, "failed", Some(&reason), transfers);
    }
    let inventory = ctx.inventory()?;
    // Every host whose swap began may run the new release: healthy ones, ones caught mid-swap or
    // mid-rollback, and ones that failed or went silent after it (an after_host hook, a lost
    // connection). Hosts that failed before (staging, before_host) were never changed.
    let activated = ctx.reg(|r| r.activated_hosts(id))?;
    let updated: Vec<&HostRow> = rows
        .iter()
        .filter(|h| match h.state {
            HostState::Healthy | HostState::Activating | HostState::RollingBack => true,
            HostState::Failed | HostState::Unreachable => activated.contains(&h.host),
            _ => false,
        })
        .collect();
    let mut all_back = true;
    for h in updated {
        let host = &inventory[&h.host];
        let Some(previous) = h.previous_release.as_deref() else {
            ctx.progress.line(&h.host, "has no previous release to go back to; left on the new one");
            all_back = false;
            continue;
        };
        ctx.host_state(id, &h.host, HostState::RollingBack, &HostUpdate::default())?;
        match rollback_host(ctx.config, host, ctx.tls, &Target::Release(previous.to_string()), id).await {
            Ok(swap) => {
                ctx.progress.line(&h.host, &format!("rolled back ({})", swap.summary()));
                ctx.host_state(
                    id,
                    &h.host,
                    HostState::RolledBack,
                    &HostUpdate { error: Some("rolled back: the rollout halted"), ..Default::default() },
                )?;
            }
            Err(e) => {
                all_back = false;
                host_failed(ctx, id, host, &e, 0)?;
            }
        }
    }
    let status = if all_back { "rolled_back" } else { "failed" };
    finish(ctx, id, status, Some(&reason), transfers)
}

/// Ends a deployment: untouched hosts are skipped, the status recorded, the environment released.
fn finish(
    ctx: &Ctx<'_>,
    id: &str,
    status: &str,
    error: Option<&str>,
    transfers: &HashMap<String, Arc<Transfer>>,
) -> anyhow::Result<DeployReport> {
    for h in ctx.reg(|r| r.hosts(id))? {
        if matches!(h.state, HostState::Pending | HostState::Staging | HostState::Staged) {
            ctx.host_state(id, &h.host, HostState::Skipped, &HostUpdate::default())?;
        }
    }
    ctx.reg(|r| {
        r.set_status(id, status, error)?;
        r.unlock(ctx.env, id)
    })?;
    report(ctx, id, transfers)
}

fn report(ctx: &Ctx<'_>, id: &str, transfers: &HashMap<String, Arc<Transfer>>) -> anyhow::Result<DeployReport> {
    let reg = ctx.registry.lock().map_err(|_| anyhow::anyhow!("the registry is poisoned by a panic"))?;
    report_of(&reg, id, transfers)?.context("deployment vanished from the registry")
}

/// Deployment `id` as the registry records it (`transfers`: the live counters of a run in this
/// process, for the delta figures the registry does not keep); `None` if there is no such one.
fn report_of(
    reg: &Registry,
    id: &str,
    transfers: &HashMap<String, Arc<Transfer>>,
) -> anyhow::Result<Option<DeployReport>> {
    let Some(d) = reg.deployment(id)? else { return Ok(None) };
    let rows = reg.hosts(id)?;
    Ok(Some(report_from(d, rows, transfers)))
}

/// The report of a deployment from its registry rows.
pub fn report_from(d: DeploymentRow, rows: Vec<HostRow>, transfers: &HashMap<String, Arc<Transfer>>) -> DeployReport {
    let total_bytes = stored(&d.strategy).map(|s| s.total_bytes).unwrap_or(0);
    let hosts = rows
        .into_iter()
        .map(|h| {
            let t = transfers.get(&h.host);
            let status = match h.state {
                HostState::Healthy => HostOutcome::Succeeded,
                HostState::Unchanged => HostOutcome::Unchanged,
                HostState::RolledBack => HostOutcome::RolledBack,
                HostState::Failed | HostState::RollingBack => HostOutcome::Failed,
                HostState::Unreachable => HostOutcome::Unreachable,
                HostState::Pending
                | HostState::Staging
                | HostState::Staged
                | HostState::Activating
                | HostState::Skipped => HostOutcome::Skipped,
            };
            let on_new = matches!(status, HostOutcome::Succeeded | HostOutcome::Unchanged);
            HostResult {
                name: h.host,
                status,
                bytes_sent: u64::try_from(h.bytes_sent).unwrap_or(0),
                manifest_delta: t.is_some_and(|t| t.manifest_delta.load(Ordering::Relaxed)),
                delta_chunks: t.map_or(0, |t| t.delta_chunks.load(Ordering::Relaxed)),
                duration_ms: match (h.started_ms, h.finished_ms) {
                    (Some(s), Some(f)) => u64::try_from(f - s).unwrap_or(0),
                    _ => 0,
                },
                activate_ms: h.activate_ms.and_then(|ms| u64::try_from(ms).ok()).unwrap_or(0),
                release: if on_new && !d.release_id.is_empty() {
                    Some(d.release_id.clone())
                } else {
                    h.previous_release.clone()
                },
                previous_release: h.previous_release,
                error: h.error,
            }
        })
        .collect();
    let status = match d.status.as_str() {
        "succeeded" => DeploymentStatus::Succeeded,
        "rolled_back" => DeploymentStatus::RolledBack,
        "cancelled" => DeploymentStatus::Cancelled,
        "paused" => DeploymentStatus::Paused,
        _ => DeploymentStatus::Failed,
    };
    DeployReport {
        deployment_id: d.id,
        kind: d.kind,
        environment: d.environment,
        version: d.version,
        release_id: d.release_id,
        status,
        bytes_sent: u64::try_from(d.bytes_sent).unwrap_or(0),
        total_bytes,
        hosts,
    }
}

/// `ferry rollback`: immediate, no transfer. If a deployment of the environment is unfinished
/// (paused, or its coordinator died), unwinds it: the hosts it activated go back to the release
/// they ran before. Otherwise every host goes back to its previous release (or to `to_version`),
/// in batches the size of the rollout's first batch; hosts already there are not touched.
pub async fn rollback(ctx: &Ctx<'_>, to_version: Option<&str>) -> anyhow::Result<DeployReport> {
    let env = ctx.config.environments.get(ctx.env).context("unknown environment")?;
    let strategy = env.strategy().map_err(|p| anyhow::anyhow!("environments.{}: {}", ctx.env, p[0]))?;
    if to_version.is_none()
        && let Some(lock) = ctx.reg(|r| r.lock_of(ctx.env))?
        && let Some(d) = ctx.reg(|r| r.deployment(&lock.deployment_id))?
        && d.kind == "deploy"
        && matches!(d.status.as_str(), "pending" | "running" | "paused")
    {
        if !(lock.stale() || lock.mine() || d.status == "paused" || ctx.force_unlock) {
            anyhow::bail!(
                "deployment {} is still running ({} on {}, pid {}); stop it first (Ctrl-C), or pass --force-unlock",
                d.id,
                lock.owner,
                lock.hostname,
                lock.pid
            );
        }
        ctx.reg(|r| {
            r.unlock(ctx.env, &d.id)?;
            r.lock(ctx.env, &d.id, false)
        })?;
        ctx.progress.line("ferry", &format!("unwinding deployment {} of {}", d.id, d.version));
        ctx.progress.started(&d.id);
        let plan = Stored { auto_rollback: true, ..stored(&d.strategy)? };
        return halt(ctx, &d.id, &plan, &HashMap::new(), Some("unwound by `ferry rollback`")).await;
    }
    if strategy == Strategy::BlueGreen {
        if let Some(v) = to_version {
            anyhow::bail!(
                "environment {} is blue-green: it rolls back by switching to the other group (`ferry rollback` without --to); to run {v} again, deploy it",
                ctx.env
            );
        }
        return switch_to_idle(ctx, env).await;
    }
    let hosts = ctx.config.hosts(ctx.env)?;
    let size = plan::rollback_batch(&strategy, hosts.len());
    let id = new_deployment_id();
    ctx.take_lock(&id)?;
    let placed: Vec<(String, usize)> = hosts.iter().enumerate().map(|(i, h)| (h.name.clone(), i / size)).collect();
    let what = to_version.unwrap_or("previous");
    let stored = Stored {
        strategy: Strategy::Rolling { batch: vec![plan::Size::Count(size)] },
        max_failures: env.max_failures,
        auto_rollback: false,
        total_bytes: 0,
        prestage: false,
        switch: None,
    };
    start_rollback(ctx, &id, what, &stored, &placed)?;
    let target = to_version.map_or(Target::Previous, |v| Target::Version(v.to_string()));
    let batches: Vec<Batch> = plan::plan(&stored.strategy, hosts.len());
    let none = HashMap::new();
    for batch in &batches {
        if failures(&ctx.reg(|r| r.hosts(&id))?) > stored.max_failures {
            return finish(ctx, &id, "failed", Some("a host could not be rolled back"), &none);
        }
        if ctx.cancelled() {
            return finish(ctx, &id, "cancelled", Some("cancelled by the operator"), &none);
        }
        let swaps = batch.hosts.iter().map(|&i| {
            let (host, target, id) = (&hosts[i], &target, &id);
            async move {
                ctx.host_state(id, &host.name, HostState::Activating, &HostUpdate::default())?;
                match rollback_host(ctx.config, host, ctx.tls, target, id).await {
                    Ok(swap) => {
                        let (state, verb) = if swap.changed {
                            (HostState::Healthy, "rolled back")
                        } else {
                            (HostState::Unchanged, "unchanged")
                        };
                        ctx.progress.line(&host.name, &format!("{verb} ({})", swap.summary()));
                        ctx.host_state(
                            id,
                            &host.name,
                            state,
                            &HostUpdate { previous_release: swap.from.as_deref(), ..Default::default() },
                        )
                    }
                    Err(e) => host_failed(ctx, id, host, &e, 0),
                }
            }
        });
        for r in futures_util::future::join_all(swaps).await {
            r?;
        }
    }
    let status = if failures(&ctx.reg(|r| r.hosts(&id))?) > stored.max_failures { "failed" } else { "succeeded" };
    finish(ctx, &id, status, None, &none)
}

/// Records a rollback (no transfer, no release of its own) and starts it.
fn start_rollback(
    ctx: &Ctx<'_>,
    id: &str,
    what: &str,
    stored: &Stored,
    placed: &[(String, usize)],
) -> anyhow::Result<()> {
    ctx.reg(|r| {
        r.create(&NewDeployment {
            id,
            kind: "rollback",
            environment: ctx.env,
            version: what,
            release_id: "",
            artifact: "",
            manifest_hash: "",
            strategy: &serde_json::to_string(stored).unwrap_or_default(),
            hosts: placed,
        })?;
        r.set_status(id, "running", None)
    })?;
    ctx.progress.started(id);
    Ok(())
}

/// `ferry rollback` of a blue-green environment: the idle group still runs the release the live
/// one ran before, so after checking that every host of it answers and runs a release, the switch
/// makes it live again. No host is touched.
async fn switch_to_idle(ctx: &Ctx<'_>, env: &crate::config::Environment) -> anyhow::Result<DeployReport> {
    let (live, _) = ctx.reg(|r| r.live_group(ctx.env))?.with_context(|| {
        format!("no group of {} has been made live by ferry yet: there is nothing to switch back to", ctx.env)
    })?;
    let (idle, members) = env.idle_group(Some(&live)).context("blue-green needs two groups")?;
    let id = new_deployment_id();
    ctx.take_lock(&id)?;
    let sw = Switch { to: idle.clone(), from: Some(live.clone()) };
    let stored = Stored {
        strategy: Strategy::BlueGreen,
        max_failures: 0,
        auto_rollback: false,
        total_bytes: 0,
        prestage: false,
        switch: Some(sw.clone()),
    };
    let placed: Vec<(String, usize)> = members.iter().map(|h| (h.clone(), 0)).collect();
    start_rollback(ctx, &id, "previous", &stored, &placed)?;
    ctx.progress
        .line("ferry", &format!("blue-green: {live} is live; switching back to {idle} ({})", members.join(", ")));
    let inventory = ctx.inventory()?;
    let checks = members.iter().map(|name| {
        let (host, id) = (&inventory[name], &id);
        async move {
            match current_release(ctx.config, host, ctx.tls).await {
                Ok(current) if !current.is_empty() => {
                    ctx.progress.line(&host.name, &format!("runs {current}"));
                    let update = HostUpdate { previous_release: Some(&current), ..Default::default() };
                    ctx.host_state(id, &host.name, HostState::Unchanged, &update)
                }
                Ok(_) => {
                    let e =
                        HostError::new(host, ErrorKind::Failed, format!("{} runs no release of the app", host.name));
                    host_failed(ctx, id, host, &e, 0)
                }
                Err(e) => host_failed(ctx, id, host, &e, 0),
            }
        }
    });
    for r in futures_util::future::join_all(checks).await {
        r?;
    }
    let none = HashMap::new();
    if failures(&ctx.reg(|r| r.hosts(&id))?) > 0 {
        let why =
            format!("group {idle} cannot take over: not every host of it answers with a release; {live} stays live");
        return finish(ctx, &id, "failed", Some(&why), &none);
    }
    switch_over(ctx, &id, &stored, &sw, "previous", &none).await
}
