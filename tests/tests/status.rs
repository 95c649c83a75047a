//! `ferry status` against real agents: reachable hosts show their facts, unreachable ones their
//! reason, and one unreachable host never hides the others.
use std::process::Command;

// Multi-threaded runtimes: the agents serve from the test's runtime while the test blocks on a
// `ferry` child process.

use ferry_coordinator::commands::status;
use ferry_coordinator::tls::ClientTls;
use ferry_proto::identity::Role;
use ferry_tests::agents::{TestAgent, fleet_config};
use ferry_tests::pki::TestPki;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agent_up_one_stopped() {
    let pki = TestPki::new();
    let data = tempfile::tempdir().expect("tempdir");
    let up = TestAgent::start(&pki.issue("web-1", Role::Agent, &["127.0.0.1"]), &data.path().join("a"))
        .await
        .expect("start");
    let down = TestAgent::start(&pki.issue("web-2", Role::Agent, &["127.0.0.1"]), &data.path().join("b"))
        .await
        .expect("start");
    let down_addr = down.addr;
    down.stop().await;

    let ctl = pki.issue("ctl", Role::Coordinator, &[]);
    let config = fleet_config(data.path(), &ctl, &[("web-1", up.addr.to_string()), ("web-2", down_addr.to_string())]);
    let tls = ClientTls::load(&ctl.tls_files()).expect("tls");

    let report = status::run(&config, "test", &tls).await.expect("status");
    assert_eq!(report.hosts.len(), 2);
    assert_eq!(report.unreachable(), 1);
    let (a, b) = (&report.hosts[0], &report.hosts[1]);
    assert_eq!((a.name.as_str(), a.reachable), ("web-1", true));
    assert_eq!(a.facts.as_ref().map(|f| f.agent_name.as_str()), Some("web-1"));
    assert_eq!((b.name.as_str(), b.reachable), ("web-2", false));
    assert_eq!(b.error_kind, Some(ferry_coordinator::client::ErrorKind::Refused));
    assert!(b.error.as_deref().unwrap_or_default().contains("connection refused (is ferry-agent running"), "{b:?}");

    // The CLI: table on stdout, exit code 3, final line states the outcome; JSON carries the same.
    let fleet = data.path().join("fleet.toml");
    let out = Command::new(ferry_tests::bin("ferry"))
        .args(["status", "--config"])
        .arg(&fleet)
        .args(["--env", "test"])
        .output()
        .expect("run ferry status");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "stdout: {stdout}\nstderr: {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("web-1") && stdout.contains(" up "), "{stdout}");
    assert!(stdout.contains("DOWN (refused)"), "{stdout}");
    assert!(stdout.trim_end().ends_with("environment test: 1 of 2 host(s) reachable, 1 unreachable"), "{stdout}");

    let out = Command::new(ferry_tests::bin("ferry"))
        .args(["status", "--output", "json", "--env", "test", "--config"])
        .arg(&fleet)
        .output()
        .expect("run ferry status --output json");
    assert_eq!(out.status.code(), Some(3));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(json["environment"], "test");
    assert_eq!(json["hosts"][0]["reachable"], true);
    assert_eq!(json["hosts"][0]["agent_name"], "web-1");
    assert!(json["hosts"][0]["memory_total_bytes"].as_u64().unwrap_or(0) > 0);
    assert_eq!(json["hosts"][1]["reachable"], false);
    assert_eq!(json["hosts"][1]["error_kind"], "refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_up_exits_zero_and_unknown_environment_is_a_usage_error() {
    let pki = TestPki::new();
    let data = tempfile::tempdir().expect("tempdir");
    let up = TestAgent::start(&pki.issue("web-1", Role::Agent, &["127.0.0.1"]), &data.path().join("a"))
        .await
        .expect("start");
    let ctl = pki.issue("ctl", Role::Coordinator, &[]);
    fleet_config(data.path(), &ctl, &[("web-1", up.addr.to_string())]);
    let fleet = data.path().join("fleet.toml");

    let out = Command::new(ferry_tests::bin("ferry"))
        .args(["status", "--env", "test", "--config"])
        .arg(&fleet)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 of 1 host(s) reachable"));

    let out = Command::new(ferry_tests::bin("ferry"))
        .args(["status", "--env", "prod", "--config"])
        .arg(&fleet)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("unknown environment \"prod\" (fleet.toml declares: test)"), "{stderr}");
}
