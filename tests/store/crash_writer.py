"""Child process for the kill -9 test: commits records forever, printing each confirmation."""

import os
import sys

from firmware import config
from firmware.seal import identity
from firmware.store.store import Store
from firmware.wire import record_format

state, usb, pub = sys.argv[1:4]
cfg = config.validate({"kit": {"state_dir": state}, "datacenter": {"public_key_files": [pub]},
                       "usb": {"mount_point": usb, "require_mountpoint": False},
                       "store": {"reserve_floor_mb": 1, "journal_reserve_mb": 1}})
s = Store(cfg, identity.load_or_create(cfg.state_dir))
s.open()
print("READY", flush=True)
while True:
    p = record_format.Payload({"n": 1}, [record_format.Attachment("b", "x", os.urandom(150_000))]).encode()
    r = s.commit(p)
    print("OK", r.record_id, r.sha256, int(r.stick_id is not None), flush=True)
