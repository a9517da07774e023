"""The console/API server as a service: uvicorn in a thread, serving `create_app(kit)`.

`start()` returns once the socket listens (or raises), then writes `api.json` (url, pid) atomically
so a CLI started at the same moment never reads a half-written file. A server thread that ends
while nobody asked it to is reported failed; the supervisor restarts it (a new uvicorn server on
the same app; with port 0 the new port is written to `api.json`).

Plain HTTP listens on loopback only (the config refuses anything else). Beside `api.json` the
server writes `api.token` (mode 0640 inside the 0700 state directory: root and the daemon's user),
the local credential the `rekam` CLI sends as `X-Rekam-Token`; a new token is made at each daemon start. With
`[api] https_bind` set, a second listener serves the same app over HTTPS with the kit's console
certificate (`firmware.console.tls`) for phones on the kit's Wi-Fi; its URL and certificate
fingerprint go into `api.json` too.

Time and connection limits (a LAN client must not hold the daemon's file descriptors: the record
store, SQLite and the USB stick share them). uvicorn starts no timer before a request's headers are in,
so a client sending half a request line held its connection for ever:

* each listener keeps at most `MAX_CONNECTIONS` connections open (`CappedListener`, at accept: before a
  TLS handshake or a byte of HTTP); uvicorn answers 503 to a request beyond `LIMIT_CONCURRENCY`
  (``limit_concurrency``), so browsers get an answer while the hard cap still has room;
* a connection that has not delivered a whole request head `HEADER_TIMEOUT_S` after it was made (or after
  its previous response) is closed (`ConsoleProtocol`), and so is a TLS handshake that takes longer
  (`ConsoleLoop`); a request body has its own deadline in the gate (`firmware.console.guard`);
* idle kept-alive connections close after `KEEP_ALIVE_S` (uvicorn's own timer).

The console serves 1-3 operators' browsers (6 connections each at most) and the CLI: 32 per listener is
generous, and two listeners take at most 64 descriptors of the 1024 the unit allows (LimitNOFILE=).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from firmware.console.port import KitPort
from firmware.system.fsutil import atomic_write
from firmware.system.service import FAILED, RUNNING, STOPPED

log = logging.getLogger("rekamd")

LISTEN_TIMEOUT_S = 10.0
#: Seconds a connection has to deliver a request's head (request line and headers), counted from its
#: start or from the previous response; also the TLS handshake's deadline (asyncio's default is 60 s).
HEADER_TIMEOUT_S = 10.0
#: Connections one listener holds open at once (TLS handshakes under way included); more are closed at accept.
MAX_CONNECTIONS = 32
#: Open connections from which a new request is answered 503 (uvicorn's limit_concurrency), below the cap.
LIMIT_CONCURRENCY = 24
#: Connections the kernel queues before they are accepted (its memory, not the daemon's descriptors).
BACKLOG = 64
#: Seconds an idle kept-alive connection stays open after a response (uvicorn's default).
KEEP_ALIVE_S = 5


class CappedListener(socket.socket):
    """A listening socket that holds at most `max_open` accepted connections open at once.

    asyncio's accept loop calls `accept()` on the socket it serves; beyond the cap the new connection is
    closed at once and ConnectionAbortedError ends that round of accepting (asyncio's own signal for
    "nothing more to accept now"). An accepted connection counts until asyncio closes it (its `fileno()`
    is then -1), TLS handshakes in progress included, which uvicorn never sees.
    """

    def __init__(self, family: int, max_open: int) -> None:
        super().__init__(family, socket.SOCK_STREAM)
        self.max_open = max_open
        self.accepted: list[socket.socket] = []
        self.refused = 0

    def open_connections(self) -> int:
        """Accepted connections not closed yet."""
        self.accepted = [c for c in self.accepted if c.fileno() != -1]
        return len(self.accepted)

    def accept(self) -> tuple[socket.socket, Any]:
        conn, addr = super().accept()
        if self.open_connections() >= self.max_open:
            conn.close()
            self.refused += 1
            if self.refused % 100 == 1:  # a flood is logged, not every connection of it
                log.warning("console connection refused reason=too_many_connections open=%d refused=%d client=%s",
                            self.max_open, self.refused, addr[0] if addr else "-")
            raise ConnectionAbortedError("console connection limit reached")
        self.accepted.append(conn)
        return conn, addr


class ConsoleProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's head (uvicorn has none: its keep-alive
    timer starts only after a response and stops at the first byte of the next request)."""

    def __init__(self, *args: Any, header_timeout_s: float = HEADER_TIMEOUT_S, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.header_timeout_s = header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_timer()  # the next request on a kept-alive connection has its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        if not self.transport.is_closing():
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        # IDLE: no whole request head since the deadline was set (nothing, or a part of one). A request whose
        # head is in (SEND_BODY, DONE) belongs to the app now, and its body to the gate's deadline.
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.info("console connection closed reason=header_timeout client=%s",
                     self.client[0] if self.client else "-")
            self.transport.close()


class ConsoleLoop(asyncio.SelectorEventLoop):
    """asyncio's loop with a deadline on TLS handshakes and shutdowns of the servers it makes (uvicorn passes
    none, so asyncio's 60 s and 30 s apply)."""

    def __init__(self, tls_timeout_s: float = HEADER_TIMEOUT_S) -> None:
        super().__init__()
        self.tls_timeout_s = tls_timeout_s

    async def create_server(self, *args: Any, **kw: Any) -> Any:  # type: ignore[override]
        if kw.get("ssl") is not None:
            kw.setdefault("ssl_handshake_timeout", self.tls_timeout_s)
            kw.setdefault("ssl_shutdown_timeout", self.tls_timeout_s)
        return await super().create_server(*args, **kw)


class ApiServer:
    """Serves the local HTTP API and the web console on `bind:port`; the URL goes to `info_path`."""

    name = "api"

    def __init__(self, kit: KitPort, bind: str, port: int, info_path: Path, *, https_bind: str = "",
                 https_port: int = 8471, hostnames: list[str] | tuple[str, ...] = (), max_body: int = 64 * 1024,
                 identity_dir: Path | None = None, header_timeout_s: float = HEADER_TIMEOUT_S,
                 max_connections: int = MAX_CONNECTIONS, limit_concurrency: int = LIMIT_CONCURRENCY) -> None:
        self.kit = kit
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        self.limit_concurrency = min(limit_concurrency, max_connections)
        self.bind, self.port = bind, port
        self.https_bind, self.https_port = https_bind, https_port
        self.hostnames = list(hostnames)
        self.max_body = max_body
        self.info_path = info_path
        self.token_path = info_path.with_name("api.token")
        self.identity_dir = identity_dir or info_path.parent / "identity"
        self.local_token = secrets.token_urlsafe(32)
        self.tls: Any = None
        self.url = ""
        self.https_url = ""
        self.app: Any = None
        self.servers: list[Any] = []
        self.listeners: list[CappedListener] = []  # beside `servers`: how many connections each holds
        self.threads: list[threading.Thread] = []
        self._stopping = False
        self.published = False  # api.json/api.token written by this process: only then may it remove them

    @property
    def server(self) -> Any:
        """The plain-HTTP (loopback) uvicorn server."""
        return self.servers[0] if self.servers else None

    @property
    def thread(self) -> threading.Thread | None:
        return self.threads[0] if self.threads else None

    def start(self) -> None:
        """Listen and serve; raises RuntimeError if a socket cannot be bound within 10 s."""
        from firmware.console.api import create_app
        from firmware.console.guard import Guard

        if self.app is None:  # built once: the kit's enrollment service exists by now (started before us)
            if self.https_bind:
                from firmware.console import tls

                self.tls = tls.load_or_create(self.identity_dir, self.kit.kit_id, [self.https_bind])
            self.app = Guard(create_app(self.kit, self.local_token, self.tls), max_body=self.max_body,
                             hostnames=self.hostnames)
        self._stopping = False
        self.servers, self.listeners, self.threads = [], [], []
        host, port = self._serve(self.bind, self.port)
        self.url = f"http://{_urlhost(host)}:{port}"
        info: dict[str, Any] = {"url": self.url, "pid": os.getpid()}
        if self.tls is not None:
            host, port = self._serve(self.https_bind, self.https_port, tls=True)
            self.https_url = f"https://{_urlhost(host)}:{port}"
            info |= {"https_url": self.https_url, "tls_sha256": self.tls.sha256}
        old = os.umask(0o027)  # the daemon's user and group and root (the technician's sudo rekam), nobody else
        try:
            atomic_write(self.token_path, self.local_token.encode(), verify=False)
            os.chmod(self.token_path, 0o640)
        finally:
            os.umask(old)
        atomic_write(self.info_path, json.dumps(info).encode(), verify=False)
        self.published = True
        log.info("console and API listening url=%s https_url=%s tls_sha256=%s", self.url, self.https_url or "-",
                 self.tls.sha256 if self.tls else "-")

    def unpublish(self) -> None:
        """Remove `api.json` and `api.token`, only if this process wrote them: a daemon that refused to start
        (the state dir is another's) must not make the running one look gone."""
        if not self.published:
            return
        self.published = False
        try:
            if int(json.loads(self.info_path.read_text())["pid"]) != os.getpid():
                return
        except (OSError, ValueError, KeyError, TypeError):
            pass
        for p in (self.token_path, self.info_path):
            p.unlink(missing_ok=True)

    def _serve(self, bind: str, port: int, tls: bool = False) -> tuple[str, int]:
        import uvicorn

        kw: dict[str, Any] = {}
        if tls:
            kw = {"ssl_certfile": str(self.tls.cert_path), "ssl_keyfile": str(self.tls.key_path)}
        # Our own listening socket (the connection cap), protocol (the header deadline) and event loop (the TLS
        # deadline; asyncio's, not uvloop, whose accept is native code), all through uvicorn's public API.
        sock = CappedListener(socket.AF_INET6 if ipaddress.ip_address(bind).version == 6 else socket.AF_INET,
                              self.max_connections)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((bind, port))
        except OSError as e:
            sock.close()
            self.stop()
            raise RuntimeError(f"console/API could not listen on {bind}:{port}{' (HTTPS)' if tls else ''}: {e}") from e
        # proxy_headers off: no proxy stands in front of the kit, and trusting X-Forwarded-For from loopback would
        # let a client pick the address its sign-in throttle (guard.py) and the logs go by.
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off", proxy_headers=False,
                                http=functools.partial(ConsoleProtocol,  # type: ignore[arg-type]
                                                       header_timeout_s=self.header_timeout_s),
                                limit_concurrency=self.limit_concurrency, backlog=BACKLOG,
                                timeout_keep_alive=KEEP_ALIVE_S, **kw)
        server = uvicorn.Server(config)

        def run() -> None:
            # Server.run() would make uvicorn's own loop; serve() on ours behaves the same in every uvicorn version.
            with asyncio.Runner(loop_factory=functools.partial(ConsoleLoop, self.header_timeout_s)) as runner:
                runner.run(server.serve(sockets=[sock]))

        t = threading.Thread(target=run, name="api-https" if tls else "api", daemon=True)
        t.start()
        self.servers.append(server)
        self.listeners.append(sock)
        self.threads.append(t)
        deadline = time.monotonic() + LISTEN_TIMEOUT_S
        while not server.started and t.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not server.started:
            self.stop()
            raise RuntimeError(f"console/API could not listen on {bind}:{port}{' (HTTPS)' if tls else ''}")
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        return host, port

    def stop(self) -> None:
        """Ask uvicorn to exit and wait briefly (a request inside native code may outlive us: daemon thread)."""
        self._stopping = True
        for server in self.servers:
            server.should_exit = True
        for t in self.threads:
            if t is not threading.current_thread():
                t.join(3)

    def health(self) -> dict[str, Any]:
        """Running while every server thread serves; failed if one ended on its own."""
        if self.threads and all(t.is_alive() for t in self.threads):
            tls = {"https_url": self.https_url, "tls_sha256": self.tls.sha256} if self.https_url else {}
            return {"state": RUNNING, "url": self.url, **tls}
        if self.threads and not self._stopping:
            return {"state": FAILED, "error": "API server thread ended"}
        return {"state": STOPPED}


def _urlhost(host: str) -> str:
    return f"[{host}]" if ":" in host else host
