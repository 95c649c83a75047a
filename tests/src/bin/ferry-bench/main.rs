//! `ferry-bench rollout`: the rollout engine's figures on a real test fleet (5 systemd-nspawn
//! hosts), printed side by side. Run by `benches/rollout.sh` (root; release binaries).
//! `ferry-bench api`: the same deployments run by the CLI and through `ferry serve` (3 hosts),
//! side by side. Run by `benches/api.sh`.
//! `ferry-bench engine [--hosts 1000,10000]`: the rollout engine alone on the scripted fleet
//! (`fleet::fake`): CPU time, wall time and peak memory of one rolling deployment (batches of
//! 1%) per fleet size, with the registry in memory and, for the smallest size, on disk. No root,
//! no hosts. Run by `benches/engine.sh`.
//!
//! `ferry-bench registry`: SQLite and PostgreSQL side by side (write latency, a deployment's
//! registry time, deployments and reads through the API) and the failover time of two `ferry
//! serve` on PostgreSQL (see `registry.rs`). Run by `benches/registry.sh`.
//!
//! `ferry-bench fanout [--mb 50] [--mbit 50]`: peer fetch on 5 hosts with every link shaped:
//! wall time and the coordinator's egress, peer fetch off and on (see `fanout.rs`). Run by
//! `benches/fanout.sh`.
//!
//! `ferry-bench fleet-sim [--agents 1000,10000] [--mb 10]`: the coordinator against simulated
//! agents (real mTLS and gRPC, releases in memory): `ferry status`, and a release deployed
//! all-at-once and rolling 10 % with peer fetch on and off (see `fleetsim.rs`). Run by
//! `benches/fleet-sim.sh`.
//!
//! `ferry-bench dial-in [--agents 1000,10000]`: the same simulated agents dialed by `ferry
//! status`, then dialing in to a `ferry serve`: status through their connections, the server's
//! memory per connected agent, and the reconnect storm after a restart (see `dialin.rs`). Run by
//! `benches/dial-in.sh`.
//!
//! `ferry-bench gates`: how long after a failing batch its rollback starts, on 3 hosts with a real
//! Prometheus scraping the demo app: a release with 10 % errors against an error-rate gate
//! (rolling batch 1, auto_rollback), per measurement interval. Run by `benches/gates.sh`.
//!
//! 1. Coordinator overhead per host beyond the health wait: a rolling deployment (batch 1) of a
//!    small change. The activation phase (first `activating` to last `healthy` in the registry)
//!    minus the time the agents report for their activations (hooks, swap, restart, health
//!    probes), divided by the hosts.
//! 2. A 50 MB release (fresh random content each time, so nothing is on the hosts yet) to 5
//!    hosts, rolling batch 1, with pre-staging and with `--no-prestage`; on the bare links, then
//!    with every host's link shaped to `--mbit` (default 200 Mbit/s).
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use ferry_tests::demo_app::{self, Variant};
use ferry_tests::fleet::{self, Fleet};

mod dialin;
mod fanout;
mod fleetsim;
mod registry;

const RUN: &str = "fybench";
const HOSTS: usize = 5;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut mb: Option<u64> = None;
    let mut mbit: Option<u32> = None;
    let mut it = args.iter().map(String::as_str);
    let mut cmd = None;
    let mut sizes = vec![1_000usize, 10_000];
    let mut hold = false;
    while let Some(a) = it.next() {
        if a == "--hosts" || a == "--agents" {
            let parsed: Option<Vec<usize>> =
                it.next().and_then(|v| v.split(',').map(|n| n.trim().parse().ok()).collect());
            match parsed {
                Some(v) if !v.is_empty() && !v.contains(&0) => sizes = v,
                _ => return usage(),
            }
            continue;
        }
        match (a, it.clone().next().and_then(|v| v.parse::<u64>().ok())) {
            ("--hold", _) => hold = true,
            ("--mb", Some(v)) => {
                mb = Some(v);
                it.next();
            }
            ("--mbit", Some(v)) => {
                mbit = Some(u32::try_from(v).unwrap_or(u32::MAX));
                it.next();
            }
            ("rollout" | "api" | "engine" | "gates" | "registry" | "fanout" | "fleet-sim" | "dial-in", _) => {
                cmd = Some(a)
            }
            _ => return usage(),
        }
    }
    let Some(cmd) = cmd else { return usage() };
    if cmd == "engine" || cmd == "fleet-sim" || cmd == "dial-in" {
        let run = match cmd {
            "engine" => bench_engine(&sizes),
            "dial-in" => dialin::bench_dial_in(&sizes),
            _ => fleetsim::bench_fleet_sim(&sizes, mb.unwrap_or(10), hold),
        };
        return match run {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ferry-bench: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Err(fleet::Unsupported(why)) = fleet::check_supported() {
        eprintln!("ferry-bench: {why}");
        return ExitCode::from(2);
    }
    fleet::teardown(RUN);
    let mb = mb.unwrap_or(50);
    let result = match cmd {
        "api" => bench_api(mb),
        "gates" => bench_gates(),
        "registry" => registry::bench_registry(),
        "fanout" => fanout::bench_fanout(mb, mbit.unwrap_or(50)),
        _ => bench(mb, mbit.unwrap_or(200)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: ferry-bench rollout [--mb 50] [--mbit 200] | ferry-bench api [--mb 50] | ferry-bench engine [--hosts 1000,10000] | ferry-bench gates | ferry-bench registry | ferry-bench fanout [--mb 50] [--mbit 50] | ferry-bench fleet-sim [--agents 1000,10000] [--mb 10] [--hold] | ferry-bench dial-in [--agents 1000,10000]"
    );
    ExitCode::from(2)
}

/// A failing batch to its rollback: per measurement interval, three releases with 10 % errors
/// against an error-rate gate; from the registry, the batch's host healthy → the failing
/// measurement → the rollback's first step → the host rolled back.
fn bench_gates() -> Result<(), String> {
    let bin = ferry_tests::signals::prometheus_bin().map_err(|u| u.0)?;
    println!("booting 3 hosts and Prometheus (scraping every 1 s)...");
    let fleet = Fleet::boot_named(RUN, 3)?;
    let prom = ferry_tests::signals::Prometheus::start(&fleet, &bin);
    let rolling = "strategy = \"rolling\"\nbatch = 1\nauto_rollback = true\n";
    let plain = fleet.fleet_toml_with("plain.toml", rolling);
    tune(&plain)?;
    deploy(&fleet, &plain, &release(&fleet, "0", 0)?, "0", &[])?;
    prom.wait_scraped(&fleet);
    let db = rusqlite::Connection::open(fleet.dir.join("registry.db")).map_err(|e| e.to_string())?;
    let at = |id: &str, sql: &str| -> Result<i64, String> {
        db.query_row(sql, [id], |r| r.get::<_, Option<i64>>(0))
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("{id}: {sql}: nothing"))
    };
    println!("\nerror-rate gate (< 0.05 over rate[3s]); a release with 10 % errors; medians of 3");
    println!("   interval   healthy -> failing measurement   -> rollback starts   -> host rolled back");
    for interval in [1u64, 5] {
        let gate = format!(
            "\n[[environments.test.gates]]\nname = \"errors\"\nprometheus = \"http://127.0.0.1:9090\"\nquery = 'sum(rate(demo_requests_total{{code=\"500\",host=~\"{{batch_hosts}}\"}}[3s])) / sum(rate(demo_requests_total{{host=~\"{{batch_hosts}}\"}}[3s]))'\ncondition = \"< 0.05\"\non_empty = \"fail\"\ninterval = \"{interval}s\"\ntimeout = \"1s\"\nbake = \"{}s\"\n",
            interval * 6
        );
        let config = fleet.fleet_toml_with(&format!("gate-{interval}.toml"), &format!("{rolling}{gate}"));
        tune(&config)?;
        let (mut detect, mut start, mut done) = (Vec::new(), Vec::new(), Vec::new());
        for n in 0..3 {
            let version = format!("e{interval}-{n}");
            let dir = fleet.dir.join(format!("bench-{version}"));
            demo_app::write_release(&dir, &version, Variant::Errors(10)).map_err(|e| e.to_string())?;
            let out = fleet.deploy(&config.to_string_lossy(), &dir, &version, true);
            let report: serde_json::Value =
                serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {}", fleet::text_of(&out)))?;
            if report["status"] != "rolled_back" {
                return Err(format!("deploy {version} was not rolled back: {report}"));
            }
            let id = report["deployment_id"].as_str().unwrap_or_default().to_string();
            let healthy = at(&id, "SELECT MIN(time_ms) FROM events WHERE deployment_id = ?1 AND kind = 'healthy'")?;
            let failed = at(&id, "SELECT MIN(at_ms) FROM measurements WHERE deployment_id = ?1 AND outcome = 'fail'")?;
            let rolling_back =
                at(&id, "SELECT MIN(time_ms) FROM events WHERE deployment_id = ?1 AND kind = 'rolling_back'")?;
            let back = at(&id, "SELECT MAX(time_ms) FROM events WHERE deployment_id = ?1 AND kind = 'rolled_back'")?;
            detect.push((failed - healthy) as f64 / 1000.0);
            start.push((rolling_back - failed) as f64);
            done.push((back - rolling_back) as f64);
        }
        println!(
            "   {interval:>5} s   {:>14.2} s   {:>16.0} ms   {:>14.0} ms",
            median(detect),
            median(start),
            median(done)
        );
    }
    Ok(())
}

/// One `ferry deploy --output json`: its wall time and report.
fn deploy(
    fleet: &Fleet,
    config: &Path,
    dir: &Path,
    version: &str,
    extra: &[&str],
) -> Result<(f64, serde_json::Value), String> {
    let (cfg, art) = (config.to_string_lossy(), dir.to_string_lossy());
    let mut args = vec!["deploy", "--config", &cfg, "--env", "test", "--artifact", &art, "--version", version];
    args.extend(["--output", "json"]);
    args.extend(extra);
    let t = Instant::now();
    let out = fleet.ferry(&args);
    let wall = t.elapsed().as_secs_f64();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("deploy {version}: not JSON ({e}): {}", fleet::text_of(&out)))?;
    if report["status"] != "succeeded" {
        return Err(format!("deploy {version} did not succeed: {report}"));
    }
    Ok((wall, report))
}

/// The demo app plus `mb` MiB of fresh random data in 1 MiB files.
fn release(fleet: &Fleet, version: &str, mb: u64) -> Result<std::path::PathBuf, String> {
    let dir = fleet.dir.join(format!("bench-{version}"));
    demo_app::write_release(&dir, version, Variant::Healthy).map_err(|e| e.to_string())?;
    if mb > 0 {
        let data = dir.join("data");
        std::fs::create_dir_all(&data).map_err(|e| e.to_string())?;
        let mut seed = blake3::hash(format!("{version}-{:?}", Instant::now()).as_bytes());
        for i in 0..mb {
            let mut bytes = Vec::with_capacity(1 << 20);
            let mut xof = blake3::Hasher::new_keyed(seed.as_bytes()).update(&i.to_le_bytes()).finalize_xof();
            bytes.resize(1 << 20, 0);
            xof.fill(&mut bytes);
            std::fs::write(data.join(format!("blob-{i:03}")), &bytes).map_err(|e| e.to_string())?;
            seed = blake3::hash(&bytes[..32]);
        }
    }
    Ok(dir)
}

/// The benches' fleet.toml: two releases kept per host (the 256 MiB state tmpfs holds two 50 MB
/// releases and a staging), and the health probe polling every 10 ms (for up to 3 s), as the
/// by-hand restart of the rollout bench does.
fn tune(config: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(config).map_err(|e| e.to_string())?;
    let text = text.replacen("[app]\n", "[app]\nkeep_releases = 2\n", 1).replacen(
        "interval = \"200ms\"\nretries = 10\n",
        "interval = \"10ms\"\nretries = 300\n",
        1,
    );
    if !text.contains("interval = \"10ms\"") {
        return Err(format!("{}: the health probe's interval was not found to change", config.display()));
    }
    std::fs::write(config, text).map_err(|e| e.to_string())
}

fn bench(mb: u64, mbit: u32) -> Result<(), String> {
    println!("booting {HOSTS} hosts...");
    let fleet = Fleet::boot_named(RUN, HOSTS)?;
    let config = fleet.fleet_toml_with("bench.toml", "strategy = \"rolling\"\nbatch = 1");
    tune(&config)?;

    // 1. Overhead per host.
    deploy(&fleet, &config, &release(&fleet, "1", 0)?, "1", &[])?;
    let (wall, report) = deploy(&fleet, &config, &release(&fleet, "2", 0)?, "2", &[])?;
    let id = report["deployment_id"].as_str().unwrap_or_default().to_string();
    let agent_ms: u64 = (0..HOSTS).map(|i| report["hosts"][i]["activate_ms"].as_u64().unwrap_or(0)).sum();
    let db = rusqlite::Connection::open(fleet.dir.join("registry.db")).map_err(|e| e.to_string())?;
    let span = |kind: &str, agg: &str| -> Result<i64, String> {
        db.query_row(
            &format!("SELECT {agg}(time_ms) FROM events WHERE deployment_id = ?1 AND kind = ?2"),
            rusqlite::params![id, kind],
            |r| r.get(0),
        )
        .map_err(|e| e.to_string())
    };
    let phase = span("healthy", "MAX")? - span("activating", "MIN")?;
    let overhead = (phase as f64 - agent_ms as f64) / HOSTS as f64;
    println!("\n1. coordinator overhead per host beyond the agent's activation (rolling, batch 1, {HOSTS} hosts)");
    println!("   whole `ferry deploy` wall                 {wall:>8.3} s");
    println!("   activation phase (registry)               {:>8} ms", phase);
    println!("   agents' activations (hooks, swap, restart, health), sum {:>5} ms", agent_ms);
    println!("   => overhead per host                      {overhead:>8.1} ms   (target < 100 ms)");

    // 1b. A host's activation against the app's own restart: by hand, on each host, `systemctl
    // restart` and GET /health every 10 ms until it answers 200 (timed on the host itself).
    let by_hand = r#"
import subprocess, time, urllib.request
t = time.monotonic()
subprocess.run(["systemctl", "restart", "web.service"], check=True)
while True:
    try:
        if urllib.request.urlopen("http://127.0.0.1:8080/health", timeout=1).status == 200:
            break
    except Exception:
        pass
    time.sleep(0.01)
print(round((time.monotonic() - t) * 1000))
"#;
    let mut hand = Vec::new();
    for _ in 0..3 {
        for h in &fleet.hosts {
            let out = h.exec(&["python3", "-c", by_hand])?;
            let ms: f64 = String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .map_err(|e| format!("{}: restart by hand: {e}: {}", h.name, fleet::text_of(&out)))?;
            hand.push(ms);
        }
    }
    let mut ferry_ms = Vec::new();
    let mut walls = Vec::new();
    for v in ["2a", "2b", "2c"] {
        let (wall, report) = deploy(&fleet, &config, &release(&fleet, v, 0)?, v, &[])?;
        walls.push(wall);
        ferry_ms.extend((0..HOSTS).map(|i| report["hosts"][i]["activate_ms"].as_u64().unwrap_or(0) as f64));
    }
    println!("\n1b. a host's activation against the app restarted by hand (medians, {HOSTS} hosts x 3)");
    println!("   by hand: systemctl restart + GET /health every 10 ms until 200  {:>6.0} ms", median(hand.clone()));
    println!("   ferry: agent's activation (hooks, swap, restart, probes)        {:>6.0} ms", median(ferry_ms.clone()));
    println!(
        "   => ratio                                                        {:>6.2}x",
        median(ferry_ms) / median(hand)
    );
    println!("   whole rolling `ferry deploy` of {HOSTS} hosts, batch 1 (median wall)  {:>6.2} s", median(walls));

    // 2. 50 MB to 5 hosts, with and without pre-staging.
    println!("\n2. {mb} MiB of new content to {HOSTS} hosts, rolling batch 1");
    println!("   {:<22} {:>14} {:>14} {:>10}", "link", "pre-staging", "no pre-staging", "ratio");
    let mut n = 3;
    for shaped in [false, true] {
        if shaped {
            for h in &fleet.hosts {
                fleet.slow_link(&h.name, mbit * 1000);
            }
        }
        let mut walls = Vec::new();
        for extra in [&[][..], &["--no-prestage"][..]] {
            let v = n.to_string();
            n += 1;
            let dir = release(&fleet, &v, mb)?;
            let (wall, report) = deploy(&fleet, &config, &dir, &v, extra)?;
            let bytes = report["bytes_sent"].as_u64().unwrap_or(0);
            eprintln!(
                "   (v{v}{}: {wall:.2} s, {} MiB sent)",
                extra.first().map(|e| format!(" {e}")).unwrap_or_default(),
                bytes >> 20
            );
            walls.push(wall);
            let _ = std::fs::remove_dir_all(&dir);
        }
        let link = if shaped { format!("{mbit} Mbit/s per host") } else { "bare veth".to_string() };
        println!("   {:<22} {:>12.2} s {:>12.2} s {:>9.2}x", link, walls[0], walls[1], walls[1] / walls[0]);
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The wall time of `ferry ARGS` (in the coordinator's namespace); fails unless it exits 0.
fn timed(fleet: &Fleet, args: &[&str]) -> Result<(f64, std::process::Output), String> {
    let t = Instant::now();
    let out = fleet.ferry(args);
    let wall = t.elapsed().as_secs_f64();
    if !out.status.success() {
        return Err(format!("ferry {args:?}: {}", fleet::text_of(&out)));
    }
    Ok((wall, out))
}

/// The same work through the CLI's own engine and through `ferry serve` (`--server`).
fn bench_api(mb: u64) -> Result<(), String> {
    const TOKEN: &str = "ferry_bench_token";
    const URL: &str = "https://127.0.0.1:18443";
    let hosts = 3;
    println!("booting {hosts} hosts...");
    let fleet = Fleet::boot_named(RUN, hosts)?;
    let api = fleet.pki.issue("api", ferry_proto::identity::Role::Coordinator, &["127.0.0.1"]);
    let config = fleet.fleet_toml_with(
        "api.toml",
        &format!(
            "strategy = \"all-at-once\"\n\n[server]\nlisten = \"127.0.0.1:18443\"\ncert = \"{}\"\nkey = \"{}\"\n\n\
             [[server.tokens]]\nname = \"bench\"\nsha256 = \"{}\"\n",
            api.cert.display(),
            api.key.display(),
            ferry_coordinator::commands::token::sha256_hex(TOKEN)
        ),
    );
    tune(&config)?;
    let cfg = config.to_string_lossy().into_owned();
    let log = fleet.dir.join("serve.log");
    let mut server = fleet.spawn_ferry(&["serve", "--config", &cfg], &log);
    let stop = |server: &mut std::process::Child| {
        let pgid = nix::unistd::Pid::from_raw(-(server.id() as i32));
        let _ = nix::sys::signal::kill(pgid, nix::sys::signal::Signal::SIGTERM);
        let _ = server.wait();
    };
    let up = fleet::poll(std::time::Duration::from_secs(20), || {
        std::fs::read_to_string(&log).ok().filter(|l| l.contains("listening on")).map(|_| ())
    });
    if up.is_none() {
        stop(&mut server);
        return Err(format!("ferry serve did not start: {}", std::fs::read_to_string(&log).unwrap_or_default()));
    }
    let ca = fleet.coordinator.ca.to_string_lossy().into_owned();
    let remote = ["--server", URL, "--server-ca", ca.as_str(), "--token", TOKEN];
    let run = || -> Result<(), String> {
        deploy(&fleet, &config, &release(&fleet, "0", 0)?, "0", &[])?;
        let (mut local, mut served, mut accept) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..3 {
            let v = format!("l{round}");
            let dir = release(&fleet, &v, mb)?;
            local.push(deploy(&fleet, &config, &dir, &v, &[])?.0);
            let _ = std::fs::remove_dir_all(&dir);

            let v = format!("s{round}");
            let dir = release(&fleet, &v, mb)?;
            let art = dir.to_string_lossy().into_owned();
            let mut args = remote.to_vec();
            args.extend([
                "deploy",
                "--config",
                &cfg,
                "--env",
                "test",
                "--artifact",
                &art,
                "--version",
                &v,
                "--output",
                "json",
            ]);
            served.push(timed(&fleet, &args)?.0);

            // A registered version: the time to the 202 (the deployment then runs on), then its end.
            let v = format!("a{round}");
            let dir = release(&fleet, &v, 0)?;
            let art = dir.to_string_lossy().into_owned();
            let mut args = remote.to_vec();
            args.extend(["pipeline", "register", "--version", &v, "--artifact", &art]);
            timed(&fleet, &args)?;
            let mut args = remote.to_vec();
            args.extend(["pipeline", "deploy", "--env", "test", "--version", &v, "--no-wait"]);
            let (wall, out) = timed(&fleet, &args)?;
            accept.push(wall);
            let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
            let mut args = remote.to_vec();
            args.extend(["pipeline", "watch", &id, "--output", "json"]);
            timed(&fleet, &args)?;
        }
        let (mut hist_local, mut hist_served) = (Vec::new(), Vec::new());
        for _ in 0..20 {
            hist_local.push(timed(&fleet, &["history", "--config", &cfg, "--output", "json"])?.0);
            let mut args = remote.to_vec();
            args.extend(["history", "--config", &cfg, "--output", "json"]);
            hist_served.push(timed(&fleet, &args)?.0);
        }
        println!(
            "\nthe same work, by the CLI's own engine and through `ferry serve` ({hosts} hosts, all-at-once; medians)"
        );
        println!("   {:<52} {:>10} {:>10}", "", "CLI", "--server");
        println!(
            "   {:<52} {:>8.3} s {:>8.3} s",
            format!("deploy {mb} MiB of new content (3 runs)"),
            median(local),
            median(served)
        );
        println!(
            "   {:<52} {:>10} {:>8.3} s",
            "pipeline deploy --no-wait: until the 202 (3 runs)",
            "-",
            median(accept)
        );
        println!(
            "   {:<52} {:>8.3} s {:>8.3} s",
            "history (20 runs, process start included)",
            median(hist_local),
            median(hist_served)
        );
        Ok(())
    };
    let result = run();
    stop(&mut server);
    result
}

/// This process's CPU time (user + system) in seconds, and its peak resident memory in KiB.
fn usage_now() -> (f64, u64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime is the 12th, stime the 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // USER_HZ is 100 on Linux.
    let cpu = (ticks(11) + ticks(12)) as f64 / 100.0;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let peak = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    (cpu, peak)
}

/// One rolling deployment (batches of 1%) of `hosts` scripted hosts through the engine, on
/// `registry`.
fn engine_run(
    hosts: usize,
    registry: Box<dyn ferry_coordinator::registry::Registry>,
) -> Result<(f64, f64, u64), String> {
    use ferry_coordinator::commands::{self, Ctx};
    use ferry_coordinator::fleet::fake::Fake;

    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut text = String::from(
        "[app]\nname = \"web\"\n[tls]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"c.key\"\n[environments.prod]\nbatch = \"1%\"\n[environments.prod.hosts]\n",
    );
    for i in 0..hosts {
        text.push_str(&format!("web-{i} = \"10.{}.{}.{}:7443\"\n", i / 65536, i / 256 % 256, i % 256));
    }
    let config = ferry_coordinator::config::FleetConfig::from_toml(&dir.path().join("fleet.toml"), &text)
        .map_err(|e| e.to_string())?;
    let build = dir.path().join("build");
    std::fs::create_dir_all(&build).map_err(|e| e.to_string())?;
    std::fs::write(build.join("index.html"), "v2").map_err(|e| e.to_string())?;
    let artifact =
        std::sync::Arc::new(ferry_coordinator::artifact::Artifact::scan(&build, None).map_err(|e| e.to_string())?);
    let fleet = Fake::quiet();
    for i in 0..hosts {
        fleet.runs(&format!("web-{i}"), "1-00000000");
    }
    let cancel = tokio_util::sync::CancellationToken::new();
    let ctx = Ctx {
        config: &config,
        fleet: &fleet,
        registry: registry.as_ref(),
        cache: None,
        observer: &ferry_coordinator::rollout::quiet,
        cancel: &cancel,
        force_unlock: false,
        notifier: &ferry_coordinator::notify::OFF,
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    let (cpu0, _) = usage_now();
    let started = Instant::now();
    let report =
        runtime.block_on(commands::deploy::deploy(&ctx, "prod", artifact, "2", true)).map_err(|e| e.to_string())?;
    let wall = started.elapsed().as_secs_f64();
    let (cpu1, peak) = usage_now();
    if report.hosts.len() != hosts || fleet.max_active() > hosts.div_ceil(100) {
        return Err(format!(
            "the run broke its invariants: {} hosts, {} active at once",
            report.hosts.len(),
            fleet.max_active()
        ));
    }
    Ok((cpu1 - cpu0, wall, peak))
}

fn bench_engine(sizes: &[usize]) -> Result<(), String> {
    let smallest = sizes.iter().copied().min().unwrap_or(1_000);
    let mut runs: Vec<(usize, bool)> = sizes.iter().map(|&n| (n, false)).collect();
    runs.insert(0, (smallest, true));
    println!("| hosts | registry | CPU (s) | wall (s) | CPU per host (µs) | peak RSS of the process (MiB) |");
    println!("|---:|---|---:|---:|---:|---:|");
    for (hosts, on_disk) in runs {
        use ferry_coordinator::registry::sqlite::Sqlite;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let registry: Box<dyn ferry_coordinator::registry::Registry> = if on_disk {
            Box::new(Sqlite::open(&dir.path().join("registry.db")).map_err(|e| e.to_string())?)
        } else {
            Box::new(Sqlite::in_memory().map_err(|e| e.to_string())?)
        };
        let (cpu, wall, peak) = engine_run(hosts, registry)?;
        println!(
            "| {hosts} | {} | {cpu:.2} | {wall:.2} | {:.0} | {:.1} |",
            if on_disk { "SQLite on disk (synchronous=FULL)" } else { "SQLite in memory" },
            cpu * 1e6 / hosts as f64,
            peak as f64 / 1024.0
        );
    }
    Ok(())
}
