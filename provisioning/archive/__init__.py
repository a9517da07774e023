"""The data center's record archive: verify, store, index; the kit key registry. Two backends, one door.

`ArchiveBase.store()` holds every check (hash, record id bound to its kit, signature against the registered
keys, trust on first use, conflicts kept and never overwritten, duplicates) in ONE code path over a few storage
primitives; the backends implement only those:

- `Archive` (embedded, the default: a district office, `make demo`): sealed files in a directory and a SQLite
  index, as below.
- `provisioning.archive.scale.ScaleArchive` (a province, the nation): sealed files in an S3 object store and the
  index, kit registry and key history in PostgreSQL (docs/datacenter-scale.md). It is imported only when asked
  for (`open_archive` with a DSN), so the embedded path never needs psycopg or boto3.

`open_archive(spec, objects)` picks the backend: a directory, or a ``postgresql://`` DSN with ``objects`` =
``s3://BUCKET[/PREFIX]?endpoint=URL``.

Layout of an embedded archive directory (shared by every ingest worker and by `rekam-fleet import`)::

    index.db                    records (unique record_id), kits (registered public keys)
    records/<kit_id>/<record_id>.rkm
    conflicts/                  a second, different file claiming an archived record id (kept, never merged)

`Archive.store()` is the single way in, for MQTT and USB alike, so both paths are idempotent with
each other: it verifies the kit signature against the registered key, refuses a record whose id does
not carry the kit that signed it (`record_id_mismatch`: topic or stick folder, header and record id
agree), writes the file once (temp, fsync, hard link to its name: never over another file, fsync dir),
then inserts the index row with INSERT OR IGNORE in one fsync'd transaction (WAL, synchronous=FULL). Only
after `store()` returns may anyone tell the kit the record is safe. Two workers racing on one record write
identical bytes; one link and one index row win, the other sees the same bytes and answers duplicate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from firmware.errors import ArchiveError, KitRevoked, UnknownKit
from firmware.system.i18n import _
from provisioning.archive.base import (
    ArchiveBase,
    ArchivedRecord,
    ClockSegment,
    StoreResult,
    decode_kit_key,
    record_id_mismatch,
)
from provisioning.archive.embedded import Archive

__all__ = [
    "Archive", "ArchiveBase", "ArchiveError", "ArchivedRecord", "ClockSegment", "KitRevoked", "StoreResult",
    "UnknownKit",
    "add_archive_arguments", "decode_kit_key", "is_scale_spec", "open_archive", "record_id_mismatch",
]


def open_archive(spec: str | Path, objects: str | None = None, *, tofu: bool = False,
                 fleet_db: Path | str | None = None, **options: Any) -> ArchiveBase:
    """The archive named by `spec`: a directory (the embedded backend, `Archive`), or a PostgreSQL DSN
    (``postgresql://...``) with `objects` = ``s3://BUCKET[/PREFIX]?endpoint=URL`` (the scale backend; S3
    credentials from the standard AWS variables or files, as boto3 reads them; see docs/datacenter-scale.md).
    `options` go to the scale backend (timeouts)."""
    text = str(spec)
    if text.startswith(("postgresql://", "postgres://")):
        if not objects:
            raise ArchiveError("a PostgreSQL archive needs --objects s3://BUCKET?endpoint=URL (the object store)")
        from provisioning.archive.scale import ScaleArchive  # only here: psycopg and boto3 are the scale extra

        return ScaleArchive(text, objects, tofu=tofu, fleet_db=fleet_db, **options)
    if objects:
        raise ArchiveError(f"--objects is for a PostgreSQL archive; {text} is a directory (files kept there)")
    return Archive(Path(text), tofu=tofu, fleet_db=fleet_db)


def add_archive_arguments(parser: Any, help: str | None = None) -> None:
    """`--archive` and `--objects` on a `rekam-fleet` command: the one wording of how an archive is named."""
    parser.add_argument("--archive", required=True,
                        help=help or _("archive directory, or a postgresql:// DSN (with --objects)"))
    parser.add_argument("--objects", help=_("object store of a PostgreSQL archive: s3://BUCKET?endpoint=URL "
                                            "(credentials: the AWS_* variables or ~/.aws)"))


def is_scale_spec(spec: str | Path) -> bool:
    """True if `spec` names the scale backend (a PostgreSQL DSN), not a directory."""
    return str(spec).startswith(("postgresql://", "postgres://"))
