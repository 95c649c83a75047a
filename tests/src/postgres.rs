//! A real PostgreSQL server (Debian's `postgresql`, from `scripts/deps.sh --test`) in the
//! coordinator's namespace of a [`Fleet`], on 127.0.0.1:5432 there: a throwaway cluster
//! (`initdb` into a directory of its own, run as the `postgres` user), stopped and removed on
//! drop.
use std::path::PathBuf;
use std::process::Command;

use crate::fleet::{Fleet, Unsupported};

pub struct FleetPg {
    dir: PathBuf,
    bin: PathBuf,
    ns: String,
    pub url: String,
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
    pub fn start(fleet: &Fleet) -> Result<FleetPg, Unsupported> {
        let bin =
            bin_dir().ok_or_else(|| Unsupported("PostgreSQL is not installed (scripts/deps.sh --test)".into()))?;
        let user = nix::unistd::User::from_name("postgres")
            .ok()
            .flatten()
            .ok_or_else(|| Unsupported("there is no postgres user (scripts/deps.sh --test)".into()))?;
        // Outside the run's directory: the server's user must reach it.
        let dir = PathBuf::from(format!("/tmp/ferry-pg-{}", fleet.run));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| Unsupported(format!("{}: {e}", dir.display())))?;
        nix::unistd::chown(&dir, Some(user.uid), Some(user.gid)).map_err(|e| Unsupported(format!("chown: {e}")))?;
        let pg = FleetPg { dir, bin, ns: fleet.ctl_ns.clone(), url: "postgres://ferry@127.0.0.1:5432/ferry".into() };
        let data = pg.dir.join("data").to_string_lossy().into_owned();
        pg.run(false, "initdb", &["-D", &data, "-A", "trust", "-U", "ferry", "--no-sync", "-E", "UTF8"]);
        let opts = format!("-p 5432 -c listen_addresses=127.0.0.1 -k {} -c fsync=off", pg.dir.display());
        let log = pg.dir.join("log").to_string_lossy().into_owned();
        pg.run(true, "pg_ctl", &["-D", &data, "-l", &log, "-o", &opts, "-w", "start"]);
        pg.run(true, "createdb", &["-h", "127.0.0.1", "-p", "5432", "-U", "ferry", "ferry"]);
        Ok(pg)
    }

    /// Runs a PostgreSQL tool as the postgres user (in the coordinator's namespace if `in_ns`).
    fn run(&self, in_ns: bool, tool: &str, args: &[&str]) {
        let mut cmd = if in_ns {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &self.ns, "runuser"]);
            c
        } else {
            Command::new("runuser")
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
