"""Issue #13 finding 7: the console and local API against a hostile LAN client or web page.

Every attack goes over real HTTP (raw sockets where a client library would refuse to send it) to a
real `rekamd --sim`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from firmware.enrollment.operators import hash_pin
from tests.console.conftest import NIK_FEMALE, NIK_MALE, OPERATOR, SUPERVISOR, Daemon, enroll, write_config
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


def _signin(url: str, pin: str, source: str = "127.0.0.1") -> tuple[int, str]:
    """Sign in as the demo operator from the loopback address `source` (each address has its own budget of
    wrong PINs in the console's gate: tests/console/test_dos.py)."""
    with httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=60) as c:
        r = c.post(url + "/api/v1/auth/signin", json={"operator_id": OPERATOR[0], "pin": pin},
                   headers={"X-Rekam-Lang": "en"})  # the messages are matched in English
    return r.status_code, r.json()["detail"]["message"] if r.status_code != 200 else ""


def test_concurrent_wrong_pins_check_at_most_the_limit_and_the_lock_survives_a_restart(daemon: Daemon) -> None:
    # 20 at once (below the console's 24 concurrent requests), each from its own address (so the per-address
    # throttle of wrong PINs does not step in): the per-operator reservation alone must stop them.
    start = threading.Barrier(20)

    def attempt(i: int) -> tuple[int, str]:
        start.wait(10)
        return _signin(daemon.url, "000000", source=f"127.0.0.{10 + i}")

    with ThreadPoolExecutor(20) as ex:
        results = list(ex.map(attempt, range(20)))
    # A checked PIN answers "wrong ... PIN" (401, or 423 for the one that reached the limit); one refused
    # without a check answers "is locked after".
    checked = [r for r in results if r[0] == 401 or r[1].startswith("wrong PIN")]
    refused = [r for r in results if r[0] == 423 and "is locked after" in r[1]]
    print(f"checked={len(checked)} refused_unchecked={len(refused)}")
    assert len(checked) <= 5 and len(checked) + len(refused) == 20, results
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
        # its session cookie is Secure (never sent over plain HTTP); the loopback HTTP listener's is not
        r = c.post("/api/v1/auth/signin", json={"operator_id": OPERATOR[0], "pin": OPERATOR[1]})
        assert r.status_code == 200 and "secure" in r.headers["set-cookie"].lower()
    r = httpx.post(d.url + "/api/v1/auth/signin", json={"operator_id": OPERATOR[0], "pin": OPERATOR[1]})
    assert r.status_code == 200 and "secure" not in r.headers["set-cookie"].lower()


def test_plain_http_on_a_lan_address_is_a_config_error(tmp_path: Path, dc_keys: dict[str, Any],
                                                       corpus_dir: Path) -> None:
    cfg = write_config(tmp_path, dc_keys["pub_path"], corpus_dir, api={"bind": "0.0.0.0"})
    p = subprocess.run([*REKAMD, "--config", str(cfg), "--sim"], capture_output=True, text=True, timeout=60,
                       env=subprocess_env())
    assert p.returncode == 78, p.stderr[-2000:]
    assert "api.bind" in p.stderr + p.stdout and "loopback" in p.stderr + p.stdout


# --- another operator's resident; sessions after the operator list changes (security review) -----------------

SECOND = ("ani", "246810")  # a second operator (role operator)


def _with_second_operator(cfg: Path) -> Path:
    """Add operator `ani` (role operator) to the config's `[operators] list`."""
    entry = (f'  {{ id = "{SECOND[0]}", name = "Ani Operator", pin_hash = "{hash_pin(SECOND[1])}", '
             'role = "operator" },\n')
    cfg.write_text(cfg.read_text().replace("list = [\n", "list = [\n" + entry, 1))
    return cfg


def test_another_operator_sees_the_kit_busy_but_not_the_resident_nor_the_biometrics(
        tmp_path: Path, dc_keys: dict[str, Any], corpus_dir: Path, rekamd_factory: Any) -> None:
    """Signed in is not enough: previews (face, iris, fingers, signature) and the resident's NIK, birth date, sex and
    exception reasons go only to the enrollment's owner or a supervisor; another operator sees whose enrollment
    it is and its step (the console's "wait for ..."), and each refused preview is audited."""
    cfg = write_config(tmp_path, dc_keys["pub_path"], corpus_dir, fingers=["R1", "R2"], dedup=["R1"],
                       extra="[iris]\ncapture_iris = true\ncapture_signature = true\n")  # every kind of preview
    d = Daemon(rekamd_factory(_with_second_operator(cfg)), tmp_path)
    demo, ani, spv = d.signin(OPERATOR), d.signin(SECOND), d.signin(SUPERVISOR)
    assert demo.post("/api/v1/enrollment", json={"nik": NIK_FEMALE}).status_code == 200
    r = demo.post("/api/v1/enrollment/fingers/R2/exception", json={"reason": "amputated"})
    assert r.status_code == 200, r.text
    state = enroll(demo, NIK_FEMALE, commit=False, start=False)
    assert state["step"] == "review" and state["nik"] == NIK_FEMALE, state
    names = [state["face"]["preview"], state["signature"]["preview"], *[i["preview"] for i in state["irises"]],
             *[f["preview"] for f in state["fingers"] if f["preview"]]]
    assert {"face-last.jpg", "finger-R1.png", "iris-left.jpg", "signature.png"} <= set(names), names
    for name in names:
        r = ani.get(f"/api/v1/enrollment/preview/{name}")
        assert r.status_code == 403 and r.json()["detail"]["code"] == "not_owner", (name, r.status_code)
        assert r.json()["detail"]["owner"] == "demo" and not r.content.startswith((b"\xff\xd8", b"\x89PNG"))
        mine, sup = demo.get(f"/api/v1/enrollment/preview/{name}"), spv.get(f"/api/v1/enrollment/preview/{name}")
        assert mine.status_code == sup.status_code == 200 and mine.content == sup.content, name
        assert mine.content[:4] in (b"\x89PNG", b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xdb"), name
    r = ani.get("/api/v1/enrollment")
    assert r.status_code == 200, r.text
    busy = r.json()
    assert busy["active"] and busy["operator_id"] == "demo" and busy["operator_name"] == "Demo Operator"
    assert busy["step"] == "review" and busy["nik_masked"] == NIK_FEMALE[:6] + "******" + NIK_FEMALE[12:]
    assert not {"nik", "birth_date", "female", "override_reason", "supervisor"} & set(busy), busy
    for secret in (NIK_FEMALE, "1990-05-15", "amputated", ".jpg", ".png"):
        assert secret not in r.text, secret
    assert [f["exception"] for f in busy["fingers"]] == [False, True]  # the console's step list still shows it
    full = spv.get("/api/v1/enrollment").json()  # a supervisor sees it all, as the owner does
    assert (full["nik"], full["birth_date"], full["female"]) == (NIK_FEMALE, "1990-05-15", True)
    assert full == demo.get("/api/v1/enrollment").json()
    refused = [e for e in spv.get("/api/v1/audit", params={"limit": 1000}).json() if e["kind"] == "not_owner"]
    assert [e["actor"] for e in refused] == ["ani"] * len(names)
    # Once stored, the receipt (record id, hash, what was captured) is shown again to its operator and a supervisor,
    # not to whoever signs in next.
    rid = demo.post("/api/v1/enrollment/commit").json()["record_id"]
    assert ani.get("/api/v1/enrollment").json() == {"active": False, "last_receipt": None}
    assert rid not in ani.get("/api/v1/enrollment").text
    assert demo.get("/api/v1/enrollment").json()["last_receipt"]["record_id"] == rid
    assert spv.get("/api/v1/enrollment").json()["last_receipt"]["record_id"] == rid


def test_a_supervisor_may_not_accept_a_likely_double_enrollment_they_captured(make_daemon: Any) -> None:
    """Four eyes on a flagged enrollment: the supervisor who captured it may reject it but not accept it."""
    d = make_daemon(fingers=["R2"], dedup=["R2"])
    demo, spv = d.signin(OPERATOR), d.signin(SUPERVISOR)
    first = enroll(demo, NIK_MALE)["record_id"]
    again = "3578011111800004"
    assert d.client().post("/api/v1/sim/alias", json={"nik": again, "same_person_as": NIK_MALE}).status_code == 200
    assert enroll(spv, again, commit=False)["step"] == "supervisor"
    r = spv.post("/api/v1/enrollment/supervisor", json={"supervisor_id": "spv", "pin": SUPERVISOR[1],
                                                        "decision": "accept", "reason": "twins"})
    assert r.status_code == 403 and r.json()["detail"]["code"] == "own_enrollment", r.text
    assert "supervisor lain" in r.json()["detail"]["message"]  # Indonesian: ask another supervisor
    assert spv.get("/api/v1/enrollment").json()["step"] == "supervisor"  # still waiting, nothing stored
    assert [row["id"] for row in spv.get("/api/v1/records").json()] == [first]
    r = spv.post("/api/v1/enrollment/supervisor", json={"supervisor_id": "spv", "pin": SUPERVISOR[1],
                                                        "decision": "reject", "reason": "same person"})
    assert r.status_code == 200 and r.json()["active"] is False, r.text


@pytest.fixture
def kit(tmp_path: Path, dc_keys: dict[str, Any], corpus_dir: Path) -> Iterator[Any]:
    """A simulated kit running in this process (store, enrollment, console API on a free port), so a test can
    replace its operator list as the fleet does (`set_operators`, live `operators.list`)."""
    from firmware import config
    from firmware.daemon import Kit

    cfg = write_config(tmp_path, dc_keys["pub_path"], corpus_dir, fingers=["R1"], dedup=["R1"])
    k = Kit(config.load(cfg), sim=True)
    k.start()
    try:
        yield k
    finally:
        k.shutdown()


def _client(kit: Any, who: tuple[str, str]) -> httpx.Client:
    c = httpx.Client(base_url=kit.api_url, timeout=60)
    r = c.post("/api/v1/auth/signin", json={"operator_id": who[0], "pin": who[1]})
    assert r.status_code == 200, r.text
    c.headers["Authorization"] = f"Bearer {r.json()['token']}"
    return c


def _signed_out(c: httpx.Client) -> bool:
    """The session is over: /auth/me says so and a request gets the ordinary 401 not_signed_in."""
    r = c.get("/api/v1/enrollment")
    return (c.get("/api/v1/auth/me").json() == {"signed_in": False} and r.status_code == 401
            and r.json()["detail"]["code"] == "not_signed_in")


def test_sessions_end_when_the_operator_is_removed_demoted_or_gets_a_new_pin(kit: Any,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    """A session holds only while its operator's id, role and PIN are the ones it signed in with: each change of
    the operator list ends it (audited, logged for journalctl). The enrollment in progress is kept: its operator
    may sign in again (new PIN) and go on; after its operator is removed a supervisor stores (or cancels) it."""
    caplog.set_level(logging.INFO, logger="firmware.enrollment.session")
    svc = kit.enrollment
    ops = svc.operators
    demo_op, spv_op = ops.by_id["demo"], ops.by_id["spv"]
    demo, spv = _client(kit, OPERATOR), _client(kit, SUPERVISOR)
    state = enroll(demo, NIK_MALE, commit=False)
    assert state["step"] == "review"
    enrollment = state["id"]

    # A new PIN for demo: the old session ends; the enrollment waits; the old PIN no longer signs in, the new does.
    new_pin = "112233"
    demo_new = replace(demo_op, pin_hash=hash_pin(new_pin))
    ops.replace([demo_new, spv_op])
    assert _signed_out(demo)
    assert demo.post("/api/v1/enrollment/commit").status_code == 401
    assert svc.active is not None and svc.active.id == enrollment
    assert httpx.post(kit.api_url + "/api/v1/auth/signin", json={"operator_id": "demo", "pin": OPERATOR[1]}
                      ).status_code == 401
    demo = _client(kit, ("demo", new_pin))
    assert demo.get("/api/v1/enrollment").json()["nik"] == NIK_MALE  # still theirs, at review
    assert spv.get("/api/v1/auth/me").json()["role"] == "supervisor"  # the others' sessions are untouched

    # The supervisor is demoted: no more supervisor rights, not even through the session they already had.
    ops.replace([demo_new, replace(spv_op, role="operator")])
    assert _signed_out(spv) and spv.post("/api/v1/enrollment/cancel").status_code == 401
    spv = _client(kit, SUPERVISOR)
    assert spv.get("/api/v1/auth/me").json()["role"] == "operator"
    r = spv.post("/api/v1/enrollment/cancel")
    assert r.status_code == 403 and r.json()["detail"]["code"] == "not_owner"
    assert spv.get("/api/v1/enrollment/preview/face-last.jpg").status_code == 403

    # demo is removed mid-enrollment (supervisor restored): nothing captured is lost; a supervisor stores it.
    ops.replace([spv_op])
    assert _signed_out(demo) and _signed_out(spv)  # spv's operator-role session ended by the role change back
    assert svc.active is not None and svc.active.id == enrollment and svc.active.previews
    spv = _client(kit, SUPERVISOR)
    assert spv.get("/api/v1/enrollment").json()["nik"] == NIK_MALE
    r = spv.post("/api/v1/enrollment/commit")
    assert r.status_code == 200, r.text
    assert kit.store.record(r.json()["record_id"]) is not None and svc.active is None

    ended = [e for e in spv.get("/api/v1/audit", params={"limit": 1000}).json() if e["kind"] == "signout"]
    assert [(e["actor"], e["detail"]["reason"]) for e in reversed(ended)] == [
        ("demo", "pin_changed"), ("spv", "role_changed"), ("demo", "operator_removed"), ("spv", "role_changed")]
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "firmware.enrollment.session"]
    assert "operator session ended operator=demo role=operator reason=operator_removed" in lines
    assert "operator session ended operator=spv role=supervisor reason=role_changed" in lines
    assert (f"enrollment kept for its operator or a supervisor enrollment={enrollment} operator=demo "
            "reason=operator_removed step=review") in lines


def test_an_enrollment_left_by_a_removed_operator_ends_after_the_idle_time(kit: Any) -> None:
    """The office removes an operator mid-enrollment and no supervisor comes: the kit is not blocked for ever. After
    `idle_signout_s` with nobody acting on it, the enrollment is cancelled (audited) and a new one may start."""
    svc = kit.enrollment
    demo = _client(kit, OPERATOR)
    assert enroll(demo, NIK_MALE, commit=False)["step"] == "review"
    svc.operators.replace([svc.operators.by_id["spv"]])
    assert _signed_out(demo)
    real, idle = svc.clock, svc.cfg.operators.idle_signout_s
    svc.expire_idle()
    assert svc.active is not None  # kept: a supervisor may still store it
    t0 = real()
    svc.clock = lambda: t0 + idle + 1
    try:
        svc.expire_idle()
    finally:
        svc.clock = real
    assert svc.active is None
    spv = _client(kit, SUPERVISOR)
    cancels = [e for e in spv.get("/api/v1/audit", params={"limit": 1000}).json() if e["kind"] == "enrollment_cancel"]
    assert cancels and cancels[0]["detail"]["reason"].startswith("abandoned"), cancels
    assert spv.post("/api/v1/enrollment", json={"nik": NIK_FEMALE}).status_code == 200  # the kit is free again
