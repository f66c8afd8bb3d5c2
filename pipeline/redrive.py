"""Dead-letter redrive, the pure part: which stream a dead letter belongs to, decoding it
again with today's catalog (a letter rejected under an older one is decoded as its stream is
declared now), the filters of `pipeline dlq`, and how a letter is shown.

No IO: consumers/redrive.py reads and writes ``dead_letters`` and the data tables with these.
docs/repair.md describes the whole.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pipeline.batching import Row
from pipeline.catalog import Catalog, StreamSpec
from pipeline.rows import decoder
from pipeline.terminal import printable

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

#: How much of a key or value `pipeline dlq show` prints before it says how much it left out.
SHOW_MAX_CHARS = 2048
#: How much of a reason `pipeline dlq list` prints on its one line per letter.
LIST_REASON_CHARS = 100


@dataclass(frozen=True)
class Filters:
    """Which dead letters a `pipeline dlq` command is about (all of them by default)."""

    stream: str | None = None
    error_class: str | None = None
    since: datetime | None = None
    limit: int | None = None


def stream_topics(catalog: Catalog, prefix: str, only: str | None = None) -> dict[str, str]:
    """Deployed topic name -> stream name, for the streams of ``catalog`` (only the one named
    ``only``, when given) of a group with ``prefix``."""
    return catalog.topics(prefix, None if only is None else (only,))


def stream_of(catalog: Catalog, src_topic: str, prefix: str) -> str | None:
    """The stream of ``catalog`` a dead letter came from: its source topic minus the topic
    prefix; None for a topic that is no data topic under ``prefix``."""
    return catalog.topics(prefix).get(src_topic)


def parse_since(text: str) -> datetime:
    """An argparse type: an RFC 3339 timestamp with its offset (a naive one is refused)."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an RFC 3339 timestamp such as 2026-11-01T00:00:00+00:00, got {text!r}"
        ) from None
    if when.tzinfo is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} has no offset: add one (Z, +00:00, +02:00, ...)"
        )
    return when


def stored_headers(stored: Any) -> list[tuple[str, bytes | None]]:
    """Headers as ``dead_letters.record_headers`` keeps them (a JSON list of [name, text]
    pairs, non-UTF-8 bytes escaped) back as Kafka headers. Only ``content-type`` matters to
    the decoders, and it is text."""
    return [
        (str(name), None if value is None else str(value).encode()) for name, value in stored or []
    ]


def decode_again(
    spec: StreamSpec,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes | None]],
    *,
    key: bytes | None = None,
    timestamp: datetime | None = None,
    partition: int,
    offset: int,
    batch_id: int,
) -> Row:
    """A dead letter's COPY row, decoded as ``spec`` (the stream in today's catalog) says,
    carrying the letter's source partition and offset and ``batch_id``;
    :class:`RecordRejected` when it still does not decode. ``key`` and ``timestamp`` are the
    record's, for the columns that take them."""
    return decoder(spec).row(
        value,
        headers,
        partition,
        offset,
        batch_id,
        key=key,
        timestamp=None if timestamp is None else _epoch_ms(timestamp),
    )


def _epoch_ms(when: datetime) -> int:
    """A stored record timestamp back as Kafka's milliseconds since the epoch (stored through
    ``to_timestamp(ms / 1000.0)``, a float: rounded, not cut)."""
    return ((when - _EPOCH) // timedelta(microseconds=1) + 500) // 1000


def shown(data: bytes | None, limit: int = SHOW_MAX_CHARS) -> str:
    """Bytes for a person: the text when they are UTF-8, else hex; cut at ``limit``
    characters, saying how many bytes there are in all."""
    if data is None:
        return "(none)"
    try:
        text, kind = data.decode("utf-8"), "text"
    except UnicodeDecodeError:
        text, kind = data.hex(" "), "hex"
    if len(text) > limit:
        return f"{text[:limit]}... ({kind}, cut at {limit} characters; {len(data)} bytes in all)"
    return text if kind == "text" else f"{text} (hex)"


def one_line(text: str, limit: int = LIST_REASON_CHARS) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def list_line(r: Mapping[str, Any]) -> str:
    """A dead letter's line in `pipeline dlq list`, safe to print (:func:`printable`)."""
    return printable(
        f"{r['id']:>8}  {r['dead_lettered_at'].isoformat(timespec='seconds')}  "
        f"{r['src_topic']}[{r['src_partition']}]@{r['src_offset']}  {r['error_class']}  "
        + ("redriven" if r["redriven_at"] is not None else f"pending, {r['attempts']} attempts")
        + f"  {one_line(r['reason'])}"
    )


def letter_lines(r: Mapping[str, Any], catalog: Catalog, topic_prefix: str) -> list[str]:
    """A dead letter's fields (a ``dead_letters`` row) for `pipeline dlq show`. The key, value,
    headers and reason are a producer's bytes: each line goes through :func:`printable`."""
    stream = stream_of(catalog, r["src_topic"], topic_prefix) or "(not a data topic of this prefix)"
    ts = r["record_ts"].isoformat() if r["record_ts"] is not None else "(none)"
    redriven = (
        f"{r['redriven_at'].isoformat()} in batch {r['redriven_batch_id']}"
        if r["redriven_at"] is not None
        else "no"
    )
    last = r["last_attempt_at"].isoformat() if r["last_attempt_at"] is not None else "never"
    headers = r["record_headers"] or []
    lines = [
        f"id:             {r['id']}",
        f"group:          {r['group_id']}",
        f"source:         {r['src_topic']} partition {r['src_partition']} offset "
        f"{r['src_offset']} (stream {stream})",
        f"record time:    {ts}",
        f"dead-lettered:  {r['dead_lettered_at'].isoformat()}",
        f"error class:    {r['error_class']}",
        f"reason:         {r['reason']}",
        f"redrive:        {r['attempts']} attempt(s), last {last}; redriven: {redriven}",
        f"key:            {shown(r['record_key'])}",
        f"headers:        {json.dumps(headers, ensure_ascii=False) if headers else '(none)'}",
        f"value:          {shown(r['record_value'])}",
    ]
    return [printable(line) for line in lines]


@dataclass
class Outcome:
    """What a redrive did (or, dry, would do)."""

    dry_run: bool
    redriven: int = 0  # letters whose record now landed in its table
    new_rows: int = 0  # of which were new rows; the rest found their natural key stored
    failing: Counter[str] = field(default_factory=Counter)  # still failing, by error class
    examples: dict[str, str] = field(default_factory=dict)  # error class -> one reason
    # Letters whose record is older than its stream's retention horizon, by stream: not
    # written, marked redriven (the agent commits past such a record too); and why.
    expired: Counter[str] = field(default_factory=Counter)
    horizon: dict[str, str] = field(default_factory=dict)  # "its ts is older than now minus 1d"

    @property
    def still_failing(self) -> int:
        return sum(self.failing.values())

    def fail(self, error_class: str, reason: str) -> None:
        self.failing[error_class] += 1
        self.examples.setdefault(error_class, reason)

    def json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "redriven": self.redriven,
            "new_rows": self.new_rows,
            "still_failing": {
                c: {"letters": n, "example": self.examples[c]}
                for c, n in sorted(self.failing.items())
            },
            "expired": {
                s: {"letters": n, "why": self.horizon[s]} for s, n in sorted(self.expired.items())
            },
        }

    def lines(self) -> list[str]:
        would = "would be " if self.dry_run else ""
        already = self.redriven - self.new_rows
        out = [
            ("dry run, nothing changed: " if self.dry_run else "")
            + f"{would}redriven {self.redriven}"
            + (f" ({already} found already stored)" if already else "")
            + f", {'would still fail' if self.dry_run else 'still failing'} "
            + f"{self.still_failing}"
        ]
        for error_class, count in sorted(self.failing.items()):
            example = one_line(self.examples[error_class])
            out.append(printable(f"  {error_class}: {count} (e.g. {example})"))
        for stream, count in sorted(self.expired.items()):
            out.append(
                f"{count} {stream} letter(s) {'would be ' if self.dry_run else ''}skipped as "
                f"older than the stream's retention horizon ({self.horizon[stream]}): not "
                "written, marked redriven, as live ingestion does not write them either"
            )
        if self.still_failing and not self.dry_run:
            out.append(
                f"{self.still_failing} letter(s) still fail: kept in dead_letters with their new "
                "reasons (`pipeline dlq list`); this is not an error"
            )
        return out
