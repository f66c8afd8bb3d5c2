"""A simulated agent fleet: realistic records for demos, load tests and test oracles.

Generation is pure and seedable: :class:`FleetSimulator` holds a ``random.Random(seed)`` and
the fleet's state, and :meth:`FleetSimulator.next_records` takes ``now`` instead of reading a
clock, so the same seed and the same ``now`` give the same records. :func:`simulate` is the
thin IO shell that paces those records onto Kafka.

What the fleet does:

* every agent walks a state machine (offline, starting, idle, busy, error, recovering), each
  move a :class:`StateChange` with the agent's next version (strictly increasing per agent);
* agents emit events (tasks starting, finishing, failing, retries, crashes) whose severity
  follows their kind;
* agents report metrics (cpu, memory, latency, queue depth, throughput) around a per-agent
  baseline, labelled with host, region and pool;
* users (a fixed pool) act in the product: analytics events;
* a small set of configuration keys changes now and then, each key's version increasing.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from pipeline.errors import ConfigError
from pipeline.kafka_clients import KafkaSettings
from pipeline.records import (
    JSON,
    RECORD_STREAMS,
    AgentEvent,
    AnalyticsEvent,
    ConfigChange,
    Metric,
    Record,
    StateChange,
    record_key,
    stream_of,
)
from producers.publisher import AgentPublisher, RecordMetadata

__all__ = [
    "MIXES",
    "FleetSimulator",
    "Mix",
    "SentRecord",
    "SimulationResult",
    "record_id",
    "resolve_mix",
    "simulate",
]


@dataclass(frozen=True)
class Mix:
    """Relative weights of the five streams; they need not sum to 1 (they are normalised).

    Raises:
        ConfigError: a weight is negative or not finite, or all are zero.
    """

    states: float = 0.10
    events: float = 0.20
    metrics: float = 0.45
    analytics: float = 0.20
    config: float = 0.05

    def __post_init__(self) -> None:
        for f in fields(self):
            weight = getattr(self, f.name)
            if not (isinstance(weight, int | float) and math.isfinite(weight) and weight >= 0):
                raise ConfigError(f"mix.{f.name}: must be a finite weight >= 0, got {weight!r}")
        if sum(self.weights()) <= 0:
            raise ConfigError("mix: at least one stream needs a weight above 0")

    def weights(self) -> tuple[float, ...]:
        """The weights in the order of the typed records' streams
        (:data:`pipeline.records.RECORD_STREAMS`, the built-in streams' catalog order)."""
        return tuple(float(getattr(self, name)) for name in RECORD_STREAMS.values())

    def share(self, stream: str) -> float:
        """The fraction of records that belong to ``stream`` (a stream name)."""
        return float(getattr(self, stream)) / sum(self.weights())


#: Named mixes, for the CLI and for load tests.
MIXES: dict[str, Mix] = {
    "default": Mix(),
    # Mostly telemetry: what a fleet under load sends.
    "metrics-heavy": Mix(states=0.04, events=0.08, metrics=0.80, analytics=0.06, config=0.02),
    # Events and analytics (uuid keys, jsonb payloads) are the expensive rows to ingest.
    "events-heavy": Mix(states=0.06, events=0.45, metrics=0.22, analytics=0.25, config=0.02),
}


def resolve_mix(mix: Mix | str) -> Mix:
    """A :class:`Mix` given itself or the name of one in :data:`MIXES`.

    Raises:
        ConfigError: an unknown name.
    """
    if isinstance(mix, Mix):
        return mix
    try:
        return MIXES[mix]
    except KeyError:
        raise ConfigError(f"mix: expected one of {', '.join(MIXES)}, got {mix!r}") from None


# Each state's successors with their weights; self-loops are allowed (a busy agent picking up
# its next task) and still produce a new version.
_TRANSITIONS: dict[str, tuple[tuple[str, ...], tuple[float, ...]]] = {
    "offline": (("starting",), (1.0,)),
    "starting": (("idle", "error"), (0.92, 0.08)),
    "idle": (("busy", "offline", "error"), (0.85, 0.08, 0.07)),
    "busy": (("idle", "busy", "error"), (0.78, 0.14, 0.08)),
    "error": (("recovering", "offline"), (0.8, 0.2)),
    "recovering": (("idle", "error"), (0.85, 0.15)),
}
# Agents are up when the simulation starts; version 0 is that unannounced first state.
_INITIAL_STATE = "idle"

# (kind, severity, weight)
_EVENT_KINDS: tuple[tuple[str, str, float], ...] = (
    ("task_started", "info", 30),
    ("task_completed", "info", 28),
    ("heartbeat", "debug", 18),
    ("task_failed", "error", 6),
    ("retry", "warning", 9),
    ("resource_warning", "warning", 5),
    ("crash", "critical", 1.5),
    ("config_reloaded", "info", 2.5),
)

_METRIC_NAMES = ("cpu_percent", "memory_mb", "latency_ms", "queue_depth", "throughput_rps")

# (action, weight)
_ACTIONS: tuple[tuple[str, float], ...] = (
    ("page_view", 40),
    ("click", 25),
    ("search", 14),
    ("add_to_cart", 8),
    ("logout", 6),
    ("purchase", 4),
    ("signup", 3),
)
_PATHS = ("/", "/agents", "/agents/{id}", "/dashboards", "/settings", "/billing", "/search")
_QUERIES = ("latency spike", "agent offline", "error rate", "queue depth", "deploy", "config")

_REGIONS = ("eu-west-1", "us-east-1", "us-west-2", "ap-south-1")
_POOLS = ("default", "gpu", "batch")
_LOG_LEVELS = ("debug", "info", "warning", "error")


def _config_value(key: str, rng: random.Random) -> Any:
    if key == "ingest.batch_size":
        return rng.choice((500, 1000, 2000, 5000, 10000))
    if key == "ingest.linger_ms":
        return rng.choice((0, 5, 10, 25, 50))
    if key == "agent.max_concurrency":
        return rng.randint(1, 32)
    if key == "agent.log_level":
        return rng.choice(_LOG_LEVELS)
    if key == "feature.smart_routing":
        return rng.random() < 0.5
    return {"days": rng.choice((7, 14, 30, 90)), "tables": ["performance_metrics"]}


_CONFIG_KEYS = (
    "ingest.batch_size",
    "ingest.linger_ms",
    "agent.max_concurrency",
    "agent.log_level",
    "feature.smart_routing",
    "retention.policy",
)


@dataclass
class _Agent:
    agent_id: str
    labels: dict[str, Any]
    cpu: float
    memory_mb: float
    latency_mu: float
    queue: float
    state: str = _INITIAL_STATE
    version: int = 0


class FleetSimulator:
    """``agents`` simulated agents and a pool of ``users``, generating records purely.

    Args:
        agents: fleet size (the reference deployment has 143).
        seed: seeds the generator; None draws a random seed (kept in :attr:`seed`).
        mix: a :class:`Mix` or a name in :data:`MIXES`.
        users: size of the user pool the analytics events draw from.

    Raises:
        ConfigError: ``agents`` or ``users`` below 1, or a bad ``mix``.
    """

    def __init__(
        self,
        agents: int = 143,
        seed: int | None = 0,
        mix: Mix | str = "default",
        users: int = 1000,
    ) -> None:
        if agents < 1:
            raise ConfigError(f"agents: must be at least 1, got {agents}")
        if users < 1:
            raise ConfigError(f"users: must be at least 1, got {users}")
        self.mix = resolve_mix(mix)
        self.seed = random.SystemRandom().getrandbits(63) if seed is None else seed
        rng = self._rng = random.Random(self.seed)
        width = max(4, len(str(agents - 1)))
        self._agents = tuple(
            _Agent(
                agent_id=f"agent-{i:0{width}d}",
                labels={
                    "host": f"host-{i // 4:03d}",
                    "region": rng.choice(_REGIONS),
                    "pool": rng.choice(_POOLS),
                },
                cpu=rng.uniform(10, 60),
                memory_mb=rng.uniform(256, 4096),
                latency_mu=rng.uniform(2.5, 5.0),  # e^2.5..e^5: ~12..150 ms medians
                queue=rng.uniform(0, 20),
            )
            for i in range(agents)
        )
        #: The fleet's agent ids, in order, and the user pool.
        self.agent_ids = tuple(a.agent_id for a in self._agents)
        self.user_ids = tuple(f"user-{i:05d}" for i in range(users))
        self._config_versions = dict.fromkeys(_CONFIG_KEYS, 0)
        makers: dict[str, Callable[[datetime], Record]] = {
            "states": self._state,
            "events": self._event,
            "metrics": self._metric,
            "analytics": self._analytics,
            "config": self._config,
        }
        self._makers = tuple(makers[name] for name in RECORD_STREAMS.values())
        self._cum_weights = tuple(itertools.accumulate(self.mix.weights()))
        self._event_kinds = tuple(k for k, _, _ in _EVENT_KINDS)
        self._event_cum = tuple(itertools.accumulate(w for _, _, w in _EVENT_KINDS))
        self._severity = {k: s for k, s, _ in _EVENT_KINDS}
        self._actions = tuple(a for a, _ in _ACTIONS)
        self._action_cum = tuple(itertools.accumulate(w for _, w in _ACTIONS))

    def next_records(self, n: int, now: datetime) -> list[Record]:
        """The fleet's next ``n`` records, stamped ``now``; streams drawn by the mix.

        Args:
            n: how many records.
            now: their timestamp; must be timezone-aware.
        """
        if now.tzinfo is None:
            raise ValueError("now: must be timezone-aware (the wire format requires an offset)")
        chosen = self._rng.choices(self._makers, cum_weights=self._cum_weights, k=n)
        return [make(now) for make in chosen]

    # -- one maker per stream ----------------------------------------------------------------

    def _uuid(self) -> uuid.UUID:
        return uuid.UUID(int=self._rng.getrandbits(128), version=4)

    def _state(self, now: datetime) -> StateChange:
        agent = self._rng.choice(self._agents)
        successors, weights = _TRANSITIONS[agent.state]
        previous = agent.state
        agent.state = self._rng.choices(successors, weights)[0]
        agent.version += 1
        data: dict[str, Any] = {"previous": previous}
        if agent.state == "busy":
            data["task_id"] = f"task-{self._rng.getrandbits(32):08x}"
        elif agent.state == "error":
            data["reason"] = self._rng.choice(("timeout", "oom", "dependency_down", "bad_input"))
        return StateChange(
            agent_id=agent.agent_id, state=agent.state, version=agent.version, ts=now, data=data
        )

    def _event(self, now: datetime) -> AgentEvent:
        rng = self._rng
        agent = rng.choice(self._agents)
        kind = rng.choices(self._event_kinds, cum_weights=self._event_cum)[0]
        payload: dict[str, Any] = {"state": agent.state}
        if kind.startswith("task_") or kind == "retry":
            payload["task_id"] = f"task-{rng.getrandbits(32):08x}"
        if kind == "task_completed":
            payload["duration_ms"] = round(rng.lognormvariate(agent.latency_mu + 2, 0.8), 3)
        elif kind == "task_failed":
            payload["error"] = rng.choice(("TimeoutError", "ValueError", "ConnectionResetError"))
        elif kind == "retry":
            payload["attempt"] = rng.randint(1, 5)
        elif kind == "resource_warning":
            payload["resource"] = rng.choice(("memory", "disk", "file_descriptors"))
        return AgentEvent(
            event_id=self._uuid(),
            agent_id=agent.agent_id,
            kind=kind,
            ts=now,
            severity=self._severity[kind],
            payload=payload,
        )

    def _metric(self, now: datetime) -> Metric:
        rng = self._rng
        agent = rng.choice(self._agents)
        name = rng.choice(_METRIC_NAMES)
        busy = agent.state == "busy"
        if name == "cpu_percent":
            value = min(100.0, max(0.0, agent.cpu + (25 if busy else 0) + rng.gauss(0, 8)))
        elif name == "memory_mb":
            value = max(0.0, agent.memory_mb + rng.gauss(0, 64))
        elif name == "latency_ms":
            value = rng.lognormvariate(agent.latency_mu, 0.5)
        elif name == "queue_depth":
            value = float(max(0, round(agent.queue + (10 if busy else 0) + rng.gauss(0, 4))))
        else:
            value = max(0.0, rng.gauss(40 if busy else 5, 5))
        return Metric(
            agent_id=agent.agent_id, name=name, value=round(value, 3), ts=now, labels=agent.labels
        )

    def _analytics(self, now: datetime) -> AnalyticsEvent:
        rng = self._rng
        action = rng.choices(self._actions, cum_weights=self._action_cum)[0]
        properties: dict[str, Any] = {
            "session_id": f"s-{rng.getrandbits(40):010x}",
            "agent_id": rng.choice(self._agents).agent_id,
        }
        if action in ("page_view", "click"):
            properties["path"] = rng.choice(_PATHS)
        elif action == "search":
            properties["query"] = rng.choice(_QUERIES)
        elif action in ("add_to_cart", "purchase"):
            properties["amount_cents"] = rng.randint(100, 50_000)
            properties["currency"] = "EUR"
        return AnalyticsEvent(
            event_id=self._uuid(),
            user_id=rng.choice(self.user_ids),
            action=action,
            ts=now,
            properties=properties,
        )

    def _config(self, now: datetime) -> ConfigChange:
        rng = self._rng
        key = rng.choice(_CONFIG_KEYS)
        self._config_versions[key] += 1
        updated_by = "antigravity" if rng.random() < 0.7 else rng.choice(self._agents).agent_id
        return ConfigChange(
            key=key,
            value=_config_value(key, rng),
            version=self._config_versions[key],
            ts=now,
            updated_by=updated_by,
        )


def record_id(record: Record) -> str | None:
    """A record's natural identity: ``event_id``, or entity ``@`` version; None for metrics.

    Metrics have no natural key; their identity is their Kafka coordinates.
    """
    if isinstance(record, AgentEvent | AnalyticsEvent):
        return str(record.event_id)
    if isinstance(record, StateChange):
        return f"{record.agent_id}@{record.version}"
    if isinstance(record, ConfigChange):
        return f"{record.key}@{record.version}"
    return None


@dataclass(frozen=True)
class SentRecord:
    """Where one simulated record landed: the oracle for ingestion tests."""

    topic: str
    partition: int
    offset: int
    key: bytes
    record: Record

    @property
    def id(self) -> str | None:
        """The record's natural identity (see :func:`record_id`)."""
        return record_id(self.record)


@dataclass(frozen=True)
class SimulationResult:
    """What :func:`simulate` sent: acknowledged counts, timing, and optionally every record."""

    counts: dict[str, int]  # per stream name, every stream present
    total: int
    elapsed: float  # seconds, from the first send to the last acknowledgement
    rate: float  # achieved records per second
    target_rate: float
    seed: int
    sent: list[SentRecord] = field(default_factory=list)


async def simulate(
    bootstrap: KafkaSettings | str,
    *,
    agents: int = 143,
    rate: float = 1000.0,
    duration: float = 10.0,
    topic_prefix: str = "",
    mix: Mix | str = "default",
    seed: int | None = None,
    content_type: str = JSON,
    record_sent: bool = False,
    tick: float = 0.05,
    send_timeout: float = 10.0,
) -> SimulationResult:
    """Publish a simulated fleet's records at ``rate`` records/s for ``duration`` seconds.

    1. Build the fleet (:class:`FleetSimulator`) and start an :class:`AgentPublisher`.
    2. Every ``tick``, generate the records due by the end of the tick and queue them with
       ``send_many``: no round trip per record.
    3. Wait for the previous tick's acknowledgements in bulk, so at most about two ticks of
       records are in flight and memory stays bounded.
    4. When the time is up (or everything due is sent), wait for the last acknowledgements.

    Every record counted was acknowledged by the broker; a producer that cannot keep up sends
    fewer than ``rate * duration`` and reports the rate it achieved.

    Args:
        bootstrap: Kafka's connection settings, or its bootstrap servers.
        agents: fleet size.
        rate: target records per second.
        duration: seconds to run.
        topic_prefix: prepended to every topic name; the topics must exist.
        mix: a :class:`Mix` or a name in :data:`MIXES`.
        seed: for reproducible records; None picks one (reported in the result).
        content_type: JSON or MessagePack.
        record_sent: keep a :class:`SentRecord` per record in the result.
        tick: the pacing interval, in seconds.
        send_timeout: the publisher's bound on each broker call, in seconds.

    Raises:
        ConfigError: a bad argument, named.
        PublishError: Kafka failed records, or did not acknowledge them in time.
    """
    if not (math.isfinite(rate) and rate > 0):
        raise ConfigError(f"rate: must be a positive number of records/s, got {rate!r}")
    if not (math.isfinite(duration) and duration >= 0):
        raise ConfigError(f"duration: must be >= 0 seconds, got {duration!r}")
    if not tick > 0:
        raise ConfigError(f"tick: must be positive, got {tick!r}")
    fleet = FleetSimulator(agents=agents, seed=seed, mix=mix)
    target = round(rate * duration)
    # A producer that falls behind catches up by at most a few ticks' worth at a time, rather
    # than building one enormous burst.
    max_per_tick = max(1, math.ceil(rate * tick * 4))
    tally = _Tally(record_sent)
    loop = asyncio.get_running_loop()

    async with AgentPublisher(
        bootstrap, topic_prefix, content_type, send_timeout=send_timeout
    ) as publisher:
        previous: list[tuple[Record, asyncio.Future[RecordMetadata]]] = []
        queued = 0
        start = loop.time()
        for tick_no in itertools.count(1):
            due = min(target, math.floor(rate * (loop.time() - start + tick)))
            n = min(due - queued, max_per_tick)
            records = fleet.next_records(n, datetime.now(UTC)) if n > 0 else []
            current = list(zip(records, await publisher.send_many(records), strict=True))
            queued += len(current)
            await tally.wait_for(publisher, previous)
            previous = current
            if queued >= target or loop.time() - start >= duration:
                break
            await asyncio.sleep(max(0.0, start + tick_no * tick - loop.time()))
        await tally.wait_for(publisher, previous)
        elapsed = loop.time() - start

    total = sum(tally.counts.values())
    return SimulationResult(
        counts=tally.counts,
        total=total,
        elapsed=elapsed,
        rate=total / elapsed if elapsed > 0 else 0.0,
        target_rate=rate,
        seed=fleet.seed,
        sent=tally.sent,
    )


class _Tally:
    """Counts acknowledged records per stream and, when asked, keeps where each landed."""

    def __init__(self, record_sent: bool) -> None:
        self.record_sent = record_sent
        self.counts = dict.fromkeys(RECORD_STREAMS.values(), 0)
        self.sent: list[SentRecord] = []

    async def wait_for(
        self,
        publisher: AgentPublisher,
        queued: list[tuple[Record, asyncio.Future[RecordMetadata]]],
    ) -> None:
        metadata = await publisher.delivered(future for _, future in queued)
        for (record, _), meta in zip(queued, metadata, strict=True):
            self.counts[stream_of(record)] += 1
            if self.record_sent:
                self.sent.append(
                    SentRecord(meta.topic, meta.partition, meta.offset, record_key(record), record)
                )
