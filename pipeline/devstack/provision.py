"""The local stack's logins, roles, Kafka users and ACLs, for servers it did not start:
compose.yaml's one-shot jobs run these, so that its servers get exactly what `pipeline dev up`
gives its own (docs/deploy.md, docs/security.md).

    python -m pipeline.devstack.provision secrets  --stores DIR
    python -m pipeline.devstack.provision postgres --admin-url URL --secrets DIR
    python -m pipeline.devstack.provision kafka    --bootstrap HOST:PORT --secrets DIR

``secrets`` makes every password once (random, kept afterwards) in the store ``admin`` under
DIR and copies each into the stores of the services that use it, each store and file readable
by that service's user only; ``postgres`` creates the logins (their SCRAM verifiers, never the
passwords) and the pipeline database, as the superuser of ``URL``; ``kafka`` gives the users
their SCRAM-SHA-512 credentials and creates the ACLs, as the super user of a plaintext
listener (in compose, one on the broker container's loopback). Each is idempotent.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.devstack import kafka_auth, postgres, safe_dirs
from pipeline.errors import DevStackError
from pipeline.kafka_clients import KafkaSettings

# The users of the images compose.yaml runs: this project's (Dockerfile), postgres:15's
# (Debian), grafana's.
PIPELINE_USER = safe_dirs.Owner(10001, 10001)
POSTGRES_IMAGE_USER = safe_dirs.Owner(999, 999)
GRAFANA_USER = safe_dirs.Owner(472, 0)

POSTGRES_SUPERUSER_FILE = postgres.passfile_name(postgres.SUPERUSER)
SUPERUSER_PASSWORD_FILE = "superuser.password"  # POSTGRES_PASSWORD_FILE: the password alone
GRAFANA_ADMIN_FILE = "admin.password"  # GF_SECURITY_ADMIN_PASSWORD__FILE


def kafka_password_name(user: str) -> str:
    return kafka_auth.password_file(Path(), user).name


@dataclass(frozen=True)
class Store:
    """A directory of secrets (in compose, a volume) for the services of one user."""

    owner: safe_dirs.Owner
    files: tuple[str, ...]


# Who gets which secret. ADMIN holds them all: the provisioning jobs read it.
ADMIN = "admin"
STORES: Mapping[str, Store] = {
    ADMIN: Store(
        PIPELINE_USER,
        (
            POSTGRES_SUPERUSER_FILE,
            *(
                postgres.passfile_name(u)
                for u in (postgres.MIGRATOR, postgres.AGENT, postgres.ANALYST)
            ),
            *(kafka_password_name(u) for u in kafka_auth.USERS),
            GRAFANA_ADMIN_FILE,
        ),
    ),
    "postgres": Store(POSTGRES_IMAGE_USER, (SUPERUSER_PASSWORD_FILE,)),
    "migrator": Store(PIPELINE_USER, (postgres.passfile_name(postgres.MIGRATOR),)),
    "agent": Store(
        PIPELINE_USER,
        (postgres.passfile_name(postgres.AGENT), kafka_password_name(kafka_auth.AGENT_USER)),
    ),
    "producer": Store(PIPELINE_USER, (kafka_password_name(kafka_auth.PRODUCER_USER),)),
    "orchestrator": Store(
        PIPELINE_USER,
        (
            postgres.passfile_name(postgres.ANALYST),
            kafka_password_name(kafka_auth.ORCHESTRATOR_USER),
        ),
    ),
    "grafana": Store(GRAFANA_USER, (GRAFANA_ADMIN_FILE,)),
}


def secret_file_text(name: str, password: str) -> str:
    """What the file ``name`` holds for ``password``: a pgpass line for a login's file, the
    password on a line of its own otherwise."""
    if name.startswith("pg-") and name.endswith(".pgpass"):
        user = name.removeprefix("pg-").removesuffix(".pgpass")
        return f"*:*:*:{user}:{password}\n"
    return password + "\n"


def _password_of(name: str) -> str:
    """Which password a file holds: the superuser's two files hold the same one."""
    return POSTGRES_SUPERUSER_FILE if name == SUPERUSER_PASSWORD_FILE else name


def make_secrets(root: Path) -> None:
    """Every store under ``root`` (``root/<store>``), each password made once in the admin
    store and copied to the others."""
    passwords: dict[str, str] = {}
    admin = root / ADMIN
    for name in STORES[ADMIN].files:
        try:
            text = (admin / name).read_text().strip()
        except FileNotFoundError:
            text = ""
        password = text.rsplit(":", 1)[-1]
        passwords[name] = password if len(password) >= 32 else secrets.token_urlsafe(32)
    for store_name, store in STORES.items():
        with safe_dirs.opened_dir(root / store_name, 0o700, store.owner) as directory:
            for name in store.files:
                text = secret_file_text(name, passwords[_password_of(name)])
                safe_dirs.write_file(directory, name, text.encode(), 0o600, store.owner)


def provision_postgres(admin_url: str, secrets_dir: Path) -> None:
    """The logins (passwords in ``secrets_dir``) and the pipeline database, owned by the
    migrator, on the server of ``admin_url`` (a superuser's)."""
    asyncio.run(postgres.ensure_logins_and_database(admin_url, secrets_dir, connect_timeout=30))


def provision_kafka(bootstrap: str, secrets_dir: Path) -> None:
    """The SCRAM users and the pipeline's ACLs, as the super user of the plaintext listener
    at ``bootstrap``."""
    passwords = {u: kafka_auth.password_file(secrets_dir, u) for u in kafka_auth.USERS}
    missing = [str(p) for p in passwords.values() if not p.is_file()]
    if missing:
        raise DevStackError(f"no Kafka password file {', '.join(missing)}: run `secrets` first")
    admin = KafkaSettings(bootstrap_servers=bootstrap)
    acls = kafka_auth.pipeline_acls(catalog=kafka_auth.environment_catalog())
    asyncio.run(kafka_auth.set_up(admin, passwords, acls))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.devstack.provision")
    commands = parser.add_subparsers(dest="command", required=True)
    made = commands.add_parser("secrets", help="make the passwords, once, into their stores")
    made.add_argument("--stores", type=Path, required=True)
    pg = commands.add_parser("postgres", help="the logins, roles and pipeline database")
    pg.add_argument("--admin-url", required=True, help="the superuser's URL (passfile=...)")
    pg.add_argument("--secrets", type=Path, required=True)
    kafka = commands.add_parser("kafka", help="the SCRAM users and the ACLs")
    kafka.add_argument("--bootstrap", required=True)
    kafka.add_argument("--secrets", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "secrets":
            make_secrets(args.stores)
        elif args.command == "postgres":
            provision_postgres(args.admin_url, args.secrets)
        else:
            provision_kafka(args.bootstrap, args.secrets)
    except DevStackError as exc:
        print(f"provision {args.command}: {exc}", file=sys.stderr)
        return 1
    print(f"provision {args.command}: done")
    return 0


if __name__ == "__main__":
    os.umask(0o077)
    sys.exit(main())
