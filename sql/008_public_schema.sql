-- Before PostgreSQL 15, PUBLIC may create tables in the public schema: every login, the
-- agents' included, could (docs/security.md). Revoke it, as PostgreSQL 15 does by default
-- (there this changes nothing). Only the schema's owner may: from 15 on, the database's owner
-- (the migrator); before 15, the local stack and the tests make the database's owner the
-- schema's owner as 15 does, and elsewhere the administrator does (docs/security.md). A
-- migrator that does not own it gets a warning ("no privileges could be revoked"), and PUBLIC
-- keeps the right until the administrator revokes it.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
