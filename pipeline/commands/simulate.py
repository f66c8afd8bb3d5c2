"""`pipeline simulate`: a simulated fleet's traffic published to the data topics; its options
and its run are `pipeline demo`'s too. The simulator is producers/simulator.py."""

from __future__ import annotations

import argparse
import asyncio
from typing import TYPE_CHECKING

from pipeline.commands._common import OK, Subparsers, config_option, load_kafka_config

if TYPE_CHECKING:
    from pipeline.config import Config
    from producers.simulator import SimulationResult


def register(commands: Subparsers) -> None:
    parser = commands.add_parser("simulate", help="publish a simulated fleet's traffic")
    config_option(parser)
    simulation_options(parser, rate=5000.0, duration=10.0)
    parser.set_defaults(handler=simulate)


def simulation_options(parser: argparse.ArgumentParser, rate: float, duration: float) -> None:
    parser.add_argument("--agents", type=int, default=143, help="simulated agents (143)")
    parser.add_argument("--rate", type=float, default=rate, help=f"records/s ({rate:g})")
    parser.add_argument("--duration", type=float, default=duration, help=f"seconds ({duration:g})")
    parser.add_argument(
        "--mix", default="default", help="default, metrics-heavy or events-heavy (default)"
    )
    parser.add_argument("--seed", type=int, help="for reproducible traffic")


def simulate(args: argparse.Namespace) -> int:
    from pipeline import kafka

    config = load_kafka_config(args)
    topics = kafka.data_topics(config)
    asyncio.run(kafka.ensure_topics(config.kafka, topics, config.topic_partitions))
    result = asyncio.run(simulate_from_args(config, args))
    for stream, count in result.counts.items():
        print(f"{stream:>10}: {count}")
    print(
        f"{'total':>10}: {result.total} records in {result.elapsed:.1f}s "
        f"({result.rate:,.0f}/s, target {result.target_rate:,.0f}/s; seed {result.seed})"
    )
    return OK


async def simulate_from_args(config: Config, args: argparse.Namespace) -> SimulationResult:
    """Publish the traffic :func:`simulation_options` describe."""
    from producers.simulator import simulate as publish

    return await publish(
        config.kafka,
        agents=args.agents,
        rate=args.rate,
        duration=args.duration,
        topic_prefix=config.topic_prefix,
        mix=args.mix,
        seed=args.seed,
    )
