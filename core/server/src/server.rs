//! Starting and stopping a core: database, provider, scheduler, HTTP server.
//!
//! Shaped like mini-redis: `main` parses arguments and calls [`run`] (or an embedded core,
//! [`start`]); everything started here watches one `CancellationToken`, and
//! [`RunningCore::stop`] waits for every task (agents cancelled, instances terminated) before
//! the database closes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use stagely_provisioning::Provider;
use stagely_provisioning::local::LocalProvider;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::CoreConfig;
use crate::db::Db;
use crate::engine::EngineConfig;
use crate::http::{ApiAuth, AppState, app};
use crate::runner::{Runner, RunnerSettings};

/// A core serving on a socket.
pub struct RunningCore {
    pub addr: SocketAddr,
    pub runner: Runner,
    /// The API's token check (and its count of refused requests).
    pub auth: Arc<ApiAuth>,
    /// The publishers of watched runs (`GET /api/v1/workflows/{id}/events`).
    pub run_events: Arc<crate::run_events::RunEvents>,
    /// Connections in and requests admitted (its counts show the flood a core is under).
    pub gate: Arc<crate::gate::Gate>,
    /// Cancelled by `stop`; the scheduler's tasks and the HTTP server watch it.
    shutdown: CancellationToken,
    /// The HTTP server task; ends after graceful shutdown.
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    /// The certificate served when the core speaks TLS itself.
    tls: Option<Arc<crate::tls::ReloadingCert>>,
    /// Every route ([`app`]), the one the server serves: for calling handlers without a
    /// socket (`tower::ServiceExt::oneshot`).
    router: axum::Router,
}

impl RunningCore {
    /// `http://ADDR` (or `https://ADDR` with `[tls]` files) of the API.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The core's routes, to call without a socket (the same state the server serves).
    pub fn router(&self) -> axum::Router {
        self.router.clone()
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
    let limits = match &config.provider {
        crate::config::ProviderConfig::Local(limits) => *limits,
        crate::config::ProviderConfig::Ec2(_) => Default::default(),
    };
    let provider =
        LocalProvider::new(agent, config.data_dir.join("instances"))?.with_limits(limits);
    Ok(Arc::new(provider))
}

/// The provider `config` names: local processes, or EC2 (the SDK's standard credential
/// chain and environment: `AWS_REGION`, `AWS_ENDPOINT_URL_EC2`, profiles, instance roles).
pub async fn provider(config: &CoreConfig) -> anyhow::Result<Arc<dyn Provider>> {
    match &config.provider {
        crate::config::ProviderConfig::Local(_) => local_provider(config),
        #[cfg(feature = "ec2")]
        crate::config::ProviderConfig::Ec2(settings) => Ok(Arc::new(
            stagely_provisioning::ec2::Ec2Provider::from_env(settings.clone()).await,
        )),
        #[cfg(not(feature = "ec2"))]
        crate::config::ProviderConfig::Ec2(_) => anyhow::bail!(
            "provider.kind = \"ec2\": this stagely was built without the EC2 provider (the `ec2` feature, on by default; build with `cargo build --release`)"
        ),
    }
}

/// How long in-flight requests get to finish once shutdown began.
const HTTP_DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Raises the soft open-files limit to the hard one (a service's connections, log files and
/// child pipes all take descriptors) and returns the soft limit in force.
pub fn raise_open_files_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    // The kernel's per-process ceiling (`fs.nr_open`) when the hard limit says "infinity".
    const NR_OPEN: u64 = 1 << 20;
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    let target = if hard == nix::sys::resource::RLIM_INFINITY {
        NR_OPEN
    } else {
        hard
    };
    if soft < target {
        match setrlimit(Resource::RLIMIT_NOFILE, target, hard) {
            Ok(()) => return target,
            Err(error) => {
                tracing::warn!("cannot raise the open-files limit from {soft} to {target}: {error}")
            }
        }
    }
    soft
}

/// The connection caps of `limits` that fit in this process's descriptors (after raising the
/// soft limit), agents' share first.
pub fn connection_limits(
    limits: &crate::config::ApiLimits,
) -> anyhow::Result<crate::admission::AdmissionLimits> {
    let open_files = raise_open_files_limit();
    let wanted = crate::admission::AdmissionLimits {
        max_connections: limits.max_connections,
        max_waiting: limits.max_connections,
        max_connections_per_ip: limits.max_connections_per_ip,
        max_agent_connections: limits.max_agent_connections,
    };
    let fitted = crate::admission::budget(open_files, wanted).with_context(|| {
        format!(
            "the open-files limit ({open_files}) leaves no room for connections: raise it (ulimit -n, LimitNOFILE=)"
        )
    })?;
    if fitted != wanted {
        tracing::warn!(
            open_files,
            agents = fitted.max_agent_connections,
            api = fitted.max_connections,
            waiting = fitted.max_waiting,
            "the open-files limit is too low for the configured connection caps; API caps lowered, agents keep their share"
        );
    }
    Ok(fitted)
}

/// Serves `router` on `listener` over HTTP/1.1 (with upgrades, for the agent WebSocket) until
/// `shutdown`, every connection through `gate` (see `gate.rs` and `admission.rs`): accept
/// never stops, so an agent is never queued behind a flood in the kernel's backlog; waiting
/// connections are evicted oldest first (per source address first); a client that does not
/// send a request's headers within `header_read_timeout` (slowloris), or sends nothing on a
/// kept-alive connection for that long, is disconnected; an API connection lives at most
/// `max_connection_lifetime`.
async fn serve_http(
    listener: TcpListener,
    router: axum::Router,
    gate: Arc<crate::gate::Gate>,
    limits: crate::config::ApiLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use hyper_util::rt::TokioTimer;
    // Every connection task, waited for (up to HTTP_DRAIN) at shutdown.
    let tasks = tokio_util::task::TaskTracker::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    let mut tidy = tokio::time::interval(std::time::Duration::from_secs(60));
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    let out_of_descriptors = matches!(
                        error.raw_os_error(),
                        Some(code) if code == nix::libc::EMFILE || code == nix::libc::ENFILE
                    );
                    if out_of_descriptors && gate.evict_oldest() {
                        // A waiting API connection gives its descriptor up; take the
                        // connection waiting in the backlog once it is closed.
                        tracing::debug!("out of descriptors: cut the oldest waiting connection");
                        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    } else {
                        // Out of descriptors with nothing to evict, and the like: back off
                        // instead of spinning.
                        tracing::warn!("accepting a connection failed: {error}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                    continue;
                }
            },
            _ = tidy.tick() => {
                gate.forget_quiet_addresses();
                continue;
            }
            () = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let ticket = gate.accept(peer.ip());
        let router = router.clone();
        let request_gate = gate.clone();
        let (id, ip) = (ticket.id, ticket.ip);
        let service = hyper::service::service_fn(move |request| {
            request_gate.clone().serve(id, ip, router.clone(), request)
        });
        let builder = builder.clone();
        let stop = shutdown.clone();
        let tls = tls.clone();
        let gate = gate.clone();
        let lifetime = limits.max_connection_lifetime;
        // The handshake shares the header deadline: a client that stalls it is dropped.
        let handshake_limit = limits.header_read_timeout;
        tasks.spawn(async move {
            let cut = ticket.cut.clone();
            let serving = async {
                match tls {
                    None => serve_connection(&builder, stream, service, &stop, &gate, id, lifetime).await,
                    Some(acceptor) => {
                        let accepted = tokio::select! {
                            accepted = tokio::time::timeout(handshake_limit, acceptor.accept(stream)) => accepted,
                            () = stop.cancelled() => return,
                        };
                        match accepted {
                            Ok(Ok(stream)) => serve_connection(&builder, stream, service, &stop, &gate, id, lifetime).await,
                            // A failed or slow handshake is the client's problem; say it at debug.
                            Ok(Err(error)) => tracing::debug!("TLS handshake failed: {error}"),
                            Err(_) => tracing::debug!("TLS handshake timed out"),
                        }
                    }
                }
            };
            tokio::select! {
                () = serving => {}
                // Evicted to make room: dropped at once (it had no request in flight).
                () = cut.cancelled() => {}
            }
            drop(ticket);
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

/// Serves one accepted connection (plain or TLS) until it ends, shutdown drains it, or (not
/// for an agent's) its lifetime is over: then it finishes its request in flight and closes,
/// cut outright after `HTTP_DRAIN`.
async fn serve_connection<I, S>(
    builder: &hyper::server::conn::http1::Builder,
    io: I,
    service: S,
    stop: &CancellationToken,
    gate: &crate::gate::Gate,
    id: crate::admission::ConnId,
    lifetime: std::time::Duration,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = axum::body::Body>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let connection = builder
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(connection);
    let expiry = tokio::time::sleep(lifetime);
    tokio::pin!(expiry);
    let mut expiring = true;
    // Timeouts and resets end connections with an error: nothing to report.
    loop {
        tokio::select! {
            _ = connection.as_mut() => return,
            () = &mut expiry, if expiring => {
                expiring = false;
                if gate.is_agent(id) {
                    continue;
                }
                connection.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(HTTP_DRAIN, connection.as_mut()).await;
                return;
            }
            () = stop.cancelled() => {
                // Finish the request in flight, then close.
                connection.as_mut().graceful_shutdown();
                let _ = connection.await;
                return;
            }
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

/// The service: serves `config` on `listener` until `shutdown` is cancelled, then stops
/// gracefully (this core's live jobs handed back, their instances terminated, requests in
/// flight drained, the database closed). `stagely serve` is this and signal handling.
pub async fn run(
    listener: TcpListener,
    config: CoreConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let provider = provider(&config).await?;
    let core = start(config, listener, provider).await?;
    shutdown.cancelled().await;
    tracing::info!("shutting down: handing this core's jobs back and terminating their instances");
    core.stop().await;
    Ok(())
}

/// Opens the database, recovers from an earlier crash, and serves on `listener` with
/// `provider` (an embedded core: `stagely run`, the tests); [`RunningCore::stop`] ends it.
pub async fn start(
    config: CoreConfig,
    listener: TcpListener,
    provider: Arc<dyn Provider>,
) -> anyhow::Result<RunningCore> {
    // Everything the core writes is its own: the databases (and their WAL and journal
    // files), instance directories, agent logs. The umask covers files made by SQLite and
    // child processes; directories are made 0700 explicitly.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    stagely_provisioning::private_dir(&config.data_dir)
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
    let connection_limits = connection_limits(&config.limits)?;
    tracing::info!(
        agents = connection_limits.max_agent_connections,
        api = connection_limits.max_connections,
        waiting = connection_limits.max_waiting,
        per_ip = connection_limits.max_connections_per_ip,
        "connection caps"
    );
    let gate = crate::gate::Gate::new(
        connection_limits,
        auth.clone(),
        config.limits.unauthenticated_requests_per_ip_per_sec,
    );
    let views = crate::views::RunViews::new(runner.db().clone(), Arc::new(config.prices.clone()));
    let run_events = crate::run_events::RunEvents::new(runner.clone(), views.clone());
    let submissions = crate::submit::Submissions::new(
        runner.clone(),
        crate::submit::GitReadLimits {
            max_concurrent: config.limits.max_concurrent_git_reads,
            timeout: config.limits.git_read_timeout,
        },
    );
    let router = app(AppState {
        runner: runner.clone(),
        auth: auth.clone(),
        limits: config.limits.clone(),
        views,
        submissions,
        run_events: run_events.clone(),
        streams: crate::http::SseStreams::new(
            config.limits.max_sse_streams,
            config.limits.max_sse_streams_per_token,
        ),
    });
    if let Some((cert, _)) = &tls {
        reload_on_sighup(cert.clone(), shutdown.clone());
    }
    let (cert, acceptor) = tls.unzip();
    let server = tokio::spawn(serve_http(
        listener,
        router.clone(),
        gate.clone(),
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
        gate,
        shutdown,
        server,
        tls: cert,
        router,
    })
}
