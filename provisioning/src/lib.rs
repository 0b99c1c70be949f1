//! Creating and terminating builder instances, behind one [`Provider`] trait.
//!
//! Architecture invariant: this crate knows nothing about jobs, runs or the database. It is
//! handed a [`MachineSpec`] (size, architecture, user-data, tags) and returns an [`Instance`];
//! the core decides what to run there. Cloud specifics live in one implementation each
//! ([`local::LocalProvider`], [`ec2::Ec2Provider`]).

pub mod ec2;
pub mod local;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
pub use stagely_protocol::Arch;

/// Abstract machine size from `stagely.yaml`'s `machine:`; each provider maps it to a type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MachineSize {
    Small,
    Medium,
    Large,
}

impl MachineSize {
    pub fn parse(text: &str) -> Option<MachineSize> {
        match text {
            "small" => Some(MachineSize::Small),
            "medium" => Some(MachineSize::Medium),
            "large" => Some(MachineSize::Large),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MachineSize::Small => "small",
            MachineSize::Medium => "medium",
            MachineSize::Large => "large",
        }
    }
}

/// What to boot.
#[derive(Clone, PartialEq, Eq)]
pub struct MachineSpec {
    pub size: MachineSize,
    pub arch: Arch,
    /// Rendered cloud-init user-data. Carries a one-time token: never log it.
    pub user_data: String,
    /// Tags put on the instance; `list_instances` filters by them (the reaper's handle).
    pub tags: BTreeMap<String, String>,
    /// Never on spot (the job's earlier attempt was interrupted there).
    pub on_demand_only: bool,
}

impl std::fmt::Debug for MachineSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MachineSpec")
            .field("size", &self.size)
            .field("arch", &self.arch)
            .field(
                "user_data",
                &format_args!("<{} bytes>", self.user_data.len()),
            )
            .field("tags", &self.tags)
            .field("on_demand_only", &self.on_demand_only)
            .finish()
    }
}

/// A booted (or booting) instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// Provider-unique id; what `terminate_instance` takes.
    pub id: String,
    /// The provider's name for the machine type (`c5.xlarge`, `local`).
    pub instance_type: String,
    /// The architecture of the host itself.
    pub host_arch: Arch,
    /// True when `spec.arch` is not the host's and the build runs under emulation.
    pub emulated: bool,
    pub tags: BTreeMap<String, String>,
    /// How it is billed, where a cloud bills it.
    #[serde(default)]
    pub market: Option<Market>,
    /// What the job's log should say about how it was placed (spot fell back to on-demand,
    /// arm64 emulated on amd64).
    #[serde(default)]
    pub notice: Option<String>,
}

/// How a cloud instance is billed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Market {
    OnDemand,
    Spot,
}

impl Market {
    pub fn as_str(self) -> &'static str {
        match self {
            Market::OnDemand => "on-demand",
            Market::Spot => "spot",
        }
    }
}

/// Why a provider call failed. Messages name the instance or resource.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("user-data is not a Stagely bootstrap: {0}")]
    UserData(#[from] stagely_cloud_init::ReadError),
    #[error("cannot build {requested} on this provider: {reason}")]
    UnsupportedArch { requested: Arch, reason: String },
    #[error("cannot start the agent binary {path}: {source}")]
    Spawn {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("instance {id}: {detail}")]
    Instance { id: String, detail: String },
    #[error("local instance directory {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("provider capacity: {0}")]
    Capacity(String),
    /// The provider's configuration cannot launch this machine.
    #[error("provider configuration: {0}")]
    Config(String),
    /// A cloud API refused or failed a call: its own error code and message.
    #[error("{operation} failed: {code}: {message}")]
    Api {
        operation: &'static str,
        code: String,
        message: String,
        class: ec2::ErrorClass,
    },
}

impl ProviderError {
    /// Infrastructure failures that another attempt may not hit (capacity, limits, a cloud
    /// failing); the rest (bad configuration, a bad AMI, credentials) fail the same way
    /// every time.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProviderError::Capacity(_) => true,
            ProviderError::Api { class, .. } => *class != ec2::ErrorClass::Permanent,
            _ => false,
        }
    }
}

/// Creates and terminates builder instances.
///
/// Call order for one job: `create_instance` once; then exactly one `terminate_instance`
/// with the returned id, whether the job succeeded, failed or was cancelled. The core also
/// calls `list_instances` with its own tags at start-up and terminates whatever it finds
/// that no live job owns (the reaper), so a crash never leaks an instance.
///
/// Concurrency: every method may be called concurrently from many tasks.
///
/// `terminate_instance` is idempotent: terminating an unknown or already-terminated instance
/// succeeds. It is safe to call after a failed `create_instance` with whatever id was known.
#[async_trait::async_trait]
pub trait Provider: Send + Sync + 'static {
    /// Short name for logs and the API (`local`, `ec2`).
    fn name(&self) -> &'static str;

    /// Boots an instance that will run `spec.user_data`. Returns once the provider has
    /// accepted it; the agent dials the core when it is up.
    async fn create_instance(&self, spec: &MachineSpec) -> Result<Instance, ProviderError>;

    /// Terminates the instance. Idempotent.
    async fn terminate_instance(&self, instance_id: &str) -> Result<(), ProviderError>;

    /// Instances carrying every tag in `tags`, including ones started by an earlier process.
    async fn list_instances(
        &self,
        tags: &BTreeMap<String, String>,
    ) -> Result<Vec<Instance>, ProviderError>;

    /// Whether the instance still runs. The core asks when it adopts an attempt from a core
    /// that stopped and while a dropped agent has not dialled again: an instance that is
    /// gone cannot bring its agent back, so its attempt ends at once instead of after the
    /// reconnect grace. Asked only of instances `create_instance` returned.
    async fn instance_state(&self, instance_id: &str) -> Result<InstanceState, ProviderError>;

    /// What this provider's agents should be told in their `agent.toml`.
    fn agent_hints(&self) -> AgentHints {
        AgentHints::default()
    }
}

/// Whether an instance runs, as its provider sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceState {
    /// Booting or running: its agent may still dial in.
    Running,
    /// Stopped, terminated or unknown to the provider: nothing on it runs any more.
    Gone {
        /// What the provider said (`terminated`, `its agent process 123 exited`).
        detail: String,
    },
}

/// Provider-specific settings for the agents it boots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentHints {
    /// The instance metadata service to watch for spot interruption notices.
    pub metadata_url: Option<String>,
    /// How long an agent keeps dialling an unreachable core before it powers off.
    pub core_unreachable_secs: Option<u64>,
}

/// Creates `path` (and missing parents) as a directory only its owner can enter (0700),
/// and makes it so if it already existed, whatever the process's umask.
pub fn private_dir(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
}
