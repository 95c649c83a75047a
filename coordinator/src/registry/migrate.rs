//! `ferry registry migrate --from ferry.db --to postgres://…`: the whole history of a SQLite
//! registry copied into an empty PostgreSQL one, in one transaction, in the order it was recorded
//! (event numbers kept, so an API client following a deployment's events goes on where it was).
use std::path::Path;

use serde::Serialize;

use super::RegistryError;
use super::postgres::Postgres;
use super::sqlite::Sqlite;

use super::Kind;
use Kind::{Bool, Int, Real, Text};

/// Every table and column a registry holds (locks excepted: a migration needs none held), in
/// the order they are copied (parents first).
pub const TABLES: &[(&str, &[(&str, Kind)])] = &[
    (
        "deployments",
        &[
            ("id", Text),
            ("kind", Text),
            ("environment", Text),
            ("version", Text),
            ("release_id", Text),
            ("artifact", Text),
            ("manifest_hash", Text),
            ("strategy", Text),
            ("status", Text),
            ("started_ms", Int),
            ("finished_ms", Int),
            ("error", Text),
            ("requested_by", Text),
            ("promoted_from", Text),
            ("app", Text),
        ],
    ),
    (
        "hosts",
        &[
            ("deployment_id", Text),
            ("host", Text),
            ("batch", Int),
            ("state", Text),
            ("previous_release", Text),
            ("started_ms", Int),
            ("finished_ms", Int),
            ("bytes_sent", Int),
            ("error", Text),
            ("activate_ms", Int),
            ("release", Text),
        ],
    ),
    (
        "events",
        &[("id", Int), ("deployment_id", Text), ("time_ms", Int), ("host", Text), ("kind", Text), ("message", Text)],
    ),
    ("live_groups", &[("environment", Text), ("grp", Text), ("deployment_id", Text), ("since_ms", Int)]),
    (
        "versions",
        &[
            ("app", Text),
            ("version", Text),
            ("artifact", Text),
            ("release_id", Text),
            ("manifest_hash", Text),
            ("total_bytes", Int),
            ("files", Int),
            ("registered_by", Text),
            ("registered_ms", Int),
            ("metadata", Text),
        ],
    ),
    (
        "smoke_runs",
        &[
            ("id", Int),
            ("deployment_id", Text),
            ("run_by", Text),
            ("started_ms", Int),
            ("finished_ms", Int),
            ("passed", Bool),
            ("results", Text),
            ("env_checks", Bool),
        ],
    ),
    (
        "approvals",
        &[("deployment_id", Text), ("environment", Text), ("approved_by", Text), ("time_ms", Int), ("used_by", Text)],
    ),
    (
        "measurements",
        &[
            ("id", Int),
            ("deployment_id", Text),
            ("batch", Int),
            ("gate", Text),
            ("at_ms", Int),
            ("outcome", Text),
            ("value", Real),
            ("baseline", Real),
            ("detail", Text),
        ],
    ),
];

/// What a migration copied: rows per table.
#[derive(Debug, Serialize)]
pub struct Copied {
    pub from: String,
    pub to: String,
    pub tables: Vec<(String, usize)>,
}

/// Copies the SQLite registry at `from` into the (empty) PostgreSQL registry at `to`.
pub fn sqlite_to_postgres(from: &Path, to: &crate::config::PostgresRegistry) -> Result<Copied, RegistryError> {
    if !from.is_file() {
        return Err(RegistryError::Open { registry: from.display().to_string(), reason: "no such file".into() });
    }
    let source = Sqlite::open(from)?;
    if let Some((env, id)) = source.any_lock()? {
        return Err(RegistryError::Open {
            registry: from.display().to_string(),
            reason: format!(
                "environment {env} is locked by deployment {id}: let it finish (or resume or roll it back) first; nothing was copied"
            ),
        });
    }
    let mut rows = Vec::new();
    for (table, columns) in TABLES {
        rows.push((*table, *columns, source.dump(table, columns)?));
    }
    let target = Postgres::open_with(to)?;
    target.import(&rows)?;
    Ok(Copied {
        from: from.display().to_string(),
        to: super::postgres::redact(&to.url),
        tables: rows.iter().map(|(t, _, r)| ((*t).to_string(), r.len())).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PostgresRegistry;
    use crate::registry::Registry;
    use crate::registry::suite;
    use crate::registry::testpg::TestPg;

    /// Everything a registry answers, as JSON, for comparing two backends.
    fn everything(reg: &dyn Registry) -> serde_json::Value {
        let history = reg.history(None, None, 100).expect("history");
        let per: Vec<serde_json::Value> = history
            .iter()
            .map(|d| {
                serde_json::json!({
                    "hosts": reg.hosts(&d.id).expect("hosts"),
                    "events": reg.events_since(&d.id, 0).expect("events"),
                    "smoke": reg.smoke_runs(&d.id).expect("smoke"),
                    "approvals": reg.approvals(&d.id).expect("approvals"),
                    "measurements": reg.measurements(&d.id).expect("measurements"),
                })
            })
            .collect();
        serde_json::json!({
            "history": history,
            "report": reg.report(None).expect("report"),
            "versions": reg.versions(None, 100).expect("versions"),
            "live": reg.live_group("prod").expect("live"),
            "per": per,
        })
    }

    #[test]
    fn the_whole_history_moves_to_postgres_and_reads_the_same() {
        let Some(pg) = TestPg::start() else { return };
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("registry.db");
        let sqlite = Sqlite::open(&path).expect("sqlite");
        suite::report_rates_and_percentiles(&sqlite);
        suite::pipeline_records_round_trip(&sqlite);
        let before = everything(&sqlite);
        drop(sqlite);
        let url = pg.database("ferry");
        let copied = sqlite_to_postgres(&path, &PostgresRegistry::at(&url)).expect("migrated");
        assert_eq!(copied.tables.iter().find(|(t, _)| t == "deployments").map(|(_, n)| *n), Some(7), "{copied:?}");
        let postgres = Postgres::open(&url).expect("postgres");
        assert_eq!(everything(&postgres), before, "history, report and every record read the same");
        // New events continue after the copied ones.
        let last = postgres.events_since("d-p", 0).expect("events").last().map(|e| e.seq).unwrap_or_default();
        postgres.event("d-p", None, "note", "after the move").expect("event");
        assert!(postgres.events_since("d-p", last).expect("new").iter().all(|e| e.seq > last));
        // Never into a registry that has deployments already.
        let e = sqlite_to_postgres(&path, &PostgresRegistry::at(&url)).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("already holds 7 deployment(s)") && e.contains("nothing was copied"), "{e}");
    }

    #[test]
    fn a_registry_with_a_deployment_in_progress_is_not_moved() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("registry.db");
        let sqlite = Sqlite::open(&path).expect("sqlite");
        sqlite.lock("prod", "d-7", false).expect("lock");
        drop(sqlite);
        // Refused before the target is even contacted.
        let e = sqlite_to_postgres(&path, &PostgresRegistry::at("postgres://ferry@127.0.0.1:1/x"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("environment prod is locked by deployment d-7"), "{e}");
        let e = sqlite_to_postgres(&dir.path().join("missing.db"), &PostgresRegistry::at("postgres://x@y/z"))
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("missing.db") && e.contains("no such file")));
    }
}
