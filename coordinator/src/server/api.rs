//! The API's routes and handlers. Every answer is JSON; every refusal is
//! `{"error": CODE, "message": TEXT}` with a 4xx status that says whose fault it is.
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::{StatusCode, request::Parts};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::auth::{AuditNote, Identity};
pub use super::error::ApiError;
use super::jobs::{self, Op};
use super::{Shared, smoke};
use crate::commands::promote;
use crate::config::Permission;
use crate::config::SmokeCheck;
use crate::state::DeploymentStatus;

/// A JSON body; a malformed one is a 400 that says where.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::bad_request("unreadable_body", e.body_text()))?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// An optional JSON body: empty means the defaults.
pub struct OptionalJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for OptionalJson<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::bad_request("unreadable_body", e.body_text()))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(T::default()));
        }
        parse_json(&bytes).map(OptionalJson)
    }
}

fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        let what = if e.is_syntax() || e.is_eof() { "malformed JSON" } else { "invalid request" };
        ApiError::bad_request("invalid_json", format!("{what}: {e}"))
    })
}

/// Query parameters; a bad one is a 400 in JSON.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| ApiQuery(q))
            .map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))
    }
}

/// A path parameter; one that does not decode is a 400 in JSON.
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(p)| ApiPath(p))
            .map_err(|e| ApiError::bad_request("invalid_path", e.body_text()))
    }
}

type ApiResult = Result<Response, ApiError>;

/// A JSON answer that names `deployment` in the audit log.
fn noted(status: StatusCode, deployment: &str, body: Value) -> Response {
    let mut resp = (status, Json(body)).into_response();
    resp.extensions_mut().insert(AuditNote(deployment.to_string()));
    resp
}

/// Every route: method, path, the role it needs beyond reading (None: any authenticated caller),
/// handler. The router and the OpenAPI test both read this table.
pub fn routes() -> Vec<(&'static str, &'static str, Option<Permission>, MethodRouter<Shared>)> {
    use Permission::*;
    vec![
        ("GET", "/api/openapi.json", None, get(openapi)),
        ("GET", "/api/v1/health", None, get(health)),
        ("POST", "/api/v1/artifacts", Some(Deploy), post(upload_artifact)),
        ("POST", "/api/v1/versions", Some(Deploy), post(register_version)),
        ("GET", "/api/v1/versions", None, get(list_versions)),
        ("GET", "/api/v1/versions/{version}", None, get(get_version)),
        ("GET", "/api/v1/environments", None, get(list_environments)),
        ("GET", "/api/v1/environments/{environment}/status", None, get(environment_status)),
        ("POST", "/api/v1/environments/{environment}/rollback", Some(Rollback), post(rollback)),
        ("POST", "/api/v1/deployments", Some(Deploy), post(create_deployment)),
        ("GET", "/api/v1/deployments", None, get(list_deployments)),
        ("GET", "/api/v1/deployments/{id}", None, get(get_deployment)),
        ("GET", "/api/v1/deployments/{id}/events", None, get(deployment_events)),
        ("POST", "/api/v1/deployments/{id}/smoke", Some(Deploy), post(run_smoke)),
        ("POST", "/api/v1/deployments/{id}/approve", Some(Approve), post(approve)),
        ("POST", "/api/v1/deployments/{id}/promote", Some(Promote), post(promote)),
        ("POST", "/api/v1/deployments/{id}/continue", Some(Deploy), post(continue_canary)),
        ("POST", "/api/v1/deployments/{id}/resume", Some(Deploy), post(resume)),
        ("POST", "/api/v1/deployments/{id}/cancel", Some(Cancel), post(cancel)),
        ("GET", "/api/v1/report", None, get(report)),
    ]
}

pub fn router(state: Shared) -> Router {
    let mut router = Router::new();
    for (_, path, needs, handler) in routes() {
        let handler = match needs {
            Some(p) => {
                handler.route_layer(axum::middleware::from_fn(move |req, next| super::auth::require(p, req, next)))
            }
            None => handler,
        };
        router = router.route(path, handler);
    }
    router
        .fallback(|| async { ApiError::not_found("no_route", "no such API route (see /api/openapi.json)") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "this route does not take that method")
        })
        .layer(axum::middleware::from_fn_with_state(state.clone(), leader_only))
        .layer(axum::middleware::from_fn_with_state(state.clone(), super::auth::authenticate))
        // JSON bodies are small; the upload streams its body and checks its own limit.
        .layer(axum::extract::DefaultBodyLimit::max(1 << 20))
        .with_state(state)
}

async fn openapi() -> Json<Value> {
    Json(super::openapi::document())
}

async fn health(State(state): State<Shared>) -> Json<Value> {
    // `app`: the fleet's app when it has one (null when it has several: see `apps`).
    let app = (state.apps.len() == 1).then(|| state.config.app.name.clone());
    let l = &state.leadership;
    Json(json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "app": app,
        "apps": state.config.app_names(),
        "role": l.role(),
        "epoch": l.epoch(),
        "leader": l.leader_address(),
    }))
}

/// A standby takes reads only: every other call is answered 503 with the leader's address.
async fn leader_only(
    State(state): State<Shared>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let read = matches!(*req.method(), axum::http::Method::GET | axum::http::Method::HEAD);
    if read || state.leadership.is_leader() {
        return next.run(req).await;
    }
    let leader = state.leadership.leader_address();
    let message = match &leader {
        Some(a) => format!("this ferry serve is a standby; the leader is {a}: send writes there (--server {a})"),
        None => "this ferry serve is a standby and no leader holds the lease yet: retry in a few seconds".into(),
    };
    let body = json!({ "error": "not_leader", "message": message, "leader": leader });
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

fn environment<'a>(
    state: &'a Shared,
    env: &str,
    status: StatusCode,
) -> Result<&'a crate::config::Environment, ApiError> {
    state.config.environments.get(env).ok_or_else(|| {
        let known: Vec<&str> = state.config.environments.keys().map(String::as_str).collect();
        ApiError::new(
            status,
            "unknown_environment",
            format!("unknown environment {env:?} (fleet.toml declares: {})", known.join(", ")),
        )
    })
}

/// `POST /api/v1/artifacts`: the body is a .tar, .tar.gz or .tar.zst archive; it is stored
/// content-addressed in the artifacts directory (temp file, fsync, rename, fsync the directory).
async fn upload_artifact(State(state): State<Shared>, body: Body) -> ApiResult {
    let dir = state.artifacts_dir.clone();
    let limit = state.config.server.max_upload_bytes;
    let tmp = tempfile::NamedTempFile::new_in(&dir)
        .map_err(|e| ApiError::internal(format!("artifacts directory {}: {e}", dir.display())))?;
    let mut file = tokio::fs::File::from_std(
        tmp.reopen().map_err(|e| ApiError::internal(format!("artifacts directory {}: {e}", dir.display())))?,
    );
    let mut hasher = blake3::Hasher::new();
    let mut head = Vec::with_capacity(512);
    let mut size: u64 = 0;
    let mut body = body.into_data_stream();
    use futures_util::StreamExt;
    use tokio::io::AsyncWriteExt;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_request("upload_failed", format!("reading the upload: {e}")))?;
        size += chunk.len() as u64;
        if size > limit {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("the upload is over [server] max_upload_bytes ({limit} bytes)"),
            ));
        }
        if head.len() < 512 {
            head.extend_from_slice(&chunk[..chunk.len().min(512 - head.len())]);
            if head.len() >= 262 && archive_kind(&head).is_none() {
                return Err(not_an_archive());
            }
        }
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(|e| ApiError::internal(format!("storing the upload: {e}")))?;
    }
    let ext = archive_kind(&head).ok_or_else(not_an_archive)?;
    // flush: tokio's File writes in the background, and only flush reports a failed write (a
    // full disk) of the last chunk.
    file.flush().await.map_err(|e| ApiError::internal(format!("storing the upload: {e}")))?;
    file.sync_all().await.map_err(|e| ApiError::internal(format!("storing the upload: {e}")))?;
    drop(file);
    let digest = hasher.finalize().to_hex().to_string();
    let path = dir.join(format!("{digest}.{ext}"));
    tmp.persist(&path)
        .map_err(|e| ApiError::internal(format!("storing the upload as {}: {}", path.display(), e.error)))?;
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| ApiError::internal(format!("fsync {}: {e}", dir.display())))?;
    Ok((StatusCode::CREATED, Json(json!({ "artifact": path, "bytes": size, "blake3": digest }))).into_response())
}

fn not_an_archive() -> ApiError {
    ApiError::bad_request("not_an_archive", "the upload is not a .tar, .tar.gz or .tar.zst archive")
}

/// The archive format from its first bytes: gzip, zstd, or a tar header ("ustar" at 257).
fn archive_kind(head: &[u8]) -> Option<&'static str> {
    if head.starts_with(&[0x1f, 0x8b]) {
        Some("tar.gz")
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Some("tar.zst")
    } else if head.len() >= 262 && &head[257..262] == b"ustar" {
        Some("tar")
    } else {
        None
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterRequest {
    /// The app it is a build of (needed when fleet.toml declares several).
    #[serde(default)]
    app: Option<String>,
    version: String,
    /// A path on the coordinator: a directory or archive, or what `POST /api/v1/artifacts` returned.
    artifact: PathBuf,
    #[serde(default)]
    metadata: serde_json::Map<String, Value>,
}

/// `POST /api/v1/versions`: scans the artifact and records the version. Registering the same
/// version with the same content again answers 200 with the existing record.
async fn register_version(
    State(state): State<Shared>,
    Extension(who): Extension<Identity>,
    ApiJson(req): ApiJson<RegisterRequest>,
) -> ApiResult {
    ferry_proto::manifest::check_version(&req.version)
        .map_err(|e| ApiError::bad_request("invalid_version", format!("version {:?}: {e}", req.version)))?;
    let app = state.app(req.app.as_deref())?.clone();
    if !req.artifact.is_absolute() {
        return Err(ApiError::bad_request(
            "invalid_artifact",
            format!("artifact {:?} must be an absolute path on the coordinator", req.artifact),
        ));
    }
    // The canonical path is checked, scanned and recorded: a symlink swapped afterwards does not
    // lead the server elsewhere.
    let real = std::fs::canonicalize(&req.artifact)
        .map_err(|e| ApiError::unprocessable("bad_artifact", format!("artifact {}: {e}", req.artifact.display())))?;
    if !state.artifact_roots.iter().any(|root| real.starts_with(root)) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "artifact_outside_roots",
            format!(
                "artifact {} is not under a directory the server takes artifacts from (its uploads, {}, and [server] artifact_roots); upload it with POST /api/v1/artifacts",
                req.artifact.display(),
                state.artifacts_dir.display()
            ),
        ));
    }
    if req.metadata.values().any(|v| v.is_object() || v.is_array())
        || Value::Object(req.metadata.clone()).to_string().len() > 16 * 1024
    {
        return Err(ApiError::bad_request(
            "invalid_metadata",
            "metadata must be an object of strings, numbers or booleans, at most 16 KiB",
        ));
    }
    let scanned = one_scan_at_a_time(&state, {
        let (path, cache, limit) = (real.clone(), state.cache.clone(), state.config.max_artifact_bytes);
        let layout = crate::artifact::Layout::of(&app.app);
        async move { crate::artifact::scan(&path, cache.as_ref(), &layout, limit).await }
    })
    .await?;
    let artifact = scanned
        .map_err(|e| ApiError::unprocessable("bad_artifact", format!("artifact {}: {e}", req.artifact.display())))?;
    let row = crate::registry::VersionRow {
        app: app.app.name.clone(),
        version: req.version.clone(),
        artifact: real.to_string_lossy().into_owned(),
        // A version is its build; each environment's release adds the app's layout to it.
        release_id: ferry_proto::manifest::release_id(&req.version, &artifact.build_hash),
        manifest_hash: hex::encode(artifact.build_hash),
        total_bytes: i64::try_from(artifact.total_bytes).unwrap_or(i64::MAX),
        files: i64::try_from(artifact.manifest.entries.len()).unwrap_or(i64::MAX),
        registered_by: who.0.clone(),
        registered_ms: crate::registry::now_ms(),
        metadata: req.metadata,
    };
    match state.registry.register_version(&row)? {
        None => Ok((StatusCode::CREATED, Json(json!(row))).into_response()),
        Some(existing) if existing.manifest_hash == row.manifest_hash => {
            Ok((StatusCode::OK, Json(json!(existing))).into_response())
        }
        Some(existing) => Err(ApiError::conflict(
            "version_exists",
            format!(
                "version {} of {} is already registered with other content (by {}, from {}); register the new build as a new version",
                existing.version, existing.app, existing.registered_by, existing.artifact
            ),
        )),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    environment: Option<String>,
    app: Option<String>,
    limit: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct VersionsQuery {
    app: Option<String>,
    limit: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AppQuery {
    app: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvironmentQuery {
    environment: Option<String>,
    app: Option<String>,
}

async fn list_versions(State(state): State<Shared>, ApiQuery(q): ApiQuery<VersionsQuery>) -> ApiResult {
    let rows = state.registry.versions(state.app_filter(q.app.as_deref())?, q.limit.unwrap_or(50).min(1000))?;
    Ok(Json(json!({ "versions": rows })).into_response())
}

async fn get_version(
    State(state): State<Shared>,
    ApiPath(version): ApiPath<String>,
    ApiQuery(q): ApiQuery<AppQuery>,
) -> ApiResult {
    let app = &state.app(q.app.as_deref())?.app.name;
    let row = state.registry.version(app, &version)?.ok_or_else(|| {
        ApiError::not_found("unknown_version", format!("version {version:?} of {app} is not registered"))
    })?;
    Ok(Json(json!(row)).into_response())
}

async fn list_environments(State(state): State<Shared>) -> ApiResult {
    let mut envs = Vec::new();
    for (name, e) in &state.config.environments {
        let lock = state.registry.lock_of(name)?;
        let latest = state.registry.latest_deployment(name, None)?;
        let mut apps = Vec::new();
        for (app, view) in &state.apps {
            let hosts: Vec<&String> = view.environments.get(name).map(|v| v.hosts.keys().collect()).unwrap_or_default();
            let latest = state.registry.latest_deployment(name, Some(app))?;
            apps.push(json!({ "name": app, "hosts": hosts, "latest_deployment": latest }));
        }
        envs.push(json!({
            "name": name,
            "hosts": e.hosts.keys().collect::<Vec<_>>(),
            "apps": apps,
            "strategy": e.strategy_name,
            "promotion_index": state.config.promotion.iter().position(|p| p == name),
            "next_environment": state.config.next_environment(name),
            "require_approval": e.require_approval,
            "smoke_checks": e.smoke.len(),
            "locked_by": lock.map(|l| l.deployment_id),
            "latest_deployment": latest,
        }));
    }
    Ok(Json(json!({ "environments": envs, "promotion": state.config.promotion })).into_response())
}

async fn environment_status(State(state): State<Shared>, ApiPath(env): ApiPath<String>) -> ApiResult {
    environment(&state, &env, StatusCode::NOT_FOUND)?;
    let report = crate::commands::status::run(&state.config, &env, &state.tls.current().agents)
        .await
        .map_err(|e| ApiError::internal(format!("{e:#}")))?;
    Ok(Json(json!(report)).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackRequest {
    /// The app to roll back (needed when fleet.toml declares several).
    app: Option<String>,
    to: Option<String>,
}

async fn rollback(
    State(state): State<Shared>,
    Extension(who): Extension<Identity>,
    ApiPath(env): ApiPath<String>,
    OptionalJson(req): OptionalJson<RollbackRequest>,
) -> ApiResult {
    environment(&state, &env, StatusCode::NOT_FOUND)?;
    if let Some(v) = &req.to {
        ferry_proto::manifest::check_version(v)
            .map_err(|e| ApiError::bad_request("invalid_version", format!("to {v:?}: {e}")))?;
    }
    let app = state.app(req.app.as_deref())?.clone();
    let id = jobs::start(&state, &app, &env, &who.0, None, Op::Rollback { to: req.to }).await?;
    Ok(accepted(&id, &env))
}

/// 202 with where to follow the deployment.
fn accepted(id: &str, env: &str) -> Response {
    noted(
        StatusCode::ACCEPTED,
        id,
        json!({
            "deployment_id": id,
            "environment": env,
            "status_url": format!("/api/v1/deployments/{id}"),
            "events_url": format!("/api/v1/deployments/{id}/events"),
        }),
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeploymentRequest {
    /// The app to deploy (needed when fleet.toml declares several).
    #[serde(default)]
    app: Option<String>,
    environment: String,
    version: String,
    /// Stage every host before the first activation (default true).
    #[serde(default)]
    prestage: Option<bool>,
    /// Start outside the environment's deploy windows or in a freeze, for this reason.
    #[serde(default)]
    override_window: Option<String>,
}

/// `POST /api/v1/deployments`: a registered version to an environment. An environment past the
/// first of `promotion` only receives versions promoted from the one before it.
async fn create_deployment(
    State(state): State<Shared>,
    Extension(who): Extension<Identity>,
    ApiJson(req): ApiJson<DeploymentRequest>,
) -> ApiResult {
    environment(&state, &req.environment, StatusCode::UNPROCESSABLE_ENTITY)?;
    let app = state.app(req.app.as_deref())?.clone();
    let version = state.registry.version(&app.app.name, &req.version)?.ok_or_else(|| {
        ApiError::unprocessable(
            "version_not_registered",
            format!("version {:?} of {} is not registered: POST /api/v1/versions first", req.version, app.app.name),
        )
    })?;
    if let Some(i) = state.config.promotion.iter().position(|e| *e == req.environment)
        && i > 0
    {
        let before = &state.config.promotion[i - 1];
        return Err(ApiError::conflict(
            "promotion_required",
            format!(
                "{} comes after {before} in `promotion`: deploy {} to {before}, then promote that deployment (POST /api/v1/deployments/ID/promote)",
                req.environment, req.version
            ),
        ));
    }
    let how =
        Start { promoted_from: None, prestage: req.prestage.unwrap_or(true), override_window: req.override_window };
    let (id, overridden) = start_deploy(&state, &app, &req.environment, &version, &who, how).await?;
    Ok(with_override(accepted(&id, &req.environment), overridden))
}

/// Runs `scan` as the only scan of this server: in a task of its own that keeps the server's scan
/// permit until the scan ends, even if the caller goes away.
async fn one_scan_at_a_time<T: Send + 'static>(
    state: &Shared,
    scan: impl Future<Output = T> + Send + 'static,
) -> Result<T, ApiError> {
    let permit =
        state.scans.clone().acquire_owned().await.map_err(|_| ApiError::internal("the scan queue is closed"))?;
    tokio::spawn(async move {
        let _permit = permit;
        scan.await
    })
    .await
    .map_err(|e| ApiError::internal(format!("the scan failed: {e}")))
}

/// How a deployment of the API starts.
struct Start {
    /// The deployment it is promoted from.
    promoted_from: Option<String>,
    prestage: bool,
    /// The reason given to start outside the environment's deploy windows.
    override_window: Option<String>,
}

/// The audit log records a window override with the call.
fn with_override(mut resp: Response, overridden: Option<String>) -> Response {
    if let Some(note) = overridden {
        resp.extensions_mut().insert(super::auth::AuditOverride(note));
    }
    resp
}

/// Scans the artifact again (it must still be what was registered) and starts the deployment;
/// its id, and the window override it was started with.
async fn start_deploy(
    state: &Shared,
    app: &Arc<crate::config::FleetConfig>,
    env: &str,
    version: &crate::registry::VersionRow,
    who: &Identity,
    how: Start,
) -> Result<(String, Option<String>), ApiError> {
    let overridden = crate::commands::deploy::window(app, env, how.override_window.as_deref())?;
    // Before the scan (which may take a while); the job table checks again when it starts.
    if state.jobs.running_in(env).is_some() {
        return Err(ApiError::conflict(
            "environment_busy",
            format!("environment {env} is busy with a deployment of this server"),
        ));
    }
    let scanned = one_scan_at_a_time(state, {
        let (cache, limit, v) = (state.cache.clone(), state.config.max_artifact_bytes, version.clone());
        let layout = crate::artifact::Layout::for_env(app, env);
        async move {
            crate::artifact::rescan(
                std::path::Path::new(&v.artifact),
                cache.as_ref(),
                &layout,
                limit,
                &v.release_id,
                (crate::artifact::Recorded::Build, &v.manifest_hash),
            )
            .await
        }
    })
    .await?;
    let artifact = scanned.map_err(|e| {
        let mut api = ApiError::from(e);
        api.message = format!("version {}: {}", version.version, api.message);
        api
    })?;
    let secrets = crate::secrets::fetch(app, env)
        .await
        .map_err(|e| ApiError::unprocessable("secret_unavailable", e.to_string()))?;
    let op = Op::Deploy {
        artifact: Arc::new(artifact.with_secrets(secrets)),
        version: version.version.clone(),
        prestage: how.prestage,
    };
    let id = jobs::start(state, app, env, &who.0, how.promoted_from, op).await?;
    if let Some(note) = &overridden
        && let Err(e) = crate::commands::deploy::record_override(state.registry.as_ref(), &id, &who.0, note)
    {
        tracing::error!("deployment {id}: cannot record its window override: {e}");
    }
    Ok((id, overridden))
}

async fn list_deployments(State(state): State<Shared>, ApiQuery(q): ApiQuery<ListQuery>) -> ApiResult {
    if let Some(env) = &q.environment {
        environment(&state, env, StatusCode::UNPROCESSABLE_ENTITY)?;
    }
    let app = state.app_filter(q.app.as_deref())?;
    let rows = state.registry.history(q.environment.as_deref(), app, q.limit.unwrap_or(20).min(1000))?;
    let mut list: Vec<Value> = rows.into_iter().map(|d| json!(d)).collect();
    for v in &mut list {
        if let Some(o) = v.as_object_mut() {
            o.remove("strategy");
        }
    }
    Ok(Json(json!({ "deployments": list })).into_response())
}

/// A deployment as the API shows it: the CLI's JSON report, with each host's recorded state, the
/// registry's status, who asked, its smoke runs, approvals and recorded events (every host step).
pub fn view(state: &Shared, id: &str) -> Result<Value, ApiError> {
    let reg = state.registry.as_ref();
    let d = reg
        .deployment(id)?
        .ok_or_else(|| ApiError::not_found("unknown_deployment", format!("no deployment {id:?}")))?;
    let rows = reg.hosts(id)?;
    let smoke = reg.smoke_runs(id)?;
    let approvals = reg.approvals(id)?;
    let mut v = crate::commands::history::recorded(reg, d.clone(), rows.clone())?;
    if let Some(hosts) = v.get_mut("hosts").and_then(Value::as_array_mut) {
        for (h, row) in hosts.iter_mut().zip(&rows) {
            if let Some(o) = h.as_object_mut() {
                o.insert("state".into(), json!(row.state));
                o.insert("batch".into(), json!(row.batch));
            }
        }
    }
    let running = state.jobs.get(id).is_some_and(|j| !j.done());
    if let Some(o) = v.as_object_mut() {
        o.insert("requested_by".into(), json!(d.requested_by));
        o.insert("promoted_from".into(), json!(d.promoted_from));
        o.insert("next_environment".into(), json!(state.config.next_environment(&d.environment)));
        o.insert("smoke".into(), json!(smoke));
        o.insert("approvals".into(), json!(approvals));
        o.insert("running_here".into(), json!(running));
    }
    Ok(v)
}

async fn get_deployment(State(state): State<Shared>, ApiPath(id): ApiPath<String>) -> ApiResult {
    let v = view(&state, &id)?;
    Ok(noted(StatusCode::OK, &id, v))
}

/// Whether a deployment still moves: the registry says pending/running and, if this server runs
/// it, its task has not ended.
fn settled(state: &Shared, id: &str, status: Option<DeploymentStatus>, env: &str) -> bool {
    match state.jobs.get(id) {
        Some(job) => job.done(),
        None if matches!(status, Some(DeploymentStatus::Pending | DeploymentStatus::Running)) => {
            !run_elsewhere(state, id, env)
        }
        None => true,
    }
}

/// A coordinator process other than this server still runs deployment `id` (it holds the lock,
/// and its process exists).
fn run_elsewhere(state: &Shared, id: &str, env: &str) -> bool {
    matches!(state.registry.lock_of(env), Ok(Some(lock)) if lock.deployment_id == id && !lock.stale())
}

/// `GET /api/v1/deployments/{id}/events`: server-sent events. `line` (a progress line of a
/// deployment this server runs), `event` (a recorded event: host states, pauses, switches), and
/// last `end` with the deployment as `GET /api/v1/deployments/{id}` shows it.
async fn deployment_events(State(state): State<Shared>, ApiPath(id): ApiPath<String>) -> Result<Response, ApiError> {
    view(&state, &id)?;
    struct Follow {
        state: Shared,
        id: String,
        seq: i64,
        line: usize,
        queue: std::collections::VecDeque<Event>,
        ended: bool,
    }
    let start = Follow { state, id: id.clone(), seq: 0, line: 0, queue: Default::default(), ended: false };
    let stream = futures_util::stream::unfold(start, |mut f| async move {
        loop {
            if let Some(e) = f.queue.pop_front() {
                return Some((Ok::<Event, Infallible>(e), f));
            }
            if f.ended {
                return None;
            }
            let job = f.state.jobs.get(&f.id);
            let changed = job.as_ref().map(|j| j.changed.notified());
            let row = f.state.registry.deployment(&f.id).ok().flatten();
            let (status, env) = row.map(|d| (Some(d.status), d.environment)).unwrap_or_default();
            let done = settled(&f.state, &f.id, status, &env);
            if let Some(job) = &job {
                for line in job.lines_from(f.line) {
                    f.line += 1;
                    f.queue.push_back(Event::default().event("line").json_data(line).unwrap_or_default());
                }
            }
            for e in f.state.registry.events_since(&f.id, f.seq).unwrap_or_default() {
                f.seq = e.seq;
                f.queue
                    .push_back(Event::default().event("event").id(e.seq.to_string()).json_data(e).unwrap_or_default());
            }
            if !f.queue.is_empty() {
                continue;
            }
            if done {
                let end = view(&f.state, &f.id).unwrap_or_else(|e| json!({ "error": e.code, "message": e.message }));
                f.queue.push_back(Event::default().event("end").json_data(end).unwrap_or_default());
                f.ended = true;
                continue;
            }
            match changed {
                Some(changed) => {
                    let _ = tokio::time::timeout(Duration::from_millis(500), changed).await;
                }
                None => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    });
    let mut resp = Sse::new(stream).keep_alive(KeepAlive::default()).into_response();
    resp.extensions_mut().insert(AuditNote(id));
    Ok(resp)
}

fn deployment_row(state: &Shared, id: &str) -> Result<crate::registry::DeploymentRow, ApiError> {
    state
        .registry
        .deployment(id)?
        .ok_or_else(|| ApiError::not_found("unknown_deployment", format!("no deployment {id:?}")))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SmokeRequest {
    /// Checks to run instead of the environment's `smoke`.
    checks: Option<Vec<SmokeCheck>>,
}

/// `POST /api/v1/deployments/{id}/smoke`: runs the smoke checks against the deployment's hosts
/// and records the run. 200 either way; `passed` says how it went.
async fn run_smoke(
    State(state): State<Shared>,
    Extension(who): Extension<Identity>,
    ApiPath(id): ApiPath<String>,
    OptionalJson(req): OptionalJson<SmokeRequest>,
) -> ApiResult {
    let d = deployment_row(&state, &id)?;
    if !matches!(d.status, DeploymentStatus::Succeeded | DeploymentStatus::Paused) {
        return Err(ApiError::conflict(
            "not_deployed",
            format!("deployment {id} is {}: smoke tests run against a succeeded (or paused) deployment", d.status),
        ));
    }
    let env = environment(&state, &d.environment, StatusCode::CONFLICT)?;
    let env_checks = req.checks.is_none();
    let checks = req.checks.unwrap_or_else(|| env.smoke.clone());
    if checks.is_empty() {
        return Err(ApiError::unprocessable(
            "no_smoke_checks",
            format!(
                "environment {} has no smoke checks: add [[environments.{}.smoke]] to fleet.toml, or send `checks`",
                d.environment, d.environment
            ),
        ));
    }
    let mut problems = Vec::new();
    for (i, c) in checks.iter().enumerate() {
        c.problems(&format!("checks[{i}]"), &mut problems);
        // Checks from the request only reach the deployment's own hosts: the API is not a way
        // to make the coordinator fetch any URL.
        if !env_checks && !smoke::targets_the_host(&c.url) {
            problems.push(ferry_proto::config_file::Problem::new(
                format!("checks[{i}].url"),
                "a check sent with the request must target the deployment's hosts: its address must be {host} or {host}:PORT, e.g. http://{host}:8080/health",
            ));
        }
        if c.timeout > Duration::from_secs(60) {
            problems
                .push(ferry_proto::config_file::Problem::new(format!("checks[{i}].timeout"), "must be at most 60s"));
        }
    }
    if !problems.is_empty() {
        let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
        return Err(ApiError::bad_request("invalid_checks", text.join("; ")));
    }
    let rows = state.registry.hosts(&id)?;
    let hosts: Vec<crate::config::Host> = state
        .app_of(&d)?
        .hosts(&d.environment)
        .unwrap_or_default()
        .into_iter()
        .filter(|h| rows.iter().any(|r| r.host == h.name))
        .collect();
    let started_ms = crate::registry::now_ms();
    let results = smoke::run(&checks, &hosts).await;
    // No result (a {host} check and no host) proves nothing: not a pass.
    let passed = !results.is_empty() && results.iter().all(|r| r.passed);
    let mut run = crate::registry::SmokeRun {
        id: 0,
        deployment_id: id.clone(),
        run_by: who.0.clone(),
        started_ms,
        finished_ms: crate::registry::now_ms(),
        passed,
        results: json!(results),
        env_checks,
    };
    run.id = state.registry.record_smoke(&run)?;
    Ok(noted(StatusCode::OK, &id, json!(run)))
}

/// `POST /api/v1/deployments/{id}/approve`: approves promoting the deployment's version to the
/// next environment (needed where that environment has `require_approval`).
async fn approve(
    State(state): State<Shared>,
    Extension(who): Extension<Identity>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult {
    let d = deployment_row(&state, &id)?;
    let next = promote::approve(state.app_of(&d)?, state.registry.as_ref(), &d, &who.0)?;
    Ok(noted(
        StatusCode::CREATED,
        &id,
        json!({ "deployment_id": id, "version": d.version, "environment": next, "approved_by": who.0 }),
    ))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PromoteRequest {
    /// The environment the caller expects to promote to; refused if it is not the next one.
    environment: Option<String>,
    /// Start outside the next environment's deploy windows or in a freeze, for this reason.
    override_window: Option<String>,
}

/// `POST /api/v1/deployments/{id}/promote`: deploys a succeeded deployment's version to the next
/// environment of `promotion` — once its smoke tests passed and, where required, another
/// identity approved (the rules: [`promote::check`]).
async fn promote(
    State(state): State<Shared>,
    Extension(who): Extension<Identity>,
    ApiPath(id): ApiPath<String>,
    OptionalJson(req): OptionalJson<PromoteRequest>,
) -> ApiResult {
    let d = deployment_row(&state, &id)?;
    if let Some(target) = &req.environment {
        environment(&state, target, StatusCode::UNPROCESSABLE_ENTITY)?;
    }
    let app = state.app_of(&d)?.clone();
    let p = promote::check(&app, state.registry.as_ref(), &d, &who.0, req.environment.as_deref())?;
    let how = Start { promoted_from: Some(id.clone()), prestage: true, override_window: req.override_window };
    let (new, overridden) = start_deploy(&state, &app, &p.next, &p.version, &who, how).await?;
    if let Some(by) = p.approver {
        state.registry.use_approval(&id, &p.next, &by, &new)?;
    }
    Ok(with_override(accepted(&new, &p.next), overridden))
}

/// The deployment holding its environment's lock, or why `id` is not it.
fn holder(state: &Shared, d: &crate::registry::DeploymentRow) -> Result<(), ApiError> {
    match state.registry.lock_of(&d.environment)? {
        Some(lock) if lock.deployment_id == d.id => Ok(()),
        _ => Err(ApiError::conflict(
            "not_in_progress",
            format!("deployment {} is {}: it does not hold {}", d.id, d.status, d.environment),
        )),
    }
}

/// `POST /api/v1/deployments/{id}/continue`: a canary paused at a step (pause = "manual") goes on
/// with its next batch (`ferry promote`).
async fn continue_canary(
    State(state): State<Shared>,
    Extension(who): Extension<Identity>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult {
    let d = deployment_row(&state, &id)?;
    if d.status != DeploymentStatus::Paused {
        return Err(ApiError::conflict(
            "not_paused",
            format!("deployment {id} is {}, not paused at a canary step", d.status),
        ));
    }
    holder(&state, &d)?;
    let started =
        jobs::start(&state, state.app_of(&d)?, &d.environment, &who.0, None, Op::Resume { paused_only: true }).await?;
    Ok(accepted(&started, &d.environment))
}

/// `POST /api/v1/deployments/{id}/resume`: continues a deployment whose coordinator died.
async fn resume(
    State(state): State<Shared>,
    Extension(who): Extension<Identity>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult {
    let d = deployment_row(&state, &id)?;
    if state.jobs.get(&id).is_some_and(|j| !j.done()) {
        return Err(ApiError::conflict("running", format!("deployment {id} is running in this server")));
    }
    holder(&state, &d)?;
    let started =
        jobs::start(&state, state.app_of(&d)?, &d.environment, &who.0, None, Op::Resume { paused_only: false }).await?;
    Ok(accepted(&started, &d.environment))
}

/// `POST /api/v1/deployments/{id}/cancel`: a running deployment finishes the hosts in flight and
/// stops; a paused one is recorded cancelled. Either way hosts not yet activated are untouched.
async fn cancel(
    State(state): State<Shared>,
    Extension(who): Extension<Identity>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult {
    let d = deployment_row(&state, &id)?;
    if let Some(job) = state.jobs.get(&id).filter(|j| !j.done()) {
        job.cancel.cancel();
        job.changed.notify_waiters();
        return Ok(noted(StatusCode::ACCEPTED, &id, json!({ "deployment_id": id, "status": "cancelling" })));
    }
    match d.status {
        DeploymentStatus::Paused => {
            holder(&state, &d)?;
            jobs::start(&state, state.app_of(&d)?, &d.environment, &who.0, None, Op::CancelPaused).await?;
            Ok(noted(StatusCode::ACCEPTED, &id, json!({ "deployment_id": id, "status": "cancelling" })))
        }
        DeploymentStatus::Pending | DeploymentStatus::Running if !run_elsewhere(&state, &id, &d.environment) => {
            Err(ApiError::conflict(
                "coordinator_gone",
                format!(
                    "deployment {id} was left by a coordinator that is gone: resume it (POST /api/v1/deployments/{id}/resume) or roll the environment back"
                ),
            ))
        }
        DeploymentStatus::Pending | DeploymentStatus::Running => Err(ApiError::conflict(
            "not_here",
            format!(
                "deployment {id} is run by another coordinator process: stop it there (Ctrl-C), or roll the environment back"
            ),
        )),
        DeploymentStatus::Succeeded
        | DeploymentStatus::Failed
        | DeploymentStatus::RolledBack
        | DeploymentStatus::Cancelled => {
            Err(ApiError::conflict("finished", format!("deployment {id} is {}: there is nothing to cancel", d.status)))
        }
    }
}

async fn report(State(state): State<Shared>, ApiQuery(q): ApiQuery<EnvironmentQuery>) -> ApiResult {
    if let Some(env) = &q.environment {
        environment(&state, env, StatusCode::UNPROCESSABLE_ENTITY)?;
    }
    let app = state.app_filter(q.app.as_deref())?;
    let rows = crate::commands::history::report(state.registry.as_ref(), q.environment.as_deref(), app)?;
    Ok(Json(json!({ "environments": rows })).into_response())
}
