//! `ferry serve`: the coordinator as a daemon with an HTTP JSON API for pipelines.
//!
//! The API runs the same engine and registry as the CLI: a deployment created through it is the
//! same record `ferry history` lists, holds the same environment lock, and is resumed or rolled
//! back by the same code. Over HTTPS only; a client is either a certificate of role coordinator or
//! operator from the fleet CA, or a bearer token whose SHA-256 `[server] tokens` lists. Every
//! call is appended to the API audit log (who, what, status, deployment) before its response
//! leaves. Long operations (deployments, rollbacks) answer at once with the deployment id; their
//! progress streams as server-sent events from `/api/v1/deployments/{id}/events`.
//!
//! HTTP only: every rule of what may be deployed, promoted or continued lives in the use cases
//! (`crate::commands`); [`error`] turns their errors into status codes, in one place. [`serve`]
//! takes its shutdown as a token (`main` owns the signals), caps its connections, and tracks
//! every task it starts.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ferry_proto::audit_file::AuditFile;
use ferry_proto::identity::{self, CertIdentity, Role};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use ferry_proto::audit_file::RefusalSampler;
use ferry_proto::reload::{self, Reloadable};

use crate::cache::Cache;
use crate::config::FleetConfig;
use crate::fleet::grpc::Grpc;
use crate::registry::Registry;
use crate::tls::ClientTls;
use error::ApiError;

pub mod api;
pub mod auth;
pub mod dialin;
pub mod error;
pub mod jobs;
pub mod leader;
pub mod openapi;
pub mod smoke;

/// Connections served at once; more wait in the kernel's backlog until one ends.
pub const MAX_CONNECTIONS: usize = 512;
/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open connections (event streams) get to end once the deployments have stopped.
const DRAIN: Duration = Duration::from_secs(5);

/// Everything the handlers share.
pub struct AppState {
    /// fleet.toml as a whole (the server, the environments and every host).
    pub config: FleetConfig,
    /// fleet.toml as each app sees it ([`FleetConfig::for_app`]): what its rollouts run with.
    pub apps: BTreeMap<String, Arc<FleetConfig>>,
    /// The API's TLS and the coordinator's TLS towards the agents, reloaded together.
    pub tls: Arc<Reloadable<ServeTls>>,
    pub registry: Arc<dyn Registry>,
    /// fleet.toml's `[[notify]]` targets, for every rollout the server runs.
    pub notifier: crate::notify::Notifier,
    pub cache: Option<Cache>,
    pub artifacts_dir: PathBuf,
    /// Where registered artifacts may be read from: `artifacts_dir` and `[server] artifact_roots`,
    /// canonical.
    pub artifact_roots: Vec<PathBuf>,
    pub jobs: jobs::Jobs,
    pub tokens: Vec<auth::Token>,
    pub audit: Audit,
    /// Scans run one at a time: each reads, extracts and hashes a whole artifact.
    pub scans: Arc<tokio::sync::Semaphore>,
    /// Which refusals the audit log records one by one.
    pub refusals: std::sync::Mutex<RefusalSampler>,
    /// Client certificates refused before they expire (`[tls] revoked`).
    pub revoked: Arc<auth::RevokedFile>,
    /// The agents connected to `dial_in_listen`.
    pub dial_ins: crate::dialin::DialIns,
    /// Leader or standby, on a shared registry.
    pub leadership: leader::Leadership,
}

pub type Shared = Arc<AppState>;

impl AppState {
    /// The state `ferry serve` runs with: fleet.toml, the coordinator's client TLS for the
    /// agents, the registry, and the directories and audit log `[server]` names.
    pub fn load(mut config: FleetConfig, tls: ClientTls) -> anyhow::Result<AppState> {
        let state_dir =
            config.state_dir().context("no registry: set `registry` in fleet.toml (there is no HOME to default to)")?;
        let registry: Arc<dyn Registry> = crate::registry::open(&config)?;
        config.epoch = registry.lease_of(crate::registry::SERVE_LEASE)?.map_or(0, |l| l.epoch);
        let apps: BTreeMap<String, Arc<FleetConfig>> =
            config.apps.keys().filter_map(|name| Some((name.clone(), Arc::new(config.for_app(name)?)))).collect();
        if let [name] = config.app_names().as_slice() {
            // Versions registered before versions were kept per app are this app's.
            registry.claim_versions(name)?;
        }
        let artifacts_dir = config.server.artifacts_dir.clone().unwrap_or_else(|| state_dir.join("artifacts"));
        std::fs::create_dir_all(&artifacts_dir)
            .with_context(|| format!("[server] artifacts_dir {}: cannot create it", artifacts_dir.display()))?;
        // Registered versions name their upload by this path: make it absolute.
        let artifacts_dir = std::fs::canonicalize(&artifacts_dir)
            .with_context(|| format!("[server] artifacts_dir {}", artifacts_dir.display()))?;
        // Uploads a crash interrupted (never renamed to their digest).
        for entry in std::fs::read_dir(&artifacts_dir).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with(".tmp") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let mut artifact_roots = vec![artifacts_dir.clone()];
        for root in &config.server.artifact_roots {
            artifact_roots.push(
                std::fs::canonicalize(root).with_context(|| format!("[server] artifact_roots: {}", root.display()))?,
            );
        }
        let audit_path = config.server.audit_log.clone().unwrap_or_else(|| state_dir.join("api-audit.log"));
        let audit = Audit::open(&audit_path)?;
        let tokens = config.server.tokens.iter().filter_map(auth::Token::from_config).collect();
        let revoked = Arc::new(auth::RevokedFile::load(config.tls.revoked.as_deref())?);
        let listed = revoked.clone();
        let dial_ins = crate::dialin::DialIns::new(move |serial| listed.contains(serial));
        let tls = Arc::new(serve_tls(&config, tls.with_dial_ins(dial_ins.clone()), revoked.clone())?);
        let cache = config.cache_dir().map(Cache::new);
        let notifier = crate::notify::Notifier::start(&config.notify, registry.clone());
        let leadership = leader::Leadership::new(
            config.postgres_registry().is_some(),
            config.server.advertise.clone().unwrap_or_else(|| format!("https://{}", config.server.listen)),
            config.server.leader_lease,
        );
        if leadership.contested {
            registry.fence_writes(&leadership.holder);
        }
        Ok(AppState {
            config,
            apps,
            tls,
            notifier,
            leadership,
            registry,
            cache,
            artifacts_dir,
            artifact_roots,
            jobs: jobs::Jobs::default(),
            tokens,
            audit,
            scans: Arc::new(tokio::sync::Semaphore::new(1)),
            refusals: std::sync::Mutex::new(RefusalSampler::new(REFUSALS_PER_ADDRESS, REFUSALS_PER_MINUTE)),
            revoked,
            dial_ins,
        })
    }

    /// Audits a refusal (of a call without valid credentials, or of a TLS handshake) as sampled:
    /// a flood of them writes at most 61 lines a minute, the rest summed up in one line.
    pub async fn audit_refusal(&self, from: Option<SocketAddr>, line: AuditLine<'_>) {
        let ip = from.map_or(std::net::IpAddr::from([0, 0, 0, 0]), |a| a.ip());
        let (record, summary) = match self.refusals.lock() {
            Ok(mut s) => s.admit(ip, std::time::Instant::now()),
            Err(_) => (true, None),
        };
        if let Some((count, sources)) = summary {
            let text = format!(
                "{count} more refused call(s) or connection(s) from {sources} address(es) in the previous minute, not recorded one by one"
            );
            self.audit.write(&AuditLine::unanswered("-", &text)).await;
        }
        if record {
            self.audit.write(&line).await;
        }
    }

    /// The agents of fleet.toml running `app` (a view from [`AppState::app`]), dialled with `tls`
    /// (the current `self.tls`'s agents).
    pub fn fleet<'a>(&'a self, app: &'a FleetConfig, tls: &'a ClientTls) -> Grpc<'a> {
        Grpc { config: app, tls, cache: self.cache.as_ref() }
    }

    /// The app a call names, or the only one when it names none; refused (422) for an app
    /// fleet.toml does not declare, or for none when it declares several.
    pub fn app(&self, name: Option<&str>) -> Result<&Arc<FleetConfig>, ApiError> {
        let name = self.config.pick_app(name).map_err(|e| self.app_error(e))?;
        self.apps.get(name).ok_or_else(|| self.app_error(crate::config::AppPick::Unknown(name.to_string())))
    }

    /// `app` of a listing: the filter it makes ([`FleetConfig::app_filter`]).
    pub fn app_filter<'a>(&self, name: Option<&'a str>) -> Result<Option<&'a str>, ApiError> {
        self.config.app_filter(name).map_err(|e| self.app_error(e))
    }

    fn app_error(&self, e: crate::config::AppPick) -> ApiError {
        let names = self.config.app_names().join(", ");
        match e {
            crate::config::AppPick::Unknown(name) => {
                ApiError::unprocessable("unknown_app", format!("unknown app {name:?} (fleet.toml declares: {names})"))
            }
            crate::config::AppPick::Required => ApiError::unprocessable(
                "app_required",
                format!("fleet.toml declares several apps ({names}): name one with \"app\" (the CLI's --app NAME)"),
            ),
        }
    }

    /// The app deployment `d` is of (a deployment recorded before there were several apps is
    /// of the only app, and refused as [`AppState::app`] refuses none when there are several).
    pub fn app_of(&self, d: &crate::registry::DeploymentRow) -> Result<&Arc<FleetConfig>, ApiError> {
        self.app(Some(d.app.as_str()).filter(|a| !a.is_empty()))
    }
}

/// The API audit log: one JSON line per call, on disk before the response leaves; rotated at
/// 64 MiB, 10 files kept (the agent's audit file, `ferry_proto::audit_file`).
pub struct Audit(Arc<AuditFile>);

const AUDIT_MAX_BYTES: u64 = 64 << 20;
const AUDIT_KEEP: u32 = 10;

#[derive(Debug, Serialize)]
pub struct AuditLine<'a> {
    pub time: String,
    pub who: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deployment_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
    /// A deploy window or freeze the call overrode, with its reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_override: Option<&'a str>,
    pub ms: u64,
}

impl<'a> AuditLine<'a> {
    /// A line for no HTTP answer (`status` 0): a TLS refusal (`method` `TLS`) or a summary of
    /// refusals (`-`).
    fn unanswered(method: &'a str, error: &'a str) -> AuditLine<'a> {
        AuditLine {
            time: crate::registry::when(crate::registry::now_ms()),
            who: "unauthenticated",
            method,
            path: "-",
            status: 0,
            deployment_id: None,
            error: Some(error),
            window_override: None,
            ms: 0,
        }
    }
}

impl Audit {
    pub fn open(path: &Path) -> anyhow::Result<Audit> {
        Ok(Audit(Arc::new(AuditFile::open(path, AUDIT_MAX_BYTES, AUDIT_KEEP)?)))
    }

    /// Appends one line and fdatasyncs it, off the async threads. A failure is logged; it never
    /// fails the call.
    pub async fn write(&self, line: &AuditLine<'_>) {
        let mut bytes = serde_json::to_vec(line).unwrap_or_default();
        bytes.push(b'\n');
        let file = self.0.clone();
        let written = tokio::task::spawn_blocking(move || file.append(&bytes)).await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!("cannot write the API audit log: {e}"),
            Err(e) => tracing::error!(path = %self.0.path().display(), "cannot write the API audit log: {e}"),
        }
    }
}

/// The TLS `ferry serve` runs with.
pub struct ServeTls {
    /// The API's: its certificate, client certificates of the fleet CA.
    pub api: tokio_rustls::TlsAcceptor,
    /// The coordinator's, towards the agents.
    pub agents: ClientTls,
    /// `dial_in_listen`'s, for agents that dial in (none without it).
    pub dial_in: Option<tokio_rustls::TlsAcceptor>,
}

/// Both TLS setups, rebuilt from their files on SIGHUP (`systemctl reload ferry`) or when the
/// files change; deployments already running keep the setup they started with.
fn serve_tls(
    config: &FleetConfig,
    agents: ClientTls,
    revoked: Arc<auth::RevokedFile>,
) -> anyhow::Result<Reloadable<ServeTls>> {
    let api = tokio_rustls::TlsAcceptor::from(Arc::new(server_tls(config)?));
    let dial_in_tls = move |config: &FleetConfig| {
        config.server.dial_in_listen.as_ref().map(|_| dialin::acceptor(config, revoked.clone())).transpose()
    };
    let dial_in = dial_in_tls(config)?;
    let s = &config.server;
    let files = [Some(&config.tls.ca), Some(&config.tls.cert), Some(&config.tls.key), s.cert.as_ref(), s.key.as_ref()]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    let config = config.clone();
    let dial_ins = agents.dial_ins().cloned().unwrap_or_default();
    Ok(Reloadable::new(ServeTls { api, agents, dial_in }, files, move || {
        let agents = ClientTls::load(&config.tls).map_err(|e| format!("[tls]: {e}"))?.with_dial_ins(dial_ins.clone());
        let api = server_tls(&config).map_err(|e| format!("{e:#}"))?;
        let dial_in = dial_in_tls(&config).map_err(|e| format!("[server] dial_in_listen: {e:#}"))?;
        let what = format!("coordinator certificate {} (serial {})", agents.identity.name(), agents.identity.serial);
        Ok((ServeTls { api: tokio_rustls::TlsAcceptor::from(Arc::new(api)), agents, dial_in }, what))
    }))
}

/// The rustls server config of the API: its certificate, and client certificates from the fleet
/// CA accepted but not required (a token is the other way in).
fn server_tls(config: &FleetConfig) -> anyhow::Result<rustls::ServerConfig> {
    let cert_path = config.server.cert.clone().unwrap_or_else(|| config.tls.cert.clone());
    let key_path = config.server.key.clone().unwrap_or_else(|| config.tls.key.clone());
    let chain = identity::load_certs(&cert_path)?;
    let key = identity::load_key(&key_path)?;
    let mut roots = RootCertStore::empty();
    for cert in identity::load_certs(&config.tls.ca)? {
        roots.add(cert).with_context(|| format!("fleet CA {}", config.tls.ca.display()))?;
    }
    let provider = crate::tls::provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .context("client certificate verifier")?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .with_context(|| {
            format!("API certificate {} and key {} do not belong together", cert_path.display(), key_path.display())
        })?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}

/// The verified client certificate of a connection, if it presented one.
#[derive(Debug, Clone)]
pub struct Peer(pub Option<CertIdentity>);

/// The address a request came from.
#[derive(Debug, Clone, Copy)]
pub struct RemoteAddr(pub SocketAddr);

/// Refused calls and connections recorded one by one per minute: 10 per address, 60 in all.
const REFUSALS_PER_ADDRESS: usize = 10;
const REFUSALS_PER_MINUTE: usize = 60;

/// Serves the API until `shutdown` is cancelled; then stops taking connections, asks the
/// deployments it runs to stop after their hosts in flight, and returns once they reached that
/// safe point (open event streams get [`DRAIN`] to end). Installs no signal handler.
pub async fn serve(
    config: FleetConfig,
    tls: ClientTls,
    ready: impl FnOnce(SocketAddr),
    shutdown: CancellationToken,
    hangup: Option<tokio::signal::unix::Signal>,
) -> anyhow::Result<()> {
    let listen: SocketAddr = config.server.listen.parse().context("[server] listen")?;
    let state: Shared = Arc::new(AppState::load(config, tls)?);
    tokio::spawn(leader::run(state.clone(), shutdown.clone()));
    tokio::spawn(reload::watch(state.tls.clone(), hangup, shutdown.clone().cancelled_owned(), |r| match r.result {
        Ok(what) => tracing::info!("reloaded TLS ({}): {what}", r.why),
        Err(e) => tracing::error!("cannot reload TLS ({}); still using the previous certificates and CA: {e}", r.why),
    }));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("[server] listen {listen}: cannot listen there"))?;
    if let Some(dial_in) = &state.config.server.dial_in_listen {
        let at: SocketAddr = dial_in.parse().context("[server] dial_in_listen")?;
        let agents = tokio::net::TcpListener::bind(at)
            .await
            .with_context(|| format!("[server] dial_in_listen {at}: cannot listen there"))?;
        tracing::info!("agents that dial in connect to {at}");
        tokio::spawn(dialin::run(state.clone(), agents, shutdown.clone()));
    }
    ready(listener.local_addr()?);
    let router = api::router(state.clone());
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let connections = TaskTracker::new();
    while let Some((slot, tcp, addr)) = next_connection(&listener, &slots, &shutdown, "[server] listen").await {
        let (acceptor, router, stop, state_of_conn) =
            (state.tls.current().api.clone(), router.clone(), shutdown.clone(), state.clone());
        connections.spawn(async move {
            let _slot = slot;
            serve_connection(&state_of_conn, acceptor, router, tcp, addr, stop).await;
        });
    }
    drop(listener);
    tracing::info!("stopping: deployments in flight finish their current hosts, then stop");
    state.jobs.cancel_all();
    state.jobs.wait_idle().await;
    // The last rollouts' notifications get their targets' timeout to go out.
    state.notifier.flush().await;
    connections.close();
    if tokio::time::timeout(DRAIN, connections.wait()).await.is_err() {
        tracing::info!("closing the event streams still open");
    }
    Ok(())
}

/// The next connection on `listener`, with a free slot of `slots` taken first (past the cap,
/// connections wait in the kernel's backlog, not in memory); `None` once `stop` is cancelled.
/// A failed accept (EMFILE and friends) is logged and retried after a short pause.
pub(crate) async fn next_connection(
    listener: &tokio::net::TcpListener,
    slots: &Arc<tokio::sync::Semaphore>,
    stop: &CancellationToken,
    what: &str,
) -> Option<(tokio::sync::OwnedSemaphorePermit, tokio::net::TcpStream, SocketAddr)> {
    let slot = tokio::select! {
        slot = slots.clone().acquire_owned() => slot.ok()?,
        () = stop.cancelled() => return None,
    };
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, addr)) => return Some((slot, tcp, addr)),
                Err(e) => {
                    tracing::warn!("{what}: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            () = stop.cancelled() => return None,
        }
    }
}

/// One connection: TLS (bounded), then HTTP/1.1 until the client closes it or the server stops.
async fn serve_connection(
    state: &Shared,
    acceptor: tokio_rustls::TlsAcceptor,
    router: axum::Router,
    tcp: tokio::net::TcpStream,
    addr: SocketAddr,
    stop: CancellationToken,
) {
    let handshake = tokio::select! {
        done = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)) => done,
        // A client that never finishes its handshake does not hold the shutdown up.
        () = stop.cancelled() => return,
    };
    let stream = match handshake {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(%addr, "TLS handshake refused: {e}");
            audit_handshake(state, addr, &format!("TLS handshake refused: {e}")).await;
            return;
        }
        Err(_) => {
            tracing::info!(%addr, "TLS handshake timed out");
            audit_handshake(state, addr, &format!("TLS handshake did not finish within {HANDSHAKE_TIMEOUT:?}")).await;
            return;
        }
    };
    let peer =
        stream.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|der| CertIdentity::from_der(der).ok());
    let service = router.layer(axum::Extension(Peer(peer))).layer(axum::Extension(RemoteAddr(addr)));
    let service = hyper_util::service::TowerToHyperService::new(service);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    let ended = tokio::select! {
        ended = conn.as_mut() => ended,
        () = stop.cancelled() => {
            // Finish the request in flight, take no more.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = ended {
        tracing::debug!(%addr, "connection: {e}");
    }
}

/// A connection refused before HTTP, in the API audit log (sampled).
async fn audit_handshake(state: &Shared, addr: SocketAddr, why: &str) {
    state.audit_refusal(Some(addr), AuditLine::unanswered("TLS", why)).await;
}

/// The roles whose certificates may call the API.
pub fn api_role(role: Option<Role>) -> bool {
    matches!(role, Some(Role::Coordinator | Role::Operator))
}

#[cfg(test)]
mod tests;
