-- The streams catalog `pipeline migrate` applied (docs/streams.md): each stream's declaration
-- as the catalog wrote it (StreamSpec.declaration()), written in the same transaction as the
-- tables made from it. What the tables do not show (an append table with a key looks like a
-- "latest" one; a version, a table's former name) is compared with it when the catalog
-- changes, so a change `pipeline migrate` does not make is refused. A stream dropped from the
-- catalog keeps its row, as it keeps its tables.
CREATE TABLE stream_catalog (
    stream      text        PRIMARY KEY,
    declaration jsonb       NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- Only the migrator writes it; 007_least_privilege.sql's default privileges gave the writer
-- more.
REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON stream_catalog FROM pipeline_writer;
GRANT SELECT ON stream_catalog TO pipeline_writer, pipeline_reader;
