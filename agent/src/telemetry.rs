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
use ferry_proto::audit_file::RefusalSampler;

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

/// Refusals recorded one by one per minute: the first from each address, at most 10 in all.
const REFUSALS_PER_ADDRESS: usize = 1;
const REFUSALS_PER_MINUTE: usize = 10;

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
            refusal_sampler: std::sync::Mutex::new(RefusalSampler::new(REFUSALS_PER_ADDRESS, REFUSALS_PER_MINUTE)),
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
    /// ([`RefusalSampler`]: the first per address per minute, at most 10): refusal noise cannot rotate command records out of the audit log.
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
