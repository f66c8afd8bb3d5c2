"""The `pipeline` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pipeline.devstack import Stack, endpoints_from_env
from pipeline.errors import PipelineError


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
    dev_commands.add_parser("up", help="start both servers and wait until they answer").set_defaults(
        handler=_dev_up
    )
    down = dev_commands.add_parser("down", help="stop both servers by their pids")
    down.add_argument("--purge", action="store_true", help="also delete their data")
    down.set_defaults(handler=_dev_down)
    dev_commands.add_parser("status", help="what is running (exit 3 when not all)").set_defaults(
        handler=_dev_status
    )
    dev_commands.add_parser("env", help="print export lines for a shell to eval").set_defaults(
        handler=_dev_env
    )
    return parser


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
    _progress("ready; for other shells: eval \"$(pipeline dev env)\"")
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
