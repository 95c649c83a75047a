//! The Debian packages, built by `packaging/build-deb.sh` from the binaries under test: lintian
//! finds no errors (and no warning that packaging/README.md does not explain), the unit's sandbox
//! keeps its score, and on a Debian host of its own (debootstrap root, booted with
//! systemd-nspawn, same network as the fleet) the agent package installs without starting,
//! starts once configured, deploys, survives a crash, upgrades in the middle of a deployment
//! without cutting it, and uninstalls leaving the releases and the app running.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_tests::debroot;
use ferry_tests::demo_app::{self, Variant};
use ferry_tests::fleet::{
    self, Fleet, FleetHost, poll, require_tools as tools, skip_unless_ci as skip, text_of as text,
};

/// lintian warnings packaging/README.md explains; any other warning fails the test.
const EXPLAINED_WARNINGS: &[&str] = &["initial-upload-closes-no-bugs"];
/// The agent unit's `systemd-analyze security` exposure must not rise above this.
const MAX_EXPOSURE: f64 = 3.5;

/// `(ferry-agent .deb, ferry .deb)` of revision `revision`, from the binaries the tests run.
fn build_debs(out: &Path, revision: u32) -> (PathBuf, PathBuf) {
    let bin_dir = ferry_tests::bin("ferry-agent").parent().map(Path::to_path_buf).unwrap_or_default();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/build-deb.sh");
    let result = Command::new(&script)
        .arg("--bin-dir")
        .arg(&bin_dir)
        .arg("--out")
        .arg(out)
        .args(["--revision", &revision.to_string(), "--fast"])
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
    assert!(result.status.success(), "{} failed:\n{}", script.display(), text(&result));
    let printed = String::from_utf8_lossy(&result.stdout);
    let debs: Vec<PathBuf> = printed.lines().map(PathBuf::from).collect();
    let find = |prefix: &str| {
        debs.iter()
            .find(|d| d.file_name().is_some_and(|n| n.to_string_lossy().starts_with(prefix)))
            .unwrap_or_else(|| panic!("build-deb printed no {prefix}*.deb: {printed}"))
            .clone()
    };
    (find("ferry-agent_"), find("ferry_"))
}

#[test]
fn packages_pass_lintian_and_hold_what_they_promise() {
    if let Err(why) = tools(&["lintian", "dpkg-deb", "dpkg-shlibdeps", "help2man", "systemd-analyze"]) {
        return skip(&why, "the packaging test");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (agent, ferry) = build_debs(dir.path(), 1);

    let out = Command::new("lintian").arg("--pedantic").arg(&agent).arg(&ferry).output().expect("run lintian");
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    let errors: Vec<&str> = report.lines().filter(|l| l.starts_with("E:")).collect();
    assert!(errors.is_empty(), "lintian errors:\n{report}");
    let unexplained: Vec<&str> =
        report.lines().filter(|l| l.starts_with("W:") && !EXPLAINED_WARNINGS.iter().any(|w| l.contains(w))).collect();
    assert!(
        unexplained.is_empty(),
        "lintian warnings not explained in packaging/README.md (fix them or explain them there and in \
         EXPLAINED_WARNINGS):\n{}",
        unexplained.join("\n")
    );

    let contents = |deb: &Path| text(&Command::new("dpkg-deb").arg("-c").arg(deb).output().expect("dpkg-deb -c"));
    let agent_files = contents(&agent);
    for path in [
        "./usr/bin/ferry-agent",
        "./lib/systemd/system/ferry-agent.service",
        "./etc/ferry/agent.toml",
        "./usr/share/man/man8/ferry-agent.8.gz",
        "./usr/share/doc/ferry-agent/copyright",
    ] {
        assert!(agent_files.contains(path), "ferry-agent lacks {path}:\n{agent_files}");
    }
    let ferry_files = contents(&ferry);
    for path in [
        "./usr/bin/ferry",
        "./usr/share/man/man1/ferry.1.gz",
        "./usr/share/bash-completion/completions/ferry",
        "./usr/share/zsh/vendor-completions/_ferry",
        "./usr/share/fish/vendor_completions.d/ferry.fish",
        "./usr/share/doc/ferry/examples/ferry-alerts.yml",
        "./usr/share/doc/ferry/examples/ferry-dashboard.json",
    ] {
        assert!(ferry_files.contains(path), "ferry lacks {path}:\n{ferry_files}");
    }
    let conffiles = Command::new("dpkg-deb").arg("-I").arg(&agent).arg("conffiles").output().expect("dpkg-deb -I");
    assert_eq!(String::from_utf8_lossy(&conffiles.stdout).trim(), "/etc/ferry/agent.toml");

    // The sandbox keeps its score (packaging/README.md records it).
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/ferry-agent.service");
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .output()
        .expect("run systemd-analyze");
    let report = text(&out);
    let exposure: f64 = report
        .lines()
        .find_map(|l| l.split("Overall exposure level for ferry-agent.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in systemd-analyze's report:\n{report}"));
    assert!(exposure <= MAX_EXPOSURE, "exposure {exposure} > {MAX_EXPOSURE}:\n{report}");
}

/// Runs `args` in the host; panics with the output unless it succeeds.
fn must(h: &FleetHost, args: &[&str]) -> String {
    let out = h.exec(args).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.status.success(), "{}: {args:?} failed ({}):\n{}", h.name, out.status, text(&out));
    text(&out)
}

fn show(h: &FleetHost, property: &str) -> String {
    h.systemctl(&["show", "-p", property, "--value", "ferry-agent.service"]).unwrap_or_default()
}

fn served_version(fleet: &Fleet, h: &FleetHost) -> String {
    match fleet.http_get(&format!("http://{}:{}/", h.ip, demo_app::PORT)) {
        Ok((200, body)) => body,
        other => format!("{other:?}"),
    }
}

/// One booted host of the cached Debian root, or `None` (skipped, loudly) where that cannot run.
fn debian_host(what: &str) -> Option<Fleet> {
    if let Err(why) = fleet::check_supported()
        .and_then(|()| debroot::check_supported())
        .and_then(|()| tools(&["dpkg-deb", "dpkg-shlibdeps", "help2man"]))
    {
        skip(&why, what);
        return None;
    }
    let root = debroot::cached_root().unwrap_or_else(|e| panic!("the Debian root for package tests: {e}"));
    Some(Fleet::boot_own_root(&root, 1).unwrap_or_else(|e| panic!("booting a Debian host: {e}")))
}

#[test]
fn agent_package_installs_deploys_restarts_upgrades_mid_deployment_and_uninstalls() {
    let Some(fleet) = debian_host("the package test on a Debian host") else { return };
    let h = &fleet.hosts[0];

    // Packages, certificates, config and the demo app's unit, handed over read-only.
    let drop = h.drop_dir();
    let (agent_v1, _) = build_debs(&drop, 1);
    let (agent_v2, _) = build_debs(&drop, 2);
    let inside = |deb: &Path| format!("/opt/ferry-test/{}", deb.file_name().expect("a file").to_string_lossy());
    for (src, name) in [(&h.certs.ca, "ca.pem"), (&h.certs.cert, "agent.pem"), (&h.certs.key, "agent.key")] {
        std::fs::copy(src, drop.join(name)).expect("copy certificate");
    }
    std::fs::write(
        drop.join("agent.toml"),
        format!(
            "listen = \"0.0.0.0:{}\"\nshutdown_grace = \"5s\"\n\n[tls]\nca = \"/etc/ferry/ca.pem\"\n\
             cert = \"/etc/ferry/agent.pem\"\nkey = \"/etc/ferry/agent.key\"\n\n[apps.web]\nroot = \"/srv/web\"\n\
             units = [\"web.service\"]\n",
            fleet::AGENT_PORT
        ),
    )
    .expect("write agent.toml");
    std::fs::write(drop.join("web.service"), demo_app::UNIT).expect("write web.service");

    // 1. Install: enabled, not started, and the maintainer script says why.
    let install = must(h, &["dpkg", "-i", &inside(&agent_v1)]);
    assert!(install.contains("enabled, not started") && install.contains("not configured yet"), "{install}");
    assert_eq!(h.systemctl(&["is-enabled", "ferry-agent.service"]).as_deref(), Ok("enabled"));
    assert_eq!(show(h, "ActiveState"), "inactive");
    // Starting it unconfigured skips it (as at boot): not failed, not running.
    must(h, &["systemctl", "start", "ferry-agent.service"]);
    assert_eq!(show(h, "ActiveState"), "inactive", "{}", h.journal("ferry-agent.service", 20));
    assert!(h.journal("ferry-agent.service", 20).contains("not configured yet"));

    // The installed unit passes systemd's own checks; its sandbox score as systemd reports it.
    let verify = must(h, &["systemd-analyze", "verify", "ferry-agent.service"]);
    assert!(verify.trim().is_empty(), "systemd-analyze verify is not clean:\n{verify}");
    let security = must(h, &["systemd-analyze", "security", "--no-pager", "ferry-agent.service"]);
    let score = security.lines().find(|l| l.contains("Overall exposure level")).unwrap_or_default();
    eprintln!("package test: {}", score.trim());

    // 2. Configure and start, as README.Debian says.
    must(
        h,
        &[
            "sh",
            "-c",
            "cd /opt/ferry-test && cp ca.pem agent.pem agent.toml /etc/ferry/ && install -m 0600 agent.key /etc/ferry/ \
             && cp web.service /etc/systemd/system/ && systemctl daemon-reload",
        ],
    );
    must(h, &["systemctl", "enable", "--now", "ferry-agent.service"]);
    assert!(
        h.wait_unit_active("ferry-agent.service", Duration::from_secs(30)),
        "{}",
        h.journal("ferry-agent.service", 30)
    );

    // 3. Deploy to it.
    let work = tempfile::tempdir().expect("tempdir");
    let v1 = work.path().join("v1");
    demo_app::write_release(&v1, "1", Variant::Healthy).expect("write v1");
    let out = fleet.deploy("fleet.toml", &v1, "1", true);
    assert!(out.status.success(), "deploy v1:\n{}\n{}", text(&out), h.journal("ferry-agent.service", 30));
    assert_eq!(served_version(&fleet, h), "1");

    // 4. The agent crashes: systemd restarts it and `ferry status` sees it again.
    let before = h.main_pid("ferry-agent.service");
    h.kill_agent().expect("systemctl kill");
    let restarted = poll(Duration::from_secs(30), || {
        let pid = h.main_pid("ferry-agent.service");
        (pid != 0 && pid != before && show(h, "ActiveState") == "active").then_some(pid)
    });
    assert!(restarted.is_some(), "ferry-agent was not restarted:\n{}", h.journal("ferry-agent.service", 30));
    let fleet_toml = fleet.fleet_toml();
    let fleet_toml = fleet_toml.to_string_lossy();
    let status = fleet.ferry(&["status", "--config", &fleet_toml, "--env", "test"]);
    assert!(status.status.success(), "ferry status after the restart:\n{}", text(&status));

    // 5. Upgrade the package while a deployment is in its validate hook: the agent finishes the
    //    activation before it restarts, the deployment succeeds, and new requests are refused
    //    meanwhile. The hook waits for a gate the test opens.
    let v2 = work.path().join("v2");
    demo_app::write_release(&v2, "2", Variant::Healthy).expect("write v2");
    std::fs::write(
        v2.join("hooks/validate"),
        "#!/bin/sh\ntouch /srv/.validate-started\ni=0\nwhile [ ! -e /run/ferry-test-gate ]; do\n  i=$((i+1))\n  \
         [ $i -gt 1200 ] && { echo 'the test never opened the gate' >&2; exit 1; }\n  sleep 0.1\ndone\necho validated\n",
    )
    .expect("write the gated hook");
    let slow = std::fs::read_to_string(fleet.fleet_toml()).expect("read fleet.toml").replace("\"20s\"", "\"120s\"");
    std::fs::write(fleet.dir.join("fleet-slow-hooks.toml"), slow).expect("write fleet-slow-hooks.toml");
    std::thread::scope(|s| {
        let deployment = s.spawn(|| fleet.deploy("fleet-slow-hooks.toml", &v2, "2", true));
        let started = poll(Duration::from_secs(60), || h.path("/srv/.validate-started").exists().then_some(()));
        assert!(started.is_some(), "the v2 validate hook never ran:\n{}", h.journal("ferry-agent.service", 30));
        let upgrade = s.spawn(|| h.exec(&["dpkg", "-i", &inside(&agent_v2)]));

        let waiting = poll(Duration::from_secs(60), || {
            (show(h, "ActiveState") == "deactivating" && show(h, "StatusText").contains("waiting for 1 activation"))
                .then_some(())
        });
        assert!(
            waiting.is_some(),
            "the upgrade's restart did not wait for the activation in progress (state {}, status {:?}):\n{}",
            show(h, "ActiveState"),
            show(h, "StatusText"),
            h.journal("ferry-agent.service", 40)
        );
        // Meanwhile the agent takes no new work: a new connection is refused.
        let refused = poll(Duration::from_secs(30), || {
            let out = fleet.ferry(&["status", "--config", &fleet_toml, "--env", "test"]);
            (out.status.code() == Some(3)).then(|| text(&out))
        });
        assert!(refused.is_some_and(|t| t.contains("refused")), "a stopping agent still accepted a connection");

        must(h, &["touch", "/run/ferry-test-gate"]);
        let upgrade = upgrade.join().expect("upgrade thread").expect("run dpkg -i");
        assert!(upgrade.status.success(), "upgrade:\n{}", text(&upgrade));
        let deployed = deployment.join().expect("deploy thread");
        assert!(deployed.status.success(), "the deployment across the upgrade failed:\n{}", text(&deployed));
        let report: serde_json::Value = serde_json::from_slice(&deployed.stdout).expect("deploy --output json");
        assert_eq!(report["status"], "succeeded", "{report}");
    });
    assert_eq!(served_version(&fleet, h), "2");
    assert_eq!(must(h, &["dpkg-query", "-W", "-f", "${Version}", "ferry-agent"]), "0.1.0-2");
    assert!(h.wait_unit_active("ferry-agent.service", Duration::from_secs(30)));
    let journal = h.journal("ferry-agent.service", 200);
    assert!(journal.contains("waiting for 1 activation(s) in progress to finish"), "{journal}");

    // 6. Remove: the binary and the service go, the releases and the app stay.
    let removed = must(h, &["dpkg", "-r", "ferry-agent"]);
    assert!(!h.path("/usr/bin/ferry-agent").exists(), "{removed}");
    assert_ne!(show(h, "ActiveState"), "active");
    let releases: Vec<_> = std::fs::read_dir(h.path("/var/lib/ferry/apps/web/releases"))
        .expect("the releases are still there")
        .flatten()
        .collect();
    assert_eq!(releases.len(), 2, "{releases:?}");
    assert!(h.path("/etc/ferry/agent.toml").exists(), "a removed (not purged) package keeps its config");
    assert_eq!(h.systemctl(&["is-active", "web.service"]).as_deref(), Ok("active"));
    assert_eq!(served_version(&fleet, h), "2");
}

#[test]
fn coordinator_package_runs_ferry_serve_as_a_sandboxed_service() {
    let Some(fleet) = debian_host("the coordinator package test on a Debian host") else { return };
    let h = &fleet.hosts[0];
    let drop = h.drop_dir();
    let (_, ferry) = build_debs(&drop, 1);
    let api = fleet.pki.issue("coordinator", ferry_proto::identity::Role::Coordinator, &["127.0.0.1"]);
    for (src, name) in [(&api.ca, "ca.pem"), (&api.cert, "coordinator.pem"), (&api.key, "coordinator.key")] {
        std::fs::copy(src, drop.join(name)).expect("copy certificate");
    }
    let token = "ferry_package_test_token";
    // The key reaches the dynamic user as a credential, as the unit's comment says.
    std::fs::write(
        drop.join("fleet.toml"),
        format!(
            "[app]\nname = \"web\"\n\n[tls]\nca = \"/etc/ferry/pki/ca.pem\"\ncert = \"/etc/ferry/pki/coordinator.pem\"\n\
             key = \"/run/credentials/ferry.service/coordinator.key\"\n\n[server]\nlisten = \"127.0.0.1:8443\"\n\n\
             [[server.tokens]]\nname = \"ci\"\nsha256 = \"{}\"\n\n[environments.test]\nhosts = {{ web-1 = \"{}:{}\" }}\n",
            ferry_coordinator::commands::token::sha256_hex(token),
            h.ip,
            fleet::AGENT_PORT
        ),
    )
    .expect("write fleet.toml");
    demo_app::write_release(&drop.join("demo-1"), "1", Variant::Healthy).expect("write a release");

    // Installed, not enabled: it needs a fleet.toml first.
    let deb = format!("/opt/ferry-test/{}", ferry.file_name().expect("a file").to_string_lossy());
    must(h, &["dpkg", "-i", &deb]);
    assert_eq!(h.systemctl(&["show", "-p", "UnitFileState", "--value", "ferry.service"]).as_deref(), Ok("disabled"));
    let verify = must(h, &["systemd-analyze", "verify", "ferry.service"]);
    assert!(verify.trim().is_empty(), "systemd-analyze verify is not clean:\n{verify}");

    must(
        h,
        &[
            "sh",
            "-c",
            "mkdir -p /etc/ferry/pki /etc/systemd/system/ferry.service.d && cd /opt/ferry-test \
             && cp ca.pem coordinator.pem fleet.toml /etc/ferry/pki/ && mv /etc/ferry/pki/fleet.toml /etc/ferry/ \
             && install -m 0600 coordinator.key /etc/ferry/pki/ \
             && printf '[Service]\\nLoadCredential=coordinator.key:/etc/ferry/pki/coordinator.key\\n' \
                > /etc/systemd/system/ferry.service.d/key.conf && systemctl daemon-reload",
        ],
    );
    must(h, &["systemctl", "enable", "--now", "ferry.service"]);
    let cli = |args: &[&str]| {
        let mut all = vec![
            "ferry",
            "--server",
            "https://127.0.0.1:8443",
            "--server-ca",
            "/etc/ferry/pki/ca.pem",
            "--token",
            token,
        ];
        all.extend_from_slice(args);
        h.exec(&all).unwrap_or_else(|e| panic!("{e}"))
    };
    let up = poll(Duration::from_secs(30), || cli(&["history"]).status.success().then_some(()));
    assert!(up.is_some(), "ferry serve does not answer:\n{}", h.journal("ferry.service", 40));

    // The sandboxed service writes its state: an upload, the registry, the audit log.
    let out =
        cli(&["pipeline", "register", "--version", "1", "--artifact", "/opt/ferry-test/demo-1", "--output", "json"]);
    assert!(out.status.success(), "{}\n{}", text(&out), h.journal("ferry.service", 40));
    let registered: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(registered["registered_by"], "token:ci", "{registered}");
    assert!(
        registered["artifact"].as_str().is_some_and(|a| a.contains("/ferry-coordinator/ferry/artifacts/")),
        "{registered}"
    );
    let audit = must(h, &["cat", "/var/lib/ferry-coordinator/ferry/api-audit.log"]);
    assert!(audit.contains("\"who\":\"token:ci\""), "{audit}");

    // SIGTERM stops it cleanly.
    must(h, &["systemctl", "stop", "ferry.service"]);
    assert_eq!(h.systemctl(&["show", "-p", "Result", "--value", "ferry.service"]).as_deref(), Ok("success"));
}
