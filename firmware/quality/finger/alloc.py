"""Keep large numpy temporaries in the heap instead of fresh mmap()s (glibc only).

The quality check allocates a few dozen short-lived arrays of 0.1-1 MB per image. With glibc's
default (dynamic) mmap threshold every one of them is a fresh mmap/munmap, i.e. page faults on
first touch; on the x86 dev machine that was ~35 % of the check's time (13.5 -> 10 ms per
image). Raising M_MMAP_THRESHOLD and M_TRIM_THRESHOLD lets the freed blocks be reused. The cost
is that the process keeps its peak heap (a few tens of MB here) instead of returning it at once.

Process-wide, so it is explicit: the daemon's quality checker (`quality.checker_from_config`),
the CLI and the benchmark call `tune()`; plain `assess()` does not.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 64 * 1024 * 1024
_done = False


def tune() -> bool:
    """Raise glibc's mmap/trim thresholds once; returns False where that is not possible."""
    global _done
    if _done:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and \
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    except (OSError, AttributeError) as e:  # not glibc (musl, macOS): nothing to tune
        log.debug("malloc tuning unavailable error=%s", e)
        return False
    _done = ok
    log.info("malloc tuning mmap_threshold=%d trim_threshold=%d ok=%s", MMAP_THRESHOLD, TRIM_THRESHOLD, ok)
    return ok
