//! A repository's layer cache is its own, and secret build arguments reach the build as build
//! secrets only: never a command line, an environment, the database, a log line or the image.

use std::time::Duration;

use stagely_tests::*;

/// A Dockerfile whose RUN layer differs on every fresh build (a nanosecond timestamp), so a
/// layer that was reused from a cache is recognisable by its digest.
fn stamped_repo() -> TestRepo {
    let busybox = busybox("amd64").unwrap();
    TestRepo::with_files(&[
        (
            "stagely.yaml",
            b"builds:\n  web:\n    context: .\n    platform: linux/amd64\n",
        ),
        (
            "Dockerfile",
            b"FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"/bin/busybox date +%s%N > /stamp\"]\n",
        ),
        ("busybox", &busybox),
    ])
    .unwrap()
}

async fn build(core: &TestCore, repo: &TestRepo, environment: &str) -> (Vec<String>, String) {
    let run = core.submit(repo, None, environment).await.unwrap();
    let view = core.wait_finished(&run.id, Duration::from_secs(120)).await;
    assert_eq!(view.status, "completed", "{:?}", view.jobs[0].error_message);
    let log: String = core
        .logs(&view.jobs[0].id)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, line)| line)
        .collect();
    // Host paths stay the agent's business: the log shows the work directory as $WORK.
    let data_dir = core.data.path().to_string_lossy().to_string();
    assert!(!log.contains(&data_dir), "{log}");
    assert!(log.contains("$WORK/src"), "{log}");
    let image = view.jobs[0].artifact_url.clone().unwrap();
    let (layers, _) = image_contents(&core.registry, &image).await.unwrap();
    (layers, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_repository_cannot_poison_anothers_layer_cache() {
    if !require_build_peers() {
        return;
    }
    let mut core = TestCore::start().await.unwrap();
    // The attacker's repository: the same job name and the same Dockerfile, built first.
    let attacker = stamped_repo();
    let victim = stamped_repo();
    let (attacker_layers, _) = build(&core, &attacker, "evil-1").await;
    let (victim_layers, victim_log) = build(&core, &victim, "pr-1").await;
    assert!(
        !victim_log.contains("Using cache") && !victim_log.contains("Cache pulled"),
        "the victim's build used a cache:\n{victim_log}"
    );
    assert_ne!(
        attacker_layers.last(),
        victim_layers.last(),
        "the victim's RUN layer is the attacker's"
    );
    // The cache works within one repository: a rebuild reuses its own layer.
    let (again_layers, again_log) = build(&core, &victim, "pr-2").await;
    assert!(
        again_log.contains("Using cache") || again_log.contains("Cache pulled"),
        "a rebuild of the same repository did not use its cache:\n{again_log}"
    );
    assert_eq!(again_layers.last(), victim_layers.last());
    // Two caches, one per repository.
    let catalog: serde_json::Value = reqwest::Client::new()
        .get(format!("http://{}/v2/_catalog", core.registry.host))
        .basic_auth(&core.registry.username, Some(&core.registry.password))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let caches: Vec<&str> = catalog["repositories"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r.as_str())
        .filter(|r| r.starts_with("stagely/cache/") && r.ends_with("/web"))
        .collect();
    assert_eq!(caches.len(), 2, "{catalog}");
    core.stop().await;
}

/// A repository whose build plants `marker` in a `RUN --mount=type=cache` directory, then
/// reads it back in a second step (the cache mount works within one build), and prints what
/// the cache held before it.
fn cache_mount_repo(marker: &str) -> TestRepo {
    let busybox = busybox("amd64").unwrap();
    let dockerfile = format!(
        "FROM scratch\nCOPY busybox /bin/busybox\n\
         RUN --mount=type=cache,target=/root/.npm [\"/bin/busybox\", \"sh\", \"-c\", \"echo found:$(/bin/busybox cat /root/.npm/planted 2>/dev/null || echo nothing); echo {marker} > /root/.npm/planted\"]\n\
         RUN --mount=type=cache,target=/root/.npm [\"/bin/busybox\", \"sh\", \"-c\", \"echo kept:$(/bin/busybox cat /root/.npm/planted)\"]\n"
    );
    TestRepo::with_files(&[
        (
            "stagely.yaml",
            b"builds:\n  web:\n    context: .\n    platform: linux/amd64\n",
        ),
        ("Dockerfile", dockerfile.as_bytes()),
        ("busybox", &busybox),
    ])
    .unwrap()
}

/// Issue 26 (SECURITY.md row 72), in the shape of row 17: buildah keeps cache mounts under
/// its `TMPDIR` (by default the host-wide `/var/tmp/buildah-cache-0`, kept after the job);
/// each instance now has its own, so one repository cannot plant files another one's build
/// then reads from a cache mount.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_repository_cannot_plant_files_in_anothers_cache_mounts() {
    if !require_build_peers() {
        return;
    }
    let mut core = TestCore::start().await.unwrap();
    let marker = format!("planted-{}", stagely_core::cli::new_api_token());
    let attacker = cache_mount_repo(&marker);
    let victim = cache_mount_repo("victims-own");
    let (_, attacker_log) = build(&core, &attacker, "evil-1").await;
    // Within one build the cache mount is shared between steps.
    assert!(attacker_log.contains("found:nothing"), "{attacker_log}");
    assert!(
        attacker_log.contains(&format!("kept:{marker}")),
        "{attacker_log}"
    );
    let (_, victim_log) = build(&core, &victim, "pr-1").await;
    assert!(
        victim_log.contains("found:nothing") && !victim_log.contains(&marker),
        "the victim's build read the attacker's cache mount:\n{victim_log}"
    );
    assert!(victim_log.contains("kept:victims-own"), "{victim_log}");
    // Nothing of it stayed on the host: not in buildah's shared directory, nor in any
    // instance's (removed with the instance).
    let mut dirs: Vec<std::path::PathBuf> = std::fs::read_dir("/var/tmp")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.to_string_lossy().contains("buildah-cache"))
        .collect();
    dirs.push(core.data.path().join("instances"));
    for dir in dirs {
        for file in files_under(&dir) {
            if let Ok(bytes) = std::fs::read(&file) {
                assert!(
                    !contains_bytes(&bytes, marker.as_bytes()),
                    "{} holds the attacker's planted file",
                    file.display()
                );
            }
        }
    }
    core.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn secret_build_args_are_build_secrets_and_leave_no_trace() {
    if !require_build_peers() {
        return;
    }
    let busybox = busybox("amd64").unwrap();
    // Reserved characters, so its URL-encoded form differs from it.
    let secret = format!("db-{}/p+w=rd&x", stagely_core::cli::new_api_token());
    let pem = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n{}\n-----END PRIVATE KEY-----\n",
        stagely_core::cli::new_api_token(),
        stagely_core::cli::new_api_token()
    );
    let repo = TestRepo::with_files(&[
        (
            "stagely.yaml",
            b"builds:\n  app:\n    context: .\n    platform: linux/amd64\n    build_args: {MODE: test}\n    secret_build_args: [DB_PASSWORD, TLS_KEY]\n",
        ),
        (
            "Dockerfile",
            // The build prints the secret as is, base64 (alone and inside `user:secret`),
            // URL-encoded, and a PEM key line by line.
            b"FROM scratch\nCOPY busybox /bin/busybox\nARG MODE\nRUN --mount=type=secret,id=DB_PASSWORD --mount=type=secret,id=TLS_KEY [\"/bin/busybox\", \"sh\", \"-c\", \"S=/run/secrets/DB_PASSWORD; echo secret-bytes=$(/bin/busybox wc -c < $S); /bin/busybox cat $S; echo; echo b64=$(/bin/busybox base64 -w0 $S); echo auth=$( (printf user: ; /bin/busybox cat $S) | /bin/busybox base64 -w0); echo url=$(/bin/busybox sed 's|/|%2F|g; s|+|%2B|g; s|=|%3D|g; s|&|%26|g' $S); /bin/busybox cat /run/secrets/TLS_KEY; /bin/busybox sleep 3; echo mode=$MODE > /mode\"]\n",
        ),
        ("busybox", &busybox),
    ])
    .unwrap();
    let mut core = TestCore::start().await.unwrap();
    let body = |secrets: serde_json::Value| {
        serde_json::json!({
            "repo_url": repo.url(), "commit_hash": repo.commit, "branch": "main",
            "environment_id": "pr-s", "secrets": secrets,
        })
    };
    // Declared but not given: refused, naming it.
    let (status, answer) = core.submit_raw(body(serde_json::json!({}))).await.unwrap();
    assert_eq!(status, 422, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("DB_PASSWORD"),
        "{answer}"
    );
    // Given but declared by no build: refused (a typo would build without it).
    let (status, answer) = core
        .submit_raw(body(
            serde_json::json!({"DB_PASSWORD": secret, "DB_PASWORD": "x1234"}),
        ))
        .await
        .unwrap();
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["error"]["field"], "secrets.DB_PASWORD");

    let (status, answer) = core
        .submit_raw(body(
            serde_json::json!({"DB_PASSWORD": secret, "TLS_KEY": pem}),
        ))
        .await
        .unwrap();
    assert_eq!(status, 201, "{answer}");
    let run_id = answer["id"].as_str().unwrap().to_string();

    // While it builds: on no command line, in no environment, and in no spool file (the
    // agent masks before it writes output to its disk spool).
    let printed = printed_forms(&secret, &pem);
    let mut builder_seen = false;
    let mut spooled_seen = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let view = loop {
        for (pid, cmdline) in cmdlines() {
            assert!(
                !cmdline.contains(&secret),
                "pid {pid} has it on its command line"
            );
            builder_seen |= cmdline.starts_with("buildah ") && cmdline.contains(" bud ");
            if let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) {
                assert!(
                    !contains_bytes(&environ, secret.as_bytes()),
                    "pid {pid} ({cmdline}) has it in its environment"
                );
            }
        }
        for file in files_under(&core.data.path().join("instances")) {
            if !file.to_string_lossy().contains("/spool/") {
                continue;
            }
            let bytes = std::fs::read(&file).unwrap_or_default();
            spooled_seen |= contains_bytes(&bytes, b"[REDACTED]");
            for form in &printed {
                assert!(
                    !contains_bytes(&bytes, form.as_bytes()),
                    "the spool file {} holds a form of the secret: {form}",
                    file.display()
                );
            }
        }
        let view = core.run(&run_id).await.unwrap();
        if matches!(view.status.as_str(), "completed" | "failed") {
            break view;
        }
        assert!(tokio::time::Instant::now() < deadline, "run did not finish");
        tokio::time::sleep(Duration::from_millis(30)).await;
    };
    assert!(builder_seen, "the scan never saw buildah");
    assert!(
        spooled_seen,
        "the scan never saw the masked lines in the agent's spool, so it proves nothing"
    );
    assert_eq!(view.status, "completed", "{:?}", view.jobs[0].error_message);

    // The build read it (its length), printed it, and the log holds only the mask.
    let log: String = core
        .logs(&view.jobs[0].id)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, line)| line)
        .collect();
    assert!(
        log.contains(&format!("secret-bytes={}", secret.len())),
        "{log}"
    );
    assert!(log.contains("[REDACTED]"), "{log}");
    for form in &printed {
        assert!(
            !log.contains(form.as_str()),
            "{form} reached the log:\n{log}"
        );
    }
    for marker in ["b64=[REDACTED]", "url=[REDACTED]", "auth=dXNlcjp"] {
        assert!(log.contains(marker), "{marker} missing:\n{log}");
    }
    // Not in the image, nor in any file the core or its instances wrote.
    let image = view.jobs[0].artifact_url.clone().unwrap();
    let (_, contents) = image_contents(&core.registry, &image).await.unwrap();
    assert!(
        contains_bytes(&contents, b"mode=test"),
        "the image was read"
    );
    assert!(
        !contains_bytes(&contents, secret.as_bytes()),
        "the image holds the secret"
    );
    core.stop().await;
    let stored = core.stored().await;
    // The stored log lines are among what is scanned (chunks packed or not).
    assert!(
        stored
            .iter()
            .any(|(_, bytes)| contains_bytes(bytes, b"secret-bytes=")),
        "the scan of what was stored never saw the build's lines, so it proves nothing"
    );
    for (file, bytes) in stored {
        for form in &printed {
            assert!(
                !contains_bytes(&bytes, form.as_bytes()),
                "{} holds a form of the secret: {form}",
                file.display()
            );
        }
    }
}

/// Every form the build above prints a secret in.
fn printed_forms(secret: &str, pem: &str) -> Vec<String> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let auth = b64.encode(format!("user:{secret}"));
    let mut forms = vec![
        secret.to_string(),
        b64.encode(secret),
        // The part of `base64(user:secret)` that encodes the secret alone.
        auth[8..auth.len() - 4].to_string(),
        secret
            .replace('/', "%2F")
            .replace('+', "%2B")
            .replace('=', "%3D")
            .replace('&', "%26"),
    ];
    forms.extend(
        pem.lines()
            .filter(|line| line.len() >= 8)
            .map(str::to_string),
    );
    forms
}

/// The permission bits of `path`.
fn mode_of(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o777
}

/// Issue 26 (SECURITY.md row 78): the data dir is 0700 and what the core and its agents write
/// there is theirs alone (0600 files, 0700 directories), whatever the umask they started with.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_data_dir_and_every_file_the_core_and_agents_write_are_private() {
    if !require_build_peers() {
        return;
    }
    // The usual umask of a shell: before the fix, files were 0644 and directories 0755.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    let busybox = busybox("amd64").unwrap();
    let repo = TestRepo::with_files(&[
        (
            "stagely.yaml",
            b"builds:\n  app:\n    context: .\n    platform: linux/amd64\n",
        ),
        (
            "Dockerfile",
            b"FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"echo started; /bin/busybox sleep 4; echo done\"]\n",
        ),
        ("busybox", &busybox),
    ])
    .unwrap();
    let mut core = TestCore::start().await.unwrap();
    let data = core.data.path().to_path_buf();
    let run = core.submit(&repo, None, "pr-perm").await.unwrap();
    // While the build runs: its instance, work dir, checkout, spool and agent log.
    let instance = poll_until(
        Duration::from_secs(60),
        "a running instance with a spool",
        || {
            let instances = data.join("instances");
            async move {
                let found = std::fs::read_dir(&instances)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|entry| entry.path())
                    .find(|dir| dir.join("work/spool").is_dir() && dir.join("work/src").is_dir());
                Ok((found, "no instance with a spool yet".to_string()))
            }
        },
    )
    .await;
    let mut checked = Vec::new();
    for dir in [
        data.clone(),
        data.join("instances"),
        instance.clone(),
        instance.join("work"),
        instance.join("work/src"),
        instance.join("work/spool"),
    ] {
        assert_eq!(mode_of(&dir), 0o700, "{}", dir.display());
        checked.push(dir);
    }
    let spool_files: Vec<_> = files_under(&instance.join("work/spool"));
    assert!(!spool_files.is_empty());
    for file in spool_files.iter().chain([&instance.join("agent.log")]) {
        assert_eq!(
            mode_of(file) & 0o077,
            0,
            "{} is {:o}",
            file.display(),
            mode_of(file)
        );
        checked.push(file.clone());
    }
    let view = core.wait_finished(&run.id, Duration::from_secs(120)).await;
    assert_eq!(view.status, "completed", "{:?}", view.jobs[0].error_message);
    // The databases (SQLite: the files and their WAL and shared memory) are the core's alone.
    let mut databases = 0;
    for entry in std::fs::read_dir(&data).unwrap().flatten() {
        let path = entry.path();
        assert_eq!(
            mode_of(&path) & 0o077,
            0,
            "{} is {:o}",
            path.display(),
            mode_of(&path)
        );
        databases += usize::from(path.to_string_lossy().contains("stagely."));
    }
    assert!(
        databases >= 2 || testing_postgres(),
        "{databases} database files"
    );
    eprintln!("checked {} paths under {}", checked.len(), data.display());
    core.stop().await;
}
