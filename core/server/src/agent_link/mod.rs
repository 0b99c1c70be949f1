//! One agent's WebSocket session: drives the protocol's [`CoreSession`] for one attempt,
//! stores its LOG lines (bounded, masked, numbered after the job's earlier attempts), checks
//! its STATUS against the registry, and returns how the attempt ended. It takes the socket,
//! the work frame and a store handle; it never calls back into the runner except through
//! the outcome it returns.

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket};
use stagely_protocol::session::{CoreSession, SessionEvent};
use stagely_protocol::{
    Codec, Heartbeat, JobState, Message, NeverRan, SHUTDOWN_ACTION, decode, decode_proto, encode,
    encode_proto,
};
use tokio::sync::mpsc;

use crate::db::{Db, NewLogLine};
use crate::engine::{AttemptOutcome, InfraKind};
use crate::image_check::ImageChecker;
use crate::images::valid_digest;

/// Lines buffered before a database write (one chunk row per MiB); also flushed every
/// [`LOG_FLUSH_EVERY`], so live viewers see a line within that.
mod lines;

pub use lines::{LogBudget, MAX_AGENT_ERROR_BYTES, MAX_STORED_LINE_BYTES, tidy_agent_error};

const LOG_BATCH_LINES: usize = 8192;
const LOG_BATCH_BYTES: usize = 512 * 1024;
const LOG_FLUSH_EVERY: Duration = Duration::from_millis(50);
const CORE_HEARTBEAT_EVERY: Duration = Duration::from_secs(15);
/// Longest a single frame may take to send before the agent counts as not reading.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// What the runner tells a link while it runs.
#[derive(Debug)]
pub enum LinkCommand {
    /// The work for this attempt (first) — or, after STATUS, work handed over to this agent.
    Work(Box<WorkOrder>),
    /// Stop the build: CANCEL to the agent (SIGTERM, SIGKILL after its grace).
    Cancel(String),
    /// The attempt's agent dialled again (its connection dropped): serve it on this one.
    Reconnected(Box<WebSocket>),
}

/// One attempt's work.
#[derive(Debug)]
pub struct WorkOrder {
    pub job_id: String,
    pub attempt: u32,
    pub work: Message,
    /// The only image the agent may report.
    pub target_image: String,
    /// Sent on a connection whose agent already finished another job (no new HELLO).
    pub handed_over: bool,
    /// An attempt this core adopted from a stopped core: its agent already has the work and
    /// resumes (only a resuming HELLO is accepted).
    pub adopted: bool,
    /// How the instance was placed when not as asked (spot fell back to on-demand, arm64
    /// emulated on amd64): the job log's first line says it.
    pub placement: Option<String>,
}

/// What the link needs from the core.
#[derive(Clone)]
pub struct LinkContext {
    pub db: Db,
    /// Live viewers of job logs: each stored batch is published here.
    pub hub: std::sync::Arc<crate::log_hub::LogHub>,
    pub images: std::sync::Arc<ImageChecker>,
    pub heartbeat_timeout: Duration,
    pub max_log_bytes_per_job: u64,
    /// How long a link waits for an agent whose connection dropped to dial again.
    pub reconnect_grace: Duration,
}
/// Runs one attempt over `socket` — and over every connection its agent dials after this
/// one drops (the runner hands them in as [`LinkCommand::Reconnected`]): a dropped connection
/// does not end the attempt unless the agent stays away for the reconnect grace. Returns the
/// outcome and the socket when it can carry more work (STATUS acknowledged, the agent's HELLO
/// said it accepts more). `None` outcome: the runner closed the link (the attempt was ended by
/// the engine, or handed back at shutdown), nothing to report.
///
/// `away` is set while the agent's connection is down and cleared when it dials again, so the
/// runner can ask the provider meanwhile whether the instance still runs.
pub async fn serve_attempt(
    context: &LinkContext,
    socket: WebSocket,
    order: WorkOrder,
    commands: &mut mpsc::Receiver<LinkCommand>,
    away: &tokio::sync::watch::Sender<bool>,
) -> (Option<AttemptOutcome>, Option<WebSocket>) {
    let mut socket = Some(socket);
    let mut link = match Link::new(context, &order, away).await {
        Ok(link) => link,
        Err(message) => {
            close_current(&mut socket, None).await;
            return (
                Some(AttemptOutcome::Infrastructure {
                    kind: InfraKind::AgentLost,
                    message,
                }),
                None,
            );
        }
    };
    let reusable = order.handed_over;
    match link.run(&mut socket, order, commands).await {
        Ok(Ended::Status(outcome)) if reusable || link.accepts_more_work => (Some(outcome), socket),
        Ok(Ended::Status(outcome)) => {
            close_current(&mut socket, None).await;
            (Some(outcome), None)
        }
        Ok(Ended::Closed) => {
            close_current(&mut socket, None).await;
            (None, None)
        }
        Err(Failure::Lost(message)) => {
            close_current(&mut socket, None).await;
            (
                Some(AttemptOutcome::Infrastructure {
                    kind: InfraKind::AgentLost,
                    message,
                }),
                None,
            )
        }
        Err(Failure::Interrupted { kind, message }) => {
            tracing::warn!("{message}");
            close_current(&mut socket, None).await;
            (Some(AttemptOutcome::Infrastructure { kind, message }), None)
        }
        Err(Failure::Violation(message)) => {
            tracing::error!("closing agent connection: {message}");
            let mut reason = message.clone();
            while reason.len() > 123 {
                reason.pop();
            }
            close_current(
                &mut socket,
                Some(CloseFrame {
                    code: 1008,
                    reason: reason.into(),
                }),
            )
            .await;
            (Some(AttemptOutcome::Protocol { message }), None)
        }
        Err(Failure::Store(message)) => {
            close_current(&mut socket, None).await;
            (
                Some(AttemptOutcome::Infrastructure {
                    kind: InfraKind::AgentLost,
                    message,
                }),
                None,
            )
        }
    }
}

async fn close_current(socket: &mut Option<WebSocket>, frame: Option<CloseFrame>) {
    if let Some(socket) = socket.as_mut() {
        close(socket, frame).await;
    }
}

/// `open_cuts` slot of a stream.
fn stream_slot(stream: stagely_protocol::LogStream) -> usize {
    match stream {
        stagely_protocol::LogStream::Stdout => 0,
        stagely_protocol::LogStream::Stderr => 1,
        stagely_protocol::LogStream::System => 2,
    }
}

/// The core's second masking across the cut of a long line: `previous` is a piece flagged
/// `continued` and `next` the piece that continues it. A secret form straddling
/// the cut is whole in neither; joining the end of one to the start of the other finds it,
/// and each part is masked where it lies. (The agent already holds back cut tails, so this
/// matters only for an agent that does not.)
fn mask_across_cut(mask: &stagely_protocol::SecretMask, previous: &mut String, next: &mut String) {
    let hold = mask.longest().saturating_sub(1);
    let body_end = previous.len();
    if hold == 0 {
        return;
    }
    let mut start = body_end.saturating_sub(hold);
    while !previous.is_char_boundary(start) {
        start -= 1;
    }
    let mut head_end = next.len().min(hold);
    while !next.is_char_boundary(head_end) {
        head_end += 1;
    }
    let cut = body_end - start;
    let joined = format!("{}{}", &previous[start..body_end], &next[..head_end]);
    let straddling: Vec<(usize, usize)> = mask
        .find(&joined)
        .into_iter()
        .filter(|(from, to)| *from < cut && *to > cut)
        .collect();
    let (Some(from), Some(to)) = (
        straddling.iter().map(|(from, _)| *from).min(),
        straddling.iter().map(|(_, to)| *to).max(),
    ) else {
        return;
    };
    previous.replace_range(start + from..body_end, stagely_protocol::SecretMask::MASK);
    next.replace_range(..to - cut, stagely_protocol::SecretMask::MASK);
}

/// Hands stored lines to the job's live viewers, if it has any (rows are built only then).
fn publish(hub: &crate::log_hub::LogHub, job_id: &str, lines: &[NewLogLine]) {
    hub.publish(job_id, || {
        let timestamp = crate::clock::now_ms();
        lines
            .iter()
            .map(|line| crate::db::LogRow {
                seq: line.seq,
                timestamp,
                stream: line.stream.to_string(),
                line: line.line.clone(),
                continued: line.continued,
            })
            .collect()
    });
}

/// Closes the connection, not waiting long for a peer that stopped reading.
pub async fn close(socket: &mut WebSocket, frame: Option<CloseFrame>) {
    let _ = tokio::time::timeout(SEND_TIMEOUT, socket.send(WsMessage::Close(frame))).await;
}

enum Ended {
    Status(AttemptOutcome),
    Closed,
}

/// What an `INTERRUPTION` ends the attempt as.
fn interruption(notice: &stagely_protocol::Interruption) -> Failure {
    if notice.action == SHUTDOWN_ACTION {
        return Failure::Interrupted {
            kind: InfraKind::InstanceShutdown,
            message: "the builder instance shut down during the job (its agent was stopped from outside, not by the build); running it again on a new instance".into(),
        };
    }
    let when = notice
        .time
        .as_deref()
        .map(|time| format!(" at {time}"))
        .unwrap_or_default();
    Failure::Interrupted {
        kind: InfraKind::SpotInterrupted,
        message: format!(
            "the cloud is reclaiming the spot instance ({}{when}); retrying on on-demand",
            notice.action
        ),
    }
}

enum Failure {
    /// The connection broke or went silent and the agent did not come back: infrastructure.
    Lost(String),
    /// The agent said its instance is going away under the job: the cloud reclaims the spot
    /// instance (`SpotInterrupted`), or the machine shuts down (`InstanceShutdown`).
    Interrupted { kind: InfraKind, message: String },
    /// The agent broke the protocol.
    Violation(String),
    /// Storing lines failed.
    Store(String),
}

struct Link<'a> {
    context: &'a LinkContext,
    job_id: String,
    /// Stored seq = `base` + the agent's seq: a retried attempt's lines follow the earlier
    /// attempts' instead of colliding with them.
    base: i64,
    /// For an adopted attempt: the highest agent seq already stored.
    resume_from: u64,
    batch: Vec<NewLogLine>,
    batch_bytes: usize,
    /// Per stream (stdout, stderr, system): where in `batch` the last piece of a cut line
    /// is, while its continuation has not arrived. Held back from writing (unless the batch
    /// is full) so a secret straddling the cut is masked in both pieces.
    open_cuts: [Option<usize>; 3],
    budget: LogBudget,
    /// The agent's HELLO said it takes more work after a STATUS.
    accepts_more_work: bool,
    /// Since when the agent has been away, and why (its connection dropped).
    lost: Option<(tokio::time::Instant, String)>,
    /// Mirrors `lost.is_some()` for the runner.
    away: &'a tokio::sync::watch::Sender<bool>,
    /// Batches handed to the link's writer and not yet reported stored (lines are stored in
    /// order and acknowledged once written).
    writer: LogWriter,
}

/// Most batches handed to a link's writer and not yet reported stored: one being written and
/// the rest queued behind it, so the next write starts the moment one ends (with one at a
/// time, each write waited for the link to wake, take the result and hand over the next
/// batch). Each is at most [`LOG_BATCH_BYTES`] of lines.
const LOG_WRITES_IN_FLIGHT: usize = 3;

/// One task per link that stores its batches in order and reports each back once written.
struct LogWriter {
    batches: mpsc::Sender<Vec<NewLogLine>>,
    stored: mpsc::Receiver<Result<Vec<NewLogLine>, crate::db::DbError>>,
    in_flight: usize,
}

impl LogWriter {
    /// Starts the writer of `job_id`'s lines. It ends when the link drops its end (after the
    /// batch in hand) or after a write that failed.
    fn start(db: Db, job_id: String) -> LogWriter {
        let (batches, mut queue) = mpsc::channel::<Vec<NewLogLine>>(LOG_WRITES_IN_FLIGHT);
        let (done, stored) = mpsc::channel(LOG_WRITES_IN_FLIGHT);
        tokio::spawn(async move {
            while let Some(batch) = queue.recv().await {
                // Storing a batch again stores nothing twice (seqs at or below the stored
                // ones are dropped), so a transient failure is simply retried.
                let now = crate::clock::now();
                let result = crate::db::retry_transient(|| db.append_logs(&job_id, &batch, now))
                    .await
                    .map(|()| batch);
                let failed = result.is_err();
                if done.send(result).await.is_err() || failed {
                    break;
                }
            }
        });
        LogWriter {
            batches,
            stored,
            in_flight: 0,
        }
    }

    /// Queues `batch` behind the ones in flight.
    async fn hand(&mut self, batch: Vec<NewLogLine>) -> Result<(), Failure> {
        self.batches
            .send(batch)
            .await
            .map_err(|_| Self::stopped())?;
        self.in_flight += 1;
        Ok(())
    }

    /// The next batch reported back: stored, or why not.
    async fn next_stored(&mut self) -> Result<Vec<NewLogLine>, Failure> {
        let reported = self.stored.recv().await;
        self.in_flight = self.in_flight.saturating_sub(1);
        match reported {
            Some(Ok(batch)) => Ok(batch),
            Some(Err(error)) => Err(Failure::Store(format!("storing log lines failed: {error}"))),
            None => Err(Self::stopped()),
        }
    }

    fn stopped() -> Failure {
        Failure::Store("storing log lines failed: the log writer stopped".into())
    }
}

impl<'a> Link<'a> {
    /// A link for `order`. Lines of a retried attempt are numbered after the earlier
    /// attempts' (read from the store: a failed read fails the attempt rather than numbering
    /// over stored lines, which would drop the new ones as duplicates), and where they start
    /// is stored with the attempt, so a core that adopts the attempt numbers them alike. A
    /// first attempt has no earlier lines and starts at 1 without a read.
    async fn new(
        context: &'a LinkContext,
        order: &WorkOrder,
        away: &'a tokio::sync::watch::Sender<bool>,
    ) -> Result<Link<'a>, String> {
        let mut link = Link {
            context,
            job_id: order.job_id.clone(),
            base: 0,
            resume_from: 0,
            batch: Vec::new(),
            batch_bytes: 0,
            open_cuts: [None; 3],
            budget: LogBudget::new(context.max_log_bytes_per_job),
            accepts_more_work: false,
            lost: None,
            away,
            writer: LogWriter::start(context.db.clone(), order.job_id.clone()),
        };
        let (db, job_id, attempt) = (&context.db, &order.job_id, order.attempt);
        if order.adopted {
            // Taken over from a core that stopped: its lines so far are stored; the agent
            // resends whatever came after.
            let read = async {
                let base =
                    crate::db::retry_transient(|| db.attempt_log_base(job_id, attempt)).await?;
                let stored = crate::db::retry_transient(|| db.last_log_seq(job_id)).await?;
                let (_, bytes) = crate::db::retry_transient(|| db.log_stats(job_id)).await?;
                Ok::<_, crate::db::DbError>((base, stored, bytes))
            };
            let (base, stored, bytes) = read.await.map_err(|error| {
                format!("reading the adopted attempt's log position failed: {error}")
            })?;
            link.base = base;
            link.resume_from = u64::try_from(stored - base).unwrap_or(0);
            link.budget = LogBudget::resumed(context.max_log_bytes_per_job, bytes.max(0) as u64);
            return Ok(link);
        }
        let stored = if order.attempt > 1 {
            crate::db::retry_transient(|| db.last_log_seq(job_id))
                .await
                .map_err(|error| format!("reading the job's stored log position failed: {error}"))?
        } else {
            0
        };
        let placement = order
            .placement
            .as_deref()
            .map(|notice| format!(": {notice}"))
            .unwrap_or_default();
        let header = if stored > 0 {
            // Earlier attempts wrote lines: this one says where it starts.
            Some(format!(
                "[stagely] attempt {} of this job starts here, on a new instance{placement}\n",
                order.attempt
            ))
        } else {
            order
                .placement
                .as_deref()
                .map(|notice| format!("[stagely] {notice}\n"))
        };
        if let Some(line) = header {
            // One system line before the agent's first (seq 1 of a first attempt).
            link.base = stored + 1;
            let line = NewLogLine {
                seq: stored + 1,
                stream: "system",
                line,
                continued: false,
            };
            if context
                .db
                .append_logs(
                    &order.job_id,
                    std::slice::from_ref(&line),
                    crate::clock::now(),
                )
                .await
                .is_ok()
            {
                publish(&context.hub, &order.job_id, &[line]);
            }
        }
        if link.base != 0 && !order.handed_over {
            let base = link.base;
            crate::db::retry_transient(|| db.set_attempt_log_base(job_id, attempt, base))
                .await
                .map_err(|error| format!("storing the attempt's log position failed: {error}"))?;
        }
        Ok(link)
    }

    /// Masks, bounds and batches one line for storage. `clean`: the frame it came in holds
    /// no secret form ([`stagely_protocol::SecretMask::holds_any`]), so neither does the line.
    /// `continued`: the agent cut the line after this piece (it goes on in the stream's next).
    fn take_line(
        &mut self,
        seq: i64,
        stream: stagely_protocol::LogStream,
        (data, continued): (String, bool),
        mask: &stagely_protocol::SecretMask,
        clean: bool,
    ) {
        let slot = stream_slot(stream);
        let mut data = data;
        if let Some(at) = self.open_cuts[slot].take()
            && let Some(previous) = self.batch.get_mut(at)
        {
            // Across the cut, the two pieces together may hold a form neither holds alone.
            mask_across_cut(mask, &mut previous.line, &mut data);
        }
        let mut data = if clean { data } else { mask.mask(data) };
        if memchr::memchr(0, data.as_bytes()).is_some() {
            // PostgreSQL text holds no NUL; the line keeps its length.
            data = data.replace('\0', "\u{FFFD}");
        }
        if let Some(line) = self.budget.admit(data) {
            self.batch_bytes += line.len();
            if continued {
                self.open_cuts[slot] = Some(self.batch.len());
            }
            self.batch.push(NewLogLine {
                seq,
                stream: stream.as_str(),
                line,
                continued,
            });
        }
    }

    fn batch_full(&self) -> bool {
        self.batch.len() >= LOG_BATCH_LINES || self.batch_bytes >= LOG_BATCH_BYTES
    }

    /// Stores everything batched so far and waits until it is written (and acknowledged).
    async fn flush(&mut self, session: &mut CoreSession) -> Result<(), Failure> {
        self.open_cuts = [None; 3];
        self.write_behind(session).await?;
        self.written(session).await
    }

    /// Hands the batch to the link's writer and goes on reading the agent meanwhile; with
    /// [`LOG_WRITES_IN_FLIGHT`] batches already handed over, the oldest is waited for first.
    /// The piece of a cut line whose continuation has not arrived stays, with every line after
    /// it, unless the batch is full.
    async fn write_behind(&mut self, session: &mut CoreSession) -> Result<(), Failure> {
        let hold_from = match self.open_cuts.iter().flatten().min() {
            Some(&at) if !self.batch_full() => at,
            _ => self.batch.len(),
        };
        if hold_from == 0 {
            return Ok(());
        }
        while self.writer.in_flight >= LOG_WRITES_IN_FLIGHT {
            let batch = self.writer.next_stored().await?;
            self.acknowledge(session, &batch);
        }
        let held = self.batch.split_off(hold_from);
        let batch = std::mem::replace(&mut self.batch, held);
        self.batch
            .reserve(LOG_BATCH_LINES.saturating_sub(self.batch.len()));
        self.batch_bytes = self.batch.iter().map(|line| line.line.len()).sum();
        for cut in &mut self.open_cuts {
            *cut = cut.and_then(|at| at.checked_sub(hold_from));
        }
        self.writer.hand(batch).await
    }

    /// Waits until every batch handed to the writer is stored: their lines go to live
    /// viewers and are acknowledged.
    async fn written(&mut self, session: &mut CoreSession) -> Result<(), Failure> {
        while self.writer.in_flight > 0 {
            let batch = self.writer.next_stored().await?;
            self.acknowledge(session, &batch);
        }
        Ok(())
    }

    fn acknowledge(&self, session: &mut CoreSession, batch: &[NewLogLine]) {
        if let Some(last) = batch.last().map(|line| line.seq) {
            publish(&self.context.hub, &self.job_id, batch);
            session.handle_persisted((last - self.base) as u64);
        }
    }

    /// The agent's connection is gone: store what arrived, and wait for it to dial again
    /// (within the grace; no grace: the attempt is lost now).
    async fn drop_connection(
        &mut self,
        socket: &mut Option<WebSocket>,
        session: &mut CoreSession,
        why: String,
    ) -> Result<(), Failure> {
        self.flush(session).await?;
        *socket = None;
        let grace = self.context.reconnect_grace;
        if grace.is_zero() {
            return Err(Failure::Lost(why));
        }
        tracing::warn!(
            stored_seq = session.persisted_seq(),
            "{why}; waiting up to {}s for the agent to reconnect",
            grace.as_secs()
        );
        self.lost.get_or_insert((tokio::time::Instant::now(), why));
        self.away.send_replace(true);
        Ok(())
    }

    async fn run(
        &mut self,
        socket: &mut Option<WebSocket>,
        order: WorkOrder,
        commands: &mut mpsc::Receiver<LinkCommand>,
    ) -> Result<Ended, Failure> {
        // The agent masks what it knows; the core masks again before anything is stored.
        let mask = stagely_protocol::SecretMask::new(order.work.secrets());
        let now = std::time::Instant::now();
        let heartbeat_timeout = self.context.heartbeat_timeout;
        let mut session = if order.adopted {
            CoreSession::adopted(
                order.job_id.clone(),
                order.attempt,
                self.resume_from,
                heartbeat_timeout,
                now,
            )
        } else if order.handed_over {
            CoreSession::handed_over(order.job_id.clone(), order.work, heartbeat_timeout, now)
        } else {
            CoreSession::new(order.job_id.clone(), order.work, 0, heartbeat_timeout, now)
                .with_attempt(order.attempt)
        };
        let mut flush_tick = tokio::time::interval(LOG_FLUSH_EVERY);
        let mut heartbeat_tick = tokio::time::interval(CORE_HEARTBEAT_EVERY);
        heartbeat_tick.reset();
        let mut codec = socket.as_ref().map(codec_of).unwrap_or(Codec::Json);
        // The LOGS frame just read holds no secret form anywhere in its bytes, so none of its
        // lines needs a search of its own (a protobuf frame carries each line's bytes as they
        // are; JSON escapes some, so a JSON frame is never taken as clean).
        let mut frame_clean = false;
        loop {
            if let Some(ws) = socket.as_mut() {
                let mut broken = None;
                while let Some(frame) = session.poll_frame() {
                    if let Err(error) = send_frame(ws, codec, &frame).await {
                        broken = Some(error);
                        break;
                    }
                    if matches!(frame, Message::Build(_) | Message::Merge(_)) {
                        // The end of dispatch (the benchmark's "eligible → work sent" is
                        // timed between `run submitted` and this event).
                        tracing::debug!(
                            target: "stagely_server::dispatch",
                            job_id = %self.job_id,
                            frame = frame.type_name(),
                            "work sent"
                        );
                    }
                }
                if let Some(error) = broken {
                    self.drop_connection(socket, &mut session, error).await?;
                }
            }
            let connected = socket.is_some();
            let heartbeat_due = session
                .poll_timeout()
                .map(tokio::time::Instant::from_std)
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            let grace_over = match &self.lost {
                Some((since, _)) => *since + self.context.reconnect_grace,
                None => tokio::time::Instant::now() + Duration::from_secs(3600),
            };
            let incoming = async {
                match socket.as_mut() {
                    Some(ws) => ws.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                incoming = incoming => {
                    let now = std::time::Instant::now();
                    match incoming {
                        Some(Ok(frame @ (WsMessage::Text(_) | WsMessage::Binary(_)))) => {
                            let decoded = match (&frame, codec) {
                                (WsMessage::Text(text), _) => decode(text.as_bytes()),
                                (WsMessage::Binary(bytes), Codec::Proto) => {
                                    frame_clean = !mask.holds_any(bytes);
                                    decode_proto(bytes)
                                }
                                _ => {
                                    let _ = self.flush(&mut session).await;
                                    return Err(Failure::Violation(
                                        "agent sent a binary frame on a connection without the stagely.v1.proto subprotocol".into(),
                                    ));
                                }
                            };
                            let handled = decoded
                                .map_err(|error| format!("agent sent a malformed frame: {error}"))
                                .and_then(|message| {
                                    session
                                        .handle_frame(now, message)
                                        .map_err(|error| format!("agent broke the protocol: {error}"))
                                });
                            if let Err(error) = handled {
                                let _ = self.flush(&mut session).await;
                                return Err(Failure::Violation(error));
                            }
                        }
                        Some(Ok(WsMessage::Close(_))) | None => {
                            self.drop_connection(socket, &mut session, "the agent disconnected before reporting STATUS".into()).await?;
                        }
                        Some(Ok(_)) => {}
                        Some(Err(error)) => {
                            self.drop_connection(socket, &mut session, format!("the agent connection failed: {error}")).await?;
                        }
                    }
                }
                command = commands.recv() => match command {
                    Some(LinkCommand::Cancel(reason)) => session.cancel(reason),
                    Some(LinkCommand::Reconnected(newer)) => {
                        let newer = *newer;
                        // What arrived on the old connection is stored first, so RESUME names
                        // every line the agent need not send again.
                        self.flush(&mut session).await?;
                        if let Some((since, _)) = self.lost.take() {
                            tracing::info!("the agent reconnected after {:?}", since.elapsed());
                            self.away.send_replace(false);
                        }
                        codec = codec_of(&newer);
                        *socket = Some(newer);
                        session.reconnected(std::time::Instant::now());
                        heartbeat_tick.reset();
                    }
                    Some(LinkCommand::Work(_)) => {
                        tracing::warn!("work for a link that is already busy was dropped");
                    }
                    None => {
                        // The engine ended this attempt (terminate) or handed it back
                        // (shutdown): store what arrived, go.
                        let _ = self.flush(&mut session).await;
                        return Ok(Ended::Closed);
                    }
                },
                _ = flush_tick.tick() => self.write_behind(&mut session).await?,
                stored = self.writer.next_stored(), if self.writer.in_flight > 0 => {
                    let batch = stored?;
                    self.acknowledge(&mut session, &batch);
                }
                _ = heartbeat_tick.tick(), if connected => {
                    let frame = Message::Heartbeat(Heartbeat { job_id: Some(self.job_id.clone()) });
                    if let Some(ws) = socket.as_mut()
                        && let Err(error) = send_frame(ws, codec, &frame).await
                    {
                        self.drop_connection(socket, &mut session, error).await?;
                    }
                }
                () = tokio::time::sleep_until(heartbeat_due), if connected => {
                    if let Err(error) = session.handle_timeout(std::time::Instant::now()) {
                        self.drop_connection(socket, &mut session, format!("agent went silent: {error}")).await?;
                    }
                }
                () = tokio::time::sleep_until(grace_over), if !connected => {
                    let why = self.lost.take().map(|(_, why)| why).unwrap_or_default();
                    let _ = self.flush(&mut session).await;
                    return Err(Failure::Lost(format!(
                        "{why}, and it did not reconnect within {}s",
                        self.context.reconnect_grace.as_secs()
                    )));
                }
            }

            let clean = std::mem::take(&mut frame_clean);
            if let Some(ended) = self
                .on_events(
                    &mut session,
                    socket,
                    codec,
                    &mask,
                    clean,
                    &order.target_image,
                )
                .await?
            {
                return Ok(ended);
            }
        }
    }

    /// Acts on what the session delivered: the agent's start or resume, lines to store (in
    /// batches written behind), an interruption, the STATUS. `Some` once the attempt ended.
    async fn on_events(
        &mut self,
        session: &mut CoreSession,
        socket: &mut Option<WebSocket>,
        codec: Codec,
        mask: &stagely_protocol::SecretMask,
        clean: bool,
        target_image: &str,
    ) -> Result<Option<Ended>, Failure> {
        while let Some(event) = session.poll_event() {
            match event {
                SessionEvent::Started(hello) => {
                    self.accepts_more_work = hello.accepts_more_work;
                    tracing::info!(
                        agent_instance = %hello.instance_id,
                        agent_arch = %hello.arch,
                        agent_version = %hello.agent_version,
                        builders = ?hello.builders,
                        "agent started the job"
                    );
                }
                SessionEvent::Resumed { acked_seq } => {
                    // A resuming agent is the one that said HELLO first: it takes more
                    // work as it did then.
                    self.accepts_more_work = true;
                    tracing::info!(
                        acked_seq,
                        stored_seq = session.persisted_seq(),
                        "agent resumed the job"
                    );
                }
                SessionEvent::Log(log) => {
                    let seq = self.base + log.seq.unwrap_or(0) as i64;
                    self.take_line(seq, log.stream, (log.data, log.continued), mask, false);
                    if self.batch_full() {
                        self.write_behind(session).await?;
                    }
                }
                SessionEvent::Lines { first_seq, lines } => {
                    let first = self.base + first_seq as i64;
                    for (offset, line) in lines.into_iter().enumerate() {
                        self.take_line(
                            first + offset as i64,
                            line.stream,
                            (line.data, line.continued),
                            mask,
                            clean,
                        );
                    }
                    if self.batch_full() {
                        self.write_behind(session).await?;
                    }
                }
                SessionEvent::Interrupted(notice) => {
                    // What arrived before the notice is kept; the attempt is over.
                    self.flush(session).await?;
                    return Err(interruption(&notice));
                }
                SessionEvent::Finished(status) => {
                    // What the cap dropped is said once more at the end, with the count;
                    // the STATUS's sequence number is free for it (no LOG carries it).
                    if let Some(summary) = self.budget.summary() {
                        self.batch.push(NewLogLine {
                            seq: self.base + status.seq.unwrap_or(0) as i64,
                            stream: "system",
                            line: summary,
                            continued: false,
                        });
                    }
                    self.flush(session).await?;
                    let outcome = self.outcome(&status, target_image, mask).await;
                    // The session numbers STATUS, so this acknowledges it.
                    session.handle_persisted(status.seq.unwrap_or(0));
                    while let Some(frame) = session.poll_frame() {
                        // Best effort: the outcome is decided whatever the agent does now.
                        if let Some(ws) = socket.as_mut() {
                            let _ = send_frame(ws, codec, &frame).await;
                        }
                    }
                    return Ok(Some(Ended::Status(outcome)));
                }
            }
        }
        Ok(None)
    }

    /// What a STATUS means. Only the image the core asked for counts, and only when the
    /// registry holds it (trust but verify).
    async fn outcome(
        &self,
        status: &stagely_protocol::Status,
        target_image: &str,
        mask: &stagely_protocol::SecretMask,
    ) -> AttemptOutcome {
        match status.state {
            JobState::Completed => {
                let (Some(url), Some(digest)) = (&status.artifact_url, &status.digest) else {
                    return AttemptOutcome::Protocol {
                        message: format!(
                            "the agent reported completed without a digest for {target_image}"
                        ),
                    };
                };
                if url != target_image || !valid_digest(digest) {
                    return AttemptOutcome::Protocol {
                        message: format!(
                            "the agent reported completed without a valid digest for {target_image} (artifact_url {url:?})"
                        ),
                    };
                }
                if let Err(error) = self.context.images.verify(url, digest).await {
                    return AttemptOutcome::Protocol {
                        message: format!("the agent reported success, but {error}"),
                    };
                }
                tracing::info!(artifact_url = %url, digest = %digest, "attempt completed");
                AttemptOutcome::Completed {
                    artifact_url: url.clone(),
                    digest: digest.clone(),
                    exit_code: status.exit_code.unwrap_or(0),
                }
            }
            JobState::Failed => {
                let message = match (&status.error, status.exit_code) {
                    (Some(error), _) => tidy_agent_error(&mask.mask(error.clone())),
                    (None, Some(code)) => format!("the build failed with exit code {code}"),
                    (None, None) => "the build failed".into(),
                };
                tracing::warn!(exit_code = ?status.exit_code, "attempt failed: {message}");
                match status.never_ran {
                    Some(NeverRan::Cancelled) => AttemptOutcome::Cancelled { message },
                    _ => AttemptOutcome::BuildFailed {
                        exit_code: status.exit_code,
                        message,
                    },
                }
            }
        }
    }
}

/// Sends one frame; an agent that stops reading cannot stall the link.
/// The codec of a connection: the subprotocol it was upgraded with (none: JSON).
pub fn codec_of(socket: &WebSocket) -> Codec {
    Codec::for_subprotocol(socket.protocol().and_then(|value| value.to_str().ok()))
        .unwrap_or(Codec::Json)
}

async fn send_frame(socket: &mut WebSocket, codec: Codec, frame: &Message) -> Result<(), String> {
    let message = match codec {
        Codec::Json => WsMessage::text(encode(frame)),
        Codec::Proto => WsMessage::Binary(encode_proto(frame).into()),
    };
    match tokio::time::timeout(SEND_TIMEOUT, socket.send(message)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err("the agent connection broke while sending to it".into()),
        Err(_) => Err(format!(
            "the agent stopped reading: a {} frame could not be sent within {}s",
            frame.type_name(),
            SEND_TIMEOUT.as_secs()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agents_error_is_stored_without_controls_and_at_most_4_kib() {
        assert_eq!(
            tidy_agent_error("\x1b[31mbuild failed\x1b[0m\r\n  step 3\x07"),
            "[31mbuild failed[0m\n  step 3"
        );
        // 100,004 characters with an escape kept (the probe's): first and last lines only.
        let long = format!(
            "first line\n{}\x1b]52;c;x\x07\nError: building at STEP \"RUN x\": exit status 3",
            "y".repeat(100_000)
        );
        let stored = tidy_agent_error(&long);
        assert!(stored.len() <= MAX_AGENT_ERROR_BYTES, "{}", stored.len());
        assert!(stored.starts_with("first line\n[stagely: "), "{stored}");
        assert!(
            stored.ends_with("Error: building at STEP \"RUN x\": exit status 3"),
            "{stored}"
        );
        assert!(!stored.contains('\x1b'));
        // One huge line: cut at both ends on character boundaries.
        let one = "é".repeat(10_000);
        let stored = tidy_agent_error(&one);
        assert!(stored.len() <= MAX_AGENT_ERROR_BYTES);
        assert!(stored.starts_with('é') && stored.ends_with('é'));
    }

    #[test]
    fn a_secret_straddling_the_cut_of_a_long_line_is_masked_in_both_pieces() {
        let mask = stagely_protocol::SecretMask::new(["hunter2-password"]);
        let mut previous = format!("{}hunter2-", "a".repeat(100));
        let mut next = "password and more\n".to_string();
        mask_across_cut(&mask, &mut previous, &mut next);
        assert_eq!(previous, format!("{}[REDACTED]", "a".repeat(100)));
        assert_eq!(next, "[REDACTED] and more\n");
        // Nothing straddles: both stay as they are (a whole secret is the per-line mask's).
        let mut previous = "hunter2-password xyz".to_string();
        let mut next = "plain\n".to_string();
        let before = (previous.clone(), next.clone());
        mask_across_cut(&mask, &mut previous, &mut next);
        assert_eq!((previous, next), before);
        // Multi-byte text around the cut stays valid.
        let mut previous = "ééé hunt".to_string();
        let mut next = "er2-password ééé\n".to_string();
        mask_across_cut(&mask, &mut previous, &mut next);
        assert_eq!(previous, "ééé [REDACTED]");
        assert_eq!(next, "[REDACTED] ééé\n");
    }

    #[test]
    fn the_log_budget_cuts_long_lines_and_stops_at_the_cap() {
        let mut budget = LogBudget::new(90_000);
        let long = format!("{}\n", "é".repeat(40_000));
        let stored = budget.admit(long).unwrap();
        assert!(stored.len() < MAX_STORED_LINE_BYTES + 100);
        assert!(stored.contains("line cut") && stored.ends_with('\n'));
        assert_eq!(budget.admit("short\n".into()).as_deref(), Some("short\n"));
        assert!(budget.summary().is_none());
        let _ = budget.admit("x".repeat(16_000));
        let marker = budget.admit("y".repeat(16_000)).unwrap();
        assert!(
            marker.contains("reached its limit of 90000 bytes"),
            "{marker}"
        );
        assert_eq!(budget.admit("z\n".into()), None);
        assert_eq!(budget.admit("z\n".into()), None);
        let summary = budget.summary().unwrap();
        assert!(summary.contains("16004 bytes in 3 lines"), "{summary}");
    }
}
