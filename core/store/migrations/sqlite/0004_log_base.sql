-- Agents reconnect: the core that resumes an attempt (after a dropped connection, a restart
-- or on another replica) must number its lines as the first link did. Stored seq = log_base
-- + the agent's seq; log_base is the number of lines stored before the attempt's first
-- (earlier attempts' lines and the attempt's own header).
ALTER TABLE job_attempts ADD COLUMN log_base BIGINT NOT NULL DEFAULT 0;
