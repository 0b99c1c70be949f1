//! Work orders: the BUILD or MERGE frame of an attempt (its image, cache, secrets and
//! registry), its size against the frame limit, and the agent tokens.

use super::*;

/// Past a job's timeout and boot timeout, how much longer its instance may live before the
/// reaper terminates it whatever its attempt says.
pub const LIFETIME_MARGIN: Duration = Duration::from_secs(10 * 60);

pub(super) async fn work_order(
    shared: &Shared,
    job_id: &str,
    run_id: &str,
    attempt: u32,
    adopted: bool,
) -> Result<WorkOrder, String> {
    let (run, job) = read_run_and_job(shared, run_id, job_id).await?;
    build_order(shared, &run, &job, attempt, adopted).await
}

/// The run and job rows, read at once (two connections).
pub(super) async fn read_run_and_job(
    shared: &Shared,
    run_id: &str,
    job_id: &str,
) -> Result<(RunRow, JobRow), String> {
    let db = &shared.db;
    let internal = |error: crate::db::DbError| format!("reading the job failed: {error}");
    let (run, job) = tokio::try_join!(db.run(run_id), db.job(job_id)).map_err(internal)?;
    Ok((
        run.ok_or("the run vanished")?,
        job.ok_or("the job vanished")?,
    ))
}

/// The attempt's BUILD or MERGE from its rows (a merge reads its platform jobs' images).
pub(super) async fn build_order(
    shared: &Shared,
    run: &RunRow,
    job: &JobRow,
    attempt: u32,
    adopted: bool,
) -> Result<WorkOrder, String> {
    let db = &shared.db;
    let internal = |error: crate::db::DbError| format!("reading the job failed: {error}");
    let (run_id, job_id) = (run.id.as_str(), job.id.as_str());
    let spec = &job.spec;
    let secrets = match secrets_for(shared, run, spec) {
        Ok(secrets) => secrets,
        // An adopted attempt's agent already has its work (and masks its secrets itself):
        // the core masks what it knows.
        Err(_) if adopted => RunSecrets {
            clone_token: None,
            build_secrets: shared.settings.build_secrets.clone(),
        },
        Err(message) => return Err(message),
    };
    let merge_sources = match &spec.kind {
        JobKind::Merge { sources } => {
            let jobs = db.jobs_of_run(run_id).await.map_err(internal)?;
            let mut images = Vec::new();
            for source in sources {
                let found = jobs.iter().find(|j| &j.name == source);
                match found.and_then(|j| Some((j.artifact_url.as_ref()?, j.digest.as_ref()?))) {
                    Some((url, digest)) => images.push(format!("{}@{digest}", strip_tag(url))),
                    None => return Err(format!("platform job {source} has no image")),
                }
            }
            Some(images)
        }
        JobKind::Build => None,
    };
    let settings = &shared.settings;
    let mut work = work_message(settings, run, job, spec, merge_sources, &secrets);
    match &mut work {
        Message::Build(build) => build.attempt = Some(attempt),
        Message::Merge(merge) => merge.attempt = Some(attempt),
        _ => {}
    }
    Ok(WorkOrder {
        placement: None,
        job_id: job_id.to_string(),
        attempt,
        work,
        target_image: image_for(settings, run, job, spec),
        handed_over: false,
        adopted,
    })
}

/// The run's secrets: what this core holds for it, else the core's `[secrets]`. A run
/// whose submitted secret values were held by a core that is gone cannot be built.
pub(super) fn secrets_for(
    shared: &Shared,
    run: &RunRow,
    spec: &JobSpec,
) -> Result<RunSecrets, String> {
    let held = shared
        .run_secrets
        .lock()
        .ok()
        .and_then(|all| all.get(&run.id).cloned());
    let secrets = held.unwrap_or_else(|| RunSecrets {
        clone_token: None,
        build_secrets: shared.settings.build_secrets.clone(),
    });
    let missing: Vec<&String> = spec
        .secret_build_args
        .iter()
        .filter(|name| !secrets.build_secrets.contains_key(*name))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "secret build argument(s) {} were submitted with the run and held only in the memory of the core that accepted it, which stopped; submit the run again (or set them in the core's [secrets])",
            missing
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(secrets)
}

pub(super) fn new_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("stg_{}", hex::encode(bytes))
}

/// What the store keeps of an agent token: its SHA-256, hex.
pub(super) fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The image a job pushes: `<registry>/<namespace>/<environment>:<job tag>`.
pub fn image_for(settings: &RunnerSettings, run: &RunRow, job: &JobRow, spec: &JobSpec) -> String {
    let tag = match spec.kind {
        JobKind::Merge { .. } => tag_for(&spec.service),
        JobKind::Build => tag_for(&job.name),
    };
    format!(
        "{}/{}/{}:{}",
        settings.registry.host, settings.registry.namespace, run.environment_id, tag
    )
}

/// The registry layer cache of one job of one repository: keyed by the repository's identity
/// as well as the job's name, so a build reads and writes only its own repository's cache.
pub(super) fn cache_ref(settings: &RunnerSettings, run: &RunRow, job: &JobRow) -> String {
    format!(
        "{}/{}/cache/{}/{}:buildcache",
        settings.registry.host,
        settings.registry.namespace,
        repository_key(&run.repo_url),
        tag_for(&job.name)
    )
}

/// Size of the BUILD or MERGE frame `job` will be sent with `secrets`, counting full digests
/// for a merge's sources: checked when a run is submitted, so a frame too large for the agent
/// connection is refused then, not discovered when it is sent.
pub fn work_frame_bytes(
    settings: &RunnerSettings,
    run: &RunRow,
    job: &JobRow,
    spec: &JobSpec,
    secrets: &RunSecrets,
) -> usize {
    let merge_sources = match &spec.kind {
        JobKind::Merge { sources } => Some(
            sources
                .iter()
                .map(|source| {
                    format!(
                        "{}/{}/{}@sha256:{}",
                        settings.registry.host,
                        settings.registry.namespace,
                        run.environment_id,
                        "0".repeat(64 + source.len())
                    )
                })
                .collect(),
        ),
        JobKind::Build => None,
    };
    stagely_protocol::encode(&work_message(
        settings,
        run,
        job,
        spec,
        merge_sources,
        secrets,
    ))
    .len()
}

pub(super) fn work_message(
    settings: &RunnerSettings,
    run: &RunRow,
    job: &JobRow,
    spec: &JobSpec,
    merge_sources: Option<Vec<String>>,
    run_secrets: &RunSecrets,
) -> Message {
    let registry = RegistryOptions {
        insecure: settings.registry.insecure,
    };
    let target_image = image_for(settings, run, job, spec);
    match merge_sources {
        Some(source_images) => Message::Merge(Merge {
            job_id: job.id.clone(),
            source_images,
            target_image,
            registry_auth: settings.registry.auth.clone(),
            registry,
            timeout_seconds: Some(spec.timeout_seconds),
            attempt: None,
        }),
        None => {
            let cache = settings
                .registry
                .cache
                .then(|| cache_ref(settings, run, job));
            let secrets = spec
                .secret_build_args
                .iter()
                .filter_map(|name| {
                    run_secrets
                        .build_secrets
                        .get(name)
                        .map(|value| (name.clone(), value.clone()))
                })
                .collect();
            Message::Build(Build {
                job_id: job.id.clone(),
                context: SourceContext {
                    repo_url: run.repo_url.clone(),
                    commit_hash: run.commit_hash.clone(),
                    branch: run.branch.clone(),
                    clone_token: run_secrets.clone_token.clone(),
                },
                build_config: BuildConfig {
                    context_path: spec.context_path.clone(),
                    dockerfile: spec.dockerfile.clone(),
                    target_image,
                    platform: job.platform.clone(),
                    build_args: spec.build_args.clone(),
                    cache_from: cache.iter().cloned().collect(),
                    cache_to: cache,
                    timeout_seconds: Some(spec.timeout_seconds),
                    secrets,
                },
                registry_auth: settings.registry.auth.clone(),
                registry,
                attempt: None,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_and_distinct() {
        let a = new_token();
        let b = new_token();
        assert_ne!(a, b);
        assert_eq!(a.len(), 4 + 64);
    }
}
