-- Least privilege (docs/architecture.md): a migrator owns the schema, a writer ingests, a
-- reader reads. These are group roles without login: grant them to the login roles you use.
-- Roles are cluster-wide; another database on the same server may have created them already,
-- or an administrator did (docs/security.md): a migrator without CREATEROLE may not even try.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pipeline_writer') THEN
        CREATE ROLE pipeline_writer NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;  -- created concurrently
END $$;
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pipeline_reader') THEN
        CREATE ROLE pipeline_reader NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;  -- created concurrently
END $$;

GRANT SELECT ON ALL TABLES IN SCHEMA public TO pipeline_reader;
-- The data tables' grants come with the tables, from the streams catalog's plan
-- (pipeline/schema_plan.py).
GRANT SELECT, INSERT, UPDATE ON ingest_offsets, dead_letters, control_log TO pipeline_writer;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO pipeline_writer;
-- The writer also stages rows in temporary tables, which PUBLIC may create by default.
