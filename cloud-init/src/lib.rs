//! The bootstrap contract between the core and a fresh builder instance.
//!
//! The core renders cloud-init user-data with [`render_user_data`]: a `#cloud-config` document
//! that writes `/etc/stagely/agent.toml` (core URL, agent token, optional CA) and starts the
//! agent baked into the golden image. Rendering is a pure function of its input; the output is
//! snapshot-tested and checked by the real `cloud-init schema` validator.
//!
//! [`read_user_data`] is the inverse. The local provider uses it to boot an agent process from
//! exactly the user-data a cloud VM would get, so the template is exercised on every local run.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Where the user-data writes the agent's config on a VM.
pub const AGENT_CONFIG_PATH: &str = "/etc/stagely/agent.toml";
/// Where the user-data writes the core's CA certificate, when one is given.
pub const CA_FILE_PATH: &str = "/etc/stagely/ca.pem";

const TEMPLATE: &str = include_str!("../templates/agent-user-data.yaml");

/// Where the agent's systemd unit lives on a VM (baked into the golden image, and written
/// again by the user-data so the two never disagree).
pub const UNIT_PATH: &str = "/etc/systemd/system/stagely-agent.service";
/// The agent's systemd unit: starts `/usr/local/bin/stagely-agent`, powers the instance off
/// when the agent exits (job done, or the core unreachable).
pub const AGENT_UNIT: &str = include_str!("../templates/stagely-agent.service");

/// The agent's configuration file (`agent.toml`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Base URL of the core, `https://...` (or `http://` on loopback only).
    pub core_url: String,
    /// One-time bearer token naming this instance's job. Secret.
    pub token: String,
    /// PEM file with the CA that signed the core's certificate, if not a public CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Force a builder backend: `buildx` or `buildah`. Default: what is installed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builder: Option<String>,
    /// Scratch space for the checkout and builder storage. Default `/var/lib/stagely`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_dir: Option<PathBuf>,
    /// The instance id reported in HELLO. Default: `$STAGELY_INSTANCE_ID`, then the hostname.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// Let git fetch local paths and `file://` URLs (the core's `allow_local_repos`: on for
    /// `stagely run`, off for `stagely serve`). Off: https, ssh and git only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_local_repos: bool,
    /// How long the agent keeps trying to reach the core before it gives up and exits (the
    /// unit then powers the instance off, which terminates it). Default
    /// [`DEFAULT_CORE_UNREACHABLE_SECS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub core_unreachable_secs: Option<u64>,
    /// The instance metadata service (IMDSv2) to watch for spot interruption notices, e.g.
    /// `http://169.254.169.254`; none: not watched (a non-cloud instance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata_url: Option<String>,
    /// How long a job goes on after its connection to the core dropped while the agent dials
    /// again (backoff with jitter); past it the agent stops the build and exits. The core
    /// writes its own `[scheduler] agent_reconnect_grace_secs` here. Default
    /// [`DEFAULT_RECONNECT_GRACE_SECS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconnect_grace_secs: Option<u64>,
    /// Cap on the on-disk log spool (output kept until the core acknowledges it). Default
    /// 256 MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spool_max_bytes: Option<u64>,
    /// The cgroup (path from the hierarchy's root, e.g. `/stagely/local-…/build`) buildah's
    /// `RUN` containers go in: under the instance's own, so its `pids.max` covers them too.
    /// Set by the local provider; none: the runtime's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_parent: Option<String>,
}

/// Default for [`AgentConfig::reconnect_grace_secs`]: two minutes.
pub const DEFAULT_RECONNECT_GRACE_SECS: u64 = 120;

/// Default for [`AgentConfig::core_unreachable_secs`]: ten minutes.
pub const DEFAULT_CORE_UNREACHABLE_SECS: u64 = 600;

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("core_url", &self.core_url)
            .field("token", &"<redacted>")
            .field("ca_file", &self.ca_file)
            .field("builder", &self.builder)
            .field("work_dir", &self.work_dir)
            .field("instance_id", &self.instance_id)
            .field("allow_local_repos", &self.allow_local_repos)
            .field("core_unreachable_secs", &self.core_unreachable_secs)
            .field("metadata_url", &self.metadata_url)
            .field("reconnect_grace_secs", &self.reconnect_grace_secs)
            .field("spool_max_bytes", &self.spool_max_bytes)
            .finish()
    }
}

impl AgentConfig {
    /// A config dialling `core_url` with `token`, everything else at its default.
    pub fn new(core_url: impl Into<String>, token: impl Into<String>) -> AgentConfig {
        AgentConfig {
            core_url: core_url.into(),
            token: token.into(),
            ca_file: None,
            builder: None,
            work_dir: None,
            instance_id: None,
            allow_local_repos: false,
            core_unreachable_secs: None,
            metadata_url: None,
            reconnect_grace_secs: None,
            spool_max_bytes: None,
            cgroup_parent: None,
        }
    }

    /// Parses `agent.toml` text.
    pub fn from_toml(text: &str) -> Result<AgentConfig, ReadError> {
        // Only the position and message: toml's own rendering quotes the line, which may
        // be the token.
        toml::from_str(text).map_err(|error: toml::de::Error| {
            let detail = match error.span() {
                Some(span) => {
                    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                    format!("line {line}: {}", error.message())
                }
                None => error.message().to_string(),
            };
            ReadError::AgentConfig { detail }
        })
    }
}

/// Everything one instance's user-data carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bootstrap {
    pub agent: AgentConfig,
    /// PEM of the core's CA; written to [`CA_FILE_PATH`] and referenced by `ca_file`.
    pub ca_pem: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("agent config cannot be written as TOML: {0}")]
    Toml(#[from] toml::ser::Error),
    #[error("CA certificate is not PEM text (it must start with -----BEGIN)")]
    CaNotPem,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("user-data does not start with #cloud-config")]
    NotCloudConfig,
    #[error("user-data is not valid YAML: {detail}")]
    Yaml { detail: String },
    #[error("user-data writes no {AGENT_CONFIG_PATH}")]
    NoAgentConfig,
    #[error("agent config is invalid: {detail}")]
    AgentConfig { detail: String },
}

/// Renders the `#cloud-config` user-data for one builder instance.
pub fn render_user_data(bootstrap: &Bootstrap) -> Result<String, RenderError> {
    let mut agent = bootstrap.agent.clone();
    let ca_block = match &bootstrap.ca_pem {
        Some(pem) => {
            if !pem.trim_start().starts_with("-----BEGIN") {
                return Err(RenderError::CaNotPem);
            }
            agent.ca_file = Some(PathBuf::from(CA_FILE_PATH));
            format!(
                "  - path: {CA_FILE_PATH}\n    owner: root:root\n    permissions: '0644'\n    content: |\n{}",
                indent(pem, 6)
            )
        }
        None => String::new(),
    };
    let agent_toml = toml::to_string(&agent)?;
    Ok(TEMPLATE
        .replace("{{agent_toml}}\n", &indent(&agent_toml, 6))
        .replace("{{ca_file}}", &ca_block)
        .replace("{{unit}}", &indent(AGENT_UNIT, 6)))
}

/// Indents every line of `text` by `width` spaces, for a YAML block scalar; ends with `\n`.
fn indent(text: &str, width: usize) -> String {
    let pad = " ".repeat(width);
    let mut out = String::with_capacity(text.len() + 16);
    for line in text.lines() {
        if line.is_empty() {
            out.push('\n');
        } else {
            out.push_str(&pad);
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[derive(Deserialize)]
struct CloudConfig {
    #[serde(default)]
    write_files: Vec<WriteFile>,
}

/// One `write_files` entry of a user-data, as cloud-init would write it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct WriteFile {
    pub path: String,
    #[serde(default)]
    pub content: String,
    /// Octal mode text, e.g. `0600` (cloud-init's default is `0644`).
    #[serde(default)]
    pub permissions: Option<String>,
    #[serde(default)]
    pub owner: Option<String>,
}

impl WriteFile {
    /// The mode cloud-init gives the file.
    pub fn mode(&self) -> u32 {
        self.permissions
            .as_deref()
            .and_then(|text| u32::from_str_radix(text.trim_start_matches("0o"), 8).ok())
            .unwrap_or(0o644)
    }
}

/// The files a user-data writes, in order (what a harness applies as cloud-init would).
pub fn written_files(user_data: &str) -> Result<Vec<WriteFile>, ReadError> {
    if !user_data.starts_with("#cloud-config") {
        return Err(ReadError::NotCloudConfig);
    }
    let config: CloudConfig =
        serde_saphyr::from_str(user_data).map_err(|error| ReadError::Yaml {
            detail: error.to_string(),
        })?;
    Ok(config.write_files)
}

/// The command line a systemd unit's `ExecStart=` runs, split on whitespace (our unit has
/// no quoting).
pub fn unit_exec_start(unit: &str) -> Option<Vec<String>> {
    unit.lines()
        .find_map(|line| line.trim().strip_prefix("ExecStart="))
        .map(|command| command.split_whitespace().map(str::to_string).collect())
}

/// Reads back what a rendered user-data would install on a VM.
pub fn read_user_data(user_data: &str) -> Result<Bootstrap, ReadError> {
    let write_files = written_files(user_data)?;
    let agent_text = write_files
        .iter()
        .find(|file| file.path == AGENT_CONFIG_PATH)
        .map(|file| file.content.as_str())
        .ok_or(ReadError::NoAgentConfig)?;
    let agent = AgentConfig::from_toml(agent_text)?;
    let ca_pem = write_files
        .iter()
        .find(|file| file.path == CA_FILE_PATH)
        .map(|file| file.content.clone());
    Ok(Bootstrap { agent, ca_pem })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(ca: Option<&str>) -> Bootstrap {
        Bootstrap {
            agent: AgentConfig::new("https://core.stagely.internal:8443", "stk_0123456789abcdef"),
            ca_pem: ca.map(str::to_string),
        }
    }

    const CA: &str =
        "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUQ\n-----END CERTIFICATE-----\n";

    #[test]
    fn rendered_user_data_matches_snapshot() {
        insta::assert_snapshot!("user_data_plain", render_user_data(&sample(None)).unwrap());
        insta::assert_snapshot!(
            "user_data_with_ca",
            render_user_data(&sample(Some(CA))).unwrap()
        );
    }

    #[test]
    fn rendering_then_reading_gives_back_the_config() {
        for ca in [None, Some(CA)] {
            let bootstrap = sample(ca);
            let text = render_user_data(&bootstrap).unwrap();
            let read = read_user_data(&text).unwrap();
            assert_eq!(read.agent.token, bootstrap.agent.token);
            assert_eq!(read.agent.core_url, bootstrap.agent.core_url);
            assert_eq!(read.ca_pem.as_deref(), ca);
            assert_eq!(read.agent.ca_file.is_some(), ca.is_some());
        }
    }

    #[test]
    fn awkward_values_survive_toml_and_yaml_quoting() {
        let mut bootstrap = sample(None);
        bootstrap.agent.token = "a\"b'c\\d: #e".into();
        bootstrap.agent.core_url = "http://127.0.0.1:8080/x?y=\"z\"".into();
        let read = read_user_data(&render_user_data(&bootstrap).unwrap()).unwrap();
        assert_eq!(read.agent, bootstrap.agent);
    }

    #[test]
    fn read_errors_are_precise() {
        assert!(matches!(
            read_user_data("foo: 1"),
            Err(ReadError::NotCloudConfig)
        ));
        assert!(matches!(
            read_user_data("#cloud-config\nwrite_files: []\n"),
            Err(ReadError::NoAgentConfig)
        ));
        let bad = "#cloud-config\nwrite_files:\n  - path: /etc/stagely/agent.toml\n    content: |\n      core_url = 1\n";
        assert!(matches!(
            read_user_data(bad),
            Err(ReadError::AgentConfig { .. })
        ));
        let unknown = "#cloud-config\nwrite_files:\n  - path: /etc/stagely/agent.toml\n    content: |\n      core_url = \"x\"\n      token = \"t\"\n      colour = \"red\"\n";
        let error = read_user_data(unknown).unwrap_err().to_string();
        assert!(error.contains("colour"), "{error}");
    }

    #[test]
    fn parse_errors_do_not_quote_the_token() {
        let error = AgentConfig::from_toml("core_url = \"x\"\ntoken = \"stk_secret\" trailing\n")
            .unwrap_err()
            .to_string();
        assert!(!error.contains("stk_secret"), "{error}");
        assert!(error.contains("line 2"), "{error}");
    }

    #[test]
    fn debug_output_redacts_the_token() {
        let shown = format!("{:?}", sample(None));
        assert!(!shown.contains("stk_0123456789abcdef"), "{shown}");
    }

    #[test]
    fn written_files_carry_their_modes_and_the_unit_starts_the_agent() {
        let files = written_files(&render_user_data(&sample(Some(CA))).unwrap()).unwrap();
        let modes: Vec<(&str, u32)> = files.iter().map(|f| (f.path.as_str(), f.mode())).collect();
        assert_eq!(
            modes,
            [
                (AGENT_CONFIG_PATH, 0o600),
                (CA_FILE_PATH, 0o644),
                (UNIT_PATH, 0o644)
            ]
        );
        let unit = &files[2].content;
        assert_eq!(unit, AGENT_UNIT);
        assert_eq!(
            unit_exec_start(unit).unwrap(),
            [
                "/usr/local/bin/stagely-agent",
                "--config",
                AGENT_CONFIG_PATH
            ]
        );
    }

    #[test]
    fn non_pem_ca_is_refused() {
        assert!(matches!(
            render_user_data(&sample(Some("not a cert"))),
            Err(RenderError::CaNotPem)
        ));
    }
}
