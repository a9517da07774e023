"""`rekam-fleet export`: archived records as ANSI/NIST-ITL (`.an2`) or MOSIP CBEFF (`.xml`), the ABIS queue.

One output file per record, `<record_id>.an2` / `<record_id>.xml`, written atomically (temp, fsync, rename,
fsync dir). The output folder keeps its own queue state in `.rekam-export.json`: the archive cursor per
format (the next run without `--since` exports only what was archived after it) and the records that
failed (retried first on every run until they export). Output is a function of the record and of the kit's
clock correction covering it (below), so a second export of a record writes identical bytes, or nothing when
the file is already there.

Clock corrections (issue #18; `--fleet-db`): a record whose sealed header says ``clock_synced: false`` and whose
seq a signed correction segment with an offset covers (kept by the fleet registry from the kit's telemetry, read
through `ArchiveBase.clock_segment`) is exported at ``time + offset_s`` (AN2K 2.008/2.010, Type-1 DAT/GMT,
FCD/PHD/ICD, the ISO capture times, CBEFF CreationDate), 2.009 staying as sealed and the offset recorded in
AN2K 2.018 and the CBEFF's outer ``Others``. Output files are written once per content; a correction that
arrives after its records were exported changes that content, so every queue run first re-exports the records
this folder already exported (archive cursor at most the saved one) that a correction kept since the last run
covers: each file is replaced atomically, listed in ``corrected`` and logged (``export corrected ...``). The
registry's correction id is this format's ``corrections_cursor`` in the state file (ids grow in commit order:
`provisioning.registry_db`); the records of a segment are found by seq range (`records_in_range`). Records that
are not covered, synced or have a null offset are not rewritten (an ABIS that took them away gets no copy).
Without `--fleet-db` the export is what it was before corrections existed.

Every record is verified against the kit keys the archive registered (`Archive.kit_keys`), then decrypted
with the data-center key. A record that cannot be exported is reported by id with a code and a reason and
makes the exit status 1; it never stops the others.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from firmware.errors import ArchiveError, ExportError, RecordFormatError
from firmware.system.fsutil import atomic_write
from firmware.system.i18n import _, format_count
from firmware.wire import record_format as rf
from firmware.wire.ids import parse_record_id
from provisioning.archive import ArchiveBase, add_archive_arguments, open_archive
from provisioning.registry_db import is_dsn
from provisioning.usb_import import Progress  # the one text progress bar of rekam-fleet

FORMATS = {"an2k": ".an2", "cbeff": ".xml"}
STATE_FILE = ".rekam-export.json"
LOCK_FILE = ".rekam-export.lock"
PAGE = 200  # records per archive page; the cursor is saved after each page


def _open_archive(args: argparse.Namespace) -> ArchiveBase:
    """The archive named on the command line: a directory (embedded) or a PostgreSQL DSN with --objects; with
    --fleet-db, the fleet registry whose clock corrections it applies."""
    return open_archive(args.archive, args.objects, fleet_db=args.fleet_db or None)


#: A clock correction for one record as a worker process receives it: (offset_s, source, first_seq, last_seq).
Fix = tuple[float, str, int, int]


@dataclass(frozen=True)
class Options:
    """What shapes the output (the same options give the same bytes)."""

    fmt: str
    agency: str = ""
    tot: str = "ENR"
    uncompressed: bool = False


@dataclass
class Summary:
    """What one run did."""

    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (record id, code, message)
    cursor: str | None = None
    corrected: list[str] = field(default_factory=list)  # re-exported (also in `written`): a late clock correction

    def as_dict(self) -> dict[str, Any]:
        return {"written": self.written, "unchanged": self.unchanged, "cursor": self.cursor,
                "failed": [{"record_id": r, "code": c, "reason": m} for r, c, m in self.failed],
                "corrected": self.corrected}


def convert(data: bytes, kit_keys: list[bytes], dc_key: Any, opts: Options, record_id: str, kit_id: str,
            fix: Fix | None = None) -> bytes:
    """One sealed record -> the bytes of its interchange file; raises `ExportError` (with a code). `fix`: the kit's
    clock correction segment covering the record (applied when the sealed header says ``clock_synced: false``)."""
    return _convert(data, kit_keys, dc_key, opts, record_id, kit_id, fix)[0]


def _convert(data: bytes, kit_keys: list[bytes], dc_key: Any, opts: Options, record_id: str, kit_id: str,
             fix: Fix | None) -> tuple[bytes, bool]:
    """`convert`, and whether `fix` was applied."""
    from provisioning.interchange import an2k, cbeff
    from provisioning.interchange.enrollment import read_enrollment

    if not kit_keys:
        raise ExportError("unknown_kit", f"record {record_id}: kit {kit_id} has no registered key in the archive")
    try:
        p = rf.parse(data)
        if p.header.kit_key not in kit_keys:
            raise ExportError("bad_signature", f"record {record_id} is signed by key {rf.key_id(p.header.kit_key)}, "
                                               f"not by a registered key of kit {kit_id}")
        if p.header.record_id != record_id or p.header.kit_id != kit_id:
            raise ExportError("record_mismatch", f"archived file of {record_id} holds record {p.header.record_id} "
                                                 f"of kit {p.header.kit_id}")
        hdr, plain = rf.open_record(data, dc_key, trusted_kit_key=p.header.kit_key)
        payload = rf.Payload.decode(plain)
    except rf.WrongKey as e:
        raise ExportError("wrong_key", str(e)) from None
    except rf.BadSignature as e:
        raise ExportError("bad_signature", str(e)) from None
    except (RecordFormatError, KeyError, TypeError, AttributeError) as e:  # the manifest's attachment list is kit-made
        raise ExportError("bad_record", f"record {record_id}: {type(e).__name__}: {e}") from None
    # The header is what the correction is about (firmware.wire.clock_correction): unsynced, and its seq covered.
    applies = fix is not None and not hdr.clock_synced and fix[2] <= hdr.seq <= fix[3]
    e = read_enrollment(hdr, payload, fix[0] if applies and fix else None, fix[1] if applies and fix else "")
    if opts.fmt == "an2k":
        return an2k.build(e, opts.agency, opts.tot, opts.uncompressed), applies
    out = cbeff.build(e)
    cbeff.validate(out)
    return out, applies


def _may_apply(data: bytes, fix: Fix | None) -> bool:
    """False when `fix` certainly does not apply to the sealed record `data` (none, or its header says the clock
    was synchronised): the header only, no decryption, no conversion. A record that does not parse: True (its
    conversion reports why)."""
    if fix is None:
        return False
    try:
        return not rf.parse(data).header.clock_synced
    except RecordFormatError:
        return True


_KEYS: dict[bytes, Any] = {}


def _convert_job(job: tuple[bytes, list[bytes], bytes, Options, str, str, Fix | None]) -> tuple[str, bytes, str, bool]:
    """`convert` as a picklable job for a worker process: ("ok", output, "", correction applied) or
    (code, b"", message, False)."""
    data, keys, raw_key, opts, rid, kit, fix = job
    if raw_key not in _KEYS:
        _KEYS[raw_key] = rf.load_datacenter_private_key(raw_key)
    try:
        out, applied = _convert(data, keys, _KEYS[raw_key], opts, rid, kit, fix)
        return "ok", out, "", applied
    except ExportError as e:
        return e.code, b"", str(e), False
    except Exception as e:  # an image codec's own error on kit-made bytes: this record fails, never the run
        return "convert_failed", b"", f"record {rid}: {type(e).__name__}: {e}", False


class Exporter:
    """Exports archived records into one output folder (see module doc). Not thread-safe; one per process.

    `stream` gets the progress: a bar when it is a terminal (`usb_import.Progress`), `key=value` log lines
    otherwise.
    """

    def __init__(self, archive: ArchiveBase, dc_key: Any, out: Path, opts: Options, stream: TextIO = sys.stderr,
                 progress: bool | None = None, jobs: int = 1) -> None:
        from cryptography.hazmat.primitives import serialization

        self.archive, self.out, self.opts, self.stream = archive, Path(out), opts, stream
        # Raw bytes: what a worker process can receive (key objects do not pickle).
        self._raw_key = dc_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                             serialization.NoEncryption())
        self.jobs = max(1, jobs)
        self.pool: Any = None
        self.tty = stream.isatty() if progress is None else progress
        self.suffix = FORMATS[opts.fmt]
        self._keys: dict[str, list[bytes]] = {}
        self.out.mkdir(parents=True, exist_ok=True)

    # --- state ---------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        try:
            raw = (self.out / STATE_FILE).read_bytes()
        except FileNotFoundError:
            return {}
        try:
            st = json.loads(raw)
        except ValueError as e:
            raise ExportError("bad_state", f"{self.out / STATE_FILE} is not JSON ({e}); move it away to restart "
                                           "the queue from the beginning") from None
        return st if isinstance(st, dict) else {}

    def _save(self, st: dict[str, Any]) -> None:
        atomic_write(self.out / STATE_FILE, (json.dumps(st, indent=1, sort_keys=True) + "\n").encode(), verify=False)

    def saved_cursor(self) -> str | None:
        """Where the queue of this format stands in this folder (None: nothing exported yet)."""
        return self._state().get(self.opts.fmt, {}).get("cursor")

    # --- one record ----------------------------------------------------------------------------

    def _load(self, record_id: str, kit_id: str | None) -> tuple[bytes, list[bytes], str, Fix | None]:
        """(sealed bytes, the kit's registered keys, kit id, the clock correction covering its seq) of an archived
        record; raises `ExportError`."""
        try:
            # a record id names its kit and seq (the header is checked against them in `convert`)
            parsed = parse_record_id(record_id)
            if parsed is None:
                raise ExportError("not_archived", f"{record_id[:80]!r} is not a record id")
            kit_id = kit_id or parsed.kit_id
            data = self.archive.read(record_id)
            if kit_id not in self._keys:
                self._keys[kit_id] = self.archive.kit_keys(kit_id)
            seg = self.archive.clock_segment(kit_id, parsed.seq)
        except KeyError:
            raise ExportError("not_archived", f"record {record_id} is not in the archive") from None
        except ArchiveError as e:
            raise ExportError("archive_error", str(e)) from None
        fix = (seg.offset_s, seg.source, seg.first_seq, seg.last_seq) if seg is not None else None
        return data, self._keys[kit_id], kit_id, fix

    def _write(self, record_id: str, out: bytes) -> tuple[str, str, str]:
        path = self.out / (record_id + self.suffix)
        try:
            if path.read_bytes() == out:
                return "unchanged", "", ""
        except FileNotFoundError:
            pass
        try:
            atomic_write(path, out, verify=False)
        except OSError as e:
            return "failed", "write_failed", f"cannot write {path}: {e}"
        return "written", "", ""

    def export_one(self, record_id: str, kit_id: str | None = None) -> tuple[str, str, str]:
        """(status, code, message) for one record: written / unchanged / failed."""
        return self._export_many([(record_id, kit_id)])[0]

    def _export_many(self, items: list[tuple[str, str | None]],
                     only_corrected: bool = False) -> list[tuple[str, str, str]]:
        """Export (record id, kit id or None) pairs, converting in `jobs` processes; results in order.
        `only_corrected`: write only records a clock correction applies to (the others: ("skipped", "", ""))."""
        loaded: list[tuple[bytes, list[bytes], str, Fix | None] | tuple[str, str, str]] = []
        for rid, kit in items:
            try:
                got = self._load(rid, kit)
            except ExportError as e:
                loaded.append(("failed", e.code, str(e)))
                continue
            if only_corrected and not _may_apply(got[0], got[3]):
                loaded.append(("skipped", "", ""))  # synced, or no offset: converting would give the same bytes
            else:
                loaded.append(got)
        jobs = [(got[0], got[1], self._raw_key, self.opts, rid, got[2], got[3])
                for (rid, _k), got in zip(items, loaded, strict=True) if isinstance(got[0], bytes)]
        if self.pool is not None and len(jobs) > 1:
            converted = iter(list(self.pool.map(_convert_job, jobs, chunksize=max(1, len(jobs) // 16))))
        else:
            converted = iter([_convert_job(j) for j in jobs])
        results = []
        for (rid, _k), got in zip(items, loaded, strict=True):
            if not isinstance(got[0], bytes):
                results.append(got)  # failed to load, or skipped
                continue
            status, payload, msg, applied = next(converted)
            if status != "ok":
                results.append(("failed", status, msg))
            elif only_corrected and not applied:
                results.append(("skipped", "", ""))
            else:
                results.append(self._write(rid, payload))
        return results

    # --- runs ----------------------------------------------------------------------------------

    def _tally(self, s: Summary, rid: str, result: tuple[str, str, str]) -> None:
        status, code, msg = result
        if status == "skipped":
            return
        if status == "written":
            s.written.append(rid)
        elif status == "unchanged":
            s.unchanged.append(rid)
        else:
            s.failed.append((rid, code, msg))
            if not self.tty:
                self.stream.write(f"export failed record_id={rid} format={self.opts.fmt} code={code} "
                                  f"reason={json.dumps(msg)}\n")

    def run_ids(self, record_ids: list[str]) -> Summary:
        """Export the named records (the queue's cursor is not moved)."""
        s = Summary()
        with self._locked(), self._workers():
            bar = Progress(len(record_ids), self.opts.fmt, out=self.stream, enabled=self.tty)
            for i in range(0, len(record_ids), PAGE):
                chunk = record_ids[i:i + PAGE]
                for rid, r in zip(chunk, self._export_many([(x, None) for x in chunk]), strict=True):
                    self._tally(s, rid, r)
                    bar.step()
        return s

    @contextlib.contextmanager
    def _workers(self) -> Iterator[None]:
        """Worker processes for the conversion (WSQ and JPEG 2000 are CPU-bound) when `jobs` > 1."""
        if self.jobs == 1:
            yield
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # forkserver: no copy of this process's open archive connection or threads in the workers
        with ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("forkserver")) as pool:
            self.pool = pool
            try:
                yield
            finally:
                self.pool = None

    def run_queue(self, since: str | None = None, limit: int | None = None) -> Summary:
        """Export what was archived after `since` (default: the saved cursor), retrying earlier failures
        first; saves the cursor after every page, so an interrupted run resumes where it stopped.

        `limit` bounds what this run exports besides the retries: the re-exports of late clock corrections take
        at most half of it (rounded up, resumed next run where they stopped), the new records the rest, so a
        correction covering months of one kit's records neither makes a bounded run unbounded nor holds back the
        new records."""
        s = Summary()
        with self._locked(), self._workers():
            st = self._state()
            self._same_archive(st)
            mine = st.setdefault(self.opts.fmt, {})
            start = since if since is not None else mine.get("cursor")
            failed: dict[str, str] = dict(mine.get("failed", {}))
            new_limit = limit
            if self.tty:  # the bar's total; this run then stops there (later arrivals are the next run's)
                pending = self._pending(start)
                new_limit = pending if limit is None else min(limit, pending)
            bar = Progress(len(failed) + (new_limit or 0), self.opts.fmt, out=self.stream, enabled=self.tty)
            retry = sorted(failed)
            for rid, r in zip(retry, self._export_many([(x, None) for x in retry]), strict=True):
                self._tally(s, rid, r)
                if r[0] != "failed":
                    failed.pop(rid)
                else:
                    failed[rid] = r[1]
                bar.step()
            used = self._late_corrections(st, mine, start, failed, s, None if limit is None else (limit + 1) // 2)
            if limit is not None and new_limit is not None:
                new_limit = min(new_limit, limit - used)
            cursor, done = start, 0
            while new_limit is None or done < new_limit:
                page = self._since(cursor, PAGE if new_limit is None else min(PAGE, new_limit - done))
                if not page:
                    break
                for rec, r in zip(page, self._export_many([(x.record_id, x.kit_id) for x in page]), strict=True):
                    self._tally(s, rec.record_id, r)
                    if r[0] == "failed":
                        failed[rec.record_id] = r[1]
                    bar.step()
                cursor = page[-1].cursor
                done += len(page)
                mine.update(cursor=cursor, failed=dict(sorted(failed.items())))
                self._save(st)  # after the files of this page are on disk: nothing can be skipped
                if not self.tty:
                    self.stream.write(f"export progress format={self.opts.fmt} done={done} written="
                                      f"{len(s.written)} unchanged={len(s.unchanged)} failed={len(s.failed)} "
                                      f"cursor={cursor}\n")
            mine.update(cursor=cursor, failed=dict(sorted(failed.items())))
            self._save(st)
            s.cursor = cursor
        return s

    def _late_corrections(self, st: dict[str, Any], mine: dict[str, Any], start: str | None,
                          failed: dict[str, str], s: Summary, budget: int | None = None) -> int:
        """Re-export the records this folder already exported (archive cursor at most `start`) that a clock
        correction the fleet registry kept since the last run now covers; each file is replaced atomically and
        listed in `corrected`. The registry's correction id is this format's ``corrections_cursor``, saved after
        every page of corrections (ids grow in commit order: `provisioning.registry_db`). Without a registry:
        nothing. Records not exported yet get their correction when the queue reaches them.

        At most `budget` records are looked at (None: all); a pass stopped there saves where it was
        (``corrections_resume``: the cursor it started from, the segment, the last record done) and the next run
        goes on from there. Returns how many records it looked at."""
        if self.archive.fleet_db is None:
            return 0
        try:
            upto = self.archive.cursor_key(start) if start else None
        except ValueError:
            raise ExportError("bad_cursor", f"{str(start)[:40]!r} is not a cursor of this archive") from None
        after = mine.get("corrections_cursor", 0)
        after = after if isinstance(after, int) and not isinstance(after, bool) and after >= 0 else 0
        # The cursor is an id of one registry: named by its first correction (rows are never deleted). Another
        # registry's ids would skip its corrections: start over there (re-exports are identical bytes at worst).
        try:
            mark = self.archive.first_clock_correction()
        except ArchiveError as e:
            raise ExportError("archive_error", str(e)) from None
        seen = mine.get("corrections_registry")
        resume = _resume_point(mine.pop("corrections_resume", None), after)
        if mark is not None and seen is not None and seen != mark:
            self.stream.write(f"export clock corrections of another fleet registry: all of them looked at again "
                              f"was={str(seen)[:80]} now={mark}\n")
            after, resume = 0, None
        if mark is not None:
            mine["corrections_registry"] = mark
        used = 0
        while True:
            try:
                segments, newest = self.archive.clock_segments_since(after)
            except ArchiveError as e:
                raise ExportError("archive_error", str(e)) from None
            if newest == after:
                break
            for seg in segments if upto is not None else []:
                key, page_after = (seg.correction_id, seg.first_seq), None
                if resume is not None:  # the same segments in the same order (rows never change): skip those done
                    if key < resume[0]:
                        continue
                    page_after = resume[1] if key == resume[0] else None
                    resume = None
                left = None if budget is None else budget - used
                finished, page_after, n = self._reexport_segment(seg, upto, failed, s, page_after, left)
                used += n
                if not finished:
                    mine.update(corrections_resume={"after": after, "segment": list(key),
                                                    "page_after": list(page_after) if page_after else None},
                                failed=dict(sorted(failed.items())))
                    self._save(st)
                    self.stream.write(f"export clock corrections paused at the run's limit records={used} "
                                      f"correction_id={seg.correction_id}; the next run goes on from there\n")
                    return used
            after, resume = newest, None
            mine.update(corrections_cursor=after, failed=dict(sorted(failed.items())))
            self._save(st)  # after the files of these corrections are on disk
        return used

    def _reexport_segment(self, seg: Any, upto: tuple[int, ...], failed: dict[str, str], s: Summary,
                          page_after: tuple[int, str] | None = None, left: int | None = None
                          ) -> tuple[bool, tuple[int, str] | None, int]:
        """Re-export the already exported, unsynced records of one correction segment (`_late_corrections`), after
        (seq, record id) `page_after`, at most `left` of them (None: all). Returns (finished, the last record looked
        at, how many were)."""
        n = 0
        while True:
            try:
                page = self.archive.records_in_range(seg.kit_id, seg.first_seq, seg.last_seq, page_after, PAGE)
            except ArchiveError as e:
                raise ExportError("archive_error", str(e)) from None
            if not page:
                return True, page_after, n
            if left is not None and n >= left:
                return False, page_after, n

            def wanted(r: Any) -> bool:
                return r.record_id not in failed and self.archive.cursor_key(r.cursor) <= upto

            if left is not None:  # the page up to its last record that fits in what is left
                room, k = left - n, 0
                for i, r in enumerate(page):
                    k += wanted(r)
                    if k == room:
                        page = page[:i + 1]
                        break
            page_after = (page[-1].seq, page[-1].record_id)
            todo = [r for r in page if wanted(r)]
            n += len(todo)
            for rec, r in zip(todo, self._export_many([(x.record_id, x.kit_id) for x in todo], only_corrected=True),
                              strict=True):
                self._tally(s, rec.record_id, r)
                if r[0] == "failed":
                    failed[rec.record_id] = r[1]
                elif r[0] == "written":
                    s.corrected.append(rec.record_id)
                    if not self.tty:
                        self.stream.write(f"export corrected record_id={rec.record_id} format={self.opts.fmt} "
                                          f"offset_s={seg.offset_s} correction_id={seg.correction_id}\n")

    def _same_archive(self, st: dict[str, Any]) -> None:
        """Bind this folder's cursors to the archive they came from (its first record: rows are never
        deleted, so it names the archive wherever it is mounted or restored); a cursor of another
        archive would skip or repeat records, so that is refused, naming both."""
        first = self._since(None, 1)
        if not first:
            return
        mark = first[0].record_id
        seen = st.get("archive_first_record")
        if seen is None:
            st["archive_first_record"] = mark
        elif seen != mark:
            raise ExportError("other_archive", f"{self.out} holds the queue of another archive (first record "
                                               f"{str(seen)[:80]}, this one starts with {mark}); export into a new "
                                               "--out folder")

    def _pending(self, cursor: str | None) -> int:
        """How many records the archive holds after `cursor` (only for the progress bar's total)."""
        n = 0
        while page := self._since(cursor, 5000):
            n += len(page)
            cursor = page[-1].cursor
        return n

    def _since(self, cursor: str | None, limit: int) -> list[Any]:
        try:
            return self.archive.since(cursor, limit)
        except ValueError:
            raise ExportError("bad_cursor", f"{str(cursor)[:40]!r} is not a cursor of this archive") from None

    def _locked(self) -> _Lock:
        return _Lock(self.out / LOCK_FILE)


class _Lock:
    """An exclusive flock on the output folder: two exports into one folder would race on its cursor."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> _Lock:
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise ExportError("busy", f"another export is writing into {self.path.parent}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def _resume_point(raw: Any, after: int) -> tuple[tuple[int, int], tuple[int, str] | None] | None:
    """((correction id, first seq) of the segment, (seq, record id) of its last record done) where a bounded run
    stopped its late corrections (``corrections_resume`` of `.rekam-export.json`), if it started from correction
    cursor `after` and is well formed; None otherwise (the pass then starts at the cursor: re-exports are identical
    bytes at worst)."""
    if not isinstance(raw, dict) or raw.get("after") != after:
        return None
    seg, page = raw.get("segment"), raw.get("page_after")
    if not (isinstance(seg, list) and len(seg) == 2 and all(type(v) is int for v in seg)):
        return None
    if page is not None and not (isinstance(page, list) and len(page) == 2 and type(page[0]) is int
                                 and isinstance(page[1], str)):
        return None
    return (seg[0], seg[1]), (tuple(page) if page is not None else None)  # type: ignore[return-value]


def _iter_failed(s: Summary) -> Iterator[str]:
    for rid, code, msg in s.failed:
        yield f"  {rid}: {code}: {msg}"


def cmd_export(args: argparse.Namespace) -> int:
    """`rekam-fleet export`: see the module doc."""
    if args.since is not None and args.records:
        print("rekam-fleet export: " + _("give either --since or record ids, not both"), file=sys.stderr)
        return 2
    agency = args.agency or os.environ.get("REKAM_AGENCY", "")
    if args.format == "an2k" and not agency:
        print("rekam-fleet export: " + _("--agency (or $REKAM_AGENCY) is needed for an2k: the originating agency "
                                          "of the transactions"), file=sys.stderr)
        return 2
    if args.fleet_db and not is_dsn(args.fleet_db) and not Path(args.fleet_db).is_file():
        print("rekam-fleet export: " + _("--fleet-db {path} is not a fleet.db file (nor a postgresql:// DSN)",
                                          path=args.fleet_db), file=sys.stderr)
        return 2
    try:
        key = rf.load_datacenter_private_key(Path(args.key).read_bytes())
    except (OSError, ValueError) as e:
        print("rekam-fleet: " + _("cannot use key {path}: {error}", path=args.key, error=e), file=sys.stderr)
        return 2
    archive = _open_archive(args)
    try:
        ex = Exporter(archive, key, Path(args.out), Options(args.format, agency, args.tot, args.uncompressed),
                      progress=False if args.no_progress else None, jobs=args.jobs)
        s = ex.run_ids(args.records) if args.records else ex.run_queue(args.since, args.limit)
    finally:
        archive.close()
    if args.json:
        print(json.dumps(s.as_dict(), indent=1))
    else:
        print(_("exported to {path}: written {written}, unchanged {unchanged}, failed {failed}", path=args.out,
                written=format_count(len(s.written)), unchanged=format_count(len(s.unchanged)),
                failed=format_count(len(s.failed))))
        for line in _iter_failed(s):
            print(line)
    return 1 if s.failed else 0


def register(sub: Any) -> None:
    """Add `export` to rekam-fleet."""
    p = sub.add_parser("export", help=_("archived records as ANSI/NIST-ITL or CBEFF files for an ABIS (a queue)"))
    p.add_argument("records", nargs="*", metavar="RECORD_ID", help=_("only these records (the cursor stays)"))
    add_archive_arguments(p)
    p.add_argument("--fleet-db", help=_("the fleet registry (its fleet.db, or the PostgreSQL DSN of a shared "
                                        "registry): apply the kits' clock corrections to records sealed before their "
                                        "clock was synchronised"))
    p.add_argument("--key", required=True, help=_("data-center private key (PEM)"))
    p.add_argument("--format", required=True, choices=sorted(FORMATS), help=_("an2k (.an2) or cbeff (.xml)"))
    p.add_argument("--out", required=True, help=_("output folder (holds the queue's cursor)"))
    p.add_argument("--since", help=_("start after this archive cursor instead of the saved one"))
    p.add_argument("--limit", type=int, help=_("at most this many records in this run (late clock corrections take at "
                                               "most half of them)"))
    p.add_argument("--agency", help=_("originating agency (Type-1 DAI/ORI, Type-14/10 SRC); default $REKAM_AGENCY"))
    p.add_argument("--tot", default="ENR", help=_("Type-1 transaction type (default ENR)"))
    p.add_argument("--uncompressed", action="store_true", help=_("Type-14 images uncompressed instead of WSQ"))
    p.add_argument("--jobs", type=int, default=1, help=_("conversion processes (WSQ and JPEG 2000 use one core each)"))
    p.add_argument("--json", action="store_true", help=_("print the summary as JSON"))
    p.add_argument("--no-progress", action="store_true", help=_("no progress bar (log lines instead)"))
    p.set_defaults(func=cmd_export)
