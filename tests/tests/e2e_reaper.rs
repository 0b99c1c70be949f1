//! The reaper's second list: instances the provider has for this deployment that the store
//! does not know (a core that died between create and record: this core, or another replica
//! on the same database that may never start again) are terminated and counted; instances of
//! another deployment (another database's `stagely:deployment`, another `stagely:core`) are
//! never touched.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use stagely_cloud_init::{AgentConfig, Bootstrap, render_user_data};
use stagely_provisioning::{Arch, MachineSize, MachineSpec};
use stagely_tests::*;

fn spec(core: &str, deployment: &str, job: &str) -> MachineSpec {
    MachineSpec {
        size: MachineSize::Small,
        arch: Arch::from_rust_arch(std::env::consts::ARCH).unwrap_or(Arch::Amd64),
        // An agent that dials nothing (it retries until its instance is terminated).
        user_data: render_user_data(&Bootstrap {
            agent: AgentConfig::new("http://127.0.0.1:9", "stg_nobody"),
            ca_pem: None,
        })
        .unwrap(),
        tags: BTreeMap::from([
            ("stagely:core".to_string(), core.to_string()),
            ("stagely:deployment".to_string(), deployment.to_string()),
            ("stagely:run".to_string(), "run-gone".to_string()),
            ("stagely:job".to_string(), job.to_string()),
            ("stagely:attempt".to_string(), "1".to_string()),
        ]),
        on_demand_only: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrecorded_instances_of_this_deployment_are_reaped_whichever_core_launched_them_and_other_deployments_are_left_alone()
 {
    let mut core = TestCore::start_configured(|file| {
        file.core_id = Some("reaper-test".into());
        file.scheduler.reap_interval_secs = Some(1);
    })
    .await
    .unwrap();
    let deployment = core
        .core
        .as_ref()
        .unwrap()
        .runner
        .settings()
        .deployment_id
        .clone();
    assert_eq!(
        deployment.len(),
        32,
        "a fresh id per database: {deployment}"
    );
    let ghost = core
        .provider
        .create_instance(&spec("reaper-test", &deployment, "job-the-store-never-saw"))
        .await
        .unwrap();
    // Launched by another replica of this deployment (a core id this core does not have)
    // that died before recording it.
    let replicas_ghost = core
        .provider
        .create_instance(&spec("dead-replica", &deployment, "their-lost-job"))
        .await
        .unwrap();
    let foreign = core
        .provider
        .create_instance(&spec(
            "another-deployment",
            "0123456789abcdef0123456789abcdef",
            "their-job",
        ))
        .await
        .unwrap();
    // Another deployment whose operator left `core_id` the same as this one's.
    let same_core_id = core
        .provider
        .create_instance(&spec(
            "reaper-test",
            "fedcba9876543210fedcba9876543210",
            "their-other-job",
        ))
        .await
        .unwrap();
    let stats = || core.core.as_ref().unwrap().runner.reaper_stats();
    let sweeps_before = stats().sweeps.load(Ordering::Relaxed);
    poll_until(
        Duration::from_secs(20),
        "the unrecorded instances reaped",
        || async {
            let live: Vec<String> = core
                .live_instances()
                .await
                .into_iter()
                .map(|i| i.id)
                .collect();
            let gone = !live.contains(&ghost.id) && !live.contains(&replicas_ghost.id);
            Ok((gone.then_some(()), format!("live: {live:?}")))
        },
    )
    .await;
    assert!(stats().unrecorded.load(Ordering::Relaxed) >= 2, "counted");
    // Two more sweeps, and the other deployment's instance is still there.
    poll_until(Duration::from_secs(20), "two more sweeps", || async {
        let sweeps = stats().sweeps.load(Ordering::Relaxed);
        Ok((
            (sweeps >= sweeps_before + 3).then_some(()),
            format!("{sweeps} sweeps"),
        ))
    })
    .await;
    let live: Vec<String> = core
        .live_instances()
        .await
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert!(
        live.contains(&foreign.id) && live.contains(&same_core_id.id),
        "another deployment's instance was touched"
    );
    core.provider.terminate_instance(&foreign.id).await.unwrap();
    core.provider
        .terminate_instance(&same_core_id.id)
        .await
        .unwrap();
    assert_eq!(
        stats().terminated(),
        stats().unrecorded.load(Ordering::Relaxed)
    );
    core.stop().await;
}
