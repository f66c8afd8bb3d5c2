"""``pipeline run`` with a test hook, for test_network_faults.py: it adds a Toxiproxy toxic at
one exact point of the agent's work, which a toxic added from outside would hit only by
chance:

* ``copy``: just before the COPY into ``table`` of the ``nth`` batch transaction that moves
  offsets and copies at least ``min_rows`` rows into ``table`` (counting every attempt);
* ``commit``: just before the COMMIT of that transaction, once its last statement is done;
* ``dead_letters``: just before the ``nth`` send of a batch's dead letters.

The toxic is removed as soon as that statement (or send) has ended, failed or not, so the
retry meets a sound network; what happened is written to ``report`` (JSON: the moves of the
transaction, the rows of the COPY, the error). The hook fires once per process.

With ``side_bootstrap``, the controller's Kafka clients and the lag probe bootstrap there
instead of ``KAFKA_BOOTSTRAP_SERVERS`` (a second proxy in front of the same broker), so that
a test can cut them off alone.

The hook's settings come as JSON in :data:`HOOK_ENV` (:func:`hook_env` writes it). Run as
``python -m tests.integration.hooked_agent`` with the environment of ``pipeline run``;
tests/integration/broken_fence_agent.py adds a broken fence to it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgspec

import consumers.agent
import consumers.controller
from consumers.lag_watch import probe_for
from pipeline import cli, db
from pipeline import kafka as kafka_io
from pipeline.kafka_clients import KafkaSettings
from pipeline.lag_probe import LagProbe
from tests.toxiproxy import request

HOOK_ENV = "NETWORK_FAULT_HOOK"
COMMAND = [sys.executable, "-m", "tests.integration.hooked_agent"]


@dataclass(frozen=True)
class Toxic:
    kind: str
    stream: str
    attributes: dict[str, int]


@dataclass(frozen=True)
class Hook:
    """Where to add which toxic on which proxy (of the Toxiproxy server at ``api``)."""

    api: str = ""
    proxy: str = ""
    at: str = ""  # "copy", "commit", "dead_letters" or "" (no toxic: side_bootstrap alone)
    nth: int = 1
    table: str = "performance_metrics"  # for "copy" and "commit"
    min_rows: int = 1  # COPYs into the table of fewer rows are not counted
    toxic: Toxic | None = None
    report: str = ""
    side_bootstrap: str = ""
    # Filled in the agent process: what it saw.
    seen: dict[str, Any] = field(default_factory=dict)


def hook_env(env: dict[str, str], hook: Hook) -> dict[str, str]:
    """``env`` (an agent's) with ``hook`` in it."""
    return {**env, HOOK_ENV: json.dumps(asdict(hook))}


def read_report(path: Path) -> dict[str, Any] | None:
    """What the hook reported, or None before it fired."""
    try:
        report: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    return report


class _Fired:
    """The hook's state in the agent process: transactions counted, fired or not."""

    def __init__(self, hook: Hook) -> None:
        self.hook = hook
        # Batch transactions (every attempt) that moved offsets and copied into the table.
        self.transactions = 0
        self.copied = False  # the current transaction has copied into the table
        self.sends = 0  # sends of dead letters
        self.moves: list[list[Any]] | None = None  # the current transaction's, once it moved
        self.toxic: str | None = None
        self.done = False

    def due(self, at: str) -> bool:
        if self.done or self.hook.at != at:
            return False
        if at == "dead_letters":
            return self.sends == self.hook.nth
        return self.copied and self.transactions == self.hook.nth

    def add(self, **seen: Any) -> None:
        toxic = self.hook.toxic
        assert toxic is not None
        self.done = True
        self.toxic = request(
            self.hook.api,
            "POST",
            f"/proxies/{self.hook.proxy}/toxics",
            {
                "name": "hooked",
                "type": toxic.kind,
                "stream": toxic.stream,
                "toxicity": 1.0,
                "attributes": toxic.attributes,
            },
        )["name"]
        self.hook.seen.update(seen, added_at=time.time(), moves=self.moves)

    def ended(self, error: BaseException | None) -> None:
        """The statement the toxic was added for has ended: remove it, and report."""
        if self.toxic is None:
            return
        request(self.hook.api, "DELETE", f"/proxies/{self.hook.proxy}/toxics/{self.toxic}")
        self.toxic = None
        self.hook.seen.update(
            removed_at=time.time(),
            error=None if error is None else f"{type(error).__name__}: {error}",
        )
        Path(self.hook.report).write_text(json.dumps(self.hook.seen))


def install(hook: Hook) -> _Fired:
    """Wrap the statements and the send the hook may fire at."""
    fired = _Fired(hook)
    advance_offsets = db.advance_offsets
    transaction = db.transaction
    copy = db.Connection.copy_records_to_table
    publish = kafka_io.publish_dead_letters

    async def hooked_advance_offsets(
        conn: db.Connection, group: str, moves: Sequence[tuple[str, int, int, int]]
    ) -> None:
        fired.moves = [list(m) for m in moves]
        await advance_offsets(conn, group, moves)

    @contextlib.asynccontextmanager
    async def hooked_transaction(
        conn: Any, *, commit: bool = True, durable: bool = False
    ) -> AsyncIterator[None]:
        fired.moves, fired.copied = None, False
        error: BaseException | None = None
        try:
            async with transaction(conn, commit=commit, durable=durable):
                yield
                if commit and fired.due("commit"):
                    fired.add(at="commit")  # the block is done: COMMIT is what goes next
        except BaseException as exc:
            error = exc
            raise
        finally:
            fired.ended(error)
            fired.moves, fired.copied = None, False

    async def hooked_copy(self: db.Connection, table_name: str, **kwargs: Any) -> Any:
        rows = len(kwargs.get("records") or [])
        if table_name == hook.table and fired.moves is not None and not fired.copied:
            fired.copied = rows >= hook.min_rows
            if fired.copied:
                fired.transactions += 1
        if table_name != hook.table or not fired.due("copy"):
            return await copy(self, table_name, **kwargs)
        fired.add(at="copy", table=table_name, rows=rows)
        error: BaseException | None = None
        try:
            return await copy(self, table_name, **kwargs)
        except BaseException as exc:
            error = exc
            raise
        finally:
            fired.ended(error)

    async def hooked_publish(producer: Any, topic: str, letters: list[Any], *args: Any) -> None:
        fired.sends += 1
        if not fired.due("dead_letters"):
            return await publish(producer, topic, letters, *args)
        fired.add(at="dead_letters", letters=len(letters))
        error: BaseException | None = None
        try:
            return await publish(producer, topic, letters, *args)
        except BaseException as exc:
            error = exc
            raise
        finally:
            fired.ended(error)

    db.advance_offsets = hooked_advance_offsets
    db.transaction = hooked_transaction
    db.Connection.copy_records_to_table = hooked_copy
    kafka_io.publish_dead_letters = hooked_publish  # type: ignore[assignment]
    if hook.side_bootstrap:
        _route_the_side_clients(hook.side_bootstrap)
    return fired


def _route_the_side_clients(bootstrap: str) -> None:
    """The controller's clients and the lag probe bootstrap from ``bootstrap``."""
    controller_init: Callable[..., None] = consumers.controller.Controller.__init__

    def side(settings: KafkaSettings) -> KafkaSettings:
        return msgspec.structs.replace(settings, bootstrap_servers=bootstrap)

    def init(self: consumers.controller.Controller, agent: Any, *args: Any, **kw: Any) -> None:
        controller_init(self, agent, *args, **kw)
        self.config = msgspec.structs.replace(self.config, kafka=side(self.config.kafka))

    def side_probe(kafka: KafkaSettings, interval_s: float) -> LagProbe:
        return probe_for(side(kafka), interval_s)

    consumers.controller.Controller.__init__ = init  # type: ignore[method-assign]
    consumers.agent.probe_for = side_probe  # type: ignore[attr-defined]


def main() -> int:
    """``pipeline run`` with the hook of :data:`HOOK_ENV` installed."""
    hook = json.loads(os.environ.get(HOOK_ENV, "{}"))
    toxic = hook.pop("toxic", None)
    install(Hook(**hook, toxic=None if toxic is None else Toxic(**toxic)))
    return cli.main(["run", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
