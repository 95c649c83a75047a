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
}

impl Jobs {
    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        self.by_id.lock().ok()?.get(id).cloned()
    }

    /// The job running in `env`, if any.
    pub fn running_in(&self, env: &str) -> Option<Arc<Job>> {
        self.busy.lock().ok()?.get(env).cloned()
    }

    pub fn cancel_all(&self) {
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
            && let Err(e) = reg.set_requested_by(id, &self.who, self.promoted_from.as_deref())
        {
            tracing::error!("deployment {id}: cannot record who asked for it: {e}");
        }
        if let Some(tx) = self.started.lock().ok().and_then(|mut s| s.take()) {
            let _ = tx.send(id.to_string());
        }
    }
}

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
        cancel: AtomicBool::new(matches!(op, Op::CancelPaused)),
        done: AtomicBool::new(false),
        changed: Notify::new(),
    });
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
        let result = run(&state2, &env2, &observer, op).await;
        if let Err(e) = &result {
            observer.line("ferry", &format!("error: {e:#}"));
        }
        observer.job.done.store(true, Ordering::SeqCst);
        if let Ok(mut busy) = state2.jobs.busy.lock() {
            busy.remove(&env2);
        }
        observer.job.changed.notify_waiters();
        state2.jobs.idle.notify_waiters();
        result
    });
    tokio::select! {
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
        Op::CancelPaused => rollout::resume(&ctx, state.cache.as_ref(), true).await,
    }
}
