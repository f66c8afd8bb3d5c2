"""The pure parts of the modes' writes, rollbacks and replays: how a batch with tombstones is
split, every statement naming the catalog's tables and columns through sql_names (a
table named like a keyword, a schema-qualified one, a column named ``select``), the
statements of partitioned tables, and the agents' start check on a partitioned table's key
before and after the upgrade partitions it."""

from __future__ import annotations

import dataclasses
import re

import pytest

from pipeline import catalog, control_store, db, schema_plan, sql_names
from pipeline.catalog import Catalog, StreamSpec
from pipeline.db import TombstoneSplit, split_tombstones
from pipeline.replay import range_deletes
from pipeline.rows import Tombstone

CATALOG = """
builtin = false

[[streams]]
name = "plain"
topic = "t.plain"
table = "user"
[streams.columns]
select = "text"
group = "bigint"

[[streams]]
name = "keyed"
topic = "t.keyed"
table = "shop.order"
key = ["select", "group"]
[streams.columns]
select = "text"
group = "bigint"
from = "jsonb"

[[streams]]
name = "latest"
topic = "t.latest"
table = "order"
mode = "latest"
key = ["select"]
version = "limit"
tombstones = "delete"
[streams.columns]
select = "text"
limit = "bigint"

[[streams]]
name = "unversioned"
topic = "t.unversioned"
table = "shop.where"
mode = "latest"
key = ["select", "group"]
[streams.columns]
select = "text"
group = "bigint"

[[streams]]
name = "history"
topic = "t.history"
table = "shop.table"
mode = "history"
key = ["select"]
version = "limit"
tombstones = "delete"
[streams.columns]
select = "text"
limit = "bigint"

[[streams]]
name = "unversioned_history"
topic = "t.unversioned_history"
table = "check"
mode = "history"
key = ["select", "group"]
[streams.columns]
select = "text"
group = "bigint"

[[streams]]
name = "partitioned"
topic = "t.partitioned"
table = "shop.window"
key = ["select"]
partition_by = "when"
partition_interval = "hour"
[streams.columns]
select = "text"
when = "timestamptz"

[[streams]]
name = "partitioned_plain"
topic = "t.partitioned_plain"
table = "offset"
partition_by = "when"
[streams.columns]
value = "double precision"
when = "timestamptz"

[[streams]]
name = "partitioned_history"
topic = "t.partitioned_history"
table = "range"
mode = "history"
key = ["select"]
version = "limit"
partition_by = "when"
[streams.columns]
select = "text"
limit = "bigint"
when = "timestamptz"

[[streams]]
name = "partitioned_log"
topic = "t.partitioned_log"
table = "rows"
mode = "history"
key = ["select"]
partition_by = "when"
[streams.columns]
select = "text"
when = "date"
"""


def _catalog() -> Catalog:
    _, streams = catalog.parse(CATALOG, "quoting.toml")
    return catalog.validate(streams)


CAT = _catalog()
_QUOTED = re.compile(r'"(?:[^"]|"")*"')


def _names(spec: StreamSpec) -> set[str]:
    """Every identifier of the stream: schemas, tables, columns (and the provenance)."""
    found = set(spec.column_names) | {"src_partition", "src_offset", "batch_id", "ingested_at"}
    for table in spec.table_names:
        found.update(sql_names.split_table(table))
    return found


def _statements(spec: StreamSpec) -> list[str]:
    """Every statement a writer, a rollback and a replay run for the stream."""
    writer = db.TableWriter(spec)
    found = [writer._create_stage, writer._upsert, writer._upsert_last, *range_deletes(spec)]
    if spec.tombstones == "delete":
        found += [writer._create_tombstone_stage, writer._delete]
    if spec.history_table is not None:
        found.append(writer._history_only)
    if not control_store.unrestorable([spec]):
        found.append(control_store.restore_statement(spec))
    return [s for s in found if s]


@pytest.mark.parametrize("spec", CAT.streams, ids=CAT.names)
def test_no_identifier_of_the_catalog_reaches_sql_unquoted(spec: StreamSpec) -> None:
    statements = _statements(spec)
    assert statements
    for statement in statements:
        # With every quoted identifier taken out, none of the stream's names is left: each
        # one reached the statement through sql_names. (Keywords are written in capitals.)
        bare = _QUOTED.sub(" ", statement)
        left = sorted(n for n in _names(spec) if re.search(rf"(?<!\w){n}(?!\w)", bare))
        assert left == [], f"{left} unquoted in: {statement}"


def test_the_quoting_test_catches_a_name_pasted_as_it_is() -> None:
    spec = CAT["latest"]
    pasted = f"DELETE FROM {spec.table} WHERE src_offset >= $1"
    bare = _QUOTED.sub(" ", pasted)
    assert [n for n in _names(spec) if re.search(rf"(?<!\w){n}(?!\w)", bare)]


def test_a_schema_qualified_table_is_quoted_part_by_part() -> None:
    writer = db.TableWriter(CAT["keyed"])
    assert 'INSERT INTO "shop"."order" ("select", "group", "from", ' in writer._upsert
    assert 'SELECT DISTINCT ON ("select", "group") "select", "group", "from", ' in writer._upsert
    assert " ON CONFLICT DO NOTHING RETURNING 1) SELECT count(*) FROM new" in writer._upsert
    assert writer._create_stage == (
        f'CREATE TEMP TABLE IF NOT EXISTS "{writer.stage}" '
        '(LIKE "shop"."order" INCLUDING DEFAULTS) ON COMMIT DELETE ROWS'
    )


def test_each_mode_s_statement() -> None:
    latest = db.TableWriter(CAT["latest"])._upsert
    assert latest.endswith(
        ' WHERE t."limit" < EXCLUDED."limit" RETURNING 1) SELECT count(*) FROM latest'
    )
    assert 'ORDER BY "select", "limit" DESC, "src_partition", "src_offset" ' in latest
    unversioned = db.TableWriter(CAT["unversioned"])._upsert
    assert 'ORDER BY "select", "group", "src_partition" DESC, "src_offset" DESC ' in unversioned
    assert 'ON CONFLICT ("select", "group") DO UPDATE SET "src_partition" = ' in unversioned
    assert unversioned.endswith(
        ' WHERE (t."src_partition" <> EXCLUDED."src_partition" '
        'OR t."src_offset" < EXCLUDED."src_offset") RETURNING 1) SELECT count(*) FROM latest'
    )
    history = db.TableWriter(CAT["unversioned_history"])._upsert
    # Without a version, a history row per record.
    assert 'INSERT INTO "public"."check_history" (' in history
    assert " FROM staged ON CONFLICT DO NOTHING RETURNING 1), " in history
    assert history.endswith(" SELECT count(*) FROM new")
    versioned = db.TableWriter(CAT["history"])._upsert
    assert 'SELECT DISTINCT ON ("select", "limit") ' in versioned
    assert " ON CONFLICT DO NOTHING RETURNING 1), " in versioned


def test_a_partitioned_append_table_keeps_the_first_of_each_key_and_time() -> None:
    writer = db.TableWriter(CAT["partitioned"])
    # No conflict target: the same statement works on the table keyed by ("select") and on
    # the partitioned one keyed by ("select", "when"), whose unique key has the time.
    assert writer._upsert == (
        f'WITH staged AS (DELETE FROM "{writer.stage}" RETURNING "select", "when", '
        '"src_partition", "src_offset", "batch_id"), new AS (INSERT INTO "shop"."window" '
        '("select", "when", "src_partition", "src_offset", "batch_id") '
        'SELECT DISTINCT ON ("select", "when") "select", "when", "src_partition", "src_offset", '
        '"batch_id" FROM staged ORDER BY "select", "when", "src_partition", "src_offset" '
        "ON CONFLICT DO NOTHING RETURNING 1) SELECT count(*) FROM new"
    )
    assert writer._create_stage == (
        f'CREATE TEMP TABLE IF NOT EXISTS "{writer.stage}" '
        '(LIKE "shop"."window" INCLUDING DEFAULTS) ON COMMIT DELETE ROWS'
    )


@pytest.mark.parametrize("stream", ["keyed", "latest", "unversioned", "history", "partitioned"])
def test_a_transaction_s_last_write_reads_its_stage_and_leaves_the_rows_to_commit(
    stream: str,
) -> None:
    writer = db.TableWriter(CAT[stream])
    stage = sql_names.ident(writer.stage)
    cols = sql_names.columns(writer.columns)
    emptied = f"WITH staged AS (DELETE FROM {stage} RETURNING {cols}), "
    read = f"WITH staged AS (SELECT {cols} FROM {stage}), "
    assert writer._upsert.startswith(emptied)
    # The only difference: the staged rows are read, not deleted (ON COMMIT DELETE ROWS).
    assert writer._upsert_last == read + writer._upsert.removeprefix(emptied)
    assert "DELETE FROM" not in writer._upsert_last


def test_only_the_last_statement_of_a_last_write_leaves_its_stage_to_commit() -> None:
    writer = db.TableWriter(CAT["history"])  # columns "select" (the key), "limit"
    rows = [("a", 1, 0, 0, 1), Tombstone(("a", None, 0, 1, 1)), ("a", 2, 0, 2, 1)]
    for last in (False, True):
        statements = [step[4] for step in writer._steps(rows, None, last)]
        # The superseded row to the history alone, the tombstone, then the rows after it:
        # the stage is read twice, so its first reader empties it either way.
        assert statements == [
            writer._history_only,
            writer._delete,
            writer._upsert_last if last else writer._upsert,
        ]
        assert statements[0].startswith("WITH staged AS (DELETE FROM ")


def test_a_write_by_name_into_a_partition_is_as_the_parent_s_but_its_target() -> None:
    writer = db.TableWriter(CAT["partitioned"])
    rows = [("k", "2026-01-01", 0, 0, 1)]
    for last in (False, True):
        [(_, _, _, _, statement)] = writer._steps(rows, "window_p20260101", last)
        through = writer._upsert_last if last else writer._upsert
        assert statement == through.replace(
            'INSERT INTO "shop"."window" ', 'INSERT INTO "shop"."window_p20260101" '
        )


def test_a_partitioned_append_table_without_a_key_takes_a_plain_copy() -> None:
    writer = db.TableWriter(CAT["partitioned_plain"])
    assert not writer._staged
    assert writer._upsert == ""


def test_a_partitioned_history_keeps_a_row_per_version_and_time_and_latest_as_it_was() -> None:
    history = db.TableWriter(CAT["partitioned_history"])._upsert
    assert 'INSERT INTO "public"."range_history" (' in history
    assert 'SELECT DISTINCT ON ("select", "limit", "when") ' in history
    assert 'ORDER BY "select", "limit", "when", "src_partition", "src_offset" ' in history
    assert " ON CONFLICT DO NOTHING RETURNING 1), " in history
    # The latest table is never partitioned: its upsert names its key, as before.
    assert 'INSERT INTO "public"."range" AS t (' in history
    assert 'ON CONFLICT ("select") DO UPDATE SET ' in history
    assert history == _without_partitioning_but_history_key(CAT["partitioned_history"])
    log = db.TableWriter(CAT["partitioned_log"])._upsert
    # Without a version, a row per record: the source is unique, nothing to pick from.
    assert (
        'new AS (INSERT INTO "public"."rows_history" ("select", "when", "src_partition", '
        '"src_offset", "batch_id") SELECT "select", "when", "src_partition", "src_offset", '
        '"batch_id" FROM staged ON CONFLICT DO NOTHING RETURNING 1), '
    ) in log


def _without_partitioning_but_history_key(spec: StreamSpec) -> str:
    """The stream's statement without partitioning, with the history's DISTINCT ON given the
    partition column: the only difference partitioning makes."""
    plain = db.TableWriter(dataclasses.replace(spec, partitioning=None))._upsert
    return plain.replace('"select", "limit")', '"select", "limit", "when")').replace(
        'ORDER BY "select", "limit", "src_partition"',
        'ORDER BY "select", "limit", "when", "src_partition"',
    )


def test_replays_and_rollbacks_of_partitioned_tables_delete_by_source_alone() -> None:
    # No partition column in the statements: a replayed record may decode to another time
    # than the row it replaces, so every partition's source index is searched.
    for stream in ("partitioned", "partitioned_history"):
        spec = CAT[stream]
        plain = dataclasses.replace(spec, partitioning=None)
        assert range_deletes(spec) == range_deletes(plain)
        assert control_store.restore_statement(spec) == control_store.restore_statement(plain)


def test_a_tombstone_deletes_unless_the_row_came_later_in_its_partition() -> None:
    writer = db.TableWriter(CAT["latest"])
    assert writer.tombstone_columns == ["select", "src_partition", "src_offset"]
    assert writer._delete == (
        f'WITH doomed AS (DELETE FROM "{writer.tombstone_stage}" RETURNING "select", '
        '"src_partition", "src_offset"), gone AS (DELETE FROM "public"."order" AS t USING doomed '
        'WHERE t."select" = doomed."select" AND NOT (t."src_partition" = doomed."src_partition" '
        'AND t."src_offset" > doomed."src_offset") RETURNING 1) SELECT count(*) FROM gone'
    )


def test_a_replay_empties_only_the_tables_with_a_row_per_record() -> None:
    assert range_deletes(CAT["latest"]) == []
    assert range_deletes(CAT["unversioned"]) == []
    assert range_deletes(CAT["plain"]) == [
        'DELETE FROM "public"."user" WHERE "src_partition" = $1 AND "src_offset" >= $2 '
        'AND "src_offset" < $3'
    ]
    assert range_deletes(CAT["history"]) == [
        'DELETE FROM "shop"."table_history" WHERE "src_partition" = $1 AND "src_offset" >= $2 '
        'AND "src_offset" < $3'
    ]


def test_staging_tables_stay_within_63_bytes_and_keep_their_shape() -> None:
    long = "s" * 40 + "." + "t" * 55
    fields = ("a", "b")
    spec = StreamSpec("long", "t.long", long, tuple(catalog.Column(f, "text") for f in fields))
    writer = db.TableWriter(spec)
    assert len(writer.stage.encode()) <= 63
    assert len(writer.tombstone_stage.encode()) <= 63
    narrower = db.TableWriter(StreamSpec("long", "t.long", long, (catalog.Column("a", "text"),)))
    assert narrower.stage != writer.stage
    # Another schema's table of the same name and columns has a staging table of its own.
    public = db.TableWriter(StreamSpec("p", "t.p", "shop_order", spec.columns))
    other = db.TableWriter(StreamSpec("p", "t.p", "shop.order", spec.columns))
    assert public.stage != other.stage


def test_a_rollback_refuses_what_it_cannot_restore_and_names_it() -> None:
    assert (
        control_store.unrestorable([CAT["plain"], CAT["keyed"], CAT["unversioned_history"]]) == []
    )
    reasons = control_store.unrestorable([CAT["latest"], CAT["unversioned"], CAT["history"]])
    assert [r.split(" (")[0] for r in reasons] == [
        "stream 'latest'",
        "stream 'unversioned'",
        "stream 'history'",
    ]
    assert "without history" in reasons[0]
    assert "tombstones" in reasons[2]
    with pytest.raises(control_store.RollbackRefused, match="stream 'latest'"):
        control_store.restore_statement(CAT["latest"])


def test_the_rollback_rebuilds_latest_from_the_history_left() -> None:
    statement = control_store.restore_statement(CAT["unversioned_history"])
    assert 'DELETE FROM "public"."check_history" AS t USING cut' in statement
    assert 'JOIN lost USING ("select", "group")' in statement
    assert 'ORDER BY "select", "group", "src_partition" DESC, "src_offset" DESC' in statement
    assert 'INSERT INTO "public"."check" (' in statement
    versioned = control_store.restore_statement(CAT["keyed"])
    assert versioned.startswith("WITH cut AS (SELECT * FROM unnest($1::int[], $2::bigint[])")
    assert 'DELETE FROM "shop"."order" AS t USING cut' in versioned


# -- tombstones --------------------------------------------------------------------------------


def _row(key: str, offset: int, value: str = "v") -> tuple[object, ...]:
    return (key, value, 0, offset, 1)


def _tomb(key: str, offset: int) -> Tombstone:
    return Tombstone((key, None, 0, offset, 1))


def test_a_batch_without_tombstones_is_not_split() -> None:
    assert split_tombstones([_row("a", 0), _row("b", 1)], 0) is None
    assert split_tombstones([], 0) is None


def test_rows_before_a_key_s_last_tombstone_reach_only_the_history() -> None:
    rows = [
        _row("a", 0),
        _row("b", 1),
        _tomb("a", 2),
        _row("a", 3),
        _tomb("a", 4),  # a's last tombstone: a's rows before it are superseded
        _row("a", 5),
        _row("c", 6),
        _tomb("b", 7),
        _tomb("d", 8),  # a key with no row in the batch
    ]
    assert split_tombstones(rows, 0) == TombstoneSplit(
        superseded=[_row("a", 0), _row("b", 1), _row("a", 3)],
        tombstones=[("a", 0, 4), ("b", 0, 7), ("d", 0, 8)],
        rows=[_row("a", 5), _row("c", 6)],
    )


def test_a_tombstone_is_found_by_its_key_column() -> None:
    rows = [("x", "k", 0, 0, 1), Tombstone((None, "k", 0, 1, 1)), ("y", "k", 0, 2, 1)]
    split = split_tombstones(rows, 1)
    assert split == TombstoneSplit([rows[0]], [("k", 0, 1)], [rows[2]])


# -- the agents' start check on a partitioned table --------------------------------------------


def _state(spec: StreamSpec, keys: dict[str, tuple[str, ...]]) -> schema_plan.DatabaseState:
    """The database with the stream's tables as the plan makes them, but the primary keys
    given by table name."""
    tables = {}
    for shape in schema_plan.shapes(spec):
        columns = [
            schema_plan.ColumnState(c.name, schema_plan.pg_type(c.type), not c.nullable)
            for c in shape.columns
        ] + [
            schema_plan.ColumnState("src_partition", "integer", True),
            schema_plan.ColumnState("src_offset", "bigint", True),
            schema_plan.ColumnState("batch_id", "bigint", True),
            schema_plan.ColumnState("ingested_at", "timestamp with time zone", True, True),
        ]
        key = keys.get(shape.name, shape.primary_key)
        tables[shape.qualified] = schema_plan.TableState(tuple(columns), key)
    return schema_plan.DatabaseState(tables)


@pytest.mark.parametrize(
    ("stream", "table", "before", "after"),
    [
        ("partitioned", "shop.window", ("select",), ("select", "when")),
        ("partitioned_history", "range_history", ("select", "limit"), ("select", "limit", "when")),
        (
            "partitioned_log",
            "rows_history",
            ("src_partition", "src_offset"),
            ("src_partition", "src_offset", "when"),
        ),
    ],
)
def test_an_agent_runs_on_a_partitioned_stream_s_table_keyed_before_or_after_the_upgrade(
    stream: str, table: str, before: tuple[str, ...], after: tuple[str, ...]
) -> None:
    spec = CAT[stream]
    assert [s.primary_key for s in schema_plan.shapes(spec) if s.name == table] == [after]
    assert schema_plan.missing([spec], _state(spec, {table: after})) == []
    assert schema_plan.missing([spec], _state(spec, {table: before})) == []


def test_an_agent_refuses_a_partitioned_stream_s_table_of_another_key() -> None:
    spec = CAT["partitioned"]
    wrong = {"shop.window": ("when",)}
    assert schema_plan.missing([spec], _state(spec, wrong)) == [
        "shop.window has primary key (when), the catalog says (select, when)"
    ]
    assert schema_plan.missing([spec], _state(spec, {"shop.window": ()})) == [
        "shop.window has primary key none, the catalog says (select, when)"
    ]
    history = CAT["partitioned_history"]
    # The latest table is never partitioned: only its own key will do.
    latest = {"range": ("select", "when")}
    assert schema_plan.missing([history], _state(history, latest)) == [
        "public.range has primary key (select, when), the catalog says (select)"
    ]
    # The key of the table before the upgrade is accepted for a partitioned stream only.
    plain = dataclasses.replace(spec, partitioning=None)
    assert schema_plan.missing([plain], _state(spec, {})) == [
        "shop.window has primary key (select, when), the catalog says (select)"
    ]
