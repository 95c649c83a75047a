//! The `ferry.agent.v1.Agent` service: what a coordinator may ask of this host.
//!
//! Every request arrives over a connection whose certificate was checked in the handshake (role
//! coordinator, fleet CA); the caller's name is in the request's [`PeerInfo`] and is logged with
//! each call. Errors become `tonic::Status` here and nowhere else.
//!
//! Every command is recorded when it ends, before its answer goes out: one audit line (who, what,
//! the result: [`crate::audit`]) and the request and outcome counters ([`crate::metrics`]). An
//! activation's or rollback's line is written when its plan ends, with its outcome. Each command
//! runs in a tracing span carrying `rpc`, `peer`, `app`, `version` and `deployment_id` (journald
//! fields `F_RPC`, `F_PEER`, … under systemd).
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
use crate::audit::Entry;
use crate::config::AgentConfig;
use crate::facts;
use crate::metrics;
use crate::store::{AppStore, ManifestSource, StoreError};
use crate::telemetry::Telemetry;
use std::time::Instant;
use tracing::Instrument;

/// Server streaming response for the step-event RPCs.
pub type StepStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<v1::StepEvent, Status>> + Send>>;

pub use crate::peers::PeerInfo;

pub struct AgentService {
    config: Arc<AgentConfig>,
    /// Our own certificate's name, reported in `GetStatus`.
    name: String,
    /// One lock per app: staging, promotion and swaps of one app never interleave.
    locks: std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>,
    activations: Activations,
    telemetry: Arc<Telemetry>,
    /// Each stage in progress (app, stage id): when it was prepared (for the stage duration) and
    /// for which deployment and version (the audit line of its Upload, which names neither).
    stages: std::sync::Mutex<std::collections::HashMap<(String, String), Stage>>,
    /// The highest coordinator epoch seen: lower ones are refused.
    fence: crate::fence::Fence,
    /// Peers served at once (agent.toml `peer_uploads`).
    peer_slots: Arc<tokio::sync::Semaphore>,
    /// The rate they share (agent.toml `peer_upload_mbit`).
    peer_pacer: Option<Arc<crate::peers::Pacer>>,
}

/// Stages remembered; older ones (abandoned) are forgotten first.
const MAX_STAGES: usize = 256;

#[derive(Debug, Clone)]
struct Stage {
    prepared: Instant,
    deployment: String,
    version: String,
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
    /// A service whose activation tasks are tracked in `activations` (the server waits for them
    /// on shutdown), recording into `telemetry`.
    pub fn with_activations(config: Arc<AgentConfig>, activations: Activations, telemetry: Arc<Telemetry>) -> Self {
        let name = ferry_proto::identity::load_certs(&config.tls.cert)
            .ok()
            .and_then(|c| c.first().and_then(|c| ferry_proto::identity::CertIdentity::from_der(c).ok()))
            .map(|id| id.name().to_string())
            .unwrap_or_default();
        let locks = config.apps.keys().map(|a| (a.clone(), Arc::new(tokio::sync::Mutex::new(())))).collect();
        let fence = crate::fence::Fence::open(&config.data_dir);
        let peer_slots = Arc::new(tokio::sync::Semaphore::new(config.peer_uploads));
        let peer_pacer = crate::peers::Pacer::new(config.peer_upload_mbit).map(Arc::new);
        AgentService {
            config,
            name,
            locks,
            activations,
            telemetry,
            stages: Default::default(),
            fence,
            peer_slots,
            peer_pacer,
        }
    }

    /// The app's store and lock, or NotFound for an app this agent does not manage.
    fn app(&self, app: &str) -> Result<(AppStore, Arc<tokio::sync::Mutex<()>>), Status> {
        match (self.config.store(app), self.locks.get(app)) {
            (Some(store), Some(lock)) => Ok((store.stop_on(self.activations.stopping.clone()), lock.clone())),
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

/// The audit record of a request, before its result is known.
fn entry<T>(req: &Request<T>, rpc: &str) -> Entry {
    match req.extensions().get::<PeerInfo>() {
        Some(p) => Entry::new(rpc, &p.name, &p.addr.to_string()),
        None => Entry::new(rpc, "", ""),
    }
}

/// The span a command runs in (its fields become journald fields under systemd).
fn span_of(e: &Entry) -> tracing::Span {
    tracing::info_span!(
        "command",
        rpc = e.rpc,
        peer = e.peer,
        app = e.app,
        version = e.version,
        deployment_id = e.deployment
    )
}

/// A gRPC code as a metric label and audit result, e.g. `not_found`.
fn code_label(code: tonic::Code) -> String {
    let name = format!("{code:?}");
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// The one place store errors become gRPC statuses.
fn status_of(e: StoreError) -> Status {
    let msg = e.to_string();
    match e {
        StoreError::NoSpace { .. } | StoreError::DiskFull(_) => Status::resource_exhausted(msg),
        StoreError::Refused(_) => Status::invalid_argument(msg),
        StoreError::NoSuchRelease(_) => Status::not_found(msg),
        StoreError::Stopping(_) => Status::unavailable(msg),
        StoreError::NotPrepared(_)
        | StoreError::Incomplete(_)
        | StoreError::Conflict(_)
        | StoreError::Tampered(_)
        | StoreError::Base(_) => Status::failed_precondition(msg),
        StoreError::Corrupt(_) => Status::data_loss(msg),
        StoreError::Io { .. } | StoreError::Unrecorded(_) => Status::internal(msg),
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
        let e = entry(&request, "GetStatus");
        let r = self.get_status_inner(request).instrument(span_of(&e)).await;
        self.done(e, r, |_, _| {}).await
    }

    async fn list_releases(
        &self,
        request: Request<v1::ListReleasesRequest>,
    ) -> Result<Response<v1::ListReleasesResponse>, Status> {
        let e = Entry { app: request.get_ref().app.clone(), ..entry(&request, "ListReleases") };
        let r = self.list_releases_inner(request).instrument(span_of(&e)).await;
        self.done(e, r, |r, e| e.detail = format!("{} release(s)", r.releases.len())).await
    }

    async fn prepare(&self, request: Request<v1::PrepareRequest>) -> Result<Response<v1::PrepareResponse>, Status> {
        let fenced = self.fenced(&request);
        let r = request.get_ref();
        let e = Entry {
            app: r.app.clone(),
            version: r.version.clone(),
            deployment: r.deployment_id.clone(),
            ..entry(&request, "Prepare")
        };
        let r = match fenced {
            Ok(()) => self.prepare_inner(request).instrument(span_of(&e)).await,
            Err(s) => Err(s),
        };
        self.done(e, r, |r, e| {
            e.release = r.release_id.clone();
            e.detail = if r.already_present {
                "already on this host".into()
            } else {
                format!("{} chunk(s) missing, {} bytes", r.missing_chunks.len(), r.missing_bytes)
            };
        })
        .await
    }

    async fn upload(
        &self,
        request: Request<tonic::Streaming<v1::UploadRequest>>,
    ) -> Result<Response<v1::UploadResponse>, Status> {
        let mut e = entry(&request, "Upload");
        let span = span_of(&e);
        let r = match self.fenced(&request) {
            Ok(()) => self.upload_inner(request, &mut e).instrument(span).await,
            Err(s) => Err(s),
        };
        self.done(e, r, |r, e| e.detail = format!("{} chunk(s), {} bytes", r.chunks_received, r.bytes_received)).await
    }

    type CommitStream = StepStream;
    async fn commit(&self, request: Request<v1::CommitRequest>) -> Result<Response<StepStream>, Status> {
        let r = request.get_ref();
        let mut e = Entry {
            app: r.app.clone(),
            release: r.stage_id.clone(),
            deployment: r.deployment_id.clone(),
            ..entry(&request, "Commit")
        };
        let span = span_of(&e);
        let r = match self.fenced(&request) {
            Ok(()) => self.commit_inner(request, &mut e).instrument(span).await,
            Err(s) => Err(s),
        };
        self.done(e, r, |_, _| {}).await
    }

    type ActivateStream = StepStream;
    async fn activate(&self, request: Request<v1::ActivateRequest>) -> Result<Response<StepStream>, Status> {
        let r = request.get_ref();
        let e = Entry {
            app: r.app.clone(),
            version: r.version.clone(),
            release: r.release_id.clone(),
            deployment: r.deployment_id.clone(),
            ..entry(&request, "Activate")
        };
        if let Err(s) = self.fenced(&request) {
            return self.done(e, Err(s), |_, _| {}).await;
        }
        self.plan_command(e, self.activate_inner(request)).await
    }

    type GetChunksStream = crate::peers::ChunkStream;
    async fn get_chunks(
        &self,
        request: Request<v1::GetChunksRequest>,
    ) -> Result<Response<crate::peers::ChunkStream>, Status> {
        let r = request.get_ref();
        let e = Entry { app: r.app.clone(), ..entry(&request, "GetChunks") };
        let n = r.hashes.len();
        let r = self.get_chunks_inner(request).instrument(span_of(&e)).await;
        self.done(e, r, |_, e| e.detail = format!("{n} chunk(s) asked for")).await
    }

    async fn fetch_from_peers(
        &self,
        request: Request<v1::FetchFromPeersRequest>,
    ) -> Result<Response<v1::FetchFromPeersResponse>, Status> {
        let fenced = self.fenced(&request);
        let r = request.get_ref();
        let e = Entry {
            app: r.app.clone(),
            release: r.stage_id.clone(),
            deployment: r.deployment_id.clone(),
            ..entry(&request, "FetchFromPeers")
        };
        let r = match fenced {
            Ok(()) => self.fetch_from_peers_inner(request).instrument(span_of(&e)).await,
            Err(s) => Err(s),
        };
        self.done(e, r, |r, e| {
            e.detail =
                format!("{} chunk(s), {} bytes from peers; {} peer(s) fell short", r.chunks, r.bytes, r.failures.len())
        })
        .await
    }

    type RollbackStream = StepStream;
    async fn rollback(&self, request: Request<v1::RollbackRequest>) -> Result<Response<StepStream>, Status> {
        let r = request.get_ref();
        let e = Entry {
            app: r.app.clone(),
            release: r.to_release.clone(),
            deployment: r.deployment_id.clone(),
            ..entry(&request, "Rollback")
        };
        if let Err(s) = self.fenced(&request) {
            return self.done(e, Err(s), |_, _| {}).await;
        }
        self.plan_command(e, self.rollback_inner(request)).await
    }
}

impl AgentService {
    /// Refuses a command of a lower coordinator epoch than this host follows (see
    /// [`crate::fence`]).
    fn fenced<T>(&self, request: &Request<T>) -> Result<(), Status> {
        self.fence.check(crate::fence::epoch_of(request)?)
    }

    /// With trusted keys: refuses a switch to `release_id` unless the signature kept with it
    /// verifies for its app, version and manifest (a release staged unsigned, or before signing
    /// was required, or changed on disk since).
    async fn check_signed(&self, app: &str, store: &AppStore, release_id: &str) -> Result<(), Status> {
        let trusted = &self.config.signing.trusted;
        if trusted.is_empty() {
            return Ok(());
        }
        let (s, id) = (store.clone(), release_id.to_string());
        let manifest = blocking(move || s.manifest(&id)).await?;
        let hash = ferry_proto::manifest::hash(&manifest);
        let version = crate::store::version_of(release_id);
        ferry_proto::signing::check(trusted, app, version, &hash, &store.signature(release_id))
            .map(|_| ())
            .map_err(|e| Status::permission_denied(format!("{e}; deploy it again from a coordinator that signs it")))
    }

    /// An Activate or Rollback: checked by `prepared`, then run as a plan of its own (recorded
    /// when it ends), or recorded at once when refused.
    async fn plan_command(
        &self,
        e: Entry,
        prepared: impl std::future::Future<Output = Result<(activate::Plan, Arc<tokio::sync::Mutex<()>>), Status>>,
    ) -> Result<Response<StepStream>, Status> {
        let span = span_of(&e);
        match prepared.instrument(span.clone()).await {
            Ok(plan) => self.spawn_plan(plan, e, span),
            Err(s) => self.done(e, Err(s), |_, _| {}).await,
        }
    }

    /// Records how a command ended (counter and audit line, durably), then hands its result back.
    async fn done<T>(
        &self,
        mut e: Entry,
        result: Result<Response<T>, Status>,
        describe: impl FnOnce(&T, &mut Entry),
    ) -> Result<Response<T>, Status> {
        let label = match &result {
            Ok(r) => {
                e.result = "ok".into();
                describe(r.get_ref(), &mut e);
                "ok".to_string()
            }
            Err(s) => {
                e.result = format!("error: {}", code_label(s.code()));
                e.detail = s.message().to_string();
                code_label(s.code())
            }
        };
        self.telemetry.metrics.inc(&metrics::REQUESTS, &[&e.rpc, &label]);
        self.telemetry.audit(e).await;
        result
    }

    async fn get_status_inner(
        &self,
        request: Request<v1::GetStatusRequest>,
    ) -> Result<Response<v1::HostStatus>, Status> {
        tracing::debug!(caller = caller(&request), "GetStatus");
        let config = self.config.clone();
        let name = self.name.clone();
        let status = tokio::task::spawn_blocking(move || facts::gather(&config, &name))
            .await
            .map_err(|e| Status::internal(format!("gathering host facts failed: {e}")))?;
        Ok(Response::new(status))
    }

    async fn list_releases_inner(
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

    async fn prepare_inner(
        &self,
        request: Request<v1::PrepareRequest>,
    ) -> Result<Response<v1::PrepareResponse>, Status> {
        let who = caller(&request);
        let req = request.into_inner();
        let (store, lock) = self.app(&req.app)?;
        let _guard = lock.lock().await;
        let (free, total) = facts::disk_space(&self.config.data_dir);
        let space = crate::store::DiskSpace { free, total };
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
        let trusted = &self.config.signing.trusted;
        if !trusted.is_empty() {
            let key = ferry_proto::signing::check(trusted, &req.app, &req.version, &req.manifest_hash, &req.signature)
                .map_err(|e| Status::permission_denied(e.to_string()))?;
            tracing::info!(key = key.name, "the release's signature verifies");
        }
        let version = req.version.clone();
        let stage =
            Stage { prepared: Instant::now(), deployment: req.deployment_id.clone(), version: req.version.clone() };
        let app = req.app.clone();
        let signature = req.signature;
        let p = {
            let store = store.clone();
            blocking(move || store.prepare(&version, source, &req.manifest_hash, space)).await?
        };
        if !signature.is_empty() {
            // Kept with the release, whether or not this host requires signatures yet: every
            // switch to the release checks it against the keys trusted then.
            let id = p.release_id.clone();
            blocking(move || store.keep_signature(&id, &signature)).await?;
        }
        if !p.already_present {
            self.stage_started(&app, &p.release_id, stage);
        }
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

    async fn upload_inner(
        &self,
        request: Request<tonic::Streaming<v1::UploadRequest>>,
        e: &mut Entry,
    ) -> Result<Response<v1::UploadResponse>, Status> {
        let who = caller(&request);
        let epoch = crate::fence::epoch_of(&request)?;
        let overtaken = self.fence.overtaken(epoch);
        tokio::pin!(overtaken);
        let mut stream = request.into_inner();
        let first = stream.message().await?.and_then(|m| m.msg);
        let Some(v1::upload_request::Msg::Start(start)) = first else {
            return Err(Status::invalid_argument("an upload must begin with a start message naming the app and stage"));
        };
        e.app = start.app.clone();
        e.release = start.stage_id.clone();
        if let Some(stage) = self.stage(&start.app, &start.stage_id) {
            (e.deployment, e.version) = (stage.deployment, stage.version);
        }
        let (store, lock) = self.app(&start.app)?;
        // A newer coordinator stops an upload of an older one, waiting or in progress.
        let _guard = tokio::select! {
            g = lock.lock() => g,
            s = &mut overtaken => return Err(s),
        };
        tracing::info!(caller = who, app = start.app, stage = start.stage_id, "Upload");
        let stage = start.stage_id.clone();
        let mut upload = blocking(move || store.upload(&stage)).await?;
        loop {
            let next = tokio::select! {
                m = stream.message() => m?,
                s = &mut overtaken => return Err(s),
            };
            let Some(msg) = next else { break };
            match msg.msg {
                Some(v1::upload_request::Msg::Chunk(chunk)) => {
                    let received = chunk.data.len() as f64;
                    upload = tokio::task::spawn_blocking(move || upload.put(&chunk).map(|()| upload))
                        .await
                        .map_err(|e| Status::internal(format!("worker failed: {e}")))?
                        .map_err(status_of)?;
                    self.telemetry.metrics.add(&metrics::RECEIVED_BYTES, &[&e.app], received);
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

    async fn get_chunks_inner(
        &self,
        request: Request<v1::GetChunksRequest>,
    ) -> Result<Response<crate::peers::ChunkStream>, Status> {
        let req = request.into_inner();
        if req.hashes.len() > crate::peers::MAX_HASHES {
            return Err(Status::invalid_argument(format!(
                "{} hashes asked for; at most {} at once",
                req.hashes.len(),
                crate::peers::MAX_HASHES
            )));
        }
        let (store, _) = self.app(&req.app)?;
        let permit = self.peer_slots.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "already serving {} peer(s) (agent.toml peer_uploads): fetch elsewhere",
                self.config.peer_uploads
            ))
        })?;
        let reader = blocking(move || store.chunk_reader()).await?;
        Ok(Response::new(crate::peers::serve_chunks(reader, req.hashes, permit, self.peer_pacer.clone())))
    }

    async fn fetch_from_peers_inner(
        &self,
        request: Request<v1::FetchFromPeersRequest>,
    ) -> Result<Response<v1::FetchFromPeersResponse>, Status> {
        let epoch = crate::fence::epoch_of(&request)?;
        let req = request.into_inner();
        let tls = crate::tls::peer_client_config(&self.config.tls)
            .map_err(|e| Status::failed_precondition(format!("cannot reach peers: {e}")))?;
        let (store, lock) = self.app(&req.app)?;
        let _guard = tokio::select! {
            g = lock.lock() => g,
            s = self.fence.overtaken(epoch) => return Err(s),
        };
        let stage = req.stage_id.clone();
        let upload = blocking(move || store.upload(&stage)).await?;
        let asked: Vec<Vec<u8>> = req.sources.iter().flat_map(|s| s.hashes.iter().cloned()).collect();
        let (upload, fetched) = tokio::select! {
            r = crate::peers::fetch(tls, &req.app, req.sources, upload) => r?,
            s = self.fence.overtaken(epoch) => return Err(s),
        };
        let still_missing: Vec<Vec<u8>> = asked.into_iter().filter(|h| !upload.has(h)).collect();
        tracing::info!(
            chunks = fetched.chunks,
            bytes = fetched.bytes,
            failures = fetched.failures.len(),
            "fetched from peers"
        );
        self.telemetry.metrics.add(&metrics::RECEIVED_BYTES, &[&req.app], fetched.bytes as f64);
        Ok(Response::new(v1::FetchFromPeersResponse {
            chunks: fetched.chunks,
            bytes: fetched.bytes,
            failures: fetched.failures,
            still_missing,
        }))
    }

    async fn commit_inner(
        &self,
        request: Request<v1::CommitRequest>,
        e: &mut Entry,
    ) -> Result<Response<StepStream>, Status> {
        let who = caller(&request);
        let req = request.into_inner();
        let (store, lock) = self.app(&req.app)?;
        let _guard = lock.lock().await;
        tracing::info!(caller = who, app = req.app, stage = req.stage_id, deployment = req.deployment_id, "Commit");
        let started = Instant::now();
        let stage = req.stage_id.clone();
        let facts = crate::store::HostFacts {
            host: req.host.clone(),
            address: req.address.clone(),
            secrets_dir: self.config.secrets_dir(&req.app),
        };
        let id = blocking(move || store.commit_on(&stage, &facts, |_, _| {})).await?;
        e.release = id.clone();
        if let Some(stage) = self.stage_finished(&req.app, &req.stage_id) {
            e.version = stage.version;
            let secs = stage.prepared.elapsed().as_secs_f64();
            self.telemetry.metrics.observe(&metrics::STAGE_SECONDS, &[&req.app], secs);
        }
        let mut done = event(v1::Step::Promote, v1::StepState::Succeeded, started, format!("release {id} is on disk"));
        done.step_ms = done.elapsed_ms;
        done.r#final = Some(v1::Final { outcome: v1::Outcome::Committed as i32, release_id: id, ..Default::default() });
        Ok(Response::new(stream_of(vec![done])))
    }

    async fn activate_inner(
        &self,
        request: Request<v1::ActivateRequest>,
    ) -> Result<(activate::Plan, Arc<tokio::sync::Mutex<()>>), Status> {
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
        self.check_signed(&req.app, &store, &req.release_id).await?;
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
            secrets: req.secrets,
        };
        Ok((plan, lock))
    }

    async fn rollback_inner(
        &self,
        request: Request<v1::RollbackRequest>,
    ) -> Result<(activate::Plan, Arc<tokio::sync::Mutex<()>>), Status> {
        let who = caller(&request);
        let req = request.into_inner();
        let (store, lock) = self.app(&req.app)?;
        self.check_units(&req.app, &req.units)?;
        if !req.to_release.is_empty() && !store.has_release(&req.to_release) {
            return Err(Status::not_found(format!("release {} is not kept on this host", req.to_release)));
        }
        let target = if req.to_release.is_empty() {
            let s = store.clone();
            blocking(move || s.previous()).await?
        } else {
            Some(req.to_release.clone())
        };
        if let Some(target) = target {
            self.check_signed(&req.app, &store, &target).await?;
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
            // The release gone back to kept its own (a rollback brings none).
            secrets: Vec::new(),
        };
        Ok((plan, lock))
    }

    /// Remembers a stage when it is first prepared.
    fn stage_started(&self, app: &str, id: &str, stage: Stage) {
        let mut stages = self.stages.lock().unwrap_or_else(|p| p.into_inner());
        if stages.len() >= MAX_STAGES
            && let Some(oldest) = stages.iter().min_by_key(|(_, s)| s.prepared).map(|(k, _)| k.clone())
        {
            stages.remove(&oldest);
        }
        stages.insert((app.to_string(), id.to_string()), stage);
    }

    fn stage(&self, app: &str, id: &str) -> Option<Stage> {
        self.stages.lock().unwrap_or_else(|p| p.into_inner()).get(&(app.to_string(), id.to_string())).cloned()
    }

    /// The stage now committed (unknown if this agent did not see its Prepare).
    fn stage_finished(&self, app: &str, id: &str) -> Option<Stage> {
        self.stages.lock().unwrap_or_else(|p| p.into_inner()).remove(&(app.to_string(), id.to_string()))
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
    /// refused instead. Its audit line and metrics are recorded when it ends.
    fn spawn_plan(
        &self,
        (plan, lock): (activate::Plan, Arc<tokio::sync::Mutex<()>>),
        mut e: Entry,
        span: tracing::Span,
    ) -> Result<Response<StepStream>, Status> {
        let metrics = &self.telemetry.metrics;
        if self.activations.stopping.is_cancelled() {
            metrics.inc(&metrics::REQUESTS, &[&e.rpc, &code_label(tonic::Code::Unavailable)]);
            let telemetry = self.telemetry.clone();
            e.result = "refused".into();
            e.detail = Activations::refusal().message().to_string();
            tokio::spawn(async move { telemetry.audit(e).await });
            return Err(Activations::refusal());
        }
        metrics.inc(&metrics::REQUESTS, &[&e.rpc, "ok"]);
        metrics.add(&metrics::IN_PROGRESS, &[], 1.0);
        let (tx, rx) = tokio::sync::mpsc::channel(32);
        let config = self.config.clone();
        let stopping = self.activations.stopping.clone();
        let telemetry = self.telemetry.clone();
        self.activations.tasks.spawn(
            async move {
                let _guard = lock.lock().await;
                let app = plan.app.clone();
                let requested_rollback = e.rpc == "Rollback";
                let started = Instant::now();
                let ended = if stopping.is_cancelled() {
                    tracing::info!(app = plan.app, deployment = plan.deployment_id, "refused: the agent is stopping");
                    let _ = tx.send(Err(Activations::refusal())).await;
                    activate::Ended { result: Err(Activations::refusal()), probe_failures: 0 }
                } else {
                    activate::run(config, plan, tx).await
                };
                record_plan(&telemetry, &mut e, &app, requested_rollback, started, &ended);
                telemetry.metrics.add(&metrics::IN_PROGRESS, &[], -1.0);
                telemetry.audit(e).await;
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

/// Counts an ended activation or rollback and completes its audit record.
fn record_plan(
    telemetry: &Telemetry,
    e: &mut Entry,
    app: &str,
    requested_rollback: bool,
    started: Instant,
    ended: &activate::Ended,
) {
    let m = &telemetry.metrics;
    let outcome = match &ended.result {
        Ok(fin) => {
            e.release = fin.release_id.clone();
            e.detail = fin.cause.clone();
            match v1::Outcome::try_from(fin.outcome) {
                Ok(v1::Outcome::Healthy) => "healthy",
                Ok(v1::Outcome::Unchanged) => "unchanged",
                Ok(v1::Outcome::RolledBack) => "rolled_back",
                _ => "failed",
            }
        }
        Err(s) => {
            e.detail = s.message().to_string();
            "refused"
        }
    };
    e.result = outcome.to_string();
    m.add(&metrics::PROBE_FAILURES, &[app], f64::from(ended.probe_failures));
    if requested_rollback {
        // A rollback that switched the host (its "healthy" is the earlier release, running).
        if outcome == "healthy" {
            m.inc(&metrics::ROLLBACKS, &[app, "requested"]);
        }
    } else {
        m.inc(&metrics::ACTIVATIONS, &[app, outcome]);
        if outcome == "rolled_back" {
            m.inc(&metrics::ROLLBACKS, &[app, "automatic"]);
        }
    }
    if outcome != "refused" {
        m.observe(&metrics::ACTIVATE_SECONDS, &[app, outcome], started.elapsed().as_secs_f64());
    }
}
