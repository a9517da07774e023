"""The message catalog: every user-visible string has an Indonesian translation; the formatters follow one rule.

Msgids are extracted as a translator's tool would (Babel's extractors): from the Python sources (calls of
``_``, ``gettext``, ``ngettext``, ``N_``), from the console's JavaScript (``t("...")``, ``tn("...", "...", n)``)
and from its HTML (``data-i18n="..."`` and ``data-i18n-<attr>="..."``). Each must have a non-empty Indonesian
translation with the same ``{placeholders}``.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest
from babel.messages.extract import extract_from_dir

from firmware.system import i18n

ROOT = Path(__file__).resolve().parents[2]
PLACEHOLDER = re.compile(r"\{(\w+)\}")
HTML_MARK = re.compile(r'data-i18n(?:-[a-z]+)?="([^"]+)"')
JS_KEYWORDS = {"t": None, "tn": (1, 2)}


def extract(root: Path) -> dict[tuple[str, ...], str]:
    """msgid (a 1-tuple, or (singular, plural)) -> where it was found, for every marked string under `root`."""
    found: dict[tuple[str, ...], str] = {}
    method_map = [("**.py", "python"), ("**.js", "javascript")]
    options = {"**.js": {"keywords": JS_KEYWORDS}}

    def keywords_for(filename: str):
        return JS_KEYWORDS if filename.endswith(".js") else i18n.KEYWORDS

    for method in ("python", "javascript"):
        pattern = "**.py" if method == "python" else "**.js"
        for fname, lineno, msg, _c, _ctx in extract_from_dir(
                root, [m for m in method_map if m[0] == pattern], options_map=options,
                keywords=keywords_for(pattern), comment_tags=()):
            msgid = tuple(msg) if isinstance(msg, tuple) else (msg,)
            if all(msgid):
                found.setdefault(msgid, f"{fname}:{lineno}")
    for html in sorted(root.rglob("*.html")):
        for lineno, line in enumerate(html.read_text(encoding="utf-8").splitlines(), 1):
            for m in HTML_MARK.finditer(line):
                found.setdefault((m.group(1).replace("&amp;", "&"),), f"{html.relative_to(root)}:{lineno}")
    return found


def problems(found: dict[tuple[str, ...], str], lang: str = "id") -> list[str]:
    """One line per msgid with no usable translation in `lang`."""
    merged: dict[str, object] = {}
    for domain in i18n.DOMAINS:
        merged.update(i18n.catalog(lang, domain))
    out = []
    for msgid, where in sorted(found.items(), key=lambda kv: kv[1]):
        tr = merged.get(msgid[0])
        if not tr:
            out.append(f"{where}: no {lang} translation for {msgid[0]!r}")
            continue
        forms = tr if isinstance(tr, list) else [tr]
        want = set(PLACEHOLDER.findall(msgid[-1]))
        for form in forms:
            have = set(PLACEHOLDER.findall(form))
            if have != want:
                out.append(f"{where}: placeholders of {msgid[0]!r} are {sorted(want)}, {lang} has {sorted(have)}")
    return out


def test_every_user_visible_string_has_an_indonesian_translation() -> None:
    found = extract(ROOT / "firmware")
    assert len(found) > 100  # the console's texts are found (a broken extractor must not pass)
    bad = problems(found)
    assert not bad, "translate in firmware/locale/id/LC_MESSAGES/<domain>.po:\n" + "\n".join(bad)


def test_rekam_fleet_strings_have_an_indonesian_translation() -> None:
    """Data-center staff read `rekam-fleet` (provisioning/) in Indonesian too (domain ``fleet``)."""
    found = extract(ROOT / "provisioning")
    assert len(found) > 50  # its help texts and report lines are found
    bad = problems(found)
    assert not bad, "translate in firmware/locale/id/LC_MESSAGES/fleet.po:\n" + "\n".join(bad)


def test_every_catalog_file_is_a_loaded_domain() -> None:
    """A .po file that no domain names would be silently ignored: each one present is loaded."""
    for lang in i18n.LANGUAGES:
        present = {p.stem for p in (i18n.LOCALE_DIR / lang / "LC_MESSAGES").glob("*.po")}
        assert present == set(i18n.DOMAINS), (lang, present)


def test_the_check_catches_an_untranslated_string(tmp_path: Path) -> None:
    """The check above is not vacuous: a new string in Python, JS or HTML without a translation is reported."""
    (tmp_path / "mod.py").write_text('from firmware.system.i18n import _\nMSG = _("A string nobody translated {x}")\n')
    (tmp_path / "app.js").write_text('el.textContent = t("Another untranslated JS string");\n')
    (tmp_path / "page.html").write_text('<p data-i18n="An untranslated heading"></p>\n')
    bad = problems(extract(tmp_path))
    assert len(bad) == 3, bad


def test_english_is_the_msgid_and_indonesian_is_the_default() -> None:
    assert i18n.LANGUAGES[0] == "id" == i18n.DEFAULT_LANGUAGE
    assert i18n.normalize("id-ID") == "id" and i18n.normalize("en_US") == "en" and i18n.normalize("fr") == "id"
    with pytest.raises(ValueError):
        i18n.set_language("fr")
    assert i18n.gettext("A message with no translation {x}", lang="id", x=1) == "A message with no translation 1"


def test_counts_sizes_and_dates_follow_one_rule() -> None:
    assert i18n.format_count(205569, lang="id") == "205.569"
    assert i18n.format_count(205569, lang="en") == "205,569"
    assert i18n.format_size(512, lang="id") == "512 B"
    assert i18n.format_size(347 * 1024, lang="id") == "347,0 KiB"
    assert i18n.format_size(int(73.5 * 2**30), lang="id") == "73,5 GiB"
    assert i18n.format_size(int(73.5 * 2**30), lang="en") == "73.5 GiB"
    assert i18n.format_date(dt.date(1990, 3, 12), lang="id") == "12 Maret 1990"
    when = dt.datetime(2026, 12, 1, 20, 1, 5, tzinfo=dt.UTC)
    assert i18n.format_datetime(when, lang="id") == "1 Des 2026 20.01.05 UTC"
    assert i18n.format_datetime(when.timestamp(), lang="en").endswith("UTC")


def test_plural_forms() -> None:
    # English: one / other; Indonesian: one form for every n.
    assert i18n.ngettext("{n} try left", "{n} tries left", 1, lang="en") == "1 try left"
    assert i18n.ngettext("{n} try left", "{n} tries left", 4, lang="en") == "4 tries left"
    assert i18n.ngettext("{n} try left", "{n} tries left", 1, lang="id") == "sisa 1 kali percobaan"
    assert i18n.ngettext("{n} try left", "{n} tries left", 4, lang="id") == "sisa 4 kali percobaan"


def test_use_language_is_per_thread_and_restores() -> None:
    before = i18n.get_language()
    with i18n.use_language("en"):
        assert i18n.get_language() == "en"
    assert i18n.get_language() == before
