//! `stagely-agent`: started on a builder VM by cloud-init, serves exactly one job and exits.
//!
//! `main` only parses arguments and sets up logging; the work is in [`stagely_agent::run`].

use std::path::PathBuf;

use clap::Parser;

/// Stagely build agent: dials the core, runs one BUILD or MERGE, reports, exits.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The agent's config file (written by cloud-init).
    #[arg(
        long,
        default_value = "/etc/stagely/agent.toml",
        env = "STAGELY_AGENT_CONFIG"
    )]
    config: PathBuf,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    // One thread: the agent's tasks (pipe readers, the spool, the connection's writer) hand
    // each batch of output from one to the next, and across threads every hand-over woke
    // another one (a futex and a context switch); on a builder VM the build wants the cores.
    // Measured: a quarter less agent CPU per 200 MiB of output (BENCHMARKS.md, log volume).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("stagely-agent: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(stagely_agent::run(&args.config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
