//! What a rollout tells its front end while it runs: typed events, worded by the output layer
//! (`ui`), streamed by `ferry serve`. The engine never formats text for people.
use std::sync::Arc;
use std::time::Duration;

use crate::fleet::{StageNote, Swap, Transfer};
use crate::registry::Lock;
use crate::state::HostState;

/// One thing that happened. `host` fields name a host of the inventory.
#[derive(Debug, Clone)]
pub enum Event<'a> {
    /// Deployment `id` is recorded and holds the environment (once per run, before any host is
    /// touched).
    Started {
        id: &'a str,
    },
    /// `host` moved to `state` (committed to the registry).
    HostState {
        host: &'a str,
        state: HostState,
    },
    /// The live byte counters of `host`'s transfer (once per host, in plan order).
    Transfer {
        host: &'a str,
        transfer: &'a Arc<Transfer>,
    },
    /// A step of `host`'s staging.
    Stage {
        host: &'a str,
        note: &'a StageNote,
    },
    /// `--force-unlock` broke another deployment's lock on `env`.
    LockBroken {
        env: &'a str,
        lock: &'a Lock,
    },
    /// blue-green: `idle` (`members`) is deployed to while `live` serves.
    BlueGreenTarget {
        live: Option<&'a str>,
        idle: &'a str,
        members: &'a [String],
    },
    /// A resumed or promoted deployment goes on.
    Continuing {
        id: &'a str,
        version: &'a str,
        env: &'a str,
    },
    /// A paused deployment is recorded cancelled.
    CancellingPaused {
        id: &'a str,
    },
    /// `ferry rollback` unwinds an unfinished deployment.
    Unwinding {
        id: &'a str,
        version: &'a str,
    },
    /// Batch `number` (from 1) of `total` starts.
    Batch {
        number: usize,
        total: usize,
        hosts: &'a [&'a str],
    },
    /// Paused after batch `after` (from 1) of `total` until `ferry promote`.
    Paused {
        after: usize,
        total: usize,
        env: &'a str,
    },
    /// Waiting `wait` before the next batch.
    Waiting {
        wait: Duration,
    },
    /// A metric gate measured (recorded in the registry).
    Measured {
        measurement: &'a crate::registry::Measurement,
        condition: &'a str,
    },
    /// A webhook gate answered at `point` (`error`: it failed).
    Webhook {
        name: &'a str,
        point: &'a str,
        error: Option<&'a String>,
    },
    /// The rollout stops.
    Halting {
        reason: &'a str,
    },
    /// A halt cannot send `host` back: it had no release before.
    NoPrevious {
        host: &'a str,
    },
    /// `host` runs the new release.
    Activated {
        host: &'a str,
        swap: &'a Swap,
    },
    /// A rollback switched `host` (or found it already there: `swap.changed` is false).
    Reverted {
        host: &'a str,
        swap: &'a Swap,
    },
    /// A halt sent `host` back to the release it ran before.
    RolledBack {
        host: &'a str,
        swap: &'a Swap,
    },
    /// `host` ended in a failure `state` (failed, unreachable, rolled back by its agent).
    HostFailed {
        host: &'a str,
        state: HostState,
        message: &'a str,
    },
    /// blue-green rollback: `idle` (`members`) is made live again instead of `live`.
    SwitchingBack {
        live: &'a str,
        idle: &'a str,
        members: &'a [String],
    },
    /// `host` runs `release` (checked before a blue-green switch back).
    Runs {
        host: &'a str,
        release: &'a str,
    },
    /// blue-green: `switch` runs to make `group` live.
    Switching {
        group: &'a str,
    },
    Live {
        group: &'a str,
    },
    SwitchFailed {
        group: &'a str,
        error: &'a str,
    },
    /// `group`, live before, was switched back in.
    SwitchedBack {
        group: &'a str,
    },
}

/// Where a rollout's events go. A plain `Fn(&Event)` is one.
pub trait Observer: Sync {
    fn event(&self, event: &Event<'_>);
}

impl<F: Fn(&Event<'_>) + Sync> Observer for F {
    fn event(&self, event: &Event<'_>) {
        self(event);
    }
}

/// Drops every event (JSON output, benchmarks).
pub fn quiet(_: &Event<'_>) {}
