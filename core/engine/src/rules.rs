//! The rules applied after every input: each changed run stepped (jobs skipped, taken back,
//! finished), and the eligible jobs claimed within the limits.

use super::*;

impl Engine {
    /// Applies every rule until nothing changes: expired foreign leases, cancellation,
    /// fail-fast, skipped merges, fan-in, then the queue. Per-run rules run for the runs that
    /// changed ([`Engine::touch`]); in tests, a full pass afterwards must find nothing to do.
    pub(crate) fn step(&mut self, now: Timestamp) {
        self.step_once(now);
        #[cfg(test)]
        {
            let before = self.actions.len();
            assert_eq!(
                self.index,
                self.index_from_scratch(),
                "the index kept step by step differs from one built from scratch"
            );
            self.step_all = true;
            self.step_once(now);
            assert!(
                self.actions.len() == before,
                "a full step after the incremental one found work: {:?}",
                self.actions.range(before..).collect::<Vec<_>>()
            );
        }
    }

    pub(crate) fn step_once(&mut self, now: Timestamp) {
        if std::mem::take(&mut self.step_all) {
            self.dirty.extend(self.runs.keys().cloned());
        }
        self.take_back_expired(now);
        self.settle(now);
        self.refresh_changed();
        self.claim_eligible(now);
        self.settle(now);
        self.refresh_changed();
        // After the claims are answered and their instances asked for.
        if !self.started.is_empty() && self.index.pending_total == 0 {
            for run_id in std::mem::take(&mut self.started) {
                self.actions
                    .push_back(Action::Persist(Transition::RunStarted { run_id }));
            }
        }
        if self.index.local_total == 0 {
            self.next_renewal = None;
        }
    }

    /// The per-run rules, for every changed run.
    pub(crate) fn settle(&mut self, now: Timestamp) {
        while !self.dirty.is_empty() {
            let batch = std::mem::take(&mut self.dirty);
            self.changed.extend(batch.iter().cloned());
            for run_id in &batch {
                self.step_run(run_id, now);
            }
            for run_id in &batch {
                self.finish_run_if_done(run_id);
            }
        }
    }

    /// The run of `job_id` changed: step it.
    pub(crate) fn touch(&mut self, job_id: &str) {
        if let Some(job) = self.jobs.get(job_id) {
            self.dirty.insert(job.run_id.clone());
        }
    }

    pub(crate) fn step_run(&mut self, run_id: &str, now: Timestamp) {
        let Some(run) = self.runs.get(run_id) else {
            return;
        };
        // Fail-fast: the first failed job cancels the rest.
        if run.fail_fast && run.cancel.is_none() {
            let failed = run.jobs.iter().find_map(|id| {
                self.jobs
                    .get(id)
                    .filter(|job| job.snapshot.status == JobStatus::Failed)
                    .map(|job| job.snapshot.name.clone())
            });
            if let Some(job) = failed {
                let reason = CancelReason::FailFast { job };
                if let Some(run) = self.runs.get_mut(run_id) {
                    run.cancel = Some(reason.clone());
                }
                self.actions
                    .push_back(Action::Persist(Transition::RunCancelRequested {
                        run_id: run_id.into(),
                        reason,
                    }));
            }
        }
        let Some(run) = self.runs.get(run_id) else {
            return;
        };
        let cancel = run.cancel.clone();
        let job_ids = run.jobs.clone();
        for id in &job_ids {
            let Some(job) = self.jobs.get(id) else {
                continue;
            };
            if job.claim_pending {
                continue;
            }
            if let Some(reason) = &cancel {
                if job.snapshot.status == JobStatus::Queued {
                    self.skip(id, JobStatus::Cancelled, reason.to_string());
                } else if job.local.is_some() {
                    self.stop(id, Stop::Cancel(reason.clone()), now);
                }
                continue;
            }
            // A merge whose source will never complete never starts.
            if let JobKind::Merge { sources } = &job.snapshot.kind
                && job.snapshot.status == JobStatus::Queued
            {
                let run = &self.runs[run_id];
                let broken: Vec<String> = sources
                    .iter()
                    .filter(|name| {
                        run.jobs.iter().any(|other| {
                            self.jobs.get(other).is_some_and(|o| {
                                o.snapshot.name == **name
                                    && o.snapshot.status.is_final()
                                    && o.snapshot.status != JobStatus::Completed
                            })
                        })
                    })
                    .cloned()
                    .collect();
                if !broken.is_empty() {
                    let message = format!(
                        "skipped: platform job(s) {} did not complete",
                        broken.join(", ")
                    );
                    self.skip(id, JobStatus::Cancelled, message);
                }
            }
        }
    }

    pub(crate) fn skip(&mut self, job_id: &str, status: JobStatus, message: String) {
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        job.snapshot.status = status;
        self.actions
            .push_back(Action::Persist(Transition::JobSkipped {
                job_id: job_id.into(),
                status,
                message,
            }));
    }

    /// Live jobs of other owners whose lease ran out: their core is gone. The guarded write
    /// lets exactly one replica take each back.
    pub(crate) fn take_back_expired(&mut self, now: Timestamp) {
        if self.draining {
            return;
        }
        // Only the changed runs: an expiry that no input brought is found by the timeout
        // (a foreign lease's end is a deadline), which looks at every run.
        let mut expired: Vec<String> = self
            .dirty
            .iter()
            .filter_map(|run_id| self.runs.get(run_id))
            .flat_map(|run| run.jobs.iter())
            .filter_map(|id| self.jobs.get(id).map(|job| (id, job)))
            .filter(|(_, job)| {
                job.local.is_none()
                    && !job.claim_pending
                    && job.snapshot.status.is_live()
                    && job.snapshot.lease_until.is_none_or(|until| until <= now)
            })
            .map(|(id, _)| id.clone())
            .collect();
        expired.sort();
        for id in expired {
            let Some(job) = self.jobs.get_mut(&id) else {
                continue;
            };
            let owner = job.snapshot.lease_owner.clone().unwrap_or_default();
            if job.snapshot.status == JobStatus::Running {
                // The build may well be going on: adopt the attempt and give its agent the
                // reconnect grace to dial in and resume here.
                let until = now.plus(self.config.lease_duration);
                // Whether its instance still runs is asked at once, and again every
                // LIVENESS_EVERY until the agent dials in: an instance that died with its core
                // ends the attempt now, not after the grace.
                job.local = Some(Local {
                    boot_deadline: Some(now.plus(self.config.reconnect_grace)),
                    adopted_from: Some(owner.clone()),
                    next_liveness_check: Some(now.plus(LIVENESS_EVERY)),
                    ..Local::default()
                });
                job.snapshot.lease_owner = Some(self.config.owner.clone());
                job.snapshot.lease_until = Some(until);
                let attempt = job.snapshot.attempt;
                let instance_id = job.snapshot.instance_id.clone();
                let predecessor = self.config.is_predecessor(&owner);
                self.touch(&id);
                self.actions
                    .push_back(Action::Persist(Transition::AttemptAdopted {
                        job_id: id.clone(),
                        attempt,
                        from: owner,
                        owner: self.config.owner.clone(),
                        lease_until: until,
                        predecessor,
                    }));
                if let Some(instance_id) = instance_id {
                    self.actions.push_back(Action::CheckInstance {
                        job_id: id,
                        attempt,
                        instance_id,
                    });
                }
                continue;
            }
            // End the other core's attempt as an infrastructure failure, as if it were ours.
            job.local = Some(Local::default());
            let message = format!("the lease of core {owner} expired (that core stopped)");
            self.end_attempt_held_by(
                &id,
                AttemptOutcome::Infrastructure {
                    kind: InfraKind::LeaseExpired,
                    message,
                },
                now,
                Some(owner),
            );
        }
    }

    pub(crate) fn finish_run_if_done(&mut self, run_id: &str) {
        let Some(run) = self.runs.get(run_id) else {
            return;
        };
        let jobs: Vec<&Job> = run.jobs.iter().filter_map(|id| self.jobs.get(id)).collect();
        if jobs.is_empty()
            || jobs
                .iter()
                .any(|job| !job.snapshot.status.is_final() || job.lingering)
        {
            return;
        }
        let failed: Vec<&str> = jobs
            .iter()
            .filter(|job| job.snapshot.status == JobStatus::Failed)
            .map(|job| job.snapshot.name.as_str())
            .collect();
        let cancelled = jobs
            .iter()
            .any(|job| job.snapshot.status == JobStatus::Cancelled);
        let (status, message) = if !failed.is_empty() {
            (
                RunStatus::Failed,
                Some(format!("job(s) failed: {}", failed.join(", "))),
            )
        } else if cancelled {
            (
                RunStatus::Cancelled,
                Some(
                    run.cancel
                        .as_ref()
                        .map_or_else(|| "cancelled".to_string(), |reason| reason.to_string()),
                ),
            )
        } else {
            (RunStatus::Completed, None)
        };
        self.actions
            .push_back(Action::Persist(Transition::RunFinished {
                run_id: run_id.into(),
                status,
                message,
            }));
        if let Some(run) = self.runs.remove(run_id) {
            for id in run.jobs {
                self.jobs.remove(&id);
            }
        }
    }

    /// Queued jobs that could be claimed now, in FIFO order (`limit`: stop after that many).
    pub(crate) fn eligible(&self, now: Option<Timestamp>) -> Vec<String> {
        // Only runs with a queued job, already in queue order.
        let runs = self
            .index
            .waiting
            .iter()
            .filter_map(|(_, id)| self.runs.get(id))
            .filter(|run| run.cancel.is_none());
        let mut out = Vec::new();
        for run in runs {
            let mut ordered: Vec<&Job> =
                run.jobs.iter().filter_map(|id| self.jobs.get(id)).collect();
            ordered.sort_by_key(|job| job.ordinal);
            for job in ordered {
                if job.snapshot.status != JobStatus::Queued || job.claim_pending {
                    continue;
                }
                if let (Some(now), Some(at)) = (now, job.claim_blocked_until)
                    && at > now
                {
                    continue;
                }
                if let (Some(now), Some(at)) = (now, job.snapshot.not_before)
                    && at > now
                {
                    continue;
                }
                if let JobKind::Merge { sources } = &job.snapshot.kind
                    && !self.sources_completed(run, sources)
                {
                    continue;
                }
                out.push(job.snapshot.id.clone());
            }
        }
        out
    }

    pub(crate) fn claim_eligible(&mut self, now: Timestamp) {
        if self.draining {
            self.end_unwanted_lingering();
            return;
        }
        // Live jobs (a finished attempt kept for a merge still holds its instance), from the
        // index; the claims made here add to them.
        let mut live_total = self.index.live_total;
        let mut claimed_by_env: HashMap<String, usize> = HashMap::new();
        let mut claims = Vec::new();
        for id in self.eligible(Some(now)) {
            let job = &self.jobs[&id];
            let env = self.runs[&job.run_id].environment_id.clone();
            let reuses_instance = self.lingering_source_for(&id).is_some();
            if !reuses_instance {
                // Over a limit: this job waits, but a merge that reuses a live instance may
                // still go.
                let in_env = self.index.live_by_env.get(&env).copied().unwrap_or(0)
                    + claimed_by_env.get(&env).copied().unwrap_or(0);
                if live_total >= self.config.max_live_instances
                    || in_env >= self.config.max_live_per_environment
                {
                    continue;
                }
                live_total += 1;
                *claimed_by_env.entry(env.clone()).or_default() += 1;
            }
            claims.push(Claim {
                job_id: id.clone(),
                environment_id: env,
                attempt: job.snapshot.attempt + 1,
                expected_attempt: job.snapshot.attempt,
                reuses_instance,
            });
        }
        for claim in &claims {
            if let Some(job) = self.jobs.get_mut(&claim.job_id) {
                job.claim_pending = true;
                self.changed.insert(job.run_id.clone());
            }
        }
        self.end_unwanted_lingering();
        if claims.is_empty() {
            return;
        }
        self.actions.push_back(Action::Claim {
            claims,
            lease_until: now.plus(self.config.lease_duration),
            max_live_instances: self.config.max_live_instances,
            max_live_per_environment: self.config.max_live_per_environment,
        });
    }
}
