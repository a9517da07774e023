"""The scale backend of the archive: sealed files in an S3 object store, the index and kit registry in PostgreSQL.

Every check is `provisioning.archive.base.ArchiveBase.store()`, the same code as the embedded backend; this module
only stores. Imported only for a PostgreSQL archive (`open_archive` with a DSN), so psycopg and boto3 (the
``datacenter`` extra) are never needed by a kit or an embedded archive.

Objects: ``[PREFIX/]records/<kit_id>/<record_id>.rkm``, written once with a conditional put (``If-None-Match:
*``). A 412 means the key exists: its bytes are fetched and hashed; the same hash is fine (an earlier or
concurrent store of the same record), another is a conflict, kept under ``conflicts/`` and never overwritten.
After the put the object is read back and its hash checked; only then is the index row inserted (``INSERT ... ON
CONFLICT DO NOTHING``, committed synchronously). `store()` returns, and the ingest acks, only after both.

Index (PostgreSQL 13+; schema in `MIGRATIONS`, applied in order under an advisory lock so any number of workers
may start at once): ``records`` is HASH-partitioned on kit_id (16 partitions), primary key (kit_id, record_id): a
record id embeds its kit, so that is unique per record id, and "records of kit K" and a lookup by record id each
touch one partition; "arrived since T" uses an index on received_at in each partition. Why hash on the kit and
not months: docs/datacenter-scale.md.

`since(cursor)`: each row stores the id of the transaction that inserted it (``pg_current_xact_id()``, xid8) and
an arrival sequence number; `since` lists only rows whose transaction id is below the oldest one still running
(``pg_snapshot_xmin(pg_current_snapshot())``), ordered by (xid, arrival), and the cursor is that pair. A
transaction that commits late has an xid at or above that horizon, so it is listed later, after the cursor,
never skipped (a plain sequence would be: sequence numbers are handed out before commit, in another order).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import botocore.exceptions
import psycopg
from botocore.config import Config

from firmware.errors import ArchivedRecordCorrupt, ArchivedRecordMissing, ArchiveError
from firmware.wire import record_format as rf
from firmware.wire.ids import parse_record_id
from provisioning import pgschema
from provisioning.archive.base import ArchiveBase, ArchivedRecord

log = logging.getLogger(__name__)

PARTITIONS = 16  # records partitions (HASH on kit_id); fixed by migration 1 (more: a new migration that re-splits)
MIGRATION_LOCK = 0x72656B616D  # pg_advisory_xact_lock key of the schema migrations ("rekam")

#: (version, name, SQL), applied in order, each once, recorded in schema_migrations. Never edit one that shipped:
#: add the next.
MIGRATIONS: list[tuple[int, str, str]] = [
    (1, "archive index and kit registry", """
        CREATE TABLE kits (
            kit_id text PRIMARY KEY, public_key text NOT NULL, registered_at timestamptz NOT NULL DEFAULT now(),
            how text NOT NULL);
        CREATE TABLE kit_keys (
            kit_id text NOT NULL, public_key text NOT NULL, added_at timestamptz NOT NULL DEFAULT clock_timestamp(),
            how text NOT NULL, PRIMARY KEY (kit_id, public_key));
        CREATE SEQUENCE records_arrival AS bigint;
        CREATE TABLE records (
            kit_id text NOT NULL, record_id text NOT NULL, seq bigint NOT NULL, sha256 text NOT NULL,
            size bigint NOT NULL, created text, object_key text NOT NULL, source text NOT NULL,
            received_at timestamptz NOT NULL DEFAULT now(),
            xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
            arrival bigint NOT NULL DEFAULT nextval('records_arrival'),
            PRIMARY KEY (kit_id, record_id)
        ) PARTITION BY HASH (kit_id);
    """ + "".join(f"CREATE TABLE records_p{i:02d} PARTITION OF records FOR VALUES WITH (MODULUS {PARTITIONS}, "
                  f"REMAINDER {i});\n" for i in range(PARTITIONS)) + """
        CREATE INDEX records_kit_seq ON records (kit_id, seq);
        CREATE INDEX records_received ON records (received_at);
        CREATE INDEX records_cursor ON records (xid, arrival);
        CREATE TABLE rejects (
            id bigserial PRIMARY KEY, record_id text, kit_id text, sha256 text, reason text, source text,
            at timestamptz NOT NULL DEFAULT now());
        CREATE INDEX rejects_at ON rejects (at);
    """),
    (2, "ingest staging shared by stateless workers", """
        CREATE UNLOGGED TABLE staging_transfers (
            record_id text NOT NULL, sha256 text NOT NULL, kit_id text NOT NULL, size bigint NOT NULL,
            first_at double precision NOT NULL, last_at double precision NOT NULL,
            PRIMARY KEY (record_id, sha256));
        CREATE INDEX staging_transfers_kit ON staging_transfers (kit_id);
        CREATE INDEX staging_transfers_last ON staging_transfers (last_at);
        CREATE UNLOGGED TABLE staging_chunks (
            record_id text NOT NULL, sha256 text NOT NULL, idx integer NOT NULL, total integer NOT NULL,
            size bigint NOT NULL, kit_id text NOT NULL, data bytea NOT NULL, at double precision NOT NULL,
            PRIMARY KEY (record_id, sha256, idx));
    """),
    # Nullable: workers of the previous release, inserting six values, keep staging during a rolling upgrade
    # (their transfers count as legacy: `provisioning.staging.check_admitted`).
    (3, "staging transfers keep the geometry their first chunk fixed", """
        ALTER TABLE staging_transfers ADD COLUMN IF NOT EXISTS total integer,
            ADD COLUMN IF NOT EXISTS chunk_size bigint;
    """),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def migrate(conn: psycopg.Connection[Any]) -> int:
    """Apply the archive migrations this database lacks (`provisioning.pgschema`: in order, one transaction,
    under an advisory lock; a database migrated by newer code is refused). Returns the schema version."""
    return pgschema.migrate(conn, MIGRATIONS, table="schema_migrations", lock=MIGRATION_LOCK, what="archive",
                            error=ArchiveError)


class Database:
    """One PostgreSQL connection (autocommit; explicit transactions where several statements must commit
    together) that reconnects after the server restarted or the link broke. Every psycopg error becomes an
    `ArchiveError` (the caller answers retry), and the next call connects afresh."""

    def __init__(self, dsn: str, connect_timeout_s: float = 5.0, statement_timeout_s: float = 60.0) -> None:
        self.dsn = dsn
        self.connect_timeout_s = connect_timeout_s
        self.statement_timeout_s = statement_timeout_s
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.RLock()
        self.migrated = False

    def _connect(self) -> psycopg.Connection[Any]:
        c = psycopg.connect(self.dsn, autocommit=True, connect_timeout=max(1, int(self.connect_timeout_s)),
                            options=f"-c statement_timeout={int(self.statement_timeout_s * 1000)}",
                            application_name="rekam-archive")
        if not self.migrated:
            migrate(c)
            self.migrated = True
        return c

    @contextmanager
    def conn(self, what: str = "archive database") -> Iterator[psycopg.Connection[Any]]:
        """The connection, for one operation (serialised across threads of this handle)."""
        with self._lock:
            try:
                if self._conn is None or self._conn.closed or self._conn.broken:
                    self._conn = self._connect()
                yield self._conn
            except psycopg.Error as e:
                if self._conn is not None and (self._conn.broken or isinstance(e, psycopg.OperationalError)):
                    self._conn.close()
                    self._conn = None
                raise ArchiveError(f"{what}: {type(e).__name__}: {str(e).strip()}") from e

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


@dataclass(frozen=True)
class ObjectsUrl:
    """``s3://BUCKET[/PREFIX]?endpoint=URL&region=R``: where the sealed files go."""

    bucket: str
    prefix: str
    endpoint: str | None
    region: str | None

    @classmethod
    def parse(cls, url: str) -> ObjectsUrl:
        u = urlsplit(url)
        if u.scheme != "s3" or not u.netloc:
            raise ArchiveError(f"objects {url!r}: expected s3://BUCKET[/PREFIX]?endpoint=http://HOST:PORT")
        q = parse_qs(u.query)
        return cls(u.netloc, u.path.strip("/"), (q.get("endpoint") or [None])[0], (q.get("region") or [None])[0])

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel


class ObjectStore:
    """Write-once objects in one bucket (S3 API, boto3; credentials from the standard AWS variables or files)."""

    def __init__(self, url: str, connect_timeout_s: float = 5.0, read_timeout_s: float = 60.0,
                 attempts: int = 2) -> None:
        self.url = ObjectsUrl.parse(url)
        self.text = url
        # Few attempts and short timeouts: a store that is down must turn into "retry" for the kit quickly, not
        # hold a worker for minutes; the kit resends.
        self.s3 = boto3.session.Session().client(
            "s3", endpoint_url=self.url.endpoint, region_name=self.url.region,
            config=Config(connect_timeout=connect_timeout_s, read_timeout=read_timeout_s,
                          retries={"max_attempts": attempts, "mode": "standard"},
                          s3={"addressing_style": "path"}))

    def put_once(self, rel: str, data: bytes) -> bool:
        """Create the object; False if the key already exists (412 to ``If-None-Match: *``)."""
        try:
            self.s3.put_object(Bucket=self.url.bucket, Key=self.url.key(rel), Body=data, IfNoneMatch="*")
            return True
        except botocore.exceptions.ClientError as e:
            if _status(e) in (412, 409):  # 409: a concurrent conditional put of the same key is in flight
                return False
            raise

    def get(self, rel: str) -> bytes | None:
        """The object's bytes, or None if there is none."""
        try:
            return bytes(self.s3.get_object(Bucket=self.url.bucket, Key=self.url.key(rel))["Body"].read())
        except botocore.exceptions.ClientError as e:
            if _status(e) == 404:
                return None
            raise

    def delete(self, rel: str) -> None:
        self.s3.delete_object(Bucket=self.url.bucket, Key=self.url.key(rel))


def _status(e: botocore.exceptions.ClientError) -> int:
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _utc(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ScaleArchive(ArchiveBase):
    """The archive on PostgreSQL (`dsn`) and an S3 object store (`objects`, see `ObjectsUrl`); module doc.

    One instance per worker; safe to share between threads (one connection, serialised)."""

    transient = (OSError, psycopg.Error, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)

    def __init__(self, dsn: str, objects: str, tofu: bool = False, fleet_db: Any = None,
                 connect_timeout_s: float = 5.0, statement_timeout_s: float = 60.0,
                 object_timeout_s: float = 60.0) -> None:
        super().__init__(tofu=tofu, fleet_db=fleet_db)
        self.dsn = dsn
        self.db = Database(dsn, connect_timeout_s, statement_timeout_s)
        self.objects = ObjectStore(objects, connect_timeout_s, object_timeout_s)
        with self.db.conn("cannot open the archive database") as _c:
            pass  # connect and migrate now: a wrong DSN fails at start, not at the first record

    def close(self) -> None:
        self._close_fleet()
        self.db.close()

    def cli_args(self) -> list[str]:
        u = urlsplit(self.dsn)
        if u.password:  # never print a password (give it in ~/.pgpass or PGPASSWORD instead)
            u = u._replace(netloc=f"{u.username}@{u.netloc.rpartition('@')[2]}")
        return ["--archive", u.geturl(), "--objects", self.objects.text]

    def _one(self, sql: str, args: tuple[Any, ...] = ()) -> Any:
        with self.db.conn() as c:
            return c.execute(sql, args).fetchone()

    # --- kit registry primitives ------------------------------------------------------------

    def _kit_first_key(self, kit_id: str) -> str | None:
        row = self._one("SELECT public_key FROM kits WHERE kit_id = %s", (kit_id,))
        return row[0] if row else None

    def _insert_kit(self, kit_id: str, key_b64: str, how: str) -> str | None:
        with self.db.conn() as c:
            if c.execute("INSERT INTO kits (kit_id, public_key, how) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING "
                         "RETURNING 1", (kit_id, key_b64, how)).fetchone():
                return None
            row = c.execute("SELECT public_key FROM kits WHERE kit_id = %s", (kit_id,)).fetchone()
            return str(row[0])

    def _rotation_keys(self, kit_id: str) -> list[str]:
        with self.db.conn() as c:
            return [r[0] for r in c.execute("SELECT public_key FROM kit_keys WHERE kit_id = %s ORDER BY added_at",
                                            (kit_id,))]

    def _add_rotation_key(self, kit_id: str, key_b64: str, how: str) -> None:
        with self.db.conn() as c:
            c.execute("INSERT INTO kit_keys (kit_id, public_key, how) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                      (kit_id, key_b64, how))

    def kits(self) -> list[dict[str, str]]:
        with self.db.conn() as c:
            rows = c.execute("SELECT kit_id, public_key, registered_at, how FROM kits ORDER BY kit_id").fetchall()
        return [{"kit_id": r[0], "public_key": r[1], "registered_at": _utc(r[2]), "how": r[3]} for r in rows]

    # --- records ----------------------------------------------------------------------------

    def lookup(self, record_id: str) -> tuple[str, str] | None:
        p = parse_record_id(record_id)
        if p is None:
            return None
        row = self._one("SELECT sha256, kit_id FROM records WHERE kit_id = %s AND record_id = %s",
                        (p.kit_id, record_id))
        return (row[0], row[1]) if row else None

    def count(self, kit_id: str | None = None) -> int:
        if kit_id:
            return int(self._one("SELECT count(*) FROM records WHERE kit_id = %s", (kit_id,))[0])
        return int(self._one("SELECT count(*) FROM records")[0])

    def record_ids(self, kit_id: str | None = None) -> list[str]:
        with self.db.conn() as c:
            if kit_id:
                rows = c.execute("SELECT record_id FROM records WHERE kit_id = %s ORDER BY seq", (kit_id,))
            else:
                rows = c.execute("SELECT record_id FROM records ORDER BY kit_id, seq")
            return [r[0] for r in rows]

    def read(self, record_id: str) -> bytes:
        """The archived bytes of `record_id` from the object store, checked against the indexed hash (`KeyError`
        if not archived, `ArchiveError` if the object is gone or no longer matches)."""
        p = parse_record_id(record_id)
        row = None if p is None else self._one(
            "SELECT sha256, object_key FROM records WHERE kit_id = %s AND record_id = %s", (p.kit_id, record_id))
        if row is None:
            raise KeyError(record_id)
        with self._transient_as_archive_error(f"cannot read archived record {record_id}"):
            data = self.objects.get(row[1])
        if data is None:
            raise ArchivedRecordMissing(f"archived record {record_id}: its object {row[1]} is missing from the object "
                                        f"store")
        if rf.sha256_hex(data) != row[0]:
            raise ArchivedRecordCorrupt(f"archived record {record_id} no longer matches its index hash {row[0][:12]}")
        return data

    def since(self, cursor: str | None = None, limit: int = 1000) -> list[ArchivedRecord]:
        """Up to `limit` records archived after `cursor` (None: from the start), oldest first; never skips a row
        a concurrent transaction commits later (module doc). The cursor is ``<xid>.<arrival>``."""
        xid, arrival = (cursor.split(".", 1) if cursor else ("0", "0"))
        with self.db.conn() as c:
            rows = c.execute(
                "SELECT record_id, kit_id, seq, sha256, size, received_at, xid::text, arrival FROM records "
                "WHERE (xid, arrival) > (%s::xid8, %s::bigint) AND xid < pg_snapshot_xmin(pg_current_snapshot()) "
                "ORDER BY xid, arrival LIMIT %s", (xid, int(arrival), int(limit))).fetchall()
        return [ArchivedRecord(r[0], r[1], int(r[2]), r[3], int(r[4]), _utc(r[5]), f"{r[6]}.{r[7]}") for r in rows]

    def records_in_range(self, kit_id: str, first_seq: int, last_seq: int, after: tuple[int, str] | None = None,
                         limit: int = 200) -> list[ArchivedRecord]:
        seq, rid = after or (first_seq - 1, "")
        with self.db.conn() as c:
            rows = c.execute(
                "SELECT record_id, kit_id, seq, sha256, size, received_at, xid::text, arrival FROM records "
                "WHERE kit_id = %s AND seq BETWEEN %s AND %s AND (seq, record_id) > (%s, %s) "
                "ORDER BY seq, record_id LIMIT %s", (kit_id, first_seq, last_seq, seq, rid, int(limit))).fetchall()
        return [ArchivedRecord(r[0], r[1], int(r[2]), r[3], int(r[4]), _utc(r[5]), f"{r[6]}.{r[7]}") for r in rows]

    def cursor_key(self, cursor: str) -> tuple[int, ...]:
        xid, _dot, arrival = cursor.partition(".")
        return (int(xid), int(arrival))

    def object_key(self, kit_id: str, record_id: str) -> str:
        """Where the record's sealed file lives in the bucket (below the URL's prefix)."""
        return f"records/{kit_id}/{record_id}{rf.FILE_SUFFIX}"

    # --- storage primitives -----------------------------------------------------------------

    def _insert_reject(self, record_id: str, kit_id: str, sha: str, reason: str, source: str) -> None:
        with self.db.conn() as c:
            c.execute("INSERT INTO rejects (record_id, kit_id, sha256, reason, source) VALUES (%s,%s,%s,%s,%s)",
                      (record_id, kit_id, sha, reason, source))

    def _put_record(self, kit_id: str, record_id: str, data: bytes, sha: str) -> tuple[str, str | None]:
        key = self.object_key(kit_id, record_id)
        written = self.objects.put_once(key, data)
        back = self.objects.get(key)
        if back is None:
            raise ArchiveError(f"record {record_id}: object {key} not readable right after its put")
        got = rf.sha256_hex(back)
        if got == sha:
            return key, None
        if written:
            # Our own put came back damaged: nothing indexes it and no kit was told; remove it so the resend can
            # write the right bytes (a write-once key would otherwise hold the damage for good).
            self.objects.delete(key)
            raise ArchiveError(f"record {record_id}: object {key} read back with sha256 {got[:12]}, wrote {sha[:12]}")
        return key, got

    def _put_conflict(self, record_id: str, sha: str, data: bytes) -> str:
        name = f"{record_id}.{sha[:16]}{rf.FILE_SUFFIX}"
        self.objects.put_once(f"conflicts/{name}", data)  # already there: the same bytes (name has the hash), kept
        return name

    def _insert_record(self, record_id: str, kit_id: str, seq: int, sha: str, size: int, created: str | None,
                       location: str, source: str) -> bool:
        with self.db.conn() as c:
            return c.execute(
                "INSERT INTO records (kit_id, record_id, seq, sha256, size, created, object_key, source) "
                "VALUES (%s,%s,%s,%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING",
                (kit_id, record_id, seq, sha, size, created, location, source)).rowcount == 1
