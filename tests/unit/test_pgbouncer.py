"""The parts of pipeline.devstack.pgbouncer that need no server: its files, URLs and binary."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.devstack import pgbouncer
from pipeline.devstack.postgres import Login
from pipeline.errors import DevStackError


def test_config_listens_on_loopback_only_with_no_socket_and_forwards_every_database() -> None:
    text = pgbouncer.config_text(
        mode="transaction",
        port=6432,
        server_host="127.0.0.1",
        server_port=5433,
        auth_file=Path("/x/userlist.txt"),
    )
    pairs = [line.partition("=") for line in text.splitlines() if not line.startswith("#")]
    settings = {name.strip(): value.strip() for name, equals, value in pairs if equals}
    assert settings["*"] == "host=127.0.0.1 port=5433"
    assert settings["listen_addr"] == "127.0.0.1"
    assert settings["listen_port"] == "6432"
    assert settings["unix_socket_dir"] == ""
    assert settings["pool_mode"] == "transaction"
    assert settings["auth_type"] == "scram-sha-256"
    assert settings["auth_file"] == "/x/userlist.txt"
    assert "ignore_startup_parameters" not in settings  # the pipeline must send nothing refused


def test_an_unknown_mode_is_refused_naming_the_modes() -> None:
    with pytest.raises(DevStackError, match="transaction, session: 'statement'"):
        pgbouncer.PgBouncer(Path("/nonexistent"), "statement")


def test_userlist_holds_each_login_and_its_password(tmp_path: Path) -> None:
    passfile = tmp_path / "pg-pipeline_agent.pgpass"
    passfile.write_text("*:*:*:pipeline_agent:s3cret-Value\n")
    login = Login("pipeline_agent", passfile)
    assert pgbouncer.userlist_text([login]) == '"pipeline_agent" "s3cret-Value"\n'


def test_a_url_through_the_pooler_keeps_its_login_database_and_settings() -> None:
    url = "postgresql://pipeline_agent@127.0.0.1:5432/t1?sslmode=disable&passfile=/s/p"
    assert pgbouncer.through(url, 6432) == (
        "postgresql://pipeline_agent@127.0.0.1:6432/t1?sslmode=disable&passfile=/s/p"
    )
    assert pgbouncer.through("postgresql://db.example:5432/x", 7) == "postgresql://127.0.0.1:7/x"


def test_a_missing_binary_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(pgbouncer, "_SEARCH_DIRS", ("/nonexistent",))
    with pytest.raises(DevStackError, match=r"install pgbouncer \(Debian: apt-get install"):
        pgbouncer.find_binary()
