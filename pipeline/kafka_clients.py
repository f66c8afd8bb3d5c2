"""Every Kafka client of the project, and the one place that says how to reach the cluster.

:class:`KafkaSettings` holds how a client connects (bootstrap servers, client id); every
consumer, producer and admin client in the library, the SDK, the benchmark and the tests is
built by :func:`consumer`, :func:`producer`, :func:`admin` or :func:`bootstrap_client` from
one. Each caller passes its own behaviour (acks, idempotence, timeouts, isolation level) as
keyword arguments; the factory adds nothing but the connection. So when the cluster needs
TLS or SASL (``security_protocol``, ``sasl_mechanism``, a CA file, a user and a password file),
they become fields here and keywords in :meth:`KafkaSettings.connection`, and every client
gets them; a caller cannot set them on its own (see :data:`CONNECTION_KEYWORDS`).
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.client import AIOKafkaClient

__all__ = [
    "CONNECTION_KEYWORDS",
    "KafkaSettings",
    "admin",
    "bootstrap_client",
    "consumer",
    "kafka_settings",
    "producer",
]

#: aiokafka's keywords that say how to reach and authenticate to the cluster: they come from
#: :class:`KafkaSettings` only, never from a caller's overrides.
CONNECTION_KEYWORDS = frozenset(
    {
        "bootstrap_servers",
        "client_id",
        "security_protocol",
        "ssl_context",
        "sasl_mechanism",
        "sasl_plain_username",
        "sasl_plain_password",
        "sasl_kerberos_service_name",
        "sasl_kerberos_domain_name",
        "sasl_oauth_token_provider",
    }
)


class KafkaSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How to reach the Kafka cluster: what every client of the project is built from.

    Attributes:
        bootstrap_servers: ``host:port[,host:port...]``.
        client_id: the name brokers log and quote for this client; empty means aiokafka's
            default. The DatabaseAgent uses its instance id (``PIPELINE_INSTANCE_ID``).
    """

    bootstrap_servers: Annotated[str, msgspec.Meta(min_length=1)]
    client_id: str = ""

    def connection(self) -> dict[str, Any]:
        """The aiokafka keyword arguments that connect a client as these settings say."""
        found: dict[str, Any] = {"bootstrap_servers": self.bootstrap_servers}
        if self.client_id:
            found["client_id"] = self.client_id
        return found


def kafka_settings(kafka: KafkaSettings | str) -> KafkaSettings:
    """``kafka`` itself, or settings with just those bootstrap servers (``host:port,...``)."""
    return kafka if isinstance(kafka, KafkaSettings) else KafkaSettings(bootstrap_servers=kafka)


def consumer(settings: KafkaSettings, *topics: str, **overrides: Any) -> AIOKafkaConsumer:
    """An :class:`aiokafka.AIOKafkaConsumer` (not started), subscribed to ``topics`` if any."""
    return AIOKafkaConsumer(*topics, **_arguments(settings, overrides))


def producer(settings: KafkaSettings, **overrides: Any) -> AIOKafkaProducer:
    """An :class:`aiokafka.AIOKafkaProducer` (not started)."""
    return AIOKafkaProducer(**_arguments(settings, overrides))


def admin(settings: KafkaSettings, **overrides: Any) -> AIOKafkaAdminClient:
    """An :class:`aiokafka.admin.AIOKafkaAdminClient` (not started)."""
    return AIOKafkaAdminClient(**_arguments(settings, overrides))


def bootstrap_client(settings: KafkaSettings, **overrides: Any) -> AIOKafkaClient:
    """A bare :class:`aiokafka.client.AIOKafkaClient`, for cluster metadata (not bootstrapped)."""
    return AIOKafkaClient(**_arguments(settings, overrides))


def _arguments(settings: KafkaSettings, overrides: dict[str, Any]) -> dict[str, Any]:
    clash = sorted(CONNECTION_KEYWORDS & overrides.keys())
    if clash:
        raise TypeError(
            f"{', '.join(clash)}: how to reach Kafka comes from KafkaSettings, not from a "
            "client's own settings"
        )
    return {**settings.connection(), **overrides}
