-- The name of the API token (`[api.tokens]` entry, or STAGELY_API_TOKEN) that submitted or
-- rebuilt the run. NULL for runs stored before it was recorded.
ALTER TABLE workflow_runs ADD COLUMN submitted_by TEXT;
