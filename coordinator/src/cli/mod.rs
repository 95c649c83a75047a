//! Command-line interface of `ferry`: flags, and the one place that chooses where a verb runs:
//! here ([`local`]) or on a `ferry serve` (`--server`, [`remote`]). Both render through the
//! output layer and exit with the codes of [`crate::exit`].
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use ferry_proto::identity::Role;
use tokio_util::sync::CancellationToken;

use crate::exit;
use crate::rollout::DeployReport;
use crate::state::DeploymentStatus;
use crate::ui::Format;

pub mod api_client;
mod local;
pub mod remote;

/// ferry: SSH-less rolling deployments for a fleet of Linux servers.
///
/// `ferry` talks to the `ferry-agent` on each host over mutually authenticated TLS. Start with
/// `ferry ca init` and `ferry cert issue` to give the fleet its certificates, describe the fleet
/// in a fleet.toml, check it with `ferry status`, then `ferry deploy` releases to it and `ferry
/// rollback` when needed. For pipelines, `ferry serve` runs the same engine behind an HTTPS API,
/// and `--server URL` sends the verbs to it.
///
/// Exit codes: 0 success; 1 the deployment failed (halted or rolled back); 2 usage or
/// configuration error; 3 a host could not be reached or authenticated.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, about, long_about)]
pub struct Cli {
    /// Log filter for diagnostics on stderr (tracing EnvFilter syntax), e.g. "debug".
    #[arg(long, global = true, default_value = "warn", env = "FERRY_LOG")]
    pub log: String,
    /// Diagnostics as text, or as JSON lines (each with the fields of its spans: deployment_id,
    /// environment, app, host, version) for log shippers.
    #[arg(long, global = true, value_enum, default_value = "text", env = "FERRY_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// deploy, rollback, resume and promote: write the environment's deployment metrics
    /// (Prometheus text format, atomically) to this file when the run starts and when it ends,
    /// e.g. for node_exporter's textfile collector. One file per environment.
    #[arg(long, global = true, value_name = "PATH", env = "FERRY_METRICS_FILE")]
    pub metrics_file: Option<PathBuf>,
    /// Send the verb to a running `ferry serve` at this URL (https://HOST:PORT) instead of running
    /// the engine here: deploy, rollback, promote, resume, status, history, report and `ferry
    /// pipeline`. Same output and exit codes. Without it, a verb for an environment with hosts
    /// that dial in goes to fleet.toml's [server] advertise by itself.
    #[arg(long, global = true, value_name = "URL", env = "FERRY_SERVER")]
    pub server: Option<String>,
    /// --server: the CA of the server's certificate (default: fleet.toml's [tls] ca, if there is one).
    #[arg(long, global = true, value_name = "PEM", env = "FERRY_SERVER_CA")]
    pub server_ca: Option<PathBuf>,
    /// --server: a bearer token (one of the server's [server] tokens). Prefer the environment
    /// variable: other users can read a process's arguments.
    #[arg(long, global = true, env = "FERRY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// --server: a client certificate (role coordinator or operator) instead of a token; default
    /// fleet.toml's [tls] cert when there is neither.
    #[arg(long, global = true, value_name = "PEM", env = "FERRY_CLIENT_CERT", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// --server: the key of --client-cert.
    #[arg(long, global = true, value_name = "PEM", env = "FERRY_CLIENT_KEY", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage the fleet's certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Issue and inspect agent and coordinator certificates.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Show every host of an environment: reachable or why not, agent, OS, resources, current
    /// release. Exits 3 if any host could not be reached or authenticated.
    Status(StatusArgs),
    /// Deploy an artifact (a directory, .tar, .tar.gz or .tar.zst) as VERSION to an environment,
    /// following its strategy (see `ferry plan`): every host first receives, in parallel, only the
    /// content it lacks and builds the release beside the current one; then, batch by batch, each
    /// host switches to it atomically, restarts the app's units and runs its hooks and health
    /// probes; a host that fails goes back to its previous release by itself. More than
    /// max_failures failed hosts halt the rollout (exit 1; exit 3 if a host could not be reached);
    /// with auto_rollback the updated hosts go back too. A canary with pause = "manual" stops
    /// after each step until `ferry promote`. blue-green deploys to the idle group, then runs
    /// `switch` to make it live (and switches back if that or `after_switch` fails). Ctrl-C
    /// finishes the batch in flight, then stops. Every step is recorded in the registry (`ferry
    /// history`). On a terminal, a live view shows each host's state, bytes and time.
    Deploy(DeployArgs),
    /// Switch an environment back, immediately (no transfer, no canary steps or pauses): if a
    /// deployment is unfinished (paused, or its coordinator died), the hosts it updated go back to
    /// what they ran before; otherwise every host goes to the release before its current one (or
    /// to `--to VERSION`), in batches of the strategy's first batch size. Hosts already there are
    /// untouched. A blue-green environment switches its idle group (still on the release the live
    /// one ran before) live again, touching no host.
    Rollback(RollbackArgs),
    /// Continue the environment's deployment whose coordinator died (killed, machine lost), from
    /// what the registry recorded: healthy hosts are left alone, the rest follow the plan.
    Resume(ResumeArgs),
    /// Continue a canary paused at a step (pause = "manual") with its next batch.
    Promote(ResumeArgs),
    /// Show what a deployment to an environment would do: strategy, batches and pauses. Contacts
    /// no host.
    Plan(EnvArgs),
    /// List recorded deployments and rollbacks, newest first.
    History(HistoryArgs),
    /// Per environment: deployments per week, success and rollback rates, mean and p95 duration,
    /// slowest hosts.
    Report(HistoryArgs),
    /// Run the coordinator as a daemon serving the pipeline API over HTTPS ([server] in
    /// fleet.toml): register versions, deploy them, run smoke tests, promote them through
    /// `promotion`, roll back; every call audited. The API is described at /api/openapi.json.
    /// SIGTERM or Ctrl-C stops it after the deployments in flight finish their current hosts.
    Serve {
        /// The fleet description.
        #[arg(long, short, default_value = "fleet.toml", env = "FERRY_CONFIG")]
        config: PathBuf,
    },
    /// Make bearer tokens for `ferry serve`.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Make the key pair that signs releases: agents with its public key in `[signing]
    /// trusted_keys` run only releases it signed.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Move the registry between backends.
    #[command(subcommand)]
    Registry(RegistryCommand),
    /// Pipeline steps on a running `ferry serve` (needs --server): register a version, smoke test
    /// a deployment, approve and promote it to the next environment, follow or cancel it.
    #[command(subcommand)]
    Pipeline(remote::PipelineCommand),
    /// Print a shell completion script for ferry, e.g. `ferry completions bash >
    /// /etc/bash_completion.d/ferry` (the Debian package installs them for bash, zsh and fish).
    Completions {
        /// The shell to complete in.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
pub struct ResumeArgs {
    /// The fleet description.
    #[arg(long, short, default_value = "fleet.toml", env = "FERRY_CONFIG")]
    pub config: PathBuf,
    /// Environment whose deployment to continue.
    #[arg(long, short)]
    pub env: String,
    /// The app whose deployment to continue, when fleet.toml declares several.
    #[arg(long)]
    pub app: Option<String>,
    /// Take over even if the deployment's coordinator seems alive (a warning names it).
    #[arg(long)]
    pub force_unlock: bool,
    /// Result format: human (live progress, then a table) or json (one object at the end).
    #[arg(long, value_enum, default_value = "human")]
    pub output: Format,
}

#[derive(Debug, Args)]
pub struct EnvArgs {
    /// The fleet description.
    #[arg(long, short, default_value = "fleet.toml", env = "FERRY_CONFIG")]
    pub config: PathBuf,
    /// Environment of fleet.toml.
    #[arg(long, short)]
    pub env: String,
    /// The app to plan (its hosts, its strategy), when fleet.toml declares several.
    #[arg(long)]
    pub app: Option<String>,
    /// Result format: human text or one JSON object.
    #[arg(long, value_enum, default_value = "human")]
    pub output: Format,
}

#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// The fleet description (names the registry).
    #[arg(long, short, default_value = "fleet.toml", env = "FERRY_CONFIG")]
    pub config: PathBuf,
    /// Only this environment.
    #[arg(long, short)]
    pub env: Option<String>,
    /// Only this app (fleet.toml's `[apps.NAME]`).
    #[arg(long)]
    pub app: Option<String>,
    /// At most this many deployments (history only).
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    /// history: one deployment in full instead: its hosts, metric gate measurements and every
    /// recorded event.
    #[arg(long, value_name = "ID")]
    pub deployment: Option<String>,
    /// Result format: human (a table) or json.
    #[arg(long, value_enum, default_value = "human")]
    pub output: Format,
}

#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The fleet description.
    #[arg(long, short, default_value = "fleet.toml", env = "FERRY_CONFIG")]
    pub config: PathBuf,
    /// Environment of fleet.toml to deploy to.
    #[arg(long, short)]
    pub env: String,
    /// Build output to deploy: a directory, or a .tar / .tar.gz / .tar.zst archive.
    #[arg(long, short, required_unless_present = "bundle", conflicts_with = "bundle")]
    pub artifact: Option<PathBuf>,
    /// The app to deploy, when fleet.toml declares several (`[apps.NAME]`).
    #[arg(long, conflicts_with = "bundle")]
    pub app: Option<String>,
    /// Deploy every app of fleet.toml from this directory (DIR/APP is each app's artifact), in
    /// dependency order (`depends_on`), each app healthy everywhere before the next starts. A
    /// failure halts the set; with the environment's auto_rollback the apps already updated go
    /// back, in reverse order.
    #[arg(long, value_name = "DIR")]
    pub bundle: Option<PathBuf>,
    /// Version label of this release (A-Z a-z 0-9 . _ + -), e.g. 1.4.0 or a git commit.
    #[arg(long, short)]
    pub version: String,
    /// Break another deployment's lock on the environment (a warning names it). Only when that
    /// deployment's coordinator is gone for good: two rollouts must never touch one environment.
    #[arg(long)]
    pub force_unlock: bool,
    /// Stage each batch just before activating it, instead of staging every host first. Slower
    /// (transfers no longer overlap activations); for hosts short of disk, or to compare.
    #[arg(long)]
    pub no_prestage: bool,
    /// Start although the environment is outside its deploy windows or in a freeze, for this
    /// stated reason (recorded with the deployment).
    #[arg(long, value_name = "REASON")]
    pub override_window: Option<String>,
    /// Result format: human (live progress, then a table) or json (one object at the end).
    #[arg(long, value_enum, default_value = "human")]
    pub output: Format,
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// The fleet description.
    #[arg(long, short, default_value = "fleet.toml", env = "FERRY_CONFIG")]
    pub config: PathBuf,
    /// Environment of fleet.toml to roll back.
    #[arg(long, short)]
    pub env: String,
    /// Version to return to (must still be kept on the hosts); default: each host's previous release.
    #[arg(long)]
    pub to: Option<String>,
    /// The app to roll back, when fleet.toml declares several.
    #[arg(long)]
    pub app: Option<String>,
    /// Break another deployment's lock on the environment (a warning names it).
    #[arg(long)]
    pub force_unlock: bool,
    /// Result format: human (live progress, then a table) or json (one object at the end).
    #[arg(long, value_enum, default_value = "human")]
    pub output: Format,
}

#[derive(Debug, Subcommand)]
pub enum RegistryCommand {
    /// Copy a SQLite registry's whole history (deployments, host steps, events, versions, smoke
    /// runs, approvals, measurements, live groups) into an empty PostgreSQL registry, in one
    /// transaction; then point fleet.toml's `registry` at the URL. Refused while an environment
    /// is locked (a deployment in progress or paused); the SQLite file is left as it was.
    Migrate {
        /// The SQLite registry file.
        #[arg(long)]
        from: PathBuf,
        /// The PostgreSQL registry: postgres://user@host[:port]/database[?sslmode=…].
        #[arg(long)]
        to: String,
        /// A file holding the database user's password (its first line; not readable by others).
        #[arg(long, value_name = "FILE")]
        to_password_file: Option<PathBuf>,
        /// The CA of the database server's certificate (PEM), for sslmode=verify-full.
        #[arg(long, value_name = "FILE")]
        to_ca: Option<PathBuf>,
        /// Result format: human-readable text, or one JSON object.
        #[arg(long, value_enum, default_value = "human")]
        output: Format,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Write a new ed25519 key pair: OUT/NAME.key (0600; fleet.toml's `[signing] key`, where
    /// `ferry` deploys) and OUT/NAME.pub (every agent.toml's `[signing] trusted_keys`).
    New {
        /// Names the key (in the files' names and in agents' refusals).
        #[arg(long)]
        name: String,
        /// Directory to write into (created if missing).
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// Replace an existing key of the same name (agents trusting only the old one then refuse
        /// new releases).
        #[arg(long)]
        force: bool,
        /// Result format: human-readable text, or one JSON object.
        #[arg(long, value_enum, default_value = "human")]
        output: Format,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Print a new random token, and the [[server.tokens]] lines (its SHA-256) for fleet.toml.
    /// Only the hash goes into the configuration; give the token to the pipeline as FERRY_TOKEN.
    New {
        /// Who the token is for; the API audits its calls as token:NAME.
        #[arg(long)]
        name: String,
        /// Result format: human-readable text, or one JSON object.
        #[arg(long, value_enum, default_value = "human")]
        output: Format,
    },
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create the fleet CA: DIR/ca.pem (give it to every host) and DIR/ca.key (mode 0600; keep it
    /// where you issue certificates, never on the hosts).
    Init {
        /// Directory to write ca.pem and ca.key into (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing CA key. Every certificate it signed stops being trusted.
        #[arg(long)]
        force: bool,
        /// Validity in days.
        #[arg(long, default_value_t = crate::pki::CA_VALIDITY_DAYS)]
        days: u32,
        /// Result format: human-readable text, or one JSON object.
        #[arg(long, value_enum, default_value = "human")]
        output: Format,
    },
}

#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Issue a certificate signed by the fleet CA: OUT/NAME.pem and OUT/NAME.key (0600), plus
    /// OUT/ca.pem so OUT is all a host needs.
    Issue {
        /// Directory holding ca.pem and ca.key (from `ferry ca init`).
        #[arg(long)]
        ca: PathBuf,
        /// The holder's name: for an agent, its name in fleet.toml's inventory.
        #[arg(long)]
        name: String,
        /// agent (serves ferry-agent), coordinator (runs ferry; also serves `ferry serve`'s API) or
        /// operator (a person or pipeline calling `ferry serve`'s API; agents refuse it).
        #[arg(long)]
        role: Role,
        /// Another name or IP address the holder is reached by (repeatable). An agent needs the
        /// address the coordinator dials, unless it dials the inventory name.
        #[arg(long = "san", value_name = "IP_OR_DNS")]
        sans: Vec<String>,
        /// Directory to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing key of the same name.
        #[arg(long)]
        force: bool,
        /// Validity in days.
        #[arg(long, default_value_t = crate::pki::CERT_VALIDITY_DAYS)]
        days: u32,
        /// Result format: human-readable text, or one JSON object.
        #[arg(long, value_enum, default_value = "human")]
        output: Format,
    },
    /// Re-issue a certificate before it expires, or under a new CA (rotation): same name, role
    /// and SANs, a new key. Replaces FILE and its key in place (key first); a running agent picks
    /// them up within seconds, or at once on `systemctl reload ferry-agent`.
    Renew {
        /// Directory holding ca.pem and ca.key of the CA to sign with.
        #[arg(long)]
        ca: PathBuf,
        /// The certificate to renew (PEM).
        file: PathBuf,
        /// Where its key goes (default: FILE with the extension .key).
        #[arg(long)]
        key: Option<PathBuf>,
        /// Validity in days.
        #[arg(long, default_value_t = crate::pki::CERT_VALIDITY_DAYS)]
        days: u32,
        /// Result format: human-readable text, or one JSON object.
        #[arg(long, value_enum, default_value = "human")]
        output: Format,
    },
    /// Print a certificate's subject, SANs, role, serial and validity.
    Show {
        /// PEM certificate file.
        file: PathBuf,
        /// Result format: human-readable text, or one JSON object.
        #[arg(long, value_enum, default_value = "human")]
        output: Format,
    },
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The fleet description.
    #[arg(long, short, default_value = "fleet.toml", env = "FERRY_CONFIG")]
    pub config: PathBuf,
    /// Environment of fleet.toml to query.
    #[arg(long, short)]
    pub env: String,
    /// Result format: human (a table, then the reasons of unreachable hosts) or json (one object).
    #[arg(long, value_enum, default_value = "human")]
    pub output: Format,
}

/// Prints `err` with its causes and returns `code`.
fn fail(code: u8, err: &anyhow::Error) -> u8 {
    eprintln!("ferry: error: {err:#}");
    code
}

/// Runs one command and returns the process exit code. `shutdown` is cancelled by the first
/// SIGINT or SIGTERM (`main` owns the signals): a rollout finishes its hosts in flight, then
/// stops; `ferry serve` stops taking calls and waits for its deployments to reach a safe point.
pub async fn run(cli: Cli, shutdown: CancellationToken) -> u8 {
    match cli.server.clone() {
        Some(url) if remote::handles(&cli.command) => remote::run(cli, url).await,
        _ => local::run(cli, &shutdown).await,
    }
}

impl Cli {
    /// Without `--server`, a verb for an environment with hosts that dial in goes to the `ferry
    /// serve` they connect to ([`remote::dial_in_server`]), and says so on stderr.
    pub fn route_dial_ins(&mut self) {
        if self.server.is_none()
            && remote::handles(&self.command)
            && let Some((url, why)) = remote::dial_in_server(&self.command)
        {
            eprintln!(
                "ferry: {why}: sending this to it at {url} (fleet.toml [server] advertise; --server URL to choose)"
            );
            self.server = Some(url);
        }
    }

    /// Whether the command stops in steps on a signal (first: finish the hosts in flight; second:
    /// at once): a rollout run here, and `ferry serve`. Every other verb, and a verb sent to a
    /// server, keeps the default: the first signal ends it.
    pub fn stops_in_steps(&self) -> bool {
        matches!(self.command, Command::Serve { .. })
            || (self.server.is_none() && local::rollout_target(&self.command).is_some())
    }
}

/// The exit code of a deployment's report.
fn deploy_exit(report: &DeployReport) -> u8 {
    match report.status {
        DeploymentStatus::Succeeded | DeploymentStatus::Paused => exit::SUCCESS,
        DeploymentStatus::Pending
        | DeploymentStatus::Running
        | DeploymentStatus::Failed
        | DeploymentStatus::RolledBack
        | DeploymentStatus::Cancelled => {
            if report.any_unreachable() {
                exit::UNREACHABLE
            } else {
                exit::FAILED
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        // clap's own checks (duplicate flags, bad defaults) run here rather than at a user's
        // first invocation of a subcommand.
        Cli::command().debug_assert();
    }

    #[test]
    fn completions_cover_every_verb_in_each_shell() {
        for shell in ["bash", "zsh", "fish"] {
            let cli = Cli::try_parse_from(["ferry", "completions", shell]).expect("parses");
            let Command::Completions { shell } = cli.command else { panic!("not the completions verb") };
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "ferry", &mut script);
            let script = String::from_utf8(script).expect("utf-8");
            for verb in ["deploy", "rollback", "status", "cert", "completions"] {
                assert!(script.contains(verb), "{shell} completion lacks {verb}");
            }
            // bash and zsh spell flags "--artifact", fish "-l artifact".
            let flag = if shell == clap_complete::Shell::Fish { "-l artifact" } else { "--artifact" };
            assert!(script.contains(flag), "{shell} completion lacks deploy's {flag}");
        }
        assert!(Cli::try_parse_from(["ferry", "completions", "tcsh"]).is_err());
    }

    #[test]
    fn deploy_takes_the_contract_flags() {
        let cli = Cli::try_parse_from([
            "ferry",
            "deploy",
            "--config",
            "f.toml",
            "--env",
            "prod",
            "--artifact",
            "./build",
            "--version",
            "1.4.0",
            "--output",
            "json",
        ])
        .expect("parses");
        match cli.command {
            Command::Deploy(a) => {
                assert_eq!((a.env.as_str(), a.version.as_str()), ("prod", "1.4.0"));
                assert_eq!(a.output, Format::Json);
            }
            other => panic!("parsed as {other:?}"),
        }
    }
}
