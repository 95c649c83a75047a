//! `ferry plan`: what a deployment to an environment would do (strategy, batches, pauses, the
//! blue-green switch). Contacts no host.
use serde::Serialize;

use crate::config::{FleetConfig, UnknownEnvironment};
use crate::plan::Strategy;
use crate::registry::{Registry, RegistryError};

/// The batches a deployment would run.
#[derive(Debug, Serialize)]
pub struct PlanView {
    pub environment: String,
    pub strategy: String,
    pub max_failures: usize,
    pub auto_rollback: bool,
    pub batches: Vec<PlanBatch>,
    /// blue-green: the group live now (null: none yet) and the group the next deployment makes live.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live_group: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub switch_to: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct PlanBatch {
    pub hosts: Vec<String>,
    /// "manual", a duration, or null.
    pub pause_after: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    UnknownEnvironment(#[from] UnknownEnvironment),
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// The plan of `env`. `registry` (when there is one yet) says which blue-green group is live.
pub fn plan(config: &FleetConfig, registry: Option<&dyn Registry>, env: &str) -> Result<PlanView, PlanError> {
    let mut hosts = config.hosts(env)?;
    let e = &config.environments[env];
    let (mut live_group, mut switch_to) = (None, None);
    if e.strategy == Strategy::BlueGreen {
        // Without a live group yet, the first group goes first.
        live_group = registry.map(|r| r.live_group(env)).transpose()?.flatten().map(|(group, _)| group);
        if let Some((idle, members)) = e.idle_group(live_group.as_deref()) {
            hosts.retain(|h| members.contains(&h.name));
            switch_to = Some(idle);
        }
    }
    let batches = crate::plan::plan(&e.strategy, hosts.len())
        .into_iter()
        .map(|b| PlanBatch {
            hosts: b.hosts.iter().map(|&i| hosts[i].name.clone()).collect(),
            pause_after: b.pause_after.map(String::from),
        })
        .collect();
    Ok(PlanView {
        environment: env.to_string(),
        strategy: e.strategy.to_string(),
        max_failures: e.max_failures,
        auto_rollback: e.auto_rollback,
        batches,
        live_group,
        switch_to,
    })
}
