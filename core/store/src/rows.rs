//! The rows: what the store reads and writes, typed (statuses as the engine's enums, a job's
//! spec parsed once when its row is read).

use serde::Serialize;
use stagely_engine::{Claim, JobStatus, RunStatus, Timestamp};

use crate::spec::JobSpec;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct RunRow {
    pub id: String,
    pub environment_id: String,
    pub trigger: String,
    #[sqlx(try_from = "String")]
    pub status: RunStatus,
    pub repo_url: String,
    pub commit_hash: String,
    pub branch: String,
    pub config_path: String,
    pub error_message: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub fail_fast: bool,
    /// [`CancelReason::to_db`] once a cancel was requested.
    pub cancel_reason: Option<String>,
    /// The name of the API token that submitted or rebuilt the run (`None` before it was
    /// recorded).
    #[sqlx(default)]
    pub submitted_by: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct JobRow {
    pub id: String,
    pub workflow_run_id: String,
    pub name: String,
    #[sqlx(try_from = "String")]
    pub status: JobStatus,
    pub architecture: String,
    pub platform: String,
    pub machine: String,
    /// What it builds (`build_jobs.spec`, JSON), read once with the row.
    #[sqlx(try_from = "String")]
    pub spec: JobSpec,
    pub vm_id: Option<String>,
    pub artifact_url: Option<String>,
    pub digest: Option<String>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub exit_code: Option<i32>,
    pub error_message: Option<String>,
    pub ordinal: i32,
    pub attempt: i32,
    pub infra_failures: i32,
    pub lease_owner: Option<String>,
    pub lease_until: Option<i64>,
    pub not_before: Option<i64>,
    pub failure_kind: Option<String>,
    pub merge_path: Option<String>,
    /// When the current attempt's agent first connected (`job_attempts.connected_at`); read
    /// only where the engine loads jobs (an adopted attempt keeps its deadline).
    #[sqlx(default)]
    #[serde(skip)]
    pub attempt_connected_at: Option<i64>,
}

/// One attempt of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct AttemptRow {
    pub build_job_id: String,
    pub number: i32,
    pub owner: String,
    pub instance_id: Option<String>,
    pub merge_path: Option<String>,
    pub started_at: i64,
    pub connected_at: Option<i64>,
    pub ended_at: Option<i64>,
    pub result: Option<String>,
    pub message: Option<String>,
    pub instance_type: Option<String>,
    pub market: Option<String>,
    pub placement: Option<String>,
    pub billed_from: Option<i64>,
    pub billed_until: Option<i64>,
}

/// An instance as the provider returned it, recorded before anything else can fail.
#[derive(Debug, Clone)]
pub struct InstanceRecord<'a> {
    pub instance_id: &'a str,
    pub provider: &'a str,
    pub job_id: &'a str,
    pub attempt: u32,
    pub owner: &'a str,
    pub instance_type: &'a str,
    pub market: Option<&'a str>,
    /// How it was placed, for the job log and the attempt (`None`: as asked).
    pub placement: Option<&'a str>,
    /// Its maximum lifetime ends here (job timeout + boot timeout + margin).
    pub expires_at: Timestamp,
}

/// Why the reaper terminates an instance: the engine decides ([`stagely_engine::reaper`]).
pub use stagely_engine::reaper::ReapReason;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct LogRow {
    pub seq: i64,
    pub timestamp: i64,
    pub stream: String,
    pub line: String,
    /// A piece of a cut line: the line goes on in the stream's next piece (the agent said so
    /// out of band; rows of the older per-line table never are).
    #[sqlx(default)]
    pub continued: bool,
}

/// A claim as the store writes it: the engine's claim and the token of the attempt it
/// starts, bound in the claim's own transaction (no second write before the instance boots).
#[derive(Debug, Clone)]
pub struct AttemptClaim {
    pub claim: Claim,
    /// SHA-256 (hex) of the agent token minted for the attempt the claim starts.
    pub token_hash: String,
}

/// A line to store.
#[derive(Debug, Clone)]
pub struct NewLogLine {
    pub seq: i64,
    pub stream: &'static str,
    pub line: String,
    /// A piece of a cut line (the agent's `continued`): the line goes on.
    pub continued: bool,
}

/// A run to create.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub id: String,
    pub environment_id: String,
    pub trigger: String,
    pub repo_url: String,
    pub commit_hash: String,
    pub branch: String,
    pub config_path: String,
    pub fail_fast: bool,
    /// The API token's name (see [`RunRow::submitted_by`]).
    pub submitted_by: Option<String>,
}

impl NewRun {
    /// The row [`Db::create_run`] will store (`pending`; times are set when it is stored).
    pub fn draft_row(&self) -> RunRow {
        RunRow {
            id: self.id.clone(),
            environment_id: self.environment_id.clone(),
            trigger: self.trigger.clone(),
            status: RunStatus::Pending,
            repo_url: self.repo_url.clone(),
            commit_hash: self.commit_hash.clone(),
            branch: self.branch.clone(),
            config_path: self.config_path.clone(),
            error_message: None,
            created_at: 0,
            updated_at: 0,
            fail_fast: self.fail_fast,
            cancel_reason: None,
            submitted_by: self.submitted_by.clone(),
        }
    }
}

/// A job to create with its run.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: String,
    pub name: String,
    pub architecture: String,
    pub platform: String,
    pub machine: String,
    pub spec: JobSpec,
}

impl NewJob {
    /// The row [`Db::create_run`] will store for this job of run `run_id` (`queued`).
    pub fn draft_row(&self, run_id: &str) -> JobRow {
        JobRow {
            id: self.id.clone(),
            workflow_run_id: run_id.to_string(),
            name: self.name.clone(),
            status: JobStatus::Queued,
            architecture: self.architecture.clone(),
            platform: self.platform.clone(),
            machine: self.machine.clone(),
            spec: self.spec.clone(),
            vm_id: None,
            artifact_url: None,
            digest: None,
            created_at: 0,
            started_at: None,
            completed_at: None,
            exit_code: None,
            error_message: None,
            ordinal: 0,
            attempt: 0,
            infra_failures: 0,
            lease_owner: None,
            lease_until: None,
            not_before: None,
            failure_kind: None,
            merge_path: None,
            attempt_connected_at: None,
        }
    }
}
