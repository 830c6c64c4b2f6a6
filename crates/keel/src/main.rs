//! `keel`: a reverse proxy that puts Keel's guarantees (idempotency keys,
//! circuit breaking, draining) in front of any HTTP service.
//!
//! The binary is the command line only: parsing, exit codes, and one module
//! per command. The gateway itself is `keel-gateway` (and the crates it is
//! built from, `docs/ARCHITECTURE.md`); the admin client is `keel-admin`.

mod check;
mod demo;
mod demo_ws;
mod drain;
mod idempotency;
mod serve;
mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The keel gateway.
#[derive(Debug, Parser)]
#[command(
    name = "keel",
    version,
    about = "A reverse proxy that gives idempotency keys to any HTTP service"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway until SIGTERM or SIGINT, then drain and exit.
    Serve {
        /// Config file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file without starting anything.
    Check {
        /// Config file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print the gateway's status from its admin API.
    Status {
        /// Admin address, such as 127.0.0.1:9901.
        #[arg(long)]
        admin: String,
    },
    /// Drain the whole gateway, or one upstream endpoint, showing progress.
    Drain {
        /// Admin address, such as 127.0.0.1:9901.
        #[arg(long)]
        admin: String,
        /// Drain one endpoint of this upstream (blue/green) instead of the gateway.
        #[arg(long, requires = "endpoint")]
        upstream: Option<String>,
        /// The endpoint URL, as configured.
        #[arg(long, requires = "upstream")]
        endpoint: Option<String>,
        /// Put the endpoint back in service instead.
        #[arg(long, requires = "endpoint")]
        resume: bool,
    },
    /// Show what the idempotency store holds for one client key, or release
    /// a key locked as "outcome unknown" once you have reconciled it.
    Idempotency {
        /// Admin address, such as 127.0.0.1:9901.
        #[arg(long)]
        admin: String,
        /// The idempotent route's name (or path_prefix when it has none).
        #[arg(long)]
        route: String,
        /// The client's Idempotency-Key value.
        #[arg(long)]
        key: String,
        /// The request path (default: the route's path_prefix).
        #[arg(long)]
        path: Option<String>,
        /// The request method.
        #[arg(long, default_value = "POST")]
        method: String,
        /// The raw value of the route's tenant header (Authorization by
        /// default) the request carried.
        #[arg(long)]
        tenant: Option<String>,
        /// Remove the key's record so the next request with it runs.
        #[arg(long)]
        release: bool,
    },
    /// Start the gateway in front of a built-in sample API and print what to try.
    Demo {
        /// Data-plane address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Admin address.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: String,
    },
}

const EXIT_RUNTIME: u8 = 1;
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check::run(&config),
        Command::Serve { config } => serve::run(&config),
        Command::Status { admin } => run_async(1, status::run(admin)),
        Command::Drain {
            admin,
            upstream,
            endpoint,
            resume,
        } => {
            let target = match (upstream, endpoint) {
                (Some(upstream), Some(endpoint)) => drain::Target::Endpoint {
                    upstream,
                    endpoint,
                    resume,
                },
                _ => drain::Target::Gateway,
            };
            let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
            run_async(1, async move { Ok(drain::run(&admin, target, tty).await?) })
        }
        Command::Idempotency {
            admin,
            route,
            key,
            path,
            method,
            tenant,
            release,
        } => {
            let query = keel_admin::KeyQuery {
                route,
                key,
                path,
                method: Some(method),
                tenant,
            };
            run_async(1, idempotency::run(admin, query, release))
        }
        Command::Demo { listen, admin } => run_async(0, demo::run(listen, admin)),
    }
}

/// Prints each config error (`FILE:LINE:COL: message`); exit code 2.
fn report_config_errors(errors: &[keel_config::ConfigError]) -> ExitCode {
    for error in errors {
        eprintln!("{error}");
    }
    ExitCode::from(EXIT_CONFIG)
}

/// Runs `body` on a tokio runtime; errors print and exit 1.
fn run_async<F>(workers: usize, body: F) -> ExitCode
where
    F: Future<Output = Result<(), Box<dyn std::error::Error>>>,
{
    // One worker: a current-thread runtime, which skips the work-stealing
    // scheduler's cross-thread bookkeeping (the same shape as one nginx worker).
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    builder.enable_all();
    if workers > 1 {
        builder.worker_threads(workers);
    }
    let runtime = match builder.build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("keel: cannot start the runtime: {error}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    match runtime.block_on(body) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("keel: {error}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}
