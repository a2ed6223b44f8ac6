//! The `kiln` binary: parses arguments and runs the server.

use clap::{Parser, Subcommand};
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

/// kiln: compiles, loads and serves Rust plugins, driven by the `plugins` table in PostgreSQL.
#[derive(Parser)]
#[command(name = "kiln", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(Box<kiln::Config>),
    /// Write a new plugin crate: a typed route, its unit tests, and what lets cargo and
    /// rust-analyzer work inside it.
    New {
        /// The plugin's name (1 to 64 of A-Z a-z 0-9 _ -, starting with a letter).
        name: String,
        /// Where to write it (default: ./NAME); it must not exist or be empty.
        dir: Option<std::path::PathBuf>,
        /// The kiln-types sources the crate is pointed at.
        #[arg(long, env = "KILN_TYPES_DIR", default_value = kiln::config::DEFAULT_TYPES_DIR)]
        types_dir: std::path::PathBuf,
    },
    /// Build a plugin crate as the server would, load it, and print what it would serve or why
    /// not (exit status 1).
    Check(kiln::cli::check::CheckArgs),
    #[command(flatten)]
    Remote(kiln::cli::remote::Remote),
}

fn main() -> ExitCode {
    // A plugin host process (process isolation) runs no async runtime and parses its own
    // arguments: it is started by kiln, not by people.
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("plugin-host") {
        return kiln::isolation::child::main(&args[2..]);
    }
    let cli = Cli::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Command::Serve(config) = &cli.command {
        // Plugins' blocking routes may hold `--blocking-calls` threads; the server's own blocking
        // work (host calls, event deliveries, builds, the docs) has the rest
        // (`config::BLOCKING_RESERVE`).
        runtime.max_blocking_threads(config.blocking_pool());
    }
    match runtime.enable_all().build() {
        Ok(runtime) => {
            let code = runtime.block_on(cli_main(cli));
            // The server has shut down; a blocking handler that hangs must not keep the process.
            runtime.shutdown_timeout(std::time::Duration::from_secs(10));
            code
        }
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn cli_main(cli: Cli) -> ExitCode {
    // The author's commands print their own report; the server logs.
    let level = if matches!(cli.command, Command::Serve(_)) { "info" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level)))
        .init();
    let result = match cli.command {
        Command::New { name, dir, types_dir } => {
            let dir = dir.unwrap_or_else(|| name.clone().into());
            return match kiln::cli::new::write_crate(&name, &dir, &types_dir) {
                Ok(_) => {
                    println!("wrote plugin {name} in {}", dir.display());
                    println!("  cd {} && cargo test      # its unit tests, through the test kit", dir.display());
                    println!("  kiln check {}            # build and load it as the server would", dir.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Remote(command) => return kiln::cli::remote::run(command).await,
        Command::Check(args) => {
            eprintln!("checking {} (a first build compiles its dependencies too)", args.dir.display());
            return match kiln::cli::check::check(&args).await {
                Ok(checked) => {
                    print!("{}", kiln::cli::check::report(&checked));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Serve(config) if config.supervise && std::env::var_os(kiln::supervisor::CHILD_ENV).is_none() => {
            return match kiln::supervisor::run(&config.data_dir.join("loading")).await {
                Ok(status) => exit_code(status),
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Serve(config) => kiln::run(*config).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The supervisor's exit code: the server's own, or 128 + the signal that killed it.
fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => ExitCode::from(code.clamp(0, 255) as u8),
        (None, Some(sig)) => ExitCode::from((128 + sig).clamp(0, 255) as u8),
        (None, None) => ExitCode::FAILURE,
    }
}
