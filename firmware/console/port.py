"""What the console (HTTP API, web console, GPIO panel) may ask of the running kit: `KitPort`.

The daemon implements it (`firmware.daemon.ConsolePort`); the console never imports the daemon and
never reaches into the store or the enrollment service's internals. Tests may pass any object with
these members.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from firmware.enrollment.session import EnrollmentService


class KitPort(Protocol):
    """The kit as the console sees it."""

    @property
    def kit_id(self) -> str:
        """This kit's id."""

    @property
    def site(self) -> str:
        """The enrollment site from `[kit] site` (printed on receipts)."""

    @property
    def simulation(self) -> bool:
        """True when the daemon runs with simulated devices (`rekamd --sim`)."""

    @property
    def enrollment(self) -> EnrollmentService | None:
        """The enrollment service (its public methods only), or None when the kit has none."""

    @property
    def sim_aliases(self) -> dict[str, str] | None:
        """Simulation only: NIK -> the NIK whose fingers that resident presents (None outside simulation)."""

    def status(self) -> dict[str, Any]:
        """The kit's whole status (store, daemon, services), as `/api/v1/status` returns it."""

    def guard(self) -> dict[str, Any]:
        """The capacity guard alone (``level``, ``reasons``, ``capture_allowed``): cheap, for the panel's LEDs."""

    def records(self, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """The newest journal rows (optionally of one state), newest first, as dicts."""

    def record(self, record_id: str) -> dict[str, Any] | None:
        """One journal row as a dict, or None."""

    def audit_events(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest audit events."""

    def commit_simulated(self, count: int, operator_id: str, pad_to: int = 0) -> Iterator[dict[str, Any]]:
        """Commit up to `count` simulated enrollments through the real store, yielding each commit's result.

        Stops early when the daemon is stopping; raises `CaptureHalted`/`StoreError` from the commit
        that failed (the ones yielded before stay committed).
        """

    def eject_usb(self) -> bool:
        """Flush and release the stick, then unmount it; False if the unmount failed."""

    def export_usb(self, limit: int | None = None) -> dict[str, Any] | None:
        """Backfill the mounted stick (at most `limit` records); ``copied``/``remaining``/``total``/``stick_id``.

        None when no stick is mounted.
        """

    def sensor_error(self) -> str:
        """The fingerprint sensor's current error ("" when it works or there is none)."""

    def uplink_connected(self) -> bool:
        """True when the record relay is connected to a broker."""

    def power_level(self) -> str:
        """The battery policy's level: "ok", "warn", "critical", or "" when the kit watches no battery."""

    def is_stopping(self) -> bool:
        """True once the daemon began to stop (long requests end early)."""
