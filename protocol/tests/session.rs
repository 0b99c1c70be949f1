//! The core-side session machine, driven without sockets: a fake agent feeds frames and a
//! fake clock moves time, in the manner of quinn-proto's test pairs.

use std::time::{Duration, Instant};

use stagely_protocol::session::{CoreSession, SessionError, SessionEvent};
use stagely_protocol::*;

mod common;

const HEARTBEAT: Duration = Duration::from_secs(30);

fn build(job: &str) -> Message {
    common::build_frame(job, None)
}

fn hello() -> Message {
    Message::Hello(common::agent_hello())
}

fn log(job: &str, seq: u64) -> Message {
    Message::Log(Log {
        job_id: job.into(),
        stream: LogStream::Stdout,
        data: format!("line {seq}\n"),
        seq: Some(seq),
        continued: false,
    })
}

fn status(job: &str, seq: u64) -> Message {
    Message::Status(common::completed(job, seq))
}

/// Drives a session and records what the driver would store and send.
struct Harness {
    session: CoreSession,
    now: Instant,
    stored: Vec<u64>,
    sent: Vec<Message>,
    finished: Option<Status>,
}

impl Harness {
    fn new(already_stored: u64) -> Self {
        let now = Instant::now();
        Harness {
            session: CoreSession::new("j1", build("j1"), already_stored, HEARTBEAT, now),
            now,
            stored: vec![],
            sent: vec![],
            finished: None,
        }
    }

    fn feed(&mut self, message: Message) -> Result<(), SessionError> {
        self.session.handle_frame(self.now, message)?;
        // Drain in the documented order; "persist" logs immediately.
        while let Some(event) = self.session.poll_event() {
            match event {
                SessionEvent::Started(_)
                | SessionEvent::Interrupted(_)
                | SessionEvent::Resumed { .. } => {}
                SessionEvent::Log(log) => {
                    let seq = log.seq.unwrap();
                    self.stored.push(seq);
                    self.session.handle_persisted(seq);
                }
                SessionEvent::Lines { first_seq, lines } => {
                    let last = first_seq + lines.len() as u64 - 1;
                    self.stored.extend(first_seq..=last);
                    self.session.handle_persisted(last);
                }
                SessionEvent::Finished(status) => {
                    self.session.handle_persisted(status.seq.unwrap_or(0));
                    self.finished = Some(status);
                }
            }
        }
        while let Some(frame) = self.session.poll_frame() {
            self.sent.push(frame);
        }
        Ok(())
    }

    fn last_ack(&self) -> Option<u64> {
        self.sent.iter().rev().find_map(|m| match m {
            Message::Ack(a) => Some(a.seq),
            _ => None,
        })
    }
}

#[test]
fn happy_path_hands_work_after_hello_and_acks_every_line() {
    let mut h = Harness::new(0);
    assert!(h.sent.is_empty(), "nothing is sent before HELLO");
    h.feed(hello()).unwrap();
    assert!(matches!(h.sent[0], Message::Build(_)));
    for seq in 1..=5 {
        h.feed(log("j1", seq)).unwrap();
    }
    h.feed(status("j1", 6)).unwrap();
    assert_eq!(h.stored, vec![1, 2, 3, 4, 5]);
    assert_eq!(h.last_ack(), Some(6));
    assert!(h.session.is_finished());
    assert_eq!(h.finished.unwrap().digest.as_deref(), Some("sha256:00"));
}

#[test]
fn frames_before_hello_are_violations() {
    let mut h = Harness::new(0);
    let error = h.feed(log("j1", 1)).unwrap_err();
    assert_eq!(
        error,
        SessionError::UnexpectedFrame {
            expected: "HELLO",
            got: "LOG"
        }
    );
}

#[test]
fn duplicates_are_dropped_and_reacknowledged_gaps_are_refused() {
    let mut h = Harness::new(0);
    h.feed(hello()).unwrap();
    h.feed(log("j1", 1)).unwrap();
    h.feed(log("j1", 2)).unwrap();
    // The agent lost our ACK and resends line 2, then 1: nothing is stored twice.
    h.feed(log("j1", 2)).unwrap();
    h.feed(log("j1", 1)).unwrap();
    assert_eq!(h.stored, vec![1, 2]);
    assert_eq!(h.last_ack(), Some(2));
    let error = h.feed(log("j1", 4)).unwrap_err();
    assert_eq!(
        error,
        SessionError::SeqGap {
            expected: 3,
            got: 4
        }
    );
}

#[test]
fn reconnect_resumes_after_already_stored_lines() {
    // Lines 1..=3 were stored before the connection dropped; the agent resends from 2.
    let mut h = Harness::new(3);
    h.feed(hello()).unwrap();
    for seq in 2..=5 {
        h.feed(log("j1", seq)).unwrap();
    }
    assert_eq!(h.stored, vec![4, 5]);
}

#[test]
fn frames_for_another_job_are_refused() {
    let mut h = Harness::new(0);
    h.feed(hello()).unwrap();
    let error = h.feed(log("j2", 1)).unwrap_err();
    assert!(matches!(error, SessionError::WrongJob { .. }));
    assert!(error.to_string().contains("j2"));
}

#[test]
fn missing_seq_and_bad_status_seq_are_violations() {
    let mut h = Harness::new(0);
    h.feed(hello()).unwrap();
    let no_seq = Message::Log(Log {
        job_id: "j1".into(),
        stream: LogStream::Stdout,
        data: "x".into(),
        seq: None,
        continued: false,
    });
    assert_eq!(h.feed(no_seq).unwrap_err(), SessionError::MissingSeq);
    h.feed(log("j1", 1)).unwrap();
    assert_eq!(
        h.feed(status("j1", 5)).unwrap_err(),
        SessionError::StatusSeq {
            last_log: 1,
            got: 5
        }
    );
}

#[test]
fn wrong_protocol_version_is_refused() {
    let mut h = Harness::new(0);
    let Message::Hello(mut hi) = hello() else {
        unreachable!()
    };
    hi.protocol_version = 99;
    assert!(matches!(
        h.feed(Message::Hello(hi)),
        Err(SessionError::ProtocolVersion { got: 99, .. })
    ));
}

#[test]
fn silence_past_the_heartbeat_timeout_is_a_violation_and_heartbeats_extend_it() {
    let mut h = Harness::new(0);
    h.feed(hello()).unwrap();
    let deadline = h.session.poll_timeout().unwrap();
    assert_eq!(deadline, h.now + HEARTBEAT);
    h.now += Duration::from_secs(20);
    h.feed(Message::Heartbeat(Heartbeat {
        job_id: Some("j1".into()),
    }))
    .unwrap();
    h.now += Duration::from_secs(20);
    h.session.handle_timeout(h.now).unwrap();
    h.now += Duration::from_secs(11);
    assert!(matches!(
        h.session.handle_timeout(h.now),
        Err(SessionError::HeartbeatTimeout { .. })
    ));
}

#[test]
fn resent_status_after_finish_is_acknowledged_not_reprocessed() {
    let mut h = Harness::new(0);
    h.feed(hello()).unwrap();
    h.feed(status("j1", 1)).unwrap();
    let before = h.sent.len();
    h.feed(status("j1", 1)).unwrap();
    assert_eq!(h.sent.len(), before + 1);
    assert!(matches!(h.sent.last(), Some(Message::Ack(a)) if a.seq == 1));
    assert!(h.session.poll_timeout().is_none());
}

#[test]
fn cancel_queues_a_cancel_frame() {
    let mut h = Harness::new(0);
    h.feed(hello()).unwrap();
    h.session.cancel("user asked");
    assert!(
        matches!(h.session.poll_frame(), Some(Message::Cancel(c)) if c.reason.as_deref() == Some("user asked"))
    );
}

#[test]
fn a_status_without_seq_is_numbered_and_acknowledged() {
    let mut h = Harness::new(0);
    h.feed(hello()).unwrap();
    h.feed(log("j1", 1)).unwrap();
    let Message::Status(mut bare) = status("j1", 0) else {
        unreachable!()
    };
    bare.seq = None;
    h.feed(Message::Status(bare)).unwrap();
    assert_eq!(h.finished.as_ref().unwrap().seq, Some(2));
    assert_eq!(h.last_ack(), Some(2));
}

#[test]
fn an_interruption_notice_is_an_event_and_only_for_its_job() {
    let mut session = CoreSession::new(
        "j1",
        build("j1"),
        0,
        Duration::from_secs(60),
        Instant::now(),
    );
    let notice = |job: &str| {
        Message::Interruption(Interruption {
            job_id: job.into(),
            action: "terminate".into(),
            time: Some("2026-11-26T10:30:00Z".into()),
        })
    };
    assert!(
        session.handle_frame(Instant::now(), notice("j1")).is_err(),
        "before HELLO"
    );
    let mut session = CoreSession::new(
        "j1",
        build("j1"),
        0,
        Duration::from_secs(60),
        Instant::now(),
    );
    session.handle_frame(Instant::now(), hello()).unwrap();
    session.handle_frame(Instant::now(), notice("j1")).unwrap();
    let mut interrupted = None;
    while let Some(event) = session.poll_event() {
        if let SessionEvent::Interrupted(notice) = event {
            interrupted = Some(notice);
        }
    }
    assert_eq!(interrupted.unwrap().action, "terminate");
    assert!(matches!(
        session.handle_frame(Instant::now(), notice("j2")),
        Err(SessionError::WrongJob { .. })
    ));
}

fn resume_hello(job: &str, attempt: u32, acked: u64) -> Message {
    let Message::Hello(mut hello) = hello() else {
        unreachable!()
    };
    hello.job_id = Some(job.into());
    hello.attempt = Some(attempt);
    hello.acked_seq = Some(acked);
    Message::Hello(hello)
}

/// A session for attempt 2 whose agent said HELLO and sent lines 1..=`lines`, then whose
/// connection was replaced (`reconnected`), with what was sent so far cleared.
fn dropped_after(lines: u64) -> Harness {
    let mut h = Harness::new(0);
    h.session = CoreSession::new("j1", build("j1"), 0, HEARTBEAT, h.now).with_attempt(2);
    h.feed(hello()).unwrap();
    for seq in 1..=lines {
        h.feed(log("j1", seq)).unwrap();
    }
    h.session.reconnected(h.now);
    h.sent.clear();
    h
}

#[test]
fn a_reconnecting_agent_is_told_the_stored_position_and_its_resent_lines_are_dropped() {
    // The socket drops; the agent saw ACK 2 only, and dials again. Nothing but a resuming
    // HELLO is accepted now.
    let mut h = dropped_after(4);
    assert!(h.feed(log("j1", 5)).is_err());
    let mut h2 = dropped_after(1);
    assert_eq!(
        h2.feed(resume_hello("j1", 3, 1)),
        Err(SessionError::WrongAttempt {
            expected: 2,
            got: 3
        })
    );
    let mut h3 = dropped_after(1);
    assert_eq!(h3.feed(hello()), Err(SessionError::AgentRestarted));
    // The good path: RESUME names seq 4; resent 3 and 4 are dropped, 5 is stored.
    let mut h = dropped_after(4);
    h.feed(resume_hello("j1", 2, 2)).unwrap();
    assert!(
        matches!(h.sent.as_slice(), [Message::Resume(r)] if r.seq == 4 && r.job_id == "j1"),
        "{:?}",
        h.sent
    );
    for seq in 3..=5 {
        h.feed(log("j1", seq)).unwrap();
    }
    assert_eq!(h.stored, vec![1, 2, 3, 4, 5]);
    h.feed(status("j1", 6)).unwrap();
    assert!(h.finished.is_some());
}

#[test]
fn an_adopted_attempt_takes_only_a_resuming_hello_and_a_cancel_is_told_again() {
    let now = Instant::now();
    let mut h = Harness::new(0);
    h.session = CoreSession::adopted("j1", 1, 7, HEARTBEAT, now);
    // A fresh HELLO would restart the build: refused.
    assert_eq!(h.feed(hello()), Err(SessionError::AgentRestarted));
    let mut h = Harness::new(0);
    h.session = CoreSession::adopted("j1", 1, 7, HEARTBEAT, now);
    // A cancel before the agent is back waits for it.
    h.session.cancel("user asked");
    assert!(h.session.poll_frame().is_none());
    h.feed(resume_hello("j1", 1, 5)).unwrap();
    assert!(matches!(&h.sent[0], Message::Resume(r) if r.seq == 7));
    assert!(matches!(&h.sent[1], Message::Cancel(c) if c.reason.as_deref() == Some("user asked")));
    h.feed(log("j1", 7)).unwrap();
    h.feed(log("j1", 8)).unwrap();
    assert_eq!(h.stored, vec![8]);
    // After another drop the cancel is told again too.
    h.session.reconnected(h.now);
    h.sent.clear();
    h.feed(resume_hello("j1", 1, 8)).unwrap();
    assert!(matches!(&h.sent[0], Message::Resume(r) if r.seq == 8));
    assert!(matches!(&h.sent[1], Message::Cancel(_)));
}

#[test]
fn work_not_yet_answered_with_a_line_is_sent_again_to_a_fresh_hello() {
    // The BUILD was lost with the connection: the agent, which never got it, says HELLO
    // afresh and gets it again.
    let mut h = Harness::new(0);
    h.feed(hello()).unwrap();
    h.session.reconnected(h.now);
    h.sent.clear();
    h.feed(hello()).unwrap();
    assert!(matches!(h.sent.as_slice(), [Message::Build(_)]));
}

fn logs(job: &str, first: u64, count: u64) -> Message {
    Message::Logs(Logs {
        job_id: job.into(),
        seq: first,
        lines: (first..first + count)
            .map(|seq| LogLine {
                stream: LogStream::Stdout,
                data: format!("line {seq}\n"),
                continued: false,
            })
            .collect(),
    })
}

#[test]
fn a_logs_frame_stores_its_new_lines_once_whatever_overlaps() {
    let mut h = Harness::new(0);
    h.feed(hello()).unwrap();
    h.feed(logs("j1", 1, 3)).unwrap();
    assert_eq!(h.stored, vec![1, 2, 3]);
    assert_eq!(h.last_ack(), Some(3));
    // Resent whole after a reconnect: nothing new, acknowledged again.
    h.sent.clear();
    h.feed(logs("j1", 1, 3)).unwrap();
    assert_eq!(h.stored, vec![1, 2, 3]);
    assert_eq!(h.last_ack(), Some(3));
    // Overlapping: only 4 and 5 are new.
    h.feed(logs("j1", 2, 4)).unwrap();
    assert_eq!(h.stored, vec![1, 2, 3, 4, 5]);
    // Single LOG frames (the seed's shape) and LOGS mix.
    h.feed(log("j1", 6)).unwrap();
    h.feed(logs("j1", 7, 2)).unwrap();
    assert_eq!(h.stored, (1..=8).collect::<Vec<_>>());
    // A gap, an empty frame and an oversized one are violations.
    assert_eq!(
        h.feed(logs("j1", 10, 1)),
        Err(SessionError::SeqGap {
            expected: 9,
            got: 10
        })
    );
    assert_eq!(h.feed(logs("j1", 9, 0)), Err(SessionError::EmptyBatch));
    assert_eq!(
        h.feed(logs("j1", 9, MAX_LINES_PER_FRAME as u64 + 1)),
        Err(SessionError::TooManyLines {
            got: MAX_LINES_PER_FRAME + 1,
            max: MAX_LINES_PER_FRAME
        })
    );
    h.feed(status("j1", 9)).unwrap();
    assert!(h.finished.is_some());
}
