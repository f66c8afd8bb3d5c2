"""The log model the catalog integration tests judge the tables with
(tests/integration/catalog_model.py): each mode's rule on small logs written out by hand."""

from __future__ import annotations

import pytest

from pipeline import catalog
from pipeline.catalog import StreamSpec
from tests.integration.catalog_model import Produced, expected_tables, landed

CATALOG = """
[[streams]]
name = "orders"
topic = "orders"
table = "orders"
key = ["id"]
[streams.columns]
id = "text"
amount = "integer"

[[streams]]
name = "ticks"
topic = "ticks"
table = "ticks"
[streams.columns]
id = "text"
amount = "integer"

[[streams]]
name = "accounts"
topic = "accounts"
table = "accounts"
mode = "latest"
key = ["id"]
version = "rev"
tombstones = "delete"
[streams.columns]
id = "text"
rev = "bigint"

[[streams]]
name = "places"
topic = "places"
table = "places"
mode = "latest"
key = ["id"]
tombstones = "delete"
[streams.columns]
id = "text"
rev = "bigint"

[[streams]]
name = "moves"
topic = "moves"
table = "shop.moves"
mode = "history"
key = ["id"]
version = "rev"
[streams.columns]
id = "text"
rev = "bigint"

[[streams]]
name = "notes"
topic = "notes"
table = "notes"
mode = "history"
key = ["id"]
[streams.columns]
id = "text"
rev = "bigint"
"""


def _spec(name: str) -> StreamSpec:
    _, streams = catalog.parse(CATALOG, "test.toml")
    return next(s for s in streams if s.name == name)


def _log(stream: str, *entries: object, partition: int = 0) -> list[Produced]:
    """Records at offsets 0, 1, ... of one partition: a row tuple, ("tomb", key) for a
    tombstone, or ("poison", row)."""
    out = []
    for offset, entry in enumerate(entries):
        match entry:
            case ("tomb", key):
                out.append(Produced(stream, partition, offset, None, tombstone_key=key))
            case ("poison", row):
                out.append(Produced(stream, partition, offset, row, poison="amount"))  # type: ignore[arg-type]
            case row:
                out.append(Produced(stream, partition, offset, row))  # type: ignore[arg-type]
    return out


def test_append_without_a_key_holds_every_good_record() -> None:
    log = _log("ticks", ("a", 1), ("a", 1), ("poison", ("b", 2)), ("b", 3))
    assert expected_tables(_spec("ticks"), log) == {
        "ticks": {(0, 0): ("a", 1), (0, 1): ("a", 1), (0, 3): ("b", 3)}
    }


def test_append_with_a_key_holds_the_first_record_of_each_key() -> None:
    log = _log("orders", ("a", 1), ("b", 2), ("a", 9), ("poison", ("c", 0)), ("c", 4))
    tables = expected_tables(_spec("orders"), log)
    assert tables == {"orders": {(0, 0): ("a", 1), (0, 1): ("b", 2), (0, 4): ("c", 4)}}
    assert landed(tables) == {"orders": {(0, 0), (0, 1), (0, 4)}}


def test_latest_with_a_version_keeps_the_highest_and_the_first_of_equals() -> None:
    log = _log("accounts", ("a", 3), ("a", 1), ("a", 3), ("b", 1), ("b", 2))
    assert expected_tables(_spec("accounts"), log) == {
        "accounts": {(0, 0): ("a", 3), (0, 4): ("b", 2)}
    }


def test_a_tombstone_deletes_and_a_later_lower_version_comes_back() -> None:
    log = _log(
        "accounts", ("a", 5), ("b", 1), ("tomb", "a"), ("a", 2), ("tomb", "b"), ("tomb", "z")
    )
    assert expected_tables(_spec("accounts"), log) == {"accounts": {(0, 3): ("a", 2)}}


def test_latest_without_a_version_keeps_the_later_offset() -> None:
    log = _log("places", ("a", 5), ("a", 1), ("b", 7), ("tomb", "b"))
    assert expected_tables(_spec("places"), log) == {"places": {(0, 1): ("a", 1)}}


def test_history_with_a_version_keeps_every_version_once_and_the_latest() -> None:
    log = _log("moves", ("a", 2), ("a", 1), ("a", 2), ("a", 3), ("b", 0))
    assert expected_tables(_spec("moves"), log) == {
        "shop.moves": {(0, 3): ("a", 3), (0, 4): ("b", 0)},
        "shop.moves_history": {
            (0, 0): ("a", 2),
            (0, 1): ("a", 1),
            (0, 3): ("a", 3),
            (0, 4): ("b", 0),
        },
    }


def test_history_without_a_version_keeps_every_record() -> None:
    log = _log("notes", ("a", 2), ("a", 1), ("a", 2))
    assert expected_tables(_spec("notes"), log) == {
        "notes": {(0, 2): ("a", 2)},
        "notes_history": {(0, 0): ("a", 2), (0, 1): ("a", 1), (0, 2): ("a", 2)},
    }


def test_the_log_order_is_by_partition_and_offset_whatever_the_input_order() -> None:
    log = _log("accounts", ("a", 1), ("a", 1), partition=1) + _log("accounts", ("b", 1))
    assert expected_tables(_spec("accounts"), reversed(log)) == {
        "accounts": {(1, 0): ("a", 1), (0, 0): ("b", 1)}
    }


def test_other_streams_records_are_not_counted() -> None:
    log = _log("ticks", ("a", 1)) + _log("orders", ("a", 1), partition=2)
    assert expected_tables(_spec("orders"), log) == {"orders": {(2, 0): ("a", 1)}}


def test_a_key_in_two_partitions_is_refused() -> None:
    log = _log("accounts", ("a", 1)) + _log("accounts", ("a", 2), partition=1)
    with pytest.raises(ValueError, match=r"key \('a',\) is in partitions 0 and 1"):
        expected_tables(_spec("accounts"), log)


def test_a_good_tombstone_on_a_stream_that_ignores_them_is_refused() -> None:
    with pytest.raises(ValueError, match="must be produced as poison"):
        expected_tables(_spec("notes"), _log("notes", ("a", 1), ("tomb", "a")))
