"""The store's services for the daemon: open/recovery and close, and the USB watcher.

`StoreService` is the first service started and the last stopped: everything else reads or
writes through the store. `UsbWatcher` polls for the stick (insertion backfills what it lacks)
and purges acknowledged records; it is its own thread because a backfill of thousands of records
takes minutes and must not hold up the watchdog keep-alive or the status checks.
"""

from __future__ import annotations

import logging
from typing import Any

from firmware.store.store import Store
from firmware.system.service import RUNNING, STOPPED, ThreadService

log = logging.getLogger("rekamd")


class StoreService:
    """Opens the store (recovery) on start, closes it (waiting for a commit in progress) on stop."""

    name = "store"

    def __init__(self, store: Store) -> None:
        self.store = store
        self.report: Any = None  # the RecoveryReport of the last open

    def start(self) -> None:
        """Open the store and log what recovery found; raises StoreError (e.g. locked by another process)."""
        rep = self.store.open()
        self.report = rep
        log.info("store open kit_id=%s state_dir=%s records=%s recovered=%d quarantined=%d missing=%d",
                 self.store.identity.kit_id, self.store.state_dir, self.store.j.max_seq(), len(rep.adopted),
                 len(rep.quarantined), len(rep.missing))

    def stop(self) -> None:
        """Close the store (idempotent)."""
        self.store.close()

    def health(self) -> dict[str, Any]:
        """Open or not (a closed store is never "failed": nothing restarts it behind the daemon's back)."""
        return {"state": RUNNING if self.store.journal is not None else STOPPED}


class UsbWatcher(ThreadService):
    """Polls the USB stick every `[usb] poll_seconds` (insertion -> backfill) and purges acknowledged records."""

    PURGE_BATCHES_PER_POLL = 5  # of 200 records: well inside the supervisor's 3 s join on stop

    def __init__(self, store: Store, poll_s: float, auto_purge: bool) -> None:
        super().__init__("usb", poll_s)
        self.store = store
        self.auto_purge = auto_purge

    def tick(self) -> None:
        """One poll (and purge); failures are logged and retried on the next poll."""
        try:
            self.store.poll_usb()
        except Exception:
            log.exception("usb poll failed")
        if self.auto_purge:
            try:
                # Bounded per poll (the queue keeps the rest): the thread stays responsive to stop.
                self.store.purge_acknowledged(max_batches=self.PURGE_BATCHES_PER_POLL)
            except Exception:
                log.exception("purge of acknowledged records failed")
