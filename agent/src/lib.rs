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
//!
//! The binary (`main.rs`) only parses flags, sets up logging and calls [`run`].
#![forbid(unsafe_code)]

pub mod activate;
pub mod config;
pub mod facts;
pub mod failpoint;
pub mod hooks;
pub mod notify;
pub mod probe;
pub mod server;
pub mod service;
pub mod store;
pub mod systemd;
pub mod tls;

use tokio_util::sync::CancellationToken;

pub use config::AgentConfig;
pub use server::Server;

/// Runs the agent until `shutdown` is cancelled: bind, tell systemd we are ready, serve, drain.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let server = Server::bind(config).await?;
    let addr = server.local_addr()?;
    tracing::info!(%addr, version = env!("CARGO_PKG_VERSION"), "ferry-agent serving");
    notify::ready();
    if let Some(interval) = notify::watchdog_interval() {
        tracing::info!(?interval, "systemd watchdog enabled");
        tokio::spawn(notify::watchdog(interval, shutdown.clone()));
    }
    server.serve(shutdown).await?;
    tracing::info!("ferry-agent stopped");
    Ok(())
}
