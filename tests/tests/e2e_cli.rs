//! The `stagely` command line, run as a user would: `run` (with a given registry and with
//! its own throwaway one), and `submit` / `status` / `logs` against a running core.

use std::process::Command;
use std::time::Duration;

use stagely_tests::*;

fn stagely() -> Command {
    Command::new(agent_binary().with_file_name("stagely"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_json_builds_the_example_into_the_given_registry() {
    if !require_build_peers() || !require_arm64_emulation() {
        return;
    }
    let repo = TestRepo::from_dir(&workspace_root().join("examples/monorepo")).unwrap();
    let registry = stagely_core::registry::LocalRegistry::start()
        .await
        .unwrap();
    let output = stagely()
        .args(["run", "--json", "--follow", "--environment", "cli"])
        .arg(repo.dir.path())
        .args(["--registry", &registry.host])
        .env("STAGELY_REGISTRY_USERNAME", &registry.username)
        .env("STAGELY_REGISTRY_PASSWORD", &registry.password)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "stagely run failed:\n{stdout}\n{stderr}"
    );
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(summary["status"], "completed");
    // `--follow`: every job's builder output on stderr, prefixed by its name.
    for name in ["backend_amd64", "worker_arm64", "frontend"] {
        assert!(
            stderr.lines().any(|line| line.starts_with(name)
                && line.contains(" | ")
                && line.contains("STEP")),
            "no followed lines of {name}:\n{stderr}"
        );
    }
    let jobs = summary["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 3);
    for job in jobs {
        assert_eq!(job["status"], "completed", "{job}");
        assert_eq!(job["exit_code"], 0);
        let image = job["image"].as_str().unwrap();
        let stored = inspect_image(&registry, image).await.unwrap();
        assert_eq!(stored.digest, job["digest"].as_str().unwrap());
        assert_eq!(
            stored.platforms,
            vec![format!("linux/{}", job["architecture"].as_str().unwrap())]
        );
    }
    // Progress went to stderr, one line per state change.
    assert!(
        stderr.contains("worker_arm64") && stderr.contains("completed"),
        "{stderr}"
    );
    assert!(!stdout.contains(&registry.password) && !stderr.contains(&registry.password));
}

#[test]
fn run_without_a_registry_uses_a_throwaway_one_and_a_bad_file_fails_early() {
    if !require_build_peers() {
        return;
    }
    let repo = TestRepo::with_files(&[
        (
            "svc/stagely.yaml",
            b"builds:\n  site:\n    context: ./site\n    platform: linux/amd64\n",
        ),
        (
            "svc/site/Dockerfile",
            b"FROM scratch\nCOPY index.html /index.html\n",
        ),
        ("svc/site/index.html", b"<h1>hi</h1>\n"),
        (
            "bad/stagely.yaml",
            b"builds:\n  site:\n    context: ./site\n    platform: linux/riscv64\n",
        ),
    ])
    .unwrap();
    let output = stagely()
        .arg("run")
        .arg(repo.dir.path().join("svc"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("throwaway Distribution registry at 127.0.0.1:"),
        "{stdout}"
    );
    let table = stdout
        .lines()
        .find(|l| l.starts_with("site "))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        table.contains("completed") && table.contains(":site") && table.contains("sha256:"),
        "{table}"
    );

    let output = stagely()
        .arg("run")
        .arg(repo.dir.path().join("bad"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("builds.site.platform") && stderr.contains("linux/riscv64"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn submit_status_and_logs_talk_to_a_running_core() {
    if !require_build_peers() {
        return;
    }
    let repo = TestRepo::with_files(&[
        (
            "stagely.yaml",
            b"builds:\n  web:\n    context: .\n    platform: linux/amd64\n",
        ),
        ("Dockerfile", b"FROM scratch\nCOPY page.txt /page.txt\n"),
        ("page.txt", b"page\n"),
    ])
    .unwrap();
    let mut core = TestCore::start().await.unwrap();
    let url = core.url.clone();
    let dir = repo.url();
    let commit = repo.commit.clone();
    let token = core.api_token.clone();
    let output = tokio::task::spawn_blocking(move || {
        stagely()
            .env("STAGELY_API_TOKEN", &token)
            .args([
                "submit",
                "--core",
                &url,
                "--repo",
                &dir,
                "--commit",
                &commit,
                "--environment",
                "pr-8",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let run_id = String::from_utf8_lossy(&output.stdout).trim().to_string();
    let view = core.wait_finished(&run_id, Duration::from_secs(120)).await;
    assert_eq!(view.status, "completed");

    let url = core.url.clone();
    let job_id = view.jobs[0].id.clone();
    let token = core.api_token.clone();
    let (status, logs) = tokio::task::spawn_blocking(move || {
        let status = stagely()
            .env("STAGELY_API_TOKEN", &token)
            .args(["status", "--core", &url, &run_id])
            .output()
            .unwrap();
        let logs = stagely()
            .env("STAGELY_API_TOKEN", &token)
            .args(["logs", "--core", &url, &job_id])
            .output()
            .unwrap();
        (status, logs)
    })
    .await
    .unwrap();
    let status_text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{status_text}");
    assert!(
        status_text.contains("web") && status_text.contains("completed"),
        "{status_text}"
    );
    let log_text = String::from_utf8_lossy(&logs.stdout);
    assert!(logs.status.success());
    assert!(
        log_text.contains("STEP 2/2: COPY page.txt /page.txt"),
        "{log_text}"
    );
    assert!(log_text.contains("pushed "), "{log_text}");
    core.stop().await;
}

/// Runs `args` of `stagely` on a pseudo-terminal (util-linux `script`), as an operator's
/// terminal would show it; returns what reached the terminal.
fn on_a_terminal(token: &str, args: &[&str]) -> Vec<u8> {
    let binary = agent_binary().with_file_name("stagely");
    let mut command_line = binary.to_string_lossy().to_string();
    for arg in args {
        command_line.push_str(&format!(" '{arg}'"));
    }
    let output = Command::new("script")
        .args(["-q", "-e", "-c", &command_line, "/dev/null"])
        .env("STAGELY_API_TOKEN", token)
        .output()
        .expect("util-linux script");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

/// Issue 26 (SECURITY.md row 73): build output cannot drive the operator's terminal.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn build_output_reaches_a_terminal_escaped_and_a_pipe_or_raw_as_stored() {
    if !require_build_peers() || !require("script", "--version") {
        return;
    }
    let busybox = busybox("amd64").unwrap();
    // OSC 52 (clipboard), OSC 8 (a link), clear screen, cursor-up + erase to fake a line,
    // a carriage return overwrite, and one plain colour.
    let printed: &[u8] = b"\x1b]52;c;Y3VybCBldmlsfHNo\x07\n\x1b]8;;https://evil.example\x1b\\click\x1b]8;;\x1b\\\n\x1b[2J\n\x1b[1A\x1b[2KSuccessfully tagged fake\n\x1b[31mred\x1b[0m\nfailed\rok\n";
    let repo = TestRepo::with_files(&[
        (
            "stagely.yaml",
            b"builds:\n  app:\n    context: .\n    platform: linux/amd64\n",
        ),
        (
            "Dockerfile",
            b"FROM scratch\nCOPY busybox /bin/busybox\nCOPY hostile.txt /hostile.txt\nRUN [\"/bin/busybox\", \"cat\", \"/hostile.txt\"]\n",
        ),
        ("hostile.txt", printed),
        ("busybox", &busybox),
    ])
    .unwrap();
    let mut core = TestCore::start().await.unwrap();
    let run = core.submit(&repo, None, "pr-tty").await.unwrap();
    let run = core.wait_finished(&run.id, Duration::from_secs(120)).await;
    assert_eq!(run.status, "completed", "{:?}", run.jobs[0].error_message);
    let job_id = run.jobs[0].id.clone();
    // The API keeps the stored bytes.
    let stored: String = core
        .logs(&job_id)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, line)| line)
        .collect();
    assert!(
        stored.contains("\x1b]52;c;Y3VybCBldmlsfHNo\x07"),
        "{stored:?}"
    );

    let (url, token) = (core.url.clone(), core.api_token.clone());
    let shown = tokio::task::spawn_blocking(move || {
        let plain = on_a_terminal(&token, &["logs", "--core", &url, &job_id]);
        let followed = on_a_terminal(&token, &["logs", "--follow", "--core", &url, &job_id]);
        let raw = on_a_terminal(&token, &["logs", "--raw", "--core", &url, &job_id]);
        let piped = stagely()
            .env("STAGELY_API_TOKEN", &token)
            .args(["logs", "--core", &url, &job_id])
            .output()
            .unwrap()
            .stdout;
        (plain, followed, raw, piped)
    })
    .await
    .unwrap();
    let (plain, followed, raw, piped) = shown;
    for (what, bytes) in [("logs", &plain), ("logs --follow", &followed)] {
        let text = String::from_utf8_lossy(bytes);
        // No escape sequence reaches the terminal but the re-emitted colour.
        let escapes: Vec<&str> = text.split('\x1b').skip(1).collect();
        assert!(
            escapes
                .iter()
                .all(|rest| rest.starts_with("[31m") || rest.starts_with("[0m")),
            "{what}: a raw escape reached the terminal: {text:?}"
        );
        for visible in [
            r"\x1b]52;c;Y3VybCBldmlsfHNo^G",
            r"\x1b]8;;https://evil.example",
            r"\x1b[2J",
            r"\x1b[1A\x1b[2KSuccessfully tagged fake",
            "failed^Mok",
            "\x1b[31mred\x1b[0m",
        ] {
            assert!(
                text.contains(visible),
                "{what}: {visible:?} not shown in {text:?}"
            );
        }
    }
    for (what, bytes) in [("logs --raw", &raw), ("logs | cat", &piped)] {
        assert!(
            contains_bytes(bytes, b"\x1b]52;c;Y3VybCBldmlsfHNo\x07")
                && contains_bytes(bytes, b"\x1b[2J"),
            "{what} did not write the stored bytes: {:?}",
            String::from_utf8_lossy(bytes)
        );
    }
    core.stop().await;
}
