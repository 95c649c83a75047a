//! A throwaway PostgreSQL server for tests: Debian's `postgresql` (`scripts/deps.sh --test`),
//! `initdb` into a temp dir, started with `pg_ctl` on a free loopback port, stopped and removed
//! on drop. Run as root, the server runs as the `postgres` user (initdb refuses root).
//!
//! Missing PostgreSQL skips the test with a loud message, except under `CI=true`, where it fails.
use std::path::PathBuf;
use std::process::Command;

pub struct TestPg {
    dir: PathBuf,
    bin: PathBuf,
    as_postgres: bool,
    pub port: u16,
}

fn bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("initdb").is_file())
        .collect();
    dirs.sort();
    dirs.pop()
}

impl TestPg {
    /// A running server, or `None` (skipped) where PostgreSQL is not installed.
    pub fn start() -> Option<TestPg> {
        let Some(bin) = bin_dir() else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but PostgreSQL is not installed (scripts/deps.sh --test installs it)"
            );
            eprintln!("\n!!! SKIPPED: PostgreSQL is not installed (scripts/deps.sh --test)\n");
            return None;
        };
        let as_postgres = nix::unistd::geteuid().is_root();
        let dir = std::env::temp_dir().join(format!("ferry-pg-{}-{}", std::process::id(), crate::registry::now_ms()));
        std::fs::create_dir_all(&dir).expect("pg dir");
        if as_postgres {
            let user = nix::unistd::User::from_name("postgres").ok().flatten().expect("the postgres user");
            nix::unistd::chown(&dir, Some(user.uid), Some(user.gid)).expect("chown");
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        let pg = TestPg { dir, bin, as_postgres, port };
        let data = pg.dir.join("data");
        pg.run("initdb", &["-D", &data.to_string_lossy(), "-A", "trust", "-U", "ferry", "--no-sync", "-E", "UTF8"]);
        let opts = format!("-p {port} -c listen_addresses=127.0.0.1 -k {} -c fsync=off", pg.dir.display());
        let log = pg.dir.join("log");
        pg.run("pg_ctl", &["-D", &data.to_string_lossy(), "-l", &log.to_string_lossy(), "-o", &opts, "-w", "start"]);
        pg.run("createdb", &["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "ferry", "ferry"]);
        Some(pg)
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let path = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        let out = cmd.args(args).current_dir(&self.dir).output().unwrap_or_else(|e| panic!("{tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops the server (fast: its sessions are ended), keeping its data.
    pub fn stop(&self) {
        self.run("pg_ctl", &["-D", &self.dir.join("data").to_string_lossy(), "-m", "fast", "-w", "stop"]);
    }

    /// Starts it again after [`TestPg::stop`], on the same port.
    pub fn start_again(&self) {
        let opts = format!("-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off", self.port, self.dir.display());
        let (data, log) = (self.dir.join("data"), self.dir.join("log"));
        self.run("pg_ctl", &["-D", &data.to_string_lossy(), "-l", &log.to_string_lossy(), "-o", &opts, "-w", "start"]);
    }

    /// A URL of a fresh database `name` on this server.
    pub fn database(&self, name: &str) -> String {
        if name != "ferry" {
            self.run("createdb", &["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "ferry", name]);
        }
        format!("postgres://ferry@127.0.0.1:{}/{name}", self.port)
    }

    /// Adds role `user` with `password`, which it must give over TCP (scram-sha-256).
    pub fn require_password(&self, user: &str, password: &str) {
        self.psql(
            "ferry",
            &format!("CREATE ROLE {user} LOGIN PASSWORD '{password}'; GRANT ALL ON SCHEMA public TO {user}"),
        );
        let hba = self.dir.join("data/pg_hba.conf");
        let rules = std::fs::read_to_string(&hba).expect("pg_hba.conf");
        std::fs::write(&hba, format!("host all {user} 127.0.0.1/32 scram-sha-256\n{rules}")).expect("pg_hba.conf");
        self.run("pg_ctl", &["-D", &self.dir.join("data").to_string_lossy(), "reload"]);
        std::thread::sleep(std::time::Duration::from_millis(300));
    }

    /// Runs `sql` with psql on database `name`.
    pub fn psql(&self, name: &str, sql: &str) {
        self.run(
            "psql",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "ferry",
                "-d",
                name,
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ],
        );
    }
}

impl Drop for TestPg {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let path = self.bin.join("pg_ctl");
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        let _ = cmd.args(["-D", &data.to_string_lossy(), "-m", "immediate", "-w", "stop"]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
