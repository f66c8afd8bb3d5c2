"""pipeline/redrive.py: the pure part of `pipeline dlq`."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta, timezone

import pytest

from pipeline.catalog import load as load_catalog
from pipeline.records import Metric, encode
from pipeline.redrive import (
    Outcome,
    decode_again,
    parse_since,
    shown,
    stored_headers,
    stream_of,
    stream_topics,
)
from pipeline.rows import RecordRejected

CATALOG = load_catalog()

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def test_the_stream_is_the_source_topic_minus_the_prefix() -> None:
    assert stream_of(CATALOG, "p.agents.metrics", "p.") == "metrics"
    assert stream_of(CATALOG, "users.analytics", "") == "analytics"
    assert stream_of(CATALOG, "agents.metrics", "p.") is None  # another prefix's topic
    assert stream_of(CATALOG, "p.pipeline.dlq", "p.") is None
    assert stream_topics(CATALOG, "p.", "events") == {"p.agents.events": "events"}
    assert len(stream_topics(CATALOG, "")) == 5


def test_since_needs_an_offset() -> None:
    assert parse_since("2026-11-01T00:00:00Z") == T0
    assert parse_since("2026-11-01T02:00:00+02:00") == T0
    assert parse_since("2026-11-01T02:00:00+02:00").tzinfo == timezone(timedelta(hours=2))
    with pytest.raises(argparse.ArgumentTypeError, match="no offset"):
        parse_since("2026-11-01T00:00:00")
    with pytest.raises(argparse.ArgumentTypeError, match="RFC 3339"):
        parse_since("yesterday")


def test_a_letter_decodes_again_with_its_provenance_and_the_batch_id() -> None:
    value = encode(Metric("a", "cpu", 1.5, T0))
    headers = stored_headers([["content-type", "application/json"], ["trace", None]])
    assert headers == [("content-type", b"application/json"), ("trace", None)]
    row = decode_again(CATALOG["metrics"], value, headers, partition=2, offset=41, batch_id=7001)
    assert row[:3] == ("a", "cpu", 1.5) and row[-3:] == (2, 41, 7001)
    with pytest.raises(RecordRejected) as rejected:
        decode_again(CATALOG["metrics"], b"{not json", [], partition=0, offset=0, batch_id=1)
    assert rejected.value.error_class == "DecodeError"
    with pytest.raises(RecordRejected) as unsupported:
        decode_again(
            CATALOG["metrics"], value, stored_headers([["content-type", "text/csv"]]),
            partition=0, offset=0, batch_id=1,
        )  # fmt: skip
    assert unsupported.value.error_class == "UnsupportedContentType"
    assert stored_headers(None) == []


def test_bytes_are_shown_as_text_or_hex_and_cut() -> None:
    assert shown(None) == "(none)"
    assert shown(b'{"a": 1}') == '{"a": 1}'
    assert shown(b"\xff\x00") == "ff 00 (hex)"
    long = shown(b"x" * 5000, limit=10)
    assert long == "xxxxxxxxxx... (text, cut at 10 characters; 5000 bytes in all)"
    assert shown(b"\xff" * 100, limit=5).startswith("ff ff... (hex, cut at 5 characters; 100 bytes")


def test_the_summary_says_what_still_fails_and_that_it_is_no_error() -> None:
    outcome = Outcome(dry_run=False, redriven=3, new_rows=2)
    outcome.fail("DecodeError", "JSON is malformed")
    outcome.fail("DecodeError", "another reason")
    outcome.fail("DatabaseRejected", "23514 new row violates check constraint\n  detail")
    assert outcome.lines() == [
        "redriven 3 (1 found already stored), still failing 3",
        "  DatabaseRejected: 1 (e.g. 23514 new row violates check constraint detail)",
        "  DecodeError: 2 (e.g. JSON is malformed)",
        "3 letter(s) still fail: kept in dead_letters with their new reasons "
        "(`pipeline dlq list`); this is not an error",
    ]
    dry = Outcome(dry_run=True, redriven=2, new_rows=2)
    assert dry.lines() == ["dry run, nothing changed: would be redriven 2, would still fail 0"]


def test_the_summary_says_how_many_letters_expired_and_why() -> None:
    outcome = Outcome(dry_run=False, redriven=1, new_rows=1)
    outcome.expired["metrics"] += 4
    outcome.horizon["metrics"] = "its ts is older than now minus 1d"
    assert outcome.lines() == [
        "redriven 1, still failing 0",
        "4 metrics letter(s) skipped as older than the stream's retention horizon (its ts is "
        "older than now minus 1d): not written, marked redriven, as live ingestion does not "
        "write them either",
    ]
    assert outcome.json() == {
        "dry_run": False,
        "redriven": 1,
        "new_rows": 1,
        "still_failing": {},
        "expired": {"metrics": {"letters": 4, "why": "its ts is older than now minus 1d"}},
    }
