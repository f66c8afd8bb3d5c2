"""DatabaseAgent configuration (:class:`Config`): environment variables over an optional TOML
file, each field checked at start-up with its variable named. docs/architecture.md lists the
fields; docs/security-kafka.md the Kafka settings. Passwords are never shown.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit, urlunsplit

import msgspec

from pipeline.catalog import Catalog, load
from pipeline.db_session import Pooler, Session
from pipeline.errors import ConfigError
from pipeline.gaps import Policy
from pipeline.kafka_settings import BOOTSTRAP_ENV, CHOICES, SECURITY_ENV, KafkaSettings
from pipeline.records import topic_name

Positive = Annotated[int, msgspec.Meta(ge=1)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]

_LISTS = {"streams", "control_public_keys"}  # comma-separated in the environment
RETENTION_ENV_PREFIX = "PIPELINE_RETENTION_"
# Config.kafka's settings, each under its flat name ("kafka_" + its field) in the TOML file and
# its own environment variable; the client id is the instance id.
_KAFKA_KEYS = {f"kafka_{field}": field for field in ("bootstrap_servers", *SECURITY_ENV)}
_ENV_NAMES = {
    "database_url": "DATABASE_URL",
    "kafka_bootstrap_servers": BOOTSTRAP_ENV,
    **{f"kafka_{field}": variable for field, variable in SECURITY_ENV.items()},
}


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Settings of one DatabaseAgent process."""

    # How this instance's Kafka clients connect; its client id is the instance id.
    kafka: KafkaSettings
    database_url: Annotated[str, msgspec.Meta(min_length=1)]
    # `pipeline migrate`'s login, the schema's owner (docs/security.md); "" means database_url.
    migrate_database_url: str = ""
    group_id: Annotated[str, msgspec.Meta(min_length=1)] = "database-agent"
    topic_prefix: str = ""
    # The streams catalog's file (docs/streams.md); "" means the built-in streams only.
    streams_file: str = ""
    # The streams this agent ingests; empty means every stream of the catalog.
    streams: tuple[str, ...] = ()
    # How long a partitioned stream's rows are kept, by stream name ("90d", or "none"), over
    # the catalog's `retention`: one PIPELINE_RETENTION_<STREAM> variable per stream, or a
    # [retention] table in the config file (docs/streams.md, "Partitions and retention").
    retention: dict[str, str] = msgspec.field(default_factory=dict)
    topic_partitions: Positive = 6
    batch_max_records: Positive = 50_000
    batch_max_bytes: Positive = 32 * 1024 * 1024
    batch_max_wait_ms: Positive = 100
    fetch_max_bytes: Positive = 64 * 1024 * 1024
    session_timeout_ms: Annotated[int, msgspec.Meta(ge=6000)] = 30_000
    db_command_timeout_s: Seconds = 60.0
    # PostgreSQL ends an agent's session whose transaction sat idle this long (a process
    # stopped inside its ingest transaction), freeing its offset rows. Longer than anything
    # the agent waits on inside a transaction: db_command_timeout_s bounds the longest, the
    # DLQ acknowledgements. At most a day (the server's limit is about 24 days, in ms).
    db_idle_in_transaction_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=86_400)] = 90.0
    # What stands between the pipeline and PostgreSQL: "none" (a direct connection) or
    # "session" work alike; "transaction", a pooler in transaction mode, turns off the
    # cache of prepared statements (docs/compatibility.md).
    db_pooler: Pooler = "none"
    # A partition whose stored offset is below Kafka's log start (retention deleted records
    # before they were ingested): "record" records the gap and goes on from the log start,
    # "stop" stops the stream until `pipeline control activate` (docs/operations.md).
    on_gap: Policy = "record"
    retry_max_backoff_s: Seconds = 10.0
    shutdown_timeout_s: Seconds = 30.0
    metrics_address: str = "127.0.0.1:9108"
    # How often lag (records and seconds) is measured, even while idle, paused or retrying.
    lag_refresh_s: Annotated[float, msgspec.Meta(ge=0.1, le=300)] = 5.0
    # This instance's name and its Kafka client id; load_config resolves "" to host-pid.
    instance_id: str = ""
    # Public key files (PEM) whose signatures the agent accepts on control commands; without
    # any, it refuses every command it would have to decide.
    control_public_keys: tuple[str, ...] = ()
    # Antigravity's signing key (`pipeline control`), PEM, readable by its owner only.
    control_private_key_file: str = ""

    def __post_init__(self) -> None:
        catalog = self.catalog  # a bad file fails here, at start-up, naming its place
        if not self.streams:
            msgspec.structs.force_setattr(self, "streams", catalog.names)
        unknown = catalog.unknown(self.streams)
        if unknown or not self.streams:
            raise ConfigError(
                f"{env_name('streams')}: unknown stream(s) {unknown or '(none given)'}; "
                f"choose from {', '.join(catalog.names)}"
            )
        if self.metrics_address and not re.fullmatch(r"[^\s:]+:\d{1,5}", self.metrics_address):
            raise ConfigError(
                f"{env_name('metrics_address')}: expected HOST:PORT (or empty to disable), "
                f"got {self.metrics_address!r}"
            )
        if self.db_idle_in_transaction_timeout_s <= self.db_command_timeout_s:
            raise ConfigError(
                f"{env_name('db_idle_in_transaction_timeout_s')} "
                f"({self.db_idle_in_transaction_timeout_s:g}) must be greater than "
                f"{env_name('db_command_timeout_s')} ({self.db_command_timeout_s:g}): inside "
                "its ingest transaction the agent waits up to that long for the DLQ's "
                "acknowledgements, and PostgreSQL would end the session meanwhile"
            )

    def __repr__(self) -> str:  # never show the password, whatever prints this
        fields = {f: getattr(self, f) for f in self.__struct_fields__}
        fields["database_url"] = redact_url(self.database_url)
        fields["migrate_database_url"] = redact_url(self.migrate_database_url)
        return "Config(" + ", ".join(f"{k}={v!r}" for k, v in fields.items()) + ")"

    @property
    def catalog(self) -> Catalog:
        """The streams this deployment knows: the built-in ones and ``streams_file``'s, with
        the operator's ``retention``."""
        return _catalog(self.streams_file, tuple(sorted(self.retention.items())))

    def topic(self, default_name: str) -> str:
        """A topic's deployed name: :func:`pipeline.records.topic_name` with this prefix."""
        return topic_name(default_name, self.topic_prefix)

    @property
    def migration_url(self) -> str:
        """Where `pipeline migrate` connects: the migrator's URL, else the agents'."""
        return self.migrate_database_url or self.database_url

    @property
    def db_session(self) -> Session:
        """How this process's database connections are set up."""
        return Session(
            command_timeout=self.db_command_timeout_s,
            pooler=self.db_pooler,
            idle_in_transaction_timeout=self.db_idle_in_transaction_timeout_s,
        )


def _catalog(streams_file: str, retention: tuple[tuple[str, str], ...]) -> Catalog:
    catalog = load(streams_file)
    if not retention:
        return catalog
    return _with_retention(catalog, retention)


# (the loaded catalog's id, the retention) -> (that catalog, kept alive so its id stays its
# own; the catalog with the retention): a Catalog holds unhashable defaults.
_RETAINED: dict[tuple[int, tuple[tuple[str, str], ...]], tuple[Catalog, Catalog]] = {}


def _with_retention(catalog: Catalog, retention: tuple[tuple[str, str], ...]) -> Catalog:
    cached = _RETAINED.get((id(catalog), retention))
    if cached is not None:
        return cached[1]
    errors = []
    for name, text in retention:
        try:
            catalog.with_retention({name: text})
        except ValueError as exc:
            errors.append(f"{retention_env(name)}: {exc}")
    if errors:
        raise ConfigError("; ".join(errors))
    if len(_RETAINED) > 8:
        _RETAINED.clear()
    _RETAINED[(id(catalog), retention)] = (catalog, catalog.with_retention(dict(retention)))
    return _RETAINED[(id(catalog), retention)][1]


def retention_env(stream: str) -> str:
    """The variable that sets a stream's retention: ``PIPELINE_RETENTION_METRICS``."""
    return f"{RETENTION_ENV_PREFIX}{stream.upper()}"


def env_name(setting: str) -> str:
    """The environment variable of a setting (a key of the TOML file)."""
    return _ENV_NAMES.get(setting, f"PIPELINE_{setting.upper()}")


#: Every setting, as a key of the TOML file: Config's fields, with Config.kafka's in their
#: flat form (``kafka_security_protocol``, ...).
SETTINGS = tuple(
    key
    for field in Config.__struct_fields__
    for key in (_KAFKA_KEYS if field == "kafka" else (field,))
)


def load_config(
    environ: Mapping[str, str] = os.environ,
    toml_path: Path | None = None,
    **overrides: Any,
) -> Config:
    """Build the config: TOML file, then environment variables, then explicit overrides, each
    by setting (:data:`SETTINGS`).

    An empty or unset ``instance_id`` becomes :func:`default_instance_id` (host-pid), so
    every process has a name, in its logs and as its Kafka client id.
    """
    settings: dict[str, Any] = {}
    if toml_path is not None:
        try:
            settings.update(msgspec.toml.decode(toml_path.read_bytes()))
        except FileNotFoundError:
            raise ConfigError(f"config file {toml_path} does not exist") from None
        except msgspec.DecodeError as exc:
            raise ConfigError(f"config file {toml_path}: {exc}") from None
        if "kafka" in settings:  # the settings' flat names only, as for every other setting
            raise ConfigError(_name_the_field("Object contains unknown field `kafka`"))
    retention = {
        name.removeprefix(RETENTION_ENV_PREFIX).lower(): value
        for name, value in environ.items()
        if name.startswith(RETENTION_ENV_PREFIX)
    }
    if retention:
        settings["retention"] = {**settings.get("retention", {}), **retention}
    for setting in SETTINGS:
        if setting == "retention":
            continue
        raw = environ.get(env_name(setting))
        if raw is not None:
            settings[setting] = [s for s in raw.split(",") if s] if setting in _LISTS else raw
    settings.update({k: v for k, v in overrides.items() if v is not None})
    if settings.get("streams") == []:  # given, but empty: a mistake, not "every stream"
        raise ConfigError(f"{env_name('streams')}: unknown stream(s) (none given)")
    if settings.get("instance_id") in (None, ""):
        settings["instance_id"] = default_instance_id()
    kafka = {_KAFKA_KEYS[k]: settings.pop(k) for k in list(settings) if k in _KAFKA_KEYS}
    values = {**settings, "kafka": {**kafka, "client_id": settings["instance_id"]}}
    try:
        return msgspec.convert(values, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_name_the_field(str(exc))) from None


def default_instance_id() -> str:
    """``PIPELINE_INSTANCE_ID``'s default: this host's name and this process's pid."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _name_the_field(message: str) -> str:
    # msgspec says "Expected `int` >= 1 - at `$.batch_max_records`"; users set environment
    # variables, so name the variable too. Config.kafka's fields are named as settings:
    # "at `$.kafka.ssl_cafile`" is kafka_ssl_cafile, PIPELINE_KAFKA_SSL_CAFILE.
    unknown = re.search(r"unknown field `(\w+)`", message)
    if unknown is not None:
        return f"unknown setting {unknown.group(1)!r} in the config file: {message}"
    kafka = re.search(r"`\$\.kafka\.(\w+)`", message) or re.search(
        r"field `(\w+)` - at `\$\.kafka`", message
    )
    if kafka is not None:
        choices = ", ".join(CHOICES.get(kafka.group(1), ()))
        setting = f"kafka_{kafka.group(1)}"
        return f"{env_name(setting)} (config field {setting!r}): {message}" + (
            f"; choose from {choices}" if choices else ""
        )
    match = re.search(r"`\$\.(\w+)", message) or re.search(r"field `(\w+)`", message)
    if match is None:
        return f"configuration: {message}"
    field = match.group(1)
    return f"{env_name(field)} (config field {field!r}): {message}"


_SECRET_PARAMS = {"password", "sslpassword"}


def redact_url(url: str) -> str:
    """The URL with its passwords (in the user info or the query) shown as ``***``."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not parseable: show nothing that could be a secret
        return url.split(":", 1)[0] + "://***"
    netloc = parts.netloc
    if password is not None:
        userinfo, host = netloc.rsplit("@", 1)
        netloc = userinfo.split(":", 1)[0] + ":***@" + host
    query = "&".join(
        f"{name}=***" if name.lower() in _SECRET_PARAMS else pair
        for pair in parts.query.split("&")
        if pair
        for name in (pair.split("=", 1)[0],)
    )
    if (netloc, query) == (parts.netloc, parts.query):
        return url  # nothing secret; urlunsplit would also drop an empty "//" authority
    return urlunsplit(parts._replace(netloc=netloc, query=query))
