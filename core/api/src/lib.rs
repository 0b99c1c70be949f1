//! The Stagely API's types: what `POST /api/v1/workflows` and the other routes take and
//! answer, and the limits both sides know. The server (`stagely-server`), the `stagely` CLI
//! and the tests share them; this crate does no I/O and depends on nothing of ours.

use serde::{Deserialize, Serialize};

/// Largest `stagely.yaml` accepted.
pub const MAX_CONFIG_BYTES: usize = 256 * 1024;

/// Largest `POST /api/v1/workflows` body (a `stagely.yaml` of [`MAX_CONFIG_BYTES`] and the
/// other fields, JSON-escaped).
pub const MAX_SUBMIT_BODY_BYTES: usize = 2 * MAX_CONFIG_BYTES + 64 * 1024;

/// `POST /api/v1/workflows`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    /// A git URL, or a path on the core's machine (local provider).
    pub repo_url: String,
    /// Full commit id (40 or 64 hex digits).
    pub commit_hash: String,
    pub branch: String,
    /// Lowercase identifier; images go to `<registry>/<namespace>/<environment_id>:<job>`.
    pub environment_id: String,
    /// `pr_opened`, `pr_synchronized` or `manual` (default).
    #[serde(default)]
    pub trigger: Option<String>,
    /// The `stagely.yaml` text; when absent it is read from the repository at the commit.
    #[serde(default)]
    pub stagely_yaml: Option<String>,
    /// Directory of `stagely.yaml` inside the repository (default: the root); build
    /// contexts are relative to it.
    #[serde(default)]
    pub config_dir: Option<String>,
    /// Token for a private HTTPS repository. Used for this run only: never stored, never
    /// logged, never shown by the API.
    #[serde(default)]
    pub clone_token: Option<String>,
    /// Values of secret build arguments (`secret_build_args`), name → value. Like
    /// `clone_token`: kept in memory for this run only, never stored or shown.
    #[serde(default)]
    pub secrets: Option<std::collections::BTreeMap<String, String>>,
}

impl std::fmt::Debug for SubmitRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubmitRequest")
            .field("repo_url", &self.repo_url)
            .field("commit_hash", &self.commit_hash)
            .field("branch", &self.branch)
            .field("environment_id", &self.environment_id)
            .field("trigger", &self.trigger)
            .field("config_dir", &self.config_dir)
            .field(
                "clone_token",
                &self.clone_token.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "secrets",
                &self
                    .secrets
                    .as_ref()
                    .map(|all| all.keys().collect::<Vec<_>>()),
            )
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RunView {
    pub id: String,
    pub environment_id: String,
    pub trigger: String,
    pub status: String,
    pub repo_url: String,
    pub commit_hash: String,
    pub branch: String,
    pub config_dir: String,
    pub error_message: Option<String>,
    /// Unix milliseconds.
    pub created_at: i64,
    pub updated_at: i64,
    pub fail_fast: bool,
    /// Why the run is being (or was) cancelled: `user`, `superseded:<run>`, `fail_fast:<job>`.
    pub cancel_reason: Option<String>,
    /// The name of the API token that submitted or rebuilt the run (`None` for runs stored
    /// before it was recorded).
    #[serde(default)]
    pub submitted_by: Option<String>,
    /// Estimated USD of every priced job; `None` when none is priced.
    pub cost_usd: Option<f64>,
    pub jobs: Vec<JobView>,
}

/// One attempt of a job.
#[derive(Debug, Serialize, Deserialize)]
pub struct AttemptView {
    pub number: i32,
    /// The core that ran it.
    pub owner: String,
    pub instance_id: Option<String>,
    /// For merges: `last_builder` or `fresh_instance`.
    pub merge_path: Option<String>,
    /// Unix milliseconds.
    pub started_at: i64,
    pub connected_at: Option<i64>,
    pub ended_at: Option<i64>,
    /// `completed`, `failed`, `cancelled` or `infrastructure` once ended.
    pub outcome: Option<String>,
    pub message: Option<String>,
    /// The provider's machine type (`c5.xlarge`, `local`).
    pub instance_type: Option<String>,
    /// `on-demand` or `spot` where the cloud bills it.
    pub market: Option<String>,
    /// How the instance was placed when not as asked (spot fell back to on-demand, emulated).
    pub placement: Option<String>,
    /// Seconds this attempt is billed for (until now while its instance lives).
    pub billed_seconds: Option<u64>,
    /// Estimated USD from the price table; `None` for an unpriced type.
    pub cost_usd: Option<f64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct JobView {
    pub id: String,
    pub name: String,
    pub status: String,
    pub architecture: String,
    pub platform: String,
    pub machine: String,
    pub vm_id: Option<String>,
    pub artifact_url: Option<String>,
    pub digest: Option<String>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub exit_code: Option<i32>,
    pub error_message: Option<String>,
    /// Why it failed: `build`, `timeout`, `infrastructure` or `protocol`.
    pub failure_kind: Option<String>,
    /// For merges: where it ran (`last_builder` or `fresh_instance`).
    pub merge_path: Option<String>,
    /// Estimated USD of every priced attempt; `None` when none is priced.
    pub cost_usd: Option<f64>,
    pub attempts: Vec<AttemptView>,
}

/// Sums priced amounts; `None` when there are none.
pub fn sum_known(amounts: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let known: Vec<f64> = amounts.flatten().collect();
    (!known.is_empty()).then(|| (known.iter().sum::<f64>() * 10_000.0).round() / 10_000.0)
}

/// `POST /api/v1/environments/{environment_id}/rebuild` body (optional): the secrets the
/// latest run was submitted with are not stored, so they are sent again.
#[derive(Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RebuildRequest {
    #[serde(default)]
    pub clone_token: Option<String>,
    #[serde(default)]
    pub secrets: Option<std::collections::BTreeMap<String, String>>,
}

/// `GET /api/v1/queue`.
#[derive(Debug, Serialize, Deserialize)]
pub struct QueueView {
    pub jobs: Vec<QueueEntryView>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct QueueEntryView {
    pub position: usize,
    pub run_id: String,
    pub job_id: String,
    pub job_name: String,
    pub environment_id: String,
    pub attempts: u32,
    pub not_before: Option<i64>,
}

/// The `end` event of a run's event stream.
#[derive(Debug, Serialize, Deserialize)]
pub struct RunEnd {
    pub run_id: String,
    pub status: String,
    pub error_message: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogQuery {
    #[serde(default)]
    pub after: Option<i64>,
    #[serde(default)]
    pub limit: Option<i64>,
    #[serde(default)]
    pub format: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct LogPage {
    pub job_id: String,
    pub job_status: String,
    pub lines: Vec<LogLineView>,
    /// Pass as `after` to get the next page.
    pub next_after: i64,
}

/// One stored output line.
#[derive(Debug, Serialize, Deserialize)]
pub struct LogLineView {
    pub seq: i64,
    /// Unix milliseconds when the core stored it.
    pub timestamp: i64,
    /// `stdout`, `stderr` or `system` (the agent's own lines).
    pub stream: String,
    pub line: String,
    /// A piece of a line the agent cut (longer than 64 KiB): the line goes on in the next
    /// piece of the same stream. Joining the pieces gives the line back, byte for byte.
    #[serde(default)]
    pub continued: bool,
}

/// `?after=SEQ` for a log stream (`Last-Event-ID` wins when both are given).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    #[serde(default)]
    pub after: Option<i64>,
}

/// The `end` event's data.
#[derive(Debug, Serialize, Deserialize)]
pub struct StreamEnd {
    pub job_id: String,
    pub status: String,
    pub exit_code: Option<i32>,
    pub error_message: Option<String>,
}

/// Whether a run or job status is final.
pub fn is_final(status: &str) -> bool {
    matches!(status, "completed" | "failed" | "cancelled")
}

impl std::fmt::Debug for RebuildRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RebuildRequest")
            .field(
                "clone_token",
                &self.clone_token.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "secrets",
                &self
                    .secrets
                    .as_ref()
                    .map(|all| all.keys().collect::<Vec<_>>()),
            )
            .finish()
    }
}

impl RunView {
    /// Fills the job and run cost estimates from the attempts'.
    pub fn add_up_costs(&mut self) {
        for job in &mut self.jobs {
            job.cost_usd = sum_known(job.attempts.iter().map(|a| a.cost_usd));
        }
        self.cost_usd = sum_known(self.jobs.iter().map(|j| j.cost_usd));
    }
}

/// The body of every error answer: `{"error": {"code", "message", "field"?}}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// `not_found`, `invalid_field`, `bad_request`, `unprocessable`, `unavailable`, `busy`,
    /// `forbidden`, `too_many_requests`, `payload_too_large`, `request_timeout`, `conflict`,
    /// `unsupported_media_type`, `unauthorized` or `internal`.
    pub code: String,
    pub message: String,
    /// The request field at fault (`invalid_field`), as a path: `secrets.TOKEN`, `branch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_never_show_their_secrets_when_debugged() {
        let submit = SubmitRequest {
            repo_url: "https://example.com/r.git".into(),
            commit_hash: "a".repeat(40),
            branch: "main".into(),
            environment_id: "pr-1".into(),
            trigger: None,
            stagely_yaml: None,
            config_dir: None,
            clone_token: Some("ghp_secret_token".into()),
            secrets: Some([("NPM_TOKEN".to_string(), "npm_secret_value".to_string())].into()),
        };
        let rebuild = RebuildRequest {
            clone_token: submit.clone_token.clone(),
            secrets: submit.secrets.clone(),
        };
        for shown in [format!("{submit:?}"), format!("{rebuild:?}")] {
            assert!(!shown.contains("ghp_secret_token"), "{shown}");
            assert!(!shown.contains("npm_secret_value"), "{shown}");
            assert!(shown.contains("NPM_TOKEN"), "{shown}");
        }
    }

    #[test]
    fn only_completed_failed_and_cancelled_are_final() {
        for status in ["completed", "failed", "cancelled"] {
            assert!(is_final(status));
        }
        for status in ["pending", "queued", "running", "cancelling", ""] {
            assert!(!is_final(status));
        }
    }

    #[test]
    fn costs_add_up_over_priced_attempts_only() {
        assert_eq!(sum_known([None, None].into_iter()), None);
        assert_eq!(
            sum_known([Some(0.1), None, Some(0.2)].into_iter()),
            Some(0.3)
        );
    }
}
