-- Dead-letter redrive (`pipeline dlq replay`, docs/repair.md): a dead letter whose record now
-- decodes and is accepted is written to its table with its source partition and offset, and
-- marked redriven in the same transaction; one that still fails keeps its row with the new
-- error class and reason. A redriven letter is never taken again.
ALTER TABLE dead_letters
    ADD COLUMN attempts          integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    ADD COLUMN last_attempt_at   timestamptz,
    ADD COLUMN redriven_at       timestamptz,
    ADD COLUMN redriven_batch_id bigint,
    ADD CONSTRAINT dead_letters_redriven_in_a_batch
        CHECK ((redriven_at IS NULL) = (redriven_batch_id IS NULL));

-- What a redrive looks for: the group's letters not redriven yet, in id order.
CREATE INDEX dead_letters_pending ON dead_letters (group_id, id) WHERE redriven_at IS NULL;

-- The writer reads and updates the letters it redrives (FOR UPDATE needs UPDATE), inserts into
-- the data tables and takes batch ids: 003_roles.sql granted all of it on whole tables, which
-- covers the new columns. Said again here so that this migration alone states what it needs.
GRANT SELECT, UPDATE ON dead_letters TO pipeline_writer;
GRANT SELECT ON dead_letters TO pipeline_reader;
