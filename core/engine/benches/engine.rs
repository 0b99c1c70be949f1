//! The pure engine's cost per input with many live runs: what the runner's loop pays on
//! every event before any I/O. Prints the median and p99 of one job's way from `Load` to its
//! `SendWork` (load, claim answered, instance created, agent connected, finished) with N
//! runs live, each input timed alone.
//!
//! Run: `cargo bench -p stagely-engine --bench engine` (`STAGELY_BENCH_LEVELS=1,50,500,5000`).

use std::time::{Duration, Instant};

use stagely_engine::*;

fn build(id: &str) -> JobSnapshot {
    JobSnapshot {
        id: id.into(),
        name: "web".into(),
        kind: JobKind::Build,
        status: JobStatus::Queued,
        attempt: 0,
        infra_failures: 0,
        lease_owner: None,
        lease_until: None,
        not_before: None,
        timeout: Duration::from_secs(1800),
        instance_id: None,
        attempt_connected_at: None,
    }
}

fn run(index: usize, created: i64) -> RunSnapshot {
    RunSnapshot {
        id: format!("run-{index:06}-0000-0000-0000-000000000000"),
        environment_id: format!("env-{index}"),
        status: RunStatus::Pending,
        fail_fast: true,
        created_at: Timestamp(created),
        cancel: None,
        jobs: vec![build(&format!(
            "job-{index:06}-0000-0000-0000-000000000000"
        ))],
    }
}

/// Answers every claim as won and every instance as created at once.
fn drain(engine: &mut Engine, now: Timestamp) -> Vec<Action> {
    let mut done = Vec::new();
    while let Some(action) = engine.poll_action() {
        if let Action::Claim { claims, .. } = &action {
            let won = claims.iter().map(|c| c.job_id.clone()).collect();
            done.push(action.clone());
            engine.handle(
                Event::Claimed {
                    won,
                    lost: Vec::new(),
                },
                now,
            );
            continue;
        }
        done.push(action);
    }
    done
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p / 100.0).round() as usize;
    sorted[index]
}

fn main() {
    let levels: Vec<usize> = std::env::var("STAGELY_BENCH_LEVELS")
        .ok()
        .map(|text| {
            text.split(',')
                .filter_map(|n| n.trim().parse().ok())
                .collect()
        })
        .unwrap_or_else(|| vec![1, 50, 500, 5000]);
    println!(
        "engine: one job's inputs (load → claimed → created → connected → finished) with N-1 live"
    );
    for level in levels {
        let mut config = EngineConfig::with_owner("core-a", "core-a/1");
        config.max_live_instances = level + 10;
        config.max_live_per_environment = 10;
        let mut engine = Engine::new(config);
        let mut now = Timestamp(1_000_000);
        // N-1 live jobs, agents connected.
        for index in 0..level.saturating_sub(1) {
            engine.handle(Event::Load(run(index, now.millis())), now);
            for action in drain(&mut engine, now) {
                if let Action::CreateInstance {
                    job_id, attempt, ..
                } = action
                {
                    engine.handle(
                        Event::InstanceCreated {
                            job_id: job_id.clone(),
                            attempt,
                            instance_id: format!("i-{index}"),
                        },
                        now,
                    );
                    engine.handle(Event::AgentConnected { job_id, attempt }, now);
                    drain(&mut engine, now);
                }
            }
        }
        let mut per_input: Vec<Vec<f64>> = vec![Vec::new(); 5];
        for probe in 0..300 {
            now = now.plus(Duration::from_millis(50));
            let index = 1_000_000 + probe;
            let snapshot = run(index, now.millis());
            let job_id = snapshot.jobs[0].id.clone();
            let mut timed = |slot: usize, engine: &mut Engine, input: Event| -> Vec<Action> {
                let start = Instant::now();
                engine.handle(input, now);
                let mut actions = Vec::new();
                while let Some(action) = engine.poll_action() {
                    actions.push(action);
                }
                let _ = engine.poll_timeout();
                per_input[slot].push(start.elapsed().as_secs_f64() * 1e6);
                actions
            };
            let actions = timed(0, &mut engine, Event::Load(snapshot));
            let won = actions
                .iter()
                .filter_map(|a| match a {
                    Action::Claim { claims, .. } => Some(claims.iter().map(|c| c.job_id.clone())),
                    _ => None,
                })
                .flatten()
                .collect();
            timed(
                1,
                &mut engine,
                Event::Claimed {
                    won,
                    lost: Vec::new(),
                },
            );
            timed(
                2,
                &mut engine,
                Event::InstanceCreated {
                    job_id: job_id.clone(),
                    attempt: 1,
                    instance_id: format!("i-{index}"),
                },
            );
            timed(
                3,
                &mut engine,
                Event::AgentConnected {
                    job_id: job_id.clone(),
                    attempt: 1,
                },
            );
            timed(
                4,
                &mut engine,
                Event::Finished {
                    job_id,
                    attempt: 1,
                    outcome: AttemptOutcome::Completed {
                        digest: "sha256:0".into(),
                        artifact_url: "r/x:y".into(),
                        exit_code: 0,
                    },
                },
            );
        }
        // A periodic sync that finds nothing changed: every live run read back as stored.
        let live: Vec<RunSnapshot> = (0..level.saturating_sub(1))
            .map(|index| {
                let mut snapshot = run(index, 0);
                snapshot.status = RunStatus::Building;
                let job = &mut snapshot.jobs[0];
                job.status = JobStatus::Running;
                job.attempt = 1;
                job.lease_owner = Some("core-a/1".into());
                snapshot
            })
            .collect();
        let mut syncs = Vec::new();
        for _ in 0..20 {
            let snapshots = live.clone();
            let start = Instant::now();
            engine.handle(Event::Sync(snapshots), now);
            while engine.poll_action().is_some() {}
            syncs.push(start.elapsed().as_secs_f64() * 1e6);
        }
        syncs.sort_by(f64::total_cmp);
        let names = ["load", "claimed", "created", "connected", "finished"];
        let mut line = format!("  {level:>5} runs:");
        for (name, values) in names.iter().zip(per_input.iter_mut()) {
            values.sort_by(f64::total_cmp);
            line.push_str(&format!(
                "  {name} {:.1}/{:.1} µs",
                percentile(values, 50.0),
                percentile(values, 99.0)
            ));
        }
        line.push_str(&format!("  sync of all {:.0} µs", percentile(&syncs, 50.0)));
        println!("{line}");
    }
}
