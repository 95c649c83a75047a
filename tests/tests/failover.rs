//! Two `ferry serve` on one real PostgreSQL registry, in the coordinator's namespace of a real
//! fleet: the leader is killed (kill -9) while a host activates; the standby takes the lease
//! with the next epoch and finishes the rollout; no host is activated twice, none is skipped, and
//! the hosts it touched follow its epoch.
use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::time::Duration;

use ferry_proto::identity::Role;
use ferry_tests::demo_app::{self, Variant};
use ferry_tests::fleet::{Fleet, poll, skip_unless_ci};
use ferry_tests::fleet_or_skip;
use ferry_tests::postgres::FleetPg;

const TOKEN: &str = "ferry_ci_0123456789abcdef0123456789abcdef";

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A process group started with `spawn_ferry`, killed when dropped.
struct Proc(Child);

impl Proc {
    fn kill9(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(-(self.0.id() as i32));
        let _ = nix::sys::signal::kill(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// fleet.toml of server `name` on `port`, sharing the PostgreSQL registry.
fn server_toml(fleet: &Fleet, pg: &FleetPg, name: &str, port: u16) -> PathBuf {
    server_toml_with(fleet, pg, name, port, "strategy = \"rolling\"\nbatch = 1\n")
}

/// [`server_toml`] with `strategy` lines for the environment.
fn server_toml_with(fleet: &Fleet, pg: &FleetPg, name: &str, port: u16, strategy: &str) -> PathBuf {
    let base =
        fleet.write_fleet_toml(&format!("{name}-base.toml"), &fleet.coordinator).unwrap_or_else(|e| panic!("{e}"));
    let text = std::fs::read_to_string(&base).unwrap_or_else(|e| panic!("{e}"));
    let api = fleet.pki.issue("api", Role::Coordinator, &["127.0.0.1"]);
    // The release starts in 3 s: its probe may take up to 8 s.
    let text = text.replacen("retries = 10", "retries = 40", 1);
    let text = text.replacen("registry = \"registry.db\"", &format!("registry = \"{}\"", pg.url), 1)
        + &format!(
            "{strategy}\n[server]\nlisten = \"127.0.0.1:{port}\"\nadvertise = \"https://127.0.0.1:{port}\"\n\
             leader_lease = \"2s\"\ncert = \"{}\"\nkey = \"{}\"\nartifacts_dir = \"{}\"\naudit_log = \"{}\"\n\n\
             [[server.tokens]]\nname = \"ci\"\nsha256 = \"{}\"\n",
            api.cert.display(),
            api.key.display(),
            fleet.dir.join(format!("{name}-artifacts")).display(),
            fleet.dir.join(format!("{name}-audit.log")).display(),
            ferry_coordinator::commands::token::sha256_hex(TOKEN),
        );
    assert!(text.contains("postgres://"), "{text}");
    let path = fleet.dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));
    path
}

fn serve(fleet: &Fleet, config: &Path, name: &str) -> Proc {
    let log = fleet.dir.join(format!("{name}-serve.log"));
    let child = fleet.spawn_ferry(&["serve", "--config", &config.to_string_lossy()], &log);
    let up = poll(Duration::from_secs(20), || {
        std::fs::read_to_string(&log).ok().filter(|l| l.contains("listening on")).map(|_| ())
    });
    assert!(up.is_some(), "ferry serve {name} did not start: {}", std::fs::read_to_string(&log).unwrap_or_default());
    Proc(child)
}

/// The role `GET /api/v1/health` of the server on `port` reports.
fn role(fleet: &Fleet, port: u16) -> Option<(String, i64)> {
    let script = format!(
        "import json, ssl, urllib.request\nc = ssl.create_default_context(cafile='{}')\n\
         h = json.load(urllib.request.urlopen('https://127.0.0.1:{port}/api/v1/health', context=c, timeout=3))\n\
         print(h['role'], h['epoch'])",
        fleet.coordinator.ca.display()
    );
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &fleet.ctl_ns, "python3", "-c", &script])
        .output()
        .ok()?;
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let (r, e) = line.split_once(' ')?;
    Some((r.to_string(), e.parse().ok()?))
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
    let first = poll(Duration::from_secs(60), || {
        let audit = fleet.hosts[0].exec(&["cat", "/var/lib/ferry/audit.log"]).ok()?;
        let text = String::from_utf8_lossy(&audit.stdout).into_owned();
        text.lines()
            .any(|l| {
                l.contains("\"Activate\"") && l.contains("\"version\":\"2\"") && l.contains("\"result\":\"healthy\"")
            })
            .then_some(())
    });
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
        let audit = h.exec(&["cat", "/var/lib/ferry/audit.log"]).expect("audit");
        let healthy = String::from_utf8_lossy(&audit.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["rpc"] == "Activate" && e["version"] == "2" && e["result"] == "healthy")
            .count();
        assert_eq!(healthy, 1, "{}: {}", h.name, String::from_utf8_lossy(&audit.stdout));
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
