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

    /// Opens a claim's transaction: claims of every replica are serialized by a
    /// transaction-scoped advisory lock (so the live counts read next cannot be raced past
    /// the limits), and the candidate rows are locked; rows another transaction holds are
    /// skipped (and lost). Returns the candidates that may be tried.
    pub(crate) async fn begin_claim(
        &self,
        claims: &[crate::db::AttemptClaim],
    ) -> Result<(sqlx::Transaction<'static, Postgres>, Option<Vec<String>>), DbError> {
        let mut tx = self.pool.begin().await?;
        let ids: Vec<String> = claims.iter().map(|c| c.claim.job_id.clone()).collect();
        // One round trip: the lock (a materialized CTE, taken first) and the candidates.
        let lockable: Vec<String> = sqlx::query_scalar(
            "WITH claim_lock AS MATERIALIZED (SELECT pg_advisory_xact_lock($2))
             SELECT j.id FROM claim_lock, build_jobs j
             WHERE j.id = ANY($1) AND j.status = 'queued'
             FOR UPDATE OF j SKIP LOCKED",
        )
        .bind(&ids)
        .bind(CLAIM_LOCK)
        .fetch_all(&mut *tx)
        .await?;
        Ok((tx, Some(lockable)))
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
