//! `stagely serve` speaking TLS itself: the API and the agent endpoint on https/wss with the
//! `[tls]` certificate, the CA agents should trust delivered in their user-data (the agent
//! dials `wss://` and checks the core's certificate against it), plain HTTP refused on the
//! TLS port, and the certificate replaced in place on SIGHUP (a failed reload keeps the old).
//!
//! One test per binary: it raises SIGHUP in its own process.

use std::path::Path;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use stagely_server::config::TlsFile;
use stagely_tests::*;

const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// A CA and a server certificate for `127.0.0.1`/`localhost` it signed, written as
/// `<name>-ca.pem`, `<name>.crt`, `<name>.key`.
fn issue(dir: &Path, name: &str) -> String {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    std::fs::write(dir.join(format!("{name}-ca.pem")), ca.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    ca.pem()
}

/// Whether a client trusting only `ca_pem` completes a request to `url`.
async fn trusted_by(url: &str, ca_pem: &str) -> bool {
    client_trusting("unused", Some(ca_pem))
        .get(format!("{url}/healthz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_core_serves_tls_agents_trust_it_through_user_data_and_sighup_reloads_it() {
    if !require_build_peers() {
        return;
    }
    let pki = tempfile::tempdir().unwrap();
    let first_ca = issue(pki.path(), "first");
    let second_ca = issue(pki.path(), "second");
    // The files the core serves start as the first pair.
    let cert_file = pki.path().join("core.crt");
    let key_file = pki.path().join("core.key");
    std::fs::copy(pki.path().join("first.crt"), &cert_file).unwrap();
    std::fs::copy(pki.path().join("first.key"), &key_file).unwrap();

    let mut core = TestCore::start_configured(|file| {
        file.tls = TlsFile {
            cert_file: Some(cert_file.clone()),
            key_file: Some(key_file.clone()),
            agent_ca_file: Some(pki.path().join("first-ca.pem")),
            behind_proxy: None,
        };
    })
    .await
    .unwrap();
    assert!(core.url.starts_with("https://"), "{}", core.url);

    // Plain HTTP on the TLS port gets no answer.
    let plain = reqwest::Client::new()
        .get(format!(
            "{}/healthz",
            core.url.replace("https://", "http://")
        ))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(
        !plain.is_ok_and(|r| r.status() == 200),
        "plain HTTP was served"
    );
    assert!(trusted_by(&core.url, &first_ca).await);
    assert!(
        !trusted_by(&core.url, &second_ca).await,
        "wrong CA accepted"
    );

    // A real build: the agent reads the CA from its user-data and dials wss://.
    let repo = TestRepo::with_files(&[
        (
            "stagely.yaml",
            b"builds:\n  web:\n    context: .\n    platform: linux/amd64\n",
        ),
        ("Dockerfile", b"FROM scratch\nCOPY hello.txt /hello.txt\n"),
        ("hello.txt", b"hello over tls\n"),
    ])
    .unwrap();
    let run = core.submit(&repo, None, "pr-tls").await.unwrap();
    let run = core.wait_finished(&run.id, RUN_TIMEOUT).await;
    let web = &run.jobs[0];
    assert_eq!(run.status, "completed", "{:?}", web.error_message);
    assert!(web.digest.is_some());

    // A broken replacement is refused; the first certificate stays in use.
    std::fs::write(&cert_file, "not a certificate").unwrap();
    nix::sys::signal::raise(nix::sys::signal::Signal::SIGHUP).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        trusted_by(&core.url, &first_ca).await,
        "a failed reload dropped the certificate"
    );

    // The second pair, then SIGHUP: new handshakes get it.
    std::fs::copy(pki.path().join("second.crt"), &cert_file).unwrap();
    std::fs::copy(pki.path().join("second.key"), &key_file).unwrap();
    nix::sys::signal::raise(nix::sys::signal::Signal::SIGHUP).unwrap();
    let url = core.url.clone();
    poll_until(Duration::from_secs(10), "the new certificate", || {
        let url = url.clone();
        let second_ca = second_ca.clone();
        async move {
            let now = trusted_by(&url, &second_ca).await;
            Ok((now.then_some(()), "still the old certificate".into()))
        }
    })
    .await;
    assert!(!trusted_by(&core.url, &first_ca).await);
    core.stop().await;
}
