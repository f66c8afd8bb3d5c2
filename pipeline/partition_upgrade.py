"""The statements that make an existing unpartitioned table of a stream partitioned, its rows
kept, without a long exclusive lock; pure.

The old table becomes the partition of every time before a cut-over, ``<table>_legacy``; new
ranges come after it. What runs outside a transaction does not block writes for long; the
swap is one short transaction. Each step is skipped when done already, so an upgrade that
was interrupted finishes when `pipeline migrate` runs again. docs/streams.md, "Upgrading to
partitioned tables", is the contract.
"""

from __future__ import annotations

import datetime
import re

# schema_plan's plan() calls upgrade(); this module builds on its statements, reached through
# the module so that either may be imported first.
from pipeline import partitions, schema_plan, sql_names

_LEGACY = "legacy"
_KEY_INDEX = "partition_key"  # the unique index on (key..., partition column)
_CHECK = "before_partitioning"  # CHECK (column < cut-over), which spares ATTACH its scan
_QUOTED = re.compile(r"'([^']*)'")


def cutover(now: datetime.datetime, interval: str) -> datetime.datetime:
    """Where the old table's range ends: the start of the interval after the next one, so
    that rows of the current interval and the next keep landing in the old table until the
    swap, however long the steps before it take."""
    return partitions.step(partitions.floor(now, interval), interval, 2)


def legacy_name(table: str) -> str:
    """The bare name the old table takes as a partition, in its schema."""
    return sql_names.derived(sql_names.split_table(table)[1], _LEGACY)


def key_index_name(table: str) -> str:
    return sql_names.derived(sql_names.split_table(table)[1], _KEY_INDEX)


def check_name(table: str) -> str:
    return sql_names.derived(sql_names.split_table(table)[1], _CHECK)


def legacy_index_name(table: str, index: str) -> str:
    """The name an index of the old table takes: ``<table>_source`` becomes
    ``<table>_legacy_source``, leaving the parent's index its name."""
    bare = sql_names.split_table(table)[1]
    if index.startswith(f"{bare}_"):
        return sql_names.derived(legacy_name(table), index[len(bare) + 1 :])
    return sql_names.derived(index, _LEGACY)


def check_bound(definition: str) -> datetime.datetime | None:
    """The cut-over of a ``CHECK (column < '...')`` as pg_get_constraintdef() gives it (a
    timestamptz with its offset, or a date: midnight UTC); None when it holds none."""
    found = _QUOTED.search(definition)
    if found is None:
        return None
    try:
        moment = datetime.datetime.fromisoformat(found[1])
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)


def bound_literal(moment: datetime.datetime, column_type: str) -> str:
    """``moment`` as a constant of the partition column's type."""
    if column_type == "date":
        return f"'{moment.date().isoformat()}'::date"
    return f"'{moment.astimezone(datetime.UTC).isoformat()}'::timestamptz"


def upgrade(
    shape: schema_plan.TableShape,
    table: schema_plan.TableState,
    now: datetime.datetime,
    added_indexes: tuple[str, ...] = (),
) -> schema_plan.Upgrade:
    """The upgrade of ``table`` (unpartitioned, its columns and key already checked against
    ``shape``) to ``shape``'s partitioned table; ``added_indexes``, the catalog's indexes the
    same plan creates on the old table first."""
    assert shape.partition_by is not None and shape.partition_interval is not None
    column = shape.partition_by
    interval = shape.partition_interval
    kind = next(c.type for c in shape.columns if c.name == column)
    schema, _ = shape.qualified
    quoted = sql_names.table(shape.name)
    legacy = sql_names.table(f"{schema}.{legacy_name(shape.name)}")
    online: list[str] = []
    actions: list[str] = []

    key_index = key_index_name(shape.name)
    swap_key = bool(shape.primary_key) and table.primary_key != shape.primary_key
    if swap_key:
        found = table.index(key_index)
        if found is not None and not found.valid:  # left by an interrupted build
            online.append(f"DROP INDEX CONCURRENTLY IF EXISTS {_in(schema, key_index)}")
        if found is None or not found.valid:
            online.append(
                f"CREATE UNIQUE INDEX CONCURRENTLY {sql_names.ident(key_index)} ON {quoted} "
                f"({sql_names.columns(shape.primary_key)})"
            )
            actions.append(
                f"build the unique index {key_index} on {shape.display} "
                f"({', '.join(shape.primary_key)}), without blocking writes"
            )

    end = cutover(now, interval)
    check = check_name(shape.name)
    found_check = table.check(check)
    if found_check is not None and check_bound(found_check.definition) != end:
        online.append(f"ALTER TABLE {quoted} DROP CONSTRAINT {sql_names.ident(check)}")
        found_check = None
    if found_check is None:
        online.append(
            f"ALTER TABLE {quoted} ADD CONSTRAINT {sql_names.ident(check)} CHECK "
            f"({sql_names.ident(column)} < {bound_literal(end, kind)}) NOT VALID"
        )
    if found_check is None or not found_check.validated:
        online.append(f"ALTER TABLE {quoted} VALIDATE CONSTRAINT {sql_names.ident(check)}")
        actions.append(
            f"check that every row of {shape.display} has {column} before {end.isoformat()}, "
            "without blocking writes"
        )

    # The swap: every lock it needs taken first, so it waits in one place.
    swap = [f"LOCK TABLE {quoted} IN ACCESS EXCLUSIVE MODE"]
    primary = next((i.name for i in table.indexes if i.primary), None)
    renamed = [i.name for i in table.indexes if not i.primary and i.name != key_index] + list(
        added_indexes
    )
    for index in renamed:
        swap.append(
            f"ALTER INDEX {_in(schema, index)} RENAME TO "
            f"{sql_names.ident(legacy_index_name(shape.name, index))}"
        )
    swap.append(f"ALTER TABLE {quoted} RENAME TO {sql_names.ident(legacy_name(shape.name))}")
    legacy_key = sql_names.ident(sql_names.derived(legacy_name(shape.name), "pkey"))
    if swap_key:
        if primary is not None:
            swap.append(f"ALTER TABLE {legacy} DROP CONSTRAINT {sql_names.ident(primary)}")
        swap.append(
            f"ALTER TABLE {legacy} ADD CONSTRAINT {legacy_key} PRIMARY KEY USING INDEX "
            f"{sql_names.ident(key_index)}"
        )
    elif primary is not None:
        swap.append(
            f"ALTER TABLE {legacy} RENAME CONSTRAINT {sql_names.ident(primary)} TO {legacy_key}"
        )
    version_check = next(
        (c.name for c in table.checks if c.columns == (shape.version_check,) and c.name != check),
        None,
    )
    swap.append(schema_plan.create_table(shape, version_check))
    swap.extend(schema_plan.create_index(shape, index) for index in shape.indexes)
    swap.append(
        f"ALTER TABLE {quoted} ATTACH PARTITION {legacy} FOR VALUES FROM (MINVALUE) "
        f"TO ({bound_literal(end, kind)})"
    )
    swap.append(schema_plan.create_default_partition(shape))
    swap.extend(schema_plan.grants(shape.name))
    actions.append(
        f"partition {shape.display} by {interval} of {column}: its rows before "
        f"{end.isoformat()} kept in the partition {schema}.{legacy_name(shape.name)}, "
        "a DEFAULT partition for the rest"
    )
    return schema_plan.Upgrade(shape.display, tuple(online), tuple(swap), tuple(actions))


def _in(schema: str, name: str) -> str:
    return f"{sql_names.ident(schema)}.{sql_names.ident(name)}"
