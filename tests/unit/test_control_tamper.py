"""Tampered, truncated and random control messages: ``decide`` never raises, never applies
what was not signed, and always gives one of its reasons.

The random inputs here come from a seeded generator: the same cases run every time, and a
failure names its seed and case number. test_fuzz_control.py decides 100,000 more, generated
by hypothesis.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import msgspec

from pipeline.control import (
    Activate,
    Apply,
    Assign,
    BatchLimits,
    Checkpoint,
    Deactivate,
    Envelope,
    Ignore,
    Reject,
    RollbackCheckpoint,
    RollbackVersion,
    Verifier,
    encode_envelope,
    highest_seq,
)
from tests.unit.test_control import (
    GROUP,
    KEY,
    NOW,
    OTHER_KEY,
    assert_labels,
    fields,
    make,
    run,
    signed_wire,
)

SEED = 20250601

# Small and varied: every command kind, both keys, short and long fields.
SAMPLES: list[Envelope] = [
    make(Checkpoint(name="n"), seq=1, target="g", issuer="o"),
    make(Activate(streams=("states", "events")), seq=2),
    make(Deactivate(streams=("config",)), seq=3, private_key=OTHER_KEY),
    make(
        Assign(version=9, streams=("metrics",), limits=BatchLimits(batch_max_records=10)),
        seq=2**40,
    ),
    make(RollbackVersion(to_version=2), seq=4),
    make(RollbackCheckpoint(to_checkpoint="before-upgrade", then="hold"), seq=5),
]
BOTH_KEYS = Verifier([KEY.public_key(), OTHER_KEY.public_key()])


def decide_all(raw: bytes | None, **kw: Any) -> Any:
    return run(raw, keys=BOTH_KEYS, group=kw.pop("group", GROUP), **kw)


def test_every_single_byte_change_of_a_small_envelope_is_rejected() -> None:
    envelope = SAMPLES[0]
    raw = encode_envelope(envelope)
    assert isinstance(decide_all(raw, group="g"), Apply)
    accepted = []
    reasons: set[str] = set()
    for position in range(len(raw)):
        for value in range(256):
            if value == raw[position]:
                continue
            changed = raw[:position] + bytes([value]) + raw[position + 1 :]
            decision = decide_all(changed, group="g")
            if not isinstance(decision, Reject):
                accepted.append((position, value, decision))
            else:
                reasons.add(decision.reason)
    assert accepted == []
    # The changes land in every part of the envelope, and each part has its own check.
    assert reasons == {"undecodable", "unknown_kind", "unknown_key", "bad_signature"}


def test_every_truncation_and_extension_is_rejected() -> None:
    for envelope in SAMPLES:
        raw = encode_envelope(envelope)
        group = envelope.target
        for length in range(len(raw)):
            assert isinstance(decide_all(raw[:length], group=group), Reject), length
        for extra in (b"\x00", b"\xc0", raw):
            assert isinstance(decide_all(raw + extra, group=group), Reject)


def _mutations(rng: random.Random) -> list[Callable[[bytes], bytes]]:
    def replace(b: bytes) -> bytes:
        i = rng.randrange(len(b))
        return b[:i] + bytes([rng.randrange(256)]) + b[i + 1 :]

    def flip(b: bytes) -> bytes:
        i = rng.randrange(len(b))
        return b[:i] + bytes([b[i] ^ (1 << rng.randrange(8))]) + b[i + 1 :]

    def insert(b: bytes) -> bytes:
        i = rng.randrange(len(b) + 1)
        return b[:i] + rng.randbytes(rng.randint(1, 8)) + b[i:]

    def delete(b: bytes) -> bytes:
        i = rng.randrange(len(b))
        return b[:i] + b[i + rng.randint(1, 16) :]

    def duplicate(b: bytes) -> bytes:
        i = rng.randrange(len(b))
        piece = b[i : i + rng.randint(1, 32)]
        j = rng.randrange(len(b) + 1)
        return b[:j] + piece + b[j:]

    def truncate(b: bytes) -> bytes:
        return b[: rng.randrange(len(b))]

    def splice(b: bytes) -> bytes:
        other = encode_envelope(rng.choice(SAMPLES))
        return b[: rng.randrange(len(b))] + other[rng.randrange(len(other)) :]

    def swap(b: bytes) -> bytes:
        i, j = sorted(rng.sample(range(len(b)), 2))
        return b[:i] + b[j : j + 1] + b[i + 1 : j] + b[i : i + 1] + b[j + 1 :]

    return [replace, flip, insert, delete, duplicate, truncate, splice, swap]


def test_twenty_thousand_random_mutations_never_raise_nor_apply_anything_unsigned() -> None:
    rng = random.Random(SEED)
    mutations = _mutations(rng)
    signed = {encode_envelope(e): e for e in SAMPLES}
    outcomes: dict[str, int] = {}
    for case in range(20_000):
        original = rng.choice(SAMPLES)
        raw = encode_envelope(original)
        for _ in range(rng.choice((1, 1, 1, 2, 3, 5))):
            raw = rng.choice(mutations)(raw.ljust(2, b"\x80"))
        decision = decide_all(raw, group=original.target)  # asserts the labels too
        label = getattr(decision, "reason", decision.outcome)
        outcomes[label] = outcomes.get(label, 0) + 1
        if isinstance(decision, Apply | Ignore):
            # Only possible when the mutations cancel out, or change nothing signed (a
            # MessagePack header written longer): what applies is exactly a signed envelope.
            assert decision.envelope in signed.values(), (SEED, case, raw.hex())
    assert outcomes.get("bad_signature", 0) > 1000
    assert outcomes.get("undecodable", 0) > 1000


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    choices: list[Callable[[], Any]] = [
        lambda: rng.randint(-(2**63), 2**64 - 1),
        lambda: rng.random() * 10 ** rng.randint(-300, 300),
        lambda: rng.choice(["", "states", "activate", "checkpoint", "x" * rng.randint(0, 300)]),
        lambda: rng.randbytes(rng.choice((0, 1, 16, 63, 64, 65))),
        lambda: None,
        lambda: rng.choice((True, False)),
        lambda: NOW + timedelta(seconds=rng.randint(-(10**9), 10**9)),
        lambda: msgspec.msgpack.Ext(rng.randint(-128, 127), rng.randbytes(rng.randint(0, 12))),
    ]
    if depth < 4:
        choices += [
            lambda: [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))],
            lambda: {
                rng.choice([*fields(), "kind", "streams", "name", "signature", "x"]): (
                    _random_value(rng, depth + 1)
                )
                for _ in range(rng.randint(0, 6))
            },
        ]
    return rng.choice(choices)()


def test_random_values_in_a_correctly_signed_envelope_never_raise() -> None:
    rng = random.Random(SEED + 1)
    commands = [
        {"kind": k, "streams": ["states"], "version": 1, "name": "n", "to_version": 1}
        for k in ("activate", "deactivate", "assign", "checkpoint", "rollback_version")
    ]
    outcomes: dict[str, int] = {}
    for case in range(3_000):
        command = dict(rng.choice(commands))
        unsigned = fields(command=command)
        if rng.random() < 0.5:  # the header: mostly undecodable
            for field in rng.sample(list(unsigned), rng.randint(1, 3)):
                unsigned[field] = _random_value(rng)
        else:  # the command, behind a valid header: mostly unknown kinds and invalid fields
            for field in rng.sample([*command, "limits", "then", "extra"], rng.randint(1, 3)):
                command[field] = _random_value(rng)
        if rng.random() < 0.2:
            unsigned[rng.choice(["streams", "kind", "extra"])] = _random_value(rng)
        try:
            raw = signed_wire(unsigned)
        except (msgspec.EncodeError, OverflowError):
            continue  # not representable in MessagePack at all
        decision = decide_all(raw)  # asserts the labels and that no bug was hit
        assert isinstance(decision, Apply | Reject | Ignore), (case, unsigned)
        label = getattr(decision, "reason", decision.outcome)
        outcomes[label] = outcomes.get(label, 0) + 1
    assert {"undecodable", "unknown_kind", "invalid_command", "applied"} <= set(outcomes)


def test_random_bytes_and_random_messagepack_are_rejected() -> None:
    rng = random.Random(SEED + 2)
    for _ in range(3_000):
        assert isinstance(decide_all(rng.randbytes(rng.randint(0, 400))), Reject)
    for case in range(3_000):
        value = _random_value(rng)
        try:
            raw = msgspec.msgpack.encode(value)
        except (msgspec.EncodeError, OverflowError):
            continue
        decision = decide_all(raw)
        assert isinstance(decision, Reject), (case, value)
        assert decision.reason == "undecodable"


def test_the_orchestrators_log_reader_survives_the_same_garbage() -> None:
    rng = random.Random(SEED + 3)
    log: list[bytes | None] = [encode_envelope(e) for e in SAMPLES]
    mutations = _mutations(rng)
    log += [rng.choice(mutations)(encode_envelope(rng.choice(SAMPLES))) for _ in range(2_000)]
    log.append(None)
    assert highest_seq(log, keys=BOTH_KEYS, group=GROUP) == 2**40


def test_a_decision_is_always_labelled_even_on_the_boundaries() -> None:
    # The time and seq boundaries of one sample, under both keys and every group seen.
    envelope = SAMPLES[1]
    raw = encode_envelope(envelope)
    instants: list[datetime] = [
        envelope.issued_at - timedelta(minutes=5, microseconds=1),
        envelope.issued_at,
        envelope.expires_at - timedelta(microseconds=1),
        envelope.expires_at,
    ]
    for now in instants:
        for applied in (0, envelope.seq - 1, envelope.seq, 2**63 - 1):
            for group in (GROUP, "g", "other"):
                assert_labels(decide_all(raw, now=now, applied_seq=applied, group=group))
