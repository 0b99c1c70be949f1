//! Log retention: lines of runs finished longer ago than `log_retention` are deleted, a few
//! jobs at a time.

use super::*;

/// How often logs past their retention are looked for.
pub(super) const RETENTION_INTERVAL: Duration = Duration::from_secs(3600);
/// Jobs whose logs one retention statement deletes (short transactions; repeated until none).
const RETENTION_JOBS_PER_BATCH: i64 = 20;

impl Runner {
    /// Deletes the logs of runs that finished longer ago than `log_retention`, a few jobs at
    /// a time, in the background.
    pub(super) fn spawn_log_retention_task(shared: &Arc<Shared>) {
        let Some(retention) = shared.settings.log_retention else {
            return;
        };
        let shared = shared.clone();
        shared.tasks.clone().spawn(async move {
            let cutoff = now().millis().saturating_sub(
                i64::try_from(retention.as_millis()).unwrap_or(i64::MAX),
            );
            let mut lines = 0u64;
            loop {
                let batch = tokio::select! {
                    batch = shared.db.delete_logs_of_runs_finished_before(cutoff, RETENTION_JOBS_PER_BATCH) => batch,
                    () = shared.shutdown.cancelled() => return,
                };
                match batch {
                    Ok(0) => break,
                    Ok(deleted) => lines += deleted,
                    Err(error) => {
                        tracing::error!("log retention: deleting old logs failed: {error}");
                        return;
                    }
                }
            }
            if lines > 0 {
                tracing::info!(lines, retention_days = retention.as_secs() / 86_400, "log retention: deleted the logs of old runs");
            }
        });
    }
}
