"""The local stack's CA and server certificates verify as clients will check them."""

from __future__ import annotations

import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest

from pipeline.devstack import tls


def _serve_once(context: ssl.SSLContext, listener: socket.socket) -> None:
    conn, _ = listener.accept()
    try:
        with context.wrap_socket(conn, server_side=True) as tls_conn:
            tls_conn.sendall(b"ok")
    except (ssl.SSLError, OSError):
        pass  # the client refused us; the client side of the test says why


def _handshake(server: tls.KeyPair, ca_file: Path, host: str) -> bytes:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(server.cert, server.key)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        thread = threading.Thread(target=_serve_once, args=(server_ctx, listener))
        thread.start()
        try:
            client_ctx = ssl.create_default_context(cafile=str(ca_file))
            with (
                socket.create_connection(listener.getsockname(), timeout=5) as raw,
                client_ctx.wrap_socket(raw, server_hostname=host) as conn,
            ):
                return conn.recv(2)
        finally:
            thread.join(timeout=5)


def test_a_server_certificate_verifies_for_localhost_and_127_0_0_1(tmp_path: Path) -> None:
    ca = tls.ensure_ca(tmp_path / "ca")
    server = tls.issue_server_cert(ca, tmp_path / "certs", "postgres")
    assert _handshake(server, ca.cert, "localhost") == b"ok"
    assert _handshake(server, ca.cert, "127.0.0.1") == b"ok"
    for key in (ca.key, server.key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_another_ca_or_another_host_name_is_refused(tmp_path: Path) -> None:
    ca = tls.ensure_ca(tmp_path / "ca")
    server = tls.issue_server_cert(ca, tmp_path / "certs", "kafka")
    other = tls.ensure_ca(tmp_path / "other", name="another CA")
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        _handshake(server, other.cert, "localhost")
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        _handshake(server, ca.cert, "db.example.com")


def test_created_once(tmp_path: Path) -> None:
    ca = tls.ensure_ca(tmp_path)
    first = ca.cert.read_bytes()
    server = tls.issue_server_cert(ca, tmp_path, "kafka")
    issued = server.cert.read_bytes()
    assert tls.ensure_ca(tmp_path).cert.read_bytes() == first
    assert tls.issue_server_cert(ca, tmp_path, "kafka").cert.read_bytes() == issued
