-- The deployment this database belongs to: one id shared by every replica that uses it.
-- Each instance is tagged with it (`stagely:deployment`), so a surviving replica can reap
-- the instances a dead replica launched but never recorded; instances of other deployments
-- (another database) in the same account never carry it.
CREATE TABLE deployment (
    id TEXT PRIMARY KEY NOT NULL
);
INSERT INTO deployment (id) VALUES (replace(gen_random_uuid()::text, '-', ''));
