"""The pure parts of the modes' writes, rollbacks and replays: how a batch with tombstones is
split, and every statement naming the catalog's tables and columns through sql_names (a
table named like a keyword, a schema-qualified one, a column named ``select``)."""

from __future__ import annotations

import re

import pytest

from pipeline import catalog, control_store, db, sql_names
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
    found = [writer._create_stage, writer._upsert, *range_deletes(spec)]
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
    assert "ON CONFLICT DO NOTHING" in writer._upsert
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
    assert "ON CONFLICT DO NOTHING RETURNING 1), " in history
    assert history.endswith(" SELECT count(*) FROM new")
    versioned = db.TableWriter(CAT["history"])._upsert
    assert "ON CONFLICT DO NOTHING RETURNING 1), " in versioned


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
