//! Spot interruption notices from the instance metadata service (IMDSv2).
//!
//! EC2 announces that it will reclaim a spot instance about two minutes ahead at
//! `/latest/meta-data/spot/instance-action` (404 until then). [`watch`] polls it every
//! [`POLL_EVERY`] with a session token (`PUT /latest/api/token`: instances are launched with
//! IMDSv2 required) and returns the notice the moment it appears; the connection relays it to
//! the core as an INTERRUPTION frame. Failures to reach the service are logged and retried:
//! a missing notice must never end a build.

use std::time::Duration;

use serde::Deserialize;

/// How often the notice is polled (AWS recommends every 5 seconds).
pub const POLL_EVERY: Duration = Duration::from_secs(5);
/// Lifetime asked for each IMDSv2 session token; renewed well before.
const TOKEN_TTL_SECS: u64 = 21_600;
const TOKEN_RENEW_AFTER: Duration = Duration::from_secs(TOKEN_TTL_SECS / 2);
/// Longest one metadata request may take (the service is link-local and fast).
const REQUEST_LIMIT: Duration = Duration::from_secs(2);

/// EC2's `spot/instance-action` document.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct InstanceAction {
    pub action: String,
    #[serde(default)]
    pub time: Option<String>,
}

/// The metadata service at `base` (e.g. `http://169.254.169.254`).
pub struct Metadata {
    base: String,
    client: reqwest::Client,
    token: Option<(String, tokio::time::Instant)>,
}

impl Metadata {
    pub fn new(base: &str) -> anyhow::Result<Metadata> {
        let client = reqwest::Client::builder()
            .timeout(REQUEST_LIMIT)
            // The metadata service is never behind a proxy.
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Metadata {
            base: base.trim_end_matches('/').to_string(),
            client,
            token: None,
        })
    }

    async fn token(&mut self) -> anyhow::Result<String> {
        if let Some((token, at)) = &self.token
            && at.elapsed() < TOKEN_RENEW_AFTER
        {
            return Ok(token.clone());
        }
        let response = self
            .client
            .put(format!("{}/latest/api/token", self.base))
            .header(
                "X-aws-ec2-metadata-token-ttl-seconds",
                TOKEN_TTL_SECS.to_string(),
            )
            .send()
            .await?
            .error_for_status()?;
        let token = response.text().await?.trim().to_string();
        anyhow::ensure!(
            !token.is_empty(),
            "the metadata service gave an empty token"
        );
        self.token = Some((token.clone(), tokio::time::Instant::now()));
        Ok(token)
    }

    /// The pending interruption, if any.
    pub async fn instance_action(&mut self) -> anyhow::Result<Option<InstanceAction>> {
        let token = self.token().await?;
        let response = self
            .client
            .get(format!(
                "{}/latest/meta-data/spot/instance-action",
                self.base
            ))
            .header("X-aws-ec2-metadata-token", token)
            .send()
            .await?;
        match response.status().as_u16() {
            404 => Ok(None),
            401 => {
                // The token expired early (or the service restarted): fetch a new one.
                self.token = None;
                Ok(None)
            }
            200 => {
                let body = response.bytes().await?;
                Ok(Some(serde_json::from_slice(&body)?))
            }
            other => anyhow::bail!("spot/instance-action answered HTTP {other}"),
        }
    }
}

/// Polls until the cloud announces an interruption, then returns it. Never returns otherwise.
pub async fn watch(base: String) -> InstanceAction {
    let mut metadata = match Metadata::new(&base) {
        Ok(metadata) => metadata,
        Err(error) => {
            tracing::warn!("spot notices will not be watched: {error}");
            return std::future::pending().await;
        }
    };
    let mut tick = tokio::time::interval(POLL_EVERY);
    let mut warned = false;
    loop {
        tick.tick().await;
        match metadata.instance_action().await {
            Ok(Some(action)) => return action,
            Ok(None) => warned = false,
            Err(error) => {
                // Said once per outage, not every five seconds.
                if !warned {
                    tracing::warn!("reading spot/instance-action failed: {error:#}");
                    warned = true;
                }
            }
        }
    }
}
