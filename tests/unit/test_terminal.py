"""Untrusted text on the operator's terminal: one pure function escapes what does not print,
and `pipeline dlq show`/`list`, `pipeline control`, `control status` and `pipeline top` print
through it."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from consumers.antigravity import Delivery
from pipeline.catalog import load as load_catalog
from pipeline.commands.control import send_lines, status_lines
from pipeline.control import Ack, Checkpoint, Heartbeat, generate_key_pair, sign
from pipeline.control_store import Decision
from pipeline.redrive import letter_lines, list_line
from pipeline.terminal import printable
from pipeline.top import Fleet, render

NOW = datetime(2026, 11, 30, 8, 0, 0, tzinfo=UTC)
# Clear the screen, then set the window title: what a hostile producer would send.
ESC = "\x1b[2J\x1b]0;pwned\x07"
ESCAPED = "\\x1b[2J\\x1b]0;pwned\\x07"


def _safe(lines: list[str]) -> None:
    for line in lines:
        assert line.isprintable(), repr(line)


def test_controls_are_escaped_and_printable_unicode_is_kept() -> None:
    assert printable(ESC) == ESCAPED
    assert printable("a\x00b\x7fc\x9bd\ne\tf") == "a\\x00b\\x7fc\\x9bd\\x0ae\\x09f"
    assert printable("déjà vu 日本 🚀 x") == "déjà vu 日本 🚀 x"
    assert printable("abc\u202edef\u2028") == "abc\\u202edef\\u2028"  # bidi override, separator
    assert printable("\U000e0001") == "\\U000e0001"  # a format character beyond the BMP
    assert printable("") == ""


def _letter(**fields: Any) -> dict[str, Any]:
    return {
        "id": 7,
        "group_id": "database-agent",
        "src_topic": "agents.metrics",
        "src_partition": 1,
        "src_offset": 42,
        "record_ts": NOW,
        "dead_lettered_at": NOW,
        "error_class": "DecodeError",
        "reason": "bad",
        "attempts": 0,
        "last_attempt_at": None,
        "redriven_at": None,
        "redriven_batch_id": None,
        "record_key": b"k",
        "record_headers": [],
        "record_value": b"v",
        **fields,
    }


def test_dlq_show_escapes_the_key_value_headers_reason_and_error_class() -> None:
    lines = letter_lines(
        _letter(
            record_key=f"key{ESC}".encode(),
            record_value=f"value{ESC}\x9b31m".encode(),
            record_headers=[[f"name{ESC}", f"val\x9b{ESC}"]],
            reason=f"reason{ESC}",
            error_class=f"Class{ESC}",
        ),
        load_catalog(),
        "",
    )
    _safe(lines)
    text = "\n".join(lines)
    assert f"key:            key{ESCAPED}" in text
    assert f"value:          value{ESCAPED}\\x9b31m" in text
    assert f"reason:         reason{ESCAPED}" in text
    assert f"error class:    Class{ESCAPED}" in text
    # json.dumps escapes C0 controls its own way (\u001b); the C1 one is ours.
    assert 'headers:        [["name\\u001b[2J' in text
    assert '"val\\x9b\\u001b[2J' in text


def test_dlq_list_escapes_the_reason_and_error_class() -> None:
    line = list_line(_letter(reason=f"reason{ESC}", error_class=f"Class{ESC}"))
    assert line.isprintable()
    assert f"Class{ESCAPED}" in line
    assert f"reason{ESCAPED}" in line


def _beat(instance: str, *, state: str = "running", error: str = "") -> Heartbeat:
    return Heartbeat(
        instance_id=instance,
        group="g",
        state=state,  # type: ignore[arg-type]
        applied_seq=3,
        assignment_version=1,
        active_streams=(f"metrics{ESC}",),
        owned_partitions=(("agents.metrics", 0),),
        lag=5,
        last_error=error,
        metrics_address="",
        at=NOW - timedelta(seconds=1),
    )


def test_control_status_escapes_instance_ids_streams_and_last_errors() -> None:
    lines = status_lines(
        "g",
        3,
        [
            _beat(f"vm{ESC}", error=f"boom{ESC}"),
            _beat(f"old{ESC}", state="stopping"),
        ],
    )
    _safe(lines)
    assert lines[0] == (
        "group g: latest signed command seq 3; 1 live instance(s), "
        "as reported by their heartbeats (unsigned):"
    )
    assert lines[1].startswith(f"  old{ESCAPED}: stopped (last heard ")
    assert lines[2] == (
        f"  vm{ESCAPED}: running, seq 3, assignment v1, streams metrics{ESCAPED}, 1 partitions, "
        f"lag 5, last error: boom{ESCAPED}"
    )


def test_top_escapes_instance_ids_streams_and_last_errors_before_it_measures_columns() -> None:
    fleet = Fleet("g")
    fleet.heard(_beat(f"vm{ESC}", error=f"boom{ESC}"))
    fleet.heard(_beat("vm-2"))
    lines = render(
        fleet.rows(NOW), group="g", streams=load_catalog().names, now=NOW, interval_s=1, width=None
    )
    _safe(lines)
    heading, first, second = lines[3], lines[4], lines[5]
    assert first.startswith(f"vm{ESCAPED}  running  metrics{ESCAPED}  ")
    assert first.endswith(f"  boom{ESCAPED}")
    # The columns line up on the escaped text: the heading and rows share their offsets.
    assert heading.index("STATE") == first.index("running") == second.index("running")


def test_control_status_without_a_key_marks_no_instance_behind() -> None:
    # No key to verify a seq with: the latest is unknown, and no heartbeat's claim is compared.
    lines = status_lines("g", None, [_beat("vm")])
    assert lines[0] == (
        "group g: latest signed command seq unknown (no key to verify it with); 1 live "
        "instance(s), as reported by their heartbeats (unsigned):"
    )
    assert "BEHIND" not in lines[1]
    assert lines[1].startswith("  vm: running, seq 3, assignment v1")
    assert status_lines("g", 4, [_beat("vm")])[1].startswith("  vm: running, seq 3  BEHIND")


def test_pipeline_control_escapes_instance_ids_ack_details_and_the_decisions_reason() -> None:
    envelope = sign(
        command=Checkpoint(name="cp"),
        command_id=uuid.UUID(int=1),
        seq=4,
        target="g",
        issuer="test",
        issued_at=NOW,
        expires_at=NOW + timedelta(hours=1),
        private_key=generate_key_pair()[0],
    )
    ack = Ack(
        command_id=envelope.command_id,
        seq=4,
        kind="checkpoint",
        instance_id=f"vm{ESC}",
        group="g",
        outcome="rejected",
        reason="stale_seq",
        detail=f"stale_seq: {ESC}",
        at=NOW,
    )
    # Every field below but the envelope's is someone else's text: the ids come from
    # heartbeats and acks (the status topic), the decision's reason may quote what was sent.
    delivery = Delivery(envelope, 12, [f"vm{ESC}", f"gone{ESC}"], {f"vm{ESC}": ack})
    decision = Decision(str(envelope.command_id), 4, "checkpoint", "rejected", "x", f"y{ESC}")
    lines, ok = send_lines("g", delivery, decision, database_read=True, wait_s=5)
    _safe(lines)
    assert not ok
    assert lines == [
        "checkpoint (seq 4, command 00000000-0000-0000-0000-000000000001) sent to group g at "
        "control offset 12; 2 live instance(s) by their heartbeats; acks as reported by the "
        "instances (unsigned):",
        f"  vm{ESCAPED}: rejected: stale_seq: {ESCAPED}",
        f"  gone{ESCAPED}: no ack within 5s",
        f"the group's decision (PostgreSQL control_log): rejected (x: y{ESCAPED})",
    ]


def test_pipeline_control_succeeds_on_applied_acks_only_with_the_groups_decision() -> None:
    envelope = sign(
        command=Checkpoint(name="cp"),
        command_id=uuid.UUID(int=2),
        seq=1,
        target="g",
        issuer="test",
        issued_at=NOW,
        expires_at=NOW + timedelta(hours=1),
        private_key=generate_key_pair()[0],
    )
    ack = Ack(
        command_id=envelope.command_id,
        seq=1,
        kind="checkpoint",
        instance_id="vm",
        group="g",
        outcome="applied",
        at=NOW,
    )
    delivery = Delivery(envelope, 0, ["vm"], {"vm": ack})
    applied = Decision(str(envelope.command_id), 1, "checkpoint", "applied")
    assert send_lines("g", delivery, applied, database_read=True, wait_s=5) == (
        [
            "checkpoint (seq 1, command 00000000-0000-0000-0000-000000000002) sent to group g "
            "at control offset 0; 1 live instance(s) by their heartbeats; acks as reported by "
            "the instances (unsigned):",
            "  vm: applied",
            "the group's decision (PostgreSQL control_log): applied",
        ],
        True,
    )
    # Applied acks and no decision in PostgreSQL: forged, so a failure; no database: the acks.
    lines, ok = send_lines("g", delivery, None, database_read=True, wait_s=5)
    assert (lines[-1], ok) == ("the group's decision (PostgreSQL control_log): none yet", False)
    assert send_lines("g", delivery, None, database_read=False, wait_s=5)[1] is True
