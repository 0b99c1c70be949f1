//! `stagely.yaml`: the user's build declaration, parsed and expanded into job plans.
//!
//! The seed's `builds:` map: each entry has `context`, `platform` (or `platforms` for a
//! multi-arch image), `machine`, `dockerfile`, `build_args`, `timeout`. Unknown keys,
//! duplicate keys and bad values are refused with an error naming the field path
//! (`builds.api.platform`) and, for YAML errors, the line and column.
//!
//! A single-platform entry becomes one job. A multi-platform entry `app` becomes one job per
//! platform (`app_amd64`, `app_arm64`) plus `app_merge` (architecture `multi`), which runs
//! only after every platform job of `app` completed.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use stagely_protocol::Arch;
use stagely_provisioning::MachineSize;
pub use stagely_store::spec::{JobKind, JobSpec};

/// Default `timeout` (the seed's).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Longest `timeout` accepted.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(6 * 60 * 60);
/// Most builds one file may declare.
pub const MAX_BUILDS: usize = 100;
/// Most bytes of text the parsed file may hold, anchors and aliases expanded: an alias
/// repeats its anchor's text, so a small file can stand for a huge one.
pub const MAX_EXPANDED_BYTES: usize = 256 * 1024;
/// Most build arguments per build.
pub const MAX_BUILD_ARGS: usize = 100;
/// Longest build argument name.
pub const MAX_BUILD_ARG_NAME: usize = 128;
/// Longest build argument value (it goes on the builder's command line).
pub const MAX_BUILD_ARG_VALUE: usize = 8 * 1024;
/// Most aliases (`*name`) one file may use.
const MAX_ALIASES: usize = 1000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("stagely.yaml: {0}")]
    Yaml(String),
    #[error("stagely.yaml: `builds` is empty; declare at least one build")]
    NoBuilds,
    #[error("stagely.yaml: {count} builds declared; at most {MAX_BUILDS} are allowed")]
    TooManyBuilds { count: usize },
    #[error("stagely.yaml: builds.{build}.{field}: {problem}")]
    Field {
        build: String,
        field: &'static str,
        problem: String,
    },
    #[error("stagely.yaml: builds.{build}: {problem}")]
    Build { build: String, problem: String },
    #[error("stagely.yaml: builds.{build}.build_args.{name}: {problem}")]
    BuildArg {
        build: String,
        name: String,
        problem: String,
    },
    #[error(
        "stagely.yaml: expands to {bytes} bytes of text (anchors and aliases repeated); at most {MAX_EXPANDED_BYTES} are accepted"
    )]
    TooLarge { bytes: usize },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSyntax {
    /// Cancel the run's other jobs on the first failure (default true).
    #[serde(default)]
    fail_fast: Option<bool>,
    builds: BTreeMap<String, BuildSyntax>,
}

impl FileSyntax {
    /// Bytes of text the parsed file holds (what aliases made of it included).
    fn expanded_bytes(&self) -> usize {
        self.builds
            .iter()
            .map(|(name, build)| {
                let optional = [
                    &build.platform,
                    &build.machine,
                    &build.dockerfile,
                    &build.timeout,
                ]
                .iter()
                .map(|value| value.as_ref().map_or(0, String::len))
                .sum::<usize>();
                name.len()
                    + build.context.len()
                    + optional
                    + build
                        .platforms
                        .iter()
                        .flatten()
                        .map(String::len)
                        .sum::<usize>()
                    + build
                        .build_args
                        .iter()
                        .map(|(key, value)| key.len() + value.len())
                        .sum::<usize>()
                    + build
                        .secret_build_args
                        .iter()
                        .map(String::len)
                        .sum::<usize>()
            })
            .sum()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BuildSyntax {
    context: String,
    #[serde(default)]
    platform: Option<String>,
    #[serde(default)]
    platforms: Option<Vec<String>>,
    #[serde(default)]
    machine: Option<String>,
    #[serde(default)]
    dockerfile: Option<String>,
    #[serde(default)]
    build_args: BTreeMap<String, String>,
    /// Names of build arguments whose values are secrets: they come from the submission
    /// (`secrets`) or the core's `[secrets]`, never from this file.
    #[serde(default)]
    secret_build_args: Vec<String>,
    #[serde(default)]
    timeout: Option<String>,
}

/// One job to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobPlan {
    pub name: String,
    /// `amd64`, `arm64` or `multi`.
    pub architecture: String,
    /// `linux/amd64`..., or the comma-joined list for a merge job.
    pub platform: String,
    pub machine: MachineSize,
    pub spec: JobSpec,
}

/// A parsed `stagely.yaml`: its jobs and run-wide settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pipeline {
    pub jobs: Vec<JobPlan>,
    /// `fail_fast` (default true): the first failed job cancels the others.
    pub fail_fast: bool,
}

/// Parses `stagely.yaml` text. `prefix` is the directory of the file inside the repository
/// (`""` at the root); contexts are relative to it.
pub fn parse(text: &str, prefix: &str) -> Result<Vec<JobPlan>, ConfigError> {
    parse_pipeline(text, prefix).map(|pipeline| pipeline.jobs)
}

/// Like [`parse`], with the run-wide settings.
pub fn parse_pipeline(text: &str, prefix: &str) -> Result<Pipeline, ConfigError> {
    let mut options = serde_saphyr::Options::default();
    options.strict_booleans = true;
    let mut budget = serde_saphyr::Budget::default();
    budget.max_aliases = MAX_ALIASES;
    options.budget = Some(budget);
    options.alias_limits.max_total_replayed_events = 10_000;
    options.alias_limits.max_replay_stack_depth = 16;
    let file: FileSyntax = serde_saphyr::from_str_with_options(text, options)
        .map_err(|error| ConfigError::Yaml(error.to_string()))?;
    let bytes = file.expanded_bytes();
    if bytes > MAX_EXPANDED_BYTES {
        return Err(ConfigError::TooLarge { bytes });
    }
    if file.builds.is_empty() {
        return Err(ConfigError::NoBuilds);
    }
    if file.builds.len() > MAX_BUILDS {
        return Err(ConfigError::TooManyBuilds {
            count: file.builds.len(),
        });
    }
    let mut plans = Vec::new();
    for (name, build) in file.builds {
        plans.extend(plan_build(&name, build, prefix)?);
    }
    // Jobs become image tags (lowercase, `_` → `-`): two names that map to one tag would
    // overwrite each other's image.
    let mut seen = std::collections::BTreeMap::new();
    for plan in &plans {
        let tag = plan.name.to_ascii_lowercase().replace('_', "-");
        if let Some(other) = seen.insert(tag.clone(), plan.name.clone()) {
            return Err(ConfigError::Build {
                build: plan.spec.service.clone(),
                problem: format!(
                    "job `{}` would push the same image tag `{tag}` as job `{other}`",
                    plan.name
                ),
            });
        }
    }
    Ok(Pipeline {
        jobs: plans,
        fail_fast: file.fail_fast.unwrap_or(true),
    })
}

fn field(build: &str, field: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        build: build.to_string(),
        field,
        problem: problem.into(),
    }
}

fn plan_build(name: &str, build: BuildSyntax, prefix: &str) -> Result<Vec<JobPlan>, ConfigError> {
    if name.is_empty()
        || name.len() > 90
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        || !name.starts_with(|c: char| c.is_ascii_alphanumeric())
        // A job's name is also a repository name component (its layer cache): no trailing
        // separator.
        || !name.ends_with(|c: char| c.is_ascii_alphanumeric())
    {
        return Err(ConfigError::Build {
            build: name.to_string(),
            problem: "build names must be 1-90 characters of letters, digits, `_` and `-`, starting and ending with a letter or digit".into(),
        });
    }
    let context = clean_relative(&build.context).ok_or_else(|| {
        field(
            name,
            "context",
            format!(
                "`{}` must be a relative path inside the repository (no `..`, not absolute)",
                build.context
            ),
        )
    })?;
    let dockerfile_text = build.dockerfile.as_deref().unwrap_or("Dockerfile");
    let dockerfile = clean_relative(dockerfile_text)
        .filter(|d| d != ".")
        .ok_or_else(|| {
            field(
                name,
                "dockerfile",
                format!("`{dockerfile_text}` must be a relative file path inside the context"),
            )
        })?;
    let machine_text = build.machine.as_deref().unwrap_or("medium");
    let machine = MachineSize::parse(machine_text).ok_or_else(|| {
        field(
            name,
            "machine",
            format!("`{machine_text}` is not one of small, medium, large"),
        )
    })?;
    let timeout = match &build.timeout {
        None => DEFAULT_TIMEOUT,
        Some(text) => parse_duration(text).ok_or_else(|| {
            field(
                name,
                "timeout",
                format!("`{text}` is not a duration like 90s, 45m or 1h30m"),
            )
        })?,
    };
    if timeout.is_zero() || timeout > MAX_TIMEOUT {
        return Err(field(
            name,
            "timeout",
            format!("must be between 1s and {}h", MAX_TIMEOUT.as_secs() / 3600),
        ));
    }
    if build.build_args.len() > MAX_BUILD_ARGS {
        return Err(field(
            name,
            "build_args",
            format!(
                "{} arguments declared; at most {MAX_BUILD_ARGS} are allowed",
                build.build_args.len()
            ),
        ));
    }
    for (key, value) in &build.build_args {
        if !valid_arg_name(key) {
            let shown: String = key.chars().take(40).collect();
            return Err(field(
                name,
                "build_args",
                format!(
                    "`{shown}` is not a valid build argument name (letters, digits and `_`, not starting with a digit, at most {MAX_BUILD_ARG_NAME} characters)"
                ),
            ));
        }
        check_arg_value(value).map_err(|problem| ConfigError::BuildArg {
            build: name.to_string(),
            name: key.clone(),
            problem,
        })?;
    }
    let mut secret_names = Vec::new();
    for secret in &build.secret_build_args {
        if !valid_arg_name(secret) {
            let shown: String = secret.chars().take(40).collect();
            return Err(field(
                name,
                "secret_build_args",
                format!("`{shown}` is not a valid build argument name"),
            ));
        }
        if build.build_args.contains_key(secret) {
            return Err(field(
                name,
                "secret_build_args",
                format!(
                    "`{secret}` is also in build_args; a secret's value must not be written in stagely.yaml"
                ),
            ));
        }
        if secret_names.contains(secret) {
            return Err(field(
                name,
                "secret_build_args",
                format!("`{secret}` is listed twice"),
            ));
        }
        secret_names.push(secret.clone());
    }
    if secret_names.len() > MAX_BUILD_ARGS {
        return Err(field(
            name,
            "secret_build_args",
            format!("at most {MAX_BUILD_ARGS} are allowed"),
        ));
    }
    let platforms: Vec<String> = match (build.platform, build.platforms) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::Build {
                build: name.to_string(),
                problem: "set either `platform` or `platforms`, not both".into(),
            });
        }
        (None, None) => {
            return Err(ConfigError::Build {
                build: name.to_string(),
                problem: "one of `platform` or `platforms` is required".into(),
            });
        }
        (Some(platform), None) => vec![platform],
        (None, Some(list)) => {
            if list.is_empty() {
                return Err(field(name, "platforms", "must list at least one platform"));
            }
            list
        }
    };
    let multi = platforms.len() > 1;
    let field_name = if multi { "platforms" } else { "platform" };
    let mut arches = Vec::new();
    for platform in &platforms {
        let arch = Arch::from_platform(platform).ok_or_else(|| {
            field(
                name,
                field_name,
                format!("`{platform}` is not supported (linux/amd64 or linux/arm64)"),
            )
        })?;
        if arches.contains(&arch) {
            return Err(field(
                name,
                field_name,
                format!("`{platform}` is listed twice"),
            ));
        }
        arches.push(arch);
    }

    let spec = JobSpec {
        service: name.to_string(),
        kind: JobKind::Build,
        context_path: join_prefix(prefix, &context),
        dockerfile,
        build_args: build.build_args,
        secret_build_args: secret_names,
        timeout_seconds: timeout.as_secs(),
    };
    if !multi {
        return Ok(vec![JobPlan {
            name: name.to_string(),
            architecture: arches[0].as_str().to_string(),
            platform: platforms[0].clone(),
            machine,
            spec,
        }]);
    }
    let mut plans: Vec<JobPlan> = arches
        .iter()
        .zip(&platforms)
        .map(|(arch, platform)| JobPlan {
            name: format!("{name}_{arch}"),
            architecture: arch.as_str().to_string(),
            platform: platform.clone(),
            machine,
            spec: spec.clone(),
        })
        .collect();
    let sources = plans.iter().map(|plan| plan.name.clone()).collect();
    plans.push(JobPlan {
        name: format!("{name}_merge"),
        architecture: "multi".into(),
        platform: platforms.join(","),
        // The seed: "Core provisions a small VM (any arch) to run the merge".
        machine: MachineSize::Small,
        spec: JobSpec {
            kind: JobKind::Merge { sources },
            ..spec
        },
    });
    Ok(plans)
}

/// A build argument name: letters, digits and `_`, not starting with a digit.
pub fn valid_arg_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_BUILD_ARG_NAME
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit())
}

/// Why a build argument value (plain or secret) cannot be handed to a builder, if it cannot:
/// longer than [`MAX_BUILD_ARG_VALUE`], or holding NUL or a control character other than
/// newline and tab.
pub fn check_arg_value(value: &str) -> Result<(), String> {
    if value.len() > MAX_BUILD_ARG_VALUE {
        return Err(format!(
            "the value is {} bytes; at most {MAX_BUILD_ARG_VALUE} are accepted",
            value.len()
        ));
    }
    if value.contains('\0') {
        return Err("the value contains a NUL byte".into());
    }
    if value
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(
            "the value contains a control character (only newline and tab are allowed)".into(),
        );
    }
    Ok(())
}

/// Normalises `./a/b/` to `a/b` and `.`/`./` to `.`; refuses absolute paths and `..`.
fn clean_relative(path: &str) -> Option<String> {
    if path.starts_with('/') || path.contains('\\') || path.contains('\0') {
        return None;
    }
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return None,
            other => parts.push(other),
        }
    }
    Some(if parts.is_empty() {
        ".".into()
    } else {
        parts.join("/")
    })
}

fn join_prefix(prefix: &str, path: &str) -> String {
    let prefix = prefix.trim_matches('/');
    match (prefix.is_empty() || prefix == ".", path == ".") {
        (true, _) => path.to_string(),
        (false, true) => prefix.to_string(),
        (false, false) => format!("{prefix}/{path}"),
    }
}

/// `90s`, `45m`, `1h30m`, `2h`; a bare number is seconds.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    if let Ok(seconds) = text.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let mut total: u64 = 0;
    let mut number = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let value: u64 = number.parse().ok()?;
        number.clear();
        let unit = match c {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return None,
        };
        total = total.checked_add(value.checked_mul(unit)?)?;
    }
    if !number.is_empty() {
        return None;
    }
    Some(Duration::from_secs(total))
}

/// Checks a prefix given by an API caller (directory of stagely.yaml in the repository).
pub fn clean_prefix(prefix: &str) -> Option<String> {
    if prefix.is_empty() {
        return Some(String::new());
    }
    clean_relative(prefix).map(|p| if p == "." { String::new() } else { p })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = r#"
builds:
  backend_amd64:
    context: "./api"
    platform: "linux/amd64"
    machine: "medium"

  worker_arm64:
    context: "./worker"
    platform: "linux/arm64"
    machine: "small"

  frontend:
    context: "./web"
    platform: "linux/amd64"
    machine: "large"
"#;

    #[test]
    fn the_seed_example_gives_one_job_per_build() {
        let plans = parse(SEED, "").unwrap();
        let names: Vec<_> = plans.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["backend_amd64", "frontend", "worker_arm64"]);
        let worker = &plans[2];
        assert_eq!(worker.architecture, "arm64");
        assert_eq!(worker.machine, MachineSize::Small);
        assert_eq!(worker.spec.context_path, "worker");
        assert_eq!(worker.spec.dockerfile, "Dockerfile");
        assert_eq!(worker.spec.timeout_seconds, 30 * 60);
    }

    #[test]
    fn prefix_is_applied_to_contexts() {
        let plans = parse(SEED, "examples/monorepo").unwrap();
        assert_eq!(plans[0].spec.context_path, "examples/monorepo/api");
        let root = parse(
            "builds:\n  a:\n    context: .\n    platform: linux/amd64\n",
            "x/",
        )
        .unwrap();
        assert_eq!(root[0].spec.context_path, "x");
    }

    #[test]
    fn multi_arch_expands_to_platform_jobs_and_a_merge() {
        let text = r#"
builds:
  app:
    context: "."
    platforms:
      - "linux/amd64"
      - "linux/arm64"
    machine: "medium"
    timeout: "45m"
"#;
        let plans = parse(text, "").unwrap();
        let names: Vec<_> = plans.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["app_amd64", "app_arm64", "app_merge"]);
        assert_eq!(plans[2].architecture, "multi");
        assert_eq!(
            plans[2].spec.kind,
            JobKind::Merge {
                sources: vec!["app_amd64".into(), "app_arm64".into()]
            }
        );
        assert_eq!(plans[0].spec.timeout_seconds, 45 * 60);
    }

    fn error(text: &str) -> String {
        parse(text, "").unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(
            error("builds:\n  api:\n    context: ./api\n    platform: linux/s390x\n"),
            "stagely.yaml: builds.api.platform: `linux/s390x` is not supported (linux/amd64 or linux/arm64)"
        );
        assert_eq!(
            error("builds:\n  api:\n    context: ../x\n    platform: linux/amd64\n"),
            "stagely.yaml: builds.api.context: `../x` must be a relative path inside the repository (no `..`, not absolute)"
        );
        assert!(
            error(
                "builds:\n  api:\n    context: .\n    platform: linux/amd64\n    machine: huge\n"
            )
            .contains("builds.api.machine: `huge`")
        );
        assert!(
            error(
                "builds:\n  api:\n    context: .\n    platform: linux/amd64\n    timeout: soon\n"
            )
            .contains("builds.api.timeout")
        );
        assert!(
            error("builds:\n  api:\n    context: .\n")
                .contains("one of `platform` or `platforms` is required")
        );
        assert!(error("builds:\n  api:\n    context: .\n    platform: linux/amd64\n    platforms: [linux/arm64]\n").contains("not both"));
        assert!(error("builds:\n  api:\n    context: .\n    platform: linux/amd64\n    build_args:\n      1BAD: x\n").contains("builds.api.build_args"));
        assert!(error("builds: {}\n").contains("at least one build"));
    }

    #[test]
    fn unknown_and_duplicate_keys_are_refused_with_a_location() {
        let unknown = error("builds:\n  api:\n    context: .\n    platfrom: linux/amd64\n");
        assert!(unknown.contains("platfrom"), "{unknown}");
        assert!(unknown.contains("line"), "{unknown}");
        let duplicate =
            error("builds:\n  api:\n    context: .\n    context: ./b\n    platform: linux/amd64\n");
        assert!(
            duplicate.to_lowercase().contains("duplicate"),
            "{duplicate}"
        );
        let top = error("build:\n  api:\n    context: .\n");
        assert!(top.contains("build"), "{top}");
    }

    #[test]
    fn merge_names_may_not_collide() {
        let text = "builds:\n  app:\n    context: .\n    platforms: [linux/amd64, linux/arm64]\n  app_merge:\n    context: .\n    platform: linux/amd64\n";
        assert!(error(text).contains("app_merge"));
    }

    #[test]
    fn names_that_map_to_one_image_tag_are_refused() {
        let text = "builds:\n  App:\n    context: .\n    platform: linux/amd64\n  app:\n    context: .\n    platform: linux/amd64\n";
        assert!(
            error(text).contains("same image tag `app`"),
            "{}",
            error(text)
        );
        let text = "builds:\n  app-amd64:\n    context: .\n    platform: linux/amd64\n  app:\n    context: .\n    platforms: [linux/amd64, linux/arm64]\n";
        assert!(error(text).contains("app-amd64"), "{}", error(text));
    }

    #[test]
    fn alias_amplification_is_refused() {
        // One anchored 100 KB string repeated through 100 aliases would be ~10 MB of
        // build_args per job.
        let big = "x".repeat(100 * 1024);
        let mut text = format!(
            "builds:\n  a:\n    context: .\n    platform: linux/amd64\n    build_args:\n      A0: &big {big}\n"
        );
        for i in 1..=100 {
            text.push_str(&format!("      A{i}: *big\n"));
        }
        let first = error(&text).to_lowercase();
        assert!(first.contains("alias"), "{first}");
        // Few aliases per anchor, but the expanded text is still too much: 20 anchored
        // 8000-byte values, each repeated once (160 KB of file, 320 KB expanded).
        let mut text =
            "builds:\n  a:\n    context: .\n    platform: linux/amd64\n    build_args:\n"
                .to_string();
        for i in 0..20 {
            let value = format!("{i:02}").repeat(4000);
            text.push_str(&format!("      A{i}: &v{i} {value}\n      B{i}: *v{i}\n"));
        }
        assert!(text.len() < 256 * 1024);
        assert!(error(&text).contains("expands to"), "{}", error(&text));
    }

    #[test]
    fn build_arg_values_are_bounded_and_printable() {
        let nul = "builds:\n  a:\n    context: .\n    platform: linux/amd64\n    build_args:\n      X: \"a\\0b\"\n";
        assert_eq!(
            error(nul),
            "stagely.yaml: builds.a.build_args.X: the value contains a NUL byte"
        );
        let long = format!(
            "builds:\n  a:\n    context: .\n    platform: linux/amd64\n    build_args:\n      X: {}\n",
            "v".repeat(MAX_BUILD_ARG_VALUE + 1)
        );
        assert!(error(&long).starts_with("stagely.yaml: builds.a.build_args.X: the value is"));
        let bell = "builds:\n  a:\n    context: .\n    platform: linux/amd64\n    build_args:\n      X: \"a\\bb\"\n";
        assert!(error(bell).contains("control character"), "{}", error(bell));
        let ok = "builds:\n  a:\n    context: .\n    platform: linux/amd64\n    build_args:\n      X: \"line1\\nline2\\tend\"\n";
        assert!(parse(ok, "").is_ok());
    }

    #[test]
    fn secret_build_args_are_names_only() {
        let text = "builds:\n  a:\n    context: .\n    platform: linux/amd64\n    secret_build_args: [NPM_TOKEN]\n";
        assert_eq!(
            parse(text, "").unwrap()[0].spec.secret_build_args,
            ["NPM_TOKEN"]
        );
        let both = "builds:\n  a:\n    context: .\n    platform: linux/amd64\n    build_args: {NPM_TOKEN: x}\n    secret_build_args: [NPM_TOKEN]\n";
        assert!(
            error(both).contains("builds.a.secret_build_args: `NPM_TOKEN` is also in build_args")
        );
        let bad = "builds:\n  a:\n    context: .\n    platform: linux/amd64\n    secret_build_args: [\"A B\"]\n";
        assert!(error(bad).contains("builds.a.secret_build_args"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("45m"), Some(Duration::from_secs(2700)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("90"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("10x"), None);
        assert_eq!(parse_duration("m"), None);
        assert_eq!(parse_duration("5m3"), None);
    }
}
