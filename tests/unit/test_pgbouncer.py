"""The parts of pipeline.devstack.pgbouncer that need no server: its files, URLs and binary."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.devstack import pgbouncer
from pipeline.devstack.postgres import Login
from pipeline.errors import DevStackError
from tests.unit.test_safe_dirs import NOBODY, SERVER, snapshot, victim


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


def test_as_root_a_link_planted_at_its_directorys_path_is_refused(
    shared_tmp: Path,
    tmp_path: Path,
) -> None:
    """PgBouncer's directory under /tmp is predictable: a link there must not make root
    hand the directory it points at to postgres, nor write the userlist into it."""
    home = tmp_path / "stack"
    planted = pgbouncer.config_dir(home)
    assert planted.parent == shared_tmp
    target = victim(tmp_path / "theirs")
    before = snapshot(target)
    planted.symlink_to(target)
    os.lchown(planted, NOBODY.pw_uid, NOBODY.pw_gid)
    passfile = tmp_path / "pg-pipeline_agent.pgpass"
    passfile.write_text("*:*:*:pipeline_agent:s3cret-Value\n")
    bouncer = pgbouncer.PgBouncer(home, "transaction")
    try:
        with pytest.raises(DevStackError, match=f"^{planted} is a symbolic link of nobody"):
            bouncer.start("127.0.0.1", 1, [Login("pipeline_agent", passfile)])
    finally:
        bouncer.stop()
    assert snapshot(target) == before


def test_as_root_its_files_are_postgress_in_a_directory_of_roots(
    shared_tmp: Path,
    tmp_path: Path,
) -> None:
    home = tmp_path / "stack"
    passfile = tmp_path / "pg-pipeline_agent.pgpass"
    passfile.write_text("*:*:*:pipeline_agent:s3cret-Value\n")
    bouncer = pgbouncer.PgBouncer(home, "transaction")
    directory = pgbouncer.config_dir(home)
    try:
        bouncer.start("127.0.0.1", 1, [Login("pipeline_agent", passfile)])
        assert snapshot(directory) == [
            (str(directory), 0, 0, 0o755),
            *(
                (str(directory / name), SERVER.pw_uid, SERVER.pw_gid, 0o600)
                for name in ("pgbouncer.ini", "userlist.txt")
            ),
        ]
    finally:
        bouncer.stop()
    assert not directory.exists()
