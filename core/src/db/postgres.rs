//! The PostgreSQL backend: production state, shared by every replica. Claims are
//! serialized by a transaction-scoped advisory lock and take their rows with
//! `FOR UPDATE SKIP LOCKED`, so two cores never dispatch one job attempt twice and never
//! exceed the instance limits together.

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, QueryBuilder};

use super::*;
use crate::engine::{JobEnd, Timestamp, Transition};

/// The advisory lock key of job claims ("stagely" in ASCII, as a number).
const CLAIM_LOCK: i64 = 0x73_74_61_67_65_6c_79;

#[derive(Debug, Clone)]
pub struct PostgresStore {
    pub(crate) pool: PgPool,
}

impl PostgresStore {
    /// Connects to `url` and migrates the database. The URL (which may hold a password) is
    /// never put into an error or a log line.
    pub async fn open(url: &str) -> Result<PostgresStore, DbError> {
        let options: PgConnectOptions = url
            .parse()
            .map_err(|_| DbError::Config("the PostgreSQL URL could not be parsed (expected postgres://user@host:port/database)".into()))?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .test_before_acquire(false)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        Ok(PostgresStore { pool })
    }

    /// Writers need no turn: the server handles concurrent writers with row locks.
    pub(crate) async fn write_turn(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        None
    }

    /// Opens a claim's transaction, in two round trips: `BEGIN` with the advisory lock that
    /// serializes the claims of every replica (so the live counts read next cannot be raced
    /// past the limits), then one statement that locks the candidate rows (rows another
    /// transaction holds are skipped, and lost) and reads the live counts (`live_counts`,
    /// kept by a trigger on every status change), its snapshot taken with the lock held.
    pub(crate) async fn begin_claim(
        &self,
        claims: &[crate::db::AttemptClaim],
    ) -> Result<crate::db::ClaimStart<Postgres>, DbError> {
        let mut tx = self
            .pool
            .begin_with(sqlx::AssertSqlSafe(format!(
                "BEGIN; SELECT pg_advisory_xact_lock({CLAIM_LOCK})"
            )))
            .await?;
        let ids: Vec<String> = claims.iter().map(|c| c.claim.job_id.clone()).collect();
        let mut environments: Vec<String> = claims
            .iter()
            .map(|c| c.claim.environment_id.clone())
            .collect();
        environments.sort_unstable();
        environments.dedup();
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "WITH candidates AS (
                 SELECT id FROM build_jobs WHERE id = ANY($1) AND status = 'queued'
                 FOR UPDATE SKIP LOCKED)
             SELECT 'candidate', id, 0::BIGINT FROM candidates
             UNION ALL
             SELECT 'live', '', COALESCE(SUM(live), 0)::BIGINT FROM live_counts
             UNION ALL
             SELECT 'environment', environment_id, live FROM live_counts
             WHERE environment_id = ANY($2)",
        )
        .bind(&ids)
        .bind(&environments)
        .fetch_all(&mut *tx)
        .await?;
        let mut start = crate::db::ClaimStart {
            tx,
            lockable: Some(Vec::new()),
            live: 0,
            per_env: Default::default(),
        };
        for (kind, key, count) in rows {
            match kind.as_str() {
                "candidate" => start.lockable.get_or_insert_with(Vec::new).push(key),
                "live" => start.live = count,
                _ => {
                    start.per_env.insert(key, count);
                }
            }
        }
        Ok(start)
    }

    /// Takes one claimed attempt in one statement (the job's guarded update and the attempt
    /// row). Whether the job was still queued at the expected attempt.
    pub(crate) async fn take_attempt(
        tx: &mut sqlx::Transaction<'static, Postgres>,
        take: crate::db::TakeAttempt<'_>,
    ) -> Result<bool, DbError> {
        let rows = sqlx::query(
            "WITH taken AS (
                 UPDATE build_jobs SET status = 'provisioning', attempt = $2, lease_owner = $3,
                     lease_until = $4, not_before = NULL, vm_id = NULL
                 WHERE id = $1 AND status = 'queued' AND attempt = $5
                 RETURNING id)
             INSERT INTO job_attempts (build_job_id, number, owner, started_at, token_hash)
             SELECT id, $2, $3, $6, $7 FROM taken",
        )
        .bind(&take.claim.job_id)
        .bind(take.claim.attempt as i32)
        .bind(take.owner)
        .bind(take.lease_until.millis())
        .bind(take.claim.expected_attempt as i32)
        .bind(take.now.millis())
        .bind(take.token_hash)
        .execute(&mut **tx)
        .await?
        .rows_affected();
        Ok(rows == 1)
    }

    /// A read-only transaction whose statements share one snapshot.
    pub(crate) async fn begin_read(&self) -> Result<sqlx::Transaction<'static, Postgres>, DbError> {
        Ok(self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?)
    }

    /// (line count, total bytes) stored for a job.
    pub(crate) async fn log_byte_stats(&self, job_id: &str) -> Result<(i64, i64), DbError> {
        let (count, bytes): (i64, Option<i64>) = sqlx::query_as(
            "SELECT COUNT(*), SUM(octet_length(line))::BIGINT FROM build_logs WHERE build_job_id = $1",
        )
        .bind(job_id)
        .fetch_one(&self.pool)
        .await?;
        Ok((count, bytes.unwrap_or(0)))
    }
}

impl_shared_store!(PostgresStore, Postgres);
