"""The status topic's retention, as the broker reports it after `pipeline topics create`: on a
fresh prefix, on a status topic made before with a week's retention, and over SASL_SSL as
`User:antigravity` with only its ACLs (docs/control-plane.md, "The status topic keeps 6
hours")."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import pytest
from aiokafka.admin import NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from pipeline import kafka_clients
from pipeline.control import STATUS_TOPIC_CONFIG, control_topics
from pipeline.devstack import Endpoints, Stack, endpoints_from_env
from pipeline.devstack.kafka_auth import ORCHESTRATOR_USER, pipeline_acls, set_up
from pipeline.devstack.stack import SecureKafka
from pipeline.kafka_settings import KafkaSettings
from pipeline.records import DLQ_TOPIC, topic_name
from tests.builtin_streams import STREAMS
from tests.conftest import Servers

WEEK_MS = str(7 * 24 * 3_600_000)
KEPT = {"max.message.bytes": "2000000"}  # a setting of the operator's: left as it is


def all_topics(prefix: str) -> list[str]:
    data = [topic_name(s.topic, prefix) for s in STREAMS]
    return [*data, topic_name(DLQ_TOPIC, prefix), *control_topics(prefix)]


def topics_create(
    endpoints: Endpoints, prefix: str, kafka: KafkaSettings | None = None
) -> list[str]:
    """`pipeline topics create`'s lines, run as the operator runs it (connecting as ``kafka``
    says, by default as the endpoints do)."""
    env = {
        **os.environ,
        **(kafka or endpoints.kafka).environment(),
        "DATABASE_URL": endpoints.database_url,
        "PIPELINE_TOPIC_PREFIX": prefix,
    }
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "topics", "create", "--partitions", "1"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


async def make_weeklong_status_topic(endpoints: Endpoints, status: str) -> dict[str, str]:
    """The status topic as Kafka's defaults would have made it, compacted, with a setting of
    the operator's; its configs."""
    before = {"cleanup.policy": "compact", "retention.ms": WEEK_MS, "segment.ms": WEEK_MS, **KEPT}
    admin = kafka_clients.admin(endpoints.kafka)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(status, 1, 1, topic_configs=before)])
    finally:
        await admin.close()
    assert await described(endpoints, status, [*STATUS_TOPIC_CONFIG, *KEPT]) == before
    return before


def brought(prefix: str) -> list[str]:
    """`pipeline topics create`'s lines when only the status topic existed, with ``before``."""
    status = control_topics(prefix)[1]
    return [
        *(f"{t}: created" for t in all_topics(prefix)[:-1]),
        f"{status}: exists",
        f"{status}: cleanup.policy set to delete (was compact)",
        f"{status}: retention.ms set to 21600000 (was {WEEK_MS})",
        f"{status}: segment.ms set to 3600000 (was {WEEK_MS})",
    ]


def secure_listener(servers: Servers) -> SecureKafka:
    """The local stack's SASL_SSL listener: the test session's stack, or the default one when
    the environment names it (`eval "$(pipeline dev env)"`)."""
    found = servers.endpoints.kafka_secure
    given = endpoints_from_env()
    if found is None and given is not None and Stack().serves(given):
        recorded = Stack().recorded_endpoints()
        found = None if recorded is None else recorded.kafka_secure
    if found is None:
        pytest.fail("no SASL_SSL listener: this test needs the local stack (`pipeline dev`)")
    return found


async def described(endpoints: Endpoints, topic: str, names: list[str]) -> dict[str, str]:
    """The values the broker applies to ``topic``; a topic just made may take a moment to be
    described."""
    admin = kafka_clients.admin(endpoints.kafka)
    await admin.start()
    try:
        deadline = time.monotonic() + 30
        while True:
            (response,) = await admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, topic, dict.fromkeys(names))]
            )
            ((error_code, _, _, _, entries),) = response.resources
            if error_code == 0:
                return {entry[0]: entry[1] for entry in entries}
            assert time.monotonic() < deadline, f"{topic} not described: error {error_code}"
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


@pytest.fixture
async def prefix(endpoints: Endpoints, unique: str) -> AsyncIterator[str]:
    """A prefix of this test's own; its topics are deleted afterwards."""
    yield f"{unique}."
    admin = kafka_clients.admin(endpoints.kafka)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        await admin.delete_topics([t for t in all_topics(f"{unique}.") if t in existing])
    finally:
        await admin.close()


async def test_a_new_status_topic_keeps_hours_not_a_week(endpoints: Endpoints, prefix: str) -> None:
    status = control_topics(prefix)[1]
    assert topics_create(endpoints, prefix) == [f"{t}: created" for t in all_topics(prefix)]
    assert await described(endpoints, status, list(STATUS_TOPIC_CONFIG)) == {
        "cleanup.policy": "delete",
        "retention.ms": "21600000",  # 6 hours
        "segment.ms": "3600000",  # segments roll hourly, so the old ones go on time
    }
    # Run again: everything exists, nothing to change.
    assert topics_create(endpoints, prefix) == [f"{t}: exists" for t in all_topics(prefix)]
    assert await described(endpoints, status, list(STATUS_TOPIC_CONFIG)) == STATUS_TOPIC_CONFIG


async def test_an_existing_status_topic_is_brought_to_the_retention_and_says_so(
    endpoints: Endpoints, prefix: str
) -> None:
    status = control_topics(prefix)[1]
    await make_weeklong_status_topic(endpoints, status)
    assert topics_create(endpoints, prefix) == brought(prefix)
    names = [*STATUS_TOPIC_CONFIG, *KEPT]
    assert await described(endpoints, status, names) == {**STATUS_TOPIC_CONFIG, **KEPT}
    # Brought once: the next run changes nothing.
    assert topics_create(endpoints, prefix) == [f"{t}: exists" for t in all_topics(prefix)]


async def test_antigravity_brings_it_over_sasl_ssl_with_its_acls_alone(
    servers: Servers, endpoints: Endpoints, prefix: str, unique: str
) -> None:
    secure = secure_listener(servers)
    status = control_topics(prefix)[1]
    await make_weeklong_status_topic(endpoints, status)
    await set_up(endpoints.kafka, {}, pipeline_acls(prefix, unique))  # as the super user
    antigravity = secure.settings(ORCHESTRATOR_USER)
    assert topics_create(endpoints, prefix, antigravity) == brought(prefix)
    names = [*STATUS_TOPIC_CONFIG, *KEPT]
    assert await described(endpoints, status, names) == {**STATUS_TOPIC_CONFIG, **KEPT}
