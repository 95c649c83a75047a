//! The output layer: every verb's result rendered as human text or as JSON (`--output json`),
//! and the rollout's events worded for people ([`event_line`], the live view). The only place
//! that prints to stdout. The last human line always states the final state.
use std::io::Write;

use comfy_table::{ContentArrangement, Table, presets};
use serde::Serialize;

use crate::commands::ca::CaInitOutcome;
use crate::commands::cert::{CertInfo, IssueOutcome};
use crate::commands::plan::PlanView;
use crate::commands::status::StatusReport;
use crate::commands::token::NewToken;
use crate::rollout::{DeployReport, HostOutcome};
use crate::state::DeploymentStatus;

mod events;
pub use events::event_line;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Human,
    Json,
}

fn out(text: &str) {
    let mut stdout = std::io::stdout().lock();
    // A closed stdout (e.g. `| head`) is not an error worth a panic. Whatever a peer's text
    // carries, no control character but the line breaks this layer makes reaches the terminal.
    let _ = writeln!(stdout, "{}", ferry_proto::text::printable_lines(text));
}

/// Prints `value` as one JSON object on a line.
pub fn json<T: Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(s) => out(&s),
        Err(e) => eprintln!("ferry: cannot encode the result as JSON: {e}"),
    }
}

pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[unit]) }
}

pub fn duration_secs(secs: u64) -> String {
    let (d, h, m) = (secs / 86400, secs % 86400 / 3600, secs % 3600 / 60);
    match (d, h) {
        (0, 0) => format!("{m}m {}s", secs % 60),
        (0, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

fn date(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| unix.to_string())
}

pub fn ca_init(o: &CaInitOutcome, format: Format) {
    match format {
        Format::Json => json(o),
        Format::Human => {
            out(&format!("created the fleet CA ({}), valid until {}", o.subject, date(o.not_after_unix)));
            out(&format!("  certificate: {}", o.cert.display()));
            out(&format!("  private key: {} (mode 0600: keep it off the hosts)", o.key.display()));
            out("next: ferry cert issue --ca DIR --name NAME --role agent|coordinator --san ADDRESS --out DIR");
        }
    }
}

pub fn cert_issue(o: &IssueOutcome, format: Format) {
    match format {
        Format::Json => json(o),
        Format::Human => {
            cert_lines(&o.cert);
            out(&format!("  key:      {} (mode 0600)", o.key.display()));
            out(&format!("issued {} certificate {}", o.cert.role.map_or("?", |r| r.as_str()), o.cert.file.display()));
        }
    }
}

pub fn cert_show(c: &CertInfo, format: Format) {
    match format {
        Format::Json => json(c),
        Format::Human => {
            cert_lines(c);
            let verdict = if c.expires_in_days < 0 {
                format!("EXPIRED {} day(s) ago", -c.expires_in_days)
            } else {
                format!("valid, expires in {} day(s)", c.expires_in_days)
            };
            out(&format!("{}: {verdict}", c.file.display()));
        }
    }
}

fn cert_lines(c: &CertInfo) {
    out(&format!("  subject:  {}", c.subject));
    out(&format!("  issuer:   {}", c.issuer));
    out(&format!("  serial:   {}", c.serial));
    out(&format!(
        "  role:     {}",
        match (c.role, c.is_ca) {
            (_, true) => "certificate authority".to_string(),
            (Some(r), _) => r.to_string(),
            (None, _) => "none (not a ferry certificate)".to_string(),
        }
    ));
    out(&format!("  SANs:     {}", if c.sans.is_empty() { "-".to_string() } else { c.sans.join(", ") }));
    out(&format!("  valid:    {} .. {}", date(c.not_before_unix), date(c.not_after_unix)));
}

pub fn status(r: &StatusReport, format: Format) {
    if format == Format::Json {
        return json(r);
    }
    let mut table = Table::new();
    table.load_style(presets::NOTHING).set_content_arrangement(ContentArrangement::Disabled);
    table.set_header(vec![
        "HOST",
        "ADDRESS",
        "STATE",
        "AGENT",
        "OS",
        "UPTIME",
        "CPUS",
        "MEM FREE/TOTAL",
        "DISK FREE",
        &r.app,
    ]);
    for h in &r.hosts {
        let address = match &h.dial_in {
            Some(d) => format!("dial-in from {}", d.addr),
            None => h.address.clone(),
        };
        match &h.facts {
            Some(f) => {
                let release = f.apps.iter().find(|a| a.name == r.app).map_or("(app not declared)".to_string(), |a| {
                    let v = a.current_version.clone().unwrap_or_else(|| "-".into());
                    if a.activation_unfinished { format!("{v} (activation unfinished: deploy it again)") } else { v }
                });
                table.add_row(vec![
                    h.name.clone(),
                    address,
                    "up".into(),
                    f.agent_version.clone(),
                    f.os.clone(),
                    duration_secs(f.uptime_secs),
                    f.cpu_count.to_string(),
                    format!("{} / {}", bytes(f.memory_available_bytes), bytes(f.memory_total_bytes)),
                    bytes(f.data_dir_free_bytes),
                    release,
                ]);
            }
            None => {
                let kind = h.error_kind.map_or("unreachable", |k| k.as_str());
                table.add_row(vec![h.name.clone(), address, format!("DOWN ({kind})")]);
            }
        }
    }
    out(&table.to_string());
    let dialed: Vec<_> = r.hosts.iter().filter_map(|h| Some((h, h.dial_in.as_ref()?))).collect();
    if !dialed.is_empty() {
        out("");
        for (h, d) in dialed {
            out(&format!(
                "{}: dialed in from {}, connected since {}, last seen {}",
                h.name, d.addr, d.connected_since, d.last_seen
            ));
        }
    }
    let down: Vec<_> = r.hosts.iter().filter(|h| !h.reachable).collect();
    if !down.is_empty() {
        out("");
        for h in &down {
            out(&format!("{} ({}): {}", h.name, h.address, h.error.as_deref().unwrap_or("unreachable")));
        }
    }
    let total = r.hosts.len();
    out(&format!(
        "environment {}: {} of {total} host(s) reachable{}",
        r.environment,
        total - down.len(),
        if down.is_empty() { String::new() } else { format!(", {} unreachable", down.len()) }
    ));
}

mod live;
pub use live::Live;

/// What a rollout shows while it runs: the live view for human output, nothing for JSON (which
/// prints the final object alone).
pub fn progress(format: Format) -> Option<std::sync::Arc<Live>> {
    (format == Format::Human).then(Live::stdout)
}

pub fn deploy_start(a: &crate::artifact::Artifact, version: &str, env: &str, format: Format) {
    if format == Format::Human {
        out(&format!(
            "deploying {} as {version} ({} entries, {}) to {env}",
            a.source.display(),
            a.manifest.entries.len(),
            bytes(a.total_bytes)
        ));
    }
}

/// `ferry registry migrate`.
pub fn migrated(c: &crate::registry::migrate::Copied, format: Format) {
    if format == Format::Json {
        return json(c);
    }
    let rows: Vec<String> = c.tables.iter().map(|(t, n)| format!("  {t}: {n}")).collect();
    out(&format!(
        "copied {} into {}:\n{}\nnow set in fleet.toml: registry = \"{}\" (with its password, or sslmode)",
        c.from,
        c.to,
        rows.join("\n"),
        c.to
    ));
}

/// `ferry key new`.
pub fn key(k: &crate::commands::key::NewKey, format: Format) {
    if format == Format::Json {
        return json(k);
    }
    out(&format!(
        "key {} ({}):
  private {}  (mode 0600; in fleet.toml: [signing] key = \"{}\")
  public  {}  (on every host, in agent.toml: [signing] trusted_keys = [\"/etc/ferry/keys/{}.pub\"])",
        k.name,
        k.id,
        k.private.display(),
        k.private.display(),
        k.public.display(),
        k.name
    ));
}

/// `ferry token new`.
pub fn token(t: &NewToken, format: Format) {
    if format == Format::Json {
        return json(t);
    }
    out(&format!(
        "token for {} (give it to the pipeline as FERRY_TOKEN; it is not stored anywhere):\n  {}\n\nadd to fleet.toml and restart ferry serve:\n{}",
        t.name, t.token, t.config_lines
    ));
}

/// What `ferry deploy --bundle` did: each app's deployment in order, then the rollbacks of the
/// apps already updated (last first) when one failed.
#[derive(Debug, Default, Serialize)]
pub struct BundleReport {
    pub steps: Vec<BundleStep>,
    /// Apps no host of the environment runs.
    pub skipped: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct BundleStep {
    pub app: String,
    pub report: DeployReport,
}

impl BundleReport {
    /// Every app deployed, none failed.
    pub fn succeeded(&self) -> bool {
        self.steps.iter().all(|s| {
            s.report.status == DeploymentStatus::Succeeded && s.report.kind != crate::state::DeploymentKind::Rollback
        })
    }

    /// The exit code: the first failed deployment's, else success.
    pub fn exit_code(&self) -> u8 {
        match self.steps.iter().find(|s| s.report.status != DeploymentStatus::Succeeded) {
            Some(s) if s.report.any_unreachable() => crate::exit::UNREACHABLE,
            Some(_) => crate::exit::FAILED,
            None if self.succeeded() => crate::exit::SUCCESS,
            None => crate::exit::FAILED,
        }
    }
}

pub fn bundle_report(b: &BundleReport, format: Format) {
    if format == Format::Json {
        return json(&serde_json::json!({
            "status": if b.succeeded() { "succeeded" } else { "failed" },
            "apps": b.steps,
            "skipped": b.skipped,
        }));
    }
    for step in &b.steps {
        let what = if step.report.kind == crate::state::DeploymentKind::Rollback { "rolled back" } else { "deployed" };
        out(&format!("== app {} ({what})", step.app));
        deploy_report(&step.report, format);
    }
    for app in &b.skipped {
        out(&format!("== app {app}: no host of the environment runs it"));
    }
    let apps: Vec<&str> = b
        .steps
        .iter()
        .filter(|s| s.report.kind != crate::state::DeploymentKind::Rollback)
        .map(|s| s.app.as_str())
        .collect();
    out(&format!("bundle: {}: {}", if b.succeeded() { "succeeded" } else { "FAILED" }, apps.join(" → ")));
}

pub fn deploy_report(r: &DeployReport, format: Format) {
    if format == Format::Json {
        return json(r);
    }
    let mut table = Table::new();
    table.load_style(presets::NOTHING).set_content_arrangement(ContentArrangement::Disabled);
    table.set_header(vec!["HOST", "RESULT", "RELEASE", "SENT", "TIME"]);
    for h in &r.hosts {
        table.add_row(vec![
            h.name.clone(),
            serde_json::to_value(h.status).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default(),
            h.release.clone().unwrap_or_else(|| "-".into()),
            bytes(h.bytes_sent),
            format!("{:.1}s", h.duration_ms as f64 / 1000.0),
        ]);
    }
    out(&table.to_string());
    for h in r.hosts.iter().filter(|h| h.error.is_some()) {
        // One host's error is one line, whatever its agent or hook said.
        out(&ferry_proto::text::printable(h.error.as_deref().unwrap_or_default()));
    }
    let done = r.hosts.iter().filter(|h| matches!(h.status, HostOutcome::Succeeded | HostOutcome::Unchanged)).count();
    let state = match r.status {
        DeploymentStatus::Succeeded => "succeeded",
        DeploymentStatus::Failed => "FAILED (halted)",
        DeploymentStatus::RolledBack => "FAILED, rolled back",
        DeploymentStatus::Cancelled => "CANCELLED",
        DeploymentStatus::Paused => "paused",
        DeploymentStatus::Pending => "pending (not started)",
        DeploymentStatus::Running => "still running",
    };
    out(&format!(
        "deployment {} of {} to {}: {state}: {done} of {} host(s) on the release, {} sent",
        r.deployment_id,
        r.version,
        r.environment,
        r.hosts.len(),
        bytes(r.bytes_sent)
    ));
}

/// `ferry plan`: the batches a deployment would run.
pub fn plan(p: &PlanView, format: Format) {
    if format == Format::Json {
        return json(p);
    }
    out(&format!(
        "environment {}: {} ({} batch(es)); halt after more than {} failed host(s){}",
        p.environment,
        p.strategy,
        p.batches.len(),
        p.max_failures,
        if p.auto_rollback { ", then roll back every updated host" } else { "" }
    ));
    out("every host is staged first (in parallel); then, batch by batch:");
    for (i, b) in p.batches.iter().enumerate() {
        let pause = match b.pause_after.as_deref() {
            Some("manual") => " -> pause until `ferry promote`".to_string(),
            Some(d) => format!(" -> pause {d}"),
            None => String::new(),
        };
        out(&format!("  batch {}: {}{pause}", i + 1, b.hosts.join(", ")));
    }
    if let Some(to) = &p.switch_to {
        out(&format!(
            "then `switch` makes {to} live (live now: {}); if it or `after_switch` fails, the live group is switched back",
            p.live_group.as_deref().unwrap_or("none")
        ));
    }
}

pub fn history(rows: &[crate::registry::DeploymentRow], format: Format) {
    if format == Format::Json {
        return json(&rows);
    }
    let mut table = Table::new();
    table.load_style(presets::NOTHING).set_content_arrangement(ContentArrangement::Disabled);
    table.set_header(vec![
        "DEPLOYMENT",
        "KIND",
        "ENV",
        "APP",
        "VERSION",
        "STATUS",
        "STARTED",
        "TIME",
        "SENT",
        "FAILED HOSTS",
    ]);
    for d in rows {
        let time = d.finished_ms.map_or("-".to_string(), |f| format!("{:.1}s", (f - d.started_ms) as f64 / 1000.0));
        table.add_row(vec![
            d.id.clone(),
            d.kind.to_string(),
            d.environment.clone(),
            if d.app.is_empty() { "-".to_string() } else { d.app.clone() },
            d.version.clone(),
            d.status.to_string(),
            crate::registry::when(d.started_ms),
            time,
            bytes(u64::try_from(d.bytes_sent).unwrap_or(0)),
            d.hosts_failed.to_string(),
        ]);
    }
    out(&table.to_string());
    if rows.is_empty() {
        out("no deployments recorded");
    }
}

/// One deployment in full (`ferry history --deployment ID`): its hosts, metric gate
/// measurements and recorded events, from the report-shaped JSON the registry or the API gives.
pub fn deployment_detail(v: &serde_json::Value, format: Format) {
    if format == Format::Json {
        return json(v);
    }
    let s = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap_or("-").to_string();
    out(&format!(
        "deployment {} ({}) of {} {} to {}: {}",
        s(v, "deployment_id"),
        s(v, "kind"),
        s(v, "app"),
        s(v, "version"),
        s(v, "environment"),
        s(v, "status")
    ));
    if let Some(e) = v["error"].as_str() {
        out(&format!("  {}", ferry_proto::text::printable(e)));
    }
    out("hosts:");
    for h in v["hosts"].as_array().into_iter().flatten() {
        let error = h["error"].as_str().map(|e| format!(": {}", ferry_proto::text::printable(e))).unwrap_or_default();
        out(&format!("  {} {}{error}", s(h, "name"), s(h, "status")));
    }
    let measurements = v["measurements"].as_array().cloned().unwrap_or_default();
    if !measurements.is_empty() {
        out("measurements:");
        for m in &measurements {
            let at = m["at_ms"].as_i64().map_or("-".to_string(), crate::registry::when);
            out(&format!(
                "  {at}  {} batch {}  {}  {}",
                s(m, "gate"),
                m["batch"],
                s(m, "outcome"),
                ferry_proto::text::printable(&s(m, "detail"))
            ));
        }
    }
    out("events:");
    for e in v["events"].as_array().into_iter().flatten() {
        let at = e["time_ms"].as_i64().map_or("-".to_string(), crate::registry::when);
        let host = e["host"].as_str().map(|h| format!(" {h}")).unwrap_or_default();
        out(&format!("  {at}{host}  {}  {}", s(e, "kind"), ferry_proto::text::printable(&s(e, "message"))));
    }
}

pub fn report(rows: &[crate::registry::EnvReport], format: Format) {
    if format == Format::Json {
        return json(&rows);
    }
    let mut table = Table::new();
    table.load_style(presets::NOTHING).set_content_arrangement(ContentArrangement::Disabled);
    table.set_header(vec!["ENV", "APP", "DEPLOYS", "PER WEEK", "SUCCESS", "ROLLBACK", "MEAN", "P95", "SLOWEST HOSTS"]);
    for r in rows {
        let slowest: Vec<String> =
            r.slowest_hosts.iter().map(|h| format!("{} {:.1}s", h.host, h.mean_ms as f64 / 1000.0)).collect();
        table.add_row(vec![
            r.environment.clone(),
            if r.app.is_empty() { "-".to_string() } else { r.app.clone() },
            r.deployments.to_string(),
            format!("{:.1}", r.deployments_per_week),
            format!("{:.0}%", r.success_rate * 100.0),
            format!("{:.0}%", r.rollback_rate * 100.0),
            format!("{:.1}s", r.mean_duration_ms as f64 / 1000.0),
            format!("{:.1}s", r.p95_duration_ms as f64 / 1000.0),
            slowest.join(", "),
        ]);
    }
    out(&table.to_string());
    if rows.is_empty() {
        out("no finished deployments recorded");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
        assert_eq!(duration_secs(59), "0m 59s");
        assert_eq!(duration_secs(3 * 3600 + 120), "3h 2m");
        assert_eq!(duration_secs(2 * 86400 + 3600), "2d 1h");
    }
}
