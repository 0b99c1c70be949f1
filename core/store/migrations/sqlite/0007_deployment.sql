-- The deployment this database belongs to (see the PostgreSQL migration 0007): instances are
-- tagged with it (`stagely:deployment`), so the reaper finds every instance this deployment
-- launched and never recorded, whichever core launched it.
CREATE TABLE deployment (
    id TEXT PRIMARY KEY NOT NULL
);
INSERT INTO deployment (id) VALUES (lower(hex(randomblob(16))));
