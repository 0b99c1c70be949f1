//! What a job builds, as stored in `build_jobs.spec` (JSON) and read back once, into
//! [`JobSpec`], when its row is read: a spec the store cannot read is an error naming it, never
//! a default.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What a job builds; stored as JSON in `build_jobs.spec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// The `builds:` key this job came from.
    pub service: String,
    pub kind: JobKind,
    /// Context relative to the repository root (the config's directory prefix applied).
    pub context_path: String,
    pub dockerfile: String,
    pub build_args: BTreeMap<String, String>,
    /// Names of secret build arguments (values are never stored).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret_build_args: Vec<String>,
    pub timeout_seconds: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum JobKind {
    /// Build one platform.
    Build,
    /// Merge the named sibling jobs' images into one manifest list.
    Merge { sources: Vec<String> },
}

/// A `build_jobs.spec` this version cannot read.
#[derive(Debug, thiserror::Error)]
#[error("job spec: {0}")]
pub struct BadSpec(#[from] serde_json::Error);

impl TryFrom<String> for JobSpec {
    type Error = BadSpec;

    fn try_from(json: String) -> Result<JobSpec, BadSpec> {
        Ok(serde_json::from_str(&json)?)
    }
}
