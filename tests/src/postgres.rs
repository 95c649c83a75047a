//! A real PostgreSQL server (Debian's `postgresql`, from `scripts/deps.sh --test`): a throwaway
//! cluster (`initdb` into a directory of its own, run as the `postgres` user), stopped and
//! removed on drop. [`FleetPg::start`] runs it in the coordinator's namespace of a [`Fleet`], on
//! 127.0.0.1:5432 there and on the fleet's network at [`CTL_IP`] (for coordinators in namespaces
//! of their own); [`FleetPg::local`] on a free loopback port of this machine (benchmarks).
use std::path::PathBuf;
use std::process::Command;

use crate::fleet::{CTL_IP, Fleet, Unsupported};

pub struct FleetPg {
    dir: PathBuf,
    bin: PathBuf,
    /// The namespace it runs in (`None`: this machine's).
    ns: Option<String>,
    port: u16,
    /// `listen_addresses`, and the server's other `-c` options.
    listen: String,
    options: String,
    pub url: String,
    /// The same database reached over the fleet's network (a fleet's server only).
    pub net_url: String,
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

impl FleetPg {
    /// A server in `fleet`'s coordinator namespace (fsync off: tests).
    pub fn start(fleet: &Fleet) -> Result<FleetPg, Unsupported> {
        let dir = PathBuf::from(format!("/tmp/ferry-pg-{}", fleet.run));
        FleetPg::make(dir, Some(fleet.ctl_ns.clone()), 5432, format!("127.0.0.1,{CTL_IP}"), "-c fsync=off")
    }

    /// A server on a free loopback port of this machine, durable as a real one (fsync on).
    pub fn local() -> Result<FleetPg, Unsupported> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| Unsupported(format!("a free port: {e}")))?
            .port();
        let dir = PathBuf::from(format!("/tmp/ferry-pg-local-{}", std::process::id()));
        FleetPg::make(dir, None, port, "127.0.0.1".into(), "")
    }

    fn make(dir: PathBuf, ns: Option<String>, port: u16, listen: String, opts: &str) -> Result<FleetPg, Unsupported> {
        let bin =
            bin_dir().ok_or_else(|| Unsupported("PostgreSQL is not installed (scripts/deps.sh --test)".into()))?;
        let user = nix::unistd::User::from_name("postgres")
            .ok()
            .flatten()
            .ok_or_else(|| Unsupported("there is no postgres user (scripts/deps.sh --test)".into()))?;
        // Outside any run's directory: the server's user must reach it.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| Unsupported(format!("{}: {e}", dir.display())))?;
        nix::unistd::chown(&dir, Some(user.uid), Some(user.gid)).map_err(|e| Unsupported(format!("chown: {e}")))?;
        let pg = FleetPg {
            dir,
            bin,
            ns,
            port,
            listen,
            options: opts.to_string(),
            url: format!("postgres://ferry@127.0.0.1:{port}/ferry"),
            net_url: format!("postgres://ferry@{CTL_IP}:{port}/ferry"),
        };
        let data = pg.dir.join("data").to_string_lossy().into_owned();
        pg.run(false, "initdb", &["-D", &data, "-A", "trust", "-U", "ferry", "--no-sync", "-E", "UTF8"]);
        let hba = pg.dir.join("data/pg_hba.conf");
        let mut rules = std::fs::read_to_string(&hba).map_err(|e| Unsupported(format!("{}: {e}", hba.display())))?;
        rules.push_str("host all all 10.199.0.0/24 trust\n");
        std::fs::write(&hba, rules).map_err(|e| Unsupported(format!("{}: {e}", hba.display())))?;
        pg.start_server();
        pg.run(true, "createdb", &["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "ferry", "ferry"]);
        Ok(pg)
    }

    fn start_server(&self) {
        let data = self.dir.join("data").to_string_lossy().into_owned();
        let opts =
            format!("-p {} -c listen_addresses={} -k {} {}", self.port, self.listen, self.dir.display(), self.options);
        let log = self.dir.join("log").to_string_lossy().into_owned();
        self.run(true, "pg_ctl", &["-D", &data, "-l", &log, "-o", &opts, "-w", "start"]);
    }

    /// Stops the server (fast: its sessions end at once), keeping its data.
    pub fn stop(&self) {
        let data = self.dir.join("data").to_string_lossy().into_owned();
        self.run(true, "pg_ctl", &["-D", &data, "-m", "fast", "-w", "stop"]);
    }

    /// Starts it again after [`FleetPg::stop`].
    pub fn start_again(&self) {
        self.start_server();
    }

    /// A URL of a fresh database `name` on this server.
    pub fn database(&self, name: &str) -> String {
        self.run(true, "createdb", &["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "ferry", name]);
        format!("postgres://ferry@127.0.0.1:{}/{name}", self.port)
    }

    /// Runs a PostgreSQL tool as the postgres user (in the server's namespace if `in_ns`).
    fn run(&self, in_ns: bool, tool: &str, args: &[&str]) {
        let mut cmd = match (&self.ns, in_ns) {
            (Some(ns), true) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "runuser"]);
                c
            }
            _ => Command::new("runuser"),
        };
        cmd.args(["-u", "postgres", "--"]).arg(self.bin.join(tool)).args(args).current_dir(&self.dir);
        let out = cmd.output().unwrap_or_else(|e| panic!("{tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for FleetPg {
    fn drop(&mut self) {
        let data = self.dir.join("data").to_string_lossy().into_owned();
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", &data, "-m", "immediate", "-w", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
