//! Every engine rule, driven by hand with a fake clock and an in-memory store that applies
//! the engine's transitions with the same guards as the real one; then property tests that
//! random event orders never reach an illegal state, never dispatch an attempt twice and
//! never lose a job.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use proptest::prelude::*;

use super::*;

const OWNER: &str = "core-a/1";

fn config() -> EngineConfig {
    let mut config = EngineConfig::with_owner("core-a", OWNER);
    config.max_live_instances = 50;
    config.max_live_per_environment = 20;
    config.retry_backoff = Duration::from_secs(5);
    config
}

fn build(id: &str) -> JobSnapshot {
    JobSnapshot {
        id: id.into(),
        name: id.into(),
        kind: JobKind::Build,
        status: JobStatus::Queued,
        attempt: 0,
        infra_failures: 0,
        lease_owner: None,
        lease_until: None,
        not_before: None,
        timeout: Duration::from_secs(1800),
        instance_id: None,
        attempt_connected_at: None,
    }
}

fn merge(id: &str, sources: &[&str]) -> JobSnapshot {
    JobSnapshot {
        kind: JobKind::Merge {
            sources: sources.iter().map(|s| s.to_string()).collect(),
        },
        ..build(id)
    }
}

fn run(id: &str, env: &str, created: i64, jobs: Vec<JobSnapshot>) -> RunSnapshot {
    RunSnapshot {
        id: id.into(),
        environment_id: env.into(),
        status: RunStatus::Pending,
        fail_fast: true,
        created_at: Timestamp(created),
        cancel: None,
        jobs,
    }
}

/// What the in-memory store holds per job.
#[derive(Debug, Clone)]
struct StoredJob {
    run: String,
    kind: JobKind,
    status: JobStatus,
    attempt: u32,
    owner: Option<String>,
    end: Option<JobEnd>,
    /// The message the last attempt ended with.
    attempt_message: Option<String>,
}

/// An engine wired to an in-memory store; records every I/O action.
struct World {
    engine: Engine,
    now: Timestamp,
    jobs: BTreeMap<String, StoredJob>,
    runs: BTreeMap<String, (RunStatus, Option<CancelReason>, Option<String>)>,
    /// (job, attempt) → how many CreateInstance / SendWork actions it got.
    created: HashMap<(String, u32), u32>,
    sent: HashMap<(String, u32), Vec<Via>>,
    cancels: Vec<(String, u32)>,
    terminated: Vec<(String, u32, Option<String>)>,
    /// Attempts handed back (shutdown) without ending.
    released: Vec<(String, u32)>,
    /// CheckInstance actions: (job, attempt, instance, when).
    checked: Vec<(String, u32, String, Timestamp)>,
    claims_seen: Vec<Vec<Claim>>,
    /// Claims the store refuses (another replica won them).
    refuse: BTreeSet<String>,
    violations: Vec<String>,
    next_instance: u32,
    auto_create: bool,
    /// Runs as submitted, to build store snapshots from.
    submitted: HashMap<String, RunSnapshot>,
    /// The instance created for each attempt (the runner's `builder_instances`).
    instances: HashMap<(String, u32), String>,
}

impl World {
    fn new(config: EngineConfig) -> World {
        World {
            engine: Engine::new(config),
            now: Timestamp(1_000_000),
            jobs: BTreeMap::new(),
            runs: BTreeMap::new(),
            created: HashMap::new(),
            sent: HashMap::new(),
            cancels: Vec::new(),
            terminated: Vec::new(),
            released: Vec::new(),
            checked: Vec::new(),
            claims_seen: Vec::new(),
            refuse: BTreeSet::new(),
            violations: Vec::new(),
            next_instance: 0,
            auto_create: false,
            submitted: HashMap::new(),
            instances: HashMap::new(),
        }
    }

    fn submit(&mut self, snapshot: RunSnapshot) {
        self.submitted.insert(snapshot.id.clone(), snapshot.clone());
        self.runs
            .insert(snapshot.id.clone(), (snapshot.status, None, None));
        for job in &snapshot.jobs {
            self.jobs.insert(
                job.id.clone(),
                StoredJob {
                    run: snapshot.id.clone(),
                    kind: job.kind.clone(),
                    status: job.status,
                    attempt: job.attempt,
                    owner: job.lease_owner.clone(),
                    end: None,
                    attempt_message: None,
                },
            );
        }
        self.input(Event::Load(snapshot));
    }

    fn check_orphans(&mut self) {
        let orphans = self.engine.orphan_jobs();
        if !orphans.is_empty() {
            self.violations
                .push(format!("jobs without their run: {orphans:?}"));
        }
    }

    fn input(&mut self, input: Event) {
        if let Event::InstanceCreated {
            job_id,
            attempt,
            instance_id,
        } = &input
        {
            self.instances
                .insert((job_id.clone(), *attempt), instance_id.clone());
        }
        self.engine.handle(input, self.now);
        self.pump();
    }

    fn advance(&mut self, by: Duration) {
        self.now = self.now.plus(by);
        self.engine.handle_timeout(self.now);
        self.pump();
    }

    /// Advances to the engine's next timeout.
    fn advance_to_timeout(&mut self) -> bool {
        match self.engine.poll_timeout() {
            Some(at) => {
                self.now = self.now.max(at);
                self.engine.handle_timeout(self.now);
                self.pump();
                true
            }
            None => false,
        }
    }

    fn status(&self, job: &str) -> JobStatus {
        self.jobs[job].status
    }

    fn run_status(&self, run: &str) -> RunStatus {
        self.runs[run].0
    }

    fn set_status(&mut self, job: &str, next: JobStatus, context: &str) {
        let stored = self.jobs.get_mut(job).expect("known job");
        if !stored.status.may_become(next) {
            self.violations
                .push(format!("{context}: {job} {} -> {next}", stored.status));
        }
        stored.status = next;
    }

    fn pump(&mut self) {
        self.check_orphans();
        while let Some(action) = self.engine.poll_action() {
            match action {
                Action::Persist(transition) => self.persist(transition),
                Action::Claim {
                    claims,
                    max_live_instances,
                    ..
                } => {
                    self.claims_seen.push(claims.clone());
                    let mut won = Vec::new();
                    let mut lost = Vec::new();
                    for claim in claims {
                        let stored = &self.jobs[&claim.job_id];
                        let live = self.jobs.values().filter(|j| j.status.is_live()).count();
                        if self.refuse.contains(&claim.job_id)
                            || stored.status != JobStatus::Queued
                            || stored.attempt != claim.expected_attempt
                            || (!claim.reuses_instance && live >= max_live_instances)
                        {
                            lost.push(claim.job_id);
                            continue;
                        }
                        self.set_status(&claim.job_id, JobStatus::Provisioning, "claim");
                        let stored = self.jobs.get_mut(&claim.job_id).expect("known");
                        stored.attempt = claim.attempt;
                        stored.owner = Some(OWNER.into());
                        won.push(claim.job_id);
                    }
                    let reload: BTreeSet<String> =
                        lost.iter().map(|id| self.jobs[id].run.clone()).collect();
                    self.engine.handle(Event::Claimed { won, lost }, self.now);
                    // As the runner does: a lost claim means the view is stale.
                    for run_id in reload {
                        if let Some(snapshot) = self.stored_snapshot(&run_id) {
                            self.engine.handle(Event::Load(snapshot), self.now);
                        }
                    }
                }
                Action::CreateInstance {
                    job_id, attempt, ..
                } => {
                    *self.created.entry((job_id.clone(), attempt)).or_default() += 1;
                    if self.auto_create {
                        let instance_id = self.new_instance();
                        self.instances
                            .insert((job_id.clone(), attempt), instance_id.clone());
                        self.engine.handle(
                            Event::InstanceCreated {
                                job_id,
                                attempt,
                                instance_id,
                            },
                            self.now,
                        );
                    }
                }
                Action::SendWork {
                    job_id,
                    attempt,
                    via,
                    ..
                } => {
                    if let JobKind::Merge { sources } = &self.jobs[&job_id].kind {
                        let run = &self.jobs[&job_id].run;
                        let open: Vec<&String> = self
                            .jobs
                            .iter()
                            .filter(|(id, j)| {
                                j.run == *run
                                    && sources.contains(id)
                                    && j.status != JobStatus::Completed
                            })
                            .map(|(id, _)| id)
                            .collect();
                        if !open.is_empty() {
                            self.violations
                                .push(format!("merge {job_id} sent before {open:?} completed"));
                        }
                    }
                    self.sent.entry((job_id, attempt)).or_default().push(via);
                }
                Action::SendCancel {
                    job_id, attempt, ..
                } => {
                    self.cancels.push((job_id, attempt));
                }
                Action::Terminate {
                    job_id,
                    attempt,
                    instance_id,
                } => self.terminated.push((job_id, attempt, instance_id)),
                Action::Release { job_id, attempt } => self.released.push((job_id, attempt)),
                Action::CheckInstance {
                    job_id,
                    attempt,
                    instance_id,
                } => self.checked.push((job_id, attempt, instance_id, self.now)),
            }
        }
    }

    fn new_instance(&mut self) -> String {
        self.next_instance += 1;
        format!("i-{}", self.next_instance)
    }

    fn stored_snapshot(&self, run_id: &str) -> Option<RunSnapshot> {
        let (status, cancel, _) = self.runs.get(run_id)?.clone();
        let original = self.submitted.get(run_id)?;
        let jobs = original
            .jobs
            .iter()
            .map(|job| {
                let stored = &self.jobs[&job.id];
                JobSnapshot {
                    status: stored.status,
                    attempt: stored.attempt,
                    lease_owner: stored.owner.clone(),
                    lease_until: stored
                        .owner
                        .as_ref()
                        .map(|_| self.now.plus(Duration::from_secs(30))),
                    ..job.clone()
                }
            })
            .collect();
        Some(RunSnapshot {
            status,
            cancel,
            jobs,
            ..original.clone()
        })
    }

    fn persist(&mut self, transition: Transition) {
        match transition {
            Transition::RunStarted { run_id } => {
                let run = self.runs.get_mut(&run_id).expect("known run");
                if run.0 == RunStatus::Pending {
                    run.0 = RunStatus::Building;
                }
            }
            Transition::RunCancelRequested { run_id, reason } => {
                let run = self.runs.get_mut(&run_id).expect("known run");
                run.1.get_or_insert(reason);
            }
            Transition::RunFinished {
                run_id,
                status,
                message,
            } => {
                let open: Vec<_> = self
                    .jobs
                    .iter()
                    .filter(|(_, j)| j.run == run_id && !j.status.is_final())
                    .map(|(id, _)| id.clone())
                    .collect();
                if !open.is_empty() {
                    self.violations
                        .push(format!("run {run_id} finished with open jobs {open:?}"));
                }
                if status == RunStatus::Completed
                    && self
                        .jobs
                        .values()
                        .any(|j| j.run == run_id && j.status != JobStatus::Completed)
                {
                    self.violations
                        .push(format!("run {run_id} completed with a job not completed"));
                }
                let run = self.runs.get_mut(&run_id).expect("known run");
                if run.0.is_final() {
                    self.violations.push(format!("run {run_id} finished twice"));
                }
                run.0 = status;
                run.2 = message;
            }
            Transition::JobSkipped { job_id, status, .. } => {
                if self.jobs[&job_id].status == JobStatus::Queued {
                    self.set_status(&job_id, status, "skip");
                } else {
                    self.violations.push(format!("skip of non-queued {job_id}"));
                }
            }
            Transition::InstanceStarted { .. } => {}
            Transition::JobRunning { job_id, attempt } => {
                let stored = &self.jobs[&job_id];
                if stored.attempt != attempt {
                    self.violations
                        .push(format!("running {job_id} wrong attempt"));
                }
                if stored.status == JobStatus::Provisioning {
                    self.set_status(&job_id, JobStatus::Running, "running");
                }
            }
            Transition::AttemptEnded {
                job_id,
                attempt,
                owner,
                takeover,
                end,
                message,
                ..
            } => {
                let stored = &self.jobs[&job_id];
                if stored.attempt != attempt
                    || stored.owner.as_deref() != Some(owner.as_str())
                    || !stored.status.is_live()
                {
                    self.violations.push(format!(
                        "attempt end of {job_id}#{attempt} by {owner} does not match {stored:?}"
                    ));
                    return;
                }
                self.set_status(&job_id, end.status(), "attempt end");
                if takeover {
                    // The runner terminates a taken-over attempt's instances.
                    let instance = self.instances.get(&(job_id.clone(), attempt)).cloned();
                    self.terminated.push((job_id.clone(), attempt, instance));
                }
                let stored = self.jobs.get_mut(&job_id).expect("known");
                stored.owner = None;
                stored.end = Some(end);
                stored.attempt_message = message;
            }
            Transition::AttemptAdopted {
                job_id,
                attempt,
                from,
                owner,
                ..
            } => {
                let stored = self.jobs.get_mut(&job_id).expect("known");
                if stored.attempt != attempt
                    || stored.owner.as_deref() != Some(from.as_str())
                    || stored.status != JobStatus::Running
                {
                    self.violations.push(format!(
                        "adoption of {job_id}#{attempt} from {from} does not match {stored:?}"
                    ));
                    return;
                }
                stored.owner = Some(owner);
            }
            Transition::AttemptReleased {
                job_id,
                attempt,
                owner,
            } => {
                let stored = &self.jobs[&job_id];
                if stored.attempt != attempt || stored.owner.as_deref() != Some(owner.as_str()) {
                    self.violations
                        .push(format!("release of {job_id}#{attempt} by a non-owner"));
                }
            }
            Transition::LeasesRenewed { .. } => {}
        }
    }
}

fn live_attempt(world: &World, job: &str) -> u32 {
    world.jobs[job].attempt
}

/// Boots the current attempt of `job` and connects its agent.
fn boot(world: &mut World, job: &str) -> String {
    let attempt = live_attempt(world, job);
    let instance_id = world.new_instance();
    world.input(Event::InstanceCreated {
        job_id: job.into(),
        attempt,
        instance_id: instance_id.clone(),
    });
    world.input(Event::AgentConnected {
        job_id: job.into(),
        attempt,
    });
    instance_id
}

fn finish(world: &mut World, job: &str, outcome: AttemptOutcome) {
    let attempt = live_attempt(world, job);
    world.input(Event::Finished {
        job_id: job.into(),
        attempt,
        outcome,
    });
}

fn completed(job: &str) -> AttemptOutcome {
    AttemptOutcome::Completed {
        artifact_url: format!("reg/env:{job}"),
        digest: format!("sha256:{}", "a".repeat(64)),
        exit_code: 0,
    }
}

fn build_failed() -> AttemptOutcome {
    AttemptOutcome::BuildFailed {
        exit_code: Some(1),
        message: "the build failed with exit code 1".into(),
    }
}

fn agent_lost() -> AttemptOutcome {
    AttemptOutcome::Infrastructure {
        kind: InfraKind::AgentLost,
        message: "the agent disconnected".into(),
    }
}

#[test]
fn every_build_is_claimed_at_once_and_a_merge_waits_only_for_its_own_sources() {
    let mut world = World::new(config());
    world.submit(run(
        "r1",
        "env",
        1,
        vec![
            build("api_amd64"),
            build("api_arm64"),
            build("web"),
            merge("merge_api", &["api_amd64", "api_arm64"]),
        ],
    ));
    assert_eq!(world.run_status("r1"), RunStatus::Building);
    // One claim for all three builds: provisioned concurrently, not one after another.
    assert_eq!(world.claims_seen.len(), 1);
    assert_eq!(world.claims_seen[0].len(), 3);
    for job in ["api_amd64", "api_arm64", "web"] {
        assert_eq!(world.status(job), JobStatus::Provisioning);
        assert_eq!(world.created[&(job.to_string(), 1)], 1);
    }
    assert_eq!(world.status("merge_api"), JobStatus::Queued);
    for job in ["api_amd64", "api_arm64", "web"] {
        boot(&mut world, job);
    }
    finish(&mut world, "api_amd64", completed("api_amd64"));
    assert_eq!(world.status("merge_api"), JobStatus::Queued);
    // The merge starts while `web` still builds: it depends only on its platforms.
    finish(&mut world, "api_arm64", completed("api_arm64"));
    assert_eq!(world.status("merge_api"), JobStatus::Running);
    assert_eq!(world.status("web"), JobStatus::Running);
    finish(&mut world, "merge_api", completed("merge_api"));
    finish(&mut world, "web", completed("web"));
    assert_eq!(world.run_status("r1"), RunStatus::Completed);
    assert!(world.violations.is_empty(), "{:?}", world.violations);
}

#[test]
fn a_merge_runs_on_the_agent_of_the_platform_job_that_finished_last() {
    let mut world = World::new(config());
    world.submit(run(
        "r1",
        "env",
        1,
        vec![build("a"), build("b"), merge("merge", &["a", "b"])],
    ));
    let instance_a = boot(&mut world, "a");
    let instance_b = boot(&mut world, "b");
    finish(&mut world, "a", completed("a"));
    // `a`'s instance ends: the merge is not ready yet.
    assert!(
        world
            .terminated
            .contains(&("a".into(), 1, Some(instance_a)))
    );
    finish(&mut world, "b", completed("b"));
    // `b`'s instance lives on and its agent gets the MERGE: no new instance.
    assert!(!world.terminated.iter().any(|(job, _, _)| job == "b"));
    assert!(!world.created.contains_key(&("merge".to_string(), 1)));
    assert_eq!(
        world.sent[&("merge".to_string(), 1)],
        [Via::AgentOf {
            job_id: "b".into(),
            attempt: 1
        }]
    );
    assert_eq!(world.status("merge"), JobStatus::Running);
    finish(&mut world, "merge", completed("merge"));
    // The merge's end terminates the instance it ran on.
    assert!(
        world
            .terminated
            .contains(&("merge".into(), 1, Some(instance_b)))
    );
    assert_eq!(world.run_status("r1"), RunStatus::Completed);
    assert!(world.violations.is_empty(), "{:?}", world.violations);
}

#[test]
fn a_merge_falls_back_to_a_fresh_instance_when_the_last_builder_is_gone() {
    let mut world = World::new(config());
    world.submit(run(
        "r1",
        "env",
        1,
        vec![build("a"), merge("merge", &["a"])],
    ));
    let instance_a = boot(&mut world, "a");
    finish(&mut world, "a", completed("a"));
    assert_eq!(world.status("merge"), JobStatus::Running);
    world.input(Event::HandoverFailed {
        job_id: "merge".into(),
        attempt: 1,
    });
    assert!(
        world
            .terminated
            .contains(&("a".into(), 1, Some(instance_a)))
    );
    assert_eq!(world.created[&("merge".to_string(), 1)], 1);
    boot(&mut world, "merge");
    assert_eq!(
        world.sent[&("merge".to_string(), 1)].last(),
        Some(&Via::OwnAgent)
    );
    finish(&mut world, "merge", completed("merge"));
    assert_eq!(world.run_status("r1"), RunStatus::Completed);
    assert!(world.violations.is_empty(), "{:?}", world.violations);
}

#[test]
fn fail_fast_cancels_running_siblings_and_skips_queued_jobs_and_merges() {
    let mut config = config();
    config.max_live_instances = 2;
    let mut world = World::new(config);
    world.submit(run(
        "r1",
        "env",
        1,
        vec![
            build("a"),
            build("b"),
            build("c"),
            merge("merge", &["a", "b"]),
        ],
    ));
    boot(&mut world, "a");
    boot(&mut world, "b");
    assert_eq!(world.status("c"), JobStatus::Queued);
    finish(&mut world, "a", build_failed());
    assert_eq!(world.status("a"), JobStatus::Failed);
    assert_eq!(world.cancels, [("b".to_string(), 1)]);
    assert_eq!(world.status("c"), JobStatus::Cancelled);
    assert_eq!(world.status("merge"), JobStatus::Cancelled);
    assert_eq!(world.run_status("r1"), RunStatus::Building);
    // The sibling's agent stops and reports; whatever it says, it was cancelled.
    finish(&mut world, "b", build_failed());
    assert_eq!(world.status("b"), JobStatus::Cancelled);
    assert_eq!(world.run_status("r1"), RunStatus::Failed);
    assert_eq!(world.runs["r1"].2.as_deref(), Some("job(s) failed: a"));
    // `c` never got an instance.
    assert!(!world.created.keys().any(|(job, _)| job == "c"));
    assert!(world.violations.is_empty(), "{:?}", world.violations);
}

#[test]
fn without_fail_fast_the_other_jobs_finish_and_the_run_still_fails() {
    let mut world = World::new(config());
    let mut snapshot = run(
        "r1",
        "env",
        1,
        vec![
            build("a"),
            build("b"),
            build("c"),
            merge("merge", &["a", "b"]),
        ],
    );
    snapshot.fail_fast = false;
    world.submit(snapshot);
    for job in ["a", "b", "c"] {
        boot(&mut world, job);
    }
    finish(&mut world, "a", build_failed());
    assert!(world.cancels.is_empty());
    assert_eq!(
        world.status("merge"),
        JobStatus::Cancelled,
        "no merge from a failed platform job"
    );
    finish(&mut world, "b", completed("b"));
    finish(&mut world, "c", completed("c"));
    assert_eq!(world.status("b"), JobStatus::Completed);
    assert_eq!(world.run_status("r1"), RunStatus::Failed);
    assert!(world.violations.is_empty(), "{:?}", world.violations);
}

#[test]
fn cancel_stops_everything_and_is_refused_for_unknown_or_finished_runs() {
    let mut world = World::new(config());
    world.submit(run("r1", "env", 1, vec![build("a"), build("b")]));
    boot(&mut world, "a");
    // `b`'s instance is still being created when the cancel arrives.
    world
        .engine
        .command(
            Command::Cancel {
                run_id: "r1".into(),
                reason: CancelReason::User { by: None },
            },
            world.now,
        )
        .unwrap();
    world.pump();
    assert_eq!(world.runs["r1"].1, Some(CancelReason::User { by: None }));
    assert_eq!(world.cancels, [("a".to_string(), 1)]);
    // The instance that arrives after the cancel is terminated at once.
    world.input(Event::InstanceCreated {
        job_id: "b".into(),
        attempt: 1,
        instance_id: "i-late".into(),
    });
    assert!(
        world
            .terminated
            .iter()
            .any(|(_, _, i)| i.as_deref() == Some("i-late"))
    );
    assert_eq!(world.status("b"), JobStatus::Cancelled);
    finish(
        &mut world,
        "a",
        AttemptOutcome::Cancelled {
            message: "stopped".into(),
        },
    );
    assert_eq!(world.run_status("r1"), RunStatus::Cancelled);
    let again = world.engine.command(
        Command::Cancel {
            run_id: "r1".into(),
            reason: CancelReason::User { by: None },
        },
        world.now,
    );
    assert!(matches!(again, Err(CommandError::UnknownRun(_))));
    assert!(world.violations.is_empty(), "{:?}", world.violations);
}

#[test]
fn a_cancel_the_agent_ignores_ends_at_the_grace_with_the_instance_terminated() {
    let mut world = World::new(config());
    world.submit(run("r1", "env", 1, vec![build("a")]));
    let instance = boot(&mut world, "a");
    world
        .engine
        .command(
            Command::Cancel {
                run_id: "r1".into(),
                reason: CancelReason::Superseded { by: "r2".into() },
            },
            world.now,
        )
        .unwrap();
    world.pump();
    world.advance(Duration::from_secs(5));
    assert_eq!(world.status("a"), JobStatus::Running);
    world.advance(Duration::from_secs(20));
    assert_eq!(world.status("a"), JobStatus::Cancelled);
    assert!(world.terminated.contains(&("a".into(), 1, Some(instance))));
    assert_eq!(world.run_status("r1"), RunStatus::Cancelled);
    assert_eq!(world.runs["r1"].2.as_deref(), Some("superseded by run r2"));
}

#[test]
fn a_provider_refusal_that_would_repeat_fails_the_job_at_once() {
    let mut world = World::new(config());
    world.submit(run("r1", "env", 1, vec![build("a")]));
    assert_eq!(live_attempt(&world, "a"), 1);
    world.input(Event::InstanceFailed {
        job_id: "a".into(),
        attempt: 1,
        message: "RunInstances failed: InvalidAMIID.NotFound: the image id does not exist".into(),
        retryable: false,
    });
    assert_eq!(world.status("a"), JobStatus::Failed);
    match &world.jobs["a"].end {
        Some(JobEnd::Failed { kind, message, .. }) => {
            assert_eq!(*kind, FailureKind::Infrastructure);
            assert!(message.contains("InvalidAMIID.NotFound"), "{message}");
            assert!(message.contains("not retried"), "{message}");
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    world.advance(Duration::from_secs(600));
    assert_eq!(world.status("a"), JobStatus::Failed, "never retried");
    assert_eq!(world.runs["r1"].0, RunStatus::Failed);
}

#[test]
fn infrastructure_failures_are_retried_with_backoff_until_the_limit() {
    let mut world = World::new(config());
    world.submit(run("r1", "env", 1, vec![build("a")]));
    boot(&mut world, "a");
    finish(&mut world, "a", agent_lost());
    assert_eq!(world.status("a"), JobStatus::Queued);
    // Backoff: not claimed again before 5 s.
    world.advance(Duration::from_secs(4));
    assert_eq!(world.status("a"), JobStatus::Queued);
    world.advance(Duration::from_secs(1));
    assert_eq!(world.status("a"), JobStatus::Provisioning);
    assert_eq!(live_attempt(&world, "a"), 2);
    // The provider fails the second attempt: third attempt after 10 s.
    world.input(Event::InstanceFailed {
        job_id: "a".into(),
        attempt: 2,
        message: "InsufficientInstanceCapacity".into(),
        retryable: true,
    });
    world.advance(Duration::from_secs(9));
    assert_eq!(world.status("a"), JobStatus::Queued);
    world.advance(Duration::from_secs(1));
    assert_eq!(live_attempt(&world, "a"), 3);
    boot(&mut world, "a");
    finish(&mut world, "a", agent_lost());
    assert_eq!(world.status("a"), JobStatus::Failed);
    match &world.jobs["a"].end {
        Some(JobEnd::Failed { kind, message, .. }) => {
            assert_eq!(*kind, FailureKind::Infrastructure);
            assert!(message.contains("giving up after 2 retries"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // Each attempt got exactly one instance.
    for attempt in 1..=3 {
        assert_eq!(world.created[&("a".to_string(), attempt)], 1);
    }
}

#[test]
fn a_build_failure_is_never_retried() {
    let mut world = World::new(config());
    world.submit(run("r1", "env", 1, vec![build("a")]));
    boot(&mut world, "a");
    finish(&mut world, "a", build_failed());
    assert_eq!(world.status("a"), JobStatus::Failed);
    world.advance(Duration::from_secs(600));
    assert_eq!(world.created.len(), 1);
    assert!(matches!(
        world.jobs["a"].end,
        Some(JobEnd::Failed {
            kind: FailureKind::Build,
            ..
        })
    ));
}

#[test]
fn an_agent_that_never_connects_hits_the_boot_timeout_and_is_retried() {
    let mut world = World::new(config());
    world.submit(run("r1", "env", 1, vec![build("a")]));
    world.input(Event::InstanceCreated {
        job_id: "a".into(),
        attempt: 1,
        instance_id: "i-silent".into(),
    });
    world.advance(Duration::from_secs(299));
    assert_eq!(world.status("a"), JobStatus::Provisioning);
    world.advance(Duration::from_secs(1));
    assert!(
        world
            .terminated
            .contains(&("a".into(), 1, Some("i-silent".into())))
    );
    assert_eq!(world.status("a"), JobStatus::Queued);
    world.advance(Duration::from_secs(5));
    assert_eq!(live_attempt(&world, "a"), 2);
    boot(&mut world, "a");
    finish(&mut world, "a", completed("a"));
    assert_eq!(world.run_status("r1"), RunStatus::Completed);
}

#[test]
fn a_job_over_its_timeout_is_cancelled_then_failed_as_timed_out() {
    let mut world = World::new(config());
    let mut job = build("a");
    job.timeout = Duration::from_secs(60);
    world.submit(run("r1", "env", 1, vec![job]));
    boot(&mut world, "a");
    world.advance(Duration::from_secs(59));
    assert!(world.cancels.is_empty());
    world.advance(Duration::from_secs(1));
    assert_eq!(world.cancels, [("a".to_string(), 1)]);
    finish(&mut world, "a", build_failed());
    assert_eq!(world.status("a"), JobStatus::Failed);
    match &world.jobs["a"].end {
        Some(JobEnd::Failed { kind, message, .. }) => {
            assert_eq!(*kind, FailureKind::Timeout);
            assert!(message.contains("timed out after 1m"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(world.run_status("r1"), RunStatus::Failed);
}

#[test]
fn the_queue_is_fifo_within_the_global_and_per_environment_limits() {
    let mut config = config();
    config.max_live_instances = 3;
    config.max_live_per_environment = 2;
    let mut world = World::new(config);
    world.submit(run(
        "r1",
        "env-a",
        1,
        vec![build("a1"), build("a2"), build("a3")],
    ));
    world.submit(run("r2", "env-b", 2, vec![build("b1"), build("b2")]));
    // env-a may hold 2; the third slot goes to env-b's first job.
    let live: Vec<_> = world
        .jobs
        .iter()
        .filter(|(_, j)| j.status.is_live())
        .map(|(id, _)| id.as_str())
        .collect();
    assert_eq!(live, ["a1", "a2", "b1"]);
    let queue = world.engine.queue();
    assert_eq!(
        queue
            .iter()
            .map(|e| (e.position, e.job_name.as_str()))
            .collect::<Vec<_>>(),
        [(1, "a3"), (2, "b2")]
    );
    boot(&mut world, "a1");
    finish(&mut world, "a1", completed("a1"));
    // FIFO: a3 (older run) gets the freed slot before b2.
    assert_eq!(world.status("a3"), JobStatus::Provisioning);
    assert_eq!(world.status("b2"), JobStatus::Queued);
}

/// Loads run `r2` holding one running job `f` of core-b whose lease runs out at `until`
/// (another replica's, which then dies), into the store and the engine.
fn load_foreign_running(world: &mut World, until: Timestamp) {
    load_foreign_running_since(world, until, None);
}

/// [`load_foreign_running`], its agent first connected at `connected`.
fn load_foreign_running_since(world: &mut World, until: Timestamp, connected: Option<Timestamp>) {
    let mut foreign = build("f");
    foreign.attempt_connected_at = connected;
    foreign.status = JobStatus::Running;
    foreign.attempt = 1;
    foreign.lease_owner = Some("core-b/7".into());
    foreign.lease_until = Some(until);
    foreign.instance_id = Some("i-foreign".into());
    world
        .runs
        .insert("r2".into(), (RunStatus::Building, None, None));
    world.jobs.insert(
        "f".into(),
        StoredJob {
            run: "r2".into(),
            kind: JobKind::Build,
            status: JobStatus::Running,
            attempt: 1,
            owner: Some("core-b/7".into()),
            end: None,
            attempt_message: None,
        },
    );
    world.input(Event::Load(RunSnapshot {
        status: RunStatus::Building,
        ..run("r2", "env2", 2, vec![foreign])
    }));
}

#[test]
fn leases_are_renewed_and_an_expired_foreign_lease_is_taken_back_once() {
    let mut world = World::new(config());
    world.submit(run("r1", "env", 1, vec![build("a")]));
    boot(&mut world, "a");
    world.advance(Duration::from_secs(10));
    // Another replica's job whose core died: live, lease expired. What the store records
    // for that attempt; the runner terminates it after the guarded take-over write
    // succeeded (the engine does not emit it itself).
    world.instances.insert(("f".into(), 1), "i-foreign".into());
    let until = world.now.plus(Duration::from_secs(3));
    load_foreign_running(&mut world, until);
    assert_eq!(
        world.status("f"),
        JobStatus::Running,
        "its lease is still valid"
    );
    world.advance(Duration::from_secs(3));
    // A running build may be going on: the attempt is adopted, not ended, and its agent gets
    // the reconnect grace.
    assert_eq!(world.status("f"), JobStatus::Running);
    assert_eq!(world.jobs["f"].owner.as_deref(), Some(OWNER));
    assert!(world.terminated.is_empty(), "{:?}", world.terminated);
    assert!(world.engine.awaits_agent("f", 1));
    // The agent never dials in: at the end of the grace the attempt is lost, its instance
    // terminated, and the job requeued as an infrastructure failure, then claimed by this
    // core as attempt 2.
    world.advance(Duration::from_secs(119));
    assert_eq!(world.status("f"), JobStatus::Running);
    world.advance(Duration::from_secs(1));
    assert!(
        world
            .terminated
            .iter()
            .any(|(job, attempt, _)| job == "f" && *attempt == 1),
        "{:?}",
        world.terminated
    );
    match &world.jobs["f"].end {
        Some(JobEnd::Requeued { infra_failures, .. }) => assert_eq!(*infra_failures, 1),
        other => panic!("{other:?}"),
    }
    world.advance(Duration::from_secs(5));
    assert_eq!(world.status("f"), JobStatus::Provisioning);
    assert_eq!(world.jobs["f"].attempt, 2);
    assert_eq!(world.jobs["f"].owner.as_deref(), Some(OWNER));
    assert!(world.violations.is_empty(), "{:?}", world.violations);
}

#[test]
fn an_adopted_attempt_whose_agent_reconnects_resumes_and_completes() {
    let mut world = World::new(config());
    let now = world.now;
    load_foreign_running(&mut world, now);
    world.advance(Duration::from_secs(1));
    assert_eq!(world.jobs["f"].owner.as_deref(), Some(OWNER));
    world.advance(Duration::from_secs(60));
    world.input(Event::AgentConnected {
        job_id: "f".into(),
        attempt: 1,
    });
    // The agent already has its work: the link resumes it.
    assert_eq!(world.sent[&("f".to_string(), 1)], vec![Via::Adopted]);
    assert!(!world.engine.awaits_agent("f", 1));
    // Past the grace nothing happens now; the attempt ends with its STATUS.
    world.advance(Duration::from_secs(120));
    assert_eq!(world.status("f"), JobStatus::Running);
    finish(&mut world, "f", completed("f"));
    assert_eq!(world.status("f"), JobStatus::Completed);
    assert_eq!(world.created.len(), 0, "no new instance");
    assert!(world.violations.is_empty(), "{:?}", world.violations);
}

#[test]
fn an_adopted_attempt_keeps_the_timeout_it_had_used_before_its_core_died() {
    let mut world = World::new(config());
    let now = world.now;
    // Connected 25 minutes ago under another core; the job's timeout is 30 minutes.
    let connected = Timestamp(now.0 - 25 * 60 * 1000);
    load_foreign_running_since(&mut world, now, Some(connected));
    world.advance(Duration::from_secs(1));
    assert_eq!(world.jobs["f"].owner.as_deref(), Some(OWNER));
    world.advance(Duration::from_secs(60));
    world.input(Event::AgentConnected {
        job_id: "f".into(),
        attempt: 1,
    });
    // Not a fresh 30 minutes from the resume: what is left of them.
    world.advance(Duration::from_secs(3 * 60 + 50));
    assert!(world.cancels.is_empty(), "{:?}", world.cancels);
    world.advance(Duration::from_secs(15));
    assert_eq!(world.cancels, vec![("f".to_string(), 1)]);
    // The agent stops as told: the job fails as timed out.
    finish(&mut world, "f", build_failed());
    assert_eq!(world.status("f"), JobStatus::Failed);
    match &world.jobs["f"].end {
        Some(JobEnd::Failed { kind, .. }) => assert_eq!(*kind, FailureKind::Timeout),
        other => panic!("{other:?}"),
    }
    assert!(world.violations.is_empty(), "{:?}", world.violations);
}

/// Issue 26: a core killed with its agents' instances. The restarted core adopts the attempt
/// and asks the provider at once; an instance that is gone ends the attempt now (not after
/// the 120 s grace) and the retry is claimed without backoff.
#[test]
fn an_adopted_attempt_whose_instance_is_gone_is_retried_at_once() {
    let mut world = World::new(config());
    let now = world.now;
    load_foreign_running(&mut world, now);
    world.advance(Duration::from_secs(1));
    assert!(world.engine.awaits_agent("f", 1));
    assert_eq!(
        world
            .checked
            .iter()
            .map(|(job, attempt, instance, _)| (job.as_str(), *attempt, instance.as_str()))
            .collect::<Vec<_>>(),
        vec![("f", 1, "i-foreign")],
        "asked as it was adopted"
    );
    // Still running (the provider said nothing): asked again every LIVENESS_EVERY.
    for _ in 0..3 {
        world.advance(LIVENESS_EVERY);
    }
    assert_eq!(world.checked.len(), 4, "{:?}", world.checked);
    world.input(Event::InstanceGone {
        job_id: "f".into(),
        attempt: 1,
        detail: "its agent (process 42) has exited".into(),
    });
    let message = world.jobs["f"].attempt_message.clone().unwrap_or_default();
    assert!(
        message.contains("taken over from core ") && message.contains("process 42"),
        "the end names the core it was adopted from and why: {message}"
    );
    assert!(
        world
            .terminated
            .iter()
            .any(|(job, attempt, _)| job == "f" && *attempt == 1),
        "{:?}",
        world.terminated
    );
    match &world.jobs["f"].end {
        Some(JobEnd::Requeued {
            infra_failures,
            not_before,
        }) => {
            assert_eq!(*infra_failures, 1);
            assert_eq!(*not_before, world.now, "no backoff");
        }
        other => panic!("{other:?}"),
    }
    // Claimed again in the same step: a new instance for attempt 2.
    assert_eq!(world.status("f"), JobStatus::Provisioning);
    assert_eq!(world.jobs["f"].attempt, 2);
    // Nothing is asked about an attempt that is over.
    let asked = world.checked.len();
    world.advance(LIVENESS_EVERY * 3);
    assert_eq!(world.checked.len(), asked);
    assert!(world.violations.is_empty(), "{:?}", world.violations);
}

/// A late answer about an agent that has dialled in since is ignored, and nothing is asked
/// about a connected agent.
#[test]
fn instance_gone_is_ignored_once_the_agent_is_back() {
    let mut world = World::new(config());
    let now = world.now;
    load_foreign_running(&mut world, now);
    world.advance(Duration::from_secs(1));
    world.input(Event::AgentConnected {
        job_id: "f".into(),
        attempt: 1,
    });
    let asked = world.checked.len();
    world.advance(LIVENESS_EVERY * 5);
    assert_eq!(
        world.checked.len(),
        asked,
        "a connected agent's instance is not asked about"
    );
    world.input(Event::InstanceGone {
        job_id: "f".into(),
        attempt: 1,
        detail: "stale".into(),
    });
    assert_eq!(world.status("f"), JobStatus::Running);
    assert!(world.terminated.is_empty(), "{:?}", world.terminated);
}

/// An agent whose connection drops: its instance is asked about at once and while it stays
/// away; gone ends the attempt without waiting out the grace. Back: no more asking.
#[test]
fn an_agent_away_is_asked_about_and_ends_when_its_instance_is_gone() {
    let mut world = World::new(config());
    world.submit(run("r1", "env", 1, vec![build("a"), build("b")]));
    let instance_a = boot(&mut world, "a");
    boot(&mut world, "b");
    // b's agent drops and comes back: one check, then none.
    world.input(Event::AgentAway {
        job_id: "b".into(),
        attempt: 1,
    });
    assert_eq!(world.checked.len(), 1);
    world.input(Event::AgentBack {
        job_id: "b".into(),
        attempt: 1,
    });
    world.advance(LIVENESS_EVERY * 3);
    assert_eq!(world.checked.len(), 1, "{:?}", world.checked);
    world.input(Event::InstanceGone {
        job_id: "b".into(),
        attempt: 1,
        detail: "late".into(),
    });
    assert_eq!(
        world.status("b"),
        JobStatus::Running,
        "b is back: a late answer is ignored"
    );
    // a's agent drops for good.
    world.input(Event::AgentAway {
        job_id: "a".into(),
        attempt: 1,
    });
    world.advance(LIVENESS_EVERY);
    let asked_a: Vec<_> = world
        .checked
        .iter()
        .filter(|(job, ..)| job == "a")
        .map(|(_, _, instance, _)| instance.clone())
        .collect();
    assert_eq!(asked_a, vec![instance_a.clone(), instance_a.clone()]);
    world.input(Event::InstanceGone {
        job_id: "a".into(),
        attempt: 1,
        detail: "EC2 instance state terminated".into(),
    });
    assert_eq!(world.jobs["a"].attempt, 2, "retried at once");
    assert_eq!(world.status("a"), JobStatus::Provisioning);
    assert!(world.violations.is_empty(), "{:?}", world.violations);
}

#[test]
fn a_refused_adoption_lets_the_attempt_go_without_touching_it() {
    let mut world = World::new(config());
    let now = world.now;
    load_foreign_running(&mut world, now);
    world.advance(Duration::from_secs(1));
    assert!(world.engine.awaits_agent("f", 1));
    // The store said no (core-b renewed after all): this core forgets it, terminates nothing.
    world.input(Event::AdoptionRefused {
        job_id: "f".into(),
        attempt: 1,
    });
    assert!(!world.engine.awaits_agent("f", 1));
    world.advance(Duration::from_secs(200));
    assert!(world.terminated.is_empty(), "{:?}", world.terminated);
}

#[test]
fn a_previous_incarnation_of_this_core_is_taken_over_at_once() {
    let mut world = World::new(config());
    let mut done = build("done");
    done.status = JobStatus::Completed;
    done.attempt = 1;
    let mut interrupted = build("b");
    interrupted.status = JobStatus::Running;
    interrupted.attempt = 1;
    interrupted.lease_owner = Some("core-a/0".into());
    interrupted.lease_until = Some(world.now.plus(Duration::from_secs(30)));
    let snapshot = RunSnapshot {
        status: RunStatus::Building,
        ..run("r1", "env", 1, vec![done, interrupted])
    };
    world
        .runs
        .insert("r1".into(), (RunStatus::Building, None, None));
    world.jobs.insert(
        "done".into(),
        StoredJob {
            run: "r1".into(),
            kind: JobKind::Build,
            status: JobStatus::Completed,
            attempt: 1,
            owner: None,
            end: None,
            attempt_message: None,
        },
    );
    world.jobs.insert(
        "b".into(),
        StoredJob {
            run: "r1".into(),
            kind: JobKind::Build,
            status: JobStatus::Running,
            attempt: 1,
            owner: Some("core-a/0".into()),
            end: None,
            attempt_message: None,
        },
    );
    world.input(Event::Load(snapshot));
    // Adopted without waiting for the lease: the build may still run, its agent dials in.
    assert_eq!(world.status("b"), JobStatus::Running);
    assert_eq!(world.jobs["b"].owner.as_deref(), Some(OWNER));
    assert!(world.engine.awaits_agent("b", 1));
    // It does not: requeued after the grace, claimed after the first backoff.
    world.advance(Duration::from_secs(120));
    assert_eq!(world.status("b"), JobStatus::Queued);
    world.advance(Duration::from_secs(5));
    assert_eq!(world.jobs["b"].attempt, 2);
    assert!(!world.created.keys().any(|(job, _)| job == "done"));
    assert!(world.violations.is_empty(), "{:?}", world.violations);
}

#[test]
fn a_snapshot_older_than_this_cores_claim_does_not_stop_the_attempt() {
    let mut world = World::new(config());
    let created = run("r1", "env", 1, vec![build("a")]);
    world.submit(created.clone());
    boot(&mut world, "a");
    assert_eq!(world.status("a"), JobStatus::Running);
    // The run as it was created (pending, queued, attempt 0) arrives after the claim: stale,
    // it changes nothing (no stop, no second claim, no second RunStarted).
    world.engine.handle(Event::Load(created), world.now);
    assert_eq!(world.engine.poll_action(), None);
    assert!(world.terminated.is_empty(), "{:?}", world.terminated);
    assert_eq!(world.status("a"), JobStatus::Running);
    assert_eq!(world.claims_seen.len(), 1, "not claimed again");
    finish(&mut world, "a", completed("a"));
    assert_eq!(world.runs["r1"].0, RunStatus::Completed);
    assert!(world.violations.is_empty(), "{:?}", world.violations);
}

#[test]
fn draining_hands_jobs_back_without_spending_retries_and_stops_claiming() {
    let mut config = config();
    config.max_live_instances = 1;
    let mut world = World::new(config);
    world.submit(run("r1", "env", 1, vec![build("a"), build("b")]));
    boot(&mut world, "a");
    world.engine.command(Command::Drain, world.now).unwrap();
    world.pump();
    // A running build goes on: handed back (lease ended), not ended, not terminated.
    assert_eq!(world.status("a"), JobStatus::Running);
    assert_eq!(world.released, vec![("a".to_string(), 1)]);
    assert!(world.jobs["a"].end.is_none());
    assert!(!world.terminated.iter().any(|(job, ..)| job == "a"));
    world.advance(Duration::from_secs(60));
    assert_eq!(world.status("b"), JobStatus::Queued);
    assert_eq!(world.claims_seen.len(), 1);
    assert!(world.violations.is_empty(), "{:?}", world.violations);
}

#[test]
fn draining_hands_a_booting_attempt_back_to_the_queue_without_spending_retries() {
    let mut world = World::new(config());
    world.submit(run("r1", "env", 1, vec![build("a")]));
    assert_eq!(world.status("a"), JobStatus::Provisioning);
    world.engine.command(Command::Drain, world.now).unwrap();
    world.pump();
    assert_eq!(world.status("a"), JobStatus::Queued);
    match &world.jobs["a"].end {
        Some(JobEnd::Requeued { infra_failures, .. }) => assert_eq!(*infra_failures, 0),
        other => panic!("{other:?}"),
    }
    assert!(world.released.is_empty());
}

#[test]
fn a_lost_claim_starts_nothing() {
    let mut world = World::new(config());
    world.refuse.insert("a".into());
    world.submit(run("r1", "env", 1, vec![build("a"), build("b")]));
    assert!(!world.created.keys().any(|(job, _)| job == "a"));
    assert_eq!(world.created[&("b".to_string(), 1)], 1);
}

#[test]
fn database_spellings_round_trip() {
    for status in JobStatus::ALL {
        assert_eq!(JobStatus::parse(status.as_str()), Some(*status));
    }
    for status in RunStatus::ALL {
        assert_eq!(RunStatus::parse(status.as_str()), Some(*status));
    }
    for reason in [
        CancelReason::User { by: None },
        CancelReason::User {
            by: Some("ci".into()),
        },
        CancelReason::Superseded { by: "r9".into() },
        CancelReason::FailFast { job: "api".into() },
    ] {
        assert_eq!(CancelReason::from_db(&reason.to_db()), Some(reason));
    }
    assert_eq!(JobStatus::parse("exploded"), None);
}

// ---- properties ----

/// One step of a random world.
#[derive(Debug, Clone)]
enum Step {
    /// Resolve the n-th pending I/O (instance creation, agent, work) in some way.
    Resolve(usize, u8),
    Advance(u16),
    Cancel(usize),
    /// A foreign replica's expired lease shows up: not modelled here; re-load a run instead.
    Reload(usize),
    /// A sync finds the run no longer unfinished in the store.
    Unload(usize),
    /// The periodic sync: every unfinished run as stored, at once.
    Sync,
}

fn step_strategy() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (any::<usize>(), any::<u8>()).prop_map(|(n, how)| Step::Resolve(n, how)),
        2 => (1u16..400).prop_map(Step::Advance),
        1 => any::<usize>().prop_map(Step::Cancel),
        1 => any::<usize>().prop_map(Step::Reload),
        1 => any::<usize>().prop_map(Step::Unload),
        1 => Just(Step::Sync),
    ]
}

/// Pending I/O in the random world.
#[derive(Debug, Clone)]
enum Pending {
    Creating(String, u32),
    Booting(String, u32),
    Working(String, u32),
}

struct RandomWorld {
    world: World,
    pending: Vec<Pending>,
    runs: Vec<String>,
}

impl RandomWorld {
    fn new(max_live: usize, runs: Vec<(bool, usize, bool)>) -> RandomWorld {
        let mut config = config();
        config.max_live_instances = max_live;
        config.max_live_per_environment = max_live;
        config.retry_backoff = Duration::from_secs(1);
        let mut world = World::new(config);
        let mut names = Vec::new();
        for (index, (fail_fast, builds, with_merge)) in runs.into_iter().enumerate() {
            let run_id = format!("r{index}");
            let mut jobs: Vec<JobSnapshot> = (0..builds)
                .map(|b| {
                    let mut job = build(&format!("{run_id}_b{b}"));
                    job.timeout = Duration::from_secs(120);
                    job
                })
                .collect();
            if with_merge {
                let sources: Vec<String> = jobs.iter().map(|j| j.name.clone()).collect();
                let refs: Vec<&str> = sources.iter().map(String::as_str).collect();
                let mut merge = merge(&format!("merge_{run_id}"), &refs);
                merge.name = format!("merge_{run_id}");
                jobs.push(merge);
            }
            let mut snapshot = run(&run_id, &format!("env{}", index % 2), index as i64, jobs);
            snapshot.fail_fast = fail_fast;
            world.submit(snapshot);
            names.push(run_id);
        }
        let mut random = RandomWorld {
            world,
            pending: Vec::new(),
            runs: names,
        };
        random.collect();
        random
    }

    /// Picks up new I/O the engine asked for.
    fn collect(&mut self) {
        for (key, count) in &self.world.created {
            if *count > 1 {
                self.world
                    .violations
                    .push(format!("{key:?} got {count} instances"));
            }
        }
        // Rebuild pending work from what is outstanding.
        let mut wanted: Vec<Pending> = Vec::new();
        // Only attempts the engine still drives have I/O in flight: the runner closes the
        // links and ignores the provider calls of the others.
        let driven = self.world.engine.own_live();
        for (job, stored) in &self.world.jobs {
            if !stored.status.is_live() || !driven.contains(&(job.clone(), stored.attempt)) {
                continue;
            }
            let key = (job.clone(), stored.attempt);
            if self.world.sent.contains_key(&key) {
                wanted.push(Pending::Working(job.clone(), stored.attempt));
            } else if self.world.created.contains_key(&key) {
                let booted = self
                    .pending
                    .iter()
                    .any(|p| matches!(p, Pending::Booting(j, a) if *j == key.0 && *a == key.1));
                if booted {
                    wanted.push(Pending::Booting(job.clone(), stored.attempt));
                } else {
                    wanted.push(Pending::Creating(job.clone(), stored.attempt));
                }
            }
        }
        self.pending = wanted;
        for (key, vias) in &self.world.sent {
            if vias.len() > 1 && vias.iter().filter(|v| **v == Via::OwnAgent).count() > 1 {
                self.world
                    .violations
                    .push(format!("{key:?} was sent work {} times", vias.len()));
            }
        }
        let live = self
            .world
            .jobs
            .values()
            .filter(|j| j.status.is_live())
            .count();
        if live > self.world.engine.config().max_live_instances {
            self.world
                .violations
                .push(format!("{live} live jobs over the limit"));
        }
    }

    fn apply(&mut self, step: Step) {
        match step {
            Step::Advance(secs) => self.world.advance(Duration::from_secs(u64::from(secs))),
            Step::Cancel(n) => {
                let run = self.runs[n % self.runs.len()].clone();
                let refused = self.world.engine.command(
                    Command::Cancel {
                        run_id: run,
                        reason: CancelReason::User { by: None },
                    },
                    self.world.now,
                );
                // A random cancel may find its run finished (and unloaded): refused, typed.
                if let Err(error) = refused {
                    assert!(
                        matches!(
                            error,
                            CommandError::UnknownRun(_) | CommandError::RunFinished { .. }
                        ),
                        "{error}"
                    );
                }
                self.world.pump();
            }
            Step::Reload(n) => {
                // The store's view of a run, as a sync would load it.
                let run_id = self.runs[n % self.runs.len()].clone();
                if let Some(snapshot) = self.world.stored_snapshot(&run_id) {
                    self.world.input(Event::Load(snapshot));
                }
            }
            Step::Sync => {
                let snapshots: Vec<RunSnapshot> = self
                    .runs
                    .iter()
                    .filter(|run_id| !self.world.runs[*run_id].0.is_final())
                    .filter_map(|run_id| self.world.stored_snapshot(run_id))
                    .collect();
                self.world.input(Event::Sync(snapshots));
            }
            Step::Unload(n) => {
                let run_id = self.runs[n % self.runs.len()].clone();
                if self.world.runs[&run_id].0.is_final() {
                    self.world.input(Event::Unload { run_id });
                }
            }
            Step::Resolve(n, how) => {
                if self.pending.is_empty() {
                    self.world.advance(Duration::from_secs(30));
                } else {
                    let item = self.pending[n % self.pending.len()].clone();
                    self.resolve(item, how);
                }
            }
        }
        self.collect();
    }

    fn resolve(&mut self, item: Pending, how: u8) {
        match item {
            Pending::Creating(job, attempt) => {
                if how.is_multiple_of(5) {
                    self.world.input(Event::InstanceFailed {
                        job_id: job,
                        attempt,
                        message: "capacity".into(),
                        retryable: how.is_multiple_of(10),
                    });
                } else {
                    let instance_id = self.world.new_instance();
                    self.world.input(Event::InstanceCreated {
                        job_id: job.clone(),
                        attempt,
                        instance_id,
                    });
                    self.pending.push(Pending::Booting(job, attempt));
                }
            }
            Pending::Booting(job, attempt) => {
                if how.is_multiple_of(7) {
                    // The agent never comes: only time will tell.
                    self.world.advance(Duration::from_secs(301));
                } else {
                    self.world.input(Event::AgentConnected {
                        job_id: job,
                        attempt,
                    });
                }
            }
            Pending::Working(job, attempt) => {
                // The agent drops (and maybe comes back, or its instance dies) before it ends.
                match how % 16 {
                    9 => {
                        self.world.input(Event::AgentAway {
                            job_id: job.clone(),
                            attempt,
                        });
                        self.world.input(Event::AgentBack {
                            job_id: job,
                            attempt,
                        });
                        return;
                    }
                    10 | 11 => {
                        if how % 16 == 10 {
                            self.world.input(Event::AgentAway {
                                job_id: job.clone(),
                                attempt,
                            });
                        }
                        self.world.input(Event::InstanceGone {
                            job_id: job,
                            attempt,
                            detail: "gone".into(),
                        });
                        return;
                    }
                    _ => {}
                }
                let outcome = match how % 8 {
                    0 => build_failed(),
                    1 => agent_lost(),
                    2 => AttemptOutcome::Protocol {
                        message: "bad frame".into(),
                    },
                    3 if job.starts_with("merge") => {
                        self.world.input(Event::HandoverFailed {
                            job_id: job,
                            attempt,
                        });
                        return;
                    }
                    _ => completed(&job),
                };
                self.world.input(Event::Finished {
                    job_id: job,
                    attempt,
                    outcome,
                });
            }
        }
    }

    /// Delivers everything outstanding successfully until the engine is idle.
    fn settle(&mut self) {
        for _ in 0..10_000 {
            if self.pending.is_empty() {
                if !self.world.advance_to_timeout() {
                    break;
                }
                self.collect();
                continue;
            }
            let item = self.pending[0].clone();
            self.resolve(item, 4);
            self.collect();
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn no_event_order_reaches_an_illegal_state_dispatches_twice_or_loses_a_job(
        max_live in 1usize..5,
        runs in proptest::collection::vec((any::<bool>(), 1usize..4, any::<bool>()), 1..4),
        steps in proptest::collection::vec(step_strategy(), 0..80),
    ) {
        let mut random = RandomWorld::new(max_live, runs);
        for step in steps {
            random.apply(step);
            prop_assert!(random.world.violations.is_empty(), "{:?}", random.world.violations);
        }
        random.settle();
        prop_assert!(random.world.violations.is_empty(), "{:?}", random.world.violations);
        // Nothing lost: every run and job reached a final state.
        for (run, (status, _, _)) in &random.world.runs {
            prop_assert!(status.is_final(), "run {run} is {status}");
        }
        for (job, stored) in &random.world.jobs {
            prop_assert!(stored.status.is_final(), "job {job} is {}", stored.status);
        }
        // Every instance that was created was terminated.
        let mut created_instances = random.world.next_instance;
        let terminated: BTreeSet<&String> = random
            .world
            .terminated
            .iter()
            .filter_map(|(_, _, instance)| instance.as_ref())
            .collect();
        created_instances -= terminated.len() as u32;
        prop_assert_eq!(created_instances, 0, "instances left running");
        prop_assert!(random.world.engine.poll_timeout().is_none() || random.world.engine.run_ids().next().is_none());
    }
}

#[test]
fn a_snapshot_without_some_jobs_leaves_no_job_without_its_run() {
    let mut world = World::new(config());
    world.submit(run("r1", "env", 1, vec![build("a"), build("b")]));
    // A store read that raced the run's end saw the run but not its jobs.
    let mut partial = world.stored_snapshot("r1").unwrap();
    partial.jobs.clear();
    world.input(Event::Load(partial));
    world.input(Event::Unload {
        run_id: "r1".into(),
    });
    assert!(world.engine.orphan_jobs().is_empty());
    // The queue and the claims, which look every job's run up, still work.
    world.submit(run("r2", "env", 2, vec![build("c")]));
    assert_eq!(world.status("c"), JobStatus::Provisioning);
    assert!(world.violations.is_empty(), "{:?}", world.violations);
}
