"""`pipeline run`: a DatabaseAgent steered by its controller, until SIGTERM or Ctrl-C
(docs/architecture.md; its /metrics: docs/observability.md)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import TYPE_CHECKING

from pipeline.commands._common import (
    OK,
    Subparsers,
    config_option,
    load_kafka_config,
    tune_garbage_collector,
    verifier,
)
from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from consumers.agent import DatabaseAgent
    from consumers.controller import Controller


def register(commands: Subparsers) -> None:
    parser = commands.add_parser("run", help="run a DatabaseAgent until SIGTERM or Ctrl-C")
    config_option(parser)
    parser.add_argument("--group", help="consumer group (default database-agent)")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from consumers.agent import DatabaseAgent
    from consumers.controller import Controller

    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    config = load_kafka_config(args, group_id=args.group)
    agent = DatabaseAgent(config)
    controller = Controller(agent, verifier(config))
    if config.metrics_address:
        _serve_metrics(agent, config.metrics_address)
    tune_garbage_collector()
    asyncio.run(_run_until_signalled(agent, controller))
    return OK


def _serve_metrics(agent: DatabaseAgent, address: str) -> None:
    """/metrics, /healthz and /readyz on PIPELINE_METRICS_ADDRESS (docs/observability.md)."""
    try:
        agent.metrics.serve(address, readiness=agent.readiness)
    except OSError as exc:
        raise ConfigError(
            f"PIPELINE_METRICS_ADDRESS: cannot serve /metrics on {address}: {exc.strerror}. "
            "Give each agent on a host its own port, or an empty value to serve none."
        ) from None


async def _run_until_signalled(agent: DatabaseAgent, controller: Controller) -> None:
    """Run the agent, steered by its controller; SIGTERM or SIGINT asks it to stop, and the
    process exits within its shutdown deadline plus the close's allowance even if something
    does not stop; a second signal exits at once (:class:`pipeline.shutdown.BoundedStop`)."""
    from consumers.controller import run_controlled
    from pipeline.shutdown import CLOSE_ALLOWANCE_S, BoundedStop

    loop = asyncio.get_running_loop()
    stopping = BoundedStop(agent.stop, agent.config.shutdown_timeout_s + CLOSE_ALLOWANCE_S, loop)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.signalled, sig)
    try:
        await run_controlled(agent, controller)
    finally:
        stopping.arm()  # what asyncio.run waits for once this returns is bounded too
