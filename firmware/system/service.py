"""The lifecycle every long-running part of the daemon implements, and the supervisor that runs them.

A `Service` is started once in data-path order by the daemon and stopped in reverse on one stop
event (Frigate's shape). `health()` answers at once, from memory, for status and telemetry.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Service(Protocol):
    """A long-running part of the kit (store maintenance, USB watcher, relay, control, API, panel, watchdog)."""

    name: str

    def start(self) -> None:
        """Start working (threads, connections); return promptly. Raise to refuse to start."""

    def stop(self) -> None:
        """Stop and release everything; idempotent; returns within a few seconds."""

    def health(self) -> dict[str, Any]:
        """A small JSON-able dict describing the service now; never blocks, never raises."""
