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
