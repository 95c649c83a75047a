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

/// Deployment `id` in full: its report (hosts, measurements) with its status, error and every
/// recorded event; the shape of the API's `GET /api/v1/deployments/{id}`.
pub fn deployment(registry: &dyn Registry, id: &str) -> Result<serde_json::Value, RegistryError> {
    let d = registry.deployment(id)?.ok_or_else(|| RegistryError::Storage {
        registry: registry.describe(),
        message: format!("it records no deployment {id:?} (`ferry history` lists them)"),
    })?;
    let rows = registry.hosts(id)?;
    recorded(registry, d, rows)
}

/// Deployment `d` (with its host `rows`) as recorded: its report with the metric gates'
/// measurements (the report carries its status), its error, times and every event. The API's view adds to it.
pub fn recorded(
    registry: &dyn Registry,
    d: crate::registry::DeploymentRow,
    rows: Vec<crate::registry::HostRow>,
) -> Result<serde_json::Value, RegistryError> {
    let (error, started, finished) = (d.error.clone(), d.started_ms, d.finished_ms);
    let id = d.id.clone();
    let mut report = crate::rollout::report_from(d, rows, &std::collections::HashMap::new());
    report.measurements = registry.measurements(&id)?;
    let mut v = serde_json::json!(report);
    if let Some(o) = v.as_object_mut() {
        o.insert("error".into(), serde_json::json!(error));
        o.insert("started_ms".into(), serde_json::json!(started));
        o.insert("finished_ms".into(), serde_json::json!(finished));
        o.insert("events".into(), serde_json::json!(registry.events_since(&id, 0)?));
    }
    Ok(v)
}

/// Per environment and app: deployments per week, success and rollback rates, durations,
/// slowest hosts.
pub fn report(registry: &dyn Registry, env: Option<&str>, app: Option<&str>) -> Result<Vec<EnvReport>, RegistryError> {
    let mut rows = registry.report(env)?;
    rows.retain(|r| app.is_none_or(|a| r.app == a));
    Ok(rows)
}
