"""The daemon's allocator hygiene (firmware/system/memory.py) on this machine's real glibc."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# In a child, so the test's own heap (and pytest's) is not what is measured.
CHILD = textwrap.dedent("""
    import sys
    from firmware.system import memory

    def rss():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024

    assert memory.limit_arenas(2)
    t = memory.Trimmer(threshold=8 << 20)
    assert not t.maybe_trim(), "nothing was freed yet"
    # 1,000-byte objects: above pymalloc's limit, below the mmap threshold, so they live in glibc's
    # heap; the last one stays alive, so the freed pages are not at the top and stay resident.
    blocks = [bytes(1000) + bytes([i % 251]) for i in range(60_000)]
    keep = blocks[-1]
    before = rss()
    del blocks
    freed = t.free_bytes()
    held = rss()
    trimmed = t.maybe_trim()
    after = rss()
    print(before, freed, held, trimmed, after, len(keep))
""")


def test_trim_returns_freed_heap_pages() -> None:
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, check=True)
    before, freed, held, trimmed, after, _ = out.stdout.split()
    assert int(freed) > 40 << 20, "glibc's counters do not show the freed 60 MB"
    assert int(held) > int(before) - (10 << 20), "the freed pages were returned without a trim: test says nothing"
    assert trimmed == "True"
    assert int(held) - int(after) > 40 << 20, f"RSS {int(held) >> 20} -> {int(after) >> 20} MiB"
