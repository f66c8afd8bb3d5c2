-- What is ingested, what was rejected, and what the control plane did.

-- The source of truth for what is ingested: one row per (group, topic, partition), moved by
-- compare-and-set in the same transaction as the rows it covers (docs/exactly-once.md).
CREATE TABLE ingest_offsets (
    group_id    text        NOT NULL,
    topic       text        NOT NULL,
    partition   integer     NOT NULL CHECK (partition >= 0),
    next_offset bigint      NOT NULL CHECK (next_offset >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, topic, partition)
);

-- Records that could not be ingested, with why. One row per source record: redelivery after
-- a crash finds the row already there.
CREATE TABLE dead_letters (
    id               bigserial   PRIMARY KEY,
    group_id         text        NOT NULL,
    src_topic        text        NOT NULL,
    src_partition    integer     NOT NULL,
    src_offset       bigint      NOT NULL,
    record_key       bytea,
    record_value     bytea,
    record_headers   jsonb       NOT NULL DEFAULT '[]',
    record_ts        timestamptz,
    error_class      text        NOT NULL,
    reason           text        NOT NULL,
    dead_lettered_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (group_id, src_topic, src_partition, src_offset)
);

-- Control commands received and applied or rejected, and status reports (docs/architecture.md).
CREATE TABLE control_log (
    id          bigserial   PRIMARY KEY,
    direction   text        NOT NULL CHECK (direction IN ('command', 'status')),
    command_id  uuid,
    kind        text        NOT NULL,
    target      text        NOT NULL,
    issuer      text        NOT NULL DEFAULT '',
    instance_id text        NOT NULL DEFAULT '',
    version     bigint,
    outcome     text        NOT NULL,
    reason      text        NOT NULL DEFAULT '',
    body        jsonb       NOT NULL DEFAULT '{}',
    issued_at   timestamptz,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX control_log_applied_once
    ON control_log (command_id, instance_id) WHERE direction = 'command' AND outcome = 'applied';
