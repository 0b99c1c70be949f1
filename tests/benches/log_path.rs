//! Benchmark: the core's log path, fed by simulated agents over real WebSockets.
//!
//! A real core (agent endpoint, session, masking, log budget, chunked storage, ACKs, the SSE
//! fan-out) in this process, with a provider whose instances boot nothing: each simulated
//! agent reads its token from the user-data, dials `/api/v1/agent/connect`, says HELLO, takes
//! its BUILD and streams 100-byte lines in `LOGS` frames as fast as the core acknowledges them,
//! keeping at most a window of lines unacknowledged (64,000 lines, about 7 MB: the real agent
//! sends whatever its spool holds without waiting for ACKs, up to half its 256 MiB spool; a
//! smaller window makes the figure the ACK round trip's, not the core's).
//!
//! Prints, in one run:
//! - lines/s stored for 1 agent and for 100 agents at once (first frame sent → the ACK of the
//!   last line, which the core sends only once the line is in the database);
//! - delivery latency, agent write → SSE client, median and p99, for a line every 5 ms;
//! - bytes on the wire per line: one `LOG` frame per line (the seed's shape) vs `LOGS`, in
//!   JSON and in protobuf.
//!
//! Agents speak protobuf (`stagely.v1.proto`, what the real agent negotiates); the single
//! agent runs once more in JSON for comparison.
//!
//! Run: `cargo bench -p stagely-tests --bench log_path` (`STAGELY_BENCH_LINES` changes the
//! single agent's line count, `STAGELY_BENCH_WINDOW` the window; the store is the suite's: SQLite, or PostgreSQL with
//! `STAGELY_TEST_DATABASE=postgres`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use stagely_protocol::{
    Arch, BuilderKind, Codec, Hello, JobState, Log, LogLine, LogStream, Logs, Message,
    PROTOCOL_VERSION, Status, decode, decode_proto, encode, encode_proto,
};
use stagely_tests::*;
use tokio_tungstenite::tungstenite::Message as Ws;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const LINES_PER_FRAME: usize = 2000;

fn line_text(seq: u64) -> String {
    // 100 bytes with the newline.
    format!("{seq:>12} {}\n", "x".repeat(86))
}

async fn submit(core: &TestCore, builds: usize, environment: &str) -> Vec<String> {
    let mut yaml = String::from("fail_fast: false\nbuilds:\n");
    for n in 0..builds {
        yaml.push_str(&format!(
            "  b{n}:\n    context: .\n    platform: linux/amd64\n"
        ));
    }
    let (status, body) = core
        .submit_raw(serde_json::json!({
            "repo_url": "/nonexistent/repo",
            "commit_hash": "0123456789abcdef0123456789abcdef01234567",
            "branch": "main",
            "environment_id": environment,
            "stagely_yaml": yaml,
        }))
        .await
        .expect("submit");
    assert_eq!(status, 201, "{body}");
    let view: stagely_api::RunView = serde_json::from_value(body).expect("run view");
    view.jobs.into_iter().map(|job| job.id).collect()
}

/// Tokens of these jobs, once their instances exist.
async fn tokens_for(provider: &RecordingProvider, jobs: &[String]) -> Vec<(String, String)> {
    poll_until(Duration::from_secs(60), "instances", || async {
        let tokens: Vec<(String, String)> = provider
            .tokens()
            .into_iter()
            .filter(|(job, _)| jobs.contains(job))
            .collect();
        let state = format!("{} of {}", tokens.len(), jobs.len());
        Ok(((tokens.len() == jobs.len()).then_some(tokens), state))
    })
    .await
}

fn ws(codec: Codec, frame: &Message) -> Ws {
    match codec {
        Codec::Json => Ws::text(encode(frame)),
        Codec::Proto => Ws::binary(encode_proto(frame)),
    }
}

fn decoded(message: &Ws) -> Option<Message> {
    match message {
        Ws::Text(text) => decode(text.as_bytes()).ok(),
        Ws::Binary(bytes) => decode_proto(bytes).ok(),
        _ => None,
    }
}

async fn agent(core: &TestCore, token: &str, codec: Codec) -> Socket {
    let url = format!(
        "{}/api/v1/agent/connect",
        core.url.replace("http://", "ws://")
    );
    let mut request = url.into_client_request().expect("request");
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    request.headers_mut().insert(
        "sec-websocket-protocol",
        codec.subprotocol().parse().expect("header"),
    );
    let (mut socket, _) = tokio_tungstenite::connect_async_with_config(request, None, true)
        .await
        .expect("dial");
    let hello = Message::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: "bench".into(),
        instance_id: "bench".into(),
        arch: Arch::Amd64,
        builders: vec![BuilderKind::Buildah],
        emulated_arches: vec![],
        accepts_more_work: false,
        job_id: None,
        attempt: None,
        acked_seq: None,
    });
    socket.send(ws(codec, &hello)).await.expect("hello");
    loop {
        match socket.next().await {
            Some(Ok(message)) => {
                if let Some(Message::Build(_)) = decoded(&message) {
                    return socket;
                }
            }
            other => panic!("no BUILD: {other:?}"),
        }
    }
}

/// Streams `count` lines in LOGS frames, keeping at most `window` lines unacknowledged;
/// returns when the last is acknowledged, then ends the job.
async fn stream_lines(mut socket: Socket, codec: Codec, job_id: String, count: u64, window: u64) {
    let mut next = 1u64;
    let mut acked = 0u64;
    while acked < count {
        while next <= count && next - acked <= window {
            let last = (next + LINES_PER_FRAME as u64 - 1).min(count);
            let frame = Message::Logs(Logs {
                job_id: job_id.clone(),
                seq: next,
                lines: (next..=last)
                    .map(|seq| LogLine {
                        stream: LogStream::Stdout,
                        data: line_text(seq),
                        continued: false,
                    })
                    .collect(),
            });
            socket.feed(ws(codec, &frame)).await.expect("send");
            next = last + 1;
        }
        socket.flush().await.expect("flush");
        match socket.next().await {
            Some(Ok(message)) => {
                if let Some(Message::Ack(ack)) = decoded(&message) {
                    acked = acked.max(ack.seq);
                }
            }
            other => panic!("connection ended: {other:?}"),
        }
    }
    let status = end_status(job_id, count + 1);
    let _ = socket.send(ws(codec, &status)).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), socket.next()).await;
}

/// Lines a simulated agent keeps unacknowledged at most (`STAGELY_BENCH_WINDOW`).
fn window() -> u64 {
    std::env::var("STAGELY_BENCH_WINDOW")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64_000)
}

async fn throughput(
    core: &TestCore,
    provider: &RecordingProvider,
    agents: usize,
    lines_each: u64,
    codec: Codec,
) -> f64 {
    let jobs = submit(
        core,
        agents,
        &format!("bench-{agents}-{}", codec.subprotocol()),
    )
    .await;
    let tokens = tokens_for(provider, &jobs).await;
    let mut sockets = Vec::new();
    for (job, token) in &tokens {
        sockets.push((job.clone(), agent(core, token, codec).await));
    }
    let started = Instant::now();
    let tasks: Vec<_> = sockets
        .into_iter()
        .map(|(job, socket)| tokio::spawn(stream_lines(socket, codec, job, lines_each, window())))
        .collect();
    for task in tasks {
        task.await.expect("agent task");
    }
    let elapsed = started.elapsed().as_secs_f64();
    (agents as u64 * lines_each) as f64 / elapsed
}

/// Agent write → SSE client, for `count` lines one every 5 ms: (median, p99) in ms.
async fn latency(core: &TestCore, provider: &RecordingProvider, count: u64) -> (f64, f64) {
    let jobs = submit(core, 1, "bench-latency").await;
    let tokens = tokens_for(provider, &jobs).await;
    let (job_id, token) = tokens[0].clone();
    let mut socket = agent(core, &token, Codec::Proto).await;
    let client = core.client.clone();
    let url = format!("{}/api/v1/jobs/{job_id}/logs/stream", core.url);
    let origin = Instant::now();
    let reader = tokio::spawn(async move {
        let mut response = client.get(url).send().await.expect("stream");
        let mut pending = String::new();
        let mut samples = Vec::new();
        while let Ok(Some(chunk)) = response.chunk().await {
            pending.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = pending.find('\n') {
                let line: String = pending.drain(..=end).collect();
                if let Some(data) = line.strip_prefix("data:")
                    && let Ok(view) = serde_json::from_str::<serde_json::Value>(data.trim())
                    && let Some(sent) = view["line"]
                        .as_str()
                        .and_then(|l| l.trim().strip_prefix("t="))
                        .and_then(|t| t.parse::<u128>().ok())
                {
                    samples.push((origin.elapsed().as_micros() - sent) as f64 / 1000.0);
                }
                if line.starts_with("event: end") {
                    return samples;
                }
            }
        }
        samples
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    for seq in 1..=count {
        let frame = Message::Log(Log {
            job_id: job_id.clone(),
            stream: LogStream::Stdout,
            data: format!("t={}\n", origin.elapsed().as_micros()),
            seq: Some(seq),
            continued: false,
        });
        socket.send(ws(Codec::Proto, &frame)).await.expect("send");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let status = end_status(job_id, count + 1);
    socket
        .send(ws(Codec::Proto, &status))
        .await
        .expect("status");
    let mut samples = tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .expect("the stream ended")
        .expect("reader");
    assert_eq!(samples.len() as u64, count, "every line reached the viewer");
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    (at(0.5), at(0.99))
}

/// The STATUS that ends a simulated job (failed: nothing to check in the registry).
fn end_status(job_id: String, seq: u64) -> Message {
    Message::Status(Status {
        job_id,
        state: JobState::Failed,
        exit_code: Some(1),
        artifact_url: None,
        digest: None,
        error: Some("bench".into()),
        never_ran: None,
        seq: Some(seq),
    })
}

fn bytes_per_line() -> (f64, f64, f64) {
    let lines: Vec<String> = (1..=LINES_PER_FRAME as u64).map(line_text).collect();
    let single: usize = lines
        .iter()
        .enumerate()
        .map(|(i, data)| {
            encode(&Message::Log(Log {
                job_id: "0bd039f1-4f02-4bc6-9d15-db3244ee91e7".into(),
                stream: LogStream::Stdout,
                data: data.clone(),
                seq: Some(1_000_000 + i as u64),
                continued: false,
            }))
            .len()
        })
        .sum();
    let frame = Message::Logs(Logs {
        job_id: "0bd039f1-4f02-4bc6-9d15-db3244ee91e7".into(),
        seq: 1_000_000,
        lines: lines
            .iter()
            .map(|data| LogLine {
                stream: LogStream::Stdout,
                data: data.clone(),
                continued: false,
            })
            .collect(),
    });
    let json = encode(&frame).len();
    let proto = encode_proto(&frame).len();
    let per_line = |bytes: usize| bytes as f64 / lines.len() as f64;
    (per_line(single), per_line(json), per_line(proto))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if !require("docker-registry", "--version") {
        return;
    }
    let single: u64 = std::env::var("STAGELY_BENCH_LINES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let provider = Arc::new(RecordingProvider::default());
    let mut core =
        TestCore::start_with_provider_on(provider.clone(), Backend::from_env(), |file| {
            file.scheduler.max_log_bytes_per_job = Some(1 << 40);
            file.scheduler.max_concurrent_jobs = Some(200);
            file.scheduler.max_live_per_environment = Some(200);
        })
        .await
        .expect("core");
    println!(
        "store: {:?}; at most {} lines unacknowledged per agent",
        Backend::from_env(),
        window()
    );
    for codec in [Codec::Proto, Codec::Json] {
        let one = throughput(&core, &provider, 1, single, codec).await;
        println!(
            "1 agent ({}), {single} lines of 100 bytes: {one:.0} lines/s stored",
            codec.subprotocol()
        );
    }
    let hundred = throughput(&core, &provider, 100, 10_000, Codec::Proto).await;
    println!(
        "100 agents (stagely.v1.proto) x 10000 lines of 100 bytes: {hundred:.0} lines/s stored in total"
    );
    let (median, p99) = latency(&core, &provider, 1000).await;
    println!(
        "agent write -> SSE client, 1000 lines 5 ms apart: median {median:.1} ms, p99 {p99:.1} ms"
    );
    let (log, json, proto) = bytes_per_line();
    println!(
        "bytes on the wire per 100-byte line: LOG (JSON, one per frame) {log:.1}; LOGS ({LINES_PER_FRAME} per frame): JSON {json:.1}, protobuf {proto:.1}"
    );
    core.stop().await;
}
