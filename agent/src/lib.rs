//! `ferry-agent`: the per-host agent of ferry.
//!
//! # Layout
//! - [`config`]: `agent.toml`, parsed and validated before anything binds.
//! - [`tls`]: the agent's mTLS: fleet CA only, coordinator-role clients only.
//! - [`server`]: accept loop (handshake, refusal log), tonic server, graceful shutdown.
//! - [`service`]: the `ferry.agent.v1.Agent` gRPC service.
//! - [`activate`]: the activation sequence: swap, restart units, probe, roll back on failure.
//! - [`systemd`]: unit control over D-Bus and journal lines of a unit.
//! - [`probe`]: http, tcp and exec health probes.
//! - [`hooks`]: lifecycle hooks from the release, bounded in time and output.
//! - [`facts`]: host facts for `GetStatus` (sysinfo, statvfs).
//! - [`store`]: each app's release store: staging, content index, promotion, atomic swap, pruning.
//! - [`failpoint`]: named crash points for crash-safety tests (test builds only).
//! - [`notify`]: systemd readiness, stopping and watchdog notifications.
//! - [`telemetry`]: what the agent reports about itself: [`metrics`] (Prometheus), the
//!   [`audit`] log (one JSON line per command), the serving state.
//! - [`http`]: the optional plain-HTTP endpoint: `/metrics`, `/health`, `/ready`, `/live`.
//!
//! - [`owner`]: the app's user and group a release names; hooks and exec probes run as it.
//!
//! The binary (`main.rs`) only parses flags, sets up logging and calls [`run`].
//!
//! No `unsafe` except the one audited call that drops privileges between fork and exec
//! ([`owner::Owner::apply`]).
#![deny(unsafe_code)]

pub mod activate;
pub mod audit;
pub mod config;
pub mod dial;
pub mod facts;
pub mod failpoint;
pub mod fence;
pub mod hooks;
pub mod http;
pub mod metrics;
pub mod notify;
pub mod owner;
pub mod peers;
pub mod probe;
pub mod secrets;
pub mod server;
pub mod service;
pub mod store;
pub mod systemd;
pub mod telemetry;
pub mod tls;

use tokio_util::sync::CancellationToken;

pub use config::AgentConfig;
pub use server::Server;

/// Runs the agent until `shutdown` is cancelled: bind (gRPC, and the HTTP endpoint if
/// configured), tell systemd we are ready, serve, drain.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let http = match &config.http {
        Some(h) => Some(http::bind(h.listen).await?),
        None => None,
    };
    let server = Server::bind(config).await?;
    let audit = server.telemetry().audit.path().display().to_string();
    match server.local_addr() {
        Ok(addr) => tracing::info!(%addr, version = env!("CARGO_PKG_VERSION"), audit, "ferry-agent serving"),
        // Only dialing out (`connect`, no `listen`).
        Err(_) => tracing::info!(version = env!("CARGO_PKG_VERSION"), audit, "ferry-agent serving"),
    }
    for target in server.config().connect_targets() {
        tracing::info!(server = %target, "dialing ferry serve");
    }
    let http_stop = shutdown.child_token();
    let http_task = http.map(|listener| {
        if let Ok(a) = listener.local_addr() {
            tracing::info!(addr = %a, "serving /metrics, /health, /ready and /live over HTTP");
        }
        tokio::spawn(http::serve(listener, server.config(), server.telemetry(), http_stop.clone()))
    });
    notify::ready();
    if let Some(interval) = notify::watchdog_interval() {
        tracing::info!(?interval, "systemd watchdog enabled");
        tokio::spawn(notify::watchdog(interval, shutdown.clone()));
    }
    let served = server.serve(shutdown).await;
    http_stop.cancel();
    served?;
    if let Some(task) = http_task {
        let _ = task.await;
    }
    tracing::info!("ferry-agent stopped");
    Ok(())
}
