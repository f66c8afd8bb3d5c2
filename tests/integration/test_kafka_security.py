"""Kafka over TLS and SASL/SCRAM-SHA-512 with ACLs, against the local stack's SASL_SSL
listener: DatabaseAgents ingest and obey the orchestrator as their own principals, the fleet
publishes through the SDK as its own, the ACLs keep each to its part, and a client the cluster
refuses (wrong password, wrong CA, no TLS) fails at once with what to fix.

Each test's topics and group get their ACLs (pipeline.devstack.kafka_auth.pipeline_acls) over
the plaintext listener, whose anonymous principal is the stack's super user.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest
from aiokafka.errors import TopicAuthorizationFailedError

from pipeline import kafka as kafka_io
from pipeline import kafka_clients
from pipeline.control import (
    control_topics,
    generate_key_pair,
    write_private_key_file,
    write_public_key_file,
)
from pipeline.devstack import tls
from pipeline.devstack.kafka_auth import (
    AGENT_USER,
    ORCHESTRATOR_USER,
    PRODUCER_USER,
    pipeline_acls,
    set_up,
)
from pipeline.devstack.stack import SecureKafka
from pipeline.kafka_clients import KafkaSettings
from pipeline.records import Metric
from pipeline.testbed import AgentProcess, agent_env, stop_agents
from producers import AgentPublisher
from producers.publisher import PublishError, PublishTimeoutError
from tests.conftest import Servers
from tests.integration.harness import count_rows, create_topics, migrated, stored_offsets, until

pytestmark = pytest.mark.timeout(600)

T0 = datetime(2026, 11, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def secure(servers: Servers) -> SecureKafka:
    """The stack's SASL_SSL listener; these tests need the local stack (not servers from the
    environment or containers, which have no such listener)."""
    found = servers.endpoints.kafka_secure
    if found is None:
        pytest.fail(
            "no SASL_SSL listener: these tests need the local stack (`pipeline dev`), started "
            "by the test session; unset KAFKA_BOOTSTRAP_SERVERS and DATABASE_URL"
        )
    return found


async def secured_topics(servers: Servers, prefix: str, group: str) -> None:
    """The data, dead-letter, control and status topics under ``prefix``, and their ACLs."""
    plaintext = servers.endpoints.kafka
    await create_topics(servers.endpoints.kafka_bootstrap, prefix, partitions=3)
    await kafka_io.ensure_topics(plaintext, control_topics(prefix), 1)
    await set_up(plaintext, {}, pipeline_acls(prefix, group))


def secure_env(
    secure: SecureKafka, user: str, database_url: str, prefix: str, group: str, **settings: object
) -> dict[str, str]:
    """A child process's environment on the SASL_SSL listener as ``user``."""
    env = agent_env(secure.bootstrap, database_url, prefix, group, **settings)
    env.update(secure.settings(user).environment())
    return env


@pytest.fixture
def control_keys(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    private, public = generate_key_pair()
    write_private_key_file(tmp_path / "antigravity.key", private)
    write_public_key_file(tmp_path / "antigravity.pub", public)
    yield tmp_path / "antigravity.key", tmp_path / "antigravity.pub"


async def test_agents_ingest_and_obey_the_orchestrator_over_sasl_ssl(
    *,
    servers: Servers,
    secure: SecureKafka,
    database_url: str,
    unique: str,
    control_keys: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    prefix, group = f"{unique}.", unique
    await secured_topics(servers, prefix, group)
    private_key, public_key = control_keys

    # The fleet publishes through the SDK as its own principal.
    count = 2_000
    async with AgentPublisher(secure.settings(PRODUCER_USER), topic_prefix=prefix) as sdk:
        for i in range(count):
            await sdk.send_nowait(
                Metric(f"agent-{i % 50}", "cpu", float(i), T0 + timedelta(milliseconds=i), {})
            )
        await sdk.flush()

    env = secure_env(
        secure, AGENT_USER, database_url, prefix, group, control_public_keys=public_key
    )
    await migrated(database_url)
    agent = AgentProcess(env, tmp_path / "agent.log").start()
    try:

        async def ingested() -> bool:
            return await count_rows(database_url, "performance_metrics") >= count

        await until(ingested, within=120, what=f"{count} metrics ingested over SASL_SSL")
        assert await count_rows(database_url, "performance_metrics") == count
        stored = await stored_offsets(database_url, group, prefix)
        assert sum(o for (topic, _), o in stored.items() if topic == "agents.metrics") == count

        # The agents' principal may not write the control topic: the broker says so.
        control, _ = control_topics(prefix)
        producer = kafka_clients.producer(secure.settings(AGENT_USER), acks="all")
        await producer.start()
        try:
            with pytest.raises(TopicAuthorizationFailedError):
                await producer.send_and_wait(control, b"forged")
        finally:
            await producer.stop()

        # The orchestrator's may; the agent applies what it sends, and acknowledges it.
        orchestrator = secure_env(secure, ORCHESTRATOR_USER, database_url, prefix, group)
        orchestrator["PIPELINE_CONTROL_PRIVATE_KEY_FILE"] = str(private_key)
        command = ["control", "deactivate", "--streams", "events", "--group", group]
        sent = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "pipeline.cli", *command, "--wait", "60"],
            env=orchestrator,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        lines = sent.stdout.splitlines()
        assert [line.split(": ", 1)[1] for line in lines[1:-1]] == ["applied"], sent.stdout
        assert lines[-1] == "the group's decision (PostgreSQL control_log): applied", sent.stdout
    finally:
        await stop_agents([agent])
    assert agent.proc is not None and agent.proc.returncode == 0, (
        agent.log_path.read_text() if agent.log_path else ""
    )


@pytest.mark.parametrize(
    ("case", "said"),
    [
        pytest.param(
            "wrong password",
            "Kafka authentication failed for user 'pipeline-agent' (SCRAM-SHA-512)",
            id="wrong-password",
        ),
        pytest.param(
            "wrong CA",
            "PIPELINE_KAFKA_SSL_CAFILE: the certificate of the Kafka broker at 127.0.0.1:",
            id="wrong-ca",
        ),
        pytest.param(
            "plaintext",
            "PIPELINE_KAFKA_SECURITY_PROTOCOL=PLAINTEXT, but the Kafka broker at 127.0.0.1:",
            id="plaintext-to-tls",
        ),
    ],
)
def test_a_refused_client_fails_at_start_with_what_to_fix(
    *,
    secure: SecureKafka,
    servers: Servers,
    unique: str,
    tmp_path: Path,
    case: str,
    said: str,
) -> None:
    settings = secure.settings(AGENT_USER)
    wrong_password = "not-the-password-" + unique
    if case == "wrong password":
        (tmp_path / "password").write_text(wrong_password + "\n")
        settings = msgspec.structs.replace(settings, sasl_password_file=str(tmp_path / "password"))
    elif case == "wrong CA":
        other = tls.ensure_ca(tmp_path / "other-ca", name="another CA")
        settings = msgspec.structs.replace(settings, ssl_cafile=str(other.cert))
    else:
        settings = KafkaSettings(bootstrap_servers=secure.bootstrap)
    env = agent_env(secure.bootstrap, servers.endpoints.database_url, f"{unique}.", unique)
    env.update(settings.environment())
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    took = time.monotonic() - started
    assert run.returncode == 2, run.stderr
    (line,) = run.stderr.splitlines()  # one line: no traceback, no retry noise
    assert line.startswith("pipeline: error: ") and said in line, line
    if case == "wrong CA":
        assert "(certificate verification failed)" in line
    assert wrong_password not in line
    assert secure.settings(AGENT_USER).password() not in run.stderr + run.stdout
    # Bounded: the refusal is told from an absent broker, not retried (start-up included).
    assert took < 60, f"took {took:.0f}s"


async def test_the_sdk_says_the_broker_refused_its_password(
    secure: SecureKafka, unique: str, tmp_path: Path
) -> None:
    # aiokafka reports a refused login as a broker that never answers; the SDK says which.
    wrong_password = "not-the-password-" + unique
    (tmp_path / "password").write_text(wrong_password + "\n")
    settings = msgspec.structs.replace(
        secure.settings(PRODUCER_USER), sasl_password_file=str(tmp_path / "password")
    )
    publisher = AgentPublisher(settings, topic_prefix=f"{unique}.", send_timeout=3.0)
    started = time.monotonic()
    with pytest.raises(PublishError) as caught:
        await publisher.start()
    assert time.monotonic() - started < 30
    assert not isinstance(caught.value, PublishTimeoutError)
    assert not caught.value.retriable
    message = str(caught.value)
    assert "Kafka authentication failed for user 'pipeline-producer'" in message, message
    assert wrong_password not in message
