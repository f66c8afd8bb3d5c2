"""The five data streams' wire records (a contract: docs/architecture.md).

JSON by default, MessagePack when the record's ``content-type`` header says
``application/msgpack``. Unknown fields are ignored and every field added later must have a
default, so old and new producers and consumers keep working together.

Each record type maps to its built-in stream and key field (:data:`RECORD_STREAMS`,
:data:`KEY_FIELDS`); the stream's topic and table(s) are the catalog's (docs/streams.md).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
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


#: The built-in stream each typed record goes to (its topic and table are the catalog's,
#: pipeline/streams.toml), and the field whose value is the record's Kafka key, so one
#: entity's records stay ordered in one partition.
RECORD_STREAMS: dict[type[Record], str] = {
    StateChange: "states",
    AgentEvent: "events",
    Metric: "metrics",
    AnalyticsEvent: "analytics",
    ConfigChange: "config",
}
KEY_FIELDS: dict[type[Record], str] = {
    StateChange: "agent_id",
    AgentEvent: "agent_id",
    Metric: "agent_id",
    AnalyticsEvent: "user_id",
    ConfigChange: "key",
}


def stream_of(record: Record) -> str:
    """The name of the built-in stream a typed record goes to; TypeError for anything else."""
    try:
        return RECORD_STREAMS[type(record)]
    except KeyError:
        raise TypeError(f"not a wire record: {type(record).__name__}") from None


def record_key(record: Record) -> bytes:
    """A typed record's Kafka key: its key field's value, as UTF-8."""
    return str(getattr(record, KEY_FIELDS[type(record)])).encode()


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
