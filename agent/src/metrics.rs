//! The agent's Prometheus metrics: a fixed set of families ([`ALL`]), encoded in the text
//! exposition format by [`ferry_proto::prometheus`].
//!
//! Every family the agent exports is declared here once, with its help text, type and label
//! names; nothing else can be recorded, so label sets stay bounded (apps come from `agent.toml`,
//! outcomes and RPC names from fixed lists). Counters of each configured app start at 0 so that
//! `rate()` and `increase()` see the first event. Values that describe the host now (free disk,
//! releases kept) are set just before each scrape (by the HTTP endpoint).
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use ferry_proto::prometheus::{TextWriter, Type};

/// What a family is.
#[derive(Debug)]
pub enum Kind {
    Counter,
    Gauge,
    /// With these bucket upper bounds (ascending; `+Inf` is implied).
    Histogram(&'static [f64]),
}

/// One metric family.
#[derive(Debug)]
pub struct Def {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
}

const DURATION_BUCKETS: &[f64] = &[0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];

pub const BUILD_INFO: Def = Def {
    name: "ferry_agent_build_info",
    help: "Always 1; the agent's version is in the label.",
    kind: Kind::Gauge,
    labels: &["version"],
};
pub const START_TIME: Def = Def {
    name: "ferry_agent_start_time_seconds",
    help: "When the agent process started, in Unix seconds.",
    kind: Kind::Gauge,
    labels: &[],
};
pub const REQUESTS: Def = Def {
    name: "ferry_agent_requests_total",
    help: "gRPC requests received from coordinators, by RPC and result (ok or the gRPC code).",
    kind: Kind::Counter,
    labels: &["rpc", "result"],
};
pub const REFUSED: Def = Def {
    name: "ferry_agent_refused_connections_total",
    help: "Connections refused during the TLS handshake, by reason.",
    kind: Kind::Counter,
    labels: &["reason"],
};
pub const ACTIVATIONS: Def = Def {
    name: "ferry_agent_activations_total",
    help: "Activations of a release, by app and outcome (healthy, unchanged, rolled_back, failed, refused).",
    kind: Kind::Counter,
    labels: &["app", "outcome"],
};
pub const ROLLBACKS: Def = Def {
    name: "ferry_agent_rollbacks_total",
    help: "Switches back to an earlier release, by app and trigger (automatic: a failed activation; requested: a Rollback command).",
    kind: Kind::Counter,
    labels: &["app", "trigger"],
};
pub const PROBE_FAILURES: Def = Def {
    name: "ferry_agent_health_probe_failures_total",
    help: "Health probes that failed (after their retries) during activations and rollbacks, by app.",
    kind: Kind::Counter,
    labels: &["app"],
};
pub const RECEIVED_BYTES: Def = Def {
    name: "ferry_agent_received_bytes_total",
    help: "Release content received in uploads (compressed chunks and deltas), by app.",
    kind: Kind::Counter,
    labels: &["app"],
};
pub const STAGE_SECONDS: Def = Def {
    name: "ferry_agent_stage_duration_seconds",
    help: "Time from Prepare to a committed release (transfer, build and verification), by app.",
    kind: Kind::Histogram(DURATION_BUCKETS),
    labels: &["app"],
};
pub const ACTIVATE_SECONDS: Def = Def {
    name: "ferry_agent_activate_duration_seconds",
    help: "Duration of activations and rollbacks (hooks, swap, restart, probes, any rollback), by app and outcome.",
    kind: Kind::Histogram(DURATION_BUCKETS),
    labels: &["app", "outcome"],
};
pub const IN_PROGRESS: Def = Def {
    name: "ferry_agent_activations_in_progress",
    help: "Activations and rollbacks running or waiting for their app's lock.",
    kind: Kind::Gauge,
    labels: &[],
};
pub const RELEASES_KEPT: Def = Def {
    name: "ferry_agent_releases_kept",
    help: "Releases kept on disk, by app.",
    kind: Kind::Gauge,
    labels: &["app"],
};
pub const DATA_DIR_FREE: Def = Def {
    name: "ferry_agent_data_dir_free_bytes",
    help: "Free bytes of the filesystem holding the data dir.",
    kind: Kind::Gauge,
    labels: &[],
};
pub const DATA_DIR_SIZE: Def = Def {
    name: "ferry_agent_data_dir_size_bytes",
    help: "Size in bytes of the filesystem holding the data dir.",
    kind: Kind::Gauge,
    labels: &[],
};
pub const AUDIT_FAILURES: Def = Def {
    name: "ferry_agent_audit_write_failures_total",
    help: "Audit log lines that could not be written (see the agent's journal).",
    kind: Kind::Counter,
    labels: &[],
};

/// Every family, in the order `/metrics` shows them.
pub const ALL: &[&Def] = &[
    &BUILD_INFO,
    &START_TIME,
    &REQUESTS,
    &REFUSED,
    &ACTIVATIONS,
    &ROLLBACKS,
    &PROBE_FAILURES,
    &RECEIVED_BYTES,
    &STAGE_SECONDS,
    &ACTIVATE_SECONDS,
    &IN_PROGRESS,
    &RELEASES_KEPT,
    &DATA_DIR_FREE,
    &DATA_DIR_SIZE,
    &AUDIT_FAILURES,
];

/// Activation outcomes, as the `outcome` label spells them.
pub const OUTCOMES: &[&str] = &["healthy", "unchanged", "rolled_back", "failed", "refused"];

#[derive(Debug, Clone)]
enum Sample {
    Value(f64),
    /// Observations per bucket (not cumulative), in all, and their sum.
    Histogram {
        counts: Vec<u64>,
        sum: f64,
        count: u64,
    },
}

/// The agent's metric values. Cheap to update from any task (one short lock).
#[derive(Debug, Default)]
pub struct Metrics {
    families: Mutex<HashMap<&'static str, BTreeMap<Vec<String>, Sample>>>,
}

impl Metrics {
    /// Metrics with the counters of `apps` at 0 and the build info set.
    pub fn new<'a>(apps: impl IntoIterator<Item = &'a str>) -> Metrics {
        let m = Metrics::default();
        m.set(&BUILD_INFO, &[env!("CARGO_PKG_VERSION")], 1.0);
        let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        m.set(&START_TIME, &[], started.as_secs_f64());
        m.add(&AUDIT_FAILURES, &[], 0.0);
        m.set(&IN_PROGRESS, &[], 0.0);
        for app in apps {
            for outcome in OUTCOMES {
                m.add(&ACTIVATIONS, &[app, outcome], 0.0);
            }
            for trigger in ["automatic", "requested"] {
                m.add(&ROLLBACKS, &[app, trigger], 0.0);
            }
            m.add(&PROBE_FAILURES, &[app], 0.0);
            m.add(&RECEIVED_BYTES, &[app], 0.0);
        }
        m
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<&'static str, BTreeMap<Vec<String>, Sample>>) -> T) -> T {
        // A poisoned lock only means a panic elsewhere while updating a number: keep going.
        let mut families = self.families.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut families)
    }

    fn key(def: &Def, labels: &[&str]) -> Vec<String> {
        debug_assert_eq!(def.labels.len(), labels.len(), "{}: label values do not match its label names", def.name);
        labels.iter().map(|l| l.to_string()).collect()
    }

    /// Adds 1 to a counter.
    pub fn inc(&self, def: &'static Def, labels: &[&str]) {
        self.add(def, labels, 1.0)
    }

    /// Adds `v` to a counter (or gauge).
    pub fn add(&self, def: &'static Def, labels: &[&str], v: f64) {
        let key = Self::key(def, labels);
        self.with(|f| {
            let e = f.entry(def.name).or_default().entry(key).or_insert(Sample::Value(0.0));
            if let Sample::Value(x) = e {
                *x += v;
            }
        })
    }

    /// Sets a gauge.
    pub fn set(&self, def: &'static Def, labels: &[&str], v: f64) {
        let key = Self::key(def, labels);
        self.with(|f| {
            f.entry(def.name).or_default().insert(key, Sample::Value(v));
        })
    }

    /// Records one observation in a histogram.
    pub fn observe(&self, def: &'static Def, labels: &[&str], v: f64) {
        let Kind::Histogram(bounds) = def.kind else {
            debug_assert!(false, "{} is not a histogram", def.name);
            return;
        };
        let key = Self::key(def, labels);
        self.with(|f| {
            let e = f.entry(def.name).or_default().entry(key).or_insert_with(|| Sample::Histogram {
                counts: vec![0; bounds.len()],
                sum: 0.0,
                count: 0,
            });
            if let Sample::Histogram { counts, sum, count } = e {
                if let Some(i) = bounds.iter().position(|b| v <= *b) {
                    counts[i] += 1;
                }
                *sum += v;
                *count += 1;
            }
        })
    }

    /// The current value of a counter or gauge (tests, and the health check).
    pub fn value(&self, def: &'static Def, labels: &[&str]) -> Option<f64> {
        let key = Self::key(def, labels);
        self.with(|f| match f.get(def.name)?.get(&key)? {
            Sample::Value(v) => Some(*v),
            Sample::Histogram { .. } => None,
        })
    }

    /// Everything, in the Prometheus text exposition format.
    pub fn encode(&self) -> String {
        let families = self.with(|f| f.clone());
        let mut w = TextWriter::new();
        for def in ALL {
            let kind = match def.kind {
                Kind::Counter => Type::Counter,
                Kind::Gauge => Type::Gauge,
                Kind::Histogram(_) => Type::Histogram,
            };
            w.family(def.name, def.help, kind);
            for (values, sample) in families.get(def.name).into_iter().flatten() {
                let labels: Vec<(&str, &str)> =
                    def.labels.iter().copied().zip(values.iter().map(String::as_str)).collect();
                match (sample, &def.kind) {
                    (Sample::Value(v), _) => w.sample(def.name, &labels, *v),
                    (Sample::Histogram { counts, sum, count }, Kind::Histogram(bounds)) => {
                        w.histogram(def.name, &labels, bounds, counts, *sum, *count)
                    }
                    (Sample::Histogram { .. }, _) => {}
                }
            }
        }
        w.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_lines(text: &str) -> Vec<&str> {
        text.lines().filter(|l| !l.starts_with('#')).collect()
    }

    #[test]
    fn counters_start_at_zero_and_count() {
        let m = Metrics::new(["web"]);
        let text = m.encode();
        assert!(text.contains("ferry_agent_activations_total{app=\"web\",outcome=\"healthy\"} 0\n"), "{text}");
        assert!(text.contains("ferry_agent_activations_in_progress 0\n"), "{text}");
        m.inc(&ACTIVATIONS, &["web", "healthy"]);
        m.add(&RECEIVED_BYTES, &["web"], 1234.0);
        let text = m.encode();
        assert!(text.contains("ferry_agent_activations_total{app=\"web\",outcome=\"healthy\"} 1\n"), "{text}");
        assert!(text.contains("ferry_agent_received_bytes_total{app=\"web\"} 1234\n"), "{text}");
        assert!(text.contains(&format!("ferry_agent_build_info{{version=\"{}\"}} 1\n", env!("CARGO_PKG_VERSION"))));
    }

    #[test]
    fn every_family_has_help_and_type_and_valid_names() {
        let text = Metrics::new(["web"]).encode();
        for def in ALL {
            assert!(text.contains(&format!("# HELP {} ", def.name)), "{}", def.name);
            assert!(text.contains(&format!("# TYPE {} ", def.name)), "{}", def.name);
            assert!(def.name.starts_with("ferry_agent_"), "{}", def.name);
            assert!(def.name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
            if matches!(def.kind, Kind::Counter) {
                assert!(def.name.ends_with("_total"), "counter {} must end in _total", def.name);
            }
        }
        let mut names: Vec<_> = ALL.iter().map(|d| d.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ALL.len(), "duplicate family");
    }

    #[test]
    fn histograms_are_cumulative_with_sum_and_count() {
        let m = Metrics::default();
        for v in [0.05, 0.3, 7.0, 1000.0] {
            m.observe(&ACTIVATE_SECONDS, &["web", "healthy"], v);
        }
        let text = m.encode();
        let lines = sample_lines(&text);
        let get = |needle: &str| {
            lines
                .iter()
                .find(|l| l.starts_with(needle))
                .unwrap_or_else(|| panic!("no {needle} in\n{text}"))
                .rsplit(' ')
                .next()
                .unwrap_or_default()
                .to_string()
        };
        let b = "ferry_agent_activate_duration_seconds_bucket{app=\"web\",outcome=\"healthy\",le=";
        assert_eq!(get(&format!("{b}\"0.1\"}}")), "1");
        assert_eq!(get(&format!("{b}\"0.5\"}}")), "2");
        assert_eq!(get(&format!("{b}\"10\"}}")), "3");
        assert_eq!(get(&format!("{b}\"600\"}}")), "3");
        assert_eq!(get(&format!("{b}\"+Inf\"}}")), "4");
        assert_eq!(get("ferry_agent_activate_duration_seconds_count{"), "4");
        assert_eq!(get("ferry_agent_activate_duration_seconds_sum{"), "1007.35");
    }

    #[test]
    fn label_values_and_numbers_are_escaped() {
        let m = Metrics::default();
        m.inc(&REFUSED, &["a \"quoted\"\\ reason\nwith a newline"]);
        m.set(&DATA_DIR_FREE, &[], f64::INFINITY);
        let text = m.encode();
        assert!(
            text.contains(r#"ferry_agent_refused_connections_total{reason="a \"quoted\"\\ reason\nwith a newline"} 1"#),
            "{text}"
        );
        assert!(text.contains("ferry_agent_data_dir_free_bytes +Inf\n"), "{text}");
    }
}
