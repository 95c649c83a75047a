//! The pipeline's promotion: a succeeded deployment's version goes to the next environment of
//! fleet.toml's `promotion`, once its smoke tests passed and, where the next environment has
//! `require_approval`, an identity other than the promoter approved. (`ferry promote`, which
//! continues a paused canary, is [`super::resume`].)
use super::Error;
use crate::config::FleetConfig;
use crate::registry::{DeploymentRow, Registry, VersionRow};
use crate::state::{DeploymentKind, DeploymentStatus};

/// Why a promotion (or an approval of one) is refused.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// The deployment may not go further (not succeeded, not in `promotion`, the last one, not
    /// what the environment runs now, not a registered version).
    #[error("{0}")]
    Blocked(String),
    /// The caller expected another environment than the next one.
    #[error("{0}")]
    Skips(String),
    #[error("{0}")]
    SmokeFailed(String),
    #[error("{0}")]
    SmokeNotRun(String),
    #[error("{0}")]
    ApprovalRequired(String),
}

/// What a promotion may go ahead with.
#[derive(Debug, Clone)]
pub struct Promotion {
    /// The environment it goes to.
    pub next: String,
    /// The registered version it deploys.
    pub version: VersionRow,
    /// Whose approval it uses (where the next environment requires one).
    pub approver: Option<String>,
}

/// The environment deployment `d` is promoted to, or why it may not be promoted further.
pub fn target(config: &FleetConfig, d: &DeploymentRow) -> Result<String, Refused> {
    if d.kind != DeploymentKind::Deploy || d.status != DeploymentStatus::Succeeded {
        return Err(Refused::Blocked(format!(
            "deployment {} is a {} that is {}: only a succeeded deployment is promoted",
            d.id, d.kind, d.status
        )));
    }
    if !config.promotion.contains(&d.environment) {
        return Err(Refused::Blocked(format!(
            "environment {} is not in fleet.toml's `promotion` ({})",
            d.environment,
            config.promotion.join(" → ")
        )));
    }
    config
        .next_environment(&d.environment)
        .map(str::to_string)
        .ok_or_else(|| Refused::Blocked(format!("{} is the last environment of `promotion`", d.environment)))
}

/// The same person behind two identities: `cert:alice`, `token:alice` and `cert:Alice` are one
/// (names compare without their kind, case or surrounding space).
pub fn same_person(a: &str, b: &str) -> bool {
    let name = |s: &str| s.split_once(':').map_or(s, |(_, n)| n).trim().to_lowercase();
    name(a) == name(b)
}

/// Whether `d`'s smoke tests let it go further: the newest run that counts (the environment's
/// own checks, where it has some; run after the deployment finished; with at least one result)
/// must have passed. Runs made while it was paused tested hosts that had not switched yet.
pub fn smoke_gate(config: &FleetConfig, registry: &dyn Registry, d: &DeploymentRow) -> Result<(), Error> {
    let smoke = config.environments.get(&d.environment).map(|e| e.smoke.as_slice()).unwrap_or_default();
    let runs = registry.smoke_runs(&d.id)?;
    let finished = d.finished_ms.unwrap_or(i64::MAX);
    let counted = runs.iter().rev().find(|r| {
        (r.env_checks || smoke.is_empty())
            && r.started_ms >= finished
            && r.results.as_array().is_some_and(|a| !a.is_empty())
    });
    match counted {
        Some(run) if !run.passed => {
            let failed: Vec<String> = run
                .results
                .as_array()
                .into_iter()
                .flatten()
                .filter(|r| r["passed"] == false)
                .map(|r| {
                    let on = r["host"].as_str().map(|h| format!(" on {h}")).unwrap_or_default();
                    format!("{}{on}: {}", r["name"].as_str().unwrap_or("?"), r["error"].as_str().unwrap_or("failed"))
                })
                .collect();
            Err(Refused::SmokeFailed(format!(
                "smoke tests of deployment {} failed (run {} by {}: {}); fix it and run them again",
                d.id,
                run.id,
                run.run_by,
                failed.join("; ")
            ))
            .into())
        }
        None if !smoke.is_empty() => Err(Refused::SmokeNotRun(format!(
            "the smoke tests of {} have not run against deployment {} since it finished: POST /api/v1/deployments/{}/smoke first",
            d.environment, d.id, d.id
        ))
        .into()),
        _ => Ok(()),
    }
}

/// Every rule a promotion of `d` by `who` must pass (`expected`: the environment the caller
/// expects it to go to).
pub fn check(
    config: &FleetConfig,
    registry: &dyn Registry,
    d: &DeploymentRow,
    who: &str,
    expected: Option<&str>,
) -> Result<Promotion, Error> {
    let next = target(config, d)?;
    if let Some(expected) = expected.filter(|t| *t != next) {
        return Err(Refused::Skips(format!(
            "{} is promoted to {next} next, not {expected} (`promotion` = {})",
            d.environment,
            config.promotion.join(" → ")
        ))
        .into());
    }
    // The newest deployment of this app there (another app's deployments are not in its way).
    if let Some(latest) = registry.latest_deployment(&d.environment, Some(&config.app.name))?
        && latest != d.id
    {
        return Err(Refused::Blocked(format!(
            "{} has run deployment {latest} since {}: promote what the environment runs now",
            d.environment, d.id
        ))
        .into());
    }
    // Through the API, a deployment runs the registered build (scanned again and checked against
    // it), with its environment's layout; from the CLI, only the same content counts.
    let version = registry
        .version(&config.app.name, &d.version)?
        .filter(|v| v.manifest_hash == d.manifest_hash || d.requested_by.is_some())
        .ok_or_else(|| {
        Refused::Blocked(format!(
            "deployment {} did not deploy the registered version {} (it was run outside the API, or the version was registered with other content): register it, deploy it to {} through the API, then promote that",
            d.id, d.version, d.environment
        ))
    })?;
    smoke_gate(config, registry, d)?;
    let mut approver = None;
    if config.environments.get(&next).is_some_and(|e| e.require_approval) {
        let approvals = registry.approvals(&d.id)?;
        let usable: Vec<_> = approvals.iter().filter(|a| a.environment == next && a.used_by.is_none()).collect();
        approver = usable.iter().find(|a| !same_person(&a.approved_by, who)).map(|a| a.approved_by.clone());
        if approver.is_none() {
            let mut notes = Vec::new();
            if usable.iter().any(|a| same_person(&a.approved_by, who)) {
                notes.push("an approval by the promoter does not count");
            }
            if approvals
                .iter()
                .any(|a| a.environment == next && a.used_by.is_some() && !same_person(&a.approved_by, who))
            {
                notes.push("an approval is good for one promotion, and the earlier ones are used");
            }
            let why = if notes.is_empty() { String::new() } else { format!(" ({})", notes.join("; ")) };
            return Err(Refused::ApprovalRequired(format!(
                "promoting {} to {next} needs an approval by an identity other than {who}{why}: POST /api/v1/deployments/{}/approve",
                d.version, d.id
            ))
            .into());
        }
    }
    Ok(Promotion { next, version, approver })
}

/// Records `who`'s approval of promoting `d` to the next environment; that environment.
pub fn approve(config: &FleetConfig, registry: &dyn Registry, d: &DeploymentRow, who: &str) -> Result<String, Error> {
    let next = target(config, d)?;
    registry.approve(&d.id, &next, who)?;
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_person_behind_two_identities_is_one() {
        assert!(same_person("cert:alice", "token:alice"));
        // Regression: a certificate named Alice approved a promotion by token alice.
        assert!(same_person("cert:Alice", "token:alice"));
        assert!(!same_person("cert:alice", "cert:bob"));
    }
}
