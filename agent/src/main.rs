//! `ferry-agent --config /etc/ferry/agent.toml [--check | --configured]`, and
//! `ferry-agent audit tail [-n N] [--follow] [--output json]`.
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use ferry_agent::AgentConfig;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::prelude::*;

/// ferry's host agent: receives releases from the `ferry` coordinator over mutually authenticated
/// TLS gRPC and activates them. Normally started by systemd (ferry-agent.service).
#[derive(Parser)]
#[command(name = "ferry-agent", version, about, long_about = None)]
struct Cli {
    /// Agent configuration file.
    #[arg(long, short, global = true, default_value = ferry_agent::config::DEFAULT_CONFIG_PATH, env = "FERRY_AGENT_CONFIG")]
    config: PathBuf,
    /// Check the configuration and TLS files, then exit without serving.
    #[arg(long)]
    check: bool,
    /// Exit 0 if the config file sets anything, 1 if it is missing or only comments (the packaged
    /// template): the unit's ExecCondition, so an unconfigured host skips the agent instead of
    /// failing it. Whether the settings are valid is --check's job.
    #[arg(long, conflicts_with = "check")]
    configured: bool,
    /// Log filter (tracing EnvFilter syntax), e.g. "info" or "ferry_agent=debug".
    #[arg(long, default_value = "info", env = "FERRY_LOG")]
    log: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Read the audit log: one line per command a coordinator sent (who, what, result) and per
    /// connection refused.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(clap::Subcommand)]
enum AuditCommand {
    /// Print the newest records (reaching into rotated files), oldest first; --follow waits for
    /// more.
    Tail {
        /// How many records.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
        /// Keep printing records as they are written (across rotations) until interrupted.
        #[arg(long, short)]
        follow: bool,
        /// human (one line per record) or json (the records as written, one JSON object a line).
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// Read this log file instead of the one the config names.
        #[arg(long)]
        file: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Human,
    Json,
}

/// `ferry-agent audit tail`.
fn audit_tail(config: &Path, file: Option<PathBuf>, lines: usize, follow: bool, output: Output) -> ExitCode {
    let path = match file {
        Some(f) => f,
        None => match AgentConfig::load(config) {
            Ok(c) => c.audit_path(),
            Err(e) => {
                eprintln!("ferry-agent: {e}");
                return ExitCode::from(2);
            }
        },
    };
    let print = |line: &str| -> bool {
        use std::io::Write;
        let text = match output {
            Output::Json => line.to_string(),
            Output::Human => match serde_json::from_str::<ferry_agent::audit::Entry>(line) {
                // Records carry what peers sent (a refused certificate's name): shown escaped.
                Ok(e) => e.human(),
                Err(_) => format!("(unreadable record) {}", ferry_proto::text::printable(line)),
            },
        };
        // A closed stdout (`| head`) ends the command quietly.
        writeln!(std::io::stdout().lock(), "{text}").is_ok()
    };
    let fail = |e: std::io::Error| {
        eprintln!("ferry-agent: audit log {}: {e}", path.display());
        ExitCode::FAILURE
    };
    let mut follower = match follow.then(|| ferry_agent::audit::Follower::open(&path)).transpose() {
        Ok(f) => f,
        Err(e) => return fail(e),
    };
    match ferry_agent::audit::tail(&path, lines) {
        Ok(records) => {
            for r in &records {
                if !print(r) {
                    return ExitCode::SUCCESS;
                }
            }
        }
        Err(e) => return fail(e),
    }
    while let Some(f) = follower.as_mut() {
        match f.poll() {
            Ok(new) => {
                for r in &new {
                    if !print(r) {
                        return ExitCode::SUCCESS;
                    }
                }
            }
            Err(e) => return fail(e),
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    ExitCode::SUCCESS
}

fn init_logging(filter: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // systemd sets JOURNAL_STREAM when stdout/stderr go to the journal: log natively there, with
    // structured fields, instead of as plain text lines.
    let journald = std::env::var_os("JOURNAL_STREAM").and_then(|_| tracing_journald::layer().ok());
    let registry = tracing_subscriber::registry().with(filter);
    match journald {
        Some(layer) => registry.with(layer).init(),
        None => {
            // Colors only on a terminal: log files and pipes get plain text.
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
            registry.with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi)).init()
        }
    }
}

/// `--configured`: is there anything in the config file yet?
fn configured(path: &std::path::Path) -> ExitCode {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("ferry-agent: not configured yet: {} does not exist", path.display());
            return ExitCode::from(1);
        }
        // Unreadable: let --check say why, loudly.
        Err(_) => return ExitCode::SUCCESS,
    };
    match text.parse::<toml::Table>() {
        Ok(table) if table.is_empty() => {
            eprintln!(
                "ferry-agent: not configured yet: {} sets nothing (write listen, [tls] and [apps], put the \
                 certificates in place, then `systemctl start ferry-agent`)",
                path.display()
            );
            ExitCode::from(1)
        }
        // Settings, or a syntax error that --check reports with its line.
        _ => ExitCode::SUCCESS,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Audit(AuditCommand::Tail { lines, follow, output, file })) = cli.command {
        if cli.check || cli.configured {
            eprintln!("ferry-agent: --check and --configured do not go with `audit tail`");
            return ExitCode::from(2);
        }
        return audit_tail(&cli.config, file, lines, follow, output);
    }
    if cli.configured {
        return configured(&cli.config);
    }
    init_logging(&cli.log);
    // One crypto provider for the whole process, chosen before any TLS object exists.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let mut config = match AgentConfig::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferry-agent: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.check {
        if let Err(e) = config.load_trusted_keys() {
            eprintln!("ferry-agent: {}: {e}", cli.config.display());
            return ExitCode::from(2);
        }
        return match ferry_agent::tls::server_config(&config.tls) {
            Ok(_) => {
                eprintln!("ferry-agent: {} is valid", cli.config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ferry-agent: {}: {e}", cli.config.display());
                ExitCode::from(2)
            }
        };
    }

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ferry-agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        // Handlers are registered here, before READY=1 can be sent: a SIGTERM that follows
        // readiness at once must still mean a graceful stop, never the default kill.
        let (Ok(term), Ok(int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            eprintln!("ferry-agent: cannot install signal handlers");
            return ExitCode::FAILURE;
        };
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal(term, int).await;
            signals.cancel();
        });
        match ferry_agent::run(config, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e:#}");
                eprintln!("ferry-agent: {e:#}");
                ExitCode::FAILURE
            }
        }
    });
    // Work left on the blocking pool (a store operation that outlived the drain) must not keep
    // the process alive: the store is crash-safe, so ending it here is like a kill at that point.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    code
}

async fn wait_for_signal(mut term: Signal, mut int: Signal) {
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
