//! The EC2 fleet end to end, through the `ec2` provider and moto's EC2 API server: the core
//! launches instances in moto (through a fault-injecting proxy), a harness plays EC2's
//! hypervisor (boots each instance's user-data in its own network namespace on 192.0.2.0/24,
//! serves IMDSv2), agents dial the core over TLS across that network, build with buildah and
//! push to a registry on the same network. See `stagely_tests::ec2`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use stagely_core::registry::LocalRegistry;
use stagely_provisioning::ec2::{Ec2Provider, Ec2Settings};
use stagely_server::config::{FileConfig, TlsFile};
use stagely_tests::ec2::*;
use stagely_tests::*;

const RUN_TIMEOUT: Duration = Duration::from_secs(240);

struct Fleet {
    core: TestCore,
    hypervisor: Hypervisor,
    proxy: FaultProxy,
    moto: MotoServer,
    imds: Imds,
    _network: Arc<Network>,
    _pki: tempfile::TempDir,
}

/// Everything up, the provider configured by `settings` and the core's file by `configure`.
async fn fleet(
    settings: impl FnOnce(&mut Ec2Settings),
    configure: impl FnOnce(&mut FileConfig),
) -> Option<Fleet> {
    if !require_build_peers() {
        return None;
    }
    let moto = MotoServer::start().await?;
    let network = Arc::new(Network::create().await?);
    let imds = Imds::start().await;
    let proxy = FaultProxy::start(&moto.url).await;
    let hypervisor = Hypervisor::start(&moto.url, network.clone(), imds.clone(), agent_binary());

    let pki = tempfile::tempdir().unwrap();
    let (cert_file, key_file, ca_file, _) = issue_pki(pki.path());

    let mut ec2 = Ec2Settings {
        ami_amd64: Some(MOTO_AMI_AMD64.into()),
        ami_arm64: Some(MOTO_AMI_ARM64.into()),
        metadata_url: Some(imds.url.clone()),
        ..Ec2Settings::default()
    };
    settings(&mut ec2);
    let provider = Arc::new(Ec2Provider::with_client(ec2_client(&proxy.url), ec2));
    let registry = LocalRegistry::start_on(&HOST_IP.to_string()).await.unwrap();
    let core = TestCore::start_on_network(provider, registry, &HOST_IP.to_string(), |file| {
        file.tls = TlsFile {
            cert_file: Some(cert_file),
            key_file: Some(key_file),
            agent_ca_file: Some(ca_file),
            behind_proxy: None,
        };
        file.registry.insecure = Some(true);
        file.scheduler.retry_backoff_secs = Some(1);
        configure(file);
    })
    .await
    .unwrap();
    Some(Fleet {
        core,
        hypervisor,
        proxy,
        moto,
        imds,
        _network: network,
        _pki: pki,
    })
}

/// The core's certificate for its test-network address, from a CA the builders learn from
/// user-data: (cert file, key file, CA file, CA PEM).
fn issue_pki(dir: &std::path::Path) -> (PathBuf, PathBuf, PathBuf, String) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec![HOST_IP.to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let (cert_file, key_file, ca_file) = (
        dir.join("core.crt"),
        dir.join("core.key"),
        dir.join("ca.pem"),
    );
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    std::fs::write(&ca_file, ca.pem()).unwrap();
    (cert_file, key_file, ca_file, ca.pem())
}

/// Instances moto still has pending or running for `run_id`.
async fn live_in_moto(moto: &str, run_id: &str) -> Vec<String> {
    let out = ec2_client(moto)
        .describe_instances()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("tag:stagely:run")
                .values(run_id)
                .build(),
        )
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("instance-state-name")
                .values("pending")
                .values("running")
                .build(),
        )
        .send()
        .await
        .unwrap();
    out.reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter_map(|i| i.instance_id().map(str::to_string))
        .collect()
}

async fn wait_no_instances(moto: &str, run_id: &str) {
    poll_until(
        Duration::from_secs(30),
        "no live instance in moto",
        || async {
            let live = live_in_moto(moto, run_id).await;
            Ok((
                live.is_empty().then_some(()),
                format!("still live: {live:?}"),
            ))
        },
    )
    .await;
}

impl Fleet {
    async fn wait_no_instances(&self, run_id: &str) {
        wait_no_instances(&self.moto.url, run_id).await;
    }

    /// Every job's error and log, and every instance's agent log, for a failure message.
    async fn diagnose(&self, run: &stagely_api::RunView) -> String {
        let mut out = String::new();
        for job in &run.jobs {
            if let Ok(lines) = self.core.logs(&job.id).await {
                for (stream, line) in lines.iter().rev().take(15).rev() {
                    out.push_str(&format!("  [{} {stream}] {line}", job.name));
                }
            }
            out.push_str(&format!(
                "job {} {}: {:?}\n  attempts: {:?}\n",
                job.name,
                job.status,
                job.error_message,
                job.attempts
                    .iter()
                    .map(|a| (a.number, a.message.clone()))
                    .collect::<Vec<_>>()
            ));
        }
        for launch in self.hypervisor.launches() {
            out.push_str(&format!(
                "--- agent log of {} ({:?}):\n{}\n",
                launch.instance_id,
                launch.tags.get("stagely:job"),
                self.hypervisor.agent_log(&launch.instance_id)
            ));
        }
        out.push_str(&format!(
            "hypervisor errors: {:?}\n",
            self.hypervisor.errors()
        ));
        out
    }

    async fn finish(self) {
        let Fleet {
            mut core,
            hypervisor,
            ..
        } = self;
        let errors = hypervisor.errors();
        hypervisor.shut_down().await;
        core.stop().await;
        assert!(errors.is_empty(), "the hypervisor met: {errors:?}");
    }
}

/// Every launch was locked down, tagged and carried valid user-data.
fn check_launches(launches: &[Launch], run_id: &str) {
    assert!(!launches.is_empty());
    for launch in launches {
        let id = &launch.instance_id;
        assert!(launch.http_tokens_required, "{id}: IMDSv2 not required");
        assert_eq!(launch.hop_limit, Some(1), "{id}: hop limit");
        assert!(launch.terminate_on_shutdown, "{id}: shutdown behaviour");
        assert_eq!(launch.schema, Ok(()), "{id}: cloud-init schema");
        for key in [
            "stagely:managed",
            "stagely:core",
            "stagely:run",
            "stagely:job",
            "stagely:attempt",
            "Name",
        ] {
            assert!(launch.tags.contains_key(key), "{id}: no tag {key}");
        }
        assert_eq!(launch.tags["stagely:run"], run_id);
        assert!(
            launch.user_data.contains("/etc/stagely/ca.pem"),
            "{id}: the CA travels in user-data"
        );
    }
}

/// One amd64 job copying one file.
fn one_job_repo() -> TestRepo {
    TestRepo::with_files(&[
        (
            "stagely.yaml",
            b"builds:\n  api:\n    context: .\n    platform: linux/amd64\n",
        ),
        ("Dockerfile", b"FROM scratch\nCOPY a.txt /a.txt\n"),
        ("a.txt", b"a\n"),
    ])
    .unwrap()
}

/// The example monorepo, and its `stagely.yaml` with a multi-arch service added.
fn example_with_multi_arch() -> (TestRepo, String) {
    let dir = workspace_root().join("examples/monorepo");
    let repo = TestRepo::from_dir(&dir).unwrap();
    let mut yaml = std::fs::read_to_string(dir.join("stagely.yaml")).unwrap();
    yaml.push_str(
        "  web_multi:\n    context: \"./web\"\n    platforms: [\"linux/amd64\", \"linux/arm64\"]\n    machine: \"small\"\n",
    );
    (repo, yaml)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_example_monorepo_with_a_multi_arch_service_builds_on_ec2_and_leaves_no_instance() {
    let Some(fleet) = fleet(|_| {}, |_| {}).await else {
        return;
    };
    let (repo, yaml) = example_with_multi_arch();
    let run = fleet
        .core
        .submit(&repo, Some(&yaml), "pr-ec2")
        .await
        .unwrap();
    let run = fleet.core.wait_finished(&run.id, RUN_TIMEOUT).await;
    let names: BTreeMap<&str, &str> = run
        .jobs
        .iter()
        .map(|j| (j.name.as_str(), j.status.as_str()))
        .collect();
    assert_eq!(
        run.status,
        "completed",
        "{names:?}\n{}",
        fleet.diagnose(&run).await
    );
    // backend_amd64, worker_arm64, frontend, web_multi on each platform and its merge.
    assert_eq!(names.len(), 6, "{names:?}");
    fleet.wait_no_instances(&run.id).await;

    let launches = fleet.hypervisor.launches();
    check_launches(&launches, &run.id);
    let images: Vec<&str> = launches.iter().map(|l| l.image_id.as_str()).collect();
    assert!(images.contains(&MOTO_AMI_ARM64) && images.contains(&MOTO_AMI_AMD64));
    // Costs: every attempt ran on a priced type, on-demand, for at least a minute.
    for job in &run.jobs {
        for attempt in &job.attempts {
            assert_eq!(attempt.market.as_deref(), Some("on-demand"), "{}", job.name);
            assert!(attempt.instance_type.is_some(), "{}", job.name);
        }
    }
    let view = fleet.core.run(&run.id).await.unwrap();
    assert!(
        view.cost_usd.is_some_and(|usd| usd > 0.0),
        "{:?}",
        view.cost_usd
    );
    let (tokens, reads) = fleet.imds.reads();
    assert!(
        tokens > 0 && reads > 0,
        "agents watched for spot notices via IMDSv2"
    );
    fleet.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spot_without_capacity_falls_back_to_on_demand_and_the_log_says_so() {
    let Some(fleet) = fleet(|ec2| ec2.spot = true, |_| {}).await else {
        return;
    };
    fleet.proxy.refuse_spot.store(true, Ordering::SeqCst);
    let repo = one_job_repo();
    let run = fleet.core.submit(&repo, None, "pr-spot").await.unwrap();
    let run = fleet.core.wait_finished(&run.id, RUN_TIMEOUT).await;
    let job = &run.jobs[0];
    assert_eq!(run.status, "completed", "{:?}", job.error_message);
    assert!(fleet.proxy.refused.load(Ordering::SeqCst) >= 1);
    let launches = fleet.hypervisor.launches();
    assert!(launches.iter().all(|l| !l.spot), "only on-demand started");
    check_launches(&launches, &run.id);
    assert_eq!(job.attempts.len(), 1, "the fallback is not a retry");
    assert_eq!(job.attempts[0].market.as_deref(), Some("on-demand"));
    let placement = job.attempts[0].placement.clone().unwrap_or_default();
    assert!(
        placement.contains("InsufficientInstanceCapacity"),
        "{placement}"
    );
    let log = fleet.core.logs(&job.id).await.unwrap();
    let first = &log[0].1;
    assert!(
        first.contains("on-demand") && first.contains("spot"),
        "the job log says which ran: {first}"
    );
    fleet.wait_no_instances(&run.id).await;
    fleet.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_spot_interruption_retries_the_job_on_demand_and_the_run_completes() {
    let Some(fleet) = fleet(|ec2| ec2.spot = true, |_| {}).await else {
        return;
    };
    fleet.hypervisor.interrupt_next_spot(1);
    let repo = one_job_repo();
    let run = fleet
        .core
        .submit(&repo, None, "pr-interrupt")
        .await
        .unwrap();
    let run = fleet.core.wait_finished(&run.id, RUN_TIMEOUT).await;
    let job = &run.jobs[0];
    assert_eq!(run.status, "completed", "{:?}", job.error_message);
    assert_eq!(job.attempts.len(), 2, "{:?}", job.attempts);
    let first = &job.attempts[0];
    assert_eq!(first.market.as_deref(), Some("spot"));
    assert_eq!(first.outcome.as_deref(), Some("infrastructure"));
    assert!(
        first
            .message
            .as_deref()
            .unwrap_or("")
            .starts_with("spot_interrupted"),
        "{:?}",
        first.message
    );
    assert_eq!(
        job.attempts[1].market.as_deref(),
        Some("on-demand"),
        "never spot again"
    );
    let launches = fleet.hypervisor.launches();
    assert_eq!(launches.iter().filter(|l| l.spot).count(), 1);
    check_launches(&launches, &run.id);
    fleet.wait_no_instances(&run.id).await;
    fleet.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_instance_whose_agent_never_dials_is_terminated_at_the_boot_timeout_and_retried() {
    let Some(fleet) = fleet(
        |_| {},
        |file| file.scheduler.agent_connect_timeout_secs = Some(4),
    )
    .await
    else {
        return;
    };
    fleet.hypervisor.hold_next(1);
    let repo = one_job_repo();
    let run = fleet.core.submit(&repo, None, "pr-boot").await.unwrap();
    let run = fleet.core.wait_finished(&run.id, RUN_TIMEOUT).await;
    let job = &run.jobs[0];
    assert_eq!(run.status, "completed", "{:?}", job.error_message);
    assert_eq!(job.attempts.len(), 2);
    assert!(
        job.attempts[0]
            .message
            .as_deref()
            .unwrap_or("")
            .starts_with("boot_timeout"),
        "{:?}",
        job.attempts[0].message
    );
    let launches = fleet.hypervisor.launches();
    assert!(!launches[0].booted, "the first instance never booted");
    check_launches(&launches, &run.id);
    fleet.wait_no_instances(&run.id).await;
    fleet.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bad_ami_fails_the_job_at_once_naming_the_aws_error() {
    let Some(fleet) = fleet(
        |ec2| ec2.ami_amd64 = Some("ami-00000000deadbeef0".into()),
        |_| {},
    )
    .await
    else {
        return;
    };
    let repo = one_job_repo();
    let run = fleet.core.submit(&repo, None, "pr-ami").await.unwrap();
    let run = fleet.core.wait_finished(&run.id, RUN_TIMEOUT).await;
    let job = &run.jobs[0];
    assert_eq!(run.status, "failed");
    assert_eq!(job.failure_kind.as_deref(), Some("infrastructure"));
    let message = job.error_message.as_deref().unwrap_or("");
    assert!(message.contains("InvalidAMIID.NotFound"), "{message}");
    assert_eq!(job.attempts.len(), 1, "not retried: {:?}", job.attempts);
    assert!(
        fleet.hypervisor.launches().is_empty(),
        "nothing was launched"
    );
    fleet.finish().await;
}

/// `stagely serve` with the `ec2` provider, as an operator runs it, on the test network.
fn spawn_serve_ec2(
    port: u16,
    data: &std::path::Path,
    config: &std::path::Path,
    moto: &str,
    registry: &LocalRegistry,
    api_token: &str,
) -> std::process::Child {
    std::process::Command::new(agent_binary().with_file_name("stagely"))
        .args(["serve", "--listen", &format!("{HOST_IP}:{port}")])
        .args(["--registry", &registry.host])
        .arg("--config")
        .arg(config)
        .arg("--data-dir")
        .arg(data)
        // The SDK's standard environment, pointed at moto.
        .env("AWS_ENDPOINT_URL_EC2", moto)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("STAGELY_REGISTRY_USERNAME", &registry.username)
        .env("STAGELY_REGISTRY_PASSWORD", &registry.password)
        .env("STAGELY_API_TOKEN", api_token)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(data.join("serve.log"))
                .map(std::process::Stdio::from)
                .unwrap_or_else(|_| std::process::Stdio::null()),
        )
        .spawn()
        .expect("stagely serve starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_core_sigkilled_mid_run_and_restarted_leaves_no_orphan_instance() {
    if !require_build_peers() {
        return;
    }
    let Some(moto) = MotoServer::start().await else {
        return;
    };
    let Some(network) = Network::create().await else {
        return;
    };
    let network = Arc::new(network);
    let imds = Imds::start().await;
    let hypervisor = Hypervisor::start(&moto.url, network.clone(), imds.clone(), agent_binary());
    let registry = LocalRegistry::start_on(&HOST_IP.to_string()).await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let (cert_file, key_file, ca_file, ca_pem) = issue_pki(data.path());
    let port = std::net::TcpListener::bind((HOST_IP, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("https://{HOST_IP}:{port}");
    let config = data.path().join("stagely.toml");
    std::fs::write(
        &config,
        format!(
            "core_id = \"crashy\"\npublic_url = \"{url}\"\nallow_local_repos = true\n\
             [registry]\ninsecure = true\n\
             [tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nagent_ca_file = \"{}\"\n\
             [provider]\nkind = \"ec2\"\n\
             [provider.ec2]\nami_amd64 = \"{MOTO_AMI_AMD64}\"\nami_arm64 = \"{MOTO_AMI_ARM64}\"\nmetadata_url = \"{}\"\n\
             [scheduler]\nagent_connect_timeout_secs = 120\nretry_backoff_secs = 1\nlease_secs = 5\nreap_interval_secs = 2\n",
            cert_file.display(),
            key_file.display(),
            ca_file.display(),
            imds.url
        ),
    )
    .unwrap();
    let api_token = stagely_core::cli::new_api_token();
    let client = client_trusting(&api_token, Some(&ca_pem));
    let healthy = || async {
        poll_until(Duration::from_secs(30), "the core to serve", || async {
            let ok = client
                .get(format!("{url}/healthz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            Ok((ok.then_some(()), "not answering".into()))
        })
        .await
    };
    let mut core = spawn_serve_ec2(port, data.path(), &config, &moto.url, &registry, &api_token);
    healthy().await;

    // The first instance never boots: only a core can terminate it.
    hypervisor.hold_next(1);
    let repo = one_job_repo();
    let run: stagely_api::RunView = client
        .post(format!("{url}/api/v1/workflows"))
        .json(&serde_json::json!({
            "repo_url": repo.url(), "commit_hash": repo.commit, "branch": "main",
            "environment_id": "pr-crash",
        }))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    let held = poll_until(Duration::from_secs(30), "the first launch", || async {
        let launches = hypervisor.launches();
        Ok((
            launches.first().map(|l| l.instance_id.clone()),
            "no launch yet".into(),
        ))
    })
    .await;
    // Recorded (the API shows the attempt's instance), then the core dies.
    poll_until(Duration::from_secs(30), "the instance recorded", || async {
        let view: stagely_api::RunView = client
            .get(format!("{url}/api/v1/workflows/{}", run.id))
            .send()
            .await?
            .json()
            .await?;
        let recorded = view.jobs[0]
            .attempts
            .iter()
            .any(|a| a.instance_id.as_deref() == Some(held.as_str()));
        Ok((recorded.then_some(()), "not recorded yet".into()))
    })
    .await;
    core.kill().unwrap();
    core.wait().unwrap();
    assert_eq!(
        live_in_moto(&moto.url, &run.id).await,
        std::slice::from_ref(&held)
    );

    let mut core = spawn_serve_ec2(port, data.path(), &config, &moto.url, &registry, &api_token);
    healthy().await;
    let finished = poll_until(RUN_TIMEOUT, "the run to finish", || async {
        let view: stagely_api::RunView = client
            .get(format!("{url}/api/v1/workflows/{}", run.id))
            .send()
            .await?
            .json()
            .await?;
        let done = matches!(view.status.as_str(), "completed" | "failed");
        let status = view.status.clone();
        Ok((done.then_some(view), status))
    })
    .await;
    let job = &finished.jobs[0];
    assert_eq!(
        finished.status,
        "completed",
        "{:?} {:?}",
        job.error_message,
        job.attempts
            .iter()
            .map(|a| a.message.clone())
            .collect::<Vec<_>>()
    );
    assert!(job.attempts.len() >= 2, "the crashed attempt was retried");
    wait_no_instances(&moto.url, &run.id).await;
    let errors = hypervisor.errors();
    core.kill().unwrap();
    core.wait().unwrap();
    hypervisor.shut_down().await;
    assert!(errors.is_empty(), "{errors:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_builder_whose_network_link_dies_mid_stream_resumes_and_loses_no_line() {
    use stagely_tests::counting::{assert_exact, counting_repo_holding, numbered};
    // A network test: the suite's PostgreSQL pass would only repeat it (the storage side of
    // resuming runs on both backends in e2e_reconnect.rs).
    if testing_postgres() {
        return;
    }
    // The link stays dead past the core's heartbeat timeout (30 s, the shortest allowed):
    // the core drops its side; once the link is back the agent's connection is reset, and
    // it dials again and resumes.
    let Some(fleet) = fleet(
        |_| {},
        |file| file.scheduler.heartbeat_timeout_secs = Some(30),
    )
    .await
    else {
        return;
    };
    // The agent keeps taking output while the link is dead (the spool absorbs it), so the
    // build prints everything in about 8 s; it then holds until well after the link is back,
    // or its push (which needs the network) would fail the build.
    let repo = counting_repo_holding(50);
    let run = fleet.core.submit(&repo, None, "pr-link").await.unwrap();
    let job_id = run.jobs[0].id.clone();
    poll_until(
        Duration::from_secs(120),
        "a couple thousand lines",
        || async {
            let lines: Vec<(i64, String)> =
                all_log_lines(&fleet.core.client, &fleet.core.url, &job_id)
                    .await?
                    .into_iter()
                    .map(|l| (l.seq, l.line))
                    .collect();
            let count = numbered(&lines).len();
            let view = fleet.core.run(&run.id).await?;
            if view.status != "building" {
                panic!("the run ended early: {}", fleet.diagnose(&view).await);
            }
            Ok(((count >= 2000).then_some(()), format!("{count} lines")))
        },
    )
    .await;
    let instance = fleet.hypervisor.launches()[0].instance_id.clone();
    fleet.hypervisor.set_link(&instance, false).unwrap();
    tokio::time::sleep(Duration::from_secs(35)).await;
    fleet.hypervisor.set_link(&instance, true).unwrap();
    let view = fleet.core.wait_finished(&run.id, RUN_TIMEOUT).await;
    assert_eq!(view.status, "completed", "{}", fleet.diagnose(&view).await);
    let job = &view.jobs[0];
    assert_eq!(
        job.attempts.len(),
        1,
        "the build restarted: {:?}",
        job.attempts
    );
    let agent_log = fleet.hypervisor.agent_log(&instance);
    assert!(
        agent_log.contains("reconnected to the core"),
        "the link cut did not break the connection, so this proves little:\n{agent_log}"
    );
    let stored: Vec<(i64, String)> = all_log_lines(&fleet.core.client, &fleet.core.url, &job_id)
        .await
        .unwrap()
        .into_iter()
        .map(|l| (l.seq, l.line))
        .collect();
    assert_exact(&stored);
    fleet.wait_no_instances(&run.id).await;
    fleet.finish().await;
}
