//! Rollouts judged from outside the hosts, on real systemd hosts: metric gates against a real
//! Prometheus scraping the demo app's request counters and latencies, webhook gates and
//! notifications against a real HTTP receiver, all in the coordinator's namespace.
use std::path::Path;

use ferry_tests::demo_app::{self, Variant};
use ferry_tests::fleet::{Fleet, skip_unless_ci};
use ferry_tests::fleet_or_skip;
use ferry_tests::signals::{Prometheus, Receiver, prometheus_bin};

fn text(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn json(o: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(o)))
}

/// Deploys `version` (variant) with `config`; the JSON report.
fn deploy(fleet: &Fleet, config: &Path, version: &str, variant: Variant) -> serde_json::Value {
    let dir = fleet.dir.join(format!("demo-{version}"));
    demo_app::write_release(&dir, version, variant).expect("write release");
    let out = fleet.deploy(config.to_str().unwrap_or_default(), &dir, version, true);
    let report = json(&out);
    eprintln!("deploy {version}: {}", report["status"]);
    report
}

/// (gate, batch, outcome) of every measurement in a report.
fn measured(report: &serde_json::Value) -> Vec<(String, u64, String)> {
    report["measurements"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| {
                    let s = |k: &str| m[k].as_str().unwrap_or_default().to_string();
                    (s("gate"), m["batch"].as_u64().unwrap_or(0), s("outcome"))
                })
                .collect()
        })
        .unwrap_or_default()
}

const ROLLING: &str = "strategy = \"rolling\"\nbatch = 1\nauto_rollback = true\n";

/// The error ratio of the batch's hosts over the last 3 s.
const ERRORS: &str = "sum(rate(demo_requests_total{code=\"500\",host=~\"{batch_hosts}\"}[3s])) / sum(rate(demo_requests_total{host=~\"{batch_hosts}\"}[3s]))";

fn gate(name: &str, query: &str, condition: &str, on_empty: &str, extra: &str) -> String {
    format!(
        "\n[[environments.test.gates]]\nname = \"{name}\"\nprometheus = \"http://127.0.0.1:9090\"\nquery = '{query}'\ncondition = \"{condition}\"\non_empty = \"{on_empty}\"\ninterval = \"1s\"\ntimeout = \"1s\"\n{extra}"
    )
}

#[test]
fn metric_gates_halt_on_errors_and_latency_and_on_empty_decides_what_nothing_means() {
    let prometheus = match prometheus_bin() {
        Ok(p) => p,
        Err(why) => return skip_unless_ci(&why, "the metric gate tests"),
    };
    let fleet = fleet_or_skip!(3);
    let prom = Prometheus::start(&fleet, &prometheus);
    let errors = fleet.fleet_toml_with(
        "errors.toml",
        &(ROLLING.to_string() + &gate("errors", ERRORS, "< 0.05", "fail", "bake = \"4s\"\n")),
    );

    // The first release, without gates (Prometheus has no history of the app yet).
    let plain = fleet.fleet_toml_with("plain.toml", ROLLING);
    assert_eq!(deploy(&fleet, &plain, "0", Variant::Healthy)["status"], "succeeded");
    prom.wait_scraped(&fleet);

    // A healthy release passes the error gate on every batch.
    let r = deploy(&fleet, &errors, "1", Variant::Healthy);
    assert_eq!(r["status"], "succeeded", "{r:#}");
    let m = measured(&r);
    assert_eq!(m.len(), 12, "4 measurements a batch, 3 batches: {m:?}");
    assert!(m.iter().all(|(g, _, o)| g == "errors" && o == "pass"), "{m:?}");

    // 10 % errors: the first batch fails the gate and every updated host is back on 1.
    let r = deploy(&fleet, &errors, "2", Variant::Errors(10));
    assert_eq!(r["status"], "rolled_back", "{r:#}");
    assert_eq!(fleet.versions(), ["1", "1", "1"]);
    let m = measured(&r);
    assert!(m.iter().all(|(_, batch, _)| *batch == 1), "only batch 1 was measured: {m:?}");
    assert_eq!(m.last().map(|x| x.2.as_str()), Some("fail"), "{m:?}");
    let failed = r["measurements"].as_array().and_then(|ms| ms.last()).cloned().unwrap_or_default();
    assert!(failed["value"].as_f64().is_some_and(|v| v >= 0.05), "{failed:#}");
    let statuses: Vec<&str> =
        r["hosts"].as_array().into_iter().flatten().filter_map(|h| h["status"].as_str()).collect();
    assert_eq!(statuses, ["rolled_back", "skipped", "skipped"], "{r:#}");
    let id = r["deployment_id"].as_str().unwrap_or_default().to_string();
    let out = fleet.ferry(&["history", "--config", &errors.to_string_lossy(), "--deployment", &id]);
    let shown = text(&out);
    assert!(shown.contains("measurements:") && shown.contains("errors batch 1  fail  "), "{shown}");
    assert!(shown.contains("metric gate errors failed: ") && shown.contains("web-1 rolled_back"), "{shown}");

    // Twice the latency of the hosts still on the old release fails the baseline gate…
    let latency = "sum(rate(demo_request_seconds_sum{host=~\"{HOSTS}\"}[3s])) / sum(rate(demo_request_seconds_count{host=~\"{HOSTS}\"}[3s]))";
    let baseline = fleet.fleet_toml_with(
        "baseline.toml",
        &(ROLLING.to_string()
            + &gate(
                "latency",
                &latency.replace("HOSTS", "batch_hosts"),
                "<= 1.5 * baseline",
                "fail",
                &format!("bake = \"4s\"\nbaseline_query = '{}'\n", latency.replace("HOSTS", "baseline_hosts")),
            )),
    );
    let r = deploy(&fleet, &baseline, "3", Variant::Slow(40));
    assert_eq!(r["status"], "rolled_back", "{r:#}");
    assert_eq!(fleet.versions(), ["1", "1", "1"]);
    let last = r["measurements"].as_array().and_then(|ms| ms.last()).cloned().unwrap_or_default();
    assert_eq!(last["outcome"], "fail", "{r:#}");
    let (value, base) = (last["value"].as_f64().unwrap_or(0.0), last["baseline"].as_f64().unwrap_or(0.0));
    assert!(base > 0.0 && value > 1.5 * base, "{last:#}");

    // …and a healthy release passes it; with every host updated there is nothing to compare with.
    // First the 3 s rate window forgets the slow release web-1 ran until its rollback: a
    // measurement that still saw it would judge that release, not this one.
    std::thread::sleep(std::time::Duration::from_secs(5));
    let r = deploy(&fleet, &baseline, "4", Variant::Healthy);
    assert_eq!(r["status"], "succeeded", "{r:#}");
    assert_eq!(fleet.versions(), ["4", "4", "4"]);
    let m = measured(&r);
    assert!(m.iter().filter(|x| x.1 < 3).all(|x| x.2 == "pass"), "{m:?}");
    assert!(m.iter().filter(|x| x.1 == 3).all(|x| x.2 == "skipped") && m.iter().any(|x| x.1 == 3), "{m:?}");

    // A query that returns nothing: what on_empty says, never a silent pass.
    let nothing = "sum(rate(demo_no_such_metric{host=~\"{batch_hosts}\"}[3s]))";
    let empty = |on_empty: &str, extra: &str| {
        fleet.fleet_toml_with(
            &format!("empty-{on_empty}.toml"),
            &(ROLLING.to_string() + &gate("nothing", nothing, "< 1", on_empty, &format!("bake = \"2s\"\n{extra}"))),
        )
    };
    let r = deploy(&fleet, &empty("fail", ""), "5", Variant::Healthy);
    assert_eq!(r["status"], "rolled_back", "{r:#}");
    assert_eq!(measured(&r), [("nothing".to_string(), 1, "fail".to_string())], "halted at the first measurement");
    assert_eq!(fleet.versions(), ["4", "4", "4"]);
    let r = deploy(&fleet, &empty("inconclusive", "max_inconclusive = 6\n"), "6", Variant::Healthy);
    assert_eq!(r["status"], "succeeded", "{r:#}");
    let m = measured(&r);
    assert!(m.len() == 6 && m.iter().all(|x| x.2 == "inconclusive"), "every one counted: {m:?}");
    let r = deploy(&fleet, &empty("inconclusive", "max_inconclusive = 1\n"), "7", Variant::Healthy);
    assert_eq!(r["status"], "rolled_back", "the second inconclusive of a batch halts: {r:#}");
    assert_eq!(measured(&r).len(), 2, "{r:#}");
    let r = deploy(&fleet, &empty("pass", ""), "8", Variant::Healthy);
    assert_eq!(r["status"], "succeeded", "{r:#}");
    assert!(measured(&r).iter().all(|x| x.2 == "pass"), "{r:#}");
    assert_eq!(fleet.versions(), ["8", "8", "8"]);

    // The registry keeps them with the deployment; the API-facing history shows the halt's reason.
    let out = fleet.ferry(&["history", "--config", &errors.to_string_lossy(), "--output", "json", "--limit", "20"]);
    let history = json(&out);
    let halted: Vec<String> = history
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["version"] == "2")
        .filter_map(|d| d["error"].as_str().map(str::to_string))
        .collect();
    assert!(halted.iter().any(|e| e.starts_with("metric gate errors failed: ")), "{halted:?}");
    drop(prom);
}

fn events(posts: &[(String, serde_json::Value)], path: &str) -> Vec<String> {
    posts
        .iter()
        .filter(|(p, _)| p == path)
        .map(|(_, b)| b["event"].as_str().or(b["point"].as_str()).unwrap_or_default().to_string())
        .collect()
}

#[test]
fn webhook_gates_halt_and_every_event_is_notified_once_in_order() {
    let fleet = fleet_or_skip!(2);
    let receiver = Receiver::start(&fleet, 18081);
    let config = fleet.fleet_toml_with(
        "webhooks.toml",
        &format!(
            "{ROLLING}\n[[environments.test.webhooks]]\nname = \"change-check\"\nurl = \"{gate}\"\nat = [\"before_activation\", \"after_batch\"]\ntimeout = \"2s\"\n\n\
             [[notify]]\nname = \"ops\"\nurl = \"{ops}\"\nevents = [\"started\", \"paused\", \"batch_done\", \"halted\", \"rolled_back\", \"succeeded\", \"failed\"]\n\n\
             [[notify]]\nname = \"chat\"\nurl = \"{chat}\"\nformat = \"slack\"\nevents = [\"succeeded\", \"rolled_back\"]\n\n\
             [[notify]]\nname = \"dead\"\nurl = \"http://127.0.0.1:18099/nobody\"\nevents = [\"started\", \"succeeded\"]\ntimeout = \"1s\"\n",
            gate = receiver.url("/gate"),
            ops = receiver.url("/ops"),
            chat = receiver.url("/chat"),
        ),
    );

    // Every gate passes: one call before activation, one after each batch; every event once.
    let r = deploy(&fleet, &config, "1", Variant::Healthy);
    assert_eq!(r["status"], "succeeded", "{r:#}");
    let posts = receiver.posts();
    assert_eq!(events(&posts, "/gate"), ["before_activation", "after_batch", "after_batch"], "{posts:?}");
    assert_eq!(events(&posts, "/ops"), ["started", "batch_done", "batch_done", "succeeded"], "{posts:?}");
    let ops: Vec<&serde_json::Value> = posts.iter().filter(|(p, _)| p == "/ops").map(|(_, b)| b).collect();
    assert!(ops.iter().all(|b| b["deployment_id"] == r["deployment_id"] && b["version"] == "1"), "{ops:?}");
    assert_eq!(ops[3]["hosts"][1]["state"], "healthy", "{:#}", ops[3]);
    let chat: Vec<&serde_json::Value> = posts.iter().filter(|(p, _)| p == "/chat").map(|(_, b)| b).collect();
    assert_eq!(chat.len(), 1, "{posts:?}");
    let line = chat[0]["text"].as_str().unwrap_or_default();
    assert!(line.contains("web 1 to test: succeeded") && line.contains("web-1 healthy"), "{line}");
    // The dead target never held the rollout up, and its failure is on the record.
    let db = rusqlite::Connection::open(fleet.dir.join("registry.db")).expect("registry");
    let id = r["deployment_id"].as_str().unwrap_or_default().to_string();
    let failed: Vec<String> = db
        .prepare("SELECT message FROM events WHERE kind = 'notify_failed' AND deployment_id = ?1 ORDER BY id")
        .and_then(|mut st| st.query_map([&id], |r| r.get(0))?.collect())
        .expect("events");
    assert!(!failed.is_empty() && failed.iter().all(|m| m.contains("to dead")), "{failed:?}");

    // A webhook refusing before activation: nothing is touched.
    receiver.clear();
    receiver.answer_at("before_activation", 500);
    let r = deploy(&fleet, &config, "2", Variant::Healthy);
    assert_eq!(r["status"], "rolled_back", "auto_rollback, with nothing to send back: {r:#}");
    assert!(r["hosts"].as_array().into_iter().flatten().all(|h| h["status"] == "skipped"), "{r:#}");
    assert_eq!(fleet.versions(), ["1", "1"]);
    assert_eq!(events(&receiver.posts(), "/ops"), ["started", "halted", "rolled_back"]);

    // A webhook refusing after the first batch: halted, and that host rolled back.
    receiver.clear();
    receiver.answer_at("before_activation", 200);
    receiver.answer_at("after_batch", 503);
    let r = deploy(&fleet, &config, "3", Variant::Healthy);
    assert_eq!(r["status"], "rolled_back", "{r:#}");
    assert_eq!(fleet.versions(), ["1", "1"]);
    let posts = receiver.posts();
    assert_eq!(events(&posts, "/gate"), ["before_activation", "after_batch"], "{posts:?}");
    assert_eq!(events(&posts, "/ops"), ["started", "halted", "rolled_back"], "{posts:?}");
    let halted = posts.iter().find(|(p, b)| p == "/ops" && b["event"] == "halted").map(|(_, b)| b.clone());
    let reason = halted.as_ref().and_then(|b| b["reason"].as_str()).unwrap_or_default().to_string();
    assert!(reason.contains("webhook gate change-check") && reason.contains("answered 503"), "{reason}");
}
