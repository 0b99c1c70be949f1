//! The core's configuration: `stagely.toml`, environment and flags, resolved in that order of
//! increasing precedence (flag > environment > file > default).
//!
//! Registry credentials come from the file or the environment (`STAGELY_REGISTRY_USERNAME`,
//! `STAGELY_REGISTRY_PASSWORD`), never from flags, so they never appear in a process list.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use stagely_protocol::RegistryAuth;

mod file;

pub use file::*;

/// Agents send a heartbeat every 10 s; the core waits at least this long.
pub const MIN_HEARTBEAT_TIMEOUT_SECS: u64 = 30;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {detail}")]
    Parse { path: String, detail: String },
    #[error("{field}: {problem}")]
    Invalid {
        field: &'static str,
        problem: String,
    },
}

#[allow(clippy::large_enum_variant)]
/// Which provider the core boots builders with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderConfig {
    /// Processes on this machine (`stagely-agent` per instance), each bounded so.
    Local(stagely_provisioning::local::LocalLimits),
    /// Amazon EC2.
    Ec2(stagely_provisioning::ec2::Ec2Settings),
}

fn ec2_settings(file: Ec2File) -> Result<stagely_provisioning::ec2::Ec2Settings, ConfigError> {
    use stagely_provisioning::MachineSize;
    use stagely_provisioning::ec2::{ClassSettings, Ec2Settings};
    let present = |value: Option<String>| value.filter(|v| !v.trim().is_empty());
    let ami_amd64 = present(file.ami_amd64);
    let ami_arm64 = present(file.ami_arm64);
    if ami_amd64.is_none() && ami_arm64.is_none() {
        return Err(ConfigError::Invalid {
            field: "provider.ec2.ami_amd64",
            problem: "the ec2 provider needs an AMI: set ami_amd64 and/or ami_arm64 (built with provisioning/packer/stagely-agent.pkr.hcl)".into(),
        });
    }
    let mut classes = BTreeMap::new();
    for (name, class) in file.classes {
        let Some(size) = MachineSize::parse(&name) else {
            return Err(ConfigError::Invalid {
                field: "provider.ec2.classes",
                problem: format!("`{name}` is not a machine class (small, medium, large)"),
            });
        };
        classes.insert(
            size,
            ClassSettings {
                amd64: present(class.amd64),
                arm64: present(class.arm64),
                spot: class.spot,
            },
        );
    }
    Ok(Ec2Settings {
        region: present(file.region),
        ami_amd64,
        ami_arm64,
        subnet_id: present(file.subnet_id),
        security_group_ids: file.security_group_ids.unwrap_or_default(),
        instance_profile: present(file.instance_profile),
        spot: file.spot.unwrap_or(false),
        allow_emulation: file.allow_emulation.unwrap_or(false),
        classes,
        metadata_url: present(file.metadata_url),
        core_unreachable_secs: match file.core_unreachable_secs {
            Some(0) => {
                return Err(ConfigError::Invalid {
                    field: "provider.ec2.core_unreachable_secs",
                    problem: "must be at least 1".into(),
                });
            }
            other => other,
        },
    })
}

/// Where images go and how to log in.
#[derive(Clone)]
pub struct RegistryConfig {
    /// `host[:port]`.
    pub host: String,
    /// Plain HTTP; defaults to true only for loopback hosts.
    pub insecure: bool,
    pub auth: Option<RegistryAuth>,
    /// First path component of every image (`<host>/<namespace>/<environment>:<job>`).
    pub namespace: String,
    /// Use the registry as a layer cache (`cache_from`/`cache_to`).
    pub cache: bool,
}

impl std::fmt::Debug for RegistryConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryConfig")
            .field("host", &self.host)
            .field("insecure", &self.insecure)
            .field("auth", &self.auth)
            .field("namespace", &self.namespace)
            .field("cache", &self.cache)
            .finish()
    }
}

/// One API token the core accepts: a name for logs, and only the SHA-256 of the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken {
    pub name: String,
    pub sha256: [u8; 32],
    pub role: Role,
}

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Even the hash stays out of logs: it is what an offline guess would be checked against.
        f.debug_struct("ApiToken")
            .field("name", &self.name)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

impl ApiToken {
    /// The token named `name` whose secret is `token`.
    pub fn from_secret(name: &str, token: &str) -> ApiToken {
        ApiToken {
            name: name.to_string(),
            sha256: hash_token(token),
            role: Role::Admin,
        }
    }
}

/// SHA-256 of an API token, as stored in `[api.tokens]` (hex) and compared at every request.
pub fn hash_token(token: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes()).into()
}

/// Shortest API token accepted from `STAGELY_API_TOKEN` (a guessable token is no token).
pub const MIN_API_TOKEN_LEN: usize = 16;

/// A PostgreSQL URL; `Debug` hides its password.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(pub String);

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match url_password_span(&self.0) {
            Some((start, end)) => write!(f, "{}***{}", &self.0[..start], &self.0[end..]),
            None => f.write_str(&self.0),
        }
    }
}

/// Byte range of the password in `scheme://user:password@host...`, if there is one.
pub fn url_password_span(url: &str) -> Option<(usize, usize)> {
    let after_scheme = url.find("://")? + 3;
    let rest = &url[after_scheme..];
    let at = rest.find('@')?;
    let colon = rest[..at].find(':')?;
    Some((after_scheme + colon + 1, after_scheme + at))
}

/// Fully resolved configuration.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub public_url: Option<String>,
    pub core_id: String,
    /// PostgreSQL; `None`: SQLite in `data_dir`.
    pub database_url: Option<DatabaseUrl>,
    pub registry: RegistryConfig,
    /// `stagely-agent` for the local provider (default: next to the running executable).
    pub agent_binary: Option<PathBuf>,
    pub provider: ProviderConfig,
    pub max_concurrent_jobs: usize,
    pub agent_connect_timeout: Duration,
    pub heartbeat_timeout: Duration,
    /// Local paths and `file://` repositories are accepted.
    pub allow_local_repos: bool,
    /// Tokens accepted on `/api/v1` (every route but the agent endpoint). Empty: the API is
    /// open, which `serve` allows only on a loopback address.
    pub api_tokens: Vec<ApiToken>,
    pub limits: ApiLimits,
    pub max_log_bytes_per_job: u64,
    /// `[secrets]`: values of secret build arguments (never shown by `Debug`).
    pub build_secrets: BTreeMap<String, stagely_protocol::Secret>,
    pub max_live_per_environment: usize,
    pub max_retries: u32,
    pub retry_backoff: Duration,
    pub lease: Duration,
    pub cancel_grace: Duration,
    /// `[scheduler] agent_reconnect_grace_secs`.
    pub agent_reconnect_grace: Duration,
    pub sync_interval: Duration,
    pub reap_interval: Duration,
    /// Logs of runs finished longer ago are deleted; `None`: kept.
    pub log_retention: Option<Duration>,
    pub tls: TlsConfig,
    pub prices: crate::cost::PriceTable,
}

/// `[tls]` resolved.
#[derive(Debug, Clone, Default)]
pub struct TlsConfig {
    /// The core serves HTTPS with these files; `None`: plain HTTP (loopback, or behind a proxy).
    pub serve: Option<crate::tls::TlsFiles>,
    /// PEM text of the CA agents are told to trust (read from `agent_ca_file`).
    pub agent_ca_pem: Option<String>,
    pub behind_proxy: bool,
}

/// Bounds on what API callers can make the core do at once.
#[derive(Debug, Clone)]
pub struct ApiLimits {
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub max_agent_connections: usize,
    pub max_connection_lifetime: Duration,
    pub unauthenticated_requests_per_ip_per_sec: u32,
    pub max_sse_streams: usize,
    pub max_sse_streams_per_token: usize,
    pub max_concurrent_git_reads: usize,
    pub git_read_timeout: Duration,
}

/// Values given on the command line (or by `stagely run`); they win over everything else.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub registry: Option<String>,
    pub public_url: Option<String>,
    pub allow_local_repos: Option<bool>,
    /// An extra accepted API token (`stagely run` mints one for its embedded core).
    pub api_token: Option<ApiToken>,
    /// `--database-url` (never with a password: a command line is public).
    pub database_url: Option<String>,
}

/// True for `127.x.x.x`, `localhost` and `[::1]` hosts (with or without port).
pub fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(name, _)| name)
    };
    name == "localhost"
        || name == "::1"
        || name
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl CoreConfig {
    /// Resolves flag > environment > file > default, with this process's environment.
    pub fn resolve(file: FileConfig, overrides: Overrides) -> Result<CoreConfig, ConfigError> {
        CoreConfig::resolve_in(file, overrides, Environment::from_process())
    }

    /// Resolves flag > environment (`env`) > file > default.
    pub fn resolve_in(
        mut file: FileConfig,
        overrides: Overrides,
        env: Environment,
    ) -> Result<CoreConfig, ConfigError> {
        let listen_text = overrides
            .listen
            .or(file.listen)
            .unwrap_or_else(|| "127.0.0.1:8080".into());
        let listen: SocketAddr = listen_text.parse().map_err(|_| ConfigError::Invalid {
            field: "listen",
            problem: format!("`{listen_text}` is not an address like 127.0.0.1:8080"),
        })?;
        let data_dir = overrides
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from("./stagely-data"));
        let host = overrides
            .registry
            .or(file.registry.host.clone())
            .unwrap_or_else(|| "127.0.0.1:5000".into());
        if host.is_empty() || host.contains('/') || host.contains(char::is_whitespace) {
            return Err(ConfigError::Invalid {
                field: "registry",
                problem: format!("`{host}` is not HOST[:PORT]"),
            });
        }
        let auth = resolve_registry_auth(&file.registry, &env)?;
        let namespace = file.registry.namespace.unwrap_or_else(|| "stagely".into());
        if !valid_repo_component(&namespace) {
            return Err(ConfigError::Invalid {
                field: "registry.namespace",
                problem: format!("`{namespace}` must be lowercase letters, digits, `.`, `_`, `-`"),
            });
        }
        let insecure = file
            .registry
            .insecure
            .unwrap_or_else(|| is_loopback_host(&host));
        let provider = resolve_provider(&mut file.provider)?;
        let max_concurrent_jobs = file.scheduler.max_concurrent_jobs.unwrap_or(50);
        if max_concurrent_jobs == 0 {
            return Err(ConfigError::Invalid {
                field: "scheduler.max_concurrent_jobs",
                problem: "must be at least 1".into(),
            });
        }
        let heartbeat_timeout = file.scheduler.heartbeat_timeout_secs.unwrap_or(60);
        if heartbeat_timeout < MIN_HEARTBEAT_TIMEOUT_SECS {
            return Err(ConfigError::Invalid {
                field: "scheduler.heartbeat_timeout_secs",
                problem: format!(
                    "{heartbeat_timeout} is too short: agents send a heartbeat every 10s; use at least {MIN_HEARTBEAT_TIMEOUT_SECS}"
                ),
            });
        }
        let agent_connect_timeout = file.scheduler.agent_connect_timeout_secs.unwrap_or(300);
        if agent_connect_timeout == 0 {
            return Err(ConfigError::Invalid {
                field: "scheduler.agent_connect_timeout_secs",
                problem: "must be at least 1 (instances need time to boot)".into(),
            });
        }
        let positive = |value: Option<u64>, default: u64, field: &'static str| {
            let value = value.unwrap_or(default);
            if value == 0 {
                return Err(ConfigError::Invalid {
                    field,
                    problem: "must be at least 1".into(),
                });
            }
            Ok(value)
        };
        let scheduler = &file.scheduler;
        let max_live_per_environment = positive(
            scheduler.max_live_per_environment.map(|v| v as u64),
            20,
            "scheduler.max_live_per_environment",
        )? as usize;
        let retry_backoff = positive(
            scheduler.retry_backoff_secs,
            5,
            "scheduler.retry_backoff_secs",
        )?;
        let lease = positive(scheduler.lease_secs, 30, "scheduler.lease_secs")?;
        let cancel_grace = positive(
            scheduler.cancel_grace_secs,
            10,
            "scheduler.cancel_grace_secs",
        )?;
        let sync_interval = positive(
            scheduler.sync_interval_ms,
            1000,
            "scheduler.sync_interval_ms",
        )?;
        let reap_interval = positive(
            scheduler.reap_interval_secs,
            60,
            "scheduler.reap_interval_secs",
        )?;
        let log_retention = match scheduler.log_retention_days.unwrap_or(30) {
            0 => None,
            days => Some(Duration::from_secs(days.saturating_mul(24 * 3600))),
        };
        let max_retries = scheduler.max_retries.unwrap_or(2);
        let database_url = resolve_database_url(
            overrides.database_url.clone(),
            &env,
            file.database_url.clone(),
        )?;
        let api_tokens = resolve_api_tokens(&file.api, &env, overrides.api_token, &listen)?;
        let tls = resolve_tls(std::mem::take(&mut file.tls), &listen)?;
        let public_url = overrides.public_url.or(file.public_url);
        if let Some(url) = &public_url {
            check_public_url(url, &provider)?;
        } else if matches!(provider, ProviderConfig::Ec2(_)) {
            return Err(ConfigError::Invalid {
                field: "public_url",
                problem: "is required with provider.kind = \"ec2\": the https:// address builders on EC2 dial (the listen address is not reachable from them)".into(),
            });
        }
        let prices = resolve_prices(std::mem::take(&mut file.prices))?;
        let limits = resolve_limits(&file.api)?;
        let positive = at_least_one;
        let max_log_bytes_per_job = positive(
            "scheduler.max_log_bytes_per_job",
            file.scheduler
                .max_log_bytes_per_job
                .unwrap_or(100 * 1024 * 1024),
        )?;
        let build_secrets = resolve_secrets(file.secrets)?;
        Ok(CoreConfig {
            listen,
            data_dir,
            public_url,
            core_id: file.core_id.unwrap_or_else(|| "stagely".into()),
            database_url: database_url.map(DatabaseUrl),
            registry: RegistryConfig {
                host,
                insecure,
                auth,
                namespace,
                cache: file.registry.cache.unwrap_or(true),
            },
            agent_binary: file.provider.agent_binary,
            provider,
            max_concurrent_jobs,
            agent_connect_timeout: Duration::from_secs(agent_connect_timeout),
            heartbeat_timeout: Duration::from_secs(heartbeat_timeout),
            allow_local_repos: overrides
                .allow_local_repos
                .or(file.allow_local_repos)
                .unwrap_or(false),
            api_tokens,
            limits,
            max_log_bytes_per_job,
            build_secrets,
            max_live_per_environment,
            max_retries,
            retry_backoff: Duration::from_secs(retry_backoff),
            lease: Duration::from_secs(lease),
            cancel_grace: Duration::from_secs(cancel_grace),
            agent_reconnect_grace: Duration::from_secs(
                scheduler.agent_reconnect_grace_secs.unwrap_or(120),
            ),
            sync_interval: Duration::from_millis(sync_interval),
            reap_interval: Duration::from_secs(reap_interval),
            log_retention,
            tls,
            prices,
        })
    }
}

/// The environment variables the core reads, read once ([`Environment::from_process`]) so
/// that resolving a configuration is a function of its inputs.
#[derive(Debug, Default, Clone)]
pub struct Environment {
    /// `STAGELY_REGISTRY_USERNAME`
    pub registry_username: Option<String>,
    /// `STAGELY_REGISTRY_PASSWORD`
    pub registry_password: Option<String>,
    /// `STAGELY_DATABASE_URL`
    pub database_url: Option<String>,
    /// `STAGELY_API_TOKEN`
    pub api_token: Option<String>,
}

impl Environment {
    /// This process's environment (empty values count as unset).
    pub fn from_process() -> Environment {
        Environment {
            registry_username: env_nonempty("STAGELY_REGISTRY_USERNAME"),
            registry_password: env_nonempty("STAGELY_REGISTRY_PASSWORD"),
            database_url: env_nonempty("STAGELY_DATABASE_URL"),
            api_token: env_nonempty("STAGELY_API_TOKEN"),
        }
    }
}

/// The registry's credentials: both or neither, environment over file.
fn resolve_registry_auth(
    file: &RegistryFile,
    env: &Environment,
) -> Result<Option<RegistryAuth>, ConfigError> {
    let username = env.registry_username.clone().or(file.username.clone());
    let password = env.registry_password.clone().or(file.password.clone());
    Ok(match (username, password) {
        (Some(username), Some(password)) => Some(RegistryAuth { username, password }),
        (None, None) => None,
        (Some(_), None) => {
            return Err(ConfigError::Invalid {
                field: "registry.password",
                problem: "a registry username is set but no password (STAGELY_REGISTRY_PASSWORD or registry.password)".into(),
            });
        }
        (None, Some(_)) => {
            return Err(ConfigError::Invalid {
                field: "registry.username",
                problem: "a registry password is set but no username (STAGELY_REGISTRY_USERNAME or registry.username)".into(),
            });
        }
    })
}

/// `[provider]`: local (the default) or EC2, and only the table of the kind chosen.
fn resolve_provider(file: &mut ProviderFile) -> Result<ProviderConfig, ConfigError> {
    Ok(match file.kind.as_deref() {
        None | Some("local") => {
            if file.ec2.is_some() {
                return Err(ConfigError::Invalid {
                    field: "provider.ec2",
                    problem: "is set but provider.kind is not \"ec2\"".into(),
                });
            }
            let local = file.local.take().unwrap_or_default();
            let defaults = stagely_provisioning::local::LocalLimits::default();
            ProviderConfig::Local(stagely_provisioning::local::LocalLimits {
                max_pids: local.max_pids.unwrap_or(defaults.max_pids),
                max_disk_mib: local.max_disk_mib.unwrap_or(defaults.max_disk_mib),
            })
        }
        Some("ec2") if file.local.is_some() => {
            return Err(ConfigError::Invalid {
                field: "provider.local",
                problem: "is set but provider.kind is \"ec2\"".into(),
            });
        }
        Some("ec2") => ProviderConfig::Ec2(ec2_settings(file.ec2.take().unwrap_or_default())?),
        Some(kind) => {
            return Err(ConfigError::Invalid {
                field: "provider.kind",
                problem: format!("`{kind}` is not a known provider (local, ec2)"),
            });
        }
    })
}

/// `--database-url` (never with a password) > `STAGELY_DATABASE_URL` > `database_url`: a
/// postgres:// URL, or none for SQLite.
fn resolve_database_url(
    flag: Option<String>,
    env: &Environment,
    file: Option<String>,
) -> Result<Option<String>, ConfigError> {
    if let Some(url) = &flag
        && url_password_span(url).is_some()
    {
        return Err(ConfigError::Invalid {
            field: "--database-url",
            problem: "holds a password, which a command line shows to every user of the machine; set STAGELY_DATABASE_URL or database_url in the config file instead".into(),
        });
    }
    let database_url = flag.or_else(|| env.database_url.clone()).or(file);
    if let Some(url) = &database_url
        && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
    {
        return Err(ConfigError::Invalid {
            field: "database_url",
            problem: "must be a postgres:// URL (SQLite is the default when it is unset)".into(),
        });
    }
    Ok(database_url)
}

/// `[api.tokens]` (hashes), `STAGELY_API_TOKEN` and `extra` (`stagely run`'s own); off
/// loopback at least one.
fn resolve_api_tokens(
    file: &ApiFile,
    env: &Environment,
    extra: Option<ApiToken>,
    listen: &SocketAddr,
) -> Result<Vec<ApiToken>, ConfigError> {
    let mut api_tokens = Vec::new();
    for (name, entry) in &file.tokens {
        let (hash, role) = match entry {
            TokenEntry::Hash(hash) => (hash, Role::Admin),
            TokenEntry::Scoped(scoped) => (&scoped.sha256, scoped.role),
        };
        let bytes = hex::decode(hash.trim())
            .ok()
            .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
            .ok_or_else(|| ConfigError::Invalid {
                field: "api.tokens",
                problem: format!(
                    "`{name}` must be the SHA-256 of a token as 64 hexadecimal digits (`stagely token hash` prints it), not the token itself"
                ),
            })?;
        api_tokens.push(ApiToken {
            name: name.clone(),
            sha256: bytes,
            role,
        });
    }
    if let Some(token) = &env.api_token {
        if token.len() < MIN_API_TOKEN_LEN {
            return Err(ConfigError::Invalid {
                field: "STAGELY_API_TOKEN",
                problem: format!(
                    "is too short; use at least {MIN_API_TOKEN_LEN} random characters (`stagely token new` makes one)"
                ),
            });
        }
        api_tokens.push(ApiToken::from_secret("STAGELY_API_TOKEN", token));
    }
    api_tokens.extend(extra);
    if api_tokens.is_empty() && !listen.ip().is_loopback() {
        return Err(ConfigError::Invalid {
            field: "api.tokens",
            problem: format!(
                "listening on {listen}, off loopback, needs an API token: set STAGELY_API_TOKEN or [api.tokens] (`stagely token new` makes one)"
            ),
        });
    }
    Ok(api_tokens)
}

/// `[prices]`: USD per hour by instance type, finite and not negative, over the defaults.
fn resolve_prices(
    file: BTreeMap<String, PriceFile>,
) -> Result<crate::cost::PriceTable, ConfigError> {
    let mut prices = crate::cost::PriceTable::default();
    for (instance_type, price) in file {
        let valid = |value: f64| value.is_finite() && value >= 0.0;
        if !valid(price.on_demand) || !price.spot.is_none_or(valid) {
            return Err(ConfigError::Invalid {
                field: "prices",
                problem: format!(
                    "`{instance_type}`: prices are USD per hour, finite and not negative"
                ),
            });
        }
        prices.0.insert(
            instance_type,
            crate::cost::Price {
                on_demand: price.on_demand,
                spot: price.spot,
            },
        );
    }
    Ok(prices)
}

/// A setting that must be at least 1.
fn at_least_one(field: &'static str, value: u64) -> Result<u64, ConfigError> {
    if value == 0 {
        Err(ConfigError::Invalid {
            field,
            problem: "must be at least 1".into(),
        })
    } else {
        Ok(value)
    }
}

/// `[api]`: the HTTP server's timeouts and caps.
fn resolve_limits(file: &ApiFile) -> Result<ApiLimits, ConfigError> {
    let positive = at_least_one;
    Ok(ApiLimits {
        header_read_timeout: Duration::from_secs(positive(
            "api.header_read_timeout_secs",
            file.header_read_timeout_secs.unwrap_or(10),
        )?),
        body_read_timeout: Duration::from_secs(positive(
            "api.body_read_timeout_secs",
            file.body_read_timeout_secs.unwrap_or(30),
        )?),
        max_connections: positive(
            "api.max_connections",
            file.max_connections.unwrap_or(1024) as u64,
        )? as usize,
        max_connections_per_ip: positive(
            "api.max_connections_per_ip",
            file.max_connections_per_ip.unwrap_or(256) as u64,
        )? as usize,
        max_agent_connections: positive(
            "api.max_agent_connections",
            file.max_agent_connections.unwrap_or(1024) as u64,
        )? as usize,
        max_connection_lifetime: Duration::from_secs(positive(
            "api.max_connection_secs",
            file.max_connection_secs.unwrap_or(3600),
        )?),
        unauthenticated_requests_per_ip_per_sec: positive(
            "api.unauthenticated_requests_per_ip_per_sec",
            file.unauthenticated_requests_per_ip_per_sec
                .unwrap_or(20)
                .into(),
        )? as u32,
        max_sse_streams: positive(
            "api.max_sse_streams",
            file.max_sse_streams.unwrap_or(512) as u64,
        )? as usize,
        max_sse_streams_per_token: positive(
            "api.max_sse_streams_per_token",
            file.max_sse_streams_per_token.unwrap_or(64) as u64,
        )? as usize,
        max_concurrent_git_reads: positive(
            "api.max_concurrent_git_reads",
            file.max_concurrent_git_reads.unwrap_or(4) as u64,
        )? as usize,
        git_read_timeout: Duration::from_secs(positive(
            "api.git_read_timeout_secs",
            file.git_read_timeout_secs.unwrap_or(30),
        )?),
    })
}

/// `[secrets]`: values of secret build arguments, by argument name.
fn resolve_secrets(
    file: BTreeMap<String, String>,
) -> Result<BTreeMap<String, stagely_protocol::Secret>, ConfigError> {
    let mut build_secrets = BTreeMap::new();
    for (name, value) in file {
        if !crate::stagely_yaml::valid_arg_name(&name) {
            return Err(ConfigError::Invalid {
                field: "secrets",
                problem: format!("`{name}` is not a build argument name"),
            });
        }
        build_secrets.insert(name, stagely_protocol::Secret(value));
    }
    Ok(build_secrets)
}

/// `[tls]`: both files or neither; off loopback, TLS or an explicit proxy.
fn resolve_tls(file: TlsFile, listen: &SocketAddr) -> Result<TlsConfig, ConfigError> {
    let serve = match (file.cert_file, file.key_file) {
        (Some(cert_file), Some(key_file)) => Some(crate::tls::TlsFiles {
            cert_file,
            key_file,
        }),
        (None, None) => None,
        (Some(_), None) => {
            return Err(ConfigError::Invalid {
                field: "tls.key_file",
                problem: "is required with tls.cert_file".into(),
            });
        }
        (None, Some(_)) => {
            return Err(ConfigError::Invalid {
                field: "tls.cert_file",
                problem: "is required with tls.key_file".into(),
            });
        }
    };
    let behind_proxy = file.behind_proxy.unwrap_or(false);
    if behind_proxy && serve.is_some() {
        return Err(ConfigError::Invalid {
            field: "tls.behind_proxy",
            problem: "cannot be true with tls.cert_file: either the core or the proxy ends TLS"
                .into(),
        });
    }
    if serve.is_none() && !behind_proxy && !listen.ip().is_loopback() {
        return Err(ConfigError::Invalid {
            field: "tls",
            problem: format!(
                "listening on {listen}, off loopback, needs TLS: set tls.cert_file and tls.key_file, or tls.behind_proxy = true when a proxy in front terminates TLS"
            ),
        });
    }
    let agent_ca_pem = match &file.agent_ca_file {
        Some(path) => {
            Some(
                crate::tls::load_agent_ca(path).map_err(|error| ConfigError::Invalid {
                    field: "tls.agent_ca_file",
                    problem: error.to_string(),
                })?,
            )
        }
        None => None,
    };
    if let Some(files) = &serve {
        // Fail at start, not at the first handshake.
        crate::tls::load_certified_key(files).map_err(|error| ConfigError::Invalid {
            field: match error {
                crate::tls::TlsError::Key { .. } => "tls.key_file",
                _ => "tls.cert_file",
            },
            problem: error.to_string(),
        })?;
    }
    Ok(TlsConfig {
        serve,
        agent_ca_pem,
        behind_proxy,
    })
}

/// Agents refuse plain `ws://` off loopback, so a URL they could never use is refused here.
fn check_public_url(url: &str, provider: &ProviderConfig) -> Result<(), ConfigError> {
    let invalid = |problem: String| ConfigError::Invalid {
        field: "public_url",
        problem,
    };
    let rest = if let Some(rest) = url.strip_prefix("https://") {
        rest
    } else if let Some(rest) = url.strip_prefix("http://") {
        let host = rest.split('/').next().unwrap_or("");
        if !is_loopback_host(host) || matches!(provider, ProviderConfig::Ec2(_)) {
            return Err(invalid(format!(
                "`{url}` is plain http off loopback (or for EC2 builders); agents only dial https:// there"
            )));
        }
        rest
    } else {
        return Err(invalid(format!("`{url}` is not an http(s):// URL")));
    };
    if rest.split('/').next().unwrap_or("").is_empty() {
        return Err(invalid(format!("`{url}` has no host")));
    }
    Ok(())
}

/// A path component of an image repository.
pub fn valid_repo_component(text: &str) -> bool {
    // The OCI distribution grammar of one repository path component:
    // `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`, here at most 64 characters.
    if text.is_empty() || text.len() > 64 {
        return false;
    }
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = text.as_bytes();
    let mut at = 0;
    loop {
        // An alphanumeric run.
        let start = at;
        while at < bytes.len() && alnum(bytes[at]) {
            at += 1;
        }
        if at == start {
            return false;
        }
        if at == bytes.len() {
            return true;
        }
        // A separator: `.`, `_`, `__` or any number of `-`.
        let separator = at;
        while at < bytes.len() && !alnum(bytes[at]) {
            at += 1;
        }
        match &text[separator..at] {
            "." | "_" | "__" => {}
            dashes if dashes.bytes().all(|b| b == b'-') => {}
            _ => return false,
        }
    }
}

/// What `environment_id` (and the namespace) must be, for error messages.
pub const REPO_COMPONENT_RULE: &str = "must be 1-64 lowercase letters and digits, separated by `.`, `_`, `__` or dashes (an OCI repository name component: it starts and ends with a letter or digit)";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_is_an_input_and_wins_over_the_file() {
        let env = |f: fn(&mut Environment)| {
            let mut env = Environment::default();
            f(&mut env);
            env
        };
        let resolve = |file: FileConfig, env: Environment| {
            CoreConfig::resolve_in(file, Overrides::default(), env)
        };
        // Over the file's values.
        let mut file = FileConfig::default();
        file.registry.username = Some("file-user".into());
        file.registry.password = Some("file-pass".into());
        file.database_url = Some("postgres://file/db".into());
        let config = resolve(
            file,
            env(|e| {
                e.registry_username = Some("env-user".into());
                e.registry_password = Some("env-pass".into());
                e.database_url = Some("postgres://env/db".into());
            }),
        )
        .unwrap();
        let auth = config.registry.auth.expect("credentials");
        assert_eq!(
            (auth.username.as_str(), auth.password.as_str()),
            ("env-user", "env-pass")
        );
        assert_eq!(config.database_url.unwrap().0, "postgres://env/db");
        // Each checked, naming what is wrong.
        let half = resolve(
            FileConfig::default(),
            env(|e| e.registry_username = Some("u".into())),
        );
        assert!(matches!(
            half,
            Err(ConfigError::Invalid {
                field: "registry.password",
                ..
            })
        ));
        let short = resolve(
            FileConfig::default(),
            env(|e| e.api_token = Some("short".into())),
        );
        assert!(matches!(
            short,
            Err(ConfigError::Invalid {
                field: "STAGELY_API_TOKEN",
                ..
            })
        ));
        let sqlite = resolve(
            FileConfig::default(),
            env(|e| e.database_url = Some("sqlite://x".into())),
        );
        assert!(matches!(
            sqlite,
            Err(ConfigError::Invalid {
                field: "database_url",
                ..
            })
        ));
        // A token from the environment is accepted, by name.
        let token = "t".repeat(MIN_API_TOKEN_LEN);
        let with_token = Environment {
            api_token: Some(token.clone()),
            ..Environment::default()
        };
        let config = resolve(FileConfig::default(), with_token).unwrap();
        assert_eq!(config.api_tokens.len(), 1);
        assert_eq!(config.api_tokens[0].name, "STAGELY_API_TOKEN");
    }

    #[test]
    fn repository_components_follow_the_oci_grammar() {
        for good in [
            "pr-1",
            "a",
            "a.b",
            "a_b",
            "a__b",
            "a---b",
            "0x",
            "web.v2_x--y",
        ] {
            assert!(valid_repo_component(good), "{good}");
        }
        for bad in [
            "", "a..b", "a-", "a.", "a___b", "x.-y", "-a", ".a", "_a", "A", "a b", "a/b", "a_-b",
            "é",
        ] {
            assert!(!valid_repo_component(bad), "{bad:?}");
        }
        assert!(!valid_repo_component(&"a".repeat(65)));
    }

    #[test]
    fn defaults_without_a_file() {
        let config = CoreConfig::resolve(FileConfig::default(), Overrides::default()).unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.data_dir, PathBuf::from("./stagely-data"));
        assert!(config.registry.insecure);
    }

    #[test]
    fn flags_override_the_file_and_unknown_keys_are_refused() {
        let file: FileConfig =
            toml::from_str("listen = \"127.0.0.1:9000\"\n[registry]\nhost = \"reg.example.com\"\n")
                .unwrap();
        assert!(
            !CoreConfig::resolve(file, Overrides::default())
                .unwrap()
                .registry
                .insecure
        );
        let file: FileConfig = toml::from_str("listen = \"127.0.0.1:9000\"\n").unwrap();
        let config = CoreConfig::resolve(
            file,
            Overrides {
                listen: Some("127.0.0.1:9100".into()),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!(config.listen.port(), 9100);
        let error = toml::from_str::<FileConfig>("lissen = 1\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("lissen"), "{error}");
    }

    #[test]
    fn token_entries_name_a_bad_role_or_key() {
        let hash = "ab".repeat(32);
        let file: FileConfig = toml::from_str(&format!(
            "[api.tokens]\nci = \"{hash}\"\nviewer = {{ sha256 = \"{hash}\", role = \"read\" }}\n"
        ))
        .unwrap();
        let config = CoreConfig::resolve(file, Overrides::default()).unwrap();
        let roles: Vec<_> = config
            .api_tokens
            .iter()
            .map(|token| (token.name.as_str(), token.role))
            .collect();
        assert_eq!(roles, vec![("ci", Role::Admin), ("viewer", Role::Read)]);
        let bad_role = toml::from_str::<FileConfig>(&format!(
            "[api.tokens]\nx = {{ sha256 = \"{hash}\", role = \"root\" }}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            bad_role.contains("root") && bad_role.contains("operate"),
            "{bad_role}"
        );
        let bad_key = toml::from_str::<FileConfig>(&format!(
            "[api.tokens]\nx = {{ sha = \"{hash}\", role = \"read\" }}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(bad_key.contains("sha"), "{bad_key}");
    }

    #[test]
    fn bad_values_name_their_field() {
        let error = CoreConfig::resolve(
            FileConfig::default(),
            Overrides {
                listen: Some("nowhere".into()),
                ..Overrides::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(error.starts_with("listen:"), "{error}");
        let file: FileConfig = toml::from_str("[registry]\nusername = \"u\"\n").unwrap();
        let error = CoreConfig::resolve(file, Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("registry.password"), "{error}");
    }

    #[test]
    fn toml_errors_never_quote_the_secret_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stagely.toml");
        std::fs::write(&path, "[registry]\npassword = \"hunter2-secret\" extra\n").unwrap();
        let error = FileConfig::load(&path).unwrap_err().to_string();
        assert!(!error.contains("hunter2-secret"), "{error}");
        assert!(error.contains("line 2"), "{error}");
    }

    #[test]
    fn the_ec2_provider_is_configured_under_provider_ec2() {
        use stagely_provisioning::ec2::ClassSettings;
        use stagely_provisioning::{Arch, MachineSize};
        let resolve = |text: &str| {
            CoreConfig::resolve(
                toml::from_str::<FileConfig>(text).unwrap(),
                Overrides::default(),
            )
        };
        let config = resolve(
            "public_url = \"https://core.example:8443\"\n[provider]\nkind = \"ec2\"\n[provider.ec2]\nregion = \"eu-west-1\"\nami_amd64 = \"ami-1\"\nami_arm64 = \"ami-2\"\nsubnet_id = \"subnet-1\"\nsecurity_group_ids = [\"sg-1\", \"sg-2\"]\ninstance_profile = \"builder\"\nspot = true\n[provider.ec2.classes.large]\narm64 = \"c7g.2xlarge\"\nspot = false\n",
        )
        .unwrap();
        let ProviderConfig::Ec2(ec2) = &config.provider else {
            panic!("ec2 expected: {:?}", config.provider)
        };
        assert_eq!(ec2.region.as_deref(), Some("eu-west-1"));
        assert_eq!(ec2.security_group_ids, ["sg-1", "sg-2"]);
        assert_eq!(ec2.instance_profile.as_deref(), Some("builder"));
        assert!(ec2.spot_for(MachineSize::Small) && !ec2.spot_for(MachineSize::Large));
        assert_eq!(
            ec2.instance_type(MachineSize::Large, Arch::Arm64),
            "c7g.2xlarge"
        );
        assert_eq!(
            ec2.instance_type(MachineSize::Large, Arch::Amd64),
            "c5.2xlarge"
        );
        assert_eq!(
            ec2.classes.get(&MachineSize::Large),
            Some(&ClassSettings {
                amd64: None,
                arm64: Some("c7g.2xlarge".into()),
                spot: Some(false)
            })
        );
        assert_eq!(
            resolve("").unwrap().provider,
            ProviderConfig::Local(stagely_provisioning::local::LocalLimits {
                max_pids: 2048,
                max_disk_mib: 20480,
            })
        );
        assert_eq!(
            resolve("[provider.local]\nmax_pids = 64\nmax_disk_mib = 0\n")
                .unwrap()
                .provider,
            ProviderConfig::Local(stagely_provisioning::local::LocalLimits {
                max_pids: 64,
                max_disk_mib: 0,
            })
        );
        for (text, field) in [
            ("[provider]\nkind = \"ec2\"\n", "provider.ec2.ami_amd64"),
            (
                "[provider]\nkind = \"ec2\"\n[provider.ec2]\nami_amd64 = \"ami-1\"\n[provider.ec2.classes.huge]\namd64 = \"x\"\n",
                "provider.ec2.classes",
            ),
            ("[provider.ec2]\nami_amd64 = \"ami-1\"\n", "provider.ec2"),
            ("[provider]\nkind = \"gcp\"\n", "provider.kind"),
            (
                "[provider]\nkind = \"ec2\"\n[provider.ec2]\nami_amd64 = \"ami-1\"\n",
                "public_url",
            ),
            (
                "public_url = \"http://core.internal:8080\"\n[provider]\nkind = \"ec2\"\n[provider.ec2]\nami_amd64 = \"ami-1\"\n",
                "public_url",
            ),
        ] {
            let error = resolve(text).unwrap_err().to_string();
            assert!(error.starts_with(&format!("{field}:")), "{field}: {error}");
        }
        let error = toml::from_str::<FileConfig>("[provider.ec2]\namis = 1\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("amis"), "{error}");
    }

    #[test]
    fn tls_needs_both_files_and_off_loopback_needs_tls_or_a_proxy() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["core.internal".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let cert_file = dir.path().join("core.crt");
        let key_file = dir.path().join("core.key");
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        let tokens = "[api.tokens]\nci = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\n";
        let resolve = |text: String| {
            CoreConfig::resolve(
                toml::from_str::<FileConfig>(&text).unwrap(),
                Overrides::default(),
            )
        };
        let files = format!(
            "cert_file = \"{}\"\nkey_file = \"{}\"\n",
            cert_file.display(),
            key_file.display()
        );
        let config = resolve(format!(
            "listen = \"0.0.0.0:8443\"\n{tokens}[tls]\n{files}agent_ca_file = \"{}\"\n",
            cert_file.display()
        ))
        .unwrap();
        assert_eq!(config.tls.serve.as_ref().unwrap().key_file, key_file);
        assert!(
            config
                .tls
                .agent_ca_pem
                .unwrap()
                .contains("BEGIN CERTIFICATE")
        );
        let proxied = resolve(format!(
            "listen = \"0.0.0.0:8080\"\npublic_url = \"https://stagely.example\"\n{tokens}[tls]\nbehind_proxy = true\n"
        ))
        .unwrap();
        assert!(proxied.tls.behind_proxy && proxied.tls.serve.is_none());
        assert!(
            resolve(String::new()).unwrap().tls.serve.is_none(),
            "loopback: plain is fine"
        );
        for (text, field) in [
            (format!("listen = \"0.0.0.0:8080\"\n{tokens}"), "tls"),
            (
                format!("[tls]\ncert_file = \"{}\"\n", cert_file.display()),
                "tls.key_file",
            ),
            (
                format!("[tls]\nkey_file = \"{}\"\n", key_file.display()),
                "tls.cert_file",
            ),
            (
                format!("[tls]\n{files}behind_proxy = true\n"),
                "tls.behind_proxy",
            ),
            (
                format!(
                    "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
                    key_file.display(),
                    key_file.display()
                ),
                "tls.cert_file",
            ),
            (
                format!("[tls]\nagent_ca_file = \"{}\"\n", key_file.display()),
                "tls.agent_ca_file",
            ),
            (
                "public_url = \"http://192.0.2.1:8080\"\n".to_string(),
                "public_url",
            ),
            ("public_url = \"ftp://x\"\n".to_string(), "public_url"),
        ] {
            let error = resolve(text).unwrap_err().to_string();
            assert!(error.starts_with(&format!("{field}:")), "{field}: {error}");
            assert!(!error.contains("PRIVATE KEY"), "{error}");
        }
    }

    #[test]
    fn loopback_detection() {
        assert!(is_loopback_host("127.0.0.1:5000"));
        assert!(is_loopback_host("localhost"));
        assert!(is_loopback_host("[::1]:5000"));
        assert!(!is_loopback_host("registry.internal"));
        assert!(!is_loopback_host("192.0.2.1:5000"));
    }

    #[test]
    fn debug_output_hides_the_password() {
        let file: FileConfig =
            toml::from_str("[registry]\nusername = \"u\"\npassword = \"s3cr3t-pw\"\n").unwrap();
        let config = CoreConfig::resolve(file, Overrides::default()).unwrap();
        assert!(!format!("{config:?}").contains("s3cr3t-pw"));
    }
}
