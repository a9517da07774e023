"""The gate in front of the console and local API (an ASGI wrapper, outermost): Host, Origin, body.

Every request passes here before FastAPI sees it:

* **Host** must be one of the kit's own names or the address the request arrived on (loopback,
  the kit's host name and ``<name>.local``, ``[api] hostnames``). Anything else is refused (421):
  a DNS-rebinding page (``evil.example`` resolving to the kit) sends its own name as Host.
* **Origin** on a state-changing request (POST, PUT, PATCH, DELETE) must be the kit itself
  (same scheme, host and port); a foreign or ``null`` Origin, or ``Sec-Fetch-Site: cross-site``,
  is refused (403), so a plain HTML form on another site cannot fire ``/usb/eject``. Programs
  (the CLI, curl) send no Origin and are judged by their credential alone.
* **Body**: a declared ``Content-Length`` over the cap is refused (413) before a byte is read; an
  undeclared (chunked) body is read only up to the cap, then refused. A body that is read is
  parsed by `firmware.wire.safejson` (size, depth, no NaN/Infinity) and refused with 400/413/415
  and a clear message when it is not a JSON document; FastAPI then parses the same, now harmless, bytes.

Errors are JSON ``{"detail": {"code": ..., "message": ...}}`` like the API's own.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from firmware.errors import ProtocolError
from firmware.wire import safejson

log = logging.getLogger("rekamd")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def split_host(value: str) -> tuple[str, str]:
    """``host[:port]`` (``[v6]:port`` too) -> (lower-case host without brackets, port or "")."""
    v = value.strip().lower()
    if v.startswith("["):
        host, _, rest = v[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else ""
    if v.count(":") == 1:
        host, _, port = v.partition(":")
        return host, port
    return v, ""


def kit_names(extra: Iterable[str] = ()) -> set[str]:
    """The names a request to this kit may carry as Host (besides the address it arrived on)."""
    host = socket.gethostname().lower()
    names = {"localhost", "127.0.0.1", "::1", *(n.strip().lower().rstrip(".") for n in extra if n.strip())}
    if host:
        names |= {host, f"{host}.local", host.split(".")[0]}
    return names


class Guard:
    """Wraps an ASGI app with the Host, Origin and body checks above."""

    def __init__(self, app: Any, *, max_body: int, hostnames: Iterable[str] = ()) -> None:
        self.app = app
        self.max_body = max_body
        self.names = kit_names(hostnames)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        local = str((scope.get("server") or ("",))[0] or "").lower()
        host_hdr = headers.get("host", "")
        host, _port = split_host(host_hdr)
        if not host or (host not in self.names and host != local):
            log.warning("console request refused reason=host host=%r path=%s", host_hdr[:100], scope.get("path"))
            await _answer(send, 421, "unknown_host",
                          f"Host {host_hdr[:100]!r} bukan nama kit ini / is not one of this kit's names")
            return
        if scope.get("method", "GET") in UNSAFE and not self._same_origin(headers, scope, host_hdr):
            log.warning("console request refused reason=origin origin=%r path=%s",
                        headers.get("origin", "")[:100], scope.get("path"))
            await _answer(send, 403, "cross_origin",
                          "permintaan dari situs lain ditolak / a request from another site is refused")
            return
        declared = headers.get("content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                await _answer(send, 400, "bad_length", "Content-Length is not a number")
                return
            if n > self.max_body:
                await _answer(send, 413, "too_large", f"request body of {n} bytes; the limit is {self.max_body}")
                return
            if n == 0:
                await self.app(scope, receive, send)
                return
        elif "chunked" not in headers.get("transfer-encoding", "").lower():
            await self.app(scope, receive, send)  # no body at all
            return
        body = bytearray()
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            if len(body) > self.max_body:
                await _answer(send, 413, "too_large", f"request body over the limit of {self.max_body} bytes")
                return
            if not msg.get("more_body", False):
                break
        if body:
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype and ctype != "application/json" and not ctype.endswith("+json"):
                await _answer(send, 415, "not_json", f"request body must be application/json, not {ctype[:60]}")
                return
            try:
                safejson.loads(bytes(body), max_bytes=self.max_body, what="request body")
            except ProtocolError as e:
                await _answer(send, 413 if e.reason == "too_large" else 400, f"body_{e.reason}", str(e))
                return
        await self.app(scope, _replay(bytes(body), receive), send)

    def _same_origin(self, headers: dict[str, str], scope: Scope, host_hdr: str) -> bool:
        """True for a request the kit's own page (or a program without Origin) sent."""
        if headers.get("sec-fetch-site", "").lower() in ("cross-site", "same-site"):
            return False
        origin = headers.get("origin")
        if origin is None:
            return True
        scheme, sep, rest = origin.strip().lower().partition("://")
        want = "https" if scope.get("scheme") == "https" else "http"
        return bool(sep) and scheme == want and rest == host_hdr.strip().lower()


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the body already read, then passes on (disconnects)."""
    sent = False

    async def inner() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return inner


async def _answer(send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps({"detail": {"code": code, "message": message}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
