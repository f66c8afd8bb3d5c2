"""Every `pipeline ... --help` page, compared with its golden copy in tests/unit/cli_help/.

A change of wording shows up here as a diff to review. After a deliberate change, rewrite the
goldens with ``PIPELINE_UPDATE_HELP_GOLDENS=1 pytest tests/unit/test_cli_help.py`` and commit
them with it. COLUMNS is fixed so that argparse wraps the same on every terminal.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from pipeline import cli

GOLDENS = Path(__file__).parent / "cli_help"
UPDATE = os.environ.get("PIPELINE_UPDATE_HELP_GOLDENS") == "1"
COLUMNS = "100"
# argparse lists a command's subcommands under their metavar, each name indented by 4.
SUBCOMMAND = re.compile(r"^    (\S+)")


def help_page(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> str:
    monkeypatch.setenv("COLUMNS", COLUMNS)
    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv, "--help"])
    assert exit_.value.code == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    return captured.out


def subcommands(page: str) -> list[str]:
    """The subcommands a help page lists (none for a leaf command)."""
    lines = page.splitlines()
    for i, line in enumerate(lines):
        if line in ("  COMMAND", "  ACTION"):
            block = []
            for following in lines[i + 1 :]:
                if not following.startswith("    "):
                    break
                if match := SUBCOMMAND.match(following):
                    block.append(match.group(1))
            return block
    return []


def every_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> dict[str, str]:
    """Each command path's golden name (``pipeline-dev-up``) and its help page, found by
    walking the subcommands from `pipeline --help` down."""
    pages = {}
    pending: list[list[str]] = [[]]
    while pending:
        argv = pending.pop()
        page = help_page(argv, monkeypatch, capsys)
        pages["-".join(["pipeline", *argv])] = page
        pending.extend([*argv, name] for name in subcommands(page))
    return pages


def test_every_help_page_matches_its_golden(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pages = every_command(monkeypatch, capsys)
    if UPDATE:
        GOLDENS.mkdir(exist_ok=True)
        for stale in GOLDENS.glob("*.txt"):
            stale.unlink()
        for name, page in pages.items():
            (GOLDENS / f"{name}.txt").write_text(page)
    goldens = {path.stem: path.read_text() for path in GOLDENS.glob("*.txt")}
    assert sorted(pages) == sorted(goldens)  # a command added or gone: update the goldens
    for name, page in sorted(pages.items()):
        assert page == goldens[name], f"{name}: help differs from tests/unit/cli_help/{name}.txt"


def test_the_walk_finds_every_command_and_subcommand(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pages = every_command(monkeypatch, capsys)
    assert len(pages) == 41
    assert {
        "pipeline",
        "pipeline-dev",
        "pipeline-dev-up",
        "pipeline-control-rollback",
        "pipeline-gaps-ack",
        "pipeline-partitions-maintain",
        "pipeline-streams-plan",
    } <= set(pages)
    assert "pipeline-replay-list" not in pages  # `replay list` is a choice, not a subparser
