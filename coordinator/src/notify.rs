//! Notifications: fleet.toml's `[[notify]]` targets, each POSTed the events of a rollout it asked
//! for, as JSON (or Slack's `{"text": …}`).
//!
//! A rollout never waits for a target: each target has a queue and one sender, so a target gets
//! its events once each and in order; a failed delivery is retried with backoff ([`ATTEMPTS`]
//! tries, each bounded by the target's `timeout`), and a delivery that still fails is recorded in
//! the registry as a `notify_failed` event of the deployment. A CLI run waits at most the longest
//! target timeout at its end for its queues to empty ([`Notifier::flush`]).
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::http::Roots;
use crate::registry::Registry;
use ferry_proto::config_file::{self, Problem};

/// Tries per delivery; the waits between them double from [`FIRST_RETRY`].
pub const ATTEMPTS: u32 = 4;
const FIRST_RETRY: Duration = Duration::from_millis(500);

/// What a target may ask to hear about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Started,
    Paused,
    BatchDone,
    Halted,
    RolledBack,
    Succeeded,
    Failed,
    Cancelled,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Started => "started",
            Kind::Paused => "paused",
            Kind::BatchDone => "batch_done",
            Kind::Halted => "halted",
            Kind::RolledBack => "rolled_back",
            Kind::Succeeded => "succeeded",
            Kind::Failed => "failed",
            Kind::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// The whole notification as JSON.
    #[default]
    Json,
    /// `{"text": "…"}`, for Slack's (and Mattermost's, Discord's /slack) incoming webhooks.
    Slack,
}

/// A `[[notify]]` target.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// Names the target in failure records.
    pub name: String,
    /// http:// or https:// (the system's CA roots, or `ca`).
    pub url: String,
    /// The events it gets.
    pub events: Vec<Kind>,
    #[serde(default)]
    pub format: Format,
    /// Only deployments of these environments (default: every one).
    #[serde(default)]
    pub environments: Vec<String>,
    /// How long one delivery attempt may take.
    #[serde(default = "default_timeout", deserialize_with = "config_file::duration::deserialize")]
    pub timeout: Duration,
    #[serde(default)]
    pub ca: Option<PathBuf>,
}

fn default_timeout() -> Duration {
    Duration::from_secs(5)
}

impl Target {
    pub fn problems(&self, key: &str, known_envs: &[&String], p: &mut Vec<Problem>) {
        if self.name.trim().is_empty() {
            p.push(Problem::new(format!("{key}.name"), "must not be empty"));
        }
        if let Err(e) = crate::http::Url::parse(&self.url) {
            p.push(Problem::new(format!("{key}.url"), e));
        }
        if self.events.is_empty() {
            p.push(Problem::new(
                format!("{key}.events"),
                "names no event: started, paused, batch_done, halted, rolled_back, succeeded, failed, cancelled",
            ));
        }
        for env in &self.environments {
            if !known_envs.contains(&env) {
                p.push(Problem::new(format!("{key}.environments"), format!("names no environment {env:?}")));
            }
        }
        if self.timeout.is_zero() {
            p.push(Problem::new(format!("{key}.timeout"), "must be greater than 0"));
        }
    }

    fn wants(&self, kind: Kind, env: &str) -> bool {
        self.events.contains(&kind) && (self.environments.is_empty() || self.environments.iter().any(|e| e == env))
    }
}

/// One notification: its kind, the deployment it is about, and the JSON it carries.
#[derive(Debug, Clone)]
pub struct Note {
    pub kind: Kind,
    pub deployment_id: String,
    pub environment: String,
    pub payload: serde_json::Value,
    /// One line for people (Slack's form).
    pub text: String,
}

/// The queues of fleet.toml's targets. [`OFF`] has none.
pub struct Notifier {
    targets: Vec<(Target, mpsc::UnboundedSender<(u64, Note)>)>,
    pending: Option<Arc<Pending>>,
    registry: Option<Arc<dyn Registry>>,
}

/// The notes queued or being sent: (note number, deployment, kind, target).
#[derive(Default)]
struct Pending {
    changed: tokio::sync::Notify,
    notes: std::sync::Mutex<Vec<(u64, String, Kind, String)>>,
    next: AtomicU64,
}

impl Pending {
    fn add(&self, note: &Note, target: &str) -> u64 {
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut notes) = self.notes.lock() {
            notes.push((n, note.deployment_id.clone(), note.kind, target.to_string()));
        }
        n
    }
    fn done(&self, n: u64) {
        if let Ok(mut notes) = self.notes.lock() {
            notes.retain(|p| p.0 != n);
        }
        self.changed.notify_waiters();
    }
    fn is_empty(&self) -> bool {
        self.notes.lock().map_or(true, |n| n.is_empty())
    }
}

/// No targets: notifying does nothing.
pub static OFF: Notifier = Notifier { targets: Vec::new(), pending: None, registry: None };

impl Notifier {
    /// Starts one sender per target (on the current tokio runtime); failures go to `registry`.
    pub fn start(targets: &[Target], registry: Arc<dyn Registry>) -> Notifier {
        if targets.is_empty() {
            return Notifier { targets: Vec::new(), pending: None, registry: None };
        }
        if tokio::runtime::Handle::try_current().is_err() {
            tracing::warn!("notifications are off: no async runtime to send them from");
            return Notifier { targets: Vec::new(), pending: None, registry: None };
        }
        let pending = Arc::new(Pending::default());
        let targets = targets
            .iter()
            .map(|t| {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(sender(t.clone(), rx, registry.clone(), pending.clone()));
                (t.clone(), tx)
            })
            .collect();
        Notifier { targets, pending: Some(pending), registry: Some(registry) }
    }

    /// Whether any target wants `kind` of `env` (so the caller can skip building the note).
    pub fn wants(&self, kind: Kind, env: &str) -> bool {
        self.targets.iter().any(|(t, _)| t.wants(kind, env))
    }

    /// Queues `note` for every target that wants it; never waits.
    pub fn send(&self, note: &Note) {
        let Some(pending) = &self.pending else { return };
        for (t, tx) in &self.targets {
            if t.wants(note.kind, &note.environment) {
                let n = pending.add(note, &t.name);
                if tx.send((n, note.clone())).is_err() {
                    pending.done(n);
                }
            }
        }
    }

    /// Waits until every queued note was delivered or given up, at most the longest target
    /// timeout; whether they all went. Notes still pending then are recorded as not delivered.
    pub async fn flush(&self) -> bool {
        let Some(pending) = &self.pending else { return true };
        let limit = self.targets.iter().map(|(t, _)| t.timeout).max().unwrap_or_default();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let changed = pending.changed.notified();
            if pending.is_empty() {
                return true;
            }
            tokio::select! {
                () = changed => {}
                () = tokio::time::sleep_until(deadline) => {
                    let left: Vec<_> = pending.notes.lock().map(|n| n.clone()).unwrap_or_default();
                    for (_, id, kind, target) in &left {
                        let message = format!(
                            "notification {} to {target} not delivered: ferry exited while it was still being retried",
                            kind.as_str()
                        );
                        tracing::warn!("{message}");
                        if let Some(registry) = &self.registry
                            && let Err(e) = registry.event(id, None, "notify_failed", &message)
                        {
                            tracing::warn!("recording a failed notification: {e}");
                        }
                    }
                    return left.is_empty();
                }
            }
        }
    }
}

/// A target's sender: its notes one at a time, in order.
async fn sender(
    target: Target,
    mut rx: mpsc::UnboundedReceiver<(u64, Note)>,
    registry: Arc<dyn Registry>,
    pending: Arc<Pending>,
) {
    while let Some((n, note)) = rx.recv().await {
        if let Err(e) = deliver(&target, &note).await {
            let message =
                format!("notification {} to {} ({}) not delivered: {e}", note.kind.as_str(), target.name, target.url);
            tracing::warn!("{message}");
            if let Err(e) = registry.event(&note.deployment_id, None, "notify_failed", &message) {
                tracing::warn!("recording a failed notification: {e}");
            }
        }
        pending.done(n);
    }
}

/// Delivers `note`, retrying with backoff; the last attempt's error.
async fn deliver(target: &Target, note: &Note) -> Result<(), String> {
    let body = match target.format {
        Format::Json => note.payload.to_string(),
        Format::Slack => serde_json::json!({ "text": note.text }).to_string(),
    };
    let roots = target.ca.clone().map_or(Roots::System, Roots::File);
    let mut wait = FIRST_RETRY;
    let mut last = String::new();
    for attempt in 1..=ATTEMPTS {
        let sent = tokio::time::timeout(
            target.timeout,
            crate::http::post_json(&target.url, body.clone().into_bytes(), &roots),
        );
        last = match sent.await {
            Ok(Ok(r)) if (200..300).contains(&r.status) => return Ok(()),
            Ok(Ok(r)) => format!("answered {}", r.status),
            Ok(Err(e)) => e,
            Err(_) => format!("no answer within {}", humantime::format_duration(target.timeout)),
        };
        if attempt < ATTEMPTS {
            tokio::time::sleep(wait).await;
            wait *= 2;
        }
    }
    Err(format!("{last} ({ATTEMPTS} attempts)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(url: &str, events: Vec<Kind>) -> Target {
        Target {
            name: "ops".into(),
            url: url.into(),
            events,
            format: Format::Json,
            environments: vec!["prod".into()],
            timeout: Duration::from_millis(300),
            ca: None,
        }
    }

    #[test]
    fn a_target_gets_only_the_events_and_environments_it_asked_for() {
        let t = target("http://127.0.0.1:1/", vec![Kind::Halted, Kind::RolledBack]);
        assert!(t.wants(Kind::Halted, "prod"));
        assert!(!t.wants(Kind::Started, "prod"));
        assert!(!t.wants(Kind::Halted, "staging"));
        let mut p = Vec::new();
        let prod = "prod".to_string();
        let mut bad = target("slack.com/hook", vec![]);
        bad.environments = vec!["qa".into()];
        bad.problems("notify[0]", &[&prod], &mut p);
        let text: Vec<String> = p.iter().map(ToString::to_string).collect();
        assert_eq!(text.len(), 3, "{text:?}");
        assert!(
            text[0].starts_with("notify[0].url") && text[1].contains("names no event") && text[2].contains("\"qa\"")
        );
    }

    #[tokio::test]
    async fn a_dead_target_is_given_up_after_its_attempts_and_flush_is_bounded() {
        // Nothing listens on port 1: every attempt is refused at once; the backoff (0.5 + 1 + 2 s)
        // outlasts the flush bound (the target's timeout, 300 ms).
        let registry: Arc<dyn Registry> = Arc::new(crate::registry::sqlite::Sqlite::in_memory().expect("registry"));
        let n = Notifier::start(&[target("http://127.0.0.1:1/", vec![Kind::Halted])], registry);
        let note = Note {
            kind: Kind::Halted,
            deployment_id: "d-1".into(),
            environment: "prod".into(),
            payload: serde_json::json!({}),
            text: "halted".into(),
        };
        n.send(&note);
        let started = std::time::Instant::now();
        assert!(!n.flush().await, "the dead target's note is still pending");
        assert!(started.elapsed() < Duration::from_secs(2), "flush waited {:?}", started.elapsed());
        assert!(OFF.flush().await);
    }
}
