//! `ferry serve` on a real fleet: its fleet.toml, started in a namespace, its role as
//! `GET /api/v1/health` says; for the failover tests and the registry benchmark.
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use ferry_proto::identity::Role;

use crate::fleet::{Fleet, poll};

/// The API token every server of these configs accepts (as `ci`).
pub const TOKEN: &str = "ferry_ci_0123456789abcdef0123456789abcdef";

/// A process group started with [`Fleet::spawn_ferry`], killed (kill -9) when dropped.
pub struct Proc(pub Child);

impl Proc {
    pub fn kill9(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(-(self.0.id() as i32));
        let _ = nix::sys::signal::kill(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Where a server listens and what it shares.
pub struct Server<'a> {
    pub name: &'a str,
    pub ip: &'a str,
    pub port: u16,
    /// fleet.toml's `registry` (a PostgreSQL URL, or a file).
    pub registry: &'a str,
    pub lease: &'a str,
}

/// fleet.toml of server `at`, with `strategy` lines for environment `test`.
pub fn server_toml(fleet: &Fleet, at: &Server<'_>, strategy: &str) -> PathBuf {
    let (name, ip, port) = (at.name, at.ip, at.port);
    let base =
        fleet.write_fleet_toml(&format!("{name}-base.toml"), &fleet.coordinator).unwrap_or_else(|e| panic!("{e}"));
    let text = std::fs::read_to_string(&base).unwrap_or_else(|e| panic!("{e}"));
    let api = fleet.pki.issue(&format!("api-{name}"), Role::Coordinator, &[ip]);
    // The release starts in 3 s: its probe may take up to 8 s.
    let text = text.replacen("retries = 10", "retries = 40", 1);
    let text = text.replacen("registry = \"registry.db\"", &format!("registry = \"{}\"", at.registry), 1)
        + &format!(
            "{strategy}\n[server]\nlisten = \"{ip}:{port}\"\nadvertise = \"https://{ip}:{port}\"\n\
             leader_lease = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nartifacts_dir = \"{}\"\naudit_log = \"{}\"\n\n\
             [[server.tokens]]\nname = \"ci\"\nsha256 = \"{}\"\n",
            at.lease,
            api.cert.display(),
            api.key.display(),
            fleet.dir.join(format!("{name}-artifacts")).display(),
            fleet.dir.join(format!("{name}-audit.log")).display(),
            ferry_coordinator::commands::token::sha256_hex(TOKEN),
        );
    let path = fleet.dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));
    path
}

/// `ferry serve --config config` in namespace `ns`, logging to `<name>-serve.log`, once it
/// listens.
pub fn serve_in(fleet: &Fleet, ns: &str, config: &Path, name: &str) -> Proc {
    let log = fleet.dir.join(format!("{name}-serve.log"));
    let child = fleet.spawn_ferry_in(ns, &["serve", "--config", &config.to_string_lossy()], &log);
    let up = poll(Duration::from_secs(20), || {
        std::fs::read_to_string(&log).ok().filter(|l| l.contains("listening on")).map(|_| ())
    });
    assert!(up.is_some(), "ferry serve {name} did not start: {}", std::fs::read_to_string(&log).unwrap_or_default());
    Proc(child)
}

/// The role and epoch `GET /api/v1/health` of the server at `ip:port` reports, seen from the
/// coordinator's namespace.
pub fn role_at(fleet: &Fleet, ip: &str, port: u16) -> Option<(String, i64)> {
    let script = format!(
        "import json, ssl, urllib.request\nc = ssl.create_default_context(cafile='{}')\n\
         h = json.load(urllib.request.urlopen('https://{ip}:{port}/api/v1/health', context=c, timeout=3))\n\
         print(h['role'], h['epoch'])",
        fleet.coordinator.ca.display()
    );
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &fleet.ctl_ns, "python3", "-c", &script])
        .output()
        .ok()?;
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let (r, e) = line.split_once(' ')?;
    Some((r.to_string(), e.parse().ok()?))
}

/// A free loopback port (bound and released: a server binds it right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// `ferry serve` running in this process (a task), stopped by [`LocalServe::stop`].
pub struct LocalServe {
    /// The API's `https://127.0.0.1:PORT`.
    pub url: String,
    /// `[server] dial_in_listen`.
    pub dial_in: String,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// `ferry serve` in this process, with fleet.toml `config` (which sets `dial_in_listen`) and the
/// coordinator certificate `ctl`; returns once its API listens.
pub async fn serve(config: &ferry_coordinator::config::FleetConfig, ctl: &crate::pki::CertFiles) -> LocalServe {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let stop = tokio_util::sync::CancellationToken::new();
    let (config, tls, token) = (config.clone(), ctl.client_tls(), stop.clone());
    let dial_in = config.server.dial_in_listen.clone().unwrap_or_default();
    let task = tokio::spawn(async move {
        let ready = move |addr| {
            let _ = tx.send(addr);
        };
        if let Err(e) = ferry_coordinator::server::serve(config, tls, ready, token, None).await {
            eprintln!("ferry serve failed: {e:#}");
        }
    });
    let addr: std::net::SocketAddr =
        tokio::time::timeout(Duration::from_secs(10), rx).await.expect("ferry serve is ready").expect("it started");
    LocalServe { url: format!("https://127.0.0.1:{}", addr.port()), dial_in, stop, task }
}

impl LocalServe {
    /// Stops it (as SIGTERM would) and waits until it has.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// An API client of `s` with the certificate `ctl`.
pub fn remote(s: &LocalServe, ctl: &crate::pki::CertFiles) -> ferry_coordinator::cli::api_client::Remote {
    ferry_coordinator::cli::api_client::Remote::new(&ferry_coordinator::cli::api_client::RemoteArgs {
        url: s.url.clone(),
        ca: Some(ctl.ca.clone()),
        token: None,
        client_cert: Some(ctl.cert.clone()),
        client_key: Some(ctl.key.clone()),
    })
    .expect("API client")
}
