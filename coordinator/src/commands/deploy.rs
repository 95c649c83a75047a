//! `ferry deploy` (and the API's deployments): scan the artifact, record the deployment, run it.
use std::path::Path;
use std::sync::Arc;

use super::{Ctx, Error};
use crate::artifact::{self, Artifact};
use crate::rollout::{self, DeployReport};

/// Checks a deployment request before anything slow happens (the engine checks again when it
/// records it).
pub fn validate(config: &crate::config::FleetConfig, env: &str, version: &str) -> Result<(), Error> {
    rollout::check_version(version)?;
    config.hosts(env).map_err(rollout::Error::from)?;
    Ok(())
}

/// Whether a deployment to `env` may start now (its deploy windows and freezes). Outside them, a
/// stated `override_reason` lets it start: the note to record with the deployment.
pub fn window(
    config: &crate::config::FleetConfig,
    env: &str,
    override_reason: Option<&str>,
) -> Result<Option<String>, Error> {
    let Some(e) = config.environments.get(env) else { return Ok(None) };
    match (e.schedule.check(jiff::Timestamp::now()), override_reason.map(str::trim)) {
        (Ok(()), _) => Ok(None),
        (Err(closed), Some(reason)) if !reason.is_empty() => Ok(Some(format!("{closed}; overridden: {reason}"))),
        (Err(closed), _) => Err(Error::Closed { env: env.to_string(), closed }),
    }
}

/// Records on deployment `id` that it started outside its windows, who overrode them and why.
pub fn record_override(
    registry: &dyn crate::registry::Registry,
    id: &str,
    who: &str,
    note: &str,
) -> Result<(), crate::registry::RegistryError> {
    registry.event(id, None, "window_override", &format!("by {who}: {note}"))
}

/// Scans an artifact for a deployment to `env` (off the async threads, through the scan cache), as
/// a release of the app's layout in that environment.
/// The environment's secrets are fetched first: one that cannot be fetched refuses the deployment
/// before anything is scanned or touched.
pub async fn scan(ctx: &Ctx<'_>, env: &str, path: &Path) -> Result<Arc<Artifact>, Error> {
    let secrets = crate::secrets::fetch(ctx.config, env).await?;
    let layout = artifact::Layout::for_env(ctx.config, env);
    let artifact = artifact::scan(path, ctx.cache, &layout, ctx.config.max_artifact_bytes).await?;
    Ok(Arc::new(artifact.with_secrets(secrets)))
}

/// Checks the request and records a new deployment of `artifact` as `version` to `env`; its id.
/// No host is touched yet ([`run`]).
pub fn start(ctx: &Ctx<'_>, env: &str, artifact: &Artifact, version: &str, prestage: bool) -> Result<String, Error> {
    let id = ctx.engine(env).create(artifact, version, prestage)?;
    if let Some(cache) = ctx.cache {
        // The next deployment sends only this manifest's changes to hosts that run it.
        cache.save_manifest(&artifact.release_id(version), &artifact.manifest);
    }
    Ok(id)
}

/// Runs a deployment [`start`] recorded.
pub async fn run(ctx: &Ctx<'_>, env: &str, id: &str, artifact: Arc<Artifact>) -> Result<DeployReport, Error> {
    Ok(ctx.engine(env).run(id, artifact).await?)
}

/// [`start`] then [`run`].
pub async fn deploy(
    ctx: &Ctx<'_>,
    env: &str,
    artifact: Arc<Artifact>,
    version: &str,
    prestage: bool,
) -> Result<DeployReport, Error> {
    let id = start(ctx, env, &artifact, version, prestage)?;
    run(ctx, env, &id, artifact).await
}
