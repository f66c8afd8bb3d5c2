"""The local stack's PostgreSQL logins as URLs: the login and its password file replace the
URL's user and password; the host, port, database and TLS settings stay."""

from __future__ import annotations

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
