//! The PostgreSQL backend: production state, shared by every replica. Claims are
//! serialized by a transaction-scoped advisory lock and take their rows with
//! `FOR UPDATE SKIP LOCKED`, so two cores never dispatch one job attempt twice and never
//! exceed the instance limits together.

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, QueryBuilder};

use super::*;
use stagely_engine::{JobEnd, Timestamp, Transition};

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

    /// [`Self::write_turn`] for log writes: none either.
    pub(crate) async fn log_write_turn(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        None
    }

    /// [`Store::claim`] in one round trip: `stagely_claim` (migration 0003) takes the
    /// advisory lock that serializes the claims of every replica, then claim by claim locks
    /// the job row with `FOR UPDATE SKIP LOCKED` (a row another transaction holds is lost),
    /// checks the limits against `live_counts` (kept by a trigger on every status change,
    /// read with the lock held), and writes the guarded update and the attempt row; the
    /// call is its own transaction.
    pub(crate) async fn claim_in_store(
        &self,
        owner: &str,
        claims: &[crate::AttemptClaim],
        lease_until: Timestamp,
        max_live_instances: usize,
        max_live_per_environment: usize,
        now: Timestamp,
    ) -> Result<(Vec<String>, Vec<String>), DbError> {
        let column = |f: &dyn Fn(&crate::AttemptClaim) -> String| -> Vec<String> {
            claims.iter().map(f).collect()
        };
        let attempts: Vec<i32> = claims.iter().map(|c| c.claim.attempt as i32).collect();
        let expected: Vec<i32> = claims
            .iter()
            .map(|c| c.claim.expected_attempt as i32)
            .collect();
        let reuses: Vec<bool> = claims.iter().map(|c| c.claim.reuses_instance).collect();
        let won: Vec<String> = sqlx::query_scalar(
            "SELECT * FROM stagely_claim($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(CLAIM_LOCK)
        .bind(owner)
        .bind(column(&|c| c.claim.job_id.clone()))
        .bind(attempts)
        .bind(expected)
        .bind(column(&|c| c.claim.environment_id.clone()))
        .bind(reuses)
        .bind(column(&|c| c.token_hash.clone()))
        .bind(lease_until.millis())
        .bind(now.millis())
        .bind(i64::try_from(max_live_instances).unwrap_or(i64::MAX))
        .bind(i64::try_from(max_live_per_environment).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        let taken: std::collections::HashSet<&str> = won.iter().map(String::as_str).collect();
        let lost = claims
            .iter()
            .filter(|c| !taken.contains(c.claim.job_id.as_str()))
            .map(|c| c.claim.job_id.clone())
            .collect();
        Ok((won, lost))
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
        let (chunk_lines, chunk_bytes): (Option<i64>, Option<i64>) = sqlx::query_as(
            "SELECT SUM(line_count)::BIGINT, SUM(bytes)::BIGINT FROM log_chunks WHERE build_job_id = $1",
        )
        .bind(job_id)
        .fetch_one(&self.pool)
        .await?;
        Ok((
            count + chunk_lines.unwrap_or(0),
            bytes.unwrap_or(0) + chunk_bytes.unwrap_or(0),
        ))
    }
}

impl_shared_store!(PostgresStore, Postgres);
