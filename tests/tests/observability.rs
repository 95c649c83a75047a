//! Observability end to end on real systemd hosts: each agent's `/metrics` counts exactly what
//! a series of deployments and rollbacks did to it, its audit log lists every command with the
//! coordinator's certificate name (and a refused connection with the intruder's), its journal
//! entries carry the command's fields, `/health` turns unhealthy when the data dir cannot be
//! written; the coordinator's `--metrics-file` and `--log-format json` say the same from its side.
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use ferry_proto::identity::Role;
use ferry_proto::prometheus::{self, Sample};
use ferry_tests::demo_app::{self, Variant};
use ferry_tests::fleet::{Fleet, FleetHost, poll};
use ferry_tests::fleet_or_skip;
use serde_json::Value;

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(o)))
}

/// The host's `/metrics`, parsed.
fn scrape(h: &FleetHost) -> Vec<Sample> {
    let (status, body) = h.http_get("/metrics").unwrap_or_else(|e| panic!("{}: GET /metrics: {e}", h.name));
    assert_eq!(status, 200, "{}: {body}", h.name);
    prometheus::parse(&body).unwrap_or_else(|e| panic!("{}: /metrics is not the text format: {e}\n{body}", h.name))
}

/// A counter or gauge of `samples`, 0 when absent.
fn val(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    prometheus::value(samples, name, labels).unwrap_or(0.0)
}

/// How much each of `series` grew between two scrapes.
fn deltas(before: &[Sample], after: &[Sample], series: &[(&str, &[(&str, &str)])]) -> Vec<f64> {
    series.iter().map(|(n, l)| val(after, n, l) - val(before, n, l)).collect()
}

/// The host's audit log, every record, via `ferry-agent audit tail` on the host.
fn audit(h: &FleetHost) -> Vec<Value> {
    let out = h
        .exec(&["/opt/ferry/ferry-agent", "audit", "tail", "-n", "100000", "--output", "json"])
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(out.status.success(), "{}: audit tail: {}", h.name, text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: audit line is not JSON ({e}): {l}", h.name)))
        .collect()
}

/// `ferry deploy` of the demo app, JSON report, with extra global flags.
fn deploy(fleet: &Fleet, config: &Path, version: &str, variant: Variant, flags: &[&str]) -> Output {
    let dir = fleet.dir.join(format!("demo-{version}"));
    demo_app::write_release(&dir, version, variant).expect("write release");
    let artifact = dir.to_string_lossy();
    let config = config.to_string_lossy();
    let mut args: Vec<&str> = flags.to_vec();
    args.extend(["deploy", "--config", &config, "--env", "test", "--artifact", &artifact, "--version", version]);
    args.extend(["--output", "json"]);
    fleet.ferry(&args)
}

/// Per host of a report: (bytes it received, from the coordinator and its peers; delta_chunks).
fn sent(report: &Value, host: &str) -> (f64, u64) {
    let h = report["hosts"].as_array().and_then(|a| a.iter().find(|h| h["name"] == host)).cloned().unwrap_or_default();
    let bytes = h["bytes_sent"].as_f64().unwrap_or(-1.0) + h["bytes_from_peers"].as_f64().unwrap_or(0.0);
    (bytes, h["delta_chunks"].as_u64().unwrap_or(0))
}

const HEALTHY: (&str, &[(&str, &str)]) = ("ferry_agent_activations_total", &[("outcome", "healthy")]);
const ROLLED_BACK: (&str, &[(&str, &str)]) = ("ferry_agent_activations_total", &[("outcome", "rolled_back")]);
const REQUESTED: (&str, &[(&str, &str)]) = ("ferry_agent_rollbacks_total", &[("trigger", "requested")]);
const AUTOMATIC: (&str, &[(&str, &str)]) = ("ferry_agent_rollbacks_total", &[("trigger", "automatic")]);
const PROBES: (&str, &[(&str, &str)]) = ("ferry_agent_health_probe_failures_total", &[]);
const BYTES: (&str, &[(&str, &str)]) = ("ferry_agent_received_bytes_total", &[("app", "web")]);
const STAGED: (&str, &[(&str, &str)]) = ("ferry_agent_stage_duration_seconds_count", &[("app", "web")]);
const ACTIVATE_OK: (&str, &[(&str, &str)]) = ("ferry_agent_requests_total", &[("rpc", "Activate"), ("result", "ok")]);

#[test]
fn metrics_audit_and_logs_follow_deployments_and_rollbacks() {
    let fleet = fleet_or_skip!(2);
    let (web1, web2) = (fleet.host("web-1"), fleet.host("web-2"));
    let series = [HEALTHY, ROLLED_BACK, REQUESTED, AUTOMATIC, PROBES, STAGED, ACTIVATE_OK];
    let at_start = [scrape(web1), scrape(web2)];
    for s in &at_start {
        assert_eq!(val(s, "ferry_agent_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);
        assert_eq!(prometheus::value(s, HEALTHY.0, HEALTHY.1), Some(0.0), "counters exist from the start at 0");
    }
    let metrics_file = fleet.dir.join("ferry-test.prom");
    let mf = metrics_file.to_string_lossy().into_owned();
    let flags = ["--log-format", "json", "--log", "info", "--metrics-file", mf.as_str()];

    // 1. v1 everywhere: one healthy activation per host; each host received exactly what the
    //    coordinator says it sent it.
    let all = fleet.fleet_toml_with("all-at-once.toml", "strategy = \"all-at-once\"");
    let out = deploy(&fleet, &all, "1", Variant::Healthy, &flags);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v1 = json(&out);
    let after_v1 = [scrape(web1), scrape(web2)];
    for (i, h) in [web1, web2].iter().enumerate() {
        let d = deltas(&at_start[i], &after_v1[i], &series);
        assert_eq!(
            d,
            [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0],
            "{}: healthy, rolled_back, requested, automatic, probes, staged, Activate ok",
            h.name
        );
        let (bytes, delta_chunks) = sent(&v1, &h.name);
        assert_eq!(delta_chunks, 0, "a first release has nothing to delta against");
        assert!(bytes > 0.0, "{v1}");
        assert_eq!(val(&after_v1[i], BYTES.0, BYTES.1) - val(&at_start[i], BYTES.0, BYTES.1), bytes, "{}", h.name);
        assert_eq!(val(&after_v1[i], "ferry_agent_releases_kept", &[("app", "web")]), 1.0);
        assert!(val(&after_v1[i], "ferry_agent_data_dir_free_bytes", &[]) > 0.0);
    }

    // The coordinator's structured logs: JSON lines whose spans carry the deployment and host.
    let id1 = v1["deployment_id"].as_str().unwrap_or_default().to_string();
    let logs: Vec<Value> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("--log-format json wrote a non-JSON line ({e}): {l}"))
        })
        .collect();
    let staged = logs
        .iter()
        .find(|l| l["message"] == "staged" && l["span"]["host"] == "web-1")
        .unwrap_or_else(|| panic!("no 'staged' event for web-1 in {logs:#?}"));
    assert_eq!(staged["span"]["deployment_id"], id1.as_str(), "{staged}");
    assert_eq!(staged["span"]["app"], "web", "{staged}");
    assert_eq!(staged["span"]["version"], "1", "{staged}");
    assert!(
        staged["spans"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["name"] == "deployment" && s["environment"] == "test")),
        "{staged}"
    );

    // 2. v2, held at the load balancer hook: meanwhile the metrics file says a run is in progress.
    let marker = fleet.dir.join("hold-v2");
    std::fs::write(&marker, "").expect("marker");
    let held = fleet.fleet_toml_with(
        "held.toml",
        &format!("strategy = \"all-at-once\"\nbefore_host = \"while [ -e {} ]; do sleep 0.1; done\"", marker.display()),
    );
    demo_app::write_release(&fleet.dir.join("demo-2"), "2", Variant::Healthy).expect("write release");
    let log = fleet.dir.join("ferry-v2.log");
    let artifact = fleet.dir.join("demo-2").to_string_lossy().into_owned();
    let held_config = held.to_string_lossy().into_owned();
    let mut child = fleet.spawn_ferry(
        &[
            "--metrics-file",
            &mf,
            "deploy",
            "--config",
            &held_config,
            "--env",
            "test",
            "--artifact",
            &artifact,
            "--version",
            "2",
        ],
        &log,
    );
    let in_progress = poll(Duration::from_secs(60), || {
        let s = prometheus::parse(&std::fs::read_to_string(&metrics_file).ok()?).ok()?;
        (prometheus::value(&s, "ferry_run_in_progress", &[("command", "deploy"), ("environment", "test")]) == Some(1.0))
            .then_some(s)
    });
    let in_progress = in_progress.unwrap_or_else(|| panic!("the metrics file never said a run is in progress"));
    assert!(val(&in_progress, "ferry_run_started_timestamp_seconds", &[]) > 0.0);
    std::fs::remove_file(&marker).expect("release the hook");
    let status = child.wait().expect("wait for ferry");
    assert!(status.success(), "{}", std::fs::read_to_string(&log).unwrap_or_default());
    assert_eq!(fleet.versions(), ["2", "2"]);

    // 3. ferry rollback: every host goes back to v1 on request.
    let config = fleet.fleet_toml().to_string_lossy().into_owned();
    let mut args: Vec<&str> = flags.to_vec();
    args.extend(["rollback", "--config", &config, "--env", "test", "--output", "json"]);
    let out = fleet.ferry(&args);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let rollback_id = json(&out)["deployment_id"].as_str().unwrap_or_default().to_string();
    assert_eq!(fleet.versions(), ["1", "1"]);

    // 4. v3 is unhealthy: web-1's agent rolls it back by itself, the rollout halts, web-2 keeps v1.
    let rolling = fleet.fleet_toml_with("rolling.toml", "strategy = \"rolling\"\nbatch = 1");
    let before_v3 = [scrape(web1), scrape(web2)];
    let out = deploy(&fleet, &rolling, "3", Variant::Unhealthy, &flags);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let v3 = json(&out);
    assert_eq!(fleet.versions(), ["1", "1"]);
    let after_v3 = [scrape(web1), scrape(web2)];
    assert_eq!(deltas(&before_v3[0], &after_v3[0], &series), [0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0], "web-1 after v3");
    assert_eq!(deltas(&before_v3[1], &after_v3[1], &series), [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0], "web-2 after v3");
    for (i, h) in [web1, web2].iter().enumerate() {
        let (bytes, delta_chunks) = sent(&v3, &h.name);
        let received = val(&after_v3[i], BYTES.0, BYTES.1) - val(&before_v3[i], BYTES.0, BYTES.1);
        if delta_chunks == 0 {
            assert_eq!(received, bytes, "{}: {v3}", h.name);
        } else {
            // A piece delta costs the coordinator 8 bytes per op on top of the data received.
            assert!(received > 0.0 && received <= bytes, "{}: received {received}, sent {bytes}", h.name);
        }
    }
    // Totals over the whole story.
    let end = [after_v3[0].clone(), after_v3[1].clone()];
    assert_eq!(deltas(&at_start[0], &end[0], &series)[..5], [2.0, 1.0, 1.0, 1.0, 1.0], "web-1 in all");
    assert_eq!(deltas(&at_start[1], &end[1], &series)[..5], [2.0, 0.0, 1.0, 0.0, 0.0], "web-2 in all");
    assert!(val(&end[0], "ferry_agent_activate_duration_seconds_count", &[("outcome", "rolled_back")]) == 1.0);

    // The audit log of web-1: every command of each deployment and of the rollback, from "ctl".
    let records = audit(web1);
    let of = |id: &str| -> Vec<(String, String)> {
        records
            .iter()
            .filter(|r| r["deployment"] == id)
            .map(|r| {
                (
                    r["rpc"].as_str().unwrap_or_default().to_string(),
                    r["result"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    };
    let pairs = |v: &[(&str, &str)]| v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect::<Vec<_>>();
    assert_eq!(
        of(&id1),
        pairs(&[("Prepare", "ok"), ("Upload", "ok"), ("Commit", "ok"), ("Activate", "healthy")]),
        "{records:#?}"
    );
    assert_eq!(of(&rollback_id), pairs(&[("Rollback", "healthy")]), "{records:#?}");
    let id3 = v3["deployment_id"].as_str().unwrap_or_default();
    assert_eq!(of(id3).last(), Some(&("Activate".to_string(), "rolled_back".to_string())), "{records:#?}");
    let v3_activate =
        records.iter().find(|r| r["deployment"] == id3 && r["rpc"] == "Activate").cloned().unwrap_or_default();
    assert!(v3_activate["detail"].as_str().unwrap_or_default().contains("health"), "{v3_activate}");
    assert_eq!(v3_activate["version"], "3", "{v3_activate}");
    // Only the coordinator spoke to this host, and its peers for their chunks (peer fetch).
    for r in &records.iter().filter(|r| r["rpc"] != "GetChunks").collect::<Vec<_>>() {
        assert_eq!(r["peer"], "ctl", "only the coordinator commands this host: {r}");
        assert!(r["peer_addr"].as_str().unwrap_or_default().starts_with("10.199.0.2:"), "{r}");
    }
    for r in records.iter().filter(|r| r["rpc"] == "GetChunks") {
        assert!(r["peer"].as_str().is_some_and(|p| p.starts_with("web-")), "a peer of the fleet: {r}");
    }
    // Its human form names who did what.
    let human = web1.exec(&["/opt/ferry/ferry-agent", "audit", "tail", "-n", "3"]).expect("audit tail");
    let human = text(&human);
    assert_eq!(human.lines().count(), 3, "{human}");
    assert!(human.contains(" ctl (10.199.0.2:") && human.contains("Activate -> rolled_back"), "{human}");

    // The agent's journal entries of a command carry its fields (tracing-journald, prefix F_).
    let journal = web1
        .exec(&[
            "journalctl",
            "--no-pager",
            "-o",
            "json",
            "-u",
            "ferry-agent.service",
            &format!("F_DEPLOYMENT_ID={id1}"),
        ])
        .expect("journalctl");
    let entries: Vec<Value> =
        String::from_utf8_lossy(&journal.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(
        entries
            .iter()
            .any(|e| e["F_RPC"] == "Activate" && e["F_PEER"] == "ctl" && e["F_APP"] == "web" && e["F_VERSION"] == "1"),
        "no journal entry of the v1 activation with its fields: {entries:#?}"
    );

    // The coordinator's metrics file, after the last run: every deployment of the environment.
    let prom = std::fs::read_to_string(&metrics_file).expect("metrics file");
    let s = prometheus::parse(&prom).unwrap_or_else(|e| panic!("{e}\n{prom}"));
    let total = |kind: &str, status: &str| val(&s, "ferry_deployments_total", &[("kind", kind), ("status", status)]);
    assert_eq!(total("deploy", "succeeded"), 2.0, "{prom}");
    assert_eq!(total("rollback", "succeeded"), 1.0, "{prom}");
    let v3_status = v3["status"].as_str().unwrap_or_default();
    assert_eq!(total("deploy", v3_status), 1.0, "{prom}");
    assert_eq!(val(&s, "ferry_deployment_duration_seconds_count", &[("kind", "deploy")]), 3.0, "{prom}");
    assert_eq!(val(&s, "ferry_deployment_hosts_failed_total", &[]), 1.0, "{prom}");
    let sent_total = [&v1, &v3].iter().map(|r| r["bytes_sent"].as_f64().unwrap_or(0.0)).sum::<f64>();
    assert!(val(&s, "ferry_deployment_sent_bytes_total", &[]) >= sent_total, "{prom}");
    assert_eq!(val(&s, "ferry_run_in_progress", &[("command", "deploy")]), 0.0, "{prom}");
    assert_eq!(val(&s, "ferry_run_exit_code", &[("command", "deploy")]), 1.0, "{prom}");

    // A coordinator of another CA is refused, and the audit log says who tried.
    let other = ferry_tests::pki::TestPki::new();
    let mut intruder = other.issue("intruder", Role::Coordinator, &[]);
    intruder.ca = fleet.pki.ca_cert();
    let toml = fleet.write_fleet_toml("intruder.toml", &intruder).expect("write");
    let refused_before = val(&scrape(web1), "ferry_agent_refused_connections_total", &[("reason", "unknown_ca")]);
    let out = fleet.ferry(&["status", "--config", &toml.to_string_lossy(), "--env", "test"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let refused: Vec<Value> = audit(web1).into_iter().filter(|r| r["result"] == "refused").collect();
    assert!(!refused.is_empty(), "no refusal in the audit log");
    for r in &refused {
        assert_eq!((&r["rpc"], &r["peer"]), (&Value::from("connect"), &Value::from("intruder")), "{r}");
        assert!(r["detail"].as_str().unwrap_or_default().contains("not issued by this fleet's CA"), "{r}");
    }
    let refused_after = val(&scrape(web1), "ferry_agent_refused_connections_total", &[("reason", "unknown_ca")]);
    assert_eq!(refused_after - refused_before, refused.len() as f64, "one count per refusal audited");
}

#[test]
fn health_turns_unhealthy_while_the_data_dir_is_read_only() {
    let fleet = fleet_or_skip!(1);
    let h = &fleet.hosts[0];
    let health = || -> (u16, Value) {
        let (status, body) = h.http_get("/health").unwrap_or_else(|e| panic!("GET /health: {e}"));
        (status, serde_json::from_str(&body).unwrap_or_else(|e| panic!("/health is not JSON ({e}): {body}")))
    };
    let (status, report) = health();
    assert_eq!(status, 200, "{report:#}");
    assert_eq!(report["status"], "healthy", "{report:#}");
    for c in ["grpc", "data_dir", "systemd", "audit"] {
        assert_eq!(report["components"][c]["status"], "ok", "{c}: {report:#}");
    }
    assert_eq!(h.http_get("/ready").map(|r| r.0), Ok(200));
    assert_eq!(h.http_get("/live").map(|r| r.0), Ok(200));

    h.data_dir_read_only(true);
    let (status, report) = health();
    h.data_dir_read_only(false);
    assert_eq!(status, 503, "{report:#}");
    assert_eq!(report["status"], "unhealthy", "{report:#}");
    let data_dir = &report["components"]["data_dir"];
    assert_eq!(data_dir["status"], "error", "{report:#}");
    assert!(
        data_dir["detail"].as_str().unwrap_or_default().contains("/var/lib/ferry is not writable")
            && data_dir["detail"].as_str().unwrap_or_default().contains("Read-only file system"),
        "{report:#}"
    );
    assert_eq!(report["components"]["systemd"]["status"], "ok", "only the data dir is at fault: {report:#}");
    // Still serving: ready, just not healthy.
    assert_eq!(h.http_get("/ready").map(|r| r.0), Ok(200));

    let (status, report) = health();
    assert_eq!((status, &report["status"]), (200, &Value::from("healthy")), "writable again: {report:#}");
}
