"""The store-side fault harness, shared by the CI suite (tests/faults/) and the campaign (bench/bench_faults.py).

Every scenario drives the REAL store: a child process committing through `Store` (tests/store/crash_writer.py)
killed with SIGKILL, small real tmpfs media (size=, nr_inodes=), real mounts pulled with `umount -l`, and a
loop-mounted ext4 image whose unsynced writes are dropped (power loss). Each trial ends with `Ledger.audit()`:
it opens the store the way the daemon does after the fault (recovery, backfill) and counts

- confirmed: records the kit reported committed (`commit()` returned);
- lost: a confirmed record that is not live in the journal, or whose SD file is missing;
- corrupt: a confirmed record whose SD copy (or stick copy, when it was confirmed mirrored) has another hash,
  or any journaled live record whose SD file does not verify (signature + hash);
- duplicated: a sequence number held by two different record ids on any medium or in the journal;
- reused: a sequence number that some medium (SD, SD temp file, stick, quarantine) or a confirmation showed
  under one record id in an earlier trial and under another one later;
- stuck: temp files left after recovery, a reconcile still owed, or records the stick still lacks after
  a backfill with room to spare.

All must be zero.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firmware import config
from firmware.errors import CaptureHalted
from firmware.seal import identity
from firmware.store.journal import LIVE
from firmware.store.store import Store, seq_of
from firmware.wire import record_format
from tests.support import Tmpfs

REPO = Path(__file__).resolve().parents[2]
FIELDS = ("trials", "confirmed", "lost", "corrupt", "duplicated", "reused", "stuck")


@dataclass
class Tally:
    """Figures of one scenario (summed over its trials)."""

    name: str
    trials: int = 0
    confirmed: int = 0
    lost: int = 0
    corrupt: int = 0
    duplicated: int = 0
    reused: int = 0
    stuck: int = 0
    notes: list[str] = field(default_factory=list)
    extra: Counter[str] = field(default_factory=Counter)  # scenario-specific evidence (e.g. writes a cut dropped)

    def add(self, other: Tally) -> None:
        for f in FIELDS:
            setattr(self, f, getattr(self, f) + getattr(other, f))
        self.notes += other.notes
        self.extra.update(other.extra)

    @property
    def clean(self) -> bool:
        """Something was confirmed and nothing went wrong."""
        return self.confirmed > 0 and self.bad == 0

    @property
    def bad(self) -> int:
        return self.lost + self.corrupt + self.duplicated + self.reused + self.stuck

    def line(self) -> str:
        return f"{self.name:24s} " + " ".join([f"{f}={getattr(self, f)}" for f in FIELDS]
                                              + [f"{k}={v}" for k, v in sorted(self.extra.items())])


def kit_config(state: Path, usb: Path, dc_pub: Path, **store: Any) -> config.Config:
    """The kit config the writer child uses (see tests/store/crash_writer.py), with `store` keys over it."""
    usb_required = bool(store.pop("usb_required", False))
    mountpoint = bool(store.pop("require_mountpoint", False))
    return config.validate({
        "kit": {"state_dir": str(state)}, "datacenter": {"public_key_files": [str(dc_pub)]},
        "usb": {"mount_point": str(usb), "require_mountpoint": mountpoint, "required": usb_required},
        "store": {"reserve_floor_mb": 1, "journal_reserve_mb": 1, **store}})


def payload(n: int, tag: str = "") -> bytes:
    return record_format.Payload({"tag": tag}, [record_format.Attachment("b", "x", os.urandom(n))]).encode()


class Ledger:
    """What one kit's trials have confirmed and which record id each sequence number has been seen under."""

    def __init__(self, state: Path, usb: Path, dc_pub: Path) -> None:
        self.state, self.usb, self.dc_pub = state, usb, dc_pub
        self.confirmed: dict[str, tuple[str, bool]] = {}
        self.seen: dict[int, str] = {}  # seq -> record id, from every medium and confirmation so far
        self.reused = 0
        self.saw_ready = False  # whether the last writer read by read_child() got as far as READY

    # --- evidence -------------------------------------------------------------------------

    def note(self, record_id: str) -> None:
        seq = seq_of(record_id)
        if seq is None:
            return
        first = self.seen.setdefault(seq, record_id)
        if first != record_id:
            self.reused += 1
            self.seen[seq] = record_id

    def confirm(self, record_id: str, sha: str, mirrored: bool) -> None:
        self.note(record_id)
        self.confirmed[record_id] = (sha, mirrored)

    def survey(self) -> None:
        """Note every record id any medium shows now (before recovery removes a temp file)."""
        for d in (self.state / "records", self.state / "quarantine", *self._stick_dirs()):
            try:
                names = os.listdir(d)
            except OSError:
                continue
            for n in names:
                self.note(n.split(".")[0])

    def _stick_dirs(self) -> list[Path]:
        base = self.usb / "rekam"
        try:
            return [p / "records" for p in base.iterdir() if p.is_dir()]
        except OSError:
            return []

    def read_child(self, child: subprocess.Popen[str]) -> int:
        """Confirmations printed by a (killed) writer; a line cut short by the kill is no confirmation."""
        n = 0
        assert child.stdout is not None
        self.saw_ready = False
        for line in child.stdout:
            self.saw_ready |= line.strip() == "READY"
            parts = line.split()
            if line.endswith("\n") and len(parts) == 4 and parts[0] == "OK":
                self.confirm(parts[1], parts[2], parts[3] == "1")
                n += 1
        child.wait()
        return n

    # --- the end-of-trial check -------------------------------------------------------------

    def audit(self, name: str, expect_mirror: bool = False, **store_cfg: Any) -> Tally:
        """Open the store as after the fault (recovery, backfill) and count what the module doc lists."""
        self.survey()
        t = Tally(name, trials=1, confirmed=len(self.confirmed))
        cfg = kit_config(self.state, self.usb, self.dc_pub, **store_cfg)
        s = Store(cfg, identity.load_or_create(cfg.state_dir))
        s.open()
        try:
            if s.stick is not None:
                s.backfill()
            rows = {r.id: r for r in s.records()}
            for rid, (sha, mirrored) in self.confirmed.items():
                r = rows.get(rid)
                p = s.sd_path(rid)
                if r is None or r.state not in LIVE or not p.exists():
                    t.lost += 1
                    t.notes.append(f"lost {rid}")
                    continue
                if record_format.sha256_hex(p.read_bytes()) != sha or r.sha256 != sha:
                    t.corrupt += 1
                    t.notes.append(f"corrupt {rid}")
                if mirrored and s.stick is not None:
                    sp = s.stick.record_path(rid)
                    if sp.exists() and record_format.sha256_hex(sp.read_bytes()) != sha:
                        t.corrupt += 1
                        t.notes.append(f"corrupt stick copy {rid}")
            for r in rows.values():  # every live record verifies (signature and hash), confirmed or adopted
                if r.state in LIVE and r.id not in self.confirmed:
                    try:
                        data = s.sd_path(r.id).read_bytes()
                        record_format.parse(data, trusted_kit_key=s.identity.public_key_raw)
                        if record_format.sha256_hex(data) != r.sha256:
                            raise ValueError("hash")
                    except Exception as e:
                        t.corrupt += 1
                        t.notes.append(f"unverifiable {r.id}: {e}")
            ids: dict[int, set[str]] = {}
            for rid in list(rows) + [n[:-4] for n in os.listdir(s.records_dir) if n.endswith(".rkm")] + (
                    list(s.stick.record_files()) if s.stick is not None else []):
                seq = seq_of(rid)
                if seq is not None:
                    ids.setdefault(seq, set()).add(rid)
                    self.note(rid)
            t.duplicated = sum(1 for v in ids.values() if len(v) > 1)
            temps = [n for n in os.listdir(s.records_dir) if n.endswith(".tmp")]
            if s.stick is not None:
                temps += [n for n in os.listdir(s.stick.records_dir) if n.endswith(".tmp")]
            t.stuck = len(temps) + int(getattr(s, "reconcile_pending", False))
            if expect_mirror and s.stick is not None and not getattr(s, "stick_full", None):
                t.stuck += s.status()["mirror_lag"]["records"]
            if t.stuck:
                t.notes.append(f"stuck: temps={temps} reconcile={getattr(s, 'reconcile_pending', False)}")
            # The next number is above every number any medium or confirmation ever showed.
            try:
                nxt = s.commit(payload(1000, "probe"))
                self.confirm(nxt.record_id, nxt.sha256, nxt.stick_id is not None)
            except CaptureHalted:
                pass  # a medium still full (exhaustion): halted before a number was used, as it must

            t.confirmed = len(self.confirmed)
        finally:
            s.close()
        t.reused = self.reused
        self.reused = 0
        return t


def writer(state: Path, usb: Path, dc_pub: Path, *opts: str) -> subprocess.Popen[str]:
    """Start tests/store/crash_writer.py (the real Store in a child process); returns before READY."""
    return subprocess.Popen([sys.executable, "-m", "tests.store.crash_writer", str(state), str(usb), str(dc_pub),
                             *opts], stdout=subprocess.PIPE, text=True, cwd=REPO)


def wait_ready(child: subprocess.Popen[str], until: str = "READY") -> bool:
    """Read the writer's lines up to `until` ("OPENING": its recovery is about to run; "READY": it commits)."""
    assert child.stdout is not None
    while line := child.stdout.readline():
        if line.strip() == until:
            return True
        if line.strip() != "OPENING":
            return False
    return False


# --- scenarios (each returns the Tally of `trials` trials) ---------------------------------------------------


def kill_during_capture(root: Path, dc_pub: Path, trials: int, rng: random.Random, stick: bool = True) -> Tally:
    """kill -9 a committing process at random moments; the next trial's start recovers."""
    state, usb = root / "sd", root / "usb"
    if stick:
        usb.mkdir(parents=True, exist_ok=True)
    led = Ledger(state, usb, dc_pub)
    total = Tally("kill_capture")
    for _ in range(trials):
        child = writer(state, usb, dc_pub, f"size={rng.choice([2_000, 60_000, 300_000])}")
        if not wait_ready(child):
            child.kill()
            led.read_child(child)
            continue
        time.sleep(rng.uniform(0.0, 0.25))
        child.kill()
        led.read_child(child)
        led.survey()  # what the kill left (temp files, stick-only copies) before anything reconciles it
        total.trials += 1
    total.add(_zero_trials(led.audit("kill_capture", expect_mirror=stick)))
    return total


def kill_at_points(root: Path, dc_pub: Path, trials: int, rng: random.Random) -> Tally:
    """kill -9 at the precise points where a number exists on one medium only; then `rekam status`-like opens
    (recovery, clean close) before the next writer: the number must never come back."""
    state, usb = root / "sd", root / "usb"
    usb.mkdir(parents=True, exist_ok=True)
    led = Ledger(state, usb, dc_pub)
    total = Tally("kill_points")
    points = ["sd_tmp", "stick_only", "journal"]
    for i in range(trials):
        point = points[i % len(points)] if i < len(points) else rng.choice(points)
        child = writer(state, usb, dc_pub, f"kill={point}", "size=20000")
        wait_ready(child)
        led.read_child(child)
        led.survey()
        # A technician's `rekam status` while the daemon is stopped: opens (recovers) and closes cleanly.
        cfg = kit_config(state, usb, dc_pub)
        s = Store(cfg, identity.load_or_create(state))
        s.open()
        s.close()
        # The daemon starts again and commits.
        child = writer(state, usb, dc_pub, "count=2", "size=20000")
        wait_ready(child)
        led.read_child(child)
        total.trials += 1
    total.add(_zero_trials(led.audit("kill_points", expect_mirror=True)))
    return total


def kill_during_recovery(root: Path, dc_pub: Path, trials: int, rng: random.Random) -> Tally:
    """Leave an unclean store (a writer killed mid-capture), then kill -9 the next start during its recovery."""
    state, usb = root / "sd", root / "usb"
    usb.mkdir(parents=True, exist_ok=True)
    led = Ledger(state, usb, dc_pub)
    total = Tally("kill_recovery")
    for _ in range(trials):
        child = writer(state, usb, dc_pub, "size=40000")
        wait_ready(child)
        time.sleep(rng.uniform(0.05, 0.3))
        child.kill()
        led.read_child(child)
        led.survey()
        # The recovering start, killed at a random moment of its open() (its recovery) or just after.
        child = writer(state, usb, dc_pub, "size=40000")
        wait_ready(child, "OPENING")
        time.sleep(rng.uniform(0.0, 0.012))  # its open() takes ~7-20 ms here
        child.kill()
        led.read_child(child)
        total.extra["killed_in_recovery"] += int(not led.saw_ready)
        led.survey()
        total.trials += 1
    total.add(_zero_trials(led.audit("kill_recovery", expect_mirror=True)))
    return total


def _zero_trials(t: Tally) -> Tally:
    t.trials = 0  # the audit is the end of the scenario, not a trial of its own
    return t


_tmpfs = Tmpfs()  # the one tmpfs helper (tests/support.py); every scenario unmounts what it mounted


def mount_tmpfs(path: Path, size_kb: int, inodes: int | None = None) -> Path:
    return _tmpfs.mount(path, size_kb, inodes)


def umount(path: Path, lazy: bool = False) -> None:
    if path in _tmpfs.mounted:
        _tmpfs.umount(path, lazy=lazy)


def exhaustion(root: Path, dc_pub: Path, trials: int, rng: random.Random) -> Tally:
    """Fill a small real tmpfs SD or stick (bytes or inodes), also behind the guard's back: another writer fills
    the SD to the last byte (SQLite's own writes hit ENOSPC), or takes every inode as it comes free while
    commits run (the record's temp file cannot be created after the guard said yes). Every commit either
    returns (confirmed) or raises a StoreError (CaptureHalted included) with nothing half written, the journal
    passes `PRAGMA integrity_check`; then space comes back and capture goes on."""
    from firmware.errors import StoreError

    total = Tally("exhaustion")
    for i in range(trials):
        kind = KINDS[i % len(KINDS)]
        trial = root / f"ex{i}"
        sd = mount_tmpfs(trial / "sd", 24 * 1024, {"sd_inodes": 60, "inode_race": 400}.get(kind))
        usb = mount_tmpfs(trial / "usb", 6 * 1024, 40 if kind == "stick_inodes" else None) \
            if kind.startswith("stick") else trial / "usb"
        try:
            led = Ledger(sd, usb, dc_pub)
            opts: dict[str, Any] = {"max_record_mb": 1, "min_free_inodes": 16, "warn_records": 5,
                                    "resume_records": 2}
            if kind == "sqlite":
                opts.update(reserve_floor_mb=0, journal_reserve_mb=1, reserve_records=1)
            cfg = kit_config(sd, usb, dc_pub, **opts)
            s = Store(cfg, identity.load_or_create(sd))
            s.open()
            filler = sd / "filler"
            ex: Counter[str] = Counter()
            stop_race = threading.Event()
            try:
                errors = 0
                for n in range(400):
                    if kind == "sqlite" and n == 3:
                        # Another writer fills the SD to the last byte: SQLite's own writes now hit ENOSPC
                        # (a write that must grow the WAL), and so would any commit the guard let through.
                        _fill(filler, 0)
                        try:
                            s.audit("probe", blob="x" * 400_000)
                        except Exception:
                            ex["sqlite_enospc"] += 1
                    if kind == "inode_race" and n == 3:
                        # Another process takes every inode it can, as fast as they come free, while commits
                        # go on: the guard's check passes, then the record's temp file cannot be created.
                        stop_race.clear()
                        threading.Thread(target=_eat_inodes, args=(sd / "eaten", stop_race), daemon=True).start()
                    try:
                        r = s.commit(payload(rng.choice([20_000, 120_000, 300_000])))
                        led.confirm(r.record_id, r.sha256, r.stick_id is not None)
                    except CaptureHalted:
                        ex["halted"] += 1
                        errors += 1
                    except StoreError as e:  # refused mid-way: no copy left, the number skipped
                        ex["journal_failed" if "journal" in str(e) else "write_failed"] += 1
                        errors += 1
                    if errors > 4:
                        break
                    try:
                        s.audit("probe")  # SQLite writes outside a commit may fail too; they must not corrupt
                    except Exception:
                        ex["sqlite_enospc"] += 1
                stop_race.set()
                ok = s.j.conn.execute("PRAGMA integrity_check").fetchone()[0]
                if ok != "ok":
                    ex["journal_damaged"] += 1
            finally:
                s.close()
            filler.unlink(missing_ok=True)
            shutil.rmtree(sd / "eaten", ignore_errors=True)
            led.survey()
            t = led.audit("exhaustion", **opts)
            t.corrupt += ex.pop("journal_damaged", 0)
            t.extra.update(ex)
            if kind.startswith("stick") and t.confirmed and not any(m for _, m in led.confirmed.values()):
                t.notes.append("no record mirrored at all")
            t.trials = 1
            total.add(t)
        finally:
            umount(trial / "usb")
            umount(trial / "sd")
    return total


KINDS = ("sd_bytes", "sd_inodes", "stick_bytes", "stick_inodes", "sqlite", "inode_race")


def _eat_inodes(d: Path, stop: threading.Event) -> None:
    d.mkdir(exist_ok=True)
    n = 0
    while not stop.is_set():
        try:
            os.close(os.open(d / str(n), os.O_CREAT | os.O_WRONLY, 0o600))
            n += 1
        except OSError:
            time.sleep(0.0005)  # none free: grab the next one that comes free


def _fill(path: Path, leave: int, chunk: int = 1 << 20) -> None:
    """Write a file in `chunk`s until the filesystem has only `leave` bytes free (or ENOSPC)."""
    st = os.statvfs(path.parent)
    want = max(0, st.f_bavail * st.f_frsize - leave)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            block = b"\0" * chunk
            while want > 0:
                want -= os.write(fd, block[: min(chunk, want)])
        finally:
            os.close(fd)
    except OSError:
        pass


def small_stick(root: Path, dc_pub: Path, trials: int, rng: random.Random) -> Tally:
    """A stick smaller than the backlog, watched by the real UsbWatcher for a while: the stick is filled up to
    its reserve and kept; one `usb_full` audit row, one insertion, no removal (no flapping)."""
    from firmware.store.service import UsbWatcher

    total = Tally("small_stick")
    for i in range(trials):
        trial = root / f"ss{i}"
        sd = mount_tmpfs(trial / "sd", 32 * 1024)
        usb = trial / "usb"
        try:
            led = Ledger(sd, usb, dc_pub)
            opts = {"max_record_mb": 1, "warn_records": 5, "resume_records": 2}
            cfg = kit_config(sd, usb, dc_pub, **opts)
            s = Store(cfg, identity.load_or_create(sd))
            s.open()
            try:
                for _ in range(rng.randint(12, 16)):  # a 6-8 MiB backlog without a stick
                    r = s.commit(payload(500_000))
                    led.confirm(r.record_id, r.sha256, False)
                mount_tmpfs(usb, rng.choice([3, 4]) * 1024)
                w = UsbWatcher(s, 0.05, auto_purge=True)
                w.start()
                time.sleep(1.5)
                w.stop()
                ins = len(s.audit_events("usb_inserted"))
                rem = len(s.audit_events("usb_removed"))
                full = len(s.audit_events("usb_full"))
                st = s.status()["stick"]
                if not (ins == 1 and rem == 0 and full == 1 and st["present"] and st["full"]
                        and st["not_mirrored"] > 0):
                    total.stuck += 1
                    total.notes.append(f"small stick: inserted={ins} removed={rem} full={full} status={st}")
                sp = os.statvfs(usb)
                if sp.f_bavail * sp.f_frsize < s.guard.reserve_bytes("usb") - 1:
                    total.corrupt += 1
                    total.notes.append("stick filled past its reserve")
            finally:
                s.close()
            t = led.audit("small_stick", **opts)
            t.trials = 1
            total.add(t)
        finally:
            umount(usb)
            umount(sd)
    return total


def yank_mid_backfill(root: Path, dc_pub: Path, trials: int, rng: random.Random) -> Tally:
    """Pull the stick (umount -l) while the USB watcher backfills it; a new stick then gets everything."""
    from firmware.store.service import UsbWatcher

    total = Tally("yank_backfill")
    for i in range(trials):
        trial = root / f"yk{i}"
        sd = trial / "sd"
        usb = trial / "usb"
        led = Ledger(sd, usb, dc_pub)
        cfg = kit_config(sd, usb, dc_pub, require_mountpoint=True)  # as on a kit: the stick is a real mount
        s = Store(cfg, identity.load_or_create(sd))
        s.open()
        try:
            for _ in range(40):
                r = s.commit(payload(200_000))
                led.confirm(r.record_id, r.sha256, False)
            mount_tmpfs(usb, 64 * 1024)
            w = UsbWatcher(s, 0.02, auto_purge=False)
            w.start()
            time.sleep(rng.uniform(0.0, 0.3))
            umount(usb, lazy=True)
            time.sleep(0.2)
            alive = w.health()["state"] == "running"
            w.stop()
            if not alive or s.stick is not None or list(usb.iterdir()):  # noticed; nothing written to the bare folder
                total.stuck += 1
                total.notes.append(f"watcher alive={alive} stick={s.stick}")
        finally:
            s.close()
        shutil.rmtree(usb, ignore_errors=True)
        mount_tmpfs(usb, 64 * 1024)  # a fresh stick
        try:
            t = led.audit("yank_backfill", expect_mirror=True)
            t.trials = 1
            total.add(t)
        finally:
            umount(usb)
    return total


def usb_required(root: Path, dc_pub: Path, trials: int, rng: random.Random) -> Tally:
    """`usb.required = true`: no stick halts capture before a number is used; with one every record is mirrored."""
    from firmware.errors import CaptureHalted

    total = Tally("usb_required")
    for i in range(trials):
        trial = root / f"rq{i}"
        sd, usb = trial / "sd", trial / "usb"
        led = Ledger(sd, usb, dc_pub)
        cfg = kit_config(sd, usb, dc_pub, usb_required=True)
        s = Store(cfg, identity.load_or_create(sd))
        s.open()
        try:
            try:
                s.commit(payload(10_000))
                total.stuck += 1
                total.notes.append("commit without the required stick")
            except CaptureHalted:
                pass
            usb.mkdir(parents=True)
            for _ in range(rng.randint(2, 5)):
                r = s.commit(payload(50_000))
                led.confirm(r.record_id, r.sha256, r.stick_id is not None)
                if r.stick_id is None:
                    total.lost += 1
                    total.notes.append(f"required stick but {r.record_id} not mirrored")
            shutil.rmtree(usb)
            try:
                s.commit(payload(10_000))
                total.stuck += 1
            except CaptureHalted:
                pass
            usb.mkdir(parents=True)
        finally:
            s.close()
        t = led.audit("usb_required", expect_mirror=True, usb_required=True)
        t.trials = 1
        total.add(t)
    return total


# --- power loss: a loop-mounted ext4 image whose unsynced writes are dropped -------------------------------


def power_loss(root: Path, dc_pub: Path, trials: int, rng: random.Random) -> Tally:
    """Power cut emulated at the block layer. This kernel has no device-mapper (no dm-flakey/dm-log-writes), so
    the SD is ext4 on a loop device over an image file, and the image file is copied at a random moment: the copy
    holds exactly what the block device had received (what fsync forced out, plus whatever writeback happened
    to send), not the dirty pages still in the page cache, which are lost as in a power cut. The writer is
    frozen (SIGSTOP) at that moment (between a write() and its fsync, say), the image copied, the writer killed;
    the copy is then fsck'd (journal replay), loop-mounted and recovered."""
    total = Tally("power_loss")
    for i in range(trials):
        trial = root / f"pl{i}"
        img_dir = mount_tmpfs(trial / "img", 160 * 1024)
        img, cut = img_dir / "sd.img", img_dir / "cut.img"
        mnt = trial / "sd"
        usb = trial / "usb"
        try:
            subprocess.run(["truncate", "-s", "64M", str(img)], check=True)
            subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True, capture_output=True)
            mnt.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
            led = Ledger(mnt, usb, dc_pub)
            child = writer(mnt, usb, dc_pub, f"size={rng.choice([5_000, 80_000, 250_000])}")
            wait_ready(child)
            time.sleep(rng.uniform(0.05, 0.6))
            child.send_signal(signal.SIGSTOP)  # frozen wherever it is: between a write() and its fsync, say
            shutil.copyfile(img, cut)  # the power cut: what the device holds now, nothing more
            live = _listing(mnt / "records")
            child.kill()
            led.read_child(child)
            subprocess.run(["umount", str(mnt)], check=False, capture_output=True)
            fsck = subprocess.run(["e2fsck", "-p", str(cut)], capture_output=True, text=True)
            if fsck.returncode >= 4:
                total.corrupt += 1
                total.notes.append(f"fsck {fsck.returncode}: {fsck.stdout[-300:]}")
                continue
            subprocess.run(["mount", "-o", "loop", str(cut), str(mnt)], check=True)
            try:
                led.survey()
                after = _listing(mnt / "records")
                t = led.audit("power_loss")
                t.trials = 1
                # Evidence that the cut really dropped writes the page cache still held (e.g. the record in
                # progress): the files after the cut differ from what the killed process had left.
                t.extra["cuts_dropping_writes"] += int(after != live)
                total.add(t)
            finally:
                subprocess.run(["umount", str(mnt)], check=False, capture_output=True)
        finally:
            subprocess.run(["umount", str(mnt)], check=False, capture_output=True)  # the loop mount, if still up
            umount(img_dir)
    return total


def _listing(d: Path) -> dict[str, int]:
    try:
        return {e.name: e.stat().st_size for e in os.scandir(d)}
    except OSError:
        return {}


SCENARIOS = {
    "kill_capture": kill_during_capture,
    "kill_points": kill_at_points,
    "kill_recovery": kill_during_recovery,
    "exhaustion": exhaustion,
    "small_stick": small_stick,
    "yank_backfill": yank_mid_backfill,
    "usb_required": usb_required,
    "power_loss": power_loss,
}


def counts(ts: list[Tally]) -> Counter[str]:
    c: Counter[str] = Counter()
    for t in ts:
        for f in FIELDS:
            c[f] += getattr(t, f)
    return c
