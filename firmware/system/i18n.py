"""The message catalog: every string an operator reads, in Bahasa Indonesia first and English second.

Messages are gettext ``.po`` catalogs in ``firmware/locale/<lang>/LC_MESSAGES/<domain>.po``, read at run time
with Babel (no compile step: a kit update ships the text files; each is parsed once and cached). The msgids
are the English text, so English needs no translations and any missing translation falls back to English.

Domains are only a way to split the files between owners (``console`` for the web console and receipts,
``cli`` for the command line, ``daemon`` for what rekamd tells operators: guard reasons, API and config errors,
capture hints; ``fleet`` for `rekam-fleet` and the data center); a lookup searches all of them, so a module never
names its domain. `catalog` returns one domain for the browser.

Placeholders are ``{name}`` (str.format), filled from keyword arguments: ``_("{n} tries left", n=3)``. The
keyword ``lang`` is reserved (it picks a language for one call, as a server answering two browsers needs).

One formatter per kind of number, the same for every screen: `format_count` (thousands separators: ``1.234``
in Indonesian), `format_size` (binary units, labelled KiB/MiB/GiB; decimal comma in Indonesian),
`format_datetime` / `format_date` (Babel's CLDR patterns).

Strings marked with `N_` are extracted but not translated where written (tables of reasons, error codes):
translate them with `gettext` where they are shown.
"""

from __future__ import annotations

import contextvars
import datetime as _dt
from functools import cache
from pathlib import Path
from typing import Any

from babel.dates import format_date as _babel_format_date
from babel.dates import format_datetime as _babel_format_datetime
from babel.messages.pofile import read_po
from babel.numbers import format_decimal

#: Languages the kit speaks, the default first.
LANGUAGES: tuple[str, ...] = ("id", "en")
DEFAULT_LANGUAGE = "id"
#: Catalog domains (one .po file each per language).
DOMAINS: tuple[str, ...] = ("console", "cli", "daemon", "fleet")
#: Where the catalogs live (installed with the package).
LOCALE_DIR = Path(__file__).resolve().parent.parent / "locale"
#: Names of the marker functions the extractor looks for (tests/system/test_i18n.py).
KEYWORDS: dict[str, Any] = {"_": None, "gettext": None, "ngettext": (1, 2), "N_": None}

# The per-call language is a context variable, not a thread-local: a new thread starts with none (as a
# thread-local would), and an asyncio server's request context reaches the worker thread that runs the
# request's handler (the console API answers each browser in its own language).
_lang: contextvars.ContextVar[str | None] = contextvars.ContextVar("rekam_lang", default=None)
_default = DEFAULT_LANGUAGE


def normalize(lang: str | None) -> str:
    """`lang` if the kit speaks it (``id-ID`` and ``en_US`` count as ``id`` and ``en``), else the default."""
    if not lang:
        return _default
    base = lang.replace("_", "-").split("-", 1)[0].lower()
    return base if base in LANGUAGES else _default


def set_language(lang: str) -> None:
    """Make `lang` the language of every later call that names none (the kit's configured language)."""
    global _default
    base = (lang or "").replace("_", "-").split("-", 1)[0].lower()
    if base not in LANGUAGES:
        raise ValueError(f"unknown language {lang!r}; known: {', '.join(LANGUAGES)}")
    _default = base
    _lang.set(None)


def get_language() -> str:
    """The current language (this thread's override, else the kit's)."""
    return _lang.get() or _default


class use_language:  # noqa: N801 - used like a function: ``with use_language("en"): ...``
    """Context manager: this thread speaks `lang` inside the block (one request, one receipt)."""

    def __init__(self, lang: str | None) -> None:
        self.lang = normalize(lang) if lang else None
        self._token: contextvars.Token[str | None] | None = None

    def __enter__(self) -> str:
        if self.lang:
            self._token = _lang.set(self.lang)
        return get_language()

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _lang.reset(self._token)
            self._token = None


@cache
def _read(lang: str, domain: str) -> tuple[dict[str, Any], int]:
    """(msgid -> translation, number of plural forms) of one .po file; {} if it does not exist.

    A plural entry maps its singular msgid to the tuple of its forms. Fuzzy and empty translations are left
    out (they fall back to English).
    """
    path = LOCALE_DIR / lang / "LC_MESSAGES" / f"{domain}.po"
    if not path.is_file():
        return {}, 2
    with path.open("rb") as f:
        cat = read_po(f, locale=lang, domain=domain)
    out: dict[str, Any] = {}
    for msg in cat:
        if not msg.id or msg.fuzzy:
            continue
        if isinstance(msg.id, tuple | list):
            forms = tuple(msg.string) if isinstance(msg.string, tuple | list) else (msg.string,)
            if forms and all(forms):
                out[msg.id[0]] = forms
        elif msg.string:
            out[msg.id] = msg.string
    return out, cat.num_plurals


@cache
def _merged(lang: str) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for domain in DOMAINS:
        merged.update(_read(lang, domain)[0])
    return merged


def reload() -> None:
    """Forget the parsed catalogs (tests that edit a .po file)."""
    _read.cache_clear()
    _merged.cache_clear()


def catalog(lang: str, domain: str) -> dict[str, Any]:
    """One domain's translations as plain JSON-able data: msgid -> text, or -> list of plural forms."""
    if domain not in DOMAINS:
        raise KeyError(domain)
    messages, _n = _read(normalize(lang), domain)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in messages.items()}


def plural_index(n: int, lang: str | None = None) -> int:
    """Which plural form `n` takes: Indonesian has one form, English two (1 / other)."""
    return 0 if normalize(lang or get_language()) == "id" else (0 if n == 1 else 1)


def _fill(text: str, fallback: str, kw: dict[str, Any]) -> str:
    if not kw:
        return text
    try:
        return text.format(**kw)
    except (KeyError, IndexError, ValueError):
        # A broken translation must never hide the message: show the English one.
        return fallback.format(**kw)


def gettext(msgid: str, lang: str | None = None, **kw: Any) -> str:
    """`msgid` in `lang` (default: the current language), placeholders ``{name}`` filled from `kw`."""
    lang = normalize(lang) if lang else get_language()
    text = _merged(lang).get(msgid, msgid) if lang != "en" else msgid
    if isinstance(text, tuple):
        text = text[0]
    return _fill(text, msgid, kw)


_ = gettext


def ngettext(singular: str, plural: str, n: int, lang: str | None = None, **kw: Any) -> str:
    """The form of a message for the count `n` (``{n}`` is filled with `n` formatted by `format_count`)."""
    lang = normalize(lang) if lang else get_language()
    kw.setdefault("n", format_count(n, lang))
    english = singular if n == 1 else plural
    forms = _merged(lang).get(singular) if lang != "en" else None
    if isinstance(forms, tuple):
        text = forms[min(plural_index(n, lang), len(forms) - 1)]
    else:
        text = english
    return _fill(text, english, kw)


def N_(msgid: str) -> str:  # noqa: N802 - the gettext convention
    """Mark `msgid` for extraction without translating it here."""
    return msgid


def format_count(n: int | float, lang: str | None = None) -> str:
    """A count with thousands separators: ``205.569`` in Indonesian, ``205,569`` in English."""
    return format_decimal(n, locale=normalize(lang) if lang else get_language())


_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_size(nbytes: int | float, lang: str | None = None) -> str:
    """A size in binary units labelled as such: ``512 B``, ``347,0 KiB``, ``73,5 GiB`` (one decimal)."""
    lang = normalize(lang) if lang else get_language()
    value = float(nbytes)
    if abs(value) < 1024:
        return f"{format_decimal(int(value), locale=lang)} B"
    unit = 0
    while abs(value) >= 1024 and unit < len(_UNITS) - 1:
        value /= 1024
        unit += 1
    return f"{format_decimal(value, format='#,##0.0', locale=lang)} {_UNITS[unit]}"


def _as_datetime(when: _dt.datetime | float | int, tz: _dt.tzinfo | None) -> _dt.datetime:
    if isinstance(when, int | float):
        return _dt.datetime.fromtimestamp(when, tz or _dt.UTC)
    if when.tzinfo is None:
        return when.replace(tzinfo=tz or _dt.UTC)
    return when.astimezone(tz) if tz else when


def format_datetime(when: _dt.datetime | float | int, lang: str | None = None, fmt: str = "medium",
                    tz: _dt.tzinfo | None = None) -> str:
    """A date and time (a datetime or epoch seconds) in the language's pattern: ``1 Des 2026, 20.01.05``."""
    lang = normalize(lang) if lang else get_language()
    moment = _as_datetime(when, tz)
    text = _babel_format_datetime(moment, fmt, tzinfo=moment.tzinfo, locale=lang)
    # The kit's clock is UTC; say so, a field team is in WIB, WITA or WIT.
    return f"{text} UTC" if moment.utcoffset() == _dt.timedelta(0) else text


def format_date(day: _dt.date, lang: str | None = None, fmt: str = "long") -> str:
    """A date spelled out: ``12 Maret 1990`` / ``March 12, 1990``."""
    return _babel_format_date(day, fmt, locale=normalize(lang) if lang else get_language())


def localize_argparse() -> None:
    """Let argparse's own words ("usage:", "error:", "options", ...) come from this catalog.

    argparse looks its messages up through the module-global names ``_`` and ``ngettext`` it imported from
    the stdlib `gettext` (domain ``messages``; no catalog is installed on a kit). Rebinding those two names
    is the smallest honest hook: argparse's msgids (``usage: ``, ``%(prog)s: error: %(message)s\\n``, ...) are
    translated in ``cli.po`` with their ``%`` placeholders, which argparse fills itself. Call it before
    building a parser (help texts are looked up when formatted, in the language current then).
    """
    import argparse

    argparse._ = gettext  # type: ignore[attr-defined]
    argparse.ngettext = lambda s, p, n: gettext(s if n == 1 else p)  # type: ignore[attr-defined]
