//! Benchmark: memory stays flat while a build prints 200 MiB.
//!
//! A real build (core in this process → local provider → `stagely-agent` → buildah) runs a
//! Dockerfile whose RUN step prints 200 MiB of 100-character lines. While it runs, the agent's
//! resident memory is sampled from /proc; the core's is this process's. Prints the figures and
//! fails (exit 1) if the agent's peak RSS reaches the 64 MiB budget.
//!
//! Run: `cargo build --release --bins && cargo bench -p stagely-tests --bench log_volume`
//! (`STAGELY_BENCH_MIB` changes the volume).

use std::time::{Duration, Instant};

use stagely_tests::*;

const AGENT_RSS_BUDGET_KIB: u64 = 64 * 1024;

fn status_kib(pid: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn agent_pids(data_dir: &str) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline);
            if cmdline.contains("stagely-agent") && cmdline.contains(data_dir) {
                out.push(name);
            }
        }
    }
    out
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if !require_build_peers() {
        return;
    }
    let mib: u64 = std::env::var("STAGELY_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let bytes = mib * 1024 * 1024;
    let busybox = busybox("amd64").expect("busybox");
    let line = "x".repeat(99);
    let dockerfile = format!(
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"/bin/busybox yes {line} | /bin/busybox head -c {bytes}\"]\n"
    );
    let repo = TestRepo::with_files(&[
        (
            "stagely.yaml",
            b"builds:\n  loud:\n    context: .\n    platform: linux/amd64\n    timeout: 30m\n",
        ),
        ("Dockerfile", dockerfile.as_bytes()),
        ("busybox", &busybox),
    ])
    .expect("repo");
    // This measures streaming, not the per-job log cap (100 MiB by default): lift the cap.
    let mut core = TestCore::start_configured(|file| {
        file.scheduler.max_log_bytes_per_job = Some(2 * bytes + 1024 * 1024);
    })
    .await
    .expect("core");
    let data_dir = core.data.path().to_string_lossy().into_owned();
    let core_rss_before = status_kib("self", "VmRSS:").unwrap_or(0);
    let started = Instant::now();
    let run = core.submit(&repo, None, "bench").await.expect("submit");

    let mut agent_peak_kib = 0;
    let mut core_peak_kib = 0;
    let mut samples = 0;
    loop {
        for pid in agent_pids(&data_dir) {
            // VmHWM is the process's own high-water mark: no spike between samples is missed.
            if let Some(kib) = status_kib(&pid, "VmHWM:") {
                agent_peak_kib = agent_peak_kib.max(kib);
                samples += 1;
            }
        }
        core_peak_kib = core_peak_kib.max(status_kib("self", "VmRSS:").unwrap_or(0));
        let view = core.run(&run.id).await.expect("run");
        if matches!(view.status.as_str(), "completed" | "failed") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = started.elapsed();
    let view = core.run(&run.id).await.expect("run");
    let job = &view.jobs[0];
    let runner = &core.core.as_ref().expect("core").runner;
    let (lines, stored_bytes) = runner.db().log_stats(&job.id).await.expect("stats");
    core.stop().await;

    println!("log_volume: {mib} MiB printed by a RUN step, streamed agent -> core -> SQLite");
    println!("  job status            {}", job.status);
    println!("  lines stored          {lines}");
    println!(
        "  bytes stored          {stored_bytes} ({:.1} MiB)",
        stored_bytes as f64 / 1048576.0
    );
    println!(
        "  wall time             {:.1} s ({:.1} MiB/s)",
        elapsed.as_secs_f64(),
        stored_bytes as f64 / 1048576.0 / elapsed.as_secs_f64()
    );
    println!(
        "  agent peak RSS        {:.1} MiB (VmHWM, {samples} samples; budget {} MiB)",
        agent_peak_kib as f64 / 1024.0,
        AGENT_RSS_BUDGET_KIB / 1024
    );
    println!(
        "  core RSS before/peak  {:.1} / {:.1} MiB (this process: core + bench harness)",
        core_rss_before as f64 / 1024.0,
        core_peak_kib as f64 / 1024.0
    );
    let mut failed = false;
    if job.status != "completed" {
        println!("FAIL: the build did not complete: {:?}", job.error_message);
        failed = true;
    }
    if (stored_bytes as u64) < bytes {
        println!("FAIL: only {stored_bytes} of {bytes} bytes were stored");
        failed = true;
    }
    if samples == 0 {
        println!("FAIL: the agent was never sampled");
        failed = true;
    }
    if agent_peak_kib >= AGENT_RSS_BUDGET_KIB {
        println!("FAIL: agent peak RSS is over budget");
        failed = true;
    }
    if failed {
        std::process::exit(1);
    }
    println!("PASS");
}
