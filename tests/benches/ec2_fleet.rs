//! Benchmark: the core's own time per EC2 launch and per termination, against moto.
//!
//! N jobs at once (default 50, `STAGELY_BENCH_JOBS`), each through the `ec2` provider the
//! core uses: `create_instance` (the AMI check, the tag lookup that makes a launch
//! idempotent, RunInstances with tags, user-data and IMDSv2 options) timed from the call to
//! the instance being returned (what the core then records), then `terminate_instance` for
//! each. Prints median, p99 and max per operation, and the wall time of each wave. moto
//! answers in-process Python, so the figures are the core's + the SDK's + moto's time; a
//! real region adds its own latency on top.
//!
//! Run: `cargo bench -p stagely-tests --bench ec2_fleet` (needs `scripts/setup.sh`: moto).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use stagely_provisioning::ec2::{Ec2Provider, Ec2Settings};
use stagely_provisioning::{Arch, MachineSize, MachineSpec, Provider};
use stagely_tests::ec2::*;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

fn report(what: &str, mut times: Vec<Duration>, wall: Duration) {
    times.sort();
    println!(
        "{what:<13} n={:<3} median {:>7.1} ms  p99 {:>7.1} ms  max {:>7.1} ms  wave {:>7.1} ms",
        times.len(),
        percentile(&times, 0.5).as_secs_f64() * 1e3,
        percentile(&times, 0.99).as_secs_f64() * 1e3,
        times.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        wall.as_secs_f64() * 1e3,
    );
}

#[tokio::main]
async fn main() {
    let jobs: usize = std::env::var("STAGELY_BENCH_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let Some(moto) = MotoServer::start().await else {
        return;
    };
    let provider = Arc::new(Ec2Provider::with_client(
        ec2_client(&moto.url),
        Ec2Settings {
            ami_amd64: Some(MOTO_AMI_AMD64.into()),
            ami_arm64: Some(MOTO_AMI_ARM64.into()),
            ..Ec2Settings::default()
        },
    ));
    let user_data = stagely_cloud_init::render_user_data(&stagely_cloud_init::Bootstrap {
        agent: stagely_cloud_init::AgentConfig {
            metadata_url: Some("http://169.254.169.254".into()),
            ..stagely_cloud_init::AgentConfig::new(
                "https://core.example.internal:8443",
                "stg_bench_token_0123456789abcdef",
            )
        },
        ca_pem: None,
    })
    .expect("user-data renders");
    let spec_for = |run: &str, job: usize| MachineSpec {
        size: MachineSize::Medium,
        arch: if job.is_multiple_of(2) {
            Arch::Amd64
        } else {
            Arch::Arm64
        },
        user_data: user_data.clone(),
        tags: BTreeMap::from([
            ("stagely:core".to_string(), "bench".to_string()),
            ("stagely:run".to_string(), run.to_string()),
            ("stagely:job".to_string(), format!("job-{run}-{job}")),
            ("stagely:attempt".to_string(), "1".to_string()),
        ]),
        on_demand_only: false,
    };
    // One at a time first: each call's own latency, nothing queued behind it at moto.
    {
        let started = Instant::now();
        let (mut launches, mut ends) = (Vec::new(), Vec::new());
        for job in 0..10 {
            let called = Instant::now();
            let instance = provider
                .create_instance(&spec_for("serial", job))
                .await
                .expect("launch");
            launches.push(called.elapsed());
            let called = Instant::now();
            provider
                .terminate_instance(&instance.id)
                .await
                .expect("terminate");
            ends.push(called.elapsed());
        }
        report("launch 1x", launches, started.elapsed());
        report("terminate 1x", ends, started.elapsed());
    }
    for round in 1..=2 {
        let started = Instant::now();
        let mut tasks = Vec::new();
        for job in 0..jobs {
            let provider = provider.clone();
            let spec = spec_for(&format!("run-{round}"), job);
            tasks.push(tokio::spawn(async move {
                let called = Instant::now();
                let instance = provider.create_instance(&spec).await.expect("launch");
                (instance.id, called.elapsed())
            }));
        }
        let mut ids = Vec::new();
        let mut launch_times = Vec::new();
        for task in tasks {
            let (id, elapsed) = task.await.expect("launch task");
            ids.push(id);
            launch_times.push(elapsed);
        }
        report(&format!("launch #{round}"), launch_times, started.elapsed());

        let started = Instant::now();
        let mut tasks = Vec::new();
        for id in ids {
            let provider = provider.clone();
            tasks.push(tokio::spawn(async move {
                let called = Instant::now();
                provider.terminate_instance(&id).await.expect("terminate");
                called.elapsed()
            }));
        }
        let mut times = Vec::new();
        for task in tasks {
            times.push(task.await.expect("terminate task"));
        }
        report(&format!("terminate #{round}"), times, started.elapsed());
    }
}
