//! The `ferry.agent.v1.Agent` service: what a coordinator may ask of this host.
//!
//! Every request arrives over a connection whose certificate was checked in the handshake (role
//! coordinator, fleet CA); the caller's name is in the request's [`PeerInfo`] and is logged with
//! each call. Errors become `tonic::Status` here and nowhere else.
//!
//! Activations and rollbacks run as tasks of their own, tracked in [`Activations`]: once the agent
//! is stopping (SIGTERM: `systemctl stop`/`restart`, a package upgrade), one already running is
//! finished, never abandoned half-way (the server waits for them), and one not yet begun is refused
//! with nothing changed.
use std::sync::Arc;

use ferry_proto::v1::{self, agent_server::Agent};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};

use crate::activate;
use crate::config::AgentConfig;
use crate::facts;
use crate::server::PeerInfo;
use crate::store::{AppStore, ManifestSource, StoreError};
use std::time::Instant;

/// Server streaming response for the step-event RPCs.
pub type StepStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<v1::StepEvent, Status>> + Send>>;

pub struct AgentService {
    config: Arc<AgentConfig>,
    /// Our own certificate's name, reported in `GetStatus`.
    name: String,
    /// One lock per app: staging, promotion and swaps of one app never interleave.
    locks: std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>,
    activations: Activations,
}

/// The activation and rollback plans in progress, and whether the agent is stopping.
#[derive(Debug, Clone, Default)]
pub struct Activations {
    tasks: TaskTracker,
    stopping: CancellationToken,
}

impl Activations {
    /// From now on, plans not yet begun are refused; the ones running go on.
    pub fn stop_new(&self) {
        self.stopping.cancel();
        self.tasks.close();
    }

    /// How many plans are still running (or waiting for their app's lock).
    pub fn in_progress(&self) -> usize {
        self.tasks.len()
    }

    /// Resolves when every plan has ended; call [`Activations::stop_new`] first.
    pub async fn finished(&self) {
        self.tasks.wait().await
    }

    fn refusal() -> Status {
        Status::unavailable(
            "ferry-agent is stopping (service stop, restart or package upgrade); nothing was changed: \
             retry once it is back",
        )
    }
}

impl AgentService {
    pub fn new(config: Arc<AgentConfig>) -> Self {
        Self::with_activations(config, Activations::default())
    }

    /// A service whose activation tasks are tracked in `activations` (the server waits for them
    /// on shutdown).
    pub fn with_activations(config: Arc<AgentConfig>, activations: Activations) -> Self {
        let name = ferry_proto::identity::load_certs(&config.tls.cert)
            .ok()
            .and_then(|c| c.first().and_then(|c| ferry_proto::identity::CertIdentity::from_der(c).ok()))
            .map(|id| id.name().to_string())
            .unwrap_or_default();
        let locks = config.apps.keys().map(|a| (a.clone(), Arc::new(tokio::sync::Mutex::new(())))).collect();
        AgentService { config, name, locks, activations }
    }

    /// The app's store and lock, or NotFound for an app this agent does not manage.
    fn app(&self, app: &str) -> Result<(AppStore, Arc<tokio::sync::Mutex<()>>), Status> {
        match (self.config.store(app), self.locks.get(app)) {
            (Some(store), Some(lock)) => Ok((store, lock.clone())),
            _ => Err(Status::not_found(format!(
                "app {app:?} is not declared in this agent's config (declared: {})",
                self.config.apps.keys().cloned().collect::<Vec<_>>().join(", ")
            ))),
        }
    }
}

fn caller<T>(req: &Request<T>) -> String {
    req.extensions().get::<PeerInfo>().map(|p| format!("{} ({})", p.name, p.addr)).unwrap_or_default()
}

/// The one place store errors become gRPC statuses.
fn status_of(e: StoreError) -> Status {
    let msg = e.to_string();
    match e {
        StoreError::NoSpace { .. } | StoreError::DiskFull(_) => Status::resource_exhausted(msg),
        StoreError::Refused(_) => Status::invalid_argument(msg),
        StoreError::NoSuchRelease(_) => Status::not_found(msg),
        StoreError::NotPrepared(_) | StoreError::Incomplete(_) | StoreError::Conflict(_) | StoreError::Base(_) => {
            Status::failed_precondition(msg)
        }
        StoreError::Corrupt(_) => Status::data_loss(msg),
        StoreError::Io { .. } => Status::internal(msg),
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, StoreError> + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("worker failed: {e}")))?
        .map_err(status_of)
}

fn event(step: v1::Step, state: v1::StepState, started: Instant, message: impl Into<String>) -> v1::StepEvent {
    v1::StepEvent {
        step: step as i32,
        state: state as i32,
        message: message.into(),
        elapsed_ms: started.elapsed().as_millis() as u64,
        ..Default::default()
    }
}

fn stream_of(events: Vec<v1::StepEvent>) -> StepStream {
    Box::pin(tokio_stream::iter(events.into_iter().map(Ok)))
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn get_status(&self, request: Request<v1::GetStatusRequest>) -> Result<Response<v1::HostStatus>, Status> {
        tracing::debug!(caller = caller(&request), "GetStatus");
        let config = self.config.clone();
        let name = self.name.clone();
        let status = tokio::task::spawn_blocking(move || facts::gather(&config, &name))
            .await
            .map_err(|e| Status::internal(format!("gathering host facts failed: {e}")))?;
        Ok(Response::new(status))
    }

    async fn list_releases(
        &self,
        request: Request<v1::ListReleasesRequest>,
    ) -> Result<Response<v1::ListReleasesResponse>, Status> {
        tracing::debug!(caller = caller(&request), "ListReleases");
        let (store, _) = self.app(&request.get_ref().app)?;
        let releases = tokio::task::spawn_blocking(move || store.releases())
            .await
            .map_err(|e| Status::internal(format!("listing releases failed: {e}")))?
            .map_err(|e| Status::internal(format!("cannot read the release store: {e}")))?;
        Ok(Response::new(v1::ListReleasesResponse { releases }))
    }

    async fn prepare(&self, request: Request<v1::PrepareRequest>) -> Result<Response<v1::PrepareResponse>, Status> {
        let who = caller(&request);
        let req = request.into_inner();
        let (store, lock) = self.app(&req.app)?;
        let _guard = lock.lock().await;
        let free = facts::disk_space(&self.config.data_dir).0;
        let (source, entries) = match (req.manifest, req.delta) {
            (Some(m), None) if req.base_release.is_empty() => {
                let n = m.entries.len();
                (ManifestSource::Whole(m), format!("{n} entries"))
            }
            (None, Some(delta)) if !req.base_release.is_empty() => {
                let what = format!(
                    "delta from {}: {} changed, {} removed",
                    req.base_release,
                    delta.upserts.len(),
                    delta.removed.len()
                );
                (ManifestSource::Delta { base: req.base_release, delta }, what)
            }
            _ => {
                return Err(Status::invalid_argument(
                    "a Prepare carries either a manifest, or a base release and a manifest delta",
                ));
            }
        };
        tracing::info!(
            caller = who,
            app = req.app,
            version = req.version,
            deployment = req.deployment_id,
            manifest = entries,
            "Prepare"
        );
        let version = req.version.clone();
        let p = blocking(move || store.prepare(&version, source, &req.manifest_hash, free)).await?;
        tracing::info!(
            release = p.release_id,
            missing = p.missing.len(),
            missing_bytes = p.missing_bytes,
            bases = p.bases.len(),
            "prepared"
        );
        Ok(Response::new(v1::PrepareResponse {
            stage_id: p.release_id.clone(),
            missing_chunks: p.missing,
            missing_bytes: p.missing_bytes,
            already_present: p.already_present,
            release_id: p.release_id,
            bases: p.bases,
        }))
    }

    async fn upload(
        &self,
        request: Request<tonic::Streaming<v1::UploadRequest>>,
    ) -> Result<Response<v1::UploadResponse>, Status> {
        let who = caller(&request);
        let mut stream = request.into_inner();
        let first = stream.message().await?.and_then(|m| m.msg);
        let Some(v1::upload_request::Msg::Start(start)) = first else {
            return Err(Status::invalid_argument("an upload must begin with a start message naming the app and stage"));
        };
        let (store, lock) = self.app(&start.app)?;
        let _guard = lock.lock().await;
        tracing::info!(caller = who, app = start.app, stage = start.stage_id, "Upload");
        let stage = start.stage_id.clone();
        let mut upload = blocking(move || store.upload(&stage)).await?;
        while let Some(msg) = stream.message().await? {
            match msg.msg {
                Some(v1::upload_request::Msg::Chunk(chunk)) => {
                    upload = tokio::task::spawn_blocking(move || upload.put(&chunk).map(|()| upload))
                        .await
                        .map_err(|e| Status::internal(format!("worker failed: {e}")))?
                        .map_err(status_of)?;
                }
                Some(v1::upload_request::Msg::Finish(_)) => break,
                Some(v1::upload_request::Msg::Start(_)) | None => {
                    return Err(Status::invalid_argument("unexpected message in an upload: only chunks, then finish"));
                }
            }
        }
        tracing::info!(
            chunks = upload.chunks_received,
            rebuilt_from_bases = upload.rebuilt,
            bytes = upload.bytes_received,
            "upload finished"
        );
        Ok(Response::new(v1::UploadResponse {
            chunks_received: upload.chunks_received,
            bytes_received: upload.bytes_received,
        }))
    }

    type CommitStream = StepStream;
    async fn commit(&self, request: Request<v1::CommitRequest>) -> Result<Response<StepStream>, Status> {
        let who = caller(&request);
        let req = request.into_inner();
        let (store, lock) = self.app(&req.app)?;
        let _guard = lock.lock().await;
        tracing::info!(caller = who, app = req.app, stage = req.stage_id, deployment = req.deployment_id, "Commit");
        let started = Instant::now();
        let stage = req.stage_id.clone();
        let id = blocking(move || store.commit(&stage, |_, _| {})).await?;
        let mut done = event(v1::Step::Promote, v1::StepState::Succeeded, started, format!("release {id} is on disk"));
        done.step_ms = done.elapsed_ms;
        done.r#final = Some(v1::Final { outcome: v1::Outcome::Committed as i32, release_id: id, ..Default::default() });
        Ok(Response::new(stream_of(vec![done])))
    }

    type ActivateStream = StepStream;
    async fn activate(&self, request: Request<v1::ActivateRequest>) -> Result<Response<StepStream>, Status> {
        let who = caller(&request);
        let req = request.into_inner();
        let (store, lock) = self.app(&req.app)?;
        self.check_units(&req.app, &req.units)?;
        if !matches!(req.unit_action.as_str(), "" | "restart" | "reload" | "reload-or-restart") {
            return Err(Status::invalid_argument(format!(
                "unit_action {:?} is not one of restart, reload, reload-or-restart",
                req.unit_action
            )));
        }
        if !store.has_release(&req.release_id) {
            return Err(Status::not_found(format!(
                "release {} is not on this host (Prepare, Upload and Commit it first)",
                req.release_id
            )));
        }
        tracing::info!(
            caller = who,
            app = req.app,
            release = req.release_id,
            deployment = req.deployment_id,
            "Activate"
        );
        let keep = if req.keep_releases == 0 { 5 } else { req.keep_releases as usize };
        let plan = activate::Plan {
            app: req.app,
            target: Some(req.release_id),
            deployment_id: req.deployment_id,
            units: req.units,
            probes: req.probes,
            keep: Some(keep),
            rollback_on_failure: req.rollback_on_failure,
            unit_timeout: UNIT_TIMEOUT,
            unit_action: req.unit_action,
            hooks: req.hooks,
            version: req.version,
        };
        Ok(Response::new(self.spawn_plan(plan, lock)?))
    }

    type RollbackStream = StepStream;
    async fn rollback(&self, request: Request<v1::RollbackRequest>) -> Result<Response<StepStream>, Status> {
        let who = caller(&request);
        let req = request.into_inner();
        let (store, lock) = self.app(&req.app)?;
        self.check_units(&req.app, &req.units)?;
        if !req.to_release.is_empty() && !store.has_release(&req.to_release) {
            return Err(Status::not_found(format!("release {} is not kept on this host", req.to_release)));
        }
        tracing::info!(caller = who, app = req.app, to = req.to_release, deployment = req.deployment_id, "Rollback");
        let plan = activate::Plan {
            app: req.app,
            target: (!req.to_release.is_empty()).then_some(req.to_release),
            deployment_id: req.deployment_id,
            units: req.units,
            probes: req.probes,
            keep: None,
            // Going back is the recovery; if the target is unhealthy too there is nothing to undo to.
            rollback_on_failure: false,
            unit_timeout: UNIT_TIMEOUT,
            // Going back to a release means restarting onto it: a reload might keep old code.
            unit_action: "restart".into(),
            hooks: None,
            version: String::new(),
        };
        Ok(Response::new(self.spawn_plan(plan, lock)?))
    }
}

/// How long one unit restart may take.
const UNIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(90);

impl AgentService {
    /// Every unit must be declared for the app in this agent's own config.
    fn check_units(&self, app: &str, units: &[String]) -> Result<(), Status> {
        let declared = self.config.apps.get(app).map(|a| a.units.as_slice()).unwrap_or_default();
        match units.iter().find(|u| !declared.contains(u)) {
            Some(unit) => Err(Status::permission_denied(format!(
                "unit {unit:?} is not declared for app {app} in this agent's config; nothing was changed"
            ))),
            None => Ok(()),
        }
    }

    /// Runs an activation plan under the app's lock; its events are the response stream. The
    /// plan runs to its end even if the coordinator goes away or the agent is told to stop (a
    /// host is never left half-way); a plan that has not begun when the agent starts stopping is
    /// refused instead.
    fn spawn_plan(&self, plan: activate::Plan, lock: Arc<tokio::sync::Mutex<()>>) -> Result<StepStream, Status> {
        if self.activations.stopping.is_cancelled() {
            return Err(Activations::refusal());
        }
        let (tx, rx) = tokio::sync::mpsc::channel(32);
        let config = self.config.clone();
        let stopping = self.activations.stopping.clone();
        self.activations.tasks.spawn(async move {
            let _guard = lock.lock().await;
            if stopping.is_cancelled() {
                tracing::info!(app = plan.app, deployment = plan.deployment_id, "refused: the agent is stopping");
                let _ = tx.send(Err(Activations::refusal())).await;
                return;
            }
            activate::run(config, plan, tx).await;
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}
