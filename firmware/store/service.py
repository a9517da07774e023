"""The store's services for the daemon: open/recovery and close, and the USB watcher.

`StoreService` is the first service started and the last stopped: everything else reads or
writes through the store. Its start is O(1) in the backlog (the journal is the index; after an
unclean stop the reconcile is owed and runs in the background). `UsbWatcher` polls for the stick,
runs that reconcile, backfills a new stick and purges acknowledged records, all in its own thread:
a backfill of thousands of records takes minutes and must never hold up READY, the watchdog
keep-alive, the status checks or a stop (it checks the stop event before every record and resumes
where it stopped, in this run or the next).
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
        rep = self.store.open(defer_reconcile=True)
        self.report = rep
        log.info("store open kit_id=%s state_dir=%s records=%s clean=%s", self.store.identity.kit_id,
                 self.store.state_dir, self.store.j.max_seq(), not self.store.reconcile_pending)

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
        """One poll: stick, owed reconcile, backfill (stoppable), purge; failures are logged and retried next poll."""
        store = self.store
        try:
            store.poll_usb(backfill=False)
        except Exception:
            log.exception("usb poll failed")
        if store.reconcile_pending and not self.stop_event.is_set():
            try:
                store.recover()
            except Exception:
                log.exception("background reconcile failed")
        if store.backfill_due and not self.stop_event.is_set():
            try:
                store.backfill(stop=self.stop_event, background=True)
            except Exception:
                log.exception("usb backfill failed")
        if self.auto_purge and not self.stop_event.is_set():
            try:
                # Bounded per poll (the queue keeps the rest): the thread stays responsive to stop.
                self.store.purge_acknowledged(max_batches=self.PURGE_BATCHES_PER_POLL)
            except Exception:
                log.exception("purge of acknowledged records failed")
