"""The compatibility run (`make compat`): the exactly-once integration tests against each
supported server, one pytest session (and one local stack) per cell, and a table of what
passed and how long it took. docs/compatibility.md states the matrix.

    python -m tests.compat                      # every cell
    python -m tests.compat pgbouncer-transaction postgres-13
    python -m tests.compat --list
    python -m tests.compat postgres-13 -- -x    # after --: pytest's own arguments

A cell is a set of environment variables that tests/conftest.py's local stack reads:
``PIPELINE_DEV_POSTGRES`` (a PostgreSQL major, from Maven Central's binaries when the
machine's own is another), ``PIPELINE_DEV_KAFKA`` (a Kafka release from Maven Central) and
``PIPELINE_TEST_POOLER`` (PgBouncer in front of PostgreSQL for the agents and migrations).
Exit status 1 when any test of any cell failed or errored, or a cell ran no test.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Kill -9 at random moments, rolling restarts and rebalances, poison records and dead
# letters (each kind that once stopped an agent, among good records under load), server
# restarts, redrive, the ingest connection's own codecs.
EXACTLY_ONCE_TESTS = (
    "tests/integration/test_agent.py",
    "tests/integration/test_dlq.py",
    "tests/integration/test_poison.py",
    "tests/integration/test_roundtrip.py",
)

CELLS: dict[str, dict[str, str]] = {
    "postgres-13": {"PIPELINE_DEV_POSTGRES": "13"},
    "postgres-17": {"PIPELINE_DEV_POSTGRES": "17"},
    "kafka-3.9": {"PIPELINE_DEV_KAFKA": "3.9.1"},
    "kafka-4.3": {"PIPELINE_DEV_KAFKA": "4.3.1"},
    "pgbouncer-transaction": {"PIPELINE_TEST_POOLER": "transaction"},
    "pgbouncer-session": {"PIPELINE_TEST_POOLER": "session"},
}

# What each cell leaves at the default: the other two dimensions.
_DIMENSIONS = ("PIPELINE_DEV_POSTGRES", "PIPELINE_DEV_KAFKA", "PIPELINE_TEST_POOLER")


@dataclass(frozen=True)
class Result:
    cell: str
    tests: int
    failed: int
    skipped: int
    seconds: float

    @property
    def passed(self) -> int:
        return self.tests - self.failed - self.skipped

    @property
    def ok(self) -> bool:
        return self.tests > 0 and self.failed == 0 and self.skipped == 0


def read_junit(path: Path, cell: str, seconds: float) -> Result:
    """A cell's counts from pytest's JUnit XML; a missing file is a cell that ran nothing."""
    if not path.exists():
        return Result(cell, 0, 0, 0, seconds)
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    assert suite is not None, f"{path}: no testsuite element"
    count = int(suite.get("tests", 0))
    failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    return Result(cell, count, failed, int(suite.get("skipped", 0)), seconds)


def table(results: list[Result]) -> str:
    lines = [f"{'CELL':<24}{'PASSED':>8}{'FAILED':>8}{'SKIPPED':>9}{'TIME':>10}"]
    for r in results:
        minutes, seconds = divmod(round(r.seconds), 60)
        lines.append(
            f"{r.cell:<24}{r.passed:>8}{r.failed:>8}{r.skipped:>9}{minutes:>6}m{seconds:02d}s"
        )
    return "\n".join(lines)


def run_cell(cell: str, workdir: Path, extra: list[str]) -> Result:
    env = {k: v for k, v in os.environ.items() if k not in _DIMENSIONS}
    env.update(CELLS[cell])
    report = workdir / f"{cell}.xml"
    print(f"== {cell}: {' '.join(f'{k}={v}' for k, v in CELLS[cell].items())}", flush=True)
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", f"--junitxml={report}", *extra, *EXACTLY_ONCE_TESTS],
        cwd=ROOT,
        env=env,
        check=False,
    )
    return read_junit(report, cell, time.monotonic() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.compat", description=__doc__)
    parser.add_argument("cells", nargs="*", help=f"cells to run (default: all): {list(CELLS)}")
    parser.add_argument("--list", action="store_true", help="print the cells and exit")
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if args.list:
        for name, env in CELLS.items():
            print(name, " ".join(f"{k}={v}" for k, v in env.items()))
        return 0
    unknown = [c for c in args.cells if c not in CELLS]
    if unknown:
        parser.error(f"unknown cell(s) {unknown}; choose from {', '.join(CELLS)}")
    cells = args.cells or list(CELLS)
    with tempfile.TemporaryDirectory(prefix="compat-") as workdir:
        results = [run_cell(cell, Path(workdir), extra) for cell in cells]
    print("\n" + table(results))
    total = sum(r.seconds for r in results)
    print(f"{len(results)} cell(s) in {total / 60:.1f} min")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
