"""`pipeline topics create`: the data, dead-letter, control and status topics."""

from __future__ import annotations

import argparse
import asyncio

from pipeline.commands._common import OK, Subparsers, config_option, load_kafka_config


def register(commands: Subparsers) -> None:
    topics = commands.add_parser("topics", help="manage the pipeline's Kafka topics")
    actions = topics.add_subparsers(required=True, metavar="ACTION")
    create_parser = actions.add_parser(
        "create", help="create the data, dead-letter, control and status topics"
    )
    config_option(create_parser)
    create_parser.add_argument(
        "--partitions", type=int, help="partitions per new topic (default 6)"
    )
    create_parser.set_defaults(handler=create)


def create(args: argparse.Namespace) -> int:
    from pipeline import kafka
    from pipeline.control import control_topics

    config = load_kafka_config(args, topic_partitions=args.partitions)
    topics = [*kafka.data_topics(config), kafka.dead_letter_topic(config)]
    control = list(control_topics(config.topic_prefix))

    async def create_all() -> list[str]:
        made = await kafka.ensure_topics(config.kafka, topics, config.topic_partitions)
        # One partition each: commands are totally ordered, and status readers read one log.
        return made + await kafka.ensure_topics(config.kafka, control, 1)

    created = asyncio.run(create_all())
    for topic in [*topics, *control]:
        print(f"{topic}: {'created' if topic in created else 'exists'}")
    return OK
