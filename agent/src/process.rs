//! One child process, run the way a build step must be run.
//!
//! The child leads its own process group, so [`RunningProcess::interrupt`] (SIGTERM) and
//! [`RunningProcess::terminate`] (SIGKILL) reach everything it started. Its stdout and stderr
//! are read line by line, each line capped at [`MAX_LINE_BYTES`] (longer lines are cut into
//! pieces) and decoded lossily, and handed to a [`LineSink`] as they arrive: nothing is
//! collected, and a slow sink slows the child down through the pipe instead of growing memory.
//!
//! A grandchild that keeps stdout open after the child exits must not hang the job: once the
//! child has exited, readers get [`DRAIN_GRACE`] to finish, then the group is killed.

use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use stagely_protocol::LogStream;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

/// Longest piece of a line handed to the sink at once.
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// How long output may keep flowing after the child exited.
pub const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// How long an interrupted process gets before SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(10);

/// Receives output lines in order per stream.
pub trait LineSink: Clone + Send + 'static {
    /// Called for each line (with its `\n` when it had one). Awaiting applies backpressure.
    fn line(&self, stream: LogStream, text: String)
    -> impl std::future::Future<Output = ()> + Send;

    /// Called with consecutive lines of one stream that were read together (a chatty
    /// process's output goes on in batches, not a call per line). `clean`: [`LineSink::clean`]
    /// said the bytes they were read from hold nothing the sink rewrites.
    fn lines(
        &self,
        stream: LogStream,
        texts: Vec<String>,
        _clean: bool,
    ) -> impl std::future::Future<Output = ()> + Send {
        let sink = self.clone();
        async move {
            for text in texts {
                sink.line(stream, text).await;
            }
        }
    }

    /// Whether `bytes` (lines read together, before they are cut apart) hold nothing this
    /// sink would rewrite (a secret, a host path): one search over the block instead of one
    /// per line. Default: not known.
    fn clean(&self, _bytes: &[u8]) -> bool {
        false
    }
}

/// Most lines handed to the sink in one batch, and their most bytes (beyond the first line).
const BATCH_LINES: usize = 512;
const BATCH_BYTES: usize = 16 * 1024;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Exited on its own with this code (a signal death maps to 128 + signal).
    Exited(i32),
    /// Stopped because the cancel token fired.
    Cancelled,
    /// Stopped because the deadline passed.
    TimedOut,
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot start `{program}`: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("waiting for `{program}` failed: {source}")]
    Wait {
        program: String,
        #[source]
        source: std::io::Error,
    },
}

/// A command for `program` with a minimal environment: only [`INHERITED_ENV`] passes from the
/// agent to its children (git, the builder); anything a step needs beyond that is set on
/// purpose by the caller. Secrets never travel by environment: they reach children through
/// 0600 files.
///
/// [`INHERITED_ENV`]: stagely_protocol::INHERITED_ENV
pub fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new(program);
    command
        .env_clear()
        .envs(stagely_protocol::inherited_env(std::env::var_os));
    command
}

/// A started child in its own process group.
pub struct RunningProcess {
    child: Child,
    program: String,
    pgid: Pid,
}

impl RunningProcess {
    /// Starts `command` in a new process group with piped output.
    pub fn spawn(command: Command, program: &str) -> Result<RunningProcess, ProcessError> {
        Self::spawn_with_stdout(command, program, None)
    }

    /// Like [`RunningProcess::spawn`], but stdout goes to `stdout_file` when given (for
    /// commands whose output is a result, not a log).
    pub fn spawn_with_stdout(
        mut command: Command,
        program: &str,
        stdout_file: Option<std::fs::File>,
    ) -> Result<RunningProcess, ProcessError> {
        let stdout = match stdout_file {
            Some(file) => Stdio::from(file),
            None => Stdio::piped(),
        };
        command
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let child = command.spawn().map_err(|source| ProcessError::Spawn {
            program: program.to_string(),
            source,
        })?;
        let pid = child.id().unwrap_or(0) as i32;
        Ok(RunningProcess {
            child,
            program: program.to_string(),
            pgid: Pid::from_raw(pid),
        })
    }

    /// SIGTERM to the whole group.
    pub fn interrupt(&self) {
        let _ = killpg(self.pgid, Signal::SIGTERM);
    }

    /// SIGKILL to the whole group.
    pub fn terminate(&self) {
        let _ = killpg(self.pgid, Signal::SIGKILL);
    }

    /// Streams output to `sink` until the child ends, is cancelled, or `timeout` passes.
    pub async fn run<S: LineSink>(
        mut self,
        sink: S,
        cancel: &CancellationToken,
        timeout: Option<Duration>,
    ) -> Result<Outcome, ProcessError> {
        let stdout = self.child.stdout.take();
        let stderr = self.child.stderr.take();
        let progress = Arc::new(Progress::default());
        let mut readers = tokio::task::JoinSet::new();
        if let Some(out) = stdout {
            readers.spawn(pump(out, LogStream::Stdout, sink.clone(), progress.clone()));
        }
        if let Some(err) = stderr {
            readers.spawn(pump(err, LogStream::Stderr, sink, progress.clone()));
        }

        let deadline = async {
            match timeout {
                Some(limit) => tokio::time::sleep(limit).await,
                None => std::future::pending::<()>().await,
            }
        };
        let stopped = tokio::select! {
            status = self.child.wait() => Ok(status),
            () = cancel.cancelled() => Err(Outcome::Cancelled),
            () = deadline => Err(Outcome::TimedOut),
        };
        let outcome = match stopped {
            Ok(status) => {
                let status = status.map_err(|source| ProcessError::Wait {
                    program: self.program.clone(),
                    source,
                })?;
                Outcome::Exited(exit_code(status))
            }
            Err(reason) => {
                self.interrupt();
                if tokio::time::timeout(KILL_GRACE, self.child.wait())
                    .await
                    .is_err()
                {
                    self.terminate();
                    let _ = self.child.wait().await;
                }
                reason
            }
        };

        // Let the readers drain everything the child wrote. Waiting is bounded only when
        // nothing moves: output still flowing, or a sink applying backpressure, is waited
        // for (those lines must not be lost). No movement for DRAIN_GRACE means a grandchild
        // holds the pipe open: kill the group; if even that leaves the pipe open (a process
        // that escaped the group), give up on the readers.
        let mut delivered = progress.delivered.load(Ordering::Relaxed);
        let mut killed = false;
        loop {
            let finished = tokio::time::timeout(DRAIN_GRACE, async {
                while readers.join_next().await.is_some() {}
            })
            .await;
            if finished.is_ok() {
                break;
            }
            let now = progress.delivered.load(Ordering::Relaxed);
            let busy = progress.in_sink.load(Ordering::Relaxed) > 0 || now != delivered;
            delivered = now;
            if busy {
                continue;
            }
            if !killed {
                self.terminate();
                killed = true;
                continue;
            }
            readers.abort_all();
            break;
        }
        // Nothing of this group may outlive the step.
        self.terminate();
        Ok(outcome)
    }
}

fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|signal| 128 + signal))
        .unwrap_or(-1)
}

/// How far the readers got, so draining can tell "still working" from "stuck".
#[derive(Default)]
struct Progress {
    /// Readers currently waiting on the sink (backpressure).
    in_sink: AtomicUsize,
    /// Pieces handed to the sink so far.
    delivered: AtomicU64,
}

async fn pump<R: AsyncRead + Unpin, S: LineSink>(
    reader: R,
    stream: LogStream,
    sink: S,
    progress: Arc<Progress>,
) {
    let mut reader = BufReader::with_capacity(64 * 1024, reader);
    let mut buffer = Vec::with_capacity(4096);
    let mut carry: Vec<u8> = Vec::new();
    loop {
        buffer.clear();
        buffer.append(&mut carry);
        match read_line_capped(&mut reader, &mut buffer, MAX_LINE_BYTES).await {
            Ok(0) => break,
            Ok(_) => {
                // A piece cut at the cap keeps a trailing incomplete UTF-8 character for the
                // next piece, so lossy decoding does not mangle it.
                if buffer.len() >= MAX_LINE_BYTES && buffer.last() != Some(&b'\n') {
                    carry = buffer.split_off(utf8_safe_end(&buffer));
                }
                let mut batch = Vec::with_capacity(BATCH_LINES);
                batch.push(text_of(&buffer));
                // A piece of a cut line is never marked clean: a secret may straddle the cut.
                let mut clean = carry.is_empty() && sink.clean(&buffer);
                if carry.is_empty() {
                    // Whole lines already read go along, without waiting for more.
                    let taken = whole_lines(reader.buffer(), &mut batch);
                    clean = clean && (taken == 0 || sink.clean(&reader.buffer()[..taken]));
                    reader.consume(taken);
                }
                let count = batch.len() as u64;
                progress.in_sink.fetch_add(1, Ordering::Relaxed);
                sink.lines(stream, batch, clean).await;
                progress.in_sink.fetch_sub(1, Ordering::Relaxed);
                progress.delivered.fetch_add(count, Ordering::Relaxed);
            }
            Err(error) => {
                sink.line(
                    LogStream::System,
                    format!(
                        "stagely-agent: reading {} failed: {error}\n",
                        stream.as_str()
                    ),
                )
                .await;
                break;
            }
        }
        if buffer.capacity() > 64 * 1024 {
            buffer = Vec::with_capacity(4096);
        }
    }
}

/// Appends to `batch` the whole lines at the start of `available` (up to [`BATCH_LINES`]
/// in all, and [`BATCH_BYTES`] or the line that crosses it); returns the bytes they took.
/// Their text is checked as UTF-8 once for all of them (a check per line cost more than the
/// check itself); only when that fails, line by line, with replacement characters.
fn whole_lines(available: &[u8], batch: &mut Vec<String>) -> usize {
    let room = BATCH_LINES.saturating_sub(batch.len());
    let (mut end, mut count) = (0, 0);
    while count < room && end < BATCH_BYTES {
        let Some(newline) = memchr::memchr(b'\n', &available[end..]) else {
            break;
        };
        end += newline + 1;
        count += 1;
    }
    // The region ends with a newline, so it splits into exactly `count` lines.
    let region = &available[..end];
    match std::str::from_utf8(region) {
        Ok(text) => batch.extend(text.split_inclusive('\n').map(str::to_owned)),
        Err(_) => batch.extend(region.split_inclusive(|byte| *byte == b'\n').map(text_of)),
    }
    end
}

/// A line as text: as it is when it is UTF-8 (the common case, one copy), else with
/// replacement characters.
fn text_of(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_owned(),
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    }
}

/// The length of `bytes` without a trailing incomplete UTF-8 sequence (at most 3 bytes).
fn utf8_safe_end(bytes: &[u8]) -> usize {
    let len = bytes.len();
    for back in 1..=3.min(len) {
        let byte = bytes[len - back];
        if byte & 0b1100_0000 == 0b1000_0000 {
            continue; // continuation byte: keep looking for the lead byte
        }
        let needed = match byte {
            0x00..=0x7F => 1,
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => return len,
        };
        return if needed > back { len - back } else { len };
    }
    len
}

/// Reads up to and including `\n`, but never more than `cap` bytes in `buffer` (which may
/// already hold carried bytes); returns the bytes now in `buffer` (0 at end of input).
async fn read_line_capped<R: AsyncBufReadExt + Unpin>(
    reader: &mut R,
    buffer: &mut Vec<u8>,
    cap: usize,
) -> std::io::Result<usize> {
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(buffer.len());
        }
        let room = cap.saturating_sub(buffer.len());
        let window = &available[..available.len().min(room)];
        if let Some(newline) = window.iter().position(|b| *b == b'\n') {
            buffer.extend_from_slice(&window[..=newline]);
            reader.consume(newline + 1);
            return Ok(buffer.len());
        }
        let taken = window.len();
        buffer.extend_from_slice(window);
        reader.consume(taken);
        if buffer.len() >= cap {
            // Cut here; the rest of the line follows as the next piece.
            return Ok(buffer.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn whole_lines_are_taken_with_one_utf8_check_and_a_bad_byte_costs_only_its_line() {
        let mut batch = vec!["first\n".to_string()];
        let taken = whole_lines(b"a\n\xc3\xa9\nhalf", &mut batch);
        assert_eq!(taken, 5, "the unfinished line stays");
        assert_eq!(batch, ["first\n", "a\n", "\u{e9}\n"]);
        let mut batch = Vec::new();
        let taken = whole_lines(b"ok\nbad \xff here\nfine\n", &mut batch);
        assert_eq!(taken, 19);
        assert_eq!(batch, ["ok\n", "bad \u{FFFD} here\n", "fine\n"]);
        // At most BATCH_LINES in the batch, counting what it held.
        let many = "x\n".repeat(BATCH_LINES * 2);
        let mut batch = vec!["held\n".to_string()];
        let taken = whole_lines(many.as_bytes(), &mut batch);
        assert_eq!(batch.len(), BATCH_LINES);
        assert_eq!(taken, (BATCH_LINES - 1) * 2);
        assert_eq!(whole_lines(b"no newline", &mut Vec::new()), 0);
    }

    #[derive(Clone, Default)]
    struct Collect(Arc<Mutex<Vec<(LogStream, String)>>>);

    impl LineSink for Collect {
        async fn line(&self, stream: LogStream, text: String) {
            self.0.lock().unwrap().push((stream, text));
        }
    }

    fn live_group_members(pgid: i32) -> Vec<i32> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let Some(at) = stat.rfind(')') else { continue };
            let fields: Vec<&str> = stat[at + 1..].split_whitespace().collect();
            if fields.first() != Some(&"Z") && fields.get(2) == Some(&pgid.to_string().as_str()) {
                out.push(pid);
            }
        }
        out
    }

    fn sh(script: &str) -> Command {
        let mut command = Command::new("sh");
        command.arg("-c").arg(script);
        command
    }

    #[tokio::test]
    async fn streams_both_outputs_and_reports_the_exit_code() {
        let sink = Collect::default();
        let process = RunningProcess::spawn(sh("echo out; echo err >&2; exit 7"), "sh").unwrap();
        let outcome = process
            .run(sink.clone(), &CancellationToken::new(), None)
            .await
            .unwrap();
        assert_eq!(outcome, Outcome::Exited(7));
        let lines = sink.0.lock().unwrap().clone();
        assert!(lines.contains(&(LogStream::Stdout, "out\n".into())));
        assert!(lines.contains(&(LogStream::Stderr, "err\n".into())));
    }

    #[tokio::test]
    async fn long_lines_are_cut_and_invalid_utf8_survives() {
        let sink = Collect::default();
        let script = format!(
            "head -c {} /dev/zero | tr '\\0' a; printf '\\n\\377tail\\n'",
            MAX_LINE_BYTES * 2 + 10
        );
        let outcome = RunningProcess::spawn(sh(&script), "sh")
            .unwrap()
            .run(sink.clone(), &CancellationToken::new(), None)
            .await
            .unwrap();
        assert_eq!(outcome, Outcome::Exited(0));
        let lines = sink.0.lock().unwrap().clone();
        assert_eq!(
            lines.len(),
            4,
            "{:?}",
            lines.iter().map(|l| l.1.len()).collect::<Vec<_>>()
        );
        assert!(lines.iter().all(|(_, t)| t.len() <= MAX_LINE_BYTES));
        assert_eq!(lines[3].1, "\u{FFFD}tail\n");
    }

    #[test]
    fn incomplete_utf8_at_the_end_is_held_back() {
        assert_eq!(utf8_safe_end(b"abc"), 3);
        assert_eq!(utf8_safe_end("aé".as_bytes()), 3);
        assert_eq!(utf8_safe_end(&"aé".as_bytes()[..2]), 1);
        let euro = "€".as_bytes();
        assert_eq!(utf8_safe_end(&euro[..1]), 0);
        assert_eq!(utf8_safe_end(&euro[..2]), 0);
        assert_eq!(utf8_safe_end(euro), 3);
    }

    #[tokio::test]
    async fn multibyte_characters_survive_the_line_cap() {
        let sink = Collect::default();
        // One line of 'é' (2 bytes each) longer than the cap, starting at an odd offset so a
        // cut at MAX_LINE_BYTES would land inside a character.
        let count = MAX_LINE_BYTES;
        let script = format!(
            "printf 'x'; i=0; s=''; while [ $i -lt {count} ]; do s=\"$s\"é; i=$((i+1)); done; printf '%s\\n' \"$s\""
        );
        let outcome = RunningProcess::spawn(sh(&script), "sh")
            .unwrap()
            .run(sink.clone(), &CancellationToken::new(), None)
            .await
            .unwrap();
        assert_eq!(outcome, Outcome::Exited(0));
        let joined: String = sink
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|(_, t)| t.as_str())
            .collect();
        assert!(!joined.contains('\u{FFFD}'), "a character was cut in half");
        assert_eq!(joined.chars().filter(|c| *c == 'é').count(), count);
    }

    /// A batch's lines and whether it was handed over as clean.
    type Batch = (Vec<String>, bool);

    /// Records each batch as it was handed over.
    #[derive(Clone, Default)]
    struct Batches(Arc<Mutex<Vec<Batch>>>);

    impl LineSink for Batches {
        async fn line(&self, _stream: LogStream, text: String) {
            self.0.lock().unwrap().push((vec![text], false));
        }

        async fn lines(&self, _stream: LogStream, texts: Vec<String>, clean: bool) {
            self.0.lock().unwrap().push((texts, clean));
        }

        fn clean(&self, bytes: &[u8]) -> bool {
            !String::from_utf8_lossy(bytes).contains("bad")
        }
    }

    #[tokio::test]
    async fn a_batch_is_marked_clean_only_when_the_sink_found_nothing_in_any_of_its_lines() {
        let sink = Batches::default();
        let script = "printf 'one\\ntwo\\n'; sleep 0.2; printf 'bad\\nthree\\n'; sleep 0.2; \
                      printf 'four\\nfive bad\\n'; sleep 0.2; printf 'six\\n'";
        RunningProcess::spawn(sh(script), "sh")
            .unwrap()
            .run(sink.clone(), &CancellationToken::new(), None)
            .await
            .unwrap();
        let batches = sink.0.lock().unwrap().clone();
        let lines: Vec<String> = batches
            .iter()
            .flat_map(|(texts, _)| texts.clone())
            .collect();
        assert_eq!(
            lines,
            [
                "one\n",
                "two\n",
                "bad\n",
                "three\n",
                "four\n",
                "five bad\n",
                "six\n"
            ]
        );
        for (texts, clean) in &batches {
            let dirty = texts.iter().any(|text| text.contains("bad"));
            assert_eq!(*clean, !dirty, "{texts:?}");
        }
        assert!(batches.iter().any(|(_, clean)| *clean));
    }

    /// A sink slower than DRAIN_GRACE per line must not lose the tail of the output.
    #[derive(Clone, Default)]
    struct Slow(Arc<Mutex<Vec<String>>>);

    impl LineSink for Slow {
        async fn line(&self, _stream: LogStream, text: String) {
            tokio::time::sleep(DRAIN_GRACE + Duration::from_millis(500)).await;
            self.0.lock().unwrap().push(text);
        }
    }

    #[tokio::test]
    async fn backpressure_after_exit_loses_no_lines() {
        let sink = Slow::default();
        let outcome = RunningProcess::spawn(sh("echo one; echo two; echo three"), "sh")
            .unwrap()
            .run(sink.clone(), &CancellationToken::new(), None)
            .await
            .unwrap();
        assert_eq!(outcome, Outcome::Exited(0));
        assert_eq!(*sink.0.lock().unwrap(), ["one\n", "two\n", "three\n"]);
    }

    #[tokio::test]
    async fn cancel_kills_the_whole_group() {
        let sink = Collect::default();
        let cancel = CancellationToken::new();
        let process = RunningProcess::spawn(sh("sleep 300 & sleep 300; echo never"), "sh").unwrap();
        let pgid = process.pgid;
        let trigger = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            trigger.cancel();
        });
        let started = std::time::Instant::now();
        let outcome = process.run(sink, &cancel, None).await.unwrap();
        assert_eq!(outcome, Outcome::Cancelled);
        assert!(started.elapsed() < Duration::from_secs(5));
        // No live member of the group is left (killed orphans may linger as zombies until
        // init reaps them; they run nothing).
        assert!(
            live_group_members(pgid.as_raw()).is_empty(),
            "process group still alive"
        );
    }

    #[tokio::test]
    async fn timeout_stops_the_process() {
        let outcome = RunningProcess::spawn(sh("sleep 300"), "sh")
            .unwrap()
            .run(
                Collect::default(),
                &CancellationToken::new(),
                Some(Duration::from_millis(200)),
            )
            .await
            .unwrap();
        assert_eq!(outcome, Outcome::TimedOut);
    }

    #[tokio::test]
    async fn a_grandchild_holding_stdout_does_not_hang_the_wait() {
        let started = std::time::Instant::now();
        let outcome = RunningProcess::spawn(sh("(sleep 300) & echo done; exit 0"), "sh")
            .unwrap()
            .run(Collect::default(), &CancellationToken::new(), None)
            .await
            .unwrap();
        assert_eq!(outcome, Outcome::Exited(0));
        assert!(started.elapsed() < DRAIN_GRACE * 3);
    }

    #[tokio::test]
    async fn a_missing_program_is_a_spawn_error_naming_it() {
        let error = RunningProcess::spawn(Command::new("/nonexistent/buildah"), "buildah")
            .err()
            .unwrap();
        assert!(error.to_string().contains("buildah"));
    }
}
