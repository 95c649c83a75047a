//! Rollout gates from outside the hosts: metric gates (PromQL queries against a Prometheus
//! server, judged after each batch and during canary pauses) and webhook gates (an HTTP call
//! that must answer 2xx at chosen points).
//!
//! A metric gate's measurement is one instant query (and, for a baseline gate, a second one at
//! the same instant over the hosts still on the old release). Its outcome is one of
//! [`Outcome`]; an empty or NaN answer is what `on_empty` says (no silent default), an error
//! (Prometheus unreachable, a bad query) is inconclusive. More than `max_failures` failed or more
//! than `max_inconclusive` inconclusive measurements in one batch's bake halt the rollout at
//! once. A baseline gate with no host left on the old release has nothing to compare with: its
//! measurement is `skipped` (recorded, not counted).
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::http::{Roots, query_value};
use ferry_proto::config_file::{self, Problem};

/// A metric gate of an environment (`[[environments.NAME.gates]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricGate {
    /// Names the gate in measurements and messages.
    pub name: String,
    /// The Prometheus server: `http://host:9090` (or https://).
    pub prometheus: String,
    /// A CA file for an https:// Prometheus (default: the system's roots).
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// PromQL; placeholders: {batch_hosts}, {updated_hosts}, {baseline_hosts} (a regex of host
    /// names, for `=~`), the same with `_addresses`, {version}, {env}, {app}.
    pub query: String,
    /// Baseline gates: the query over the hosts still on the old release (`{baseline_hosts}`),
    /// evaluated at the same instant; `condition` then names `baseline`.
    #[serde(default)]
    pub baseline_query: Option<String>,
    /// `< 0.05`, `>= 100`; with a baseline query `<= 1.5 * baseline`.
    pub condition: String,
    /// What an empty or NaN result means: "fail", "inconclusive" or "pass". Required.
    pub on_empty: OnEmpty,
    /// Time between measurements (the first comes one interval after the batch).
    #[serde(default = "default_interval", deserialize_with = "config_file::duration::deserialize")]
    pub interval: Duration,
    /// How long to measure after each batch (a timed canary pause measures for its length).
    #[serde(default = "default_bake", deserialize_with = "config_file::duration::deserialize")]
    pub bake: Duration,
    /// Failed measurements a batch may have; one more halts (default 0).
    #[serde(default)]
    pub max_failures: u32,
    /// Inconclusive measurements a batch may have; one more halts (default 2).
    #[serde(default = "default_max_inconclusive")]
    pub max_inconclusive: u32,
    /// How long one query may take.
    #[serde(default = "default_timeout", deserialize_with = "config_file::duration::deserialize")]
    pub timeout: Duration,
    /// The condition, parsed once at load.
    #[serde(skip)]
    pub check: Condition,
}

fn default_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_bake() -> Duration {
    Duration::from_secs(60)
}
fn default_max_inconclusive() -> u32 {
    2
}
fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnEmpty {
    Fail,
    Inconclusive,
    Pass,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Op {
    #[default]
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

impl Op {
    fn text(self) -> &'static str {
        match self {
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Eq => "==",
            Op::Ne => "!=",
        }
    }
    fn holds(self, a: f64, b: f64) -> bool {
        match self {
            Op::Lt => a < b,
            Op::Le => a <= b,
            Op::Gt => a > b,
            Op::Ge => a >= b,
            Op::Eq => a == b,
            Op::Ne => a != b,
        }
    }
}

/// `value OP threshold`, or `value OP factor * baseline`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Condition {
    pub op: Op,
    pub threshold: f64,
    pub baseline: bool,
}

impl Condition {
    pub fn parse(text: &str) -> Result<Condition, String> {
        let t = text.trim();
        let ops = [("<=", Op::Le), (">=", Op::Ge), ("==", Op::Eq), ("!=", Op::Ne), ("<", Op::Lt), (">", Op::Gt)];
        let Some((rest, op)) = ops.iter().find_map(|(s, op)| t.strip_prefix(s).map(|r| (r.trim(), *op))) else {
            return Err(format!("{text:?} must start with <, <=, >, >=, == or != (e.g. \"< 0.05\")"));
        };
        let number = |s: &str| {
            s.trim()
                .parse::<f64>()
                .ok()
                .filter(|n| n.is_finite())
                .ok_or_else(|| format!("{text:?}: {:?} is not a number", s.trim()))
        };
        if rest == "baseline" {
            return Ok(Condition { op, threshold: 1.0, baseline: true });
        }
        if let Some((factor, b)) = rest.split_once('*') {
            if b.trim() != "baseline" {
                return Err(format!("{text:?}: only \"N * baseline\" may multiply"));
            }
            return Ok(Condition { op, threshold: number(factor)?, baseline: true });
        }
        Ok(Condition { op, threshold: number(rest)?, baseline: false })
    }
}

impl std::fmt::Display for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.baseline {
            write!(f, "{} {} * baseline", self.op.text(), self.threshold)
        } else {
            write!(f, "{} {}", self.op.text(), self.threshold)
        }
    }
}

impl MetricGate {
    /// What is wrong with this gate, keyed under `key`.
    pub fn problems(&self, key: &str, p: &mut Vec<Problem>) {
        if self.name.trim().is_empty() {
            p.push(Problem::new(format!("{key}.name"), "must not be empty"));
        }
        if let Err(e) = crate::http::Url::parse(&self.prometheus) {
            p.push(Problem::new(format!("{key}.prometheus"), e));
        }
        if self.query.trim().is_empty() {
            p.push(Problem::new(format!("{key}.query"), "must not be empty"));
        }
        match Condition::parse(&self.condition) {
            Err(e) => p.push(Problem::new(format!("{key}.condition"), e)),
            Ok(c) if c.baseline && self.baseline_query.is_none() => p.push(Problem::new(
                format!("{key}.condition"),
                "compares with the baseline: set baseline_query (the same query over {baseline_hosts})",
            )),
            Ok(c) if !c.baseline && self.baseline_query.is_some() => p.push(Problem::new(
                format!("{key}.baseline_query"),
                "is set, but the condition does not name `baseline` (e.g. \"<= 1.5 * baseline\")",
            )),
            Ok(_) => {}
        }
        if self.interval.is_zero() {
            p.push(Problem::new(format!("{key}.interval"), "must be greater than 0"));
        }
        if self.bake < self.interval {
            p.push(Problem::new(format!("{key}.bake"), "must be at least one interval (it is how long to measure)"));
        }
        if self.timeout.is_zero() || self.timeout > self.interval {
            p.push(Problem::new(format!("{key}.timeout"), "must be greater than 0 and at most the interval"));
        }
        for q in std::iter::once(&self.query).chain(&self.baseline_query) {
            if let Some(bad) = unknown_placeholder(q) {
                p.push(Problem::new(
                    format!("{key}.query"),
                    format!("unknown placeholder {{{bad}}}; known: {}", PLACEHOLDERS.join(", ")),
                ));
            }
        }
    }

    /// The number of measurements in a bake of `length`.
    pub fn measurements(&self, length: Duration) -> u32 {
        let n = length.as_millis() / self.interval.as_millis().max(1);
        u32::try_from(n).unwrap_or(u32::MAX).max(1)
    }
}

const PLACEHOLDERS: [&str; 9] = [
    "batch_hosts",
    "updated_hosts",
    "baseline_hosts",
    "batch_addresses",
    "updated_addresses",
    "baseline_addresses",
    "version",
    "env",
    "app",
];

/// The first `{name}` in `q` that is not a placeholder (PromQL's own braces hold `=`, `"` or
/// `,`, so a bare word in braces is taken as one).
fn unknown_placeholder(q: &str) -> Option<String> {
    let mut rest = q;
    while let Some(i) = rest.find('{') {
        let after = &rest[i + 1..];
        let Some(j) = after.find('}') else { break };
        let word = &after[..j];
        if !word.is_empty()
            && word.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !PLACEHOLDERS.contains(&word)
        {
            return Some(word.to_string());
        }
        rest = after;
    }
    None
}

/// What the placeholders stand for in one measurement.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    pub env: String,
    pub app: String,
    pub version: String,
    /// (name, address) of the batch's hosts, of every host on the new release, of the hosts still
    /// on the old one.
    pub batch: Vec<(String, String)>,
    pub updated: Vec<(String, String)>,
    pub baseline: Vec<(String, String)>,
}

/// `values` as a regex alternation for `=~` inside a PromQL string (metacharacters escaped
/// for the regex, and the backslash for the string).
fn alternation<'a>(values: impl Iterator<Item = &'a str>) -> String {
    let parts: Vec<String> = values
        .map(|v| {
            let mut s = String::new();
            for c in v.chars() {
                if ".+*?()[]{}|^$\\".contains(c) {
                    s.push_str("\\\\");
                }
                s.push(c);
            }
            s
        })
        .collect();
    // An empty set matches nothing (an empty alternation would match an empty label).
    if parts.is_empty() { "^$ferry-no-hosts".to_string() } else { parts.join("|") }
}

impl Scope {
    pub fn fill(&self, q: &str) -> String {
        let names = |hs: &[(String, String)]| alternation(hs.iter().map(|(n, _)| n.as_str()));
        let addrs = |hs: &[(String, String)]| alternation(hs.iter().map(|(_, a)| a.as_str()));
        q.replace("{batch_hosts}", &names(&self.batch))
            .replace("{updated_hosts}", &names(&self.updated))
            .replace("{baseline_hosts}", &names(&self.baseline))
            .replace("{batch_addresses}", &addrs(&self.batch))
            .replace("{updated_addresses}", &addrs(&self.updated))
            .replace("{baseline_addresses}", &addrs(&self.baseline))
            .replace("{version}", &self.version)
            .replace("{env}", &self.env)
            .replace("{app}", &self.app)
    }
}

/// A measurement's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Pass,
    Fail,
    Inconclusive,
    /// A baseline gate with no host left on the old release.
    Skipped,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Fail => "fail",
            Outcome::Inconclusive => "inconclusive",
            Outcome::Skipped => "skipped",
        }
    }
    pub fn parse(s: &str) -> Option<Outcome> {
        [Outcome::Pass, Outcome::Fail, Outcome::Inconclusive, Outcome::Skipped].into_iter().find(|o| o.as_str() == s)
    }
}

/// One judged measurement (before it is recorded).
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub outcome: Outcome,
    /// The value that decided (the worst of several series).
    pub value: Option<f64>,
    pub baseline: Option<f64>,
    pub detail: String,
}

/// What a query answered: its values (NaN dropped), or why there is none.
pub type Answer = Result<Vec<f64>, String>;

/// Judges one measurement from the query's answer (and the baseline query's). Pure.
pub fn judge(gate: &MetricGate, answer: Answer, baseline: Option<Answer>) -> Verdict {
    let c = gate.check;
    let verdict = |outcome, value, baseline, detail: String| Verdict { outcome, value, baseline, detail };
    let empty = |what: &str| {
        let outcome = match gate.on_empty {
            OnEmpty::Fail => Outcome::Fail,
            OnEmpty::Inconclusive => Outcome::Inconclusive,
            OnEmpty::Pass => Outcome::Pass,
        };
        verdict(outcome, None, None, format!("{what} returned no value (or NaN); on_empty = {:?}", outcome.as_str()))
    };
    let values = match answer {
        Err(e) => return verdict(Outcome::Inconclusive, None, None, e),
        Ok(v) if v.is_empty() => return empty("the query"),
        Ok(v) => v,
    };
    let (limit, base) = match baseline {
        None => (c.threshold, None),
        Some(Err(e)) => return verdict(Outcome::Inconclusive, None, None, format!("baseline: {e}")),
        Some(Ok(b)) if b.is_empty() => return empty("the baseline query"),
        Some(Ok(b)) if b.len() > 1 || values.len() > 1 => {
            let detail = format!(
                "a baseline gate needs one series per query (got {} and {}): aggregate them (sum, avg, max, histogram_quantile)",
                values.len(),
                b.len()
            );
            return verdict(Outcome::Inconclusive, None, None, detail);
        }
        Some(Ok(b)) => (c.threshold * b[0], Some(b[0])),
    };
    // The worst series decides: the first that breaks the condition, else the one closest to it.
    let failing = values.iter().copied().find(|v| !c.op.holds(*v, limit));
    match failing {
        Some(v) => verdict(Outcome::Fail, Some(v), base, format!("{v} is not {} {limit}", c.op.text())),
        None => {
            let v = values.iter().copied().min_by(|a, b| (limit - a).abs().total_cmp(&(limit - b).abs()));
            verdict(Outcome::Pass, v, base, format!("{} {} {limit}", v.unwrap_or_default(), c.op.text()))
        }
    }
}

/// Runs `query` at `at` (unix seconds) on the gate's Prometheus.
pub async fn query(gate: &MetricGate, query: &str, at: f64) -> Answer {
    let base = gate.prometheus.trim_end_matches('/');
    let url = format!("{base}/api/v1/query?query={}&time={at:.3}", query_value(query));
    let roots = gate.ca.clone().map_or(Roots::System, Roots::File);
    let asked = tokio::time::timeout(gate.timeout, crate::http::get(&url, &roots)).await;
    let r = match asked {
        Err(_) => {
            return Err(format!(
                "Prometheus {base} did not answer within {}",
                humantime::format_duration(gate.timeout)
            ));
        }
        Ok(Err(e)) => return Err(format!("Prometheus {base}: {e}")),
        Ok(Ok(r)) => r,
    };
    parse_answer(&r.body).map_err(|e| format!("Prometheus {base} (HTTP {}): {e}", r.status))
}

/// The values of a Prometheus instant-query answer (`/api/v1/query`), NaN dropped.
pub fn parse_answer(body: &str) -> Answer {
    let v: serde_json::Value = serde_json::from_str(body).map_err(|e| format!("not a Prometheus answer: {e}"))?;
    if v["status"] != "success" {
        let kind = v["errorType"].as_str().unwrap_or("error");
        let msg = v["error"].as_str().unwrap_or("no reason given");
        return Err(format!("{kind}: {msg}"));
    }
    let sample = |s: &serde_json::Value| -> Result<f64, String> {
        let text = s.get(1).and_then(serde_json::Value::as_str).ok_or("a sample without a value")?;
        match text {
            "+Inf" | "Inf" => Ok(f64::INFINITY),
            "-Inf" => Ok(f64::NEG_INFINITY),
            t => t.parse::<f64>().map_err(|_| format!("{t:?} is not a number")),
        }
    };
    let data = &v["data"];
    let values = match data["resultType"].as_str() {
        Some("scalar") => vec![sample(&data["result"])?],
        Some("vector") => data["result"]
            .as_array()
            .ok_or("a vector without results")?
            .iter()
            .map(|s| sample(&s["value"]))
            .collect::<Result<Vec<_>, _>>()?,
        other => return Err(format!("the query must give an instant vector or a scalar, not {other:?}")),
    };
    Ok(values.into_iter().filter(|v| !v.is_nan()).collect())
}

/// Where a webhook gate is called.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Point {
    /// After staging, before the first host is activated.
    BeforeActivation,
    /// After each batch (and its metric gates' bake).
    AfterBatch,
    /// Before a paused canary is promoted (`ferry promote`) or a deployment promoted to the next
    /// environment.
    BeforePromotion,
}

impl Point {
    pub fn as_str(self) -> &'static str {
        match self {
            Point::BeforeActivation => "before_activation",
            Point::AfterBatch => "after_batch",
            Point::BeforePromotion => "before_promotion",
        }
    }
}

/// A webhook gate (`[[environments.NAME.webhooks]]`): `url` is POSTed the deployment as JSON at
/// each of `at`; 2xx passes, any other answer or none within `timeout` halts the rollout.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookGate {
    pub name: String,
    pub url: String,
    pub at: Vec<Point>,
    #[serde(default = "default_timeout", deserialize_with = "config_file::duration::deserialize")]
    pub timeout: Duration,
    #[serde(default)]
    pub ca: Option<PathBuf>,
}

impl WebhookGate {
    pub fn problems(&self, key: &str, p: &mut Vec<Problem>) {
        if self.name.trim().is_empty() {
            p.push(Problem::new(format!("{key}.name"), "must not be empty"));
        }
        if let Err(e) = crate::http::Url::parse(&self.url) {
            p.push(Problem::new(format!("{key}.url"), e));
        }
        if self.at.is_empty() {
            p.push(Problem::new(
                format!("{key}.at"),
                "names no point: before_activation, after_batch, before_promotion",
            ));
        }
        if self.timeout.is_zero() {
            p.push(Problem::new(format!("{key}.timeout"), "must be greater than 0"));
        }
    }

    /// Calls the webhook with `payload`; `Err` says why the gate failed.
    pub async fn call(&self, payload: &serde_json::Value) -> Result<(), String> {
        let roots = self.ca.clone().map_or(Roots::System, Roots::File);
        let body = payload.to_string().into_bytes();
        let asked = tokio::time::timeout(self.timeout, crate::http::post_json(&self.url, body, &roots)).await;
        match asked {
            Err(_) => Err(format!(
                "webhook gate {} ({}) did not answer within {}",
                self.name,
                self.url,
                humantime::format_duration(self.timeout)
            )),
            Ok(Err(e)) => Err(format!("webhook gate {}: {e}", self.name)),
            Ok(Ok(r)) if (200..300).contains(&r.status) => Ok(()),
            Ok(Ok(r)) => {
                let body: String = r.body.chars().take(300).collect();
                Err(format!("webhook gate {} ({}) answered {}: {}", self.name, self.url, r.status, body.trim()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(condition: &str, on_empty: OnEmpty) -> MetricGate {
        MetricGate {
            name: "errors".into(),
            prometheus: "http://127.0.0.1:9090".into(),
            ca: None,
            query: "q".into(),
            baseline_query: None,
            condition: condition.into(),
            on_empty,
            interval: Duration::from_secs(1),
            bake: Duration::from_secs(5),
            max_failures: 0,
            max_inconclusive: 2,
            timeout: Duration::from_secs(1),
            check: Condition::parse(condition).expect("condition"),
        }
    }

    #[test]
    fn conditions_parse_and_print() {
        assert_eq!(Condition::parse("< 0.05"), Ok(Condition { op: Op::Lt, threshold: 0.05, baseline: false }));
        assert_eq!(Condition::parse(">=100"), Ok(Condition { op: Op::Ge, threshold: 100.0, baseline: false }));
        assert_eq!(Condition::parse("<= 1.5 * baseline"), Ok(Condition { op: Op::Le, threshold: 1.5, baseline: true }));
        assert_eq!(Condition::parse("< baseline").map(|c| c.to_string()), Ok("< 1 * baseline".into()));
        assert!(Condition::parse("0.05").is_err_and(|e| e.contains("must start with")));
        assert!(Condition::parse("< lots").is_err_and(|e| e.contains("\"lots\" is not a number")));
        assert!(Condition::parse("< NaN").is_err());
        assert!(Condition::parse("< 2 * other").is_err_and(|e| e.contains("baseline")));
    }

    #[test]
    fn a_measurement_passes_fails_or_is_inconclusive() {
        let g = gate("< 0.05", OnEmpty::Fail);
        assert_eq!(judge(&g, Ok(vec![0.01]), None).outcome, Outcome::Pass);
        let v = judge(&g, Ok(vec![0.01, 0.10]), None);
        assert_eq!((v.outcome, v.value), (Outcome::Fail, Some(0.10)));
        assert!(v.detail.contains("0.1 is not < 0.05"), "{}", v.detail);
        assert_eq!(judge(&g, Ok(vec![0.05]), None).outcome, Outcome::Fail, "the bound itself is not < 0.05");
        assert_eq!(judge(&g, Ok(vec![f64::INFINITY]), None).outcome, Outcome::Fail);
        let v = judge(&g, Err("Prometheus down".into()), None);
        assert_eq!((v.outcome, v.detail.as_str()), (Outcome::Inconclusive, "Prometheus down"));
    }

    #[test]
    fn an_empty_answer_is_what_on_empty_says() {
        for (on_empty, outcome) in [
            (OnEmpty::Fail, Outcome::Fail),
            (OnEmpty::Inconclusive, Outcome::Inconclusive),
            (OnEmpty::Pass, Outcome::Pass),
        ] {
            let v = judge(&gate("< 0.05", on_empty), Ok(vec![]), None);
            assert_eq!(v.outcome, outcome);
            assert!(v.detail.contains("no value"), "{}", v.detail);
        }
    }

    #[test]
    fn a_baseline_gate_compares_with_the_old_hosts() {
        let mut g = gate("<= 1.5 * baseline", OnEmpty::Fail);
        g.baseline_query = Some("b".into());
        let v = judge(&g, Ok(vec![0.12]), Some(Ok(vec![0.1])));
        assert_eq!((v.outcome, v.baseline), (Outcome::Pass, Some(0.1)));
        let v = judge(&g, Ok(vec![0.2]), Some(Ok(vec![0.1])));
        assert_eq!(v.outcome, Outcome::Fail);
        assert!(v.detail.contains("is not <= 0.15"), "{}", v.detail);
        assert_eq!(judge(&g, Ok(vec![0.2]), Some(Ok(vec![]))).outcome, Outcome::Fail, "on_empty covers the baseline");
        let v = judge(&g, Ok(vec![0.2, 0.3]), Some(Ok(vec![0.1])));
        assert_eq!(v.outcome, Outcome::Inconclusive);
        assert!(v.detail.contains("one series per query"), "{}", v.detail);
    }

    #[test]
    fn prometheus_answers_parse() {
        let vector = r#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"host":"web-1"},"value":[1700000000.1,"0.25"]},
            {"metric":{"host":"web-2"},"value":[1700000000.1,"NaN"]},
            {"metric":{"host":"web-3"},"value":[1700000000.1,"+Inf"]}]}}"#;
        assert_eq!(parse_answer(vector), Ok(vec![0.25, f64::INFINITY]));
        let scalar = r#"{"status":"success","data":{"resultType":"scalar","result":[1700000000,"3"]}}"#;
        assert_eq!(parse_answer(scalar), Ok(vec![3.0]));
        let empty = r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
        assert_eq!(parse_answer(empty), Ok(vec![]));
        let bad = r#"{"status":"error","errorType":"bad_data","error":"parse error at char 5"}"#;
        assert_eq!(parse_answer(bad), Err("bad_data: parse error at char 5".into()));
        let matrix = r#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#;
        assert!(parse_answer(matrix).is_err_and(|e| e.contains("instant vector")));
        assert!(parse_answer("<html>").is_err_and(|e| e.contains("not a Prometheus answer")));
    }

    #[test]
    fn placeholders_fill_with_escaped_alternations() {
        let scope = Scope {
            env: "prod".into(),
            app: "web".into(),
            version: "1.2".into(),
            batch: vec![("web-1.example".into(), "10.0.0.1".into())],
            updated: vec![("web-1.example".into(), "10.0.0.1".into()), ("web-2".into(), "10.0.0.2".into())],
            baseline: vec![],
        };
        let q = r#"x{host=~"{batch_hosts}",a=~"{updated_addresses}",b=~"{baseline_hosts}",v="{version}"}"#;
        assert_eq!(
            scope.fill(q),
            r#"x{host=~"web-1\\.example",a=~"10\\.0\\.0\\.1|10\\.0\\.0\\.2",b=~"^$ferry-no-hosts",v="1.2"}"#
        );
        assert_eq!(unknown_placeholder(r#"x{host=~"{batch_hosts}"} and {hosts}"#), Some("hosts".into()));
        assert_eq!(unknown_placeholder(r#"sum(rate(x{code=~"5.."}[1m]))"#), None);
    }

    #[test]
    fn bad_gates_are_named() {
        let mut g = gate("<= 2 * baseline", OnEmpty::Fail);
        g.prometheus = "prometheus:9090".into();
        g.bake = Duration::from_millis(500);
        g.query = "x{host=~\"{hosts}\"}".into();
        let mut p = Vec::new();
        g.problems("environments.prod.gates[0]", &mut p);
        let text: Vec<String> = p.iter().map(|p| p.to_string()).collect();
        let text = text.join("\n");
        for want in ["gates[0].prometheus", "set baseline_query", "gates[0].bake", "unknown placeholder {hosts}"] {
            assert!(text.contains(want), "{want} missing from:\n{text}");
        }
    }
}
