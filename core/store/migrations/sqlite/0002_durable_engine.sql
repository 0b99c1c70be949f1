-- no-transaction
-- The durable engine: runs and jobs gain `cancelled`, fail-fast, attempts, leases and retry
-- state; every attempt gets its own row (instance, owner, hashed agent token, outcome);
-- instances name their attempt and owning core. SQLite cannot change a CHECK constraint in
-- place, so the two tables are rebuilt (SQLite's documented procedure: foreign keys off, new
-- table, copy, drop, rename, check, foreign keys on).
PRAGMA foreign_keys = OFF;
BEGIN;

CREATE TABLE workflow_runs_new (
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
    -- `user`, `superseded:<run id>` or `fail_fast:<job name>` once a cancel was requested.
    cancel_reason TEXT NULL,
    CONSTRAINT valid_status CHECK (status IN (
        'pending', 'building', 'deploying', 'testing', 'completed', 'failed', 'cancelled'
    ))
);
INSERT INTO workflow_runs_new (id, environment_id, trigger, status, repo_url, commit_hash, branch,
    config_path, error_message, created_at, updated_at)
SELECT id, environment_id, trigger, status, repo_url, commit_hash, branch, config_path,
    error_message, created_at, updated_at FROM workflow_runs;
DROP TABLE workflow_runs;
ALTER TABLE workflow_runs_new RENAME TO workflow_runs;
CREATE INDEX idx_workflow_runs_env ON workflow_runs(environment_id, created_at);
CREATE INDEX idx_workflow_runs_status ON workflow_runs(status);

CREATE TABLE build_jobs_new (
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
    -- Position in the run (FIFO order within a run).
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
INSERT INTO build_jobs_new (id, workflow_run_id, name, status, architecture, platform, machine,
    spec, vm_id, artifact_url, digest, created_at, started_at, completed_at, exit_code,
    error_message)
SELECT id, workflow_run_id, name, status, architecture, platform, machine, spec, vm_id,
    artifact_url, digest, created_at, started_at, completed_at, exit_code, error_message
FROM build_jobs;
DROP TABLE build_jobs;
ALTER TABLE build_jobs_new RENAME TO build_jobs;
CREATE INDEX idx_build_jobs_workflow ON build_jobs(workflow_run_id);
CREATE INDEX idx_build_jobs_status ON build_jobs(status);

-- One row per attempt of a job. The agent token is stored as its SHA-256 (hex) and is valid
-- while the attempt has not ended; any replica can accept the agent.
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

ALTER TABLE builder_instances ADD COLUMN attempt INT NULL;
ALTER TABLE builder_instances ADD COLUMN owner TEXT NULL;

COMMIT;
PRAGMA foreign_keys = ON;
