//! What `ferry serve` adds to the registry: registered versions, smoke test runs, promotion
//! approvals, who asked for a deployment, and the event feed its progress streams follow.
use rusqlite::{OptionalExtension, params};

use super::Db;
use crate::registry::{Approval, EventRow, Measurement, RegistryError, SmokeRun, VersionRow, now_ms};

impl Db {
    /// Records `v`; if the version is already registered, returns the existing row instead
    /// (the caller compares the manifest hashes).
    pub(super) fn register_version(&self, v: &VersionRow) -> Result<Option<VersionRow>, RegistryError> {
        if let Some(existing) = self.version(&v.app, &v.version)? {
            return Ok(Some(existing));
        }
        self.conn
            .execute(
                "INSERT INTO versions (app, version, artifact, release_id, manifest_hash, total_bytes, files, registered_by, registered_ms, metadata)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    v.app,
                    v.version,
                    v.artifact,
                    v.release_id,
                    v.manifest_hash,
                    v.total_bytes,
                    v.files,
                    v.registered_by,
                    v.registered_ms,
                    serde_json::Value::Object(v.metadata.clone()).to_string()
                ],
            )
            .map_err(self.sql())?;
        Ok(None)
    }

    pub(super) fn version(&self, app: &str, version: &str) -> Result<Option<VersionRow>, RegistryError> {
        self.conn
            .query_row(
                "SELECT app, version, artifact, release_id, manifest_hash, total_bytes, files, registered_by, registered_ms, metadata
                 FROM versions WHERE app = ?1 AND version = ?2",
                [app, version],
                version_row,
            )
            .optional()
            .map_err(self.sql())
    }

    /// Registered versions (of `app`, or of every app), newest first.
    pub(super) fn versions(&self, app: Option<&str>, limit: usize) -> Result<Vec<VersionRow>, RegistryError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT app, version, artifact, release_id, manifest_hash, total_bytes, files, registered_by, registered_ms, metadata
                 FROM versions WHERE ?1 IS NULL OR app = ?1 ORDER BY registered_ms DESC, rowid DESC LIMIT ?2",
            )
            .map_err(self.sql())?;
        let rows = st.query_map(params![app, limit as i64], version_row).map_err(self.sql())?;
        rows.collect::<Result<_, _>>().map_err(self.sql())
    }

    /// Gives the versions registered before there were several apps (app "") to `app`, unless it
    /// already has a version of the same name; how many it took.
    pub(super) fn claim_versions(&self, app: &str) -> Result<usize, RegistryError> {
        self.conn
            .execute(
                "UPDATE versions SET app = ?1 WHERE app = '' AND version NOT IN (SELECT version FROM versions WHERE app = ?1)",
                [app],
            )
            .map_err(self.sql())
    }

    /// Who asked for deployment `id` through the API (the first asker is kept; later ones, such as
    /// who continued a paused canary, are events), and the deployment it was promoted from.
    pub(super) fn set_requested_by(
        &self,
        id: &str,
        by: &str,
        promoted_from: Option<&str>,
    ) -> Result<(), RegistryError> {
        self.conn
            .execute(
                "UPDATE deployments SET requested_by = COALESCE(requested_by, ?2), promoted_from = COALESCE(?3, promoted_from) WHERE id = ?1",
                params![id, by, promoted_from],
            )
            .map_err(self.sql())?;
        Ok(())
    }

    pub(super) fn record_measurement(&self, m: &Measurement) -> Result<(), RegistryError> {
        self.conn
            .execute(
                "INSERT INTO measurements (deployment_id, batch, gate, at_ms, outcome, value, baseline, detail)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![m.deployment_id, m.batch, m.gate, m.at_ms, m.outcome.as_str(), m.value, m.baseline, m.detail],
            )
            .map_err(self.sql())?;
        Ok(())
    }

    /// The measurements of a deployment, oldest first.
    pub(super) fn measurements(&self, deployment_id: &str) -> Result<Vec<Measurement>, RegistryError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT deployment_id, batch, gate, at_ms, outcome, value, baseline, detail FROM measurements
                 WHERE deployment_id = ?1 ORDER BY id",
            )
            .map_err(self.sql())?;
        let rows = st
            .query_map([deployment_id], |r| {
                let outcome: String = r.get(4)?;
                Ok(Measurement {
                    deployment_id: r.get(0)?,
                    batch: r.get(1)?,
                    gate: r.get(2)?,
                    at_ms: r.get(3)?,
                    outcome: crate::gate::Outcome::parse(&outcome).unwrap_or(crate::gate::Outcome::Inconclusive),
                    value: r.get(5)?,
                    baseline: r.get(6)?,
                    detail: r.get(7)?,
                })
            })
            .map_err(self.sql())?;
        rows.collect::<Result<_, _>>().map_err(self.sql())
    }

    pub(super) fn record_smoke(&self, run: &SmokeRun) -> Result<i64, RegistryError> {
        self.conn
            .execute(
                "INSERT INTO smoke_runs (deployment_id, run_by, started_ms, finished_ms, passed, results, env_checks)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    run.deployment_id,
                    run.run_by,
                    run.started_ms,
                    run.finished_ms,
                    run.passed,
                    run.results.to_string(),
                    run.env_checks
                ],
            )
            .map_err(self.sql())?;
        let seq = self.conn.last_insert_rowid();
        let verdict = if run.passed { "passed" } else { "failed" };
        self.event(&run.deployment_id, None, "smoke", &format!("smoke tests {verdict} (run {seq} by {})", run.run_by))?;
        Ok(seq)
    }

    /// The smoke runs of a deployment, oldest first.
    pub(super) fn smoke_runs(&self, deployment_id: &str) -> Result<Vec<SmokeRun>, RegistryError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT id, deployment_id, run_by, started_ms, finished_ms, passed, results, env_checks FROM smoke_runs
                 WHERE deployment_id = ?1 ORDER BY id",
            )
            .map_err(self.sql())?;
        let rows = st
            .query_map([deployment_id], |r| {
                let results: String = r.get(6)?;
                Ok(SmokeRun {
                    id: r.get(0)?,
                    deployment_id: r.get(1)?,
                    run_by: r.get(2)?,
                    started_ms: r.get(3)?,
                    finished_ms: r.get(4)?,
                    passed: r.get(5)?,
                    results: serde_json::from_str(&results).unwrap_or(serde_json::Value::Null),
                    env_checks: r.get(7)?,
                })
            })
            .map_err(self.sql())?;
        rows.collect::<Result<_, _>>().map_err(self.sql())
    }

    pub(super) fn approve(&self, deployment_id: &str, environment: &str, by: &str) -> Result<(), RegistryError> {
        self.conn
            .execute(
                "INSERT OR IGNORE INTO approvals (deployment_id, environment, approved_by, time_ms) VALUES (?1, ?2, ?3, ?4)",
                params![deployment_id, environment, by, now_ms()],
            )
            .map_err(self.sql())?;
        self.event(deployment_id, None, "approved", &format!("promotion to {environment} approved by {by}"))
    }

    /// Marks `by`'s approval of promoting `deployment_id` to `environment` used by `promotion`.
    pub(super) fn use_approval(
        &self,
        deployment_id: &str,
        environment: &str,
        by: &str,
        promotion: &str,
    ) -> Result<(), RegistryError> {
        self.conn
            .execute(
                "UPDATE approvals SET used_by = ?4
                 WHERE deployment_id = ?1 AND environment = ?2 AND approved_by = ?3 AND used_by IS NULL",
                params![deployment_id, environment, by, promotion],
            )
            .map_err(self.sql())?;
        self.event(deployment_id, None, "approval_used", &format!("{by}'s approval used by {promotion}"))
    }

    pub(super) fn approvals(&self, deployment_id: &str) -> Result<Vec<Approval>, RegistryError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT deployment_id, environment, approved_by, time_ms, used_by FROM approvals WHERE deployment_id = ?1 ORDER BY time_ms",
            )
            .map_err(self.sql())?;
        let rows = st
            .query_map([deployment_id], |r| {
                Ok(Approval {
                    deployment_id: r.get(0)?,
                    environment: r.get(1)?,
                    approved_by: r.get(2)?,
                    time_ms: r.get(3)?,
                    used_by: r.get(4)?,
                })
            })
            .map_err(self.sql())?;
        rows.collect::<Result<_, _>>().map_err(self.sql())
    }

    /// Events of deployment `id` after sequence number `after` (0: all), oldest first.
    pub(super) fn events_since(&self, id: &str, after: i64) -> Result<Vec<EventRow>, RegistryError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT id, time_ms, host, kind, message FROM events WHERE deployment_id = ?1 AND id > ?2 ORDER BY id",
            )
            .map_err(self.sql())?;
        let rows = st
            .query_map(params![id, after], |r| {
                Ok(EventRow {
                    seq: r.get(0)?,
                    time_ms: r.get(1)?,
                    host: r.get(2)?,
                    kind: r.get(3)?,
                    message: r.get(4)?,
                })
            })
            .map_err(self.sql())?;
        rows.collect::<Result<_, _>>().map_err(self.sql())
    }

    /// The newest deployment of `env` (of any kind), if any.
    pub(super) fn latest_deployment(&self, env: &str, app: Option<&str>) -> Result<Option<String>, RegistryError> {
        self.conn
            .query_row(
                "SELECT id FROM deployments WHERE environment = ?1 AND (?2 IS NULL OR app = ?2)
                 ORDER BY started_ms DESC, rowid DESC LIMIT 1",
                params![env, app],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.sql())
    }
}

fn version_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<VersionRow> {
    let metadata: String = r.get(9)?;
    Ok(VersionRow {
        app: r.get(0)?,
        version: r.get(1)?,
        artifact: r.get(2)?,
        release_id: r.get(3)?,
        manifest_hash: r.get(4)?,
        total_bytes: r.get(5)?,
        files: r.get(6)?,
        registered_by: r.get(7)?,
        registered_ms: r.get(8)?,
        metadata: serde_json::from_str(&metadata).unwrap_or_default(),
    })
}
