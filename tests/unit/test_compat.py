"""The compatibility run's bookkeeping (tests/compat.py): counts read from pytest's JUnit XML,
and what makes a cell fail."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import compat

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="{errors}" failures="{failures}"
 skipped="{skipped}" tests="{tests}" time="12.5"></testsuite></testsuites>"""


def write(tmp_path: Path, **counts: int) -> Path:
    path = tmp_path / "cell.xml"
    path.write_text(JUNIT.format(**{"errors": 0, "failures": 0, "skipped": 0, **counts}))
    return path


def test_a_cell_whose_tests_all_passed_is_ok(tmp_path: Path) -> None:
    result = compat.read_junit(write(tmp_path, tests=12), "postgres-13", 95.0)
    assert result == compat.Result("postgres-13", 12, 0, 0, 95.0)
    assert (result.passed, result.ok) == (12, True)


def test_failures_errors_and_skips_fail_the_cell(tmp_path: Path) -> None:
    failed = compat.read_junit(write(tmp_path, tests=12, failures=1, errors=2), "c", 1.0)
    assert (failed.passed, failed.failed, failed.ok) == (9, 3, False)
    skipped = compat.read_junit(write(tmp_path, tests=12, skipped=1), "c", 1.0)
    assert (skipped.passed, skipped.ok) == (11, False)


def test_a_cell_that_wrote_no_report_ran_nothing_and_failed(tmp_path: Path) -> None:
    result = compat.read_junit(tmp_path / "missing.xml", "kafka-3.9", 3.0)
    assert (result.tests, result.ok) == (0, False)


def test_the_table_shows_counts_and_minutes() -> None:
    rows = [compat.Result("pgbouncer-transaction", 12, 0, 0, 245.0)]
    assert compat.table(rows).splitlines() == [
        "CELL                      PASSED  FAILED  SKIPPED      TIME",
        "pgbouncer-transaction         12       0        0     4m05s",
    ]


def test_each_cell_sets_one_dimension_and_the_matrix_has_oldest_and_newest() -> None:
    for env in compat.CELLS.values():
        assert len(env) == 1 and set(env) <= set(compat._DIMENSIONS)
    assert compat.CELLS["postgres-13"] == {"PIPELINE_DEV_POSTGRES": "13"}
    assert compat.CELLS["postgres-17"] == {"PIPELINE_DEV_POSTGRES": "17"}
    assert compat.CELLS["pgbouncer-transaction"] == {"PIPELINE_TEST_POOLER": "transaction"}


def test_unknown_cells_are_refused_and_pytest_arguments_follow_a_double_dash(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        compat.main(["postgres-13", "-p", "no:cacheprovider"])  # pytest's, without --
    assert exit_.value.code == 2
    assert "unrecognized arguments: -p" in capsys.readouterr().err
    ran: list[tuple[str, list[str]]] = []

    def run_cell(cell: str, workdir: Path, extra: list[str]) -> compat.Result:
        ran.append((cell, extra))
        return compat.Result(cell, 14, 0, 0, 1.0)

    monkeypatch.setattr(compat, "run_cell", run_cell)
    assert compat.main(["postgres-13", "--", "-p", "no:cacheprovider"]) == 0
    assert ran == [("postgres-13", ["-p", "no:cacheprovider"])]
