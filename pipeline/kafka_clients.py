"""Every Kafka client of the project, and the one place that says how to reach the cluster.

:class:`KafkaSettings` holds how a client connects: the bootstrap servers, the client id, and
the cluster's security (TLS, SASL). Every consumer, producer and admin client in the library,
the SDK, the benchmark and the tests is built by :func:`consumer`, :func:`producer`,
:func:`admin` or :func:`bootstrap_client` from one. Each caller passes its own behaviour (acks,
idempotence, timeouts, isolation level) as keyword arguments; the factory adds nothing but the
connection (:meth:`KafkaSettings.connection`), and a caller cannot set that on its own (see
:data:`CONNECTION_KEYWORDS`).

The security settings are named like Kafka's own client settings (``security.protocol``,
``sasl.mechanism``, the CA file, the user and its password file). In the environment each is
``PIPELINE_KAFKA_`` + its name in upper case (:data:`SECURITY_ENV`), read by
:func:`settings_from_env`. The password is read from its file when a client is built, never
shown by ``repr`` or in an error, and never put on a command line.

:func:`check_connection` tells a cluster that refuses these settings (authentication failed, a
certificate that does not verify, TLS against a plaintext listener or the reverse) from one
that does not answer yet: aiokafka reports all of them as "Unable to bootstrap" and retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import msgspec
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

__all__ = [
    "BOOTSTRAP_ENV",
    "CONNECTION_KEYWORDS",
    "SECURITY_ENV",
    "KafkaSettings",
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

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"]
_TLS = ("SSL", "SASL_SSL")
_SASL = ("SASL_PLAINTEXT", "SASL_SSL")

BOOTSTRAP_ENV = "KAFKA_BOOTSTRAP_SERVERS"
#: The environment variable of each security setting.
SECURITY_ENV = {
    field: f"PIPELINE_KAFKA_{field.upper()}"
    for field in (
        "security_protocol",
        "sasl_mechanism",
        "ssl_cafile",
        "sasl_username",
        "sasl_password_file",
        "sasl_password",
    )
}


class KafkaSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How to reach the Kafka cluster: what every client of the project is built from.

    Building one checks the security settings together (a SASL protocol without a user, a CA
    file that is not a certificate, ...) and raises :class:`~pipeline.errors.ConfigError`
    naming the environment variable.

    Attributes:
        bootstrap_servers: ``host:port[,host:port...]``.
        client_id: the name brokers log and quote for this client; empty means aiokafka's
            default. The DatabaseAgent uses its instance id (``PIPELINE_INSTANCE_ID``).
        security_protocol: ``PLAINTEXT``, ``SSL``, ``SASL_PLAINTEXT`` or ``SASL_SSL``, as the
            listener the bootstrap servers name speaks.
        sasl_mechanism: ``SCRAM-SHA-512`` (the default), ``SCRAM-SHA-256`` or ``PLAIN``; used
            by the SASL protocols only.
        ssl_cafile: a PEM file of the CA certificates that sign the brokers' certificates; empty
            means the system's trusted CAs. The broker's host name is always verified.
        sasl_username: the SASL user (the principal ``User:<name>`` the ACLs name).
        sasl_password_file: a file holding the user's password (one line; a trailing newline
            is not part of it), read whenever a client is built.
        sasl_password: the password itself, for where a file cannot be had; at most one of
            the two. Never shown.
    """

    bootstrap_servers: Annotated[str, msgspec.Meta(min_length=1)]
    client_id: str = ""
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism = "SCRAM-SHA-512"
    ssl_cafile: str = ""
    sasl_username: str = ""
    sasl_password_file: str = ""
    sasl_password: str = ""

    def __post_init__(self) -> None:
        sasl = self.security_protocol in _SASL
        protocol = f"{SECURITY_ENV['security_protocol']}={self.security_protocol}"
        if sasl and not self.sasl_username:
            raise ConfigError(
                f"{SECURITY_ENV['sasl_username']} is not set: {protocol} needs a user"
            )
        if not sasl and (self.sasl_username or self.sasl_password_file or self.sasl_password):
            given = SECURITY_ENV["sasl_username"] if self.sasl_username else "a SASL password"
            raise ConfigError(
                f"{given} is set but {protocol} does not authenticate with SASL: "
                "use SASL_SSL (or SASL_PLAINTEXT), or unset it"
            )
        if self.sasl_password_file and self.sasl_password:
            raise ConfigError(
                f"both {SECURITY_ENV['sasl_password_file']} and {SECURITY_ENV['sasl_password']} "
                "are set: set one"
            )
        if sasl:
            self.password()  # a missing, unreadable or empty password fails now
        if self.ssl_cafile and self.security_protocol not in _TLS:
            raise ConfigError(
                f"{SECURITY_ENV['ssl_cafile']} is set but {protocol} does not use TLS: "
                "use SSL or SASL_SSL, or unset it"
            )
        if self.security_protocol in _TLS:
            self.ssl_context()  # a CA file that is missing or not a certificate fails now

    def __repr__(self) -> str:  # never show the password, whatever prints this
        shown = {f: getattr(self, f) for f in self.__struct_fields__}
        if self.sasl_password:
            shown["sasl_password"] = "***"
        return "KafkaSettings(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in _TLS

    def password(self) -> str:
        """The SASL password: from its file, else the setting itself. Raises ConfigError when
        there is none, or its file cannot be read (the error names the file, never a secret)."""
        if not self.sasl_password_file:
            if not self.sasl_password:
                raise ConfigError(
                    f"{SECURITY_ENV['sasl_password_file']} is not set: "
                    f"{self.security_protocol} needs the password of user {self.sasl_username!r} "
                    f"(or {SECURITY_ENV['sasl_password']})"
                )
            return self.sasl_password
        variable = SECURITY_ENV["sasl_password_file"]
        try:
            text = Path(self.sasl_password_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"{variable}: cannot read {self.sasl_password_file}: {exc.strerror}"
            ) from None
        except UnicodeDecodeError:
            raise ConfigError(f"{variable}: {self.sasl_password_file} is not UTF-8 text") from None
        password = text.removesuffix("\n").removesuffix("\r")
        if not password:
            raise ConfigError(f"{variable}: {self.sasl_password_file} is empty")
        return password

    def ssl_context(self) -> ssl.SSLContext:
        """The TLS context of every connection: the CA file's certificates (or the system's),
        certificates required, host names verified."""
        variable = SECURITY_ENV["ssl_cafile"]
        if self.ssl_cafile and not Path(self.ssl_cafile).is_file():
            raise ConfigError(f"{variable}: {self.ssl_cafile} does not exist or is not a file")
        try:
            context = ssl.create_default_context(cafile=self.ssl_cafile or None)
        except (ssl.SSLError, ValueError) as exc:
            raise ConfigError(
                f"{variable}: {self.ssl_cafile} holds no PEM certificate ({exc})"
            ) from None
        except OSError as exc:
            raise ConfigError(
                f"{variable}: cannot read {self.ssl_cafile}: {exc.strerror}"
            ) from None
        if self.ssl_cafile and not context.get_ca_certs():
            raise ConfigError(f"{variable}: {self.ssl_cafile} holds no CA certificate")
        return context

    def connection(self) -> dict[str, Any]:
        """The aiokafka keyword arguments that connect a client as these settings say."""
        found: dict[str, Any] = {"bootstrap_servers": self.bootstrap_servers}
        if self.client_id:
            found["client_id"] = self.client_id
        if self.security_protocol != "PLAINTEXT":
            found["security_protocol"] = self.security_protocol
        if self.uses_tls:
            found["ssl_context"] = self.ssl_context()
        if self.security_protocol in _SASL:
            found["sasl_mechanism"] = self.sasl_mechanism
            found["sasl_plain_username"] = self.sasl_username
            found["sasl_plain_password"] = self.password()
        return found

    def environment(self) -> dict[str, str]:
        """These settings as the environment variables :func:`settings_from_env` reads (the
        password as its file's name when it has one): for a child process such as
        ``pipeline run``. The client id is not among them."""
        found = {BOOTSTRAP_ENV: self.bootstrap_servers}
        for field, variable in SECURITY_ENV.items():
            found[variable] = str(getattr(self, field))
        return found


def settings_from_env(
    environ: Mapping[str, str] = os.environ, *, bootstrap_servers: str | None = None
) -> KafkaSettings:
    """Settings from ``KAFKA_BOOTSTRAP_SERVERS`` (or ``bootstrap_servers``) and the
    ``PIPELINE_KAFKA_*`` variables (:data:`SECURITY_ENV`); ConfigError names a wrong one."""
    values: dict[str, Any] = {"bootstrap_servers": bootstrap_servers or environ.get(BOOTSTRAP_ENV)}
    if values["bootstrap_servers"] is None:
        raise ConfigError(f"{BOOTSTRAP_ENV} is not set")
    for field, variable in SECURITY_ENV.items():
        if environ.get(variable):
            values[field] = environ[variable]
    try:
        return msgspec.convert(values, KafkaSettings)
    except msgspec.ValidationError as exc:
        raise ConfigError(_name_the_variable(str(exc))) from None


_CHOICES = {"security_protocol": SecurityProtocol, "sasl_mechanism": SaslMechanism}


def _name_the_variable(message: str) -> str:
    for field, variable in {"bootstrap_servers": BOOTSTRAP_ENV, **SECURITY_ENV}.items():
        if f"`$.{field}`" in message:
            choices = ", ".join(get_args(_CHOICES[field])) if field in _CHOICES else ""
            return f"{variable}: {message}" + (f"; choose from {choices}" if choices else "")
    return f"Kafka settings: {message}"


def kafka_settings(kafka: KafkaSettings | str) -> KafkaSettings:
    """``kafka`` itself, or those bootstrap servers (``host:port,...``) with the security
    settings of the environment (``PIPELINE_KAFKA_*``; none set means plaintext)."""
    if isinstance(kafka, KafkaSettings):
        return kafka
    return settings_from_env(os.environ, bootstrap_servers=kafka)


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
