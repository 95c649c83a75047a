//! `ferry`: parses the command line, sets up logging, TLS and the runtime, owns the signals, and
//! runs the command ([`cli::run`]).
use std::process::ExitCode;

use clap::Parser;
use ferry_coordinator::{cli, exit};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let mut cli = cli::Cli::parse();
    cli.route_dial_ins();
    let filter =
        tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    match cli.log_format {
        cli::LogFormat::Text => {
            tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init()
        }
        // One JSON object a line: the event's fields at the top level, its spans' fields under
        // "span" (the innermost) and "spans" (all, outermost first).
        cli::LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init(),
    }
    raise_open_files();
    // One crypto provider for the whole process, chosen before any TLS object exists.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ferry: cannot start the async runtime: {e}");
            return ExitCode::from(exit::USAGE);
        }
    };
    let serving = matches!(cli.command, cli::Command::Serve { .. });
    let stepped = cli.stops_in_steps();
    let code = runtime.block_on(async {
        let (shutdown, now) = (CancellationToken::new(), CancellationToken::new());
        if stepped {
            tokio::spawn(signals(shutdown.clone(), now.clone(), serving));
        }
        tokio::select! {
            code = cli::run(cli, shutdown) => code,
            // Dropping the command kills the coordinator hooks in flight (their process groups);
            // the registry says where each deployment stood.
            () = now.cancelled() => {
                if serving {
                    eprintln!("ferry: error: ferry serve: stopped at once by a second signal; deployments in flight are left for `resume` or `rollback`");
                    exit::USAGE
                } else {
                    exit::FAILED
                }
            }
        }
    });
    // Dropping the tasks still running (`ferry serve`'s jobs) kills their coordinator hooks'
    // process groups; a blocking scan is not waited for past the timeout.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    ExitCode::from(code)
}

/// Raises the soft limit on open files to the hard one: a deployment holds one connection per
/// host of a batch (all-at-once: every host), and a shell's usual soft limit of 1024 would fail
/// the hosts past it. Said at debug level; a limit that cannot be raised is left as it is.
fn raise_open_files() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return };
    if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!(from = soft, to = hard, "raised the open files limit"),
            Err(e) => tracing::debug!(soft, hard, error = %e, "cannot raise the open files limit"),
        }
    }
}

/// The first SIGINT or SIGTERM cancels `shutdown` (finish the hosts in flight, then stop); a
/// second cancels `now` (stop at once).
async fn signals(shutdown: CancellationToken, now: CancellationToken, serving: bool) {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else { return };
    for first in [true, false] {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        if first {
            if serving {
                eprintln!(
                    "ferry serve: stopping; deployments in flight finish their current hosts, then stop (signal again to stop at once)"
                );
            } else {
                eprintln!("ferry: cancelling after the hosts in flight finish (press again to stop at once)");
            }
            shutdown.cancel();
        } else {
            if !serving {
                eprintln!("ferry: stopping now; `ferry resume` or `ferry rollback` picks up from the registry");
            }
            now.cancel();
        }
    }
}
