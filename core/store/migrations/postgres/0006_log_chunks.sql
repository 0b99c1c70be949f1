-- Logs in chunks: many lines per row (see core/src/db/chunks.rs for the text format), so a
-- chatty build costs one insert per batch. Lines stored one per row in build_logs by earlier
-- versions stay there and are read alongside.
CREATE TABLE log_chunks (
    build_job_id TEXT NOT NULL REFERENCES build_jobs(id) ON DELETE CASCADE,
    first_seq BIGINT NOT NULL,
    last_seq BIGINT NOT NULL,
    stored_at BIGINT NOT NULL,
    line_count BIGINT NOT NULL,
    bytes BIGINT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (build_job_id, first_seq)
);
CREATE INDEX idx_log_chunks_last ON log_chunks(build_job_id, last_seq);
