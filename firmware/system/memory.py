"""Keeping the daemon's resident memory flat on a 1-4 GB Pi (glibc's allocator, through ctypes).

Two glibc behaviours make a long-running, threaded Python daemon's RSS creep although Python frees
what it no longer uses:

* every thread that allocates may get its own malloc arena (up to 8 per core), each keeping its own
  free pages; the daemon has a dozen threads (relay, store, console, sensor...);
* freed chunks inside the heap (a decoded 1080p frame, a read-ahead buffer) are kept by the
  allocator for reuse and only returned to the kernel when they sit at the very top of the heap.

`limit_arenas()` caps the arenas (the effect of ``MALLOC_ARENA_MAX``, set from inside so it holds
however the daemon is started); `Trimmer` hands free heap pages back to the kernel with
``malloc_trim(0)`` when glibc reports enough of them free, checked from the daemon's idle loop.
Neither changes what Python objects exist. On a C library without these calls (musl) both do
nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from typing import Any

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # <malloc.h>


class _Mallinfo2(ctypes.Structure):
    # struct mallinfo2 (glibc >= 2.33): every field a size_t
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]


def _libc() -> Any | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def limit_arenas(n: int = 2) -> bool:
    """Cap glibc's malloc arenas at `n`. Call before the daemon starts its threads. True if applied."""
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_ARENA_MAX, n))


class Trimmer:
    """Returns free heap pages to the kernel when at least `threshold` bytes sit free in the heap.

    `maybe_trim()` is meant for an idle loop: reading glibc's counters costs microseconds, and a trim
    (tens of microseconds to a few ms) only happens after something big was freed, so an idle
    daemon does not spend CPU on it. Without ``mallinfo2`` it trims every `fallback_s`.
    """

    def __init__(self, threshold: int = 4 << 20, fallback_s: float = 60.0) -> None:
        self.threshold = threshold
        self.fallback_s = fallback_s
        self._last = time.monotonic()
        self._libc = _libc()
        self._info = getattr(self._libc, "mallinfo2", None) if self._libc is not None else None
        if self._info is not None:
            self._info.restype = _Mallinfo2

    def free_bytes(self) -> int | None:
        """Bytes free inside the main heap and arenas (None if glibc does not say)."""
        if self._info is None:
            return None
        return int(self._info().fordblks)

    def maybe_trim(self) -> bool:
        """Trim if enough is free (or, without counters, if `fallback_s` passed). True if it trimmed."""
        if self._libc is None:
            return False
        free = self.free_bytes()
        if free is None:
            if time.monotonic() - self._last < self.fallback_s:
                return False
        elif free < self.threshold:
            return False
        self._last = time.monotonic()
        self._libc.malloc_trim(0)
        log.debug("memory trimmed free_heap_mb=%.1f", (free or 0) / 2**20)
        return True
