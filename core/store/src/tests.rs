//! The store's tests, each run on SQLite and on PostgreSQL.

use super::*;
use stagely_engine::{AttemptResult, FailureKind, JobEnd};
use stagely_engine::{Claim, JobStatus, RunStatus, Timestamp, Transition};

/// The wall clock, for the tests that write with today's time.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A PostgreSQL database for one test, dropped after it.
struct PgScratch {
    name: String,
}

const ADMIN: &str = "postgres://postgres@127.0.0.1:5432/postgres";

impl Drop for PgScratch {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                use sqlx::Connection;
                if let Ok(mut admin) = sqlx::PgConnection::connect(ADMIN).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&mut admin)
                    .await;
                }
            });
        })
        .join();
    }
}

/// Which backend a test runs on. PostgreSQL must answer in CI; elsewhere its tests skip,
/// saying why.
#[derive(Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
}

/// Keeps the backend's files or database alive for the test.
#[allow(dead_code)]
enum Scratch {
    Dir(tempfile::TempDir),
    Pg(PgScratch),
}

async fn open(backend: Backend) -> Option<(Scratch, Db)> {
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            let db = Db::open_sqlite(&dir.path().join("t.db")).await.unwrap();
            Some((Scratch::Dir(dir), db))
        }
        Backend::Postgres => {
            use sqlx::Connection;
            let mut admin = match sqlx::PgConnection::connect(ADMIN).await {
                Ok(admin) => admin,
                Err(error) if std::env::var("CI").is_err() => {
                    eprintln!("skipping: PostgreSQL is not reachable on 127.0.0.1:5432 ({error})");
                    return None;
                }
                Err(error) => panic!("PostgreSQL is required in CI: {error}"),
            };
            let name = format!("stagely_unit_{}", uuid::Uuid::new_v4().simple());
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&mut admin)
                .await
                .unwrap();
            let scratch = PgScratch { name: name.clone() };
            let db = Db::open_postgres(&format!("postgres://postgres@127.0.0.1:5432/{name}"))
                .await
                .unwrap();
            Some((Scratch::Pg(scratch), db))
        }
    }
}

async fn db_with_jobs(backend: Backend, jobs: &[&str]) -> Option<(Scratch, Db)> {
    let (dir, db) = open(backend).await?;
    let run = NewRun {
        id: "r1".into(),
        environment_id: "env".into(),
        trigger: "manual".into(),
        repo_url: "/repo".into(),
        commit_hash: "c0ffee".into(),
        branch: "main".into(),
        config_path: String::new(),
        fail_fast: true,
        submitted_by: Some("ci".into()),
    };
    let spec = r#"{"service":"api","kind":{"type":"build"},"context_path":".","dockerfile":"Dockerfile","build_args":{},"timeout_seconds":60}"#;
    let jobs: Vec<NewJob> = jobs
        .iter()
        .map(|id| NewJob {
            id: id.to_string(),
            name: id.to_string(),
            architecture: "amd64".into(),
            platform: "linux/amd64".into(),
            machine: "medium".into(),
            spec: serde_json::from_str(spec).unwrap(),
        })
        .collect();
    let created = db
        .create_run(&run, &jobs, Timestamp(now_ms()))
        .await
        .unwrap();
    assert_eq!(
        db.run_snapshot("r1").await.unwrap(),
        Some(created),
        "create_run returns exactly what is stored"
    );
    Some((dir, db))
}

fn claim(job: &str, expected: u32) -> AttemptClaim {
    AttemptClaim {
        claim: Claim {
            job_id: job.into(),
            environment_id: "env".into(),
            attempt: expected + 1,
            expected_attempt: expected,
            reuses_instance: false,
        },
        token_hash: format!("hash-{job}-{}", expected + 1),
    }
}

/// Each store test, once per backend.
macro_rules! on_both_backends {
    ($name:ident) => {
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                super::$name(super::Backend::Sqlite).await
            }

            #[tokio::test]
            async fn postgres() {
                super::$name(super::Backend::Postgres).await
            }
        }
    };
}

on_both_backends!(claims_are_guarded_by_status_attempt_and_the_limits);
on_both_backends!(an_attempt_ends_only_under_its_owner_and_its_token_dies_with_it);
on_both_backends!(an_earlier_incarnation_s_attempts_are_taken_before_their_lease_runs_out);
on_both_backends!(duplicate_log_lines_are_stored_once);
on_both_backends!(chunked_logs_page_across_chunks_and_read_older_rows_alongside);
on_both_backends!(logs_of_runs_finished_before_the_cutoff_are_deleted_and_no_others);
on_both_backends!(the_engine_loads_when_the_current_attempt_first_connected);

/// What an adopting core needs to keep an attempt's timeout: its first connection, in
/// both ways the engine loads jobs, and nothing for a job not yet connected.
async fn the_engine_loads_when_the_current_attempt_first_connected(backend: Backend) {
    let Some((_dir, db)) = db_with_jobs(backend, &["a", "b"]).await else {
        return;
    };
    let lease = Timestamp(600_000);
    db.claim(
        "core/1",
        &[claim("a", 0), claim("b", 0)],
        lease,
        10,
        10,
        Timestamp(1_000),
    )
    .await
    .unwrap();
    let running = Transition::JobRunning {
        job_id: "a".into(),
        attempt: 1,
    };
    assert!(db.apply(&running, Timestamp(5_000)).await.unwrap());
    // A second report of the same connection keeps the first time.
    db.apply(&running, Timestamp(9_000)).await.unwrap();
    let connected = |snapshot: &RunSnapshot| -> Vec<(String, Option<Timestamp>)> {
        snapshot
            .jobs
            .iter()
            .map(|job| (job.id.clone(), job.attempt_connected_at))
            .collect()
    };
    let want = vec![
        ("a".to_string(), Some(Timestamp(5_000))),
        ("b".to_string(), None),
    ];
    let one = db.run_snapshot("r1").await.unwrap().unwrap();
    assert_eq!(connected(&one), want);
    let all = db.unfinished_runs().await.unwrap();
    assert_eq!(connected(&all[0]), want);
}

async fn claims_are_guarded_by_status_attempt_and_the_limits(backend: Backend) {
    let Some((_dir, db)) = db_with_jobs(backend, &["a", "b", "c"]).await else {
        return;
    };
    let now = Timestamp(1_000);
    let lease = Timestamp(31_000);
    let (won, lost) = db
        .claim(
            "core/1",
            &[claim("a", 0), claim("b", 0), claim("c", 0)],
            lease,
            2,
            10,
            now,
        )
        .await
        .unwrap();
    assert_eq!(won, ["a", "b"]);
    assert_eq!(lost, ["c"], "the global limit holds inside the claim");
    // A second claim of a job already claimed loses (exactly-once dispatch).
    let (won, lost) = db
        .claim("core/2", &[claim("a", 0)], lease, 10, 10, now)
        .await
        .unwrap();
    assert!(won.is_empty() && lost == ["a"]);
    let snapshot = db.run_snapshot("r1").await.unwrap().unwrap();
    let a = snapshot.jobs.iter().find(|j| j.id == "a").unwrap();
    assert_eq!(a.status, JobStatus::Provisioning);
    assert_eq!(a.attempt, 1);
    assert_eq!(a.lease_owner.as_deref(), Some("core/1"));
    // Per-environment limit.
    let (won, _) = db
        .claim("core/1", &[claim("c", 0)], lease, 10, 2, now)
        .await
        .unwrap();
    assert!(won.is_empty());
}

/// A restarted core (same `core_id`, new incarnation) takes its predecessor's attempts at
/// once; any other core only once their lease ran out in the store.
async fn an_earlier_incarnation_s_attempts_are_taken_before_their_lease_runs_out(backend: Backend) {
    let Some((_dir, db)) = db_with_jobs(backend, &["a", "b"]).await else {
        return;
    };
    let now = Timestamp(1_000);
    db.claim(
        "core/old",
        &[claim("a", 0), claim("b", 0)],
        Timestamp(31_000),
        10,
        10,
        now,
    )
    .await
    .unwrap();
    let running = Transition::JobRunning {
        job_id: "a".into(),
        attempt: 1,
    };
    assert!(db.apply(&running, now).await.unwrap());
    let adopt = |predecessor: bool| Transition::AttemptAdopted {
        job_id: "a".into(),
        attempt: 1,
        from: "core/old".into(),
        owner: "core/new".into(),
        lease_until: Timestamp(32_000),
        predecessor,
    };
    let later = Timestamp(2_000);
    assert!(
        !db.apply(&adopt(false), later).await.unwrap(),
        "another core waits for the lease"
    );
    assert!(db.apply(&adopt(true), later).await.unwrap());
    let end = |predecessor: bool| Transition::AttemptEnded {
        job_id: "b".into(),
        attempt: 1,
        owner: "core/old".into(),
        takeover: true,
        predecessor,
        result: AttemptResult::Infrastructure,
        message: Some("lease_expired: gone".into()),
        end: JobEnd::Requeued {
            not_before: later,
            infra_failures: 1,
        },
    };
    assert!(!db.apply(&end(false), later).await.unwrap());
    assert!(db.apply(&end(true), later).await.unwrap());
}

async fn an_attempt_ends_only_under_its_owner_and_its_token_dies_with_it(backend: Backend) {
    let Some((_dir, db)) = db_with_jobs(backend, &["a"]).await else {
        return;
    };
    let now = Timestamp(1_000);
    db.claim("core/1", &[claim("a", 0)], Timestamp(31_000), 10, 10, now)
        .await
        .unwrap();
    assert_eq!(
        db.attempt_for_token("hash-a-1").await.unwrap(),
        Some(("a".to_string(), 1)),
        "the claim binds the attempt's token"
    );
    assert!(db.set_attempt_token("a", 1, "hash-1").await.unwrap());
    assert_eq!(db.attempt_for_token("hash-a-1").await.unwrap(), None);
    assert_eq!(
        db.attempt_for_token("hash-1").await.unwrap(),
        Some(("a".to_string(), 1))
    );
    db.record_instance(
        &InstanceRecord {
            instance_id: "i-1",
            provider: "ec2",
            job_id: "a",
            attempt: 1,
            owner: "core/1",
            instance_type: "c5.xlarge",
            market: Some("on-demand"),
            placement: Some("spot capacity ran out: on-demand instead"),
            expires_at: Timestamp(20_000),
        },
        Timestamp(now_ms()),
    )
    .await
    .unwrap();
    let reap = |at: i64| {
        let db = db.clone();
        async move {
            let (instances, attempts) = db.reap_facts().await.unwrap();
            stagely_engine::reaper::plan(
                &instances,
                &attempts,
                Timestamp(at),
                std::time::Duration::ZERO,
            )
        }
    };
    assert!(reap(1_000).await.is_empty(), "lease holds, lifetime left");
    assert_eq!(
        reap(25_000).await,
        [("i-1".to_string(), ReapReason::Lifetime)],
        "outlived its lifetime though its lease holds"
    );
    assert_eq!(
        reap(40_000).await,
        [("i-1".to_string(), ReapReason::LeaseExpired)]
    );
    let attempts = db.attempts_of_run("r1").await.unwrap();
    assert_eq!(attempts[0].instance_type.as_deref(), Some("c5.xlarge"));
    assert_eq!(attempts[0].market.as_deref(), Some("on-demand"));
    assert!(attempts[0].placement.as_deref().unwrap().contains("spot"));
    assert!(attempts[0].billed_from.is_some() && attempts[0].billed_until.is_none());
    let end = |owner: &str, attempt: u32| Transition::AttemptEnded {
        job_id: "a".into(),
        attempt,
        owner: owner.into(),
        takeover: false,
        predecessor: false,
        result: AttemptResult::Failed,
        message: Some("exit 1".into()),
        end: JobEnd::Failed {
            kind: FailureKind::Build,
            exit_code: Some(1),
            message: "exit 1".into(),
            infra_failures: 0,
        },
    };
    assert!(
        !db.apply(&end("core/2", 1), now).await.unwrap(),
        "wrong owner"
    );
    assert!(
        !db.apply(&end("core/1", 2), now).await.unwrap(),
        "wrong attempt"
    );
    assert!(db.apply(&end("core/1", 1), now).await.unwrap());
    assert!(
        !db.apply(&end("core/1", 1), now).await.unwrap(),
        "final is final"
    );
    assert_eq!(db.attempt_for_token("hash-1").await.unwrap(), None);
    assert_eq!(
        reap(1_000).await,
        [("i-1".to_string(), ReapReason::AttemptEnded)]
    );
    db.mark_instance_terminated("i-1", Timestamp(now_ms()))
        .await
        .unwrap();
    assert!(reap(1_000).await.is_empty());
    let billed = &db.attempts_of_run("r1").await.unwrap()[0];
    assert!(
        billed.billed_until >= billed.billed_from,
        "billing ends at termination"
    );
    let job = db.job("a").await.unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Failed);
    assert_eq!(job.failure_kind.as_deref(), Some("build"));
    let attempts = db.attempts_of_run("r1").await.unwrap();
    assert_eq!(attempts[0].result.as_deref(), Some("failed"));
}

async fn duplicate_log_lines_are_stored_once(backend: Backend) {
    let Some((_dir, db)) = db_with_jobs(backend, &["j1"]).await else {
        return;
    };
    let line = |seq| NewLogLine {
        seq,
        stream: "stdout",
        line: format!("line {seq}\n"),
        continued: false,
    };
    db.append_logs("j1", &[line(1), line(2)], Timestamp(now_ms()))
        .await
        .unwrap();
    db.append_logs("j1", &[line(2), line(3)], Timestamp(now_ms()))
        .await
        .unwrap();
    assert_eq!(db.last_log_seq("j1").await.unwrap(), 3);
    let page = db.logs_page("j1", 0, 10).await.unwrap();
    assert_eq!(page.iter().map(|l| l.seq).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(db.log_stats("j1").await.unwrap(), (3, 21));
}

async fn chunked_logs_page_across_chunks_and_read_older_rows_alongside(backend: Backend) {
    let Some((_dir, db)) = db_with_jobs(backend, &["j1"]).await else {
        return;
    };
    // Lines stored one per row by an earlier version: seqs 1..=3.
    for seq in 1..=3i64 {
        sqlx_insert_legacy(&db, seq).await;
    }
    // Then chunks: 4..=2003 in batches of 500, with a gap at 1000 (a capped line) and
    // lines big enough that a batch spans several chunk rows.
    let big = "z".repeat(3000);
    let mut seq = 4;
    while seq <= 2003 {
        let batch: Vec<NewLogLine> = (seq..(seq + 500).min(2004))
            .filter(|s| *s != 1000)
            .map(|s| NewLogLine {
                seq: s,
                stream: if s % 2 == 0 { "stdout" } else { "stderr" },
                line: format!("{s} {big}\n"),
                continued: false,
            })
            .collect();
        db.append_logs("j1", &batch, Timestamp(now_ms()))
            .await
            .unwrap();
        seq += 500;
    }
    assert_eq!(db.last_log_seq("j1").await.unwrap(), 2003);
    // Page through with odd page sizes: every line once, in order, the gap kept.
    let mut after = 0;
    let mut seen = Vec::new();
    loop {
        let page = db.logs_page("j1", after, 37).await.unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 37);
        after = page.last().unwrap().seq;
        seen.extend(page);
    }
    let expected: Vec<i64> = (1..=2003).filter(|s| *s != 1000).collect();
    assert_eq!(seen.iter().map(|l| l.seq).collect::<Vec<_>>(), expected);
    assert_eq!(seen[0].line, "legacy 1\n");
    assert_eq!(
        seen[10].stream,
        if seen[10].seq % 2 == 0 {
            "stdout"
        } else {
            "stderr"
        }
    );
    assert!(seen[10].line.starts_with(&format!("{} zzz", seen[10].seq)));
    let (count, bytes) = db.log_stats("j1").await.unwrap();
    assert_eq!(count, expected.len() as i64);
    assert_eq!(bytes, seen.iter().map(|l| l.line.len() as i64).sum::<i64>());
    // A batch that overlaps what is stored keeps only its new lines.
    let overlap: Vec<NewLogLine> = (2000..=2005)
        .map(|s| NewLogLine {
            seq: s,
            stream: "stdout",
            line: format!("again {s}\n"),
            continued: false,
        })
        .collect();
    db.append_logs("j1", &overlap, Timestamp(now_ms()))
        .await
        .unwrap();
    let tail = db.logs_page("j1", 1999, 100).await.unwrap();
    let tail: Vec<(i64, &str)> = tail.iter().map(|l| (l.seq, l.line.as_str())).collect();
    assert_eq!(tail.len(), 6);
    assert!(tail[..4].iter().all(|(_, l)| !l.starts_with("again")));
    assert_eq!(tail[4], (2004, "again 2004\n"));
    // Repetitive lines were stored packed; lines LZ4 cannot shrink (random hex) as text.
    let (packed, text) = db.chunk_forms_for_tests("j1").await.unwrap();
    assert!(packed > 0, "packed {packed}, text {text}");
    let noise: Vec<NewLogLine> = (2006..=2010)
        .map(|s| NewLogLine {
            seq: s,
            stream: "stdout",
            line: chunks::random_hex_for_tests(s as u64, 256) + "\n",
            continued: false,
        })
        .collect();
    db.append_logs("j1", &noise, Timestamp(now_ms()))
        .await
        .unwrap();
    assert_eq!(
        db.chunk_forms_for_tests("j1").await.unwrap(),
        (packed, text + 1)
    );
    let read: Vec<String> = db
        .logs_page("j1", 2005, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|row| row.line)
        .collect();
    let written: Vec<String> = noise.into_iter().map(|line| line.line).collect();
    assert_eq!(read, written);
}

/// A line as an earlier version stored it (one row in `build_logs`).
async fn sqlx_insert_legacy(db: &Db, seq: i64) {
    db.insert_legacy_log_line_for_tests("j1", seq, &format!("legacy {seq}\n"))
        .await
        .unwrap();
}

async fn logs_of_runs_finished_before_the_cutoff_are_deleted_and_no_others(backend: Backend) {
    let Some((_dir, db)) = db_with_jobs(backend, &["j1", "j2"]).await else {
        return;
    };
    let line = |seq| NewLogLine {
        seq,
        stream: "stdout",
        line: format!("line {seq}\n"),
        continued: false,
    };
    for job in ["j1", "j2"] {
        db.append_logs(job, &[line(1), line(2)], Timestamp(now_ms()))
            .await
            .unwrap();
    }
    let finished_at = 50_000;
    assert_eq!(
        db.delete_logs_of_runs_finished_before(i64::MAX, 10)
            .await
            .unwrap(),
        0,
        "an unfinished run keeps its logs whatever its age"
    );
    for job in ["j1", "j2"] {
        let skipped = Transition::JobSkipped {
            job_id: job.into(),
            status: JobStatus::Cancelled,
            message: "cancelled".into(),
        };
        assert!(db.apply(&skipped, Timestamp(finished_at)).await.unwrap());
    }
    let finished = Transition::RunFinished {
        run_id: "r1".into(),
        status: RunStatus::Cancelled,
        message: None,
    };
    assert!(db.apply(&finished, Timestamp(finished_at)).await.unwrap());
    assert_eq!(
        db.delete_logs_of_runs_finished_before(finished_at, 10)
            .await
            .unwrap(),
        0,
        "finished at the cutoff, not before it"
    );
    // One job per batch: the caller repeats until nothing is left.
    assert_eq!(
        db.delete_logs_of_runs_finished_before(finished_at + 1, 1)
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        db.delete_logs_of_runs_finished_before(finished_at + 1, 1)
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        db.delete_logs_of_runs_finished_before(finished_at + 1, 1)
            .await
            .unwrap(),
        0
    );
    assert!(db.logs_page("j1", 0, 10).await.unwrap().is_empty());
    assert!(
        db.run("r1").await.unwrap().is_some(),
        "the run itself stays"
    );
}

/// PostgreSQL's claims read the live counts a trigger keeps: they must equal a count of
/// the live jobs after claims, ends, requeues and a deleted run.
#[tokio::test]
async fn postgres_live_counts_follow_every_status_change() {
    let Some((scratch, db)) = db_with_jobs(Backend::Postgres, &["a", "b", "c"]).await else {
        return;
    };
    let Scratch::Pg(PgScratch { name }) = &scratch else {
        unreachable!("a PostgreSQL database")
    };
    let pool = sqlx::PgPool::connect(&format!("postgres://postgres@127.0.0.1:5432/{name}"))
        .await
        .unwrap();
    let kept = || async {
        let counted: Vec<(String, i64)> = sqlx::query_as(
            "SELECT environment_id, live FROM live_counts WHERE live <> 0 ORDER BY 1",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        let truth: Vec<(String, i64)> = sqlx::query_as(
            "SELECT r.environment_id, COUNT(*) FROM build_jobs j JOIN workflow_runs r ON r.id = j.workflow_run_id
             WHERE j.status IN ('provisioning', 'running') GROUP BY 1 ORDER BY 1",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        assert_eq!(counted, truth, "the kept counts equal a count of live jobs");
        counted.iter().map(|(_, live)| *live).sum::<i64>()
    };
    let now = Timestamp(1_000);
    let lease = Timestamp(31_000);
    assert_eq!(kept().await, 0);
    db.claim(
        "core/1",
        &[claim("a", 0), claim("b", 0), claim("c", 0)],
        lease,
        10,
        10,
        now,
    )
    .await
    .unwrap();
    assert_eq!(kept().await, 3);
    assert!(
        db.apply(
            &Transition::JobRunning {
                job_id: "a".into(),
                attempt: 1
            },
            now
        )
        .await
        .unwrap()
    );
    assert_eq!(kept().await, 3, "provisioning → running stays live");
    let ended = |job: &str, end: JobEnd| Transition::AttemptEnded {
        job_id: job.into(),
        attempt: 1,
        owner: "core/1".into(),
        takeover: false,
        predecessor: false,
        result: AttemptResult::Infrastructure,
        message: None,
        end,
    };
    let requeue = JobEnd::Requeued {
        not_before: now,
        infra_failures: 1,
    };
    assert!(db.apply(&ended("a", requeue), now).await.unwrap());
    assert_eq!(kept().await, 2, "a requeued job is not live");
    let failed = JobEnd::Failed {
        kind: FailureKind::Build,
        exit_code: Some(1),
        message: "exit 1".into(),
        infra_failures: 0,
    };
    assert!(db.apply(&ended("b", failed), now).await.unwrap());
    assert_eq!(kept().await, 1);
    db.claim("core/1", &[claim("a", 1)], lease, 10, 10, now)
        .await
        .unwrap();
    assert_eq!(kept().await, 2, "claimed again");
    sqlx::query("DELETE FROM workflow_runs WHERE id = 'r1'")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(kept().await, 0, "a deleted run's live jobs leave the count");
}

#[tokio::test]
async fn sqlite_log_chunks_live_in_their_own_file_with_large_pages_and_older_ones_move_there() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    // A database as versions before the log file left it: migrated up to 0005, one chunk
    // in the main file.
    {
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .foreign_keys(false);
        let mut connection = sqlx::SqliteConnection::connect_with(&options)
            .await
            .unwrap();
        let mut migrator = sqlx::migrate!("./migrations/sqlite");
        migrator.migrations = migrator
            .migrations
            .iter()
            .filter(|migration| migration.version <= 5)
            .cloned()
            .collect::<Vec<_>>()
            .into();
        migrator.run(&mut connection).await.unwrap();
        // (No job row: this is about where the chunk goes, not whose it is.)
        sqlx::query("PRAGMA foreign_keys = OFF")
            .execute(&mut connection)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO log_chunks (build_job_id, first_seq, last_seq, stored_at, line_count, bytes, data)
             VALUES ('old-job', 1, 2, 0, 2, 12, '1 o 6\nhello\n2 e 6\nworld\n')",
        )
        .execute(&mut connection)
        .await
        .unwrap();
        connection.close().await.unwrap();
    }
    let store = sqlite::SqliteStore::open(&path).await.unwrap();
    assert!(sqlite::logs_path(&path).exists());
    let pragma = |sql: &'static str| {
        let pool = store.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(pragma("PRAGMA main.page_size").await, 4096);
    assert_eq!(pragma("PRAGMA logs.page_size").await, 65536);
    assert_eq!(
        pragma("SELECT COUNT(*) FROM main.sqlite_master WHERE name = 'log_chunks'").await,
        0
    );
    assert_eq!(
        pragma("SELECT COUNT(*) FROM logs.sqlite_master WHERE name = 'log_chunks'").await,
        1
    );
    // The moved chunk reads back; new lines follow it into the log file.
    let db = Db(Arc::new(store));
    db.append_logs(
        "old-job",
        &[NewLogLine {
            seq: 3,
            stream: "stdout",
            line: "again\n".into(),
            continued: false,
        }],
        Timestamp(now_ms()),
    )
    .await
    .unwrap();
    let page = db.logs_page("old-job", 0, 10).await.unwrap();
    let lines: Vec<(i64, &str, &str)> = page
        .iter()
        .map(|row| (row.seq, row.stream.as_str(), row.line.as_str()))
        .collect();
    assert_eq!(
        lines,
        [
            (1, "stdout", "hello\n"),
            (2, "stderr", "world\n"),
            (3, "stdout", "again\n")
        ]
    );
    // Opened again (both files exist): nothing moves twice, nothing is lost.
    drop(db);
    let db = Db::open_sqlite(&path).await.unwrap();
    assert_eq!(db.log_stats("old-job").await.unwrap(), (3, 18));
}

#[tokio::test]
async fn the_schema_refuses_bad_values() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite::SqliteStore::open(&dir.path().join("raw.db"))
        .await
        .unwrap();
    let bad = sqlx::query(
        "INSERT INTO workflow_runs (id, environment_id, trigger, status, repo_url, commit_hash, branch, created_at, updated_at)
         VALUES ('x', 'e', 'manual', 'exploded', '/r', 'c', 'main', 0, 0)",
    )
    .execute(&store.pool)
    .await;
    assert!(bad.is_err());
}
