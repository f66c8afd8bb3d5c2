"""The `pipeline` command line: the parser, built from the command modules of
:mod:`pipeline.commands`, and what an error becomes (one line, exit status 2).

With pipeline/commands/ it is the composition root, the one part of ``pipeline`` that imports
``producers`` and ``consumers`` (docs/architecture.md; tests/unit/test_layering.py). The
command modules import the drivers (asyncpg, aiokafka), and the modules that load them, inside
their handlers only: `pipeline --help` and every command's --help work without the drivers
(tests/unit/test_cli.py). Running a command needs them, `pipeline dev` included: the local
stack provisions its logins, Kafka users and ACLs, and probes its servers, through them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pipeline.commands import (
    bench,
    control,
    demo,
    dev,
    dlq,
    gaps,
    migrate,
    owners,
    partitions,
    replay,
    run,
    simulate,
    streams,
    top,
    topics,
)
from pipeline.commands._common import ERROR, INTERRUPTED, Handler
from pipeline.errors import PipelineError

DESCRIPTION = (
    "Ingest an agent fleet's data from Kafka into PostgreSQL exactly once. Run DatabaseAgents "
    "(`pipeline run`), declare the topics they read (`streams`), prepare their database "
    "and topics (`migrate`, `topics create`), "
    "steer them with signed commands (`control`), watch them (`top`), see what retention "
    "deleted before it was ingested (`gaps`), keep time partitions (`partitions`), repair "
    "data after an incident (`replay`, `dlq`), publish simulated traffic (`simulate`), see it "
    "all work in one command (`demo`), measure it (`bench`), and run a local Kafka and "
    "PostgreSQL to try it on (`dev`). Settings come from environment variables "
    "(KAFKA_BOOTSTRAP_SERVERS, DATABASE_URL, PIPELINE_*) or a TOML file; without the two "
    "endpoints, the commands use the local stack."
)

#: The command families, in the order `pipeline --help` lists them.
COMMANDS = (
    dev,
    migrate,
    streams,
    owners,
    topics,
    run,
    control,
    top,
    gaps,
    partitions,
    replay,
    dlq,
    simulate,
    demo,
    bench,
)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        return INTERRUPTED
    except Exception as exc:
        message = error_message(exc)
        if message is None:
            raise
        print(f"pipeline: error: {message}", file=sys.stderr)
        return ERROR


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="pipeline", description=DESCRIPTION)
    commands = root.add_subparsers(required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(commands)
    return root


def error_message(exc: Exception) -> str | None:
    """The one line that explains ``exc`` to the user, or None for a bug (a traceback).

    Ours (a ``PipelineError``) say what to fix. So do the driver errors that
    :func:`pipeline.db.classify` recognises where no code path classified them (a transaction
    pooler's stale statement met at start-up, say); any other is raised as it is.
    """
    if isinstance(exc, PipelineError):
        return str(exc)
    asyncpg = sys.modules.get("asyncpg")  # not loaded: no driver error can have been raised
    if asyncpg is not None and isinstance(exc, asyncpg.PostgresError):
        from pipeline import db

        error = db.classify(exc)
        if isinstance(error, PipelineError):
            return str(error)
    return None


if __name__ == "__main__":
    sys.exit(main())
