//! The rollouts `ferry serve` runs: each recorded by its use case before the API answers (so the
//! answer carries the deployment id, or the exact refusal), then run in a tracked task of its
//! own with its own cancel token and a log of its progress lines for the event stream.
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Shared;
use super::error::ApiError;
use crate::artifact::Artifact;
use crate::commands::{self, Ctx};
use crate::config::FleetConfig;
use crate::rollout::{Event, Observer, Rollback};

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
    /// fleet.toml as the job's app sees it.
    pub app: Arc<FleetConfig>,
    id: OnceLock<String>,
    lines: Mutex<Vec<Line>>,
    /// Cancelled: the rollout finishes its hosts in flight, then stops.
    pub cancel: CancellationToken,
    done: AtomicBool,
    /// Woken on every line, and at the end.
    pub changed: Notify,
}

impl Jobs {
    /// Stops every running job after its hosts in flight (this server lost the leadership);
    /// new ones may start once it leads again.
    pub fn cancel_running(&self) {
        if let Ok(busy) = self.busy.lock() {
            for job in busy.values() {
                job.cancel.cancel();
            }
        }
    }

    /// Whether a job of this server runs in `env`.
    pub fn runs_in(&self, env: &str) -> bool {
        self.busy.lock().is_ok_and(|b| b.contains_key(env))
    }
}

impl Job {
    pub fn lines_from(&self, from: usize) -> Vec<Line> {
        self.lines.lock().map(|l| l.get(from..).map(<[Line]>::to_vec).unwrap_or_default()).unwrap_or_default()
    }

    pub fn done(&self) -> bool {
        self.done.load(Ordering::SeqCst)
    }

    fn push(&self, host: &str, message: String) {
        if let Ok(mut lines) = self.lines.lock() {
            lines.push(Line { time_ms: crate::registry::now_ms(), host: host.to_string(), message });
        }
        self.changed.notify_waiters();
    }
}

/// The jobs of this server: by deployment id, and which environment each runs in.
#[derive(Default)]
pub struct Jobs {
    by_id: Mutex<HashMap<String, Arc<Job>>>,
    /// Environments with a job in flight (taken before the engine's own registry lock, so two
    /// calls of this server never race for an environment).
    busy: Mutex<HashMap<String, Arc<Job>>>,
    /// Every job's task.
    tasks: TaskTracker,
    /// Set on shutdown: no new job starts.
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
        // Under the table's lock: a job reserving its environment now either sees `stopping` or
        // is in the table, and cancelled here.
        let busy = self.busy.lock();
        self.stopping.store(true, Ordering::SeqCst);
        if let Ok(busy) = busy {
            for job in busy.values() {
                job.cancel.cancel();
            }
        }
    }

    /// Waits until every job has ended, those still being recorded included (call after
    /// [`Jobs::cancel_all`]).
    pub async fn wait_idle(&self) {
        self.tasks.close();
        self.tasks.wait().await;
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

/// What is left to run once the deployment is recorded.
enum Run {
    Deploy(Arc<Artifact>),
    Rollback(Rollback),
    Nothing,
}

/// A job's events as progress lines (and wake-ups for the event stream).
struct JobObserver(Arc<Job>);

impl Observer for JobObserver {
    fn event(&self, event: &Event<'_>) {
        match crate::ui::event_line(event) {
            Some((host, line)) => {
                tracing::info!(environment = self.0.environment, host, "{line}");
                self.0.push(host, line);
            }
            None => self.0.changed.notify_waiters(),
        }
    }
}

/// Ends a job however it ends (an error, a panic included): marks it done, frees its
/// environment and wakes whoever follows it.
struct Finished {
    state: Shared,
    job: Arc<Job>,
    /// Counts the job as a task of the tracker from the moment it reserves its environment.
    _task: tokio_util::task::task_tracker::TaskTrackerToken,
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
    }
}

/// Jobs kept (for their progress lines) after they end.
const KEEP_ENDED: usize = 100;

/// The use cases' context for a job of this server.
fn job_ctx<'a>(state: &'a Shared, fleet: &'a crate::fleet::grpc::Grpc<'a>, observer: &'a JobObserver) -> Ctx<'a> {
    Ctx {
        config: &observer.0.app,
        fleet,
        registry: state.registry.as_ref(),
        cache: state.cache.as_ref(),
        observer,
        cancel: &observer.0.cancel,
        force_unlock: false,
        notifier: &state.notifier,
    }
}

/// Records `op` of `app` (a view from [`super::AppState::app`]) in `env` for `who` and starts
/// running it; the deployment id, or the refusal (environment locked, nothing to continue, …)
/// with its exact status code. An environment runs one job at a time, whatever its app.
pub async fn start(
    state: &Shared,
    app: &Arc<FleetConfig>,
    env: &str,
    who: &str,
    promoted_from: Option<String>,
    op: Op,
) -> Result<String, ApiError> {
    if let Ok(mut by_id) = state.jobs.by_id.lock()
        && by_id.len() > KEEP_ENDED
    {
        by_id.retain(|_, j| !j.done());
    }
    // On a shared registry the job's commands carry this leader's epoch.
    let app = if state.leadership.contested {
        Arc::new(FleetConfig { epoch: state.leadership.epoch(), ..(**app).clone() })
    } else {
        app.clone()
    };
    let job = Arc::new(Job {
        environment: env.to_string(),
        app,
        id: OnceLock::new(),
        lines: Mutex::new(Vec::new()),
        cancel: CancellationToken::new(),
        done: AtomicBool::new(false),
        changed: Notify::new(),
    });
    let task = {
        let mut busy = state.jobs.busy.lock().map_err(|_| ApiError::internal("job table poisoned"))?;
        if state.jobs.stopping.load(Ordering::SeqCst) {
            return Err(ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "stopping",
                "the server is stopping: it starts nothing new (retry when it is back)",
            ));
        }
        if let Some(other) = busy.get(env) {
            let what =
                other.id.get().map_or("a deployment that is starting".to_string(), |id| format!("deployment {id}"));
            return Err(ApiError::conflict(
                "environment_busy",
                format!("environment {env} is busy: this server is running {what} there"),
            ));
        }
        busy.insert(env.to_string(), job.clone());
        // Taken under the table's lock, so shutdown's wait cannot miss this job.
        state.jobs.tasks.token()
    };
    // From here the environment is reserved: a refusal below frees it when `finished` drops.
    let finished = Finished { state: state.clone(), job: job.clone(), _task: task };
    let observer = JobObserver(job.clone());
    let tls = state.tls.current();
    let fleet = state.fleet(&job.app, &tls.agents);
    let ctx = job_ctx(state, &fleet, &observer);
    let recorded: Result<(String, Run), commands::Error> = match op {
        Op::Deploy { artifact, version, prestage } => {
            commands::deploy::start(&ctx, env, &artifact, &version, prestage).map(|id| (id, Run::Deploy(artifact)))
        }
        Op::Rollback { to } => {
            commands::rollback::start(&ctx, env, to.as_deref()).map(|r| (r.id().to_string(), Run::Rollback(r)))
        }
        Op::Resume { paused_only } => match commands::resume::prepare(&ctx, env, paused_only).await {
            Ok((d, artifact)) => commands::resume::take_over(&ctx, env, &d).map(|()| (d.id, Run::Deploy(artifact))),
            Err(e) => Err(e),
        },
        Op::CancelPaused => commands::resume::cancel_paused(&ctx, env).map(|r| (r.deployment_id, Run::Nothing)),
    };
    let (id, run) = recorded?;
    let _ = job.id.set(id.clone());
    if let Ok(mut by_id) = state.jobs.by_id.lock() {
        by_id.insert(id.clone(), job.clone());
    }
    let requested = state
        .registry
        .set_requested_by(&id, who, promoted_from.as_deref())
        .and_then(|()| state.registry.event(&id, None, "requested", &format!("by {who} through the API")));
    if let Err(e) = requested {
        tracing::error!("deployment {id}: cannot record who asked for it: {e}");
    }
    let (state, env, task_id) = (state.clone(), env.to_string(), id.clone());
    state.jobs.tasks.clone().spawn(async move {
        let _finished = finished;
        let tls = state.tls.current();
        let fleet = state.fleet(&observer.0.app, &tls.agents);
        let ctx = job_ctx(&state, &fleet, &observer);
        let result = match run {
            Run::Deploy(artifact) => commands::deploy::run(&ctx, &env, &task_id, artifact).await.map(drop),
            Run::Rollback(r) => commands::rollback::run(&ctx, &env, &r).await.map(drop),
            Run::Nothing => Ok(()),
        };
        if let Err(e) = result {
            tracing::error!(deployment_id = task_id, "{e}");
            observer.0.push("ferry", format!("error: {e}"));
        }
    });
    Ok(id)
}
