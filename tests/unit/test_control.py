"""The control plane's pure core: commands, canonical encoding, signatures, the decision an
agent makes about each envelope, status messages and the helpers around them.

Tampering and fuzzing of whole envelopes are in test_control_tamper.py and
test_fuzz_control.py; the helpers that build envelopes by hand live here and are shared
with them.
"""

from __future__ import annotations

import hashlib
import stat
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from pipeline import control
from pipeline.catalog import load as load_catalog
from pipeline.control import (
    KIND_UNKNOWN,
    KINDS,
    MAX_ENVELOPE_BYTES,
    MAX_SEQ,
    OUTCOMES,
    REASONS,
    SIGNING_CONTEXT,
    Ack,
    Activate,
    Apply,
    Assign,
    BatchLimits,
    Checkpoint,
    Command,
    ControlError,
    Deactivate,
    Decision,
    Envelope,
    GroupState,
    Heartbeat,
    Ignore,
    Reject,
    RollbackCheckpoint,
    RollbackVersion,
    UnsignedEnvelope,
    Verifier,
    apply_failed,
    command_kind,
    decide,
    decode_status,
    encode_envelope,
    encode_status,
    generate_key_pair,
    highest_seq,
    key_id,
    next_seq,
    next_state,
    private_key_from_pem,
    private_key_to_pem,
    public_key_from_pem,
    public_key_to_pem,
    read_private_key_file,
    read_public_key_file,
    read_verifier,
    rollback_plan,
    sign,
    signed_payload,
    streams_after,
    to_ack,
    verify,
    write_private_key_file,
    write_public_key_file,
)
from pipeline.errors import PipelineError
from tests.builtin_streams import STREAM_BY_NAME

BUILTIN = load_catalog().names

# Fixed keys: Ed25519 signatures are deterministic, so every envelope below is reproducible.
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))
UNTRUSTED_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(64, 96)))
KEYS = Verifier([KEY.public_key()])
GROUP = "database-agent"
NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
COMMAND_ID = uuid.UUID("6f1c2a7e-3b4d-4c5e-8f90-a1b2c3d4e5f6")
LIMITS = BatchLimits(batch_max_records=1000, batch_max_bytes=1 << 20, batch_max_wait_ms=50)

COMMANDS: list[Command] = [
    Activate(streams=("states",)),
    Activate(streams=tuple(STREAM_BY_NAME)),
    Deactivate(streams=("metrics", "analytics")),
    Assign(version=1, streams=("events",)),
    Assign(version=7, streams=("states", "config"), limits=LIMITS),
    Assign(version=2, streams=("config",), limits=BatchLimits(batch_max_wait_ms=5)),
    Checkpoint(name="before-migration_2025.06"),
    RollbackVersion(to_version=3),
    RollbackCheckpoint(to_checkpoint="nightly", then="reingest"),
    RollbackCheckpoint(to_checkpoint="nightly", then="hold"),
]


def make(
    command: Command | None = None,
    *,
    seq: int = 5,
    target: str = GROUP,
    issued_at: datetime = NOW,
    lifetime: timedelta = timedelta(minutes=10),
    private_key: Ed25519PrivateKey = KEY,
    command_id: uuid.UUID = COMMAND_ID,
    issuer: str = "antigravity@test",
) -> Envelope:
    return sign(
        command=command if command is not None else Checkpoint(name="nightly"),
        command_id=command_id,
        seq=seq,
        target=target,
        issuer=issuer,
        issued_at=issued_at,
        expires_at=issued_at + lifetime,
        private_key=private_key,
    )


def wire(command: Command | None = None, **kwargs: Any) -> bytes:
    return encode_envelope(make(command, **kwargs))


def fields(**overrides: Any) -> dict[str, Any]:
    """An envelope's unsigned fields as plain values, in wire order, for hand-made envelopes."""
    base: dict[str, Any] = {
        "command_id": str(COMMAND_ID),
        "seq": 5,
        "target": GROUP,
        "issued_at": NOW,
        "expires_at": NOW + timedelta(minutes=10),
        "issuer": "antigravity@test",
        "key_id": key_id(KEY.public_key()),
        "command": {"kind": "checkpoint", "name": "nightly"},
    }
    base.update(overrides)
    return base


def signed_wire(unsigned: dict[str, Any], private_key: Ed25519PrivateKey = KEY) -> bytes:
    """Sign any map the documented way: context + its MessagePack bytes, then ``signature``."""
    payload = msgspec.msgpack.encode(unsigned)
    signature = private_key.sign(SIGNING_CONTEXT + payload)
    return msgspec.msgpack.encode({**unsigned, "signature": signature})


def run(raw: bytes | None, *, applied_seq: int = 0, now: datetime = NOW, **kw: Any) -> Decision:
    decision = decide(
        raw,
        keys=kw.pop("keys", KEYS),
        group=kw.pop("group", GROUP),
        applied_seq=applied_seq,
        now=now,
        **kw,
    )
    assert_labels(decision)
    return decision


def assert_labels(decision: Decision) -> None:
    """Every decision has bounded metrics label values."""
    assert decision.outcome in OUTCOMES
    assert decision.kind in (*KINDS, KIND_UNKNOWN)
    if isinstance(decision, Reject):
        assert decision.reason in REASONS
        assert decision.reason != "internal_error", decision.detail
        assert isinstance(decision.detail, str)
        assert decision.detail


def rejected(decision: Decision) -> Reject:
    assert isinstance(decision, Reject), decision
    return decision


# --- commands -----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS, ids=command_kind)
def test_every_command_kind_round_trips_through_a_signed_envelope(command: Command) -> None:
    decision = run(wire(command))
    assert isinstance(decision, Apply)
    assert decision.envelope.command == command
    assert decision.envelope == make(command)
    assert decision.kind == command_kind(command)


def test_the_command_tags_are_the_contract() -> None:
    assert KINDS == (
        "activate",
        "deactivate",
        "assign",
        "checkpoint",
        "rollback_version",
        "rollback_checkpoint",
    )
    assert {command_kind(c) for c in COMMANDS} == set(KINDS)


@pytest.mark.parametrize("command", COMMANDS, ids=command_kind)
def test_a_command_on_the_wire_is_a_map_tagged_by_kind(command: Command) -> None:
    as_map = msgspec.msgpack.decode(msgspec.msgpack.encode(command))
    assert next(iter(as_map)) == "kind"
    assert as_map["kind"] == command_kind(command)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(command), type=Command) == command


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: Activate(streams=("no-such-stream",)), id="malformed-stream"),
        pytest.param(lambda: Deactivate(streams=("states", "states")), id="stream-twice"),
        pytest.param(lambda: Assign(version=1, streams=("states", "No")), id="assign-malformed"),
    ],
)
def test_stream_names_are_checked_when_a_command_is_built(build: Any) -> None:
    # The form of a name; whether the stream exists is the applying agent's catalog's to say
    # (test_a_stream_the_catalog_lacks_is_refused_when_applied).
    with pytest.raises(ValueError, match="stream"):
        build()


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(Activate(streams=()), id="no-streams"),
        pytest.param(Assign(version=0, streams=("states",)), id="version-0"),
        pytest.param(Assign(version=-3, streams=("states",)), id="version-negative"),
        pytest.param(
            Assign(version=1, streams=("states",), limits=BatchLimits(batch_max_records=0)),
            id="limit-0",
        ),
        pytest.param(
            Assign(version=1, streams=("states",), limits=BatchLimits(batch_max_bytes=-1)),
            id="limit-negative",
        ),
        pytest.param(
            Assign(version=1, streams=("states",), limits=BatchLimits(batch_max_wait_ms=2**31)),
            id="limit-huge",
        ),
        pytest.param(Checkpoint(name=""), id="name-empty"),
        pytest.param(Checkpoint(name="with space"), id="name-space"),
        pytest.param(Checkpoint(name="-leading-dash"), id="name-leading-dash"),
        pytest.param(Checkpoint(name="x" * 65), id="name-too-long"),
        pytest.param(Checkpoint(name="nightly;drop"), id="name-semicolon"),
        pytest.param(Checkpoint(name="nightly\n"), id="name-trailing-newline"),
        pytest.param(Checkpoint(name="caf\u00e9"), id="name-non-ascii"),
        pytest.param(RollbackVersion(to_version=0), id="rollback-version-0"),
        pytest.param(
            RollbackCheckpoint(to_checkpoint="ok", then="later"),  # type: ignore[arg-type]
            id="rollback-then",
        ),
        pytest.param(RollbackCheckpoint(to_checkpoint="", then="hold"), id="rollback-name"),
    ],
)
def test_sign_refuses_a_command_an_agent_would_refuse(command: Command) -> None:
    with pytest.raises(ControlError, match="cannot sign"):
        make(command)


def test_a_checkpoint_name_of_64_characters_is_fine() -> None:
    assert isinstance(run(wire(Checkpoint(name="a" * 64))), Apply)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        pytest.param({"seq": 0}, "cannot sign", id="seq-0"),
        pytest.param({"seq": MAX_SEQ + 1}, "cannot sign", id="seq-too-big"),
        pytest.param({"target": ""}, "cannot sign", id="target-empty"),
        pytest.param({"issuer": ""}, "cannot sign", id="issuer-empty"),
        pytest.param({"lifetime": timedelta(0)}, "not after", id="no-lifetime"),
        pytest.param({"lifetime": timedelta(seconds=-1)}, "not after", id="negative-lifetime"),
        pytest.param({"issued_at": datetime(2025, 6, 1)}, "aware", id="naive"),
    ],
)
def test_sign_refuses_a_bad_envelope(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ControlError, match=match):
        make(**overrides)


def test_control_errors_are_pipeline_errors() -> None:
    assert issubclass(ControlError, PipelineError)


# --- canonical encoding -------------------------------------------------------------------------

# The wire bytes of one fixed envelope: any change to the encoding, the field order or the
# signing shows here. Envelopes already in a log keep verifying whatever happens (agents
# verify the bytes received), but every orchestrator and agent must agree on new ones.
GOLDEN_WIRE = (
    "89aa636f6d6d616e645f6964d92436663163326137652d336234642d346335652d386639302d613162326333"
    "643465356636a373657101a6746172676574a167a96973737565645f6174d6ff683c40c0aa65787069726573"
    "5f6174d6ff683c4318a6697373756572a16fa66b65795f6964b035363437356161373534363334373463a763"
    "6f6d6d616e6482a46b696e64aa636865636b706f696e74a46e616d65a76e696768746c79a97369676e617475"
    "7265c440485632ac11e3a1f491d0641e43819cb961e4c3fcb3cf73b167ba94a81e4b016cf40cc5d526d5d8ce"
    "217922b1b13c75707877d1e440a7bf8e542356a94d95250a"
)


def golden_envelope() -> Envelope:
    return make(Checkpoint(name="nightly"), seq=1, target="g", issuer="o")


def test_the_signed_payload_is_the_documented_map_in_declared_order() -> None:
    envelope = make(Assign(version=7, streams=("states", "config"), limits=LIMITS))
    payload = signed_payload(envelope)
    decoded = msgspec.msgpack.decode(payload)
    assert list(decoded) == [
        "command_id",
        "seq",
        "target",
        "issued_at",
        "expires_at",
        "issuer",
        "key_id",
        "command",
    ]
    assert list(decoded["command"]) == ["kind", "version", "streams", "limits"]
    assert list(decoded["command"]["limits"]) == [
        "batch_max_records",
        "batch_max_bytes",
        "batch_max_wait_ms",
    ]
    # Built by hand from plain values, the same bytes: the encoding is the documented one.
    by_hand = {
        **fields(),
        "command": {
            "kind": "assign",
            "version": 7,
            "streams": ["states", "config"],
            "limits": msgspec.structs.asdict(LIMITS),
        },
    }
    assert payload == msgspec.msgpack.encode(by_hand)
    assert encode_envelope(envelope) == signed_wire(by_hand)


def test_the_wire_is_the_signed_map_with_the_signature_last() -> None:
    envelope = make()
    raw = encode_envelope(envelope)
    decoded = msgspec.msgpack.decode(raw)
    assert list(decoded)[-1] == "signature"
    assert decoded["signature"] == envelope.signature
    assert len(envelope.signature) == 64
    rest = {k: v for k, v in decoded.items() if k != "signature"}
    assert msgspec.msgpack.encode(rest) == signed_payload(envelope)
    KEY.public_key().verify(envelope.signature, SIGNING_CONTEXT + signed_payload(envelope))


def test_the_encoding_is_stable() -> None:
    first = encode_envelope(golden_envelope())
    again = encode_envelope(golden_envelope())
    assert first == again
    assert first.hex() == GOLDEN_WIRE
    # Decoding the signed bytes and encoding them again gives the same bytes.
    payload = signed_payload(golden_envelope())
    assert signed_payload(msgspec.msgpack.decode(payload, type=UnsignedEnvelope)) == payload


def test_the_same_instant_in_another_offset_encodes_the_same() -> None:
    paris = timezone(timedelta(hours=2))
    assert signed_payload(make(issued_at=NOW)) == signed_payload(
        make(issued_at=NOW.astimezone(paris))
    )


CHANGES: list[tuple[str, dict[str, Any]]] = [
    ("command_id", {"command_id": uuid.UUID(int=COMMAND_ID.int + 1)}),
    ("seq", {"seq": 6}),
    ("target", {"target": GROUP + "-2"}),
    ("issued_at", {"issued_at": NOW + timedelta(microseconds=1)}),
    ("expires_at", {"expires_at": NOW + timedelta(minutes=10, microseconds=1)}),
    ("issuer", {"issuer": "someone-else"}),
    ("key_id", {"key_id": key_id(OTHER_KEY.public_key())}),
    ("command-kind", {"command": Activate(streams=("states",))}),
    ("checkpoint-name", {"command": Checkpoint(name="nightlz")}),
    ("assign-version", {"command": Assign(version=8, streams=("states", "config"))}),
    ("assign-stream-order", {"command": Assign(version=7, streams=("config", "states"))}),
    (
        "assign-limit",
        {"command": Assign(version=7, streams=("states", "config"), limits=LIMITS)},
    ),
    ("rollback-then", {"command": RollbackCheckpoint(to_checkpoint="n", then="hold")}),
]


@pytest.mark.parametrize(("field", "change"), CHANGES, ids=[c[0] for c in CHANGES])
def test_any_field_change_changes_the_signed_bytes(field: str, change: dict[str, Any]) -> None:
    base = UnsignedEnvelope(
        command_id=COMMAND_ID,
        seq=5,
        target=GROUP,
        issued_at=NOW,
        expires_at=NOW + timedelta(minutes=10),
        issuer="antigravity@test",
        key_id=key_id(KEY.public_key()),
        command=Assign(version=7, streams=("states", "config")),
    )
    if field == "rollback-then":
        base = msgspec.structs.replace(
            base, command=RollbackCheckpoint(to_checkpoint="n", then="reingest")
        )
    changed = msgspec.structs.replace(base, **change)
    assert signed_payload(base) != signed_payload(changed)
    assert signed_payload(base) == signed_payload(msgspec.structs.replace(base))


def test_a_changed_signature_changes_the_wire_but_not_the_signed_bytes() -> None:
    envelope = make()
    forged = msgspec.structs.replace(envelope, signature=bytes(64))
    assert signed_payload(forged) == signed_payload(envelope)
    assert encode_envelope(forged) != encode_envelope(envelope)


# --- keys ---------------------------------------------------------------------------------------


def test_key_id_is_sha256_of_the_raw_public_key() -> None:
    public = KEY.public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key_id(public) == hashlib.sha256(raw).hexdigest()[:16]
    assert len(key_id(public)) == 16
    assert key_id(public) != key_id(OTHER_KEY.public_key())
    assert make().key_id == key_id(public)


def test_generated_key_pairs_are_new_and_sign() -> None:
    private, public = generate_key_pair()
    other, _ = generate_key_pair()
    assert key_id(public) != key_id(other.public_key())
    envelope = make(private_key=private)
    assert isinstance(run(encode_envelope(envelope), keys=Verifier([public])), Apply)


def test_pem_round_trips() -> None:
    private_pem = private_key_to_pem(KEY)
    public_pem = public_key_to_pem(KEY.public_key())
    assert private_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public_pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    loaded = private_key_from_pem(private_pem)
    assert key_id(loaded.public_key()) == key_id(KEY.public_key())
    assert key_id(public_key_from_pem(public_pem)) == key_id(KEY.public_key())


X25519 = X25519PrivateKey.from_private_bytes(bytes(32))


@pytest.mark.parametrize(
    ("load", "data", "match"),
    [
        (private_key_from_pem, b"", "not an unencrypted PEM private key"),
        (private_key_from_pem, b"-----BEGIN PRIVATE KEY-----\nAAAA\n", "not an unencrypted"),
        (
            private_key_from_pem,
            KEY.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"password"),
            ),
            "not an unencrypted",
        ),
        (
            private_key_from_pem,
            X25519.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            "expected an Ed25519 private key",
        ),
        (private_key_from_pem, public_key_to_pem(KEY.public_key()), "not an unencrypted"),
        (public_key_from_pem, b"garbage", "not a PEM public key"),
        (public_key_from_pem, private_key_to_pem(KEY), "not a PEM public key"),
        (
            public_key_from_pem,
            X25519.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            "expected an Ed25519 public key",
        ),
    ],
    ids=[
        "private-empty",
        "private-truncated",
        "private-encrypted",
        "private-x25519",
        "private-is-public",
        "public-garbage",
        "public-is-private",
        "public-x25519",
    ],
)
def test_loading_a_wrong_key_is_a_control_error(load: Any, data: bytes, match: str) -> None:
    with pytest.raises(ControlError, match=match):
        load(data)


def test_key_files(tmp_path: Path) -> None:
    private_path = tmp_path / "control.key"
    public_path = tmp_path / "control.pub"
    other_path = tmp_path / "other.pub"
    write_private_key_file(private_path, KEY)
    write_public_key_file(public_path, KEY.public_key())
    write_public_key_file(other_path, OTHER_KEY.public_key())
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert key_id(read_private_key_file(private_path).public_key()) == key_id(KEY.public_key())
    assert key_id(read_public_key_file(public_path)) == key_id(KEY.public_key())
    verifier = read_verifier([public_path, other_path])
    assert set(verifier.key_ids) == {key_id(KEY.public_key()), key_id(OTHER_KEY.public_key())}
    with pytest.raises(FileExistsError):
        write_private_key_file(private_path, OTHER_KEY)
    with pytest.raises(FileExistsError):
        write_public_key_file(public_path, OTHER_KEY.public_key())
    assert key_id(read_private_key_file(private_path).public_key()) == key_id(KEY.public_key())


def test_a_verifier_files_keys_by_their_own_id() -> None:
    verifier = Verifier([KEY.public_key(), OTHER_KEY.public_key(), KEY.public_key()])
    assert verifier.key_ids == (key_id(KEY.public_key()), key_id(OTHER_KEY.public_key()))
    assert key_id(KEY.public_key()) in verifier
    assert key_id(UNTRUSTED_KEY.public_key()) not in verifier
    assert "not-a-key-id" not in verifier
    message = b"message"
    assert verifier.verify(key_id(KEY.public_key()), message, KEY.sign(message))
    assert not verifier.verify(key_id(OTHER_KEY.public_key()), message, KEY.sign(message))
    assert not verifier.verify(key_id(UNTRUSTED_KEY.public_key()), message, b"")
    assert not verifier.verify(key_id(KEY.public_key()), message, KEY.sign(message)[:-1])


# --- decide: each check -------------------------------------------------------------------------


def test_a_good_envelope_applies() -> None:
    decision = run(wire())
    assert isinstance(decision, Apply)
    assert decision.outcome == "applied"
    assert decision.envelope.signature == make().signature


def test_a_forged_envelope_is_rejected() -> None:
    # Signed by an untrusted key but claiming the trusted key's id.
    forged = signed_wire(fields(), private_key=UNTRUSTED_KEY)
    reject = rejected(run(forged))
    assert (reject.reason, reject.kind) == ("bad_signature", "checkpoint")
    assert (reject.command_id, reject.seq, reject.target) == (COMMAND_ID, 5, GROUP)


def test_a_signature_by_the_right_key_over_other_bytes_is_rejected() -> None:
    envelope = make()
    other = make(seq=6)
    spliced = encode_envelope(msgspec.structs.replace(envelope, signature=other.signature))
    assert rejected(run(spliced)).reason == "bad_signature"


def test_a_signature_without_the_context_is_rejected() -> None:
    unsigned = fields()
    payload = msgspec.msgpack.encode(unsigned)
    raw = msgspec.msgpack.encode({**unsigned, "signature": KEY.sign(payload)})
    assert rejected(run(raw)).reason == "bad_signature"


@pytest.mark.parametrize(
    "signature",
    [b"", bytes(64), bytes(63), bytes(65), b"\xff" * 64],
    ids=["empty", "zeros", "short", "long", "ones"],
)
def test_a_wrong_signature_value_is_rejected(signature: bytes) -> None:
    raw = msgspec.msgpack.encode({**fields(), "signature": signature})
    assert rejected(run(raw)).reason == "bad_signature"


def test_an_unknown_key_id_is_rejected() -> None:
    raw = wire(private_key=UNTRUSTED_KEY)
    reject = rejected(run(raw))
    assert (reject.reason, reject.kind, reject.seq) == ("unknown_key", "checkpoint", 5)
    assert key_id(UNTRUSTED_KEY.public_key()) in reject.detail


def test_two_keys_during_a_rotation() -> None:
    both = Verifier([KEY.public_key(), OTHER_KEY.public_key()])
    old = wire(seq=5, private_key=KEY)
    new = wire(seq=6, private_key=OTHER_KEY)
    assert isinstance(run(old, keys=both), Apply)
    assert isinstance(run(new, keys=both), Apply)
    assert isinstance(run(new, keys=both, applied_seq=5), Apply)
    after = Verifier([OTHER_KEY.public_key()])
    assert rejected(run(old, keys=after)).reason == "unknown_key"
    assert isinstance(run(new, keys=after), Apply)
    before = Verifier([KEY.public_key()])
    assert rejected(run(new, keys=before)).reason == "unknown_key"
    # A message signed by one trusted key but labelled with the other is a forgery.
    relabelled = signed_wire(fields(key_id=key_id(KEY.public_key())), private_key=OTHER_KEY)
    assert rejected(run(relabelled, keys=both)).reason == "bad_signature"


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (NOW, "applied"),
        (NOW + timedelta(minutes=10) - timedelta(microseconds=1), "applied"),
        (NOW + timedelta(minutes=10), "expired"),
        (NOW + timedelta(days=365), "expired"),
        (NOW - timedelta(minutes=5), "applied"),  # issued exactly the allowed skew ahead
        (NOW - timedelta(minutes=5, microseconds=1), "not_yet_valid"),
        (NOW - timedelta(days=1), "not_yet_valid"),
    ],
    ids=[
        "at-issue",
        "last-microsecond",
        "at-expiry",
        "long-after",
        "skew-limit",
        "past-skew",
        "a-day-early",
    ],
)
def test_time_checks(now: datetime, expected: str) -> None:
    decision = run(wire(), now=now)
    assert getattr(decision, "reason", decision.outcome) == expected


def test_the_allowed_clock_skew_is_a_parameter() -> None:
    early = NOW - timedelta(minutes=1)
    assert rejected(run(wire(), now=early, max_clock_skew=timedelta(0))).reason == ("not_yet_valid")
    assert isinstance(run(wire(), now=early, max_clock_skew=timedelta(minutes=1)), Apply)


def test_now_in_another_offset_is_the_same_instant() -> None:
    tokyo = timezone(timedelta(hours=9))
    expiry = (NOW + timedelta(minutes=10)).astimezone(tokyo)
    assert rejected(run(wire(), now=expiry)).reason == "expired"
    assert isinstance(run(wire(), now=expiry - timedelta(seconds=1)), Apply)


@pytest.mark.parametrize(
    ("applied_seq", "expected"),
    [(0, "applied"), (4, "applied"), (5, "stale_seq"), (6, "stale_seq"), (MAX_SEQ, "stale_seq")],
    ids=["none-applied", "next", "replayed", "older", "max"],
)
def test_seq_must_be_above_the_applied_one(applied_seq: int, expected: str) -> None:
    decision = run(wire(seq=5), applied_seq=applied_seq)
    assert getattr(decision, "reason", decision.outcome) == expected


def test_gaps_in_seq_are_fine() -> None:
    assert isinstance(run(wire(seq=1000), applied_seq=5), Apply)


def test_replaying_the_same_bytes_after_applying_them_is_rejected() -> None:
    raw = wire(seq=9)
    decision = run(raw, applied_seq=8)
    assert isinstance(decision, Apply)
    replay = rejected(run(raw, applied_seq=decision.envelope.seq))
    assert (replay.reason, replay.command_id, replay.seq) == ("stale_seq", COMMAND_ID, 9)


def test_another_groups_command_is_ignored_not_rejected() -> None:
    decision = run(wire(target="another-group"))
    assert isinstance(decision, Ignore)
    assert decision.outcome == "ignored"
    assert decision.kind == "checkpoint"
    assert decision.envelope.target == "another-group"
    # Its seq is another sequence: ours does not make it stale.
    assert isinstance(run(wire(target="another-group", seq=1), applied_seq=99), Ignore)


def test_a_forged_envelope_for_another_group_is_still_a_forgery() -> None:
    forged = signed_wire(fields(target="another-group"), private_key=UNTRUSTED_KEY)
    assert rejected(run(forged)).reason == "bad_signature"


def test_an_unknown_kind_correctly_signed_is_rejected_as_unknown_kind() -> None:
    raw = signed_wire(fields(command={"kind": "reboot", "when": "now"}))
    reject = rejected(run(raw))
    assert (reject.reason, reject.kind) == ("unknown_kind", KIND_UNKNOWN)
    assert "reboot" in reject.detail
    assert (reject.command_id, reject.seq) == (COMMAND_ID, 5)


def test_a_long_unknown_kind_is_not_repeated_in_full() -> None:
    raw = signed_wire(fields(command={"kind": "x" * 10_000}))
    reject = rejected(run(raw))
    assert reject.reason == "unknown_kind"
    assert len(reject.detail) <= 200


@pytest.mark.parametrize(
    "command",
    [
        {"kind": "activate", "streams": ["no-such-stream"]},
        {"kind": "activate", "streams": []},
        {"kind": "activate", "streams": ["states", "states"]},
        {"kind": "activate"},
        {"kind": "deactivate", "streams": "states"},
        {"kind": "assign", "version": 0, "streams": ["states"]},
        {"kind": "assign", "version": 1, "streams": ["states"], "limits": {"batch_max_bytes": 0}},
        {"kind": "assign", "version": 1, "streams": ["states"], "limits": [1, 2, 3]},
        {"kind": "checkpoint", "name": "../etc"},
        {"kind": "checkpoint", "name": 5},
        {"kind": "checkpoint", "name": "nightly\n"},
        {"kind": "rollback_version", "to_version": "1"},
        {"kind": "rollback_version", "to_version": 2**64 - 1},
        {"kind": "rollback_checkpoint", "to_checkpoint": "n", "then": "explode"},
        {"kind": "rollback_checkpoint", "to_checkpoint": "n"},
    ],
    ids=lambda c: "-".join(str(v)[:12] for v in c.values()),
)
def test_a_signed_command_with_invalid_fields_is_rejected_as_invalid(
    command: dict[str, Any],
) -> None:
    reject = rejected(run(signed_wire(fields(command=command))))
    assert (reject.reason, reject.kind) == ("invalid_command", command["kind"])
    assert (reject.command_id, reject.seq, reject.target) == (COMMAND_ID, 5, GROUP)


def test_unknown_fields_are_ignored_and_still_signed() -> None:
    newer = fields(
        priority="high",
        command={"kind": "activate", "streams": ["states"], "reason": "incident 42"},
    )
    decision = run(signed_wire(newer))
    assert isinstance(decision, Apply)
    assert decision.envelope.command == Activate(streams=("states",))
    # The unknown field is covered by the signature: changing it breaks the signature.
    tampered = msgspec.msgpack.decode(signed_wire(newer))
    tampered["priority"] = "low"
    assert rejected(run(msgspec.msgpack.encode(tampered))).reason == "bad_signature"


def test_fields_in_another_order_verify_as_sent() -> None:
    # Agents verify the bytes received: a sender's field order is its own business.
    reordered = dict(reversed(list(fields().items())))
    assert isinstance(run(signed_wire(reordered)), Apply)


def test_what_is_applied_is_what_was_signed_even_with_a_duplicated_key() -> None:
    # A MessagePack map may repeat a key: the last one wins, at the place of the first. The
    # signature is checked over the map so read, and the envelope decoded from the very bytes
    # checked, so a repeated key either breaks the signature or changes nothing.
    unsigned = msgspec.msgpack.encode(fields(seq=5))
    signature = KEY.sign(SIGNING_CONTEXT + unsigned)
    command_id = msgspec.msgpack.encode("command_id") + msgspec.msgpack.encode(str(COMMAND_ID))
    rest = unsigned[1 + len(command_id) :]  # the entries after command_id, seq first
    assert unsigned[1:].startswith(command_id)
    forged = msgspec.msgpack.encode("seq") + msgspec.msgpack.encode(999)
    sig = msgspec.msgpack.encode("signature") + msgspec.msgpack.encode(signature)
    header = bytes([0x80 | 10])
    before = header + command_id + forged + rest + sig  # the signed seq wins
    first = header + forged + command_id + rest + sig  # seq moves first: not what was signed
    after = header + command_id + rest + forged + sig  # the forged seq wins: not signed
    decision = run(before)
    assert isinstance(decision, Apply)
    assert decision.envelope.seq == 5
    assert rejected(run(first)).reason == "bad_signature"
    assert rejected(run(after)).reason == "bad_signature"


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        (None, "tombstone"),
        (b"", "empty"),
        (b"\x00", "zero"),
        (b"\xc1", "never-used-byte"),
        (b"\xff" * 32, "ones"),
        (b"\x80", "empty-map"),
        (msgspec.msgpack.encode(5), "int"),
        (msgspec.msgpack.encode(2**64 - 1), "huge-int"),
        (msgspec.msgpack.encode(-(2**63)), "huge-negative"),
        (msgspec.msgpack.encode(1e308), "float"),
        (msgspec.msgpack.encode("envelope"), "str"),
        (msgspec.msgpack.encode([1, 2, 3]), "array"),
        (msgspec.msgpack.encode(None), "nil"),
        (msgspec.msgpack.encode(True), "bool"),
        (msgspec.msgpack.encode(b"\x00" * 64), "bin"),
        (msgspec.msgpack.encode(msgspec.msgpack.Ext(5, b"x")), "ext"),
        (msgspec.msgpack.encode({1: 2}), "int-keys"),
        (msgspec.msgpack.encode({"signature": bytes(64)}), "signature-only"),
        (msgspec.msgpack.encode(fields()), "no-signature"),
        (msgspec.json.encode({**fields(), "signature": "AAAA"}), "json"),
        (b'{"seq": 1e999999, "target": "' + b"9" * 5000 + b'"}', "json-huge-number"),
        (b"\x81\xa9signature" + b"\x91" * 60_000 + b"\xc0", "deeply-nested"),
        (b"\xdf\xff\xff\xff\xff", "map-claims-4G-entries"),
        (b"\xc6\xff\xff\xff\xff" + b"x" * 10, "bin-claims-4GB"),
        (bytes(MAX_ENVELOPE_BYTES + 1), "oversize"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_garbage_is_undecodable(raw: bytes | None, name: str) -> None:
    reject = rejected(run(raw))
    assert (reject.reason, reject.kind) == ("undecodable", KIND_UNKNOWN), name
    assert len(reject.detail) <= 200


@pytest.mark.parametrize(
    "overrides",
    [
        {"command_id": "not-a-uuid"},
        {"command_id": 5},
        {"seq": 0},
        {"seq": -1},
        {"seq": 2**64 - 1},
        {"seq": MAX_SEQ + 1},
        {"seq": "5"},
        {"seq": 5.0},
        {"target": ""},
        {"target": "g" * 256},
        {"target": None},
        {"issued_at": "2025-06-01T12:00:00"},  # naive
        {"issued_at": 1_748_779_200},
        {"expires_at": None},
        {"issuer": ""},
        {"key_id": "ABCDEF0123456789"},
        {"key_id": "0123"},
        {"key_id": key_id(KEY.public_key()) + "\n"},
        {"key_id": 5},
        {"command": 5},
        {"command": []},
        {"command": {"name": "nightly"}},
        {"command": {"kind": 5, "name": "nightly"}},
        {"command": {"kind": None}},
    ],
    ids=lambda o: "-".join(f"{k}={str(v)[:10]}" for k, v in o.items()),
)
def test_an_envelope_of_the_wrong_shape_is_undecodable_even_if_signed(
    overrides: dict[str, Any],
) -> None:
    reject = rejected(run(signed_wire(fields(**overrides))))
    assert (reject.reason, reject.kind) == ("undecodable", KIND_UNKNOWN)


@pytest.mark.parametrize("missing", list(fields()))
def test_an_envelope_missing_a_field_is_undecodable(missing: str) -> None:
    unsigned = {k: v for k, v in fields().items() if k != missing}
    assert rejected(run(signed_wire(unsigned))).reason == "undecodable"


def test_an_undecodable_envelope_still_names_its_command_and_seq_when_it_can() -> None:
    reject = rejected(run(signed_wire(fields(issued_at="yesterday"))))
    assert (reject.reason, reject.command_id, reject.seq) == ("undecodable", COMMAND_ID, 5)
    reject = rejected(run(msgspec.msgpack.encode(fields(seq="x"))))
    assert (reject.command_id, reject.seq) == (COMMAND_ID, None)


def test_trailing_bytes_are_undecodable() -> None:
    assert rejected(run(wire() + b"\x00")).reason == "undecodable"


def test_a_signature_that_is_not_bytes_is_undecodable() -> None:
    raw = msgspec.msgpack.encode({**fields(), "signature": "a string"})
    assert rejected(run(raw)).reason == "undecodable"


# The checks' order: each row fails its own check and every later one it can.
ORDER: list[tuple[str, bytes, dict[str, Any], str]] = [
    (
        "unknown-kind-before-key",
        signed_wire(
            fields(command={"kind": "reboot"}, key_id=key_id(UNTRUSTED_KEY.public_key())),
            private_key=OTHER_KEY,
        ),
        {"now": NOW + timedelta(days=1), "applied_seq": 9},
        "unknown_kind",
    ),
    (
        "unknown-key-before-signature",
        signed_wire(
            fields(key_id=key_id(UNTRUSTED_KEY.public_key()), target="other"),
            private_key=OTHER_KEY,
        ),
        {"now": NOW + timedelta(days=1), "applied_seq": 9},
        "unknown_key",
    ),
    (
        "signature-before-invalid-command",
        signed_wire(fields(command={"kind": "activate", "streams": ["no-such-stream"]}), OTHER_KEY),
        {"now": NOW + timedelta(days=1), "applied_seq": 9},
        "bad_signature",
    ),
    (
        "invalid-command-before-expiry",
        signed_wire(
            fields(command={"kind": "activate", "streams": ["no-such-stream"]}, target="other")
        ),
        {"now": NOW + timedelta(days=1), "applied_seq": 9},
        "invalid_command",
    ),
    (
        "expiry-before-group",
        wire(target="other"),
        {"now": NOW + timedelta(days=1), "applied_seq": 9},
        "expired",
    ),
    (
        "not-yet-valid-before-group",
        wire(target="other"),
        {"now": NOW - timedelta(days=1), "applied_seq": 9},
        "not_yet_valid",
    ),
    ("group-before-seq", wire(target="other"), {"applied_seq": 9}, "ignored"),
    ("seq-last", wire(), {"applied_seq": 9}, "stale_seq"),
]


@pytest.mark.parametrize(
    ("raw", "kw", "expected"), [o[1:] for o in ORDER], ids=[o[0] for o in ORDER]
)
def test_the_checks_run_in_the_documented_order(
    raw: bytes, kw: dict[str, Any], expected: str
) -> None:
    decision = run(raw, **kw)
    assert getattr(decision, "reason", decision.outcome) == expected


def test_a_callers_mistake_is_an_error_not_a_decision() -> None:
    with pytest.raises(ValueError, match="aware"):
        decide(wire(), keys=KEYS, group=GROUP, applied_seq=0, now=datetime(2025, 6, 1))
    with pytest.raises(ValueError, match="applied_seq"):
        decide(wire(), keys=KEYS, group=GROUP, applied_seq=-1, now=NOW)


class _BrokenVerifier(Verifier):
    def verify(self, key_id: str, message: bytes, signature: bytes) -> bool:
        raise RuntimeError("a bug")


def test_a_bug_is_an_internal_error_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = _BrokenVerifier([KEY.public_key()])
    decision = decide(wire(), keys=broken, group=GROUP, applied_seq=0, now=NOW)
    assert isinstance(decision, Reject)
    assert (decision.reason, decision.kind) == ("internal_error", KIND_UNKNOWN)
    assert "RuntimeError: a bug" in decision.detail

    def boom(*args: Any) -> Decision:
        raise ZeroDivisionError("another bug")

    monkeypatch.setattr(control, "_check", boom)
    decision = decide(wire(), keys=KEYS, group=GROUP, applied_seq=0, now=NOW)
    assert isinstance(decision, Reject)
    assert (decision.reason, decision.kind, decision.seq) == ("internal_error", "checkpoint", 5)


def test_verify_checks_only_form_kind_key_and_signature() -> None:
    expired_other_group = wire(target="other", seq=1)
    envelope = verify(expired_other_group, keys=KEYS)
    assert isinstance(envelope, Envelope)
    assert envelope == make(target="other", seq=1)
    assert isinstance(verify(b"", keys=KEYS), Reject)


def test_the_reason_codes_are_a_small_fixed_set() -> None:
    assert REASONS == (
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
    )
    assert OUTCOMES == ("applied", "rejected", "ignored")


# --- helpers ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("highest", "expected"), [(0, 1), (1, 2), (41, 42), (MAX_SEQ - 1, MAX_SEQ)]
)
def test_next_seq(highest: int, expected: int) -> None:
    assert next_seq(highest) == expected


@pytest.mark.parametrize("highest", [-1, MAX_SEQ])
def test_no_next_seq(highest: int) -> None:
    with pytest.raises(ControlError):
        next_seq(highest)


def test_highest_seq_counts_only_our_groups_verified_envelopes() -> None:
    log = [
        wire(seq=3),
        wire(seq=7, issued_at=NOW - timedelta(days=30)),  # long expired: still counts
        wire(seq=5),
        wire(seq=100, target="other"),
        signed_wire(fields(seq=1000), private_key=UNTRUSTED_KEY),  # forged
        wire(seq=2000, private_key=UNTRUSTED_KEY),  # unknown key
        signed_wire(fields(seq=3000, command={"kind": "reboot"})),  # not a command we know
        b"garbage",
        None,
    ]
    assert highest_seq(log, keys=KEYS, group=GROUP) == 7
    assert highest_seq(log, keys=KEYS, group="other") == 100
    assert highest_seq([], keys=KEYS, group=GROUP) == 0
    assert next_seq(highest_seq(log, keys=KEYS, group=GROUP)) == 8


HISTORY: dict[int, tuple[tuple[str, ...], BatchLimits]] = {
    1: (("states", "events"), BatchLimits()),
    2: (("states",), LIMITS),
    4: (("config",), BatchLimits(batch_max_wait_ms=10)),
}


@pytest.mark.parametrize(
    ("to_version", "current", "expected"),
    [
        (1, 4, Assign(version=5, streams=("states", "events"))),
        (2, 4, Assign(version=5, streams=("states",), limits=LIMITS)),
        (2, 9, Assign(version=10, streams=("states",), limits=LIMITS)),
        (4, 4, Assign(version=5, streams=("config",), limits=BatchLimits(batch_max_wait_ms=10))),
    ],
)
def test_rollback_plan_copies_the_old_assignment_as_a_new_version(
    to_version: int, current: int, expected: Assign
) -> None:
    plan = rollback_plan(
        RollbackVersion(to_version=to_version), history=HISTORY, current_version=current
    )
    assert plan == expected


@pytest.mark.parametrize(
    ("to_version", "current", "match"),
    [(3, 4, "no assignment version 3"), (5, 4, "current version is 4"), (1, 0, "current")],
)
def test_rollback_plan_refuses_an_unknown_version(
    to_version: int, current: int, match: str
) -> None:
    with pytest.raises(ControlError, match=match):
        rollback_plan(
            RollbackVersion(to_version=to_version), history=HISTORY, current_version=current
        )


def test_a_rollback_plan_can_be_signed_and_applied() -> None:
    plan = rollback_plan(RollbackVersion(to_version=2), history=HISTORY, current_version=4)
    assert isinstance(run(wire(plan)), Apply)


@pytest.mark.parametrize(
    ("active", "command", "expected"),
    [
        ((), Activate(streams=("states",)), ("states",)),
        (("config", "states"), Activate(streams=("events",)), ("states", "events", "config")),
        (("states",), Activate(streams=("states",)), ("states",)),
        (("states", "events"), Deactivate(streams=("states",)), ("events",)),
        (("events",), Deactivate(streams=("states",)), ("events",)),
        (("events",), Deactivate(streams=("events",)), ()),
        (
            tuple(STREAM_BY_NAME),
            Deactivate(streams=("metrics", "analytics")),
            ("states", "events", "config"),
        ),
    ],
)
def test_streams_after(
    active: tuple[str, ...], command: Activate | Deactivate, expected: tuple[str, ...]
) -> None:
    assert streams_after(active, command, BUILTIN) == expected


# --- status messages ----------------------------------------------------------------------------

HEARTBEAT = Heartbeat(
    instance_id="agent-1",
    group=GROUP,
    state="running",
    applied_seq=12,
    assignment_version=3,
    active_streams=("states", "events"),
    owned_partitions=(("agents.states", 0), ("agents.events", 5)),
    lag=1234,
    last_error="",
    at=NOW,
)
ACK = Ack(
    command_id=COMMAND_ID,
    seq=12,
    kind="assign",
    instance_id="agent-1",
    group=GROUP,
    outcome="rejected",
    reason="stale_seq",
    detail="seq 12 is not above applied 12",
    at=NOW,
)


@pytest.mark.parametrize("message", [HEARTBEAT, ACK], ids=["heartbeat", "ack"])
def test_status_messages_round_trip_as_json(message: Heartbeat | Ack) -> None:
    raw = encode_status(message)
    assert decode_status(raw) == message
    as_json = msgspec.json.decode(raw)
    assert as_json["type"] == type(message).__name__.lower()


def test_a_heartbeat_on_the_wire() -> None:
    as_json = msgspec.json.decode(encode_status(HEARTBEAT))
    assert as_json["owned_partitions"] == [["agents.states", 0], ["agents.events", 5]]
    assert as_json["at"] == "2025-06-01T12:00:00Z"
    assert as_json["state"] == "running"


def test_status_messages_ignore_unknown_fields() -> None:
    as_json = msgspec.json.decode(encode_status(HEARTBEAT))
    as_json["cpu"] = 0.5
    assert decode_status(msgspec.json.encode(as_json)) == HEARTBEAT


def test_a_heartbeat_of_an_older_agent_has_no_metrics_address() -> None:
    as_json = msgspec.json.decode(encode_status(HEARTBEAT))
    del as_json["metrics_address"]
    assert decode_status(msgspec.json.encode(as_json)) == HEARTBEAT
    with_address = msgspec.structs.replace(HEARTBEAT, metrics_address="10.0.0.7:9108")
    assert decode_status(encode_status(with_address)) == with_address


def test_an_ack_without_reason_or_detail_decodes() -> None:
    as_json = msgspec.json.decode(encode_status(ACK))
    del as_json["reason"], as_json["detail"]
    assert decode_status(msgspec.json.encode(as_json)).reason == ""  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"[]",
        b'{"type": "telemetry"}',
        msgspec.json.encode({**msgspec.structs.asdict(HEARTBEAT), "type": "heartbeat", "lag": -1}),
        msgspec.json.encode(
            {**msgspec.structs.asdict(HEARTBEAT), "type": "heartbeat", "state": "x"}
        ),
        msgspec.json.encode({**msgspec.structs.asdict(ACK), "type": "ack", "outcome": "ignored"}),
        msgspec.json.encode({"type": "heartbeat", "instance_id": "agent-1"}),
        b"[" * 100_000,
    ],
    ids=["empty", "text", "array", "unknown-type", "lag", "state", "outcome", "partial", "deep"],
)
def test_a_bad_status_message_is_a_control_error(raw: bytes) -> None:
    with pytest.raises(ControlError, match="not a status message"):
        decode_status(raw)


def test_acks_for_decisions() -> None:
    decision = run(wire(Assign(version=2, streams=("states",)), seq=12))
    assert isinstance(decision, Apply)
    applied = to_ack(decision, instance_id="agent-1", group=GROUP, at=NOW)
    assert applied == Ack(
        command_id=COMMAND_ID,
        seq=12,
        kind="assign",
        instance_id="agent-1",
        group=GROUP,
        outcome="applied",
        at=NOW,
    )
    failed = apply_failed(decision.envelope, "no assignment version 9 in history")
    assert_labels(failed)
    assert to_ack(failed, instance_id="agent-1", group=GROUP, at=NOW) == msgspec.structs.replace(
        applied, outcome="rejected", reason="apply_failed", detail=failed.detail
    )
    garbage = rejected(run(b"garbage"))
    ack = to_ack(garbage, instance_id="agent-1", group=GROUP, at=NOW)
    assert (ack.command_id, ack.seq, ack.kind, ack.reason) == (
        None,
        None,
        KIND_UNKNOWN,
        "undecodable",
    )
    assert decode_status(encode_status(ack)) == ack


# -- streams of a user's catalog -------------------------------------------------------------

# The names of a catalog with a user stream after the built-in ones (catalog order).
WITH_ORDERS = (*BUILTIN, "orders")


def test_a_catalog_stream_is_activated_and_kept_in_catalog_order() -> None:
    command = Activate(streams=("orders", "events"))
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(command), type=Command) == command
    state = GroupState(active_streams=("config",))
    after, assign = next_state(state, command, history={}, catalog=WITH_ORDERS)
    assert assign is None
    assert after.active_streams == ("events", "config", "orders")
    after, _ = next_state(after, Deactivate(streams=("config",)), history={}, catalog=WITH_ORDERS)
    assert after.active_streams == ("events", "orders")


def test_an_assignment_of_catalog_streams_is_in_catalog_order() -> None:
    after, assign = next_state(
        GroupState(),
        Assign(version=1, streams=("orders", "states")),
        history={},
        catalog=WITH_ORDERS,
    )
    assert assign == Assign(version=1, streams=("orders", "states"))
    assert after.active_streams == ("states", "orders")
    assert after.assignment_version == 1


def test_every_catalog_stream_is_active_until_a_command_names_them() -> None:
    assert GroupState().active(WITH_ORDERS) == WITH_ORDERS
    assert GroupState(active_streams=("orders",)).active(WITH_ORDERS) == ("orders",)


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(Activate(streams=("events", "orders")), id="activate"),
        pytest.param(Deactivate(streams=("orders",)), id="deactivate"),
        pytest.param(Assign(version=3, streams=("orders",)), id="assign"),
    ],
)
def test_a_stream_the_catalog_lacks_is_refused_when_applied(command: Command) -> None:
    state = GroupState(assignment_version=2, active_streams=("events",))
    with pytest.raises(ControlError, match=r"unknown stream\(s\) orders: this agent's catalog has"):
        next_state(state, command, history={}, catalog=BUILTIN)


def test_a_rollback_to_an_assignment_of_a_stream_the_catalog_lacks_is_refused() -> None:
    history = {1: (("orders",), BatchLimits())}
    state = GroupState(assignment_version=2)
    with pytest.raises(ControlError, match=r"unknown stream\(s\) orders"):
        next_state(state, RollbackVersion(to_version=1), history=history, catalog=BUILTIN)
    after, plan = next_state(
        state, RollbackVersion(to_version=1), history=history, catalog=WITH_ORDERS
    )
    assert plan == Assign(version=3, streams=("orders",))
    assert after.active_streams == ("orders",)


def test_a_stream_another_instances_catalog_added_is_kept() -> None:
    # During a rolling restart, an agent with the older catalog applies a command: the active
    # stream it does not know stays active for the agents that do.
    state = GroupState(active_streams=("events", "orders"))
    after, _ = next_state(state, Activate(streams=("states",)), history={}, catalog=BUILTIN)
    assert after.active_streams == ("states", "events", "orders")
