"""What the control plane needs from the running kit (`firmware.daemon.Kit` provides it; tests pass their own)."""

from __future__ import annotations

from typing import Any, Protocol

from firmware.config import Config
from firmware.seal.identity import KitIdentity


class ControlHost(Protocol):
    """The running kit as the control plane sees it.

    * ``store``: `firmware.store.store.Store` (status(), audit(), purge_acknowledged(), backfill(), stick,
      identity);
    * ``services`` / ``hardware``: name -> object with ``status()`` or ``health()`` (``services['relay']``
      has ``sync_now()`` and answers the promotion check);
    * ``enrollment``: the enrollment service or None (``operators.replace()``, ``lock_reason``);
    * ``started``: `time.monotonic()` at daemon start;
    * ``request_exit(status)``: stop the daemon with that exit status (75 restart, 76 reboot).

    ``identity`` is replaced by the control plane after a key rotation.
    """

    cfg: Config
    identity: KitIdentity
    store: Any
    services: dict[str, Any]
    hardware: dict[str, Any]
    enrollment: Any
    started: float

    def request_exit(self, status: int) -> None:
        """Stop the daemon with exit `status`."""
