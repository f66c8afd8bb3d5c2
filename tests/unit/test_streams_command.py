"""`pipeline streams list` and `check`: they read the catalog file alone, with no server
(docs/streams.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import catalog, cli

ORDERS = """builtin = false

[[streams]]
name = "orders"
topic = "shop.orders"
table = "shop.orders"
mode = "history"
key = ["order_id"]
version = "revision"
tombstones = "delete"

[streams.columns]
order_id = "uuid"
revision = "bigint"
customer = { type = "text", path = "customer.id" }
shipped_at = { type = "timestamptz", unit = "ms", nullable = true }
status = { type = "text", default = "new" }
region = { type = "text", source = "key" }
"""


@pytest.fixture(autouse=True)
def no_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS", catalog.STREAMS_FILE_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PIPELINE_DEV_HOME", "/nonexistent")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_list_shows_each_stream_and_its_columns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "orders.toml"
    path.write_text(ORDERS)
    assert run(capsys, "streams", "list", str(path)) == (
        0,
        f"orders: topic shop.orders, table shop.orders + shop.orders_history, history, key "
        f"(order_id), version revision, tombstones delete, {path}\n"
        "    order_id uuid\n"
        "    revision bigint\n"
        "    customer text, from customer.id\n"
        "    shipped_at timestamptz, nullable, unit ms\n"
        '    status text, default "new"\n'
        "    region text, from key\n",
        "",
    )


def test_list_reads_the_file_the_environment_names_after_the_builtin_streams(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "orders.toml"
    path.write_text(ORDERS.replace("builtin = false", ""))
    monkeypatch.setenv(catalog.STREAMS_FILE_ENV, str(path))
    status, out, _ = run(capsys, "streams", "list", "--json")
    assert status == 0
    found = json.loads(out)
    assert [(s["name"], s["builtin"], s["origin"]) for s in found] == [
        *((name, True, "built-in") for name in catalog.load().names),
        ("orders", False, str(path)),
    ]
    assert found[-1] == {**catalog.load(path)["orders"].declaration(), "builtin": False}


def test_check_of_a_good_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "orders.toml"
    path.write_text(ORDERS)
    assert run(capsys, "streams", "check", str(path)) == (
        0,
        f"{path}: 1 stream(s) valid: orders\n",
        "",
    )


def test_check_of_a_bad_file_exits_2_with_every_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "orders.toml"
    path.write_text(
        ORDERS.replace('"uuid"', '"guid"').replace('version = "revision"', 'version = "rev"')
    )
    where = f"{path}: stream 'orders' (streams[0])"
    assert run(capsys, "streams", "check", str(path)) == (
        2,
        "",
        f"pipeline: error: {where}: columns.order_id: unknown type 'guid'; choose from "
        f"{', '.join(catalog.TYPES)}\n"
        f"{where}: version: 'rev' is not a column of the stream\n",
    )


def test_check_without_a_file_checks_the_builtin_streams(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run(capsys, "streams", "check") == (
        0,
        "the built-in streams (no file given, PIPELINE_STREAMS_FILE is not set): 5 stream(s) "
        "valid: states, events, metrics, analytics, config\n",
        "",
    )
