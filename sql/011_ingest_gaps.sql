-- Records Kafka deleted (retention) before a group ingested them (docs/exactly-once.md, "A
-- stored offset below the log start"). One row per gap: the group's stored offset was
-- first_offset, the log started at end_offset, so offsets first_offset .. end_offset - 1 are
-- lost. An agent writes the row in the transaction that moves the stored offset past the gap
-- (action 'skipped', or 'resumed' once a stream stopped on it is activated again), or, under
-- PIPELINE_ON_GAP=stop, when it stops the stream (action 'stopped', skipped_at NULL).
CREATE TABLE ingest_gaps (
    id              bigserial   PRIMARY KEY,
    group_id        text        NOT NULL,
    topic           text        NOT NULL,
    partition       integer     NOT NULL CHECK (partition >= 0),
    first_offset    bigint      NOT NULL CHECK (first_offset >= 0),
    end_offset      bigint      NOT NULL,
    action          text        NOT NULL CHECK (action IN ('skipped', 'stopped', 'resumed')),
    instance_id     text        NOT NULL DEFAULT '',
    detected_at     timestamptz NOT NULL DEFAULT now(),
    skipped_at      timestamptz,
    acknowledged_at timestamptz,
    acknowledged_by text,
    CHECK (end_offset > first_offset),
    CHECK ((action = 'stopped') = (skipped_at IS NULL)),
    CHECK ((acknowledged_at IS NULL) = (acknowledged_by IS NULL)),
    UNIQUE (group_id, topic, partition, first_offset)
);

-- The agents record and skip gaps (INSERT, UPDATE) and never delete one. Acknowledging a gap
-- (`pipeline gaps ack`) is an UPDATE too, by whoever runs it with the writer's login.
-- 007_least_privilege.sql's default privileges gave the writer DELETE as well.
REVOKE DELETE, TRUNCATE ON ingest_gaps FROM pipeline_writer;
GRANT SELECT, INSERT, UPDATE ON ingest_gaps TO pipeline_writer;
GRANT SELECT ON ingest_gaps TO pipeline_reader;
