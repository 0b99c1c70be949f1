//! Benchmark: how fast the engine dispatches work, and what a multi-arch MERGE adds.
//!
//! A real core (API, runner loop, store, agent endpoint) runs in this process with a provider
//! whose instances boot at once: each "instance" is a task that reads its user-data (core URL
//! and one-time token), dials the core's agent endpoint over a real WebSocket, says HELLO and
//! plays the agent. Builds push a minimal image to the real registry and report its digest;
//! a MERGE pushes a real image index of the platform images. Nothing of the core is replaced.
//!
//! Figures, for SQLite and PostgreSQL:
//! - **dispatch**: from a job becoming eligible (its run stored by the API: the core's
//!   `run submitted` event) to its BUILD frame being sent (the `work sent` event of
//!   `stagely_server::dispatch`), timed inside this process from tracing events. At each level
//!   N (1, 50, 500 concurrent jobs): the fan-out of the first N-1 jobs submitted together,
//!   then 200 further jobs submitted one after another (50 ms apart) while those N-1 stay live (each is the
//!   N-th concurrent job).
//! - **merge**: the time a MERGE adds after the last platform job's STATUS: until the MERGE
//!   frame reaches that agent (handed over on its open connection: no instance boots), and until
//!   the merge is verified, stored and its instance terminated.
//!
//! Run: `cargo bench -p stagely-tests --bench dispatch` (PostgreSQL from `scripts/setup.sh`
//! on 127.0.0.1:5432; `STAGELY_BENCH_LEVELS=1,50` and `STAGELY_BENCH_PROBES` change the
//! load, `STAGELY_BENCH_BACKENDS=sqlite` skips PostgreSQL, `STAGELY_BENCH_DEBUG=1` prints
//! every timed event).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use stagely_protocol::{
    Arch, BuilderKind, Heartbeat, Hello, JobState, Log, LogStream, Message, PROTOCOL_VERSION,
    Status, decode, encode,
};
use stagely_provisioning::{Instance, InstanceState, MachineSpec, Provider, ProviderError};
use stagely_tests::*;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as Ws;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

const FAKE_COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const WAIT: Duration = Duration::from_secs(300);
/// Pause between one probe job's end and the next one's submission.
const PROBE_GAP: Duration = Duration::from_millis(50);

// ---------------------------------------------------------------------------------------------
// The core's own dispatch events, timestamped as they are emitted.

#[derive(Default)]
struct Marks {
    /// Run id → its `run submitted` event (the run and its jobs are stored).
    stored: HashMap<String, Instant>,
    /// Job id → its `work sent` event (BUILD or MERGE written to the agent's socket).
    sent: HashMap<String, Instant>,
    /// Job id → the provider was asked for its instance (claim won, token bound).
    create_called: HashMap<String, Instant>,
    /// Job id → its agent's token was accepted at the upgrade (`agent authenticated`).
    authenticated: HashMap<String, Instant>,
}

fn marks() -> &'static Mutex<Marks> {
    static MARKS: OnceLock<Mutex<Marks>> = OnceLock::new();
    MARKS.get_or_init(Mutex::default)
}

struct MarkLayer;

#[derive(Default)]
struct Fields {
    message: Option<String>,
    run_id: Option<String>,
    job_id: Option<String>,
}

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        match field.name() {
            "message" => self.message = Some(text),
            "run_id" => self.run_id = Some(text),
            "job_id" => self.job_id = Some(text),
            _ => {}
        }
    }
}

/// Only the two events timed. (A global filter, not a per-layer one: sqlx asks `enabled!`
/// without emitting, which would leave a per-layer filter's thread-local state set.)
fn timed(metadata: &tracing::Metadata<'_>) -> bool {
    (metadata.target() == "stagely_server::submit" && *metadata.level() <= tracing::Level::INFO)
        || metadata.target() == "stagely_server::dispatch"
}

impl<S: tracing::Subscriber> Layer<S> for MarkLayer {
    fn register_callsite(
        &self,
        metadata: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        if timed(metadata) {
            tracing::subscriber::Interest::always()
        } else {
            tracing::subscriber::Interest::never()
        }
    }

    fn enabled(
        &self,
        metadata: &tracing::Metadata<'_>,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        timed(metadata)
    }

    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let at = Instant::now();
        let mut fields = Fields::default();
        event.record(&mut fields);
        if std::env::var_os("STAGELY_BENCH_DEBUG").is_some() {
            eprintln!(
                "event {} {:?} run={:?} job={:?}",
                event.metadata().target(),
                fields.message,
                fields.run_id,
                fields.job_id
            );
        }
        let mut marks = marks().lock().unwrap();
        match (fields.message.as_deref(), fields.run_id, fields.job_id) {
            (Some("run submitted"), Some(run_id), _) => {
                marks.stored.insert(run_id, at);
            }
            (Some("work sent"), _, Some(job_id)) => {
                marks.sent.insert(job_id, at);
            }
            (Some("agent authenticated"), _, Some(job_id)) => {
                marks.authenticated.insert(job_id, at);
            }
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A fleet whose instances boot at once and play the agent.

#[derive(Debug)]
enum FleetEvent {
    /// An agent received its BUILD.
    Build {
        job_id: String,
    },
    /// The last builder's agent ran a MERGE handed over on its connection.
    Merge {
        instance_id: String,
        /// Its own build's STATUS was sent (the last platform job finished).
        last_status: Instant,
        /// The MERGE frame arrived.
        received: Instant,
        /// The merge's STATUS was sent (index pushed).
        done: Instant,
    },
    Terminated {
        instance_id: String,
        at: Instant,
    },
    Failed {
        instance_id: String,
        error: String,
    },
}

struct Fleet {
    client: reqwest::Client,
    next: AtomicU64,
    /// Live instances: their agent task and tags.
    live: Mutex<HashMap<String, (tokio::task::AbortHandle, MachineSpec)>>,
    /// Job id → run id (from the instances' tags).
    runs: Mutex<HashMap<String, String>>,
    events: mpsc::UnboundedSender<FleetEvent>,
}

impl Fleet {
    fn new() -> (Arc<Fleet>, mpsc::UnboundedReceiver<FleetEvent>) {
        let (events, receiver) = mpsc::unbounded_channel();
        let fleet = Arc::new(Fleet {
            client: reqwest::Client::new(),
            next: AtomicU64::new(0),
            live: Mutex::default(),
            runs: Mutex::default(),
            events,
        });
        (fleet, receiver)
    }

    fn run_of(&self, job_id: &str) -> Option<String> {
        self.runs.lock().unwrap().get(job_id).cloned()
    }
}

#[async_trait::async_trait]
impl Provider for Fleet {
    fn name(&self) -> &'static str {
        "instant"
    }

    async fn create_instance(&self, spec: &MachineSpec) -> Result<Instance, ProviderError> {
        let id = format!("i-{:08}", self.next.fetch_add(1, Ordering::SeqCst));
        let bootstrap = stagely_cloud_init::read_user_data(&spec.user_data)?;
        if let (Some(job), Some(run)) = (spec.tags.get("stagely:job"), spec.tags.get("stagely:run"))
        {
            marks()
                .lock()
                .unwrap()
                .create_called
                .insert(job.clone(), Instant::now());
            self.runs.lock().unwrap().insert(job.clone(), run.clone());
        }
        let agent = SimulatedAgent {
            instance_id: id.clone(),
            arch: spec.arch,
            core_url: bootstrap.agent.core_url,
            token: bootstrap.agent.token,
            client: self.client.clone(),
            events: self.events.clone(),
        };
        let events = self.events.clone();
        let instance_id = id.clone();
        let task = tokio::spawn(async move {
            if let Err(error) = agent.run().await {
                let _ = events.send(FleetEvent::Failed {
                    instance_id,
                    error: format!("{error:#}"),
                });
            }
        });
        self.live
            .lock()
            .unwrap()
            .insert(id.clone(), (task.abort_handle(), spec.clone()));
        Ok(Instance {
            id,
            instance_type: "instant".into(),
            host_arch: spec.arch,
            emulated: false,
            tags: spec.tags.clone(),
            market: None,
            notice: None,
        })
    }

    async fn terminate_instance(&self, instance_id: &str) -> Result<(), ProviderError> {
        let removed = self.live.lock().unwrap().remove(instance_id);
        if let Some((task, _)) = removed {
            task.abort();
            let _ = self.events.send(FleetEvent::Terminated {
                instance_id: instance_id.to_string(),
                at: Instant::now(),
            });
        }
        Ok(())
    }

    async fn instance_state(&self, instance_id: &str) -> Result<InstanceState, ProviderError> {
        Ok(if self.live.lock().unwrap().contains_key(instance_id) {
            InstanceState::Running
        } else {
            InstanceState::Gone {
                detail: "terminated".into(),
            }
        })
    }

    async fn list_instances(
        &self,
        tags: &BTreeMap<String, String>,
    ) -> Result<Vec<Instance>, ProviderError> {
        Ok(self
            .live
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, (_, spec))| tags.iter().all(|(k, v)| spec.tags.get(k) == Some(v)))
            .map(|(id, (_, spec))| Instance {
                id: id.clone(),
                instance_type: "instant".into(),
                host_arch: spec.arch,
                emulated: false,
                tags: spec.tags.clone(),
                market: None,
                notice: None,
            })
            .collect())
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct SimulatedAgent {
    instance_id: String,
    arch: Arch,
    core_url: String,
    token: String,
    client: reqwest::Client,
    events: mpsc::UnboundedSender<FleetEvent>,
}

impl SimulatedAgent {
    /// Dials the core and serves work frames until the connection closes. A build whose
    /// environment starts with `hold-` is held open (heartbeats only) until the core ends it;
    /// any other is pushed and reported at once. In `merge-` runs the amd64 build reports
    /// last, so its agent is the one handed the MERGE.
    async fn run(self) -> anyhow::Result<()> {
        let url = format!(
            "{}/api/v1/agent/connect",
            self.core_url.replacen("http", "ws", 1)
        );
        let mut request = url.into_client_request()?;
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {}", self.token).parse()?);
        // As the real agent: no Nagle delay on its small frames.
        let (mut socket, _) =
            tokio_tungstenite::connect_async_with_config(request, None, true).await?;
        send(
            &mut socket,
            &Message::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                agent_version: "bench".into(),
                instance_id: self.instance_id.clone(),
                arch: self.arch,
                builders: vec![BuilderKind::Buildah],
                emulated_arches: vec![],
                accepts_more_work: true,
                job_id: None,
                attempt: None,
                acked_seq: None,
            }),
        )
        .await?;
        let mut heartbeat = tokio::time::interval(Duration::from_secs(10));
        let mut last_status: Option<Instant> = None;
        loop {
            tokio::select! {
                frame = socket.next() => {
                    let text = match frame {
                        Some(Ok(Ws::Text(text))) => text,
                        Some(Ok(Ws::Close(_))) | None => return Ok(()),
                        Some(Ok(_)) => continue,
                        Some(Err(error)) => return Err(error.into()),
                    };
                    match decode(text.as_bytes())? {
                        Message::Build(build) => {
                            let _ = self.events.send(FleetEvent::Build { job_id: build.job_id.clone() });
                            let target = build.build_config.target_image;
                            let environment = environment_of(&target);
                            if environment.starts_with("hold-") {
                                continue;
                            }
                            if environment.starts_with("merge-") && self.arch == Arch::Amd64 {
                                tokio::time::sleep(Duration::from_millis(30)).await;
                            }
                            let access = access_for(&target, build.registry_auth.as_ref())?;
                            let (repository, tag) = access
                                .split_reference(&target)
                                .ok_or_else(|| anyhow::anyhow!("target {target} is not on the registry"))?;
                            let (digest, _) = push_minimal_image(
                                &self.client, &access, repository, tag, self.arch.as_str(),
                            )
                            .await?;
                            report(&mut socket, &build.job_id, &target, &digest).await?;
                            last_status = Some(Instant::now());
                        }
                        Message::Merge(merge) => {
                            let received = Instant::now();
                            let access = access_for(&merge.target_image, merge.registry_auth.as_ref())?;
                            let (repository, tag) = access
                                .split_reference(&merge.target_image)
                                .ok_or_else(|| anyhow::anyhow!("merge target is not on the registry"))?;
                            let mut children = Vec::new();
                            for (source, arch) in merge.source_images.iter().zip(["amd64", "arm64"]) {
                                let (_, digest) = source
                                    .rsplit_once('@')
                                    .ok_or_else(|| anyhow::anyhow!("source {source} has no digest"))?;
                                let size = manifest_size(&self.client, &access, repository, digest).await?;
                                children.push((digest.to_string(), size, arch.to_string()));
                            }
                            let digest = push_minimal_index(
                                &self.client, &access, repository, tag, &children,
                            )
                            .await?;
                            report(&mut socket, &merge.job_id, &merge.target_image, &digest).await?;
                            let _ = self.events.send(FleetEvent::Merge {
                                instance_id: self.instance_id.clone(),
                                last_status: last_status.unwrap_or(received),
                                received,
                                done: Instant::now(),
                            });
                        }
                        Message::Cancel(cancel) => {
                            send(&mut socket, &Message::Status(Status {
                                job_id: cancel.job_id,
                                state: JobState::Failed,
                                exit_code: None,
                                artifact_url: None,
                                digest: None,
                                error: Some("cancelled".into()),
                                never_ran: Some(stagely_protocol::NeverRan::Cancelled),
                                seq: Some(1),
                            })).await?;
                        }
                        _ => {}
                    }
                }
                _ = heartbeat.tick() => {
                    send(&mut socket, &Message::Heartbeat(Heartbeat { job_id: None })).await?;
                }
            }
        }
    }
}

async fn send(socket: &mut Socket, message: &Message) -> anyhow::Result<()> {
    socket.send(Ws::text(encode(message))).await?;
    Ok(())
}

/// One log line, then STATUS completed with the pushed digest.
async fn report(
    socket: &mut Socket,
    job_id: &str,
    image: &str,
    digest: &str,
) -> anyhow::Result<()> {
    send(
        socket,
        &Message::Log(Log {
            job_id: job_id.to_string(),
            stream: LogStream::System,
            data: format!("pushed {image}@{digest}\n"),
            seq: Some(1),
            continued: false,
        }),
    )
    .await?;
    send(
        socket,
        &Message::Status(Status {
            job_id: job_id.to_string(),
            state: JobState::Completed,
            exit_code: Some(0),
            artifact_url: Some(image.to_string()),
            digest: Some(digest.to_string()),
            error: None,
            never_ran: None,
            seq: Some(2),
        }),
    )
    .await
}

/// `<host>/<namespace>/<environment>:<tag>` → environment.
fn environment_of(image: &str) -> &str {
    let path = image.rsplit_once(':').map_or(image, |(path, _)| path);
    path.rsplit('/').next().unwrap_or("")
}

/// The registry and login a work frame names (as a real agent logs in).
fn access_for(
    image: &str,
    auth: Option<&stagely_protocol::RegistryAuth>,
) -> anyhow::Result<RegistryAccess> {
    let auth = auth.ok_or_else(|| anyhow::anyhow!("the work frame carries no registry login"))?;
    let host = image
        .split('/')
        .next()
        .ok_or_else(|| anyhow::anyhow!("image {image} names no registry"))?;
    Ok(RegistryAccess {
        host: host.to_string(),
        username: auth.username.clone(),
        password: auth.password.clone(),
    })
}

async fn manifest_size(
    client: &reqwest::Client,
    access: &RegistryAccess,
    repository: &str,
    digest: &str,
) -> anyhow::Result<usize> {
    let body = client
        .get(format!(
            "http://{}/v2/{repository}/manifests/{digest}",
            access.host
        ))
        .basic_auth(&access.username, Some(&access.password))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await?
        .error_for_status()?
        .bytes()
        .await?;
    Ok(body.len())
}

// ---------------------------------------------------------------------------------------------
// Scenarios.

async fn submit(core: &TestCore, environment: &str, yaml: &str) -> anyhow::Result<String> {
    let (status, body) = core
        .submit_raw(serde_json::json!({
            "repo_url": "/nonexistent/repo",
            "commit_hash": FAKE_COMMIT,
            "branch": "main",
            "environment_id": environment,
            "stagely_yaml": yaml,
        }))
        .await?;
    anyhow::ensure!(status == 201, "submit answered {status}: {body}");
    body["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("no run id in {body}"))
}

const ONE_BUILD: &str = "builds:\n  app:\n    context: ./app\n    platform: linux/amd64\n";
const MULTI_ARCH: &str = "builds:\n  app:\n    context: ./app\n    platforms: [linux/amd64, linux/arm64]\n    machine: small\n";

/// Waits for the next fleet event `pick` accepts (other events are dropped); a failed
/// simulated agent ends the benchmark.
async fn next_event<T>(
    events: &mut mpsc::UnboundedReceiver<FleetEvent>,
    mut pick: impl FnMut(FleetEvent) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .expect("the benchmark stalled: no fleet event within 300 s")
            .expect("the fleet is gone");
        if let FleetEvent::Failed { instance_id, error } = &event {
            panic!("simulated agent on {instance_id} failed: {error}");
        }
        if let Some(value) = pick(event) {
            return value;
        }
    }
}

/// Where the time of `jobs` went, each stage median / p99: eligible → instance asked for
/// (load, claim) → agent accepted (instance recorded, boot, WebSocket upgrade) → work sent.
fn stages(fleet: &Fleet, jobs: &[String]) -> String {
    let marks = marks().lock().unwrap();
    let mut claim = Vec::new();
    let mut boot = Vec::new();
    let mut send = Vec::new();
    let mut slowest = (0.0, String::new());
    for job in jobs {
        let run = fleet.run_of(job).expect("the job's instance was created");
        let (Some(stored), Some(created), Some(accepted), Some(sent)) = (
            marks.stored.get(&run),
            marks.create_called.get(job),
            marks.authenticated.get(job),
            marks.sent.get(job),
        ) else {
            continue;
        };
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        claim.push(ms(created.duration_since(*stored)));
        boot.push(ms(accepted.duration_since(*created)));
        send.push(ms(sent.duration_since(*accepted)));
        let total = ms(sent.duration_since(*stored));
        if total > slowest.0 {
            slowest = (
                total,
                format!(
                    "{:.2}+{:.2}+{:.2}",
                    claim[claim.len() - 1],
                    boot[boot.len() - 1],
                    send[send.len() - 1]
                ),
            );
        }
    }
    let brief = |values: &mut Vec<f64>| {
        values.sort_by(f64::total_cmp);
        format!(
            "{:.2}/{:.2}",
            percentile(values, 50.0),
            percentile(values, 99.0)
        )
    };
    format!(
        "to create {} · to agent accepted {} · to work sent {} ms (slowest: {})",
        brief(&mut claim),
        brief(&mut boot),
        brief(&mut send),
        slowest.1
    )
}

/// Eligible → work sent, for `jobs`, in milliseconds.
fn dispatch_latencies(fleet: &Fleet, jobs: &[String]) -> Vec<f64> {
    let marks = marks().lock().unwrap();
    jobs.iter()
        .map(|job| {
            let run = fleet.run_of(job).expect("the job's instance was created");
            let stored = *marks
                .stored
                .get(&run)
                .unwrap_or_else(|| panic!("no `run submitted` event for run {run} (job {job})"));
            let sent = *marks
                .sent
                .get(job)
                .unwrap_or_else(|| panic!("no `work sent` event for job {job}"));
            sent.duration_since(stored).as_secs_f64() * 1000.0
        })
        .collect()
}

struct Level {
    fan_out: Vec<f64>,
    next_job: Vec<f64>,
    /// Median/p99 of the next jobs' stages.
    stages: String,
}

async fn dispatch_level(backend: Backend, level: usize, probes: usize) -> Level {
    let (fleet, mut events) = Fleet::new();
    let mut core = TestCore::start_with_provider_on(fleet.clone(), backend, |file| {
        file.scheduler.max_concurrent_jobs = Some(level + 8);
        file.api.max_connections = Some(2 * level + 256);
    })
    .await
    .expect("core starts");
    // The first N-1 jobs, submitted together (16 requests in flight), each its own
    // environment (a run for an environment supersedes its older ones).
    let holders = level.saturating_sub(1);
    let submitted: Vec<anyhow::Result<String>> = futures_util::stream::iter(0..holders)
        .map(|i| {
            let core = &core;
            async move { submit(core, &format!("hold-{i}"), ONE_BUILD).await }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    for result in submitted {
        result.expect("submit");
    }
    let mut fan_out_jobs = Vec::new();
    while fan_out_jobs.len() < holders {
        let job = next_event(&mut events, |event| match event {
            FleetEvent::Build { job_id } => Some(job_id),
            _ => None,
        })
        .await;
        fan_out_jobs.push(job);
    }
    // Let the fan-out's writes settle, then the next jobs, one at a time.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut probe_jobs = Vec::new();
    for i in 0..probes {
        submit(&core, &format!("probe-{i}"), ONE_BUILD)
            .await
            .expect("submit");
        let job = next_event(&mut events, |event| match event {
            FleetEvent::Build { job_id } => Some(job_id),
            _ => None,
        })
        .await;
        // Completed and its instance terminated: back to N-1 live. The next job arrives a
        // little later (arrivals are independent, not timed to the end of the previous job's
        // bookkeeping, which the core finishes in the background).
        next_event(&mut events, |event| match event {
            FleetEvent::Terminated { .. } => Some(()),
            _ => None,
        })
        .await;
        probe_jobs.push(job);
        tokio::time::sleep(PROBE_GAP).await;
    }
    let figures = Level {
        fan_out: dispatch_latencies(&fleet, &fan_out_jobs),
        next_job: dispatch_latencies(&fleet, &probe_jobs),
        stages: stages(&fleet, &probe_jobs),
    };
    core.stop().await;
    figures
}

struct MergeFigures {
    handover: Vec<f64>,
    total: Vec<f64>,
    agent_work: Vec<f64>,
}

async fn merges(backend: Backend, runs: usize) -> MergeFigures {
    let (fleet, mut events) = Fleet::new();
    let mut core = TestCore::start_with_provider_on(fleet.clone(), backend, |_| {})
        .await
        .expect("core starts");
    let mut figures = MergeFigures {
        handover: Vec::new(),
        total: Vec::new(),
        agent_work: Vec::new(),
    };
    for i in 0..runs {
        let run_id = submit(&core, &format!("merge-{i}"), MULTI_ARCH)
            .await
            .expect("submit");
        let (instance, last_status, received, done) =
            next_event(&mut events, |event| match event {
                FleetEvent::Merge {
                    instance_id,
                    last_status,
                    received,
                    done,
                } => Some((instance_id, last_status, received, done)),
                _ => None,
            })
            .await;
        let terminated = next_event(&mut events, |event| match event {
            FleetEvent::Terminated { instance_id, at } if instance_id == instance => Some(at),
            _ => None,
        })
        .await;
        let run = core.wait_finished(&run_id, WAIT).await;
        assert_eq!(run.status, "completed", "merge run {run_id}: {run:?}");
        let merge = run
            .jobs
            .iter()
            .find(|job| job.name.ends_with("_merge"))
            .expect("the run has a merge job");
        assert_eq!(
            merge.merge_path.as_deref(),
            Some("last_builder"),
            "the merge ran on the last builder"
        );
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        figures.handover.push(ms(received - last_status));
        figures.total.push(ms(terminated - last_status));
        figures.agent_work.push(ms(done - received));
    }
    core.stop().await;
    figures
}

// ---------------------------------------------------------------------------------------------

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn summary(values: &[f64]) -> String {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    format!(
        "n={:<4} median {:>8.2} ms  p99 {:>8.2} ms  max {:>8.2} ms",
        sorted.len(),
        percentile(&sorted, 50.0),
        percentile(&sorted, 99.0),
        sorted.last().copied().unwrap_or(f64::NAN)
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    tracing_subscriber::registry().with(MarkLayer).init();
    let levels: Vec<usize> = std::env::var("STAGELY_BENCH_LEVELS")
        .unwrap_or_else(|_| "1,50,500".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    let probes: usize = std::env::var("STAGELY_BENCH_PROBES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let backends: Vec<Backend> = match std::env::var("STAGELY_BENCH_BACKENDS").as_deref() {
        Ok("sqlite") => vec![Backend::Sqlite],
        Ok("postgres") => vec![Backend::Postgres],
        _ => vec![Backend::Sqlite, Backend::Postgres],
    };
    println!("dispatch: eligible (run stored) → BUILD frame sent, inside the core");
    for &backend in &backends {
        for &level in &levels {
            let figures = dispatch_level(backend, level, probes).await;
            if level > 1 {
                println!(
                    "  {backend:<10} {level:>3} concurrent: fan-out of {:>3} at once   {}",
                    level - 1,
                    summary(&figures.fan_out)
                );
            }
            println!(
                "  {backend:<10} {level:>3} concurrent: next job, {:>3} live      {}",
                level - 1,
                summary(&figures.next_job)
            );
            println!(
                "  {:<10} {:>3}   stages (median/p99): {}",
                "", "", figures.stages
            );
        }
    }
    println!("merge: after the last platform job's STATUS (20 multi-arch runs)");
    for &backend in &backends {
        let figures = merges(backend, 20).await;
        println!(
            "  {backend:<10} MERGE frame at the last builder's agent  {}",
            summary(&figures.handover)
        );
        println!(
            "  {backend:<10} merge stored, instance terminated       {}",
            summary(&figures.total)
        );
        println!(
            "  {backend:<10} (of which the agent's index push)       {}",
            summary(&figures.agent_work)
        );
    }
}
