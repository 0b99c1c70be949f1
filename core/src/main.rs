//! `stagely`: parses arguments, sets up logging, and hands over to [`stagely_core::cli`].

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = stagely_core::cli::Cli::parse();
    // `run` prints its own progress; the service logs what it does.
    let default_filter = match cli.command {
        stagely_core::cli::Command::Serve(_) => {
            "warn,stagely_core=info,stagely_server=info,stagely_provisioning=info"
        }
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("stagely: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(stagely_core::cli::dispatch(cli)) {
        Ok(code) => std::process::ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(error) => {
            eprintln!("stagely: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
