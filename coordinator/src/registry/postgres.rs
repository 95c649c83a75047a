//! The registry on PostgreSQL (`registry = "postgres://…"`): the same tables as SQLite's, for
//! coordinators on several machines sharing one database.
//!
//! tokio-postgres through a deadpool pool (a connection that broke, such as after a server
//! restart, is replaced on the next call). The [`Registry`] trait is synchronous, as SQLite's calls
//! are: each call runs its queries to their end on the calling thread while a small runtime of
//! this registry's own drives the connections, so it works the same from async and blocking code.
//! TLS to the server is rustls (`sslmode=require` or `verify-full`: the system's CA roots, or
//! `sslrootcert`). The password never appears in [`Registry::describe`] or an error.
//!
//! The schema is versioned in `ferry_schema`; a database whose schema is newer than this binary
//! knows is refused, not changed.
use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Wake};
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::{
    Approval, DeploymentRow, EnvReport, EventRow, HostRow, HostUpdate, Lease, Lock, Measurement, NewDeployment,
    Registry, RegistryError, SERVE_LEASE, SlowHost, SmokeRun, VersionRow, now_ms, this_hostname,
};
use crate::config::PostgresRegistry;
use crate::state::{DeploymentKind, DeploymentStatus, HostState, legal};

/// The schema, one step per version (the first is SQLite's migrations 1-8 at once, the second
/// its 9th).
const SCHEMA: &[&str] = &[
    "CREATE TABLE deployments (
        id TEXT PRIMARY KEY,
        seq BIGSERIAL,
        kind TEXT NOT NULL,
        environment TEXT NOT NULL,
        version TEXT NOT NULL,
        release_id TEXT NOT NULL,
        artifact TEXT NOT NULL,
        manifest_hash TEXT NOT NULL,
        strategy TEXT NOT NULL,
        status TEXT NOT NULL,
        started_ms BIGINT NOT NULL,
        finished_ms BIGINT,
        error TEXT,
        requested_by TEXT,
        promoted_from TEXT,
        app TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX deployments_by_env ON deployments (environment, started_ms);
    CREATE TABLE hosts (
        deployment_id TEXT NOT NULL REFERENCES deployments (id),
        seq BIGSERIAL,
        host TEXT NOT NULL,
        batch BIGINT NOT NULL,
        state TEXT NOT NULL,
        previous_release TEXT,
        started_ms BIGINT,
        finished_ms BIGINT,
        bytes_sent BIGINT NOT NULL DEFAULT 0,
        error TEXT,
        activate_ms BIGINT,
        release TEXT,
        PRIMARY KEY (deployment_id, host)
    );
    CREATE TABLE events (
        id BIGSERIAL PRIMARY KEY,
        deployment_id TEXT NOT NULL REFERENCES deployments (id),
        time_ms BIGINT NOT NULL,
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
        pid BIGINT NOT NULL,
        since_ms BIGINT NOT NULL
    );
    CREATE TABLE live_groups (
        environment TEXT PRIMARY KEY,
        grp TEXT NOT NULL,
        deployment_id TEXT NOT NULL,
        since_ms BIGINT NOT NULL
    );
    CREATE TABLE versions (
        app TEXT NOT NULL,
        version TEXT NOT NULL,
        seq BIGSERIAL,
        artifact TEXT NOT NULL,
        release_id TEXT NOT NULL,
        manifest_hash TEXT NOT NULL,
        total_bytes BIGINT NOT NULL,
        files BIGINT NOT NULL,
        registered_by TEXT NOT NULL,
        registered_ms BIGINT NOT NULL,
        metadata TEXT NOT NULL,
        PRIMARY KEY (app, version)
    );
    CREATE TABLE smoke_runs (
        id BIGSERIAL PRIMARY KEY,
        deployment_id TEXT NOT NULL REFERENCES deployments (id),
        run_by TEXT NOT NULL,
        started_ms BIGINT NOT NULL,
        finished_ms BIGINT NOT NULL,
        passed BOOLEAN NOT NULL,
        results TEXT NOT NULL,
        env_checks BOOLEAN NOT NULL DEFAULT FALSE
    );
    CREATE INDEX smoke_by_deployment ON smoke_runs (deployment_id, id);
    CREATE TABLE approvals (
        deployment_id TEXT NOT NULL REFERENCES deployments (id),
        environment TEXT NOT NULL,
        approved_by TEXT NOT NULL,
        time_ms BIGINT NOT NULL,
        used_by TEXT,
        PRIMARY KEY (deployment_id, environment, approved_by)
    );
    CREATE TABLE measurements (
        id BIGSERIAL PRIMARY KEY,
        deployment_id TEXT NOT NULL REFERENCES deployments (id),
        batch BIGINT NOT NULL,
        gate TEXT NOT NULL,
        at_ms BIGINT NOT NULL,
        outcome TEXT NOT NULL,
        value DOUBLE PRECISION,
        baseline DOUBLE PRECISION,
        detail TEXT NOT NULL
    );
    CREATE INDEX measurements_by_deployment ON measurements (deployment_id, id);",
    // Environment locks are leases: renewed while their deployment runs.
    "ALTER TABLE locks ADD COLUMN renewed_ms BIGINT;",
    // `ferry serve`'s leader lease and its fencing epoch.
    "CREATE TABLE leases (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        address TEXT NOT NULL,
        epoch BIGINT NOT NULL,
        expires_ms BIGINT NOT NULL
    );",
];

/// The PostgreSQL registry.
pub struct Postgres {
    pool: Pool,
    /// Drives the connections (their I/O and the pool's timers) whatever thread calls; taken
    /// on drop, which may happen in async code.
    runtime: Option<tokio::runtime::Runtime>,
    /// `postgres://user@host:port/db`: never the password.
    describe: String,
    /// Set by a `ferry serve` on this registry ([`Registry::fence_writes`]): its writes go
    /// through only while this holder has the leader lease.
    fence: std::sync::OnceLock<String>,
}

/// How long one call may take before it counts as unanswered (a database gone quiet, a link
/// cut: TCP alone would wait minutes).
const ATTEMPT: Duration = Duration::from_secs(10);
/// How long a call is retried while the database cannot be reached (a restart, a failover).
const RETRY_FOR: Duration = Duration::from_secs(30);
/// Every session's limit on a transaction left open with nothing running (its client is gone).
const IDLE_IN_TRANSACTION: &str = "-c idle_in_transaction_session_timeout=3000";

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Wakes the thread that waits for a call to end.
struct Unpark(std::thread::Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// A registry URL without its password (for messages).
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let rest = rest.split('?').next().unwrap_or_default();
    match rest.rsplit_once('@') {
        Some((user, host)) => format!("{scheme}://{}@{host}", user.split(':').next().unwrap_or_default()),
        None => format!("{scheme}://{rest}"),
    }
}

impl Postgres {
    /// Connects to `url` (a libpq-style URL), checks the schema and migrates it to this binary's.
    pub fn open(url: &str) -> Result<Postgres, RegistryError> {
        Postgres::open_with(&PostgresRegistry::at(url))
    }

    /// [`Postgres::open`] with fleet.toml's `[registry]` table: its CA and password file.
    pub fn open_with(at: &PostgresRegistry) -> Result<Postgres, RegistryError> {
        let url = at.url.as_str();
        let describe = redact(url);
        let open_error = |reason: String| RegistryError::Open { registry: describe.clone(), reason };
        let mut config: tokio_postgres::Config =
            url.parse().map_err(|e: tokio_postgres::Error| open_error(scrub(&e, url)))?;
        if let Some(file) = &at.password_file {
            if config.get_password().is_some() {
                return Err(open_error(format!(
                    "the URL has a password and password_file {} names another: keep it in the file only",
                    file.display()
                )));
            }
            config.password(read_password(file).map_err(&open_error)?);
        }
        // A coordinator cut off mid-transaction must not hold its row locks (the leader lease's
        // above all) until TCP notices: the server ends such a transaction after a few seconds.
        let options = [config.get_options().unwrap_or_default(), IDLE_IN_TRANSACTION].join(" ");
        config.options(options.trim());
        let tls = tls_for(url, at.ca.as_deref()).map_err(&open_error)?;
        let manager = Manager::from_config(config, tls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("ferry-registry")
            .enable_all()
            .build()
            .map_err(|e| open_error(format!("cannot start its runtime: {e}")))?;
        let pool = {
            let _in = runtime.enter();
            Pool::builder(manager)
                .max_size(4)
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .wait_timeout(Some(std::time::Duration::from_secs(10)))
                .create_timeout(Some(std::time::Duration::from_secs(10)))
                .build()
                .map_err(|e| open_error(e.to_string()))?
        };
        let pg = Postgres { pool, runtime: Some(runtime), describe, fence: std::sync::OnceLock::new() };
        // At start an unreachable database is an error at once, not after the retries.
        pg.block_on(pg.bounded(pg.migrate())).map_err(|e| match e {
            RegistryError::Unreachable { registry, message } => {
                RegistryError::Open { registry, reason: format!("cannot reach the database: {message}") }
            }
            e => e,
        })?;
        Ok(pg)
    }

    /// Runs the call `f` makes to its end: each attempt bounded by [`ATTEMPT`], retried with
    /// backoff for [`RETRY_FOR`] while the database cannot be reached. Every call is one
    /// transaction (or one statement), so an attempt cut short changed nothing.
    fn run<T, F>(&self, mut f: impl FnMut() -> F) -> Result<T, RegistryError>
    where
        F: Future<Output = Result<T, RegistryError>>,
    {
        let mut retrying = || {
            let started = Instant::now();
            let mut pause = Duration::from_millis(100);
            loop {
                match self.block_on(self.bounded(f())) {
                    Err(RegistryError::Unreachable { message, .. }) if started.elapsed() + pause < RETRY_FOR => {
                        tracing::warn!(registry = self.describe, "{message}; retrying in {} ms", pause.as_millis());
                        std::thread::sleep(pause);
                        pause = (pause * 2).min(Duration::from_secs(2));
                    }
                    r => return r,
                }
            }
        };
        // A worker of a multi-threaded runtime hands its other tasks on while this one waits.
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(retrying),
            _ => retrying(),
        }
    }

    /// `f`, or [`RegistryError::Unreachable`] once it has taken [`ATTEMPT`].
    async fn bounded<T>(&self, f: impl Future<Output = Result<T, RegistryError>>) -> Result<T, RegistryError> {
        match tokio::time::timeout(ATTEMPT, f).await {
            Ok(r) => r,
            Err(_) => Err(self.unreachable(format!("no answer in {} s", ATTEMPT.as_secs()))),
        }
    }

    /// Runs `f` to its end on this thread, with the registry's runtime driving the I/O.
    ///
    /// Outside tokio's cooperative budget: called from a task (the engine's), `f` would spend
    /// that task's budget, and once it is spent tokio defers `f`'s wake-up until the task
    /// yields to its runtime, which it cannot while this thread waits here.
    fn block_on<T>(&self, f: impl Future<Output = T>) -> T {
        let _in = self.runtime.as_ref().map(tokio::runtime::Runtime::enter);
        let waker = Arc::new(Unpark(std::thread::current())).into();
        let mut cx = Context::from_waker(&waker);
        let mut f = std::pin::pin!(tokio::task::unconstrained(f));
        loop {
            if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                return v;
            }
            std::thread::park();
        }
    }

    fn unreachable(&self, message: String) -> RegistryError {
        RegistryError::Unreachable { registry: self.describe.clone(), message }
    }

    /// A failed statement: [`RegistryError::Unreachable`] when the connection or the server
    /// went away (worth retrying), else [`RegistryError::Storage`].
    fn error(&self, e: &tokio_postgres::Error) -> RegistryError {
        let Some(db) = e.as_db_error() else {
            let source = std::error::Error::source(e);
            // "invalid configuration: password missing", "error connecting to server: Connection refused".
            let text = source.map_or_else(|| e.to_string(), |s| format!("{e}: {s}"));
            if e.is_closed() || source.is_some_and(|s| s.is::<std::io::Error>()) {
                return self.unreachable(text);
            }
            return RegistryError::Storage { registry: self.describe.clone(), message: text };
        };
        let code = db.code().code();
        let message = format!("{code}: {}", db.message());
        // Connection exceptions, the server shutting down or starting, serialization failures.
        if code.starts_with("08") || code.starts_with("57P") || code == "40001" || code == "40P01" {
            return self.unreachable(message);
        }
        RegistryError::Storage { registry: self.describe.clone(), message }
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, RegistryError> {
        use deadpool_postgres::PoolError;
        self.pool.get().await.map_err(|e| match e {
            PoolError::Backend(e) => self.error(&e),
            PoolError::Timeout(_) => self.unreachable("no connection in time".into()),
            e => RegistryError::Storage { registry: self.describe.clone(), message: e.to_string() },
        })
    }

    /// A transaction on `c` for a write: when fenced, it first checks (and holds, until it ends)
    /// the leader lease, so a server that lost the lease writes nothing.
    async fn begin<'c>(
        &self,
        c: &'c mut deadpool_postgres::Object,
    ) -> Result<deadpool_postgres::Transaction<'c>, RegistryError> {
        let tx = c.transaction().await.map_err(|e| self.error(&e))?;
        if let Some(me) = self.fence.get() {
            let row = tx
                .query_opt("SELECT holder, epoch FROM leases WHERE name = $1 FOR SHARE", &[&SERVE_LEASE])
                .await
                .map_err(|e| self.error(&e))?;
            let (holder, epoch) = row.map_or((String::new(), 0), |r| (r.get(0), r.get(1)));
            if holder != *me {
                return Err(RegistryError::Fenced { registry: self.describe.clone(), holder, epoch });
            }
        }
        Ok(tx)
    }

    async fn commit(&self, tx: deadpool_postgres::Transaction<'_>) -> Result<(), RegistryError> {
        tx.commit().await.map_err(|e| self.error(&e))
    }

    /// One write statement (fenced when the registry is).
    async fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, RegistryError> {
        let mut c = self.client().await?;
        if self.fence.get().is_none() {
            return c.execute(sql, params).await.map_err(|e| self.error(&e));
        }
        let tx = self.begin(&mut c).await?;
        let n = tx.execute(sql, params).await.map_err(|e| self.error(&e))?;
        self.commit(tx).await?;
        Ok(n)
    }

    async fn query(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, RegistryError> {
        let c = self.client().await?;
        c.query(sql, params).await.map_err(|e| self.error(&e))
    }

    async fn query_opt(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Option<Row>, RegistryError> {
        let c = self.client().await?;
        c.query_opt(sql, params).await.map_err(|e| self.error(&e))
    }

    async fn migrate(&self) -> Result<(), RegistryError> {
        {
            let mut c = self.client().await?;
            let tx = c.transaction().await.map_err(|e| self.error(&e))?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS ferry_schema (version BIGINT NOT NULL); LOCK TABLE ferry_schema",
            )
            .await
            .map_err(|e| self.error(&e))?;
            let row = tx.query_opt("SELECT version FROM ferry_schema", &[]).await.map_err(|e| self.error(&e))?;
            let have = row.map_or(0, |r| r.get::<_, i64>(0));
            let know = i64::try_from(SCHEMA.len()).unwrap_or(i64::MAX);
            if have > know {
                return Err(RegistryError::Open {
                    registry: self.describe.clone(),
                    reason: format!(
                        "its schema is version {have}, newer than this ferry knows ({know}): upgrade ferry; the database was not changed"
                    ),
                });
            }
            for step in SCHEMA.iter().skip(usize::try_from(have).unwrap_or(0)) {
                tx.batch_execute(step).await.map_err(|e| self.error(&e))?;
            }
            if have == 0 {
                tx.execute("INSERT INTO ferry_schema (version) VALUES ($1)", &[&know]).await
            } else {
                tx.execute("UPDATE ferry_schema SET version = $1", &[&know]).await
            }
            .map_err(|e| self.error(&e))?;
            tx.commit().await.map_err(|e| self.error(&e))
        }
    }

    /// Writes `tables` (from `ferry registry migrate`) into this registry, which must hold no
    /// deployment yet, in one transaction; the id sequences continue after the copied ids.
    pub(crate) fn import(&self, tables: &[super::Table<'_>]) -> Result<(), RegistryError> {
        use super::Value;
        self.run(|| async move {
            let mut c = self.client().await?;
            let tx = c.transaction().await.map_err(|e| self.error(&e))?;
            let have: i64 =
                tx.query_one("SELECT COUNT(*) FROM deployments", &[]).await.map_err(|e| self.error(&e))?.get(0);
            if have > 0 {
                return Err(RegistryError::Open {
                    registry: self.describe.clone(),
                    reason: format!("it already holds {have} deployment(s): migrate into an empty database; nothing was copied"),
                });
            }
            for (table, columns, rows) in tables {
                let names: Vec<&str> = columns.iter().map(|(c, _)| *c).collect();
                let marks: Vec<String> = (1..=names.len()).map(|i| format!("${i}")).collect();
                let sql = format!("INSERT INTO {table} ({}) VALUES ({})", names.join(", "), marks.join(", "));
                let st = tx.prepare(&sql).await.map_err(|e| self.error(&e))?;
                for row in rows {
                    let params: Vec<&(dyn ToSql + Sync)> = row
                        .iter()
                        .map(|v| -> &(dyn ToSql + Sync) {
                            match v {
                                Value::Int(x) => x,
                                Value::Real(x) => x,
                                Value::Text(x) => x,
                                Value::Bool(x) => x,
                            }
                        })
                        .collect();
                    tx.execute(&st, &params).await.map_err(|e| self.error(&e))?;
                }
                if columns.first() == Some(&("id", super::Kind::Int)) {
                    tx.execute(
                        &format!(
                            "SELECT setval(pg_get_serial_sequence('{table}', 'id'), COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)"
                        ),
                        &[],
                    )
                    .await
                    .map_err(|e| self.error(&e))?;
                }
            }
            tx.commit().await.map_err(|e| self.error(&e))
        })
    }

    async fn event_async(&self, id: &str, host: Option<&str>, kind: &str, message: &str) -> Result<(), RegistryError> {
        self.execute(EVENT, &[&id, &now_ms(), &host, &kind, &message]).await.map(|_| ())
    }
}

const EVENT: &str = "INSERT INTO events (deployment_id, time_ms, host, kind, message) VALUES ($1, $2, $3, $4, $5)";

/// A connection error's text without the URL's password.
fn scrub(e: &tokio_postgres::Error, url: &str) -> String {
    let text = e.to_string();
    match url.split_once("://").and_then(|(_, r)| r.split_once('@')).and_then(|(u, _)| u.split_once(':')) {
        Some((_, password)) if !password.is_empty() => text.replace(password, "****"),
        _ => text,
    }
}

/// The password in `file`: its first line. A file others may read is refused (as libpq refuses
/// such a `.pgpass`).
fn read_password(file: &std::path::Path) -> Result<String, String> {
    use std::os::unix::fs::PermissionsExt;
    let named = |e: std::io::Error| format!("password_file {}: {e}", file.display());
    let mode = std::fs::metadata(file).map_err(named)?.permissions().mode();
    if mode & 0o007 != 0 {
        return Err(format!(
            "password_file {} may be read by any user (mode {:04o}): `chmod o-rwx` it (0600 or 0640)",
            file.display(),
            mode & 0o7777
        ));
    }
    let text = std::fs::read_to_string(file).map_err(named)?;
    let password = text.lines().next().unwrap_or_default().to_string();
    if password.is_empty() {
        return Err(format!("password_file {}: its first line is empty", file.display()));
    }
    Ok(password)
}

/// The TLS connector for `url`'s `sslmode` (rustls; the roots of `ca`, else of `sslrootcert`,
/// else the system's).
fn tls_for(url: &str, ca: Option<&std::path::Path>) -> Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
    let query = url.split_once('?').map(|(_, q)| q).unwrap_or_default();
    let param = |k: &str| query.split('&').find_map(|kv| kv.strip_prefix(k).and_then(|v| v.strip_prefix('=')));
    let verify = param("sslmode").is_some_and(|m| m != "disable" && m != "prefer" && m != "allow");
    if let (Some(ca), false) = (ca, verify) {
        return Err(format!(
            "registry.ca is {}, but the URL's sslmode ({}) does not verify the server: add ?sslmode=verify-full",
            ca.display(),
            param("sslmode").unwrap_or("none")
        ));
    }
    if verify {
        // Verified TLS: the same roots as every other outbound call.
        let (roots, key) = match (ca, param("sslrootcert")) {
            (Some(f), _) => (crate::http::Roots::File(f.into()), "registry.ca"),
            (None, Some(f)) => (crate::http::Roots::File(f.into()), "sslrootcert"),
            (None, None) => (crate::http::Roots::System, "the system's roots"),
        };
        let config = crate::http::client_config(&roots).map_err(|e| format!("{key}: {e}"))?;
        return Ok(tokio_postgres_rustls::MakeRustlsConnect::new((*config).clone()));
    }
    // No verification asked for: a connector that trusts nothing, for servers that offer TLS.
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

fn parsed<T>(row: &Row, i: usize, parse: fn(&str) -> Option<T>) -> Result<T, RegistryError> {
    let text: String = row.get(i);
    parse(&text).ok_or_else(|| RegistryError::Storage {
        registry: "postgres".into(),
        message: format!("unknown value {text:?} in column {i}"),
    })
}

const DEPLOYMENT_COLUMNS: &str = "d.id, d.kind, d.environment, d.version, d.release_id, d.artifact,
    d.manifest_hash, d.strategy, d.status, d.started_ms, d.finished_ms, d.error,
    (SELECT COALESCE(SUM(bytes_sent), 0)::BIGINT FROM hosts h WHERE h.deployment_id = d.id),
    (SELECT COUNT(*) FROM hosts h WHERE h.deployment_id = d.id AND h.state IN ('failed', 'rolled_back', 'unreachable')),
    d.requested_by, d.promoted_from, d.app";

fn deployment_row(r: &Row) -> Result<DeploymentRow, RegistryError> {
    Ok(DeploymentRow {
        id: r.get(0),
        kind: parsed(r, 1, DeploymentKind::parse)?,
        environment: r.get(2),
        version: r.get(3),
        release_id: r.get(4),
        artifact: r.get(5),
        manifest_hash: r.get(6),
        strategy: r.get(7),
        status: parsed(r, 8, DeploymentStatus::parse)?,
        started_ms: r.get(9),
        finished_ms: r.get(10),
        error: r.get(11),
        bytes_sent: r.get(12),
        hosts_failed: r.get(13),
        requested_by: r.get(14),
        promoted_from: r.get(15),
        app: r.get(16),
    })
}

fn lock_row(r: &Row) -> Lock {
    Lock {
        deployment_id: r.get(0),
        owner: r.get(1),
        hostname: r.get(2),
        pid: u32::try_from(r.get::<_, i64>(3)).unwrap_or(0),
        since_ms: r.get(4),
        renewed_ms: r.get::<_, Option<i64>>(5).unwrap_or_else(|| r.get(4)),
    }
}

fn lease_row(r: &Row) -> Lease {
    Lease { name: r.get(0), holder: r.get(1), address: r.get(2), epoch: r.get(3), expires_ms: r.get(4) }
}

const VERSION_COLUMNS: &str =
    "app, version, artifact, release_id, manifest_hash, total_bytes, files, registered_by, registered_ms, metadata";

fn version_row(r: &Row) -> VersionRow {
    let metadata: String = r.get(9);
    VersionRow {
        app: r.get(0),
        version: r.get(1),
        artifact: r.get(2),
        release_id: r.get(3),
        manifest_hash: r.get(4),
        total_bytes: r.get(5),
        files: r.get(6),
        registered_by: r.get(7),
        registered_ms: r.get(8),
        metadata: serde_json::from_str(&metadata).unwrap_or_default(),
    }
}

impl Registry for Postgres {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn lock_of(&self, env: &str) -> Result<Option<Lock>, RegistryError> {
        self.run(|| async move {
            let row = self
                .query_opt(
                    "SELECT deployment_id, owner, hostname, pid, since_ms, renewed_ms FROM locks WHERE environment = $1",
                    &[&env],
                )
                .await?;
            Ok(row.as_ref().map(lock_row))
        })
    }

    fn lock(&self, env: &str, deployment_id: &str, force: bool) -> Result<Option<Lock>, RegistryError> {
        self.run(|| async move {
            let mut c = self.client().await?;
            let tx = self.begin(&mut c).await?;
            // One taker at a time, also when no row exists yet.
            tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&env]).await.map_err(|e| self.error(&e))?;
            let held = tx
                .query_opt("SELECT deployment_id, owner, hostname, pid, since_ms, renewed_ms FROM locks WHERE environment = $1", &[&env])
                .await
                .map_err(|e| self.error(&e))?
                .as_ref()
                .map(lock_row);
            let broken = match held {
                Some(l) if l.mine() && l.deployment_id == deployment_id => None,
                Some(l) if l.deployment_id == deployment_id && l.stale() => None,
                Some(l) if force => Some(l),
                Some(lock) => return Err(RegistryError::Locked { env: env.to_string(), lock: Box::new(lock) }),
                None => None,
            };
            let owner =
                std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| "unknown".into());
            let pid = i64::from(std::process::id());
            tx.execute(
                "INSERT INTO locks (environment, deployment_id, owner, hostname, pid, since_ms, renewed_ms) VALUES ($1, $2, $3, $4, $5, $6, $6)
                 ON CONFLICT (environment) DO UPDATE SET deployment_id = $2, owner = $3, hostname = $4, pid = $5, since_ms = $6, renewed_ms = $6",
                &[&env, &deployment_id, &owner, &this_hostname(), &pid, &now_ms()],
            )
            .await
            .map_err(|e| self.error(&e))?;
            tx.commit().await.map_err(|e| self.error(&e))?;
            Ok(broken)
        })
    }

    fn unlock(&self, env: &str, deployment_id: &str) -> Result<(), RegistryError> {
        self.run(|| async move {
            self.execute("DELETE FROM locks WHERE environment = $1 AND deployment_id = $2", &[&env, &deployment_id])
                .await
                .map(|_| ())
        })
    }

    fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        address: &str,
        ttl: std::time::Duration,
    ) -> Result<Lease, RegistryError> {
        self.run(|| async move {
            let mut c = self.client().await?;
            let tx = c.transaction().await.map_err(|e| self.error(&e))?;
            // A taker that cannot get the row in time tries again at its next tick.
            tx.batch_execute("SET LOCAL lock_timeout = 2000").await.map_err(|e| self.error(&e))?;
            tx.execute("SELECT pg_advisory_xact_lock(hashtext('lease:' || $1))", &[&name])
                .await
                .map_err(|e| self.error(&e))?;
            let row = tx
                .query_opt("SELECT name, holder, address, epoch, expires_ms FROM leases WHERE name = $1", &[&name])
                .await
                .map_err(|e| self.error(&e))?
                .as_ref()
                .map(lease_row);
            let (write, lease) = super::lease_step(row, name, holder, address, ttl);
            if write {
                tx.execute(
                    "INSERT INTO leases (name, holder, address, epoch, expires_ms) VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (name) DO UPDATE SET holder = $2, address = $3, epoch = $4, expires_ms = $5",
                    &[&lease.name, &lease.holder, &lease.address, &lease.epoch, &lease.expires_ms],
                )
                .await
                .map_err(|e| self.error(&e))?;
            }
            tx.commit().await.map_err(|e| self.error(&e))?;
            Ok(lease)
        })
    }

    fn lease_of(&self, name: &str) -> Result<Option<Lease>, RegistryError> {
        self.run(|| async move {
            let row = self
                .query_opt("SELECT name, holder, address, epoch, expires_ms FROM leases WHERE name = $1", &[&name])
                .await?;
            Ok(row.as_ref().map(lease_row))
        })
    }

    fn release_lease(&self, name: &str, holder: &str) -> Result<(), RegistryError> {
        self.run(|| async move {
            // Not fenced: it changes nothing unless `holder` has the lease.
            let c = self.client().await?;
            c.execute("UPDATE leases SET expires_ms = 0 WHERE name = $1 AND holder = $2", &[&name, &holder])
                .await
                .map(|_| ())
                .map_err(|e| self.error(&e))
        })
    }

    fn fence_writes(&self, holder: &str) {
        let _ = self.fence.set(holder.to_string());
    }

    fn renew_lock(&self, env: &str, deployment_id: &str) -> Result<(), RegistryError> {
        self.run(|| async move {
            self.execute(
                "UPDATE locks SET renewed_ms = $3 WHERE environment = $1 AND deployment_id = $2",
                &[&env, &deployment_id, &now_ms()],
            )
            .await
            .map(|_| ())
        })
    }

    fn create(&self, d: &NewDeployment<'_>) -> Result<(), RegistryError> {
        self.run(|| async move {
            let mut c = self.client().await?;
            let tx = self.begin(&mut c).await?;
            let now = now_ms();
            tx.execute(
                "INSERT INTO deployments (id, kind, environment, version, release_id, artifact, manifest_hash, strategy, status, started_ms, app)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'pending', $9, $10)",
                &[&d.id, &d.kind.as_str(), &d.environment, &d.version, &d.release_id, &d.artifact, &d.manifest_hash, &d.strategy, &now, &d.app],
            )
            .await
            .map_err(|e| self.error(&e))?;
            for (host, batch) in d.hosts {
                let batch = i64::try_from(*batch).unwrap_or(i64::MAX);
                tx.execute(
                    "INSERT INTO hosts (deployment_id, host, batch, state) VALUES ($1, $2, $3, 'pending')",
                    &[&d.id, host, &batch],
                )
                .await
                .map_err(|e| self.error(&e))?;
            }
            let message = format!("{} of {} to {} ({} hosts)", d.kind, d.version, d.environment, d.hosts.len());
            tx.execute(
                "INSERT INTO events (deployment_id, time_ms, host, kind, message) VALUES ($1, $2, NULL, 'created', $3)",
                &[&d.id, &now, &message],
            )
            .await
            .map_err(|e| self.error(&e))?;
            tx.commit().await.map_err(|e| self.error(&e))
        })
    }

    fn set_status(&self, id: &str, status: DeploymentStatus, error: Option<&str>) -> Result<(), RegistryError> {
        self.run(|| async move {
            let finished = status.is_finished().then(now_ms);
            let text = status.as_str();
            let mut c = self.client().await?;
            let tx = self.begin(&mut c).await?;
            tx.execute(
                "UPDATE deployments SET status = $2, error = COALESCE($3, error), finished_ms = $4 WHERE id = $1",
                &[&id, &text, &error, &finished],
            )
            .await
            .map_err(|e| self.error(&e))?;
            let message = error.unwrap_or("");
            let none: Option<&str> = None;
            tx.execute(EVENT, &[&id, &now_ms(), &none, &text, &message]).await.map_err(|e| self.error(&e))?;
            self.commit(tx).await
        })
    }

    fn set_host(&self, id: &str, host: &str, to: HostState, update: &HostUpdate<'_>) -> Result<(), RegistryError> {
        self.run(|| async move {
            let mut c = self.client().await?;
            let tx = self.begin(&mut c).await?;
            let row = tx
                .query_opt("SELECT state FROM hosts WHERE deployment_id = $1 AND host = $2 FOR UPDATE", &[&id, &host])
                .await
                .map_err(|e| self.error(&e))?
                .ok_or_else(|| RegistryError::Storage {
                    registry: self.describe.clone(),
                    message: format!("deployment {id} has no host {host}"),
                })?;
            let from: String = row.get(0);
            if !HostState::parse(&from).is_some_and(|f| legal(f, to)) {
                return Err(RegistryError::Illegal { deployment: id.into(), host: host.into(), from, to });
            }
            let now = now_ms();
            let starts = to == HostState::Staging;
            let ends = to.is_terminal() || to == HostState::Staged;
            let bytes = i64::try_from(update.bytes).unwrap_or(i64::MAX);
            let activate_ms = update.activate_ms.and_then(|ms| i64::try_from(ms).ok());
            tx.execute(
                "UPDATE hosts SET state = $3,
                   previous_release = COALESCE($4, previous_release),
                   bytes_sent = bytes_sent + $5,
                   error = COALESCE($6, error),
                   started_ms = CASE WHEN $7 OR started_ms IS NULL THEN $9 ELSE started_ms END,
                   finished_ms = CASE WHEN $8 THEN $9 ELSE finished_ms END,
                   activate_ms = COALESCE($10, activate_ms),
                   release = COALESCE($11, release)
                 WHERE deployment_id = $1 AND host = $2",
                &[
                    &id,
                    &host,
                    &to.as_str(),
                    &update.previous_release,
                    &bytes,
                    &update.error,
                    &starts,
                    &ends,
                    &now,
                    &activate_ms,
                    &update.release,
                ],
            )
            .await
            .map_err(|e| self.error(&e))?;
            let (kind, message) = (to.as_str(), update.error.unwrap_or(""));
            tx.execute(EVENT, &[&id, &now, &host, &kind, &message]).await.map_err(|e| self.error(&e))?;
            self.commit(tx).await
        })
    }

    fn event(&self, id: &str, host: Option<&str>, kind: &str, message: &str) -> Result<(), RegistryError> {
        self.run(|| self.event_async(id, host, kind, message))
    }

    fn deployment(&self, id: &str) -> Result<Option<DeploymentRow>, RegistryError> {
        self.run(|| async move {
            let q = format!("SELECT {DEPLOYMENT_COLUMNS} FROM deployments d WHERE d.id = $1");
            self.query_opt(&q, &[&id]).await?.as_ref().map(deployment_row).transpose()
        })
    }

    fn hosts(&self, id: &str) -> Result<Vec<HostRow>, RegistryError> {
        self.run(|| async move {
            let rows = self
                .query(
                    "SELECT host, batch, state, previous_release, started_ms, finished_ms, bytes_sent, error, activate_ms, release
                     FROM hosts WHERE deployment_id = $1 ORDER BY seq",
                    &[&id],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(HostRow {
                        host: r.get(0),
                        batch: r.get(1),
                        state: parsed(r, 2, HostState::parse)?,
                        previous_release: r.get(3),
                        started_ms: r.get(4),
                        finished_ms: r.get(5),
                        bytes_sent: r.get(6),
                        error: r.get(7),
                        activate_ms: r.get(8),
                        release: r.get(9),
                    })
                })
                .collect()
        })
    }

    fn activated_hosts(&self, id: &str) -> Result<HashSet<String>, RegistryError> {
        self.run(|| async move {
            let rows = self
                .query(
                    "SELECT DISTINCT host FROM events WHERE deployment_id = $1 AND kind = 'activating' AND host IS NOT NULL",
                    &[&id],
                )
                .await?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }

    fn history(&self, env: Option<&str>, app: Option<&str>, limit: usize) -> Result<Vec<DeploymentRow>, RegistryError> {
        self.run(|| async move {
            let q = format!(
                "SELECT {DEPLOYMENT_COLUMNS} FROM deployments d WHERE ($1::TEXT IS NULL OR d.environment = $1)
                 AND ($2::TEXT IS NULL OR d.app = $2) ORDER BY d.started_ms DESC, d.seq DESC LIMIT $3"
            );
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            self.query(&q, &[&env, &app, &limit]).await?.iter().map(deployment_row).collect()
        })
    }

    fn report(&self, env: Option<&str>) -> Result<Vec<EnvReport>, RegistryError> {
        let finished = self.history(env, None, usize::MAX >> 1)?;
        let rolled_back: HashSet<String> = self.run(|| async move {
            let rows = self.query("SELECT DISTINCT deployment_id FROM hosts WHERE state = 'rolled_back'", &[]).await?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })?;
        super::build_report(finished, &rolled_back, |e, app| {
            self.run(|| async move {
                let rows = self.query(super::SLOWEST_HOSTS, &[&e, &app]).await?;
                Ok(rows
                    .iter()
                    .map(|r| SlowHost {
                        host: r.get(0),
                        // As SQLite's: whole milliseconds, truncated.
                        mean_ms: r.get::<_, f64>(1).max(0.0) as u64,
                    })
                    .collect())
            })
        })
    }

    fn latest_deployment(&self, env: &str, app: Option<&str>) -> Result<Option<String>, RegistryError> {
        self.run(|| async move {
            let row = self
                .query_opt(
                    "SELECT id FROM deployments WHERE environment = $1 AND ($2::TEXT IS NULL OR app = $2)
                     ORDER BY started_ms DESC, seq DESC LIMIT 1",
                    &[&env, &app],
                )
                .await?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    fn events_since(&self, id: &str, after: i64) -> Result<Vec<EventRow>, RegistryError> {
        self.run(|| async move {
            let rows = self
                .query(
                    "SELECT id, time_ms, host, kind, message FROM events WHERE deployment_id = $1 AND id > $2 ORDER BY id",
                    &[&id, &after],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| EventRow { seq: r.get(0), time_ms: r.get(1), host: r.get(2), kind: r.get(3), message: r.get(4) })
                .collect())
        })
    }

    fn live_group(&self, env: &str) -> Result<Option<(String, String)>, RegistryError> {
        self.run(|| async move {
            let row =
                self.query_opt("SELECT grp, deployment_id FROM live_groups WHERE environment = $1", &[&env]).await?;
            Ok(row.map(|r| (r.get(0), r.get(1))))
        })
    }

    fn set_live_group(&self, env: &str, group: &str, deployment_id: &str) -> Result<(), RegistryError> {
        self.run(|| async move {
            self.execute(
                "INSERT INTO live_groups (environment, grp, deployment_id, since_ms) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (environment) DO UPDATE SET grp = $2, deployment_id = $3, since_ms = $4",
                &[&env, &group, &deployment_id, &now_ms()],
            )
            .await?;
            self.event_async(deployment_id, None, "live", group).await
        })
    }

    fn register_version(&self, v: &VersionRow) -> Result<Option<VersionRow>, RegistryError> {
        if let Some(existing) = self.version(&v.app, &v.version)? {
            return Ok(Some(existing));
        }
        self.run(|| async move {
            let metadata = serde_json::Value::Object(v.metadata.clone()).to_string();
            let inserted = self
                .execute(
                    &format!(
                        "INSERT INTO versions ({VERSION_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                         ON CONFLICT (app, version) DO NOTHING"
                    ),
                    &[
                        &v.app,
                        &v.version,
                        &v.artifact,
                        &v.release_id,
                        &v.manifest_hash,
                        &v.total_bytes,
                        &v.files,
                        &v.registered_by,
                        &v.registered_ms,
                        &metadata,
                    ],
                )
                .await?;
            Ok(inserted)
        })
        .and_then(|inserted| if inserted == 0 { self.version(&v.app, &v.version) } else { Ok(None) })
    }

    fn version(&self, app: &str, version: &str) -> Result<Option<VersionRow>, RegistryError> {
        self.run(|| async move {
            let q = format!("SELECT {VERSION_COLUMNS} FROM versions WHERE app = $1 AND version = $2");
            Ok(self.query_opt(&q, &[&app, &version]).await?.as_ref().map(version_row))
        })
    }

    fn versions(&self, app: Option<&str>, limit: usize) -> Result<Vec<VersionRow>, RegistryError> {
        self.run(|| async move {
            let q = format!(
                "SELECT {VERSION_COLUMNS} FROM versions WHERE $1::TEXT IS NULL OR app = $1 ORDER BY registered_ms DESC, seq DESC LIMIT $2"
            );
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            Ok(self.query(&q, &[&app, &limit]).await?.iter().map(version_row).collect())
        })
    }

    fn claim_versions(&self, app: &str) -> Result<usize, RegistryError> {
        self.run(|| async move {
            let n = self
                .execute(
                    "UPDATE versions SET app = $1 WHERE app = '' AND version NOT IN (SELECT version FROM versions WHERE app = $1)",
                    &[&app],
                )
                .await?;
            Ok(usize::try_from(n).unwrap_or(usize::MAX))
        })
    }

    fn set_requested_by(&self, id: &str, by: &str, promoted_from: Option<&str>) -> Result<(), RegistryError> {
        self.run(|| async move {
            self.execute(
                "UPDATE deployments SET requested_by = COALESCE(requested_by, $2), promoted_from = COALESCE($3, promoted_from) WHERE id = $1",
                &[&id, &by, &promoted_from],
            )
            .await
            .map(|_| ())
        })
    }

    fn record_smoke(&self, run: &SmokeRun) -> Result<i64, RegistryError> {
        self.run(|| async move {
            let row = self
                .query_opt(
                    "INSERT INTO smoke_runs (deployment_id, run_by, started_ms, finished_ms, passed, results, env_checks)
                     VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
                    &[
                        &run.deployment_id,
                        &run.run_by,
                        &run.started_ms,
                        &run.finished_ms,
                        &run.passed,
                        &run.results.to_string(),
                        &run.env_checks,
                    ],
                )
                .await?;
            let seq: i64 = row.map_or(0, |r| r.get(0));
            let verdict = if run.passed { "passed" } else { "failed" };
            let message = format!("smoke tests {verdict} (run {seq} by {})", run.run_by);
            self.event_async(&run.deployment_id, None, "smoke", &message).await?;
            Ok(seq)
        })
    }

    fn smoke_runs(&self, deployment_id: &str) -> Result<Vec<SmokeRun>, RegistryError> {
        self.run(|| async move {
            let rows = self
                .query(
                    "SELECT id, deployment_id, run_by, started_ms, finished_ms, passed, results, env_checks FROM smoke_runs
                     WHERE deployment_id = $1 ORDER BY id",
                    &[&deployment_id],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| {
                    let results: String = r.get(6);
                    SmokeRun {
                        id: r.get(0),
                        deployment_id: r.get(1),
                        run_by: r.get(2),
                        started_ms: r.get(3),
                        finished_ms: r.get(4),
                        passed: r.get(5),
                        results: serde_json::from_str(&results).unwrap_or(serde_json::Value::Null),
                        env_checks: r.get(7),
                    }
                })
                .collect())
        })
    }

    fn approve(&self, deployment_id: &str, environment: &str, by: &str) -> Result<(), RegistryError> {
        self.run(|| async move {
            self.execute(
                "INSERT INTO approvals (deployment_id, environment, approved_by, time_ms) VALUES ($1, $2, $3, $4)
                 ON CONFLICT DO NOTHING",
                &[&deployment_id, &environment, &by, &now_ms()],
            )
            .await?;
            let message = format!("promotion to {environment} approved by {by}");
            self.event_async(deployment_id, None, "approved", &message).await
        })
    }

    fn use_approval(
        &self,
        deployment_id: &str,
        environment: &str,
        by: &str,
        promotion: &str,
    ) -> Result<(), RegistryError> {
        self.run(|| async move {
            self.execute(
                "UPDATE approvals SET used_by = $4
                 WHERE deployment_id = $1 AND environment = $2 AND approved_by = $3 AND used_by IS NULL",
                &[&deployment_id, &environment, &by, &promotion],
            )
            .await?;
            let message = format!("{by}'s approval used by {promotion}");
            self.event_async(deployment_id, None, "approval_used", &message).await
        })
    }

    fn approvals(&self, deployment_id: &str) -> Result<Vec<Approval>, RegistryError> {
        self.run(|| async move {
            let rows = self
                .query(
                    "SELECT deployment_id, environment, approved_by, time_ms, used_by FROM approvals WHERE deployment_id = $1 ORDER BY time_ms",
                    &[&deployment_id],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| Approval {
                    deployment_id: r.get(0),
                    environment: r.get(1),
                    approved_by: r.get(2),
                    time_ms: r.get(3),
                    used_by: r.get(4),
                })
                .collect())
        })
    }

    fn record_measurement(&self, m: &Measurement) -> Result<(), RegistryError> {
        self.run(|| async move {
            self.execute(
                "INSERT INTO measurements (deployment_id, batch, gate, at_ms, outcome, value, baseline, detail)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                &[
                    &m.deployment_id,
                    &i64::from(m.batch),
                    &m.gate,
                    &m.at_ms,
                    &m.outcome.as_str(),
                    &m.value,
                    &m.baseline,
                    &m.detail,
                ],
            )
            .await
            .map(|_| ())
        })
    }

    fn measurements(&self, deployment_id: &str) -> Result<Vec<Measurement>, RegistryError> {
        self.run(|| async move {
            let rows = self
                .query(
                    "SELECT deployment_id, batch, gate, at_ms, outcome, value, baseline, detail FROM measurements
                     WHERE deployment_id = $1 ORDER BY id",
                    &[&deployment_id],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| {
                    let outcome: String = r.get(4);
                    Measurement {
                        deployment_id: r.get(0),
                        batch: u32::try_from(r.get::<_, i64>(1)).unwrap_or(0),
                        gate: r.get(2),
                        at_ms: r.get(3),
                        outcome: crate::gate::Outcome::parse(&outcome).unwrap_or(crate::gate::Outcome::Inconclusive),
                        value: r.get(5),
                        baseline: r.get(6),
                        detail: r.get(7),
                    }
                })
                .collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::suite;
    use crate::registry::testpg::TestPg;

    fn open(pg: &TestPg) -> Postgres {
        Postgres::open(&pg.database("ferry")).expect("open")
    }

    /// The registry's whole suite on a real PostgreSQL server, one database per part.
    #[test]
    fn the_registry_suite_passes_on_postgres() {
        let Some(pg) = TestPg::start() else { return };
        suite::transitions_are_recorded_with_timings_and_bytes(
            &Postgres::open(&pg.database("transitions")).expect("open"),
        );
        suite::one_rollout_per_environment(&Postgres::open(&pg.database("locks")).expect("open"));
        let reg = Postgres::open(&pg.database("stale")).expect("open");
        let set_pid = |pid: u32| pg.psql("stale", &format!("UPDATE locks SET pid = {pid}"));
        suite::a_dead_holder_is_stale_and_only_its_deployment_takes_over(&reg, &set_pid);
        suite::report_rates_and_percentiles(&Postgres::open(&pg.database("report")).expect("open"));
        let reg = Postgres::open(&pg.database("leader")).expect("open");
        suite::one_leader_at_a_time_and_each_takeover_is_a_new_epoch(&reg, &|sql| pg.psql("leader", sql));
        let reg = Postgres::open(&pg.database("lease")).expect("open");
        suite::a_holder_elsewhere_is_stale_once_its_lease_lapses(&reg, &|sql| pg.psql("lease", sql));
        suite::pipeline_records_round_trip(&open(&pg));
    }

    /// Called from async code (the engine and `ferry serve` are), and reopened: the schema is
    /// migrated once and kept.
    #[tokio::test]
    async fn it_works_from_async_code_and_keeps_its_schema() {
        let Some(pg) = TestPg::start() else { return };
        let url = pg.database("ferry");
        let reg = Postgres::open(&url).expect("open");
        reg.lock("prod", "d-1", false).expect("lock");
        drop(reg);
        let reg = Postgres::open(&url).expect("reopen");
        assert_eq!(reg.lock_of("prod").expect("lock").map(|l| l.deployment_id), Some("d-1".into()));
        assert_eq!(reg.describe(), format!("postgres://ferry@127.0.0.1:{}/ferry", pg.port));
    }

    /// Records deployment d-1 of version 2 to prod's web-1.
    fn create_one(reg: &Postgres) {
        let hosts = [("web-1".to_string(), 0usize)];
        let d = NewDeployment {
            id: "d-1",
            kind: DeploymentKind::Deploy,
            environment: "prod",
            version: "2",
            release_id: "r",
            artifact: "a",
            manifest_hash: "h",
            strategy: "rolling",
            hosts: &hosts,
            app: "web",
        };
        reg.create(&d).expect("create");
    }

    /// Hundreds of calls from one task that never yields (the engine staging many hosts):
    /// each still ends, whatever the task's cooperative budget.
    #[test]
    fn many_calls_from_a_task_that_does_not_yield_all_end() {
        let Some(pg) = TestPg::start() else { return };
        let reg = open(&pg);
        create_one(&reg);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            let n = rt.block_on(async {
                for i in 0..600 {
                    reg.event("d-1", None, "note", &i.to_string()).expect("event");
                }
                reg.events_since("d-1", 0).expect("events").len()
            });
            let _ = tx.send(n);
        });
        let n = rx.recv_timeout(Duration::from_secs(120)).expect("the calls hung");
        assert_eq!(n, 601);
    }

    #[test]
    fn a_newer_schema_is_refused_and_left_alone() {
        let Some(pg) = TestPg::start() else { return };
        let url = pg.database("ferry");
        drop(Postgres::open(&url).expect("open"));
        pg.psql("ferry", "UPDATE ferry_schema SET version = 99");
        let e = Postgres::open(&url).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("schema is version 99, newer than this ferry knows") && e.contains("not changed"), "{e}");
    }

    #[test]
    fn an_unreachable_database_is_named_without_its_password() {
        // Nothing listens on port 1.
        let e = Postgres::open("postgres://ferry:hunter2@127.0.0.1:1/fleet")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("postgres://ferry@127.0.0.1:1/fleet") && e.contains("cannot reach the database"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }

    /// The server restarted under a running deployment: the call made while it is down waits
    /// for it and goes through, exactly once; nothing is lost.
    #[test]
    fn calls_ride_out_a_database_restart() {
        let Some(pg) = TestPg::start() else { return };
        let reg = open(&pg);
        create_one(&reg);
        reg.set_host("d-1", "web-1", HostState::Staging, &HostUpdate::default()).expect("staging");
        pg.stop();
        let back = std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(1500));
                pg.start_again();
            });
            let t = Instant::now();
            reg.set_host("d-1", "web-1", HostState::Staged, &HostUpdate::default()).expect("staged, after the restart");
            t.elapsed()
        });
        assert!(back >= Duration::from_millis(1000), "it returned before the server was back: {back:?}");
        reg.set_host("d-1", "web-1", HostState::Activating, &HostUpdate::default()).expect("activating");
        let kinds: Vec<String> = reg.events_since("d-1", 0).expect("events").into_iter().map(|e| e.kind).collect();
        assert_eq!(kinds, ["created", "staging", "staged", "activating"]);
    }

    /// A server fenced to its lease writes only while it holds it; reads go on.
    #[test]
    fn a_fenced_registry_writes_only_while_it_holds_the_lease() {
        let Some(pg) = TestPg::start() else { return };
        let reg = open(&pg);
        reg.fence_writes("a:1:1");
        let e = reg.lock("prod", "d-1", false).expect_err("no lease yet");
        assert!(matches!(e, RegistryError::Fenced { .. }), "{e}");
        let lease = Duration::from_secs(60);
        reg.acquire_lease(SERVE_LEASE, "a:1:1", "https://a", lease).expect("a leads");
        reg.lock("prod", "d-1", false).expect("a writes");
        // b takes over (a's lease lapsed): a's writes are refused, naming b and its epoch.
        pg.psql("ferry", "UPDATE leases SET expires_ms = 0");
        let b = open(&pg);
        assert_eq!(b.acquire_lease(SERVE_LEASE, "b:2:2", "https://b", lease).expect("b leads").epoch, 2);
        let e = reg.renew_lock("prod", "d-1").expect_err("a was deposed");
        assert!(e.to_string().contains("no longer holds the leader lease (b:2:2 has it, epoch 2)"), "{e}");
        let e = reg.event("d-1", None, "note", "from a").expect_err("a was deposed");
        assert!(matches!(e, RegistryError::Fenced { .. }), "{e}");
        assert_eq!(reg.lock_of("prod").expect("reads go on").map(|l| l.deployment_id), Some("d-1".into()));
    }

    /// A password kept in `[registry] password_file`: used, never shown; a file others may
    /// read, a wrong password and a missing one are clear errors naming the database.
    #[test]
    fn a_password_file_logs_in_and_its_password_never_shows() {
        let Some(pg) = TestPg::start() else { return };
        pg.require_password("deployer", "s3cret-Pa55");
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("password");
        let write = |text: &str, mode: u32| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::write(&file, text).expect("write");
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).expect("chmod");
        };
        let url = format!("postgres://deployer@127.0.0.1:{}/ferry", pg.port);
        let at = PostgresRegistry { url: url.clone(), ca: None, password_file: Some(file.clone()) };
        write("s3cret-Pa55\n", 0o600);
        let reg = Postgres::open_with(&at).expect("logs in with the file's password");
        reg.lock("prod", "d-1", false).expect("writes");
        write("s3cret-Pa55\n", 0o644);
        let e = Postgres::open_with(&at).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("may be read by any user (mode 0644)") && e.contains(&file.display().to_string()), "{e}");
        write("wrong\n", 0o640);
        let e = Postgres::open_with(&at).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            e.contains(&format!("postgres://deployer@127.0.0.1:{}/ferry", pg.port)) && e.contains("password"),
            "{e}"
        );
        assert!(!e.contains("wrong") && !e.contains("s3cret"), "{e}");
        let e = Postgres::open(&url).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("password"), "{e}");
        let both = PostgresRegistry { url: format!("postgres://deployer:x@127.0.0.1:{}/ferry", pg.port), ..at.clone() };
        let e = Postgres::open_with(&both).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("keep it in the file only") && !e.contains(":x@"), "{e}");
        let ca = PostgresRegistry { ca: Some(dir.path().join("ca.pem")), ..at };
        let e = Postgres::open_with(&ca).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("does not verify the server: add ?sslmode=verify-full"), "{e}");
    }

    #[test]
    fn urls_are_described_without_their_password() {
        assert_eq!(
            redact("postgres://ferry:s3cret@db.internal:5432/ferry?sslmode=verify-full"),
            "postgres://ferry@db.internal:5432/ferry"
        );
        assert_eq!(redact("postgresql://db/ferry"), "postgresql://db/ferry");
        assert_eq!(redact("postgres://u@h/d"), "postgres://u@h/d");
    }
}
