//! The core's side of one agent connection, as a deterministic state machine.
//!
//! No sockets and no clock: the driver feeds decoded frames with [`CoreSession::handle_frame`],
//! tells it what it stored with [`CoreSession::handle_persisted`], and passes `now` in; it
//! drains outputs in this order after every input:
//!
//! 1. [`CoreSession::poll_event`] until `None` (hello, log lines to store, final status),
//! 2. [`CoreSession::poll_frame`] until `None` (BUILD/MERGE, ACK, CANCEL to send),
//! 3. [`CoreSession::poll_timeout`] for the next deadline, at which it calls
//!    [`CoreSession::handle_timeout`].
//!
//! Any error returned is a protocol violation by the agent: the driver closes the connection
//! with the error's text and fails the job; nothing else is affected.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::{
    Ack, Cancel, Hello, Interruption, Log, LogLine, Logs, MAX_LINES_PER_FRAME, Message,
    PROTOCOL_VERSION, Resume, Status,
};

/// What the driver must act on.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionEvent {
    /// The agent introduced itself; the work frame has been queued.
    Started(Hello),
    /// A reconnecting agent took the job up again; RESUME (with the stored position) has
    /// been queued. `acked_seq` is what the agent says it saw acknowledged.
    Resumed { acked_seq: u64 },
    /// A new line to store (never a duplicate). `seq` is always set.
    Log(Log),
    /// New consecutive lines to store (never duplicates): `lines[i]` has seq `first_seq + i`.
    Lines { first_seq: u64, lines: Vec<LogLine> },
    /// The job ended. Every line before it has already been delivered as `Log`.
    Finished(Status),
    /// The cloud is reclaiming the instance: the job cannot finish here.
    Interrupted(Interruption),
}

/// A rule the agent broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("expected {expected} frame, got {got}")]
    UnexpectedFrame {
        expected: &'static str,
        got: &'static str,
    },
    #[error("{frame} frame names job `{got}` but this connection serves job `{expected}`")]
    WrongJob {
        frame: &'static str,
        expected: String,
        got: String,
    },
    #[error("HELLO announces protocol version {got}, this core speaks {expected}")]
    ProtocolVersion { got: u32, expected: u32 },
    #[error("LOG frame has no `seq`")]
    MissingSeq,
    #[error("LOG frame seq {got} skips ahead; next expected seq is {expected}")]
    SeqGap { expected: u64, got: u64 },
    #[error("LOGS frame carries no line")]
    EmptyBatch,
    #[error("LOGS frame carries {got} lines; at most {max} are allowed")]
    TooManyLines { got: usize, max: usize },
    #[error("STATUS frame seq {got} does not follow the last LOG seq {last_log}")]
    StatusSeq { last_log: u64, got: u64 },
    #[error("agent sent nothing for {silent_ms} ms (heartbeat timeout)")]
    HeartbeatTimeout { silent_ms: u128 },
    #[error("{frame} frame after STATUS")]
    AfterFinish { frame: &'static str },
    #[error(
        "HELLO starts the job afresh, but the agent already ran it (a reconnecting agent must name job_id, attempt and acked_seq)"
    )]
    AgentRestarted,
    #[error("HELLO resumes attempt {got} but this connection serves attempt {expected}")]
    WrongAttempt { expected: u32, got: u32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitingHello,
    Working,
    Finished,
}

/// Core-side state of one agent connection serving one job.
#[derive(Debug)]
pub struct CoreSession {
    job_id: String,
    /// The attempt this session serves, when known: a resuming HELLO must name it.
    attempt: Option<u32>,
    phase: Phase,
    /// The BUILD or MERGE frame handed over once HELLO arrives (`None`: an adopted attempt
    /// whose agent already has it).
    work: Option<Message>,
    /// Highest log seq stored before this session began (an adopted attempt's).
    initial_seq: u64,
    /// Why the core asked the agent to stop, so a reconnecting agent is told again.
    cancel_reason: Option<String>,
    /// Highest log seq delivered to the driver (lines 1..=this are known).
    delivered_seq: u64,
    /// Highest seq the driver reported as durably stored.
    persisted_seq: u64,
    heartbeat_timeout: Duration,
    last_heard: Instant,
    outgoing: VecDeque<Message>,
    events: VecDeque<SessionEvent>,
}

impl CoreSession {
    /// A session for `job_id` that will hand `work` (a BUILD or MERGE) to the agent.
    /// `already_stored_seq` is the highest log seq already in the database for this job
    /// (non-zero when an agent reconnects), so resent lines are recognised as duplicates.
    pub fn new(
        job_id: impl Into<String>,
        work: Message,
        already_stored_seq: u64,
        heartbeat_timeout: Duration,
        now: Instant,
    ) -> Self {
        CoreSession {
            job_id: job_id.into(),
            attempt: None,
            phase: Phase::AwaitingHello,
            work: Some(work),
            initial_seq: already_stored_seq,
            cancel_reason: None,
            delivered_seq: already_stored_seq,
            persisted_seq: already_stored_seq,
            heartbeat_timeout,
            last_heard: now,
            outgoing: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// A session for another job on a connection whose agent already said HELLO and
    /// accepts more work: `work` is sent at once, and the job's frames start at `seq` 1.
    pub fn handed_over(
        job_id: impl Into<String>,
        work: Message,
        heartbeat_timeout: Duration,
        now: Instant,
    ) -> Self {
        let mut session = CoreSession::new(job_id, work, 0, heartbeat_timeout, now);
        session.phase = Phase::Working;
        if let Some(work) = session.work.take() {
            session.outgoing.push_back(work);
        }
        session
    }

    /// A session for an attempt whose agent already has its work (this core took the attempt
    /// over from a core that stopped): only a resuming HELLO is accepted, answered with
    /// RESUME at `stored_seq`.
    pub fn adopted(
        job_id: impl Into<String>,
        attempt: u32,
        stored_seq: u64,
        heartbeat_timeout: Duration,
        now: Instant,
    ) -> Self {
        let mut session = CoreSession::new(
            job_id,
            Message::Heartbeat(crate::Heartbeat { job_id: None }),
            stored_seq,
            heartbeat_timeout,
            now,
        );
        session.work = None;
        session.attempt = Some(attempt);
        session
    }

    /// Names the attempt this session serves (a resuming HELLO must name the same).
    pub fn with_attempt(mut self, attempt: u32) -> Self {
        self.attempt = Some(attempt);
        self
    }

    /// The connection was replaced (the agent dialled again): a resuming HELLO is expected
    /// next. Frames not yet sent are dropped but a CANCEL, which is queued again after
    /// RESUME; lines delivered but not reported stored will be resent by the agent.
    pub fn reconnected(&mut self, now: Instant) {
        self.last_heard = now;
        self.outgoing.clear();
        if self.phase == Phase::Working {
            self.phase = Phase::AwaitingHello;
        }
        self.delivered_seq = self.persisted_seq;
    }

    /// Highest seq reported stored.
    pub fn persisted_seq(&self) -> u64 {
        self.persisted_seq
    }

    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    pub fn is_finished(&self) -> bool {
        self.phase == Phase::Finished
    }

    /// Feeds one decoded frame from the agent.
    pub fn handle_frame(&mut self, now: Instant, message: Message) -> Result<(), SessionError> {
        self.last_heard = now;
        let frame = message.type_name();
        if let Some(job_id) = message.job_id()
            && job_id != self.job_id
        {
            return Err(SessionError::WrongJob {
                frame,
                expected: self.job_id.clone(),
                got: job_id.to_string(),
            });
        }
        match (self.phase, message) {
            (_, Message::Heartbeat(_)) => Ok(()),
            (Phase::AwaitingHello, Message::Hello(hello)) => {
                if hello.protocol_version != PROTOCOL_VERSION {
                    return Err(SessionError::ProtocolVersion {
                        got: hello.protocol_version,
                        expected: PROTOCOL_VERSION,
                    });
                }
                if hello.is_resume() {
                    return self.resume(hello);
                }
                // A fresh HELLO gets the work — unless the agent already ran part of it.
                let Some(work) = self.work.clone() else {
                    return Err(SessionError::AgentRestarted);
                };
                if self.delivered_seq > self.initial_seq {
                    return Err(SessionError::AgentRestarted);
                }
                self.phase = Phase::Working;
                self.outgoing.push_back(work);
                self.requeue_cancel();
                self.events.push_back(SessionEvent::Started(hello));
                Ok(())
            }
            (Phase::AwaitingHello, _) => Err(SessionError::UnexpectedFrame {
                expected: "HELLO",
                got: frame,
            }),
            (Phase::Working, Message::Log(log)) => self.handle_log(log),
            (Phase::Working, Message::Logs(logs)) => self.handle_logs(logs),
            (Phase::Working, Message::Interruption(notice)) => {
                self.events.push_back(SessionEvent::Interrupted(notice));
                Ok(())
            }
            (Phase::Working, Message::Status(mut status)) => {
                // A STATUS without `seq` (the seed's shape) takes the next position, so it
                // can still be acknowledged.
                status.seq.get_or_insert(self.delivered_seq + 1);
                if let Some(seq) = status.seq
                    && seq != self.delivered_seq + 1
                {
                    return Err(SessionError::StatusSeq {
                        last_log: self.delivered_seq,
                        got: seq,
                    });
                }
                self.phase = Phase::Finished;
                self.events.push_back(SessionEvent::Finished(status));
                Ok(())
            }
            (Phase::Working, _) => Err(SessionError::UnexpectedFrame {
                expected: "LOG, LOGS, STATUS, INTERRUPTION or HEARTBEAT",
                got: frame,
            }),
            (Phase::Finished, Message::Status(_) | Message::Log(_) | Message::Logs(_)) => {
                // A resend after a lost ACK: acknowledge again, store nothing.
                self.queue_ack();
                Ok(())
            }
            (Phase::Finished, _) => Err(SessionError::AfterFinish { frame }),
        }
    }

    fn resume(&mut self, hello: Hello) -> Result<(), SessionError> {
        if let (Some(expected), Some(got)) = (self.attempt, hello.attempt)
            && expected != got
        {
            return Err(SessionError::WrongAttempt { expected, got });
        }
        self.phase = Phase::Working;
        self.outgoing.push_back(Message::Resume(Resume {
            job_id: self.job_id.clone(),
            seq: self.persisted_seq,
        }));
        self.requeue_cancel();
        self.events.push_back(SessionEvent::Resumed {
            acked_seq: hello.acked_seq.unwrap_or(0),
        });
        Ok(())
    }

    fn requeue_cancel(&mut self) {
        if let Some(reason) = &self.cancel_reason {
            self.outgoing.push_back(Message::Cancel(Cancel {
                job_id: self.job_id.clone(),
                reason: Some(reason.clone()),
            }));
        }
    }

    fn handle_log(&mut self, log: Log) -> Result<(), SessionError> {
        let seq = log.seq.ok_or(SessionError::MissingSeq)?;
        let expected = self.delivered_seq + 1;
        if seq < expected {
            // Duplicate of a line we already have: drop it, re-acknowledge.
            self.queue_ack();
            return Ok(());
        }
        if seq > expected {
            return Err(SessionError::SeqGap { expected, got: seq });
        }
        self.delivered_seq = seq;
        self.events.push_back(SessionEvent::Log(log));
        Ok(())
    }

    fn handle_logs(&mut self, logs: Logs) -> Result<(), SessionError> {
        let count = logs.lines.len();
        if count == 0 {
            return Err(SessionError::EmptyBatch);
        }
        if count > MAX_LINES_PER_FRAME {
            return Err(SessionError::TooManyLines {
                got: count,
                max: MAX_LINES_PER_FRAME,
            });
        }
        let expected = self.delivered_seq + 1;
        let last = logs.seq.saturating_add(count as u64 - 1);
        if last < expected {
            // All of it resent after a reconnect: drop it, re-acknowledge.
            self.queue_ack();
            return Ok(());
        }
        if logs.seq > expected {
            return Err(SessionError::SeqGap {
                expected,
                got: logs.seq,
            });
        }
        let mut lines = logs.lines;
        let known = (expected - logs.seq) as usize;
        if known > 0 {
            // Its head was stored already: only the rest is new.
            lines.drain(..known);
            self.queue_ack();
        }
        self.delivered_seq = last;
        self.events.push_back(SessionEvent::Lines {
            first_seq: expected,
            lines,
        });
        Ok(())
    }

    /// The driver stored every frame up to `seq`.
    pub fn handle_persisted(&mut self, seq: u64) {
        if seq > self.persisted_seq {
            self.persisted_seq = seq;
            self.queue_ack();
        }
    }

    /// Asks the agent to stop the job.
    pub fn cancel(&mut self, reason: impl Into<String>) {
        if self.phase == Phase::Finished {
            return;
        }
        let reason = reason.into();
        self.cancel_reason = Some(reason.clone());
        // Before HELLO the frame waits: it is queued after the work or RESUME.
        if self.phase == Phase::Working {
            self.outgoing.push_back(Message::Cancel(Cancel {
                job_id: self.job_id.clone(),
                reason: Some(reason),
            }));
        }
    }

    fn queue_ack(&mut self) {
        // Coalesce: only the newest ACK matters.
        self.outgoing
            .retain(|message| !matches!(message, Message::Ack(_)));
        self.outgoing.push_back(Message::Ack(Ack {
            job_id: self.job_id.clone(),
            seq: self.persisted_seq,
        }));
    }

    /// Checks the heartbeat deadline.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), SessionError> {
        if self.phase == Phase::Finished {
            return Ok(());
        }
        let silent = now.saturating_duration_since(self.last_heard);
        if silent >= self.heartbeat_timeout {
            return Err(SessionError::HeartbeatTimeout {
                silent_ms: silent.as_millis(),
            });
        }
        Ok(())
    }

    /// When [`CoreSession::handle_timeout`] must next be called.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        (self.phase != Phase::Finished).then(|| self.last_heard + self.heartbeat_timeout)
    }

    /// Next frame to send to the agent.
    #[must_use]
    pub fn poll_frame(&mut self) -> Option<Message> {
        self.outgoing.pop_front()
    }

    /// Next event for the driver.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        self.events.pop_front()
    }
}
