"""Child process for the kill -9 tests and the fault campaign: commits records through the real Store forever,
printing each confirmation (`OK <record_id> <sha256> <mirrored 0|1>`) once `commit()` has returned.

    python -m tests.store.crash_writer STATE USB DC_PUB [key=value ...]

Options: `size=N` payload bytes (150000), `max_mb=N` (store.max_record_mb, default of make_config's 8),
`required=1` (usb.required), `count=N` stop after N records and close cleanly (default: forever),
`kill=POINT` kill -9 itself at a precise point of the first commit (a real SIGKILL, at a chosen moment):
`sd_tmp` (the SD temp file is written, not yet renamed: a number on the SD only as a temp file),
`stick_only` (the stick copy is complete, the SD copy not started: a record on the stick only),
`journal` (both copies are durable, the journal row not yet written).
"""

import os
import signal
import sys
import threading
from pathlib import Path

from firmware import config
from firmware.seal import identity
from firmware.store import store as store_mod
from firmware.store.store import Store
from firmware.wire import record_format

state, usb, pub = sys.argv[1:4]
opts = dict(a.split("=", 1) for a in sys.argv[4:])
cfg = config.validate({
    "kit": {"state_dir": state}, "datacenter": {"public_key_files": [pub]},
    "usb": {"mount_point": usb, "require_mountpoint": False, "required": opts.get("required") == "1"},
    "store": {"reserve_floor_mb": 1, "journal_reserve_mb": 1, "max_record_mb": int(opts.get("max_mb", 8))}})


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


kill = opts.get("kill", "")
if kill:
    real_write = store_mod.atomic_write
    records_dir = Path(state) / "records"

    def faulty_write(path: Path, data: bytes, **kw: object) -> None:
        if path.parent != records_dir or not path.name.endswith(record_format.FILE_SUFFIX):
            return real_write(path, data, **kw)
        if kill == "sd_tmp":
            with open(path.with_name(path.name + ".tmp"), "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            die()
        if kill == "stick_only":
            pending = kw.get("pending")
            if pending is not None:  # the SD side signs (the stick's copy waits for the signature): sign, write nothing
                pending[1]()  # type: ignore[index]
            if not s.stick_done.wait(10):  # the mirror thread's copy (atomic, fsync'd) is complete
                raise SystemExit("stick copy not complete")
            die()
        real_write(path, data, **kw)
        return None

    store_mod.atomic_write = faulty_write
    if kill == "journal":
        store_mod.Journal.add_record = lambda *a, **k: die()  # type: ignore[method-assign]

s = Store(cfg, identity.load_or_create(cfg.state_dir))
s.stick_done = threading.Event()  # type: ignore[attr-defined]
if kill == "stick_only":
    real_mirror = s._mirror_copy  # the stick copy itself (its index line waits for the journal row)

    def mirror_then_signal(*a: object) -> object:
        try:
            return real_mirror(*a)  # type: ignore[arg-type]
        finally:
            s.stick_done.set()  # type: ignore[attr-defined]

    s._mirror_copy = mirror_then_signal  # type: ignore[method-assign]
print("OPENING", flush=True)  # recovery starts now (the kill-during-recovery trials aim here)
s.open()
print("READY", flush=True)
n = 0
count = int(opts.get("count", 0))
size = int(opts.get("size", 150_000))
while not count or n < count:
    p = record_format.Payload({"n": n}, [record_format.Attachment("b", "x", os.urandom(size))]).encode()
    r = s.commit(p)
    print("OK", r.record_id, r.sha256, int(r.stick_id is not None), flush=True)
    n += 1
s.close()
print("CLOSED", flush=True)
