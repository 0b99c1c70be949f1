//! The wire contract between a Stagely core and the agents on its builder VMs.
//!
//! This crate is deliberately pure: it defines the JSON messages of the design seed
//! (`BUILD`, `MERGE`, `LOG`, `STATUS`) plus the frames the design needs around them
//! (`HELLO`, `CANCEL`, `ACK`, `HEARTBEAT`), a codec that turns bytes into typed messages
//! or typed errors, and the core-side session state machine. It performs no I/O and never
//! reads the clock, so every rule here is testable without sockets.
//!
//! # Lifecycle of one connection (the agent<->core contract)
//!
//! 1. The agent dials `GET /api/v1/agent/connect` with `Authorization: Bearer <token>`.
//!    The token names exactly one attempt of one job and is good until that attempt ends;
//!    the core refuses the upgrade (HTTP 401) for a missing, wrong or spent token before any
//!    frame is read.
//! 2. The agent sends [`Hello`] first. Anything else first is a protocol violation.
//! 3. The core answers with exactly one work frame: [`Build`] or [`Merge`].
//! 4. The agent streams output as [`Log`] frames carrying a strictly increasing `seq`
//!    (starting at 1). The core acknowledges persisted lines with [`Ack`] (`seq` = highest
//!    contiguous line stored). A duplicate `seq` (a resend after a reconnect) is dropped by
//!    the core and acknowledged again, so every line is stored exactly once.
//! 5. Either side may send [`Heartbeat`] at any time; the core treats silence longer than
//!    its heartbeat timeout as a lost agent.
//! 6. The core may send [`Cancel`]; the agent stops the build (SIGTERM to the process
//!    group, then SIGKILL after a grace period) and still finishes with a `STATUS`.
//! 7. The agent ends the job with exactly one [`Status`], sent only after every `LOG`
//!    frame of the job. After `STATUS` the core acknowledges it (an `ACK` whose `seq` is the
//!    status frame's `seq`). Then either the core closes the connection, terminates the
//!    instance and the agent exits; or — only if the agent's `HELLO` set
//!    `accepts_more_work` — the core sends another work frame (a `MERGE`: merge on the last
//!    builder) for another job on the same connection, without a new `HELLO`; that job's
//!    frames start again at `seq` 1 and follow steps 4 to 7. An agent waits a bounded time
//!    for more work and exits when it does not come.
//! 8. A connection that drops before the STATUS is acknowledged does not end the job: the
//!    build goes on, the agent keeps its output in a disk spool and dials again (backoff
//!    with jitter, for a grace period) with the same token, which stays valid until the
//!    attempt ends. Its [`Hello`] then names `job_id`, `attempt` and `acked_seq`; the core
//!    answers [`Resume`] with the highest `seq` it has stored, and the agent resends every
//!    frame after it. Frames the core already has are dropped as duplicates, so each line is
//!    stored exactly once. A core that restarted, or another replica, takes the agent back
//!    the same way.
//!
//! Seed fields are never renamed; everything this crate adds is a new, optional field.

pub mod agent_session;
pub mod codec;
pub mod proto;
pub mod session;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use codec::{DecodeError, MAX_FRAME_BYTES, MAX_LOG_DATA_BYTES, decode, encode};
pub use proto::{Codec, SUBPROTOCOL_JSON, SUBPROTOCOL_PROTO, decode_proto, encode_proto};

/// Version of this contract. An agent announces it in `HELLO`; the core refuses others.
pub const PROTOCOL_VERSION: u32 = 1;

/// Every frame that crosses the agent<->core WebSocket, tagged by its `type` field.
// Frames are handled one at a time and never stored in bulk, so the size gap between a BUILD
// and an ACK costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Message {
    /// agent → core, first frame of every connection.
    #[serde(rename = "HELLO")]
    Hello(Hello),
    /// core → agent: build and push one image.
    #[serde(rename = "BUILD")]
    Build(Build),
    /// core → agent: combine per-platform images into one manifest list.
    #[serde(rename = "MERGE")]
    Merge(Merge),
    /// agent → core: one line of builder output.
    #[serde(rename = "LOG")]
    Log(Log),
    /// agent → core: consecutive lines of output in one frame (what the agent sends).
    #[serde(rename = "LOGS")]
    Logs(Logs),
    /// agent → core: the job's outcome; the last frame the agent sends for a job.
    #[serde(rename = "STATUS")]
    Status(Status),
    /// core → agent: stop the job.
    #[serde(rename = "CANCEL")]
    Cancel(Cancel),
    /// core → agent: frames up to `seq` are durably stored.
    #[serde(rename = "ACK")]
    Ack(Ack),
    /// either direction: liveness.
    #[serde(rename = "HEARTBEAT")]
    Heartbeat(Heartbeat),
    /// agent → core: the cloud is about to reclaim this instance (a spot interruption
    /// notice); the core ends the attempt and retries the job elsewhere at once.
    #[serde(rename = "INTERRUPTION")]
    Interruption(Interruption),
    /// core → agent: the answer to a resuming HELLO: the job goes on, and every frame up to
    /// `seq` is stored (the agent resends from `seq + 1`).
    #[serde(rename = "RESUME")]
    Resume(Resume),
}

impl Message {
    /// The wire name of this frame's `type`.
    pub fn type_name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "HELLO",
            Message::Build(_) => "BUILD",
            Message::Merge(_) => "MERGE",
            Message::Log(_) => "LOG",
            Message::Logs(_) => "LOGS",
            Message::Status(_) => "STATUS",
            Message::Cancel(_) => "CANCEL",
            Message::Ack(_) => "ACK",
            Message::Heartbeat(_) => "HEARTBEAT",
            Message::Interruption(_) => "INTERRUPTION",
            Message::Resume(_) => "RESUME",
        }
    }

    /// The job this frame is about, when it names one.
    pub fn job_id(&self) -> Option<&str> {
        match self {
            Message::Hello(hello) => hello.job_id.as_deref(),
            Message::Build(m) => Some(&m.job_id),
            Message::Merge(m) => Some(&m.job_id),
            Message::Log(m) => Some(&m.job_id),
            Message::Logs(m) => Some(&m.job_id),
            Message::Status(m) => Some(&m.job_id),
            Message::Cancel(m) => Some(&m.job_id),
            Message::Ack(m) => Some(&m.job_id),
            Message::Heartbeat(m) => m.job_id.as_deref(),
            Message::Interruption(m) => Some(&m.job_id),
            Message::Resume(m) => Some(&m.job_id),
        }
    }

    /// Every secret this frame carries: the registry password, the clone token and the
    /// secret build arguments of a BUILD or MERGE. Both ends mask them in job output.
    pub fn secrets(&self) -> Vec<&str> {
        let mut secrets = Vec::new();
        let auth = match self {
            Message::Build(build) => {
                secrets.extend(build.context.clone_token.as_deref());
                secrets.extend(build.build_config.secrets.values().map(Secret::expose));
                build.registry_auth.as_ref()
            }
            Message::Merge(merge) => merge.registry_auth.as_ref(),
            _ => None,
        };
        secrets.extend(auth.map(|auth| auth.password.as_str()));
        secrets
    }
}

/// Replaces known secrets in text with `[REDACTED]`: the one masking rule of the agent
/// (before a line is sent) and the core (before it is stored).
///
/// Each secret is searched in every form a build is likely to print it: as given; each line
/// of a multi-line secret (a PEM key prints line by line); base64 (standard and URL-safe, at
/// each of the three byte offsets it can sit at inside a longer encoded string, so
/// `base64(user:password)` is caught too); and URL-encoded. All forms are found in one pass
/// (Aho-Corasick, leftmost-longest).
#[derive(Clone, Default)]
pub struct SecretMask {
    /// Every form of every secret, and the automaton over them (`None`: nothing to mask).
    forms: Vec<String>,
    matcher: Option<aho_corasick::AhoCorasick>,
}

impl SecretMask {
    /// Shortest secret masked: shorter strings are too weak to matter and would mask
    /// ordinary text.
    pub const MIN_SECRET_LEN: usize = 4;
    /// Shortest derived form masked (a line of a multi-line secret, a base64 slice): shorter
    /// ones would mask ordinary text.
    pub const MIN_FORM_LEN: usize = 8;
    /// What replaces a secret.
    pub const MASK: &'static str = "[REDACTED]";

    pub fn new<'a>(secrets: impl IntoIterator<Item = &'a str>) -> SecretMask {
        let mut forms: Vec<String> = Vec::new();
        for secret in secrets {
            if secret.len() < Self::MIN_SECRET_LEN {
                continue;
            }
            forms.push(secret.to_string());
            for form in derived_forms(secret) {
                if form.len() >= Self::MIN_FORM_LEN {
                    forms.push(form);
                }
            }
        }
        forms.sort();
        forms.dedup();
        let matcher = if forms.is_empty() {
            None
        } else {
            aho_corasick::AhoCorasick::builder()
                .match_kind(aho_corasick::MatchKind::LeftmostLongest)
                .build(&forms)
                .ok()
        };
        SecretMask { forms, matcher }
    }

    /// The longest form searched for (0 when there is none): a piece of a line cut at this
    /// many bytes or more from its end cannot hide a complete secret across the cut.
    pub fn longest(&self) -> usize {
        self.forms.iter().map(String::len).max().unwrap_or(0)
    }

    /// Byte ranges of every secret form in `text`, leftmost-longest, not overlapping.
    pub fn find(&self, text: &str) -> Vec<(usize, usize)> {
        match &self.matcher {
            Some(matcher) => matcher
                .find_iter(text)
                .map(|found| (found.start(), found.end()))
                .collect(),
            None => Vec::new(),
        }
    }

    /// Whether `bytes` may hold a secret form. A region of many lines read together is
    /// checked at once: when it holds none, neither does any line in it (a line is a
    /// substring of it), and the lines need no scan of their own (one search over a block
    /// costs far less than one per line). `true` also for a form straddling two lines; the
    /// caller then masks line by line as usual.
    pub fn holds_any(&self, bytes: &[u8]) -> bool {
        self.matcher
            .as_ref()
            .is_some_and(|matcher| matcher.is_match(bytes))
    }

    /// `text` with every secret replaced; returned unchanged (no copy) when it holds none.
    pub fn mask(&self, text: String) -> String {
        let Some(matcher) = &self.matcher else {
            return text;
        };
        if !matcher.is_match(&text) {
            return text;
        }
        let masks = vec![Self::MASK; self.forms.len()];
        matcher.replace_all(&text, &masks)
    }
}

/// Forms a secret takes when a build prints it other than verbatim.
fn derived_forms(secret: &str) -> Vec<String> {
    use base64::Engine as _;
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let mut forms = Vec::new();
    // Line by line: a multi-line secret (a PEM key) reaches the log one line at a time.
    if secret.contains('\n') {
        forms.extend(
            secret
                .lines()
                .map(|line| line.trim_end_matches('\r').to_string()),
        );
    }
    let bytes = secret.as_bytes();
    // Whole, as encoded on its own.
    for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
        forms.push(engine.encode(bytes));
    }
    // Inside a longer encoded string: at byte offset 0, 1 or 2 of a 3-byte group, only the
    // characters fully determined by the secret's own bits are fixed.
    for offset in 0..3usize {
        let mut padded = vec![0u8; offset];
        padded.extend_from_slice(bytes);
        for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
            let encoded = engine.encode(&padded);
            let first = (offset * 8).div_ceil(6);
            let last = ((offset + bytes.len()) * 8) / 6;
            if first < last && last <= encoded.len() {
                forms.push(encoded[first..last].to_string());
            }
        }
    }
    // URL-encoded (query strings, form bodies): every byte but the unreserved ones.
    let encoded: String = percent_encoding::utf8_percent_encode(secret, URL_RESERVED).collect();
    if encoded != secret {
        forms.push(encoded.clone());
        forms.push(encoded.replace("%20", "+"));
        // Lower-case hex digits, as some encoders print them.
        forms.push(lower_percent_hex(&encoded));
    }
    forms
}

/// Everything but RFC 3986's unreserved characters is percent-encoded.
const URL_RESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn lower_percent_hex(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == '%' {
            for _ in 0..2 {
                if let Some(hex) = chars.next() {
                    out.push(hex.to_ascii_lowercase());
                }
            }
        }
    }
    out
}

impl std::fmt::Debug for SecretMask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretMask({} forms)", self.forms.len())
    }
}

/// CPU architecture of a builder or of an image platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Amd64,
    Arm64,
}

impl Arch {
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }

    /// Parses an OCI platform string such as `linux/arm64` or `linux/arm64/v8`.
    pub fn from_platform(platform: &str) -> Option<Arch> {
        let mut parts = platform.split('/');
        let os = parts.next()?;
        let arch = parts.next()?;
        if os != "linux" {
            return None;
        }
        match arch {
            "amd64" | "x86_64" => Some(Arch::Amd64),
            "arm64" | "aarch64" => Some(Arch::Arm64),
            _ => None,
        }
    }

    /// Maps Rust's `std::env::consts::ARCH` names.
    pub fn from_rust_arch(arch: &str) -> Option<Arch> {
        match arch {
            "x86_64" => Some(Arch::Amd64),
            "aarch64" => Some(Arch::Arm64),
            _ => None,
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Builder backends an agent may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BuilderKind {
    /// `docker buildx` — the production default, exactly the seed's commands.
    Buildx,
    /// `buildah` — daemonless; what runs where no Docker engine exists.
    Buildah,
}

impl BuilderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BuilderKind::Buildx => "buildx",
            BuilderKind::Buildah => "buildah",
        }
    }
}

/// `HELLO`: the agent introduces itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u32,
    pub agent_version: String,
    /// The cloud instance id the agent runs on (from its config / metadata).
    pub instance_id: String,
    /// The host's native architecture.
    pub arch: Arch,
    /// Builder backends installed, in order of preference.
    pub builders: Vec<BuilderKind>,
    /// Architectures the host can build for by user emulation (QEMU binfmt_misc).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub emulated_arches: Vec<Arch>,
    /// Addition: after a job's STATUS is acknowledged, the agent takes another work frame on
    /// the same connection (see the lifecycle, step 7).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub accepts_more_work: bool,
    /// Addition, set when the agent reconnects mid-job (see the lifecycle, step 8): the job
    /// it is running...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// ...the attempt its work frame named...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// ...and the highest `seq` the core acknowledged before the connection dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acked_seq: Option<u64>,
}

impl Hello {
    /// Whether this HELLO resumes a job already handed to the agent.
    pub fn is_resume(&self) -> bool {
        self.job_id.is_some()
    }
}

/// A secret value on the wire (a secret build argument): serialized as the plain string, but
/// never shown by `Debug`, so it cannot reach a log line through `{:?}`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Where the source comes from (`BUILD.context`).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceContext {
    /// A git URL or, for local instances, a filesystem path.
    pub repo_url: String,
    pub commit_hash: String,
    pub branch: String,
    /// Token for cloning private repositories. Secret: never logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_token: Option<String>,
}

impl std::fmt::Debug for SourceContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceContext")
            .field("repo_url", &self.repo_url)
            .field("commit_hash", &self.commit_hash)
            .field("branch", &self.branch)
            .field(
                "clone_token",
                &self.clone_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// How to build (`BUILD.build_config`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildConfig {
    /// Build context, relative to the repository root.
    pub context_path: String,
    /// Dockerfile, relative to the context.
    pub dockerfile: String,
    pub target_image: String,
    pub platform: String,
    #[serde(default)]
    pub build_args: BTreeMap<String, String>,
    #[serde(default)]
    pub cache_from: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_to: Option<String>,
    /// Addition: the job's time limit; the agent kills the build when it is exceeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
    /// Addition: secret build arguments (`secret_build_args` in stagely.yaml), name → value.
    /// The agent hands them to the builder as build secrets (`--secret id=NAME,src=FILE`,
    /// read in the Dockerfile with `RUN --mount=type=secret,id=NAME`), never as `--build-arg`:
    /// they reach no command line, no environment, no image layer and no log line.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, Secret>,
}

/// Registry credentials (`registry_auth`). Secret: never logged, never on a command line.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistryAuth {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryAuth")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Addition: how to reach the registry images are pushed to.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RegistryOptions {
    /// Plain HTTP (or unverified TLS). Only for registries on loopback or a private network.
    #[serde(default)]
    pub insecure: bool,
}

/// `BUILD`: build one image and push it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Build {
    pub job_id: String,
    pub context: SourceContext,
    pub build_config: BuildConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_auth: Option<RegistryAuth>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub registry: RegistryOptions,
    /// Addition: which attempt of the job this is; a reconnecting agent names it in HELLO.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
}

/// `MERGE`: make one manifest list from per-platform images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Merge {
    pub job_id: String,
    pub source_images: Vec<String>,
    pub target_image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_auth: Option<RegistryAuth>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub registry: RegistryOptions,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
    /// Addition: which attempt of the job this is; a reconnecting agent names it in HELLO.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
}

/// Which output a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    Stdout,
    Stderr,
    /// Lines the agent itself writes (steps, emulation notes, errors before the build).
    System,
}

impl LogStream {
    pub fn as_str(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
            LogStream::System => "system",
        }
    }

    pub fn parse(text: &str) -> Option<LogStream> {
        match text {
            "stdout" => Some(LogStream::Stdout),
            "stderr" => Some(LogStream::Stderr),
            "system" => Some(LogStream::System),
            _ => None,
        }
    }
}

/// `LOG`: one line of output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Log {
    pub job_id: String,
    pub stream: LogStream,
    /// The line, including its trailing newline when it had one.
    pub data: String,
    /// Addition: position of this frame in the job's stream, from 1, no gaps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// Addition: see [`LogLine::continued`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub continued: bool,
}

/// Addition — `LOGS`: consecutive pieces of output in one frame; line `i` (from 0) has seq
/// `seq + i`. The agent sends whatever it has spooled and not yet sent once the socket is
/// free, at most [`MAX_LINES_PER_FRAME`] lines and [`MAX_FRAME_DATA_BYTES`] bytes of data
/// per frame, so a quiet build's line goes out at once and a chatty one's in large frames.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Logs {
    pub job_id: String,
    /// The first line's position in the job's stream.
    pub seq: u64,
    pub lines: Vec<LogLine>,
}

/// One line of a [`Logs`] frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    pub stream: LogStream,
    /// The line, including its trailing newline when it had one.
    pub data: String,
    /// The line goes on in the next piece of the same stream: the agent cut it (longer than
    /// [`MAX_LOG_DATA_BYTES`], or read in parts). Out of band, so nothing a build prints can
    /// pass for a cut.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub continued: bool,
}

/// Most lines one `LOGS` frame may carry.
pub const MAX_LINES_PER_FRAME: usize = 4096;

/// Most bytes of line data an agent puts in one `LOGS` frame (escaping can grow it; the frame
/// itself stays under [`MAX_FRAME_BYTES`]).
pub const MAX_FRAME_DATA_BYTES: usize = 256 * 1024;

/// Final state reported in `STATUS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Completed,
    Failed,
}

/// Why a job that failed never ran its builder (no exit code exists).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NeverRan {
    /// Clone or checkout failed.
    SourceUnavailable,
    /// The host cannot build for the platform (no builder, no emulation).
    UnsupportedPlatform,
    /// No usable builder backend.
    NoBuilder,
    /// Cancelled before the builder started.
    Cancelled,
    /// The agent itself failed (disk, spawn error...).
    AgentError,
}

/// `STATUS`: the outcome of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub job_id: String,
    pub state: JobState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_url: Option<String>,
    /// Addition: the pushed manifest's digest (`sha256:...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Addition: a one-line reason when `state` is `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Addition: set when the builder never started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub never_ran: Option<NeverRan>,
    /// Addition: the frame's position after the job's last `LOG` (`last log seq + 1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

/// `CANCEL`: stop the job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cancel {
    pub job_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `ACK`: every frame of the job up to and including `seq` is stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    pub job_id: String,
    pub seq: u64,
}

/// `RESUME`: the core took a reconnecting agent back; frames up to `seq` are stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resume {
    pub job_id: String,
    pub seq: u64,
}

/// [`Interruption::action`] when the instance's own shutdown stops the agent mid-job.
pub const SHUTDOWN_ACTION: &str = "shutdown";

/// `HEARTBEAT`: liveness, either direction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
}

/// A notice that the instance will be reclaimed (EC2's `spot/instance-action`), or, with
/// action [`SHUTDOWN_ACTION`], that the instance itself is stopping the agent (SIGTERM: the
/// machine shuts down) while its job runs and no CANCEL came: the job is stopped from
/// outside, not by its build, and belongs on another instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interruption {
    pub job_id: String,
    /// What the cloud will do: `terminate`, `stop` or `hibernate`; or [`SHUTDOWN_ACTION`].
    pub action: String,
    /// When, as the cloud said it (RFC 3339), if it said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
}

/// The only environment variables a child process (an agent started by the local provider,
/// git, a builder) inherits from its parent: what a program needs to find its tools, its
/// locale, its temporary directory, TLS roots, an operator's proxy and builder daemon.
/// Everything else (the core's `STAGELY_REGISTRY_PASSWORD`, API tokens, cloud credentials) is
/// dropped; a child gets a secret only through a 0600 file named on purpose, never by
/// inheritance.
pub const INHERITED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "TZ",
    "TMPDIR",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    // Where an operator's builder lives on a golden image (not secrets: sockets and paths).
    "DOCKER_HOST",
    "DOCKER_CONTEXT",
    "BUILDX_BUILDER",
    "XDG_RUNTIME_DIR",
    "CONTAINERS_CONF",
    "CONTAINERS_STORAGE_CONF",
    "CONTAINERS_REGISTRIES_CONF",
];

/// The [`INHERITED_ENV`] variables that are set, looked up with `lookup` (`std::env::var_os`
/// in a process): what to give a child after clearing its environment.
pub fn inherited_env<F>(lookup: F) -> impl Iterator<Item = (&'static str, std::ffi::OsString)>
where
    F: Fn(&'static str) -> Option<std::ffi::OsString>,
{
    INHERITED_ENV
        .iter()
        .filter_map(move |name| lookup(name).map(|value| (*name, value)))
}

/// The value of `GIT_ALLOW_PROTOCOL` for every git the core or an agent runs: https, ssh
/// and git only, plus `file` (local paths) when the operator allows local repositories.
/// Transports such as `ext::` (runs a command) or `fd::` are refused by git itself.
pub fn git_allowed_protocols(allow_local_repos: bool) -> &'static str {
    if allow_local_repos {
        "https:ssh:git:file"
    } else {
        "https:ssh:git"
    }
}

/// How a `clone_token` is presented to git, for the core (reading `stagely.yaml`) and the
/// agent (fetching the source) alike: an HTTP Basic header (`x-access-token:<token>`) in a git
/// configuration file. The caller writes the returned text to a file of mode 0600 and points
/// git at it with `GIT_CONFIG_GLOBAL`, so the token is never in a URL, on a command line or
/// in git's environment (only the file's path is).
pub fn git_auth_config(clone_token: &str) -> String {
    use base64::Engine;
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{clone_token}"));
    format!("[http]\n\textraHeader = Authorization: Basic {basic}\n")
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}
