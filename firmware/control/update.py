"""Signed software updates on the kit: side-by-side slots, an atomic switch, a trial, automatic rollback.

Layout under the install prefix (``/opt/rekam``; `prefix_from_env`)::

    venv/                      the slot `make install` made (the factory slot)
    releases/<version>/        a venv per installed release; ``slot.json`` is written last (a slot without it
                               is a partial install, removed by `Updater.recover`)
    current -> releases/<v>    what rekamd.service runs (``/opt/rekam/current/bin/rekamd``); switched by renaming
                               a new symlink over it (atomic)
    previous -> venv           the slot that ran before the last switch
    update/state.json          the state machine below and the last result (the fleet reads it in telemetry)
    update/incoming/           the kit's own copies of bundles (verified there, never on the stick)
    update/lock                flock held by the one running updater (a dead updater's lock is free)

The state machine (``state.json`` ``state``)::

    idle --apply--> installing --slot complete--> trial --READY + self-test--> idle (promoted)
                        |                           |
                        +-- kill -9: recover() ------+-- not READY / self-test failed / kill -9 /
                            drops the partial slot       crash loop in the window (OnFailure=)
                                                         --> rolling_back --> idle (rolled_back)

``current`` changes only after a slot is complete (its files synced before ``slot.json``), so a power cut while
installing leaves the kit on the version it ran. A trial that no live updater watches (the updater died) is
rolled back by `recover`, which the boot check (``ExecStartPre=`` of rekamd.service) and every ``rekam update``
command run first. Every step is crash-consistent: a trial whose switch did not complete (``current`` is not its
``to``) is undone, not rolled back (`Updater._unswitched`); a rollback saves ``rolling_back`` before it moves a
link, and `recover` finishes it. The uplink is reported after a trial, never required (a field kit often has
none). The crash-loop rollback is bounded to the rollback window (`AUTO_ROLLBACK_WINDOW_S` from a trial's start
and again from its promotion, same boot, and the first boot after it: `_carry_window`; ``update/rollback-window``):
later, a crash loop is logged only.

The trust anchor (`root_fleet_key`): the updater runs as root and verifies with `control.fleet_public_key` of the
root-owned config or the root-owned pin (`pin_path`, made by `pin_fleet_key`), never with the daemon-writable
``<state_dir>/control/fleet.pub``.

Version rules (`check_rules`): no downgrade or reinstall, the running version must be at least the bundle's
``min_from_version``, the new version must read the journal schema on disk and the record format, and its
journal migration (if any) must be forward-compatible: the version it would roll back to must still run on the
migrated journal (``journal_schema.compatible_from`` <= the schema the running version knows), else the bundle
is refused (`journal_not_reversible`). Every wheel must install on this kit's Python and platform
(`check_platform`: a bundle built for another machine, e.g. x86-64 wheels for a Pi, is refused as
`wrong_platform` before anything is unpacked). Records are never touched: slots hold code only.

The restart and the self-test are injected (`Updater` ``restart``/``probe``): in production
``systemctl restart rekamd.service`` (Type=notify: it returns once READY=1 arrived) and the daemon's local API
status (`firmware.cli.update`); in tests a small process supervisor that does what the unit says.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import platform
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from packaging.tags import sys_tags

from firmware import __version__
from firmware.control.files import read_json, write_json
from firmware.errors import BundleError, Refused, UntrustedFile
from firmware.system.fsutil import atomic_write, fsync_dir, open_dir_beneath, open_untrusted, read_untrusted, space
from firmware.wire import control_protocol as cp
from firmware.wire import fleet_key_cert, record_format, stick_layout
from firmware.wire import update_bundle as ub

log = logging.getLogger(__name__)

DEFAULT_PREFIX = Path("/opt/rekam")
PREFIX_ENV = "REKAM_PREFIX"
FACTORY_SLOT = "venv"
READY_TIMEOUT_S = 90.0  # rekamd.service's TimeoutStartSec
SELFTEST_TIMEOUT_S = 60.0  # READY -> self-test passed
UPLINK_GRACE_S = 15.0  # after the self-test: how long to wait to report whether the uplink came back (not required)
MAX_STICK_BUNDLES = 4  # bundles looked at on one stick
KEEP_SLOTS = 2  # current and previous; older complete slots are removed after a promotion
#: The root-owned fleet key pin, beside the root-owned config (`pin_path`): the updater's trust anchor.
PIN_NAME = "fleet.pub"
DEFAULT_PIN = Path("/etc/rekam") / PIN_NAME
MAX_KEY_FILE_BYTES = 4096
MAX_TRUSTED_CONFIG_BYTES = 1024 * 1024
#: After a trial starts (and again after its promotion) a crash loop may roll back for this long, on the same
#: boot; later a crash loop is logged, not rolled back (a version that ran fine for long is not the cause).
AUTO_ROLLBACK_WINDOW_S = 600
WINDOW_FILE = "rollback-window"  # under update/: "<boot id> <deadline in CLOCK_BOOTTIME s>", read by the unit too
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
#: Staging needs room for the copy and for the wheels extracted from it, plus a margin the slot's venv uses.
STAGE_MARGIN_BYTES = 32 * 1024 * 1024
MAX_REJECTED = 4  # pending bundles that could not be staged, kept in updates/rejected/ for a look

#: (ok, why) of a restart: READY=1 within the timeout.
Restart = Callable[[float], tuple[bool, str]]
#: (ok, code, why) of the self-test of the running daemon: expected version, uplink needed, timeout.
Probe = Callable[[str, bool, float], tuple[bool, str, str]]


def sync_tree(path: Path) -> None:
    """Flush every file under `path` to the medium: syncfs(2) of its file system (one call, where walking a venv
    to fsync each of thousands of files would take long on an SD card); `os.sync` if syncfs is missing."""
    import ctypes

    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if getattr(libc, "syncfs", None) is None or libc.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def prefix_from_env() -> Path:
    """The install prefix: ``$REKAM_PREFIX`` or ``/opt/rekam``."""
    return Path(os.environ.get(PREFIX_ENV) or DEFAULT_PREFIX)


# -- the trust anchor ----------------------------------------------------------------------------
#
# The updater runs as root and installs code: it must verify bundles with a key only root can have put there.
# ``<state_dir>/control/fleet.pub`` is written by the daemon (User=rekam), so it is never the root anchor; the
# anchor is `control.fleet_public_key` in the root-owned config, else the pin `rekam update pin-fleet-key` copied
# into the config folder, only once the fleet CA of the root-owned image (`control.ca_file`) certified that key.


def pin_path(cfg: Any) -> Path:
    """Where the root-owned fleet key pin lives: ``fleet.pub`` beside the config file (``/etc/rekam/fleet.pub``);
    `DEFAULT_PIN` for a config that is no file."""
    src = Path(str(getattr(cfg, "source", "")))
    return src.resolve().parent / PIN_NAME if src.is_absolute() or src.is_file() else DEFAULT_PIN


def _not_root_only(st: os.stat_result, kind: str) -> str:
    """What makes `st` something a non-root user could change ('' when root alone can)."""
    want = stat.S_ISDIR if kind == "directory" else stat.S_ISREG
    if not want(st.st_mode):
        return "is a symlink" if stat.S_ISLNK(st.st_mode) else f"is not a {kind}"
    if st.st_uid != 0:
        return f"is owned by uid {st.st_uid}, not root"
    if st.st_mode & 0o022:
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return ""


def check_root_dir(path: Path) -> None:
    """`Refused` (``untrusted_key``) unless directory `path` is root's alone (owned by uid 0, no group/other
    write, not a symlink): nobody else can add, rename or swap a file in it."""
    try:
        problem = _not_root_only(os.lstat(path), "directory")
    except OSError as e:
        problem = f"cannot be checked ({e.strerror})"
    if problem:
        raise Refused("untrusted_key", f"{path} {problem}: a root trust anchor must be in a folder only root "
                                       f"can write")


def read_root_owned(path: Path, max_bytes: int = MAX_KEY_FILE_BYTES) -> bytes:
    """The content of `path` if root alone could have written it: a regular file (not a symlink) owned by uid 0,
    not group/other-writable, in a directory that passes `check_root_dir`; checked on the open descriptor.
    `FileNotFoundError` if absent, `Refused` (``untrusted_key``) naming the path and the problem otherwise."""
    check_root_dir(path.parent)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise
    except OSError as e:
        why = "is a symlink" if e.errno == errno.ELOOP else f"cannot be opened ({e.strerror})"
        raise Refused("untrusted_key", f"{path} {why}") from None
    try:
        st = os.fstat(fd)
        problem = _not_root_only(st, "regular file") or (
            f"is {st.st_size} bytes, more than {max_bytes}" if st.st_size > max_bytes else "")
        if problem:
            raise Refused("untrusted_key", f"{path} {problem}: a root trust anchor must be root's alone")
        os.set_blocking(fd, True)
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(max_bytes)
    finally:
        os.close(fd)


def root_fleet_key(cfg: Any, pin: Path | None = None) -> tuple[Ed25519PublicKey, str]:
    """The fleet key the root updater verifies bundles with, and where it came from: `control.fleet_public_key`
    of the config (whose file must be root's alone) if set, else the root-owned pin (`pin_path`). Never the
    daemon-writable ``control/fleet.pub``. `Refused` (``no_root_key`` / ``untrusted_key`` / ``bad_fleet_key``)."""
    pin = pin or pin_path(cfg)
    preset = str(cfg.control.fleet_public_key or "").strip()
    if preset:
        where = f"{cfg.source} control.fleet_public_key"
        try:
            read_root_owned(Path(str(cfg.source)), MAX_TRUSTED_CONFIG_BYTES)
        except FileNotFoundError:
            raise Refused("untrusted_key", f"{cfg.source}: the config holding control.fleet_public_key is "
                                           f"no file") from None
        text = preset
    else:
        where = str(pin)
        try:
            text = read_root_owned(pin).decode("ascii", "replace")
        except FileNotFoundError:
            raise Refused("no_root_key", f"no root-owned fleet key: {pin} does not exist and "
                                         "control.fleet_public_key is not set; run `rekam update pin-fleet-key` "
                                         "(as root, after the claim)") from None
    try:
        return cp.load_public_b64(text), where
    except cp.ProtocolError as e:
        raise Refused("bad_fleet_key", f"{where}: {e}") from None


def _read_claimed_key(claimed: Path) -> Ed25519PublicKey:
    """The key the claim stored in the daemon's folder, read as root without trusting the file: no symlink
    followed (a link to /etc/shadow is refused), regular file only, size-capped (`read_untrusted`)."""
    try:
        data = read_untrusted(claimed.parent, claimed.name, MAX_KEY_FILE_BYTES)
    except FileNotFoundError:
        raise Refused("not_claimed", f"{claimed} does not exist: the kit is not claimed yet") from None
    except OSError as e:  # UntrustedFile (a symlink, not a regular file, too large) or the open's error
        raise Refused("bad_fleet_key", f"{claimed}: {e.strerror or e}") from None
    try:
        return cp.load_public_b64(data.decode("ascii", "replace"))
    except cp.ProtocolError as e:
        raise Refused("bad_fleet_key", f"{claimed}: {e}") from None


def _check_certified(offered: Ed25519PublicKey, cert_file: Path, ca_file: Path) -> None:
    """`Refused` (``uncertified_fleet_key``) unless the certificate the claim stored (`cert_file`,
    ``control/fleet-key.crt``, daemon-written, read without following links) certifies `offered` under the CA
    certificate `ca_file`, which must be root's alone (`read_root_owned`; ``untrusted_key`` otherwise)."""
    try:
        cas = fleet_key_cert.load_ca_certificates(read_root_owned(ca_file, fleet_key_cert.MAX_CA_BYTES), str(ca_file))
    except FileNotFoundError:
        raise Refused(fleet_key_cert.REASON, f"no fleet CA certificate at {ca_file} (control.ca_file) to check the "
                                             "fleet key with") from None
    except cp.ProtocolError as e:
        raise Refused(e.reason, str(e)) from None
    try:
        pem = read_untrusted(cert_file.parent, cert_file.name, fleet_key_cert.MAX_CERT_BYTES)
    except FileNotFoundError:
        raise Refused(fleet_key_cert.REASON, f"{cert_file} does not exist: the claim brought no fleet CA "
                                             "certificate for the fleet key") from None
    except OSError as e:
        raise Refused(fleet_key_cert.REASON, f"{cert_file}: {e.strerror or e}") from None
    try:
        fleet_key_cert.check(pem, cas, offered, where=str(cert_file))
    except cp.ProtocolError as e:
        raise Refused(e.reason, str(e)) from None


def pin_fleet_key(claimed: Path, pin: Path, cert_file: Path, ca_file: Path, replace: bool = False,
                  uncertified: bool = False) -> dict[str, Any]:
    """Copy the claimed fleet key (``control/fleet.pub``, daemon-written) to the root-owned `pin`, once the fleet CA
    certificate `ca_file` (root's alone) certifies it through `cert_file` (``control/fleet-key.crt``;
    `_check_certified`; `uncertified`: a technician who checked the fingerprint pins without). A pin holding the
    same key: nothing to do (``unchanged``). A pin holding another key: `Refused` (``fleet_key_changed``, both
    fingerprints logged) and the pin is kept, unless `replace` (a technician's decision). Returns
    ``{"status": pinned|unchanged|replaced, "fingerprint", "pin", "certified"}``."""
    offered = _read_claimed_key(claimed)
    fp = cp.key_fingerprint(offered)
    pin.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    check_root_dir(pin.parent)
    old: Ed25519PublicKey | None = None
    try:
        old = cp.load_public_b64(read_root_owned(pin).decode("ascii", "replace"))
    except FileNotFoundError:
        pass
    except (Refused, cp.ProtocolError) as e:
        if not replace:
            log.error("update fleet key pin unusable pin=%s problem=%s offered=%s; check it, then run "
                      "`rekam update pin-fleet-key --replace`", pin, e, fp)
            raise Refused("untrusted_pin", f"{pin}: {e}; check it, then `rekam update pin-fleet-key --replace`") \
                from None
    if old is not None and cp.public_raw(old) == cp.public_raw(offered):
        log.info("update fleet key pin unchanged fingerprint=%s pin=%s", fp, pin)
        return {"status": "unchanged", "fingerprint": fp, "pin": str(pin)}
    certified = not uncertified
    if certified:
        try:
            _check_certified(offered, cert_file, ca_file)
        except Refused as e:
            log.error("update fleet key pin refused: the claimed key is not certified by the fleet CA claimed=%s "
                      "problem=%s; updates stay %s; if the fleet operator confirms this fingerprint, a technician "
                      "runs `rekam update pin-fleet-key --uncertified`", fp, e,
                      "verified with the pinned key" if old is not None else "refused (no key pinned)")
            raise
    if old is not None and not replace:
        log.error("update fleet key pin refused: the claimed key differs from the pinned one pinned=%s "
                  "claimed=%s pin=%s source=%s; updates stay verified with the pinned key; if the fleet key really "
                  "changed, a technician runs `rekam update pin-fleet-key --replace`",
                  cp.key_fingerprint(old), fp, pin, claimed)
        raise Refused("fleet_key_changed", f"{claimed} holds key {fp}, {pin} pins {cp.key_fingerprint(old)}: "
                                           "the pin is kept (`--replace` to replace it)")
    atomic_write(pin, (cp.public_b64(offered) + "\n").encode())
    os.chown(pin, 0, 0)
    os.chmod(pin, 0o644)  # a public key: readable, root's alone to change
    status = "pinned" if old is None else "replaced"
    log.warning("update fleet key %s fingerprint=%s pin=%s previous=%s certified=%s", status, fp, pin,
                cp.key_fingerprint(old) if old is not None else "-", "yes" if certified else "no (--uncertified)")
    return {"status": status, "fingerprint": fp, "pin": str(pin), "certified": certified}


# -- the crash-loop rollback window -------------------------------------------------------------------


def _boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


def _uptime() -> float:
    """Seconds since boot (CLOCK_BOOTTIME, as /proc/uptime): wall-clock jumps (NTP after a boot without RTC)
    do not move it."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def slot_env() -> dict[str, str]:
    """The environment for a slot's own programs: nothing that would load code from elsewhere."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}


def journal_schema(state_dir: Path) -> int:
    """The schema version of the journal on disk (that of this code when there is none yet)."""
    from firmware.store.journal import SCHEMA_VERSION, Journal

    path = state_dir / "journal.db"
    if not path.exists():
        return SCHEMA_VERSION
    j = Journal(path, readonly=True)
    try:
        return int(j.get_meta("schema_version") or 1)
    finally:
        j.close()


def running_journal_schema() -> int:
    """The newest journal schema the running version knows (what it can run on)."""
    from firmware.store.journal import SCHEMA_VERSION

    return SCHEMA_VERSION


def check_rules(m: ub.Manifest, running: str, on_disk_schema: int, known_schema: int,
                on_disk_records: int = record_format.VERSION) -> None:
    """Refuse (`Refused` with a code) a verified bundle this kit must not install (see module doc)."""
    new, cur = ub.parse_version(m.version), ub.parse_version(running)
    if new < cur:
        raise Refused("downgrade", f"bundle {m.version} is older than the running {running}")
    if new == cur:
        raise Refused("already_installed", f"{m.version} is the running version")
    if cur < ub.parse_version(m.min_from_version):
        raise Refused("wrong_from_version", f"bundle {m.version} updates from {m.min_from_version} or later; "
                                            f"this kit runs {running}")
    js = m.journal_schema
    if on_disk_schema not in js["reads"] or js["writes"] < on_disk_schema:
        raise Refused("journal_unsupported", f"bundle {m.version} reads journal schemas {js['reads']}, "
                                             f"the journal here is schema {on_disk_schema}")
    if js["writes"] > on_disk_schema and js["compatible_from"] > known_schema:
        raise Refused("journal_not_reversible", f"bundle {m.version} migrates the journal to schema {js['writes']}, "
                                                f"which version {running} (schema {known_schema}) could not run on")
    if on_disk_records not in m.record_format["reads"]:
        raise Refused("record_format_unsupported", f"bundle {m.version} reads record formats "
                                                   f"{m.record_format['reads']}, the records here are format "
                                                   f"{on_disk_records}")


def check_platform(m: ub.Manifest, supported: Any = None) -> None:
    """Refuse (`wrong_platform`) a bundle with a wheel pip would not install here. `supported`: the interpreter's
    wheel tags, by default this one's (the slots are venvs of the base image's Python, the one running this)."""
    bad = ub.unfit_wheels([a.name for a in m.artifacts], sys_tags() if supported is None else supported)
    if bad:
        raise Refused("wrong_platform", f"bundle {m.version}: {len(bad)} wheel(s) do not install on this kit "
                                        f"({platform.machine()}, Python {sys.version_info.major}."
                                        f"{sys.version_info.minor}): {', '.join(bad[:4])}")


#: `judge_status` failures the daemon settles before READY (its version, the models it loaded): a probe need not
#: wait for them to change.
SETTLED_AT_START = frozenset({"wrong_version", "quality_missing"})


def judge_status(st: dict[str, Any], expect_version: str, need_uplink: bool) -> tuple[bool, str, str]:
    """The self-test on the daemon's ``status`` (the local API's ``/api/v1/status``): the new version runs,
    the store opened and its journal reads, the sensor is there (or simulated), every quality check a device
    needs loaded (a release whose models do not load would leave the kit unable to enroll), no service failed,
    and the uplink is back if it was up before. (ok, code, why)."""
    version = (st.get("daemon") or {}).get("version")
    if version != expect_version:
        return False, "wrong_version", f"daemon runs {version!r}, expected {expect_version!r}"
    rec = st.get("records")
    if not isinstance(rec, dict) or "stored" not in rec or "guard" not in st:
        return False, "store_failed", "status has no journal counts"
    sensor = st.get("sensor")
    if not isinstance(sensor, dict) or sensor.get("error"):
        return False, "sensor_missing", f"sensor: {sensor!r}"[:200]
    quality = st.get("quality")
    if isinstance(quality, dict):  # absent from releases before it was reported: not required of them
        missing = {str(n): str(c.get("error", "")) if isinstance(c, dict) else repr(c)
                   for n, c in quality.items() if not isinstance(c, dict) or c.get("state") not in ("ready", "unused")}
        if missing:
            return False, "quality_missing", ("quality checks not loaded: "
                                              + "; ".join(f"{n}: {e}" for n, e in sorted(missing.items())))[:300]
    failed = [n for n, s in ((st.get("daemon") or {}).get("services") or {}).items()
              if isinstance(s, dict) and s.get("state") == "failed"]
    if failed:
        return False, "service_failed", "failed: " + ", ".join(failed)
    if need_uplink and not uplink_up(st):
        return False, "uplink_lost", "the uplink was up before the update and is not back"
    return True, "ok", ""


def uplink_up(st: dict[str, Any]) -> bool:
    """The record relay or the control plane is connected, by a daemon status."""
    relay = st.get("relay") or {}
    control = st.get("control") or {}
    return relay.get("state") == "connected" or control.get("connected") is True


@dataclass
class Updater:
    """Installs, switches, tries and rolls back releases under `prefix` (see module doc).

    `fleet_key`: the key bundles must be signed with: as root, the root-owned anchor (`root_fleet_key`), never the
    daemon-writable ``control/fleet.pub`` (the daemon's own pre-check, `firmware.control.update_fetch`, may use
    that); None: every bundle is refused with `no_key` (code, why); `state_dir`: the kit's state folder
    (journal schema); `python`: the interpreter new venvs are made from;
    `with_pip`: give each slot its own pip (production) or install with this interpreter's pip into it
    (``pip --python``, faster); `site_paths`: extra folders put on a slot's path by a ``.pth`` file (tests and
    development boxes whose dependencies are not in the system site packages).
    """

    prefix: Path
    state_dir: Path
    fleet_key: Ed25519PublicKey | None
    restart: Restart
    probe: Probe
    uplink_before: Callable[[], bool] = lambda: False
    python: str = "/usr/bin/python3"
    with_pip: bool = True
    site_paths: list[str] = field(default_factory=list)
    ready_timeout_s: float = READY_TIMEOUT_S
    selftest_timeout_s: float = SELFTEST_TIMEOUT_S
    running_version: str = __version__
    no_key: tuple[str, str] = ("not_claimed", "no pinned fleet key: this kit cannot verify an update")

    def __post_init__(self) -> None:
        self.prefix = Path(self.prefix)
        self.dir = self.prefix / "update"
        self.incoming = self.dir / "incoming"
        self.releases = self.prefix / "releases"
        self._lock_fd: int | None = None

    # -- state ------------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        st = read_json(self.dir / "state.json", {})
        st.setdefault("state", "idle")
        st.setdefault("failed_versions", [])
        st.setdefault("last_result", None)
        return st

    def _save(self, st: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.dir / "state.json", st)
        os.chmod(self.dir / "state.json", 0o644)  # versions and codes, no secret: the daemon reports them

    def _result(self, st: dict[str, Any], version: str, status: str, code: str = "ok", reason: str = "",
                **extra: Any) -> dict[str, Any]:
        st["last_result"] = {"version": version, "status": status, "code": code, "reason": reason[:500],
                             "at": int(time.time()), **extra}
        return st["last_result"]

    def _arm_window(self, carried: bool = False) -> None:
        """Let a crash loop roll back for `AUTO_ROLLBACK_WINDOW_S` from now, on this boot (the file is what
        rekam-rollback.service's ExecCondition= reads too: the previous slot's code may predate the window).
        `carried`: the window of the first boot after the one that armed it (`_carry_window`)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        line = f"{_boot_id()} {int(_uptime() + AUTO_ROLLBACK_WINDOW_S)}{' carried' if carried else ''}\n"
        atomic_write(self.dir / WINDOW_FILE, line.encode(), verify=False)
        os.chmod(self.dir / WINDOW_FILE, 0o644)

    def _carry_window(self) -> None:
        """At the first start of rekamd on a new boot (recover runs before every start): a window armed on an
        earlier boot opens once more for this boot's first `AUTO_ROLLBACK_WINDOW_S`, because a version that only
        fails when the kit boots (a device, a unit, a migration of the next start) shows it only after the next
        power-on; one carried already is over (a version that booted fine once is not rolled back later)."""
        try:
            parts = (self.dir / WINDOW_FILE).read_text().split()
        except OSError:
            return
        if len(parts) >= 2 and parts[0] == _boot_id():
            return
        if len(parts) == 2:
            self._arm_window(carried=True)
            log.info("update rollback window opened for this boot's first %d s (first boot after the update)",
                     AUTO_ROLLBACK_WINDOW_S)
        else:
            self._disarm_window()

    def _disarm_window(self) -> None:
        (self.dir / WINDOW_FILE).unlink(missing_ok=True)

    def window_open(self) -> bool:
        """A crash loop may roll back now: within `AUTO_ROLLBACK_WINDOW_S` of the last trial start or promotion,
        on the same boot."""
        try:
            boot, deadline = (self.dir / WINDOW_FILE).read_text().split()[:2]
            return boot == _boot_id() and _uptime() < int(deadline)
        except (OSError, ValueError):
            return False

    @contextmanager
    def locked(self) -> Any:
        """Hold the updater lock (one updater at a time); `Refused` (busy) if another one runs."""
        if self._lock_fd is not None:  # re-entered by the same updater (a stick apply runs apply_staged)
            yield
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Refused("busy", "another update is running") from None
        self._lock_fd = fd
        try:
            yield
        finally:
            self._lock_fd = None
            os.close(fd)

    def updater_alive(self) -> bool:
        """Another process holds the updater lock (a running apply is watching its trial)."""
        if self._lock_fd is not None:
            return False
        try:
            with self.locked():
                return False
        except Refused:
            return True

    # -- slots ------------------------------------------------------------------------------------

    def _link(self, name: str) -> str | None:
        try:
            return os.readlink(self.prefix / name)
        except OSError:
            return None

    def slot_version(self, target: str | None) -> str:
        """The version a slot (a link target relative to the prefix) runs."""
        if not target:
            return ""
        meta = read_json(self.prefix / target / "slot.json", None)
        if isinstance(meta, dict) and meta.get("version"):
            return str(meta["version"])
        # The factory slot has no slot.json: the version pip recorded (a checkout on the path: this code's).
        for info in sorted((self.prefix / target).glob("lib/python3*/site-packages/rekam-*.dist-info")):
            return info.name[len("rekam-"):-len(".dist-info")]
        return self.running_version if target == FACTORY_SLOT else ""

    def current_version(self) -> str:
        """The version ``current`` points at (the running version when there is no link yet)."""
        return self.slot_version(self._link("current")) or self.running_version

    def _set_link(self, name: str, target: str | None) -> None:
        path = self.prefix / name
        if target is None:
            path.unlink(missing_ok=True)
        else:
            tmp = self.prefix / f".{name}.tmp"
            tmp.unlink(missing_ok=True)
            os.symlink(target, tmp)
            os.replace(tmp, path)  # rename(2) over the old link: readers see the old or the new one
        fsync_dir(self.prefix)

    def switch(self, target: str) -> None:
        """``previous`` := ``current``, then ``current`` := `target` (relative to the prefix), each atomic."""
        cur = self._link("current")
        if cur is not None and cur != target:
            self._set_link("previous", cur)
        self._set_link("current", target)
        log.info("update switched current=%s previous=%s", target, cur)

    def status(self) -> dict[str, Any]:
        """What ``rekam update status`` shows and telemetry carries."""
        st = self.state()
        cur, prev = self._link("current"), self._link("previous")
        slots = sorted(p.name for p in self.releases.iterdir() if (p / "slot.json").exists()) \
            if self.releases.is_dir() else []
        return {"state": st["state"], "current": cur, "current_version": self.current_version(),
                "previous": prev, "previous_version": self.slot_version(prev), "slots": slots,
                "trial": st.get("trial"), "installing": st.get("installing"), "last_result": st["last_result"],
                "failed_versions": st["failed_versions"], "updater_running": self.updater_alive()}

    # -- bundle -----------------------------------------------------------------------------------

    def stage_file(self, path: Path) -> Path:
        """Copy a bundle into the kit's own folder (streamed, size-capped); the copy is what gets verified."""
        path = Path(path)
        return self._stage(path.parent, path.name)

    def stage_untrusted(self, root: Path, rel: str) -> Path:
        """Copy a bundle from an untrusted medium (a stick: ``O_NOFOLLOW`` beneath `root`, regular file only,
        size-capped on the descriptor) into the kit's own folder."""
        return self._stage(root, rel)

    def _stage(self, root: Path, rel: str) -> Path:
        self.incoming.mkdir(parents=True, exist_ok=True, mode=0o700)  # root's own: nobody swaps the copy
        dest = self.incoming / f"{os.getpid()}-{time.monotonic_ns()}{ub.SUFFIX}"
        try:
            with open_untrusted(root, rel, ub.MAX_BUNDLE_BYTES) as (fd, size):
                # Checked before a byte is copied: the size bound (open_untrusted, on the descriptor) and room for
                # the copy, the wheels extracted from it and the slot (a full SD would fail half-way instead).
                free = space(self.incoming).free_bytes
                if free < 2 * size + STAGE_MARGIN_BYTES:
                    raise Refused("no_space", f"{rel}: {size} bytes; {free} bytes free under {self.incoming}, "
                                              f"{2 * size + STAGE_MARGIN_BYTES} needed to install it")
                self._copy(fd, size, dest)
        except UntrustedFile as e:
            dest.unlink(missing_ok=True)
            code = "too_large" if e.errno == errno.EFBIG else "unsafe_file"
            raise Refused(code, f"{rel}: {e}") from None
        except OSError as e:
            dest.unlink(missing_ok=True)
            raise Refused("unreadable", f"{rel}: {e}") from None
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
        return dest

    @staticmethod
    def reject_source(path: Path, keep: int = MAX_REJECTED) -> str | None:
        """Move a pending bundle that cannot even be staged (not a regular file, too large, unreadable) aside into
        ``rejected/`` beside it, keeping the newest `keep`: left in place, rekam-update.path (PathExists=) would
        start the updater for it again and again. The folder is the daemon's: walked by descriptors without
        following a link it planted (renameat). Returns the new name, None if there was nothing to move."""
        path = Path(path)
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            with suppress(FileExistsError):
                os.mkdir("rejected", 0o700, dir_fd=dfd)
                owner = os.fstat(dfd)
                os.chown("rejected", owner.st_uid, owner.st_gid, dir_fd=dfd, follow_symlinks=False)
            rfd = os.open("rejected", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            try:
                old = sorted(os.listdir(rfd))
                for name in old[:max(0, len(old) - keep + 1)]:
                    with suppress(OSError):  # unlink(2) removes a link itself, never what it points at
                        os.unlink(name, dir_fd=rfd)
                new = f"{time.time_ns()}-{path.name}"
                try:
                    os.rename(path.name, new, src_dir_fd=dfd, dst_dir_fd=rfd)
                except FileNotFoundError:
                    return None
                os.fsync(dfd)  # the rename is durable: a power cut does not bring the loop back
            finally:
                os.close(rfd)
        finally:
            os.close(dfd)
        log.warning("update pending bundle rejected file=%s moved_to=rejected/%s", path, new)
        return f"rejected/{new}"

    @staticmethod
    def _copy(fd: int, size: int, dest: Path) -> None:
        with open(dest, "wb") as out:
            left = size
            while left > 0:
                chunk = os.read(fd, min(ub.CHUNK, left))
                if not chunk:
                    break
                out.write(chunk)
                left -= len(chunk)
            out.flush()
            os.fsync(out.fileno())

    def verify(self, copy: Path) -> ub.Manifest:
        """Verify the signature and shape of a staged copy and apply the version rules; `Refused` if not."""
        if self.fleet_key is None:
            raise Refused(*self.no_key)
        try:
            with open(copy, "rb") as f:
                m = ub.open_manifest(f, os.fstat(f.fileno()).st_size, self.fleet_key)
        except BundleError as e:
            raise Refused(e.reason, str(e)) from None
        check_rules(m, self.current_version(), journal_schema(self.state_dir), running_journal_schema())
        check_platform(m)
        return m

    # -- install ----------------------------------------------------------------------------------

    def _run(self, argv: list[str], what: str) -> str:
        # cwd "/": `python -c` puts the working directory first on the path (a checkout there would shadow the slot).
        r = subprocess.run(argv, capture_output=True, text=True, env=slot_env(), timeout=900, cwd="/")
        if r.returncode != 0:
            raise Refused("install_failed", f"{what} exited {r.returncode}: {(r.stderr or r.stdout)[-400:]}")
        return r.stdout

    def install(self, copy: Path, m: ub.Manifest) -> str:
        """Install the verified bundle `copy` as ``releases/<version>``; returns the slot (relative)."""
        rel = f"releases/{m.version}"
        slot = self.prefix / rel
        if (slot / "slot.json").exists() and read_json(slot / "slot.json", {}).get("manifest") == m.body:
            return rel  # the same release is already there, complete
        self.releases.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(slot, ignore_errors=True)  # a partial or different slot of that version
        wheels_dir = self.incoming / f"{m.version}.wheels"
        shutil.rmtree(wheels_dir, ignore_errors=True)
        wheels_dir.mkdir(parents=True)
        try:
            with open(copy, "rb") as f:
                try:
                    wheels = ub.extract(f, m, wheels_dir)
                except BundleError as e:
                    raise Refused(e.reason, str(e)) from None
            venv = [self.python, "-m", "venv", "--system-site-packages"] + ([] if self.with_pip else ["--without-pip"])
            self._run([*venv, str(slot)], "python -m venv")
            py = slot / "bin" / "python"
            if self.site_paths:
                site = self._run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                 "python").strip()
                Path(site, "_rekam_site.pth").write_text("".join(p + "\n" for p in self.site_paths))
            pip = [str(py), "-m", "pip"] if self.with_pip else [sys.executable, "-m", "pip", "--python", str(py)]
            # Exactly the bundle's wheels: no index, no resolver reaching out, nothing from the network.
            self._run([*pip, "install", "-q", "--no-index", "--no-deps", "--disable-pip-version-check",
                       *map(str, wheels)], "pip install")
            got = self._run([str(py), "-c", "import firmware; print(firmware.__version__)"], "the new slot").strip()
            if got != m.version or not (slot / "bin" / "rekamd").exists():
                raise Refused("install_failed", f"the new slot runs version {got!r}, the bundle says {m.version}")
            # slot.json says "complete": what pip and venv wrote must be on the medium before it (a power cut
            # would otherwise leave a complete-looking slot with empty files).
            sync_tree(slot)
            write_json(slot / "slot.json", {"version": m.version, "manifest": m.body, "installed_at": int(time.time())})
            fsync_dir(slot)
        except BaseException:
            shutil.rmtree(slot, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(wheels_dir, ignore_errors=True)
        return rel

    # -- the whole update -------------------------------------------------------------------------

    def apply_staged(self, copy: Path) -> dict[str, Any]:
        """Verify, install, switch, restart and try the staged bundle `copy`; promote or roll back.

        Returns the result (``status`` promoted | rolled_back); raises `Refused` for a bundle refused before
        anything changed (the refusal is recorded as the last result too).
        """
        with self.locked():
            self._recover_locked(restart=False, keep=copy)
            st = self.state()
            try:
                try:
                    m = self.verify(copy)
                except Refused as e:
                    self._result(st, "", "refused", e.reason, str(e))
                    self._save(st)
                    log.warning("update refused code=%s detail=%s", e.reason, e)
                    raise
                need_uplink = bool(self.uplink_before())
                st["state"] = "installing"
                st["installing"] = {"version": m.version, "since": int(time.time())}
                self._save(st)
                log.info("update installing version=%s from=%s", m.version, self.current_version())
                try:
                    target = self.install(copy, m)
                except Refused as e:
                    st.update(state="idle", installing=None)
                    self._result(st, m.version, "refused", e.reason, str(e))
                    self._save(st)
                    raise
            finally:
                copy.unlink(missing_ok=True)
            frm = self._link("current") or FACTORY_SLOT
            st.update(state="trial", installing=None,
                      trial={"version": m.version, "from": frm, "from_version": self.slot_version(frm) or
                             self.running_version, "to": target, "since": int(time.time()),
                             "need_uplink": need_uplink, "previous_before": self._link("previous")})
            # Saved before the switch: a power cut after it finds the trial and rolls it back; one before the
            # switch completed finds current != trial.to and undoes the half switch (`_unswitched`).
            self._save(st)
            self._arm_window()
            self.switch(target)
            ok, why = self.restart(self.ready_timeout_s)
            if not ok:
                return self._rollback_locked("not_ready", why)
            # The uplink is no health criterion: a field kit often has none, and losing it during the trial says
            # nothing about the new version. Whether it came back is reported, not required.
            ok, code, why = self.probe(m.version, False, self.selftest_timeout_s)
            if not ok:
                return self._rollback_locked(code, why)
            uplink_back = self.probe(m.version, True, min(UPLINK_GRACE_S, self.selftest_timeout_s))[0] \
                if need_uplink else None
            st = self.state()
            st.update(state="idle", trial=None)
            res = self._result(st, m.version, "promoted", "ok", "", previous=frm, uplink_checked=need_uplink,
                               uplink_back=uplink_back)
            self._save(st)
            self._arm_window()  # the crash-loop rollback stays possible for a while after the promotion, no longer
            if uplink_back is False:
                log.warning("update promoted without the uplink back version=%s (it was up before the update)",
                            m.version)
            log.info("update promoted version=%s previous=%s", m.version, frm)
            self._prune()
            return res

    def rollback(self, code: str = "manual", reason: str = "rolled back by hand", auto: bool = False) -> dict[str, Any]:
        """Go back to the previous slot (a trial's ``from`` first) and restart. With `auto` (the crash-loop unit):
        nothing while a live updater watches its own trial."""
        if auto and self.updater_alive():
            return {"status": "skipped", "code": "updater_running", "reason": "the running update handles it"}
        with self.locked():
            st = self.state()
            if auto and st["state"] not in ("trial", "rolling_back") and not self.window_open():
                # Not the open trial nor right after a promotion: the version ran fine for long, so this crash
                # loop has another cause (hardware, the SD, the config); rolling back would not fix it and would
                # mark a good version failed.
                log.error("update crash loop outside the rollback window: not rolled back version=%s current=%s "
                          "window_s=%d", self.current_version(), self._link("current"), AUTO_ROLLBACK_WINDOW_S)
                return {"status": "skipped", "code": "outside_window",
                        "reason": f"{self.current_version()} was promoted more than {AUTO_ROLLBACK_WINDOW_S} s "
                                  "ago (or before this boot): a crash loop now is not the update's"}
            return self._rollback_locked(code, reason)

    def _rollback_locked(self, code: str, reason: str, restart: bool = True) -> dict[str, Any]:
        st = self.state()
        trial = st.get("trial") or {}
        if st["state"] == "trial" and trial.get("to") and self._link("current") != trial["to"]:
            return self._unswitched(st, trial)  # the switch never completed: nothing to roll back
        if st["state"] == "rolling_back":  # a rollback a power cut interrupted: finish that one
            rb = st.get("rolling_back") or {}
            target, bad_version = rb.get("target"), rb.get("version", "")
            code, reason = rb.get("code", code), rb.get("reason", reason)
            if not target or not (self.prefix / str(target) / "bin").is_dir():
                return self._give_up(st, bad_version, "the interrupted rollback's target is gone")
        else:
            target = trial.get("from") or self._link("previous")
            bad = self._link("current")
            bad_version = trial.get("version") or self.slot_version(bad)
            if not target or target == bad or not (self.prefix / target / "bin").is_dir():
                raise Refused("no_previous", "there is no previous version to go back to")
            # Saved first: a power cut between the two link changes below finds this and finishes the rollback.
            st.update(state="rolling_back", rolling_back={"target": target, "version": bad_version, "code": code,
                                                          "reason": reason[:500]})
            self._save(st)
        self._set_link("current", target)
        self._set_link("previous", None)  # the bad slot is not a way back (a crash loop must not flip to it)
        self._disarm_window()
        if bad_version and bad_version not in st["failed_versions"]:
            st["failed_versions"] = (st["failed_versions"] + [bad_version])[-20:]
        st.update(state="idle", trial=None, installing=None, rolling_back=None)
        res = self._result(st, bad_version, "rolled_back", code, reason, restored=target,
                           restored_version=self.slot_version(target))
        self._save(st)
        log.error("update rolled back version=%s restored=%s code=%s reason=%s", bad_version, target, code, reason)
        if restart:
            ok, why = self.restart(self.ready_timeout_s)
            res["restarted"] = ok
            if not ok:
                log.error("update rollback: the restored version did not start either reason=%s", why)
        return res

    def _unswitched(self, st: dict[str, Any], trial: dict[str, Any]) -> dict[str, Any]:
        """A trial recorded but ``current`` never reached its slot (a power cut before or inside `switch`): the
        kit still runs what it ran. Put ``previous`` back as it was and end the attempt as interrupted (not failed:
        the version never ran, it may be tried again)."""
        # A trial saved by an older updater has no "previous_before": then only a previous that is current
        # itself (half a switch) is dropped.
        cur = self._link("current")
        before = trial["previous_before"] if "previous_before" in trial else (
            None if self._link("previous") == cur else self._link("previous"))
        if self._link("previous") != before:
            self._set_link("previous", before)
        self._disarm_window()
        v = str(trial.get("version", ""))
        st.update(state="idle", trial=None, installing=None)
        res = self._result(st, v, "interrupted", "interrupted_switch",
                           "the switch to the new version was interrupted; the kit stayed on its version")
        self._save(st)
        log.warning("update recovered from an interrupted switch version=%s current=%s", v, self._link("current"))
        return res

    def recover(self, restart: bool = False) -> dict[str, Any] | None:
        """After a power cut or a killed updater: drop a partial install, roll back an unwatched trial.
        Does nothing while a live updater runs (it is watching its own trial)."""
        try:
            with self.locked():
                return self._recover_locked(restart)
        except Refused:
            return None

    def _recover_locked(self, restart: bool, keep: Path | None = None) -> dict[str, Any] | None:
        st = self.state()
        self._carry_window()
        for tmp in (self.prefix / ".current.tmp", self.prefix / ".previous.tmp"):
            tmp.unlink(missing_ok=True)
        if self.incoming.is_dir():
            for p in self.incoming.iterdir():  # copies and wheels of an interrupted run
                if keep is not None and p == keep:
                    continue
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        if self.releases.is_dir():
            cur = self._link("current")
            for p in self.releases.iterdir():
                if not (p / "slot.json").exists() and f"releases/{p.name}" != cur:
                    shutil.rmtree(p, ignore_errors=True)
        if st["state"] == "installing":
            v = (st.get("installing") or {}).get("version", "")
            st.update(state="idle", installing=None)
            res = self._result(st, v, "interrupted", "interrupted_install",
                               "the install was interrupted; the kit stayed on its version")
            self._save(st)
            log.warning("update recovered from an interrupted install version=%s", v)
            return res
        if st["state"] == "rolling_back":
            return self._rollback_locked("interrupted_rollback", "", restart=restart)
        if st["state"] == "trial":
            try:
                return self._rollback_locked("interrupted_trial", "the trial was interrupted (power cut or the "
                                             "updater died) before the version was confirmed", restart=restart)
            except Refused as e:  # no way back (its slot is gone): keep what runs rather than stay stuck in "trial"
                return self._give_up(st, str((st.get("trial") or {}).get("version", "")), str(e))
        return None

    def _give_up(self, st: dict[str, Any], version: str, why: str) -> dict[str, Any]:
        """End an interrupted trial or rollback that cannot be finished: the kit keeps what ``current`` runs and
        the updater is usable again (never wedged in a state no command leaves)."""
        st.update(state="idle", trial=None, installing=None, rolling_back=None)
        res = self._result(st, version, "interrupted", "no_previous", why)
        self._save(st)
        self._disarm_window()
        log.error("update could not finish an interrupted update version=%s current=%s reason=%s", version,
                  self._link("current"), why)
        return res

    def _prune(self) -> None:
        keep = {self._link("current"), self._link("previous")}
        if not self.releases.is_dir():
            return
        done = sorted((p for p in self.releases.iterdir() if (p / "slot.json").exists()),
                      key=lambda p: (p / "slot.json").stat().st_mtime)
        for p in done[:-KEEP_SLOTS]:
            if f"releases/{p.name}" not in keep:
                shutil.rmtree(p, ignore_errors=True)
                log.info("update removed old slot=%s", p.name)

    # -- sticks -----------------------------------------------------------------------------------

    def stick_bundles(self, mount: Path) -> list[str]:
        """Bundle files in the stick's update folder (``rekam/updates/*.rkup``), relative to `mount`, at most
        `MAX_STICK_BUNDLES`; the folder is walked beneath the mount with ``O_NOFOLLOW`` (a symlinked folder is
        refused)."""
        rel = f"{stick_layout.ROOT}/{stick_layout.UPDATES}"
        try:
            fd = open_dir_beneath(mount, rel)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise Refused("unsafe_file", f"{rel}: {e}") from None
        try:
            names = sorted(n for n in os.listdir(fd) if ub.STICK_NAME_RE.fullmatch(n))
        finally:
            os.close(fd)
        return [f"{rel}/{n}" for n in names[:MAX_STICK_BUNDLES]]

    def apply_from_stick(self, mount: Path) -> dict[str, Any]:
        """Apply the newest acceptable bundle on the stick at `mount`: each one copied into the kit's folder and
        verified there first; versions that failed a trial here before are skipped."""
        best: tuple[tuple[int, ...], Path] | None = None
        refusals = []
        failed = set(self.state()["failed_versions"])
        with self.locked():
            self._recover_locked(restart=False)
            bundles = self.stick_bundles(mount)
            if bundles and self.fleet_key is None:  # said as it is, not hidden in a "no bundle" for every file
                raise Refused(*self.no_key)
            for rel in bundles:
                copy = None
                try:
                    copy = self.stage_untrusted(mount, rel)
                    m = self.verify(copy)
                    if m.version in failed:
                        raise Refused("failed_before", f"{m.version} was rolled back on this kit before")
                    key = ub.parse_version(m.version)
                    if best is None or key > best[0]:
                        if best is not None:
                            best[1].unlink(missing_ok=True)
                        best, copy = (key, copy), None
                except Refused as e:
                    refusals.append(f"{rel}: {e}")
                    log.warning("update stick bundle refused file=%s code=%s detail=%s", rel, e.reason, e)
                finally:
                    if copy is not None:
                        copy.unlink(missing_ok=True)
        if best is None:
            raise Refused("no_bundle", "; ".join(refusals) or f"no {ub.SUFFIX} file in the stick's update folder")
        return self.apply_staged(best[1])


def report(prefix: Path | None = None) -> dict[str, Any]:
    """The update state for telemetry (never raises: a kit without slots reports its running version)."""
    prefix = prefix or prefix_from_env()
    st = read_json(prefix / "update" / "state.json", {}) if (prefix / "update").is_dir() else {}
    out = {"running": __version__, "state": st.get("state", "idle"), "last_result": st.get("last_result")}
    with suppress(OSError):
        out["current"] = os.readlink(prefix / "current")
    return out


def stick_bundle_present(mount: Path) -> bool:
    """A bundle sits in the stick's update folder (cheap: one directory listing beneath the mount)."""
    with suppress(OSError):
        fd = open_dir_beneath(mount, f"{stick_layout.ROOT}/{stick_layout.UPDATES}")
        try:
            return any(ub.STICK_NAME_RE.fullmatch(n) for n in os.listdir(fd))
        finally:
            os.close(fd)
    return False


def dumps(obj: Any) -> str:
    """JSON for the CLI."""
    return json.dumps(obj, indent=1, sort_keys=True)
