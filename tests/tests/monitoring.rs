//! The monitoring files operators install (`packaging/monitoring/`): the Prometheus alert rules
//! and the Grafana dashboard parse, use only metrics ferry exports (and every family ferry
//! exports is shown or alerted on somewhere), the alerts the issue asks for exist, and promtool
//! accepts the rules and passes their unit tests.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_tests::fleet::{Unsupported, skip_unless_ci, text_of};
use serde_json::Value;

fn monitoring(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/monitoring").join(file)
}

/// Every metric name a query may use: the families ferry exports, with a histogram's series.
fn exported() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let histograms = ferry_agent::metrics::ALL
        .iter()
        .filter(|d| matches!(d.kind, ferry_agent::metrics::Kind::Histogram(_)))
        .map(|d| d.name)
        .chain(["ferry_deployment_duration_seconds"]);
    for h in histograms {
        for suffix in ["_bucket", "_sum", "_count"] {
            names.insert(format!("{h}{suffix}"));
        }
    }
    names.extend(ferry_agent::metrics::ALL.iter().map(|d| d.name.to_string()));
    names.extend(ferry_coordinator::metrics::NAMES.iter().map(|n| n.to_string()));
    names
}

/// The `ferry_…` metric names a PromQL expression uses.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("ferry_") {
        let preceded_by_word = rest[..i].chars().last().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        if !preceded_by_word {
            names.push(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    names
}

/// Every string under a key named `key`, anywhere in `v`.
fn strings_under(v: &Value, key: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match x {
                    Value::String(s) if k == key => out.push(s.clone()),
                    _ => strings_under(x, key, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| strings_under(x, key, out)),
        _ => {}
    }
}

/// The alert rules as JSON, read by a real YAML parser (python3-yaml).
fn alert_rules() -> Value {
    let path = monitoring("ferry-alerts.yml");
    let out = Command::new("python3")
        .args(["-c", "import sys, json, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)"])
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("python3: {e}"));
    assert!(
        out.status.success(),
        "{} is not valid YAML (or python3-yaml is missing: scripts/deps.sh): {}",
        path.display(),
        text_of(&out)
    );
    serde_json::from_slice(&out.stdout).expect("JSON from python")
}

fn dashboard() -> Value {
    let path = monitoring("ferry-dashboard.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

#[test]
fn alert_rules_and_dashboard_use_only_exported_metrics_and_cover_them_all() {
    let exported = exported();
    let rules = alert_rules();
    let mut alerts = Vec::new();
    let mut used = BTreeSet::new();
    for group in rules["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let name = rule["alert"].as_str().expect("every rule is an alert");
            let expr = rule["expr"].as_str().unwrap_or_else(|| panic!("{name}: no expr"));
            for m in metric_names(expr) {
                assert!(exported.contains(&m), "alert {name} uses {m}, which ferry does not export");
                used.insert(m);
            }
            assert!(rule["labels"]["severity"].is_string(), "{name}: no severity");
            assert!(rule["annotations"]["summary"].is_string(), "{name}: no summary");
            alerts.push(name.to_string());
        }
    }
    for required in ["FerryAgentDown", "FerryHighRollbackRate", "FerryDeploymentStuck"] {
        assert!(alerts.iter().any(|a| a == required), "no {required} alert in {alerts:?}");
    }

    let dash = dashboard();
    for key in ["uid", "title"] {
        assert!(dash[key].is_string(), "the dashboard has no {key}");
    }
    let mut exprs = Vec::new();
    strings_under(&dash["panels"], "expr", &mut exprs);
    assert!(exprs.len() >= 20, "{} queries", exprs.len());
    let mut vars = Vec::new();
    strings_under(&dash["templating"], "definition", &mut vars);
    for expr in exprs.iter().chain(&vars) {
        for m in metric_names(expr) {
            assert!(exported.contains(&m), "the dashboard uses {m}, which ferry does not export: {expr}");
            used.insert(m);
        }
    }
    // Every family is on the dashboard or behind an alert (a histogram by any of its series).
    for family in
        ferry_agent::metrics::ALL.iter().map(|d| d.name).chain(ferry_coordinator::metrics::NAMES.iter().copied())
    {
        assert!(
            used.iter().any(|u| u == family || u.starts_with(&format!("{family}_"))),
            "{family} is neither shown nor alerted on"
        );
    }
}

/// README.md's Monitoring section names exactly the metrics ferry exports (docs and code agree).
#[test]
fn readme_lists_every_exported_family_and_no_other() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).expect("README");
    let start = readme.find("## Monitoring and audit").expect("README has a Monitoring and audit section");
    let section = &readme[start..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    let exported = exported();
    let named: BTreeSet<String> = metric_names(section).into_iter().collect();
    for n in &named {
        assert!(exported.contains(n), "README.md names {n}, which ferry does not export");
    }
    for family in
        ferry_agent::metrics::ALL.iter().map(|d| d.name).chain(ferry_coordinator::metrics::NAMES.iter().copied())
    {
        assert!(named.contains(family), "README.md does not mention {family}");
    }
}

#[test]
fn metric_names_are_found_in_expressions() {
    assert_eq!(
        metric_names("sum by (app) (increase(ferry_agent_rollbacks_total{trigger=\"a\"}[1h])) / my_ferry_x"),
        ["ferry_agent_rollbacks_total"]
    );
}

fn promtool() -> Result<PathBuf, Unsupported> {
    let cached = Path::new("/var/cache/ferry-test/prometheus/usr/bin/promtool");
    if cached.is_file() {
        return Ok(cached.to_path_buf());
    }
    ferry_tests::fleet::require_tools(&["promtool"]).map(|()| PathBuf::from("promtool"))
}

#[test]
fn promtool_accepts_the_rules_and_their_unit_tests_pass() {
    let promtool = match promtool() {
        Ok(p) => p,
        Err(why) => {
            return skip_unless_ci(&why, "the promtool check of the alert rules (scripts/deps.sh --test fetches it)");
        }
    };
    let dir = monitoring("");
    for args in [["check", "rules", "ferry-alerts.yml"], ["test", "rules", "ferry-alerts.test.yml"]] {
        let out = Command::new(&promtool).args(args).current_dir(&dir).output().expect("run promtool");
        assert!(out.status.success(), "promtool {}: {}", args.join(" "), text_of(&out));
        assert!(text_of(&out).contains("SUCCESS"), "{}", text_of(&out));
    }
}
