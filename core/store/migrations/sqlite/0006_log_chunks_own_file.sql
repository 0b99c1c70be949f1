-- Log chunks move to a database file of their own, attached to every connection as `logs`
-- (`<name>.logs.db` beside the main file; see core/src/db/sqlite.rs): it has 64 KiB pages,
-- so storing a 1 MiB chunk is a few large writes, while the main file keeps small pages for
-- the engine's small rows; and a log write takes only that file's write lock, never the one
-- the engine's transitions and claims wait on. Unqualified `log_chunks` finds this table once
-- the main one is gone. No foreign key can cross files: chunks go with their job through
-- retention (`delete_logs_of_runs_finished_before`), which deletes them by job.
CREATE TABLE IF NOT EXISTS logs.log_chunks (
    build_job_id TEXT NOT NULL,
    first_seq BIGINT NOT NULL,
    last_seq BIGINT NOT NULL,
    stored_at BIGINT NOT NULL,
    line_count BIGINT NOT NULL,
    bytes BIGINT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (build_job_id, first_seq)
);
INSERT OR IGNORE INTO logs.log_chunks
    SELECT build_job_id, first_seq, last_seq, stored_at, line_count, bytes, data FROM main.log_chunks;
DROP TABLE main.log_chunks;
CREATE INDEX IF NOT EXISTS logs.idx_log_chunks_last ON log_chunks(build_job_id, last_seq);
