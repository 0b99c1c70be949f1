//! Promise 4, builds are untrusted code, with real parts (`stagely serve`, agents, buildah
//! with runc, the registry): a build reads only its own checkout, and its `RUN` steps neither
//! see nor signal host processes nor read another build's command line; agents and builders
//! inherit nothing of the core's environment.

use std::time::Duration;

use stagely_tests::*;

/// `RUN ["/bin/busybox", "sh", "-c", script]` — exec form, so no shell is needed in the image.
fn run_step(script: &str) -> String {
    format!(
        "RUN [\"/bin/busybox\", \"sh\", \"-c\", {}]\n",
        serde_json::to_string(script).unwrap()
    )
}

/// A repository whose stagely.yaml and files try every way out of the checkout.
fn escaping_repo() -> TestRepo {
    let busybox = busybox("amd64").unwrap();
    let repo = TestRepo::with_files(&[
        (
            "stagely.yaml",
            b"fail_fast: false
builds:
  up:
    context: ./workup
    dockerfile: src/Dockerfile.steal
    platform: linux/amd64
  root:
    context: ./rootlink
    dockerfile: etc/hostname
    platform: linux/amd64
  dflink:
    context: .
    dockerfile: Dockerfile.link
    platform: linux/amd64
  copylink:
    context: .
    dockerfile: Dockerfile.copy
    platform: linux/amd64
" as &[u8],
        ),
        // With `workup -> ..` as context, the agent's work directory (and its registry auth
        // file) would be the build context.
        (
            "Dockerfile.steal",
            b"FROM scratch\nCOPY auth/config.json /stolen\n",
        ),
        // COPY through a link inside an accepted context: buildah resolves it inside the
        // context (as if it were /), so the host's file is not found.
        (
            "Dockerfile.copy",
            b"FROM scratch\nCOPY rootlink/etc/shadow /stolen\n",
        ),
        ("busybox", &busybox),
    ])
    .unwrap();
    let dir = repo.dir.path();
    std::os::unix::fs::symlink("..", dir.join("workup")).unwrap();
    std::os::unix::fs::symlink("/", dir.join("rootlink")).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", dir.join("Dockerfile.link")).unwrap();
    TestRepo::commit_more(repo, "symbolic links out of the checkout").unwrap()
}

fn assert_escapes_refused(jobs: &[(String, String, Option<String>)]) {
    let find = |name: &str| {
        jobs.iter()
            .find(|(n, _, _)| n == name)
            .unwrap_or_else(|| panic!("no job {name} in {jobs:?}"))
    };
    for (name, field) in [
        ("up", "build_config.context_path `workup`"),
        ("root", "build_config.context_path `rootlink`"),
        ("dflink", "build_config.dockerfile `Dockerfile.link`"),
    ] {
        let (_, status, error) = find(name);
        assert_eq!(status, "failed", "{name}: {error:?}");
        let error = error.clone().unwrap_or_default();
        assert!(
            error.contains(field) && error.contains("symbolic link"),
            "{name}: {error}"
        );
        // No host path in what the user is shown.
        assert!(!error.contains("/tmp/"), "{name}: {error}");
    }
    let (_, status, error) = find("copylink");
    assert_eq!(status, "failed", "copylink: {error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn symlinks_out_of_the_checkout_are_refused_through_serve() {
    if !require_build_peers() {
        return;
    }
    let repo = escaping_repo();
    let registry = stagely_core::registry::LocalRegistry::start()
        .await
        .unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut core = ServeProcess::start(data.path(), &registry).await;
    let run = core.submit(&repo, "escape").await;
    let view = poll_until(Duration::from_secs(120), "the run to end", || async {
        let view = core.run(&run.id).await;
        let done = matches!(view.status.as_str(), "completed" | "failed");
        let state = view.status.clone();
        Ok((done.then_some(view), state))
    })
    .await;
    assert_eq!(view.status, "failed");
    let jobs: Vec<_> = view
        .jobs
        .iter()
        .map(|j| (j.name.clone(), j.status.clone(), j.error_message.clone()))
        .collect();
    assert_escapes_refused(&jobs);
    // Nothing was pushed for any of them.
    for job in &view.jobs {
        let image = format!("{}/stagely/escape:{}", registry.host, job.name);
        assert!(
            inspect_image(&registry, &image).await.is_err(),
            "{image} exists"
        );
    }
    assert!(core.terminate().await.success());
}

#[test]
fn symlinks_out_of_the_checkout_are_refused_through_stagely_run() {
    if !require_build_peers() {
        return;
    }
    let repo = escaping_repo();
    let output = std::process::Command::new(agent_binary().with_file_name("stagely"))
        .args(["run", "--json"])
        .arg(repo.dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(1),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(summary["status"], "failed");
    let jobs: Vec<_> = summary["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| {
            (
                j["name"].as_str().unwrap().to_string(),
                j["status"].as_str().unwrap().to_string(),
                j["error"].as_str().map(String::from),
            )
        })
        .collect();
    assert_escapes_refused(&jobs);
}

/// PID of the process as its own PID namespace numbers it (the last `NSpid` field).
fn pid_in_own_namespace(pid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("NSpid:"))?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_build_cannot_see_or_signal_the_host_nor_read_other_builds_or_the_cores_secrets() {
    if !require_build_peers() {
        return;
    }
    let busybox = busybox("amd64").unwrap();
    let db_password = format!("dbpw-{}", stagely_core::cli::new_api_token());
    // Three builds of one run, side by side:
    // - `prying` counts the processes it sees and SIGKILLs the core's PID (given as an ARG);
    // - `holder` carries a build argument with a password and stays busy for a while;
    // - `snoop` reads every command line it can see, looking for build arguments.
    let stagely_yaml = format!(
        "builds:
  prying:
    context: .
    dockerfile: Dockerfile.prying
    platform: linux/amd64
  holder:
    context: .
    dockerfile: Dockerfile.holder
    platform: linux/amd64
    build_args:
      DB_PASSWORD: \"{db_password}\"
  snoop:
    context: .
    dockerfile: Dockerfile.snoop
    platform: linux/amd64
"
    );
    let prying = format!(
        "FROM scratch\nCOPY busybox /bin/busybox\nARG CORE_PID\n{}",
        run_step(
            "cd /proc; n=0; for p in [0-9]*; do n=$((n+1)); done; echo visible-processes=$n; \
             /bin/busybox kill -9 $CORE_PID; echo kill-core-exit=$?; /bin/busybox ps"
        )
    );
    let holder = format!(
        "FROM scratch\nCOPY busybox /bin/busybox\nARG DB_PASSWORD\n{}",
        run_step("echo holding; /bin/busybox sleep 12; echo released")
    );
    // Every process the step can see that is not one of its own busybox processes is
    // "foreign": under chroot isolation that is the whole host, buildah command lines with
    // their build arguments included.
    let snoop = format!(
        "FROM scratch\nCOPY busybox /bin/busybox\n{}",
        run_step(
            "for i in 1 2 3 4 5 6 7 8; do for p in /proc/[0-9]*; do \
             c=$(/bin/busybox tr '\\0' ' ' < $p/cmdline 2>/dev/null); \
             case \"$c\" in /bin/busybox*|'') ;; *) echo \"foreign: $c\";; esac; done; \
             echo snoop-pass-done; /bin/busybox sleep 1; done"
        )
    );
    let repo = TestRepo::with_files(&[
        ("stagely.yaml", stagely_yaml.as_bytes()),
        ("Dockerfile.prying", prying.as_bytes()),
        ("Dockerfile.holder", holder.as_bytes()),
        ("Dockerfile.snoop", snoop.as_bytes()),
        ("busybox", &busybox),
    ])
    .unwrap();
    let registry = stagely_core::registry::LocalRegistry::start()
        .await
        .unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut core = ServeProcess::start(data.path(), &registry).await;
    let core_pid = core.child.id();
    // The core's own secrets, in its environment.
    let core_secrets = [registry.password.clone(), core.api_token.clone()];

    // The core's PID is only known now: it goes in as a build argument of `prying`, through
    // the stagely.yaml text of the submission.
    let text = stagely_yaml.replace(
        "    dockerfile: Dockerfile.prying\n",
        &format!(
            "    dockerfile: Dockerfile.prying\n    build_args:\n      CORE_PID: \"{core_pid}\"\n"
        ),
    );
    let run = core.submit_text(&repo, "sandbox", &text).await;

    // While the builds run, watch from the host: the password must be on holder's buildah
    // command line (so the snoop had something to find), agents must be PID 1 of their own
    // namespace, and no agent or builder process may hold the core's secrets in its
    // environment.
    let data_dir = data.path().to_string_lossy().to_string();
    let mut password_visible: Option<(i64, i64)> = None;
    let mut agents_checked = 0;
    let mut environments_checked = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    let view = loop {
        for (pid, cmdline) in cmdlines() {
            if cmdline.contains(&db_password) && cmdline.starts_with("buildah ") {
                let now = unix_ms();
                password_visible = Some(match password_visible {
                    None => (now, now),
                    Some((first, _)) => (first, now),
                });
            }
            if !cmdline.contains(&data_dir) || cmdline.contains(" serve ") {
                continue;
            }
            if let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) {
                environments_checked += 1;
                for secret in &core_secrets {
                    assert!(
                        !contains_bytes(&environ, secret.as_bytes()),
                        "pid {pid} ({cmdline}) inherited a secret of the core"
                    );
                }
                assert!(
                    !contains_bytes(&environ, b"STAGELY_REGISTRY_PASSWORD")
                        && !contains_bytes(&environ, b"STAGELY_API_TOKEN"),
                    "pid {pid} ({cmdline}) inherited the core's environment"
                );
            }
            // A child between fork and exec still shows the agent's command line, so count
            // agents seen as PID 1 rather than assert on every match.
            if cmdline.contains("stagely-agent")
                && !cmdline.starts_with("unshare")
                && pid_in_own_namespace(pid) == Some(1)
            {
                agents_checked += 1;
            }
        }
        let view = core.run(&run.id).await;
        if matches!(view.status.as_str(), "completed" | "failed") {
            break view;
        }
        assert!(tokio::time::Instant::now() < deadline, "run did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for job in &view.jobs {
        assert_eq!(
            job.status, "completed",
            "{}: {:?}",
            job.name, job.error_message
        );
    }
    assert!(
        core.child.try_wait().unwrap().is_none(),
        "a build step killed the core"
    );
    assert!(environments_checked > 0, "no agent environment was read");
    if stagely_provisioning::local::namespaces_available() {
        assert!(
            agents_checked > 0,
            "no agent was seen as PID 1 of its own namespace"
        );
    } else {
        assert!(
            !in_ci(),
            "CI runs as root: agents must get their own namespaces"
        );
    }

    let job = |name: &str| {
        view.jobs
            .iter()
            .find(|j| j.name == name)
            .unwrap()
            .id
            .clone()
    };
    let prying_log = core.log_lines(&job("prying")).await;
    let visible: usize = prying_log
        .iter()
        .find_map(|(_, line)| line.trim().strip_prefix("visible-processes="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no process count in {prying_log:?}"));
    assert!(
        (1..=6).contains(&visible),
        "the RUN step saw {visible} processes"
    );
    assert!(
        prying_log
            .iter()
            .any(|(_, l)| l.trim() == "kill-core-exit=1"),
        "{prying_log:?}"
    );

    let (first, last) = password_visible.expect(
        "holder's build argument was never on a host command line, so the snoop proved nothing",
    );
    let snoop_log = core.log_lines(&job("snoop")).await;
    let passes: Vec<i64> = snoop_log
        .iter()
        .filter(|(_, line)| line.trim() == "snoop-pass-done")
        .map(|(at, _)| *at)
        .collect();
    assert_eq!(passes.len(), 8, "{snoop_log:?}");
    assert!(
        passes.iter().any(|at| (first..=last).contains(at)),
        "no snoop pass while the password was on the host's command lines ({first}..{last}): {passes:?}"
    );
    let foreign: Vec<_> = snoop_log
        .iter()
        .filter(|(_, line)| line.starts_with("foreign: "))
        .collect();
    assert!(
        foreign.is_empty(),
        "the step saw other processes: {foreign:?}"
    );
    for (_, line) in &snoop_log {
        assert!(!line.contains(&db_password), "{line}");
    }
    assert!(core.terminate().await.success());
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
