//! The registry in an embedded SQLite database (`registry` in fleet.toml; default
//! `~/.local/state/ferry/registry.db`).
//!
//! Every state transition is committed (WAL, `synchronous=FULL`) before the call returns, so a
//! killed coordinator leaves a registry that says exactly which hosts may have been touched;
//! `ferry resume` continues from there. One rollout per environment at a time: the `locks` table
//! names the deployment holding the environment, its owner, process and host. Statuses are
//! stored as the texts of [`crate::state`]'s tables. One connection, behind a mutex: every call
//! is one short statement or transaction.
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use rusqlite_migration::{M, Migrations};

use super::{
    Approval, DeploymentRow, EnvReport, EventRow, HostRow, HostUpdate, Lease, Lock, Measurement, NewDeployment,
    Registry, RegistryError, SlowHost, SmokeRun, VersionRow, now_ms, this_hostname,
};
use crate::state::{DeploymentKind, DeploymentStatus, HostState, legal};

mod pipeline;

fn migrations() -> Migrations<'static> {
    Migrations::new(vec![
        M::up(
            "CREATE TABLE deployments (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            environment TEXT NOT NULL,
            version TEXT NOT NULL,
            release_id TEXT NOT NULL,
            artifact TEXT NOT NULL,
            manifest_hash TEXT NOT NULL,
            strategy TEXT NOT NULL,
            status TEXT NOT NULL,
            started_ms INTEGER NOT NULL,
            finished_ms INTEGER,
            error TEXT
        );
        CREATE INDEX deployments_by_env ON deployments (environment, started_ms);
        CREATE TABLE hosts (
            deployment_id TEXT NOT NULL REFERENCES deployments (id),
            host TEXT NOT NULL,
            batch INTEGER NOT NULL,
            state TEXT NOT NULL,
            previous_release TEXT,
            started_ms INTEGER,
            finished_ms INTEGER,
            bytes_sent INTEGER NOT NULL DEFAULT 0,
            error TEXT,
            PRIMARY KEY (deployment_id, host)
        );
        CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            deployment_id TEXT NOT NULL REFERENCES deployments (id),
            time_ms INTEGER NOT NULL,
            host TEXT,
            kind TEXT NOT NULL,
            message TEXT NOT NULL
        );
        CREATE INDEX events_by_deployment ON events (deployment_id, id);
        CREATE TABLE locks (
            environment TEXT PRIMARY KEY,
            deployment_id TEXT NOT NULL,
            owner TEXT NOT NULL,
            hostname TEXT NOT NULL,
            pid INTEGER NOT NULL,
            since_ms INTEGER NOT NULL
        );",
        ),
        // blue-green: which group of an environment serves, and which deployment made it live.
        M::up(
            "CREATE TABLE live_groups (
            environment TEXT PRIMARY KEY,
            grp TEXT NOT NULL,
            deployment_id TEXT NOT NULL,
            since_ms INTEGER NOT NULL
        );",
        ),
        // The agent's own time for a host's activation (restarts and health probes included).
        M::up("ALTER TABLE hosts ADD COLUMN activate_ms INTEGER;"),
        // `ferry serve`: registered versions, smoke test runs, promotion approvals, and who asked
        // for a deployment (and from which deployment it was promoted).
        M::up(
            "CREATE TABLE versions (
            version TEXT PRIMARY KEY,
            artifact TEXT NOT NULL,
            release_id TEXT NOT NULL,
            manifest_hash TEXT NOT NULL,
            total_bytes INTEGER NOT NULL,
            files INTEGER NOT NULL,
            registered_by TEXT NOT NULL,
            registered_ms INTEGER NOT NULL,
            metadata TEXT NOT NULL
        );
        CREATE TABLE smoke_runs (
            id INTEGER PRIMARY KEY,
            deployment_id TEXT NOT NULL REFERENCES deployments (id),
            run_by TEXT NOT NULL,
            started_ms INTEGER NOT NULL,
            finished_ms INTEGER NOT NULL,
            passed INTEGER NOT NULL,
            results TEXT NOT NULL,
            env_checks INTEGER NOT NULL DEFAULT 1
        );
        CREATE INDEX smoke_by_deployment ON smoke_runs (deployment_id, id);
        CREATE TABLE approvals (
            deployment_id TEXT NOT NULL REFERENCES deployments (id),
            environment TEXT NOT NULL,
            approved_by TEXT NOT NULL,
            time_ms INTEGER NOT NULL,
            used_by TEXT,
            PRIMARY KEY (deployment_id, environment, approved_by)
        );
        ALTER TABLE deployments ADD COLUMN requested_by TEXT;
        ALTER TABLE deployments ADD COLUMN promoted_from TEXT;",
        ),
        // The release a host was switched to when it is not the deployment's own (rollbacks).
        M::up("ALTER TABLE hosts ADD COLUMN release TEXT;"),
        // Several apps in one fleet.toml: the app a deployment is of ("" before there were several).
        M::up("ALTER TABLE deployments ADD COLUMN app TEXT NOT NULL DEFAULT '';"),
        // `ferry serve` with several apps: a version is registered per app ("" before there were
        // several: the server of a single-app fleet claims those rows for its app).
        M::up(
            "CREATE TABLE versions_by_app (
            app TEXT NOT NULL,
            version TEXT NOT NULL,
            artifact TEXT NOT NULL,
            release_id TEXT NOT NULL,
            manifest_hash TEXT NOT NULL,
            total_bytes INTEGER NOT NULL,
            files INTEGER NOT NULL,
            registered_by TEXT NOT NULL,
            registered_ms INTEGER NOT NULL,
            metadata TEXT NOT NULL,
            PRIMARY KEY (app, version)
        );
        INSERT INTO versions_by_app
            SELECT '', version, artifact, release_id, manifest_hash, total_bytes, files, registered_by, registered_ms, metadata
            FROM versions ORDER BY rowid;
        DROP TABLE versions;
        ALTER TABLE versions_by_app RENAME TO versions;",
        ),
        // Environment locks are leases: renewed while their deployment runs.
        M::up("ALTER TABLE locks ADD COLUMN renewed_ms INTEGER;"),
        // Metric gates: every measurement of a deployment.
        M::up(
            "CREATE TABLE measurements (
            id INTEGER PRIMARY KEY,
            deployment_id TEXT NOT NULL REFERENCES deployments(id),
            batch INTEGER NOT NULL,
            gate TEXT NOT NULL,
            at_ms INTEGER NOT NULL,
            outcome TEXT NOT NULL,
            value REAL,
            baseline REAL,
            detail TEXT NOT NULL
        );
        CREATE INDEX measurements_by_deployment ON measurements (deployment_id, id);",
        ),
        // `ferry serve`'s leader lease and its fencing epoch.
        M::up(
            "CREATE TABLE leases (
            name TEXT PRIMARY KEY,
            holder TEXT NOT NULL,
            address TEXT NOT NULL,
            epoch INTEGER NOT NULL,
            expires_ms INTEGER NOT NULL
        );",
        ),
    ])
}

/// The SQLite registry.
pub struct Sqlite {
    db: Mutex<Db>,
    describe: String,
}

/// The connection and the queries.
struct Db {
    conn: Connection,
    path: PathBuf,
}

fn sql_error(path: &Path) -> impl Fn(rusqlite::Error) -> RegistryError + '_ {
    move |e| RegistryError::Storage { registry: path.display().to_string(), message: e.to_string() }
}

impl Sqlite {
    /// Opens (creating it and its directory if needed) and migrates the registry at `path`.
    pub fn open(path: &Path) -> Result<Sqlite, RegistryError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| RegistryError::Open {
                registry: path.display().to_string(),
                reason: format!("cannot create {}: {e}", dir.display()),
            })?;
        }
        let sql = sql_error(path);
        let conn = Connection::open(path).map_err(&sql)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(&sql)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(&sql)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(&sql)?;
        Self::prepare(conn, path)
    }

    /// A registry in memory, gone with the process: for tests and benchmarks of the engine.
    /// Some environment's lock (environment, deployment), if any is held.
    pub(crate) fn any_lock(&self) -> Result<Option<(String, String)>, RegistryError> {
        let db = self.db()?;
        db.conn
            .query_row("SELECT environment, deployment_id FROM locks LIMIT 1", [], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .map_err(db.sql())
    }

    /// Every row of `table` (`columns` of it), in the order they were recorded.
    pub(crate) fn dump(
        &self,
        table: &str,
        columns: &[(&str, super::Kind)],
    ) -> Result<Vec<Vec<super::Value>>, RegistryError> {
        use super::{Kind, Value};
        let db = self.db()?;
        let names: Vec<&str> = columns.iter().map(|(c, _)| *c).collect();
        let mut st =
            db.conn.prepare(&format!("SELECT {} FROM {table} ORDER BY rowid", names.join(", "))).map_err(db.sql())?;
        let rows = st
            .query_map([], |r| {
                columns
                    .iter()
                    .enumerate()
                    .map(|(i, (_, kind))| {
                        Ok(match kind {
                            Kind::Int => Value::Int(r.get(i)?),
                            Kind::Real => Value::Real(r.get(i)?),
                            Kind::Text => Value::Text(r.get(i)?),
                            Kind::Bool => Value::Bool(r.get(i)?),
                        })
                    })
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(db.sql())?;
        rows.collect::<Result<_, _>>().map_err(db.sql())
    }

    pub fn in_memory() -> Result<Sqlite, RegistryError> {
        let path = Path::new(":memory:");
        let conn = Connection::open_in_memory().map_err(sql_error(path))?;
        Self::prepare(conn, path)
    }

    fn prepare(mut conn: Connection, path: &Path) -> Result<Sqlite, RegistryError> {
        conn.pragma_update(None, "foreign_keys", "ON").map_err(sql_error(path))?;
        migrations().to_latest(&mut conn).map_err(|e| RegistryError::Open {
            registry: path.display().to_string(),
            reason: format!("migration failed: {e}"),
        })?;
        Ok(Sqlite { db: Mutex::new(Db { conn, path: path.to_owned() }), describe: path.display().to_string() })
    }

    fn db(&self) -> Result<MutexGuard<'_, Db>, RegistryError> {
        self.db.lock().map_err(|_| RegistryError::Poisoned)
    }
}

impl Registry for Sqlite {
    fn describe(&self) -> String {
        self.describe.clone()
    }
    fn lock_of(&self, env: &str) -> Result<Option<Lock>, RegistryError> {
        self.db()?.lock_of(env)
    }
    fn lock(&self, env: &str, deployment_id: &str, force: bool) -> Result<Option<Lock>, RegistryError> {
        self.db()?.lock(env, deployment_id, force)
    }
    fn unlock(&self, env: &str, deployment_id: &str) -> Result<(), RegistryError> {
        self.db()?.unlock(env, deployment_id)
    }
    fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        address: &str,
        ttl: std::time::Duration,
    ) -> Result<Lease, RegistryError> {
        let mut db = self.db()?;
        let path = db.path.clone();
        let sql = sql_error(&path);
        let tx = db.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(&sql)?;
        let row = read_lease(&tx, name).map_err(&sql)?;
        let (write, lease) = super::lease_step(row, name, holder, address, ttl);
        if write {
            tx.execute(
                "INSERT OR REPLACE INTO leases (name, holder, address, epoch, expires_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![lease.name, lease.holder, lease.address, lease.epoch, lease.expires_ms],
            )
            .map_err(&sql)?;
        }
        tx.commit().map_err(&sql)?;
        Ok(lease)
    }
    fn lease_of(&self, name: &str) -> Result<Option<Lease>, RegistryError> {
        let db = self.db()?;
        read_lease(&db.conn, name).map_err(db.sql())
    }
    fn release_lease(&self, name: &str, holder: &str) -> Result<(), RegistryError> {
        let db = self.db()?;
        db.conn
            .execute("UPDATE leases SET expires_ms = 0 WHERE name = ?1 AND holder = ?2", [name, holder])
            .map_err(db.sql())?;
        Ok(())
    }
    fn renew_lock(&self, env: &str, deployment_id: &str) -> Result<(), RegistryError> {
        let db = self.db()?;
        db.conn
            .execute(
                "UPDATE locks SET renewed_ms = ?3 WHERE environment = ?1 AND deployment_id = ?2",
                params![env, deployment_id, now_ms()],
            )
            .map_err(db.sql())?;
        Ok(())
    }
    fn create(&self, d: &NewDeployment<'_>) -> Result<(), RegistryError> {
        self.db()?.create(d)
    }
    fn set_status(&self, id: &str, status: DeploymentStatus, error: Option<&str>) -> Result<(), RegistryError> {
        self.db()?.set_status(id, status, error)
    }
    fn set_host(&self, id: &str, host: &str, to: HostState, update: &HostUpdate<'_>) -> Result<(), RegistryError> {
        self.db()?.set_host(id, host, to, update)
    }
    fn event(&self, id: &str, host: Option<&str>, kind: &str, message: &str) -> Result<(), RegistryError> {
        self.db()?.event(id, host, kind, message)
    }
    fn deployment(&self, id: &str) -> Result<Option<DeploymentRow>, RegistryError> {
        self.db()?.deployment(id)
    }
    fn hosts(&self, id: &str) -> Result<Vec<HostRow>, RegistryError> {
        self.db()?.hosts(id)
    }
    fn activated_hosts(&self, id: &str) -> Result<std::collections::HashSet<String>, RegistryError> {
        self.db()?.activated_hosts(id)
    }
    fn history(&self, env: Option<&str>, app: Option<&str>, limit: usize) -> Result<Vec<DeploymentRow>, RegistryError> {
        self.db()?.history(env, app, limit)
    }
    fn report(&self, env: Option<&str>) -> Result<Vec<EnvReport>, RegistryError> {
        self.db()?.report(env)
    }
    fn latest_deployment(&self, env: &str, app: Option<&str>) -> Result<Option<String>, RegistryError> {
        self.db()?.latest_deployment(env, app)
    }
    fn events_since(&self, id: &str, after: i64) -> Result<Vec<EventRow>, RegistryError> {
        self.db()?.events_since(id, after)
    }
    fn live_group(&self, env: &str) -> Result<Option<(String, String)>, RegistryError> {
        self.db()?.live_group(env)
    }
    fn set_live_group(&self, env: &str, group: &str, deployment_id: &str) -> Result<(), RegistryError> {
        self.db()?.set_live_group(env, group, deployment_id)
    }
    fn register_version(&self, v: &VersionRow) -> Result<Option<VersionRow>, RegistryError> {
        self.db()?.register_version(v)
    }
    fn version(&self, app: &str, version: &str) -> Result<Option<VersionRow>, RegistryError> {
        self.db()?.version(app, version)
    }
    fn versions(&self, app: Option<&str>, limit: usize) -> Result<Vec<VersionRow>, RegistryError> {
        self.db()?.versions(app, limit)
    }
    fn claim_versions(&self, app: &str) -> Result<usize, RegistryError> {
        self.db()?.claim_versions(app)
    }
    fn set_requested_by(&self, id: &str, by: &str, promoted_from: Option<&str>) -> Result<(), RegistryError> {
        self.db()?.set_requested_by(id, by, promoted_from)
    }
    fn record_smoke(&self, run: &SmokeRun) -> Result<i64, RegistryError> {
        self.db()?.record_smoke(run)
    }
    fn smoke_runs(&self, deployment_id: &str) -> Result<Vec<SmokeRun>, RegistryError> {
        self.db()?.smoke_runs(deployment_id)
    }
    fn approve(&self, deployment_id: &str, environment: &str, by: &str) -> Result<(), RegistryError> {
        self.db()?.approve(deployment_id, environment, by)
    }
    fn use_approval(
        &self,
        deployment_id: &str,
        environment: &str,
        by: &str,
        promotion: &str,
    ) -> Result<(), RegistryError> {
        self.db()?.use_approval(deployment_id, environment, by, promotion)
    }
    fn approvals(&self, deployment_id: &str) -> Result<Vec<Approval>, RegistryError> {
        self.db()?.approvals(deployment_id)
    }
    fn record_measurement(&self, m: &Measurement) -> Result<(), RegistryError> {
        self.db()?.record_measurement(m)
    }
    fn measurements(&self, deployment_id: &str) -> Result<Vec<Measurement>, RegistryError> {
        self.db()?.measurements(deployment_id)
    }
}

impl Db {
    fn sql(&self) -> impl Fn(rusqlite::Error) -> RegistryError + '_ {
        sql_error(&self.path)
    }

    /// The lock of an environment, if held.
    fn lock_of(&self, env: &str) -> Result<Option<Lock>, RegistryError> {
        read_lock(&self.conn, env).map_err(self.sql())
    }

    /// Takes the environment for `deployment_id`. A lock held by the same deployment whose process
    /// is gone is taken over (resume); any other lock refuses, unless `force`, which breaks it and
    /// returns it (the caller warns).
    fn lock(&mut self, env: &str, deployment_id: &str, force: bool) -> Result<Option<Lock>, RegistryError> {
        let path = self.path.clone();
        let sql = sql_error(&path);
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(&sql)?;
        let held = read_lock(&tx, env).map_err(&sql)?;
        let broken = match held {
            Some(l) if l.mine() && l.deployment_id == deployment_id => None,
            Some(l) if l.deployment_id == deployment_id && l.stale() => None,
            Some(l) if force => Some(l),
            Some(lock) => return Err(RegistryError::Locked { env: env.to_string(), lock: Box::new(lock) }),
            None => None,
        };
        let owner = std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| "unknown".into());
        tx.execute(
            "INSERT OR REPLACE INTO locks (environment, deployment_id, owner, hostname, pid, since_ms, renewed_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
            params![env, deployment_id, owner, this_hostname(), std::process::id(), now_ms()],
        )
        .map_err(&sql)?;
        tx.commit().map_err(&sql)?;
        Ok(broken)
    }

    /// Releases the environment if `deployment_id` holds it.
    fn unlock(&self, env: &str, deployment_id: &str) -> Result<(), RegistryError> {
        self.conn
            .execute("DELETE FROM locks WHERE environment = ?1 AND deployment_id = ?2", [env, deployment_id])
            .map_err(self.sql())?;
        Ok(())
    }

    /// Records a new deployment (status `pending`) and its hosts (`pending`), in one transaction.
    fn create(&mut self, d: &NewDeployment<'_>) -> Result<(), RegistryError> {
        let path = self.path.clone();
        let sql = sql_error(&path);
        let tx = self.conn.transaction().map_err(&sql)?;
        let now = now_ms();
        tx.execute(
            "INSERT INTO deployments (id, kind, environment, version, release_id, artifact, manifest_hash, strategy, status, started_ms, app)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'pending', ?9, ?10)",
            params![
                d.id,
                d.kind.as_str(),
                d.environment,
                d.version,
                d.release_id,
                d.artifact,
                d.manifest_hash,
                d.strategy,
                now,
                d.app
            ],
        )
        .map_err(&sql)?;
        for (host, batch) in d.hosts {
            tx.execute(
                "INSERT INTO hosts (deployment_id, host, batch, state) VALUES (?1, ?2, ?3, 'pending')",
                params![d.id, host, *batch as i64],
            )
            .map_err(&sql)?;
        }
        tx.execute(
            "INSERT INTO events (deployment_id, time_ms, host, kind, message) VALUES (?1, ?2, NULL, 'created', ?3)",
            params![d.id, now, format!("{} of {} to {} ({} hosts)", d.kind, d.version, d.environment, d.hosts.len())],
        )
        .map_err(&sql)?;
        tx.commit().map_err(&sql)
    }

    /// Sets a deployment's status (terminal ones also set `finished_ms`) and logs the event.
    fn set_status(&self, id: &str, status: DeploymentStatus, error: Option<&str>) -> Result<(), RegistryError> {
        let now = now_ms();
        let terminal = status.is_finished();
        let status = status.as_str();
        self.conn
            .execute(
                "UPDATE deployments SET status = ?2, error = COALESCE(?3, error),
                 finished_ms = CASE WHEN ?4 THEN ?5 ELSE NULL END WHERE id = ?1",
                params![id, status, error, terminal, now],
            )
            .map_err(self.sql())?;
        self.event(id, None, status, error.unwrap_or(""))
    }

    /// Moves a host to `state`, with what is known so far. `staging` and `activating` (re)start
    /// its clock; terminal states stop it.
    fn set_host(&self, id: &str, host: &str, to: HostState, update: &HostUpdate<'_>) -> Result<(), RegistryError> {
        let from: String = self
            .conn
            .query_row("SELECT state FROM hosts WHERE deployment_id = ?1 AND host = ?2", params![id, host], |r| {
                r.get(0)
            })
            .map_err(self.sql())?;
        if !HostState::parse(&from).is_some_and(|f| legal(f, to)) {
            return Err(RegistryError::Illegal { deployment: id.into(), host: host.into(), from, to });
        }
        let now = now_ms();
        let starts = to == HostState::Staging;
        let ends = to.is_terminal() || to == HostState::Staged;
        let state = to.as_str();
        self.conn
            .execute(
                "UPDATE hosts SET state = ?3,
                   previous_release = COALESCE(?4, previous_release),
                   bytes_sent = bytes_sent + ?5,
                   error = COALESCE(?6, error),
                   started_ms = CASE WHEN ?7 OR started_ms IS NULL THEN ?9 ELSE started_ms END,
                   finished_ms = CASE WHEN ?8 THEN ?9 ELSE finished_ms END,
                   activate_ms = COALESCE(?10, activate_ms),
                   release = COALESCE(?11, release)
                 WHERE deployment_id = ?1 AND host = ?2",
                params![
                    id,
                    host,
                    state,
                    update.previous_release,
                    update.bytes as i64,
                    update.error,
                    starts,
                    ends,
                    now,
                    update.activate_ms.map(|ms| ms as i64),
                    update.release
                ],
            )
            .map_err(self.sql())?;
        self.event(id, Some(host), state, update.error.unwrap_or(""))
    }

    fn event(&self, id: &str, host: Option<&str>, kind: &str, message: &str) -> Result<(), RegistryError> {
        self.conn
            .execute(
                "INSERT INTO events (deployment_id, time_ms, host, kind, message) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![id, now_ms(), host, kind, message],
            )
            .map_err(self.sql())?;
        Ok(())
    }

    const DEPLOYMENT_COLUMNS: &'static str = "d.id, d.kind, d.environment, d.version, d.release_id, d.artifact,
        d.manifest_hash, d.strategy, d.status, d.started_ms, d.finished_ms, d.error,
        (SELECT COALESCE(SUM(bytes_sent), 0) FROM hosts h WHERE h.deployment_id = d.id),
        (SELECT COUNT(*) FROM hosts h WHERE h.deployment_id = d.id AND h.state IN ('failed', 'rolled_back', 'unreachable')),
        d.requested_by, d.promoted_from, d.app";

    fn deployment_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeploymentRow> {
        Ok(DeploymentRow {
            id: r.get(0)?,
            kind: parsed(r, 1, DeploymentKind::parse)?,
            environment: r.get(2)?,
            version: r.get(3)?,
            release_id: r.get(4)?,
            artifact: r.get(5)?,
            manifest_hash: r.get(6)?,
            strategy: r.get(7)?,
            status: parsed(r, 8, DeploymentStatus::parse)?,
            started_ms: r.get(9)?,
            finished_ms: r.get(10)?,
            error: r.get(11)?,
            bytes_sent: r.get(12)?,
            hosts_failed: r.get(13)?,
            requested_by: r.get(14)?,
            promoted_from: r.get(15)?,
            app: r.get(16)?,
        })
    }

    fn deployment(&self, id: &str) -> Result<Option<DeploymentRow>, RegistryError> {
        let q = format!("SELECT {} FROM deployments d WHERE d.id = ?1", Self::DEPLOYMENT_COLUMNS);
        self.conn.query_row(&q, [id], Self::deployment_row).optional().map_err(self.sql())
    }

    /// The hosts of a deployment, in plan order.
    fn hosts(&self, id: &str) -> Result<Vec<HostRow>, RegistryError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT host, batch, state, previous_release, started_ms, finished_ms, bytes_sent, error, activate_ms, release
                 FROM hosts WHERE deployment_id = ?1 ORDER BY rowid",
            )
            .map_err(self.sql())?;
        let rows = st
            .query_map([id], |r| {
                Ok(HostRow {
                    host: r.get(0)?,
                    batch: r.get(1)?,
                    state: parsed(r, 2, HostState::parse)?,
                    previous_release: r.get(3)?,
                    started_ms: r.get(4)?,
                    finished_ms: r.get(5)?,
                    bytes_sent: r.get(6)?,
                    error: r.get(7)?,
                    activate_ms: r.get(8)?,
                    release: r.get(9)?,
                })
            })
            .map_err(self.sql())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.sql())
    }

    /// blue-green: the live group of `env` and the deployment that made it live.
    fn live_group(&self, env: &str) -> Result<Option<(String, String)>, RegistryError> {
        self.conn
            .query_row("SELECT grp, deployment_id FROM live_groups WHERE environment = ?1", [env], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()
            .map_err(self.sql())
    }

    /// blue-green: records `group` as the live group of `env`, switched by `deployment_id`.
    fn set_live_group(&self, env: &str, group: &str, deployment_id: &str) -> Result<(), RegistryError> {
        self.conn
            .execute(
                "INSERT INTO live_groups (environment, grp, deployment_id, since_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (environment) DO UPDATE SET grp = ?2, deployment_id = ?3, since_ms = ?4",
                params![env, group, deployment_id, now_ms()],
            )
            .map_err(self.sql())?;
        self.event(deployment_id, None, "live", group)
    }

    /// The hosts of a deployment whose activation began (they may run its release).
    fn activated_hosts(&self, id: &str) -> Result<std::collections::HashSet<String>, RegistryError> {
        let mut st = self
            .conn
            .prepare("SELECT DISTINCT host FROM events WHERE deployment_id = ?1 AND kind = 'activating' AND host IS NOT NULL")
            .map_err(self.sql())?;
        let rows = st.query_map([id], |r| r.get(0)).map_err(self.sql())?;
        rows.collect::<Result<_, _>>().map_err(self.sql())
    }

    /// The newest deployments, newest first.
    fn history(&self, env: Option<&str>, app: Option<&str>, limit: usize) -> Result<Vec<DeploymentRow>, RegistryError> {
        let q = format!(
            "SELECT {} FROM deployments d WHERE (?1 IS NULL OR d.environment = ?1) AND (?2 IS NULL OR d.app = ?2)
             ORDER BY d.started_ms DESC, d.rowid DESC LIMIT ?3",
            Self::DEPLOYMENT_COLUMNS
        );
        let mut st = self.conn.prepare(&q).map_err(self.sql())?;
        let rows = st.query_map(params![env, app, limit as i64], Self::deployment_row).map_err(self.sql())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.sql())
    }

    /// Per-environment success and rollback rates and durations of finished deployments.
    fn report(&self, env: Option<&str>) -> Result<Vec<EnvReport>, RegistryError> {
        let finished = self.history(env, None, usize::MAX >> 1)?;
        // Deployments a host of which went back (its agent's own rollback, or a halt's): one
        // query, not one per deployment.
        let mut st = self
            .conn
            .prepare("SELECT DISTINCT deployment_id FROM hosts WHERE state = 'rolled_back'")
            .map_err(self.sql())?;
        let with_rolled_back_host: std::collections::HashSet<String> =
            st.query_map([], |r| r.get(0)).map_err(self.sql())?.collect::<Result<_, _>>().map_err(self.sql())?;
        super::build_report(finished, &with_rolled_back_host, |e, app| {
            let mut st = self.conn.prepare(super::SLOWEST_HOSTS).map_err(self.sql())?;
            st.query_map([e, app], |r| Ok(SlowHost { host: r.get(0)?, mean_ms: r.get::<_, f64>(1)?.max(0.0) as u64 }))
                .map_err(self.sql())?
                .collect::<Result<Vec<_>, _>>()
                .map_err(self.sql())
        })
    }
}

/// A column holding one of [`crate::state`]'s names; an unknown one is a conversion error naming it.
fn parsed<T>(r: &rusqlite::Row<'_>, i: usize, parse: fn(&str) -> Option<T>) -> rusqlite::Result<T> {
    let text: String = r.get(i)?;
    parse(&text).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            i,
            rusqlite::types::Type::Text,
            format!("unknown value {text:?}").into(),
        )
    })
}

fn read_lease(conn: &Connection, name: &str) -> rusqlite::Result<Option<Lease>> {
    conn.query_row("SELECT name, holder, address, epoch, expires_ms FROM leases WHERE name = ?1", [name], |r| {
        Ok(Lease { name: r.get(0)?, holder: r.get(1)?, address: r.get(2)?, epoch: r.get(3)?, expires_ms: r.get(4)? })
    })
    .optional()
}

fn read_lock(conn: &Connection, env: &str) -> rusqlite::Result<Option<Lock>> {
    conn.query_row(
        "SELECT deployment_id, owner, hostname, pid, since_ms, COALESCE(renewed_ms, since_ms) FROM locks WHERE environment = ?1",
        [env],
        |r| {
            Ok(Lock {
                deployment_id: r.get(0)?,
                owner: r.get(1)?,
                hostname: r.get(2)?,
                pid: r.get(3)?,
                since_ms: r.get(4)?,
                renewed_ms: r.get(5)?,
            })
        },
    )
    .optional()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::suite;

    fn open() -> (tempfile::TempDir, Sqlite) {
        let dir = tempfile::tempdir().expect("tempdir");
        let reg = Sqlite::open(&dir.path().join("state/registry.db")).expect("open");
        (dir, reg)
    }

    /// A registry from before versions were kept per app keeps its versions, as app "" (which
    /// a single-app server claims), and takes a second app's version of the same name.
    #[test]
    fn versions_registered_before_apps_survive_the_migration() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("registry.db");
        {
            let mut conn = Connection::open(&path).expect("open");
            // The schema before the versions table was keyed by app.
            migrations().to_version(&mut conn, 6).expect("old schema");
            conn.execute(
                "INSERT INTO versions (version, artifact, release_id, manifest_hash, total_bytes, files, registered_by, registered_ms, metadata)
                 VALUES ('1.0', '/build', '1.0-aa', 'aa', 10, 1, 'token:ci', 5, '{\"git\":\"4f2a\"}')",
                [],
            )
            .expect("insert");
        }
        let reg = Sqlite::open(&path).expect("migrates");
        let old = reg.version("", "1.0").expect("lookup").expect("kept");
        assert_eq!((old.artifact.as_str(), old.metadata["git"].as_str()), ("/build", Some("4f2a")));
        let worker = VersionRow { app: "worker".into(), manifest_hash: "bb".into(), ..old.clone() };
        assert!(reg.register_version(&worker).expect("register").is_none(), "another app's 1.0 is new");
        assert_eq!(reg.versions(None, 10).expect("list").len(), 2);
        assert_eq!(reg.claim_versions("web").expect("claim"), 1);
        assert_eq!(reg.versions(Some("web"), 10).expect("list")[0].manifest_hash, "aa");
    }

    #[test]
    fn transitions_are_recorded_with_timings_and_bytes() {
        let (_d, reg) = open();
        suite::transitions_are_recorded_with_timings_and_bytes(&reg);
        // Reopening keeps everything (migrations are not re-run destructively).
        let path = PathBuf::from(reg.describe());
        drop(reg);
        let reg = Sqlite::open(&path).expect("reopen");
        assert_eq!(reg.history(Some("prod"), None, 10).expect("history").len(), 1);
    }

    #[test]
    fn one_rollout_per_environment() {
        suite::one_rollout_per_environment(&open().1);
    }

    #[test]
    fn a_dead_holder_is_stale_and_only_its_deployment_takes_over() {
        let (_d, reg) = open();
        let set_pid = |pid: u32| {
            reg.db().expect("db").conn.execute("UPDATE locks SET pid = ?1", [pid]).expect("fake pid");
        };
        suite::a_dead_holder_is_stale_and_only_its_deployment_takes_over(&reg, &set_pid);
    }

    #[test]
    fn a_holder_elsewhere_is_stale_once_its_lease_lapses() {
        let (_d, reg) = open();
        let exec = |sql: &str| {
            reg.db().expect("db").conn.execute(sql, []).expect("sql");
        };
        suite::a_holder_elsewhere_is_stale_once_its_lease_lapses(&reg, &exec);
    }

    #[test]
    fn one_leader_at_a_time_and_each_takeover_is_a_new_epoch() {
        let (_d, reg) = open();
        let exec = |sql: &str| {
            reg.db().expect("db").conn.execute(sql, []).expect("sql");
        };
        suite::one_leader_at_a_time_and_each_takeover_is_a_new_epoch(&reg, &exec);
    }

    #[test]
    fn report_rates_and_percentiles() {
        suite::report_rates_and_percentiles(&open().1);
        assert_eq!(crate::registry::percentile(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 95), 10);
        assert_eq!(crate::registry::percentile(&[5], 95), 5);
        assert_eq!(crate::registry::percentile(&[], 95), 0);
    }

    #[test]
    fn pipeline_records_round_trip() {
        suite::pipeline_records_round_trip(&open().1);
    }
}
