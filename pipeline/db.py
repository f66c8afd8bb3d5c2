"""Everything that talks to PostgreSQL: connections, migrations, table writers, offsets.

The statements of the exactly-once protocol (docs/exactly-once.md): the offsets'
compare-and-set, the table writers and the dead letters, which consumers/writer.py runs in
one transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import ssl
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import msgspec

# asyncpg exports the server's SQLSTATE-22 class as DataError; its client-side encoding error
# of the same name (an InterfaceError) is only reachable here.
from asyncpg.exceptions._base import DataError as ClientDataError
from asyncpg.exceptions._base import InternalClientError

from pipeline import partitions, schema_plan, sql_names
from pipeline.batching import FetchedRecord, Row
from pipeline.catalog import Catalog, StreamSpec, StreamTables
from pipeline.catalog import load as load_catalog

# How connections are set up lives in a module without the driver, for the configuration.
from pipeline.db_session import Session
from pipeline.errors import (
    ConfigError,
    DataError,
    FencedError,
    OwnershipError,
    SchemaError,
    TransientError,
)
from pipeline.gaps import Action, Gap, RecordedGap
from pipeline.records import header_name_text
from pipeline.rows import Tombstone, source_of

# The migrations, sql/ at the top of the repository; pipeline/sql links to it, so that an
# installed package (a wheel, the container image) carries them as package data.
SQL_DIR = Path(__file__).resolve().parent / "sql"
_MIGRATION_LOCK = int.from_bytes(
    hashlib.sha256(b"agent-pipeline migrate").digest()[:8], "big", signed=True
)
_WORK_LOCK = 0x70697065  # the advisory lock space of lock_group_work ("pipe")
_MIGRATION_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")
_BATCH_IDS_PER_RESERVATION = 1000  # the sequence's INCREMENT BY
_SCHEMA_READABLE_FROM = 7  # 007_least_privilege.sql lets the writer read schema_migrations
# How long a step of a partitioning upgrade waits for its lock before it lets the agents'
# statements queued behind it go and tries again: the longest the agents wait on it.
_UPGRADE_LOCK_TIMEOUT_MS = 1000
_UPGRADE_LOCK_ATTEMPTS = 60
# The index build and the validation read the whole table, hours on a big one: the session's
# command timeout, meant for a batch, does not bound them.
_UPGRADE_STEP_TIMEOUT_S = 7 * 24 * 3600.0

# -- connections ----------------------------------------------------------------------------


class Connection(asyncpg.Connection):  # type: ignore[misc]
    """asyncpg's connection, knowing what its transactions begin with."""

    prelude = ""


async def connect(url: str, session: Session) -> Connection:
    """A connection set up for ingestion (:class:`Session`).

    jsonb goes over the wire in binary, straight from the raw JSON bytes the decoder kept;
    timestamptz as microseconds since PostgreSQL's epoch, computed by
    :func:`_encode_timestamptz`. The only startup parameter sent beyond asyncpg's own is
    ``application_name``, which poolers pass on.
    """
    try:
        conn: Connection = await asyncpg.connect(
            url,
            timeout=session.connect_timeout,
            command_timeout=session.command_timeout,
            server_settings={"application_name": "database-agent"},
            statement_cache_size=0 if session.pooler == "transaction" else 100,
            connection_class=Connection,
        )
        conn.prelude = session.prelude()
        await conn.set_type_codec(
            "jsonb",
            schema="pg_catalog",
            encoder=_encode_jsonb,
            decoder=_decode_jsonb,
            format="binary",
        )
        await conn.set_type_codec(
            "timestamptz",
            schema="pg_catalog",
            encoder=_encode_timestamptz,
            decoder=_decode_timestamptz,
            format="tuple",
        )
    except ssl.SSLCertVerificationError as exc:  # retrying cannot fix a certificate
        raise ConfigError(
            f"PostgreSQL's TLS certificate was refused: {exc.verify_message or exc} "
            "(check sslrootcert, the CA that signed the server's certificate, and that the "
            "URL's host is one the certificate names)"
        ) from None
    except FileNotFoundError as exc:  # sslrootcert, sslcert or sslkey names no file
        raise ConfigError(
            f"a file the database URL names does not exist: {_missing_file(url) or exc}"
        ) from None
    except Exception as exc:  # a server restarting answers in many ways: 08xxx, 57P0x, ...
        error = classify(exc)
        if isinstance(error, TransientError):
            raise TransientError(f"cannot connect to PostgreSQL: {exc}") from exc
        raise error from exc
    return conn


@contextlib.asynccontextmanager
async def transaction(
    conn: asyncpg.Connection, *, commit: bool = True, durable: bool = False
) -> AsyncIterator[None]:
    """A transaction that begins with the connection's session settings (``SET LOCAL``; a
    connection not made by :func:`connect` has none), or a savepoint inside one. It commits
    when its block ends, or with ``commit=False`` (a dry run) rolls back. ``durable`` keeps
    ``synchronous_commit`` on: for a change nothing would redo after a crash (a migration),
    unlike a batch, whose offsets are lost with it and which Kafka redelivers."""
    try:
        async with conn.transaction():
            prelude = getattr(conn, "prelude", "")
            if durable:
                prelude = f"{prelude}; SET LOCAL synchronous_commit = on" if prelude else ""
            if prelude:
                await conn.execute(prelude)
            yield
            if not commit:
                raise _RollBack
    except _RollBack:
        pass


class _RollBack(Exception):
    """Ends a dry run's transaction: asyncpg rolls back a block that raises."""


def _missing_file(url: str) -> str | None:
    """The first TLS file the URL's query names that does not exist, as ``name=path``."""
    for name, values in parse_qs(urlsplit(url).query).items():
        tls_file = name in ("sslrootcert", "sslcert", "sslkey", "sslcrl")
        if tls_file and values and not Path(values[0]).exists():
            return f"{name}={values[0]}"
    return None


def _encode_jsonb(value: Any) -> bytes:
    if isinstance(value, msgspec.Raw):
        return b"\x01" + value  # jsonb binary format: version 1, then the JSON text
    return b"\x01" + msgspec.json.encode(value)


def _decode_jsonb(data: bytes) -> Any:
    return msgspec.json.decode(data[1:])


_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_PG_INFINITY = 2**63 - 1  # timestamptz 'infinity' on the wire; -infinity is its negation - 1


def _encode_timestamptz(value: datetime) -> tuple[int]:
    """An aware datetime as PostgreSQL's binary timestamptz: microseconds since 2000-01-01
    UTC. Every row carries one, so only the subtraction: asyncpg's own encoder also compares
    with its infinities and converts to UTC first, which an aware datetime does not need."""
    return ((value - _PG_EPOCH) // _MICROSECOND,)


def _decode_timestamptz(value: tuple[int]) -> datetime:
    (micros,) = value
    if micros == _PG_INFINITY:
        return datetime.max.replace(tzinfo=UTC)
    if micros == -_PG_INFINITY - 1:
        return datetime.min.replace(tzinfo=UTC)
    return _PG_EPOCH + timedelta(microseconds=micros)


# The errors of class 54 (program limit exceeded) that one value can cause: 54000, an index
# row over a third of a page (a long key), a string too long for tsvector or jsonb, an array
# too large; 54001, a value nested deeper than the server's stack allows. Its other codes
# (too many columns or arguments) are about a statement, not a row.
_ROW_LIMITS = ("54000", "54001")


def classify(exc: BaseException) -> BaseException:
    """Map a driver error to ours, once: transient, data, schema, or as it was.

    A :class:`DataError` is what one row can cause: its value (class 22, data exception), its
    constraints (class 23) or a limit its value exceeds (:data:`_ROW_LIMITS`). The writers
    bisect a batch down to the rows that raise it, and dead-letter those.
    """
    if isinstance(exc, (TransientError, DataError, SchemaError, FencedError)):
        return exc
    sqlstate = getattr(exc, "sqlstate", None) or ""
    if isinstance(exc, ClientDataError):  # a value the client could not encode for its column
        return DataError(f"{type(exc).__name__}: {exc}", sqlstate="22000")
    if (
        # InternalClientError: the driver's protocol is in a state it did not expect, as when
        # the server ended the session (a shutdown's FATAL) just as a command went out. A new
        # connection starts clean.
        isinstance(exc, (OSError, TimeoutError, asyncpg.InterfaceError, InternalClientError))
        or sqlstate[:2]
        in (
            "08",  # connection exception
            "53",  # insufficient resources
            "57",  # operator intervention: shutdown, admin command, query canceled
            "58",  # system error
        )
        or sqlstate in ("40001", "40P01")  # serialization failure, deadlock
        or sqlstate in ("25006", "55P03")  # read-only after a failover, lock not available
        # The session idled in its transaction past idle_in_transaction_session_timeout (the
        # client was stopped) or ran past transaction_timeout: the server ended it.
        or sqlstate in ("25P03", "25P04")
        # A table's type changed under a prepared statement: a new transaction re-prepares.
        or isinstance(exc, asyncpg.InvalidCachedStatementError)
        # Through a transaction pooler, a statement outside a transaction is prepared, then
        # bound after a Sync, which may reach another server session: a retry prepares again.
        or (isinstance(exc, asyncpg.InvalidSQLStatementNameError) and "unnamed" in str(exc))
    ):
        return TransientError(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, asyncpg.DuplicatePreparedStatementError) or (
        isinstance(exc, asyncpg.InvalidSQLStatementNameError) and "unnamed" not in str(exc)
    ):
        # Named statements asyncpg prepared on one server session, sent to another: the
        # connection goes through a pooler in transaction mode.
        first_line = getattr(exc, "message", None) or str(exc).split("\n", 1)[0]  # no HINT
        return ConfigError(
            f"{first_line}: the database URL goes through a connection pooler in transaction mode "
            "(PgBouncer's pool_mode=transaction, Neon's -pooler host, Supabase's port 6543); "
            "set PIPELINE_DB_POOLER=transaction, or use the direct connection string "
            "(docs/compatibility.md)"
        )
    if sqlstate[:2] in ("22", "23") or sqlstate in _ROW_LIMITS:
        return DataError(f"{sqlstate} {exc}", sqlstate=sqlstate)
    if sqlstate[:2] == "42":
        return SchemaError(f"{sqlstate} {exc}", sqlstate=sqlstate)
    return exc


# -- migrations -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def read_migrations(sql_dir: Path = SQL_DIR) -> list[Migration]:
    migrations = []
    for path in sorted(sql_dir.glob("*.sql")):
        match = _MIGRATION_NAME.match(path.name)
        if match is None:
            raise SchemaError(f"{path}: migration files are named NNN_lowercase_name.sql")
        migrations.append(Migration(int(match.group(1)), path.name, path.read_text()))
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise SchemaError(f"{sql_dir}: two migrations share a number: {versions}")
    return migrations


@dataclass(frozen=True)
class Migrated:
    """What :func:`migrate_schema` did."""

    migrations: list[str]  # the numbered migrations applied, by file name
    plan: schema_plan.Plan  # the streams catalog's statements it ran
    recorded: list[str]  # the streams whose declaration it recorded (new or changed)

    @property
    def nothing(self) -> bool:
        return not self.migrations and self.plan.empty and not self.recorded


async def migrate(
    conn: Connection, migrations: Sequence[Migration], catalog: Catalog | None = None
) -> list[str]:
    """:func:`migrate_schema`; the names of the numbered migrations it applied."""
    return (await migrate_schema(conn, migrations, catalog)).migrations


async def migrate_schema(
    conn: Connection, migrations: Sequence[Migration], catalog: Catalog | None = None
) -> Migrated:
    """Apply the migrations not yet applied, in order, then the plan of ``catalog`` (default:
    the built-in streams) and record the catalog, all in one transaction; then upgrade each
    table the plan makes partitioned (:func:`_upgrade`).

    The transaction-scoped advisory lock makes instances that start together take turns:
    the second one waits, then finds everything applied. The plan is made before anything
    changes: a catalog it refuses (:class:`schema_plan.Refused`) changes nothing, migrations
    included. ``migrations`` that stop short of 010_stream_catalog.sql (a test's older
    schema) get no plan: the database has nowhere to record it. A migration the server
    refuses is a :class:`SchemaError` naming it; a login without the rights, one that says who
    migrates.
    """
    catalog = load_catalog() if catalog is None else catalog
    step = "reading schema_migrations"
    try:
        migrated = await _migrate_in_one_transaction(conn, migrations, catalog)
        for upgrade in migrated.plan.upgrades:
            step = f"partitioning {upgrade.table}"
            await _upgrade(conn, upgrade)
        return migrated
    except asyncpg.PostgresError as exc:
        raise _migration_error(exc, step) from exc


async def _migrate_in_one_transaction(
    conn: Connection, migrations: Sequence[Migration], catalog: Catalog
) -> Migrated:
    step = "reading schema_migrations"
    try:
        async with transaction(conn, durable=True):
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            # Only when missing: CREATE ... IF NOT EXISTS still needs the right to create.
            if not await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL"):
                await conn.execute(
                    """CREATE TABLE schema_migrations (
                           version    integer     PRIMARY KEY,
                           name       text        NOT NULL,
                           applied_at timestamptz NOT NULL DEFAULT now())"""
                )
            rows = await conn.fetch("SELECT version FROM schema_migrations")
            applied = {r["version"] for r in rows}
            step = "reading the tables of the streams catalog"
            plan = schema_plan.plan(catalog, await database_state(conn, catalog))
            done = []
            for migration in migrations:
                if migration.version in applied:
                    continue
                step = f"applying {migration.name}"
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
                done.append(migration.name)
            if not await _has_stream_catalog(conn):
                return Migrated(done, schema_plan.Plan(), [])
            for statement in plan.statements:
                step = f"applying the streams catalog: {statement.splitlines()[0]}"
                await conn.execute(statement)
            step = "recording the streams catalog"
            recorded = await _record_catalog(conn, catalog)
            return Migrated(done, plan, recorded)
    except asyncpg.PostgresError as exc:
        raise _migration_error(exc, step) from exc


def _migration_error(exc: asyncpg.PostgresError, step: str) -> Exception:
    error = classify(exc)
    if isinstance(error, TransientError):
        return error
    who = (
        ": `pipeline migrate` runs as the migrator, the schema's owner "
        "(PIPELINE_MIGRATE_DATABASE_URL, docs/security.md)"
        if isinstance(exc, asyncpg.InsufficientPrivilegeError)
        else ""
    )
    return SchemaError(f"{step}: {exc}{who}")


async def _upgrade(conn: Connection, upgrade: schema_plan.Upgrade) -> None:
    """Make one table partitioned (docs/streams.md, "Upgrading to partitioned tables").

    The online statements run one by one outside a transaction: CREATE INDEX CONCURRENTLY
    may not run in one, and it and VALIDATE CONSTRAINT let the agents write meanwhile. The
    swap is one transaction under the migration lock, skipped when the table is partitioned
    already (another `pipeline migrate` finished it). Whatever takes an exclusive lock waits
    for it at most ``_UPGRADE_LOCK_TIMEOUT_MS``, then lets the agents' statements queued
    behind it go and tries again: never a long wait behind a long transaction with the
    agents stuck in the queue."""
    table = upgrade.table
    building = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_progress_create_index WHERE relid = to_regclass($1)",
        sql_names.table(table),
    )
    if building:
        # An index build in progress is another `pipeline migrate`'s, not a leftover to drop.
        raise SchemaError(
            f"partitioning {table}: an index of it is being built (another `pipeline "
            "migrate`?): run `pipeline migrate` again once it is done"
        )
    for statement in upgrade.online:
        if " CONCURRENTLY " in statement:  # waits for transactions, never blocks them
            await conn.execute(statement, timeout=_UPGRADE_STEP_TIMEOUT_S)
        else:
            await _with_lock_retries(conn, table, (statement,))
    await _with_lock_retries(conn, table, upgrade.swap, swap=True)


async def _with_lock_retries(
    conn: Connection, table: str, statements: Sequence[str], *, swap: bool = False
) -> None:
    for _ in range(_UPGRADE_LOCK_ATTEMPTS):
        try:
            async with transaction(conn, durable=True):
                await conn.execute(f"SET LOCAL lock_timeout = {_UPGRADE_LOCK_TIMEOUT_MS}")
                if swap:
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
                    kind = await conn.fetchval(
                        "SELECT relkind::text FROM pg_class WHERE oid = to_regclass($1)",
                        sql_names.table(table),
                    )
                    if kind != "r":
                        return
                for statement in statements:
                    await conn.execute(statement, timeout=_UPGRADE_STEP_TIMEOUT_S)
            return
        except asyncpg.LockNotAvailableError:
            await asyncio.sleep(0.1)
    raise SchemaError(
        f"partitioning {table}: no lock on it within {_UPGRADE_LOCK_TIMEOUT_MS} ms, "
        f"{_UPGRADE_LOCK_ATTEMPTS} times (a long transaction on the table?): run `pipeline "
        "migrate` again; it goes on where it stopped"
    )


async def plan_schema(
    conn: Connection, migrations: Sequence[Migration], catalog: Catalog
) -> tuple[list[str], schema_plan.Plan]:
    """What :func:`migrate_schema` would do, changing nothing: the numbered migrations not yet
    applied, and the catalog's plan (:class:`schema_plan.Refused` when it would refuse)."""
    applied: set[int] = set()
    if await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL"):
        rows = await conn.fetch("SELECT version FROM schema_migrations")
        applied = {r["version"] for r in rows}
    plan = schema_plan.plan(catalog, await database_state(conn, catalog))
    return [m.name for m in migrations if m.version not in applied], plan


async def _has_stream_catalog(conn: Connection) -> bool:
    return bool(await conn.fetchval("SELECT to_regclass('stream_catalog') IS NOT NULL"))


async def _record_catalog(conn: Connection, catalog: Catalog) -> list[str]:
    """Record each stream's declaration; the streams whose record is new or changed."""
    rows = await conn.fetch(
        """INSERT INTO stream_catalog (stream, declaration)
           SELECT s, d::jsonb FROM unnest($1::text[], $2::text[]) AS u(s, d)
           ON CONFLICT (stream) DO UPDATE
               SET declaration = EXCLUDED.declaration, applied_at = now()
               WHERE stream_catalog.declaration IS DISTINCT FROM EXCLUDED.declaration
           RETURNING stream""",
        list(catalog.names),
        [msgspec.json.encode(spec.declaration()).decode() for spec in catalog],
    )
    recorded = {r["stream"] for r in rows}
    return [name for name in catalog.names if name in recorded]


async def database_state(
    conn: Connection, streams: Iterable[StreamSpec], *, applied: bool = True
) -> schema_plan.DatabaseState:
    """What the database holds of the tables ``streams`` need, as pg_catalog describes them,
    and (``applied``) the catalog `pipeline migrate` last recorded."""
    wanted = schema_plan.tables_of(streams)
    tables = await conn.fetch(
        """SELECT c.oid, n.nspname::text AS schema, c.relname::text AS name,
                  c.relkind = 'p' AS partitioned, COALESCE(p.partdefid, 0) <> 0 AS has_default,
                  (SELECT a.attname::text FROM pg_attribute a
                   WHERE a.attrelid = c.oid AND a.attnum = p.partattrs[0]) AS partition_by
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           LEFT JOIN pg_partitioned_table p ON p.partrelid = c.oid
           WHERE c.relkind IN ('r', 'p')
             AND (n.nspname::text, c.relname::text) IN
                 (SELECT * FROM unnest($1::text[], $2::text[]))""",
        [schema for schema, _ in wanted],
        [name for _, name in wanted],
    )
    oids = [t["oid"] for t in tables]
    columns = await conn.fetch(
        """SELECT attrelid, attname::text AS name, format_type(atttypid, atttypmod) AS type,
                  attnotnull, atthasdef
           FROM pg_attribute
           WHERE attrelid = ANY($1::oid[]) AND attnum > 0 AND NOT attisdropped
           ORDER BY attrelid, attnum""",
        oids,
    )
    indexes = await conn.fetch(
        """SELECT i.indrelid, ic.relname::text AS name, am.amname::text AS method,
                  i.indisprimary, i.indisvalid,
                  ARRAY(SELECT a.attname::text
                        FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
                        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                        ORDER BY k.n) AS columns
           FROM pg_index i
           JOIN pg_class ic ON ic.oid = i.indexrelid
           JOIN pg_am am ON am.oid = ic.relam
           WHERE i.indrelid = ANY($1::oid[])
           ORDER BY ic.relname""",
        oids,
    )
    checks = await conn.fetch(
        """SELECT conrelid, conname::text AS name, pg_get_constraintdef(oid) AS definition,
                  convalidated,
                  ARRAY(SELECT a.attname::text
                        FROM unnest(conkey) WITH ORDINALITY AS k(attnum, n)
                        JOIN pg_attribute a ON a.attrelid = conrelid AND a.attnum = k.attnum
                        ORDER BY k.n) AS columns
           FROM pg_constraint
           WHERE conrelid = ANY($1::oid[]) AND contype = 'c'
           ORDER BY conname""",
        oids,
    )
    schemas = await conn.fetch(
        "SELECT nspname::text AS name FROM pg_namespace WHERE nspname::text = ANY($1::text[])",
        sorted({schema for schema, _ in wanted} | {"public"}),
    )
    states = {}
    for table in tables:
        oid = table["oid"]
        table_indexes = [i for i in indexes if i["indrelid"] == oid]
        primary = next((tuple(i["columns"]) for i in table_indexes if i["indisprimary"]), ())
        states[(table["schema"], table["name"])] = schema_plan.TableState(
            columns=tuple(
                schema_plan.ColumnState(c["name"], c["type"], c["attnotnull"], c["atthasdef"])
                for c in columns
                if c["attrelid"] == oid
            ),
            primary_key=primary,
            indexes=tuple(
                schema_plan.IndexState(
                    i["name"], i["method"], tuple(i["columns"]), i["indisprimary"], i["indisvalid"]
                )
                for i in table_indexes
            ),
            checks=tuple(
                schema_plan.CheckState(
                    c["name"], tuple(c["columns"]), c["definition"], c["convalidated"]
                )
                for c in checks
                if c["conrelid"] == oid
            ),
            partitioned=table["partitioned"],
            partition_by=table["partition_by"],
            has_default=table["has_default"],
        )
    recorded: dict[str, Any] = {}
    if applied and await _has_stream_catalog(conn):
        for row in await conn.fetch("SELECT stream, declaration::text AS d FROM stream_catalog"):
            recorded[row["stream"]] = msgspec.json.decode(row["d"])
    return schema_plan.DatabaseState(
        tables=states, schemas=frozenset(s["name"] for s in schemas), applied=recorded
    )


async def check_catalog(
    conn: Connection, catalog: Catalog, streams: Iterable[str] | None = None
) -> None:
    """Refuse to go on when the tables of ``streams`` (default: all the catalog's) lack what
    their catalog needs: one line that names every table and column, and `pipeline migrate`.

    Agents never change the schema: `pipeline migrate` does, as the migrator. A column the
    database has beyond this catalog's is fine when a row may leave it out (nullable or with a
    default): agents of the previous catalog run on after a migration that added it."""
    names = catalog.names if streams is None else tuple(streams)
    unknown = catalog.unknown(names)
    if unknown:  # a replay recorded under another catalog, say
        raise ConfigError(
            f"stream(s) {', '.join(unknown)} are not in the streams catalog (choose from "
            f"{', '.join(catalog.names)}): set PIPELINE_STREAMS_FILE to the catalog that "
            "declares them"
        )
    specs = [catalog[name] for name in names]
    found = schema_plan.missing(specs, await database_state(conn, specs, applied=False))
    if found:
        raise SchemaError(
            f"the database does not hold the tables that stream(s) "
            f"{', '.join(s.name for s in specs)} need: {'; '.join(found)}: "
            f"{schema_plan.MIGRATE_HINT}"
        )


def required_version(migrations: Sequence[Migration]) -> int:
    """The schema version this code needs: its highest migration."""
    return max((m.version for m in migrations), default=0)


async def schema_version(conn: Connection) -> int | None:
    """The highest migration applied to the database (0 when none); None when this login
    may not read ``schema_migrations`` (granted from migration 007 on: the schema is older)."""
    if not await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL"):
        return 0
    try:
        version: int | None = await conn.fetchval("SELECT max(version) FROM schema_migrations")
    except asyncpg.InsufficientPrivilegeError:
        return None
    return version or 0


async def check_schema(conn: Connection, migrations: Sequence[Migration] | None = None) -> None:
    """Refuse to go on when the database's schema is older than this code needs.

    The agents and the other commands that write rows never change the schema (their login
    may not): `pipeline migrate`, as the migrator, does. A newer schema is fine: migrations
    only add.
    """
    needed = required_version(read_migrations() if migrations is None else migrations)
    found = await schema_version(conn)
    if found is not None and found >= needed:
        return
    where = (
        f"older than version {_SCHEMA_READABLE_FROM} (this login may not read schema_migrations)"
        if found is None
        else f"at version {found}"
    )
    raise SchemaError(
        f"the database schema is {where}, this pipeline needs {needed}: run `pipeline "
        "migrate` as the migrator (PIPELINE_MIGRATE_DATABASE_URL, docs/security.md)"
    )


# -- offsets --------------------------------------------------------------------------------


async def load_offsets(
    conn: Connection, group: str, starts: dict[tuple[str, int], int]
) -> dict[tuple[str, int], int]:
    """The stored next offset of each partition; a partition seen for the first time is
    recorded at its start offset (the earliest one Kafka still has)."""
    topics = [tp[0] for tp in starts]
    partitions = [tp[1] for tp in starts]
    async with transaction(conn):
        await conn.execute(
            """INSERT INTO ingest_offsets (group_id, topic, partition, next_offset)
               SELECT $1, t, p, o FROM unnest($2::text[], $3::int[], $4::bigint[]) AS u(t, p, o)
               ON CONFLICT DO NOTHING""",
            group,
            topics,
            partitions,
            list(starts.values()),
        )
        rows = await conn.fetch(
            """SELECT topic, partition, next_offset FROM ingest_offsets
               WHERE group_id = $1 AND (topic, partition) IN
                   (SELECT * FROM unnest($2::text[], $3::int[]))""",
            group,
            topics,
            partitions,
        )
    return {(r["topic"], r["partition"]): r["next_offset"] for r in rows}


async def stored_offsets(conn: Connection, group: str) -> dict[tuple[str, int], int]:
    """Every partition's stored next offset for ``group``."""
    rows = await conn.fetch(
        "SELECT topic, partition, next_offset FROM ingest_offsets WHERE group_id = $1", group
    )
    return {(r["topic"], r["partition"]): r["next_offset"] for r in rows}


async def advance_offsets(
    conn: Connection, group: str, moves: Sequence[tuple[str, int, int, int]]
) -> None:
    """Compare-and-set every (topic, partition, expected, new); :class:`FencedError` when any
    partition's stored offset is not the expected one (another consumer owns it now)."""
    status = await conn.execute(
        """UPDATE ingest_offsets AS o SET next_offset = m.new, updated_at = now()
           FROM unnest($2::text[], $3::int[], $4::bigint[], $5::bigint[]) AS m(t, p, expected, new)
           WHERE o.group_id = $1 AND o.topic = m.t AND o.partition = m.p
             AND o.next_offset = m.expected""",
        group,
        [m[0] for m in moves],
        [m[1] for m in moves],
        [m[2] for m in moves],
        [m[3] for m in moves],
    )
    moved = row_count(status)
    if moved != len(moves):
        raise FencedError(f"{len(moves) - moved} of {len(moves)} partitions moved on")


async def lock_group_work(conn: Connection, group: str) -> None:
    """Take the group's work lock until the transaction ends, before any offset row.

    Work that instances run in their ingest transactions (control decisions, rollbacks) may
    lock other instances' offset rows; taking this lock first makes such work run one at a
    time, so two instances' work never wait on each other's rows."""
    await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", _WORK_LOCK, group)


# -- gaps: a stored offset below the log start (sql/011_ingest_gaps.sql) ---------------------


async def record_gaps(
    conn: Connection, group: str, found: Sequence[tuple[Gap, Action]], instance_id: str
) -> None:
    """Record each gap with what was done (``ingest_gaps``), in the caller's transaction: the
    one whose compare-and-set moves the stored offsets past the skipped ones. A gap a stopped
    stream recorded before is brought up to date (its log start may have moved on)."""
    await conn.execute(
        """INSERT INTO ingest_gaps (group_id, topic, partition, first_offset, end_offset,
                                   action, instance_id, skipped_at)
           SELECT $1, t, p, f, e, a, $2, CASE WHEN a = 'stopped' THEN NULL ELSE now() END
           FROM unnest($3::text[], $4::int[], $5::bigint[], $6::bigint[], $7::text[])
               AS g(t, p, f, e, a)
           ON CONFLICT (group_id, topic, partition, first_offset) DO UPDATE
           SET end_offset = EXCLUDED.end_offset, action = EXCLUDED.action,
               instance_id = EXCLUDED.instance_id, skipped_at = EXCLUDED.skipped_at
           WHERE ingest_gaps.skipped_at IS NULL""",
        group,
        instance_id,
        [g.topic for g, _ in found],
        [g.partition for g, _ in found],
        [g.first for g, _ in found],
        [g.end for g, _ in found],
        [a for _, a in found],
    )


async def recorded_gaps(
    conn: Connection, group: str, *, unacknowledged: bool = False
) -> list[RecordedGap]:
    """The group's recorded gaps, oldest first; with ``unacknowledged``, only those."""
    rows = await conn.fetch(
        """SELECT id, group_id, topic, partition, first_offset, end_offset, action, instance_id,
                  detected_at, skipped_at, acknowledged_at, acknowledged_by
           FROM ingest_gaps WHERE group_id = $1 AND (NOT $2 OR acknowledged_at IS NULL)
           ORDER BY id""",
        group,
        unacknowledged,
    )
    return [RecordedGap(*row.values()) for row in rows]


async def acknowledge_gaps(
    conn: Connection, group: str, ids: Sequence[int] | None, by: str
) -> list[int]:
    """Mark the group's gaps ``ids`` (None: every unacknowledged one) acknowledged by ``by``;
    the ids marked now (one already acknowledged keeps its first acknowledgement)."""
    rows = await conn.fetch(
        """UPDATE ingest_gaps SET acknowledged_at = now(), acknowledged_by = $3
           WHERE group_id = $1 AND acknowledged_at IS NULL
             AND ($2::bigint[] IS NULL OR id = ANY($2::bigint[]))
           RETURNING id""",
        group,
        None if ids is None else list(ids),
        by,
    )
    return sorted(r["id"] for r in rows)


async def reserve_batch_ids(conn: Connection) -> range:
    first: int = await conn.fetchval("SELECT nextval('ingest_batch_id_seq')")
    return range(first, first + _BATCH_IDS_PER_RESERVATION)


# -- table owners ---------------------------------------------------------------------------
#
# A data row names its source partition and offset, not its group or topic, and rollbacks and
# replays delete rows by those two: each data table belongs to one (group, topic), recorded in
# table_owners (sql/009_table_owners.sql, docs/exactly-once.md "One group per table").


@dataclass(frozen=True, order=True)
class TableOwner:
    table: str
    group: str
    topic: str  # the deployed topic (prefix included) whose records the table holds


def stream_tables(catalog: Catalog, stream_topics: Mapping[str, str]) -> dict[str, str]:
    """Every data table of these streams of ``catalog`` (stream name -> deployed topic),
    with its topic."""
    return {
        table: topic
        for stream, topic in stream_topics.items()
        for table in catalog[stream].table_names
    }


def foreign_owners(
    group: str, wanted: Mapping[str, str], owners: Iterable[TableOwner]
) -> list[TableOwner]:
    """The owners of ``wanted`` tables (table -> topic) that are not ``group`` on that topic."""
    return sorted(
        o for o in owners if o.table in wanted and (o.group, o.topic) != (group, wanted[o.table])
    )


def ownership_error(
    group: str, wanted: Mapping[str, str], foreign: Sequence[TableOwner]
) -> OwnershipError:
    """What a group is told when tables it would write belong to another (group, topic)."""
    by_owner: dict[tuple[str, str], list[str]] = {}
    for owner in foreign:
        by_owner.setdefault((owner.group, owner.topic), []).append(owner.table)
    parts = []
    for (owner_group, topic), tables in by_owner.items():
        parts.append(
            f"{', '.join(tables)} belong{'s' if len(tables) == 1 else ''} to group "
            f"{owner_group!r} on topic {topic!r}, not to group {group!r} on topic "
            f"{wanted[tables[0]]!r}"
        )
    owners = sorted({o.group for o in foreign})
    release = " and ".join(f"`pipeline owners release --group {g}`" for g in owners)
    return OwnershipError(
        "; ".join(parts)
        + ". A data table serves one group and topic: rows do not record their group, and a "
        "rollback or replay deletes rows by source partition and offset, so it would delete "
        "the other's rows. Give this group another database, or, once the owner has stopped "
        f"for good (its agents and replays), release its tables as the migrator: {release} "
        '(docs/exactly-once.md, "One group per table")'
    )


async def claim_tables(conn: asyncpg.Connection, group: str, tables: Mapping[str, str]) -> None:
    """Claim ``tables`` (table -> deployed topic) for ``group``, all or none: the ones no one
    owns become the group's; :class:`OwnershipError` when any belongs to another group or
    topic. In the caller's transaction when there is one (a savepoint), else in its own.

    Tables are claimed in name order, so two groups claiming at once never deadlock."""
    if not tables:
        return
    names = sorted(tables)
    async with transaction(conn):
        await conn.execute(
            """INSERT INTO table_owners (table_name, group_id, topic)
               SELECT t, $1, p FROM unnest($2::text[], $3::text[]) WITH ORDINALITY AS u(t, p, n)
               ORDER BY n
               ON CONFLICT DO NOTHING""",
            group,
            names,
            [tables[n] for n in names],
        )
        rows = await conn.fetch(
            "SELECT table_name, group_id, topic FROM table_owners WHERE table_name = ANY($1)",
            names,
        )
        owners = [TableOwner(r["table_name"], r["group_id"], r["topic"]) for r in rows]
        foreign = foreign_owners(group, tables, owners)
        if foreign:
            raise ownership_error(group, tables, foreign)


async def table_owners(conn: Connection) -> list[TableOwner]:
    """Every claimed data table, by name."""
    rows = await conn.fetch(
        "SELECT table_name, group_id, topic FROM table_owners ORDER BY table_name"
    )
    return [TableOwner(r["table_name"], r["group_id"], r["topic"]) for r in rows]


async def release_tables(conn: Connection, group: str) -> list[TableOwner]:
    """Hand back every table ``group`` owns (the migrator's right); return what was released.

    Takes the group's work lock first: a rollback in flight finishes before its tables go."""
    async with transaction(conn):
        await lock_group_work(conn, group)
        rows = await conn.fetch(
            """DELETE FROM table_owners WHERE group_id = $1
               RETURNING table_name, group_id, topic""",
            group,
        )
    return sorted(TableOwner(r["table_name"], r["group_id"], r["topic"]) for r in rows)


# -- writers --------------------------------------------------------------------------------


_SOURCE = ("src_partition", "src_offset")
#: How long a writer trusts the partitions it read before reading them again.
ROUTES_TTL_S = 60.0
#: What a write into a partition by name meets when the partition changed since the writer
#: read it: dropped (undefined table), its grant revoked, made again with other bounds (a
#: check violation: the partition constraint).
_STALE_ROUTE = ("42P01", "42501", "23514")


class TableWriter:
    """Writes one stream's rows, as its mode says (docs/streams.md).

    An append table without a key takes a plain COPY (into the parent of a partitioned one,
    or the partition that holds the whole batch: :meth:`partition_for`). Every other table
    takes a COPY into a temporary staging table, then one statement that moves the staged
    rows into place (an append table's into that partition too) with ``ON CONFLICT``, so
    redelivered and out-of-order rows are harmless: an append table with a key skips a key it
    has; a "latest" table keeps the higher version (without a version, the later offset of a
    partition; a row from another partition replaces); a "history" stream also appends every
    record to its history table. With ``tombstones = "delete"``, a batch's
    :class:`~pipeline.rows.Tombstone` rows delete their keys' rows first
    (:func:`split_tombstones`).

    The inserts into a table with a row per record (append, history) name no conflict
    target: a partitioned table's primary key ends with its partition column, and the same
    statement must work on a table still keyed without it, before the upgrade partitions it
    (docs/streams.md, "Partitions and retention").

    A staging table is created, when missing, in the transaction that writes: a pooler in
    transaction mode may run the next transaction on a server session that has none, and a
    rolled-back transaction drops the table it created. ``ON COMMIT DELETE ROWS`` leaves it
    empty for whoever comes next; its name carries a hash of the columns written, so a
    session the pooler kept across a migration never hands this writer one of another shape.
    """

    def __init__(self, spec: StreamSpec) -> None:
        tables = spec.tables
        tombstones = spec.tombstones
        self.tables = tables
        self.mode = spec.mode
        table = tables.table
        self.columns = list(table.columns)
        self._schema, self._table = sql_names.split_table(table.name)
        self._staged = self.mode != "append" or bool(tables.key)
        self.stage = sql_names.derived("stage", table.name, _shape(table.name, self.columns))
        self._create_stage = (
            f"CREATE TEMP TABLE IF NOT EXISTS {sql_names.ident(self.stage)} "
            f"(LIKE {sql_names.table(table.name)} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
        self._upsert = _upsert_statement(tables, self.stage, self.mode) if self._staged else ""
        self._upsert_last = (
            _upsert_statement(tables, self.stage, self.mode, last=True) if self._staged else ""
        )
        self._deletes = tombstones == "delete" and self.mode != "append"
        self._key_index = table.columns.index(tables.key[0]) if self._deletes else 0
        self.tombstone_columns = [*tables.key[:1], *_SOURCE]
        self.tombstone_stage = sql_names.derived(
            "tombstones", table.name, _shape(table.name, self.tombstone_columns)
        )
        self._create_tombstone_stage = (
            f"CREATE TEMP TABLE IF NOT EXISTS {sql_names.ident(self.tombstone_stage)} "
            f"ON COMMIT DELETE ROWS AS SELECT {sql_names.columns(self.tombstone_columns)} "
            f"FROM {sql_names.table(table.name)} WITH NO DATA"
        )
        self._delete = _tombstone_statement(tables, self.tombstone_stage) if self._deletes else ""
        self._history_only = (
            _history_statement(tables, self.stage) if tables.history is not None else ""
        )
        # A partitioned append table: a batch within one partition of the current interval
        # or later is written into it by name (partitions.direct_routes).
        partitioning = spec.partitioning
        self._interval = partitioning.interval if partitioning else ""
        self._route_index = (
            table.columns.index(partitioning.column)
            if partitioning and self.mode == "append"
            else None
        )
        self._routes: tuple[partitions.Route, ...] = ()
        self._routes_read = -ROUTES_TTL_S  # monotonic time of the last read: never
        # (partition name, last) -> its insert statement
        self._direct: dict[tuple[str, bool], str] = {}

    async def write(self, conn: Connection, rows: Sequence[Row], *, last: bool = False) -> int:
        """Write ``rows``; return how many were new (the rest were duplicates, or records a
        "latest" table had a newer row for). A tombstone that deleted a row counts as new.
        ``last``: no other write into this table follows in the transaction, so the staged
        rows are left for COMMIT to empty instead of deleted as they are read."""
        name = await self.partition_for(conn, rows)
        try:
            return await self._write(conn, rows, name, last)
        except asyncpg.PostgresError as exc:
            if name is None or exc.sqlstate not in _STALE_ROUTE:
                raise
            # The partition was dropped, its grant revoked, or it was made again with other
            # bounds since the routes were read: write through the parent until they are
            # read again. The transaction is lost; the retry writes the batch whole.
            self._routes, self._routes_read = (), time.monotonic()
            raise TransientError(
                f"{exc.sqlstate} writing into partition {name} of "
                f"{self.tables.table.name} by name: {exc}; writing through the table "
                f"for {ROUTES_TTL_S:.0f} s"
            ) from exc

    async def _write(
        self, conn: Connection, rows: Sequence[Row], name: str | None, last: bool
    ) -> int:
        if not self._staged:
            await conn.copy_records_to_table(
                name or self._table, schema_name=self._schema, records=rows, columns=self.columns
            )
            return len(rows)
        new = 0
        for create, stage, staged, columns, statement in self._steps(rows, name, last):
            if staged:
                await conn.execute(create)
                await conn.copy_records_to_table(stage, records=staged, columns=columns)
                new += await conn.fetchval(statement)
        return new

    async def partition_for(self, conn: Connection, rows: Sequence[Row]) -> str | None:
        """The bare name of the partition this writer inserts ``rows`` into by name, or None
        (through the partitioned table). The partitions are read at most every
        :data:`ROUTES_TTL_S` seconds: a partition made since is named after that."""
        if self._route_index is None:
            return None
        if time.monotonic() - self._routes_read >= ROUTES_TTL_S:
            await self._read_routes(conn)
        i = self._route_index
        return partitions.route(self._routes, [row[i] for row in rows])

    async def _read_routes(self, conn: Connection) -> None:
        """The partitions of the current interval and later that this session may insert
        into (a partition in a schema other than public may lack the writer's grant)."""
        # Partitions in the table's own schema only (where the maintenance makes them): the
        # writer names a partition by the table's schema and the partition's bare name.
        found = await conn.fetch(
            """SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound
               FROM pg_inherits i
               JOIN pg_class c ON c.oid = i.inhrelid
               JOIN pg_class p ON p.oid = i.inhparent
               WHERE i.inhparent = to_regclass($1) AND c.relispartition
                 AND c.relnamespace = p.relnamespace
                 AND has_table_privilege(c.oid, 'INSERT')""",
            sql_names.table(self.tables.table.name),
        )
        ranges: list[tuple[str, partitions.Range | None]] = []
        for row in found:
            with contextlib.suppress(ValueError):  # not a range of one time: never named
                ranges.append((row["relname"], partitions.parse_bound(row["bound"])))
        now = datetime.now(UTC)
        self._routes = partitions.direct_routes(ranges, now, self._interval)
        names = {name for _, name in self._routes}
        self._direct = {k: sql for k, sql in self._direct.items() if k[0] in names}
        self._routes_read = time.monotonic()

    def _steps(
        self, rows: Sequence[Row], partition: str | None = None, last: bool = False
    ) -> list[tuple[str, str, Sequence[Any], list[str], str]]:
        """What :meth:`write` stages and runs, in order: (create the stage, the stage, its
        rows, their columns, the statement that moves them into place and returns a count);
        an append table's insert goes into ``partition`` when named (:meth:`partition_for`).
        Every statement empties its stage but the upsert of the transaction's ``last`` write,
        which leaves that to COMMIT."""
        upsert = self._upsert_last if last else self._upsert
        if partition is not None:
            statement = self._direct.get((partition, last))
            if statement is None:
                into = f"{sql_names.ident(self._schema)}.{sql_names.ident(partition)}"
                statement = _upsert_statement(
                    self.tables, self.stage, self.mode, into=into, last=last
                )
                self._direct[(partition, last)] = statement
            return [(self._create_stage, self.stage, rows, self.columns, statement)]
        split = split_tombstones(rows, self._key_index) if self._deletes else None
        stage, tombstones = (
            (self._create_stage, self.stage),
            (
                self._create_tombstone_stage,
                self.tombstone_stage,
            ),
        )
        if split is None:
            return [(*stage, rows, self.columns, upsert)]
        superseded = split.superseded if self._history_only else ()
        return [
            (*stage, superseded, self.columns, self._history_only),
            (*tombstones, split.tombstones, self.tombstone_columns, self._delete),
            (*stage, split.rows, self.columns, upsert),
        ]


def _shape(table: str, columns: Sequence[str]) -> str:
    """A hash of the columns a staging table holds (and of the schema of a table outside
    ``public``, so that ``shop.orders`` and ``shop_orders`` never share a staging table)."""
    schema, _ = sql_names.split_table(table)
    text = ",".join(columns) if schema == "public" else f"{table}:{','.join(columns)}"
    return hashlib.sha256(text.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class TombstoneSplit:
    """A batch with tombstones, in the order its parts are written."""

    superseded: list[Row]  # rows before their key's last tombstone: the history table only
    tombstones: list[tuple[Any, int, int]]  # per key, its last tombstone: (key, partition, offset)
    rows: list[Row]  # every other row: the upsert, after the deletes


def split_tombstones(rows: Sequence[Row], key_index: int) -> TombstoneSplit | None:
    """How a batch with tombstones is written (None: the batch has none).

    Per key, the rows before its last tombstone in the batch never reach the latest table
    (they still go to the history table); that tombstone's delete runs before the rows after
    it are upserted. A tombstone is not a history row.
    """
    last: dict[Any, int] = {}
    for i, row in enumerate(rows):
        if isinstance(row, Tombstone):
            last[row[key_index]] = i
    if not last:
        return None
    superseded: list[Row] = []
    tombstones: list[tuple[Any, int, int]] = []
    after: list[Row] = []
    for i, row in enumerate(rows):
        key = row[key_index]
        cut = last.get(key, -1)
        if isinstance(row, Tombstone):
            if i == cut:
                tombstones.append((key, *source_of(row)))
        elif i < cut:
            superseded.append(row)
        else:
            after.append(row)
    return TombstoneSplit(superseded, tombstones, after)


def _history_target(tables: StreamTables) -> str:
    """The history table's unique key: one row per (key, version), or per record, and per
    time when the table is partitioned."""
    key = (*tables.key, tables.version) if tables.version is not None else _SOURCE
    return sql_names.columns(schema_plan.partition_key(key, tables.partition_by))


def _staged(tables: StreamTables, stage: str, *, last: bool = False) -> str:
    """The staged rows, as ``staged``: deleted as they are read, so that the stage is empty
    for the transaction's next write; or, for its ``last`` write, read alone and left for
    COMMIT to empty (``ON COMMIT DELETE ROWS``), which spares a DELETE of every row."""
    cols = sql_names.columns(tables.table.columns)
    stage = sql_names.ident(stage)
    rows = f"SELECT {cols} FROM {stage}" if last else f"DELETE FROM {stage} RETURNING {cols}"
    return f"WITH staged AS ({rows}), "


def _first_of_each(target: str, cols: str) -> str:
    """The staged rows, the first (lowest partition and offset) of each ``target``: a
    staging table gives rows back in the order they sit on disk, which is not the order COPY
    wrote them in, so ``ON CONFLICT DO NOTHING`` alone would keep whichever came up first."""
    return (
        f"SELECT DISTINCT ON ({target}) {cols} FROM staged "
        f"ORDER BY {target}, {sql_names.columns(_SOURCE)}"
    )


def _history_insert(tables: StreamTables) -> str:
    assert tables.history is not None
    cols = sql_names.columns(tables.table.columns)
    target = _history_target(tables)
    # Without a version the key starts with the source itself: no two staged rows share it.
    rows = (
        _first_of_each(target, cols) if tables.version is not None else f"SELECT {cols} FROM staged"
    )
    return (
        f"new AS (INSERT INTO {sql_names.table(tables.history.name)} ({cols}) {rows} "
        "ON CONFLICT DO NOTHING RETURNING 1)"
    )


def _upsert_statement(
    tables: StreamTables, stage: str, mode: str, into: str = "", *, last: bool = False
) -> str:
    """SQL that moves the staged rows into place and returns the number of new rows; an
    append table's rows go ``into`` one of its partitions, when named.

    All parts of a WITH read the same snapshot, so every insert sees every staged row, and
    the stage is empty afterwards, ready for the next write in the same transaction; but
    after the transaction's ``last`` write, which leaves its rows for COMMIT (:func:`_staged`).
    """
    table = tables.table
    ident = sql_names.ident
    cols = sql_names.columns(table.columns)
    key = sql_names.columns(tables.key)
    staged = _staged(tables, stage, last=last)
    if mode == "append":
        unique = sql_names.columns(schema_plan.partition_key(tables.key, tables.partition_by))
        return (
            f"{staged}new AS (INSERT INTO {into or sql_names.table(table.name)} ({cols}) "
            f"{_first_of_each(unique, cols)} ON CONFLICT DO NOTHING RETURNING 1) "
            "SELECT count(*) FROM new"
        )
    src_partition, src_offset = map(ident, _SOURCE)
    if tables.version is not None:
        version = ident(tables.version)
        # The highest version per key wins, whatever order the versions arrived in; of equal
        # versions, the one that came first (the stored row, or the earliest offset staged).
        order = f"{key}, {version} DESC, {src_partition}, {src_offset}"
        guard = f"t.{version} < EXCLUDED.{version}"
    else:
        # The later offset of a partition wins; a row from another partition replaces (the
        # key moved partitions).
        order = f"{key}, {src_partition} DESC, {src_offset} DESC"
        guard = (
            f"(t.{src_partition} <> EXCLUDED.{src_partition} "
            f"OR t.{src_offset} < EXCLUDED.{src_offset})"
        )
    updates = ", ".join(
        f"{ident(c)} = EXCLUDED.{ident(c)}" for c in table.columns if c not in tables.key
    )
    latest = (
        f"latest AS (INSERT INTO {sql_names.table(table.name)} AS t ({cols}) "
        f"SELECT DISTINCT ON ({key}) {cols} FROM staged ORDER BY {order} "
        f"ON CONFLICT ({key}) DO UPDATE SET {updates} WHERE {guard}"
    )
    if mode == "latest":
        return f"{staged}{latest} RETURNING 1) SELECT count(*) FROM latest"
    # Every record once in the history: those are the new rows.
    return f"{staged}{_history_insert(tables)}, {latest}) SELECT count(*) FROM new"


def _history_statement(tables: StreamTables, stage: str) -> str:
    """SQL that empties the staging table into the history table alone: rows a tombstone
    later in their batch keeps out of the latest table. Returns the number of new rows."""
    return f"{_staged(tables, stage)}{_history_insert(tables)} SELECT count(*) FROM new"


def _tombstone_statement(tables: StreamTables, stage: str) -> str:
    """SQL that empties the tombstones' staging table, deleting the row of each key unless
    that row came from a later offset of the same partition (whatever its version)."""
    ident = sql_names.ident
    key = ident(tables.key[0])
    source = sql_names.columns(_SOURCE)
    src_partition, src_offset = map(ident, _SOURCE)
    return (
        f"WITH doomed AS (DELETE FROM {ident(stage)} RETURNING {key}, {source}), "
        f"gone AS (DELETE FROM {sql_names.table(tables.table.name)} AS t USING doomed "
        f"WHERE t.{key} = doomed.{key} AND NOT (t.{src_partition} = doomed.{src_partition} "
        f"AND t.{src_offset} > doomed.{src_offset}) RETURNING 1) SELECT count(*) FROM gone"
    )


# -- dead letters ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DeadLetter:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]
    timestamp_ms: int | None
    error_class: str
    reason: str


def dead_letter(record: FetchedRecord, error_class: str, reason: str) -> DeadLetter:
    """The dead letter of a consumed record: its coordinates, bytes and headers, and why.
    A header name that is not UTF-8 is kept as text with its bad bytes escaped
    (:func:`~pipeline.records.header_name_text`): neither jsonb nor the DLQ topic's producer
    can carry it as it came; the reason of its ``InvalidHeader`` letter quotes the bytes."""
    return DeadLetter(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=record.key,
        value=record.value,
        headers=[(header_name_text(name), value) for name, value in record.headers],
        timestamp_ms=record.timestamp,
        error_class=error_class,
        reason=reason,
    )


async def insert_dead_letters(conn: Connection, group: str, letters: Iterable[DeadLetter]) -> None:
    await conn.executemany(
        """INSERT INTO dead_letters (group_id, src_topic, src_partition, src_offset, record_key,
               record_value, record_headers, record_ts, error_class, reason)
           VALUES ($1, $2, $3, $4, $5, $6, $7, to_timestamp($8 / 1000.0), $9, $10)
           ON CONFLICT (group_id, src_topic, src_partition, src_offset) DO NOTHING""",
        [
            (
                group,
                d.topic,
                d.partition,
                d.offset,
                d.key,
                d.value,
                [[_without_nul(name), _header_text(value)] for name, value in d.headers],
                d.timestamp_ms,
                d.error_class,
                d.reason,
            )
            for d in letters
        ],
    )


def _header_text(value: bytes | None) -> str | None:
    """A header value as jsonb can hold it: text, non-UTF-8 bytes escaped, no NUL.
    (The DLQ topic keeps the exact bytes.)"""
    if value is None:
        return None
    return _without_nul(value.decode("utf-8", "backslashreplace"))


def _without_nul(text: str) -> str:
    """jsonb cannot hold NUL: it is written as the four characters ``\\x00``."""
    return text.replace("\x00", "\\x00")


def row_count(status: str) -> int:
    """The row count of a command status such as ``INSERT 0 42`` or ``UPDATE 3``."""
    return int(status.rsplit(" ", 1)[1])
