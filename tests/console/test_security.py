"""Issue #13 finding 7: the console and local API against a hostile LAN client or web page.

Every attack goes over real HTTP (raw sockets where a client library would refuse to send it) to a
real `rekamd --sim`.
"""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from tests.console.conftest import OPERATOR, Daemon, write_config
from tests.support import REKAMD, subprocess_env

ROUTES = [("GET", "/api/v1/status"), ("GET", "/api/v1/records"), ("POST", "/api/v1/usb/eject"),
          ("POST", "/api/v1/usb/export"), ("POST", "/api/v1/sim/commit"), ("POST", "/api/v1/sim/alias"),
          ("GET", "/api/v1/audit"), ("GET", "/api/v1/tls"), ("GET", "/api/v1/enrollment"),
          ("POST", "/api/v1/enrollment"), ("POST", "/api/v1/enrollment/commit"), ("GET", "/api/v1/openapi.json"),
          ]


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def raw(url: str, request: bytes, timeout: float = 10) -> tuple[int, bytes]:
    """Send raw bytes, return (status, whole response)."""
    u = urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _length(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1]), data


def _length(data: bytes) -> int:
    head = data[:data.index(b"\r\n\r\n")].decode("latin-1").lower()
    for line in head.split("\r\n"):
        if line.startswith("content-length:"):
            return int(line.split(":")[1])
    return 0


def test_every_route_needs_a_credential_and_health_reveals_nothing(daemon: Daemon) -> None:
    anon = daemon.anon()
    for method, path in ROUTES:
        r = anon.request(method, path, json={} if method == "POST" else None)
        assert r.status_code == 401, (method, path, r.status_code, r.text)
        assert r.json()["detail"]["code"] == "not_signed_in"
    # a made-up or expired bearer is no better than none
    r = anon.get("/api/v1/status", headers={"Authorization": "Bearer made-up", "X-Rekam-Token": "guess"})
    assert r.status_code == 401
    h = anon.get("/healthz")
    assert h.status_code == 200 and h.json() == {"ok": True}  # no kit id, no counts, no hashes
    # the credentials that are meant to work: the local token (CLI) and an operator session (console)
    assert daemon.client().get("/api/v1/status").status_code == 200
    assert daemon.signin().get("/api/v1/records").status_code == 200
    assert "/api/v1/status" in daemon.client().get("/api/v1/openapi.json").json()["paths"]
    # the console page itself (the sign-in form) loads without a session
    assert anon.get("/").status_code == 200


def test_cross_origin_form_post_is_refused(daemon: Daemon) -> None:
    op = daemon.signin()
    cookie = op.headers["Authorization"][7:]
    form = {"Origin": "http://evil.example", "Content-Type": "application/x-www-form-urlencoded",
            "Cookie": f"rekam_session={cookie}"}
    for path in ("/api/v1/usb/eject", "/api/v1/usb/export", "/api/v1/enrollment", "/api/v1/auth/signin"):
        r = daemon.anon().post(path, content=b"x=1", headers=form)
        assert r.status_code == 403, (path, r.text)
        assert r.json()["detail"]["code"] == "cross_origin"
    # even the local token does not pass a foreign page's request, nor an opaque ("null") origin
    for origin in ("http://evil.example", "null", daemon.url.replace("http:", "https:")):
        r = daemon.client().post("/api/v1/usb/eject", headers={"Origin": origin})
        assert r.status_code == 403, origin
    assert daemon.client().post("/api/v1/usb/eject", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    # the kit's own page (same origin) still works
    r = daemon.anon().post("/api/v1/auth/signin", json={"operator_id": OPERATOR[0], "pin": OPERATOR[1]},
                           headers={"Origin": daemon.url})
    assert r.status_code == 200, r.text


def test_foreign_host_is_refused_dns_rebinding(daemon: Daemon) -> None:
    for path in ("/", "/healthz", "/api/v1/status", "/api/v1/auth/signin"):
        r = daemon.client().get(path, headers={"Host": "evil.example"})
        assert r.status_code == 421, (path, r.status_code)
    port = urlsplit(daemon.url).port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"{socket.gethostname()}:{port}"):
        assert daemon.client().get("/api/v1/status", headers={"Host": host}).status_code == 200, host


def test_huge_body_is_refused_early_without_memory(daemon: Daemon) -> None:
    size = 128 * 1024 * 1024
    pid = daemon.proc.pid
    before = vm_rss_kib(pid)
    u = urlsplit(daemon.url)
    # declared: refused on the headers, before a byte of the body is read
    t0 = time.monotonic()
    status, data = raw(daemon.url, (f"POST /api/v1/auth/signin HTTP/1.1\r\nHost: {u.netloc}\r\n"
                                    f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n").encode()
                       + b"[" * 65536)
    assert status == 413 and b"too_large" in data
    assert time.monotonic() - t0 < 5
    # undeclared (chunked): read up to the cap, then refused while the client is still sending
    sent = [0]

    def stream() -> int:
        with socket.create_connection((u.hostname, u.port), timeout=10) as s:
            s.sendall(f"POST /api/v1/auth/signin HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
                      "Transfer-Encoding: chunked\r\n\r\n".encode())
            chunk = b"%x\r\n" % (1 << 20) + b" " * (1 << 20) + b"\r\n"
            try:
                while sent[0] < size:
                    s.sendall(chunk)
                    sent[0] += 1 << 20
            except OSError:
                pass  # the kit closed the connection: what we want
            s.settimeout(5)
            try:
                return int(s.recv(4096).split(b" ", 2)[1])
            except (OSError, IndexError, ValueError):
                return 0

    t0 = time.monotonic()
    with ThreadPoolExecutor(1) as ex:
        status2 = ex.submit(stream).result(60)
    assert status2 in (413, 0) and sent[0] < size, (status2, sent[0])
    assert time.monotonic() - t0 < 10
    after = vm_rss_kib(pid)
    print(f"VmRSS before={before} KiB after={after} KiB sent_chunked={sent[0]} bytes")
    assert after - before < 32 * 1024, (before, after)  # the 128 MiB did not land in the daemon
    assert daemon.client().get("/api/v1/status").status_code == 200  # and it still serves


def test_bad_json_is_400_never_500(daemon: Daemon) -> None:
    c = daemon.signin()
    bodies = {b'{"nik": NaN}': "body_not_json", b'{"operator_id": "demo", "pin": Infinity}': "body_not_json",
              b"[" * 5000 + b"]" * 5000: "body_too_deep", b'{"nik": "32010115059000': "body_not_json",
              b"\xff\xfe": "body_not_json"}
    for path in ("/api/v1/enrollment", "/api/v1/auth/signin", "/api/v1/sim/commit"):
        for body, code in bodies.items():
            r = c.post(path, content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 400, (path, body[:20], r.status_code, r.text[:200])
            assert r.json()["detail"]["code"] == code
    # wrong types: 422 naming the field, not 500
    for body in ({"nik": 3201011505900001}, {"nik": None}, ["a"], "x", {"nik": {"a": [1.5e308 * 10]}}):
        r = c.post("/api/v1/enrollment", content=json.dumps(body).replace("Infinity", "1e999"),
                   headers={"Content-Type": "application/json"})
        assert r.status_code in (400, 422), (body, r.status_code, r.text[:200])
    r = c.post("/api/v1/sim/commit", json={"count": "many"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "count"


def _signin(url: str, pin: str) -> tuple[int, str]:
    r = httpx.post(url + "/api/v1/auth/signin", json={"operator_id": OPERATOR[0], "pin": pin}, timeout=60,
                   headers={"X-Rekam-Lang": "en"})  # the messages are matched in English
    return r.status_code, r.json()["detail"]["message"] if r.status_code != 200 else ""


def test_concurrent_wrong_pins_check_at_most_the_limit_and_the_lock_survives_a_restart(daemon: Daemon) -> None:
    start = threading.Barrier(40)

    def attempt(_: int) -> tuple[int, str]:
        start.wait(10)
        return _signin(daemon.url, "000000")

    with ThreadPoolExecutor(40) as ex:
        results = list(ex.map(attempt, range(40)))
    # A checked PIN answers "wrong ... PIN" (401, or 423 for the one that reached the limit); one refused
    # without a check answers "is locked after".
    checked = [r for r in results if r[0] == 401 or r[1].startswith("wrong PIN")]
    refused = [r for r in results if r[0] == 423 and "is locked after" in r[1]]
    print(f"checked={len(checked)} refused_unchecked={len(refused)}")
    assert len(checked) <= 5 and len(checked) + len(refused) == 40, results
    assert _signin(daemon.url, OPERATOR[1])[0] == 423  # locked, even with the right PIN
    daemon.rekamd.stop(10)
    daemon.rekamd.start()
    status, message = _signin(daemon.url, OPERATOR[1])
    assert status == 423 and "locked" in message  # a restart does not unlock
    assert (daemon.sd / "lockout.sqlite").exists()


def test_https_console_serves_the_advertised_fingerprint(make_daemon: Any) -> None:
    d: Daemon = make_daemon(api={"https_bind": "127.0.0.1", "https_port": 0})
    info = json.loads((d.sd / "api.json").read_text())
    u = urlsplit(info["https_url"])
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # self-signed: checked by its fingerprint
    with socket.create_connection((u.hostname, u.port), timeout=10) as s, \
            ctx.wrap_socket(s, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
        tls.sendall(f"GET /healthz HTTP/1.1\r\nHost: {u.netloc}\r\nConnection: close\r\n\r\n".encode())
        answer = tls.recv(4096)
    assert answer.startswith(b"HTTP/1.1 200")
    seen = hashlib.sha256(der).hexdigest()
    shown = d.client().get("/api/v1/tls").json()
    assert seen == info["tls_sha256"] == shown["sha256"]
    assert shown["fingerprint"].replace(":", "").lower() == seen
    qr = d.client().get("/api/v1/tls/qr.svg")
    assert qr.status_code == 200 and qr.text.lstrip().startswith("<svg")
    # the same certificate after a restart (the fingerprint operators learnt stays valid)
    d.rekamd.stop(10)
    d.rekamd.start()
    assert json.loads((d.sd / "api.json").read_text())["tls_sha256"] == seen
    # HTTPS has the same gate: a session is needed
    with httpx.Client(base_url=json.loads((d.sd / "api.json").read_text())["https_url"], verify=False) as c:
        assert c.get("/api/v1/status").status_code == 401


def test_plain_http_on_a_lan_address_is_a_config_error(tmp_path: Path, dc_keys: dict[str, Any],
                                                       corpus_dir: Path) -> None:
    cfg = write_config(tmp_path, dc_keys["pub_path"], corpus_dir, api={"bind": "0.0.0.0"})
    p = subprocess.run([*REKAMD, "--config", str(cfg), "--sim"], capture_output=True, text=True, timeout=60,
                       env=subprocess_env())
    assert p.returncode == 78, p.stderr[-2000:]
    assert "api.bind" in p.stderr + p.stdout and "loopback" in p.stderr + p.stdout
