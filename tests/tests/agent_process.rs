//! The `ferry-agent` binary as systemd runs it: config errors, readiness and watchdog
//! notifications over a real `NOTIFY_SOCKET`, and a clean exit on SIGTERM.
use std::io::Read;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use ferry_proto::identity::Role;
use ferry_tests::agents::agent_toml;
use ferry_tests::pki::TestPki;

fn agent(config: &Path) -> Command {
    let mut c = Command::new(ferry_tests::bin("ferry-agent"));
    c.arg("--config").arg(config).env_remove("NOTIFY_SOCKET").env_remove("WATCHDOG_USEC").env_remove("JOURNAL_STREAM");
    c
}

fn run(config: &Path) -> (Option<i32>, String) {
    let out = agent(config).output().expect("run ferry-agent");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn config_errors_exit_2_and_name_file_key_and_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.toml");

    let (code, err) = run(&path);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(&format!("cannot read config file {}: No such file", path.display())), "{err}");

    std::fs::write(&path, "listen = \"0.0.0.0:7443\"\n[tls\n").expect("write");
    let (code, err) = run(&path);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(&path.display().to_string()) && err.contains("line 2"), "{err}");

    let pki = TestPki::new();
    let files = pki.issue("web-1", Role::Agent, &[]);
    let good = agent_toml(&files, &dir.path().join("data"));
    std::fs::write(&path, good.replace("[tls]", "typo = 1\n[tls]")).expect("write");
    let (code, err) = run(&path);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("unknown field `typo`"), "{err}");

    std::fs::write(&path, good.replace("units = [\"web.service\"]", "units = [\"rm -rf /\"]")).expect("write");
    let (code, err) = run(&path);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("apps.web.units[0]: \"rm -rf /\" is not a unit name"), "{err}");
}

#[test]
fn check_flag_validates_tls_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = TestPki::new();
    let mut files = pki.issue("web-1", Role::Agent, &[]);
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, agent_toml(&files, &dir.path().join("data"))).expect("write");
    let out = agent(&path).arg("--check").output().expect("run");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));

    files.cert = dir.path().join("nope.pem");
    std::fs::write(&path, agent_toml(&files, &dir.path().join("data"))).expect("write");
    let out = agent(&path).arg("--check").output().expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("cannot read certificate file") && err.contains("nope.pem"), "{err}");
}

#[test]
fn notifies_systemd_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = TestPki::new();
    let files = pki.issue("web-1", Role::Agent, &[]);
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, agent_toml(&files, &dir.path().join("data"))).expect("write");

    // Stand in for systemd's notification socket.
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut child = agent(&path)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "200000")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ferry-agent");

    let mut messages = Vec::new();
    let mut buf = [0u8; 512];
    // READY=1 first, then watchdog pings at half the 200 ms interval: wait for two pings.
    while messages.iter().filter(|m: &&String| m.contains("WATCHDOG=1")).count() < 2 {
        match sock.recv(&mut buf) {
            Ok(n) => messages.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e) => {
                let _ = child.kill();
                panic!("no notification from the agent ({e}); got {messages:?}");
            }
        }
    }
    assert!(messages[0].contains("READY=1"), "{messages:?}");

    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid fits"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("send SIGTERM");
    // STOPPING=1 arrives before the process exits.
    loop {
        let n = sock.recv(&mut buf).expect("STOPPING=1 before exit");
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            break;
        }
    }
    let status = child.wait().expect("wait");
    let mut stderr = String::new();
    child.stderr.take().expect("piped").read_to_string(&mut stderr).expect("read stderr");
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("SIGTERM received") && stderr.contains("ferry-agent stopped"), "{stderr}");
}

/// What a package upgrade (or any `systemctl restart`) does to a deployment in progress: SIGTERM
/// in the middle of an activation. The agent refuses new connections, tells systemd it is still
/// stopping and why (extending its stop timeout), lets the activation run to its end (well past
/// `shutdown_grace`), the coordinator gets the activation's final event, and only then it exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_an_activation_finishes_it_before_exiting() {
    use ferry_coordinator::config::{FleetConfig, Host};
    use ferry_coordinator::state::DeploymentStatus;
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().expect("tempdir");
    let pki = TestPki::new();
    let files = pki.issue("web-1", Role::Agent, &["127.0.0.1"]);
    // A free port for the agent (it must be known before the agent starts).
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
    let path = dir.path().join("agent.toml");
    let app_root = dir.path().join("web");
    std::fs::write(
        &path,
        agent_toml(&files, &dir.path().join("data"))
            .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"))
            .replace("shutdown_grace = \"2s\"", "shutdown_grace = \"100ms\"")
            .replace(
                &format!("root = \"{}-web\"", dir.path().join("data").display()),
                &format!("root = \"{}\"", app_root.display()),
            )
            .replace("units = [\"web.service\"]", "units = []"),
    )
    .expect("write agent.toml");

    // The release's validate hook says it started, then waits for a gate the test opens.
    let (started, gate) = (dir.path().join("hook-started"), dir.path().join("gate"));
    let release = dir.path().join("v1");
    std::fs::create_dir_all(release.join("hooks")).expect("mkdir");
    std::fs::write(release.join("VERSION"), "1\n").expect("write");
    let hook = release.join("hooks/validate");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\ntouch '{}'\ni=0\nwhile [ ! -e '{}' ]; do i=$((i+1)); [ $i -gt 600 ] && exit 1; sleep 0.05; done\n",
            started.display(),
            gate.display()
        ),
    )
    .expect("write hook");
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).expect("chmod");

    let ctl = pki.issue("ctl", Role::Coordinator, &[]);
    let fleet_text = format!(
        "registry = \"registry.db\"\n[app]\nname = \"web\"\n[app.hooks]\nvalidate = \"hooks/validate\"\ntimeout = \"60s\"\n[tls]\nca = \"{}\"\n\
         cert = \"{}\"\nkey = \"{}\"\n[environments.test]\nhosts = {{ web-1 = \"127.0.0.1:{port}\" }}\n",
        ctl.ca.display(),
        ctl.cert.display(),
        ctl.key.display()
    );
    let config = FleetConfig::from_toml(&dir.path().join("fleet.toml"), &fleet_text).expect("fleet.toml");
    let tls = ferry_coordinator::tls::ClientTls::load(&config.tls).expect("coordinator TLS");

    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let mut child =
        agent(&path).env("NOTIFY_SOCKET", &sock_path).stderr(Stdio::piped()).spawn().expect("spawn ferry-agent");
    let mut buf = [0u8; 1024];
    let n = sock.recv(&mut buf).expect("READY=1");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));

    let artifact = std::sync::Arc::new(ferry_coordinator::artifact::Artifact::scan(&release, None).expect("scan"));
    let deployment = tokio::spawn({
        let (config, tls) = (config.clone(), tls.clone());
        async move { ferry_tests::engine::deploy(&config, &tls, "test", artifact, "1", None).await }
    });
    let hook_running = ferry_tests::wait_for(600, || started.exists().then_some(())).await;
    assert!(hook_running.is_some(), "the validate hook never started");

    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid fits"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("send SIGTERM");
    // The agent says it is waiting for the activation (and asks systemd for more time) instead of
    // exiting after shutdown_grace.
    let waiting = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        loop {
            let n = match sock.recv(&mut buf) {
                Ok(n) => n,
                Err(e) => return Err(format!("{e}; notifications: {seen:?}")),
            };
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            if msg.contains("waiting for 1 activation(s)") {
                return Ok(msg);
            }
            seen.push(msg);
        }
    })
    .await
    .expect("join");
    let waiting = waiting.unwrap_or_else(|e| {
        let _ = child.kill();
        panic!("the stopping agent never said it waits for the activation: {e}")
    });
    assert!(waiting.contains("EXTEND_TIMEOUT_USEC="), "{waiting}");
    // No new work while it stops: new connections are refused.
    let host = Host { name: "web-1".into(), address: "127.0.0.1".into(), port };
    let timeouts =
        ferry_coordinator::client::Timeouts { connect: Duration::from_secs(3), request: Duration::from_secs(5) };
    assert!(ferry_coordinator::client::Agent::connect(&host, &tls, timeouts).await.is_err());
    assert_eq!(child.try_wait().expect("try_wait"), None, "the agent exited with an activation in progress");

    std::fs::write(&gate, "").expect("open the gate");
    let report = deployment.await.expect("join").expect("deploy runs");
    assert_eq!(report.status, DeploymentStatus::Succeeded, "{report:?}");
    let status = tokio::task::spawn_blocking(move || child.wait_with_output()).await.expect("join").expect("wait");
    let stderr = String::from_utf8_lossy(&status.stderr);
    assert_eq!(status.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("ferry-agent stopped"), "{stderr}");
    assert_eq!(std::fs::read_to_string(app_root.join("VERSION")).expect("current release").trim(), "1");
}
