"""`pipeline dlq`: the group's dead letters listed, shown and redriven (docs/repair.md)."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import TYPE_CHECKING, Any

from pipeline.commands._common import (
    OK,
    Subparsers,
    check_streams,
    group_options,
    load_config,
    positive,
    stream_list,
)
from pipeline.errors import ConfigError, PipelineError
from pipeline.redrive import parse_since

if TYPE_CHECKING:
    from pipeline.config import Config


def register(commands: Subparsers) -> None:
    dlq = commands.add_parser(
        "dlq",
        help="list, show and redrive the group's dead letters",
        description="The group's dead letters (table dead_letters). `replay` decodes pending "
        "ones again with today's code and writes those that now pass to their tables, exactly "
        "once, marking them redriven in the same transaction; the others keep their row with "
        "the new reason. Exit status 0 even when some still fail (the output says so).",
    )
    actions = dlq.add_subparsers(required=True, metavar="ACTION")

    def filtered(name: str, help_text: str, limit_help: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(name, help=help_text)
        group_options(parser)
        parser.add_argument("--stream", type=stream_list, help="one stream, e.g. metrics")
        parser.add_argument("--error-class", help="e.g. DatabaseRejected, DecodeError")
        parser.add_argument(
            "--since", type=parse_since, metavar="TIME", help="dead-lettered at or after TIME "
            "(RFC 3339 with an offset, e.g. 2026-11-01T00:00:00Z)"
        )  # fmt: skip
        parser.add_argument("--limit", type=positive(int), metavar="N", help=limit_help)
        return parser

    filtered("list", "the dead letters, oldest first", "rows (50)").set_defaults(handler=list_)
    show_parser = actions.add_parser(
        "show", help="one dead letter: source, error, key, headers, value"
    )
    group_options(show_parser)
    show_parser.add_argument("id", type=positive(int), metavar="ID")
    show_parser.set_defaults(handler=show)
    replay_parser = filtered(
        "replay", "redrive pending dead letters that now decode and are accepted", "letters (all)"
    )
    replay_parser.add_argument("--dry-run", action="store_true", help="report, change nothing")
    replay_parser.add_argument(
        "--json", action="store_true", help="the summary as one JSON object on stdout"
    )
    replay_parser.set_defaults(handler=replay)


def _filters(args: argparse.Namespace, config: Config) -> Any:
    from pipeline.redrive import Filters

    if args.stream is not None and len(args.stream) != 1:
        raise ConfigError("--stream: give one stream")
    stream = args.stream[0] if args.stream else None
    if stream is not None:
        check_streams("--stream", [stream], config)
    return Filters(stream, args.error_class, args.since, args.limit)


def list_(args: argparse.Namespace) -> int:
    from consumers.redrive import list_letters

    config = load_config(args, group_id=args.group)
    for line in asyncio.run(list_letters(config, _filters(args, config))):
        print(line)
    return OK


def show(args: argparse.Namespace) -> int:
    from consumers.redrive import show_letter

    config = load_config(args, group_id=args.group)
    lines = asyncio.run(show_letter(config, args.id))
    if lines is None:
        raise PipelineError(f"group {config.group_id} has no dead letter {args.id}")
    for line in lines:
        print(line)
    return OK


def replay(args: argparse.Namespace) -> int:
    from consumers.redrive import replay as redrive

    config = load_config(args, group_id=args.group)
    outcome = asyncio.run(redrive(config, _filters(args, config), dry_run=args.dry_run))
    if args.json:
        print(json.dumps(outcome.json()))
        return OK
    for line in outcome.lines():
        print(line)
    return OK
