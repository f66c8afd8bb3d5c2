"""The five data streams' wire records (a contract: docs/architecture.md).

JSON by default, MessagePack when the record's ``content-type`` header says
``application/msgpack``. Unknown fields are ignored and every field added later must have a
default, so old and new producers and consumers keep working together.

Each record type maps to its topic and key field in :data:`STREAMS`; its table(s) are in
:data:`pipeline.rows.TABLES`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

import msgspec

Timestamp = Annotated[datetime, msgspec.Meta(tz=True)]  # RFC 3339 with an offset
Version = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
JsonObject = dict[str, Any]

CONTENT_TYPE_HEADER = "content-type"
JSON = "application/json"
MSGPACK = "application/msgpack"
CONTENT_TYPES = (JSON, MSGPACK)


class StateChange(msgspec.Struct, frozen=True):
    """An agent moved to a new state; only a higher ``version`` replaces the current one."""

    agent_id: str
    state: str
    version: Version
    ts: Timestamp
    data: JsonObject = {}


class AgentEvent(msgspec.Struct, frozen=True):
    """Something happened on an agent; ``event_id`` makes redelivery harmless."""

    event_id: uuid.UUID
    agent_id: str
    kind: str
    ts: Timestamp
    severity: str = "info"
    payload: JsonObject = {}


class Metric(msgspec.Struct, frozen=True):
    """One sample of an agent's performance metric."""

    agent_id: str
    name: str
    value: float
    ts: Timestamp
    labels: JsonObject = {}


class AnalyticsEvent(msgspec.Struct, frozen=True):
    """A user-analytics event; ``event_id`` makes redelivery harmless."""

    event_id: uuid.UUID
    user_id: str
    action: str
    ts: Timestamp
    properties: JsonObject = {}


class ConfigChange(msgspec.Struct, frozen=True):
    """A configuration key set to a new value; only a higher ``version`` replaces it."""

    key: str
    value: Any
    version: Version
    ts: Timestamp
    updated_by: str = ""


Record = StateChange | AgentEvent | Metric | AnalyticsEvent | ConfigChange


@dataclass(frozen=True)
class Stream:
    """One data stream: its default topic, the field that keys it, and its record type."""

    name: str
    topic: str
    key_field: str
    record_type: type[Record]

    def key(self, record: Record) -> bytes:
        return str(getattr(record, self.key_field)).encode()


STREAMS: tuple[Stream, ...] = (
    Stream("states", "agents.states", "agent_id", StateChange),
    Stream("events", "agents.events", "agent_id", AgentEvent),
    Stream("metrics", "agents.metrics", "agent_id", Metric),
    Stream("analytics", "users.analytics", "user_id", AnalyticsEvent),
    Stream("config", "system.config", "key", ConfigChange),
)
STREAM_BY_TYPE: dict[type[Record], Stream] = {s.record_type: s for s in STREAMS}
STREAM_BY_NAME: dict[str, Stream] = {s.name: s for s in STREAMS}

DLQ_TOPIC = "pipeline.dlq"


def header_names_not_utf8(headers: Iterable[tuple[str, bytes | None]]) -> list[bytes]:
    """The header names of a record that are not UTF-8, as their bytes; none for a good one.

    Kafka's protocol makes a header name UTF-8, but brokers do not check it. Such a name
    reaches a reader as text holding lone surrogates (``surrogateescape``, see
    :mod:`pipeline.aiokafka_compat`), which no UTF-8 text holds. ASCII names, the common case,
    are checked without encoding them."""
    found = []
    for name, _ in headers:
        if not name.isascii():
            try:
                name.encode()
            except UnicodeEncodeError:
                found.append(name.encode("utf-8", "surrogateescape"))
    return found


def header_name_text(name: str) -> str:
    """A header name as UTF-8 text can carry it: bytes that are not UTF-8 written as
    ``\\xNN`` (as ``dead_letters.record_headers`` writes header values)."""
    if name.isascii():
        return name
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def topic_name(topic: str, prefix: str = "") -> str:
    """A topic's deployed name: ``PIPELINE_TOPIC_PREFIX`` + the default name."""
    return f"{prefix}{topic}"


_json_encoder = msgspec.json.Encoder()
_msgpack_encoder = msgspec.msgpack.Encoder()


def encode(record: Record, content_type: str = JSON) -> bytes:
    """The record's wire bytes in the given content type (one of :data:`CONTENT_TYPES`)."""
    if content_type == JSON:
        return _json_encoder.encode(record)
    if content_type == MSGPACK:
        return _msgpack_encoder.encode(record)
    raise ValueError(f"content type {content_type!r} is not one of {', '.join(CONTENT_TYPES)}")
