//! Command-line interface of `ferry`: flags, dispatch to the verbs, exit codes.
use std::path::PathBuf;

use clap::{Args, CommandFactory, Parser, Subcommand};
use ferry_proto::identity::Role;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::commands;
use crate::commands::rollout;
use crate::config::FleetConfig;
use crate::exit;
use crate::registry::Registry;
use crate::tls::ClientTls;
use crate::ui::{self, Format};

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
    /// pipeline`. Same output and exit codes.
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
    /// Pipeline steps on a running `ferry serve` (needs --server): register a version, smoke test
    /// a deployment, approve and promote it to the next environment, follow or cancel it.
    #[command(subcommand)]
    Pipeline(crate::cli_remote::PipelineCommand),
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
    /// At most this many deployments (history only).
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
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
    #[arg(long, short)]
    pub artifact: PathBuf,
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
    /// Break another deployment's lock on the environment (a warning names it).
    #[arg(long)]
    pub force_unlock: bool,
    /// Result format: human (live progress, then a table) or json (one object at the end).
    #[arg(long, value_enum, default_value = "human")]
    pub output: Format,
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
    /// Print a certificate's subject, SANs, role and validity.
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

pub(crate) fn fail(code: u8, err: &anyhow::Error) -> u8 {
    eprintln!("ferry: error: {err:#}");
    code
}

/// Runs one command and returns the process exit code. A rollout command runs in a span naming
/// it, its environment and the app, and writes `--metrics-file` when it starts and ends.
pub async fn run(cli: Cli) -> u8 {
    use tracing::Instrument;
    if let Some(url) = cli.server.clone() {
        return crate::cli_remote::run(cli, url).await;
    }
    if let Command::Pipeline(_) = &cli.command {
        return fail(
            exit::USAGE,
            &anyhow::anyhow!("`ferry pipeline` talks to a running `ferry serve`: pass --server URL"),
        );
    }
    let Some((command, config, env)) = rollout_target(&cli.command) else {
        if let Some(path) = &cli.metrics_file {
            eprintln!(
                "ferry: warning: --metrics-file {} is written only by deploy, rollback, resume and promote",
                path.display()
            );
        }
        return run_command(cli.command).await;
    };
    let app = FleetConfig::load(&config).map(|c| c.app.name).unwrap_or_default();
    let span = tracing::info_span!("run", command, environment = env, app);
    let mut observed =
        crate::metrics::Run { command, environment: env.clone(), started: crate::metrics::now(), ended: None };
    write_metrics(cli.metrics_file.as_deref(), &config, &observed);
    let code = run_command(cli.command).instrument(span).await;
    observed.ended = Some((crate::metrics::now(), code));
    write_metrics(cli.metrics_file.as_deref(), &config, &observed);
    code
}

/// The verb, fleet.toml and environment of a rollout command.
fn rollout_target(command: &Command) -> Option<(&'static str, PathBuf, String)> {
    match command {
        Command::Deploy(a) => Some(("deploy", a.config.clone(), a.env.clone())),
        Command::Rollback(a) => Some(("rollback", a.config.clone(), a.env.clone())),
        Command::Resume(a) => Some(("resume", a.config.clone(), a.env.clone())),
        Command::Promote(a) => Some(("promote", a.config.clone(), a.env.clone())),
        _ => None,
    }
}

/// `--metrics-file`: a failure to write it is reported, never a reason to fail the rollout.
fn write_metrics(path: Option<&std::path::Path>, config: &std::path::Path, run: &crate::metrics::Run) {
    let Some(path) = path else { return };
    let written = FleetConfig::load(config)
        .map_err(anyhow::Error::from)
        .and_then(|c| open_registry(&c))
        .and_then(|r| r.into_inner().map_err(|_| anyhow::anyhow!("registry lock poisoned")))
        .and_then(|r| crate::metrics::write(path, &r, run));
    if let Err(e) = written {
        eprintln!("ferry: warning: cannot write the metrics file: {e:#}");
    }
}

async fn run_command(command: Command) -> u8 {
    match command {
        Command::Ca(CaCommand::Init { out, force, days, output }) => match commands::ca::init(&out, force, days) {
            Ok(o) => {
                ui::ca_init(&o, output);
                exit::SUCCESS
            }
            Err(e) => fail(exit::USAGE, &e),
        },
        Command::Cert(CertCommand::Issue { ca, name, role, sans, out, force, days, output }) => {
            match commands::cert::issue(&ca, &name, role, &sans, &out, force, days) {
                Ok(o) => {
                    ui::cert_issue(&o, output);
                    exit::SUCCESS
                }
                Err(e) => fail(exit::USAGE, &e),
            }
        }
        Command::Cert(CertCommand::Show { file, output }) => match commands::cert::show(&file) {
            Ok(c) => {
                ui::cert_show(&c, output);
                exit::SUCCESS
            }
            Err(e) => fail(exit::USAGE, &e),
        },
        Command::Status(args) => {
            let (config, tls) = match load(&args.config) {
                Ok(v) => v,
                Err(e) => return fail(exit::USAGE, &e),
            };
            match commands::status::run(&config, &args.env, &tls).await {
                Ok(report) => {
                    ui::status(&report, args.output);
                    if report.unreachable() > 0 { exit::UNREACHABLE } else { exit::SUCCESS }
                }
                Err(e) => fail(exit::USAGE, &e),
            }
        }
        Command::Deploy(args) => {
            let (config, tls) = match load(&args.config) {
                Ok(v) => v,
                Err(e) => return fail(exit::USAGE, &e),
            };
            if let Err(e) = ferry_proto::manifest::check_version(&args.version) {
                return fail(exit::USAGE, &anyhow::anyhow!("--version: {e}"));
            }
            if let Err(e) = config.hosts(&args.env) {
                return fail(exit::USAGE, &e.into());
            }
            let path = args.artifact.clone();
            let cache = config.cache_dir().map(crate::cache::Cache::new);
            let scan_cache = cache.clone();
            let scanned =
                tokio::task::spawn_blocking(move || crate::artifact::Artifact::scan(&path, scan_cache.as_ref())).await;
            let artifact = match scanned {
                Ok(Ok(a)) => std::sync::Arc::new(a),
                Ok(Err(e)) => return fail(exit::USAGE, &e.into()),
                Err(e) => return fail(exit::USAGE, &e.into()),
            };
            ui::deploy_start(&artifact, &args.version, &args.env, args.output);
            let registry = match open_registry(&config) {
                Ok(r) => r,
                Err(e) => return fail(exit::USAGE, &e),
            };
            let live = ui::progress(args.output);
            let ctx = rollout_ctx(&config, &args.env, &tls, &registry, live.as_deref(), args.force_unlock);
            let done = rollout::deploy(&ctx, artifact, &args.version, cache.as_ref(), !args.no_prestage).await;
            finish(done, live.as_deref(), args.output)
        }
        Command::Serve { config } => serve(&config).await,
        Command::Token(TokenCommand::New { name, output }) => match crate::server::auth::new_token() {
            Ok(token) => {
                ui::token(&name, &token, &crate::server::token_lines(&name, &token), output);
                exit::SUCCESS
            }
            Err(e) => fail(exit::USAGE, &e),
        },
        Command::Pipeline(_) => fail(exit::USAGE, &anyhow::anyhow!("`ferry pipeline` needs --server URL")),
        Command::Completions { shell } => {
            // Into a buffer first: clap_complete panics on a write error (a closed pipe, a full disk).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "ferry", &mut script);
            match std::io::Write::write_all(&mut std::io::stdout().lock(), &script) {
                Ok(()) => exit::SUCCESS,
                Err(e) => fail(exit::USAGE, &anyhow::anyhow!("writing the {shell} completion script: {e}")),
            }
        }
        Command::Rollback(args) => {
            let (config, tls, registry) = match load_with_registry(&args.config, &args.env) {
                Ok(v) => v,
                Err(e) => return fail(exit::USAGE, &e),
            };
            let live = ui::progress(args.output);
            let ctx = rollout_ctx(&config, &args.env, &tls, &registry, live.as_deref(), args.force_unlock);
            finish(rollout::rollback(&ctx, args.to.as_deref()).await, live.as_deref(), args.output)
        }
        Command::Resume(args) => resume(&args, false).await,
        Command::Promote(args) => resume(&args, true).await,
        Command::Plan(args) => {
            let config = match FleetConfig::load(&args.config) {
                Ok(c) => c,
                Err(e) => return fail(exit::USAGE, &e.into()),
            };
            match plan_view(&config, &args.env) {
                Ok(p) => {
                    ui::plan(&p, args.output);
                    exit::SUCCESS
                }
                Err(e) => fail(exit::USAGE, &e),
            }
        }
        Command::History(args) => match history_registry(&args.config) {
            Ok(reg) => match reg.history(args.env.as_deref(), args.limit) {
                Ok(rows) => {
                    ui::history(&rows, args.output);
                    exit::SUCCESS
                }
                Err(e) => fail(exit::USAGE, &e.into()),
            },
            Err(e) => fail(exit::USAGE, &e),
        },
        Command::Report(args) => match history_registry(&args.config) {
            Ok(reg) => match reg.report(args.env.as_deref()) {
                Ok(rows) => {
                    ui::report(&rows, args.output);
                    exit::SUCCESS
                }
                Err(e) => fail(exit::USAGE, &e.into()),
            },
            Err(e) => fail(exit::USAGE, &e),
        },
    }
}

/// `ferry serve`: exits 2 if it cannot start (configuration, TLS, address in use).
async fn serve(path: &std::path::Path) -> u8 {
    let (config, tls) = match load(path) {
        Ok(v) => v,
        Err(e) => return fail(exit::USAGE, &e),
    };
    let (app, envs) = (config.app.name.clone(), config.environments.len());
    let ready = move |addr: std::net::SocketAddr| {
        eprintln!(
            "ferry serve: listening on https://{addr} (app {app}, {envs} environments); API at /api/openapi.json"
        );
    };
    match crate::server::serve(config, tls, ready).await {
        Ok(()) => exit::SUCCESS,
        Err(e) => fail(exit::USAGE, &e.context(format!("ferry serve --config {}", path.display()))),
    }
}

/// `ferry resume` (a dead coordinator's deployment) or `ferry promote` (`paused_only`: a canary
/// waiting at a step).
async fn resume(args: &ResumeArgs, paused_only: bool) -> u8 {
    let (config, tls, registry) = match load_with_registry(&args.config, &args.env) {
        Ok(v) => v,
        Err(e) => return fail(exit::USAGE, &e),
    };
    let cache = config.cache_dir().map(crate::cache::Cache::new);
    let live = ui::progress(args.output);
    let ctx = rollout_ctx(&config, &args.env, &tls, &registry, live.as_deref(), args.force_unlock);
    finish(rollout::resume(&ctx, cache.as_ref(), paused_only).await, live.as_deref(), args.output)
}

fn rollout_ctx<'a>(
    config: &'a FleetConfig,
    env: &'a str,
    tls: &'a ClientTls,
    registry: &'a Mutex<Registry>,
    live: Option<&'a ui::Live>,
    force_unlock: bool,
) -> rollout::Ctx<'a> {
    let progress: &dyn crate::commands::deploy::Observer = match live {
        Some(live) => live,
        None => &ui::quiet,
    };
    rollout::Ctx { config, env, tls, registry, progress, cancel: cancel_on_signal(), force_unlock }
}

/// The registry fleet.toml names.
fn open_registry(config: &FleetConfig) -> anyhow::Result<Mutex<Registry>> {
    let path = config
        .registry_path()
        .ok_or_else(|| anyhow::anyhow!("no registry: set `registry` in fleet.toml (there is no HOME to default to)"))?;
    Ok(Mutex::new(Registry::open(&path)?))
}

fn load_with_registry(path: &std::path::Path, env: &str) -> anyhow::Result<(FleetConfig, ClientTls, Mutex<Registry>)> {
    let (config, tls) = load(path)?;
    config.hosts(env)?;
    let registry = open_registry(&config)?;
    Ok((config, tls, registry))
}

fn history_registry(path: &std::path::Path) -> anyhow::Result<Registry> {
    let config = FleetConfig::load(path)?;
    let reg = open_registry(&config)?;
    reg.into_inner().map_err(|_| anyhow::anyhow!("registry lock poisoned"))
}

fn plan_view(config: &FleetConfig, env: &str) -> anyhow::Result<ui::PlanView> {
    let mut hosts = config.hosts(env)?;
    let e = &config.environments[env];
    let strategy = e.strategy().map_err(|p| anyhow::anyhow!("environments.{env}: {}", p[0]))?;
    let (mut live_group, mut switch_to) = (None, None);
    if strategy == crate::plan::Strategy::BlueGreen {
        // The registry knows which group is live; without one yet, the first group goes first.
        let registry = config.registry_path().filter(|p| p.exists()).map(|p| Registry::open(&p)).transpose()?;
        live_group = registry.map(|r| r.live_group(env)).transpose()?.flatten().map(|(group, _)| group);
        if let Some((idle, members)) = e.idle_group(live_group.as_deref()) {
            hosts.retain(|h| members.contains(&h.name));
            switch_to = Some(idle);
        }
    }
    let batches = crate::plan::plan(&strategy, hosts.len())
        .into_iter()
        .map(|b| ui::PlanBatch {
            hosts: b.hosts.iter().map(|&i| hosts[i].name.clone()).collect(),
            pause_after: b.pause_after.map(String::from),
        })
        .collect();
    Ok(ui::PlanView {
        environment: env.to_string(),
        strategy: strategy.to_string(),
        max_failures: e.max_failures,
        auto_rollback: e.auto_rollback,
        batches,
        live_group,
        switch_to,
    })
}

/// A flag set by the first Ctrl-C or SIGTERM: the rollout finishes the batch in flight, then
/// stops and records `cancelled`. A second signal exits at once.
fn cancel_on_signal() -> &'static AtomicBool {
    tokio::spawn(async {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return,
        };
        for _ in 0..2 {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            if CANCEL.swap(true, Ordering::SeqCst) {
                eprintln!("ferry: stopping now; `ferry resume` or `ferry rollback` picks up from the registry");
                rollout::kill_hooks();
                std::process::exit(i32::from(exit::FAILED));
            }
            eprintln!("ferry: cancelling after the hosts in flight finish (press again to stop at once)");
        }
    });
    &CANCEL
}

static CANCEL: AtomicBool = AtomicBool::new(false);

fn finish(result: anyhow::Result<commands::deploy::DeployReport>, live: Option<&ui::Live>, format: Format) -> u8 {
    if let Some(live) = live {
        live.finish();
    }
    match result {
        Ok(report) => {
            ui::deploy_report(&report, format);
            deploy_exit(&report)
        }
        Err(e) => fail(exit::USAGE, &e),
    }
}

pub(crate) fn deploy_exit(report: &commands::deploy::DeployReport) -> u8 {
    use commands::deploy::DeploymentStatus;
    match report.status {
        DeploymentStatus::Succeeded | DeploymentStatus::Paused => exit::SUCCESS,
        _ if report.any_unreachable() => exit::UNREACHABLE,
        _ => exit::FAILED,
    }
}

/// Loads fleet.toml and the coordinator's TLS material it names.
pub(crate) fn load(path: &std::path::Path) -> anyhow::Result<(FleetConfig, ClientTls)> {
    let config = FleetConfig::load(path)?;
    let tls = ClientTls::load(&config.tls).map_err(|e| anyhow::anyhow!("{}: [tls]: {e}", path.display()))?;
    Ok((config, tls))
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
