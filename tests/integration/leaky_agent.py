"""A DatabaseAgent that leaks: the soak run's negative control (docs/testing.md, "The soak run:
`make soak`"), which its verdict on growth must fail. Run as ``python -m
tests.integration.leaky_agent``, with the environment of ``pipeline run``, and
``LEAKY_AGENT_LEAKS`` saying what it keeps per batch: ``tasks`` (the default: one asyncio task
that never ends) or ``buffers`` (a 16 KiB buffer, one allocated block: memory that only
malloc's bytes in use show, besides RSS)."""

from __future__ import annotations

import asyncio
import os
import sys

import consumers.agent
from pipeline import cli
from pipeline.batching import Batch

LEAKS = ("tasks", "buffers")
BUFFER_BYTES = 16 * 1024


class LeakyAgent(consumers.agent.DatabaseAgent):
    _leaked: list[object]

    async def _fill_batch(self) -> Batch:
        batch = await super()._fill_batch()
        if batch.count:
            if not hasattr(self, "_leaked"):
                self._leaked = []
            if os.environ.get("LEAKY_AGENT_LEAKS", "tasks") == "buffers":
                self._leaked.append(bytearray(BUFFER_BYTES))  # LEAK
            else:
                self._leaked.append(asyncio.ensure_future(asyncio.Event().wait()))  # LEAK
        return batch


def main() -> int:
    leaks = os.environ.get("LEAKY_AGENT_LEAKS", "tasks")
    if leaks not in LEAKS:
        print(f"LEAKY_AGENT_LEAKS must be one of {', '.join(LEAKS)}, not {leaks!r}")
        return 2
    consumers.agent.DatabaseAgent = LeakyAgent  # type: ignore[misc]
    return cli.main(["run", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
