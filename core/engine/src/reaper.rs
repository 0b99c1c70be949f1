//! The reaper's decisions: which recorded instances to terminate, and why. A pure function of
//! what the store holds and the time; the runner's sweep reads the facts, calls [`plan`] and
//! terminates what it returns.
//!
//! An instance is terminated when it belongs to no attempt the store knows, when its attempt
//! ended (or was superseded by a later one), when its job's lease expired (the owning core is
//! gone), or when it outlived its maximum lifetime. Never otherwise an instance of a live
//! attempt whose lease holds, whichever replica owns it. A running job's lease counts as
//! expired only `running_grace` after it ran out: its agent may be dialling another core that
//! adopts the attempt.

use std::collections::HashMap;
use std::time::Duration;

use crate::{JobStatus, Timestamp};

/// Why the reaper terminates an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReapReason {
    /// Its attempt ended (final, or superseded by a later one).
    AttemptEnded,
    /// Its job's lease expired: the core that owned it is gone.
    LeaseExpired,
    /// It belongs to no attempt or job this store knows.
    NoAttempt,
    /// It outlived its maximum lifetime (job timeout + boot timeout + margin).
    Lifetime,
}

impl ReapReason {
    /// The word logs and metrics use.
    pub fn as_str(self) -> &'static str {
        match self {
            ReapReason::AttemptEnded => "attempt_ended",
            ReapReason::LeaseExpired => "lease_expired",
            ReapReason::NoAttempt => "no_attempt",
            ReapReason::Lifetime => "lifetime",
        }
    }
}

/// A recorded instance not yet terminated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReapInstance {
    pub id: String,
    /// The job and attempt it was recorded for (`None`: its job was deleted, or it was
    /// recorded before attempts were).
    pub job_id: Option<String>,
    pub attempt: Option<u32>,
    /// The end of its maximum lifetime (`None`: recorded before lifetimes were).
    pub expires_at: Option<Timestamp>,
}

/// What the store knows of one attempt and its job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReapAttempt {
    pub job_id: String,
    pub number: u32,
    /// The attempt has ended.
    pub ended: bool,
    /// The job's current attempt (a later one supersedes this).
    pub job_attempt: u32,
    pub job_status: JobStatus,
    pub lease_until: Option<Timestamp>,
}

/// The instances to terminate, in the order given, each with why.
pub fn plan(
    instances: &[ReapInstance],
    attempts: &[ReapAttempt],
    now: Timestamp,
    running_grace: Duration,
) -> Vec<(String, ReapReason)> {
    let by_attempt: HashMap<(&str, u32), &ReapAttempt> = attempts
        .iter()
        .map(|a| ((a.job_id.as_str(), a.number), a))
        .collect();
    instances
        .iter()
        .filter_map(|instance| {
            let attempt = match (&instance.job_id, instance.attempt) {
                (Some(job), Some(number)) => by_attempt.get(&(job.as_str(), number)),
                _ => None,
            };
            reason(instance, attempt.copied(), now, running_grace)
                .map(|reason| (instance.id.clone(), reason))
        })
        .collect()
}

fn reason(
    instance: &ReapInstance,
    attempt: Option<&ReapAttempt>,
    now: Timestamp,
    running_grace: Duration,
) -> Option<ReapReason> {
    let Some(attempt) = attempt else {
        return Some(ReapReason::NoAttempt);
    };
    if attempt.ended || attempt.job_attempt != attempt.number {
        return Some(ReapReason::AttemptEnded);
    }
    let lease_counts_until = |until: Timestamp| {
        if attempt.job_status == JobStatus::Running {
            until.plus(running_grace)
        } else {
            until
        }
    };
    match attempt.lease_until {
        None => return Some(ReapReason::LeaseExpired),
        Some(until) if lease_counts_until(until) < now => return Some(ReapReason::LeaseExpired),
        Some(_) => {}
    }
    instance
        .expires_at
        .is_some_and(|expires| expires < now)
        .then_some(ReapReason::Lifetime)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(120);

    fn instance(id: &str, job: &str, attempt: u32, expires_at: i64) -> ReapInstance {
        ReapInstance {
            id: id.into(),
            job_id: Some(job.into()),
            attempt: Some(attempt),
            expires_at: Some(Timestamp(expires_at)),
        }
    }

    fn live(job: &str, number: u32, status: JobStatus, lease_until: i64) -> ReapAttempt {
        ReapAttempt {
            job_id: job.into(),
            number,
            ended: false,
            job_attempt: number,
            job_status: status,
            lease_until: Some(Timestamp(lease_until)),
        }
    }

    #[test]
    fn a_live_attempt_under_its_lease_and_lifetime_keeps_its_instance() {
        let plan = plan(
            &[instance("i-1", "j", 1, 50_000)],
            &[live("j", 1, JobStatus::Running, 30_000)],
            Timestamp(10_000),
            GRACE,
        );
        assert!(plan.is_empty(), "{plan:?}");
    }

    #[test]
    fn an_instance_of_no_known_attempt_goes() {
        let mut orphan = instance("i-2", "gone", 1, 50_000);
        let unattached = ReapInstance {
            id: "i-3".into(),
            job_id: None,
            attempt: None,
            expires_at: None,
        };
        orphan.expires_at = None;
        assert_eq!(
            plan(&[orphan, unattached], &[], Timestamp(1), GRACE),
            [
                ("i-2".to_string(), ReapReason::NoAttempt),
                ("i-3".to_string(), ReapReason::NoAttempt)
            ]
        );
    }

    #[test]
    fn an_ended_or_superseded_attempt_frees_its_instance() {
        let mut ended = live("a", 1, JobStatus::Completed, 30_000);
        ended.ended = true;
        let mut superseded = live("b", 1, JobStatus::Provisioning, 30_000);
        superseded.job_attempt = 2;
        assert_eq!(
            plan(
                &[
                    instance("i-a", "a", 1, 50_000),
                    instance("i-b", "b", 1, 50_000)
                ],
                &[ended, superseded],
                Timestamp(10_000),
                GRACE,
            ),
            [
                ("i-a".to_string(), ReapReason::AttemptEnded),
                ("i-b".to_string(), ReapReason::AttemptEnded)
            ]
        );
    }

    #[test]
    fn a_running_job_s_lease_counts_as_expired_only_after_the_grace() {
        let instances = [instance("i-1", "j", 1, i64::MAX)];
        let running = [live("j", 1, JobStatus::Running, 10_000)];
        // Lease ran out 60 s ago, grace 120 s: its agent may be dialling another replica.
        assert!(plan(&instances, &running, Timestamp(70_000), GRACE).is_empty());
        assert_eq!(
            plan(&instances, &running, Timestamp(130_001), GRACE),
            [("i-1".to_string(), ReapReason::LeaseExpired)]
        );
        // A provisioning job has no agent to wait for: expired at once.
        let provisioning = [live("j", 1, JobStatus::Provisioning, 10_000)];
        assert_eq!(
            plan(&instances, &provisioning, Timestamp(10_001), GRACE),
            [("i-1".to_string(), ReapReason::LeaseExpired)]
        );
        let mut unleased = live("j", 1, JobStatus::Provisioning, 0);
        unleased.lease_until = None;
        assert_eq!(
            plan(&instances, &[unleased], Timestamp(1), GRACE),
            [("i-1".to_string(), ReapReason::LeaseExpired)]
        );
    }

    #[test]
    fn an_instance_past_its_lifetime_goes_though_its_lease_holds() {
        let attempts = [live("j", 1, JobStatus::Running, 100_000)];
        assert!(
            plan(
                &[instance("i-1", "j", 1, 20_000)],
                &attempts,
                Timestamp(20_000),
                GRACE
            )
            .is_empty()
        );
        assert_eq!(
            plan(
                &[instance("i-1", "j", 1, 20_000)],
                &attempts,
                Timestamp(20_001),
                GRACE
            ),
            [("i-1".to_string(), ReapReason::Lifetime)]
        );
        let mut ageless = instance("i-2", "j", 1, 0);
        ageless.expires_at = None;
        assert!(plan(&[ageless], &attempts, Timestamp(50_000), GRACE).is_empty());
    }

    #[test]
    fn the_reasons_are_checked_in_order_and_the_input_order_is_kept() {
        // Ended and past its lifetime: the attempt's end is the reason given.
        let mut ended = live("a", 1, JobStatus::Failed, 0);
        ended.ended = true;
        let expired_lease = live("b", 1, JobStatus::Provisioning, 5);
        assert_eq!(
            plan(
                &[instance("i-b", "b", 1, 1), instance("i-a", "a", 1, 1)],
                &[ended, expired_lease],
                Timestamp(10),
                GRACE,
            ),
            [
                ("i-b".to_string(), ReapReason::LeaseExpired),
                ("i-a".to_string(), ReapReason::AttemptEnded)
            ]
        );
    }
}
