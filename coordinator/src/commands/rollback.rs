//! `ferry rollback`: immediate, no transfer. Unwinds an unfinished deployment, or sends every host
//! back to its previous release (or a version), or switches a blue-green environment back.
use super::{Ctx, Error};
use crate::rollout::{DeployReport, Rollback};

/// Checks the request and records the rollback (taking the environment).
pub fn start(ctx: &Ctx<'_>, env: &str, to_version: Option<&str>) -> Result<Rollback, Error> {
    Ok(ctx.engine(env).create_rollback(to_version)?)
}

/// Runs a rollback [`start`] recorded.
pub async fn run(ctx: &Ctx<'_>, env: &str, rollback: &Rollback) -> Result<DeployReport, Error> {
    Ok(ctx.engine(env).run_rollback(rollback).await?)
}

/// [`start`] then [`run`].
pub async fn rollback(ctx: &Ctx<'_>, env: &str, to_version: Option<&str>) -> Result<DeployReport, Error> {
    let r = start(ctx, env, to_version)?;
    run(ctx, env, &r).await
}
