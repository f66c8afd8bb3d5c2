"""The `pipeline` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import Config, load_config
from pipeline.devstack import Stack, endpoints_from_env
from pipeline.devstack.stack import DATABASE_ENV, KAFKA_ENV
from pipeline.errors import ConfigError, DevStackError, PipelineError

if TYPE_CHECKING:
    from consumers.agent import DatabaseAgent


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
    except PipelineError as exc:
        print(f"pipeline: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    dev = commands.add_parser("dev", help="the local Kafka + PostgreSQL stack on 127.0.0.1")
    dev_commands = dev.add_subparsers(required=True, metavar="ACTION")
    dev_commands.add_parser(
        "up", help="start both servers and wait until they answer"
    ).set_defaults(handler=_dev_up)
    down = dev_commands.add_parser("down", help="stop both servers by their pids")
    down.add_argument("--purge", action="store_true", help="also delete their data")
    down.set_defaults(handler=_dev_down)
    dev_commands.add_parser("status", help="what is running (exit 3 when not all)").set_defaults(
        handler=_dev_status
    )
    dev_commands.add_parser("env", help="print export lines for a shell to eval").set_defaults(
        handler=_dev_env
    )

    migrate = commands.add_parser("migrate", help="apply the sql/ migrations not yet applied")
    _config_option(migrate)
    migrate.set_defaults(handler=_migrate)

    topics = commands.add_parser("topics", help="manage the pipeline's Kafka topics")
    topic_commands = topics.add_subparsers(required=True, metavar="ACTION")
    create = topic_commands.add_parser("create", help="create the data and dead-letter topics")
    _config_option(create)
    create.add_argument("--partitions", type=int, help="partitions per new topic (default 6)")
    create.set_defaults(handler=_topics_create)

    run = commands.add_parser("run", help="run a DatabaseAgent until SIGTERM or Ctrl-C")
    _config_option(run)
    run.add_argument("--group", help="consumer group (default database-agent)")
    run.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    run.set_defaults(handler=_run)
    return parser


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, help="a TOML file of settings (environment variables win)"
    )


def _load_config(args: argparse.Namespace, **overrides: object) -> Config:
    """Settings from the file, the environment, the flags; the local stack fills the endpoints
    when neither endpoint variable is set and the stack is running."""
    environ = dict(os.environ)
    if endpoints_from_env(environ) is None:
        try:
            endpoints = Stack().endpoints()
        except DevStackError:
            raise ConfigError(
                f"{KAFKA_ENV} and {DATABASE_ENV} are not set and the local stack is not "
                "running: set both, or start the stack with `pipeline dev up`"
            ) from None
        environ[KAFKA_ENV] = endpoints.kafka_bootstrap
        environ[DATABASE_ENV] = endpoints.database_url
    return load_config(environ, args.config, **overrides)


def _migrate(args: argparse.Namespace) -> int:
    from pipeline import db

    config = _load_config(args)

    async def apply() -> list[str]:
        conn = await db.connect(config.database_url, config.db_command_timeout_s)
        try:
            return await db.migrate(conn, db.read_migrations())
        finally:
            await conn.close()

    applied = asyncio.run(apply())
    print("applied: " + ", ".join(applied) if applied else "the schema is up to date")
    return 0


def _topics_create(args: argparse.Namespace) -> int:
    from pipeline import kafka

    config = _load_config(args, topic_partitions=args.partitions)
    topics = [*kafka.data_topics(config), kafka.dead_letter_topic(config)]
    created = asyncio.run(
        kafka.ensure_topics(config.kafka_bootstrap_servers, topics, config.topic_partitions)
    )
    for topic in topics:
        print(f"{topic}: {'created' if topic in created else 'exists'}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from consumers.agent import DatabaseAgent

    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    config = _load_config(args, group_id=args.group)
    agent = DatabaseAgent(config)
    if config.metrics_address:
        agent.metrics.serve(config.metrics_address)
    asyncio.run(_run_until_signalled(agent))
    return 0


async def _run_until_signalled(agent: DatabaseAgent) -> None:
    """Run the agent; SIGTERM or SIGINT asks it to stop, and after the shutdown deadline the
    batch in flight is aborted (its transaction rolls back; Kafka redelivers it)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None

    def on_signal() -> None:
        agent.stop()
        loop.call_later(agent.config.shutdown_timeout_s, task.cancel)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        await agent.run()
    except asyncio.CancelledError:
        logging.getLogger(__name__).warning("shutdown deadline passed: batch in flight aborted")


def _dev_up(args: argparse.Namespace) -> int:
    given = endpoints_from_env()
    if given is not None:
        print(
            "KAFKA_BOOTSTRAP_SERVERS and DATABASE_URL are set: using those servers, "
            "nothing started",
            file=sys.stderr,
        )
        print(given.exports(), end="")
        return 0
    endpoints = Stack().up(report=_progress)
    _progress('ready; for other shells: eval "$(pipeline dev env)"')
    print(endpoints.exports(), end="")
    return 0


def _dev_down(args: argparse.Namespace) -> int:
    Stack().down(purge=args.purge, report=_progress)
    return 0


def _dev_status(args: argparse.Namespace) -> int:
    if (given := endpoints_from_env()) is not None:
        print(f"using servers from the environment: Kafka {given.kafka_bootstrap}")
        return 0
    states = Stack().status()
    for state in states:
        print(state.line())
    return 0 if all(s.state == "running" for s in states) else 3


def _dev_env(args: argparse.Namespace) -> int:
    endpoints = endpoints_from_env() or Stack().endpoints()
    print(endpoints.exports(), end="")
    return 0


def _progress(message: str) -> None:
    print(message, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
