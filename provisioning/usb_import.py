"""`rekam-fleet import PATH`: take a kit's USB mirror stick into the archive (when the network never came back).

PATH may be the stick's mount point, its ``rekam/`` folder, or one ``rekam/<kit_id>/`` folder (layout in
`firmware.wire.stick_layout`). Every record file is verified and stored through `Archive.store()`, the same door
the MQTT ingest uses, so importing records that already arrived over MQTT (or importing a stick twice) stores
nothing twice. Records are found from the index *and* by scanning ``records/`` (a yank can cost index
lines). The summary counts new, already had, and rejected records with their reasons; the exit status is
1 if anything was rejected or unreadable (a partial import: everything else was imported).

The stick is untrusted input: PATH itself is trusted (the operator chose it), everything beneath it is
opened with ``O_NOFOLLOW`` on every component, regular files only (a FIFO or device is refused without
blocking), each record at most ``--max-record-mb`` read (checked on the open file before a byte is read),
JSON bounded in size and depth. A symlinked, FIFO, oversized or too-deep file is one rejected line in the
report; the rest of the stick is still imported.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from firmware.errors import ProtocolError, UntrustedFile
from firmware.system.fsutil import open_dir_beneath, open_untrusted, read_untrusted
from firmware.system.i18n import N_, _, format_count
from firmware.wire import record_format as rf
from firmware.wire import stick_layout as L
from firmware.wire.ids import is_kit_id, parse_record_id
from firmware.wire.relay_protocol import MAX_RECORD_BYTES
from provisioning.archive import (
    ArchiveBase,
    ArchiveError,
    UnknownKit,
    add_archive_arguments,
    decode_kit_key,
    open_archive,
)
from provisioning.texts import Reason, for_terminal
from provisioning.texts import shown as _shown

MIB = 1024 * 1024
#: Largest record file read from a stick by default: the ingest's default cap (``--max-record-mb``).
DEFAULT_MAX_RECORD_BYTES = 64 * MIB


log = logging.getLogger(__name__)

#: Refusals listed one by one in a summary; the rest are counted (`ImportSummary.rejected_more`).
MAX_REJECTED_SHOWN = 1000
#: Record ids read from one kit folder (its index and its records/ folder, each): a kit writes ~100 a day, so a
#: million is decades of a kit's work (~400 GB); past it a stick is hostile or broken, and the rest is not read.
MAX_RECORDS_PER_KIT = 1_000_000


@dataclass
class ImportSummary:
    """Outcome of one import."""

    new: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (record id or file, reason), the first ones
    kits: list[str] = field(default_factory=list)
    rejected_more: int = 0  # refusals past MAX_REJECTED_SHOWN, counted only (a hostile stick can hold millions)

    def reject(self, what: str, why: str) -> None:
        """Note one refusal (its line kept while fewer than `MAX_REJECTED_SHOWN` are, else only counted)."""
        if len(self.rejected) < MAX_REJECTED_SHOWN:
            self.rejected.append((what, why))
        else:
            self.rejected_more += 1

    @property
    def rejected_count(self) -> int:
        return len(self.rejected) + self.rejected_more

    def as_dict(self) -> dict[str, Any]:
        return {"kits": self.kits, "new": len(self.new), "already_had": len(self.already),
                "rejected": [{"record": r, "reason": why} for r, why in self.rejected],
                "rejected_not_listed": self.rejected_more}


def _show(name: str) -> str:
    """A name from the stick as it may be printed (no control characters, no undecodable bytes)."""
    return for_terminal(name)


def _kind(st: os.stat_result) -> str:
    if stat.S_ISLNK(st.st_mode):
        return "a symlink"
    return "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"


@dataclass(frozen=True)
class KitFolder:
    """One ``rekam/<kit_id>/`` folder: `rel` beneath the trusted `root` (walked with O_NOFOLLOW)."""

    root: Path
    rel: str

    @property
    def path(self) -> Path:
        return self.root / self.rel if self.rel != "." else self.root

    @property
    def name(self) -> str:
        return self.path.name

    def sub(self, name: str) -> str:
        return name if self.rel == "." else f"{self.rel}/{name}"


def _lstat(root: Path, rel: str) -> os.stat_result | None:
    """lstat of `rel` beneath `root` without following a symlink on the way (None if absent or unreachable)."""
    parent, _, name = rel.rpartition("/")
    try:
        fd = open_dir_beneath(root, parent or ".")
    except OSError:
        return None
    try:
        return os.stat(name, dir_fd=fd, follow_symlinks=False)
    except OSError:
        return None
    finally:
        os.close(fd)


def find_kits(path: Path) -> tuple[list[KitFolder], list[tuple[str, str]]]:
    """The kit folders under PATH (mount point, rekam/ folder, or a kit folder), and those refused, with why."""
    st = _lstat(path, L.KIT_JSON)
    if st is not None:
        return [KitFolder(path, ".")], []
    rk = _lstat(path, L.ROOT)
    if rk is not None and not stat.S_ISDIR(rk.st_mode):
        return [], [(str(path / L.ROOT), f"is {_kind(rk)}: not read")]
    base = L.ROOT if rk is not None else "."
    found, refused = [], []
    try:
        fd = open_dir_beneath(path, base)
    except (FileNotFoundError, NotADirectoryError):
        return [], []
    try:
        with os.scandir(fd) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            rel = e.name if base == "." else f"{base}/{e.name}"
            if e.is_symlink():
                if is_kit_id(e.name):  # a kit folder elsewhere (stick.json and other names: checked where read)
                    refused.append((str(path / rel), Reason(N_("kit folder is a symlink: not read"))))
                continue
            if e.is_dir(follow_symlinks=False) and _lstat(path, f"{rel}/{L.KIT_JSON}") is not None:
                found.append(KitFolder(path, rel))
    finally:
        os.close(fd)
    return found, refused


def kit_dirs(path: Path) -> list[Path]:
    """The ``rekam/<kit_id>/`` folders under PATH (mount point, rekam/ folder, or a kit folder); never a symlink."""
    return [k.path for k in find_kits(path)[0]]


def _index(kit: KitFolder, summary: ImportSummary) -> set[str]:
    """The record ids the kit folder's index.jsonl lists; torn lines skipped, hostile lines and files reported.

    Only the ids are kept (the records/ scan reads each file anyway), and at most `MAX_RECORDS_PER_KIT`: an index
    may be 1 GiB (~5 M lines), which as parsed entries would be gigabytes of memory."""
    out: set[str] = set()
    where = str(kit.path / L.INDEX)
    try:
        with open_untrusted(kit.root, kit.sub(L.INDEX), L.MAX_INDEX_BYTES) as (fd, _), \
                open(fd, "rb", closefd=False) as f:
            for n, e in L.index_entries(f, where):
                if isinstance(e, ProtocolError):
                    if e.reason in L.HOSTILE_REASONS:
                        summary.reject(f"{where} line {n}", str(e))
                    continue  # a torn line (yank): the records/ scan finds its file anyway
                rid = e["record_id"]
                if parse_record_id(rid) is None:
                    summary.reject(f"{where} line {n}", Reason(N_("record_id {rid} is not a record id"),
                                                               rid=_show(rid[:80])))
                    continue
                if len(out) >= MAX_RECORDS_PER_KIT and rid not in out:
                    summary.reject(f"{where} line {n}", Reason(N_(
                        "the index lists more than {n} records: the rest of it is not read"), n=MAX_RECORDS_PER_KIT))
                    break
                out.add(rid)
    except FileNotFoundError:
        pass
    except OSError as e:
        summary.reject(where, Reason(N_("refused: {error}"), error=e))
    return out


def _record_files(kit: KitFolder, summary: ImportSummary) -> tuple[dict[str, str], set[str], bool]:
    """Record files in ``records/``: (id -> rel path of regular files, ids refused, whether records/ was refused).

    A name that is not ``<record id>.rkm`` is refused unread (it names nothing an archive can hold), and at most
    `MAX_RECORDS_PER_KIT` files are taken."""
    files: dict[str, str] = {}
    refused: set[str] = set()
    rel = kit.sub(L.RECORDS)
    try:
        fd = open_dir_beneath(kit.root, rel)
    except FileNotFoundError:
        return files, refused, False
    except OSError as e:
        summary.reject(str(kit.path / L.RECORDS), Reason(N_("refused: {error}"), error=e))
        return files, refused, True
    try:
        with os.scandir(fd) as it:
            for e in it:
                if not e.name.endswith(rf.FILE_SUFFIX):
                    continue
                rid = e.name[: -len(rf.FILE_SUFFIX)]
                if parse_record_id(rid) is None:
                    summary.reject(_show(e.name), Reason(N_("{name} is not named after a record id: not read"),
                                                         name=_show(e.name)))
                    continue
                if len(files) + len(refused) >= MAX_RECORDS_PER_KIT:
                    summary.reject(str(kit.path / L.RECORDS), Reason(N_(
                        "more than {n} record files: the rest are not read"), n=MAX_RECORDS_PER_KIT))
                    break
                try:
                    regular = e.is_file(follow_symlinks=False)
                    kind = "" if regular else _kind(e.stat(follow_symlinks=False))
                except OSError as err:  # gone since the listing (a yank, or a hostile device): that file only
                    summary.reject(_show(rid), Reason(N_("unreadable: {error}"), error=err.strerror or err))
                    refused.add(rid)
                    continue
                if regular:
                    files[rid] = f"{rel}/{e.name}"
                else:
                    refused.add(rid)
                    summary.reject(_show(rid), Reason(N_("{name} is {kind}: not read"), name=_show(e.name), kind=kind))
    finally:
        os.close(fd)
    return files, refused, False


def _stick_id(path: Path, summary: ImportSummary, kit_folder: bool) -> str:
    """The stick's id from its stick.json ("?" if none); a hostile stick.json is reported, never fatal."""
    places = [(path.parent, L.STICK_JSON)] if kit_folder else [(path, f"{L.ROOT}/{L.STICK_JSON}"), (path, L.STICK_JSON)]
    for root, rel in places:
        where = str(root / rel)
        try:
            sid = L.stick_id_of(L.parse_meta(read_untrusted(root, rel, L.MAX_STICK_JSON), where, L.MAX_STICK_JSON),
                                where)
            return sid or "?"
        except FileNotFoundError:
            continue
        except ProtocolError as e:
            if e.reason in L.HOSTILE_REASONS or e.reason == "malformed":
                summary.reject(where, str(e))
                return "?"
            continue  # torn: the records carry their own ids
        except OSError as e:
            summary.reject(where, Reason(N_("refused: {error}"), error=e))
            return "?"
    return "?"


class Progress:
    """A one-line text progress bar on stderr (no dependency, quiet when not a terminal)."""

    def __init__(self, total: int, label: str, out: TextIO = sys.stderr, enabled: bool | None = None) -> None:
        self.total, self.label, self.out = max(total, 1), label, out
        self.enabled = out.isatty() if enabled is None else enabled
        self.done = 0
        self._last = 0.0

    def step(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.1 or self.done >= self.total):
            self._last = now
            frac = self.done / self.total
            self.out.write(f"\r{self.label} [{'#' * int(frac * 30):30s}] {self.done}/{self.total}")
            if self.done >= self.total:
                self.out.write("\n")
            self.out.flush()


def import_stick(path: Path, archive: ArchiveBase, tofu: bool = False, progress: bool | None = None,
                 max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> ImportSummary:
    """Import every kit folder under `path` into `archive`; see the module doc.

    Never reads more than `max_record_bytes` of one record file, never follows a symlink below `path`;
    each refused file is one entry in `rejected` and the rest is still imported.
    """
    summary = ImportSummary()
    dirs, refused = find_kits(path)
    if not dirs and not refused:
        raise FileNotFoundError(_("{path}: no rekam/<kit_id>/kit.json found (is this a rekam stick?)", path=path))
    for what, why in refused:
        summary.reject(what, why)
    stick_id = _stick_id(path, summary, kit_folder=dirs[:1] == [KitFolder(path, ".")]) if dirs else "?"
    for kit in dirs:
        kdir = kit.path
        try:
            where = str(kdir / L.KIT_JSON)
            meta = L.parse_meta(read_untrusted(kit.root, kit.sub(L.KIT_JSON), L.MAX_KIT_JSON), where, L.MAX_KIT_JSON)
            kit_id, key_b64 = str(meta["kit_id"]), str(meta["kit_public_key"])
            decode_kit_key(key_b64)
        except (OSError, ValueError, KeyError, TypeError) as e:  # ProtocolError is a ValueError
            summary.reject(_show(str(kdir)), Reason(N_("kit.json unreadable: {error}"), error=e))
            continue
        if kit_id != kdir.name:
            summary.reject(_show(str(kdir)), Reason(N_("kit.json names kit {kit}, folder is {folder}"),
                                                              kit=_show(kit_id[:80]), folder=_show(kdir.name)))
            continue
        if not is_kit_id(kit_id):  # it names archive folders and database rows
            summary.reject(_show(str(kdir)), Reason(N_("{kit} is not a kit id"), kit=_show(kit_id[:80])))
            continue
        registered = archive.kit_key(kit_id)
        if registered is None:
            if not tofu:
                # A command that runs as printed: the archive named (register-kit requires --archive), quoted.
                cmd = shlex.join(["rekam-fleet", "archive", "register-kit", kit_id, key_b64, *archive.cli_args()])
                summary.reject(str(kdir), Reason(N_(
                    "kit {kit} is not registered (check the key against `rekam identity show` on the kit, then: "
                    "{cmd} ; or --tofu to trust the stick's kit.json)"), kit=kit_id, cmd=cmd))
                continue
            archive.register_kit(kit_id, key_b64, how="usb-tofu")
        summary.kits.append(kit_id)
        listed = _index(kit, summary)
        files, bad, records_refused = _record_files(kit, summary)
        ids = sorted((set(listed) | set(files)) - bad,
                     key=lambda r: ((p.seq if (p := parse_record_id(r)) else 0), r))
        bar = Progress(len(ids), f"{kit_id}", enabled=progress)
        for rid in ids:
            bar.step()
            rel = files.get(rid)
            if rel is None:
                if not records_refused:  # else already reported once for the whole folder
                    summary.reject(rid, Reason(N_("listed in the stick's index but its file is missing")))
                continue
            try:
                data = read_untrusted(kit.root, rel, max_record_bytes)
            except UntrustedFile as e:
                summary.reject(_show(rid), Reason(N_("refused: {error}"), error=e))
                continue
            except OSError as e:
                summary.reject(_show(rid), Reason(N_("unreadable: {error}"), error=e.strerror or e))
                continue
            try:
                r = archive.store(data, kit_id, f"usb:{stick_id}", expect_record_id=rid)
            except (UnknownKit, ArchiveError) as e:
                summary.reject(_show(rid), str(e))
                continue
            except Exception as e:  # a file no check foresaw: that file is refused, the rest of the stick imported
                log.exception("import failed on one record record_id=%s kit_id=%s", _show(rid), kit_id)
                summary.reject(_show(rid), Reason(N_("unexpected error, not imported: {error}"),
                                                  error=f"{type(e).__name__}: {str(e)[:200]}"))
                continue
            if r.status == "stored":
                summary.new.append(rid)
            elif r.status == "duplicate":
                summary.already.append(rid)
            else:
                summary.reject(_show(rid), r.reason)
    return summary


def cmd_import(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if not path.exists():
        print("rekam-fleet import: " + _("{path} does not exist", path=path), file=sys.stderr)
        return 2
    archive = open_archive(args.archive, args.objects)
    try:
        s = import_stick(path, archive, tofu=args.tofu, progress=None if not args.no_progress else False,
                         max_record_bytes=args.max_record_mb * MIB)
    except FileNotFoundError as e:
        print(f"rekam-fleet import: {e}", file=sys.stderr)
        return 2
    finally:
        archive.close()
    if args.json:
        print(json.dumps(s.as_dict(), indent=1))
    else:
        print(_("imported from {path}: kits {kits}", path=path, kits=", ".join(s.kits) or "-"))
        rows = ((_("new:"), len(s.new)), (_("already had:"), len(s.already)), (_("rejected:"), s.rejected_count))
        width = max(len(label) for label, _r in rows) + 1
        for label, count in rows:
            print(f"  {label:<{width}}{format_count(count)}")
        for rid, why in s.rejected:
            print(f"    {rid}: {_shown(why)}")
        if s.rejected_more:
            print("    " + _("... and {n} more not listed", n=format_count(s.rejected_more)))
    return 1 if s.rejected_count else 0


def register(sub: Any) -> None:
    """Add `import` to rekam-fleet."""
    p = sub.add_parser("import", help=_("import a kit's USB stick into an archive (idempotent with MQTT ingest)"))
    p.add_argument("path", help=_("stick mount point, its rekam/ folder, or one rekam/<kit_id>/ folder"))
    add_archive_arguments(p)
    p.add_argument("--tofu", action="store_true", help=_("register an unknown kit from the stick's kit.json"))
    p.add_argument("--json", action="store_true", help=_("print the summary as JSON"))
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--max-record-mb", type=_record_mb, default=DEFAULT_MAX_RECORD_BYTES // MIB,
                   help=_("largest record file read from the stick, MiB (larger ones are refused, never read)"))
    p.set_defaults(func=cmd_import)


def _record_mb(text: str) -> int:
    n = int(text)
    if not 1 <= n <= MAX_RECORD_BYTES // MIB:
        raise argparse.ArgumentTypeError(f"must be 1..{MAX_RECORD_BYTES // MIB}")
    return n
