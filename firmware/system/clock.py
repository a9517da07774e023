"""Wall-clock time and whether it can be trusted (a Raspberry Pi has no RTC).

The kernel's NTP state (adjtimex) says whether systemd-timesyncd or chrony has synchronised
the clock; a record captured before that carries ``clock_synced = false`` so the data center
knows its capture time may be wrong.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime as dt
import functools

_TIME_ERROR = 5  # adjtimex return value: clock not synchronised


class _Timex(ctypes.Structure):
    # struct timex from <sys/timex.h>; only `modes` (0 = read only) is set, the rest is padding
    # large enough for every Linux ABI.
    _fields_ = [("modes", ctypes.c_uint), ("_rest", ctypes.c_byte * 256)]


@functools.cache
def _libc() -> ctypes.CDLL | None:
    # find_library forks a helper process: do it once, not on every record.
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def clock_synchronised() -> bool:
    """True when the kernel reports the clock as NTP-synchronised."""
    libc = _libc()
    if libc is None:
        return False
    try:
        state = libc.adjtimex(ctypes.byref(_Timex()))
    except AttributeError:
        return False
    return state not in (-1, _TIME_ERROR)


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def iso(t: dt.datetime | None = None) -> str:
    """UTC time as ``2026-11-29T04:03:12Z``."""
    return (t or utc_now()).astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def compact(t: dt.datetime | None = None) -> str:
    """UTC time as ``20261129T040312Z`` (for record ids)."""
    return (t or utc_now()).astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
