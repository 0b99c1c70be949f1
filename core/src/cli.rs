//! The `stagely` command line: `serve`, `run`, `submit`, `status`, `logs`.
//!
//! `run` is the one-shot mode: an embedded core with the local provider builds a directory's
//! `stagely.yaml` end to end, shows progress per job, and prints a summary table (or JSON).

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

pub use crate::client::new_api_token;
use crate::client::*;
pub use crate::run::RunArgs;
use crate::run::{print_table, summarize};
use stagely_api::{LogPage, RunView};
use stagely_server::config::{CoreConfig, FileConfig, Overrides};
use stagely_server::server;

/// Stagely: container image builds for pull-request previews on ephemeral builder VMs.
#[derive(Debug, Parser)]
#[command(name = "stagely", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the core as a service.
    Serve(ServeArgs),
    /// Build a directory's stagely.yaml end to end with an embedded core and local builders.
    Run(RunArgs),
    /// Submit a workflow run to a running core.
    Submit(SubmitArgs),
    /// Show a workflow run and its jobs.
    Status(StatusArgs),
    /// Print a job's log.
    Logs(LogsArgs),
    /// Cancel a workflow run: its builds are stopped and its instances terminated.
    Cancel(CancelArgs),
    /// Make or hash API tokens for `[api.tokens]`.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Print a new random API token, then the `[api.tokens]` line that accepts it.
    New {
        /// The token's name in `[api.tokens]` (shown in the core's logs).
        #[arg(long, default_value = "operator")]
        name: String,
    },
    /// Read a token on standard input and print its SHA-256, for `[api.tokens]`.
    Hash,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Configuration file (TOML). Flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address to listen on (default 127.0.0.1:8080).
    #[arg(long)]
    pub listen: Option<String>,
    /// Where the SQLite database and local instances live (default ./stagely-data).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Registry images are pushed to, HOST[:PORT]. Credentials come from the config file or
    /// STAGELY_REGISTRY_USERNAME / STAGELY_REGISTRY_PASSWORD, never from flags.
    #[arg(long)]
    pub registry: Option<String>,
    /// PostgreSQL instead of SQLite: postgres://USER@HOST:PORT/DATABASE. A password goes in
    /// STAGELY_DATABASE_URL or the config file's database_url, never on the command line.
    #[arg(long)]
    pub database_url: Option<String>,
}

#[derive(Debug, Args)]
pub struct CoreArgs {
    /// Base URL of the core.
    #[arg(
        long,
        env = "STAGELY_CORE_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub core: String,
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub core: CoreArgs,
    /// Repository URL (or a path the core can read).
    #[arg(long)]
    pub repo: String,
    /// Full commit id.
    #[arg(long)]
    pub commit: String,
    #[arg(long, default_value = "main")]
    pub branch: String,
    #[arg(long, default_value = "local")]
    pub environment: String,
    /// stagely.yaml to send; default: the core reads it from the repository.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Directory of stagely.yaml inside the repository. A token for a private repository
    /// is read from STAGELY_CLONE_TOKEN (never a flag).
    #[arg(long)]
    pub config_dir: Option<String>,
    #[arg(long, default_value = "manual")]
    pub trigger: String,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub core: CoreArgs,
    pub run_id: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct CancelArgs {
    #[command(flatten)]
    pub core: CoreArgs,
    pub run_id: String,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    #[command(flatten)]
    pub core: CoreArgs,
    pub job_id: String,
    /// Keep printing new lines as they are stored until the job ends (Server-Sent Events,
    /// resumed after a dropped connection without losing or repeating a line).
    #[arg(long)]
    pub follow: bool,
    /// Write lines as stored, escape sequences included (for pipes). Without it, a terminal
    /// gets control characters shown escaped (`\x1b`, `^M`) and only plain colours.
    #[arg(long)]
    pub raw: bool,
}

/// Runs a parsed command; returns the process exit code.
pub async fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Serve(args) => serve(args).await.map(|()| 0),
        Command::Run(args) => crate::run::run(args).await,
        Command::Submit(args) => submit(args).await.map(|()| 0),
        Command::Status(args) => status(args).await,
        Command::Logs(args) => logs(args).await.map(|()| 0),
        Command::Cancel(args) => cancel(args).await.map(|()| 0),
        Command::Token(command) => token(command).map(|()| 0),
    }
}

fn token(command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::New { name } => {
            if !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                || name.is_empty()
            {
                bail!("--name must be letters, digits, `-` or `_`");
            }
            let token = new_api_token();
            println!("{token}");
            println!(
                "{name} = \"{}\"",
                hex::encode(stagely_server::config::hash_token(&token))
            );
        }
        TokenCommand::Hash => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("reading the token from standard input")?;
            let token = line.trim_end_matches(['\r', '\n']);
            if token.is_empty() {
                bail!("no token on standard input (echo \"$TOKEN\" | stagely token hash)");
            }
            println!("{}", hex::encode(stagely_server::config::hash_token(token)));
        }
    }
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let config = CoreConfig::resolve(
        file,
        Overrides {
            listen: args.listen,
            data_dir: args.data_dir,
            registry: args.registry,
            database_url: args.database_url,
            ..Overrides::default()
        },
    )?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let stop = CancellationToken::new();
    tokio::spawn(shutdown_signal(stop.clone()));
    server::run(listener, config, stop).await
}

async fn submit(args: SubmitArgs) -> anyhow::Result<()> {
    let stagely_yaml = match &args.file {
        Some(path) => Some(
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        ),
        None => None,
    };
    let response = api_client()?
        .post(format!("{}/api/v1/workflows", args.core.core))
        .json(&serde_json::json!({
            "repo_url": args.repo,
            "commit_hash": args.commit,
            "branch": args.branch,
            "environment_id": args.environment,
            "trigger": args.trigger,
            "stagely_yaml": stagely_yaml,
            "config_dir": args.config_dir,
            // From the environment only: a flag would show the token in the process list.
            "clone_token": std::env::var("STAGELY_CLONE_TOKEN").ok().filter(|t| !t.is_empty()),
        }))
        .send()
        .await?;
    if !response.status().is_success() {
        bail!("the core refused the run: {}", response.text().await?);
    }
    let view: RunView = response.json().await?;
    println!("{}", view.id);
    for job in &view.jobs {
        eprintln!("  {}  {}  {}", job.id, job.name, job.platform);
    }
    Ok(())
}

async fn cancel(args: CancelArgs) -> anyhow::Result<()> {
    let response = api_client()?
        .post(format!(
            "{}/api/v1/workflows/{}/cancel",
            args.core.core, args.run_id
        ))
        .send()
        .await?;
    if !response.status().is_success() {
        bail!("the core refused to cancel: {}", response.text().await?);
    }
    let view: RunView = response.json().await?;
    eprintln!(
        "cancelling run {}: its builds are being stopped and their instances terminated",
        view.id
    );
    Ok(())
}

async fn status(args: StatusArgs) -> anyhow::Result<i32> {
    let response = api_client()?
        .get(format!(
            "{}/api/v1/workflows/{}",
            args.core.core, args.run_id
        ))
        .send()
        .await?;
    if !response.status().is_success() {
        bail!("{}", response.text().await?);
    }
    let view: RunView = response.json().await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        print_table(&mut std::io::stdout().lock(), &summarize(&view, ""))?;
        for job in &view.jobs {
            println!("  {}  {}", job.id, job.name);
        }
    }
    Ok(match view.status.as_str() {
        "completed" => 0,
        "failed" | "cancelled" => 1,
        _ => 2,
    })
}

/// `--follow`: the job's Server-Sent Events stream, until its `end` event.
async fn follow_logs(args: &LogsArgs) -> anyhow::Result<()> {
    let client = api_client()?;
    let mut out = std::io::stdout();
    let screen = crate::terminal::Screen::stdout(args.raw);
    stream_job_lines(&client, &args.core.core, &args.job_id, |line| {
        let _ = out.write_all(screen.show(&line.line).as_bytes());
        if !line.line.ends_with('\n') && !line.continued {
            let _ = out.write_all(b"\n");
        }
        let _ = out.flush();
    })
    .await
}

async fn logs(args: LogsArgs) -> anyhow::Result<()> {
    if args.follow {
        return follow_logs(&args).await;
    }
    let client = api_client()?;
    let mut after = 0;
    let screen = crate::terminal::Screen::stdout(args.raw);
    let mut out = std::io::stdout().lock();
    loop {
        let response = client
            .get(format!(
                "{}/api/v1/jobs/{}/logs?after={after}&limit=5000",
                args.core.core, args.job_id
            ))
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("{}", response.text().await?);
        }
        let page: LogPage = response.json().await?;
        let empty = page.lines.is_empty();
        for line in &page.lines {
            out.write_all(screen.show(&line.line).as_bytes())?;
            // A piece of a cut line goes on in the next: the pieces print as one line.
            if !line.line.ends_with('\n') && !line.continued {
                out.write_all(b"\n")?;
            }
        }
        after = page.next_after;
        if empty {
            let finished = matches!(
                page.job_status.as_str(),
                "completed" | "failed" | "cancelled"
            );
            if !args.follow || finished {
                return Ok(());
            }
            out.flush()?;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}
