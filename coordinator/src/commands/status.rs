//! `ferry status`: ask every host of an environment for its facts and current release.
//!
//! Hosts are contacted in parallel (bounded by `parallelism`); a host that cannot be reached or
//! authenticated is reported with its reason and never stops the others.
use std::sync::Arc;

use ferry_proto::v1::HostStatus;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::client::{Agent, ErrorKind, Timeouts};
use crate::config::{FleetConfig, Host};
use crate::tls::ClientTls;

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct StatusReport {
    pub environment: String,
    pub app: String,
    pub hosts: Vec<HostReport>,
}

impl StatusReport {
    pub fn unreachable(&self) -> usize {
        self.hosts.iter().filter(|h| !h.reachable).count()
    }
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct HostReport {
    pub name: String,
    pub address: String,
    pub reachable: bool,
    pub error_kind: Option<ErrorKind>,
    pub error: Option<String>,
    /// A host that dials in: its connection to the `ferry serve` that asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dial_in: Option<crate::dialin::DialInInfo>,
    #[serde(flatten)]
    pub facts: Option<Facts>,
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct Facts {
    pub agent_name: String,
    pub agent_version: String,
    pub hostname: String,
    pub os: String,
    pub kernel: String,
    pub uptime_secs: u64,
    pub cpu_count: u32,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    pub data_dir: String,
    pub data_dir_free_bytes: u64,
    pub data_dir_total_bytes: u64,
    pub apps: Vec<AppReport>,
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct AppReport {
    pub name: String,
    pub current_release: Option<String>,
    pub current_version: Option<String>,
    pub releases_kept: u32,
    /// `current` was switched in but its activation never ran to its end (its agent died after
    /// the swap): the units may run the previous release until the next deployment.
    #[serde(default)]
    pub activation_unfinished: bool,
}

impl From<HostStatus> for Facts {
    fn from(s: HostStatus) -> Self {
        let non_empty = |s: String| if s.is_empty() { None } else { Some(s) };
        Facts {
            agent_name: s.agent_name,
            agent_version: s.agent_version,
            hostname: s.hostname,
            os: s.os,
            kernel: s.kernel,
            uptime_secs: s.uptime_secs,
            cpu_count: s.cpu_count,
            memory_total_bytes: s.memory_total_bytes,
            memory_available_bytes: s.memory_available_bytes,
            data_dir: s.data_dir,
            data_dir_free_bytes: s.data_dir_free_bytes,
            data_dir_total_bytes: s.data_dir_total_bytes,
            apps: s
                .apps
                .into_iter()
                .map(|a| AppReport {
                    name: a.name,
                    current_release: non_empty(a.current_release),
                    current_version: non_empty(a.current_version),
                    releases_kept: a.releases_kept,
                    activation_unfinished: a.activation_unfinished,
                })
                .collect(),
        }
    }
}

/// Queries every host of `env`. Never fails as a whole: each host carries its own outcome.
pub async fn run(config: &FleetConfig, env: &str, tls: &ClientTls) -> anyhow::Result<StatusReport> {
    let hosts = config.hosts(env)?;
    let timeouts = crate::fleet::grpc::timeouts(config);
    let limit = Arc::new(Semaphore::new(config.parallelism));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, host) in hosts.iter().cloned().enumerate() {
        let tls = tls.clone();
        let limit = limit.clone();
        tasks.spawn(async move {
            // The semaphore is never closed, so acquire cannot fail; hold the permit for the query.
            let _permit = limit.acquire_owned().await;
            (i, query(&host, &tls, timeouts).await)
        });
    }
    let mut reports: Vec<Option<HostReport>> = hosts.iter().map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        let (i, report) = joined?;
        reports[i] = Some(report);
    }
    Ok(StatusReport {
        environment: env.to_string(),
        app: config.app.name.clone(),
        hosts: reports.into_iter().flatten().collect(),
    })
}

async fn query(host: &Host, tls: &ClientTls, timeouts: Timeouts) -> HostReport {
    let dial_in = || tls.dial_ins().filter(|_| host.dials_in()).and_then(|d| d.info(&host.name));
    match Agent::connect(host, tls, timeouts).await {
        Ok(agent) => HostReport {
            name: host.name.clone(),
            address: host.endpoint(),
            reachable: true,
            error_kind: None,
            error: None,
            dial_in: dial_in(),
            facts: Some(agent.status.into()),
        },
        Err(e) => {
            tracing::debug!(host = host.name, error = %e, "host unreachable");
            HostReport {
                name: host.name.clone(),
                address: host.endpoint(),
                reachable: false,
                error_kind: Some(e.kind),
                error: Some(e.message),
                dial_in: dial_in(),
                facts: None,
            }
        }
    }
}
