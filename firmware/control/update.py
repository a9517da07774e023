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

    idle --apply--> installing --slot complete--> trial --READY + self-test + uplink--> idle (promoted)
                        |                           |
                        +-- kill -9: recover() ------+-- not READY / self-test failed / kill -9 /
                            drops the partial slot       crash loop (OnFailure=) --> rollback --> idle (rolled_back)

``current`` changes only after a slot is complete, so a power cut while installing leaves the kit on the
version it ran. A trial that no live updater watches (the updater died) is rolled back by `recover`, which
the boot check (``ExecStartPre=`` of rekamd.service) and every ``rekam update`` command run first.

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
from firmware.system.fsutil import fsync_dir, open_dir_beneath, open_untrusted
from firmware.wire import record_format, stick_layout
from firmware.wire import update_bundle as ub

log = logging.getLogger(__name__)

DEFAULT_PREFIX = Path("/opt/rekam")
PREFIX_ENV = "REKAM_PREFIX"
FACTORY_SLOT = "venv"
READY_TIMEOUT_S = 90.0  # rekamd.service's TimeoutStartSec
SELFTEST_TIMEOUT_S = 60.0  # READY -> self-test passed and the uplink back (if it was up)
MAX_STICK_BUNDLES = 4  # bundles looked at on one stick
KEEP_SLOTS = 2  # current and previous; older complete slots are removed after a promotion

#: (ok, why) of a restart: READY=1 within the timeout.
Restart = Callable[[float], tuple[bool, str]]
#: (ok, code, why) of the self-test of the running daemon: expected version, uplink needed, timeout.
Probe = Callable[[str, bool, float], tuple[bool, str, str]]


def prefix_from_env() -> Path:
    """The install prefix: ``$REKAM_PREFIX`` or ``/opt/rekam``."""
    return Path(os.environ.get(PREFIX_ENV) or DEFAULT_PREFIX)


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

    `fleet_key`: the pinned fleet key (`firmware.control.claim.ControlPaths.pinned_fleet_key`); `state_dir`:
    the kit's state folder (journal schema); `python`: the interpreter new venvs are made from;
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
            with open_untrusted(root, rel, ub.MAX_BUNDLE_BYTES) as (fd, size), open(dest, "wb") as out:
                left = size
                while left > 0:
                    chunk = os.read(fd, min(ub.CHUNK, left))
                    if not chunk:
                        break
                    out.write(chunk)
                    left -= len(chunk)
                out.flush()
                os.fsync(out.fileno())
        except UntrustedFile as e:
            dest.unlink(missing_ok=True)
            code = "too_large" if e.errno == errno.EFBIG else "unsafe_file"
            raise Refused(code, f"{rel}: {e}") from None
        except OSError as e:
            dest.unlink(missing_ok=True)
            raise Refused("unreadable", f"{rel}: {e}") from None
        return dest

    def verify(self, copy: Path) -> ub.Manifest:
        """Verify the signature and shape of a staged copy and apply the version rules; `Refused` if not."""
        if self.fleet_key is None:
            raise Refused("not_claimed", "no pinned fleet key: this kit cannot verify an update")
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
                             "need_uplink": need_uplink})
            self._save(st)  # before the switch: a power cut after it finds the trial and rolls it back
            self.switch(target)
            ok, why = self.restart(self.ready_timeout_s)
            if not ok:
                return self._rollback_locked("not_ready", why)
            ok, code, why = self.probe(m.version, need_uplink, self.selftest_timeout_s)
            if not ok:
                return self._rollback_locked(code, why)
            st = self.state()
            st.update(state="idle", trial=None)
            res = self._result(st, m.version, "promoted", "ok", "", previous=frm, uplink_checked=need_uplink)
            self._save(st)
            log.info("update promoted version=%s previous=%s", m.version, frm)
            self._prune()
            return res

    def rollback(self, code: str = "manual", reason: str = "rolled back by hand", auto: bool = False) -> dict[str, Any]:
        """Go back to the previous slot (a trial's ``from`` first) and restart. With `auto` (the crash-loop unit):
        nothing while a live updater watches its own trial."""
        if auto and self.updater_alive():
            return {"status": "skipped", "code": "updater_running", "reason": "the running update handles it"}
        with self.locked():
            return self._rollback_locked(code, reason)

    def _rollback_locked(self, code: str, reason: str, restart: bool = True) -> dict[str, Any]:
        st = self.state()
        trial = st.get("trial") or {}
        target = trial.get("from") or self._link("previous")
        bad = self._link("current")
        bad_version = trial.get("version") or self.slot_version(bad)
        if not target or target == bad or not (self.prefix / target / "bin").is_dir():
            raise Refused("no_previous", "there is no previous version to go back to")
        self._set_link("current", target)
        self._set_link("previous", None)  # the bad slot is not a way back (a crash loop must not flip to it)
        if bad_version and bad_version not in st["failed_versions"]:
            st["failed_versions"] = (st["failed_versions"] + [bad_version])[-20:]
        st.update(state="idle", trial=None, installing=None)
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
        if st["state"] == "trial":
            return self._rollback_locked("interrupted_trial", "the trial was interrupted (power cut or the updater "
                                         "died) before the version was confirmed", restart=restart)
        return None

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
            for rel in self.stick_bundles(mount):
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
