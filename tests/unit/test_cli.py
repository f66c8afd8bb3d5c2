"""The command line's own words: what `pipeline --help` tells a user first."""

from __future__ import annotations

import asyncpg
import pytest

from pipeline import cli


def test_help_opens_with_what_the_command_does(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    usage, description = out.split("\n\n")[:2]
    assert usage.startswith("usage: pipeline [-h] COMMAND ...")
    assert " ".join(description.split()) == cli.DESCRIPTION
    assert description.startswith("Ingest an agent fleet's data from Kafka into PostgreSQL")
    assert "import" not in description


def test_a_driver_error_no_command_classified_is_one_line_when_it_is_ours(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A transaction pooler's stale statement met at start-up (say in the schema check):
    exit 2 and the line naming PIPELINE_DB_POOLER, not a traceback."""

    def meets_a_pooler(_: object) -> int:
        raise asyncpg.DuplicatePreparedStatementError(
            'prepared statement "__asyncpg_stmt_1__" already exists'
        )

    monkeypatch.setattr(cli, "_migrate", meets_a_pooler)
    assert cli.main(["migrate"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith('pipeline: error: prepared statement "__asyncpg_stmt_1__" already')
    assert "set PIPELINE_DB_POOLER=transaction" in line


def test_a_driver_error_that_is_not_ours_to_explain_is_raised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fails(_: object) -> int:
        raise asyncpg.PostgresError("something else")

    monkeypatch.setattr(cli, "_migrate", fails)
    with pytest.raises(asyncpg.PostgresError, match="something else"):
        cli.main(["migrate"])
