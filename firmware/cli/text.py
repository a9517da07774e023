"""The CLI's words and numbers: messages from the `cli` catalog, sizes, counts and dates in one format.

PLACEHOLDER until firmware.system.i18n lands: English msgids returned as they are.
"""

from __future__ import annotations

from typing import Any


def _(msgid: str, **kw: Any) -> str:
    """`msgid` translated in the `cli` domain, then formatted with `kw`."""
    return msgid.format(**kw) if kw else msgid


def ngettext(singular: str, plural: str, n: int, **kw: Any) -> str:
    """Singular or plural form for `n`, formatted with `n` and `kw`."""
    return (singular if n == 1 else plural).format(n=n, **kw)


def format_count(n: int) -> str:
    return f"{n:,}"


def format_size(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{nbytes} B"
