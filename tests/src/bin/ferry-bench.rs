//! `ferry-bench rollout`: the rollout engine's figures on a real test fleet (5 systemd-nspawn
//! hosts), printed side by side. Run by `benches/rollout.sh` (root; release binaries).
//! `ferry-bench api`: the same deployments run by the CLI and through `ferry serve` (3 hosts),
//! side by side. Run by `benches/api.sh`.
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

const RUN: &str = "fybench";
const HOSTS: usize = 5;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut mb = 50u64;
    let mut mbit = 200u32;
    let mut it = args.iter().map(String::as_str);
    let mut cmd = None;
    while let Some(a) = it.next() {
        match (a, it.clone().next().and_then(|v| v.parse::<u64>().ok())) {
            ("--mb", Some(v)) => {
                mb = v;
                it.next();
            }
            ("--mbit", Some(v)) => {
                mbit = u32::try_from(v).unwrap_or(u32::MAX);
                it.next();
            }
            ("rollout" | "api", _) => cmd = Some(a),
            _ => return usage(),
        }
    }
    let Some(cmd) = cmd else { return usage() };
    if let Err(fleet::Unsupported(why)) = fleet::check_supported() {
        eprintln!("ferry-bench: {why}");
        return ExitCode::from(2);
    }
    fleet::teardown(RUN);
    let result = if cmd == "api" { bench_api(mb) } else { bench(mb, mbit) };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage() -> ExitCode {
    eprintln!("usage: ferry-bench rollout [--mb 50] [--mbit 200] | ferry-bench api [--mb 50]");
    ExitCode::from(2)
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

fn bench(mb: u64, mbit: u32) -> Result<(), String> {
    println!("booting {HOSTS} hosts...");
    let fleet = Fleet::boot_named(RUN, HOSTS)?;
    // Two releases kept per host: the 256 MiB state tmpfs holds two 50 MB releases and a staging.
    let config = fleet.fleet_toml_with("bench.toml", "strategy = \"rolling\"\nbatch = 1");
    let text = std::fs::read_to_string(&config).map_err(|e| e.to_string())?;
    std::fs::write(&config, text.replacen("[app]\n", "[app]\nkeep_releases = 2\n", 1)).map_err(|e| e.to_string())?;

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
    let text = std::fs::read_to_string(&config).map_err(|e| e.to_string())?;
    std::fs::write(&config, text.replacen("[app]\n", "[app]\nkeep_releases = 2\n", 1)).map_err(|e| e.to_string())?;
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
