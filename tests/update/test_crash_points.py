"""Power cuts at every step of a switch and of a rollback, the crash-loop rollback window, a trial without uplink,
a stick bundle that does not fit. Real slots (venvs), real symlinks and state files under a temporary prefix; the
restart and self-test are the `Updater`'s injected ones (no daemon needed to decide what happens to the links), and
a "power cut" is an exception raised in place of one step, after which a fresh updater (the next boot) recovers."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware.control import update
from firmware.control.update import Updater, judge_status
from firmware.errors import Refused
from firmware.wire import control_protocol as cp
from tests.support import REPO
from tests.update.conftest import SITE, Kit, make_bundle, tiny_wheel


class PowerCut(BaseException):
    """The process is gone at this point (nothing after it runs, no cleanup either: BaseException)."""


class CuttingUpdater(Updater):
    """An updater whose `cut_at`-th durable step (a state save, a link change, the window file, a restart) does not
    happen: the power went at that point."""

    cut_at = -1
    steps = 0

    def _step(self) -> None:
        self.steps += 1
        if self.steps == self.cut_at:
            raise PowerCut(self.steps)

    def _save(self, st: dict[str, Any]) -> None:
        self._step()
        super()._save(st)

    def _set_link(self, name: str, target: str | None) -> None:
        self._step()
        super()._set_link(name, target)

    def _arm_window(self) -> None:
        self._step()
        super()._arm_window()


@pytest.fixture
def idle_kit(tmp_path: Path, corpus_dir: Path, fleet_key: Ed25519PrivateKey) -> Iterator[Kit]:
    k = Kit(tmp_path, corpus_dir, fleet_key)
    yield k
    k.sup.close()


@pytest.fixture
def bundle(tmp_path: Path, fleet_key: Ed25519PrivateKey) -> Path:
    d = tmp_path / "bundle"
    d.mkdir()
    return make_bundle(d, tiny_wheel(d, "0.3.0", "sys.exit(0)"), "0.3.0", fleet_key)


def _updater(kit: Kit, key: Ed25519PrivateKey, passes: bool = True, cls: type[Updater] = Updater,
             restarts: list[float] | None = None, **kw: Any) -> Any:
    def restart(t: float) -> tuple[bool, str]:
        if restarts is not None:
            restarts.append(t)
        return True, ""

    kw.setdefault("probe", lambda v, up, t: (True, "ok", "") if passes else (False, "selftest_failed", "test"))
    return cls(kit.prefix, kit.state_dir, key.public_key(), restart=restart, python=sys.executable,
               with_pip=False, site_paths=[SITE], **kw)


def _link(kit: Kit, name: str) -> str | None:
    try:
        return os.readlink(kit.prefix / name)
    except OSError:
        return None


def _reset(kit: Kit) -> None:
    """Back to a kit on its factory slot that never updated (the complete 0.3.0 slot stays: no reinstall)."""
    os.symlink("venv", kit.prefix / ".current.tmp")
    os.replace(kit.prefix / ".current.tmp", kit.prefix / "current")
    (kit.prefix / "previous").unlink(missing_ok=True)
    for name in ("state.json", update.WINDOW_FILE):
        (kit.prefix / "update" / name).unlink(missing_ok=True)


@pytest.mark.parametrize("passes", [True, False], ids=["trial-passes", "trial-fails"])
def test_power_cut_at_every_step_recovers(idle_kit: Kit, bundle: Path, fleet_key: Ed25519PrivateKey,
                                          passes: bool) -> None:
    kit = idle_kit
    cut, finished = 1, False
    while not finished:
        assert cut < 40, "the update never finished"
        _reset(kit)
        restarts: list[float] = []  # the new version was started (it may have run and looped)
        up = _updater(kit, fleet_key, passes, CuttingUpdater, restarts)
        up.cut_at = cut
        try:
            up.apply_staged(up.stage_file(bundle))
            finished = True
        except PowerCut:
            pass
        # The next boot: rekamd's ExecStartPre runs `rekam update recover`, with a new process.
        nxt = _updater(kit, fleet_key)
        nxt.recover(restart=False)
        st, cur = nxt.state(), _link(kit, "current")
        where = f"power cut at step {cut}: {st} current={cur} previous={_link(kit, 'previous')}"
        assert st["state"] == "idle", where
        assert cur in ("venv", "releases/0.3.0") and (kit.prefix / str(cur) / "bin").is_dir(), where
        if cur == "releases/0.3.0":
            assert st["last_result"]["status"] == "promoted" and _link(kit, "previous") == "venv", where
        else:
            assert _link(kit, "previous") is None, where  # never a link to the slot that did not make it
            if restarts:  # it ran and was not confirmed: rolled back and marked, a stick does not offer it again
                assert st["last_result"]["status"] == "rolled_back" and "0.3.0" in st["failed_versions"], where
            else:  # it never ran: interrupted (or not even begun), free to be tried again
                assert (st["last_result"] or {"status": "interrupted"})["status"] == "interrupted", where
                assert not st["failed_versions"], where
        # not wedged: the next update runs to its end
        if cur == "venv":
            res = nxt.apply_staged(nxt.stage_file(bundle))
            assert res["status"] == "promoted", (where, res)
        cut += 1
    assert cut > 8  # every step of the install, the switch, the trial (and the rollback) was cut once


def _promote(kit: Kit, key: Ed25519PrivateKey, bundle: Path) -> None:
    _reset(kit)
    up = _updater(kit, key)
    assert up.apply_staged(up.stage_file(bundle))["status"] == "promoted"


def test_crash_loop_rolls_back_only_within_the_window(idle_kit: Kit, bundle: Path, fleet_key: Ed25519PrivateKey,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    kit = idle_kit
    _promote(kit, fleet_key, bundle)
    res = _updater(kit, fleet_key).rollback("crash_loop", "crash loop", auto=True)
    assert res["status"] == "rolled_back" and _link(kit, "current") == "venv"  # right after the promotion
    # promoted, then ran fine for longer than the window: a crash loop now is logged, not rolled back
    monkeypatch.setattr(update, "AUTO_ROLLBACK_WINDOW_S", 1)
    _promote(kit, fleet_key, bundle)
    time.sleep(1.2)
    res = _updater(kit, fleet_key).rollback("crash_loop", "crash loop", auto=True)
    assert res["status"] == "skipped" and res["code"] == "outside_window", res
    st = _updater(kit, fleet_key).state()
    assert _link(kit, "current") == "releases/0.3.0" and _link(kit, "previous") == "venv"
    assert "0.3.0" not in st["failed_versions"] and st["last_result"]["status"] == "promoted"
    # what rekam-rollback.service runs says so with exit 2 (its ExecStartPost= do not run) and changes nothing
    r = subprocess.run(_unit_argv(kit, "ExecStart"), capture_output=True, text=True, timeout=60,
                       env={**update.slot_env(), "REKAM_PREFIX": str(kit.prefix)})
    assert r.returncode == 2 and "outside the rollback window" in r.stderr, r.stdout + r.stderr
    assert _link(kit, "current") == "releases/0.3.0"
    # a manual rollback (a technician) still works
    assert _updater(kit, fleet_key).rollback("manual", "by hand")["status"] == "rolled_back"


def _unit_argv(kit: Kit, key: str) -> list[str]:
    line = next(ln.split("=", 1)[1] for ln in (REPO / "systemd/rekam-rollback.service").read_text().splitlines()
                if ln.startswith(key + "="))
    line = line.replace("$$", "$").replace("/opt/rekam", str(kit.prefix)).replace("/etc/rekam/rekam.toml",
                                                                                  str(kit.cfg))
    return shlex.split(line)


def test_rollback_unit_gate_is_the_window(tmp_path: Path) -> None:
    """rekam-rollback.service's ExecCondition= (sh: the previous slot's rekam may predate the window) opens only
    within the window the updater wrote, on the same boot; systemd skips the unit on exit 1..254."""
    window = tmp_path / "update" / update.WINDOW_FILE
    window.parent.mkdir()
    kit = type("K", (), {"prefix": tmp_path, "cfg": tmp_path / "rekam.toml"})()
    argv = _unit_argv(kit, "ExecCondition")  # type: ignore[arg-type]

    def gate() -> int:
        return subprocess.run(argv, capture_output=True, timeout=10).returncode

    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    up = time.clock_gettime(time.CLOCK_BOOTTIME)
    window.write_text(f"{boot} {int(up + 60)}\n")
    assert gate() == 0
    window.write_text(f"{boot} {int(up - 1)}\n")
    assert 1 <= gate() <= 254
    window.write_text(f"00000000-0000-0000-0000-000000000000 {int(up + 60)}\n")  # written before a reboot
    assert 1 <= gate() <= 254
    window.write_text(f"{boot} {int(up + 60)} carried\n")  # the next boot's window (`_carry_window`)
    assert gate() == 0
    window.unlink()
    assert 1 <= gate() <= 254


def test_the_window_opens_once_more_on_the_first_boot_after_the_update(idle_kit: Kit, bundle: Path,
                                                                        fleet_key: Ed25519PrivateKey,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A version that only fails at boot: promoted, the kit powered off past the window; the recover before
    rekamd's first start on the next boot opens the window for that boot, once."""
    kit = idle_kit
    monkeypatch.setattr(update, "AUTO_ROLLBACK_WINDOW_S", 1)
    _promote(kit, fleet_key, bundle)
    time.sleep(1.2)
    assert not _updater(kit, fleet_key).window_open()
    monkeypatch.setattr(update, "_boot_id", lambda: "next-boot")
    monkeypatch.setattr(update, "AUTO_ROLLBACK_WINDOW_S", 600)
    up = _updater(kit, fleet_key)
    up.recover()
    assert up.window_open()
    up.recover()  # every later start of rekamd on that boot: the same window, not a new one
    assert (kit.prefix / "update" / update.WINDOW_FILE).read_text().split()[2:] == ["carried"]
    monkeypatch.setattr(update, "_boot_id", lambda: "third-boot")
    up.recover()
    assert not up.window_open() and not (kit.prefix / "update" / update.WINDOW_FILE).exists()
    # and within the carried window a crash loop rolls back
    monkeypatch.setattr(update, "_boot_id", lambda: "next-boot")
    _promote(kit, fleet_key, bundle)
    monkeypatch.setattr(update, "_boot_id", lambda: "fourth-boot")
    up = _updater(kit, fleet_key)
    up.recover()
    assert up.rollback("crash_loop", "crash loop", auto=True)["status"] == "rolled_back"


def test_trial_does_not_need_the_uplink(idle_kit: Kit, bundle: Path, fleet_key: Ed25519PrivateKey) -> None:
    """The uplink was up before the update and is gone during the trial (a field kit's modem): promoted anyway,
    the result says the uplink did not come back."""
    kit = idle_kit
    status = {"daemon": {"version": "0.3.0", "services": {}}, "records": {"stored": 3}, "guard": {},
              "sensor": {"kind": "simulated"}, "relay": {"state": "disconnected"}, "control": {"connected": False}}
    up = _updater(kit, fleet_key, probe=lambda v, need_uplink, t: judge_status(status, v, need_uplink),
                  uplink_before=lambda: True)
    res = up.apply_staged(up.stage_file(bundle))
    assert res["status"] == "promoted", res
    assert res["uplink_checked"] is True and res["uplink_back"] is False
    assert _link(kit, "current") == "releases/0.3.0"


def test_stick_bundle_without_room_is_not_copied(tmp_path: Path, fleet_key: Ed25519PrivateKey) -> None:
    """A bundle bigger than the room left is refused before a byte is copied (a full SD would fail half-way)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        stick = tmp_path / "usb"
        updates = stick / "rekam" / "updates"
        updates.mkdir(parents=True)
        b = make_bundle(updates, tiny_wheel(tmp_path, "0.3.0", "sys.exit(0)"), "0.3.0", fleet_key)
        up = Updater(mnt / "opt", tmp_path / "sd", fleet_key.public_key(), restart=lambda t: (True, ""),
                     probe=lambda v, u, t: (True, "ok", ""))
        with pytest.raises(Refused) as e:
            up.stage_untrusted(stick, f"rekam/updates/{b.name}")
        assert e.value.reason == "no_space" and "needed" in str(e.value)
        assert not any((mnt / "opt/update/incoming").iterdir())
        # the same bundle where there is room: copied
        big = Updater(tmp_path / "opt", tmp_path / "sd", fleet_key.public_key(), restart=lambda t: (True, ""),
                      probe=lambda v, u, t: (True, "ok", ""))
        assert big.stage_untrusted(stick, f"rekam/updates/{b.name}").read_bytes() == b.read_bytes()
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_pin_and_status_json_shapes(idle_kit: Kit) -> None:
    """`status` needs no key (the boot check and the crash-loop unit run without one); json stays parseable."""
    kit = idle_kit
    kit.pin.unlink()
    r = kit.cli("status", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["current"] == "venv"
    assert cp.key_fingerprint((kit.state_dir / "control/fleet.pub").read_text())  # the daemon's key is still there


def test_unstageable_pending_bundle_is_moved_aside(idle_kit: Kit) -> None:
    """What rekam-update.service runs, on a pending file that cannot be staged (here a FIFO, then a file over the
    size bound): refused, and moved to updates/rejected/ (bounded), so rekam-update.path does not loop on it."""
    kit = idle_kit
    folder = kit.state_dir / "updates"
    folder.mkdir()
    pending = folder / "pending.rkup"
    os.mkfifo(pending)
    r = kit.cli("apply", str(pending), "--remove-source", "--json")
    assert r.returncode == 3 and json.loads(r.stdout)["code"] == "unsafe_file", r.stdout + r.stderr
    assert not pending.exists() and len(list((folder / "rejected").iterdir())) == 1
    for _ in range(update.MAX_REJECTED + 2):
        with open(pending, "wb") as f:
            f.truncate(update.ub.MAX_BUNDLE_BYTES + 1)  # sparse: over the bound without the disk
        r = kit.cli("apply", str(pending), "--remove-source", "--json")
        assert r.returncode == 3 and json.loads(r.stdout)["code"] == "too_large", r.stdout + r.stderr
        assert not pending.exists()
    assert len(list((folder / "rejected").iterdir())) == update.MAX_REJECTED
    assert os.readlink(kit.prefix / "current") == "venv"
