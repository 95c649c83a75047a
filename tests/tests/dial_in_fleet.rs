//! Agents that dial in, on real systemd hosts whose inbound agent port is closed (an nftables
//! rule in each host's namespace, as a NAT or firewall would): the coordinator cannot reach
//! them, but `ferry serve` can through the connections they open. A rolling deployment, a
//! broken release rolled back and `ferry status` all go through it; a host whose link is cut is
//! unreachable within seconds and back once it heals; a server restart makes every agent dial
//! again, and the next deployment works.
use std::path::PathBuf;
use std::process::{Child, Output};
use std::time::Duration;

use ferry_proto::identity::Role;
use ferry_tests::demo_app::{self, Variant};
use ferry_tests::fleet::{AGENT_PORT, CTL_IP, Fleet, poll, text_of};
use ferry_tests::fleet_or_skip;

const URL: &str = "https://127.0.0.1:18443";
const TOKEN: &str = "ferry_ci_0123456789abcdef0123456789abcdef";
const DIAL_IN_PORT: u16 = 7444;

/// `ferry serve`, stopped (SIGTERM, then SIGKILL) when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(-(self.0.id() as i32));
        let _ = nix::sys::signal::kill(pgid, nix::sys::signal::Signal::SIGTERM);
        if poll(Duration::from_secs(10), || self.0.try_wait().ok().flatten()).is_none() {
            let _ = nix::sys::signal::kill(pgid, nix::sys::signal::Signal::SIGKILL);
            let _ = self.0.wait();
        }
    }
}

fn start_server(fleet: &Fleet, config: &str, log: &str) -> Server {
    let log = fleet.dir.join(log);
    let child = fleet.spawn_ferry(&["serve", "--config", config], &log);
    let up = poll(Duration::from_secs(20), || {
        std::fs::read_to_string(&log).ok().filter(|l| l.contains("listening on")).map(|_| ())
    });
    assert!(up.is_some(), "ferry serve did not start: {}", std::fs::read_to_string(&log).unwrap_or_default());
    Server(child)
}

/// The fleet's fleet.toml with every host marked `"dial-in"`, rolling one host at a time, and
/// `ferry serve` on 127.0.0.1:18443 (API) and CTL_IP:7444 (agents).
fn dial_in_toml(fleet: &Fleet) -> PathBuf {
    let base = fleet.write_fleet_toml("base.toml", &fleet.coordinator).unwrap_or_else(|e| panic!("{e}"));
    let text = std::fs::read_to_string(&base).unwrap_or_else(|e| panic!("{e}"));
    let (head, _) = text.split_once("[environments.test]").unwrap_or_else(|| panic!("no test environment: {text}"));
    let hosts: Vec<String> = fleet.hosts.iter().map(|h| format!("{} = \"dial-in\"", h.name)).collect();
    let api = fleet.pki.issue("api", Role::Coordinator, &["127.0.0.1", &CTL_IP.to_string()]);
    let toml = format!(
        "{head}[environments.test]\nhosts = {{ {} }}\nstrategy = \"rolling\"\nbatch = [1]\n\n\
         [server]\nlisten = \"127.0.0.1:18443\"\ndial_in_listen = \"{CTL_IP}:{DIAL_IN_PORT}\"\ncert = \"{}\"\nkey = \"{}\"\n\n\
         [[server.tokens]]\nname = \"ci\"\nsha256 = \"{}\"\n",
        hosts.join(", "),
        api.cert.display(),
        api.key.display(),
        ferry_coordinator::commands::token::sha256_hex(TOKEN),
    );
    let path = fleet.dir.join("dial-in.toml");
    std::fs::write(&path, toml).unwrap_or_else(|e| panic!("{e}"));
    path
}

/// `ferry --server URL ARGS`.
fn api(fleet: &Fleet, args: &[&str]) -> Output {
    let ca = fleet.coordinator.ca.to_string_lossy().into_owned();
    let mut all = vec!["--server", URL, "--server-ca", &ca, "--token", TOKEN];
    all.extend_from_slice(args);
    fleet.ferry(&all)
}

fn status(fleet: &Fleet, config: &str) -> serde_json::Value {
    let out = api(fleet, &["status", "--config", config, "--env", "test", "--output", "json"]);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text_of(&out)))
}

/// Polls `ferry --server status` until `want` holds of host `i` (every host: `None`).
fn status_until(fleet: &Fleet, config: &str, limit: Duration, i: Option<usize>, want: fn(&serde_json::Value) -> bool) {
    let mut last = serde_json::Value::Null;
    let reached = poll(limit, || {
        last = status(fleet, config);
        let hosts = last["hosts"].as_array()?;
        let ok = match i {
            Some(i) => hosts.get(i).is_some_and(want),
            None => !hosts.is_empty() && hosts.iter().all(want),
        };
        ok.then_some(())
    });
    assert!(reached.is_some(), "not within {limit:?}: {last:#}");
}

fn up(h: &serde_json::Value) -> bool {
    h["reachable"] == true && h["dial_in"]["addr"].is_string()
}

fn down(h: &serde_json::Value) -> bool {
    h["reachable"] == false
}

fn release(fleet: &Fleet, version: &str, variant: Variant) -> String {
    let dir = fleet.dir.join(format!("demo-{version}"));
    demo_app::write_release(&dir, version, variant).expect("write release");
    dir.to_string_lossy().into_owned()
}

fn deploy(fleet: &Fleet, config: &str, version: &str, variant: Variant) -> Output {
    let dir = release(fleet, version, variant);
    api(
        fleet,
        &["deploy", "--config", config, "--env", "test", "--artifact", &dir, "--version", version, "--output", "json"],
    )
}

#[test]
fn hosts_behind_a_closed_port_are_deployed_rolled_back_and_watched_through_their_own_connections() {
    let fleet = fleet_or_skip!(3);
    // Each host: its agent port closed to the outside, and its agent dialing ferry serve; the
    // last one does not listen at all.
    for (i, h) in fleet.hosts.iter().enumerate() {
        fleet.close_port(&h.name, AGENT_PORT);
        let path = h.dir.join("etc/ferry/agent.toml");
        let mut text = std::fs::read_to_string(&path).expect("agent.toml");
        if i == 2 {
            text = text.replacen(&format!("listen = \"0.0.0.0:{AGENT_PORT}\"\n"), "", 1);
        }
        std::fs::write(&path, format!("connect = [\"{CTL_IP}:{DIAL_IN_PORT}\"]\n{text}")).expect("agent.toml");
        h.systemctl(&["restart", "ferry-agent.service"]).unwrap_or_else(|e| panic!("{}: {e}", h.name));
    }
    let log = fleet.hosts[2].journal("ferry-agent.service", 30);
    assert!(log.contains("dialing ferry serve"), "the agent without listen runs: {log}");
    // The coordinator on its own cannot reach them any more.
    let direct = fleet.fleet_toml();
    let out = fleet.ferry(&["status", "--config", &direct.to_string_lossy(), "--env", "test", "--output", "json"]);
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text_of(&out)));
    assert!(report["hosts"].as_array().is_some_and(|h| h.iter().all(down)), "{report:#}");

    let config = dial_in_toml(&fleet);
    let config = config.to_string_lossy().into_owned();
    let server = start_server(&fleet, &config, "serve-1.log");
    status_until(&fleet, &config, Duration::from_secs(20), None, up);
    // As the server sees them: from their own addresses.
    let report = status(&fleet, &config);
    for (h, host) in report["hosts"].as_array().expect("hosts").iter().zip(&fleet.hosts) {
        let addr = h["dial_in"]["addr"].as_str().unwrap_or_default();
        assert!(addr.starts_with(&format!("{}:", host.ip)), "{h}");
    }

    // A rolling deployment, then a broken release, rolled back: hosts keep the good one.
    let out = deploy(&fleet, &config, "1", Variant::Healthy);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    assert_eq!(fleet.versions(), ["1", "1", "1"]);
    let out = deploy(&fleet, &config, "2", Variant::Unhealthy);
    assert_ne!(out.status.code(), Some(0), "{}", text_of(&out));
    assert!(text_of(&out).contains("rolled_back"), "{}", text_of(&out));
    assert_eq!(fleet.versions(), ["1", "1", "1"]);

    // A cut link: unreachable within seconds; healed: connected and usable again.
    fleet.cut_network("web-2");
    status_until(&fleet, &config, Duration::from_secs(30), Some(1), down);
    fleet.restore_network("web-2");
    status_until(&fleet, &config, Duration::from_secs(90), None, up);

    // The server restarted: every agent dials again, and the next deployment works.
    drop(server);
    let _server = start_server(&fleet, &config, "serve-2.log");
    status_until(&fleet, &config, Duration::from_secs(60), None, up);
    let out = deploy(&fleet, &config, "3", Variant::Healthy);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    assert_eq!(fleet.versions(), ["3", "3", "3"]);
}

/// The agents dial both servers of an active/standby pair on one PostgreSQL registry: only the
/// leader sends them commands. The leader is killed (kill -9) while a host activates; the
/// standby takes the lease with the next epoch and finishes the rollout over the connections the
/// agents already hold to it, and the hosts it touched follow its epoch.
#[test]
fn agents_dialing_both_servers_let_the_standby_finish_when_the_leader_dies() {
    use ferry_tests::postgres::FleetPg;
    use ferry_tests::serve::{Proc, Server as At, role_at, serve_in, server_toml};
    let fleet = fleet_or_skip!(3);
    let pg = match FleetPg::start(&fleet) {
        Ok(pg) => pg,
        Err(why) => return ferry_tests::fleet::skip_unless_ci(&why, "the dial-in failover test"),
    };
    let ctl = CTL_IP.to_string();
    let hosts: Vec<String> = fleet.hosts.iter().map(|h| format!("{} = \"dial-in\"", h.name)).collect();
    let config = |name: &str, port: u16, dial_in: u16| {
        let at = At { name, ip: &ctl, port, registry: &pg.url, lease: "2s" };
        let path = server_toml(&fleet, &at, "strategy = \"rolling\"\nbatch = 1\n");
        let text = std::fs::read_to_string(&path).expect("read");
        let (head, rest) = text.split_once("[environments.test]\nhosts = {").expect("an environment");
        let (_, rest) = rest.split_once('}').expect("hosts");
        let text = format!("{head}[environments.test]\nhosts = {{ {} }}{rest}", hosts.join(", ")).replacen(
            "[server]\n",
            &format!("[server]\ndial_in_listen = \"{ctl}:{dial_in}\"\n"),
            1,
        );
        std::fs::write(&path, text).expect("write");
        path.to_string_lossy().into_owned()
    };
    let (a_toml, b_toml) = (config("a", 18443, 7444), config("b", 18444, 7445));
    for h in &fleet.hosts {
        fleet.close_port(&h.name, AGENT_PORT);
        let path = h.dir.join("etc/ferry/agent.toml");
        let text = std::fs::read_to_string(&path).expect("agent.toml");
        std::fs::write(&path, format!("connect = [\"{ctl}:7444\", \"{ctl}:7445\"]\n{text}")).expect("agent.toml");
        h.systemctl(&["restart", "ferry-agent.service"]).unwrap_or_else(|e| panic!("{}: {e}", h.name));
    }
    let mut a = serve_in(&fleet, &fleet.ctl_ns, std::path::Path::new(&a_toml), "a");
    let leads = poll(Duration::from_secs(20), || role_at(&fleet, &ctl, 18443).filter(|(r, _)| r == "leader"));
    let (_, epoch) = leads.unwrap_or_else(|| panic!("a never led: {:?}", role_at(&fleet, &ctl, 18443)));
    let _b = serve_in(&fleet, &fleet.ctl_ns, std::path::Path::new(&b_toml), "b");
    let ca = fleet.coordinator.ca.to_string_lossy().into_owned();
    let through = |port: u16, args: &[&str]| {
        let url = format!("https://{ctl}:{port}");
        let mut all = vec!["--server", &url, "--server-ca", &ca, "--token", ferry_tests::serve::TOKEN];
        all.extend_from_slice(args);
        fleet.ferry(&all)
    };
    // Both servers see every agent.
    for port in [18443, 18444] {
        let connected = poll(Duration::from_secs(30), || {
            let out = through(port, &["status", "--env", "test", "--output", "json"]);
            let r: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            r["hosts"].as_array().filter(|h| h.len() == 3 && h.iter().all(up)).map(|_| ())
        });
        assert!(connected.is_some(), "not every agent dialed the server on {port}");
    }
    let v1 = release(&fleet, "1", Variant::Healthy);
    let out = through(18443, &["deploy", "--env", "test", "--artifact", &v1, "--version", "1"]);
    assert!(out.status.success(), "{}", text_of(&out));

    // v2 starts slowly (3 s before it listens): a is killed once web-1 is healthy on it.
    let v2 = fleet.dir.join("demo-2");
    demo_app::write_release(&v2, "2", Variant::SlowStart(3000)).expect("release");
    let art = v2.to_string_lossy().into_owned();
    let url = format!("https://{ctl}:18443");
    let _client = Proc(fleet.spawn_ferry(
        &[
            "--server",
            &url,
            "--server-ca",
            &ca,
            "--token",
            ferry_tests::serve::TOKEN,
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
    let first = poll(Duration::from_secs(60), || (fleet.hosts[0].activations("2", "healthy") > 0).then_some(()));
    assert!(
        first.is_some(),
        "web-1 never ran 2: {}",
        std::fs::read_to_string(fleet.dir.join("client.log")).unwrap_or_default()
    );
    a.kill9();

    let all = poll(Duration::from_secs(120), || (fleet.versions() == ["2", "2", "2"]).then_some(()));
    assert!(
        all.is_some(),
        "the standby did not finish: {:?}\n{}",
        fleet.versions(),
        std::fs::read_to_string(fleet.dir.join("b-serve.log")).unwrap_or_default()
    );
    let (r, b_epoch) = role_at(&fleet, &ctl, 18444).expect("b answers");
    assert_eq!((r.as_str(), b_epoch), ("leader", epoch + 1));
    let done = poll(Duration::from_secs(60), || {
        let out = through(18444, &["history", "--env", "test", "--output", "json", "--limit", "1"]);
        let h: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (h[0]["status"] == "succeeded").then_some(h)
    });
    assert!(done.is_some(), "{}", text_of(&through(18444, &["history", "--env", "test"])));
    for h in &fleet.hosts {
        assert_eq!(h.activations("2", "healthy"), 1, "{}: {:?}", h.name, h.audit_records());
    }
    let followed = fleet.hosts[2].exec(&["cat", "/var/lib/ferry/epoch"]).expect("epoch");
    assert_eq!(String::from_utf8_lossy(&followed.stdout).trim(), (epoch + 1).to_string());
}
