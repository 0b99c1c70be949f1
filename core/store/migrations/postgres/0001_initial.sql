-- The whole schema for PostgreSQL (the SQLite migrations reach the same shape in two steps).
-- TEXT ids (UUIDs), BIGINT unix-millisecond times, JSON as TEXT, statuses as checked text.

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
    fail_fast BOOLEAN NOT NULL DEFAULT TRUE,
    cancel_reason TEXT NULL,
    CONSTRAINT valid_status CHECK (status IN (
        'pending', 'building', 'deploying', 'testing', 'completed', 'failed', 'cancelled'
    ))
);
CREATE INDEX idx_workflow_runs_env ON workflow_runs(environment_id, created_at);
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
    ordinal INT NOT NULL DEFAULT 0,
    attempt INT NOT NULL DEFAULT 0,
    infra_failures INT NOT NULL DEFAULT 0,
    lease_owner TEXT NULL,
    lease_until BIGINT NULL,
    not_before BIGINT NULL,
    failure_kind VARCHAR(20) NULL,
    merge_path VARCHAR(20) NULL,
    CONSTRAINT valid_job_status CHECK (status IN (
        'queued', 'provisioning', 'running', 'completed', 'failed', 'cancelled'
    )),
    CONSTRAINT valid_architecture CHECK (architecture IN ('amd64', 'arm64', 'multi')),
    CONSTRAINT valid_failure_kind CHECK (failure_kind IS NULL OR failure_kind IN (
        'build', 'timeout', 'infrastructure', 'protocol'
    )),
    CONSTRAINT valid_merge_path CHECK (merge_path IS NULL OR merge_path IN (
        'last_builder', 'fresh_instance'
    )),
    CONSTRAINT unique_job_name UNIQUE (workflow_run_id, name)
);
CREATE INDEX idx_build_jobs_workflow ON build_jobs(workflow_run_id);
CREATE INDEX idx_build_jobs_status ON build_jobs(status);

-- One row per output line; (build_job_id, seq) drops a line resent after a reconnect.
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

CREATE TABLE job_attempts (
    build_job_id TEXT NOT NULL REFERENCES build_jobs(id) ON DELETE CASCADE,
    number INT NOT NULL,
    owner TEXT NOT NULL,
    token_hash TEXT NULL UNIQUE,
    instance_id TEXT NULL,
    merge_path VARCHAR(20) NULL,
    started_at BIGINT NOT NULL,
    connected_at BIGINT NULL,
    ended_at BIGINT NULL,
    result VARCHAR(20) NULL,
    message TEXT NULL,
    PRIMARY KEY (build_job_id, number),
    CONSTRAINT valid_result CHECK (result IS NULL OR result IN (
        'completed', 'failed', 'cancelled', 'infrastructure'
    ))
);

CREATE TABLE builder_instances (
    id TEXT PRIMARY KEY,
    provider VARCHAR(20) NOT NULL,
    build_job_id TEXT NULL REFERENCES build_jobs(id) ON DELETE SET NULL,
    created_at BIGINT NOT NULL,
    terminated_at BIGINT NULL,
    attempt INT NULL,
    owner TEXT NULL
);
CREATE INDEX idx_builder_instances_live ON builder_instances(terminated_at);
