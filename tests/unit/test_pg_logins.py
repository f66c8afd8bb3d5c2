"""The local stack's PostgreSQL logins as URLs: the login and its password file replace the
URL's user and password; the host, port, database and TLS settings stay."""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.devstack import postgres


def test_a_login_takes_the_place_of_the_urls_user_and_password() -> None:
    login = postgres.Login("pipeline_agent", Path("/home/me/secrets/pg-pipeline_agent.pgpass"))
    url = "postgresql://admin:s3cret@db.example:6432/agents?sslmode=require&passfile=/x"
    assert login.url(url) == (
        "postgresql://pipeline_agent@db.example:6432/agents?sslmode=require"
        "&passfile=/home/me/secrets/pg-pipeline_agent.pgpass"
    )


def test_a_password_file_path_is_quoted_in_the_url() -> None:
    login = postgres.Login("a", Path("/my home/p&q.pgpass"))
    assert (
        login.url("postgresql://x@h/db") == "postgresql://a@h/db?passfile=/my%20home/p%26q.pgpass"
    )


def test_with_tls_verifies_the_host_against_the_ca() -> None:
    url = "postgresql://a@127.0.0.1:5432/db?passfile=/p&sslmode=disable"
    assert postgres.with_tls(url, Path("/ca/ca.crt")) == (
        "postgresql://a@127.0.0.1:5432/db?passfile=/p&sslmode=verify-full&sslrootcert=/ca/ca.crt"
    )


def test_a_password_is_made_once_in_a_private_pgpass_file(tmp_path: Path) -> None:
    logins = postgres.logins(tmp_path / "secrets")
    passfile = logins.agent.passfile
    first = postgres._password(passfile)
    assert postgres._password(passfile) == first
    assert passfile.read_text() == f"*:*:*:pipeline_agent:{first}\n"
    assert passfile.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "secrets").stat().st_mode & 0o777 == 0o700
    assert len(first) >= 32
    passfile.write_text("garbage")  # not a password this module made: a new one
    assert postgres._password(passfile) != first


def test_a_scram_verifier_is_postgresqls_format_for_rfc_7677s_example() -> None:
    """RFC 7677's salt and password, as PostgreSQL would store them (the integration test
    compares with the server's own verifier too)."""
    salt = bytes.fromhex("5b6d99689d12358eeca04b141236fa81")
    assert postgres.scram_verifier("pencil", salt, 4096) == (
        "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$"
        "WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="
    )
    password = "A_password-made-by-the-stack-0123456789"
    made = postgres.scram_verifier(password)
    assert made != postgres.scram_verifier(password)  # a new salt each time
    assert made.startswith("SCRAM-SHA-256$4096:") and password not in made
    assert re.fullmatch(r"[A-Za-z0-9+/=$:-]+", made)  # a safe SQL literal
