"""The agent SDK's publisher: records of any catalog stream in, acknowledged Kafka records out.

:meth:`AgentPublisher.publish` sends a value to any stream of its catalog (docs/streams.md),
checked against the stream's declaration before anything is sent; the five typed methods
(:meth:`~AgentPublisher.state` and the others) send the built-in streams' typed records.
:class:`AgentPublisher` wraps one :class:`aiokafka.AIOKafkaProducer` with settings that do not
lose or duplicate data (idempotence, ``acks="all"``) and batch well (lz4, a short linger,
256 KiB batches). Every call that waits on the broker is bounded by ``send_timeout``: the
idempotent producer retries forever while its broker is down, and its own ``stop()`` waits for
every queued batch (aio-libs/aiokafka#1101), so without a bound an agent would hang with it.

A :class:`PublishTimeoutError` means "not acknowledged in time", not "not written": the record
may still arrive. Events carry an ``event_id`` and states and configs a ``version``, so sending
again after a timeout is harmless downstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

import msgspec
from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError
from aiokafka.structs import RecordMetadata

from pipeline import kafka_clients
from pipeline.catalog import Catalog, StreamSpec, load
from pipeline.errors import ConfigError, PipelineError
from pipeline.kafka_clients import KafkaSettings, kafka_settings
from pipeline.records import (
    CONTENT_TYPE_HEADER,
    JSON,
    MSGPACK,
    AgentEvent,
    AnalyticsEvent,
    ConfigChange,
    JsonObject,
    Metric,
    Record,
    StateChange,
    encode,
    record_key,
    stream_of,
    topic_name,
)
from pipeline.rows import decoder

__all__ = [
    "PRODUCER_DEFAULTS",
    "AgentPublisher",
    "PublishError",
    "PublishTimeoutError",
    "RecordMetadata",
    "RecordRefused",
]

#: The producer settings the SDK starts from; ``producer_overrides`` are applied on top.
PRODUCER_DEFAULTS: dict[str, Any] = {
    # Retries after a lost ack must not write a record twice, and an ack must mean that
    # every in-sync replica has it.
    "enable_idempotence": True,
    "acks": "all",
    # Agents' records are small and repetitive JSON: lz4 is cheap on CPU and shrinks them well.
    "compression_type": "lz4",
    # A few ms of linger turns a burst of sends into one request per partition.
    "linger_ms": 5,
    "max_batch_size": 256 * 1024,
    # aiokafka's default is 40 s per request (and up to twice that in total); our own
    # send_timeout is the caller's bound, this one only keeps requests from piling up.
    "request_timeout_ms": 30_000,
    "retry_backoff_ms": 100,
}

_CONTENT_TYPES = (JSON, MSGPACK)
_json_encoder = msgspec.json.Encoder()
_msgpack_encoder = msgspec.msgpack.Encoder()
# Between failed bootstrap attempts in start(): short, since a broker that is starting up
# answers within a second or two.
_BOOTSTRAP_BACKOFF = (0.1, 1.0)


class PublishError(PipelineError):
    """A record could not be handed to Kafka or was rejected by it; the message says where."""

    retriable = True


class PublishTimeoutError(PublishError):
    """Kafka did not answer within the bound; the record's outcome is unknown.

    ``topic`` is the topic the record was for, or None for operations on the whole producer
    (start, flush, stop, waiting for many records).
    """

    # Defaults keep it copyable: aiokafka copies the exception it fails futures with.
    def __init__(self, message: str, *, topic: str | None = None, timeout: float = 0.0) -> None:
        super().__init__(message)
        self.topic = topic
        self.timeout = timeout


class RecordRefused(PublishError, ValueError):
    """A value the stream's declaration refuses, or a stream the catalog lacks: nothing was
    sent. ``stream`` names the stream; the message names the column and what was wrong."""

    retriable = False

    def __init__(self, message: str, *, stream: str) -> None:
        super().__init__(message)
        self.stream = stream


@dataclass(frozen=True)
class _Outgoing:
    """A record about to be sent, as the stream's decoder reads a consumed one."""

    topic: str
    value: bytes | None
    key: bytes | None
    headers: Sequence[tuple[str, bytes]]
    timestamp: int
    partition: int = 0
    offset: int = 0

    @property
    def serialized_value_size(self) -> int:
        return -1 if self.value is None else len(self.value)


_NO_VALUE: Any = object()  # publish(record): a typed record, no value given


def _refusal(stream: str, reason: str) -> str:
    """A decoder's reason as the refusal's message, naming the stream once."""
    return reason if reason.startswith(f"stream {stream!r}") else f"stream {stream!r}: {reason}"


def _now() -> datetime:
    return datetime.now(UTC)


class AgentPublisher:
    """Publishes the five wire records to their (prefixed) topics, each bounded in time.

    Use it as ``async with AgentPublisher(bootstrap) as publisher:`` or call :meth:`start` and
    :meth:`stop`. Every record is encoded with :func:`pipeline.records.encode` in
    ``content_type``, carries a ``content-type`` header, and is keyed by its stream's key field
    so one entity's records stay ordered in one partition.

    Args:
        bootstrap: how to reach Kafka: :class:`pipeline.kafka_clients.KafkaSettings` (TLS
            and SASL included: ``security_protocol``, ``ssl_cafile``, ``sasl_username``,
            ``sasl_password_file``), or just the bootstrap servers,
            ``host:port[,host:port...]``, which connect as the environment's
            ``PIPELINE_KAFKA_*`` variables say (plaintext when none is set).
        topic_prefix: prepended to every default topic name (``PIPELINE_TOPIC_PREFIX``).
        catalog: the streams :meth:`publish` may send to: a
            :class:`pipeline.catalog.Catalog`, or the path of a streams file (as
            ``PIPELINE_STREAMS_FILE`` names one); by default the built-in streams.
        content_type: :data:`pipeline.records.JSON` or :data:`pipeline.records.MSGPACK`.
        send_timeout: seconds any one call may wait on the broker (start, send, flush, stop).
        **producer_overrides: passed to :class:`aiokafka.AIOKafkaProducer` over
            :data:`PRODUCER_DEFAULTS` (a ``client_id`` here wins over the settings' one).

    Raises:
        ConfigError: ``content_type`` or ``send_timeout`` is invalid, or the Kafka security
            settings are (a SASL protocol without a user, a CA file that is not a
            certificate, ...).
        CatalogError: the streams file cannot be read or is not a valid catalog.
    """

    def __init__(
        self,
        bootstrap: KafkaSettings | str,
        topic_prefix: str = "",
        content_type: str = JSON,
        send_timeout: float = 10.0,
        *,
        catalog: Catalog | str | os.PathLike[str] | None = None,
        **producer_overrides: Any,
    ) -> None:
        if content_type not in _CONTENT_TYPES:
            raise ConfigError(
                f"content_type: expected one of {', '.join(_CONTENT_TYPES)}, got {content_type!r}"
            )
        if not send_timeout > 0:
            raise ConfigError(
                f"send_timeout: must be a positive number of seconds, got {send_timeout!r}"
            )
        settings = kafka_settings(bootstrap)
        if "client_id" in producer_overrides:  # the SDK took it as a producer setting
            client_id = producer_overrides.pop("client_id")
            settings = msgspec.structs.replace(settings, client_id=client_id or "")
        self.kafka = settings
        self.bootstrap = settings.bootstrap_servers
        self.topic_prefix = topic_prefix
        self.content_type = content_type
        self.send_timeout = float(send_timeout)
        self._settings = {**PRODUCER_DEFAULTS, **producer_overrides}
        self.catalog = catalog if isinstance(catalog, Catalog) else load(catalog)
        self._topics = {s.name: topic_name(s.topic, topic_prefix) for s in self.catalog}
        # One shared, never mutated header list: building it per record would cost an
        # allocation and an encode on the hot path.
        self._headers = [(CONTENT_TYPE_HEADER, content_type.encode())]
        self._producer: Any = None

    def topic(self, stream: str) -> str:
        """The deployed topic name of a stream of the catalog."""
        return self._topics[self._spec(stream).name]

    @property
    def started(self) -> bool:
        """True between a successful :meth:`start` and :meth:`stop`."""
        return self._producer is not None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to the cluster, retrying until ``send_timeout`` has passed.

        Retrying covers an agent that starts alongside its broker: a refused connection in the
        first seconds is normal there.

        Raises:
            PublishTimeoutError: no broker answered within ``send_timeout``.
            PublishError: the cluster refused the producer (e.g. authorization), or its
                settings: a wrong password, a certificate that does not verify, TLS against a
                plaintext listener (not retriable).
        """
        if self._producer is not None:
            return
        deadline = time.monotonic() + self.send_timeout
        backoff, max_backoff = _BOOTSTRAP_BACKOFF
        while True:
            producer = kafka_clients.producer(self.kafka, **self._settings)
            remaining = deadline - time.monotonic()
            try:
                async with asyncio.timeout(max(remaining, 0.001)):
                    await producer.start()
            except (KafkaConnectionError, TimeoutError) as exc:
                await _abandon(producer, exc, timeout=1.0)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    await self._refused_settings(exc)
                    raise PublishTimeoutError(
                        f"no Kafka broker answered at {self.bootstrap} within "
                        f"{self.send_timeout:g}s",
                        topic=None,
                        timeout=self.send_timeout,
                    ) from exc
                await asyncio.sleep(min(backoff, remaining))
                backoff = min(backoff * 2, max_backoff)
                continue
            except KafkaError as exc:
                await _abandon(producer, exc, timeout=1.0)
                raise PublishError(
                    f"Kafka at {self.bootstrap} refused the producer: {exc!r}"
                ) from exc
            self._producer = producer
            return

    async def _refused_settings(self, timed_out: BaseException) -> None:
        """Raise PublishError if the broker answers but refuses these settings (password,
        certificate, TLS or not): aiokafka reports those only as a broker that never answers."""
        try:
            await kafka_clients.check_connection(self.kafka, within=5.0)
        except ConfigError as refused:
            error = PublishError(f"Kafka at {self.bootstrap} refused the producer: {refused}")
            error.retriable = False  # the same settings will be refused again
            raise error from timed_out

    # The bound lives inside (not in a caller's asyncio.timeout) so every call has one.
    async def flush(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait until every record sent so far is acknowledged or failed.

        Args:
            timeout: seconds to wait; ``send_timeout`` when None.

        Raises:
            PublishTimeoutError: records were still unacknowledged at the deadline.
        """
        producer = self._running()
        bound = self.send_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(bound):
                await producer.flush()
        except TimeoutError as exc:
            raise PublishTimeoutError(
                f"records to {self.bootstrap} not acknowledged within {bound:g}s (flush)",
                topic=None,
                timeout=bound,
            ) from exc

    # Hitting the bound needs clean-up (_abandon) that a caller's asyncio.timeout cannot do.
    async def stop(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Flush what is queued, then close; never waits longer than the bound.

        When the broker does not acknowledge in time, the queued records are failed (their
        futures raise :class:`PublishTimeoutError`) and the connections are closed anyway.

        Args:
            timeout: seconds to wait; ``send_timeout`` when None.

        Raises:
            PublishTimeoutError: records were still unacknowledged at the deadline; the
                publisher is closed all the same.
        """
        producer, self._producer = self._producer, None
        if producer is None:
            return
        bound = self.send_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(bound):
                await producer.stop()  # flushes every queued batch, then closes
        except TimeoutError as exc:
            error = PublishTimeoutError(
                f"records to {self.bootstrap} not acknowledged within {bound:g}s (stop); "
                "the publisher was closed with them unconfirmed",
                topic=None,
                timeout=bound,
            )
            await _abandon(producer, error, timeout=1.0)
            raise error from exc

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.stop()
        except PublishError:
            # The exception already on its way out says more about what went wrong; ours is
            # still reachable as its __context__.
            if exc is None:
                raise

    # -- sending -----------------------------------------------------------------------------

    async def send(self, record: Record) -> RecordMetadata:
        """Publish one record and wait for its acknowledgement.

        Returns:
            The broker's :class:`aiokafka.structs.RecordMetadata` (topic, partition, offset).

        Raises:
            PublishTimeoutError: not acknowledged within ``send_timeout`` (outcome unknown).
            PublishError: Kafka rejected the record.
            TypeError: ``record`` is not one of the five wire records.
        """
        self._running()
        return await self._send(*self._prepare(record))

    async def publish(
        self, stream: str | Record, value: Any = _NO_VALUE, *, key: str | bytes | None = None
    ) -> RecordMetadata:
        """Publish ``value`` to the catalog stream named ``stream`` and wait for its
        acknowledgement. ``value`` is a dict (or a :class:`msgspec.Struct`) encoded in
        ``content_type``; None is a tombstone, for a stream with ``tombstones = "delete"``.
        ``key`` is the Kafka key (text is sent as UTF-8): it orders one entity's records in
        one partition and fills the columns with ``source = "key"``.

        The encoded record is checked with the stream's decoder, as the DatabaseAgent will
        read it, before anything is sent. ``publish(record)`` with a typed record is
        :meth:`send`.

        Raises:
            RecordRefused: ``stream`` is not in the catalog, or the value does not match its
                declaration (the message names the column and what was wrong); nothing sent.
            PublishTimeoutError: not acknowledged within ``send_timeout`` (outcome unknown).
            PublishError: Kafka rejected the record.
        """
        if not isinstance(stream, str):
            if value is not _NO_VALUE or key is not None:
                raise TypeError("publish(record) takes a typed record alone; its key is its own")
            return await self.send(stream)
        if value is _NO_VALUE:
            raise TypeError(f"publish({stream!r}, value): the value is missing")
        self._running()
        return await self._send(*self.check(stream, value, key=key))

    def check(
        self, stream: str, value: Any, *, key: str | bytes | None = None
    ) -> tuple[str, bytes | None, bytes | None]:
        """The deployed topic, key and encoded value :meth:`publish` would send, once the
        stream's decoder accepts them; :class:`RecordRefused` (naming the stream and the
        column) when it does not. Sends nothing."""
        spec = self._spec(stream)
        raw_key = key.encode() if isinstance(key, str) else key
        if value is None:
            payload = None
        else:
            try:
                payload = (
                    _json_encoder.encode(value)
                    if self.content_type == JSON
                    else _msgpack_encoder.encode(value)
                )
            except (TypeError, ValueError, OverflowError) as exc:
                raise RecordRefused(
                    f"stream {stream!r}: the value cannot be encoded as {self.content_type}: {exc}",
                    stream=stream,
                ) from None
        topic = self._topics[spec.name]
        outgoing = _Outgoing(topic, payload, raw_key, self._headers, int(time.time() * 1000))
        _, rejected = decoder(spec).rows([outgoing], 0, 0)
        if rejected:
            raise RecordRefused(_refusal(stream, rejected[0].reason), stream=stream)
        return topic, raw_key, payload

    def _spec(self, stream: str) -> StreamSpec:
        try:
            return self.catalog[stream]
        except KeyError:
            raise RecordRefused(
                f"unknown stream {stream!r}: the publisher's catalog has "
                f"{', '.join(self.catalog.names) or 'no stream'}",
                stream=stream,
            ) from None

    async def _send(self, topic: str, key: bytes | None, value: bytes | None) -> RecordMetadata:
        producer = self._running()
        try:
            async with asyncio.timeout(self.send_timeout):
                future = await producer.send(topic, value, key=key, headers=self._headers)
                # If the deadline hits here the future is cancelled: that only stops us
                # waiting, aiokafka still delivers the queued record.
                return await future
        except (TimeoutError, KafkaTimeoutError) as exc:
            raise self._timeout_error(topic) from exc
        except KafkaError as exc:
            raise PublishError(f"Kafka rejected a record for {topic}: {exc!r}") from exc

    async def send_nowait(self, record: Record) -> asyncio.Future[RecordMetadata]:
        """Queue one record for sending and return the future of its acknowledgement.

        Returns as soon as the record is in the producer's batch, so many records share one
        round trip. Wait for the futures in bulk with :meth:`delivered` (or :meth:`flush`).
        Queueing only waits when the producer's buffer is full, bounded by ``send_timeout``.

        Raises:
            PublishTimeoutError: the record could not even be queued in time.
            PublishError: Kafka rejected the record before queueing (e.g. too large).
            TypeError: ``record`` is not one of the five wire records.
        """
        producer = self._running()
        topic, key, value = self._prepare(record)
        try:
            async with asyncio.timeout(self.send_timeout):
                future: asyncio.Future[RecordMetadata] = await producer.send(
                    topic, value, key=key, headers=self._headers
                )
        except (TimeoutError, KafkaTimeoutError) as exc:
            raise self._timeout_error(topic) from exc
        except KafkaError as exc:
            raise PublishError(f"Kafka rejected a record for {topic}: {exc!r}") from exc
        return future

    async def send_many(self, records: Iterable[Record]) -> list[asyncio.Future[RecordMetadata]]:
        """Queue many records under one ``send_timeout`` and return their futures, in order.

        The fast path for bulk sending: one deadline for the whole call instead of one per
        record (a timer per record costs about a third of the queueing time).

        Raises:
            PublishTimeoutError: the records could not all be queued in time; those before the
                one that timed out are queued and may still be delivered.
            PublishError: Kafka rejected a record before queueing (e.g. too large).
            TypeError: a record is not one of the five wire records.
        """
        producer = self._running()
        futures: list[asyncio.Future[RecordMetadata]] = []
        topic = "?"
        try:
            async with asyncio.timeout(self.send_timeout):
                for record in records:
                    topic, key, value = self._prepare(record)
                    futures.append(
                        await producer.send(topic, value, key=key, headers=self._headers)
                    )
        except (TimeoutError, KafkaTimeoutError) as exc:
            raise self._timeout_error(topic, queued=len(futures)) from exc
        except KafkaError as exc:
            raise PublishError(
                f"Kafka rejected a record for {topic} after {len(futures)} were queued: {exc!r}"
            ) from exc
        return futures

    async def delivered(
        self, futures: Iterable[asyncio.Future[RecordMetadata]]
    ) -> list[RecordMetadata]:
        """Wait for futures from :meth:`send_nowait`, all within one ``send_timeout``.

        Returns:
            Their record metadata, in the order given.

        Raises:
            PublishTimeoutError: some were not acknowledged in time (their outcome is unknown).
            PublishError: Kafka failed at least one of them.
        """
        pending = list(futures)
        if not pending:
            return []
        try:
            async with asyncio.timeout(self.send_timeout):
                return list(await asyncio.gather(*pending))
        except TimeoutError as exc:
            waiting = sum(not f.done() or f.cancelled() for f in pending)
            raise PublishTimeoutError(
                f"{waiting} of {len(pending)} records to {self.bootstrap} not acknowledged "
                f"within {self.send_timeout:g}s",
                topic=None,
                timeout=self.send_timeout,
            ) from exc
        except KafkaError as exc:
            raise PublishError(f"Kafka failed a record: {exc!r}") from exc

    # -- typed helpers, one per stream -------------------------------------------------------

    async def state(
        self,
        *,
        agent_id: str,
        state: str,
        version: int,
        ts: datetime | None = None,
        data: JsonObject | None = None,
    ) -> StateChange:
        """Publish a :class:`StateChange` (acknowledged) and return it; ``ts`` defaults to now."""
        record = StateChange(
            agent_id=agent_id,
            state=state,
            version=version,
            ts=_now() if ts is None else ts,
            data={} if data is None else data,
        )
        await self.send(record)
        return record

    async def event(
        self,
        *,
        agent_id: str,
        kind: str,
        severity: str = "info",
        payload: JsonObject | None = None,
        ts: datetime | None = None,
        event_id: uuid.UUID | None = None,
    ) -> AgentEvent:
        """Publish an :class:`AgentEvent` (acknowledged) and return it with its ``event_id``."""
        record = AgentEvent(
            event_id=uuid.uuid4() if event_id is None else event_id,
            agent_id=agent_id,
            kind=kind,
            ts=_now() if ts is None else ts,
            severity=severity,
            payload={} if payload is None else payload,
        )
        await self.send(record)
        return record

    async def metric(
        self,
        *,
        agent_id: str,
        name: str,
        value: float,
        labels: JsonObject | None = None,
        ts: datetime | None = None,
    ) -> Metric:
        """Publish a :class:`Metric` sample (acknowledged) and return it."""
        record = Metric(
            agent_id=agent_id,
            name=name,
            value=value,
            ts=_now() if ts is None else ts,
            labels={} if labels is None else labels,
        )
        await self.send(record)
        return record

    async def analytics(
        self,
        *,
        user_id: str,
        action: str,
        properties: JsonObject | None = None,
        ts: datetime | None = None,
        event_id: uuid.UUID | None = None,
    ) -> AnalyticsEvent:
        """Publish an :class:`AnalyticsEvent` (acknowledged) and return it with its ``event_id``."""
        record = AnalyticsEvent(
            event_id=uuid.uuid4() if event_id is None else event_id,
            user_id=user_id,
            action=action,
            ts=_now() if ts is None else ts,
            properties={} if properties is None else properties,
        )
        await self.send(record)
        return record

    async def config(
        self,
        *,
        key: str,
        value: Any,
        version: int,
        updated_by: str = "",
        ts: datetime | None = None,
    ) -> ConfigChange:
        """Publish a :class:`ConfigChange` (acknowledged) and return it."""
        record = ConfigChange(
            key=key,
            value=value,
            version=version,
            ts=_now() if ts is None else ts,
            updated_by=updated_by,
        )
        await self.send(record)
        return record

    # -- internals ---------------------------------------------------------------------------

    def _running(self) -> Any:
        if self._producer is None:
            raise PublishError("the publisher is not started: use `async with` or await start()")
        return self._producer

    def _prepare(self, record: Record) -> tuple[str, bytes, bytes]:
        return (
            self._topics[self._spec(stream_of(record)).name],
            record_key(record),
            encode(record, self.content_type),
        )

    def _timeout_error(self, topic: str, queued: int | None = None) -> PublishTimeoutError:
        before = "" if queued is None else f" ({queued} records before it were queued)"
        return PublishTimeoutError(
            f"a record for {topic} was not acknowledged within {self.send_timeout:g}s{before} "
            f"(is {self.bootstrap} reachable, and does the topic exist? topics are not "
            "created automatically)",
            topic=topic,
            timeout=self.send_timeout,
        )


async def _abandon(producer: Any, error: BaseException, *, timeout: float) -> None:  # noqa: ASYNC109
    """Tear down a producer whose ``stop()`` could not finish, without waiting on the broker.

    aiokafka's ``stop()`` waits until every queued batch is acknowledged and has no bound of
    its own (aio-libs/aiokafka#1101), so a producer cut off from its broker is dismantled by
    hand. The order matters: the sender and its in-flight requests go first, because a request
    that fails after its batch was failed re-queues a batch the accumulator no longer holds
    (a KeyError inside aiokafka). These are private attributes of aiokafka 0.13-0.14, hence
    the guards; tests/integration/test_publisher.py covers them against a stopped broker.
    """
    producer._closed = True  # keeps __del__ quiet: this producer is finished
    sender = getattr(producer, "_sender", None)
    # 1. The sender task and its produce requests. When cancelled, the sender awaits those
    #    requests (up to request_timeout_ms each); cancelling them too ends it at once.
    doomed = [task for task in asyncio.all_tasks() if _is_sender_task(task, sender)]
    for task in doomed:
        task.cancel()
    if doomed:
        await asyncio.wait(doomed, timeout=timeout)
    # 2. Fail what is still queued or in flight: every future waiting on it gets ``error``.
    accumulator = getattr(producer, "_message_accumulator", None)
    if accumulator is not None:
        batches = [
            *itertools.chain.from_iterable(getattr(accumulator, "_batches", {}).values()),
            *getattr(accumulator, "_pending_batches", ()),
        ]
        accumulator.fail_all(error)
        for batch in batches:
            # Only a sender that takes the batch awaits this; mark its error as seen so
            # asyncio does not report it as forgotten.
            _retrieve(getattr(batch, "_drain_waiter", None))
    # 3. The connections.
    with contextlib.suppress(Exception):
        async with asyncio.timeout(timeout):
            await producer.client.close()


def _is_sender_task(task: asyncio.Task[Any], sender: Any) -> bool:
    if sender is None:
        return False
    if task is getattr(sender, "sender_task", None):
        return True
    coro = task.get_coro()
    frame = getattr(coro, "cr_frame", None)
    return (
        getattr(coro, "__qualname__", "") == "Sender._send_produce_req"
        and frame is not None
        and frame.f_locals.get("self") is sender
    )


def _retrieve(future: Any) -> None:
    if isinstance(future, asyncio.Future) and future.done() and not future.cancelled():
        future.exception()
