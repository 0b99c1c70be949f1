//! The agent's side of the WebSocket: dial, HELLO, receive work, stream frames, finish —
//! and dial again when the connection drops mid-job.
//!
//! Output arrives from the job task through a bounded channel, is masked and appended to the
//! job's disk spool ([`crate::spool`]), which numbers it (`seq`), and is sent from there in
//! `LOGS` frames (full at 4096 lines or 256 KiB; a partial frame waits at most
//! [`LOG_LINGER`]); the core's ACKs trim the spool. A connection's own task writes its
//! frames (a small bounded outbox), so taking output never waits on the socket. When the
//! connection drops the build goes on: output keeps
//! going to the spool while the agent dials again (backoff with jitter, for the reconnect
//! grace), says HELLO naming the job, attempt and last acknowledged seq, and resends from the
//! position the core's RESUME names. Memory stays flat whatever the log volume: while
//! connected, a spool backlog of half its cap stops the job's pipe readers (the builder blocks
//! on its stdout) instead of growing.
//!
//! Secrets the job carries (registry password, clone token) are scrubbed from every output
//! line before it leaves the machine.

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use stagely_cloud_init::AgentConfig;
use stagely_protocol::agent_session::{AgentEvent, AgentSession, AgentTimers};
use stagely_protocol::{
    Arch, Codec, Hello, Interruption, LogLine, LogStream, Logs, MAX_FRAME_BYTES,
    MAX_FRAME_DATA_BYTES, MAX_LINES_PER_FRAME, MAX_LOG_DATA_BYTES, Message, PROTOCOL_VERSION,
    Status, decode, decode_proto, encode, encode_proto,
};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use tokio_util::sync::CancellationToken;

use crate::job::{self, JobEnvironment, Output, OutputSink, Report};
use crate::redact::{LinePieces, Redactor};

/// Messages buffered between the job and the spool. Each holds one line piece (at most
/// 64 KiB) or a batch of lines (one piece and at most 16 KiB more), so the buffer is bounded
/// at a few MiB.
const OUTPUT_BUFFER: usize = 32;
const HEARTBEAT_EVERY: Duration = Duration::from_secs(10);
/// Silence from the core longer than this means the core is gone.
const CORE_SILENCE_LIMIT: Duration = Duration::from_secs(60);
const WORK_WAIT_LIMIT: Duration = Duration::from_secs(120);
const FINAL_ACK_WAIT: Duration = Duration::from_secs(30);
/// How long an agent whose job finished waits for the core to hand it more work.
const NEXT_WORK_WAIT: Duration = Duration::from_secs(30);
pub use crate::dial::{ConnectError, Dialer, connect, connect_url, connect_with};
use crate::dial::{DIAL_LIMIT, SEND_LIMIT, Socket};

/// How a job's output travels: where it is spooled and how long a dropped connection may
/// take to come back.
#[derive(Clone)]
pub struct LinkSettings {
    pub dialer: Dialer,
    /// How long the build goes on without the core while the agent dials again.
    pub reconnect_grace: Duration,
    /// Cap on the on-disk spool.
    pub spool_max_bytes: u64,
}

impl LinkSettings {
    pub fn new(dialer: Dialer, config: &AgentConfig) -> LinkSettings {
        LinkSettings {
            dialer,
            reconnect_grace: Duration::from_secs(
                config
                    .reconnect_grace_secs
                    .unwrap_or(stagely_cloud_init::DEFAULT_RECONNECT_GRACE_SECS),
            ),
            spool_max_bytes: config
                .spool_max_bytes
                .unwrap_or(crate::spool::DEFAULT_MAX_BYTES),
        }
    }
}

/// Frames queued for a connection's writer: enough that the socket stays busy while the job
/// loop spools output, few enough that memory stays flat (each at most [`MAX_FRAME_BYTES`]).
const OUTBOX_FRAMES: usize = 2;

/// One open connection to the core. Its own task writes the frames queued in `outbox`, so
/// taking the build's output never waits on the socket (the spool absorbs a slow core).
struct Conn {
    receiver: futures_util::stream::SplitStream<Socket>,
    outbox: mpsc::Sender<WsMessage>,
    /// The writer: ends with the error that broke the socket, or when `outbox` closes.
    writer: tokio_util::task::AbortOnDropHandle<anyhow::Result<()>>,
    /// How frames are written on it (the subprotocol the core chose).
    codec: Codec,
}

/// What a connection yields to the job loop.
enum ConnEvent {
    Frame(Option<Result<WsMessage, tungstenite::Error>>),
    /// The writer stopped: the socket can take no more frames.
    WriterStopped(anyhow::Error),
}

impl Conn {
    fn new(socket: Socket, codec: Codec) -> Conn {
        let (sender, receiver) = socket.split();
        let (outbox, frames) = mpsc::channel(OUTBOX_FRAMES);
        let writer =
            tokio_util::task::AbortOnDropHandle::new(tokio::spawn(write_frames(sender, frames)));
        Conn {
            receiver,
            outbox,
            writer,
            codec,
        }
    }

    /// Queues `frame` for the writer, waiting for room at most [`SEND_LIMIT`].
    async fn send(&self, frame: &Message) -> anyhow::Result<()> {
        self.queue(ws_message(self.codec, frame), frame.type_name())
            .await
    }

    async fn queue(&self, message: WsMessage, what: &str) -> anyhow::Result<()> {
        match tokio::time::timeout(SEND_LIMIT, self.outbox.send(message)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(anyhow!(
                "the connection can take no more frames (its writer stopped)"
            )),
            Err(_) => Err(anyhow!(
                "the core did not take a {what} frame within {SEND_LIMIT:?}"
            )),
        }
    }

    /// The next frame from the core, or the writer's failure, whichever comes first.
    async fn next_event(&mut self) -> ConnEvent {
        tokio::select! {
            frame = self.receiver.next() => ConnEvent::Frame(frame),
            ended = &mut self.writer => ConnEvent::WriterStopped(match ended {
                Ok(Ok(())) => anyhow!("the connection's writer ended"),
                Ok(Err(error)) => error,
                Err(error) => anyhow!("the connection's writer failed: {error}"),
            }),
        }
    }

    /// Sends a close frame after everything queued and waits (briefly) for it to go out.
    async fn close(self) {
        let Conn { outbox, writer, .. } = self;
        let _ =
            tokio::time::timeout(Duration::from_secs(5), outbox.send(WsMessage::Close(None))).await;
        drop(outbox);
        let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    }
}

/// A connection's writer: feeds every queued frame to the socket and flushes once the queue
/// is empty (many frames, one flush). Each operation is bounded by [`SEND_LIMIT`].
async fn write_frames(
    mut sink: futures_util::stream::SplitSink<Socket, WsMessage>,
    mut frames: mpsc::Receiver<WsMessage>,
) -> anyhow::Result<()> {
    while let Some(frame) = frames.recv().await {
        within_send_limit(sink.feed(frame), "a frame").await?;
        while let Ok(frame) = frames.try_recv() {
            within_send_limit(sink.feed(frame), "a frame").await?;
        }
        within_send_limit(sink.flush(), "frames").await?;
    }
    Ok(())
}

/// A frame as the connection's codec writes it.
fn ws_message(codec: Codec, frame: &Message) -> WsMessage {
    match codec {
        Codec::Json => WsMessage::text(encode(frame)),
        Codec::Proto => WsMessage::binary(encode_proto(frame)),
    }
}

/// A received text or binary WebSocket message as a frame: text is JSON, binary protobuf.
fn decode_ws(message: &WsMessage) -> Result<Message, stagely_protocol::DecodeError> {
    match message {
        WsMessage::Text(text) => decode(text.as_bytes()),
        WsMessage::Binary(bytes) => decode_proto(bytes),
        // Callers pass only text and binary messages.
        _ => Err(stagely_protocol::DecodeError::MissingType),
    }
}

/// Serves jobs over `socket`: the first work frame, then — since HELLO says the agent accepts
/// more — any further one the core hands over after a STATUS is acknowledged (merge on the
/// last builder), until the core closes the connection or sends nothing for
/// [`NEXT_WORK_WAIT`]. A connection that drops mid-job is dialled again (see
/// [`LinkSettings`]). Returns the last job's report.
pub async fn serve(
    socket: Socket,
    codec: Codec,
    hello: Hello,
    link: LinkSettings,
    env: JobEnvironment,
    shutdown: CancellationToken,
) -> anyhow::Result<Report> {
    let conn = Conn::new(socket, codec);
    conn.send(&Message::Hello(hello.clone()))
        .await
        .context("sending HELLO")?;
    let mut conn = Some(conn);
    let mut last: Option<Report> = None;
    let result = loop {
        let limit = if last.is_some() {
            NEXT_WORK_WAIT
        } else {
            WORK_WAIT_LIMIT
        };
        let Some(open) = conn.as_mut() else {
            break Ok(());
        };
        let work = match next_work(&mut open.receiver, limit, &shutdown, last.is_some()).await {
            Ok(Some(work)) => work,
            Ok(None) => break Ok(()),
            Err(error) => break Err(error),
        };
        let job = JobLink {
            hello: &hello,
            link: &link,
            shutdown: &shutdown,
        };
        match job.serve(&mut conn, work, env.clone()).await {
            Ok(report) => last = Some(report),
            Err(error) => break Err(error),
        }
    };
    if let Some(open) = conn {
        open.close().await;
    }
    result?;
    last.ok_or_else(|| anyhow!("the connection ended without a job"))
}

/// Waits for a BUILD or MERGE. After a finished job (`more`), a close or silence is the
/// normal end (`None`); before the first, they are errors.
async fn next_work(
    receiver: &mut futures_util::stream::SplitStream<Socket>,
    limit: Duration,
    shutdown: &CancellationToken,
    more: bool,
) -> anyhow::Result<Option<Message>> {
    let wait_for_work = tokio::time::timeout(limit, async {
        loop {
            match receiver.next().await {
                Some(Ok(frame @ (WsMessage::Text(_) | WsMessage::Binary(_)))) => {
                    match decode_ws(&frame) {
                        Ok(message @ (Message::Build(_) | Message::Merge(_))) => {
                            return Ok(Some(message));
                        }
                        Ok(Message::Heartbeat(_) | Message::Ack(_)) => continue,
                        Ok(other) => bail!("core sent {} before any work", other.type_name()),
                        Err(error) => bail!("core sent a malformed frame: {error}"),
                    }
                }
                Some(Ok(WsMessage::Close(_))) | None if more => return Ok(None),
                Some(Ok(WsMessage::Close(frame))) => bail!(
                    "core closed the connection before sending work: {}",
                    close_reason(frame.as_ref())
                ),
                Some(Ok(_)) => continue,
                Some(Err(_)) if more => return Ok(None),
                Some(Err(error)) => bail!("connection failed before work arrived: {error}"),
                None => bail!("core closed the connection before sending work"),
            }
        }
    });
    tokio::select! {
        work = wait_for_work => match work {
            Ok(result) => result,
            Err(_) if more => Ok(None),
            Err(_) => Err(anyhow!("no BUILD or MERGE within {WORK_WAIT_LIMIT:?}")),
        },
        () = shutdown.cancelled() => if more { Ok(None) } else { bail!("shut down before any work arrived") },
    }
}

/// Longest a frame that is not full waits for more lines ("a few milliseconds"): a chatty
/// build fills frames long before, a quiet one's line is delayed by at most this.
const LOG_LINGER: Duration = Duration::from_millis(5);
/// Output pieces taken from the job per turn.
const PIECES_PER_TURN: usize = 4096;

type Redial =
    std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<(Conn, u64)>> + Send>>;

/// One job, from its work frame to its acknowledged STATUS, across any number of
/// connections.
struct JobLink<'a> {
    hello: &'a Hello,
    link: &'a LinkSettings,
    shutdown: &'a CancellationToken,
}

impl JobLink<'_> {
    /// Runs one job and returns once its STATUS is acknowledged. Output is masked, spooled
    /// and sent from the spool; a dropped connection is dialled again within the grace while
    /// the build goes on, and the core's RESUME says where to send from.
    async fn serve(
        &self,
        conn: &mut Option<Conn>,
        work: Message,
        env: JobEnvironment,
    ) -> anyhow::Result<Report> {
        let job_id = work.job_id().unwrap_or_default().to_string();
        let attempt = match &work {
            Message::Build(build) => build.attempt,
            Message::Merge(merge) => merge.attempt,
            _ => None,
        };
        let span = tracing::info_span!("job", job_id = %job_id);
        let _entered = span.enter();
        tracing::info!(kind = work.type_name(), "work received");

        // Host paths are the agent's business: the job log names the work directory `$WORK`.
        let redactor = std::sync::Arc::new(
            Redactor::new(work.secrets()).with_path_alias(&env.work_dir, "$WORK"),
        );
        let sink_redactor = redactor.clone();
        let spool_dir = env.work_dir.join("spool").join(safe_name(&job_id));
        let mut spool = crate::spool::Spool::create(&spool_dir, self.link.spool_max_bytes)
            .with_context(|| format!("creating the log spool in {}", spool_dir.display()))?;

        // The cloud's notice that it is reclaiming this (spot) instance, relayed once.
        let metadata_url = env.metadata_url.clone();
        let spot_watch = async move {
            match metadata_url {
                Some(base) => crate::spot::watch(base).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(spot_watch);
        let cancel = CancellationToken::new();
        let (mut output_rx, job_task) = start_job(work, env, sink_redactor, cancel.clone());

        let mut pieces = LinePieces::default();
        let mut final_report: Option<Report> = None;
        let mut output_open = true;
        let mut redial: Option<Redial> = None;
        let backlog_limit = self.link.spool_max_bytes / 2;
        // The protocol's decisions (acks, STATUS delivery, heartbeats, silence, the grace):
        // this loop is their I/O.
        let timers = AgentTimers {
            heartbeat_every: HEARTBEAT_EVERY,
            core_silence_limit: CORE_SILENCE_LIMIT,
            final_ack_wait: FINAL_ACK_WAIT,
            reconnect_grace: self.link.reconnect_grace,
        };
        let mut session = AgentSession::new(&job_id, attempt, self.hello.clone(), timers, now());
        // When the oldest line not yet handed to the writer was spooled (a frame that is not
        // full waits up to LOG_LINGER for more).
        let mut unsent_since: Option<tokio::time::Instant> = None;

        let result: anyhow::Result<()> = loop {
            match self.act_on(&mut session, &mut spool, conn, &mut redial, &cancel) {
                Ok(true) => break Ok(()),
                Ok(false) => {}
                Err(error) => break Err(error),
            }
            if unsent_since.is_none() && spool.has_unsent() {
                unsent_since = Some(tokio::time::Instant::now());
            }
            let connected = conn.is_some();
            let backlogged = connected && spool.bytes() > backlog_limit;
            let (to_send, send_at) = send_time(&session, &spool, unsent_since);
            let outbox = conn.as_ref().map(|open| open.outbox.clone());
            let room = or_pending(
                outbox
                    .as_ref()
                    .filter(|_| to_send)
                    .map(|outbox| room(outbox, send_at)),
            );
            let deadline = or_pending(
                session
                    .poll_timeout()
                    .map(|at| tokio::time::sleep_until(tokio::time::Instant::from_std(at))),
            );
            let incoming = or_pending(conn.as_mut().map(Conn::next_event));
            let dialled = or_pending(redial.as_mut());
            tokio::select! {
                permit = room => {
                    let Some(open) = conn.as_ref() else { continue };
                    if let Err(error) = send_next(&mut session, &mut spool, open, permit, &job_id).await {
                        break Err(error);
                    }
                    if !spool.has_unsent() {
                        unsent_since = None;
                    }
                }
                item = output_rx.recv(), if output_open && !backlogged => {
                    let taken = take_output(item, &mut output_rx, &mut pieces, &redactor, &mut spool);
                    match taken {
                        Ok(Taken { report, closed }) => {
                            if let Some(report) = report {
                                session.handle_finished(status_of(&job_id, &report, &redactor, &spool));
                                final_report = Some(report);
                            }
                            output_open = !closed;
                        }
                        Err(error) => break Err(error),
                    }
                    if !output_open && final_report.is_none() {
                        break Err(anyhow!("the job task ended without a report"));
                    }
                }
                event = incoming => {
                    if let Err(error) = on_incoming(&mut session, event) {
                        break Err(error);
                    }
                }
                dialled = dialled => {
                    redial = None;
                    match dialled {
                        Ok((open, stored)) => {
                            let down = session.disconnected_since().map(|at| at.elapsed()).unwrap_or_default();
                            tracing::info!(stored_seq = stored, spooled = spool.last_seq(), "reconnected to the core after {down:?}; resending from the stored position");
                            *conn = Some(open);
                            session.handle_resumed(now(), stored);
                            unsent_since = None;
                        }
                        Err(error) => break Err(error),
                    }
                }
                notice_now = &mut spot_watch, if !session.is_interrupted() => {
                    tracing::warn!(action = %notice_now.action, time = ?notice_now.time, "spot interruption notice: telling the core");
                    session.handle_interruption(Interruption {
                        job_id: job_id.clone(),
                        action: notice_now.action,
                        time: notice_now.time,
                    });
                }
                () = deadline => {
                    if let Err(error) = session.handle_timeout(now()) {
                        break Err(anyhow!(error));
                    }
                }
                () = self.shutdown.cancelled(), if !cancel.is_cancelled() => {
                    stopped_from_outside(&mut session);
                    cancel.cancel();
                }
            }
        };
        // Whatever happened, no build outlives the job. Dropping the receiver first unblocks
        // a job task waiting on a full channel (its sends now fail and are ignored).
        cancel.cancel();
        drop(output_rx);
        let _ = job_task.await;
        if let Err(error) = spool.remove() {
            tracing::warn!("removing the log spool failed: {error}");
        }
        result?;
        final_report.ok_or_else(|| anyhow!("the job ended without a report"))
    }

    /// Acts on what the session decided: trims or rewinds the spool, drops a dead connection
    /// and dials again, stops the build. `Ok(true)` once the STATUS is stored.
    fn act_on(
        &self,
        session: &mut AgentSession,
        spool: &mut crate::spool::Spool,
        conn: &mut Option<Conn>,
        redial: &mut Option<Redial>,
        cancel: &CancellationToken,
    ) -> anyhow::Result<bool> {
        while let Some(event) = session.poll_event() {
            match event {
                AgentEvent::Acked { seq } => spool.ack(seq).context("trimming the log spool")?,
                AgentEvent::Rewind { seq } => {
                    spool.rewind(seq).context("rewinding the log spool")?;
                }
                AgentEvent::Redial { hello, reason } => {
                    tracing::warn!(
                        acked_seq = spool.acked(),
                        spooled = spool.last_seq(),
                        "the connection to the core dropped ({reason}); the build goes on and the agent dials again for up to {:?}",
                        self.link.reconnect_grace
                    );
                    *conn = None;
                    let since = session.disconnected_since().unwrap_or_else(now);
                    *redial = Some(Box::pin(resume(
                        self.link.dialer.clone(),
                        *hello,
                        tokio::time::Instant::from_std(since + self.link.reconnect_grace),
                    )));
                }
                AgentEvent::CancelJob { reason } => {
                    tracing::info!(?reason, "core cancelled the job");
                    cancel.cancel();
                }
                AgentEvent::Done => return Ok(true),
            }
        }
        Ok(false)
    }
}

/// The agent's clock, as the session takes it (tokio's, so paused test time applies).
fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// The machine shuts down mid-job with no CANCEL from the core: the build did not fail, so
/// the core is told before anything else and runs the job again elsewhere. A job that already
/// reported only finishes delivering that. (The caller cancels the build.)
fn stopped_from_outside(session: &mut AgentSession) {
    if !session.has_status() && !session.is_interrupted() {
        tracing::warn!("shutting down mid-job: telling the core, cancelling the job");
        let job_id = session.job_id().to_string();
        session.handle_interruption(Interruption {
            job_id,
            action: stagely_protocol::SHUTDOWN_ACTION.into(),
            time: None,
        });
    } else {
        tracing::info!("shutting down: cancelling the job");
    }
}

/// `future`'s output, or never when there is none (a `select!` arm that is off).
async fn or_pending<F: std::future::Future>(future: Option<F>) -> F::Output {
    match future {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

/// A free place in the writer's queue, taken at `send_at` at the earliest; never when the
/// writer stopped (the connection reports why).
async fn room(
    outbox: &mpsc::Sender<WsMessage>,
    send_at: Option<tokio::time::Instant>,
) -> mpsc::Permit<'_, WsMessage> {
    if let Some(at) = send_at {
        tokio::time::sleep_until(at).await;
    }
    match outbox.reserve().await {
        Ok(permit) => permit,
        Err(_) => std::future::pending().await,
    }
}

/// Starts the job's build or merge in its own task: its output comes through the channel
/// returned, ending with its report; `cancel` stops it.
fn start_job(
    work: Message,
    env: JobEnvironment,
    redactor: std::sync::Arc<Redactor>,
    cancel: CancellationToken,
) -> (mpsc::Receiver<Output>, tokio::task::JoinHandle<()>) {
    let (output_tx, output_rx) = mpsc::channel::<Output>(OUTPUT_BUFFER);
    let job_task = tokio::spawn(async move {
        let sink = OutputSink::new(output_tx.clone()).masked_by(redactor);
        let report = match &work {
            Message::Build(build) => job::run_build(build, &env, &sink, &cancel).await,
            Message::Merge(merge) => job::run_merge(merge, &env, &sink, &cancel).await,
            _ => unreachable_report(),
        };
        let _ = output_tx.send(Output::Finished(report)).await;
    });
    (output_rx, job_task)
}

/// Whether the writer has something to take, and when (`None`: as soon as it has room): the
/// session's own frames (a notice, a heartbeat, the STATUS) and a full frame of lines at once,
/// a partial frame once it has lingered [`LOG_LINGER`] since `unsent_since`.
fn send_time(
    session: &AgentSession,
    spool: &crate::spool::Spool,
    unsent_since: Option<tokio::time::Instant>,
) -> (bool, Option<tokio::time::Instant>) {
    let (unsent_lines, unsent_bytes) = spool.unsent();
    let session_frame = session.wants_to_send(unsent_lines > 0);
    let to_send = session_frame || unsent_lines > 0;
    let at = if session_frame
        || session.has_status()
        || unsent_lines >= MAX_LINES_PER_FRAME as u64
        || unsent_bytes >= MAX_FRAME_DATA_BYTES as u64
    {
        None
    } else {
        unsent_since.map(|since| since + LOG_LINGER)
    };
    (to_send, at)
}

/// Fills the writer's free place (`permit`): the session's next frame, else the next LOGS
/// frame(s) from the spool. A connection that cannot take the rest is reported lost.
async fn send_next(
    session: &mut AgentSession,
    spool: &mut crate::spool::Spool,
    open: &Conn,
    permit: mpsc::Permit<'_, WsMessage>,
    job_id: &str,
) -> anyhow::Result<()> {
    if let Some(frame) = session.poll_frame(now(), spool.has_unsent()) {
        permit.send(ws_message(open.codec, &frame));
        return Ok(());
    }
    let Some(messages) = next_lines(open.codec, spool, job_id)? else {
        return Ok(());
    };
    let mut messages = messages.into_iter();
    if let Some(first) = messages.next() {
        permit.send(first);
    }
    for message in messages {
        // A batch JSON escaping made larger than a frame goes as more frames.
        if let Err(error) = open.queue(message, "LOGS").await {
            session.handle_lost(now(), format!("{error:#}"));
            break;
        }
    }
    Ok(())
}

/// What [`take_output`] took from the job: its report when it ended, and whether its output
/// channel closed.
struct Taken {
    report: Option<Report>,
    closed: bool,
}

/// Takes the job's output (`first` and what else is ready, up to [`PIECES_PER_TURN`]):
/// masked, cut where a line is too long, spooled, the spool flushed.
fn take_output(
    first: Option<Output>,
    output_rx: &mut mpsc::Receiver<Output>,
    pieces: &mut LinePieces,
    redactor: &Redactor,
    spool: &mut crate::spool::Spool,
) -> anyhow::Result<Taken> {
    let mut item = first;
    let mut taken = 0;
    let mut report = None;
    let mut closed = false;
    loop {
        match item {
            Some(Output::Line(stream, text)) => {
                intake(pieces, redactor, spool, stream, text, false)
                    .context("writing the log spool")?;
            }
            Some(Output::Lines(stream, texts, clean)) => {
                taken += texts.len().saturating_sub(1);
                for text in texts {
                    intake(pieces, redactor, spool, stream, text, clean)
                        .context("writing the log spool")?;
                }
            }
            Some(Output::Finished(ended)) => {
                // A line still held back (its process ended mid-line) goes first.
                for (stream, text) in pieces.drain(redactor) {
                    let _ = spool_piece(spool, stream, text, false);
                }
                let _ = spool.close_dropped();
                report = Some(ended);
            }
            None => {
                closed = true;
                break;
            }
        }
        taken += 1;
        if taken >= PIECES_PER_TURN {
            break;
        }
        match output_rx.try_recv() {
            Ok(next) => item = Some(next),
            Err(_) => break,
        }
    }
    spool.flush().context("writing the log spool")?;
    Ok(Taken { report, closed })
}

/// The job's STATUS from its report: after the last spooled line, its error masked.
fn status_of(
    job_id: &str,
    report: &Report,
    redactor: &Redactor,
    spool: &crate::spool::Spool,
) -> Status {
    Status {
        job_id: job_id.to_string(),
        state: report.state,
        exit_code: report.exit_code,
        artifact_url: report.artifact_url.clone(),
        digest: report.digest.clone(),
        error: report.error.as_deref().map(|e| redactor.scrub(e)),
        never_ran: report.never_ran,
        seq: Some(spool.last_seq() + 1),
    }
}

/// Hands what the connection yielded to the session: a frame, or the news that it broke.
/// `Err` only when the core closed it for a protocol violation (dialling again would repeat
/// it).
fn on_incoming(session: &mut AgentSession, event: ConnEvent) -> anyhow::Result<()> {
    let at = now();
    let frame = match event {
        ConnEvent::Frame(frame) => frame,
        ConnEvent::WriterStopped(error) => {
            session.handle_lost(at, format!("{:#}", error.context("sending to the core")));
            return Ok(());
        }
    };
    session.handle_heard(at);
    match frame {
        Some(Ok(frame @ (WsMessage::Text(_) | WsMessage::Binary(_)))) => match decode_ws(&frame) {
            Ok(message) => {
                if let Err(error) = session.handle_frame(at, message) {
                    tracing::warn!("{error}");
                }
            }
            Err(error) => tracing::warn!("ignoring malformed frame from the core: {error}"),
        },
        Some(Ok(WsMessage::Close(frame))) => {
            let reason = close_reason(frame.as_ref());
            if frame.as_ref().is_some_and(|f| u16::from(f.code) == 1008) {
                bail!("core closed the connection: {reason}");
            }
            session.handle_lost(at, format!("core closed the connection: {reason}"));
        }
        Some(Ok(_)) => {}
        Some(Err(error)) => {
            session.handle_lost(at, format!("connection to the core failed: {error}"))
        }
        None => session.handle_lost(at, "connection to the core ended"),
    }
    Ok(())
}

/// A file-name-safe form of a job id.
fn safe_name(job_id: &str) -> String {
    let name: String = job_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect();
    if name.is_empty() { "job".into() } else { name }
}

/// Masks one piece of output and spools it (a piece cut mid-line may be held back).
/// `clean`: it was read from bytes [`Redactor::is_clean`] passed.
fn intake(
    pieces: &mut LinePieces,
    redactor: &Redactor,
    spool: &mut crate::spool::Spool,
    stream: LogStream,
    text: String,
    clean: bool,
) -> std::io::Result<()> {
    match pieces.take(redactor, stream, text, clean) {
        Some((text, continues)) => spool_piece(spool, stream, text, continues),
        None => Ok(()),
    }
}

/// Appends one masked piece of output to the spool (split at the frame limit, marked where
/// the line goes on).
fn spool_piece(
    spool: &mut crate::spool::Spool,
    stream: LogStream,
    text: String,
    continues: bool,
) -> std::io::Result<()> {
    split_data(text, continues, |piece, continued| {
        spool
            .append_owned(stream, std::borrow::Cow::Owned(piece), continued)
            .map(|_| ())
    })
}

/// The next LOGS frame(s) of spooled lines not yet sent (more than one when JSON escaping
/// makes a batch larger than a frame), if any.
fn next_lines(
    codec: Codec,
    spool: &mut crate::spool::Spool,
    job_id: &str,
) -> anyhow::Result<Option<Vec<WsMessage>>> {
    let mut lines = Vec::new();
    let mut first = None;
    let mut bytes = 0;
    while lines.len() < MAX_LINES_PER_FRAME && bytes < MAX_FRAME_DATA_BYTES {
        let Some(record) = spool.next_unsent().context("reading the log spool")? else {
            break;
        };
        first.get_or_insert(record.seq);
        bytes += record.data.len();
        lines.push(LogLine {
            stream: record.stream,
            data: record.data,
            continued: record.continued,
        });
    }
    Ok(first.map(|first| logs_frames(codec, job_id, first, lines)))
}

/// `LOGS` frames for consecutive lines from `first`: one, unless encoding (JSON escaping)
/// made it larger than a frame may be, then halves until each fits.
fn logs_frames(codec: Codec, job_id: &str, first: u64, lines: Vec<LogLine>) -> Vec<WsMessage> {
    let count = lines.len();
    let frame = Message::Logs(Logs {
        job_id: job_id.to_string(),
        seq: first,
        lines,
    });
    let message = ws_message(codec, &frame);
    if message.len() <= MAX_FRAME_BYTES || count < 2 {
        return vec![message];
    }
    let Message::Logs(Logs { mut lines, .. }) = frame else {
        return vec![message];
    };
    let tail = lines.split_off(count / 2);
    let mut frames = logs_frames(codec, job_id, first, lines);
    frames.extend(logs_frames(codec, job_id, first + (count / 2) as u64, tail));
    frames
}

/// Dials the core again and resumes the job: a HELLO naming it, answered by RESUME with the
/// highest seq the core stored. Retried with backoff and jitter until `give_up_at`; a refused
/// token (the attempt is over) or a refusal of the HELLO is final.
async fn resume(
    dialer: Dialer,
    hello: Hello,
    give_up_at: tokio::time::Instant,
) -> anyhow::Result<(Conn, u64)> {
    use backon::{ExponentialBuilder, Retryable};
    let attempt = || async {
        let (socket, codec) = dialer.dial_once().await?;
        let mut conn = Conn::new(socket, codec);
        conn.send(&Message::Hello(hello.clone()))
            .await
            .context("sending HELLO")?;
        let answer = tokio::time::timeout(DIAL_LIMIT, async {
            loop {
                match conn.receiver.next().await {
                    Some(Ok(frame @ (WsMessage::Text(_) | WsMessage::Binary(_)))) => {
                        match decode_ws(&frame) {
                            Ok(Message::Resume(resume)) => return Ok(resume.seq),
                            Ok(Message::Heartbeat(_) | Message::Ack(_)) => continue,
                            Ok(other) => bail!(
                                "the core answered a resuming HELLO with {}",
                                other.type_name()
                            ),
                            Err(error) => bail!("the core sent a malformed frame: {error}"),
                        }
                    }
                    Some(Ok(WsMessage::Close(frame))) => {
                        let reason = close_reason(frame.as_ref());
                        if frame.as_ref().is_some_and(|f| u16::from(f.code) == 1008) {
                            return Err(anyhow!(ConnectError::Rejected(reason)));
                        }
                        bail!("the core closed the connection before RESUME: {reason}")
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(error)) => bail!("the connection failed before RESUME: {error}"),
                    None => bail!("the connection ended before RESUME"),
                }
            }
        })
        .await
        .map_err(|_| anyhow!("no RESUME within {DIAL_LIMIT:?}"))??;
        Ok((conn, answer))
    };
    let retried = attempt
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(5))
                .without_max_times()
                .with_jitter(),
        )
        .when(|error: &anyhow::Error| error.downcast_ref::<ConnectError>().is_none())
        .notify(|error, delay| {
            tracing::warn!("reconnecting to the core failed, retrying in {delay:?}: {error:#}");
        });
    match tokio::time::timeout_at(give_up_at, retried).await {
        Ok(Ok(resumed)) => Ok(resumed),
        Ok(Err(error)) => match error.downcast_ref::<ConnectError>() {
            Some(ConnectError::Refused(_)) => Err(anyhow!(
                "the core no longer accepts this agent's token: the attempt ended while the connection was down; the build was stopped"
            )),
            _ => Err(error),
        },
        Err(_) => Err(anyhow!(
            "the core could not be reached again within the reconnect grace; the build was stopped"
        )),
    }
}

/// One sink operation within [`SEND_LIMIT`]: a core that stops reading cannot stall the
/// agent forever. `what` names the frame(s) for the error.
async fn within_send_limit<F>(operation: F, what: &str) -> anyhow::Result<()>
where
    F: std::future::Future<Output = Result<(), tungstenite::Error>>,
{
    match tokio::time::timeout(SEND_LIMIT, operation).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(anyhow!(error)),
        Err(_) => Err(anyhow!(
            "the core did not take {what} within {SEND_LIMIT:?}"
        )),
    }
}

fn unreachable_report() -> Report {
    Report {
        state: stagely_protocol::JobState::Failed,
        exit_code: None,
        artifact_url: None,
        digest: None,
        error: Some("work frame was neither BUILD nor MERGE".into()),
        never_ran: Some(stagely_protocol::NeverRan::AgentError),
    }
}

fn close_reason(frame: Option<&tungstenite::protocol::CloseFrame>) -> String {
    match frame {
        Some(frame) => format!("{} ({})", frame.reason, u16::from(frame.code)),
        None => "no reason given".into(),
    }
}

/// Splits `data` into pieces of at most [`MAX_LOG_DATA_BYTES`], on character boundaries, and
/// hands each to `each` in order with whether the line goes on after it (stopping at its
/// first error). A piece that fits (nearly every line) is handed on as it is: no copy, no
/// list of pieces. `continues`: the line goes on after `data` too.
fn split_data(
    data: String,
    continues: bool,
    mut each: impl FnMut(String, bool) -> std::io::Result<()>,
) -> std::io::Result<()> {
    if data.len() <= MAX_LOG_DATA_BYTES {
        return each(data, continues);
    }
    // Every piece but the line's true end says the line goes on (out of band: a flag, not
    // text a build could print too).
    let mut rest = data.as_str();
    while !rest.is_empty() {
        let mut end = rest.len().min(MAX_LOG_DATA_BYTES);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        let piece = rest[..end].to_string();
        rest = &rest[end..];
        each(piece, continues || !rest.is_empty())?;
    }
    Ok(())
}

/// Builds this agent's HELLO.
pub fn hello(instance_id: String, env: &JobEnvironment) -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        instance_id,
        arch: env.host_arch,
        builders: env.backend.iter().map(|b| b.kind()).collect(),
        emulated_arches: env.emulated_arches.clone(),
        accepts_more_work: true,
        job_id: None,
        attempt: None,
        acked_seq: None,
    }
}

/// The host's architecture.
pub fn host_arch() -> anyhow::Result<Arch> {
    Arch::from_rust_arch(std::env::consts::ARCH)
        .ok_or_else(|| anyhow!("unsupported host architecture {}", std::env::consts::ARCH))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_ws_is_only_allowed_on_loopback() {
        assert_eq!(
            connect_url("http://127.0.0.1:8080").unwrap(),
            "ws://127.0.0.1:8080/api/v1/agent/connect"
        );
        assert_eq!(
            connect_url("https://core.example.com/").unwrap(),
            "wss://core.example.com/api/v1/agent/connect"
        );
        assert!(connect_url("http://core.example.com:8080").is_err());
        assert!(connect_url("http://192.0.2.10:8080").is_err());
        assert!(connect_url("ftp://x").is_err());
    }

    /// The pieces [`split_data`] hands on, in order, each with its `continued` flag.
    fn split_data(data: String, continues: bool) -> Vec<(String, bool)> {
        let mut pieces = Vec::new();
        super::split_data(data, continues, |piece, continued| {
            pieces.push((piece, continued));
            Ok(())
        })
        .unwrap();
        pieces
    }

    #[test]
    fn long_data_is_split_on_char_boundaries_and_every_piece_but_the_end_is_flagged() {
        let text = format!("{}\n", "é".repeat(MAX_LOG_DATA_BYTES));
        let pieces = split_data(text.clone(), false);
        assert!(pieces.len() >= 2);
        assert!(pieces.iter().all(|(p, _)| p.len() <= MAX_LOG_DATA_BYTES));
        let (last, rest) = pieces.split_last().unwrap();
        assert!(rest.iter().all(|(_, continued)| *continued));
        assert!(!last.1);
        let joined: String = pieces.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            joined, text,
            "joining the pieces gives the line back, byte for byte"
        );
        // A piece the reader cut (the line goes on) is flagged even when short.
        assert_eq!(
            split_data("abc".to_string(), true),
            [("abc".to_string(), true)]
        );
        // What a build prints is only text: the old in-band marker is not a cut.
        let printed = "x [stagely: long line split, continued in the next line]\n".to_string();
        assert_eq!(split_data(printed.clone(), false), [(printed, false)]);
    }
}
