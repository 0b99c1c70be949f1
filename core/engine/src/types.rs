//! The engine's vocabulary: statuses, outcomes, failure kinds and the snapshots it is loaded
//! from. Every one is an enum with one spelling in the database (`as_str` / `parse`), so the
//! store and the API convert explicitly and a typo is a compile error, not a new state.

use std::time::Duration;

/// Wall-clock time in milliseconds since the Unix epoch. The engine never reads a clock: every
/// input carries `now`, so tests drive time by hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn plus(self, duration: Duration) -> Timestamp {
        Timestamp(
            self.0
                .saturating_add(i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)),
        )
    }

    pub fn millis(self) -> i64 {
        self.0
    }

    /// Time from `self` until `later` (zero when `later` is not later).
    pub fn until(self, later: Timestamp) -> Duration {
        Duration::from_millis(u64::try_from(later.0.saturating_sub(self.0)).unwrap_or(0))
    }
}

/// Declares an enum with its database spelling.
macro_rules! spelled {
    ($(#[$meta:meta])* pub enum $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($(#[$vmeta])* $variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            pub fn parse(text: &str) -> Option<$name> {
                match text { $($text => Some($name::$variant),)+ _ => None }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        /// The store reads a column into this type (`#[sqlx(try_from = "String")]`).
        impl TryFrom<String> for $name {
            type Error = Unspelled;

            fn try_from(text: String) -> Result<$name, Unspelled> {
                $name::parse(&text).ok_or(Unspelled { what: stringify!($name), text })
            }
        }
    };
}

/// A stored word that names no value of the type it should (a database written by a newer
/// version, or edited by hand).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{text}` is not a {what}")]
pub struct Unspelled {
    pub what: &'static str,
    pub text: String,
}

spelled! {
    /// Where a run stands. `deploying` and `testing` (seed states for later phases) are never
    /// entered by the build engine.
    pub enum RunStatus {
        Pending => "pending",
        Building => "building",
        Completed => "completed",
        Failed => "failed",
        Cancelled => "cancelled",
    }
}

impl RunStatus {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RunStatus::Completed | RunStatus::Failed | RunStatus::Cancelled
        )
    }
}

spelled! {
    /// Where a job stands. Legal moves: `queued → provisioning → running → completed | failed
    /// | cancelled`; `provisioning | running → queued` (an infrastructure failure retried);
    /// `queued | provisioning → failed | cancelled`. Final states never change.
    pub enum JobStatus {
        Queued => "queued",
        Provisioning => "provisioning",
        Running => "running",
        Completed => "completed",
        Failed => "failed",
        Cancelled => "cancelled",
    }
}

impl JobStatus {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled
        )
    }

    /// Holds (or is about to hold) an instance.
    pub fn is_live(self) -> bool {
        matches!(self, JobStatus::Provisioning | JobStatus::Running)
    }

    /// Whether the engine may ever move a job from `self` to `next`.
    pub fn may_become(self, next: JobStatus) -> bool {
        use JobStatus::*;
        matches!(
            (self, next),
            (Queued, Provisioning)
                | (Queued, Cancelled)
                | (Queued, Failed)
                | (Provisioning, Running)
                | (Provisioning, Queued)
                | (Provisioning, Failed)
                | (Provisioning, Cancelled)
                | (Running, Queued)
                | (Running, Completed)
                | (Running, Failed)
                | (Running, Cancelled)
        )
    }
}

spelled! {
    /// Why a job failed. Only `infrastructure` failures are retried, and only while attempts
    /// remain; the others are final on the first occurrence.
    pub enum FailureKind {
        /// The builder ran and failed (non-zero exit), or the source could not be built.
        Build => "build",
        /// The job exceeded its `timeout`.
        Timeout => "timeout",
        /// The machine underneath failed: provider error, boot timeout, agent lost, an expired
        /// lease — after every retry was spent.
        Infrastructure => "infrastructure",
        /// The agent broke the protocol or reported an image the registry does not hold.
        Protocol => "protocol",
    }
}

spelled! {
    /// What went wrong underneath a build. Every kind but `core_shutdown` counts against the
    /// job's retry limit.
    pub enum InfraKind {
        /// The provider refused or failed to create the instance.
        Provider => "provider",
        /// The provider refused the request as configured (a bad AMI, credentials,
        /// parameters): another attempt would fail the same way, so the job fails at once.
        ProviderRejected => "provider_rejected",
        /// The instance was created but its agent never connected within the boot timeout.
        BootTimeout => "boot_timeout",
        /// The agent's connection broke or went silent before it reported STATUS.
        AgentLost => "agent_lost",
        /// The core holding the job stopped renewing its lease (it crashed or was killed).
        LeaseExpired => "lease_expired",
        /// The core holding the job was shut down (SIGTERM) and handed the job back.
        CoreShutdown => "core_shutdown",
        /// The cloud reclaimed the spot instance (its agent relayed the interruption
        /// notice). The job is retried at once and never placed on spot again.
        SpotInterrupted => "spot_interrupted",
        /// The instance shut down under a running job (its agent was stopped by SIGTERM
        /// with no CANCEL from the core, and said so): stopped from outside, not by the build.
        InstanceShutdown => "instance_shutdown",
        /// The provider says the attempt's instance no longer runs (it died with the core
        /// that started it, or was stopped from outside) while its agent was away: it cannot
        /// come back, so the attempt ends at once instead of after the reconnect grace.
        InstanceGone => "instance_gone",
    }
}

impl InfraKind {
    /// Whether this failure spends one of the job's retries. A rolling deploy must not.
    pub fn counts_against_retries(self) -> bool {
        // Neither is the job's doing; an interrupted job's retry is on-demand, so it cannot
        // be interrupted again.
        !matches!(self, InfraKind::CoreShutdown | InfraKind::SpotInterrupted)
    }

    /// Whether the retry waits (doubling) before it is claimed: not when nothing suggests
    /// the next attempt would meet the same trouble (a deploy, a reclaimed spot instance,
    /// an instance that died with its core).
    pub fn backs_off(self) -> bool {
        !matches!(
            self,
            InfraKind::CoreShutdown | InfraKind::SpotInterrupted | InfraKind::InstanceGone
        )
    }

    /// Whether the job may get another attempt after this failure (within the limit).
    pub fn may_retry(self) -> bool {
        !matches!(self, InfraKind::ProviderRejected)
    }
}

spelled! {
    /// How one attempt of a job ended (the `job_attempts.outcome` column).
    pub enum AttemptResult {
        Completed => "completed",
        Failed => "failed",
        Cancelled => "cancelled",
        /// Ended by an infrastructure failure; the job was retried or failed after it.
        Infrastructure => "infrastructure",
    }
}

spelled! {
    /// Which machine ran a merge job.
    pub enum MergePath {
        /// The agent of the platform job that finished last, before its instance ended.
        LastBuilder => "last_builder",
        /// A fresh small instance (the agent of the last builder was gone).
        FreshInstance => "fresh_instance",
    }
}

/// Why a run is being cancelled.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CancelReason {
    /// `POST /api/v1/workflows/{id}/cancel` or `stagely cancel`, by the API token named
    /// `by` (`None` in rows written before tokens were recorded).
    User { by: Option<String> },
    /// A newer run for the same environment was submitted.
    Superseded { by: String },
    /// Fail-fast: this job failed.
    FailFast { job: String },
}

impl CancelReason {
    /// The database spelling: `user`, `superseded:<run id>`, `fail_fast:<job name>`.
    pub fn to_db(&self) -> String {
        match self {
            CancelReason::User { by: None } => "user".into(),
            CancelReason::User { by: Some(name) } => format!("user:{name}"),
            CancelReason::Superseded { by } => format!("superseded:{by}"),
            CancelReason::FailFast { job } => format!("fail_fast:{job}"),
        }
    }

    pub fn from_db(text: &str) -> Option<CancelReason> {
        if text == "user" {
            return Some(CancelReason::User { by: None });
        }
        if let Some(name) = text.strip_prefix("user:") {
            return Some(CancelReason::User {
                by: Some(name.into()),
            });
        }
        if let Some(by) = text.strip_prefix("superseded:") {
            return Some(CancelReason::Superseded { by: by.into() });
        }
        text.strip_prefix("fail_fast:")
            .map(|job| CancelReason::FailFast { job: job.into() })
    }
}

impl std::fmt::Display for CancelReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CancelReason::User { by: None } => f.write_str("cancelled by a user"),
            CancelReason::User { by: Some(name) } => write!(f, "cancelled by `{name}`"),
            CancelReason::Superseded { by } => write!(f, "superseded by run {by}"),
            CancelReason::FailFast { job } => {
                write!(f, "cancelled because job {job} failed (fail_fast)")
            }
        }
    }
}

/// What a job does, as far as scheduling goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobKind {
    Build,
    /// Merges the images of these sibling jobs (by name); runs once they all completed.
    Merge {
        sources: Vec<String>,
    },
}

/// A run as stored, for [`super::Engine`] to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSnapshot {
    pub id: String,
    pub environment_id: String,
    pub status: RunStatus,
    pub fail_fast: bool,
    pub created_at: Timestamp,
    pub cancel: Option<CancelReason>,
    /// In submission order.
    pub jobs: Vec<JobSnapshot>,
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSnapshot {
    pub id: String,
    pub name: String,
    pub kind: JobKind,
    pub status: JobStatus,
    /// Number of the current (or last) attempt; 0 before the first.
    pub attempt: u32,
    /// Infrastructure failures that counted against the retry limit so far.
    pub infra_failures: u32,
    /// The core holding the current attempt, while it is live.
    pub lease_owner: Option<String>,
    pub lease_until: Option<Timestamp>,
    /// A retried job waits until then (backoff).
    pub not_before: Option<Timestamp>,
    pub timeout: Duration,
    /// The current attempt's instance, once created.
    pub instance_id: Option<String>,
    /// When the current attempt's agent first connected (its timeout runs from then, also
    /// for a core that adopts the attempt later).
    pub attempt_connected_at: Option<Timestamp>,
}

/// Why the engine cannot do what a command asks: answered to the caller (`404`, `409`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("workflow run {0} does not exist or is not loaded")]
    UnknownRun(String),
    #[error("workflow run {run} already finished ({status}); there is nothing to cancel")]
    RunFinished { run: String, status: RunStatus },
    #[error("this core is shutting down and takes no new work")]
    Draining,
}
