"""The root updater's trust anchor (docs/updates.md, "Whose key"): bundles are verified only with a key root alone
could have put in place (`control.fleet_public_key` of the root-owned config, else the pin `rekam update
pin-fleet-key` made), never with the daemon-writable ``control/fleet.pub``. Real files, real ownership and modes
(the tests run as root), the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware import config
from firmware.control.update import pin_path, read_root_owned, root_fleet_key
from firmware.errors import Refused
from firmware.wire import control_protocol as cp
from provisioning import ca
from tests.support import rekam
from tests.update.conftest import Kit, make_bundle, tiny_wheel

NOBODY = 65534


@pytest.fixture
def idle_kit(tmp_path: Path, corpus_dir: Path, fleet_key: Ed25519PrivateKey) -> Iterator[Kit]:
    """A kit (factory slot, config, pin) whose daemon is not started: the refusals below come before any restart."""
    k = Kit(tmp_path, corpus_dir, fleet_key)
    yield k
    k.sup.close()


def _raw(key: object) -> bytes:
    return cp.public_raw(key)  # type: ignore[arg-type]


def _pin_dir(tmp_path: Path, key: Ed25519PrivateKey) -> Path:
    d = tmp_path / "etc-rekam"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    (d / "fleet.pub").write_text(cp.public_b64(key) + "\n")
    os.chmod(d / "fleet.pub", 0o644)
    return d


def test_pin_must_be_roots_alone(tmp_path: Path, fleet_key: Ed25519PrivateKey) -> None:
    d = _pin_dir(tmp_path, fleet_key)
    pin = d / "fleet.pub"
    cfg = config.defaults()
    key, where = root_fleet_key(cfg, pin)
    assert _raw(key) == _raw(fleet_key) and where == str(pin)

    def refused(match: str, where: Path = pin) -> None:
        with pytest.raises(Refused) as e:
            root_fleet_key(cfg, pin)
        assert e.value.reason == "untrusted_key" and str(where) in str(e.value) and match in str(e.value), e.value

    os.chown(pin, NOBODY, 0)
    refused(f"owned by uid {NOBODY}")
    os.chown(pin, 0, 0)
    for mode in (0o664, 0o646):
        os.chmod(pin, mode)
        refused("writable by group or others")
    os.chmod(pin, 0o644)
    os.chmod(d, 0o775)
    refused("writable by group or others", d)
    os.chmod(d, 0o755)
    os.chown(d, NOBODY, 0)
    refused(f"owned by uid {NOBODY}", d)
    os.chown(d, 0, 0)
    # a symlink to a perfectly root-owned key is refused too: whoever made the link chose the key
    good = tmp_path / "elsewhere.pub"
    good.write_text(cp.public_b64(fleet_key))
    pin.unlink()
    pin.symlink_to(good)
    refused("symlink")
    pin.unlink()
    with pytest.raises(Refused) as e:
        root_fleet_key(cfg, pin)
    assert e.value.reason == "no_root_key" and "rekam update pin-fleet-key" in str(e.value)
    # and the check itself reads a good file
    pin.write_text(cp.public_b64(fleet_key))
    assert read_root_owned(pin).strip() == cp.public_b64(fleet_key).encode()


def test_config_key_wins_and_its_file_must_be_roots(tmp_path: Path, fleet_key: Ed25519PrivateKey) -> None:
    other = Ed25519PrivateKey.generate()
    d = _pin_dir(tmp_path, other)  # a pin with another key: the config's preset key is the anchor
    path = d / "rekam.toml"
    path.write_text(f'[control]\nfleet_public_key = "{cp.public_b64(fleet_key)}"\n')
    os.chmod(path, 0o640)
    cfg = config.load(path)
    assert pin_path(cfg) == d / "fleet.pub"
    key, where = root_fleet_key(cfg)
    assert _raw(key) == _raw(fleet_key) and "control.fleet_public_key" in where
    os.chown(path, NOBODY, 0)
    with pytest.raises(Refused) as e:
        root_fleet_key(cfg)
    assert e.value.reason == "untrusted_key" and str(path) in str(e.value)


def test_apply_never_trusts_the_daemons_key(idle_kit: Kit, tmp_path: Path, fleet_key: Ed25519PrivateKey) -> None:
    """A compromised daemon writes its own key into control/fleet.pub and hands root a bundle signed with it."""
    kit = idle_kit
    evil = Ed25519PrivateKey.generate()
    (kit.state_dir / "control/fleet.pub").write_text(cp.public_b64(evil))
    d = tmp_path / "b"
    d.mkdir()
    bundle = make_bundle(d, tiny_wheel(d, "0.3.0", "sys.exit(0)"), "0.3.0", evil)
    r = kit.cli("apply", str(bundle), "--json")
    assert r.returncode == 3, r.stdout + r.stderr
    assert json.loads(r.stdout)["code"] == "bad_signature"  # checked with the root pin, which holds the fleet's key
    assert os.readlink(kit.prefix / "current") == "venv" and not (kit.prefix / "releases/0.3.0").exists()
    # without any root-owned key: refused, never a fall-back to the daemon's file
    kit.pin.unlink()
    r = kit.cli("apply", str(bundle), "--json")
    assert r.returncode == 3 and json.loads(r.stdout)["code"] == "no_root_key", r.stdout + r.stderr
    assert "pin-fleet-key" in json.loads(r.stdout)["reason"]
    st = json.loads(kit.cli("status", "--json").stdout)
    assert st["last_result"]["code"] == "no_root_key"  # what the fleet reads in telemetry
    # a stick says so too (not hidden as "no bundle", which --if-present would swallow)
    updates = kit.root / "usb" / "rekam" / "updates"
    updates.mkdir(parents=True)
    make_bundle(updates, tiny_wheel(d, "0.3.0", "sys.exit(0)"), "0.3.0", fleet_key)
    r = kit.cli("apply", "--stick", "--if-present", "--json")
    assert r.returncode == 3 and json.loads(r.stdout)["code"] == "no_root_key", r.stdout + r.stderr
    assert os.readlink(kit.prefix / "current") == "venv" and not (kit.prefix / "releases/0.3.0").exists()


def test_pin_fleet_key_only_with_the_fleet_cas_certificate(tmp_path: Path, corpus_dir: Path,
                                                           fleet_key: Ed25519PrivateKey) -> None:
    """The pin closes the trust-on-first-use window: root pins the claimed key only when the fleet CA of the
    root-owned image (`control.ca_file`) certifies it (control/fleet-key.crt, from the claim), so a daemon that
    writes a key of its own before the first pin gets nothing pinned."""
    pki = ca.init_ca(tmp_path / "fleet-ca", ["127.0.0.1"], batch="test")
    kit = Kit(tmp_path, corpus_dir, fleet_key, extra=f'[control]\nca_file = "{pki.fleet_ca_crt}"\n')
    try:
        _pin_only_certified(kit, pki, fleet_key)
    finally:
        kit.sup.close()


def _pin_only_certified(kit: Kit, pki: ca.CaPaths, fleet_key: Ed25519PrivateKey) -> None:
    kit.pin.unlink()
    claimed = kit.state_dir / "control/fleet.pub"
    cert = claimed.with_name("fleet-key.crt")

    def pin(*extra: str) -> tuple[int, dict[str, object], str]:
        r = rekam("update", "pin-fleet-key", "--json", *extra, cfg=kit.cfg)
        return r.returncode, json.loads(r.stdout), r.stderr

    # claimed but no certificate (a daemon's own key, or a fleet that sent none): nothing pinned, the way out named
    rc, out, err = pin()
    assert rc == 3 and out["code"] == "uncertified_fleet_key" and "fleet-key.crt does not exist" in str(out["reason"])
    assert not kit.pin.exists() and "--uncertified" in err
    # a certificate from a CA of the daemon's own making
    rogue = ca.init_ca(pki.root.parent / "rogue-ca", ["127.0.0.1"], batch="test")
    cert.write_bytes(ca.certify_fleet_key(rogue, fleet_key.public_key()))
    rc, out, _ = pin()
    assert rc == 3 and out["code"] == "uncertified_fleet_key" and "not issued by the fleet CA" in str(out["reason"])
    # the certificate read without following a link the daemon planted (to the genuine one elsewhere)
    genuine = pki.root.parent / "genuine.crt"
    genuine.write_bytes(ca.certify_fleet_key(pki, fleet_key.public_key()))
    cert.unlink()
    cert.symlink_to(genuine)
    rc, out, _ = pin()
    assert rc == 3 and out["code"] == "uncertified_fleet_key" and not kit.pin.exists()
    cert.unlink()
    cert.write_bytes(genuine.read_bytes())
    # the CA file must be root's alone, like the pin
    os.chown(pki.fleet_ca_crt, NOBODY, 0)
    rc, out, _ = pin()
    assert rc == 3 and out["code"] == "untrusted_key" and str(pki.fleet_ca_crt) in str(out["reason"])
    os.chown(pki.fleet_ca_crt, 0, 0)
    # certified by the image's CA: pinned
    rc, out, _ = pin()
    assert rc == 0 and out["status"] == "pinned" and out["certified"] is True, out
    st = os.lstat(kit.pin)
    assert st.st_uid == 0 and st.st_mode & 0o777 == 0o644
    assert kit.pin.read_text().strip() == claimed.read_text().strip()
    assert pin()[:2] == (0, {"status": "unchanged", "fingerprint": out["fingerprint"], "pin": out["pin"]})
    # a daemon writes its own key (with the genuine certificate beside it): refused, the pin kept
    old_fp = cp.key_fingerprint(claimed.read_text().strip())
    before = kit.pin.read_bytes()
    claimed.write_text(cp.public_b64(Ed25519PrivateKey.generate()))
    rc, out, err = pin()
    assert rc == 3 and out["code"] == "uncertified_fleet_key" and "not the fleet key offered" in str(out["reason"])
    assert kit.pin.read_bytes() == before and "updates stay verified with the pinned key" in err
    # another key the fleet CA did certify (a new fleet key): still a technician's decision, both fingerprints logged
    new = Ed25519PrivateKey.generate()
    claimed.write_text(cp.public_b64(new))
    cert.write_bytes(ca.certify_fleet_key(pki, new.public_key()))
    rc, out, err = pin()
    assert rc == 3 and out["code"] == "fleet_key_changed", out
    assert kit.pin.read_bytes() == before
    line = next(ln for ln in err.splitlines() if "pin refused" in ln)
    assert f"pinned={old_fp}" in line and f"claimed={cp.key_fingerprint(new)}" in line and "--replace" in line
    rc, out, _ = pin("--replace")
    assert rc == 0 and out["status"] == "replaced" and out["certified"] is True
    assert kit.pin.read_text().strip() == cp.public_b64(new)
    # root reads the daemon's key file without following a link it planted
    claimed.unlink()
    claimed.symlink_to("/etc/shadow")
    rc, out, _ = pin("--replace")
    assert rc == 3 and out["code"] == "bad_fleet_key" and kit.pin.read_text().strip() == cp.public_b64(new)
    claimed.unlink()
    rc, out, _ = pin()
    assert rc == 3 and out["code"] == "not_claimed"
    # a technician who checked the fingerprint with the fleet operator pins an uncertified key
    kit.pin.unlink()
    cert.unlink()
    claimed.write_text(cp.public_b64(fleet_key))
    rc, out, err = pin("--uncertified")
    assert rc == 0 and out["status"] == "pinned" and out["certified"] is False and "certified=no" in err
