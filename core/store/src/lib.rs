//! Persistence: the seed's `workflow_runs`, `build_jobs` and `build_logs` tables, plus the
//! engine's `job_attempts` and `builder_instances`, behind [`Store`] with two
//! backends: SQLite (embedded default) and PostgreSQL (`--database-url postgres://...`), each
//! with its own migrations (`core/store/migrations/{sqlite,postgres}`).
//!
//! The store's methods come in four traits by concern ([`RunStore`], [`LogStore`],
//! [`EngineStore`], [`InstanceStore`]; `use stagely_store::prelude::*`), their shared SQL in
//! `shared/`, one file each. It never reads the clock: every write takes `now`.
//!
//! Architecture Invariant: this is the only crate that depends on sqlx
//! (`tests/tests/architecture.rs`). Rows are their own types ([`RunRow`], [`JobRow`],
//! [`LogRow`]); the API and the engine convert explicitly ([`snapshot`]). Every engine
//! transition is one guarded write ([`EngineStore::apply`]).

use std::path::Path;
use std::sync::Arc;

use stagely_engine::reaper::{ReapAttempt, ReapInstance};
use stagely_engine::{CancelReason, JobKind, JobSnapshot, RunSnapshot, Timestamp, Transition};

/// An `UPDATE` ending an attempt, guarded by job, attempt ($2) and lease owner ($3).
macro_rules! guarded_end {
    ($set:literal) => {
        concat!(
            $set,
            " WHERE id = $1 AND attempt = $2 AND lease_owner = $3 AND status IN ('provisioning', 'running')"
        )
    };
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database: {0}")]
    Sqlx(#[from] sqlx::Error),
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database holds a value this version cannot read: {0}")]
    Corrupt(String),
    #[error("database configuration: {0}")]
    Config(String),
    #[error("database: no answer to {what} within {secs}s")]
    Unanswered { what: &'static str, secs: u64 },
    #[error("database: {0}")]
    Chunk(#[from] chunks::ChunkError),
}

impl DbError {
    /// The connection failed, not the statement (a server restart, a dropped connection, an
    /// exhausted pool): the same call may succeed on another connection.
    pub fn is_transient(&self) -> bool {
        match self {
            // Not `PoolTimedOut`: that already waited the acquire timeout, and retrying it would
            // hold the runner's loop for longer than a lease.
            DbError::Sqlx(sqlx::Error::Io(_) | sqlx::Error::Protocol(_)) => true,
            // Class 08 (connection exception) and 57P01-57P03 (server shutting down or
            // starting).
            DbError::Sqlx(sqlx::Error::Database(error)) => error
                .code()
                .is_some_and(|code| code.starts_with("08") || code.starts_with("57P0")),
            _ => false,
        }
    }
}

/// Runs a store call again (up to 3 more times, from 20 ms, doubling) when it failed for its
/// connection rather than its statement. Only for calls that may run twice: guarded writes
/// (a retry of one that did land finds its guard moved), idempotent inserts, reads.
pub async fn retry_transient<T, F, Fut>(call: F) -> Result<T, DbError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, DbError>>,
{
    use backon::{ExponentialBuilder, Retryable};
    call.retry(
        ExponentialBuilder::default()
            .with_min_delay(std::time::Duration::from_millis(20))
            .with_max_times(3),
    )
    .when(DbError::is_transient)
    .notify(|error, delay| {
        tracing::warn!("a database call failed ({error}); retrying in {delay:?}");
    })
    .await
}

#[macro_use]
mod shared;

pub mod chunks;
pub mod postgres;
mod rows;
pub mod spec;
pub mod sqlite;

pub use rows::*;

/// The store traits, for callers that hold a [`Db`] (its methods come from them).
pub mod prelude {
    pub use crate::{EngineStore, InstanceStore, LogStore, RunStore, Store};
}

/// Handle to the store, whichever backend. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Db(Arc<dyn Store>);

impl std::ops::Deref for Db {
    type Target = dyn Store;

    fn deref(&self) -> &Self::Target {
        self.0.as_ref()
    }
}

impl Db {
    /// Opens (creating if needed) the SQLite database at `path` and migrates it.
    pub async fn open_sqlite(path: &Path) -> Result<Db, DbError> {
        Ok(Db(Arc::new(sqlite::SqliteStore::open(path).await?)))
    }

    /// Connects to PostgreSQL at `url` (`postgres://...`) and migrates it.
    pub async fn open_postgres(url: &str) -> Result<Db, DbError> {
        Ok(Db(Arc::new(postgres::PostgresStore::open(url).await?)))
    }
}

/// The store: the only place that knows SQL. Two backends implement it — SQLite
/// ([`sqlite::SqliteStore`], the embedded default) and PostgreSQL
/// ([`postgres::PostgresStore`]) — sharing the portable statements (`$n` parameters,
/// `RETURNING`-free guarded `UPDATE`s, `ON CONFLICT`, BIGINT unix-ms times) through
/// `impl_shared_store!` (`shared/`); what differs (connection, migrations, the claim's locking, byte
/// counts) each backend writes itself.
#[async_trait::async_trait]
pub trait Store:
    RunStore + LogStore + EngineStore + InstanceStore + Send + Sync + std::fmt::Debug
{
    async fn close(&self);
}

/// Runs and their jobs as the API reads and creates them.
#[async_trait::async_trait]
pub trait RunStore: Send + Sync {
    /// Creates a run and its jobs atomically; returns the run as stored (what
    /// [`Store::run_snapshot`] would read back).
    async fn create_run(
        &self,
        run: &NewRun,
        jobs: &[NewJob],
        now: Timestamp,
    ) -> Result<RunSnapshot, DbError>;

    async fn run(&self, run_id: &str) -> Result<Option<RunRow>, DbError>;

    async fn jobs_of_run(&self, run_id: &str) -> Result<Vec<JobRow>, DbError>;

    async fn job(&self, job_id: &str) -> Result<Option<JobRow>, DbError>;

    /// Every attempt of a run's jobs, oldest first.
    async fn attempts_of_run(&self, run_id: &str) -> Result<Vec<AttemptRow>, DbError>;

    /// The newest run of an environment.
    async fn latest_run_of_environment(
        &self,
        environment_id: &str,
    ) -> Result<Option<RunRow>, DbError>;

    /// Unfinished runs of an environment created before `except` (older by creation time,
    /// then id): what a new run supersedes. Two runs submitted at once never cancel each
    /// other.
    async fn unfinished_runs_of_environment(
        &self,
        environment_id: &str,
        except: &str,
    ) -> Result<Vec<String>, DbError>;
}

/// Job logs: stored in chunks, read in pages, deleted by retention.
#[async_trait::async_trait]
pub trait LogStore: Send + Sync {
    /// Stores a batch of lines in one transaction; duplicates (same seq) are ignored.
    async fn append_logs(
        &self,
        job_id: &str,
        lines: &[NewLogLine],
        now: Timestamp,
    ) -> Result<(), DbError>;

    /// Highest stored seq for a job (0 when none).
    async fn last_log_seq(&self, job_id: &str) -> Result<i64, DbError>;

    /// Records where an attempt's lines start (stored seq = base + the agent's seq).
    async fn set_attempt_log_base(
        &self,
        job_id: &str,
        attempt: u32,
        base: i64,
    ) -> Result<(), DbError>;

    /// Where an attempt's lines start (0 when none were numbered after earlier ones).
    async fn attempt_log_base(&self, job_id: &str, attempt: u32) -> Result<i64, DbError>;

    /// How many of a job's chunks are stored packed, and how many as text (tests).
    #[cfg(test)]
    async fn chunk_forms_for_tests(&self, job_id: &str) -> Result<(i64, i64), DbError>;

    /// Stores one line the way versions before chunked logs did (tests of reading both).
    #[cfg(test)]
    async fn insert_legacy_log_line_for_tests(
        &self,
        job_id: &str,
        seq: i64,
        line: &str,
    ) -> Result<(), DbError>;

    /// One page of lines with `seq > after`, at most `limit`.
    async fn logs_page(&self, job_id: &str, after: i64, limit: i64)
    -> Result<Vec<LogRow>, DbError>;

    /// (line count, total bytes) stored for a job.
    async fn log_stats(&self, job_id: &str) -> Result<(i64, i64), DbError>;

    /// Deletes the log lines of up to `max_jobs` jobs whose run finished before `cutoff`
    /// (unix ms); returns the lines deleted (0: none left).
    async fn delete_logs_of_runs_finished_before(
        &self,
        cutoff: i64,
        max_jobs: i64,
    ) -> Result<u64, DbError>;
}

/// The engine's store: the snapshots it loads, the transitions and claims it writes, and the
/// agent tokens its claims bind.
#[async_trait::async_trait]
pub trait EngineStore: Send + Sync {
    // ---- the engine's store ----

    /// Every run not final, with its jobs, as the engine loads them.
    async fn unfinished_runs(&self) -> Result<Vec<RunSnapshot>, DbError>;

    /// One run as the engine loads it.
    async fn run_snapshot(&self, run_id: &str) -> Result<Option<RunSnapshot>, DbError>;

    /// Writes one engine transition with its guard. `Ok(false)`: the guard did not hold (the
    /// row moved meanwhile, e.g. another replica took the job); nothing was written.
    async fn apply(&self, transition: &Transition, now: Timestamp) -> Result<bool, DbError>;

    /// Claims jobs for `owner` in the given order, atomically: each claim holds only if the
    /// job is still queued at the expected attempt and (unless it reuses a live instance)
    /// the live jobs across every core stay within the limits; a won claim's attempt is
    /// recorded with its agent token's hash in the same transaction. Returns (won, lost).
    async fn claim(
        &self,
        owner: &str,
        claims: &[AttemptClaim],
        lease_until: Timestamp,
        max_live_instances: usize,
        max_live_per_environment: usize,
        now: Timestamp,
    ) -> Result<(Vec<String>, Vec<String>), DbError>;

    /// Binds an agent token (its SHA-256, hex) to a live attempt.
    async fn set_attempt_token(
        &self,
        job_id: &str,
        attempt: u32,
        token_hash: &str,
    ) -> Result<bool, DbError>;

    /// The live attempt an agent token belongs to.
    async fn attempt_for_token(&self, token_hash: &str) -> Result<Option<(String, u32)>, DbError>;
}

/// Builder instances: recorded when created, judged by the reaper, marked when terminated.
#[async_trait::async_trait]
pub trait InstanceStore: Send + Sync {
    /// Records an instance the moment the provider returned it (before anything else can
    /// fail), so no path forgets it.
    async fn record_instance(
        &self,
        record: &InstanceRecord<'_>,
        now: Timestamp,
    ) -> Result<(), DbError>;

    async fn mark_instance_terminated(
        &self,
        instance_id: &str,
        now: Timestamp,
    ) -> Result<(), DbError>;

    /// What the reaper decides on ([`stagely_engine::reaper::plan`]): every recorded instance
    /// not terminated, oldest first, and the attempts (with their jobs) they belong to.
    async fn reap_facts(&self) -> Result<(Vec<ReapInstance>, Vec<ReapAttempt>), DbError>;

    /// Instances recorded for an attempt and not terminated.
    async fn instances_of_attempt(
        &self,
        job_id: &str,
        attempt: u32,
    ) -> Result<Vec<String>, DbError>;

    /// Whether `attempt` is the job's current, live attempt under an unexpired lease (an
    /// instance a provider lists for it may be one whose creation is still being recorded).
    async fn attempt_holds(
        &self,
        job_id: &str,
        attempt: u32,
        now: Timestamp,
    ) -> Result<bool, DbError>;

    /// Instances recorded and not terminated (diagnostics and tests).
    async fn live_instances(&self) -> Result<Vec<String>, DbError>;

    /// The id of the deployment this store belongs to, shared by every core that uses it
    /// (created by a migration): instances carry it as `stagely:deployment`.
    async fn deployment_id(&self) -> Result<String, DbError>;

    /// Whether an earlier attempt of the job ended by a spot interruption (its retries are
    /// never placed on spot again).
    async fn spot_interrupted_before(&self, job_id: &str) -> Result<bool, DbError>;
}

/// How long a merge handed over to its last builder's instance may extend that instance's
/// life: a merge's default timeout plus the reaper's margin.
/// Ends the billed span of the attempt running on instance `$1` at `$2` (termination, or a
/// handover to a merge).
const CLOSE_BILLING: &str = "UPDATE job_attempts SET billed_until = $2
     WHERE instance_id = $1 AND billed_from IS NOT NULL AND billed_until IS NULL";

const HANDOVER_LIFETIME_MS: i64 = 40 * 60 * 1000;

/// The highest stored seq of job `$1`: in chunks, or one per row as earlier versions stored.
pub(crate) const LAST_LOG_SEQ: &str =
    "SELECT MAX(m) FROM (SELECT MAX(last_seq) AS m FROM log_chunks WHERE build_job_id = $1
                        UNION ALL SELECT MAX(seq) AS m FROM build_logs WHERE build_job_id = $1) x";

/// A stored value the engine cannot read: the database holds something this version never
/// writes.
fn corrupt(what: &str, value: &str) -> DbError {
    DbError::Corrupt(format!("{what} `{value}`"))
}

/// Rows → the engine's snapshot.
pub fn snapshot(run: RunRow, jobs: Vec<JobRow>) -> Result<RunSnapshot, DbError> {
    let cancel = match &run.cancel_reason {
        Some(text) => {
            Some(CancelReason::from_db(text).ok_or_else(|| corrupt("cancel reason", text))?)
        }
        None => None,
    };
    let jobs = jobs
        .into_iter()
        .map(|job| JobSnapshot {
            status: job.status,
            kind: match job.spec.kind {
                spec::JobKind::Build => JobKind::Build,
                spec::JobKind::Merge { sources } => JobKind::Merge { sources },
            },
            timeout: std::time::Duration::from_secs(job.spec.timeout_seconds),
            id: job.id,
            name: job.name,
            attempt: job.attempt.max(0) as u32,
            infra_failures: job.infra_failures.max(0) as u32,
            lease_owner: job.lease_owner,
            lease_until: job.lease_until.map(Timestamp),
            not_before: job.not_before.map(Timestamp),
            instance_id: job.vm_id,
            attempt_connected_at: job.attempt_connected_at.map(Timestamp),
        })
        .collect();
    Ok(RunSnapshot {
        id: run.id,
        environment_id: run.environment_id,
        status: run.status,
        fail_fast: run.fail_fast,
        created_at: Timestamp(run.created_at),
        cancel,
        jobs,
    })
}

#[cfg(test)]
mod tests;
