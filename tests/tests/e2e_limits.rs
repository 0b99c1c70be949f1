//! Bounded work: what one API caller can make the core do is limited, and the core stays
//! responsive while callers push at those limits.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use stagely_tests::*;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn body(stagely_yaml: Option<String>, repo_url: &str) -> serde_json::Value {
    serde_json::json!({
        "repo_url": repo_url,
        "commit_hash": COMMIT,
        "branch": "main",
        "environment_id": "pr-1",
        "stagely_yaml": stagely_yaml,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_bodies_alias_bombs_and_bad_build_args_are_refused_precisely() {
    let mut core = TestCore::start_with_provider(std::sync::Arc::new(RecordingProvider::default()))
        .await
        .unwrap();
    // 2 MB body: 413.
    let (status, answer) = core
        .submit_raw(body(Some("x".repeat(2 * 1024 * 1024)), "/srv/r"))
        .await
        .unwrap();
    assert_eq!(status, 413, "{answer}");
    // The same client goes on: the refused connection is not reused.

    // The alias bomb: a 100 KB anchored string and 100 aliases of it.
    let mut bomb = format!(
        "builds:\n  a:\n    context: .\n    platform: linux/amd64\n    build_args:\n      A0: &big {}\n",
        "x".repeat(100 * 1024)
    );
    for i in 1..=100 {
        bomb.push_str(&format!("      A{i}: *big\n"));
    }
    assert!(bomb.len() < 150 * 1024);
    let (status, answer) = core.submit_raw(body(Some(bomb), "/srv/r")).await.unwrap();
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["error"]["field"], "stagely_yaml");

    let with_arg = |value: &str| {
        format!(
            "builds:\n  a:\n    context: .\n    platform: linux/amd64\n    build_args:\n      X: {}\n",
            serde_json::to_string(value).unwrap()
        )
    };
    for (value, expected) in [
        (
            "a\0b".to_string(),
            "builds.a.build_args.X: the value contains a NUL byte",
        ),
        (
            "v".repeat(150 * 1024),
            "builds.a.build_args.X: the value is 153600 bytes",
        ),
    ] {
        let (status, answer) = core
            .submit_raw(body(Some(with_arg(&value)), "/srv/r"))
            .await
            .unwrap();
        assert_eq!(status, 422, "{answer}");
        assert_eq!(answer["error"]["field"], "stagely_yaml");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(expected), "{message}");
    }
    core.stop().await;
}

/// A git server that accepts connections and never answers (a slow remote).
fn blackhole() -> (std::net::TcpListener, u16) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    (listener, port)
}

fn git_processes_for(port: u16) -> usize {
    let needle = format!("127.0.0.1:{port}");
    cmdlines()
        .iter()
        .filter(|(_, c)| c.starts_with("git ") && c.contains(&needle))
        .count()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_git_reading_submits_are_capped_and_healthz_stays_fast() {
    if !require("git", "--version") {
        return;
    }
    let (listener, port) = blackhole();
    // Hold every connection open without a byte, like a remote that hangs.
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let holder = held.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            holder.lock().unwrap().push(stream);
        }
    });
    let mut core = TestCore::start_configured(|file| {
        file.allow_local_repos = Some(false);
        file.api.git_read_timeout_secs = Some(4);
    })
    .await
    .unwrap();
    let repo_url = format!("git://127.0.0.1:{port}/slow.git");
    let mut submits = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let client = core.client.clone();
        let url = format!("{}/api/v1/workflows", core.url);
        let payload = body(None, &repo_url);
        submits.spawn(async move {
            let response = client.post(url).json(&payload).send().await.unwrap();
            let retry_after = response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            (response.status().as_u16(), retry_after)
        });
    }
    // While they are in flight: /healthz, one request at a time, and the git count.
    let health = reqwest::Client::new();
    let mut latencies = Vec::new();
    let mut most_git = 0;
    for _ in 0..200 {
        let started = Instant::now();
        let response = health
            .get(format!("{}/healthz", core.url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        latencies.push(started.elapsed());
        most_git = most_git.max(git_processes_for(port));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut statuses = std::collections::BTreeMap::new();
    while let Some(joined) = submits.join_next().await {
        let (status, retry_after) = joined.unwrap();
        if status == 503 {
            assert_eq!(retry_after.as_deref(), Some("5"));
        }
        *statuses.entry(status).or_insert(0) += 1;
    }
    latencies.sort();
    let p99 = percentile(&latencies, 0.99);
    eprintln!(
        "submits by status: {statuses:?}; healthz p50 {:?} p99 {p99:?} max {:?}; most git processes at once: {most_git}",
        percentile(&latencies, 0.5),
        latencies.last().unwrap()
    );
    assert!(
        statuses.get(&503).copied().unwrap_or(0) >= 190,
        "{statuses:?}"
    );
    // The few admitted reads end at the git read timeout with a 422 naming it.
    assert_eq!(
        statuses.get(&503).copied().unwrap_or(0) + statuses.get(&422).copied().unwrap_or(0),
        200,
        "{statuses:?}"
    );
    assert!(most_git <= 4, "{most_git} git processes at once");
    assert!(p99 < Duration::from_millis(50), "healthz p99 {p99:?}");
    core.stop().await;
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slowloris_and_idle_connections_are_cut_and_healthz_answers() {
    let mut core = TestCore::start_configured(|file| {
        file.api.header_read_timeout_secs = Some(2);
    })
    .await
    .unwrap();
    let addr = core.url.trim_start_matches("http://").to_string();
    let mut sockets = Vec::new();
    for i in 0..200 {
        let mut socket = std::net::TcpStream::connect(&addr).unwrap();
        if i % 2 == 0 {
            // Headers that never end.
            socket
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: 1\r\n")
                .unwrap();
        }
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        sockets.push(socket);
    }
    // A kept-alive connection that goes quiet after one request.
    let mut idle = std::net::TcpStream::connect(&addr).unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut first = [0u8; 12];
    idle.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    idle.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    sockets.push(idle);

    // Meanwhile the core answers.
    let response = reqwest::Client::new()
        .get(format!("{}/healthz", core.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let closed = poll_until(Duration::from_secs(20), "slow sockets to be closed", || {
        let open = sockets
            .iter_mut()
            .filter(|socket: &&mut std::net::TcpStream| {
                let mut buffer = [0u8; 1024];
                loop {
                    match (&**socket).read(&mut buffer) {
                        Ok(0) => return false,
                        Ok(_) => continue,
                        Err(error)
                            if matches!(
                                error.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) =>
                        {
                            return true;
                        }
                        Err(_) => return false,
                    }
                }
            })
            .count();
        async move { Ok(((open == 0).then_some(()), format!("{open} still open"))) }
    })
    .await;
    let () = closed;
    core.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_jobs_log_is_capped_with_a_marker_and_the_build_goes_on() {
    if !require_build_peers() {
        return;
    }
    let busybox = busybox("amd64").unwrap();
    let repo = TestRepo::with_files(&[
        ("stagely.yaml", b"builds:\n  chatty:\n    context: .\n    platform: linux/amd64\n"),
        (
            "Dockerfile",
            b"FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"i=0; while [ $i -lt 3000 ]; do echo line-$i-padding-padding-padding-padding; i=$((i+1)); done\"]\nRUN [\"/bin/busybox\", \"echo\", \"still-building\"]\n",
        ),
        ("busybox", &busybox),
    ])
    .unwrap();
    let mut core = TestCore::start_configured(|file| {
        file.scheduler.max_log_bytes_per_job = Some(20_000);
    })
    .await
    .unwrap();
    let run = core.submit(&repo, None, "pr-cap").await.unwrap();
    let view = core.wait_finished(&run.id, Duration::from_secs(120)).await;
    assert_eq!(view.status, "completed", "{:?}", view.jobs[0].error_message);
    let lines = core.logs(&view.jobs[0].id).await.unwrap();
    let total: usize = lines.iter().map(|(_, l)| l.len()).sum();
    assert!(total < 20_000 + 400, "{total} bytes stored");
    let texts: Vec<&str> = lines.iter().map(|(_, l)| l.as_str()).collect();
    let marker = texts
        .iter()
        .position(|l| l.contains("reached its limit of 20000 bytes"))
        .unwrap_or_else(|| panic!("no marker in {texts:?}"));
    let summary = texts.last().unwrap();
    assert!(
        summary.contains("were dropped after the log limit"),
        "{summary}"
    );
    assert_eq!(marker, texts.len() - 2, "marker, then only the summary");
    core.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_line_longer_than_64_kib_is_split_flagged_and_joined_whole_again() {
    if !require_build_peers() {
        return;
    }
    let busybox = busybox("amd64").unwrap();
    // One 200,000-byte line (digits 0-9 repeated, so order is checked), then a short one.
    let repo = TestRepo::with_files(&[
        ("stagely.yaml", b"builds:\n  wide:\n    context: .\n    platform: linux/amd64\n"),
        (
            "Dockerfile",
            b"FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"i=0; while [ $i -lt 20000 ]; do printf 0123456789; i=$((i+1)); done; echo; echo after-the-long-line\"]\n",
        ),
        ("busybox", &busybox),
    ])
    .unwrap();
    let mut core = TestCore::start().await.unwrap();
    let run = core.submit(&repo, None, "pr-wide").await.unwrap();
    let view = core.wait_finished(&run.id, Duration::from_secs(120)).await;
    assert_eq!(view.status, "completed", "{:?}", view.jobs[0].error_message);
    let lines = all_log_lines(&core.client, &core.url, &view.jobs[0].id)
        .await
        .unwrap();
    let texts: Vec<&str> = lines.iter().map(|l| l.line.as_str()).collect();
    let first = texts
        .iter()
        .position(|l| l.starts_with("0123456789"))
        .unwrap_or_else(|| panic!("no long line in {texts:?}"));
    let mut whole = String::new();
    let mut pieces = 0;
    // Every piece but the last says the line goes on (`continued`, out of band).
    for line in &lines[first..] {
        pieces += 1;
        assert!(
            line.line.len() <= stagely_protocol::MAX_LOG_DATA_BYTES,
            "a stored piece is too long"
        );
        whole.push_str(&line.line);
        if !line.continued {
            break;
        }
    }
    assert!(pieces >= 4, "{pieces} pieces");
    assert_eq!(whole, format!("{}\n", "0123456789".repeat(20_000)));
    assert!(texts.contains(&"after-the-long-line\n"));
    core.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_body_that_trickles_in_is_cut_with_408() {
    let mut core = TestCore::start_configured(|file| {
        file.api.body_read_timeout_secs = Some(1);
    })
    .await
    .unwrap();
    let addr = core.url.trim_start_matches("http://").to_string();
    let token = core.api_token.clone();
    let answer = tokio::task::spawn_blocking(move || {
        let mut socket = std::net::TcpStream::connect(&addr).unwrap();
        // Headers complete, a body of 1000 bytes promised, 10 sent, then silence.
        write!(
            socket,
            "POST /api/v1/workflows HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"repo_url\""
        )
        .unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut answer = Vec::new();
        let mut buffer = [0u8; 4096];
        while let Ok(read) = socket.read(&mut buffer) {
            if read == 0 {
                break;
            }
            answer.extend_from_slice(&buffer[..read]);
            if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.ends_with(b"}") {
                break;
            }
        }
        String::from_utf8_lossy(&answer).into_owned()
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("did not arrive within 1s"), "{answer}");
    core.stop().await;
}

/// A repository whose one `RUN` step runs `script` under busybox `sh`.
fn busybox_repo(script: &str) -> TestRepo {
    let busybox = busybox("amd64").unwrap();
    let dockerfile = format!(
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"{script}\"]\n"
    );
    TestRepo::with_files(&[
        (
            "stagely.yaml",
            b"builds:\n  greedy:\n    context: .\n    platform: linux/amd64\n",
        ),
        ("Dockerfile", dockerfile.as_bytes()),
        ("busybox", &busybox),
    ])
    .unwrap()
}

/// Issue 26 (SECURITY.md row 81): a `RUN` step forking without end. The instance's pids
/// cgroup (`[provider.local] max_pids`) covers the RUN container too (buildah's
/// `--cgroup-parent` inside it): forks fail past the limit, the job fails, and the host
/// never sees more than the limit of the build's processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fork_flood_stops_at_the_instance_process_limit() {
    if !require_build_peers() {
        return;
    }
    let repo = busybox_repo(
        "i=0; while [ $i -lt 400 ]; do /bin/busybox sleep 30 & i=$((i+1)); done; echo spawned $i; wait",
    );
    let mut core = TestCore::start_configured(|file| {
        file.provider.local = Some(stagely_server::config::LocalFile {
            max_pids: Some(96),
            max_disk_mib: None,
        });
    })
    .await
    .unwrap();
    let run = core.submit(&repo, None, "pr-forks").await.unwrap();
    let view = core.wait_finished(&run.id, Duration::from_secs(120)).await;
    let job = &view.jobs[0];
    assert_eq!(job.status, "failed", "{view:?}");
    let lines = core.logs(&job.id).await.unwrap();
    let text: String = lines.iter().map(|(_, l)| l.as_str()).collect();
    assert!(text.contains("can't fork"), "{text}");
    assert!(!text.contains("spawned 400"), "{text}");
    // Nothing of it is left running.
    poll_until(
        Duration::from_secs(20),
        "the build's processes to be gone",
        || async {
            let sleepers: Vec<(i32, String)> = cmdlines()
                .into_iter()
                .filter(|(_, c)| c.contains("sleep 30 "))
                .collect();
            Ok((sleepers.is_empty().then_some(()), format!("{sleepers:?}")))
        },
    )
    .await;
    core.stop().await;
}

/// Issue 26 (SECURITY.md row 82): a `RUN` step writing without end. The instance's work
/// directory is a file system of `[provider.local] max_disk_mib`: the write fails there, not
/// on the host's disk, and the job fails saying the instance's disk is full.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_disk_filling_build_fails_at_the_instance_disk_limit_saying_so() {
    if !require_build_peers() {
        return;
    }
    let repo = busybox_repo(
        "/bin/busybox dd if=/dev/zero of=/filler bs=1048576 count=300 && echo wrote-it-all",
    );
    let mut core = TestCore::start_configured(|file| {
        file.provider.local = Some(stagely_server::config::LocalFile {
            max_pids: None,
            max_disk_mib: Some(96),
        });
    })
    .await
    .unwrap();
    let run = core.submit(&repo, None, "pr-disk").await.unwrap();
    let view = core.wait_finished(&run.id, Duration::from_secs(120)).await;
    let job = &view.jobs[0];
    assert_eq!(job.status, "failed", "{view:?}");
    let message = job.error_message.clone().unwrap_or_default();
    let lines = core.logs(&job.id).await.unwrap();
    let text: String = lines.iter().map(|(_, l)| l.as_str()).collect();
    assert!(
        message.contains("no space left: the instance's disk is full"),
        "{message}: {text}"
    );
    assert!(!lines.iter().any(|(_, l)| l == "wrote-it-all\n"), "{text}");
    // The instance's disk went with it.
    assert!(core.live_instances().await.is_empty());
    core.stop().await;
}
