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
mod apply;
mod provision;
mod reaper;
mod retention;
mod tasks;
mod work;

use provision::*;
pub use reaper::ReaperStats;
use retention::RETENTION_INTERVAL;
use work::*;
pub use work::{LIFETIME_MARGIN, image_for, work_frame_bytes};

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
}
