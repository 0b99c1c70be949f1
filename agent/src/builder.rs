//! The two builder backends and the exact command lines they run.
//!
//! `buildx` is the production default and runs the design seed's commands; `buildah` is the
//! daemonless backend for hosts without a Docker engine. Both receive registry credentials
//! through a docker-style auth file written with mode 0600 (`DOCKER_CONFIG` for buildx,
//! `--authfile` for buildah): a password never appears on a command line.
//!
//! Everything here is pure (argv construction and output parsing) so it is unit-tested
//! against the seed without running anything.

use std::path::{Path, PathBuf};

use stagely_protocol::{BuildConfig, BuilderKind};

/// One command to run: program, arguments, extra environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// What the step is, for the job log ("build", "push", ...).
    pub step: &'static str,
    /// Write stdout to the job's result file instead of the log (buildx's digest query).
    pub stdout_to_result: bool,
}

/// A builder backend configured for one agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    Buildx,
    /// buildah with storage private to this instance (one root per builder instance, so
    /// two architectures never share a local layer cache).
    Buildah {
        root: PathBuf,
        runroot: PathBuf,
        /// buildah's `TMPDIR`, private to the instance: `RUN --mount=type=cache` directories
        /// live under it (else in the host-wide `/var/tmp/buildah-cache-UID`, shared by every
        /// build on the machine and kept after it), removed with the instance.
        tmp: PathBuf,
        /// `--cgroup-parent` for `RUN` containers (`AgentConfig::cgroup_parent`): inside the
        /// instance's cgroup, so its process limit holds for them.
        cgroup_parent: Option<String>,
    },
}

/// Files the agent prepares for one job.
#[derive(Debug, Clone)]
pub struct JobFiles {
    /// Directory holding `config.json` (docker-style auths), mode 0700/0600.
    pub auth_dir: PathBuf,
    /// Secret build arguments: (name, 0600 file holding the value), handed to the builder
    /// as `--secret id=NAME,src=FILE`.
    pub secret_files: Vec<(String, PathBuf)>,
    /// Where the builder writes the pushed digest (buildah) or metadata (buildx).
    pub result_file: PathBuf,
}

impl JobFiles {
    pub fn auth_file(&self) -> PathBuf {
        self.auth_dir.join("config.json")
    }
}

impl Backend {
    pub fn kind(&self) -> BuilderKind {
        match self {
            Backend::Buildx => BuilderKind::Buildx,
            Backend::Buildah { .. } => BuilderKind::Buildah,
        }
    }

    /// The commands that build and push one image, in order. `context` and `dockerfile` are
    /// the resolved paths inside the checkout (see `job::resolve_build_paths`).
    pub fn build_commands(
        &self,
        config: &BuildConfig,
        context: &Path,
        dockerfile: &Path,
        insecure_registry: bool,
        files: &JobFiles,
    ) -> Vec<Invocation> {
        match self {
            Backend::Buildx => {
                // The seed's command. `-f` is resolved against the working directory by
                // docker, so it is given as a path inside the context; `--metadata-file`
                // is added to learn the pushed digest.
                // A plain-HTTP registry cannot be configured per command except through
                // `registry.insecure=true` on the output and cache entries.
                let insecure = if insecure_registry {
                    ",registry.insecure=true"
                } else {
                    ""
                };
                let mut args: Vec<String> = vec!["buildx".into(), "build".into()];
                args.push("--platform".into());
                args.push(config.platform.clone());
                for cache in &config.cache_from {
                    args.push(format!("--cache-from=type=registry,ref={cache}{insecure}"));
                }
                if let Some(cache) = &config.cache_to {
                    args.push(format!(
                        "--cache-to=type=registry,ref={cache},mode=max{insecure}"
                    ));
                }
                for (key, value) in &config.build_args {
                    args.push("--build-arg".into());
                    args.push(format!("{key}={value}"));
                }
                for (name, file) in &files.secret_files {
                    args.push("--secret".into());
                    args.push(format!("id={name},src={}", path_text(file)));
                }
                args.push("-t".into());
                args.push(config.target_image.clone());
                args.push("-f".into());
                args.push(path_text(dockerfile));
                if insecure_registry {
                    args.push(format!(
                        "--output=type=image,name={},push=true{insecure}",
                        config.target_image
                    ));
                } else {
                    args.push("--push".into());
                }
                args.push("--metadata-file".into());
                args.push(path_text(&files.result_file));
                args.push(path_text(context));
                vec![Invocation {
                    program: "docker".into(),
                    args,
                    env: vec![("DOCKER_CONFIG".into(), path_text(&files.auth_dir))],
                    step: "build and push",
                    stdout_to_result: false,
                }]
            }
            Backend::Buildah { cgroup_parent, .. } => {
                let mut bud = self.buildah_global();
                // Every RUN step in its own container (runc): its own PID, mount and network
                // namespaces, so a build neither sees nor signals host processes nor reads
                // another build's command line.
                bud.extend(
                    [
                        "bud",
                        "--isolation",
                        "oci",
                        "--platform",
                        &config.platform,
                        "--layers",
                    ]
                    .map(String::from),
                );
                if let Some(parent) = cgroup_parent {
                    bud.push("--cgroup-parent".into());
                    bud.push(parent.clone());
                }
                bud.push("-f".into());
                bud.push(path_text(dockerfile));
                bud.push("-t".into());
                bud.push(config.target_image.clone());
                for (key, value) in &config.build_args {
                    bud.push("--build-arg".into());
                    bud.push(format!("{key}={value}"));
                }
                for (name, file) in &files.secret_files {
                    bud.push("--secret".into());
                    bud.push(format!("id={name},src={}", path_text(file)));
                }
                // buildah's layer cache takes a repository, not a tag.
                for cache in &config.cache_from {
                    bud.push("--cache-from".into());
                    bud.push(strip_tag(cache).to_string());
                }
                if let Some(cache) = &config.cache_to {
                    bud.push("--cache-to".into());
                    bud.push(strip_tag(cache).to_string());
                }
                bud.push("--authfile".into());
                bud.push(path_text(&files.auth_file()));
                if insecure_registry {
                    bud.push("--tls-verify=false".into());
                }
                bud.push(path_text(context));

                let mut push = self.buildah_global();
                push.push("push".into());
                push.push("--authfile".into());
                push.push(path_text(&files.auth_file()));
                push.push("--digestfile".into());
                push.push(path_text(&files.result_file));
                if insecure_registry {
                    push.push("--tls-verify=false".into());
                }
                push.push(config.target_image.clone());
                push.push(format!("docker://{}", config.target_image));
                vec![
                    Invocation {
                        program: "buildah".into(),
                        args: bud,
                        env: self.buildah_env(),
                        step: "build",
                        stdout_to_result: false,
                    },
                    Invocation {
                        program: "buildah".into(),
                        args: push,
                        env: self.buildah_env(),
                        step: "push",
                        stdout_to_result: false,
                    },
                ]
            }
        }
    }

    /// The commands that combine per-platform images into one manifest list.
    pub fn merge_commands(
        &self,
        sources: &[String],
        target: &str,
        insecure_registry: bool,
        files: &JobFiles,
    ) -> Vec<Invocation> {
        match self {
            Backend::Buildx => {
                let mut create: Vec<String> = ["buildx", "imagetools", "create", "-t"]
                    .map(String::from)
                    .to_vec();
                create.push(target.to_string());
                create.extend(sources.iter().cloned());
                let env = vec![("DOCKER_CONFIG".into(), path_text(&files.auth_dir))];
                vec![
                    Invocation {
                        program: "docker".into(),
                        args: create,
                        env: env.clone(),
                        step: "merge",
                        stdout_to_result: false,
                    },
                    Invocation {
                        program: "docker".into(),
                        args: [
                            "buildx",
                            "imagetools",
                            "inspect",
                            "--format",
                            "{{json .Manifest}}",
                            target,
                        ]
                        .map(String::from)
                        .to_vec(),
                        env,
                        step: "inspect",
                        stdout_to_result: true,
                    },
                ]
            }
            Backend::Buildah { .. } => {
                let list = format!("stagely-merge-{}", sanitize(target));
                let tls: Vec<String> = if insecure_registry {
                    vec!["--tls-verify=false".into()]
                } else {
                    vec![]
                };
                let mut commands = Vec::new();
                let mut create = self.buildah_global();
                create.extend(["manifest", "create", &list].map(String::from));
                commands.push(Invocation {
                    program: "buildah".into(),
                    args: create,
                    env: self.buildah_env(),
                    step: "manifest create",
                    stdout_to_result: false,
                });
                for source in sources {
                    let mut add = self.buildah_global();
                    add.extend(["manifest", "add", "--authfile"].map(String::from));
                    add.push(path_text(&files.auth_file()));
                    add.extend(tls.iter().cloned());
                    add.push(list.clone());
                    add.push(format!("docker://{source}"));
                    commands.push(Invocation {
                        program: "buildah".into(),
                        args: add,
                        env: self.buildah_env(),
                        step: "manifest add",
                        stdout_to_result: false,
                    });
                }
                let mut push = self.buildah_global();
                push.extend(["manifest", "push", "--all", "--authfile"].map(String::from));
                push.push(path_text(&files.auth_file()));
                push.push("--digestfile".into());
                push.push(path_text(&files.result_file));
                push.extend(tls.iter().cloned());
                push.push(list.clone());
                push.push(format!("docker://{target}"));
                commands.push(Invocation {
                    program: "buildah".into(),
                    args: push,
                    env: self.buildah_env(),
                    step: "manifest push",
                    stdout_to_result: false,
                });
                commands
            }
        }
    }

    /// Creates what the backend needs on disk before its first command: buildah's private
    /// `TMPDIR` (0700).
    pub fn prepare(&self) -> std::io::Result<()> {
        if let Backend::Buildah { tmp, .. } = self {
            use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(tmp)?;
            std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(())
    }

    /// The environment of every buildah command: its private `TMPDIR`.
    fn buildah_env(&self) -> Vec<(String, String)> {
        match self {
            Backend::Buildah { tmp, .. } => vec![("TMPDIR".into(), path_text(tmp))],
            Backend::Buildx => vec![],
        }
    }

    fn buildah_global(&self) -> Vec<String> {
        match self {
            Backend::Buildah { root, runroot, .. } => vec![
                "--root".into(),
                path_text(root),
                "--runroot".into(),
                path_text(runroot),
                "--storage-driver".into(),
                "vfs".into(),
            ],
            Backend::Buildx => vec![],
        }
    }
}

/// Reads the pushed digest from the backend's result file contents.
pub fn parse_digest(kind: BuilderKind, result: &str) -> Option<String> {
    let candidate = match kind {
        BuilderKind::Buildah => result.trim().to_string(),
        BuilderKind::Buildx => {
            let value: serde_json::Value = serde_json::from_str(result).ok()?;
            value
                .get("containerimage.digest")
                .or_else(|| value.get("digest"))
                .and_then(|d| d.as_str())?
                .to_string()
        }
    };
    valid_digest(&candidate).then_some(candidate)
}

/// `sha256:` followed by 64 lowercase hex digits.
pub fn valid_digest(text: &str) -> bool {
    text.strip_prefix("sha256:")
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The registry host of an image reference, as docker keys its auth entries.
pub fn registry_host(image: &str) -> &str {
    match image.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            first
        }
        _ => "docker.io",
    }
}

/// `repo:tag` → `repo` (a `:` after the last `/` is a tag; one before it is a port).
pub fn strip_tag(image: &str) -> &str {
    let name_start = image.rfind('/').map_or(0, |slash| slash + 1);
    match image[name_start..].find(':') {
        Some(colon) => &image[..name_start + colon],
        None => image,
    }
}

/// A relative path from the message joined under `base`; `.`, `./x` and `x/` all work.
/// Paths that are absolute or climb with `..` are refused by the caller before this is used.
pub fn join_relative(base: &Path, relative: &str) -> PathBuf {
    let mut out = base.to_path_buf();
    for part in relative.split('/') {
        match part {
            "" | "." => {}
            other => out.push(other),
        }
    }
    out
}

/// True when `relative` stays inside its base (no absolute path, no `..`).
pub fn stays_inside(relative: &str) -> bool {
    !relative.starts_with('/') && relative.split('/').all(|part| part != "..")
}

fn path_text(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

fn sanitize(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// The seed's BUILD message's build_config.
    fn seed_config() -> BuildConfig {
        BuildConfig {
            context_path: "./api".into(),
            dockerfile: "Dockerfile".into(),
            target_image: "registry.internal/proj-123/env-456:backend-amd64".into(),
            platform: "linux/amd64".into(),
            build_args: BTreeMap::from([("NODE_ENV".into(), "staging".into())]),
            cache_from: vec!["registry.internal/proj-123/cache:backend".into()],
            cache_to: Some("registry.internal/proj-123/cache:backend".into()),
            timeout_seconds: None,
            secrets: BTreeMap::new(),
        }
    }

    fn files() -> JobFiles {
        JobFiles {
            auth_dir: "/var/lib/stagely/auth".into(),
            secret_files: vec![],
            result_file: "/var/lib/stagely/result".into(),
        }
    }

    #[test]
    fn buildx_runs_the_seed_command() {
        let commands = Backend::Buildx.build_commands(
            &seed_config(),
            Path::new("/workspace/api"),
            Path::new("/workspace/api/Dockerfile"),
            false,
            &files(),
        );
        assert_eq!(commands.len(), 1);
        let command = &commands[0];
        assert_eq!(command.program, "docker");
        // The seed:
        //   docker buildx build --platform linux/amd64
        //     --cache-from=type=registry,ref=registry.internal/proj-123/cache:backend
        //     --cache-to=type=registry,ref=registry.internal/proj-123/cache:backend,mode=max
        //     --build-arg NODE_ENV=staging -t registry.internal/proj-123/env-456:backend-amd64
        //     -f Dockerfile --push ./api
        // with -f placed inside the context and --metadata-file added for the digest.
        let expected: Vec<&str> = vec![
            "buildx",
            "build",
            "--platform",
            "linux/amd64",
            "--cache-from=type=registry,ref=registry.internal/proj-123/cache:backend",
            "--cache-to=type=registry,ref=registry.internal/proj-123/cache:backend,mode=max",
            "--build-arg",
            "NODE_ENV=staging",
            "-t",
            "registry.internal/proj-123/env-456:backend-amd64",
            "-f",
            "/workspace/api/Dockerfile",
            "--push",
            "--metadata-file",
            "/var/lib/stagely/result",
            "/workspace/api",
        ];
        assert_eq!(command.args, expected);
        assert_eq!(
            command.env,
            vec![(
                "DOCKER_CONFIG".to_string(),
                "/var/lib/stagely/auth".to_string()
            )]
        );
    }

    #[test]
    fn buildx_pushes_to_a_plain_http_registry_through_output_options() {
        let commands = Backend::Buildx.build_commands(
            &seed_config(),
            Path::new("/workspace/api"),
            Path::new("/workspace/api/Dockerfile"),
            true,
            &files(),
        );
        let args = &commands[0].args;
        assert!(!args.contains(&"--push".to_string()));
        assert!(args.contains(
            &"--output=type=image,name=registry.internal/proj-123/env-456:backend-amd64,push=true,registry.insecure=true"
                .to_string()
        ));
        assert!(args.contains(
            &"--cache-to=type=registry,ref=registry.internal/proj-123/cache:backend,mode=max,registry.insecure=true"
                .to_string()
        ));
    }

    #[test]
    fn buildx_merge_runs_the_seed_command() {
        let sources = vec![
            "registry.internal/proj/env:app-amd64".to_string(),
            "registry.internal/proj/env:app-arm64".to_string(),
        ];
        let commands = Backend::Buildx.merge_commands(
            &sources,
            "registry.internal/proj/env:app",
            false,
            &files(),
        );
        assert_eq!(
            commands[0].args,
            vec![
                "buildx",
                "imagetools",
                "create",
                "-t",
                "registry.internal/proj/env:app",
                "registry.internal/proj/env:app-amd64",
                "registry.internal/proj/env:app-arm64"
            ]
        );
    }

    #[test]
    fn buildah_commands_use_private_storage_and_the_auth_file() {
        let backend = Backend::Buildah {
            root: "/w/storage".into(),
            runroot: "/w/run".into(),
            tmp: "/w/tmp".into(),
            cgroup_parent: Some("/stagely/local-1/build".into()),
        };
        let commands = backend.build_commands(
            &seed_config(),
            Path::new("/w/src/api"),
            Path::new("/w/src/api/Dockerfile"),
            true,
            &files(),
        );
        let bud = commands[0].args.join(" ");
        assert_eq!(
            bud,
            "--root /w/storage --runroot /w/run --storage-driver vfs bud --isolation oci \
             --platform linux/amd64 --layers --cgroup-parent /stagely/local-1/build \
             -f /w/src/api/Dockerfile \
             -t registry.internal/proj-123/env-456:backend-amd64 --build-arg NODE_ENV=staging \
             --cache-from registry.internal/proj-123/cache --cache-to registry.internal/proj-123/cache \
             --authfile /var/lib/stagely/auth/config.json --tls-verify=false /w/src/api"
        );
        let push = commands[1].args.join(" ");
        assert_eq!(
            push,
            "--root /w/storage --runroot /w/run --storage-driver vfs push \
             --authfile /var/lib/stagely/auth/config.json --digestfile /var/lib/stagely/result \
             --tls-verify=false registry.internal/proj-123/env-456:backend-amd64 \
             docker://registry.internal/proj-123/env-456:backend-amd64"
        );
        // Cache mounts stay in the instance: every buildah command gets its private TMPDIR.
        for command in &commands {
            assert_eq!(command.env, vec![("TMPDIR".into(), "/w/tmp".into())]);
        }
    }

    #[test]
    fn no_password_or_token_can_reach_argv() {
        // Credentials only exist in the auth file; argv is built without them.
        let backend = Backend::Buildah {
            root: "/r".into(),
            runroot: "/rr".into(),
            tmp: "/t".into(),
            cgroup_parent: None,
        };
        for command in backend
            .build_commands(
                &seed_config(),
                Path::new("/s"),
                Path::new("/s/D"),
                false,
                &files(),
            )
            .into_iter()
            .chain(Backend::Buildx.build_commands(
                &seed_config(),
                Path::new("/s"),
                Path::new("/s/D"),
                false,
                &files(),
            ))
        {
            for arg in &command.args {
                assert!(!arg.contains("reg_token"), "{arg}");
            }
        }
    }

    #[test]
    fn secret_build_args_are_build_secrets_from_files_never_argv() {
        let mut config = seed_config();
        config.secrets.insert(
            "NPM_TOKEN".into(),
            stagely_protocol::Secret("npm_s3cret_value".into()),
        );
        let mut files = files();
        files.secret_files = vec![(
            "NPM_TOKEN".into(),
            "/var/lib/stagely/auth/secrets/NPM_TOKEN".into(),
        )];
        let buildah = Backend::Buildah {
            root: "/r".into(),
            runroot: "/rr".into(),
            tmp: "/t".into(),
            cgroup_parent: None,
        };
        for backend in [Backend::Buildx, buildah] {
            let commands =
                backend.build_commands(&config, Path::new("/s"), Path::new("/s/D"), false, &files);
            let argv = commands[0].args.join(" ");
            assert!(
                argv.contains("--secret id=NPM_TOKEN,src=/var/lib/stagely/auth/secrets/NPM_TOKEN"),
                "{argv}"
            );
            for command in &commands {
                assert!(!command.args.join(" ").contains("npm_s3cret_value"));
                assert!(
                    command
                        .env
                        .iter()
                        .all(|(_, v)| !v.contains("npm_s3cret_value"))
                );
            }
        }
    }

    #[test]
    fn digests_are_parsed_and_validated() {
        let digest = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            parse_digest(BuilderKind::Buildah, &format!("{digest}\n")),
            Some(digest.clone())
        );
        let metadata = format!(r#"{{"containerimage.digest":"{digest}","image.name":"x"}}"#);
        assert_eq!(parse_digest(BuilderKind::Buildx, &metadata), Some(digest));
        assert_eq!(parse_digest(BuilderKind::Buildah, "sha256:zz"), None);
        assert_eq!(parse_digest(BuilderKind::Buildx, "not json"), None);
    }

    #[test]
    fn image_reference_helpers() {
        assert_eq!(registry_host("127.0.0.1:5000/a/b:c"), "127.0.0.1:5000");
        assert_eq!(registry_host("registry.internal/a:b"), "registry.internal");
        assert_eq!(registry_host("localhost/a"), "localhost");
        assert_eq!(registry_host("library/busybox"), "docker.io");
        assert_eq!(
            strip_tag("127.0.0.1:5000/a/cache:api"),
            "127.0.0.1:5000/a/cache"
        );
        assert_eq!(
            strip_tag("127.0.0.1:5000/a/cache"),
            "127.0.0.1:5000/a/cache"
        );
        assert_eq!(
            join_relative(Path::new("/s"), "./api/"),
            PathBuf::from("/s/api")
        );
        assert_eq!(join_relative(Path::new("/s"), "."), PathBuf::from("/s"));
        assert!(stays_inside("./api"));
        assert!(!stays_inside("../etc"));
        assert!(!stays_inside("/etc"));
    }
}
