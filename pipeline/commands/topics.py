"""`pipeline topics create`: the data, dead-letter, control and status topics."""

from __future__ import annotations

import argparse
import asyncio

from pipeline.commands._common import OK, Subparsers, config_option, load_kafka_config


def register(commands: Subparsers) -> None:
    topics = commands.add_parser("topics", help="manage the pipeline's Kafka topics")
    actions = topics.add_subparsers(required=True, metavar="ACTION")
    create_parser = actions.add_parser(
        "create",
        help="create the data, dead-letter, control and status topics; bring an existing "
        "status topic's retention to the pipeline's (docs/control-plane.md)",
    )
    config_option(create_parser)
    create_parser.add_argument(
        "--partitions", type=int, help="partitions per new topic (default 6)"
    )
    create_parser.set_defaults(handler=create)


def create(args: argparse.Namespace) -> int:
    from pipeline import kafka

    config = load_kafka_config(args, topic_partitions=args.partitions)
    for line in asyncio.run(kafka.create_topics(config)):
        print(line)
    return OK
