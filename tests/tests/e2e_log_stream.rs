//! `GET /api/v1/jobs/{id}/logs/stream`: Server-Sent Events with the backlog, then live lines,
//! then an `end` event with the job's final status. Several viewers of one build each see the
//! stored log exactly; one that drops its connection and comes back with `Last-Event-ID`
//! misses nothing and sees nothing twice; `stagely logs --follow` prints the same lines.

use std::time::Duration;

use stagely_tests::*;

#[derive(Debug, Default)]
struct Seen {
    /// (seq, line) in arrival order.
    lines: Vec<(i64, String)>,
    end: Option<serde_json::Value>,
}

/// One Server-Sent Event: its type (`""` for a comment), `id` and data.
struct SseEvent {
    event: String,
    id: Option<i64>,
    data: String,
}

/// Sends `request` for an event stream (checking its content type) and hands each event to
/// `on_event` until it returns false or the stream ends; fails if the stream goes silent.
async fn read_stream(request: reqwest::RequestBuilder, mut on_event: impl FnMut(SseEvent) -> bool) {
    let mut response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut buffer = String::new();
    loop {
        let chunk = tokio::time::timeout(Duration::from_secs(60), response.chunk())
            .await
            .expect("the stream went silent")
            .unwrap();
        let Some(chunk) = chunk else {
            return;
        };
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(at) = buffer.find("\n\n") {
            let block: String = buffer.drain(..at + 2).collect();
            let mut event = SseEvent {
                event: String::new(),
                id: None,
                data: String::new(),
            };
            for field in block.lines() {
                if let Some(value) = field.strip_prefix("event:") {
                    event.event = value.trim().to_string();
                } else if let Some(value) = field.strip_prefix("id:") {
                    event.id = value.trim().parse::<i64>().ok();
                } else if let Some(value) = field.strip_prefix("data:") {
                    event.data.push_str(value.trim_start());
                }
            }
            if !on_event(event) {
                return;
            }
        }
    }
}

/// Reads events from a stream until `end` or until `stop_after` line events arrived.
async fn watch(
    core: &TestCore,
    job_id: &str,
    last_event_id: Option<i64>,
    stop_after: Option<usize>,
    seen: &mut Seen,
) {
    let mut request = core
        .client
        .get(format!("{}/api/v1/jobs/{job_id}/logs/stream", core.url));
    if let Some(id) = last_event_id {
        request = request.header("Last-Event-ID", id.to_string());
    }
    let mut lines_now = 0;
    read_stream(request, |event| match event.event.as_str() {
        "line" => {
            let line: serde_json::Value = serde_json::from_str(&event.data).unwrap();
            assert_eq!(
                Some(line["seq"].as_i64().unwrap()),
                event.id,
                "id is the seq"
            );
            seen.lines.push((
                line["seq"].as_i64().unwrap(),
                line["line"].as_str().unwrap().to_string(),
            ));
            lines_now += 1;
            // Past `stop_after` lines the connection is dropped mid-stream.
            stop_after.is_none_or(|n| lines_now < n)
        }
        "end" => {
            seen.end = Some(serde_json::from_str(&event.data).unwrap());
            false
        }
        _ => true, // keep-alive comments
    })
    .await;
}

/// A repository with one amd64 build `name` whose RUN step prints `tick-0` … `tick-{ticks-1}`,
/// one every 50 ms.
fn ticking_repo(name: &str, ticks: u32) -> TestRepo {
    let busybox = busybox("amd64").unwrap();
    let config = format!("builds:\n  {name}:\n    context: .\n    platform: linux/amd64\n");
    let dockerfile = format!(
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"i=0; while [ $i -lt {ticks} ]; do echo tick-$i; /bin/busybox usleep 50000; i=$((i+1)); done\"]\n"
    );
    TestRepo::with_files(&[
        ("stagely.yaml", config.as_bytes()),
        ("Dockerfile", dockerfile.as_bytes()),
        ("busybox", &busybox),
    ])
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn viewers_see_the_backlog_live_lines_and_the_end_and_resume_without_gaps_or_repeats() {
    if !require_build_peers() {
        return;
    }
    let repo = ticking_repo("slow", 40);
    let mut core = TestCore::start().await.unwrap();
    let run = core.submit(&repo, None, "pr-sse").await.unwrap();
    let job_id = run.jobs[0].id.clone();

    // `stagely logs --follow` prints the same stream and exits at the end.
    let follower = tokio::process::Command::new(agent_binary().with_file_name("stagely"))
        .env("STAGELY_API_TOKEN", &core.api_token)
        .args(["logs", "--follow", "--core", &core.url, &job_id])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Two viewers from the start; a third that drops after 5 lines and resumes.
    let (mut a, mut b, mut c) = (Seen::default(), Seen::default(), Seen::default());
    tokio::join!(
        watch(&core, &job_id, None, None, &mut a),
        watch(&core, &job_id, None, None, &mut b),
        async {
            watch(&core, &job_id, None, Some(5), &mut c).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let last = c.lines.last().map(|(seq, _)| *seq);
            watch(&core, &job_id, last, None, &mut c).await;
        },
    );
    let stored: Vec<(i64, String)> = all_log_lines(&core.client, &core.url, &job_id)
        .await
        .unwrap()
        .into_iter()
        .map(|line| (line.seq, line.line))
        .collect();
    assert!(
        stored.iter().any(|(_, line)| line == "tick-39\n"),
        "the build printed everything"
    );
    for (name, seen) in [("a", &a), ("b", &b), ("c (resumed)", &c)] {
        assert_eq!(
            seen.lines, stored,
            "viewer {name} saw exactly the stored log"
        );
        let end = seen
            .end
            .as_ref()
            .unwrap_or_else(|| panic!("{name}: no end event"));
        assert_eq!(end["status"], "completed", "{name}: {end}");
    }
    let followed = tokio::time::timeout(Duration::from_secs(30), follower.wait_with_output())
        .await
        .expect("stagely logs --follow ended with the job")
        .unwrap();
    assert!(
        followed.status.success(),
        "{}",
        String::from_utf8_lossy(&followed.stderr)
    );
    let printed: String = stored.iter().map(|(_, line)| line.as_str()).collect();
    assert_eq!(String::from_utf8_lossy(&followed.stdout), printed);
    // A viewer after the end gets the whole backlog and the end at once.
    let mut late = Seen::default();
    watch(&core, &job_id, None, None, &mut late).await;
    assert_eq!(late.lines, stored);
    assert_eq!(late.end.unwrap()["status"], "completed");
    // Nothing is kept for a finished job's viewers.
    let core_handle = core.core.as_ref().unwrap();
    poll_until(Duration::from_secs(5), "no channel left", || async {
        let left = core_handle.runner.log_hub().channels();
        Ok(((left == 0).then_some(()), format!("{left} channels")))
    })
    .await;
    // A bad Last-Event-ID is a precise 422.
    let response = core
        .client
        .get(format!("{}/api/v1/jobs/{job_id}/logs/stream", core.url))
        .header("Last-Event-ID", "yesterday")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    assert!(response.text().await.unwrap().contains("Last-Event-ID"));
    core.stop().await;
}

/// What one viewer of `GET /api/v1/workflows/{id}/events` saw: each run view's job status, in
/// order, and the end event.
#[derive(Debug, Default)]
struct RunSeen {
    statuses: Vec<String>,
    last_view: Option<serde_json::Value>,
    end: Option<serde_json::Value>,
}

/// Reads a run's events until `end` (or until `stop_after` run events arrived).
async fn watch_run_events(
    core: &TestCore,
    run_id: &str,
    stop_after: Option<usize>,
    seen: &mut RunSeen,
) {
    let request = core
        .client
        .get(format!("{}/api/v1/workflows/{run_id}/events", core.url));
    let mut views_now = 0;
    read_stream(request, |event| match event.event.as_str() {
        "run" => {
            let view: serde_json::Value = serde_json::from_str(&event.data).unwrap();
            assert!(seen.end.is_none(), "a run event after the end");
            seen.statuses
                .push(view["jobs"][0]["status"].as_str().unwrap().to_string());
            seen.last_view = Some(view);
            views_now += 1;
            // Past `stop_after` views the connection is dropped.
            stop_after.is_none_or(|n| views_now < n)
        }
        "end" => {
            seen.end = Some(serde_json::from_str(&event.data).unwrap());
            false
        }
        "" => true, // keep-alive comments
        other => panic!("unexpected event {other}: {}", event.data),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_events_show_each_state_change_once_and_end_when_the_run_is_final() {
    if !require_build_peers() {
        return;
    }
    let repo = ticking_repo("steady", 10);
    let mut core = TestCore::start().await.unwrap();
    // What the runner says it changed, heard from before the submit.
    let mut changes = core.core.as_ref().unwrap().runner.changes();
    let run = core.submit(&repo, None, "pr-run-events").await.unwrap();
    let run_id = run.id.clone();
    let events = core.core.as_ref().unwrap().run_events.clone();

    // Two viewers to the end, and one that drops after its first view and comes back.
    let (mut a, mut b, mut c) = (RunSeen::default(), RunSeen::default(), RunSeen::default());
    let most_publishers = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sampler = {
        let (events, most) = (events.clone(), most_publishers.clone());
        tokio::spawn(async move {
            loop {
                most.fetch_max(events.publishers(), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    tokio::join!(
        watch_run_events(&core, &run_id, None, &mut a),
        watch_run_events(&core, &run_id, None, &mut b),
        async {
            watch_run_events(&core, &run_id, Some(1), &mut c).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            watch_run_events(&core, &run_id, None, &mut c).await;
        },
    );
    sampler.abort();
    let stored = core
        .client
        .get(format!("{}/api/v1/workflows/{run_id}", core.url))
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap();
    assert_eq!(stored["status"], "completed", "{stored}");
    let order = ["queued", "provisioning", "running", "completed"];
    for (name, seen) in [("a", &a), ("b", &b), ("c (came back)", &c)] {
        // Statuses only move forward; an unchanged view is never sent twice in a row.
        let ranks: Vec<usize> = seen
            .statuses
            .iter()
            .map(|s| {
                order
                    .iter()
                    .position(|o| o == s)
                    .unwrap_or_else(|| panic!("{name}: {s}"))
            })
            .collect();
        assert!(
            ranks.windows(2).all(|w| w[0] <= w[1]),
            "{name}: {:?}",
            seen.statuses
        );
        assert_eq!(
            seen.statuses.last().map(String::as_str),
            Some("completed"),
            "{name}"
        );
        // The last view is the stored run, whole.
        let last = seen.last_view.as_ref().unwrap();
        assert_eq!(last["status"], "completed", "{name}");
        assert_eq!(
            last["jobs"][0]["digest"], stored["jobs"][0]["digest"],
            "{name}"
        );
        let end = seen
            .end
            .as_ref()
            .unwrap_or_else(|| panic!("{name}: no end event"));
        assert_eq!(end["run_id"], run_id.as_str(), "{name}: {end}");
        assert_eq!(end["status"], "completed", "{name}: {end}");
    }
    assert!(
        a.statuses.len() >= 2,
        "a viewer from the start saw the run change: {:?}",
        a.statuses
    );
    // Three viewers of one run: one publisher.
    assert_eq!(
        most_publishers.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // Each write of the run's life named this run (submit, start, claim, instance, running,
    // attempt end, run end), so its publisher was woken by its own run's changes.
    let mut named = 0;
    while let Ok(changed) = changes.try_recv() {
        if changed == stagely_server::runner::Changed::Run(run_id.as_str().into()) {
            named += 1;
        }
    }
    assert!(named >= 5, "{named} changes named the run");
    // A viewer after the end gets the final view and the end at once; nothing is kept after.
    let mut late = RunSeen::default();
    watch_run_events(&core, &run_id, None, &mut late).await;
    assert_eq!(late.statuses, ["completed"]);
    assert_eq!(late.end.unwrap()["status"], "completed");
    poll_until(Duration::from_secs(5), "no publisher left", || async {
        let left = events.publishers();
        Ok(((left == 0).then_some(()), format!("{left} publishers")))
    })
    .await;
    // An unknown run is a precise 404.
    let response = core
        .client
        .get(format!("{}/api/v1/workflows/no-such-run/events", core.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    assert!(response.text().await.unwrap().contains("no-such-run"));
    core.stop().await;
}
