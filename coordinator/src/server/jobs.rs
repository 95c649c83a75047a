//! The rollouts `ferry serve` runs: each in its own task on the shared engine, with its own
//! cancel flag and a log of its progress lines for the event stream.
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use serde::Serialize;
use tokio::sync::{Notify, oneshot};

use super::Shared;
use super::api::ApiError;
use crate::artifact::Artifact;
use crate::commands::deploy::{DeployReport, Observer};
use crate::commands::rollout;

/// A progress line of a running deployment.
#[derive(Debug, Clone, Serialize)]
pub struct Line {
    pub time_ms: i64,
    pub host: String,
    pub message: String,
}

/// One rollout run by this server.
pub struct Job {
    pub environment: String,
    id: OnceLock<String>,
    lines: Mutex<Vec<Line>>,
    pub cancel: AtomicBool,
    done: AtomicBool,
    /// Woken on every line, and at the end.
    pub changed: Notify,
}

impl Job {
    pub fn lines_from(&self, from: usize) -> Vec<Line> {
        self.lines.lock().map(|l| l.get(from..).map(<[Line]>::to_vec).unwrap_or_default()).unwrap_or_default()
    }

    pub fn done(&self) -> bool {
        self.done.load(Ordering::SeqCst)
    }
}

/// The jobs of this server: by deployment id, and which environment each runs in.
#[derive(Default)]
pub struct Jobs {
    by_id: Mutex<HashMap<String, Arc<Job>>>,
    /// Environments with a job in flight (taken before the engine's own registry lock, so two
    /// calls of this server never race for an environment).
    busy: Mutex<HashMap<String, Arc<Job>>>,
    idle: Notify,
    /// Set on SIGTERM: no new job starts.
    stopping: AtomicBool,
}

impl Jobs {
    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        self.by_id.lock().ok()?.get(id).cloned()
    }

    /// The job running in `env`, if any.
    pub fn running_in(&self, env: &str) -> Option<Arc<Job>> {
        self.busy.lock().ok()?.get(env).cloned()
    }

    /// Refuses new jobs and asks the running ones to stop after their hosts in flight.
    pub fn cancel_all(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Ok(busy) = self.busy.lock() {
            for job in busy.values() {
                job.cancel.store(true, Ordering::SeqCst);
            }
        }
    }

    pub async fn wait_idle(&self) {
        loop {
            let idle = self.idle.notified();
            if self.busy.lock().map(|b| b.is_empty()).unwrap_or(true) {
                return;
            }
            idle.await;
        }
    }
}

/// What a job does once its environment is reserved.
pub enum Op {
    Deploy {
        artifact: Arc<Artifact>,
        version: String,
        prestage: bool,
    },
    Rollback {
        to: Option<String>,
    },
    /// Continue the environment's deployment: paused at a canary step (`paused_only`), or left
    /// by a coordinator that died.
    Resume {
        paused_only: bool,
    },
    /// Record the environment's paused deployment as cancelled (touches no host).
    CancelPaused,
}

struct JobObserver {
    state: Shared,
    job: Arc<Job>,
    who: String,
    promoted_from: Option<String>,
    started: Mutex<Option<oneshot::Sender<String>>>,
}

impl Observer for JobObserver {
    fn line(&self, host: &str, msg: &str) {
        tracing::info!(environment = self.job.environment, host, "{msg}");
        if let Ok(mut lines) = self.job.lines.lock() {
            lines.push(Line { time_ms: crate::registry::now_ms(), host: host.to_string(), message: msg.to_string() });
        }
        self.job.changed.notify_waiters();
    }

    fn state(&self, _host: &str, _state: crate::state::HostState) {
        self.job.changed.notify_waiters();
    }

    fn started(&self, id: &str) {
        let _ = self.job.id.set(id.to_string());
        if let Ok(mut by_id) = self.state.jobs.by_id.lock() {
            by_id.insert(id.to_string(), self.job.clone());
        }
        if let Ok(reg) = self.state.registry.lock()
            && let Err(e) = reg
                .set_requested_by(id, &self.who, self.promoted_from.as_deref())
                .and_then(|()| reg.event(id, None, "requested", &format!("by {} through the API", self.who)))
        {
            tracing::error!("deployment {id}: cannot record who asked for it: {e}");
        }
        if let Some(tx) = self.started.lock().ok().and_then(|mut s| s.take()) {
            let _ = tx.send(id.to_string());
        }
    }
}

/// Ends a job however its task ends (a panic included): marks it done, frees its environment
/// and wakes whoever follows it.
struct Finished {
    state: Shared,
    job: Arc<Job>,
}

impl Drop for Finished {
    fn drop(&mut self) {
        self.job.done.store(true, Ordering::SeqCst);
        if let Ok(mut busy) = self.state.jobs.busy.lock()
            && busy.get(&self.job.environment).is_some_and(|j| Arc::ptr_eq(j, &self.job))
        {
            busy.remove(&self.job.environment);
        }
        self.job.changed.notify_waiters();
        self.state.jobs.idle.notify_waiters();
    }
}

/// Jobs kept (for their progress lines) after they end.
const KEEP_ENDED: usize = 100;

/// Starts `op` in `env` for `who` and returns the deployment id as soon as the registry holds
/// it; an error before that (environment locked, nothing to continue, …) is the answer instead.
pub async fn start(
    state: &Shared,
    env: &str,
    who: &str,
    promoted_from: Option<String>,
    op: Op,
) -> Result<String, ApiError> {
    let job = Arc::new(Job {
        environment: env.to_string(),
        id: OnceLock::new(),
        lines: Mutex::new(Vec::new()),
        cancel: AtomicBool::new(false),
        done: AtomicBool::new(false),
        changed: Notify::new(),
    });
    if state.jobs.stopping.load(Ordering::SeqCst) {
        return Err(ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "stopping",
            "the server is stopping: it starts nothing new (retry when it is back)",
        ));
    }
    if let Ok(mut by_id) = state.jobs.by_id.lock()
        && by_id.len() > KEEP_ENDED
    {
        by_id.retain(|_, j| !j.done());
    }
    {
        let mut busy = state.jobs.busy.lock().map_err(|_| ApiError::internal("job table poisoned"))?;
        if let Some(other) = busy.get(env) {
            let what =
                other.id.get().map_or("a deployment that is starting".to_string(), |id| format!("deployment {id}"));
            return Err(ApiError::conflict(
                "environment_busy",
                format!("environment {env} is busy: this server is running {what} there"),
            ));
        }
        busy.insert(env.to_string(), job.clone());
    }
    let (tx, rx) = oneshot::channel();
    let observer = JobObserver {
        state: state.clone(),
        job: job.clone(),
        who: who.to_string(),
        promoted_from,
        started: Mutex::new(Some(tx)),
    };
    let (state2, env2) = (state.clone(), env.to_string());
    let mut handle = tokio::spawn(async move {
        let _finished = Finished { state: state2.clone(), job: observer.job.clone() };
        let result = run(&state2, &env2, &observer, op).await;
        if let Err(e) = &result {
            observer.line("ferry", &format!("error: {e:#}"));
        }
        result
    });
    tokio::select! {
        // The id first: a run that recorded its deployment and then failed still answers with it.
        biased;
        Ok(id) = rx => Ok(id),
        joined = &mut handle => match joined {
            Ok(Ok(report)) => Ok(report.deployment_id),
            Ok(Err(e)) => Err(ApiError::conflict("not_started", format!("{e:#}"))),
            Err(e) => Err(ApiError::internal(format!("the rollout task failed: {e}"))),
        },
    }
}

async fn run(state: &Shared, env: &str, observer: &JobObserver, op: Op) -> anyhow::Result<DeployReport> {
    let ctx = rollout::Ctx {
        config: &state.config,
        env,
        tls: &state.tls,
        registry: &state.registry,
        progress: observer,
        cancel: &observer.job.cancel,
        force_unlock: false,
    };
    match op {
        Op::Deploy { artifact, version, prestage } => {
            rollout::deploy(&ctx, artifact, &version, state.cache.as_ref(), prestage).await
        }
        Op::Rollback { to } => rollout::rollback(&ctx, to.as_deref()).await,
        Op::Resume { paused_only } => rollout::resume(&ctx, state.cache.as_ref(), paused_only).await,
        Op::CancelPaused => rollout::cancel_paused(&ctx),
    }
}
