//! Two `stagely serve` processes on one PostgreSQL database: both take work, every job
//! attempt is dispatched exactly once, and when one core is SIGKILLed the other takes its
//! jobs over once their leases expire and finishes every run; behind one address (a
//! forwarder standing in for a load balancer) the survivor takes the dead core's agents back
//! and their builds finish without a restart.

use std::collections::BTreeMap;
use std::time::Duration;

use sqlx::Connection;
use stagely_tests::*;

/// Prints the last lines of each core's log if the test panics while it is alive.
struct DumpLogsOnPanic(std::path::PathBuf);

impl Drop for DumpLogsOnPanic {
    fn drop(&mut self) {
        for name in ["core-a", "core-b"] {
            let text =
                std::fs::read_to_string(self.0.join(format!("{name}.log"))).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(400).collect();
            eprintln!("---- {name}.log (last 400 lines, newest first) ----");
            for line in tail {
                eprintln!("{line}");
            }
        }
        // Each instance's agent: what it logged at WARN or above, and why it stopped a job.
        let agents = std::fs::read_dir(self.0.join("instances"))
            .into_iter()
            .flatten()
            .flatten();
        for instance in agents {
            let text =
                std::fs::read_to_string(instance.path().join("agent.log")).unwrap_or_default();
            eprintln!(
                "---- {} agent.log ----",
                instance.file_name().to_string_lossy()
            );
            let notable = text.lines().filter(|line| {
                [
                    "WARN",
                    "ERROR",
                    "cancel",
                    "shutting down",
                    "starting",
                    "finished",
                ]
                .iter()
                .any(|word| line.contains(word))
            });
            for line in notable.take(40) {
                eprintln!("{line}");
            }
        }
    }
}

/// What two replicas share: a PostgreSQL database, a registry and a data directory. `None`
/// when build peers are missing (outside CI) or in the suite's PostgreSQL pass (these tests
/// always run on PostgreSQL; that pass would only repeat them).
async fn replica_peers() -> Option<(
    TestDatabase,
    stagely_core::registry::LocalRegistry,
    tempfile::TempDir,
)> {
    if !require_build_peers() || testing_postgres() {
        return None;
    }
    let database = TestDatabase::create().await;
    let registry = stagely_core::registry::LocalRegistry::start()
        .await
        .unwrap();
    Some((database, registry, tempfile::tempdir().unwrap()))
}

/// (job, number, owner, result, message) of `job_attempts`.
type AttemptRow = (String, i32, String, Option<String>, Option<String>);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_cores_share_the_work_dispatch_each_attempt_once_and_survive_a_kill() {
    let Some((database, registry, data)) = replica_peers().await else {
        return;
    };
    // Short leases so the survivor takes over quickly (not shorter: under twenty concurrent
    // builds on a small machine a live core's renewal can be seconds late); fast syncs so
    // both see every run.
    // Each core's agents dial that core's own address (no load balancer here), so core-a's
    // agents cannot reach core-b: the attempts core-b adopts are lost after a short grace.
    let extra = "[scheduler]\nlease_secs = 10\nsync_interval_ms = 200\nretry_backoff_secs = 1\nreap_interval_secs = 2\nagent_reconnect_grace_secs = 5\n";
    // On failure, the cores' own logs say why.
    let guard = DumpLogsOnPanic(data.path().to_path_buf());
    let mut a =
        ServeProcess::start_replica(data.path(), "core-a", &registry, &database.url, extra).await;
    let mut b =
        ServeProcess::start_replica(data.path(), "core-b", &registry, &database.url, extra).await;

    let busybox = busybox("amd64").unwrap();
    let dockerfile = "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"echo replicas; /bin/busybox sleep 3\"]\n";
    let yaml = "builds:\n  one:\n    context: .\n    platform: linux/amd64\n  two:\n    context: .\n    platform: linux/amd64\n";
    // Ten runs of two jobs (ten repositories, so no two builds share a layer cache),
    // submitted alternately to each core.
    let repos: Vec<TestRepo> = (0..10)
        .map(|_| {
            TestRepo::with_files(&[
                ("stagely.yaml", yaml.as_bytes()),
                ("Dockerfile", dockerfile.as_bytes()),
                ("busybox", &busybox),
            ])
            .unwrap()
        })
        .collect();
    let mut runs = Vec::new();
    for (index, repo) in repos.iter().enumerate() {
        let core = if index % 2 == 0 { &a } else { &b };
        runs.push(core.submit(repo, &format!("env-{index}")).await.id);
    }

    let mut connection = sqlx::PgConnection::connect(&database.url).await.unwrap();
    // Wait until both cores hold live attempts, then kill one.
    poll_until(Duration::from_secs(120), "both cores to be building", || {
        let url = database.url.clone();
        async move {
            let mut connection = sqlx::PgConnection::connect(&url).await?;
            let owners: Vec<String> = sqlx::query_scalar(
                "SELECT DISTINCT split_part(lease_owner, '/', 1) FROM build_jobs WHERE status = 'running'",
            )
            .fetch_all(&mut connection)
            .await?;
            let both = owners.len() == 2;
            Ok((both.then_some(()), format!("running under {owners:?}")))
        }
    })
    .await;
    a.kill();

    // The survivor finishes every run.
    for run_id in &runs {
        let view = b
            .wait_for_status(run_id, "completed", Duration::from_secs(300))
            .await;
        assert!(
            view.jobs.iter().all(|j| j.status == "completed"),
            "{view:?}"
        );
    }

    // Exactly one instance per job attempt, and every created instance recorded.
    let per_attempt: Vec<(String, i32, i64)> = sqlx::query_as(
        "SELECT build_job_id, attempt, COUNT(*) FROM builder_instances GROUP BY build_job_id, attempt",
    )
    .fetch_all(&mut connection)
    .await
    .unwrap();
    assert_eq!(
        per_attempt.iter().filter(|(_, _, n)| *n != 1).count(),
        0,
        "{per_attempt:?}"
    );
    let attempts: Vec<AttemptRow> = sqlx::query_as(
        "SELECT build_job_id, number, owner, result, message FROM job_attempts ORDER BY build_job_id, number",
    )
    .fetch_all(&mut connection)
    .await
    .unwrap();
    let mut by_job: BTreeMap<String, Vec<_>> = BTreeMap::new();
    for attempt in &attempts {
        by_job
            .entry(attempt.0.clone())
            .or_default()
            .push(attempt.clone());
    }
    assert_eq!(by_job.len(), 20);
    // An attempt core-b adopted from core-a names core-a in its end.
    let owners: std::collections::BTreeSet<String> = attempts
        .iter()
        .map(|a| {
            if a.4
                .as_deref()
                .unwrap_or("")
                .contains("taken over from core core-a/")
            {
                "core-a".to_string()
            } else {
                a.2.split('/').next().unwrap_or("").to_string()
            }
        })
        .collect();
    assert_eq!(owners.len(), 2, "both cores took work: {owners:?}");
    let mut taken_over = 0;
    for (job, attempts) in &by_job {
        // Exactly one completed attempt per job; any earlier one was core-a's, ended by the
        // lease that expired when it was killed (a booting one), or adopted by core-b and
        // lost when its agent, which dials core-a, did not come back (a running one).
        let completed = attempts
            .iter()
            .filter(|a| a.3.as_deref() == Some("completed"))
            .count();
        assert_eq!(completed, 1, "{job}: {attempts:?}");
        assert!(attempts.len() <= 2, "{job}: {attempts:?}");
        if attempts.len() == 2 {
            taken_over += 1;
            assert_eq!(attempts[0].3.as_deref(), Some("infrastructure"));
            let message = attempts[0].4.as_deref().unwrap_or("");
            let expired = attempts[0].2.starts_with("core-a/") && message.contains("lease_expired");
            // Lost after the grace, or at once when the provider says the instance is gone
            // (its agent, unable to reach core-a, stopped first).
            let adopted_and_lost = attempts[0].2.starts_with("core-b/")
                && ((message.contains("taken over from core core-a/")
                    && message.contains("did not reconnect within 5s"))
                    || message.starts_with("instance_gone: "));
            assert!(expired || adopted_and_lost, "{attempts:?}");
            assert!(attempts[1].2.starts_with("core-b/"), "{attempts:?}");
        }
    }
    assert!(taken_over > 0, "the kill interrupted nothing: {by_job:?}");
    // Every created instance is known: recorded in the store, or (core-a killed between
    // the provider's create and the record) found by a reaper and terminated, which removes
    // its instance.json.
    let recorded: std::collections::BTreeSet<String> =
        sqlx::query_scalar("SELECT id FROM builder_instances")
            .fetch_all(&mut connection)
            .await
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(recorded.len(), per_attempt.len());
    let instances_dir = data.path().join("instances");
    let unrecorded: Vec<String> = std::fs::read_dir(&instances_dir)
        .unwrap()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| !recorded.contains(name))
        .collect();
    poll_until(
        Duration::from_secs(60),
        "every instance the store does not know to be reaped",
        || {
            let live: Vec<&String> = unrecorded
                .iter()
                .filter(|id| instances_dir.join(id).join("instance.json").exists())
                .collect();
            let detail = format!("unrecorded and still running: {live:?}");
            let done = live.is_empty().then_some(());
            async move { Ok((done, detail)) }
        },
    )
    .await;
    // Nothing left running: every instance was terminated, core-a's too.
    poll_until(
        Duration::from_secs(30),
        "every instance to be terminated",
        || {
            let url = database.url.clone();
            async move {
                let mut connection = sqlx::PgConnection::connect(&url).await?;
                let live: Vec<String> = sqlx::query_scalar(
                    "SELECT id FROM builder_instances WHERE terminated_at IS NULL",
                )
                .fetch_all(&mut connection)
                .await?;
                Ok((live.is_empty().then_some(()), format!("{live:?}")))
            }
        },
    )
    .await;
    let _ = connection.close().await;
    assert!(b.terminate().await.success());
    std::mem::forget(guard);
}

/// Two replicas behind one address (a forwarder standing in for the load balancer): the
/// agent of a build on core-a, SIGKILLed mid-stream, dials the same address again, is
/// forwarded to core-b, which adopts the attempt once core-a's lease has expired, and the
/// build finishes there: one attempt, every line stored once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_surviving_replica_behind_the_same_address_takes_the_agent_back() {
    use stagely_tests::counting::{assert_exact, counting_repo, numbered};
    let Some((database, registry, data)) = replica_peers().await else {
        return;
    };
    let balancer = stagely_tests::proxy::CuttingProxy::start().await.unwrap();
    // Both cores tell their agents the balancer's address. The agent's grace outlasts the
    // lease (core-b adopts only once core-a's lease has expired, and turns the agent away
    // until then).
    let extra = format!(
        "public_url = \"{}\"\n[scheduler]\nlease_secs = 10\nsync_interval_ms = 200\nretry_backoff_secs = 1\nreap_interval_secs = 2\nagent_reconnect_grace_secs = 90\n",
        balancer.url()
    );
    let guard = DumpLogsOnPanic(data.path().to_path_buf());
    let mut a =
        ServeProcess::start_replica(data.path(), "core-a", &registry, &database.url, &extra).await;
    balancer.set_upstream(address_of(&a.url));
    let mut b =
        ServeProcess::start_replica(data.path(), "core-b", &registry, &database.url, &extra).await;

    let repo = counting_repo();
    let run = a.submit(&repo, "pr-balanced").await;
    let job_id = run.jobs[0].id.clone();
    poll_until(Duration::from_secs(120), "a few thousand lines", || async {
        let count = numbered(&a.seq_lines(&job_id).await).len();
        Ok(((count >= 3000).then_some(()), format!("{count} lines")))
    })
    .await;
    // core-a dies mid-stream; the balancer's health check takes it out.
    a.kill();
    balancer.set_upstream(address_of(&b.url));
    balancer.cut_all();

    let view = b
        .wait_for_status(&run.id, "completed", Duration::from_secs(180))
        .await;
    let job = &view.jobs[0];
    assert_eq!(
        job.attempts.len(),
        1,
        "the build restarted instead of being taken back: {:?}",
        job.attempts
    );
    assert_eq!(job.attempts[0].outcome.as_deref(), Some("completed"));
    assert_exact(&b.seq_lines(&job_id).await);
    let mut connection = sqlx::PgConnection::connect(&database.url).await.unwrap();
    let owner: String =
        sqlx::query_scalar("SELECT owner FROM job_attempts WHERE build_job_id = $1")
            .bind(&job_id)
            .fetch_one(&mut connection)
            .await
            .unwrap();
    assert!(owner.starts_with("core-b/"), "finished by {owner}");
    let _ = connection.close().await;
    // The same agent came back through the balancer and resumed with core-b.
    assert!(balancer.accepted() >= 2, "the agent never dialled again");
    let b_log = std::fs::read_to_string(data.path().join("core-b.log")).unwrap_or_default();
    assert!(
        b_log.contains("agent resumed the job"),
        "core-b never heard the agent resume"
    );
    poll_until(Duration::from_secs(30), "the instance to go", || async {
        let live = b.live_instance_dirs();
        Ok((live.is_empty().then_some(()), format!("{live:?}")))
    })
    .await;
    assert!(b.terminate().await.success());
    std::mem::forget(guard);
}

/// The socket address of `http://HOST:PORT`.
fn address_of(url: &str) -> std::net::SocketAddr {
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .unwrap()
}
