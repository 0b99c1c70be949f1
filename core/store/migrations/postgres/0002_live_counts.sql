-- Live jobs (provisioning or running) per environment, kept by a trigger in the same
-- transaction as every status change: a claim reads the counts the instance limits need
-- from a few narrow rows instead of counting live jobs across the wide jobs table.
CREATE TABLE live_counts (
    environment_id TEXT PRIMARY KEY,
    live BIGINT NOT NULL
);

INSERT INTO live_counts (environment_id, live)
SELECT r.environment_id, COUNT(*)
FROM build_jobs j JOIN workflow_runs r ON r.id = j.workflow_run_id
WHERE j.status IN ('provisioning', 'running')
GROUP BY r.environment_id;

CREATE FUNCTION stagely_count_live() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    was_live BOOLEAN := TG_OP <> 'INSERT' AND OLD.status IN ('provisioning', 'running');
    is_live BOOLEAN := TG_OP <> 'DELETE' AND NEW.status IN ('provisioning', 'running');
    run_id TEXT;
    environment TEXT;
BEGIN
    IF was_live = is_live THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'DELETE' THEN
        run_id := OLD.workflow_run_id;
    ELSE
        run_id := NEW.workflow_run_id;
    END IF;
    SELECT r.environment_id INTO environment FROM workflow_runs r WHERE r.id = run_id;
    IF environment IS NULL THEN
        -- The run is being deleted with its jobs: its count went first (below).
        RETURN NULL;
    END IF;
    IF is_live THEN
        INSERT INTO live_counts (environment_id, live) VALUES (environment, 1)
        ON CONFLICT (environment_id) DO UPDATE SET live = live_counts.live + 1;
    ELSE
        UPDATE live_counts SET live = live - 1 WHERE environment_id = environment;
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER build_jobs_live_count
AFTER INSERT OR DELETE OR UPDATE OF status ON build_jobs
FOR EACH ROW EXECUTE FUNCTION stagely_count_live();

-- A run deleted with its jobs (the cascade cannot find the run any more): its live jobs
-- leave the count first.
CREATE FUNCTION stagely_uncount_run() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE live_counts SET live = live - (
        SELECT COUNT(*) FROM build_jobs
        WHERE workflow_run_id = OLD.id AND status IN ('provisioning', 'running'))
    WHERE environment_id = OLD.environment_id;
    RETURN OLD;
END;
$$;

CREATE TRIGGER workflow_runs_live_count
BEFORE DELETE ON workflow_runs
FOR EACH ROW EXECUTE FUNCTION stagely_uncount_run();
