"""A record whose header name is not UTF-8 reaches its reader instead of stopping it.

Kafka's protocol says a header name is a UTF-8 string, but brokers do not check it, so any
producer can write one that is not. aiokafka (0.13, 0.14) decodes header names strictly while
it parses a fetched batch (``DefaultRecordBatch._read_msg``, in C and in Python alike). The
``UnicodeDecodeError`` escapes ``getmany``, and then:

* the partition's position stays before the record, so every later fetch raises again: a
  reader that lets the error through stops on every start, one that catches it spins;
* records already drained for other partitions in the same ``getmany`` are lost to the
  caller, though their positions moved past them.

:func:`install` (run by :func:`pipeline.kafka_clients.consumer`, which builds every consumer
of the project, before the consumer exists) changes two names in aiokafka's fetcher module:

* ``MemoryRecords``: the same C parser, kept together with the fetched bytes
  (:class:`_FetchedRecords`);
* ``PartitionRecords``: the same iteration (:class:`_PartitionRecords`); only when a batch
  raises ``UnicodeDecodeError`` is that batch parsed again, in Python, with header names
  decoded with ``surrogateescape`` (:class:`_TolerantBatch`), and the rest of the fetch goes
  on in C.

A fetch without such a record makes the same calls per record as before. The record itself is
handed over like any other, its bad header name a ``str`` holding lone surrogates, which no
UTF-8 text contains (``name.encode("utf-8", "surrogateescape")`` gives back its bytes):
:func:`pipeline.records.header_names_not_utf8` finds them, and each reader rejects the record
with a reason (the DatabaseAgent as a dead letter, the controller as a rejected command).
"""

from __future__ import annotations

import struct
from typing import Any

from aiokafka.consumer import fetcher
from aiokafka.errors import CorruptRecordException
from aiokafka.record.default_records import _DefaultRecordBatchPy, _DefaultRecordPy
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.record.util import decode_varint

__all__ = ["install", "installed"]

# Every batch of every record format starts with its (base) offset and its length; the magic
# byte (the format) is at the same place in all of them.
_LOG_HEAD = struct.Struct(">qi")
_MAGIC_AT = 16
_LAST_OFFSET_DELTA = struct.Struct(">i")
_LAST_OFFSET_DELTA_AT = 23  # in a v2 batch (the only format with headers)


class _FetchedRecords:
    """aiokafka's MemoryRecords of one partition's fetch, kept with the bytes it parses.
    Its methods are the C parser's own (bound), so keeping the bytes costs no call."""

    __slots__ = ("data", "has_next", "next_batch", "size_in_bytes")

    def __init__(self, data: bytes) -> None:
        records = MemoryRecords(data)
        self.data = data
        self.has_next = records.has_next
        self.next_batch = records.next_batch
        self.size_in_bytes = records.size_in_bytes


class _Reparsed:
    """The rest of a fetch from a batch that raised: that batch parsed by
    :class:`_TolerantBatch`, then the batches after it (from ``after`` on in ``data``, the
    whole fetch) by aiokafka's C parser again."""

    def __init__(self, batch: _TolerantBatch, data: bytes, after: int) -> None:
        self._batch: _TolerantBatch | None = batch
        self.data = data
        self._after = MemoryRecords(data[after:])

    def has_next(self) -> bool:
        return self._batch is not None or bool(self._after.has_next())

    def next_batch(self) -> Any:
        batch, self._batch = self._batch, None
        return batch if batch is not None else self._after.next_batch()

    def size_in_bytes(self) -> int:
        return int(self._after.size_in_bytes())


class _PartitionRecords(fetcher.PartitionRecords):  # type: ignore[misc]  # aiokafka is untyped
    """aiokafka's iteration over one partition's fetched records, which survives a header
    name that is not UTF-8."""

    _records: Any
    _records_iterator: Any
    _reparsed_at: int | None = None

    def __next__(self) -> Any:
        # aiokafka's own __next__, plus the except clause: nothing more per record.
        while True:
            try:
                return next(self._records_iterator)
            except StopIteration:
                self._records_iterator = None
                raise
            except UnicodeDecodeError:
                if not self._reparse():
                    raise

    def _reparse(self) -> bool:
        """Go on from the batch that raised: aiokafka's own generator, over what
        :func:`_rest_of_fetch` gives. False when a header name is not what raised: the same
        record raised again after its batch was parsed again (a deserializer, say)."""
        data = getattr(self._records, "data", None)
        if data is None or self._reparsed_at == self.next_fetch_offset:
            return False
        self._reparsed_at = self.next_fetch_offset
        rest = _rest_of_fetch(data, self.next_fetch_offset)
        if rest is None:
            return False
        self._records = rest
        self._records_iterator = self._unpack_records()
        return True


def _rest_of_fetch(data: bytes, next_offset: int) -> _Reparsed | None:
    """The batches of ``data`` from the first one that still holds ``next_offset`` or later,
    that one parsed by :class:`_TolerantBatch`. The iteration had yielded every record before
    ``next_offset`` and moved it past every batch it finished, so that batch is the one whose
    parsing raised. None when it is not a v2 batch, or is cut short (nothing to tolerate)."""
    pos, end = 0, len(data)
    while pos + _LOG_HEAD.size <= end:
        base_offset, length = _LOG_HEAD.unpack_from(data, pos)
        stop = pos + _LOG_HEAD.size + length
        if stop > end or pos + _MAGIC_AT >= end:
            return None
        v2 = data[pos + _MAGIC_AT] >= 2
        last = base_offset
        if v2:
            last += _LAST_OFFSET_DELTA.unpack_from(data, pos + _LAST_OFFSET_DELTA_AT)[0]
        if last >= next_offset:
            return _Reparsed(_TolerantBatch(data[pos:stop]), data, stop) if v2 else None
        pos = stop
    return None


class _TolerantBatch(_DefaultRecordBatchPy):  # type: ignore[misc]  # aiokafka is untyped
    """aiokafka's pure-Python v2 batch, reading header names with ``surrogateescape``."""

    _buffer: bytearray
    _pos: int

    def _read_msg(self, decode_varint: Any = decode_varint) -> Any:
        # Record => Length Attributes TimestampDelta OffsetDelta Key Value [HeaderKey HeaderValue]
        buffer, pos = self._buffer, self._pos
        length, pos = decode_varint(buffer, pos)
        start = pos
        _, pos = decode_varint(buffer, pos)  # attributes: none defined for records
        timestamp_delta, pos = decode_varint(buffer, pos)
        if self.timestamp_type == self.LOG_APPEND_TIME:
            timestamp = self.max_timestamp
        else:
            timestamp = self.first_timestamp + timestamp_delta
        offset_delta, pos = decode_varint(buffer, pos)
        key, pos = _nullable_bytes(buffer, pos, decode_varint)
        value, pos = _nullable_bytes(buffer, pos, decode_varint)
        count, pos = decode_varint(buffer, pos)
        if count < 0:
            raise CorruptRecordException(f"Found invalid number of record headers {count}")
        headers: list[tuple[str, bytes | None]] = []
        for _ in range(count):
            name, pos = _nullable_bytes(buffer, pos, decode_varint)
            if name is None:
                raise CorruptRecordException("Invalid negative header key size")
            header_value, pos = _nullable_bytes(buffer, pos, decode_varint)
            headers.append((name.decode("utf-8", "surrogateescape"), header_value))
        if pos - start != length:
            raise CorruptRecordException(
                f"Invalid record size: expected to read {length} bytes in record payload, "
                f"but instead read {pos - start}"
            )
        self._pos = pos
        return _DefaultRecordPy(
            self.base_offset + offset_delta, timestamp, self.timestamp_type, key, value, headers
        )


def _nullable_bytes(buffer: bytearray, pos: int, decode_varint: Any) -> tuple[bytes | None, int]:
    size, pos = decode_varint(buffer, pos)
    if size < 0:
        return None, pos
    if pos + size > len(buffer):
        raise CorruptRecordException(f"Can't read {size} bytes from pos {pos}")
    return bytes(buffer[pos : pos + size]), pos + size


def installed() -> bool:
    """Whether aiokafka's fetcher uses the classes of this module."""
    return (
        fetcher.PartitionRecords is _PartitionRecords and fetcher.MemoryRecords is _FetchedRecords
    )


def install() -> None:
    """Make aiokafka's fetcher use the classes of this module (idempotent). Raises
    RuntimeError if aiokafka's fetcher is not shaped as this module expects (another version):
    consumers must not run without it."""
    if installed():
        return
    shaped = (
        fetcher.PartitionRecords.__next__.__code__.co_names.count("_records_iterator")
        and hasattr(fetcher.PartitionRecords, "_unpack_records")
        and fetcher.MemoryRecords is MemoryRecords
    )
    if not shaped:
        raise RuntimeError(
            "aiokafka's fetcher is not the one pipeline.aiokafka_compat was written for: "
            "check that a header name that is not UTF-8 still stops a consumer, and update it"
        )
    fetcher.PartitionRecords = _PartitionRecords
    fetcher.MemoryRecords = _FetchedRecords
