"""What the control plane refuses at its edges: a command signed to live too long, a private
key file others may read, a control topic with more than one partition; and how rejections
are logged (a count per interval, not a line per record)."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest

from pipeline.control import (
    MAX_COMMAND_LIFETIME,
    Apply,
    ControlError,
    RejectionTally,
    check_control_partitions,
    read_private_key_file,
    write_private_key_file,
)
from tests.unit.test_control import KEY, NOW, fields, make, rejected, run, signed_wire

# -- the longest a command may live ------------------------------------------------------------


def test_a_command_may_live_24_hours_at_most() -> None:
    assert timedelta(hours=24) == MAX_COMMAND_LIFETIME
    at_limit = signed_wire(fields(expires_at=NOW + MAX_COMMAND_LIFETIME))
    assert isinstance(run(at_limit), Apply)
    over = signed_wire(fields(expires_at=NOW + MAX_COMMAND_LIFETIME + timedelta(microseconds=1)))
    refused = rejected(run(over))
    assert refused.reason == "lifetime_too_long"
    assert refused.detail == "lives 1 day, 0:00:00.000001, over the limit of 1 day, 0:00:00"
    years = signed_wire(fields(expires_at=NOW + timedelta(days=3650)))
    assert rejected(run(years)).reason == "lifetime_too_long"


def test_the_lifetime_is_checked_after_the_command_and_before_the_clock() -> None:
    bad_command = signed_wire(
        fields(
            expires_at=NOW + timedelta(days=3650), command={"kind": "activate", "streams": ["X"]}
        )
    )
    assert rejected(run(bad_command)).reason == "invalid_command"
    long_expired = signed_wire(fields(expires_at=NOW + timedelta(days=3650)))
    assert rejected(run(long_expired, now=NOW + timedelta(days=4000))).reason == (
        "lifetime_too_long"
    )
    other_group = signed_wire(fields(expires_at=NOW + timedelta(days=2), target="other"))
    assert rejected(run(other_group)).reason == "lifetime_too_long"


def test_the_limit_is_a_parameter() -> None:
    two_hours = signed_wire(fields(expires_at=NOW + timedelta(hours=2)))
    assert rejected(run(two_hours, max_lifetime=timedelta(hours=1))).reason == ("lifetime_too_long")


def test_the_orchestrator_does_not_sign_a_command_beyond_it() -> None:
    assert make(lifetime=MAX_COMMAND_LIFETIME).expires_at == NOW + MAX_COMMAND_LIFETIME
    with pytest.raises(ControlError, match=r"may live 1 day, 0:00:00 at most .* not 2 days"):
        make(lifetime=timedelta(days=2))


# -- the private key file's mode ---------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o610, 0o601, 0o700])
def test_a_private_key_others_may_access_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "antigravity.key"
    write_private_key_file(path, KEY)
    os.chmod(path, mode)
    if mode & 0o077 == 0:
        assert read_private_key_file(path).public_key() == KEY.public_key()
        return
    expected = f"the private key {path} has mode {mode:04o}: it must be readable by its owner"
    with pytest.raises(ControlError, match=expected):
        read_private_key_file(path)


def test_a_private_key_of_mode_0600_or_0400_is_read(tmp_path: Path) -> None:
    path = tmp_path / "antigravity.key"
    write_private_key_file(path, KEY)
    assert read_private_key_file(path).public_key() == KEY.public_key()
    os.chmod(path, 0o400)
    assert read_private_key_file(path).public_key() == KEY.public_key()


# -- the control topic's partitions ------------------------------------------------------------


def test_a_control_topic_of_one_partition_is_fine() -> None:
    check_control_partitions("antigravity.control", 1)


@pytest.mark.parametrize("partitions", [2, 6])
def test_a_control_topic_of_more_partitions_is_refused(partitions: int) -> None:
    with pytest.raises(
        ControlError, match=f"the control topic t.antigravity.control has {partitions} partitions"
    ):
        check_control_partitions("t.antigravity.control", partitions)


# -- rejections logged by the count ------------------------------------------------------------


def test_the_first_rejection_is_logged_at_once_then_one_line_per_interval() -> None:
    tally = RejectionTally(interval_s=10.0)
    assert tally.add(1, "unknown at offset 0: undecodable: x", now=100.0) == (
        "1 control record(s) rejected since the last such line; the last: "
        "unknown at offset 0: undecodable: x"
    )
    for offset in range(1, 10_000):
        assert tally.add(1, f"unknown at offset {offset}: undecodable: x", now=101.0) is None
    assert tally.due(109.9) is None
    assert tally.due(110.0) == (
        "9999 control record(s) rejected since the last such line; the last: "
        "unknown at offset 9999: undecodable: x"
    )
    assert tally.due(200.0) is None  # nothing new: nothing to say
    assert tally.add(3, "checkpoint at offset 10002: stale_seq: y", now=200.0) == (
        "3 control record(s) rejected since the last such line; the last: "
        "checkpoint at offset 10002: stale_seq: y"
    )
