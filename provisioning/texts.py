"""Messages of the data center that a person reads in their language but a log or a script reads in English.

A `Reason` is a `str` whose value is the English text (what `str(e)`, a log line or ``--json`` shows, unchanged)
and which also knows its catalog msgid and arguments, so `shown` gives it in the current language
(`rekam-fleet`'s report lines and error messages, domain ``fleet``).
"""

from __future__ import annotations

from typing import Any

from firmware.system.i18n import gettext


class Reason(str):
    """English text that can be shown translated; mark the msgid with `N_` where it is written."""

    msgid: str
    kw: dict[str, Any]

    def __new__(cls, msgid: str, **kw: Any) -> Reason:
        self = super().__new__(cls, msgid.format(**kw) if kw else msgid)
        self.msgid, self.kw = msgid, kw
        return self

    def shown(self) -> str:
        """The text in the current language."""
        return gettext(self.msgid, **self.kw)


def shown(text: object) -> str:
    """`text` in the current language if it is a `Reason` (or an error whose message is one), else as it is."""
    if isinstance(text, BaseException) and len(text.args) == 1:
        text = text.args[0]
    return text.shown() if isinstance(text, Reason) else str(text)


def for_terminal(text: object, width: int | None = None) -> str:
    """`text` from outside (a kit's report, a name on a USB stick) as it may be printed on an operator's terminal.

    As it is if it is printable ASCII, else its `ascii()` form: quoted, every control character and non-ASCII
    letter escaped, so no terminal sequence moves the cursor or repaints a line (``\\r\\x1b[1A`` hid a row of
    ``kits list``) and no look-alike letter passes for another. Then cut to `width` characters (a table column),
    the cut marked with ``~``.
    """
    s = str(text)
    if not (s.isprintable() and s.isascii()):
        s = ascii(s)
    if width is not None and len(s) > width:
        s = s[: max(width - 1, 0)] + "~"
    return s
