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

/// Runs `f` with the use cases' context the CLI would build for `config`.
async fn with_ctx<T>(
    config: &FleetConfig,
    tls: &ClientTls,
    cache: Option<&Cache>,
    f: impl AsyncFnOnce(&Ctx<'_>) -> T,
) -> T {
    let registry = Sqlite::open(&config.registry_path().expect("registry path")).expect("registry");
    let cancel = CancellationToken::new();
    let fleet = Grpc { config, tls, cache };
    let ctx = Ctx {
        config,
        fleet: &fleet,
        registry: &registry,
        cache,
        observer: &rollout::quiet,
        cancel: &cancel,
        force_unlock: false,
        notifier: &ferry_coordinator::notify::OFF,
    };
    f(&ctx).await
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
    with_ctx(config, tls, cache, async |ctx| commands::deploy::deploy(ctx, env, artifact, version, true).await).await
}

/// `ferry rollback` of `env` (to `to`, or each host's previous release).
pub async fn rollback(
    config: &FleetConfig,
    tls: &ClientTls,
    env: &str,
    to: Option<&str>,
) -> Result<DeployReport, commands::Error> {
    with_ctx(config, tls, None, async |ctx| commands::rollback::rollback(ctx, env, to).await).await
}
