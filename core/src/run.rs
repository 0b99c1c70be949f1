//! `stagely run`: builds a checkout end to end on an embedded core with local instances, and
//! prints what each job did.

use crate::client::*;
use crate::registry::LocalRegistry;
use anyhow::{Context, bail};
use clap::Args;
use serde::Serialize;
use stagely_api::{JobView, LogPage, RunView};
use stagely_server::config::{CoreConfig, FileConfig, Overrides};
use stagely_server::server;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

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

/// Git facts about the directory `run` builds.
pub(crate) struct Checkout {
    top: PathBuf,
    commit: String,
    branch: String,
    prefix: String,
}

pub(crate) async fn git_text(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
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

pub(crate) async fn inspect_checkout(dir: &Path) -> anyhow::Result<Checkout> {
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

pub(crate) fn summarize(view: &RunView, registry: &str) -> RunSummary {
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

pub(crate) fn duration_ms(job: &JobView) -> Option<i64> {
    Some(job.completed_at? - job.created_at)
}

pub(crate) fn format_duration(ms: Option<i64>) -> String {
    match ms {
        Some(ms) if ms >= 60_000 => format!("{}m{:02}s", ms / 60_000, (ms % 60_000) / 1000),
        Some(ms) => format!("{:.1}s", ms as f64 / 1000.0),
        None => "-".into(),
    }
}

pub(crate) fn print_table(out: &mut impl Write, summary: &RunSummary) -> std::io::Result<()> {
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

pub(crate) async fn run(args: RunArgs) -> anyhow::Result<i32> {
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
pub(crate) struct RunRequest<'a> {
    checkout: &'a Checkout,
    text: &'a str,
    environment: &'a str,
    follow: bool,
    /// `--raw`: build output written as stored.
    raw: bool,
}

pub(crate) async fn drive_run(
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
pub(crate) async fn watch_run(
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
pub(crate) async fn report_jobs(
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

/// The last `count` lines of a job's log, read page by page (never the whole log at once).
pub(crate) async fn tail_lines(
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
