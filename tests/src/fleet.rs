//! A fleet of real hosts for end-to-end tests: systemd-nspawn containers running systemd as PID
//! 1, each in its own network namespace on a bridge this harness owns, each running the built
//! `ferry-agent` from the real unit file in `systemd/`.
//!
//! Layout of one run (`<run>` = `fy<pid>x<n>`, unique per process and fleet):
//! - network namespaces `<run>-sw` (bridge `br0`), `<run>-ctl` (the coordinator, 10.199.0.2) and
//!   `<run>-h<i>` (host `web-<i>`, 10.199.0.<10+i>), joined by veth pairs created inside the
//!   namespaces (no interface ever appears in the machine's own namespace);
//! - cgroups `/sys/fs/cgroup/{systemd,unified}/ferry-test/<run>/<host>` (one per host, so units
//!   of one host never mix with another's, and so a host can be frozen or killed as a whole);
//! - `/tmp/ferry-test/<run>/`: PKI, fleet.toml, and per host its `/etc` (bind-mounted writable),
//!   its `/var/lib/ferry` (a size-capped tmpfs, so "fill the disk" never fills the machine's) and
//!   its console log.
//! - each host's agent serves `/metrics` and `/health` on its own loopback (`[http]`,
//!   [`AGENT_HTTP_PORT`]): [`FleetHost::http_get`] asks from inside the host's namespace.
//!
//! Hosts that must install packages boot from a Debian root of their own instead
//! ([`Fleet::boot_own_root`], roots from [`crate::debroot`]): `--volatile=overlay` over the cached
//! root, so every write lands in a tmpfs of that boot and the cache is never changed; no agent is
//! preinstalled; `<run>/<host>/drop/` is bind-mounted read-only at `/opt/ferry-test` to hand it
//! packages, certificates and configs. Same network, cgroups and teardown as the others.
//!
//! Teardown (on drop, and for runs whose owning process died: [`reap_stale`]) kills every
//! container through its cgroup, unmounts, removes the cgroups and deletes the namespaces.
//! Every packet stays inside the namespaces of the run.
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ferry_proto::identity::Role;

use crate::pki::{CertFiles, TestPki};

const CGROUP_PARENT: &str = "ferry-test";
const WORK_ROOT: &str = "/tmp/ferry-test";
const SUBNET: &str = "10.199.0";
pub const CTL_IP: Ipv4Addr = Ipv4Addr::new(10, 199, 0, 2);
pub const AGENT_PORT: u16 = 7443;
/// Where each host's agent serves `/metrics` and `/health` (loopback: reach it with
/// [`FleetHost::http_get`]).
pub const AGENT_HTTP_PORT: u16 = 9187;
/// Size of each host's `/var/lib/ferry`.
pub const STATE_SIZE_MB: u32 = 256;

static FLEETS: AtomicU32 = AtomicU32::new(0);

/// Why a fleet cannot run on this machine.
#[derive(Debug)]
pub struct Unsupported(pub String);

/// Checks that this machine can boot a fleet: root, systemd-nspawn, iproute2, cgroup files.
pub fn check_supported() -> Result<(), Unsupported> {
    if !nix::unistd::geteuid().is_root() {
        return Err(Unsupported("the test fleet needs root (network namespaces, cgroups, systemd-nspawn)".into()));
    }
    require_tools(&["systemd-nspawn", "ip", "nsenter", "tc"])?;
    for tree in ["systemd", "unified"] {
        if !Path::new("/sys/fs/cgroup").join(tree).join("cgroup.procs").exists() {
            return Err(Unsupported(format!("/sys/fs/cgroup/{tree} is not mounted (hybrid cgroups expected)")));
        }
    }
    Ok(())
}

/// Every one of `tools` is installed (on `PATH` or in `/usr/sbin`).
pub fn require_tools(tools: &[&str]) -> Result<(), Unsupported> {
    match tools.iter().find(|t| !which(t)) {
        Some(tool) => Err(Unsupported(format!("{tool} is not installed (scripts/deps.sh installs it)"))),
        None => Ok(()),
    }
}

fn which(tool: &str) -> bool {
    std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file())).unwrap_or(false)
        || Path::new("/usr/sbin").join(tool).is_file()
}

/// A test that cannot run here: locally it is skipped with a loud message; under `CI=true` this
/// panics (CI must never skip the real-host suites silently).
pub fn skip_unless_ci(why: &Unsupported, what: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true but {what} cannot run here: {}", why.0);
    }
    eprintln!("\n!!! SKIPPED: {what}: {}\n!!! (under CI=true this is a failure)\n", why.0);
}

/// Boots a fleet, or explains why not: locally a missing capability skips the test with a loud
/// message; under `CI=true` it fails the test (CI must never skip the real-host suite silently).
#[macro_export]
macro_rules! fleet_or_skip {
    ($hosts:expr) => {
        match $crate::fleet::Fleet::boot_or_skip($hosts) {
            Some(f) => f,
            None => return,
        }
    };
}

/// One host of the fleet.
pub struct FleetHost {
    pub name: String,
    pub index: usize,
    pub ip: Ipv4Addr,
    pub ns: String,
    /// The host's end of the link as seen in the switch namespace.
    pub veth: String,
    pub dir: PathBuf,
    pub certs: CertFiles,
    nspawn: Option<Child>,
    /// PID (in the machine's namespace) of the host's systemd.
    pub leader: i32,
    cgroup_unified: PathBuf,
}

pub struct Fleet {
    pub run: String,
    pub dir: PathBuf,
    pub pki: TestPki,
    pub coordinator: CertFiles,
    pub hosts: Vec<FleetHost>,
    pub sw_ns: String,
    pub ctl_ns: String,
    ferry: PathBuf,
    agent: PathBuf,
    /// Left running when dropped (the newcomer's demo).
    keep: bool,
    /// Hosts boot from this Debian root (volatile overlay) instead of the machine's own.
    own_root: Option<PathBuf>,
}

fn run_cmd(cmd: &mut Command) -> Result<Output, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// A command's stdout and stderr, as text.
pub fn text_of(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn ip(args: &[&str]) -> Result<(), String> {
    run_cmd(Command::new("ip").args(args)).map(|_| ())
}

fn cgroup_dir(tree: &str, run: &str) -> PathBuf {
    Path::new("/sys/fs/cgroup").join(tree).join(CGROUP_PARENT).join(run)
}

impl Fleet {
    /// [`Fleet::boot`] when the machine supports it; `None` (after a loud message) when it does
    /// not and `CI` is not `true`. Panics on any other failure.
    pub fn boot_or_skip(hosts: usize) -> Option<Fleet> {
        if let Err(why) = check_supported() {
            skip_unless_ci(&why, "the real-host fleet test");
            return None;
        }
        match Fleet::boot(hosts) {
            Ok(f) => Some(f),
            Err(e) => panic!("booting the test fleet failed: {e}"),
        }
    }

    /// Creates the network, the PKI and `hosts` hosts, and waits until every host's systemd is up
    /// and its ferry-agent is active.
    pub fn boot(hosts: usize) -> Result<Fleet, String> {
        reap_stale();
        let run = format!("fy{}x{}", std::process::id(), FLEETS.fetch_add(1, Ordering::Relaxed));
        Fleet::boot_named(&run, hosts)
    }

    /// Boots a fleet under a fixed run name (not reaped as stale: see [`reap_stale`]).
    /// `FERRY_BIN` / `FERRY_AGENT_BIN` choose other binaries than the workspace's build.
    pub fn boot_named(run: &str, hosts: usize) -> Result<Fleet, String> {
        Fleet::boot_inner(run, hosts, None)
    }

    /// Boots `hosts` hosts from the Debian root `root` (see [`crate::debroot`]), in the same
    /// network layout, with nothing of ferry installed: a test installs the packages itself from
    /// each host's [`FleetHost::drop_dir`] (`/opt/ferry-test` inside). Waits until each host's
    /// systemd is up.
    pub fn boot_own_root(root: &Path, hosts: usize) -> Result<Fleet, String> {
        reap_stale();
        let run = format!("fy{}x{}", std::process::id(), FLEETS.fetch_add(1, Ordering::Relaxed));
        Fleet::boot_inner(&run, hosts, Some(root.to_path_buf()))
    }

    fn boot_inner(run: &str, hosts: usize, own_root: Option<PathBuf>) -> Result<Fleet, String> {
        assert!((1..=200).contains(&hosts), "1 to 200 hosts");
        let run = run.to_string();
        let binary =
            |var: &str, name: &str| std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| crate::bin(name));
        let dir = Path::new(WORK_ROOT).join(&run);
        std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        let pki = TestPki::in_dir(&dir.join("pki"));
        let coordinator = pki.issue("ctl", Role::Coordinator, &[]);
        let mut fleet = Fleet {
            sw_ns: format!("{run}-sw"),
            ctl_ns: format!("{run}-ctl"),
            run,
            dir,
            pki,
            coordinator,
            hosts: Vec::new(),
            ferry: binary("FERRY_BIN", "ferry"),
            agent: binary("FERRY_AGENT_BIN", "ferry-agent"),
            keep: false,
            own_root,
        };
        // On any error below, dropping `fleet` tears down what was created so far.
        fleet.make_network()?;
        for i in 1..=hosts {
            let host = fleet.make_host(i)?;
            fleet.hosts.push(host);
        }
        for i in 0..fleet.hosts.len() {
            fleet.wait_booted(i)?;
        }
        fleet.write_fleet_toml("fleet.toml", &fleet.coordinator.clone())?;
        Ok(fleet)
    }

    fn make_network(&self) -> Result<(), String> {
        for ns in [&self.sw_ns, &self.ctl_ns] {
            ip(&["netns", "add", ns])?;
        }
        ip(&["-n", &self.sw_ns, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &self.sw_ns, "link", "set", "br0", "up"])?;
        self.plug(&self.ctl_ns, "vctl", CTL_IP)
    }

    /// A network namespace of its own for a second coordinator (`{run}-{name}`), on the switch
    /// at 10.199.0.`octet` (3 to 9: the hosts start at 10): its namespace and its switch port,
    /// for [`Fleet::set_link`]. Removed with the fleet.
    pub fn add_coordinator_ns(&self, name: &str, octet: u8) -> (String, String) {
        assert!((3..10).contains(&octet), "10.199.0.{octet} is not a coordinator's address");
        let ns = format!("{}-{name}", self.run);
        let veth = format!("vc{octet}");
        ip(&["netns", "add", &ns]).unwrap_or_else(|e| panic!("{e}"));
        self.plug(&ns, &veth, Ipv4Addr::new(10, 199, 0, octet)).unwrap_or_else(|e| panic!("{e}"));
        (ns, veth)
    }

    /// Raises or cuts the link of switch port `veth` (a host's or a coordinator's).
    pub fn set_link(&self, veth: &str, up: bool) {
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.sw_ns, "link", "set", veth, state]).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Creates a veth pair between the switch and `ns`, addresses and raises it.
    fn plug(&self, ns: &str, veth: &str, addr: Ipv4Addr) -> Result<(), String> {
        ip(&["link", "add", veth, "netns", &self.sw_ns, "type", "veth", "peer", "name", "eth0", "netns", ns])?;
        ip(&["-n", &self.sw_ns, "link", "set", veth, "master", "br0"])?;
        ip(&["-n", &self.sw_ns, "link", "set", veth, "up"])?;
        ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])
    }

    fn make_host(&self, index: usize) -> Result<FleetHost, String> {
        let name = format!("web-{index}");
        let host_ip = Ipv4Addr::new(10, 199, 0, u8::try_from(10 + index).map_err(|_| "too many hosts")?);
        let ns = format!("{}-h{index}", self.run);
        let veth = format!("v{index}");
        ip(&["netns", "add", &ns])?;
        self.plug(&ns, &veth, host_ip)?;

        let dir = self.dir.join(&name);
        let certs = self.pki.issue(&name, Role::Agent, &[&host_ip.to_string()]);
        let state = dir.join("state");
        let root_args = match &self.own_root {
            None => {
                write_host_etc(&dir.join("etc"), &name, &certs)?;
                std::fs::create_dir_all(&state).map_err(|e| e.to_string())?;
                run_cmd(
                    Command::new("mount")
                        .args(["-t", "tmpfs", "-o", &format!("size={STATE_SIZE_MB}m,mode=0755"), "tmpfs"])
                        .arg(&state),
                )?;
                format!(
                    "--volatile=yes -D / --bind={etc}:/etc --bind={state}:/var/lib/ferry \
                     --bind-ro={agent}:/opt/ferry/ferry-agent",
                    etc = dir.join("etc").display(),
                    state = state.display(),
                    agent = self.agent.display(),
                )
            }
            Some(root) => {
                let drop = dir.join("drop");
                std::fs::create_dir_all(&drop).map_err(|e| format!("mkdir {}: {e}", drop.display()))?;
                format!("--volatile=overlay -D {} --bind-ro={}:/opt/ferry-test", root.display(), drop.display())
            }
        };

        let cgroup_systemd = cgroup_dir("systemd", &self.run).join(&name);
        let cgroup_unified = cgroup_dir("unified", &self.run).join(&name);
        for cg in [&cgroup_systemd, &cgroup_unified] {
            std::fs::create_dir_all(cg).map_err(|e| format!("mkdir {}: {e}", cg.display()))?;
        }
        let console = std::fs::File::create(dir.join("console.log")).map_err(|e| e.to_string())?;
        let console_err = console.try_clone().map_err(|e| e.to_string())?;
        // The shell moves itself into the host's cgroups, then becomes systemd-nspawn, so the
        // container and everything it starts lives under them.
        let script = format!(
            "echo $$ > {sd}/cgroup.procs && echo $$ > {un}/cgroup.procs && exec systemd-nspawn \
             --register=no --keep-unit {root_args} -M {machine} --quiet \
             --network-namespace-path=/run/netns/{ns} \
             -b --console=pipe",
            sd = cgroup_systemd.display(),
            un = cgroup_unified.display(),
            machine = ns,
        );
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(console_err)
            .spawn()
            .map_err(|e| format!("start systemd-nspawn for {name}: {e}"))?;
        let pid = child.id();
        let mut host = FleetHost {
            name,
            index,
            ip: host_ip,
            ns,
            veth,
            dir,
            certs,
            nspawn: Some(child),
            leader: 0,
            cgroup_unified,
        };
        host.leader = poll(Duration::from_secs(20), || first_child(pid)).ok_or_else(|| {
            format!("{}: systemd-nspawn started no container (see {})", host.name, host.console_path().display())
        })?;
        Ok(host)
    }

    fn wait_booted(&self, i: usize) -> Result<(), String> {
        let h = &self.hosts[i];
        let state = poll(Duration::from_secs(60), || {
            let out = h.exec(&["systemctl", "is-system-running"]).ok()?;
            let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
            matches!(s.as_str(), "running" | "degraded").then_some(s)
        });
        if state.is_none() {
            let now = h.exec(&["systemctl", "is-system-running"]).map(|o| text_of(&o)).unwrap_or_else(|e| e);
            let jobs = h.exec(&["systemctl", "list-jobs", "--no-pager"]).map(|o| text_of(&o)).unwrap_or_else(|e| e);
            let console = std::fs::read_to_string(h.console_path()).unwrap_or_default();
            let tail: Vec<&str> = console.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
            return Err(format!(
                "{} did not finish booting: state {}; jobs:\n{jobs}\nconsole ({}):\n{}",
                h.name,
                now.trim(),
                h.console_path().display(),
                tail.join("\n")
            ));
        }
        if self.own_root.is_some() {
            // Nothing of ferry is installed yet.
            return Ok(());
        }
        if !h.wait_unit_active("ferry-agent.service", Duration::from_secs(30)) {
            return Err(format!(
                "{}: ferry-agent.service did not become active:\n{}",
                h.name,
                h.journal("ferry-agent.service", 30)
            ));
        }
        Ok(())
    }

    /// Writes a fleet.toml (environment `test`, every host) using `coordinator`'s certificate.
    pub fn write_fleet_toml(&self, file: &str, coordinator: &CertFiles) -> Result<PathBuf, String> {
        let mut hosts = String::new();
        for (n, h) in self.hosts.iter().enumerate() {
            let sep = if n == 0 { "" } else { ", " };
            let _ = write!(hosts, "{sep}{} = \"{}:{AGENT_PORT}\"", h.name, h.ip);
        }
        let text = format!(
            "connect_timeout = \"3s\"\nrequest_timeout = \"10s\"\ncache_dir = \"cache\"\nregistry = \"registry.db\"\n\n[app]\nname = \"web\"\nunits = [\"web.service\"]\n\n\
             [[app.health]]\nname = \"demo\"\nhttp = \"http://127.0.0.1:8080/health\"\njson_field = \"status\"\n\
             json_value = \"healthy\"\ninterval = \"200ms\"\nretries = 10\n\n\
             [app.hooks]\nvalidate = \"hooks/validate\"\ntimeout = \"20s\"\n\n\
             [tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\n[environments.test]\nhosts = {{ {hosts} }}\n",
            coordinator.ca.display(),
            coordinator.cert.display(),
            coordinator.key.display()
        );
        let path = self.dir.join(file);
        std::fs::write(&path, text).map_err(|e| format!("write {}: {e}", path.display()))?;
        Ok(path)
    }

    /// Declares `apps` (name, port) in every host's agent.toml, each with a unit `NAME.service`
    /// running `/srv/NAME/app.py` (the demo app) on its port, and restarts the agents.
    pub fn add_agent_apps(&self, apps: &[(&str, u16)]) {
        for h in &self.hosts {
            let agent_toml = h.dir.join("etc/ferry/agent.toml");
            let mut text = std::fs::read_to_string(&agent_toml).unwrap_or_else(|e| panic!("agent.toml: {e}"));
            for (app, port) in apps {
                text.push_str(&format!("\n[apps.{app}]\nroot = \"/srv/{app}\"\nunits = [\"{app}.service\"]\n"));
                let unit = h.dir.join(format!("etc/systemd/system/{app}.service"));
                let service = format!(
                    "[Service]\nType=exec\nEnvironment=PORT={port}\nExecStart=/usr/bin/python3 /srv/{app}/app.py\n"
                );
                std::fs::write(&unit, service).unwrap_or_else(|e| panic!("{}: {e}", unit.display()));
            }
            std::fs::write(&agent_toml, text).unwrap_or_else(|e| panic!("agent.toml: {e}"));
            h.systemctl(&["daemon-reload"]).unwrap_or_else(|e| panic!("{}: daemon-reload: {e}", h.name));
            h.systemctl(&["restart", "ferry-agent.service"]).unwrap_or_else(|e| panic!("{}: restart: {e}", h.name));
            assert!(
                h.wait_unit_active("ferry-agent.service", Duration::from_secs(20)),
                "{}",
                h.journal("ferry-agent.service", 20)
            );
        }
    }

    /// A fleet.toml (`file` in the run's directory, the fleet's coordinator certificate) with
    /// `app` lines added to `[app]` and `extra` at its end (after `[environments.test]`).
    pub fn app_fleet_toml(&self, file: &str, app: &str, extra: &str) -> PathBuf {
        let path = self.write_fleet_toml(file, &self.coordinator.clone()).unwrap_or_else(|e| panic!("{e}"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let units = "units = [\"web.service\"]\n";
        let text = text.replacen(units, &format!("{units}{app}"), 1) + extra;
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    /// A fleet.toml (`file` in the run's directory) with `extra` lines added to
    /// `[environments.test]`: strategy keys, coordinator hooks. It shares the run's registry.
    pub fn fleet_toml_with(&self, file: &str, extra: &str) -> PathBuf {
        let path = self.write_fleet_toml(file, &self.coordinator.clone()).unwrap_or_else(|e| panic!("{e}"));
        let mut text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        text.push_str(extra);
        text.push('\n');
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    /// Starts the real `ferry` CLI in the coordinator's namespace, in its own process group
    /// (so a test can kill it and everything it started), output to `log`.
    pub fn spawn_ferry(&self, args: &[&str], log: &Path) -> std::process::Child {
        self.spawn_ferry_in(&self.ctl_ns, args, log)
    }

    /// [`Fleet::spawn_ferry`] in namespace `ns` (one from [`Fleet::add_coordinator_ns`]).
    pub fn spawn_ferry_in(&self, ns: &str, args: &[&str], log: &Path) -> std::process::Child {
        use std::os::unix::process::CommandExt;
        let out = std::fs::File::create(log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let err = out.try_clone().unwrap_or_else(|e| panic!("dup: {e}"));
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).arg(&self.ferry).args(args).current_dir(&self.dir).env_remove("FERRY_LOG");
        cmd.stdout(out).stderr(err).process_group(0).spawn().unwrap_or_else(|e| panic!("spawn ferry {args:?}: {e}"))
    }

    pub fn fleet_toml(&self) -> PathBuf {
        self.dir.join("fleet.toml")
    }

    fn ferry_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ctl_ns])
            .arg(&self.ferry)
            .args(args)
            .current_dir(&self.dir)
            .env_remove("FERRY_LOG");
        cmd
    }

    /// Runs the real `ferry` CLI in the coordinator's namespace.
    pub fn ferry(&self, args: &[&str]) -> Output {
        self.ferry_command(args).output().unwrap_or_else(|e| panic!("run ferry {args:?}: {e}"))
    }

    /// The demo app's VERSION each host serves from its app root ("" where it has none).
    pub fn versions(&self) -> Vec<String> {
        self.hosts
            .iter()
            .map(|h| {
                h.exec(&["cat", "/srv/web/VERSION"])
                    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                    .unwrap_or_default()
            })
            .collect()
    }

    /// `ferry deploy` of `artifact` as `version` to environment `test`, with `config`; `json`
    /// adds `--output json`.
    pub fn deploy(&self, config: &str, artifact: &Path, version: &str, json: bool) -> Output {
        let artifact = artifact.to_string_lossy();
        let mut args =
            vec!["deploy", "--config", config, "--env", "test", "--artifact", &artifact, "--version", version];
        if json {
            args.extend(["--output", "json"]);
        }
        self.ferry(&args)
    }

    /// An HTTP GET from the coordinator's namespace; `(status, body)`, or the error text.
    pub fn http_get(&self, url: &str) -> Result<(u16, String), String> {
        http_get_in(&self.ctl_ns, url)
    }

    pub fn host(&self, name: &str) -> &FleetHost {
        self.hosts.iter().find(|h| h.name == name).unwrap_or_else(|| panic!("no host {name} in the fleet"))
    }

    // ---- faults ------------------------------------------------------------------------------

    /// Cuts the host's link: its packets are dropped, connections time out.
    pub fn cut_network(&self, host: &str) {
        let h = self.host(host);
        ip(&["-n", &self.sw_ns, "link", "set", &h.veth, "down"]).unwrap_or_else(|e| panic!("{e}"));
    }

    pub fn restore_network(&self, host: &str) {
        let h = self.host(host);
        ip(&["-n", &self.sw_ns, "link", "set", &h.veth, "up"]).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Rate-limits traffic towards the host (token bucket on its switch port).
    pub fn slow_link(&self, host: &str, kbit: u32) {
        let h = self.host(host);
        run_cmd(Command::new("tc").args([
            "-n",
            &self.sw_ns,
            "qdisc",
            "replace",
            "dev",
            &h.veth,
            "root",
            "tbf",
            "rate",
            &format!("{kbit}kbit"),
            "burst",
            "16kb",
            "latency",
            "400ms",
        ]))
        .unwrap_or_else(|e| panic!("{e}"));
    }

    pub fn unslow_link(&self, host: &str) {
        let h = self.host(host);
        let _ = run_cmd(Command::new("tc").args(["-n", &self.sw_ns, "qdisc", "del", "dev", &h.veth, "root"]));
    }

    /// Drops `percent` % of the packets the host receives (the kernel here has no netem; this is
    /// an nftables `numgen random` rule in the host's namespace).
    pub fn drop_packets(&self, host: &str, percent: u32) {
        // numgen's range is 0-99: 100 % is a plain drop.
        let rule = if percent >= 100 { "drop".to_string() } else { format!("numgen random mod 100 < {percent} drop") };
        self.input_rule(host, &rule);
    }

    /// Closes the host's inbound TCP `port` (new connections to it are dropped), as a firewall
    /// or NAT in front of it would; [`Fleet::stop_dropping`] opens it again.
    pub fn close_port(&self, host: &str, port: u16) {
        self.input_rule(host, &format!("tcp dport {port} drop"));
    }

    /// `rule` in an nftables input chain of the host's namespace.
    fn input_rule(&self, host: &str, rule: &str) {
        let h = self.host(host);
        let rules = format!(
            "table inet ferrytest {{\n  chain input {{\n    type filter hook input priority 0;\n    {rule}\n  }}\n}}\n"
        );
        let mut child = Command::new("ip")
            .args(["netns", "exec", &h.ns, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("nft: {e}"));
        if let Some(mut stdin) = child.stdin.take() {
            use std::io::Write;
            let _ = stdin.write_all(rules.as_bytes());
        }
        let status = child.wait().unwrap_or_else(|e| panic!("nft: {e}"));
        assert!(status.success(), "nft refused the rules for {host}:\n{rules}");
    }

    pub fn stop_dropping(&self, host: &str) {
        let h = self.host(host);
        let _ = run_cmd(Command::new("ip").args(["netns", "exec", &h.ns, "nft", "delete table inet ferrytest"]));
    }

    /// Freezes every process of the host (a hung host: TCP connects, nothing answers).
    pub fn freeze(&self, host: &str) {
        write_file(&self.host(host).cgroup_unified.join("cgroup.freeze"), "1");
    }

    pub fn thaw(&self, host: &str) {
        write_file(&self.host(host).cgroup_unified.join("cgroup.freeze"), "0");
    }

    /// Host loss: kills every process of the host and takes its link down, so peers time out
    /// instead of being refused.
    pub fn hard_kill(&mut self, host: &str) {
        self.cut_network(host);
        let h = self.hosts.iter_mut().find(|h| h.name == host).unwrap_or_else(|| panic!("no host {host}"));
        h.kill();
    }

    /// A clean power-off: systemd stops every unit and the container exits.
    pub fn power_off(&mut self, host: &str) {
        let h = self.hosts.iter_mut().find(|h| h.name == host).unwrap_or_else(|| panic!("no host {host}"));
        // SIGRTMIN+4 asks systemd to power off; nix's Signal has no real-time signals.
        let _ = Command::new("kill").args(["-s", "RTMIN+4", &h.leader.to_string()]).status();
        if let Some(mut child) = h.nspawn.take() {
            let exited = poll(Duration::from_secs(30), || child.try_wait().ok().flatten());
            if exited.is_none() {
                h.nspawn = Some(child);
            }
        }
    }
}

/// An HTTP GET from inside network namespace `ns`; `(status, body)`, or the error text.
fn http_get_in(ns: &str, url: &str) -> Result<(u16, String), String> {
    const SCRIPT: &str = "import sys, urllib.request, urllib.error\n\
        try:\n    r = urllib.request.urlopen(sys.argv[1], timeout=5); print(r.status); print(r.read().decode())\n\
        except urllib.error.HTTPError as e:\n    print(e.code); print(e.read().decode())\n";
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "/usr/bin/python3", "-c", SCRIPT, url])
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (status, body) = text.split_once('\n').unwrap_or((text.as_str(), ""));
    Ok((status.trim().parse().map_err(|_| format!("bad status line {status:?}"))?, body.trim().to_string()))
}

impl FleetHost {
    /// A GET of the agent's observability endpoint (`/metrics`, `/health`, …) from the host's own
    /// loopback; `(status, body)`.
    pub fn http_get(&self, path: &str) -> Result<(u16, String), String> {
        http_get_in(&self.ns, &format!("http://127.0.0.1:{AGENT_HTTP_PORT}{path}"))
    }

    /// Makes the host's `/var/lib/ferry` read-only (`true`) or writable again (`false`): the
    /// filesystem itself is remounted, so no process of the host, root included, can write it.
    pub fn data_dir_read_only(&self, read_only: bool) {
        let state = self.dir.join("state");
        let mode = if read_only { "remount,ro" } else { "remount,rw" };
        run_cmd(Command::new("mount").args(["-o", mode]).arg(&state)).unwrap_or_else(|e| panic!("{e}"));
    }

    fn console_path(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    /// On a host of [`Fleet::boot_own_root`]: the directory seen read-only at `/opt/ferry-test`
    /// inside the host.
    pub fn drop_dir(&self) -> PathBuf {
        self.dir.join("drop")
    }

    /// A path inside the host's root, as the machine sees it (through its systemd's `/proc` entry).
    pub fn path(&self, inside: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{inside}", self.leader))
    }

    /// Runs a command in all of the host's namespaces (as the machine's root; for a process of the
    /// host itself use `systemd-run --wait --pipe`).
    pub fn exec(&self, args: &[&str]) -> Result<Output, String> {
        Command::new("nsenter")
            .args(["-t", &self.leader.to_string(), "-a"])
            .args(args)
            .output()
            .map_err(|e| format!("nsenter {}: {e}", self.name))
    }

    pub fn systemctl(&self, args: &[&str]) -> Result<String, String> {
        let mut full = vec!["systemctl"];
        full.extend_from_slice(args);
        let out = self.exec(&full)?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!("{text} {}", String::from_utf8_lossy(&out.stderr).trim()))
        }
    }

    /// Gives the host the app user `web` (uid and gid 990) and runs `unit` as it (a drop-in).
    pub fn run_as_app_user(&self, unit: &str) {
        let etc = self.dir.join("etc");
        let w =
            |p: PathBuf, text: &str| std::fs::write(&p, text).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        w(etc.join("passwd"), "root:x:0:0:root:/root:/bin/sh\nweb:x:990:990:web app:/nonexistent:/usr/sbin/nologin\n");
        w(etc.join("group"), "root:x:0:\nweb:x:990:\n");
        self.unit_dropin(unit, "user", "[Service]\nUser=web\nGroup=web\n");
    }

    /// Adds drop-in `name` to `unit` and reloads systemd.
    pub fn unit_dropin(&self, unit: &str, name: &str, text: &str) {
        let dir = self.dir.join("etc/systemd/system").join(format!("{unit}.d"));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let file = dir.join(format!("{name}.conf"));
        std::fs::write(&file, text).unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
        self.systemctl(&["daemon-reload"]).unwrap_or_else(|e| panic!("{}: daemon-reload: {e}", self.name));
    }

    /// The unit's `MainPID` (0 when it has none).
    pub fn main_pid(&self, unit: &str) -> u32 {
        self.systemctl(&["show", "-p", "MainPID", "--value", unit]).ok().and_then(|s| s.parse().ok()).unwrap_or(0)
    }

    /// Waits (bounded) for `unit` to be active.
    pub fn wait_unit_active(&self, unit: &str, limit: Duration) -> bool {
        poll(limit, || (self.systemctl(&["is-active", unit]).ok()? == "active").then_some(())).is_some()
    }

    /// The last `lines` journal lines of `unit`.
    pub fn journal(&self, unit: &str, lines: u32) -> String {
        self.exec(&["journalctl", "--no-pager", "-q", "-u", unit, "-n", &lines.to_string()])
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_else(|e| e)
    }

    /// The agent's audit log, one JSON record a line (none if it cannot be read).
    pub fn audit_records(&self) -> Vec<serde_json::Value> {
        let out = self.exec(&["cat", "/var/lib/ferry/audit.log"]).map(|o| o.stdout).unwrap_or_default();
        String::from_utf8_lossy(&out).lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// How many activations of `version` the agent audited with `result` (e.g. `healthy`).
    pub fn activations(&self, version: &str, result: &str) -> usize {
        self.audit_records()
            .iter()
            .filter(|e| e["rpc"] == "Activate" && e["version"] == version && e["result"] == result)
            .count()
    }

    /// The agent crashes: SIGKILL from systemd (which then restarts it, `Restart=on-failure`).
    pub fn kill_agent(&self) -> Result<String, String> {
        self.systemctl(&["kill", "-s", "KILL", "ferry-agent.service"])
    }

    /// Fills the host's `/var/lib/ferry` until the filesystem is full; returns the bytes written.
    pub fn fill_disk(&self) -> u64 {
        let path = self.dir.join("state").join("filler");
        let chunk = vec![0u8; 1 << 20];
        let mut written = 0u64;
        if let Ok(mut f) = std::fs::File::create(&path) {
            use std::io::Write;
            while f.write_all(&chunk).is_ok() {
                written += chunk.len() as u64;
            }
            let _ = f.sync_all();
        }
        written
    }

    /// Frees what [`FleetHost::fill_disk`] wrote.
    pub fn free_disk(&self) {
        let _ = std::fs::remove_file(self.dir.join("state").join("filler"));
    }

    fn kill(&mut self) {
        write_file(&self.cgroup_unified.join("cgroup.kill"), "1");
        if let Some(mut child) = self.nspawn.take() {
            let _ = poll(Duration::from_secs(10), || child.try_wait().ok().flatten());
        }
    }
}

fn write_file(path: &Path, value: &str) {
    if let Err(e) = std::fs::write(path, value) {
        eprintln!("fleet: cannot write {value:?} to {}: {e}", path.display());
    }
}

/// The per-host `/etc`: presets off (the machine's installed services must not start inside every
/// host), firstboot masked, the real agent unit enabled with a drop-in pointing at the test
/// binary, the agent's config and certificates.
fn write_host_etc(etc: &Path, name: &str, certs: &CertFiles) -> Result<(), String> {
    let unit_dir = etc.join("systemd/system");
    let wants = unit_dir.join("multi-user.target.wants");
    let dropin = unit_dir.join("ferry-agent.service.d");
    for d in [etc.join("systemd/system-preset"), wants.clone(), dropin.clone(), etc.join("ferry")] {
        std::fs::create_dir_all(&d).map_err(|e| format!("mkdir {}: {e}", d.display()))?;
    }
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/ferry-agent.service");
    let w = |p: PathBuf, text: &str| std::fs::write(&p, text).map_err(|e| format!("write {}: {e}", p.display()));
    let link = |target: &str, p: PathBuf| {
        std::os::unix::fs::symlink(target, &p).map_err(|e| format!("symlink {}: {e}", p.display()))
    };
    w(etc.join("systemd/system-preset/00-test.preset"), "disable *\n")?;
    link("/dev/null", unit_dir.join("systemd-firstboot.service"))?;
    link("../usr/lib/os-release", etc.join("os-release"))?;
    w(etc.join("hostname"), &format!("{name}\n"))?;
    std::fs::copy(&unit, unit_dir.join("ferry-agent.service")).map_err(|e| format!("copy {}: {e}", unit.display()))?;
    link("../ferry-agent.service", wants.join("ferry-agent.service"))?;
    w(
        dropin.join("test.conf"),
        "# The test fleet runs the freshly built binary, bind-mounted at /opt/ferry.\n[Service]\nExecCondition=\n\
         ExecCondition=/opt/ferry/ferry-agent --config /etc/ferry/agent.toml --configured\nExecStartPre=\n\
         ExecStartPre=/opt/ferry/ferry-agent --config /etc/ferry/agent.toml --check\nExecStart=\n\
         ExecStart=/opt/ferry/ferry-agent --config /etc/ferry/agent.toml\n\
         # Failpoints a test arms by writing this file (see agent/src/failpoint.rs).\n\
         Environment=FERRY_FAILPOINTS_FILE=/var/lib/ferry/failpoints\n",
    )?;
    for (src, dst) in [(&certs.ca, "ca.pem"), (&certs.cert, "agent.pem"), (&certs.key, "agent.key")] {
        std::fs::copy(src, etc.join("ferry").join(dst)).map_err(|e| format!("copy {}: {e}", src.display()))?;
    }
    w(
        etc.join("ferry/agent.toml"),
        &format!(
            "listen = \"0.0.0.0:{AGENT_PORT}\"\ndata_dir = \"/var/lib/ferry\"\nshutdown_grace = \"5s\"\n\n[tls]\n\
             ca = \"/etc/ferry/ca.pem\"\ncert = \"/etc/ferry/agent.pem\"\nkey = \"/etc/ferry/agent.key\"\n\n\
             [apps.web]\nroot = \"/srv/web\"\nunits = [\"web.service\"]\n\n\
             [http]\nlisten = \"127.0.0.1:{AGENT_HTTP_PORT}\"\n"
        ),
    )?;
    w(unit_dir.join("web.service"), crate::demo_app::UNIT)?;
    Ok(())
}

/// The host's systemd: the child of `pid` (systemd-nspawn) that has exec'd systemd. Its first child
/// can be nspawn's short-lived outer helper, which exits once PID 1 is forked: taking it as the
/// leader made a loaded machine report "did not finish booting" (nsenter on a gone PID).
fn first_child(pid: u32) -> Option<i32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    text.split_whitespace()
        .filter_map(|c| c.parse::<i32>().ok())
        .find(|c| std::fs::read_to_string(format!("/proc/{c}/comm")).is_ok_and(|comm| comm.trim() == "systemd"))
}

/// Calls `f` every 100 ms until it returns `Some` or `limit` passes.
pub fn poll<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Fleet {
    /// Leaves the fleet running after this process exits; `teardown(run)` removes it.
    pub fn keep_running(mut self) {
        self.keep = true;
    }

    /// The `ferry` binary the fleet's coordinator namespace runs.
    pub fn ferry_bin(&self) -> &Path {
        &self.ferry
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        for h in &mut self.hosts {
            h.kill();
        }
        teardown(&self.run);
    }
}

/// Removes everything of one run: processes (through the cgroups), mounts, cgroups, namespaces,
/// files. Safe to call on a partly built or already removed run.
pub fn teardown(run: &str) {
    for tree in ["unified", "systemd"] {
        let dir = cgroup_dir(tree, run);
        if tree == "unified" {
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for e in entries.flatten() {
                    let _ = std::fs::write(e.path().join("cgroup.kill"), "1");
                }
            }
            // Wait (bounded) until the killed processes are gone, so the cgroups can be removed.
            let _ = poll(Duration::from_secs(10), || {
                let busy = walk_procs(&dir);
                (busy == 0).then_some(())
            });
        }
        remove_tree_depth_first(&dir);
    }
    let work = Path::new(WORK_ROOT).join(run);
    if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
        for line in mounts.lines() {
            if let Some(mp) = line.split_whitespace().nth(1)
                && Path::new(mp).starts_with(&work)
            {
                let _ = Command::new("umount").arg("-l").arg(mp).status();
            }
        }
    }
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(ns) = line.split_whitespace().next()
                && ns.starts_with(&format!("{run}-"))
            {
                let _ = Command::new("ip").args(["netns", "del", ns]).status();
            }
        }
    }
    let _ = std::fs::remove_dir_all(&work);
}

fn walk_procs(dir: &Path) -> usize {
    let own = std::fs::read_to_string(dir.join("cgroup.procs")).map(|s| s.lines().count()).unwrap_or(0);
    let children: usize = std::fs::read_dir(dir)
        .map(|d| d.flatten().filter(|e| e.path().is_dir()).map(|e| walk_procs(&e.path())).sum())
        .unwrap_or(0);
    own + children
}

fn remove_tree_depth_first(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                remove_tree_depth_first(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Runs whose owning process no longer exists (an interrupted or crashed test): torn down.
pub fn reap_stale() -> Vec<String> {
    let mut runs: Vec<String> = Vec::new();
    for dir in [cgroup_dir("unified", ""), cgroup_dir("systemd", ""), PathBuf::from(WORK_ROOT)] {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            runs.extend(entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()));
        }
    }
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some((run, _)) = line.split_whitespace().next().and_then(|ns| ns.rsplit_once('-')) {
                runs.push(run.to_string());
            }
        }
    }
    runs.sort();
    runs.dedup();
    let mut reaped = Vec::new();
    for run in runs {
        let Some(pid) = run.strip_prefix("fy").and_then(|r| r.split_once('x')).and_then(|(p, _)| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !process_alive(pid) {
            teardown(&run);
            reaped.push(run);
        }
    }
    reaped
}

fn process_alive(pid: u32) -> bool {
    // A zombie counts as dead: this machine's PID 1 reaps late.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()) != Some("Z"),
        Err(_) => false,
    }
}

/// The fleet's shared subnet prefix (for messages and tests).
pub fn subnet() -> &'static str {
    SUBNET
}
