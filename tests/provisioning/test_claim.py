"""Claim end to end against the real broker: pending until approved, then the kit's own certificate."""

from __future__ import annotations

import base64
import json
import logging
import secrets
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware import __version__
from firmware.control.claim import ControlPaths
from firmware.errors import FleetError
from firmware.wire import control_protocol as cp
from provisioning import ca
from provisioning.registry import Fleet
from tests.support import rekam

from .conftest import wait_for


def test_claim_pending_then_approved(new_kit, fleet, service) -> None:
    k = new_kit(allow=False)
    kit_id = k.identity.kit_id
    ctl = k.start_control()
    row = wait_for(lambda: fleet.kit(kit_id), 10, "claim reaches the fleet")
    assert row["state"] == "pending"
    assert row["public_key"] == k.identity.public_key_b64
    assert row["hardware_serial"] == "10000000deadbeef"
    assert not ControlPaths.of(k.cfg).provisioned()
    fleet.approve(kit_id)
    wait_for(ctl.connected.is_set, 20, "kit connects with its own certificate")
    paths = ControlPaths.of(k.cfg)
    assert paths.fleet_key.read_text() == fleet.public_key_b64  # pinned
    # ... with the fleet CA's certificate for it, which root's pin (rekam-fleet-pin.service) checks
    assert paths.fleet_key_cert.read_text() == fleet.ca.fleet_key_crt.read_text()
    pin = Path(k.cfg.source).parent / "pin" / "fleet.pub"
    r = rekam("update", "pin-fleet-key", "--json", "--fleet-pin", str(pin), cfg=Path(k.cfg.source))
    assert r.returncode == 0 and json.loads(r.stdout)["certified"] is True, r.stdout + r.stderr
    assert pin.read_text().strip() == fleet.public_key_b64
    assert (paths.tls_key.stat().st_mode & 0o777) == 0o600
    # The certificate is for the kit's own key, made on the kit: the fleet never saw the private key.
    assert b"PRIVATE" not in paths.cert.read_bytes()
    # Initial config v1 (from the claim) is applied and reported.
    wait_for(lambda: json.loads(fleet.kit(kit_id)["config_state"] or "{}").get("running") == 1, 10,
             "kit reports config v1")
    wait_for(lambda: fleet.kit(kit_id)["telemetry"], 10, "telemetry arrives")
    t = json.loads(fleet.kit(kit_id)["telemetry"])
    assert t["kit_id"] == kit_id and {m["name"] for m in t["media"]} == {"sd", "usb"}
    assert t["versions"]["config"] == 1 and t["halted"] is False


def test_claim_response_forged_by_wrong_key_is_refused(new_kit, fleet, tmp_path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from firmware.control.claim import ClaimError, check_response, ensure_tls_key

    k = new_kit(allow=False, fleet_public_key=fleet.public_key_b64)
    paths = ControlPaths.of(k.cfg)
    ensure_tls_key(paths, k.identity.kit_id)
    evil = Ed25519PrivateKey.generate()
    body = {"kit_id": k.identity.kit_id, "nonce": "n1", "status": "pending", "reason": "",
            "fleet_public_key": cp.public_b64(evil)}
    try:
        check_response(cp.sign("claim_response", body, evil), k.cfg, k.identity, paths, "n1")
        raise AssertionError("a response from another fleet key was accepted")
    except ClaimError as e:
        assert e.reason == "wrong_fleet_key"


def test_claim_with_relay_brokers_only(new_kit, fleet, broker, service) -> None:
    """No [control] brokers: the control plane uses the relay's mqtts:// brokers, and after the claim
    the daemon restarts so the relay runs with the kit certificate."""
    from firmware.control.plane import EX_RESTART, control_brokers

    k = new_kit(brokers=[], extra=f'[relay]\nbrokers = ["mqtts://127.0.0.1:{broker.port}"]\n')
    assert control_brokers(k.cfg) == [f"127.0.0.1:{broker.port}"]
    assert k.cfg.relay.cert_file == ""
    k.start_control()
    assert k.exited.wait(20) and k.exits == [EX_RESTART]
    k2 = k.restart()
    paths = ControlPaths.of(k2.cfg)
    assert (k2.cfg.relay.cert_file, k2.cfg.relay.key_file) == (str(paths.cert), str(paths.tls_key))
    ctl = k2.start_control()
    wait_for(ctl.connected.is_set, 10, "connected through the relay's broker list")
    k2.stop()


def test_rekam_provision_claim_and_status(tmp_path, fleet, broker, service, capsys, monkeypatch) -> None:
    """A technician claims a kit at the bench (daemon stopped) with `rekam provision claim`."""
    from firmware.cli import main as cli
    from firmware.seal import identity
    from firmware.system import i18n

    monkeypatch.setenv("REKAM_LANG", "en")  # the checks read the English text (the kit speaks Indonesian)
    monkeypatch.setattr(i18n, "_default", i18n.DEFAULT_LANGUAGE)  # main() sets the process's language: undone after

    from .conftest import write_kit_config

    cfg = write_kit_config(tmp_path / "bench", fleet, broker)
    assert cli.main(["--config", str(cfg), "provision", "status"]) == 0
    assert "NOT claimed" in capsys.readouterr().out
    # Not approved: gives up after the attempts asked for, exit 3.
    assert cli.main(["--config", str(cfg), "provision", "claim", "--attempts", "1"]) == 3
    kid = identity.load(tmp_path / "bench" / "state").kit_id
    assert fleet.kit(kid)["state"] == "pending"
    fleet.approve(kid)
    assert cli.main(["--config", str(cfg), "provision", "claim", "--attempts", "3"]) == 0
    assert "claimed; config v1 stored" in capsys.readouterr().out
    assert cli.main(["--config", str(cfg), "provision", "status", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["claimed"] and st["kit_id"] == kid and st["config"]["current"] == 1
    assert st["fleet_key"] == cp.key_fingerprint(fleet.public_key_b64)
    assert st["certificate"]["subject"].startswith(f"CN={kid},")


def _unsigned_claim_response(body: dict[str, Any]) -> bytes:
    """A claim response envelope with an empty signature (anyone on the claim listener can send one)."""
    return cp.canonical({"v": cp.VERSION, "kind": "claim_response", "body": body, "sig": ""})


def test_an_approved_answer_needs_the_fleet_key_certified_by_the_images_ca(new_kit, fleet, tmp_path) -> None:
    """No trust on first claim: a rogue that can answer on the claim topic (its own fleet key, its own CA, a real
    certificate for the kit's CSR) is refused unless the fleet CA of the image (`control.ca_file`) certified the key
    that signed the answer; the genuine fleet's certificate (public, copied) does not certify another key."""
    from firmware.control.claim import ClaimError, check_response, ensure_tls_key

    k = new_kit(allow=False)
    paths = ControlPaths.of(k.cfg)
    csr = ensure_tls_key(paths, k.identity.kit_id)
    rogue_ca = ca.init_ca(tmp_path / "rogue-ca", ["127.0.0.1"], batch="test")
    rogue = Ed25519PrivateKey.generate()
    kit_cert, _ = ca.sign_csr(rogue_ca, csr, k.identity.kit_id)

    def answer(key: Ed25519PrivateKey, **over: Any) -> bytes:
        body = {"kit_id": k.identity.kit_id, "nonce": "n1", "status": "approved", "reason": "",
                "fleet_public_key": cp.public_b64(key), "certificate": kit_cert.decode(),
                "ca_certificate": rogue_ca.fleet_ca_crt.read_text(), "config": "{}",
                "fleet_key_certificate": ca.certify_fleet_key(rogue_ca, key.public_key()).decode(), **over}
        return cp.sign("claim_response", {k2: v for k2, v in body.items() if v is not None}, key)

    for data, match in ((answer(rogue), "not issued by the fleet CA of this kit"),
                        (answer(rogue, fleet_key_certificate=fleet.ca.fleet_key_crt.read_text()),
                         "not the fleet key offered"),
                        (answer(rogue, fleet_key_certificate="junk"), "not a PEM certificate")):
        with pytest.raises(ClaimError) as e:
            check_response(data, k.cfg, k.identity, paths, "n1")
        assert e.value.reason == "uncertified_fleet_key" and match in str(e.value), str(e.value)
    with pytest.raises(ClaimError) as e:
        check_response(answer(rogue, fleet_key_certificate=None), k.cfg, k.identity, paths, "n1")
    assert e.value.reason == "bad_response" and "fleet_key_certificate" in str(e.value), str(e.value)
    # the same answer from the genuine fleet key with its certificate passes (kit certificate of another CA aside,
    # which the TLS connection after the claim would refuse)
    assert check_response(answer(fleet.key, fleet_key_certificate=fleet.ca.fleet_key_crt.read_text()), k.cfg,
                          k.identity, paths, "n1")["status"] == "approved"
    assert not paths.fleet_key.exists() and not paths.fleet_key_cert.exists()


@pytest.mark.parametrize("bad_key", ["abc", "!!!!not-base64", base64.b64encode(b"\x01" * 31).decode()],
                         ids=["bad_padding", "not_alphabet", "31_bytes"])
@pytest.mark.parametrize("preset", [True, False], ids=["preset_key", "first_claim"])
def test_claim_response_with_a_malformed_fleet_key_is_refused_not_raised(new_kit, fleet, bad_key: str,
                                                                          preset: bool) -> None:
    """A junk `fleet_public_key` in an unsigned response is refused as a bad response naming the field; it never
    escapes `check_response` (binascii.Error "Incorrect padding" used to end the control thread)."""
    from firmware.control.claim import ClaimError, check_response, ensure_tls_key

    k = new_kit(allow=False, **({"fleet_public_key": fleet.public_key_b64} if preset else {}))
    paths = ControlPaths.of(k.cfg)
    ensure_tls_key(paths, k.identity.kit_id)
    body = {"kit_id": k.identity.kit_id, "nonce": "n1", "status": "pending", "reason": "", "fleet_public_key": bad_key}
    with pytest.raises(ClaimError) as e:
        check_response(_unsigned_claim_response(body), k.cfg, k.identity, paths, "n1")
    assert e.value.reason == "bad_response" and "fleet_public_key" in str(e.value), str(e.value)


def test_claim_with_a_malformed_preset_fleet_key_names_the_setting(new_kit, fleet) -> None:
    """A typo in `control.fleet_public_key` is a ClaimError naming the setting (logged, retried), not a crash."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from firmware.control.claim import ClaimError, check_response, ensure_tls_key

    k = new_kit(allow=False, fleet_public_key="abc")
    paths = ControlPaths.of(k.cfg)
    ensure_tls_key(paths, k.identity.kit_id)
    key = Ed25519PrivateKey.generate()
    body = {"kit_id": k.identity.kit_id, "nonce": "n1", "status": "pending", "reason": "",
            "fleet_public_key": cp.public_b64(key)}
    with pytest.raises(ClaimError) as e:
        check_response(cp.sign("claim_response", body, key), k.cfg, k.identity, paths, "n1")
    assert e.value.reason == "bad_fleet_key" and "control.fleet_public_key" in str(e.value), str(e.value)


# --- the fleet's claim rules against hostile claimants (anyone holding the batch claim certificate) ---------------
# Each test has its own fleet folder and calls `Fleet.handle_claim` as the fleet service does (no broker needed:
# the broker only carries the claim; what is decided here is what the fleet signs).


def _own_fleet(tmp_path: Path, registry: str | None = None, **settings: Any) -> Fleet:
    f = Fleet.init(tmp_path / "own-fleet", ["127.0.0.1:1"], ["127.0.0.1:2"], ["127.0.0.1"], batch="test",
                   registry=registry)
    f.settings.update(settings)
    return f


class Claimant:
    """Whoever sends claims: a kit id, an Ed25519 key (signs the claim), a TLS key (the CSR), what it says."""

    def __init__(self, kit_id: str, serial: str = "10000000cafe0001") -> None:
        self.kit_id, self.serial = kit_id, serial
        self.key = Ed25519PrivateKey.generate()
        self.tls = ec.generate_private_key(ec.SECP256R1())

    @property
    def fingerprint(self) -> str:
        """As `rekam identity show` prints it on the kit (firmware.cli.identity.fingerprint)."""
        from firmware.cli.identity import fingerprint

        return fingerprint(cp.public_raw(self.key))

    def claim(self, kit_id: str | None = None, **over: Any) -> tuple[str, bytes]:
        kid = kit_id or self.kit_id
        body = {"kit_id": kid, "public_key": cp.public_b64(self.key), "hardware_serial": self.serial,
                "software_version": __version__, "csr": ca.make_csr(kid, self.tls).decode(),
                "nonce": secrets.token_hex(16), "issued_at": int(time.time()), **over}
        return cp.claim_request_topic("claim-test", kid), cp.sign("claim", body, self.key)


def _ask(f: Fleet, claim: tuple[str, bytes]) -> dict[str, Any] | None:
    ans = f.handle_claim(*claim)
    return None if ans is None else cp.verify(ans[1], "claim_response", cp.load_public_b64(f.public_key_b64))


def _allow(f: Fleet, *lines: str) -> None:
    (f.data / "allowlist.txt").write_text("".join(ln + "\n" for ln in lines))


def _serial_of(answer: dict[str, Any]) -> str:
    return format(x509.load_pem_x509_certificate(answer["certificate"].encode()).serial_number, "x")


def _revoked(f: Fleet) -> list[str]:
    return [e["serial"] for e in json.loads(f.ca.issued.read_text()) if e["revoked_at"]]


def test_a_plain_allowlist_serial_approves_one_kit_ever_not_every_kit_id_that_names_it(tmp_path) -> None:
    """F1: the serial is what the claimant says. A line without a fingerprint approves the first kit naming it (the
    old files keep working) and none after: the next kit id with that serial waits for a human."""
    f = _own_fleet(tmp_path)
    _allow(f, "10000000cafe0001  # a plain line, as before")
    first, thief = Claimant("rk-first1"), Claimant("rk-thief1")
    assert _ask(f, first.claim())["status"] == "approved"
    for n in range(3):  # any number of kit ids, one serial
        ans = _ask(f, thief.claim(f"rk-thief{n}"))
        assert ans["status"] == "pending" and "certificate" not in ans, ans
        assert f.kit(f"rk-thief{n}")["state"] == "pending"
    assert f.db.execute("SELECT kit_id FROM allowlist_uses").fetchall()[0][0] == "rk-first1"
    # A plain serial line never approves by a serial another kit registered (even before the line was used).
    _allow(f, "10000000cafe0002")
    f.db.execute("UPDATE kits SET hardware_serial = '10000000cafe0002' WHERE kit_id = 'rk-thief0'")
    assert _ask(f, Claimant("rk-later1", "10000000cafe0002").claim())["status"] == "pending"
    f.close()


def test_an_allowlist_line_with_the_kit_key_fingerprint_approves_only_that_key(tmp_path) -> None:
    """F1: ``KIT_ID FINGERPRINT`` (what `rekam identity show` prints) approves only a claim signed by that key. A
    claimant naming the kit id with its own key is refused and stored nowhere, so the real kit is not locked out
    ("registered with another key"); one that got in first as pending (before the line was written) is replaced."""
    f = _own_fleet(tmp_path)
    real, thief = Claimant("rk-real01"), Claimant("rk-real01")
    other = Claimant("rk-real02")
    _allow(f, f"rk-real01 {real.fingerprint}", f"10000000cafe0009 {other.fingerprint.upper().replace('-', '')}")
    ans = _ask(f, thief.claim())
    assert ans["status"] == "rejected" and "another key" in ans["reason"] and f.kit("rk-real01") is None
    ans = _ask(f, real.claim())
    assert ans["status"] == "approved" and f.kit("rk-real01")["public_key"] == cp.public_b64(real.key)
    # A serial line with a fingerprint: the serial alone (another key, any kit id) approves nothing.
    other.serial = thief.serial = "10000000cafe0009"
    assert _ask(f, thief.claim("rk-thief9"))["status"] == "pending"
    assert _ask(f, other.claim())["status"] == "approved"
    # A squatter's pending claim made before the line existed gives way to the key the line names.
    late, squatter = Claimant("rk-late01"), Claimant("rk-late01")
    assert _ask(f, squatter.claim())["status"] == "pending"
    _allow(f, f"rk-late01 {late.fingerprint}")
    assert _ask(f, late.claim())["status"] == "approved"
    assert _ask(f, squatter.claim())["status"] == "rejected"
    # A line that is neither NAME nor NAME FINGERPRINT approves nothing.
    odd = Claimant("rk-odd001")
    _allow(f, f"rk-odd001 {odd.fingerprint} extra", "rk-odd001 not-a-fingerprint")
    assert _ask(f, odd.claim())["status"] == "pending"
    f.close()


def test_a_reclaim_with_the_same_key_gets_the_same_certificate_and_revokes_nothing(tmp_path) -> None:
    """F2: the kit whose answer was lost asks again (a new nonce): the certificate it was given, nothing signed,
    nothing revoked, issued.json and the CRL untouched. The last claim again (a replay: its nonce) is not answered,
    an earlier one gets the same certificate again; neither changes anything."""
    f = _own_fleet(tmp_path)
    kit = Claimant("rk-again01")
    _allow(f, f"rk-again01 {kit.fingerprint}")
    first_claim = kit.claim(issued_at=int(time.time()) - 10)
    first = _ask(f, first_claim)
    assert first["status"] == "approved"
    issued, crl = f.ca.issued.read_bytes(), f.ca.crl.read_bytes()
    for _ in range(3):
        last_claim = kit.claim()
        again = _ask(f, last_claim)
        assert again["status"] == "approved" and again["certificate"] == first["certificate"]
    assert f.handle_claim(*last_claim) is None  # the replay of the last one
    assert _ask(f, first_claim)["certificate"] == first["certificate"]  # and of an earlier one
    assert f.ca.issued.read_bytes() == issued and f.ca.crl.read_bytes() == crl and _revoked(f) == []
    assert f.kit("rk-again01")["cert_serial"] == _serial_of(first)
    f.close()


def test_a_new_tls_key_is_reissued_at_most_every_ten_minutes_and_old_claims_are_refused(tmp_path) -> None:
    """F2: a kit that lost its TLS key gets a certificate for the new one (the old one revoked), but not more
    often than `CLAIM_REISSUE_EVERY_S`; a claim with another key older than the last answered one is refused. A
    kit whose clock is far off (a Pi before chrony set it) still claims."""
    f = _own_fleet(tmp_path)
    kit = Claimant("rk-rekey01")
    _allow(f, f"rk-rekey01 {kit.fingerprint}")
    first = _ask(f, kit.claim())
    kit.tls = ec.generate_private_key(ec.SECP256R1())
    ans = _ask(f, kit.claim())
    assert ans["status"] == "rejected" and "retry later" in ans["reason"] and _revoked(f) == []
    f.db.execute("UPDATE claim_certs SET issued_at = issued_at - ?", (Fleet.CLAIM_REISSUE_EVERY_S + 1,))
    second = _ask(f, kit.claim())
    assert second["status"] == "approved" and _serial_of(second) != _serial_of(first)
    assert _revoked(f) == [_serial_of(first)]
    assert _ask(f, kit.claim(issued_at=int(time.time()) - 5))["status"] == "approved"  # same key: its cert again
    f.db.execute("UPDATE claim_certs SET issued_at = issued_at - ?", (Fleet.CLAIM_REISSUE_EVERY_S + 1,))
    kit.tls = ec.generate_private_key(ec.SECP256R1())
    stale = kit.claim(issued_at=int(time.time()) - 60)  # another key, older than the last answered claim
    ans = _ask(f, stale)
    assert ans["status"] == "rejected" and "older" in ans["reason"]
    assert _revoked(f) == [_serial_of(first)]
    for off in (-40 * 365 * 86400, 86400):  # booted at 1970, or a day ahead: claims all the same
        ans = _ask(f, Claimant(f"rk-clock{abs(off) % 97}").claim(issued_at=int(time.time()) + off))
        assert ans["status"] == "pending", ans
    f.close()


@pytest.mark.parametrize("field,value", [("hardware_serial", "1000\nclaim received kit_id=rk-x state=approved"),
                                         ("hardware_serial", "1" * 65), ("hardware_serial", "10\x1b[2J00"),
                                         ("software_version", "0." * 17)])
def test_claim_strings_must_be_short_printable_text(tmp_path, caplog, field: str, value: str) -> None:
    """F3/F6: a serial with a newline forged a whole log line; a long one filled the registry. Refused, not stored,
    and logged escaped."""
    f = _own_fleet(tmp_path)
    with caplog.at_level(logging.INFO, "provisioning.registry"):
        ans = _ask(f, Claimant("rk-string1").claim(**{field: value}))
    assert ans["status"] == "rejected" and field in ans["reason"] and f.kit("rk-string1") is None
    assert all("\n" not in r.getMessage() and "\x1b" not in r.getMessage() for r in caplog.records)
    f.close()


def test_claims_do_not_scan_the_kits_and_pending_claims_are_capped(tmp_path, caplog, monkeypatch) -> None:
    """F3: the expiry is an index search, not run on every claim; beyond `claim_max_pending` a new claim is refused
    and not stored, said once (not a log line and an event per claim); an allowlisted kit still gets in."""
    f = _own_fleet(tmp_path, claim_max_pending=3)
    plan = " ".join(str(r[-1]) for r in f.db.execute(
        "EXPLAIN QUERY PLAN DELETE FROM kits WHERE state = 'pending' AND claimed_at < 0"))
    assert "INDEX kits_pending" in plan, plan
    expiries: list[int] = []
    real = f.expire_claims
    monkeypatch.setattr(f, "expire_claims", lambda now=None: expiries.append(1) or real(now))
    events = f.db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    with caplog.at_level(logging.WARNING, "provisioning.registry"):
        answers = [_ask(f, Claimant(f"rk-flood{n:03d}").claim()) for n in range(20)]
    assert [a["status"] for a in answers] == ["pending"] * 3 + ["rejected"] * 17
    assert "retry later" in answers[-1]["reason"] and f.kit("rk-flood019") is None
    assert len(expiries) <= 1
    assert len([r for r in caplog.records if "pending_full" in r.getMessage()]) == 1
    assert f.db.execute("SELECT COUNT(*) FROM events").fetchone()[0] - events == 3  # the three stored claims
    kit = Claimant("rk-allowed1")
    _allow(f, f"rk-allowed1 {kit.fingerprint}")
    assert _ask(f, kit.claim())["status"] == "approved"
    f.close()


def test_refused_claims_write_one_event_a_minute_and_old_events_are_pruned(tmp_path) -> None:
    """F3: every refusal was an events row (up to 4,000 characters), never deleted. Now one per kind of refusal
    per minute, and the log keeps the newest ``events_keep`` rows of at most ``events_keep_days`` days."""
    f = _own_fleet(tmp_path, events_keep=50)
    f.EVENTS_PRUNE_EVERY = 10
    kit = Claimant("rk-refused1")
    for _ in range(30):
        assert f.handle_claim(cp.claim_request_topic("claim-stolen", "rk-refused1"), kit.claim()[1]) is None
    refused = f.db.execute("SELECT COUNT(*) FROM events WHERE kind = 'claim_refused'").fetchone()[0]
    assert refused == 1
    f.db.execute("INSERT INTO events (at, kit_id, kind, detail) VALUES (?, NULL, 'ancient', '{}')",
                 (int(time.time()) - 91 * 86400,))
    for n in range(200):
        f.event("test_event", None, n=n)
    assert f.db.execute("SELECT COUNT(*) FROM events").fetchone()[0] <= 60
    assert f.db.execute("SELECT COUNT(*) FROM events WHERE kind = 'ancient'").fetchone()[0] == 0
    assert f.db.execute("SELECT MAX(id) FROM events").fetchone()[0] >= 200  # the newest are the ones kept
    f.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_claim_rules_hold_on_both_registry_backends(tmp_path, request, backend: str) -> None:
    """The claim tables and indexes come with the schema of either backend (SQLite at open, PostgreSQL migration 3):
    one use of a plain line, the same certificate again, pruning."""
    registry = None if backend == "sqlite" else request.getfixturevalue("pg_database")
    f = _own_fleet(tmp_path, registry, events_keep=5)
    f.EVENTS_PRUNE_EVERY = 1
    _allow(f, "rk-both001")
    kit = Claimant("rk-both001")
    first = _ask(f, kit.claim())
    assert first["status"] == "approved"
    assert _ask(f, kit.claim())["certificate"] == first["certificate"]
    assert _ask(f, Claimant("rk-both001").claim())["status"] == "rejected"  # another key
    f.db.execute("DELETE FROM kits WHERE kit_id = 'rk-both001'")  # even if the kit's row went: the line is used
    assert _ask(f, Claimant("rk-both001").claim())["status"] == "pending"
    for n in range(20):
        f.event("test_event", None, n=n)
    assert f.db.execute("SELECT COUNT(*) FROM events").fetchone()[0] <= 6
    f.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_big_event_backlog_is_pruned_in_bounded_steps(tmp_path, request, backend: str) -> None:
    """A fleet.db from before pruning (millions of rows) was pruned by its first event in one delete: one write
    transaction holding every other writer of the registry. Now at most EVENTS_PRUNE_MAX rows per prune, in
    statements of EVENTS_PRUNE_BATCH, continued at the next event until done; the old rows go first."""
    registry = None if backend == "sqlite" else request.getfixturevalue("pg_database")
    f = _own_fleet(tmp_path, registry, events_keep=10)
    f.EVENTS_PRUNE_BATCH, f.EVENTS_PRUNE_MAX = 7, 30
    now = int(time.time())
    for at in [now - 100 * 86400] * 50 + [now] * 40:
        f.db.execute("INSERT INTO events (at, kit_id, kind, detail) VALUES (?, NULL, ?, '{}')",
                     (at, "ancient" if at < now else "recent"))

    def count(kind: str | None = None) -> int:
        if kind is None:
            return int(f.db.execute("SELECT COUNT(*) FROM events").fetchone()[0])
        return int(f.db.execute("SELECT COUNT(*) FROM events WHERE kind = ?", (kind,)).fetchone()[0])

    f.event("test_event", None, n=1)  # the process's first event prunes: 30 of the 50 ancient rows
    assert (count(), count("ancient")) == (91 - 30, 20)
    f.event("test_event", None, n=2)  # continued: the other 20 ancient, then 10 of the rows beyond the newest 10
    assert (count(), count("ancient")) == (62 - 30, 0)
    f.event("test_event", None, n=3)  # finished: the newest 10 stay
    assert count() == 10 and count("test_event") == 3
    f.event("test_event", None, n=4)  # nothing left over: the next prune waits its EVENTS_PRUNE_EVERY events
    assert count() == 11
    f.close()


def test_private_keys_are_written_0600_into_a_new_file_never_through_a_symlink(tmp_path) -> None:
    """F8: `kits issue --out` again over a 0644 tls.key left it 0644, and wrote through a symlink planted there."""
    f = _own_fleet(tmp_path)
    out = tmp_path / "bench"
    out.mkdir()
    (out / "tls.key").write_text("old")
    (out / "tls.key").chmod(0o644)
    ca.issue_kit_files(f.ca, "rk-bench001", out)
    assert (out / "tls.key").stat().st_mode & 0o777 == 0o600
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (out / "tls.key").unlink()
    (out / "tls.key").symlink_to(victim)
    ca.issue_kit_files(f.ca, "rk-bench001", out)
    assert victim.read_text() == "keep me" and not (out / "tls.key").is_symlink()
    assert (out / "tls.key").stat().st_mode & 0o777 == 0o600 and b"PRIVATE KEY" in (out / "tls.key").read_bytes()
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []
    f.close()


@pytest.mark.parametrize("dsn", ["postgresql://fleet:s3cret@127.0.0.1:1/fleet",
                                 "postgresql://fleet@127.0.0.1:1/fleet?password=s3cret"])
def test_a_registry_password_never_goes_into_fleet_json(tmp_path, dsn: str) -> None:
    """F8: fleet.json (0644, read by every fleet process and ingest host) stored the --registry DSN as given."""
    with pytest.raises(FleetError, match="pgpass") as e:
        Fleet.init(tmp_path / "pw", ["127.0.0.1:1"], ["127.0.0.1:2"], ["127.0.0.1"], registry=dsn)
    assert "PGPASSFILE" in str(e.value) and not (tmp_path / "pw").exists()
