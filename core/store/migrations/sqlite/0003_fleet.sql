-- The EC2 fleet: what each instance is (type, market) and until when it may live (job
-- timeout + boot timeout + a margin; the reaper terminates it after, whatever its attempt
-- says), and per attempt where it ran, how it was placed (spot fell back to on-demand, arm64
-- emulated) and the span it is billed for (its instance's launch, or the handover of a merge
-- on the last builder, until the instance is terminated or handed over). Costs are computed
-- from these with the configured price table, never stored.
ALTER TABLE builder_instances ADD COLUMN instance_type TEXT NULL;
ALTER TABLE builder_instances ADD COLUMN market TEXT NULL;
ALTER TABLE builder_instances ADD COLUMN expires_at BIGINT NULL;
ALTER TABLE job_attempts ADD COLUMN instance_type TEXT NULL;
ALTER TABLE job_attempts ADD COLUMN market TEXT NULL;
ALTER TABLE job_attempts ADD COLUMN placement TEXT NULL;
ALTER TABLE job_attempts ADD COLUMN billed_from BIGINT NULL;
ALTER TABLE job_attempts ADD COLUMN billed_until BIGINT NULL;
CREATE INDEX idx_job_attempts_instance ON job_attempts(instance_id);
