"""What several commands share: the exit codes, the common options and argument types, how
settings are loaded (with the local stack filling the endpoints), the control verifier, the
collector tuning of the long-running commands, and progress lines on stderr.

Like every command module, it imports the drivers (and the modules that import them) only
inside its functions: see pipeline/cli.py.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from pipeline.errors import ConfigError, DevStackError

if TYPE_CHECKING:
    from pipeline.config import Config
    from pipeline.devstack import Stack

#: Exit statuses. ERROR: a usage error (argparse's own) or a ``PipelineError``, said in one
#: line; FAILED: `pipeline control` sent a command a live instance or the group did not apply;
#: NOT_SERVING: `pipeline dev status` found a server down or silent.
OK, FAILED, ERROR, NOT_SERVING, INTERRUPTED = 0, 1, 2, 3, 130

#: What ``add_subparsers`` returns: each command module's ``register`` adds its parser to it.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
#: A command's handler: the parsed arguments in, the exit status out.
Handler: TypeAlias = Callable[[argparse.Namespace], int]


def progress(message: str) -> None:
    print(message, file=sys.stderr)


def config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, help="a TOML file of settings (environment variables win)"
    )


def group_options(parser: argparse.ArgumentParser) -> None:
    config_option(parser)
    parser.add_argument("--group", help="the DatabaseAgents' group (default database-agent)")


def stream_list(text: str) -> tuple[str, ...]:
    """An argparse type: a comma list of stream names. Which streams exist is the catalog's
    to say, once the configuration is read: :func:`check_streams`."""
    streams = tuple(s for s in text.split(",") if s)
    malformed = [s for s in streams if not re.fullmatch(r"[a-z][a-z0-9_]*", s)]
    if malformed or not streams:
        raise argparse.ArgumentTypeError(
            f"malformed stream name(s) {malformed or '(none given)'}: "
            "expected a comma list of names such as events,metrics"
        )
    return streams


def check_streams(option: str, streams: Iterable[str], config: Config) -> None:
    """A usage error (exit 2) naming the ``streams`` that the configuration's catalog
    (the built-in streams and ``PIPELINE_STREAMS_FILE``'s) lacks, and the choices."""
    try:
        config.catalog.check_names(streams)
    except ValueError as exc:
        raise ConfigError(f"{option}: {exc}") from None


def positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    """An argparse type: a number of ``kind`` above zero, or a usage error that says so."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            expected = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value

    return parse


def load_config(args: argparse.Namespace, **overrides: object) -> Config:
    """Settings from the file, the environment, the flags; the local stack fills the endpoints
    when neither endpoint variable is set and the stack is running."""
    from pipeline.config import load_config as load
    from pipeline.devstack import Stack, endpoints_from_env
    from pipeline.devstack.stack import (
        DATABASE_ENV,
        KAFKA_ENV,
        MIGRATE_DATABASE_ENV,
        PRIVATE_KEY_ENV,
        PUBLIC_KEYS_ENV,
    )

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
        environ[DATABASE_ENV] = endpoints.database_url  # the agents' login: the writer role
        if endpoints.migrate_database_url is not None:
            environ[MIGRATE_DATABASE_ENV] = endpoints.migrate_database_url
        if endpoints.control_keys is not None:  # the stack's key pair, unless others are set
            private, public = endpoints.control_keys
            environ.setdefault(PRIVATE_KEY_ENV, str(private))
            environ.setdefault(PUBLIC_KEYS_ENV, str(public))
    return load(environ, args.config, **overrides)


def load_kafka_config(args: argparse.Namespace, **overrides: object) -> Config:
    """:func:`load_config` for a command that uses Kafka: a cluster that refuses its security
    settings (authentication, certificate, TLS or not) fails here, with what to fix, instead
    of being retried as if it were down."""
    from pipeline import kafka_clients

    config = load_config(args, **overrides)
    asyncio.run(kafka_clients.check_connection(config.kafka))
    return config


def local_stack_up() -> tuple[Stack | None, bool]:
    """Start the local stack when this command uses it (the endpoint variables are unset, or
    name the stack itself): the stack, and whether it had to start anything. (None, False)
    when the variables name other servers."""
    from pipeline.devstack import Stack, endpoints_from_env

    stack = Stack()
    given = endpoints_from_env()
    if given is not None and not stack.serves(given):
        return None, False
    was_running = all(s.state == "running" for s in stack.status())
    stack.up(report=progress)
    return stack, not was_running


def verifier(config: Config) -> Any:
    """The agents' verifier of control commands, None without public keys."""
    from pipeline import control

    if not config.control_public_keys:
        return None
    try:
        return control.read_verifier(Path(p) for p in config.control_public_keys)
    except OSError as exc:
        raise ConfigError(
            f"PIPELINE_CONTROL_PUBLIC_KEYS: cannot read {exc.filename}: {exc.strerror}"
        ) from None


#: How often a process tuned by :func:`tune_garbage_collector` collects its cyclic garbage.
GC_EVERY_S = 60.0


def tune_garbage_collector(collect_every_s: float = GC_EVERY_S) -> threading.Event:
    """For a process that decodes and writes records (`pipeline run`, `pipeline replay`).

    It allocates millions of objects a second (records, rows) and frees as many; its live set
    is the batches in flight. With CPython's default thresholds a young collection runs every
    700 net allocations and walks that live set each time, a large share of the CPU. So the
    start-up objects move out of the collector's sight, and a young collection waits for a
    million net allocations, more than the batches in flight hold: in a steady drain it does
    not run.

    Then nothing would free cyclic garbage: each /metrics connection's transport and
    protocol, each exception kept with its traceback's frames (and what their locals hold),
    asyncio's futures and callbacks. It piles up for as long as the threshold is not reached,
    and the arenas of Python's allocator that it holds cannot go back to the system: RSS
    grows with every scrape and every fault. So a thread collects every ``collect_every_s``
    seconds, a pause of milliseconds between batches, longer when a backlog's batches are
    live. Setting the returned event stops that thread.
    """
    gc.freeze()
    gc.set_threshold(1_000_000, 10, 10)
    stop = threading.Event()

    def collect() -> None:
        while not stop.wait(collect_every_s):
            gc.collect()

    threading.Thread(target=collect, name="pipeline-gc", daemon=True).start()
    return stop
