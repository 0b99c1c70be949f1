//! End to end with real parts: core → local provider → stagely-agent → git → buildah →
//! Distribution registry, checked afterwards over the registry API and with skopeo.

use std::time::Duration;

use stagely_tests::*;

const RUN_TIMEOUT: Duration = Duration::from_secs(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn example_monorepo_builds_and_pushes_every_image_for_its_platform() {
    if !require_build_peers() || !require_arm64_emulation() {
        return;
    }
    let repo = TestRepo::from_dir(&workspace_root().join("examples/monorepo")).unwrap();
    let mut core = TestCore::start().await.unwrap();
    // No stagely.yaml in the request: the core reads it from the repository at the commit.
    let run = core.submit(&repo, None, "pr-1").await.unwrap();
    assert_eq!(run.jobs.len(), 3);
    assert!(
        run.jobs
            .iter()
            .all(|j| j.status == "queued" || j.status == "provisioning")
    );

    let run = core.wait_finished(&run.id, RUN_TIMEOUT).await;
    for job in &run.jobs {
        let logs = core.logs(&job.id).await.unwrap();
        assert_eq!(
            job.status,
            "completed",
            "{} failed: {:?}\n{}",
            job.name,
            job.error_message,
            logs.iter().map(|(_, l)| l.as_str()).collect::<String>()
        );
    }
    assert_eq!(run.status, "completed");

    let expected = [
        ("backend_amd64", "linux/amd64", "backend-amd64"),
        ("frontend", "linux/amd64", "frontend"),
        ("worker_arm64", "linux/arm64", "worker-arm64"),
    ];
    for (name, platform, tag) in expected {
        let job = run.jobs.iter().find(|j| j.name == name).unwrap();
        let image = job.artifact_url.clone().unwrap();
        assert_eq!(image, format!("{}/stagely/pr-1:{tag}", core.registry.host));
        let digest = job.digest.clone().unwrap();
        let stored = inspect_image(&core.registry, &image).await.unwrap();
        assert_eq!(
            stored.digest, digest,
            "{name}: registry digest differs from the reported one"
        );
        assert_eq!(stored.platforms, vec![platform.to_string()], "{name}");
        assert_eq!(
            skopeo_digest(&core.registry, &image).unwrap(),
            digest,
            "{name}: skopeo disagrees"
        );
        assert!(
            job.vm_id
                .as_deref()
                .is_some_and(|v| v.starts_with("local-"))
        );
        assert_eq!(job.exit_code, Some(0));
        assert!(job.started_at.is_some() && job.completed_at.is_some());
        let logs = core.logs(&job.id).await.unwrap();
        let text: String = logs.iter().map(|(_, l)| l.as_str()).collect();
        if platform == "linux/arm64" && std::env::consts::ARCH == "x86_64" {
            assert!(
                text.contains("emulated: building linux/arm64 on a amd64 host under QEMU"),
                "{text}"
            );
        }
        assert!(text.contains(&format!("pushed {image}@{digest}")), "{text}");
    }
    // The build arg from stagely.yaml reached the image.
    let backend = run.jobs.iter().find(|j| j.name == "backend_amd64").unwrap();
    let logs: String = core
        .logs(&backend.id)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, l)| l)
        .collect();
    assert!(logs.contains("--build-arg APP_ENV=staging"), "{logs}");

    // Every instance was terminated.
    let live = core.live_instances().await;
    assert!(
        live.is_empty(),
        "live after the run: {live:?}\n{:#?}",
        run.jobs
    );
    core.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_dockerfile_fails_the_job_and_the_run_with_the_builders_error() {
    if !require_build_peers() {
        return;
    }
    let busybox = busybox("amd64").unwrap();
    let repo = TestRepo::with_files(&[
        ("stagely.yaml", b"fail_fast: false\nbuilds:\n  good:\n    context: ./good\n    platform: linux/amd64\n  broken:\n    context: ./broken\n    platform: linux/amd64\n"),
        ("good/Dockerfile", b"FROM scratch\nCOPY hello.txt /hello.txt\n"),
        ("good/hello.txt", b"hello\n"),
        ("broken/Dockerfile", b"FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"echo about to fail; echo failing-on-purpose >&2; exit 3\"]\n"),
        ("broken/busybox", &busybox),
    ])
    .unwrap();
    let mut core = TestCore::start().await.unwrap();
    let run = core.submit(&repo, None, "pr-2").await.unwrap();
    let run = core.wait_finished(&run.id, RUN_TIMEOUT).await;
    assert_eq!(run.status, "failed");
    assert!(
        run.error_message
            .as_deref()
            .unwrap_or("")
            .contains("broken")
    );
    let good = run.jobs.iter().find(|j| j.name == "good").unwrap();
    assert_eq!(good.status, "completed", "{:?}", good.error_message);
    let broken = run.jobs.iter().find(|j| j.name == "broken").unwrap();
    assert_eq!(broken.status, "failed");
    assert_eq!(broken.exit_code, Some(3));
    assert!(broken.digest.is_none() && broken.artifact_url.is_none());
    assert!(
        broken
            .error_message
            .as_deref()
            .unwrap()
            .contains("exit status 3"),
        "{:?}",
        broken.error_message
    );
    let logs = core.logs(&broken.id).await.unwrap();
    assert!(
        logs.iter()
            .any(|(s, l)| s == "stdout" && l.contains("about to fail")),
        "{logs:?}"
    );
    assert!(
        logs.iter()
            .any(|(s, l)| s == "stderr" && l.contains("failing-on-purpose")),
        "{logs:?}"
    );
    assert!(
        logs.iter().any(|(s, l)| s == "stderr"
            && l.contains("Error: building at STEP")
            && l.contains("exit status 3")),
        "{logs:?}"
    );
    let live = core.live_instances().await;
    assert!(
        live.is_empty(),
        "live after the run: {live:?}\n{:#?}",
        run.jobs
    );
    core.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn arm64_run_steps_execute_under_qemu_and_a_multi_arch_build_merges_into_one_index() {
    if !require_build_peers() || !require_arm64_emulation() {
        return;
    }
    let amd = busybox("amd64").unwrap();
    let arm = busybox("arm64").unwrap();
    // TARGETARCH selects the busybox of the platform being built.
    let dockerfile = b"FROM scratch\nARG TARGETARCH\nCOPY busybox-${TARGETARCH} /bin/busybox\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"echo machine=$(/bin/busybox uname -m)\"]\n";
    let repo = TestRepo::with_files(&[
        ("stagely.yaml", b"builds:\n  app:\n    context: .\n    platforms: [linux/amd64, linux/arm64]\n    machine: small\n"),
        ("Dockerfile", dockerfile),
        ("busybox-amd64", &amd),
        ("busybox-arm64", &arm),
    ])
    .unwrap();
    let mut core = TestCore::start().await.unwrap();
    let run = core.submit(&repo, None, "pr-3").await.unwrap();
    let names: Vec<_> = run.jobs.iter().map(|j| j.name.as_str()).collect();
    assert_eq!(names, ["app_amd64", "app_arm64", "app_merge"]);
    let run = core.wait_finished(&run.id, RUN_TIMEOUT).await;
    for job in &run.jobs {
        let logs: String = core
            .logs(&job.id)
            .await
            .unwrap()
            .into_iter()
            .map(|(_, l)| l)
            .collect();
        assert_eq!(
            job.status, "completed",
            "{}: {:?}\n{logs}",
            job.name, job.error_message
        );
        match job.name.as_str() {
            "app_arm64" => assert!(logs.contains("machine=aarch64"), "{logs}"),
            "app_amd64" => assert!(logs.contains("machine=x86_64"), "{logs}"),
            _ => {}
        }
    }
    let merge = run.jobs.iter().find(|j| j.name == "app_merge").unwrap();
    assert_eq!(merge.architecture, "multi");
    // The figure BENCHMARKS.md quotes for a real merge (buildah manifest create/add/push).
    let last_platform = run
        .jobs
        .iter()
        .filter(|j| j.name != "app_merge")
        .filter_map(|j| j.completed_at)
        .max()
        .unwrap();
    println!(
        "merge on the last builder: completed {} ms after the last platform job",
        merge.completed_at.unwrap() - last_platform
    );
    let image = merge.artifact_url.clone().unwrap();
    assert_eq!(image, format!("{}/stagely/pr-3:app", core.registry.host));
    let stored = inspect_image(&core.registry, &image).await.unwrap();
    assert_eq!(stored.digest, merge.digest.clone().unwrap());
    assert!(
        stored.media_type.contains("index") || stored.media_type.contains("list"),
        "{}",
        stored.media_type
    );
    let mut platforms = stored.platforms.clone();
    platforms.sort();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64"]);
    // The index holds exactly the platform jobs' images.
    let mut children = stored.children.clone();
    children.sort();
    let mut platform_digests: Vec<String> = run
        .jobs
        .iter()
        .filter(|j| j.name != "app_merge")
        .map(|j| j.digest.clone().unwrap())
        .collect();
    platform_digests.sort();
    assert_eq!(children, platform_digests);
    // Merge on the last builder: the platform job that finished last ran the MERGE on its own
    // instance, so no third instance booted.
    assert_eq!(merge.merge_path.as_deref(), Some("last_builder"));
    let last = run
        .jobs
        .iter()
        .filter(|j| j.name != "app_merge")
        .max_by_key(|j| j.completed_at)
        .unwrap();
    assert_eq!(merge.attempts.len(), 1);
    assert_eq!(merge.attempts[0].instance_id, last.attempts[0].instance_id);
    assert_eq!(
        merge.attempts[0].merge_path.as_deref(),
        Some("last_builder")
    );
    let instance_dirs = std::fs::read_dir(core.data.path().join("instances"))
        .unwrap()
        .flatten()
        .count();
    assert_eq!(instance_dirs, 2, "a merge instance booted");
    let live = core.live_instances().await;
    assert!(
        live.is_empty(),
        "live after the run: {live:?}\n{:#?}",
        run.jobs
    );
    core.stop().await;
}
