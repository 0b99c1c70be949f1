//! The agent's side of one job's link, as a deterministic state machine beside
//! [`crate::session::CoreSession`].
//!
//! It decides what the protocol decides, across any number of connections: which stored
//! position the core has acknowledged, when the STATUS goes out and when it counts as
//! delivered, when to send a heartbeat, when the core has been silent too long or left the
//! STATUS unacknowledged (the connection is given up and dialled again with a resuming HELLO),
//! where a resumed connection starts sending from (the core's RESUME), that an interruption
//! notice is carried again on every resumed connection, and when the reconnect grace is over.
//!
//! No sockets, no clock, no spool: the driver (the agent's `JobLink`) keeps the job's lines
//! (on disk) and their send cursor, feeds the core's frames with
//! [`AgentSession::handle_frame`], tells it what happened to the connection
//! ([`AgentSession::handle_lost`], [`AgentSession::handle_resumed`]) and passes `now` in.
//! After every input it drains, in this order:
//!
//! 1. [`AgentSession::poll_event`] until `None` (trim or rewind the spool, dial again, stop
//!    the build, done),
//! 2. [`AgentSession::poll_frame`] while the connection has room (an interruption notice,
//!    a heartbeat, the STATUS once every line is sent),
//! 3. [`AgentSession::poll_timeout`] for the next deadline, at which it calls
//!    [`AgentSession::handle_timeout`].

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::{Heartbeat, Hello, Interruption, Message, Status};

/// The agent's waits, each a limit on something the core (or the network) owes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentTimers {
    /// A HEARTBEAT goes out this often while connected.
    pub heartbeat_every: Duration,
    /// Nothing from the core for this long: the connection is dead, dial again.
    pub core_silence_limit: Duration,
    /// A STATUS sent and not acknowledged for this long: dial again and send it again.
    pub final_ack_wait: Duration,
    /// How long the job goes on without a connection before it is given up.
    pub reconnect_grace: Duration,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentEvent {
    /// The core stored every frame up to `seq`: the spool may drop those lines.
    Acked { seq: u64 },
    /// A resumed connection sends from after `seq` (the core's stored position): move the
    /// spool's send cursor there. Lines after it that went out on the old connection are sent
    /// again; the core recognises the ones it already has.
    Rewind { seq: u64 },
    /// The connection is gone (`reason`): drop it and dial again with `hello` (a resuming
    /// HELLO naming the job, the attempt and the acknowledged position) until the grace ends.
    Redial { hello: Box<Hello>, reason: String },
    /// The core asked to stop the job.
    CancelJob { reason: Option<String> },
    /// The STATUS is stored by the core: the job is over on this link.
    Done,
}

/// Why the link cannot go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    #[error(
        "the core could not be reached again within {grace:?} (reconnect grace); the build was stopped"
    )]
    GraceExpired { grace: Duration },
    /// A frame the core must not send mid-job. Not fatal: the driver logs it and goes on.
    #[error("ignoring unexpected {frame} frame from the core")]
    UnexpectedFrame { frame: &'static str },
    /// A frame naming another job. Not fatal either.
    #[error("ignoring {frame} frame for job `{got}` (this link serves `{expected}`)")]
    WrongJob {
        frame: &'static str,
        expected: String,
        got: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// A connection is open.
    Connected {
        last_heard: Instant,
        next_heartbeat: Instant,
    },
    /// No connection since `since`; the driver is dialling.
    Lost { since: Instant },
    /// The STATUS is acknowledged.
    Done,
}

/// Agent-side state of one job's link.
#[derive(Debug)]
pub struct AgentSession {
    job_id: String,
    /// The HELLO a reconnect sends: the agent's own, with the job, attempt and position.
    hello: Hello,
    timers: AgentTimers,
    link: Link,
    /// Highest seq the core acknowledged (ACK or RESUME).
    acked: u64,
    /// The job's STATUS (its `seq` set: last line + 1) once the job ended.
    status: Option<Status>,
    /// Whether the STATUS went out on the current connection.
    status_sent: bool,
    /// When an unacknowledged STATUS gives the connection up.
    ack_deadline: Option<Instant>,
    /// An interruption notice waiting to go out (before any further line).
    notice: Option<Interruption>,
    /// The notice once queued: every resumed connection carries it again (the one that took
    /// it may have broken before the core read it).
    relayed: Option<Interruption>,
    heartbeat_due: bool,
    events: VecDeque<AgentEvent>,
}

impl AgentSession {
    /// The link of a job whose work frame just arrived on an open connection. `hello` is the
    /// agent's HELLO (a reconnect names `job_id`, `attempt` and the acknowledged seq in it).
    pub fn new(
        job_id: impl Into<String>,
        attempt: Option<u32>,
        hello: Hello,
        timers: AgentTimers,
        now: Instant,
    ) -> AgentSession {
        let job_id = job_id.into();
        AgentSession {
            hello: Hello {
                job_id: Some(job_id.clone()),
                attempt,
                acked_seq: None,
                ..hello
            },
            job_id,
            timers,
            link: Link::Connected {
                last_heard: now,
                next_heartbeat: now + timers.heartbeat_every,
            },
            acked: 0,
            status: None,
            status_sent: false,
            ack_deadline: None,
            notice: None,
            relayed: None,
            heartbeat_due: false,
            events: VecDeque::new(),
        }
    }

    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    /// Highest seq the core acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Since when no connection is open (while the driver dials).
    pub fn disconnected_since(&self) -> Option<Instant> {
        match self.link {
            Link::Lost { since } => Some(since),
            _ => None,
        }
    }

    pub fn is_connected(&self) -> bool {
        matches!(self.link, Link::Connected { .. })
    }

    pub fn is_done(&self) -> bool {
        self.link == Link::Done
    }

    /// Whether the job already ended (its STATUS is known).
    pub fn has_status(&self) -> bool {
        self.status.is_some()
    }

    /// Whether an interruption notice was queued (the job is stopped from outside).
    pub fn is_interrupted(&self) -> bool {
        self.relayed.is_some()
    }

    /// The job ended: `status` (its `seq` the last spooled line's + 1) goes out once every
    /// line before it has.
    pub fn handle_finished(&mut self, status: Status) {
        self.status = Some(status);
    }

    /// The cloud reclaims the instance, or the machine shuts down: `notice` goes out before
    /// any further line, on this connection and every resumed one. Only the first counts.
    pub fn handle_interruption(&mut self, notice: Interruption) {
        if self.relayed.is_none() {
            self.relayed = Some(notice.clone());
            self.notice = Some(notice);
        }
    }

    /// Something arrived from the core (a ping, a frame that did not decode): it is alive.
    pub fn handle_heard(&mut self, now: Instant) {
        if let Link::Connected { last_heard, .. } = &mut self.link {
            *last_heard = now;
        }
    }

    /// Feeds one decoded frame from the core. Errors are the core's mistakes and not fatal.
    pub fn handle_frame(&mut self, now: Instant, message: Message) -> Result<(), AgentError> {
        let Link::Connected { last_heard, .. } = &mut self.link else {
            // A frame from a connection already given up (or after the end) changes nothing.
            return Ok(());
        };
        *last_heard = now;
        let frame = message.type_name();
        if let Some(job_id) = message.job_id()
            && job_id != self.job_id
        {
            return Err(AgentError::WrongJob {
                frame,
                expected: self.job_id.clone(),
                got: job_id.to_string(),
            });
        }
        match message {
            Message::Ack(ack) => {
                if self.status_sent && self.status_seq().is_some_and(|seq| ack.seq >= seq) {
                    self.finish();
                    return Ok(());
                }
                if ack.seq > self.acked {
                    self.acked = ack.seq;
                    self.events.push_back(AgentEvent::Acked { seq: ack.seq });
                }
                Ok(())
            }
            Message::Cancel(cancel) => {
                self.events.push_back(AgentEvent::CancelJob {
                    reason: cancel.reason,
                });
                Ok(())
            }
            Message::Heartbeat(_) => Ok(()),
            _ => Err(AgentError::UnexpectedFrame { frame }),
        }
    }

    /// The connection broke (`reason`): dial again. The STATUS, if it went out, goes again on
    /// the next connection.
    pub fn handle_lost(&mut self, now: Instant, reason: impl Into<String>) {
        if !self.is_connected() {
            return;
        }
        self.link = Link::Lost { since: now };
        self.status_sent = false;
        self.ack_deadline = None;
        self.heartbeat_due = false;
        self.events.push_back(AgentEvent::Redial {
            hello: Box::new(Hello {
                acked_seq: Some(self.acked),
                ..self.hello.clone()
            }),
            reason: reason.into(),
        });
    }

    /// A new connection is open and the core answered the resuming HELLO with RESUME at
    /// `stored_seq`: lines are sent from after it (after a core restart it may be lower than
    /// what went out before), the interruption notice first if there was one.
    pub fn handle_resumed(&mut self, now: Instant, stored_seq: u64) {
        if self.is_done() {
            return;
        }
        self.link = Link::Connected {
            last_heard: now,
            next_heartbeat: now + self.timers.heartbeat_every,
        };
        self.status_sent = false;
        self.ack_deadline = None;
        if stored_seq > self.acked {
            self.acked = stored_seq;
        }
        self.events
            .push_back(AgentEvent::Rewind { seq: stored_seq });
        if self.status_seq().is_some_and(|seq| stored_seq >= seq) {
            // The core stored the STATUS before the connection dropped.
            self.finish();
            return;
        }
        self.notice.clone_from(&self.relayed);
    }

    fn finish(&mut self) {
        self.link = Link::Done;
        self.ack_deadline = None;
        self.events.push_back(AgentEvent::Done);
    }

    fn status_seq(&self) -> Option<u64> {
        self.status.as_ref().and_then(|status| status.seq)
    }

    /// Checks the deadlines: a heartbeat due, the core's silence, the STATUS's ACK, the grace.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), AgentError> {
        match self.link {
            Link::Done => Ok(()),
            Link::Lost { since } => {
                if now >= since + self.timers.reconnect_grace {
                    return Err(AgentError::GraceExpired {
                        grace: self.timers.reconnect_grace,
                    });
                }
                Ok(())
            }
            Link::Connected {
                last_heard,
                next_heartbeat,
            } => {
                if now >= last_heard + self.timers.core_silence_limit {
                    let silence = self.timers.core_silence_limit;
                    self.handle_lost(now, format!("no frame from the core for {silence:?}"));
                    return Ok(());
                }
                if self.ack_deadline.is_some_and(|deadline| now >= deadline) {
                    let wait = self.timers.final_ack_wait;
                    self.handle_lost(
                        now,
                        format!("the core did not acknowledge STATUS within {wait:?}"),
                    );
                    return Ok(());
                }
                if now >= next_heartbeat {
                    self.heartbeat_due = true;
                    self.link = Link::Connected {
                        last_heard,
                        next_heartbeat: now + self.timers.heartbeat_every,
                    };
                }
                Ok(())
            }
        }
    }

    /// When [`AgentSession::handle_timeout`] must next be called.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.link {
            Link::Done => None,
            Link::Lost { since } => Some(since + self.timers.reconnect_grace),
            Link::Connected {
                last_heard,
                next_heartbeat,
            } => {
                let silence = last_heard + self.timers.core_silence_limit;
                Some(
                    [Some(silence), Some(next_heartbeat), self.ack_deadline]
                        .into_iter()
                        .flatten()
                        .min()
                        .unwrap_or(silence),
                )
            }
        }
    }

    /// Whether [`AgentSession::poll_frame`] has something for the connection now, given
    /// whether lines wait in the spool (`lines_unsent`).
    pub fn wants_to_send(&self, lines_unsent: bool) -> bool {
        self.is_connected()
            && (self.notice.is_some()
                || self.heartbeat_due
                || (!lines_unsent && self.status.is_some() && !self.status_sent))
    }

    /// Next frame of the session's own for the connection: an interruption notice first
    /// (before any line), then a heartbeat, then — once no line waits (`lines_unsent` false)
    /// — the STATUS, whose ACK is awaited from `now`. Lines themselves come from the driver's
    /// spool, between the notice and the STATUS.
    #[must_use]
    pub fn poll_frame(&mut self, now: Instant, lines_unsent: bool) -> Option<Message> {
        if !self.is_connected() {
            return None;
        }
        if let Some(notice) = self.notice.take() {
            return Some(Message::Interruption(notice));
        }
        if std::mem::take(&mut self.heartbeat_due) {
            return Some(Message::Heartbeat(Heartbeat {
                job_id: Some(self.job_id.clone()),
            }));
        }
        if !lines_unsent
            && !self.status_sent
            && let Some(status) = &self.status
        {
            self.status_sent = true;
            self.ack_deadline = Some(now + self.timers.final_ack_wait);
            return Some(Message::Status(status.clone()));
        }
        None
    }

    /// Whether an interruption notice waits to go out (lines wait behind it).
    pub fn notice_pending(&self) -> bool {
        self.is_connected() && self.notice.is_some()
    }

    /// Next event for the driver.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<AgentEvent> {
        self.events.pop_front()
    }
}
