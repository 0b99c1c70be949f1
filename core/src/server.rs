//! Starting and stopping a core: database, provider, scheduler, HTTP server.
//!
//! Shaped like mini-redis: `main` parses arguments and calls [`start`]; everything started
//! here watches one `CancellationToken`, and [`RunningCore::stop`] waits for every task
//! (agents cancelled, instances terminated) before the database closes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use stagely_provisioning::Provider;
use stagely_provisioning::local::LocalProvider;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::{ApiAuth, AppState, app};
use crate::config::CoreConfig;
use crate::db::Db;
use crate::engine::EngineConfig;
use crate::runner::{Runner, RunnerSettings};

/// A core serving on a socket.
pub struct RunningCore {
    pub addr: SocketAddr,
    pub runner: Runner,
    /// The API's token check (and its count of refused requests).
    pub auth: Arc<ApiAuth>,
    /// The publishers of watched runs (`GET /api/v1/workflows/{id}/events`).
    pub run_events: Arc<crate::run_events::RunEvents>,
    /// Cancelled by `stop`; the scheduler's tasks and the HTTP server watch it.
    shutdown: CancellationToken,
    /// The HTTP server task; ends after graceful shutdown.
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    /// The certificate served when the core speaks TLS itself.
    tls: Option<Arc<crate::tls::ReloadingCert>>,
}

impl RunningCore {
    /// `http://ADDR` (or `https://ADDR` with `[tls]` files) of the API.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Reads the certificate files again (what SIGHUP does); `Ok` without TLS.
    pub fn reload_tls(&self) -> Result<(), crate::tls::TlsError> {
        match &self.tls {
            Some(cert) => cert.reload(),
            None => Ok(()),
        }
    }

    /// Graceful shutdown: stop claiming, hand this core's live jobs back to the queue (another
    /// core, or this one started again, takes them over), terminate their instances, stop
    /// serving, close the database.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.runner.shutdown().await;
        match self.server.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::error!("HTTP server ended with an error: {error}"),
            Err(error) => tracing::error!("HTTP server task failed: {error}"),
        }
        self.runner.db().close().await;
    }
}

/// Finds `stagely-agent` beside the running executable (or one directory up, for test
/// binaries in `target/<profile>/deps`).
pub fn find_agent_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [
        dir.join("stagely-agent"),
        dir.parent()?.join("stagely-agent"),
    ]
    .into_iter()
    .find(|candidate| candidate.is_file())
}

/// The local provider for `config`, with instances under `<data_dir>/instances`.
pub fn local_provider(config: &CoreConfig) -> anyhow::Result<Arc<dyn Provider>> {
    let agent = match &config.agent_binary {
        Some(path) => path.clone(),
        None => find_agent_binary().context(
            "cannot find the stagely-agent binary next to this executable; build it (cargo build --bins) or set provider.agent_binary",
        )?,
    };
    let provider = LocalProvider::new(agent, config.data_dir.join("instances"))?;
    Ok(Arc::new(provider))
}

/// The provider `config` names: local processes, or EC2 (the SDK's standard credential
/// chain and environment: `AWS_REGION`, `AWS_ENDPOINT_URL_EC2`, profiles, instance roles).
pub async fn provider(config: &CoreConfig) -> anyhow::Result<Arc<dyn Provider>> {
    match &config.provider {
        crate::config::ProviderConfig::Local => local_provider(config),
        crate::config::ProviderConfig::Ec2(settings) => Ok(Arc::new(
            stagely_provisioning::ec2::Ec2Provider::from_env(settings.clone()).await,
        )),
    }
}

/// How long in-flight requests get to finish once shutdown began.
const HTTP_DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves `router` on `listener` over HTTP/1.1 (with upgrades, for the agent WebSocket) until
/// `shutdown`, with the bounds `axum::serve` cannot set: at most `max_connections` open at
/// once (more wait in the kernel's backlog), and a client that does not send a request's
/// headers within `header_read_timeout` (slowloris), or sends nothing on a kept-alive
/// connection for that long, is disconnected.
async fn serve_http(
    listener: TcpListener,
    router: axum::Router,
    limits: crate::config::ApiLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use hyper_util::rt::TokioTimer;
    let connections = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    // Every connection task, waited for (up to HTTP_DRAIN) at shutdown.
    let tasks = tokio_util::task::TaskTracker::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    loop {
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = shutdown.cancelled() => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(error) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!("accepting a connection failed: {error}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let builder = builder.clone();
        let stop = shutdown.clone();
        let tls = tls.clone();
        // The handshake shares the header deadline: a client that stalls it is dropped.
        let handshake_limit = limits.header_read_timeout;
        tasks.spawn(async move {
            match tls {
                None => serve_connection(&builder, stream, service, &stop).await,
                Some(acceptor) => {
                    let accepted = tokio::select! {
                        accepted = tokio::time::timeout(handshake_limit, acceptor.accept(stream)) => accepted,
                        () = stop.cancelled() => return,
                    };
                    match accepted {
                        Ok(Ok(stream)) => serve_connection(&builder, stream, service, &stop).await,
                        // A failed or slow handshake is the client's problem; say it at debug.
                        Ok(Err(error)) => tracing::debug!("TLS handshake failed: {error}"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    tasks.close();
    if tokio::time::timeout(HTTP_DRAIN, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "some HTTP connections were still open {}s after shutdown began",
            HTTP_DRAIN.as_secs()
        );
    }
    Ok(())
}

/// Serves one accepted connection (plain or TLS) until it ends or shutdown drains it.
async fn serve_connection<I>(
    builder: &hyper::server::conn::http1::Builder,
    io: I,
    service: hyper_util::service::TowerToHyperService<axum::Router>,
    stop: &CancellationToken,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let connection = builder
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(connection);
    // Timeouts and resets end connections with an error: nothing to report.
    tokio::select! {
        _ = connection.as_mut() => {}
        () = stop.cancelled() => {
            // Finish the request in flight, then close.
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}

/// Reloads the certificate on every SIGHUP until shutdown; a failed reload keeps the old one.
fn reload_on_sighup(cert: Arc<crate::tls::ReloadingCert>, shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(error) => {
            tracing::warn!("cannot watch SIGHUP, the certificate will not be reloaded: {error}");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                received = hangups.recv() => if received.is_none() { return },
                () = shutdown.cancelled() => return,
            }
            match cert.reload() {
                Ok(()) => tracing::info!("SIGHUP: TLS certificate reloaded"),
                Err(error) => {
                    tracing::error!(
                        "SIGHUP: TLS certificate not reloaded, keeping the one in use: {error}"
                    );
                }
            }
        }
    });
}

/// Opens the database, recovers from an earlier crash, and serves on `listener`.
pub async fn start(
    config: CoreConfig,
    listener: TcpListener,
    provider: Arc<dyn Provider>,
) -> anyhow::Result<RunningCore> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    let db = match &config.database_url {
        Some(url) => Db::open_postgres(&url.0)
            .await
            .with_context(|| format!("opening PostgreSQL database {url:?}"))?,
        None => {
            let db_path = config.data_dir.join("stagely.db");
            Db::open_sqlite(&db_path)
                .await
                .with_context(|| format!("opening database {}", db_path.display()))?
        }
    };
    let addr = listener.local_addr()?;
    let public_url = config.public_url.clone().unwrap_or_else(|| {
        let host = if addr.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else {
            addr.ip().to_string()
        };
        let scheme = if config.tls.serve.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{host}:{}", addr.port())
    });
    let tls = match &config.tls.serve {
        Some(files) => {
            let cert = crate::tls::ReloadingCert::load(files.clone())?;
            let acceptor = tokio_rustls::TlsAcceptor::from(
                cert.server_config()
                    .context("building the TLS server configuration")?,
            );
            Some((cert, acceptor))
        }
        None => None,
    };
    let shutdown = CancellationToken::new();
    // One lease owner per process: a restarted core is a new incarnation of the same
    // `core_id` and takes its predecessor's jobs over at once.
    let incarnation = uuid::Uuid::new_v4().simple().to_string();
    let owner = format!("{}/{}", config.core_id, &incarnation[..12]);
    let mut engine = EngineConfig::with_owner(&config.core_id, &owner);
    engine.max_live_instances = config.max_concurrent_jobs;
    engine.max_live_per_environment = config.max_live_per_environment;
    engine.max_retries = config.max_retries;
    engine.retry_backoff = config.retry_backoff;
    engine.boot_timeout = config.agent_connect_timeout;
    engine.lease_duration = config.lease;
    engine.cancel_grace = config.cancel_grace;
    engine.reconnect_grace = config.agent_reconnect_grace;
    // Every replica on this database tags its instances with the same deployment id.
    let deployment_id = db
        .deployment_id()
        .await
        .context("reading the deployment id from the database")?;
    let runner = Runner::start(
        db,
        provider,
        RunnerSettings {
            public_url,
            core_id: config.core_id.clone(),
            deployment_id,
            registry: config.registry.clone(),
            heartbeat_timeout: config.heartbeat_timeout,
            allow_local_repos: config.allow_local_repos,
            max_log_bytes_per_job: config.max_log_bytes_per_job,
            build_secrets: config.build_secrets.clone(),
            engine,
            sync_interval: config.sync_interval,
            reap_interval: config.reap_interval,
            log_retention: config.log_retention,
            agent_ca_pem: config.tls.agent_ca_pem.clone(),
        },
        shutdown.child_token(),
    );
    tracing::info!(owner, "runner started");
    let auth = Arc::new(ApiAuth::new(config.api_tokens.clone()));
    if auth.is_open() {
        tracing::warn!(
            "no API token is configured: anyone who can reach {addr} may call the API (set STAGELY_API_TOKEN or [api.tokens])"
        );
    }
    let run_events = Arc::new(crate::run_events::RunEvents::default());
    let router = app(AppState {
        runner: runner.clone(),
        auth: auth.clone(),
        limits: config.limits.clone(),
        prices: Arc::new(config.prices.clone()),
        git_reads: Arc::new(tokio::sync::Semaphore::new(
            config.limits.max_concurrent_git_reads,
        )),
        run_events: run_events.clone(),
    });
    if let Some((cert, _)) = &tls {
        reload_on_sighup(cert.clone(), shutdown.clone());
    }
    let (cert, acceptor) = tls.unzip();
    let server = tokio::spawn(serve_http(
        listener,
        router,
        config.limits.clone(),
        acceptor,
        shutdown.clone(),
    ));
    tracing::info!(%addr, registry = %config.registry.host, "stagely core listening");
    Ok(RunningCore {
        addr,
        runner,
        auth,
        run_events,
        shutdown,
        server,
        tls: cert,
    })
}
