"""The exactly-once oracle can fail: a record written twice, in any table of any stream, is
caught by the source (partition, offset) its rows share, whatever keys the table has.

The agent ingests a few hundred records and the oracle passes; then each test writes one row
by hand (a copy of a stored row: the same record again, or the same record under another key)
and the oracle must raise, naming the table and the source offset.
"""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import pytest

from pipeline import catalog as catalogs
from pipeline import sql_names
from tests.conftest import Servers
from tests.integration.harness import (
    assert_caught_up_exactly_once,
    assert_exactly_once,
    create_topics,
    fleet_traffic,
    produce,
    running_agent,
)

pytestmark = pytest.mark.timeout(300)


def _another_key(value: Any) -> Any:
    """A key value of the same type that no record has."""
    return uuid.uuid4() if isinstance(value, uuid.UUID) else f"{value}-again"


async def _write_twice(
    conn: asyncpg.Connection, table: str, key: tuple[str, ...]
) -> dict[str, Any]:
    """Copy one row of ``table``: under another value of the ``key`` columns (the same record
    under two keys), or as it is when the table has no key. Returns the copy."""
    quoted = sql_names.table(table)
    row = dict(
        await conn.fetchrow(f"SELECT * FROM {quoted} ORDER BY src_partition, src_offset LIMIT 1")
    )
    for column in key:
        row[column] = _another_key(row[column])
    names = list(row)
    await conn.execute(
        f"INSERT INTO {quoted} ({sql_names.columns(names)}) "
        f"VALUES ({', '.join(f'${i}' for i in range(1, len(names) + 1))})",
        *row.values(),
    )
    return row


async def _undo(
    conn: asyncpg.Connection, table: str, key: tuple[str, ...], copy: dict[str, Any]
) -> None:
    """Delete the copy (by its new key; without a key, either of the two equal rows)."""
    where = ("src_partition", "src_offset", *key)
    quoted = sql_names.table(table)
    condition = " AND ".join(f"{sql_names.ident(c)} = ${i}" for i, c in enumerate(where, 1))
    deleted = await conn.execute(
        f"DELETE FROM {quoted} WHERE ctid IN (SELECT ctid FROM {quoted} WHERE {condition} LIMIT 1)",
        *(copy[c] for c in where),
    )
    assert deleted == "DELETE 1", deleted


async def test_the_oracle_catches_a_record_written_twice_in_every_builtin_table(
    servers: Servers, database_url: str, unique: str
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=3)
    sent = await produce(bootstrap, prefix, fleet_traffic(600, seed=11))
    async with running_agent(bootstrap, database_url, prefix):
        ends = await assert_caught_up_exactly_once(
            database_url, bootstrap, prefix, sent, within=120
        )

    catalog = catalogs.load()
    tables = [(t, spec.key) for spec in catalog for t in spec.table_names]
    assert len(tables) == 7  # every built-in table, the two "latest" ones included
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        for table, key in tables:
            copy = await _write_twice(conn, table, key)
            with pytest.raises(AssertionError) as caught:
                await assert_exactly_once(database_url, prefix, prefix, sent, ends)
            message = str(caught.value)
            assert message.startswith(f"{table}: rows ingested more than once: "), message
            where = f"partition {copy['src_partition']} offset {copy['src_offset']} (2 rows)"
            assert where in message, message
            await _undo(conn, table, key, copy)
        # Every copy undone: the oracle passes again.
        await assert_exactly_once(database_url, prefix, prefix, sent, ends)
    finally:
        await conn.close()
