use std::process::ExitCode;

use clap::Parser;
use ferry_coordinator::{cli, exit};

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
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
    // One crypto provider for the whole process, chosen before any TLS object exists.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ferry: cannot start the async runtime: {e}");
            return ExitCode::from(exit::USAGE);
        }
    };
    ExitCode::from(runtime.block_on(cli::run(cli)))
}
