//! The `stagely` command line: `serve`, `run`, `submit`, `status`, `logs`.
//!
//! `run` is the one-shot mode: an embedded core with the local provider builds a directory's
//! `stagely.yaml` end to end, shows progress per job, and prints a summary table (or JSON).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::registry::LocalRegistry;
use stagely_api::{JobView, LogPage, RunView};
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
pub struct RunArgs {
    /// Directory holding stagely.yaml, inside a git repository. Its HEAD commit is built.
    pub dir: PathBuf,
    /// Push to this registry, HOST[:PORT] (credentials from STAGELY_REGISTRY_USERNAME /
    /// STAGELY_REGISTRY_PASSWORD). Default: a throwaway local registry.
    #[arg(long)]
    pub registry: Option<String>,
    /// Print the summary as JSON on stdout (progress goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Environment id used in image names.
    #[arg(long, default_value = "local")]
    pub environment: String,
    /// Keep the database and instance logs here instead of a temporary directory.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Print every job's log lines as they are stored, each prefixed with its job's name
    /// (on stderr, with the progress; the summary stays on stdout).
    #[arg(long)]
    pub follow: bool,
    /// Write build output and error messages as stored, escape sequences included (for
    /// pipes). Without it, a terminal gets control characters shown escaped (`\x1b`, `^M`)
    /// and only plain colours.
    #[arg(long)]
    pub raw: bool,
    /// A `stagely.toml` for the embedded core (its `[scheduler]`, `[secrets]`, `[prices]`...);
    /// `listen`, `data_dir`, the registry and the API token stay `run`'s own.
    #[arg(long)]
    pub config: Option<PathBuf>,
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
        Command::Run(args) => run(args).await,
        Command::Submit(args) => submit(args).await.map(|()| 0),
        Command::Status(args) => status(args).await,
        Command::Logs(args) => logs(args).await.map(|()| 0),
        Command::Cancel(args) => cancel(args).await.map(|()| 0),
        Command::Token(command) => token(command).map(|()| 0),
    }
}

/// A new random API token.
pub fn new_api_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("stga_{}", hex::encode(bytes))
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

/// An HTTP client for the API that presents `STAGELY_API_TOKEN` (from the environment only:
/// a flag would show it in the process list) on every request.
pub fn api_client() -> anyhow::Result<reqwest::Client> {
    client_with_token(
        std::env::var("STAGELY_API_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
            .as_deref(),
    )
}

fn client_with_token(token: Option<&str>) -> anyhow::Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = token {
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
            .context("STAGELY_API_TOKEN holds characters that cannot go in an HTTP header")?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    Ok(reqwest::Client::builder()
        .default_headers(headers)
        .build()?)
}

async fn shutdown_signal(token: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    token.cancel();
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

/// Git facts about the directory `run` builds.
struct Checkout {
    top: PathBuf,
    commit: String,
    branch: String,
    prefix: String,
}

async fn git_text(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let output = stagely_server::source::child_command("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .await
        .context("running git")?;
    if !output.status.success() {
        bail!(
            "git {} in {}: {}",
            args.join(" "),
            dir.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

async fn inspect_checkout(dir: &Path) -> anyhow::Result<Checkout> {
    let dir = dir
        .canonicalize()
        .with_context(|| format!("{} does not exist", dir.display()))?;
    let top = PathBuf::from(
        git_text(&dir, &["rev-parse", "--show-toplevel"])
            .await
            .with_context(|| format!("{} is not inside a git repository", dir.display()))?,
    );
    let commit = git_text(&dir, &["rev-parse", "HEAD"]).await?;
    let branch = git_text(&dir, &["rev-parse", "--abbrev-ref", "HEAD"])
        .await
        .unwrap_or_else(|_| "HEAD".into());
    let prefix = dir
        .strip_prefix(&top)
        .unwrap_or(Path::new(""))
        .to_string_lossy()
        .into_owned();
    let dirty = git_text(&dir, &["status", "--porcelain", "--", "."]).await?;
    if !dirty.is_empty() {
        eprintln!(
            "warning: {} has uncommitted changes; Stagely builds commit {} as committed",
            dir.display(),
            &commit[..12.min(commit.len())]
        );
    }
    Ok(Checkout {
        top,
        commit,
        branch: if branch == "HEAD" {
            "detached".into()
        } else {
            branch
        },
        prefix,
    })
}

/// One row of `run`'s summary.
#[derive(Debug, Serialize)]
pub struct JobSummary {
    pub name: String,
    pub status: String,
    pub architecture: String,
    pub platform: String,
    pub image: Option<String>,
    pub digest: Option<String>,
    pub exit_code: Option<i32>,
    pub duration_ms: Option<i64>,
    pub error: Option<String>,
}

/// `run --json` output.
#[derive(Debug, Serialize)]
pub struct RunSummary {
    pub run_id: String,
    pub status: String,
    pub registry: String,
    pub jobs: Vec<JobSummary>,
}

fn summarize(view: &RunView, registry: &str) -> RunSummary {
    RunSummary {
        run_id: view.id.clone(),
        status: view.status.clone(),
        registry: registry.to_string(),
        jobs: view
            .jobs
            .iter()
            .map(|job| JobSummary {
                name: job.name.clone(),
                status: job.status.clone(),
                architecture: job.architecture.clone(),
                platform: job.platform.clone(),
                image: job.artifact_url.clone(),
                digest: job.digest.clone(),
                exit_code: job.exit_code,
                duration_ms: duration_ms(job),
                error: job.error_message.clone(),
            })
            .collect(),
    }
}

fn duration_ms(job: &JobView) -> Option<i64> {
    Some(job.completed_at? - job.created_at)
}

fn format_duration(ms: Option<i64>) -> String {
    match ms {
        Some(ms) if ms >= 60_000 => format!("{}m{:02}s", ms / 60_000, (ms % 60_000) / 1000),
        Some(ms) => format!("{:.1}s", ms as f64 / 1000.0),
        None => "-".into(),
    }
}

fn print_table(out: &mut impl Write, summary: &RunSummary) -> std::io::Result<()> {
    let rows: Vec<[String; 5]> = summary
        .jobs
        .iter()
        .map(|job| {
            [
                job.name.clone(),
                job.status.clone(),
                format_duration(job.duration_ms),
                job.image.clone().unwrap_or_else(|| "-".into()),
                job.digest.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let headers = ["JOB", "STATUS", "DURATION", "IMAGE", "DIGEST"];
    let mut widths = headers.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let line = |cells: [&str; 5]| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i == 4 {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        text
    };
    writeln!(out, "{}", line(headers))?;
    for row in &rows {
        writeln!(
            out,
            "{}",
            line([&row[0], &row[1], &row[2], &row[3], &row[4]])
        )?;
    }
    writeln!(out, "run {} {}", summary.run_id, summary.status)
}

async fn run(args: RunArgs) -> anyhow::Result<i32> {
    let checkout = inspect_checkout(&args.dir).await?;
    let config_path = args.dir.join("stagely.yaml");
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    // Refuse a bad file before anything starts.
    stagely_server::stagely_yaml::parse(&text, &checkout.prefix)?;

    let progress_to_stderr = args.json;
    // Progress carries what builds and the core said (error messages, log tails).
    let progress_screen = if progress_to_stderr {
        crate::terminal::Screen::stderr(args.raw)
    } else {
        crate::terminal::Screen::stdout(args.raw)
    };
    let say = move |line: String| {
        let line = progress_screen.show(&line);
        if progress_to_stderr {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    };

    let mut throwaway: Option<LocalRegistry> = None;
    let registry_host = match &args.registry {
        Some(host) => host.clone(),
        None => {
            let registry = LocalRegistry::start().await?;
            say(format!(
                "registry: throwaway Distribution registry at {} (stops when this command exits)",
                registry.host
            ));
            let host = registry.host.clone();
            throwaway = Some(registry);
            host
        }
    };
    let temp_data;
    let data_dir = match &args.data_dir {
        Some(dir) => dir.clone(),
        None => {
            temp_data = tempfile::Builder::new().prefix("stagely-run-").tempdir()?;
            temp_data.path().to_path_buf()
        }
    };
    let mut file = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    if let Some(registry) = &throwaway {
        file.registry.username = Some(registry.username.clone());
        file.registry.password = Some(registry.password.clone());
    }
    // The embedded core accepts only this process's own token, and local repositories (it
    // builds the directory it was pointed at).
    let api_token = new_api_token();
    let config = CoreConfig::resolve(
        file,
        Overrides {
            listen: Some("127.0.0.1:0".into()),
            data_dir: Some(data_dir),
            registry: Some(registry_host.clone()),
            public_url: None,
            allow_local_repos: Some(true),
            api_token: Some(stagely_server::config::ApiToken::from_secret(
                "stagely run",
                &api_token,
            )),
            database_url: None,
        },
    )?;
    // `stagely run` is self-contained: its own SQLite, whatever STAGELY_DATABASE_URL says.
    let mut config = config;
    config.database_url = None;
    let client = client_with_token(Some(&api_token))?;
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let provider = server::local_provider(&config)?;
    let core = server::start(config, listener, provider).await?;
    say(format!(
        "core: {} building {} at {} ({})",
        core.url(),
        checkout.top.display(),
        &checkout.commit[..12.min(checkout.commit.len())],
        checkout.branch
    ));

    let stop = CancellationToken::new();
    tokio::spawn(shutdown_signal(stop.clone()));
    let outcome = drive_run(
        &client,
        &core.url(),
        RunRequest {
            checkout: &checkout,
            text: &text,
            environment: &args.environment,
            follow: args.follow,
            raw: args.raw,
        },
        &stop,
        &say,
    )
    .await;
    core.stop().await;
    if let Some(registry) = throwaway {
        registry.stop().await;
    }
    let view = outcome?;
    let summary = summarize(&view, &registry_host);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_table(&mut std::io::stdout().lock(), &summary)?;
    }
    Ok(if view.status == "completed" { 0 } else { 1 })
}

/// What `stagely run` submits, and whether it follows the logs.
struct RunRequest<'a> {
    checkout: &'a Checkout,
    text: &'a str,
    environment: &'a str,
    follow: bool,
    /// `--raw`: build output written as stored.
    raw: bool,
}

async fn drive_run(
    client: &reqwest::Client,
    core_url: &str,
    request: RunRequest<'_>,
    stop: &CancellationToken,
    say: &impl Fn(String),
) -> anyhow::Result<RunView> {
    let RunRequest {
        checkout,
        text,
        environment,
        follow,
        raw,
    } = request;
    let response = client
        .post(format!("{core_url}/api/v1/workflows"))
        .json(&serde_json::json!({
            "repo_url": checkout.top.to_string_lossy(),
            "commit_hash": checkout.commit,
            "branch": checkout.branch,
            "environment_id": environment,
            "trigger": "manual",
            "stagely_yaml": text,
            "config_dir": checkout.prefix,
        }))
        .send()
        .await?;
    if !response.status().is_success() {
        bail!("the core refused the run: {}", response.text().await?);
    }
    let view: RunView = response.json().await?;
    say(format!("run {}: {} job(s)", view.id, view.jobs.len()));
    // `--follow`: one stream per job, lines interleaved as they come, prefixed by job name.
    let width = view
        .jobs
        .iter()
        .map(|job| job.name.len())
        .max()
        .unwrap_or(0);
    let screen = crate::terminal::Screen::stderr(raw);
    let followers: Vec<tokio::task::JoinHandle<()>> = if follow {
        view.jobs
            .iter()
            .map(|job| {
                let (client, url, id) = (client.clone(), core_url.to_string(), job.id.clone());
                let prefix = format!("{:<width$} | ", job.name);
                tokio::spawn(async move {
                    // A cut line's pieces print as the one line they are: one prefix.
                    let mut mid_line = false;
                    let _ = stream_job_lines(&client, &url, &id, |line| {
                        let mut err = std::io::stderr().lock();
                        let prefix = if mid_line { "" } else { prefix.as_str() };
                        let _ = write!(err, "{prefix}{}", screen.show(&line.line));
                        mid_line = line.continued;
                        if !line.line.ends_with('\n') && !line.continued {
                            let _ = writeln!(err);
                        }
                    })
                    .await;
                })
            })
            .collect()
    } else {
        Vec::new()
    };
    let view = watch_run(client, core_url, view, stop, say).await;
    // Each stream ends at its job's end event; the last lines are printed before the summary.
    for follower in followers {
        let _ = tokio::time::timeout(Duration::from_secs(10), follower).await;
    }
    view
}

/// Follows a run to its end through its event stream (`GET /api/v1/workflows/{id}/events`),
/// printing each job's status as it changes; reconnects when the stream drops (each stream
/// starts with the current view, so no end is missed).
async fn watch_run(
    client: &reqwest::Client,
    core_url: &str,
    mut view: RunView,
    stop: &CancellationToken,
    say: &impl Fn(String),
) -> anyhow::Result<RunView> {
    let started = Instant::now();
    let mut seen: HashMap<String, String> = HashMap::new();
    report_jobs(client, core_url, &view, &mut seen, started, say).await;
    if stagely_api::is_final(&view.status) {
        return Ok(view);
    }
    let url = format!("{core_url}/api/v1/workflows/{}/events", view.id);
    let interrupted = || anyhow::anyhow!("interrupted; instances were terminated");
    let mut failures = 0u32;
    loop {
        let opened = tokio::select! {
            opened = open_stream(client.get(&url), &mut failures) => opened?,
            () = stop.cancelled() => return Err(interrupted()),
        };
        let Some(mut response) = opened else { continue };
        let mut events = SseEvents::default();
        loop {
            let chunk = tokio::select! {
                chunk = response.chunk() => chunk,
                () = stop.cancelled() => return Err(interrupted()),
            };
            // A dropped stream is dialled again.
            let Ok(Some(chunk)) = chunk else { break };
            events.feed(&chunk);
            while let Some((event, data)) = events.next_event()? {
                match event.as_str() {
                    "run" => {
                        view = serde_json::from_str(&data)?;
                        report_jobs(client, core_url, &view, &mut seen, started, say).await;
                    }
                    "end" => return Ok(view),
                    _ => {}
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Prints each job whose status changed since `seen` (with the tail of a failed job's log).
async fn report_jobs(
    client: &reqwest::Client,
    core_url: &str,
    view: &RunView,
    seen: &mut HashMap<String, String>,
    started: Instant,
    say: &impl Fn(String),
) {
    for job in &view.jobs {
        if seen.get(&job.id) == Some(&job.status) {
            continue;
        }
        seen.insert(job.id.clone(), job.status.clone());
        let detail = match job.status.as_str() {
            "provisioning" => job
                .vm_id
                .as_ref()
                .map(|vm| format!("instance {vm}"))
                .unwrap_or_default(),
            "completed" => format!(
                "{}@{}",
                job.artifact_url.as_deref().unwrap_or("-"),
                job.digest.as_deref().unwrap_or("-")
            ),
            "failed" | "cancelled" => job.error_message.clone().unwrap_or_default(),
            _ => String::new(),
        };
        say(format!(
            "[{:>6.1}s] {:<20} {:<12} {}",
            started.elapsed().as_secs_f64(),
            job.name,
            job.status,
            detail
        ));
        if job.status == "failed" {
            for line in tail_lines(client, core_url, &job.id, 15).await {
                say(format!("    | {}", line.trim_end()));
            }
        }
    }
}

/// Server-Sent Events cut from a response body as its chunks arrive: `(event, data)` pairs
/// (`message` when an event names no type). Bounded: an event over 4 MiB is an error.
#[derive(Default)]
struct SseEvents {
    buffer: Vec<u8>,
}

impl SseEvents {
    const MAX_EVENT_BYTES: usize = 4 * 1024 * 1024;

    fn feed(&mut self, chunk: &[u8]) {
        self.buffer.extend_from_slice(chunk);
    }

    /// The next whole event fed, if any.
    fn next_event(&mut self) -> anyhow::Result<Option<(String, String)>> {
        let Some(at) = self.buffer.windows(2).position(|w| w == b"\n\n") else {
            // A single event is bounded by the server's frame limits; refuse a runaway one.
            if self.buffer.len() > Self::MAX_EVENT_BYTES {
                bail!("the event stream sent an event over 4 MiB");
            }
            return Ok(None);
        };
        let block: Vec<u8> = self.buffer.drain(..at + 2).collect();
        let block = String::from_utf8_lossy(&block);
        let mut event = "message".to_string();
        let mut data = String::new();
        for field in block.lines() {
            if let Some(value) = field.strip_prefix("event:") {
                event = value.trim().to_string();
            } else if let Some(value) = field.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(value.strip_prefix(' ').unwrap_or(value));
            }
        }
        Ok(Some((event, data)))
    }
}

/// The last `count` lines of a job's log, read page by page (never the whole log at once).
async fn tail_lines(
    client: &reqwest::Client,
    core: &str,
    job_id: &str,
    count: usize,
) -> Vec<String> {
    let mut tail = std::collections::VecDeque::with_capacity(count);
    let mut after = 0;
    loop {
        let page: LogPage = match client
            .get(format!(
                "{core}/api/v1/jobs/{job_id}/logs?after={after}&limit=5000"
            ))
            .send()
            .await
            .and_then(|r| r.error_for_status())
        {
            Ok(response) => match response.json().await {
                Ok(page) => page,
                Err(_) => break,
            },
            Err(_) => break,
        };
        if page.lines.is_empty() {
            break;
        }
        after = page.next_after;
        for line in page.lines {
            if tail.len() == count {
                tail.pop_front();
            }
            tail.push_back(line.line);
        }
    }
    tail.into_iter().collect()
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

/// Hands every line of a job's log to `on_line` as it is stored, from its first to its
/// `end` event, resuming with `Last-Event-ID` when the connection drops (no line is lost or
/// repeated).
async fn stream_job_lines(
    client: &reqwest::Client,
    core_url: &str,
    job_id: &str,
    mut on_line: impl FnMut(&stagely_api::LogLineView),
) -> anyhow::Result<()> {
    let url = format!("{core_url}/api/v1/jobs/{job_id}/logs/stream");
    let mut last: Option<i64> = None;
    let mut failures = 0u32;
    loop {
        let mut request = client.get(&url);
        if let Some(seq) = last {
            request = request.header("Last-Event-ID", seq.to_string());
        }
        let Some(response) = open_stream(request, &mut failures).await? else {
            continue;
        };
        match read_events(response, &mut last, &mut on_line).await {
            Ok(true) => return Ok(()),
            // The stream dropped before the end: resume after the last line handed over.
            Ok(false) | Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Opens an event stream: its response, or `None` after a failed attempt (waited out with a
/// growing pause; the eleventh failure in a row is the error). A refusal is an error at once.
async fn open_stream(
    request: reqwest::RequestBuilder,
    failures: &mut u32,
) -> anyhow::Result<Option<reqwest::Response>> {
    match request.send().await {
        Ok(response) if response.status().is_success() => {
            *failures = 0;
            Ok(Some(response))
        }
        Ok(response) => bail!("{}", response.text().await?),
        Err(error) => {
            *failures += 1;
            if *failures > 10 {
                return Err(error.into());
            }
            tokio::time::sleep(Duration::from_millis(500 * u64::from(*failures))).await;
            Ok(None)
        }
    }
}

/// Hands over `line` events, tracking the last sequence; true at the `end` event.
async fn read_events(
    mut response: reqwest::Response,
    last: &mut Option<i64>,
    on_line: &mut impl FnMut(&stagely_api::LogLineView),
) -> anyhow::Result<bool> {
    let mut events = SseEvents::default();
    while let Some(chunk) = response.chunk().await? {
        events.feed(&chunk);
        while let Some((event, data)) = events.next_event()? {
            match event.as_str() {
                "line" => {
                    let line: stagely_api::LogLineView = serde_json::from_str(&data)?;
                    if last.is_none_or(|seen| line.seq > seen) {
                        on_line(&line);
                        *last = Some(line.seq);
                    }
                }
                "end" => return Ok(true),
                _ => {}
            }
        }
    }
    Ok(false)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_cut_from_chunks_whatever_their_boundaries() {
        let stream = b": keep-alive\n\nevent: run\ndata: {\"id\":\"r\"}\n\nid: 7\nevent: line\ndata: a\ndata: b\n\nevent:end\ndata:{}\n\n";
        for cut in 1..stream.len() {
            let mut events = SseEvents::default();
            let mut seen = Vec::new();
            for part in [&stream[..cut], &stream[cut..]] {
                events.feed(part);
                while let Some(event) = events.next_event().unwrap() {
                    seen.push(event);
                }
            }
            let expected = [
                ("message", ""),
                ("run", "{\"id\":\"r\"}"),
                ("line", "a\nb"),
                ("end", "{}"),
            ];
            let seen: Vec<(&str, &str)> =
                seen.iter().map(|(e, d)| (e.as_str(), d.as_str())).collect();
            assert_eq!(seen, expected, "cut at {cut}");
        }
    }

    #[test]
    fn a_runaway_event_is_refused() {
        let mut events = SseEvents::default();
        events.feed(b"event: run\ndata: ");
        events.feed(&vec![b'x'; SseEvents::MAX_EVENT_BYTES]);
        let error = events.next_event().unwrap_err();
        assert!(error.to_string().contains("over 4 MiB"), "{error}");
    }
}
