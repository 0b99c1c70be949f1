//! Run views from the store's rows: what `GET /api/v1/workflows/{id}`, its event stream and
//! `stagely run` show, with each attempt's billed time and estimated cost.

use std::sync::Arc;

use stagely_api::{AttemptView, JobView, RunView};

use crate::cost::PriceTable;
use crate::db::{AttemptRow, Db, DbError, JobRow, RunRow};

/// Reads run views: the store and the price table the costs come from.
#[derive(Clone)]
pub struct RunViews {
    db: Db,
    prices: Arc<PriceTable>,
}

impl RunViews {
    pub fn new(db: Db, prices: Arc<PriceTable>) -> RunViews {
        RunViews { db, prices }
    }

    /// The run's view now (`None` when there is no such run).
    pub async fn load(&self, run_id: &str) -> Result<Option<RunView>, DbError> {
        let Some(run) = self.db.run(run_id).await? else {
            return Ok(None);
        };
        let jobs = self.db.jobs_of_run(run_id).await?;
        let attempts = self.db.attempts_of_run(run_id).await?;
        let mut view = run_view(run, jobs, attempts, &self.prices, crate::clock::now_ms());
        view.add_up_costs();
        Ok(Some(view))
    }
}

/// The view of a run from its rows, `now` (Unix ms) bounding the billed time of attempts whose
/// instance still lives. Costs are per attempt; [`RunView::add_up_costs`] sums them.
pub fn run_view(
    run: RunRow,
    jobs: Vec<JobRow>,
    attempts: Vec<AttemptRow>,
    prices: &PriceTable,
    now: i64,
) -> RunView {
    let mut by_job: std::collections::HashMap<String, Vec<AttemptView>> = Default::default();
    for attempt in attempts {
        let launched = attempt.merge_path.as_deref() != Some("last_builder");
        let billed_seconds = attempt
            .billed_from
            .map(|from| crate::cost::billed_seconds(from, attempt.billed_until, now, launched));
        let cost_usd = match (&attempt.instance_type, billed_seconds) {
            (Some(instance_type), Some(seconds)) => {
                prices.cost(instance_type, attempt.market.as_deref(), seconds)
            }
            _ => None,
        };
        by_job
            .entry(attempt.build_job_id.clone())
            .or_default()
            .push(AttemptView {
                instance_type: attempt.instance_type,
                market: attempt.market,
                placement: attempt.placement,
                billed_seconds,
                cost_usd,
                number: attempt.number,
                owner: attempt.owner,
                instance_id: attempt.instance_id,
                merge_path: attempt.merge_path,
                started_at: attempt.started_at,
                connected_at: attempt.connected_at,
                ended_at: attempt.ended_at,
                outcome: attempt.result,
                message: attempt.message,
            });
    }
    RunView {
        id: run.id,
        environment_id: run.environment_id,
        trigger: run.trigger,
        status: run.status.as_str().to_string(),
        repo_url: run.repo_url,
        commit_hash: run.commit_hash,
        branch: run.branch,
        config_dir: run.config_path,
        error_message: run.error_message,
        created_at: run.created_at,
        updated_at: run.updated_at,
        fail_fast: run.fail_fast,
        cancel_reason: run.cancel_reason,
        submitted_by: run.submitted_by,
        cost_usd: None,
        jobs: jobs
            .into_iter()
            .map(|job| JobView {
                cost_usd: None,
                attempts: by_job.remove(&job.id).unwrap_or_default(),
                failure_kind: job.failure_kind,
                merge_path: job.merge_path,
                id: job.id,
                name: job.name,
                status: job.status.as_str().to_string(),
                architecture: job.architecture,
                platform: job.platform,
                machine: job.machine,
                vm_id: job.vm_id,
                artifact_url: job.artifact_url,
                digest: job.digest,
                created_at: job.created_at,
                started_at: job.started_at,
                completed_at: job.completed_at,
                exit_code: job.exit_code,
                error_message: job.error_message,
            })
            .collect(),
    }
}
