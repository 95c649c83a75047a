//! The rollout planner: which hosts go in which batch, and where the rollout pauses. Pure: no I/O,
//! so every strategy is tested exhaustively here.
//!
//! - `rolling`: batches of `batch` hosts (a count, a percentage of the environment, or a list
//!   such as `[1, 5, "20%"]` whose last size repeats).
//! - `canary`: `steps` are cumulative targets (`[1, "50%"]` = one host, then up to half, then the
//!   rest); the rollout pauses after every step but the last (`pause` = a duration, or `"manual"`:
//!   wait for `ferry promote`).
//! - `all-at-once`: one batch.
//!
//! Hosts keep the environment's order (sorted by name); each host is in exactly one batch.
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A number of hosts: a count, or a percentage of the environment (rounded up, at least 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "SizeText", into = "SizeText")]
pub enum Size {
    Count(usize),
    Percent(u32),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum SizeText {
    Count(u64),
    Text(String),
}

impl TryFrom<SizeText> for Size {
    type Error = String;
    fn try_from(t: SizeText) -> Result<Size, String> {
        match t {
            SizeText::Count(0) => Err("a batch size must be at least 1".into()),
            SizeText::Count(n) => usize::try_from(n).map(Size::Count).map_err(|_| format!("{n} is too large")),
            SizeText::Text(s) => {
                let p = s.strip_suffix('%').and_then(|p| p.trim().parse::<u32>().ok());
                match p {
                    Some(p) if (1..=100).contains(&p) => Ok(Size::Percent(p)),
                    _ => Err(format!("{s:?} is not a host count or a percentage from \"1%\" to \"100%\"")),
                }
            }
        }
    }
}

impl From<Size> for SizeText {
    fn from(s: Size) -> SizeText {
        match s {
            Size::Count(n) => SizeText::Count(n as u64),
            Size::Percent(p) => SizeText::Text(format!("{p}%")),
        }
    }
}

impl Size {
    /// Hosts this size means in an environment of `total` hosts (at least 1).
    pub fn resolve(self, total: usize) -> usize {
        match self {
            Size::Count(n) => n.max(1),
            Size::Percent(p) => (total * p as usize).div_ceil(100).max(1),
        }
    }
}

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Size::Count(n) => write!(f, "{n}"),
            Size::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// One size or a list of sizes (`batch = 2` or `batch = [1, 5, "20%"]`), each checked with a
/// message that names the bad value.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "SizesText")]
pub struct Sizes(pub Vec<Size>);

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum SizesText {
    One(SizeText),
    Many(Vec<SizeText>),
}

impl TryFrom<SizesText> for Sizes {
    type Error = String;
    fn try_from(t: SizesText) -> Result<Sizes, String> {
        let list = match t {
            SizesText::One(s) => vec![s],
            SizesText::Many(v) => v,
        };
        list.into_iter().map(Size::try_from).collect::<Result<Vec<_>, _>>().map(Sizes)
    }
}

/// Where a rollout waits after a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Pause {
    /// Until `ferry promote`.
    Manual,
    For(Duration),
}

impl TryFrom<String> for Pause {
    type Error = String;
    fn try_from(s: String) -> Result<Pause, String> {
        if s == "manual" {
            return Ok(Pause::Manual);
        }
        humantime::parse_duration(&s)
            .map(Pause::For)
            .map_err(|e| format!("{s:?} is neither \"manual\" nor a duration such as \"30s\": {e}"))
    }
}

impl From<Pause> for String {
    fn from(p: Pause) -> String {
        match p {
            Pause::Manual => "manual".into(),
            Pause::For(d) => humantime::format_duration(d).to_string(),
        }
    }
}

/// How an environment rolls out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "strategy", rename_all = "kebab-case")]
pub enum Strategy {
    Rolling {
        batch: Vec<Size>,
    },
    Canary {
        steps: Vec<Size>,
        pause: Pause,
    },
    AllAtOnce,
    /// The idle group of two, all at once, then a switch makes it live (the hosts given to
    /// [`plan`] are the idle group's).
    BlueGreen,
}

impl Default for Strategy {
    /// One host at a time.
    fn default() -> Strategy {
        Strategy::Rolling { batch: vec![Size::Count(1)] }
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |v: &[Size]| v.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
        match self {
            Strategy::Rolling { batch } => write!(f, "rolling, batches of [{}]", list(batch)),
            Strategy::Canary { steps, pause } => {
                write!(f, "canary, steps [{}], pause {}", list(steps), String::from(*pause))
            }
            Strategy::AllAtOnce => f.write_str("all-at-once"),
            Strategy::BlueGreen => f.write_str("blue-green: the idle group at once, then switch"),
        }
    }
}

/// One batch: host indexes (into the environment's host list), and the pause after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub hosts: Vec<usize>,
    pub pause_after: Option<Pause>,
}

/// The batches of `strategy` over `total` hosts.
pub fn plan(strategy: &Strategy, total: usize) -> Vec<Batch> {
    let mut batches = Vec::new();
    let mut next = 0;
    match strategy {
        Strategy::AllAtOnce | Strategy::BlueGreen => {
            if total > 0 {
                batches.push(Batch { hosts: (0..total).collect(), pause_after: None });
            }
        }
        Strategy::Rolling { batch } => {
            let mut sizes = batch.iter().map(|s| s.resolve(total));
            let mut last = 1;
            while next < total {
                last = sizes.next().unwrap_or(last);
                let end = (next + last).min(total);
                batches.push(Batch { hosts: (next..end).collect(), pause_after: None });
                next = end;
            }
        }
        Strategy::Canary { steps, pause } => {
            for step in steps {
                let end = step.resolve(total).min(total);
                if end > next {
                    batches.push(Batch { hosts: (next..end).collect(), pause_after: Some(*pause) });
                    next = end;
                }
            }
            if next < total {
                batches.push(Batch { hosts: (next..total).collect(), pause_after: None });
            }
            if let Some(last) = batches.last_mut() {
                last.pause_after = None;
            }
        }
    }
    batches
}

/// The size of a rollback's batches: the rollout's first batch size (a rollback skips canary
/// steps and pauses; the previous release is already on every host).
pub fn rollback_batch(strategy: &Strategy, total: usize) -> usize {
    match strategy {
        Strategy::AllAtOnce | Strategy::BlueGreen => total.max(1),
        Strategy::Rolling { batch } => batch.first().map_or(1, |s| s.resolve(total)),
        Strategy::Canary { steps, .. } => steps.first().map_or(1, |s| s.resolve(total)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{Just, any, prop_assert, prop_assert_eq, prop_oneof, proptest};
    use proptest::strategy::Strategy as Gen;

    fn sizes(batches: &[Batch]) -> Vec<usize> {
        batches.iter().map(|b| b.hosts.len()).collect()
    }

    #[test]
    fn rolling_sizes_counts_percentages_and_lists() {
        let rolling = |batch: Vec<Size>| Strategy::Rolling { batch };
        assert_eq!(sizes(&plan(&rolling(vec![Size::Count(2)]), 5)), [2, 2, 1]);
        assert_eq!(sizes(&plan(&rolling(vec![Size::Percent(25)]), 10)), [3, 3, 3, 1]);
        assert_eq!(
            sizes(&plan(&rolling(vec![Size::Count(1), Size::Count(5), Size::Percent(20)]), 20)),
            [1, 5, 4, 4, 4, 2]
        );
        assert_eq!(sizes(&plan(&Strategy::default(), 3)), [1, 1, 1]);
        assert_eq!(sizes(&plan(&Strategy::AllAtOnce, 4)), [4]);
        assert!(plan(&Strategy::AllAtOnce, 0).is_empty());
    }

    #[test]
    fn canary_steps_are_cumulative_and_pause_between() {
        let c = Strategy::Canary { steps: vec![Size::Count(1), Size::Percent(60)], pause: Pause::Manual };
        let p = plan(&c, 5);
        assert_eq!(sizes(&p), [1, 2, 2]);
        assert_eq!(
            p.iter().map(|b| b.pause_after).collect::<Vec<_>>(),
            [Some(Pause::Manual), Some(Pause::Manual), None]
        );
        // A step that adds nothing is dropped; the last batch never pauses.
        let c =
            Strategy::Canary { steps: vec![Size::Count(1), Size::Count(1), Size::Percent(100)], pause: Pause::Manual };
        assert_eq!(sizes(&plan(&c, 3)), [1, 2]);
        assert_eq!(plan(&c, 3)[1].pause_after, None);
    }

    #[test]
    fn sizes_and_pauses_parse_with_clear_errors() {
        let size = |v: serde_json::Value| serde_json::from_value::<Size>(v).map_err(|e| e.to_string());
        assert_eq!(size(serde_json::json!(3)), Ok(Size::Count(3)));
        assert_eq!(size(serde_json::json!("25%")), Ok(Size::Percent(25)));
        assert!(size(serde_json::json!(0)).is_err_and(|e| e.contains("at least 1")));
        assert!(size(serde_json::json!("150%")).is_err_and(|e| e.contains("percentage")));
        assert!(size(serde_json::json!("many")).is_err());
        let pause = |s: &str| Pause::try_from(s.to_string());
        assert_eq!(pause("manual"), Ok(Pause::Manual));
        assert_eq!(pause("30s"), Ok(Pause::For(Duration::from_secs(30))));
        assert!(pause("later").is_err_and(|e| e.contains("manual")));
    }

    fn size() -> impl Gen<Value = Size> {
        prop_oneof![(1usize..8).prop_map(Size::Count), (1u32..=100).prop_map(Size::Percent)]
    }

    fn strategy() -> impl Gen<Value = Strategy> {
        prop_oneof![
            Just(Strategy::AllAtOnce),
            proptest::collection::vec(size(), 1..4).prop_map(|batch| Strategy::Rolling { batch }),
            (proptest::collection::vec(size(), 1..4), any::<bool>()).prop_map(|(steps, manual)| Strategy::Canary {
                steps,
                pause: if manual { Pause::Manual } else { Pause::For(Duration::from_secs(1)) }
            }),
        ]
    }

    proptest! {
        /// Every host is in exactly one batch, in order; no batch is empty; only canaries pause,
        /// and never after the last batch.
        #[test]
        fn every_host_exactly_once(s in strategy(), total in 0usize..60) {
            let batches = plan(&s, total);
            let flat: Vec<usize> = batches.iter().flat_map(|b| b.hosts.clone()).collect();
            prop_assert_eq!(flat, (0..total).collect::<Vec<_>>());
            prop_assert!(batches.iter().all(|b| !b.hosts.is_empty()));
            prop_assert!(batches.last().is_none_or(|b| b.pause_after.is_none()));
            if !matches!(s, Strategy::Canary { .. }) {
                prop_assert!(batches.iter().all(|b| b.pause_after.is_none()));
            }
            if let Strategy::Rolling { batch } = &s {
                for (i, b) in batches.iter().enumerate() {
                    let want = batch.get(i).or(batch.last()).map_or(1, |z| z.resolve(total));
                    prop_assert!(b.hosts.len() <= want, "batch {} has {} hosts, size {}", i, b.hosts.len(), want);
                }
            }
            prop_assert!(rollback_batch(&s, total) >= 1);
        }
    }
}
