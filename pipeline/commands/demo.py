"""`pipeline demo`: the whole pipeline in one command, on the local stack (or the servers the
endpoint variables name): migrations and topics, a DatabaseAgent steered through the signed
control topic, a simulated fleet's traffic, and what landed (README.md, "Set up on a fresh
machine: two commands")."""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from pipeline import sql_names
from pipeline.commands._common import (
    OK,
    Subparsers,
    load_kafka_config,
    local_stack_up,
    progress,
    verifier,
)
from pipeline.commands.simulate import simulate_from_args, simulation_options
from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from pipeline.config import Config
    from pipeline.devstack import Stack


def register(commands: Subparsers) -> None:
    parser = commands.add_parser(
        "demo", help="the whole pipeline in one command: stack, agent, 143 agents, summary"
    )
    simulation_options(parser, rate=5000.0, duration=10.0)
    parser.set_defaults(handler=demo)


def demo(args: argparse.Namespace) -> int:
    from pipeline.devstack.processes import choose_port

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    stack, started = local_stack_up()
    try:
        config = load_kafka_config(argparse.Namespace(config=None))
        if config.metrics_address:
            host, _, port = config.metrics_address.rpartition(":")
            free = choose_port(int(port), host=host)
            config = msgspec.structs.replace(config, metrics_address=f"{host}:{free}")
        asyncio.run(_run_demo(config, args))
    finally:
        if stack is not None:
            _say_the_stack_still_runs(stack, started)
    return OK


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
    from pipeline import control, db, kafka
    from pipeline.batching import lag

    topics = kafka.data_topics(config)
    group = config.group_id
    private_key, trusted = _keys(config)
    conn = await db.connect(config.migration_url, config.db_session)
    try:
        await db.migrate(conn, db.read_migrations())  # as the migrator; the agent is a writer
        tables = (*config.catalog.data_tables, "dead_letters")
        before = await _row_counts(conn, tables)
        await kafka.ensure_topics(
            config.kafka, [*topics, kafka.dead_letter_topic(config)], config.topic_partitions
        )
        agent = DatabaseAgent(config)
        if config.metrics_address:
            agent.metrics.serve(config.metrics_address, readiness=agent.readiness)
            progress(f"DatabaseAgent metrics: http://{config.metrics_address}/metrics")
        running = asyncio.create_task(run_controlled(agent, Controller(agent, trusted)))
        antigravity = Antigravity(
            config.kafka, prefix=config.topic_prefix, private_key=private_key, issuer="demo"
        )
        await _until_live(antigravity, group, agent.instance_id, running)

        async def steer(command: Any) -> None:
            started = time.monotonic()
            delivery = await antigravity.send(group, command, wait_s=30)
            took = time.monotonic() - started
            who = ", ".join(f"{i}: {a.outcome}" for i, a in delivery.acks.items())
            progress(
                f"control: {delivery.envelope.kind} (seq {delivery.envelope.seq}) -> {who} "
                f"in {took:.2f}s"
            )
            if not delivery.ok:
                raise PipelineError(f"the agent did not apply {delivery.envelope.kind}")

        progress(
            f"publishing from {args.agents} simulated agents at {args.rate:,.0f} records/s "
            f"for {args.duration:g}s ({args.mix} mix)"
        )
        started = time.monotonic()
        publishing = asyncio.create_task(simulate_from_args(config, args))
        events = config.topic("agents.events")
        await asyncio.sleep(args.duration / 3)
        await steer(control.Deactivate(streams=("events",)))
        held_at = await db.stored_offsets(conn, group)
        await asyncio.sleep(args.duration / 3)
        ends = await kafka.end_offsets(config.kafka, [events])
        waiting = sum(ends.values()) - sum(o for (t, _), o in held_at.items() if t == events)
        stored = await db.stored_offsets(conn, group)
        moved = any(stored[tp] != held_at[tp] for tp in held_at if tp[0] == events)
        progress(
            f"control: {waiting:,} event records waited in Kafka while events was off"
            + (" (but its stored offsets moved!)" if moved else "")
        )
        await steer(control.Activate(streams=("events",)))
        result = await publishing
        progress(f"published {result.total:,} records; waiting for the DatabaseAgent")
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
        progress("control: `pipeline control log` shows what the group was told")
        agent.stop()
        await running
        after = await _row_counts(conn, tables)
    finally:
        await conn.close()
    if moved:
        raise PipelineError("events were ingested while the stream was switched off")

    landed = {t: after[t] - before[t] for t in tables}
    ingested = agent.metrics.total("pipeline_rows_ingested_total")
    duplicates = agent.metrics.total("pipeline_duplicates_skipped_total")
    dead = agent.metrics.total("pipeline_dead_letters_total")
    width = max(map(len, tables))
    print(f"\n{'table':<{width}}  rows landed  (total)")
    for table in tables:
        print(f"{table:<{width}}  {landed[table]:>11,}  ({after[table]:,})")
    print(
        f"\npublished {result.total:,} records at {result.rate:,.0f}/s in {elapsed:.1f}s: "
        f"{ingested:,.0f} new rows, {duplicates:,.0f} already stored (a state or config "
        f"version, or an event id, ingested before: skipped), {dead:,.0f} dead-lettered.\n"
        f"Caught up {caught_up:.1f}s after the last publish; remaining lag: {remaining:,} records"
    )
    if remaining:
        raise PipelineError(f"the DatabaseAgent did not catch up: {remaining} records behind")


def _keys(config: Config) -> tuple[Any, Any]:
    """The demo's control key pair: the configured one (the local stack's), or a new one
    that lives as long as the demo."""
    from pipeline import control

    if config.control_private_key_file and config.control_public_keys:
        private = control.read_private_key_file(Path(config.control_private_key_file))
        return private, verifier(config)
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


async def _row_counts(conn: Any, tables: tuple[str, ...]) -> dict[str, int]:
    return {t: await conn.fetchval(f"SELECT count(*) FROM {sql_names.table(t)}") for t in tables}
