"""The command line's own words: what `pipeline --help` tells a user first, what an error
becomes (one line, exit 2), and that every --help works without the drivers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from pipeline import cli
from pipeline.commands import migrate

ROOT = Path(__file__).resolve().parents[2]


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

    monkeypatch.setattr(migrate, "migrate", meets_a_pooler)
    assert cli.main(["migrate"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith('pipeline: error: prepared statement "__asyncpg_stmt_1__" already')
    assert "set PIPELINE_DB_POOLER=transaction" in line


def test_a_driver_error_that_is_not_ours_to_explain_is_raised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fails(_: object) -> int:
        raise asyncpg.PostgresError("something else")

    monkeypatch.setattr(migrate, "migrate", fails)
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


DRIVERS_BLOCKED = """
import argparse, contextlib, importlib.abc, io, json, sys

class NoDrivers(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"asyncpg", "aiokafka"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoDrivers())
from pipeline import cli

def commands(parser, path):
    yield path
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, [*path, name])

def run(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = cli.main(argv)
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue()

print(json.dumps({
    "help": {"-".join(["pipeline", *p]): run([*p, "--help"]) for p in commands(cli.parser(), [])},
    "keygen": run(["control", "keygen", sys.argv[1]]),
    "loaded": sorted(m for m in sys.modules if m.partition(".")[0] in {"asyncpg", "aiokafka"}),
}))
"""


def test_every_help_page_and_a_command_without_a_server_work_without_the_drivers(
    tmp_path: Path,
) -> None:
    """With asyncpg and aiokafka impossible to import, every --help page is printed, the same
    as its golden copy, and `control keygen` (no server) runs: the command modules load the
    drivers in the handlers that use them. (The `dev` handlers do use them: pipeline/cli.py.)"""
    done = subprocess.run(
        [sys.executable, "-c", DRIVERS_BLOCKED, str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "100"},
        timeout=60,
    )
    assert (done.returncode, done.stderr) == (0, "")
    found = json.loads(done.stdout)
    goldens = {p.stem: p.read_text() for p in (ROOT / "tests/unit/cli_help").glob("*.txt")}
    assert found["help"] == {name: [0, page] for name, page in goldens.items()}
    code, out = found["keygen"]
    lines = out.splitlines()
    assert (code, lines[:2]) == (
        0,
        [
            f"private key: {tmp_path / 'antigravity.key'} (mode 0600; for "
            "PIPELINE_CONTROL_PRIVATE_KEY_FILE)",
            f"public key:  {tmp_path / 'antigravity.pub'} (for the agents' "
            "PIPELINE_CONTROL_PUBLIC_KEYS)",
        ],
    )
    assert len(lines) == 3 and lines[2].startswith("key id:      ")
    assert (tmp_path / "antigravity.key").stat().st_mode & 0o777 == 0o600
    assert found["loaded"] == []
