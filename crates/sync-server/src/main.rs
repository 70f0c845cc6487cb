use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use sync_server::cli::{self, Cli, Command};
use tracing_subscriber::EnvFilter;

/// Libraries that log message payloads at debug or trace level (WebSocket
/// frames, SQL parameters), which carry API keys and story content: capped
/// whatever `RUST_LOG` asks for, so neither ever reaches the log.
const PAYLOAD_LOGGERS: [&str; 3] = [
    "tungstenite=warn",
    "tokio_tungstenite=warn",
    "tokio_postgres=warn",
];

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Logs go to stderr (stdout carries the bound address and new keys);
    // RUST_LOG overrides the level.
    let default_level = match cli.command {
        Command::Serve(_) => "info",
        Command::Keys { .. } => "warn",
    };
    let mut filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    for directive in PAYLOAD_LOGGERS {
        if let Ok(directive) = directive.parse() {
            filter = filter.add_directive(directive);
        }
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
