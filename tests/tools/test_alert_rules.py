"""The alert rules in deploy/prometheus/rules/: promtool accepts them, their promtool tests pass,
and every alert has a case where it fires and one where it must not.

promtool is Prometheus' own checker (Debian: ``apt-get install prometheus``); without it these
tests fail, naming the package. The YAML files are not parsed with a YAML library (none is a
dependency, and promtool is the authority on what they mean): the rules file is split at its
``- alert:`` lines, which promtool's rule count confirms, and the test files are read by the
layout their header describes. promtool checks that reading too: with every alert renamed,
its tests fail in exactly the cases read as firing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import defaultdict
from dataclasses import dataclass
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


def seconds(duration: str) -> int:
    """A Prometheus duration (``65m``, ``1h5m``, ``30s``) in seconds."""
    parts = re.findall(r"(\d+)([hms])", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(int(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


@dataclass(frozen=True)
class Case:
    alertname: str
    eval_seconds: int
    fires: bool  # exp_alerts lists alerts; else it is []


def cases(path: Path) -> list[Case]:
    """Every alert_rule_test case of a promtool test file, by the layout its header gives:
    ``- eval_time:``, then ``alertname:``, then ``exp_alerts: []`` or ``exp_alerts:`` and a
    list of ``- exp_labels:``."""
    found: list[Case] = []
    eval_time: str | None = None
    alertname: str | None = None
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        where = f"{path.name}:{number}"
        if m := re.fullmatch(r"\s*- eval_time:\s*(\S+)\s*", line):
            assert eval_time is None, f"{where}: eval_time without alertname and exp_alerts"
            eval_time = m.group(1)
        elif m := re.fullmatch(r"\s*alertname:\s*(\S+)\s*", line):
            assert eval_time is not None and alertname is None, f"{where}: alertname out of place"
            alertname = m.group(1)
        elif m := re.fullmatch(r"\s*exp_alerts:\s*(.*?)\s*", line):
            assert eval_time is not None and alertname is not None, f"{where}: exp_alerts alone"
            following = next((x for x in lines[number:] if x.strip()), "")
            fires = m.group(1) == "" and following.strip().startswith("- exp_labels:")
            assert fires or m.group(1) == "[]", f"{where}: exp_alerts: [] or a list of exp_labels"
            found.append(Case(alertname, seconds(eval_time), fires))
            eval_time = alertname = None
    assert eval_time is None and alertname is None, f"{path.name}: a case without exp_alerts"
    return found


def test_promtool_checks_the_rules() -> None:
    result = run_promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    count = re.search(r"SUCCESS: (\d+) rules found", result.stdout)
    assert count is not None, result.stdout
    # Every rule is an alert (promtool's count), and each is one block of the file's layout.
    assert int(count.group(1)) == len(alert_blocks(RULES.read_text())) == 16


def test_promtool_tests_pass() -> None:
    result = run_promtool("test", "rules", *map(str, promtool_test_files()))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_fires_in_one_case_and_not_in_another() -> None:
    alerts = set(alert_blocks(RULES.read_text()))
    kinds: dict[str, set[bool]] = defaultdict(set)
    for path in promtool_test_files():
        for case in cases(path):
            assert case.alertname in alerts, f"{path.name}: {case.alertname} is not a rule"
            kinds[case.alertname].add(case.fires)
    missing = {a: {True, False} - kinds[a] for a in sorted(alerts) if kinds[a] != {True, False}}
    words = {True: "firing", False: "silent"}
    assert not missing, "alerts missing a case of a kind: " + ", ".join(
        f"{a} ({'/'.join(words[k] for k in sorted(ks))})" for a, ks in missing.items()
    )


def test_exactly_the_firing_cases_need_their_alert(tmp_path: Path) -> None:
    """With every alert renamed in a copy of the rules, promtool's tests fail in exactly the
    cases read above as firing (and pass the silent ones): a check of that reading by promtool
    itself."""
    (tmp_path / "rules").mkdir()
    renamed = ALERT_LINE.sub(r"      - alert: \g<1>Renamed", RULES.read_text())
    (tmp_path / "rules" / RULES.name).write_text(renamed)
    (tmp_path / "tests").mkdir()
    copies = [str(shutil.copy(path, tmp_path / "tests")) for path in promtool_test_files()]
    result = run_promtool("test", "rules", *copies)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    failed = {
        (name, seconds(time))
        for name, time in re.findall(r"alertname: (\w+), time: (\w+),", output)
    }
    firing = {
        (case.alertname, case.eval_seconds)
        for path in promtool_test_files()
        for case in cases(path)
        if case.fires
    }
    assert failed == firing, output


def test_each_alert_has_severity_annotations_and_a_documented_runbook() -> None:
    docs = DOCS.read_text()
    for name, block in alert_blocks(RULES.read_text()).items():
        assert re.search(r"^ +for: \d+[smh]$", block, re.MULTILINE) or name in {
            "PipelineDeadLetters",
            "PipelineRecordsLost",
            "PipelineControlCommandRejected",  # fire at once: each event counts
        }, f"{name}: no for:"
        assert re.search(r"severity: (critical|warning|info)\n", block), f"{name}: severity"
        for annotation in ("summary", "description"):
            assert f"{annotation}: " in block, f"{name}: no {annotation}"
        anchor = name.lower()
        assert f"runbook_url: docs/observability-operations.md#{anchor}\n" in block, name
        assert f"### {name}\n" in docs, f"{DOCS.name} has no section for {name}"


def test_the_docs_table_gives_each_alert_its_severity_and_for() -> None:
    table = {
        m.group(1): (m.group(2), m.group(3))
        for m in re.finditer(
            r"^\| (Pipeline\w+) \| (\w+) \| .* \| ([\w ]+) \|$", DOCS.read_text(), re.M
        )
    }
    rules = {}
    for name, block in alert_blocks(RULES.read_text()).items():
        severity = re.search(r"severity: (\w+)", block)
        duration = re.search(r"^ +for: (\w+)$", block, re.MULTILINE)
        assert severity is not None, name
        rules[name] = (severity.group(1), duration.group(1) if duration else "at once")
    assert table == rules
