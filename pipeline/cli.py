"""The `pipeline` command line, and the project's composition root.

Layering: ``pipeline`` is the core (records, rows, batching, config, the Kafka and
PostgreSQL IO, the dev stack); ``producers`` (the SDK) and ``consumers`` (the DatabaseAgent,
the benchmark) build on it and not on each other. This module is the one place that wires
all three together, so it is the only module of ``pipeline`` that imports ``producers`` or
``consumers``, lazily, inside the commands that need them (so `pipeline dev` starts without
the drivers). tests/unit/test_layering.py enforces these rules.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg
import msgspec

from pipeline import db, kafka_clients
from pipeline.config import Config, load_config
from pipeline.devstack import Stack, endpoints_from_env, kafka_versions, pg_binaries, prometheus
from pipeline.devstack.kafka_auth import AGENT_USER, ORCHESTRATOR_USER, PRODUCER_USER, USERS
from pipeline.devstack.processes import choose_port
from pipeline.devstack.stack import (
    DATABASE_ENV,
    KAFKA_ENV,
    MIGRATE_DATABASE_ENV,
    NO_SECURE_LISTENER,
    PRIVATE_KEY_ENV,
    PUBLIC_KEYS_ENV,
    probe_servers,
)
from pipeline.errors import ConfigError, DevStackError, PipelineError
from pipeline.kafka_clients import KafkaSettings
from pipeline.rows import DATA_TABLES
from pipeline.terminal import printable

if TYPE_CHECKING:
    from consumers.agent import DatabaseAgent
    from consumers.controller import Controller
    from producers.simulator import SimulationResult


DESCRIPTION = (
    "Ingest an agent fleet's data from Kafka into PostgreSQL exactly once. Run DatabaseAgents "
    "(`pipeline run`), prepare their database and topics (`migrate`, `topics create`), "
    "steer them with signed commands (`control`), watch them (`top`), repair data after an "
    "incident (`replay`, `dlq`), publish simulated traffic (`simulate`), see it all work in "
    "one command (`demo`), measure it (`bench`), and run a local Kafka and PostgreSQL to try "
    "it on (`dev`). Settings come from environment variables (KAFKA_BOOTSTRAP_SERVERS, "
    "DATABASE_URL, PIPELINE_*) or a TOML file; without the two endpoints, the commands use "
    "the local stack."
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
    except PipelineError as exc:
        print(f"pipeline: error: {exc}", file=sys.stderr)
        return 2
    except asyncpg.PostgresError as exc:  # one no code path classified: classified here
        error = db.classify(exc)
        if not isinstance(error, PipelineError):
            raise
        print(f"pipeline: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description=DESCRIPTION)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    dev = commands.add_parser("dev", help="the local Kafka + PostgreSQL stack on 127.0.0.1")
    dev_commands = dev.add_subparsers(required=True, metavar="ACTION")
    up = dev_commands.add_parser(
        "up",
        help="start both servers and wait until they answer (with the endpoint variables "
        "set to other servers: check that those answer)",
    )
    up.add_argument(
        "--kafka",
        metavar="VERSION",
        help=f"the Kafka release to run, 3.{kafka_versions.OLDEST_3}+ or 4.x (default "
        f"${kafka_versions.VERSION_ENV}, else {kafka_versions.DEFAULT_VERSION}); a stack home "
        "runs the release that formatted its data",
    )
    up.add_argument(
        "--prometheus",
        action="store_true",
        help="also a Prometheus with the alert rules, scraping the agents in its targets.json",
    )
    up.add_argument(
        "--postgres",
        metavar="MAJOR",
        help="the PostgreSQL major to run, 13 to 17 (the machine's own server of that major, "
        "else downloaded from Maven Central), or 'system': sets PIPELINE_DEV_POSTGRES for "
        "this command",
    )
    up.set_defaults(handler=_dev_up)
    down = dev_commands.add_parser("down", help="stop both servers by their pids")
    down.add_argument("--purge", action="store_true", help="also delete their data")
    down.set_defaults(handler=_dev_down)
    dev_commands.add_parser(
        "status", help="what runs and whether it answers (exit 3 when not all)"
    ).set_defaults(handler=_dev_status)
    env = dev_commands.add_parser("env", help="print export lines for a shell to eval")
    env.add_argument(
        "--secure",
        action="store_true",
        help="Kafka through the stack's SASL_SSL listener (TLS + SCRAM-SHA-512): the CA file, "
        "the user and its password FILE (never the password)",
    )
    env.add_argument(
        "--user",
        choices=USERS,
        default=AGENT_USER,
        help=f"with --secure: who connects (default {AGENT_USER}; {ORCHESTRATOR_USER} for "
        f"`pipeline control` and `topics create`, {PRODUCER_USER} for `simulate`)",
    )
    env.add_argument(
        "--tls",
        action="store_true",
        help="database URLs that verify the server's certificate (sslmode=verify-full)",
    )
    env.set_defaults(handler=_dev_env)

    migrate = commands.add_parser("migrate", help="apply the sql/ migrations not yet applied")
    _config_option(migrate)
    migrate.set_defaults(handler=_migrate)

    owners = commands.add_parser(
        "owners",
        help="which group owns each data table (one group per table, docs/exactly-once.md)",
    )
    owner_actions = owners.add_subparsers(required=True, metavar="ACTION")
    owners_show = owner_actions.add_parser("show", help="every claimed table, its group, topic")
    _config_option(owners_show)
    owners_show.set_defaults(handler=_owners_show)
    release = owner_actions.add_parser(
        "release",
        help="as the migrator: hand back a group's tables, for another group to claim "
        "(stop that group's agents and replays first)",
    )
    _config_option(release)
    release.add_argument("--group", required=True, help="the group whose tables to release")
    release.set_defaults(handler=_owners_release)

    topics = commands.add_parser("topics", help="manage the pipeline's Kafka topics")
    topic_commands = topics.add_subparsers(required=True, metavar="ACTION")
    create = topic_commands.add_parser(
        "create", help="create the data, dead-letter, control and status topics"
    )
    _config_option(create)
    create.add_argument("--partitions", type=int, help="partitions per new topic (default 6)")
    create.set_defaults(handler=_topics_create)

    run = commands.add_parser("run", help="run a DatabaseAgent until SIGTERM or Ctrl-C")
    _config_option(run)
    run.add_argument("--group", help="consumer group (default database-agent)")
    run.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    run.set_defaults(handler=_run)

    _control_parser(commands)
    top = commands.add_parser(
        "top",
        help="a live view of every DatabaseAgent of a group, refreshed every second",
        description="Every DatabaseAgent of the group, from the heartbeats on the status topic "
        "and each agent's /metrics: state, active streams, partitions owned, rows written per "
        "second, lag in records and in seconds, seconds since its last heartbeat, last error. "
        "An instance unheard for 10 s is shown as gone?, one that said it stopped as stopped, "
        "for 5 minutes. On a terminal it redraws in place (q or Ctrl-C quits); otherwise, or "
        "with --once, it prints a table per refresh.",
    )
    _group_options(top)
    top.add_argument("--once", action="store_true", help="print one table and exit")
    top.add_argument(
        "--interval",
        type=_positive(float),
        default=1.0,
        metavar="SECONDS",
        help="seconds between refreshes (1)",
    )
    top.add_argument(
        "--metrics-hosts",
        metavar="LIST",
        help="the hosts whose /metrics may be fetched: a comma list of names, IPs and networks "
        "(10.0.0.0/8); heartbeats are unsigned, so an address they name elsewhere is shown, "
        "not fetched (default $PIPELINE_TOP_METRICS_HOSTS, else this machine: "
        "127.0.0.1,::1,localhost)",
    )
    top.set_defaults(handler=_top)
    _replay_parser(commands)
    _dlq_parser(commands)

    simulate = commands.add_parser("simulate", help="publish a simulated fleet's traffic")
    _config_option(simulate)
    _simulation_options(simulate, rate=5000.0, duration=10.0)
    simulate.set_defaults(handler=_simulate)

    demo = commands.add_parser(
        "demo", help="the whole pipeline in one command: stack, agent, 143 agents, summary"
    )
    _simulation_options(demo, rate=5000.0, duration=10.0)
    demo.set_defaults(handler=_demo)

    bench = commands.add_parser(
        "bench", help="end-to-end throughput against the raw limits, measured in one run"
    )
    count, amount = _positive(int), _positive(float)
    bench.add_argument("--records", type=count, default=1_000_000, help="backlog per mix (1M)")
    bench.add_argument(
        "--latency-rate", type=amount, default=20_000, help="records/s of the latency run (20k)"
    )
    bench.add_argument(
        "--latency-seconds", type=amount, default=60, help="length of the latency run (60)"
    )
    bench.add_argument(
        "--memory-records", type=count, default=5_000_000, help="backlog of the memory run (5M)"
    )
    bench.add_argument(
        "--quick",
        action="store_true",
        help="about a minute: 100k records per mix, 5k records/s for 10 s, 200k for memory",
    )
    bench.add_argument(
        "--mix",
        action="append",
        choices=["metrics-heavy", "events-heavy"],
        help="metrics-heavy and/or events-heavy (default both)",
    )
    bench.add_argument("--partitions", type=count, default=6, help="partitions per topic (6)")
    bench.add_argument("--no-scale-out", action="store_true", help="skip the two-process run")
    bench.add_argument(
        "--secure",
        action="store_true",
        help="what TLS + SASL/SCRAM cost: produce, consume raw and drain end to end over the "
        "local stack's SASL_SSL listener and over plaintext, in one run, and report the ratios "
        "(instead of the usual measurements)",
    )
    bench.add_argument(
        "--pooler",
        choices=["transaction", "session"],
        help="what a connection pooler costs: drain end to end through a PgBouncer in this pool "
        "mode in front of the local stack's PostgreSQL and directly, in one run, and report the "
        "ratio (instead of the usual measurements)",
    )
    bench.add_argument("--json", type=Path, help="write the results as JSON here")
    bench.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="also drain each backlog once under py-spy; raw stacks here, breakdown printed",
    )
    bench.add_argument(
        "--png",
        type=Path,
        default=Path("bench-results/bench.png"),
        help="the plot (default bench-results/bench.png)",
    )
    bench.set_defaults(handler=_bench)
    return parser


def _control_parser(commands: Any) -> None:
    control = commands.add_parser(
        "control",
        help="Antigravity: steer a DatabaseAgent group through the signed control topic",
        description="Send signed commands to every DatabaseAgent of a group and wait for their "
        "acknowledgements, or show the fleet and the control log. Sending needs the private "
        "key (PIPELINE_CONTROL_PRIVATE_KEY_FILE); agents verify with the public keys in "
        "PIPELINE_CONTROL_PUBLIC_KEYS. Exit status 1 when an instance rejects the command or "
        "does not answer in time.",
    )
    actions = control.add_subparsers(required=True, metavar="ACTION")
    keygen = actions.add_parser(
        "keygen", help="write DIR/antigravity.key (mode 0600) and DIR/antigravity.pub"
    )
    keygen.add_argument("dir", type=Path, metavar="DIR")
    keygen.set_defaults(handler=_control_keygen)

    def sender(name: str, help_text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(name, help=help_text)
        _group_options(parser)
        parser.add_argument(
            "--wait",
            type=_positive(float),
            default=30.0,
            metavar="SECONDS",
            help="how long to wait for the live instances' acks (30)",
        )
        parser.set_defaults(handler=_control_send, action=name)
        return parser

    for name, verb in (("activate", "start"), ("deactivate", "pause")):
        sender(name, f"{verb} ingesting streams on every instance").add_argument(
            "--streams", required=True, type=_stream_list, help="comma list, e.g. events,metrics"
        )
    assign = sender("assign", "a new assignment version: the active streams and batch limits")
    assign.add_argument("--file", type=Path, help="a TOML file with any of the flags below")
    assign.add_argument("--version", type=_positive(int), help="above the current one")
    assign.add_argument("--streams", type=_stream_list, help="comma list of active streams")
    for limit in ("batch-max-records", "batch-max-bytes", "batch-max-wait-ms"):
        assign.add_argument(f"--{limit}", type=_positive(int), help="(the agents' setting)")
    checkpoint = sender("checkpoint", "record the group's stored offsets under NAME")
    checkpoint.add_argument("name", metavar="NAME")
    rollback = sender("rollback", "re-apply an assignment, or roll the data back")
    target = rollback.add_mutually_exclusive_group(required=True)
    target.add_argument("--to-version", type=_positive(int), metavar="N")
    target.add_argument("--to-checkpoint", metavar="NAME")
    rollback.add_argument(
        "--then",
        choices=["reingest", "hold"],
        default="reingest",
        help="after a data rollback: ingest again from the checkpoint, or hold the streams "
        "rolled back until activated (reingest)",
    )
    status = actions.add_parser("status", help="the group's live instances and their state")
    _group_options(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=_control_status)
    log_parser = actions.add_parser("log", help="the group's control log (from PostgreSQL)")
    _group_options(log_parser)
    log_parser.add_argument("--limit", type=_positive(int), default=50, help="rows (50)")
    log_parser.set_defaults(handler=_control_log)


def _dlq_parser(commands: Any) -> None:
    """`pipeline dlq`: dead letters listed, shown, redriven (docs/repair.md)."""
    from pipeline.redrive import parse_since

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
        _group_options(parser)
        parser.add_argument("--stream", type=_stream_list, help="one stream, e.g. metrics")
        parser.add_argument("--error-class", help="e.g. DatabaseRejected, DecodeError")
        parser.add_argument(
            "--since", type=parse_since, metavar="TIME", help="dead-lettered at or after TIME "
            "(RFC 3339 with an offset, e.g. 2026-11-01T00:00:00Z)"
        )  # fmt: skip
        parser.add_argument("--limit", type=_positive(int), metavar="N", help=limit_help)
        return parser

    filtered("list", "the dead letters, oldest first", "rows (50)").set_defaults(handler=_dlq_list)
    show = actions.add_parser("show", help="one dead letter: source, error, key, headers, value")
    _group_options(show)
    show.add_argument("id", type=_positive(int), metavar="ID")
    show.set_defaults(handler=_dlq_show)
    replay = filtered(
        "replay", "redrive pending dead letters that now decode and are accepted", "letters (all)"
    )
    replay.add_argument("--dry-run", action="store_true", help="report, change nothing")
    replay.set_defaults(handler=_dlq_replay)


def _replay_parser(commands: Any) -> None:
    """`pipeline replay`: a topic range written again, exactly once (docs/replay.md)."""
    replay = commands.add_parser(
        "replay",
        help="write a range of streams' records again, exactly once, beside live ingestion",
        description="Read a range of streams' partitions again with a consumer of its own (no "
        "group) and write it with the DatabaseAgent's decoders and writers; progress is stored "
        "with the rows, so a replay killed at any point finishes exactly once with --resume. "
        "The end is frozen at start and clamped to the live group's stored offsets. Times are "
        "RFC 3339 with an explicit offset (2026-11-01T12:00:00Z). `pipeline replay list` shows "
        "the replays.",
    )
    replay.add_argument(
        "action", nargs="?", choices=["list"], help="list: every replay and its state"
    )
    _group_options(replay)
    replay.add_argument(
        "--stream", action="append", metavar="S", help="repeatable or a comma list, e.g. metrics"
    )
    replay.add_argument("--from", dest="start", metavar="earliest|OFFSET|TIME")
    replay.add_argument("--to", dest="end", metavar="OFFSET|TIME|now", help="exclusive")
    replay.add_argument("--partitions", metavar="0,1", help="only these partitions (all)")
    replay.add_argument(
        "--database-url", metavar="URL", help="write to another database (DATABASE_URL)"
    )
    replay.add_argument(
        "--rate", type=_positive(float), metavar="RECORDS_PER_S", help="at most this fast"
    )
    replay.add_argument(
        "--allow-gap",
        action="store_true",
        help="start at the log's first offset when retention deleted part of the range",
    )
    replay.add_argument("--resume", type=_positive(int), metavar="ID", help="finish replay ID")
    replay.add_argument(
        "--batch-records",
        type=_positive(int),
        metavar="N",
        help="records per transaction (PIPELINE_BATCH_MAX_RECORDS)",
    )
    replay.add_argument("--metrics-address", metavar="HOST:PORT", help="serve /metrics here (none)")
    replay.set_defaults(handler=_replay)


def _group_options(parser: argparse.ArgumentParser) -> None:
    _config_option(parser)
    parser.add_argument("--group", help="the DatabaseAgents' group (default database-agent)")


def _stream_list(text: str) -> tuple[str, ...]:
    from pipeline.records import STREAM_BY_NAME

    streams = tuple(s for s in text.split(",") if s)
    unknown = [s for s in streams if s not in STREAM_BY_NAME]
    if unknown or not streams:
        raise argparse.ArgumentTypeError(
            f"unknown stream(s) {unknown or '(none given)'}; choose from "
            f"{', '.join(STREAM_BY_NAME)}"
        )
    return streams


def _positive(kind: type[int] | type[float]) -> Callable[[str], float]:
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


def _simulation_options(parser: argparse.ArgumentParser, rate: float, duration: float) -> None:
    parser.add_argument("--agents", type=int, default=143, help="simulated agents (143)")
    parser.add_argument("--rate", type=float, default=rate, help=f"records/s ({rate:g})")
    parser.add_argument("--duration", type=float, default=duration, help=f"seconds ({duration:g})")
    parser.add_argument(
        "--mix", default="default", help="default, metrics-heavy or events-heavy (default)"
    )
    parser.add_argument("--seed", type=int, help="for reproducible traffic")


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, help="a TOML file of settings (environment variables win)"
    )


def _load_kafka_config(args: argparse.Namespace, **overrides: object) -> Config:
    """:func:`_load_config` for a command that uses Kafka: a cluster that refuses its security
    settings (authentication, certificate, TLS or not) fails here, with what to fix, instead
    of being retried as if it were down."""
    config = _load_config(args, **overrides)
    asyncio.run(kafka_clients.check_connection(config.kafka))
    return config


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
        environ[DATABASE_ENV] = endpoints.database_url  # the agents' login: the writer role
        if endpoints.migrate_database_url is not None:
            environ[MIGRATE_DATABASE_ENV] = endpoints.migrate_database_url
        if endpoints.control_keys is not None:  # the stack's key pair, unless others are set
            private, public = endpoints.control_keys
            environ.setdefault(PRIVATE_KEY_ENV, str(private))
            environ.setdefault(PUBLIC_KEYS_ENV, str(public))
    return load_config(environ, args.config, **overrides)


def _migrate(args: argparse.Namespace) -> int:
    """Apply the migrations as the migrator (PIPELINE_MIGRATE_DATABASE_URL, else
    DATABASE_URL): the one command that changes the schema."""

    config = _load_config(args)

    async def apply() -> list[str]:
        conn = await db.connect(config.migration_url, config.db_session)
        try:
            return await db.migrate(conn, db.read_migrations())
        finally:
            await conn.close()

    applied = asyncio.run(apply())
    print("applied: " + ", ".join(applied) if applied else "the schema is up to date")
    return 0


def _owners_show(args: argparse.Namespace) -> int:
    config = _load_config(args)

    async def read() -> list[db.TableOwner]:
        conn = await db.connect(config.database_url, config.db_session)
        try:
            await db.check_schema(conn)
            return await db.table_owners(conn)
        finally:
            await conn.close()

    found = asyncio.run(read())
    if not found:
        print("no data table is claimed yet: the first group to write one claims it")
    for owner in found:
        print(f"{owner.table}: group {owner.group}, topic {owner.topic}")
    return 0


def _owners_release(args: argparse.Namespace) -> int:
    """As the migrator (PIPELINE_MIGRATE_DATABASE_URL, else DATABASE_URL): the writer may
    claim a table, never hand one over."""
    config = _load_config(args)

    async def release() -> list[db.TableOwner]:
        conn = await db.connect(config.migration_url, config.db_session)
        try:
            await db.check_schema(conn)
            return await db.release_tables(conn, args.group)
        finally:
            await conn.close()

    released = asyncio.run(release())
    if not released:
        print(f"group {args.group} owns no table: nothing to release")
    for owner in released:
        print(f"released {owner.table} (group {owner.group}, topic {owner.topic})")
    return 0


def _topics_create(args: argparse.Namespace) -> int:
    from pipeline import kafka

    config = _load_kafka_config(args, topic_partitions=args.partitions)
    from pipeline.control import control_topics

    topics = [*kafka.data_topics(config), kafka.dead_letter_topic(config)]
    control = list(control_topics(config.topic_prefix))

    async def create() -> list[str]:
        made = await kafka.ensure_topics(config.kafka, topics, config.topic_partitions)
        # One partition each: commands are totally ordered, and status readers read one log.
        return made + await kafka.ensure_topics(config.kafka, control, 1)

    created = asyncio.run(create())
    for topic in [*topics, *control]:
        print(f"{topic}: {'created' if topic in created else 'exists'}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from consumers.agent import DatabaseAgent
    from consumers.controller import Controller

    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    config = _load_kafka_config(args, group_id=args.group)
    agent = DatabaseAgent(config)
    controller = Controller(agent, _verifier(config))
    if config.metrics_address:
        _serve_metrics(agent, config.metrics_address)
    _tune_garbage_collector()
    asyncio.run(_run_until_signalled(agent, controller))
    return 0


def _serve_metrics(agent: DatabaseAgent, address: str) -> None:
    """/metrics, /healthz and /readyz on PIPELINE_METRICS_ADDRESS (docs/observability.md)."""
    try:
        agent.metrics.serve(address, readiness=agent.readiness)
    except OSError as exc:
        raise ConfigError(
            f"PIPELINE_METRICS_ADDRESS: cannot serve /metrics on {address}: {exc.strerror}. "
            "Give each agent on a host its own port, or an empty value to serve none."
        ) from None


def _verifier(config: Config) -> Any:
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


def _control_keygen(args: argparse.Namespace) -> int:
    from pipeline import control

    args.dir.mkdir(parents=True, exist_ok=True)
    private, public = args.dir / "antigravity.key", args.dir / "antigravity.pub"
    for path in (private, public):
        if path.exists():
            raise ConfigError(f"{path} exists: keygen never overwrites a key")
    key, public_key = control.generate_key_pair()
    control.write_private_key_file(private, key)
    control.write_public_key_file(public, public_key)
    print(f"private key: {private} (mode 0600; for PIPELINE_CONTROL_PRIVATE_KEY_FILE)")
    print(f"public key:  {public} (for the agents' PIPELINE_CONTROL_PUBLIC_KEYS)")
    print(f"key id:      {control.key_id(public_key)}")
    return 0


def _control_command(args: argparse.Namespace) -> Any:
    """The command the arguments of ``pipeline control ACTION`` describe."""
    from pipeline import control

    match args.action:
        case "activate":
            return control.Activate(streams=args.streams)
        case "deactivate":
            return control.Deactivate(streams=args.streams)
        case "checkpoint":
            return control.Checkpoint(name=args.name)
        case "rollback" if args.to_version is not None:
            return control.RollbackVersion(to_version=args.to_version)
        case "rollback":
            return control.RollbackCheckpoint(to_checkpoint=args.to_checkpoint, then=args.then)
    settings: dict[str, Any] = {}
    if args.file is not None:
        try:
            settings = msgspec.toml.decode(args.file.read_bytes())
        except (OSError, msgspec.DecodeError) as exc:
            raise ConfigError(f"--file {args.file}: {exc}") from None
    flags = {
        "version": args.version,
        "streams": args.streams,
        "batch_max_records": args.batch_max_records,
        "batch_max_bytes": args.batch_max_bytes,
        "batch_max_wait_ms": args.batch_max_wait_ms,
    }
    settings.update({k: v for k, v in flags.items() if v is not None})
    limits = {k: settings.pop(k) for k in list(settings) if k.startswith("batch_")}
    try:
        return msgspec.convert({**settings, "limits": limits}, control.Assign)
    except (msgspec.ValidationError, ValueError) as exc:
        raise ConfigError(f"assign: {exc} (give --version and --streams)") from None


def _antigravity(config: Config, *, signing: bool) -> Any:
    """The orchestrator: with the private key (required when ``signing``); trusting, for the
    seq and the status views, that key's public half and the agents' public keys
    (PIPELINE_CONTROL_PUBLIC_KEYS), those that are set."""
    from consumers.antigravity import Antigravity
    from pipeline import control

    key = None
    if signing and not config.control_private_key_file:
        raise ConfigError(
            "PIPELINE_CONTROL_PRIVATE_KEY_FILE is not set: sending a command needs the "
            "orchestrator's private key (make a pair with `pipeline control keygen DIR`)"
        )
    if config.control_private_key_file:
        try:
            key = control.read_private_key_file(Path(config.control_private_key_file))
        except OSError as exc:
            raise ConfigError(
                f"PIPELINE_CONTROL_PRIVATE_KEY_FILE: cannot read {exc.filename}: {exc.strerror}"
            ) from None
    verifier = _verifier(config)
    public_keys = [] if verifier is None else verifier.public_keys
    return Antigravity(
        config.kafka, prefix=config.topic_prefix, private_key=key, public_keys=public_keys
    )


_T = TypeVar("_T")


async def _from_database(
    config: Config, what: str, read: Callable[[Any], Awaitable[_T]]
) -> tuple[_T] | None:
    """``read(conn)`` on the group's database, or None with a warning naming ``what`` when
    the database cannot be read (`pipeline control` still works from Kafka alone)."""
    try:
        conn = await db.connect(config.database_url, config.db_session)
        try:
            return (await read(conn),)
        finally:
            await conn.close()
    except (OSError, PipelineError, asyncpg.PostgresError) as exc:
        print(f"pipeline: warning: {what} not read from PostgreSQL: {exc}", file=sys.stderr)
        return None


def _control_send(args: argparse.Namespace) -> int:
    """Sign and send a command; report the acks (as the instances report them, unsigned) and
    the group's decision as PostgreSQL recorded it, which is what the exit status follows
    when the database can be read."""
    from pipeline import control_store

    config = _load_kafka_config(args, group_id=args.group)
    command = _control_command(args)
    antigravity = _antigravity(config, signing=True)
    group = config.group_id

    async def send() -> tuple[Any, Any]:
        state = await _from_database(
            config,
            "the group's applied seq (the seq comes from the control topic alone)",
            lambda conn: control_store.load_state(conn, group),
        )
        applied = 0 if state is None else state[0].applied_seq
        delivery = await antigravity.send(group, command, wait_s=args.wait, applied_seq=applied)
        decided = await _from_database(
            config,
            "the group's decision",
            lambda conn: control_store.decisions_from(
                conn, group, delivery.offset, delivery.offset
            ),
        )
        return delivery, decided

    delivery, decided = asyncio.run(send())
    lines, ok = send_lines(
        group,
        delivery,
        None if decided is None else decided[0].get(delivery.offset),
        database_read=decided is not None,
        wait_s=args.wait,
    )
    for line in lines:
        print(line)
    return 0 if ok else 1


def send_lines(
    group: str, delivery: Any, decision: Any, *, database_read: bool, wait_s: float
) -> tuple[list[str], bool]:
    """`pipeline control`'s lines for a command sent (a ``Delivery``) and the group's decision
    on it (a ``control_store.Decision``; None: none, or ``database_read`` is false), and
    whether it succeeded: every live instance acked ``applied`` and, when the database could
    be read, the group applied it. The instance ids, acks' details and the decision's reason
    come from the status topic (any agent login writes it) or quote what was sent: each line
    goes through :func:`~pipeline.terminal.printable`."""
    envelope = delivery.envelope
    live = len(delivery.live)
    lines = [
        f"{envelope.kind} (seq {envelope.seq}, command {envelope.command_id}) sent to group "
        f"{group} at control offset {delivery.offset}; "
        + (
            f"{live} live instance(s) by their heartbeats; acks as reported by the instances "
            "(unsigned):"
            if live
            else "no live instance: applied when one starts"
        )
    ]
    for instance, ack in sorted(delivery.acks.items()):
        outcome = ack.outcome + (f": {ack.detail}" if ack.outcome == "rejected" else "")
        lines.append(f"  {instance}: {outcome}")
    for instance in delivery.missing:
        lines.append(f"  {instance}: no ack within {wait_s:g}s")
    ok: bool = delivery.ok
    if decision is not None:
        reason = f" ({decision.reason})" if decision.reason else ""
        lines.append(f"the group's decision (PostgreSQL control_log): {decision.outcome}{reason}")
        ok = ok and decision.outcome == "applied"
    elif database_read and live:
        # Acks without a decision are not to be believed: the status topic is unsigned.
        lines.append("the group's decision (PostgreSQL control_log): none yet")
        ok = False
    return [printable(line) for line in lines], ok


def _control_status(args: argparse.Namespace) -> int:

    config = _load_kafka_config(args, group_id=args.group)
    antigravity = _antigravity(config, signing=False)

    async def gather() -> tuple[int, list[Any]]:
        await antigravity.ensure_topics()
        # The seq is from signed envelopes; the instances, what their heartbeats say.
        return await antigravity.highest_seq(config.group_id), await antigravity.fleet(
            config.group_id
        )

    highest, heard = asyncio.run(gather())
    # Without a key to check signatures, no seq on the control topic can be trusted.
    latest = highest if antigravity.verifier.key_ids else None
    if args.json:
        instances = [
            {**msgspec.to_builtins(h), "behind": behind}
            for h, behind in live_instances(latest, heard)
        ]
        print(json.dumps({"group": config.group_id, "latest_seq": latest, "instances": instances}))
        return 0
    for line in status_lines(config.group_id, latest, heard):
        print(line)
    return 0


def live_instances(latest: int | None, heard: Sequence[Any]) -> list[tuple[Any, bool]]:
    """The live instances among the heartbeats ``heard`` (those not stopping), each with
    whether it reports an ``applied_seq`` behind ``latest``, the latest signed seq (None: no
    key to verify one with, so none is behind)."""
    return [
        (h, latest is not None and h.applied_seq < latest) for h in heard if h.state != "stopping"
    ]


def status_lines(group: str, latest: int | None, heard: Sequence[Any]) -> list[str]:
    """`pipeline control status`'s lines from the group's heartbeats (``Heartbeat``s) and the
    latest signed seq (None: no key to verify one with). Whoever may write to the status topic
    writes the heartbeats' fields: each line goes through :func:`~pipeline.terminal.printable`."""
    fleet = live_instances(latest, heard)
    shown = latest if latest is not None else "unknown (no key to verify it with)"
    lines = [
        f"group {group}: latest signed command seq {shown}; {len(fleet)} live instance(s), "
        "as reported by their heartbeats (unsigned):"
    ]
    for h in heard:
        if h.state == "stopping":
            lines.append(
                f"  {h.instance_id}: stopped (last heard {h.at.isoformat(timespec='seconds')})"
            )
    for h, behind in fleet:
        mark = "  BEHIND" if behind else ""
        lines.append(
            f"  {h.instance_id}: {h.state}, seq {h.applied_seq}{mark}, assignment "
            f"v{h.assignment_version}, streams {','.join(h.active_streams) or '-'}, "
            f"{len(h.owned_partitions)} partitions, lag {h.lag}"
            + (f", last error: {h.last_error}" if h.last_error else "")
        )
    return [printable(line) for line in lines]


def _top(args: argparse.Namespace) -> int:
    from consumers.top import Top, run_top
    from pipeline.top import LOOPBACK_HOSTS, METRICS_HOSTS_ENV, MetricsHosts

    if args.metrics_hosts is not None:
        setting, listed = "--metrics-hosts", args.metrics_hosts
    else:
        setting, listed = METRICS_HOSTS_ENV, os.environ.get(METRICS_HOSTS_ENV, LOOPBACK_HOSTS)
    try:
        hosts = MetricsHosts.parse(listed)
    except ValueError as exc:
        raise ConfigError(f"{setting}: {exc}") from None
    config = _load_config(args, group_id=args.group)
    top = Top(
        config.kafka,
        prefix=config.topic_prefix,
        group=config.group_id,
        interval_s=args.interval,
        metrics_hosts=hosts,
    )
    run_top(top, once=args.once)
    return 0


def _control_log(args: argparse.Namespace) -> int:
    from pipeline import control_store

    config = _load_config(args, group_id=args.group)

    async def read() -> list[dict[str, Any]]:
        conn = await db.connect(config.database_url, config.db_session)
        try:
            return await control_store.control_log(conn, config.group_id, args.limit)
        finally:
            await conn.close()

    for row in asyncio.run(read()):
        who = row["instance_id"] or "-"
        at = row["recorded_at"].isoformat(timespec="seconds")
        where = "" if row["src_offset"] is None else f" @{row['src_offset']}"
        reason = f" ({row['reason']})" if row["reason"] else ""
        print(
            printable(  # a rejected command's reason quotes what it was sent
                f"{at} {row['direction']:<7} seq {row['seq']} {row['kind']}{where} "
                f"{row['outcome']}{reason} by {who}"
            )
        )
    return 0


def _dlq_filters(args: argparse.Namespace) -> Any:
    from pipeline.redrive import Filters

    if args.stream is not None and len(args.stream) != 1:
        raise ConfigError("--stream: give one stream")
    stream = args.stream[0] if args.stream else None
    return Filters(stream, args.error_class, args.since, args.limit)


def _dlq_list(args: argparse.Namespace) -> int:
    from consumers.redrive import list_letters

    config = _load_config(args, group_id=args.group)
    for line in asyncio.run(list_letters(config, _dlq_filters(args))):
        print(line)
    return 0


def _dlq_show(args: argparse.Namespace) -> int:
    from consumers.redrive import show_letter

    config = _load_config(args, group_id=args.group)
    lines = asyncio.run(show_letter(config, args.id))
    if lines is None:
        raise PipelineError(f"group {config.group_id} has no dead letter {args.id}")
    for line in lines:
        print(line)
    return 0


def _dlq_replay(args: argparse.Namespace) -> int:
    from consumers.redrive import replay

    config = _load_config(args, group_id=args.group)
    outcome = asyncio.run(replay(config, _dlq_filters(args), dry_run=args.dry_run))
    for line in outcome.lines():
        print(line)
    return 0


def _replay(args: argparse.Namespace) -> int:
    from consumers.replay import Replayer, Request, list_replays, request_text
    from pipeline.replay import Progress, parse_partitions, parse_position, parse_streams

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = _load_config(args, group_id=args.group, database_url=args.database_url)
    if args.action == "list":

        async def read() -> list[dict[str, Any]]:
            conn = await db.connect(config.database_url, config.db_session)
            try:
                await db.check_schema(conn)
                return await list_replays(conn)
            finally:
                await conn.close()

        replays = asyncio.run(read())
        print(f"{'id':>4}  {'state':<8}  {'group':<16}  {'streams':<20}  progress  created")
        for r in replays:
            done = f"{r['done']:,}/{r['total']:,}"
            print(
                f"{r['id']:>4}  {r['state']:<8}  {r['group_id']:<16}  "
                f"{','.join(r['streams']):<20}  {done}  "
                f"{r['created_at'].isoformat(timespec='seconds')}"
                + (
                    f"  finished {r['finished_at'].isoformat(timespec='seconds')}"
                    if r["finished_at"]
                    else ""
                )
            )
            for note in r["notes"]:
                print(f"      {note}")
        return 0
    asyncio.run(kafka_clients.check_connection(config.kafka))
    tty = sys.stderr.isatty()

    def report(progress: Progress, final: bool) -> None:
        if tty:
            print("\r" + progress.bar(), end="\n" if final else "", file=sys.stderr, flush=True)
        else:
            _progress(progress.line())

    replayer = Replayer(config, batch_records=args.batch_records, rate=args.rate, report=report)
    _tune_garbage_collector()  # as for `pipeline run`: the same allocations
    if args.metrics_address:
        try:
            replayer.metrics.serve(args.metrics_address)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--metrics-address {args.metrics_address}: {exc}") from None
    if args.resume is not None:
        if args.stream or args.start or args.end or args.partitions:
            raise ConfigError("--resume ID takes the replay's own range: give no other range")
        replay_id = args.resume
    else:
        missing = [f for f, v in (("--stream", args.stream), ("--from", args.start),
                                  ("--to", args.end)) if not v]  # fmt: skip
        if missing:
            raise ConfigError(f"pipeline replay needs {', '.join(missing)} (or --resume ID)")
        request = Request(
            streams=parse_streams(args.stream),
            start=parse_position(args.start, side="from"),
            end=parse_position(args.end, side="to"),
            partitions=parse_partitions(args.partitions),
            allow_gap=args.allow_gap,
            text=request_text(
                streams=args.stream, start=args.start, end=args.end, partitions=args.partitions
            ),
        )
        replay_id, notes = asyncio.run(replayer.create(request))
        print(f"replay {replay_id} created", flush=True)
        for note in notes:
            print(f"  {note}", flush=True)
    summary = asyncio.run(replayer.run(replay_id))
    rate = summary.records / summary.seconds if summary.seconds else 0.0
    print(
        f"replay {replay_id} finished: {summary.records:,} records in {summary.seconds:.1f}s "
        f"({rate:,.0f}/s): {summary.rows:,} new rows, {summary.dead_letters:,} dead letters"
    )
    return 0


def _tune_garbage_collector() -> None:
    """An agent allocates a few million objects a second (records, rows) and frees as many:
    its live set is the two batches in flight. With CPython's default thresholds a young
    collection ran every 700 net allocations, each walking that live set: about a quarter of
    the agent's CPU (237k rows/s before, 276k after, measured with ``pipeline bench``).

    Start-up objects move out of the collector's sight, and a young collection waits for a
    million net allocations, more than two default batches hold; in a steady drain it then
    never runs (at 100,000, ``gc.callbacks`` timed 0.11-0.20 s of collections per million
    records). It still runs if the live set grows, or if cyclic garbage piles up, which the
    agent makes little of: 81 objects were left for a final collection after a 1M drain.
    """
    gc.freeze()
    gc.set_threshold(1_000_000, 10, 10)


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


def _dev_up(args: argparse.Namespace) -> int:
    """Start the local stack, unless the endpoint variables name other servers: then start
    nothing, and succeed only if those answer."""
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
        _progress(
            f"{KAFKA_ENV} and {DATABASE_ENV} are set to servers other than the local stack: "
            "using those (both answer), nothing started"
        )
        print(given.exports(), end="")
        return _dev_prometheus(stack) if args.prometheus else 0
    endpoints = stack.up(report=_progress)
    if given is not None and not stack.serves(given):
        _progress(
            f"the local stack listens on other ports than {KAFKA_ENV} and {DATABASE_ENV} say "
            '(its own were taken): eval "$(pipeline dev env)"'
        )
    _progress('ready; for other shells: eval "$(pipeline dev env)"')
    print(endpoints.exports(), end="")
    return _dev_prometheus(stack) if args.prometheus else 0


def _dev_prometheus(stack: Stack) -> int:
    server = prometheus.for_stack(stack.home)
    url = server.start()
    _progress(
        f"Prometheus at {url} (pid {server.pidfile.live_pid()}): job {prometheus.JOB} scrapes "
        f"the agents listed in {server.targets_path} (re-read while it runs: add one "
        "host:port per agent's PIPELINE_METRICS_ADDRESS)"
    )
    return 0


def _dev_down(args: argparse.Namespace) -> int:
    stack = Stack()
    prometheus.for_stack(stack.home).stop(report=_progress)
    stack.down(purge=args.purge, report=_progress)
    return 0


def _dev_status(args: argparse.Namespace) -> int:
    """What answers: the local stack's servers (with their pids), or, when the endpoint
    variables name other servers, those. Exit 3 when anything is down or does not answer."""
    stack = Stack()
    given = endpoints_from_env()
    if given is not None and not stack.serves(given):
        answers = probe_servers(given)
        for answer in answers:
            print(answer.line())
        _print_prometheus(stack)
        return 0 if all(a.problem is None for a in answers) else 3
    states = stack.status(probe=True)
    for state in states:
        print(state.line())
    _print_prometheus(stack)
    return 0 if all(s.serving for s in states) else 3


def _print_prometheus(stack: Stack) -> None:
    """The stack's Prometheus, when `dev up --prometheus` started it and it runs."""
    server = prometheus.for_stack(stack.home)
    if (url := server.url()) is not None:
        print(f"Prometheus: running (pid {server.pidfile.live_pid()}) at {url}")


def _dev_env(args: argparse.Namespace) -> int:
    if args.secure:  # the stack's own listener, whatever the environment names
        print(Stack().endpoints(tls=args.tls).exports(secure_user=args.user), end="")
        return 0
    given = endpoints_from_env()
    if given is not None and args.tls:
        raise ConfigError(
            f"--tls: {KAFKA_ENV} and {DATABASE_ENV} name your own servers; add sslmode and "
            "sslrootcert to your DATABASE_URL instead"
        )
    endpoints = given or Stack().endpoints(tls=args.tls)
    print(endpoints.exports(), end="")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from pipeline import kafka

    config = _load_kafka_config(args)
    topics = kafka.data_topics(config)
    asyncio.run(kafka.ensure_topics(config.kafka, topics, config.topic_partitions))
    result = asyncio.run(_simulate_from_args(config, args))
    for stream, count in result.counts.items():
        print(f"{stream:>10}: {count}")
    print(
        f"{'total':>10}: {result.total} records in {result.elapsed:.1f}s "
        f"({result.rate:,.0f}/s, target {result.target_rate:,.0f}/s; seed {result.seed})"
    )
    return 0


async def _simulate_from_args(config: Config, args: argparse.Namespace) -> SimulationResult:
    from producers.simulator import simulate

    return await simulate(
        config.kafka,
        agents=args.agents,
        rate=args.rate,
        duration=args.duration,
        topic_prefix=config.topic_prefix,
        mix=args.mix,
        seed=args.seed,
    )


def _demo(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    stack, started = _local_stack_up()
    try:
        config = _load_kafka_config(argparse.Namespace(config=None))
        if config.metrics_address:
            host, _, port = config.metrics_address.rpartition(":")
            free = choose_port(int(port), host=host)
            config = msgspec.structs.replace(config, metrics_address=f"{host}:{free}")
        asyncio.run(_run_demo(config, args))
    finally:
        if stack is not None:
            _say_the_stack_still_runs(stack, started)
    return 0


def _local_stack_up() -> tuple[Stack | None, bool]:
    """Start the local stack when this command uses it (the endpoint variables are unset, or
    name the stack itself): the stack, and whether it had to start anything. (None, False)
    when the variables name other servers."""
    stack = Stack()
    given = endpoints_from_env()
    if given is not None and not stack.serves(given):
        return None, False
    was_running = all(s.state == "running" for s in stack.status())
    stack.up(report=_progress)
    return stack, not was_running


def _say_the_stack_still_runs(stack: Stack, started: bool) -> None:
    """The local stack outlives the command: say so, and how to stop it."""
    states = {s.name: s for s in stack.status()}
    if not any(s.state == "running" for s in states.values()):
        return
    where = ", ".join(
        f"{name} on 127.0.0.1:{s.port}" for name, s in states.items() if s.state == "running"
    )
    how = "the demo started it" if started else "it was running before the demo"
    print(
        f"\nThe local stack is still running ({where}; {how}). "
        "Stop it with `pipeline dev down` (add --purge to delete its data)."
    )


DEMO_TABLES = (*DATA_TABLES, "dead_letters")


async def _run_demo(config: Config, args: argparse.Namespace) -> None:
    """The whole pipeline, watched from the outside.

    1. Apply migrations and create the topics.
    2. Start a DatabaseAgent (with /metrics) in this process, steered by its controller.
    3. Publish a simulated fleet's traffic for ``--duration`` seconds. A third of the way in,
       switch the events stream off through the signed control topic; at two thirds, on.
    4. Wait until the agent has ingested everything (lag 0), or 60 s more at most.
    5. Take a checkpoint through the control topic.
    6. Print what landed per table, the rates and the remaining lag.
    """
    from consumers.agent import DatabaseAgent
    from consumers.antigravity import Antigravity
    from consumers.controller import Controller, run_controlled
    from pipeline import control, kafka
    from pipeline.batching import lag

    topics = kafka.data_topics(config)
    group = config.group_id
    private_key, verifier = _demo_keys(config)
    conn = await db.connect(config.migration_url, config.db_session)
    try:
        await db.migrate(conn, db.read_migrations())  # as the migrator; the agent is a writer
        before = await _row_counts(conn)
        await kafka.ensure_topics(
            config.kafka, [*topics, kafka.dead_letter_topic(config)], config.topic_partitions
        )
        agent = DatabaseAgent(config)
        if config.metrics_address:
            agent.metrics.serve(config.metrics_address, readiness=agent.readiness)
            _progress(f"DatabaseAgent metrics: http://{config.metrics_address}/metrics")
        running = asyncio.create_task(run_controlled(agent, Controller(agent, verifier)))
        antigravity = Antigravity(
            config.kafka, prefix=config.topic_prefix, private_key=private_key, issuer="demo"
        )
        await _until_live(antigravity, group, agent.instance_id, running)

        async def steer(command: Any) -> None:
            started = time.monotonic()
            delivery = await antigravity.send(group, command, wait_s=30)
            took = time.monotonic() - started
            who = ", ".join(f"{i}: {a.outcome}" for i, a in delivery.acks.items())
            _progress(
                f"control: {delivery.envelope.kind} (seq {delivery.envelope.seq}) -> {who} "
                f"in {took:.2f}s"
            )
            if not delivery.ok:
                raise PipelineError(f"the agent did not apply {delivery.envelope.kind}")

        _progress(
            f"publishing from {args.agents} simulated agents at {args.rate:,.0f} records/s "
            f"for {args.duration:g}s ({args.mix} mix)"
        )
        started = time.monotonic()
        publishing = asyncio.create_task(_simulate_from_args(config, args))
        events = config.topic("agents.events")
        await asyncio.sleep(args.duration / 3)
        await steer(control.Deactivate(streams=("events",)))
        held_at = await db.stored_offsets(conn, group)
        await asyncio.sleep(args.duration / 3)
        ends = await kafka.end_offsets(config.kafka, [events])
        waiting = sum(ends.values()) - sum(o for (t, _), o in held_at.items() if t == events)
        stored = await db.stored_offsets(conn, group)
        moved = any(stored[tp] != held_at[tp] for tp in held_at if tp[0] == events)
        _progress(
            f"control: {waiting:,} event records waited in Kafka while events was off"
            + (" (but its stored offsets moved!)" if moved else "")
        )
        await steer(control.Activate(streams=("events",)))
        result = await publishing
        _progress(f"published {result.total:,} records; waiting for the DatabaseAgent")
        published = time.monotonic()
        ends = await kafka.end_offsets(config.kafka, topics)
        remaining = lag(ends, await db.stored_offsets(conn, group))
        deadline = time.monotonic() + 60
        while remaining and time.monotonic() < deadline and not running.done():
            await asyncio.sleep(0.25)
            remaining = lag(ends, await db.stored_offsets(conn, group))
        caught_up = time.monotonic() - published
        elapsed = time.monotonic() - started
        await steer(control.Checkpoint(name=time.strftime("demo-%Y%m%dT%H%M%S")))
        _progress("control: `pipeline control log` shows what the group was told")
        agent.stop()
        await running
        after = await _row_counts(conn)
    finally:
        await conn.close()
    if moved:
        raise PipelineError("events were ingested while the stream was switched off")

    landed = {t: after[t] - before[t] for t in DEMO_TABLES}
    ingested = agent.metrics.total("pipeline_rows_ingested_total")
    duplicates = agent.metrics.total("pipeline_duplicates_skipped_total")
    dead = agent.metrics.total("pipeline_dead_letters_total")
    width = max(map(len, DEMO_TABLES))
    print(f"\n{'table':<{width}}  rows landed  (total)")
    for table in DEMO_TABLES:
        print(f"{table:<{width}}  {landed[table]:>11,}  ({after[table]:,})")
    print(
        f"\npublished {result.total:,} records at {result.rate:,.0f}/s in {elapsed:.1f}s: "
        f"{ingested:,.0f} new rows, {duplicates:,.0f} already stored (a state or config "
        f"version, or an event id, ingested before: skipped), {dead:,.0f} dead-lettered.\n"
        f"Caught up {caught_up:.1f}s after the last publish; remaining lag: {remaining:,} records"
    )
    if remaining:
        raise PipelineError(f"the DatabaseAgent did not catch up: {remaining} records behind")


def _demo_keys(config: Config) -> tuple[Any, Any]:
    """The demo's control key pair: the configured one (the local stack's), or a new one
    that lives as long as the demo."""
    from pipeline import control

    if config.control_private_key_file and config.control_public_keys:
        private = control.read_private_key_file(Path(config.control_private_key_file))
        return private, _verifier(config)
    private, public = control.generate_key_pair()
    return private, control.Verifier([public])


async def _until_live(
    antigravity: Any, group: str, instance_id: str, running: asyncio.Task[None]
) -> None:
    """Wait until the agent's heartbeats reach the status topic: it is steerable."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not running.done():
        if any(h.instance_id == instance_id for h in await antigravity.fleet(group)):
            return
        await asyncio.sleep(0.25)
    if running.done():
        await running  # its failure, said as it is
    raise PipelineError("the DatabaseAgent did not report on the status topic within 60 s")


async def _row_counts(conn: Any) -> dict[str, int]:
    return {t: await conn.fetchval(f"SELECT count(*) FROM {t}") for t in DEMO_TABLES}


def _bench(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from consumers.bench import BenchPlan, as_json, missing_extras, plot, run_bench, table
    from producers.simulator import FleetSimulator, simulate

    missing = missing_extras(profile=args.profile is not None)
    if missing:  # before anything starts: the plot comes at the end of a long run
        raise ConfigError(
            f"pipeline bench needs its extra, and this environment lacks {' and '.join(missing)}"
            f": install it with `{sys.executable} -m pip install -e '.[bench]'` in the "
            "repository (`make demo` and `make test` install it into .venv)"
        )

    def source(mix: str, count: int) -> Iterator[list[Any]]:
        fleet = FleetSimulator(agents=143, seed=1, mix=mix)
        for start in range(0, count, 10_000):
            yield fleet.next_records(min(10_000, count - start), datetime.now(UTC))

    async def publish(
        kafka: KafkaSettings, prefix: str, mix: str, rate: float, seconds: float
    ) -> int:
        result = await simulate(
            kafka, rate=rate, duration=seconds, topic_prefix=prefix, mix=mix, seed=2
        )
        return result.total

    plan = BenchPlan(
        mixes=args.mix or ["metrics-heavy", "events-heavy"],
        records=100_000 if args.quick else args.records,
        partitions=args.partitions,
        scale_out=not args.no_scale_out,
        latency_rate=5_000 if args.quick else args.latency_rate,
        latency_seconds=10 if args.quick else args.latency_seconds,
        memory_records=200_000 if args.quick else args.memory_records,
        profile=args.profile,
    )
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    stack, _ = _local_stack_up()
    # The bench creates a scratch database per run: on the local stack, as its superuser,
    # owned by the migrator, and its agents run as the agent login, as in production.
    admin = {} if stack is None else {"database_url": stack.admin_url()}
    if stack is not None:
        from pipeline import testbed

        testbed.use_logins(stack.logins(), stack.admin_url())
    config = _load_kafka_config(argparse.Namespace(config=None), **admin)
    if args.secure and args.pooler:
        raise ConfigError("--secure and --pooler are two measurements: give one at a time")
    if args.secure:
        return _bench_encryption(stack, config, source, plan, args.json)
    if args.pooler:
        return _bench_pooler(stack, args.pooler, config, source, plan, json_path=args.json)
    results, memory = asyncio.run(run_bench(config, source, publish, plan, _progress))
    print(table(results, memory))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(as_json(results, memory), indent=2) + "\n")
    plot(results, args.png)
    _progress(f"plot: {args.png}")
    return 0


def _bench_encryption(
    stack: Stack | None, config: Config, source: Any, plan: Any, json_path: Path | None
) -> int:
    """`pipeline bench --secure`: plaintext against the stack's SASL_SSL listener."""
    from consumers.bench import Listener, encryption_table, run_encryption_bench
    from pipeline.devstack import kafka_auth

    stack = _local_stack_for(stack, "--secure measures the local stack's SASL_SSL listener")
    endpoints = stack.endpoints()
    secure = endpoints.kafka_secure
    if secure is None:
        raise DevStackError(NO_SECURE_LISTENER)
    listeners = [
        Listener("plaintext", config.kafka, config),
        Listener(
            "SASL_SSL",
            secure.settings(PRODUCER_USER),
            _with_kafka(config, secure.settings(AGENT_USER, client_id=config.instance_id)),
        ),
    ]

    async def grant(prefix: str, group: str) -> None:
        acls = kafka_auth.pipeline_acls(prefix, group)
        await kafka_auth.set_up(endpoints.kafka, {}, acls)

    results = asyncio.run(
        run_encryption_bench(
            config, source=source, listeners=listeners, grant=grant, plan=plan, report=_progress
        )
    )
    print(encryption_table(results))
    _write_results(json_path, results)
    return 0


def _bench_pooler(
    stack: Stack | None,
    mode: str,
    config: Config,
    source: Any,
    plan: Any,
    *,
    json_path: Path | None,
) -> int:
    """`pipeline bench --pooler MODE`: directly against through a PgBouncer it starts."""
    from consumers.bench import Route, pooler_table, run_pooler_bench
    from pipeline import testbed
    from pipeline.devstack import pgbouncer

    stack = _local_stack_for(
        stack, "--pooler starts PgBouncer in front of the local stack's PostgreSQL"
    )
    logins = stack.logins()
    with pgbouncer.running(
        stack.home / f"pgbouncer-bench-{mode}",
        mode,
        stack.admin_url(),
        [logins.migrator, logins.agent, logins.analyst],
        "postgres",
    ) as bouncer:
        assert bouncer.port is not None
        port = bouncer.port
        _progress(f"PgBouncer {mode} mode on 127.0.0.1:{port}")
        route = Route(
            f"PgBouncer ({mode})",
            lambda url: pgbouncer.through(testbed.as_agent(url), port),
            pgbouncer.agent_settings(mode),
        )
        results = asyncio.run(
            run_pooler_bench(config, source=source, pooler=route, plan=plan, report=_progress)
        )
    print(pooler_table(results))
    _write_results(json_path, results)
    return 0


def _local_stack_for(stack: Stack | None, why: str) -> Stack:
    """The local stack a bench mode needs (``why`` says which and for what), or the error."""
    if stack is None:
        raise ConfigError(f"{why}: unset {KAFKA_ENV} and {DATABASE_ENV} to use the local stack")
    return stack


def _write_results(json_path: Path | None, results: Sequence[Any]) -> None:
    """A bench mode's results (dataclasses) as JSON at ``json_path``, when given."""
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")


def _with_kafka(config: Config, kafka: KafkaSettings) -> Config:
    """``config`` connecting to Kafka as ``kafka`` says."""
    return msgspec.structs.replace(
        config,
        kafka_bootstrap_servers=kafka.bootstrap_servers,
        kafka_security_protocol=kafka.security_protocol,
        kafka_sasl_mechanism=kafka.sasl_mechanism,
        kafka_ssl_cafile=kafka.ssl_cafile,
        kafka_sasl_username=kafka.sasl_username,
        kafka_sasl_password_file=kafka.sasl_password_file,
        kafka_sasl_password=kafka.sasl_password,
    )


def _progress(message: str) -> None:
    print(message, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
