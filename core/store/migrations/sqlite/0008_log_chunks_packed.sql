-- A chunk may be stored packed (LZ4; see core/src/db/chunks.rs `pack`): `packed` then holds
-- it and `data` is empty. Chunks written before, and those packing does not shrink, keep
-- their text in `data` with `packed` NULL.
ALTER TABLE logs.log_chunks ADD COLUMN packed BLOB;
