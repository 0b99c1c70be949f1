//! The statements of [`crate::InstanceStore`] both backends share (`$n` parameters, guarded
//! `UPDATE`s, `ON CONFLICT`, BIGINT unix-ms times), expanded once per backend by
//! `impl_shared_store!` (see `shared/mod.rs`).

/// `impl InstanceStore` for backend `$store` (a struct with a `pool` of sqlx database `$db`).
macro_rules! shared_instances {
    ($store:ident, $db:ty) => {
        #[async_trait::async_trait]
        impl $crate::InstanceStore for $store {
            /// Records an instance the moment the provider returned it (before anything else can
            /// fail), so no path forgets it; its attempt learns where it runs and is billed from now.
            async fn record_instance(&self, record: &InstanceRecord<'_>, now: stagely_engine::Timestamp) -> Result<(), DbError> {
                let _turn = self.write_turn().await;
                let now = now.0;
                let mut tx = self.pool.begin().await?;
                sqlx::query(
                    "INSERT INTO builder_instances (id, provider, build_job_id, created_at, attempt, owner, instance_type, market, expires_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                     ON CONFLICT (id) DO NOTHING",
                )
                .bind(record.instance_id)
                .bind(record.provider)
                .bind(record.job_id)
                .bind(now)
                .bind(record.attempt as i32)
                .bind(record.owner)
                .bind(record.instance_type)
                .bind(record.market)
                .bind(record.expires_at.millis())
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "UPDATE job_attempts SET instance_type = $3, market = $4, placement = $5,
                         billed_from = COALESCE(billed_from, $6), instance_id = COALESCE(instance_id, $7)
                     WHERE build_job_id = $1 AND number = $2",
                )
                .bind(record.job_id)
                .bind(record.attempt as i32)
                .bind(record.instance_type)
                .bind(record.market)
                .bind(record.placement)
                .bind(now)
                .bind(record.instance_id)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(())
            }

            async fn mark_instance_terminated(&self, instance_id: &str, now: stagely_engine::Timestamp) -> Result<(), DbError> {
                let _turn = self.write_turn().await;
                let now = now.0;
                let mut tx = self.pool.begin().await?;
                sqlx::query(
                    "UPDATE builder_instances SET terminated_at = $2 WHERE id = $1 AND terminated_at IS NULL",
                )
                .bind(instance_id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                // Billing of the attempt on it (the last, after any handover) ends here.
                sqlx::query(CLOSE_BILLING)
                .bind(instance_id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(())
            }

            async fn reap_facts(&self) -> Result<(Vec<ReapInstance>, Vec<ReapAttempt>), DbError> {
                type Row = (
                    String,
                    Option<String>,
                    Option<i32>,
                    Option<i64>,
                    Option<i32>,
                    Option<i64>,
                    Option<i32>,
                    Option<String>,
                    Option<i64>,
                );
                let rows: Vec<Row> = sqlx::query_as(
                    "SELECT i.id, i.build_job_id, i.attempt, i.expires_at,
                            a.number, a.ended_at, j.attempt, j.status, j.lease_until
                     FROM builder_instances i
                     LEFT JOIN job_attempts a ON a.build_job_id = i.build_job_id AND a.number = i.attempt
                     LEFT JOIN build_jobs j ON j.id = i.build_job_id
                     WHERE i.terminated_at IS NULL
                     ORDER BY i.created_at",
                )
                .fetch_all(&self.pool)
                .await?;
                let mut instances = Vec::with_capacity(rows.len());
                let mut attempts = Vec::new();
                for (id, job_id, attempt, expires_at, number, ended_at, job_attempt, status, lease_until) in rows {
                    let as_u32 = |n: i32| u32::try_from(n).unwrap_or(0);
                    if let (Some(job), Some(number), Some(job_attempt), Some(status)) =
                        (&job_id, number, job_attempt, &status)
                    {
                        attempts.push(ReapAttempt {
                            job_id: job.clone(),
                            number: as_u32(number),
                            ended: ended_at.is_some(),
                            job_attempt: as_u32(job_attempt),
                            job_status: stagely_engine::JobStatus::parse(status)
                                .ok_or_else(|| corrupt("job status", status))?,
                            lease_until: lease_until.map(Timestamp),
                        });
                    }
                    instances.push(ReapInstance {
                        id,
                        job_id,
                        attempt: attempt.map(as_u32),
                        expires_at: expires_at.map(Timestamp),
                    });
                }
                Ok((instances, attempts))
            }

            /// Instances recorded for an attempt and not terminated.
            async fn instances_of_attempt(
                &self,
                job_id: &str,
                attempt: u32,
            ) -> Result<Vec<String>, DbError> {
                Ok(sqlx::query_scalar(
                    "SELECT id FROM builder_instances WHERE build_job_id = $1 AND attempt = $2 AND terminated_at IS NULL",
                )
                .bind(job_id)
                .bind(attempt as i32)
                .fetch_all(&self.pool)
                .await?)
            }

            async fn attempt_holds(
                &self,
                job_id: &str,
                attempt: u32,
                now: Timestamp,
            ) -> Result<bool, DbError> {
                let found: Option<i64> = sqlx::query_scalar(
                    "SELECT lease_until FROM build_jobs WHERE id = $1 AND attempt = $2
                     AND status IN ('provisioning', 'running') AND lease_until > $3",
                )
                .bind(job_id)
                .bind(attempt as i32)
                .bind(now.millis())
                .fetch_optional(&self.pool)
                .await?;
                Ok(found.is_some())
            }

            /// Instances recorded and not terminated (diagnostics and tests).
            async fn live_instances(&self) -> Result<Vec<String>, DbError> {
                Ok(sqlx::query_scalar(
                    "SELECT id FROM builder_instances WHERE terminated_at IS NULL ORDER BY created_at",
                )
                .fetch_all(&self.pool)
                .await?)
            }

            async fn deployment_id(&self) -> Result<String, DbError> {
                let id: Option<String> = sqlx::query_scalar("SELECT id FROM deployment")
                    .fetch_optional(&self.pool)
                    .await?;
                id.ok_or_else(|| DbError::Corrupt("the deployment table has no row".into()))
            }

            async fn spot_interrupted_before(&self, job_id: &str) -> Result<bool, DbError> {
                let prefix = format!("{}:%", stagely_engine::InfraKind::SpotInterrupted.as_str());
                let found: Option<i32> = sqlx::query_scalar(
                    "SELECT number FROM job_attempts
                     WHERE build_job_id = $1 AND result = 'infrastructure' AND message LIKE $2 LIMIT 1",
                )
                .bind(job_id)
                .bind(prefix)
                .fetch_optional(&self.pool)
                .await?;
                Ok(found.is_some())
            }
        }
    };
}
