"""A model of the log: what a catalog stream's tables must hold once every record produced to
it is ingested, for each mode (docs/streams.md, "Modes"); pure, the oracle's other half.

The model takes what the test produced, with each record's expected column values (the test
built the record from them), and replays the modes' rules in log order. It is written apart
from the pipeline's decoders and writers on purpose: it judges them.

Records of one key must sit in one partition (Kafka's partitioner puts them there when the
Kafka key is the stream's key): the order of records across partitions is not defined, so the
winner among them would not be either.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.catalog import StreamSpec

Source = tuple[int, int]  # (partition, offset)
Rows = dict[Source, tuple[Any, ...]]  # source -> the stream's column values, catalog order


@dataclass(frozen=True)
class Produced:
    """One record as produced and where it landed."""

    stream: str
    partition: int
    offset: int
    # The stream's column values, in catalog order, as the database returns them; None for a
    # tombstone (a record with a null value).
    row: tuple[Any, ...] | None
    # For a tombstone: the key column's value (the Kafka key as the key column's type).
    tombstone_key: Any = None
    poison: str | None = None  # the column a dead letter must name, or None when good
    # Older than its stream's retention horizon when ingested: in no table, no dead letter.
    expired: bool = False

    @property
    def source(self) -> Source:
        return (self.partition, self.offset)


def expected_tables(spec: StreamSpec, produced: Iterable[Produced]) -> dict[str, Rows]:
    """Every table of ``spec`` and the rows it must hold, by source."""
    records = sorted(
        (p for p in produced if p.stream == spec.name and p.poison is None and not p.expired),
        key=lambda p: p.source,
    )
    _check_one_partition_per_key(spec, records)
    _check_tombstones(spec, records)
    if spec.mode == "append":
        return {spec.table: _append(spec, records)}
    tables = {spec.table: _latest(spec, records)}
    if spec.history_table is not None:
        tables[spec.history_table] = _history(spec, records)
    return tables


def landed(tables: dict[str, Rows]) -> dict[str, set[Source]]:
    """The sources each table must hold, as the oracle's ``landed`` takes them."""
    return {table: set(rows) for table, rows in tables.items()}


def _key(spec: StreamSpec, record: Produced) -> tuple[Any, ...]:
    if record.row is None:
        return (record.tombstone_key,)
    return tuple(record.row[spec.column_names.index(c)] for c in spec.key)


def _version(spec: StreamSpec, row: tuple[Any, ...]) -> Any:
    assert spec.version is not None
    return row[spec.column_names.index(spec.version)]


def _check_one_partition_per_key(spec: StreamSpec, records: Sequence[Produced]) -> None:
    if not spec.key:
        return
    partitions: dict[tuple[Any, ...], int] = {}
    for record in records:
        key = _key(spec, record)
        if partitions.setdefault(key, record.partition) != record.partition:
            raise ValueError(
                f"stream {spec.name!r}: key {key} is in partitions {partitions[key]} and "
                f"{record.partition}; the model needs each key in one partition"
            )


def _check_tombstones(spec: StreamSpec, records: Sequence[Produced]) -> None:
    """A tombstone on a stream that ignores them is dead-lettered, so it is never good."""
    for record in records:
        if record.row is None and spec.tombstones != "delete":
            raise ValueError(
                f"stream {spec.name!r}: a tombstone at {record.source} on a stream that "
                "ignores tombstones must be produced as poison"
            )


def _rows_only(records: Sequence[Produced]) -> list[Produced]:
    """The records that are rows: tombstones are not."""
    return [r for r in records if r.row is not None]


def _append(spec: StreamSpec, records: Sequence[Produced]) -> Rows:
    """One row per record; with a key, the first record of each key (in log order) only."""
    rows: Rows = {}
    seen: set[tuple[Any, ...]] = set()
    for record in _rows_only(records):
        assert record.row is not None
        if spec.key:
            key = _key(spec, record)
            if key in seen:
                continue
            seen.add(key)
        rows[record.source] = record.row
    return rows


def _latest(spec: StreamSpec, records: Sequence[Produced]) -> Rows:
    """One row per key: the higher version wins (equal: the row already there stays); without
    a version, the later record. A tombstone deletes its key's row."""
    current: dict[tuple[Any, ...], Produced] = {}
    for record in records:
        key = _key(spec, record)
        if record.row is None:
            current.pop(key, None)  # every row there came from an earlier offset
            continue
        there = current.get(key)
        if (
            there is None
            or spec.version is None
            or _version(spec, record.row) > _version(spec, there.row or ())
        ):
            current[key] = record
    return {r.source: r.row for r in current.values() if r.row is not None}


def _history(spec: StreamSpec, records: Sequence[Produced]) -> Rows:
    """Every record that is a row; with a version, the first of each (key, version)."""
    rows: Rows = {}
    seen: set[tuple[Any, ...]] = set()
    for record in _rows_only(records):
        assert record.row is not None
        if spec.version is not None:
            identity = (*_key(spec, record), _version(spec, record.row))
            if identity in seen:
                continue
            seen.add(identity)
        rows[record.source] = record.row
    return rows
