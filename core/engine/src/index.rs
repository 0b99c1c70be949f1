//! Aggregates over the runs in view, kept current run by run, so that one input costs the
//! size of the runs it changed and not of every run in view (the queue's order, the live
//! counts the limits need, the next deadline). [`Engine::refresh`] recomputes one run's share
//! from its jobs; the engine calls it for every run a step changed. In tests, every step ends
//! by comparing the index with one built from scratch.

use std::collections::{BTreeSet, HashMap};

use super::{Engine, Job, JobStatus, Run, Timestamp};

/// One run's share of the index.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Share {
    environment_id: String,
    created_at: Timestamp,
    /// Jobs holding (or about to hold) an instance: live, claim pending, or lingering.
    live: usize,
    /// Jobs this core holds a live attempt of.
    local: usize,
    /// Jobs with a claim outstanding.
    pending: usize,
    /// Has a `queued` job.
    waiting: bool,
    /// Has a finished attempt kept for a merge.
    lingering: bool,
    /// The earliest deadline of its jobs.
    due: Option<Timestamp>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Index {
    shares: HashMap<String, Share>,
    pub(super) live_total: usize,
    pub(super) live_by_env: HashMap<String, usize>,
    pub(super) local_total: usize,
    pub(super) pending_total: usize,
    /// Runs with a queued job, in queue order (creation, then id).
    pub(super) waiting: BTreeSet<(Timestamp, String)>,
    /// Runs with a lingering job.
    pub(super) lingering: BTreeSet<String>,
    /// Each run's earliest deadline.
    due: BTreeSet<(Timestamp, String)>,
}

impl Index {
    /// The earliest deadline of any job in view.
    pub(super) fn next_due(&self) -> Option<Timestamp> {
        self.due.first().map(|(at, _)| *at)
    }

    fn remove(&mut self, run_id: &str) {
        let Some(old) = self.shares.remove(run_id) else {
            return;
        };
        self.live_total -= old.live;
        if let Some(count) = self.live_by_env.get_mut(&old.environment_id) {
            *count -= old.live;
            if *count == 0 {
                self.live_by_env.remove(&old.environment_id);
            }
        }
        self.local_total -= old.local;
        self.pending_total -= old.pending;
        if old.waiting {
            self.waiting.remove(&(old.created_at, run_id.to_string()));
        }
        if old.lingering {
            self.lingering.remove(run_id);
        }
        if let Some(at) = old.due {
            self.due.remove(&(at, run_id.to_string()));
        }
    }

    fn insert(&mut self, run_id: &str, share: Share) {
        self.live_total += share.live;
        if share.live > 0 {
            *self
                .live_by_env
                .entry(share.environment_id.clone())
                .or_default() += share.live;
        }
        self.local_total += share.local;
        self.pending_total += share.pending;
        if share.waiting {
            self.waiting.insert((share.created_at, run_id.to_string()));
        }
        if share.lingering {
            self.lingering.insert(run_id.to_string());
        }
        if let Some(at) = share.due {
            self.due.insert((at, run_id.to_string()));
        }
        self.shares.insert(run_id.to_string(), share);
    }
}

/// When the engine must next look at `job` (what [`Engine::poll_timeout`] waits for).
fn job_due(job: &Job) -> Option<Timestamp> {
    let candidates = match &job.local {
        Some(local) => [
            local.boot_deadline,
            local.deadline,
            local.stop.as_ref().map(|(_, at)| *at),
            local
                .next_liveness_check
                .filter(|_| !local.connected || local.away),
        ],
        None if job.snapshot.status == JobStatus::Queued => {
            [job.snapshot.not_before, job.claim_blocked_until, None, None]
        }
        None if job.snapshot.status.is_live() => [job.snapshot.lease_until, None, None, None],
        None => [None, None, None, None],
    };
    candidates.into_iter().flatten().min()
}

fn share_of(run: &Run, jobs: &HashMap<String, Job>) -> Share {
    let mut share = Share {
        environment_id: run.environment_id.clone(),
        created_at: run.created_at,
        live: 0,
        local: 0,
        pending: 0,
        waiting: false,
        lingering: false,
        due: None,
    };
    for job in run.jobs.iter().filter_map(|id| jobs.get(id)) {
        if job.snapshot.status.is_live() || job.claim_pending || job.lingering {
            share.live += 1;
        }
        share.local += usize::from(job.local.is_some());
        share.pending += usize::from(job.claim_pending);
        share.waiting |= job.snapshot.status == JobStatus::Queued;
        share.lingering |= job.lingering;
        share.due = match (share.due, job_due(job)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    share
}

impl Engine {
    /// Recomputes `run_id`'s share of the index (gone from the index if gone from view).
    pub(super) fn refresh(&mut self, run_id: &str) {
        let fresh = self.runs.get(run_id).map(|run| share_of(run, &self.jobs));
        if self.index.shares.get(run_id) == fresh.as_ref() {
            return;
        }
        self.index.remove(run_id);
        if let Some(share) = fresh {
            self.index.insert(run_id, share);
        }
    }

    /// Refreshes every run changed since the last refresh.
    pub(super) fn refresh_changed(&mut self) {
        for run_id in std::mem::take(&mut self.changed) {
            self.refresh(&run_id);
        }
    }

    /// The index as built from scratch (tests compare it with the kept one).
    #[cfg(test)]
    pub(super) fn index_from_scratch(&self) -> Index {
        let mut index = Index::default();
        for (id, run) in &self.runs {
            index.insert(id, share_of(run, &self.jobs));
        }
        index
    }
}
