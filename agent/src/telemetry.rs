//! What the agent tells operators about itself: its [`Metrics`], its [`AuditLog`], and whether
//! the gRPC server is serving (for `/ready` and `/health`). One [`Telemetry`] per agent, shared
//! by the server, the service and the HTTP endpoint.
//!
//! Recording never fails a command: an audit line that cannot be written is logged as an error
//! with its content (so the journal still has it), counted, and turns `/health` unhealthy until a
//! later line is written.
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use crate::audit::{AuditError, AuditLog, Entry};
use crate::config::AgentConfig;
use crate::metrics::{self, Metrics};

/// The gRPC server's state, as `/ready` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serving {
    Starting = 0,
    Serving = 1,
    Stopping = 2,
}

pub struct Telemetry {
    pub metrics: Metrics,
    pub audit: AuditLog,
    audit_ok: AtomicBool,
    serving: AtomicU8,
    /// The gRPC address, for `/health`.
    grpc_addr: std::sync::Mutex<Option<SocketAddr>>,
    /// When a shed connection was last logged.
    last_shed_log: std::sync::Mutex<Option<std::time::Instant>>,
    refusal_sampler: std::sync::Mutex<RefusalSampler>,
}

/// The window refusals are sampled over.
pub const REFUSAL_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);
/// Refusals recorded one by one per window: the first from each address, up to this many.
pub const REFUSAL_LINES: usize = 10;
/// Addresses of unrecorded refusals remembered per window (for the summary's count).
const REFUSAL_SOURCES: usize = 10_000;

/// Which refused connections the audit log records one by one: in each [`REFUSAL_WINDOW`], the
/// first refusal of each address, at most [`REFUSAL_LINES`] in all; the rest are summed up in
/// one line when the next window starts. So a flood writes at most 11 lines a minute.
#[derive(Debug, Default)]
pub struct RefusalSampler {
    started: Option<std::time::Instant>,
    recorded: std::collections::HashSet<std::net::IpAddr>,
    suppressed: u64,
    suppressed_from: std::collections::HashSet<std::net::IpAddr>,
}

impl RefusalSampler {
    /// Whether to record a refusal from `ip` at `now`, and the summary (count, addresses) of
    /// the window that just ended, if it left refusals unrecorded.
    pub fn admit(&mut self, ip: std::net::IpAddr, now: std::time::Instant) -> (bool, Option<(u64, usize)>) {
        let mut summary = None;
        if self.started.is_none_or(|s| now.duration_since(s) >= REFUSAL_WINDOW) {
            if self.suppressed > 0 {
                summary = Some((self.suppressed, self.suppressed_from.len()));
            }
            *self = RefusalSampler { started: Some(now), ..RefusalSampler::default() };
        }
        if !self.recorded.contains(&ip) && self.recorded.len() < REFUSAL_LINES {
            self.recorded.insert(ip);
            return (true, summary);
        }
        self.suppressed += 1;
        if self.suppressed_from.len() < REFUSAL_SOURCES {
            self.suppressed_from.insert(ip);
        }
        (false, summary)
    }
}

impl Telemetry {
    /// Metrics for the configured apps, and the audit log opened (created if needed).
    pub fn new(config: &AgentConfig) -> Result<Arc<Telemetry>, AuditError> {
        let audit = AuditLog::open(&config.audit_path(), config.audit.max_bytes, config.audit.keep)?;
        Ok(Arc::new(Telemetry {
            metrics: Metrics::new(config.apps.keys().map(String::as_str)),
            audit,
            audit_ok: AtomicBool::new(true),
            serving: AtomicU8::new(Serving::Starting as u8),
            grpc_addr: std::sync::Mutex::new(None),
            last_shed_log: std::sync::Mutex::new(None),
            refusal_sampler: std::sync::Mutex::new(RefusalSampler::default()),
        }))
    }

    pub fn set_serving(&self, state: Serving, addr: Option<SocketAddr>) {
        self.serving.store(state as u8, Ordering::SeqCst);
        if let Some(a) = addr {
            *self.grpc_addr.lock().unwrap_or_else(|p| p.into_inner()) = Some(a);
        }
    }

    pub fn serving(&self) -> (Serving, Option<SocketAddr>) {
        let state = match self.serving.load(Ordering::SeqCst) {
            1 => Serving::Serving,
            2 => Serving::Stopping,
            _ => Serving::Starting,
        };
        (state, *self.grpc_addr.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Whether the last audit line was written.
    pub fn audit_ok(&self) -> bool {
        self.audit_ok.load(Ordering::SeqCst)
    }

    /// Writes `entry` to the audit log (durably) before returning.
    pub async fn audit(self: &Arc<Self>, entry: Entry) {
        let line = serde_json::to_string(&entry).unwrap_or_default();
        let log = self.clone();
        let written = match tokio::task::spawn_blocking(move || log.audit.append(&entry)).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(e) => Err(format!("audit log: worker failed: {e}")),
        };
        match written {
            Ok(()) => self.audit_ok.store(true, Ordering::SeqCst),
            Err(e) => {
                self.audit_ok.store(false, Ordering::SeqCst);
                self.metrics.inc(&metrics::AUDIT_FAILURES, &[]);
                tracing::error!(record = line, "cannot write the audit log: {e}");
            }
        }
    }

    /// Counts a connection closed before its handshake because too many were in progress
    /// (`reason="busy"`); whether it is time for a log line (at most one every 10 seconds).
    pub fn shed(&self) -> bool {
        self.metrics.inc(&metrics::REFUSED, &["busy"]);
        let now = std::time::Instant::now();
        let Ok(mut last) = self.last_shed_log.lock() else { return false };
        let due = last.is_none_or(|t| now.duration_since(t) >= std::time::Duration::from_secs(10));
        if due {
            *last = Some(now);
        }
        due
    }

    /// A connection refused in the TLS handshake: counted by `kind`, and audited as sampled
    /// ([`RefusalSampler`]): refusal noise cannot rotate command records out of the audit log.
    pub async fn refused(self: &Arc<Self>, peer_addr: SocketAddr, presented: &str, kind: &str, reason: &str) {
        self.metrics.inc(&metrics::REFUSED, &[kind]);
        let (record, summary) = match self.refusal_sampler.lock() {
            Ok(mut s) => s.admit(peer_addr.ip(), std::time::Instant::now()),
            Err(_) => (false, None),
        };
        if let Some((count, sources)) = summary {
            let entry = Entry {
                result: "suppressed".into(),
                detail: format!(
                    "{count} more refused connection(s) from {sources} address(es) in the previous minute, not recorded one by one (all are counted in ferry_agent_refused_connections_total)"
                ),
                ..Entry::new("connect", "", "-")
            };
            self.audit(entry).await;
        }
        if record {
            let entry = Entry {
                result: "refused".into(),
                detail: reason.to_string(),
                ..Entry::new("connect", presented, &peer_addr.to_string())
            };
            self.audit(entry).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};
    use std::time::{Duration, Instant};

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))
    }

    /// Regression: every refusal was its own fsync'd audit line, so ~10,000 refusals a second
    /// rotated every command record away. Now a window records the first refusal of each address,
    /// at most REFUSAL_LINES, and the next window starts with one line summing up the rest.
    #[test]
    fn a_refusal_flood_writes_a_few_lines_a_minute() {
        let mut s = RefusalSampler::default();
        let t0 = Instant::now();
        let mut lines = 0;
        for i in 0..10_000u32 {
            let (record, summary) = s.admit(ip(i % 50), t0 + Duration::from_millis(u64::from(i) / 1000));
            assert_eq!(summary, None);
            lines += usize::from(record);
        }
        assert_eq!(lines, REFUSAL_LINES);
        // The next window sums up the 9,990 refusals from the 50 addresses it did not record.
        let (record, summary) = s.admit(ip(7), t0 + REFUSAL_WINDOW + Duration::from_secs(1));
        assert!(record);
        assert_eq!(summary, Some((10_000 - REFUSAL_LINES as u64, 50)));
        // One address alone is recorded once per window.
        let (again, _) = s.admit(ip(7), t0 + REFUSAL_WINDOW + Duration::from_secs(2));
        assert!(!again);
    }
}
