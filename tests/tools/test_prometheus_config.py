"""The configuration the local Prometheus is started with (pipeline/devstack/prometheus.py):
promtool accepts it, with the repository's rules, and the targets file is file_sd's format."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.devstack.prometheus import (
    DEFAULT_TARGETS,
    JOB,
    config_text,
    repository_rules,
    targets_json,
)


def test_the_generated_config_passes_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: apt-get install prometheus (Debian/Ubuntu)")
    rules = repository_rules()
    assert [p.name for p in rules] == ["pipeline.rules.yml"]
    targets = tmp_path / "targets.json"
    targets.write_text(targets_json(DEFAULT_TARGETS))
    config = tmp_path / "prometheus.yml"
    config.write_text(config_text(targets, rules, "1s", "2s"))
    result = subprocess.run(
        [promtool, "check", "config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "SUCCESS: 16 rules found" in output
    text = config.read_text()
    assert f'job_name: "{JOB}"' in text and JOB == "database-agent"
    assert re.search(r"scrape_interval: 1s\n.*\n  evaluation_interval: 2s\n", text)


def test_the_targets_file_lists_the_agents_for_file_sd() -> None:
    assert json.loads(targets_json(["127.0.0.1:9108", "127.0.0.1:9109"])) == [
        {"targets": ["127.0.0.1:9108", "127.0.0.1:9109"], "labels": {}}
    ]
    assert DEFAULT_TARGETS == ("127.0.0.1:9108",)  # PIPELINE_METRICS_ADDRESS's default
