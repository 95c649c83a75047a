//! Loading TOML configuration files with errors a user can act on.
//!
//! Every config problem names the file; syntax and type errors name the line, column and key
//! (from the TOML parser), and semantic problems found by a `validate()` are collected so the user
//! sees all of them at once rather than one per run.
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// One semantic problem: the dotted key it concerns and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub reason: String,
}

impl Problem {
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Problem { key: key.into(), reason: reason.into() }
    }

    /// The same problem with its key under `prefix` (e.g. "environments.prod.").
    pub fn prefixed(self, prefix: &str) -> Self {
        Problem { key: format!("{prefix}{}", self.key), reason: self.reason }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

/// A configuration file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Syntax errors, unknown keys and values of the wrong type (the parser's message names the
    /// line, column and key).
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path} has {} problem(s):\n{}", problems.len(), list(problems))]
    Invalid { path: PathBuf, problems: Vec<Problem> },
}

fn list(problems: &[Problem]) -> String {
    problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n")
}

/// Reads and parses `path`. Unknown keys are rejected by the target type's
/// `#[serde(deny_unknown_fields)]`.
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    parse_toml(path, &text)
}

/// Parses TOML text that came from `path` (named in errors only).
pub fn parse_toml<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        // The parser's message spans several lines with a source excerpt; keep it whole.
        message: e.to_string().trim_end().to_string(),
    })
}

/// Turns collected problems into a result.
pub fn check(path: &Path, problems: Vec<Problem>) -> Result<(), ConfigError> {
    if problems.is_empty() { Ok(()) } else { Err(ConfigError::Invalid { path: path.to_owned(), problems }) }
}

/// A duration written as in `"30s"`, `"1m 30s"` or `"500ms"`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    parse_duration_inner(s.trim())
        .ok_or_else(|| format!("{s:?} is not a duration (expected e.g. \"500ms\", \"30s\", \"5m\")"))
}

fn parse_duration_inner(s: &str) -> Option<std::time::Duration> {
    if s.is_empty() {
        return None;
    }
    let mut total = std::time::Duration::ZERO;
    for part in s.split_whitespace() {
        let split = part.find(|c: char| !c.is_ascii_digit())?;
        let (num, unit) = part.split_at(split);
        let n: u64 = num.parse().ok()?;
        let d = match unit {
            "ms" => std::time::Duration::from_millis(n),
            "s" => std::time::Duration::from_secs(n),
            "m" => std::time::Duration::from_secs(n.checked_mul(60)?),
            "h" => std::time::Duration::from_secs(n.checked_mul(3600)?),
            "d" => std::time::Duration::from_secs(n.checked_mul(86400)?),
            _ => return None,
        };
        total = total.checked_add(d)?;
    }
    Some(total)
}

/// Serde adapter for durations written as strings (`"30s"`).
pub mod duration {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<std::time::Duration, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        for bad in ["", "30", "s", "3x", "-1s", "1.5s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn invalid_lists_every_problem() {
        let err = check(
            Path::new("/etc/x.toml"),
            vec![Problem::new("a.b", "must be positive"), Problem::new("c", "is empty")],
        )
        .expect_err("must be refused")
        .to_string();
        assert!(err.contains("/etc/x.toml has 2 problem(s)"), "{err}");
        assert!(err.contains("a.b: must be positive") && err.contains("c: is empty"), "{err}");
    }
}
