//! Every route's client errors, called through the core's own router (`app(state)` of a
//! running core, its runner and store real) with `tower::ServiceExt::oneshot`: no socket, no
//! HTTP client. Each answer is checked for its status, its `error.code` and, for a bad field,
//! the `error.field` it names. The connection-level limits (gate, body timeouts, caps) are the
//! e2e tests' (e2e_api_security, e2e_limits, e2e_flood).

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use stagely_api::ErrorBody;
use stagely_tests::*;
use tower::ServiceExt;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const YAML: &str = "builds:\n  a:\n    context: .\n    platform: linux/amd64\n";

/// A core whose instances never boot (its jobs stay queued or provisioning), with three
/// tokens: `reader` (read), `ops` (operate) and the harness's own (admin).
struct Handlers {
    core: TestCore,
    reader: String,
    ops: String,
}

impl Handlers {
    async fn start() -> Handlers {
        let (reader, ops) = (
            stagely_core::cli::new_api_token(),
            stagely_core::cli::new_api_token(),
        );
        let hash = |token: &str| hex::encode(stagely_server::config::hash_token(token));
        let text = format!(
            "[api.tokens]\nreader = {{ sha256 = \"{}\", role = \"read\" }}\nops = {{ sha256 = \"{}\", role = \"operate\" }}\n",
            hash(&reader),
            hash(&ops),
        );
        let parsed: stagely_server::config::FileConfig = toml::from_str(&text).unwrap();
        let core = TestCore::start_with_provider_on(
            Arc::new(RecordingProvider::default()),
            Backend::from_env(),
            move |file| file.api.tokens.extend(parsed.api.tokens),
        )
        .await
        .expect("core starts");
        Handlers { core, reader, ops }
    }

    fn admin(&self) -> &str {
        &self.core.api_token
    }

    /// One request through the router: its status, headers and (for errors) the error body.
    async fn call(&self, request: Request<Body>) -> Answer {
        let router = self.core.core.as_ref().expect("running").router();
        let response = router.oneshot(request).await.expect("infallible");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("a body");
        Answer {
            status,
            headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    async fn get(&self, uri: &str, token: Option<&str>) -> Answer {
        self.call(request(Method::GET, uri, token, None)).await
    }

    async fn post_json(&self, uri: &str, token: Option<&str>, json: serde_json::Value) -> Answer {
        self.call(request(
            Method::POST,
            uri,
            token,
            Some(("application/json", json.to_string().into_bytes())),
        ))
        .await
    }

    async fn submit(&self, json: serde_json::Value) -> Answer {
        let token = self.admin().to_string();
        self.post_json("/api/v1/workflows", Some(&token), json)
            .await
    }
}

fn request(
    method: Method,
    uri: &str,
    token: Option<&str>,
    body: Option<(&str, Vec<u8>)>,
) -> Request<Body> {
    let mut builder = Request::builder().method(method).uri(uri);
    if let Some(token) = token {
        builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    match body {
        Some((content_type, bytes)) => builder
            .header(header::CONTENT_TYPE, content_type)
            .header(header::CONTENT_LENGTH, bytes.len())
            .body(Body::from(bytes)),
        None => builder.body(Body::empty()),
    }
    .expect("a request")
}

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: String,
}

impl Answer {
    /// Asserts an error answer: its status and code, and the field it names (if any).
    #[track_caller]
    fn is_error(&self, status: StatusCode, code: &str, field: Option<&str>) -> String {
        assert_eq!(self.status, status, "{}", self.body);
        let body: ErrorBody = serde_json::from_str(&self.body)
            .unwrap_or_else(|error| panic!("not an error body ({error}): {}", self.body));
        assert_eq!(body.error.code, code, "{}", self.body);
        assert_eq!(body.error.field.as_deref(), field, "{}", self.body);
        assert!(!body.error.message.is_empty());
        body.error.message
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|_| panic!("not JSON: {}", self.body))
    }
}

fn submit_body() -> serde_json::Value {
    serde_json::json!({
        "repo_url": "/srv/repo",
        "commit_hash": COMMIT,
        "branch": "main",
        "environment_id": "pr-handlers",
        "stagely_yaml": YAML,
    })
}

/// `submit_body()` with `key` set to `value` (`null` removes it).
fn with(key: &str, value: serde_json::Value) -> serde_json::Value {
    let mut body = submit_body();
    let object = body.as_object_mut().expect("an object");
    if value.is_null() {
        object.remove(key);
    } else {
        object.insert(key.into(), value);
    }
    body
}

const ROUTES: &[(&str, &str)] = &[
    ("POST", "/api/v1/workflows"),
    (
        "GET",
        "/api/v1/workflows/00000000-0000-0000-0000-000000000000",
    ),
    (
        "POST",
        "/api/v1/workflows/00000000-0000-0000-0000-000000000000/cancel",
    ),
    (
        "GET",
        "/api/v1/workflows/00000000-0000-0000-0000-000000000000/events",
    ),
    ("POST", "/api/v1/environments/pr-1/rebuild"),
    ("GET", "/api/v1/queue"),
    (
        "GET",
        "/api/v1/jobs/00000000-0000-0000-0000-000000000000/logs",
    ),
    (
        "GET",
        "/api/v1/jobs/00000000-0000-0000-0000-000000000000/logs/stream",
    ),
];

#[tokio::test]
async fn every_api_route_answers_401_without_a_token_or_with_a_wrong_one() {
    let mut h = Handlers::start().await;
    for (method, uri) in ROUTES {
        let method: Method = method.parse().unwrap();
        for token in [None, Some("not-a-token")] {
            let answer = h.call(request(method.clone(), uri, token, None)).await;
            answer.is_error(StatusCode::UNAUTHORIZED, "unauthorized", None);
            assert_eq!(
                answer.headers.get(header::WWW_AUTHENTICATE).unwrap(),
                "Bearer",
                "{method} {uri}"
            );
        }
    }
    // The agent endpoint checks its own (per-attempt) tokens: none is 401 before anything
    // else; a request that is no WebSocket upgrade is refused before a token is looked at (so
    // it cannot spend one). Wrong and spent tokens on real upgrades: e2e_agent_endpoint.
    h.get("/api/v1/agent/connect", None).await.is_error(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        None,
    );
    let plain = h.get("/api/v1/agent/connect", Some(h.admin())).await;
    assert_eq!(plain.status, StatusCode::BAD_REQUEST, "{}", plain.body);
    assert!(plain.body.contains("upgrade"), "{}", plain.body);
    // `/healthz` is open and says nothing but "ok".
    let health = h.get("/healthz", None).await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(health.json(), serde_json::json!({"status": "ok"}));
    h.core.stop().await;
}

#[tokio::test]
async fn a_read_token_is_refused_every_state_changing_route_with_403() {
    let mut h = Handlers::start().await;
    for (method, uri) in ROUTES.iter().filter(|(method, _)| *method == "POST") {
        let answer = h
            .call(request(
                method.parse().unwrap(),
                uri,
                Some(&h.reader),
                Some(("application/json", submit_body().to_string().into_bytes())),
            ))
            .await;
        let message = answer.is_error(StatusCode::FORBIDDEN, "forbidden", None);
        assert!(message.contains("`operate` role"), "{message}");
        assert!(message.contains("`reader`"), "{message}");
    }
    // It reads.
    let queue = h.get("/api/v1/queue", Some(&h.reader)).await;
    assert_eq!(queue.status, StatusCode::OK, "{}", queue.body);
    assert_eq!(queue.json(), serde_json::json!({"jobs": []}));
    h.core.stop().await;
}

#[tokio::test]
async fn a_submission_s_body_is_refused_precisely() {
    let mut h = Handlers::start().await;
    let admin = h.admin().to_string();
    // Not declared JSON: 415.
    let answer = h
        .call(request(
            Method::POST,
            "/api/v1/workflows",
            Some(&admin),
            Some(("text/plain", submit_body().to_string().into_bytes())),
        ))
        .await;
    answer.is_error(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        None,
    );
    // Not JSON syntax: 400.
    let answer = h
        .call(request(
            Method::POST,
            "/api/v1/workflows",
            Some(&admin),
            Some(("application/json", b"{\"repo_url\": ".to_vec())),
        ))
        .await;
    answer.is_error(StatusCode::BAD_REQUEST, "bad_request", None);
    // Larger than the body limit: 413, and the connection is closed after it.
    let huge = vec![b' '; stagely_api::MAX_SUBMIT_BODY_BYTES + 1];
    let answer = h
        .call(request(
            Method::POST,
            "/api/v1/workflows",
            Some(&admin),
            Some(("application/json", huge)),
        ))
        .await;
    answer.is_error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", None);
    assert_eq!(answer.headers.get(header::CONNECTION).unwrap(), "close");

    // Each wrong field: 422 naming it.
    let cases: Vec<(serde_json::Value, &str, &str)> = vec![
        (
            with("repo_url", serde_json::Value::Null),
            "repo_url",
            "missing field",
        ),
        (with("surprise", true.into()), "surprise", "unknown field"),
        (with("branch", 7.into()), "branch", "invalid type"),
        (
            with("repo_url", "ext::sh -c touch% /tmp/pwned".into()),
            "repo_url",
            "",
        ),
        (
            with("commit_hash", "abc123".into()),
            "commit_hash",
            "full commit id",
        ),
        (
            with("branch", "feat/\u{202e}txt.exe".into()),
            "branch",
            "U+202E",
        ),
        (with("branch", "a..b".into()), "branch", ""),
        (with("environment_id", "PR 1".into()), "environment_id", ""),
        (with("trigger", "push".into()), "trigger", "pr_opened"),
        (
            with("config_dir", "../outside".into()),
            "config_dir",
            "inside the repository",
        ),
        (with("clone_token", "".into()), "clone_token", "printable"),
        (
            with("clone_token", "s3cr3t-value\n".into()),
            "clone_token",
            "printable",
        ),
        (
            with(
                "stagely_yaml",
                "x".repeat(stagely_api::MAX_CONFIG_BYTES + 1).into(),
            ),
            "stagely_yaml",
            "at most",
        ),
        (with("stagely_yaml", "builds: [".into()), "stagely_yaml", ""),
        (
            with(
                "stagely_yaml",
                "builds:\n  a:\n    context: .\n    platform: linux/s390x\n".into(),
            ),
            "stagely_yaml",
            "",
        ),
        (
            with("secrets", serde_json::json!({"NPM_TOKEN": "s3cr3t-value"})),
            "secrets.NPM_TOKEN",
            "secret_build_args",
        ),
        (
            with("secrets", serde_json::json!({"bad-name": "x"})),
            "secrets",
            "letters, digits",
        ),
    ];
    for (body, field, says) in cases {
        let answer = h.submit(body.clone()).await;
        let message = answer.is_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some(field),
        );
        assert!(message.contains(says), "{field}: {message}");
        // A refused secret or token is never repeated back.
        assert!(!answer.body.contains("s3cr3t-value"), "{}", answer.body);
    }
    // A secret build argument without a value anywhere: 422 naming `secrets`.
    let needs_secret = with(
        "stagely_yaml",
        "builds:\n  a:\n    context: .\n    platform: linux/amd64\n    secret_build_args: [NPM_TOKEN]\n"
            .into(),
    );
    let message = h.submit(needs_secret).await.is_error(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_field",
        Some("secrets"),
    );
    assert!(message.contains("NPM_TOKEN"), "{message}");
    // No stagely.yaml sent and none readable at the commit: 422 `unprocessable`.
    let unreadable = with("stagely_yaml", serde_json::Value::Null);
    h.submit(unreadable)
        .await
        .is_error(StatusCode::UNPROCESSABLE_ENTITY, "unprocessable", None);
    // Nothing was stored.
    let queue = h.get("/api/v1/queue", Some(&admin)).await;
    assert_eq!(queue.json(), serde_json::json!({"jobs": []}));
    h.core.stop().await;
}

#[tokio::test]
async fn unknown_runs_jobs_and_environments_are_404_and_a_finished_run_s_cancel_409() {
    let mut h = Handlers::start().await;
    let admin = h.admin().to_string();
    let nobody = "00000000-0000-0000-0000-000000000000";
    for uri in [
        format!("/api/v1/workflows/{nobody}"),
        format!("/api/v1/workflows/{nobody}/events"),
        format!("/api/v1/jobs/{nobody}/logs"),
        format!("/api/v1/jobs/{nobody}/logs/stream"),
    ] {
        let message =
            h.get(&uri, Some(&admin))
                .await
                .is_error(StatusCode::NOT_FOUND, "not_found", None);
        assert!(message.contains(nobody), "{uri}: {message}");
    }
    h.post_json(
        &format!("/api/v1/workflows/{nobody}/cancel"),
        Some(&admin),
        serde_json::json!({}),
    )
    .await
    .is_error(StatusCode::NOT_FOUND, "not_found", None);
    let message = h
        .call(request(
            Method::POST,
            "/api/v1/environments/pr-nothing/rebuild",
            Some(&admin),
            None,
        ))
        .await
        .is_error(StatusCode::NOT_FOUND, "not_found", None);
    assert!(message.contains("environment `pr-nothing`"), "{message}");

    // A run, cancelled by an operator: 202, then 409 once it is final.
    let run = h.submit(submit_body()).await;
    assert_eq!(run.status, StatusCode::CREATED, "{}", run.body);
    let run_id = run.json()["id"].as_str().unwrap().to_string();
    let job_id = run.json()["jobs"][0]["id"].as_str().unwrap().to_string();
    let ops = h.ops.clone();
    let cancel = format!("/api/v1/workflows/{run_id}/cancel");
    let answer = h
        .post_json(&cancel, Some(&ops), serde_json::json!({}))
        .await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.body);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let view = h
            .get(&format!("/api/v1/workflows/{run_id}"), Some(&admin))
            .await;
        if view.json()["status"] == "cancelled" {
            assert_eq!(view.json()["cancel_reason"], "user:ops");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never cancelled: {}",
            view.body
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let message = h
        .post_json(&cancel, Some(&ops), serde_json::json!({}))
        .await
        .is_error(StatusCode::CONFLICT, "conflict", None);
    assert!(message.contains(&run_id), "{message}");

    // The log routes' queries, on a job that exists.
    for (query, field) in [
        ("?after=-1", Some("after")),
        ("?format=xml", Some("format")),
        ("?limit=0", Some("limit")),
    ] {
        h.get(&format!("/api/v1/jobs/{job_id}/logs{query}"), Some(&admin))
            .await
            .is_error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", field);
    }
    h.get(
        &format!("/api/v1/jobs/{job_id}/logs?colour=red"),
        Some(&admin),
    )
    .await
    .is_error(StatusCode::BAD_REQUEST, "bad_request", None);
    h.get(
        &format!("/api/v1/jobs/{job_id}/logs/stream?after=-3"),
        Some(&admin),
    )
    .await
    .is_error(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_field",
        Some("after"),
    );
    let bad_cursor = h
        .call({
            let mut request = request(
                Method::GET,
                &format!("/api/v1/jobs/{job_id}/logs/stream"),
                Some(&admin),
                None,
            );
            request
                .headers_mut()
                .insert("last-event-id", "yesterday".parse().unwrap());
            request
        })
        .await;
    bad_cursor.is_error(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_field",
        Some("Last-Event-ID"),
    );

    // A rebuild's optional body is checked like a submission's.
    let rebuild = "/api/v1/environments/pr-handlers/rebuild";
    h.post_json(rebuild, Some(&admin), serde_json::json!({"surprise": 1}))
        .await
        .is_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("surprise"),
        );
    h.call(request(
        Method::POST,
        rebuild,
        Some(&admin),
        Some(("text/plain", b"{}".to_vec())),
    ))
    .await
    .is_error(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        None,
    );
    let again = h
        .call(request(Method::POST, rebuild, Some(&admin), None))
        .await;
    assert_eq!(again.status, StatusCode::CREATED, "{}", again.body);
    assert_ne!(again.json()["id"], run_id);
    h.core.stop().await;
}
