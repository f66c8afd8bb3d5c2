"""The control plane's pure core: signed commands from Antigravity to a consumer group.

Antigravity steers each DatabaseAgent consumer group by publishing **envelopes** on a control
topic; every agent answers on a status topic with **heartbeats** and **acks**
(docs/control-plane.md describes the whole). This module holds the wire formats, the signing
and the decision an agent makes about each envelope. Everything here is values in, values
out: ``now`` is passed in, nothing reads the clock, the environment or the network. The only
IO is in the key-file helpers at the end (``*_key_file`` and :func:`read_verifier`), kept
apart and named for what they touch.

Envelope
    ``command_id`` (UUID), ``seq`` (strictly increasing per target group; gaps are allowed),
    ``target`` (the consumer group id), ``issued_at`` and ``expires_at`` (aware datetimes),
    ``issuer`` (who sent it, for people), ``key_id`` (which key signed it), ``command`` (one of
    the command structs, tagged by its ``kind`` field) and ``signature``.

Canonical encoding
    The signed bytes are the MessagePack encoding, by :data:`canonical_encoder`
    (``msgspec.msgpack.Encoder(order="deterministic")``), of an :class:`UnsignedEnvelope`: a
    map whose keys are the field names in declared order (the order listed above, without
    ``signature``), integers in their shortest form, the UUID as its canonical 36-character
    string, datetimes as MessagePack timestamps (UTC instants), the command as a map that
    starts with ``kind``, then its fields in declared order (``None`` as nil, defaults
    included). The signature is Ed25519 over :data:`SIGNING_CONTEXT` followed by those bytes;
    the context keeps a control signature from ever being valid for anything else signed with
    the same key. On the wire, an envelope is the same encoding of :class:`Envelope`: the same
    map with one more entry, ``signature`` (64 bytes, MessagePack bin), last.

    An agent never re-encodes what it received to check the signature: it takes the received
    map's entries other than ``signature``, byte for byte in the order received, under a new
    map header, and verifies those bytes; then it decodes its typed envelope *from the bytes
    it verified*. So a field added by a newer Antigravity (with a default, as every new field
    must have) is covered by the signature and ignored by an older agent, no re-encoding
    difference can fail a good signature, and what is applied is exactly what was signed.
    The flip side: re-encoding a decoded :class:`Envelope` need not reproduce a newer
    issuer's bytes, so forward the received bytes, never a re-encoded copy.

Checks, in this order (:func:`decide`; docs/control-plane.md, "Deciding a record once per
group", says what each refuses): ``undecodable``, ``unknown_kind`` (before the key, so a
version skew is named as such even when the key is also unknown), ``unknown_key``,
``bad_signature``, ``invalid_command`` (the body is parsed only once authenticated: a signed
body this agent cannot accept is a different alarm, Antigravity's bug or a version skew, from
garbage), ``lifetime_too_long`` (:data:`MAX_COMMAND_LIFETIME`; :func:`sign` refuses to sign
one), ``expired``, ``not_yet_valid`` (issued after ``now + max_clock_skew``: Antigravity's
clock is far off), a ``target`` other than the group (:class:`Ignore`, after the signature so
a forged target cannot hide a forgery), ``stale_seq``. The first that fails decides.

:func:`decide` never raises for any input bytes: each is :class:`Apply`, :class:`Ignore` or a
:class:`Reject` with one of :data:`REASONS`. Two reasons are not returned by the checks:
``apply_failed`` is for the agent when applying a valid command fails (see
:func:`apply_failed`), and ``internal_error`` is a safety net for a bug in this module, so a
poison message can never crash-loop an agent.

Metrics labels (``pipeline_control_commands_total{kind, outcome}``): every decision has
``kind`` (a command tag, or ``"unknown"`` when it could not be known or is not one of ours,
so a sender cannot invent label values) and ``outcome`` (``applied``, ``rejected``,
``ignored``).

Status messages (:class:`Heartbeat`, :class:`Ack`) are unsigned JSON, tagged by ``type``
(``kind`` is taken by the ack's command kind), readable with any Kafka console tool. Anyone
who may write the status topic can forge them: they are hints for people, never an input to
a decision (the seq comes from the signed control log, docs/security.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import typing
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from pipeline.errors import PipelineError
from pipeline.records import Timestamp, topic_name

__all__ = [
    "CONTROL_TOPIC",
    "DEFAULT_MAX_CLOCK_SKEW",
    "KINDS",
    "KIND_UNKNOWN",
    "MAX_COMMAND_LIFETIME",
    "MAX_ENVELOPE_BYTES",
    "MAX_SEQ",
    "MAX_STREAMS",
    "OUTCOMES",
    "REASONS",
    "SIGNING_CONTEXT",
    "STATUS_TOPIC",
    "STATUS_TOPIC_CONFIG",
    "UNAUTHENTICATED",
    "Ack",
    "Activate",
    "AgentState",
    "Apply",
    "Assign",
    "Assignment",
    "BatchLimits",
    "Checkpoint",
    "Command",
    "ControlError",
    "Deactivate",
    "Decision",
    "Envelope",
    "GroupState",
    "Heartbeat",
    "Ignore",
    "Outcome",
    "Reason",
    "Reject",
    "RejectionTally",
    "RollbackCheckpoint",
    "RollbackVersion",
    "Status",
    "UnsignedEnvelope",
    "Verifier",
    "apply_failed",
    "canonical_encoder",
    "check_control_partitions",
    "check_streams",
    "command_kind",
    "control_topics",
    "decide",
    "decode_status",
    "encode_envelope",
    "encode_status",
    "generate_key_pair",
    "highest_seq",
    "in_catalog_order",
    "key_id",
    "metrics_scrape_address",
    "next_seq",
    "next_state",
    "private_key_from_pem",
    "private_key_to_pem",
    "public_key_from_pem",
    "public_key_to_pem",
    "read_private_key_file",
    "read_public_key_file",
    "read_verifier",
    "rollback_plan",
    "sign",
    "signed_payload",
    "streams_after",
    "to_ack",
    "verify",
    "write_private_key_file",
    "write_public_key_file",
]

# Default topic names, prefixed like the data topics (``pipeline.records.topic_name``).
CONTROL_TOPIC = "antigravity.control"
STATUS_TOPIC = "antigravity.status"

_HOUR_MS = 3_600_000
#: The status topic's settings. Its readers look back minutes at most (`pipeline top` 5 min,
#: `pipeline control status` 15 s; `pipeline control` reads acks as they arrive), so a few
#: hours are kept, to look into after an incident. Deleted, not compacted: heartbeats and acks
#: share the instance's key, and compaction would drop an ack behind its next heartbeat.
#: Segments roll hourly, or the default week-long segment would keep everything a week.
STATUS_TOPIC_CONFIG = {
    "cleanup.policy": "delete",
    "retention.ms": str(6 * _HOUR_MS),
    "segment.ms": str(_HOUR_MS),
}


def control_topics(prefix: str) -> tuple[str, str]:
    """The deployed names of the control and status topics."""
    return topic_name(CONTROL_TOPIC, prefix), topic_name(STATUS_TOPIC, prefix)


def check_control_partitions(topic: str, partitions: int) -> None:
    """The control topic must have one partition: commands are totally ordered, and every
    instance reads partition 0 only, so a command on another partition would never be
    seen. :class:`ControlError` naming the topic and its partition count otherwise."""
    if partitions != 1:
        raise ControlError(
            f"the control topic {topic} has {partitions} partitions: it must have exactly 1 "
            "(commands are read from partition 0 only, in order)"
        )


# Domain separation: what the key signs is never just the envelope bytes.
SIGNING_CONTEXT = b"agent-pipeline control envelope v1\n"
# A command is a few hundred bytes; anything far larger is refused before it is parsed.
MAX_ENVELOPE_BYTES = 64 * 1024
MAX_SEQ = 2**63 - 1  # a PostgreSQL bigint holds every seq
DEFAULT_MAX_CLOCK_SKEW = timedelta(minutes=5)
# The longest a command may live (expires_at - issued_at): check 6 of the module doc.
MAX_COMMAND_LIFETIME = timedelta(hours=24)
KIND_UNKNOWN = "unknown"


class ControlError(PipelineError):
    """A control-plane value cannot be built or used: the message says which and why."""


# --- commands ---------------------------------------------------------------------------------

Seq = Annotated[int, msgspec.Meta(ge=1, le=MAX_SEQ)]
AssignmentVersion = Annotated[int, msgspec.Meta(ge=1, le=MAX_SEQ)]
PositiveLimit = Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]
# Checkpoint names end up in logs, labels and SQL parameters: keep them boring. ``\Z``, not
# ``$``, which would let a trailing newline through.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z"
Name = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]
GroupId = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
Issuer = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
KeyId = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{16}\Z")]
# A stream's name as the catalog allows it (pipeline/catalog.py). Whether the stream exists
# is the agent's catalog's to say when it applies the command (:func:`next_state`): the
# catalog of Antigravity and of each agent may differ during a rolling restart.
_STREAM_NAME_PATTERN = r"[a-z][a-z0-9_]{0,47}"
_STREAM_NAME = re.compile(_STREAM_NAME_PATTERN)
StreamName = Annotated[str, msgspec.Meta(pattern=f"^{_STREAM_NAME_PATTERN}\\Z")]
# A bound on what one command names, far above any catalog, so a command stays small.
MAX_STREAMS = 1024
Streams = Annotated[tuple[StreamName, ...], msgspec.Meta(min_length=1, max_length=MAX_STREAMS)]


def _check_streams(streams: tuple[str, ...]) -> None:
    # msgspec turns a ValueError here into a ValidationError when decoding; a direct
    # construction raises it as it is (the annotation is only checked on decode, and by the
    # round trip in :func:`sign`).
    malformed = [s for s in streams if not _STREAM_NAME.fullmatch(s)]
    if malformed:
        raise ValueError(f"malformed stream name(s) {malformed}: expected [a-z][a-z0-9_]*")
    if len(set(streams)) != len(streams):
        raise ValueError(f"a stream is named twice in {list(streams)}")


class BatchLimits(msgspec.Struct, frozen=True, kw_only=True):
    """Batch limits an assignment sets; ``None`` keeps the agent's configured value."""

    batch_max_records: PositiveLimit | None = None
    batch_max_bytes: PositiveLimit | None = None
    batch_max_wait_ms: PositiveLimit | None = None


class Activate(msgspec.Struct, frozen=True, tag_field="kind", tag="activate"):
    """Start ingesting these streams (already active ones stay active)."""

    streams: Streams

    def __post_init__(self) -> None:
        _check_streams(self.streams)


class Deactivate(msgspec.Struct, frozen=True, tag_field="kind", tag="deactivate"):
    """Stop ingesting these streams; their offsets stay where the last batch left them."""

    streams: Streams

    def __post_init__(self) -> None:
        _check_streams(self.streams)


class Assign(msgspec.Struct, frozen=True, tag_field="kind", tag="assign"):
    """Assignment ``version``: exactly these streams, with these batch limits.

    Versions let :class:`RollbackVersion` name an earlier assignment; each applied one is
    kept in the agent's history.
    """

    version: AssignmentVersion
    streams: Streams
    limits: BatchLimits = BatchLimits()

    def __post_init__(self) -> None:
        _check_streams(self.streams)


class Checkpoint(msgspec.Struct, frozen=True, tag_field="kind", tag="checkpoint"):
    """Record the group's current offsets under ``name`` (``RollbackCheckpoint`` returns)."""

    name: Name


class RollbackVersion(msgspec.Struct, frozen=True, tag_field="kind", tag="rollback_version"):
    """Go back to assignment ``to_version``: applied as a new version (:func:`rollback_plan`)."""

    to_version: AssignmentVersion


class RollbackCheckpoint(msgspec.Struct, frozen=True, tag_field="kind", tag="rollback_checkpoint"):
    """Rewind offsets to checkpoint ``to_checkpoint``; then re-ingest from there, or hold."""

    to_checkpoint: Name
    then: Literal["reingest", "hold"]


Command = Activate | Deactivate | Assign | Checkpoint | RollbackVersion | RollbackCheckpoint
_COMMAND_TYPES: tuple[type[Command], ...] = typing.get_args(Command)
_KIND_BY_TYPE: dict[type[Command], str] = {t: str(t.__struct_config__.tag) for t in _COMMAND_TYPES}
KINDS: tuple[str, ...] = tuple(_KIND_BY_TYPE.values())


def command_kind(command: Command) -> str:
    """The command's tag: its ``kind`` on the wire and its metrics label value."""
    return _KIND_BY_TYPE[type(command)]


# --- envelopes ----------------------------------------------------------------------------------


class _Fields(msgspec.Struct, frozen=True):
    # The header fields, in wire order; the subclasses append ``command`` (and ``signature``).
    command_id: uuid.UUID
    seq: Seq
    target: GroupId
    issued_at: Timestamp
    expires_at: Timestamp
    issuer: Issuer
    key_id: KeyId


class _Header(_Fields, frozen=True):
    # Stage one of decoding: the header typed, the command left as its bytes.
    command: msgspec.Raw


class _Tag(msgspec.Struct):
    kind: str


class UnsignedEnvelope(_Fields, frozen=True):
    """Every field of an envelope but the signature: what the signature covers."""

    command: Command


class Envelope(_Fields, frozen=True):
    """A command for one consumer group, signed by Antigravity (fields: module doc)."""

    command: Command
    signature: bytes

    @property
    def kind(self) -> str:
        return command_kind(self.command)


# What decoding untrusted bytes may raise: msgspec's own errors, invalid UTF-8 in a string,
# and nesting deeper than the interpreter's recursion limit.
_DECODE_ERRORS = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)

canonical_encoder = msgspec.msgpack.Encoder(order="deterministic")
# Rebuilding the signed map keeps the received order: no sorting here.
_in_order_encoder = msgspec.msgpack.Encoder()
_pairs_decoder = msgspec.msgpack.Decoder(dict[str, msgspec.Raw])
_header_decoder = msgspec.msgpack.Decoder(_Header)
_tag_decoder = msgspec.msgpack.Decoder(_Tag)
_command_decoder: msgspec.msgpack.Decoder[Command] = msgspec.msgpack.Decoder(Command)
_unsigned_decoder = msgspec.msgpack.Decoder(UnsignedEnvelope)
_bytes_decoder = msgspec.msgpack.Decoder(bytes)
_uuid_decoder = msgspec.msgpack.Decoder(uuid.UUID)
_seq_decoder = msgspec.msgpack.Decoder(Seq)


def _unsigned(envelope: Envelope) -> UnsignedEnvelope:
    fields = {f: getattr(envelope, f) for f in UnsignedEnvelope.__struct_fields__}
    return UnsignedEnvelope(**fields)


def signed_payload(envelope: Envelope | UnsignedEnvelope) -> bytes:
    """The canonical bytes the signature covers (without :data:`SIGNING_CONTEXT`)."""
    if isinstance(envelope, Envelope):
        envelope = _unsigned(envelope)
    return canonical_encoder.encode(envelope)


def encode_envelope(envelope: Envelope) -> bytes:
    """The envelope's wire bytes: the signed map with ``signature`` appended."""
    return canonical_encoder.encode(envelope)


def sign(
    *,
    command: Command,
    command_id: uuid.UUID,
    seq: int,
    target: str,
    issuer: str,
    issued_at: datetime,
    expires_at: datetime,
    private_key: Ed25519PrivateKey,
) -> Envelope:
    """Sign a command for ``target``; the key id comes from the key itself.

    The unsigned envelope is encoded and decoded back with the agents' own types before it
    is signed, so whatever an agent would refuse as undecodable or invalid (a naive
    datetime, an unknown stream, version 0, a bad checkpoint name) fails here instead, with
    the field named. ``command_id`` is passed in (``uuid.uuid4()``) to keep this pure.
    """
    if expires_at.tzinfo is None or issued_at.tzinfo is None:
        raise ControlError("issued_at and expires_at must be aware datetimes")
    if expires_at <= issued_at:
        raise ControlError(f"expires_at {expires_at} is not after issued_at {issued_at}")
    if expires_at - issued_at > MAX_COMMAND_LIFETIME:
        raise ControlError(
            f"a command may live {MAX_COMMAND_LIFETIME} at most (expires_at - issued_at), "
            f"not {expires_at - issued_at}: agents refuse it (lifetime_too_long)"
        )
    unsigned = UnsignedEnvelope(
        command_id=command_id,
        seq=seq,
        target=target,
        issued_at=issued_at,
        expires_at=expires_at,
        issuer=issuer,
        key_id=key_id(private_key.public_key()),
        command=command,
    )
    try:
        payload = canonical_encoder.encode(unsigned)
        checked = _unsigned_decoder.decode(payload)
    except (msgspec.MsgspecError, UnicodeError) as e:
        raise ControlError(f"cannot sign this envelope: {e}") from e
    signature = private_key.sign(SIGNING_CONTEXT + payload)
    return Envelope(**msgspec.structs.asdict(checked), signature=signature)


# --- keys ---------------------------------------------------------------------------------------


def generate_key_pair() -> tuple[Ed25519PrivateKey, Ed25519PublicKey]:
    """A new Ed25519 key pair (Antigravity keeps the private key, agents the public)."""
    private_key = Ed25519PrivateKey.generate()
    return private_key, private_key.public_key()


def key_id(public_key: Ed25519PublicKey) -> str:
    """The key's id: the first 16 hex digits of SHA-256 of its 32 raw bytes.

    Derived, never chosen, so a key cannot be filed under another key's id.
    """
    return hashlib.sha256(public_key.public_bytes_raw()).hexdigest()[:16]


def private_key_to_pem(private_key: Ed25519PrivateKey) -> bytes:
    """PEM, PKCS #8, unencrypted: protect the file (see :func:`write_private_key_file`)."""
    return private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_key_to_pem(public_key: Ed25519PublicKey) -> bytes:
    """PEM, SubjectPublicKeyInfo: what ``openssl pkey -pubout`` writes."""
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def private_key_from_pem(data: bytes) -> Ed25519PrivateKey:
    """An unencrypted PEM private key, which must be Ed25519."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ControlError(f"not an unencrypted PEM private key: {e}") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise ControlError(f"expected an Ed25519 private key, got {type(key).__name__}")
    return key


def public_key_from_pem(data: bytes) -> Ed25519PublicKey:
    """A PEM public key, which must be Ed25519."""
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise ControlError(f"not a PEM public key: {e}") from e
    if not isinstance(key, Ed25519PublicKey):
        raise ControlError(f"expected an Ed25519 public key, got {type(key).__name__}")
    return key


class Verifier:
    """The public keys an agent trusts, by key id: several at once, to rotate keys.

    Rotation: add the new public key to every agent, switch Antigravity to the new
    private key, then drop the old public key once no unexpired command signed by it is left.
    """

    def __init__(self, public_keys: Iterable[Ed25519PublicKey]) -> None:
        self._keys = {key_id(k): k for k in public_keys}

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    @property
    def public_keys(self) -> tuple[Ed25519PublicKey, ...]:
        return tuple(self._keys.values())

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def verify(self, key_id: str, message: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is the key's over ``message``; an unknown key is ``False``."""
        key = self._keys.get(key_id)
        if key is None:
            return False
        try:
            key.verify(signature, message)
        except InvalidSignature:
            return False
        return True


# --- decisions ----------------------------------------------------------------------------------

Reason = Literal[
    "undecodable",
    "unknown_kind",
    "unknown_key",
    "bad_signature",
    "invalid_command",
    "lifetime_too_long",
    "expired",
    "not_yet_valid",
    "stale_seq",
    "apply_failed",
    "internal_error",
]
REASONS: tuple[str, ...] = typing.get_args(Reason)
Outcome = Literal["applied", "rejected", "ignored"]
OUTCOMES: tuple[str, ...] = typing.get_args(Outcome)


@dataclass(frozen=True, slots=True)
class Apply:
    """Apply this command, then record its ``seq`` as applied and ack it."""

    envelope: Envelope
    outcome: ClassVar[Outcome] = "applied"

    @property
    def kind(self) -> str:
        return self.envelope.kind


@dataclass(frozen=True, slots=True)
class Ignore:
    """A valid command for another consumer group: not ours to apply, count or ack."""

    envelope: Envelope
    outcome: ClassVar[Outcome] = "ignored"

    @property
    def kind(self) -> str:
        return self.envelope.kind


@dataclass(frozen=True, slots=True)
class Reject:
    """Not applied, and why; ``kind`` is a metrics label value, the rest is what was known.

    ``command_id``, ``seq`` and ``target`` come from the envelope as far as it could be
    read; before the signature is checked they are unauthenticated, so they are for logs and
    acks, never for decisions.
    """

    reason: Reason
    detail: str
    kind: str = KIND_UNKNOWN
    command_id: uuid.UUID | None = None
    seq: int | None = None
    target: str | None = None
    outcome: ClassVar[Outcome] = "rejected"


Decision = Apply | Reject | Ignore


def _short(message: object, limit: int = 200) -> str:
    text = str(message)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _best_effort(pairs: Mapping[str, msgspec.Raw]) -> dict[str, Any]:
    # What an undecodable envelope still says about itself, field by field, for its ack.
    found: dict[str, Any] = {}
    for field, decoder in (("command_id", _uuid_decoder), ("seq", _seq_decoder)):
        raw = pairs.get(field)
        if raw is not None:
            with contextlib.suppress(*_DECODE_ERRORS):
                found[field] = decoder.decode(raw)
    return found


def _verify(raw: bytes | None, keys: Verifier) -> Envelope | Reject:
    # Checks 1 to 5 of the module doc. Every early return is a Reject; only an envelope whose
    # signature verified and whose command decoded comes back.
    if not raw:
        return Reject("undecodable", "empty message")
    if len(raw) > MAX_ENVELOPE_BYTES:
        return Reject("undecodable", f"{len(raw)} bytes, over {MAX_ENVELOPE_BYTES}")
    try:
        pairs = _pairs_decoder.decode(raw)
    except _DECODE_ERRORS as e:
        return Reject("undecodable", _short(e))
    known = _best_effort(pairs)
    signature_raw = pairs.pop("signature", None)
    if signature_raw is None:
        return Reject("undecodable", "no signature", **known)
    try:
        signature = _bytes_decoder.decode(signature_raw)
        payload = _in_order_encoder.encode(pairs)
        header = _header_decoder.decode(payload)
        tag = _tag_decoder.decode(header.command)
    except _DECODE_ERRORS as e:
        return Reject("undecodable", _short(e), **known)

    def reject(reason: Reason, detail: str, kind: str) -> Reject:
        return Reject(reason, detail, kind, header.command_id, header.seq, header.target)

    if tag.kind not in KINDS:
        return reject("unknown_kind", _short(f"unknown command kind {tag.kind!r}"), KIND_UNKNOWN)
    if header.key_id not in keys:
        return reject("unknown_key", f"no public key with id {header.key_id}", tag.kind)
    if not keys.verify(header.key_id, SIGNING_CONTEXT + payload, signature):
        return reject("bad_signature", f"not signed by key {header.key_id}", tag.kind)
    try:
        command = _command_decoder.decode(header.command)
    except _DECODE_ERRORS as e:
        return reject("invalid_command", _short(e), tag.kind)
    fields = {f: getattr(header, f) for f in _Fields.__struct_fields__}
    return Envelope(**fields, command=command, signature=signature)


def verify(raw: bytes | None, *, keys: Verifier) -> Envelope | Reject:
    """The envelope in ``raw`` if it is well formed, of a known kind and signed by one of
    ``keys``; otherwise why not. No time, group or seq checks: see :func:`decide`."""
    try:
        return _verify(raw, keys)
    except Exception as e:  # a bug here must not crash-loop an agent on a poison message
        return Reject("internal_error", _short(f"{type(e).__name__}: {e}"))


def decide(
    raw: bytes | None,
    *,
    keys: Verifier,
    group: str,
    applied_seq: int,
    now: datetime,
    max_clock_skew: timedelta = DEFAULT_MAX_CLOCK_SKEW,
    max_lifetime: timedelta = MAX_COMMAND_LIFETIME,
) -> Decision:
    """What this agent of ``group`` does with one control-topic message (checks: module doc).

    Never raises for any ``raw``; raises :class:`ValueError` only for a caller's mistake (a
    naive ``now``, a negative ``applied_seq``).
    """
    if now.tzinfo is None:
        raise ValueError("now must be an aware datetime")
    if applied_seq < 0:
        raise ValueError(f"applied_seq must be >= 0, got {applied_seq}")
    verified = verify(raw, keys=keys)
    if isinstance(verified, Reject):
        return verified
    envelope = verified
    try:
        return _check(
            envelope, group, applied_seq, now, skew=max_clock_skew, max_lifetime=max_lifetime
        )
    except Exception as e:  # see verify
        return Reject(
            "internal_error",
            _short(f"{type(e).__name__}: {e}"),
            envelope.kind,
            envelope.command_id,
            envelope.seq,
            envelope.target,
        )


def _check(
    envelope: Envelope,
    group: str,
    applied_seq: int,
    now: datetime,
    *,
    skew: timedelta,
    max_lifetime: timedelta,
) -> Decision:
    def reject(reason: Reason, detail: str) -> Reject:
        return Reject(
            reason, detail, envelope.kind, envelope.command_id, envelope.seq, envelope.target
        )

    lifetime = envelope.expires_at - envelope.issued_at
    if lifetime > max_lifetime:
        return reject("lifetime_too_long", f"lives {lifetime}, over the limit of {max_lifetime}")
    if now >= envelope.expires_at:
        return reject("expired", f"expired at {envelope.expires_at.isoformat()}")
    if envelope.issued_at > now + skew:
        return reject(
            "not_yet_valid",
            f"issued at {envelope.issued_at.isoformat()}, more than {skew} after now",
        )
    if envelope.target != group:
        return Ignore(envelope)
    if envelope.seq <= applied_seq:
        return reject("stale_seq", f"seq {envelope.seq} is not above applied {applied_seq}")
    return Apply(envelope)


# Rejections anyone who may write the control topic can produce at will: the record was not
# shown to be signed by a trusted key. No status row, and no log line of their own, per record.
UNAUTHENTICATED: frozenset[str] = frozenset(
    {"undecodable", "unknown_kind", "unknown_key", "bad_signature"}
)


@dataclass
class RejectionTally:
    """Rejected control records, logged at most once per ``interval_s`` with their count and
    the last reason: the first at once, the rest summed until the interval has passed, so a
    flood of garbage costs a line per interval, not one per record. ``now`` is monotonic
    seconds, passed in. ``what`` names what is counted (other repeated failures are logged
    the same way)."""

    interval_s: float = 10.0
    what: str = "control record(s) rejected"
    count: int = 0
    last: str = ""
    _quiet_until: float = float("-inf")

    def add(self, count: int, last: str, now: float) -> str | None:
        """Count ``count`` rejections (the newest: ``last``); the line to log, if one is due."""
        self.count += count
        self.last = last
        return self.due(now)

    def due(self, now: float) -> str | None:
        """The line to log now, if rejections are counted and the interval has passed."""
        if not self.count or now < self._quiet_until:
            return None
        line = f"{self.count} {self.what} since the last such line; the last: "
        line += self.last
        self.count = 0
        self._quiet_until = now + self.interval_s
        return line


def apply_failed(envelope: Envelope, detail: str) -> Reject:
    """A valid command the agent could not apply (say, a rollback to an unknown version)."""
    return Reject(
        "apply_failed", detail, envelope.kind, envelope.command_id, envelope.seq, envelope.target
    )


# --- helpers for Antigravity and the agent -------------------------------------------------------


def next_seq(highest: int) -> int:
    """The seq of the next command for a group whose log's highest seq is ``highest`` (0:
    none yet). Gaps are harmless; reuse is not, hence read the log, not a counter."""
    if not 0 <= highest < MAX_SEQ:
        raise ControlError(f"no seq follows {highest}")
    return highest + 1


def highest_seq(raws: Iterable[bytes | None], *, keys: Verifier, group: str) -> int:
    """The highest seq among ``raws`` (the control log) signed by ``keys`` for ``group``.

    Only verified envelopes count, expired or not: an injected unsigned envelope with a huge
    seq must not push Antigravity's sequence forward.
    """
    highest = 0
    for raw in raws:
        # Only a record whose claimed seq is above the highest verified so far is verified;
        # the others cost a partial decode. A forged one fails and leaves ``highest`` as it
        # was, so each forged record claiming a higher seq under a trusted key id costs one
        # Ed25519 check (an unknown key id is refused before any): linear in the topic's
        # size, as reading it is, and bounded by it.
        if not raw or len(raw) > MAX_ENVELOPE_BYTES:
            continue
        try:
            peek = _peek_decoder.decode(raw)
        except _DECODE_ERRORS:
            continue
        if peek.target != group or peek.seq <= highest:
            continue
        envelope = verify(raw, keys=keys)
        if isinstance(envelope, Envelope) and envelope.target == group:
            highest = max(highest, envelope.seq)
    return highest


class _SeqPeek(msgspec.Struct):
    # An envelope's seq and target, unverified: only to skip records that cannot matter.
    seq: int
    target: str


_peek_decoder = msgspec.msgpack.Decoder(_SeqPeek)


Assignment = tuple[tuple[str, ...], BatchLimits]  # an applied Assign's streams and limits


def rollback_plan(
    command: RollbackVersion, *, history: Mapping[int, Assignment], current_version: int
) -> Assign:
    """The assignment that performs a rollback: version ``current_version + 1`` with the
    streams and limits of ``command.to_version``. Versions only move forward, so a version
    number always names one assignment, and the rollback itself can be rolled back."""
    if command.to_version > current_version:
        raise ControlError(
            f"cannot roll back to version {command.to_version}: "
            f"the current version is {current_version}"
        )
    try:
        streams, limits = history[command.to_version]
    except KeyError:
        raise ControlError(f"no assignment version {command.to_version} in history") from None
    return Assign(version=current_version + 1, streams=streams, limits=limits)


def in_catalog_order(streams: Iterable[str], catalog: Sequence[str]) -> tuple[str, ...]:
    """``streams`` in the catalog's order; names the catalog lacks (another agent's catalog
    named them) follow, in their own order, so no instance drops what it does not know."""
    chosen = dict.fromkeys(streams)
    return (*(s for s in catalog if s in chosen), *(s for s in chosen if s not in catalog))


def check_streams(command: Command, catalog: Sequence[str]) -> None:
    """:class:`ControlError` naming the streams ``command`` names that ``catalog`` lacks."""
    unknown = [s for s in getattr(command, "streams", ()) if s not in catalog]
    if unknown:
        raise ControlError(
            f"unknown stream(s) {', '.join(unknown)}: this agent's catalog has {', '.join(catalog)}"
        )


def streams_after(
    active: Iterable[str], command: Activate | Deactivate, catalog: Sequence[str]
) -> tuple[str, ...]:
    """The active streams once ``command`` is applied, in ``catalog`` order (the stream
    names of the catalog). Idempotent: activating an active stream, or deactivating an
    inactive one, changes nothing."""
    now_active = dict.fromkeys(active)
    if isinstance(command, Activate):
        now_active.update(dict.fromkeys(command.streams))
    else:
        for stream in command.streams:
            now_active.pop(stream, None)
    return in_catalog_order(now_active, catalog)


# --- the group's control state ----------------------------------------------------------------


class GroupState(msgspec.Struct, frozen=True, kw_only=True):
    """What a consumer group was told, as PostgreSQL keeps it (``control_state``).

    ``next_offset``: the control topic's next record to decide; ``applied_seq``: the highest
    seq applied; ``assignment_version``: 0 until an ``Assign``; ``active_streams``: None
    until a command names them (every stream an instance consumes is then active).
    """

    next_offset: int = 0
    applied_seq: int = 0
    assignment_version: int = 0
    active_streams: tuple[str, ...] | None = None
    limits: BatchLimits = BatchLimits()

    def active(self, catalog: Sequence[str]) -> tuple[str, ...]:
        """The streams switched on: those named, or every stream of ``catalog`` (the names
        of the agent's catalog) until a command names them."""
        return tuple(catalog) if self.active_streams is None else self.active_streams


def next_state(
    state: GroupState,
    command: Command,
    *,
    history: Mapping[int, Assignment],
    catalog: Sequence[str],
) -> tuple[GroupState, Assign | None]:
    """The group's state once ``command`` is applied, and the assignment to record (an
    ``Assign``, or the one a ``RollbackVersion`` makes). ``history`` holds the assignment
    ``RollbackVersion`` names, when there is one; ``catalog`` is the names of the agent's
    streams, in catalog order. :class:`ControlError` when the command cannot be applied to
    this state (an assignment version that does not go up, an unknown one, a stream the
    catalog lacks). Checkpoints and data rollbacks change no field here: their effect is on
    the data.
    """
    match command:
        case Activate() | Deactivate():
            check_streams(command, catalog)
            return msgspec.structs.replace(
                state, active_streams=streams_after(state.active(catalog), command, catalog)
            ), None
        case Assign(version=version):
            check_streams(command, catalog)
            if version <= state.assignment_version:
                raise ControlError(
                    f"assignment version {version} is not above the current "
                    f"{state.assignment_version}"
                )
            return _assigned(state, command, catalog), command
        case RollbackVersion():
            plan = rollback_plan(command, history=history, current_version=state.assignment_version)
            check_streams(plan, catalog)
            return _assigned(state, plan, catalog), plan
        case Checkpoint() | RollbackCheckpoint():
            return state, None
    raise ControlError(f"no state change defined for {command_kind(command)}")  # unreachable


def _assigned(state: GroupState, assign: Assign, catalog: Sequence[str]) -> GroupState:
    return msgspec.structs.replace(
        state,
        assignment_version=assign.version,
        active_streams=in_catalog_order(assign.streams, catalog),
        limits=assign.limits,
    )


# --- status messages ----------------------------------------------------------------------------

AgentState = Literal["starting", "running", "holding", "stopping"]
Count = Annotated[int, msgspec.Meta(ge=0)]


class Heartbeat(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="heartbeat"):
    """One agent instance's state, published periodically on the status topic.

    ``assignment_version`` 0 means no ``Assign`` applied yet (the configuration rules).
    Stream names are not checked here: Antigravity may be older than the agent.
    """

    instance_id: str
    group: str
    state: AgentState
    applied_seq: Count
    assignment_version: Count
    active_streams: tuple[str, ...]
    owned_partitions: tuple[tuple[str, int], ...]  # [topic, partition] pairs
    lag: Count  # records behind the high watermarks of owned partitions
    last_error: str = ""
    # Where to scrape this instance's /metrics (HOST:PORT; see :func:`metrics_scrape_address`),
    # "" when it serves none. A default, so heartbeats of older agents still decode.
    metrics_address: str = ""
    at: Timestamp


# The address that binds every IPv4 interface: a server can listen on it, no client can
# connect to it. (PIPELINE_METRICS_ADDRESS is HOST:PORT without brackets, so no IPv6 wildcard.)
_WILDCARD_HOSTS = frozenset({"0.0.0.0"})


def metrics_scrape_address(metrics_address: str, host_name: str) -> str:
    """The address a heartbeat advertises for scraping an agent that serves ``/metrics`` on
    ``metrics_address`` (``PIPELINE_METRICS_ADDRESS``, ``HOST:PORT`` or "" for none).

    A specific host (a name or an IP, loopback included) is advertised as it is. The wildcard
    ``0.0.0.0`` is where the server listens, not where anyone can connect, so it is advertised
    as ``host_name`` (the machine's host name, what ``hostname`` prints) with the same port: the
    server answers on every interface, so whichever address that name resolves to will do,
    for a scraper that can resolve it.
    """
    if not metrics_address:
        return ""
    host, _, port = metrics_address.rpartition(":")
    if host in _WILDCARD_HOSTS:
        return f"{host_name}:{port}"
    return metrics_address


class Ack(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="ack"):
    """An agent instance's answer to one command: applied, or rejected with a reason.

    ``command_id`` and ``seq`` are ``None`` when the message was too broken to carry them.
    """

    command_id: uuid.UUID | None
    seq: int | None
    kind: str
    instance_id: str
    group: str
    outcome: Literal["applied", "rejected"]
    reason: str = ""
    detail: str = ""
    at: Timestamp


Status = Heartbeat | Ack
_status_encoder = msgspec.json.Encoder()
_status_decoder: msgspec.json.Decoder[Status] = msgspec.json.Decoder(Status)


def encode_status(message: Status) -> bytes:
    """A heartbeat's or ack's wire bytes (JSON)."""
    return _status_encoder.encode(message)


def decode_status(raw: bytes) -> Status:
    """A status message; unknown fields are ignored, anything else wrong is a ControlError."""
    try:
        return _status_decoder.decode(raw)
    except _DECODE_ERRORS as e:
        raise ControlError(f"not a status message: {_short(e)}") from e


def to_ack(decision: Apply | Reject, *, instance_id: str, group: str, at: datetime) -> Ack:
    """The ack for a decision. Send an ``Apply``'s ack once it is applied; if applying
    fails, ack :func:`apply_failed` instead."""
    if isinstance(decision, Apply):
        envelope = decision.envelope
        return Ack(
            command_id=envelope.command_id,
            seq=envelope.seq,
            kind=envelope.kind,
            instance_id=instance_id,
            group=group,
            outcome="applied",
            at=at,
        )
    return Ack(
        command_id=decision.command_id,
        seq=decision.seq,
        kind=decision.kind,
        instance_id=instance_id,
        group=group,
        outcome="rejected",
        reason=decision.reason,
        detail=decision.detail,
        at=at,
    )


# --- key files (the only IO here) ---------------------------------------------------------------


def write_private_key_file(path: Path, private_key: Ed25519PrivateKey) -> None:
    """Write a new private key file, readable by its owner only; never overwrite one (a
    lost signing key is a rotation, an overwritten one is an outage)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_key_to_pem(private_key))


def write_public_key_file(path: Path, public_key: Ed25519PublicKey) -> None:
    """Write a public key file (PEM); never overwrite one."""
    with path.open("xb") as f:
        f.write(public_key_to_pem(public_key))


def read_private_key_file(path: Path) -> Ed25519PrivateKey:
    """Read a private key file written by :func:`write_private_key_file` (or openssl).

    Refused, as ssh refuses its keys, when the group or others have any access to it: a key
    others could read may have been copied, and whoever holds it steers every group. The
    mode is read from the file opened, so it is the mode of the bytes read."""
    with path.open("rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if mode & 0o077:
            raise ControlError(
                f"the private key {path} has mode {stat.S_IMODE(mode):04o}: it must be "
                f"readable by its owner only (chmod 600 {path})"
            )
        data = f.read()
    return private_key_from_pem(data)


def read_public_key_file(path: Path) -> Ed25519PublicKey:
    """Read a public key file (PEM SubjectPublicKeyInfo)."""
    return public_key_from_pem(path.read_bytes())


def read_verifier(paths: Iterable[Path]) -> Verifier:
    """A verifier trusting the public keys in these files."""
    return Verifier(read_public_key_file(p) for p in paths)
