-- A claim in one round trip: called as one statement (its own transaction), it takes the
-- advisory lock that serializes the claims of every replica, then, claim by claim in the
-- given order, locks the job row (a row another transaction holds is skipped: lost), checks
-- the instance limits against the live counts (`live_counts`, read after the lock, so
-- current), and takes the attempt: the guarded update of the job (still queued at the
-- expected attempt) and the attempt row with its agent token's hash. Returns the won jobs.
-- A merge that reuses the last builder's instance (`reuses`) is not held to the limits.
CREATE FUNCTION stagely_claim(
    lock_key BIGINT,
    claim_owner TEXT,
    job_ids TEXT[],
    attempts INT[],
    expected INT[],
    environments TEXT[],
    reuses BOOLEAN[],
    token_hashes TEXT[],
    lease_until_ms BIGINT,
    now_ms BIGINT,
    max_live BIGINT,
    max_live_per_environment BIGINT
) RETURNS SETOF TEXT LANGUAGE plpgsql AS $$
DECLARE
    live BIGINT;
    in_environment BIGINT;
    taken INT;
BEGIN
    PERFORM pg_advisory_xact_lock(lock_key);
    SELECT COALESCE(SUM(l.live), 0) INTO live FROM live_counts l;
    FOR i IN 1 .. COALESCE(array_length(job_ids, 1), 0) LOOP
        PERFORM 1 FROM build_jobs j WHERE j.id = job_ids[i] AND j.status = 'queued'
            FOR UPDATE SKIP LOCKED;
        CONTINUE WHEN NOT FOUND;
        IF NOT reuses[i] THEN
            -- This transaction's own claims are in the count already (the trigger).
            SELECT COALESCE(MAX(l.live), 0) INTO in_environment
            FROM live_counts l WHERE l.environment_id = environments[i];
            CONTINUE WHEN live >= max_live OR in_environment >= max_live_per_environment;
        END IF;
        UPDATE build_jobs SET status = 'provisioning', attempt = attempts[i],
            lease_owner = claim_owner, lease_until = lease_until_ms, not_before = NULL,
            vm_id = NULL
        WHERE id = job_ids[i] AND status = 'queued' AND attempt = expected[i];
        GET DIAGNOSTICS taken = ROW_COUNT;
        CONTINUE WHEN taken <> 1;
        INSERT INTO job_attempts (build_job_id, number, owner, started_at, token_hash)
        VALUES (job_ids[i], attempts[i], claim_owner, now_ms, token_hashes[i]);
        IF NOT reuses[i] THEN
            live := live + 1;
        END IF;
        RETURN NEXT job_ids[i];
    END LOOP;
END;
$$;
