"""Header names that are not UTF-8, for tests: Kafka's protocol forbids them, brokers take
them, and aiokafka's producer cannot send them on its own."""

from __future__ import annotations


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
