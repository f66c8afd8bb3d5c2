"""`pipeline bench`'s scratch databases on the real server: every mix's tables are made, the
built-in streams' partitioned ones included, with autovacuum off on every table that stores
rows, so that no vacuum worker lands in one pass and not in another."""

from __future__ import annotations

import asyncpg
import pytest

from consumers.bench import CATALOG_MIX, _scratch_database, streams_of
from pipeline.config import load_config
from pipeline.devstack import Endpoints


@pytest.mark.parametrize("mix", ["metrics-heavy", CATALOG_MIX])
async def test_a_scratch_database_has_the_mixs_tables_with_autovacuum_off(
    endpoints: Endpoints, mix: str
) -> None:
    config = load_config(
        {}, database_url=endpoints.database_url, kafka_bootstrap_servers=endpoints.kafka_bootstrap
    )
    catalog = streams_of(mix).catalog
    async with _scratch_database(config, catalog) as url:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            rows = await conn.fetch(
                "SELECT c.relname, c.relkind = 'p' AS partitioned, c.reloptions FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')"
            )
        finally:
            await conn.close()
    stored = {r["relname"]: r["reloptions"] for r in rows if not r["partitioned"]}
    partitioned = {r["relname"] for r in rows if r["partitioned"]}
    assert {spec.tables.table.name for spec in catalog} <= set(stored) | partitioned
    assert all(options == ["autovacuum_enabled=off"] for options in stored.values()), stored
    if mix != CATALOG_MIX:
        assert "performance_metrics" in partitioned
