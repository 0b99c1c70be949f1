//! The statements of [`crate::LogStore`] both backends share (`$n` parameters, guarded
//! `UPDATE`s, `ON CONFLICT`, BIGINT unix-ms times), expanded once per backend by
//! `impl_shared_store!` (see `shared/mod.rs`).

/// `impl LogStore` for backend `$store` (a struct with a `pool` of sqlx database `$db`).
macro_rules! shared_logs {
    ($store:ident, $db:ty) => {
        #[async_trait::async_trait]
        impl $crate::LogStore for $store {
            /// Stores a batch of lines as chunks in one transaction; lines at or below the highest
            /// seq already stored are dropped (a batch stored twice stores nothing twice). The
            /// chunks are encoded and packed before the log-write turn is taken, so other jobs'
            /// writes do not wait for that; only a batch overlapping what is stored (a resend) is
            /// encoded again, from its new lines.
            async fn append_logs(&self, job_id: &str, lines: &[NewLogLine], now: stagely_engine::Timestamp) -> Result<(), DbError> {
                let Some(first) = lines.first() else {
                    return Ok(());
                };
                let mut prepared = chunks::prepare(&chunks::fresh_lines(lines, 0));
                let _turn = self.log_write_turn().await;
                let now = now.0;
                let mut tx = self.pool.begin().await?;
                let stored: Option<i64> = sqlx::query_scalar($crate::LAST_LOG_SEQ)
                .bind(job_id)
                .fetch_one(&mut *tx)
                .await?;
                let stored = stored.unwrap_or(0);
                if first.seq <= stored {
                    prepared = chunks::prepare(&chunks::fresh_lines(lines, stored));
                }
                for chunk in prepared {
                    sqlx::query(
                        "INSERT INTO log_chunks (build_job_id, first_seq, last_seq, stored_at, line_count, bytes, data, packed)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                    )
                    .bind(job_id)
                    .bind(chunk.first_seq)
                    .bind(chunk.last_seq)
                    .bind(now)
                    .bind(chunk.line_count)
                    .bind(chunk.bytes)
                    .bind(chunk.text)
                    .bind(chunk.packed)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(())
            }

            /// Highest stored seq for a job (0 when none).
            async fn last_log_seq(&self, job_id: &str) -> Result<i64, DbError> {
                let max: Option<i64> = sqlx::query_scalar($crate::LAST_LOG_SEQ)
                .bind(job_id)
                .fetch_one(&self.pool)
                .await?;
                Ok(max.unwrap_or(0))
            }

            async fn set_attempt_log_base(
                &self,
                job_id: &str,
                attempt: u32,
                base: i64,
            ) -> Result<(), DbError> {
                let _turn = self.write_turn().await;
                sqlx::query("UPDATE job_attempts SET log_base = $3 WHERE build_job_id = $1 AND number = $2")
                    .bind(job_id)
                    .bind(attempt as i32)
                    .bind(base)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn attempt_log_base(&self, job_id: &str, attempt: u32) -> Result<i64, DbError> {
                let base: Option<i64> = sqlx::query_scalar(
                    "SELECT log_base FROM job_attempts WHERE build_job_id = $1 AND number = $2",
                )
                .bind(job_id)
                .bind(attempt as i32)
                .fetch_optional(&self.pool)
                .await?;
                Ok(base.unwrap_or(0))
            }

            #[cfg(test)]
            async fn chunk_forms_for_tests(&self, job_id: &str) -> Result<(i64, i64), DbError> {
                Ok(sqlx::query_as(
                    "SELECT COUNT(packed), COUNT(*) - COUNT(packed) FROM log_chunks WHERE build_job_id = $1",
                )
                .bind(job_id)
                .fetch_one(&self.pool)
                .await?)
            }

            #[cfg(test)]
            async fn insert_legacy_log_line_for_tests(
                &self,
                job_id: &str,
                seq: i64,
                line: &str,
            ) -> Result<(), DbError> {
                sqlx::query(
                    "INSERT INTO build_logs (build_job_id, seq, timestamp, stream, line) VALUES ($1, $2, 0, 'stdout', $3)",
                )
                .bind(job_id)
                .bind(seq)
                .bind(line)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            /// One page of lines with `seq > after`, at most `limit`.
            async fn logs_page(
                &self,
                job_id: &str,
                after: i64,
                limit: i64,
            ) -> Result<Vec<LogRow>, DbError> {
                let wanted = usize::try_from(limit.max(0)).unwrap_or(0);
                // Lines an earlier version stored one per row.
                let legacy = sqlx::query_as::<_, LogRow>(
                    "SELECT seq, timestamp, stream, line FROM build_logs WHERE build_job_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                )
                .bind(job_id)
                .bind(after)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
                let mut chunked: Vec<LogRow> = Vec::new();
                let mut cursor = after;
                while chunked.len() < wanted {
                    let rows: Vec<(i64, i64, i64, String, Option<Vec<u8>>)> = sqlx::query_as(
                        "SELECT first_seq, last_seq, stored_at, data, packed FROM log_chunks
                         WHERE build_job_id = $1 AND last_seq > $2 ORDER BY first_seq LIMIT 4",
                    )
                    .bind(job_id)
                    .bind(cursor)
                    .fetch_all(&self.pool)
                    .await?;
                    if rows.is_empty() {
                        break;
                    }
                    for (first_seq, last_seq, stored_at, data, packed) in rows {
                        let data = match packed {
                            Some(packed) => chunks::unpack(job_id, first_seq, &packed)?,
                            None => data,
                        };
                        chunked.extend(chunks::decode(job_id, first_seq, &data, stored_at, after)?);
                        cursor = cursor.max(last_seq);
                    }
                }
                if legacy.is_empty() {
                    chunked.truncate(wanted);
                    return Ok(chunked);
                }
                let mut all: Vec<LogRow> = legacy.into_iter().chain(chunked).collect();
                all.sort_by_key(|row| row.seq);
                all.dedup_by_key(|row| row.seq);
                all.truncate(wanted);
                Ok(all)
            }

            async fn log_stats(&self, job_id: &str) -> Result<(i64, i64), DbError> {
                self.log_byte_stats(job_id).await
            }

            async fn delete_logs_of_runs_finished_before(
                &self,
                cutoff: i64,
                max_jobs: i64,
            ) -> Result<u64, DbError> {
                // Both files (SQLite): the main one's turn first, as every write to both.
                let _turn = self.write_turn().await;
                let _log_turn = self.log_write_turn().await;
                let jobs: Vec<String> = sqlx::query_scalar(
                    "SELECT j.id FROM build_jobs j JOIN workflow_runs r ON r.id = j.workflow_run_id
                     WHERE r.status IN ('completed', 'failed', 'cancelled') AND r.updated_at < $1
                       AND (EXISTS (SELECT 1 FROM log_chunks c WHERE c.build_job_id = j.id)
                            OR EXISTS (SELECT 1 FROM build_logs l WHERE l.build_job_id = j.id))
                     LIMIT $2",
                )
                .bind(cutoff)
                .bind(max_jobs)
                .fetch_all(&self.pool)
                .await?;
                let mut lines: i64 = 0;
                let mut tx = self.pool.begin().await?;
                for job in &jobs {
                    lines += sqlx::query_scalar::<_, i64>(
                        "SELECT CAST(COALESCE(SUM(line_count), 0) AS BIGINT) FROM log_chunks WHERE build_job_id = $1",
                    )
                    .bind(job)
                    .fetch_one(&mut *tx)
                    .await?;
                    sqlx::query("DELETE FROM log_chunks WHERE build_job_id = $1")
                        .bind(job)
                        .execute(&mut *tx)
                        .await?;
                    lines += sqlx::query("DELETE FROM build_logs WHERE build_job_id = $1")
                        .bind(job)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected() as i64;
                }
                tx.commit().await?;
                Ok(lines.max(0) as u64)
            }
        }
    };
}
