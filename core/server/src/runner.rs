//! The runner: the I/O loop around the [`Engine`]. One task owns the engine; it feeds it
//! commands (API), events (provider calls, agent links) and store snapshots, and applies the
//! actions it drains: guarded writes and claims on the store, instance creation and
//! termination on the provider, work and cancels to agent links.
//!
//! Who owns what: the loop task owns the engine and the map of agent links (one command
//! channel per live attempt; dropping the sender closes the link). Provider calls, work-frame
//! assembly and link sessions run as tasks in one [`TaskTracker`], each reporting back through
//! the loop's bounded channel. [`Runner::shutdown`] drains the engine (this core's live jobs
//! are handed back to the queue and their instances terminated), stops the loop and waits for
//! every task.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::WebSocket;
use sha2::{Digest, Sha256};
use stagely_cloud_init::{AgentConfig, Bootstrap};
use stagely_protocol::{Build, BuildConfig, Merge, Message, RegistryOptions, SourceContext};
use stagely_provisioning::{InstanceState, MachineSize, MachineSpec, Provider};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::agent_link::{self, LinkCommand, LinkContext, WorkOrder};
use crate::config::RegistryConfig;
use crate::db::{AttemptClaim, Db, JobRow, RunRow};
use crate::engine::{
    Action, AttemptOutcome, CancelReason, Command, CommandError, Engine, EngineConfig, Event,
    InfraKind, QueueEntry, Timestamp, Transition, Via,
};
use crate::images::{repository_key, strip_tag, tag_for};
use crate::stagely_yaml::{JobKind, JobSpec};

/// Messages queued for the loop before senders wait.
const LOOP_QUEUE: usize = 4096;
/// Commands queued for one agent link.
const LINK_QUEUE: usize = 16;
/// How long a created link waits for its work frame.
const WORK_WAIT: Duration = Duration::from_secs(60);
/// Changes a watcher may fall behind by before it is told only "something changed".
const CHANGES_QUEUE: usize = 1024;

/// What one of this core's writes changed (see [`Runner::changes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changed {
    /// The run's row or one of its jobs'.
    Run(Arc<str>),
    /// Not known which run (a job no longer in the engine's view): any may have.
    Any,
}

/// Runner settings taken from the core configuration.
#[derive(Debug, Clone)]
pub struct RunnerSettings {
    /// URL agents dial (`http://127.0.0.1:PORT` for local instances).
    pub public_url: String,
    pub core_id: String,
    /// The store's deployment id, shared by every replica on it (`stagely:deployment`).
    pub deployment_id: String,
    pub registry: RegistryConfig,
    pub heartbeat_timeout: Duration,
    /// Local paths and `file://` repositories are accepted (and agents may fetch them).
    pub allow_local_repos: bool,
    pub max_log_bytes_per_job: u64,
    /// `[secrets]`: values of secret build arguments the core supplies.
    pub build_secrets: BTreeMap<String, stagely_protocol::Secret>,
    pub engine: EngineConfig,
    /// How often unfinished runs are re-read from the store.
    pub sync_interval: Duration,
    /// How often leftover instances are reaped.
    pub reap_interval: Duration,
    /// Logs of runs finished longer ago are deleted (hourly); `None`: kept.
    pub log_retention: Option<Duration>,
    /// PEM of the CA agents should trust for `public_url` (`[tls] agent_ca_file`), delivered
    /// in their user-data.
    pub agent_ca_pem: Option<String>,
}

/// Secrets a run needs that must never be stored.
#[derive(Clone, Default)]
pub struct RunSecrets {
    /// Token for cloning a private repository over HTTPS (sent as an HTTP header).
    pub clone_token: Option<String>,
    /// Values of the run's secret build arguments (`secret_build_args`), from the submission
    /// or the core's `[secrets]`.
    pub build_secrets: BTreeMap<String, stagely_protocol::Secret>,
}

impl std::fmt::Debug for RunSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunSecrets")
            .field(
                "clone_token",
                &self.clone_token.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "build_secrets",
                &self.build_secrets.keys().collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// The core is stopping and takes no new work.
#[derive(Debug, thiserror::Error)]
#[error("the core is shutting down")]
pub struct ShuttingDown;

/// Why an agent connection was refused (before upgrade).
#[derive(Debug, PartialEq, Eq)]
pub enum ClaimError {
    /// No, wrong, or spent token (its attempt ended).
    Unauthorized,
    /// The store could not be asked.
    Unavailable,
}

/// A command from the API that the engine may refuse.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("the core is shutting down")]
    ShuttingDown,
    #[error("database: {0}")]
    Db(#[from] crate::db::DbError),
}

enum Msg {
    Event(Event),
    /// The attempt's instance exists.
    Provisioned {
        job_id: String,
        attempt: u32,
        instance_id: String,
    },
    /// A run was created: load it (as `create_run` stored it; no read).
    Submitted(Box<crate::engine::RunSnapshot>),
    Cancel {
        run_id: String,
        reason: CancelReason,
        reply: oneshot::Sender<Result<(), RunnerError>>,
    },
    Queue(oneshot::Sender<Vec<QueueEntry>>),
    /// A periodic sync's read, taken when [`Shared::writes`] was `generation`.
    Synced {
        generation: u64,
        result: Result<Vec<crate::engine::RunSnapshot>, crate::db::DbError>,
    },
    Agent {
        job_id: String,
        attempt: u32,
        socket: WebSocket,
    },
    /// A link's session ended with its socket still open (STATUS acknowledged): keep it for a
    /// handover, or close it.
    Idle {
        job_id: String,
        attempt: u32,
        socket: WebSocket,
    },
}

struct Shared {
    db: Db,
    provider: Arc<dyn Provider>,
    settings: RunnerSettings,
    link: LinkContext,
    /// Secrets of runs this core accepted (clone tokens, submitted secret values). Never
    /// stored: a run taken over by another core (or after a restart) gets the core's
    /// `[secrets]` only. Added by `submitted`, removed when the run finishes.
    run_secrets: Mutex<HashMap<String, RunSecrets>>,
    /// Runs whose end is being stored (after their instances' terminations).
    finishing: Mutex<std::collections::HashSet<String>>,
    /// Work frames built before their attempt's instance was asked for, until sent: an agent
    /// that connects gets its BUILD without waiting for the store.
    prepared: Mutex<HashMap<(String, u32), Box<WorkOrder>>>,
    /// The rows of jobs this core just created (as `create_run` stored them; the fields a
    /// work frame and an instance need never change), so their first provisioning reads
    /// nothing. Taken when used, dropped with their run; at most [`FRESH_ROWS_LIMIT`].
    fresh_rows: Mutex<HashMap<String, (Arc<RunRow>, JobRow)>>,
    /// Agent token hashes this core minted for its live attempts: the agent endpoint accepts
    /// them without asking the store (tokens of other replicas' attempts are looked up there).
    minted: Mutex<Minted>,
    /// What the reaper terminated, by reason.
    reaper: ReaperStats,
    /// Every task the runner started; `shutdown` waits on it.
    tasks: TaskTracker,
    /// Counts this core's writes to runs and jobs, bumped once each has landed: a sync read
    /// taken while it moved may predate one of them and is not applied.
    writes: std::sync::atomic::AtomicU64,
    /// Which run each of this core's writes changed, for those waiting on a change (run
    /// event streams).
    changes: tokio::sync::broadcast::Sender<Changed>,
    /// Cancelled by `shutdown`: the loop drains the engine and stops.
    shutdown: CancellationToken,
}

/// Handle to the runner; cheap to clone.
#[derive(Clone)]
pub struct Runner {
    shared: Arc<Shared>,
    /// To the loop task; closed when the loop ends.
    tx: mpsc::Sender<Msg>,
    /// Completed when the loop task has ended.
    stopped: Arc<tokio::sync::Notify>,
    loop_done: Arc<std::sync::atomic::AtomicBool>,
}

impl Runner {
    /// Starts the loop: loads every unfinished run, reaps leftover instances, then serves.
    pub fn start(
        db: Db,
        provider: Arc<dyn Provider>,
        settings: RunnerSettings,
        shutdown: CancellationToken,
    ) -> Runner {
        let link = LinkContext {
            db: db.clone(),
            hub: Arc::new(crate::log_hub::LogHub::default()),
            images: Arc::new(crate::image_check::ImageChecker::new(&settings.registry)),
            heartbeat_timeout: settings.heartbeat_timeout,
            max_log_bytes_per_job: settings.max_log_bytes_per_job,
            reconnect_grace: settings.engine.reconnect_grace,
        };
        let shared = Arc::new(Shared {
            db,
            provider,
            link,
            settings,
            run_secrets: Mutex::new(HashMap::new()),
            finishing: Mutex::new(std::collections::HashSet::new()),
            prepared: Mutex::new(HashMap::new()),
            fresh_rows: Mutex::new(HashMap::new()),
            minted: Mutex::new(Minted::default()),
            reaper: ReaperStats::default(),
            tasks: TaskTracker::new(),
            writes: std::sync::atomic::AtomicU64::new(0),
            changes: tokio::sync::broadcast::channel(CHANGES_QUEUE).0,
            shutdown,
        });
        let (tx, rx) = mpsc::channel(LOOP_QUEUE);
        let runner = Runner {
            shared: shared.clone(),
            tx: tx.clone(),
            stopped: Arc::new(tokio::sync::Notify::new()),
            loop_done: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        };
        let engine = Engine::new(shared.settings.engine.clone());
        let stopped = runner.stopped.clone();
        let done = runner.loop_done.clone();
        let span = tracing::info_span!("runner", owner = %shared.settings.engine.owner);
        let tasks = shared.tasks.clone();
        tasks.spawn(
            async move {
                let mut state = LoopState {
                    shared: shared.clone(),
                    engine,
                    links: HashMap::new(),
                    idle: HashMap::new(),
                    terminating: HashMap::new(),
                    tokens: HashMap::new(),
                    sync_state: SyncState::default(),
                    tx,
                };
                // A panic here would leave the API up with nothing scheduling: it is logged,
                // and `/healthz` turns 503 so the service is restarted (its successor takes
                // the jobs over at once).
                let ran = std::panic::AssertUnwindSafe(state.run(rx));
                if futures_util::FutureExt::catch_unwind(ran).await.is_err() {
                    tracing::error!("the runner loop panicked; this core no longer schedules");
                }
                done.store(true, std::sync::atomic::Ordering::SeqCst);
                stopped.notify_waiters();
            }
            .instrument(span),
        );
        runner
    }

    pub fn db(&self) -> &Db {
        &self.shared.db
    }

    pub fn settings(&self) -> &RunnerSettings {
        &self.shared.settings
    }

    /// The loop runs (false after shutdown, or if it died).
    pub fn is_alive(&self) -> bool {
        !self.loop_done.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// True once shutdown began; no new runs are accepted.
    pub fn is_shutting_down(&self) -> bool {
        self.shared.shutdown.is_cancelled()
    }

    /// A run was stored: keep its secrets (memory only) and hand it to the engine.
    pub async fn submitted(
        &self,
        run: crate::engine::RunSnapshot,
        rows: (RunRow, Vec<JobRow>),
        secrets: RunSecrets,
    ) -> Result<(), ShuttingDown> {
        if self.is_shutting_down() {
            return Err(ShuttingDown);
        }
        if let Ok(mut all) = self.shared.run_secrets.lock() {
            all.insert(run.id.clone(), secrets);
        }
        if let Ok(mut fresh) = self.shared.fresh_rows.lock()
            && fresh.len() + rows.1.len() <= FRESH_ROWS_LIMIT
        {
            let run_row = Arc::new(rows.0);
            for job in rows.1 {
                fresh.insert(job.id.clone(), (run_row.clone(), job));
            }
        }
        // The run is stored: a sync read begun before does not have it.
        self.shared.wrote([Changed::Run(run.id.as_str().into())]);
        self.tx
            .send(Msg::Submitted(Box::new(run)))
            .await
            .map_err(|_| ShuttingDown)
    }

    /// Cancels a run (its jobs end `cancelled`, their instances are terminated).
    pub async fn cancel(&self, run_id: &str, reason: CancelReason) -> Result<(), RunnerError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Msg::Cancel {
                run_id: run_id.to_string(),
                reason,
                reply,
            })
            .await
            .map_err(|_| RunnerError::ShuttingDown)?;
        answer.await.map_err(|_| RunnerError::ShuttingDown)?
    }

    /// Jobs waiting for an instance, in claim order.
    pub async fn queue(&self) -> Result<Vec<QueueEntry>, ShuttingDown> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Msg::Queue(reply))
            .await
            .map_err(|_| ShuttingDown)?;
        answer.await.map_err(|_| ShuttingDown)
    }

    /// Live log viewers' fan-out.
    pub fn log_hub(&self) -> &Arc<crate::log_hub::LogHub> {
        &self.shared.link.hub
    }

    /// Hears which run each of this core's writes to a run or job changed, once it landed
    /// (other replicas' writes are not heard here: a watcher also re-reads now and then).
    pub fn changes(&self) -> tokio::sync::broadcast::Receiver<Changed> {
        self.shared.changes.subscribe()
    }

    /// Cancelled when the core shuts down (long-lived responses end with it).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shared.shutdown.clone()
    }

    /// What the reaper did since this core started.
    pub fn reaper_stats(&self) -> &ReaperStats {
        &self.shared.reaper
    }

    /// The live attempt an agent token was issued for.
    pub async fn authenticate_agent(&self, token: &str) -> Result<(String, u32), ClaimError> {
        let hash = token_hash(token);
        let own = self
            .shared
            .minted
            .lock()
            .ok()
            .and_then(|minted| minted.by_hash.get(&hash).cloned());
        let found = match own {
            Some(found) => Ok(Some(found)),
            None => self.shared.db.attempt_for_token(&hash).await,
        };
        // A token is good until its attempt ends: an agent whose connection dropped dials
        // again with it (and a new connection replaces the old one).
        match found {
            Ok(Some(found)) => Ok(found),
            Ok(None) => Err(ClaimError::Unauthorized),
            Err(error) => {
                tracing::error!("looking up an agent token failed: {error}");
                Err(ClaimError::Unavailable)
            }
        }
    }

    /// Hands an upgraded agent connection to the loop.
    pub async fn agent_connected(&self, job_id: String, attempt: u32, socket: WebSocket) {
        let _ = self
            .tx
            .send(Msg::Agent {
                job_id,
                attempt,
                socket,
            })
            .await;
    }

    /// Graceful stop: this core's live jobs go back to the queue (not counted as failures),
    /// their instances are terminated, and every task has ended when this returns.
    pub async fn shutdown(&self) {
        let stopped = self.stopped.notified();
        self.shared.shutdown.cancel();
        if !self.loop_done.load(std::sync::atomic::Ordering::SeqCst) {
            stopped.await;
        }
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
    }
}

fn now() -> Timestamp {
    crate::clock::now()
}

impl Shared {
    /// One of this core's writes to a run or job has landed: counted (for the sync), and
    /// what it `changed` told to the watchers (nobody may be listening).
    fn wrote(&self, changed: impl IntoIterator<Item = Changed>) {
        self.writes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        for what in changed {
            let _ = self.changes.send(what);
        }
    }
}

/// The loop task's state.
struct LoopState {
    shared: Arc<Shared>,
    engine: Engine,
    /// Command channels of the live attempts' agent links.
    links: HashMap<(String, u32), mpsc::Sender<LinkCommand>>,
    /// Sockets of finished attempts kept for a handover (merge on the last builder).
    idle: HashMap<(String, u32), WebSocket>,
    /// Terminations in flight, by job: a run is stored as finished only once its instances
    /// are gone, so a final run never has a live instance.
    terminating: HashMap<String, Vec<tokio::task::JoinHandle<()>>>,
    /// Agent tokens of attempts claimed and not yet provisioned (the store has their hashes).
    tokens: HashMap<(String, u32), String>,
    sync_state: SyncState,
    tx: mpsc::Sender<Msg>,
}

/// Token hashes of the live attempts this core minted, with the reverse index so an
/// attempt's end drops its hash without a scan.
#[derive(Default)]
struct Minted {
    by_hash: HashMap<String, (String, u32)>,
    by_attempt: HashMap<(String, u32), String>,
}

impl Minted {
    fn insert(&mut self, hash: String, attempt: (String, u32)) {
        if let Some(old) = self.by_attempt.insert(attempt.clone(), hash.clone()) {
            self.by_hash.remove(&old);
        }
        self.by_hash.insert(hash, attempt);
    }

    fn remove(&mut self, attempt: &(String, u32)) {
        if let Some(hash) = self.by_attempt.remove(attempt) {
            self.by_hash.remove(&hash);
        }
    }
}

/// Most job rows kept for a first provisioning ([`Shared::fresh_rows`]); past it, rows are
/// read.
const FRESH_ROWS_LIMIT: usize = 10_000;

/// Periodic sync reads in a task discarded in a row (the core wrote meanwhile) before one
/// runs in the loop.
const MAX_DISCARDED_SYNCS: u32 = 5;

/// Longest a periodic sync's read may take.
const SYNC_READ_LIMIT: Duration = Duration::from_secs(30);

#[derive(Default)]
struct SyncState {
    /// A read is running in a task.
    in_flight: bool,
    /// Reads discarded in a row.
    discarded: u32,
}

impl LoopState {
    async fn run(&mut self, mut rx: mpsc::Receiver<Msg>) {
        self.sync().await;
        self.spawn_reaper();
        self.apply().await;
        let mut sync_tick = tokio::time::interval(self.shared.settings.sync_interval);
        sync_tick.reset();
        let mut reap_tick = tokio::time::interval(self.shared.settings.reap_interval);
        reap_tick.reset();
        // The first tick is at once: old logs go at start, then hourly.
        let mut retention_tick = tokio::time::interval(RETENTION_INTERVAL);
        retention_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let wake = self
                .engine
                .poll_timeout()
                .map(|at| tokio::time::Instant::now() + now().until(at))
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                biased;
                () = self.shared.shutdown.cancelled() => break,
                message = rx.recv() => match message {
                    Some(message) => self.handle(message).await,
                    None => break,
                },
                () = tokio::time::sleep_until(wake) => self.engine.handle_timeout(now()),
                _ = sync_tick.tick() => self.tick_sync().await,
                _ = reap_tick.tick() => self.spawn_reaper(),
                _ = retention_tick.tick() => self.spawn_log_retention(),
            }
            self.apply().await;
        }
        // Drain: hand this core's jobs back and terminate their instances.
        if let Err(error) = self.engine.command(Command::Drain, now()) {
            tracing::error!("the engine refused to drain: {error}");
        }
        self.apply().await;
        self.links.clear();
        for (_, mut socket) in self.idle.drain() {
            agent_link::close(&mut socket, None).await;
        }
        rx.close();
        // Late reports (an instance created after the drain) must not leak instances.
        while let Some(message) = rx.recv().await {
            if let Msg::Provisioned { instance_id, .. } = message {
                drop(self.spawn_terminate(instance_id));
            }
        }
    }

    async fn handle(&mut self, message: Msg) {
        let at = now();
        match message {
            Msg::Event(event) => {
                self.engine.handle(event, at);
            }
            Msg::Provisioned {
                job_id,
                attempt,
                instance_id,
            } => {
                self.engine.handle(
                    Event::InstanceCreated {
                        job_id,
                        attempt,
                        instance_id,
                    },
                    at,
                );
            }
            Msg::Submitted(run) => {
                if let Err(error) = self.engine.command(Command::Submit(*run), at) {
                    tracing::error!("the engine refused a submitted run: {error}");
                }
            }
            Msg::Cancel {
                run_id,
                reason,
                reply,
            } => {
                let mut result = self.engine.command(
                    Command::Cancel {
                        run_id: run_id.clone(),
                        reason: reason.clone(),
                    },
                    at,
                );
                if let Err(CommandError::UnknownRun(_)) = &result {
                    // Not in view (finished, or created an instant ago): ask the store.
                    match self.shared.db.run_snapshot(&run_id).await {
                        Ok(Some(snapshot)) if snapshot.status.is_final() => {
                            result = Err(CommandError::RunFinished {
                                run: run_id.clone(),
                                status: snapshot.status,
                            });
                        }
                        Ok(Some(snapshot)) => {
                            self.engine.handle(Event::Load(snapshot), at);
                            result = self.engine.command(Command::Cancel { run_id, reason }, at);
                        }
                        Ok(None) => {}
                        Err(error) => {
                            let _ = reply.send(Err(error.into()));
                            return;
                        }
                    }
                }
                let _ = reply.send(result.map_err(RunnerError::from));
            }
            Msg::Queue(reply) => {
                let _ = reply.send(self.engine.queue());
            }
            Msg::Synced { generation, result } => self.synced(generation, result),
            Msg::Agent {
                job_id,
                attempt,
                socket,
            } => {
                let key = (job_id.clone(), attempt);
                if let Some(link) = self.links.get(&key) {
                    // The agent dialled again (its connection dropped): the link resumes it
                    // on the new socket.
                    tracing::info!(%job_id, attempt, "the agent reconnected");
                    if let Err(error) = link.try_send(LinkCommand::Reconnected(Box::new(socket))) {
                        let socket = match error {
                            mpsc::error::TrySendError::Full(LinkCommand::Reconnected(socket))
                            | mpsc::error::TrySendError::Closed(LinkCommand::Reconnected(socket)) => {
                                *socket
                            }
                            _ => return,
                        };
                        self.spawn_close(socket);
                    }
                    return;
                }
                if !self.engine.awaits_agent(&job_id, attempt) {
                    // Not an attempt this core holds (another replica's, or handed back while
                    // this core shuts down): the agent dials again and finds its owner, or
                    // the core that adopts the attempt.
                    tracing::info!(%job_id, attempt, "turned away an agent of an attempt this core does not hold");
                    self.spawn_close(socket);
                    return;
                }
                let (commands, receiver) = mpsc::channel(LINK_QUEUE);
                self.links.insert(key, commands);
                self.spawn_link(job_id.clone(), attempt, socket, receiver);
                self.engine
                    .handle(Event::AgentConnected { job_id, attempt }, at);
            }
            Msg::Idle {
                job_id,
                attempt,
                socket,
            } => {
                self.idle.insert((job_id, attempt), socket);
            }
        }
    }

    /// Re-reads every unfinished run (other replicas' changes, cancels made elsewhere): one
    /// engine input, so the rules run once over all of them. In the loop: at start, and when
    /// reads in a task kept being overtaken ([`LoopState::tick_sync`]).
    async fn sync(&mut self) {
        match self.shared.db.unfinished_runs().await {
            Ok(snapshots) => {
                self.engine.handle(Event::Sync(snapshots), now());
            }
            Err(error) => tracing::error!("reading unfinished runs failed: {error}"),
        }
        self.sync_state.discarded = 0;
    }

    /// The periodic sync. Reading hundreds of runs takes milliseconds, so the read runs in a
    /// task and the loop keeps dispatching meanwhile; the result is applied only if none of
    /// this core's writes landed during the read ([`Shared::writes`]): an older view would
    /// undo the loop's own changes. After [`MAX_DISCARDED_SYNCS`] discarded reads in a row (a
    /// core that never stops writing) the sync runs in the loop.
    async fn tick_sync(&mut self) {
        if self.sync_state.in_flight {
            return;
        }
        if self.sync_state.discarded >= MAX_DISCARDED_SYNCS {
            self.sync().await;
            return;
        }
        self.sync_state.in_flight = true;
        let shared = self.shared.clone();
        let tx = self.tx.clone();
        self.shared.tasks.spawn(async move {
            let generation = shared.writes.load(std::sync::atomic::Ordering::SeqCst);
            // Bounded: a read that never returns would stop every later sync.
            let result =
                match tokio::time::timeout(SYNC_READ_LIMIT, shared.db.unfinished_runs()).await {
                    Ok(result) => result,
                    Err(_) => Err(crate::db::DbError::Unanswered {
                        what: "the read of unfinished runs",
                        secs: SYNC_READ_LIMIT.as_secs(),
                    }),
                };
            let _ = tx.send(Msg::Synced { generation, result }).await;
        });
    }

    /// A periodic sync's read is back.
    fn synced(
        &mut self,
        generation: u64,
        result: Result<Vec<crate::engine::RunSnapshot>, crate::db::DbError>,
    ) {
        self.sync_state.in_flight = false;
        match result {
            Ok(snapshots)
                if generation == self.shared.writes.load(std::sync::atomic::Ordering::SeqCst) =>
            {
                self.engine.handle(Event::Sync(snapshots), now());
                self.sync_state.discarded = 0;
            }
            Ok(_) => self.sync_state.discarded += 1,
            Err(error) => tracing::error!("reading unfinished runs failed: {error}"),
        }
    }

    async fn reload(&mut self, run_id: &str) {
        let at = now();
        match self.shared.db.run_snapshot(run_id).await {
            Ok(Some(snapshot)) => {
                self.engine.handle(Event::Load(snapshot), at);
            }
            Ok(None) => {
                self.engine.handle(
                    Event::Unload {
                        run_id: run_id.to_string(),
                    },
                    at,
                );
            }
            Err(error) => tracing::error!(run_id, "reloading a run failed: {error}"),
        }
    }

    async fn reload_job(&mut self, job_id: &str) {
        match self.shared.db.job(job_id).await {
            Ok(Some(job)) => self.reload(&job.workflow_run_id).await,
            Ok(None) => {}
            Err(error) => tracing::error!(job_id, "reloading a job failed: {error}"),
        }
    }

    /// Applies every action the engine has, in order.
    async fn apply(&mut self) {
        while let Some(action) = self.engine.poll_action() {
            self.apply_one(action).await;
        }
    }

    /// Applies one action.
    async fn apply_one(&mut self, action: Action) {
        match action {
            Action::Persist(Transition::RunFinished {
                run_id,
                status,
                message,
            }) => self.finish_run(run_id, status, message).await,
            Action::Persist(transition) => self.persist(transition).await,
            Action::Claim {
                claims,
                lease_until,
                max_live_instances,
                max_live_per_environment,
            } => {
                let owner = self.shared.settings.engine.owner.clone();
                // Each attempt's agent token is minted now and bound by the claim itself.
                let (tokens, claims): (Vec<String>, Vec<AttemptClaim>) = claims
                    .into_iter()
                    .map(|claim| {
                        let token = new_token();
                        let token_hash = token_hash(&token);
                        (token, AttemptClaim { claim, token_hash })
                    })
                    .unzip();
                let result = self
                    .shared
                    .db
                    .claim(
                        &owner,
                        &claims,
                        lease_until,
                        max_live_instances,
                        max_live_per_environment,
                        now(),
                    )
                    .await;
                // A won claim moved its job to `provisioning`.
                let moved: Vec<Changed> = match &result {
                    Ok((won, _)) => won.iter().map(|job_id| self.changed_job(job_id)).collect(),
                    Err(_) => Vec::new(),
                };
                self.shared.wrote(moved);
                let (won, lost) = match result {
                    Ok(answer) => answer,
                    Err(error) => {
                        tracing::error!("claiming jobs failed: {error}");
                        (
                            Vec::new(),
                            claims.iter().map(|c| c.claim.job_id.clone()).collect(),
                        )
                    }
                };
                let taken: HashSet<&str> = won.iter().map(String::as_str).collect();
                for (token, AttemptClaim { claim, token_hash }) in tokens.into_iter().zip(claims) {
                    if taken.contains(claim.job_id.as_str()) {
                        if let Ok(mut minted) = self.shared.minted.lock() {
                            minted.insert(token_hash, (claim.job_id.clone(), claim.attempt));
                        }
                        self.tokens.insert((claim.job_id, claim.attempt), token);
                    }
                }
                let reload: Vec<String> = lost.clone();
                self.engine.handle(Event::Claimed { won, lost }, now());
                for job_id in reload {
                    self.reload_job(&job_id).await;
                }
            }
            Action::CreateInstance {
                job_id,
                run_id,
                attempt,
            } => {
                let token = self.tokens.remove(&(job_id.clone(), attempt));
                let handle = self.spawn_provision(job_id.clone(), run_id, attempt, token);
                // A run's end waits for its provider calls too.
                let pending = self.terminating.entry(job_id).or_default();
                pending.retain(|handle| !handle.is_finished());
                pending.push(handle);
            }
            Action::SendWork {
                job_id,
                run_id,
                attempt,
                via,
            } => self.send_work(job_id, run_id, attempt, via).await,
            Action::Release { job_id, attempt } => {
                // Dropping the sender closes the link without ending the attempt; its agent
                // dials again and resumes with whichever core adopts the attempt.
                tracing::info!(
                    job_id,
                    attempt,
                    "handing a running attempt back: its agent resumes with the next core"
                );
                self.links.remove(&(job_id, attempt));
            }
            Action::SendCancel {
                job_id,
                attempt,
                reason,
            } => {
                if let Some(link) = self.links.get(&(job_id, attempt)) {
                    let _ = link.try_send(LinkCommand::Cancel(reason));
                }
            }
            Action::CheckInstance {
                job_id,
                attempt,
                instance_id,
            } => self.spawn_check_instance(job_id, attempt, instance_id),
            Action::Terminate {
                job_id,
                attempt,
                instance_id,
            } => {
                let key = (job_id, attempt);
                self.tokens.remove(&key);
                if let Ok(mut prepared) = self.shared.prepared.lock() {
                    prepared.remove(&key);
                }
                if let Ok(mut minted) = self.shared.minted.lock() {
                    minted.remove(&key);
                }
                // Dropping the sender closes the link. The attempt is over: its token no
                // longer resolves.
                self.links.remove(&key);
                if let Some(socket) = self.idle.remove(&key) {
                    self.spawn_close(socket);
                }
                // The instance the engine knows, and any other recorded for the attempt
                // (one whose creation a killed core never reported).
                let handle = self.spawn_terminate_attempt(key.0.clone(), key.1, instance_id);
                let pending = self.terminating.entry(key.0).or_default();
                pending.retain(|handle| !handle.is_finished());
                pending.push(handle);
            }
        }
    }

    /// Stores a run's end once the terminations of its jobs' instances are done (in a task:
    /// the loop does not wait).
    async fn finish_run(
        &mut self,
        run_id: String,
        status: crate::engine::RunStatus,
        message: Option<String>,
    ) {
        // A sync that read the run before its end was stored loads it again and the engine
        // finishes it again: the first finish (waiting for its terminations) writes the end.
        if let Ok(mut finishing) = self.shared.finishing.lock()
            && !finishing.insert(run_id.clone())
        {
            return;
        }
        let db = &self.shared.db;
        let jobs = match crate::db::retry_transient(|| db.jobs_of_run(&run_id)).await {
            Ok(jobs) => jobs,
            Err(error) => {
                // Without its jobs, this finish cannot wait for their instances: it is not
                // stored now; the next sync loads the run again and finishes it then.
                tracing::error!(run_id, "reading a finished run's jobs failed: {error}");
                if let Ok(mut finishing) = self.shared.finishing.lock() {
                    finishing.remove(&run_id);
                }
                return;
            }
        };
        let handles: Vec<_> = jobs
            .iter()
            .filter_map(|job| self.terminating.remove(&job.id))
            .flatten()
            .collect();
        if let Ok(mut all) = self.shared.run_secrets.lock() {
            all.remove(&run_id);
        }
        if let Ok(mut fresh) = self.shared.fresh_rows.lock() {
            for job in &jobs {
                fresh.remove(&job.id);
            }
        }
        let shared = self.shared.clone();
        self.shared.tasks.spawn(async move {
            for handle in handles {
                let _ = handle.await;
            }
            let transition = Transition::RunFinished {
                run_id: run_id.clone(),
                status,
                message: message.clone(),
            };
            let result = shared.db.apply(&transition, now()).await;
            shared.wrote([Changed::Run(run_id.as_str().into())]);
            match result {
                Ok(true) => tracing::info!(
                    run_id,
                    %status,
                    message = message.as_deref().unwrap_or(""),
                    "run finished"
                ),
                Ok(false) => {}
                Err(error) => tracing::error!(run_id, "storing a run's end failed: {error}"),
            }
            if let Ok(mut finishing) = shared.finishing.lock() {
                finishing.remove(&run_id);
            }
        });
    }

    /// The change a write to `job_id` makes, by its run when the engine still knows it.
    fn changed_job(&self, job_id: &str) -> Changed {
        match self.engine.run_of(job_id) {
            Some(run_id) => Changed::Run(run_id.into()),
            None => Changed::Any,
        }
    }

    async fn persist(&mut self, transition: Transition) {
        let db = &self.shared.db;
        let result = crate::db::retry_transient(|| db.apply(&transition, now())).await;
        let changed = match transition.subject() {
            crate::engine::Subject::Run(run_id) => Some(Changed::Run(run_id.into())),
            crate::engine::Subject::Job(job_id) => Some(self.changed_job(job_id)),
            crate::engine::Subject::Leases => None,
        };
        self.shared.wrote(changed);
        let applied = match result {
            Ok(applied) => applied,
            Err(error) => {
                tracing::error!(?transition, "storing a transition failed: {error}");
                false
            }
        };
        if applied {
            if let Transition::AttemptAdopted {
                job_id,
                attempt,
                from,
                ..
            } = &transition
            {
                tracing::info!(
                    job_id,
                    attempt,
                    from,
                    "adopted a running attempt; waiting for its agent to reconnect"
                );
            }
            // A final job's live log viewers end their streams.
            match &transition {
                Transition::AttemptEnded { job_id, end, .. }
                    if !matches!(end, crate::engine::JobEnd::Requeued { .. }) =>
                {
                    self.shared.link.hub.finished(job_id);
                }
                Transition::JobSkipped { job_id, .. } => self.shared.link.hub.finished(job_id),
                _ => {}
            }
            if let Transition::AttemptEnded {
                job_id,
                attempt,
                takeover: true,
                ..
            } = &transition
            {
                // A dead core's attempt: its instances go now.
                tracing::info!(job_id, attempt, "took over an attempt whose lease expired");
                let handle = self.spawn_terminate_attempt(job_id.clone(), *attempt, None);
                self.terminating
                    .entry(job_id.clone())
                    .or_default()
                    .push(handle);
            }
            return;
        }
        if let Transition::AttemptEnded {
            job_id,
            attempt,
            takeover: true,
            ..
        } = &transition
        {
            // Not written: the owner renewed (it lives), or the attempt already ended (another
            // replica took it, or this write landed and its reply was lost). In the latter
            // cases its instances must still go.
            let shared = self.shared.clone();
            let (job, number) = (job_id.clone(), *attempt);
            let handle = self.shared.tasks.spawn(async move {
                let db = &shared.db;
                let holds = crate::db::retry_transient(|| db.attempt_holds(&job, number, now()));
                if let Ok(false) = holds.await {
                    terminate_attempt(&shared, &job, number, None).await;
                }
            });
            self.terminating
                .entry(job_id.clone())
                .or_default()
                .push(handle);
        }
        // The row moved (another replica, a cancel elsewhere): load the truth.
        match &transition {
            Transition::RunStarted { run_id } | Transition::RunCancelRequested { run_id, .. } => {
                let run_id = run_id.clone();
                self.reload(&run_id).await;
            }
            Transition::RunFinished { .. } | Transition::AttemptReleased { .. } => {}
            Transition::AttemptAdopted {
                job_id, attempt, ..
            } => {
                // Its owner lives after all, or another replica adopted it first.
                let (job_id, attempt) = (job_id.clone(), *attempt);
                self.engine.handle(
                    Event::AdoptionRefused {
                        job_id: job_id.clone(),
                        attempt,
                    },
                    now(),
                );
                self.reload_job(&job_id).await;
            }
            Transition::JobSkipped { job_id, .. }
            | Transition::InstanceStarted { job_id, .. }
            | Transition::JobRunning { job_id, .. }
            | Transition::AttemptEnded { job_id, .. } => {
                let job_id = job_id.clone();
                tracing::warn!(job_id, "a guarded write found the job changed; reloading");
                self.reload_job(&job_id).await;
            }
            Transition::LeasesRenewed { .. } => self.sync().await,
        }
    }

    fn spawn_link(
        &self,
        job_id: String,
        attempt: u32,
        socket: WebSocket,
        mut commands: mpsc::Receiver<LinkCommand>,
    ) {
        let shared = self.shared.clone();
        let tx = self.tx.clone();
        let span = tracing::info_span!("agent", job_id = %job_id, attempt);
        self.shared.tasks.spawn(
            async move {
                let mut socket = socket;
                let deadline = tokio::time::Instant::now() + WORK_WAIT;
                let order = loop {
                    tokio::select! {
                        command = commands.recv() => match command {
                            Some(LinkCommand::Work(order)) => break *order,
                            // The agent dialled again before its work went out: the newer
                            // connection is the one to serve.
                            Some(LinkCommand::Reconnected(newer)) => socket = *newer,
                            _ => {
                                agent_link::close(&mut socket, None).await;
                                return;
                            }
                        },
                        () = tokio::time::sleep_until(deadline) => {
                            tracing::error!("no work arrived for a connected agent");
                            agent_link::close(&mut socket, None).await;
                            return;
                        }
                    }
                };
                // While the agent is away the engine asks the provider whether its instance
                // still runs; the forwarder ends when the link does (its sender dropped).
                let (away, mut seen) = tokio::sync::watch::channel(false);
                let forward = {
                    let (tx, job_id) = (tx.clone(), job_id.clone());
                    async move {
                        while seen.changed().await.is_ok() {
                            let event = if *seen.borrow_and_update() {
                                Event::AgentAway {
                                    job_id: job_id.clone(),
                                    attempt,
                                }
                            } else {
                                Event::AgentBack {
                                    job_id: job_id.clone(),
                                    attempt,
                                }
                            };
                            if tx.send(Msg::Event(event)).await.is_err() {
                                break;
                            }
                        }
                    }
                };
                shared.tasks.spawn(forward.in_current_span());
                let (outcome, socket) =
                    agent_link::serve_attempt(&shared.link, socket, order, &mut commands, &away)
                        .await;
                drop(away);
                if let Some(socket) = socket {
                    let _ = tx
                        .send(Msg::Idle {
                            job_id: job_id.clone(),
                            attempt,
                            socket,
                        })
                        .await;
                }
                if let Some(outcome) = outcome {
                    let _ = tx
                        .send(Msg::Event(Event::Finished {
                            job_id,
                            attempt,
                            outcome,
                        }))
                        .await;
                }
            }
            .instrument(span),
        );
    }

    /// Builds the attempt's BUILD or MERGE and hands it to the agent link.
    async fn send_work(&mut self, job_id: String, run_id: String, attempt: u32, via: Via) {
        let key = match &via {
            Via::OwnAgent | Via::Adopted => (job_id.clone(), attempt),
            Via::AgentOf { job_id, attempt } => (job_id.clone(), *attempt),
        };
        let prepared = match &via {
            Via::OwnAgent => self
                .shared
                .prepared
                .lock()
                .ok()
                .and_then(|mut prepared| prepared.remove(&(job_id.clone(), attempt))),
            Via::AgentOf { .. } | Via::Adopted => None,
        };
        let adopted = via == Via::Adopted;
        let read = match prepared {
            Some(order) => Ok(*order),
            None => work_order(&self.shared, &job_id, &run_id, attempt, adopted).await,
        };
        let mut order = match read {
            Ok(order) => order,
            Err(message) => {
                self.engine.handle(
                    Event::Finished {
                        job_id,
                        attempt,
                        outcome: AttemptOutcome::BuildFailed {
                            exit_code: None,
                            message,
                        },
                    },
                    now(),
                );
                return;
            }
        };
        order.adopted = adopted;
        match via {
            Via::OwnAgent | Via::Adopted => match self.links.get(&key) {
                Some(link) if link.try_send(LinkCommand::Work(Box::new(order))).is_ok() => {}
                _ => {
                    self.engine.handle(
                        Event::Finished {
                            job_id,
                            attempt,
                            outcome: AttemptOutcome::Infrastructure {
                                kind: InfraKind::AgentLost,
                                message: "the agent connection closed before its work was sent"
                                    .into(),
                            },
                        },
                        now(),
                    );
                }
            },
            Via::AgentOf { .. } => match self.idle.remove(&key) {
                // The last builder's agent takes the merge on its open connection.
                Some(socket) => {
                    order.handed_over = true;
                    let (commands, receiver) = mpsc::channel(LINK_QUEUE);
                    let _ = commands.try_send(LinkCommand::Work(Box::new(order)));
                    self.links.insert((job_id.clone(), attempt), commands);
                    // The finished job's link entry is done with.
                    self.links.remove(&key);
                    tracing::info!(job_id, from = %key.0, "merge handed to the last builder's agent");
                    self.spawn_link(job_id, attempt, socket, receiver);
                }
                // Gone (or it does not take more work): a fresh instance.
                None => {
                    self.engine
                        .handle(Event::HandoverFailed { job_id, attempt }, now());
                }
            },
        }
    }

    fn spawn_provision(
        &self,
        job_id: String,
        run_id: String,
        attempt: u32,
        token: Option<String>,
    ) -> tokio::task::JoinHandle<()> {
        let shared = self.shared.clone();
        let tx = self.tx.clone();
        let span = tracing::info_span!("job", run_id = %run_id, job_id = %job_id, attempt);
        self.shared.tasks.spawn(
            async move {
                let message = match provision(&shared, &job_id, &run_id, attempt, token).await {
                    Ok(instance_id) => Msg::Provisioned {
                        job_id,
                        attempt,
                        instance_id,
                    },
                    Err(ProvisionFailure { message, retryable }) => {
                        tracing::warn!(retryable, "provisioning failed: {message}");
                        Msg::Event(Event::InstanceFailed {
                            job_id,
                            attempt,
                            message,
                            retryable,
                        })
                    }
                };
                if let Err(mpsc::error::SendError(Msg::Provisioned { instance_id, .. })) =
                    tx.send(message).await
                {
                    // The loop is gone (shutdown): the instance must not outlive it.
                    terminate(&shared, &instance_id).await;
                }
            }
            .instrument(span),
        )
    }

    /// Asks the provider whether an adopted attempt's instance still runs (in a task: a cloud
    /// call must not hold up the loop) and tells the engine when it does not. A failed call
    /// says nothing: the engine asks again.
    fn spawn_check_instance(&self, job_id: String, attempt: u32, instance_id: String) {
        let shared = self.shared.clone();
        let tx = self.tx.clone();
        let span =
            tracing::info_span!("job", job_id = %job_id, attempt, instance_id = %instance_id);
        self.shared.tasks.spawn(
            async move {
                match shared.provider.instance_state(&instance_id).await {
                    Ok(InstanceState::Running) => {}
                    Ok(InstanceState::Gone { detail }) => {
                        tracing::warn!("the attempt's instance is gone ({detail}): ending it");
                        let _ = tx
                            .send(Msg::Event(Event::InstanceGone {
                                job_id,
                                attempt,
                                detail,
                            }))
                            .await;
                    }
                    Err(error) => {
                        tracing::warn!("cannot tell whether the instance still runs: {error}");
                    }
                }
            }
            .instrument(span),
        );
    }

    /// Closes a socket without holding up the loop (a peer that stopped reading).
    fn spawn_close(&self, mut socket: WebSocket) {
        self.shared.tasks.spawn(async move {
            agent_link::close(&mut socket, None).await;
        });
    }

    fn spawn_terminate_attempt(
        &self,
        job_id: String,
        attempt: u32,
        instance_id: Option<String>,
    ) -> tokio::task::JoinHandle<()> {
        let shared = self.shared.clone();
        self.shared.tasks.spawn(async move {
            terminate_attempt(&shared, &job_id, attempt, instance_id).await;
        })
    }

    fn spawn_terminate(&self, instance_id: String) -> tokio::task::JoinHandle<()> {
        let shared = self.shared.clone();
        self.shared.tasks.spawn(async move {
            terminate(&shared, &instance_id).await;
        })
    }

    /// Terminates instances whose attempt ended, whose owner's lease expired or that
    /// outlived their maximum lifetime, and instances the provider lists for this core's id
    /// that the store does not know (a crash between create and record) once their attempt
    /// no longer holds. Every termination is logged with its reason and counted.
    fn spawn_log_retention(&self) {
        Runner::spawn_log_retention_task(&self.shared);
    }

    fn spawn_reaper(&self) {
        let shared = self.shared.clone();
        self.shared.tasks.spawn(async move {
            let reap = async {
                shared.reaper.sweeps.fetch_add(1, Ordering::Relaxed);
                let (recorded, attempts) = shared.db.reap_facts().await?;
                let doomed = stagely_engine::reaper::plan(
                    &recorded,
                    &attempts,
                    now(),
                    shared.settings.engine.reconnect_grace,
                );
                for (instance_id, reason) in doomed {
                    tracing::info!(instance_id, reason = reason.as_str(), "reaper: terminating an instance");
                    shared.reaper.count(reason);
                    terminate(&shared, &instance_id).await;
                }
                // Instances the provider has for this deployment (any of its cores) but the
                // store does not list as live: a core that died between create and record
                // leaves these behind, and it may never start again. One whose attempt still
                // holds its lease may be mid-record (by its core, alive) and is left alone.
                // Only this deployment's: other deployments may share the account. Instances
                // launched before deployment tags existed are found by this core's id.
                let known: std::collections::HashSet<String> =
                    shared.db.live_instances().await?.into_iter().collect();
                let scopes = [
                    ("stagely:deployment", &shared.settings.deployment_id),
                    ("stagely:core", &shared.settings.core_id),
                ];
                let mut instances = Vec::new();
                for (key, value) in scopes {
                    let tags = BTreeMap::from([(key.to_string(), value.clone())]);
                    match shared.provider.list_instances(&tags).await {
                        Ok(listed) => instances.extend(listed),
                        Err(error) => {
                            shared.reaper.list_failures.fetch_add(1, Ordering::Relaxed);
                            tracing::error!("reaper: listing instances by {key} failed: {error}");
                        }
                    }
                }
                let mut seen = std::collections::HashSet::new();
                for instance in instances {
                    let other_deployment = instance
                        .tags
                        .get("stagely:deployment")
                        .is_some_and(|id| *id != shared.settings.deployment_id);
                    if known.contains(&instance.id)
                        || other_deployment
                        || !seen.insert(instance.id.clone())
                    {
                        continue;
                    }
                    let job = instance.tags.get("stagely:job");
                    let attempt = instance
                        .tags
                        .get("stagely:attempt")
                        .and_then(|a| a.parse::<u32>().ok());
                    if let (Some(job), Some(attempt)) = (job, attempt) {
                        if shared.db.attempt_holds(job, attempt, now()).await? {
                            continue;
                        }
                        let record = crate::db::InstanceRecord {
                            instance_id: &instance.id,
                            provider: shared.provider.name(),
                            job_id: job,
                            attempt,
                            // The core that launched it (maybe another replica).
                            owner: instance
                                .tags
                                .get("stagely:core")
                                .unwrap_or(&shared.settings.core_id),
                            instance_type: &instance.instance_type,
                            market: instance.market.map(|market| market.as_str()),
                            placement: None,
                            expires_at: now(),
                        };
                        // Recorded so its attempt's billing closes; a job this store no
                        // longer has cannot be, and the instance goes all the same.
                        if let Err(error) = shared.db.record_instance(&record, now()).await {
                            tracing::warn!(instance_id = %instance.id, "reaper: recording an unknown instance failed: {error}");
                        }
                    }
                    tracing::info!(instance_id = %instance.id, reason = "unrecorded", "reaper: terminating an instance");
                    shared.reaper.unrecorded.fetch_add(1, Ordering::Relaxed);
                    terminate(&shared, &instance.id).await;
                }
                Ok::<(), crate::db::DbError>(())
            };
            tokio::select! {
                result = reap => if let Err(error) = result {
                    tracing::error!("reaper: sweep failed: {error}");
                },
                () = shared.shutdown.cancelled() => {}
            }
        });
    }
}

/// How often logs past their retention are looked for.
const RETENTION_INTERVAL: Duration = Duration::from_secs(3600);
/// Jobs whose logs one retention statement deletes (short transactions; repeated until none).
const RETENTION_JOBS_PER_BATCH: i64 = 20;

impl Runner {
    /// Deletes the logs of runs that finished longer ago than `log_retention`, a few jobs at
    /// a time, in the background.
    fn spawn_log_retention_task(shared: &Arc<Shared>) {
        let Some(retention) = shared.settings.log_retention else {
            return;
        };
        let shared = shared.clone();
        shared.tasks.clone().spawn(async move {
            let cutoff = now().millis().saturating_sub(
                i64::try_from(retention.as_millis()).unwrap_or(i64::MAX),
            );
            let mut lines = 0u64;
            loop {
                let batch = tokio::select! {
                    batch = shared.db.delete_logs_of_runs_finished_before(cutoff, RETENTION_JOBS_PER_BATCH) => batch,
                    () = shared.shutdown.cancelled() => return,
                };
                match batch {
                    Ok(0) => break,
                    Ok(deleted) => lines += deleted,
                    Err(error) => {
                        tracing::error!("log retention: deleting old logs failed: {error}");
                        return;
                    }
                }
            }
            if lines > 0 {
                tracing::info!(lines, retention_days = retention.as_secs() / 86_400, "log retention: deleted the logs of old runs");
            }
        });
    }
}

/// What the reaper did since the core started (logged too, line by line).
#[derive(Debug, Default)]
pub struct ReaperStats {
    pub sweeps: AtomicU64,
    pub attempt_ended: AtomicU64,
    pub lease_expired: AtomicU64,
    pub no_attempt: AtomicU64,
    pub lifetime: AtomicU64,
    /// Listed by the provider for this core id, unknown to the store.
    pub unrecorded: AtomicU64,
    pub list_failures: AtomicU64,
}

impl ReaperStats {
    fn count(&self, reason: crate::db::ReapReason) {
        use crate::db::ReapReason;
        let counter = match reason {
            ReapReason::AttemptEnded => &self.attempt_ended,
            ReapReason::LeaseExpired => &self.lease_expired,
            ReapReason::NoAttempt => &self.no_attempt,
            ReapReason::Lifetime => &self.lifetime,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Instances terminated by the reaper, every reason together.
    pub fn terminated(&self) -> u64 {
        [
            &self.attempt_ended,
            &self.lease_expired,
            &self.no_attempt,
            &self.lifetime,
            &self.unrecorded,
        ]
        .iter()
        .map(|counter| counter.load(Ordering::Relaxed))
        .sum()
    }
}

/// Past a job's timeout and boot timeout, how much longer its instance may live before the
/// reaper terminates it whatever its attempt says.
pub const LIFETIME_MARGIN: Duration = Duration::from_secs(10 * 60);

async fn work_order(
    shared: &Shared,
    job_id: &str,
    run_id: &str,
    attempt: u32,
    adopted: bool,
) -> Result<WorkOrder, String> {
    let (run, job) = read_run_and_job(shared, run_id, job_id).await?;
    build_order(shared, &run, &job, attempt, adopted).await
}

/// The run and job rows, read at once (two connections).
async fn read_run_and_job(
    shared: &Shared,
    run_id: &str,
    job_id: &str,
) -> Result<(RunRow, JobRow), String> {
    let db = &shared.db;
    let internal = |error: crate::db::DbError| format!("reading the job failed: {error}");
    let (run, job) = tokio::try_join!(db.run(run_id), db.job(job_id)).map_err(internal)?;
    Ok((
        run.ok_or("the run vanished")?,
        job.ok_or("the job vanished")?,
    ))
}

/// The attempt's BUILD or MERGE from its rows (a merge reads its platform jobs' images).
async fn build_order(
    shared: &Shared,
    run: &RunRow,
    job: &JobRow,
    attempt: u32,
    adopted: bool,
) -> Result<WorkOrder, String> {
    let db = &shared.db;
    let internal = |error: crate::db::DbError| format!("reading the job failed: {error}");
    let (run_id, job_id) = (run.id.as_str(), job.id.as_str());
    let spec = &job.spec;
    let secrets = match secrets_for(shared, run, spec) {
        Ok(secrets) => secrets,
        // An adopted attempt's agent already has its work (and masks its secrets itself):
        // the core masks what it knows.
        Err(_) if adopted => RunSecrets {
            clone_token: None,
            build_secrets: shared.settings.build_secrets.clone(),
        },
        Err(message) => return Err(message),
    };
    let merge_sources = match &spec.kind {
        JobKind::Merge { sources } => {
            let jobs = db.jobs_of_run(run_id).await.map_err(internal)?;
            let mut images = Vec::new();
            for source in sources {
                let found = jobs.iter().find(|j| &j.name == source);
                match found.and_then(|j| Some((j.artifact_url.as_ref()?, j.digest.as_ref()?))) {
                    Some((url, digest)) => images.push(format!("{}@{digest}", strip_tag(url))),
                    None => return Err(format!("platform job {source} has no image")),
                }
            }
            Some(images)
        }
        JobKind::Build => None,
    };
    let settings = &shared.settings;
    let mut work = work_message(settings, run, job, spec, merge_sources, &secrets);
    match &mut work {
        Message::Build(build) => build.attempt = Some(attempt),
        Message::Merge(merge) => merge.attempt = Some(attempt),
        _ => {}
    }
    Ok(WorkOrder {
        placement: None,
        job_id: job_id.to_string(),
        attempt,
        work,
        target_image: image_for(settings, run, job, spec),
        handed_over: false,
        adopted,
    })
}

/// The run's secrets: what this core holds for it, else the core's `[secrets]`. A run
/// whose submitted secret values were held by a core that is gone cannot be built.
fn secrets_for(shared: &Shared, run: &RunRow, spec: &JobSpec) -> Result<RunSecrets, String> {
    let held = shared
        .run_secrets
        .lock()
        .ok()
        .and_then(|all| all.get(&run.id).cloned());
    let secrets = held.unwrap_or_else(|| RunSecrets {
        clone_token: None,
        build_secrets: shared.settings.build_secrets.clone(),
    });
    let missing: Vec<&String> = spec
        .secret_build_args
        .iter()
        .filter(|name| !secrets.build_secrets.contains_key(*name))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "secret build argument(s) {} were submitted with the run and held only in the memory of the core that accepted it, which stopped; submit the run again (or set them in the core's [secrets])",
            missing
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(secrets)
}

/// Creates the attempt's instance for its agent `token` (bound to the attempt by the claim;
/// without one, a fresh token is minted and bound here).
async fn provision(
    shared: &Shared,
    job_id: &str,
    run_id: &str,
    attempt: u32,
    token: Option<String>,
) -> Result<String, ProvisionFailure> {
    let result = create_for_attempt(shared, job_id, run_id, attempt, token).await;
    if result.is_err()
        && let Ok(mut prepared) = shared.prepared.lock()
    {
        // Its work will not be sent (the end of the attempt may have come before the frame
        // was built).
        prepared.remove(&(job_id.to_string(), attempt));
    }
    result
}

/// Why an attempt got no instance; `retryable`: another attempt may succeed.
#[derive(Debug)]
struct ProvisionFailure {
    message: String,
    retryable: bool,
}

/// Failures of the core's own steps (reads, rendering) may pass.
impl From<String> for ProvisionFailure {
    fn from(message: String) -> ProvisionFailure {
        ProvisionFailure {
            message,
            retryable: true,
        }
    }
}

impl From<&str> for ProvisionFailure {
    fn from(message: &str) -> ProvisionFailure {
        ProvisionFailure::from(message.to_string())
    }
}

/// [`provision`] without its clean-up.
async fn create_for_attempt(
    shared: &Shared,
    job_id: &str,
    run_id: &str,
    attempt: u32,
    token: Option<String>,
) -> Result<String, ProvisionFailure> {
    let db = &shared.db;
    let fresh = shared
        .fresh_rows
        .lock()
        .ok()
        .and_then(|mut fresh| fresh.remove(job_id));
    let (run, job) = match fresh {
        Some((run, job)) => (Arc::unwrap_or_clone(run), job),
        None => read_run_and_job(shared, run_id, job_id).await?,
    };
    // The work frame is built before the instance is asked for, so its agent gets it the
    // moment it connects (a failure here is met again, and reported, when the work is sent).
    if let Ok(order) = build_order(shared, &run, &job, attempt, false).await
        && let Ok(mut prepared) = shared.prepared.lock()
    {
        prepared.insert((job_id.to_string(), attempt), Box::new(order));
    }
    let token = match token {
        Some(token) => token,
        None => {
            let token = new_token();
            if !db
                .set_attempt_token(job_id, attempt, &token_hash(&token))
                .await
                .map_err(|error| format!("storing the agent token failed: {error}"))?
            {
                return Err("the attempt ended before its instance was created".into());
            }
            token
        }
    };
    let arch = match job.architecture.as_str() {
        "arm64" => stagely_protocol::Arch::Arm64,
        "amd64" => stagely_protocol::Arch::Amd64,
        // A merge runs anywhere; the seed picks a small VM of any arch.
        _ => stagely_protocol::Arch::from_rust_arch(std::env::consts::ARCH)
            .unwrap_or(stagely_protocol::Arch::Amd64),
    };
    let settings = &shared.settings;
    let hints = shared.provider.agent_hints();
    let user_data = stagely_cloud_init::render_user_data(&Bootstrap {
        agent: AgentConfig {
            allow_local_repos: settings.allow_local_repos,
            core_unreachable_secs: hints.core_unreachable_secs,
            metadata_url: hints.metadata_url,
            reconnect_grace_secs: Some(settings.engine.reconnect_grace.as_secs()),
            ..AgentConfig::new(settings.public_url.clone(), token)
        },
        ca_pem: settings.agent_ca_pem.clone(),
    })
    .map_err(|error| format!("rendering user-data failed: {error}"))?;
    let spec = MachineSpec {
        size: MachineSize::parse(&job.machine).unwrap_or(MachineSize::Medium),
        arch,
        user_data,
        tags: BTreeMap::from([
            ("stagely:core".to_string(), settings.core_id.clone()),
            (
                "stagely:deployment".to_string(),
                settings.deployment_id.clone(),
            ),
            ("stagely:run".to_string(), run_id.to_string()),
            ("stagely:job".to_string(), job_id.to_string()),
            ("stagely:attempt".to_string(), attempt.to_string()),
        ]),
        // A job the cloud took a spot instance from is never placed on spot again.
        on_demand_only: attempt > 1
            && crate::db::retry_transient(|| db.spot_interrupted_before(job_id))
                .await
                .map_err(|error| format!("reading the job's attempts failed: {error}"))?,
    };
    // Never abandon a create call half-way: the provider may already have started the
    // instance, and only a returned id lets us terminate it.
    let instance = shared
        .provider
        .create_instance(&spec)
        .await
        .map_err(|error| ProvisionFailure {
            message: format!(
                "provisioning a {} {} instance failed: {error}",
                job.machine, arch
            ),
            retryable: error.is_retryable(),
        })?;
    if let Some(notice) = &instance.notice {
        tracing::warn!(instance_id = %instance.id, "{notice}");
        // The job log says it first (the prepared work order carries it to the link).
        if let Ok(mut prepared) = shared.prepared.lock()
            && let Some(order) = prepared.get_mut(&(job_id.to_string(), attempt))
        {
            order.placement = Some(notice.clone());
        }
    }
    let timeout = Duration::from_secs(job.spec.timeout_seconds);
    let expires_at = now().plus(timeout + settings.engine.boot_timeout + LIFETIME_MARGIN);
    let record = crate::db::InstanceRecord {
        instance_id: &instance.id,
        provider: shared.provider.name(),
        job_id,
        attempt,
        owner: &settings.engine.owner,
        instance_type: &instance.instance_type,
        market: instance.market.map(|market| market.as_str()),
        placement: instance.notice.as_deref(),
        expires_at,
    };
    let recorded = crate::db::retry_transient(|| db.record_instance(&record, now())).await;
    if let Err(error) = recorded {
        tracing::error!(instance_id = %instance.id, "recording the instance failed: {error}");
    }
    // Ended while the provider worked (a cancel, fail-fast): its end found no instance to
    // terminate, so this one goes now (and its run's end waits for this task).
    let holds = crate::db::retry_transient(|| db.attempt_holds(job_id, attempt, now())).await;
    if let Ok(false) = holds {
        terminate(shared, &instance.id).await;
        return Err("the attempt ended while its instance was being created".into());
    }
    tracing::info!(instance_id = %instance.id, emulated = instance.emulated, "instance created");
    Ok(instance.id)
}

/// Terminates `instance_id` (the one the engine knows) and every other instance recorded for
/// the attempt (one whose creation a killed core never reported).
async fn terminate_attempt(
    shared: &Shared,
    job_id: &str,
    attempt: u32,
    instance_id: Option<String>,
) {
    let mut instances: Vec<String> = instance_id.into_iter().collect();
    let db = &shared.db;
    match crate::db::retry_transient(|| db.instances_of_attempt(job_id, attempt)).await {
        Ok(recorded) => {
            for id in recorded {
                if !instances.contains(&id) {
                    instances.push(id);
                }
            }
        }
        Err(error) => tracing::error!(job_id, "listing an attempt's instances failed: {error}"),
    }
    for instance_id in instances {
        terminate(shared, &instance_id).await;
    }
}

/// Terminates an instance (idempotent), retrying a few times; the reaper retries later.
async fn terminate(shared: &Shared, instance_id: &str) {
    for attempt in 1..=3u32 {
        match shared.provider.terminate_instance(instance_id).await {
            Ok(()) => {
                if let Err(error) = shared.db.mark_instance_terminated(instance_id, now()).await {
                    tracing::error!(instance_id, "instance terminated but not recorded: {error}");
                }
                return;
            }
            Err(error) => {
                tracing::warn!(instance_id, attempt, "terminating instance failed: {error}");
                tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
            }
        }
    }
    tracing::error!(
        instance_id,
        "instance could not be terminated; the reaper will retry"
    );
}

fn new_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("stg_{}", hex::encode(bytes))
}

/// What the store keeps of an agent token: its SHA-256, hex.
fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The image a job pushes: `<registry>/<namespace>/<environment>:<job tag>`.
pub fn image_for(settings: &RunnerSettings, run: &RunRow, job: &JobRow, spec: &JobSpec) -> String {
    let tag = match spec.kind {
        JobKind::Merge { .. } => tag_for(&spec.service),
        JobKind::Build => tag_for(&job.name),
    };
    format!(
        "{}/{}/{}:{}",
        settings.registry.host, settings.registry.namespace, run.environment_id, tag
    )
}

/// The registry layer cache of one job of one repository: keyed by the repository's identity
/// as well as the job's name, so a build reads and writes only its own repository's cache.
fn cache_ref(settings: &RunnerSettings, run: &RunRow, job: &JobRow) -> String {
    format!(
        "{}/{}/cache/{}/{}:buildcache",
        settings.registry.host,
        settings.registry.namespace,
        repository_key(&run.repo_url),
        tag_for(&job.name)
    )
}

/// Size of the BUILD or MERGE frame `job` will be sent with `secrets`, counting full digests
/// for a merge's sources: checked when a run is submitted, so a frame too large for the agent
/// connection is refused then, not discovered when it is sent.
pub fn work_frame_bytes(
    settings: &RunnerSettings,
    run: &RunRow,
    job: &JobRow,
    spec: &JobSpec,
    secrets: &RunSecrets,
) -> usize {
    let merge_sources = match &spec.kind {
        JobKind::Merge { sources } => Some(
            sources
                .iter()
                .map(|source| {
                    format!(
                        "{}/{}/{}@sha256:{}",
                        settings.registry.host,
                        settings.registry.namespace,
                        run.environment_id,
                        "0".repeat(64 + source.len())
                    )
                })
                .collect(),
        ),
        JobKind::Build => None,
    };
    stagely_protocol::encode(&work_message(
        settings,
        run,
        job,
        spec,
        merge_sources,
        secrets,
    ))
    .len()
}

fn work_message(
    settings: &RunnerSettings,
    run: &RunRow,
    job: &JobRow,
    spec: &JobSpec,
    merge_sources: Option<Vec<String>>,
    run_secrets: &RunSecrets,
) -> Message {
    let registry = RegistryOptions {
        insecure: settings.registry.insecure,
    };
    let target_image = image_for(settings, run, job, spec);
    match merge_sources {
        Some(source_images) => Message::Merge(Merge {
            job_id: job.id.clone(),
            source_images,
            target_image,
            registry_auth: settings.registry.auth.clone(),
            registry,
            timeout_seconds: Some(spec.timeout_seconds),
            attempt: None,
        }),
        None => {
            let cache = settings
                .registry
                .cache
                .then(|| cache_ref(settings, run, job));
            let secrets = spec
                .secret_build_args
                .iter()
                .filter_map(|name| {
                    run_secrets
                        .build_secrets
                        .get(name)
                        .map(|value| (name.clone(), value.clone()))
                })
                .collect();
            Message::Build(Build {
                job_id: job.id.clone(),
                context: SourceContext {
                    repo_url: run.repo_url.clone(),
                    commit_hash: run.commit_hash.clone(),
                    branch: run.branch.clone(),
                    clone_token: run_secrets.clone_token.clone(),
                },
                build_config: BuildConfig {
                    context_path: spec.context_path.clone(),
                    dockerfile: spec.dockerfile.clone(),
                    target_image,
                    platform: job.platform.clone(),
                    build_args: spec.build_args.clone(),
                    cache_from: cache.iter().cloned().collect(),
                    cache_to: cache,
                    timeout_seconds: Some(spec.timeout_seconds),
                    secrets,
                },
                registry_auth: settings.registry.auth.clone(),
                registry,
                attempt: None,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_and_distinct() {
        let a = new_token();
        let b = new_token();
        assert_ne!(a, b);
        assert_eq!(a.len(), 4 + 64);
    }
}
