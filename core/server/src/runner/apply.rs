//! Carrying out the engine's actions: claims, instances, work, stops, and persisting its
//! transitions (a run is stored as finished only once its instances are gone).

use super::*;

impl LoopState {
    /// Applies every action the engine has, in order.
    pub(super) async fn apply(&mut self) {
        while let Some(action) = self.engine.poll_action() {
            self.apply_one(action).await;
        }
    }

    /// Applies one action.
    pub(super) async fn apply_one(&mut self, action: Action) {
        match action {
            Action::Persist(Transition::RunFinished {
                run_id,
                status,
                message,
            }) => self.finish_run(run_id, status, message).await,
            Action::Persist(transition) => self.persist(transition).await,
            Action::Claim {
                claims,
                lease_until,
                max_live_instances,
                max_live_per_environment,
            } => {
                let owner = self.shared.settings.engine.owner.clone();
                // Each attempt's agent token is minted now and bound by the claim itself.
                let (tokens, claims): (Vec<String>, Vec<AttemptClaim>) = claims
                    .into_iter()
                    .map(|claim| {
                        let token = new_token();
                        let token_hash = token_hash(&token);
                        (token, AttemptClaim { claim, token_hash })
                    })
                    .unzip();
                let result = self
                    .shared
                    .db
                    .claim(
                        &owner,
                        &claims,
                        lease_until,
                        max_live_instances,
                        max_live_per_environment,
                        now(),
                    )
                    .await;
                // A won claim moved its job to `provisioning`.
                let moved: Vec<Changed> = match &result {
                    Ok((won, _)) => won.iter().map(|job_id| self.changed_job(job_id)).collect(),
                    Err(_) => Vec::new(),
                };
                self.shared.wrote(moved);
                let (won, lost) = match result {
                    Ok(answer) => answer,
                    Err(error) => {
                        tracing::error!("claiming jobs failed: {error}");
                        (
                            Vec::new(),
                            claims.iter().map(|c| c.claim.job_id.clone()).collect(),
                        )
                    }
                };
                let taken: HashSet<&str> = won.iter().map(String::as_str).collect();
                for (token, AttemptClaim { claim, token_hash }) in tokens.into_iter().zip(claims) {
                    if taken.contains(claim.job_id.as_str()) {
                        if let Ok(mut minted) = self.shared.minted.lock() {
                            minted.insert(token_hash, (claim.job_id.clone(), claim.attempt));
                        }
                        self.tokens.insert((claim.job_id, claim.attempt), token);
                    }
                }
                let reload: Vec<String> = lost.clone();
                self.engine.handle(Event::Claimed { won, lost }, now());
                for job_id in reload {
                    self.reload_job(&job_id).await;
                }
            }
            Action::CreateInstance {
                job_id,
                run_id,
                attempt,
            } => {
                let token = self.tokens.remove(&(job_id.clone(), attempt));
                let handle = self.spawn_provision(job_id.clone(), run_id, attempt, token);
                // A run's end waits for its provider calls too.
                let pending = self.terminating.entry(job_id).or_default();
                pending.retain(|handle| !handle.is_finished());
                pending.push(handle);
            }
            Action::SendWork {
                job_id,
                run_id,
                attempt,
                via,
            } => self.send_work(job_id, run_id, attempt, via).await,
            Action::Release { job_id, attempt } => {
                // Dropping the sender closes the link without ending the attempt; its agent
                // dials again and resumes with whichever core adopts the attempt.
                tracing::info!(
                    job_id,
                    attempt,
                    "handing a running attempt back: its agent resumes with the next core"
                );
                self.links.remove(&(job_id, attempt));
            }
            Action::SendCancel {
                job_id,
                attempt,
                reason,
            } => {
                if let Some(link) = self.links.get(&(job_id, attempt)) {
                    let _ = link.try_send(LinkCommand::Cancel(reason));
                }
            }
            Action::CheckInstance {
                job_id,
                attempt,
                instance_id,
            } => self.spawn_check_instance(job_id, attempt, instance_id),
            Action::Terminate {
                job_id,
                attempt,
                instance_id,
            } => {
                let key = (job_id, attempt);
                self.tokens.remove(&key);
                if let Ok(mut prepared) = self.shared.prepared.lock() {
                    prepared.remove(&key);
                }
                if let Ok(mut minted) = self.shared.minted.lock() {
                    minted.remove(&key);
                }
                // Dropping the sender closes the link. The attempt is over: its token no
                // longer resolves.
                self.links.remove(&key);
                if let Some(socket) = self.idle.remove(&key) {
                    self.spawn_close(socket);
                }
                // The instance the engine knows, and any other recorded for the attempt
                // (one whose creation a killed core never reported).
                let handle = self.spawn_terminate_attempt(key.0.clone(), key.1, instance_id);
                let pending = self.terminating.entry(key.0).or_default();
                pending.retain(|handle| !handle.is_finished());
                pending.push(handle);
            }
        }
    }

    /// Stores a run's end once the terminations of its jobs' instances are done (in a task:
    /// the loop does not wait).
    pub(super) async fn finish_run(
        &mut self,
        run_id: String,
        status: crate::engine::RunStatus,
        message: Option<String>,
    ) {
        // A sync that read the run before its end was stored loads it again and the engine
        // finishes it again: the first finish (waiting for its terminations) writes the end.
        if let Ok(mut finishing) = self.shared.finishing.lock()
            && !finishing.insert(run_id.clone())
        {
            return;
        }
        let db = &self.shared.db;
        let jobs = match crate::db::retry_transient(|| db.jobs_of_run(&run_id)).await {
            Ok(jobs) => jobs,
            Err(error) => {
                // Without its jobs, this finish cannot wait for their instances: it is not
                // stored now; the next sync loads the run again and finishes it then.
                tracing::error!(run_id, "reading a finished run's jobs failed: {error}");
                if let Ok(mut finishing) = self.shared.finishing.lock() {
                    finishing.remove(&run_id);
                }
                return;
            }
        };
        let handles: Vec<_> = jobs
            .iter()
            .filter_map(|job| self.terminating.remove(&job.id))
            .flatten()
            .collect();
        if let Ok(mut all) = self.shared.run_secrets.lock() {
            all.remove(&run_id);
        }
        if let Ok(mut fresh) = self.shared.fresh_rows.lock() {
            for job in &jobs {
                fresh.remove(&job.id);
            }
        }
        let shared = self.shared.clone();
        self.shared.tasks.spawn(async move {
            for handle in handles {
                let _ = handle.await;
            }
            let transition = Transition::RunFinished {
                run_id: run_id.clone(),
                status,
                message: message.clone(),
            };
            let result = shared.db.apply(&transition, now()).await;
            shared.wrote([Changed::Run(run_id.as_str().into())]);
            match result {
                Ok(true) => tracing::info!(
                    run_id,
                    %status,
                    message = message.as_deref().unwrap_or(""),
                    "run finished"
                ),
                Ok(false) => {}
                Err(error) => tracing::error!(run_id, "storing a run's end failed: {error}"),
            }
            if let Ok(mut finishing) = shared.finishing.lock() {
                finishing.remove(&run_id);
            }
        });
    }

    /// The change a write to `job_id` makes, by its run when the engine still knows it.
    pub(super) fn changed_job(&self, job_id: &str) -> Changed {
        match self.engine.run_of(job_id) {
            Some(run_id) => Changed::Run(run_id.into()),
            None => Changed::Any,
        }
    }

    pub(super) async fn persist(&mut self, transition: Transition) {
        let db = &self.shared.db;
        let result = crate::db::retry_transient(|| db.apply(&transition, now())).await;
        let changed = match transition.subject() {
            crate::engine::Subject::Run(run_id) => Some(Changed::Run(run_id.into())),
            crate::engine::Subject::Job(job_id) => Some(self.changed_job(job_id)),
            crate::engine::Subject::Leases => None,
        };
        self.shared.wrote(changed);
        let applied = match result {
            Ok(applied) => applied,
            Err(error) => {
                tracing::error!(?transition, "storing a transition failed: {error}");
                false
            }
        };
        if applied {
            if let Transition::AttemptAdopted {
                job_id,
                attempt,
                from,
                ..
            } = &transition
            {
                tracing::info!(
                    job_id,
                    attempt,
                    from,
                    "adopted a running attempt; waiting for its agent to reconnect"
                );
            }
            // A final job's live log viewers end their streams.
            match &transition {
                Transition::AttemptEnded { job_id, end, .. }
                    if !matches!(end, crate::engine::JobEnd::Requeued { .. }) =>
                {
                    self.shared.link.hub.finished(job_id);
                }
                Transition::JobSkipped { job_id, .. } => self.shared.link.hub.finished(job_id),
                _ => {}
            }
            if let Transition::AttemptEnded {
                job_id,
                attempt,
                takeover: true,
                ..
            } = &transition
            {
                // A dead core's attempt: its instances go now.
                tracing::info!(job_id, attempt, "took over an attempt whose lease expired");
                let handle = self.spawn_terminate_attempt(job_id.clone(), *attempt, None);
                self.terminating
                    .entry(job_id.clone())
                    .or_default()
                    .push(handle);
            }
            return;
        }
        if let Transition::AttemptEnded {
            job_id,
            attempt,
            takeover: true,
            ..
        } = &transition
        {
            // Not written: the owner renewed (it lives), or the attempt already ended (another
            // replica took it, or this write landed and its reply was lost). In the latter
            // cases its instances must still go.
            let shared = self.shared.clone();
            let (job, number) = (job_id.clone(), *attempt);
            let handle = self.shared.tasks.spawn(async move {
                let db = &shared.db;
                let holds = crate::db::retry_transient(|| db.attempt_holds(&job, number, now()));
                if let Ok(false) = holds.await {
                    terminate_attempt(&shared, &job, number, None).await;
                }
            });
            self.terminating
                .entry(job_id.clone())
                .or_default()
                .push(handle);
        }
        // The row moved (another replica, a cancel elsewhere): load the truth.
        match &transition {
            Transition::RunStarted { run_id } | Transition::RunCancelRequested { run_id, .. } => {
                let run_id = run_id.clone();
                self.reload(&run_id).await;
            }
            Transition::RunFinished { .. } | Transition::AttemptReleased { .. } => {}
            Transition::AttemptAdopted {
                job_id, attempt, ..
            } => {
                // Its owner lives after all, or another replica adopted it first.
                let (job_id, attempt) = (job_id.clone(), *attempt);
                self.engine.handle(
                    Event::AdoptionRefused {
                        job_id: job_id.clone(),
                        attempt,
                    },
                    now(),
                );
                self.reload_job(&job_id).await;
            }
            Transition::JobSkipped { job_id, .. }
            | Transition::InstanceStarted { job_id, .. }
            | Transition::JobRunning { job_id, .. }
            | Transition::AttemptEnded { job_id, .. } => {
                let job_id = job_id.clone();
                tracing::warn!(job_id, "a guarded write found the job changed; reloading");
                self.reload_job(&job_id).await;
            }
            Transition::LeasesRenewed { .. } => self.sync().await,
        }
    }
}
