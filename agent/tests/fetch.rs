//! The agent's fetch with real git: local repositories are fetched only when the core allows
//! them (`GIT_ALLOW_PROTOCOL`), and a checkout's symbolic links cannot widen what the build
//! reads.

use std::collections::BTreeMap;
use std::path::Path;

use stagely_agent::builder::Backend;
use stagely_agent::job::{JobEnvironment, Output, OutputSink, run_build};
use stagely_protocol::{Arch, Build, BuildConfig, NeverRan, SourceContext};
use tokio_util::sync::CancellationToken;

fn git(dir: &Path, args: &[&str]) -> String {
    let output = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@t.invalid")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@t.invalid")
        .output()
        .unwrap();
    assert!(output.status.success(), "git {args:?}");
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

fn repo() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("Dockerfile"), "FROM scratch\n").unwrap();
    git(dir.path(), &["init", "-q", "-b", "main"]);
    git(dir.path(), &["add", "-A"]);
    git(dir.path(), &["commit", "-q", "-m", "x"]);
    let commit = git(dir.path(), &["rev-parse", "HEAD"]);
    (dir, commit)
}

fn build(repo_url: &str, commit: &str) -> Build {
    Build {
        job_id: "j".into(),
        context: SourceContext {
            repo_url: repo_url.into(),
            commit_hash: commit.into(),
            branch: "main".into(),
            clone_token: None,
        },
        build_config: BuildConfig {
            context_path: ".".into(),
            dockerfile: "Dockerfile".into(),
            target_image: "127.0.0.1:1/x/y:z".into(),
            platform: format!("linux/{}", host_arch()),
            build_args: BTreeMap::new(),
            cache_from: vec![],
            cache_to: None,
            timeout_seconds: Some(60),
            secrets: BTreeMap::new(),
        },
        registry_auth: None,
        registry: Default::default(),
        attempt: None,
    }
}

fn host_arch() -> Arch {
    Arch::from_rust_arch(std::env::consts::ARCH).unwrap()
}

/// Runs the build with a backend that is never reached, collecting the log.
async fn run(
    work: &Path,
    build: &Build,
    allow_local_repos: bool,
) -> (stagely_agent::job::Report, String) {
    let backend = Backend::Buildah {
        root: work.join("storage"),
        runroot: work.join("run"),
        tmp: work.join("tmp"),
        cgroup_parent: None,
    };
    backend.prepare().unwrap();
    let env = JobEnvironment {
        work_dir: work.to_path_buf(),
        backend: Some(backend),
        host_arch: host_arch(),
        emulated_arches: vec![],
        allow_local_repos,
        metadata_url: None,
    };
    let (sender, mut receiver) = tokio::sync::mpsc::channel(64);
    let sink = OutputSink::new(sender);
    let collector = tokio::spawn(async move {
        let mut text = String::new();
        while let Some(output) = receiver.recv().await {
            match output {
                Output::Line(_, line) => text.push_str(&line),
                Output::Lines(_, lines, _) => lines.iter().for_each(|line| text.push_str(line)),
                Output::Finished(_) => {}
            }
        }
        text
    });
    let report = run_build(build, &env, &sink, &CancellationToken::new()).await;
    drop(sink);
    (report, collector.await.unwrap())
}

#[tokio::test]
async fn git_refuses_local_repositories_unless_allowed() {
    let (source, commit) = repo();
    let work = tempfile::tempdir().unwrap();
    let url = source.path().to_string_lossy().to_string();
    let (report, log) = run(work.path(), &build(&url, &commit), false).await;
    assert_eq!(report.never_ran, Some(NeverRan::SourceUnavailable), "{log}");
    assert!(log.contains("transport 'file' not allowed"), "{log}");
}

#[tokio::test]
async fn git_refuses_command_transports_even_when_local_repos_are_allowed() {
    let (_source, commit) = repo();
    let work = tempfile::tempdir().unwrap();
    let marker = work.path().join("pwned");
    let url = format!("ext::touch {}", marker.display());
    let (report, log) = run(work.path(), &build(&url, &commit), true).await;
    assert_eq!(report.never_ran, Some(NeverRan::SourceUnavailable), "{log}");
    assert!(!marker.exists(), "git ran the ext:: command");
}

#[tokio::test]
async fn a_context_linking_out_of_the_checkout_never_reaches_the_builder() {
    let (source, _) = repo();
    std::os::unix::fs::symlink("..", source.path().join("up")).unwrap();
    git(source.path(), &["add", "-A"]);
    git(source.path(), &["commit", "-q", "-m", "link"]);
    let commit = git(source.path(), &["rev-parse", "HEAD"]);
    let work = tempfile::tempdir().unwrap();
    let url = source.path().to_string_lossy().to_string();
    let mut escaping = build(&url, &commit);
    escaping.build_config.context_path = "up".into();
    escaping.build_config.dockerfile = "src/Dockerfile".into();
    let (report, log) = run(work.path(), &escaping, true).await;
    assert_eq!(report.never_ran, Some(NeverRan::SourceUnavailable), "{log}");
    let error = report.error.unwrap_or_default();
    assert!(
        error.contains("build_config.context_path `up` leads out of the checkout"),
        "{error}"
    );
    assert!(!log.contains("step build"), "the builder ran: {log}");
}
