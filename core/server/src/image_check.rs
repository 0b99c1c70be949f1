//! Trust but verify: before a job counts as completed, the registry must hold the image the
//! core assigned, at the digest the agent reported. An agent (a compromised builder VM, or a
//! buggy one) cannot make the core record an image that was never pushed.

use std::time::Duration;

use oci_client::Reference;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth as OciAuth;

use crate::config::RegistryConfig;

/// Attempts at reading the registry before a job is failed for it (transient errors only).
const ATTEMPTS: u32 = 3;

/// Why a reported image was not accepted. Messages name the image and digests, never
/// credentials.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("`{image}` is not an image reference: {detail}")]
    Reference { image: String, detail: String },
    #[error("the registry has {image} at {actual}, not at the reported {reported}")]
    Mismatch {
        image: String,
        reported: String,
        actual: String,
    },
    #[error("the registry could not confirm {image}@{reported}: {detail}")]
    Registry {
        image: String,
        reported: String,
        detail: String,
    },
}

/// Reads manifests from the core's registry with the core's credentials.
pub struct ImageChecker {
    client: oci_client::Client,
    auth: OciAuth,
}

impl ImageChecker {
    pub fn new(registry: &RegistryConfig) -> ImageChecker {
        let protocol = if registry.insecure {
            ClientProtocol::HttpsExcept(vec![registry.host.clone()])
        } else {
            ClientProtocol::Https
        };
        let client = oci_client::Client::new(ClientConfig {
            protocol,
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(30)),
            ..ClientConfig::default()
        });
        let auth = match &registry.auth {
            Some(auth) => OciAuth::Basic(auth.username.clone(), auth.password.clone()),
            None => OciAuth::Anonymous,
        };
        // The first reference parsed in a process compiles oci-client's reference grammar (a
        // large regex: about 40 ms of CPU). Done once now, on a thread of its own, so that it
        // is neither in the path of the first job's end nor blocking a runtime worker.
        let _ = std::thread::Builder::new()
            .name("warm-references".into())
            .spawn(|| "localhost/stagely/warm:up".parse::<Reference>().is_ok());
        ImageChecker { client, auth }
    }

    /// Confirms that `image` (a tagged reference) resolves to `reported` in the registry.
    pub async fn verify(&self, image: &str, reported: &str) -> Result<(), VerifyError> {
        let reference: Reference =
            image
                .parse()
                .map_err(|error: oci_client::ParseError| VerifyError::Reference {
                    image: image.to_string(),
                    detail: error.to_string(),
                })?;
        let mut last = String::new();
        for attempt in 1..=ATTEMPTS {
            match self
                .client
                .fetch_manifest_digest(&reference, &self.auth)
                .await
            {
                Ok(actual) if actual == reported => return Ok(()),
                Ok(actual) => {
                    return Err(VerifyError::Mismatch {
                        image: image.to_string(),
                        reported: reported.to_string(),
                        actual,
                    });
                }
                Err(error) => {
                    last = error.to_string();
                    let missing = matches!(
                        error,
                        oci_client::errors::OciDistributionError::ImageManifestNotFoundError(_)
                    ) || last.contains("MANIFEST_UNKNOWN")
                        || last.contains("404");
                    if missing || attempt == ATTEMPTS {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
                }
            }
        }
        Err(VerifyError::Registry {
            image: image.to_string(),
            reported: reported.to_string(),
            detail: last,
        })
    }
}
