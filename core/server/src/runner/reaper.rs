//! The reaper's sweep: reads the facts, asks `stagely_engine::reaper::plan` what to
//! terminate (and why), terminates it, and counts what it did.

use super::*;

impl LoopState {
    pub(super) fn spawn_reaper(&self) {
        let shared = self.shared.clone();
        self.shared.tasks.spawn(async move {
            let reap = async {
                shared.reaper.sweeps.fetch_add(1, Ordering::Relaxed);
                let (recorded, attempts) = shared.db.reap_facts().await?;
                let doomed = stagely_engine::reaper::plan(
                    &recorded,
                    &attempts,
                    now(),
                    shared.settings.engine.reconnect_grace,
                );
                for (instance_id, reason) in doomed {
                    tracing::info!(instance_id, reason = reason.as_str(), "reaper: terminating an instance");
                    shared.reaper.count(reason);
                    terminate(&shared, &instance_id).await;
                }
                // Instances the provider has for this deployment (any of its cores) but the
                // store does not list as live: a core that died between create and record
                // leaves these behind, and it may never start again. One whose attempt still
                // holds its lease may be mid-record (by its core, alive) and is left alone.
                // Only this deployment's: other deployments may share the account. Instances
                // launched before deployment tags existed are found by this core's id.
                let known: std::collections::HashSet<String> =
                    shared.db.live_instances().await?.into_iter().collect();
                let scopes = [
                    ("stagely:deployment", &shared.settings.deployment_id),
                    ("stagely:core", &shared.settings.core_id),
                ];
                let mut instances = Vec::new();
                for (key, value) in scopes {
                    let tags = BTreeMap::from([(key.to_string(), value.clone())]);
                    match shared.provider.list_instances(&tags).await {
                        Ok(listed) => instances.extend(listed),
                        Err(error) => {
                            shared.reaper.list_failures.fetch_add(1, Ordering::Relaxed);
                            tracing::error!("reaper: listing instances by {key} failed: {error}");
                        }
                    }
                }
                let mut seen = std::collections::HashSet::new();
                for instance in instances {
                    let other_deployment = instance
                        .tags
                        .get("stagely:deployment")
                        .is_some_and(|id| *id != shared.settings.deployment_id);
                    if known.contains(&instance.id)
                        || other_deployment
                        || !seen.insert(instance.id.clone())
                    {
                        continue;
                    }
                    let job = instance.tags.get("stagely:job");
                    let attempt = instance
                        .tags
                        .get("stagely:attempt")
                        .and_then(|a| a.parse::<u32>().ok());
                    if let (Some(job), Some(attempt)) = (job, attempt) {
                        if shared.db.attempt_holds(job, attempt, now()).await? {
                            continue;
                        }
                        let record = crate::db::InstanceRecord {
                            instance_id: &instance.id,
                            provider: shared.provider.name(),
                            job_id: job,
                            attempt,
                            // The core that launched it (maybe another replica).
                            owner: instance
                                .tags
                                .get("stagely:core")
                                .unwrap_or(&shared.settings.core_id),
                            instance_type: &instance.instance_type,
                            market: instance.market.map(|market| market.as_str()),
                            placement: None,
                            expires_at: now(),
                        };
                        // Recorded so its attempt's billing closes; a job this store no
                        // longer has cannot be, and the instance goes all the same.
                        if let Err(error) = shared.db.record_instance(&record, now()).await {
                            tracing::warn!(instance_id = %instance.id, "reaper: recording an unknown instance failed: {error}");
                        }
                    }
                    tracing::info!(instance_id = %instance.id, reason = "unrecorded", "reaper: terminating an instance");
                    shared.reaper.unrecorded.fetch_add(1, Ordering::Relaxed);
                    terminate(&shared, &instance.id).await;
                }
                Ok::<(), crate::db::DbError>(())
            };
            tokio::select! {
                result = reap => if let Err(error) = result {
                    tracing::error!("reaper: sweep failed: {error}");
                },
                () = shared.shutdown.cancelled() => {}
            }
        });
    }
}

/// What the reaper did since the core started (logged too, line by line).
#[derive(Debug, Default)]
pub struct ReaperStats {
    pub sweeps: AtomicU64,
    pub attempt_ended: AtomicU64,
    pub lease_expired: AtomicU64,
    pub no_attempt: AtomicU64,
    pub lifetime: AtomicU64,
    /// Listed by the provider for this core id, unknown to the store.
    pub unrecorded: AtomicU64,
    pub list_failures: AtomicU64,
}

impl ReaperStats {
    fn count(&self, reason: crate::db::ReapReason) {
        use crate::db::ReapReason;
        let counter = match reason {
            ReapReason::AttemptEnded => &self.attempt_ended,
            ReapReason::LeaseExpired => &self.lease_expired,
            ReapReason::NoAttempt => &self.no_attempt,
            ReapReason::Lifetime => &self.lifetime,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Instances terminated by the reaper, every reason together.
    pub fn terminated(&self) -> u64 {
        [
            &self.attempt_ended,
            &self.lease_expired,
            &self.no_attempt,
            &self.lifetime,
            &self.unrecorded,
        ]
        .iter()
        .map(|counter| counter.load(Ordering::Relaxed))
        .sum()
    }
}
