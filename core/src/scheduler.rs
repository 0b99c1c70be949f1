//! The scheduler: fans a run out into jobs, boots one instance per job, hands each connected
//! agent its BUILD or MERGE, records LOG lines and STATUS, terminates the instance, and fans
//! the results back in.
//!
//! Job status moves strictly `queued → provisioning → running → completed|failed` (any
//! non-final state may go to `failed`); the database updates are guarded by the expected
//! previous state, so no path can skip or reverse a step.
//!
//! Instances are never leaked: every instance is recorded in `builder_instances` before the
//! job waits on it, terminated on every exit path of the job task, and a starting core
//! terminates whatever an earlier process left behind ([`Scheduler::recover`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket};
use sha2::{Digest, Sha256};
use stagely_cloud_init::{AgentConfig, Bootstrap};
use stagely_protocol::session::{CoreSession, SessionEvent};
use stagely_protocol::{
    Build, BuildConfig, Heartbeat, JobState, Merge, Message, RegistryOptions, SourceContext,
    decode, encode,
};
use stagely_provisioning::{MachineSize, MachineSpec, Provider};
use tokio::sync::{Semaphore, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::RegistryConfig;
use crate::db::{Db, JobRow, NewLogLine, RunRow};
use crate::stagely_yaml::{JobKind, JobSpec};

/// Lines buffered before a database write; also flushed every [`LOG_FLUSH_EVERY`].
const LOG_BATCH_LINES: usize = 1000;
const LOG_BATCH_BYTES: usize = 1024 * 1024;
const LOG_FLUSH_EVERY: Duration = Duration::from_millis(200);
const CORE_HEARTBEAT_EVERY: Duration = Duration::from_secs(15);
/// Extra time past a job's own timeout before the core gives up on the agent.
const TIMEOUT_GRACE: Duration = Duration::from_secs(60);
/// How long a cancelled agent gets to send its final STATUS.
const CANCEL_GRACE: Duration = Duration::from_secs(20);
/// Longest a single frame may take to send before the agent counts as not reading.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// Scheduler settings taken from the core configuration.
#[derive(Debug, Clone)]
pub struct SchedulerSettings {
    /// URL agents dial (`http://127.0.0.1:PORT` for local instances).
    pub public_url: String,
    pub core_id: String,
    pub registry: RegistryConfig,
    pub max_concurrent_jobs: usize,
    pub agent_connect_timeout: Duration,
    pub heartbeat_timeout: Duration,
    /// Local paths and `file://` repositories are accepted (and agents may fetch them).
    pub allow_local_repos: bool,
    /// Most log bytes stored per job; later output is dropped with a marker line.
    pub max_log_bytes_per_job: u64,
    /// `[secrets]`: values of secret build arguments the core supplies.
    pub build_secrets: BTreeMap<String, stagely_protocol::Secret>,
}

/// An agent connection waiting to be claimed by its job task.
struct PendingAgent {
    job_id: String,
    deliver: oneshot::Sender<WebSocket>,
}

/// Who may connect: sha256(token) → the waiting job. Only hashes are kept.
type PendingAgents = Arc<Mutex<HashMap<[u8; 32], PendingAgent>>>;

/// How a job ended, for the run's fan-in.
#[derive(Debug, Clone)]
struct JobOutcome {
    name: String,
    completed: bool,
    artifact_url: Option<String>,
    digest: Option<String>,
}

/// Owns the run and job tasks.
pub struct Scheduler {
    db: Db,
    provider: Arc<dyn Provider>,
    settings: SchedulerSettings,
    /// Tokens of launched instances whose agents have not connected yet. Entries are added by
    /// job tasks before they create an instance and removed on first use (one-time) or when
    /// the job task ends.
    pending: PendingAgents,
    /// Secrets of runs in progress (clone tokens). Never stored: a run that outlives its
    /// process (a core restart) is failed anyway. Entries are added by `start_run` and
    /// removed when the run task ends.
    run_secrets: Mutex<HashMap<String, RunSecrets>>,
    /// Limits instances alive at once (the seed's BuildQueue).
    slots: Arc<Semaphore>,
    /// Confirms reported images in the registry before a job completes.
    images: crate::image_check::ImageChecker,
    /// Every run and job task; `shutdown` waits on it.
    tasks: TaskTracker,
    /// Cancelled on core shutdown; every task selects on it.
    shutdown: CancellationToken,
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

impl RunSecrets {
    fn is_empty(&self) -> bool {
        self.clone_token.is_none() && self.build_secrets.is_empty()
    }
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
    /// No, wrong, or already used token.
    Unauthorized,
}

impl Scheduler {
    pub fn new(
        db: Db,
        provider: Arc<dyn Provider>,
        settings: SchedulerSettings,
        shutdown: CancellationToken,
    ) -> Arc<Scheduler> {
        Arc::new(Scheduler {
            db,
            provider,
            slots: Arc::new(Semaphore::new(settings.max_concurrent_jobs)),
            images: crate::image_check::ImageChecker::new(&settings.registry),
            settings,
            pending: Arc::new(Mutex::new(HashMap::new())),
            run_secrets: Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
            shutdown,
        })
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    pub fn settings(&self) -> &SchedulerSettings {
        &self.settings
    }

    fn tags(&self, run_id: &str, job_id: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("stagely:core".to_string(), self.settings.core_id.clone()),
            ("stagely:run".to_string(), run_id.to_string()),
            ("stagely:job".to_string(), job_id.to_string()),
        ])
    }

    /// Start-up recovery: terminate every instance an earlier process left running and fail
    /// the jobs it left unfinished. Returns (instances terminated, jobs failed).
    pub async fn recover(&self) -> anyhow::Result<(usize, u64)> {
        let mut terminated = 0;
        for instance_id in self.db.live_instances().await? {
            match self.provider.terminate_instance(&instance_id).await {
                Ok(()) => {
                    self.db.mark_instance_terminated(&instance_id).await?;
                    terminated += 1;
                }
                Err(error) => {
                    tracing::error!(instance_id, "reaper could not terminate instance: {error}")
                }
            }
        }
        let ours = BTreeMap::from([("stagely:core".to_string(), self.settings.core_id.clone())]);
        for instance in self.provider.list_instances(&ours).await? {
            match self.provider.terminate_instance(&instance.id).await {
                Ok(()) => terminated += 1,
                Err(error) => {
                    tracing::error!(
                        instance_id = instance.id,
                        "reaper could not terminate instance: {error}"
                    )
                }
            }
        }
        let failed = self
            .db
            .fail_unfinished("the core restarted while this was unfinished")
            .await?;
        Ok((terminated, failed))
    }

    /// Claims the pending slot for `token`. The token is spent whatever happens next.
    pub fn claim_agent(&self, token: &str) -> Result<AgentClaim, ClaimError> {
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut pending = self.pending.lock().map_err(|_| ClaimError::Unauthorized)?;
        let slot = pending.remove(&hash).ok_or(ClaimError::Unauthorized)?;
        Ok(AgentClaim {
            job_id: slot.job_id.clone(),
            hash,
            slot: Some(slot),
            pending: self.pending.clone(),
        })
    }

    /// True once shutdown began; no new runs are accepted.
    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    /// Starts executing a created run in the background. Refused once shutdown began (the
    /// task tracker may already have been waited on).
    pub fn start_run(
        self: &Arc<Self>,
        run_id: String,
        secrets: RunSecrets,
    ) -> Result<(), ShuttingDown> {
        if self.shutdown.is_cancelled() || self.tasks.is_closed() {
            return Err(ShuttingDown);
        }
        if !secrets.is_empty()
            && let Ok(mut all) = self.run_secrets.lock()
        {
            all.insert(run_id.clone(), secrets);
        }
        let scheduler = self.clone();
        let span = tracing::info_span!("run", run_id = %run_id);
        self.tasks.spawn(
            async move {
                let result = scheduler.execute_run(&run_id).await;
                if let Ok(mut all) = scheduler.run_secrets.lock() {
                    all.remove(&run_id);
                }
                if let Err(error) = result {
                    tracing::error!("run failed internally: {error:#}");
                    let _ = scheduler
                        .db
                        .set_run_status(&run_id, "failed", Some("internal error in the scheduler"))
                        .await;
                }
            }
            .instrument(span),
        );
        Ok(())
    }

    /// Stops every task: agents are cancelled, instances terminated, jobs failed.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    async fn execute_run(self: &Arc<Self>, run_id: &str) -> anyhow::Result<()> {
        let run = self
            .db
            .run(run_id)
            .await?
            .ok_or_else(|| anyhow::anyhow!("run {run_id} vanished"))?;
        self.db.set_run_status(run_id, "building", None).await?;
        let jobs = self.db.jobs_of_run(run_id).await?;
        let mut builds = Vec::new();
        let mut merges = Vec::new();
        for job in jobs {
            let spec: JobSpec = serde_json::from_str(&job.spec)?;
            match &spec.kind {
                JobKind::Build => builds.push((job, spec)),
                JobKind::Merge { .. } => merges.push((job, spec)),
            }
        }

        // Fan out: every build job in parallel.
        let mut running = tokio::task::JoinSet::new();
        for (job, spec) in builds {
            let scheduler = self.clone();
            let run = run.clone();
            let span =
                tracing::info_span!("job", run_id = %run.id, job_id = %job.id, job = %job.name);
            running.spawn(
                async move { scheduler.execute_job(&run, job, spec, None).await }.instrument(span),
            );
        }
        let mut outcomes: HashMap<String, JobOutcome> = HashMap::new();
        while let Some(joined) = running.join_next().await {
            match joined {
                Ok(outcome) => {
                    outcomes.insert(outcome.name.clone(), outcome);
                }
                Err(error) => tracing::error!("a job task panicked: {error}"),
            }
        }

        // Merge jobs run once every platform job they need has completed.
        for (job, spec) in merges {
            let JobKind::Merge { sources } = &spec.kind else {
                continue;
            };
            let mut images = Vec::new();
            let mut missing = Vec::new();
            for source in sources {
                match outcomes.get(source) {
                    Some(JobOutcome {
                        completed: true,
                        artifact_url: Some(url),
                        digest: Some(digest),
                        ..
                    }) => images.push(format!("{}@{digest}", strip_tag(url))),
                    _ => missing.push(source.clone()),
                }
            }
            if !missing.is_empty() {
                let reason = format!(
                    "not started: platform job(s) {} did not complete",
                    missing.join(", ")
                );
                self.db.mark_failed(&job.id, None, &reason).await?;
                continue;
            }
            let span =
                tracing::info_span!("job", run_id = %run.id, job_id = %job.id, job = %job.name);
            let outcome = self
                .execute_job(&run, job, spec, Some(images))
                .instrument(span)
                .await;
            outcomes.insert(outcome.name.clone(), outcome);
        }

        // Fan in.
        let jobs = self.db.jobs_of_run(run_id).await?;
        let failed: Vec<&str> = jobs
            .iter()
            .filter(|job| job.status != "completed")
            .map(|job| job.name.as_str())
            .collect();
        if failed.is_empty() {
            self.db.set_run_status(run_id, "completed", None).await?;
            tracing::info!(jobs = jobs.len(), "run completed");
        } else {
            let message = format!("job(s) failed: {}", failed.join(", "));
            self.db
                .set_run_status(run_id, "failed", Some(&message))
                .await?;
            tracing::warn!("{message}");
        }
        Ok(())
    }

    fn image_for(&self, run: &RunRow, job: &JobRow, spec: &JobSpec) -> String {
        let tag = match spec.kind {
            JobKind::Merge { .. } => tag_for(&spec.service),
            JobKind::Build => tag_for(&job.name),
        };
        format!(
            "{}/{}/{}:{}",
            self.settings.registry.host, self.settings.registry.namespace, run.environment_id, tag
        )
    }

    /// The registry layer cache of one job of one repository: keyed by the repository's
    /// identity as well as the job's name, so a build can read and write only its own
    /// repository's cache, never another's that happens to use the same job name.
    fn cache_ref(&self, run: &RunRow, job: &JobRow) -> String {
        format!(
            "{}/{}/cache/{}/{}:buildcache",
            self.settings.registry.host,
            self.settings.registry.namespace,
            repository_key(&run.repo_url),
            tag_for(&job.name)
        )
    }

    /// Size of the BUILD or MERGE frame `job` will be sent with `secrets`, counting full
    /// digests for a merge's sources: checked when a run is submitted, so a frame too large
    /// for the agent connection is refused then, not discovered when it is sent.
    pub fn work_frame_bytes(
        &self,
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
                            self.settings.registry.host,
                            self.settings.registry.namespace,
                            run.environment_id,
                            "0".repeat(64 + source.len())
                        )
                    })
                    .collect(),
            ),
            JobKind::Build => None,
        };
        encode(&self.work_message(run, job, spec, merge_sources, secrets)).len()
    }

    /// The secrets `start_run` holds for a run (none once it ended, or if it had none).
    fn secrets_of(&self, run_id: &str) -> RunSecrets {
        self.run_secrets
            .lock()
            .ok()
            .and_then(|all| all.get(run_id).cloned())
            .unwrap_or_default()
    }

    fn work_message(
        &self,
        run: &RunRow,
        job: &JobRow,
        spec: &JobSpec,
        merge_sources: Option<Vec<String>>,
        run_secrets: &RunSecrets,
    ) -> Message {
        let registry = RegistryOptions {
            insecure: self.settings.registry.insecure,
        };
        let target_image = self.image_for(run, job, spec);
        match merge_sources {
            Some(source_images) => Message::Merge(Merge {
                job_id: job.id.clone(),
                source_images,
                target_image,
                registry_auth: self.settings.registry.auth.clone(),
                registry,
                timeout_seconds: Some(spec.timeout_seconds),
            }),
            None => {
                let cache = self
                    .settings
                    .registry
                    .cache
                    .then(|| self.cache_ref(run, job));
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
                    registry_auth: self.settings.registry.auth.clone(),
                    registry,
                })
            }
        }
    }

    /// Runs one job from `queued` to a final state. Never returns early without
    /// terminating the instance it created.
    async fn execute_job(
        self: &Arc<Self>,
        run: &RunRow,
        job: JobRow,
        spec: JobSpec,
        merge_sources: Option<Vec<String>>,
    ) -> JobOutcome {
        let name = job.name.clone();
        let failed = |_: ()| JobOutcome {
            name: name.clone(),
            completed: false,
            artifact_url: None,
            digest: None,
        };
        let _permit = tokio::select! {
            // Shutdown wins over a free slot: no new instance once the core is stopping.
            biased;
            () = self.shutdown.cancelled() => {
                let _ = self.db.mark_failed(&job.id, None, "the core shut down before the job started").await;
                return failed(());
            }
            permit = self.slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => {
                    let _ = self.db.mark_failed(&job.id, None, "scheduler closed").await;
                    return failed(());
                }
            },
        };

        // One-time token: only its hash is kept, in memory.
        let token = new_token();
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let (deliver, connected) = oneshot::channel();
        if let Ok(mut pending) = self.pending.lock() {
            pending.insert(
                hash,
                PendingAgent {
                    job_id: job.id.clone(),
                    deliver,
                },
            );
        }
        let outcome = self
            .provision_and_serve(run, &job, &spec, merge_sources, token, connected)
            .await;
        if let Ok(mut pending) = self.pending.lock() {
            pending.remove(&hash);
        }
        match outcome {
            Ok(done) => done,
            Err(error) => {
                tracing::warn!("job failed: {error}");
                let _ = self.db.mark_failed(&job.id, None, &error).await;
                failed(())
            }
        }
    }

    async fn provision_and_serve(
        self: &Arc<Self>,
        run: &RunRow,
        job: &JobRow,
        spec: &JobSpec,
        merge_sources: Option<Vec<String>>,
        token: String,
        connected: oneshot::Receiver<WebSocket>,
    ) -> Result<JobOutcome, String> {
        let arch = match job.architecture.as_str() {
            "arm64" => stagely_protocol::Arch::Arm64,
            "amd64" => stagely_protocol::Arch::Amd64,
            // A merge runs anywhere; the seed picks a small VM of any arch.
            _ => stagely_protocol::Arch::from_rust_arch(std::env::consts::ARCH)
                .unwrap_or(stagely_protocol::Arch::Amd64),
        };
        let user_data = stagely_cloud_init::render_user_data(&Bootstrap {
            agent: AgentConfig {
                core_url: self.settings.public_url.clone(),
                token,
                ca_file: None,
                builder: None,
                work_dir: None,
                instance_id: None,
                allow_local_repos: self.settings.allow_local_repos,
            },
            ca_pem: None,
        })
        .map_err(|error| format!("rendering user-data failed: {error}"))?;
        let machine_spec = MachineSpec {
            size: MachineSize::parse(&job.machine).unwrap_or(MachineSize::Medium),
            arch,
            user_data,
            tags: self.tags(&run.id, &job.id),
        };
        // Never abandon a create call half-way: the provider may already have started the
        // instance, and only a returned id lets us terminate it. Shutdown is honoured right
        // after (serve_instance sees the cancelled token and terminates).
        let instance = self
            .provider
            .create_instance(&machine_spec)
            .await
            .map_err(|error| {
                format!(
                    "provisioning a {} {} instance failed: {error}",
                    job.machine, arch
                )
            })?;
        let instance_id = instance.id.clone();
        // From here on, every path terminates the instance.
        let recorded = self
            .db
            .record_instance(&instance_id, self.provider.name(), &job.id)
            .await;
        let result = match recorded {
            Ok(()) => {
                self.serve_instance(run, job, spec, merge_sources, &instance, connected)
                    .await
            }
            Err(error) => Err(format!("recording instance {instance_id} failed: {error}")),
        };
        self.terminate(&instance_id).await;
        result
    }

    async fn terminate(&self, instance_id: &str) {
        for attempt in 1..=3u32 {
            match self.provider.terminate_instance(instance_id).await {
                Ok(()) => {
                    if let Err(error) = self.db.mark_instance_terminated(instance_id).await {
                        tracing::error!(
                            instance_id,
                            "instance terminated but not recorded: {error}"
                        );
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
            "instance could not be terminated; the reaper will retry at the next start"
        );
    }

    async fn serve_instance(
        self: &Arc<Self>,
        run: &RunRow,
        job: &JobRow,
        spec: &JobSpec,
        merge_sources: Option<Vec<String>>,
        instance: &stagely_provisioning::Instance,
        connected: oneshot::Receiver<WebSocket>,
    ) -> Result<JobOutcome, String> {
        if !self
            .db
            .mark_provisioning(&job.id, &instance.id)
            .await
            .map_err(|e| e.to_string())?
        {
            return Err("job left the queued state unexpectedly".into());
        }
        tracing::info!(instance_id = %instance.id, emulated = instance.emulated, "instance provisioning");
        let wait = self.settings.agent_connect_timeout;
        let socket = tokio::select! {
            socket = connected => socket.map_err(|_| "the agent connection was dropped before it was handed over".to_string())?,
            () = tokio::time::sleep(wait) => {
                return Err(format!(
                    "the agent on instance {} did not connect within {}s",
                    instance.id,
                    wait.as_secs()
                ));
            }
            () = self.shutdown.cancelled() => return Err("the core shut down while waiting for the agent".into()),
        };
        let work = self.work_message(run, job, spec, merge_sources, &self.secrets_of(&run.id));
        let target_image = self.image_for(run, job, spec);
        let deadline = Duration::from_secs(spec.timeout_seconds) + TIMEOUT_GRACE;
        self.drive_agent(job, socket, work, &target_image, deadline)
            .await
    }

    /// Runs the protocol session with one connected agent until its STATUS is stored.
    async fn drive_agent(
        self: &Arc<Self>,
        job: &JobRow,
        mut socket: WebSocket,
        work: Message,
        target_image: &str,
        limit: Duration,
    ) -> Result<JobOutcome, String> {
        let stored = self
            .db
            .last_log_seq(&job.id)
            .await
            .map_err(|e| e.to_string())?;
        // The agent masks what it knows; the core masks again before anything is stored.
        let mask = stagely_protocol::SecretMask::new(work.secrets());
        let mut session = CoreSession::new(
            job.id.clone(),
            work,
            stored as u64,
            self.settings.heartbeat_timeout,
            std::time::Instant::now(),
        );
        let mut batch: Vec<NewLogLine> = Vec::new();
        let mut batch_bytes = 0usize;
        let mut log_budget = LogBudget::new(self.settings.max_log_bytes_per_job);
        let mut flush_tick = tokio::time::interval(LOG_FLUSH_EVERY);
        let mut heartbeat_tick = tokio::time::interval(CORE_HEARTBEAT_EVERY);
        heartbeat_tick.reset();
        let job_deadline = tokio::time::Instant::now() + limit;
        let mut cancel_deadline: Option<tokio::time::Instant> = None;
        let mut cancel_reason = String::new();

        loop {
            // Outputs first: frames the session wants sent.
            while let Some(frame) = session.poll_frame() {
                if let Err(error) = send_frame(&mut socket, &frame).await {
                    self.flush(job, &mut batch, &mut batch_bytes, &mut session)
                        .await?;
                    return Err(error);
                }
            }
            let heartbeat_due = session
                .poll_timeout()
                .map(tokio::time::Instant::from_std)
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            let cancel_due = cancel_deadline
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600 * 24));
            tokio::select! {
                incoming = socket.recv() => {
                    let now = std::time::Instant::now();
                    match incoming {
                        Some(Ok(WsMessage::Text(text))) => {
                            let handled = decode(text.as_bytes())
                                .map_err(|error| format!("agent sent a malformed frame: {error}"))
                                .and_then(|message| {
                                    session
                                        .handle_frame(now, message)
                                        .map_err(|error| format!("agent broke the protocol: {error}"))
                                });
                            if let Err(error) = handled {
                                return Err(self.violation(job, socket, error, &mut batch, &mut batch_bytes, &mut session).await);
                            }
                        }
                        Some(Ok(WsMessage::Binary(_))) => {
                            let error = "agent sent a binary frame; the protocol is JSON text frames".to_string();
                            return Err(self.violation(job, socket, error, &mut batch, &mut batch_bytes, &mut session).await);
                        }
                        Some(Ok(WsMessage::Close(_))) | None => {
                            self.flush(job, &mut batch, &mut batch_bytes, &mut session).await?;
                            return Err("the agent disconnected before reporting STATUS".into());
                        }
                        Some(Ok(_)) => {}
                        Some(Err(error)) => {
                            self.flush(job, &mut batch, &mut batch_bytes, &mut session).await?;
                            return Err(format!("the agent connection failed: {error}"));
                        }
                    }
                }
                _ = flush_tick.tick() => {
                    self.flush(job, &mut batch, &mut batch_bytes, &mut session).await?;
                }
                _ = heartbeat_tick.tick() => {
                    let frame = Message::Heartbeat(Heartbeat { job_id: Some(job.id.clone()) });
                    if let Err(error) = send_frame(&mut socket, &frame).await {
                        self.flush(job, &mut batch, &mut batch_bytes, &mut session).await?;
                        return Err(error);
                    }
                }
                () = tokio::time::sleep_until(heartbeat_due) => {
                    if let Err(error) = session.handle_timeout(std::time::Instant::now()) {
                        let error = format!("agent lost: {error}");
                        return Err(self.violation(job, socket, error, &mut batch, &mut batch_bytes, &mut session).await);
                    }
                }
                () = tokio::time::sleep_until(job_deadline), if cancel_deadline.is_none() => {
                    cancel_reason = format!("the job exceeded its timeout of {}s", limit.saturating_sub(TIMEOUT_GRACE).as_secs());
                    session.cancel(cancel_reason.clone());
                    cancel_deadline = Some(tokio::time::Instant::now() + CANCEL_GRACE);
                }
                () = self.shutdown.cancelled(), if cancel_deadline.is_none() => {
                    cancel_reason = "the core shut down".into();
                    session.cancel(cancel_reason.clone());
                    cancel_deadline = Some(tokio::time::Instant::now() + CANCEL_GRACE);
                }
                () = tokio::time::sleep_until(cancel_due) => {
                    self.flush(job, &mut batch, &mut batch_bytes, &mut session).await?;
                    return Err(format!("{cancel_reason}; the agent did not stop in time"));
                }
            }

            // Then events: store lines, finish on STATUS.
            while let Some(event) = session.poll_event() {
                match event {
                    SessionEvent::Started(hello) => {
                        tracing::info!(
                            agent_instance = %hello.instance_id,
                            agent_arch = %hello.arch,
                            agent_version = %hello.agent_version,
                            builders = ?hello.builders,
                            "agent connected"
                        );
                        if !self
                            .db
                            .mark_running(&job.id)
                            .await
                            .map_err(|e| e.to_string())?
                        {
                            return Err("job was not provisioning when its agent connected".into());
                        }
                    }
                    SessionEvent::Log(log) => {
                        let seq = log.seq.unwrap_or(0) as i64;
                        let stream = log.stream.as_str();
                        if let Some(line) = log_budget.admit(mask.mask(log.data)) {
                            batch_bytes += line.len();
                            batch.push(NewLogLine { seq, stream, line });
                        }
                        if batch.len() >= LOG_BATCH_LINES || batch_bytes >= LOG_BATCH_BYTES {
                            self.flush(job, &mut batch, &mut batch_bytes, &mut session)
                                .await?;
                        }
                    }
                    SessionEvent::Finished(status) => {
                        // What the cap dropped is said once more at the end, with the count;
                        // the STATUS's sequence number is free for it (no LOG carries it).
                        if let Some(summary) = log_budget.summary() {
                            batch.push(NewLogLine {
                                seq: status.seq.unwrap_or(0) as i64,
                                stream: "system",
                                line: summary,
                            });
                        }
                        self.flush(job, &mut batch, &mut batch_bytes, &mut session)
                            .await?;
                        let outcome = self
                            .record_status(job, &status, target_image, &cancel_reason)
                            .await?;
                        // The session always numbers STATUS (it assigns the next seq when the
                        // agent did not), so this acknowledges it.
                        session.handle_persisted(status.seq.unwrap_or(0));
                        while let Some(frame) = session.poll_frame() {
                            // Best effort: the outcome is stored whatever the agent does now.
                            let _ = send_frame(&mut socket, &frame).await;
                        }
                        let _ =
                            tokio::time::timeout(SEND_TIMEOUT, socket.send(WsMessage::Close(None)))
                                .await;
                        return Ok(outcome);
                    }
                }
            }
        }
    }

    async fn record_status(
        &self,
        job: &JobRow,
        status: &stagely_protocol::Status,
        target_image: &str,
        cancel_reason: &str,
    ) -> Result<JobOutcome, String> {
        let db_error = |e: crate::db::DbError| e.to_string();
        // Only the image the core asked for counts: an agent cannot point the run elsewhere.
        let complete = match (status.state, &status.artifact_url, &status.digest) {
            (JobState::Completed, Some(url), Some(digest))
                if valid_digest(digest) && url == target_image =>
            {
                Some((url.clone(), digest.clone()))
            }
            _ => None,
        };
        // Trust but verify: the registry must hold what the agent says it pushed.
        let mut rejected = None;
        if let Some((url, digest)) = &complete
            && let Err(error) = self.images.verify(url, digest).await
        {
            rejected = Some(format!("the agent reported success, but {error}"));
        }
        if let (Some((url, digest)), None) = (complete, &rejected) {
            let stored = self
                .db
                .mark_completed(&job.id, &url, &digest, status.exit_code.unwrap_or(0))
                .await
                .map_err(db_error)?;
            if !stored {
                return Err("the job was no longer running when its STATUS arrived".into());
            }
            tracing::info!(artifact_url = %url, digest = %digest, "job completed");
            return Ok(JobOutcome {
                name: job.name.clone(),
                completed: true,
                artifact_url: Some(url),
                digest: Some(digest),
            });
        }
        let mut message = match (rejected, status.state, &status.error) {
            (Some(rejected), _, _) => rejected,
            (None, JobState::Completed, _) => format!(
                "the agent reported completed without a valid digest for {target_image} (artifact_url {:?})",
                status.artifact_url
            ),
            (None, JobState::Failed, Some(error)) => error.clone(),
            (None, JobState::Failed, None) => match status.exit_code {
                Some(code) => format!("the build failed with exit code {code}"),
                None => "the build failed".into(),
            },
        };
        if !cancel_reason.is_empty() {
            message = format!("{cancel_reason}: {message}");
        }
        self.db
            .mark_failed(&job.id, status.exit_code, &message)
            .await
            .map_err(db_error)?;
        tracing::warn!(exit_code = ?status.exit_code, "job failed: {message}");
        Ok(JobOutcome {
            name: job.name.clone(),
            completed: false,
            artifact_url: None,
            digest: None,
        })
    }

    async fn flush(
        &self,
        job: &JobRow,
        batch: &mut Vec<NewLogLine>,
        batch_bytes: &mut usize,
        session: &mut CoreSession,
    ) -> Result<(), String> {
        let Some(last) = batch.last().map(|line| line.seq) else {
            return Ok(());
        };
        self.db
            .append_logs(&job.id, batch)
            .await
            .map_err(|error| format!("storing log lines failed: {error}"))?;
        batch.clear();
        if batch.capacity() > 4 * LOG_BATCH_LINES {
            batch.shrink_to(LOG_BATCH_LINES);
        }
        *batch_bytes = 0;
        session.handle_persisted(last as u64);
        Ok(())
    }

    /// Closes only this connection, naming the violation, and logs it.
    async fn violation(
        &self,
        job: &JobRow,
        mut socket: WebSocket,
        error: String,
        batch: &mut Vec<NewLogLine>,
        batch_bytes: &mut usize,
        session: &mut CoreSession,
    ) -> String {
        tracing::error!(job_id = %job.id, "closing agent connection: {error}");
        let _ = self.flush(job, batch, batch_bytes, session).await;
        let mut reason = error.clone();
        // A close reason is limited to 123 bytes on the wire.
        while reason.len() > 123 {
            reason.pop();
        }
        let _ = tokio::time::timeout(
            SEND_TIMEOUT,
            socket.send(WsMessage::Close(Some(CloseFrame {
                code: 1008,
                reason: reason.into(),
            }))),
        )
        .await;
        error
    }
}

/// Longest line the core stores; longer ones are cut (agents already cut at 16 KiB, so only a
/// misbehaving agent reaches this).
pub const MAX_STORED_LINE_BYTES: usize = 16 * 1024;

/// The core's own bounds on one job's log: lines cut at [`MAX_STORED_LINE_BYTES`], and at most
/// `max_bytes` stored; past that, one marker line and the rest is counted, not stored. The
/// build goes on either way.
#[derive(Debug)]
pub struct LogBudget {
    max_bytes: u64,
    stored_bytes: u64,
    dropped_bytes: u64,
    dropped_lines: u64,
}

impl LogBudget {
    pub fn new(max_bytes: u64) -> LogBudget {
        LogBudget {
            max_bytes,
            stored_bytes: 0,
            dropped_bytes: 0,
            dropped_lines: 0,
        }
    }

    /// The text to store for this line, if any: cut when too long; the first line past the
    /// cap becomes the marker.
    pub fn admit(&mut self, mut line: String) -> Option<String> {
        if self.dropped_lines > 0 {
            self.dropped_lines += 1;
            self.dropped_bytes += line.len() as u64;
            return None;
        }
        if line.len() > MAX_STORED_LINE_BYTES {
            let over = line.len() - MAX_STORED_LINE_BYTES;
            line.truncate(line.floor_char_boundary(MAX_STORED_LINE_BYTES));
            line.push_str(&format!(
                " [stagely: line cut, {over} more bytes dropped]\n"
            ));
        }
        if self.stored_bytes + line.len() as u64 > self.max_bytes {
            self.dropped_lines = 1;
            self.dropped_bytes = line.len() as u64;
            return Some(format!(
                "[stagely] this job's log reached its limit of {} bytes; further output is not stored (the build goes on)\n",
                self.max_bytes
            ));
        }
        self.stored_bytes += line.len() as u64;
        Some(line)
    }

    /// The closing line when output was dropped.
    pub fn summary(&self) -> Option<String> {
        (self.dropped_lines > 0).then(|| {
            format!(
                "[stagely] {} bytes in {} lines of output were dropped after the log limit of {} bytes\n",
                self.dropped_bytes, self.dropped_lines, self.max_bytes
            )
        })
    }
}

/// Sends one frame; an agent that stops reading cannot stall the job task.
async fn send_frame(socket: &mut WebSocket, frame: &Message) -> Result<(), String> {
    match tokio::time::timeout(SEND_TIMEOUT, socket.send(WsMessage::text(encode(frame)))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err("the agent connection broke while sending to it".into()),
        Err(_) => Err(format!(
            "the agent stopped reading: a {} frame could not be sent within {}s",
            frame.type_name(),
            SEND_TIMEOUT.as_secs()
        )),
    }
}

/// A claimed agent slot: the upgrade handler hands the socket to the waiting job task.
///
/// The token is spent when the socket is delivered. If the WebSocket handshake fails after
/// the claim (the claim is dropped undelivered), the slot goes back, so the agent's retry
/// with the same token is not refused for a connection that never happened.
pub struct AgentClaim {
    pub job_id: String,
    hash: [u8; 32],
    /// The waiting job's slot; `None` once delivered.
    slot: Option<PendingAgent>,
    pending: PendingAgents,
}

impl AgentClaim {
    pub fn deliver(mut self, socket: WebSocket) {
        if let Some(slot) = self.slot.take() {
            // If the job task gave up meanwhile, the socket is dropped (closed).
            let _ = slot.deliver.send(socket);
        }
    }
}

impl Drop for AgentClaim {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take()
            && !slot.deliver.is_closed()
            && let Ok(mut pending) = self.pending.lock()
        {
            tracing::warn!(job_id = %slot.job_id, "agent handshake failed; its token stays valid for a retry");
            pending.insert(self.hash, slot);
        }
    }
}

fn new_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("stg_{}", hex::encode(bytes))
}

/// A short, stable identity of a repository for registry paths: the first 16 hex digits of
/// the SHA-256 of its URL, with the spellings git treats as one repository (a trailing `/`
/// or `.git`, the host's case) made equal.
pub fn repository_key(repo_url: &str) -> String {
    let trimmed = repo_url.trim().trim_end_matches('/');
    let trimmed = trimmed.strip_suffix(".git").unwrap_or(trimmed);
    let normalized = match trimmed.split_once("://") {
        Some((scheme, rest)) => {
            let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
            format!(
                "{}://{}/{path}",
                scheme.to_ascii_lowercase(),
                host.to_ascii_lowercase()
            )
        }
        None => trimmed.to_string(),
    };
    let digest = Sha256::digest(normalized.as_bytes());
    hex::encode(&digest[..8])
}

/// Job or service name → image tag (`backend_amd64` → `backend-amd64`).
pub fn tag_for(name: &str) -> String {
    name.to_ascii_lowercase().replace('_', "-")
}

fn strip_tag(image: &str) -> &str {
    let name_start = image.rfind('/').map_or(0, |slash| slash + 1);
    match image[name_start..].find(':') {
        Some(colon) => &image[..name_start + colon],
        None => image,
    }
}

fn valid_digest(text: &str) -> bool {
    text.strip_prefix("sha256:")
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_and_references() {
        assert_eq!(tag_for("backend_amd64"), "backend-amd64");
        assert_eq!(
            strip_tag("127.0.0.1:5000/stagely/env:api"),
            "127.0.0.1:5000/stagely/env"
        );
        assert!(valid_digest(&format!("sha256:{}", "0".repeat(64))));
        assert!(!valid_digest("sha256:abc"));
    }

    #[test]
    fn the_log_budget_cuts_long_lines_and_stops_at_the_cap() {
        let mut budget = LogBudget::new(40_000);
        let long = format!("{}\n", "é".repeat(20_000));
        let stored = budget.admit(long).unwrap();
        assert!(stored.len() < MAX_STORED_LINE_BYTES + 100);
        assert!(stored.contains("line cut") && stored.ends_with('\n'));
        assert_eq!(budget.admit("short\n".into()).as_deref(), Some("short\n"));
        assert!(budget.summary().is_none());
        let _ = budget.admit("x".repeat(16_000));
        let marker = budget.admit("y".repeat(16_000)).unwrap();
        assert!(
            marker.contains("reached its limit of 40000 bytes"),
            "{marker}"
        );
        assert_eq!(budget.admit("z\n".into()), None);
        assert_eq!(budget.admit("z\n".into()), None);
        let summary = budget.summary().unwrap();
        assert!(summary.contains("16004 bytes in 3 lines"), "{summary}");
    }

    #[test]
    fn repositories_get_distinct_stable_cache_keys() {
        let a = repository_key("https://github.com/acme/api.git");
        assert_eq!(a.len(), 16);
        assert_eq!(a, repository_key("https://GitHub.com/acme/api/"));
        assert_eq!(a, repository_key("https://github.com/acme/api"));
        assert_ne!(a, repository_key("https://github.com/evil/api.git"));
        assert_ne!(a, repository_key("https://github.com/acme/API.git"));
    }

    #[test]
    fn tokens_are_long_and_distinct() {
        let a = new_token();
        let b = new_token();
        assert_ne!(a, b);
        assert_eq!(a.len(), 4 + 64);
    }
}
