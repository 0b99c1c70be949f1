//! Dialling the core: the agent endpoint's URL, TLS (the core's CA from user-data, else
//! the system roots), the subprotocol, and the first connection with its retries.

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use stagely_cloud_init::AgentConfig;
use stagely_protocol::{Codec, MAX_FRAME_BYTES};
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;

/// Longest wait for one dial (TCP, TLS and the WebSocket upgrade).
pub(crate) const DIAL_LIMIT: Duration = Duration::from_secs(20);
/// Longest one frame may take to send (the core batches database writes, so allow slack).
pub(crate) const SEND_LIMIT: Duration = Duration::from_secs(60);

pub(crate) type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Why the agent stopped without serving a job.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("the core refused this agent's token (HTTP {0}); the token is wrong or already used")]
    Refused(u16),
    #[error("the core refused to resume the job: {0}")]
    Rejected(String),
    #[error("core_url `{0}` must be http(s):// (plain http only on loopback)")]
    BadUrl(String),
    #[error("TLS with the core failed (check ca_file): {0}")]
    Tls(String),
    #[error("the core was unreachable for {after:?} (core_unreachable_secs); last error: {last}")]
    Unreachable { after: Duration, last: String },
}

/// A TLS failure (bad or untrusted certificate) does not heal by retrying.
fn tls_failure(error: &tungstenite::Error) -> Option<String> {
    match error {
        tungstenite::Error::Tls(tls) => Some(tls.to_string()),
        tungstenite::Error::Io(io)
            if io
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>()) =>
        {
            Some(io.to_string())
        }
        _ => None,
    }
}

/// The core answered an offer of subprotocols with none (it predates them).
fn no_subprotocol(error: &anyhow::Error) -> bool {
    use tungstenite::error::{ProtocolError, SubProtocolError};
    error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<tungstenite::Error>(),
            Some(tungstenite::Error::Protocol(
                ProtocolError::SecWebSocketSubProtocolError(SubProtocolError::NoSubProtocol)
            ))
        )
    })
}

/// The agent-side endpoint URL for a core base URL.
pub fn connect_url(core_url: &str) -> Result<String, ConnectError> {
    let trimmed = core_url.trim_end_matches('/');
    let (scheme, rest) = if let Some(rest) = trimmed.strip_prefix("https://") {
        ("wss", rest)
    } else if let Some(rest) = trimmed.strip_prefix("http://") {
        let host = rest.split(['/', '?']).next().unwrap_or("");
        let host = match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        };
        if !matches!(host, "127.0.0.1" | "localhost" | "[::1]") {
            return Err(ConnectError::BadUrl(core_url.to_string()));
        }
        ("ws", rest)
    } else {
        return Err(ConnectError::BadUrl(core_url.to_string()));
    };
    Ok(format!("{scheme}://{rest}/api/v1/agent/connect"))
}

fn tls_config(config: &AgentConfig) -> anyhow::Result<std::sync::Arc<rustls::ClientConfig>> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if let Some(ca_file) = &config.ca_file {
        let mut added = 0;
        for cert in CertificateDer::pem_file_iter(ca_file)
            .with_context(|| format!("reading ca_file {}", ca_file.display()))?
        {
            let cert = cert.with_context(|| format!("parsing ca_file {}", ca_file.display()))?;
            roots
                .add(cert)
                .with_context(|| format!("adding CA from {}", ca_file.display()))?;
            added += 1;
        }
        if added == 0 {
            bail!("ca_file {} holds no certificate", ca_file.display());
        }
    }
    Ok(std::sync::Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// How to reach the core: its endpoint, TLS roots and this agent's token. Kept for the whole
/// life of the agent, so a dropped connection can be dialled again.
#[derive(Clone)]
pub struct Dialer {
    url: String,
    tls: std::sync::Arc<rustls::ClientConfig>,
    token: String,
    /// Offer the protobuf subprotocol (cleared once a core that knows no subprotocols
    /// answered: it speaks JSON).
    offer_proto: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Dialer {
    pub fn new(config: &AgentConfig) -> anyhow::Result<Dialer> {
        Ok(Dialer {
            url: connect_url(&config.core_url)?,
            tls: tls_config(config)?,
            token: config.token.clone(),
            offer_proto: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
        })
    }

    /// One dial: TCP, TLS and the WebSocket upgrade, within [`DIAL_LIMIT`]. A refused token
    /// and a TLS failure are [`ConnectError`]s (final); anything else may heal.
    pub(crate) async fn dial_once(&self) -> anyhow::Result<(Socket, Codec)> {
        use std::sync::atomic::Ordering;
        let offer = self.offer_proto.load(Ordering::Relaxed);
        match self.dial(offer).await {
            Err(error) if offer && no_subprotocol(&error) => {
                // An older core: no subprotocols, JSON text frames.
                self.offer_proto.store(false, Ordering::Relaxed);
                self.dial(false).await
            }
            other => other,
        }
    }

    async fn dial(&self, offer_proto: bool) -> anyhow::Result<(Socket, Codec)> {
        let url = &self.url;
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|error| anyhow!(error))?;
        let bearer = format!("Bearer {}", self.token)
            .parse()
            .map_err(|_| anyhow!("the token contains characters not allowed in a header"))?;
        request.headers_mut().insert("authorization", bearer);
        // Binary frames preferred; JSON text frames are the fallback.
        if offer_proto {
            request.headers_mut().insert(
                "sec-websocket-protocol",
                tungstenite::http::HeaderValue::from_static("stagely.v1.proto, stagely.v1.json"),
            );
        }
        let ws_config = WebSocketConfig::default()
            .max_message_size(Some(MAX_FRAME_BYTES))
            .max_frame_size(Some(MAX_FRAME_BYTES));
        let dial = tokio_tungstenite::connect_async_tls_with_config(
            request,
            Some(ws_config),
            true,
            Some(tokio_tungstenite::Connector::Rustls(self.tls.clone())),
        );
        let Ok(dialled) = tokio::time::timeout(DIAL_LIMIT, dial).await else {
            bail!("connecting to {url}: no answer within {DIAL_LIMIT:?}");
        };
        match dialled {
            Ok((socket, response)) => {
                let chosen = response
                    .headers()
                    .get("sec-websocket-protocol")
                    .and_then(|value| value.to_str().ok());
                let codec = Codec::for_subprotocol(chosen)
                    .ok_or_else(|| anyhow!("the core chose an unknown subprotocol {chosen:?}"))?;
                Ok((socket, codec))
            }
            Err(tungstenite::Error::Http(response))
                if matches!(response.status().as_u16(), 401 | 403) =>
            {
                Err(anyhow!(ConnectError::Refused(response.status().as_u16())))
            }
            Err(error) => match tls_failure(&error) {
                Some(detail) => Err(anyhow!(ConnectError::Tls(detail))),
                None => Err(anyhow!(error).context(format!("connecting to {url}"))),
            },
        }
    }
}

/// Dials the core, retrying network failures with backoff; a refused token is final.
pub async fn connect(config: &AgentConfig, shutdown: &CancellationToken) -> anyhow::Result<Socket> {
    Ok(connect_with(&Dialer::new(config)?, config, shutdown)
        .await?
        .0)
}

/// [`connect`] with a dialer the caller keeps (to dial again later).
pub async fn connect_with(
    dialer: &Dialer,
    config: &AgentConfig,
    shutdown: &CancellationToken,
) -> anyhow::Result<(Socket, Codec)> {
    use backon::{ExponentialBuilder, Retryable};
    let attempt = || dialer.dial_once();
    // Network failures are retried until the core has been unreachable for
    // `core_unreachable_secs`; then the agent exits and its unit powers the instance off.
    let unreachable = Duration::from_secs(
        config
            .core_unreachable_secs
            .unwrap_or(stagely_cloud_init::DEFAULT_CORE_UNREACHABLE_SECS),
    );
    let last_error = std::sync::Mutex::new(None::<String>);
    let retried = attempt
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(200))
                .with_max_delay(Duration::from_secs(10))
                .without_max_times()
                .with_jitter(),
        )
        .when(|error: &anyhow::Error| error.downcast_ref::<ConnectError>().is_none())
        .notify(|error, delay| {
            tracing::warn!("connecting to the core failed, retrying in {delay:?}: {error:#}");
            if let Ok(mut last) = last_error.lock() {
                *last = Some(format!("{error:#}"));
            }
        });
    tokio::select! {
        result = tokio::time::timeout(unreachable, retried) => match result {
            Ok(result) => result,
            Err(_) => {
                let last = last_error.lock().ok().and_then(|mut last| last.take());
                Err(anyhow!(ConnectError::Unreachable {
                    after: unreachable,
                    last: last.unwrap_or_else(|| "no answer".into()),
                }))
            }
        },
        () = shutdown.cancelled() => bail!("shut down before connecting"),
    }
}
