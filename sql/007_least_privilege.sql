-- Least privilege (docs/security.md). Three kinds of login, each given one role:
--   the migrator runs `pipeline migrate` and owns every object these migrations create;
--   pipeline_writer (the agents, `pipeline replay`, `pipeline dlq`) reads and writes rows;
--   pipeline_reader (dashboards, reports) reads.
-- Neither group may create, alter, drop or truncate a table, nor write outside this schema.

-- The agents check the schema's version before they start: they read it, never apply it.
GRANT SELECT ON schema_migrations TO pipeline_writer, pipeline_reader;

-- Tables and sequences that later migrations create (run by this same migrator: default
-- privileges belong to the role that creates the objects) get the rights without a GRANT of
-- their own. A migration that wants less for a table revokes it there.
ALTER DEFAULT PRIVILEGES IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO pipeline_writer;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO pipeline_reader;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE ON SEQUENCES TO pipeline_writer;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON SEQUENCES TO pipeline_reader;

-- The writer stages rows in temporary tables; PUBLIC has TEMPORARY by default, but a hardened
-- database revokes it from PUBLIC. Granted here so the writer does not depend on PUBLIC. (Only
-- the database's owner can grant it; any other migrator gets a warning, and the statement in
-- docs/security.md for the administrator.)
DO $$
BEGIN
    EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO pipeline_writer',
                   current_database());
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO pipeline_reader', current_database());
END $$;
