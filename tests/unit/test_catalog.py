"""The streams catalog's reading (pipeline/catalog.py): every error names its place, the
file, the stream (by name and position) and the key, and a file's every error is reported at
once (docs/streams.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import catalog
from pipeline.catalog import CatalogError

WHERE = "f.toml: stream 'orders' (streams[0])"
COLUMNS = 'order_id = "uuid"\nrevision = "bigint"\nnote = { type = "text", nullable = true }\n'


def stream(
    extra: str = "", columns: str = COLUMNS, name: str = "orders", table: str = "orders"
) -> str:
    return (
        f'[[streams]]\nname = "{name}"\ntopic = "shop.{name}"\ntable = "{table}"\n{extra}\n'
        f"[streams.columns]\n{columns}"
    )


def error_of(text: str, origin: str = "f.toml") -> str:
    with pytest.raises(CatalogError) as caught:
        _, streams = catalog.parse(text, origin)
        catalog.validate(streams)
    return str(caught.value)


def test_a_valid_stream_reads_as_declared() -> None:
    builtin, (spec,) = catalog.parse(
        "builtin = false\n" + stream('mode = "latest"\nkey = ["order_id"]\nversion = "revision"'),
        "f.toml",
    )
    assert builtin is False
    assert (spec.name, spec.topic, spec.table, spec.mode, spec.key, spec.version) == (
        "orders",
        "shop.orders",
        "orders",
        "latest",
        ("order_id",),
        "revision",
    )
    assert spec.column_names == ("order_id", "revision", "note")
    assert spec.origin == "f.toml"


# -- the file --------------------------------------------------------------------------------


def test_bad_toml_names_the_file_and_the_line() -> None:
    message = error_of("[[streams]\n")
    assert message.startswith("f.toml: not valid TOML: ")
    assert message.endswith("(at line 1, column 10)")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "bulitin = false\n", "f.toml: Object contains unknown field `bulitin`", id="file-key"
        ),
        pytest.param(
            'builtin = "no"\n', "f.toml: builtin: Expected `bool`, got `str`", id="builtin-type"
        ),
        pytest.param("streams = 3\n", "f.toml: streams: Expected `array`, got `int`", id="streams"),
        pytest.param(
            stream("colour = 1"),
            f"{WHERE}: Object contains unknown field `colour`",
            id="stream-key",
        ),
        pytest.param(
            stream().replace('name = "orders"\n', ""),
            "f.toml: streams[0]: Object missing required field `name`",
            id="no-name",
        ),
        pytest.param(
            stream('mode = "upsert"'), f"{WHERE}: mode: Invalid enum value 'upsert'", id="mode"
        ),
        pytest.param(
            stream('key = "order_id"'),
            f"{WHERE}: key: Expected `array`, got `str`",
            id="key-type",
        ),
        pytest.param(
            stream('mode = "latest"\nkey = ["order_id"]\ntombstones = "drop"'),
            f"{WHERE}: tombstones: Invalid enum value 'drop'",
            id="tombstones",
        ),
        pytest.param(
            stream('indexes = [{ columns = ["note"], using = "hash" }]'),
            f"{WHERE}: indexes[0].using: Invalid enum value 'hash'",
            id="index-method",
        ),
        pytest.param(
            stream('indexes = [{ columns = ["note"], unique = true }]'),
            f"{WHERE}: indexes[0]: Object contains unknown field `unique`",
            id="index-key",
        ),
        pytest.param(
            stream(columns='amount = { type = "numeric", kind = 1 }\n'),
            f"{WHERE}: columns.amount: Object contains unknown field `kind`",
            id="column-key",
        ),
        pytest.param(
            stream(columns="amount = 3\n"),
            f"{WHERE}: columns.amount: Expected `str | object`, got `int`",
            id="column-type",
        ),
        pytest.param(
            stream(columns='amount = { type = "numeric", nullable = "yes" }\n'),
            f"{WHERE}: columns.amount: nullable: Expected `bool`, got `str`",
            id="column-value",
        ),
    ],
)
def test_a_malformed_file_names_its_place(text: str, message: str) -> None:
    assert error_of(text) == message


def test_a_missing_file_is_named() -> None:
    with pytest.raises(CatalogError) as caught:
        catalog.load("/nonexistent/streams.toml")
    assert str(caught.value) == (
        "PIPELINE_STREAMS_FILE: cannot read /nonexistent/streams.toml: No such file or directory"
    )


def test_a_file_that_is_not_text_is_named(tmp_path: Path) -> None:
    path = tmp_path / "streams.toml"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(CatalogError, match=f"^PIPELINE_STREAMS_FILE: cannot read {path}: "):
        catalog.load(path)


# -- each stream's rules ---------------------------------------------------------------------

LATEST = 'mode = "latest"\nkey = ["order_id"]\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            stream(name="Orders"),
            "f.toml: stream 'Orders' (streams[0]): name: 'Orders' must match [a-z][a-z0-9_]* "
            "and be at most 48 characters",
            id="name-pattern",
        ),
        pytest.param(
            stream(name="o" * 49).replace(f"shop.{'o' * 49}", "shop.o"),
            f"f.toml: stream '{'o' * 49}' (streams[0]): name: '{'o' * 49}' must match "
            "[a-z][a-z0-9_]* and be at most 48 characters",
            id="name-length",
        ),
        pytest.param(
            stream().replace('"shop.orders"', '"shop/orders"'),
            f"{WHERE}: topic: 'shop/orders' is not a Kafka topic name ([A-Za-z0-9._-], at most "
            "200)",
            id="topic",
        ),
        pytest.param(
            stream(table="Orders"),
            f"{WHERE}: table: 'Orders' must be a name or schema.name, each matching "
            "[a-z_][a-z0-9_]*",
            id="table-pattern",
        ),
        pytest.param(
            stream(table="a.b.c"),
            f"{WHERE}: table: 'a.b.c' must be a name or schema.name, each matching "
            "[a-z_][a-z0-9_]*",
            id="table-parts",
        ),
        pytest.param(
            stream().replace('table = "orders"', "table = 'x\"; drop table y; --'"),
            f"{WHERE}: table: 'x\"; drop table y; --' must be a name or schema.name, each "
            "matching [a-z_][a-z0-9_]*",
            id="table-injection",
        ),
        pytest.param(
            stream(table="t" * 56),
            f"{WHERE}: table: '{'t' * 56}': a name is at most 55 characters here",
            id="table-length",
        ),
        pytest.param(
            stream(table="shop.dead_letters"),
            f"{WHERE}: table: 'shop.dead_letters' is one of the pipeline's own tables "
            f"({', '.join(catalog.RESERVED_TABLES)})",
            id="table-reserved",
        ),
        pytest.param(
            stream(table="pg_catalog.orders"),
            f"{WHERE}: table: 'pg_catalog.orders' is in a system schema",
            id="table-system-schema",
        ),
        pytest.param(
            stream(columns=""),
            f"{WHERE}: columns: a stream needs at least one column",
            id="no-columns",
        ),
        pytest.param(
            stream('version = "revision"'),
            f'{WHERE}: version: only a "latest" or "history" stream has a version',
            id="append-version",
        ),
        pytest.param(
            stream('tombstones = "delete"'),
            f'{WHERE}: tombstones: only a "latest" or "history" stream deletes on tombstones\n'
            f'{WHERE}: tombstones: "delete" needs a single-column key: a tombstone names its '
            "row by its Kafka key alone, and the key is []",
            id="append-tombstones",
        ),
        pytest.param(
            stream('history_table = "h"'),
            f'{WHERE}: history_table: only a "history" stream has a history table',
            id="append-history-table",
        ),
        pytest.param(
            stream(LATEST + 'history_table = "h"'),
            f'{WHERE}: history_table: only a "history" stream has a history table',
            id="latest-history-table",
        ),
        pytest.param(
            stream('mode = "latest"'),
            f"{WHERE}: key: a 'latest' stream needs a key: the columns that name its row",
            id="latest-without-key",
        ),
        pytest.param(
            stream('mode = "history"'),
            f"{WHERE}: key: a 'history' stream needs a key: the columns that name its row",
            id="history-without-key",
        ),
        pytest.param(
            stream('key = ["order_id", "order_id"]'),
            f"{WHERE}: key: ['order_id', 'order_id'] names a column twice",
            id="key-twice",
        ),
        pytest.param(
            stream('key = ["id"]'),
            f"{WHERE}: key: 'id' is not a column of the stream",
            id="key-unknown",
        ),
        pytest.param(
            stream('key = ["note"]'),
            f"{WHERE}: key: 'note' is nullable; a key column must always have a value",
            id="key-nullable",
        ),
        pytest.param(
            stream('key = ["doc"]', columns=COLUMNS + 'doc = "jsonb"\n'),
            f"{WHERE}: key: 'doc' is jsonb; a key column is a scalar",
            id="key-jsonb",
        ),
        pytest.param(
            stream(LATEST + 'version = "rev"'),
            f"{WHERE}: version: 'rev' is not a column of the stream",
            id="version-unknown",
        ),
        pytest.param(
            stream(LATEST + 'version = "note"'),
            f"{WHERE}: version: 'note' is text; a version is one of smallint, integer, bigint, "
            "timestamptz",
            id="version-type",
        ),
        pytest.param(
            stream(
                LATEST + 'version = "rev"',
                columns=COLUMNS + 'rev = { type = "bigint", nullable = true }\n',
            ),
            f"{WHERE}: version: 'rev' is nullable; a version must always have a value",
            id="version-nullable",
        ),
        pytest.param(
            stream('mode = "latest"\nkey = ["order_id", "revision"]\nversion = "revision"'),
            f"{WHERE}: version: 'revision' is also in the key",
            id="version-in-key",
        ),
        pytest.param(
            stream('mode = "latest"\nkey = ["order_id", "revision"]\ntombstones = "delete"'),
            f'{WHERE}: tombstones: "delete" needs a single-column key: a tombstone names its '
            "row by its Kafka key alone, and the key is ['order_id', 'revision']",
            id="tombstones-composite-key",
        ),
        pytest.param(
            stream('mode = "history"\nkey = ["order_id"]\nhistory_table = "Bad"'),
            f"{WHERE}: history_table: 'Bad' must be a name or schema.name, each matching "
            "[a-z_][a-z0-9_]*",
            id="history-table-pattern",
        ),
        pytest.param(
            stream('mode = "history"\nkey = ["order_id"]\nhistory_table = "public.orders"'),
            f"{WHERE}: history_table: 'public.orders' is the stream's table too",
            id="history-table-is-the-table",
        ),
        pytest.param(
            stream('indexes = [{ columns = ["nope"] }]'),
            f"{WHERE}: indexes[0]: columns ['nope'] must be columns of the stream",
            id="index-columns",
        ),
        pytest.param(
            stream("indexes = [{ columns = [] }]"),
            f"{WHERE}: indexes[0]: columns [] must be columns of the stream",
            id="index-no-columns",
        ),
        pytest.param(
            stream('indexes = [{ name = "Bad", columns = ["note"] }]'),
            f"{WHERE}: indexes[0].name: 'Bad' must match [a-z_][a-z0-9_]* and be at most 63 "
            "characters",
            id="index-name-pattern",
        ),
        pytest.param(
            stream(f'indexes = [{{ name = "{"i" * 64}", columns = ["note"] }}]'),
            f"{WHERE}: indexes[0].name: '{'i' * 64}' must match [a-z_][a-z0-9_]* and be at most "
            "63 characters",
            id="index-name-length",
        ),
        pytest.param(
            stream('indexes = [{ name = "orders_source", columns = ["note"] }]'),
            f"{WHERE}: indexes[0].name: 'orders_source' is the name of another index of the "
            "stream's tables",
            id="index-name-source",
        ),
        pytest.param(
            stream('indexes = [{ columns = ["note"] }, { columns = ["note"], using = "brin" }]'),
            f"{WHERE}: indexes[1].name: 'orders_note' is the name of another index of the "
            "stream's tables",
            id="index-name-twice",
        ),
    ],
)
def test_each_stream_rule_names_the_stream_and_the_key(text: str, message: str) -> None:
    assert error_of(text) == message


# -- each column's rules ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("column", "message"),
    [
        pytest.param('Amount = "numeric"', "Amount: the name must match", id="name"),
        pytest.param(
            'src_offset = "bigint"', "src_offset: 'src_offset' is a provenance", id="reserved"
        ),
        pytest.param(
            'amount = "money"', "amount: unknown type 'money'; choose from text, ", id="type"
        ),
        pytest.param(
            'amount = { type = "text", source = "body" }',
            "amount: source 'body' must be value, key, timestamp or header:NAME",
            id="source",
        ),
        pytest.param(
            'amount = { type = "text", source = "header:" }',
            "amount: source 'header:' must be value, key, timestamp or header:NAME",
            id="header-without-name",
        ),
        pytest.param(
            'amount = { type = "text", source = "key", path = "a.b" }',
            "amount: path is for a field of the value, not of source 'key'",
            id="path-not-value",
        ),
        pytest.param(
            'amount = { type = "text", path = "a..b" }',
            "amount: path 'a..b' must be field names joined by dots",
            id="path-empty-part",
        ),
        pytest.param(
            'amount = { type = "bigint", unit = "ms" }',
            "amount: unit 'ms' is for a timestamptz given as an epoch number: one of s, ms, us, ns",
            id="unit-type",
        ),
        pytest.param(
            'amount = { type = "timestamptz", unit = "h" }',
            "amount: unit 'h' is for a timestamptz given as an epoch number",
            id="unit-value",
        ),
        pytest.param(
            'amount = { type = "text", source = "timestamp" }',
            'amount: source "timestamp" (the Kafka record\'s time) fills a timestamptz or '
            "bigint, not text",
            id="timestamp-type",
        ),
        pytest.param(
            'amount = { type = "text", object = true }',
            "amount: object = true is for a jsonb column",
            id="object-type",
        ),
        pytest.param(
            'amount = { type = "smallint", default = 40000 }',
            "amount: default 40000 is not a smallint: Expected `int` <= 32767",
            id="default-range",
        ),
        pytest.param(
            'amount = { type = "uuid", default = "nope" }',
            "amount: default 'nope' is not a uuid: Invalid UUID",
            id="default-uuid",
        ),
        pytest.param(
            'amount = { type = "jsonb", object = true, default = [] }',
            "amount: default [] is not a jsonb: Expected `object`",
            id="default-object",
        ),
    ],
)
def test_each_column_rule_names_the_stream_and_the_column(column: str, message: str) -> None:
    text = error_of(stream(columns=column + "\n"))
    name = column.split(" ", 1)[0]
    assert text.startswith(f"{WHERE}: columns.{name}: ")
    assert message in text


def test_every_error_of_a_file_is_reported_at_once() -> None:
    text = stream(name="Orders", columns='amount = "money"\n') + stream(
        'mode = "latest"', name="refunds", table="refunds"
    )
    assert error_of(text).splitlines() == [
        "f.toml: stream 'Orders' (streams[0]): name: 'Orders' must match [a-z][a-z0-9_]* and "
        "be at most 48 characters",
        "f.toml: stream 'Orders' (streams[0]): columns.amount: unknown type 'money'; choose "
        f"from {', '.join(catalog.TYPES)}",
        "f.toml: stream 'refunds' (streams[1]): key: a 'latest' stream needs a key: the "
        "columns that name its row",
    ]


# -- across streams --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("second", "what"),
    [
        pytest.param(
            stream(table="other").replace("shop.orders", "shop.other"), "name 'orders'", id="name"
        ),
        pytest.param(
            stream(name="refunds", table="refunds").replace("shop.refunds", "shop.orders"),
            "topic 'shop.orders'",
            id="topic",
        ),
        pytest.param(stream(name="refunds", table="public.orders"), "table 'orders'", id="table"),
        pytest.param(
            stream(
                'indexes = [{ name = "by_note", columns = ["note"] }]',
                name="refunds",
                table="refunds",
            ),
            "index 'by_note'",
            id="index",
        ),
    ],
)
def test_two_streams_may_not_share_a_name_topic_table_or_index(second: str, what: str) -> None:
    first = stream('indexes = [{ name = "by_note", columns = ["note"] }]')
    name = "orders" if what.startswith("name") else "refunds"
    assert error_of(first + second) == (
        f"f.toml: stream {name!r}: {what} is also stream 'orders''s (f.toml)"
    )


def test_a_file_stream_may_not_take_a_builtin_streams_table(tmp_path: Path) -> None:
    path = tmp_path / "streams.toml"
    path.write_text(stream(table="system_events"))
    with pytest.raises(CatalogError) as caught:
        catalog.load(path)
    assert str(caught.value) == (
        f"{path}: stream 'orders': table 'system_events' is also stream 'events''s (built-in)"
    )


def test_the_same_index_name_in_two_schemas_is_fine() -> None:
    index = 'indexes = [{ name = "by_note", columns = ["note"] }]'
    _, streams = catalog.parse(
        stream(index, table="a.orders") + stream(index, name="refunds", table="b.refunds"),
        "f.toml",
    )
    assert [s.indexes[0].name for s in catalog.validate(streams)] == ["by_note", "by_note"]


def test_a_derived_index_name_stays_within_63_bytes_without_colliding() -> None:
    long = "c" * 60
    text = stream(
        f'indexes = [{{ columns = ["{long}1"] }}, {{ columns = ["{long}2"] }}]',
        columns=f'{long}1 = "text"\n{long}2 = "text"\n',
    )
    _, (spec,) = catalog.parse(text, "f.toml")
    names = [i.name for i in spec.indexes]
    assert len(set(names)) == 2
    assert all(len(n.encode()) <= 63 for n in names)
