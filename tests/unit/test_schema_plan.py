"""The DDL plan (pipeline/schema_plan.py), pure: what a catalog needs from a database that has
nothing, part of it, or all of it; every change it refuses, each named with what to do; the
agents' check at start (docs/streams.md, "Tables" and "Evolution")."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import math
import uuid
from typing import Any

import msgspec
import pytest

from pipeline import catalog, partition_upgrade, schema_plan
from pipeline.catalog import Catalog, Column, StreamSpec
from pipeline.schema_plan import (
    ColumnState,
    DatabaseState,
    IndexState,
    Refused,
    TableState,
    missing,
    plan,
)

ORDERS = """
[[streams]]
name = "orders"
topic = "shop.orders"
table = "{table}"
mode = "{mode}"
{key}
{extra}

[streams.columns]
order_id = "uuid"
amount = "numeric"
revision = "bigint"
status = {{ type = "text", default = "new" }}
{columns}
"""


def orders(
    table: str = "orders",
    mode: str = "latest",
    extra: str = 'version = "revision"',
    columns: str = "",
    key: str = 'key = ["order_id"]',
) -> StreamSpec:
    text = ORDERS.format(table=table, mode=mode, key=key, extra=extra, columns=columns)
    _, (spec,) = catalog.parse(text, "orders.toml")
    return spec


def changed(spec: StreamSpec, **changes: Any) -> StreamSpec:
    return StreamSpec(**{**spec.__dict__, **changes})


def state_of(*streams: StreamSpec, applied: bool = True) -> DatabaseState:
    """The database as `pipeline migrate` leaves it for ``streams``: their tables as the plan
    makes them, their declarations recorded."""
    tables = {}
    for spec in streams:
        for shape in schema_plan.shapes(spec):
            columns = [
                ColumnState(c.name, schema_plan.pg_type(c.type), not c.nullable)
                for c in shape.columns
            ]
            columns += [
                ColumnState("src_partition", "integer", True),
                ColumnState("src_offset", "bigint", True),
                ColumnState("batch_id", "bigint", True),
                ColumnState("ingested_at", "timestamp with time zone", True, True),
            ]
            indexes = [IndexState(i.name, i.using, i.columns) for i in shape.indexes]
            if shape.primary_key:
                indexes.append(IndexState(f"{shape.qualified[1]}_pkey", "btree", shape.primary_key))
            tables[shape.qualified] = TableState(
                tuple(columns),
                shape.primary_key,
                tuple(indexes),
                partitioned=shape.partition_by is not None,
                partition_by=shape.partition_by,
                has_default=shape.partition_by is not None,
            )
    schemas = frozenset({"public"} | {schema for schema, _ in tables})
    recorded = {s.name: s.declaration() for s in streams} if applied else {}
    return DatabaseState(tables, schemas, recorded)


def with_table(state: DatabaseState, name: str, **changes: Any) -> DatabaseState:
    """``state`` with the table ``public.<name>`` changed."""
    table = state.tables[("public", name)]
    tables = dict(state.tables)
    tables[("public", name)] = dataclasses.replace(table, **changes)
    return DatabaseState(tables, state.schemas, state.applied)


def refusal(streams: Catalog | list[StreamSpec], state: DatabaseState) -> tuple[str, ...]:
    with pytest.raises(Refused) as caught:
        plan(streams, state)
    return caught.value.problems


# -- a database without the tables -----------------------------------------------------------


def test_an_empty_database_gets_every_builtin_table_index_and_grant() -> None:
    made = plan(catalog.load(), DatabaseState())
    creates = [s.split(" (")[0] for s in made.statements if s.startswith("CREATE TABLE")]
    partitioned = (
        "agent_state_history",
        "system_events",
        "performance_metrics",
        "user_analytics",
        "system_config_history",
    )
    expected = []
    for t in (
        "agent_states",
        "agent_state_history",
        "system_events",
        "performance_metrics",
        "user_analytics",
        "system_config",
        "system_config_history",
    ):
        expected.append(f'CREATE TABLE "public"."{t}"')
        if t in partitioned:
            expected.append(
                f'CREATE TABLE "public"."{t}_default" PARTITION OF "public"."{t}" DEFAULT'
            )
    assert creates == expected
    partitioned_by = [
        s.split('"')[3] for s in made.statements if s.endswith(' PARTITION BY RANGE ("ts")')
    ]
    assert partitioned_by == list(partitioned)
    indexes = [s for s in made.statements if s.startswith("CREATE INDEX")]
    assert indexes == [
        'CREATE INDEX "agent_state_history_source" ON "public"."agent_state_history" USING brin '
        '("src_partition", "src_offset")',
        'CREATE INDEX "system_events_source" ON "public"."system_events" USING brin '
        '("src_partition", "src_offset")',
        'CREATE INDEX "system_events_agent_ts" ON "public"."system_events" ("agent_id", "ts")',
        'CREATE INDEX "performance_metrics_source" ON "public"."performance_metrics" USING brin '
        '("src_partition", "src_offset")',
        'CREATE INDEX "performance_metrics_ts" ON "public"."performance_metrics" USING brin ("ts")',
        'CREATE INDEX "user_analytics_source" ON "public"."user_analytics" USING brin '
        '("src_partition", "src_offset")',
        'CREATE INDEX "system_config_history_source" ON "public"."system_config_history" USING '
        'brin ("src_partition", "src_offset")',
    ]
    assert sum(s.startswith("GRANT") for s in made.statements) == 14
    assert made.actions[0] == "create table public.agent_states (stream states)"


def test_a_latest_table_with_a_version_and_its_history() -> None:
    made = plan([orders(mode="history")], DatabaseState())
    assert made.statements == (
        'CREATE TABLE "public"."orders" (\n'
        '    "order_id" uuid NOT NULL,\n'
        '    "amount" numeric NOT NULL,\n'
        '    "revision" bigint NOT NULL CHECK ("revision" >= 0),\n'
        '    "status" text NOT NULL,\n'
        '    "src_partition" integer NOT NULL,\n'
        '    "src_offset" bigint NOT NULL,\n'
        '    "batch_id" bigint NOT NULL,\n'
        '    "ingested_at" timestamptz NOT NULL DEFAULT now(),\n'
        '    PRIMARY KEY ("order_id")\n'
        ")",
        'GRANT SELECT, INSERT, UPDATE, DELETE ON "public"."orders" TO "pipeline_writer"',
        'GRANT SELECT ON "public"."orders" TO "pipeline_reader"',
        'CREATE TABLE "public"."orders_history" (\n'
        '    "order_id" uuid NOT NULL,\n'
        '    "amount" numeric NOT NULL,\n'
        '    "revision" bigint NOT NULL CHECK ("revision" >= 0),\n'
        '    "status" text NOT NULL,\n'
        '    "src_partition" integer NOT NULL,\n'
        '    "src_offset" bigint NOT NULL,\n'
        '    "batch_id" bigint NOT NULL,\n'
        '    "ingested_at" timestamptz NOT NULL DEFAULT now(),\n'
        '    PRIMARY KEY ("order_id", "revision")\n'
        ")",
        'CREATE INDEX "orders_history_source" ON "public"."orders_history" USING brin '
        '("src_partition", "src_offset")',
        'GRANT SELECT, INSERT, UPDATE, DELETE ON "public"."orders_history" TO "pipeline_writer"',
        'GRANT SELECT ON "public"."orders_history" TO "pipeline_reader"',
    )


@pytest.mark.parametrize(
    ("spec", "keys"),
    [
        pytest.param(orders(mode="append", extra="", key=""), ["none"], id="append"),
        pytest.param(orders(mode="append", extra=""), ['("order_id")'], id="append-with-key"),
        pytest.param(
            orders(mode="history", extra=""),
            ['("order_id")', '("src_partition", "src_offset")'],
            id="history-without-version",
        ),
    ],
)
def test_primary_keys_by_mode(spec: StreamSpec, keys: list[str]) -> None:
    made = plan([spec], DatabaseState())
    found = [
        s.split("PRIMARY KEY ")[1].split("\n")[0] if "PRIMARY KEY" in s else "none"
        for s in made.statements
        if s.startswith("CREATE TABLE")
    ]
    assert found == keys
    assert not any("CHECK" in s for s in made.statements)


def test_a_new_schema_is_created_and_granted_first() -> None:
    made = plan([orders(table="shop.orders")], DatabaseState())
    assert made.statements[:2] == (
        'CREATE SCHEMA IF NOT EXISTS "shop"',
        'GRANT USAGE ON SCHEMA "shop" TO "pipeline_writer", "pipeline_reader"',
    )
    assert made.actions == ("create schema shop", "create table shop.orders (stream orders)")
    there = DatabaseState(schemas=frozenset({"public", "shop"}))
    assert not any("SCHEMA" in s for s in plan([orders(table="shop.orders")], there).statements)


def test_a_long_table_name_gets_a_source_index_within_63_bytes() -> None:
    spec = orders(table="t" * 55, mode="append", extra="")
    (shape,) = schema_plan.shapes(spec)
    (source,) = shape.indexes
    assert len(source.name.encode()) <= 63
    (other,) = schema_plan.shapes(orders(table="t" * 54 + "u", mode="append", extra=""))
    assert source.name != other.indexes[0].name


# -- a database that has them ----------------------------------------------------------------


def test_a_database_that_matches_needs_nothing() -> None:
    builtin = catalog.load()
    assert plan(builtin, state_of(*builtin)).empty
    # Nor when the catalog was never recorded: the tables of a database migrated before it.
    assert plan(builtin, state_of(*builtin, applied=False)) == schema_plan.Plan()


def test_a_new_stream_beside_the_others() -> None:
    builtin = catalog.load()
    made = plan([*builtin, orders()], state_of(*builtin))
    assert made.actions == ("create table public.orders (stream orders)",)


def test_new_columns_that_are_nullable_or_defaulted_are_added_to_every_table() -> None:
    old = orders(mode="history")
    new = orders(
        mode="history",
        columns=(
            'note = { type = "text", nullable = true }\n'
            'channel = { type = "text", default = "it\'s \\\\ web" }\n'
        ),
    )
    made = plan([new], state_of(old))
    assert made.statements == (
        'ALTER TABLE "public"."orders" ADD COLUMN "note" text',
        'ALTER TABLE "public"."orders" ADD COLUMN "channel" text NOT NULL DEFAULT '
        "E'it''s \\\\ web'::text",
        'ALTER TABLE "public"."orders_history" ADD COLUMN "note" text',
        'ALTER TABLE "public"."orders_history" ADD COLUMN "channel" text NOT NULL DEFAULT '
        "E'it''s \\\\ web'::text",
    )
    assert made.actions == (
        "add column public.orders.note (text)",
        "add column public.orders.channel (text)",
        "add column public.orders_history.note (text)",
        "add column public.orders_history.channel (text)",
    )


def test_a_missing_index_of_the_catalog_is_created() -> None:
    old = orders()
    new = orders(extra='version = "revision"\nindexes = [{ columns = ["status"] }]')
    made = plan([new], state_of(old))
    assert made.statements == ('CREATE INDEX "orders_status" ON "public"."orders" ("status")',)


def test_what_the_tables_do_not_show_may_change() -> None:
    old = orders()
    new = orders(extra='version = "revision"\ntombstones = "delete"')
    assert plan([changed(new, topic="shop.orders.v2")], state_of(old)).empty


@pytest.mark.parametrize(
    ("column_type", "default", "literal"),
    [
        ("text", "a'b\\c", "E'a''b\\\\c'::text"),
        ("boolean", True, "true"),
        ("boolean", False, "false"),
        ("smallint", -32768, "-32768"),
        ("bigint", 2**63 - 1, "9223372036854775807"),
        ("real", 1.5, "E'1.5'::real"),
        ("double precision", math.inf, "E'Infinity'::double precision"),
        ("double precision", -math.inf, "E'-Infinity'::double precision"),
        ("double precision", math.nan, "E'nan'::double precision"),
        ("numeric", decimal.Decimal("0.10"), "E'0.10'::numeric"),
        ("uuid", uuid.UUID(int=1), "E'00000000-0000-0000-0000-000000000001'::uuid"),
        (
            "timestamptz",
            datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
            "E'2026-01-02T03:04:05+00:00'::timestamptz",
        ),
        ("date", datetime.date(2026, 1, 2), "E'2026-01-02'::date"),
        ("jsonb", msgspec.Raw(b'{"a":"it\'s"}'), "E'{\"a\":\"it''s\"}'::jsonb"),
        ("bytea", b"\x00\xff", "E'\\\\x00ff'::bytea"),
    ],
)
def test_a_default_becomes_a_constant_of_its_type(
    column_type: str, default: Any, literal: str
) -> None:
    column = Column("c", column_type, default=default)
    assert schema_plan.literal(column) == literal
    assert schema_plan.add_column("t", column) == (
        f'ALTER TABLE "public"."t" ADD COLUMN "c" {column_type} NOT NULL DEFAULT {literal}'
    )


def test_a_nul_never_reaches_a_constant() -> None:
    with pytest.raises(ValueError):
        schema_plan.literal(Column("c", "text", default="a\x00b"))


# -- refusals --------------------------------------------------------------------------------

WHERE = "stream 'orders', table public.orders"


def test_a_type_change_is_refused_naming_both_types_and_what_to_do() -> None:
    state = state_of(orders(columns='note = "text"'))
    assert refusal([orders(columns='note = "integer"')], state) == (
        f"{WHERE}, column 'note': type change, text in the database, integer in the catalog. "
        'The pipeline does not rewrite a table: change it by hand (ALTER TABLE "public"."orders" '
        'ALTER COLUMN "note" TYPE integer USING ..., which rewrites and locks the table), or '
        "declare a new column instead",
    )


@pytest.mark.parametrize(
    ("before", "after", "was", "now", "fix"),
    [
        (
            'note = "text"',
            'note = { type = "text", nullable = true }',
            "text NOT NULL",
            "text nullable",
            "DROP NOT NULL",
        ),
        (
            'note = { type = "text", nullable = true }',
            'note = "text"',
            "text nullable",
            "text NOT NULL",
            "SET NOT NULL",
        ),
    ],
)
def test_a_nullability_change_is_refused(
    before: str, after: str, was: str, now: str, fix: str
) -> None:
    assert refusal([orders(columns=after)], state_of(orders(columns=before))) == (
        f"{WHERE}, column 'note': nullability change, {was} in the database, {now} in the "
        f'catalog: change it by hand (ALTER TABLE "public"."orders" ALTER COLUMN "note" {fix}), '
        "or put the old definition back",
    )


def test_a_removed_column_and_a_new_required_one_are_refused() -> None:
    state = state_of(orders(columns='note = "text"'))
    assert refusal([orders(columns='remark = "text"')], state) == (
        f"{WHERE}, column 'remark': a new column (text NOT NULL) must be nullable or have a "
        "default, since the rows already there have no value for it: declare `nullable = "
        "true` or a `default`",
        f"{WHERE}, column 'note': removed or renamed, text NOT NULL in the database and not in "
        "the catalog: put it back in the catalog (with `nullable = true` if new records lack "
        'it), or drop or rename it by hand (ALTER TABLE "public"."orders" DROP COLUMN "note") '
        "once no agent writes it",
    )


def test_a_key_change_is_refused_even_unrecorded() -> None:
    old = orders()
    new = changed(old, key=("order_id", "status"))
    assert refusal([new], state_of(old, applied=False)) == (
        f"{WHERE}: key change, primary key (order_id) in the database, (order_id, status) in "
        "the catalog: the rows already there were deduplicated by the old key; move them to a "
        "new table by hand and give the stream that table, or put the old key back",
    )


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        pytest.param(
            {"mode": "append"},
            "mode change, 'latest' when last migrated, 'append' in the catalog: the rows "
            "already there were written under the old mode",
            id="mode",
        ),
        pytest.param(
            {"version": None},
            "version change, 'revision' when last migrated, none in the catalog",
            id="version",
        ),
        pytest.param(
            {"version": "amount"},
            "version change, 'revision' when last migrated, 'amount' in the catalog",
            id="version-other",
        ),
    ],
)
def test_what_only_the_record_shows_is_refused_when_it_changes(
    change: dict[str, Any], problem: str
) -> None:
    old = orders()
    new = changed(old, **change)
    (found,) = refusal([new], state_of(old))
    assert found.startswith(f"stream 'orders': {problem}")


def test_a_renamed_table_is_refused_not_created_anew() -> None:
    old = orders()
    new = orders(table="purchases")
    assert refusal([new], state_of(old)) == (
        "stream 'orders': table change, 'orders' when last migrated, 'purchases' in the "
        "catalog: the stream's rows are in the old table: rename it by hand (ALTER TABLE ... "
        "RENAME TO ...) before you migrate, or put the old name back",
    )


def test_a_table_named_with_its_schema_is_the_same_table() -> None:
    assert plan([orders(table="public.orders")], state_of(orders())).empty


def test_a_table_the_pipeline_did_not_make_is_refused() -> None:
    state = with_table(
        state_of(orders()), "orders", columns=(ColumnState("order_id", "uuid", True),)
    )
    assert refusal([orders()], state) == (
        f"{WHERE}: has no provenance column src_partition (integer NOT NULL), so the pipeline "
        "did not make it: rename or drop it by hand, or give the stream another table",
    )


def test_an_index_of_the_same_name_and_other_columns_is_refused() -> None:
    new = orders(
        extra='version = "revision"\nindexes = [{ name = "by_status", columns = ["status"] }]'
    )
    state = with_table(
        state_of(new), "orders", indexes=(IndexState("by_status", "brin", ("amount",)),)
    )
    assert refusal([new], state) == (
        f"{WHERE}, index 'by_status': brin (amount) in the database, btree (status) in the "
        'catalog: drop it by hand (DROP INDEX "by_status") and migrate again, or give it '
        "another name",
    )


def test_every_problem_is_listed_in_one_refusal() -> None:
    old = orders(columns='note = "text"')
    new = changed(orders(columns='note = "integer"\nremark = "text"'), mode="append", version=None)
    with pytest.raises(Refused) as caught:
        plan([new, changed(orders(table="other"), name="other")], state_of(old))
    assert [p.split(":")[0] for p in caught.value.problems] == [
        "stream 'orders'",
        "stream 'orders'",
        f"{WHERE}, column 'note'",
        f"{WHERE}, column 'remark'",
    ]
    assert str(caught.value).startswith(
        "the streams catalog asks for 4 change(s) `pipeline migrate` does not make; nothing was "
        "changed:\n  - stream 'orders': mode change"
    )


# -- the agents' check -----------------------------------------------------------------------


def test_an_agent_finds_nothing_missing_in_a_database_that_matches() -> None:
    builtin = catalog.load()
    assert missing(builtin, state_of(*builtin, applied=False)) == []


def test_an_agent_is_told_every_table_and_column_it_lacks() -> None:
    old = orders(mode="history")
    new = orders(mode="history", columns='note = { type = "text", nullable = true }')
    state = state_of(old)
    tables = dict(state.tables)
    del tables[("public", "orders_history")]
    amount = ColumnState("amount", "integer", True)
    latest = tables[("public", "orders")]
    tables[("public", "orders")] = TableState(
        tuple(amount if c.name == "amount" else c for c in latest.columns),
        latest.primary_key,
        latest.indexes,
    )
    assert missing([new], DatabaseState(tables)) == [
        "public.orders.amount is integer, the catalog says numeric",
        "no column public.orders.note",
        "no table public.orders_history",
    ]
    keyed = changed(old, key=("order_id", "status"))
    assert missing([keyed], state) == [
        "public.orders has primary key (order_id), the catalog says (order_id, status)",
        "public.orders_history has primary key (order_id, revision), the catalog says "
        "(order_id, status, revision)",
    ]


def test_an_agent_of_the_previous_catalog_runs_beside_a_nullable_or_defaulted_column() -> None:
    old = orders()
    state = state_of(old)
    latest = state.tables[("public", "orders")]
    added = (
        ColumnState("note", "text", not_null=False),
        ColumnState("channel", "text", not_null=True, has_default=True),
    )
    assert missing([old], with_table(state, "orders", columns=(*latest.columns, *added))) == []
    code = ColumnState("code", "text", not_null=True)
    blocking = with_table(state, "orders", columns=(*latest.columns, code))
    assert missing([old], blocking) == [
        "public.orders.code is NOT NULL without a default and not in the catalog"
    ]


# -- partitioned tables, and the upgrade of an unpartitioned one ----------------------------

CLICKS = """
[[streams]]
name = "clicks"
topic = "web.clicks"
table = "clicks"
mode = "append"
{key}
partition_by = "at"
{extra}

[streams.columns]
click_id = "uuid"
at = "{at}"
"""
NOW = datetime.datetime(2026, 12, 7, 16, 5, tzinfo=datetime.UTC)
CUTOVER = "'2026-12-09T00:00:00+00:00'::timestamptz"


def clicks(key: str = 'key = ["click_id"]', extra: str = "", at: str = "timestamptz") -> StreamSpec:
    _, (spec,) = catalog.parse(CLICKS.format(key=key, extra=extra, at=at), "clicks.toml")
    return spec


def unpartitioned(state: DatabaseState, *names: str, **changes: Any) -> DatabaseState:
    """``state`` with the tables ``names`` as a release before partitioning left them: plain
    tables keyed without the partition column."""
    tables = dict(state.tables)
    for name in names:
        table = tables[("public", name)]
        key = tuple(c for c in table.primary_key if c != table.partition_by)
        indexes = tuple(
            dataclasses.replace(i, columns=key, primary=True) if i.name.endswith("_pkey") else i
            for i in table.indexes
            if not i.name.endswith("_pkey") or key
        )
        tables[("public", name)] = dataclasses.replace(
            table,
            primary_key=key,
            indexes=indexes,
            partitioned=False,
            partition_by=None,
            has_default=False,
            **changes,
        )
    return DatabaseState(tables, state.schemas, state.applied)


def test_an_unpartitioned_table_is_upgraded_online_then_swapped_in_one_transaction() -> None:
    spec = clicks()
    made = plan([spec], unpartitioned(state_of(spec), "clicks"), NOW)
    assert (made.statements, len(made.upgrades)) == ((), 1)
    (upgrade,) = made.upgrades
    assert upgrade.table == "public.clicks"
    assert upgrade.online == (
        'CREATE UNIQUE INDEX CONCURRENTLY "clicks_partition_key" ON "public"."clicks" '
        '("click_id", "at")',
        'ALTER TABLE "public"."clicks" ADD CONSTRAINT "clicks_before_partitioning" CHECK '
        f'("at" < {CUTOVER}) NOT VALID',
        'ALTER TABLE "public"."clicks" VALIDATE CONSTRAINT "clicks_before_partitioning"',
    )
    assert upgrade.swap == (
        'LOCK TABLE "public"."clicks" IN ACCESS EXCLUSIVE MODE',
        'ALTER INDEX "public"."clicks_source" RENAME TO "clicks_legacy_source"',
        'ALTER TABLE "public"."clicks" RENAME TO "clicks_legacy"',
        'ALTER TABLE "public"."clicks_legacy" DROP CONSTRAINT "clicks_pkey"',
        'ALTER TABLE "public"."clicks_legacy" ADD CONSTRAINT "clicks_legacy_pkey" PRIMARY KEY '
        'USING INDEX "clicks_partition_key"',
        schema_plan.create_table(schema_plan.shapes(spec)[0]),
        'CREATE INDEX "clicks_source" ON "public"."clicks" USING brin ("src_partition", '
        '"src_offset")',
        'ALTER TABLE "public"."clicks" ATTACH PARTITION "public"."clicks_legacy" FOR VALUES '
        f"FROM (MINVALUE) TO ({CUTOVER})",
        'CREATE TABLE "public"."clicks_default" PARTITION OF "public"."clicks" DEFAULT',
        *schema_plan.grants("clicks"),
    )
    assert made.actions == (
        "build the unique index clicks_partition_key on public.clicks (click_id, at), "
        "without blocking writes",
        "check that every row of public.clicks has at before 2026-12-09T00:00:00+00:00, "
        "without blocking writes",
        "partition public.clicks by day of at: its rows before 2026-12-09T00:00:00+00:00 kept "
        "in the partition public.clicks_legacy, a DEFAULT partition for the rest",
    )
    assert made.script == (
        "-- partition public.clicks: each statement on its own",
        *(f"{s};" for s in upgrade.online),
        "-- partition public.clicks: in one transaction",
        *(f"{s};" for s in upgrade.swap),
    )


def test_a_keyless_table_needs_no_index_and_a_date_column_is_cut_at_a_date() -> None:
    spec = clicks(key="", at="date", extra='partition_interval = "month"')
    (upgrade,) = plan([spec], unpartitioned(state_of(spec), "clicks"), NOW).upgrades
    assert upgrade.online == (
        'ALTER TABLE "public"."clicks" ADD CONSTRAINT "clicks_before_partitioning" CHECK '
        "(\"at\" < '2027-02-01'::date) NOT VALID",
        'ALTER TABLE "public"."clicks" VALIDATE CONSTRAINT "clicks_before_partitioning"',
    )
    assert not any("PRIMARY KEY" in s or "pkey" in s for s in upgrade.swap)
    assert upgrade.swap[-4] == (
        'ALTER TABLE "public"."clicks" ATTACH PARTITION "public"."clicks_legacy" FOR VALUES '
        "FROM (MINVALUE) TO ('2027-02-01'::date)"
    )


@pytest.mark.parametrize(
    ("moment", "interval", "end"),
    [
        ((2026, 12, 7, 16, 5), "day", (2026, 12, 9)),
        ((2026, 12, 7, 0, 0), "day", (2026, 12, 9)),
        ((2026, 12, 7, 23, 59), "hour", (2026, 12, 8, 1)),
        ((2026, 12, 7, 16, 5), "week", (2026, 12, 21)),  # the 7th is a Monday
        ((2026, 12, 31, 16, 5), "month", (2027, 2, 1)),
    ],
)
def test_the_cutover_is_the_start_of_the_interval_after_the_next(
    moment: tuple[int, ...], interval: str, end: tuple[int, ...]
) -> None:
    utc = datetime.UTC
    found = partition_upgrade.cutover(datetime.datetime(*moment, tzinfo=utc), interval)
    assert found == datetime.datetime(*end, tzinfo=utc)


def test_an_interrupted_upgrade_goes_on_where_it_stopped() -> None:
    spec = clicks()
    fresh = unpartitioned(state_of(spec), "clicks")
    table = fresh.tables[("public", "clicks")]
    key_index = IndexState("clicks_partition_key", "btree", ("click_id", "at"), valid=False)
    check = schema_plan.CheckState(
        "clicks_before_partitioning",
        ("at",),
        "CHECK ((at < '2026-12-09 00:00:00+00'::timestamp with time zone)) NOT VALID",
        validated=False,
    )

    def online(**changes: Any) -> tuple[str, ...]:
        state = with_table(fresh, "clicks", **changes)
        (upgrade,) = plan([spec], state, NOW).upgrades
        return upgrade.online

    build = (
        'CREATE UNIQUE INDEX CONCURRENTLY "clicks_partition_key" ON "public"."clicks" '
        '("click_id", "at")'
    )
    add = (
        'ALTER TABLE "public"."clicks" ADD CONSTRAINT "clicks_before_partitioning" CHECK '
        f'("at" < {CUTOVER}) NOT VALID'
    )
    validate = 'ALTER TABLE "public"."clicks" VALIDATE CONSTRAINT "clicks_before_partitioning"'
    # Interrupted while building the index: it is left invalid, dropped and built again.
    assert online(indexes=(*table.indexes, key_index)) == (
        'DROP INDEX CONCURRENTLY IF EXISTS "public"."clicks_partition_key"',
        build,
        add,
        validate,
    )
    valid = dataclasses.replace(key_index, valid=True)
    # Interrupted before the check was validated.
    assert online(indexes=(*table.indexes, valid), checks=(check,)) == (validate,)
    done = dataclasses.replace(check, validated=True)
    # Interrupted before the swap: only the swap is left.
    assert online(indexes=(*table.indexes, valid), checks=(done,)) == ()
    # A check of another day (migrate run again days later) is made again for today's.
    stale = dataclasses.replace(done, definition=done.definition.replace("-09", "-01"))
    assert online(indexes=(*table.indexes, valid), checks=(stale,)) == (
        'ALTER TABLE "public"."clicks" DROP CONSTRAINT "clicks_before_partitioning"',
        add,
        validate,
    )


def test_the_builtin_tables_of_a_database_before_partitioning_are_upgraded() -> None:
    builtin = catalog.load()
    partitioned = [s.qualified[1] for spec in builtin for s in schema_plan.shapes(spec)]
    partitioned = [n for n in partitioned if n not in ("agent_states", "system_config")]
    # The history tables' version CHECK is named as PostgreSQL named it: the parent's must
    # have the same name for the old table to be attached.
    state = unpartitioned(state_of(*builtin, applied=False), *partitioned)
    for name in ("agent_state_history", "system_config_history"):
        check = schema_plan.CheckState(f"{name}_version_chk", ("version",), "CHECK (...)")
        state = with_table(state, name, checks=(check,))
    made = plan(builtin, state, NOW)
    assert made.statements == ()
    assert [u.table for u in made.upgrades] == [f"public.{n}" for n in partitioned]
    history = made.upgrades[0]
    assert history.online[0] == (
        'CREATE UNIQUE INDEX CONCURRENTLY "agent_state_history_partition_key" ON '
        '"public"."agent_state_history" ("agent_id", "version", "ts")'
    )
    assert '"version" bigint NOT NULL CONSTRAINT "agent_state_history_version_chk" CHECK' in (
        next(s for s in history.swap if s.startswith("CREATE TABLE"))
    )
    metrics = made.upgrades[[u.table for u in made.upgrades].index("public.performance_metrics")]
    assert not any("partition_key" in s for s in metrics.online)
    renamed = [s for s in metrics.swap if s.startswith("ALTER INDEX")]
    assert renamed == [
        'ALTER INDEX "public"."performance_metrics_source" RENAME TO '
        '"performance_metrics_legacy_source"',
        'ALTER INDEX "public"."performance_metrics_ts" RENAME TO "performance_metrics_legacy_ts"',
    ]
    # Once upgraded, nothing is left to do.
    assert plan(builtin, state_of(*builtin), NOW).empty


def test_an_index_the_same_plan_adds_to_the_old_table_is_renamed_with_the_others() -> None:
    old = clicks()
    new = clicks(extra='[[streams.indexes]]\nname = "clicks_at"\ncolumns = ["at"]')
    made = plan([new], unpartitioned(state_of(old), "clicks"), NOW)
    assert made.statements == ('CREATE INDEX "clicks_at" ON "public"."clicks" ("at")',)
    (upgrade,) = made.upgrades
    assert 'ALTER INDEX "public"."clicks_at" RENAME TO "clicks_legacy_at"' in upgrade.swap
    assert 'CREATE INDEX "clicks_at" ON "public"."clicks" ("at")' in upgrade.swap


def test_a_partitioned_table_without_its_default_partition_gets_one() -> None:
    spec = clicks()
    state = with_table(state_of(spec), "clicks", has_default=False)
    made = plan([spec], state, NOW)
    assert made.statements == (
        'CREATE TABLE "public"."clicks_default" PARTITION OF "public"."clicks" DEFAULT',
    )
    assert made.actions == ("create the DEFAULT partition of public.clicks",)


def test_how_a_partitioned_table_is_partitioned_is_refused_to_change() -> None:
    spec = clicks()
    where = "stream 'clicks', table public.clicks"
    other = with_table(state_of(spec, applied=False), "clicks", partition_by="click_id")
    assert refusal([spec], other) == (
        f"{where}: partitioned by range of click_id in the database, of at in the catalog. "
        "The pipeline does not repartition a table: put the old partition_by back, or copy "
        "the rows into a new table partitioned by hand and give the stream that table",
    )
    plain = clicks().__dict__ | {"partitioning": None}
    assert refusal([StreamSpec(**plain)], state_of(spec, applied=False)) == (
        f"{where}: partitioned by range of at in the database, not partitioned in the "
        "catalog. The pipeline does not merge partitions: put partition_by back, or copy the "
        "rows into a new unpartitioned table by hand and give the stream that table",
    )
    assert refusal([clicks(extra='partition_interval = "hour"')], state_of(spec)) == (
        "stream 'clicks': partition_interval change, 'day' when last migrated, 'hour' in the "
        "catalog: the partitions there cover the old interval's ranges; put it back, or copy "
        "the rows into a new table partitioned as you want by hand and give the stream that "
        "table",
    )


def test_retention_and_partitions_ahead_change_freely_and_partitioning_may_be_added() -> None:
    spec = clicks()
    assert plan([clicks(extra='retention = "30d"\npartitions_ahead = 7')], state_of(spec)).empty
    plain = StreamSpec(**(spec.__dict__ | {"partitioning": None}))
    unpartitioned_before = unpartitioned(state_of(spec), "clicks")
    recorded = DatabaseState(
        unpartitioned_before.tables, unpartitioned_before.schemas, {"clicks": plain.declaration()}
    )
    assert len(plan([spec], recorded, NOW).upgrades) == 1


def test_a_recorded_check_bound_is_read_back() -> None:
    bound = partition_upgrade.check_bound
    utc = datetime.UTC
    assert bound("CHECK ((ts < '2026-12-09 00:00:00+00'::timestamp with time zone))") == (
        datetime.datetime(2026, 12, 9, tzinfo=utc)
    )
    assert bound("CHECK ((ts < '2026-12-09 01:00:00+01'::timestamp with time zone))") == (
        datetime.datetime(2026, 12, 9, tzinfo=utc)
    )
    assert bound("CHECK ((d < '2026-12-09'::date))") == datetime.datetime(2026, 12, 9, tzinfo=utc)
    assert bound("CHECK ((d < now()))") is None


def test_an_agent_writes_a_table_not_yet_partitioned_and_one_partitioned() -> None:
    spec = clicks()
    assert missing([spec], unpartitioned(state_of(spec), "clicks")) == []
    assert missing([spec], state_of(spec)) == []
    # Partitioned, the table must have the key with the partition column.
    wrong = with_table(state_of(spec), "clicks", primary_key=("click_id",))
    assert missing([spec], wrong) == [
        "public.clicks has primary key (click_id), the catalog says (click_id, at)"
    ]
