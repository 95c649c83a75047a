//! `ferry-bench dial-in [--agents 1000,10000]`: agents that dial in against agents that are
//! dialed, with the simulated agents of `ferry_tests::sim` and the release `ferry`, in one run.
//! Per fleet size: `ferry status` dialing every agent (median of 3); then the same agents dial a
//! `ferry serve` (how long until all are connected, and the server's resident memory per
//! connected agent) and `ferry --server status` goes through their connections (median of 3);
//! then the server is restarted, and the time until every agent has dialed again (the
//! reconnect storm) is measured, with the dials that failed meanwhile.
//!
//! Like `fleet-sim`, in a network namespace of its own. Root.
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ferry_proto::identity::Role;
use ferry_tests::pki::{CertFiles, TestPki};
use ferry_tests::sim::{Listen, SimFleet};

use super::fleetsim::{ferry, fleet_toml, private_network};
use super::median;

const AGENT_PORT: u16 = 7443;
const API: &str = "127.0.0.1:8443";
const DIAL_IN: &str = "127.0.0.1:7444";
const TOKEN: &str = "ferry_bench_0123456789abcdef0123456789abcdef";

pub fn bench_dial_in(sizes: &[usize]) -> Result<(), String> {
    private_network()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("tokio: {e}"))?;
    rt.block_on(async {
        for &n in sizes {
            one_size(n).await?;
        }
        Ok(())
    })
}

/// `ferry serve --config config`, once it listens; its output goes to `log`.
fn start_serve(config: &Path, log: &Path) -> Result<Child, String> {
    let out = std::fs::File::create(log).map_err(|e| e.to_string())?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let mut child = Command::new(ferry_tests::bin("ferry"))
        .args(["serve", "--config", &config.to_string_lossy()])
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .map_err(|e| format!("ferry serve: {e}"))?;
    for _ in 0..400 {
        if std::fs::read_to_string(log).is_ok_and(|l| l.contains("listening on")) {
            return Ok(child);
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("ferry serve exited ({status}): {}", std::fs::read_to_string(log).unwrap_or_default()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    Err(format!("ferry serve did not start: {}", std::fs::read_to_string(log).unwrap_or_default()))
}

/// SIGTERM, then waits for it to exit.
fn stop_serve(mut child: Child) -> Result<(), String> {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).map_err(|e| e.to_string())?;
    child.wait().map_err(|e| e.to_string())?;
    Ok(())
}

/// A process's resident memory, MiB.
fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// Waits until the agents have dialed `want` connections in all; the seconds it took.
async fn dialed(sim: &SimFleet, want: u64, since: Instant) -> Result<f64, String> {
    let limit = Duration::from_secs(600);
    while sim.counters.dialed.load(Ordering::Relaxed) < want {
        if since.elapsed() > limit {
            return Err(format!(
                "{} of {want} connections after {limit:?}",
                sim.counters.dialed.load(Ordering::Relaxed)
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(since.elapsed().as_secs_f64())
}

/// `ferry ARGS` three times: the median wall, checking every host was reachable each time.
async fn status_runs(dir: &Path, n: usize, args: &[String]) -> Result<f64, String> {
    let mut walls = Vec::new();
    for _ in 0..3 {
        let (wall, _, out) = ferry(dir, args.to_vec()).await?;
        let report: serde_json::Value = serde_json::from_slice(&out).map_err(|e| format!("status: {e}"))?;
        let reachable = report["hosts"].as_array().map_or(0, |h| h.iter().filter(|h| h["reachable"] == true).count());
        if reachable != n {
            return Err(format!("status: {reachable} of {n} hosts reachable"));
        }
        walls.push(wall);
    }
    Ok(median(walls))
}

fn serve_toml(dir: &Path, sim: &SimFleet, ctl: &CertFiles) -> Result<std::path::PathBuf, String> {
    let hosts: Vec<String> = sim.hosts.iter().map(|(n, _)| format!("{n} = \"dial-in\"")).collect();
    let text = format!(
        "request_timeout = \"60s\"\nregistry = \"{d}/serve.db\"\n[app]\nname = \"web\"\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\
         [server]\nlisten = \"{API}\"\ndial_in_listen = \"{DIAL_IN}\"\naudit_log = \"{d}/api-audit.log\"\n{}\
         [environments.test]\nhosts = {{ {} }}\n",
        ctl.ca.display(),
        ctl.cert.display(),
        ctl.key.display(),
        ferry_coordinator::commands::token::config_lines("bench", TOKEN),
        hosts.join(", "),
        d = dir.display(),
    );
    let path = dir.join("serve.toml");
    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

async fn one_size(n: usize) -> Result<(), String> {
    let work = tempfile::Builder::new().prefix("ferry-dial-in").tempdir_in("/var/tmp").map_err(|e| e.to_string())?;
    let dir = work.path();
    let pki = TestPki::in_dir(&dir.join("pki"));
    let ctl = pki.issue("ferry", Role::Coordinator, &["127.0.0.1"]);
    let t = Instant::now();
    let sim = SimFleet::start(&pki, n, "web", Listen::Shared(AGENT_PORT)).await?;
    println!("\n{n} simulated agents (certificates issued and listening in {:.1} s)", t.elapsed().as_secs_f64());
    let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    // Dialed by the coordinator.
    let plain = fleet_toml(dir, &sim, &ctl, "plain.toml", ("", ""))?;
    let out =
        status_runs(dir, n, &s(&["status", "--config", &plain.to_string_lossy(), "--env", "test", "--output", "json"]))
            .await?;
    println!("   ferry status, the coordinator dialing every agent:        {out:>6.2} s (median of 3)");

    // Dialing in.
    let config = serve_toml(dir, &sim, &ctl)?;
    let server = start_serve(&config, &dir.join("serve-1.log"))?;
    let idle = rss_mib(server.id());
    let t = Instant::now();
    sim.dial(DIAL_IN.parse().map_err(|e| format!("{DIAL_IN}: {e}"))?)?;
    let connected = dialed(&sim, n as u64, t).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held = rss_mib(server.id());
    println!("   all agents dialed in to ferry serve in                   {connected:>6.2} s");
    println!(
        "   ferry serve resident: {idle:.0} MiB idle, {held:.0} MiB with {n} connected = {:.1} KiB per agent",
        (held - idle) * 1024.0 / n as f64
    );
    let ca = ctl.ca.to_string_lossy().into_owned();
    let url = format!("https://{API}");
    let args = s(&[
        "--server",
        &url,
        "--server-ca",
        &ca,
        "--token",
        TOKEN,
        "status",
        "--config",
        &config.to_string_lossy(),
        "--env",
        "test",
        "--output",
        "json",
    ]);
    let through = status_runs(dir, n, &args).await?;
    println!(
        "   ferry --server status, through the agents' connections:  {through:>6.2} s (median of 3): {:.1}x",
        out / through
    );

    // The reconnect storm.
    let failed0 = sim.counters.dial_failures.load(Ordering::Relaxed);
    stop_serve(server)?;
    let t = Instant::now();
    let server = start_serve(&config, &dir.join("serve-2.log"))?;
    let started = t.elapsed().as_secs_f64();
    let again = dialed(&sim, 2 * n as u64, t).await?;
    println!(
        "   ferry serve restarted (up in {started:.1} s): every agent connected again {again:.1} s after the stop, {} dials failed meanwhile",
        sim.counters.dial_failures.load(Ordering::Relaxed) - failed0
    );
    let through = status_runs(dir, n, &args).await?;
    println!("   ferry --server status after the restart:                 {through:>6.2} s");
    stop_serve(server)?;
    Ok(())
}
