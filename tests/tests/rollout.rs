//! The rollout engine end to end on five real systemd hosts: a canary paused until `ferry
//! promote`, a release broken on one host halting and unwinding the rollout, and a coordinator
//! killed mid-rollout whose deployment `ferry resume` finishes from the registry.
use std::path::Path;
use std::time::Duration;

use ferry_tests::demo_app::{self, Variant};
use ferry_tests::fleet::{Fleet, poll};
use ferry_tests::fleet_or_skip;

fn text(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn versions(fleet: &Fleet) -> Vec<String> {
    fleet.versions()
}

fn json(o: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(o)))
}

/// Deploys `version` of the demo app (variant) with `config`, JSON output.
fn deploy(fleet: &Fleet, config: &Path, version: &str, variant: Variant) -> std::process::Output {
    let dir = fleet.dir.join(format!("demo-{version}"));
    demo_app::write_release(&dir, version, variant).expect("write release");
    fleet.deploy(config.to_str().unwrap_or_default(), &dir, version, true)
}

/// v1 everywhere at once: the baseline the tests roll forward from.
fn baseline(fleet: &Fleet) {
    let fast = fleet.fleet_toml_with("all-at-once.toml", "strategy = \"all-at-once\"");
    let out = deploy(fleet, &fast, "1", Variant::Healthy);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(versions(fleet), ["1"; 5]);
}

#[test]
fn canary_pauses_until_promote_then_the_rest_rolls() {
    let fleet = fleet_or_skip!(5);
    baseline(&fleet);
    let canary = fleet.fleet_toml_with("canary.toml", "strategy = \"canary\"\nsteps = [1]\npause = \"manual\"");
    let config = canary.to_str().unwrap_or_default();

    let plan = fleet.ferry(&["plan", "--config", config, "--env", "test", "--output", "json"]);
    assert_eq!(plan.status.code(), Some(0), "{}", text(&plan));
    let plan = json(&plan);
    assert_eq!(plan["batches"][0]["hosts"], serde_json::json!(["web-1"]), "{plan}");
    assert_eq!(plan["batches"][0]["pause_after"], "manual", "{plan}");
    assert_eq!(plan["batches"][1]["hosts"].as_array().map(Vec::len), Some(4), "{plan}");

    let out = deploy(&fleet, &canary, "2", Variant::Healthy);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let report = json(&out);
    assert_eq!(report["status"], "paused", "{report}");
    assert_eq!(versions(&fleet), ["2", "1", "1", "1", "1"], "only the canary switched");

    // The environment is held by the paused deployment: another deploy is refused.
    let other = deploy(&fleet, &canary, "3", Variant::Healthy);
    assert_eq!(other.status.code(), Some(2), "{}", text(&other));
    assert!(text(&other).contains("is locked by deployment"), "{}", text(&other));

    let out = fleet.ferry(&["promote", "--config", config, "--env", "test", "--output", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let report = json(&out);
    assert_eq!(report["status"], "succeeded", "{report}");
    assert_eq!(versions(&fleet), ["2"; 5]);

    // The registry has the whole story.
    let history = fleet.ferry(&["history", "--config", config, "--env", "test", "--output", "json"]);
    let history = json(&history);
    assert_eq!(history[0]["version"], "2", "{history}");
    assert_eq!(history[0]["status"], "succeeded", "{history}");
    assert_eq!(history[0]["hosts_failed"], 0, "{history}");
}

#[test]
fn a_release_broken_on_host_2_halts_and_rolls_hosts_1_and_2_back() {
    let fleet = fleet_or_skip!(5);
    baseline(&fleet);
    let rolling = fleet.fleet_toml_with("rolling.toml", "strategy = \"rolling\"\nbatch = 1\nauto_rollback = true");
    let out = deploy(&fleet, &rolling, "2", Variant::FailingValidateOn("web-2"));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let report = json(&out);
    assert_eq!(report["status"], "rolled_back", "{report}");
    let statuses: Vec<&str> = (0..5).map(|i| report["hosts"][i]["status"].as_str().unwrap_or_default()).collect();
    assert_eq!(statuses, ["rolled_back", "rolled_back", "skipped", "skipped", "skipped"], "{report}");
    assert!(report["hosts"][1]["error"].as_str().unwrap_or_default().contains("validate"), "{report}");
    assert_eq!(versions(&fleet), ["1"; 5], "every host runs the previous release again");
    // The environment is free again.
    let out = deploy(&fleet, &rolling, "3", Variant::Healthy);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(versions(&fleet), ["3"; 5]);
    let report = fleet.ferry(&["report", "--config", rolling.to_str().unwrap_or_default(), "--output", "json"]);
    let report = json(&report);
    assert_eq!(report[0]["rolled_back"], 1, "{report}");
    assert_eq!(report[0]["succeeded"], 2, "{report}");
}

#[test]
fn a_coordinator_killed_mid_rollout_is_resumed_to_the_end() {
    let fleet = fleet_or_skip!(5);
    baseline(&fleet);
    // The coordinator "dies" while it drains web-3 at the load balancer.
    let marker = fleet.dir.join("draining-web-3");
    let hook = format!(
        "strategy = \"rolling\"\nbatch = 1\nbefore_host = \"if [ $FERRY_HOST = web-3 ] && [ ! -e {m} ]; then touch {m}; sleep 120; fi\"",
        m = marker.display()
    );
    let config = fleet.fleet_toml_with("rolling-hook.toml", &hook);
    let config = config.to_str().unwrap_or_default();
    let dir = fleet.dir.join("demo-2");
    demo_app::write_release(&dir, "2", Variant::Healthy).expect("write release");
    let log = fleet.dir.join("killed-ferry.log");
    let mut child = fleet.spawn_ferry(
        &["deploy", "--config", config, "--env", "test", "--artifact", &dir.to_string_lossy(), "--version", "2"],
        &log,
    );
    let reached = poll(Duration::from_secs(60), || marker.exists().then_some(()));
    assert!(
        reached.is_some(),
        "the rollout never reached web-3: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let pgid = nix::unistd::Pid::from_raw(-(child.id() as i32));
    nix::sys::signal::kill(pgid, nix::sys::signal::Signal::SIGKILL).expect("kill -9 the coordinator");
    let _ = child.wait();
    assert_eq!(versions(&fleet), ["2", "2", "1", "1", "1"], "{}", std::fs::read_to_string(&log).unwrap_or_default());

    // A new deploy is refused while the dead rollout holds the environment...
    let other = fleet.ferry(&[
        "deploy",
        "--config",
        config,
        "--env",
        "test",
        "--artifact",
        &dir.to_string_lossy(),
        "--version",
        "9",
    ]);
    assert_eq!(other.status.code(), Some(2), "{}", text(&other));
    assert!(text(&other).contains("that process is gone"), "{}", text(&other));
    // ...and `ferry resume` finishes it.
    let out = fleet.ferry(&["resume", "--config", config, "--env", "test", "--output", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let report = json(&out);
    assert_eq!(report["status"], "succeeded", "{report}");
    assert_eq!(versions(&fleet), ["2"; 5]);
    let history = json(&fleet.ferry(&["history", "--config", config, "--env", "test", "--output", "json"]));
    // One deployment of 2 (the killed one, finished), after the baseline.
    assert_eq!(history.as_array().map(Vec::len), Some(2), "{history}");
    assert_eq!(history[0]["id"], report["deployment_id"], "{history}");
    assert_eq!(history[0]["status"], "succeeded", "{history}");
    assert_eq!(history[0]["hosts_failed"], 0, "{history}");
}

#[test]
fn blue_green_switches_to_the_idle_group_and_back() {
    let fleet = fleet_or_skip!(4);
    // The "load balancer": the switch hook appends the group it makes live to a file.
    let switches = fleet.dir.join("switches");
    let refuse = fleet.dir.join("lb-refuses");
    let bg = format!(
        "strategy = \"blue-green\"\nauto_rollback = true\ngroups = {{ blue = [\"web-1\", \"web-2\"], green = [\"web-3\", \"web-4\"] }}\n\
         switch = \"echo $FERRY_GROUP:$FERRY_HOSTS:$FERRY_PREVIOUS_GROUP >> {s}\"\n\
         after_switch = \"if [ -e {r} ]; then echo health check through the LB failed >&2; exit 1; fi\"",
        s = switches.display(),
        r = refuse.display()
    );
    let config = fleet.fleet_toml_with("blue-green.toml", &bg);
    let cfg = config.to_str().unwrap_or_default();
    let lb = || std::fs::read_to_string(&switches).unwrap_or_default().lines().map(str::to_string).collect::<Vec<_>>();

    // No group is live yet: the first group takes v1 and is switched live.
    let out = deploy(&fleet, &config, "1", Variant::Healthy);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(json(&out)["hosts"].as_array().map(Vec::len), Some(2), "only the idle group is deployed to");
    assert_eq!(versions(&fleet), ["1", "1", "", ""]);
    assert_eq!(lb(), ["blue:web-1 web-2:"]);

    // v2 goes to green while blue keeps serving v1, then green is live.
    let plan = json(&fleet.ferry(&["plan", "--config", cfg, "--env", "test", "--output", "json"]));
    assert_eq!((plan["live_group"].as_str(), plan["switch_to"].as_str()), (Some("blue"), Some("green")), "{plan}");
    let out = deploy(&fleet, &config, "2", Variant::Healthy);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(versions(&fleet), ["1", "1", "2", "2"]);
    assert_eq!(lb().last().map(String::as_str), Some("green:web-3 web-4:blue"));

    // v3 to blue, but the check after the switch fails: green is switched back in and blue
    // (auto_rollback) goes back to v1. Green never stopped serving v2.
    std::fs::write(&refuse, "").expect("make the LB check fail");
    let out = deploy(&fleet, &config, "3", Variant::Healthy);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let report = json(&out);
    assert_eq!(report["status"], "rolled_back", "{report}");
    assert_eq!(versions(&fleet), ["1", "1", "2", "2"]);
    assert_eq!(lb()[2..], ["blue:web-1 web-2:green", "green:web-3 web-4:blue"]);
    let history = json(&fleet.ferry(&["history", "--config", cfg, "--env", "test", "--output", "json"]));
    let error = history[0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("health check through the LB failed") && error.contains("switched green back in"),
        "{error}"
    );

    // `ferry rollback` switches blue (still on v1) live again; no host is touched.
    std::fs::remove_file(&refuse).expect("LB healthy again");
    let out = fleet.ferry(&["rollback", "--config", cfg, "--env", "test", "--output", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let report = json(&out);
    assert_eq!(report["status"], "succeeded", "{report}");
    assert_eq!(report["hosts"][0]["status"], "unchanged", "{report}");
    assert_eq!(versions(&fleet), ["1", "1", "2", "2"]);
    assert_eq!(lb().last().map(String::as_str), Some("blue:web-1 web-2:green"));
    // --to makes no sense here, and says so.
    let out = fleet.ferry(&["rollback", "--config", cfg, "--env", "test", "--to", "2"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("rolls back by switching"), "{}", text(&out));
}

#[test]
fn ctrl_c_lets_the_batch_in_flight_finish_and_records_cancelled() {
    let fleet = fleet_or_skip!(3);
    let marker = fleet.dir.join("in-web-2");
    let hook = format!(
        "strategy = \"rolling\"\nbatch = 1\nbefore_host = \"if [ $FERRY_HOST = web-2 ]; then touch {m}; sleep 2; fi\"",
        m = marker.display()
    );
    let config = fleet.fleet_toml_with("cancel.toml", &hook);
    let cfg = config.to_str().unwrap_or_default();
    let dir = fleet.dir.join("demo-1");
    demo_app::write_release(&dir, "1", Variant::Healthy).expect("write release");
    let log = fleet.dir.join("cancelled-ferry.log");
    let args = ["deploy", "--config", cfg, "--env", "test", "--artifact", &dir.to_string_lossy(), "--version", "1"];
    let mut child = fleet.spawn_ferry(&args, &log);
    let reached = poll(Duration::from_secs(60), || marker.exists().then_some(()));
    assert!(reached.is_some(), "never reached web-2: {}", std::fs::read_to_string(&log).unwrap_or_default());
    // Ctrl-C reaches the whole foreground process group.
    let pgid = nix::unistd::Pid::from_raw(-(child.id() as i32));
    nix::sys::signal::kill(pgid, nix::sys::signal::Signal::SIGINT).expect("Ctrl-C");
    let status = child.wait().expect("wait");
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(status.code(), Some(1), "{log}");
    // web-2 was in flight: its hook (in a process group of its own, so the terminal's Ctrl-C does
    // not kill it half-way) and its activation finished; web-3 was never touched.
    let history = json(&fleet.ferry(&["history", "--config", cfg, "--env", "test", "--output", "json"]));
    assert_eq!(history[0]["status"], "cancelled", "{history}\n{log}");
    assert_eq!(versions(&fleet), ["1", "1", ""], "{log}");
    assert!(log.contains("cancelling after the hosts in flight finish"), "{log}");
    // The environment is free: the next deploy finishes the job.
    let out = deploy(&fleet, &config, "1", Variant::Healthy);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(versions(&fleet), ["1"; 3]);
}
