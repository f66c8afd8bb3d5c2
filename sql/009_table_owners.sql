-- One group per data table (docs/exactly-once.md, "One group per table"). A data row names
-- its source partition and offset, not its group or topic: a rollback or a replay deletes
-- rows by partition and offset, so a second group writing the same table (another group id,
-- or the same one under another PIPELINE_TOPIC_PREFIX) would lose its rows to the first
-- group's rollback. Rows stay narrow (COPY writes no group column); the table's owner is
-- recorded here instead, claimed by the first agent or replay that writes it, checked by
-- every other one at start and by every rollback and replay before it deletes.
CREATE TABLE IF NOT EXISTS table_owners (
    table_name text        PRIMARY KEY,
    group_id   text        NOT NULL,
    topic      text        NOT NULL,  -- the deployed topic whose records the table holds
    claimed_at timestamptz NOT NULL DEFAULT now()
);

-- The writer claims (INSERT ... ON CONFLICT DO NOTHING) and reads; it never hands a table
-- over: releasing one is the migrator's (`pipeline owners release`, docs/operations.md). 007_least_privilege.sql's default privileges gave it UPDATE and DELETE too.
REVOKE UPDATE, DELETE, TRUNCATE ON table_owners FROM pipeline_writer;
GRANT SELECT, INSERT ON table_owners TO pipeline_writer;
GRANT SELECT ON table_owners TO pipeline_reader;
