-- The five streams' tables (docs/architecture.md).
-- Every data row carries its provenance: the Kafka partition and offset it came from and the
-- ingest batch that wrote it, so any row can be traced back to its record and rolled back.
-- No column has a volatile default: COPY's multi-row insert path stays on.

CREATE SEQUENCE ingest_batch_id_seq INCREMENT BY 1000;  -- each reservation is 1000 batch ids

CREATE TABLE agent_states (
    agent_id      text        PRIMARY KEY,
    state         text        NOT NULL,
    version       bigint      NOT NULL CHECK (version >= 0),
    ts            timestamptz NOT NULL,
    data          jsonb       NOT NULL,
    src_partition integer     NOT NULL,
    src_offset    bigint      NOT NULL,
    batch_id      bigint      NOT NULL,
    ingested_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE agent_state_history (
    agent_id      text        NOT NULL,
    state         text        NOT NULL,
    version       bigint      NOT NULL CHECK (version >= 0),
    ts            timestamptz NOT NULL,
    data          jsonb       NOT NULL,
    src_partition integer     NOT NULL,
    src_offset    bigint      NOT NULL,
    batch_id      bigint      NOT NULL,
    ingested_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (agent_id, version)
);

CREATE TABLE system_events (
    event_id      uuid        PRIMARY KEY,
    agent_id      text        NOT NULL,
    kind          text        NOT NULL,
    severity      text        NOT NULL,
    ts            timestamptz NOT NULL,
    payload       jsonb       NOT NULL,
    src_partition integer     NOT NULL,
    src_offset    bigint      NOT NULL,
    batch_id      bigint      NOT NULL,
    ingested_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX system_events_agent_ts ON system_events (agent_id, ts);

CREATE TABLE performance_metrics (
    agent_id      text             NOT NULL,
    name          text             NOT NULL,
    value         double precision NOT NULL,
    ts            timestamptz      NOT NULL,
    labels        jsonb            NOT NULL,
    src_partition integer          NOT NULL,
    src_offset    bigint           NOT NULL,
    batch_id      bigint           NOT NULL,
    ingested_at   timestamptz      NOT NULL DEFAULT now()
);
-- BRIN: metrics arrive roughly in time order; a B-tree would cost far more per COPY.
CREATE INDEX performance_metrics_ts ON performance_metrics USING brin (ts);

CREATE TABLE user_analytics (
    event_id      uuid        PRIMARY KEY,
    user_id       text        NOT NULL,
    action        text        NOT NULL,
    ts            timestamptz NOT NULL,
    properties    jsonb       NOT NULL,
    src_partition integer     NOT NULL,
    src_offset    bigint      NOT NULL,
    batch_id      bigint      NOT NULL,
    ingested_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE system_config (
    key           text        PRIMARY KEY,
    value         jsonb       NOT NULL,
    version       bigint      NOT NULL CHECK (version >= 0),
    ts            timestamptz NOT NULL,
    updated_by    text        NOT NULL,
    src_partition integer     NOT NULL,
    src_offset    bigint      NOT NULL,
    batch_id      bigint      NOT NULL,
    ingested_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE system_config_history (
    key           text        NOT NULL,
    value         jsonb       NOT NULL,
    version       bigint      NOT NULL CHECK (version >= 0),
    ts            timestamptz NOT NULL,
    updated_by    text        NOT NULL,
    src_partition integer     NOT NULL,
    src_offset    bigint      NOT NULL,
    batch_id      bigint      NOT NULL,
    ingested_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (key, version)
);
