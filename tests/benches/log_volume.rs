//! Benchmark: a build that prints 200 MiB, under buildah alone and through `stagely run`,
//! side by side in one run; memory stays flat on both sides.
//!
//! The same Dockerfile (a RUN step printing 200 MiB of 100-character lines) is built first by
//! buildah alone, its output to /dev/null, twice: `bud` only (vfs storage, `--isolation oci`,
//! `--layers`), and exactly as the agent runs a build (the same `bud` with the layer cache
//! pulled from and pushed to the registry, then `push`: the baseline of the ratio); then by
//! `stagely run` (the release binary: embedded core → local
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

/// CPU seconds a process has used so far, (user, system), from /proc (clock ticks of
/// 1/100 s, as Linux reports them to user space).
fn cpu_secs(pid: &str) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces), from field 3 on.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |index: usize| fields.get(index)?.parse::<f64>().ok();
    Some((ticks(11)? / 100.0, ticks(12)? / 100.0))
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

/// Builds the bench's Dockerfile with buildah alone, output to /dev/null, in fresh storage;
/// returns the seconds it took. `as_agent`: with the agent's cache flags (its own cache
/// repository) and the push that follows, authenticated through an auth file as the agent is.
fn buildah_alone(
    repo: &TestRepo,
    registry: &stagely_core::registry::LocalRegistry,
    as_agent: bool,
) -> f64 {
    use base64::Engine;
    let scratch = tempfile::tempdir().expect("scratch");
    let auth = scratch.path().join("auth.json");
    let encoded = base64::engine::general_purpose::STANDARD
        .encode(format!("{}:{}", registry.username, registry.password));
    std::fs::write(
        &auth,
        serde_json::json!({"auths": {registry.host.clone(): {"auth": encoded}}}).to_string(),
    )
    .expect("auth file");
    let image = format!("{}/stagely/bench-alone:loud", registry.host);
    let cache = format!("{}/stagely/cache/bench-alone/loud", registry.host);
    let buildah = |args: &[&str]| {
        let mut command = std::process::Command::new("buildah");
        command
            .arg("--root")
            .arg(scratch.path().join("storage"))
            .arg("--runroot")
            .arg(scratch.path().join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        command
    };
    let started = Instant::now();
    let dockerfile = repo.dir.path().join("Dockerfile");
    let context = repo.dir.path().to_string_lossy().into_owned();
    let auth = auth.to_string_lossy().into_owned();
    let mut bud = buildah(&[
        "bud",
        "--isolation",
        "oci",
        "--platform",
        "linux/amd64",
        "--layers",
        "-t",
        &image,
    ]);
    bud.arg("-f").arg(&dockerfile);
    if as_agent {
        bud.args(["--cache-from", &cache, "--cache-to", &cache])
            .args(["--authfile", &auth, "--tls-verify=false"]);
    }
    let built = bud.arg(&context).status().expect("buildah bud");
    assert!(built.success(), "buildah alone failed");
    if as_agent {
        let pushed = buildah(&["push", "--authfile", &auth, "--tls-verify=false"])
            .arg(&image)
            .arg(format!("docker://{image}"))
            .status()
            .expect("buildah push");
        assert!(pushed.success(), "buildah push failed");
    }
    started.elapsed().as_secs_f64()
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

    // 1. buildah alone, output thrown away, twice: `bud` only (the first baseline this bench
    // had), and exactly as the agent runs a build: `bud` with the layer cache pulled from and
    // pushed to the registry (a repository of its own, so the run below finds no cache), then
    // `push` of the image.
    let registry = stagely_core::registry::LocalRegistry::start()
        .await
        .expect("registry");
    let bud_secs = buildah_alone(&repo, &registry, false);
    let alone_secs = buildah_alone(&repo, &registry, true);

    // 2. The same through `stagely run`, the per-job log cap lifted (this measures the log
    // path, not the cap).
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
    // CPU used, as last sampled (within 50 ms of each process's end).
    let mut agent_cpu = (0.0, 0.0);
    let mut core_cpu = (0.0, 0.0);
    let status = loop {
        for pid in pids_with(&["stagely-agent", &data]) {
            // VmHWM is the process's own high-water mark: no spike between samples is missed.
            if let Some(kib) = status_kib(&pid, "VmHWM:") {
                agent_peak_kib = agent_peak_kib.max(kib);
                samples += 1;
            }
            agent_cpu = cpu_secs(&pid).unwrap_or(agent_cpu);
        }
        if let Some(kib) = status_kib(&core_pid, "VmHWM:") {
            core_peak_kib = core_peak_kib.max(kib);
        }
        core_cpu = cpu_secs(&core_pid).unwrap_or(core_cpu);
        // Samples every 50 ms; the end is taken the moment the process exits.
        tokio::select! {
            status = child.wait() => break status.expect("wait"),
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
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
    let db = stagely_server::db::Db::open_sqlite(&data_dir.join("stagely.db"))
        .await
        .expect("the run's database");
    let jobs = db.jobs_of_run(&run_id).await.unwrap_or_default();
    let job_id = jobs.first().map(|job| job.id.clone()).unwrap_or_default();
    let (lines, stored_bytes) = db.log_stats(&job_id).await.unwrap_or((0, 0));

    println!(
        "log_volume: a RUN step printing {mib} MiB ({} lines of 100 bytes)",
        bytes / 100
    );
    println!("  buildah alone, bud only (output to /dev/null)   {bud_secs:.2} s");
    println!(
        "  buildah alone as the agent runs it (bud with --cache-from/--cache-to, push; output to /dev/null)   {alone_secs:.2} s"
    );
    println!(
        "  stagely run (build, stream, store, push, verify)   {stagely_secs:.2} s  = {:.2}x buildah as the agent runs it ({:.2}x bud only)",
        stagely_secs / alone_secs,
        stagely_secs / bud_secs
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
    println!(
        "  CPU used               agent {:.2} s (user {:.2}, system {:.2}); core {:.2} s (user {:.2}, system {:.2})",
        agent_cpu.0 + agent_cpu.1,
        agent_cpu.0,
        agent_cpu.1,
        core_cpu.0 + core_cpu.1,
        core_cpu.0,
        core_cpu.1
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
