//! `ferry --metrics-file PATH`: the deployments of one environment as Prometheus metrics, in a
//! text file for node_exporter's textfile collector or for a Pushgateway (`curl --data-binary
//! @PATH http://pushgateway:9091/metrics/job/ferry/environment/ENV`).
//!
//! The file is a snapshot of what the registry records for the environment (so its counters keep
//! counting across runs, and a run killed half-way leaves a consistent file behind), plus the
//! state of the `ferry` run that wrote it. It is written when a deploy, rollback, resume or
//! promote starts (`ferry_run_in_progress` 1: a coordinator that dies there leaves that behind,
//! which is how "stuck past its deadline" is noticed) and again when it ends. Written atomically
//! (temp file, fsync, rename, fsync the directory): a scraper never reads half a file. Every
//! series carries `environment`; give each environment its own file (the collector refuses the
//! same series from two files).
use std::path::Path;

use ferry_proto::prometheus::{TextWriter, Type, bucket_counts};

use crate::registry::{DeploymentRow, Registry};
use crate::state::{DeploymentKind, DeploymentStatus};

/// Deployment duration buckets, in seconds.
const DURATION_BUCKETS: &[f64] = &[10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0];

/// Every metric name the file can hold (histograms by their base name), for docs and checks.
pub const NAMES: &[&str] = &[
    "ferry_deployments_total",
    "ferry_deployment_duration_seconds",
    "ferry_deployment_hosts_failed_total",
    "ferry_deployment_sent_bytes_total",
    "ferry_deployment_last_finished_timestamp_seconds",
    "ferry_deployment_last_info",
    "ferry_deployment_unfinished_started_timestamp_seconds",
    "ferry_run_in_progress",
    "ferry_run_started_timestamp_seconds",
    "ferry_run_finished_timestamp_seconds",
    "ferry_run_exit_code",
];

/// A number of a deployment row.
type Field = fn(&DeploymentRow) -> i64;

/// The final statuses, in the state table's order.
fn finished_statuses() -> impl Iterator<Item = DeploymentStatus> {
    DeploymentStatus::ALL.into_iter().filter(|s| s.is_finished())
}

/// The `ferry` run writing the file.
#[derive(Debug, Clone)]
pub struct Run {
    /// `deploy`, `rollback`, `resume` or `promote`.
    pub command: &'static str,
    pub environment: String,
    /// Unix seconds.
    pub started: f64,
    /// Unix seconds and exit code, once it ended.
    pub ended: Option<(f64, u8)>,
}

/// Unix seconds now.
pub fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

fn secs(ms: i64) -> f64 {
    ms as f64 / 1000.0
}

/// The file's text: the environment's registry record and the run.
pub fn render(rows: &[DeploymentRow], run: &Run) -> String {
    let env = run.environment.as_str();
    let rows: Vec<&DeploymentRow> = rows.iter().filter(|d| d.environment == env).collect();
    let finished: Vec<&&DeploymentRow> = rows.iter().filter(|d| d.status.is_finished()).collect();
    let mut w = TextWriter::new();

    w.family("ferry_deployments_total", "Finished deployments and rollbacks, by kind and final status.", Type::Counter);
    for kind in DeploymentKind::ALL {
        for status in finished_statuses() {
            let n = finished.iter().filter(|d| d.kind == kind && d.status == status).count();
            let labels = [("environment", env), ("kind", kind.as_str()), ("status", status.as_str())];
            w.sample("ferry_deployments_total", &labels, n as f64);
        }
    }

    w.family(
        "ferry_deployment_duration_seconds",
        "Duration of finished deployments and rollbacks, from start to final status.",
        Type::Histogram,
    );
    for kind in DeploymentKind::ALL {
        let durations = finished
            .iter()
            .filter(|d| d.kind == kind)
            .filter_map(|d| d.finished_ms.map(|f| secs(f - d.started_ms).max(0.0)));
        let (counts, sum, count) = bucket_counts(DURATION_BUCKETS, durations);
        w.histogram(
            "ferry_deployment_duration_seconds",
            &[("environment", env), ("kind", kind.as_str())],
            DURATION_BUCKETS,
            &counts,
            sum,
            count,
        );
    }

    let sums: [(&str, &str, Field); 2] = [
        ("ferry_deployment_hosts_failed_total", "Hosts that failed in finished deployments and rollbacks.", |d| {
            d.hosts_failed
        }),
        (
            "ferry_deployment_sent_bytes_total",
            "Release content sent to hosts by finished deployments (compressed chunks and deltas).",
            |d| d.bytes_sent,
        ),
    ];
    for (name, help, field) in sums {
        w.family(name, help, Type::Counter);
        let total: i64 = finished.iter().map(|d| field(d).max(0)).sum();
        w.sample(name, &[("environment", env)], total as f64);
    }

    w.family(
        "ferry_deployment_last_finished_timestamp_seconds",
        "When the last deployment or rollback of each kind and final status finished, in Unix seconds.",
        Type::Gauge,
    );
    for kind in DeploymentKind::ALL {
        for status in finished_statuses() {
            let last =
                finished.iter().filter(|d| d.kind == kind && d.status == status).filter_map(|d| d.finished_ms).max();
            if let Some(ms) = last {
                w.sample(
                    "ferry_deployment_last_finished_timestamp_seconds",
                    &[("environment", env), ("kind", kind.as_str()), ("status", status.as_str())],
                    secs(ms),
                );
            }
        }
    }

    w.family(
        "ferry_deployment_last_info",
        "Always 1: the newest deployment (kind deploy) of the environment, its version and status.",
        Type::Gauge,
    );
    // history() is newest first.
    if let Some(last) = rows.iter().find(|d| d.kind == DeploymentKind::Deploy) {
        w.sample(
            "ferry_deployment_last_info",
            &[("environment", env), ("version", &last.version), ("status", last.status.as_str())],
            1.0,
        );
    }

    w.family(
        "ferry_deployment_unfinished_started_timestamp_seconds",
        "When the oldest deployment still pending, running or paused (at a canary step) started, by status, in Unix seconds.",
        Type::Gauge,
    );
    for status in DeploymentStatus::ALL.into_iter().filter(|s| !s.is_finished()) {
        if let Some(ms) = rows.iter().filter(|d| d.status == status).map(|d| d.started_ms).min() {
            w.sample(
                "ferry_deployment_unfinished_started_timestamp_seconds",
                &[("environment", env), ("status", status.as_str())],
                secs(ms),
            );
        }
    }

    let labels = [("environment", env), ("command", run.command)];
    w.family(
        "ferry_run_in_progress",
        "1 while the ferry run that wrote this file is running, 0 once it ended.",
        Type::Gauge,
    );
    w.sample("ferry_run_in_progress", &labels, if run.ended.is_some() { 0.0 } else { 1.0 });
    w.family(
        "ferry_run_started_timestamp_seconds",
        "When the ferry run that wrote this file started, in Unix seconds.",
        Type::Gauge,
    );
    w.sample("ferry_run_started_timestamp_seconds", &labels, run.started);
    if let Some((at, code)) = run.ended {
        w.family("ferry_run_finished_timestamp_seconds", "When that run ended, in Unix seconds.", Type::Gauge);
        w.sample("ferry_run_finished_timestamp_seconds", &labels, at);
        w.family(
            "ferry_run_exit_code",
            "That run's exit code: 0 success, 1 deployment failed, 2 usage or configuration, 3 a host unreachable.",
            Type::Gauge,
        );
        w.sample("ferry_run_exit_code", &labels, f64::from(code));
    }
    w.finish()
}

/// Reads the environment's record from the registry and writes the file at `path` atomically.
pub fn write(path: &Path, registry: &dyn Registry, run: &Run) -> anyhow::Result<()> {
    let rows = registry.history(Some(&run.environment), None, usize::MAX >> 1)?;
    let text = render(&rows, run);
    ferry_proto::durable::write(path, text.as_bytes(), 0o644, ferry_proto::durable::Existing::Replace)
        .map_err(|e| anyhow::anyhow!("--metrics-file {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::prometheus::{parse, value};

    fn row(id: &str, env: &str, kind: &str, status: &str, started: i64, finished: Option<i64>) -> DeploymentRow {
        DeploymentRow {
            id: id.into(),
            kind: DeploymentKind::parse(kind).expect("kind"),
            environment: env.into(),
            version: format!("v-{id}"),
            release_id: String::new(),
            artifact: String::new(),
            manifest_hash: String::new(),
            strategy: String::new(),
            status: crate::state::DeploymentStatus::parse(status).expect("status"),
            started_ms: started,
            finished_ms: finished,
            error: None,
            bytes_sent: 1000,
            hosts_failed: if status == "succeeded" { 0 } else { 2 },
            requested_by: None,
            promoted_from: None,
            app: "web".into(),
        }
    }

    #[test]
    fn counts_durations_and_the_run_of_one_environment() {
        // Newest first, as the registry lists them.
        let rows = vec![
            row("d5", "prod", "deploy", "running", 900_000, None),
            row("d4", "prod", "rollback", "succeeded", 500_000, Some(505_000)),
            row("d3", "prod", "deploy", "rolled_back", 300_000, Some(400_000)),
            row("d2", "staging", "deploy", "succeeded", 200_000, Some(210_000)),
            row("d1", "prod", "deploy", "succeeded", 100_000, Some(145_000)),
        ];
        let run = Run { command: "deploy", environment: "prod".into(), started: 900.0, ended: None };
        let text = render(&rows, &run);
        let s = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let get = |name: &str, labels: &[(&str, &str)]| value(&s, name, labels);
        let d = [("environment", "prod"), ("kind", "deploy")];
        assert_eq!(get("ferry_deployments_total", &[d[0], d[1], ("status", "succeeded")]), Some(1.0));
        assert_eq!(get("ferry_deployments_total", &[d[0], d[1], ("status", "rolled_back")]), Some(1.0));
        assert_eq!(get("ferry_deployments_total", &[d[0], ("kind", "rollback"), ("status", "succeeded")]), Some(1.0));
        assert_eq!(get("ferry_deployments_total", &[d[0], d[1], ("status", "failed")]), Some(0.0));
        // 45 s and 100 s.
        assert_eq!(get("ferry_deployment_duration_seconds_bucket", &[d[0], d[1], ("le", "60")]), Some(1.0));
        assert_eq!(get("ferry_deployment_duration_seconds_bucket", &[d[0], d[1], ("le", "120")]), Some(2.0));
        assert_eq!(get("ferry_deployment_duration_seconds_sum", &d), Some(145.0));
        assert_eq!(get("ferry_deployment_hosts_failed_total", &[d[0]]), Some(2.0));
        assert_eq!(get("ferry_deployment_sent_bytes_total", &[d[0]]), Some(3000.0));
        assert_eq!(get("ferry_deployment_last_info", &[d[0], ("version", "v-d5"), ("status", "running")]), Some(1.0));
        assert_eq!(get("ferry_deployment_unfinished_started_timestamp_seconds", &[("status", "running")]), Some(900.0));
        assert_eq!(get("ferry_run_in_progress", &[("command", "deploy")]), Some(1.0));
        assert_eq!(get("ferry_run_exit_code", &[]), None);
        assert!(s.iter().all(|x| x.labels.get("environment").map(String::as_str) == Some("prod")), "{text}");
        assert!(s.iter().all(|x| NAMES.iter().any(|n| x.name.starts_with(n))), "{text}");

        let ended = Run { ended: Some((950.0, 1)), ..run };
        let s = parse(&render(&rows, &ended)).expect("parses");
        assert_eq!(value(&s, "ferry_run_in_progress", &[]), Some(0.0));
        assert_eq!(value(&s, "ferry_run_exit_code", &[]), Some(1.0));
        assert_eq!(value(&s, "ferry_run_finished_timestamp_seconds", &[]), Some(950.0));
    }

    #[test]
    fn the_file_is_replaced_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let registry = crate::registry::sqlite::Sqlite::open(&dir.path().join("registry.db")).expect("registry");
        let path = dir.path().join("ferry-prod.prom");
        std::fs::write(&path, "stale").expect("write");
        let run = Run { command: "rollback", environment: "prod".into(), started: now(), ended: Some((now(), 0)) };
        write(&path, &registry, &run).expect("write");
        let text = std::fs::read_to_string(&path).expect("read");
        let s = parse(&text).expect("parses");
        assert_eq!(value(&s, "ferry_deployments_total", &[("status", "succeeded")]), Some(0.0));
        assert_eq!(value(&s, "ferry_run_exit_code", &[("command", "rollback")]), Some(0.0));
        let names: Vec<_> = std::fs::read_dir(dir.path()).expect("ls").flatten().map(|e| e.file_name()).collect();
        assert!(!names.iter().any(|n| n.to_string_lossy().contains(".tmp-")), "{names:?}");
        let err = write(&dir.path().join("missing/dir/f.prom"), &registry, &run).expect_err("no such dir");
        assert!(err.to_string().contains("missing/dir/f.prom"), "{err}");
    }
}
