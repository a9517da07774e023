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
  The whole body must arrive within ``BODY_TIMEOUT_S`` (10 s) of the headers, else 408: a client that
  declares 60000 bytes and sends one would otherwise hold its connection (a file descriptor the record
  store shares) for ever. (Request *headers* have their own deadline in `firmware.console.server`.)
* **PIN guesses** (`PIN_ROUTES`: sign-in and the supervisor's decision): each client address may fail a
  PIN `SIGNIN_BURST` times, then once per `SIGNIN_REFILL_S` (a token bucket). A token is taken *before* the
  request reaches the PIN check (so 40 parallel guesses cannot all pass an empty-looking bucket) and given
  back unless the answer is a wrong PIN; without one the answer is 429 ``signin_throttled`` with
  ``Retry-After``, and no scrypt hash is computed. The per-operator lockout
  (`firmware.enrollment.operators`) still bounds the guesses at one operator from many addresses.

Errors are JSON ``{"detail": {"code": ..., "message": ...}}`` like the API's own.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from firmware.errors import ProtocolError
from firmware.system.i18n import gettext
from firmware.wire import safejson

log = logging.getLogger("rekamd")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})

#: Seconds a request's body may take to arrive once its headers are in (64 KiB at most: a phone on the kit's
#: Wi-Fi needs well under a second).
BODY_TIMEOUT_S = 10.0
#: Routes that check a PIN -> the error code of their answer to a wrong one (api_enroll.py: the sign-in's
#: 401 ``bad_pin``; the supervisor's decision wraps every refused PIN as 403 ``supervisor_auth``).
PIN_ROUTES: dict[str, tuple[int, str]] = {"/api/v1/auth/signin": (401, "bad_pin"),
                                          "/api/v1/enrollment/supervisor": (403, "supervisor_auth")}
#: Wrong PINs a client address may send at once (an operator's fumbling, and the CLI's, stays far below) ...
SIGNIN_BURST = 10
#: ... then one more every this many seconds (60 a hour): unknown ids (each a full scrypt) and lockouts of
#: every operator from one address become slow.
SIGNIN_REFILL_S = 60.0
#: Client addresses remembered (memory bound); a full bucket is the same as a forgotten one.
SIGNIN_CLIENTS = 1024


class FailureBucket:
    """Per-client token buckets of failed PIN checks; thread safe (the HTTP and HTTPS servers share one)."""

    def __init__(self, burst: int = SIGNIN_BURST, refill_s: float = SIGNIN_REFILL_S,
                 max_clients: int = SIGNIN_CLIENTS, clock: Callable[[], float] = time.monotonic) -> None:
        self.burst, self.refill_s, self.max_clients, self.clock = burst, refill_s, max_clients, clock
        self._lock = threading.Lock()
        self._tokens: dict[str, tuple[float, float]] = {}  # key -> (tokens, when counted)

    @staticmethod
    def key(client: str) -> str:
        """The bucket of an address: IPv6 by its /64 (one host may hold a whole /64, and pick from it freely)."""
        try:
            ip = ipaddress.ip_address(client)
        except ValueError:
            return client
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d on a dual-stack listener is a.b.c.d
                return str(ip.ipv4_mapped)
            return str(ipaddress.ip_network(f"{ip}/64", strict=False))
        return str(ip)

    def _level(self, key: str, now: float) -> float:
        tokens, at = self._tokens.get(key, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - at) / self.refill_s)

    def take(self, client: str) -> float:
        """Take a token: 0.0 if taken, else the seconds until one is there."""
        key, now = self.key(client), self.clock()
        with self._lock:
            level = self._level(key, now)
            if level < 1:
                return (1 - level) * self.refill_s
            self._tokens[key] = (level - 1, now)
            if len(self._tokens) > self.max_clients:
                self._forget(now)
            return 0.0

    def give_back(self, client: str) -> None:
        """Return a token taken for an attempt that turned out not to be a wrong PIN."""
        key, now = self.key(client), self.clock()
        with self._lock:
            if key in self._tokens:
                self._tokens[key] = (min(float(self.burst), self._level(key, now) + 1), now)

    def _forget(self, now: float) -> None:
        """Drop the buckets that are full again, then (an address flood) the oldest."""
        for key in [k for k in self._tokens if self._level(k, now) >= self.burst]:
            del self._tokens[key]
        if len(self._tokens) > self.max_clients:
            for key in sorted(self._tokens, key=lambda k: self._tokens[k][1])[:len(self._tokens) - self.max_clients]:
                del self._tokens[key]


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

    def __init__(self, app: Any, *, max_body: int, hostnames: Iterable[str] = (),
                 body_timeout_s: float = BODY_TIMEOUT_S, pin_failures: FailureBucket | None = None) -> None:
        self.app = app
        self.max_body = max_body
        self.names = kit_names(hostnames)
        self.body_timeout_s = body_timeout_s
        self.pin_failures = pin_failures or FailureBucket()

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
        try:
            async with asyncio.timeout(self.body_timeout_s):
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
        except TimeoutError:
            log.warning("console request refused reason=body_timeout got=%d path=%s", len(body), scope.get("path"))
            await _answer(send, 408, "request_timeout",
                          gettext("the request did not arrive completely within {seconds} s",
                                  lang=headers.get("x-rekam-lang") or None, seconds=_secs(self.body_timeout_s)))
            return
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
        replay = _replay(bytes(body), receive)
        if scope.get("method") == "POST" and scope.get("path") in PIN_ROUTES:
            await self._pin_route(scope, replay, send, headers)
            return
        await self.app(scope, replay, send)

    async def _pin_route(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        """Pass a PIN check on only with a token of the client's bucket; keep the token if the PIN was wrong."""
        client = str((scope.get("client") or ("",))[0] or "")
        wait = self.pin_failures.take(client)
        if wait:
            log.warning("console request refused reason=pin_throttle client=%s path=%s", client, scope.get("path"))
            seconds = max(1, math.ceil(wait))
            await _answer(send, 429, "signin_throttled",
                          gettext("too many wrong PINs from this address; try again in {seconds} s",
                                  lang=headers.get("x-rekam-lang") or None, seconds=seconds),
                          retry_after_s=seconds)
            return
        status, head = 0, bytearray()

        async def watch(msg: dict[str, Any]) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = int(msg["status"])
            elif msg["type"] == "http.response.body" and len(head) < 4096:
                head.extend(msg.get("body", b"")[:4096])
            await send(msg)

        wrong = False
        try:
            await self.app(scope, receive, watch)
            wrong = _is_code(bytes(head), *PIN_ROUTES[str(scope["path"])], status)
        finally:
            if not wrong:  # a right PIN, a lockout answered without a check, "busy", a bad request: no guess spent
                self.pin_failures.give_back(client)

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


def _is_code(body: bytes, want_status: int, want_code: str, status: int) -> bool:
    """True if a response is `want_status` with ``detail.code`` `want_code`."""
    if status != want_status:
        return False
    try:
        detail = json.loads(body).get("detail")
    except (ValueError, AttributeError):
        return False
    return isinstance(detail, dict) and detail.get("code") == want_code


def _secs(value: float) -> str:
    """Seconds for a message: ``10``, or ``0.5`` for a short test deadline."""
    return f"{value:g}"


async def _answer(send: Send, status: int, code: str, message: str, *, retry_after_s: int | None = None) -> None:
    detail: dict[str, Any] = {"code": code, "message": message}
    headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
    if retry_after_s is not None:
        detail["retry_after_s"] = retry_after_s
        headers.append((b"retry-after", str(retry_after_s).encode()))
    body = json.dumps({"detail": detail}).encode()
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
