//! Reads `stagely.yaml` out of a repository at a commit, for submissions that do not carry it.
//!
//! The same way an agent fetches: a shallow fetch of exactly that commit into a scratch
//! repository (falling back to all branches for servers that refuse fetching by id), then
//! `git show <commit>:<dir>/stagely.yaml`. Nothing is checked out.

use std::time::Duration;

use tokio::process::Command;

/// A command for `program` that inherits only [`stagely_protocol::INHERITED_ENV`] from the
/// core: the core's secrets (`STAGELY_REGISTRY_PASSWORD`, `STAGELY_API_TOKEN`) never reach a
/// git or registry process it starts.
pub fn child_command(program: &str) -> Command {
    let mut command = Command::new(program);
    command
        .env_clear()
        .envs(stagely_protocol::inherited_env(std::env::var_os));
    command
}

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

/// How git authenticates: the clone token (for scrubbing errors) and the 0600 git config
/// file holding its header (`GIT_CONFIG_GLOBAL`).
#[derive(Clone, Copy)]
struct GitAuth<'a> {
    clone_token: Option<&'a str>,
    config_file: Option<&'a std::path::Path>,
}

async fn git(
    dir: &std::path::Path,
    args: &[&str],
    auth: GitAuth<'_>,
    allow_local_repos: bool,
) -> Result<Vec<u8>, String> {
    let clone_token = auth.clone_token;
    let mut command = child_command("git");
    command.env(
        "GIT_ALLOW_PROTOCOL",
        stagely_protocol::git_allowed_protocols(allow_local_repos),
    );
    // Only the file's path is in git's environment, never the token.
    if let Some(file) = auth.config_file {
        command.env("GIT_CONFIG_GLOBAL", file);
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
        Err(git_error_text(&output.stderr, clone_token))
    }
}

/// Writes `text` to `path` readable by its owner only.
fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?
        .write_all(text.as_bytes())
}

/// Most of git's error output worth showing.
const GIT_ERROR_CHARS: usize = 800;

/// git's error output as one line: its `fatal:`/`error:` lines (and any others) without the
/// `hint:` lines that often come last, capped, with the clone token scrubbed.
fn git_error_text(stderr: &[u8], clone_token: Option<&str>) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with("hint:"))
        .collect();
    if lines.is_empty() {
        return "no error output".into();
    }
    let mut joined = lines.join(" | ");
    if let Some(token) = clone_token.filter(|t| !t.is_empty()) {
        joined = joined.replace(token, "[REDACTED]");
    }
    if joined.chars().count() > GIT_ERROR_CHARS {
        // Keep the end: git's last lines say what finally failed.
        let skip = joined.chars().count() - GIT_ERROR_CHARS;
        joined = format!("…{}", joined.chars().skip(skip).collect::<String>());
    }
    joined
}

/// Returns the text of `<dir>/stagely.yaml` in `repo` at `commit`.
pub async fn read_config(
    repo: &str,
    commit: &str,
    dir: &str,
    clone_token: Option<&str>,
    allow_local_repos: bool,
) -> Result<String, SourceError> {
    let scratch = tempfile::tempdir().map_err(SourceError::Scratch)?;
    // The token's git config lives outside the scratch repository, mode 0600.
    let secrets = tempfile::tempdir().map_err(SourceError::Scratch)?;
    let config_file = secrets.path().join("gitconfig");
    if let Some(token) = clone_token {
        write_private(&config_file, &stagely_protocol::git_auth_config(token))
            .map_err(SourceError::Scratch)?;
    }
    let auth = GitAuth {
        clone_token,
        config_file: clone_token.map(|_| config_file.as_path()),
    };
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
    git(scratch.path(), &["init", "-q"], auth, allow_local_repos)
        .await
        .map_err(|detail| error("init", detail))?;
    if git(
        scratch.path(),
        &["fetch", "-q", "--depth", "1", "--no-tags", repo, commit],
        auth,
        allow_local_repos,
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
            auth,
            allow_local_repos,
        )
        .await
        .map_err(|detail| error("fetch", detail))?;
    }
    let object = format!("{commit}:{path}");
    let Ok(size) = git(
        scratch.path(),
        &["cat-file", "-s", &object],
        auth,
        allow_local_repos,
    )
    .await
    else {
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
    if size > stagely_api::MAX_CONFIG_BYTES {
        return Err(SourceError::TooLarge {
            path,
            size,
            max: stagely_api::MAX_CONFIG_BYTES,
        });
    }
    match git(scratch.path(), &["show", &object], auth, allow_local_repos).await {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_reads_the_clone_token_header_from_its_private_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("gitconfig");
        write_private(&file, &stagely_protocol::git_auth_config("tok-123")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let output = std::process::Command::new("git")
            .args(["config", "--global", "--get", "http.extraheader"])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("GIT_CONFIG_GLOBAL", &file)
            .output()
            .unwrap();
        use base64::Engine;
        let expected = format!(
            "Authorization: Basic {}",
            base64::engine::general_purpose::STANDARD.encode("x-access-token:tok-123")
        );
        assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), expected);
    }

    #[test]
    fn git_errors_keep_every_line_but_hints() {
        let stderr = b"error: RPC failed\nfatal: repository 'https://x/r/' not found\nhint: try this\nhint: or that\n";
        assert_eq!(
            git_error_text(stderr, None),
            "error: RPC failed | fatal: repository 'https://x/r/' not found"
        );
        let long = format!("fatal: {}\n", "x".repeat(5000));
        assert!(git_error_text(long.as_bytes(), None).chars().count() <= GIT_ERROR_CHARS + 1);
        assert_eq!(
            git_error_text(b"fatal: bad tok-3n-secret\n", Some("tok-3n-secret")),
            "fatal: bad [REDACTED]"
        );
    }
}
