"""Fault knobs of the simulated sensor: what goes wrong on the wire and in the module, on demand.

Tests and demos set them on a running simulator (``sim.faults.corrupt_checksum_next = 1``); the
device and the command handlers consume them through `Faults.take` and `Faults.mangle`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class Faults:
    """Fault knobs. Counters (`*_next`) apply to that many upcoming events, then reset themselves."""

    corrupt_checksum_next: int = 0  # reply frames sent with a wrong checksum
    drop_bytes_next: int = 0  # reply frames that lose `drop_count` bytes in the middle
    drop_count: int = 3
    stray_bytes_next: int = 0  # replies preceded by `stray_payload`
    stray_payload: bytes = b"\x55"
    duplicate_ack_next: int = 0  # ACKs sent twice (adafruit#31)
    late_ack_next: int = 0  # replies preceded by a late ACK of an earlier command (code `late_ack_code`)
    late_ack_code: int = 0x02
    error_ack_next: int = 0  # commands answered with a short 0x01 ACK
    no_reply_next: int = 0  # commands left unanswered
    dead: bool = False  # answer nothing at all
    reply_delay_s: float = 0.0  # added before every reply (slow sensor)
    busy_after_set_s: float = 0.5  # input ignored after SetSysPara (scaled by time_scale)
    capture_removed_next: int = 0  # GenImg with a finger returns 03 (finger removed mid-capture)
    library_full: bool = False  # Store returns 0x1F
    flash_fail_next: int = 0  # Store returns 0x18
    corrupt_data_next: int = 0  # bulk uploads with one damaged data packet
    bulk_gap_s: float = 0.0  # extra silence between data packets
    # hostile device: the upload's data as 1-byte DATA packets, one every `bulk_trickle_s` seconds (until cleared)
    bulk_trickle_s: float = 0.0
    # hostile device: after the first data packet, ACK frames every `bulk_ack_flood_s` seconds (until cleared)
    bulk_ack_flood_s: float = 0.0
    # odd firmware: ReadProdInfo reports this (width, height) instead of the real image size, and/or sends
    # `prod_info_extra` after its 46 result bytes
    prod_info_geometry: tuple[int, int] | None = None
    prod_info_extra: bytes = b""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def take(self, name: str) -> bool:
        """Consume one event of the counter `name` (thread-safe); True if the fault applies now."""
        with self._lock:
            n = getattr(self, name)
            if n > 0:
                setattr(self, name, n - 1)
                return True
            return False

    def mangle(self, frame: bytes) -> bytes:
        """A reply frame as the wire delivers it: wrong checksum, bytes dropped, stray bytes before it."""
        if self.take("corrupt_checksum_next"):
            frame = frame[:-1] + bytes([frame[-1] ^ 0x5A])
        if self.take("drop_bytes_next"):
            mid = len(frame) // 2
            frame = frame[:mid] + frame[mid + self.drop_count:]
        if self.take("stray_bytes_next"):
            frame = self.stray_payload + frame
        return frame


def damage_data_frame(frame: bytes) -> bytes:
    """A data packet with one payload byte flipped (its checksum no longer matches)."""
    return frame[:20] + bytes([frame[20] ^ 0xFF]) + frame[21:]
