"""`rekam-fleet import PATH`: take a kit's USB mirror stick into the archive (when the network never came back).

PATH may be the stick's mount point, its ``rekam/`` folder, or one ``rekam/<kit_id>/`` folder (layout in
`firmware.store.usb`). Every record file is verified and stored through `Archive.store()`, the same door the
MQTT ingest uses, so importing records that already arrived over MQTT (or importing a stick twice) stores
nothing twice. Records are found from the index *and* by scanning ``records/`` (a yank can cost index
lines). The summary counts new, already had, and rejected records with their reasons; the exit status is
1 if anything was rejected or unreadable.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from firmware.wire import record_format as rf
from firmware.wire.ids import parse_record_id
from provisioning.archive import Archive, ArchiveError, UnknownKit, decode_kit_key


@dataclass
class ImportSummary:
    """Outcome of one import."""

    new: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (record id or file, reason)
    kits: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"kits": self.kits, "new": len(self.new), "already_had": len(self.already),
                "rejected": [{"record": r, "reason": why} for r, why in self.rejected]}


def kit_dirs(path: Path) -> list[Path]:
    """The ``rekam/<kit_id>/`` folders under PATH (mount point, rekam/ folder, or a kit folder)."""
    if (path / "kit.json").is_file():
        return [path]
    base = path / "rekam" if (path / "rekam").is_dir() else path
    return sorted(p for p in base.iterdir() if p.is_dir() and (p / "kit.json").is_file()) if base.is_dir() else []


def read_index(kit_dir: Path) -> list[dict[str, Any]]:
    """The stick's index.jsonl entries, skipping torn or invalid lines (same rules as firmware.store.usb, which
    the fleet side may not import)."""
    out = []
    try:
        with open(kit_dir / "index.jsonl", "rb") as f:
            for raw in f:
                try:
                    e = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(e, dict) and isinstance(e.get("record_id"), str):
                    out.append(e)
    except FileNotFoundError:
        pass
    return out


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


def import_stick(path: Path, archive: Archive, tofu: bool = False, progress: bool | None = None) -> ImportSummary:
    """Import every kit folder under `path` into `archive`; see the module doc."""
    summary = ImportSummary()
    dirs = kit_dirs(path)
    if not dirs:
        raise FileNotFoundError(f"{path}: no rekam/<kit_id>/kit.json found (is this a rekam stick?)")
    stick_id = "?"
    for cand in (path / "rekam" / "stick.json", path / "stick.json", path.parent / "stick.json"):
        try:
            stick_id = str(json.loads(cand.read_text()).get("stick_id", "?"))
            break
        except (OSError, ValueError):
            continue
    for kdir in dirs:
        try:
            meta = json.loads((kdir / "kit.json").read_text())
            kit_id, key_b64 = str(meta["kit_id"]), str(meta["kit_public_key"])
            decode_kit_key(key_b64)
        except (OSError, ValueError, KeyError, TypeError) as e:
            summary.rejected.append((str(kdir), f"kit.json unreadable: {e}"))
            continue
        if kit_id != kdir.name:
            summary.rejected.append((str(kdir), f"kit.json names kit {kit_id}, folder is {kdir.name}"))
            continue
        registered = archive.kit_key(kit_id)
        if registered is None:
            if not tofu:
                summary.rejected.append((str(kdir), f"kit {kit_id} is not registered (rekam-fleet archive register-kit "
                                                    f"{kit_id} {key_b64}, or --tofu to trust the stick's kit.json)"))
                continue
            archive.register_kit(kit_id, key_b64, how="usb-tofu")
        summary.kits.append(kit_id)
        listed = {e["record_id"]: e for e in read_index(kdir)}
        files = {p.name[: -len(rf.FILE_SUFFIX)]: p for p in (kdir / "records").glob("*" + rf.FILE_SUFFIX)}
        ids = sorted(set(listed) | set(files), key=lambda r: ((p.seq if (p := parse_record_id(r)) else 0), r))
        bar = Progress(len(ids), f"{kit_id}", enabled=progress)
        for rid in ids:
            bar.step()
            p = files.get(rid)
            if p is None:
                summary.rejected.append((rid, "listed in the stick's index but its file is missing"))
                continue
            try:
                data = p.read_bytes()
            except OSError as e:
                summary.rejected.append((rid, f"unreadable: {e.strerror or e}"))
                continue
            try:
                r = archive.store(data, kit_id, f"usb:{stick_id}", expect_record_id=rid)
            except (UnknownKit, ArchiveError) as e:
                summary.rejected.append((rid, str(e)))
                continue
            if r.status == "stored":
                summary.new.append(rid)
            elif r.status == "duplicate":
                summary.already.append(rid)
            else:
                summary.rejected.append((rid, r.reason))
    return summary


def cmd_import(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if not path.exists():
        print(f"rekam-fleet import: {path} does not exist", file=sys.stderr)
        return 2
    archive = Archive(Path(args.archive))
    try:
        s = import_stick(path, archive, tofu=args.tofu, progress=None if not args.no_progress else False)
    except FileNotFoundError as e:
        print(f"rekam-fleet import: {e}", file=sys.stderr)
        return 2
    finally:
        archive.close()
    if args.json:
        print(json.dumps(s.as_dict(), indent=1))
    else:
        print(f"imported from {path}: kits {', '.join(s.kits) or '-'}")
        print(f"  new:         {len(s.new)}")
        print(f"  already had: {len(s.already)}")
        print(f"  rejected:    {len(s.rejected)}")
        for rid, why in s.rejected:
            print(f"    {rid}: {why}")
    return 1 if s.rejected else 0


def register(sub: Any) -> None:
    """Add `import` to rekam-fleet."""
    p = sub.add_parser("import", help="import a kit's USB stick into an archive (idempotent with MQTT ingest)")
    p.add_argument("path", help="stick mount point, its rekam/ folder, or one rekam/<kit_id>/ folder")
    p.add_argument("--archive", required=True, help="archive directory")
    p.add_argument("--tofu", action="store_true", help="register an unknown kit from the stick's kit.json")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_import)
