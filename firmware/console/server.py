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
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from firmware.console.port import KitPort
from firmware.system.fsutil import atomic_write
from firmware.system.service import FAILED, RUNNING, STOPPED

log = logging.getLogger("rekamd")

LISTEN_TIMEOUT_S = 10.0


class ApiServer:
    """Serves the local HTTP API and the web console on `bind:port`; the URL goes to `info_path`."""

    name = "api"

    def __init__(self, kit: KitPort, bind: str, port: int, info_path: Path, *, https_bind: str = "",
                 https_port: int = 8471, hostnames: list[str] | tuple[str, ...] = (), max_body: int = 64 * 1024,
                 identity_dir: Path | None = None) -> None:
        self.kit = kit
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
        self.servers, self.threads = [], []
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
        server = uvicorn.Server(uvicorn.Config(self.app, host=bind, port=port, log_level="warning",
                                               access_log=False, lifespan="off", **kw))
        t = threading.Thread(target=server.run, name="api-https" if tls else "api", daemon=True)
        t.start()
        self.servers.append(server)
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
