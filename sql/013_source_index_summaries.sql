-- Summaries of the source indexes, for the writer (docs/replay.md, "The range DELETE").
--
-- A replay deletes each batch's range by (src_partition, src_offset) through the BRIN index
-- on those columns. BRIN returns every block range it has not summarized yet, and the pages a
-- replay writes are summarized only by a later VACUUM: without a summary each batch's DELETE
-- reads every page the replay has written so far, and the replay slows as it goes.
-- brin_summarize_new_values() fixes that, but only the index's owner (the migrator) may call
-- it; this function lets the writer ask for it, and for nothing else. It summarizes the BRIN
-- indexes on src_offset (the source index) of one table and of each of its partitions, and
-- returns how many block ranges it summarized.
--
-- It runs as its owner, who may be a superuser where one login does everything, so it touches
-- only what that owner owns: never a temporary table (the writer may make those), never an
-- index with an expression or a predicate (code that would run as the owner), never an
-- invalid one. An index whose lock is held (a VACUUM, the partition maintainer) for more than
-- the function's own lock_timeout, 100 ms, is skipped, and the others are still summarized:
-- summarizing only shortens the replay's deletes, it never waits long for that.
CREATE FUNCTION pipeline_summarize_source_indexes(target regclass) RETURNS bigint
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    SET lock_timeout = '100ms'
AS $$
DECLARE
    summarized bigint := 0;
    brin regclass;
BEGIN
    FOR brin IN
        -- The table itself (pg_partition_tree() is empty for a plain table), and each of
        -- its partitions; a partitioned index has no summaries of its own (relkind 'I').
        SELECT i.indexrelid::regclass
        FROM (SELECT target UNION SELECT relid FROM pg_partition_tree(target)) AS t (relid)
        JOIN pg_index AS i ON i.indrelid = t.relid
        JOIN pg_class AS c ON c.oid = i.indexrelid AND c.relkind = 'i'
        JOIN pg_am AS a ON a.oid = c.relam
        WHERE a.amname = 'brin'
          AND i.indisvalid AND i.indexprs IS NULL AND i.indpred IS NULL
          AND c.relpersistence = 'p'
          AND c.relowner = (SELECT oid FROM pg_roles WHERE rolname = current_user)
          AND EXISTS (SELECT FROM pg_attribute AS att
                      WHERE att.attrelid = t.relid AND att.attname = 'src_offset'
                        AND att.attnum = ANY (i.indkey))
        ORDER BY 1
    LOOP
        BEGIN
            summarized := summarized + brin_summarize_new_values(brin);
        EXCEPTION WHEN lock_not_available THEN
            NULL;  -- the next call summarizes it
        END;
    END LOOP;
    RETURN summarized;
END
$$;

-- Functions are executable by PUBLIC when made: this one only by the writer.
REVOKE EXECUTE ON FUNCTION pipeline_summarize_source_indexes(regclass) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pipeline_summarize_source_indexes(regclass) TO pipeline_writer;
