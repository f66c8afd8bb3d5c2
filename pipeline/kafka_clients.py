"""Every Kafka client of the project: :func:`consumer`, :func:`producer`, :func:`admin` and
:func:`bootstrap_client`, each built from a :class:`~pipeline.kafka_settings.KafkaSettings`.

Each caller passes its own behaviour (acks, idempotence, timeouts, isolation level) as keyword
arguments; the factory adds nothing but the connection (:meth:`KafkaSettings.connection`), and
a caller cannot set that on its own (:data:`CONNECTION_KEYWORDS`). :func:`check_connection`
tells a cluster that refuses the settings from one that does not answer yet: aiokafka reports
both as "Unable to bootstrap". docs/security-kafka.md describes the settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.client import AIOKafkaClient
from aiokafka.conn import create_conn
from aiokafka.errors import (
    AuthenticationFailedError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)

from pipeline import aiokafka_compat
from pipeline.errors import ConfigError

# The settings live in a module without a Kafka client; they are re-exported here, where every
# client is built from them.
from pipeline.kafka_settings import (
    BOOTSTRAP_ENV,
    SECURITY_ENV,
    KafkaSettings,
    SaslMechanism,
    SecurityProtocol,
    kafka_settings,
    settings_from_env,
)

__all__ = [
    "BOOTSTRAP_ENV",
    "CONNECTION_KEYWORDS",
    "SECURITY_ENV",
    "KafkaSettings",
    "SaslMechanism",
    "SecurityProtocol",
    "admin",
    "bootstrap_client",
    "check_connection",
    "consumer",
    "kafka_settings",
    "producer",
    "settings_from_env",
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


async def check_connection(settings: KafkaSettings, within: float = 10.0) -> None:
    """Connect once to the first bootstrap server, and raise ConfigError if it refuses these
    settings: authentication failed, its certificate does not verify, TLS against a plaintext
    listener or plaintext against a TLS one. Return when it accepts them, and also when it
    does not answer (refused, silent): that is not a setting's fault, and clients retry it.
    """
    host, port = _first_server(settings.bootstrap_servers)
    where = f"the Kafka broker at {host}:{port}"
    protocol = f"{SECURITY_ENV['security_protocol']}={settings.security_protocol}"
    connection = settings.connection()
    try:
        async with asyncio.timeout(within):
            conn = await create_conn(
                host,
                port,
                client_id=connection.get("client_id", "aiokafka"),
                request_timeout_ms=int(within * 1000),
                ssl_context=connection.get("ssl_context"),
                security_protocol=settings.security_protocol,
                sasl_mechanism=connection.get("sasl_mechanism"),
                sasl_plain_username=connection.get("sasl_plain_username"),
                sasl_plain_password=connection.get("sasl_plain_password"),
            )
        # Closing completes later (a TLS goodbye first): wait for it, or the socket outlives
        # the event loop of a caller that returns now.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(conn.close(), within)
    except ssl.SSLCertVerificationError as exc:
        trusted = settings.ssl_cafile or "the system's trusted CAs"
        raise ConfigError(
            f"{SECURITY_ENV['ssl_cafile']}: the certificate of {where} does not verify against "
            f"{trusted}: {exc.verify_message} (certificate verification failed)"
        ) from None
    except ssl.SSLError as exc:
        raise ConfigError(
            f"{protocol}, but the TLS handshake with {where} failed ({exc.reason}): is it a "
            "plaintext listener? (PLAINTEXT or SASL_PLAINTEXT there)"
        ) from None
    except (SaslAuthenticationFailed, AuthenticationFailedError) as exc:
        raise ConfigError(
            f"Kafka authentication failed for user {settings.sasl_username!r} "
            f"({settings.sasl_mechanism}) at {host}:{port}: check "
            f"{SECURITY_ENV['sasl_username']} and the password "
            f"({SECURITY_ENV['sasl_password_file']}); the broker said: {_said(exc)}"
        ) from None
    except UnsupportedSaslMechanismError as exc:
        raise ConfigError(
            f"{SECURITY_ENV['sasl_mechanism']}={settings.sasl_mechanism}: {where} does not "
            f"offer it: {_said(exc)}"
        ) from None
    except (KafkaError, OSError, TimeoutError) as exc:
        tls = await _speaks_tls(host, port, within)
        if tls and not settings.uses_tls:
            raise ConfigError(
                f"{protocol}, but {where} expects TLS (it is an SSL or SASL_SSL listener): "
                f"set {SECURITY_ENV['security_protocol']} to SSL or SASL_SSL, with "
                f"{SECURITY_ENV['ssl_cafile']}"
            ) from None
        if tls is False and settings.uses_tls:
            raise ConfigError(
                f"{protocol}, but {where} does not speak TLS (it is a PLAINTEXT or "
                "SASL_PLAINTEXT listener): check the port, or the protocol"
            ) from None
        if isinstance(exc, KafkaError) and not exc.retriable:
            raise ConfigError(f"{where} refused the connection: {_said(exc)}") from None


def _first_server(bootstrap_servers: str) -> tuple[str, int]:
    first = bootstrap_servers.split(",", maxsplit=1)[0].strip()
    host, _, port = first.rpartition(":")
    try:
        return host.strip("[]") or first, int(port)
    except ValueError:
        raise ConfigError(f"{BOOTSTRAP_ENV}: expected host:port, got {first!r}") from None


async def _speaks_tls(host: str, port: int, within: float) -> bool | None:
    """Whether ``host:port`` completes a TLS handshake (verifying nothing: this only asks what
    the port speaks); None when it does not even accept a connection."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        async with asyncio.timeout(within):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return None
    try:
        async with asyncio.timeout(within):
            await writer.start_tls(context)
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), within)
    return True


def _said(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def consumer(settings: KafkaSettings, *topics: str, **overrides: Any) -> AIOKafkaConsumer:
    """An :class:`aiokafka.AIOKafkaConsumer` (not started), subscribed to ``topics`` if any.
    A record whose header name is not UTF-8 reaches it like any other (see
    :mod:`pipeline.aiokafka_compat`)."""
    aiokafka_compat.install()
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
