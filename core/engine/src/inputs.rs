//! What each command and event does to the engine's view: loading and unloading runs,
//! draining, claims won and lost, instances created, agents connected, handovers.

use super::*;

impl Engine {
    /// Loads a stored run into the view; whether that changed the view.
    pub(crate) fn load(&mut self, snapshot: RunSnapshot, now: Timestamp) -> bool {
        if snapshot.status.is_final() {
            let known = self.runs.contains_key(&snapshot.id);
            self.unload(&snapshot.id);
            return known;
        }
        let mut changed = false;
        let job_ids: Vec<String> = snapshot.jobs.iter().map(|job| job.id.clone()).collect();
        for (ordinal, fresh) in snapshot.jobs.into_iter().enumerate() {
            let taken_over = self.takes_over_at_start(&fresh);
            match self.jobs.get_mut(&fresh.id) {
                // Attempt numbers only grow in the store: a snapshot behind this view (read
                // before this core's claim) is old news about the job, not a change.
                Some(known) if fresh.attempt < known.snapshot.attempt => {}
                Some(known) => {
                    let same = known.snapshot.status == fresh.status
                        && known.snapshot.attempt == fresh.attempt
                        && known.snapshot.lease_owner == fresh.lease_owner;
                    if known.local.is_some() && !same {
                        changed = true;
                        // Someone else moved our attempt (a replica took the lease over):
                        // stop our side of it.
                        let action = Action::Terminate {
                            job_id: fresh.id.clone(),
                            attempt: known.snapshot.attempt,
                            instance_id: known.snapshot.instance_id.clone(),
                        };
                        known.local = None;
                        self.actions.push_back(action);
                    }
                    if known.local.is_some() {
                        // Ours and unchanged: keep our timers and instance.
                        changed |= known.snapshot.not_before != fresh.not_before;
                        known.snapshot.not_before = fresh.not_before;
                    } else if !known.claim_pending && known.snapshot != fresh {
                        changed = true;
                        known.snapshot = fresh;
                    }
                }
                None => {
                    changed = true;
                    self.jobs.insert(
                        fresh.id.clone(),
                        Job {
                            snapshot: fresh,
                            run_id: snapshot.id.clone(),
                            ordinal,
                            claim_pending: false,
                            claim_blocked_until: None,
                            local: None,
                            lingering: false,
                        },
                    );
                }
            }
            if taken_over {
                // An earlier incarnation of this core held it: that process is gone.
                let id = &job_ids[ordinal];
                if let Some(job) = self.jobs.get_mut(id) {
                    changed |= job.snapshot.lease_until != Some(now);
                    job.snapshot.lease_until = Some(now);
                }
            }
        }
        changed |= !self.runs.contains_key(&snapshot.id);
        let run = self.runs.entry(snapshot.id.clone()).or_insert_with(|| Run {
            id: snapshot.id.clone(),
            environment_id: snapshot.environment_id.clone(),
            status: snapshot.status,
            fail_fast: snapshot.fail_fast,
            created_at: snapshot.created_at,
            cancel: None,
            jobs: job_ids.clone(),
        });
        // Run statuses only move forward: a `pending` snapshot of a run this view already
        // started (its creation, read before the start was stored) changes nothing.
        if snapshot.status != RunStatus::Pending {
            changed |= run.status != snapshot.status;
            run.status = snapshot.status;
        }
        if snapshot.cancel.is_some() {
            changed |= run.cancel != snapshot.cancel;
            run.cancel = snapshot.cancel;
        }
        // A job the store no longer lists for the run leaves the view with it, so no job is
        // ever kept without its run.
        let dropped: Vec<String> = run
            .jobs
            .iter()
            .filter(|id| !job_ids.contains(id))
            .cloned()
            .collect();
        changed |= run.jobs != job_ids;
        run.jobs = job_ids;
        for id in dropped {
            self.jobs.remove(&id);
        }
        if run.status == RunStatus::Pending {
            changed = true;
            run.status = RunStatus::Building;
            if !self.started.contains(&snapshot.id) {
                self.started.push(snapshot.id);
            }
        }
        changed
    }

    pub(crate) fn takes_over_at_start(&self, job: &JobSnapshot) -> bool {
        job.status.is_live()
            && self
                .jobs
                .get(&job.id)
                .is_none_or(|known| known.local.is_none())
            && job
                .lease_owner
                .as_deref()
                .is_some_and(|owner| self.config.is_predecessor(owner))
    }

    pub(crate) fn unload(&mut self, run_id: &str) {
        self.changed.insert(run_id.to_string());
        if let Some(run) = self.runs.remove(run_id) {
            for id in run.jobs {
                if let Some(job) = self.jobs.remove(&id)
                    && job.local.is_some()
                {
                    self.actions.push_back(Action::Terminate {
                        job_id: id,
                        attempt: job.snapshot.attempt,
                        instance_id: job.snapshot.instance_id,
                    });
                }
            }
        }
    }

    pub(crate) fn drain(&mut self, now: Timestamp) {
        self.draining = true;
        for (job_id, attempt) in self.own_live() {
            // A running build goes on: its lease is handed back, its agent dials another
            // core (or this one's next incarnation), which adopts the attempt.
            let running = self.jobs.get(&job_id).is_some_and(|job| {
                job.snapshot.status == JobStatus::Running
                    && job
                        .local
                        .as_ref()
                        .is_some_and(|local| local.connected && local.reused_from.is_none())
            });
            if running {
                self.touch(&job_id);
                if let Some(job) = self.jobs.get_mut(&job_id) {
                    job.local = None;
                    job.snapshot.lease_until = Some(now);
                }
                self.actions.extend([
                    Action::Release {
                        job_id: job_id.clone(),
                        attempt,
                    },
                    Action::Persist(Transition::AttemptReleased {
                        job_id,
                        attempt,
                        owner: self.config.owner.clone(),
                    }),
                ]);
                continue;
            }
            self.end_attempt(
                &job_id,
                AttemptOutcome::Infrastructure {
                    kind: InfraKind::CoreShutdown,
                    message: "the core holding this job shut down; another core takes it over"
                        .into(),
                },
                now,
            );
        }
    }

    pub(crate) fn claimed(&mut self, won: Vec<String>, lost: Vec<String>, now: Timestamp) {
        for id in lost {
            if let Some(job) = self.jobs.get_mut(&id) {
                job.claim_pending = false;
                job.claim_blocked_until = Some(now.plus(CLAIM_RETRY));
                // If it was to reuse a lingering instance, that instance now ends.
                self.release_lingering_for(&id);
            }
        }
        for id in won {
            let Some(job) = self.jobs.get_mut(&id) else {
                continue;
            };
            if !job.claim_pending {
                continue;
            }
            job.claim_pending = false;
            job.snapshot.status = JobStatus::Provisioning;
            job.snapshot.attempt += 1;
            job.snapshot.lease_owner = Some(self.config.owner.clone());
            job.snapshot.lease_until = Some(now.plus(self.config.lease_duration));
            job.snapshot.not_before = None;
            job.snapshot.instance_id = None;
            let attempt = job.snapshot.attempt;
            let run_id = job.run_id.clone();
            let reuse = self.lingering_source_for(&id);
            let Some(job) = self.jobs.get_mut(&id) else {
                continue;
            };
            let mut local = Local::default();
            match reuse {
                Some((from_job, from_attempt, instance_id)) => {
                    local.connected = true;
                    local.reused_from = Some((from_job.clone(), from_attempt));
                    local.deadline = Some(now.plus(job.snapshot.timeout));
                    job.snapshot.instance_id = Some(instance_id.clone());
                    job.snapshot.status = JobStatus::Running;
                    job.local = Some(local);
                    if let Some(from) = self.jobs.get_mut(&from_job) {
                        from.lingering = false;
                    }
                    self.actions.extend([
                        Action::Persist(Transition::InstanceStarted {
                            job_id: id.clone(),
                            attempt,
                            instance_id,
                            merge_path: Some(MergePath::LastBuilder),
                        }),
                        Action::Persist(Transition::JobRunning {
                            job_id: id.clone(),
                            attempt,
                        }),
                        Action::SendWork {
                            job_id: id,
                            run_id,
                            attempt,
                            via: Via::AgentOf {
                                job_id: from_job,
                                attempt: from_attempt,
                            },
                        },
                    ]);
                }
                None => {
                    job.local = Some(local);
                    self.actions.push_back(Action::CreateInstance {
                        job_id: id,
                        run_id,
                        attempt,
                    });
                }
            }
            self.ensure_renewal(now);
        }
    }

    pub(crate) fn instance_created(
        &mut self,
        job_id: &str,
        attempt: u32,
        instance_id: String,
        now: Timestamp,
    ) {
        if !self.is_current_own(job_id, attempt) {
            // The attempt ended while the instance was being created: it must not outlive it.
            self.actions.push_back(Action::Terminate {
                job_id: job_id.into(),
                attempt,
                instance_id: Some(instance_id),
            });
            return;
        }
        let boot_timeout = self.config.boot_timeout;
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        let merge_path =
            matches!(job.snapshot.kind, JobKind::Merge { .. }).then_some(MergePath::FreshInstance);
        job.snapshot.instance_id = Some(instance_id.clone());
        if let Some(local) = job.local.as_mut() {
            local.boot_deadline = Some(now.plus(boot_timeout));
        }
        self.actions
            .push_back(Action::Persist(Transition::InstanceStarted {
                job_id: job_id.into(),
                attempt,
                instance_id,
                merge_path,
            }));
        // A cancel that arrived while the instance was being created takes effect now.
        if let Some(reason) = self
            .runs
            .get(&self.jobs[job_id].run_id)
            .and_then(|r| r.cancel.clone())
        {
            self.stop(job_id, Stop::Cancel(reason), now);
        }
    }

    pub(crate) fn agent_connected(&mut self, job_id: &str, attempt: u32, now: Timestamp) {
        if !self.is_current_own(job_id, attempt) {
            self.actions.push_back(Action::Terminate {
                job_id: job_id.into(),
                attempt,
                instance_id: None,
            });
            return;
        }
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        let Some(local) = job.local.as_mut() else {
            return;
        };
        if local.connected {
            return;
        }
        // The timeout runs from the attempt's first connection: an adopted attempt's agent
        // resuming here keeps the time it has used already.
        let since = match (&local.adopted_from, job.snapshot.attempt_connected_at) {
            (Some(_), Some(first)) if first < now => first,
            _ => now,
        };
        let deadline = since.plus(job.snapshot.timeout);
        local.connected = true;
        local.boot_deadline = None;
        local.next_liveness_check = None;
        local.deadline = Some(deadline);
        if local.adopted_from.is_some() {
            // Already `running` in the store: the link resumes the agent's job.
            let run_id = job.run_id.clone();
            self.actions.push_back(Action::SendWork {
                job_id: job_id.into(),
                run_id,
                attempt,
                via: Via::Adopted,
            });
            return;
        }
        job.snapshot.status = JobStatus::Running;
        let run_id = job.run_id.clone();
        // The work goes first: the claim already made the attempt this core's, so the agent
        // need not wait for `running` to be stored (a failed guarded write reloads the job,
        // and an attempt that is no longer ours is stopped as always).
        self.actions.extend([
            Action::SendWork {
                job_id: job_id.into(),
                run_id,
                attempt,
                via: Via::OwnAgent,
            },
            Action::Persist(Transition::JobRunning {
                job_id: job_id.into(),
                attempt,
            }),
        ]);
    }

    pub(crate) fn handover_failed(&mut self, job_id: &str, attempt: u32) {
        if !self.is_current_own(job_id, attempt) {
            return;
        }
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        let Some(local) = job.local.as_mut() else {
            return;
        };
        let Some((from_job, from_attempt)) = local.reused_from.take() else {
            return;
        };
        // The last builder's agent was gone: a fresh instance for the same attempt. The job
        // stays `running` (as stored); only the agent is awaited again.
        local.deadline = None;
        local.connected = false;
        let old_instance = job.snapshot.instance_id.take();
        let run_id = job.run_id.clone();
        self.actions.extend([
            Action::Terminate {
                job_id: from_job,
                attempt: from_attempt,
                instance_id: old_instance,
            },
            Action::CreateInstance {
                job_id: job_id.into(),
                run_id,
                attempt,
            },
        ]);
    }

    // ---- rules ----

    /// The run of a job in view (`None` once its run finished or when it is not loaded).
    pub fn run_of(&self, job_id: &str) -> Option<&str> {
        self.jobs.get(job_id).map(|job| job.run_id.as_str())
    }

    /// Whether this core holds `attempt` and has no agent on it yet: a fresh attempt booting,
    /// or one adopted from a stopped core whose agent is to reconnect.
    pub fn awaits_agent(&self, job_id: &str, attempt: u32) -> bool {
        self.jobs.get(job_id).is_some_and(|job| {
            job.snapshot.attempt == attempt
                && job.local.as_ref().is_some_and(|local| !local.connected)
        })
    }
}
