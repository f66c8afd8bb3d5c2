"""The alert rules in deploy/prometheus/rules/: promtool accepts them, their promtool tests pass,
and every alert has a case where it fires and one where it must not.

promtool is Prometheus' own checker (Debian: ``apt-get install prometheus``); without it these
tests fail, naming the package. The YAML files are not parsed with a YAML library (none is a
dependency, and promtool is the authority on what they mean): the rules file is split at its
``- alert:`` lines, which promtool's rule count confirms, and the test files are read by the
layout their header describes. That reading is checked independently: with an alert deleted
from the rules, promtool's tests must fail, so each case said to fire really does need it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules" / "pipeline.rules.yml"
TESTS_DIR = ROOT / "deploy" / "prometheus" / "tests"
DOCS = ROOT / "docs" / "observability-operations.md"
ALERT_LINE = re.compile(r"^ {6}- alert: (\S+)\s*$", re.MULTILINE)


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail(
            "promtool is not installed: it checks the alert rules. Install Prometheus' tools "
            "(Debian/Ubuntu: apt-get install prometheus)"
        )
    return found


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=120, check=False
    )


def alert_blocks(text: str) -> dict[str, str]:
    """Each alert's text in a rules file, by name (the file's layout: one rule per
    ``      - alert: NAME`` line, to the next one)."""
    starts = list(ALERT_LINE.finditer(text))
    return {
        m.group(1): text[m.start() : nxt.start() if nxt else len(text)]
        for m, nxt in zip(starts, [*starts[1:], None], strict=True)
    }


def promtool_test_files() -> list[Path]:
    files = sorted(TESTS_DIR.glob("*.yml"))
    assert files, f"no promtool test files in {TESTS_DIR}"
    return files


def cases(path: Path) -> list[tuple[str, bool]]:
    """(alertname, fires) of every alert_rule_test case in a promtool test file."""
    found: list[tuple[str, bool]] = []
    alertname: str | None = None
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if m := re.fullmatch(r"\s*alertname:\s*(\S+)\s*", line):
            assert alertname is None, f"{path.name}:{number}: alertname without exp_alerts"
            alertname = m.group(1)
        elif m := re.fullmatch(r"\s*exp_alerts:\s*(.*?)\s*", line):
            assert alertname is not None, f"{path.name}:{number}: exp_alerts without alertname"
            if m.group(1) == "[]":
                found.append((alertname, False))
            else:
                following = next((x for x in lines[number:] if x.strip()), "")
                assert m.group(1) == "" and following.strip().startswith("- exp_labels:"), (
                    f"{path.name}:{number}: exp_alerts must be [] or a list of exp_labels"
                )
                found.append((alertname, True))
            alertname = None
    evals = sum(1 for line in lines if re.fullmatch(r"\s*- eval_time:.*", line))
    assert evals == len(found), f"{path.name}: {evals} cases but {len(found)} read"
    return found


def test_promtool_checks_the_rules() -> None:
    result = run_promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    count = re.search(r"SUCCESS: (\d+) rules found", result.stdout)
    assert count is not None, result.stdout
    # Every rule is an alert (promtool's count), and each is one block of the file's layout.
    assert int(count.group(1)) == len(alert_blocks(RULES.read_text())) == 12


def test_promtool_tests_pass() -> None:
    result = run_promtool("test", "rules", *map(str, promtool_test_files()))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_fires_in_one_case_and_not_in_another() -> None:
    alerts = set(alert_blocks(RULES.read_text()))
    kinds: dict[str, set[bool]] = defaultdict(set)
    for path in promtool_test_files():
        for alertname, fires in cases(path):
            assert alertname in alerts, f"{path.name} tests {alertname}, which is not a rule"
            kinds[alertname].add(fires)
    missing = {a: {True, False} - kinds[a] for a in sorted(alerts) if kinds[a] != {True, False}}
    words = {True: "firing", False: "silent"}
    assert not missing, "alerts without a case: " + ", ".join(
        f"{a} ({'/'.join(words[k] for k in sorted(ks))})" for a, ks in missing.items()
    )


def test_each_firing_case_needs_its_rule(tmp_path: Path) -> None:
    """Deleting an alert from the rules makes promtool's tests fail: the cases read as firing
    above really expect it (a check of that reading, independent of it)."""
    text = RULES.read_text()
    (tmp_path / "tests").mkdir()
    copies = []
    for path in promtool_test_files():
        copy = tmp_path / "tests" / path.name
        shutil.copy(path, copy)
        copies.append(str(copy))
    (tmp_path / "rules").mkdir()
    for name, block in alert_blocks(text).items():
        (tmp_path / "rules" / RULES.name).write_text(text.replace(block, ""))
        result = run_promtool("test", "rules", *copies)
        assert result.returncode != 0, f"the tests still pass without {name}"
        output = result.stdout + result.stderr
        assert f"alertname: {name}," in output, output


def test_each_alert_has_severity_annotations_and_a_documented_runbook() -> None:
    docs = DOCS.read_text()
    for name, block in alert_blocks(RULES.read_text()).items():
        assert re.search(r"^ +for: \d+[smh]$", block, re.MULTILINE) or name in {
            "PipelineDeadLetters",
            "PipelineControlCommandRejected",  # fire at once: each event counts
        }, f"{name}: no for:"
        assert re.search(r"severity: (critical|warning|info)\n", block), f"{name}: severity"
        for annotation in ("summary", "description"):
            assert f"{annotation}: " in block, f"{name}: no {annotation}"
        anchor = name.lower()
        assert f"runbook_url: docs/observability-operations.md#{anchor}\n" in block, name
        assert f"### {name}\n" in docs, f"{DOCS.name} has no section for {name}"
