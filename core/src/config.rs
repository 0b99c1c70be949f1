//! The core's configuration: `stagely.toml`, environment and flags, resolved in that order of
//! increasing precedence (flag > environment > file > default).
//!
//! Registry credentials come from the file or the environment (`STAGELY_REGISTRY_USERNAME`,
//! `STAGELY_REGISTRY_PASSWORD`), never from flags, so they never appear in a process list.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use stagely_protocol::RegistryAuth;

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

/// `stagely.toml`. Every field is optional; unknown fields are refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    /// URL agents dial back to (default: `http://<listen address>`).
    pub public_url: Option<String>,
    /// Tag value marking this core's instances (default `stagely`).
    pub core_id: Option<String>,
    #[serde(default)]
    pub registry: RegistryFile,
    #[serde(default)]
    pub provider: ProviderFile,
    #[serde(default)]
    pub scheduler: SchedulerFile,
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
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerFile {
    pub max_concurrent_jobs: Option<usize>,
    pub agent_connect_timeout_secs: Option<u64>,
    pub heartbeat_timeout_secs: Option<u64>,
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

/// Fully resolved configuration.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub public_url: Option<String>,
    pub core_id: String,
    pub registry: RegistryConfig,
    /// `stagely-agent` for the local provider (default: next to the running executable).
    pub agent_binary: Option<PathBuf>,
    pub max_concurrent_jobs: usize,
    pub agent_connect_timeout: Duration,
    pub heartbeat_timeout: Duration,
}

/// Values given on the command line; they win over everything else.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub registry: Option<String>,
    pub public_url: Option<String>,
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
    /// Resolves flag > environment > file > default.
    pub fn resolve(file: FileConfig, overrides: Overrides) -> Result<CoreConfig, ConfigError> {
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
            .or(file.registry.host)
            .unwrap_or_else(|| "127.0.0.1:5000".into());
        if host.is_empty() || host.contains('/') || host.contains(char::is_whitespace) {
            return Err(ConfigError::Invalid {
                field: "registry",
                problem: format!("`{host}` is not HOST[:PORT]"),
            });
        }
        let username = env_nonempty("STAGELY_REGISTRY_USERNAME").or(file.registry.username.clone());
        let password = env_nonempty("STAGELY_REGISTRY_PASSWORD").or(file.registry.password.clone());
        let auth = match (username, password) {
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
        };
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
        if let Some(kind) = &file.provider.kind
            && kind != "local"
        {
            return Err(ConfigError::Invalid {
                field: "provider.kind",
                problem: format!("`{kind}` is not a known provider (local)"),
            });
        }
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
        Ok(CoreConfig {
            listen,
            data_dir,
            public_url: overrides.public_url.or(file.public_url),
            core_id: file.core_id.unwrap_or_else(|| "stagely".into()),
            registry: RegistryConfig {
                host,
                insecure,
                auth,
                namespace,
                cache: file.registry.cache.unwrap_or(true),
            },
            agent_binary: file.provider.agent_binary,
            max_concurrent_jobs,
            agent_connect_timeout: Duration::from_secs(agent_connect_timeout),
            heartbeat_timeout: Duration::from_secs(heartbeat_timeout),
        })
    }
}

/// A path component of an image repository.
pub fn valid_repo_component(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 64
        && text
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
        && text.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

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
