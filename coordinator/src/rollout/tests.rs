//! The engine on a scripted fleet ([`crate::fleet::fake`]) and an in-memory registry: every rule
//! of a rollout, each in milliseconds, asserting on what the engine asked of the hosts.
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::*;
use crate::client::ErrorKind;
use crate::fleet::fake::{Behave, Call, Fake, Script};
use crate::registry::sqlite::Sqlite;

/// A fleet.toml with one environment `prod` of `hosts` hosts (`web-0001`…) and `env` as its
/// extra keys.
fn config(hosts: usize, env: &str) -> FleetConfig {
    let mut text = String::from(
        "[app]\nname = \"web\"\n[tls]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"c.key\"\n[environments.prod]\n",
    );
    text.push_str(env);
    text.push_str("\n[environments.prod.hosts]\n");
    for i in 0..hosts {
        text.push_str(&format!("{} = \"10.{}.{}.{}:7443\"\n", name(i), i / 65536, i / 256 % 256, i % 256));
    }
    FleetConfig::from_toml(std::path::Path::new("/fleet.toml"), &text).expect("fleet.toml")
}

fn name(i: usize) -> String {
    format!("web-{:04}", i + 1)
}

/// A build whose content is `content`.
fn artifact(dir: &tempfile::TempDir, content: &str) -> Arc<Artifact> {
    let root = dir.path().join(content);
    std::fs::create_dir_all(&root).expect("mkdir");
    std::fs::write(root.join("index.html"), content).expect("write");
    Arc::new(Artifact::scan(&root, None).expect("scan"))
}

struct World {
    config: FleetConfig,
    registry: Box<dyn Registry>,
    fleet: Fake,
    cancel: CancellationToken,
    /// Every event, as the output layer words it.
    lines: Mutex<Vec<String>>,
    dir: tempfile::TempDir,
}

impl World {
    fn new(hosts: usize, env: &str) -> World {
        World::on(Box::new(Sqlite::in_memory().expect("registry")), hosts, env)
    }

    /// A world whose registry is `registry`.
    fn on(registry: Box<dyn Registry>, hosts: usize, env: &str) -> World {
        let world = World {
            config: config(hosts, env),
            registry,
            fleet: Fake::new(),
            cancel: CancellationToken::new(),
            lines: Mutex::new(Vec::new()),
            dir: tempfile::tempdir().expect("tempdir"),
        };
        for i in 0..hosts {
            world.fleet.runs(&name(i), "0-00000000");
        }
        world
    }

    fn engine<'a>(&'a self, observer: &'a dyn Observer) -> Engine<'a> {
        Engine {
            config: &self.config,
            env: "prod",
            fleet: &self.fleet,
            registry: self.registry.as_ref(),
            observer,
            cancel: &self.cancel,
            force_unlock: false,
            notifier: &crate::notify::OFF,
        }
    }

    fn record(&self, event: &Event<'_>) {
        if let (Some((host, line)), Ok(mut lines)) = (crate::ui::event_line(event), self.lines.lock()) {
            lines.push(format!("{host}: {line}"));
        }
    }

    async fn deploy(&self, content: &str, version: &str) -> DeployReport {
        let observer = |e: &Event<'_>| self.record(e);
        let engine = self.engine(&observer);
        let a = artifact(&self.dir, content);
        let id = engine.create(&a, version, true).expect("recorded");
        engine.run(&id, a).await.expect("runs")
    }

    async fn rollback(&self, to: Option<&str>) -> DeployReport {
        let observer = |e: &Event<'_>| self.record(e);
        let engine = self.engine(&observer);
        let r = engine.create_rollback(to).expect("recorded");
        engine.run_rollback(&r).await.expect("runs")
    }

    async fn resume(&self, paused_only: bool) -> DeployReport {
        let observer = |e: &Event<'_>| self.record(e);
        let engine = self.engine(&observer);
        let d = engine.resumable(paused_only).expect("resumable");
        engine.take_over(&d).expect("taken over");
        let a = Arc::new(Artifact::scan(std::path::Path::new(&d.artifact), None).expect("scan"));
        engine.run(&d.id, a).await.expect("runs")
    }

    /// The hosts activated, in the order asked.
    fn activations(&self) -> Vec<String> {
        self.fleet
            .calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Activate { host, .. } => Some(host),
                _ => None,
            })
            .collect()
    }

    fn fails(&self, host: usize, kind: ErrorKind) {
        self.fleet.script(
            &name(host),
            Script { activate: Behave::Fail(kind, "probe /health: 503".into()), ..Default::default() },
        );
    }
}

fn outcomes(r: &DeployReport) -> Vec<HostOutcome> {
    r.hosts.iter().map(|h| h.status).collect()
}

#[tokio::test]
async fn failures_within_the_budget_go_on_and_one_more_halts() {
    failures_within_the_budget(World::new(5, "batch = 1\nmax_failures = 1")).await;
}

async fn failures_within_the_budget(w: World) {
    w.fails(1, ErrorKind::RolledBack);
    w.fails(3, ErrorKind::Failed);
    let r = w.deploy("v2", "2").await;
    use HostOutcome::*;
    assert_eq!(r.status, DeploymentStatus::Failed);
    assert_eq!(outcomes(&r), [Succeeded, RolledBack, Succeeded, Failed, Skipped]);
    // Host 5 was staged but never asked to activate: the halt came first.
    assert_eq!(w.activations(), [name(0), name(1), name(2), name(3)]);
    assert!(w.lines.lock().expect("lines").iter().any(|l| l.contains("2 host(s) failed, more than max_failures = 1")));
    // The environment is free again.
    assert_eq!(w.registry.lock_of("prod").expect("lock"), None);
}

#[tokio::test]
async fn a_canary_pauses_after_each_step_until_promoted() {
    canary_pauses(World::new(4, CANARY)).await;
}

const CANARY: &str = "strategy = \"canary\"\nsteps = [1, \"50%\"]\npause = \"manual\"";

async fn canary_pauses(w: World) {
    let r = w.deploy("v2", "2").await;
    assert_eq!(r.status, DeploymentStatus::Paused);
    assert_eq!(w.activations(), [name(0)]);
    // A paused deployment keeps its lock: nothing else may start.
    let other = w.engine(&quiet).create(&artifact(&w.dir, "v3"), "3", true).expect_err("locked");
    assert!(matches!(other, Error::Registry(RegistryError::Locked { .. })), "{other}");
    let r = w.resume(true).await;
    assert_eq!(r.status, DeploymentStatus::Paused);
    assert_eq!(w.activations(), [name(0), name(1)]);
    let r = w.resume(true).await;
    assert_eq!(r.status, DeploymentStatus::Succeeded);
    assert_eq!(w.activations(), [name(0), name(1), name(2), name(3)]);
    // Nothing is paused any more.
    let e = w.engine(&quiet).resumable(true).expect_err("nothing to continue");
    assert!(matches!(e, Error::NothingInProgress { .. }), "{e}");
}

#[tokio::test]
async fn a_timed_pause_wakes_on_the_cancel() {
    let w = World::new(2, "strategy = \"canary\"\nsteps = [1]\npause = \"1h\"");
    let cancel = w.cancel.clone();
    let stopper = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        cancel.cancel();
    });
    let r = tokio::time::timeout(Duration::from_secs(30), w.deploy("v2", "2"))
        .await
        .expect("the pause ended on the cancel");
    stopper.await.expect("stopper");
    assert_eq!(r.status, DeploymentStatus::Cancelled);
    assert_eq!(outcomes(&r), [HostOutcome::Succeeded, HostOutcome::Skipped]);
}

#[tokio::test]
async fn a_cancel_lets_the_batch_in_flight_finish_and_touches_nothing_after() {
    let w = World::new(6, "batch = 2");
    let observer = |e: &Event<'_>| {
        if let Event::Batch { number: 2, .. } = e {
            w.cancel.cancel();
        }
    };
    let engine = w.engine(&observer);
    let a = artifact(&w.dir, "v2");
    let id = engine.create(&a, "2", true).expect("recorded");
    let r = engine.run(&id, a).await.expect("runs");
    use HostOutcome::*;
    assert_eq!(r.status, DeploymentStatus::Cancelled);
    assert_eq!(outcomes(&r), [Succeeded, Succeeded, Succeeded, Succeeded, Skipped, Skipped]);
    assert_eq!(w.fleet.current(&name(4)).as_deref(), Some("0-00000000"));
}

#[tokio::test]
async fn a_halt_with_auto_rollback_sends_every_updated_host_back_and_no_other() {
    halt_with_auto_rollback(World::new(4, "batch = 1\nauto_rollback = true")).await;
}

/// The engine's rollouts, halts, pauses and resumes on a real PostgreSQL registry.
#[tokio::test]
async fn the_engine_runs_the_same_on_a_postgres_registry() {
    let Some(pg) = crate::registry::testpg::TestPg::start() else { return };
    let on = |db: &str| -> Box<dyn Registry> {
        Box::new(crate::registry::postgres::Postgres::open(&pg.database(db)).expect("postgres"))
    };
    failures_within_the_budget(World::on(on("budget"), 5, "batch = 1\nmax_failures = 1")).await;
    canary_pauses(World::on(on("canary"), 4, CANARY)).await;
    halt_with_auto_rollback(World::on(on("halt"), 4, "batch = 1\nauto_rollback = true")).await;
}

async fn halt_with_auto_rollback(w: World) {
    let before = w.deploy("v2", "2").await;
    assert_eq!(before.status, DeploymentStatus::Succeeded);
    let v2 = before.release_id.clone();
    // v3: web-2 already runs it (unchanged), web-3 fails and its agent goes back by itself.
    let v3 = artifact(&w.dir, "v3").release_id("3");
    w.fleet.runs(&name(1), &v3);
    w.fails(2, ErrorKind::RolledBack);
    let r = w.deploy("v3", "3").await;
    use HostOutcome::*;
    assert_eq!(r.status, DeploymentStatus::RolledBack, "{:?}", w.lines.lock().expect("lines"));
    assert_eq!(outcomes(&r), [RolledBack, Unchanged, RolledBack, Skipped]);
    // web-1 went back to v2; web-2 was never "rolled back" to the release it already ran.
    assert_eq!(w.fleet.current(&name(0)), Some(v2.clone()));
    assert_eq!(w.fleet.current(&name(1)), Some(v3));
    let rollbacks: Vec<Call> = w.fleet.calls().into_iter().filter(|c| matches!(c, Call::Rollback { .. })).collect();
    assert_eq!(rollbacks, [Call::Rollback { host: name(0), target: Target::Release(v2) }]);
}

#[tokio::test]
async fn blue_green_switches_back_when_the_switch_fails() {
    let env = "strategy = \"blue-green\"\nauto_rollback = true\nswitch = 'test \"$FERRY_GROUP\" != green'\n\
               groups = { blue = [\"web-0001\", \"web-0002\"], green = [\"web-0003\", \"web-0004\"] }";
    let w = World::new(4, env);
    let first = w.deploy("v2", "2").await;
    assert_eq!(first.status, DeploymentStatus::Succeeded);
    assert_eq!(w.registry.live_group("prod").expect("q").map(|(g, _)| g).as_deref(), Some("blue"));
    assert_eq!(first.hosts.iter().map(|h| h.name.clone()).collect::<Vec<_>>(), [name(0), name(1)]);
    let r = w.deploy("v3", "3").await;
    assert_eq!(r.status, DeploymentStatus::RolledBack);
    // Blue is live again, green went back to what it ran.
    assert_eq!(w.registry.live_group("prod").expect("q").map(|(g, _)| g).as_deref(), Some("blue"));
    assert_eq!(w.fleet.current(&name(2)).as_deref(), Some("0-00000000"));
    let lines = w.lines.lock().expect("lines").join("\n");
    assert!(lines.contains("switch to green FAILED") && lines.contains("switched blue back in"), "{lines}");
}

#[tokio::test(start_paused = true)]
async fn a_host_stuck_past_its_time_limit_fails_and_the_failure_policy_takes_over() {
    // Without auto_rollback: the stuck host fails with the step and the limit, the rollout halts.
    let w = World::new(3, "batch = 1\nprogress_deadline = \"10m\"");
    w.fleet.script(&name(1), Script { activate: Behave::Hang, ..Default::default() });
    let r = w.deploy("v2", "2").await;
    use HostOutcome::*;
    assert_eq!((r.status, outcomes(&r)), (DeploymentStatus::Failed, vec![Succeeded, Failed, Skipped]));
    let error = r.hosts[1].error.as_deref().unwrap_or_default();
    assert!(error.contains("host web-0002") && error.contains("activation did not finish within 10m"), "{error}");
    // With auto_rollback the halt sends it back too (its swap may have begun).
    let w = World::new(3, "batch = 1\nprogress_deadline = \"10m\"\nauto_rollback = true");
    w.fleet.script(&name(1), Script { activate: Behave::Hang, ..Default::default() });
    let r = w.deploy("v2", "2").await;
    assert_eq!((r.status, outcomes(&r)), (DeploymentStatus::RolledBack, vec![RolledBack, RolledBack, Skipped]));
    assert!(w.fleet.calls().contains(&Call::Rollback { host: name(1), target: Target::Release("0-00000000".into()) }));
    // A rollback that hangs as well is bounded by its own limit.
    let w = World::new(2, "batch = 1\nprogress_deadline = \"10m\"\nauto_rollback = true");
    w.fleet.script(&name(1), Script { activate: Behave::Hang, rollback: Behave::Hang, ..Default::default() });
    let r = w.deploy("v2", "2").await;
    assert_eq!((r.status, outcomes(&r)), (DeploymentStatus::Failed, vec![RolledBack, Failed]));
    let error = r.hosts[1].error.as_deref().unwrap_or_default();
    assert!(error.contains("rollback did not finish within 10m"), "{error}");
}

/// A deployment renews its lock while it runs, also through a step that takes long.
#[tokio::test(start_paused = true)]
async fn a_running_deployment_renews_its_lock() {
    let w = World::new(2, "batch = 1\nprogress_deadline = \"10m\"");
    w.fleet.script(&name(1), Script { activate: Behave::Hang, ..Default::default() });
    let counted = Dies { inner: w.registry.as_ref(), left: Mutex::new(usize::MAX), renewals: Default::default() };
    let engine = Engine { registry: &counted, ..w.engine(&quiet) };
    let a = artifact(&w.dir, "v2");
    let id = engine.create(&a, "2", true).expect("recorded");
    let r = engine.run(&id, a).await.expect("runs");
    assert_eq!(r.status, DeploymentStatus::Failed, "web-0002 hung for its 10 minutes");
    let renewals = counted.renewals.load(std::sync::atomic::Ordering::Relaxed);
    assert!(renewals >= 119, "one renewal every 5 s over 10 minutes, got {renewals}");
}

#[tokio::test]
async fn a_rollback_goes_through_the_state_machine_and_reports_the_release_it_went_back_to() {
    let w = World::new(4, "batch = 2\nmax_failures = 0");
    let v2 = w.deploy("v2", "2").await;
    assert_eq!(v2.status, DeploymentStatus::Succeeded);
    let r = w.rollback(None).await;
    assert_eq!((r.kind, r.status), (DeploymentKind::Rollback, DeploymentStatus::Succeeded));
    for h in &r.hosts {
        // Regression: RELEASE showed the release the host left, not the one it went back to.
        assert_eq!(h.release.as_deref(), Some("0-00000000"), "{}", h.name);
        assert_eq!(h.previous_release.as_deref(), Some(v2.release_id.as_str()), "{}", h.name);
    }
    // Batches of the rollout's first batch size, in order.
    let hosts: Vec<String> = w
        .fleet
        .calls()
        .into_iter()
        .filter(|c| matches!(c, Call::Rollback { .. }))
        .map(|c| c.host().to_string())
        .collect();
    assert_eq!(hosts, [name(0), name(1), name(2), name(3)]);
    // A rollback with a failing host halts before the next batch.
    w.fleet.script(
        &name(0),
        Script { rollback: Behave::Fail(ErrorKind::Rpc, "no kept release".into()), ..Default::default() },
    );
    let r = w.rollback(Some("2")).await;
    assert_eq!(r.status, DeploymentStatus::Failed);
    assert_eq!(outcomes(&r)[2..], [HostOutcome::Skipped, HostOutcome::Skipped]);
}

/// A rollback to a named version whose coordinator died is finished by running it again: it
/// supersedes the one cut short (recorded failed, saying so), and every host ends on the version.
#[tokio::test]
async fn a_rollback_cut_short_is_finished_by_running_it_again() {
    let w = World::new(3, "batch = 1");
    assert_eq!(w.deploy("v2", "2").await.status, DeploymentStatus::Succeeded);
    assert_eq!(w.deploy("v3", "3").await.status, DeploymentStatus::Succeeded);
    let dies = Dies { inner: w.registry.as_ref(), left: Mutex::new(2), renewals: Default::default() };
    let killed = Engine { registry: &dies, ..w.engine(&quiet) };
    let r = killed.create_rollback(Some("2")).expect("recorded");
    let e = killed.run_rollback(&r).await.expect_err("the coordinator died");
    assert!(matches!(e, Error::Registry(RegistryError::Poisoned)), "{e}");
    let again = w.rollback(Some("2")).await;
    assert_eq!(again.status, DeploymentStatus::Succeeded, "{again:?}");
    assert!(again.hosts.iter().all(|h| h.release.as_deref().is_some_and(|r| r.starts_with("2-"))), "{again:?}");
    let cut = w.registry.deployment(r.id()).expect("read").expect("recorded");
    assert_eq!(cut.status, DeploymentStatus::Failed);
    assert!(cut.error.as_deref().is_some_and(|e| e.contains("superseded by a rollback to 2")), "{cut:?}");
}

/// A registry that dies (like its coordinator) right after the `n`th host transition is durable.
struct Dies<'a> {
    inner: &'a dyn Registry,
    left: Mutex<usize>,
    /// Lock renewals seen.
    renewals: std::sync::atomic::AtomicUsize,
}

impl Registry for Dies<'_> {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn set_host(&self, id: &str, host: &str, to: HostState, update: &HostUpdate<'_>) -> Result<(), RegistryError> {
        let mut left = self.left.lock().map_err(|_| RegistryError::Poisoned)?;
        if *left == 0 {
            return Err(RegistryError::Poisoned);
        }
        *left -= 1;
        self.inner.set_host(id, host, to, update)
    }
    fn lock_of(&self, env: &str) -> Result<Option<Lock>, RegistryError> {
        self.inner.lock_of(env)
    }
    fn lock(&self, env: &str, id: &str, force: bool) -> Result<Option<Lock>, RegistryError> {
        self.inner.lock(env, id, force)
    }
    fn unlock(&self, env: &str, id: &str) -> Result<(), RegistryError> {
        self.inner.unlock(env, id)
    }
    fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        address: &str,
        ttl: std::time::Duration,
    ) -> Result<crate::registry::Lease, RegistryError> {
        self.inner.acquire_lease(name, holder, address, ttl)
    }
    fn lease_of(&self, name: &str) -> Result<Option<crate::registry::Lease>, RegistryError> {
        self.inner.lease_of(name)
    }
    fn release_lease(&self, name: &str, holder: &str) -> Result<(), RegistryError> {
        self.inner.release_lease(name, holder)
    }
    fn renew_lock(&self, env: &str, id: &str) -> Result<(), RegistryError> {
        self.renewals.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.renew_lock(env, id)
    }
    fn create(&self, d: &NewDeployment<'_>) -> Result<(), RegistryError> {
        self.inner.create(d)
    }
    fn set_status(&self, id: &str, status: DeploymentStatus, error: Option<&str>) -> Result<(), RegistryError> {
        self.inner.set_status(id, status, error)
    }
    fn event(&self, id: &str, host: Option<&str>, kind: &str, message: &str) -> Result<(), RegistryError> {
        self.inner.event(id, host, kind, message)
    }
    fn deployment(&self, id: &str) -> Result<Option<DeploymentRow>, RegistryError> {
        self.inner.deployment(id)
    }
    fn hosts(&self, id: &str) -> Result<Vec<crate::registry::HostRow>, RegistryError> {
        self.inner.hosts(id)
    }
    fn activated_hosts(&self, id: &str) -> Result<std::collections::HashSet<String>, RegistryError> {
        self.inner.activated_hosts(id)
    }
    fn history(&self, env: Option<&str>, app: Option<&str>, limit: usize) -> Result<Vec<DeploymentRow>, RegistryError> {
        self.inner.history(env, app, limit)
    }
    fn report(&self, env: Option<&str>) -> Result<Vec<crate::registry::EnvReport>, RegistryError> {
        self.inner.report(env)
    }
    fn latest_deployment(&self, env: &str, app: Option<&str>) -> Result<Option<String>, RegistryError> {
        self.inner.latest_deployment(env, app)
    }
    fn events_since(&self, id: &str, after: i64) -> Result<Vec<crate::registry::EventRow>, RegistryError> {
        self.inner.events_since(id, after)
    }
    fn live_group(&self, env: &str) -> Result<Option<(String, String)>, RegistryError> {
        self.inner.live_group(env)
    }
    fn set_live_group(&self, env: &str, group: &str, id: &str) -> Result<(), RegistryError> {
        self.inner.set_live_group(env, group, id)
    }
    fn register_version(
        &self,
        v: &crate::registry::VersionRow,
    ) -> Result<Option<crate::registry::VersionRow>, RegistryError> {
        self.inner.register_version(v)
    }
    fn version(&self, app: &str, version: &str) -> Result<Option<crate::registry::VersionRow>, RegistryError> {
        self.inner.version(app, version)
    }
    fn versions(&self, app: Option<&str>, limit: usize) -> Result<Vec<crate::registry::VersionRow>, RegistryError> {
        self.inner.versions(app, limit)
    }
    fn claim_versions(&self, app: &str) -> Result<usize, RegistryError> {
        self.inner.claim_versions(app)
    }
    fn set_requested_by(&self, id: &str, by: &str, from: Option<&str>) -> Result<(), RegistryError> {
        self.inner.set_requested_by(id, by, from)
    }
    fn record_smoke(&self, run: &crate::registry::SmokeRun) -> Result<i64, RegistryError> {
        self.inner.record_smoke(run)
    }
    fn smoke_runs(&self, id: &str) -> Result<Vec<crate::registry::SmokeRun>, RegistryError> {
        self.inner.smoke_runs(id)
    }
    fn record_measurement(&self, m: &crate::registry::Measurement) -> Result<(), RegistryError> {
        self.inner.record_measurement(m)
    }
    fn measurements(&self, id: &str) -> Result<Vec<crate::registry::Measurement>, RegistryError> {
        self.inner.measurements(id)
    }
    fn approve(&self, id: &str, env: &str, by: &str) -> Result<(), RegistryError> {
        self.inner.approve(id, env, by)
    }
    fn use_approval(&self, id: &str, env: &str, by: &str, promotion: &str) -> Result<(), RegistryError> {
        self.inner.use_approval(id, env, by, promotion)
    }
    fn approvals(&self, id: &str) -> Result<Vec<crate::registry::Approval>, RegistryError> {
        self.inner.approvals(id)
    }
}

/// Kill the coordinator after each host transition in turn; a resume from what was persisted
/// ends every host healthy, activates a host caught mid-swap again (a no-op on its agent), and
/// never activates a host that had finished.
#[tokio::test]
async fn resume_from_every_persisted_state() {
    // 3 hosts, batches of 2: staging, staged, activating, healthy for each host.
    let transitions = 3 * 4;
    for n in 0..transitions {
        let w = World::new(3, "batch = 2");
        let a = artifact(&w.dir, "v2");
        let dies = Dies { inner: w.registry.as_ref(), left: Mutex::new(n), renewals: Default::default() };
        let killed = Engine { registry: &dies, ..w.engine(&quiet) };
        let id = killed.create(&a, "2", true).expect("recorded");
        let e = killed.run(&id, a.clone()).await.expect_err("the coordinator died");
        assert!(matches!(e, Error::Registry(RegistryError::Poisoned)), "{e}");
        let healthy_before: Vec<String> = w
            .registry
            .hosts(&id)
            .expect("hosts")
            .into_iter()
            .filter(|h| h.state == HostState::Healthy)
            .map(|h| h.host)
            .collect();
        let asked_before = w.activations().len();
        let r = w.resume(false).await;
        assert_eq!(r.status, DeploymentStatus::Succeeded, "killed after {n} transitions");
        assert!(r.hosts.iter().all(|h| h.status == HostOutcome::Succeeded), "killed after {n}: {:?}", outcomes(&r));
        let resumed = &w.activations()[asked_before..];
        for h in &healthy_before {
            assert!(!resumed.contains(h), "killed after {n}: {h} was healthy and was activated again");
        }
        for i in 0..3 {
            let times = w.activations().iter().filter(|h| **h == name(i)).count();
            assert!((1..=2).contains(&times), "killed after {n}: {} activated {times} times", name(i));
            assert_eq!(w.fleet.current(&name(i)), Some(a.release_id("2")));
        }
    }
}

/// The engine at fleet scale: 10,000 hosts in batches of 1%: never more than a batch active at
/// once, batches in order, every host activated exactly once and ending healthy.
#[tokio::test]
async fn ten_thousand_hosts_roll_out_in_order_a_batch_at_a_time() {
    let hosts = 10_000;
    let w = World::new(hosts, "batch = \"1%\"\nmax_failures = 0");
    let r = w.deploy("v2", "2").await;
    assert_eq!(r.status, DeploymentStatus::Succeeded);
    assert_eq!(r.hosts.len(), hosts);
    assert!(r.hosts.iter().all(|h| h.status == HostOutcome::Succeeded));
    assert!(w.fleet.max_active() <= 100, "{} activations at once", w.fleet.max_active());
    assert!(w.fleet.max_active() > 1, "the batch ran one host at a time");
    let order = w.activations();
    assert_eq!(order.len(), hosts, "every host activated exactly once");
    // Batch k holds hosts k*100 .. k*100+99: a host of batch k+1 never goes before one of batch k.
    let batch_of = |h: &str| h.trim_start_matches("web-").parse::<usize>().map(|n| (n - 1) / 100).unwrap_or(usize::MAX);
    assert!(order.windows(2).all(|w| batch_of(&w[0]) <= batch_of(&w[1])), "batch order broken");
    let mut seen = order.clone();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), hosts);
}

/// Staging is limited on time without progress, not on its whole length: a slow link that keeps
/// sending is waited for; one that stops sending fails its host after the deadline.
#[tokio::test(start_paused = true)]
async fn staging_is_failed_only_when_it_stops_moving() {
    let w = World::new(2, "batch = 1\nprogress_deadline = \"10m\"\nmax_failures = 1");
    w.fleet.script(&name(0), Script { stage_for: Duration::from_secs(45 * 60), ..Default::default() });
    w.fleet.script(&name(1), Script { stage: Behave::Hang, ..Default::default() });
    let r = w.deploy("v2", "2").await;
    assert_eq!(outcomes(&r), [HostOutcome::Succeeded, HostOutcome::Failed]);
    let error = r.hosts[1].error.as_deref().unwrap_or_default();
    assert!(error.contains("staging made no progress for 10m"), "{error}");
    assert_eq!(w.activations(), [name(0)], "the stuck host was never activated");
}

/// Without `progress_deadline`, the limit is 10 minutes or twice what the app's own hooks and
/// probes may take, whichever is longer.
#[test]
fn the_default_progress_deadline_leaves_room_for_the_apps_hooks() {
    let c = config(1, "");
    assert_eq!(c.progress_deadline(&c.environments["prod"]), Duration::from_secs(600));
    let mut slow = c.clone();
    slow.app.hooks.timeout = Duration::from_secs(15 * 60);
    // Three hooks of 15m each, twice: 90m.
    assert_eq!(slow.progress_deadline(&slow.environments["prod"]), Duration::from_secs(90 * 60));
    let set = config(1, "progress_deadline = \"20m\"");
    assert_eq!(set.progress_deadline(&set.environments["prod"]), Duration::from_secs(20 * 60));
}

/// One deployment per environment at a time, whatever its app; and a deployment of one app is
/// never continued or unwound with another app's config.
#[test]
fn another_apps_deployment_is_neither_resumed_nor_unwound() {
    let w = World::new(2, "");
    let a = artifact(&w.dir, "v2");
    let web = w.engine(&quiet);
    let id = web.create(&a, "2", true).expect("recorded");
    let mut api_config = w.config.clone();
    api_config.app.name = "api".into();
    let api = Engine { config: &api_config, ..w.engine(&quiet) };
    let e = api.resumable(false).expect_err("another app's").to_string();
    assert_eq!(
        e,
        format!("prod is held by deployment {id} of app web, not api: resume or roll back app web first (--app web)")
    );
    let e = api.create_rollback(None).expect_err("another app's").to_string();
    assert!(e.contains(&format!("held by deployment {id} of app web, not api")), "{e}");
    assert!(api.create(&a, "2", true).is_err(), "the environment is taken");
    // Its own app may continue it.
    assert_eq!(web.resumable(false).expect("resumable").id, id);
}
