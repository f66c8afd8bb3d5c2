-- The control plane's state (docs/control-plane.md): what the group was told, kept with the
-- data, changed in the same transaction as the control_log row that records the change.

-- One row per consumer group: the control topic's next record to decide, the highest
-- command sequence applied, the assignment in force. NULL active_streams: every stream the
-- instances consume (nothing was ever assigned or switched off).
CREATE TABLE control_state (
    group_id           text        PRIMARY KEY,
    next_offset        bigint      NOT NULL DEFAULT 0 CHECK (next_offset >= 0),
    applied_seq        bigint      NOT NULL DEFAULT 0 CHECK (applied_seq >= 0),
    assignment_version bigint      NOT NULL DEFAULT 0 CHECK (assignment_version >= 0),
    active_streams     text[],
    batch_limits       jsonb       NOT NULL DEFAULT '{}',
    updated_at         timestamptz NOT NULL DEFAULT now()
);

-- Every assignment ever in force, append-only: Rollback(to_version) re-applies one of them
-- as a new version.
CREATE TABLE assignments (
    group_id     text        NOT NULL,
    version      bigint      NOT NULL CHECK (version >= 1),
    streams      text[]      NOT NULL,
    batch_limits jsonb       NOT NULL DEFAULT '{}',
    command_id   uuid        NOT NULL,
    assigned_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, version)
);

-- Named checkpoints: a consistent cut of the group's ingest_offsets, taken in one transaction.
CREATE TABLE checkpoints (
    group_id   text        NOT NULL,
    name       text        NOT NULL,
    command_id uuid        NOT NULL,
    taken_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, name)
);

CREATE TABLE checkpoint_offsets (
    group_id    text    NOT NULL,
    name        text    NOT NULL,
    topic       text    NOT NULL,
    partition   integer NOT NULL,
    next_offset bigint  NOT NULL,
    PRIMARY KEY (group_id, name, topic, partition),
    FOREIGN KEY (group_id, name) REFERENCES checkpoints (group_id, name) ON DELETE CASCADE
);

-- Each control record is decided once per group, by whichever instance reads it first; the
-- others find the decision here by the record's offset and follow it.
ALTER TABLE control_log ADD COLUMN seq bigint;
ALTER TABLE control_log ADD COLUMN src_offset bigint;
CREATE UNIQUE INDEX control_log_decided_once
    ON control_log (target, src_offset) WHERE direction = 'command';

GRANT SELECT, INSERT, UPDATE ON control_state, assignments, checkpoints, checkpoint_offsets
    TO pipeline_writer;
GRANT SELECT ON control_state, assignments, checkpoints, checkpoint_offsets TO pipeline_reader;
-- A rollback to a checkpoint deletes the dead letters recorded after it.
GRANT DELETE ON dead_letters TO pipeline_writer;
