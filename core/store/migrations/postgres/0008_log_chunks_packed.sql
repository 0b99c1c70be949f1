-- A chunk may be stored packed (LZ4; see core/src/db/chunks.rs `pack`): `packed` then holds
-- it and `data` is empty. Chunks written before, and those packing does not shrink, keep
-- their text in `data` with `packed` NULL. Packed bytes are stored out of line as they are:
-- TOAST's own compression would only spend time on them.
ALTER TABLE log_chunks ADD COLUMN packed BYTEA;
ALTER TABLE log_chunks ALTER COLUMN packed SET STORAGE EXTERNAL;
