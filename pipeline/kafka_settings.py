"""How to reach the Kafka cluster: :class:`KafkaSettings` (bootstrap servers, client id, TLS
and SASL), checked together when built, and :func:`settings_from_env`, which reads them from
``KAFKA_BOOTSTRAP_SERVERS`` and the ``PIPELINE_KAFKA_*`` variables. No Kafka client here:
:mod:`pipeline.kafka_clients` builds those from these settings. docs/security-kafka.md
describes the settings.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import msgspec

from pipeline.errors import ConfigError

__all__ = [
    "BOOTSTRAP_ENV",
    "CHOICES",
    "SECURITY_ENV",
    "KafkaSettings",
    "SaslMechanism",
    "SecurityProtocol",
    "kafka_settings",
    "settings_from_env",
]

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


#: The values a setting with a fixed set of them may take.
CHOICES: dict[str, tuple[str, ...]] = {
    "security_protocol": get_args(SecurityProtocol),
    "sasl_mechanism": get_args(SaslMechanism),
}


def _name_the_variable(message: str) -> str:
    for field, variable in {"bootstrap_servers": BOOTSTRAP_ENV, **SECURITY_ENV}.items():
        if f"`$.{field}`" in message:
            choices = ", ".join(CHOICES.get(field, ()))
            return f"{variable}: {message}" + (f"; choose from {choices}" if choices else "")
    return f"Kafka settings: {message}"


def kafka_settings(kafka: KafkaSettings | str) -> KafkaSettings:
    """``kafka`` itself, or those bootstrap servers (``host:port,...``) with the security
    settings of the environment (``PIPELINE_KAFKA_*``; none set means plaintext)."""
    if isinstance(kafka, KafkaSettings):
        return kafka
    return settings_from_env(os.environ, bootstrap_servers=kafka)
