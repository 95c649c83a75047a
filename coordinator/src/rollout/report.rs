//! A deployment's report: what `ferry deploy --output json` prints and the API's deployments
//! carry, built from the registry's rows (plus the live transfer counters of a run in this
//! process, for the delta figures the registry does not keep).
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use super::Stored;
use crate::fleet::Transfer;
use crate::registry::{DeploymentRow, HostRow};
use crate::state::{DeploymentKind, DeploymentStatus, HostState};

/// How a host ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostOutcome {
    /// The new release is current.
    Succeeded,
    /// It already was current: nothing changed.
    Unchanged,
    /// The release failed on this host after the switch; the host went back to its previous
    /// release, which is healthy.
    RolledBack,
    /// The release failed on this host (before the switch, or the host could not go back to a
    /// healthy release: see the error).
    Failed,
    /// Could not connect or authenticate.
    Unreachable,
    /// Not attempted because the rollout halted earlier.
    Skipped,
}

impl HostOutcome {
    /// The outcome a host's last recorded state stands for.
    pub fn of(state: HostState) -> HostOutcome {
        match state {
            HostState::Healthy => HostOutcome::Succeeded,
            HostState::Unchanged => HostOutcome::Unchanged,
            HostState::RolledBack => HostOutcome::RolledBack,
            HostState::Failed | HostState::RollingBack => HostOutcome::Failed,
            HostState::Unreachable => HostOutcome::Unreachable,
            HostState::Pending
            | HostState::Staging
            | HostState::Staged
            | HostState::Activating
            | HostState::Skipped => HostOutcome::Skipped,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct HostResult {
    pub name: String,
    pub status: HostOutcome,
    /// Content bytes sent (compressed chunks and deltas; not the manifest or protocol overhead).
    pub bytes_sent: u64,
    /// Content bytes the host fetched from its peers instead (peer fetch; counted while the
    /// deployment runs, 0 when read back from the registry).
    pub bytes_from_peers: u64,
    /// The manifest went as changes from the host's current release.
    pub manifest_delta: bool,
    /// Chunks sent as deltas against the host's previous version of their file.
    pub delta_chunks: u64,
    /// From the host's first step to its last, waiting for its batch included.
    pub duration_ms: u64,
    /// Time the agent spent on the activation (hooks, swap, restarts, health probes), as it
    /// reported it; the rest of `duration_ms` is transfer, waiting and coordinator overhead.
    pub activate_ms: u64,
    /// The release the host runs after this deployment (a rollback: the one it went back to).
    pub release: Option<String>,
    /// The release it ran before.
    pub previous_release: Option<String>,
    pub error: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DeployReport {
    pub deployment_id: String,
    pub kind: DeploymentKind,
    pub environment: String,
    /// The app it deployed ("" in a registry from before there were several apps).
    #[serde(default)]
    pub app: String,
    pub version: String,
    pub release_id: String,
    pub status: DeploymentStatus,
    pub bytes_sent: u64,
    pub total_bytes: u64,
    pub hosts: Vec<HostResult>,
    /// The metric gates' measurements, oldest first (none without gates).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub measurements: Vec<crate::registry::Measurement>,
}

impl DeployReport {
    pub fn any_unreachable(&self) -> bool {
        self.hosts.iter().any(|h| h.status == HostOutcome::Unreachable)
    }
}

/// The report of a deployment from its registry rows.
pub fn report_from(d: DeploymentRow, rows: Vec<HostRow>, transfers: &HashMap<String, Arc<Transfer>>) -> DeployReport {
    let total_bytes = serde_json::from_str::<Stored>(&d.strategy).map(|s| s.total_bytes).unwrap_or(0);
    let hosts = rows
        .into_iter()
        .map(|h| {
            let t = transfers.get(&h.host);
            let status = HostOutcome::of(h.state);
            let on_new = matches!(status, HostOutcome::Succeeded | HostOutcome::Unchanged);
            let release = match (&h.release, on_new) {
                // A rollback's host records the release it went to.
                (Some(r), true) => Some(r.clone()),
                (_, true) if !d.release_id.is_empty() => Some(d.release_id.clone()),
                _ => h.previous_release.clone(),
            };
            HostResult {
                name: h.host,
                status,
                bytes_sent: u64::try_from(h.bytes_sent).unwrap_or(0),
                bytes_from_peers: t.map_or(0, |t| t.peer_bytes.load(Ordering::Relaxed)),
                manifest_delta: t.is_some_and(|t| t.manifest_delta.load(Ordering::Relaxed)),
                delta_chunks: t.map_or(0, |t| t.delta_chunks.load(Ordering::Relaxed)),
                duration_ms: match (h.started_ms, h.finished_ms) {
                    (Some(s), Some(f)) => u64::try_from(f - s).unwrap_or(0),
                    _ => 0,
                },
                activate_ms: h.activate_ms.and_then(|ms| u64::try_from(ms).ok()).unwrap_or(0),
                release,
                previous_release: h.previous_release,
                error: h.error,
            }
        })
        .collect();
    DeployReport {
        deployment_id: d.id,
        kind: d.kind,
        environment: d.environment,
        app: d.app,
        version: d.version,
        release_id: d.release_id,
        status: d.status,
        bytes_sent: u64::try_from(d.bytes_sent).unwrap_or(0),
        total_bytes,
        hosts,
        measurements: Vec::new(),
    }
}
