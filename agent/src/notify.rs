//! systemd integration: `READY=1` once serving, `STOPPING=1` on shutdown, watchdog pings.
//!
//! All calls are no-ops when the agent was not started by systemd (no `NOTIFY_SOCKET`), so the same
//! binary runs by hand and in tests.
use std::time::Duration;

use tokio_util::sync::CancellationToken;

#[cfg(feature = "sd-notify")]
fn send(state: &[(&str, &str)]) {
    if let Err(e) = systemd::daemon::notify(state.iter()) {
        tracing::warn!(error = %e, ?state, "sd_notify failed");
    }
}

#[cfg(not(feature = "sd-notify"))]
fn send(_: &[(&str, &str)]) {}

/// Tells systemd the agent is serving.
pub fn ready() {
    send(&[("READY", "1"), ("STATUS", "serving")]);
}

/// Tells systemd the agent is shutting down.
pub fn stopping() {
    send(&[("STOPPING", "1"), ("STATUS", "shutting down: finishing in-flight requests")]);
}

/// Tells systemd the agent is still stopping, and why: it gets `extend` more time before the
/// unit's stop timeout (`TimeoutStopSec=`) would kill it.
pub fn still_stopping(extend: Duration, status: &str) {
    let usec = extend.as_micros().to_string();
    send(&[("EXTEND_TIMEOUT_USEC", usec.as_str()), ("STATUS", status)]);
}

/// The watchdog interval systemd expects pings at, if it set one for this process.
pub fn watchdog_interval() -> Option<Duration> {
    #[cfg(not(feature = "sd-notify"))]
    return None;
    #[cfg(feature = "sd-notify")]
    match systemd::daemon::watchdog_enabled() {
        Ok(0) => None,
        Ok(usec) => Some(Duration::from_micros(usec)),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the watchdog setting");
            None
        }
    }
}

/// Pings the watchdog at half its interval until `shutdown`. The pings come from the runtime that
/// serves requests, so a wedged runtime stops them and systemd restarts the agent.
pub async fn watchdog(interval: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(interval / 2);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => send(&[("WATCHDOG", "1")]),
        }
    }
}
