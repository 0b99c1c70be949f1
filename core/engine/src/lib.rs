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

mod attempts;
mod index;
mod inputs;
pub mod reaper;
mod rules;
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
