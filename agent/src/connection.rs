//! The agent's side of the WebSocket: dial, HELLO, receive work, stream frames, finish.
//!
//! One writer owns the socket's sending half and assigns every LOG frame its `seq`, so the
//! order of `seq` is the order on the wire. Output arrives from the job task through a bounded
//! channel: when the network is slow, the channel fills, the job's pipe readers wait, and the
//! builder blocks on its stdout — memory stays flat whatever the log volume.
//!
//! Secrets the job carries (registry password, clone token) are scrubbed from every output
//! line before it leaves the machine.

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use stagely_cloud_init::AgentConfig;
use stagely_protocol::{
    Arch, Heartbeat, Hello, Interruption, LINE_SPLIT_MARKER, Log, LogStream, MAX_FRAME_BYTES,
    MAX_LOG_DATA_BYTES, Message, PROTOCOL_VERSION, Status, decode, encode,
};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use tokio_util::sync::CancellationToken;

use crate::job::{self, JobEnvironment, Output, OutputSink, Report};

/// Frames buffered between the job and the socket. Each holds at most one line piece
/// (16 KiB), so the buffer is bounded at a few MiB.
const OUTPUT_BUFFER: usize = 256;
const HEARTBEAT_EVERY: Duration = Duration::from_secs(10);
/// Silence from the core longer than this means the core is gone.
const CORE_SILENCE_LIMIT: Duration = Duration::from_secs(60);
const WORK_WAIT_LIMIT: Duration = Duration::from_secs(120);
const FINAL_ACK_WAIT: Duration = Duration::from_secs(30);
/// How long an agent whose job finished waits for the core to hand it more work.
const NEXT_WORK_WAIT: Duration = Duration::from_secs(30);
/// Longest wait for one dial (TCP, TLS and the WebSocket upgrade).
const DIAL_LIMIT: Duration = Duration::from_secs(20);
/// Longest one frame may take to send (the core batches database writes, so allow slack).
const SEND_LIMIT: Duration = Duration::from_secs(60);

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Why the agent stopped without serving a job.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("the core refused this agent's token (HTTP {0}); the token is wrong or already used")]
    Refused(u16),
    #[error("core_url `{0}` must be http(s):// (plain http only on loopback)")]
    BadUrl(String),
    #[error("TLS with the core failed (check ca_file): {0}")]
    Tls(String),
    #[error("the core was unreachable for {after:?} (core_unreachable_secs); last error: {last}")]
    Unreachable { after: Duration, last: String },
}

/// A TLS failure (bad or untrusted certificate) does not heal by retrying.
fn tls_failure(error: &tungstenite::Error) -> Option<String> {
    match error {
        tungstenite::Error::Tls(tls) => Some(tls.to_string()),
        tungstenite::Error::Io(io)
            if io
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>()) =>
        {
            Some(io.to_string())
        }
        _ => None,
    }
}

/// The agent-side endpoint URL for a core base URL.
pub fn connect_url(core_url: &str) -> Result<String, ConnectError> {
    let trimmed = core_url.trim_end_matches('/');
    let (scheme, rest) = if let Some(rest) = trimmed.strip_prefix("https://") {
        ("wss", rest)
    } else if let Some(rest) = trimmed.strip_prefix("http://") {
        let host = rest.split(['/', '?']).next().unwrap_or("");
        let host = match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        };
        if !matches!(host, "127.0.0.1" | "localhost" | "[::1]") {
            return Err(ConnectError::BadUrl(core_url.to_string()));
        }
        ("ws", rest)
    } else {
        return Err(ConnectError::BadUrl(core_url.to_string()));
    };
    Ok(format!("{scheme}://{rest}/api/v1/agent/connect"))
}

fn tls_config(config: &AgentConfig) -> anyhow::Result<std::sync::Arc<rustls::ClientConfig>> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if let Some(ca_file) = &config.ca_file {
        let mut added = 0;
        for cert in CertificateDer::pem_file_iter(ca_file)
            .with_context(|| format!("reading ca_file {}", ca_file.display()))?
        {
            let cert = cert.with_context(|| format!("parsing ca_file {}", ca_file.display()))?;
            roots
                .add(cert)
                .with_context(|| format!("adding CA from {}", ca_file.display()))?;
            added += 1;
        }
        if added == 0 {
            bail!("ca_file {} holds no certificate", ca_file.display());
        }
    }
    Ok(std::sync::Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// Dials the core, retrying network failures with backoff; a refused token is final.
pub async fn connect(config: &AgentConfig, shutdown: &CancellationToken) -> anyhow::Result<Socket> {
    use backon::{ExponentialBuilder, Retryable};
    let url = connect_url(&config.core_url)?;
    let tls = tls_config(config)?;
    let attempt = || async {
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|error| anyhow!(error))?;
        let bearer = format!("Bearer {}", config.token)
            .parse()
            .map_err(|_| anyhow!("the token contains characters not allowed in a header"))?;
        request.headers_mut().insert("authorization", bearer);
        let ws_config = WebSocketConfig::default()
            .max_message_size(Some(MAX_FRAME_BYTES))
            .max_frame_size(Some(MAX_FRAME_BYTES));
        let dial = tokio_tungstenite::connect_async_tls_with_config(
            request,
            Some(ws_config),
            true,
            Some(tokio_tungstenite::Connector::Rustls(tls.clone())),
        );
        let Ok(dialled) = tokio::time::timeout(DIAL_LIMIT, dial).await else {
            bail!("connecting to {url}: no answer within {DIAL_LIMIT:?}");
        };
        match dialled {
            Ok((socket, _response)) => Ok(socket),
            Err(tungstenite::Error::Http(response))
                if matches!(response.status().as_u16(), 401 | 403) =>
            {
                Err(anyhow!(ConnectError::Refused(response.status().as_u16())))
            }
            Err(error) => match tls_failure(&error) {
                Some(detail) => Err(anyhow!(ConnectError::Tls(detail))),
                None => Err(anyhow!(error).context(format!("connecting to {url}"))),
            },
        }
    };
    // Network failures are retried until the core has been unreachable for
    // `core_unreachable_secs`; then the agent exits and its unit powers the instance off.
    let unreachable = Duration::from_secs(
        config
            .core_unreachable_secs
            .unwrap_or(stagely_cloud_init::DEFAULT_CORE_UNREACHABLE_SECS),
    );
    let last_error = std::sync::Mutex::new(None::<String>);
    let retried = attempt
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(200))
                .with_max_delay(Duration::from_secs(10))
                .without_max_times()
                .with_jitter(),
        )
        .when(|error: &anyhow::Error| error.downcast_ref::<ConnectError>().is_none())
        .notify(|error, delay| {
            tracing::warn!("connecting to the core failed, retrying in {delay:?}: {error:#}");
            if let Ok(mut last) = last_error.lock() {
                *last = Some(format!("{error:#}"));
            }
        });
    tokio::select! {
        result = tokio::time::timeout(unreachable, retried) => match result {
            Ok(result) => result,
            Err(_) => {
                let last = last_error.lock().ok().and_then(|mut last| last.take());
                Err(anyhow!(ConnectError::Unreachable {
                    after: unreachable,
                    last: last.unwrap_or_else(|| "no answer".into()),
                }))
            }
        },
        () = shutdown.cancelled() => bail!("shut down before connecting"),
    }
}

/// Serves jobs over `socket`: the first work frame, then — since HELLO says the agent accepts
/// more — any further one the core hands over after a STATUS is acknowledged (merge on the
/// last builder), until the core closes the connection or sends nothing for
/// [`NEXT_WORK_WAIT`]. Returns the last job's report.
pub async fn serve(
    socket: Socket,
    hello: Hello,
    env: JobEnvironment,
    shutdown: CancellationToken,
) -> anyhow::Result<Report> {
    let (mut sender, mut receiver) = socket.split();
    send_frame(&mut sender, &Message::Hello(hello))
        .await
        .context("sending HELLO")?;
    let mut last: Option<Report> = None;
    let result = loop {
        let limit = if last.is_some() {
            NEXT_WORK_WAIT
        } else {
            WORK_WAIT_LIMIT
        };
        let work = match next_work(&mut receiver, limit, &shutdown, last.is_some()).await {
            Ok(Some(work)) => work,
            Ok(None) => break Ok(()),
            Err(error) => break Err(error),
        };
        match serve_job(&mut sender, &mut receiver, work, env.clone(), &shutdown).await {
            Ok(report) => last = Some(report),
            Err(error) => break Err(error),
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), sender.send(WsMessage::Close(None))).await;
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
                Some(Ok(WsMessage::Text(text))) => match decode(text.as_bytes()) {
                    Ok(message @ (Message::Build(_) | Message::Merge(_))) => {
                        return Ok(Some(message));
                    }
                    Ok(Message::Heartbeat(_) | Message::Ack(_)) => continue,
                    Ok(other) => bail!("core sent {} before any work", other.type_name()),
                    Err(error) => bail!("core sent a malformed frame: {error}"),
                },
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

/// Runs one job and returns once its STATUS is acknowledged.
async fn serve_job(
    sender: &mut futures_util::stream::SplitSink<Socket, WsMessage>,
    receiver: &mut futures_util::stream::SplitStream<Socket>,
    work: Message,
    env: JobEnvironment,
    shutdown: &CancellationToken,
) -> anyhow::Result<Report> {
    let job_id = work.job_id().unwrap_or_default().to_string();
    let span = tracing::info_span!("job", job_id = %job_id);
    let _entered = span.enter();
    tracing::info!(kind = work.type_name(), "work received");

    // Host paths are the agent's business: the job log names the work directory `$WORK`.
    let redactor = Redactor::new(work.secrets()).with_path_alias(&env.work_dir, "$WORK");

    // The cloud's notice that it is reclaiming this (spot) instance, relayed once.
    let metadata_url = env.metadata_url.clone();
    let spot_watch = async move {
        match metadata_url {
            Some(base) => crate::spot::watch(base).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(spot_watch);
    let mut interrupted = false;
    let (output_tx, mut output_rx) = mpsc::channel::<Output>(OUTPUT_BUFFER);
    let cancel = CancellationToken::new();
    let job_cancel = cancel.clone();
    let job_task = tokio::spawn(async move {
        let sink = OutputSink::new(output_tx.clone());
        let report = match &work {
            Message::Build(build) => job::run_build(build, &env, &sink, &job_cancel).await,
            Message::Merge(merge) => job::run_merge(merge, &env, &sink, &job_cancel).await,
            _ => unreachable_report(),
        };
        let _ = output_tx.send(Output::Finished(report)).await;
    });

    let mut pieces = LinePieces::default();
    let mut seq: u64 = 0;
    let mut status_seq: Option<u64> = None;
    let mut final_report: Option<Report> = None;
    let mut heartbeat = tokio::time::interval(HEARTBEAT_EVERY);
    heartbeat.reset();
    let mut last_heard = tokio::time::Instant::now();
    let mut ack_deadline: Option<tokio::time::Instant> = None;
    let mut output_open = true;

    let result: anyhow::Result<()> = loop {
        let silence = tokio::time::sleep_until(last_heard + CORE_SILENCE_LIMIT);
        let ack_wait = async {
            match ack_deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            item = output_rx.recv(), if output_open => match item {
                Some(Output::Line(stream, text)) => {
                    let Some((text, continues)) = pieces.take(&redactor, stream, text) else {
                        continue;
                    };
                    if let Err(error) = send_log(sender, &job_id, stream, &text, continues, &mut seq).await {
                        break Err(error);
                    }
                }
                Some(Output::Finished(report)) => {
                    // A line still held back (its process ended mid-line) goes first.
                    let mut failed = None;
                    for (stream, text) in pieces.drain(&redactor) {
                        if let Err(error) = send_log(sender, &job_id, stream, &text, false, &mut seq).await {
                            failed = Some(error);
                            break;
                        }
                    }
                    if let Some(error) = failed {
                        break Err(error);
                    }
                    seq += 1;
                    status_seq = Some(seq);
                    let status = Message::Status(Status {
                        job_id: job_id.clone(),
                        state: report.state,
                        exit_code: report.exit_code,
                        artifact_url: report.artifact_url.clone(),
                        digest: report.digest.clone(),
                        error: report.error.as_deref().map(|e| redactor.scrub(e)),
                        never_ran: report.never_ran,
                        seq: Some(seq),
                    });
                    final_report = Some(report);
                    if let Err(error) = send_frame(sender, &status).await {
                        break Err(error.context("sending STATUS"));
                    }
                    ack_deadline = Some(tokio::time::Instant::now() + FINAL_ACK_WAIT);
                }
                None => {
                    output_open = false;
                    if final_report.is_none() {
                        break Err(anyhow!("the job task ended without a report"));
                    }
                }
            },
            frame = receiver.next() => {
                last_heard = tokio::time::Instant::now();
                match frame {
                    Some(Ok(WsMessage::Text(text))) => match decode(text.as_bytes()) {
                        Ok(Message::Ack(ack)) => {
                            if status_seq.is_some_and(|s| ack.seq >= s) {
                                break Ok(());
                            }
                        }
                        Ok(Message::Cancel(cancel_frame)) => {
                            tracing::info!(reason = ?cancel_frame.reason, "core cancelled the job");
                            cancel.cancel();
                        }
                        Ok(Message::Heartbeat(_)) => {}
                        Ok(other) => {
                            tracing::warn!(frame = other.type_name(), "ignoring unexpected frame from the core");
                        }
                        Err(error) => {
                            tracing::warn!("ignoring malformed frame from the core: {error}");
                        }
                    },
                    Some(Ok(WsMessage::Close(frame))) => {
                        break Err(anyhow!("core closed the connection: {}", close_reason(frame.as_ref())));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(error)) => break Err(anyhow!(error).context("connection to the core failed")),
                    None => break Err(anyhow!("connection to the core ended")),
                }
            }
            notice = &mut spot_watch, if !interrupted => {
                interrupted = true;
                tracing::warn!(action = %notice.action, time = ?notice.time, "spot interruption notice: telling the core");
                let frame = Message::Interruption(Interruption {
                    job_id: job_id.clone(),
                    action: notice.action,
                    time: notice.time,
                });
                if let Err(error) = send_frame(sender, &frame).await {
                    break Err(error.context("sending INTERRUPTION"));
                }
            }
            _ = heartbeat.tick() => {
                let frame = Message::Heartbeat(Heartbeat { job_id: Some(job_id.clone()) });
                if let Err(error) = send_frame(sender, &frame).await {
                    break Err(error.context("sending HEARTBEAT"));
                }
            }
            () = silence => break Err(anyhow!("no frame from the core for {CORE_SILENCE_LIMIT:?}")),
            () = ack_wait => break Err(anyhow!("the core did not acknowledge STATUS within {FINAL_ACK_WAIT:?}")),
            () = shutdown.cancelled(), if !cancel.is_cancelled() => {
                tracing::info!("shutting down: cancelling the job");
                cancel.cancel();
            }
        }
    };

    // Whatever happened, no build may outlive the connection. Dropping the receiver first
    // unblocks a job task waiting on a full channel (its sends now fail and are ignored).
    cancel.cancel();
    drop(output_rx);
    let _ = job_task.await;
    result?;
    final_report.ok_or_else(|| anyhow!("the job ended without a report"))
}

/// Sends one piece of output as LOG frames (split at the frame limit, marked where the line
/// goes on), numbering each with the next `seq`.
async fn send_log<S>(
    sender: &mut S,
    job_id: &str,
    stream: LogStream,
    text: &str,
    continues: bool,
    seq: &mut u64,
) -> anyhow::Result<()>
where
    S: futures_util::Sink<WsMessage, Error = tungstenite::Error> + Unpin,
{
    for piece in split_data(text, continues) {
        *seq += 1;
        let frame = Message::Log(Log {
            job_id: job_id.to_string(),
            stream,
            data: piece,
            seq: Some(*seq),
        });
        send_frame(sender, &frame)
            .await
            .map_err(|error| error.context("sending LOG"))?;
    }
    Ok(())
}

/// Sends one frame; a core that stops reading cannot stall the agent forever.
async fn send_frame<S>(sender: &mut S, frame: &Message) -> anyhow::Result<()>
where
    S: futures_util::Sink<WsMessage, Error = tungstenite::Error> + Unpin,
{
    match tokio::time::timeout(SEND_LIMIT, sender.send(WsMessage::text(encode(frame)))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(anyhow!(error)),
        Err(_) => Err(anyhow!(
            "the core did not take a {} frame within {SEND_LIMIT:?}",
            frame.type_name()
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

/// Splits `data` into pieces of at most [`MAX_LOG_DATA_BYTES`], on character boundaries.
fn split_data(data: &str, continues: bool) -> Vec<String> {
    let marked = |mut piece: String| {
        piece.push_str(LINE_SPLIT_MARKER);
        piece
    };
    if data.len() <= MAX_LOG_DATA_BYTES - LINE_SPLIT_MARKER.len() {
        let piece = data.to_string();
        return vec![if continues { marked(piece) } else { piece }];
    }
    // Every piece but the line's true end says the line goes on.
    let room = MAX_LOG_DATA_BYTES - LINE_SPLIT_MARKER.len();
    let mut pieces = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let mut end = rest.len().min(room);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        let piece = rest[..end].to_string();
        rest = &rest[end..];
        pieces.push(if rest.is_empty() && !continues {
            piece
        } else {
            marked(piece)
        });
    }
    pieces
}

/// Replaces known secrets in output with `[REDACTED]`, and host paths with a short alias.
pub struct Redactor {
    secrets: stagely_protocol::SecretMask,
    /// (host path prefix, alias); longest first so a canonical path wins over its prefix.
    aliases: Vec<(String, String)>,
}

impl Redactor {
    pub fn new<'a>(secrets: impl IntoIterator<Item = &'a str>) -> Self {
        Redactor {
            secrets: stagely_protocol::SecretMask::new(secrets),
            aliases: Vec::new(),
        }
    }

    /// Shows `path` (as given and as resolved) as `alias` in every scrubbed line.
    pub fn with_path_alias(mut self, path: &std::path::Path, alias: &str) -> Self {
        let mut forms = vec![path.to_string_lossy().into_owned()];
        if let Ok(real) = path.canonicalize() {
            forms.push(real.to_string_lossy().into_owned());
        }
        for form in forms {
            let form = form.trim_end_matches('/').to_string();
            // `/` or a one-letter directory would rewrite ordinary text.
            if form.len() > 1 && !self.aliases.iter().any(|(known, _)| *known == form) {
                self.aliases.push((form, alias.to_string()));
            }
        }
        self.aliases
            .sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
        self
    }

    /// Where a piece cut mid-line may end so that no secret form straddles the end: the
    /// last `longest - 1` bytes are held back, unless a complete form covers that point
    /// (then it ends after it). Always on a character boundary.
    fn safe_end(&self, text: &str) -> usize {
        let hold = self.secrets.longest().saturating_sub(1);
        let mut end = text.len().saturating_sub(hold);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        for (start, stop) in self.secrets.find(text) {
            if start < end && stop > end {
                end = stop;
            }
        }
        end
    }

    pub fn scrub(&self, text: &str) -> String {
        let mut out = self.secrets.mask(text.to_string());
        for (path, alias) in &self.aliases {
            if out.contains(path.as_str()) {
                out = out.replace(path.as_str(), alias);
            }
        }
        out
    }
}

/// Masks secrets across the pieces of a line longer than the reader's cap: a piece cut
/// mid-line keeps back its last bytes (up to the longest secret form, and never inside a
/// complete one) and sends them with the next piece, so a secret straddling the cut is
/// whole in one of the two when masked.
#[derive(Default)]
struct LinePieces {
    held: Vec<(LogStream, String)>,
}

impl LinePieces {
    /// The masked text to send for this piece, and whether the line goes on after it
    /// (`None`: all of it is held back for now).
    fn take(
        &mut self,
        redactor: &Redactor,
        stream: LogStream,
        text: String,
    ) -> Option<(String, bool)> {
        let joined = match self.held.iter().position(|(s, _)| *s == stream) {
            Some(at) => {
                let (_, mut held) = self.held.swap_remove(at);
                held.push_str(&text);
                held
            }
            None => text,
        };
        let cut = !joined.ends_with('\n')
            && joined.len() >= crate::process::MAX_LINE_BYTES.saturating_sub(3);
        if !cut {
            return Some((redactor.scrub(&joined), false));
        }
        let keep = redactor.safe_end(&joined);
        let (send, hold) = joined.split_at(keep);
        if !hold.is_empty() {
            self.held.push((stream, hold.to_string()));
        }
        (!send.is_empty()).then(|| (redactor.scrub(send), true))
    }

    /// Everything held back, masked (the job ended).
    fn drain(&mut self, redactor: &Redactor) -> Vec<(LogStream, String)> {
        self.held
            .drain(..)
            .map(|(stream, text)| (stream, redactor.scrub(&text)))
            .collect()
    }
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

    #[test]
    fn a_secret_straddling_the_cut_of_a_long_line_is_still_masked() {
        let secret = "hunter22-very-secret";
        let redactor = Redactor::new([secret]);
        let cap = crate::process::MAX_LINE_BYTES;
        for split in 1..secret.len() {
            let mut pieces = LinePieces::default();
            let first = format!("{}{}", "x".repeat(cap - split), &secret[..split]);
            let second = format!("{} tail\n", &secret[split..]);
            let mut sent = String::new();
            sent.extend(
                pieces
                    .take(&redactor, LogStream::Stdout, first)
                    .map(|(t, _)| t),
            );
            sent.extend(
                pieces
                    .take(&redactor, LogStream::Stdout, second)
                    .map(|(t, _)| t),
            );
            sent.extend(pieces.drain(&redactor).into_iter().map(|(_, t)| t));
            assert!(!sent.contains(secret), "split at {split}");
            assert!(sent.ends_with("[REDACTED] tail\n"), "split at {split}");
            assert_eq!(sent.len(), cap - split + "[REDACTED] tail\n".len());
        }
        // Another stream's lines pass in between untouched.
        let mut pieces = LinePieces::default();
        let first = format!("{}hunt", "y".repeat(cap - 4));
        assert!(pieces.take(&redactor, LogStream::Stdout, first).is_some());
        assert_eq!(
            pieces.take(&redactor, LogStream::Stderr, "other\n".into()),
            Some(("other\n".to_string(), false))
        );
        let (rest, continues) = pieces
            .take(&redactor, LogStream::Stdout, "er22-very-secret!\n".into())
            .unwrap();
        assert!(!continues);
        assert!(rest.ends_with("y[REDACTED]!\n"), "{rest}");
    }

    #[test]
    fn secrets_are_scrubbed() {
        let redactor = Redactor::new(["hunter22", "x"]);
        assert_eq!(
            redactor.scrub("login with hunter22 failed x"),
            "login with [REDACTED] failed x"
        );
    }

    #[test]
    fn host_paths_are_shown_as_an_alias() {
        let redactor = Redactor::new([]).with_path_alias(
            std::path::Path::new("/tmp/stagely-core-x/instances/local-1/work"),
            "$WORK",
        );
        assert_eq!(
            redactor.scrub("step build: buildah --root /tmp/stagely-core-x/instances/local-1/work/buildah/storage bud /tmp/stagely-core-x/instances/local-1/work/src/api"),
            "step build: buildah --root $WORK/buildah/storage bud $WORK/src/api"
        );
    }

    #[test]
    fn long_data_is_split_on_char_boundaries_and_every_piece_but_the_end_is_marked() {
        let text = format!("{}\n", "é".repeat(MAX_LOG_DATA_BYTES));
        let pieces = split_data(&text, false);
        assert!(pieces.len() >= 3);
        assert!(pieces.iter().all(|p| p.len() <= MAX_LOG_DATA_BYTES));
        let (last, rest) = pieces.split_last().unwrap();
        assert!(rest.iter().all(|p| p.ends_with(LINE_SPLIT_MARKER)));
        assert!(!last.ends_with(LINE_SPLIT_MARKER));
        let joined: String = pieces
            .iter()
            .map(|p| p.strip_suffix(LINE_SPLIT_MARKER).unwrap_or(p))
            .collect();
        assert_eq!(joined, text, "stripping the markers gives the line back");
        // A piece the reader cut (the line goes on) is marked even when short.
        let cut = split_data("abc", true);
        assert_eq!(cut, [format!("abc{LINE_SPLIT_MARKER}")]);
    }
}
