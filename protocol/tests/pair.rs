//! Both sides of the link at once, in the manner of quinn-proto's `Pair`: an
//! [`AgentSession`] and a [`CoreSession`] joined by two in-memory queues (one per direction),
//! a fake clock, a spool on the agent's side (lines and their send cursor) and a store on the
//! core's (what was durably stored). Faults are injected between them: frames lost with a
//! broken connection, frames delivered twice, an ACK lost or arriving late, a core restart
//! that forgot what it had not stored, silence. Every test ends by checking the invariant:
//! the core stored every line the build printed, once each, in order, and the STATUS.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use stagely_protocol::agent_session::{AgentError, AgentEvent, AgentSession, AgentTimers};
use stagely_protocol::session::{CoreSession, SessionError, SessionEvent};
use stagely_protocol::*;

mod common;

fn hello() -> Hello {
    common::agent_hello()
}

fn build() -> Message {
    common::build_frame(JOB, Some(1))
}

fn completed(seq: u64) -> Status {
    common::completed(JOB, seq)
}

const JOB: &str = "j1";
const TIMERS: AgentTimers = AgentTimers {
    heartbeat_every: Duration::from_secs(10),
    core_silence_limit: Duration::from_secs(60),
    final_ack_wait: Duration::from_secs(30),
    reconnect_grace: Duration::from_secs(300),
};
const CORE_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the core's driver sends HEARTBEAT (its agent link does every 15 s).
const CORE_HEARTBEAT_EVERY: Duration = Duration::from_secs(15);

/// The two machines, the wire between them and what each side keeps.
struct Pair {
    start: Instant,
    now: Instant,
    agent: AgentSession,
    core: CoreSession,
    /// Frames in flight, agent → core and core → agent.
    to_core: VecDeque<Message>,
    to_agent: VecDeque<Message>,
    /// Whether a connection is open (frames in flight are lost when it breaks).
    connected: bool,
    /// The agent's resuming HELLO while it dials again.
    redial: Option<Hello>,
    /// The agent's spool: every line printed, the first one not yet acknowledged, the next
    /// one to send.
    printed: Vec<String>,
    spool_from: u64,
    send_from: u64,
    /// Lines per LOGS frame.
    batch: usize,
    /// The core's store: lines by seq (index + 1), and the STATUS.
    stored: Vec<String>,
    stored_status: Option<Status>,
    /// What happened on each side.
    cancelled: Option<Option<String>>,
    done: bool,
    agent_errors: Vec<AgentError>,
    core_error: Option<SessionError>,
    /// When the core's driver next sends a HEARTBEAT.
    core_heartbeat_at: Instant,
    /// HEARTBEATs the core received from the agent.
    agent_heartbeats: usize,
}

impl Pair {
    /// A job whose BUILD the agent has just received (the core's session sent it).
    fn new() -> Pair {
        let now = Instant::now();
        let mut core =
            CoreSession::new(JOB, build(), 0, CORE_HEARTBEAT_TIMEOUT, now).with_attempt(1);
        core.handle_frame(now, Message::Hello(hello()))
            .expect("HELLO");
        while core.poll_event().is_some() {}
        let work = core.poll_frame().expect("the BUILD");
        assert_eq!(work.type_name(), "BUILD");
        Pair {
            start: now,
            now,
            agent: AgentSession::new(JOB, Some(1), hello(), TIMERS, now),
            core,
            to_core: VecDeque::new(),
            to_agent: VecDeque::new(),
            connected: true,
            redial: None,
            printed: vec![],
            spool_from: 1,
            send_from: 1,
            batch: 3,
            stored: vec![],
            stored_status: None,
            cancelled: None,
            done: false,
            agent_errors: vec![],
            core_error: None,
            core_heartbeat_at: now + CORE_HEARTBEAT_EVERY,
            agent_heartbeats: 0,
        }
    }

    fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// The build prints `n` more lines.
    fn print(&mut self, n: usize) {
        for _ in 0..n {
            let seq = self.printed.len() + 1;
            self.printed.push(format!("line {seq}\n"));
        }
    }

    /// The build ends: its STATUS follows the last line.
    fn finish(&mut self) {
        let seq = self.printed.len() as u64 + 1;
        self.agent.handle_finished(completed(seq));
    }

    fn lines_unsent(&self) -> bool {
        self.send_from <= self.printed.len() as u64
    }

    /// The agent's driver: handles the session's events, then sends what it may.
    fn agent_step(&mut self) {
        while let Some(event) = self.agent.poll_event() {
            match event {
                AgentEvent::Acked { seq } => self.spool_from = self.spool_from.max(seq + 1),
                AgentEvent::Rewind { seq } => {
                    self.spool_from = self.spool_from.max(seq + 1);
                    self.send_from = self.spool_from;
                }
                AgentEvent::Redial { hello, .. } => {
                    self.break_connection();
                    self.redial = Some(*hello);
                }
                AgentEvent::CancelJob { reason } => self.cancelled = Some(reason),
                AgentEvent::Done => self.done = true,
            }
        }
        if !self.connected {
            return;
        }
        loop {
            if let Some(frame) = self.agent.poll_frame(self.now, self.lines_unsent()) {
                self.to_core.push_back(frame);
                continue;
            }
            if !self.lines_unsent() {
                break;
            }
            let first = self.send_from;
            let last = (first + self.batch as u64 - 1).min(self.printed.len() as u64);
            let lines = (first..=last)
                .map(|seq| LogLine {
                    stream: LogStream::Stdout,
                    data: self.printed[seq as usize - 1].clone(),
                    continued: false,
                })
                .collect();
            self.to_core.push_back(Message::Logs(Logs {
                job_id: JOB.into(),
                seq: first,
                lines,
            }));
            self.send_from = last + 1;
        }
    }

    /// The core's driver: stores what its session delivers, then sends what it queued.
    fn core_step(&mut self) {
        while let Some(event) = self.core.poll_event() {
            match event {
                SessionEvent::Lines { first_seq, lines } => {
                    assert_eq!(first_seq, self.stored.len() as u64 + 1, "stored in order");
                    self.stored.extend(lines.into_iter().map(|line| line.data));
                    self.core.handle_persisted(self.stored.len() as u64);
                }
                SessionEvent::Log(log) => {
                    self.stored.push(log.data);
                    self.core.handle_persisted(self.stored.len() as u64);
                }
                SessionEvent::Finished(status) => {
                    self.core.handle_persisted(status.seq.expect("a seq"));
                    self.stored_status = Some(status);
                }
                SessionEvent::Started(_)
                | SessionEvent::Resumed { .. }
                | SessionEvent::Interrupted(_) => {}
            }
        }
        while let Some(frame) = self.core.poll_frame() {
            if self.connected {
                self.to_agent.push_back(frame);
            }
        }
    }

    /// Delivers one frame each way (if any); true when something moved.
    fn deliver_one(&mut self) -> bool {
        let mut moved = false;
        if let Some(frame) = self.to_core.pop_front() {
            if frame.type_name() == "HEARTBEAT" {
                self.agent_heartbeats += 1;
            }
            if let Err(error) = self.core.handle_frame(self.now, frame) {
                self.core_error = Some(error);
            }
            self.core_step();
            moved = true;
        }
        if let Some(frame) = self.to_agent.pop_front() {
            if let Err(error) = self.agent.handle_frame(self.now, frame) {
                self.agent_errors.push(error);
            }
            moved = true;
        }
        self.agent_step();
        moved
    }

    /// Runs both sides until nothing moves.
    fn settle(&mut self) {
        self.agent_step();
        self.core_step();
        while self.deliver_one() {}
    }

    /// Moves the clock by `by`, firing every deadline of both sides (and the core's
    /// heartbeats) on the way, in order.
    fn advance(&mut self, by: Duration) -> Result<(), AgentError> {
        let end = self.now + by;
        loop {
            let next = [
                self.agent.poll_timeout(),
                self.core.poll_timeout(),
                Some(self.core_heartbeat_at),
            ]
            .into_iter()
            .flatten()
            .filter(|at| *at <= end)
            .min();
            let Some(at) = next else { break };
            self.now = at;
            if at >= self.core_heartbeat_at {
                self.core_heartbeat_at = at + CORE_HEARTBEAT_EVERY;
                if self.connected {
                    self.to_agent.push_back(Message::Heartbeat(Heartbeat {
                        job_id: Some(JOB.into()),
                    }));
                }
            }
            self.agent.handle_timeout(at)?;
            if let Err(error) = self.core.handle_timeout(at) {
                self.core_error = Some(error);
                return Ok(());
            }
            self.settle();
        }
        self.now = end;
        self.settle();
        Ok(())
    }

    /// The connection breaks: frames in flight are lost, and the agent notices.
    fn break_connection(&mut self) {
        self.connected = false;
        self.to_core.clear();
        self.to_agent.clear();
    }

    fn lose_connection(&mut self) {
        self.break_connection();
        self.agent.handle_lost(self.now, "connection reset");
        self.agent_step();
    }

    /// The agent's dial succeeds: its resuming HELLO reaches `core` (the same session, told
    /// the link was replaced, or a new one after a core restart), whose RESUME answers it.
    fn reconnect(&mut self) {
        self.resume();
        self.settle();
    }

    /// The dial's handshake: the resuming HELLO (checked) to the core, its RESUME to the agent.
    fn resume(&mut self) {
        let hello = self.redial.take().expect("the agent is dialling");
        assert_eq!(hello.job_id.as_deref(), Some(JOB));
        assert_eq!(hello.attempt, Some(1));
        assert_eq!(hello.acked_seq, Some(self.agent.acked()));
        self.core.reconnected(self.now);
        self.core
            .handle_frame(self.now, Message::Hello(hello))
            .expect("a resuming HELLO");
        while self.core.poll_event().is_some() {}
        let Some(Message::Resume(resume)) = self.core.poll_frame() else {
            panic!("the core answers a resuming HELLO with RESUME");
        };
        self.connected = true;
        self.agent.handle_resumed(self.now, resume.seq);
    }

    /// The core restarts: what it delivered but did not store is gone, and a new session
    /// takes the attempt over at the stored position.
    fn restart_core(&mut self, stored_lines: usize) {
        self.break_connection();
        self.stored.truncate(stored_lines);
        self.core = CoreSession::adopted(
            JOB,
            1,
            stored_lines as u64,
            CORE_HEARTBEAT_TIMEOUT,
            self.now,
        );
    }

    /// The invariant: every printed line stored once, in order, and the STATUS.
    fn assert_delivered_exactly_once(&self) {
        assert_eq!(self.stored, self.printed, "every line once, in order");
        let status = self.stored_status.as_ref().expect("the STATUS is stored");
        assert_eq!(status.seq, Some(self.printed.len() as u64 + 1));
        assert!(self.done, "the agent knows the STATUS is stored");
        assert!(self.agent.is_done());
        assert!(self.core.is_finished());
        assert_eq!(self.core_error, None);
    }
}

#[test]
fn a_job_s_lines_and_status_arrive_once_and_the_agent_learns_it() {
    let mut pair = Pair::new();
    pair.print(10);
    pair.settle();
    assert_eq!(pair.stored.len(), 10);
    // Acknowledged lines leave the spool.
    assert_eq!(pair.spool_from, 11);
    pair.print(2);
    pair.finish();
    pair.settle();
    pair.assert_delivered_exactly_once();
    assert_eq!(
        pair.agent.poll_timeout(),
        None,
        "a finished link waits for nothing"
    );
}

#[test]
fn frames_lost_with_a_broken_connection_are_sent_again_from_the_core_s_position() {
    let mut pair = Pair::new();
    pair.print(5);
    pair.settle();
    // Six lines go out and the connection breaks before any reaches the core.
    pair.print(6);
    pair.agent_step();
    assert!(!pair.to_core.is_empty());
    pair.lose_connection();
    assert!(!pair.agent.is_connected());
    // The build goes on while the agent dials.
    pair.print(4);
    pair.finish();
    pair.advance(Duration::from_secs(3)).unwrap();
    pair.reconnect();
    pair.assert_delivered_exactly_once();
}

#[test]
fn duplicated_frames_are_stored_once() {
    let mut pair = Pair::new();
    pair.print(7);
    pair.agent_step();
    // Every frame reaches the core twice.
    let frames: Vec<Message> = pair.to_core.drain(..).collect();
    for frame in frames {
        pair.to_core.push_back(frame.clone());
        pair.to_core.push_back(frame);
    }
    pair.settle();
    pair.finish();
    pair.agent_step();
    let status = pair.to_core.back().cloned().expect("the STATUS");
    pair.to_core.push_back(status);
    pair.settle();
    pair.assert_delivered_exactly_once();
}

#[test]
fn lines_acknowledged_but_unheard_are_resent_after_a_reconnect_and_a_late_ack_changes_nothing() {
    let mut pair = Pair::new();
    pair.print(9);
    pair.agent_step();
    // The core stores everything, but its ACKs never reach the agent.
    while let Some(frame) = pair.to_core.pop_front() {
        pair.core.handle_frame(pair.now, frame).unwrap();
        pair.core_step();
    }
    let acks: Vec<Message> = pair.to_agent.drain(..).collect();
    assert!(!acks.is_empty());
    assert_eq!(pair.agent.acked(), 0);
    pair.lose_connection();
    pair.print(3);
    pair.reconnect();
    // The RESUME said 9: nothing was sent twice, and the agent trimmed its spool.
    assert_eq!(pair.agent.acked(), 12);
    // An ACK from the old connection, arriving late, is lower than what the agent knows.
    pair.agent.handle_frame(pair.now, acks[0].clone()).unwrap();
    assert_eq!(pair.agent.acked(), 12);
    pair.finish();
    pair.settle();
    pair.assert_delivered_exactly_once();
}

#[test]
fn a_core_restart_resumes_from_its_lower_stored_position_and_nothing_is_lost() {
    let mut pair = Pair::new();
    pair.print(20);
    pair.settle();
    assert_eq!(pair.agent.acked(), 20);
    // More lines went out; the core delivered them but crashed having stored only 20 (its
    // ACKs for the rest were never sent).
    pair.print(8);
    pair.agent_step();
    while let Some(frame) = pair.to_core.pop_front() {
        pair.core.handle_frame(pair.now, frame).unwrap();
        while let Some(event) = pair.core.poll_event() {
            if let SessionEvent::Lines { lines, .. } = event {
                pair.stored.extend(lines.into_iter().map(|line| line.data));
            }
        }
    }
    assert_eq!(pair.stored.len(), 28);
    pair.restart_core(20);
    pair.agent.handle_lost(pair.now, "connection reset");
    pair.agent_step();
    pair.print(2);
    pair.finish();
    pair.reconnect();
    pair.assert_delivered_exactly_once();
}

#[test]
fn a_status_whose_ack_is_lost_is_sent_again_and_a_status_stored_before_the_drop_ends_the_job() {
    // The ACK of the STATUS is lost: the agent gives the connection up after the final-ACK
    // wait, and the RESUME (at the STATUS's seq) tells it the job is stored.
    let mut pair = Pair::new();
    pair.print(4);
    pair.finish();
    pair.agent_step();
    while let Some(frame) = pair.to_core.pop_front() {
        pair.core.handle_frame(pair.now, frame).unwrap();
        pair.core_step();
    }
    pair.to_agent.clear();
    assert!(!pair.done);
    pair.advance(TIMERS.final_ack_wait).unwrap();
    assert!(
        pair.redial.is_some(),
        "the unacknowledged STATUS gave the connection up"
    );
    assert_eq!(pair.core_error, None);
    // The core restarted meanwhile, having stored everything: its RESUME names the STATUS's
    // seq, and the agent is done without sending anything again.
    pair.restart_core(4);
    pair.reconnect();
    assert!(pair.done && pair.agent.is_done());
    assert!(pair.to_core.is_empty(), "nothing was sent again");
    assert_eq!(pair.stored, pair.printed);
    assert_eq!(pair.stored_status.as_ref().and_then(|s| s.seq), Some(5));

    // The STATUS reaches a core that never stored it: it is sent again on the new connection.
    let mut pair = Pair::new();
    pair.print(2);
    pair.finish();
    pair.agent_step();
    pair.lose_connection();
    pair.reconnect();
    pair.assert_delivered_exactly_once();
}

#[test]
fn heartbeats_keep_a_quiet_link_alive_on_both_sides() {
    let mut pair = Pair::new();
    pair.print(1);
    pair.settle();
    // Ten quiet minutes: the agent's heartbeats keep the core's deadline away, the core's
    // ACKs and the agent's own frames keep the agent's.
    for _ in 0..60 {
        pair.advance(Duration::from_secs(10)).unwrap();
    }
    assert_eq!(pair.core_error, None, "the core heard the agent throughout");
    assert_eq!(pair.agent_heartbeats, 60, "one every 10 s");
    assert_eq!(pair.redial, None, "the agent heard the core throughout");
    assert!(pair.agent.is_connected());
    pair.finish();
    pair.settle();
    pair.assert_delivered_exactly_once();
    assert!(pair.elapsed() >= Duration::from_secs(600));
}

#[test]
fn a_silent_agent_times_out_at_the_core_and_a_silent_core_makes_the_agent_dial_again() {
    // The agent's frames stop reaching the core (a half-open connection).
    let mut pair = Pair::new();
    pair.print(1);
    pair.settle();
    let mut at = pair.now;
    let error = loop {
        at += Duration::from_secs(1);
        pair.to_core.clear();
        if let Err(error) = pair.core.handle_timeout(at) {
            break error;
        }
        assert!(
            at - pair.start <= CORE_HEARTBEAT_TIMEOUT,
            "the core waited too long"
        );
    };
    assert!(
        matches!(error, SessionError::HeartbeatTimeout { .. }),
        "{error}"
    );

    // The core's frames stop reaching the agent: after the silence limit it dials again,
    // with a HELLO naming what was acknowledged.
    let mut pair = Pair::new();
    pair.print(3);
    pair.settle();
    let deadline = pair.now + TIMERS.core_silence_limit;
    assert!(pair.agent.poll_timeout().unwrap() <= deadline);
    let mut now = pair.now;
    while pair.agent.is_connected() {
        now = pair.agent.poll_timeout().unwrap();
        pair.agent.handle_timeout(now).unwrap();
        while pair.agent.poll_frame(now, false).is_some() {}
    }
    assert_eq!(now, deadline);
    let Some(AgentEvent::Redial { hello, reason }) = pair.agent.poll_event() else {
        panic!("the agent dials again");
    };
    assert_eq!(hello.acked_seq, Some(3));
    assert!(reason.contains("no frame from the core"), "{reason}");
}

#[test]
fn the_reconnect_grace_ends_the_job_when_the_core_never_comes_back() {
    let mut pair = Pair::new();
    pair.print(2);
    pair.settle();
    pair.lose_connection();
    let lost = pair.now;
    assert_eq!(
        pair.agent.poll_timeout(),
        Some(lost + TIMERS.reconnect_grace)
    );
    assert_eq!(
        pair.agent.handle_timeout(lost + Duration::from_secs(299)),
        Ok(())
    );
    assert_eq!(
        pair.agent.handle_timeout(lost + TIMERS.reconnect_grace),
        Err(AgentError::GraceExpired {
            grace: TIMERS.reconnect_grace
        })
    );
}

#[test]
fn an_interruption_goes_before_any_further_line_and_again_on_every_resumed_connection() {
    let mut pair = Pair::new();
    pair.print(2);
    pair.settle();
    pair.print(3);
    pair.agent.handle_interruption(Interruption {
        job_id: JOB.into(),
        action: "terminate".into(),
        time: None,
    });
    // A second notice changes nothing.
    pair.agent.handle_interruption(Interruption {
        job_id: JOB.into(),
        action: SHUTDOWN_ACTION.into(),
        time: None,
    });
    assert!(pair.agent.is_interrupted());
    pair.agent_step();
    assert_eq!(
        pair.to_core.front().map(Message::type_name),
        Some("INTERRUPTION")
    );
    assert_eq!(
        pair.to_core
            .iter()
            .filter(|m| m.type_name() == "INTERRUPTION")
            .count(),
        1
    );
    // The connection breaks before the core reads it: the resumed one carries it again.
    pair.lose_connection();
    pair.reconnect_without_settling();
    pair.agent_step();
    assert_eq!(
        pair.to_core.front().map(Message::type_name),
        Some("INTERRUPTION")
    );
    let Some(Message::Interruption(notice)) = pair.to_core.front() else {
        unreachable!()
    };
    assert_eq!(notice.action, "terminate");
}

#[test]
fn a_cancel_from_the_core_reaches_the_driver_and_stray_frames_are_not_fatal() {
    let mut pair = Pair::new();
    pair.print(1);
    pair.settle();
    pair.core.cancel("user");
    pair.core_step();
    pair.settle();
    assert_eq!(pair.cancelled, Some(Some("user".into())));
    // A frame the core must not send mid-job, and one for another job: ignored, named.
    assert_eq!(
        pair.agent.handle_frame(pair.now, build()),
        Err(AgentError::UnexpectedFrame { frame: "BUILD" })
    );
    let other = Message::Ack(Ack {
        job_id: "j2".into(),
        seq: 99,
    });
    assert!(matches!(
        pair.agent.handle_frame(pair.now, other),
        Err(AgentError::WrongJob { .. })
    ));
    assert_eq!(pair.agent.acked(), 1);
    pair.finish();
    pair.settle();
    pair.assert_delivered_exactly_once();
}

impl Pair {
    /// [`Pair::reconnect`] without running the sides afterwards (to look at the first frames).
    fn reconnect_without_settling(&mut self) {
        self.resume();
        while let Some(event) = self.agent.poll_event() {
            assert!(matches!(event, AgentEvent::Rewind { .. }), "{event:?}");
        }
    }
}
