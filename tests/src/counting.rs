//! A build that prints numbered lines, and the check that a stored log holds each exactly
//! once, in order, under contiguous seqs: the yardstick of "nothing lost, nothing doubled".

use crate::{TestRepo, busybox};

/// Numbered lines the build prints.
pub const LINES: usize = 20_000;

/// A build whose RUN step prints `line 1` .. `line 20000`, pausing 0.1 s every 250 lines
/// (about 8 s in all), so disconnects land mid-stream.
pub fn counting_repo() -> TestRepo {
    counting_repo_holding(0)
}

/// [`counting_repo`] whose RUN step then sleeps `hold_secs` before it ends: the build is
/// still running (and needs no network) until then, whatever happened to the link.
pub fn counting_repo_holding(hold_secs: u32) -> TestRepo {
    let busybox = busybox("amd64").unwrap();
    let hold = if hold_secs > 0 {
        format!("; /bin/busybox sleep {hold_secs}")
    } else {
        String::new()
    };
    let script = format!(
        "i=1; while [ $i -le {LINES} ]; do echo \\\"line $i\\\"; if [ $((i % 250)) -eq 0 ]; then /bin/busybox sleep 0.1; fi; i=$((i+1)); done; echo counted{hold}"
    );
    let dockerfile = format!(
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"{script}\"]\n"
    );
    TestRepo::with_files(&[
        (
            "stagely.yaml",
            b"builds:\n  counter:\n    context: .\n    platform: linux/amd64\n",
        ),
        ("Dockerfile", dockerfile.as_bytes()),
        ("busybox", &busybox),
    ])
    .unwrap()
}

/// How many numbered lines the stored log holds so far.
pub fn numbered(lines: &[(i64, String)]) -> Vec<usize> {
    lines
        .iter()
        .filter_map(|(_, line)| line.trim_end().strip_prefix("line "))
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// The stored log is what the build printed: seqs 1..=n without a gap or a repeat, and the
/// numbered lines each once, in order.
pub fn assert_exact(lines: &[(i64, String)]) {
    let seqs: Vec<i64> = lines.iter().map(|(seq, _)| *seq).collect();
    let expected: Vec<i64> = (1..=seqs.len() as i64).collect();
    if seqs != expected {
        let first_bad = seqs
            .iter()
            .zip(&expected)
            .position(|(a, b)| a != b)
            .unwrap_or(seqs.len());
        panic!(
            "stored seqs are not 1..={}: first difference at index {first_bad}: {:?}",
            seqs.len(),
            &seqs[first_bad.saturating_sub(3)..(first_bad + 3).min(seqs.len())]
        );
    }
    let numbers = numbered(lines);
    assert_eq!(numbers.len(), LINES, "numbered lines stored");
    for (index, number) in numbers.iter().enumerate() {
        assert_eq!(*number, index + 1, "line {} out of place", index + 1);
    }
    assert_eq!(
        lines
            .iter()
            .filter(|(_, l)| l.trim_end() == "counted")
            .count(),
        1
    );
}
