//! Persistence: the seed's `workflow_runs`, `build_jobs` and `build_logs` tables.
//!
//! Architecture invariant: this is the only module that knows SQL. Rows are their own types
//! ([`RunRow`], [`JobRow`], [`LogRow`]); the API and the protocol convert explicitly. The SQL is
//! kept portable (`$n` parameters, `RETURNING`, `ON CONFLICT`, BIGINT unix-ms times) so the
//! PostgreSQL backend can share it.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Sqlite, SqlitePool};

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database: {0}")]
    Sqlx(#[from] sqlx::Error),
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
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
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct LogRow {
    pub seq: i64,
    pub timestamp: i64,
    pub stream: String,
    pub line: String,
}

/// A line to store.
#[derive(Debug, Clone)]
pub struct NewLogLine {
    pub seq: i64,
    pub stream: &'static str,
    pub line: String,
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
        }
    }
}

/// Handle to the database. Cheap to clone (a pool).
#[derive(Debug, Clone)]
pub struct Db {
    pool: SqlitePool,
}

impl Db {
    /// Opens (creating if needed) the SQLite database at `path` and migrates it.
    pub async fn open_sqlite(path: &Path) -> Result<Db, DbError> {
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
        Ok(Db { pool })
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Creates a run and its jobs atomically.
    #[allow(clippy::too_many_arguments)]
    pub async fn create_run(&self, run: &NewRun, jobs: &[NewJob]) -> Result<(), DbError> {
        let run_id = &run.id;
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO workflow_runs (id, environment_id, trigger, status, repo_url, commit_hash, branch, config_path, created_at, updated_at)
             VALUES ($1, $2, $3, 'pending', $4, $5, $6, $7, $8, $8)",
        )
        .bind(run_id)
        .bind(&run.environment_id)
        .bind(&run.trigger)
        .bind(&run.repo_url)
        .bind(&run.commit_hash)
        .bind(&run.branch)
        .bind(&run.config_path)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        for job in jobs {
            sqlx::query(
                "INSERT INTO build_jobs (id, workflow_run_id, name, status, architecture, platform, machine, spec, created_at)
                 VALUES ($1, $2, $3, 'queued', $4, $5, $6, $7, $8)",
            )
            .bind(&job.id)
            .bind(run_id)
            .bind(&job.name)
            .bind(&job.architecture)
            .bind(&job.platform)
            .bind(&job.machine)
            .bind(&job.spec)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn run(&self, run_id: &str) -> Result<Option<RunRow>, DbError> {
        Ok(
            sqlx::query_as::<_, RunRow>("SELECT * FROM workflow_runs WHERE id = $1")
                .bind(run_id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    pub async fn jobs_of_run(&self, run_id: &str) -> Result<Vec<JobRow>, DbError> {
        Ok(sqlx::query_as::<_, JobRow>(
            "SELECT * FROM build_jobs WHERE workflow_run_id = $1 ORDER BY name",
        )
        .bind(run_id)
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn job(&self, job_id: &str) -> Result<Option<JobRow>, DbError> {
        Ok(
            sqlx::query_as::<_, JobRow>("SELECT * FROM build_jobs WHERE id = $1")
                .bind(job_id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    pub async fn set_run_status(
        &self,
        run_id: &str,
        status: &str,
        error_message: Option<&str>,
    ) -> Result<(), DbError> {
        sqlx::query(
            "UPDATE workflow_runs SET status = $2, error_message = COALESCE($3, error_message), updated_at = $4 WHERE id = $1",
        )
        .bind(run_id)
        .bind(status)
        .bind(error_message)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// `queued → provisioning`, recording the instance.
    pub async fn mark_provisioning(&self, job_id: &str, vm_id: &str) -> Result<bool, DbError> {
        let result = sqlx::query(
            "UPDATE build_jobs SET status = 'provisioning', vm_id = $2 WHERE id = $1 AND status = 'queued'",
        )
        .bind(job_id)
        .bind(vm_id)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    /// `provisioning → running`.
    pub async fn mark_running(&self, job_id: &str) -> Result<bool, DbError> {
        let result = sqlx::query(
            "UPDATE build_jobs SET status = 'running', started_at = $2 WHERE id = $1 AND status = 'provisioning'",
        )
        .bind(job_id)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    /// `running → completed`.
    pub async fn mark_completed(
        &self,
        job_id: &str,
        artifact_url: &str,
        digest: &str,
        exit_code: i32,
    ) -> Result<bool, DbError> {
        let result = sqlx::query(
            "UPDATE build_jobs SET status = 'completed', artifact_url = $2, digest = $3, exit_code = $4, completed_at = $5
             WHERE id = $1 AND status = 'running'",
        )
        .bind(job_id)
        .bind(artifact_url)
        .bind(digest)
        .bind(exit_code)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Any non-final state → `failed`. A finished job is left alone.
    pub async fn mark_failed(
        &self,
        job_id: &str,
        exit_code: Option<i32>,
        error_message: &str,
    ) -> Result<bool, DbError> {
        let result = sqlx::query(
            "UPDATE build_jobs SET status = 'failed', exit_code = $2, error_message = $3, completed_at = $4
             WHERE id = $1 AND status IN ('queued', 'provisioning', 'running')",
        )
        .bind(job_id)
        .bind(exit_code)
        .bind(error_message)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Stores a batch of lines in one transaction; duplicates (same seq) are ignored.
    pub async fn append_logs(&self, job_id: &str, lines: &[NewLogLine]) -> Result<(), DbError> {
        if lines.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        // SQLite allows 32766 bound parameters; 5 per row keeps a chunk well below that.
        for chunk in lines.chunks(1000) {
            let mut builder: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO build_logs (build_job_id, seq, timestamp, stream, line) ",
            );
            builder.push_values(chunk, |mut row, line| {
                row.push_bind(job_id)
                    .push_bind(line.seq)
                    .push_bind(now)
                    .push_bind(line.stream)
                    .push_bind(line.line.as_str());
            });
            builder.push(" ON CONFLICT (build_job_id, seq) DO NOTHING");
            builder.build().execute(&self.pool).await?;
        }
        Ok(())
    }

    /// Highest stored seq for a job (0 when none).
    pub async fn last_log_seq(&self, job_id: &str) -> Result<i64, DbError> {
        let max: Option<i64> =
            sqlx::query_scalar("SELECT MAX(seq) FROM build_logs WHERE build_job_id = $1")
                .bind(job_id)
                .fetch_one(&self.pool)
                .await?;
        Ok(max.unwrap_or(0))
    }

    /// One page of lines with `seq > after`, at most `limit`.
    pub async fn logs_page(
        &self,
        job_id: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<LogRow>, DbError> {
        Ok(sqlx::query_as::<_, LogRow>(
            "SELECT seq, timestamp, stream, line FROM build_logs WHERE build_job_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(job_id)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn record_instance(
        &self,
        instance_id: &str,
        provider: &str,
        job_id: &str,
    ) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO builder_instances (id, provider, build_job_id, created_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(instance_id)
        .bind(provider)
        .bind(job_id)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn mark_instance_terminated(&self, instance_id: &str) -> Result<(), DbError> {
        sqlx::query("UPDATE builder_instances SET terminated_at = $2 WHERE id = $1")
            .bind(instance_id)
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Instances recorded as started and never terminated.
    pub async fn live_instances(&self) -> Result<Vec<String>, DbError> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM builder_instances WHERE terminated_at IS NULL ORDER BY created_at",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// After a restart: fails every job and run an earlier process left unfinished.
    /// Returns how many jobs were failed.
    pub async fn fail_unfinished(&self, reason: &str) -> Result<u64, DbError> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let jobs = sqlx::query(
            "UPDATE build_jobs SET status = 'failed', error_message = $1, completed_at = $2
             WHERE status IN ('queued', 'provisioning', 'running')",
        )
        .bind(reason)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query(
            "UPDATE workflow_runs SET status = 'failed', error_message = $1, updated_at = $2
             WHERE status IN ('pending', 'building', 'deploying', 'testing')",
        )
        .bind(reason)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(jobs)
    }

    /// (line count, total bytes) stored for a job.
    pub async fn log_stats(&self, job_id: &str) -> Result<(i64, i64), DbError> {
        let (count, bytes): (i64, Option<i64>) = sqlx::query_as(
            "SELECT COUNT(*), SUM(LENGTH(CAST(line AS BLOB))) FROM build_logs WHERE build_job_id = $1",
        )
        .bind(job_id)
        .fetch_one(&self.pool)
        .await?;
        Ok((count, bytes.unwrap_or(0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn db_with_job() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_sqlite(&dir.path().join("t.db")).await.unwrap();
        let run = NewRun {
            id: "r1".into(),
            environment_id: "env".into(),
            trigger: "manual".into(),
            repo_url: "/repo".into(),
            commit_hash: "c0ffee".into(),
            branch: "main".into(),
            config_path: String::new(),
        };
        db.create_run(
            &run,
            &[NewJob {
                id: "j1".into(),
                name: "api".into(),
                architecture: "amd64".into(),
                platform: "linux/amd64".into(),
                machine: "medium".into(),
                spec: "{}".into(),
            }],
        )
        .await
        .unwrap();
        (dir, db)
    }

    #[tokio::test]
    async fn job_status_only_moves_forward_one_step_at_a_time() {
        let (_dir, db) = db_with_job().await;
        // queued → running and queued → completed are refused.
        assert!(!db.mark_running("j1").await.unwrap());
        assert!(!db.mark_completed("j1", "img", "sha256:x", 0).await.unwrap());
        assert!(db.mark_provisioning("j1", "vm-1").await.unwrap());
        assert!(!db.mark_provisioning("j1", "vm-2").await.unwrap());
        assert!(db.mark_running("j1").await.unwrap());
        assert!(db.mark_completed("j1", "img", "sha256:x", 0).await.unwrap());
        // Final states are final.
        assert!(!db.mark_failed("j1", Some(1), "late").await.unwrap());
        let job = db.job("j1").await.unwrap().unwrap();
        assert_eq!(job.status, "completed");
        assert_eq!(job.vm_id.as_deref(), Some("vm-1"));
    }

    #[tokio::test]
    async fn duplicate_log_lines_are_stored_once_and_the_schema_refuses_bad_values() {
        let (_dir, db) = db_with_job().await;
        let line = |seq| NewLogLine {
            seq,
            stream: "stdout",
            line: format!("line {seq}\n"),
        };
        db.append_logs("j1", &[line(1), line(2)]).await.unwrap();
        db.append_logs("j1", &[line(2), line(3)]).await.unwrap();
        assert_eq!(db.last_log_seq("j1").await.unwrap(), 3);
        let page = db.logs_page("j1", 0, 10).await.unwrap();
        assert_eq!(page.iter().map(|l| l.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(db.log_stats("j1").await.unwrap(), (3, 21));
        assert!(db.set_run_status("r1", "exploded", None).await.is_err());
    }

    #[tokio::test]
    async fn unfinished_work_is_failed_after_a_restart() {
        let (_dir, db) = db_with_job().await;
        db.record_instance("vm-1", "local", "j1").await.unwrap();
        assert_eq!(db.live_instances().await.unwrap(), ["vm-1"]);
        assert_eq!(db.fail_unfinished("restarted").await.unwrap(), 1);
        assert_eq!(db.run("r1").await.unwrap().unwrap().status, "failed");
        db.mark_instance_terminated("vm-1").await.unwrap();
        assert!(db.live_instances().await.unwrap().is_empty());
    }
}
