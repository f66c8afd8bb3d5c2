"""The collector tuning of `pipeline run` and `pipeline replay` (pipeline/commands/_common.py):
young collections wait for a million net allocations, and a thread collects the cyclic garbage
that never reaches that many."""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Iterator

import pytest

from pipeline.commands._common import tune_garbage_collector


class _Cycle:
    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def collector_as_it_was() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_cyclic_garbage_is_collected_though_no_young_collection_runs(
    collector_as_it_was: None,
) -> None:
    stop = tune_garbage_collector(collect_every_s=0.05)
    try:
        assert gc.get_threshold() == (1_000_000, 10, 10)
        collected = threading.Event()
        cycle = _Cycle()
        weakref.finalize(cycle, collected.set)
        del cycle  # unreachable now, and far fewer than a million allocations to come
        assert collected.wait(10), "the cycle was not collected within 10 s"
    finally:
        stop.set()


def test_the_collecting_thread_ends_when_told(collector_as_it_was: None) -> None:
    stop = tune_garbage_collector(collect_every_s=0.05)
    thread = next(t for t in threading.enumerate() if t.name == "pipeline-gc")
    assert thread.daemon
    stop.set()
    thread.join(5)
    assert not thread.is_alive()
