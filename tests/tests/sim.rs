//! The fleet simulator (`ferry_tests::sim`) driven by the real `ferry` binary: 40 simulated
//! agents, each its own TLS listener and certificate. Proves the simulator speaks the contract
//! well enough for real deployments and status, and that its figures are the coordinator's own:
//! the bytes it counts are the bytes the coordinator reports, one copy per host without peer
//! fetch and about one in all with it.
use std::path::{Path, PathBuf};

use ferry_proto::identity::Role;
use ferry_tests::pki::TestPki;
use ferry_tests::sim::{Listen, SimFleet};

const AGENTS: usize = 40;

fn fleet_toml(dir: &Path, sim: &SimFleet, coordinator: &ferry_tests::pki::CertFiles, extra: &str) -> PathBuf {
    let text = format!(
        r#"{extra}connect_timeout = "5s"
request_timeout = "20s"
registry = "registry.db"
cache_dir = "cache"
[app]
name = "web"
[tls]
ca = "{ca}"
cert = "{cert}"
key = "{key}"
[environments.test]
hosts = {{ {hosts} }}
"#,
        ca = coordinator.ca.display(),
        cert = coordinator.cert.display(),
        key = coordinator.key.display(),
        hosts = sim.hosts_toml(),
    );
    let path = dir.join(format!("fleet-{}.toml", blake3::hash(extra.as_bytes()).to_hex()));
    std::fs::write(&path, text).expect("write fleet.toml");
    path
}

async fn ferry(dir: &Path, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(ferry_tests::bin("ferry"))
        .args(args)
        .current_dir(dir)
        .output()
        .await
        .expect("run ferry")
}

/// A release of `mib` MiB of fresh noise in 1 MiB files; deployed, its report.
async fn deploy(dir: &Path, config: &Path, version: &str, mib: usize) -> serde_json::Value {
    let art = dir.join(format!("release-{version}"));
    std::fs::create_dir_all(&art).expect("release dir");
    for i in 0..mib {
        let seed = blake3::hash(format!("{version}-{i}").as_bytes());
        let seed = u64::from_le_bytes(seed.as_bytes()[..8].try_into().expect("8 bytes"));
        std::fs::write(art.join(format!("blob-{i}")), ferry_tests::pseudo_random(1 << 20, seed)).expect("blob");
    }
    let (config, art) = (config.to_string_lossy(), art.to_string_lossy());
    let out = ferry(
        dir,
        &["deploy", "--config", &config, "--env", "test", "--artifact", &art, "--version", version, "--output", "json"],
    )
    .await;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    });
    assert_eq!(report["status"], "succeeded", "{report:#}");
    report
}

fn sum(report: &serde_json::Value, key: &str) -> u64 {
    report["hosts"].as_array().expect("hosts").iter().filter_map(|h| h[key].as_u64()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_agents_take_real_deployments_and_count_what_the_coordinator_sends() {
    let pki = TestPki::new();
    let coordinator = pki.issue("ferry", Role::Coordinator, &[]);
    let sim = SimFleet::start(&pki, AGENTS, "web", Listen::Ports).await.expect("start the simulated agents");
    let work = tempfile::tempdir().expect("work dir");
    let dir = work.path();
    let size: u64 = 2 << 20;

    // Without peer fetch: one copy per host, and the agents counted what the coordinator says it sent.
    let off = fleet_toml(dir, &sim, &coordinator, "peer_fetch = false\n");
    let report = deploy(dir, &off, "1", 2).await;
    let uploaded = sim.counters.uploaded.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(uploaded, sum(&report, "bytes_sent"), "{report:#}");
    assert!(uploaded >= size * AGENTS as u64, "{uploaded} bytes for {AGENTS} hosts of {size}");
    let release = report["hosts"][0]["release"].as_str().expect("a release in the report").to_string();
    for i in 0..AGENTS {
        assert_eq!(sim.current(i), release, "{}", sim.hosts[i].0);
    }

    // With it: the coordinator sends about one copy; the rest goes from host to host.
    let on = fleet_toml(dir, &sim, &coordinator, "peer_fetch = true\n");
    let before = sim.counters.uploaded.load(std::sync::atomic::Ordering::Relaxed);
    let report = deploy(dir, &on, "2", 2).await;
    let uploaded = sim.counters.uploaded.load(std::sync::atomic::Ordering::Relaxed) - before;
    let from_peers = sim.counters.from_peers.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(uploaded, sum(&report, "bytes_sent"), "{report:#}");
    assert_eq!(from_peers, sum(&report, "bytes_from_peers"), "{report:#}");
    assert!(uploaded < size * 2, "about one copy: {uploaded} bytes for {size}\n{report:#}");
    assert!(from_peers >= size * (AGENTS as u64 - 2), "{from_peers} bytes from peers\n{report:#}");

    // Status sees every simulated agent on the new version.
    let out = ferry(dir, &["status", "--config", &on.to_string_lossy(), "--env", "test", "--output", "json"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let release = report["hosts"][0]["release"].as_str().expect("a release in the report");
    let status: serde_json::Value = serde_json::from_str(&text).expect("status as JSON");
    let hosts = status["hosts"].as_array().expect("hosts");
    assert_eq!(hosts.len(), AGENTS, "{text}");
    for h in hosts {
        assert_eq!(h["reachable"], true, "{h}");
        assert!(h.to_string().contains(release), "{h} runs {release}");
    }
}

/// `ferry serve`'s status of the `test` environment until every host is reachable (10 s).
async fn all_reachable(api: &ferry_coordinator::cli::api_client::Remote) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    for _ in 0..100 {
        last = api.call("GET", "/api/v1/environments/test/status", None).await.expect("status");
        if last["hosts"].as_array().is_some_and(|h| h.len() == AGENTS && h.iter().all(|h| h["reachable"] == true)) {
            return last;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("not every simulated agent dialed in: {last:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_agents_dial_in_to_ferry_serve_and_dial_again_after_it_restarts() {
    use ferry_tests::serve::{free_port, remote, serve};
    let pki = TestPki::new();
    let ctl = pki.issue("ferry", Role::Coordinator, &["127.0.0.1"]);
    let sim = SimFleet::start(&pki, AGENTS, "web", Listen::Ports).await.expect("start the simulated agents");
    let work = tempfile::tempdir().expect("work dir");
    let dir = work.path();
    let dial_in = free_port();
    let hosts: Vec<String> = sim.hosts.iter().map(|(n, _)| format!("{n} = \"dial-in\"")).collect();
    let text = format!(
        "registry = \"{d}/registry.db\"\n[app]\nname = \"web\"\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\
         [server]\nlisten = \"127.0.0.1:{}\"\ndial_in_listen = \"127.0.0.1:{dial_in}\"\naudit_log = \"{d}/api-audit.log\"\n\
         [environments.test]\nhosts = {{ {} }}\n",
        ctl.ca.display(),
        ctl.cert.display(),
        ctl.key.display(),
        free_port(),
        hosts.join(", "),
        d = dir.display(),
    );
    let path = dir.join("fleet.toml");
    std::fs::write(&path, &text).expect("fleet.toml");
    let config = ferry_coordinator::config::FleetConfig::from_toml(&path, &text).expect("valid fleet.toml");

    let s = serve(&config, &ctl).await;
    sim.dial(format!("127.0.0.1:{dial_in}").parse().expect("address")).expect("dial");
    let report = all_reachable(&remote(&s, &ctl)).await;
    // Each from its own address, as the server sees it.
    for (i, h) in report["hosts"].as_array().expect("hosts").iter().enumerate() {
        let from = h["dial_in"]["addr"].as_str().unwrap_or_default();
        assert!(from.starts_with(&format!("{}:", ferry_tests::sim::shared_address(i))), "{h}");
    }
    let dialed = sim.counters.dialed.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(dialed, AGENTS as u64, "one connection each");
    s.stop().await;

    // Restarted: every agent dials again, by itself.
    let s = serve(&config, &ctl).await;
    all_reachable(&remote(&s, &ctl)).await;
    assert!(sim.counters.dialed.load(std::sync::atomic::Ordering::Relaxed) >= 2 * AGENTS as u64);
    s.stop().await;
}
