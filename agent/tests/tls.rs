//! The agent dials a `wss://` core it trusts through `ca_file`, sending its bearer token, and
//! refuses (without retrying) a core whose certificate it cannot verify.

// tungstenite's handshake callback signature returns a large `Err` type; not ours to change.
#![allow(clippy::result_large_err)]

use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use stagely_agent::connection::{ConnectError, connect};
use stagely_cloud_init::AgentConfig;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_util::sync::CancellationToken;

struct TlsCore {
    port: u16,
    ca_pem: String,
    authorization: Arc<Mutex<Option<String>>>,
    first_frame: tokio::sync::oneshot::Receiver<String>,
}

async fn tls_core() -> TlsCore {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server_cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&server_key, &ca)
        .unwrap();
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(server_cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let authorization = Arc::new(Mutex::new(None));
    let seen = authorization.clone();
    let (frame_tx, first_frame) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut frame_tx = Some(frame_tx);
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let Ok(tls) = acceptor.accept(tcp).await else {
                continue;
            };
            let seen = seen.clone();
            let callback = move |request: &Request, response: Response| {
                *seen.lock().unwrap() = request
                    .headers()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                Ok(response)
            };
            let Ok(mut socket) = tokio_tungstenite::accept_hdr_async(tls, callback).await else {
                continue;
            };
            if let Some(Ok(message)) = socket.next().await
                && let Some(tx) = frame_tx.take()
            {
                let _ = tx.send(message.to_text().unwrap_or_default().to_string());
            }
        }
    });
    TlsCore {
        port,
        ca_pem: ca.pem(),
        authorization,
        first_frame,
    }
}

fn config(port: u16, ca_file: Option<std::path::PathBuf>) -> AgentConfig {
    AgentConfig {
        ca_file,
        ..AgentConfig::new(format!("https://localhost:{port}"), "stg_tls_test_token")
    }
}

#[tokio::test]
async fn trusted_through_ca_file_and_sends_the_bearer_token() {
    let core = tls_core().await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &core.ca_pem).unwrap();
    let mut socket = connect(&config(core.port, Some(ca_file)), &CancellationToken::new())
        .await
        .expect("wss connection with the CA from ca_file");
    assert_eq!(
        core.authorization.lock().unwrap().as_deref(),
        Some("Bearer stg_tls_test_token")
    );
    use futures_util::SinkExt;
    socket
        .send(tokio_tungstenite::tungstenite::Message::text(
            "{\"type\":\"HEARTBEAT\"}",
        ))
        .await
        .unwrap();
    assert_eq!(core.first_frame.await.unwrap(), "{\"type\":\"HEARTBEAT\"}");
}

#[tokio::test]
async fn an_untrusted_certificate_fails_at_once_without_retries() {
    let core = tls_core().await;
    let started = std::time::Instant::now();
    let Err(error) = connect(&config(core.port, None), &CancellationToken::new()).await else {
        panic!("an unknown CA must be refused");
    };
    assert!(
        matches!(
            error.downcast_ref::<ConnectError>(),
            Some(ConnectError::Tls(_))
        ),
        "{error:#}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "it retried"
    );
    assert!(
        core.authorization.lock().unwrap().is_none(),
        "the token was sent to an untrusted peer"
    );
}

#[tokio::test]
async fn a_ca_file_without_certificates_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("empty.pem");
    std::fs::write(&ca_file, "not a certificate\n").unwrap();
    let Err(error) = connect(&config(1, Some(ca_file.clone())), &CancellationToken::new()).await
    else {
        panic!("an empty ca_file must be refused");
    };
    assert!(format!("{error:#}").contains("empty.pem"), "{error:#}");
}

#[tokio::test]
async fn an_unreachable_core_is_given_up_after_core_unreachable_secs() {
    // A port nothing listens on: every dial is refused, and retried until the limit.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = config(port, None);
    config.core_url = format!("http://127.0.0.1:{port}");
    config.core_unreachable_secs = Some(2);
    let started = std::time::Instant::now();
    let Err(error) = connect(&config, &CancellationToken::new()).await else {
        panic!("connected to nothing");
    };
    let waited = started.elapsed();
    assert!(
        matches!(
            error.downcast_ref::<ConnectError>(),
            Some(ConnectError::Unreachable { .. })
        ),
        "{error:#}"
    );
    assert!(
        waited >= std::time::Duration::from_secs(2) && waited < std::time::Duration::from_secs(15),
        "gave up after {waited:?}"
    );
    let shown = format!("{error:#}");
    assert!(shown.contains("core_unreachable_secs"), "{shown}");
    assert!(!shown.contains("stg_tls_test_token"), "{shown}");
}
