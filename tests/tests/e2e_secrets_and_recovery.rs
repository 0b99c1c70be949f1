//! Promises 2 and 3 with real parts: the registry password never reaches a command line,
//! a log line, the database or an error message; and a core that crashes mid-build leaks no
//! instance: the next core terminates it.

use std::time::Duration;

use stagely_tests::*;

fn cmdlines() -> Vec<(i32, String)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(bytes) = std::fs::read(entry.path().join("cmdline")) {
            out.push((pid, String::from_utf8_lossy(&bytes).replace('\0', " ")));
        }
    }
    out
}

fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_symlink() {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

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
    let files = files_under(core.data.path());
    assert!(files.iter().any(|f| f.ends_with("stagely.db")));
    assert!(files.iter().any(|f| f.ends_with("agent.log")));
    for file in files {
        let bytes = std::fs::read(&file).unwrap();
        assert!(
            !contains(&bytes, password.as_bytes()),
            "{} contains the password",
            file.display()
        );
    }
    assert!(
        !captured.text().contains(&password),
        "the core logged the password"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_core_killed_mid_build_leaks_no_instance() {
    if !require_build_peers() {
        return;
    }
    let busybox = busybox("amd64").unwrap();
    let repo = TestRepo::with_files(&[
        ("stagely.yaml", b"builds:\n  forever:\n    context: .\n    platform: linux/amd64\n"),
        ("Dockerfile", b"FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"echo started; /bin/busybox sleep 600\"]\n"),
        ("busybox", &busybox),
    ])
    .unwrap();
    let registry = stagely_core::registry::LocalRegistry::start()
        .await
        .unwrap();
    let data = tempfile::tempdir().unwrap();
    let stagely = agent_binary().with_file_name("stagely");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let serve = || {
        std::process::Command::new(&stagely)
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--registry",
                &registry.host,
            ])
            .arg("--data-dir")
            .arg(data.path())
            .env("STAGELY_REGISTRY_USERNAME", &registry.username)
            .env("STAGELY_REGISTRY_PASSWORD", &registry.password)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let client = reqwest::Client::new();
    let healthy = || async {
        poll_until(Duration::from_secs(30), "the core to serve", || async {
            let ok = client
                .get(format!("{url}/healthz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            Ok((ok.then_some(()), "not answering".into()))
        })
        .await
    };
    let mut first = serve();
    healthy().await;
    let response = client
        .post(format!("{url}/api/v1/workflows"))
        .json(&serde_json::json!({
            "repo_url": repo.url(), "commit_hash": repo.commit, "branch": "main", "environment_id": "pr-6",
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let run: stagely_core::api::RunView = response.json().await.unwrap();
    let job_id = run.jobs[0].id.clone();
    poll_until(
        Duration::from_secs(120),
        "the build to be running its RUN step",
        || async {
            let page: stagely_core::api::LogPage = client
                .get(format!("{url}/api/v1/jobs/{job_id}/logs?limit=10000"))
                .send()
                .await?
                .json()
                .await?;
            let started = page.lines.iter().any(|l| l.line.contains("started"));
            Ok((
                started.then_some(()),
                format!("{} line(s), job {}", page.lines.len(), page.job_status),
            ))
        },
    )
    .await;

    // Crash: SIGKILL, no graceful shutdown, so nothing terminates the instance now.
    first.kill().unwrap();
    first.wait().unwrap();
    let instances = data.path().join("instances");
    let leftover: Vec<_> = std::fs::read_dir(&instances)
        .unwrap()
        .flatten()
        .filter(|e| e.path().join("instance.json").exists())
        .collect();
    assert_eq!(
        leftover.len(),
        1,
        "the killed core left its instance behind, as a crash does"
    );

    // The next core terminates it at start-up and fails the orphaned job.
    let mut second = serve();
    healthy().await;
    let view: stagely_core::api::RunView = client
        .get(format!("{url}/api/v1/workflows/{}", run.id))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(view.status, "failed");
    assert_eq!(view.jobs[0].status, "failed");
    assert!(
        view.jobs[0]
            .error_message
            .as_deref()
            .unwrap()
            .contains("restarted")
    );
    let remaining: Vec<_> = std::fs::read_dir(&instances)
        .unwrap()
        .flatten()
        .filter(|e| e.path().join("instance.json").exists() || e.path().join("work").exists())
        .collect();
    assert!(
        remaining.is_empty(),
        "instance not terminated: {remaining:?}"
    );
    // No builder process of that instance survives.
    poll_until(
        Duration::from_secs(20),
        "the instance's processes to be gone",
        || async {
            let alive: Vec<_> = cmdlines()
                .into_iter()
                .filter(|(_, c)| {
                    c.contains(&data.path().to_string_lossy().to_string()) && !c.contains(" serve ")
                })
                .collect();
            Ok((alive.is_empty().then_some(()), format!("{alive:?}")))
        },
    )
    .await;
    nix_kill(second.id());
    second.wait().unwrap();
}

fn nix_kill(pid: u32) {
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
}
