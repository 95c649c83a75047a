//! `ferry resume` (a deployment whose coordinator died), `ferry promote` (a canary paused at a
//! step) and cancelling a paused deployment.
use std::path::Path;
use std::sync::Arc;

use super::{Ctx, Error};
use crate::artifact::{self, Artifact};
use crate::registry::DeploymentRow;
use crate::rollout::{self, DeployReport};

/// The deployment of `env` that may be continued, with its artifact scanned again (it must still
/// be the recorded release); nothing is taken over yet ([`run`]).
pub async fn prepare(ctx: &Ctx<'_>, env: &str, paused_only: bool) -> Result<(DeploymentRow, Arc<Artifact>), Error> {
    let d = ctx.engine(env).resumable(paused_only)?;
    let secrets = crate::secrets::fetch(ctx.config, env).await?;
    let artifact = artifact::rescan(
        Path::new(&d.artifact),
        ctx.cache,
        &artifact::Layout::for_env(ctx.config, env),
        ctx.config.max_artifact_bytes,
        &d.release_id,
        (artifact::Recorded::Release, &d.manifest_hash),
    )
    .await
    .map_err(|source| rollout::Error::Artifact { id: d.id.clone(), source })?;
    Ok((d, Arc::new(artifact.with_secrets(secrets))))
}

/// Takes the environment over for `d` ([`prepare`]) and records that.
pub fn take_over(ctx: &Ctx<'_>, env: &str, d: &DeploymentRow) -> Result<(), Error> {
    Ok(ctx.engine(env).take_over(d)?)
}

/// Runs the deployment taken over.
pub async fn run(ctx: &Ctx<'_>, env: &str, id: &str, artifact: Arc<Artifact>) -> Result<DeployReport, Error> {
    Ok(ctx.engine(env).run(id, artifact).await?)
}

/// [`prepare`], [`take_over`], [`run`].
pub async fn resume(ctx: &Ctx<'_>, env: &str, paused_only: bool) -> Result<DeployReport, Error> {
    let (d, artifact) = prepare(ctx, env, paused_only).await?;
    take_over(ctx, env, &d)?;
    run(ctx, env, &d.id, artifact).await
}

/// Records the paused deployment of `env` cancelled (no host is touched).
pub fn cancel_paused(ctx: &Ctx<'_>, env: &str) -> Result<DeployReport, Error> {
    Ok(ctx.engine(env).cancel_paused()?)
}
