"""Directories the local stack makes, checks and hands to the server's user, safe against
another local user.

Several of the stack's paths are predictable (as root, under the system temp dir, where
anyone may create names), and the stack as root hands directories to the unprivileged
``postgres`` user. A symbolic link or a directory planted there by another user must not
make root change the owner or mode of a path of that user's choosing, nor write a file
there. So every directory is reached one component at a time from ``/`` through file
descriptors (``O_NOFOLLOW``), never by a path that the kernel resolves again later, and:

* a symbolic link is followed only when it, and the directory holding it, belong to root
  or to this user and no one else may write to that directory (``/var/run``, say);
* a component in a directory that others may write to (``/tmp``) must be a directory of
  root's or this user's (the final one also of ``owner``'s, or of a ``previous_owner``'s);
* the final directory's owner and mode are set through its descriptor (``fchown``,
  ``fchmod``), and files in it are written through it (:func:`write_file`).

Anything else is a :class:`DevStackError` naming the path and what is wrong with it.
"""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Collection, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import DevStackError

_MAX_LINKS = 40  # as the kernel's own limit on symbolic links in one lookup
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Owner:
    uid: int
    gid: int

    @classmethod
    def of(cls, user: pwd.struct_passwd) -> Owner:
        return cls(user.pw_uid, user.pw_gid)


def others_may_write(info: os.stat_result, trusted: Collection[int]) -> bool:
    """Whether someone not in ``trusted`` (uids) may add or rename entries in the directory
    ``info`` describes: its owner, or anyone, through its group or other write bit."""
    return info.st_uid not in trusted or bool(info.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _refuse(path: Path, problem: str) -> DevStackError:
    return DevStackError(
        f"{path} {problem}: the local stack does not use it, so that no other user can point "
        "it elsewhere. Delete it (after checking who made it and why), and run the command "
        "again."
    )


def _walk(path: Path, *, create: bool, final_owners: Collection[int]) -> int | None:
    """A descriptor of the directory ``path``, reached as the module says; missing components
    made (mode 0755, this user's) when ``create``, else None when one is missing."""
    trusted = {0, os.geteuid()}
    parts = list(Path(os.path.abspath(path)).parts[1:])
    where = Path("/")
    fd = os.open("/", _DIR_FLAGS)
    links = 0
    try:
        while parts:
            name = parts.pop(0)
            if name in ("", "."):
                continue
            if name == "..":  # after a link's target: from / again, through where's parent
                parts = [*where.parent.parts[1:], *parts]
                where = Path("/")
                os.close(fd)
                fd = os.open("/", _DIR_FLAGS)
                continue
            here = where / name
            parent = os.fstat(fd)
            try:
                info = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                if not create:
                    return None
                with suppress(FileExistsError):  # made meanwhile: checked like any other
                    os.mkdir(name, 0o755, dir_fd=fd)
                parts.insert(0, name)
                continue
            if stat.S_ISLNK(info.st_mode):
                if others_may_write(parent, trusted) or info.st_uid not in trusted:
                    raise _refuse(
                        here,
                        f"is a symbolic link of {_user(info.st_uid)} in {where}, which others "
                        "may write to",
                    )
                links += 1
                if links > _MAX_LINKS:
                    raise _refuse(here, "is a loop of symbolic links")
                target = Path(os.readlink(name, dir_fd=fd))
                if target.is_absolute():
                    where = Path("/")
                    os.close(fd)
                    fd = os.open("/", _DIR_FLAGS)
                parts = [*target.parts[1 if target.is_absolute() else 0 :], *parts]
                continue
            if not stat.S_ISDIR(info.st_mode):
                raise _refuse(here, "is not a directory")
            owners = final_owners if not parts else trusted
            if others_may_write(parent, trusted) and info.st_uid not in owners:
                raise _refuse(
                    here,
                    f"belongs to {_user(info.st_uid)}, in {where}, where anyone who may write "
                    "to it could have made it",
                )
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:  # replaced by a link or a file since the stat
                raise _refuse(here, f"changed while it was checked ({exc.strerror})") from None
            opened = os.fstat(child)
            if (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino):
                os.close(child)
                raise _refuse(here, "changed while it was checked")
            os.close(fd)
            fd, where = child, here
        return fd
    except BaseException:
        os.close(fd)
        raise


@contextmanager
def opened_dir(
    path: Path, mode: int, owner: Owner | None = None, previous_owners: Collection[int] = ()
) -> Iterator[int]:
    """The directory ``path`` (made when missing), owned by ``owner`` (else this user) with
    ``mode``, as a descriptor to write its files through (:func:`write_file`).

    An existing final directory may belong to root, this user, ``owner`` or one of
    ``previous_owners`` (an older layout's owner); it is then given to ``owner``. No one but
    its new owner may write to it, whatever ``mode`` says."""
    target = owner or Owner(os.geteuid(), os.getegid())
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ValueError(f"{path}: mode {mode:o} lets others write to it")
    final_owners = {0, os.geteuid(), target.uid, *previous_owners}
    fd = _walk(path, create=True, final_owners=final_owners)
    assert fd is not None
    try:
        info = os.fstat(fd)
        if info.st_uid not in final_owners:
            raise _refuse(Path(path), f"belongs to {_user(info.st_uid)}")
        if (info.st_uid, info.st_gid) != (target.uid, target.gid):
            os.fchown(fd, target.uid, target.gid)
        if stat.S_IMODE(info.st_mode) != mode:
            os.fchmod(fd, mode)
        yield fd
    finally:
        os.close(fd)


def ensure_dir(
    path: Path, mode: int, owner: Owner | None = None, previous_owners: Collection[int] = ()
) -> None:
    """:func:`opened_dir`, for a directory whose files are written by path later (by this
    user, in a directory no one else may write to)."""
    with opened_dir(path, mode, owner, previous_owners):
        pass


def check_dir(path: Path) -> bool:
    """Whether the directory ``path`` exists, reached as the module says, and is this user's
    with no one else allowed to write to it; False when missing, an error when it is there
    but not so."""
    fd = _walk(path, create=False, final_owners={os.geteuid()})
    if fd is None:
        return False
    try:
        info = os.fstat(fd)
    finally:
        os.close(fd)
    if info.st_uid != os.geteuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise _refuse(Path(path), "is not a directory of this user's that only it may write to")
    return True


def write_file(dir_fd: int, name: str, data: bytes, mode: int, owner: Owner | None = None) -> None:
    """``name`` in the directory ``dir_fd``, new (whatever had that name is removed first,
    and a link there is replaced, never followed), with ``mode``, given to ``owner``."""
    with suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(name, flags, mode, dir_fd=dir_fd)
    with os.fdopen(fd, "wb") as f:
        if owner is not None:
            os.fchown(f.fileno(), owner.uid, owner.gid)
        os.fchmod(f.fileno(), mode)
        f.write(data)
