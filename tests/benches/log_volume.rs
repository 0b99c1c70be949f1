//! Benchmark: a build that prints 200 MiB, under buildah alone and through `stagely run`,
//! side by side in one run; memory stays flat on both sides.
//!
//! The same Dockerfile (a RUN step printing 200 MiB of 100-character lines) is built first by
//! buildah alone, exactly as the agent runs it (vfs storage, `--isolation oci`, `--layers`),
//! its output to /dev/null; then by `stagely run` (the release binary: embedded core → local
//! provider → `stagely-agent` in its own namespaces → buildah → every line masked, spooled,
//! sent in LOGS frames, stored in chunks, then the image pushed and verified). While
//! `stagely run` works, the peak RSS (VmHWM) of its process (the core) and of the agent are
//! read from /proc. Prints the figures and fails (exit 1) if a line is missing or the agent
//! reaches 16 MiB or the core 64 MiB.
//!
//! Run: `cargo build --release --bins && cargo bench -p stagely-tests --bench log_volume`
//! (`STAGELY_BENCH_MIB` changes the volume: 1024 for the 1 GiB memory figure).

use std::time::{Duration, Instant};

use stagely_tests::*;

const AGENT_RSS_BUDGET_KIB: u64 = 16 * 1024;
const CORE_RSS_BUDGET_KIB: u64 = 64 * 1024;

fn status_kib(pid: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Processes whose command line holds all of `needles`.
fn pids_with(needles: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline);
            if needles.iter().all(|needle| cmdline.contains(needle)) {
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

    // 1. buildah alone, as the agent runs it, output thrown away.
    let scratch = tempfile::tempdir().expect("scratch");
    let alone_started = Instant::now();
    let alone = std::process::Command::new("buildah")
        .arg("--root")
        .arg(scratch.path().join("storage"))
        .arg("--runroot")
        .arg(scratch.path().join("run"))
        .args([
            "--storage-driver",
            "vfs",
            "bud",
            "--isolation",
            "oci",
            "--layers",
        ])
        .args(["--platform", "linux/amd64", "-t", "bench-alone", "-f"])
        .arg(repo.dir.path().join("Dockerfile"))
        .arg(repo.dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("buildah");
    let alone_secs = alone_started.elapsed().as_secs_f64();
    assert!(alone.success(), "buildah alone failed");
    drop(scratch);

    // 2. The same through `stagely run`, the per-job log cap lifted (this measures the log
    // path, not the cap).
    let registry = stagely_core::registry::LocalRegistry::start()
        .await
        .expect("registry");
    let work = tempfile::tempdir().expect("work");
    let data_dir = work.path().join("data");
    let config = work.path().join("stagely.toml");
    std::fs::write(
        &config,
        format!(
            "[scheduler]\nmax_log_bytes_per_job = {}\n",
            2 * bytes + (1 << 20)
        ),
    )
    .expect("config");
    let data = data_dir.to_string_lossy().into_owned();
    // STAGELY_BENCH_KEEP=1 keeps the run's data directory (database, agent.log) and its log
    // (run.log there), to read where the time went.
    let keep = std::env::var_os("STAGELY_BENCH_KEEP").is_some();
    let run_stderr = if keep {
        std::fs::create_dir_all(&data_dir).expect("data dir");
        std::process::Stdio::from(std::fs::File::create(data_dir.join("run.log")).expect("run.log"))
    } else {
        std::process::Stdio::null()
    };
    let started = Instant::now();
    let mut child = tokio::process::Command::new(agent_binary().with_file_name("stagely"))
        .args([
            "run",
            "--json",
            "--environment",
            "bench",
            "--data-dir",
            &data,
            "--config",
        ])
        .arg(&config)
        .arg(repo.dir.path())
        .args(["--registry", &registry.host])
        .env("STAGELY_REGISTRY_USERNAME", &registry.username)
        .env("STAGELY_REGISTRY_PASSWORD", &registry.password)
        .stdout(std::process::Stdio::piped())
        .stderr(run_stderr)
        .spawn()
        .expect("stagely run");
    let core_pid = child.id().map(|pid| pid.to_string()).unwrap_or_default();
    let mut agent_peak_kib = 0;
    let mut core_peak_kib = 0;
    let mut samples = 0;
    let status = loop {
        for pid in pids_with(&["stagely-agent", &data]) {
            // VmHWM is the process's own high-water mark: no spike between samples is missed.
            if let Some(kib) = status_kib(&pid, "VmHWM:") {
                agent_peak_kib = agent_peak_kib.max(kib);
                samples += 1;
            }
        }
        if let Some(kib) = status_kib(&core_pid, "VmHWM:") {
            core_peak_kib = core_peak_kib.max(kib);
        }
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let stagely_secs = started.elapsed().as_secs_f64();
    let mut stdout = String::new();
    if let Some(mut out) = child.stdout.take() {
        use tokio::io::AsyncReadExt;
        let _ = out.read_to_string(&mut stdout).await;
    }
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_default();
    let job_status = summary["jobs"][0]["status"]
        .as_str()
        .unwrap_or("?")
        .to_string();
    let run_id = summary["run_id"].as_str().unwrap_or("").to_string();
    // What the run stored, read back from its database.
    let db = stagely_core::db::Db::open_sqlite(&data_dir.join("stagely.db"))
        .await
        .expect("the run's database");
    let jobs = db.jobs_of_run(&run_id).await.unwrap_or_default();
    let job_id = jobs.first().map(|job| job.id.clone()).unwrap_or_default();
    let (lines, stored_bytes) = db.log_stats(&job_id).await.unwrap_or((0, 0));

    println!(
        "log_volume: a RUN step printing {mib} MiB ({} lines of 100 bytes)",
        bytes / 100
    );
    println!("  buildah alone (output to /dev/null)   {alone_secs:.2} s");
    println!(
        "  stagely run (build, stream, store, push, verify)   {stagely_secs:.2} s  = {:.2}x buildah alone",
        stagely_secs / alone_secs
    );
    println!("  job status            {job_status} (stagely run exit {status})");
    println!("  lines stored          {lines}");
    println!(
        "  bytes stored          {stored_bytes} ({:.1} MiB, {:.1} MiB/s end to end)",
        stored_bytes as f64 / 1048576.0,
        stored_bytes as f64 / 1048576.0 / stagely_secs
    );
    println!(
        "  agent peak RSS        {:.1} MiB (VmHWM, {samples} samples; budget {} MiB)",
        agent_peak_kib as f64 / 1024.0,
        AGENT_RSS_BUDGET_KIB / 1024
    );
    println!(
        "  core peak RSS         {:.1} MiB (the `stagely run` process, VmHWM; budget {} MiB)",
        core_peak_kib as f64 / 1024.0,
        CORE_RSS_BUDGET_KIB / 1024
    );
    let mut failed = false;
    if job_status != "completed" {
        println!("FAIL: the build did not complete: {stdout}");
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
    if core_peak_kib >= CORE_RSS_BUDGET_KIB {
        println!("FAIL: core peak RSS is over budget");
        failed = true;
    }
    if keep {
        let kept = work.keep();
        println!("  kept                  {}", kept.display());
    }
    if failed {
        std::process::exit(1);
    }
    println!("PASS");
}
