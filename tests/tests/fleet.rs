//! End-to-end on real hosts: systemd-nspawn containers with systemd as PID 1, each in its own
//! network namespace, running the built ferry-agent from the real unit file; the real `ferry`
//! CLI runs in a namespace of its own on the same bridge.
use ferry_tests::demo_app::{self, Variant};
use ferry_tests::fleet_or_skip;
use std::time::Duration;

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn status_over_three_real_hosts() {
    let fleet = fleet_or_skip!(3);
    let toml = fleet.fleet_toml();
    let out =
        fleet.ferry(&["status", "--config", toml.to_str().unwrap_or_default(), "--env", "test", "--output", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    for (i, h) in fleet.hosts.iter().enumerate() {
        let got = &json["hosts"][i];
        assert_eq!(got["name"], h.name.as_str());
        assert_eq!(got["reachable"], true, "{got}");
        assert_eq!(got["agent_name"], h.name.as_str());
        // Each host is its own machine as far as the agent can tell.
        assert_eq!(got["hostname"], h.name.as_str(), "{got}");
        assert_eq!(got["data_dir"], "/var/lib/ferry");
    }
}

#[test]
fn agent_killed_is_restarted_by_systemd_and_seen_again() {
    let fleet = fleet_or_skip!(1);
    let host = &fleet.hosts[0];
    let before = host.main_pid("ferry-agent.service");
    assert!(before > 0);
    host.kill_agent().expect("systemctl kill");
    let restarted = ferry_tests::fleet::poll(std::time::Duration::from_secs(30), || {
        let pid = host.main_pid("ferry-agent.service");
        (pid != 0 && pid != before && host.systemctl(&["is-active", "ferry-agent.service"]).ok()? == "active")
            .then_some(pid)
    });
    assert!(restarted.is_some(), "not restarted:\n{}", host.journal("ferry-agent.service", 20));
    let toml = fleet.fleet_toml();
    let out = fleet.ferry(&["status", "--config", toml.to_str().unwrap_or_default(), "--env", "test"]);
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
}

#[test]
fn a_powered_off_host_is_unreachable_and_its_container_is_gone() {
    let mut fleet = fleet_or_skip!(2);
    fleet.power_off("web-2");
    let toml = fleet.fleet_toml();
    let out = fleet.ferry(&["status", "--config", toml.to_str().unwrap_or_default(), "--env", "test"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(3), "{text}");
    // Powered off cleanly, its network namespace still exists but nothing listens: refused.
    assert!(text.contains("web-2 (10.199.0.12:7443): connection refused"), "{text}");
    assert!(text.contains("1 of 2 host(s) reachable"), "{text}");
    // Its systemd (the container's PID 1) has exited (a zombie counts: this machine reaps late).
    let leader = fleet.host("web-2").leader;
    let gone = ferry_tests::fleet::poll(Duration::from_secs(10), || {
        let stat = std::fs::read_to_string(format!("/proc/{leader}/stat")).unwrap_or_default();
        (stat.is_empty() || stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')))
            .then_some(())
    });
    assert!(gone.is_some(), "the powered-off host's PID 1 ({leader}) is still running");
}

#[test]
fn dead_and_cut_off_hosts_are_reported_unreachable_by_name() {
    let mut fleet = fleet_or_skip!(3);
    fleet.hard_kill("web-2");
    fleet.freeze("web-3");
    let toml = fleet.fleet_toml();
    let out = fleet.ferry(&["status", "--config", toml.to_str().unwrap_or_default(), "--env", "test"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(3), "{text}{}", stderr(&out));
    assert!(text.contains("web-2 (10.199.0.12:7443): TCP connect timed out"), "{text}");
    // A hung host accepts TCP in its kernel but never completes TLS.
    assert!(text.contains("web-3 (10.199.0.13:7443): TLS handshake timed out"), "{text}");
    assert!(text.contains("1 of 3 host(s) reachable, 2 unreachable"), "{text}");
    fleet.thaw("web-3");
}

#[test]
fn certificates_from_another_ca_are_refused_on_both_sides() {
    let fleet = fleet_or_skip!(1);
    let other = ferry_tests::pki::TestPki::new();
    let foreign = other.issue("ctl", ferry_proto::identity::Role::Coordinator, &[]);

    // A coordinator of another fleet: to it, this agent's certificate is from another CA.
    let toml = fleet.write_fleet_toml("foreign.toml", &foreign).expect("write");
    let out = fleet.ferry(&["status", "--config", toml.to_str().unwrap_or_default(), "--env", "test"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(
        text.contains(
            "web-1 (10.199.0.11:7443): TLS: the agent's certificate is not signed by the fleet CA (unknown issuer)"
        ),
        "{text}"
    );

    // A coordinator that trusts this fleet's CA but holds another CA's certificate.
    let mut impostor = foreign.clone();
    impostor.ca = fleet.pki.ca_cert();
    let toml = fleet.write_fleet_toml("impostor.toml", &impostor).expect("write");
    let out = fleet.ferry(&["status", "--config", toml.to_str().unwrap_or_default(), "--env", "test"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(text.contains("the agent refused our certificate: it is not signed by the CA the agent trusts"), "{text}");

    // The agent's journal names both causes.
    let journal = fleet.hosts[0].journal("ferry-agent.service", 50);
    assert!(journal.contains("the client does not trust this agent's certificate authority"), "{journal}");
    assert!(journal.contains("client certificate is not issued by this fleet's CA"), "{journal}");
}

#[test]
fn faults_take_effect_and_heal() {
    let fleet = fleet_or_skip!(1);
    let host = &fleet.hosts[0];
    let toml = fleet.fleet_toml();
    let status = || fleet.ferry(&["status", "--config", toml.to_str().unwrap_or_default(), "--env", "test"]);

    // After healing, the link needs a moment (neighbour discovery): wait, bounded, for success.
    let heals =
        || ferry_tests::fleet::poll(Duration::from_secs(20), || (status().status.code() == Some(0)).then_some(()));

    fleet.cut_network("web-1");
    assert_eq!(status().status.code(), Some(3));
    fleet.restore_network("web-1");
    assert!(heals().is_some(), "web-1 did not come back after the network was restored");

    fleet.drop_packets("web-1", 100);
    assert_eq!(status().status.code(), Some(3));
    fleet.stop_dropping("web-1");
    assert!(heals().is_some(), "web-1 did not come back after packets stopped being dropped");

    // A slow link still works, only slowly (behaviour, not timing, is checked).
    fleet.slow_link("web-1", 512);
    assert_eq!(status().status.code(), Some(0));
    fleet.unslow_link("web-1");

    let written = host.fill_disk();
    assert!(written > 0);
    let json =
        fleet.ferry(&["status", "--config", toml.to_str().unwrap_or_default(), "--env", "test", "--output", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON");
    assert!(v["hosts"][0]["data_dir_free_bytes"].as_u64().unwrap_or(u64::MAX) < 1 << 20, "{v}");
    host.free_disk();
}

fn versions(fleet: &ferry_tests::fleet::Fleet) -> Vec<String> {
    fleet.versions()
}

#[test]
fn deploy_v1_then_v2_then_rollback_across_three_hosts() {
    let fleet = fleet_or_skip!(3);
    let toml = fleet.fleet_toml();
    let config = toml.to_str().unwrap_or_default();
    for (v, variant) in [("1", Variant::Healthy), ("2", Variant::Healthy)] {
        let dir = fleet.dir.join(format!("demo-v{v}"));
        demo_app::write_release(&dir, v, variant).expect("write release");
        let out = fleet.deploy(config, &dir, v, false);
        let text = stdout(&out);
        assert_eq!(out.status.code(), Some(0), "{text}{}", stderr(&out));
        assert!(text.contains("succeeded: 3 of 3 host(s) on the release"), "{text}");
        // Progress per host is shown while it runs.
        assert!(text.contains("web-2: prepared:") && text.contains("web-3: activated"), "{text}");
        if v == "2" {
            // The coordinator's cache knows release 1: each host gets only the manifest's changes.
            assert_eq!(text.matches("manifest sent as changes from 1-").count(), 3, "{text}");
        }
        assert_eq!(versions(&fleet), [v, v, v]);
        // The agent restarted the demo unit: every host's app now answers from the new release.
        for h in &fleet.hosts {
            let (status, body) =
                fleet.http_get(&format!("http://{}:{}/health", h.ip, demo_app::PORT)).expect("GET /health");
            assert_eq!(status, 200, "{}: {body}", h.name);
            assert!(body.contains(&format!("\"version\": \"{v}\"")), "{}: {body}", h.name);
        }
    }
    // ferry status shows the new release everywhere.
    let out = fleet.ferry(&["status", "--config", config, "--env", "test", "--output", "json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    for i in 0..3 {
        assert_eq!(json["hosts"][i]["apps"][0]["current_version"], "2", "{json}");
    }
    // Rollback returns the fleet to v1 without a transfer.
    let out = fleet.ferry(&["rollback", "--config", config, "--env", "test", "--output", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(json["status"], "succeeded");
    assert_eq!(json["bytes_sent"], 0);
    assert_eq!(versions(&fleet), ["1", "1", "1"]);
}

#[test]
fn a_dead_host_halts_the_deploy_and_is_named() {
    let mut fleet = fleet_or_skip!(3);
    fleet.hard_kill("web-2");
    let toml = fleet.fleet_toml();
    let dir = fleet.dir.join("demo-v1");
    demo_app::write_release(&dir, "1", Variant::Healthy).expect("write release");
    let out = fleet.deploy(toml.to_str().unwrap_or_default(), &dir, "1", true);
    assert_eq!(out.status.code(), Some(3), "{}{}", stdout(&out), stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(json["status"], "failed");
    // Staging (in parallel, before any activation) found the dead host: nothing was activated.
    assert_eq!(json["hosts"][0]["status"], "skipped");
    assert_eq!(json["hosts"][1]["status"], "unreachable");
    assert!(
        json["hosts"][1]["error"]
            .as_str()
            .unwrap_or_default()
            .starts_with("host web-2 (10.199.0.12:7443): TCP connect timed out"),
        "{json}"
    );
    assert_eq!(json["hosts"][2]["status"], "skipped");
    // No live host switched to the release.
    for name in ["web-1", "web-3"] {
        let switched = fleet.host(name).exec(&["test", "-e", "/srv/web"]).map(|o| o.status.success()).unwrap_or(true);
        assert!(!switched, "{name} must not have been activated");
    }
}

#[test]
fn a_full_disk_is_refused_before_staging_with_free_and_needed_space() {
    let fleet = fleet_or_skip!(1);
    let host = &fleet.hosts[0];
    let toml = fleet.fleet_toml();
    let dir = fleet.dir.join("demo-v1");
    demo_app::write_release(&dir, "1", Variant::Healthy).expect("write release");
    host.fill_disk();
    let out = fleet.deploy(toml.to_str().unwrap_or_default(), &dir, "1", false);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}{}", stderr(&out));
    assert!(text.contains("host web-1 (10.199.0.11:7443): prepare: the agent answered ResourceExhausted: not enough disk space in /var/lib/ferry/apps/web"), "{text}");
    assert!(text.contains("bytes free, staging needs"), "{text}");
    host.free_disk();
    let out = fleet.deploy(toml.to_str().unwrap_or_default(), &dir, "1", false);
    assert_eq!(out.status.code(), Some(0), "after freeing space the deploy goes through: {}", stdout(&out));
}

fn deploy(
    fleet: &ferry_tests::fleet::Fleet,
    config: &str,
    v: &str,
    variant: Variant,
) -> (Option<i32>, serde_json::Value, String) {
    let dir = fleet.dir.join(format!("demo-v{v}"));
    demo_app::write_release(&dir, v, variant).expect("write release");
    let out = fleet.deploy(config, &dir, v, true);
    let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.code(), json, stderr(&out))
}

/// No fixed wait after a restart: the units are watched while their health is checked. A unit that
/// dies while its probes run (min_healthy_time) fails the activation at once, named with its
/// state; an app with nothing to check its health is watched for a settle window instead; a unit
/// slow to start that passes its probes is healthy.
#[test]
fn units_are_watched_while_their_health_is_checked() {
    let fleet = fleet_or_skip!(1);
    let base = fleet.fleet_toml();
    let config = base.to_str().unwrap_or_default();
    let (code, json, err) = deploy(&fleet, config, "1", Variant::Healthy);
    assert_eq!(code, Some(0), "{json}{err}");

    // Its probe passes at once, but the unit must stay healthy for 2 s: it exits after 0.3 s.
    let text = std::fs::read_to_string(&base).expect("read");
    let strict = fleet.dir.join("strict.toml");
    std::fs::write(&strict, text.replacen("retries = 10\n", "retries = 10\nmin_healthy_time = \"2s\"\n", 1))
        .expect("write");
    let (code, json, err) = deploy(&fleet, strict.to_str().unwrap_or_default(), "2", Variant::ExitsAfter(300));
    assert_eq!(code, Some(1), "{json}{err}");
    assert_eq!(json["hosts"][0]["status"], "rolled_back", "{json}");
    let cause = json["hosts"][0]["error"].as_str().unwrap_or_default();
    assert!(cause.contains("unit web.service: watch failed: it became"), "{cause}");
    assert!(cause.contains("while its health was checked") && cause.contains("ExecMainStatus=3"), "{cause}");
    assert!(cause.contains("built to exit soon after it starts"), "the journal lines: {cause}");
    assert_eq!(served(&fleet), ["1"]);

    // With Restart=always systemd brings it straight back: still a failure, named as a restart.
    fleet.hosts[0].unit_dropin("web.service", "restart", "[Service]\nRestart=always\nRestartSec=50ms\n");
    let (code, json, err) = deploy(&fleet, strict.to_str().unwrap_or_default(), "2r", Variant::ExitsAfter(300));
    assert_eq!(code, Some(1), "{json}{err}");
    let cause = json["hosts"][0]["error"].as_str().unwrap_or_default();
    assert!(cause.contains("it died and systemd restarted it while its health was checked"), "{cause}");
    assert_eq!(served(&fleet), ["1"]);
    let dropin = fleet.hosts[0].dir.join("etc/systemd/system/web.service.d/restart.conf");
    std::fs::remove_file(&dropin).expect("remove the drop-in");
    fleet.hosts[0].systemctl(&["daemon-reload"]).expect("daemon-reload");

    // No probe and no validate hook: staying up is all there is to check.
    let (head, rest) = text.split_once("[[app.health]]").expect("[[app.health]]");
    let (_, tail) = rest.split_once("[tls]").expect("[tls]");
    let bare = fleet.dir.join("bare.toml");
    std::fs::write(&bare, format!("{head}[tls]{tail}")).expect("write");
    let (code, json, err) = deploy(&fleet, bare.to_str().unwrap_or_default(), "3", Variant::ExitsAfter(300));
    assert_eq!(code, Some(1), "{json}{err}");
    let cause = json["hosts"][0]["error"].as_str().unwrap_or_default();
    assert!(cause.contains("watch failed: it became"), "{cause}");
    assert_eq!(served(&fleet), ["1"]);

    // Slow to listen (1.5 s), within its probes' 10 attempts 200 ms apart: healthy.
    let (code, json, err) = deploy(&fleet, config, "4", Variant::SlowStart(1500));
    assert_eq!(code, Some(0), "{json}{err}");
    assert_eq!(served(&fleet), ["4"]);
}

fn served(fleet: &ferry_tests::fleet::Fleet) -> Vec<String> {
    fleet
        .hosts
        .iter()
        .map(|h| match fleet.http_get(&format!("http://{}:{}/", h.ip, demo_app::PORT)) {
            Ok((_, body)) => body,
            Err(e) => format!("unreachable: {e}"),
        })
        .collect()
}

#[test]
fn broken_releases_are_rolled_back_on_the_host_and_the_rollout_halts() {
    let fleet = fleet_or_skip!(2);
    let toml = fleet.fleet_toml();
    let config = toml.to_str().unwrap_or_default();
    for v in ["1", "2"] {
        let (code, json, err) = deploy(&fleet, config, v, Variant::Healthy);
        assert_eq!(code, Some(0), "{json}{err}");
    }
    let pid_v2 = fleet.hosts[0].main_pid("web.service");
    assert_eq!(served(&fleet), ["2", "2"]);

    // v3 answers /health with 503 "unhealthy": web-1 goes back to v2 by itself, the rollout halts.
    let (code, json, err) = deploy(&fleet, config, "3", Variant::Unhealthy);
    assert_eq!(code, Some(1), "{json}{err}");
    assert_eq!(json["status"], "failed", "{json}");
    assert_eq!(json["hosts"][0]["status"], "rolled_back", "{json}");
    let cause = json["hosts"][0]["error"].as_str().unwrap_or_default();
    assert!(
        cause.contains("health probe demo failed after 10 attempt(s): GET http://127.0.0.1:8080/health answered 503"),
        "{cause}"
    );
    assert!(cause.contains("broken on purpose") && cause.contains("rolled back to 2-"), "{cause}");
    assert_eq!(json["hosts"][1]["status"], "skipped", "{json}");
    assert_eq!(served(&fleet), ["2", "2"], "both hosts serve v2 again");
    assert_ne!(fleet.hosts[0].main_pid("web.service"), pid_v2, "web-1's unit was restarted (onto v3, then back)");

    // v4 exits at start: rolled back, and the report carries the unit's journal lines.
    let (code, json, err) = deploy(&fleet, config, "4", Variant::CrashOnStart);
    assert_eq!(code, Some(1), "{json}{err}");
    assert_eq!(json["hosts"][0]["status"], "rolled_back", "{json}");
    let cause = json["hosts"][0]["error"].as_str().unwrap_or_default();
    // Dead by the time the restart's job ended, or soon after, while its health was checked.
    assert!(
        cause.contains("units: unit web.service: restart failed")
            || cause.contains("health: unit web.service: watch failed: it became failed"),
        "{cause}"
    );
    assert!(cause.contains("this release is built to fail at start"), "the journal lines: {cause}");
    assert_eq!(served(&fleet), ["2", "2"]);

    // v5's validate hook (a smoke test shipped in the release) exits 1: rolled back, and the report
    // carries the hook's output, including what the agent told it about the deployment.
    let (code, json, err) = deploy(&fleet, config, "5", Variant::FailingValidate);
    assert_eq!(code, Some(1), "{json}{err}");
    assert_eq!(json["hosts"][0]["status"], "rolled_back", "{json}");
    let cause = json["hosts"][0]["error"].as_str().unwrap_or_default();
    assert!(cause.contains("hook validate (hooks/validate) failed (exit status: 1)"), "{cause}");
    assert!(cause.contains("smoke test: /api/orders answered 500"), "{cause}");
    assert!(cause.contains("validate web 5 (d-") && cause.contains("/var/lib/ferry/apps/web/releases/5-"), "{cause}");
    assert_eq!(served(&fleet), ["2", "2"]);

    // A unit the agents do not declare: refused before anything changes.
    let bad =
        std::fs::read_to_string(&toml).expect("read").replace("units = [\"web.service\"]", "units = [\"ssh.service\"]");
    let bad_path = fleet.dir.join("bad-unit.toml");
    std::fs::write(&bad_path, bad).expect("write");
    let (code, json, err) = deploy(&fleet, bad_path.to_str().unwrap_or_default(), "6", Variant::Healthy);
    assert_eq!(code, Some(1), "{json}{err}");
    let cause = json["hosts"][0]["error"].as_str().unwrap_or_default();
    assert!(cause.contains("unit \"ssh.service\" is not declared for app web"), "{cause}");
    assert_eq!(served(&fleet), ["2", "2"]);
    assert_eq!(versions(&fleet), ["2", "2"]);
}

#[test]
fn unit_action_reload_goes_through_systemd() {
    let fleet = fleet_or_skip!(1);
    let base = std::fs::read_to_string(fleet.fleet_toml()).expect("read");
    let with_action = |action: &str| {
        let path = fleet.dir.join(format!("{action}.toml"));
        std::fs::write(
            &path,
            base.replace(
                "units = [\"web.service\"]",
                &format!("units = [\"web.service\"]\nunit_action = \"{action}\""),
            ),
        )
        .expect("write");
        path
    };
    // reload-or-restart: the demo unit has no ExecReload, so systemd restarts it.
    let cfg = with_action("reload-or-restart");
    for v in ["1", "2"] {
        let (code, json, err) = deploy(&fleet, cfg.to_str().unwrap_or_default(), v, Variant::Healthy);
        assert_eq!(code, Some(0), "{json}{err}");
    }
    assert_eq!(served(&fleet), ["2"]);
    // reload: systemd refuses it for this unit; the host goes back to v2 and says why.
    let cfg = with_action("reload");
    let (code, json, err) = deploy(&fleet, cfg.to_str().unwrap_or_default(), "3", Variant::Healthy);
    assert_eq!(code, Some(1), "{json}{err}");
    assert_eq!(json["hosts"][0]["status"], "rolled_back", "{json}");
    let cause = json["hosts"][0]["error"].as_str().unwrap_or_default();
    assert!(cause.contains("unit web.service: reload failed: systemd refused the job"), "{cause}");
    assert_eq!(served(&fleet), ["2"]);
}

#[test]
fn redeploying_the_current_release_restarts_nothing() {
    let fleet = fleet_or_skip!(1);
    let toml = fleet.fleet_toml();
    let config = toml.to_str().unwrap_or_default();
    let (code, json, err) = deploy(&fleet, config, "1", Variant::Healthy);
    assert_eq!(code, Some(0), "{json}{err}");
    let pid = fleet.hosts[0].main_pid("web.service");
    let (code, json, err) = deploy(&fleet, config, "1", Variant::Healthy);
    assert_eq!(code, Some(0), "{json}{err}");
    assert_eq!(json["hosts"][0]["status"], "unchanged", "{json}");
    assert_eq!(json["bytes_sent"], 0);
    assert_eq!(fleet.hosts[0].main_pid("web.service"), pid, "the unit was not restarted");
}

#[test]
fn when_the_previous_release_is_unhealthy_too_the_host_is_reported_failed_loudly() {
    let fleet = fleet_or_skip!(1);
    let host = &fleet.hosts[0];
    // An extra probe that fails while /run/ferry-break exists on the host, whatever the release.
    let base = std::fs::read_to_string(fleet.fleet_toml()).expect("read");
    let cfg = fleet.dir.join("breakable.toml");
    let probe = "[[app.health]]\nname = \"breaker\"\nexec = [\"/bin/sh\", \"-c\", \"test ! -e /run/ferry-break\"]\ninterval = \"100ms\"\nretries = 3\n\n[app.hooks]";
    std::fs::write(&cfg, base.replacen("[app.hooks]", probe, 1)).expect("write");
    let config = cfg.to_str().unwrap_or_default();
    for v in ["1", "2"] {
        let (code, json, err) = deploy(&fleet, config, v, Variant::Healthy);
        assert_eq!(code, Some(0), "{json}{err}");
    }
    host.exec(&["touch", "/run/ferry-break"]).expect("touch");
    let (code, json, err) = deploy(&fleet, config, "3", Variant::Healthy);
    assert_eq!(code, Some(1), "{json}{err}");
    assert_eq!(json["hosts"][0]["status"], "failed", "failed, not rolled_back: {json}");
    let cause = json["hosts"][0]["error"].as_str().unwrap_or_default();
    assert!(cause.contains("health probe breaker failed"), "{cause}");
    assert!(
        cause.contains("rolled back to 2-") && cause.contains("UNHEALTHY TOO") && cause.contains("needs attention"),
        "{cause}"
    );
}

/// Regression: `request_timeout` (meant for unary calls) bounded the whole Upload stream, so a
/// release that took longer than it to send over a slow link failed while nothing was wrong.
#[test]
fn an_upload_slower_than_request_timeout_succeeds_on_a_slow_link() {
    let fleet = fleet_or_skip!(1);
    let base = std::fs::read_to_string(fleet.fleet_toml()).expect("read");
    let cfg = fleet.dir.join("short-timeout.toml");
    std::fs::write(&cfg, base.replace("request_timeout = \"10s\"", "request_timeout = \"1s\"")).expect("write");
    let dir = fleet.dir.join("demo-big");
    demo_app::write_release(&dir, "1", Variant::Healthy).expect("write release");
    // 1 MB that does not compress, over a 2 Mbit/s link: about 4 s on the wire.
    let mut noise = vec![0u8; 1_000_000];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").expect("urandom"), &mut noise)
        .expect("random bytes");
    std::fs::write(dir.join("payload.bin"), noise).expect("write payload");
    fleet.slow_link("web-1", 2000);
    let out = fleet.deploy(cfg.to_str().unwrap_or_default(), &dir, "1", true);
    fleet.unslow_link("web-1");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    assert_eq!(out.status.code(), Some(0), "{json}{}", stderr(&out));
    assert!(
        json["hosts"][0]["duration_ms"].as_u64().unwrap_or(0) > 1000,
        "the upload really took longer than the timeout: {json}"
    );
}

#[test]
fn an_app_with_its_own_user_keeps_its_state_across_deploys_and_rollbacks() {
    use std::os::unix::fs::MetadataExt;
    let fleet = fleet_or_skip!(2);
    for h in &fleet.hosts {
        h.run_as_app_user("web.service");
    }
    let base = fleet.app_fleet_toml("stateful.toml", "shared = [\"log\", \"public/uploads\"]\nuser = \"web\"\n", "");
    let config = base.to_str().unwrap_or_default();
    let release = |v: &str| {
        let dir = fleet.dir.join(format!("stateful-v{v}"));
        // The validate hook runs as the app's user: it can write into the shared log.
        let hook = "#!/bin/sh\necho \"validate by $(id -un)\" >> /srv/web/log/hooks.log\n";
        demo_app::write_app_release(&dir, v, &stateful_app(), &[("hooks/validate", hook)]).expect("write release");
        dir
    };
    let deploy = |v: &str| {
        let out = fleet.deploy(config, &release(v), v, false);
        assert_eq!(out.status.code(), Some(0), "deploy {v}: {}{}", stdout(&out), stderr(&out));
    };
    let log_of = |h: &ferry_tests::fleet::FleetHost| {
        fleet.http_get(&format!("http://{}:8080/", h.ip)).map(|(_, body)| body).unwrap_or_else(|e| e)
    };
    deploy("1");
    deploy("2");
    let out = fleet.ferry(&["rollback", "--config", config, "--env", "test"]);
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
    for h in &fleet.hosts {
        assert_eq!(
            log_of(h),
            "started 1 as uid 990\nstarted 2 as uid 990\nstarted 1 as uid 990",
            "{}: the log outlived both releases",
            h.name
        );
        let (_, health) = fleet.http_get(&format!("http://{}:8080/health", h.ip)).expect("health");
        assert!(health.contains("\"release_writable\": \"no\""), "{}: {health}", h.name);
        let uploads = h.exec(&["ls", "/srv/web/public/uploads"]).expect("ls");
        assert_eq!(String::from_utf8_lossy(&uploads.stdout), "1.txt\n2.txt\n", "{}", h.name);
        let hooks = h.exec(&["cat", "/srv/web/log/hooks.log"]).expect("cat");
        assert_eq!(
            String::from_utf8_lossy(&hooks.stdout),
            "validate by web\n".repeat(2),
            "{}: two deploys (a rollback runs no hooks)",
            h.name
        );
        let shared = std::fs::metadata(h.path("/var/lib/ferry/apps/web/shared/log")).expect("stat");
        assert_eq!((shared.uid(), shared.gid()), (990, 990), "{}", h.name);
    }
}

#[test]
fn staging_and_prod_get_their_own_config_and_a_config_change_rolls_host_by_host() {
    let fleet = fleet_or_skip!(3);
    for h in &fleet.hosts {
        h.unit_dropin("web.service", "env", "[Service]\nEnvironmentFile=/srv/web/config/app.env\n");
    }
    let addr = |i: usize| format!("{}:{}", fleet.hosts[i].ip, ferry_tests::fleet::AGENT_PORT);
    let toml = |greeting: &str| {
        let base = fleet.app_fleet_toml("configured.toml", &format!("env_file = \"config/app.env\"\n{TEMPLATE}"), "");
        let text = std::fs::read_to_string(&base).expect("read");
        let (head, _) = text.split_once("[environments.test]").expect("an environment");
        let text = head.to_string()
            + &format!(
                "[environments.staging]\nhosts = {{ web-1 = \"{}\" }}\nvars = {{ db = \"db.staging\" }}\nenv = {{ GREETING = \"hello from {{{{ env }}}}\" }}\n\n\
             [environments.prod]\nhosts = {{ web-2 = \"{}\", web-3 = \"{}\" }}\nvars = {{ db = \"db.prod\" }}\nenv = {{ GREETING = \"{greeting} from {{{{ env }}}}\" }}\n",
                addr(0),
                addr(1),
                addr(2)
            );
        std::fs::write(&base, text).expect("write");
        base
    };
    let dir = fleet.dir.join("configured");
    let template = "db={{ vars.db }} host={{ host }} env={{ env }}";
    demo_app::write_app_release(&dir, "1", &configured_app(), &[("config/app.conf.tmpl", template)])
        .expect("write release");
    let answer = |i: usize| -> serde_json::Value {
        let (_, body) = fleet.http_get(&format!("http://{}:8080/", fleet.hosts[i].ip)).expect("GET /");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{body}: {e}"))
    };
    let deploy = |config: &std::path::Path, env: &str| {
        let artifact = dir.to_string_lossy().into_owned();
        let out = fleet.ferry(&[
            "deploy",
            "--config",
            &config.to_string_lossy(),
            "--env",
            env,
            "--artifact",
            &artifact,
            "--version",
            "1",
        ]);
        assert_eq!(out.status.code(), Some(0), "deploy to {env}: {}{}", stdout(&out), stderr(&out));
        stdout(&out)
    };
    let config = toml("hello");
    deploy(&config, "staging");
    deploy(&config, "prod");
    assert_eq!(answer(0)["config"], "db=db.staging host=web-1 env=staging");
    assert_eq!(answer(0)["greeting"], "hello from staging");
    for i in [1, 2] {
        assert_eq!(answer(i)["config"], format!("db=db.prod host=web-{} env=prod", i + 1));
        assert_eq!(answer(i)["greeting"], "hello from prod");
    }

    // Only prod's environment changes: prod rolls host by host (each restarted and checked before
    // the next), with nothing but the manifest's changes on the wire; staging is untouched.
    let pids: Vec<u32> = fleet.hosts.iter().map(|h| h.main_pid("web.service")).collect();
    let config = toml("good evening");
    let out = deploy(&config, "prod");
    let (two, three) = (out.find("web-2: activated").expect("web-2 activated"), out.find("web-3: activated"));
    assert!(three.is_some_and(|t| t > two), "host by host, in order:\n{out}");
    assert!(out.contains("manifest sent as changes from 1-"), "{out}");
    for i in [1, 2] {
        assert_eq!(answer(i)["greeting"], "good evening from prod");
        assert_ne!(fleet.hosts[i].main_pid("web.service"), pids[i], "web-{} restarted", i + 1);
    }
    assert_eq!(fleet.hosts[0].main_pid("web.service"), pids[0], "staging was not touched");
    // The old config comes back with a rollback.
    let out = fleet.ferry(&["rollback", "--config", &config.to_string_lossy(), "--env", "prod"]);
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
    assert_eq!(answer(1)["greeting"], "hello from prod");
}

#[test]
fn secrets_reach_the_app_and_nothing_else() {
    use std::os::unix::fs::PermissionsExt;
    let fleet = fleet_or_skip!(2);
    for h in &fleet.hosts {
        h.run_as_app_user("web.service");
    }
    let secret_file = fleet.dir.join("db-password.txt");
    std::fs::write(&secret_file, "pw-from-file-7f3a\n").expect("write");
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let toml = |api_command: &str| {
        let secrets = format!(
            "[environments.test.secrets]\ndb_password = {{ file = \"{}\" }}\napi_key = {{ command = \"{api_command}\" }}\n",
            secret_file.display()
        );
        fleet.app_fleet_toml("secrets.toml", &format!("user = \"web\"\n{TEMPLATE}"), &secrets)
    };
    let dir = fleet.dir.join("secret-app");
    let template = "db = {{ secrets.db_password }}\napi = {{ secrets.api_key }}\n";
    demo_app::write_app_release(&dir, "1", &secret_app(), &[("config/app.conf.tmpl", template)])
        .expect("write release");
    let artifact = dir.to_string_lossy().into_owned();
    let deploy = |config: &std::path::Path| {
        fleet.ferry(&[
            "deploy",
            "--config",
            &config.to_string_lossy(),
            "--env",
            "test",
            "--artifact",
            &artifact,
            "--version",
            "1",
            "--output",
            "json",
        ])
    };

    // A failing secret command refuses the deployment before any host changes, naming the secret.
    let out = deploy(&toml("echo api-key-leak-0c1d; echo vault: token expired >&2; exit 2"));
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert_ne!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("secret api_key of environment test: its command failed (exit status: 2): vault: token expired"),
        "{text}"
    );
    assert!(!text.contains("api-key-leak"), "{text}");
    assert_eq!(fleet.versions(), ["", ""], "no host was changed");

    let out = deploy(&toml("printf api-key-$FERRY_ENV-9b2e"));
    let mut coordinator_output = format!("{}{}", stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(0), "{coordinator_output}");
    for h in &fleet.hosts {
        let (_, body) = fleet.http_get(&format!("http://{}:8080/", h.ip)).expect("GET /");
        let answer: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{body}: {e}"));
        assert_eq!(
            (answer["db"].as_str(), answer["api"].as_str()),
            (Some("pw-from-file-7f3a"), Some("api-key-test-9b2e"))
        );
    }
    let config = toml("printf api-key-$FERRY_ENV-9b2e");
    for verb in ["status", "history"] {
        let out = fleet.ferry(&[verb, "--config", &config.to_string_lossy(), "--env", "test", "--output", "json"]);
        coordinator_output.push_str(&stdout(&out));
    }

    // Neither value is anywhere but in the secrets directories: not in what ferry printed, the
    // registry, the cache, any agent's audit log, journal, releases or manifests.
    let values = ["pw-from-file-7f3a", "api-key-test-9b2e"];
    for v in values {
        assert!(!coordinator_output.contains(v), "ferry printed {v}:\n{coordinator_output}");
    }
    let registry = std::fs::read(fleet.dir.join("registry.db")).expect("registry");
    for v in values {
        assert!(!registry.windows(v.len()).any(|w| w == v.as_bytes()), "the registry holds {v}");
    }
    for h in &fleet.hosts {
        let journal = h.exec(&["journalctl", "--no-pager", "-q", "-o", "cat"]).expect("journal");
        let grep = h.exec(&["grep", "-rlF", "-e", values[0], "-e", values[1], "/var/lib/ferry", "/srv"]).expect("grep");
        for v in values {
            assert!(!String::from_utf8_lossy(&journal.stdout).contains(v), "{}: the journal holds {v}", h.name);
        }
        assert_eq!(String::from_utf8_lossy(&grep.stdout), "", "{}: files hold a secret value", h.name);
        let stat = h
            .exec(&["stat", "-c", "%a %U %G", &format!("/run/ferry/web/{}/db_password", fleet_release(h))])
            .expect("stat");
        assert_eq!(String::from_utf8_lossy(&stat.stdout).trim(), "640 web web", "{}", h.name);
    }
}

/// The release id current on `h`.
fn fleet_release(h: &ferry_tests::fleet::FleetHost) -> String {
    let out = h.exec(&["readlink", "/var/lib/ferry/apps/web/current"]).expect("readlink");
    String::from_utf8_lossy(&out.stdout).trim().trim_start_matches("releases/").to_string()
}

/// The `[[app.templates]]` the configured apps below render: `config/app.conf` from its template.
const TEMPLATE: &str = "[[app.templates]]\ntemplate = \"config/app.conf.tmpl\"\npath = \"config/app.conf\"\n";

/// A stateful app: on each start it appends to its log and writes an upload (both shared paths),
/// tries to write into its own release; `/health` reports that, `/` its log.
fn stateful_app() -> String {
    demo_app::python_app(
        r#"VERSION = open(os.path.join(HERE, "VERSION")).read().strip()
with open("/srv/web/log/app.log", "a") as f:
    f.write("started %s as uid %d\n" % (VERSION, os.getuid()))
with open("/srv/web/public/uploads/%s.txt" % VERSION, "w") as f:
    f.write("uploaded under %s\n" % VERSION)
try:
    open(os.path.join(HERE, "VERSION"), "a").close()
    WRITABLE = "yes"
except OSError:
    WRITABLE = "no""#,
        r#"json.dumps({"status": "healthy", "version": VERSION, "release_writable": WRITABLE}) if self.path == "/health" else open("/srv/web/log/app.log").read()"#,
    )
}

/// An app that answers with what its config says: its environment file (through the unit's
/// `EnvironmentFile=`) and a rendered file.
fn configured_app() -> String {
    demo_app::python_app(
        r#"CONFIG = open(os.path.join(HERE, "config/app.conf")).read()"#,
        r#"json.dumps({"status": "healthy", "greeting": os.environ.get("GREETING", ""), "config": CONFIG})"#,
    )
}

/// An app that reads its secrets from the files its rendered config names.
fn secret_app() -> String {
    demo_app::python_app(
        r#"paths = dict(line.split(" = ", 1) for line in open(os.path.join(HERE, "config/app.conf")).read().splitlines())
ANSWER = json.dumps({"status": "healthy", **{k: open(v).read() for k, v in paths.items()}})"#,
        "ANSWER",
    )
}

/// Three apps with `depends_on` deployed as one bundle: each goes out host by host only once the
/// one before is healthy everywhere (the agents' audit logs record the order); when the last one
/// fails, the two before it are rolled back, last first, and every app serves its old release.
#[test]
fn a_bundle_goes_out_in_dependency_order_and_a_failure_rolls_the_others_back() {
    let fleet = fleet_or_skip!(2);
    // ingest ← resolve ← gateway
    let apps = [("ingest", 8081, ""), ("resolve", 8082, "ingest"), ("gateway", 8083, "resolve")];
    fleet.add_agent_apps(&apps.map(|(app, port, _)| (app, port)));
    let base = fleet.write_fleet_toml("bundle.toml", &fleet.coordinator.clone()).expect("write");
    let text = std::fs::read_to_string(&base).expect("read");
    let (_, rest) = text.split_once("[tls]").expect("[tls]");
    let mut toml = String::from(
        "connect_timeout = \"3s\"\nrequest_timeout = \"10s\"\ncache_dir = \"cache\"\nregistry = \"registry.db\"\n",
    );
    for (app, port, dep) in apps {
        toml.push_str(&format!(
            "\n[apps.{app}]\nunits = [\"{app}.service\"]\ndepends_on = [{}]\n[[apps.{app}.health]]\nhttp = \"http://127.0.0.1:{port}/health\"\njson_field = \"status\"\njson_value = \"healthy\"\ninterval = \"200ms\"\nretries = 5\n",
            if dep.is_empty() { String::new() } else { format!("\"{dep}\"") }
        ));
    }
    toml.push_str(&format!("\n[tls]{rest}auto_rollback = true\n"));
    std::fs::write(&base, toml).expect("write");
    let bundle = |v: &str, broken: Option<&str>| {
        let dir = fleet.dir.join(format!("bundle-{v}"));
        for (app, _, _) in apps {
            let variant = if broken == Some(app) { Variant::Unhealthy } else { Variant::Healthy };
            demo_app::write_release(&dir.join(app), v, variant).expect("release");
        }
        dir.to_string_lossy().into_owned()
    };
    let deploy = |dir: &str, v: &str| {
        fleet.ferry(&["deploy", "--config", &base.to_string_lossy(), "--env", "test", "--bundle", dir, "--version", v])
    };
    let serving = || -> Vec<String> {
        let mut all = Vec::new();
        for h in &fleet.hosts {
            for (_, port, _) in apps {
                all.push(fleet.http_get(&format!("http://{}:{port}/", h.ip)).map(|(_, b)| b).unwrap_or_else(|e| e));
            }
        }
        all
    };

    let out = deploy(&bundle("1", None), "1");
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("bundle: succeeded: ingest → resolve → gateway"), "{}", stdout(&out));
    assert_eq!(serving(), ["1"; 6]);

    // Without --app or --bundle, a command of a fleet of several apps asks which.
    let out = fleet.ferry(&["rollback", "--config", &base.to_string_lossy(), "--env", "test"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("fleet.toml declares several apps (gateway, ingest, resolve): say which with --app NAME"),
        "{}",
        stderr(&out)
    );

    let out = deploy(&bundle("2", Some("gateway")), "2");
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("== app resolve (rolled back)") && text.contains("bundle: FAILED: ingest → resolve → gateway"),
        "{text}"
    );
    assert_eq!(serving(), ["1"; 6], "every app serves its old release again");

    // The agents' own records: v1 went out app by app; v2 too, until gateway failed on web-1 (its
    // agent put its release back, and gateway's rollout halted before web-2), then resolve and
    // ingest were rolled back, last first.
    for h in &fleet.hosts {
        let audit = h.exec(&["cat", "/var/lib/ferry/audit.log"]).expect("audit");
        let steps: Vec<String> = String::from_utf8_lossy(&audit.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| matches!(e["rpc"].as_str(), Some("Activate" | "Rollback")))
            .map(|e| {
                format!(
                    "{} {} {}",
                    e["rpc"].as_str().unwrap_or(""),
                    e["app"].as_str().unwrap_or(""),
                    e["result"].as_str().unwrap_or("")
                )
            })
            .collect();
        let mut expected = vec![
            "Activate ingest healthy",
            "Activate resolve healthy",
            "Activate gateway healthy",
            "Activate ingest healthy",
            "Activate resolve healthy",
            "Activate gateway rolled_back",
            "Rollback resolve healthy",
            "Rollback ingest healthy",
        ];
        if h.name != "web-1" {
            expected.retain(|s| *s != "Activate gateway rolled_back");
        }
        assert_eq!(steps, expected, "{}", h.name);
    }

    // An app no host's agent.toml declares refuses the whole bundle before any app starts.
    let mut text = std::fs::read_to_string(&base).expect("read");
    text = text.replacen(
        "\n[tls]",
        "\n[apps.notify]\nunits = [\"notify.service\"]\ndepends_on = [\"gateway\"]\n\n[tls]",
        1,
    );
    std::fs::write(&base, text).expect("write");
    let dir = bundle("3", None);
    demo_app::write_release(&std::path::Path::new(&dir).join("notify"), "3", Variant::Healthy).expect("release");
    let out = deploy(&dir, "3");
    assert_eq!(out.status.code(), Some(2), "{}{}", stdout(&out), stderr(&out));
    assert!(stderr(&out).contains("bundle: web-1 lacks app notify, web-2 lacks app notify"), "{}", stderr(&out));
    assert_eq!(serving(), ["1"; 6], "nothing was deployed");

    // Every app's build is scanned before the first app starts: the last one's bad build leaves
    // the first ones untouched.
    let text = std::fs::read_to_string(&base).expect("read");
    let (head, tail) = text.split_once("\n[apps.notify]").expect("notify");
    let (_, tail) = tail.split_once("\n[tls]").expect("tls");
    std::fs::write(&base, format!("{head}\n[tls]{tail}")).expect("write");
    let dir = bundle("4", None);
    let bad = std::path::Path::new(&dir).join("gateway/health.json");
    std::fs::set_permissions(&bad, std::os::unix::fs::PermissionsExt::from_mode(0o666)).expect("chmod");
    let out = deploy(&dir, "4");
    assert_eq!(out.status.code(), Some(2), "{}{}", stdout(&out), stderr(&out));
    assert!(stderr(&out).contains("app gateway:") && stderr(&out).contains("world-writable"), "{}", stderr(&out));
    assert!(stderr(&out).contains("nothing was deployed"), "{}", stderr(&out));
    assert_eq!(serving(), ["1"; 6], "no app was started");
}

/// A freeze over today: a deployment is refused with the next opening and nothing changes; one
/// with a stated reason goes out and the override is recorded with it; a rollback inside the
/// freeze is never held back.
#[test]
fn a_freeze_refuses_deployments_but_not_an_override_or_a_rollback() {
    let fleet = fleet_or_skip!(1);
    let day = |which: &str| {
        let out = std::process::Command::new("date").args(["-u", "-d", which, "+%F"]).output().expect("date");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let (yesterday, tomorrow, after) = (day("yesterday"), day("tomorrow"), day("2 days"));
    let frozen = fleet.fleet_toml_with(
        "frozen.toml",
        &format!("freezes = [{{ from = \"{yesterday}\", to = \"{tomorrow}\", reason = \"year-end freeze\" }}]"),
    );
    let config = frozen.to_str().unwrap_or_default();
    let dir = fleet.dir.join("demo-w1");
    demo_app::write_release(&dir, "1", Variant::Healthy).expect("release");
    let out = fleet.deploy(config, &dir, "1", false);
    assert_eq!(out.status.code(), Some(2), "{}{}", stdout(&out), stderr(&out));
    let text = stderr(&out);
    assert!(
        text.contains(&format!(
            "environment test is closed to deployments: in the freeze \"year-end freeze\" ({yesterday} to {tomorrow}); the next opening is "
        )) && text.contains(&format!("{after} 00:00 UTC")),
        "{text}"
    );
    assert!(text.contains("--override-window REASON"), "{text}");
    assert_eq!(versions(&fleet), [""], "no host was touched");

    // With a reason: deployed, and the registry says who overrode what, and why.
    let deploy = |v: &str| {
        let dir = fleet.dir.join(format!("demo-w{v}"));
        demo_app::write_release(&dir, v, Variant::Healthy).expect("release");
        let art = dir.to_string_lossy().into_owned();
        let args = [
            "deploy",
            "--config",
            config,
            "--env",
            "test",
            "--artifact",
            &art,
            "--version",
            v,
            "--override-window",
            "hotfix INC-42",
        ];
        let out = fleet.ferry(&args);
        assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
    };
    deploy("1");
    deploy("2");
    assert_eq!(versions(&fleet), ["2"]);
    let db = rusqlite::Connection::open(fleet.dir.join("registry.db")).expect("registry");
    let notes: Vec<String> = db
        .prepare("SELECT message FROM events WHERE kind = 'window_override' ORDER BY id")
        .and_then(|mut st| st.query_map([], |r| r.get(0))?.collect())
        .expect("events");
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert!(
        notes[0].contains("in the freeze \"year-end freeze\"") && notes[0].ends_with("; overridden: hotfix INC-42"),
        "{notes:?}"
    );

    // A rollback inside the freeze needs no reason.
    let out = fleet.ferry(&["rollback", "--config", config, "--env", "test"]);
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
    assert_eq!(versions(&fleet), ["1"]);
}
