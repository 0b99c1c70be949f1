//! The statements of [`crate::RunStore`] both backends share (`$n` parameters, guarded
//! `UPDATE`s, `ON CONFLICT`, BIGINT unix-ms times), expanded once per backend by
//! `impl_shared_store!` (see `shared/mod.rs`).

/// `impl RunStore` for backend `$store` (a struct with a `pool` of sqlx database `$db`).
macro_rules! shared_runs {
    ($store:ident, $db:ty) => {
        #[async_trait::async_trait]
        impl $crate::RunStore for $store {
            /// Creates a run and its jobs atomically.
            #[allow(clippy::too_many_arguments)]
            async fn create_run(&self, run: &NewRun, jobs: &[NewJob], now: stagely_engine::Timestamp) -> Result<stagely_engine::RunSnapshot, DbError> {
                let _turn = self.write_turn().await;
                let run_id = &run.id;
                let now = now.0;
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
                    let spec = serde_json::to_string(&job.spec)
                        .map_err(|error| DbError::Corrupt(format!("job spec of {}: {error}", job.name)))?;
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
                    .bind(spec)
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
                $crate::snapshot(run_row, job_rows)
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
