//! Agents that dial in, on loopback: real agents with only `connect` (no port of their own) and a
//! real `ferry serve` in the same process; status, deployments and a rollback go through the
//! connections the agents opened; a server restart makes them dial again; a stopped agent is
//! unreachable at once; and wrong certificates on either side are refused, with a reason, in
//! the audit log of the side that refused.
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_coordinator::cli::api_client::Remote;
use ferry_coordinator::config::FleetConfig;
use ferry_proto::identity::Role;
use ferry_tests::agents::TestAgent;
use ferry_tests::pki::{CertFiles, TestPki};
use ferry_tests::serve::{free_port, remote, serve};
use serde_json::{Value, json};

fn fleet_toml(dir: &Path, ctl: &CertFiles, hosts: &str, api: u16, dial_in: u16) -> FleetConfig {
    let text = format!(
        r#"connect_timeout = "2s"
request_timeout = "5s"
registry = "{dir}/registry.db"
cache_dir = "{dir}/cache"
[app]
name = "web"
[tls]
ca = "{ca}"
cert = "{cert}"
key = "{key}"
revoked = "{dir}/revoked.txt"
[server]
listen = "127.0.0.1:{api}"
dial_in_listen = "127.0.0.1:{dial_in}"
audit_log = "{dir}/api-audit.log"
artifact_roots = ["{dir}"]
[environments.test]
hosts = {{ {hosts} }}
"#,
        dir = dir.display(),
        ca = ctl.ca.display(),
        cert = ctl.cert.display(),
        key = ctl.key.display(),
    );
    let path = dir.join("fleet.toml");
    if !dir.join("revoked.txt").exists() {
        std::fs::write(dir.join("revoked.txt"), "").expect("write revoked.txt");
    }
    std::fs::write(&path, &text).expect("write fleet.toml");
    FleetConfig::from_toml(&path, &text).unwrap_or_else(|e| panic!("{e}"))
}

async fn status(api: &Remote) -> Value {
    api.call("GET", "/api/v1/environments/test/status", None).await.expect("status")
}

/// Waits (up to `secs`) until `status` says `want` of every host.
async fn status_until(api: &Remote, secs: u64, want: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    for _ in 0..secs * 10 {
        last = status(api).await;
        if last["hosts"].as_array().is_some_and(|h| !h.is_empty() && h.iter().all(&want)) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("not reached in {secs} s: {last:#}");
}

fn release(dir: &Path, version: &str) -> PathBuf {
    let root = dir.join(format!("build-{version}"));
    std::fs::create_dir_all(root.join("bin")).expect("mkdir");
    std::fs::write(root.join("VERSION"), format!("{version}\n")).expect("write");
    std::fs::write(root.join("bin/app"), ferry_tests::pseudo_random(300_000, version.len() as u64)).expect("write");
    root
}

/// Registers `version` and deploys it to `test` through the API; the final deployment.
async fn deploy(api: &Remote, dir: &Path, version: &str) -> Value {
    let artifact = release(dir, version);
    api.call("POST", "/api/v1/versions", Some(&json!({ "version": version, "artifact": artifact })))
        .await
        .expect("register");
    let started = api
        .call("POST", "/api/v1/deployments", Some(&json!({ "environment": "test", "version": version })))
        .await
        .expect("deploy");
    let id = started["deployment_id"].as_str().expect("id").to_string();
    api.follow(&id, |_, _| {}).await.expect("follow")
}

fn current(data: &Path) -> String {
    let root = PathBuf::from(format!("{}-web", data.display()));
    std::fs::read_to_string(root.join("VERSION")).map(|v| v.trim().to_string()).unwrap_or_default()
}

fn up(h: &Value) -> bool {
    h["reachable"] == true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dialed_in_agents_take_status_deployments_and_rollbacks_through_ferry_serve() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let ctl = pki.issue("ctl", Role::Coordinator, &["127.0.0.1"]);
    let config = fleet_toml(dir.path(), &ctl, r#"web-1 = "dial-in", web-2 = "dial-in""#, free_port(), free_port());
    let s = serve(&config, &ctl).await;
    let data: Vec<PathBuf> = (1..=2).map(|i| dir.path().join(format!("data-{i}"))).collect();
    let mut agents = Vec::new();
    for (i, d) in data.iter().enumerate() {
        let files = pki.issue(&format!("web-{}", i + 1), Role::Agent, &[]);
        agents.push(TestAgent::start_dialing(&files, d, &s.dial_in).await.expect("agent"));
    }
    let api = remote(&s, &ctl);

    // Status: both reachable through their own connections, which the server names.
    let report = status_until(&api, 10, up).await;
    for h in report["hosts"].as_array().expect("hosts") {
        assert_eq!(h["address"], "dial-in", "{h}");
        assert!(h["dial_in"]["addr"].as_str().is_some_and(|a| a.starts_with("127.0.0.1:")), "{h}");
        assert!(h["dial_in"]["connected_since"].as_str().is_some_and(|t| t.ends_with('Z')), "{h}");
        assert!(h["dial_in"]["last_seen"].is_string(), "{h}");
    }

    // Deployments and a rollback run over the same connections.
    for v in ["1", "2"] {
        let d = deploy(&api, dir.path(), v).await;
        assert_eq!(d["status"], "succeeded", "{d:#}");
        assert_eq!(data.iter().map(|d| current(d)).collect::<Vec<_>>(), [v, v]);
    }
    let started = api.call("POST", "/api/v1/environments/test/rollback", None).await.expect("rollback");
    let d = api.follow(started["deployment_id"].as_str().expect("id"), |_, _| {}).await.expect("follow");
    assert_eq!(d["status"], "succeeded", "{d:#}");
    assert_eq!(data.iter().map(|d| current(d)).collect::<Vec<_>>(), ["1", "1"]);

    // The engine on its own cannot reach them, and says where to go...
    let here = ferry_coordinator::commands::status::run(&config, "test", &ctl.client_tls()).await.expect("status");
    for h in &here.hosts {
        assert!(!h.reachable);
        let e = h.error.as_deref().unwrap_or_default();
        assert!(e.contains("dials in to ferry serve") && e.contains("--server URL"), "{e}");
    }
    // ...and the `ferry` CLI goes there by itself ([server] listen, as no advertise is set).
    let out = tokio::process::Command::new(ferry_tests::bin("ferry"))
        .args([
            "status",
            "--config",
            &dir.path().join("fleet.toml").to_string_lossy(),
            "--env",
            "test",
            "--output",
            "json",
        ])
        .output()
        .await
        .expect("run ferry");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains(&format!(
            "web-1 and 1 more of environment test dial in to ferry serve: sending this to it at {}",
            s.url
        )),
        "{said}"
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("status as JSON");
    assert!(report["hosts"].as_array().is_some_and(|h| h.len() == 2 && h.iter().all(up)), "{report:#}");

    // An agent that stops is unreachable at once, and the server says since when.
    agents.pop().expect("web-2").stop().await;
    let report = status_until(&api, 10, |h| h["name"] == "web-1" || h["reachable"] == false).await;
    let web2 = &report["hosts"][1];
    assert_eq!(web2["error_kind"], "not_connected", "{web2}");
    assert!(web2["error"].as_str().is_some_and(|e| e.contains("not connected to this ferry serve since")), "{web2}");
    assert!(up(&report["hosts"][0]), "{report:#}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_dial_again_after_a_server_restart() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let ctl = pki.issue("ctl", Role::Coordinator, &["127.0.0.1"]);
    let config = fleet_toml(dir.path(), &ctl, r#"web-1 = "dial-in", web-2 = "dial-in""#, free_port(), free_port());
    let s = serve(&config, &ctl).await;
    let mut agents = Vec::new();
    for i in 1..=2 {
        let files = pki.issue(&format!("web-{i}"), Role::Agent, &[]);
        let data = dir.path().join(format!("data-{i}"));
        agents.push(TestAgent::start_dialing(&files, &data, &s.dial_in).await.expect("agent"));
    }
    let before = status_until(&remote(&s, &ctl), 10, up).await;
    s.stop().await;

    // The same server again: the agents find it by themselves.
    let s = serve(&config, &ctl).await;
    let api = remote(&s, &ctl);
    let after = status_until(&api, 20, up).await;
    for (b, a) in before["hosts"].as_array().expect("hosts").iter().zip(after["hosts"].as_array().expect("hosts")) {
        assert_ne!(b["dial_in"]["addr"], a["dial_in"]["addr"], "a new connection: {b} / {a}");
    }
    let d = deploy(&api, dir.path(), "1").await;
    assert_eq!(d["status"], "succeeded", "{d:#}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_certificates_are_refused_on_either_side_and_audited() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    // The server's certificate does not name 127.0.0.1, which the agents dial.
    let misnamed = pki.issue("ctl", Role::Coordinator, &["deploy.example.com"]);
    let config =
        fleet_toml(dir.path(), &misnamed, r#"web-1 = "dial-in", web-2 = "10.9.9.2""#, free_port(), free_port());
    let s = serve(&config, &misnamed).await;
    let data = dir.path().join("data-1");
    let agent =
        TestAgent::start_dialing(&pki.issue("web-1", Role::Agent, &[]), &data, &s.dial_in).await.expect("agent");
    let audit = data.join("audit.log");
    let line = ferry_tests::wait_for(200, || {
        std::fs::read_to_string(&audit).ok()?.lines().find(|l| l.contains("does not name")).map(str::to_string)
    })
    .await;
    let line = line.unwrap_or_else(|| panic!("the agent audits the refusal: {:?}", std::fs::read_to_string(&audit)));
    assert!(line.contains("127.0.0.1") && line.contains("--san"), "{line}");
    agent.stop().await;
    s.stop().await;

    // A server presenting an agent's certificate (well named, from the fleet CA) is no coordinator.
    let ctl = pki.issue("ctl", Role::Coordinator, &["127.0.0.1"]);
    let impostor = pki.issue("web-9", Role::Agent, &["127.0.0.1"]);
    fleet_toml(dir.path(), &ctl, r#"web-1 = "dial-in""#, free_port(), free_port());
    let path = dir.path().join("fleet.toml");
    let text = std::fs::read_to_string(&path).expect("fleet.toml").replacen(
        "[server]\n",
        &format!("[server]\ncert = \"{}\"\nkey = \"{}\"\n", impostor.cert.display(), impostor.key.display()),
        1,
    );
    let config = FleetConfig::from_toml(&path, &text).expect("valid");
    let s = serve(&config, &ctl).await;
    let data = dir.path().join("data-impostor");
    let agent =
        TestAgent::start_dialing(&pki.issue("web-1", Role::Agent, &[]), &data, &s.dial_in).await.expect("agent");
    let audit = data.join("audit.log");
    let line = ferry_tests::wait_for(200, || {
        std::fs::read_to_string(&audit)
            .ok()?
            .lines()
            .find(|l| l.contains("not the coordinator role"))
            .map(str::to_string)
    })
    .await;
    assert!(line.is_some_and(|l| l.contains("web-9")), "the agent refuses it: {:?}", std::fs::read_to_string(&audit));
    agent.stop().await;
    s.stop().await;

    // A well-named server: it refuses an agent of another CA, and a host not marked dial-in.
    let ctl = pki.issue("ctl", Role::Coordinator, &["127.0.0.1"]);
    let config = fleet_toml(dir.path(), &ctl, r#"web-1 = "dial-in", web-2 = "10.9.9.2""#, free_port(), free_port());
    let s = serve(&config, &ctl).await;
    let other_ca = TestPki::new();
    // It trusts this fleet's CA, but its own certificate is another CA's.
    let rogue = CertFiles { ca: ctl.ca.clone(), ..other_ca.issue("web-1", Role::Agent, &[]) };
    let mut agents = Vec::new();
    for (i, files) in [rogue, pki.issue("web-2", Role::Agent, &[])].iter().enumerate() {
        let data = dir.path().join(format!("bad-{i}"));
        agents.push(TestAgent::start_dialing(files, &data, &s.dial_in).await.expect("agent"));
    }
    let api_audit = dir.path().join("api-audit.log");
    for want in ["unknown issuer", "for no host that fleet.toml marks \\\"dial-in\\\""] {
        let found = ferry_tests::wait_for(200, || {
            std::fs::read_to_string(&api_audit)
                .ok()?
                .lines()
                .find(|l| l.contains("DIAL-IN") && l.contains(want))
                .map(str::to_string)
        })
        .await;
        assert!(found.is_some(), "{want:?} in the API audit log: {:?}", std::fs::read_to_string(&api_audit));
    }
    // None of them got in.
    let report = status(&remote(&s, &ctl)).await;
    assert_eq!(report["hosts"][0]["error_kind"], "not_connected", "{report:#}");
    for a in agents {
        a.stop().await;
    }
    s.stop().await;
}

/// The serial of the certificate in `pem`, as `tls.revoked` lists it.
fn serial(pem: &Path) -> String {
    let certs = ferry_proto::identity::load_certs(pem).expect("certificate");
    ferry_proto::identity::CertIdentity::from_der(&certs[0]).expect("parse").serial
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_revoked_while_connected_is_cut_off_on_either_side() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let ctl = pki.issue("ctl", Role::Coordinator, &["127.0.0.1"]);
    let config = fleet_toml(dir.path(), &ctl, r#"web-1 = "dial-in", web-2 = "dial-in""#, free_port(), free_port());
    let s = serve(&config, &ctl).await;
    let api = remote(&s, &ctl);
    let web1 = pki.issue("web-1", Role::Agent, &[]);
    let _a1 = TestAgent::start_dialing(&web1, &dir.path().join("data-1"), &s.dial_in).await.expect("agent");
    // web-2 lists its own tls.revoked, empty for now.
    let agent_revoked = dir.path().join("agent-revoked.txt");
    std::fs::write(&agent_revoked, "").expect("write");
    let text = ferry_tests::agents::agent_toml_without_listen(
        &pki.issue("web-2", Role::Agent, &[]),
        &dir.path().join("data-2"),
        &format!("connect = [\"{}\"]", s.dial_in),
    )
    .replacen("[tls]\n", &format!("[tls]\nrevoked = \"{}\"\n", agent_revoked.display()), 1);
    let _a2 = TestAgent::start_toml(&text).await.expect("agent");
    status_until(&api, 10, up).await;

    // The server revokes web-1's certificate: its connection is cut at the next use, and it
    // cannot come back.
    std::fs::write(dir.path().join("revoked.txt"), format!("{}\n", serial(&web1.cert))).expect("revoke");
    let report = status(&api).await;
    let e = report["hosts"][0]["error"].as_str().unwrap_or_default().to_string();
    assert!(e.contains("its connection was cut") && e.contains("revoked"), "{report:#}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let report = status(&api).await;
    assert_eq!(report["hosts"][0]["reachable"], false, "{report:#}");
    let audit = std::fs::read_to_string(dir.path().join("api-audit.log")).unwrap_or_default();
    assert!(audit.contains("DIAL-IN") && audit.contains("revoked"), "its new dials are refused: {audit}");

    // web-2 revokes the server's certificate: it cuts its connection within its recheck (10 s).
    std::fs::write(&agent_revoked, format!("{}\n", serial(&ctl.cert))).expect("revoke");
    status_until(&api, 25, |h| h["reachable"] == false).await;
    let audit = std::fs::read_to_string(dir.path().join("data-2/audit.log")).unwrap_or_default();
    assert!(audit.contains("now listed in tls.revoked"), "{audit}");
    s.stop().await;
}
