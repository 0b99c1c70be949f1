//! Persistence: the seed's `workflow_runs`, `build_jobs` and `build_logs` tables, plus the
//! engine's `job_attempts` and `builder_instances`, behind one [`Store`] trait with two
//! backends: SQLite (embedded default) and PostgreSQL (`--database-url postgres://...`), each
//! with its own migrations (`core/migrations/{sqlite,postgres}`).
//!
//! Architecture invariant: this is the only module that knows SQL. Rows are their own types
//! ([`RunRow`], [`JobRow`], [`LogRow`]); the API and the engine convert explicitly
//! ([`snapshot`]). Every engine transition is one guarded write ([`Store::apply`]).

use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::engine::{
    CancelReason, Claim, JobKind, JobSnapshot, JobStatus, RunSnapshot, RunStatus, Timestamp,
    Transition,
};

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

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct RunRow {
    pub id: String,
    pub environment_id: String,
    pub trigger: String,
    pub status: String,
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
    pub status: String,
    pub architecture: String,
    pub platform: String,
    pub machine: String,
    /// JSON of [`crate::stagely_yaml::JobSpec`].
    pub spec: String,
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

/// Why the reaper terminates an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReapReason {
    /// Its attempt ended (final, or superseded by a later one).
    AttemptEnded,
    /// Its job's lease expired: the core that owned it is gone.
    LeaseExpired,
    /// It belongs to no attempt or job this store knows.
    NoAttempt,
    /// It outlived its maximum lifetime (job timeout + boot timeout + margin).
    Lifetime,
}

impl ReapReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ReapReason::AttemptEnded => "attempt_ended",
            ReapReason::LeaseExpired => "lease_expired",
            ReapReason::NoAttempt => "no_attempt",
            ReapReason::Lifetime => "lifetime",
        }
    }

    fn parse(text: &str) -> ReapReason {
        match text {
            "attempt_ended" => ReapReason::AttemptEnded,
            "lease_expired" => ReapReason::LeaseExpired,
            "lifetime" => ReapReason::Lifetime,
            _ => ReapReason::NoAttempt,
        }
    }
}

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
            status: "pending".into(),
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
    pub spec: String,
}

impl NewJob {
    /// The row [`Db::create_run`] will store for this job of run `run_id` (`queued`).
    pub fn draft_row(&self, run_id: &str) -> JobRow {
        JobRow {
            id: self.id.clone(),
            workflow_run_id: run_id.to_string(),
            name: self.name.clone(),
            status: "queued".into(),
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
/// [`impl_shared_store!`]; what differs (connection, migrations, the claim's locking, byte
/// counts) each backend writes itself.
#[async_trait::async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    async fn close(&self);

    /// Creates a run and its jobs atomically; returns the run as stored (what
    /// [`Store::run_snapshot`] would read back).
    async fn create_run(&self, run: &NewRun, jobs: &[NewJob]) -> Result<RunSnapshot, DbError>;

    async fn run(&self, run_id: &str) -> Result<Option<RunRow>, DbError>;

    async fn jobs_of_run(&self, run_id: &str) -> Result<Vec<JobRow>, DbError>;

    async fn job(&self, job_id: &str) -> Result<Option<JobRow>, DbError>;

    /// Stores a batch of lines in one transaction; duplicates (same seq) are ignored.
    async fn append_logs(&self, job_id: &str, lines: &[NewLogLine]) -> Result<(), DbError>;

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

    async fn mark_instance_terminated(&self, instance_id: &str) -> Result<(), DbError>;

    /// (line count, total bytes) stored for a job.
    async fn log_stats(&self, job_id: &str) -> Result<(i64, i64), DbError>;

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

    /// Every attempt of a run's jobs, oldest first.
    async fn attempts_of_run(&self, run_id: &str) -> Result<Vec<AttemptRow>, DbError>;

    /// Records an instance the moment the provider returned it (before anything else can
    /// fail), so no path forgets it.
    async fn record_instance(&self, record: &InstanceRecord<'_>) -> Result<(), DbError>;

    /// Instances to terminate, oldest first, with why: alive, and their attempt ended, or
    /// their job's lease expired (its core is gone), or they belong to no attempt at all, or
    /// they outlived their maximum lifetime. Never otherwise an instance of a live attempt
    /// whose lease holds, whichever replica owns it. A running job's lease counts as expired
    /// only `running_grace` after it ran out: its agent may be dialling another core that
    /// adopts the attempt.
    async fn instances_to_reap(
        &self,
        now: Timestamp,
        running_grace: std::time::Duration,
    ) -> Result<Vec<(String, ReapReason)>, DbError>;

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

    /// Deletes the log lines of up to `max_jobs` jobs whose run finished before `cutoff`
    /// (unix ms); returns the lines deleted (0: none left).
    async fn delete_logs_of_runs_finished_before(
        &self,
        cutoff: i64,
        max_jobs: i64,
    ) -> Result<u64, DbError>;

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

/// How long a merge handed over to its last builder's instance may extend that instance's
/// life: a merge's default timeout plus the reaper's margin.
/// Ends the billed span of the attempt running on instance `$1` at `$2` (termination, or a
/// handover to a merge).
const CLOSE_BILLING: &str = "UPDATE job_attempts SET billed_until = $2
     WHERE instance_id = $1 AND billed_from IS NOT NULL AND billed_until IS NULL";

const HANDOVER_LIFETIME_MS: i64 = 40 * 60 * 1000;

/// The statements both backends share, as an `impl Store` for `$store` over sqlx database
/// `$db`. The backend supplies `claim_in_store` (its locking), `begin_read` and `log_byte_stats`.
macro_rules! impl_shared_store {
    ($store:ident, $db:ty) => {
        #[async_trait::async_trait]
        impl $crate::db::Store for $store {
            async fn close(&self) {
                self.pool.close().await;
            }

/// Claims jobs for `owner` in the given order, atomically: each claim holds only if the
            /// job is still queued at the expected attempt and (unless it reuses a live instance)
            /// the live jobs across every core stay within the limits. Returns (won, lost).
            async fn claim(
                &self,
                owner: &str,
                claims: &[$crate::db::AttemptClaim],
                lease_until: Timestamp,
                max_live_instances: usize,
                max_live_per_environment: usize,
                now: Timestamp,
            ) -> Result<(Vec<String>, Vec<String>), DbError> {
                self.claim_in_store(
                    owner,
                    claims,
                    lease_until,
                    max_live_instances,
                    max_live_per_environment,
                    now,
                )
                .await
            }

            async fn log_stats(&self, job_id: &str) -> Result<(i64, i64), DbError> {
                self.log_byte_stats(job_id).await
            }

    /// Creates a run and its jobs atomically.
    #[allow(clippy::too_many_arguments)]
    async fn create_run(&self, run: &NewRun, jobs: &[NewJob]) -> Result<$crate::engine::RunSnapshot, DbError> {
        let _turn = self.write_turn().await;
        let run_id = &run.id;
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO workflow_runs (id, environment_id, trigger, status, repo_url, commit_hash, branch, config_path, created_at, updated_at, fail_fast, submitted_by)
             VALUES ($1, $2, $3, 'pending', $4, $5, $6, $7, $8, $8, $9, $10)",
        )
        .bind(run_id)
        .bind(&run.environment_id)
        .bind(&run.trigger)
        .bind(&run.repo_url)
        .bind(&run.commit_hash)
        .bind(&run.branch)
        .bind(&run.config_path)
        .bind(now)
        .bind(run.fail_fast)
        .bind(&run.submitted_by)
        .execute(&mut *tx)
        .await?;
        for (ordinal, job) in jobs.iter().enumerate() {
            sqlx::query(
                "INSERT INTO build_jobs (id, workflow_run_id, name, status, architecture, platform, machine, spec, created_at, ordinal)
                 VALUES ($1, $2, $3, 'queued', $4, $5, $6, $7, $8, $9)",
            )
            .bind(&job.id)
            .bind(run_id)
            .bind(&job.name)
            .bind(&job.architecture)
            .bind(&job.platform)
            .bind(&job.machine)
            .bind(&job.spec)
            .bind(now)
            .bind(ordinal as i32)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        let mut run_row = run.draft_row();
        run_row.created_at = now;
        run_row.updated_at = now;
        let job_rows = jobs
            .iter()
            .enumerate()
            .map(|(ordinal, job)| {
                let mut row = job.draft_row(run_id);
                row.created_at = now;
                row.ordinal = ordinal as i32;
                row
            })
            .collect();
        $crate::db::snapshot(run_row, job_rows)
    }

    async fn run(&self, run_id: &str) -> Result<Option<RunRow>, DbError> {
        Ok(
            sqlx::query_as::<_, RunRow>("SELECT * FROM workflow_runs WHERE id = $1")
                .bind(run_id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn jobs_of_run(&self, run_id: &str) -> Result<Vec<JobRow>, DbError> {
        Ok(sqlx::query_as::<_, JobRow>(
            "SELECT * FROM build_jobs WHERE workflow_run_id = $1 ORDER BY ordinal, name",
        )
        .bind(run_id)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn job(&self, job_id: &str) -> Result<Option<JobRow>, DbError> {
        Ok(
            sqlx::query_as::<_, JobRow>("SELECT * FROM build_jobs WHERE id = $1")
                .bind(job_id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// Stores a batch of lines as chunks in one transaction; lines at or below the highest
    /// seq already stored are dropped (a batch stored twice stores nothing twice). The
    /// chunks are encoded and packed before the log-write turn is taken, so other jobs'
    /// writes do not wait for that; only a batch overlapping what is stored (a resend) is
    /// encoded again, from its new lines.
    async fn append_logs(&self, job_id: &str, lines: &[NewLogLine]) -> Result<(), DbError> {
        let Some(first) = lines.first() else {
            return Ok(());
        };
        let mut prepared = chunks::prepare(&chunks::fresh_lines(lines, 0));
        let _turn = self.log_write_turn().await;
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let stored: Option<i64> = sqlx::query_scalar($crate::db::LAST_LOG_SEQ)
        .bind(job_id)
        .fetch_one(&mut *tx)
        .await?;
        let stored = stored.unwrap_or(0);
        if first.seq <= stored {
            prepared = chunks::prepare(&chunks::fresh_lines(lines, stored));
        }
        for chunk in prepared {
            sqlx::query(
                "INSERT INTO log_chunks (build_job_id, first_seq, last_seq, stored_at, line_count, bytes, data, packed)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(job_id)
            .bind(chunk.first_seq)
            .bind(chunk.last_seq)
            .bind(now)
            .bind(chunk.line_count)
            .bind(chunk.bytes)
            .bind(chunk.text)
            .bind(chunk.packed)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Highest stored seq for a job (0 when none).
    async fn last_log_seq(&self, job_id: &str) -> Result<i64, DbError> {
        let max: Option<i64> = sqlx::query_scalar($crate::db::LAST_LOG_SEQ)
        .bind(job_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(max.unwrap_or(0))
    }

    async fn set_attempt_log_base(
        &self,
        job_id: &str,
        attempt: u32,
        base: i64,
    ) -> Result<(), DbError> {
        let _turn = self.write_turn().await;
        sqlx::query("UPDATE job_attempts SET log_base = $3 WHERE build_job_id = $1 AND number = $2")
            .bind(job_id)
            .bind(attempt as i32)
            .bind(base)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    #[cfg(test)]
    async fn chunk_forms_for_tests(&self, job_id: &str) -> Result<(i64, i64), DbError> {
        Ok(sqlx::query_as(
            "SELECT COUNT(packed), COUNT(*) - COUNT(packed) FROM log_chunks WHERE build_job_id = $1",
        )
        .bind(job_id)
        .fetch_one(&self.pool)
        .await?)
    }

    #[cfg(test)]
    async fn insert_legacy_log_line_for_tests(
        &self,
        job_id: &str,
        seq: i64,
        line: &str,
    ) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO build_logs (build_job_id, seq, timestamp, stream, line) VALUES ($1, $2, 0, 'stdout', $3)",
        )
        .bind(job_id)
        .bind(seq)
        .bind(line)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn attempt_log_base(&self, job_id: &str, attempt: u32) -> Result<i64, DbError> {
        let base: Option<i64> = sqlx::query_scalar(
            "SELECT log_base FROM job_attempts WHERE build_job_id = $1 AND number = $2",
        )
        .bind(job_id)
        .bind(attempt as i32)
        .fetch_optional(&self.pool)
        .await?;
        Ok(base.unwrap_or(0))
    }

    /// One page of lines with `seq > after`, at most `limit`.
    async fn logs_page(
        &self,
        job_id: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<LogRow>, DbError> {
        let wanted = usize::try_from(limit.max(0)).unwrap_or(0);
        // Lines an earlier version stored one per row.
        let legacy = sqlx::query_as::<_, LogRow>(
            "SELECT seq, timestamp, stream, line FROM build_logs WHERE build_job_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(job_id)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut chunked: Vec<LogRow> = Vec::new();
        let mut cursor = after;
        while chunked.len() < wanted {
            let rows: Vec<(i64, i64, i64, String, Option<Vec<u8>>)> = sqlx::query_as(
                "SELECT first_seq, last_seq, stored_at, data, packed FROM log_chunks
                 WHERE build_job_id = $1 AND last_seq > $2 ORDER BY first_seq LIMIT 4",
            )
            .bind(job_id)
            .bind(cursor)
            .fetch_all(&self.pool)
            .await?;
            if rows.is_empty() {
                break;
            }
            for (first_seq, last_seq, stored_at, data, packed) in rows {
                let data = match packed {
                    Some(packed) => chunks::unpack(job_id, first_seq, &packed)?,
                    None => data,
                };
                chunked.extend(chunks::decode(job_id, first_seq, &data, stored_at, after)?);
                cursor = cursor.max(last_seq);
            }
        }
        if legacy.is_empty() {
            chunked.truncate(wanted);
            return Ok(chunked);
        }
        let mut all: Vec<LogRow> = legacy.into_iter().chain(chunked).collect();
        all.sort_by_key(|row| row.seq);
        all.dedup_by_key(|row| row.seq);
        all.truncate(wanted);
        Ok(all)
    }

    async fn mark_instance_terminated(&self, instance_id: &str) -> Result<(), DbError> {
        let _turn = self.write_turn().await;
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE builder_instances SET terminated_at = $2 WHERE id = $1 AND terminated_at IS NULL",
        )
        .bind(instance_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        // Billing of the attempt on it (the last, after any handover) ends here.
        sqlx::query(CLOSE_BILLING)
        .bind(instance_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    // ---- the engine's store ----

    /// Every run not final, with its jobs, as the engine loads them.
    async fn unfinished_runs(&self) -> Result<Vec<RunSnapshot>, DbError> {
        // Both reads in one read-only snapshot, so the jobs are exactly those of these runs
        // (a run that finished between two separate reads would come without its jobs).
        let mut tx = self.begin_read().await?;
        let runs = sqlx::query_as::<_, RunRow>(
            "SELECT * FROM workflow_runs WHERE status IN ('pending', 'building') ORDER BY created_at, id",
        )
        .fetch_all(&mut *tx)
        .await?;
        let jobs = sqlx::query_as::<_, JobRow>(
            "SELECT j.*, a.connected_at AS attempt_connected_at
             FROM build_jobs j JOIN workflow_runs r ON r.id = j.workflow_run_id
             LEFT JOIN job_attempts a ON a.build_job_id = j.id AND a.number = j.attempt
             WHERE r.status IN ('pending', 'building') ORDER BY j.workflow_run_id, j.ordinal",
        )
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut by_run: std::collections::HashMap<String, Vec<JobRow>> = Default::default();
        for job in jobs {
            by_run
                .entry(job.workflow_run_id.clone())
                .or_default()
                .push(job);
        }
        runs.into_iter()
            .map(|run| {
                let jobs = by_run.remove(&run.id).unwrap_or_default();
                $crate::db::snapshot(run, jobs)
            })
            .collect()
    }

    /// One run as the engine loads it.
    async fn run_snapshot(&self, run_id: &str) -> Result<Option<RunSnapshot>, DbError> {
        let Some(run) = self.run(run_id).await? else {
            return Ok(None);
        };
        let jobs = sqlx::query_as::<_, JobRow>(
            "SELECT j.*, a.connected_at AS attempt_connected_at FROM build_jobs j
             LEFT JOIN job_attempts a ON a.build_job_id = j.id AND a.number = j.attempt
             WHERE j.workflow_run_id = $1 ORDER BY j.ordinal, j.name",
        )
        .bind(run_id)
        .fetch_all(&self.pool)
        .await?;
        $crate::db::snapshot(run, jobs).map(Some)
    }

    /// Writes one engine transition with its guard. `Ok(false)`: the guard did not hold (the
    /// row moved meanwhile, e.g. another replica took the job); nothing was written.
    async fn apply(&self, transition: &Transition, now: Timestamp) -> Result<bool, DbError> {
        let _turn = self.write_turn().await;
        let now = now.millis();
        let affected = match transition {
            Transition::RunStarted { run_id } => sqlx::query(
                "UPDATE workflow_runs SET status = 'building', updated_at = $2 WHERE id = $1 AND status = 'pending'",
            )
            .bind(run_id)
            .bind(now)
            .execute(&self.pool)
            .await?
            .rows_affected(),
            Transition::RunCancelRequested { run_id, reason } => sqlx::query(
                "UPDATE workflow_runs SET cancel_reason = COALESCE(cancel_reason, $2), updated_at = $3
                 WHERE id = $1 AND status IN ('pending', 'building')",
            )
            .bind(run_id)
            .bind(reason.to_db())
            .bind(now)
            .execute(&self.pool)
            .await?
            .rows_affected(),
            Transition::RunFinished {
                run_id,
                status,
                message,
            } => sqlx::query(
                "UPDATE workflow_runs SET status = $2, error_message = $3, updated_at = $4
                 WHERE id = $1 AND status IN ('pending', 'building')
                   AND NOT EXISTS (SELECT 1 FROM build_jobs WHERE workflow_run_id = $1
                                   AND status IN ('queued', 'provisioning', 'running'))",
            )
            .bind(run_id)
            .bind(status.as_str())
            .bind(message)
            .bind(now)
            .execute(&self.pool)
            .await?
            .rows_affected(),
            Transition::JobSkipped {
                job_id,
                status,
                message,
            } => sqlx::query(
                "UPDATE build_jobs SET status = $2, error_message = $3, completed_at = $4
                 WHERE id = $1 AND status = 'queued'",
            )
            .bind(job_id)
            .bind(status.as_str())
            .bind(message)
            .bind(now)
            .execute(&self.pool)
            .await?
            .rows_affected(),
            Transition::InstanceStarted {
                job_id,
                attempt,
                instance_id,
                merge_path,
            } => {
                let mut tx = self.pool.begin().await?;
                let rows = sqlx::query(
                    "UPDATE build_jobs SET vm_id = $3, merge_path = COALESCE($4, merge_path)
                     WHERE id = $1 AND attempt = $2 AND status IN ('provisioning', 'running')",
                )
                .bind(job_id)
                .bind(*attempt as i32)
                .bind(instance_id)
                .bind(merge_path.map(|p| p.as_str()))
                .execute(&mut *tx)
                .await?
                .rows_affected();
                // The instance now belongs to this attempt (a merge on the last builder takes
                // over the platform job's instance): the reaper judges it by this attempt, and
                // its lifetime is extended by a merge's.
                sqlx::query(
                    "UPDATE builder_instances SET build_job_id = $1, attempt = $2,
                         expires_at = CASE WHEN expires_at IS NULL OR expires_at < $4 THEN $4 ELSE expires_at END
                     WHERE id = $3",
                )
                .bind(job_id)
                .bind(*attempt as i32)
                .bind(instance_id)
                .bind(now + HANDOVER_LIFETIME_MS)
                .execute(&mut *tx)
                .await?;
                // Billing moves with it: the earlier attempt's span ends, this one's begins.
                sqlx::query(CLOSE_BILLING)
                .bind(instance_id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "UPDATE job_attempts SET instance_id = $3, merge_path = $4,
                         instance_type = COALESCE(instance_type, (SELECT instance_type FROM builder_instances WHERE id = $3)),
                         market = COALESCE(market, (SELECT market FROM builder_instances WHERE id = $3)),
                         billed_from = COALESCE(billed_from, $5)
                     WHERE build_job_id = $1 AND number = $2",
                )
                .bind(job_id)
                .bind(*attempt as i32)
                .bind(instance_id)
                .bind(merge_path.map(|p| p.as_str()))
                .bind(now)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                rows
            }
            Transition::JobRunning { job_id, attempt } => {
                let mut tx = self.pool.begin().await?;
                let rows = sqlx::query(
                    "UPDATE build_jobs SET status = 'running', started_at = COALESCE(started_at, $3)
                     WHERE id = $1 AND attempt = $2 AND status IN ('provisioning', 'running')",
                )
                .bind(job_id)
                .bind(*attempt as i32)
                .bind(now)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                sqlx::query(
                    "UPDATE job_attempts SET connected_at = COALESCE(connected_at, $3) WHERE build_job_id = $1 AND number = $2",
                )
                .bind(job_id)
                .bind(*attempt as i32)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                rows
            }
            Transition::AttemptEnded {
                job_id,
                attempt,
                owner,
                takeover,
                predecessor,
                result,
                message,
                end,
            } => {
                let mut tx = self.pool.begin().await?;
                if *takeover {
                    // Only a lease that ran out in the store may be taken (or one of this
                    // core's earlier incarnation, which is gone): this write also locks the
                    // row against the owner's renewal until the end is stored.
                    let expired = sqlx::query(
                        "UPDATE build_jobs SET lease_until = lease_until
                         WHERE id = $1 AND attempt = $2 AND lease_owner = $3 AND (lease_until <= $4 OR $5)",
                    )
                    .bind(job_id)
                    .bind(*attempt as i32)
                    .bind(owner)
                    .bind(now)
                    .bind(*predecessor)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                    if expired != 1 {
                        return Ok(false);
                    }
                }
                let query = match end {
                    JobEnd::Requeued {
                        not_before,
                        infra_failures,
                    } => sqlx::query(guarded_end!(
                        "UPDATE build_jobs SET status = 'queued', lease_owner = NULL, lease_until = NULL, vm_id = NULL,
                         not_before = $4, infra_failures = $5 "
                    ))
                    .bind(job_id)
                    .bind(*attempt as i32)
                    .bind(owner)
                    .bind(not_before.millis())
                    .bind(*infra_failures as i32),
                    JobEnd::Completed {
                        artifact_url,
                        digest,
                        exit_code,
                    } => sqlx::query(guarded_end!(
                        "UPDATE build_jobs SET status = 'completed', lease_owner = NULL, lease_until = NULL,
                         artifact_url = $4, digest = $5, exit_code = $6, completed_at = $7, error_message = NULL "
                    ))
                    .bind(job_id)
                    .bind(*attempt as i32)
                    .bind(owner)
                    .bind(artifact_url)
                    .bind(digest)
                    .bind(*exit_code)
                    .bind(now),
                    JobEnd::Failed {
                        kind,
                        exit_code,
                        message,
                        infra_failures,
                    } => sqlx::query(guarded_end!(
                        "UPDATE build_jobs SET status = 'failed', lease_owner = NULL, lease_until = NULL,
                         failure_kind = $4, exit_code = $5, error_message = $6, infra_failures = $7, completed_at = $8 "
                    ))
                    .bind(job_id)
                    .bind(*attempt as i32)
                    .bind(owner)
                    .bind(kind.as_str())
                    .bind(*exit_code)
                    .bind(message)
                    .bind(*infra_failures as i32)
                    .bind(now),
                    JobEnd::Cancelled { message } => sqlx::query(guarded_end!(
                        "UPDATE build_jobs SET status = 'cancelled', lease_owner = NULL, lease_until = NULL,
                         error_message = $4, completed_at = $5 "
                    ))
                    .bind(job_id)
                    .bind(*attempt as i32)
                    .bind(owner)
                    .bind(message)
                    .bind(now),
                };
                let rows = query.execute(&mut *tx).await?.rows_affected();
                if rows == 1 {
                    // The attempt's agent token dies with it.
                    sqlx::query(
                        "UPDATE job_attempts SET ended_at = $3, result = $4, message = $5, token_hash = NULL
                         WHERE build_job_id = $1 AND number = $2",
                    )
                    .bind(job_id)
                    .bind(*attempt as i32)
                    .bind(now)
                    .bind(result.as_str())
                    .bind(message)
                    .execute(&mut *tx)
                    .await?;
                    tx.commit().await?;
                }
                rows
            }
            Transition::AttemptAdopted {
                job_id,
                attempt,
                from,
                owner,
                lease_until,
                predecessor,
            } => {
                let mut tx = self.pool.begin().await?;
                let rows = sqlx::query(
                    "UPDATE build_jobs SET lease_owner = $3, lease_until = $4
                     WHERE id = $1 AND attempt = $2 AND status = 'running' AND lease_owner = $5
                       AND (lease_until IS NULL OR lease_until <= $6 OR $7)",
                )
                .bind(job_id)
                .bind(*attempt as i32)
                .bind(owner)
                .bind(lease_until.millis())
                .bind(from)
                .bind(now)
                .bind(*predecessor)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if rows == 1 {
                    // The attempt's owner is the core that holds it now; its end, if the
                    // agent never comes back, names the core it was taken from.
                    sqlx::query(
                        "UPDATE job_attempts SET owner = $3 WHERE build_job_id = $1 AND number = $2 AND ended_at IS NULL",
                    )
                    .bind(job_id)
                    .bind(*attempt as i32)
                    .bind(owner)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                rows
            }
            Transition::AttemptReleased {
                job_id,
                attempt,
                owner,
            } => sqlx::query(
                "UPDATE build_jobs SET lease_until = $4
                 WHERE id = $1 AND attempt = $2 AND status = 'running' AND lease_owner = $3",
            )
            .bind(job_id)
            .bind(*attempt as i32)
            .bind(owner)
            .bind(now)
            .execute(&self.pool)
            .await?
            .rows_affected(),
            Transition::LeasesRenewed {
                owner,
                job_ids,
                until,
            } => {
                let mut total = 0;
                for chunk in job_ids.chunks(500) {
                    let mut builder: QueryBuilder<$db> =
                        QueryBuilder::new("UPDATE build_jobs SET lease_until = ");
                    builder.push_bind(until.millis());
                    builder.push(" WHERE lease_owner = ");
                    builder.push_bind(owner);
                    builder.push(" AND id IN (");
                    let mut ids = builder.separated(", ");
                    for id in chunk {
                        ids.push_bind(id);
                    }
                    builder.push(")");
                    total += builder.build().execute(&self.pool).await?.rows_affected();
                }
                // A renewal that finds fewer rows means a job moved away: the caller reloads.
                return Ok(total == job_ids.len() as u64);
            }
        };
        Ok(affected == 1)
    }

    /// Binds an agent token (its SHA-256, hex) to a live attempt.
    async fn set_attempt_token(
        &self,
        job_id: &str,
        attempt: u32,
        token_hash: &str,
    ) -> Result<bool, DbError> {
        let _turn = self.write_turn().await;
        let rows = sqlx::query(
            "UPDATE job_attempts SET token_hash = $3 WHERE build_job_id = $1 AND number = $2 AND ended_at IS NULL",
        )
        .bind(job_id)
        .bind(attempt as i32)
        .bind(token_hash)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(rows == 1)
    }

    /// The live attempt an agent token belongs to.
    async fn attempt_for_token(
        &self,
        token_hash: &str,
    ) -> Result<Option<(String, u32)>, DbError> {
        let row: Option<(String, i32)> = sqlx::query_as(
            "SELECT build_job_id, number FROM job_attempts WHERE token_hash = $1 AND ended_at IS NULL",
        )
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(job, number)| (job, number as u32)))
    }

    /// Every attempt of a run's jobs, oldest first.
    async fn attempts_of_run(&self, run_id: &str) -> Result<Vec<AttemptRow>, DbError> {
        Ok(sqlx::query_as::<_, AttemptRow>(
            "SELECT a.build_job_id, a.number, a.owner, a.instance_id, a.merge_path, a.started_at, a.connected_at,
                    a.ended_at, a.result, a.message, a.instance_type, a.market, a.placement,
                    a.billed_from, a.billed_until
             FROM job_attempts a JOIN build_jobs j ON j.id = a.build_job_id
             WHERE j.workflow_run_id = $1 ORDER BY a.build_job_id, a.number",
        )
        .bind(run_id)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Records an instance the moment the provider returned it (before anything else can
    /// fail), so no path forgets it; its attempt learns where it runs and is billed from now.
    async fn record_instance(&self, record: &InstanceRecord<'_>) -> Result<(), DbError> {
        let _turn = self.write_turn().await;
        let now = crate::db::now_ms();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO builder_instances (id, provider, build_job_id, created_at, attempt, owner, instance_type, market, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(record.instance_id)
        .bind(record.provider)
        .bind(record.job_id)
        .bind(now)
        .bind(record.attempt as i32)
        .bind(record.owner)
        .bind(record.instance_type)
        .bind(record.market)
        .bind(record.expires_at.millis())
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE job_attempts SET instance_type = $3, market = $4, placement = $5,
                 billed_from = COALESCE(billed_from, $6), instance_id = COALESCE(instance_id, $7)
             WHERE build_job_id = $1 AND number = $2",
        )
        .bind(record.job_id)
        .bind(record.attempt as i32)
        .bind(record.instance_type)
        .bind(record.market)
        .bind(record.placement)
        .bind(now)
        .bind(record.instance_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn instances_to_reap(
        &self,
        now: Timestamp,
        running_grace: std::time::Duration,
    ) -> Result<Vec<(String, ReapReason)>, DbError> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT i.id,
                    CASE WHEN a.number IS NULL OR j.id IS NULL THEN 'no_attempt'
                         WHEN a.ended_at IS NOT NULL OR j.attempt <> i.attempt THEN 'attempt_ended'
                         WHEN j.lease_until IS NULL
                              OR j.lease_until < (CASE WHEN j.status = 'running' THEN $2 ELSE $1 END)
                              THEN 'lease_expired'
                         ELSE 'lifetime' END
             FROM builder_instances i
             LEFT JOIN job_attempts a ON a.build_job_id = i.build_job_id AND a.number = i.attempt
             LEFT JOIN build_jobs j ON j.id = i.build_job_id
             WHERE i.terminated_at IS NULL
               AND (a.number IS NULL OR a.ended_at IS NOT NULL OR j.id IS NULL
                    OR j.attempt <> i.attempt OR j.lease_until IS NULL
                    OR j.lease_until < (CASE WHEN j.status = 'running' THEN $2 ELSE $1 END)
                    OR i.expires_at < $1)
             ORDER BY i.created_at",
        )
        .bind(now.millis())
        .bind(now.millis() - i64::try_from(running_grace.as_millis()).unwrap_or(i64::MAX / 2))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, reason)| (id, ReapReason::parse(&reason)))
            .collect())
    }

    /// Instances recorded for an attempt and not terminated.
    async fn instances_of_attempt(
        &self,
        job_id: &str,
        attempt: u32,
    ) -> Result<Vec<String>, DbError> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM builder_instances WHERE build_job_id = $1 AND attempt = $2 AND terminated_at IS NULL",
        )
        .bind(job_id)
        .bind(attempt as i32)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn attempt_holds(
        &self,
        job_id: &str,
        attempt: u32,
        now: Timestamp,
    ) -> Result<bool, DbError> {
        let found: Option<i64> = sqlx::query_scalar(
            "SELECT lease_until FROM build_jobs WHERE id = $1 AND attempt = $2
             AND status IN ('provisioning', 'running') AND lease_until > $3",
        )
        .bind(job_id)
        .bind(attempt as i32)
        .bind(now.millis())
        .fetch_optional(&self.pool)
        .await?;
        Ok(found.is_some())
    }

    async fn delete_logs_of_runs_finished_before(
        &self,
        cutoff: i64,
        max_jobs: i64,
    ) -> Result<u64, DbError> {
        // Both files (SQLite): the main one's turn first, as every write to both.
        let _turn = self.write_turn().await;
        let _log_turn = self.log_write_turn().await;
        let jobs: Vec<String> = sqlx::query_scalar(
            "SELECT j.id FROM build_jobs j JOIN workflow_runs r ON r.id = j.workflow_run_id
             WHERE r.status IN ('completed', 'failed', 'cancelled') AND r.updated_at < $1
               AND (EXISTS (SELECT 1 FROM log_chunks c WHERE c.build_job_id = j.id)
                    OR EXISTS (SELECT 1 FROM build_logs l WHERE l.build_job_id = j.id))
             LIMIT $2",
        )
        .bind(cutoff)
        .bind(max_jobs)
        .fetch_all(&self.pool)
        .await?;
        let mut lines: i64 = 0;
        let mut tx = self.pool.begin().await?;
        for job in &jobs {
            lines += sqlx::query_scalar::<_, i64>(
                "SELECT CAST(COALESCE(SUM(line_count), 0) AS BIGINT) FROM log_chunks WHERE build_job_id = $1",
            )
            .bind(job)
            .fetch_one(&mut *tx)
            .await?;
            sqlx::query("DELETE FROM log_chunks WHERE build_job_id = $1")
                .bind(job)
                .execute(&mut *tx)
                .await?;
            lines += sqlx::query("DELETE FROM build_logs WHERE build_job_id = $1")
                .bind(job)
                .execute(&mut *tx)
                .await?
                .rows_affected() as i64;
        }
        tx.commit().await?;
        Ok(lines.max(0) as u64)
    }

    async fn spot_interrupted_before(&self, job_id: &str) -> Result<bool, DbError> {
        let prefix = format!("{}:%", crate::engine::InfraKind::SpotInterrupted.as_str());
        let found: Option<i32> = sqlx::query_scalar(
            "SELECT number FROM job_attempts
             WHERE build_job_id = $1 AND result = 'infrastructure' AND message LIKE $2 LIMIT 1",
        )
        .bind(job_id)
        .bind(prefix)
        .fetch_optional(&self.pool)
        .await?;
        Ok(found.is_some())
    }

    /// Instances recorded and not terminated (diagnostics and tests).
    async fn live_instances(&self) -> Result<Vec<String>, DbError> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM builder_instances WHERE terminated_at IS NULL ORDER BY created_at",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    async fn deployment_id(&self) -> Result<String, DbError> {
        let id: Option<String> = sqlx::query_scalar("SELECT id FROM deployment")
            .fetch_optional(&self.pool)
            .await?;
        id.ok_or_else(|| DbError::Corrupt("the deployment table has no row".into()))
    }

    /// The newest run of an environment.
    async fn latest_run_of_environment(
        &self,
        environment_id: &str,
    ) -> Result<Option<RunRow>, DbError> {
        Ok(sqlx::query_as::<_, RunRow>(
            "SELECT * FROM workflow_runs WHERE environment_id = $1 ORDER BY created_at DESC, id DESC LIMIT 1",
        )
        .bind(environment_id)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Unfinished runs of an environment created before `except` (older by creation time,
    /// then id): what a new run supersedes. Two runs submitted at once never cancel each
    /// other.
    async fn unfinished_runs_of_environment(
        &self,
        environment_id: &str,
        except: &str,
    ) -> Result<Vec<String>, DbError> {
        Ok(sqlx::query_scalar(
            "SELECT r.id FROM workflow_runs r JOIN workflow_runs n ON n.id = $2
             WHERE r.environment_id = $1 AND r.id <> $2 AND r.status IN ('pending', 'building')
               AND (r.created_at < n.created_at OR (r.created_at = n.created_at AND r.id < n.id))
             ORDER BY r.created_at",
        )
        .bind(environment_id)
        .bind(except)
        .fetch_all(&self.pool)
        .await?)
    }
        }
    };
}

/// The highest stored seq of job `$1`: in chunks, or one per row as earlier versions stored.
pub(crate) const LAST_LOG_SEQ: &str =
    "SELECT MAX(m) FROM (SELECT MAX(last_seq) AS m FROM log_chunks WHERE build_job_id = $1
                        UNION ALL SELECT MAX(seq) AS m FROM build_logs WHERE build_job_id = $1) x";

pub mod chunks;
pub mod postgres;
pub mod sqlite;

/// A stored value the engine cannot read: the database holds something this version never
/// writes.
fn corrupt(what: &str, value: &str) -> DbError {
    DbError::Corrupt(format!("{what} `{value}`"))
}

/// Rows → the engine's snapshot.
pub fn snapshot(run: RunRow, jobs: Vec<JobRow>) -> Result<RunSnapshot, DbError> {
    let status = RunStatus::parse(&run.status).ok_or_else(|| corrupt("run status", &run.status))?;
    let cancel = match &run.cancel_reason {
        Some(text) => {
            Some(CancelReason::from_db(text).ok_or_else(|| corrupt("cancel reason", text))?)
        }
        None => None,
    };
    let jobs = jobs
        .into_iter()
        .map(|job| {
            let spec: crate::stagely_yaml::JobSpec = serde_json::from_str(&job.spec)
                .map_err(|error| corrupt("job spec", &error.to_string()))?;
            let kind = match spec.kind {
                crate::stagely_yaml::JobKind::Build => JobKind::Build,
                crate::stagely_yaml::JobKind::Merge { sources } => JobKind::Merge { sources },
            };
            Ok(JobSnapshot {
                status: JobStatus::parse(&job.status)
                    .ok_or_else(|| corrupt("job status", &job.status))?,
                id: job.id,
                name: job.name,
                kind,
                attempt: job.attempt.max(0) as u32,
                infra_failures: job.infra_failures.max(0) as u32,
                lease_owner: job.lease_owner,
                lease_until: job.lease_until.map(Timestamp),
                not_before: job.not_before.map(Timestamp),
                timeout: std::time::Duration::from_secs(spec.timeout_seconds),
                instance_id: job.vm_id,
                attempt_connected_at: job.attempt_connected_at.map(Timestamp),
            })
        })
        .collect::<Result<Vec<_>, DbError>>()?;
    Ok(RunSnapshot {
        id: run.id,
        environment_id: run.environment_id,
        status,
        fail_fast: run.fail_fast,
        created_at: Timestamp(run.created_at),
        cancel,
        jobs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{AttemptResult, FailureKind, JobEnd};
    use crate::engine::{Claim, JobStatus, Timestamp, Transition};

    /// A PostgreSQL database for one test, dropped after it.
    struct PgScratch {
        name: String,
    }

    const ADMIN: &str = "postgres://postgres@127.0.0.1:5432/postgres";

    impl Drop for PgScratch {
        fn drop(&mut self) {
            let name = self.name.clone();
            let _ = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async {
                    use sqlx::Connection;
                    if let Ok(mut admin) = sqlx::PgConnection::connect(ADMIN).await {
                        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                        )))
                        .execute(&mut admin)
                        .await;
                    }
                });
            })
            .join();
        }
    }

    /// Which backend a test runs on. PostgreSQL must answer in CI; elsewhere its tests skip,
    /// saying why.
    #[derive(Clone, Copy)]
    enum Backend {
        Sqlite,
        Postgres,
    }

    /// Keeps the backend's files or database alive for the test.
    #[allow(dead_code)]
    enum Scratch {
        Dir(tempfile::TempDir),
        Pg(PgScratch),
    }

    async fn open(backend: Backend) -> Option<(Scratch, Db)> {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let db = Db::open_sqlite(&dir.path().join("t.db")).await.unwrap();
                Some((Scratch::Dir(dir), db))
            }
            Backend::Postgres => {
                use sqlx::Connection;
                let mut admin = match sqlx::PgConnection::connect(ADMIN).await {
                    Ok(admin) => admin,
                    Err(error) if std::env::var("CI").is_err() => {
                        eprintln!(
                            "skipping: PostgreSQL is not reachable on 127.0.0.1:5432 ({error})"
                        );
                        return None;
                    }
                    Err(error) => panic!("PostgreSQL is required in CI: {error}"),
                };
                let name = format!("stagely_unit_{}", uuid::Uuid::new_v4().simple());
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut admin)
                    .await
                    .unwrap();
                let scratch = PgScratch { name: name.clone() };
                let db = Db::open_postgres(&format!("postgres://postgres@127.0.0.1:5432/{name}"))
                    .await
                    .unwrap();
                Some((Scratch::Pg(scratch), db))
            }
        }
    }

    async fn db_with_jobs(backend: Backend, jobs: &[&str]) -> Option<(Scratch, Db)> {
        let (dir, db) = open(backend).await?;
        let run = NewRun {
            id: "r1".into(),
            environment_id: "env".into(),
            trigger: "manual".into(),
            repo_url: "/repo".into(),
            commit_hash: "c0ffee".into(),
            branch: "main".into(),
            config_path: String::new(),
            fail_fast: true,
            submitted_by: Some("ci".into()),
        };
        let spec = r#"{"service":"api","kind":{"type":"build"},"context_path":".","dockerfile":"Dockerfile","build_args":{},"timeout_seconds":60}"#;
        let jobs: Vec<NewJob> = jobs
            .iter()
            .map(|id| NewJob {
                id: id.to_string(),
                name: id.to_string(),
                architecture: "amd64".into(),
                platform: "linux/amd64".into(),
                machine: "medium".into(),
                spec: spec.into(),
            })
            .collect();
        let created = db.create_run(&run, &jobs).await.unwrap();
        assert_eq!(
            db.run_snapshot("r1").await.unwrap(),
            Some(created),
            "create_run returns exactly what is stored"
        );
        Some((dir, db))
    }

    fn claim(job: &str, expected: u32) -> AttemptClaim {
        AttemptClaim {
            claim: Claim {
                job_id: job.into(),
                environment_id: "env".into(),
                attempt: expected + 1,
                expected_attempt: expected,
                reuses_instance: false,
            },
            token_hash: format!("hash-{job}-{}", expected + 1),
        }
    }

    /// Each store test, once per backend.
    macro_rules! on_both_backends {
        ($name:ident) => {
            mod $name {
                #[tokio::test]
                async fn sqlite() {
                    super::$name(super::Backend::Sqlite).await
                }

                #[tokio::test]
                async fn postgres() {
                    super::$name(super::Backend::Postgres).await
                }
            }
        };
    }

    on_both_backends!(claims_are_guarded_by_status_attempt_and_the_limits);
    on_both_backends!(an_attempt_ends_only_under_its_owner_and_its_token_dies_with_it);
    on_both_backends!(an_earlier_incarnation_s_attempts_are_taken_before_their_lease_runs_out);
    on_both_backends!(duplicate_log_lines_are_stored_once);
    on_both_backends!(chunked_logs_page_across_chunks_and_read_older_rows_alongside);
    on_both_backends!(logs_of_runs_finished_before_the_cutoff_are_deleted_and_no_others);
    on_both_backends!(the_engine_loads_when_the_current_attempt_first_connected);

    /// What an adopting core needs to keep an attempt's timeout: its first connection, in
    /// both ways the engine loads jobs, and nothing for a job not yet connected.
    async fn the_engine_loads_when_the_current_attempt_first_connected(backend: Backend) {
        let Some((_dir, db)) = db_with_jobs(backend, &["a", "b"]).await else {
            return;
        };
        let lease = Timestamp(600_000);
        db.claim(
            "core/1",
            &[claim("a", 0), claim("b", 0)],
            lease,
            10,
            10,
            Timestamp(1_000),
        )
        .await
        .unwrap();
        let running = Transition::JobRunning {
            job_id: "a".into(),
            attempt: 1,
        };
        assert!(db.apply(&running, Timestamp(5_000)).await.unwrap());
        // A second report of the same connection keeps the first time.
        db.apply(&running, Timestamp(9_000)).await.unwrap();
        let connected = |snapshot: &RunSnapshot| -> Vec<(String, Option<Timestamp>)> {
            snapshot
                .jobs
                .iter()
                .map(|job| (job.id.clone(), job.attempt_connected_at))
                .collect()
        };
        let want = vec![
            ("a".to_string(), Some(Timestamp(5_000))),
            ("b".to_string(), None),
        ];
        let one = db.run_snapshot("r1").await.unwrap().unwrap();
        assert_eq!(connected(&one), want);
        let all = db.unfinished_runs().await.unwrap();
        assert_eq!(connected(&all[0]), want);
    }

    async fn claims_are_guarded_by_status_attempt_and_the_limits(backend: Backend) {
        let Some((_dir, db)) = db_with_jobs(backend, &["a", "b", "c"]).await else {
            return;
        };
        let now = Timestamp(1_000);
        let lease = Timestamp(31_000);
        let (won, lost) = db
            .claim(
                "core/1",
                &[claim("a", 0), claim("b", 0), claim("c", 0)],
                lease,
                2,
                10,
                now,
            )
            .await
            .unwrap();
        assert_eq!(won, ["a", "b"]);
        assert_eq!(lost, ["c"], "the global limit holds inside the claim");
        // A second claim of a job already claimed loses (exactly-once dispatch).
        let (won, lost) = db
            .claim("core/2", &[claim("a", 0)], lease, 10, 10, now)
            .await
            .unwrap();
        assert!(won.is_empty() && lost == ["a"]);
        let snapshot = db.run_snapshot("r1").await.unwrap().unwrap();
        let a = snapshot.jobs.iter().find(|j| j.id == "a").unwrap();
        assert_eq!(a.status, JobStatus::Provisioning);
        assert_eq!(a.attempt, 1);
        assert_eq!(a.lease_owner.as_deref(), Some("core/1"));
        // Per-environment limit.
        let (won, _) = db
            .claim("core/1", &[claim("c", 0)], lease, 10, 2, now)
            .await
            .unwrap();
        assert!(won.is_empty());
    }

    /// A restarted core (same `core_id`, new incarnation) takes its predecessor's attempts at
    /// once; any other core only once their lease ran out in the store.
    async fn an_earlier_incarnation_s_attempts_are_taken_before_their_lease_runs_out(
        backend: Backend,
    ) {
        let Some((_dir, db)) = db_with_jobs(backend, &["a", "b"]).await else {
            return;
        };
        let now = Timestamp(1_000);
        db.claim(
            "core/old",
            &[claim("a", 0), claim("b", 0)],
            Timestamp(31_000),
            10,
            10,
            now,
        )
        .await
        .unwrap();
        let running = Transition::JobRunning {
            job_id: "a".into(),
            attempt: 1,
        };
        assert!(db.apply(&running, now).await.unwrap());
        let adopt = |predecessor: bool| Transition::AttemptAdopted {
            job_id: "a".into(),
            attempt: 1,
            from: "core/old".into(),
            owner: "core/new".into(),
            lease_until: Timestamp(32_000),
            predecessor,
        };
        let later = Timestamp(2_000);
        assert!(
            !db.apply(&adopt(false), later).await.unwrap(),
            "another core waits for the lease"
        );
        assert!(db.apply(&adopt(true), later).await.unwrap());
        let end = |predecessor: bool| Transition::AttemptEnded {
            job_id: "b".into(),
            attempt: 1,
            owner: "core/old".into(),
            takeover: true,
            predecessor,
            result: AttemptResult::Infrastructure,
            message: Some("lease_expired: gone".into()),
            end: JobEnd::Requeued {
                not_before: later,
                infra_failures: 1,
            },
        };
        assert!(!db.apply(&end(false), later).await.unwrap());
        assert!(db.apply(&end(true), later).await.unwrap());
    }

    async fn an_attempt_ends_only_under_its_owner_and_its_token_dies_with_it(backend: Backend) {
        let Some((_dir, db)) = db_with_jobs(backend, &["a"]).await else {
            return;
        };
        let now = Timestamp(1_000);
        db.claim("core/1", &[claim("a", 0)], Timestamp(31_000), 10, 10, now)
            .await
            .unwrap();
        assert_eq!(
            db.attempt_for_token("hash-a-1").await.unwrap(),
            Some(("a".to_string(), 1)),
            "the claim binds the attempt's token"
        );
        assert!(db.set_attempt_token("a", 1, "hash-1").await.unwrap());
        assert_eq!(db.attempt_for_token("hash-a-1").await.unwrap(), None);
        assert_eq!(
            db.attempt_for_token("hash-1").await.unwrap(),
            Some(("a".to_string(), 1))
        );
        db.record_instance(&InstanceRecord {
            instance_id: "i-1",
            provider: "ec2",
            job_id: "a",
            attempt: 1,
            owner: "core/1",
            instance_type: "c5.xlarge",
            market: Some("on-demand"),
            placement: Some("spot capacity ran out: on-demand instead"),
            expires_at: Timestamp(20_000),
        })
        .await
        .unwrap();
        let reap = |at: i64| {
            let db = db.clone();
            async move {
                db.instances_to_reap(Timestamp(at), std::time::Duration::ZERO)
                    .await
                    .unwrap()
            }
        };
        assert!(reap(1_000).await.is_empty(), "lease holds, lifetime left");
        assert_eq!(
            reap(25_000).await,
            [("i-1".to_string(), ReapReason::Lifetime)],
            "outlived its lifetime though its lease holds"
        );
        assert_eq!(
            reap(40_000).await,
            [("i-1".to_string(), ReapReason::LeaseExpired)]
        );
        let attempts = db.attempts_of_run("r1").await.unwrap();
        assert_eq!(attempts[0].instance_type.as_deref(), Some("c5.xlarge"));
        assert_eq!(attempts[0].market.as_deref(), Some("on-demand"));
        assert!(attempts[0].placement.as_deref().unwrap().contains("spot"));
        assert!(attempts[0].billed_from.is_some() && attempts[0].billed_until.is_none());
        let end = |owner: &str, attempt: u32| Transition::AttemptEnded {
            job_id: "a".into(),
            attempt,
            owner: owner.into(),
            takeover: false,
            predecessor: false,
            result: AttemptResult::Failed,
            message: Some("exit 1".into()),
            end: JobEnd::Failed {
                kind: FailureKind::Build,
                exit_code: Some(1),
                message: "exit 1".into(),
                infra_failures: 0,
            },
        };
        assert!(
            !db.apply(&end("core/2", 1), now).await.unwrap(),
            "wrong owner"
        );
        assert!(
            !db.apply(&end("core/1", 2), now).await.unwrap(),
            "wrong attempt"
        );
        assert!(db.apply(&end("core/1", 1), now).await.unwrap());
        assert!(
            !db.apply(&end("core/1", 1), now).await.unwrap(),
            "final is final"
        );
        assert_eq!(db.attempt_for_token("hash-1").await.unwrap(), None);
        assert_eq!(
            reap(1_000).await,
            [("i-1".to_string(), ReapReason::AttemptEnded)]
        );
        db.mark_instance_terminated("i-1").await.unwrap();
        assert!(reap(1_000).await.is_empty());
        let billed = &db.attempts_of_run("r1").await.unwrap()[0];
        assert!(
            billed.billed_until >= billed.billed_from,
            "billing ends at termination"
        );
        let job = db.job("a").await.unwrap().unwrap();
        assert_eq!(job.status, "failed");
        assert_eq!(job.failure_kind.as_deref(), Some("build"));
        let attempts = db.attempts_of_run("r1").await.unwrap();
        assert_eq!(attempts[0].result.as_deref(), Some("failed"));
    }

    async fn duplicate_log_lines_are_stored_once(backend: Backend) {
        let Some((_dir, db)) = db_with_jobs(backend, &["j1"]).await else {
            return;
        };
        let line = |seq| NewLogLine {
            seq,
            stream: "stdout",
            line: format!("line {seq}\n"),
            continued: false,
        };
        db.append_logs("j1", &[line(1), line(2)]).await.unwrap();
        db.append_logs("j1", &[line(2), line(3)]).await.unwrap();
        assert_eq!(db.last_log_seq("j1").await.unwrap(), 3);
        let page = db.logs_page("j1", 0, 10).await.unwrap();
        assert_eq!(page.iter().map(|l| l.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(db.log_stats("j1").await.unwrap(), (3, 21));
    }

    async fn chunked_logs_page_across_chunks_and_read_older_rows_alongside(backend: Backend) {
        let Some((_dir, db)) = db_with_jobs(backend, &["j1"]).await else {
            return;
        };
        // Lines stored one per row by an earlier version: seqs 1..=3.
        for seq in 1..=3i64 {
            sqlx_insert_legacy(&db, seq).await;
        }
        // Then chunks: 4..=2003 in batches of 500, with a gap at 1000 (a capped line) and
        // lines big enough that a batch spans several chunk rows.
        let big = "z".repeat(3000);
        let mut seq = 4;
        while seq <= 2003 {
            let batch: Vec<NewLogLine> = (seq..(seq + 500).min(2004))
                .filter(|s| *s != 1000)
                .map(|s| NewLogLine {
                    seq: s,
                    stream: if s % 2 == 0 { "stdout" } else { "stderr" },
                    line: format!("{s} {big}\n"),
                    continued: false,
                })
                .collect();
            db.append_logs("j1", &batch).await.unwrap();
            seq += 500;
        }
        assert_eq!(db.last_log_seq("j1").await.unwrap(), 2003);
        // Page through with odd page sizes: every line once, in order, the gap kept.
        let mut after = 0;
        let mut seen = Vec::new();
        loop {
            let page = db.logs_page("j1", after, 37).await.unwrap();
            if page.is_empty() {
                break;
            }
            assert!(page.len() <= 37);
            after = page.last().unwrap().seq;
            seen.extend(page);
        }
        let expected: Vec<i64> = (1..=2003).filter(|s| *s != 1000).collect();
        assert_eq!(seen.iter().map(|l| l.seq).collect::<Vec<_>>(), expected);
        assert_eq!(seen[0].line, "legacy 1\n");
        assert_eq!(
            seen[10].stream,
            if seen[10].seq % 2 == 0 {
                "stdout"
            } else {
                "stderr"
            }
        );
        assert!(seen[10].line.starts_with(&format!("{} zzz", seen[10].seq)));
        let (count, bytes) = db.log_stats("j1").await.unwrap();
        assert_eq!(count, expected.len() as i64);
        assert_eq!(bytes, seen.iter().map(|l| l.line.len() as i64).sum::<i64>());
        // A batch that overlaps what is stored keeps only its new lines.
        let overlap: Vec<NewLogLine> = (2000..=2005)
            .map(|s| NewLogLine {
                seq: s,
                stream: "stdout",
                line: format!("again {s}\n"),
                continued: false,
            })
            .collect();
        db.append_logs("j1", &overlap).await.unwrap();
        let tail = db.logs_page("j1", 1999, 100).await.unwrap();
        let tail: Vec<(i64, &str)> = tail.iter().map(|l| (l.seq, l.line.as_str())).collect();
        assert_eq!(tail.len(), 6);
        assert!(tail[..4].iter().all(|(_, l)| !l.starts_with("again")));
        assert_eq!(tail[4], (2004, "again 2004\n"));
        // Repetitive lines were stored packed; lines LZ4 cannot shrink (random hex) as text.
        let (packed, text) = db.chunk_forms_for_tests("j1").await.unwrap();
        assert!(packed > 0, "packed {packed}, text {text}");
        let noise: Vec<NewLogLine> = (2006..=2010)
            .map(|s| NewLogLine {
                seq: s,
                stream: "stdout",
                line: chunks::random_hex_for_tests(s as u64, 256) + "\n",
                continued: false,
            })
            .collect();
        db.append_logs("j1", &noise).await.unwrap();
        assert_eq!(
            db.chunk_forms_for_tests("j1").await.unwrap(),
            (packed, text + 1)
        );
        let read: Vec<String> = db
            .logs_page("j1", 2005, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|row| row.line)
            .collect();
        let written: Vec<String> = noise.into_iter().map(|line| line.line).collect();
        assert_eq!(read, written);
    }

    /// A line as an earlier version stored it (one row in `build_logs`).
    async fn sqlx_insert_legacy(db: &Db, seq: i64) {
        db.insert_legacy_log_line_for_tests("j1", seq, &format!("legacy {seq}\n"))
            .await
            .unwrap();
    }

    async fn logs_of_runs_finished_before_the_cutoff_are_deleted_and_no_others(backend: Backend) {
        let Some((_dir, db)) = db_with_jobs(backend, &["j1", "j2"]).await else {
            return;
        };
        let line = |seq| NewLogLine {
            seq,
            stream: "stdout",
            line: format!("line {seq}\n"),
            continued: false,
        };
        for job in ["j1", "j2"] {
            db.append_logs(job, &[line(1), line(2)]).await.unwrap();
        }
        let finished_at = 50_000;
        assert_eq!(
            db.delete_logs_of_runs_finished_before(i64::MAX, 10)
                .await
                .unwrap(),
            0,
            "an unfinished run keeps its logs whatever its age"
        );
        for job in ["j1", "j2"] {
            let skipped = Transition::JobSkipped {
                job_id: job.into(),
                status: JobStatus::Cancelled,
                message: "cancelled".into(),
            };
            assert!(db.apply(&skipped, Timestamp(finished_at)).await.unwrap());
        }
        let finished = Transition::RunFinished {
            run_id: "r1".into(),
            status: RunStatus::Cancelled,
            message: None,
        };
        assert!(db.apply(&finished, Timestamp(finished_at)).await.unwrap());
        assert_eq!(
            db.delete_logs_of_runs_finished_before(finished_at, 10)
                .await
                .unwrap(),
            0,
            "finished at the cutoff, not before it"
        );
        // One job per batch: the caller repeats until nothing is left.
        assert_eq!(
            db.delete_logs_of_runs_finished_before(finished_at + 1, 1)
                .await
                .unwrap(),
            2
        );
        assert_eq!(
            db.delete_logs_of_runs_finished_before(finished_at + 1, 1)
                .await
                .unwrap(),
            2
        );
        assert_eq!(
            db.delete_logs_of_runs_finished_before(finished_at + 1, 1)
                .await
                .unwrap(),
            0
        );
        assert!(db.logs_page("j1", 0, 10).await.unwrap().is_empty());
        assert!(
            db.run("r1").await.unwrap().is_some(),
            "the run itself stays"
        );
    }

    /// PostgreSQL's claims read the live counts a trigger keeps: they must equal a count of
    /// the live jobs after claims, ends, requeues and a deleted run.
    #[tokio::test]
    async fn postgres_live_counts_follow_every_status_change() {
        let Some((scratch, db)) = db_with_jobs(Backend::Postgres, &["a", "b", "c"]).await else {
            return;
        };
        let Scratch::Pg(PgScratch { name }) = &scratch else {
            unreachable!("a PostgreSQL database")
        };
        let pool = sqlx::PgPool::connect(&format!("postgres://postgres@127.0.0.1:5432/{name}"))
            .await
            .unwrap();
        let kept = || async {
            let counted: Vec<(String, i64)> = sqlx::query_as(
                "SELECT environment_id, live FROM live_counts WHERE live <> 0 ORDER BY 1",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            let truth: Vec<(String, i64)> = sqlx::query_as(
                "SELECT r.environment_id, COUNT(*) FROM build_jobs j JOIN workflow_runs r ON r.id = j.workflow_run_id
                 WHERE j.status IN ('provisioning', 'running') GROUP BY 1 ORDER BY 1",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            assert_eq!(counted, truth, "the kept counts equal a count of live jobs");
            counted.iter().map(|(_, live)| *live).sum::<i64>()
        };
        let now = Timestamp(1_000);
        let lease = Timestamp(31_000);
        assert_eq!(kept().await, 0);
        db.claim(
            "core/1",
            &[claim("a", 0), claim("b", 0), claim("c", 0)],
            lease,
            10,
            10,
            now,
        )
        .await
        .unwrap();
        assert_eq!(kept().await, 3);
        assert!(
            db.apply(
                &Transition::JobRunning {
                    job_id: "a".into(),
                    attempt: 1
                },
                now
            )
            .await
            .unwrap()
        );
        assert_eq!(kept().await, 3, "provisioning → running stays live");
        let ended = |job: &str, end: JobEnd| Transition::AttemptEnded {
            job_id: job.into(),
            attempt: 1,
            owner: "core/1".into(),
            takeover: false,
            predecessor: false,
            result: AttemptResult::Infrastructure,
            message: None,
            end,
        };
        let requeue = JobEnd::Requeued {
            not_before: now,
            infra_failures: 1,
        };
        assert!(db.apply(&ended("a", requeue), now).await.unwrap());
        assert_eq!(kept().await, 2, "a requeued job is not live");
        let failed = JobEnd::Failed {
            kind: FailureKind::Build,
            exit_code: Some(1),
            message: "exit 1".into(),
            infra_failures: 0,
        };
        assert!(db.apply(&ended("b", failed), now).await.unwrap());
        assert_eq!(kept().await, 1);
        db.claim("core/1", &[claim("a", 1)], lease, 10, 10, now)
            .await
            .unwrap();
        assert_eq!(kept().await, 2, "claimed again");
        sqlx::query("DELETE FROM workflow_runs WHERE id = 'r1'")
            .execute(&pool)
            .await
            .unwrap();
        assert_eq!(kept().await, 0, "a deleted run's live jobs leave the count");
    }

    #[tokio::test]
    async fn sqlite_log_chunks_live_in_their_own_file_with_large_pages_and_older_ones_move_there() {
        use sqlx::Connection;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        // A database as versions before the log file left it: migrated up to 0005, one chunk
        // in the main file.
        {
            let options = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(&path)
                .create_if_missing(true)
                .foreign_keys(false);
            let mut connection = sqlx::SqliteConnection::connect_with(&options)
                .await
                .unwrap();
            let mut migrator = sqlx::migrate!("./migrations/sqlite");
            migrator.migrations = migrator
                .migrations
                .iter()
                .filter(|migration| migration.version <= 5)
                .cloned()
                .collect::<Vec<_>>()
                .into();
            migrator.run(&mut connection).await.unwrap();
            // (No job row: this is about where the chunk goes, not whose it is.)
            sqlx::query("PRAGMA foreign_keys = OFF")
                .execute(&mut connection)
                .await
                .unwrap();
            sqlx::query(
                "INSERT INTO log_chunks (build_job_id, first_seq, last_seq, stored_at, line_count, bytes, data)
                 VALUES ('old-job', 1, 2, 0, 2, 12, '1 o 6\nhello\n2 e 6\nworld\n')",
            )
            .execute(&mut connection)
            .await
            .unwrap();
            connection.close().await.unwrap();
        }
        let store = sqlite::SqliteStore::open(&path).await.unwrap();
        assert!(sqlite::logs_path(&path).exists());
        let pragma = |sql: &'static str| {
            let pool = store.pool.clone();
            async move {
                sqlx::query_scalar::<_, i64>(sql)
                    .fetch_one(&pool)
                    .await
                    .unwrap()
            }
        };
        assert_eq!(pragma("PRAGMA main.page_size").await, 4096);
        assert_eq!(pragma("PRAGMA logs.page_size").await, 65536);
        assert_eq!(
            pragma("SELECT COUNT(*) FROM main.sqlite_master WHERE name = 'log_chunks'").await,
            0
        );
        assert_eq!(
            pragma("SELECT COUNT(*) FROM logs.sqlite_master WHERE name = 'log_chunks'").await,
            1
        );
        // The moved chunk reads back; new lines follow it into the log file.
        let db = Db(Arc::new(store));
        db.append_logs(
            "old-job",
            &[NewLogLine {
                seq: 3,
                stream: "stdout",
                line: "again\n".into(),
                continued: false,
            }],
        )
        .await
        .unwrap();
        let page = db.logs_page("old-job", 0, 10).await.unwrap();
        let lines: Vec<(i64, &str, &str)> = page
            .iter()
            .map(|row| (row.seq, row.stream.as_str(), row.line.as_str()))
            .collect();
        assert_eq!(
            lines,
            [
                (1, "stdout", "hello\n"),
                (2, "stderr", "world\n"),
                (3, "stdout", "again\n")
            ]
        );
        // Opened again (both files exist): nothing moves twice, nothing is lost.
        drop(db);
        let db = Db::open_sqlite(&path).await.unwrap();
        assert_eq!(db.log_stats("old-job").await.unwrap(), (3, 18));
    }

    #[tokio::test]
    async fn the_schema_refuses_bad_values() {
        let dir = tempfile::tempdir().unwrap();
        let store = sqlite::SqliteStore::open(&dir.path().join("raw.db"))
            .await
            .unwrap();
        let bad = sqlx::query(
            "INSERT INTO workflow_runs (id, environment_id, trigger, status, repo_url, commit_hash, branch, created_at, updated_at)
             VALUES ('x', 'e', 'manual', 'exploded', '/r', 'c', 'main', 0, 0)",
        )
        .execute(&store.pool)
        .await;
        assert!(bad.is_err());
    }
}
