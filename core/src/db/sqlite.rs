//! The SQLite backend: the embedded default for `stagely run` and single-machine installs.
//! WAL mode, one file; claims take the write lock up front (`BEGIN IMMEDIATE`) so counting and
//! claiming are one atomic step across processes sharing the file.

use std::path::Path;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Sqlite, SqlitePool};

use super::*;
use crate::engine::{Claim, JobEnd, Timestamp, Transition};

#[derive(Debug, Clone)]
pub struct SqliteStore {
    pub(crate) pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path` and migrates it.
    pub async fn open(path: &Path) -> Result<SqliteStore, DbError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(std::time::Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        Ok(SqliteStore { pool })
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
        // IMMEDIATE: the write lock is taken before the counts are read, so no other writer
        // (another process on this file) can claim between the count and the update.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
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
            "SELECT COUNT(*), SUM(LENGTH(CAST(line AS BLOB))) FROM build_logs WHERE build_job_id = $1",
        )
        .bind(job_id)
        .fetch_one(&self.pool)
        .await?;
        Ok((count, bytes.unwrap_or(0)))
    }
}

impl_shared_store!(SqliteStore, Sqlite);
