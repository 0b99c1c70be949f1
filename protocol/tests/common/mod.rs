//! Frames both session test files build.

use stagely_protocol::*;

/// The HELLO of an agent starting afresh.
pub fn agent_hello() -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: "test".into(),
        instance_id: "i-1".into(),
        arch: Arch::Amd64,
        builders: vec![BuilderKind::Buildah],
        emulated_arches: vec![],
        accepts_more_work: false,
        job_id: None,
        attempt: None,
        acked_seq: None,
    }
}

/// A BUILD of `job`, naming `attempt`.
pub fn build_frame(job: &str, attempt: Option<u32>) -> Message {
    Message::Build(Build {
        job_id: job.into(),
        context: SourceContext {
            repo_url: "/srv/repo".into(),
            commit_hash: "abc".into(),
            branch: "main".into(),
            clone_token: None,
        },
        build_config: BuildConfig {
            context_path: "api".into(),
            dockerfile: "Dockerfile".into(),
            target_image: "reg/x:api".into(),
            platform: "linux/amd64".into(),
            build_args: Default::default(),
            cache_from: vec![],
            cache_to: None,
            timeout_seconds: None,
            secrets: Default::default(),
        },
        registry_auth: None,
        registry: Default::default(),
        attempt,
    })
}

/// A completed STATUS of `job` at `seq`.
pub fn completed(job: &str, seq: u64) -> Status {
    Status {
        job_id: job.into(),
        state: JobState::Completed,
        exit_code: Some(0),
        artifact_url: Some("reg/x:api".into()),
        digest: Some("sha256:00".into()),
        error: None,
        never_ran: None,
        seq: Some(seq),
    }
}
