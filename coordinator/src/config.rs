//! `fleet.toml`: the app, the coordinator's TLS files and the environments (inventories).
//!
//! Relative paths are resolved against the directory of `fleet.toml`, so a fleet directory can be
//! moved or checked into a repository as a whole. Everything is validated at load; every problem
//! is reported at once with its key.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_proto::config_file::{self, ConfigError, Problem};
use serde::Deserialize;

use crate::plan::{Pause, Size, Sizes, Strategy};

/// Why a command's app could not be picked ([`FleetConfig::pick_app`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppPick {
    /// fleet.toml declares no app of that name.
    Unknown(String),
    /// fleet.toml declares several apps and the command named none.
    Required,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// The app (`[app]`), or, in a fleet.toml of several apps (`[apps.NAME]`), the one a command
    /// works on ([`FleetConfig::for_app`]; at load, the first in dependency order).
    #[serde(default)]
    pub app: AppConfig,
    /// Every app, by name (a single `[app]` included), each with its `depends_on`.
    #[serde(default)]
    pub apps: BTreeMap<String, AppConfig>,
    pub tls: TlsFiles,
    /// How long to wait for a TCP connection and TLS handshake to a host.
    #[serde(default = "default_connect_timeout", with = "config_file::duration")]
    pub connect_timeout: Duration,
    /// How long one request to an agent may take (status; not the streamed deployment steps).
    #[serde(default = "default_request_timeout", with = "config_file::duration")]
    pub request_timeout: Duration,
    /// How many hosts are contacted at once.
    #[serde(default = "default_parallelism")]
    pub parallelism: usize,
    /// The most an archive artifact may extract to (bytes, all files together); more is refused
    /// as it is extracted (a decompression bomb). Default 64 GiB.
    #[serde(default = "default_max_artifact_bytes")]
    pub max_artifact_bytes: u64,
    /// Where `ferry` keeps what it learnt from earlier runs: the manifests it sent (so the next
    /// deploy sends only the changes) and the hashes of scanned files (so unchanged files are not
    /// read again). Default `$XDG_CACHE_HOME/ferry` or `~/.cache/ferry`. Safe to delete.
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// The registry of deployments: a SQLite file (default `$XDG_STATE_HOME/ferry/registry.db` or
    /// `~/.local/state/ferry/registry.db`), or a PostgreSQL URL (`postgres://user@host/db`), for
    /// coordinators on several machines, or a `[registry]` table (`url`, `ca`, `password_file`).
    /// Keep it where every run of `ferry` for this fleet sees it: the environment locks and
    /// `ferry resume` depend on it.
    #[serde(default)]
    pub registry: Option<RegistrySetting>,
    /// `ferry serve`: the order a version goes through the environments, e.g. `["staging",
    /// "production"]`; a succeeded deployment is promoted only to the environment after its own.
    #[serde(default)]
    pub promotion: Vec<String>,
    /// Peer fetch: hosts get a release's new content from the hosts that already hold it (a
    /// few seeds get it from the coordinator), so the coordinator sends about one copy
    /// whatever the fleet's size. Agents must reach each other on their gRPC port; what a
    /// peer cannot give comes from the coordinator. `false`: everything from the coordinator.
    #[serde(default = "default_peer_fetch")]
    pub peer_fetch: bool,
    /// `ferry serve`: the pipeline API (listen address, TLS, bearer tokens, where uploads go).
    #[serde(default)]
    pub server: ServerConfig,
    /// `[signing]`: sign every release this coordinator deploys (agents with trusted keys run
    /// only signed releases).
    #[serde(default)]
    pub signing: Option<SigningConfig>,
    pub environments: BTreeMap<String, Environment>,
    /// The fencing epoch every command to an agent carries: the registry's `ferry serve` leader
    /// lease (0 where none was ever taken). Set by the front end once the registry is open.
    #[serde(skip)]
    pub epoch: i64,
    /// Where rollouts' events are sent (`[[notify]]`, see [`crate::notify`]).
    #[serde(default)]
    pub notify: Vec<crate::notify::Target>,
}

/// `[server]`: how `ferry serve` serves its API.
/// `[signing]`: the private key (`ferry key new`; mode 0600) that signs each release's app,
/// version and manifest hash.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SigningConfig {
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address and port to listen on (HTTPS only).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// The API's TLS certificate and key; default `[tls]`'s (a coordinator certificate: issue it
    /// with `--san` for every name or address clients dial). Clients verify it with the fleet CA.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Where uploaded artifacts are kept (content-addressed); default `artifacts/` beside the
    /// registry.
    #[serde(default)]
    pub artifacts_dir: Option<PathBuf>,
    /// Directories on the coordinator a version may be registered from by path (besides the
    /// uploads in `artifacts_dir`), e.g. a build server's output mount. Default none: an API
    /// client cannot make the server read any file it can.
    #[serde(default)]
    pub artifact_roots: Vec<PathBuf>,
    /// Every API call, one JSON line each (who, what, result); default `api-audit.log` beside the
    /// registry. Rotated at 64 MiB, 10 files kept.
    #[serde(default)]
    pub audit_log: Option<PathBuf>,
    /// Bearer tokens for pipelines, stored as SHA-256 hex digests (`ferry token new` makes one).
    /// Clients may instead present a certificate of role coordinator or operator from the fleet CA.
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
    /// Largest accepted artifact upload, in bytes (default 4 GiB).
    #[serde(default = "default_max_upload")]
    pub max_upload_bytes: u64,
    /// What each caller may do beyond reading, by identity (`token:NAME` or `cert:NAME`, any
    /// case): e.g. `"cert:alice" = ["approve", "promote"]`. A listed identity may do exactly what
    /// its list says; one not listed gets the defaults: a certificate everything, a token
    /// everything but `approve` (a pipeline cannot approve promotions).
    #[serde(default)]
    pub roles: BTreeMap<String, Vec<String>>,
    /// On a shared (PostgreSQL) registry: where clients reach this server, told to them by a
    /// standby (default `https://` + `listen`).
    #[serde(default)]
    pub advertise: Option<String>,
    /// On a shared registry: how long the leader's lease holds without renewal (renewed every
    /// third of it); a standby takes over once it lapses.
    #[serde(default = "default_leader_lease", deserialize_with = "config_file::duration::deserialize")]
    pub leader_lease: Duration,
    /// Where agents that dial in connect (agent.toml `connect`), e.g. `"0.0.0.0:7444"`; off
    /// without. Agents present their agent certificate; the server presents the API's (which
    /// must name the address they dial).
    #[serde(default)]
    pub dial_in_listen: Option<String>,
}

fn default_peer_fetch() -> bool {
    true
}

fn default_leader_lease() -> Duration {
    Duration::from_secs(10)
}

/// What an API caller may do besides reading (`[server.roles]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Permission {
    Deploy,
    Promote,
    Approve,
    Rollback,
    Cancel,
}

crate::state::named! {
    Permission {
        Deploy => "deploy", "upload artifacts, register versions, deploy, run smoke checks, continue a paused canary, resume";
        Promote => "promote", "promote a succeeded deployment to the next environment";
        Approve => "approve", "approve a promotion (never one's own: the two-person rule holds for every role)";
        Rollback => "rollback", "roll an environment back";
        Cancel => "cancel", "cancel a deployment";
    }
}

impl ServerConfig {
    /// What `identity` (`token:NAME`, `cert:NAME`) may do.
    pub fn permissions(&self, identity: &str) -> Vec<Permission> {
        if let Some((_, listed)) = self.roles.iter().find(|(who, _)| who.eq_ignore_ascii_case(identity)) {
            return listed.iter().filter_map(|r| Permission::parse(r)).collect();
        }
        let token = identity.starts_with("token:");
        Permission::ALL.into_iter().filter(|p| !(token && *p == Permission::Approve)).collect()
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
            cert: None,
            key: None,
            artifacts_dir: None,
            artifact_roots: Vec::new(),
            audit_log: None,
            tokens: Vec::new(),
            max_upload_bytes: default_max_upload(),
            roles: BTreeMap::new(),
            advertise: None,
            dial_in_listen: None,
            leader_lease: default_leader_lease(),
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:8443".to_string()
}

fn default_max_upload() -> u64 {
    4 << 30
}

/// One bearer token of `[server]`: who it is (audited as `token:NAME`) and its SHA-256.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    pub name: String,
    /// Lowercase hex SHA-256 of the token, e.g. from `printf %s "$TOKEN" | sha256sum`.
    pub sha256: String,
}

/// An HTTP check `ferry serve` runs from the coordinator against an environment after a
/// deployment (`smoke` in an environment, or in the request).
#[derive(Debug, Clone, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmokeCheck {
    /// A label for the results.
    pub name: String,
    /// http:// URL; `{host}` is replaced by each host's address (one check per host), e.g.
    /// `http://{host}:8080/health`. Without it the check runs once.
    pub url: String,
    /// The status the response must have.
    #[serde(default = "default_expect_status")]
    pub expect_status: u16,
    /// Text the response body must contain.
    #[serde(default)]
    pub contains: Option<String>,
    /// How long one request may take (default "5s").
    #[serde(
        default = "default_smoke_timeout",
        deserialize_with = "config_file::duration::deserialize",
        serialize_with = "duration_text"
    )]
    pub timeout: Duration,
}

fn default_expect_status() -> u16 {
    200
}

fn default_smoke_timeout() -> Duration {
    Duration::from_secs(5)
}

fn duration_text<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

impl SmokeCheck {
    /// What is wrong with this check, keyed under `key`.
    pub fn problems(&self, key: &str, p: &mut Vec<Problem>) {
        if self.name.trim().is_empty() {
            p.push(Problem::new(format!("{key}.name"), "must not be empty"));
        }
        let rest = self.url.strip_prefix("http://");
        if rest.is_none_or(|r| r.is_empty() || r.starts_with('/')) {
            p.push(Problem::new(format!("{key}.url"), format!("{:?} must be an http:// URL with a host", self.url)));
        }
        if !(100..=599).contains(&self.expect_status) {
            p.push(Problem::new(
                format!("{key}.expect_status"),
                format!("{} is not an HTTP status", self.expect_status),
            ));
        }
        if self.timeout.is_zero() {
            p.push(Problem::new(format!("{key}.timeout"), "must be greater than 0"));
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    /// The app's name, as declared under `[apps.<name>]` in each host's agent.toml (in
    /// fleet.toml's `[apps.NAME]`, the table's name).
    #[serde(default)]
    pub name: String,
    /// `[apps.NAME]`: apps that must be deployed (and healthy everywhere) before this one in a
    /// bundle, and rolled back after it.
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// `[apps.NAME]`: the inventory hosts that run this app (default: every host).
    #[serde(default)]
    pub hosts: Option<Vec<String>>,
    /// The environment secrets (by name) this app receives; default: all of them.
    #[serde(default)]
    pub secrets: Option<Vec<String>>,
    /// The systemd units a deployment restarts (each must be allowed in the agents' agent.toml).
    #[serde(default)]
    pub units: Vec<String>,
    /// How the units pick up a new release: "restart" (default), "reload" (their ExecReload) or
    /// "reload-or-restart". Rollbacks always restart.
    #[serde(default = "default_unit_action")]
    pub unit_action: String,
    /// Releases each host keeps (current and its predecessor are always kept).
    #[serde(default = "default_keep_releases")]
    pub keep_releases: u32,
    /// Health probes each host runs after restarting the units; all must pass.
    #[serde(default)]
    pub health: Vec<ProbeConfig>,
    /// Lifecycle hooks: executables inside the release, run by each host's agent.
    #[serde(default)]
    pub hooks: HooksConfig,
    /// Directories of the app's state, relative to the release (e.g. `["log", "tmp",
    /// "public/uploads"]`): kept once per host in `<data_dir>/apps/<app>/shared/` and linked into
    /// every release, so they survive deploys and rollbacks. A build that ships one is refused.
    #[serde(default)]
    pub shared: Vec<String>,
    /// Files of the app's state, likewise (e.g. `["config/local.yml"]`); created empty, owned by
    /// `user`, where a host has none yet. A build that ships one is refused.
    #[serde(default)]
    pub shared_files: Vec<String>,
    /// The app's user on the hosts (it must exist there): it owns the shared paths; the hooks and
    /// exec probes run as it (`hooks.as_root` and a probe's `as_root` ask for root by name). The
    /// release's files belong to root and `group`: the app reads them, and can change none.
    /// Default: none (everything as root).
    #[serde(default)]
    pub user: Option<String>,
    /// The app's group (default: the user's primary group).
    #[serde(default)]
    pub group: Option<String>,
    /// Files rendered into the release on each host at staging, from a template of the build
    /// and the environment's `vars` (see README, "Per-environment config").
    #[serde(default)]
    pub templates: Vec<TemplateConfig>,
    /// A path in the release where each host gets an environment file (systemd's
    /// `EnvironmentFile=`) of the environment's `env` table, e.g. `"config/app.env"`.
    #[serde(default)]
    pub env_file: Option<String>,
}

/// `[[app.templates]]`: one file rendered at staging.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateConfig {
    /// The template: a file of the build, e.g. `"config/app.yml.tmpl"`.
    pub template: String,
    /// Where the rendered file goes in the release, e.g. `"config/app.yml"` (the build must not
    /// ship that path).
    pub path: String,
    /// Its mode (the write bits are dropped: releases are read-only); default 0o640.
    #[serde(default = "default_template_mode")]
    pub mode: u32,
}

fn default_template_mode() -> u32 {
    0o640
}

impl Default for AppConfig {
    fn default() -> Self {
        AppConfig {
            name: String::new(),
            depends_on: Vec::new(),
            hosts: None,
            secrets: None,
            units: Vec::new(),
            unit_action: default_unit_action(),
            keep_releases: default_keep_releases(),
            health: Vec::new(),
            hooks: HooksConfig::default(),
            shared: Vec::new(),
            shared_files: Vec::new(),
            user: None,
            group: None,
            templates: Vec::new(),
            env_file: None,
        }
    }
}

impl AppConfig {
    /// Whether the app receives the environment secret `name`.
    pub fn reads_secret(&self, name: &str) -> bool {
        self.secrets.as_ref().is_none_or(|names| names.iter().any(|n| n == name))
    }

    /// The shared paths, each with whether it is a directory.
    pub fn shared_paths(&self) -> impl Iterator<Item = (&str, bool)> {
        self.shared.iter().map(|p| (p.as_str(), true)).chain(self.shared_files.iter().map(|p| (p.as_str(), false)))
    }
}

/// Paths inside the release of executables run at each point of an activation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HooksConfig {
    /// Before anything changes, e.g. take the host out of a load balancer pool.
    pub before_block_traffic: Option<String>,
    /// Before the switch (nothing changed yet if it fails).
    pub before_install: Option<String>,
    /// After the switch, before the units restart.
    pub after_install: Option<String>,
    /// After the restart, before the health probes; failing rolls the host back.
    pub validate: Option<String>,
    /// After the probes pass, e.g. put the host back in the pool.
    pub after_allow_traffic: Option<String>,
    /// Time limit of each hook.
    #[serde(default = "default_hook_timeout", with = "config_file::duration")]
    pub timeout: Duration,
    /// Hooks (by name, e.g. `["before_block_traffic"]`) that run as root although the app has a
    /// `user`; the others run as the user.
    #[serde(default)]
    pub as_root: Vec<String>,
}

fn default_hook_timeout() -> Duration {
    Duration::from_secs(60)
}

// By hand: a derived Default would give a zero timeout when [app.hooks] is absent.
impl Default for HooksConfig {
    fn default() -> Self {
        HooksConfig {
            before_block_traffic: None,
            before_install: None,
            after_install: None,
            validate: None,
            after_allow_traffic: None,
            timeout: default_hook_timeout(),
            as_root: Vec::new(),
        }
    }
}

impl HooksConfig {
    fn entries(&self) -> [(&'static str, &Option<String>); 5] {
        [
            ("before_block_traffic", &self.before_block_traffic),
            ("before_install", &self.before_install),
            ("after_install", &self.after_install),
            ("validate", &self.validate),
            ("after_allow_traffic", &self.after_allow_traffic),
        ]
    }

    /// The hooks as sent to agents.
    pub fn to_wire(&self) -> ferry_proto::v1::Hooks {
        let get = |v: &Option<String>| v.clone().unwrap_or_default();
        ferry_proto::v1::Hooks {
            before_block_traffic: get(&self.before_block_traffic),
            before_install: get(&self.before_install),
            after_install: get(&self.after_install),
            validate: get(&self.validate),
            after_allow_traffic: get(&self.after_allow_traffic),
            timeout_ms: self.timeout.as_millis() as u64,
            as_root: self.as_root.clone(),
        }
    }
}

/// One health probe, run by the agent on its own host. Exactly one of `http`, `tcp`, `exec`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeConfig {
    pub name: Option<String>,
    /// URL on the host, e.g. "http://127.0.0.1:8080/health".
    pub http: Option<String>,
    /// "address:port" to connect to.
    pub tcp: Option<String>,
    /// Command and arguments, run in the release directory; must exit 0.
    pub exec: Option<Vec<String>>,
    /// HTTP status expected (default: any 2xx).
    pub expect_status: Option<u16>,
    /// Top-level JSON field of the HTTP body that must equal `json_value`.
    pub json_field: Option<String>,
    pub json_value: Option<String>,
    #[serde(default = "default_probe_interval", with = "config_file::duration")]
    pub interval: Duration,
    #[serde(default = "default_probe_timeout", with = "config_file::duration")]
    pub timeout: Duration,
    /// Failed attempts before the probe fails.
    #[serde(default = "default_probe_retries")]
    pub retries: u32,
    /// After the first success, how long the probe must keep passing.
    #[serde(default, with = "config_file::duration")]
    pub min_healthy_time: Duration,
    /// exec: run as root although the app has a `user`.
    #[serde(default)]
    pub as_root: bool,
}

fn default_unit_action() -> String {
    "restart".into()
}
fn default_keep_releases() -> u32 {
    5
}
fn default_probe_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_probe_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_probe_retries() -> u32 {
    10
}

impl ProbeConfig {
    fn problems(&self, key: &str, p: &mut Vec<Problem>) {
        let kinds = [self.http.is_some(), self.tcp.is_some(), self.exec.is_some()].iter().filter(|k| **k).count();
        if kinds != 1 {
            p.push(Problem::new(key, "set exactly one of http, tcp or exec"));
        }
        if let Some(url) = &self.http
            && !url.starts_with("http://")
        {
            p.push(Problem::new(format!("{key}.http"), format!("{url:?} must be an http:// URL on the host")));
        }
        if let Some(cmd) = &self.exec
            && cmd.is_empty()
        {
            p.push(Problem::new(format!("{key}.exec"), "names no command"));
        }
        if self.json_field.is_some() != self.json_value.is_some() {
            p.push(Problem::new(key, "json_field and json_value go together"));
        }
        if (self.json_field.is_some() || self.expect_status.is_some()) && self.http.is_none() {
            p.push(Problem::new(key, "expect_status and json_field apply to http probes only"));
        }
        if self.timeout.is_zero() {
            p.push(Problem::new(format!("{key}.timeout"), "must be greater than 0"));
        }
        if self.retries == 0 {
            p.push(Problem::new(format!("{key}.retries"), "must be at least 1"));
        }
        if self.as_root && self.exec.is_none() {
            p.push(Problem::new(format!("{key}.as_root"), "applies to exec probes only"));
        }
    }

    /// The probe as sent to agents.
    pub fn to_wire(&self, index: usize) -> ferry_proto::v1::HealthProbe {
        use ferry_proto::v1::{ExecProbe, HealthProbe, HttpProbe, TcpProbe, health_probe::Kind};
        let kind = if let Some(url) = &self.http {
            Kind::Http(HttpProbe {
                url: url.clone(),
                expect_status: self.expect_status.map_or(0, u32::from),
                json_field: self.json_field.clone().unwrap_or_default(),
                json_value: self.json_value.clone().unwrap_or_default(),
            })
        } else if let Some(addr) = &self.tcp {
            Kind::Tcp(TcpProbe { address: addr.clone() })
        } else {
            let cmd = self.exec.clone().unwrap_or_default();
            Kind::Exec(ExecProbe {
                command: cmd.first().cloned().unwrap_or_default(),
                args: cmd.iter().skip(1).cloned().collect(),
                as_root: self.as_root,
            })
        };
        HealthProbe {
            name: self.name.clone().unwrap_or_else(|| format!("health[{index}]")),
            kind: Some(kind),
            interval_ms: self.interval.as_millis() as u64,
            timeout_ms: self.timeout.as_millis() as u64,
            retries: self.retries,
            min_healthy_time_ms: self.min_healthy_time.as_millis() as u64,
        }
    }
}

/// One app's own keys (`prefix` is `app` or `apps.NAME`).
fn app_problems(prefix: &str, app: &AppConfig, p: &mut Vec<Problem>) {
    if app.name.is_empty() {
        p.push(Problem::new(format!("{prefix}.name"), "must not be empty"));
    }
    if !matches!(app.unit_action.as_str(), "restart" | "reload" | "reload-or-restart") {
        p.push(Problem::new(
            format!("{prefix}.unit_action"),
            format!("{:?} is not one of restart, reload, reload-or-restart", app.unit_action),
        ));
    }
    if app.keep_releases < 2 {
        p.push(Problem::new(
            format!("{prefix}.keep_releases"),
            "must be at least 2 (the current release and the one to roll back to)",
        ));
    }
    for (i, probe) in app.health.iter().enumerate() {
        probe.problems(&format!("{prefix}.health[{i}]"), p);
    }
    for (name, path) in app.hooks.entries() {
        if let Some(path) = path
            && let Err(e) = ferry_proto::manifest::check_path(path)
        {
            p.push(Problem::new(
                format!("{prefix}.hooks.{name}"),
                format!("{path:?} must be a path inside the release: {e}"),
            ));
        }
    }
    if app.hooks.timeout.is_zero() {
        p.push(Problem::new(format!("{prefix}.hooks.timeout"), "must be greater than 0"));
    }
    let hook_names: Vec<&str> = app.hooks.entries().iter().map(|(n, _)| *n).collect();
    for name in &app.hooks.as_root {
        if !hook_names.contains(&name.as_str()) {
            p.push(Problem::new(
                format!("{prefix}.hooks.as_root"),
                format!("{name:?} is not a hook (one of {})", hook_names.join(", ")),
            ));
        }
    }
    app_owner_problems(prefix, app, p);
    shared_problems(prefix, app, p);
    template_problems(prefix, app, p);
}

/// `app.user` / `app.group` are names a host can have.
fn app_owner_problems(prefix: &str, app: &AppConfig, p: &mut Vec<Problem>) {
    for (key, name) in [(format!("{prefix}.user"), &app.user), (format!("{prefix}.group"), &app.group)] {
        if let Some(name) = name
            && let Err(e) = ferry_proto::manifest::check_account_name(name)
        {
            p.push(Problem::new(key, format!("{name:?}: {e}")));
        }
    }
    if app.group.is_some() && app.user.is_none() {
        p.push(Problem::new(
            format!("{prefix}.group"),
            "needs app.user (the group is the one the user's hooks and probes run with)",
        ));
    }
    if app.user.is_none() && !app.hooks.as_root.is_empty() {
        p.push(Problem::new("app.hooks.as_root", "without app.user every hook runs as root already"));
    }
}

/// Templates and the environment file: paths inside the release, each rendered once, none a
/// shared path.
fn template_problems(prefix: &str, app: &AppConfig, p: &mut Vec<Problem>) {
    let mut outputs: Vec<&str> = Vec::new();
    let entries = app.templates.iter().enumerate().map(|(i, t)| (format!("{prefix}.templates[{i}]"), Some(t)));
    let env_file = app.env_file.iter().map(|_| (format!("{prefix}.env_file").to_string(), None));
    for (key, t) in entries.chain(env_file) {
        let path = t.map_or(app.env_file.as_deref().unwrap_or_default(), |t| t.path.as_str());
        let mut paths = vec![("path", path)];
        if let Some(t) = t {
            paths.push(("template", t.template.as_str()));
            if t.mode & !0o777 != 0 || t.mode & 0o002 != 0 {
                p.push(Problem::new(
                    format!("{key}.mode"),
                    format!("{:o} must be permission bits, not world-writable", t.mode),
                ));
            }
        }
        for (what, rel) in paths {
            if let Err(e) = ferry_proto::manifest::check_path(rel) {
                let k = if t.is_some() { format!("{key}.{what}") } else { key.clone() };
                p.push(Problem::new(k, format!("{rel:?} must be a relative path inside the release: {e}")));
            }
        }
        if outputs.contains(&path) {
            p.push(Problem::new(&key, format!("{path:?} is rendered twice")));
        }
        if let Some((shared, _)) = app.shared_paths().find(|(s, _)| path == *s || path.starts_with(&format!("{s}/"))) {
            p.push(Problem::new(
                &key,
                format!("{path:?} is in the shared path {shared:?}: rendered files belong to the release"),
            ));
        }
        outputs.push(path);
    }
}

/// Shared paths: inside the release, each once, none inside another.
fn shared_problems(prefix: &str, app: &AppConfig, p: &mut Vec<Problem>) {
    let mut seen: Vec<&str> = Vec::new();
    for (key, list) in
        [(format!("{prefix}.shared"), &app.shared), (format!("{prefix}.shared_files"), &app.shared_files)]
    {
        for path in list {
            let path = path.as_str();
            if let Err(e) = ferry_proto::manifest::check_path(path) {
                p.push(Problem::new(&key, format!("{path:?} must be a relative path inside the release: {e}")));
                continue;
            }
            let inside = |a: &str, b: &str| a == b || a.starts_with(&format!("{b}/"));
            if let Some(other) = seen.iter().find(|o| inside(path, o) || inside(o, path)) {
                let why = if *other == path { "is listed twice".to_string() } else { format!("overlaps {other:?}") };
                p.push(Problem::new(&key, format!("{path:?} {why}: each shared path must stand on its own")));
            }
            seen.push(path);
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// `ferry serve`: client certificates to refuse before they expire, by serial number (one
    /// per line, hex, as `ferry cert show` prints it); re-read when it changes.
    #[serde(default)]
    pub revoked: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Environment {
    /// `name = "address:port"`; the port defaults to 7443. The agent's certificate must name the
    /// host (its inventory name, or the address). Hosts roll out in the order written.
    pub hosts: indexmap::IndexMap<String, String>,
    /// "rolling" (default), "canary", "all-at-once" or "blue-green", as written.
    #[serde(default = "default_strategy", rename = "strategy")]
    pub strategy_name: String,
    /// The strategy the keys describe, parsed once at load (see [`Environment::parse_strategy`]).
    #[serde(skip)]
    pub strategy: Strategy,
    /// rolling: hosts per batch: a count, "25%", or a list such as [1, 5, "20%"] (the last repeats).
    #[serde(default)]
    pub batch: Option<Sizes>,
    /// canary: cumulative targets, e.g. [1, "50%"] (the rest follows after the last step).
    #[serde(default)]
    pub steps: Option<Sizes>,
    /// canary: the wait after each step: a duration, or "manual" (until `ferry promote`).
    #[serde(default)]
    pub pause: Option<Pause>,
    /// Hosts that may fail before the rollout halts (default 0: halt at the first failure).
    #[serde(default)]
    pub max_failures: usize,
    /// On halt, roll every host this rollout updated back to its previous release.
    #[serde(default)]
    pub auto_rollback: bool,
    /// The longest a host's activation or rollback may take, and the longest its staging may go
    /// without sending a byte, before the host is failed (and `max_failures` / `auto_rollback`
    /// decide what follows); so, outside its pauses, the longest a deployment goes without
    /// progress. Default: [`FleetConfig::progress_deadline`].
    #[serde(default, deserialize_with = "optional_duration")]
    pub progress_deadline: Option<Duration>,
    /// Commands run where `ferry` runs, before and after each host's activation (e.g. drain it at
    /// a load balancer), with FERRY_HOST, FERRY_ADDR, FERRY_VERSION, FERRY_ENV set. A failing
    /// `before_host` fails that host before it is touched.
    #[serde(default)]
    pub before_host: Option<String>,
    #[serde(default)]
    pub after_host: Option<String>,
    /// blue-green: the two host groups, e.g. `{ blue = ["web-1", "web-2"], green = ["web-3",
    /// "web-4"] }`. A deployment goes to the idle group; the live one keeps serving.
    #[serde(default)]
    pub groups: Option<indexmap::IndexMap<String, Vec<String>>>,
    /// blue-green: the command that makes a group live (points the load balancer at it), run
    /// where `ferry` runs with FERRY_GROUP, FERRY_PREVIOUS_GROUP, FERRY_HOSTS, FERRY_ADDRS,
    /// FERRY_VERSION, FERRY_ENV set. It must be safe to run twice (a resumed deployment repeats it).
    #[serde(default)]
    pub switch: Option<String>,
    /// blue-green: a check run right after the switch (e.g. a request through the load
    /// balancer), same variables; if it fails, `switch` switches the previous group back in.
    #[serde(default)]
    pub after_switch: Option<String>,
    /// `ferry serve`: HTTP checks run from the coordinator against this environment's hosts when
    /// a pipeline asks for smoke tests; a deployment is promoted further only once they passed.
    #[serde(default)]
    pub smoke: Vec<SmokeCheck>,
    /// Metric gates: PromQL queries judged after each batch and during canary pauses (see
    /// [`crate::gate`]); a failed one halts the rollout (and, with `auto_rollback`, rolls back).
    #[serde(default)]
    pub gates: Vec<crate::gate::MetricGate>,
    /// Webhook gates: URLs POSTed the deployment at chosen points; anything but 2xx halts.
    #[serde(default)]
    pub webhooks: Vec<crate::gate::WebhookGate>,
    /// `ferry serve`: a promotion into this environment needs an approval by an identity other
    /// than the one promoting.
    #[serde(default)]
    pub require_approval: bool,
    /// When a deployment may start: weekly windows such as "Mon-Fri 09:00-17:00 Europe/Paris"
    /// (none: any time), and dated freezes when it may not (see [`crate::window`]). Rollbacks are
    /// never held back.
    #[serde(default)]
    pub windows: Vec<String>,
    #[serde(default)]
    pub freezes: Vec<crate::window::FreezeConfig>,
    /// `windows` and `freezes`, parsed once at load.
    #[serde(skip)]
    pub schedule: crate::window::Schedule,
    /// Values for the app's templates, as `{{ vars.NAME }}` (and `{{ env }}` is this
    /// environment's name). A changed value is a new release, rolled out like any other.
    #[serde(default)]
    pub vars: BTreeMap<String, String>,
    /// The app's environment file (`[app] env_file`): `NAME = "value"`; values may use the same
    /// placeholders as templates.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Secrets the app reads in this environment, by name: `{ file = "..." }` (mode 0600 or
    /// stricter, else refused) or `{ command = "..." }` (run with `sh -c` where `ferry` runs; its
    /// standard output is the value). Fetched at the start of every deployment, before any host
    /// changes; sent to the hosts over mTLS only; a template names one as `{{ secrets.NAME }}`,
    /// which is the path of the file holding it on the host.
    #[serde(default)]
    pub secrets: BTreeMap<String, SecretSource>,
    /// Per-host values for the app's templates, as `{{ labels.NAME }}` on that host, e.g.
    /// `labels = { web-1 = { zone = "a", role = "primary" } }`. They are part of the release: a
    /// changed label is a new release for every host of the environment.
    #[serde(default)]
    pub labels: BTreeMap<String, BTreeMap<String, String>>,
}

/// Where a secret's value comes from. Exactly one of `file`, `command`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretSource {
    /// A file on the coordinator (relative to fleet.toml), readable by its owner only.
    pub file: Option<PathBuf>,
    /// A command, e.g. `vault kv get -field=password secret/prod/db`, run with FERRY_ENV and
    /// FERRY_APP set; it must exit 0 within `timeout`.
    pub command: Option<String>,
    #[serde(default = "default_secret_timeout", with = "config_file::duration")]
    pub timeout: Duration,
}

fn default_secret_timeout() -> Duration {
    Duration::from_secs(30)
}

impl Environment {
    fn blue_green_problems(&self, p: &mut Vec<Problem>) {
        if self.switch.as_deref().is_none_or(|s| s.trim().is_empty()) {
            p.push(Problem::new(
                "switch",
                "blue-green needs the command that makes a group live, e.g. switch = \"lb-point-to $FERRY_GROUP\"",
            ));
        }
        let Some(groups) = &self.groups else {
            p.push(Problem::new("groups", "blue-green needs two host groups, e.g. { blue = [...], green = [...] }"));
            return;
        };
        if groups.len() != 2 {
            p.push(Problem::new("groups", format!("blue-green needs exactly two groups, not {}", groups.len())));
        }
        let mut owner: BTreeMap<&str, &str> = BTreeMap::new();
        for (group, members) in groups {
            if members.is_empty() {
                p.push(Problem::new(format!("groups.{group}"), "has no hosts"));
            }
            for host in members {
                if !self.hosts.contains_key(host) {
                    p.push(Problem::new(format!("groups.{group}"), format!("names {host:?}, which is not in hosts")));
                } else if let Some(other) = owner.insert(host, group) {
                    p.push(Problem::new(format!("groups.{group}"), format!("{host} is already in group {other}")));
                }
            }
        }
        let loose: Vec<&str> = self.hosts.keys().map(String::as_str).filter(|h| !owner.contains_key(h)).collect();
        if groups.len() == 2 && !loose.is_empty() {
            p.push(Problem::new("groups", format!("every host must be in a group; not in one: {}", loose.join(", "))));
        }
    }

    /// blue-green: the group to deploy to when `live` is live (the first group when none is yet),
    /// and its hosts in inventory order.
    pub fn idle_group(&self, live: Option<&str>) -> Option<(String, Vec<String>)> {
        let groups = self.groups.as_ref()?;
        let (name, members) = groups.iter().find(|(name, _)| Some(name.as_str()) != live)?;
        let hosts = self.hosts.keys().filter(|h| members.contains(h)).cloned().collect();
        Some((name.clone(), hosts))
    }

    /// blue-green: the hosts of `group`, in inventory order.
    pub fn group_hosts(&self, group: &str) -> Vec<String> {
        let members = self.groups.as_ref().and_then(|g| g.get(group));
        self.hosts.keys().filter(|h| members.is_some_and(|m| m.contains(h))).cloned().collect()
    }
}

fn default_strategy() -> String {
    "rolling".into()
}

fn optional_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    config_file::duration::deserialize(d).map(Some)
}

/// The progress deadline of an environment that sets none, at the least.
pub const DEFAULT_PROGRESS_DEADLINE: Duration = Duration::from_secs(600);

impl AppConfig {
    /// The longest an activation may legitimately take on a host: its three hooks at their
    /// timeout, and every health probe through all its retries, then min_healthy_time.
    pub fn activation_budget(&self) -> Duration {
        let probes: Duration = self
            .health
            .iter()
            .map(|p| (p.interval + p.timeout) * p.retries.saturating_add(1) + p.min_healthy_time)
            .sum();
        self.hooks.timeout * 3 + probes
    }
}

impl Environment {
    /// The strategy these keys describe, or the problems with them (keys named relative to the
    /// environment).
    pub fn parse_strategy(&self) -> Result<Strategy, Vec<Problem>> {
        let mut p = Vec::new();
        let misplaced = |key: &str, set: bool, p: &mut Vec<Problem>| {
            if set {
                p.push(Problem::new(key, format!("does not apply to strategy {:?}", self.strategy_name)));
            }
        };
        if self.strategy_name != "blue-green" {
            for (key, set) in [
                ("groups", self.groups.is_some()),
                ("switch", self.switch.is_some()),
                ("after_switch", self.after_switch.is_some()),
            ] {
                misplaced(key, set, &mut p);
            }
        }
        let strategy = match self.strategy_name.as_str() {
            "blue-green" => {
                for (key, set) in
                    [("batch", self.batch.is_some()), ("steps", self.steps.is_some()), ("pause", self.pause.is_some())]
                {
                    misplaced(key, set, &mut p);
                }
                self.blue_green_problems(&mut p);
                Strategy::BlueGreen
            }
            "rolling" => {
                misplaced("steps", self.steps.is_some(), &mut p);
                misplaced("pause", self.pause.is_some(), &mut p);
                let batch = match &self.batch {
                    None => vec![Size::Count(1)],
                    Some(Sizes(v)) if v.is_empty() => {
                        p.push(Problem::new("batch", "an empty list; give at least one size"));
                        vec![Size::Count(1)]
                    }
                    Some(Sizes(v)) => v.clone(),
                };
                Strategy::Rolling { batch }
            }
            "canary" => {
                misplaced("batch", self.batch.is_some(), &mut p);
                let steps = self.steps.clone().map(|s| s.0).unwrap_or_default();
                if steps.is_empty() {
                    p.push(Problem::new("steps", "a canary needs steps, e.g. [1, \"50%\"]"));
                }
                // Steps are cumulative: each must reach further than the one before. (Between a
                // count and a percentage that depends on the fleet's size; the plan then drops a
                // step that adds no host.)
                let shrinks = steps.windows(2).any(|w| match (w[0], w[1]) {
                    (Size::Count(a), Size::Count(b)) => a >= b,
                    (Size::Percent(a), Size::Percent(b)) => a >= b,
                    _ => false,
                });
                if shrinks {
                    p.push(Problem::new("steps", "are cumulative targets: each must be larger than the one before"));
                }
                let pause = self.pause.unwrap_or(Pause::Manual);
                Strategy::Canary { steps, pause }
            }
            "all-at-once" => {
                for (key, set) in
                    [("batch", self.batch.is_some()), ("steps", self.steps.is_some()), ("pause", self.pause.is_some())]
                {
                    misplaced(key, set, &mut p);
                }
                Strategy::AllAtOnce
            }
            other => {
                p.push(Problem::new(
                    "strategy",
                    format!("{other:?} is not one of rolling, canary, all-at-once, blue-green"),
                ));
                Strategy::default()
            }
        };
        if p.is_empty() { Ok(strategy) } else { Err(p) }
    }
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_parallelism() -> usize {
    32
}

fn default_max_artifact_bytes() -> u64 {
    64 << 30
}

/// One host of an environment, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub name: String,
    /// The address part as written (IP or DNS name), without the port.
    pub address: String,
    pub port: u16,
}

impl Host {
    /// Whether the host dials `ferry serve` instead of being dialed (`"dial-in"`).
    pub fn dials_in(&self) -> bool {
        self.address == DIAL_IN
    }

    /// `address:port`, bracketing IPv6 literals; `dial-in` for a host that dials in.
    pub fn endpoint(&self) -> String {
        if self.dials_in() {
            self.address.clone()
        } else if self.address.contains(':') {
            format!("[{}]:{}", self.address, self.port)
        } else {
            format!("{}:{}", self.address, self.port)
        }
    }
}

/// The inventory address of a host that dials `ferry serve` instead of being dialed
/// (agent.toml `connect`).
pub const DIAL_IN: &str = "dial-in";

/// Splits an inventory address: `"addr:port"`, `"addr"` (the agent port), `"[v6]:port"` or a
/// bare IPv6 literal; `"dial-in"` (the host dials `ferry serve`) is port 0.
pub fn parse_host_address(s: &str) -> Result<(String, u16), String> {
    if s == DIAL_IN {
        return Ok((s.to_string(), 0));
    }
    parse_host_port(s, ferry_proto::DEFAULT_AGENT_PORT)
}

pub use crate::http::parse_host_port;

/// `postgres://…` or `postgresql://…`.
fn is_database_url(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

/// fleet.toml's `registry`: a SQLite file, or a PostgreSQL database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistrySetting {
    File(PathBuf),
    Postgres(PostgresRegistry),
}

/// A PostgreSQL registry: `registry = "postgres://…"`, or the `[registry]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresRegistry {
    /// `postgres://user@host[:port]/database[?sslmode=verify-full]`.
    pub url: String,
    /// The CA that signed the database server's certificate (PEM), for `sslmode=verify-ca` or
    /// `verify-full`; default the URL's `sslrootcert`, else the system's roots.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// A file holding the database user's password (its first line); not readable by others.
    /// Keeps the password out of fleet.toml and the URL.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

impl PostgresRegistry {
    pub fn at(url: &str) -> PostgresRegistry {
        PostgresRegistry { url: url.to_string(), ..Default::default() }
    }
}

impl From<&str> for RegistrySetting {
    fn from(s: &str) -> RegistrySetting {
        if is_database_url(s) {
            RegistrySetting::Postgres(PostgresRegistry::at(s))
        } else {
            RegistrySetting::File(s.into())
        }
    }
}

impl<'de> Deserialize<'de> for RegistrySetting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Setting;
        impl<'de> serde::de::Visitor<'de> for Setting {
            type Value = RegistrySetting;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a SQLite file's path, a postgres:// URL, or a table with url, ca and password_file")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<RegistrySetting, E> {
                Ok(RegistrySetting::from(s))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<RegistrySetting, A::Error> {
                let pg = PostgresRegistry::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                if !is_database_url(&pg.url) {
                    return Err(serde::de::Error::custom(format!(
                        "registry.url must be a postgres:// URL, not {:?} (a SQLite file is `registry = \"PATH\"`)",
                        pg.url
                    )));
                }
                Ok(RegistrySetting::Postgres(pg))
            }
        }
        d.deserialize_any(Setting)
    }
}

/// `$XDG_STATE_HOME/ferry`, else `~/.local/state/ferry`.
fn default_state_dir() -> Option<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    env("XDG_STATE_HOME").map(|d| d.join("ferry")).or_else(|| env("HOME").map(|d| d.join(".local/state/ferry")))
}

impl FleetConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::from_toml(path, &text)
    }

    /// Parses and validates; relative paths are made relative to `path`'s directory.
    pub fn from_toml(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let mut config: FleetConfig = config_file::parse_toml(path, text)?;
        let single = config.apps.is_empty();
        if single {
            config.apps.insert(config.app.name.clone(), config.app.clone());
        } else {
            for (name, app) in config.apps.iter_mut() {
                if app.name.is_empty() {
                    app.name = name.clone();
                }
            }
        }
        config_file::check(path, config.problems())?;
        if !single {
            // Checked above: the order exists. Commands pick their app with `for_app`.
            if let Some(first) = config.app_order().ok().and_then(|o| o.first().cloned()) {
                config.app = config.apps[&first].clone();
            }
        }
        for e in config.environments.values_mut() {
            // Checked by `problems` above: every strategy, window and freeze parses.
            e.strategy = e.parse_strategy().unwrap_or_default();
            e.schedule = crate::window::Schedule::parse(&e.windows, &e.freezes).unwrap_or_default();
            for g in &mut e.gates {
                g.check = crate::gate::Condition::parse(&g.condition).unwrap_or_default();
            }
        }
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut config.tls.ca, &mut config.tls.cert, &mut config.tls.key]
            .into_iter()
            .chain(config.cache_dir.as_mut())
            .chain(config.registry.as_mut().into_iter().flat_map(|r| match r {
                RegistrySetting::File(f) => vec![f],
                RegistrySetting::Postgres(pg) => pg.ca.iter_mut().chain(pg.password_file.iter_mut()).collect(),
            }))
            .chain(config.tls.revoked.as_mut())
            .chain(config.server.cert.as_mut())
            .chain(config.server.key.as_mut())
            .chain(config.server.artifacts_dir.as_mut())
            .chain(config.server.audit_log.as_mut())
            .chain(config.server.artifact_roots.iter_mut())
            .chain(config.environments.values_mut().flat_map(|e| {
                let secrets = e.secrets.values_mut().filter_map(|s| s.file.as_mut());
                let gates = e.gates.iter_mut().filter_map(|g| g.ca.as_mut());
                secrets.chain(gates).chain(e.webhooks.iter_mut().filter_map(|w| w.ca.as_mut()))
            }))
            .chain(config.notify.iter_mut().filter_map(|t| t.ca.as_mut()))
            .chain(config.signing.as_mut().map(|s| &mut s.key))
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(config)
    }

    /// Every app's problems: `[app]` or `[apps.NAME]` (not both), each app's keys, `depends_on`
    /// (known apps, no cycle) and `hosts` (inventory hosts).
    fn apps_problems(&self, p: &mut Vec<Problem>) {
        let several = !(self.apps.len() == 1 && self.apps.contains_key(&self.app.name));
        if several && !self.app.name.is_empty() {
            p.push(Problem::new("app", "declare either [app] or [apps.NAME] tables, not both"));
        }
        if !several {
            app_problems("app", &self.app, p);
            return;
        }
        let hosts: std::collections::BTreeSet<&str> =
            self.environments.values().flat_map(|e| e.hosts.keys().map(String::as_str)).collect();
        for (name, app) in &self.apps {
            let prefix = format!("apps.{name}");
            if app.name != *name {
                p.push(Problem::new(
                    format!("{prefix}.name"),
                    format!("{:?} is not the table's name {name:?}", app.name),
                ));
            }
            if !name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_')) {
                p.push(Problem::new(&prefix, "app names may use only a-z, 0-9, '-' and '_'"));
            }
            app_problems(&prefix, app, p);
            for dep in &app.depends_on {
                if !self.apps.contains_key(dep) {
                    p.push(Problem::new(
                        format!("{prefix}.depends_on"),
                        format!("{dep:?} is not an app of fleet.toml"),
                    ));
                }
            }
            for name in app.secrets.iter().flatten() {
                if !self.environments.values().any(|e| e.secrets.contains_key(name)) {
                    p.push(Problem::new(
                        format!("{prefix}.secrets"),
                        format!("{name:?} is not a secret of any environment"),
                    ));
                }
            }
            for host in app.hosts.iter().flatten() {
                if !hosts.contains(host.as_str()) {
                    p.push(Problem::new(
                        format!("{prefix}.hosts"),
                        format!("{host:?} is not a host of any environment"),
                    ));
                }
            }
        }
        if let Err(cycle) = self.app_order() {
            p.push(Problem::new("apps", format!("depends_on goes round in a cycle: {}", cycle.join(" → "))));
        }
    }

    /// The apps in dependency order (an app after those it depends on; otherwise by name), or a
    /// cycle (its apps, the first repeated at the end).
    pub fn app_order(&self) -> Result<Vec<String>, Vec<String>> {
        fn visit<'a>(
            apps: &'a BTreeMap<String, AppConfig>,
            name: &'a str,
            path: &mut Vec<&'a str>,
            done: &mut Vec<String>,
        ) -> Result<(), Vec<String>> {
            if done.iter().any(|d| d == name) {
                return Ok(());
            }
            if let Some(at) = path.iter().position(|p| *p == name) {
                let mut cycle: Vec<String> = path[at..].iter().map(|s| s.to_string()).collect();
                cycle.push(name.to_string());
                return Err(cycle);
            }
            path.push(name);
            let mut deps: Vec<&'a String> = apps.get(name).map(|a| a.depends_on.iter().collect()).unwrap_or_default();
            deps.sort();
            for dep in deps {
                if apps.contains_key(dep) {
                    visit(apps, dep, path, done)?;
                }
            }
            path.pop();
            done.push(name.to_string());
            Ok(())
        }
        let mut done = Vec::new();
        for name in self.apps.keys() {
            visit(&self.apps, name, &mut Vec::new(), &mut done)?;
        }
        Ok(done)
    }

    /// The names of the apps, in name order.
    pub fn app_names(&self) -> Vec<&str> {
        self.apps.keys().map(String::as_str).collect()
    }

    /// The app a command names: `name`, or the only one when it names none.
    pub fn pick_app<'a>(&'a self, name: Option<&'a str>) -> Result<&'a str, AppPick> {
        match name {
            Some(name) if self.apps.contains_key(name) => Ok(name),
            Some(name) => Err(AppPick::Unknown(name.to_string())),
            None if self.apps.len() > 1 => Err(AppPick::Required),
            None => Ok(self.app.name.as_str()),
        }
    }

    /// The app filter of a listing naming `name`: none in a fleet of one app, where every record
    /// is that app's (those made before records named their app included).
    pub fn app_filter<'a>(&self, name: Option<&'a str>) -> Result<Option<&'a str>, AppPick> {
        match name {
            Some(name) if !self.apps.contains_key(name) => Err(AppPick::Unknown(name.to_string())),
            name => Ok(name.filter(|_| self.apps.len() > 1)),
        }
    }

    /// This fleet as app `name` sees it: `app` is that app, and each environment keeps only the
    /// hosts that run it. `None` for an app fleet.toml does not declare.
    pub fn for_app(&self, name: &str) -> Option<FleetConfig> {
        let app = self.apps.get(name)?;
        let mut view = self.clone();
        view.app = app.clone();
        if let Some(hosts) = &app.hosts {
            for e in view.environments.values_mut() {
                e.hosts.retain(|h, _| hosts.contains(h));
            }
        }
        Some(view)
    }

    /// The cache directory: the configured one, else the user's cache directory (None without a
    /// home: then nothing is cached).
    pub fn cache_dir(&self) -> Option<PathBuf> {
        let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        self.cache_dir
            .clone()
            .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("ferry")))
            .or_else(|| env("HOME").map(|d| d.join(".cache/ferry")))
    }

    /// The registry file: the configured one, else the user's state directory (`None` for a
    /// PostgreSQL registry: [`FleetConfig::postgres_registry`]).
    pub fn registry_path(&self) -> Option<PathBuf> {
        match &self.registry {
            Some(RegistrySetting::File(f)) => Some(f.clone()),
            Some(RegistrySetting::Postgres(_)) => None,
            None => default_state_dir().map(|d| d.join("registry.db")),
        }
    }

    /// The PostgreSQL registry, when `registry` names one (shared by coordinators).
    pub fn postgres_registry(&self) -> Option<&PostgresRegistry> {
        match &self.registry {
            Some(RegistrySetting::Postgres(pg)) => Some(pg),
            _ => None,
        }
    }

    pub fn problems(&self) -> Vec<Problem> {
        let mut p = Vec::new();
        self.apps_problems(&mut p);
        let envs: Vec<&String> = self.environments.keys().collect();
        for (i, t) in self.notify.iter().enumerate() {
            t.problems(&format!("notify[{i}]"), &envs, &mut p);
        }
        for (key, path) in [("tls.ca", &self.tls.ca), ("tls.cert", &self.tls.cert), ("tls.key", &self.tls.key)] {
            if path.as_os_str().is_empty() {
                p.push(Problem::new(key, "must name a file"));
            }
        }
        if self.connect_timeout.is_zero() {
            p.push(Problem::new("connect_timeout", "must be greater than 0"));
        }
        if self.request_timeout.is_zero() {
            p.push(Problem::new("request_timeout", "must be greater than 0"));
        }
        if self.max_artifact_bytes == 0 {
            p.push(Problem::new("max_artifact_bytes", "must be greater than 0"));
        }
        if self.parallelism == 0 {
            p.push(Problem::new("parallelism", "must be at least 1"));
        }
        if self.environments.is_empty() {
            p.push(Problem::new("environments", "declare at least one [environments.NAME] with hosts"));
        }
        self.server_problems(&mut p);
        for (env, e) in &self.environments {
            for name in e.vars.keys() {
                if let Err(why) = ferry_proto::render::check_var_name(&format!("vars.{name}")) {
                    p.push(Problem::new(format!("environments.{env}.vars.{name}"), why));
                }
            }
            for (name, value) in &e.env {
                let ok_name = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !ok_name {
                    p.push(Problem::new(
                        format!("environments.{env}.env.{name}"),
                        "is not an environment variable name (A-Z, a-z, 0-9, _; not starting with a digit)",
                    ));
                }
                if value.contains('\n') {
                    p.push(Problem::new(format!("environments.{env}.env.{name}"), "holds a newline"));
                }
            }
            for (host, labels) in &e.labels {
                if !e.hosts.contains_key(host) {
                    p.push(Problem::new(
                        format!("environments.{env}.labels.{host}"),
                        "is not a host of the environment",
                    ));
                }
                for name in labels.keys() {
                    if let Err(why) = ferry_proto::render::check_var_name(&ferry_proto::render::label_var(host, name)) {
                        p.push(Problem::new(format!("environments.{env}.labels.{host}.{name}"), why));
                    }
                }
            }
            for (name, source) in &e.secrets {
                let key = format!("environments.{env}.secrets.{name}");
                if let Err(why) = ferry_proto::render::check_secret_name(name) {
                    p.push(Problem::new(&key, why));
                }
                if source.file.is_some() == source.command.is_some() {
                    p.push(Problem::new(&key, "set exactly one of file or command"));
                }
                if source.command.as_deref().is_some_and(|c| c.trim().is_empty()) {
                    p.push(Problem::new(format!("{key}.command"), "is empty"));
                }
                if source.timeout.is_zero() {
                    p.push(Problem::new(format!("{key}.timeout"), "must be greater than 0"));
                }
            }
            if !e.env.is_empty() && self.apps.values().all(|a| a.env_file.is_none()) {
                p.push(Problem::new(
                    format!("environments.{env}.env"),
                    "needs app.env_file (the path in the release the units read it from)",
                ));
            }
            for (i, check) in e.smoke.iter().enumerate() {
                check.problems(&format!("environments.{env}.smoke[{i}]"), &mut p);
            }
            for (i, gate) in e.gates.iter().enumerate() {
                gate.problems(&format!("environments.{env}.gates[{i}]"), &mut p);
            }
            for (i, hook) in e.webhooks.iter().enumerate() {
                hook.problems(&format!("environments.{env}.webhooks[{i}]"), &mut p);
            }
            if e.hosts.is_empty() {
                p.push(Problem::new(format!("environments.{env}.hosts"), "has no hosts"));
            }
            if let Err(problems) = e.parse_strategy() {
                p.extend(problems.into_iter().map(|q| q.prefixed(&format!("environments.{env}."))));
            }
            if let Err(problems) = crate::window::Schedule::parse(&e.windows, &e.freezes) {
                p.extend(problems.into_iter().map(|(key, why)| Problem::new(format!("environments.{env}.{key}"), why)));
            }
            let hooks = self.apps.values().map(|a| a.hooks.timeout).max().unwrap_or_default();
            if e.progress_deadline.is_some_and(|d| d <= hooks) {
                p.push(Problem::new(
                    format!("environments.{env}.progress_deadline"),
                    format!(
                        "must be longer than app.hooks.timeout ({}): an activation runs the app's hooks",
                        humantime::format_duration(hooks)
                    ),
                ));
            }
            let mut seen: BTreeMap<(String, u16), &str> = BTreeMap::new();
            for (name, addr) in &e.hosts {
                let key = format!("environments.{env}.hosts.{name}");
                if !crate::pki::is_dns_name(name) {
                    p.push(Problem::new(&key, "host names may use letters, digits, '-' and '.'"));
                }
                match parse_host_address(addr) {
                    Ok(a) if a.0 == DIAL_IN => {
                        if self.server.dial_in_listen.is_none() {
                            p.push(Problem::new(
                                &key,
                                "dials in, but [server] dial_in_listen is not set: no ferry serve would take its connection",
                            ));
                        }
                    }
                    Ok(a) => {
                        if let Some(other) = seen.insert(a.clone(), name) {
                            p.push(Problem::new(&key, format!("has the same address as host {other}")));
                        }
                    }
                    Err(reason) => p.push(Problem::new(&key, reason)),
                }
            }
        }
        p
    }

    fn server_problems(&self, p: &mut Vec<Problem>) {
        for (i, env) in self.promotion.iter().enumerate() {
            if !self.environments.contains_key(env) {
                p.push(Problem::new("promotion", format!("names {env:?}, which is not an environment")));
            } else if self.promotion[..i].contains(env) {
                p.push(Problem::new("promotion", format!("names {env:?} twice")));
            }
        }
        for (env, e) in &self.environments {
            let after_another = self.promotion.iter().position(|p| p == env).is_some_and(|i| i > 0);
            if e.require_approval && !after_another {
                p.push(Problem::new(
                    format!("environments.{env}.require_approval"),
                    "applies to promotions: the environment must come after another in `promotion` (else a direct deployment would skip the approval)",
                ));
            }
        }
        let s = &self.server;
        if s.listen.parse::<std::net::SocketAddr>().is_err() {
            p.push(Problem::new(
                "server.listen",
                format!("{:?} is not an address:port, e.g. \"0.0.0.0:8443\"", s.listen),
            ));
        }
        if let Some(d) = &s.dial_in_listen {
            match d.parse::<std::net::SocketAddr>() {
                Err(_) => p.push(Problem::new(
                    "server.dial_in_listen",
                    format!("{d:?} is not an address:port, e.g. \"0.0.0.0:7444\""),
                )),
                Ok(a) if Some(a) == s.listen.parse().ok() => p.push(Problem::new(
                    "server.dial_in_listen",
                    format!("{d} is the API's listen address too; pick another port"),
                )),
                Ok(_) => {}
            }
        }
        if s.cert.is_some() != s.key.is_some() {
            p.push(Problem::new("server", "set both cert and key, or neither (then [tls]'s are used)"));
        }
        for (i, t) in s.tokens.iter().enumerate() {
            let key = format!("server.tokens[{i}]");
            if t.name.is_empty() || !t.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c)) {
                p.push(Problem::new(format!("{key}.name"), "use letters, digits, '-', '_', '.' and '@'"));
            } else if s.tokens[..i].iter().any(|o| o.name == t.name) {
                p.push(Problem::new(format!("{key}.name"), format!("{:?} is used twice", t.name)));
            }
            if t.sha256.len() != 64 || !t.sha256.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()) {
                p.push(Problem::new(
                    format!("{key}.sha256"),
                    "must be the token's SHA-256 as 64 lowercase hex digits (`ferry token new` prints it)",
                ));
            }
        }
        if s.max_upload_bytes == 0 {
            p.push(Problem::new("server.max_upload_bytes", "must be greater than 0"));
        }
        let roles: Vec<&str> = Permission::ALL.iter().map(|r| r.as_str()).collect();
        for (who, listed) in &s.roles {
            let key = format!("server.roles.{who:?}");
            match who.split_once(':') {
                Some(("token", name)) if !s.tokens.iter().any(|t| t.name.eq_ignore_ascii_case(name)) => {
                    p.push(Problem::new(&key, format!("there is no token {name:?} in [[server.tokens]]")))
                }
                Some(("token" | "cert", name)) if !name.is_empty() => {}
                _ => p.push(Problem::new(
                    &key,
                    "name a caller as token:NAME or cert:NAME (the certificate's common name)",
                )),
            }
            if s.roles.keys().any(|o| o != who && o.eq_ignore_ascii_case(who)) {
                p.push(Problem::new(&key, "is listed twice (identities are compared ignoring case)"));
            }
            for r in listed.iter().filter(|r| Permission::parse(r).is_none()) {
                p.push(Problem::new(&key, format!("{r:?} is not a role; roles are {}", roles.join(", "))));
            }
        }
    }

    /// Where `ferry serve` keeps its files when `[server]` does not say: beside the registry.
    pub fn state_dir(&self) -> Option<PathBuf> {
        if self.postgres_registry().is_some() {
            return default_state_dir();
        }
        self.registry_path().map(|r| r.parent().map(Path::to_path_buf).unwrap_or_default())
    }

    /// How long a host of `env` may stay staging without progress, or activating or rolling back:
    /// the environment's `progress_deadline`, else 10 minutes or twice the app's
    /// [`AppConfig::activation_budget`], whichever is longer.
    pub fn progress_deadline(&self, env: &Environment) -> Duration {
        env.progress_deadline.unwrap_or_else(|| DEFAULT_PROGRESS_DEADLINE.max(self.app.activation_budget() * 2))
    }

    /// The environment a deployment to `env` is promoted to, per `promotion`.
    pub fn next_environment(&self, env: &str) -> Option<&str> {
        let i = self.promotion.iter().position(|e| e == env)?;
        self.promotion.get(i + 1).map(String::as_str)
    }

    /// The hosts of one environment, in inventory order (as written in fleet.toml).
    pub fn hosts(&self, env: &str) -> Result<Vec<Host>, UnknownEnvironment> {
        let e = self.environments.get(env).ok_or_else(|| UnknownEnvironment {
            name: env.to_string(),
            known: self.environments.keys().cloned().collect(),
        })?;
        Ok(e.hosts
            .iter()
            .filter_map(|(name, addr)| {
                // Validated at load; a failure here cannot happen, and skipping is the safe answer.
                parse_host_address(addr).ok().map(|(address, port)| Host { name: name.clone(), address, port })
            })
            .collect())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown environment {name:?} (fleet.toml declares: {})", known.join(", "))]
pub struct UnknownEnvironment {
    pub name: String,
    pub known: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[app]
name = "web"
units = ["web.service"]

[tls]
ca = "pki/ca.pem"
cert = "pki/coordinator.pem"
key = "/abs/coordinator.key"

[environments.prod]
hosts = { web-1 = "10.0.0.11:7443", web-2 = "10.0.0.12", web-4 = "[fd00::4]:7443", web-3 = "web-3.example.com:9000" }
"#;

    fn load(text: &str) -> Result<FleetConfig, String> {
        FleetConfig::from_toml(Path::new("/etc/fleet/fleet.toml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn gates_webhooks_and_notify_targets_load_and_name_their_problems() {
        let gate = "\n[[environments.prod.gates]]\nname = \"errors\"\nprometheus = \"http://10.0.0.5:9090\"\nquery = 'sum(x{host=~\"{batch_hosts}\"})'\ncondition = \"< 0.05\"\n";
        let hook = "\n[[environments.prod.webhooks]]\nname = \"cab\"\nurl = \"https://cab.example/gate\"\nat = [\"after_batch\"]\nca = \"cab.pem\"\n";
        let notify = "\n[[notify]]\nname = \"slack\"\nurl = \"https://hooks.slack.com/services/x\"\nformat = \"slack\"\nevents = [\"halted\"]\n";
        let e = load(&format!("{GOOD}{gate}")).expect_err("on_empty is required");
        assert!(e.contains("on_empty"), "{e}");
        let c = load(&format!("{GOOD}{gate}on_empty = \"inconclusive\"\n{hook}{notify}")).expect("valid");
        let prod = &c.environments["prod"];
        assert_eq!(prod.gates[0].check.to_string(), "< 0.05");
        assert_eq!(prod.gates[0].bake, std::time::Duration::from_secs(60), "the default bake");
        assert_eq!(prod.webhooks[0].ca.as_deref(), Some(Path::new("/etc/fleet/cab.pem")), "relative to fleet.toml");
        assert_eq!(c.notify[0].format, crate::notify::Format::Slack);
        let bad = format!(
            "{GOOD}{}on_empty = \"fail\"\n{}\n[[notify]]\nname = \"x\"\nurl = \"http://x/\"\nevents = [\"halted\"]\nenvironments = [\"qa\"]\n",
            gate.replace("< 0.05", "about 5%"),
            hook.replace("[\"after_batch\"]", "[]")
        );
        let e = load(&bad).expect_err("bad keys");
        for key in
            ["environments.prod.gates[0].condition", "environments.prod.webhooks[0].at", "notify[0].environments"]
        {
            assert!(e.contains(key), "{key} missing from {e}");
        }
    }

    #[test]
    fn parses_and_resolves_paths() {
        let c = load(GOOD).expect("valid");
        assert_eq!(c.tls.ca, PathBuf::from("/etc/fleet/pki/ca.pem"));
        assert_eq!(c.tls.key, PathBuf::from("/abs/coordinator.key"));
        let hosts = c.hosts("prod").expect("env");
        assert_eq!(hosts.len(), 4);
        assert_eq!(hosts[1], Host { name: "web-2".into(), address: "10.0.0.12".into(), port: 7443 });
        // In the order written, not sorted: the inventory's order is the rollout's.
        assert_eq!(hosts[2].endpoint(), "[fd00::4]:7443");
        assert_eq!(hosts[3].endpoint(), "web-3.example.com:9000");
    }

    /// `registry` is a file (relative to fleet.toml), a URL, or a `[registry]` table whose files
    /// are relative to fleet.toml too.
    #[test]
    fn the_registry_is_a_file_a_url_or_a_table() {
        let c = load(&format!("registry = \"state/registry.db\"\n{GOOD}")).expect("file");
        assert_eq!(c.registry_path(), Some(PathBuf::from("/etc/fleet/state/registry.db")));
        assert!(c.postgres_registry().is_none());
        let c = load(&format!("registry = \"postgres://ferry@db/ferry\"\n{GOOD}")).expect("url");
        assert_eq!(c.postgres_registry(), Some(&PostgresRegistry::at("postgres://ferry@db/ferry")));
        assert_eq!(c.registry_path(), None);
        let table = "[registry]\nurl = \"postgres://ferry@db/ferry?sslmode=verify-full\"\nca = \"db-ca.pem\"\npassword_file = \"/run/secrets/db\"\n";
        let c = load(&format!("{GOOD}\n{table}")).expect("table");
        let pg = c.postgres_registry().expect("postgres");
        assert_eq!(pg.ca.as_deref(), Some(Path::new("/etc/fleet/db-ca.pem")));
        assert_eq!(pg.password_file.as_deref(), Some(Path::new("/run/secrets/db")));
        let e = load(&format!("{GOOD}\n[registry]\nurl = \"registry.db\"\n")).expect_err("not a URL");
        assert!(e.contains("registry.url must be a postgres:// URL"), "{e}");
        let e =
            load(&format!("{GOOD}\n[registry]\nurl = \"postgres://db/f\"\npassword = \"x\"\n")).expect_err("unknown");
        assert!(e.contains("unknown field `password`"), "{e}");
    }

    #[test]
    fn server_keys_are_checked_and_name_their_problems() {
        let staging = "\n[environments.staging]\nhosts = { s-1 = \"10.0.1.1\" }\n";
        let with = |top: &str, extra: &str| format!("{top}\n{}{extra}", GOOD.trim_end()) + staging;
        let c = load(&with("promotion = [\"staging\", \"prod\"]", "\nrequire_approval = true")).expect("valid");
        assert_eq!((c.next_environment("staging"), c.next_environment("prod")), (Some("prod"), None));
        assert!(c.environments["prod"].require_approval);
        let token = format!("\n[[server.tokens]]\nname = \"ci\"\nsha256 = \"{}\"\n", "a".repeat(64));
        let c = load(&(with("", "") + "\n[server]\nlisten = \"0.0.0.0:8443\"" + &token)).expect("valid");
        assert_eq!((c.server.listen.as_str(), c.server.tokens.len()), ("0.0.0.0:8443", 1));
        for (text, key, says) in [
            (with("promotion = [\"staging\", \"qa\"]", ""), "promotion", "\"qa\", which is not an environment"),
            (with("promotion = [\"prod\", \"prod\"]", ""), "promotion", "twice"),
            // The first environment (or one outside `promotion`) takes direct deployments: an
            // approval there could be skipped.
            (
                with("promotion = [\"prod\", \"staging\"]", "\nrequire_approval = true"),
                "environments.prod.require_approval",
                "must come after another",
            ),
            (with("", "\nrequire_approval = true"), "environments.prod.require_approval", "must come after another"),
            (with("", "") + "\n[server]\nlisten = \"8443\"", "server.listen", "not an address:port"),
            (with("", "") + "\n[server]\ncert = \"api.pem\"", "server", "both cert and key"),
            (
                with("", "") + "\n[[server.tokens]]\nname = \"ci\"\nsha256 = \"abc\"",
                "server.tokens[0].sha256",
                "64 lowercase hex",
            ),
            (with("", "") + &token + &token, "server.tokens[1].name", "used twice"),
            (
                with("", "") + &token + "\n[server.roles]\n\"token:cd\" = [\"deploy\"]",
                "server.roles.\"token:cd\"",
                "no token \"cd\"",
            ),
            (
                with("", "") + &token + "\n[server.roles]\n\"token:ci\" = [\"admin\"]",
                "server.roles.\"token:ci\"",
                "\"admin\" is not a role",
            ),
            (
                with("", "") + "\n[server.roles]\nalice = [\"approve\"]",
                "server.roles.\"alice\"",
                "token:NAME or cert:NAME",
            ),
            (
                with("", "") + "\n[server.roles]\n\"cert:alice\" = []\n\"cert:Alice\" = [\"approve\"]",
                "server.roles.\"cert:Alice\"",
                "listed twice",
            ),
            (
                with("", "\n[[environments.prod.smoke]]\nname = \"home\"\nurl = \"https://x/\"\nexpect_status = 99"),
                "environments.prod.smoke[0].url",
                "http:// URL",
            ),
            (
                with(
                    "",
                    "\n[[environments.prod.smoke]]\nname = \"home\"\nurl = \"http://{host}/\"\nexpect_status = 99",
                ),
                "environments.prod.smoke[0].expect_status",
                "99 is not an HTTP status",
            ),
        ] {
            let err = load(&text).expect_err(key);
            assert!(err.contains(key) && err.contains(says), "{key}: {err}");
        }
    }

    #[test]
    fn unknown_environment_lists_known_ones() {
        let c = load(GOOD).expect("valid");
        let err = c.hosts("staging").expect_err("unknown").to_string();
        assert_eq!(err, "unknown environment \"staging\" (fleet.toml declares: prod)");
    }

    #[test]
    fn hosts_may_dial_in_to_a_server_that_takes_them() {
        let dial_in = GOOD.replace("\"10.0.0.12\"", "\"dial-in\"").replace("\"[fd00::4]:7443\"", "\"dial-in\"");
        let c = load(&format!("{dial_in}\n[server]\ndial_in_listen = \"0.0.0.0:7444\"\n")).expect("valid");
        let hosts = c.hosts("prod").expect("prod");
        let dialing: Vec<&str> = hosts.iter().filter(|h| h.dials_in()).map(|h| h.name.as_str()).collect();
        assert_eq!(dialing, ["web-2", "web-4"], "two dial-in hosts share no address");
        assert_eq!(hosts.iter().find(|h| h.name == "web-2").map(|h| h.endpoint()), Some("dial-in".into()));
        let err = load(&dial_in).expect_err("nothing takes their connections");
        assert!(
            err.contains("environments.prod.hosts.web-2: dials in, but [server] dial_in_listen is not set"),
            "{err}"
        );
        let err = load(&format!("{GOOD}\n[server]\nlisten = \"0.0.0.0:8443\"\ndial_in_listen = \"0.0.0.0:8443\"\n"))
            .expect_err("one port for both");
        assert!(err.contains("server.dial_in_listen: 0.0.0.0:8443 is the API's listen address too"), "{err}");
        let err = load(&format!("{GOOD}\n[server]\ndial_in_listen = \"7444\"\n")).expect_err("no address");
        assert!(err.contains("server.dial_in_listen: \"7444\" is not an address:port"), "{err}");
    }

    #[test]
    fn bad_addresses_and_names_are_all_reported() {
        let text = GOOD
            .replace("\"10.0.0.12\"", "\"10.0.0.11:7443\"")
            .replace("web-3.example.com:9000", "web 3:99999")
            .replace("web-1 =", "\"web_1!\" =");
        let err = load(&text).expect_err("must be refused");
        assert!(err.contains("/etc/fleet/fleet.toml has 3 problem(s)"), "{err}");
        assert!(err.contains("has the same address as host"), "{err}");
        assert!(err.contains("\"99999\" is not a port"), "{err}");
        assert!(err.contains("environments.prod.hosts.web_1!: host names"), "{err}");
    }

    #[test]
    fn unknown_key_and_wrong_type() {
        let err = load(&GOOD.replace("[tls]", "[tls]\nverify = false")).expect_err("must be refused");
        assert!(err.contains("unknown field `verify`"), "{err}");
        let err = load(&GOOD.replace("[app]", "connect_timeout = 5\n[app]")).expect_err("must be refused");
        assert!(err.contains("connect_timeout") || err.contains("invalid type"), "{err}");
    }

    #[test]
    fn shared_paths_and_the_app_user_are_validated() {
        let app = |lines: &str| GOOD.replace("[tls]", &format!("{lines}\n\n[tls]"));
        let c = load(&app(
            "shared = [\"log\", \"public/uploads\"]\nshared_files = [\"config/local.yml\"]\nuser = \"web\"\n[app.hooks]\nas_root = [\"before_install\"]",
        ))
        .expect("valid");
        assert_eq!(
            c.app.shared_paths().collect::<Vec<_>>(),
            [("log", true), ("public/uploads", true), ("config/local.yml", false)]
        );
        let err = load(&app(
            "shared = [\"../data\", \"/var/log\", \"public\", \"public/uploads\", \"tmp\", \"tmp\"]\nshared_files = [\"log/x\", \"public/robots.txt\"]\ngroup = \"Web\"\n[app.hooks]\nas_root = [\"migrate\"]",
        ))
        .expect_err("refused");
        for says in [
            "app.shared: \"../data\" must be a relative path inside the release",
            "app.shared: \"/var/log\" must be a relative path inside the release: absolute path",
            "app.shared: \"public/uploads\" overlaps \"public\": each shared path must stand on its own",
            "app.shared: \"tmp\" is listed twice",
            "app.shared_files: \"public/robots.txt\" overlaps \"public\"",
            "app.group: \"Web\": not a user or group name",
            "app.group: needs app.user",
            "app.hooks.as_root: \"migrate\" is not a hook (one of before_block_traffic, before_install",
            "app.hooks.as_root: without app.user every hook runs as root already",
        ] {
            assert!(err.contains(says), "expected {says:?} in:\n{err}");
        }
        assert!(!err.contains("\"log/x\""), "log/x overlaps nothing: {err}");
        let err = load(&app("[[app.health]]\ntcp = \"127.0.0.1:1\"\nas_root = true")).expect_err("refused");
        assert!(err.contains("app.health[0].as_root: applies to exec probes only"), "{err}");
    }

    #[test]
    fn templates_and_environment_values_are_validated() {
        let text = GOOD
            .replace(
                "[tls]",
                "shared = [\"log\"]\nenv_file = \"config/app.env\"\n[[app.templates]]\ntemplate = \"config/app.yml.tmpl\"\npath = \"config/app.env\"\n[[app.templates]]\ntemplate = \"/etc/passwd\"\npath = \"log/x\"\nmode = 0o666\n\n[tls]",
            )
            .replace("[environments.prod]", "[environments.prod]\nvars = { \"db.host\" = \"x\" }\nenv = { \"1BAD\" = \"v\", OK = \"a\\nb\" }\nlabels = { web-9 = { zone = \"a\" }, web-1 = { \"bad key\" = \"b\" } }");
        let err = load(&text).expect_err("refused");
        for says in [
            "app.env_file: \"config/app.env\" is rendered twice",
            "app.templates[1].template: \"/etc/passwd\" must be a relative path inside the release",
            "app.templates[1]: \"log/x\" is in the shared path \"log\"",
            "app.templates[1].mode: 666 must be permission bits, not world-writable",
            "environments.prod.vars.db.host: \"vars.db.host\" is not a var name",
            "environments.prod.env.1BAD: is not an environment variable name",
            "environments.prod.env.OK: holds a newline",
            "environments.prod.labels.web-9: is not a host of the environment",
            "environments.prod.labels.web-1.bad key: \"labels:web-1:bad key\" is not a var name",
        ] {
            assert!(err.contains(says), "expected {says:?} in:\n{err}");
        }
        let err = load(&GOOD.replace("[environments.prod]", "[environments.prod]\nenv = { A = \"1\" }"))
            .expect_err("refused");
        assert!(err.contains("environments.prod.env: needs app.env_file"), "{err}");
    }

    const APPS: &str = r#"
[apps.api]
units = ["api.service"]
depends_on = ["db-migrate", "cache"]
hosts = ["web-1", "web-2"]

[apps.cache]
units = ["cache.service"]

[apps.db-migrate]
units = ["migrate.service"]
hosts = ["web-1"]

[tls]
ca = "ca.pem"
cert = "c.pem"
key = "c.key"

[environments.prod]
hosts = { web-1 = "10.0.0.11", web-2 = "10.0.0.12", web-3 = "10.0.0.13" }
"#;

    #[test]
    fn several_apps_go_in_dependency_order_each_on_its_hosts() {
        let c = load(APPS).expect("valid");
        assert_eq!(c.app_order().expect("order"), ["cache", "db-migrate", "api"]);
        assert_eq!(c.app.name, "cache", "the first in order until a command picks one");
        let api = c.for_app("api").expect("api");
        assert_eq!((api.app.name.as_str(), api.app.units.as_slice()), ("api", ["api.service".to_string()].as_slice()));
        let names = |v: &FleetConfig| v.hosts("prod").expect("hosts").into_iter().map(|h| h.name).collect::<Vec<_>>();
        assert_eq!(names(&api), ["web-1", "web-2"]);
        assert_eq!(names(&c.for_app("cache").expect("cache")), ["web-1", "web-2", "web-3"]);
        assert!(c.for_app("nope").is_none());
        // A single [app] is the one app.
        let single = load(GOOD).expect("valid");
        assert_eq!(single.apps.keys().collect::<Vec<_>>(), ["web"]);

        let cycle = APPS.replace("[apps.cache]\n", "[apps.cache]\ndepends_on = [\"api\"]\n");
        let err = load(&cycle).expect_err("cycle");
        assert!(err.contains("apps: depends_on goes round in a cycle: api → cache → api"), "{err}");
        let err = load(
            &APPS
                .replace("\"db-migrate\", \"cache\"", "\"db-migrate\", \"redis\"")
                .replace("hosts = [\"web-1\"]", "hosts = [\"web-9\"]"),
        )
        .expect_err("unknown");
        assert!(err.contains("apps.api.depends_on: \"redis\" is not an app of fleet.toml"), "{err}");
        assert!(err.contains("apps.db-migrate.hosts: \"web-9\" is not a host of any environment"), "{err}");
        let err = load(&format!("[app]\nname = \"web\"\n{APPS}")).expect_err("both");
        assert!(err.contains("app: declare either [app] or [apps.NAME] tables, not both"), "{err}");
        let err = load(&APPS.replace("units = [\"cache.service\"]", "units = [\"cache.service\"]\nkeep_releases = 1"))
            .expect_err("bad");
        assert!(err.contains("apps.cache.keep_releases: must be at least 2"), "{err}");
    }

    #[test]
    fn health_probes_are_validated() {
        let text = GOOD.replace(
            "[tls]",
            "keep_releases = 1\n[[app.health]]\nhttp = \"https://x/health\"\ntcp = \"x:1\"\n\n[[app.health]]\nexec = [\"true\"]\njson_field = \"status\"\nretries = 0\n\n[tls]",
        );
        let err = load(&text.replace("keep_releases = 1", "keep_releases = 1\nunit_action = \"bounce\""))
            .expect_err("must be refused");
        assert!(err.contains("app.keep_releases: must be at least 2"), "{err}");
        assert!(err.contains("app.unit_action: \"bounce\" is not one of restart, reload, reload-or-restart"), "{err}");
        assert!(err.contains("app.health[0]: set exactly one of http, tcp or exec"), "{err}");
        assert!(err.contains("app.health[0].http: \"https://x/health\" must be an http:// URL"), "{err}");
        assert!(err.contains("app.health[1]: json_field and json_value go together"), "{err}");
        assert!(err.contains("app.health[1].retries: must be at least 1"), "{err}");

        let ok = GOOD.replace(
            "[tls]",
            "[[app.health]]\nname = \"web\"\nhttp = \"http://127.0.0.1:8080/health\"\njson_field = \"status\"\njson_value = \"healthy\"\ninterval = \"500ms\"\n\n[tls]",
        );
        let c = load(&ok).expect("valid");
        let wire = c.app.health[0].to_wire(0);
        assert_eq!(wire.name, "web");
        assert_eq!((wire.interval_ms, wire.timeout_ms, wire.retries), (500, 2000, 10));
    }

    #[test]
    fn hook_paths_must_stay_inside_the_release() {
        let text = GOOD
            .replace("[tls]", "[app.hooks]\nvalidate = \"../../usr/bin/evil\"\nbefore_install = \"/bin/sh\"\n\n[tls]");
        let err = load(&text).expect_err("must be refused");
        assert!(err.contains("app.hooks.validate: \"../../usr/bin/evil\" must be a path inside the release"), "{err}");
        assert!(err.contains("app.hooks.before_install: \"/bin/sh\" must be a path inside the release"), "{err}");
        let ok = load(&GOOD.replace("[tls]", "[app.hooks]\nvalidate = \"hooks/validate\"\ntimeout = \"5s\"\n\n[tls]"))
            .expect("valid");
        assert_eq!(ok.app.hooks.to_wire().timeout_ms, 5000);
    }

    #[test]
    fn blue_green_groups_cover_every_host_once() {
        let with = |extra: &str| GOOD.trim_end().to_string() + "\nstrategy = \"blue-green\"\n" + extra + "\n";
        let ok =
            "switch = \"lb $FERRY_GROUP\"\ngroups = { blue = [\"web-1\", \"web-3\"], green = [\"web-2\", \"web-4\"] }";
        let c = load(&with(ok)).expect("valid");
        let e = &c.environments["prod"];
        assert_eq!(e.strategy, Strategy::BlueGreen);
        // No group live yet: the first goes first; hosts in inventory order (web-4 before web-3).
        assert_eq!(e.idle_group(None), Some(("blue".into(), vec!["web-1".into(), "web-3".into()])));
        assert_eq!(e.idle_group(Some("blue")).map(|g| g.0), Some("green".into()));
        assert_eq!(e.idle_group(Some("green")).map(|g| g.0), Some("blue".into()));
        assert_eq!(e.group_hosts("green"), ["web-2", "web-4"]);
        for (extra, want) in [
            ("groups = { blue = [\"web-1\"], green = [\"web-2\"] }", "environments.prod.switch: blue-green needs"),
            ("switch = \"x\"", "environments.prod.groups: blue-green needs two host groups"),
            (
                "switch = \"x\"\ngroups = { a = [\"web-1\", \"web-2\", \"web-3\", \"web-4\"] }",
                "exactly two groups, not 1",
            ),
            (
                "switch = \"x\"\ngroups = { a = [\"web-1\", \"web-2\"], b = [\"web-2\", \"web-3\", \"web-4\"] }",
                "environments.prod.groups.b: web-2 is already in group a",
            ),
            (
                "switch = \"x\"\ngroups = { a = [\"web-1\", \"db-1\"], b = [\"web-2\", \"web-3\", \"web-4\"] }",
                "names \"db-1\", which is not in hosts",
            ),
            ("switch = \"x\"\ngroups = { a = [\"web-1\"], b = [\"web-2\"] }", "not in one: web-4, web-3"),
            ("switch = \"x\"\ngroups = { a = [\"web-1\", \"web-2\"], b = [] }", "groups.b: has no hosts"),
        ] {
            let err = load(&with(extra)).expect_err(extra);
            assert!(err.contains(want), "{extra}: {err}");
        }
        let err = load(&(GOOD.trim_end().to_string() + "\nswitch = \"x\"\n")).expect_err("rolling with switch");
        assert!(err.contains("environments.prod.switch: does not apply to strategy \"rolling\""), "{err}");
    }

    #[test]
    fn strategy_keys_are_checked_per_environment() {
        let with = |extra: &str| GOOD.trim_end().to_string() + "\n" + extra + "\n";
        let c = load(&with("strategy = \"canary\"\nsteps = [1, \"50%\"]\npause = \"10m\"")).expect("valid");
        let s = c.environments["prod"].strategy.clone();
        assert_eq!(
            s,
            Strategy::Canary {
                steps: vec![Size::Count(1), Size::Percent(50)],
                pause: Pause::For(Duration::from_secs(600))
            }
        );
        assert_eq!(
            load(&with("batch = [1, \"25%\"]")).map(|c| Some(c.environments["prod"].strategy.clone())),
            Ok(Some(Strategy::Rolling { batch: vec![Size::Count(1), Size::Percent(25)] }))
        );
        for (extra, want) in [
            (
                "strategy = \"blue\"",
                "environments.prod.strategy: \"blue\" is not one of rolling, canary, all-at-once, blue-green",
            ),
            ("strategy = \"canary\"", "environments.prod.steps: a canary needs steps"),
            ("strategy = \"canary\"\nsteps = [3, 2]", "environments.prod.steps: are cumulative targets"),
            ("steps = [1]", "environments.prod.steps: does not apply to strategy \"rolling\""),
            ("strategy = \"all-at-once\"\nbatch = 2", "environments.prod.batch: does not apply"),
            ("batch = 0", "at least 1"),
            ("batch = \"150%\"", "percentage"),
            ("pause = \"soon\"", "manual"),
        ] {
            let err = load(&with(extra)).expect_err(extra);
            assert!(err.contains(want), "{extra}: {err}");
        }
    }

    /// The fleet.toml shown in README.md is a valid config (docs and code agree).
    #[test]
    fn readme_fleet_toml_parses() {
        let readme = include_str!("../../README.md");
        let start = readme.find("```toml\nconnect_timeout").expect("README shows a fleet.toml") + "```toml\n".len();
        let block = &readme[start..start + readme[start..].find("```").expect("block ends")];
        let c = load(block).expect("README's fleet.toml is valid");
        assert_eq!(c.app.health.len(), 1);
        assert_eq!(c.app.hooks.validate.as_deref(), Some("hooks/smoke_test"));
        assert_eq!(c.hosts("prod").expect("prod").len(), 2);
    }

    #[test]
    fn host_address_forms() {
        assert_eq!(parse_host_address("1.2.3.4"), Ok(("1.2.3.4".into(), 7443)));
        assert_eq!(parse_host_address("h:1"), Ok(("h".into(), 1)));
        assert_eq!(parse_host_address("::1"), Ok(("::1".into(), 7443)));
        assert_eq!(parse_host_address("[::1]:80"), Ok(("::1".into(), 80)));
        for bad in ["", "h:0", "h:x", "[::1", "[nope]:1", "a b:1", "h:1:2:x"] {
            assert!(parse_host_address(bad).is_err(), "{bad:?}");
        }
    }
}
