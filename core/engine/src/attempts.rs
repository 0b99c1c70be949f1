//! An attempt's life after its start: stops, its end (and what it frees: a lingering
//! builder, a merge), instances found gone, lease renewals.

use super::*;

impl Engine {
    pub(crate) fn is_current_own(&self, job_id: &str, attempt: u32) -> bool {
        self.jobs
            .get(job_id)
            .is_some_and(|job| job.local.is_some() && job.snapshot.attempt == attempt)
    }

    /// Sends CANCEL to a live attempt of this core and arms its stop deadline.
    pub(crate) fn stop(&mut self, job_id: &str, why: Stop, now: Timestamp) {
        let grace = self.config.cancel_grace + STOP_MARGIN;
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        let Some(local) = job.local.as_mut() else {
            return;
        };
        if local.stop.is_some() {
            return;
        }
        if !local.connected {
            // No agent yet: nothing to stop gracefully.
            let outcome = match &why {
                Stop::Cancel(reason) => AttemptOutcome::Cancelled {
                    message: reason.to_string(),
                },
                Stop::Timeout => AttemptOutcome::Cancelled {
                    message: "timed out before its agent connected".into(),
                },
            };
            local.stop = Some((why, now));
            self.end_attempt(job_id, outcome, now);
            return;
        }
        let reason = match &why {
            Stop::Cancel(reason) => reason.to_string(),
            Stop::Timeout => format!(
                "the job exceeded its timeout of {}",
                humanize(job.snapshot.timeout)
            ),
        };
        local.stop = Some((why, now.plus(grace)));
        self.actions.push_back(Action::SendCancel {
            job_id: job_id.into(),
            attempt: job.snapshot.attempt,
            reason,
        });
    }

    /// Ends this core's current attempt of `job_id` with `outcome`, deciding where the job
    /// goes (retry, final) and what happens to its instance.
    pub(crate) fn end_attempt(&mut self, job_id: &str, outcome: AttemptOutcome, now: Timestamp) {
        self.end_attempt_held_by(job_id, outcome, now, None);
    }

    /// [`Engine::end_attempt`], for an attempt held by `taken_from` (another core whose lease
    /// expired) when it is `Some`: the write is guarded by that owner and by the lease having
    /// run out in the store, and the old instance is left to the runner, which terminates it
    /// only once that write succeeded (a renewal meanwhile means its core is alive).
    pub(crate) fn end_attempt_held_by(
        &mut self,
        job_id: &str,
        outcome: AttemptOutcome,
        now: Timestamp,
        taken_from: Option<String>,
    ) {
        self.touch(job_id);
        let config = self.config.clone();
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        let Some(local) = job.local.take() else {
            return;
        };
        let run_cancel = self
            .runs
            .get(&job.run_id)
            .and_then(|run| run.cancel.clone());
        let timeout_text = humanize(job.snapshot.timeout);
        let stop = local.stop.map(|(why, _)| why);
        let attempt = job.snapshot.attempt;
        let (result, message, end) = match outcome {
            AttemptOutcome::Completed {
                artifact_url,
                digest,
                exit_code,
            } => (
                AttemptResult::Completed,
                None,
                JobEnd::Completed {
                    artifact_url,
                    digest,
                    exit_code,
                },
            ),
            other if stop == Some(Stop::Timeout) => {
                let detail = match &other {
                    AttemptOutcome::Cancelled { message }
                    | AttemptOutcome::BuildFailed { message, .. }
                    | AttemptOutcome::Infrastructure { message, .. }
                    | AttemptOutcome::Protocol { message } => message.clone(),
                    AttemptOutcome::Completed { .. } => String::new(),
                };
                let message = format!("the job timed out after {timeout_text}: {detail}");
                (
                    AttemptResult::Failed,
                    Some(message.clone()),
                    JobEnd::Failed {
                        kind: FailureKind::Timeout,
                        exit_code: None,
                        message,
                        infra_failures: job.snapshot.infra_failures,
                    },
                )
            }
            _ if matches!(stop, Some(Stop::Cancel(_))) || run_cancel.is_some() => {
                let message = match (&stop, &run_cancel) {
                    (Some(Stop::Cancel(reason)), _) | (_, Some(reason)) => reason.to_string(),
                    _ => "cancelled".into(),
                };
                (
                    AttemptResult::Cancelled,
                    Some(message.clone()),
                    JobEnd::Cancelled { message },
                )
            }
            AttemptOutcome::Cancelled { message } => (
                AttemptResult::Cancelled,
                Some(message.clone()),
                JobEnd::Cancelled { message },
            ),
            AttemptOutcome::BuildFailed { exit_code, message } => (
                AttemptResult::Failed,
                Some(message.clone()),
                JobEnd::Failed {
                    kind: FailureKind::Build,
                    exit_code,
                    message,
                    infra_failures: job.snapshot.infra_failures,
                },
            ),
            AttemptOutcome::Protocol { message } => (
                AttemptResult::Failed,
                Some(message.clone()),
                JobEnd::Failed {
                    kind: FailureKind::Protocol,
                    exit_code: None,
                    message,
                    infra_failures: job.snapshot.infra_failures,
                },
            ),
            AttemptOutcome::Infrastructure { kind, message } => {
                let failures =
                    job.snapshot.infra_failures + u32::from(kind.counts_against_retries());
                let end = if !kind.may_retry() {
                    JobEnd::Failed {
                        kind: FailureKind::Infrastructure,
                        exit_code: None,
                        message: format!(
                            "{message} (attempt {attempt}; not retried: another attempt would fail the same way)"
                        ),
                        infra_failures: failures,
                    }
                } else if failures > config.max_retries {
                    JobEnd::Failed {
                        kind: FailureKind::Infrastructure,
                        exit_code: None,
                        message: format!(
                            "{message} (attempt {attempt}; giving up after {} retries)",
                            config.max_retries
                        ),
                        infra_failures: failures,
                    }
                } else {
                    let backoff = if kind.backs_off() {
                        config.retry_backoff * 2u32.saturating_pow(failures.saturating_sub(1))
                    } else {
                        Duration::ZERO
                    };
                    JobEnd::Requeued {
                        not_before: now.plus(backoff),
                        infra_failures: failures,
                    }
                };
                (
                    AttemptResult::Infrastructure,
                    Some(format!("{kind}: {message}")),
                    end,
                )
            }
        };
        let instance_id = job.snapshot.instance_id.clone();
        let takeover = taken_from.is_some();
        let predecessor = taken_from
            .as_deref()
            .is_some_and(|from| config.is_predecessor(from));
        let owner = taken_from.unwrap_or_else(|| self.config.owner.clone());
        job.snapshot.status = end.status();
        job.snapshot.lease_owner = None;
        job.snapshot.lease_until = None;
        match &end {
            JobEnd::Requeued {
                not_before,
                infra_failures,
            } => {
                job.snapshot.not_before = Some(*not_before);
                job.snapshot.infra_failures = *infra_failures;
                job.snapshot.instance_id = None;
            }
            JobEnd::Failed { infra_failures, .. } => {
                job.snapshot.infra_failures = *infra_failures;
            }
            _ => {}
        }
        let completed = matches!(end, JobEnd::Completed { .. });
        self.actions
            .push_back(Action::Persist(Transition::AttemptEnded {
                job_id: job_id.into(),
                attempt,
                owner,
                takeover,
                predecessor,
                result,
                message,
                end,
            }));
        // A completed platform job whose instance can run the merge it unblocked keeps it.
        let keep_for_merge = completed
            && instance_id.is_some()
            && !self.draining
            && self.merge_unblocked_by(job_id).is_some();
        if takeover {
            // The runner terminates it after the guarded write.
        } else if keep_for_merge {
            if let Some(job) = self.jobs.get_mut(job_id) {
                job.lingering = true;
            }
        } else {
            self.actions.push_back(Action::Terminate {
                job_id: job_id.into(),
                attempt,
                instance_id,
            });
        }
    }

    /// A queued merge of `job_id`'s run whose every source is now completed, `job_id` among
    /// them.
    pub(crate) fn merge_unblocked_by(&self, job_id: &str) -> Option<String> {
        let job = self.jobs.get(job_id)?;
        let run = self.runs.get(&job.run_id)?;
        if run.cancel.is_some() {
            return None;
        }
        run.jobs.iter().find_map(|id| {
            let merge = self.jobs.get(id)?;
            let JobKind::Merge { sources } = &merge.snapshot.kind else {
                return None;
            };
            (merge.snapshot.status == JobStatus::Queued
                && merge.snapshot.attempt == 0
                && !merge.claim_pending
                && sources.contains(&job.snapshot.name)
                && self.sources_completed(run, sources))
            .then(|| id.clone())
        })
    }

    pub(crate) fn sources_completed(&self, run: &Run, sources: &[String]) -> bool {
        sources.iter().all(|name| {
            run.jobs.iter().any(|id| {
                self.jobs.get(id).is_some_and(|job| {
                    job.snapshot.name == *name && job.snapshot.status == JobStatus::Completed
                })
            })
        })
    }

    /// The lingering finished attempt whose instance a merge will reuse.
    pub(crate) fn lingering_source_for(&self, merge_id: &str) -> Option<(String, u32, String)> {
        let merge = self.jobs.get(merge_id)?;
        let JobKind::Merge { sources } = &merge.snapshot.kind else {
            return None;
        };
        let run = self.runs.get(&merge.run_id)?;
        run.jobs.iter().find_map(|id| {
            let job = self.jobs.get(id)?;
            (job.lingering && sources.contains(&job.snapshot.name)).then(|| {
                (
                    id.clone(),
                    job.snapshot.attempt,
                    job.snapshot.instance_id.clone().unwrap_or_default(),
                )
            })
        })
    }

    /// Asks the provider about the attempt's instance while its agent stays away (adopted and
    /// not dialled in yet, or its connection dropped).
    pub(crate) fn check_instance(&mut self, job_id: &str, now: Timestamp) {
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        let Some(local) = job.local.as_mut() else {
            return;
        };
        local.next_liveness_check = Some(now.plus(LIVENESS_EVERY));
        if let Some(instance_id) = job.snapshot.instance_id.clone() {
            self.actions.push_back(Action::CheckInstance {
                job_id: job_id.into(),
                attempt: job.snapshot.attempt,
                instance_id,
            });
        }
    }

    /// The provider says the attempt's instance is gone: unless its agent is connected
    /// after all, the attempt ends now as an infrastructure failure (retried without backoff).
    pub(crate) fn instance_gone(
        &mut self,
        job_id: &str,
        attempt: u32,
        detail: &str,
        now: Timestamp,
    ) {
        if !self.is_current_own(job_id, attempt) {
            return;
        }
        let Some(job) = self.jobs.get(job_id) else {
            return;
        };
        if job
            .local
            .as_ref()
            .is_none_or(|local| local.connected && !local.away)
        {
            return;
        }
        let instance = job.snapshot.instance_id.clone().unwrap_or_default();
        // An adopted attempt's end names the core it came from, as its grace's end does.
        let taken_over = job
            .local
            .as_ref()
            .and_then(|local| local.adopted_from.as_deref())
            .map(|from| format!(" (taken over from core {from})"))
            .unwrap_or_default();
        let message = format!(
            "instance {instance}{taken_over} no longer runs ({detail}): its agent cannot reconnect"
        );
        self.end_attempt(
            job_id,
            AttemptOutcome::Infrastructure {
                kind: InfraKind::InstanceGone,
                message,
            },
            now,
        );
    }

    pub(crate) fn release_lingering_for(&mut self, merge_id: &str) {
        if let Some((from, attempt, instance)) = self.lingering_source_for(merge_id) {
            self.touch(&from);
            if let Some(job) = self.jobs.get_mut(&from) {
                job.lingering = false;
            }
            self.actions.push_back(Action::Terminate {
                job_id: from,
                attempt,
                instance_id: Some(instance),
            });
        }
    }

    /// Finished attempts that kept their instance for a merge, when no pending claim will use
    /// it (the merge was skipped, cancelled or claimed elsewhere): the instance ends now.
    pub(crate) fn end_unwanted_lingering(&mut self) {
        // A lingering job and the merge that may reuse its instance share a run.
        let mut lingering: Vec<(String, String)> = self
            .index
            .lingering
            .iter()
            .filter_map(|run_id| self.runs.get(run_id))
            .flat_map(|run| run.jobs.iter().map(move |id| (run, id)))
            .filter(|(_, id)| self.jobs.get(*id).is_some_and(|job| job.lingering))
            .map(|(run, id)| (run.id.clone(), id.clone()))
            .collect();
        lingering.sort_by(|a, b| a.1.cmp(&b.1));
        for (run_id, id) in lingering {
            let wanted = self.runs[&run_id].jobs.iter().any(|merge_id| {
                self.jobs
                    .get(merge_id)
                    .is_some_and(|merge| merge.claim_pending)
                    && self
                        .lingering_source_for(merge_id)
                        .is_some_and(|(from, _, _)| from == id)
            });
            if wanted {
                continue;
            }
            self.touch(&id);
            if let Some(job) = self.jobs.get_mut(&id) {
                job.lingering = false;
                self.actions.push_back(Action::Terminate {
                    job_id: id.clone(),
                    attempt: job.snapshot.attempt,
                    instance_id: job.snapshot.instance_id.clone(),
                });
            }
        }
    }

    pub(crate) fn ensure_renewal(&mut self, now: Timestamp) {
        if self.next_renewal.is_none() {
            self.next_renewal = Some(now.plus(self.config.lease_duration / 3));
        }
    }

    pub(crate) fn renew_leases(&mut self, now: Timestamp) {
        let live = self.own_live();
        if live.is_empty() {
            self.next_renewal = None;
            return;
        }
        let until = now.plus(self.config.lease_duration);
        for (id, _) in &live {
            if let Some(job) = self.jobs.get_mut(id) {
                job.snapshot.lease_until = Some(until);
            }
        }
        self.actions
            .push_back(Action::Persist(Transition::LeasesRenewed {
                owner: self.config.owner.clone(),
                job_ids: live.into_iter().map(|(id, _)| id).collect(),
                until,
            }));
        self.next_renewal = Some(now.plus(self.config.lease_duration / 3));
    }
}
