//! Provisioning: creating an attempt's instance with its user-data (and recording it before
//! anything else can lose it), and terminating instances.

use super::*;

/// Creates the attempt's instance for its agent `token` (bound to the attempt by the claim;
/// without one, a fresh token is minted and bound here).
pub(super) async fn provision(
    shared: &Shared,
    job_id: &str,
    run_id: &str,
    attempt: u32,
    token: Option<String>,
) -> Result<String, ProvisionFailure> {
    let result = create_for_attempt(shared, job_id, run_id, attempt, token).await;
    if result.is_err()
        && let Ok(mut prepared) = shared.prepared.lock()
    {
        // Its work will not be sent (the end of the attempt may have come before the frame
        // was built).
        prepared.remove(&(job_id.to_string(), attempt));
    }
    result
}

/// Why an attempt got no instance; `retryable`: another attempt may succeed.
#[derive(Debug)]
pub(super) struct ProvisionFailure {
    pub(super) message: String,
    pub(super) retryable: bool,
}

/// Failures of the core's own steps (reads, rendering) may pass.
impl From<String> for ProvisionFailure {
    fn from(message: String) -> ProvisionFailure {
        ProvisionFailure {
            message,
            retryable: true,
        }
    }
}

impl From<&str> for ProvisionFailure {
    fn from(message: &str) -> ProvisionFailure {
        ProvisionFailure::from(message.to_string())
    }
}

/// [`provision`] without its clean-up.
pub(super) async fn create_for_attempt(
    shared: &Shared,
    job_id: &str,
    run_id: &str,
    attempt: u32,
    token: Option<String>,
) -> Result<String, ProvisionFailure> {
    let db = &shared.db;
    let fresh = shared
        .fresh_rows
        .lock()
        .ok()
        .and_then(|mut fresh| fresh.remove(job_id));
    let (run, job) = match fresh {
        Some((run, job)) => (Arc::unwrap_or_clone(run), job),
        None => read_run_and_job(shared, run_id, job_id).await?,
    };
    // The work frame is built before the instance is asked for, so its agent gets it the
    // moment it connects (a failure here is met again, and reported, when the work is sent).
    if let Ok(order) = build_order(shared, &run, &job, attempt, false).await
        && let Ok(mut prepared) = shared.prepared.lock()
    {
        prepared.insert((job_id.to_string(), attempt), Box::new(order));
    }
    let token = match token {
        Some(token) => token,
        None => {
            let token = new_token();
            if !db
                .set_attempt_token(job_id, attempt, &token_hash(&token))
                .await
                .map_err(|error| format!("storing the agent token failed: {error}"))?
            {
                return Err("the attempt ended before its instance was created".into());
            }
            token
        }
    };
    let arch = match job.architecture.as_str() {
        "arm64" => stagely_protocol::Arch::Arm64,
        "amd64" => stagely_protocol::Arch::Amd64,
        // A merge runs anywhere; the seed picks a small VM of any arch.
        _ => stagely_protocol::Arch::from_rust_arch(std::env::consts::ARCH)
            .unwrap_or(stagely_protocol::Arch::Amd64),
    };
    let settings = &shared.settings;
    let hints = shared.provider.agent_hints();
    let user_data = stagely_cloud_init::render_user_data(&Bootstrap {
        agent: AgentConfig {
            allow_local_repos: settings.allow_local_repos,
            core_unreachable_secs: hints.core_unreachable_secs,
            metadata_url: hints.metadata_url,
            reconnect_grace_secs: Some(settings.engine.reconnect_grace.as_secs()),
            ..AgentConfig::new(settings.public_url.clone(), token)
        },
        ca_pem: settings.agent_ca_pem.clone(),
    })
    .map_err(|error| format!("rendering user-data failed: {error}"))?;
    let spec = MachineSpec {
        size: MachineSize::parse(&job.machine).unwrap_or(MachineSize::Medium),
        arch,
        user_data,
        tags: BTreeMap::from([
            ("stagely:core".to_string(), settings.core_id.clone()),
            (
                "stagely:deployment".to_string(),
                settings.deployment_id.clone(),
            ),
            ("stagely:run".to_string(), run_id.to_string()),
            ("stagely:job".to_string(), job_id.to_string()),
            ("stagely:attempt".to_string(), attempt.to_string()),
        ]),
        // A job the cloud took a spot instance from is never placed on spot again.
        on_demand_only: attempt > 1
            && crate::db::retry_transient(|| db.spot_interrupted_before(job_id))
                .await
                .map_err(|error| format!("reading the job's attempts failed: {error}"))?,
    };
    // Never abandon a create call half-way: the provider may already have started the
    // instance, and only a returned id lets us terminate it.
    let instance = shared
        .provider
        .create_instance(&spec)
        .await
        .map_err(|error| ProvisionFailure {
            message: format!(
                "provisioning a {} {} instance failed: {error}",
                job.machine, arch
            ),
            retryable: error.is_retryable(),
        })?;
    if let Some(notice) = &instance.notice {
        tracing::warn!(instance_id = %instance.id, "{notice}");
        // The job log says it first (the prepared work order carries it to the link).
        if let Ok(mut prepared) = shared.prepared.lock()
            && let Some(order) = prepared.get_mut(&(job_id.to_string(), attempt))
        {
            order.placement = Some(notice.clone());
        }
    }
    let timeout = Duration::from_secs(job.spec.timeout_seconds);
    let expires_at = now().plus(timeout + settings.engine.boot_timeout + LIFETIME_MARGIN);
    let record = crate::db::InstanceRecord {
        instance_id: &instance.id,
        provider: shared.provider.name(),
        job_id,
        attempt,
        owner: &settings.engine.owner,
        instance_type: &instance.instance_type,
        market: instance.market.map(|market| market.as_str()),
        placement: instance.notice.as_deref(),
        expires_at,
    };
    let recorded = crate::db::retry_transient(|| db.record_instance(&record, now())).await;
    if let Err(error) = recorded {
        tracing::error!(instance_id = %instance.id, "recording the instance failed: {error}");
    }
    // Ended while the provider worked (a cancel, fail-fast): its end found no instance to
    // terminate, so this one goes now (and its run's end waits for this task).
    let holds = crate::db::retry_transient(|| db.attempt_holds(job_id, attempt, now())).await;
    if let Ok(false) = holds {
        terminate(shared, &instance.id).await;
        return Err("the attempt ended while its instance was being created".into());
    }
    tracing::info!(instance_id = %instance.id, emulated = instance.emulated, "instance created");
    Ok(instance.id)
}

/// Terminates `instance_id` (the one the engine knows) and every other instance recorded for
/// the attempt (one whose creation a killed core never reported).
pub(super) async fn terminate_attempt(
    shared: &Shared,
    job_id: &str,
    attempt: u32,
    instance_id: Option<String>,
) {
    let mut instances: Vec<String> = instance_id.into_iter().collect();
    let db = &shared.db;
    match crate::db::retry_transient(|| db.instances_of_attempt(job_id, attempt)).await {
        Ok(recorded) => {
            for id in recorded {
                if !instances.contains(&id) {
                    instances.push(id);
                }
            }
        }
        Err(error) => tracing::error!(job_id, "listing an attempt's instances failed: {error}"),
    }
    for instance_id in instances {
        terminate(shared, &instance_id).await;
    }
}

/// Terminates an instance (idempotent), retrying a few times; the reaper retries later.
pub(super) async fn terminate(shared: &Shared, instance_id: &str) {
    for attempt in 1..=3u32 {
        match shared.provider.terminate_instance(instance_id).await {
            Ok(()) => {
                if let Err(error) = shared.db.mark_instance_terminated(instance_id, now()).await {
                    tracing::error!(instance_id, "instance terminated but not recorded: {error}");
                }
                return;
            }
            Err(error) => {
                tracing::warn!(instance_id, attempt, "terminating instance failed: {error}");
                tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
            }
        }
    }
    tracing::error!(
        instance_id,
        "instance could not be terminated; the reaper will retry"
    );
}
