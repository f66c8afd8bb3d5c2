"""The simulated fleet: pure, seedable, realistic and true to the wire contract."""

from __future__ import annotations

import collections
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from pipeline.errors import ConfigError
from pipeline.records import (
    JSON,
    MSGPACK,
    AgentEvent,
    AnalyticsEvent,
    ConfigChange,
    Record,
    StateChange,
    encode,
)
from producers.simulator import MIXES, FleetSimulator, Mix, record_id, resolve_mix
from tests.builtin_streams import STREAM_BY_TYPE, STREAMS

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def _by_stream(records: list[Record]) -> collections.Counter[str]:
    return collections.Counter(STREAM_BY_TYPE[type(r)].name for r in records)


def test_same_seed_same_records() -> None:
    a, b = FleetSimulator(seed=7), FleetSimulator(seed=7)
    # Several calls, because the fleet's state (versions, state machine) carries over.
    for step in range(3):
        now = NOW + timedelta(seconds=step)
        assert a.next_records(2000, now) == b.next_records(2000, now)


def test_different_seeds_differ() -> None:
    assert FleetSimulator(seed=1).next_records(200, NOW) != FleetSimulator(seed=2).next_records(
        200, NOW
    )


def test_no_seed_draws_one_and_reports_it() -> None:
    first = FleetSimulator(seed=None)
    again = FleetSimulator(seed=first.seed)
    assert first.next_records(500, NOW) == again.next_records(500, NOW)


@pytest.mark.parametrize("name", sorted(MIXES))
def test_mix_proportions_hold_over_20k_records(name: str) -> None:
    mix = MIXES[name]
    counts = _by_stream(FleetSimulator(seed=3, mix=name).next_records(20_000, NOW))
    assert sum(counts.values()) == 20_000
    for stream in STREAMS:
        expected = mix.share(stream.name)
        # Binomial sd at 20k is at most 0.0036: 0.015 is over 4 sd, tight enough to catch a
        # wrong weight, loose enough never to flake.
        assert abs(counts[stream.name] / 20_000 - expected) < 0.015, (stream.name, counts)


def test_named_mixes_have_the_promised_shape() -> None:
    assert MIXES["metrics-heavy"].share("metrics") == pytest.approx(0.80)
    events_heavy = MIXES["events-heavy"]
    assert events_heavy.share("events") + events_heavy.share("analytics") == pytest.approx(0.70)


def test_default_mix_produces_all_five_streams() -> None:
    counts = _by_stream(FleetSimulator(seed=4).next_records(1000, NOW))
    assert set(counts) == {s.name for s in STREAMS}


def test_state_versions_increase_by_one_per_agent_and_follow_the_machine() -> None:
    fleet = FleetSimulator(
        agents=20, seed=5, mix=Mix(states=1, events=0, metrics=0, analytics=0, config=0)
    )
    last: dict[str, tuple[int, str]] = {a: (0, "idle") for a in fleet.agent_ids}
    for step in range(5):
        for record in fleet.next_records(400, NOW + timedelta(seconds=step)):
            assert isinstance(record, StateChange)
            version, state = last[record.agent_id]
            assert record.version == version + 1
            assert record.data["previous"] == state
            last[record.agent_id] = (record.version, record.state)
    assert sum(v for v, _ in last.values()) == 2000


def test_config_versions_increase_by_one_per_key() -> None:
    fleet = FleetSimulator(seed=6, mix=Mix(states=0, events=0, metrics=0, analytics=0, config=1))
    last: collections.Counter[str] = collections.Counter()
    for record in fleet.next_records(3000, NOW):
        assert isinstance(record, ConfigChange)
        assert record.version == last[record.key] + 1
        last[record.key] = record.version
    assert 2 <= len(last) <= 10  # a small key set, every key changing many times


@pytest.mark.parametrize("agents", [1, 5, 143, 2500])
def test_agent_count_is_respected(agents: int) -> None:
    fleet = FleetSimulator(agents=agents, seed=8, mix="metrics-heavy")
    assert len(fleet.agent_ids) == len(set(fleet.agent_ids)) == agents
    seen = {r.agent_id for r in fleet.next_records(agents * 40, NOW) if hasattr(r, "agent_id")}
    assert seen == set(fleet.agent_ids)


def test_ids_are_unique_uuids_and_users_come_from_the_pool() -> None:
    fleet = FleetSimulator(seed=9, mix="events-heavy")
    records = fleet.next_records(20_000, NOW)
    ids = [r.event_id for r in records if isinstance(r, AgentEvent | AnalyticsEvent)]
    assert len(ids) == len(set(ids)) > 10_000
    assert all(i.version == 4 for i in ids)
    users = {r.user_id for r in records if isinstance(r, AnalyticsEvent)}
    assert users <= set(fleet.user_ids)


@pytest.mark.parametrize("content_type", [JSON, MSGPACK])
def test_every_record_round_trips_through_the_wire_format(content_type: str) -> None:
    records = FleetSimulator(seed=10).next_records(5000, NOW)
    decode = msgspec.json.decode if content_type == JSON else msgspec.msgpack.decode
    for record in records:
        assert decode(encode(record, content_type), type=type(record)) == record
    assert all(r.ts == NOW for r in records)


def test_record_ids_are_the_natural_identities() -> None:
    records = FleetSimulator(seed=11).next_records(2000, NOW)
    for record in records:
        match record:
            case AgentEvent() | AnalyticsEvent():
                assert record_id(record) == str(record.event_id)
            case StateChange():
                assert record_id(record) == f"{record.agent_id}@{record.version}"
            case ConfigChange():
                assert record_id(record) == f"{record.key}@{record.version}"
            case _:
                assert record_id(record) is None


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: Mix(states=-1), "mix.states"),
        (lambda: Mix(metrics=float("nan")), "mix.metrics"),
        (lambda: Mix(states=0, events=0, metrics=0, analytics=0, config=0), "mix"),
        (lambda: resolve_mix("everything"), "mix"),
        (lambda: FleetSimulator(agents=0), "agents"),
        (lambda: FleetSimulator(users=0), "users"),
    ],
)
def test_bad_settings_name_the_field(make: Callable[[], object], field: str) -> None:
    with pytest.raises(ConfigError, match=f"^{field}:"):
        make()


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        FleetSimulator().next_records(1, datetime(2025, 1, 1))
