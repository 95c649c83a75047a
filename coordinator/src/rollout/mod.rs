//! The rollout engine: one deployment of an environment from its record to its end, for every
//! front end (the CLI and `ferry serve` call the same [`Engine`]).
//!
//! A deployment is first recorded ([`Engine::create`] returns its id, holding the environment's
//! lock), then driven ([`Engine::run`]): the release is staged on every host in parallel (bounded
//! by `parallelism`; staging changes nothing a host runs), then activated batch by batch as the
//! plan says, pausing where a canary pauses. Every host transition is committed to the registry
//! before it is acted on (`staging` before the transfer, `activating` before the swap), so a
//! coordinator killed at any point leaves a record that [`Engine::resumable`] + [`Engine::run`]
//! continue from: hosts already healthy are left alone, a host caught `activating` is activated
//! again (the agent treats a repeated activation of its current release as a no-op). More than
//! `max_failures` failed hosts halt the rollout; with `auto_rollback` every host it updated goes
//! back to its previous release. A rollback ([`Engine::create_rollback`]) is a deployment too,
//! driven by the same loop over [`crate::state::next`] without staging.
//!
//! Invariants: the engine only calls the layers below it ([`Fleet`], [`Registry`], [`crate::state`],
//! [`crate::plan`]); it reports through typed [`Event`]s and returns typed [`Error`]s. Every host step
//! is bounded by its state's time limit ([`crate::state::HostState::time_limit`]). A cancel (the
//! `cancel` token) is honoured between steps, never inside one: the hosts in flight end healthy
//! or rolled back by their agents, and coordinator hooks in flight run to their end.
use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::artifact::{Artifact, ArtifactError};
use crate::config::{Environment, FleetConfig, Host, UnknownEnvironment};
use crate::fleet::{Fleet, Target, Transfer};
use crate::plan::{self, Strategy};
use crate::registry::{DeploymentRow, HostUpdate, Lock, NewDeployment, Registry, RegistryError};
use crate::state::{DeploymentKind, DeploymentStatus, HostState};

mod blue_green;
pub mod events;
mod gates;
mod hooks;
pub mod report;
mod run;
#[cfg(test)]
mod tests;

pub use events::{Event, Observer, quiet};
pub use report::{DeployReport, HostOutcome, HostResult, report_from};

/// Why the engine did not start, continue or finish a deployment (a host's failure is not an
/// error: it is recorded, and the report says it).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--version: {reason}")]
    InvalidVersion { version: String, reason: String },
    #[error(transparent)]
    UnknownEnvironment(#[from] UnknownEnvironment),
    #[error("no deployment of {env} is in progress")]
    NothingInProgress { env: String },
    #[error(
        "{env} is held by deployment {id} of app {app}, not {this}: resume or roll back app {app} first (--app {app})"
    )]
    OtherApp { env: String, id: String, app: String, this: String },
    #[error(
        "the lock of {env} names deployment {id}, which the registry does not know (`ferry deploy --force-unlock` clears it)"
    )]
    DanglingLock { env: String, id: String },
    #[error("deployment {id} is {status} ({kind}); there is nothing to continue")]
    NotResumable { id: String, status: DeploymentStatus, kind: DeploymentKind },
    #[error("deployment {id} is {status}, not paused at a canary step{hint}")]
    NotPaused { id: String, status: DeploymentStatus, hint: &'static str },
    #[error(
        "deployment {id} is still running ({} on {}, pid {}{}); {next}", lock.owner, lock.hostname, lock.pid, lock.lease_note()
    )]
    StillRunning { id: String, lock: Box<Lock>, next: &'static str },
    #[error("deployment {id} includes hosts no longer in environment {env}: {}", hosts.join(", "))]
    HostsGone { id: String, env: String, hosts: Vec<String> },
    #[error(
        "environment {env} is blue-green: it rolls back by switching to the other group (`ferry rollback` without --to); to run {version} again, deploy it"
    )]
    BlueGreenTo { env: String, version: String },
    #[error("no group of {env} has been made live by ferry yet: there is nothing to switch back to")]
    NoLiveGroup { env: String },
    #[error("environment {env}: {reason}")]
    Misconfigured { env: String, reason: String },
    #[error("deployment {id} needs its artifact again: {source}")]
    Artifact {
        id: String,
        #[source]
        source: ArtifactError,
    },
    #[error("the registry's record of deployment {id} is unusable: {reason}")]
    Corrupt { id: String, reason: String },
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// How a deployment was planned, as the registry keeps it (so a resume follows the same plan).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Stored {
    #[serde(flatten)]
    strategy: Strategy,
    max_failures: usize,
    auto_rollback: bool,
    pub(crate) total_bytes: u64,
    /// Stage every host before the first activation (`--no-prestage`: each batch just before it).
    #[serde(default = "yes")]
    prestage: bool,
    /// blue-green: the group this deployment makes live, and the one live before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    switch: Option<Switch>,
    /// A rollback: where its hosts go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    target: Option<Target>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Switch {
    to: String,
    from: Option<String>,
}

fn yes() -> bool {
    true
}

/// A recorded rollback, ready to run ([`Engine::run_rollback`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rollback {
    /// An unfinished deployment is unwound: the hosts it updated go back.
    Unwind { id: String },
    /// Every host goes back to its previous release (or a version), batch by batch.
    Hosts { id: String },
    /// blue-green: the idle group is made live again.
    Switch { id: String },
}

impl Rollback {
    pub fn id(&self) -> &str {
        match self {
            Rollback::Unwind { id } | Rollback::Hosts { id } | Rollback::Switch { id } => id,
        }
    }
}

/// A version label must be one the agents take (A-Z a-z 0-9 . _ + -).
pub fn check_version(version: &str) -> Result<(), Error> {
    ferry_proto::manifest::check_version(version)
        .map_err(|e| Error::InvalidVersion { version: version.to_string(), reason: e.to_string() })
}

/// A short unique deployment id: `d-<unix seconds>-<6 hex>`.
pub fn new_deployment_id() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let seed = format!("{}-{}-{}", now.as_nanos(), std::process::id(), now.subsec_nanos());
    format!("d-{}-{}", now.as_secs(), &blake3::hash(seed.as_bytes()).to_hex()[..6])
}

/// The engine of one environment, with everything it works through.
pub struct Engine<'a> {
    pub config: &'a FleetConfig,
    pub env: &'a str,
    pub fleet: &'a dyn Fleet,
    pub registry: &'a dyn Registry,
    pub observer: &'a dyn Observer,
    /// Cancelled: finish the hosts in flight, then stop (recorded `cancelled`).
    pub cancel: &'a CancellationToken,
    /// Break another deployment's lock on the environment (it is named in a warning).
    pub force_unlock: bool,
    /// Where the rollout's notifications go ([`crate::notify::OFF`]: nowhere).
    pub notifier: &'a crate::notify::Notifier,
}

/// What a new deployment record holds besides its id.
struct Record<'a> {
    kind: DeploymentKind,
    version: &'a str,
    release_id: &'a str,
    artifact: &'a str,
    manifest_hash: &'a str,
    stored: &'a Stored,
    /// (host, batch), in plan order.
    placed: &'a [(String, usize)],
}

impl Engine<'_> {
    fn environment(&self) -> Result<&Environment, Error> {
        self.config.environments.get(self.env).ok_or_else(|| {
            Error::UnknownEnvironment(UnknownEnvironment {
                name: self.env.to_string(),
                known: self.config.environments.keys().cloned().collect(),
            })
        })
    }

    /// The hosts of the environment, by name.
    fn inventory(&self) -> Result<HashMap<String, Host>, Error> {
        Ok(self.config.hosts(self.env)?.into_iter().map(|h| (h.name.clone(), h)).collect())
    }

    fn emit(&self, event: &Event<'_>) {
        self.observer.event(event);
    }

    fn host_state(&self, id: &str, host: &str, state: HostState, update: &HostUpdate<'_>) -> Result<(), Error> {
        self.registry.set_host(id, host, state, update)?;
        self.emit(&Event::HostState { host, state });
        Ok(())
    }

    fn take_lock(&self, id: &str) -> Result<(), Error> {
        if let Some(broken) = self.registry.lock(self.env, id, self.force_unlock)? {
            self.emit(&Event::LockBroken { env: self.env, lock: &broken });
        }
        Ok(())
    }

    /// Takes the environment and records a new deployment `id`: the one place a record is made.
    fn record(&self, id: &str, r: &Record<'_>) -> Result<(), Error> {
        self.take_lock(id)?;
        let strategy = serde_json::to_string(r.stored)
            .map_err(|e| Error::Corrupt { id: id.to_string(), reason: format!("cannot encode its plan: {e}") })?;
        let created = self.registry.create(&NewDeployment {
            id,
            kind: r.kind,
            environment: self.env,
            version: r.version,
            release_id: r.release_id,
            artifact: r.artifact,
            manifest_hash: r.manifest_hash,
            strategy: &strategy,
            app: &self.config.app.name,
            hosts: r.placed,
        });
        if let Err(e) = created {
            // Nothing was recorded: the environment is free again.
            let _ = self.registry.unlock(self.env, id);
            return Err(e.into());
        }
        self.emit(&Event::Started { id });
        self.notify(crate::notify::Kind::Started, id, None, None);
        Ok(())
    }

    /// The signature of `artifact` as `version` with fleet.toml's `[signing] key` (empty without).
    fn sign(&self, artifact: &Artifact, version: &str) -> Result<Vec<u8>, Error> {
        let Some(signing) = &self.config.signing else { return Ok(Vec::new()) };
        let signer = crate::signing::Signer::load(&signing.key)
            .map_err(|reason| Error::Misconfigured { env: self.env.to_string(), reason })?;
        Ok(signer.sign(&self.config.app.name, version, &artifact.manifest_hash))
    }

    fn plan_of(&self, d: &DeploymentRow) -> Result<Stored, Error> {
        serde_json::from_str(&d.strategy)
            .map_err(|e| Error::Corrupt { id: d.id.clone(), reason: format!("its plan does not parse: {e}") })
    }

    /// `ferry deploy`: records a new deployment of `artifact` as `version` and takes the
    /// environment; its id. No host is touched until [`Engine::run`].
    pub fn create(&self, artifact: &Artifact, version: &str, prestage: bool) -> Result<String, Error> {
        check_version(version)?;
        // A key that cannot sign is found before anything is recorded.
        self.sign(artifact, version)?;
        let env = self.environment()?;
        let mut hosts = self.config.hosts(self.env)?;
        let mut switch = None;
        if env.strategy == Strategy::BlueGreen {
            // Only the idle group is deployed to; the live one serves until the switch.
            let live = self.registry.live_group(self.env)?.map(|(group, _)| group);
            let (idle, members) = env.idle_group(live.as_deref()).ok_or_else(|| Error::Misconfigured {
                env: self.env.to_string(),
                reason: "blue-green needs two groups".into(),
            })?;
            hosts.retain(|h| members.contains(&h.name));
            self.emit(&Event::BlueGreenTarget { live: live.as_deref(), idle: &idle, members: &members });
            switch = Some(Switch { to: idle, from: live });
        }
        let placed: Vec<(String, usize)> = plan::plan(&env.strategy, hosts.len())
            .iter()
            .enumerate()
            .flat_map(|(b, batch)| batch.hosts.iter().map(move |&i| (i, b)))
            .map(|(i, b)| (hosts[i].name.clone(), b))
            .collect();
        let id = new_deployment_id();
        let release_id = artifact.release_id(version);
        let stored = Stored {
            strategy: env.strategy.clone(),
            max_failures: env.max_failures,
            auto_rollback: env.auto_rollback,
            total_bytes: artifact.total_bytes,
            prestage,
            switch,
            target: None,
        };
        let path = std::fs::canonicalize(&artifact.source).unwrap_or_else(|_| artifact.source.clone());
        self.record(
            &id,
            &Record {
                kind: DeploymentKind::Deploy,
                version,
                release_id: &release_id,
                artifact: &path.to_string_lossy(),
                manifest_hash: &hex::encode(artifact.manifest_hash),
                stored: &stored,
                placed: &placed,
            },
        )?;
        Ok(id)
    }

    /// The lock of the environment, if held, and the deployment it names (`None`: one the
    /// registry does not know).
    fn lock_record(&self) -> Result<Option<(Lock, Option<DeploymentRow>)>, Error> {
        let Some(lock) = self.registry.lock_of(self.env)? else { return Ok(None) };
        let d = self.registry.deployment(&lock.deployment_id)?;
        Ok(Some((lock, d)))
    }

    /// The deployment holding the environment, or that nothing is in progress.
    fn held(&self) -> Result<(Lock, DeploymentRow), Error> {
        match self.lock_record()? {
            None => Err(Error::NothingInProgress { env: self.env.to_string() }),
            Some((lock, None)) => Err(Error::DanglingLock { env: self.env.to_string(), id: lock.deployment_id }),
            Some((lock, Some(d))) => Ok((lock, d)),
        }
    }

    /// `ferry resume` / `ferry promote` (`paused_only`): the environment's deployment that may be
    /// continued (one whose coordinator died, or one paused at a canary step), or why none may.
    /// Touches nothing; [`Engine::take_over`] then [`Engine::run`] continue it.
    pub fn resumable(&self, paused_only: bool) -> Result<DeploymentRow, Error> {
        let (lock, d) = self.held()?;
        self.same_app(&d)?;
        if d.kind != DeploymentKind::Deploy || d.status.is_finished() {
            return Err(Error::NotResumable { id: d.id, status: d.status, kind: d.kind });
        }
        let paused = d.status == DeploymentStatus::Paused;
        if paused_only && !paused {
            return Err(Error::NotPaused {
                id: d.id,
                status: d.status,
                hint: " (use `ferry resume` if its coordinator died)",
            });
        }
        if !paused && !lock.stale() && !lock.mine() && !self.force_unlock {
            return Err(Error::StillRunning {
                id: d.id,
                lock: Box::new(lock),
                next: "resume only what a dead coordinator left (or pass --force-unlock)",
            });
        }
        Ok(d)
    }

    /// Refuses to continue or unwind a deployment of another app than this engine's.
    fn same_app(&self, d: &DeploymentRow) -> Result<(), Error> {
        if d.app.is_empty() || d.app == self.config.app.name {
            return Ok(());
        }
        Err(Error::OtherApp {
            env: self.env.to_string(),
            id: d.id.clone(),
            app: d.app.clone(),
            this: self.config.app.name.clone(),
        })
    }

    /// Takes the environment over for deployment `d` (from [`Engine::resumable`]): its holder is
    /// gone, or it is paused (which leaves the lock with its deployment).
    pub fn take_over(&self, d: &DeploymentRow) -> Result<(), Error> {
        if let Some(lock) = self.registry.lock_of(self.env)?
            && lock.deployment_id == d.id
            && (lock.mine() || lock.stale() || d.status == DeploymentStatus::Paused)
        {
            self.registry.unlock(self.env, &d.id)?;
        }
        self.take_lock(&d.id)?;
        self.emit(&Event::Continuing { id: &d.id, version: &d.version, env: &d.environment });
        self.registry.event(&d.id, None, "resumed", &format!("by pid {}", std::process::id()))?;
        self.emit(&Event::Started { id: &d.id });
        Ok(())
    }

    /// Records the environment's paused deployment `cancelled` without touching a host or needing
    /// its artifact: hosts it already activated keep the new release, the others are `skipped`.
    pub fn cancel_paused(&self) -> Result<DeployReport, Error> {
        let (_, d) = self.held()?;
        if d.status != DeploymentStatus::Paused {
            return Err(Error::NotPaused { id: d.id, status: d.status, hint: "" });
        }
        self.emit(&Event::Started { id: &d.id });
        self.emit(&Event::CancellingPaused { id: &d.id });
        self.finish(&d.id, DeploymentStatus::Cancelled, Some("cancelled while paused"), &HashMap::new())
    }

    /// Drives recorded deployment `id` (created, or taken over) to its end or to a pause.
    /// `artifact` is its release's content (the same manifest it was recorded with).
    #[tracing::instrument(name = "deployment", skip_all, fields(deployment_id = id, environment = self.env, app = %self.config.app.name, version = tracing::field::Empty))]
    pub async fn run(&self, id: &str, artifact: Arc<Artifact>) -> Result<DeployReport, Error> {
        let d = self
            .registry
            .deployment(id)?
            .ok_or_else(|| Error::Corrupt { id: id.to_string(), reason: "it vanished from the registry".into() })?;
        tracing::Span::current().record("version", d.version.as_str());
        if hex::encode(artifact.manifest_hash) != d.manifest_hash {
            return Err(Error::Artifact {
                id: id.to_string(),
                source: ArtifactError::Changed { artifact: artifact.source.clone(), release: d.release_id },
            });
        }
        let plan = self.plan_of(&d)?;
        let work = run::Work::Deploy {
            activation: crate::fleet::Activation {
                release_id: d.release_id.clone(),
                version: d.version.clone(),
                deployment_id: id.to_string(),
                secrets: artifact.secrets.clone(),
            },
            release: crate::fleet::Release {
                encoded: Default::default(),
                swarm: Arc::new(if self.config.peer_fetch {
                    let env = self.environment()?;
                    let zones = env
                        .labels
                        .iter()
                        .filter_map(|(host, labels)| Some((host.clone(), labels.get("zone")?.clone())))
                        .collect();
                    crate::fleet::swarm::Swarm::for_hosts(env.hosts.len(), zones)
                } else {
                    crate::fleet::swarm::Swarm::off()
                }),
                signature: self.sign(&artifact, &d.version)?,
                artifact,
                version: d.version.clone(),
                deployment_id: id.to_string(),
            },
        };
        self.drive(&d, &plan, &work).await
    }

    /// `ferry rollback`: records it and takes the environment. If a deployment of the environment
    /// is unfinished (paused, or its coordinator died), it is unwound: the hosts it activated go
    /// back to the release they ran before. Otherwise every host goes back to its previous release
    /// (or to `to_version`), in batches the size of the rollout's first batch; a blue-green
    /// environment switches its idle group live again.
    pub fn create_rollback(&self, to_version: Option<&str>) -> Result<Rollback, Error> {
        let env = self.environment()?;
        if let Some(v) = to_version {
            check_version(v)?;
        }
        if env.strategy == Strategy::BlueGreen
            && let Some(v) = to_version
        {
            return Err(Error::BlueGreenTo { env: self.env.to_string(), version: v.to_string() });
        }
        // The environment's lock holder, if any, may be taken over only when its coordinator is
        // gone (or it is paused, ours, or --force-unlock). Without a version, an unfinished
        // deployment is unwound; a rollback to a named version supersedes it instead (every host
        // goes to that version anyway: running the same rollback again finishes one cut short).
        if let Some((lock, d)) = self.lock_record()? {
            let open = d.filter(|d| !d.status.is_finished());
            if let Some(d) = &open {
                self.same_app(d)?;
            }
            let unwind = open.as_ref().filter(|d| to_version.is_none() && d.kind == DeploymentKind::Deploy);
            if unwind.is_some() || to_version.is_some() {
                let paused = open.as_ref().is_some_and(|d| d.status == DeploymentStatus::Paused);
                if !(lock.stale() || lock.mine() || paused || self.force_unlock) {
                    return Err(Error::StillRunning {
                        id: lock.deployment_id.clone(),
                        lock: Box::new(lock),
                        next: "stop it first (Ctrl-C), or pass --force-unlock",
                    });
                }
                self.registry.unlock(self.env, &lock.deployment_id)?;
                if let Some(d) = unwind {
                    self.registry.lock(self.env, &d.id, false)?;
                    self.emit(&Event::Unwinding { id: &d.id, version: &d.version });
                    self.emit(&Event::Started { id: &d.id });
                    return Ok(Rollback::Unwind { id: d.id.clone() });
                }
                if let (Some(v), Some(d)) = (to_version, &open) {
                    let why = format!("superseded by a rollback to {v} (its coordinator was gone)");
                    self.registry.set_status(&d.id, DeploymentStatus::Failed, Some(&why))?;
                }
            }
        }
        if env.strategy == Strategy::BlueGreen {
            return self.create_switch_back(env).map(|id| Rollback::Switch { id });
        }
        let hosts = self.config.hosts(self.env)?;
        let size = plan::rollback_batch(&env.strategy, hosts.len());
        let placed: Vec<(String, usize)> = hosts.iter().enumerate().map(|(i, h)| (h.name.clone(), i / size)).collect();
        let target = to_version.map_or(Target::Previous, |v| Target::Version(v.to_string()));
        let stored = Stored {
            strategy: Strategy::Rolling { batch: vec![plan::Size::Count(size)] },
            max_failures: env.max_failures,
            auto_rollback: false,
            total_bytes: 0,
            prestage: false,
            switch: None,
            target: Some(target),
        };
        let id = new_deployment_id();
        self.record_rollback(&id, to_version.unwrap_or("previous"), &stored, &placed)?;
        Ok(Rollback::Hosts { id })
    }

    /// Records a rollback: no transfer, no release of its own.
    fn record_rollback(&self, id: &str, what: &str, stored: &Stored, placed: &[(String, usize)]) -> Result<(), Error> {
        let record = Record {
            kind: DeploymentKind::Rollback,
            version: what,
            release_id: "",
            artifact: "",
            manifest_hash: "",
            stored,
            placed,
        };
        self.record(id, &record)
    }

    /// Runs a rollback [`Engine::create_rollback`] recorded.
    pub async fn run_rollback(&self, rollback: &Rollback) -> Result<DeployReport, Error> {
        let id = rollback.id();
        let d = self
            .registry
            .deployment(id)?
            .ok_or_else(|| Error::Corrupt { id: id.to_string(), reason: "it vanished from the registry".into() })?;
        let plan = self.plan_of(&d)?;
        match rollback {
            Rollback::Unwind { id } => {
                let plan = Stored { auto_rollback: true, ..plan };
                self.halt(id, &plan, &HashMap::new(), Some("unwound by `ferry rollback`")).await
            }
            Rollback::Switch { id } => self.switch_back_in(id, &plan).await,
            Rollback::Hosts { .. } => {
                let target = plan.target.clone().unwrap_or(Target::Previous);
                self.drive(&d, &plan, &run::Work::Rollback { target }).await
            }
        }
    }

    /// The report of deployment `id` as recorded now.
    fn report(&self, id: &str, transfers: &HashMap<String, Arc<Transfer>>) -> Result<DeployReport, Error> {
        let d = self
            .registry
            .deployment(id)?
            .ok_or_else(|| Error::Corrupt { id: id.to_string(), reason: "it vanished from the registry".into() })?;
        let rows = self.registry.hosts(id)?;
        let mut report = report_from(d, rows, transfers);
        report.measurements = self.registry.measurements(id)?;
        Ok(report)
    }

    /// Ends a deployment: untouched hosts are skipped, the status recorded, the environment
    /// released.
    fn finish(
        &self,
        id: &str,
        status: DeploymentStatus,
        error: Option<&str>,
        transfers: &HashMap<String, Arc<Transfer>>,
    ) -> Result<DeployReport, Error> {
        for h in self.registry.hosts(id)? {
            if matches!(h.state, HostState::Pending | HostState::Staging | HostState::Staged) {
                self.host_state(id, &h.host, HostState::Skipped, &HostUpdate::default())?;
            }
        }
        self.registry.set_status(id, status, error)?;
        self.registry.unlock(self.env, id)?;
        let kind = match status {
            DeploymentStatus::Succeeded => Some(crate::notify::Kind::Succeeded),
            DeploymentStatus::RolledBack => Some(crate::notify::Kind::RolledBack),
            DeploymentStatus::Failed => Some(crate::notify::Kind::Failed),
            DeploymentStatus::Cancelled => Some(crate::notify::Kind::Cancelled),
            DeploymentStatus::Pending | DeploymentStatus::Running | DeploymentStatus::Paused => None,
        };
        if let Some(kind) = kind {
            self.notify(kind, id, None, error);
        }
        self.report(id, transfers)
    }
}
