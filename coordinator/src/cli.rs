//! Command-line interface of `ferry`: flags, dispatch to the verbs, exit codes.
use std::path::PathBuf;

use clap::{Args, CommandFactory, Parser, Subcommand};
use ferry_proto::identity::Role;

use crate::commands;
use crate::config::FleetConfig;
use crate::exit;
use crate::tls::ClientTls;
use crate::ui::{self, Format};

/// ferry: SSH-less rolling deployments for a fleet of Linux servers.
///
/// `ferry` talks to the `ferry-agent` on each host over mutually authenticated TLS. Start with
/// `ferry ca init` and `ferry cert issue` to give the fleet its certificates, describe the fleet
/// in a fleet.toml, check it with `ferry status`, then `ferry deploy` releases to it and `ferry
/// rollback` when needed.
///
/// Exit codes: 0 success; 1 the deployment failed (halted or rolled back); 2 usage or
/// configuration error; 3 a host could not be reached or authenticated.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, about, long_about)]
pub struct Cli {
    /// Log filter for diagnostics on stderr (tracing EnvFilter syntax), e.g. "debug".
    #[arg(long, global = true, default_value = "warn", env = "FERRY_LOG")]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
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
    /// Deploy an artifact (a directory, .tar, .tar.gz or .tar.zst) as VERSION to every host of an
    /// environment, one host at a time: each host receives only the content it lacks, builds the
    /// release beside the current one, switches to it atomically, restarts the app's units and
    /// runs its hooks and health probes; a host that fails goes back to its previous release by
    /// itself. Halts at the first host that fails (exit 1; exit 3 if it could not be reached);
    /// later hosts are left untouched.
    Deploy(DeployArgs),
    /// Switch every host of an environment back to the release before its current one (or to
    /// `--to VERSION`), which is already on disk: no transfer. Hosts already there are untouched.
    Rollback(RollbackArgs),
    /// Print a shell completion script for ferry, e.g. `ferry completions bash >
    /// /etc/bash_completion.d/ferry` (the Debian package installs them for bash, zsh and fish).
    Completions {
        /// The shell to complete in.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
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
    /// Result format: human (live progress, then a table) or json (one object at the end).
    #[arg(long, value_enum, default_value = "human")]
    pub output: Format,
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
        /// agent (serves ferry-agent) or coordinator (runs ferry).
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

fn fail(code: u8, err: &anyhow::Error) -> u8 {
    eprintln!("ferry: error: {err:#}");
    code
}

/// Runs one command and returns the process exit code.
pub async fn run(cli: Cli) -> u8 {
    match cli.command {
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
            let scanned = tokio::task::spawn_blocking(move || crate::artifact::Artifact::scan(&path)).await;
            let artifact = match scanned {
                Ok(Ok(a)) => std::sync::Arc::new(a),
                Ok(Err(e)) => return fail(exit::USAGE, &e.into()),
                Err(e) => return fail(exit::USAGE, &e.into()),
            };
            ui::deploy_start(&artifact, &args.version, &args.env, args.output);
            let progress = ui::progress_printer(args.output);
            match commands::deploy::deploy(&config, &args.env, &tls, artifact, &args.version, &progress).await {
                Ok(report) => {
                    ui::deploy_report(&report, args.output);
                    deploy_exit(&report)
                }
                Err(e) => fail(exit::USAGE, &e),
            }
        }
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
            let (config, tls) = match load(&args.config) {
                Ok(v) => v,
                Err(e) => return fail(exit::USAGE, &e),
            };
            let progress = ui::progress_printer(args.output);
            match commands::deploy::rollback(&config, &args.env, &tls, args.to.as_deref(), &progress).await {
                Ok(report) => {
                    ui::deploy_report(&report, args.output);
                    deploy_exit(&report)
                }
                Err(e) => fail(exit::USAGE, &e),
            }
        }
    }
}

fn deploy_exit(report: &commands::deploy::DeployReport) -> u8 {
    use commands::deploy::DeploymentStatus;
    match report.status {
        DeploymentStatus::Succeeded => exit::SUCCESS,
        _ if report.any_unreachable() => exit::UNREACHABLE,
        _ => exit::FAILED,
    }
}

/// Loads fleet.toml and the coordinator's TLS material it names.
fn load(path: &std::path::Path) -> anyhow::Result<(FleetConfig, ClientTls)> {
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
