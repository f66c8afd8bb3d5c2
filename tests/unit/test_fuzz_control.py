"""Fuzzing the control envelope decoder: every message is a decision, never an exception.

The target is what the controller calls on each control-topic record,
``pipeline.control.decide``: it returns Apply, Ignore or a Reject with one of its reasons
and must raise nothing, whatever the bytes. ``FUZZ_INPUTS`` messages (default 100,000) are
decided: validly signed envelopes of every command kind with their header and command fields
removed, added, retyped or made odd (huge integers, NaN, long and odd strings, extension
types, bad timestamps, nesting), signed by a trusted key, an untrusted one or the wrong one,
with forged, truncated, extended, misplaced, missing or stale signatures, plus byte-level
mutants of each. Beyond "no exception":

* ``internal_error`` (the safety net that turns a bug of the decoder into a rejection) and
  ``apply_failed`` (the agent's, never the decoder's) are never the answer;
* a rejection's detail is text a PostgreSQL column takes (the control log stores it);
* only a genuinely signed envelope is applied or ignored, and a byte mutant only when the
  mutation changed nothing signed (the same envelope as the original);
* a genuinely signed envelope whose key id is intact never fails its signature check,
  whatever odd content it carries: the agent verifies the bytes it received, never a
  re-encoding of them;
* every outcome and every reason the decoder gives occurs, and every command kind is
  applied, so the test cannot pass vacuously.
"""

from __future__ import annotations

import random
import uuid
from collections import Counter
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from pipeline.catalog import load as load_catalog
from pipeline.control import (
    DEFAULT_MAX_CLOCK_SKEW,
    KIND_UNKNOWN,
    KINDS,
    MAX_SEQ,
    NAME_PATTERN,
    OUTCOMES,
    REASONS,
    SIGNING_CONTEXT,
    Activate,
    Apply,
    Assign,
    BatchLimits,
    Checkpoint,
    Deactivate,
    Decision,
    Ignore,
    Reject,
    RollbackCheckpoint,
    RollbackVersion,
    Verifier,
    decide,
    encode_envelope,
    key_id,
)
from tests.unit.fuzzing import FUZZ_INPUTS, MUTANTS, fuzz, mutate, storable
from tests.unit.test_control import GROUP, KEY, NOW, OTHER_KEY, UNTRUSTED_KEY, make

ALL_STREAMS = load_catalog().names  # the built-in streams, in catalog order

TRUSTED = Verifier([KEY.public_key(), OTHER_KEY.public_key()])
SIGNERS = {"key": KEY, "other_key": OTHER_KEY, "untrusted": UNTRUSTED_KEY}
HEADER_FIELDS = ("command_id", "seq", "target", "issued_at", "expires_at", "issuer", "key_id")
# The reasons decide() gives; apply_failed is the agent's, internal_error a bug's.
DECIDED = set(REASONS) - {"apply_failed", "internal_error"}

# -- values -----------------------------------------------------------------------------------

text = st.text(st.characters(codec="utf-8"), max_size=30)  # MessagePack strings are UTF-8
names = st.from_regex(NAME_PATTERN, fullmatch=True)
streams = st.lists(st.sampled_from(ALL_STREAMS), min_size=1, max_size=len(ALL_STREAMS), unique=True)
versions = st.one_of(st.integers(1, 100), st.integers(1, MAX_SEQ))
limits = st.fixed_dictionaries(
    {},
    optional={
        f: st.one_of(st.none(), st.integers(1, 2**31 - 1))
        for f in ("batch_max_records", "batch_max_bytes", "batch_max_wait_ms")
    },
)
COMMANDS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "activate": st.fixed_dictionaries({"kind": st.just("activate"), "streams": streams}),
    "deactivate": st.fixed_dictionaries({"kind": st.just("deactivate"), "streams": streams}),
    "assign": st.fixed_dictionaries(
        {"kind": st.just("assign"), "version": versions, "streams": streams},
        optional={"limits": limits},
    ),
    "checkpoint": st.fixed_dictionaries({"kind": st.just("checkpoint"), "name": names}),
    "rollback_version": st.fixed_dictionaries(
        {"kind": st.just("rollback_version"), "to_version": versions}
    ),
    "rollback_checkpoint": st.fixed_dictionaries(
        {
            "kind": st.just("rollback_checkpoint"),
            "to_checkpoint": names,
            "then": st.sampled_from(["reingest", "hold"]),
        }
    ),
}
assert set(COMMANDS) == set(KINDS)

leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),  # NaN and infinities included
    text,
    st.binary(max_size=70),
)
odd_values = st.one_of(
    leaves,
    st.sampled_from([0, -1, MAX_SEQ, MAX_SEQ + 1, 2**64 - 1, -(2**63), "", b"", [], {}]),
    st.sampled_from([*KINDS, KIND_UNKNOWN, "Activate", "activate ", "states", "all", GROUP]),
    st.builds(lambda c, n: c * n, st.characters(codec="utf-8"), st.integers(256, 70_000)),
    st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(text, inner, max_size=4)
        ),
        max_leaves=10,
    ),
    st.builds(lambda d: NOW + timedelta(seconds=d), st.integers(-(10**10), 10**10)),
    st.datetimes(),  # naive: MessagePack gets a string without an offset
    st.datetimes().map(datetime.isoformat),
    st.uuids().map(str),
    st.uuids().map(lambda u: u.bytes),  # a UUID as 16 bytes: valid, just not canonical
    st.builds(msgspec.msgpack.Ext, st.integers(-128, 127), st.binary(max_size=12)),
    st.builds(lambda n: [[[[{"a": [n]}]]]] * 3, st.integers()),
    st.builds(  # nested deeper than the interpreter recurses: arrays or maps of one entry
        lambda depth, opening: msgspec.Raw(opening * depth + b"\xc0"),
        st.one_of(st.integers(2, 50), st.integers(900, 5000)),
        st.sampled_from([b"\x91", b"\x81\xa1a"]),
    ),
)

# -- cases --------------------------------------------------------------------------------------

SIGNATURE_MODES = (
    "key",  # trusted, genuine
    "key",
    "key",
    "other_key",  # the second trusted key, genuine
    "first",  # genuine, but the signature entry first in the map
    "untrusted",  # genuine, by a key the agent does not know
    "wrong_key",  # signed by OTHER_KEY or an untrusted key, claiming KEY's id
    "random",
    "truncated",
    "extended",
    "stale",  # signed before the fields were changed
    "none",
    "not_bytes",
    "duplicate",  # genuine, then an entry repeated in the map (last one wins), maybe changed
)
GENUINE = {"key", "other_key", "first"}


class Case(NamedTuple):
    raw: bytes
    genuine: bytes | None  # "duplicate": the envelope before an entry was repeated
    mode: str
    kind: str
    key_id_intact: bool
    applied_seq: int
    seed: int


HEADER_OPS = ("header_remove", "header_replace", "header_replace", "extra_field")
COMMAND_OPS = ("command_remove", "command_replace", "command_extra", "kind", "command_whole")


@st.composite
def _mutate_fields(draw: st.DrawFn, unsigned: dict[str, Any], ops: tuple[str, ...]) -> Any:
    unsigned = dict(unsigned)
    command: Any = dict(unsigned["command"])
    for _ in range(draw(st.integers(1, 3))):
        is_map = isinstance(command, dict)
        op = draw(st.sampled_from(ops))
        if op == "header_remove":
            del unsigned[draw(st.sampled_from(sorted(set(unsigned) - {"command"})))]
        elif op == "header_replace":
            unsigned[draw(st.sampled_from(HEADER_FIELDS))] = draw(odd_values)
        elif op == "extra_field":  # a newer orchestrator's field, or junk
            unsigned[draw(st.one_of(text, st.sampled_from(["limits", "kind", "Seq"])))] = draw(
                odd_values
            )
        elif op == "command_remove" and is_map and command:
            del command[draw(st.sampled_from(sorted(command)))]
        elif op == "command_replace" and is_map and command:
            command[draw(st.sampled_from(sorted(command)))] = draw(odd_values)
        elif op == "command_extra" and is_map:
            field = st.sampled_from(["limits", "streams", "version", "name", "then", "x"])
            command[draw(st.one_of(text, field))] = draw(odd_values)
        elif op == "kind" and is_map:
            command["kind"] = draw(odd_values)
        elif op == "command_whole":
            command = draw(odd_values)
    unsigned["command"] = command
    return unsigned


def _encode(value: Any) -> bytes | None:
    try:
        return msgspec.msgpack.encode(value)
    # RecursionError: a value nested deeper than the stack allows here (how deep that is
    # depends on the stack the test runs on), as decode_status and decide allow for too.
    except (msgspec.EncodeError, OverflowError, TypeError, UnicodeEncodeError, RecursionError):
        return None


@st.composite
def cases(draw: st.DrawFn) -> Case:
    kind = draw(st.sampled_from(KINDS))
    mode = draw(st.sampled_from(SIGNATURE_MODES))
    signer: Ed25519PrivateKey = SIGNERS.get(mode, KEY)
    if mode == "wrong_key":
        signer = draw(st.sampled_from([OTHER_KEY, UNTRUSTED_KEY]))
    seq = draw(st.one_of(st.integers(1, 50), st.integers(1, MAX_SEQ)))
    # Mostly valid now; else expired, or issued beyond the clock skew, or both.
    issued_at = NOW + timedelta(
        seconds=draw(st.one_of(st.integers(-600, 0), st.integers(-7200, 900)))
    )
    # Mostly within the 24 h limit; sometimes just over it, or years.
    lifetime = timedelta(
        seconds=draw(
            st.one_of(
                st.integers(600, 7200),
                st.integers(-60, 7200),
                st.sampled_from([86_400, 86_401, 10**9]),
            )
        )
    )
    unsigned: dict[str, Any] = {
        "command_id": str(draw(st.uuids())),
        "seq": seq,
        "target": draw(st.sampled_from([GROUP, GROUP, GROUP, "other-group"])),
        "issued_at": issued_at,
        "expires_at": issued_at + lifetime,
        "issuer": draw(st.one_of(st.just("antigravity@test"), text.filter(bool))),
        "key_id": key_id((KEY if mode == "wrong_key" else signer).public_key()),
        "command": draw(COMMANDS[kind]),
    }
    signed = unsigned
    # Fields changed: none (mostly decided on time, target and seq), the command's (an
    # invalid command or an unknown kind behind a good header), the header's, or both.
    changed = draw(st.sampled_from(["none", "none", "command", "command", "header", "both"]))
    if mode == "stale" and changed == "none":
        changed = "both"
    if changed != "none":
        ops = {"command": COMMAND_OPS, "header": HEADER_OPS}.get(changed, HEADER_OPS + COMMAND_OPS)
        unsigned = draw(_mutate_fields(unsigned, ops))
    payload = _encode(signed if mode == "stale" else unsigned)
    wire_map = _encode(unsigned)
    if payload is None or wire_map is None:
        unsigned = signed  # not representable in MessagePack: keep the valid envelope
        payload = wire_map = _encode(unsigned)
        assert payload is not None
    if mode == "stale" and payload == wire_map:
        mode = "key"  # the changes changed nothing (a value replaced by itself): genuine
    key_id_intact = unsigned.get("key_id") == signed["key_id"] and "signature" not in unsigned
    signature: Any = signer.sign(SIGNING_CONTEXT + payload)
    if mode == "random":
        signature = draw(st.binary(min_size=64, max_size=64))
    elif mode == "truncated":
        signature = signature[: draw(st.integers(0, 63))]
    elif mode == "extended":
        signature += draw(st.binary(min_size=1, max_size=8))
    elif mode == "not_bytes":
        signature = draw(st.one_of(st.none(), text, st.integers(0, 2**64 - 1), st.lists(leaves)))
    wire: dict[str, Any] = dict(unsigned)
    if mode == "first":
        wire = {"signature": signature, **unsigned}
    elif mode != "none":
        wire["signature"] = signature
    raw = _encode(wire)
    assert raw is not None
    genuine = None
    if mode == "duplicate":
        genuine, raw = raw, _with_duplicate(draw, wire)
    applied_seq = draw(
        st.one_of(
            st.sampled_from([0, seq - 1, seq, min(seq + 1, MAX_SEQ)]), st.integers(0, MAX_SEQ)
        )
    )
    return Case(
        raw, genuine, mode, kind, key_id_intact, applied_seq, draw(st.integers(0, 2**32 - 1))
    )


def _with_duplicate(draw: st.DrawFn, wire: dict[str, Any]) -> bytes:
    # MessagePack maps may repeat a key; a dict cannot, so the map is written entry by entry.
    entries = [msgspec.msgpack.encode(k) + msgspec.msgpack.encode(v) for k, v in wire.items()]
    key = draw(st.sampled_from(list(wire)))
    value = wire[key] if draw(st.booleans()) else draw(odd_values)
    entry = msgspec.msgpack.encode(key) + (_encode(value) or msgspec.msgpack.encode(None))
    entries.insert(draw(st.integers(0, len(entries))), entry)
    count = len(entries)
    header = bytes([0x80 | count]) if count < 16 else b"\xde" + count.to_bytes(2, "big")
    return header + b"".join(entries)


# Signed envelopes of every kind: the splice material of the byte-level mutations.
SIGNED = [
    make(command, seq=seq)
    for seq, command in enumerate(
        [
            Activate(streams=("states", "events")),
            Deactivate(streams=("config",)),
            Assign(version=9, streams=("metrics",), limits=BatchLimits(batch_max_records=10)),
            Checkpoint(name="before-upgrade"),
            RollbackVersion(to_version=2),
            RollbackCheckpoint(to_checkpoint="nightly", then="hold"),
        ],
        start=1,
    )
]
CORPUS = [encode_envelope(e) for e in SIGNED]

# -- checks -------------------------------------------------------------------------------------


def _decide(raw: bytes, applied_seq: int) -> Decision:
    try:
        return decide(raw, keys=TRUSTED, group=GROUP, applied_seq=applied_seq, now=NOW)
    except Exception as exc:  # the property: nothing raises
        pytest.fail(f"decide() raised {type(exc).__name__}: {exc}\ninput: {raw.hex()}")


def _check(decision: Decision, applied_seq: int, shown: str) -> str:
    """The decision's checks that hold for any input; returns its label."""
    assert decision.outcome in OUTCOMES, shown
    assert decision.kind in (*KINDS, KIND_UNKNOWN), shown
    if isinstance(decision, Reject):
        assert decision.reason in DECIDED, (decision.reason, decision.detail, shown)
        assert storable(f"{decision.reason}: {decision.detail}"), (decision.detail, shown)
        assert decision.command_id is None or isinstance(decision.command_id, uuid.UUID), shown
        assert decision.seq is None or 1 <= decision.seq <= MAX_SEQ, shown
        return decision.reason
    envelope = decision.envelope
    assert decision.kind in KINDS, shown
    if isinstance(decision, Apply):
        assert envelope.target == GROUP, shown
        assert envelope.seq > applied_seq, shown
    else:
        assert isinstance(decision, Ignore), shown
        assert envelope.target != GROUP, shown
    assert envelope.expires_at > NOW, shown
    assert envelope.issued_at <= NOW + DEFAULT_MAX_CLOCK_SKEW, shown
    return decision.outcome


def test_every_control_message_is_applied_ignored_or_rejected_with_a_reason() -> None:
    labels: Counter[str] = Counter()
    applied_kinds: Counter[str] = Counter()
    modes: Counter[tuple[str, str]] = Counter()

    @fuzz
    @given(cases())
    def decide_one_and_its_mutants(case: Case) -> None:
        shown = f"input: {case.raw.hex()} (signature {case.mode})"
        original = _decide(case.raw, case.applied_seq)
        label = _check(original, case.applied_seq, shown)
        labels[label] += 1
        modes[case.mode, label] += 1
        if isinstance(original, Apply):
            applied_kinds[original.kind] += 1
        if case.mode == "duplicate" and not isinstance(original, Reject):
            # A repeated entry never smuggles in anything the signature does not cover.
            assert case.genuine is not None
            before = _decide(case.genuine, case.applied_seq)
            assert not isinstance(before, Reject), shown
            assert original.envelope == before.envelope, shown
        elif case.mode not in GENUINE:
            assert isinstance(original, Reject), shown  # only a genuine signature passes
        if case.key_id_intact:
            if case.mode in GENUINE:
                assert label not in ("unknown_key", "bad_signature"), (original, shown)
            elif case.mode == "untrusted":
                assert label in ("undecodable", "unknown_kind", "unknown_key"), (original, shown)
            elif case.mode in ("wrong_key", "random", "truncated", "extended", "stale"):
                assert label in ("undecodable", "unknown_kind", "bad_signature"), (original, shown)
        if case.mode in ("none", "not_bytes"):
            assert label == "undecodable", (original, shown)
        rng = random.Random(case.seed)
        for _ in range(MUTANTS):
            # Mostly one mutation: a MessagePack map survives few, and the deeper checks
            # (signature, command, time) are reached only by a map that decodes.
            raw = mutate(case.raw, rng, CORPUS, stack=(1, 1, 1, 2))
            shown = f"input: {raw.hex()} (a mutant of {case.raw.hex()})"
            decision = _decide(raw, case.applied_seq)
            labels[_check(decision, case.applied_seq, shown)] += 1
            if not isinstance(decision, Reject):
                # Only a mutation that changed nothing signed (say, a longer MessagePack
                # header for the same value): exactly the original's envelope, or one of
                # the signed envelopes spliced in whole.
                genuine = [
                    *SIGNED,
                    *([original.envelope] if not isinstance(original, Reject) else []),
                ]
                assert decision.envelope in genuine, shown

    decide_one_and_its_mutants()

    total = sum(labels.values())
    print(
        f"\ncontrol messages fuzzed: {total}; outcomes {dict(labels.most_common())}; "
        f"applied by kind {dict(applied_kinds)}; by signature {dict(sorted(modes.items()))}"
    )
    assert total >= FUZZ_INPUTS
    # Not vacuous: every outcome and every reason decide() gives, every kind applied.
    assert set(labels) == {"applied", "ignored"} | DECIDED, labels
    assert set(applied_kinds) == set(KINDS), applied_kinds
