//! A rollout's events in words: the line each one prints, and for which host (`"ferry"`: the
//! rollout itself). The live view, plain progress lines and `ferry serve`'s event stream all use
//! these words.
use super::bytes;
use crate::fleet::{StageNote, Swap};
use crate::rollout::Event;
use crate::state::HostState;

fn summary(swap: &Swap) -> String {
    match (&swap.from, swap.changed) {
        (_, false) => format!("{} was already current", swap.to),
        (Some(f), true) => format!("{f} -> {}", swap.to),
        (None, true) => format!("first release {}", swap.to),
    }
}

fn stage_line(note: &StageNote) -> String {
    match note {
        StageNote::ManifestDelta { base, changed, removed } => {
            format!("manifest sent as changes from {base}: {changed} changed, {removed} removed")
        }
        StageNote::WholeManifest { reason } => format!("sending the whole manifest: {reason}"),
        StageNote::AlreadyPresent { release } => format!("release {release} is already on the host"),
        StageNote::Prepared { chunks, missing_bytes, total_bytes } => {
            format!("prepared: {chunks} chunk(s) missing ({} of {})", bytes(*missing_bytes), bytes(*total_bytes))
        }
        StageNote::Uploaded { bytes: sent, delta_chunks } => {
            let from_bases = if *delta_chunks > 0 {
                format!(" ({delta_chunks} chunk(s) as deltas against the host's previous version of the file)")
            } else {
                String::new()
            };
            format!("uploaded {}{from_bases}", bytes(*sent))
        }
        StageNote::FromPeers { chunks, bytes: got, fell_short } => {
            let short =
                if fell_short.is_empty() { String::new() } else { format!("; short: {}", fell_short.join("; ")) };
            format!("fetched {chunks} chunk(s), {} from peers{short}", bytes(*got))
        }
        StageNote::Committed { release } => format!("committed {release}"),
    }
}

/// The line `event` prints and the host it is about; `None` for events that only move the live
/// view (a host's state, its transfer counters, the start). Text from hosts and hooks in it is
/// shown escaped: one event is one line, and it cannot move the cursor.
pub fn event_line<'a>(event: &Event<'a>) -> Option<(&'a str, String)> {
    let (host, line) = words(event)?;
    Some((host, ferry_proto::text::printable(&line).into_owned()))
}

fn words<'a>(event: &Event<'a>) -> Option<(&'a str, String)> {
    const FERRY: &str = "ferry";
    Some(match *event {
        Event::Started { .. } | Event::HostState { .. } | Event::Transfer { .. } => return None,
        Event::Stage { host, note } => (host, stage_line(note)),
        Event::LockBroken { env, lock } => (
            FERRY,
            format!(
                "WARNING: broke the lock of deployment {} ({} on {}, pid {}); if it is still running, two rollouts now touch {env}",
                lock.deployment_id, lock.owner, lock.hostname, lock.pid
            ),
        ),
        Event::BlueGreenTarget { live, idle, members } => (
            FERRY,
            format!(
                "blue-green: {} is live; deploying to {idle} ({}), then switching",
                live.unwrap_or("no group"),
                members.join(", ")
            ),
        ),
        Event::Continuing { id, version, env } => (FERRY, format!("continuing deployment {id} of {version} to {env}")),
        Event::CancellingPaused { id } => {
            (FERRY, format!("cancelling deployment {id} (paused); hosts not yet activated are skipped"))
        }
        Event::Unwinding { id, version } => (FERRY, format!("unwinding deployment {id} of {version}")),
        Event::Batch { number, total, hosts } => (FERRY, format!("batch {number} of {total}: {}", hosts.join(", "))),
        Event::Paused { after, total, env } => (
            FERRY,
            format!(
                "paused after batch {after} of {total}: check it, then `ferry promote --env {env}` to go on (or `ferry rollback --env {env}`)"
            ),
        ),
        Event::Waiting { wait } => {
            (FERRY, format!("pausing {} before the next batch", humantime::format_duration(wait)))
        }
        Event::Halting { reason } => (FERRY, format!("halting: {reason}")),
        Event::Measured { measurement: m, condition } => {
            let verdict = match m.outcome {
                crate::gate::Outcome::Pass => "passed",
                crate::gate::Outcome::Fail => "FAILED",
                crate::gate::Outcome::Inconclusive => "inconclusive",
                crate::gate::Outcome::Skipped => "skipped",
            };
            (FERRY, format!("gate {} after batch {} {verdict} ({condition}): {}", m.gate, m.batch, m.detail))
        }
        Event::Webhook { name, point, error } => match error {
            None => (FERRY, format!("webhook gate {name} at {point}: passed")),
            Some(e) => (FERRY, format!("webhook gate {name} at {point} FAILED: {e}")),
        },
        Event::NoPrevious { host } => (host, "has no previous release to go back to; left on the new one".to_string()),
        Event::Activated { host, swap } => (host, format!("activated ({})", summary(swap))),
        Event::Reverted { host, swap } => {
            let verb = if swap.changed { "rolled back" } else { "unchanged" };
            (host, format!("{verb} ({})", summary(swap)))
        }
        Event::RolledBack { host, swap } => (host, format!("rolled back ({})", summary(swap))),
        Event::HostFailed { host, state, message } => {
            let label = if state == HostState::RolledBack { "ROLLED BACK" } else { "FAILED" };
            (host, format!("{label}: {message}"))
        }
        Event::SwitchingBack { live, idle, members } => {
            (FERRY, format!("blue-green: {live} is live; switching back to {idle} ({})", members.join(", ")))
        }
        Event::Runs { host, release } => (host, format!("runs {release}")),
        Event::Switching { group } => (FERRY, format!("switching {group} live")),
        Event::Live { group } => (FERRY, format!("{group} is live")),
        Event::SwitchFailed { group, error } => (FERRY, format!("switch to {group} FAILED: {error}")),
        Event::SwitchedBack { group } => (FERRY, format!("switched {group} back in")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: a hook's or agent's text reached the terminal raw, so a failure could print a
    /// fake "activated" line or move the cursor over the live view.
    #[test]
    fn text_from_hosts_cannot_fake_a_line_or_move_the_cursor() {
        let message = "probe failed\n  web-1: activated (1 -> 2)\u{1b}[1A\u{1b}[2K";
        let event = Event::HostFailed { host: "web-1", state: HostState::Failed, message };
        let (host, line) = event_line(&event).expect("a line");
        assert_eq!(host, "web-1");
        assert!(!line.contains('\n') && !line.contains('\u{1b}'), "{line:?}");
        assert!(line.starts_with("FAILED: probe failed\\n  web-1: activated"), "{line}");
    }
}
