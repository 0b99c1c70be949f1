-- The design seed's tables, in portable SQL: TEXT ids (UUIDs), BIGINT unix-millisecond times,
-- JSON as TEXT. The seed's environments table does not exist yet, so environment_id is a plain
-- identifier without a foreign key.

CREATE TABLE workflow_runs (
    id TEXT PRIMARY KEY,
    environment_id TEXT NOT NULL,
    trigger VARCHAR(50) NOT NULL,
    status VARCHAR(20) NOT NULL DEFAULT 'pending',
    repo_url TEXT NOT NULL,
    commit_hash TEXT NOT NULL,
    branch TEXT NOT NULL,
    config_path TEXT NOT NULL DEFAULT '',
    error_message TEXT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    CONSTRAINT valid_status CHECK (status IN (
        'pending', 'building', 'deploying', 'testing', 'completed', 'failed'
    ))
);

CREATE INDEX idx_workflow_runs_env ON workflow_runs(environment_id);
CREATE INDEX idx_workflow_runs_status ON workflow_runs(status);

CREATE TABLE build_jobs (
    id TEXT PRIMARY KEY,
    workflow_run_id TEXT NOT NULL REFERENCES workflow_runs(id) ON DELETE CASCADE,
    name VARCHAR(100) NOT NULL,
    status VARCHAR(20) NOT NULL DEFAULT 'queued',
    architecture VARCHAR(20) NOT NULL,
    platform TEXT NOT NULL,
    machine VARCHAR(20) NOT NULL,
    spec TEXT NOT NULL,
    vm_id VARCHAR(255) NULL,
    artifact_url TEXT NULL,
    digest TEXT NULL,
    created_at BIGINT NOT NULL,
    started_at BIGINT NULL,
    completed_at BIGINT NULL,
    exit_code INT NULL,
    error_message TEXT NULL,
    CONSTRAINT valid_job_status CHECK (status IN (
        'queued', 'provisioning', 'running', 'completed', 'failed'
    )),
    CONSTRAINT valid_architecture CHECK (architecture IN ('amd64', 'arm64', 'multi')),
    CONSTRAINT unique_job_name UNIQUE (workflow_run_id, name)
);

CREATE INDEX idx_build_jobs_workflow ON build_jobs(workflow_run_id);
CREATE INDEX idx_build_jobs_status ON build_jobs(status);

-- One row per output line. (build_job_id, seq) is the key: a line resent after a reconnect
-- is dropped by the primary key, so every line is stored exactly once.
CREATE TABLE build_logs (
    build_job_id TEXT NOT NULL REFERENCES build_jobs(id) ON DELETE CASCADE,
    seq BIGINT NOT NULL,
    timestamp BIGINT NOT NULL,
    stream VARCHAR(10) NOT NULL,
    line TEXT NOT NULL,
    PRIMARY KEY (build_job_id, seq),
    CONSTRAINT valid_stream CHECK (stream IN ('stdout', 'stderr', 'system'))
);

CREATE INDEX idx_build_logs_job ON build_logs(build_job_id, timestamp);

-- Every instance the core asked a provider for, so a restarted core can terminate what an
-- earlier process started (nothing leaks across a crash).
CREATE TABLE builder_instances (
    id TEXT PRIMARY KEY,
    provider VARCHAR(20) NOT NULL,
    build_job_id TEXT NULL REFERENCES build_jobs(id) ON DELETE SET NULL,
    created_at BIGINT NOT NULL,
    terminated_at BIGINT NULL
);

CREATE INDEX idx_builder_instances_live ON builder_instances(terminated_at);
