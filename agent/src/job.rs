//! Executes one BUILD or MERGE: fetch the source, run the builder, read the digest.
//!
//! Output of every step goes to an [`OutputSink`] line by line as it is produced; this module
//! never holds more than one line. The result is a [`Report`] the connection turns into the
//! job's `STATUS`. "Never ran" (source unavailable, unsupported platform, no builder,
//! cancelled before start) is reported as such, never as a made-up exit code.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use stagely_protocol::{
    Arch, Build, BuilderKind, JobState, LogStream, Merge, NeverRan, RegistryAuth,
};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::builder::{self, Backend, Invocation, JobFiles};
use crate::process::{self, LineSink, Outcome, RunningProcess};

/// What the job task hands to the connection: output lines, then exactly one report.
#[derive(Debug)]
pub enum Output {
    Line(LogStream, String),
    /// Consecutive lines of one stream; `true`: read from bytes that hold no secret or host
    /// path (see [`LineSink::clean`]), so they need no per-line masking.
    Lines(LogStream, Vec<String>, bool),
    Finished(Report),
}

/// The job's outcome, without wire details.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub state: JobState,
    pub exit_code: Option<i32>,
    pub artifact_url: Option<String>,
    pub digest: Option<String>,
    pub error: Option<String>,
    pub never_ran: Option<NeverRan>,
}

impl Report {
    fn never_ran(reason: NeverRan, error: String) -> Report {
        Report {
            state: JobState::Failed,
            exit_code: None,
            artifact_url: None,
            digest: None,
            error: Some(error),
            never_ran: Some(reason),
        }
    }

    fn failed(exit_code: Option<i32>, error: String) -> Report {
        Report {
            state: JobState::Failed,
            exit_code,
            artifact_url: None,
            digest: None,
            error: Some(error),
            never_ran: None,
        }
    }
}

/// Sends output lines into the bounded channel towards the connection.
#[derive(Clone)]
pub struct OutputSink {
    sender: mpsc::Sender<Output>,
    /// What the receiving end masks with: lets a batch be checked once, as read.
    redactor: Option<std::sync::Arc<crate::redact::Redactor>>,
    /// A builder's line said `No space left on device` (ENOSPC): a failure says the disk is
    /// full (its space is freed again by the time the builder has exited).
    out_of_space: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// How a process reports ENOSPC (strerror), as builders print it.
const NO_SPACE: &str = "No space left on device";

impl OutputSink {
    pub fn new(sender: mpsc::Sender<Output>) -> Self {
        OutputSink {
            sender,
            redactor: None,
            out_of_space: Default::default(),
        }
    }

    /// Whether a process's output reported ENOSPC since the sink was made.
    pub fn saw_out_of_space(&self) -> bool {
        self.out_of_space.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn watch_for_full_disk(&self, text: &str) {
        if memchr::memmem::find(text.as_bytes(), NO_SPACE.as_bytes()).is_some() {
            self.out_of_space
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// A sink that marks batches holding nothing `redactor` rewrites as clean.
    pub fn masked_by(mut self, redactor: std::sync::Arc<crate::redact::Redactor>) -> Self {
        self.redactor = Some(redactor);
        self
    }

    /// A line written by the agent itself.
    pub async fn system(&self, text: impl Into<String>) {
        let mut text = text.into();
        if !text.ends_with('\n') {
            text.push('\n');
        }
        self.line(LogStream::System, text).await;
    }
}

impl LineSink for OutputSink {
    async fn line(&self, stream: LogStream, text: String) {
        if stream != LogStream::System {
            self.watch_for_full_disk(&text);
        }
        // If the connection is gone the job is being torn down; dropping output is all
        // that is left to do.
        let _ = self.sender.send(Output::Line(stream, text)).await;
    }

    async fn lines(&self, stream: LogStream, texts: Vec<String>, clean: bool) {
        for text in &texts {
            self.watch_for_full_disk(text);
        }
        let _ = self.sender.send(Output::Lines(stream, texts, clean)).await;
    }

    fn clean(&self, bytes: &[u8]) -> bool {
        self.redactor
            .as_ref()
            .is_some_and(|redactor| redactor.is_clean(bytes))
    }
}

/// Where and with what one job runs.
#[derive(Debug, Clone)]
pub struct JobEnvironment {
    pub work_dir: PathBuf,
    pub backend: Option<Backend>,
    pub host_arch: Arch,
    pub emulated_arches: Vec<Arch>,
    /// git may fetch local paths and `file://` URLs (see `AgentConfig::allow_local_repos`).
    pub allow_local_repos: bool,
    /// IMDSv2 base URL to watch for spot interruption notices while a job runs.
    pub metadata_url: Option<String>,
}

/// Picks a backend: the configured one if given, else buildx when `docker buildx` works,
/// else buildah when installed.
pub async fn detect_backend(
    preference: Option<&str>,
    work_dir: &Path,
    cgroup_parent: Option<String>,
) -> Option<Backend> {
    let buildah = Backend::Buildah {
        root: work_dir.join("buildah/storage"),
        runroot: work_dir.join("buildah/run"),
        tmp: work_dir.join("buildah/tmp"),
        cgroup_parent,
    };
    match preference {
        Some("buildx") => return Some(Backend::Buildx),
        Some("buildah") => return Some(buildah),
        _ => {}
    }
    // Both asked at once (each is a process start: tens of milliseconds at every boot).
    let (buildx, buildah_works) = tokio::join!(
        command_succeeds("docker", &["buildx", "version"]),
        command_succeeds("buildah", &["--version"]),
    );
    if buildx {
        Some(Backend::Buildx)
    } else if buildah_works {
        Some(buildah)
    } else {
        None
    }
}

async fn command_succeeds(program: &str, args: &[&str]) -> bool {
    process::command(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .is_ok_and(|status| status.success())
}

/// Architectures this kernel runs through QEMU user emulation (binfmt_misc).
pub fn emulated_arches(host: Arch) -> Vec<Arch> {
    [Arch::Amd64, Arch::Arm64]
        .into_iter()
        .filter(|arch| *arch != host && binfmt_enabled(*arch))
        .collect()
}

fn binfmt_name(arch: Arch) -> &'static str {
    match arch {
        Arch::Arm64 => "qemu-aarch64",
        Arch::Amd64 => "qemu-x86_64",
    }
}

fn binfmt_enabled(arch: Arch) -> bool {
    std::fs::read_to_string(Path::new("/proc/sys/fs/binfmt_misc").join(binfmt_name(arch)))
        .is_ok_and(|text| text.lines().next() == Some("enabled"))
}

/// Runs a BUILD to completion and returns its report.
pub async fn run_build(
    build: &Build,
    env: &JobEnvironment,
    sink: &OutputSink,
    cancel: &CancellationToken,
) -> Report {
    let config = &build.build_config;
    for (field, value) in [
        ("build_config.context_path", &config.context_path),
        ("build_config.dockerfile", &config.dockerfile),
    ] {
        if !builder::stays_inside(value) {
            let error = format!("{field} `{value}` must be a relative path inside the repository");
            sink.system(format!("error: {error}")).await;
            return Report::never_ran(NeverRan::AgentError, error);
        }
    }
    let Some(target_arch) = Arch::from_platform(&config.platform) else {
        let error = format!(
            "platform `{}` is not supported (linux/amd64 or linux/arm64)",
            config.platform
        );
        sink.system(format!("error: {error}")).await;
        return Report::never_ran(NeverRan::UnsupportedPlatform, error);
    };
    if target_arch != env.host_arch {
        if env.emulated_arches.contains(&target_arch) {
            sink.system(format!(
                "emulated: building {} on a {} host under QEMU user-mode emulation (binfmt_misc {}); RUN steps are several times slower than on a native builder",
                config.platform,
                env.host_arch,
                binfmt_name(target_arch)
            ))
            .await;
        } else {
            let error = format!(
                "this {} host cannot build {}: no native support and no QEMU binfmt_misc handler ({})",
                env.host_arch,
                config.platform,
                binfmt_name(target_arch)
            );
            sink.system(format!("error: {error}")).await;
            return Report::never_ran(NeverRan::UnsupportedPlatform, error);
        }
    } else {
        sink.system(format!(
            "native: building {} on a {} host",
            config.platform, env.host_arch
        ))
        .await;
    }
    let backend = match require_backend(env, sink).await {
        Ok(backend) => backend,
        Err(report) => return report,
    };
    if cancel.is_cancelled() {
        return Report::never_ran(
            NeverRan::Cancelled,
            "cancelled before the build started".into(),
        );
    }

    let checkout = env.work_dir.join("src");
    if let Err(report) = fetch_source(build, &checkout, env.allow_local_repos, sink, cancel).await {
        return report;
    }
    // The checkout is the boundary: what the build may read is resolved only now that the
    // repository's own symbolic links exist, and refused if it leaves the checkout.
    let (context, dockerfile) = match resolve_build_paths(&checkout, config) {
        Ok(paths) => paths,
        Err(error) => {
            sink.system(format!("error: {error}")).await;
            return Report::never_ran(NeverRan::SourceUnavailable, error);
        }
    };

    run_authenticated(
        env,
        backend.kind(),
        build.registry_auth.as_ref(),
        &config.secrets,
        &config.target_image,
        config.timeout_seconds,
        sink,
        cancel,
        |files| {
            backend.build_commands(
                config,
                &context,
                &dockerfile,
                build.registry.insecure,
                files,
            )
        },
    )
    .await
}

/// Runs a MERGE to completion and returns its report.
pub async fn run_merge(
    merge: &Merge,
    env: &JobEnvironment,
    sink: &OutputSink,
    cancel: &CancellationToken,
) -> Report {
    let backend = match require_backend(env, sink).await {
        Ok(backend) => backend,
        Err(report) => return report,
    };
    if merge.source_images.is_empty() {
        let error = "MERGE names no source_images".to_string();
        sink.system(format!("error: {error}")).await;
        return Report::never_ran(NeverRan::AgentError, error);
    }
    run_authenticated(
        env,
        backend.kind(),
        merge.registry_auth.as_ref(),
        &std::collections::BTreeMap::new(),
        &merge.target_image,
        merge.timeout_seconds,
        sink,
        cancel,
        |files| {
            backend.merge_commands(
                &merge.source_images,
                &merge.target_image,
                merge.registry.insecure,
                files,
            )
        },
    )
    .await
}

async fn require_backend(env: &JobEnvironment, sink: &OutputSink) -> Result<Backend, Report> {
    match env.backend.clone() {
        Some(backend) => Ok(backend),
        None => {
            let error =
                "no builder backend: neither `docker buildx` nor `buildah` works here".to_string();
            sink.system(format!("error: {error}")).await;
            Err(Report::never_ran(NeverRan::NoBuilder, error))
        }
    }
}

/// Writes the registry auth file, runs the backend's commands, and removes the auth file
/// whatever happened.
#[allow(clippy::too_many_arguments)]
async fn run_authenticated(
    env: &JobEnvironment,
    kind: BuilderKind,
    auth: Option<&RegistryAuth>,
    secrets: &std::collections::BTreeMap<String, stagely_protocol::Secret>,
    target_image: &str,
    timeout_seconds: Option<u64>,
    sink: &OutputSink,
    cancel: &CancellationToken,
    commands: impl FnOnce(&JobFiles) -> Vec<Invocation>,
) -> Report {
    let files = match prepare_files(&env.work_dir, auth, secrets, target_image).await {
        Ok(files) => files,
        Err(error) => {
            let error = format!("preparing the registry auth file failed: {error}");
            sink.system(format!("error: {error}")).await;
            return Report::never_ran(NeverRan::AgentError, error);
        }
    };
    let commands = commands(&files);
    let timeout = timeout_seconds.map(Duration::from_secs);
    let report = run_commands(&commands, kind, target_image, &files, sink, cancel, timeout).await;
    remove_auth(&files).await;
    report
}

async fn run_commands(
    commands: &[Invocation],
    kind: BuilderKind,
    target_image: &str,
    files: &JobFiles,
    sink: &OutputSink,
    cancel: &CancellationToken,
    timeout: Option<Duration>,
) -> Report {
    let started = tokio::time::Instant::now();
    for invocation in commands {
        let remaining = timeout.map(|limit| limit.saturating_sub(started.elapsed()));
        sink.system(format!(
            "step {}: {} {}",
            invocation.step,
            invocation.program,
            invocation.args.join(" ")
        ))
        .await;
        let mut command = process::command(&invocation.program);
        command.args(&invocation.args);
        for (key, value) in &invocation.env {
            command.env(key, value);
        }
        let stdout_file = if invocation.stdout_to_result {
            match std::fs::File::create(&files.result_file) {
                Ok(file) => Some(file),
                Err(error) => {
                    let error = format!("cannot create {}: {error}", files.result_file.display());
                    return Report::never_ran(NeverRan::AgentError, error);
                }
            }
        } else {
            None
        };
        let outcome =
            match RunningProcess::spawn_with_stdout(command, &invocation.program, stdout_file) {
                Ok(process) => process.run(sink.clone(), cancel, remaining).await,
                Err(error) => Err(error),
            };
        match outcome {
            Ok(Outcome::Exited(0)) => {}
            Ok(Outcome::Exited(code)) => {
                let mut error = format!(
                    "{} {} failed with exit status {code}",
                    invocation.program, invocation.step
                );
                // A build that filled the instance's disk fails saying so (on the local
                // provider the work directory is a file system of `max_disk_mib`).
                if let Some(disk) = files
                    .result_file
                    .parent()
                    .and_then(|dir| full_disk(dir, sink.saw_out_of_space()))
                {
                    error.push_str(&format!(": {disk}"));
                }
                sink.system(format!("error: {error}")).await;
                return Report::failed(Some(code), error);
            }
            Ok(Outcome::Cancelled) => {
                let error = format!("cancelled during {}", invocation.step);
                sink.system(format!("error: {error}")).await;
                return Report::failed(None, error);
            }
            Ok(Outcome::TimedOut) => {
                let limit = timeout.map(|t| t.as_secs()).unwrap_or(0);
                let error = format!("build timed out after {}", human_duration(limit));
                sink.system(format!("error: {error}")).await;
                return Report::failed(None, error);
            }
            Err(error) => {
                let error = error.to_string();
                sink.system(format!("error: {error}")).await;
                return Report::never_ran(NeverRan::NoBuilder, error);
            }
        }
    }
    let result = tokio::fs::read_to_string(&files.result_file)
        .await
        .unwrap_or_default();
    let digest = builder::parse_digest(kind, &result);
    let Some(digest) = digest else {
        let error = format!(
            "the builder reported success but wrote no valid digest to {}",
            files.result_file.display()
        );
        sink.system(format!("error: {error}")).await;
        return Report::failed(Some(0), error);
    };
    sink.system(format!("pushed {target_image}@{digest}")).await;
    Report {
        state: JobState::Completed,
        exit_code: Some(0),
        artifact_url: Some(target_image.to_string()),
        digest: Some(digest),
        error: None,
        never_ran: None,
    }
}

fn human_duration(seconds: u64) -> String {
    if seconds.is_multiple_of(3600) && seconds > 0 {
        format!("{}h", seconds / 3600)
    } else if seconds.is_multiple_of(60) && seconds > 0 {
        format!("{}m", seconds / 60)
    } else {
        format!("{seconds}s")
    }
}

/// Fetches exactly `commit_hash` into `checkout`: a shallow fetch of that commit, falling
/// back to a full fetch for servers that refuse fetching by id.
async fn fetch_source(
    build: &Build,
    checkout: &Path,
    allow_local_repos: bool,
    sink: &OutputSink,
    cancel: &CancellationToken,
) -> Result<(), Report> {
    let source = &build.context;
    if source.commit_hash.is_empty() || !source.commit_hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        let error = format!(
            "context.commit_hash `{}` is not a hexadecimal commit id",
            source.commit_hash
        );
        sink.system(format!("error: {error}")).await;
        return Err(Report::never_ran(NeverRan::SourceUnavailable, error));
    }
    if checkout.exists() {
        let _ = tokio::fs::remove_dir_all(checkout).await;
    }
    if let Err(error) = crate::private_dir(checkout) {
        let error = format!("cannot create {}: {error}", checkout.display());
        return Err(Report::never_ran(NeverRan::AgentError, error));
    }
    sink.system(format!(
        "fetching {} at {} ({})",
        source.repo_url, source.commit_hash, source.branch
    ))
    .await;
    // A clone token reaches git through a 0600 config file beside the checkout (never its
    // environment or argv), removed once the fetch is over.
    let auth_config = checkout
        .parent()
        .unwrap_or(checkout)
        .join("auth")
        .join("git.conf");
    if let Some(token) = &source.clone_token
        && let Err(error) = write_git_auth(&auth_config, token).await
    {
        let error = format!("cannot write the git credentials file: {error}");
        return Err(Report::never_ran(NeverRan::AgentError, error));
    }
    let with_token = source.clone_token.is_some();
    let git = |args: &[&str]| {
        let mut command = process::command("git");
        command.arg("-C").arg(checkout).args(args);
        command.env("GIT_TERMINAL_PROMPT", "0");
        command.env(
            "GIT_ALLOW_PROTOCOL",
            stagely_protocol::git_allowed_protocols(allow_local_repos),
        );
        if with_token {
            command.env("GIT_CONFIG_GLOBAL", &auth_config);
        }
        command
    };
    let local = allow_local_repos && is_local_repo(&source.repo_url);
    let fetched = fetch_commit(source, local, &git, sink, cancel).await;
    if with_token {
        let _ = tokio::fs::remove_file(&auth_config).await;
    }
    fetched
}

/// What to say when the file system holding `dir` is full (less than 1 MiB left), or was
/// (`reported`: the build's output said ENOSPC; a failed `RUN` container is gone by now,
/// its space free again): its size.
fn full_disk(dir: &Path, reported: bool) -> Option<String> {
    let stats = nix::sys::statvfs::statvfs(dir).ok()?;
    let block = stats.fragment_size() as u64;
    let left = stats.blocks_available() as u64 * block;
    let size = stats.blocks() as u64 * block;
    (reported || left < 1024 * 1024).then(|| {
        format!(
            "no space left: the instance's disk is full ({} MiB usable in its work directory)",
            size / (1024 * 1024)
        )
    })
}

/// Writes the git config holding the clone token's header: directory 0700, file 0600.
async fn write_git_auth(path: &Path, token: &str) -> std::io::Result<()> {
    let path = path.to_path_buf();
    let text = stagely_protocol::git_auth_config(token);
    tokio::task::spawn_blocking(move || write_private(&path, text.as_bytes()))
        .await
        .map_err(std::io::Error::other)?
}

/// Writes `bytes` to `path` readable by the agent only: missing parent directories are made
/// with mode 0700, the file with 0600. Blocking.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?
        .write_all(bytes)
}

/// Whether git reaches `url` by its local transport (an absolute path or `file://`: the only
/// local forms the core accepts).
fn is_local_repo(url: &str) -> bool {
    url.starts_with('/') || url.starts_with("file://")
}

/// The options of a fetch into a throwaway checkout. Loose objects are stored uncompressed
/// (the checkout is deleted after the build, and deflating a large file costs more than its
/// fetch). From a repository on this machine (`local`), git's own `upload-pack` packs without
/// compression too: the pack only crosses a pipe, so deflating it is pure cost (a 2 MB
/// binary took 0.21 s to fetch, 0.05 s without).
fn fetch_options(local: bool) -> Vec<&'static str> {
    let mut options = vec!["-c", "core.looseCompression=0", "fetch"];
    if local {
        options.push("--upload-pack=git -c pack.compression=0 upload-pack");
    }
    options
}

/// The git steps of a fetch: init, shallow fetch of the commit (full fetch as fallback),
/// checkout.
async fn fetch_commit(
    source: &stagely_protocol::SourceContext,
    local: bool,
    git: &impl Fn(&[&str]) -> Command,
    sink: &OutputSink,
    cancel: &CancellationToken,
) -> Result<(), Report> {
    run_git(git(&["init", "-q"]), sink, cancel).await?;
    let fetch = fetch_options(local);
    let mut shallow_args = fetch.clone();
    shallow_args.extend([
        "--depth",
        "1",
        "--no-tags",
        &source.repo_url,
        &source.commit_hash,
    ]);
    let shallow = run_git(git(&shallow_args), sink, cancel).await;
    if shallow.is_err() {
        if cancel.is_cancelled() {
            return Err(Report::never_ran(
                NeverRan::Cancelled,
                "cancelled while fetching".into(),
            ));
        }
        sink.system("shallow fetch of the commit was refused; fetching all branches")
            .await;
        let mut full_args = fetch;
        full_args.extend([
            "--no-tags",
            &source.repo_url,
            "+refs/heads/*:refs/remotes/origin/*",
        ]);
        run_git(git(&full_args), sink, cancel).await?;
    }
    run_git(
        git(&[
            "-c",
            "advice.detachedHead=false",
            "checkout",
            "-q",
            "--detach",
            &source.commit_hash,
        ]),
        sink,
        cancel,
    )
    .await
}

/// Why a build path was refused. Messages name the BUILD field and never show host paths.
fn outside(field: &str, value: &str, how: &str) -> String {
    format!("{field} `{value}` {how}; a build may only read files inside the repository checkout")
}

/// Resolves `context_path` and `dockerfile` inside `checkout`, following every symbolic link
/// the repository holds, and refuses any that end outside the checkout (a committed
/// `ctx -> ..` or `ctx -> /` would otherwise hand the builder the agent's secrets or the
/// host's files). Returns the resolved context directory and Dockerfile.
pub fn resolve_build_paths(
    checkout: &Path,
    config: &stagely_protocol::BuildConfig,
) -> Result<(PathBuf, PathBuf), String> {
    const CONTEXT: &str = "build_config.context_path";
    const DOCKERFILE: &str = "build_config.dockerfile";
    let root = checkout
        .canonicalize()
        .map_err(|error| format!("the checkout cannot be resolved: {error}"))?;
    let resolve = |field: &str, value: &str, base: &Path| -> Result<PathBuf, String> {
        if !builder::stays_inside(value) {
            return Err(outside(field, value, "is absolute or climbs out with `..`"));
        }
        let joined = builder::join_relative(base, value);
        let resolved = joined.canonicalize().map_err(|error| match error.kind() {
            std::io::ErrorKind::NotFound => {
                format!("{field} `{value}` does not exist in the repository at this commit")
            }
            _ => format!("{field} `{value}` cannot be resolved: {error}"),
        })?;
        if !resolved.starts_with(&root) {
            return Err(outside(
                field,
                value,
                "leads out of the checkout through a symbolic link",
            ));
        }
        Ok(resolved)
    };
    let context = resolve(CONTEXT, &config.context_path, &root)?;
    if !context.is_dir() {
        return Err(format!(
            "{CONTEXT} `{}` is not a directory",
            config.context_path
        ));
    }
    let dockerfile = resolve(DOCKERFILE, &config.dockerfile, &context)?;
    if !dockerfile.is_file() {
        return Err(format!(
            "{DOCKERFILE} `{}` is not a regular file",
            config.dockerfile
        ));
    }
    // The builder reads these from the context itself; a link out would leak a host file
    // into its error messages.
    for ignore in [".dockerignore", ".containerignore"] {
        let path = context.join(ignore);
        if path.is_symlink() {
            let target = path.canonicalize().map_err(|_| {
                format!(
                    "{CONTEXT} `{}`: {ignore} is a dangling symbolic link",
                    config.context_path
                )
            })?;
            if !target.starts_with(&root) {
                return Err(outside(
                    CONTEXT,
                    &config.context_path,
                    &format!("holds {ignore}, a symbolic link out of the checkout"),
                ));
            }
        }
    }
    Ok((context, dockerfile))
}

async fn run_git(
    command: Command,
    sink: &OutputSink,
    cancel: &CancellationToken,
) -> Result<(), Report> {
    let outcome = match RunningProcess::spawn(command, "git") {
        Ok(process) => {
            process
                .run(sink.clone(), cancel, Some(Duration::from_secs(600)))
                .await
        }
        Err(error) => Err(error),
    };
    match outcome {
        Ok(Outcome::Exited(0)) => Ok(()),
        Ok(Outcome::Exited(code)) => Err(Report::never_ran(
            NeverRan::SourceUnavailable,
            format!("git failed with exit status {code} while fetching the source"),
        )),
        Ok(Outcome::Cancelled) => Err(Report::never_ran(
            NeverRan::Cancelled,
            "cancelled while fetching the source".into(),
        )),
        Ok(Outcome::TimedOut) => Err(Report::never_ran(
            NeverRan::SourceUnavailable,
            "fetching the source timed out after 10m".into(),
        )),
        Err(error) => Err(Report::never_ran(
            NeverRan::SourceUnavailable,
            error.to_string(),
        )),
    }
}

/// Writes the docker-style auth file (directory 0700, file 0600) and clears the result file.
async fn prepare_files(
    work_dir: &Path,
    auth: Option<&RegistryAuth>,
    secrets: &std::collections::BTreeMap<String, stagely_protocol::Secret>,
    target_image: &str,
) -> std::io::Result<JobFiles> {
    let auth_dir = work_dir.join("auth");
    let secret_dir = auth_dir.join("secrets");
    let mut secret_values = Vec::new();
    let mut secret_files = Vec::new();
    for (name, value) in secrets {
        // Names come from the core, which allows only letters, digits and `_`; check again
        // before a name becomes a file name.
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(std::io::Error::other(format!(
                "secret build argument name `{name}` is not letters, digits and `_`"
            )));
        }
        let file = secret_dir.join(name);
        secret_files.push((name.clone(), file.clone()));
        secret_values.push((file, value.expose().to_string()));
    }
    let files = JobFiles {
        auth_dir,
        secret_files,
        result_file: work_dir.join("result"),
    };
    let auth_json = match auth {
        Some(auth) => {
            let encoded = base64::engine::general_purpose::STANDARD
                .encode(format!("{}:{}", auth.username, auth.password));
            serde_json::json!({
                "auths": { builder::registry_host(target_image): { "auth": encoded } }
            })
        }
        None => serde_json::json!({ "auths": {} }),
    };
    let dir = files.auth_dir.clone();
    let file = files.auth_file();
    let result = files.result_file.clone();
    let text = auth_json.to_string();
    tokio::task::spawn_blocking(move || {
        write_private(&file, text.as_bytes())?;
        for (path, value) in &secret_values {
            write_private(path, value.as_bytes())?;
        }
        link_docker_state(&dir);
        match std::fs::remove_file(&result) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error),
            _ => Ok(()),
        }
    })
    .await
    .map_err(std::io::Error::other)??;
    Ok(files)
}

/// The job's docker config directory (`DOCKER_CONFIG` for buildx) holds only our auth file;
/// link the host's buildx builders, CLI plugins and contexts into it so `docker buildx`
/// still finds the configured builder (e.g. a docker-container builder with registry cache
/// support) instead of falling back to the default driver.
fn link_docker_state(job_config: &Path) {
    let host_config = std::env::var_os("DOCKER_CONFIG")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".docker")));
    let Some(host_config) = host_config else {
        return;
    };
    for name in ["buildx", "cli-plugins", "contexts"] {
        let source = host_config.join(name);
        let link = job_config.join(name);
        if source.is_dir() && !link.exists() {
            let _ = std::os::unix::fs::symlink(&source, &link);
        }
    }
}

async fn remove_auth(files: &JobFiles) {
    let _ = tokio::fs::remove_file(files.auth_file()).await;
    for (_, file) in &files.secret_files {
        let _ = tokio::fs::remove_file(file).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn config(context: &str, dockerfile: &str) -> stagely_protocol::BuildConfig {
        stagely_protocol::BuildConfig {
            context_path: context.into(),
            dockerfile: dockerfile.into(),
            target_image: "r/x:y".into(),
            platform: "linux/amd64".into(),
            build_args: BTreeMap::new(),
            cache_from: vec![],
            cache_to: None,
            timeout_seconds: None,
            secrets: BTreeMap::new(),
        }
    }

    fn git_in(dir: &Path, args: &[&str]) -> String {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    #[test]
    fn only_absolute_paths_and_file_urls_are_local_repositories() {
        for url in ["/srv/repos/app", "file:///srv/repos/app"] {
            assert!(is_local_repo(url), "{url}");
            assert!(
                fetch_options(true)
                    .iter()
                    .any(|o| o.starts_with("--upload-pack="))
            );
        }
        for url in [
            "https://github.com/a/b.git",
            "git@github.com:a/b.git",
            "ssh://h/r",
        ] {
            assert!(!is_local_repo(url), "{url}");
        }
        // A remote's upload-pack is the server's own: never replaced.
        assert!(
            !fetch_options(false)
                .iter()
                .any(|o| o.contains("upload-pack"))
        );
    }

    #[tokio::test]
    async fn a_local_fetch_takes_the_exact_commit_without_deflating_it() {
        let work = tempfile::tempdir().unwrap();
        let repo = work.path().join("repo");
        std::fs::create_dir_all(&repo).unwrap();
        git_in(&repo, &["init", "-q"]);
        // Highly compressible: stored deflated it would take a few KiB.
        let big = "stagely ".repeat(128 * 1024);
        std::fs::write(repo.join("big.txt"), &big).unwrap();
        git_in(&repo, &["add", "."]);
        git_in(&repo, &["commit", "-q", "-m", "one"]);
        let first = git_in(&repo, &["rev-parse", "HEAD"]);
        std::fs::write(repo.join("big.txt"), "changed later\n").unwrap();
        git_in(&repo, &["commit", "-q", "-am", "two"]);

        let checkout = work.path().join("src");
        std::fs::create_dir_all(&checkout).unwrap();
        let source = stagely_protocol::SourceContext {
            repo_url: format!("file://{}", repo.display()),
            commit_hash: first.clone(),
            branch: "main".into(),
            clone_token: None,
        };
        let git = |args: &[&str]| {
            let mut command = process::command("git");
            command.arg("-C").arg(&checkout).args(args);
            command.env("GIT_ALLOW_PROTOCOL", "file");
            command
        };
        let (tx, mut rx) = mpsc::channel(64);
        let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
        let sink = OutputSink::new(tx);
        fetch_commit(&source, true, &git, &sink, &CancellationToken::new())
            .await
            .unwrap();
        drop(sink);
        drain.await.unwrap();
        assert_eq!(
            std::fs::read_to_string(checkout.join("big.txt")).unwrap(),
            big
        );
        assert_eq!(git_in(&checkout, &["rev-parse", "HEAD"]), first);
        // The blob arrived as a loose object stored without compression.
        let blob = git_in(&checkout, &["rev-parse", &format!("{first}:big.txt")]);
        let loose = checkout
            .join(".git/objects")
            .join(&blob[..2])
            .join(&blob[2..]);
        let stored = std::fs::metadata(&loose).unwrap().len();
        assert!(stored >= big.len() as u64, "{stored} bytes stored");
    }

    #[test]
    fn build_paths_resolve_inside_the_checkout_only() {
        let work = tempfile::tempdir().unwrap();
        let checkout = work.path().join("src");
        std::fs::create_dir_all(checkout.join("api")).unwrap();
        std::fs::write(checkout.join("api/Dockerfile"), "FROM scratch\n").unwrap();
        std::fs::create_dir_all(work.path().join("auth")).unwrap();
        std::fs::write(work.path().join("auth/config.json"), "{}").unwrap();
        std::os::unix::fs::symlink("..", checkout.join("up")).unwrap();
        std::os::unix::fs::symlink("/", checkout.join("root")).unwrap();
        std::os::unix::fs::symlink("api", checkout.join("alias")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", checkout.join("api/Dockerfile.out")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", checkout.join("api/.dockerignore")).unwrap();

        // A link that stays inside is fine (the .dockerignore case is checked below).
        std::fs::remove_file(checkout.join("api/.dockerignore")).unwrap();
        let (context, dockerfile) =
            resolve_build_paths(&checkout, &config("./alias", "Dockerfile")).unwrap();
        assert!(context.ends_with("src/api"), "{}", context.display());
        assert!(dockerfile.ends_with("src/api/Dockerfile"));

        let error =
            resolve_build_paths(&checkout, &config("up", "src/api/Dockerfile")).unwrap_err();
        assert!(
            error.starts_with(
                "build_config.context_path `up` leads out of the checkout through a symbolic link"
            ),
            "{error}"
        );
        let error = resolve_build_paths(&checkout, &config("root", "etc/passwd")).unwrap_err();
        assert!(
            error.contains("build_config.context_path `root`"),
            "{error}"
        );
        let error = resolve_build_paths(&checkout, &config("api", "Dockerfile.out")).unwrap_err();
        assert!(
            error.contains("build_config.dockerfile `Dockerfile.out`"),
            "{error}"
        );
        let error =
            resolve_build_paths(&checkout, &config("api", "../up/auth/config.json")).unwrap_err();
        assert!(error.contains("climbs out"), "{error}");
        let error = resolve_build_paths(&checkout, &config("missing", "Dockerfile")).unwrap_err();
        assert!(error.contains("does not exist"), "{error}");
        let error = resolve_build_paths(&checkout, &config("api", ".")).unwrap_err();
        assert!(error.contains("not a regular file"), "{error}");
        std::os::unix::fs::symlink("/etc/passwd", checkout.join("api/.dockerignore")).unwrap();
        let error = resolve_build_paths(&checkout, &config("api", "Dockerfile")).unwrap_err();
        assert!(error.contains(".dockerignore"), "{error}");
        // No host path in any message.
        assert!(
            !error.contains(&work.path().display().to_string()),
            "{error}"
        );
    }
}
