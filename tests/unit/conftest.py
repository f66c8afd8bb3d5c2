"""Fixtures several unit test modules share."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def shared_tmp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The system temp dir of this test: a 1777 directory of its own in /tmp (which the
    server's user can reach, unlike pytest's tmp_path as root)."""
    shared = Path(tempfile.mkdtemp(prefix="test-devstack-"))
    shared.chmod(0o1777)
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    try:
        yield shared
    finally:
        shutil.rmtree(shared)
