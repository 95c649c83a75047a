//! `ferry history` and `ferry report`: what the registry recorded.
use crate::registry::{DeploymentRow, EnvReport, Registry, RegistryError};

/// The newest deployments (of `env`, of `app`, or all), newest first.
pub fn history(
    registry: &dyn Registry,
    env: Option<&str>,
    app: Option<&str>,
    limit: usize,
) -> Result<Vec<DeploymentRow>, RegistryError> {
    registry.history(env, app, limit)
}

/// Per environment and app: deployments per week, success and rollback rates, durations,
/// slowest hosts.
pub fn report(registry: &dyn Registry, env: Option<&str>, app: Option<&str>) -> Result<Vec<EnvReport>, RegistryError> {
    let mut rows = registry.report(env)?;
    rows.retain(|r| app.is_none_or(|a| r.app == a));
    Ok(rows)
}
