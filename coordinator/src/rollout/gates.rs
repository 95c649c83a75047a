//! The engine's outside signals: metric gates baked after each batch and during timed canary
//! pauses, webhook gates at their points, and notifications ([`crate::notify`]).
//!
//! A batch's bake runs every metric gate of the environment at once, each measuring every
//! `interval` for its `bake` (or the pause's length); each measurement is recorded before it is
//! judged further. The first gate past its budget ends the bake at once with the reason the
//! rollout halts for. A bake that passed is recorded (`gates_passed`, with its batch), so a
//! coordinator resumed after dying mid-bake bakes that batch again instead of moving on.
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde_json::json;

use super::{Engine, Error, Event};
use crate::gate::{MetricGate, Outcome, Point, Scope};
use crate::notify::{Kind, Note};
use crate::registry::{HostRow, Measurement, now_ms};
use crate::state::HostState;

/// The registry event a passed bake leaves.
const PASSED: &str = "gates_passed";

impl Engine<'_> {
    /// Bakes batch `batch` (from 0) of deployment `id` for `length` (each gate's own `bake` when
    /// `None`); the reason to halt, if a gate failed.
    pub(super) async fn bake(&self, id: &str, batch: usize, length: Option<Duration>) -> Result<Option<String>, Error> {
        let env = self.environment()?;
        if env.gates.is_empty() {
            return Ok(None);
        }
        let scope = self.scope(id, batch)?;
        if scope.batch.is_empty() {
            // Nothing of this batch runs the new release (failed or unchanged): nothing to judge.
            return Ok(None);
        }
        let mut gates: FuturesUnordered<_> =
            env.gates.iter().map(|g| self.measure(id, batch, g, &scope, length.unwrap_or(g.bake))).collect();
        while let Some(verdict) = gates.next().await {
            if let Some(reason) = verdict? {
                return Ok(Some(reason));
            }
        }
        if !self.cancel.is_cancelled() {
            self.registry.event(id, None, PASSED, &format!("batch {}", batch + 1))?;
        }
        Ok(None)
    }

    /// Whether batch `batch`'s bake passed before (a resumed deployment).
    pub(super) fn baked(&self, id: &str, batch: usize) -> Result<bool, Error> {
        let mark = format!("batch {}", batch + 1);
        Ok(self.registry.events_since(id, 0)?.iter().any(|e| e.kind == PASSED && e.message == mark))
    }

    /// One gate's measurements over `length`; the reason to halt once it is past its budget.
    async fn measure(
        &self,
        id: &str,
        batch: usize,
        gate: &MetricGate,
        scope: &Scope,
        length: Duration,
    ) -> Result<Option<String>, Error> {
        let (mut failed, mut inconclusive) = (0, 0);
        let query = scope.fill(&gate.query);
        let baseline = gate.baseline_query.as_deref().map(|q| scope.fill(q));
        let count = gate.measurements(length);
        for n in 1..=count {
            tokio::select! {
                () = tokio::time::sleep(gate.interval) => {}
                () = self.cancel.cancelled() => return Ok(None),
            }
            let at = now_ms();
            let verdict = if baseline.is_some() && scope.baseline.is_empty() {
                crate::gate::Verdict {
                    outcome: Outcome::Skipped,
                    value: None,
                    baseline: None,
                    detail: "no host is left on the old release to compare with".into(),
                }
            } else {
                #[allow(clippy::cast_precision_loss)]
                let secs = at as f64 / 1000.0;
                let (answer, base) = match &baseline {
                    None => (crate::gate::query(gate, &query, secs).await, None),
                    Some(b) => {
                        let (a, b) =
                            tokio::join!(crate::gate::query(gate, &query, secs), crate::gate::query(gate, b, secs));
                        (a, Some(b))
                    }
                };
                crate::gate::judge(gate, answer, base)
            };
            let m = Measurement {
                deployment_id: id.to_string(),
                batch: u32::try_from(batch + 1).unwrap_or(u32::MAX),
                gate: gate.name.clone(),
                at_ms: at,
                outcome: verdict.outcome,
                value: verdict.value,
                baseline: verdict.baseline,
                detail: verdict.detail,
            };
            self.registry.record_measurement(&m)?;
            self.emit(&Event::Measured { measurement: &m, condition: &gate.condition });
            match m.outcome {
                Outcome::Fail => failed += 1,
                Outcome::Inconclusive => inconclusive += 1,
                Outcome::Pass | Outcome::Skipped => {}
            }
            let of = format!("measurement {n} of {count} after batch {}", batch + 1);
            if failed > gate.max_failures {
                return Ok(Some(format!(
                    "metric gate {} failed: {} ({of}; max_failures = {})",
                    gate.name, m.detail, gate.max_failures
                )));
            }
            if inconclusive > gate.max_inconclusive {
                return Ok(Some(format!(
                    "metric gate {} was inconclusive {inconclusive} time(s), more than max_inconclusive = {}: {} ({of})",
                    gate.name, gate.max_inconclusive, m.detail
                )));
            }
        }
        Ok(None)
    }

    /// The hosts the placeholders of batch `batch` stand for.
    fn scope(&self, id: &str, batch: usize) -> Result<Scope, Error> {
        let d = self
            .registry
            .deployment(id)?
            .ok_or_else(|| Error::Corrupt { id: id.to_string(), reason: "it vanished from the registry".into() })?;
        let rows = self.registry.hosts(id)?;
        let inventory = self.inventory()?;
        let pick = |f: &dyn Fn(&HostRow) -> bool| -> Vec<(String, String)> {
            rows.iter()
                .filter(|h| f(h))
                .map(|h| {
                    let addr = inventory.get(&h.host).map(|i| i.address.clone()).unwrap_or_default();
                    (h.host.clone(), addr)
                })
                .collect()
        };
        let on_new = |h: &HostRow| matches!(h.state, HostState::Healthy | HostState::Unchanged);
        Ok(Scope {
            env: self.env.to_string(),
            app: d.app.clone(),
            version: d.version.clone(),
            batch: pick(&|h| usize::try_from(h.batch).ok() == Some(batch) && h.state == HostState::Healthy),
            updated: pick(&on_new),
            baseline: pick(&|h| {
                matches!(h.state, HostState::Pending | HostState::Staging | HostState::Staged | HostState::Skipped)
            }),
        })
    }

    /// Calls the environment's webhook gates for `point`; the reason to halt if one failed.
    pub(super) async fn webhooks(&self, id: &str, point: Point, batch: Option<usize>) -> Result<Option<String>, Error> {
        let env = self.environment()?;
        let hooks: Vec<_> = env.webhooks.iter().filter(|w| w.at.contains(&point)).collect();
        if hooks.is_empty() {
            return Ok(None);
        }
        let mut payload = self.payload(id, batch, None)?;
        payload["point"] = json!(point.as_str());
        for hook in hooks {
            let result = hook.call(&payload).await;
            self.emit(&Event::Webhook { name: &hook.name, point: point.as_str(), error: result.as_ref().err() });
            let message = match &result {
                Ok(()) => format!("{} at {}: passed", hook.name, point.as_str()),
                Err(e) => format!("{} at {}: {e}", hook.name, point.as_str()),
            };
            self.registry.event(id, None, "webhook_gate", &message)?;
            if let Err(e) = result {
                return Ok(Some(e));
            }
        }
        Ok(None)
    }

    /// Deployment `id` as notifications and webhook gates see it.
    fn payload(&self, id: &str, batch: Option<usize>, reason: Option<&str>) -> Result<serde_json::Value, Error> {
        let d = self
            .registry
            .deployment(id)?
            .ok_or_else(|| Error::Corrupt { id: id.to_string(), reason: "it vanished from the registry".into() })?;
        let rows = self.registry.hosts(id)?;
        let hosts: Vec<_> = rows
            .iter()
            .map(|h| json!({ "name": h.host, "batch": h.batch + 1, "state": h.state, "error": h.error }))
            .collect();
        Ok(json!({
            "deployment_id": d.id,
            "kind": d.kind,
            "environment": d.environment,
            "app": d.app,
            "version": d.version,
            "status": d.status,
            "batch": batch.map(|b| b + 1),
            "batches": rows.iter().map(|h| h.batch + 1).max().unwrap_or(0),
            "reason": reason.or(d.error.as_deref()),
            "hosts": hosts,
            "at_ms": now_ms(),
        }))
    }

    /// Queues notification `kind` of deployment `id` for the targets that want it. A failure to
    /// build it is logged, never a rollout's error.
    pub(super) fn notify(&self, kind: Kind, id: &str, batch: Option<usize>, reason: Option<&str>) {
        if !self.notifier.wants(kind, self.env) {
            return;
        }
        let mut payload = match self.payload(id, batch, reason) {
            Ok(p) => p,
            Err(e) => return tracing::warn!("notification {} of {id}: {e}", kind.as_str()),
        };
        payload["event"] = json!(kind.as_str());
        let text = note_text(kind, &payload);
        self.notifier.send(&Note {
            kind,
            deployment_id: id.to_string(),
            environment: self.env.to_string(),
            payload,
            text,
        });
    }
}

/// A notification in one line (Slack's form).
fn note_text(kind: Kind, p: &serde_json::Value) -> String {
    let s = |k: &str| p[k].as_str().unwrap_or_default().to_string();
    let what = if s("app").is_empty() { s("version") } else { format!("{} {}", s("app"), s("version")) };
    let mut line = format!("ferry: {} {what} to {}: {}", s("kind"), s("environment"), kind.as_str().replace('_', " "));
    if let Some(b) = p["batch"].as_u64() {
        line.push_str(&format!(" (batch {b} of {})", p["batches"]));
    }
    if let Some(r) = p["reason"].as_str() {
        line.push_str(&format!(": {r}"));
    }
    let hosts: Vec<String> = p["hosts"]
        .as_array()
        .map(|hs| {
            hs.iter()
                .map(|h| format!("{} {}", h["name"].as_str().unwrap_or("?"), h["state"].as_str().unwrap_or("?")))
                .collect()
        })
        .unwrap_or_default();
    line.push_str(&format!(" [{}] ({})", hosts.join(", "), s("deployment_id")));
    line
}
