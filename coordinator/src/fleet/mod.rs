//! The fleet as the rollout engine sees it: a narrow trait of the four things it asks of a host
//! (what it runs, stage a release, activate it, switch back to a release it keeps), with the gRPC
//! implementation that talks to real agents ([`grpc::Grpc`]) and a scripted in-memory one that
//! records what it was asked ([`fake::Fake`]), for engine tests and benchmarks.
//!
//! Invariants of every implementation: staging changes nothing a host runs; an activation of the
//! release a host already runs is a no-op that reports `changed = false` (so a resumed deployment
//! may repeat one); a failed activation leaves the host on a healthy release where it can
//! (reported as [`crate::client::ErrorKind::RolledBack`]). A method never panics on what a host
//! answers: every failure is a [`HostError`] that names the host.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};

use futures_util::future::BoxFuture;

use crate::artifact::Artifact;
use crate::client::HostError;
use crate::config::Host;

pub mod encoded;
pub mod fake;
pub mod grpc;
pub mod swarm;

/// What the engine asks of hosts. Object-safe (futures are boxed) so the engine takes any fleet
/// as `&dyn Fleet`.
pub trait Fleet: Sync {
    /// The release of the app `host` runs ("" before its first).
    fn current_release<'a>(&'a self, host: &'a Host) -> BoxFuture<'a, Result<String, HostError>>;
    /// Puts `release` on `host` without activating it; counts what it sends in `sent` and tells
    /// `note` what it does.
    fn stage<'a>(
        &'a self,
        host: &'a Host,
        release: &'a Release,
        sent: &'a Transfer,
        note: &'a (dyn Fn(StageNote) + Sync),
    ) -> BoxFuture<'a, Result<Staged, HostError>>;
    /// Activates a staged release: swap, restart, probes; the host swaps itself back when that
    /// fails.
    fn activate<'a>(&'a self, host: &'a Host, activation: &'a Activation) -> BoxFuture<'a, Result<Swap, HostError>>;
    /// Switches `host` to a release it keeps: no transfer.
    fn rollback<'a>(
        &'a self,
        host: &'a Host,
        target: &'a Target,
        deployment_id: &'a str,
    ) -> BoxFuture<'a, Result<Swap, HostError>>;
}

/// What a deployment stages on each host.
pub struct Release {
    pub artifact: Arc<Artifact>,
    pub version: String,
    pub deployment_id: String,
    /// The release's signature (`[signing] key`); empty: unsigned.
    pub signature: Vec<u8>,
    /// Peer fetch: who holds the release so far (fleet.toml `peer_fetch`).
    pub swarm: Arc<swarm::Swarm>,
    /// Chunks read, checked and compressed once for every host of the deployment.
    pub encoded: Arc<encoded::EncodedChunks>,
}

/// What a deployment activates on a host.
#[derive(Debug, Clone)]
pub struct Activation {
    pub release_id: String,
    pub version: String,
    pub deployment_id: String,
    /// The environment's secrets, sent with every activation.
    pub secrets: Arc<crate::secrets::Secrets>,
}

/// A release staged on a host.
#[derive(Debug, Clone)]
pub struct Staged {
    /// What the host ran when it was staged ("" before its first release).
    pub current: String,
    pub release_id: String,
    /// The host's `current` was switched in, but its activation never ran to its end (its agent
    /// died after the swap): even if `current` is this release, it must be activated.
    pub unfinished: bool,
}

/// What staging did, step by step (the output layer words it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StageNote {
    /// The manifest went as changes from the host's current release `base`.
    ManifestDelta { base: String, changed: usize, removed: usize },
    /// The host could not use the changes: the whole manifest went.
    WholeManifest { reason: String },
    /// The release was already on the host.
    AlreadyPresent { release: String },
    /// The host lacks `chunks` chunks, `missing_bytes` of the release's `total_bytes`.
    Prepared { chunks: usize, missing_bytes: u64, total_bytes: u64 },
    /// What went on the wire; `delta_chunks` of the chunks went as deltas against the host's
    /// previous version of their file.
    Uploaded { bytes: u64, delta_chunks: u64 },
    /// Peer fetch: `chunks` chunks (`bytes` on the wire) came from the host's peers; `fell_short`
    /// says which peers did not give all they were asked for, and why.
    FromPeers { chunks: u64, bytes: u64, fell_short: Vec<String> },
    /// The host built and verified the release.
    Committed { release: String },
}

/// What was sent to one host, counted while it happens (the live view reads it).
#[derive(Debug, Default)]
pub struct Transfer {
    /// Sent by the coordinator.
    pub bytes: AtomicU64,
    /// Fetched by the host from its peers (peer fetch).
    pub peer_bytes: AtomicU64,
    pub manifest_delta: AtomicBool,
    pub delta_chunks: AtomicU64,
}

/// The result of a swap on one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Swap {
    pub from: Option<String>,
    pub to: String,
    pub changed: bool,
    /// The agent's own time for it (its final event's `elapsed_ms`).
    pub agent_ms: u64,
}

/// Where a rollback goes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// The release before the host's current one.
    Previous,
    /// The newest kept release of this version.
    Version(String),
    /// This release.
    Release(String),
}
