//! Nothing lost across disconnects: a build that prints 20,000 numbered lines while its
//! agent's connection is reset again and again, or while its core is SIGKILLed and started
//! again, ends with a stored log that holds every line exactly once, in order, under
//! contiguous sequence numbers — and the build never restarted (one attempt). A notice the
//! agent wrote into a connection that then broke is sent again on the resumed one.
//!
//! The netns link cut (a dead network rather than a reset) is in `e2e_ec2.rs`, where agents
//! run in their own network namespaces.

use std::time::Duration;

use stagely_tests::counting::{assert_exact, counting_repo, numbered};
use stagely_tests::proxy::CuttingProxy;
use stagely_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_reset_again_and_again_mid_stream_lose_and_double_no_line() {
    if !require_build_peers() {
        return;
    }
    let proxy = CuttingProxy::start().await.unwrap();
    let public_url = proxy.url();
    // The agent dials the proxy; the proxy forwards to the core.
    let mut core = TestCore::start_configured(|file| file.public_url = Some(public_url))
        .await
        .unwrap();
    let core_addr: std::net::SocketAddr = core.url.trim_start_matches("http://").parse().unwrap();
    proxy.set_upstream(core_addr);
    let repo = counting_repo();
    let run = core.submit(&repo, None, "pr-reset").await.unwrap();
    let job_id = run.jobs[0].id.clone();
    poll_until(Duration::from_secs(120), "the first lines", || async {
        let lines = core.logs(&job_id).await?;
        let started = lines.iter().any(|(_, l)| l.trim_end() == "line 1");
        Ok((started.then_some(()), format!("{} lines", lines.len())))
    })
    .await;
    // Reset every connection every 400 ms until the run ends.
    let mut view = core.run(&run.id).await.unwrap();
    while view.status == "building" {
        tokio::time::sleep(Duration::from_millis(400)).await;
        proxy.cut_all();
        view = core.run(&run.id).await.unwrap();
    }
    assert_eq!(view.status, "completed", "{view:?}");
    let job = &view.jobs[0];
    assert_eq!(
        job.attempts.len(),
        1,
        "the build restarted: {:?}",
        job.attempts
    );
    eprintln!(
        "{} connections cut, {} accepted",
        proxy.cut(),
        proxy.accepted()
    );
    assert!(
        proxy.cut() >= 5,
        "only {} connections were cut: the test proves little",
        proxy.cut()
    );
    // Every cut was followed by a new connection, except perhaps the last: the loop may cut
    // the final connection after the agent's STATUS was acknowledged and before the run
    // shows completed (nothing left to send, the agent does not dial again).
    assert!(
        proxy.accepted() >= proxy.cut(),
        "the agent did not dial again after a cut: {} connections cut, {} accepted",
        proxy.cut(),
        proxy.accepted()
    );
    let stored = all_log_lines(&core.client, &core.url, &job_id)
        .await
        .unwrap()
        .into_iter()
        .map(|l| (l.seq, l.line))
        .collect::<Vec<_>>();
    assert_exact(&stored);
    assert!(core.live_instances().await.is_empty());
    core.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_core_sigkilled_mid_stream_and_restarted_stores_every_line_once() {
    if !require_build_peers() {
        return;
    }
    let registry = stagely_core::registry::LocalRegistry::start()
        .await
        .unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut core = ServeProcess::start(data.path(), &registry).await;
    let repo = counting_repo();
    let run = core.submit(&repo, "pr-crash").await;
    let job_id = run.jobs[0].id.clone();
    poll_until(Duration::from_secs(120), "a few thousand lines", || async {
        let count = numbered(&core.seq_lines(&job_id).await).len();
        Ok(((count >= 3000).then_some(()), format!("{count} lines")))
    })
    .await;
    // Crash mid-stream: lines in flight, in the core's unflushed batch and in the agent's
    // spool are all somewhere between the two.
    core.kill();
    tokio::time::sleep(Duration::from_millis(700)).await;
    core.restart().await;
    let view = core
        .wait_for_status(&run.id, "completed", Duration::from_secs(120))
        .await;
    let job = &view.jobs[0];
    assert_eq!(
        job.attempts.len(),
        1,
        "the build restarted: {:?}",
        job.attempts
    );
    assert_eq!(job.attempts[0].outcome.as_deref(), Some("completed"));
    assert_exact(&core.seq_lines(&job_id).await);
    poll_until(Duration::from_secs(20), "the instance to go", || async {
        let live = core.live_instance_dirs();
        Ok((live.is_empty().then_some(()), format!("{live:?}")))
    })
    .await;
    assert!(core.terminate().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shutdown_notice_lost_with_its_connection_is_sent_again_after_the_resume() {
    if !require_build_peers() {
        return;
    }
    let proxy = CuttingProxy::start().await.unwrap();
    let public_url = proxy.url();
    let mut core = TestCore::start_configured(|file| {
        file.public_url = Some(public_url);
        file.scheduler.retry_backoff_secs = Some(1);
    })
    .await
    .unwrap();
    let core_addr: std::net::SocketAddr = core.url.trim_start_matches("http://").parse().unwrap();
    proxy.set_upstream(core_addr);
    let busybox = busybox("amd64").unwrap();
    let repo = TestRepo::with_files(&[
        (
            "stagely.yaml",
            b"builds:\n  app:\n    context: .\n    platform: linux/amd64\n".as_slice(),
        ),
        (
            "Dockerfile",
            b"FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"echo noticed; /bin/busybox sleep 6\"]\n".as_slice(),
        ),
        ("busybox", &busybox),
    ])
    .unwrap();
    let run = core.submit(&repo, None, "pr-notice").await.unwrap();
    let job_id = run.jobs[0].id.clone();
    poll_until(Duration::from_secs(120), "the build to start", || async {
        let lines = core.logs(&job_id).await?;
        let started = lines.iter().any(|(_, l)| l.trim_end() == "noticed");
        Ok((started.then_some(()), format!("{} lines", lines.len())))
    })
    .await;
    // Nothing the agent writes from now on reaches the core: its SHUTDOWN notice (SIGTERM,
    // as a machine's shutdown sends it), the lines and the STATUS after it wait in the
    // proxy's socket, and the cut loses them.
    proxy.hold(true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    core.signal_the_agent(nix::sys::signal::Signal::SIGTERM);
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.cut_all();
    proxy.hold(false);
    // The resumed connection carries the notice again: the attempt ends as the machine's
    // shutdown (not as a build cancelled by a signal) and the job runs again elsewhere.
    let mut view = core.run(&run.id).await.unwrap();
    poll_until(Duration::from_secs(180), "the run to end", || async {
        let view = core.run(&run.id).await?;
        let ended = !matches!(view.status.as_str(), "pending" | "building");
        Ok((ended.then_some(()), view.status.clone()))
    })
    .await;
    view = core.run(&run.id).await.unwrap_or(view);
    assert_eq!(view.status, "completed", "{view:?}");
    let job = &view.jobs[0];
    assert_eq!(job.attempts.len(), 2, "{:?}", job.attempts);
    assert_eq!(job.attempts[0].outcome.as_deref(), Some("infrastructure"));
    assert!(
        job.attempts[0]
            .message
            .as_deref()
            .unwrap_or("")
            .contains("instance_shutdown"),
        "{:?}",
        job.attempts[0]
    );
    assert!(proxy.accepted() >= 3, "the agent never dialled again");
    assert!(core.live_instances().await.is_empty());
    core.stop().await;
}
