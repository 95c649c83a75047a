//! `ferry history` and `ferry report`: what the registry recorded.
use crate::registry::{DeploymentRow, EnvReport, Registry, RegistryError};

/// The newest deployments (of `env`, or all), newest first.
pub fn history(registry: &dyn Registry, env: Option<&str>, limit: usize) -> Result<Vec<DeploymentRow>, RegistryError> {
    registry.history(env, limit)
}

/// Per environment: deployments per week, success and rollback rates, durations, slowest hosts.
pub fn report(registry: &dyn Registry, env: Option<&str>) -> Result<Vec<EnvReport>, RegistryError> {
    registry.report(env)
}
