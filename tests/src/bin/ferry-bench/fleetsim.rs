//! `ferry-bench fleet-sim [--agents 1000,10000] [--mb 10]`: the coordinator at fleet scale, against
//! the simulated agents of `ferry_tests::sim` (real mTLS and gRPC, one address and certificate
//! per agent, releases in memory). Per fleet size: `ferry status` (median of 3), then a release of
//! `--mb` MiB of new random content deployed all-at-once and rolling 10 %, with peer fetch on
//! and off: the release `ferry` binary's wall time, its peak RSS (VmHWM, sampled every 20 ms),
//! and the bytes the agents received from it, in copies of the release.
//!
//! The agents share one listener (0.0.0.0:7443, one descriptor instead of one per agent) in a
//! network namespace this process makes for itself, with only its loopback: nothing is exposed,
//! and the namespace goes with the process. Root.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ferry_proto::identity::Role;
use ferry_tests::pki::{CertFiles, TestPki};
use ferry_tests::sim::{Listen, SimFleet};

use super::median;

const PORT: u16 = 7443;

/// Moves this process (still single-threaded) into a network namespace of its own, loopback up.
pub(super) fn private_network() -> Result<(), String> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("cannot make a network namespace (fleet-sim needs root): {e}"))?;
    let out = Command::new("ip").args(["link", "set", "lo", "up"]).output().map_err(|e| format!("ip: {e}"))?;
    if !out.status.success() {
        return Err(format!("ip link set lo up: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(())
}

/// `hold`: start the first size's agents, say how to reach them, and wait for Ctrl-C.
pub fn bench_fleet_sim(sizes: &[usize], mb: u64, hold: bool) -> Result<(), String> {
    private_network()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("tokio: {e}"))?;
    rt.block_on(async {
        if hold {
            return hold_open(sizes.first().copied().unwrap_or(1000)).await;
        }
        for &n in sizes {
            one_size(n, mb).await?;
        }
        Ok(())
    })
}

/// One run of the release `ferry`: wall seconds, peak RSS in MiB, stdout; fails unless it exits 0.
pub(super) async fn ferry(dir: &Path, args: Vec<String>) -> Result<(f64, f64, Vec<u8>), String> {
    tokio::task::spawn_blocking(move || -> Result<(f64, f64, Vec<u8>), String> {
        let t = Instant::now();
        let mut child = Command::new(ferry_tests::bin("ferry"))
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("ferry: {e}"))?;
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let read = |pipe: Option<std::process::ChildStdout>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut p) = pipe {
                    let _ = std::io::Read::read_to_end(&mut p, &mut buf);
                }
                buf
            })
        };
        let out = read(stdout);
        let err = std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = stderr {
                let _ = std::io::Read::read_to_end(&mut p, &mut buf);
            }
            buf
        });
        let status_path = format!("/proc/{}/status", child.id());
        let mut peak_kib = 0u64;
        let status = loop {
            if let Some(hwm) = std::fs::read_to_string(&status_path).ok().and_then(|s| vm_hwm(&s)) {
                peak_kib = peak_kib.max(hwm);
            }
            match child.try_wait().map_err(|e| e.to_string())? {
                Some(s) => break s,
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let wall = t.elapsed().as_secs_f64();
        let (out, err) = (out.join().unwrap_or_default(), err.join().unwrap_or_default());
        if !status.success() {
            return Err(format!(
                "ferry {}: {status}\n{}{}",
                args.join(" "),
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&err)
            ));
        }
        Ok((wall, peak_kib as f64 / 1024.0, out))
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("in {}: {e}", dir.display()))
}

fn vm_hwm(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// fleet.toml `name`: `top` before the tables, `env` in the environment's.
pub(super) fn fleet_toml(
    dir: &Path,
    sim: &SimFleet,
    coordinator: &CertFiles,
    name: &str,
    (top, env): (&str, &str),
) -> Result<PathBuf, String> {
    let text = format!(
        "{top}connect_timeout = \"10s\"\nrequest_timeout = \"60s\"\nregistry = \"registry.db\"\ncache_dir = \"cache\"\n[app]\nname = \"web\"\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n[environments.test]\nhosts = {{ {} }}\n{env}",
        coordinator.ca.display(),
        coordinator.cert.display(),
        coordinator.key.display(),
        sim.hosts_toml(),
    );
    let path = dir.join(name);
    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

/// `mb` MiB of fresh random content in 1 MiB files.
fn release(dir: &Path, version: &str, mb: u64) -> Result<PathBuf, String> {
    let art = dir.join(format!("release-{version}"));
    std::fs::create_dir_all(&art).map_err(|e| e.to_string())?;
    for i in 0..mb {
        let seed = blake3::hash(format!("{version}-{i}-{:?}", Instant::now()).as_bytes());
        let seed = u64::from_le_bytes(seed.as_bytes()[..8].try_into().map_err(|_| "seed")?);
        std::fs::write(art.join(format!("blob-{i:03}")), ferry_tests::pseudo_random(1 << 20, seed))
            .map_err(|e| e.to_string())?;
    }
    Ok(art)
}

/// The agents of `n`, until Ctrl-C: for running `ferry` against them by hand.
async fn hold_open(n: usize) -> Result<(), String> {
    let work = tempfile::Builder::new().prefix("ferry-fleet-sim").tempdir_in("/var/tmp").map_err(|e| e.to_string())?;
    let dir = work.path();
    let pki = TestPki::in_dir(&dir.join("pki"));
    let coordinator = pki.issue("ferry", Role::Coordinator, &[]);
    let sim = SimFleet::start(&pki, n, "web", Listen::Shared(PORT)).await?;
    let config = fleet_toml(dir, &sim, &coordinator, "fleet.toml", ("", ""))?;
    println!(
        "{n} simulated agents; until Ctrl-C:\n  nsenter --net=/proc/{}/ns/net ferry status --config {} --env test",
        std::process::id(),
        config.display()
    );
    tokio::signal::ctrl_c().await.map_err(|e| e.to_string())?;
    Ok(())
}

async fn one_size(n: usize, mb: u64) -> Result<(), String> {
    let work = tempfile::Builder::new().prefix("ferry-fleet-sim").tempdir_in("/var/tmp").map_err(|e| e.to_string())?;
    let dir = work.path();
    let pki = TestPki::in_dir(&dir.join("pki"));
    let coordinator = pki.issue("ferry", Role::Coordinator, &[]);
    let t = Instant::now();
    let sim = SimFleet::start(&pki, n, "web", Listen::Shared(PORT)).await?;
    println!("\n{n} simulated agents (certificates issued and listening in {:.1} s)", t.elapsed().as_secs_f64());
    let plain = fleet_toml(dir, &sim, &coordinator, "plain.toml", ("", ""))?;
    let arg = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    let mut walls = Vec::new();
    let mut rss = 0f64;
    for _ in 0..3 {
        let (wall, peak, out) =
            ferry(dir, arg(&["status", "--config", &plain.to_string_lossy(), "--env", "test", "--output", "json"]))
                .await?;
        let report: serde_json::Value = serde_json::from_slice(&out).map_err(|e| format!("status: {e}"))?;
        let reachable = report["hosts"].as_array().map_or(0, |h| h.iter().filter(|h| h["reachable"] == true).count());
        if reachable != n {
            return Err(format!("status: {reachable} of {n} hosts reachable"));
        }
        walls.push(wall);
        rss = rss.max(peak);
    }
    println!("   ferry status: {:.2} s (median of 3), peak RSS {rss:.0} MiB", median(walls));

    let size = (mb << 20) as f64;
    println!("   {mb} MiB of new content:");
    println!("   strategy          peer fetch   wall      peak RSS   coordinator sent   from peers");
    let strategies = [
        ("all-at-once", "strategy = \"all-at-once\"\n"),
        ("rolling 10 %", "strategy = \"rolling\"\nbatch = [\"10%\"]\n"),
    ];
    let mut version = 0;
    for (label, strategy) in strategies {
        for peer_fetch in [true, false] {
            version += 1;
            let config = fleet_toml(
                dir,
                &sim,
                &coordinator,
                &format!("deploy-{version}.toml"),
                (&format!("peer_fetch = {peer_fetch}\n"), strategy),
            )?;
            let art = release(dir, &version.to_string(), mb)?;
            let (sent0, peers0) =
                (sim.counters.uploaded.load(Ordering::Relaxed), sim.counters.from_peers.load(Ordering::Relaxed));
            let (wall, peak, out) = ferry(
                dir,
                arg(&[
                    "deploy",
                    "--config",
                    &config.to_string_lossy(),
                    "--env",
                    "test",
                    "--artifact",
                    &art.to_string_lossy(),
                    "--version",
                    &version.to_string(),
                    "--output",
                    "json",
                ]),
            )
            .await?;
            let report: serde_json::Value = serde_json::from_slice(&out).map_err(|e| format!("deploy: {e}"))?;
            if report["status"] != "succeeded" {
                return Err(format!("deploy {version} did not succeed: {}", report["status"]));
            }
            let sent = sim.counters.uploaded.load(Ordering::Relaxed) - sent0;
            let peers = sim.counters.from_peers.load(Ordering::Relaxed) - peers0;
            println!(
                "   {label:<17} {:<12} {wall:>6.1} s   {peak:>5.0} MiB   {:>8.2} copies    {:>8.1} copies",
                if peer_fetch { "on" } else { "off" },
                sent as f64 / size,
                peers as f64 / size,
            );
            std::fs::remove_dir_all(&art).map_err(|e| e.to_string())?;
        }
    }
    let c = &sim.counters;
    println!(
        "   agents: {} connections, {} refused, {} peer asks busy",
        c.connections.load(Ordering::Relaxed),
        c.refused.load(Ordering::Relaxed),
        c.busy.load(Ordering::Relaxed)
    );
    Ok(())
}
