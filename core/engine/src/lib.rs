//! The workflow engine: every scheduling decision, and nothing else.
//!
//! A plain struct in the style of quinn-proto: no I/O, no clock, no tokio. Inputs go in with
//! [`Engine::handle`] (commands from the API, events from the runner's I/O, a run snapshot from
//! the store) and [`Engine::handle_timeout`], each with `now`; outputs are drained with
//! [`Engine::poll_action`] (persist a transition, claim jobs, create an instance, send work,
//! send a cancel, terminate an instance) and [`Engine::poll_timeout`] (when to call
//! `handle_timeout` next). Call order, for the runner: after every `handle*` call, drain
//! `poll_action` until `None`, applying each action in order, then sleep until
//! `poll_timeout`.
//!
//! Architecture invariant: the database is the truth. The engine's view is loaded from it
//! ([`Event::Load`]) at start, after every conflict and periodically (other replicas change
//! it), and every change the engine makes is emitted as a [`Transition`] the runner writes with
//! a guarded `UPDATE` (expected status, attempt and lease owner). A claim is the one
//! round-trip: the engine asks ([`Action::Claim`]), the store decides atomically which claims
//! won ([`Event::Claimed`]), and only a won claim gets an instance.
//!
//! Rules (each unit-tested in `tests.rs`, and property-tested):
//! - Dependencies: a build job is eligible at once; a merge job when every source completed.
//! - Queue: eligible jobs are claimed in FIFO order (run creation, then job order), while the
//!   live jobs stay under the global and the per-environment limits.
//! - Fan-in: a run completes only when every job completed; fails if any failed; is cancelled
//!   if jobs were cancelled and none failed.
//! - Fail-fast (default): the first failed job cancels the run's other jobs; `fail_fast:
//!   false` lets them finish. A merge whose source did not complete never starts.
//! - Retries: infrastructure failures requeue the job with backoff, up to `max_retries`;
//!   every other failure is final.
//! - Time limits: the boot timeout ends an attempt whose agent never connected
//!   (infrastructure); the job timeout cancels the build and fails the job (`timeout`).
//! - Leases: this core renews the leases of its live jobs; a live job whose lease expired
//!   under another owner is taken back (infrastructure failure, retried).
//! - Merge on the last builder: when the platform job that completes last is this core's and
//!   its agent is still there, the merge goes to that agent instead of a new instance.

mod index;
pub mod reaper;
mod types;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::time::Duration;

pub use types::*;

/// Tunables of the engine (from `[scheduler]`).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// This core's lease owner id (`<core_id>/<process incarnation>`).
    pub owner: String,
    /// Jobs of a previous incarnation of this core (the same `core_id`) are taken over at once
    /// instead of after their lease: that process is gone, since this one replaced it.
    pub core_id: String,
    /// Most live instances across every replica (the seed's 50).
    pub max_live_instances: usize,
    /// Most live instances per environment.
    pub max_live_per_environment: usize,
    /// Infrastructure retries per job (so `max_retries + 1` attempts).
    pub max_retries: u32,
    /// Wait before the first retry; doubled for each further one.
    pub retry_backoff: Duration,
    /// An instance whose agent has not connected by then is terminated (infrastructure).
    pub boot_timeout: Duration,
    /// How long a claim holds without renewal.
    pub lease_duration: Duration,
    /// What an agent gets between CANCEL (SIGTERM) and SIGKILL.
    pub cancel_grace: Duration,
    /// How long the agent of a running attempt taken over from a stopped core (or handed
    /// back by one that shut down) has to dial in again before the attempt is lost.
    pub reconnect_grace: Duration,
}

impl EngineConfig {
    /// `owner` is an earlier incarnation of this core (`<core_id>/<another incarnation>`).
    pub fn is_predecessor(&self, owner: &str) -> bool {
        owner
            .strip_prefix(self.core_id.as_str())
            .is_some_and(|rest| rest.starts_with('/'))
            && owner != self.owner
    }

    /// The seed's and the defaults.
    pub fn with_owner(core_id: &str, owner: &str) -> EngineConfig {
        EngineConfig {
            owner: owner.into(),
            core_id: core_id.into(),
            max_live_instances: 50,
            max_live_per_environment: 20,
            max_retries: 2,
            retry_backoff: Duration::from_secs(5),
            boot_timeout: Duration::from_secs(300),
            lease_duration: Duration::from_secs(30),
            cancel_grace: Duration::from_secs(10),
            reconnect_grace: Duration::from_secs(120),
        }
    }
}

/// How long a job whose claim the store refused waits before it is claimed again.
pub const CLAIM_RETRY: Duration = Duration::from_secs(1);

/// How often the provider is asked whether an adopted attempt's instance still runs while
/// its agent has not dialled in.
pub const LIVENESS_EVERY: Duration = Duration::from_secs(2);

/// Time an agent gets past the cancel grace to send its STATUS before its instance is
/// terminated regardless.
pub const STOP_MARGIN: Duration = Duration::from_secs(10);

/// What a caller asks of the engine. A command may be illegal in the current state (cancelling
/// a finished run): [`Engine::command`] then answers a [`CommandError`] for the caller to act on.
#[derive(Debug, Clone)]
pub enum Command {
    /// A run the API just stored: its jobs are eligible now.
    Submit(RunSnapshot),
    /// `POST /api/v1/workflows/{id}/cancel`, or a newer run superseding it.
    Cancel {
        run_id: String,
        reason: CancelReason,
    },
    /// SIGTERM: stop claiming, hand this core's live jobs back.
    Drain,
}

/// What happened: the store's facts, the provider's and the agents'. An event is never
/// refused ([`Engine::handle`] returns nothing): one that no longer applies (an attempt that
/// already ended) changes nothing.
#[derive(Debug, Clone)]
pub enum Event {
    /// A run as stored: at start, after submission, after a conflict, on each sync.
    Load(RunSnapshot),
    /// A run is gone from the store's unfinished set (finished elsewhere): forget it.
    Unload { run_id: String },
    /// Every unfinished run, as stored (the periodic re-read): runs not in it are unloaded,
    /// the rest loaded, and the rules applied once over all of them.
    Sync(Vec<RunSnapshot>),
    /// The store's answer to [`Action::Claim`].
    Claimed { won: Vec<String>, lost: Vec<String> },
    /// The provider created the attempt's instance.
    InstanceCreated {
        job_id: String,
        attempt: u32,
        instance_id: String,
    },
    /// The provider could not create the attempt's instance. `retryable`: another attempt
    /// may succeed (capacity, limits, a cloud failing); else (a bad AMI, credentials or
    /// configuration) the job fails at once.
    InstanceFailed {
        job_id: String,
        attempt: u32,
        message: String,
        retryable: bool,
    },
    /// The attempt's agent connected (its token was accepted).
    AgentConnected { job_id: String, attempt: u32 },
    /// The store refused this core's adoption of a running attempt (its owner renewed, or
    /// another replica adopted it first): this core lets it go, touching nothing.
    AdoptionRefused { job_id: String, attempt: u32 },
    /// Work could not be handed to the last builder's agent (it was gone).
    HandoverFailed { job_id: String, attempt: u32 },
    /// The attempt's agent connection dropped; its link waits for it to dial again.
    AgentAway { job_id: String, attempt: u32 },
    /// The agent that was away dialled again.
    AgentBack { job_id: String, attempt: u32 },
    /// The provider says the attempt's instance no longer runs (the answer to
    /// [`Action::CheckInstance`]): its agent cannot come back.
    InstanceGone {
        job_id: String,
        attempt: u32,
        detail: String,
    },
    /// The attempt ended (STATUS stored, or the agent was lost).
    Finished {
        job_id: String,
        attempt: u32,
        outcome: AttemptOutcome,
    },
}

/// How an attempt ended, as the runner saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptOutcome {
    Completed {
        artifact_url: String,
        digest: String,
        exit_code: i32,
    },
    /// The builder failed (or never ran for a reason of the build's own: bad source...).
    BuildFailed {
        exit_code: Option<i32>,
        message: String,
    },
    /// The agent stopped after a CANCEL.
    Cancelled {
        message: String,
    },
    Infrastructure {
        kind: InfraKind,
        message: String,
    },
    /// The agent broke the protocol or lied about its image.
    Protocol {
        message: String,
    },
}

/// A claim the engine asks the store for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub job_id: String,
    pub environment_id: String,
    /// The attempt the claim starts (the job's previous attempt + 1).
    pub attempt: u32,
    /// The attempt the job is at now (the store's guard).
    pub expected_attempt: u32,
    /// Runs on an instance that is already live (merge on the last builder): the store does
    /// not count it against the instance limits.
    pub reuses_instance: bool,
}

/// Where a work frame goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// The agent that connected for this attempt.
    OwnAgent,
    /// The agent of a running attempt this core adopted (from a core that stopped): it
    /// already has its work and resumes where the store's log ends.
    Adopted,
    /// The agent of another job's attempt that just finished on this core, before its
    /// instance is terminated.
    AgentOf { job_id: String, attempt: u32 },
}

/// A change to write: each is one guarded statement in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// `pending → building`.
    RunStarted { run_id: String },
    RunCancelRequested {
        run_id: String,
        reason: CancelReason,
    },
    /// Every job is final.
    RunFinished {
        run_id: String,
        status: RunStatus,
        message: Option<String>,
    },
    /// A queued job that will never run (fail-fast, cancel, a merge whose source failed).
    JobSkipped {
        job_id: String,
        status: JobStatus,
        message: String,
    },
    /// The attempt's instance exists (merge path recorded for merges).
    InstanceStarted {
        job_id: String,
        attempt: u32,
        instance_id: String,
        merge_path: Option<MergePath>,
    },
    /// `provisioning → running`.
    JobRunning { job_id: String, attempt: u32 },
    /// The attempt is over; the job is requeued or final. Guarded by `owner` and `attempt`,
    /// and for a take-over (`takeover`: another core's attempt) by its lease having run out
    /// in the store too, so a live owner with a fresher lease than this view wins — unless
    /// `predecessor`: the owner is an earlier incarnation of this core (the same `core_id`),
    /// which this process replaced, so its lease means nothing.
    AttemptEnded {
        job_id: String,
        attempt: u32,
        owner: String,
        takeover: bool,
        predecessor: bool,
        result: AttemptResult,
        message: Option<String>,
        end: JobEnd,
    },
    /// A running attempt whose owner's lease expired becomes this core's, build and all: its
    /// agent dials in again and resumes. Guarded by the old owner, the attempt, `running`
    /// and the lease having run out in the store too (or `predecessor`: the old owner is an
    /// earlier incarnation of this core, gone).
    AttemptAdopted {
        job_id: String,
        attempt: u32,
        from: String,
        owner: String,
        lease_until: Timestamp,
        predecessor: bool,
    },
    /// This core shuts down but the attempt goes on: its lease ends now, so another core (or
    /// this one's next incarnation) adopts it at once. Guarded by the owner and attempt.
    AttemptReleased {
        job_id: String,
        attempt: u32,
        owner: String,
    },
    /// Extend this core's leases.
    LeasesRenewed {
        owner: String,
        job_ids: Vec<String>,
        until: Timestamp,
    },
}

/// What a [`Transition`] writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject<'a> {
    /// The run's own row.
    Run(&'a str),
    /// One job's row (and its attempt's).
    Job(&'a str),
    /// Lease times only: nothing a run's view shows.
    Leases,
}

impl Transition {
    /// What the transition writes to.
    pub fn subject(&self) -> Subject<'_> {
        match self {
            Transition::RunStarted { run_id }
            | Transition::RunCancelRequested { run_id, .. }
            | Transition::RunFinished { run_id, .. } => Subject::Run(run_id),
            Transition::JobSkipped { job_id, .. }
            | Transition::InstanceStarted { job_id, .. }
            | Transition::JobRunning { job_id, .. }
            | Transition::AttemptEnded { job_id, .. }
            | Transition::AttemptAdopted { job_id, .. }
            | Transition::AttemptReleased { job_id, .. } => Subject::Job(job_id),
            Transition::LeasesRenewed { .. } => Subject::Leases,
        }
    }
}

/// Where a job goes when its attempt ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEnd {
    /// Back to `queued` for another attempt, not before this time.
    Requeued {
        not_before: Timestamp,
        infra_failures: u32,
    },
    Completed {
        artifact_url: String,
        digest: String,
        exit_code: i32,
    },
    Failed {
        kind: FailureKind,
        exit_code: Option<i32>,
        message: String,
        infra_failures: u32,
    },
    Cancelled {
        message: String,
    },
}

impl JobEnd {
    pub fn status(&self) -> JobStatus {
        match self {
            JobEnd::Requeued { .. } => JobStatus::Queued,
            JobEnd::Completed { .. } => JobStatus::Completed,
            JobEnd::Failed { .. } => JobStatus::Failed,
            JobEnd::Cancelled { .. } => JobStatus::Cancelled,
        }
    }
}

/// What the runner must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Action {
    Persist(Transition),
    /// Claim these jobs for this core (guarded, atomic, within the limits); answer with
    /// [`Event::Claimed`].
    Claim {
        claims: Vec<Claim>,
        lease_until: Timestamp,
        max_live_instances: usize,
        max_live_per_environment: usize,
    },
    /// Boot an instance for the attempt; answer with `InstanceCreated` or `InstanceFailed`.
    CreateInstance {
        job_id: String,
        run_id: String,
        attempt: u32,
    },
    /// Send the attempt's BUILD or MERGE.
    SendWork {
        job_id: String,
        run_id: String,
        attempt: u32,
        via: Via,
    },
    SendCancel {
        job_id: String,
        attempt: u32,
        reason: String,
    },
    /// Let go of the attempt's agent connection without ending the attempt (this core shuts
    /// down; the agent dials another core and resumes there).
    Release {
        job_id: String,
        attempt: u32,
    },
    /// Ask the provider whether the attempt's instance still runs; answer with
    /// [`Event::InstanceGone`] when it does not (nothing when it does).
    CheckInstance {
        job_id: String,
        attempt: u32,
        instance_id: String,
    },
    /// Close the attempt's agent connection (if any) and terminate its instance.
    Terminate {
        job_id: String,
        attempt: u32,
        instance_id: Option<String>,
    },
}

/// Why a live attempt is being stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stop {
    Cancel(CancelReason),
    Timeout,
}

/// What only this core knows about one of its live attempts.
#[derive(Debug, Clone, Default)]
struct Local {
    /// An agent is serving the attempt (its own, or the last builder's for a merge).
    connected: bool,
    boot_deadline: Option<Timestamp>,
    deadline: Option<Timestamp>,
    stop: Option<(Stop, Timestamp)>,
    /// A merge sent to the last builder's agent: the finished job's attempt.
    reused_from: Option<(String, u32)>,
    /// A running attempt adopted from this lease owner (a stopped core): `boot_deadline` is
    /// then the end of its agent's reconnect grace.
    adopted_from: Option<String>,
    /// The connected agent's connection dropped and it has not dialled again (its link
    /// waits out the reconnect grace).
    away: bool,
    /// An adopted attempt whose agent has not dialled in, or an agent away: when to ask the
    /// provider again whether its instance runs.
    next_liveness_check: Option<Timestamp>,
}

#[derive(Debug, Clone)]
struct Job {
    snapshot: JobSnapshot,
    run_id: String,
    ordinal: usize,
    claim_pending: bool,
    /// The store refused the last claim (another replica won it, the job moved, or the
    /// replicas together are at a limit): not claimed again before this time.
    claim_blocked_until: Option<Timestamp>,
    /// Set while this core holds a live attempt of the job.
    local: Option<Local>,
    /// The instance of a finished attempt kept alive for a merge handover.
    lingering: bool,
}

#[derive(Debug, Clone)]
struct Run {
    id: String,
    environment_id: String,
    status: RunStatus,
    fail_fast: bool,
    created_at: Timestamp,
    cancel: Option<CancelReason>,
    jobs: Vec<String>,
}

/// One waiting job of `GET /api/v1/queue`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct QueueEntry {
    /// 1 = next to be claimed.
    pub position: usize,
    pub run_id: String,
    pub job_id: String,
    pub job_name: String,
    pub environment_id: String,
    /// Attempts already made (retries wait here too).
    pub attempts: u32,
    /// Unix ms before which a retried job is not claimed.
    pub not_before: Option<i64>,
}

/// The engine. See the module docs for the call order.
#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
    runs: BTreeMap<String, Run>,
    jobs: HashMap<String, Job>,
    actions: VecDeque<Action>,
    draining: bool,
    next_renewal: Option<Timestamp>,
    /// Runs an input or rule changed since the last step: only these are stepped (an input
    /// about one job costs the size of its run, not of every run in view).
    dirty: BTreeSet<String>,
    /// The next step looks at every run (timeouts, a sync, a drain).
    step_all: bool,
    /// Runs loaded `pending`: `RunStarted` is written once no claim is outstanding, after the
    /// instances are asked for, so the way to an instance does not wait for it.
    started: Vec<String>,
    /// Runs changed since the index was last brought up to date.
    changed: BTreeSet<String>,
    index: index::Index,
}

impl Engine {
    pub fn new(config: EngineConfig) -> Engine {
        Engine {
            config,
            runs: BTreeMap::new(),
            jobs: HashMap::new(),
            actions: VecDeque::new(),
            draining: false,
            next_renewal: None,
            dirty: BTreeSet::new(),
            step_all: false,
            started: Vec::new(),
            changed: BTreeSet::new(),
            index: index::Index::default(),
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Applies one input at `now`. Only commands can be refused.
    pub fn handle(&mut self, event: Event, now: Timestamp) {
        match &event {
            Event::Load(snapshot) => {
                self.dirty.insert(snapshot.id.clone());
            }
            Event::Unload { .. } => {}
            // A sync marks the runs it changed (in `load`).
            Event::Sync(_) => {}
            Event::Claimed { won, lost } => {
                for id in won.iter().chain(lost) {
                    self.touch(id);
                }
            }
            Event::InstanceCreated { job_id, .. }
            | Event::InstanceFailed { job_id, .. }
            | Event::AgentConnected { job_id, .. }
            | Event::AdoptionRefused { job_id, .. }
            | Event::HandoverFailed { job_id, .. }
            | Event::InstanceGone { job_id, .. }
            | Event::AgentAway { job_id, .. }
            | Event::AgentBack { job_id, .. }
            | Event::Finished { job_id, .. } => self.touch(job_id),
        }
        match event {
            Event::Load(snapshot) => {
                self.load(snapshot, now);
            }
            Event::Unload { run_id } => self.unload(&run_id),
            Event::Sync(snapshots) => {
                let fresh: HashSet<&str> = snapshots.iter().map(|run| run.id.as_str()).collect();
                let gone: Vec<String> = self
                    .runs
                    .keys()
                    .filter(|id| !fresh.contains(id.as_str()))
                    .cloned()
                    .collect();
                for run_id in gone {
                    self.unload(&run_id);
                }
                // Only what changed is stepped: a sync of hundreds of unchanged runs costs
                // their comparison, not a pass of every rule over them.
                for snapshot in snapshots {
                    let run_id = snapshot.id.clone();
                    if self.load(snapshot, now) {
                        self.dirty.insert(run_id);
                    }
                }
            }
            Event::Claimed { won, lost } => self.claimed(won, lost, now),
            Event::InstanceCreated {
                job_id,
                attempt,
                instance_id,
            } => self.instance_created(&job_id, attempt, instance_id, now),
            Event::InstanceFailed {
                job_id,
                attempt,
                message,
                retryable,
            } => {
                if self.is_current_own(&job_id, attempt) {
                    let kind = if retryable {
                        InfraKind::Provider
                    } else {
                        InfraKind::ProviderRejected
                    };
                    self.end_attempt(
                        &job_id,
                        AttemptOutcome::Infrastructure { kind, message },
                        now,
                    );
                }
            }
            Event::AgentConnected { job_id, attempt } => {
                self.agent_connected(&job_id, attempt, now)
            }
            Event::AdoptionRefused { job_id, attempt } => {
                if self.is_current_own(&job_id, attempt)
                    && let Some(job) = self.jobs.get_mut(&job_id)
                    && job
                        .local
                        .as_ref()
                        .is_some_and(|local| local.adopted_from.is_some())
                {
                    job.local = None;
                }
            }
            Event::HandoverFailed { job_id, attempt } => self.handover_failed(&job_id, attempt),
            Event::InstanceGone {
                job_id,
                attempt,
                detail,
            } => self.instance_gone(&job_id, attempt, &detail, now),
            Event::AgentAway { job_id, attempt } => {
                if self.is_current_own(&job_id, attempt)
                    && let Some(local) = self.jobs.get_mut(&job_id).and_then(|j| j.local.as_mut())
                    && local.connected
                    && !local.away
                {
                    // Asked at once: a dead instance is the likeliest reason for a drop that
                    // lasts, and the answer is cheap.
                    local.away = true;
                    self.check_instance(&job_id, now);
                }
            }
            Event::AgentBack { job_id, attempt } => {
                if self.is_current_own(&job_id, attempt)
                    && let Some(local) = self.jobs.get_mut(&job_id).and_then(|j| j.local.as_mut())
                    && local.away
                {
                    local.away = false;
                    local.next_liveness_check = None;
                }
            }
            Event::Finished {
                job_id,
                attempt,
                outcome,
            } => {
                if self.is_current_own(&job_id, attempt) {
                    self.end_attempt(&job_id, outcome, now);
                }
            }
        }
        self.step(now);
    }

    /// Carries out a caller's command, or says why it cannot be (the caller answers it: `404`,
    /// `409`). A command that is refused changes nothing.
    pub fn command(&mut self, command: Command, now: Timestamp) -> Result<(), CommandError> {
        match command {
            Command::Submit(snapshot) => {
                // A sync may have loaded it (and claimed its jobs) already: the engine keeps
                // its newer view of those (attempts and run statuses only move forward).
                self.dirty.insert(snapshot.id.clone());
                self.load(snapshot, now);
            }
            Command::Cancel { run_id, reason } => {
                self.dirty.insert(run_id.clone());
                let run = self
                    .runs
                    .get_mut(&run_id)
                    .ok_or_else(|| CommandError::UnknownRun(run_id.clone()))?;
                if run.status.is_final() {
                    return Err(CommandError::RunFinished {
                        run: run_id,
                        status: run.status,
                    });
                }
                if run.cancel.is_none() {
                    run.cancel = Some(reason.clone());
                    self.actions
                        .push_back(Action::Persist(Transition::RunCancelRequested {
                            run_id,
                            reason,
                        }));
                }
            }
            Command::Drain => {
                self.step_all = true;
                self.drain(now);
            }
        }
        self.step(now);
        Ok(())
    }

    /// Fires every deadline due at `now` and re-evaluates the queue.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        let mut due = Vec::new();
        for (id, job) in &self.jobs {
            let Some(local) = &job.local else { continue };
            if !local.connected && local.boot_deadline.is_some_and(|at| at <= now) {
                due.push((id.clone(), Due::Boot));
            } else if (!local.connected || local.away)
                && local.next_liveness_check.is_some_and(|at| at <= now)
            {
                due.push((id.clone(), Due::Liveness));
            } else if let Some((_, at)) = &local.stop {
                if *at <= now {
                    due.push((id.clone(), Due::StopExpired));
                }
            } else if local.deadline.is_some_and(|at| at <= now) {
                due.push((id.clone(), Due::JobTimeout));
            }
        }
        due.sort();
        for (job_id, due) in due {
            match due {
                Due::Boot => {
                    let adopted_from = self
                        .jobs
                        .get(&job_id)
                        .and_then(|job| job.local.as_ref())
                        .and_then(|local| local.adopted_from.clone());
                    let (kind, message) = match adopted_from {
                        Some(from) => (
                            InfraKind::AgentLost,
                            format!(
                                "the agent of this attempt (taken over from core {from}) did not reconnect within {}s",
                                self.config.reconnect_grace.as_secs()
                            ),
                        ),
                        None => (
                            InfraKind::BootTimeout,
                            format!(
                                "the instance's agent did not connect within {}s (boot timeout)",
                                self.config.boot_timeout.as_secs()
                            ),
                        ),
                    };
                    self.end_attempt(
                        &job_id,
                        AttemptOutcome::Infrastructure { kind, message },
                        now,
                    );
                }
                Due::Liveness => self.check_instance(&job_id, now),
                Due::JobTimeout => self.stop(&job_id, Stop::Timeout, now),
                Due::StopExpired => {
                    let outcome = AttemptOutcome::Cancelled {
                        message: "the agent did not stop within its grace period; its instance was terminated".into(),
                    };
                    self.end_attempt(&job_id, outcome, now);
                }
            }
        }
        if self.next_renewal.is_some_and(|at| at <= now) {
            self.renew_leases(now);
        }
        self.step_all = true;
        self.step(now);
    }

    /// The next action to apply, in order.
    #[must_use]
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Engine::handle_timeout`] must be called next.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        match (self.next_renewal, self.index.next_due()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Jobs waiting for an instance, in the order they will be claimed.
    pub fn queue(&self) -> Vec<QueueEntry> {
        self.eligible(None)
            .into_iter()
            .enumerate()
            .map(|(index, id)| {
                let job = &self.jobs[&id];
                let run = &self.runs[&job.run_id];
                QueueEntry {
                    position: index + 1,
                    run_id: run.id.clone(),
                    job_id: id.clone(),
                    job_name: job.snapshot.name.clone(),
                    environment_id: run.environment_id.clone(),
                    attempts: job.snapshot.attempt,
                    not_before: job.snapshot.not_before.map(Timestamp::millis),
                }
            })
            .collect()
    }

    /// Unfinished runs in view.
    #[cfg(test)]
    pub(crate) fn run_ids(&self) -> impl Iterator<Item = &str> {
        self.runs.keys().map(String::as_str)
    }

    /// Live attempts this core holds (job id, attempt).
    pub fn own_live(&self) -> Vec<(String, u32)> {
        let mut live: Vec<_> = self
            .jobs
            .iter()
            .filter(|(_, job)| job.local.is_some())
            .map(|(id, job)| (id.clone(), job.snapshot.attempt))
            .collect();
        live.sort();
        live
    }

    /// Jobs whose run is not in view: must never exist (tests check it after every input).
    #[cfg(test)]
    pub(crate) fn orphan_jobs(&self) -> Vec<String> {
        self.jobs
            .iter()
            .filter(|(_, job)| !self.runs.contains_key(&job.run_id))
            .map(|(id, _)| id.clone())
            .collect()
    }

    // ---- inputs ----

    /// Loads a stored run into the view; whether that changed the view.
    fn load(&mut self, snapshot: RunSnapshot, now: Timestamp) -> bool {
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

    fn takes_over_at_start(&self, job: &JobSnapshot) -> bool {
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

    fn unload(&mut self, run_id: &str) {
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

    fn drain(&mut self, now: Timestamp) {
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

    fn claimed(&mut self, won: Vec<String>, lost: Vec<String>, now: Timestamp) {
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

    fn instance_created(
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

    fn agent_connected(&mut self, job_id: &str, attempt: u32, now: Timestamp) {
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

    fn handover_failed(&mut self, job_id: &str, attempt: u32) {
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

    fn is_current_own(&self, job_id: &str, attempt: u32) -> bool {
        self.jobs
            .get(job_id)
            .is_some_and(|job| job.local.is_some() && job.snapshot.attempt == attempt)
    }

    /// Sends CANCEL to a live attempt of this core and arms its stop deadline.
    fn stop(&mut self, job_id: &str, why: Stop, now: Timestamp) {
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
    fn end_attempt(&mut self, job_id: &str, outcome: AttemptOutcome, now: Timestamp) {
        self.end_attempt_held_by(job_id, outcome, now, None);
    }

    /// [`Engine::end_attempt`], for an attempt held by `taken_from` (another core whose lease
    /// expired) when it is `Some`: the write is guarded by that owner and by the lease having
    /// run out in the store, and the old instance is left to the runner, which terminates it
    /// only once that write succeeded (a renewal meanwhile means its core is alive).
    fn end_attempt_held_by(
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
    fn merge_unblocked_by(&self, job_id: &str) -> Option<String> {
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

    fn sources_completed(&self, run: &Run, sources: &[String]) -> bool {
        sources.iter().all(|name| {
            run.jobs.iter().any(|id| {
                self.jobs.get(id).is_some_and(|job| {
                    job.snapshot.name == *name && job.snapshot.status == JobStatus::Completed
                })
            })
        })
    }

    /// The lingering finished attempt whose instance a merge will reuse.
    fn lingering_source_for(&self, merge_id: &str) -> Option<(String, u32, String)> {
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
    fn check_instance(&mut self, job_id: &str, now: Timestamp) {
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
    fn instance_gone(&mut self, job_id: &str, attempt: u32, detail: &str, now: Timestamp) {
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

    fn release_lingering_for(&mut self, merge_id: &str) {
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
    fn end_unwanted_lingering(&mut self) {
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

    fn ensure_renewal(&mut self, now: Timestamp) {
        if self.next_renewal.is_none() {
            self.next_renewal = Some(now.plus(self.config.lease_duration / 3));
        }
    }

    fn renew_leases(&mut self, now: Timestamp) {
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

    /// Applies every rule until nothing changes: expired foreign leases, cancellation,
    /// fail-fast, skipped merges, fan-in, then the queue. Per-run rules run for the runs that
    /// changed ([`Engine::touch`]); in tests, a full pass afterwards must find nothing to do.
    fn step(&mut self, now: Timestamp) {
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

    fn step_once(&mut self, now: Timestamp) {
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
    fn settle(&mut self, now: Timestamp) {
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
    fn touch(&mut self, job_id: &str) {
        if let Some(job) = self.jobs.get(job_id) {
            self.dirty.insert(job.run_id.clone());
        }
    }

    fn step_run(&mut self, run_id: &str, now: Timestamp) {
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

    fn skip(&mut self, job_id: &str, status: JobStatus, message: String) {
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
    fn take_back_expired(&mut self, now: Timestamp) {
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

    fn finish_run_if_done(&mut self, run_id: &str) {
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
    fn eligible(&self, now: Option<Timestamp>) -> Vec<String> {
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

    fn claim_eligible(&mut self, now: Timestamp) {
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Due {
    Boot,
    Liveness,
    JobTimeout,
    StopExpired,
}

/// `1800s` → `30m`, for messages.
pub fn humanize(duration: Duration) -> String {
    let secs = duration.as_secs();
    if secs >= 3600 && secs.is_multiple_of(3600) {
        format!("{}h", secs / 3600)
    } else if secs >= 60 && secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}
