"""Who may do what on the local stack's Kafka: its SCRAM users, their passwords, their ACLs.

Three principals, each with only what its processes do (docs/security-kafka.md has the same
list as ``kafka-acls`` commands for a real cluster):

* ``User:pipeline-agent``, the DatabaseAgents: read the five data topics and the control
  topic, join (read) their consumer group, write the dead-letter and status topics, read the
  dead-letter topic's configs (its ``max.message.bytes``); writing the control topic is denied
  outright.
* ``User:pipeline-producer``, the fleet's publishers (the SDK, the simulator): write the five
  data topics.
* ``User:antigravity``, Antigravity (``pipeline control``, ``pipeline topics create``): write
  and read the control topic, read the status topic and set its retention, create the
  pipeline's topics.

The broker takes them over its plaintext listener, whose anonymous principal is the stack's
super user: SCRAM credentials through AlterUserScramCredentials and ACLs through CreateAcls,
the Kafka protocol's own admin requests. aiokafka's admin client has neither method, so the two
requests are declared here on aiokafka's protocol types and sent by a client from
:mod:`pipeline.kafka_clients`. This keeps the passwords off every command line (the broker's
``kafka-storage format --add-scram`` takes them as arguments) and costs one round trip per
request instead of a JVM per ``kafka-acls`` call; it also works on a stack home formatted
before the users existed.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, TypeAlias

from aiokafka.errors import for_code
from aiokafka.protocol.admin import CreateAclsRequest_v1, DescribeAclsRequest
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import (
    CompactArray,
    CompactBytes,
    CompactString,
    Int8,
    Int16,
    Int32,
    Schema,
    TaggedFields,
)

from pipeline import catalog as streams_catalog
from pipeline import kafka_clients
from pipeline.catalog import Catalog
from pipeline.control import control_topics
from pipeline.devstack import kafka_users, safe_dirs
from pipeline.errors import DevStackError
from pipeline.kafka_clients import KafkaSettings, SaslMechanism
from pipeline.records import DLQ_TOPIC, topic_name

# The users are named in kafka_users, which loads without aiokafka; their ACLs are here.
AGENT_USER = kafka_users.AGENT_USER
PRODUCER_USER = kafka_users.PRODUCER_USER
ORCHESTRATOR_USER = kafka_users.ORCHESTRATOR_USER
USERS = kafka_users.USERS
DEFAULT_GROUP = "database-agent"
MECHANISM: SaslMechanism = "SCRAM-SHA-512"
SCRAM_ITERATIONS = 8192  # Kafka's minimum is 4096
ACL_PROPAGATION_S = 30.0


class Resource(IntEnum):  # Kafka's ResourceType
    TOPIC = 2
    GROUP = 3


class Operation(IntEnum):  # Kafka's AclOperation
    READ = 3
    WRITE = 4
    CREATE = 5
    DESCRIBE = 8
    DESCRIBE_CONFIGS = 10
    ALTER_CONFIGS = 11


class Permission(IntEnum):  # Kafka's AclPermissionType
    DENY = 2
    ALLOW = 3


LITERAL = 3  # Kafka's PatternType: the resource name exactly


@dataclass(frozen=True)
class Acl:
    """One ACL binding: ``principal`` may (or may not) do ``operation`` on a resource."""

    principal: str  # "User:<name>"
    resource: Resource
    name: str
    operation: Operation
    permission: Permission = Permission.ALLOW

    def line(self) -> str:
        verb = "allow" if self.permission is Permission.ALLOW else "deny"
        return f"{verb} {self.principal} {self.operation.name} on {self.resource.name} {self.name}"


def environment_catalog() -> Catalog:
    """The catalog of ``PIPELINE_STREAMS_FILE`` when the environment names one, else the
    built-in streams: the dev stack grants the topics of the streams its user declared."""
    return streams_catalog.load(os.environ.get(streams_catalog.STREAMS_FILE_ENV) or None)


def pipeline_acls(
    topic_prefix: str = "", group: str = DEFAULT_GROUP, catalog: Catalog | None = None
) -> list[Acl]:
    """The ACLs the pipeline's three principals need for the topics of ``catalog``'s streams
    (default: the built-in ones) under ``topic_prefix`` and the DatabaseAgents' consumer
    group ``group``."""
    data = list((catalog or streams_catalog.load()).topics(topic_prefix))
    control, status = control_topics(topic_prefix)
    dlq = topic_name(DLQ_TOPIC, topic_prefix)
    agent, producer, antigravity = (f"User:{u}" for u in USERS)
    topic, read, write = Resource.TOPIC, Operation.READ, Operation.WRITE
    return [
        *(Acl(agent, topic, t, read) for t in [*data, control]),
        Acl(agent, topic, dlq, write),
        Acl(agent, topic, dlq, Operation.DESCRIBE_CONFIGS),  # its max.message.bytes
        Acl(agent, topic, status, write),
        Acl(agent, Resource.GROUP, group, read),
        Acl(agent, topic, control, write, Permission.DENY),
        *(Acl(producer, topic, t, write) for t in data),
        Acl(antigravity, topic, control, write),
        Acl(antigravity, topic, control, read),
        Acl(antigravity, topic, status, read),
        # `pipeline topics create` brings an existing status topic to its retention.
        *(
            Acl(antigravity, topic, status, op)
            for op in (Operation.DESCRIBE_CONFIGS, Operation.ALTER_CONFIGS)
        ),
        *(
            Acl(antigravity, topic, t, op)
            for t in [*data, dlq, control, status]
            for op in (Operation.CREATE, Operation.DESCRIBE)
        ),
    ]


def ensure_password_file(directory: Path, user: str) -> Path:
    """``directory/kafka-<user>.password``: a random password, readable by its owner only;
    made on first use, kept afterwards."""
    path = password_file(directory, user)
    if path.exists():
        return path
    safe_dirs.ensure_dir(directory, 0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    return path


def password_file(directory: Path, user: str) -> Path:
    return directory / f"kafka-{user}.password"


async def set_up(admin: KafkaSettings, passwords: dict[str, Path], acls: Iterable[Acl]) -> None:
    """Give each user of ``passwords`` its SCRAM-SHA-512 credential (the password in its file)
    and create ``acls``, as the super user ``admin`` connects. Both are idempotent."""
    client = kafka_clients.bootstrap_client(admin, request_timeout_ms=30_000)
    try:
        await client.bootstrap()
        node = client.get_random_node()
        upsertions = [_scram_upsertion(user, _read(path)) for user, path in passwords.items()]
        if upsertions:
            response = await client.send(node, _AlterUserScram(upsertions))
            _raise_errors(
                "setting the SCRAM credential of",
                [(r[0], r[1], r[2]) for r in response.results],
            )
        wanted = list(acls)
        if wanted:
            created = await client.send(node, _CreateAcls(wanted))
            _raise_errors(
                "creating the ACL",
                [
                    (a.line(), r[0], r[1])
                    for a, r in zip(wanted, created.creation_responses, strict=True)
                ],
            )
            await _until_in_force(client, node, wanted)
    finally:
        await client.close()


async def _until_in_force(client: Any, node: int, wanted: list[Acl]) -> None:
    """Wait until the broker's authorizer holds every ACL of ``wanted``: CreateAcls returns
    once the controller has them, and the broker applies them a moment later."""
    missing: set[tuple[int, str, str, int, int]] = set()
    deadline = time.monotonic() + ACL_PROPAGATION_S
    while time.monotonic() < deadline:
        described = await client.send(node, DescribeAclsRequest(1, None, 1, None, None, 1, 1))
        held = {
            (resource[0], resource[1], acl[0], acl[2], acl[3])
            for resource in described.resources
            for acl in resource[3]
        }
        missing = {
            (int(a.resource), a.name, a.principal, int(a.operation), int(a.permission))
            for a in wanted
        } - held
        if not missing:
            return
        await asyncio.sleep(0.05)
    raise DevStackError(
        f"the broker did not apply {len(missing)} new ACL(s) within {ACL_PROPAGATION_S:g}s"
    )


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8").rstrip("\r\n")


def _scram_upsertion(user: str, password: str) -> tuple[Any, ...]:
    """SCRAM's salted password (RFC 5802's Hi(): PBKDF2 with HMAC-SHA-512) for a new salt:
    what the broker stores; the password itself never leaves this process."""
    salt = secrets.token_bytes(32)
    salted = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, SCRAM_ITERATIONS)
    return (user, 2, SCRAM_ITERATIONS, salt, salted, {})  # 2: SCRAM-SHA-512


def _raise_errors(doing: str, results: Sequence[tuple[str, int, str | None]]) -> None:
    failed = [
        f"{what}: {for_code(code).__name__}" + (f" ({message})" if message else "")
        for what, code, message in results
        if code
    ]
    if failed:
        raise DevStackError(f"Kafka refused {doing}: " + "; ".join(failed))


# -- the two admin requests aiokafka declares no method for -------------------------------


class _AlterUserScramResponse_v0(Response):  # type: ignore[misc]
    API_KEY = 51
    API_VERSION = 0
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "results",
            CompactArray(
                ("user", CompactString("utf-8")),
                ("error_code", Int16),
                ("error_message", CompactString("utf-8")),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


class _AlterUserScramRequest_v0(RequestStruct):  # type: ignore[misc]
    FLEXIBLE_VERSION = True
    API_KEY = 51
    API_VERSION = 0
    RESPONSE_TYPE = _AlterUserScramResponse_v0
    SCHEMA = Schema(
        (
            "deletions",
            CompactArray(
                ("name", CompactString("utf-8")), ("mechanism", Int8), ("tags", TaggedFields)
            ),
        ),
        (
            "upsertions",
            CompactArray(
                ("name", CompactString("utf-8")),
                ("mechanism", Int8),
                ("iterations", Int32),
                ("salt", CompactBytes),
                ("salted_password", CompactBytes),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


class _AlterUserScram(Request[_AlterUserScramRequest_v0]):  # type: ignore[misc]
    API_KEY = 51

    def __init__(self, upsertions: list[tuple[Any, ...]]) -> None:
        self._upsertions = upsertions

    def build(self, request_struct_class: type[_AlterUserScramRequest_v0]) -> Any:
        return request_struct_class([], self._upsertions, {})


_CreateAclsStruct: TypeAlias = CreateAclsRequest_v1


class _CreateAcls(Request[_CreateAclsStruct]):  # type: ignore[misc]
    """Several ACLs in one request (aiokafka's own CreateAclsRequest sends one)."""

    API_KEY = 30

    def __init__(self, acls: list[Acl]) -> None:
        self._acls = acls

    def build(self, request_struct_class: type[_CreateAclsStruct]) -> Any:
        return request_struct_class(
            [
                (a.resource, a.name, LITERAL, a.principal, "*", a.operation, a.permission)
                for a in self._acls
            ]
        )
