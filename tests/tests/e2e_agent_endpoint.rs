//! The agent endpoint against a misbehaving or hand-driven agent. The provider here boots
//! nothing and records user-data, so the test holds each instance's one-time token and plays
//! the agent itself over a real WebSocket.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use stagely_protocol::{
    Arch, BuilderKind, Hello, JobState, Log, LogStream, Message, PROTOCOL_VERSION, Status, decode,
    encode,
};
use stagely_tests::*;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message as Ws};

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const FAKE_COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

async fn connect(core: &TestCore, token: Option<&str>) -> Result<Socket, tungstenite::Error> {
    let url = format!(
        "{}/api/v1/agent/connect",
        core.url.replace("http://", "ws://")
    );
    let mut request = url.into_client_request().unwrap();
    if let Some(token) = token {
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    tokio_tungstenite::connect_async(request)
        .await
        .map(|(s, _)| s)
}

fn refused_with(result: Result<Socket, tungstenite::Error>, status: u16) {
    match result {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status().as_u16(), status),
        Err(other) => panic!("expected HTTP {status}, got {other}"),
        Ok(_) => panic!("expected HTTP {status}, but the upgrade succeeded"),
    }
}

fn hello() -> String {
    encode(&Message::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: "test".into(),
        instance_id: "hand-driven".into(),
        arch: Arch::Amd64,
        builders: vec![BuilderKind::Buildah],
        emulated_arches: vec![],
        accepts_more_work: false,
        job_id: None,
        attempt: None,
        acked_seq: None,
    }))
}

async fn next_message(socket: &mut Socket) -> Message {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), socket.next()).await {
            Ok(Some(Ok(Ws::Text(text)))) => {
                let message = decode(text.as_bytes()).unwrap();
                if !matches!(message, Message::Heartbeat(_)) {
                    return message;
                }
            }
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected a frame, got {other:?}"),
        }
    }
}

async fn close_reason(socket: &mut Socket) -> (u16, String) {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), socket.next()).await {
            Ok(Some(Ok(Ws::Close(Some(frame))))) => {
                return (frame.code.into(), frame.reason.to_string());
            }
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

async fn submit_builds(core: &TestCore, names: &[&str]) -> stagely_api::RunView {
    // Each job's outcome is checked on its own: no fail-fast cancelling the others.
    let mut yaml = String::from("fail_fast: false\nbuilds:\n");
    for name in names {
        yaml.push_str(&format!(
            "  {name}:\n    context: ./{name}\n    platform: linux/amd64\n"
        ));
    }
    let (status, body) = core
        .submit_raw(serde_json::json!({
            "repo_url": "/nonexistent/repo",
            "commit_hash": FAKE_COMMIT,
            "branch": "main",
            "environment_id": "pr-9",
            "stagely_yaml": yaml,
        }))
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    serde_json::from_value(body).unwrap()
}

/// Submits one build of a private repository whose clone token is `clone_token`.
async fn submit_with_clone_token(
    core: &TestCore,
    clone_token: &str,
    environment: &str,
) -> serde_json::Value {
    let (status, body) = core
        .submit_raw(serde_json::json!({
            "repo_url": "https://git.example.invalid/private.git",
            "commit_hash": FAKE_COMMIT,
            "branch": "main",
            "environment_id": environment,
            "stagely_yaml": "builds:\n  api:\n    context: .\n    platform: linux/amd64\n",
            "clone_token": clone_token,
        }))
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    body
}

/// A core whose instances boot nothing: the test plays each agent.
async fn hand_driven_core() -> (Arc<RecordingProvider>, TestCore) {
    let provider = Arc::new(RecordingProvider::default());
    let core = TestCore::start_with_provider(provider.clone())
        .await
        .unwrap();
    (provider, core)
}

/// Connects with `token`, says HELLO and waits for the BUILD.
async fn agent_with_build(core: &TestCore, token: &str) -> Socket {
    let mut agent = connect(core, Some(token)).await.unwrap();
    agent.send(Ws::text(hello())).await.unwrap();
    let Message::Build(_) = next_message(&mut agent).await else {
        panic!("expected BUILD")
    };
    agent
}

async fn send(agent: &mut Socket, message: Message) {
    agent.send(Ws::text(encode(&message))).await.unwrap();
}

async fn tokens(provider: &RecordingProvider, count: usize) -> Vec<(String, String)> {
    poll_until(
        Duration::from_secs(10),
        "instances to be created",
        || async {
            let tokens = provider.tokens();
            let state = format!("{} instance(s)", tokens.len());
            Ok(((tokens.len() == count).then_some(tokens), state))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn missing_wrong_and_spent_tokens_are_refused_before_any_frame() {
    if !require("docker-registry", "--version") {
        return;
    }
    let provider = Arc::new(RecordingProvider::default());
    let mut core = TestCore::start_with_provider(provider.clone())
        .await
        .unwrap();
    let run = submit_builds(&core, &["api"]).await;
    let tokens = tokens(&provider, 1).await;
    let (job_id, token) = &tokens[0];
    assert_eq!(job_id, &run.jobs[0].id);

    refused_with(connect(&core, None).await, 401);
    refused_with(connect(&core, Some("stg_wrong")).await, 401);
    refused_with(connect(&core, Some(&format!("{token}x"))).await, 401);

    let mut first = connect(&core, Some(token))
        .await
        .expect("the right token is accepted");
    // The core serves it (its BUILD arrives) before the agent dials again.
    first.send(Ws::text(hello())).await.unwrap();
    let Message::Build(_) = next_message(&mut first).await else {
        panic!("expected BUILD")
    };
    // A token is good until its attempt ends: a second connection with it (the agent dialling
    // again) replaces the first, which the core lets go.
    let mut agent = connect(&core, Some(token))
        .await
        .expect("the token is still good while its attempt lives");
    match tokio::time::timeout(Duration::from_secs(10), first.next()).await {
        Ok(Some(Ok(Ws::Close(_))) | None | Some(Err(_))) => {}
        other => panic!("the replaced connection was not let go: {other:?}"),
    }

    agent.send(Ws::text(hello())).await.unwrap();
    let Message::Build(build) = next_message(&mut agent).await else {
        panic!("expected BUILD")
    };
    assert_eq!(build.job_id, *job_id);
    assert_eq!(build.build_config.context_path, "api");
    assert_eq!(build.build_config.platform, "linux/amd64");
    assert_eq!(
        build.registry_auth.as_ref().unwrap().password,
        core.registry.password
    );
    assert!(build.registry.insecure);
    // `running` is stored right after the frame went out (the agent does not wait for it).
    let mut status = String::new();
    for _ in 0..100 {
        status = core.run(&run.id).await.unwrap().jobs[0].status.clone();
        if status == "running" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(status, "running");

    agent
        .send(Ws::text(encode(&Message::Log(Log {
            job_id: job_id.clone(),
            stream: LogStream::Stderr,
            data: "boom\n".into(),
            seq: Some(1),
            continued: false,
        }))))
        .await
        .unwrap();
    agent
        .send(Ws::text(encode(&Message::Status(Status {
            job_id: job_id.clone(),
            state: JobState::Failed,
            exit_code: Some(2),
            artifact_url: None,
            digest: None,
            // 100,004 characters with an escape sequence (issue 26): stored capped and clean.
            error: Some(format!(
                "builder exited with status 2\x1b[2J\n{}\nError: exit status 2",
                "y".repeat(99_950)
            )),
            never_ran: None,
            seq: Some(2),
        }))))
        .await
        .unwrap();
    // The STATUS itself (seq 2) is acknowledged; an ACK of the log flush may come first.
    loop {
        match next_message(&mut agent).await {
            Message::Ack(ack) if ack.seq == 2 => break,
            Message::Ack(ack) => assert!(ack.seq < 2, "ACK beyond STATUS: {}", ack.seq),
            other => panic!("expected ACK, got {other:?}"),
        }
    }
    let view = core.wait_finished(&run.id, Duration::from_secs(20)).await;
    assert_eq!(view.jobs[0].status, "failed");
    assert_eq!(view.jobs[0].exit_code, Some(2));
    let error = view.jobs[0].error_message.clone().unwrap();
    assert!(
        error.len() <= 4096 + 200 && !error.contains('\x1b'),
        "{} bytes: {:?}",
        error.len(),
        &error[..error.len().min(300)]
    );
    assert!(
        error.contains("builder exited with status 2") && error.ends_with("Error: exit status 2"),
        "{error}"
    );
    // The instance was terminated, and the token of the ended attempt is refused.
    assert_eq!(
        *provider.terminated.lock().unwrap(),
        vec!["rec-0".to_string()]
    );
    refused_with(connect(&core, Some(token)).await, 401);
    core.stop().await;

    // Neither the token nor the registry password was stored anywhere on disk.
    for (file, bytes) in core.stored().await {
        for secret in [token.as_str(), core.registry.password.as_str()] {
            assert!(
                !contains_bytes(&bytes, secret.as_bytes()),
                "{} contains a secret",
                file.display()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_malformed_frame_closes_only_that_connection_and_names_the_problem() {
    if !require("docker-registry", "--version") {
        return;
    }
    let logs = LogCapture::install();
    let provider = Arc::new(RecordingProvider::default());
    let mut core = TestCore::start_with_provider(provider.clone())
        .await
        .unwrap();
    let run = submit_builds(&core, &["garbage", "unknown", "good"]).await;
    let tokens = tokens(&provider, 3).await;
    let job = |name: &str| run.jobs.iter().find(|j| j.name == name).unwrap().id.clone();
    let token_of = |job_id: &str| tokens.iter().find(|(j, _)| j == job_id).unwrap().1.clone();

    // Open all three first, so the bad ones misbehave while the good one is connected.
    let mut garbage = connect(&core, Some(&token_of(&job("garbage"))))
        .await
        .unwrap();
    let mut unknown = connect(&core, Some(&token_of(&job("unknown"))))
        .await
        .unwrap();
    let mut good = connect(&core, Some(&token_of(&job("good")))).await.unwrap();
    good.send(Ws::text(hello())).await.unwrap();
    let Message::Build(_) = next_message(&mut good).await else {
        panic!("expected BUILD")
    };

    garbage.send(Ws::text("this is not json {")).await.unwrap();
    let (code, reason) = close_reason(&mut garbage).await;
    assert_eq!(code, 1008);
    assert!(
        reason.contains("malformed frame") && reason.contains("not valid JSON"),
        "{reason}"
    );

    unknown.send(Ws::text(hello())).await.unwrap();
    let Message::Build(_) = next_message(&mut unknown).await else {
        panic!("expected BUILD")
    };
    unknown
        .send(Ws::text(r#"{"type":"DEPLOY","job_id":"x"}"#))
        .await
        .unwrap();
    let (code, reason) = close_reason(&mut unknown).await;
    assert_eq!(code, 1008);
    assert!(reason.contains("unknown frame type `DEPLOY`"), "{reason}");

    // The good agent is unaffected: it streams (with a resent duplicate) and completes.
    let good_id = job("good");
    for seq in [1, 2, 2, 3] {
        good.send(Ws::text(encode(&Message::Log(Log {
            job_id: good_id.clone(),
            stream: LogStream::Stdout,
            data: format!("line {seq}\n"),
            seq: Some(seq),
            continued: false,
        }))))
        .await
        .unwrap();
    }
    // The core checks the registry: the image must really be there at that digest.
    let digest = push_test_image(&core.registry, "stagely/pr-9", "good")
        .await
        .unwrap();
    good.send(Ws::text(encode(&Message::Status(Status {
        job_id: good_id.clone(),
        state: JobState::Completed,
        exit_code: Some(0),
        artifact_url: Some(format!("{}/stagely/pr-9:good", core.registry.host)),
        digest: Some(digest.clone()),
        error: None,
        never_ran: None,
        seq: Some(4),
    }))))
    .await
    .unwrap();
    loop {
        if let Message::Ack(ack) = next_message(&mut good).await
            && ack.seq == 4
        {
            break;
        }
    }

    let view = core.wait_finished(&run.id, Duration::from_secs(20)).await;
    let by_name = |name: &str| view.jobs.iter().find(|j| j.name == name).unwrap();
    assert_eq!(view.status, "failed");
    assert_eq!(by_name("good").status, "completed");
    assert_eq!(by_name("good").digest.as_deref(), Some(digest.as_str()));
    let garbage_job = by_name("garbage");
    assert_eq!(garbage_job.status, "failed");
    assert!(
        garbage_job
            .error_message
            .as_deref()
            .unwrap()
            .contains("malformed frame")
    );
    assert!(
        by_name("unknown")
            .error_message
            .as_deref()
            .unwrap()
            .contains("unknown frame type `DEPLOY`")
    );
    let lines = core.logs(&good_id).await.unwrap();
    assert_eq!(
        lines.iter().map(|(_, l)| l.as_str()).collect::<Vec<_>>(),
        ["line 1\n", "line 2\n", "line 3\n"],
        "each line exactly once"
    );
    // The core logged the violation as an error naming the frame problem.
    let text = logs.text();
    assert!(
        text.lines().any(|l| l.contains("ERROR")
            && l.contains("closing agent connection")
            && l.contains("not valid JSON")),
        "core log lacks the violation:\n{text}"
    );
    let health = core
        .client
        .get(format!("{}/healthz", core.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(provider.terminated.lock().unwrap().len(), 3);
    core.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_api_input_gets_a_precise_error_naming_the_field() {
    if !require("docker-registry", "--version") {
        return;
    }
    let provider = Arc::new(RecordingProvider::default());
    let mut core = TestCore::start_with_provider(provider.clone())
        .await
        .unwrap();
    let base = serde_json::json!({
        "repo_url": "/nonexistent/repo",
        "commit_hash": FAKE_COMMIT,
        "branch": "main",
        "environment_id": "pr-1",
        "stagely_yaml": "builds:\n  api:\n    context: ./api\n    platform: linux/amd64\n",
    });
    let with = |key: &str, value: serde_json::Value| {
        let mut body = base.clone();
        body[key] = value;
        body
    };
    let cases = [
        (
            with(
                "stagely_yaml",
                "builds:\n  api:\n    context: ./api\n    platform: linux/mips\n".into(),
            ),
            422,
            "stagely_yaml",
            "builds.api.platform",
        ),
        (
            with(
                "stagely_yaml",
                "builds:\n  api:\n    contxt: ./api\n".into(),
            ),
            422,
            "stagely_yaml",
            "contxt",
        ),
        (
            with("commit_hash", "abc".into()),
            422,
            "commit_hash",
            "40 or 64",
        ),
        (
            with("environment_id", "PR 1".into()),
            422,
            "environment_id",
            "lowercase",
        ),
        (with("trigger", "cron".into()), 422, "trigger", "cron"),
        // Issue 26: what the OCI grammar refuses is refused at submit, not by every job later.
        (
            with("environment_id", "a..b".into()),
            422,
            "environment_id",
            "OCI repository",
        ),
        (
            with("environment_id", "a-".into()),
            422,
            "environment_id",
            "OCI repository",
        ),
        (
            with("environment_id", "a.".into()),
            422,
            "environment_id",
            "OCI repository",
        ),
        (
            with("environment_id", "a___b".into()),
            422,
            "environment_id",
            "OCI repository",
        ),
        (
            with("environment_id", "x.-y".into()),
            422,
            "environment_id",
            "OCI repository",
        ),
        (
            with(
                "stagely_yaml",
                "builds:\n  api_:\n    context: ./api\n    platform: linux/amd64\n".into(),
            ),
            422,
            "stagely_yaml",
            "builds.api_: build names must be",
        ),
        // Bidi and zero-width characters in a branch name.
        (
            with("branch", "feat/\u{202e}txt.exe".into()),
            422,
            "branch",
            "U+202E",
        ),
        (
            with("branch", "main\u{200b}".into()),
            422,
            "branch",
            "U+200B",
        ),
        (
            with("config_dir", "../up".into()),
            422,
            "config_dir",
            "relative",
        ),
        (with("colour", "red".into()), 422, "colour", "unknown field"),
        (with("branch", 7.into()), 422, "branch", "invalid type"),
    ];
    for (body, status, field, needle) in cases {
        let (got, answer) = core.submit_raw(body).await.unwrap();
        assert_eq!(got, status, "{answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{message} lacks {needle}");
        if !field.is_empty() {
            assert_eq!(answer["error"]["field"], field, "{answer}");
        }
    }
    let mut missing = base.clone();
    missing.as_object_mut().unwrap().remove("repo_url");
    let (got, answer) = core.submit_raw(missing).await.unwrap();
    assert_eq!(got, 422, "a missing field is 422 naming it: {answer}");
    assert_eq!(answer["error"]["field"], "repo_url", "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("missing field `repo_url`"),
        "{answer}"
    );

    // Without stagely_yaml the core reads the repository: a missing one is named.
    let mut no_yaml = base.clone();
    no_yaml.as_object_mut().unwrap().remove("stagely_yaml");
    let (got, answer) = core.submit_raw(no_yaml).await.unwrap();
    assert_eq!(got, 422, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/repo"),
        "{answer}"
    );

    let response = core
        .client
        .get(format!("{}/api/v1/workflows/nope", core.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let response = core
        .client
        .get(format!("{}/api/v1/jobs/nope/logs", core.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    // Nothing was created by any of these.
    assert!(provider.created.lock().unwrap().is_empty());
    core.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_token_reaches_the_agent_and_nothing_else() {
    if !require("docker-registry", "--version") {
        return;
    }
    let provider = Arc::new(RecordingProvider::default());
    let mut core = TestCore::start_with_provider(provider.clone())
        .await
        .unwrap();
    let clone_token = "ghp_clone_token_that_must_not_leak_0123456789";
    let body = submit_with_clone_token(&core, clone_token, "pr-10").await;
    assert!(
        !body.to_string().contains(clone_token),
        "the API echoed the token"
    );
    let tokens = tokens(&provider, 1).await;
    let mut agent = connect(&core, Some(&tokens[0].1)).await.unwrap();
    agent.send(Ws::text(hello())).await.unwrap();
    let Message::Build(build) = next_message(&mut agent).await else {
        panic!("expected BUILD")
    };
    assert_eq!(build.context.clone_token.as_deref(), Some(clone_token));
    // The build fails (an agent that vanished would be retried on a new instance).
    send(
        &mut agent,
        Message::Status(Status {
            job_id: build.job_id.clone(),
            state: JobState::Failed,
            exit_code: Some(128),
            artifact_url: None,
            digest: None,
            error: Some("clone failed".into()),
            never_ran: Some(stagely_protocol::NeverRan::SourceUnavailable),
            seq: Some(1),
        }),
    )
    .await;
    let run_id = body["id"].as_str().unwrap().to_string();
    let view = core.wait_finished(&run_id, Duration::from_secs(20)).await;
    assert!(!serde_json::to_string(&view).unwrap().contains(clone_token));
    core.stop().await;
    for (file, bytes) in core.stored().await {
        assert!(
            !contains_bytes(&bytes, clone_token.as_bytes()),
            "{} holds the clone token",
            file.display()
        );
    }

    // Credentials inside the URL are refused, naming the field.
    let mut core = TestCore::start_with_provider(Arc::new(RecordingProvider::default()))
        .await
        .unwrap();
    let (status, body) = core
        .submit_raw(serde_json::json!({
            "repo_url": "https://user:secret@git.example.invalid/private.git",
            "commit_hash": FAKE_COMMIT,
            "branch": "main",
            "environment_id": "pr-10",
            "stagely_yaml": "builds:\n  api:\n    context: .\n    platform: linux/amd64\n",
        }))
        .await
        .unwrap();
    assert_eq!(status, 422);
    assert_eq!(body["error"]["field"], "repo_url");
    assert!(!body.to_string().contains("secret"));
    core.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_core_cuts_overlong_lines_from_a_misbehaving_agent() {
    if !require("docker-registry", "--version") {
        return;
    }
    let (provider, mut core) = hand_driven_core().await;
    let run = submit_builds(&core, &["api"]).await;
    let tokens = tokens(&provider, 1).await;
    let (job_id, token) = &tokens[0];
    let mut agent = agent_with_build(&core, token).await;
    // Agents cut lines at 16 KiB; this one sends a 900 KB line.
    let huge = format!("{}\n", "A".repeat(900 * 1024));
    for (seq, data) in [(1, huge), (2, "after\n".to_string())] {
        let log = Log {
            job_id: job_id.clone(),
            stream: LogStream::Stdout,
            data,
            seq: Some(seq),
            continued: false,
        };
        send(&mut agent, Message::Log(log)).await;
    }
    let status = Status {
        job_id: job_id.clone(),
        state: JobState::Failed,
        exit_code: Some(1),
        artifact_url: None,
        digest: None,
        error: Some("done".into()),
        never_ran: None,
        seq: Some(3),
    };
    send(&mut agent, Message::Status(status)).await;
    core.wait_finished(&run.id, Duration::from_secs(20)).await;
    let lines = core.logs(job_id).await.unwrap();
    assert_eq!(lines.len(), 2, "{}", lines.len());
    let first = &lines[0].1;
    assert!(
        first.len() <= stagely_server::agent_link::MAX_STORED_LINE_BYTES + 100,
        "stored {} bytes",
        first.len()
    );
    assert!(first.contains("line cut"), "{}", &first[first.len() - 80..]);
    assert_eq!(lines[1].1, "after\n");
    core.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_secret_split_across_two_frames_by_a_careless_agent_is_still_masked_by_the_core() {
    if !require("docker-registry", "--version") {
        return;
    }
    let (provider, mut core) = hand_driven_core().await;
    let clone_token = "ghp_split_token_that_must_not_be_stored_42";
    let body = submit_with_clone_token(&core, clone_token, "pr-11").await;
    let run_id = body["id"].as_str().unwrap().to_string();
    let tokens = tokens(&provider, 1).await;
    let (job_id, token) = &tokens[0];
    let mut agent = agent_with_build(&core, token).await;
    // A cut line (its first piece flagged as going on) whose cut falls inside the token: an
    // agent that did not hold the tail back. The pieces come in two frames, apart by more
    // than the core's flush interval.
    let (head, tail) = clone_token.split_at(20);
    let logs = |seq: u64, data: String, continued: bool| {
        Message::Logs(stagely_protocol::Logs {
            job_id: job_id.clone(),
            seq,
            lines: vec![stagely_protocol::LogLine {
                stream: LogStream::Stdout,
                data,
                continued,
            }],
        })
    };
    send(&mut agent, logs(1, format!("token={head}"), true)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    send(&mut agent, logs(2, format!("{tail} used\n"), false)).await;
    send(&mut agent, builder_failed(job_id, 1, 3)).await;
    core.wait_finished(&run_id, Duration::from_secs(20)).await;
    let lines = core.logs(job_id).await.unwrap();
    let texts: Vec<&str> = lines.iter().map(|(_, line)| line.as_str()).collect();
    assert_eq!(texts[0], "token=[REDACTED]", "{texts:?}");
    assert_eq!(texts[1], "[REDACTED] used\n", "{texts:?}");
    // The API says which stored piece goes on, out of band.
    let page: serde_json::Value = core
        .client
        .get(format!("{}/api/v1/jobs/{job_id}/logs", core.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let flags: Vec<bool> = page["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|line| line["continued"].as_bool().unwrap())
        .collect();
    assert_eq!(flags[..2], [true, false], "{page}");
    core.stop().await;
    for (file, bytes) in core.stored().await {
        for part in [head, tail] {
            assert!(
                !contains_bytes(&bytes, part.as_bytes()),
                "{} holds part of the token: {part}",
                file.display()
            );
        }
    }
}

/// Issue 26 (SECURITY.md row 80): a build that prints a line ending in the text of the old
/// in-band split marker. Cuts are flagged out of band now: the line is stored as printed,
/// as a whole line (`continued: false`), neither joined with the next nor held back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_printed_split_marker_is_only_text() {
    if !require("docker-registry", "--version") {
        return;
    }
    let (provider, mut core) = hand_driven_core().await;
    let body = submit_with_clone_token(&core, "ghp_unused_token_for_this_test_0001", "pr-12").await;
    let run_id = body["id"].as_str().unwrap().to_string();
    let tokens = tokens(&provider, 1).await;
    let (job_id, token) = &tokens[0];
    let mut agent = agent_with_build(&core, token).await;
    let fake = "feat [stagely: long line split, continued in the next line]\n";
    let line = |data: &str| stagely_protocol::LogLine {
        stream: LogStream::Stdout,
        data: data.into(),
        continued: false,
    };
    send(
        &mut agent,
        Message::Logs(stagely_protocol::Logs {
            job_id: job_id.clone(),
            seq: 1,
            lines: vec![line(fake), line("Successfully tagged\n")],
        }),
    )
    .await;
    // Stored at once (nothing held back for a continuation), while the job still runs.
    poll_until(Duration::from_secs(10), "both lines stored", || async {
        let lines = core.logs(job_id).await?;
        Ok(((lines.len() >= 2).then_some(()), format!("{lines:?}")))
    })
    .await;
    send(&mut agent, builder_failed(job_id, 1, 3)).await;
    core.wait_finished(&run_id, Duration::from_secs(20)).await;
    let page: serde_json::Value = core
        .client
        .get(format!("{}/api/v1/jobs/{job_id}/logs", core.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let lines = page["lines"].as_array().unwrap();
    assert_eq!(lines[0]["line"], fake, "{page}");
    assert_eq!(lines[0]["continued"], false, "{page}");
    assert_eq!(lines[1]["line"], "Successfully tagged\n", "{page}");
    core.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reported_digest_the_registry_does_not_hold_fails_the_job() {
    if !require("docker-registry", "--version") {
        return;
    }
    let (provider, mut core) = hand_driven_core().await;
    let run = submit_builds(&core, &["ghost", "swapped"]).await;
    let tokens = tokens(&provider, 2).await;
    let real = push_test_image(&core.registry, "stagely/pr-9", "swapped")
        .await
        .unwrap();
    let invented = format!("sha256:{}", "cd".repeat(32));
    for (job_id, token) in &tokens {
        let name = &run.jobs.iter().find(|j| &j.id == job_id).unwrap().name;
        let mut agent = agent_with_build(&core, token).await;
        // `ghost` was never pushed; `swapped` exists, but at another digest.
        let status = Status {
            job_id: job_id.clone(),
            state: JobState::Completed,
            exit_code: Some(0),
            artifact_url: Some(format!("{}/stagely/pr-9:{name}", core.registry.host)),
            digest: Some(invented.clone()),
            error: None,
            never_ran: None,
            seq: Some(1),
        };
        send(&mut agent, Message::Status(status)).await;
    }
    let view = core.wait_finished(&run.id, Duration::from_secs(30)).await;
    let by_name = |name: &str| view.jobs.iter().find(|j| j.name == name).unwrap();
    assert_eq!(view.status, "failed");
    let ghost = by_name("ghost");
    assert_eq!(ghost.status, "failed");
    let message = ghost.error_message.clone().unwrap_or_default();
    assert!(
        message.contains("could not confirm") && message.contains(&invented),
        "{message}"
    );
    let swapped = by_name("swapped");
    assert_eq!(swapped.status, "failed");
    let message = swapped.error_message.clone().unwrap_or_default();
    assert!(
        message.contains(&format!("at {real}, not at the reported {invented}")),
        "{message}"
    );
    assert!(!message.contains(&core.registry.password));
    core.stop().await;
}

fn resume_hello(job_id: &str, attempt: Option<u32>, acked_seq: u64) -> String {
    let Ok(Message::Hello(hello)) = decode(hello().as_bytes()) else {
        unreachable!("hello() is a HELLO")
    };
    encode(&Message::Hello(Hello {
        job_id: Some(job_id.into()),
        attempt,
        acked_seq: Some(acked_seq),
        ..hello
    }))
}

/// The STATUS of a build whose builder exited with `code`.
fn builder_failed(job_id: &str, code: i32, seq: u64) -> Message {
    Message::Status(Status {
        job_id: job_id.into(),
        state: JobState::Failed,
        exit_code: Some(code),
        artifact_url: None,
        digest: None,
        error: Some(format!("builder exited with status {code}")),
        never_ran: None,
        seq: Some(seq),
    })
}

fn line(job_id: &str, seq: u64) -> Message {
    Message::Log(Log {
        job_id: job_id.into(),
        stream: LogStream::Stdout,
        data: format!("line {seq}\n"),
        seq: Some(seq),
        continued: false,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dropped_agent_resumes_where_the_store_ends_and_no_line_is_lost_or_doubled() {
    if !require("docker-registry", "--version") {
        return;
    }
    let (provider, mut core) = hand_driven_core().await;
    let run = submit_builds(&core, &["api"]).await;
    let (job_id, token) = tokens(&provider, 1).await.remove(0);
    let mut agent = connect(&core, Some(&token)).await.unwrap();
    agent.send(Ws::text(hello())).await.unwrap();
    let Message::Build(build) = next_message(&mut agent).await else {
        panic!("expected BUILD")
    };
    assert_eq!(build.attempt, Some(1), "the BUILD names its attempt");
    for seq in 1..=3 {
        send(&mut agent, line(&job_id, seq)).await;
    }
    // The core acknowledges once it stored them.
    loop {
        if let Message::Ack(ack) = next_message(&mut agent).await
            && ack.seq == 3
        {
            break;
        }
    }
    // Two more go out, then the connection drops without a close frame.
    send(&mut agent, line(&job_id, 4)).await;
    send(&mut agent, line(&job_id, 5)).await;
    // (Both reach the store before the agent dials again, so RESUME must name 5.)
    poll_until(
        Duration::from_secs(10),
        "lines 4 and 5 to be stored",
        || async {
            let stored = all_log_lines(&core.client, &core.url, &job_id).await?;
            Ok((
                (stored.len() == 5).then_some(()),
                format!("{} stored", stored.len()),
            ))
        },
    )
    .await;
    drop(agent);

    // The agent dials again with the same token, naming its job, attempt and last ACK.
    let mut agent = connect(&core, Some(&token)).await.unwrap();
    agent
        .send(Ws::text(resume_hello(&job_id, Some(1), 3)))
        .await
        .unwrap();
    let Message::Resume(resume) = next_message(&mut agent).await else {
        panic!("expected RESUME")
    };
    assert_eq!(resume.job_id, job_id);
    assert_eq!(
        resume.seq, 5,
        "lines 4 and 5 reached the store before the drop"
    );
    // It resends from its last ACK anyway (it cannot know): duplicates are dropped.
    for seq in 4..=7 {
        send(&mut agent, line(&job_id, seq)).await;
    }
    send(&mut agent, builder_failed(&job_id, 1, 8)).await;
    loop {
        if let Message::Ack(ack) = next_message(&mut agent).await
            && ack.seq == 8
        {
            break;
        }
    }
    let view = core.wait_finished(&run.id, Duration::from_secs(20)).await;
    assert_eq!(view.jobs[0].status, "failed");
    assert_eq!(view.jobs[0].exit_code, Some(1));
    assert_eq!(
        view.jobs[0].attempts.len(),
        1,
        "the build was never restarted"
    );
    let stored = all_log_lines(&core.client, &core.url, &job_id)
        .await
        .unwrap();
    let seqs: Vec<i64> = stored.iter().map(|line| line.seq).collect();
    let lines: Vec<&str> = stored.iter().map(|line| line.line.as_str()).collect();
    assert_eq!(seqs, (1..=7).collect::<Vec<i64>>());
    let expected: Vec<String> = (1..=7).map(|seq| format!("line {seq}\n")).collect();
    assert_eq!(lines, expected);
    core.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_that_does_not_come_back_within_the_grace_is_lost_and_retried() {
    if !require("docker-registry", "--version") {
        return;
    }
    let provider = Arc::new(RecordingProvider::default());
    let mut core =
        TestCore::start_with_provider_on(provider.clone(), Backend::from_env(), |file| {
            file.scheduler.agent_reconnect_grace_secs = Some(2);
            file.scheduler.retry_backoff_secs = Some(1);
        })
        .await
        .unwrap();
    let run = submit_builds(&core, &["api"]).await;
    let (job_id, token) = tokens(&provider, 1).await.remove(0);
    let mut agent = agent_with_build(&core, &token).await;
    send(&mut agent, line(&job_id, 1)).await;
    drop(agent);
    // Within the grace the attempt lives; after it, it is lost and a second one starts.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(core.run(&run.id).await.unwrap().jobs[0].status, "running");
    poll_until(Duration::from_secs(20), "a second attempt", || async {
        let tokens = provider.tokens();
        Ok((
            (tokens.len() == 2).then_some(()),
            format!("{} instance(s)", tokens.len()),
        ))
    })
    .await;
    let view = core.run(&run.id).await.unwrap();
    let first = &view.jobs[0].attempts[0];
    assert_eq!(
        first.outcome.as_deref(),
        Some("infrastructure"),
        "{first:?}"
    );
    assert!(
        first
            .message
            .as_deref()
            .unwrap_or("")
            .contains("did not reconnect within 2s"),
        "{first:?}"
    );
    // The old token died with its attempt.
    refused_with(connect(&core, Some(&token)).await, 401);
    core.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_offering_protobuf_speaks_binary_frames_and_json_stays_the_fallback() {
    use stagely_protocol::{LogLine, Logs, encode_proto};
    if !require("docker-registry", "--version") {
        return;
    }
    let (provider, mut core) = hand_driven_core().await;
    let run = submit_builds(&core, &["api", "web"]).await;
    let tokens = tokens(&provider, 2).await;

    // The first agent offers protobuf first: the core picks it.
    let (job_id, token) = &tokens[0];
    let url = format!(
        "{}/api/v1/agent/connect",
        core.url.replace("http://", "ws://")
    );
    let mut request = url.as_str().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "stagely.v1.proto, stagely.v1.json".parse().unwrap(),
    );
    let (mut agent, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        "stagely.v1.proto"
    );
    let Message::Hello(hello) = decode(hello().as_bytes()).unwrap() else {
        unreachable!()
    };
    agent
        .send(Ws::binary(encode_proto(&Message::Hello(hello))))
        .await
        .unwrap();
    let Message::Build(build) = next_binary(&mut agent).await else {
        panic!("expected BUILD")
    };
    assert_eq!(&build.job_id, job_id);
    let lines = Message::Logs(Logs {
        job_id: job_id.clone(),
        seq: 1,
        lines: vec![
            LogLine {
                stream: LogStream::Stdout,
                data: "one\n".into(),
                continued: false,
            },
            LogLine {
                stream: LogStream::Stderr,
                data: "two\n".into(),
                continued: false,
            },
        ],
    });
    agent.send(Ws::binary(encode_proto(&lines))).await.unwrap();
    // A careless agent's frame holding the registry password: the core scans a binary frame
    // once and masks the lines of one that holds a secret (the frame before held none).
    let password = build
        .registry_auth
        .as_ref()
        .map(|auth| auth.password.clone())
        .expect("the build carries registry credentials");
    let leaky = Message::Logs(Logs {
        job_id: job_id.clone(),
        seq: 3,
        lines: vec![
            LogLine {
                stream: LogStream::Stdout,
                data: "clean\n".into(),
                continued: false,
            },
            LogLine {
                stream: LogStream::Stdout,
                data: format!("login {password} ok\n"),
                continued: false,
            },
        ],
    });
    agent.send(Ws::binary(encode_proto(&leaky))).await.unwrap();
    let status = builder_failed(job_id, 3, 5);
    agent.send(Ws::binary(encode_proto(&status))).await.unwrap();
    loop {
        if let Message::Ack(ack) = next_binary(&mut agent).await
            && ack.seq == 5
        {
            break;
        }
    }

    // The second offers nothing: JSON text frames, and a binary frame there is a violation
    // named as such.
    let mut json_agent = agent_with_build(&core, &tokens[1].1).await;
    json_agent.send(Ws::binary(vec![1, 2, 3])).await.unwrap();
    let (code, reason) = close_reason(&mut json_agent).await;
    assert_eq!(code, 1008);
    assert!(reason.contains("binary frame"), "{reason}");

    let view = core.wait_finished(&run.id, Duration::from_secs(20)).await;
    let api = view.jobs.iter().find(|j| &j.id == job_id).unwrap();
    assert_eq!(api.exit_code, Some(3));
    let stored = all_log_lines(&core.client, &core.url, job_id)
        .await
        .unwrap();
    let lines: Vec<(i64, &str, &str)> = stored
        .iter()
        .map(|l| (l.seq, l.stream.as_str(), l.line.as_str()))
        .collect();
    assert_eq!(
        lines,
        vec![
            (1, "stdout", "one\n"),
            (2, "stderr", "two\n"),
            (3, "stdout", "clean\n"),
            (4, "stdout", "login [REDACTED] ok\n"),
        ]
    );
    core.stop().await;
}

/// The next frame of a protobuf connection (heartbeats skipped).
async fn next_binary(agent: &mut Socket) -> Message {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), agent.next()).await {
            Ok(Some(Ok(Ws::Binary(bytes)))) => {
                match stagely_protocol::decode_proto(&bytes).unwrap() {
                    Message::Heartbeat(_) => continue,
                    message => return message,
                }
            }
            Ok(Some(Ok(Ws::Text(text)))) => {
                panic!("a text frame on a protobuf connection: {text}")
            }
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected a frame, got {other:?}"),
        }
    }
}
