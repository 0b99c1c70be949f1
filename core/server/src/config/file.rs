//! The configuration file as written (`stagely.toml`): every table and key, all optional,
//! parsed strictly (unknown keys are errors). [`super::CoreConfig::resolve`] turns it into the
//! settings the core runs with.

use super::*;

/// `stagely.toml`. Every field is optional; unknown fields are refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    /// URL agents dial back to (default: `http://<listen address>`).
    pub public_url: Option<String>,
    /// Tag value marking this core's instances (default `stagely`). Replicas sharing one
    /// database need distinct ids: a core taking over jobs of an earlier incarnation of its
    /// own id does so at once, without waiting for their leases.
    pub core_id: Option<String>,
    /// PostgreSQL URL (`postgres://user:password@host:port/database`) for production and
    /// replicas; default: SQLite at `<data_dir>/stagely.db`. Also `STAGELY_DATABASE_URL`.
    pub database_url: Option<String>,
    /// Accept local paths and `file://` URLs as `repo_url` (default false; `stagely run`
    /// turns it on for its own embedded core). Off, git may only use https, ssh and git.
    pub allow_local_repos: Option<bool>,
    #[serde(default)]
    pub api: ApiFile,
    #[serde(default)]
    pub registry: RegistryFile,
    #[serde(default)]
    pub provider: ProviderFile,
    #[serde(default)]
    pub scheduler: SchedulerFile,
    #[serde(default)]
    pub tls: TlsFile,
    /// Price per hour of instance types, for the cost estimates of runs: type →
    /// `{ on_demand, spot }` in USD. Merged over the defaults (the design's types at AWS
    /// us-east-1 on-demand prices).
    #[serde(default)]
    pub prices: BTreeMap<String, PriceFile>,
    /// Values of secret build arguments (`secret_build_args`) the core supplies when a
    /// submission does not: name → value.
    #[serde(default)]
    pub secrets: BTreeMap<String, String>,
}

/// `[prices."<instance type>"]`: USD per hour.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceFile {
    pub on_demand: f64,
    /// Default: the on-demand price (estimates are then an upper bound).
    pub spot: Option<f64>,
}

/// `[tls]`: how the core's HTTP server (API and agent endpoint) is secured.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    /// PEM certificate chain (leaf first) the core serves; with `key_file`, the core speaks
    /// HTTPS itself. Both files are read again on SIGHUP.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`'s leaf.
    pub key_file: Option<PathBuf>,
    /// PEM CA certificate(s) agents should trust for the core (a private CA); delivered to
    /// every builder in its user-data. Default: none (the core's certificate is from a public
    /// CA the image trusts).
    pub agent_ca_file: Option<PathBuf>,
    /// Plain HTTP off loopback because an operator's proxy in front terminates TLS
    /// (`public_url` is then the proxy's `https://` address). Default false.
    pub behind_proxy: Option<bool>,
}

/// `[api]`: who may call the HTTP API.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiFile {
    /// Token name → SHA-256 of the token, 64 hex digits (`stagely token hash` prints one).
    /// The tokens themselves are never written here.
    #[serde(default)]
    pub tokens: BTreeMap<String, TokenEntry>,
    /// Longest wait for a request's headers, and for the next request on an idle keep-alive
    /// connection (default 10). Slow or silent clients are disconnected.
    pub header_read_timeout_secs: Option<u64>,
    /// Longest wait for a request body (default 30).
    pub body_read_timeout_secs: Option<u64>,
    /// API requests in flight at once, SSE streams included (default 1024); as many
    /// connections again may wait for a request (new or kept alive), the oldest evicted first.
    /// More requests get `503`. Agents have their own share (`max_agent_connections`).
    pub max_connections: Option<usize>,
    /// Per source address: API requests in flight, and connections waiting for a request
    /// (default 256). Over it the address's own oldest waiting connection is cut, and a
    /// request gets `429`. Agents are not counted.
    pub max_connections_per_ip: Option<usize>,
    /// Agent WebSocket connections at once (default 1024), a share API traffic cannot take.
    pub max_agent_connections: Option<usize>,
    /// Longest life of an API connection (default 3600): then it is closed after its request
    /// in flight (SSE streams end; clients resume with `Last-Event-ID`). Agents are exempt.
    pub max_connection_secs: Option<u64>,
    /// Requests without a valid token (answered `401`, `404`, ...) per source address and
    /// second (default 20, bursts of 100); over it `429`. `/healthz` and agents are exempt.
    pub unauthenticated_requests_per_ip_per_sec: Option<u32>,
    /// Server-Sent Events streams open at once (default 512), and per API token (default 64);
    /// over either `429`.
    pub max_sse_streams: Option<usize>,
    pub max_sse_streams_per_token: Option<usize>,
    /// Submissions reading `stagely.yaml` from git at once (default 4); more get `503` with
    /// `Retry-After`.
    pub max_concurrent_git_reads: Option<usize>,
    /// Longest time for reading `stagely.yaml` from git, all steps together (default 30).
    pub git_read_timeout_secs: Option<u64>,
}

/// One `[api.tokens]` entry: `name = "<sha256>"` (role `admin`), or
/// `name = { sha256 = "<sha256>", role = "read" | "operate" | "admin" }`.
#[derive(Debug, Clone)]
pub enum TokenEntry {
    Hash(String),
    Scoped(ScopedToken),
}

impl<'de> Deserialize<'de> for TokenEntry {
    // By hand rather than `untagged`, whose one error ("did not match any variant") would
    // hide which key or role is wrong.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entry;
        impl<'de> serde::de::Visitor<'de> for Entry {
            type Value = TokenEntry;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a token's SHA-256 in hex, or { sha256 = \"...\", role = \"read\" | \"operate\" | \"admin\" }")
            }

            fn visit_str<E: serde::de::Error>(self, hash: &str) -> Result<TokenEntry, E> {
                Ok(TokenEntry::Hash(hash.to_string()))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<TokenEntry, A::Error> {
                ScopedToken::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(TokenEntry::Scoped)
            }
        }
        deserializer.deserialize_any(Entry)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopedToken {
    pub sha256: String,
    pub role: Role,
}

impl From<String> for TokenEntry {
    fn from(hash: String) -> TokenEntry {
        TokenEntry::Hash(hash)
    }
}

/// What an API token may do. Each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// `GET` routes only: runs, jobs, logs, the queue.
    Read,
    /// Also submit, cancel and rebuild.
    Operate,
    /// Everything.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Operate => "operate",
            Role::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryFile {
    pub host: Option<String>,
    pub insecure: Option<bool>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub namespace: Option<String>,
    pub cache: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderFile {
    pub kind: Option<String>,
    pub agent_binary: Option<PathBuf>,
    pub ec2: Option<Ec2File>,
    pub local: Option<LocalFile>,
}

/// `[provider.local]`: what bounds each local instance, as a VM's size would (enforced by
/// the kernel where the host allows: root, a pids cgroup, loop devices). 0 turns one off.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalFile {
    /// Most processes and threads in one instance (default 2048): a pids cgroup.
    pub max_pids: Option<u32>,
    /// Size of one instance's work directory in MiB (default 20480): a loop-mounted ext4
    /// file system; past it the job fails saying the disk is full.
    pub max_disk_mib: Option<u64>,
}

/// `[provider.ec2]`: how the `ec2` provider launches builders.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ec2File {
    pub region: Option<String>,
    pub ami_amd64: Option<String>,
    pub ami_arm64: Option<String>,
    pub subnet_id: Option<String>,
    pub security_group_ids: Option<Vec<String>>,
    pub instance_profile: Option<String>,
    pub spot: Option<bool>,
    /// Run arm64 jobs on amd64 under QEMU when no arm64 AMI is set.
    pub allow_emulation: Option<bool>,
    /// Instance metadata service builders poll for spot interruption notices (default
    /// `http://169.254.169.254`).
    pub metadata_url: Option<String>,
    /// How long a builder keeps dialling an unreachable core before it powers off (default
    /// 600).
    pub core_unreachable_secs: Option<u64>,
    /// Per machine class (`small`, `medium`, `large`): instance types and spot.
    #[serde(default)]
    pub classes: BTreeMap<String, Ec2ClassFile>,
}

/// `[provider.ec2.classes.<size>]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ec2ClassFile {
    pub amd64: Option<String>,
    pub arm64: Option<String>,
    pub spot: Option<bool>,
}

// Resolved once at start and held in one place: the size gap costs nothing.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerFile {
    pub max_concurrent_jobs: Option<usize>,
    pub agent_connect_timeout_secs: Option<u64>,
    pub heartbeat_timeout_secs: Option<u64>,
    /// Most log bytes stored per job (default 100 MiB); later output is dropped with a marker
    /// line and the build goes on.
    pub max_log_bytes_per_job: Option<u64>,
    /// Most live instances per environment (default 20); more jobs wait `queued`.
    pub max_live_per_environment: Option<usize>,
    /// Infrastructure retries per job (default 2).
    pub max_retries: Option<u32>,
    /// Wait before the first retry, doubled for each further one (default 5).
    pub retry_backoff_secs: Option<u64>,
    /// How long a core's claim on a job holds without renewal (default 30).
    pub lease_secs: Option<u64>,
    /// SIGTERM-to-SIGKILL grace a cancelled build gets (default 10).
    pub cancel_grace_secs: Option<u64>,
    /// How long a running build goes on after its agent's connection dropped (or its core
    /// stopped) while the agent dials again; past it the attempt is lost and retried
    /// (default 120; 0: a dropped connection ends the attempt at once).
    pub agent_reconnect_grace_secs: Option<u64>,
    /// How often the core re-reads unfinished runs (other replicas' changes; default 1000).
    pub sync_interval_ms: Option<u64>,
    /// How often leftover instances are looked for and terminated (default 60).
    pub reap_interval_secs: Option<u64>,
    /// Logs of runs that finished more than this many days ago are deleted (default 30;
    /// 0 keeps them forever).
    pub log_retention_days: Option<u64>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        toml::from_str(&text).map_err(|error| ConfigError::Parse {
            path: path.display().to_string(),
            detail: toml_error_without_source(&error, &text),
        })
    }
}

/// A TOML error as `line L, column C: message`, without the quoted source line, which
/// may hold a password.
pub fn toml_error_without_source(error: &toml::de::Error, text: &str) -> String {
    match error.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |at| at + 1) + 1;
            format!("line {line}, column {column}: {}", error.message())
        }
        None => error.message().to_string(),
    }
}
