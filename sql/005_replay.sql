-- Replays (docs/replay.md): `pipeline replay` reads a range of a stream's partitions again
-- and writes it exactly once. Its progress is kept here, moved by compare-and-set in the same
-- transaction as the rows it covers, as ingest_offsets is for live ingestion.

CREATE TABLE replays (
    id          bigserial   PRIMARY KEY,
    group_id    text        NOT NULL,  -- the live group: its stored offsets clamp the ranges
    streams     text[]      NOT NULL,
    request     jsonb       NOT NULL DEFAULT '{}',  -- --from, --to, --partitions as given
    notes       text[]      NOT NULL DEFAULT '{}',  -- gaps skipped, ranges clamped
    state       text        NOT NULL DEFAULT 'running' CHECK (state IN ('running', 'finished')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);

-- One row per partition: the range [start_offset, end_offset), frozen when the replay is
-- created, and the next offset to write.
CREATE TABLE replay_partitions (
    replay_id     bigint  NOT NULL REFERENCES replays (id) ON DELETE CASCADE,
    topic         text    NOT NULL,
    partition     integer NOT NULL CHECK (partition >= 0),
    start_offset  bigint  NOT NULL CHECK (start_offset >= 0),
    end_offset    bigint  NOT NULL,
    requested_end bigint  NOT NULL,  -- before the clamp to live ingestion
    next_offset   bigint  NOT NULL,
    gap_start     bigint,            -- offsets [gap_start, start_offset) lost to retention
    PRIMARY KEY (replay_id, topic, partition),
    CHECK (start_offset <= next_offset AND next_offset <= end_offset)
);

-- A replay replaces the rows of every table that holds a row per record by their source
-- range; those tables get a BRIN index on (src_partition, src_offset) with the catalog's plan
-- (pipeline/schema_plan.py, docs/replay.md).

GRANT SELECT, INSERT, UPDATE ON replays, replay_partitions TO pipeline_writer;
GRANT USAGE ON SEQUENCE replays_id_seq TO pipeline_writer;
GRANT SELECT ON replays, replay_partitions TO pipeline_reader;
