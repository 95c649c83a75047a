//! The pipeline API end to end on three real systemd hosts: a real `ferry serve` in the
//! coordinator's namespace, driven only through its API (the `ferry --server` CLI): register →
//! staging → smoke tests → approval by a second identity → promote to production → succeeded;
//! a release whose page is broken passes the hosts' health probes but fails the smoke test, and
//! that blocks its promotion with the reason; bad credentials and requests are refused.
use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::time::Duration;

use ferry_proto::identity::Role;
use ferry_tests::demo_app::{self, Variant};
use ferry_tests::fleet::{AGENT_PORT, Fleet, poll};
use ferry_tests::fleet_or_skip;

const URL: &str = "https://127.0.0.1:18443";
const CI_TOKEN: &str = "ferry_ci_0123456789abcdef0123456789abcdef";
const RM_TOKEN: &str = "ferry_rm_fedcba9876543210fedcba9876543210";

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(o)))
}

/// `ferry serve`, stopped (SIGTERM to its process group) when dropped.
struct Server {
    child: Child,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(-(self.child.id() as i32));
        let _ = nix::sys::signal::kill(pgid, nix::sys::signal::Signal::SIGTERM);
        let stopped = poll(Duration::from_secs(10), || self.child.try_wait().ok().flatten());
        if stopped.is_none() {
            let _ = nix::sys::signal::kill(pgid, nix::sys::signal::Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// fleet.toml: staging = web-1 (smoke-tested), production = web-2, web-3 (approval required),
/// the API on 127.0.0.1:18443 of the coordinator's namespace with two tokens.
fn pipeline_toml(fleet: &Fleet) -> PathBuf {
    let base = fleet.write_fleet_toml("base.toml", &fleet.coordinator).unwrap_or_else(|e| panic!("{e}"));
    let text = std::fs::read_to_string(&base).unwrap_or_else(|e| panic!("{e}"));
    let (head, _) = text.split_once("[environments.test]").unwrap_or_else(|| panic!("no test environment in {text}"));
    let api = fleet.pki.issue("api", Role::Coordinator, &["127.0.0.1"]);
    let addr = |i: usize| format!("{}:{AGENT_PORT}", fleet.hosts[i].ip);
    let toml = format!(
        "promotion = [\"staging\", \"production\"]\n{head}\
         [environments.staging]\nhosts = {{ web-1 = \"{}\" }}\n\
         [[environments.staging.smoke]]\nname = \"home\"\nurl = \"http://{{host}}:8080/\"\nexpect_status = 200\n\n\
         [environments.production]\nhosts = {{ web-2 = \"{}\", web-3 = \"{}\" }}\nstrategy = \"rolling\"\nbatch = 1\nrequire_approval = true\n\n\
         [server]\nlisten = \"127.0.0.1:18443\"\ncert = \"{}\"\nkey = \"{}\"\n\n\
         [[server.tokens]]\nname = \"ci\"\nsha256 = \"{}\"\n\n\
         [[server.tokens]]\nname = \"release-manager\"\nsha256 = \"{}\"\n\n\
         [server.roles]\n\"token:release-manager\" = [\"approve\"]\n",
        addr(0),
        addr(1),
        addr(2),
        api.cert.display(),
        api.key.display(),
        ferry_coordinator::commands::token::sha256_hex(CI_TOKEN),
        ferry_coordinator::commands::token::sha256_hex(RM_TOKEN),
    );
    let path = fleet.dir.join("pipeline.toml");
    std::fs::write(&path, toml).unwrap_or_else(|e| panic!("{e}"));
    path
}

fn start_server(fleet: &Fleet, config: &Path) -> Server {
    let log = fleet.dir.join("serve.log");
    let child = fleet.spawn_ferry(&["serve", "--config", &config.to_string_lossy()], &log);
    let mut server = Server { child, log };
    let up = poll(Duration::from_secs(20), || {
        std::fs::read_to_string(&server.log).ok().filter(|l| l.contains("listening on")).map(|_| ())
    });
    if up.is_none() {
        let exited = server.child.try_wait().ok().flatten();
        panic!("ferry serve did not start ({exited:?}): {}", std::fs::read_to_string(&server.log).unwrap_or_default());
    }
    server
}

/// `ferry --server URL ARGS` as the holder of `token`.
fn api(fleet: &Fleet, token: &str, args: &[&str]) -> Output {
    let ca = fleet.coordinator.ca.to_string_lossy().into_owned();
    let mut all = vec!["--server", URL, "--server-ca", &ca, "--token", token];
    all.extend_from_slice(args);
    fleet.ferry(&all)
}

/// `ferry --server URL ARGS` with `certs` as the client certificate.
fn as_holder_of(fleet: &Fleet, certs: &ferry_tests::pki::CertFiles, args: &[&str]) -> Output {
    let ca = fleet.coordinator.ca.to_string_lossy().into_owned();
    let (cert, key) = (certs.cert.to_string_lossy().into_owned(), certs.key.to_string_lossy().into_owned());
    let mut all = vec!["--server", URL, "--server-ca", &ca, "--client-cert", &cert, "--client-key", &key];
    all.extend_from_slice(args);
    fleet.ferry(&all)
}

fn release(fleet: &Fleet, version: &str, variant: Variant) -> String {
    let dir = fleet.dir.join(format!("demo-{version}"));
    demo_app::write_release(&dir, version, variant).expect("write release");
    dir.to_string_lossy().into_owned()
}

#[test]
fn a_version_goes_through_staging_smoke_tests_and_approval_to_production() {
    let fleet = fleet_or_skip!(3);
    let config = pipeline_toml(&fleet);
    let server = start_server(&fleet, &config);

    // Register v1: the CLI uploads the directory, the server scans and records it.
    let v1 = release(&fleet, "1", Variant::Healthy);
    let out = api(
        &fleet,
        CI_TOKEN,
        &[
            "pipeline",
            "register",
            "--version",
            "1",
            "--artifact",
            &v1,
            "--meta",
            "git_commit=4f2a9c1",
            "--output",
            "json",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let version = json(&out);
    assert_eq!(
        (version["registered_by"].as_str(), version["metadata"]["git_commit"].as_str()),
        (Some("token:ci"), Some("4f2a9c1")),
        "{version}"
    );

    // Production takes versions only through promotion.
    let out = api(&fleet, CI_TOKEN, &["pipeline", "deploy", "--env", "production", "--version", "1"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("promotion_required"), "{}", text(&out));

    // Staging.
    let out = api(&fleet, CI_TOKEN, &["pipeline", "deploy", "--env", "staging", "--version", "1", "--output", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let staging = json(&out);
    assert_eq!(staging["status"], "succeeded", "{staging}");
    let staging_id = staging["deployment_id"].as_str().expect("an id").to_string();
    assert_eq!(fleet.versions(), ["1", "", ""]);

    // No promotion before the smoke tests ran, then they pass.
    let out = api(&fleet, CI_TOKEN, &["pipeline", "promote", &staging_id]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("smoke_not_run"), "{}", text(&out));
    let out = api(&fleet, CI_TOKEN, &["pipeline", "smoke", &staging_id, "--output", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let run = json(&out);
    assert_eq!(run["passed"], true, "{run}");
    assert_eq!(run["results"][0]["host"], "web-1", "{run}");
    assert_eq!(run["results"][0]["status"], 200, "{run}");

    // Production needs an approval by someone other than the promoter.
    let out = api(&fleet, CI_TOKEN, &["pipeline", "promote", &staging_id]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("approval_required"), "{}", text(&out));
    // A pipeline token cannot approve (its default roles leave approve out); the release manager's
    // token may do nothing else.
    let out = api(&fleet, CI_TOKEN, &["pipeline", "approve", &staging_id]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("role_required") && text(&out).contains("token:ci may not approve"), "{}", text(&out));
    let out = api(&fleet, RM_TOKEN, &["pipeline", "promote", &staging_id]);
    assert!(text(&out).contains("token:release-manager may not promote"), "{}", text(&out));
    assert_eq!(fleet.versions(), ["1", "", ""], "nothing reached production");
    let out = api(&fleet, RM_TOKEN, &["pipeline", "approve", &staging_id]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    // Skipping ahead is refused; the next environment is production.
    let out = api(&fleet, CI_TOKEN, &["pipeline", "promote", &staging_id, "--to", "staging"]);
    assert!(text(&out).contains("promotion_skips"), "{}", text(&out));
    let out = api(&fleet, CI_TOKEN, &["pipeline", "promote", &staging_id, "--to", "production", "--output", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let production = json(&out);
    assert_eq!(production["status"], "succeeded", "{production}");
    assert_eq!(production["environment"], "production", "{production}");
    assert_eq!(fleet.versions(), ["1", "1", "1"]);

    // GET the deployment: who asked, where it came from, each host's recorded state.
    let prod_id = production["deployment_id"].as_str().expect("an id").to_string();
    let out = api(&fleet, RM_TOKEN, &["pipeline", "show", &prod_id, "--output", "json"]);
    let shown = json(&out);
    assert_eq!(shown["status"], "succeeded", "{shown}");
    assert_eq!(shown["requested_by"], "token:ci", "{shown}");
    assert_eq!(shown["promoted_from"], staging_id.as_str(), "{shown}");
    let states: Vec<&str> =
        shown["hosts"].as_array().into_iter().flatten().filter_map(|h| h["state"].as_str()).collect();
    assert_eq!(states, ["healthy", "healthy"], "{shown}");

    // v2's page is broken: the hosts' health probes pass, so staging succeeds, but the smoke
    // test fails and blocks the promotion, naming the check, the host and what it got.
    let v2 = release(&fleet, "2", Variant::BrokenPage);
    let out = api(&fleet, CI_TOKEN, &["pipeline", "register", "--version", "2", "--artifact", &v2]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = api(&fleet, CI_TOKEN, &["pipeline", "deploy", "--env", "staging", "--version", "2", "--output", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let staging2 = json(&out)["deployment_id"].as_str().expect("an id").to_string();
    let out = api(&fleet, CI_TOKEN, &["pipeline", "smoke", &staging2]);
    assert_eq!(out.status.code(), Some(1), "a failed smoke test exits 1: {}", text(&out));
    assert!(text(&out).contains("expected status 200, got 500"), "{}", text(&out));
    let out = api(&fleet, RM_TOKEN, &["pipeline", "approve", &staging2]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = api(&fleet, CI_TOKEN, &["pipeline", "promote", &staging2]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let why = text(&out);
    assert!(why.contains("smoke_failed") && why.contains("home on web-1: expected status 200, got 500"), "{why}");
    assert_eq!(fleet.versions(), ["2", "1", "1"], "production kept v1");

    // The CLI's own verbs through the server: roll staging back, read the history.
    let out = api(
        &fleet,
        CI_TOKEN,
        &["rollback", "--config", &config.to_string_lossy(), "--env", "staging", "--output", "json"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(json(&out)["status"], "succeeded", "{}", text(&out));
    assert_eq!(fleet.versions(), ["1", "1", "1"]);
    let out = api(
        &fleet,
        CI_TOKEN,
        &["history", "--config", &config.to_string_lossy(), "--env", "production", "--output", "json"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(json(&out).as_array().map(Vec::len), Some(1), "{}", text(&out));

    // Wrong credentials: a token the server does not know, an agent's certificate.
    let out = api(&fleet, "ferry_not_a_token", &["pipeline", "show", &prod_id]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("not one of [server] tokens"), "{}", text(&out));
    // An agent's certificate (it is a client of its peers only) is refused by the API.
    let out = as_holder_of(&fleet, &fleet.hosts[0].certs, &["pipeline", "show", &prod_id]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        text(&out).contains("has role agent; the API takes coordinator or operator certificates"),
        "{}",
        text(&out)
    );
    // An operator's certificate is let in, and audited under its name.
    let op = fleet.pki.issue("alice", Role::Operator, &[]);
    let out = as_holder_of(&fleet, &op, &["pipeline", "show", &prod_id]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    // Every call is in the audit log, with who made it.
    let audit = std::fs::read_to_string(fleet.dir.join("api-audit.log")).expect("the API audit log");
    let lines: Vec<serde_json::Value> = audit.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    let by = |who: &str, path: &str| {
        lines.iter().any(|l| l["who"] == who && l["path"].as_str().is_some_and(|p| p.ends_with(path)))
    };
    assert!(by("token:ci", "/promote") && by("token:release-manager", "/approve"), "{audit}");
    assert!(by("cert:alice", &prod_id), "{audit}");
    assert!(lines.iter().any(|l| l["status"] == 401 && l["who"] == "unauthenticated"), "{audit}");
    drop(server);
}

#[test]
fn a_canary_paused_through_the_api_is_continued_or_cancelled_there() {
    let fleet = fleet_or_skip!(2);
    let api_cert = fleet.pki.issue("api", Role::Coordinator, &["127.0.0.1"]);
    let config = fleet.fleet_toml_with(
        "canary.toml",
        &format!(
            "strategy = \"canary\"\nsteps = [1]\npause = \"manual\"\n\n[server]\nlisten = \"127.0.0.1:18443\"\n\
             cert = \"{}\"\nkey = \"{}\"\n\n[[server.tokens]]\nname = \"ci\"\nsha256 = \"{}\"\n",
            api_cert.cert.display(),
            api_cert.key.display(),
            ferry_coordinator::commands::token::sha256_hex(CI_TOKEN)
        ),
    );
    let config_arg = config.to_string_lossy().into_owned();
    let _server = start_server(&fleet, &config);

    // `ferry deploy --server` uploads, registers and deploys; the canary pauses after web-1.
    let v1 = release(&fleet, "1", Variant::Healthy);
    let out = api(
        &fleet,
        CI_TOKEN,
        &["deploy", "--config", &config_arg, "--env", "test", "--artifact", &v1, "--version", "1", "--output", "json"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(json(&out)["status"], "paused", "{}", text(&out));
    assert_eq!(fleet.versions(), ["1", ""]);
    // `ferry promote --server` continues it.
    let out = api(&fleet, CI_TOKEN, &["promote", "--config", &config_arg, "--env", "test", "--output", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(json(&out)["status"], "succeeded", "{}", text(&out));
    assert_eq!(fleet.versions(), ["1", "1"]);

    // v2 pauses after web-1 too; cancelling it records `cancelled` and leaves web-2 untouched.
    let v2 = release(&fleet, "2", Variant::Healthy);
    let out = api(
        &fleet,
        CI_TOKEN,
        &["deploy", "--config", &config_arg, "--env", "test", "--artifact", &v2, "--version", "2", "--output", "json"],
    );
    assert_eq!(json(&out)["status"], "paused", "{}", text(&out));
    let id = json(&out)["deployment_id"].as_str().expect("id").to_string();
    let out = api(&fleet, CI_TOKEN, &["pipeline", "cancel", &id]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = api(&fleet, CI_TOKEN, &["pipeline", "watch", &id, "--output", "json"]);
    assert_eq!(out.status.code(), Some(1), "a cancelled deployment exits 1: {}", text(&out));
    assert_eq!(json(&out)["status"], "cancelled", "{}", text(&out));
    assert_eq!(fleet.versions(), ["2", "1"]);
    // The environment is free again: the CLI's rollback through the server brings web-1 back to 1
    // (web-2, already there, is untouched).
    let out =
        api(&fleet, CI_TOKEN, &["rollback", "--config", &config_arg, "--env", "test", "--to", "1", "--output", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(fleet.versions(), ["1", "1"]);
}

/// One `ferry serve` for a fleet.toml of two apps: each app's versions (one name, two builds),
/// deployments, rollbacks and history kept apart, each app on its own hosts (the worker on web-2
/// only), and a call that names no app refused with the apps it could mean.
#[test]
fn one_server_deploys_and_rolls_back_two_apps_each_on_its_own_hosts() {
    let fleet = fleet_or_skip!(2);
    fleet.add_agent_apps(&[("api", 8081), ("worker", 8082)]);
    let base = fleet.write_fleet_toml("base.toml", &fleet.coordinator).unwrap_or_else(|e| panic!("{e}"));
    let written = std::fs::read_to_string(&base).unwrap_or_else(|e| panic!("{e}"));
    let (_, rest) = written.split_once("[tls]").unwrap_or_else(|| panic!("no [tls] in {written}"));
    let api_cert = fleet.pki.issue("api", Role::Coordinator, &["127.0.0.1"]);
    let app = |name: &str, port: u16, extra: &str| {
        format!(
            "[apps.{name}]\nunits = [\"{name}.service\"]\n{extra}[[apps.{name}.health]]\nhttp = \"http://127.0.0.1:{port}/health\"\njson_field = \"status\"\njson_value = \"healthy\"\ninterval = \"200ms\"\nretries = 10\n\n"
        )
    };
    let toml = format!(
        "connect_timeout = \"3s\"\nrequest_timeout = \"10s\"\ncache_dir = \"cache\"\nregistry = \"registry.db\"\n\n{}{}\
         [tls]{rest}\n[server]\nlisten = \"127.0.0.1:18443\"\ncert = \"{}\"\nkey = \"{}\"\n\n\
         [[server.tokens]]\nname = \"ci\"\nsha256 = \"{}\"\n",
        app("api", 8081, ""),
        app("worker", 8082, "hosts = [\"web-2\"]\n"),
        api_cert.cert.display(),
        api_cert.key.display(),
        ferry_coordinator::commands::token::sha256_hex(CI_TOKEN),
    );
    let config = fleet.dir.join("apps.toml");
    std::fs::write(&config, toml).unwrap_or_else(|e| panic!("{e}"));
    // The plan of one app covers its own hosts.
    let cfg = config.to_string_lossy().into_owned();
    let plan = fleet.ferry(&["plan", "--config", &cfg, "--env", "test", "--app", "worker", "--output", "json"]);
    assert_eq!(plan.status.code(), Some(0), "{}", text(&plan));
    assert_eq!(json(&plan)["batches"][0]["hosts"], serde_json::json!(["web-2"]), "{}", text(&plan));
    let plan = fleet.ferry(&["plan", "--config", &cfg, "--env", "test"]);
    assert_eq!(plan.status.code(), Some(2), "{}", text(&plan));
    let _server = start_server(&fleet, &config);
    let serving = || -> Vec<String> {
        let mut all = Vec::new();
        for h in &fleet.hosts {
            for port in [8081, 8082] {
                all.push(fleet.http_get(&format!("http://{}:{port}/", h.ip)).map_or_else(|_| "-".into(), |(_, b)| b));
            }
        }
        all
    };
    let deploy = |app: &str, version: &str| {
        let dir = fleet.dir.join(format!("{app}-{version}"));
        demo_app::write_release(&dir, version, Variant::Healthy).expect("write release");
        let dir = dir.to_string_lossy().into_owned();
        api(&fleet, CI_TOKEN, &["deploy", "--env", "test", "--app", app, "--artifact", &dir, "--version", version])
    };

    // One version name for both apps: two registrations, two rollouts, each to its hosts.
    for app in ["api", "worker"] {
        let out = deploy(app, "1");
        assert_eq!(out.status.code(), Some(0), "{app}: {}", text(&out));
        assert!(text(&out).contains(&format!("registered 1 of {app}")), "{}", text(&out));
    }
    // web-1: api 1, no worker; web-2: api 1, worker 1.
    assert_eq!(serving(), ["1", "-", "1", "1"]);
    let out = deploy("api", "2");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(serving(), ["2", "-", "2", "1"], "the worker kept its release");

    // A call that names no app, or an unknown one: refused, naming the apps.
    let out = api(&fleet, CI_TOKEN, &["rollback", "--env", "test"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("fleet.toml declares several apps (api, worker)"), "{}", text(&out));
    let out = api(&fleet, CI_TOKEN, &["history", "--app", "mailer"]);
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("unknown app \"mailer\""), "{}", text(&out));

    // Rolling the api back leaves the worker alone.
    let out = api(&fleet, CI_TOKEN, &["rollback", "--env", "test", "--app", "api", "--output", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(json(&out)["app"], "api");
    assert_eq!(serving(), ["1", "-", "1", "1"]);

    // History, by app and together.
    let apps_of = |args: &[&str]| -> Vec<(String, String, String)> {
        let mut all = vec!["history", "--output", "json"];
        all.extend_from_slice(args);
        let out = api(&fleet, CI_TOKEN, &all);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        json(&out)
            .as_array()
            .unwrap_or_else(|| panic!("not a list: {}", text(&out)))
            .iter()
            .map(|d| {
                let s = |k: &str| d[k].as_str().unwrap_or("").to_string();
                (s("app"), s("kind"), s("version"))
            })
            .collect()
    };
    let row = |app: &str, kind: &str, v: &str| (app.to_string(), kind.to_string(), v.to_string());
    assert_eq!(apps_of(&["--app", "worker"]), [row("worker", "deploy", "1")]);
    assert_eq!(
        apps_of(&[]),
        [
            row("api", "rollback", "previous"),
            row("api", "deploy", "2"),
            row("worker", "deploy", "1"),
            row("api", "deploy", "1")
        ]
    );
}
