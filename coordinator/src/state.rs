//! The rollout state machine, pure (DESIGN §5): the status values the registry stores, their time
//! limits, and [`next`], the one function that says what a deployment does next. The registry
//! persists a state per host; the engine asks [`next`] what to do from whatever is persisted, does
//! it, records the outcome and asks again. So a fresh deployment, one resumed after its
//! coordinator died, and a rollback take the same path, and the rules (batch order, failure
//! budget, pauses, cancel) are property-tested here without hosts.
//!
//! Host: `pending → staging → staged → activating → healthy`, or `→ failed | unreachable |
//! rolled_back` (the agent rolled itself back), `healthy → rolling_back → rolled_back` (halted
//! with auto_rollback), `unchanged` (already ran the release), `skipped` (never reached).
//! A rollback's hosts go `pending → activating → healthy | unchanged | failed` (no staging).
//!
//! Every value is named once, in one table per type (`named!`: [`HostState`],
//! [`DeploymentStatus`], [`DeploymentKind`]) with its text and description; readers and writers
//! use the variants, never the strings.

use crate::plan::Pause;

/// The one table of a status type: each variant, its name (as stored and shown) and what it
/// means. Gives `ALL`, `as_str`, `parse`, `description` and `Display`; the matches are
/// exhaustive, so a variant missing from its table does not compile.
macro_rules! named {
    ($t:ident { $($v:ident => $name:literal, $what:literal;)* }) => {
        impl $t {
            /// Every value, in the table's order.
            pub const ALL: [$t; [$(stringify!($v)),*].len()] = [$($t::$v),*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($t::$v => $name,)*
                }
            }

            pub fn parse(s: &str) -> Option<$t> {
                match s {
                    $($name => Some($t::$v),)*
                    _ => None,
                }
            }

            /// What the value means.
            pub fn description(self) -> &'static str {
                match self {
                    $($t::$v => $what,)*
                }
            }
        }

        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

pub(crate) use named;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    Pending,
    Staging,
    Staged,
    Unchanged,
    Activating,
    Healthy,
    Failed,
    Unreachable,
    RollingBack,
    RolledBack,
    Skipped,
}

named! {
    HostState {
        Pending => "pending", "not yet touched by this deployment";
        Staging => "staging", "the release is being transferred and built beside the current one";
        Staged => "staged", "the release is on the host, not active yet";
        Unchanged => "unchanged", "the host already ran the release: nothing changed";
        Activating => "activating", "swap, restarts, hooks and health probes in progress";
        Healthy => "healthy", "the host runs the release and passed its health probes";
        Failed => "failed", "the step failed on the host (see its error)";
        Unreachable => "unreachable", "the host could not be reached or authenticated";
        RollingBack => "rolling_back", "going back to the release it ran before (a halt with auto_rollback)";
        RolledBack => "rolled_back", "back on its previous release, which is healthy";
        Skipped => "skipped", "never reached: the deployment ended first";
    }
}

impl HostState {
    /// Nothing more happens to the host in this deployment (unless a halt rolls it back).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            HostState::Unchanged
                | HostState::Healthy
                | HostState::Failed
                | HostState::Unreachable
                | HostState::RolledBack
                | HostState::Skipped
        )
    }

    /// Counts against `max_failures`.
    pub fn is_failure(self) -> bool {
        matches!(self, HostState::Failed | HostState::Unreachable | HostState::RolledBack)
    }

    /// Not yet staged: the transfer still has to happen.
    fn needs_staging(self) -> bool {
        matches!(self, HostState::Pending | HostState::Staging)
    }
}

impl HostState {
    /// How long a host may stay in this state before the engine fails it (`None`: it is not
    /// working on anything, or it is finished). The limits come from the environment
    /// (`progress_deadline`).
    pub fn time_limit(self, limits: &Limits) -> Option<std::time::Duration> {
        self.work().map(|(_, limit)| limit(limits))
    }

    /// The step a working state stands for, in messages ("staging did not finish within 10m").
    pub fn step(self) -> &'static str {
        self.work().map_or(self.as_str(), |(step, _)| step)
    }

    /// A working state's step and which of the [`Limits`] bounds it; `None` for a state that
    /// waits (for its batch) or is finished.
    fn work(self) -> Option<(&'static str, LimitOf)> {
        match self {
            HostState::Staging => Some(("staging", |l| l.stage)),
            HostState::Activating => Some(("activation", |l| l.activate)),
            HostState::RollingBack => Some(("rollback", |l| l.rollback)),
            HostState::Pending
            | HostState::Staged
            | HostState::Unchanged
            | HostState::Healthy
            | HostState::Failed
            | HostState::Unreachable
            | HostState::RolledBack
            | HostState::Skipped => None,
        }
    }
}

/// Which of the [`Limits`] bounds a working state.
type LimitOf = fn(&Limits) -> std::time::Duration;

/// How long each working state may last on one host. A deployment's progress deadline follows:
/// outside its pauses, no step waits longer than these for a host to move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub stage: std::time::Duration,
    pub activate: std::time::Duration,
    pub rollback: std::time::Duration,
}

impl Limits {
    /// Every working state bounded by the environment's `progress_deadline`.
    pub fn all(deadline: std::time::Duration) -> Limits {
        Limits { stage: deadline, activate: deadline, rollback: deadline }
    }
}

/// Where a deployment stands, as the registry stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentStatus {
    /// Recorded, not started yet.
    Pending,
    Running,
    /// Waiting at a canary step for `ferry promote`.
    Paused,
    Succeeded,
    /// Halted (more failed hosts than `max_failures`), or finished with failed hosts within it.
    Failed,
    /// Halted, and every host it had updated went back to its previous release.
    RolledBack,
    /// Stopped by the operator; hosts not yet activated were not touched.
    Cancelled,
}

named! {
    DeploymentStatus {
        Pending => "pending", "recorded, not started yet";
        Running => "running", "a coordinator is working on it";
        Paused => "paused", "waiting at a canary step for `ferry promote`";
        Succeeded => "succeeded", "every host runs the release";
        Failed => "failed", "halted, or finished with failed hosts (within max_failures)";
        RolledBack => "rolled_back", "halted, and every updated host went back";
        Cancelled => "cancelled", "stopped by the operator; hosts not activated were untouched";
    }
}

impl DeploymentStatus {
    /// Nothing more happens to the deployment.
    pub fn is_finished(self) -> bool {
        match self {
            DeploymentStatus::Pending | DeploymentStatus::Running | DeploymentStatus::Paused => false,
            DeploymentStatus::Succeeded
            | DeploymentStatus::Failed
            | DeploymentStatus::RolledBack
            | DeploymentStatus::Cancelled => true,
        }
    }
}

/// What a deployment does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentKind {
    /// A new release to an environment (`ferry deploy`, a promotion).
    Deploy,
    /// Hosts switched back to a release they keep (`ferry rollback`).
    Rollback,
}

named! {
    DeploymentKind {
        Deploy => "deploy", "a new release to an environment";
        Rollback => "rollback", "hosts switched back to a release they keep";
    }
}

/// Whether the engine may move a host from `from` to `to`. Repeating `staging`, `activating` or
/// `rolling_back` is how a resumed deployment retries the step its coordinator died in.
pub fn legal(from: HostState, to: HostState) -> bool {
    use HostState::*;
    match from {
        // Unchanged: already runs the target (a blue-green rollback's group, checked in place).
        Pending => matches!(to, Staging | Activating | Unchanged | Skipped),
        Staging => matches!(to, Staging | Staged | Unchanged | Failed | Unreachable | Skipped),
        Staged => matches!(to, Activating | Failed | Unreachable | Skipped),
        Activating => matches!(to, Activating | Healthy | Unchanged | Failed | Unreachable | RolledBack | RollingBack),
        // After-host hook failures, and halts rolling updated hosts back.
        Healthy => matches!(to, Failed | RollingBack),
        // A halt also tries hosts that failed or went silent after their swap began.
        Failed | Unreachable => matches!(to, RollingBack),
        RollingBack => matches!(to, RollingBack | RolledBack | Failed | Unreachable),
        Unchanged | RolledBack | Skipped => false,
    }
}

/// One host as [`next`] sees it: its state and the batch it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Host {
    pub state: HostState,
    pub batch: usize,
}

/// The rules of one deployment, as planned (and stored, so a resume follows the same ones).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    pub max_failures: usize,
    /// Hosts need the release transferred before activation (a deployment); a rollback's hosts
    /// already keep what they switch to.
    pub stage: bool,
    /// Stage every host before the first activation (default); otherwise each batch is staged
    /// just before it is activated.
    pub prestage: bool,
    /// The pause after each batch (by batch index; missing = none).
    pub pauses: Vec<Option<Pause>>,
}

/// How a deployment ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    /// Some hosts failed, no more than `max_failures`.
    Failed,
}

/// What the engine does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Transfer the release to these hosts (indexes), in parallel.
    Stage(Vec<usize>),
    /// Activate these hosts of `batch` together.
    Activate {
        batch: usize,
        hosts: Vec<usize>,
    },
    /// Wait after `after` (just activated) before the next batch.
    Pause {
        after: usize,
        pause: Pause,
    },
    /// More hosts failed than the budget allows: stop (and roll back, if configured).
    Halt,
    /// The operator cancelled: skip what has not been activated.
    Cancel,
    Finish(Outcome),
}

/// The next step from the persisted host states. `just_activated` is the batch this run activated
/// last (a pause follows only a batch activated by this run, so `ferry promote` goes on);
/// `cancelled` is set by Ctrl-C and honoured between steps, never inside one.
pub fn next(hosts: &[Host], rules: &Rules, just_activated: Option<usize>, cancelled: bool) -> Next {
    let indexes = |want: &dyn Fn(&Host) -> bool| -> Vec<usize> {
        hosts.iter().enumerate().filter(|(_, h)| want(h)).map(|(i, _)| i).collect()
    };
    // A host caught mid-activation (its coordinator died) is finished first, whatever else holds:
    // it may already run the release, and only its agent can say (a repeated activation of the
    // current release is a no-op there). A halt or a cancel then starts from what is known.
    if let Some(batch) = hosts.iter().filter(|h| h.state == HostState::Activating).map(|h| h.batch).min() {
        return Next::Activate { batch, hosts: indexes(&|h| h.batch == batch && h.state == HostState::Activating) };
    }
    let failures = hosts.iter().filter(|h| h.state.is_failure()).count();
    if failures > rules.max_failures {
        return Next::Halt;
    }
    if cancelled {
        return Next::Cancel;
    }
    if rules.stage && rules.prestage {
        let stage = indexes(&|h| h.state.needs_staging());
        if !stage.is_empty() {
            return Next::Stage(stage);
        }
    }
    // The first batch with work left; every batch before it is done.
    let Some(batch) = hosts.iter().filter(|h| !h.state.is_terminal()).map(|h| h.batch).min() else {
        return Next::Finish(if failures > 0 { Outcome::Failed } else { Outcome::Succeeded });
    };
    if let Some(after) = just_activated
        && after < batch
        && let Some(Some(pause)) = rules.pauses.get(after)
    {
        return Next::Pause { after, pause: *pause };
    }
    if rules.stage {
        let stage = indexes(&|h| h.batch == batch && h.state.needs_staging());
        if !stage.is_empty() {
            return Next::Stage(stage);
        }
    }
    // Left in the batch: staged (or pending, for a rollback) or activating (a rolling_back host
    // only exists after a halt).
    Next::Activate { batch, hosts: indexes(&|h| h.batch == batch && !h.state.is_terminal()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{any, prop_assert, prop_assert_eq, proptest};
    use proptest::strategy::Strategy as Gen;
    use std::time::Duration;

    use HostState::*;

    fn hosts(states: &[(HostState, usize)]) -> Vec<Host> {
        states.iter().map(|&(state, batch)| Host { state, batch }).collect()
    }

    fn rules(max_failures: usize, prestage: bool, pauses: Vec<Option<Pause>>) -> Rules {
        Rules { max_failures, stage: true, prestage, pauses }
    }

    #[test]
    fn names_round_trip_and_terminal_states_have_no_way_out_but_a_rollback() {
        for s in HostState::ALL {
            assert_eq!(HostState::parse(s.as_str()), Some(s));
            if s.is_terminal() {
                let exits: Vec<HostState> = HostState::ALL.into_iter().filter(|&t| legal(s, t)).collect();
                assert!(exits.iter().all(|&t| t == RollingBack || (s == Healthy && t == Failed)), "{s} → {exits:?}");
            }
        }
        assert_eq!(HostState::parse("bogus"), None);
    }

    #[test]
    fn prestage_stages_everything_before_the_first_activation() {
        let h = hosts(&[(Pending, 0), (Pending, 1), (Staged, 2)]);
        assert_eq!(next(&h, &rules(0, true, vec![]), None, false), Next::Stage(vec![0, 1]));
        assert_eq!(next(&h, &rules(0, false, vec![]), None, false), Next::Stage(vec![0]));
    }

    #[test]
    fn a_pause_follows_only_a_batch_this_run_activated() {
        let h = hosts(&[(Healthy, 0), (Staged, 1)]);
        let r = rules(0, true, vec![Some(Pause::Manual)]);
        assert_eq!(next(&h, &r, Some(0), false), Next::Pause { after: 0, pause: Pause::Manual });
        // `ferry promote` resumes with nothing activated yet: it goes on.
        assert_eq!(next(&h, &r, None, false), Next::Activate { batch: 1, hosts: vec![1] });
        // No pause after the last batch.
        let done = hosts(&[(Healthy, 0), (Healthy, 1)]);
        assert_eq!(next(&done, &r, Some(1), false), Next::Finish(Outcome::Succeeded));
    }

    #[test]
    fn failures_halt_past_the_budget_and_fail_within_it() {
        let h = hosts(&[(Healthy, 0), (Failed, 1), (Staged, 2)]);
        assert_eq!(next(&h, &rules(0, true, vec![]), None, false), Next::Halt);
        assert_eq!(next(&h, &rules(1, true, vec![]), None, false), Next::Activate { batch: 2, hosts: vec![2] });
        let done = hosts(&[(Healthy, 0), (Unreachable, 1)]);
        assert_eq!(next(&done, &rules(1, true, vec![]), None, false), Next::Finish(Outcome::Failed));
    }

    #[test]
    fn a_rollback_activates_batch_by_batch_without_staging() {
        let r = Rules { max_failures: 0, stage: false, prestage: true, pauses: vec![] };
        let h = hosts(&[(Pending, 0), (Pending, 0), (Pending, 1)]);
        assert_eq!(next(&h, &r, None, false), Next::Activate { batch: 0, hosts: vec![0, 1] });
        let h = hosts(&[(Healthy, 0), (Unchanged, 0), (Pending, 1)]);
        assert_eq!(next(&h, &r, Some(0), false), Next::Activate { batch: 1, hosts: vec![2] });
        let h = hosts(&[(Healthy, 0), (Failed, 0), (Pending, 1)]);
        assert_eq!(next(&h, &r, Some(0), false), Next::Halt);
    }

    #[test]
    fn every_status_has_one_name_and_working_states_have_a_time_limit() {
        for s in DeploymentStatus::ALL {
            assert_eq!(DeploymentStatus::parse(s.as_str()), Some(s));
            assert!(!s.description().is_empty());
        }
        for k in DeploymentKind::ALL {
            assert_eq!(DeploymentKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(DeploymentStatus::parse("bogus"), None);
        // One name per value.
        let mut names: Vec<&str> = DeploymentStatus::ALL.iter().map(|s| s.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), DeploymentStatus::ALL.len());
        assert_eq!(DeploymentStatus::ALL.len(), 7);
        let limits = Limits::all(Duration::from_secs(60));
        for s in HostState::ALL {
            let working = matches!(s, Staging | Activating | RollingBack);
            assert_eq!(s.time_limit(&limits).is_some(), working, "{s}");
            assert!(!s.description().is_empty());
        }
    }

    #[test]
    fn cancel_waits_for_a_host_caught_mid_activation() {
        let h = hosts(&[(Activating, 0), (Staged, 1)]);
        assert_eq!(next(&h, &rules(0, true, vec![]), None, true), Next::Activate { batch: 0, hosts: vec![0] });
        let h = hosts(&[(Healthy, 0), (Staged, 1)]);
        assert_eq!(next(&h, &rules(0, true, vec![]), None, true), Next::Cancel);
    }

    // A model of the engine: does what `next` says, one legal transition at a time, with outcomes
    // drawn from `luck`, and can stop ("kill -9") after any transition. Then a new run resumes
    // from the persisted states alone.
    struct Model {
        hosts: Vec<Host>,
        rules: Rules,
        /// How many times each host was activated (the agent's swap).
        activations: Vec<usize>,
        luck: Vec<u8>,
        draws: usize,
        transitions: usize,
        budget: usize,
    }

    enum Stop {
        /// The "coordinator" died here.
        Killed,
        Ended(Next),
    }

    impl Model {
        fn draw(&mut self) -> u8 {
            let v = self.luck.get(self.draws % self.luck.len().max(1)).copied().unwrap_or(0);
            self.draws += 1;
            v
        }

        fn set(&mut self, i: usize, to: HostState) -> Result<(), Stop> {
            let from = self.hosts[i].state;
            assert!(legal(from, to), "illegal transition of host {i}: {from} → {to}");
            self.hosts[i].state = to;
            self.transitions += 1;
            if self.transitions >= self.budget { Err(Stop::Killed) } else { Ok(()) }
        }

        fn run(&mut self, cancel_at: Option<usize>) -> Stop {
            let mut just = None;
            for step in 0..1000 {
                let cancelled = cancel_at.is_some_and(|c| step >= c);
                let n = next(&self.hosts, &self.rules, just, cancelled);
                if let Err(stop) = self.apply(&n, &mut just) {
                    return stop;
                }
                if matches!(n, Next::Halt | Next::Cancel | Next::Finish(_)) {
                    return Stop::Ended(n);
                }
            }
            panic!("the state machine did not finish in 1000 steps: {:?}", self.hosts);
        }

        fn apply(&mut self, n: &Next, just: &mut Option<usize>) -> Result<(), Stop> {
            match n {
                Next::Stage(ix) => {
                    assert!(self.rules.stage, "a rollback was told to stage");
                    for &i in ix {
                        assert!(self.hosts[i].state.needs_staging(), "staging {:?}", self.hosts[i]);
                        self.set(i, Staging)?;
                    }
                    for &i in ix {
                        let to = match self.draw() % 8 {
                            0 => Unreachable,
                            1 => Unchanged,
                            _ => Staged,
                        };
                        self.set(i, to)?;
                    }
                }
                Next::Activate { batch, hosts } => {
                    let failures = self.hosts.iter().filter(|h| h.state.is_failure()).count();
                    let resumes = hosts.iter().all(|&i| self.hosts[i].state == Activating);
                    assert!(resumes || failures <= self.rules.max_failures, "activating past the failure budget");
                    for (i, h) in self.hosts.iter().enumerate() {
                        if h.batch < *batch {
                            assert!(h.state.is_terminal(), "batch {batch} before batch {} ended: {h:?}", h.batch);
                        }
                        assert!(!hosts.contains(&i) || h.batch == *batch);
                    }
                    for &i in hosts {
                        let ready = matches!(self.hosts[i].state, Staged | Activating)
                            || (!self.rules.stage && self.hosts[i].state == Pending);
                        assert!(ready, "activating {:?}", self.hosts[i]);
                        self.set(i, Activating)?;
                        self.activations[i] += 1;
                    }
                    for &i in hosts {
                        let to = match self.draw() % 10 {
                            0 => Failed,
                            1 => RolledBack,
                            2 => Unreachable,
                            _ => Healthy,
                        };
                        self.set(i, to)?;
                    }
                    *just = Some(*batch);
                }
                Next::Pause { .. } => *just = None,
                Next::Halt | Next::Cancel | Next::Finish(_) => {}
            }
            Ok(())
        }
    }

    /// (batch sizes, max_failures, (prestage, stage), luck, kill after, cancel at).
    type Case = (Vec<usize>, usize, (bool, bool), Vec<u8>, usize, Option<usize>);

    fn gen_case() -> impl Gen<Value = Case> {
        (
            proptest::collection::vec(1usize..4, 1..6),
            0usize..3,
            (any::<bool>(), any::<bool>()),
            proptest::collection::vec(any::<u8>(), 1..40),
            0usize..60,
            proptest::option::of(0usize..8),
        )
    }

    proptest! {
        /// Kill the coordinator after any transition, resume from what was persisted: the
        /// resumed run finishes a host caught mid-activation, ends every host, never activates a
        /// finished host again, follows the batch order, and never starts a host past the
        /// failure budget.
        #[test]
        fn resume_from_every_persisted_state(
            (batch_sizes, max_failures, (prestage, stage), luck, kill_after, cancel_at) in gen_case()
        ) {
            let hosts: Vec<Host> = batch_sizes
                .iter()
                .enumerate()
                .flat_map(|(b, &n)| std::iter::repeat_n(Host { state: Pending, batch: b }, n))
                .collect();
            let pauses = (0..batch_sizes.len()).map(|b| (b % 2 == 0).then_some(Pause::For(Duration::ZERO))).collect();
            let mut m = Model {
                activations: vec![0; hosts.len()],
                hosts,
                // `stage` false: a rollback's hosts go straight from pending to activating.
                rules: Rules { stage, ..rules(max_failures, prestage, pauses) },
                luck,
                draws: 0,
                transitions: 0,
                budget: kill_after.max(1),
            };
            let first = m.run(None);
            let persisted = m.hosts.clone();
            let before = m.activations.clone();
            m.budget = usize::MAX;
            let end = match first {
                Stop::Killed => match m.run(cancel_at) {
                    Stop::Ended(n) => n,
                    Stop::Killed => unreachable!("no budget"),
                },
                Stop::Ended(n) => n,
            };
            for (i, h) in m.hosts.iter().enumerate() {
                let was = persisted[i].state;
                if was.is_terminal() {
                    prop_assert_eq!(h.state, was, "a finished host changed on resume");
                    prop_assert_eq!(m.activations[i], before[i], "a finished host was activated again");
                }
                if was == Activating {
                    // Caught mid-swap: activated again on resume, whatever else happens.
                    prop_assert_eq!(m.activations[i], before[i] + 1);
                }
                prop_assert!(m.activations[i] <= 2);
            }
            let failures = m.hosts.iter().filter(|h| h.state.is_failure()).count();
            match end {
                Next::Finish(Outcome::Succeeded) => {
                    prop_assert_eq!(failures, 0);
                    prop_assert!(m.hosts.iter().all(|h| matches!(h.state, Healthy | Unchanged)));
                }
                Next::Finish(Outcome::Failed) => {
                    prop_assert!(failures > 0 && failures <= max_failures);
                    prop_assert!(m.hosts.iter().all(|h| h.state.is_terminal()));
                }
                Next::Halt => prop_assert!(failures > max_failures),
                Next::Cancel => {
                    prop_assert!(cancel_at.is_some());
                    prop_assert!(!m.hosts.iter().any(|h| h.state == Activating));
                }
                other => prop_assert!(false, "ended on {other:?}"),
            }
        }
    }
}
