"""A DatabaseAgent that leaks one asyncio task per batch: the soak run's negative control
(docs/testing.md, "The soak run: `make soak`"), which its verdict on growth must fail. Run as
``python -m tests.integration.leaky_agent``, with the environment of ``pipeline run``."""

from __future__ import annotations

import asyncio
import sys

import consumers.agent
from pipeline import cli
from pipeline.batching import Batch


class LeakyAgent(consumers.agent.DatabaseAgent):
    _leaked: list[asyncio.Future[bool]]

    async def _fill_batch(self) -> Batch:
        batch = await super()._fill_batch()
        if batch.count:
            if not hasattr(self, "_leaked"):
                self._leaked = []
            self._leaked.append(asyncio.ensure_future(asyncio.Event().wait()))  # LEAK
        return batch


def main() -> int:
    consumers.agent.DatabaseAgent = LeakyAgent  # type: ignore[misc]
    return cli.main(["run", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
