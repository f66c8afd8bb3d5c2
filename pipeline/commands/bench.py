"""`pipeline bench`: end-to-end throughput against the raw limits, latency and memory, in one
run; or, with --secure or --pooler, what TLS + SASL or a connection pooler costs. The
measurements are consumers/bench.py; how to read them, docs/performance.md ("Running it").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from pipeline.commands._common import (
    OK,
    Subparsers,
    load_kafka_config,
    local_stack_up,
    positive,
    progress,
)
from pipeline.errors import ConfigError, DevStackError

if TYPE_CHECKING:
    from consumers.bench import BenchPlan
    from pipeline.catalog import Catalog
    from pipeline.config import Config
    from pipeline.devstack import Stack
    from pipeline.kafka_clients import KafkaSettings


SDK_LOCK_S = 10  # --sdk: how long the tables stay locked, in the middle of each way's run


def register(commands: Subparsers) -> None:
    parser = commands.add_parser(
        "bench", help="end-to-end throughput against the raw limits, measured in one run"
    )
    count, amount = positive(int), positive(float)
    parser.add_argument("--records", type=count, default=1_000_000, help="backlog per mix (1M)")
    parser.add_argument(
        "--latency-rate", type=amount, default=20_000, help="records/s of the latency run (20k)"
    )
    parser.add_argument(
        "--latency-seconds", type=amount, default=60, help="length of the latency run (60)"
    )
    parser.add_argument(
        "--memory-records", type=count, default=5_000_000, help="backlog of the memory run (5M)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="about two minutes: 100k records per mix, 5k records/s for 10 s, 200k for memory",
    )
    parser.add_argument(
        "--mix",
        action="append",
        choices=["metrics-heavy", "events-heavy", "catalog"],
        help="metrics-heavy, events-heavy and/or catalog: user streams declared in a catalog "
        "(default all three; with --secure or --pooler, the first two)",
    )
    parser.add_argument("--partitions", type=count, default=6, help="partitions per topic (6)")
    parser.add_argument("--no-scale-out", action="store_true", help="skip the two-process run")
    parser.add_argument(
        "--secure",
        action="store_true",
        help="what TLS + SASL/SCRAM cost: produce, consume raw and drain end to end over the "
        "local stack's SASL_SSL listener and over plaintext, in one run, and report the ratios "
        "(instead of the usual measurements)",
    )
    parser.add_argument(
        "--pooler",
        choices=["transaction", "session"],
        help="what a connection pooler costs: drain end to end through a PgBouncer in this pool "
        "mode in front of the local stack's PostgreSQL and directly, in one run, and report the "
        "ratio (instead of the usual measurements)",
    )
    parser.add_argument(
        "--partitioning",
        action="store_true",
        help="what time partitions buy: dropping a day of metric rows by retention against "
        "DELETE, and one agent's day of metrics, on a partitioned and an unpartitioned table "
        "with the same rows (instead of the usual measurements; PostgreSQL only)",
    )
    parser.add_argument(
        "--rows", type=count, default=1_000_000, help="--partitioning: metric rows a day (1M)"
    )
    parser.add_argument(
        "--sdk",
        action="store_true",
        help="the agents' side: a simulated agent emits states, events and metrics at "
        "--sdk-rate for --sdk-seconds, writing them itself (an INSERT each, awaited), batched "
        "(executemany) and through the SDK, each in its own process, with the tables locked "
        f"for {SDK_LOCK_S} s in the middle; CPU per 1,000 records, call times, RSS (instead of "
        "the usual measurements)",
    )
    parser.add_argument(
        "--sdk-rate", type=amount, default=100, help="records/s of the simulated agent (100)"
    )
    parser.add_argument(
        "--sdk-seconds",
        type=amount,
        default=40,
        help=f"how long each way runs (40; above the lock's {SDK_LOCK_S} s)",
    )
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="FILE",
        help="the recorded baseline each mix's rows/s and CPU-s per 1M rows are compared with "
        "(default consumers/bench_baseline.json)",
    )
    parser.add_argument(
        "--record-baseline",
        action="store_true",
        help="after comparing, write this run's numbers, the commit, the date and the machine "
        "to the baseline file",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="also drain each backlog once under py-spy; raw stacks here, breakdown printed",
    )
    parser.add_argument(
        "--png",
        type=Path,
        default=Path("bench-results/bench.png"),
        help="the plot (default bench-results/bench.png)",
    )
    parser.set_defaults(handler=bench)


def bench(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from consumers.bench import (
        BASELINE_FILE,
        BenchPlan,
        as_json,
        missing_extras,
        plot,
        read_baseline,
        run_bench,
        table,
    )
    from producers.simulator import FleetSimulator, simulate

    modes = [name for name, on in (("--secure", args.secure), ("--pooler", args.pooler),
                                   ("--sdk", args.sdk), ("--partitioning", args.partitioning))
             if on]  # fmt: skip
    if len(modes) > 1:
        raise ConfigError(f"{' and '.join(modes)} are separate measurements: give one at a time")
    if args.record_baseline and modes:
        raise ConfigError(f"--record-baseline records the usual measurements, not {modes[0]}")
    if args.sdk and not args.sdk_seconds > SDK_LOCK_S:
        raise ConfigError(
            f"--sdk-seconds must be above {SDK_LOCK_S}, the lock's time, got {args.sdk_seconds:g}"
        )
    if args.partitioning:
        return _partitioning(args)
    baseline_path = args.baseline or BASELINE_FILE
    baseline = read_baseline(baseline_path)  # a broken file stops the run before it starts
    load_before = os.getloadavg()
    # Taken now: the tree may change while a long run goes on.
    commit = _commit() if args.record_baseline else ""
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
        mixes=args.mix or _default_mixes(args),
        records=100_000 if args.quick else args.records,
        partitions=args.partitions,
        scale_out=not args.no_scale_out,
        latency_rate=5_000 if args.quick else args.latency_rate,
        latency_seconds=10 if args.quick else args.latency_seconds,
        memory_records=200_000 if args.quick else args.memory_records,
        profile=args.profile,
    )
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    stack, _ = local_stack_up()
    # The bench creates a scratch database per run: on the local stack, as its superuser,
    # owned by the migrator, and its agents run as the agent login, as in production.
    admin = {} if stack is None else {"database_url": stack.admin_url()}
    if stack is not None:
        from pipeline import testbed

        testbed.use_logins(stack.logins(), stack.admin_url())
    config = load_kafka_config(argparse.Namespace(config=None), **admin)
    if args.secure:
        _write_json(args.json, _encryption(stack, config, source, plan))
        return OK
    if args.pooler:
        _write_json(args.json, _pooler(stack, args.pooler, config, source, plan))
        return OK
    if args.sdk:
        _write_json(args.json, _sdk(config, args))
        return OK
    results, memory = asyncio.run(run_bench(config, source, publish, plan, progress))
    print(table(results, memory))
    _against_baseline(results, plan.partitions, baseline_path, baseline)
    if args.record_baseline:
        _record_baseline(results, plan.partitions, baseline_path, commit, load_before)
    _write_json(args.json, as_json(results, memory))
    plot(results, args.png)
    progress(f"plot: {args.png}")
    return OK


def _partitioning(args: argparse.Namespace) -> int:
    """`pipeline bench --partitioning`: consumers/bench_partitions.py, against the configured
    PostgreSQL (the local stack's unless DATABASE_URL names another server)."""
    from consumers.bench_partitions import AGENTS, as_json, run_partition_bench, table
    from pipeline.commands._common import load_config
    from producers.simulator import FleetSimulator, Mix

    stack, _ = local_stack_up()
    admin = {} if stack is None else {"database_url": stack.admin_url()}
    config = load_config(argparse.Namespace(config=None), **admin)
    only_metrics = Mix(states=0, events=0, metrics=1, analytics=0, config=0)
    fleet = FleetSimulator(agents=AGENTS, seed=1, mix=only_metrics)
    result = asyncio.run(run_partition_bench(config.database_url, fleet, args.rows, progress))
    print(table(result))
    _write_json(args.json, as_json(result))
    return OK


def _against_baseline(
    results: list[Any], partitions: int, path: Path, baseline: dict[str, object] | None
) -> None:
    """Print each mix's rows/s and CPU-s per 1M rows against the recorded baseline."""
    from consumers.bench import baseline_source, baseline_table, compare_with_baseline

    drifts, notes = compare_with_baseline(results, baseline, partitions)
    print(baseline_table(drifts, notes, baseline_source(path, baseline)))


def _record_baseline(
    results: list[Any],
    partitions: int,
    path: Path,
    commit: str,
    load_before: tuple[float, float, float],
) -> None:
    """Write this run's numbers as the new baseline, with the commit, date and machine."""
    from datetime import UTC, datetime

    from consumers.bench import baseline_record, machine_facts

    record = baseline_record(
        results,
        partitions=partitions,
        commit=commit,
        recorded_at=datetime.now(UTC).isoformat(timespec="seconds"),
        command=shlex.join(["pipeline", *sys.argv[1:]]),
        machine=machine_facts(load_before),
    )
    _write_json(path, record)
    progress(f"baseline recorded: {path}")


BASELINE_PATH_IN_REPO = "consumers/bench_baseline.json"


def _commit() -> str:
    """The checkout's commit, with "+changes" when its tracked files differ from it; "unknown"
    outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()  # fmt: skip
        changed = subprocess.run(
            # The baseline itself is what a re-recording changes: not a change of the code.
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--",
             ".", f":(exclude){BASELINE_PATH_IN_REPO}"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}+changes" if changed else head


def _default_mixes(args: argparse.Namespace) -> list[str]:
    """Without --mix: every mix; --secure and --pooler compare their routes on the built-in
    ones."""
    builtin = ["metrics-heavy", "events-heavy"]
    return builtin if args.secure or args.pooler else [*builtin, "catalog"]


def _encryption(
    stack: Stack | None, config: Config, source: Any, plan: BenchPlan
) -> list[dict[str, Any]]:
    """`pipeline bench --secure`: plaintext against the stack's SASL_SSL listener. Prints the
    table; the results, for --json."""
    from consumers.bench import Listener, encryption_table, run_encryption_bench
    from pipeline.devstack import kafka_auth
    from pipeline.devstack.kafka_users import AGENT_USER, PRODUCER_USER
    from pipeline.devstack.stack import NO_SECURE_LISTENER

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

    async def grant(prefix: str, group: str, catalog: Catalog) -> None:
        acls = kafka_auth.pipeline_acls(prefix, group, catalog)
        await kafka_auth.set_up(endpoints.kafka, {}, acls)

    results = asyncio.run(
        run_encryption_bench(
            config, source=source, listeners=listeners, grant=grant, plan=plan, report=progress
        )
    )
    print(encryption_table(results))
    return [asdict(r) for r in results]


def _pooler(
    stack: Stack | None, mode: str, config: Config, source: Any, plan: BenchPlan
) -> list[dict[str, Any]]:
    """`pipeline bench --pooler MODE`: directly against through a PgBouncer it starts. Prints
    the table; the results, for --json."""
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
        progress(f"PgBouncer {mode} mode on 127.0.0.1:{port}")
        route = Route(
            f"PgBouncer ({mode})",
            lambda url: pgbouncer.through(testbed.as_agent(url), port),
            pgbouncer.agent_settings(mode),
        )
        results = asyncio.run(
            run_pooler_bench(config, source=source, pooler=route, plan=plan, report=progress)
        )
    print(pooler_table(results))
    return [asdict(r) for r in results]


def _sdk(config: Config, args: argparse.Namespace) -> dict[str, object]:
    """`pipeline bench --sdk`: the three ways an agent hands its records over. Prints the
    table; the results, for --json."""
    from consumers.bench_sdk import SdkPlan, run_sdk_bench, sdk_json, sdk_table

    plan = SdkPlan(
        rate=args.sdk_rate,
        seconds=args.sdk_seconds,
        lock_at=(args.sdk_seconds - SDK_LOCK_S) / 2,
        lock_seconds=SDK_LOCK_S,
    )
    results = asyncio.run(run_sdk_bench(config.kafka, config.database_url, plan, progress))
    print(sdk_table(results, plan))
    return sdk_json(results, plan)


def _local_stack_for(stack: Stack | None, why: str) -> Stack:
    """The local stack a bench mode needs (``why`` says which and for what), or the error."""
    from pipeline.devstack.stack import DATABASE_ENV, KAFKA_ENV

    if stack is None:
        raise ConfigError(f"{why}: unset {KAFKA_ENV} and {DATABASE_ENV} to use the local stack")
    return stack


def _write_json(path: Path | None, results: object) -> None:
    """The results as JSON at ``path`` (--json), when given."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")


def _with_kafka(config: Config, kafka: KafkaSettings) -> Config:
    """``config`` connecting to Kafka as ``kafka`` says."""
    return msgspec.structs.replace(
        config, kafka=msgspec.structs.replace(kafka, client_id=config.instance_id)
    )
