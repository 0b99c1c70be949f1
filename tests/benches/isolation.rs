//! Benchmark: what running every RUN step in its own container costs.
//!
//! Side by side in one run, alternating, the same tiny build (`FROM scratch`, busybox, one
//! `RUN` step) with buildah `--isolation chroot` (the old default: the step shares the host's
//! PID namespace) and `--isolation oci` (runc: the step's own PID, mount and network
//! namespaces, what the agent runs now). Prints each side's median and mean wall time.
//!
//! Run: `cargo bench -p stagely-tests --bench isolation` (`STAGELY_BENCH_ROUNDS`, default 7).

use std::time::{Duration, Instant};

use stagely_tests::*;

fn build(isolation: &str, context: &std::path::Path, storage: &std::path::Path) -> Duration {
    let started = Instant::now();
    let output = std::process::Command::new("buildah")
        .arg("--root")
        .arg(storage.join("root"))
        .arg("--runroot")
        .arg(storage.join("run"))
        .args(["--storage-driver", "vfs", "bud", "--isolation", isolation])
        .args(["--no-cache", "-t", "bench:latest"])
        .arg(context)
        .output()
        .expect("buildah runs");
    let elapsed = started.elapsed();
    assert!(
        output.status.success(),
        "buildah --isolation {isolation} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    elapsed
}

fn summary(times: &mut [Duration]) -> (Duration, Duration) {
    times.sort();
    let median = times[times.len() / 2];
    let mean = times.iter().sum::<Duration>() / times.len() as u32;
    (median, mean)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if !require("buildah", "--version") || !require("runc", "--version") {
        return;
    }
    let rounds: usize = std::env::var("STAGELY_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    let dir = tempfile::tempdir().expect("temp dir");
    let context = dir.path().join("context");
    std::fs::create_dir_all(&context).expect("context dir");
    let busybox_path = context.join("busybox");
    std::fs::write(&busybox_path, busybox("amd64").expect("busybox")).expect("busybox");
    std::fs::set_permissions(
        &busybox_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("busybox mode");
    std::fs::write(
        context.join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"echo step ran\"]\n",
    )
    .expect("Dockerfile");
    let (mut chroot, mut oci) = (Vec::new(), Vec::new());
    // One warm-up each, not counted (first use of the storage roots).
    build("chroot", &context, &dir.path().join("chroot"));
    build("oci", &context, &dir.path().join("oci"));
    for _ in 0..rounds {
        chroot.push(build("chroot", &context, &dir.path().join("chroot")));
        oci.push(build("oci", &context, &dir.path().join("oci")));
    }
    let (chroot_median, chroot_mean) = summary(&mut chroot);
    let (oci_median, oci_mean) = summary(&mut oci);
    println!("isolation  rounds  median    mean");
    println!("chroot     {rounds:>6}  {chroot_median:>8.3?}  {chroot_mean:>8.3?}");
    println!("oci        {rounds:>6}  {oci_median:>8.3?}  {oci_mean:>8.3?}");
    println!(
        "oci / chroot (median): {:.2}",
        oci_median.as_secs_f64() / chroot_median.as_secs_f64()
    );
}
