"""The parts of pipeline.db that need no server: error classes, upsert SQL, migration files."""

from __future__ import annotations

import dataclasses
import hashlib
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import asyncpg
import msgspec
import pytest

from pipeline import db
from pipeline.catalog import load as load_catalog
from pipeline.db import (
    SQL_DIR,
    ClientDataError,
    _decode_jsonb,
    _decode_timestamptz,
    _encode_jsonb,
    _encode_timestamptz,
    _upsert_statement,
    classify,
    read_migrations,
    row_count,
)
from pipeline.errors import ConfigError, DataError, FencedError, SchemaError, TransientError


class FakePgError(Exception):
    """Stands in for a driver error: all classify() may look at is ``sqlstate`` and the type."""

    def __init__(self, sqlstate: str | None, message: str = "boom") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


# -- classify --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        pytest.param(FakePgError("08006", "connection failure"), id="08006-connection-failure"),
        pytest.param(FakePgError("08003"), id="08003-connection-does-not-exist"),
        pytest.param(FakePgError("57P01", "terminating"), id="57P01-admin-shutdown"),
        pytest.param(FakePgError("57014"), id="57014-query-canceled"),
        pytest.param(FakePgError("53300", "too many clients"), id="53300-too-many-connections"),
        pytest.param(FakePgError("53100"), id="53100-disk-full"),
        pytest.param(FakePgError("58030"), id="58030-io-error"),
        pytest.param(FakePgError("40001", "could not serialize"), id="40001-serialization"),
        pytest.param(FakePgError("40P01", "deadlock detected"), id="40P01-deadlock"),
        pytest.param(FakePgError("25006", "read-only transaction"), id="25006-read-only"),
        pytest.param(FakePgError("55P03", "lock not available"), id="55P03-lock-not-available"),
        pytest.param(
            asyncpg.exceptions.IdleInTransactionSessionTimeoutError("idle-in-transaction timeout"),
            id="25P03-asyncpg-IdleInTransactionSessionTimeout",
        ),
        pytest.param(
            asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"),
            id="asyncpg-ConnectionDoesNotExist",
        ),
        pytest.param(FakePgError("25P04", "transaction timeout"), id="25P04-transaction-timeout"),
        pytest.param(
            asyncpg.exceptions.InvalidCachedStatementError("cached plan must not change"),
            id="asyncpg-InvalidCachedStatement",
        ),
        pytest.param(
            # Through a transaction pooler: bound after a Sync, on another server session.
            asyncpg.exceptions.InvalidSQLStatementNameError(
                "unnamed prepared statement does not exist"
            ),
            id="asyncpg-unnamed-statement-gone",
        ),
        pytest.param(OSError("network unreachable"), id="OSError"),
        pytest.param(ConnectionResetError("reset by peer"), id="ConnectionResetError"),
        pytest.param(TimeoutError("timed out"), id="TimeoutError"),
        pytest.param(asyncpg.exceptions.AdminShutdownError("bye"), id="asyncpg-AdminShutdown"),
        pytest.param(
            asyncpg.exceptions.ConnectionDoesNotExistError("closed"), id="asyncpg-ConnectionGone"
        ),
        pytest.param(
            asyncpg.exceptions.SerializationError("retry"), id="asyncpg-SerializationError"
        ),
        pytest.param(
            # What a BEGIN met in the PostgreSQL-restart test: the server's FATAL had arrived.
            asyncpg.exceptions._base.InternalClientError(
                "cannot switch to state 15; another operation (2) is in progress"
            ),
            id="asyncpg-InternalClientError",
        ),
    ],
)
def test_transient_errors(exc: BaseException) -> None:
    error = classify(exc)
    assert type(error) is TransientError
    assert str(error) == f"{type(exc).__name__}: {exc}"
    assert isinstance(error, TransientError)  # for the type checker
    assert error.source == "postgres"  # the metrics label of the retry


@pytest.mark.parametrize(
    ("exc", "sqlstate"),
    [
        pytest.param(FakePgError("22P05", "unsupported unicode escape"), "22P05", id="22P05"),
        pytest.param(FakePgError("23514", "violates check constraint"), "23514", id="23514"),
        pytest.param(FakePgError("23505", "duplicate key"), "23505", id="23505"),
        pytest.param(FakePgError("22021", "invalid byte sequence"), "22021", id="22021"),
        pytest.param(FakePgError("22003", "out of range"), "22003", id="22003"),
        pytest.param(FakePgError("23502", "null value"), "23502", id="23502"),
        pytest.param(
            asyncpg.exceptions.UniqueViolationError("duplicate key"), "23505", id="asyncpg-23505"
        ),
        # A limit one value exceeds: a key too long for its index, a value nested too deep.
        pytest.param(
            asyncpg.exceptions.ProgramLimitExceededError(
                "index row size 8216 exceeds btree version 4 maximum 2704 for index "
                '"agent_states_pkey"'
            ),
            "54000",
            id="asyncpg-54000-index-row-size",
        ),
        pytest.param(FakePgError("54000", "string is too long for tsvector"), "54000", id="54000"),
        pytest.param(FakePgError("54001", "stack depth limit exceeded"), "54001", id="54001"),
        pytest.param(
            asyncpg.exceptions.CharacterNotInRepertoireError("bad byte"),
            "22021",
            id="asyncpg-22021",
        ),
    ],
)
def test_data_errors_keep_their_sqlstate(exc: BaseException, sqlstate: str) -> None:
    error = classify(exc)
    assert type(error) is DataError
    assert isinstance(error, DataError)  # for the type checker
    assert error.sqlstate == sqlstate
    assert str(error) == f"{sqlstate} {exc}"


@pytest.mark.parametrize(
    ("exc", "sqlstate"),
    [
        pytest.param(FakePgError("42703", "column does not exist"), "42703", id="42703"),
        pytest.param(FakePgError("42501", "permission denied"), "42501", id="42501"),
        pytest.param(FakePgError("42P01", "relation does not exist"), "42P01", id="42P01"),
        pytest.param(
            asyncpg.exceptions.InsufficientPrivilegeError("denied"), "42501", id="asyncpg-42501"
        ),
    ],
)
def test_schema_errors(exc: BaseException, sqlstate: str) -> None:
    error = classify(exc)
    assert type(error) is SchemaError
    assert str(error) == f"{sqlstate} {exc}"


@pytest.mark.parametrize(
    "exc",
    [
        pytest.param(FakePgError("P0001", "raised by a trigger"), id="P0001-raise-exception"),
        pytest.param(FakePgError("XX000", "internal error"), id="XX000-internal"),
        pytest.param(FakePgError("0A000", "not supported"), id="0A000-feature-not-supported"),
        pytest.param(FakePgError("25P02", "aborted transaction"), id="25P02-in-failed-txn"),
        # Limits a statement exceeds, whatever its rows hold.
        pytest.param(FakePgError("54011", "too many columns"), id="54011-too-many-columns"),
        pytest.param(FakePgError("54023", "too many arguments"), id="54023-too-many-arguments"),
        pytest.param(FakePgError(None), id="sqlstate-None"),
        pytest.param(FakePgError(""), id="sqlstate-empty"),
        pytest.param(ValueError("not a driver error"), id="ValueError"),
        pytest.param(KeyError("k"), id="KeyError"),
        pytest.param(TransientError("already ours"), id="ours-TransientError"),
        pytest.param(DataError("already ours", sqlstate="23505"), id="ours-DataError"),
        pytest.param(SchemaError("already ours", stream="events"), id="ours-SchemaError"),
        pytest.param(FencedError("moved on"), id="ours-FencedError"),
    ],
)
def test_other_errors_are_returned_unchanged(exc: BaseException) -> None:
    assert classify(exc) is exc


# -- upsert statements -----------------------------------------------------------------------


def _q(names: str) -> str:
    """A comma list of column names as the statements write them: each one quoted."""
    return ", ".join(f'"{n}"' for n in names.split(", "))


STATE_COLS = _q("agent_id, state, version, ts, data, src_partition, src_offset, batch_id")
CONFIG_COLS = _q("key, value, version, ts, updated_by, src_partition, src_offset, batch_id")
EVENT_COLS = _q(
    "event_id, agent_id, kind, severity, ts, payload, src_partition, src_offset, batch_id"
)
ANALYTICS_COLS = _q(
    "event_id, user_id, action, ts, properties, src_partition, src_offset, batch_id"
)


def _staged(cols: str) -> str:
    return f'WITH staged AS (DELETE FROM "stage_t" RETURNING {cols}), '


def _updates(names: str) -> str:
    return ", ".join(f'"{n}" = EXCLUDED."{n}"' for n in names.split(", "))


@pytest.mark.parametrize(
    ("stream", "statement"),
    [
        pytest.param(
            "states",
            _staged(STATE_COLS)
            + f'new AS (INSERT INTO "public"."agent_state_history" ({STATE_COLS}) '
            f'SELECT DISTINCT ON ("agent_id", "version", "ts") {STATE_COLS} FROM staged '
            'ORDER BY "agent_id", "version", "ts", "src_partition", "src_offset" '
            "ON CONFLICT DO NOTHING "
            f'RETURNING 1), latest AS (INSERT INTO "public"."agent_states" AS t ({STATE_COLS}) '
            f'SELECT DISTINCT ON ("agent_id") {STATE_COLS} FROM staged '
            'ORDER BY "agent_id", "version" DESC, "src_partition", "src_offset" '
            'ON CONFLICT ("agent_id") DO UPDATE SET '
            + _updates("state, version, ts, data, src_partition, src_offset, batch_id")
            + ' WHERE t."version" < EXCLUDED."version") SELECT count(*) FROM new',
            id="states",
        ),
        pytest.param(
            "config",
            _staged(CONFIG_COLS)
            + f'new AS (INSERT INTO "public"."system_config_history" ({CONFIG_COLS}) '
            f'SELECT DISTINCT ON ("key", "version", "ts") {CONFIG_COLS} FROM staged '
            'ORDER BY "key", "version", "ts", "src_partition", "src_offset" '
            "ON CONFLICT DO NOTHING "
            f'RETURNING 1), latest AS (INSERT INTO "public"."system_config" AS t ({CONFIG_COLS}) '
            f'SELECT DISTINCT ON ("key") {CONFIG_COLS} FROM staged '
            'ORDER BY "key", "version" DESC, "src_partition", "src_offset" '
            'ON CONFLICT ("key") DO UPDATE SET '
            + _updates("value, version, ts, updated_by, src_partition, src_offset, batch_id")
            + ' WHERE t."version" < EXCLUDED."version") SELECT count(*) FROM new',
            id="config",
        ),
        pytest.param(
            "events",
            _staged(EVENT_COLS) + f'new AS (INSERT INTO "public"."system_events" ({EVENT_COLS}) '
            f'SELECT DISTINCT ON ("event_id", "ts") {EVENT_COLS} FROM staged '
            'ORDER BY "event_id", "ts", "src_partition", "src_offset" '
            "ON CONFLICT DO NOTHING RETURNING 1) SELECT count(*) FROM new",
            id="events",
        ),
        pytest.param(
            "analytics",
            _staged(ANALYTICS_COLS)
            + f'new AS (INSERT INTO "public"."user_analytics" ({ANALYTICS_COLS}) '
            f'SELECT DISTINCT ON ("event_id", "ts") {ANALYTICS_COLS} FROM staged '
            'ORDER BY "event_id", "ts", "src_partition", "src_offset" '
            "ON CONFLICT DO NOTHING RETURNING 1) SELECT count(*) FROM new",
            id="analytics",
        ),
    ],
)
def test_upsert_statement(stream: str, statement: str) -> None:
    spec = load_catalog()[stream]
    assert _upsert_statement(spec.tables, "stage_t", spec.mode) == statement


def test_states_upsert_shape() -> None:
    """The properties the exactly-once protocol leans on, stated one by one."""
    statement = _upsert_statement(load_catalog()["states"].tables, "stage_agent_states", "history")
    # The stage is emptied by the same statement, so a second write in the transaction (a
    # bisection) never sees the first one's rows.
    assert statement.startswith('WITH staged AS (DELETE FROM "stage_agent_states" RETURNING ')
    history, latest = statement.split("), latest AS (")
    assert 'new AS (INSERT INTO "public"."agent_state_history" ' in history
    # Every version (at its time: the history is partitioned by ts) lands once in the
    # history, and those are the rows counted as new.
    assert 'SELECT DISTINCT ON ("agent_id", "version", "ts") ' in history
    assert history.endswith(" ON CONFLICT DO NOTHING RETURNING 1")
    assert statement.endswith(" SELECT count(*) FROM new")
    assert latest.startswith('INSERT INTO "public"."agent_states" ')
    # One row per agent, the highest version, so ON CONFLICT never touches a row twice.
    assert 'SELECT DISTINCT ON ("agent_id") ' in latest
    assert ' ORDER BY "agent_id", "version" DESC' in latest
    assert 'ON CONFLICT ("agent_id") DO UPDATE SET ' in latest
    assert '"agent_id" = EXCLUDED."agent_id"' not in latest  # the key is never rewritten
    # Only a higher version replaces the stored one, whatever order versions arrive in.
    assert ' WHERE t."version" < EXCLUDED."version")' in latest


# -- migrations ------------------------------------------------------------------------------


def test_read_migrations_of_the_project() -> None:
    migrations = read_migrations()
    assert [m.name for m in migrations[:3]] == [
        "001_data_tables.sql",
        "002_ingest_state.sql",
        "003_roles.sql",
    ]
    # Numbered 1, 2, 3 ... with no gap and no repeat, in that order.
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))
    for migration in migrations:
        assert migration.sql == (SQL_DIR / migration.name).read_text()


def test_read_migrations_orders_by_number(tmp_path: Path) -> None:
    for name in ("010_ten.sql", "002_two.sql", "001_one.sql"):
        (tmp_path / name).write_text(f"-- {name}\n")
    (tmp_path / "README.md").write_text("not a migration")
    migrations = read_migrations(tmp_path)
    assert [(m.version, m.name, m.sql) for m in migrations] == [
        (1, "001_one.sql", "-- 001_one.sql\n"),
        (2, "002_two.sql", "-- 002_two.sql\n"),
        (10, "010_ten.sql", "-- 010_ten.sql\n"),
    ]


def test_read_migrations_of_an_empty_directory(tmp_path: Path) -> None:
    assert read_migrations(tmp_path) == []


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("1_short.sql", id="too-few-digits"),
        pytest.param("0001_long.sql", id="too-many-digits"),
        pytest.param("001-dash.sql", id="dash"),
        pytest.param("001_Upper.sql", id="upper-case"),
        pytest.param("001_.sql", id="no-name"),
        pytest.param("001_with space.sql", id="space"),
        pytest.param("abc_letters.sql", id="no-number"),
    ],
)
def test_badly_named_migration_raises(tmp_path: Path, name: str) -> None:
    (tmp_path / "001_good.sql").write_text("SELECT 1;")
    (tmp_path / name).write_text("SELECT 2;")
    with pytest.raises(SchemaError) as caught:
        read_migrations(tmp_path)
    assert str(caught.value) == (
        f"{tmp_path / name}: migration files are named NNN_lowercase_name.sql"
    )


def test_two_migrations_with_one_number_raise(tmp_path: Path) -> None:
    for name in ("001_first.sql", "002_second.sql", "002_again.sql"):
        (tmp_path / name).write_text("SELECT 1;")
    with pytest.raises(SchemaError) as caught:
        read_migrations(tmp_path)
    assert str(caught.value) == f"{tmp_path}: two migrations share a number: [1, 2, 2]"


# -- small helpers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "count"),
    [
        pytest.param("INSERT 0 42", 42, id="insert"),
        pytest.param("UPDATE 3", 3, id="update"),
        pytest.param("DELETE 0", 0, id="delete-none"),
        pytest.param("COPY 50000", 50_000, id="copy"),
    ],
)
def test_count_reads_the_command_status(status: str, count: int) -> None:
    assert row_count(status) == count


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        pytest.param(msgspec.Raw(b'{"a": [1, 2]}'), b'\x01{"a": [1, 2]}', id="raw-kept-as-is"),
        pytest.param({"a": None}, b'\x01{"a":null}', id="python-object"),
        pytest.param([1, "x"], b'\x01[1,"x"]', id="python-list"),
    ],
)
def test_jsonb_binary_encoding(value: object, wire: bytes) -> None:
    assert _encode_jsonb(value) == wire


def test_jsonb_binary_decoding() -> None:
    assert _decode_jsonb(b'\x01{"a": [1, 2.5, null]}') == {"a": [1, 2.5, None]}


_PLUS_TWO = timezone(timedelta(hours=2))


@pytest.mark.parametrize(
    ("value", "micros"),
    [
        pytest.param(datetime(2000, 1, 1, tzinfo=UTC), 0, id="postgres-epoch"),
        pytest.param(datetime(2000, 1, 1, 2, tzinfo=_PLUS_TWO), 0, id="epoch-at-another-offset"),
        pytest.param(datetime(2000, 1, 1, 0, 0, 0, 1, tzinfo=UTC), 1, id="one-microsecond"),
        pytest.param(datetime(1999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC), -1, id="before"),
        pytest.param(
            datetime(2026, 11, 24, 12, 30, 5, 123_456, tzinfo=UTC),
            (9824 * 86_400 + 12 * 3600 + 30 * 60 + 5) * 1_000_000 + 123_456,
            id="a-recent-instant",
        ),
    ],
)
def test_timestamptz_binary_encoding_and_back(value: datetime, micros: int) -> None:
    assert _encode_timestamptz(value) == (micros,)
    assert _decode_timestamptz((micros,)) == value


def test_timestamptz_infinities_decode_to_the_extremes() -> None:
    assert _decode_timestamptz((2**63 - 1,)) == datetime.max.replace(tzinfo=UTC)
    assert _decode_timestamptz((-(2**63),)) == datetime.min.replace(tzinfo=UTC)


def test_a_value_the_client_cannot_encode_is_a_data_error_not_a_retry() -> None:
    # asyncpg raises its client-side DataError (an InterfaceError) before anything reaches the
    # server; retrying would loop forever, bisecting finds the row.
    error = classify(ClientDataError("invalid input for query argument $1"))
    assert isinstance(error, DataError)
    assert error.sqlstate == "22000"


@pytest.mark.parametrize(
    "exc",
    [
        pytest.param(
            asyncpg.exceptions.DuplicatePreparedStatementError(
                'prepared statement "__asyncpg_stmt_1__" already exists'
            ),
            id="duplicate",
        ),
        pytest.param(
            asyncpg.exceptions.InvalidSQLStatementNameError(
                'prepared statement "__asyncpg_stmt_7__" does not exist'
            ),
            id="missing",
        ),
        pytest.param(
            # asyncpg's own hint follows the server's message: the line keeps the first only.
            asyncpg.exceptions.InvalidSQLStatementNameError(
                'prepared statement "__asyncpg_stmt_7__" does not exist\n'
                "HINT:  \nNOTE: pgbouncer with pool_mode set to ..."
            ),
            id="missing-with-asyncpg-hint",
        ),
    ],
)
def test_named_statements_lost_to_a_transaction_pooler_name_the_setting(
    exc: BaseException,
) -> None:
    error = classify(exc)
    assert type(error) is ConfigError
    assert str(error) == (
        f"{str(exc).splitlines()[0]}: the database URL goes through a connection pooler in "
        "transaction mode "
        "(PgBouncer's pool_mode=transaction, Neon's -pooler host, Supabase's port 6543); "
        "set PIPELINE_DB_POOLER=transaction, or use the direct connection string "
        "(docs/compatibility.md)"
    )


def test_every_transaction_begins_with_the_session_settings_and_nothing_outlives_it() -> None:
    assert db.Session(command_timeout=5).prelude() == "SET LOCAL synchronous_commit = off"
    assert db.Session(command_timeout=5, idle_in_transaction_timeout=90).prelude() == (
        "SET LOCAL synchronous_commit = off; SET LOCAL idle_in_transaction_session_timeout = 90000"
    )
    assert (
        "SET LOCAL idle_in_transaction_session_timeout = 1"
        in db.Session(command_timeout=5, idle_in_transaction_timeout=0.0001).prelude()
    )


def test_a_staging_table_is_named_for_the_columns_it_stages() -> None:
    """Through a transaction pooler, a server session may keep a staging table made by a
    release that wrote other columns: another shape gets another name."""
    writer = db.TableWriter(load_catalog()["states"])
    shape = hashlib.sha256(
        ",".join(load_catalog()["states"].tables.table.columns).encode()
    ).hexdigest()[:8]
    assert writer.stage == f"stage_agent_states_{shape}"
    states = load_catalog()["states"]
    narrower = db.TableWriter(dataclasses.replace(states, columns=states.columns[:-1]))
    assert narrower.stage.startswith("stage_agent_states_")
    assert narrower.stage != writer.stage


# -- table owners ----------------------------------------------------------------------------


def test_a_streams_tables_are_its_table_and_history_with_its_topic() -> None:
    topics = {"metrics": "a.agents.metrics", "states": "a.agents.states"}
    assert db.stream_tables(load_catalog(), topics) == {
        "performance_metrics": "a.agents.metrics",
        "agent_states": "a.agents.states",
        "agent_state_history": "a.agents.states",
    }


def test_only_another_group_or_another_topic_is_a_foreign_owner() -> None:
    wanted = {"performance_metrics": "a.agents.metrics", "system_events": "a.agents.events"}
    owners = [
        db.TableOwner("system_events", "g", "a.agents.events"),  # ours
        db.TableOwner("performance_metrics", "g", "b.agents.metrics"),  # ours, another prefix
        db.TableOwner("user_analytics", "h", "h.users.analytics"),  # not wanted
    ]
    assert db.foreign_owners("g", wanted, owners) == [owners[1]]
    assert db.foreign_owners("h", wanted, owners) == sorted(owners[:2])
    assert db.foreign_owners("g", wanted, owners[:1]) == []


def test_the_ownership_error_names_the_owner_the_topics_and_the_ways_out() -> None:
    wanted = {"performance_metrics": "b.agents.metrics", "system_events": "b.agents.events"}
    foreign = [
        db.TableOwner("performance_metrics", "g", "a.agents.metrics"),
        db.TableOwner("system_events", "h", "h.agents.events"),
    ]
    text = str(db.ownership_error("g", wanted, foreign))
    assert text.startswith(
        "performance_metrics belongs to group 'g' on topic 'a.agents.metrics', not to group 'g' "
        "on topic 'b.agents.metrics'; system_events belongs to group 'h' on topic "
        "'h.agents.events', not to group 'g' on topic 'b.agents.events'. "
    )
    assert "Give this group another database" in text
    assert (
        "`pipeline owners release --group g` and `pipeline owners release --group h` "
        '(docs/exactly-once.md, "One group per table")'
    ) in text


def test_the_owners_migration_lets_the_writer_claim_and_read_only() -> None:
    sql = (SQL_DIR / "009_table_owners.sql").read_text()
    assert "CREATE TABLE IF NOT EXISTS table_owners" in sql
    assert "REVOKE UPDATE, DELETE, TRUNCATE ON table_owners FROM pipeline_writer;" in sql
    assert "GRANT SELECT, INSERT ON table_owners TO pipeline_writer;" in sql
