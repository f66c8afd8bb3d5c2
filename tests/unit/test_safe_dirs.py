"""pipeline.devstack.safe_dirs: the stack's directories under a directory others may write to
(a stand-in for /tmp: 1777) are reached without following another user's links, and are
refused, naming the path and the problem, when another user made them. As root, as the
stack's own paths are only predictable then; the other user is ``nobody``."""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

import pytest

from pipeline.devstack import safe_dirs
from pipeline.errors import DevStackError

NOBODY = pwd.getpwnam("nobody")
SERVER = pwd.getpwnam("postgres")


def shared_dir(path: Path) -> Path:
    """A directory anyone may create names in, as /tmp."""
    path.mkdir()
    path.chmod(0o1777)
    return path


def victim(path: Path) -> Path:
    """A directory of another user's, with a file: what a planted link points at."""
    path.mkdir()
    (path / "file").write_text("theirs\n")
    os.chown(path / "file", NOBODY.pw_uid, NOBODY.pw_gid)
    os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
    path.chmod(0o751)
    return path


def snapshot(path: Path) -> list[tuple[str, int, int, int]]:
    """Every entry under ``path`` (itself included): name, owner, group, mode."""
    entries = [path, *sorted(path.rglob("*"))]
    return [(str(p), (s := p.lstat()).st_uid, s.st_gid, stat.S_IMODE(s.st_mode)) for p in entries]


def test_this_is_root() -> None:
    # The paths and owners below are root's case (the stack as root hands directories to
    # postgres): run the unit tests as root, as `make test` in this project's container does.
    assert os.geteuid() == 0, "these tests hand directories to other users: run them as root"


def test_a_new_directory_is_made_with_its_owner_and_mode(tmp_path: Path) -> None:
    shared = shared_dir(tmp_path / "tmp")
    path = shared / "stack" / "pgdata"
    safe_dirs.ensure_dir(path, 0o700, safe_dirs.Owner.of(SERVER))
    info = path.stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (
        SERVER.pw_uid,
        SERVER.pw_gid,
        0o700,
    )
    parent = path.parent.stat()  # made on the way: root's, and no one else may write to it
    assert (parent.st_uid, stat.S_IMODE(parent.st_mode) & 0o022) == (0, 0)
    safe_dirs.ensure_dir(path, 0o700, safe_dirs.Owner.of(SERVER))  # again: nothing to do
    assert path.stat().st_ino == info.st_ino


def test_a_link_planted_in_a_shared_directory_is_refused_and_its_target_untouched(
    tmp_path: Path,
) -> None:
    shared = shared_dir(tmp_path / "tmp")
    target = victim(tmp_path / "theirs")
    before = snapshot(target)
    planted = shared / "stack"
    planted.symlink_to(target)
    os.lchown(planted, NOBODY.pw_uid, NOBODY.pw_gid)
    for path in (planted, planted / "pgdata"):
        with pytest.raises(DevStackError) as raised:
            safe_dirs.ensure_dir(path, 0o700, safe_dirs.Owner.of(SERVER))
        assert str(raised.value).startswith(
            f"{planted} is a symbolic link of nobody (uid {NOBODY.pw_uid}) in {shared}, which "
            "others may write to: the local stack does not use it"
        )
        assert snapshot(target) == before
    # Even a link of root's own: in /tmp, whoever made a name, another user could replace it.
    planted.unlink()
    planted.symlink_to(target)
    with pytest.raises(DevStackError, match="is a symbolic link of root"):
        safe_dirs.ensure_dir(planted, 0o700)
    assert snapshot(target) == before


def test_a_directory_another_user_made_in_a_shared_directory_is_refused(tmp_path: Path) -> None:
    shared = shared_dir(tmp_path / "tmp")
    theirs = victim(shared / "stack")
    before = snapshot(theirs)
    for path in (theirs, theirs / "pgdata"):
        with pytest.raises(DevStackError) as raised:
            safe_dirs.ensure_dir(path, 0o700, safe_dirs.Owner.of(SERVER))
        assert str(raised.value).startswith(
            f"{theirs} belongs to nobody (uid {NOBODY.pw_uid}), in {shared}, where anyone who "
            "may write to it could have made it"
        )
    assert snapshot(theirs) == before
    (shared / "file").write_text("not a directory\n")
    with pytest.raises(DevStackError, match="file is not a directory"):
        safe_dirs.ensure_dir(shared / "file", 0o700)


def test_an_older_owner_is_taken_over_and_its_links_are_not_followed(tmp_path: Path) -> None:
    shared = shared_dir(tmp_path / "tmp")
    older = shared / "stack"  # as an older layout left it: the server's user's
    older.mkdir()
    os.chown(older, SERVER.pw_uid, SERVER.pw_gid)
    target = victim(tmp_path / "theirs")
    before = snapshot(target)
    (older / "pgdata").symlink_to(target)  # what that user could have done meanwhile
    os.lchown(older / "pgdata", SERVER.pw_uid, SERVER.pw_gid)
    with pytest.raises(DevStackError, match="belongs to postgres"):
        safe_dirs.ensure_dir(older, 0o755)  # not without saying it is expected
    safe_dirs.ensure_dir(older, 0o755, previous_owners={SERVER.pw_uid})
    assert (older.stat().st_uid, stat.S_IMODE(older.stat().st_mode)) == (0, 0o755)
    with pytest.raises(DevStackError, match=f"{older / 'pgdata'} is a symbolic link of postgres"):
        safe_dirs.ensure_dir(older / "pgdata", 0o700, safe_dirs.Owner.of(SERVER))
    assert snapshot(target) == before


def test_a_link_of_roots_in_a_directory_only_root_writes_is_followed(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to("real")  # as /var/run -> /run
    safe_dirs.ensure_dir(tmp_path / "link" / "stack", 0o700)
    assert (real / "stack").is_dir() and not (real / "stack").is_symlink()
    assert safe_dirs.check_dir(tmp_path / "link" / "stack")


def test_files_are_written_through_the_directory_never_through_a_link(tmp_path: Path) -> None:
    target = victim(tmp_path / "theirs")
    before = snapshot(target)
    directory = tmp_path / "pgdata"
    server = safe_dirs.Owner.of(SERVER)
    with safe_dirs.opened_dir(directory, 0o700, server) as fd:
        (directory / "server.key").symlink_to(target / "file")  # the server's user did it
        safe_dirs.write_file(fd, "server.key", b"key\n", 0o600, server)
    written = (directory / "server.key").lstat()
    assert stat.S_ISREG(written.st_mode)
    assert (written.st_uid, stat.S_IMODE(written.st_mode)) == (SERVER.pw_uid, 0o600)
    assert (directory / "server.key").read_bytes() == b"key\n"
    assert snapshot(target) == before


def test_check_dir_finds_a_missing_directory_missing_and_refuses_a_foreign_one(
    tmp_path: Path,
) -> None:
    shared = shared_dir(tmp_path / "tmp")
    assert not safe_dirs.check_dir(shared / "dist")
    victim(shared / "dist")
    with pytest.raises(DevStackError, match="belongs to nobody"):
        safe_dirs.check_dir(shared / "dist")
    assert not (shared / "missing").exists()
