//! Soak on the real fleet: deployments and rollbacks one after another, each with a fault injected
//! at random (an agent killed -9 at a failpoint during staging, swap or restart, or at a random
//! moment; a host's link cut for a while; the coordinator killed -9 mid-rollout). After each
//! round, before anything is healed, every host must still have a complete release that some
//! deployment put there (crash safety). Then the faults are healed, the round's operation is
//! finished (`ferry resume` after a coordinator kill) or run again, and the registry and the hosts
//! must agree: the newest deployment succeeded, and each host runs, serves and holds exactly the
//! release the registry recorded for it.
//!
//! `FERRY_SOAK_ROUNDS` (default 6: the short run CI makes), `FERRY_SOAK_SEED` (default 777, so
//! CI's run is the same each time; `scripts/soak.sh` picks a new one per run and prints it, so a
//! failing run can be replayed). `scripts/soak.sh` runs a long one and prints the figures
//! RELIABILITY.md records.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use ferry_coordinator::registry::Registry;
use ferry_coordinator::registry::sqlite::Sqlite;
use ferry_coordinator::state::DeploymentStatus;
use ferry_tests::demo_app::{self, Variant};
use ferry_tests::fleet::{Fleet, FleetHost, poll};

const HOSTS: usize = 3;
const POINTS_STAGE: [&str; 4] = ["after-upload", "mid-materialize", "before-promote", "before-swap-rename"];
const POINTS_ACTIVATE: [&str; 3] = ["before-swap-rename", "after-swap", "after-restart"];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, Clone)]
enum Op {
    Deploy(String),
    Rollback(String),
}

#[derive(Debug, Clone)]
enum Fault {
    None,
    /// The host's agent dies (SIGKILL) at this failpoint.
    Failpoint {
        host: usize,
        point: &'static str,
    },
    /// systemd kills the host's agent with SIGKILL this long into the operation.
    KillAgent {
        host: usize,
        after: Duration,
    },
    /// The host's link is down from `after` for 4 s.
    CutLink {
        host: usize,
        after: Duration,
    },
    /// The coordinator (`ferry` and all it started) is killed with SIGKILL this long in.
    KillCoordinator {
        after: Duration,
    },
}

impl Fault {
    fn kind(&self) -> String {
        match self {
            Fault::None => "none".into(),
            Fault::Failpoint { point, .. } => format!("agent kill -9 at {point}"),
            Fault::KillAgent { .. } => "agent kill -9 at a random moment".into(),
            Fault::CutLink { .. } => "link cut for 4 s".into(),
            Fault::KillCoordinator { .. } => "coordinator kill -9".into(),
        }
    }
}

fn args(op: &Op, config: &Path, artifacts: &BTreeMap<String, PathBuf>) -> Vec<String> {
    let config = config.display().to_string();
    let mut a: Vec<String> = match op {
        Op::Deploy(v) => {
            let dir = artifacts[v].display().to_string();
            ["deploy", "--config", &config, "--env", "test", "--artifact", &dir, "--version", v]
                .map(String::from)
                .to_vec()
        }
        Op::Rollback(v) => ["rollback", "--config", &config, "--env", "test", "--to", v].map(String::from).to_vec(),
    };
    a.extend(["--output".into(), "json".into()]);
    a
}

/// Runs `ferry ARGS` to its end (bounded); its exit code, or None if it was killed.
fn wait(child: &mut Child, limit: Duration) -> Option<i32> {
    let status = poll(limit, || child.try_wait().ok().flatten());
    match status {
        Some(s) => s.code(),
        None => {
            let _ = child.kill();
            panic!("ferry did not finish within {limit:?}");
        }
    }
}

fn kill_group(child: &Child) {
    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
}

/// The release id `current` names on the host.
fn current(h: &FleetHost) -> Result<String, String> {
    let link = h.path("/var/lib/ferry/apps/web/current");
    let target = std::fs::read_link(&link).map_err(|e| format!("{}: current: {e}", h.name))?;
    Ok(target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default())
}

/// Every file, directory and symlink of `artifact` is in `tree`, the same.
fn same_tree(artifact: &Path, tree: &Path, rel: &str) -> Result<(), String> {
    let entries = std::fs::read_dir(artifact.join(rel)).map_err(|e| format!("{rel}: {e}"))?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = if rel.is_empty() { name.clone() } else { format!("{rel}/{name}") };
        let meta = std::fs::symlink_metadata(e.path()).map_err(|e| format!("{path}: {e}"))?;
        let theirs = std::fs::symlink_metadata(tree.join(&path)).map_err(|e| format!("{path} is missing: {e}"))?;
        if meta.is_dir() {
            if !theirs.is_dir() {
                return Err(format!("{path} is not a directory"));
            }
            same_tree(artifact, tree, &path)?;
        } else if meta.file_type().is_symlink() {
            if std::fs::read_link(e.path()).ok() != std::fs::read_link(tree.join(&path)).ok() {
                return Err(format!("{path}: another symlink target"));
            }
        } else if std::fs::read(e.path()).ok() != std::fs::read(tree.join(&path)).ok() {
            return Err(format!("{path}: other content"));
        }
    }
    Ok(())
}

/// Crash safety: the host's current release is complete and is the artifact of its version.
fn complete(h: &FleetHost, artifacts: &BTreeMap<String, PathBuf>) -> Result<String, String> {
    let id = current(h)?;
    let version = ferry_agent::store::version_of(&id).to_string();
    let artifact = artifacts.get(&version).ok_or_else(|| format!("{}: runs {id}, which no deployment made", h.name))?;
    let tree = h.path(&format!("/var/lib/ferry/apps/web/releases/{id}"));
    same_tree(artifact, &tree, "").map_err(|e| format!("{}: release {id} is not complete: {e}", h.name))?;
    // Inside the host: /srv/web is an absolute symlink, resolved in the host's own root.
    let through_root = h
        .exec(&["cat", "/srv/web/VERSION"])
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if through_root.trim() != version {
        return Err(format!("{}: /srv/web/VERSION says {through_root:?}, current is {id}", h.name));
    }
    Ok(id)
}

/// After healing: the newest deployment succeeded; each host runs, holds and serves the release
/// the registry recorded for it.
fn agreed(fleet: &Fleet, artifacts: &BTreeMap<String, PathBuf>, want: &str) -> Result<(), String> {
    let registry = Sqlite::open(&fleet.dir.join("registry.db")).map_err(|e| e.to_string())?;
    let newest = registry.history(Some("test"), None, 1).map_err(|e| e.to_string())?;
    let d = newest.first().ok_or("no deployment recorded")?;
    if d.status != DeploymentStatus::Succeeded || d.version != want {
        return Err(format!(
            "the newest deployment is {} of {} ({}), not a succeeded one of {want}",
            d.id, d.version, d.status
        ));
    }
    for row in registry.hosts(&d.id).map_err(|e| e.to_string())? {
        let h = fleet.host(&row.host);
        let expected = row.release.clone().unwrap_or_else(|| d.release_id.clone());
        let id = complete(h, artifacts)?;
        if id != expected {
            return Err(format!("{}: runs {id}, the registry says {expected} ({:?})", h.name, row.state));
        }
        let version = ferry_agent::store::version_of(&id);
        let (status, body) = fleet
            .http_get(&format!("http://{}:{}/", h.ip, demo_app::PORT))
            .map_err(|e| format!("{}: the app does not answer: {e}", h.name))?;
        if status != 200 || body.trim() != version {
            return Err(format!("{}: the app serves {status} {body:?}, not version {version}", h.name));
        }
    }
    Ok(())
}

#[test]
fn deployments_and_rollbacks_survive_random_faults_and_converge() {
    let Some(fleet) = Fleet::boot_or_skip(HOSTS) else { return };
    let rounds: usize = std::env::var("FERRY_SOAK_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(6);
    let seed: u64 = std::env::var("FERRY_SOAK_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(777) | 1;
    println!("soak: {rounds} rounds, seed {seed} (FERRY_SOAK_SEED={seed} replays it)");
    let mut rng = Rng(seed);
    let config = fleet.fleet_toml_with("soak.toml", "progress_deadline = \"30s\"");
    let mut artifacts = BTreeMap::new();
    let release = |n: usize, artifacts: &mut BTreeMap<String, PathBuf>| {
        let v = n.to_string();
        let dir = fleet.dir.join(format!("soak-v{v}"));
        demo_app::write_release(&dir, &v, Variant::Healthy).expect("write release");
        artifacts.insert(v.clone(), dir);
        v
    };
    let started = Instant::now();
    let (mut next, mut deployed): (usize, Vec<String>) = (1, Vec::new());
    let (mut faults, mut retries, mut failed_ops) = (BTreeMap::<String, usize>::new(), 0usize, 0usize);
    for round in 0..=rounds {
        let op = if round > 0 && deployed.len() >= 2 && rng.below(4) == 0 {
            // One of the three releases before the newest (hosts keep five).
            let back = 2 + rng.below((deployed.len() as u64 - 1).min(3)) as usize;
            let to = deployed[deployed.len() - back].clone();
            Op::Rollback(to)
        } else {
            let v = release(next, &mut artifacts);
            next += 1;
            Op::Deploy(v)
        };
        let want = match &op {
            Op::Deploy(v) | Op::Rollback(v) => v.clone(),
        };
        let host = rng.below(HOSTS as u64) as usize;
        let after = Duration::from_millis(rng.below(2500));
        let fault = match (round, rng.below(6)) {
            (0, _) | (_, 0) => Fault::None,
            (_, 1) => {
                let points: &[&str] = if matches!(op, Op::Deploy(_)) { &POINTS_STAGE } else { &POINTS_ACTIVATE };
                Fault::Failpoint { host, point: points[rng.below(points.len() as u64) as usize] }
            }
            (_, 2) => Fault::Failpoint { host, point: POINTS_ACTIVATE[rng.below(3) as usize] },
            (_, 3) => Fault::KillAgent { host, after },
            (_, 4) => Fault::CutLink { host, after },
            _ => Fault::KillCoordinator { after },
        };
        *faults.entry(fault.kind()).or_default() += 1;
        if let Fault::Failpoint { host, point } = &fault {
            std::fs::write(fleet.hosts[*host].dir.join("state/failpoints"), point).expect("arm the failpoint");
        }
        let log = fleet.dir.join(format!("soak-{round}.log"));
        let a = args(&op, &config, &artifacts);
        let argv: Vec<&str> = a.iter().map(String::as_str).collect();
        let mut child = fleet.spawn_ferry(&argv, &log);
        match &fault {
            Fault::KillAgent { host, after } => {
                std::thread::sleep(*after);
                let _ = fleet.hosts[*host].kill_agent();
            }
            Fault::CutLink { host, after } => {
                std::thread::sleep(*after);
                fleet.cut_network(&fleet.hosts[*host].name);
                std::thread::sleep(Duration::from_secs(4));
                fleet.restore_network(&fleet.hosts[*host].name);
            }
            Fault::KillCoordinator { after } => {
                std::thread::sleep(*after);
                kill_group(&child);
            }
            Fault::None | Fault::Failpoint { .. } => {}
        }
        let code = wait(&mut child, Duration::from_secs(300));
        // Crash safety, before anything is healed: every host has a complete release.
        for h in &fleet.hosts {
            if h.path("/var/lib/ferry/apps/web/current").symlink_metadata().is_ok() {
                complete(h, &artifacts).unwrap_or_else(|e| panic!("round {round} ({op:?}, {fault:?}): {e}"));
            }
        }
        // Heal: links up, failpoints disarmed, agents running.
        for h in &fleet.hosts {
            fleet.restore_network(&h.name);
            let _ = std::fs::remove_file(h.dir.join("state/failpoints"));
            assert!(
                h.wait_unit_active("ferry-agent.service", Duration::from_secs(30)),
                "round {round}: {} agent did not come back:\n{}",
                h.name,
                h.journal("ferry-agent.service", 30)
            );
        }
        // Finish what the round began: resume a rollout whose coordinator died, else run the
        // operation again until it succeeds.
        let mut ok = code == Some(0);
        if !ok {
            failed_ops += 1;
        }
        if !ok && matches!(fault, Fault::KillCoordinator { .. }) {
            let out = fleet.ferry(&["resume", "--config", &config.display().to_string(), "--env", "test"]);
            retries += 1;
            ok = out.status.success() && agreed(&fleet, &artifacts, &want).is_ok();
        }
        for _ in 0..3 {
            if ok {
                break;
            }
            let mut again = fleet.spawn_ferry(&argv, &fleet.dir.join(format!("soak-{round}-again.log")));
            retries += 1;
            ok = wait(&mut again, Duration::from_secs(300)) == Some(0);
        }
        let again_log = fleet.dir.join(format!("soak-{round}-again.log"));
        assert!(
            ok,
            "round {round} ({op:?}, {fault:?}): the operation never succeeded.\nfirst run:\n{}\nlast run:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default(),
            std::fs::read_to_string(&again_log).unwrap_or_default()
        );
        if let Err(e) = agreed(&fleet, &artifacts, &want) {
            panic!(
                "round {round} ({op:?}, {fault:?}): the registry and the hosts disagree: {e}\nlog: {}",
                log.display()
            );
        }
        if let Op::Deploy(v) = &op {
            deployed.push(v.clone());
        }
        println!("soak: round {round}: {op:?} with fault {}: ok (exit {code:?})", fault.kind());
    }
    let summary: Vec<String> = faults.iter().map(|(k, n)| format!("{n} × {k}")).collect();
    println!(
        "soak summary: {} rounds ({} deployments, {} rollbacks) on {HOSTS} hosts in {:.0} s, seed {seed}; faults: {}; operations that failed under a fault: {failed_ops}; resumes and re-runs to converge: {retries}; every round converged with the registry and the hosts in agreement",
        rounds + 1,
        deployed.len(),
        rounds + 1 - deployed.len(),
        started.elapsed().as_secs_f64(),
        summary.join(", ")
    );
}

/// Regression (found by the soak): an agent killed between the swap and the restart left the units
/// running the old release, and deploying the same release again found the host "unchanged".
#[test]
fn an_activation_cut_short_after_the_swap_is_finished_by_the_next_deploy() {
    let Some(fleet) = Fleet::boot_or_skip(1) else { return };
    let config = fleet.fleet_toml().display().to_string();
    let h = &fleet.hosts[0];
    let mut artifacts = BTreeMap::new();
    for v in ["1", "2"] {
        let dir = fleet.dir.join(format!("demo-v{v}"));
        demo_app::write_release(&dir, v, Variant::Healthy).expect("write release");
        artifacts.insert(v.to_string(), dir);
    }
    let deploy = |v: &str| fleet.deploy(&config, &artifacts[v], v, true).status.code();
    assert_eq!(deploy("1"), Some(0));
    std::fs::write(h.dir.join("state/failpoints"), "after-swap").expect("arm");
    assert_eq!(deploy("2"), Some(1), "the agent died after the swap");
    assert!(h.wait_unit_active("ferry-agent.service", Duration::from_secs(30)));
    assert!(current(h).expect("current").starts_with("2-"), "current was switched");
    let served = fleet.http_get(&format!("http://{}:{}/", h.ip, demo_app::PORT)).expect("GET /");
    assert_eq!(served.1.trim(), "1", "the units still run the old release");
    let out = fleet.ferry(&["status", "--config", &config, "--env", "test", "--output", "json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(status["hosts"][0]["apps"][0]["activation_unfinished"], true, "{status}");
    assert_eq!(deploy("2"), Some(0));
    agreed(&fleet, &artifacts, "2").expect("the host runs, holds and serves release 2");
}
