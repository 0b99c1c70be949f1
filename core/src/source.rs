//! Reads `stagely.yaml` out of a repository at a commit, for submissions that do not carry it.
//!
//! The same way an agent fetches: a shallow fetch of exactly that commit into a scratch
//! repository (falling back to all branches for servers that refuse fetching by id), then
//! `git show <commit>:<dir>/stagely.yaml`. Nothing is checked out.

use std::time::Duration;

use tokio::process::Command;

const GIT_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot create a scratch directory: {0}")]
    Scratch(std::io::Error),
    #[error("git {step} failed for {repo} at {commit}: {detail}")]
    Git {
        step: &'static str,
        repo: String,
        commit: String,
        detail: String,
    },
    #[error("{path} is {size} bytes; at most {max} are accepted")]
    TooLarge {
        path: String,
        size: usize,
        max: usize,
    },
    #[error("{repo} has no {path} at commit {commit}")]
    NoConfig {
        repo: String,
        commit: String,
        path: String,
    },
}

async fn git(
    dir: &std::path::Path,
    args: &[&str],
    clone_token: Option<&str>,
) -> Result<Vec<u8>, String> {
    let mut command = Command::new("git");
    if let Some(token) = clone_token {
        command.envs(stagely_protocol::git_auth_env(token));
    }
    let output = tokio::time::timeout(
        GIT_TIMEOUT,
        command
            .arg("-C")
            .arg(dir)
            .args(args)
            .env("GIT_TERMINAL_PROMPT", "0")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| format!("timed out after {}s", GIT_TIMEOUT.as_secs()))?
    .map_err(|error| format!("cannot run git: {error}"))?;
    if output.status.success() {
        Ok(output.stdout)
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr
            .lines()
            .rev()
            .find(|line| !line.trim().is_empty())
            .unwrap_or("no error output");
        Err(last.chars().take(300).collect())
    }
}

/// Returns the text of `<dir>/stagely.yaml` in `repo` at `commit`.
pub async fn read_config(
    repo: &str,
    commit: &str,
    dir: &str,
    clone_token: Option<&str>,
) -> Result<String, SourceError> {
    let scratch = tempfile::tempdir().map_err(SourceError::Scratch)?;
    let path = if dir.is_empty() {
        "stagely.yaml".to_string()
    } else {
        format!("{dir}/stagely.yaml")
    };
    let error = |step: &'static str, detail: String| SourceError::Git {
        step,
        repo: repo.to_string(),
        commit: commit.to_string(),
        detail,
    };
    git(scratch.path(), &["init", "-q"], clone_token)
        .await
        .map_err(|detail| error("init", detail))?;
    if git(
        scratch.path(),
        &["fetch", "-q", "--depth", "1", "--no-tags", repo, commit],
        clone_token,
    )
    .await
    .is_err()
    {
        git(
            scratch.path(),
            &[
                "fetch",
                "-q",
                "--no-tags",
                repo,
                "+refs/heads/*:refs/remotes/origin/*",
            ],
            clone_token,
        )
        .await
        .map_err(|detail| error("fetch", detail))?;
    }
    let object = format!("{commit}:{path}");
    let Ok(size) = git(scratch.path(), &["cat-file", "-s", &object], clone_token).await else {
        return Err(SourceError::NoConfig {
            repo: repo.to_string(),
            commit: commit.to_string(),
            path,
        });
    };
    let size: usize = String::from_utf8_lossy(&size)
        .trim()
        .parse()
        .unwrap_or(usize::MAX);
    if size > crate::api::MAX_CONFIG_BYTES {
        return Err(SourceError::TooLarge {
            path,
            size,
            max: crate::api::MAX_CONFIG_BYTES,
        });
    }
    match git(scratch.path(), &["show", &object], clone_token).await {
        Ok(bytes) => {
            String::from_utf8(bytes).map_err(|_| error("show", format!("{path} is not UTF-8 text")))
        }
        Err(_) => Err(SourceError::NoConfig {
            repo: repo.to_string(),
            commit: commit.to_string(),
            path,
        }),
    }
}
