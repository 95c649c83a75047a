//! `ferry-bench rollout`: the rollout engine's figures on a real test fleet (5 systemd-nspawn
//! hosts), printed side by side. Run by `benches/rollout.sh` (root; release binaries).
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
            ("rollout", _) => cmd = Some(a),
            _ => return usage(),
        }
    }
    if cmd.is_none() {
        return usage();
    }
    if let Err(fleet::Unsupported(why)) = fleet::check_supported() {
        eprintln!("ferry-bench: {why}");
        return ExitCode::from(2);
    }
    fleet::teardown(RUN);
    match bench(mb, mbit) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage() -> ExitCode {
    eprintln!("usage: ferry-bench rollout [--mb 50] [--mbit 200]");
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
