"""What the fuzz tests share: how many inputs, the hypothesis settings, byte-level mutations
and the check that a rejection's reason can be stored.

Each hypothesis example is one structured input (a valid record or envelope, mutated
field by field) plus :data:`MUTANTS` byte-level mutants of it from a seeded generator, all
decoded and all counted: hypothesis reaches deep into the formats, the mutation loop makes
100,000 inputs affordable (about 20 decoded inputs per generated one).

``FUZZ_INPUTS`` (default 100000) sets the inputs per target. ``FUZZ_SEED`` explores new
inputs; without it every run decodes the same inputs (hypothesis ``derandomize``).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from hypothesis import HealthCheck, seed, settings

MUTANTS = 19  # byte-level mutants decoded for each generated input


def _positive_int(name: str, default: str) -> int:
    raw = os.environ.get(name, default)
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}")
    return value


FUZZ_INPUTS = _positive_int("FUZZ_INPUTS", "100000")
FUZZ_SEED = _positive_int("FUZZ_SEED", "1") if os.environ.get("FUZZ_SEED") else None

F = TypeVar("F", bound=Callable[..., Any])


def fuzz(test: F) -> F:
    """Run a ``@given`` test for :data:`FUZZ_INPUTS` inputs: one example per ``MUTANTS + 1``."""
    configured = settings(
        max_examples=-(-FUZZ_INPUTS // (MUTANTS + 1)),
        database=None,  # nothing kept between runs: every run is the same (or FUZZ_SEED's)
        derandomize=FUZZ_SEED is None,
        deadline=None,  # this machine is shared; time is measured by the whole test
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=False,
    )(test)
    return configured if FUZZ_SEED is None else seed(FUZZ_SEED)(configured)


def storable(text: object) -> bool:
    """Whether ``text`` is a non-empty string a PostgreSQL text column takes (UTF-8, no NUL):
    a reason that cannot be stored would turn a rejection into a failed transaction."""
    if not isinstance(text, str) or not text or "\x00" in text:
        return False
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


# Bytes that mean something to JSON or MessagePack parsers, to insert as they are.
_TOKENS = (
    b'"',
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"\\",
    b"\\u",
    b"\\ud800",
    b"\x00",
    b"\xff",
    b"\xc3",  # a UTF-8 lead byte without its continuation
    b"null",
    b"NaN",
    b"1e999",
    b"-0",
    b"9" * 40,
    b"\xc0",  # MessagePack nil
    b"\xd9\xff",  # str 8 of 255 bytes, missing
    b"\xdc\xff\xff",  # array 16 of 65535 elements, missing
    b"\xdf\xff\xff\xff\xff",  # map 32 of 2**32-1 entries
    b"\xc7\x08\xff",  # ext 8, type -1 (timestamp) of 8 bytes
    b"\xd6\xff\xff\xff\xff\xff",  # fixext 4 timestamp
    b"\xd4\x01\x00",  # fixext 1 of an unknown type
    b"\x91" * 64,  # nested arrays
)


def mutate(
    data: bytes,
    rng: random.Random,
    corpus: Sequence[bytes],
    stack: Sequence[int] = (1, 1, 1, 2, 3, 4),
) -> bytes:
    """``data`` with byte-level mutations from ``rng``, as many as a choice from ``stack``."""
    for _ in range(rng.choice(stack)):
        data = _mutation(data, rng, corpus)
    return data


def _mutation(b: bytes, rng: random.Random, corpus: Sequence[bytes]) -> bytes:
    n = len(b)
    i = rng.randrange(n + 1)
    choice = rng.randrange(10)
    if n == 0 or choice == 0:  # insert random bytes
        return b[:i] + rng.randbytes(rng.randint(1, 8)) + b[i:]
    j = rng.randrange(n)
    if choice == 1:  # replace a byte
        return b[:j] + bytes([rng.randrange(256)]) + b[j + 1 :]
    if choice == 2:  # flip a bit
        return b[:j] + bytes([b[j] ^ (1 << rng.randrange(8))]) + b[j + 1 :]
    if choice == 3:  # delete a run
        return b[:j] + b[j + rng.randint(1, 16) :]
    if choice == 4:  # truncate
        return b[:j]
    if choice == 5:  # duplicate a chunk elsewhere
        return b[:i] + b[j : j + rng.randint(1, 32)] + b[i:]
    if choice == 6:  # splice with another input
        other = rng.choice(corpus)
        return b[:j] + other[rng.randrange(len(other) + 1) :]
    if choice == 7:  # swap two bytes
        k = rng.randrange(n)
        lo, hi = sorted((j, k))
        if lo == hi:
            return b
        return b[:lo] + b[hi : hi + 1] + b[lo + 1 : hi] + b[lo : lo + 1] + b[hi + 1 :]
    if choice == 8:  # a byte off by one, e.g. a length or a type byte
        return b[:j] + bytes([(b[j] + rng.choice((-1, 1))) % 256]) + b[j + 1 :]
    return b[:i] + rng.choice(_TOKENS) + b[i:]  # a meaningful token
