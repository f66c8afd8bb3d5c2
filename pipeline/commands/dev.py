"""`pipeline dev`: the local Kafka + PostgreSQL stack (up, down, status, env), or the servers
the endpoint variables name. The stack itself is pipeline/devstack/; README.md says how to use
it.

Its handlers need the drivers: the stack provisions its PostgreSQL logins over asyncpg and its
Kafka users and ACLs over aiokafka, and probes both servers with them.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from pipeline.commands._common import NOT_SERVING, OK, Subparsers, progress
from pipeline.devstack import kafka_versions
from pipeline.devstack.kafka_users import AGENT_USER, ORCHESTRATOR_USER, PRODUCER_USER, USERS
from pipeline.errors import ConfigError, DevStackError

if TYPE_CHECKING:
    from pipeline.devstack import Stack


def register(commands: Subparsers) -> None:
    dev = commands.add_parser("dev", help="the local Kafka + PostgreSQL stack on 127.0.0.1")
    dev_commands = dev.add_subparsers(required=True, metavar="ACTION")
    up_parser = dev_commands.add_parser(
        "up",
        help="start both servers and wait until they answer (with the endpoint variables "
        "set to other servers: check that those answer)",
    )
    up_parser.add_argument(
        "--kafka",
        metavar="VERSION",
        help=f"the Kafka release to run, 3.{kafka_versions.OLDEST_3}+ or 4.x (default "
        f"${kafka_versions.VERSION_ENV}, else {kafka_versions.DEFAULT_VERSION}); a stack home "
        "runs the release that formatted its data",
    )
    up_parser.add_argument(
        "--prometheus",
        action="store_true",
        help="also a Prometheus with the alert rules, scraping the agents in its targets.json",
    )
    up_parser.add_argument(
        "--postgres",
        metavar="MAJOR",
        help="the PostgreSQL major to run, 13 to 17 (the machine's own server of that major, "
        "else downloaded from Maven Central), or 'system': sets PIPELINE_DEV_POSTGRES for "
        "this command",
    )
    up_parser.set_defaults(handler=up)
    down_parser = dev_commands.add_parser("down", help="stop both servers by their pids")
    down_parser.add_argument("--purge", action="store_true", help="also delete their data")
    down_parser.set_defaults(handler=down)
    dev_commands.add_parser(
        "status", help="what runs and whether it answers (exit 3 when not all)"
    ).set_defaults(handler=status)
    env_parser = dev_commands.add_parser("env", help="print export lines for a shell to eval")
    env_parser.add_argument(
        "--secure",
        action="store_true",
        help="Kafka through the stack's SASL_SSL listener (TLS + SCRAM-SHA-512): the CA file, "
        "the user and its password FILE (never the password)",
    )
    env_parser.add_argument(
        "--user",
        choices=USERS,
        default=AGENT_USER,
        help=f"with --secure: who connects (default {AGENT_USER}; {ORCHESTRATOR_USER} for "
        f"`pipeline control` and `topics create`, {PRODUCER_USER} for `simulate`)",
    )
    env_parser.add_argument(
        "--tls",
        action="store_true",
        help="database URLs that verify the server's certificate (sslmode=verify-full)",
    )
    env_parser.set_defaults(handler=env)


def up(args: argparse.Namespace) -> int:
    """Start the local stack, unless the endpoint variables name other servers: then start
    nothing, and succeed only if those answer."""
    from pipeline.devstack import Stack, endpoints_from_env, pg_binaries
    from pipeline.devstack.stack import DATABASE_ENV, KAFKA_ENV, probe_servers

    if args.postgres is not None:
        pg_binaries.parse_choice(args.postgres)  # a bad value fails before anything starts
        os.environ[pg_binaries.ENV] = args.postgres
    stack = Stack(kafka_version=args.kafka)
    given = endpoints_from_env()
    if given is not None and not stack.serves(given):
        answers = probe_servers(given)
        silent = [a for a in answers if a.problem is not None]
        if silent:
            raise DevStackError(
                f"{KAFKA_ENV} and {DATABASE_ENV} are set to servers other than the local "
                "stack, so nothing was started, and not all of them answer:\n"
                + "".join(f"  {a.line()}\n" for a in silent)
                + "To use the local stack instead, unset both and run `pipeline dev up`."
            )
        progress(
            f"{KAFKA_ENV} and {DATABASE_ENV} are set to servers other than the local stack: "
            "using those (both answer), nothing started"
        )
        print(given.exports(), end="")
        return _start_prometheus(stack) if args.prometheus else OK
    endpoints = stack.up(report=progress)
    if given is not None and not stack.serves(given):
        progress(
            f"the local stack listens on other ports than {KAFKA_ENV} and {DATABASE_ENV} say "
            '(its own were taken): eval "$(pipeline dev env)"'
        )
    progress('ready; for other shells: eval "$(pipeline dev env)"')
    print(endpoints.exports(), end="")
    return _start_prometheus(stack) if args.prometheus else OK


def _start_prometheus(stack: Stack) -> int:
    from pipeline.devstack import prometheus

    server = prometheus.for_stack(stack.home)
    url = server.start()
    progress(
        f"Prometheus at {url} (pid {server.pidfile.live_pid()}): job {prometheus.JOB} scrapes "
        f"the agents listed in {server.targets_path} (re-read while it runs: add one "
        "host:port per agent's PIPELINE_METRICS_ADDRESS)"
    )
    return OK


def down(args: argparse.Namespace) -> int:
    from pipeline.devstack import Stack, prometheus

    stack = Stack()
    prometheus.for_stack(stack.home).stop(report=progress)
    stack.down(purge=args.purge, report=progress)
    return OK


def status(args: argparse.Namespace) -> int:
    """What answers: the local stack's servers (with their pids), or, when the endpoint
    variables name other servers, those. Exit 3 when anything is down or does not answer."""
    from pipeline.devstack import Stack, endpoints_from_env
    from pipeline.devstack.stack import probe_servers

    stack = Stack()
    given = endpoints_from_env()
    if given is not None and not stack.serves(given):
        answers = probe_servers(given)
        for answer in answers:
            print(answer.line())
        _print_prometheus(stack)
        return OK if all(a.problem is None for a in answers) else NOT_SERVING
    states = stack.status(probe=True)
    for state in states:
        print(state.line())
    _print_prometheus(stack)
    return OK if all(s.serving for s in states) else NOT_SERVING


def _print_prometheus(stack: Stack) -> None:
    """The stack's Prometheus, when `dev up --prometheus` started it and it runs."""
    from pipeline.devstack import prometheus

    server = prometheus.for_stack(stack.home)
    if (url := server.url()) is not None:
        print(f"Prometheus: running (pid {server.pidfile.live_pid()}) at {url}")


def env(args: argparse.Namespace) -> int:
    from pipeline.devstack import Stack, endpoints_from_env
    from pipeline.devstack.stack import DATABASE_ENV, KAFKA_ENV

    if args.secure:  # the stack's own listener, whatever the environment names
        print(Stack().endpoints(tls=args.tls).exports(secure_user=args.user), end="")
        return OK
    given = endpoints_from_env()
    if given is not None and args.tls:
        raise ConfigError(
            f"--tls: {KAFKA_ENV} and {DATABASE_ENV} name your own servers; add sslmode and "
            "sslrootcert to your DATABASE_URL instead"
        )
    endpoints = given or Stack().endpoints(tls=args.tls)
    print(endpoints.exports(), end="")
    return OK
