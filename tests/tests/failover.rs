//! Two `ferry serve` on one real PostgreSQL registry, in the coordinator's namespace of a real
//! fleet: the leader is killed (kill -9) while a host activates; the standby takes the lease
//! with the next epoch and finishes the rollout; no host is activated twice, none is skipped, and
//! the hosts it touched follow its epoch.
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use ferry_tests::demo_app::{self, Variant};
use ferry_tests::fleet::{Fleet, poll, skip_unless_ci};
use ferry_tests::fleet_or_skip;
use ferry_tests::postgres::FleetPg;
use ferry_tests::serve::{Proc, Server, TOKEN, role_at, serve_in, server_toml as server_toml_at};

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

const ROLLING: &str = "strategy = \"rolling\"\nbatch = 1\n";

/// fleet.toml of server `name` on `port`, sharing the PostgreSQL registry.
fn server_toml(fleet: &Fleet, pg: &FleetPg, name: &str, port: u16) -> PathBuf {
    server_toml_with(fleet, pg, name, port, ROLLING)
}

/// [`server_toml`] with `strategy` lines for the environment.
fn server_toml_with(fleet: &Fleet, pg: &FleetPg, name: &str, port: u16, strategy: &str) -> PathBuf {
    let at = Server { name, ip: "127.0.0.1", port, registry: &pg.url, lease: "2s" };
    server_toml_at(fleet, &at, strategy)
}

fn serve(fleet: &Fleet, config: &Path, name: &str) -> Proc {
    serve_in(fleet, &fleet.ctl_ns, config, name)
}

/// The role `GET /api/v1/health` of the server on `port` reports.
fn role(fleet: &Fleet, port: u16) -> Option<(String, i64)> {
    role_at(fleet, "127.0.0.1", port)
}

#[test]
fn the_standby_finishes_a_rollout_whose_leader_was_killed_mid_activation() {
    let fleet = fleet_or_skip!(3);
    let pg = match FleetPg::start(&fleet) {
        Ok(pg) => pg,
        Err(why) => return skip_unless_ci(&why, "the failover test"),
    };
    let (a_toml, b_toml) = (server_toml(&fleet, &pg, "a", 18443), server_toml(&fleet, &pg, "b", 18444));
    // v1 everywhere, by the CLI on the shared registry.
    let v1 = fleet.dir.join("demo-1");
    demo_app::write_release(&v1, "1", Variant::Healthy).expect("release");
    let out = fleet.deploy(&a_toml.to_string_lossy(), &v1, "1", false);
    assert!(out.status.success(), "{}", text(&out));

    let mut a = serve(&fleet, &a_toml, "a");
    let leads = poll(Duration::from_secs(20), || role(&fleet, 18443).filter(|(r, _)| r == "leader"));
    let (_, epoch) = leads.unwrap_or_else(|| panic!("a never led: {:?}", role(&fleet, 18443)));
    let _b = serve(&fleet, &b_toml, "b");
    let stands_by = poll(Duration::from_secs(20), || role(&fleet, 18444).filter(|(r, _)| r == "standby"));
    assert!(stands_by.is_some(), "b is not a standby: {:?}", role(&fleet, 18444));

    // v2 starts slowly on each host (3 s before it listens): a is killed while web-2 activates.
    let v2 = fleet.dir.join("demo-2");
    demo_app::write_release(&v2, "2", Variant::SlowStart(3000)).expect("release");
    let ca = fleet.coordinator.ca.to_string_lossy().into_owned();
    let art = v2.to_string_lossy().into_owned();
    let _client = Proc(fleet.spawn_ferry(
        &[
            "--server",
            "https://127.0.0.1:18443",
            "--server-ca",
            &ca,
            "--token",
            TOKEN,
            "deploy",
            "--env",
            "test",
            "--artifact",
            &art,
            "--version",
            "2",
        ],
        &fleet.dir.join("client.log"),
    ));
    // web-1 healthy on 2 (its agent recorded it), web-2 not yet: web-2 is next.
    let first = poll(Duration::from_secs(60), || (fleet.hosts[0].activations("2", "healthy") > 0).then_some(()));
    assert!(
        first.is_some(),
        "web-1 never ran 2: {}",
        std::fs::read_to_string(fleet.dir.join("client.log")).unwrap_or_default()
    );
    a.kill9();

    // b leads with the next epoch and finishes the rollout.
    let all = poll(Duration::from_secs(120), || (fleet.versions() == ["2", "2", "2"]).then_some(()));
    assert!(
        all.is_some(),
        "the standby did not finish: {:?}\n{}",
        fleet.versions(),
        std::fs::read_to_string(fleet.dir.join("b-serve.log")).unwrap_or_default()
    );
    let (r, b_epoch) = role(&fleet, 18444).expect("b answers");
    assert_eq!((r.as_str(), b_epoch), ("leader", epoch + 1));
    let done = poll(Duration::from_secs(30), || {
        let out = fleet.ferry(&["history", "--config", &b_toml.to_string_lossy(), "--output", "json", "--limit", "1"]);
        let h: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (h[0]["status"] == "succeeded").then_some(h)
    });
    assert!(done.is_some(), "{}", text(&fleet.ferry(&["history", "--config", &b_toml.to_string_lossy()])));

    // Every host ran 2's activation to health exactly once; the hosts b touched follow its epoch.
    for h in &fleet.hosts {
        assert_eq!(h.activations("2", "healthy"), 1, "{}: {:?}", h.name, h.audit_records());
    }
    let followed = fleet.hosts[2].exec(&["cat", "/var/lib/ferry/epoch"]).expect("epoch");
    assert_eq!(String::from_utf8_lossy(&followed.stdout).trim(), (epoch + 1).to_string());
}

/// A canary paused when its leader dies stays paused on the standby that takes over, and
/// `ferry promote` through the new leader continues it.
#[test]
fn a_paused_canary_stays_paused_across_a_failover_and_the_new_leader_promotes_it() {
    let fleet = fleet_or_skip!(2);
    let pg = match FleetPg::start(&fleet) {
        Ok(pg) => pg,
        Err(why) => return skip_unless_ci(&why, "the failover test"),
    };
    let canary = "strategy = \"canary\"\nsteps = [1]\npause = \"manual\"\n";
    let a_toml = server_toml_with(&fleet, &pg, "a", 18443, canary);
    let b_toml = server_toml_with(&fleet, &pg, "b", 18444, canary);
    let v1 = fleet.dir.join("demo-1");
    demo_app::write_release(&v1, "1", Variant::Healthy).expect("release");
    // A canary of v1 pauses after web-1 too: finish it by hand first.
    let out = fleet.deploy(&a_toml.to_string_lossy(), &v1, "1", false);
    assert!(text(&out).contains("paused"), "{}", text(&out));
    let out = fleet.ferry(&["promote", "--config", &a_toml.to_string_lossy(), "--env", "test"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(fleet.versions(), ["1", "1"]);

    let mut a = serve(&fleet, &a_toml, "a");
    assert!(poll(Duration::from_secs(20), || role(&fleet, 18443).filter(|(r, _)| r == "leader")).is_some());
    let _b = serve(&fleet, &b_toml, "b");
    let ca = fleet.coordinator.ca.to_string_lossy().into_owned();
    let v2 = fleet.dir.join("demo-2");
    demo_app::write_release(&v2, "2", Variant::Healthy).expect("release");
    let art = v2.to_string_lossy().into_owned();
    let on = |port: u16, args: &[&str]| {
        let url = format!("https://127.0.0.1:{port}");
        let mut all = vec!["--server", url.as_str(), "--server-ca", ca.as_str(), "--token", TOKEN];
        all.extend_from_slice(args);
        fleet.ferry(&all)
    };
    let out = on(18443, &["deploy", "--env", "test", "--artifact", &art, "--version", "2"]);
    assert!(text(&out).contains("paused"), "{}", text(&out));
    assert_eq!(fleet.versions(), ["2", "1"]);
    a.kill9();

    // b leads; the canary is left paused (no host moves on by itself)...
    assert!(poll(Duration::from_secs(30), || role(&fleet, 18444).filter(|(r, _)| r == "leader")).is_some());
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(fleet.versions(), ["2", "1"]);
    let out = fleet.ferry(&["history", "--config", &b_toml.to_string_lossy(), "--output", "json", "--limit", "1"]);
    let h: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    assert_eq!(h[0]["status"], "paused", "{h:#}");
    // ...until promoted through it.
    let out = on(18444, &["promote", "--env", "test"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(fleet.versions(), ["2", "2"]);
}

/// A host's audit log, one JSON object a line.
/// The newest deployment as `config`'s registry records it (`ferry history --deployment`).
fn newest(fleet: &Fleet, config: &Path) -> Option<serde_json::Value> {
    let config = config.to_string_lossy();
    let out = fleet.ferry(&["history", "--config", &config, "--output", "json", "--limit", "1"]);
    let h: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let id = h[0]["id"].as_str()?.to_string();
    let out = fleet.ferry(&["history", "--config", &config, "--deployment", &id, "--output", "json"]);
    serde_json::from_slice(&out.stdout).ok()
}

/// Each host's state in deployment view `d`, as its newest transition event says.
fn states(d: &serde_json::Value) -> std::collections::BTreeMap<String, String> {
    let known =
        ["pending", "staging", "staged", "activating", "healthy", "unchanged", "failed", "rolled_back", "skipped"];
    let mut s = std::collections::BTreeMap::new();
    for e in d["events"].as_array().into_iter().flatten() {
        if let (Some(h), Some(k)) = (e["host"].as_str(), e["kind"].as_str())
            && known.contains(&k)
        {
            s.insert(h.to_string(), k.to_string());
        }
    }
    s
}

/// `ferry --server URL deploy` of `artifact` as `version`, in the background.
fn deploy_through(fleet: &Fleet, url: &str, artifact: &Path, version: &str, log: &str) -> Proc {
    let ca = fleet.coordinator.ca.to_string_lossy().into_owned();
    let art = artifact.to_string_lossy().into_owned();
    let args = ["--server", url, "--server-ca", &ca, "--token", TOKEN, "deploy", "--env", "test", "--artifact", &art];
    let mut all = args.to_vec();
    all.extend(["--version", version]);
    Proc(fleet.spawn_ferry(&all, &fleet.dir.join(log)))
}

/// The leader, in a namespace of its own, loses its link mid-transfer: the standby takes over
/// (its epoch stops the old leader's uploads on every host at once), finishes the rollout, and
/// once the link is back nothing the old leader sends changes a host or the record.
#[test]
fn a_leader_cut_off_mid_rollout_is_fenced_out_of_every_host_and_of_the_registry() {
    let fleet = fleet_or_skip!(3);
    let pg = match FleetPg::start(&fleet) {
        Ok(pg) => pg,
        Err(why) => return skip_unless_ci(&why, "the failover test"),
    };
    let (a_ns, a_port) = fleet.add_coordinator_ns("lead", 3);
    let a_at = Server { name: "a", ip: "10.199.0.3", port: 18443, registry: &pg.net_url, lease: "2s" };
    let a_toml = server_toml_at(&fleet, &a_at, ROLLING);
    let b_toml = server_toml(&fleet, &pg, "b", 18444);
    let v1 = fleet.dir.join("demo-1");
    demo_app::write_release(&v1, "1", Variant::Healthy).expect("release");
    let out = fleet.deploy(&b_toml.to_string_lossy(), &v1, "1", false);
    assert!(out.status.success(), "{}", text(&out));

    let _a = serve_in(&fleet, &a_ns, &a_toml, "a");
    let leads = poll(Duration::from_secs(20), || role_at(&fleet, "10.199.0.3", 18443).filter(|(r, _)| r == "leader"));
    let (_, epoch) = leads.unwrap_or_else(|| panic!("a never led: {:?}", role_at(&fleet, "10.199.0.3", 18443)));
    let _b = serve(&fleet, &b_toml, "b");
    assert!(poll(Duration::from_secs(20), || role(&fleet, 18444).filter(|(r, _)| r == "standby")).is_some());

    // v2 carries 4 MiB of noise; a's uploads leave at 6 Mbit/s: about 16 s for the three hosts.
    let v2 = fleet.dir.join("demo-2");
    demo_app::write_release(&v2, "2", Variant::Healthy).expect("release");
    std::fs::write(v2.join("noise.bin"), ferry_tests::pseudo_random(4 << 20, 7)).expect("noise");
    let tc = ["netns", "exec", &a_ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf"];
    let shaped = std::process::Command::new("ip")
        .args(tc)
        .args(["rate", "6mbit", "burst", "32kbit", "latency", "400ms"])
        .status();
    assert!(shaped.is_ok_and(|s| s.success()), "tc on a's link");
    let _client = deploy_through(&fleet, "https://10.199.0.3:18443", &v2, "2", "client.log");
    let staging = poll(Duration::from_secs(60), || {
        let d = newest(&fleet, &b_toml)?;
        let s = states(&d);
        (d["version"] == "2" && s.len() == 3 && s.values().all(|v| v == "staging")).then_some(())
    });
    assert!(staging.is_some(), "a never staged: {:?}", newest(&fleet, &b_toml));
    std::thread::sleep(Duration::from_secs(2));

    // The cut: b leads with the next epoch, and every host follows it.
    fleet.set_link(&a_port, false);
    let cut = std::time::Instant::now();
    let b_leads = poll(Duration::from_secs(30), || role(&fleet, 18444).filter(|(r, _)| r == "leader"));
    assert_eq!(
        b_leads.map(|(_, e)| e),
        Some(epoch + 1),
        "{}",
        std::fs::read_to_string(fleet.dir.join("b-serve.log")).unwrap_or_default()
    );
    let leads_after = cut.elapsed();
    let followed = poll(Duration::from_secs(60), || {
        fleet
            .hosts
            .iter()
            .all(|h| {
                h.exec(&["cat", "/var/lib/ferry/epoch"])
                    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == (epoch + 1).to_string())
            })
            .then_some(())
    });
    assert!(followed.is_some(), "{}", std::fs::read_to_string(fleet.dir.join("b-serve.log")).unwrap_or_default());
    eprintln!("failover: b led {leads_after:?} after the cut; every host followed it {:?} after", cut.elapsed());

    // The link back, b finishes; a gets nothing through.
    fleet.set_link(&a_port, true);
    let all = poll(Duration::from_secs(120), || (fleet.versions() == ["2", "2", "2"]).then_some(()));
    assert!(
        all.is_some(),
        "{:?}\n{}",
        fleet.versions(),
        std::fs::read_to_string(fleet.dir.join("b-serve.log")).unwrap_or_default()
    );
    let done = poll(Duration::from_secs(30), || newest(&fleet, &b_toml).filter(|d| d["status"] == "succeeded"));
    let done = done.unwrap_or_else(|| panic!("{:?}", newest(&fleet, &b_toml)));
    let a_stands_by =
        poll(Duration::from_secs(30), || role_at(&fleet, "10.199.0.3", 18443).filter(|(r, _)| r == "standby"));
    assert!(a_stands_by.is_some(), "{}", std::fs::read_to_string(fleet.dir.join("a-serve.log")).unwrap_or_default());
    // Give a what time it takes to try (its registry calls retry for 30 s).
    std::thread::sleep(Duration::from_secs(10));
    assert_eq!(newest(&fleet, &b_toml).map(|d| d["status"].clone()), Some(done["status"].clone()));
    assert_eq!(fleet.versions(), ["2", "2", "2"]);

    let (a_addr, b_addr) = ("10.199.0.3:", "10.199.0.2:");
    let mut stopped = 0;
    let mut of_a = Vec::new();
    for h in &fleet.hosts {
        let lines = h.audit_records();
        of_a.extend(
            lines
                .iter()
                .filter(|e| e["peer_addr"].as_str().is_some_and(|p| p.starts_with("10.199.0.3:")))
                .map(|e| format!("{}: {e}", h.name)),
        );
        let from = |e: &serde_json::Value, who: &str| e["peer_addr"].as_str().is_some_and(|p| p.starts_with(who));
        // Only b activated 2, once.
        let activations: Vec<&serde_json::Value> =
            lines.iter().filter(|e| e["rpc"] == "Activate" && e["version"] == "2").collect();
        assert!(
            activations.len() == 1 && from(activations[0], b_addr) && activations[0]["result"] == "healthy",
            "{}: {activations:#?}",
            h.name
        );
        // After b's first command, every command of a that ended was refused.
        let of_v2 = |e: &serde_json::Value| e["deployment"] == done["deployment_id"];
        let first_b = lines.iter().position(|e| from(e, b_addr) && of_v2(e)).expect("b was here");
        for e in
            lines[first_b..].iter().filter(|e| from(e, a_addr) && e["rpc"] != "GetStatus" && e["rpc"] != "ListReleases")
        {
            let refused = e["result"].as_str().is_some_and(|r| r.starts_with("error"))
                && e["detail"].as_str().is_some_and(|d| d.contains("fenced"));
            assert!(refused, "{}: a's {} went through after b took over: {e}", h.name, e["rpc"]);
        }
        // (An upload b's arrival stopped ends, and is recorded, before b's own command.)
        stopped += lines
            .iter()
            .filter(|e| from(e, a_addr) && e["detail"].as_str().is_some_and(|d| d.starts_with("fenced")))
            .count();
    }
    // a's uploads were in progress when b came: the agents stopped them.
    assert!(
        stopped >= 1,
        "no command of a was refused; a's commands:\n{}\na's log:\n{}",
        of_a.join("\n"),
        std::fs::read_to_string(fleet.dir.join("a-serve.log")).unwrap_or_default()
    );
}

/// PostgreSQL goes down for 3 s while a host activates: the server's registry calls wait for it
/// and go through, it stays the leader, and the deployment succeeds with every host's every
/// transition recorded once.
#[test]
fn a_postgresql_restart_mid_deployment_loses_no_transition() {
    let fleet = fleet_or_skip!(3);
    let pg = match FleetPg::start(&fleet) {
        Ok(pg) => pg,
        Err(why) => return skip_unless_ci(&why, "the PostgreSQL restart test"),
    };
    let at = Server { name: "a", ip: "127.0.0.1", port: 18443, registry: &pg.url, lease: "10s" };
    let a_toml = server_toml_at(&fleet, &at, ROLLING);
    let v1 = fleet.dir.join("demo-1");
    demo_app::write_release(&v1, "1", Variant::Healthy).expect("release");
    let out = fleet.deploy(&a_toml.to_string_lossy(), &v1, "1", false);
    assert!(out.status.success(), "{}", text(&out));
    let _a = serve(&fleet, &a_toml, "a");
    let leads = poll(Duration::from_secs(20), || role(&fleet, 18443).filter(|(r, _)| r == "leader"));
    let (_, epoch) = leads.expect("a leads");

    let v2 = fleet.dir.join("demo-2");
    demo_app::write_release(&v2, "2", Variant::SlowStart(3000)).expect("release");
    let _client = deploy_through(&fleet, "https://127.0.0.1:18443", &v2, "2", "client.log");
    let activating = poll(Duration::from_secs(60), || {
        let d = newest(&fleet, &a_toml)?;
        (d["version"] == "2" && states(&d).values().any(|v| v == "activating")).then_some(())
    });
    assert!(activating.is_some(), "{:?}", newest(&fleet, &a_toml));
    pg.stop();
    std::thread::sleep(Duration::from_secs(3));
    pg.start_again();

    let all = poll(Duration::from_secs(120), || (fleet.versions() == ["2", "2", "2"]).then_some(()));
    let log = || std::fs::read_to_string(fleet.dir.join("a-serve.log")).unwrap_or_default();
    assert!(all.is_some(), "{:?}\n{}", fleet.versions(), log());
    let d = poll(Duration::from_secs(30), || newest(&fleet, &a_toml).filter(|d| d["status"] == "succeeded"));
    let d = d.unwrap_or_else(|| panic!("{:?}\n{}", newest(&fleet, &a_toml), log()));
    assert!(log().contains("retrying"), "no registry call met the restart:\n{}", log());
    assert_eq!(role(&fleet, 18443), Some(("leader".into(), epoch)), "{}", log());
    let events = d["events"].as_array().expect("events");
    for h in &fleet.hosts {
        let kinds: Vec<&str> =
            events.iter().filter(|e| e["host"] == h.name.as_str()).filter_map(|e| e["kind"].as_str()).collect();
        assert_eq!(kinds, ["staging", "staged", "activating", "healthy"], "{}: {events:#?}", h.name);
    }
}
