//! The use cases every front end shares: the CLI (run here or sent to `ferry serve`) and the
//! API call these, and validation happens here, once. One file per verb; each returns a value
//! that the output layer (`ui`) renders or the API serialises.
//!
//! - [`deploy`]: scan an artifact, record a deployment, run it.
//! - [`resume`]: continue a deployment a dead coordinator left, or a paused canary (`ferry
//!   promote`); cancel a paused one.
//! - [`rollback`]: unwind an unfinished deployment, send hosts back, or switch blue-green back.
//! - [`promote`]: the pipeline's promotion of a succeeded deployment to the next environment
//!   (smoke-test gate, approvals).
//! - [`status`], [`plan`], [`history`] (history and report): read-only views.
//! - [`token`], [`ca`], [`cert`]: credentials.
use tokio_util::sync::CancellationToken;

use crate::artifact::ArtifactError;
use crate::cache::Cache;
use crate::config::FleetConfig;
use crate::fleet::Fleet;
use crate::registry::{Registry, RegistryError};
use crate::rollout::{self, Engine, Observer};

pub mod ca;
pub mod cert;
pub mod deploy;
pub mod history;
pub mod key;
pub mod plan;
pub mod promote;
pub mod resume;
pub mod rollback;
pub mod status;
pub mod token;

/// Why a use case refused or failed (the API turns each into its status code in one place).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Rollout(#[from] rollout::Error),
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    #[error(transparent)]
    Promotion(#[from] promote::Refused),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Secret(#[from] crate::secrets::SecretError),
    #[error(
        "environment {env} is closed to deployments: {closed}: deploy then, or override with a reason (--override-window REASON; through the API, \"override_window\")"
    )]
    Closed { env: String, closed: crate::window::Closed },
}

/// What a rollout use case works with; the front end builds it once per call.
pub struct Ctx<'a> {
    pub config: &'a FleetConfig,
    pub fleet: &'a dyn Fleet,
    pub registry: &'a dyn Registry,
    /// Manifests of earlier releases and the scan cache.
    pub cache: Option<&'a Cache>,
    pub observer: &'a dyn Observer,
    /// Cancelled: the rollout finishes the hosts in flight, then stops.
    pub cancel: &'a CancellationToken,
    /// Break another deployment's lock on the environment (a warning names it).
    pub force_unlock: bool,
    /// Where rollouts' notifications go.
    pub notifier: &'a crate::notify::Notifier,
}

impl Ctx<'_> {
    /// The engine of environment `env`.
    pub fn engine<'e>(&'e self, env: &'e str) -> Engine<'e> {
        Engine {
            config: self.config,
            env,
            fleet: self.fleet,
            registry: self.registry,
            observer: self.observer,
            cancel: self.cancel,
            force_unlock: self.force_unlock,
            notifier: self.notifier,
        }
    }
}
