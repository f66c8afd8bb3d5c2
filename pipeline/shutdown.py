"""How SIGTERM and SIGINT end ``pipeline run``: a bounded stop, and a second signal that does not
wait. docs/exactly-once.md ("SIGTERM (or SIGINT), and the shutdown deadline") describes it.

The first signal asks the agent to stop and arms a deadline on a thread of its own, so it
fires even if the event loop is blocked, or ``asyncio.run`` waits for a task that ignores its
cancellation (a third-party client's close, a lost cancel). Past the deadline, or on a second
signal, the process logs what it abandons and exits at once. Exactly once does not depend on
a clean exit: a transaction that did not commit is rolled back by PostgreSQL when the
connection drops, and the next owner starts from the stored offsets.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

#: What the close gets after the batch deadline: the last offset mirror, leaving the group,
#: the producers (docs/exactly-once.md: each bounded by 10 s on its own).
CLOSE_ALLOWANCE_S = 10.0
#: Exit status of a stop that had to abandon something (the deadline, or a second signal).
FORCED_EXIT_STATUS = 70  # EX_SOFTWARE: the clean stop did not finish


class BoundedStop:
    """The signal handler of ``pipeline run``. The first call runs ``stop`` and arms the
    deadline (``deadline_s`` from that call); a second call, or the deadline, calls ``exit``
    with :data:`FORCED_EXIT_STATUS` after logging the tasks and threads still running.

    ``loop`` is the event loop whose tasks are listed; ``exit`` is :func:`os._exit` (which
    runs no clean-up that could wait on what is stuck), replaceable in tests."""

    def __init__(
        self,
        stop: Callable[[], None],
        deadline_s: float,
        loop: asyncio.AbstractEventLoop,
        *,
        exit: Callable[[int], None] = os._exit,
    ) -> None:
        self._stop = stop
        self.deadline_s = deadline_s
        self._loop = loop
        self._exit = exit
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._forced = False
        self._signalled = False

    def signalled(self, signum: int = signal.SIGTERM) -> None:
        """The first signal stops the agent and arms the deadline; the next exits at once."""
        name = signal.Signals(signum).name
        if self._timer is not None:
            self._force(f"a second {name}" if self._signalled else f"{name} while exiting")
            return
        self._signalled = True
        log.info(
            "%s: stopping; exiting within %.0fs whatever is still running", name, self.deadline_s
        )
        self.arm()
        self._stop()

    def arm(self) -> None:
        """Start the deadline, unless it runs already: the process exits when it passes."""
        if self._timer is None:
            self._timer = threading.Timer(self.deadline_s, self._force, ("the stop deadline",))
            self._timer.daemon = True
            self._timer.name = "pipeline-stop-deadline"
            self._timer.start()

    def _force(self, why: str) -> None:
        with self._lock:  # the deadline and a second signal may come together
            if self._forced:
                return
            self._forced = True
        try:
            log.error(
                "%s: exiting now (status %d), abandoning %s",
                why,
                FORCED_EXIT_STATUS,
                "; ".join(running(self._loop)) or "nothing",
            )
            for handler in logging.getLogger().handlers:
                handler.flush()
            sys.stderr.flush()
        finally:
            self._exit(FORCED_EXIT_STATUS)


def running(loop: asyncio.AbstractEventLoop) -> list[str]:
    """The unfinished tasks of ``loop``, each with where it waits, and the threads other than
    the main one and daemons: what a forced exit abandons. Read from any thread: what it cannot
    read (a task that changes meanwhile) it names without a place."""
    found = []
    try:
        tasks = asyncio.all_tasks(loop)
    except RuntimeError:  # the loop's task set changed while it was read, every time
        tasks = set()
    for task in tasks:
        try:
            where = _waits_at(task)
        except Exception:  # a diagnostic must not stop the exit
            where = ""
        found.append(f"task {task.get_name()}{where or ' ' + _coroutine_name(task)}")
    found.extend(
        f"thread {t.name}"
        for t in threading.enumerate()
        if t is not threading.main_thread() and not t.daemon
    )
    return sorted(found)


def _waits_at(task: asyncio.Task[object]) -> str:
    """Where ``task`` waits: its chain of awaited coroutines, outermost first, and the line
    of the innermost."""
    frames = []
    coro: object = task.get_coro()
    while coro is not None and hasattr(coro, "cr_frame"):
        frame = getattr(coro, "cr_frame", None)
        if frame is not None:
            frames.append(frame)
        coro = getattr(coro, "cr_await", None)
    if not frames:
        return ""
    last = frames[-1]
    chain = " > ".join(f.f_code.co_qualname for f in frames)
    return f" at {chain} ({os.path.basename(last.f_code.co_filename)}:{last.f_lineno})"


def _coroutine_name(task: asyncio.Task[object]) -> str:
    coro = task.get_coro()
    return str(getattr(coro, "__qualname__", type(coro).__name__))
