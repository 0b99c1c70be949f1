//! The `ec2` provider against a real EC2 API peer: moto's server (`moto[server]`, installed by
//! `scripts/setup.sh`), started on a free loopback port per test ([`MotoServer`]). In CI a
//! missing moto fails; elsewhere the tests skip, saying why.

use std::collections::BTreeMap;

use aws_sdk_ec2::Client;
use base64::Engine as _;
use stagely_provisioning::ec2::{ClassSettings, Ec2Provider, Ec2Settings, ErrorClass};
use stagely_provisioning::{
    Arch, InstanceState, MachineSize, MachineSpec, Market, Provider, ProviderError,
};
use stagely_tests::ec2::{MOTO_AMI_AMD64, MOTO_AMI_ARM64, MotoServer, ec2_client};

const AMI_AMD64: &str = MOTO_AMI_AMD64;
const AMI_ARM64: &str = MOTO_AMI_ARM64;

async fn moto() -> Option<MotoServer> {
    MotoServer::start().await
}

fn client(moto: &MotoServer) -> Client {
    ec2_client(&moto.url)
}

fn settings() -> Ec2Settings {
    Ec2Settings {
        ami_amd64: Some(AMI_AMD64.into()),
        ami_arm64: Some(AMI_ARM64.into()),
        ..Ec2Settings::default()
    }
}

fn spec(job: &str, attempt: u32, arch: Arch, size: MachineSize) -> MachineSpec {
    MachineSpec {
        size,
        arch,
        user_data: format!("#cloud-config\n# job {job}\n"),
        tags: BTreeMap::from([
            ("stagely:core".to_string(), "core-a".to_string()),
            ("stagely:run".to_string(), "run-1".to_string()),
            ("stagely:job".to_string(), job.to_string()),
            ("stagely:attempt".to_string(), attempt.to_string()),
        ]),
        on_demand_only: false,
    }
}

/// One instance as EC2 describes it.
async fn described(client: &Client, id: &str) -> aws_sdk_ec2::types::Instance {
    let out = client
        .describe_instances()
        .instance_ids(id)
        .send()
        .await
        .unwrap();
    out.reservations()[0].instances()[0].clone()
}

/// Every instance moto holds, whatever its state: (id, state).
async fn all_instances(client: &Client) -> Vec<(String, String)> {
    let out = client.describe_instances().send().await.unwrap();
    out.reservations()
        .iter()
        .flat_map(|r| r.instances())
        .map(|i| {
            (
                i.instance_id().unwrap().to_string(),
                i.state()
                    .and_then(|s| s.name())
                    .unwrap()
                    .as_str()
                    .to_string(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_launch_is_tagged_locked_down_and_carries_its_user_data() {
    let Some(moto) = moto().await else { return };
    let client = client(&moto);
    let provider = Ec2Provider::with_client(client.clone(), settings());
    let wanted = spec("job-1", 1, Arch::Amd64, MachineSize::Medium);
    let instance = provider.create_instance(&wanted).await.unwrap();
    assert_eq!(instance.instance_type, "c5.xlarge", "the design's table");
    assert_eq!(instance.host_arch, Arch::Amd64);
    assert!(!instance.emulated);
    assert_eq!(instance.market, Some(Market::OnDemand));

    let launched = described(&client, &instance.id).await;
    let tags: BTreeMap<&str, &str> = launched
        .tags()
        .iter()
        .map(|t| (t.key().unwrap(), t.value().unwrap()))
        .collect();
    for (key, value) in [
        ("stagely:managed", "true"),
        ("stagely:core", "core-a"),
        ("stagely:run", "run-1"),
        ("stagely:job", "job-1"),
        ("stagely:attempt", "1"),
        ("Name", "stagely-builder job-1 #1"),
    ] {
        assert_eq!(tags.get(key), Some(&value), "tag {key}");
    }
    let metadata = launched.metadata_options().expect("metadata options");
    assert_eq!(
        metadata.http_tokens().map(|t| t.as_str()),
        Some("required"),
        "IMDSv2 only"
    );
    assert_eq!(
        metadata.http_put_response_hop_limit(),
        Some(1),
        "hop limit 1"
    );
    assert_eq!(launched.image_id(), Some(AMI_AMD64));

    let user_data = client
        .describe_instance_attribute()
        .instance_id(&instance.id)
        .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
        .send()
        .await
        .unwrap();
    let encoded = user_data.user_data().and_then(|v| v.value()).unwrap();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .unwrap();
    assert_eq!(String::from_utf8(decoded).unwrap(), wanted.user_data);
    let shutdown = client
        .describe_instance_attribute()
        .instance_id(&instance.id)
        .attribute(aws_sdk_ec2::types::InstanceAttributeName::InstanceInitiatedShutdownBehavior)
        .send()
        .await
        .unwrap();
    assert_eq!(
        shutdown
            .instance_initiated_shutdown_behavior()
            .and_then(|v| v.value()),
        Some("terminate")
    );
    // The volumes carry the tags too.
    let volumes = client
        .describe_volumes()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("tag:stagely:job")
                .values("job-1")
                .build(),
        )
        .send()
        .await
        .unwrap();
    assert!(!volumes.volumes().is_empty(), "the root volume is tagged");
}

#[tokio::test]
async fn one_attempt_never_starts_two_instances() {
    let Some(moto) = moto().await else { return };
    let client = client(&moto);
    let provider = Ec2Provider::with_client(client.clone(), settings());
    let first = provider
        .create_instance(&spec("job-2", 1, Arch::Amd64, MachineSize::Small))
        .await
        .unwrap();
    // The core died before recording the id and asks again: the same instance.
    let again = provider
        .create_instance(&spec("job-2", 1, Arch::Amd64, MachineSize::Small))
        .await
        .unwrap();
    assert_eq!(first.id, again.id);
    assert_eq!(all_instances(&client).await.len(), 1);
    // The next attempt gets its own.
    let next = provider
        .create_instance(&spec("job-2", 2, Arch::Amd64, MachineSize::Small))
        .await
        .unwrap();
    assert_ne!(next.id, first.id);
    assert_eq!(all_instances(&client).await.len(), 2);
}

#[tokio::test]
async fn arm64_runs_on_arm64_or_emulated_only_when_allowed() {
    let Some(moto) = moto().await else { return };
    let client = client(&moto);
    let provider = Ec2Provider::with_client(client.clone(), settings());
    let arm = provider
        .create_instance(&spec("job-3", 1, Arch::Arm64, MachineSize::Large))
        .await
        .unwrap();
    assert_eq!(arm.host_arch, Arch::Arm64, "from the arm64 AMI");
    assert_eq!(arm.instance_type, "c6g.2xlarge");
    assert!(arm.notice.is_none());

    let no_arm_ami = Ec2Settings {
        ami_arm64: None,
        ..settings()
    };
    let refused = Ec2Provider::with_client(client.clone(), no_arm_ami.clone())
        .create_instance(&spec("job-4", 1, Arch::Arm64, MachineSize::Small))
        .await
        .unwrap_err();
    assert!(
        matches!(refused, ProviderError::UnsupportedArch { .. }) && !refused.is_retryable(),
        "{refused}"
    );
    assert!(refused.to_string().contains("ami_arm64"), "{refused}");

    let emulating = Ec2Provider::with_client(
        client.clone(),
        Ec2Settings {
            allow_emulation: true,
            ..no_arm_ami
        },
    );
    let emulated = emulating
        .create_instance(&spec("job-5", 1, Arch::Arm64, MachineSize::Small))
        .await
        .unwrap();
    assert!(emulated.emulated);
    assert_eq!(emulated.host_arch, Arch::Amd64);
    assert_eq!(emulated.instance_type, "t3.small");
    assert!(
        emulated.notice.as_deref().unwrap().contains("QEMU"),
        "the job log says it is emulated"
    );
}

#[tokio::test]
async fn classes_override_types_and_spot_launches_spot() {
    let Some(moto) = moto().await else { return };
    let client = client(&moto);
    let provider = Ec2Provider::with_client(
        client.clone(),
        Ec2Settings {
            spot: true,
            classes: BTreeMap::from([(
                MachineSize::Medium,
                ClassSettings {
                    amd64: Some("m5.xlarge".into()),
                    arm64: None,
                    spot: Some(false),
                },
            )]),
            ..settings()
        },
    );
    let medium = provider
        .create_instance(&spec("job-6", 1, Arch::Amd64, MachineSize::Medium))
        .await
        .unwrap();
    assert_eq!(medium.instance_type, "m5.xlarge");
    assert_eq!(
        medium.market,
        Some(Market::OnDemand),
        "the class turns spot off"
    );
    let small = provider
        .create_instance(&spec("job-7", 1, Arch::Amd64, MachineSize::Small))
        .await
        .unwrap();
    assert_eq!(small.market, Some(Market::Spot));
    let launched = described(&client, &small.id).await;
    assert_eq!(
        launched.instance_lifecycle().map(|l| l.as_str()),
        Some("spot"),
        "EC2 was asked for spot"
    );
    // A job interrupted on spot is never placed on spot again.
    let mut again = spec("job-7", 2, Arch::Amd64, MachineSize::Small);
    again.on_demand_only = true;
    let retried = provider.create_instance(&again).await.unwrap();
    assert_eq!(retried.market, Some(Market::OnDemand));
}

#[tokio::test]
async fn terminate_is_idempotent_and_listing_sees_only_live_managed_instances() {
    let Some(moto) = moto().await else { return };
    let client = client(&moto);
    let provider = Ec2Provider::with_client(client.clone(), settings());
    let a = provider
        .create_instance(&spec("job-8", 1, Arch::Amd64, MachineSize::Small))
        .await
        .unwrap();
    let b = provider
        .create_instance(&spec("job-9", 1, Arch::Amd64, MachineSize::Small))
        .await
        .unwrap();
    let mine = BTreeMap::from([("stagely:core".to_string(), "core-a".to_string())]);
    let mut listed: Vec<String> = provider
        .list_instances(&mine)
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    listed.sort();
    let mut both = vec![a.id.clone(), b.id.clone()];
    both.sort();
    assert_eq!(listed, both);
    provider.terminate_instance(&a.id).await.unwrap();
    provider.terminate_instance(&a.id).await.unwrap();
    provider
        .terminate_instance("i-0123456789abcdef0")
        .await
        .unwrap();
    let listed: Vec<String> = provider
        .list_instances(&mine)
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(listed, [b.id]);
    let other_core = BTreeMap::from([("stagely:core".to_string(), "core-b".to_string())]);
    assert!(
        provider
            .list_instances(&other_core)
            .await
            .unwrap()
            .is_empty()
    );
}

/// The core asks whether an adopted or dropped attempt's instance still runs: DescribeInstances
/// by id, against moto.
#[tokio::test]
async fn instance_state_is_describe_instances_state() {
    let Some(moto) = moto().await else { return };
    let client = client(&moto);
    let provider = Ec2Provider::with_client(client.clone(), settings());
    let a = provider
        .create_instance(&spec("job-10", 1, Arch::Amd64, MachineSize::Small))
        .await
        .unwrap();
    assert_eq!(
        provider.instance_state(&a.id).await.unwrap(),
        InstanceState::Running
    );
    provider.terminate_instance(&a.id).await.unwrap();
    let InstanceState::Gone { detail } = provider.instance_state(&a.id).await.unwrap() else {
        panic!("a terminated instance is not running");
    };
    assert!(
        detail.contains("terminated") || detail.contains("shutting-down"),
        "{detail}"
    );
    // An id EC2 never issued.
    let InstanceState::Gone { detail } = provider
        .instance_state("i-0123456789abcdef0")
        .await
        .unwrap()
    else {
        panic!("an unknown instance is not running");
    };
    assert!(detail.contains("InvalidInstanceID.NotFound"), "{detail}");
}

#[tokio::test]
async fn a_bad_ami_fails_at_once_naming_the_aws_error() {
    let Some(moto) = moto().await else { return };
    let client = client(&moto);
    let provider = Ec2Provider::with_client(
        client.clone(),
        Ec2Settings {
            ami_amd64: Some("ami-00000000000000000".into()),
            ..settings()
        },
    );
    let error = provider
        .create_instance(&spec("job-10", 1, Arch::Amd64, MachineSize::Small))
        .await
        .unwrap_err();
    match &error {
        ProviderError::Api { code, class, .. } => {
            assert!(code.starts_with("InvalidAMIID"), "{error}");
            assert_eq!(*class, ErrorClass::Permanent);
        }
        other => panic!("expected an EC2 error, got {other}"),
    }
    assert!(!error.is_retryable());
    assert!(error.to_string().contains("InvalidAMIID"), "{error}");
    assert!(all_instances(&client).await.is_empty());

    // An AMI of the other architecture is a configuration error, found before launching.
    let swapped = Ec2Provider::with_client(
        client.clone(),
        Ec2Settings {
            ami_amd64: Some(AMI_ARM64.into()),
            ..settings()
        },
    );
    let error = swapped
        .create_instance(&spec("job-11", 1, Arch::Amd64, MachineSize::Small))
        .await
        .unwrap_err();
    assert!(
        matches!(error, ProviderError::Config(_)) && !error.is_retryable(),
        "{error}"
    );
    assert!(error.to_string().contains("ami_amd64"), "{error}");
    assert!(all_instances(&client).await.is_empty());
}
