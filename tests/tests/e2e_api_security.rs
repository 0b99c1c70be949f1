//! The API as an attacker meets it: every `/api/v1` route but the agent endpoint needs a
//! token; repositories the core must not touch are refused before git runs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use stagely_tests::*;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn submit_body(repo_url: &str) -> serde_json::Value {
    serde_json::json!({
        "repo_url": repo_url,
        "commit_hash": COMMIT,
        "branch": "main",
        "environment_id": "pr-1",
        "stagely_yaml": "builds:\n  a:\n    context: .\n    platform: linux/amd64\n",
    })
}

#[tokio::test]
async fn every_api_route_needs_a_token_and_wrong_ones_are_counted() {
    let captured = LogCapture::install();
    let provider = Arc::new(RecordingProvider::default());
    let mut core = TestCore::start_with_provider(provider).await.unwrap();
    let run = core
        .submit_raw(submit_body("/srv/some/repo"))
        .await
        .unwrap();
    assert_eq!(run.0, 201, "{}", run.1);
    let run_id = run.1["id"].as_str().unwrap().to_string();
    let job_id = run.1["jobs"][0]["id"].as_str().unwrap().to_string();

    let anonymous = reqwest::Client::new();
    let wrong = client_with_token("stga_not-the-right-token-at-all");
    let routes = [
        ("POST", "/api/v1/workflows".to_string()),
        ("GET", format!("/api/v1/workflows/{run_id}")),
        ("GET", format!("/api/v1/jobs/{job_id}/logs")),
        ("GET", format!("/api/v1/jobs/{job_id}/logs?format=text")),
        ("GET", format!("/api/v1/jobs/{job_id}/logs/stream")),
        ("GET", format!("/api/v1/workflows/{run_id}/events")),
        ("POST", format!("/api/v1/workflows/{run_id}/cancel")),
        ("POST", "/api/v1/environments/pr-1/rebuild".to_string()),
        ("GET", "/api/v1/queue".to_string()),
    ];
    let auth = core.core.as_ref().unwrap().auth.clone();
    let refused_before = auth.refused();
    for (client, who) in [(&anonymous, "no token"), (&wrong, "a wrong token")] {
        for (method, path) in &routes {
            let url = format!("{}{path}", core.url);
            let request = match *method {
                "POST" => client.post(&url).json(&submit_body("/srv/some/repo")),
                _ => client.get(&url),
            };
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 401, "{method} {path} with {who}");
            assert_eq!(
                response
                    .headers()
                    .get("www-authenticate")
                    .and_then(|v| v.to_str().ok()),
                Some("Bearer")
            );
        }
    }
    assert_eq!(auth.refused() - refused_before, 2 * routes.len() as u64);
    // A bare token without the scheme is not a bearer token either.
    let response = anonymous
        .get(format!("{}/api/v1/workflows/{run_id}", core.url))
        .header("authorization", core.api_token.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    // The right token passes; /healthz stays open.
    for (_, path) in routes.iter().filter(|(method, _)| *method == "GET") {
        let response = core
            .client
            .get(format!("{}{path}", core.url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    let health = anonymous
        .get(format!("{}/healthz", core.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    core.stop().await;
    // Refusals are logged, tokens never.
    let text = captured.text();
    assert!(text.contains("API request refused"), "{text}");
    assert!(!text.contains("stga_not-the-right-token-at-all"));
    assert!(!text.contains(&core.api_token));
}

#[tokio::test]
async fn tokens_from_the_config_file_are_hashes_and_work() {
    let token = stagely_core::cli::new_api_token();
    let hash = hex::encode(stagely_server::config::hash_token(&token));
    let mut core = TestCore::start_configured(|file| {
        file.api.tokens.insert("ci".into(), hash.clone().into());
    })
    .await
    .unwrap();
    let response = client_with_token(&token)
        .get(format!("{}/api/v1/workflows/none", core.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404, "the configured token is accepted");
    core.stop().await;

    // `stagely token hash` prints what goes in the file.
    let mut child = std::process::Command::new(agent_binary().with_file_name("stagely"))
        .args(["token", "hash"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    writeln!(child.stdin.take().unwrap(), "{token}").unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), hash);
}

#[test]
fn serve_refuses_to_listen_off_loopback_without_a_token() {
    let data = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(agent_binary().with_file_name("stagely"))
        .args(["serve", "--listen", "0.0.0.0:0"])
        .arg("--data-dir")
        .arg(data.path())
        .env_remove("STAGELY_API_TOKEN")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("api.tokens") && stderr.contains("0.0.0.0"),
        "{stderr}"
    );
}

#[tokio::test]
async fn repositories_the_core_must_not_touch_are_refused_before_git_runs() {
    // The default of `serve`: no local repositories.
    let mut core = TestCore::start_configured(|file| file.allow_local_repos = Some(false))
        .await
        .unwrap();
    let repo = TestRepo::with_files(&[("secret.txt", b"host file\n")]).unwrap();
    let cases = [
        (repo.url(), "allow_local_repos"),
        (format!("file://{}", repo.url()), "allow_local_repos"),
        ("fd::0".to_string(), "transport"),
        ("ext::sh".to_string(), "transport"),
        ("http://192.0.2.1/r.git".to_string(), "https"),
        ("u:p@192.0.2.1:r.git".to_string(), "credentials"),
        ("https://u:p@192.0.2.1/r.git".to_string(), "credentials"),
        (
            "https://192.0.2.1/r.git?access_token=abc".to_string(),
            "access_token",
        ),
        ("-u/x".to_string(), "start with `-`"),
    ];
    for (url, expected) in cases {
        let mut body = submit_body(&url);
        // Without stagely_yaml the core would read it with git: refused before that.
        body.as_object_mut().unwrap().remove("stagely_yaml");
        let (status, answer) = core.submit_raw(body).await.unwrap();
        assert_eq!(status, 422, "{url}: {answer}");
        assert_eq!(answer["error"]["field"], "repo_url", "{url}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(expected), "{url}: {message}");
        // The URL may hold a secret: the answer never repeats it.
        assert!(!message.contains(&url), "{message}");
    }
    core.stop().await;
}

#[tokio::test]
async fn stagely_serve_refuses_local_repositories_by_default() {
    if !require("docker-registry", "--version") {
        return;
    }
    let registry = stagely_core::registry::LocalRegistry::start()
        .await
        .unwrap();
    let data = tempfile::tempdir().unwrap();
    // An empty stagely.toml: serve's defaults.
    let mut core = ServeProcess::start_with_config(data.path(), &registry, "").await;
    let repo = TestRepo::with_files(&[("secret.txt", b"host file\n")]).unwrap();
    let response = client_with_token(&core.api_token)
        .post(format!("{}/api/v1/workflows", core.url))
        .json(&submit_body(&repo.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    let answer: serde_json::Value = response.json().await.unwrap();
    assert_eq!(answer["error"]["field"], "repo_url");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("allow_local_repos"),
        "{answer}"
    );
    assert!(core.terminate().await.success());
}

/// Issue 26: an API connection's life is bounded (`api.max_connection_secs`); an agent's
/// is not (SECURITY.md row 70).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_connection_lives_at_most_max_connection_secs_and_an_agents_outlives_it() {
    if !require_build_peers() {
        return;
    }
    let capture = LogCapture::install();
    let mut core = TestCore::start_configured(|file| {
        file.api.max_connection_secs = Some(2);
    })
    .await
    .unwrap();
    // The build takes ~20 s: longer than an API connection may live (2 s) and its drain
    // (10 s: a request in flight at the end of life may finish, an endless one is cut).
    let busybox = busybox("amd64").unwrap();
    let repo = TestRepo::with_files(&[
        (
            "stagely.yaml",
            b"builds:\n  app:\n    context: ./app\n    platform: linux/amd64\n",
        ),
        (
            "app/Dockerfile",
            b"FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"for i in $(/bin/busybox seq 1 200); do echo flood-line-$i; /bin/busybox sleep 0.1; done\"]\n",
        ),
        ("app/busybox", &busybox),
    ])
    .unwrap();
    let run = core.submit(&repo, None, "pr-life").await.unwrap();
    let job_id = run.jobs[0].id.clone();
    let started = Instant::now();
    let mut stream = client_with_token(&core.api_token)
        .get(format!("{}/api/v1/jobs/{job_id}/logs/stream", core.url))
        .send()
        .await
        .unwrap();
    // The stream is cut at its connection's end of life, before the job ends.
    let mut body = String::new();
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match stream.chunk().await {
                Ok(Some(chunk)) => body.push_str(&String::from_utf8_lossy(&chunk)),
                Ok(None) | Err(_) => return,
            }
        }
    })
    .await;
    let lived = started.elapsed();
    assert!(
        ended.is_ok(),
        "the stream outlived its connection's lifetime"
    );
    assert!(
        !body.contains("event: end"),
        "the job ended first: {lived:?}\n{body}"
    );
    assert!(
        lived >= Duration::from_secs(2) && lived < Duration::from_secs(15),
        "{lived:?}"
    );
    // The agent's connection was not cut: one connection carried the whole build.
    let run = core.wait_finished(&run.id, Duration::from_secs(240)).await;
    assert_eq!(run.status, "completed", "{:?}", run.jobs[0].error_message);
    let logs: String = core
        .logs(&job_id)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, line)| line)
        .collect();
    assert!(logs.contains("flood-line-200\n"), "{logs}");
    let connections = capture
        .text()
        .lines()
        .filter(|line| line.contains("agent authenticated") && line.contains(&job_id))
        .count();
    assert_eq!(connections, 1, "the agent dialled {connections} times");
    core.stop().await;
}

/// Issue 26 (SECURITY.md row 74): token roles. `read` tokens only read, `operate` tokens
/// also submit, cancel and rebuild, the plain `name = "<sha256>"` form is `admin`; a cancel,
/// a submission and a rebuild record the token that asked (`cancel_reason: user:<name>`,
/// `submitted_by`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_roles_limit_what_a_token_may_do_and_a_cancel_names_its_token() {
    let (reader, operator, admin) = (
        stagely_core::cli::new_api_token(),
        stagely_core::cli::new_api_token(),
        stagely_core::cli::new_api_token(),
    );
    let hash = |token: &str| hex::encode(stagely_server::config::hash_token(token));
    let text = format!(
        "[api.tokens]\nreader = {{ sha256 = \"{}\", role = \"read\" }}\nops = {{ sha256 = \"{}\", role = \"operate\" }}\nold = \"{}\"\n",
        hash(&reader),
        hash(&operator),
        hash(&admin)
    );
    let parsed: stagely_server::config::FileConfig = toml::from_str(&text).unwrap();
    let mut core = TestCore::start_with_provider_on(
        Arc::new(RecordingProvider::default()),
        Backend::from_env(),
        move |file| file.api.tokens.extend(parsed.api.tokens),
    )
    .await
    .unwrap();
    let body = serde_json::json!({
        "repo_url": "/srv/repo",
        "commit_hash": COMMIT,
        "branch": "main",
        "environment_id": "pr-roles",
        "stagely_yaml": "builds:\n  a:\n    context: .\n    platform: linux/amd64\n",
    });
    let submit = |token: &str| {
        client_with_token(token)
            .post(format!("{}/api/v1/workflows", core.url))
            .json(&body)
            .send()
    };
    // A reader reads, and is refused a submit with 403 naming the role needed.
    let queue = client_with_token(&reader)
        .get(format!("{}/api/v1/queue", core.url))
        .send()
        .await
        .unwrap();
    assert_eq!(queue.status(), 200);
    let refused = submit(&reader).await.unwrap();
    assert_eq!(refused.status(), 403);
    let answer: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(answer["error"]["code"], "forbidden");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("`operate` role") && message.contains("`reader` has `read`"),
        "{message}"
    );
    // An operator submits and cancels; the run records who cancelled it.
    let created = submit(&operator).await.unwrap();
    assert_eq!(created.status(), 201);
    let run: serde_json::Value = created.json().await.unwrap();
    let id = run["id"].as_str().unwrap().to_string();
    let cancel = |token: &str| {
        client_with_token(token)
            .post(format!("{}/api/v1/workflows/{id}/cancel", core.url))
            .send()
    };
    assert_eq!(cancel(&reader).await.unwrap().status(), 403);
    assert_eq!(cancel(&operator).await.unwrap().status(), 202);
    let view: serde_json::Value = client_with_token(&reader)
        .get(format!("{}/api/v1/workflows/{id}", core.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(view["cancel_reason"], "user:ops", "{view}");
    assert_eq!(view["submitted_by"], "ops", "{view}");
    // The plain form is admin: it may do everything an operator may. A rebuild records
    // its token too.
    let created = submit(&admin).await.unwrap();
    assert_eq!(created.status(), 201);
    let run: serde_json::Value = created.json().await.unwrap();
    assert_eq!(run["submitted_by"], "old", "{run}");
    let rebuild = |token: &str| {
        client_with_token(token)
            .post(format!("{}/api/v1/environments/pr-roles/rebuild", core.url))
            .send()
    };
    assert_eq!(rebuild(&reader).await.unwrap().status(), 403);
    let rebuilt = rebuild(&operator).await.unwrap();
    assert_eq!(rebuilt.status(), 201);
    let rebuilt: serde_json::Value = rebuilt.json().await.unwrap();
    assert_eq!(rebuilt["submitted_by"], "ops", "{rebuilt}");
    core.stop().await;
}
