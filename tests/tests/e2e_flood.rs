//! Hostile load on the core's one port: a connection flood cannot lock agents or
//! authenticated callers out, unauthenticated answers cannot hold a connection, and event
//! streams and connection lifetimes are bounded (issue 26, SECURITY.md rows 65–70).

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use stagely_tests::flood::Flood;
use stagely_tests::*;

const RUN_TIMEOUT: Duration = Duration::from_secs(240);

/// A build whose RUN step prints lines for a few seconds (its agent streams them under the
/// flood).
fn chatty_repo() -> TestRepo {
    let busybox = busybox("amd64").unwrap();
    TestRepo::with_files(&[
        (
            "stagely.yaml",
            b"builds:\n  app:\n    context: ./app\n    platform: linux/amd64\n",
        ),
        (
            "app/Dockerfile",
            b"FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"for i in $(/bin/busybox seq 1 40); do echo flood-line-$i; /bin/busybox sleep 0.1; done\"]\n",
        ),
        ("app/busybox", &busybox),
    ])
    .unwrap()
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// Times `count` authenticated submits (each a new run of `repo` in its own environment).
async fn time_submits(
    core: &TestCore,
    repo: &TestRepo,
    prefix: &str,
    count: usize,
) -> Vec<Duration> {
    let mut took = Vec::new();
    for i in 0..count {
        let started = Instant::now();
        let answered = tokio::time::timeout(
            Duration::from_secs(10),
            core.submit_raw(serde_json::json!({
                "repo_url": repo.url(),
                "commit_hash": repo.commit,
                "branch": "main",
                "environment_id": format!("{prefix}-{i}"),
                "stagely_yaml": "builds:\n  a:\n    context: ./app\n    platform: linux/amd64\n",
            })),
        )
        .await
        .expect("an authenticated submit was not answered within 10 s")
        .unwrap();
        took.push(started.elapsed());
        assert_eq!(answered.0, 201, "{}", answered.1);
        // Cancel it: only the measured answer matters, not another build.
        let id = answered.1["id"].as_str().unwrap().to_string();
        let _ = core
            .client
            .post(format!("{}/api/v1/workflows/{id}/cancel", core.url))
            .send()
            .await;
    }
    took
}

/// Issue 26's probe, in its test shape: 2,000 connections from one address (1,000 asking
/// `/healthz` every 2 s on kept-alive connections, 1,000 trickling headers), held while a real
/// build runs. Before the fix every connection slot was taken: the agent could not dial in
/// and the submit hung. Prints the submit's answer time with and without the flood (the
/// benchmark in BENCHMARKS.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_from_one_address_locks_out_neither_agents_nor_authenticated_callers() {
    if !require_build_peers() {
        return;
    }
    // Both ends of 2,000 connections live in this process.
    stagely_server::server::raise_open_files_limit();
    let repo = chatty_repo();
    let mut core = TestCore::start().await.unwrap();
    let addr: std::net::SocketAddr = core.url.trim_start_matches("http://").parse().unwrap();

    let quiet = time_submits(&core, &repo, "quiet", 5).await;

    let flood = Flood::start(addr, 1000, 1000);
    // Every one of its 2,000 sockets dialled (before the fix they all stayed connected and
    // held every slot; now the core closes or evicts what it need not keep).
    poll_until(
        Duration::from_secs(60),
        "the flood to dial 2,000 sockets",
        || {
            let stats = flood.stats();
            async move { Ok(((stats.connects >= 2000).then_some(()), format!("{stats:?}"))) }
        },
    )
    .await;
    // A few seconds in, so that every kind of flooding connection is at work.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let flooded = time_submits(&core, &repo, "flooded", 5).await;
    let started = Instant::now();
    let run = tokio::time::timeout(
        Duration::from_secs(10),
        core.submit(&repo, None, "pr-flood"),
    )
    .await
    .expect("the build's submit was not answered within 10 s under the flood")
    .unwrap();
    let run = core.wait_finished(&run.id, RUN_TIMEOUT).await;
    let build_took = started.elapsed();
    let during = flood.stats();
    let job = &run.jobs[0];
    let logs: String = core
        .logs(&job.id)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, line)| line)
        .collect();
    assert_eq!(run.status, "completed", "{:?}\n{logs}", job.error_message);
    for i in 1..=40 {
        assert!(
            logs.contains(&format!("flood-line-{i}\n")),
            "line {i} missing:\n{logs}"
        );
    }
    let gate = core.core.as_ref().unwrap().gate.clone();
    let evicted = gate.evicted();
    let stats = flood.stop();
    eprintln!(
        "flood: {stats:?} (during the build {during:?}); core evicted {evicted} waiting connections; \
         submit answer median {:?} quiet, {:?} under the flood (max {:?}); build under the flood {build_took:?}",
        median(quiet.clone()),
        median(flooded.clone()),
        flooded.iter().max().unwrap(),
    );
    // The flood was real: it dialled again and again, and the core answered it.
    assert!(stats.connects >= 10_000, "{stats:?}");
    assert!(stats.answered >= 1000, "{stats:?}");
    assert!(evicted > 0, "the core never had to evict");
    // Authenticated calls were answered within a second under the flood.
    assert!(
        median(flooded.clone()) < Duration::from_secs(1),
        "submit answers under the flood: {flooded:?}"
    );
    core.stop().await;
}

/// Reads one HTTP/1.1 response (head and `Content-Length` body) from `socket`; returns the
/// head, or `None` if the connection closed first.
fn read_response(socket: &mut std::net::TcpStream) -> Option<String> {
    let mut data = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).to_string();
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            while data.len() < end + 4 + length {
                let n = socket.read(&mut buffer).ok()?;
                if n == 0 {
                    return None;
                }
                data.extend_from_slice(&buffer[..n]);
            }
            return Some(head);
        }
        let n = socket.read(&mut buffer).ok()?;
        if n == 0 {
            return None;
        }
        data.extend_from_slice(&buffer[..n]);
    }
}

/// True when the peer closed `socket` (end of file within `wait`).
fn closed_by_peer(socket: &mut std::net::TcpStream, wait: Duration) -> bool {
    socket.set_read_timeout(Some(wait)).unwrap();
    let mut byte = [0u8; 1];
    matches!(socket.read(&mut byte), Ok(0))
        || matches!(socket.read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_answers_close_their_connection_and_are_rate_limited_per_address() {
    let mut core = TestCore::start_with_provider(std::sync::Arc::new(RecordingProvider::default()))
        .await
        .unwrap();
    let addr = core.url.trim_start_matches("http://").to_string();
    let token = core.api_token.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        // /healthz, a 401 and an unknown path: answered, then closed.
        for request in [
            "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
            "GET /api/v1/queue HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
            "GET /api/v1/queue HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer stga_wrong\r\n\r\n".to_string(),
            "GET /nothing-here HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
        ] {
            let mut socket = std::net::TcpStream::connect(&addr).unwrap();
            socket.write_all(request.as_bytes()).unwrap();
            let head = read_response(&mut socket).expect("an answer");
            assert!(
                head.to_ascii_lowercase().contains("connection: close"),
                "{request:?} -> {head}"
            );
            assert!(closed_by_peer(&mut socket, Duration::from_secs(5)), "{request:?} left open");
        }
        // An authenticated caller keeps its connection for the next request.
        let mut socket = std::net::TcpStream::connect(&addr).unwrap();
        for _ in 0..3 {
            socket
                .write_all(
                    format!("GET /api/v1/queue HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n")
                        .as_bytes(),
                )
                .unwrap();
            let head = read_response(&mut socket).expect("kept alive");
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        }
        // Requests without a token from one address: past the burst, 429 with Retry-After.
        let mut statuses = std::collections::BTreeMap::new();
        let mut retry_after = None;
        for _ in 0..300 {
            let mut socket = std::net::TcpStream::connect(&addr).unwrap();
            socket
                .write_all(b"GET /api/v1/queue HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            let head = read_response(&mut socket).expect("an answer");
            let status: u16 = head[9..12].parse().unwrap();
            if status == 429 {
                retry_after = head
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("retry-after:").map(|v| v.trim().to_string()));
            }
            *statuses.entry(status).or_insert(0) += 1;
        }
        // /healthz is never rate limited, and an authenticated caller is not affected.
        let mut socket = std::net::TcpStream::connect(&addr).unwrap();
        socket.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let health = read_response(&mut socket).unwrap();
        let mut socket = std::net::TcpStream::connect(&addr).unwrap();
        socket
            .write_all(
                format!("GET /api/v1/queue HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n").as_bytes(),
            )
            .unwrap();
        let authenticated = read_response(&mut socket).unwrap();
        (statuses, retry_after, health, authenticated)
    })
    .await
    .unwrap();
    let (statuses, retry_after, health, authenticated) = outcome;
    eprintln!("unauthenticated requests by status: {statuses:?}");
    assert!(
        statuses.get(&429).copied().unwrap_or(0) >= 100,
        "{statuses:?}"
    );
    assert!(
        statuses.get(&401).copied().unwrap_or(0) >= 20,
        "{statuses:?}"
    );
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(authenticated.starts_with("HTTP/1.1 200"), "{authenticated}");
    core.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_gets_at_most_its_share_of_requests_in_flight() {
    let mut core = TestCore::start_with_provider_on(
        std::sync::Arc::new(RecordingProvider::default()),
        Backend::from_env(),
        |file| file.api.max_connections_per_ip = Some(3),
    )
    .await
    .unwrap();
    let repo = chatty_repo();
    let run = core
        .submit(
            &repo,
            Some("builds:\n  a:\n    context: ./app\n    platform: linux/amd64\n"),
            "pr-share",
        )
        .await
        .unwrap();
    let job_id = run.jobs[0].id.clone();
    let stream = |client: &reqwest::Client| {
        client
            .get(format!("{}/api/v1/jobs/{job_id}/logs/stream", core.url))
            .send()
    };
    // Three streams hold this address's three requests in flight; a fourth request is 429.
    let mut held = Vec::new();
    for _ in 0..3 {
        let response = stream(&client_with_token(&core.api_token)).await.unwrap();
        assert_eq!(response.status(), 200);
        held.push(response);
    }
    let refused = client_with_token(&core.api_token)
        .get(format!("{}/api/v1/queue", core.url))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 429);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("api.max_connections_per_ip"),
        "{body}"
    );
    // A stream ended frees its place.
    held.pop();
    let answered = poll_until(Duration::from_secs(10), "a place to free up", || async {
        let status = client_with_token(&core.api_token)
            .get(format!("{}/api/v1/queue", core.url))
            .send()
            .await?
            .status();
        Ok(((status == 200).then_some(status), format!("{status}")))
    })
    .await;
    assert_eq!(answered, 200);
    drop(held);
    core.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_are_capped_per_token_and_in_total() {
    let second = stagely_core::cli::new_api_token();
    let second_hash = stagely_server::config::hash_token(&second);
    let mut core = TestCore::start_with_provider_on(
        std::sync::Arc::new(RecordingProvider::default()),
        Backend::from_env(),
        |file| {
            file.api.max_sse_streams = Some(3);
            file.api.max_sse_streams_per_token = Some(2);
            file.api
                .tokens
                .insert("second".into(), hex::encode(second_hash).into());
        },
    )
    .await
    .unwrap();
    let repo = chatty_repo();
    let run = core.submit(&repo, None, "pr-streams").await.unwrap();
    let first = client_with_token(&core.api_token);
    let other = client_with_token(&second);
    let open = |client: &reqwest::Client| {
        client
            .get(format!("{}/api/v1/workflows/{}/events", core.url, run.id))
            .send()
    };
    let a = open(&first).await.unwrap();
    let b = open(&first).await.unwrap();
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (200, 200));
    let over_token = open(&first).await.unwrap();
    assert_eq!(over_token.status(), 429);
    let text = over_token.text().await.unwrap();
    assert!(text.contains("api.max_sse_streams_per_token"), "{text}");
    let c = open(&other).await.unwrap();
    assert_eq!(c.status(), 200);
    let over_total = open(&other).await.unwrap();
    assert_eq!(over_total.status(), 429);
    let text = over_total.text().await.unwrap();
    assert!(text.contains("api.max_sse_streams"), "{text}");
    // A closed stream gives its place back.
    drop(a);
    poll_until(
        Duration::from_secs(10),
        "a stream place to free up",
        || async {
            let response = open(&first).await?;
            let status = response.status();
            Ok(((status == 200).then_some(response), format!("{status}")))
        },
    )
    .await;
    drop((b, c));
    core.stop().await;
}
