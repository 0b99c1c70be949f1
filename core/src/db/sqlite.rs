//! The SQLite backend: the embedded default for `stagely run` and single-machine installs.
//! WAL mode, one file; claims take the write lock up front (`BEGIN IMMEDIATE`) so counting and
//! claiming are one atomic step across processes sharing the file.

use std::path::Path;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Sqlite, SqlitePool};

use super::*;
use crate::engine::{JobEnd, Timestamp, Transition};

#[derive(Debug, Clone)]
pub struct SqliteStore {
    pub(crate) pool: SqlitePool,
    /// One writer at a time, queued here: SQLite allows one, and writers that meet in the
    /// file wait in its busy handler, which sleeps in steps of up to 100 ms.
    writer: std::sync::Arc<tokio::sync::Mutex<()>>,
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
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        Ok(SqliteStore {
            pool,
            writer: std::sync::Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// Held by every write of this process ([`SqliteStore::writer`]).
    pub(crate) async fn write_turn(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        Some(self.writer.lock().await)
    }

    /// Opens a claim's transaction. IMMEDIATE: the write lock is taken before the counts are
    /// read, so no other writer (another process on this file) can claim between the count
    /// and the update. Every candidate may be tried (`None`).
    pub(crate) async fn begin_claim(
        &self,
        _claims: &[crate::db::AttemptClaim],
    ) -> Result<(sqlx::Transaction<'static, Sqlite>, Option<Vec<String>>), DbError> {
        Ok((self.pool.begin_with("BEGIN IMMEDIATE").await?, None))
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
