"""The five built-in streams as the tests build and check their traffic: each stream's
catalog entry (name, default topic) with its typed record and key field from
pipeline/records.py. The pipeline itself reads the catalog (pipeline/catalog.py)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.catalog import load
from pipeline.records import KEY_FIELDS, RECORD_STREAMS, Record, record_key


@dataclass(frozen=True)
class Stream:
    """A built-in stream: its name and default topic (the catalog's), its typed record and
    the field that keys it."""

    name: str
    topic: str
    key_field: str
    record_type: type[Record]

    def key(self, record: Record) -> bytes:
        return record_key(record)


STREAMS: tuple[Stream, ...] = tuple(
    Stream(name, load()[name].topic, KEY_FIELDS[record_type], record_type)
    for record_type, name in RECORD_STREAMS.items()
)
STREAM_BY_NAME: dict[str, Stream] = {s.name: s for s in STREAMS}
STREAM_BY_TYPE: dict[type[Record], Stream] = {s.record_type: s for s in STREAMS}
