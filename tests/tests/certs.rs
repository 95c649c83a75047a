//! Certificates without toil, against a real `ferry-agent` process: it reloads its certificate,
//! key, CA bundle and revocation list on SIGHUP and when the files change, without a restart and
//! without dropping a deployment in flight; `ferry cert renew` re-issues a certificate in place; a
//! whole CA rotation (trust old + new, new leaf certificates, drop the old CA) and a revocation go
//! through with no failed deployment.
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use ferry_coordinator::artifact::Artifact;
use ferry_coordinator::config::FleetConfig;
use ferry_coordinator::rollout::DeployReport;
use ferry_coordinator::state::DeploymentStatus;
use ferry_proto::identity::Role;
use ferry_tests::agents::{AgentProcess, fleet_config};
use ferry_tests::pki::{CertFiles, TestPki};
use nix::sys::signal::Signal;

/// Waits (bounded) until the agent's log has `n` lines containing `needle`.
async fn logged(agent: &AgentProcess, needle: &str, n: usize) -> String {
    let found = ferry_tests::wait_for(400, || (agent.log().matches(needle).count() >= n).then(|| agent.log())).await;
    found.unwrap_or_else(|| panic!("the agent never logged {needle:?} {n} time(s):\n{}", agent.log()))
}

/// Sends SIGHUP and waits for the reload it causes to be logged.
async fn reload(agent: &AgentProcess) -> String {
    let n = agent.log().matches("(SIGHUP)").count();
    agent.signal(Signal::SIGHUP);
    logged(agent, "(SIGHUP)", n + 1).await
}

/// Replaces `dst` atomically with `content` (as a config management tool would).
fn put(dst: &Path, content: &[u8]) {
    let tmp = dst.with_extension("tmp");
    std::fs::write(&tmp, content).expect("write");
    std::fs::rename(&tmp, dst).expect("rename");
}

fn ferry(args: &[&str]) -> String {
    let out = Command::new(ferry_tests::bin("ferry")).args(args).output().expect("run ferry");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "ferry {args:?}: {text}");
    text
}

fn serial(cert: &Path) -> String {
    ferry_coordinator::pki::show(cert).expect("read certificate").serial
}

async fn deploy(dir: &Path, files: &CertFiles, agent: &str, version: &str) -> DeployReport {
    let config: FleetConfig = fleet_config(dir, files, &[("web-1", agent.to_string())]);
    let tls = files.client_tls();
    let build = dir.join(format!("build-{version}"));
    std::fs::create_dir_all(&build).expect("mkdir");
    std::fs::write(build.join("VERSION"), version).expect("write");
    // Large enough that a deployment is still transferring when the agent reloads.
    let bulk: Vec<u8> =
        (0..8_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ version.len() as u8).collect();
    std::fs::write(build.join("bulk.bin"), bulk).expect("write");
    let artifact = Arc::new(Artifact::scan(&build, None).expect("scan"));
    ferry_tests::engine::deploy(&config, &tls, "test", artifact, version, None).await.expect("deploy runs")
}

fn ok(r: &DeployReport) {
    assert_eq!(r.status, DeploymentStatus::Succeeded, "{r:?}");
}

fn refused(r: &DeployReport, needle: &str) {
    assert_eq!(r.status, DeploymentStatus::Failed, "{r:?}");
    let error = r.hosts[0].error.clone().unwrap_or_default();
    assert!(error.contains(needle), "expected {needle:?} in: {error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_rotation_and_a_revocation_need_no_restart_and_fail_no_deployment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let old = TestPki::in_dir(&d.join("ca-old"));
    // The agent's files, where agent.toml names them.
    let etc = d.join("etc");
    std::fs::create_dir_all(&etc).expect("mkdir");
    let issued = old.issue("web-1", Role::Agent, &["127.0.0.1"]);
    for (from, to) in [(&issued.ca, "ca.pem"), (&issued.cert, "agent.pem"), (&issued.key, "agent.key")] {
        std::fs::copy(from, etc.join(to)).expect("copy");
    }
    std::fs::write(etc.join("revoked.txt"), "# serials of certificates cut off\n").expect("write");
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    let agent_toml = d.join("agent.toml");
    std::fs::write(
        &agent_toml,
        format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{data}\"\nshutdown_grace = \"2s\"\n[tls]\nca = \"{etc}/ca.pem\"\ncert = \"{etc}/agent.pem\"\nkey = \"{etc}/agent.key\"\nrevoked = \"{etc}/revoked.txt\"\n[apps.web]\nroot = \"{data}-web\"\n",
            data = d.join("data").display(),
            etc = etc.display(),
        ),
    )
    .expect("write agent.toml");
    let mut agent = AgentProcess::start(&agent_toml, None, Some(&d.join("agent.log")));
    logged(&agent, "ferry-agent serving", 1).await;
    let addr = format!("127.0.0.1:{port}");

    // The coordinator's files.
    let ctl_dir = d.join("ctl");
    std::fs::create_dir_all(&ctl_dir).expect("mkdir");
    let c = old.issue("ctl", Role::Coordinator, &[]);
    let ctl = CertFiles { ca: ctl_dir.join("ca.pem"), cert: ctl_dir.join("ctl.pem"), key: ctl_dir.join("ctl.key") };
    for (from, to) in [(&c.ca, &ctl.ca), (&c.cert, &ctl.cert), (&c.key, &ctl.key)] {
        std::fs::copy(from, to).expect("copy");
    }
    ok(&deploy(d, &ctl, &addr, "1").await);

    // 1. Both sides trust the old and the new CA. The agent reloads on SIGHUP, here sent while a
    //    deployment is in flight: the deployment goes on.
    let new = TestPki::in_dir(&d.join("ca-new"));
    let bundle =
        [std::fs::read(old.ca_cert()).expect("old CA"), std::fs::read(new.ca_cert()).expect("new CA")].concat();
    put(&etc.join("ca.pem"), &bundle);
    put(&ctl.ca, &bundle);
    let in_flight = deploy(d, &ctl, &addr, "2");
    let signals = async {
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(40)).await;
            agent.signal(Signal::SIGHUP);
        }
    };
    let (r, ()) = tokio::join!(in_flight, signals);
    ok(&r);
    logged(&agent, "reloaded TLS (SIGHUP)", 1).await;

    // 2. New leaf certificates from the new CA, same names, renewed in place; the agent notices
    //    its files changed without being told.
    let out = ferry(&[
        "cert",
        "renew",
        "--ca",
        &d.join("ca-new").display().to_string(),
        &etc.join("agent.pem").display().to_string(),
    ]);
    let agent_serial = serial(&etc.join("agent.pem"));
    assert!(out.contains(&agent_serial) && out.contains("web-1"), "{out}");
    let renewed = ferry_coordinator::pki::show(&etc.join("agent.pem")).expect("show");
    assert_eq!((renewed.role, renewed.ips.clone()), (Some(Role::Agent), vec!["127.0.0.1".parse().expect("ip")]));
    assert!(renewed.issuer.contains(&ferry_coordinator::pki::show(&new.ca_cert()).expect("ca").subject), "{renewed:?}");
    logged(&agent, &format!("reloaded TLS (the files changed): certificate web-1 (serial {agent_serial}"), 1).await;
    ok(&deploy(d, &ctl, &addr, "3").await);
    ferry(&["cert", "renew", "--ca", &d.join("ca-new").display().to_string(), &ctl.cert.display().to_string()]);
    ok(&deploy(d, &ctl, &addr, "4").await);

    // 3. The old CA is dropped on both sides: everything still works, and a certificate of the
    //    old CA is refused.
    put(&etc.join("ca.pem"), &std::fs::read(new.ca_cert()).expect("new CA"));
    put(&ctl.ca, &std::fs::read(new.ca_cert()).expect("new CA"));
    assert!(reload(&agent).await.contains("reloaded TLS (SIGHUP)"));
    ok(&deploy(d, &ctl, &addr, "5").await);
    let stale = old.issue("ctl-old", Role::Coordinator, &[]);
    let stale = CertFiles { ca: ctl.ca.clone(), ..stale };
    refused(&deploy(d, &stale, &addr, "6").await, "not signed by the CA the agent trusts");

    // 4. A stolen coordinator certificate is cut off without touching the CA; another works.
    put(&etc.join("revoked.txt"), format!("# ctl's laptop, stolen\n{}\n", serial(&ctl.cert)).as_bytes());
    reload(&agent).await;
    refused(&deploy(d, &ctl, &addr, "6").await, "revoked");
    logged(&agent, "client certificate is revoked", 1).await;
    let other = new.issue("ctl-2", Role::Coordinator, &[]);
    ok(&deploy(d, &other, &addr, "6").await);

    // 5. A broken reload (a key that is not the certificate's) keeps the last good setup.
    let good_key = std::fs::read(etc.join("agent.key")).expect("key");
    put(&etc.join("agent.key"), &std::fs::read(&other.key).expect("another key"));
    reload(&agent).await;
    logged(&agent, "cannot reload TLS (SIGHUP); still using the previous certificate, key and CA", 1).await;
    ok(&deploy(d, &other, &addr, "7").await);
    put(&etc.join("agent.key"), &good_key);

    assert!(agent.still_running(), "the same agent process served the whole rotation:\n{}", agent.log());
}

/// The same rotation on the real fleet, driven the way an operator drives it: `ferry ca init`,
/// bundles copied into place, `systemctl reload ferry-agent` (the unit's ExecReload) while a
/// deployment is in flight, `ferry cert renew` of every certificate in place, the old CA dropped.
/// Every `ferry` command along the way succeeds, and no agent restarts.
#[test]
fn a_ca_rotation_on_the_fleet_fails_no_command_and_restarts_no_agent() {
    let fleet = ferry_tests::fleet_or_skip!(2);
    let d = &fleet.dir;
    let run = |args: &[&str]| {
        let out = fleet.ferry(args);
        let text = ferry_tests::fleet::text_of(&out);
        assert!(out.status.success(), "ferry {args:?} failed during the rotation:\n{text}");
        text
    };
    // The coordinator's own copies of its files (the fleet's are shared by other configs).
    let ctl_dir = d.join("rotation-ctl");
    std::fs::create_dir_all(&ctl_dir).expect("mkdir");
    let ctl = CertFiles { ca: ctl_dir.join("ca.pem"), cert: ctl_dir.join("ctl.pem"), key: ctl_dir.join("ctl.key") };
    for (from, to) in
        [(&fleet.coordinator.ca, &ctl.ca), (&fleet.coordinator.cert, &ctl.cert), (&fleet.coordinator.key, &ctl.key)]
    {
        std::fs::copy(from, to).expect("copy");
    }
    let toml = fleet.write_fleet_toml("rotation.toml", &ctl).expect("write fleet.toml");
    let config = toml.to_str().unwrap_or_default();
    let release = |v: &str| {
        let dir = d.join(format!("rotation-v{v}"));
        ferry_tests::demo_app::write_release(&dir, v, ferry_tests::demo_app::Variant::Healthy).expect("release");
        dir.to_string_lossy().into_owned()
    };
    let deploy = |v: &str| {
        let text = run(&["deploy", "--config", config, "--env", "test", "--artifact", &release(v), "--version", v]);
        assert!(text.contains("succeeded: 2 of 2 host(s) on the release"), "{text}");
    };
    let etc = |h: &ferry_tests::fleet::FleetHost, file: &str| h.dir.join("etc/ferry").join(file);
    let agent_pids: Vec<u32> = fleet.hosts.iter().map(|h| h.main_pid("ferry-agent.service")).collect();
    deploy("1");

    // 1. A new CA; every host and the coordinator trust old and new. The reload happens while a
    //    deployment is in flight, which goes on.
    let new_ca = d.join("rotation-ca-new");
    run(&["ca", "init", "--out", &new_ca.to_string_lossy()]);
    let old_pem = std::fs::read(fleet.pki.ca_cert()).expect("old CA");
    let new_pem = std::fs::read(new_ca.join("ca.pem")).expect("new CA");
    let bundle = [old_pem.clone(), new_pem.clone()].concat();
    for h in &fleet.hosts {
        put(&etc(h, "ca.pem"), &bundle);
    }
    put(&ctl.ca, &bundle);
    let log = d.join("rotation-deploy-2.log");
    let mut in_flight = fleet.spawn_ferry(
        &["deploy", "--config", config, "--env", "test", "--artifact", &release("2"), "--version", "2"],
        &log,
    );
    for h in &fleet.hosts {
        h.systemctl(&["reload", "ferry-agent.service"]).unwrap_or_else(|e| panic!("{}: reload: {e}", h.name));
    }
    let status = in_flight.wait().expect("wait for ferry deploy");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "the deployment in flight during the reload failed:\n{text}");
    for h in &fleet.hosts {
        let journal = h.journal("ferry-agent.service", 200);
        assert!(journal.contains("reloaded TLS (SIGHUP)"), "{}: {journal}", h.name);
    }

    // 2. Every certificate renewed in place under the new CA; the agents notice the changed files
    //    without being told.
    let new_ca_arg = new_ca.to_string_lossy().into_owned();
    for h in &fleet.hosts {
        run(&["cert", "renew", "--ca", &new_ca_arg, &etc(h, "agent.pem").to_string_lossy()]);
    }
    for h in &fleet.hosts {
        let serial = serial(&etc(h, "agent.pem"));
        let needle = format!("reloaded TLS (the files changed): certificate {} (serial {serial}", h.name);
        let seen = ferry_tests::fleet::poll(Duration::from_secs(30), || {
            h.journal("ferry-agent.service", 200).contains(&needle).then_some(())
        });
        assert!(seen.is_some(), "{}: never logged {needle:?}:\n{}", h.name, h.journal("ferry-agent.service", 40));
    }
    run(&["status", "--config", config, "--env", "test"]);
    run(&["cert", "renew", "--ca", &new_ca_arg, &ctl.cert.to_string_lossy()]);
    deploy("3");

    // 3. The old CA is dropped everywhere: deployments go on; the old CA's certificates are refused.
    for h in &fleet.hosts {
        put(&etc(h, "ca.pem"), &new_pem);
        h.systemctl(&["reload", "ferry-agent.service"]).unwrap_or_else(|e| panic!("{}: reload: {e}", h.name));
    }
    put(&ctl.ca, &new_pem);
    deploy("4");
    let stale = CertFiles { ca: ctl.ca.clone(), ..fleet.coordinator.clone() };
    let stale_toml = fleet.write_fleet_toml("rotation-stale.toml", &stale).expect("write fleet.toml");
    let out = fleet.ferry(&["status", "--config", &stale_toml.to_string_lossy(), "--env", "test"]);
    let text = ferry_tests::fleet::text_of(&out);
    assert!(!out.status.success() && text.contains("not signed by the CA the agent trusts"), "{text}");

    assert_eq!(fleet.versions(), ["4", "4"]);
    let now: Vec<u32> = fleet.hosts.iter().map(|h| h.main_pid("ferry-agent.service")).collect();
    assert_eq!(now, agent_pids, "an agent restarted during the rotation");
}
