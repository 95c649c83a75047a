//! The coordinator's engine driven in-process against real agents, as `ferry deploy` and `ferry
//! rollback` drive it (the gRPC fleet, the SQLite registry fleet.toml names), without output.
use std::sync::Arc;

use ferry_coordinator::artifact::Artifact;
use ferry_coordinator::cache::Cache;
use ferry_coordinator::commands::{self, Ctx};
use ferry_coordinator::config::FleetConfig;
use ferry_coordinator::fleet::grpc::Grpc;
use ferry_coordinator::registry::sqlite::Sqlite;
use ferry_coordinator::rollout::{self, DeployReport};
use ferry_coordinator::tls::ClientTls;
use tokio_util::sync::CancellationToken;

fn registry(config: &FleetConfig) -> Sqlite {
    Sqlite::open(&config.registry_path().expect("registry path")).expect("registry")
}

/// Deploys `artifact` as `version` to `env`.
pub async fn deploy(
    config: &FleetConfig,
    tls: &ClientTls,
    env: &str,
    artifact: Arc<Artifact>,
    version: &str,
    cache: Option<&Cache>,
) -> Result<DeployReport, commands::Error> {
    let (registry, cancel) = (registry(config), CancellationToken::new());
    let fleet = Grpc { config, tls, cache };
    let ctx = Ctx {
        config,
        fleet: &fleet,
        registry: &registry,
        cache,
        observer: &rollout::quiet,
        cancel: &cancel,
        force_unlock: false,
    };
    commands::deploy::deploy(&ctx, env, artifact, version, true).await
}

/// `ferry rollback` of `env` (to `to`, or each host's previous release).
pub async fn rollback(
    config: &FleetConfig,
    tls: &ClientTls,
    env: &str,
    to: Option<&str>,
) -> Result<DeployReport, commands::Error> {
    let (registry, cancel) = (registry(config), CancellationToken::new());
    let fleet = Grpc { config, tls, cache: None };
    let ctx = Ctx {
        config,
        fleet: &fleet,
        registry: &registry,
        cache: None,
        observer: &rollout::quiet,
        cancel: &cancel,
        force_unlock: false,
    };
    commands::rollback::rollback(&ctx, env, to).await
}
