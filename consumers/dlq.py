"""The DatabaseAgent's way to the dead-letter topic: its producer, the topic's size limit, and
what the agent does when the topic refuses a letter as too large. The letters' shape is
:mod:`pipeline.kafka`'s (``dlq_record``); docs/architecture.md, "The wire contract", says how
each letter is sized and what a refused one does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from pipeline import kafka as kafka_io
from pipeline.config import Config
from pipeline.db import DeadLetter
from pipeline.errors import ConfigError, TransientError

log = logging.getLogger(__name__)


class DeadLetterOutlet:
    """``await start()`` once the topic exists, :meth:`publish` the letters of each batch
    attempt, ``await stop()`` when the agent closes.

    Around each attempt of a batch: :meth:`before_attempt` first, then :meth:`delivered` once
    it committed, or :meth:`refused` when the topic refused one of its letters.
    """

    def __init__(self, config: Config) -> None:
        self._config = config
        self.topic = kafka_io.dead_letter_topic(config)
        self._limit = kafka_io.PRODUCER_MAX_REQUEST_SIZE  # the topic's, read by start()
        self._producer: AIOKafkaProducer | None = None
        # Set when the topic refused a letter: the next attempt reads its limit again and
        # renews the producer; bare while that batch's letters go bare (before_attempt).
        self._refused: kafka_io.DeadLetterRefused | None = None
        self._bare = False

    async def start(self) -> None:
        """Read the topic's limit (every letter is sized to it; a limit too small for any
        letter stops the agent here, before it ingests anything) and start the producer."""
        self._limit = await self._read_limit()
        self._producer = await kafka_io.start_dead_letter_producer(self._config, self._limit)

    async def stop(self, deadline: float) -> None:
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._producer.stop(), deadline)

    async def publish(self, letters: list[DeadLetter]) -> None:
        """Send a batch's dead letters and wait for every acknowledgement, within
        ``db_command_timeout_s`` (:func:`pipeline.kafka.publish_dead_letters`): each letter
        within the limit in force (none but its coordinates and class while this batch's
        letters go bare)."""
        assert self._producer is not None, "the agent is not running"
        limit = kafka_io.BARE if self._bare else self._limit
        timeout = self._config.db_command_timeout_s
        await kafka_io.publish_dead_letters(self._producer, self.topic, letters, timeout, limit)

    def refused(self, error: kafka_io.DeadLetterRefused) -> None:
        self._refused = error

    def delivered(self) -> None:
        self._bare = False

    async def before_attempt(self) -> None:
        """Before a batch's next attempt, once the topic refused one of its letters as too
        large: read the topic's limit again (a limit lowered below any letter stops the agent
        naming ``max.message.bytes``) and replace the producer (the refused batch left its
        sequence behind). A lowered limit sizes the letters from now on; an unchanged one
        means a broker enforces less than the cluster reports, so this batch's letters go
        bare. A bare letter refused too means the topic takes no letter at all: stop, naming
        the setting, rather than retry for ever. The record itself is never the reason to
        stop: on the next start its letter is sized to the limit read then."""
        refused, self._refused = self._refused, None
        if refused is None:
            return
        if self._bare:
            raise ConfigError(
                f"{refused}, even with its key, value, headers and reason omitted: set the "
                f"max.message.bytes of {self.topic} (and the brokers' message.max.bytes) "
                f"to at least {self._limit}, the limit it reported"
            ) from refused
        before = self._limit
        try:
            self._limit = await self._read_limit()
            old, self._producer = self._producer, None
            if old is not None:
                with contextlib.suppress(KafkaError):
                    await old.stop()
            self._producer = await kafka_io.start_dead_letter_producer(self._config, self._limit)
        except KafkaError as exc:  # the broker away: the next attempt tries again
            self._refused = refused
            raise TransientError(
                f"renewing the dead-letter producer: {exc!r}", source="kafka"
            ) from exc
        self._bare = self._limit >= before
        log.warning(
            "%s; the topic's limit is now %d bytes: %s (dead_letters keeps the records whole)",
            refused,
            self._limit,
            "this batch's dead letters go bare" if self._bare else "letters sized to it",
        )

    async def _read_limit(self) -> int:
        """The topic's limit (:func:`pipeline.kafka.dead_letter_limit`), read from Kafka: a
        :class:`ConfigError` naming ``max.message.bytes`` when no letter can fit it."""
        return kafka_io.dead_letter_limit(
            self.topic,
            await kafka_io.read_max_message_bytes(self._config.kafka, self.topic),
            kafka_io.PRODUCER_MAX_REQUEST_SIZE,
            kafka_io.data_topics(self._config),
        )
