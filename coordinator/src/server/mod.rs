//! `ferry serve`: the coordinator as a daemon with an HTTP JSON API for pipelines.
//!
//! The API runs the same engine and registry as the CLI: a deployment created through it is the
//! same record `ferry history` lists, holds the same environment lock, and is resumed or rolled
//! back by the same code. Over HTTPS only; a client is either a certificate of role coordinator or
//! operator from the fleet CA, or a bearer token whose SHA-256 `[server] tokens` lists. Every
//! call is appended to the API audit log (who, what, status, deployment) before its response
//! leaves. Long operations (deployments, rollbacks) answer at once with the deployment id; their
//! progress streams as server-sent events from `/api/v1/deployments/{id}/events`.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use ferry_proto::audit_file::AuditFile;
use ferry_proto::identity::{self, CertIdentity, Role};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use serde::Serialize;

use crate::cache::Cache;
use crate::config::FleetConfig;
use crate::registry::Registry;
use crate::tls::ClientTls;

pub mod api;
pub mod auth;
pub mod jobs;
pub mod openapi;
pub mod smoke;

/// Everything the handlers share.
pub struct AppState {
    pub config: FleetConfig,
    pub tls: ClientTls,
    pub registry: Mutex<Registry>,
    pub cache: Option<Cache>,
    pub artifacts_dir: PathBuf,
    /// Where registered artifacts may be read from: `artifacts_dir` and `[server] artifact_roots`,
    /// canonical.
    pub artifact_roots: Vec<PathBuf>,
    pub jobs: jobs::Jobs,
    pub tokens: Vec<auth::Token>,
    pub audit: Audit,
}

pub type Shared = Arc<AppState>;

impl AppState {
    /// The state `ferry serve` runs with: fleet.toml, the coordinator's client TLS for the
    /// agents, the registry, and the directories and audit log `[server]` names.
    pub fn load(config: FleetConfig, tls: ClientTls) -> anyhow::Result<AppState> {
        let state_dir =
            config.state_dir().context("no registry: set `registry` in fleet.toml (there is no HOME to default to)")?;
        let registry_path = config.registry_path().context("no registry path")?;
        let registry = Registry::open(&registry_path)?;
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
        let cache = config.cache_dir().map(Cache::new);
        Ok(AppState {
            config,
            tls,
            registry: Mutex::new(registry),
            cache,
            artifacts_dir,
            artifact_roots,
            jobs: jobs::Jobs::default(),
            tokens,
            audit,
        })
    }

    /// Runs `f` on the registry.
    pub fn reg<T>(
        &self,
        f: impl FnOnce(&mut Registry) -> Result<T, crate::registry::RegistryError>,
    ) -> Result<T, api::ApiError> {
        let mut reg =
            self.registry.lock().map_err(|_| api::ApiError::internal("the registry is poisoned by a panic"))?;
        f(&mut reg).map_err(|e| api::ApiError::internal(format!("{e}")))
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
    pub ms: u64,
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

/// Serves the API until SIGTERM or Ctrl-C; then waits for the deployments it runs to reach a
/// safe point (their hosts in flight finish, the rest are recorded cancelled).
pub async fn serve(config: FleetConfig, tls: ClientTls, ready: impl FnOnce(SocketAddr)) -> anyhow::Result<()> {
    let listen: SocketAddr = config.server.listen.parse().context("[server] listen")?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_tls(&config)?));
    let state: Shared = Arc::new(AppState::load(config, tls)?);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("[server] listen {listen}: cannot listen there"))?;
    let local = listener.local_addr()?;
    ready(local);
    let router = api::router(state.clone());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let (tcp, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        };
        let (acceptor, router) = (acceptor.clone(), router.clone());
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp)).await;
            let stream = match handshake {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::info!(%addr, "TLS handshake refused: {e}");
                    return;
                }
                Err(_) => {
                    tracing::info!(%addr, "TLS handshake timed out");
                    return;
                }
            };
            let peer = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|der| CertIdentity::from_der(der).ok());
            let service = router.layer(axum::Extension(Peer(peer)));
            let service = hyper_util::service::TowerToHyperService::new(service);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(30))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(%addr, "connection: {e}");
            }
        });
    }
    drop(listener);
    eprintln!(
        "ferry serve: stopping; deployments in flight finish their current hosts, then stop (signal again to stop at once)"
    );
    state.jobs.cancel_all();
    tokio::select! {
        () = state.jobs.wait_idle() => Ok(()),
        _ = tokio::signal::ctrl_c() => stop_now(),
        _ = term.recv() => stop_now(),
    }
}

/// A second signal: the hooks' process groups are killed and the server exits; the registry
/// says where each deployment stood (`resume` or `rollback` picks up).
fn stop_now() -> anyhow::Result<()> {
    crate::commands::rollout::kill_hooks();
    anyhow::bail!("stopped at once by a second signal; deployments in flight are left for `resume` or `rollback`")
}

/// The roles whose certificates may call the API.
pub fn api_role(role: Option<Role>) -> bool {
    matches!(role, Some(Role::Coordinator | Role::Operator))
}

/// Tokens by name, for tests and `ferry token new`.
pub fn token_lines(name: &str, token: &str) -> String {
    format!("[[server.tokens]]\nname = \"{name}\"\nsha256 = \"{}\"\n", auth::sha256_hex(token))
}

#[cfg(test)]
mod tests;
