-- Partition maintenance (`pipeline partitions maintain`, docs/operations.md, "Partitions and
-- retention"): one row per partitioned table, written by the maintainer after each pass over
-- it. The counts add up over every pass; last_success_at is what the agents export as
-- pipeline_partition_maintenance_last_success_timestamp_seconds, so the alert on a
-- maintenance that stopped running holds however it runs (compose, cron, a CronJob).
CREATE TABLE partition_maintenance (
    table_name         text        PRIMARY KEY,  -- as the streams catalog writes it
    last_success_at    timestamptz,
    last_attempt_at    timestamptz NOT NULL,
    partitions_created bigint      NOT NULL DEFAULT 0,  -- made ahead, empty
    partitions_moved   bigint      NOT NULL DEFAULT 0,  -- made for rows that were in DEFAULT
    partitions_dropped bigint      NOT NULL DEFAULT 0,  -- wholly older than the retention
    rows_moved         bigint      NOT NULL DEFAULT 0,  -- out of DEFAULT into their partition
    rows_expired       bigint      NOT NULL DEFAULT 0,  -- in DEFAULT, older than the retention
    last_error         text,
    last_error_at      timestamptz,
    CHECK ((last_error IS NULL) = (last_error_at IS NULL))
);

-- The maintainer is the migrator, which owns the table. The agents read it for their metrics;
-- 007_least_privilege.sql's default privileges gave the writer more.
REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON partition_maintenance FROM pipeline_writer;
GRANT SELECT ON partition_maintenance TO pipeline_writer, pipeline_reader;
