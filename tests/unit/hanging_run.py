"""``pipeline run``'s signal handling and exit
(``pipeline.commands.run._run_until_signalled`` and ``run_controlled``) around a stand-in agent
and controller, for test_shutdown.py. Run as
``python -m tests.unit.hanging_run KIND SHUTDOWN_TIMEOUT_S CLOSE_ALLOWANCE_S``; it prints
``ready`` once the signal handlers are installed. KIND says what the controller does once
cancelled:

* ``clean``: it stops;
* ``lost-cancel``: it waits on a task that swallows its cancellation, as aiokafka's fetcher
  does, so its cancellation is lost and it never ends;
* ``blocks-loop``: it blocks the event loop for good (a synchronous call that never returns).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from types import SimpleNamespace
from typing import Any

from pipeline import shutdown
from pipeline.commands import run


class Agent:
    """What run_controlled and the signal handling use of a DatabaseAgent."""

    def __init__(self, shutdown_timeout_s: float) -> None:
        self.config = SimpleNamespace(shutdown_timeout_s=shutdown_timeout_s)
        self._stopped: asyncio.Event | None = None

    async def run(self) -> None:
        self._stopped = asyncio.Event()
        print("ready", flush=True)
        await self._stopped.wait()
        print("DatabaseAgent stopped", flush=True)

    def stop(self) -> None:
        assert self._stopped is not None
        self._stopped.set()


class Controller:
    def __init__(self, kind: str) -> None:
        self.kind = kind

    async def prepare(self) -> None:
        pass

    async def run(self) -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            if self.kind == "lost-cancel":
                await _swallowing()
            elif self.kind == "blocks-loop":
                time.sleep(3600)  # noqa: ASYNC251 - the point: a loop blocked for good


async def _swallowing() -> None:
    """Wait on a task that treats every cancellation as "no longer of interest" and goes on."""

    async def stubborn() -> None:
        while True:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(3600)

    await asyncio.ensure_future(stubborn())


def main(argv: list[str]) -> int:
    kind, timeout_s, allowance_s = argv[0], float(argv[1]), float(argv[2])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    shutdown.CLOSE_ALLOWANCE_S = allowance_s
    agent: Any = Agent(timeout_s)
    controller: Any = Controller(kind)
    asyncio.run(run._run_until_signalled(agent, controller))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
