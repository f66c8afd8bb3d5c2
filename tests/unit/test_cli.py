"""The command line's own words: what `pipeline --help` tells a user first."""

from __future__ import annotations

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
