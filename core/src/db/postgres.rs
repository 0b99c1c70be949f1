//! The PostgreSQL backend: production state, shared by every replica. Claims are
//! serialized by a transaction-scoped advisory lock and take their rows with
//! `FOR UPDATE SKIP LOCKED`, so two cores never dispatch one job attempt twice and never
//! exceed the instance limits together.

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, QueryBuilder};

use super::*;
use crate::engine::{Claim, JobEnd, Timestamp, Transition};

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
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        Ok(PostgresStore { pool })
    }

    /// Claims jobs for `owner` in the given order, atomically: each claim holds only if the
    /// job is still queued at the expected attempt and (unless it reuses a live instance)
    /// the live jobs across every core stay within the limits. Returns (won, lost).
    pub(crate) async fn claim_jobs(
        &self,
        owner: &str,
        claims: &[Claim],
        lease_until: Timestamp,
        max_live_instances: usize,
        max_live_per_environment: usize,
        now: Timestamp,
    ) -> Result<(Vec<String>, Vec<String>), DbError> {
        let mut tx = self.pool.begin().await?;
        // Claims of every replica are serialized (a transaction-scoped advisory lock), so the
        // live counts read below cannot be raced past the limits.
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(CLAIM_LOCK)
            .execute(&mut *tx)
            .await?;
        // Lock the candidate rows; rows another transaction holds are skipped (and lost).
        let ids: Vec<String> = claims.iter().map(|claim| claim.job_id.clone()).collect();
        let lockable: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM build_jobs WHERE id = ANY($1) AND status = 'queued' FOR UPDATE SKIP LOCKED",
        )
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        let (mut live,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM build_jobs WHERE status IN ('provisioning', 'running')",
        )
        .fetch_one(&mut *tx)
        .await?;
        let per_env: Vec<(String, i64)> = sqlx::query_as(
            "SELECT r.environment_id, COUNT(*) FROM build_jobs j JOIN workflow_runs r ON r.id = j.workflow_run_id
             WHERE j.status IN ('provisioning', 'running') GROUP BY r.environment_id",
        )
        .fetch_all(&mut *tx)
        .await?;
        let mut per_env: std::collections::HashMap<String, i64> = per_env.into_iter().collect();
        let mut won = Vec::new();
        let mut lost = Vec::new();
        for claim in claims {
            if !lockable.contains(&claim.job_id) {
                lost.push(claim.job_id.clone());
                continue;
            }
            let in_env = per_env.get(&claim.environment_id).copied().unwrap_or(0);
            if !claim.reuses_instance
                && (live >= max_live_instances as i64 || in_env >= max_live_per_environment as i64)
            {
                lost.push(claim.job_id.clone());
                continue;
            }
            let rows = sqlx::query(
                "UPDATE build_jobs SET status = 'provisioning', attempt = $2, lease_owner = $3, lease_until = $4,
                 not_before = NULL, vm_id = NULL
                 WHERE id = $1 AND status = 'queued' AND attempt = $5",
            )
            .bind(&claim.job_id)
            .bind(claim.attempt as i32)
            .bind(owner)
            .bind(lease_until.millis())
            .bind(claim.expected_attempt as i32)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if rows != 1 {
                lost.push(claim.job_id.clone());
                continue;
            }
            sqlx::query(
                "INSERT INTO job_attempts (build_job_id, number, owner, started_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(&claim.job_id)
            .bind(claim.attempt as i32)
            .bind(owner)
            .bind(now.millis())
            .execute(&mut *tx)
            .await?;
            if !claim.reuses_instance {
                live += 1;
                *per_env.entry(claim.environment_id.clone()).or_default() += 1;
            }
            won.push(claim.job_id.clone());
        }
        tx.commit().await?;
        Ok((won, lost))
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
