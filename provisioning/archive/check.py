"""`rekam-fleet archive check`: read archived records back and compare each with its index hash (a scrub).

Bit rot on the archive's disk, an object-store lifecycle rule or a hand deleting objects, a restore from a
backup that missed some: the index still lists the record, and the ABIS export fails on it one day, long after
the kit that sealed it purged its copies. The check walks the index in archive order (`since()`), reads each
record through the backend's `read()` (the hash check the export makes), and names every record whose bytes are
missing or no longer match. It changes nothing: what to do with a damaged record (restore it from a backup, or
ask the kit's supervisor for its stick if the kit still holds it) is an operator's decision.

Bounded: one record in memory at a time; `--max-mb-s` paces the reads (the same disk or object store serves the
ingest and the export); `--limit` stops after that many records and `--state FILE` keeps the cursor, so a
nightly slice of a large archive goes on where the last one stopped; a pass that reaches the end starts the next
one from the beginning. A run of unreadable records in a row (the object store or disk is down, not one record
damaged) stops the check instead of listing the whole archive as unreadable.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firmware.errors import ArchivedRecordCorrupt, ArchivedRecordMissing, ArchiveError, ProtocolError
from firmware.system.fsutil import atomic_write
from firmware.system.i18n import _, format_count
from firmware.wire import safejson
from provisioning.archive import ArchiveBase, add_archive_arguments, open_archive

log = logging.getLogger("rekam.fleet.check")

PAGE = 200  # index rows per `since()` page
MAX_LISTED = 1000  # record ids kept per kind of problem (the counts are exact; the log names every one)
UNREADABLE_IN_A_ROW = 20  # then the store itself is down: stop
STATE_MAX_BYTES = 64 * 1024


@dataclass
class CheckReport:
    """What one run found. `cursor` is where the next run goes on (None: the pass reached the end)."""

    checked: int = 0
    bytes: int = 0
    missing: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: {"missing": 0, "corrupt": 0, "unreadable": 0})
    cursor: str | None = None
    complete: bool = False
    aborted: str = ""

    @property
    def problems(self) -> int:
        """Records found missing, corrupt or unreadable."""
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"checked": self.checked, "bytes": self.bytes, "counts": dict(self.counts), "missing": self.missing,
                "corrupt": self.corrupt, "unreadable": self.unreadable, "cursor": self.cursor,
                "complete": self.complete, "aborted": self.aborted}

    def _note(self, kind: str, record_id: str) -> None:
        self.counts[kind] += 1
        listed = getattr(self, kind)
        if len(listed) < MAX_LISTED:
            listed.append(record_id)


def check(archive: ArchiveBase, cursor: str | None = None, limit: int | None = None,
          max_bytes_per_s: float | None = None, stop: threading.Event | None = None,
          progress: Callable[[CheckReport], None] | None = None) -> CheckReport:
    """Read back the records archived after `cursor` (None: from the first), at most `limit`, paced to
    `max_bytes_per_s`; see the module doc. Never raises for a damaged record; `ArchiveError` only from listing
    the index."""
    rep = CheckReport(cursor=cursor)
    started = time.monotonic()
    in_a_row = 0
    while True:
        rows = archive.since(rep.cursor, PAGE)
        if not rows:
            rep.complete, rep.cursor = True, None
            return rep
        for r in rows:
            if (limit is not None and rep.checked >= limit) or (stop is not None and stop.is_set()):
                return rep
            try:
                rep.bytes += len(archive.read(r.record_id))
                in_a_row = 0
            except (ArchivedRecordMissing, KeyError):
                rep._note("missing", r.record_id)
                log.error("archived record missing record_id=%s kit_id=%s", r.record_id, r.kit_id)
                in_a_row = 0
            except ArchivedRecordCorrupt:
                rep._note("corrupt", r.record_id)
                log.error("archived record corrupt record_id=%s kit_id=%s sha256=%s", r.record_id, r.kit_id,
                          r.sha256[:12])
                in_a_row = 0
            except ArchiveError as e:
                rep._note("unreadable", r.record_id)
                log.error("archived record unreadable record_id=%s error=%s", r.record_id, e)
                in_a_row += 1
                if in_a_row >= UNREADABLE_IN_A_ROW:
                    rep.aborted = str(e)
                    return rep  # the cursor stays before this run of failures: the next run reads them again
                continue
            rep.checked += 1
            rep.cursor = r.cursor
            if progress is not None:
                progress(rep)
            if max_bytes_per_s:
                ahead = rep.bytes / max_bytes_per_s - (time.monotonic() - started)
                if ahead > 0:
                    (stop.wait if stop is not None else time.sleep)(ahead)


def load_state(path: Path) -> dict[str, Any]:
    """The check's state file (cursor, last complete pass), or {} if there is none. Bounded and parsed by
    `safejson` like any file an operator could have edited."""
    try:
        with open(path, "rb") as f:
            raw = f.read(STATE_MAX_BYTES + 1)
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ArchiveError(f"{path}: cannot read the check state file: {e}") from e
    try:
        st = safejson.loads_object(raw, max_bytes=STATE_MAX_BYTES, what=str(path))
    except ProtocolError as e:
        raise ArchiveError(f"not a check state file: {e}") from e
    if not isinstance(st.get("cursor"), str | None):
        raise ArchiveError(f"{path}: not a check state file (cursor)")
    return st


def cmd_check(args: argparse.Namespace) -> int:
    """`rekam-fleet archive check`: exit 0 when every record read back intact, 1 when some did not, 2 when the
    check had to stop (the store unreadable)."""
    state_path = Path(args.state) if args.state else None
    try:
        st = load_state(state_path) if state_path else {}
    except ArchiveError as e:
        print("rekam-fleet archive check: " + str(e), file=sys.stderr)
        return 2
    archive = open_archive(args.archive, args.objects)
    try:
        rep = check(archive, st.get("cursor"), args.limit, args.max_mb_s * 1024 * 1024 if args.max_mb_s else None)
    finally:
        archive.close()
    if state_path:
        st = {"archive": args.archive, "cursor": rep.cursor, "checked_at": int(time.time()),
              "last_complete_pass_at": int(time.time()) if rep.complete else st.get("last_complete_pass_at")}
        atomic_write(state_path, json.dumps(st, indent=1).encode(), verify=False)
    if args.json:
        print(json.dumps(rep.as_dict(), indent=1))
    else:
        print(_("{n} records read back ({mb} MB): {missing} missing, {corrupt} corrupt, {unreadable} unreadable",
                n=format_count(rep.checked), mb=format_count(rep.bytes // 1_000_000), missing=rep.counts["missing"],
                corrupt=rep.counts["corrupt"], unreadable=rep.counts["unreadable"]))
        for kind, label in (("missing", _("missing")), ("corrupt", _("corrupt")), ("unreadable", _("unreadable"))):
            for rid in getattr(rep, kind):
                print(f"  {label}: {rid}")
        if rep.aborted:
            print(_("stopped: the archive cannot be read ({error})", error=rep.aborted))
        elif rep.complete:
            print(_("the pass reached the end of the archive"))
        else:
            print(_("stopped at --limit: run again with the same --state to go on"))
    if rep.aborted:
        return 2
    return 1 if rep.problems else 0


def register(ks: Any) -> None:
    """Add `check` to the `rekam-fleet archive` commands (`ks`: their subparsers)."""
    r = ks.add_parser("check", help=_("read every archived record back and compare it with its index hash"))
    add_archive_arguments(r)
    r.add_argument("--limit", type=int, help=_("stop after this many records (with --state: go on next time)"))
    r.add_argument("--state", help=_("file that keeps where the check stopped (created if missing)"))
    r.add_argument("--max-mb-s", type=float, default=50.0,
                   help=_("read at most this many MB per second (0: unpaced); default 50"))
    r.add_argument("--json", action="store_true", help=_("print the report as JSON"))
    r.set_defaults(func=cmd_check)
