"""The command line's own words: what `pipeline --help` tells a user first."""

from __future__ import annotations

from pathlib import Path

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


@pytest.mark.parametrize(
    ("args", "environ", "message"),
    [
        (
            ["--kafka", "3.6.2"],
            {},
            "--kafka=3.6.2: the local stack runs Kafka 3.7 or later 3.x, or 4.x (default 4.3.1)",
        ),
        (
            [],
            {"PIPELINE_DEV_KAFKA": "latest"},
            "PIPELINE_DEV_KAFKA='latest' is not a Kafka version: give one like 4.3.1",
        ),
    ],
)
def test_dev_up_refuses_a_kafka_release_it_cannot_run_before_touching_anything(
    args: list[str],
    environ: dict[str, str],
    message: str,
    *,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL", "PIPELINE_DEV_KAFKA"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    home = tmp_path / "stack"
    monkeypatch.setenv("PIPELINE_DEV_HOME", str(home))
    assert cli.main(["dev", "up", *args]) == 2
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", f"pipeline: error: {message}\n")
    assert not home.exists()


@pytest.mark.parametrize(
    ("args", "environ", "message"),
    [
        (
            ["--metrics-hosts", "vm-1,evil@vm-2"],
            {},
            "--metrics-hosts: 'evil@vm-2' is not a host name, an IP address or a network",
        ),
        (
            [],
            {"PIPELINE_TOP_METRICS_HOSTS": "10.0.0.0/33"},
            "PIPELINE_TOP_METRICS_HOSTS: '10.0.0.0/33' is not a host name, an IP address or a "
            "network",
        ),
    ],
)
def test_top_refuses_a_metrics_host_it_cannot_check(
    args: list[str],
    environ: dict[str, str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["top", "--once", *args]) == 2
    assert capsys.readouterr().err == f"pipeline: error: {message}\n"
