"""`rekam-fleet release serve` under hostile or broken clients, over real sockets on 127.0.0.1 with the fleet CA's
broker certificate (what the command serves with) and a client checking it like a kit does: a silent connection
does not stall the others, a half-sent request is dropped after the timeout, HEAD leaks no other file, and the
connection cap closes the extras at once."""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from provisioning import release
from provisioning.ca import CaPaths, init_ca

BUNDLE = "rekam-0.3.0.rkup"
BODY = b"not really a bundle, the server does not care" * 100


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CaPaths:
    return init_ca(tmp_path_factory.mktemp("fleet") / "ca", ["127.0.0.1", "localhost"])


@pytest.fixture
def served(tmp_path: Path) -> Path:
    d = tmp_path / "served"
    d.mkdir()
    (d / BUNDLE).write_bytes(BODY)
    (d / "notes.key").write_text("secret\n")
    return d


@pytest.fixture
def start(ca: CaPaths, served: Path) -> Iterator[Callable[..., int]]:
    """Factory: start `release.make_server(**limits)` on a free port in a thread; returns the port. Stopped at
    teardown (the test closes its own sockets first)."""
    servers = []

    def make(**limits: float) -> int:
        srv = release.make_server(served, ca.server_crt, ca.server_key, "127.0.0.1", 0, **limits)
        release.serve_in_thread(srv)
        servers.append(srv)
        return srv.server_address[1]

    yield make
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _client_ctx(ca: CaPaths) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca.fleet_ca_crt))  # as the kit's download checks it


def _request(ca: CaPaths, port: int, method: str, path: str, timeout: float = 2.0) -> tuple[int, dict[str, str],
                                                                                               bytes]:
    c = http.client.HTTPSConnection("localhost", port, context=_client_ctx(ca), timeout=timeout)
    try:
        c.request(method, path)
        r = c.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        c.close()


@contextlib.contextmanager
def _raw(port: int) -> Iterator[socket.socket]:
    """A plain TCP connection that sends nothing (no TLS hello)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=3)
    try:
        yield s
    finally:
        s.close()


@pytest.mark.timeout(15)
def test_idle_connection_does_not_block_a_download(ca: CaPaths, start: Callable[..., int]) -> None:
    port = start()  # the command's defaults: the idle one is not dropped within this test
    with _raw(port), _raw(port):
        t0 = time.monotonic()
        status, _headers, body = _request(ca, port, "GET", "/" + BUNDLE, timeout=2.0)
        assert (status, body) == (200, BODY)
        assert time.monotonic() - t0 < 2.0


@pytest.mark.timeout(15)
def test_half_sent_request_line_is_dropped_after_the_timeout(ca: CaPaths, start: Callable[..., int]) -> None:
    port = start(timeout=0.5)
    with _raw(port) as raw, _client_ctx(ca).wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"GET /" + BUNDLE.encode()[:5])  # no end of line, ever
        t0 = time.monotonic()
        assert tls.recv(100) == b""  # closed by the server, no answer (the client's timeout is 3 s)
        assert 0.3 < time.monotonic() - t0 < 2.0
    with _raw(port) as raw:  # no TLS hello at all: dropped likewise
        t0 = time.monotonic()
        assert raw.recv(100) == b""
        assert time.monotonic() - t0 < 2.0
    assert _request(ca, port, "GET", "/" + BUNDLE)[0] == 200


@pytest.mark.timeout(15)
def test_head_serves_only_what_get_serves(ca: CaPaths, start: Callable[..., int]) -> None:
    port = start()
    for method in ("HEAD", "GET"):
        status, headers, _body = _request(ca, port, method, "/notes.key")
        assert status == 404, method
        assert headers.get("Content-Length") != str(len("secret\n"))
        assert _request(ca, port, method, "/../notes.key")[0] == 404
        assert _request(ca, port, method, "/")[0] == 404
    status, headers, body = _request(ca, port, "HEAD", "/" + BUNDLE)
    assert (status, headers["Content-Length"], body) == (200, str(len(BODY)), b"")


@pytest.mark.timeout(15)
def test_connections_beyond_the_cap_are_closed_at_once(ca: CaPaths, start: Callable[..., int]) -> None:
    port = start(max_connections=2)
    with _raw(port), _raw(port) as second:
        t0 = time.monotonic()
        with _raw(port) as raw, pytest.raises(OSError) as e:  # EOF or reset during the handshake
            _client_ctx(ca).wrap_socket(raw, server_hostname="localhost")
        assert not isinstance(e.value, TimeoutError), e.value
        assert time.monotonic() - t0 < 2.0
        second.close()
        # The slot comes back once the server sees the close: a download gets through again.
        deadline = time.monotonic() + 3
        while True:
            try:
                assert _request(ca, port, "GET", "/" + BUNDLE)[0] == 200
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


@pytest.mark.timeout(15)
def test_a_trickled_request_head_is_dropped_at_its_deadline(ca: CaPaths, start: Callable[..., int]) -> None:
    """One byte every 0.2 s passes every per-read timeout (0.5 s) but not the head's own deadline (1 s)."""
    port = start(timeout=0.5, head_deadline=1.0)
    with _raw(port) as raw, _client_ctx(ca).wrap_socket(raw, server_hostname="localhost") as tls:
        t0 = time.monotonic()
        closed = False
        tls.settimeout(0.2)  # the wait between two bytes is a read: the server's close shows at once
        for b in b"GET /" + BUNDLE.encode() + b" HTTP/1.0\r\nX-Pad: " + b"a" * 40:
            try:
                tls.sendall(bytes([b]))
                closed = tls.recv(100) == b""
            except TimeoutError:
                continue
            except OSError:
                closed = True
            if closed:
                break
        assert closed and 0.8 < time.monotonic() - t0 < 3.0
    assert _request(ca, port, "GET", "/" + BUNDLE)[0] == 200  # the slot came back


@pytest.mark.timeout(30)
def test_a_download_read_too_slowly_is_dropped(ca: CaPaths, start: Callable[..., int], served: Path) -> None:
    """A client that reads the download far under the rate floor (after the grace) loses the connection; a
    normal download of the same file at the same time goes through."""
    big = "rekam-0.4.0.rkup"
    with open(served / big, "wb") as f:
        f.truncate(64 * 1024 * 1024)  # sparse: read fast, far more than the socket buffers hold
    port = start(min_rate=8 * 1024 * 1024, rate_grace=0.5, send_timeout=20, max_connections=1)
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    raw.settimeout(5)
    raw.connect(("127.0.0.1", port))
    with _client_ctx(ca).wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(f"GET /{big} HTTP/1.0\r\n\r\n".encode())
        t0 = time.monotonic()
        got, ended = 0, False
        while time.monotonic() - t0 < 20:
            try:
                chunk = tls.recv(1024)
            except OSError:
                ended = True
                break
            if not chunk:
                ended = True
                break
            got += len(chunk)
            time.sleep(0.01)  # ~100 KiB/s at most: far under 8 MiB/s
        assert ended and got < 64 * 1024 * 1024, got
        assert time.monotonic() - t0 < 5  # cut soon after the grace (reset: not after draining the buffers)
    # Its one slot is free again: a normal download of the same file goes through.
    status, _h, body = _request(ca, port, "GET", "/" + big, timeout=10)
    assert status == 200 and len(body) == 64 * 1024 * 1024
