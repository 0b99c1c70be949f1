//! The statements of [`crate::EngineStore`] both backends share (`$n` parameters, guarded
//! `UPDATE`s, `ON CONFLICT`, BIGINT unix-ms times), expanded once per backend by
//! `impl_shared_store!` (see `shared/mod.rs`).

/// `impl EngineStore` for backend `$store` (a struct with a `pool` of sqlx database `$db`).
macro_rules! shared_engine {
    ($store:ident, $db:ty) => {
        impl $store {
            /// Writes [`Transition::InstanceStarted`] (see [`EngineStore::apply`](crate::EngineStore::apply)); returns the rows its guard let through.
            async fn apply_instance_started(&self, transition: &Transition, now: i64) -> Result<u64, DbError> {
                let Transition::InstanceStarted { job_id, attempt, instance_id, merge_path, } = transition else {
                    return Ok(0);
                };
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
                Ok(rows)
            }

            /// Writes [`Transition::JobRunning`] (see [`EngineStore::apply`](crate::EngineStore::apply)); returns the rows its guard let through.
            async fn apply_job_running(&self, transition: &Transition, now: i64) -> Result<u64, DbError> {
                let Transition::JobRunning { job_id, attempt } = transition else {
                    return Ok(0);
                };
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
                Ok(rows)
            }

            /// Writes [`Transition::AttemptEnded`] (see [`EngineStore::apply`](crate::EngineStore::apply)); returns the rows its guard let through.
            async fn apply_attempt_ended(&self, transition: &Transition, now: i64) -> Result<u64, DbError> {
                let Transition::AttemptEnded { job_id, attempt, owner, takeover, predecessor, result, message, end, } = transition else {
                    return Ok(0);
                };
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
                        return Ok(0);
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
                Ok(rows)
            }

            /// Writes [`Transition::AttemptAdopted`] (see [`EngineStore::apply`](crate::EngineStore::apply)); returns the rows its guard let through.
            async fn apply_attempt_adopted(&self, transition: &Transition, now: i64) -> Result<u64, DbError> {
                let Transition::AttemptAdopted { job_id, attempt, from, owner, lease_until, predecessor, } = transition else {
                    return Ok(0);
                };
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
                Ok(rows)
            }
        }

        #[async_trait::async_trait]
        impl $crate::EngineStore for $store {
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
                        $crate::snapshot(run, jobs)
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
                $crate::snapshot(run, jobs).map(Some)
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
                    Transition::InstanceStarted { .. } => self.apply_instance_started(transition, now).await?,
                    Transition::JobRunning { .. } => self.apply_job_running(transition, now).await?,
                    Transition::AttemptEnded { .. } => self.apply_attempt_ended(transition, now).await?,
                    Transition::AttemptAdopted { .. } => self.apply_attempt_adopted(transition, now).await?,
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

            /// Claims jobs for `owner` in the given order, atomically: each claim holds only if the
            /// job is still queued at the expected attempt and (unless it reuses a live instance)
            /// the live jobs across every core stay within the limits. Returns (won, lost).
            async fn claim(
                &self,
                owner: &str,
                claims: &[$crate::AttemptClaim],
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
        }
    };
}
