//! Promises 2 and 3 with real parts: the registry password never reaches a command line,
//! a log line, the database or an error message; and a core that crashes mid-build leaks no
//! instance: the next core terminates it.

use std::time::Duration;

use stagely_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_registry_password_never_reaches_argv_logs_or_the_database() {
    if !require_build_peers() {
        return;
    }
    let captured = LogCapture::install();
    let busybox = busybox("amd64").unwrap();
    // The RUN step is slow enough to watch the builder's command line while it runs.
    let repo = TestRepo::with_files(&[
        ("stagely.yaml", b"builds:\n  slow:\n    context: .\n    platform: linux/amd64\n"),
        ("Dockerfile", b"FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"echo working; /bin/busybox sleep 4; echo done\"]\n"),
        ("busybox", &busybox),
    ])
    .unwrap();
    let mut core = TestCore::start().await.unwrap();
    let password = core.registry.password.clone();
    let run = core.submit(&repo, None, "pr-5").await.unwrap();

    let mut builder_seen = false;
    let mut agent_seen = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        for (pid, cmdline) in cmdlines() {
            assert!(
                !cmdline.contains(&password),
                "pid {pid} has the password on its command line: {cmdline}"
            );
            builder_seen |= cmdline.starts_with("buildah ") && cmdline.contains(" bud ");
            agent_seen |= cmdline.contains("stagely-agent");
        }
        let view = core.run(&run.id).await.unwrap();
        if matches!(view.status.as_str(), "completed" | "failed") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "run did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        builder_seen,
        "the scan never saw buildah running, so it proved nothing"
    );
    assert!(agent_seen, "the scan never saw the agent");
    let view = core.wait_finished(&run.id, Duration::from_secs(10)).await;
    assert_eq!(view.status, "completed", "{:?}", view.jobs[0].error_message);

    // Not in the job's stored log, nor in any file the core wrote (SQLite, WAL, instance
    // directories with agent logs), nor in what the core logged.
    let logs = core.logs(&view.jobs[0].id).await.unwrap();
    assert!(logs.iter().any(|(_, l)| l.contains("working")));
    assert!(logs.iter().all(|(_, l)| !l.contains(&password)));
    core.stop().await;
    let stored = core.stored().await;
    let database = match &core.database {
        Some(database) => format!("postgres:{}", database.name),
        None => "stagely.db".into(),
    };
    assert!(stored.iter().any(|(f, _)| f.ends_with(&database)));
    assert!(stored.iter().any(|(f, _)| f.ends_with("agent.log")));
    for (file, bytes) in stored {
        assert!(
            !contains_bytes(&bytes, password.as_bytes()),
            "{} contains the password",
            file.display()
        );
    }
    let core_log = captured.text();
    assert!(
        core_log.contains("run submitted"),
        "the log capture saw nothing, so it proves nothing"
    );
    assert!(
        !core_log.contains(&password),
        "the core logged the password"
    );
}

fn forever_repo() -> TestRepo {
    let busybox = busybox("amd64").unwrap();
    TestRepo::with_files(&[
        ("stagely.yaml", b"builds:\n  forever:\n    context: .\n    platform: linux/amd64\n"),
        ("Dockerfile", b"FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"echo started; /bin/busybox sleep 600\"]\n"),
        ("busybox", &busybox),
    ])
    .unwrap()
}

/// Processes whose command line mentions `dir` (agents and builders of its instances).
fn processes_under(dir: &std::path::Path) -> Vec<(i32, String)> {
    let needle = dir.to_string_lossy().to_string();
    cmdlines()
        .into_iter()
        .filter(|(_, c)| c.contains(&needle) && !c.contains(" serve "))
        .collect()
}

/// A `stagely serve` process whose one job is inside a RUN step that never ends.
async fn core_mid_build(
    environment: &str,
) -> (
    stagely_core::registry::LocalRegistry,
    tempfile::TempDir,
    ServeProcess,
    stagely_api::RunView,
    TestRepo,
) {
    let repo = forever_repo();
    let registry = stagely_core::registry::LocalRegistry::start()
        .await
        .unwrap();
    let data = tempfile::tempdir().unwrap();
    let core = ServeProcess::start(data.path(), &registry).await;
    let run = core.submit(&repo, environment).await;
    core.wait_for_line(&run.jobs[0].id, "started").await;
    (registry, data, core, run, repo)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_core_killed_mid_build_is_taken_over_by_its_restart_and_can_be_cancelled() {
    if !require_build_peers() {
        return;
    }
    let (_registry, data, mut core, run, _repo) = core_mid_build("pr-6").await;
    let job_id = run.jobs[0].id.clone();
    let before = core.run(&run.id).await.jobs[0].attempts[0].owner.clone();

    // Crash: SIGKILL, no graceful shutdown. The build and its agent go on without it.
    core.kill();
    let leftover = core.live_instance_dirs();
    assert_eq!(leftover.len(), 1, "the instance lives on, as a VM does");

    // The next incarnation adopts the running attempt, and the agent, dialling again with
    // its token, resumes with it: still one attempt, on the same instance.
    core.restart().await;
    poll_until(
        Duration::from_secs(60),
        "the restarted core to adopt the attempt",
        || async {
            let view = core.run(&run.id).await;
            let owner = view.jobs[0].attempts[0].owner.clone();
            Ok(((owner != before).then_some(()), format!("{view:?}")))
        },
    )
    .await;
    core.wait_for_line(&job_id, "started").await;
    let view = core.run(&run.id).await;
    let job = &view.jobs[0];
    assert_eq!(job.status, "running");
    assert_eq!(job.attempts.len(), 1, "{:?}", job.attempts);
    assert!(job.attempts[0].ended_at.is_none(), "{:?}", job.attempts);
    assert_eq!(
        core.live_instance_dirs(),
        leftover,
        "the same instance goes on"
    );

    // A user cancel stops the build: no builder process left, every instance terminated.
    let (status, body) = core.cancel(&run.id).await;
    assert_eq!(status, 202, "{body}");
    let view = core
        .wait_for_status(&run.id, "cancelled", Duration::from_secs(60))
        .await;
    assert_eq!(view.jobs[0].status, "cancelled");
    assert_eq!(
        view.cancel_reason.as_deref(),
        Some("user:STAGELY_API_TOKEN")
    );
    assert!(
        core.live_instance_dirs().is_empty(),
        "instance not terminated"
    );
    poll_until(
        Duration::from_secs(20),
        "the instance's processes to be gone",
        || async {
            let alive = processes_under(data.path());
            Ok((alive.is_empty().then_some(()), format!("{alive:?}")))
        },
    )
    .await;
    // Cancelling a finished run is a conflict, named as such.
    let (status, body) = core.cancel(&run.id).await;
    assert_eq!(status, 409, "{body}");
    assert!(body.to_string().contains("already finished"), "{body}");
    assert!(core.terminate().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_hands_the_running_build_over_and_the_restarted_core_completes_it() {
    if !require_build_peers() {
        return;
    }
    let busybox = busybox("amd64").unwrap();
    let repo = TestRepo::with_files(&[
        ("stagely.yaml", b"builds:\n  slow:\n    context: .\n    platform: linux/amd64\n"),
        ("Dockerfile", b"FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"echo started; /bin/busybox sleep 6\"]\n"),
        ("busybox", &busybox),
    ])
    .unwrap();
    let registry = stagely_core::registry::LocalRegistry::start()
        .await
        .unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut core = ServeProcess::start(data.path(), &registry).await;
    let run = core.submit(&repo, "pr-7").await;
    let job_id = run.jobs[0].id.clone();
    core.wait_for_line(&job_id, "started").await;

    let status = core.terminate().await;
    assert!(status.success(), "the core did not exit cleanly: {status}");
    // A rolling deploy: the running build was handed over, not stopped; its instance lives
    // and its agent dials again.
    assert_eq!(
        core.live_instance_dirs().len(),
        1,
        "the build's instance was stopped by a graceful shutdown"
    );

    // The restarted core adopts it and the same attempt finishes: no build lost, and no
    // line lost or doubled.
    core.restart().await;
    let view = core
        .wait_for_status(&run.id, "completed", Duration::from_secs(120))
        .await;
    let job = &view.jobs[0];
    assert_eq!(job.status, "completed");
    assert_eq!(job.attempts.len(), 1, "{:?}", job.attempts);
    assert_eq!(job.attempts[0].outcome.as_deref(), Some("completed"));
    let lines = core.seq_lines(&job_id).await;
    let seqs: Vec<i64> = lines.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as i64).collect::<Vec<_>>(),
        "{lines:?}"
    );
    assert_eq!(
        lines
            .iter()
            .filter(|(_, l)| l.trim_end() == "started")
            .count(),
        1,
        "{lines:?}"
    );
    poll_until(
        Duration::from_secs(20),
        "the instance to be terminated",
        || async {
            let live = core.live_instance_dirs();
            Ok((live.is_empty().then_some(()), format!("{live:?}")))
        },
    )
    .await;
    let survivors = processes_under(data.path());
    assert!(survivors.is_empty(), "processes survived: {survivors:?}");
    assert!(core.terminate().await.success());
}

/// Issue 26 (SECURITY.md row 79): a core SIGKILLed together with its instances' processes
/// (a service manager's restart of a local-provider deployment). The restarted core adopts
/// the attempt, asks the provider, learns the instance is gone and retries at once: the run
/// completes within the build's own time and the restart, not after the 120 s reconnect
/// grace (it took 200 s before). The time is printed; BENCHMARKS.md has the benchmark.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_core_killed_with_its_instances_retries_at_once_after_restart() {
    if !require_build_peers() {
        return;
    }
    let busybox = busybox("amd64").unwrap();
    let repo = TestRepo::with_files(&[
        ("stagely.yaml", b"builds:\n  slow:\n    context: .\n    platform: linux/amd64\n"),
        ("Dockerfile", b"FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"echo started; /bin/busybox sleep 6\"]\n"),
        ("busybox", &busybox),
    ])
    .unwrap();
    let registry = stagely_core::registry::LocalRegistry::start()
        .await
        .unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut core = ServeProcess::start(data.path(), &registry).await;
    let run = core.submit(&repo, "pr-restart").await;
    let job_id = run.jobs[0].id.clone();
    core.wait_for_line(&job_id, "started").await;

    core.kill();
    assert_eq!(core.kill_instances().await, 1, "one instance's session");
    let restarted = std::time::Instant::now();
    core.restart().await;
    let view = core
        .wait_for_status(&run.id, "completed", Duration::from_secs(100))
        .await;
    let recovery = restarted.elapsed();
    eprintln!(
        "restart -> completed: {:.1}s (the build alone: 6s; target: build + 15s)",
        recovery.as_secs_f64()
    );
    // Far below the 120 s grace it used to wait out (a bound this noisy machine keeps; the
    // target itself is the benchmark's).
    assert!(
        recovery < Duration::from_secs(60),
        "waited out the reconnect grace: {recovery:?}"
    );
    let job = &view.jobs[0];
    for attempt in &job.attempts {
        eprintln!(
            "attempt {}: started {} connected {:?} ended {:?}: {:?}",
            attempt.number,
            attempt.started_at,
            attempt.connected_at,
            attempt.ended_at,
            attempt.message
        );
    }
    assert_eq!(job.attempts.len(), 2, "{:?}", job.attempts);
    let first = &job.attempts[0];
    assert_eq!(
        first.outcome.as_deref(),
        Some("infrastructure"),
        "{first:?}"
    );
    let message = first.message.as_deref().unwrap_or("");
    assert!(
        message.starts_with("instance_gone: instance local-") && message.contains("has exited"),
        "{message}"
    );
    assert_eq!(job.attempts[1].outcome.as_deref(), Some("completed"));
    // Started again on a new instance: the adopted one is terminated (its disk removed).
    poll_until(
        Duration::from_secs(20),
        "every instance to be terminated",
        || async {
            let live = core.live_instance_dirs();
            Ok((live.is_empty().then_some(()), format!("{live:?}")))
        },
    )
    .await;
    assert!(core.terminate().await.success());
}
