//! The durable engine end to end (local provider, buildah, a real registry): fail-fast and
//! its opt-out, supersede, job and boot timeouts, an agent lost mid-build or stopped by its
//! machine's shutdown, rebuild and the queue — through the public API only.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stagely_provisioning::{Instance, InstanceState, MachineSpec, Provider, ProviderError};
use stagely_tests::*;

const RUN_TIMEOUT: Duration = Duration::from_secs(180);

/// A Dockerfile whose RUN step prints `started <tag>` and then sleeps `seconds`, exiting with
/// `exit_code`. The tag makes its sleep findable in the process list.
fn sleeper(tag: &str, seconds: u32, exit_code: i32) -> String {
    format!(
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"echo started {tag}; /bin/busybox sleep {seconds}; exit {exit_code}\"]\n"
    )
}

fn repo(files: &[(&str, String)]) -> TestRepo {
    let busybox = busybox("amd64").unwrap();
    let mut owned: Vec<(String, Vec<u8>)> = files
        .iter()
        .map(|(path, text)| (path.to_string(), text.clone().into_bytes()))
        .collect();
    // Each build context gets busybox beside its Dockerfile.
    for (path, _) in files {
        if let Some(dir) = path.strip_suffix("/Dockerfile") {
            owned.push((format!("{dir}/busybox"), busybox.clone()));
        }
    }
    let refs: Vec<(&str, &[u8])> = owned
        .iter()
        .map(|(path, bytes)| (path.as_str(), bytes.as_slice()))
        .collect();
    TestRepo::with_files(&refs).unwrap()
}

/// Processes on this machine whose command line contains `text`.
fn processes_with(text: &str) -> Vec<(i32, String)> {
    cmdlines()
        .into_iter()
        .filter(|(_, c)| c.contains(text))
        .collect()
}

async fn wait_for_job(core: &TestCore, run_id: &str, job: &str, status: &str) {
    poll_until(Duration::from_secs(120), "a job's status", || async {
        let view = core.run(run_id).await?;
        let found = view
            .jobs
            .iter()
            .find(|j| j.name == job)
            .map(|j| j.status.clone())
            .unwrap_or_default();
        Ok(((found == status).then_some(()), format!("{job}={found}")))
    })
    .await
}

async fn wait_for_log(core: &TestCore, job_id: &str, text: &str) {
    poll_until(Duration::from_secs(120), "a log line", || async {
        let lines = core.logs(job_id).await?;
        let found = lines.iter().any(|(_, l)| l.contains(text));
        Ok((found.then_some(()), format!("{} lines", lines.len())))
    })
    .await
}

async fn wait_for_status(core: &TestCore, run_id: &str, status: &str) -> stagely_api::RunView {
    poll_until(RUN_TIMEOUT, "the run's status", || async {
        let view = core.run(run_id).await?;
        let seen = format!(
            "{} [{}]",
            view.status,
            view.jobs
                .iter()
                .map(|j| format!("{}={} ({:?})", j.name, j.status, j.error_message))
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(((view.status == status).then_some(view), seen))
    })
    .await
}

async fn post(core: &TestCore, path: &str) -> (u16, serde_json::Value) {
    let response = core
        .client
        .post(format!("{}{path}", core.url))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fail_fast_cancels_the_sibling_and_its_builder_process_is_gone() {
    if !require_build_peers() {
        return;
    }
    let repo = repo(&[
        (
            "stagely.yaml",
            "builds:\n  slow:\n    context: ./slow\n    platform: linux/amd64\n  broken:\n    context: ./broken\n    platform: linux/amd64\n".into(),
        ),
        ("slow/Dockerfile", sleeper("slow", 601, 0)),
        ("broken/Dockerfile", sleeper("broken", 6, 7)),
    ]);
    let mut core = TestCore::start().await.unwrap();
    let run = core.submit(&repo, None, "pr-ff").await.unwrap();
    let slow = run
        .jobs
        .iter()
        .find(|j| j.name == "slow")
        .unwrap()
        .id
        .clone();
    wait_for_log(&core, &slow, "started slow").await;
    poll_until(
        Duration::from_secs(60),
        "the slow builder to run",
        || async {
            let found = processes_with("sleep 601");
            Ok(((!found.is_empty()).then_some(()), format!("{found:?}")))
        },
    )
    .await;
    let view = wait_for_status(&core, &run.id, "failed").await;
    let by_name = |name: &str| view.jobs.iter().find(|j| j.name == name).unwrap();
    assert_eq!(by_name("broken").status, "failed");
    assert_eq!(by_name("broken").failure_kind.as_deref(), Some("build"));
    assert_eq!(by_name("slow").status, "cancelled");
    assert!(
        by_name("slow")
            .error_message
            .as_deref()
            .unwrap_or("")
            .contains("job broken failed (fail_fast)"),
        "{:?}",
        by_name("slow").error_message
    );
    assert_eq!(view.cancel_reason.as_deref(), Some("fail_fast:broken"));
    // The sibling's builder is really gone, and every instance terminated.
    assert!(processes_with("sleep 601").is_empty());
    assert!(core.live_instances().await.is_empty());
    core.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_fail_fast_the_sibling_completes_and_the_run_still_fails() {
    if !require_build_peers() {
        return;
    }
    let repo = repo(&[
        (
            "stagely.yaml",
            "fail_fast: false\nbuilds:\n  slow:\n    context: ./slow\n    platform: linux/amd64\n  broken:\n    context: ./broken\n    platform: linux/amd64\n".into(),
        ),
        ("slow/Dockerfile", sleeper("slow", 4, 0)),
        ("broken/Dockerfile", sleeper("broken", 0, 7)),
    ]);
    let mut core = TestCore::start().await.unwrap();
    let run = core.submit(&repo, None, "pr-nff").await.unwrap();
    let view = wait_for_status(&core, &run.id, "failed").await;
    let by_name = |name: &str| view.jobs.iter().find(|j| j.name == name).unwrap();
    assert_eq!(by_name("broken").status, "failed");
    assert_eq!(by_name("slow").status, "completed");
    assert!(by_name("slow").digest.is_some());
    assert!(!view.fail_fast && view.cancel_reason.is_none());
    core.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_run_for_the_environment_supersedes_the_unfinished_one() {
    if !require_build_peers() {
        return;
    }
    let old = repo(&[
        (
            "stagely.yaml",
            "builds:\n  app:\n    context: ./app\n    platform: linux/amd64\n".into(),
        ),
        ("app/Dockerfile", sleeper("old", 602, 0)),
    ]);
    let new = repo(&[
        (
            "stagely.yaml",
            "builds:\n  app:\n    context: ./app\n    platform: linux/amd64\n".into(),
        ),
        ("app/Dockerfile", sleeper("new", 0, 0)),
    ]);
    let mut core = TestCore::start().await.unwrap();
    let first = core.submit(&old, None, "pr-sup").await.unwrap();
    wait_for_log(&core, &first.jobs[0].id, "started old").await;
    let second = core.submit(&new, None, "pr-sup").await.unwrap();
    let view = wait_for_status(&core, &first.id, "cancelled").await;
    assert_eq!(
        view.cancel_reason,
        Some(format!("superseded:{}", second.id))
    );
    assert_eq!(view.jobs[0].status, "cancelled");
    let view = wait_for_status(&core, &second.id, "completed").await;
    assert_eq!(view.jobs[0].status, "completed");
    assert!(processes_with("sleep 602").is_empty());
    assert!(core.live_instances().await.is_empty());

    // Rebuild: a new run from the environment's latest run, from scratch.
    let (status, body) = post(&core, "/api/v1/environments/pr-sup/rebuild").await;
    assert_eq!(status, 201, "{body}");
    let rebuilt: stagely_api::RunView = serde_json::from_value(body).unwrap();
    assert_ne!(rebuilt.id, second.id);
    assert_eq!(rebuilt.commit_hash, new.commit);
    let view = wait_for_status(&core, &rebuilt.id, "completed").await;
    assert_eq!(view.jobs[0].name, "app");
    let (status, body) = post(&core, "/api/v1/environments/nowhere/rebuild").await;
    assert_eq!(status, 404, "{body}");
    core.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_over_its_timeout_is_stopped_and_fails_saying_so() {
    if !require_build_peers() {
        return;
    }
    let repo = repo(&[
        (
            "stagely.yaml",
            "builds:\n  app:\n    context: ./app\n    platform: linux/amd64\n    timeout: 4s\n"
                .into(),
        ),
        ("app/Dockerfile", sleeper("timeout", 603, 0)),
    ]);
    let mut core = TestCore::start().await.unwrap();
    let run = core.submit(&repo, None, "pr-to").await.unwrap();
    let view = wait_for_status(&core, &run.id, "failed").await;
    let job = &view.jobs[0];
    assert_eq!(job.status, "failed");
    assert_eq!(job.failure_kind.as_deref(), Some("timeout"));
    let message = job.error_message.clone().unwrap_or_default();
    assert!(message.contains("timed out after 4s"), "{message}");
    assert_eq!(job.attempts.len(), 1, "a timeout is not retried");
    assert!(processes_with("sleep 603").is_empty());
    assert!(core.live_instances().await.is_empty());
    core.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_instance_that_never_boots_is_terminated_and_the_job_retried() {
    if !require_build_peers() {
        return;
    }
    let repo = repo(&[
        (
            "stagely.yaml",
            "builds:\n  app:\n    context: ./app\n    platform: linux/amd64\n".into(),
        ),
        ("app/Dockerfile", sleeper("boot", 0, 0)),
    ]);
    let wrapper: Arc<Mutex<Option<Arc<Faulty>>>> = Arc::default();
    let keep = wrapper.clone();
    let mut core = TestCore::start_wrapped(
        |file| {
            file.scheduler.agent_connect_timeout_secs = Some(2);
            file.scheduler.retry_backoff_secs = Some(1);
        },
        move |local| {
            let duds = Arc::new(Faulty {
                duds: Mutex::new(1),
                ..Faulty::new(local, Duration::ZERO, Duration::ZERO)
            });
            *keep.lock().unwrap() = Some(duds.clone());
            duds
        },
    )
    .await
    .unwrap();
    let run = core.submit(&repo, None, "pr-boot").await.unwrap();
    let view = wait_for_status(&core, &run.id, "completed").await;
    let job = &view.jobs[0];
    assert_eq!(job.attempts.len(), 2, "{:?}", job.attempts);
    assert_eq!(job.attempts[0].outcome.as_deref(), Some("infrastructure"));
    let message = job.attempts[0].message.clone().unwrap_or_default();
    assert!(
        message.contains("boot_timeout") && message.contains("2s"),
        "{message}"
    );
    assert_eq!(job.attempts[0].instance_id.as_deref(), Some("dud-0"));
    assert_eq!(job.attempts[1].outcome.as_deref(), Some("completed"));
    let duds = wrapper.lock().unwrap().clone().unwrap();
    assert!(
        duds.terminated
            .lock()
            .unwrap()
            .contains(&"dud-0".to_string())
    );
    assert_eq!(
        duds.created.lock().unwrap().len(),
        2,
        "one instance per attempt"
    );
    assert!(core.live_instances().await.is_empty());
    core.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_killed_mid_build_is_retried_on_a_new_instance_and_completes() {
    if !require_build_peers() {
        return;
    }
    let repo = repo(&[
        (
            "stagely.yaml",
            "builds:\n  app:\n    context: ./app\n    platform: linux/amd64\n".into(),
        ),
        ("app/Dockerfile", sleeper("victim", 4, 0)),
    ]);
    // The default reconnect grace (120 s): a dead agent never dials again, and the provider
    // says its instance is gone, so the attempt ends without waiting the grace out.
    let mut core = TestCore::start_configured(|file| {
        file.scheduler.retry_backoff_secs = Some(30);
    })
    .await
    .unwrap();
    let run = core.submit(&repo, None, "pr-kill").await.unwrap();
    let job_id = run.jobs[0].id.clone();
    wait_for_log(&core, &job_id, "started victim").await;
    // Kill the agent of the first instance (not the builder: the agent is what vanishes
    // when a VM dies; it is the init of the instance's PID namespace, so its build goes
    // with it).
    core.signal_the_agent(nix::sys::signal::Signal::SIGKILL);
    let killed = std::time::Instant::now();
    let view = wait_for_status(&core, &run.id, "completed").await;
    let recovery = killed.elapsed();
    let job = &view.jobs[0];
    assert_eq!(job.attempts.len(), 2, "{:?}", job.attempts);
    assert_eq!(job.attempts[0].outcome.as_deref(), Some("infrastructure"));
    let message = job.attempts[0].message.as_deref().unwrap_or("");
    assert!(
        message.starts_with("instance_gone: ") && message.contains("has exited"),
        "{:?}",
        job.attempts[0]
    );
    // Neither the grace (120 s) nor the backoff (30 s) was waited for.
    assert!(recovery < Duration::from_secs(60), "{recovery:?}");
    assert_ne!(job.attempts[0].instance_id, job.attempts[1].instance_id);
    // Both attempts' lines are kept, in order, the second after a marker.
    let lines = core.logs(&job_id).await.unwrap();
    let marker = lines
        .iter()
        .position(|(_, l)| l.contains("attempt 2 of this job starts here"))
        .expect("attempt marker");
    let first = lines
        .iter()
        .position(|(_, l)| l.contains("started victim"))
        .unwrap();
    let second = lines
        .iter()
        .rposition(|(_, l)| l.contains("started victim"))
        .unwrap();
    assert!(first < marker && marker < second, "{lines:?}");
    assert!(core.live_instances().await.is_empty());
    core.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_stopped_by_its_machine_shutting_down_is_retried_elsewhere_not_failed() {
    if !require_build_peers() {
        return;
    }
    let repo = repo(&[
        (
            "stagely.yaml",
            "builds:\n  app:\n    context: ./app\n    platform: linux/amd64\n".into(),
        ),
        ("app/Dockerfile", sleeper("stopped", 4, 0)),
    ]);
    let mut core = TestCore::start_configured(|file| {
        file.scheduler.retry_backoff_secs = Some(1);
    })
    .await
    .unwrap();
    let run = core.submit(&repo, None, "pr-shutdown").await.unwrap();
    let job_id = run.jobs[0].id.clone();
    wait_for_log(&core, &job_id, "started stopped").await;
    // SIGTERM, as a machine's shutdown sends it (no CANCEL from the core): the build
    // stops, but it did not fail.
    core.signal_the_agent(nix::sys::signal::Signal::SIGTERM);
    let view = wait_for_status(&core, &run.id, "completed").await;
    let job = &view.jobs[0];
    assert_eq!(job.attempts.len(), 2, "{:?}", job.attempts);
    assert_eq!(job.attempts[0].outcome.as_deref(), Some("infrastructure"));
    let message = job.attempts[0].message.as_deref().unwrap_or("");
    assert!(
        message.contains("instance_shutdown") && message.contains("shut down during the job"),
        "{:?}",
        job.attempts[0]
    );
    assert_eq!(job.attempts[1].outcome.as_deref(), Some("completed"));
    assert_ne!(job.attempts[0].instance_id, job.attempts[1].instance_id);
    assert!(core.live_instances().await.is_empty());
    core.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_over_the_instance_limit_wait_in_a_visible_fifo_queue() {
    if !require_build_peers() {
        return;
    }
    let repo = repo(&[
        (
            "stagely.yaml",
            "fail_fast: false\nbuilds:\n  a:\n    context: ./a\n    platform: linux/amd64\n  b:\n    context: ./b\n    platform: linux/amd64\n  c:\n    context: ./c\n    platform: linux/amd64\n".into(),
        ),
        ("a/Dockerfile", sleeper("qa", 3, 0)),
        ("b/Dockerfile", sleeper("qb", 0, 0)),
        ("c/Dockerfile", sleeper("qc", 0, 0)),
    ]);
    let mut core = TestCore::start_configured(|file| {
        file.scheduler.max_concurrent_jobs = Some(1);
    })
    .await
    .unwrap();
    let run = core.submit(&repo, None, "pr-queue").await.unwrap();
    let queue: serde_json::Value =
        poll_until(Duration::from_secs(30), "a queue of two", || async {
            let queue: serde_json::Value = core
                .client
                .get(format!("{}/api/v1/queue", core.url))
                .send()
                .await?
                .json()
                .await?;
            let waiting = queue["jobs"].as_array().map_or(0, Vec::len);
            Ok(((waiting == 2).then_some(queue.clone()), queue.to_string()))
        })
        .await;
    let names: Vec<(u64, &str)> = queue["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| {
            (
                j["position"].as_u64().unwrap(),
                j["job_name"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(names, [(1, "b"), (2, "c")]);
    wait_for_job(&core, &run.id, "a", "running").await;
    let view = wait_for_status(&core, &run.id, "completed").await;
    // One at a time: each job started after the previous one finished.
    let by_name = |name: &str| view.jobs.iter().find(|j| j.name == name).unwrap();
    assert!(by_name("b").started_at.unwrap() >= by_name("a").completed_at.unwrap());
    assert!(by_name("c").started_at.unwrap() >= by_name("b").completed_at.unwrap());
    core.stop().await;
}

/// A run is stored finished only once its instances are gone, even when syncs read it (still
/// unfinished in the store) while its terminations run and the engine finishes it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_is_stored_finished_only_after_its_instances_are_gone_whatever_syncs_read() {
    if !require_build_peers() {
        return;
    }
    let repo = repo(&[
        (
            "stagely.yaml",
            "builds:\n  app:\n    context: ./app\n    platform: linux/amd64\n".into(),
        ),
        ("app/Dockerfile", sleeper("quick", 0, 0)),
    ]);
    let mut core = TestCore::start_wrapped(
        |file| file.scheduler.sync_interval_ms = Some(50),
        |local| Arc::new(Faulty::new(local, Duration::ZERO, Duration::from_secs(2))),
    )
    .await
    .unwrap();
    let run = core.submit(&repo, None, "pr-slow-end").await.unwrap();
    let view = wait_for_status(&core, &run.id, "completed").await;
    assert_eq!(view.jobs[0].status, "completed");
    let live = core.live_instances().await;
    assert!(
        live.is_empty(),
        "the run ended before its instance: {live:?}"
    );
    core.stop().await;
}

/// Every connection of the core to PostgreSQL is cut mid-build (a failover, a server restart):
/// the core reconnects and retries its writes, the build goes on and completes on its first
/// attempt, and the lines it printed after the cut are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cut_database_connections_mid_build_lose_nothing() {
    if !require_build_peers() {
        return;
    }
    // Always on PostgreSQL: the suite's PostgreSQL pass would only repeat it.
    if testing_postgres() {
        return;
    }
    let repo = repo(&[
        (
            "stagely.yaml",
            "builds:\n  app:\n    context: ./app\n    platform: linux/amd64\n".into(),
        ),
        (
            "app/Dockerfile",
            "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"echo started pgcut; /bin/busybox sleep 3; echo after the cut\"]\n".into(),
        ),
    ]);
    let mut core = TestCore::start_local_on(Backend::Postgres, |_| {})
        .await
        .unwrap();
    let database = core.database.as_ref().unwrap().name.clone();
    let run = core.submit(&repo, None, "pr-pgcut").await.unwrap();
    let job_id = run.jobs[0].id.clone();
    poll_until(RUN_TIMEOUT, "the build to start", || async {
        let lines = core.logs(&job_id).await.unwrap_or_default();
        let started = lines.iter().any(|(_, l)| l.contains("started pgcut"));
        Ok((started.then_some(()), format!("{} line(s)", lines.len())))
    })
    .await;
    {
        use sqlx::Connection;
        let mut admin = sqlx::PgConnection::connect(POSTGRES_ADMIN_URL)
            .await
            .unwrap();
        let cut: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&database)
        .fetch_all(&mut admin)
        .await
        .unwrap();
        assert!(!cut.is_empty(), "the core had connections to cut");
        let _ = admin.close().await;
    }
    let view = wait_for_status(&core, &run.id, "completed").await;
    let job = &view.jobs[0];
    assert_eq!(job.attempts.len(), 1, "not retried: {:?}", job.attempts);
    let lines = core.logs(&job_id).await.unwrap();
    assert!(
        lines.iter().any(|(_, l)| l.contains("after the cut")),
        "{lines:?}"
    );
    assert!(core.live_instances().await.is_empty());
    core.stop().await;
}

/// Wraps a provider: every creation and every termination waits first, and the first
/// `duds` instances are created but never boot an agent; records what it created and ended.
struct Faulty {
    inner: Arc<dyn Provider>,
    create_delay: Duration,
    terminate_delay: Duration,
    duds: Mutex<u32>,
    created: Mutex<Vec<String>>,
    terminated: Mutex<Vec<String>>,
}

impl Faulty {
    fn new(inner: Arc<dyn Provider>, create_delay: Duration, terminate_delay: Duration) -> Self {
        Faulty {
            inner,
            create_delay,
            terminate_delay,
            duds: Mutex::new(0),
            created: Mutex::default(),
            terminated: Mutex::default(),
        }
    }
}

#[async_trait::async_trait]
impl Provider for Faulty {
    fn name(&self) -> &'static str {
        "faulty"
    }

    async fn create_instance(&self, spec: &MachineSpec) -> Result<Instance, ProviderError> {
        tokio::time::sleep(self.create_delay).await;
        let dud = {
            let mut duds = self.duds.lock().unwrap();
            let dud = *duds > 0;
            *duds = duds.saturating_sub(1);
            dud
        };
        let instance = if dud {
            Instance {
                id: format!("dud-{}", self.created.lock().unwrap().len()),
                instance_type: "dud".into(),
                host_arch: spec.arch,
                emulated: false,
                tags: spec.tags.clone(),
                market: None,
                notice: None,
            }
        } else {
            self.inner.create_instance(spec).await?
        };
        self.created.lock().unwrap().push(instance.id.clone());
        Ok(instance)
    }

    async fn terminate_instance(&self, instance_id: &str) -> Result<(), ProviderError> {
        tokio::time::sleep(self.terminate_delay).await;
        if !instance_id.starts_with("dud-") {
            self.inner.terminate_instance(instance_id).await?;
        }
        self.terminated
            .lock()
            .unwrap()
            .push(instance_id.to_string());
        Ok(())
    }

    async fn instance_state(&self, instance_id: &str) -> Result<InstanceState, ProviderError> {
        if instance_id.starts_with("dud-") {
            // A dud boots nothing that could dial in, but the provider believes it runs.
            return Ok(InstanceState::Running);
        }
        self.inner.instance_state(instance_id).await
    }

    async fn list_instances(
        &self,
        tags: &BTreeMap<String, String>,
    ) -> Result<Vec<Instance>, ProviderError> {
        self.inner.list_instances(tags).await
    }
}

/// A run cancelled while its instance is being created ends only after that instance is
/// created and terminated: a final run never has a live (or about to live) instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_cancelled_during_instance_creation_ends_after_that_instance_is_gone() {
    if !require_build_peers() {
        return;
    }
    let repo = repo(&[
        (
            "stagely.yaml",
            "builds:\n  app:\n    context: ./app\n    platform: linux/amd64\n".into(),
        ),
        ("app/Dockerfile", sleeper("never", 0, 0)),
    ]);
    let wrapper: Arc<Mutex<Option<Arc<Faulty>>>> = Arc::default();
    let keep = wrapper.clone();
    let mut core = TestCore::start_wrapped(
        |_| {},
        move |local| {
            let slow = Arc::new(Faulty::new(local, Duration::from_secs(2), Duration::ZERO));
            *keep.lock().unwrap() = Some(slow.clone());
            slow
        },
    )
    .await
    .unwrap();
    let run = core.submit(&repo, None, "pr-cancel-create").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let response = core
        .client
        .post(format!("{}/api/v1/workflows/{}/cancel", core.url, run.id))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);
    wait_for_status(&core, &run.id, "cancelled").await;
    let slow = wrapper.lock().unwrap().clone().unwrap();
    let created = slow.created.lock().unwrap().clone();
    let terminated = slow.terminated.lock().unwrap().clone();
    assert_eq!(
        created.len(),
        1,
        "the run ended before its instance existed"
    );
    assert!(
        created.iter().all(|id| terminated.contains(id)),
        "created {created:?}, terminated {terminated:?}"
    );
    assert!(core.live_instances().await.is_empty());
    core.stop().await;
}
