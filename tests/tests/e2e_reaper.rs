//! The reaper's second list: instances the provider has for this core's id that the store
//! does not know (a core that died between create and record) are terminated and counted;
//! instances of another deployment (another `stagely:core`) are never touched.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use stagely_cloud_init::{AgentConfig, Bootstrap, render_user_data};
use stagely_provisioning::{Arch, MachineSize, MachineSpec};
use stagely_tests::*;

fn spec(core: &str, job: &str) -> MachineSpec {
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
            ("stagely:run".to_string(), "run-gone".to_string()),
            ("stagely:job".to_string(), job.to_string()),
            ("stagely:attempt".to_string(), "1".to_string()),
        ]),
        on_demand_only: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrecorded_instances_of_this_core_are_reaped_and_other_deployments_are_left_alone() {
    let mut core = TestCore::start_configured(|file| {
        file.core_id = Some("reaper-test".into());
        file.scheduler.reap_interval_secs = Some(1);
    })
    .await
    .unwrap();
    let ghost = core
        .provider
        .create_instance(&spec("reaper-test", "job-the-store-never-saw"))
        .await
        .unwrap();
    let foreign = core
        .provider
        .create_instance(&spec("another-deployment", "their-job"))
        .await
        .unwrap();
    let stats = || core.core.as_ref().unwrap().runner.reaper_stats();
    let sweeps_before = stats().sweeps.load(Ordering::Relaxed);
    poll_until(
        Duration::from_secs(20),
        "the unrecorded instance reaped",
        || async {
            let live: Vec<String> = core
                .live_instances()
                .await
                .into_iter()
                .map(|i| i.id)
                .collect();
            let gone = !live.contains(&ghost.id);
            Ok((gone.then_some(()), format!("live: {live:?}")))
        },
    )
    .await;
    assert!(stats().unrecorded.load(Ordering::Relaxed) >= 1, "counted");
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
        live.contains(&foreign.id),
        "another deployment's instance was touched"
    );
    core.provider.terminate_instance(&foreign.id).await.unwrap();
    assert_eq!(
        stats().terminated(),
        stats().unrecorded.load(Ordering::Relaxed)
    );
    core.stop().await;
}
