//! The Stagely agent: the process on a builder VM that serves one job for the core.
//!
//! [`run`] loads `agent.toml`, detects the builder backend and emulation, dials the core
//! ([`connection`]), runs the BUILD or MERGE it is handed ([`job`], [`builder`], [`process`])
//! and returns once the core has acknowledged the job's STATUS. SIGTERM/SIGINT cancel the
//! build (the process group gets SIGTERM, then SIGKILL) and still report a STATUS.

pub mod builder;
pub mod connection;
pub mod dial;
pub mod job;
pub mod process;
pub mod redact;
pub mod spool;
pub mod spot;

use std::path::{Path, PathBuf};

use anyhow::Context;
use stagely_cloud_init::AgentConfig;
use tokio_util::sync::CancellationToken;

/// Default scratch space on a VM.
pub const DEFAULT_WORK_DIR: &str = "/var/lib/stagely";

/// Loads and checks `agent.toml`.
pub fn load_config(path: &Path) -> anyhow::Result<AgentConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading agent config {}", path.display()))?;
    let config = AgentConfig::from_toml(&text)
        .with_context(|| format!("agent config {}", path.display()))?;
    connection::connect_url(&config.core_url)?;
    if let Some(builder) = &config.builder
        && !matches!(builder.as_str(), "buildx" | "buildah")
    {
        anyhow::bail!(
            "agent config {}: builder `{builder}` is not `buildx` or `buildah`",
            path.display()
        );
    }
    Ok(config)
}

/// Runs the agent to completion.
pub async fn run(config_path: &Path) -> anyhow::Result<()> {
    let config = load_config(config_path)?;
    let work_dir = config
        .work_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_WORK_DIR));
    // A known umask whoever started the agent (a local core runs with 077): checkouts keep
    // git's usual modes, which become the image's. What is private is kept private by the
    // work dir's mode (0700) and explicit file modes (spool, auth, secrets: 0600).
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    private_dir(&work_dir).with_context(|| format!("creating work dir {}", work_dir.display()))?;
    let instance_id = config
        .instance_id
        .clone()
        .or_else(|| std::env::var("STAGELY_INSTANCE_ID").ok())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let host_arch = connection::host_arch()?;
    let backend = job::detect_backend(
        config.builder.as_deref(),
        &work_dir,
        config.cgroup_parent.clone(),
    )
    .await;
    if let Some(backend) = &backend {
        backend.prepare().with_context(|| {
            format!(
                "preparing the builder's directories in {}",
                work_dir.display()
            )
        })?;
    }
    let env = job::JobEnvironment {
        backend,
        emulated_arches: job::emulated_arches(host_arch),
        host_arch,
        work_dir,
        allow_local_repos: config.allow_local_repos,
        metadata_url: config.metadata_url.clone(),
    };
    tracing::info!(
        instance_id,
        arch = %host_arch,
        backend = ?env.backend.as_ref().map(|b| b.kind()),
        emulated = ?env.emulated_arches,
        "stagely-agent starting"
    );

    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
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
        signals.cancel();
    });

    let dialer = connection::Dialer::new(&config)?;
    let (socket, codec) = connection::connect_with(&dialer, &config, &shutdown).await?;
    tracing::info!(codec = codec.subprotocol(), "connected to the core");
    let hello = connection::hello(instance_id, &env);
    let link = connection::LinkSettings::new(dialer, &config);
    let report = connection::serve(socket, codec, hello, link, env, shutdown).await?;
    tracing::info!(state = ?report.state, exit_code = ?report.exit_code, "job finished");
    Ok(())
}

/// Creates `path` (and missing parents) as a directory only its owner can enter (0700),
/// and makes it so if it already existed.
pub(crate) fn private_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
}
