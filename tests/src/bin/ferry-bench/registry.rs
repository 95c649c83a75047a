//! `ferry-bench registry`: the shared registry's figures (issue 20), SQLite and PostgreSQL side
//! by side, then a failover's.
//!
//! 1. Write latency: 1,000 calls of each kind, one at a time, on each backend (SQLite on disk as
//!    `ferry` writes it; a local PostgreSQL 15 on loopback, fsync on): an event (one INSERT)
//!    and a host transition (a transaction: the row read for update, checked, updated, its event
//!    inserted).
//! 2. A deployment's registry time: one rolling deployment of 1,000 scripted hosts (batches of
//!    1 %) through the engine, on each backend: the scripted fleet does no work, so the wall
//!    time is the engine plus its registry.
//! 3. Through the API, on 3 real hosts: `ferry serve` on each backend; deployments of a
//!    registered version one after another (`pipeline deploy`, waiting for each to end) and
//!    reads (`history`), by the CLI with `--server`.
//! 4. Failover with the default 10 s lease: two `ferry serve` on one PostgreSQL; the leader is
//!    killed (kill -9) while its rollout runs; the time until the standby leads and until its
//!    first command reaches a host (the host's fence records the new epoch). Three runs, the
//!    roles swapping each time.
use std::path::Path;
use std::time::{Duration, Instant};

use ferry_coordinator::registry::postgres::Postgres;
use ferry_coordinator::registry::sqlite::Sqlite;
use ferry_coordinator::registry::{HostUpdate, NewDeployment, Registry};
use ferry_coordinator::state::{DeploymentKind, HostState};
use ferry_tests::demo_app::{self, Variant};
use ferry_tests::fleet::{self, Fleet};
use ferry_tests::postgres::FleetPg;
use ferry_tests::serve::{self, Proc, Server, TOKEN};

use super::{RUN, median};

pub fn bench_registry() -> Result<(), String> {
    let local = FleetPg::local().map_err(|u| u.0)?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    println!("1. registry writes one at a time, 1000 of each (median / p99, ms)");
    println!("   backend                                 event     host transition");
    let backends: [(&str, Box<dyn Registry>); 2] = [
        ("SQLite on disk (WAL, synchronous=FULL)", Box::new(sqlite(&dir.path().join("w.db"))?)),
        ("PostgreSQL 15, loopback, fsync on", Box::new(postgres(&local.database("writes"))?)),
    ];
    for (name, reg) in &backends {
        let (events, steps) = writes(reg.as_ref())?;
        println!(
            "   {name:<38} {:>5.2} / {:<5.2}   {:>5.2} / {:.2}",
            pct(&events, 0.5),
            pct(&events, 0.99),
            pct(&steps, 0.5),
            pct(&steps, 0.99)
        );
    }

    println!("\n2. one rolling deployment of 1000 scripted hosts (batches of 1 %, 4 transitions a host)");
    println!("   backend                                 wall (s)   CPU of this process (s)");
    let backends: [(&str, Box<dyn Registry>); 2] = [
        ("SQLite on disk (WAL, synchronous=FULL)", Box::new(sqlite(&dir.path().join("e.db"))?)),
        ("PostgreSQL 15, loopback, fsync on", Box::new(postgres(&local.database("engine"))?)),
    ];
    for (name, reg) in backends {
        let (cpu, wall, _) = super::engine_run(1000, reg)?;
        println!("   {name:<38} {wall:>8.2}   {cpu:>8.2}");
    }
    drop(local);

    println!("\nbooting 3 hosts and PostgreSQL in the coordinator's namespace...");
    let fleet = Fleet::boot_named(RUN, 3)?;
    let pg = FleetPg::start(&fleet).map_err(|u| u.0)?;
    println!("\n3. through the API on 3 real hosts (rolling, batch 1; medians)");
    println!("   backend       deployment (6 runs)   deployments/s   history --limit 20 (20 runs)");
    for (name, registry) in [("SQLite", "api.db"), ("PostgreSQL", pg.url.as_str())] {
        let (deploy, read) = api(&fleet, name, registry)?;
        println!("   {name:<12} {deploy:>12.2} s   {:>13.2}   {:>13.0} ms", 1.0 / deploy, read * 1000.0);
    }

    println!("\n4. failover, default lease (10 s, renewed every 3.3 s): the leader killed mid-rollout");
    println!("   run   -> the standby leads   -> its first command on a host");
    let (mut leads, mut acts) = (Vec::new(), Vec::new());
    failover(&fleet, &pg, |run, lead, act| {
        println!("   {run:>3}   {lead:>17.1} s   {act:>26.1} s");
        leads.push(lead);
        acts.push(act);
    })?;
    println!("   median {:>14.1} s   {:>26.1} s", median(leads), median(acts));
    Ok(())
}

fn sqlite(path: &Path) -> Result<Sqlite, String> {
    Sqlite::open(path).map_err(|e| e.to_string())
}

fn postgres(url: &str) -> Result<Postgres, String> {
    Postgres::open(url).map_err(|e| e.to_string())
}

/// The `q` quantile of `v` (sorted here), in ms.
fn pct(v: &[f64], q: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    v.get(i).copied().unwrap_or(0.0) * 1000.0
}

/// 1,000 events and 1,000 host transitions on `reg`, each timed.
fn writes(reg: &dyn Registry) -> Result<(Vec<f64>, Vec<f64>), String> {
    let hosts: Vec<(String, usize)> = (0..1000).map(|i| (format!("web-{i}"), 0)).collect();
    let d = NewDeployment {
        id: "bench-1",
        kind: DeploymentKind::Deploy,
        environment: "prod",
        version: "2",
        release_id: "2-0",
        artifact: "a",
        manifest_hash: "h",
        strategy: "rolling",
        app: "web",
        hosts: &hosts,
    };
    reg.create(&d).map_err(|e| e.to_string())?;
    let timed = |f: &dyn Fn(usize) -> Result<(), String>| -> Result<Vec<f64>, String> {
        (0..hosts.len())
            .map(|i| {
                let t = Instant::now();
                f(i).map(|()| t.elapsed().as_secs_f64())
            })
            .collect()
    };
    let events = timed(&|i| reg.event("bench-1", None, "note", &format!("event {i}")).map_err(|e| e.to_string()))?;
    let steps = timed(&|i| {
        reg.set_host("bench-1", &hosts[i].0, HostState::Staging, &HostUpdate::default()).map_err(|e| e.to_string())
    })?;
    Ok((events, steps))
}

/// `ferry --server URL ARGS…` in the coordinator's namespace: its wall time, or its failure.
fn remote(fleet: &Fleet, url: &str, args: &[&str]) -> Result<f64, String> {
    let ca = fleet.coordinator.ca.to_string_lossy().into_owned();
    let mut all = vec!["--server", url, "--server-ca", &ca, "--token", TOKEN];
    all.extend_from_slice(args);
    super::timed(fleet, &all).map(|(wall, _)| wall)
}

/// `ferry serve` on `registry`: the median deployment through it and the median read.
fn api(fleet: &Fleet, name: &str, registry: &str) -> Result<(f64, f64), String> {
    let at = Server { name: &format!("api-{name}"), ip: "127.0.0.1", port: 18443, registry, lease: "10s" };
    let config = serve::server_toml(fleet, &at, "strategy = \"rolling\"\nbatch = 1\n");
    let _server = serve::serve_in(fleet, &fleet.ctl_ns, &config, at.name);
    let url = "https://127.0.0.1:18443";
    for v in ["1", "2"] {
        let dir = fleet.dir.join(format!("api-{name}-{v}"));
        demo_app::write_release(&dir, v, Variant::Healthy).map_err(|e| e.to_string())?;
        let art = dir.to_string_lossy().into_owned();
        remote(fleet, url, &["pipeline", "register", "--version", v, "--artifact", &art])?;
    }
    let mut deploys = Vec::new();
    for round in 0..6 {
        let v = if round % 2 == 0 { "1" } else { "2" };
        deploys.push(remote(fleet, url, &["pipeline", "deploy", "--env", "test", "--version", v])?);
    }
    let reads: Result<Vec<f64>, String> =
        (0..20).map(|_| remote(fleet, url, &["history", "--limit", "20", "--output", "json"])).collect();
    Ok((median(deploys), median(reads?)))
}

/// The epoch a host's fence has recorded (0 before any).
fn fence(h: &ferry_tests::fleet::FleetHost) -> i64 {
    std::fs::read_to_string(h.path("/var/lib/ferry/epoch")).ok().and_then(|t| t.trim().parse().ok()).unwrap_or(0)
}

/// Three failovers of two servers on `pg`; `each(run, s to lead, s to the first command)`.
fn failover(fleet: &Fleet, pg: &FleetPg, mut each: impl FnMut(usize, f64, f64)) -> Result<(), String> {
    let ports = [18445u16, 18446];
    let configs: Vec<_> = ["a", "b"]
        .iter()
        .zip(ports)
        .map(|(name, port)| {
            let at = Server { name, ip: "127.0.0.1", port, registry: &pg.url, lease: "10s" };
            serve::server_toml(fleet, &at, "strategy = \"rolling\"\nbatch = 1\n")
        })
        .collect();
    let mut servers: Vec<Option<Proc>> = vec![None, None];
    servers[0] = Some(serve::serve_in(fleet, &fleet.ctl_ns, &configs[0], "a"));
    let leads = |i: usize| {
        fleet::poll(Duration::from_secs(60), || {
            serve::role_at(fleet, "127.0.0.1", ports[i]).filter(|(r, _)| r == "leader")
        })
    };
    leads(0).ok_or("a never led")?;
    servers[1] = Some(serve::serve_in(fleet, &fleet.ctl_ns, &configs[1], "b"));
    let mut leader = 0;
    for run in 1..=3 {
        let standby = 1 - leader;
        let (_, epoch) = serve::role_at(fleet, "127.0.0.1", ports[leader]).ok_or("no leader")?;
        // A release whose start takes 2 s on each host: the kill lands mid-rollout.
        let version = format!("f{run}");
        let dir = fleet.dir.join(format!("failover-{version}"));
        demo_app::write_release(&dir, &version, Variant::SlowStart(2000)).map_err(|e| e.to_string())?;
        let art = dir.to_string_lossy().into_owned();
        let url = format!("https://127.0.0.1:{}", ports[leader]);
        let ca = fleet.coordinator.ca.to_string_lossy().into_owned();
        let args = ["--server", &url, "--server-ca", &ca, "--token", TOKEN, "deploy", "--env", "test"];
        let mut args = args.to_vec();
        args.extend(["--artifact", &art, "--version", &version]);
        let _client = Proc(fleet.spawn_ferry(&args, &fleet.dir.join(format!("failover-{run}.log"))));
        let first = fleet::poll(Duration::from_secs(60), || (fleet.versions()[0] == version).then_some(()));
        let log = |f: &str| std::fs::read_to_string(fleet.dir.join(f)).unwrap_or_default();
        first.ok_or_else(|| {
            format!(
                "web-1 never ran {version}: {:?}\nclient: {}\na: {}\nb: {}",
                fleet.versions(),
                log(&format!("failover-{run}.log")),
                log("a-serve.log"),
                log("b-serve.log")
            )
        })?;
        let killed = Instant::now();
        if let Some(mut p) = servers[leader].take() {
            p.kill9();
        }
        let led = leads(standby).ok_or("the standby never led")?;
        let lead = killed.elapsed().as_secs_f64();
        if led.1 != epoch + 1 {
            return Err(format!("the standby leads with epoch {}, not {}", led.1, epoch + 1));
        }
        let acted = fleet::poll(Duration::from_secs(60), || {
            fleet.hosts.iter().any(|h| fence(h) == epoch + 1).then(|| killed.elapsed().as_secs_f64())
        });
        let act = acted.ok_or("no host heard from the new leader")?;
        // Finished: every host on it, and the deployment recorded so (its environment free).
        let cfg = configs[standby].to_string_lossy().into_owned();
        let done = fleet::poll(Duration::from_secs(120), || {
            let out = fleet.ferry(&["history", "--config", &cfg, "--output", "json", "--limit", "1"]);
            let h: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let all = fleet.versions().iter().all(|v| *v == version);
            (all && h[0]["version"] == version.as_str() && h[0]["status"] == "succeeded").then_some(())
        });
        done.ok_or_else(|| format!("the new leader did not finish {version}: {:?}", fleet.versions()))?;
        each(run, lead, act);
        // The killed server comes back as the standby.
        let name = if leader == 0 { "a" } else { "b" };
        servers[leader] = Some(serve::serve_in(fleet, &fleet.ctl_ns, &configs[leader], name));
        leader = standby;
    }
    Ok(())
}
