"""The console/API server as a service: uvicorn in a thread, serving `create_app(kit)`.

`start()` returns once the socket listens (or raises), then writes `api.json` (url, pid) atomically
so a CLI started at the same moment never reads a half-written file. A server thread that ends
while nobody asked it to is reported failed; the supervisor restarts it (a new uvicorn server on
the same app; with port 0 the new port is written to `api.json`).
"""

from __future__ import annotations

import json
import logging
import os
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

    def __init__(self, kit: KitPort, bind: str, port: int, info_path: Path) -> None:
        self.kit = kit
        self.bind, self.port = bind, port
        self.info_path = info_path
        self.url = ""
        self.app: Any = None
        self.server: Any = None
        self.thread: threading.Thread | None = None
        self._stopping = False

    def start(self) -> None:
        """Listen and serve; raises RuntimeError if the socket cannot be bound within 10 s."""
        import uvicorn

        from firmware.console.api import create_app

        if self.app is None:  # built once: the kit's enrollment service exists by now (started before us)
            self.app = create_app(self.kit)
        self._stopping = False
        server = uvicorn.Server(uvicorn.Config(self.app, host=self.bind, port=self.port, log_level="warning",
                                               access_log=False, lifespan="off"))
        self.server = server
        t = threading.Thread(target=server.run, name="api", daemon=True)
        t.start()
        self.thread = t
        deadline = time.monotonic() + LISTEN_TIMEOUT_S
        while not server.started and t.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not server.started:
            raise RuntimeError(f"console/API could not listen on {self.bind}:{self.port}")
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        info = {"url": self.url, "pid": os.getpid()}
        atomic_write(self.info_path, json.dumps(info).encode(), verify=False)
        log.info("console and API listening url=%s", self.url)

    def stop(self) -> None:
        """Ask uvicorn to exit and wait briefly (a request inside native code may outlive us: daemon thread)."""
        self._stopping = True
        if self.server is not None:
            self.server.should_exit = True
        t = self.thread
        if t is not None and t is not threading.current_thread():
            t.join(3)

    def health(self) -> dict[str, Any]:
        """Running while the server thread serves; failed if it ended on its own."""
        t = self.thread
        if t is not None and t.is_alive():
            return {"state": RUNNING, "url": self.url}
        if t is not None and not self._stopping:
            return {"state": FAILED, "error": "API server thread ended"}
        return {"state": STOPPED}
