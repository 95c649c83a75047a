//! A real PostgreSQL server (Debian's `postgresql`, from `scripts/deps.sh --test`) in the
//! coordinator's namespace of a [`Fleet`], on 127.0.0.1:5432 there and on the fleet's network
//! at [`CTL_IP`] (for coordinators in namespaces of their own): a throwaway cluster (`initdb`
//! into a directory of its own, run as the `postgres` user), stopped and removed on drop.
use std::path::PathBuf;
use std::process::Command;

use crate::fleet::{CTL_IP, Fleet, Unsupported};

pub struct FleetPg {
    dir: PathBuf,
    bin: PathBuf,
    ns: String,
    pub url: String,
    /// The same database reached over the fleet's network.
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
        let pg = FleetPg {
            dir,
            bin,
            ns: fleet.ctl_ns.clone(),
            url: "postgres://ferry@127.0.0.1:5432/ferry".into(),
            net_url: format!("postgres://ferry@{CTL_IP}:5432/ferry"),
        };
        let data = pg.dir.join("data").to_string_lossy().into_owned();
        pg.run(false, "initdb", &["-D", &data, "-A", "trust", "-U", "ferry", "--no-sync", "-E", "UTF8"]);
        let hba = pg.dir.join("data/pg_hba.conf");
        let mut rules = std::fs::read_to_string(&hba).map_err(|e| Unsupported(format!("{}: {e}", hba.display())))?;
        rules.push_str("host all all 10.199.0.0/24 trust\n");
        std::fs::write(&hba, rules).map_err(|e| Unsupported(format!("{}: {e}", hba.display())))?;
        pg.start_server();
        pg.run(true, "createdb", &["-h", "127.0.0.1", "-p", "5432", "-U", "ferry", "ferry"]);
        Ok(pg)
    }

    fn start_server(&self) {
        let data = self.dir.join("data").to_string_lossy().into_owned();
        let opts = format!("-p 5432 -c listen_addresses=127.0.0.1,{CTL_IP} -k {} -c fsync=off", self.dir.display());
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
