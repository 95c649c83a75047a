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
