//! `agent.toml`: what this host's agent listens on, where it keeps releases, which certificate it
//! presents, and the only apps (root path + units) it may ever touch.
//!
//! Everything is parsed and validated before a port is bound; unknown keys are errors. The
//! `[apps]` table is the agent's own boundary: a coordinator can never make it write outside these
//! roots or restart a unit not listed here.
//!
//! `[http]` (off unless present; `127.0.0.1:9187` by default when it is) serves `/metrics`,
//! `/health`, `/ready` and `/live` without TLS, so it never binds a public address by accident.
//! `[audit]` places and rotates the audit log, which is always written.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_proto::config_file::{self, ConfigError, Problem};
use serde::Deserialize;

/// A `ferry serve` to dial: `host:port` as written in agent.toml.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DialTarget {
    pub host: String,
    pub port: u16,
}

impl DialTarget {
    /// `host:port`, `[v6]:port`, or either with `https://` before it.
    pub fn parse(s: &str) -> Result<DialTarget, String> {
        let rest = s.strip_prefix("https://").unwrap_or(s);
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') || rest.contains("://") {
            return Err(format!(
                "{s:?}: expected host:port (the `ferry serve` agent port), e.g. \"deploy.example.com:7444\""
            ));
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && (h.starts_with('[') || !h.contains(':')) => (h, p),
            _ => return Err(format!("{s:?}: no port (write host:port, e.g. \"deploy.example.com:7444\")")),
        };
        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        let port: u16 = port.parse().map_err(|_| format!("{s:?}: {port:?} is not a port"))?;
        if port == 0 {
            return Err(format!("{s:?}: port 0"));
        }
        rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| format!("{s:?}: {host:?} is not a host name: {e}"))?;
        Ok(DialTarget { host: host.to_string(), port })
    }

    pub fn endpoint(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl std::fmt::Display for DialTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.endpoint())
    }
}

/// Where the packaged agent looks for its config.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/ferry/agent.toml";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Address and port the gRPC server binds, e.g. `"0.0.0.0:7443"`: where coordinators dial
    /// this host. None: the host only dials out (`connect`).
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// The `ferry serve` instances this agent dials itself (their `dial_in_listen`, `host:port`
    /// each), for hosts a coordinator cannot reach; commands come over those connections as
    /// they come to `listen` (the `dial` module).
    #[serde(default)]
    pub connect: Vec<String>,
    /// Root of the release stores: `<data_dir>/apps/<app>/…`.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    pub tls: TlsFiles,
    /// How long a TLS handshake may take before the connection is dropped.
    #[serde(default = "default_handshake_timeout", with = "config_file::duration")]
    pub handshake_timeout: Duration,
    /// On SIGTERM, how long in-flight requests get to finish before the agent exits anyway.
    #[serde(default = "default_shutdown_grace", with = "config_file::duration")]
    pub shutdown_grace: Duration,
    #[serde(default)]
    pub apps: BTreeMap<String, AppConfig>,
    /// The plain-HTTP observability endpoint; none without an `[http]` table.
    #[serde(default)]
    pub http: Option<HttpConfig>,
    #[serde(default)]
    pub audit: AuditConfig,
    /// Where the apps' secrets are written: `<secrets_dir>/<app>/<release>/<name>`. Keep it on a
    /// tmpfs (the default `/run/ferry` is one, created by the packaged unit) so secrets never reach
    /// a disk; after a reboot they are gone until the next deployment brings them again.
    #[serde(default = "default_secrets_dir")]
    pub secrets_dir: PathBuf,
    /// `[signing]`: run only releases signed by one of these keys.
    #[serde(default)]
    pub signing: SigningConfig,
    /// Peer fetch: how many other hosts this agent serves chunks to at once; one more is told
    /// to try elsewhere, so serving peers never takes more than this from the host's own app.
    /// 0 serves none.
    #[serde(default = "default_peer_uploads")]
    pub peer_uploads: usize,
    /// Peer fetch: the rate, in Mbit/s, all peer uploads share (chunks are paced to it); 0 sets
    /// no limit.
    #[serde(default)]
    pub peer_upload_mbit: u64,
}

/// `[signing]`: `trusted_keys` are public key files (`ferry key new` writes them). With any, every
/// release must carry a signature one of them verifies, at Prepare and again at each switch to it
/// (Activate, Rollback); without, signatures are kept but not required.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SigningConfig {
    #[serde(default)]
    pub trusted_keys: Vec<PathBuf>,
    /// The keys, read at load.
    #[serde(skip)]
    pub trusted: Vec<ferry_proto::signing::PublicKey>,
}

fn default_secrets_dir() -> PathBuf {
    PathBuf::from("/run/ferry")
}

/// `[http]`: Prometheus metrics and health endpoints, unauthenticated, on their own port.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address and port, e.g. `"127.0.0.1:9187"` (the default). Anything that can reach it can
    /// read the metrics and health of this host: bind a non-loopback address only behind a firewall.
    #[serde(default = "default_http_listen")]
    pub listen: SocketAddr,
}

/// `[audit]`: where the audit log lives and when it is rotated.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// The log file; default `<data_dir>/audit.log`. Under the packaged unit it must lie in
    /// `/var/lib/ferry` or `/srv`, the only places the agent may write.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Rotate once the file would grow beyond this many bytes.
    #[serde(default = "default_audit_max_bytes")]
    pub max_bytes: u64,
    /// Rotated files kept (`audit.log.1` is the newest); older ones are deleted.
    #[serde(default = "default_audit_keep")]
    pub keep: u32,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig { path: None, max_bytes: default_audit_max_bytes(), keep: default_audit_keep() }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The fleet CA certificate: the only trust anchor.
    pub ca: PathBuf,
    /// This agent's certificate (role agent), PEM.
    pub cert: PathBuf,
    /// Its private key, PEM.
    pub key: PathBuf,
    /// Optional: certificates to refuse before they expire, by serial number (one per line, hex,
    /// as `ferry cert show` prints it). Re-read with the other files on SIGHUP or when they change.
    #[serde(default)]
    pub revoked: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    /// The app's public path (e.g. `/srv/web`): the agent keeps it a symlink to the current release.
    pub root: PathBuf,
    /// The systemd units the agent may start, stop and restart for this app.
    #[serde(default)]
    pub units: Vec<String>,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/ferry")
}
fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_shutdown_grace() -> Duration {
    Duration::from_secs(30)
}
fn default_peer_uploads() -> usize {
    4
}
/// The default observability port (in the range exporters commonly use).
pub const DEFAULT_HTTP_PORT: u16 = 9187;
fn default_http_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], DEFAULT_HTTP_PORT))
}
fn default_audit_max_bytes() -> u64 {
    10 * 1024 * 1024
}
fn default_audit_keep() -> u32 {
    5
}
/// The smallest rotation size accepted: a line must fit, with room to spare.
const MIN_AUDIT_BYTES: u64 = 64 * 1024;

/// Suffixes of the unit types an app may declare.
const UNIT_SUFFIXES: &[&str] = &[".service", ".socket", ".timer", ".target", ".path"];

impl AgentConfig {
    /// Reads, parses and validates the agent config at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let config: AgentConfig = config_file::load_toml(path)?;
        config_file::check(path, config.problems())?;
        Ok(config)
    }

    /// Parses and validates TOML text (`path` only names the source in errors).
    pub fn from_toml(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let config: AgentConfig = config_file::parse_toml(path, text)?;
        config_file::check(path, config.problems())?;
        Ok(config)
    }

    /// Reads the keys of `[signing] trusted_keys` (at start, like the TLS files; `--check` too).
    pub fn load_trusted_keys(&mut self) -> Result<(), String> {
        let mut keys = Vec::new();
        for path in &self.signing.trusted_keys {
            keys.push(ferry_proto::signing::PublicKey::load(path).map_err(|e| format!("[signing] trusted_keys: {e}"))?);
        }
        self.signing.trusted = keys;
        Ok(())
    }

    /// The servers of `connect` (validated at load).
    pub fn connect_targets(&self) -> Vec<DialTarget> {
        self.connect.iter().filter_map(|s| DialTarget::parse(s).ok()).collect()
    }

    /// Every semantic problem of the config, so the operator fixes them in one go.
    pub fn problems(&self) -> Vec<Problem> {
        let mut p = Vec::new();
        if self.listen.is_none() && self.connect.is_empty() {
            p.push(Problem::new(
                "listen",
                "missing: set `listen` (coordinators dial this host, e.g. \"0.0.0.0:7443\"), `connect` (this host dials ferry serve, e.g. [\"deploy.example.com:7444\"]), or both",
            ));
        }
        let mut targets = Vec::new();
        for (i, c) in self.connect.iter().enumerate() {
            match DialTarget::parse(c) {
                Ok(t) if targets.contains(&t) => {
                    p.push(Problem::new(format!("connect[{i}]"), format!("{c:?} is listed twice")))
                }
                Ok(t) => targets.push(t),
                Err(e) => p.push(Problem::new(format!("connect[{i}]"), e)),
            }
        }
        for (i, key) in self.signing.trusted_keys.iter().enumerate() {
            if !key.is_absolute() {
                p.push(Problem::new(
                    format!("signing.trusted_keys[{i}]"),
                    format!("{} must be an absolute path", key.display()),
                ));
            }
        }
        if !self.secrets_dir.is_absolute() {
            p.push(Problem::new("secrets_dir", format!("{} must be an absolute path", self.secrets_dir.display())));
        }
        if !self.data_dir.is_absolute() {
            p.push(Problem::new("data_dir", format!("{} must be an absolute path", self.data_dir.display())));
        }
        for (key, path) in [("tls.ca", &self.tls.ca), ("tls.cert", &self.tls.cert), ("tls.key", &self.tls.key)] {
            if path.as_os_str().is_empty() {
                p.push(Problem::new(key, "must name a file"));
            }
        }
        if self.handshake_timeout.is_zero() {
            p.push(Problem::new("handshake_timeout", "must be greater than 0"));
        }
        if let Some(http) = &self.http
            && self.listen == Some(http.listen)
        {
            p.push(Problem::new(
                "http.listen",
                format!("{} is the gRPC listen address too; pick another port", http.listen),
            ));
        }
        if let Some(path) = &self.audit.path
            && (!path.is_absolute() || path.file_name().is_none())
        {
            p.push(Problem::new("audit.path", format!("{} must be an absolute file path", path.display())));
        }
        if self.audit.max_bytes < MIN_AUDIT_BYTES {
            p.push(Problem::new("audit.max_bytes", format!("must be at least {MIN_AUDIT_BYTES}")));
        }
        if self.audit.keep == 0 {
            p.push(Problem::new("audit.keep", "must be at least 1 (the file rotated last)"));
        }
        let mut roots: Vec<(&str, &Path)> = Vec::new();
        for (name, app) in &self.apps {
            if !valid_app_name(name) {
                p.push(Problem::new(
                    format!("apps.{name}"),
                    "app names may use only a-z, 0-9, '-' and '_' and start with a letter or digit",
                ));
            }
            let key = |k: &str| format!("apps.{name}.{k}");
            if !app.root.is_absolute() {
                p.push(Problem::new(key("root"), format!("{} must be an absolute path", app.root.display())));
            } else if app.root.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
                p.push(Problem::new(key("root"), format!("{} must not contain '..'", app.root.display())));
            } else if app.root.parent().is_none() {
                p.push(Problem::new(key("root"), "must not be /"));
            }
            if app.root.starts_with(&self.data_dir) {
                p.push(Problem::new(
                    key("root"),
                    format!(
                        "{} lies inside data_dir {}; pick a path outside it",
                        app.root.display(),
                        self.data_dir.display()
                    ),
                ));
            }
            for (other, other_root) in &roots {
                if app.root.starts_with(other_root) || other_root.starts_with(&app.root) {
                    p.push(Problem::new(key("root"), format!("overlaps the root of app {other}")));
                }
            }
            roots.push((name, &app.root));
            for (i, unit) in app.units.iter().enumerate() {
                if !valid_unit_name(unit) {
                    p.push(Problem::new(
                        format!("apps.{name}.units[{i}]"),
                        format!("{unit:?} is not a unit name (expected e.g. \"web.service\")"),
                    ));
                }
            }
        }
        p
    }

    /// The audit log file.
    pub fn audit_path(&self) -> PathBuf {
        self.audit.path.clone().unwrap_or_else(|| self.data_dir.join("audit.log"))
    }

    /// The directory holding one app's release store.
    pub fn app_dir(&self, app: &str) -> PathBuf {
        self.data_dir.join("apps").join(app)
    }

    /// Where the secrets of `app`'s releases are written.
    pub fn secrets_dir(&self, app: &str) -> PathBuf {
        self.secrets_dir.join(app)
    }

    /// The release store of a declared app.
    pub fn store(&self, app: &str) -> Option<crate::store::AppStore> {
        let cfg = self.apps.get(app)?;
        Some(crate::store::AppStore::with_root(self.app_dir(app), cfg.root.clone()))
    }
}

fn valid_app_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && name.len() <= 64
}

/// systemd unit names: `[A-Za-z0-9:_.\\@-]+` with a known suffix, at most 255 bytes.
pub fn valid_unit_name(unit: &str) -> bool {
    unit.len() <= 255
        && UNIT_SUFFIXES.iter().any(|s| unit.len() > s.len() && unit.ends_with(s))
        && unit.chars().all(|c| c.is_ascii_alphanumeric() || ":_.\\@-".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
listen = "0.0.0.0:7443"
data_dir = "/var/lib/ferry"
[tls]
ca = "/etc/ferry/ca.pem"
cert = "/etc/ferry/agent.pem"
key = "/etc/ferry/agent.key"
[apps.web]
root = "/srv/web"
units = ["web.service", "web-worker@1.service"]
"#;

    fn load(text: &str) -> Result<AgentConfig, String> {
        AgentConfig::from_toml(Path::new("/etc/ferry/agent.toml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let c = load(GOOD).expect("valid");
        assert_eq!(c.listen.map(|l| l.port()), Some(7443));
        assert!(c.connect.is_empty());
        assert_eq!(c.shutdown_grace, Duration::from_secs(30));
        assert_eq!(c.apps["web"].units.len(), 2);
        assert_eq!(c.app_dir("web"), PathBuf::from("/var/lib/ferry/apps/web"));
    }

    #[test]
    fn syntax_error_names_file_and_line() {
        let err = load("listen = \"0.0.0.0:7443\"\n[tls\n").expect_err("must be refused");
        assert!(err.contains("/etc/ferry/agent.toml"), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = load(&GOOD.replace("[tls]", "colour = \"blue\"\n[tls]")).expect_err("must be refused");
        assert!(err.contains("/etc/ferry/agent.toml") && err.contains("unknown field `colour`"), "{err}");
    }

    #[test]
    fn bad_values_are_all_reported() {
        let text = GOOD
            .replace("root = \"/srv/web\"", "root = \"srv/web\"")
            .replace("\"web.service\",", "\"web\",")
            .replace("data_dir = \"/var/lib/ferry\"", "data_dir = \"/var/lib/ferry\"\nhandshake_timeout = \"0s\"");
        let err = load(&text).expect_err("must be refused");
        assert!(err.contains("3 problem(s)"), "{err}");
        assert!(err.contains("apps.web.root: srv/web must be an absolute path"), "{err}");
        assert!(err.contains("apps.web.units[0]: \"web\" is not a unit name"), "{err}");
        assert!(err.contains("handshake_timeout: must be greater than 0"), "{err}");
    }

    #[test]
    fn http_is_off_by_default_and_loopback_when_enabled() {
        let c = load(GOOD).expect("valid");
        assert!(c.http.is_none());
        assert_eq!(c.audit_path(), PathBuf::from("/var/lib/ferry/audit.log"));
        let c = load(&format!("{GOOD}\n[http]\n")).expect("valid");
        assert_eq!(c.http.as_ref().map(|h| h.listen), Some(default_http_listen()));
        assert!(default_http_listen().ip().is_loopback());
    }

    #[test]
    fn bad_http_and_audit_settings_are_all_reported() {
        let text = format!(
            "{GOOD}\n[http]\nlisten = \"0.0.0.0:7443\"\n[audit]\npath = \"audit.log\"\nmax_bytes = 10\nkeep = 0\n"
        );
        let err = load(&text).expect_err("must be refused");
        assert!(err.contains("4 problem(s)"), "{err}");
        assert!(err.contains("http.listen: 0.0.0.0:7443 is the gRPC listen address too"), "{err}");
        assert!(err.contains("audit.path: audit.log must be an absolute file path"), "{err}");
        assert!(err.contains("audit.max_bytes: must be at least"), "{err}");
        assert!(err.contains("audit.keep: must be at least 1"), "{err}");
    }

    #[test]
    fn targets_parse_with_a_port_and_refuse_without() {
        assert_eq!(
            DialTarget::parse("deploy.example.com:7444"),
            Ok(DialTarget { host: "deploy.example.com".into(), port: 7444 })
        );
        assert_eq!(DialTarget::parse("https://10.0.0.5:7444/"), Ok(DialTarget { host: "10.0.0.5".into(), port: 7444 }));
        assert_eq!(DialTarget::parse("[fd00::5]:7444"), Ok(DialTarget { host: "fd00::5".into(), port: 7444 }));
        assert_eq!(DialTarget::parse("[fd00::5]:7444").map(|t| t.to_string()), Ok("[fd00::5]:7444".into()));
        for bad in ["deploy.example.com", "fd00::5", "h:0", "h:x", "https://h:1/api", ":7444", "http://h:1"] {
            assert!(DialTarget::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_host_may_dial_out_instead_of_listening_but_must_do_one() {
        let dial_only = GOOD
            .replace("listen = \"0.0.0.0:7443\"", "connect = [\"deploy.example.com:7444\", \"https://10.0.0.9:7444\"]");
        let c = load(&dial_only).expect("valid");
        assert_eq!(c.listen, None);
        assert_eq!(
            c.connect_targets().iter().map(|t| t.to_string()).collect::<Vec<_>>(),
            ["deploy.example.com:7444", "10.0.0.9:7444"]
        );
        let err = load(&GOOD.replace("listen = \"0.0.0.0:7443\"", "")).expect_err("neither");
        assert!(err.contains("listen: missing: set `listen`") && err.contains("`connect`"), "{err}");
        let err =
            load(&GOOD.replace("listen = \"0.0.0.0:7443\"", "connect = [\"deploy.example.com\", \"a:1\", \"a:1\"]"))
                .expect_err("bad connect");
        assert!(err.contains("connect[0]: \"deploy.example.com\": no port"), "{err}");
        assert!(err.contains("connect[2]: \"a:1\" is listed twice"), "{err}");
    }

    #[test]
    fn bad_listen_address_is_a_parse_error() {
        let err = load(&GOOD.replace("0.0.0.0:7443", "localhost")).expect_err("must be refused");
        assert!(err.contains("listen") && err.contains("invalid socket address"), "{err}");
    }

    #[test]
    fn overlapping_roots_are_refused() {
        let text = format!("{GOOD}\n[apps.api]\nroot = \"/srv/web/api\"\n");
        let err = load(&text).expect_err("must be refused");
        assert!(err.contains("overlaps the root of app"), "{err}");
    }

    /// The agent.toml shown in README.md is a valid config (docs and code agree).
    #[test]
    fn readme_agent_toml_parses() {
        let readme = include_str!("../../README.md");
        let start = readme.find("```toml\nlisten").expect("README shows an agent.toml") + "```toml\n".len();
        let block = &readme[start..start + readme[start..].find("```").expect("block ends")];
        let c = load(block).expect("README's agent.toml is valid");
        assert_eq!(c.apps["web"].units, ["web.service"]);
    }

    /// The packaged /etc/ferry/agent.toml sets nothing (so the unit stays skipped until an operator
    /// fills it in), and with its settings uncommented it is a valid config (template and code
    /// agree on every key and default).
    #[test]
    fn packaged_template_is_empty_and_valid_when_uncommented() {
        let template = include_str!("../../packaging/agent.toml");
        let table: toml::Table = template.parse().expect("the template is TOML");
        assert!(table.is_empty(), "the packaged config must set nothing: {table:?}");
        let uncommented: String = template
            .lines()
            .filter_map(|l| l.strip_prefix('#'))
            .filter(|l| l.starts_with('[') || l.split_once(" = ").is_some_and(|(k, _)| !k.contains(' ')))
            .map(|l| format!("{l}\n"))
            .collect();
        let c = load(&uncommented).unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
        assert_eq!(c.listen.map(|l| l.port()), Some(7443));
        assert_eq!(c.data_dir, default_data_dir());
        assert_eq!(c.handshake_timeout, default_handshake_timeout());
        assert_eq!(c.shutdown_grace, default_shutdown_grace());
        assert_eq!(c.apps["web"].root, PathBuf::from("/srv/web"));
        assert_eq!(c.apps["web"].units, ["web.service"]);
        assert_eq!(c.http.as_ref().map(|h| h.listen), Some(default_http_listen()));
        assert_eq!(c.audit_path(), default_data_dir().join("audit.log"));
        assert_eq!((c.audit.max_bytes, c.audit.keep), (default_audit_max_bytes(), default_audit_keep()));
    }

    #[test]
    fn unit_names() {
        for good in ["web.service", "a@b.service", "x.timer", "foo-bar_baz.socket"] {
            assert!(valid_unit_name(good), "{good}");
        }
        for bad in ["web", ".service", "web.service; rm -rf /", "../x.service", "a b.service"] {
            assert!(!valid_unit_name(bad), "{bad}");
        }
    }
}
