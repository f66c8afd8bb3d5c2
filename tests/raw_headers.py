"""Header names that are not UTF-8, for tests: Kafka's protocol forbids them, brokers take
them, and aiokafka's producer cannot send them on its own."""

from __future__ import annotations

from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy


class RawName(str):
    """A header name sent as these bytes. aiokafka's producer takes names as ``str`` and
    encodes them; its pure-Python batch builder (``_DefaultRecordBatchBuilderPy``) does so
    with ``str.encode``, which this overrides (its C builder encodes without asking)."""

    raw: bytes

    def __new__(cls, raw: bytes) -> RawName:
        name = super().__new__(cls, raw.hex())
        name.raw = raw
        return name

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return self.raw


def batch_builder(*, gzip: bool = False) -> _DefaultRecordBatchBuilderPy:
    """aiokafka's pure-Python v2 batch builder, the one that sends a :class:`RawName` as its
    bytes."""
    return _DefaultRecordBatchBuilderPy(
        2,
        _DefaultRecordBatchBuilderPy.CODEC_GZIP if gzip else 0,
        is_transactional=0,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=0,
        batch_size=1 << 20,
    )
