//! Submission: the one path from a request to a stored run in the runner's hands. It checks
//! the request, reads `stagely.yaml` (from the request or from git at the commit), plans the
//! jobs, resolves the secret build arguments, checks every work frame fits the agent
//! connection, stores the run, hands it to the runner and supersedes the environment's older
//! unfinished runs. `POST /api/v1/workflows` and `.../rebuild` call it (so does `stagely run`,
//! through the API), and the coming webhook will; it only ever calls downwards (runner,
//! source, stagely_yaml, store).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use stagely_api::{MAX_CONFIG_BYTES, RebuildRequest, SubmitRequest};
use stagely_protocol::MAX_FRAME_BYTES;

use crate::db::{DbError, NewJob, NewRun};
use crate::engine::CancelReason;
use crate::runner::{RunSecrets, Runner, RunnerError};
use crate::source;
use crate::stagely_yaml;

/// Why a submission was refused; each names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// A request field is wrong (`field` is its path: `branch`, `secrets.TOKEN`).
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// The repository or its `stagely.yaml` could not be read.
    #[error("{0}")]
    Unreadable(String),
    /// Too many submissions are reading from git now; come back in `retry_after_secs`.
    #[error("{message}")]
    Busy {
        message: String,
        retry_after_secs: u64,
    },
    #[error("{what} `{id}` not found")]
    NotFound { what: &'static str, id: String },
    #[error("the core is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Db(#[from] DbError),
}

fn invalid(field: &str, message: impl Into<String>) -> SubmitError {
    SubmitError::Invalid {
        field: field.to_string(),
        message: message.into(),
    }
}

/// How many submissions may read `stagely.yaml` from git at once, and for how long each.
#[derive(Debug, Clone, Copy)]
pub struct GitReadLimits {
    pub max_concurrent: usize,
    pub timeout: Duration,
}

/// The submission path: the runner it hands runs to and the permits for git reads.
#[derive(Clone)]
pub struct Submissions {
    runner: Runner,
    git_reads: Arc<tokio::sync::Semaphore>,
    limits: GitReadLimits,
}

impl Submissions {
    pub fn new(runner: Runner, limits: GitReadLimits) -> Submissions {
        Submissions {
            runner,
            git_reads: Arc::new(tokio::sync::Semaphore::new(limits.max_concurrent)),
            limits,
        }
    }

    /// A new run of `request`, stored and handed to the runner: its id.
    pub async fn submit(
        &self,
        request: SubmitRequest,
        submitted_by: Option<String>,
    ) -> Result<String, SubmitError> {
        let runner = &self.runner;
        let (trigger, config_dir) = validate_submit(&request, runner.settings().allow_local_repos)?;
        if runner.is_shutting_down() {
            return Err(SubmitError::ShuttingDown);
        }
        let text = match &request.stagely_yaml {
            Some(text) => text.clone(),
            None => self.read_config(&request, &config_dir).await?,
        };
        let pipeline = stagely_yaml::parse_pipeline(&text, &config_dir)
            .map_err(|error| invalid("stagely_yaml", error.to_string()))?;
        let plans = pipeline.jobs;
        let build_secrets = resolve_build_secrets(
            &plans,
            request.secrets.as_ref(),
            &runner.settings().build_secrets,
        )?;
        let run_id = uuid::Uuid::new_v4().to_string();
        let jobs: Vec<NewJob> = plans
            .iter()
            .map(|plan| NewJob {
                id: uuid::Uuid::new_v4().to_string(),
                name: plan.name.clone(),
                architecture: plan.architecture.clone(),
                platform: plan.platform.clone(),
                machine: plan.machine.as_str().to_string(),
                spec: plan.spec.clone(),
            })
            .collect();
        let run = NewRun {
            id: run_id.clone(),
            environment_id: request.environment_id,
            trigger,
            repo_url: request.repo_url,
            commit_hash: request.commit_hash,
            branch: request.branch,
            config_path: config_dir,
            fail_fast: pipeline.fail_fast,
            submitted_by,
        };
        let secrets = RunSecrets {
            clone_token: request.clone_token,
            build_secrets,
        };
        check_work_frames(runner, &run, &plans, &jobs, &secrets)?;
        start_run(runner, &run, &jobs, secrets).await?;
        Ok(run_id)
    }

    /// Reads `stagely.yaml` from the repository at the commit: a few reads at once (each runs
    /// git), the rest told to come back; each within the configured time.
    async fn read_config(
        &self,
        request: &SubmitRequest,
        config_dir: &str,
    ) -> Result<String, SubmitError> {
        let Ok(_permit) = self.git_reads.clone().try_acquire_owned() else {
            return Err(SubmitError::Busy {
                message: format!(
                    "{} submissions are already reading stagely.yaml from git; retry shortly or send stagely_yaml in the request",
                    self.limits.max_concurrent
                ),
                retry_after_secs: 5,
            });
        };
        let read = source::read_config(
            &request.repo_url,
            &request.commit_hash,
            config_dir,
            request.clone_token.as_deref(),
            self.runner.settings().allow_local_repos,
        );
        match tokio::time::timeout(self.limits.timeout, read).await {
            Ok(result) => result.map_err(|error| SubmitError::Unreadable(error.to_string())),
            Err(_) => Err(SubmitError::Unreadable(format!(
                "reading stagely.yaml from the repository took longer than {}s",
                self.limits.timeout.as_secs()
            ))),
        }
    }

    /// A new run from the environment's latest run (same repository, commit, branch and
    /// jobs), executed from scratch: its id. The secrets are sent again (none is stored).
    pub async fn rebuild(
        &self,
        environment_id: &str,
        body: RebuildRequest,
        submitted_by: Option<String>,
    ) -> Result<String, SubmitError> {
        let runner = &self.runner;
        if runner.is_shutting_down() {
            return Err(SubmitError::ShuttingDown);
        }
        let db = runner.db();
        let latest = db
            .latest_run_of_environment(environment_id)
            .await?
            .ok_or_else(|| SubmitError::NotFound {
                what: "environment",
                id: environment_id.to_string(),
            })?;
        let old_jobs = db.jobs_of_run(&latest.id).await?;
        let plans: Vec<stagely_yaml::JobPlan> = old_jobs
            .iter()
            .map(|job| stagely_yaml::JobPlan {
                name: job.name.clone(),
                architecture: job.architecture.clone(),
                platform: job.platform.clone(),
                machine: stagely_provisioning::MachineSize::parse(&job.machine)
                    .unwrap_or(stagely_provisioning::MachineSize::Medium),
                spec: job.spec.clone(),
            })
            .collect();
        let build_secrets = resolve_build_secrets(
            &plans,
            body.secrets.as_ref(),
            &runner.settings().build_secrets,
        )?;
        let run_id = uuid::Uuid::new_v4().to_string();
        let jobs: Vec<NewJob> = old_jobs
            .iter()
            .map(|job| NewJob {
                id: uuid::Uuid::new_v4().to_string(),
                name: job.name.clone(),
                architecture: job.architecture.clone(),
                platform: job.platform.clone(),
                machine: job.machine.clone(),
                spec: job.spec.clone(),
            })
            .collect();
        let run = NewRun {
            id: run_id.clone(),
            environment_id: environment_id.to_string(),
            trigger: "manual".into(),
            repo_url: latest.repo_url,
            commit_hash: latest.commit_hash,
            branch: latest.branch,
            config_path: latest.config_path,
            fail_fast: latest.fail_fast,
            submitted_by,
        };
        let secrets = RunSecrets {
            clone_token: body.clone_token,
            build_secrets,
        };
        check_work_frames(runner, &run, &plans, &jobs, &secrets)?;
        start_run(runner, &run, &jobs, secrets).await?;
        Ok(run_id)
    }
}

/// Characters that change how text around them is shown without being visible: bidi
/// embeddings, overrides, isolates and marks (`feat/\u{202e}txt.exe` shows as `feat/exe.txt`),
/// zero-width spaces and joiners, the byte-order mark.
fn is_invisible_formatting(c: char) -> bool {
    matches!(c,
        '\u{061c}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2064}'
        | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

/// A branch name git's `check-ref-format --branch` would take, without invisible formatting
/// characters (which neither git nor GitHub need, and which would reach log lines).
fn check_branch(branch: &str) -> Result<(), String> {
    if branch.is_empty() || branch.len() > 255 {
        return Err("must be a git branch name of 1-255 bytes".into());
    }
    if let Some(c) = branch.chars().find(|c| is_invisible_formatting(*c)) {
        return Err(format!(
            "contains the invisible formatting character U+{:04X} (bidi or zero-width)",
            c as u32
        ));
    }
    if let Some(c) = branch
        .chars()
        .find(|c| c.is_control() || matches!(c, ' ' | '~' | '^' | ':' | '?' | '*' | '[' | '\\'))
    {
        return Err(format!(
            "must be a git branch name: `{}` is not allowed",
            c.escape_debug()
        ));
    }
    let bad_shape = branch.starts_with('-')
        || branch.starts_with('/')
        || branch.ends_with('/')
        || branch.ends_with('.')
        || branch.ends_with(".lock")
        || branch.contains("..")
        || branch.contains("//")
        || branch.contains("@{")
        || branch == "@"
        || branch.split('/').any(|part| part.starts_with('.'));
    if bad_shape {
        return Err("must be a git branch name (see git check-ref-format)".into());
    }
    Ok(())
}

fn validate_submit(
    request: &SubmitRequest,
    allow_local_repos: bool,
) -> Result<(String, String), SubmitError> {
    crate::repo_url::check(&request.repo_url, allow_local_repos)
        .map_err(|error| invalid("repo_url", error.to_string()))?;
    let hash = &request.commit_hash;
    if !(hash.len() == 40 || hash.len() == 64) || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid(
            "commit_hash",
            format!("`{hash}` is not a full commit id (40 or 64 hexadecimal digits)"),
        ));
    }
    check_branch(&request.branch).map_err(|problem| invalid("branch", problem))?;
    if !crate::config::valid_repo_component(&request.environment_id) {
        return Err(invalid(
            "environment_id",
            format!(
                "`{}` {}",
                request.environment_id.escape_debug(),
                crate::config::REPO_COMPONENT_RULE
            ),
        ));
    }
    let trigger = request.trigger.clone().unwrap_or_else(|| "manual".into());
    if !matches!(trigger.as_str(), "pr_opened" | "pr_synchronized" | "manual") {
        return Err(invalid(
            "trigger",
            format!("`{trigger}` is not one of pr_opened, pr_synchronized, manual"),
        ));
    }
    let config_dir = match &request.config_dir {
        None => String::new(),
        Some(dir) => stagely_yaml::clean_prefix(dir).ok_or_else(|| {
            invalid(
                "config_dir",
                "must be a relative directory inside the repository",
            )
        })?,
    };
    if let Some(token) = &request.clone_token
        && (token.is_empty() || token.len() > 4096 || token.contains(|c: char| c.is_control()))
    {
        return Err(invalid(
            "clone_token",
            "must be 1-4096 printable characters",
        ));
    }
    if let Some(text) = &request.stagely_yaml
        && text.len() > MAX_CONFIG_BYTES
    {
        return Err(invalid(
            "stagely_yaml",
            format!(
                "is {} bytes; at most {MAX_CONFIG_BYTES} are accepted",
                text.len()
            ),
        ));
    }
    Ok((trigger, config_dir))
}

/// Every work frame must fit the agent connection: refused at submission, not discovered
/// when it is sent.
fn check_work_frames(
    runner: &Runner,
    run: &NewRun,
    plans: &[stagely_yaml::JobPlan],
    jobs: &[NewJob],
    secrets: &RunSecrets,
) -> Result<(), SubmitError> {
    let draft_run = run.draft_row();
    for (plan, job) in plans.iter().zip(jobs) {
        let bytes = crate::runner::work_frame_bytes(
            runner.settings(),
            &draft_run,
            &job.draft_row(&run.id),
            &plan.spec,
            secrets,
        );
        if bytes > MAX_FRAME_BYTES {
            return Err(invalid(
                "stagely_yaml",
                format!(
                    "builds.{}: the job's work frame would be {bytes} bytes; the agent connection carries at most {MAX_FRAME_BYTES} (shorten build_args or secrets)",
                    plan.spec.service
                ),
            ));
        }
    }
    Ok(())
}

/// Stores a run, supersedes the environment's older unfinished runs, and hands it to the
/// runner.
async fn start_run(
    runner: &Runner,
    run: &NewRun,
    jobs: &[NewJob],
    secrets: RunSecrets,
) -> Result<(), SubmitError> {
    let db = runner.db();
    let stored = db.create_run(run, jobs, crate::clock::now()).await?;
    tracing::info!(run_id = %run.id, jobs = jobs.len(), "run submitted");
    // Handed to the runner first: its jobs are eligible now, and cancelling the older runs
    // need not delay them.
    let rows = (
        run.draft_row(),
        jobs.iter().map(|job| job.draft_row(&run.id)).collect(),
    );
    if runner.submitted(stored, rows, secrets).await.is_err() {
        return Err(SubmitError::ShuttingDown);
    }
    // The run is accepted whatever happens here: a failure to supersede is logged, not
    // answered as an error for a run that will build.
    let older_runs = match db
        .unfinished_runs_of_environment(&run.environment_id, &run.id)
        .await
    {
        Ok(runs) => runs,
        Err(error) => {
            tracing::error!(run_id = %run.id, "finding the runs it supersedes failed: {error}");
            Vec::new()
        }
    };
    for older in older_runs {
        let reason = CancelReason::Superseded { by: run.id.clone() };
        match runner.cancel(&older, reason).await {
            Ok(()) => tracing::info!(run_id = %older, by = %run.id, "run superseded"),
            // It finished meanwhile: nothing to supersede.
            Err(RunnerError::Command(_)) => {}
            Err(error) => tracing::warn!(run_id = %older, "superseding failed: {error}"),
        }
    }
    Ok(())
}

/// The values of every secret build argument the plans declare: from the submission, else
/// from the core's `[secrets]`. Every declared name needs a value, and every submitted value
/// a declaring build (a typo would otherwise build without the secret).
fn resolve_build_secrets(
    plans: &[stagely_yaml::JobPlan],
    submitted: Option<&BTreeMap<String, String>>,
    configured: &BTreeMap<String, stagely_protocol::Secret>,
) -> Result<BTreeMap<String, stagely_protocol::Secret>, SubmitError> {
    let empty = BTreeMap::new();
    let submitted = submitted.unwrap_or(&empty);
    for (name, value) in submitted {
        let field = format!("secrets.{name}");
        if !stagely_yaml::valid_arg_name(name) {
            return Err(invalid("secrets", "names must be letters, digits and `_`"));
        }
        if value.is_empty() {
            return Err(invalid(&field, "must not be empty"));
        }
        stagely_yaml::check_arg_value(value).map_err(|problem| invalid(&field, problem))?;
        if !plans
            .iter()
            .any(|plan| plan.spec.secret_build_args.contains(name))
        {
            return Err(invalid(&field, "no build lists it in secret_build_args"));
        }
    }
    let mut resolved = BTreeMap::new();
    for plan in plans {
        for name in &plan.spec.secret_build_args {
            let value = match submitted.get(name) {
                Some(value) => stagely_protocol::Secret(value.clone()),
                None => configured.get(name).cloned().ok_or_else(|| {
                    invalid(
                        "secrets",
                        format!(
                            "`{name}` is listed in builds.{}.secret_build_args but has no value: send it in `secrets` or set it in the core's [secrets]",
                            plan.spec.service
                        ),
                    )
                })?,
            };
            resolved.insert(name.clone(), value);
        }
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branches_with_invisible_formatting_or_bad_ref_syntax_are_refused() {
        for good in ["main", "feature/x", "release-1.2", "user/fix_42", "ünïcode"] {
            assert_eq!(check_branch(good), Ok(()), "{good}");
        }
        let bidi = check_branch("feat/\u{202e}txt.exe").unwrap_err();
        assert!(bidi.contains("U+202E"), "{bidi}");
        for bad in [
            "a\u{200b}b",
            "a\u{2066}b",
            "\u{feff}main",
            "a\u{200f}",
            "",
            "-x",
            "a..b",
            "a b",
            "a~1",
            "a:b",
            "a/",
            "/a",
            "a//b",
            "a.lock",
            "a/.hidden",
            "a@{1}",
            "a\x1bb",
        ] {
            assert!(check_branch(bad).is_err(), "{bad:?}");
        }
    }
}
