"""PostgreSQL over TLS (docs/security.md): the local stack serves it with a certificate from
its own CA, and every command verifies it when its URL says ``sslmode=verify-full``. A
certificate that does not verify is a one-line error naming the problem, never a traceback
and never a retry loop."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from pipeline import db, testbed
from pipeline.devstack import postgres, tls
from tests.conftest import Servers
from tests.integration.harness import agent_env

pytestmark = pytest.mark.timeout(180)

MIGRATE_COMMAND = (sys.executable, "-m", "pipeline.cli", "migrate")
REFUSED = "pipeline: error: PostgreSQL's TLS certificate was refused: "


def _ca(servers: Servers) -> Path:
    if servers.ca is None:
        pytest.fail(
            "the TLS tests need the CA of the server's certificate: run them on the local "
            "stack (unset KAFKA_BOOTSTRAP_SERVERS and DATABASE_URL)"
        )
    return servers.ca


async def _pipeline(*command: str, env: dict[str, str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *command, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 90)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_verify_full_against_the_stacks_ca_is_a_tls_session(
    servers: Servers, database_url: str, unique: str
) -> None:
    ca = _ca(servers)
    for host in ("127.0.0.1", "localhost"):  # both names are in the certificate
        url = postgres.with_tls(testbed.as_agent(database_url), ca).replace("127.0.0.1", host)
        conn = await db.connect(url, db.Session(command_timeout=10))
        try:
            session = await conn.fetchrow(
                "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
            )
            assert session is not None
            assert (session["ssl"], session["version"]) == (True, "TLSv1.3")
        finally:
            await conn.close()
    # The commands too: `pipeline migrate` as the migrator, over TLS.
    env = agent_env(servers.endpoints.kafka_bootstrap, database_url, f"{unique}.", unique)
    env["PIPELINE_MIGRATE_DATABASE_URL"] = postgres.with_tls(testbed.as_migrator(database_url), ca)
    code, out, err = await _pipeline(*MIGRATE_COMMAND, env=env)
    # stderr: the partitions its maintenance pass made (docs/operations.md), nothing else.
    assert (code, out) == (0, "the schema is up to date\n")
    assert all(" made " in line for line in err.splitlines()), err


@pytest.mark.parametrize("command", ["migrate", "run"])
async def test_a_certificate_from_another_ca_is_refused_with_one_line(
    servers: Servers, database_url: str, unique: str, tmp_path: Path, command: str
) -> None:
    _ca(servers)
    stranger = tls.ensure_ca(tmp_path / "other-ca", name="some other CA")
    url = postgres.with_tls(testbed.as_agent(database_url), stranger.cert)
    env = agent_env(servers.endpoints.kafka_bootstrap, database_url, f"{unique}.", unique)
    env["DATABASE_URL"] = url
    code, _, err = await _pipeline(sys.executable, "-m", "pipeline.cli", command, env=env)
    assert code == 2
    assert err.splitlines()[-1] == (
        REFUSED + "unable to get local issuer certificate (check sslrootcert, the CA that "
        "signed the server's certificate, and that the URL's host is one the certificate names)"
    )
    assert "Traceback" not in err


async def test_a_host_name_the_certificate_does_not_name_is_refused(
    servers: Servers, database_url: str, unique: str
) -> None:
    """The server's certificate names localhost and 127.0.0.1. "127.1" reaches the same
    server (the resolver reads it as 127.0.0.1) under a name the certificate was not issued
    for, as a server with another host's certificate would present itself: verify-full
    refuses it, though the CA is the right one."""
    ca = _ca(servers)
    url = postgres.with_tls(testbed.as_migrator(database_url), ca).replace("127.0.0.1", "127.1")
    env = agent_env(servers.endpoints.kafka_bootstrap, database_url, f"{unique}.", unique)
    env["PIPELINE_MIGRATE_DATABASE_URL"] = url
    code, out, err = await _pipeline(*MIGRATE_COMMAND, env=env)
    assert (code, out) == (2, "")
    assert err.startswith(
        REFUSED + "Hostname mismatch, certificate is not valid for '127.1'. (check sslrootcert"
    ), err


async def test_a_missing_ca_file_is_named(
    servers: Servers, database_url: str, unique: str, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-ca.crt"
    env = agent_env(servers.endpoints.kafka_bootstrap, database_url, f"{unique}.", unique)
    env["PIPELINE_MIGRATE_DATABASE_URL"] = postgres.with_tls(database_url, missing)
    assert await _pipeline(*MIGRATE_COMMAND, env=env) == (
        2,
        "",
        f"pipeline: error: a file the database URL names does not exist: sslrootcert={missing}\n",
    )
