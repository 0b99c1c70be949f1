//! The SQLite backend: the embedded default for `stagely run` and single-machine installs.
//! WAL mode, two files: the main one, and log chunks in one of their own attached as `logs`
//! ([`logs_path`]). Claims take the write lock up front (`BEGIN IMMEDIATE`) so counting and
//! claiming are one atomic step across processes sharing the file.

use std::path::Path;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, QueryBuilder, Sqlite, SqlitePool};

use super::*;
use stagely_engine::{JobEnd, Timestamp, Transition};

/// Page size of a new log database file ([`logs_path`]; an existing one keeps its own: WAL
/// mode cannot change it). Log chunks are up to 1 MiB each: with SQLite's default 4 KiB pages
/// one chunk is 256 overflow pages, each written, checksummed, checkpointed and written back
/// on its own; 64 KiB pages cut that work per stored byte (see BENCHMARKS.md, log volume).
/// The main file keeps 4 KiB pages: the engine's transactions write a few small rows, and
/// with 64 KiB pages each wrote 16 times the bytes (dispatch measured 2-3x slower).
const LOG_PAGE_SIZE: u32 = 64 * 1024;

/// The log database beside the main file: `stagely.db` → `stagely.logs.db`.
pub fn logs_path(path: &Path) -> std::path::PathBuf {
    path.with_extension("logs.db")
}

#[derive(Debug, Clone)]
pub struct SqliteStore {
    pub(crate) pool: SqlitePool,
    /// One writer at a time, queued here: SQLite allows one, and writers that meet in the
    /// file wait in its busy handler, which sleeps in steps of up to 100 ms.
    writer: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// The same for the log file: its own write lock, its own queue.
    log_writer: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path` and the log file beside it
    /// ([`logs_path`], attached to every connection as `logs`), and migrates them.
    pub async fn open(path: &Path) -> Result<SqliteStore, DbError> {
        let logs = logs_path(path);
        // A new log file gets its page size before anything is written to it.
        let log_options = SqliteConnectOptions::new()
            .filename(&logs)
            .create_if_missing(true)
            .page_size(LOG_PAGE_SIZE)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(std::time::Duration::from_secs(10));
        sqlx::SqliteConnection::connect_with(&log_options)
            .await?
            .close()
            .await?;
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(std::time::Duration::from_secs(10))
            .foreign_keys(true);
        let logs = logs.to_string_lossy().into_owned();
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .test_before_acquire(false)
            .after_connect(move |connection, _| {
                let logs = logs.clone();
                Box::pin(async move {
                    sqlx::query("ATTACH DATABASE $1 AS logs")
                        .bind(logs)
                        .execute(&mut *connection)
                        .await?;
                    // Per connection, as the main file's settings: commits are not synced one
                    // by one (checkpoints are), and a small page cache (1 MiB) does for chunks
                    // written once and read rarely.
                    for pragma in [
                        "PRAGMA logs.synchronous = NORMAL",
                        "PRAGMA logs.cache_size = -1024",
                    ] {
                        sqlx::query(pragma).execute(&mut *connection).await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        Ok(SqliteStore {
            pool,
            writer: std::sync::Arc::new(tokio::sync::Mutex::new(())),
            log_writer: std::sync::Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// Held by every write of this process to the main file ([`SqliteStore::writer`]).
    pub(crate) async fn write_turn(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        Some(self.writer.lock().await)
    }

    /// Held by every write of this process to the log file ([`SqliteStore::log_writer`]); a
    /// write to both files takes [`SqliteStore::write_turn`] first.
    pub(crate) async fn log_write_turn(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        Some(self.log_writer.lock().await)
    }

    /// [`Store::claim`]: one IMMEDIATE transaction (the write lock is taken before the counts
    /// are read, so no other writer, another process on this file, can claim between the
    /// count and the update); the live counts (all, and of the claimed environments) are one
    /// statement; then each claim in order, within the limits: the job's guarded update and
    /// its attempt row.
    pub(crate) async fn claim_in_store(
        &self,
        owner: &str,
        claims: &[crate::AttemptClaim],
        lease_until: Timestamp,
        max_live_instances: usize,
        max_live_per_environment: usize,
        now: Timestamp,
    ) -> Result<(Vec<String>, Vec<String>), DbError> {
        let _turn = self.write_turn().await;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let mut environments: Vec<&str> = claims
            .iter()
            .map(|c| c.claim.environment_id.as_str())
            .collect();
        environments.sort_unstable();
        environments.dedup();
        let mut builder: QueryBuilder<Sqlite> = QueryBuilder::new(
            "SELECT NULL, COUNT(*) FROM build_jobs WHERE status IN ('provisioning', 'running')",
        );
        if !environments.is_empty() {
            builder.push(
                " UNION ALL SELECT r.environment_id, COUNT(*) FROM build_jobs j
                 JOIN workflow_runs r ON r.id = j.workflow_run_id
                 WHERE j.status IN ('provisioning', 'running') AND r.environment_id IN (",
            );
            let mut separated = builder.separated(", ");
            for environment in &environments {
                separated.push_bind(*environment);
            }
            builder.push(") GROUP BY r.environment_id");
        }
        let rows: Vec<(Option<String>, i64)> = builder.build_query_as().fetch_all(&mut *tx).await?;
        let mut live = 0;
        let mut per_env: std::collections::HashMap<String, i64> = Default::default();
        for (environment, count) in rows {
            match environment {
                Some(environment) => {
                    per_env.insert(environment, count);
                }
                None => live = count,
            }
        }
        let mut won = Vec::new();
        let mut lost = Vec::new();
        for crate::AttemptClaim { claim, token_hash } in claims {
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
                "INSERT INTO job_attempts (build_job_id, number, owner, started_at, token_hash) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(&claim.job_id)
            .bind(claim.attempt as i32)
            .bind(owner)
            .bind(now.millis())
            .bind(token_hash)
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

    /// A read transaction: in WAL mode its statements share the snapshot its first read
    /// took.
    pub(crate) async fn begin_read(&self) -> Result<sqlx::Transaction<'static, Sqlite>, DbError> {
        Ok(self.pool.begin().await?)
    }

    /// (line count, total bytes) stored for a job.
    pub(crate) async fn log_byte_stats(&self, job_id: &str) -> Result<(i64, i64), DbError> {
        let (count, bytes): (i64, Option<i64>) = sqlx::query_as(
            "SELECT COUNT(*), SUM(LENGTH(CAST(line AS BLOB))) FROM build_logs WHERE build_job_id = $1",
        )
        .bind(job_id)
        .fetch_one(&self.pool)
        .await?;
        let (chunk_lines, chunk_bytes): (Option<i64>, Option<i64>) = sqlx::query_as(
            "SELECT SUM(line_count), SUM(bytes) FROM log_chunks WHERE build_job_id = $1",
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

impl_shared_store!(SqliteStore, Sqlite);
