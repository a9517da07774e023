"""Where the fleet registry (`provisioning.registry.Fleet`) keeps its tables: one small interface, two backends.

* `SqliteDb` (the default): ``fleet.db`` in the fleet folder, WAL. Several fleet processes on ONE host (the service,
  operators' CLIs) share it; writes that must not interleave (signing the next config version) run in
  ``BEGIN IMMEDIATE`` transactions.
* `PostgresDb` (``--registry postgresql://...`` or ``"registry"`` in fleet.json): the same tables in PostgreSQL,
  so fleet services and operators on several hosts work on one registry at once. psycopg 3 is imported only
  here, only for it. The schema is `MIGRATIONS`, applied in order, each once, under an advisory lock (processes
  starting together wait for each other) and recorded in ``fleet_schema_migrations`` (the archive's own
  migrations, `provisioning.archive.scale`, may share the database: separate table, separate lock key). A write
  transaction takes a second advisory lock, so two processes never sign the same config version and never merge
  onto a stale previous version.

Clock corrections (issue #18; `Fleet.handle_kit_message`): ``clock_corrections`` holds one row per signed document a
kit reported (the document itself, which key verified it, when it arrived), ``clock_segments`` one row per segment
(kit, boot, first_seq .. last_seq, offset_s or NULL). A correction is inserted in one `write()` transaction, so its
``id`` grows in commit order on both backends (the PostgreSQL write lock is held from ``nextval`` to commit): the
export's late-correction cursor (`provisioning.interchange.export`) can never skip a row committed late.

Claims (`Fleet.handle_claim`): ``claim_certs`` holds the certificate each kit was last given by a claim (serial, a
SHA-256 of its public key, the PEM, not-after) and that claim's nonce and ``issued_at``, so a re-claim with the same
key is answered with the same certificate and an older claim is refused; ``allowlist_uses`` marks each allowlist
line without a key fingerprint as used by the one kit it approved. ``kits_pending`` serves the expiry of pending
claims and their count, ``events_at`` the pruning of old events (SQLite: the tables and indexes are made
``IF NOT EXISTS`` when a fleet.db is opened; PostgreSQL: migration 3).

The interface: ``execute(sql, params)`` with ``?`` placeholders (a cursor: ``fetchone``, iteration, ``rowcount``;
rows by column name or index, and ``dict(row)``), ``write()`` (a context manager: one serialised write
transaction, re-entrant), ``IntegrityError``, ``close()``.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from firmware.errors import FleetError
from firmware.system.sqlitedb import connect_wal

log = logging.getLogger(__name__)

SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS kits (
    kit_id TEXT PRIMARY KEY, public_key TEXT NOT NULL, hardware_serial TEXT, software_version TEXT,
    state TEXT NOT NULL, claim_user TEXT, claimed_at INTEGER, approved_at INTEGER, revoked_at INTEGER,
    cert_serial TEXT, last_seen INTEGER, online TEXT, telemetry TEXT, config_state TEXT, note TEXT);
CREATE TABLE IF NOT EXISTS configs (
    kit_id TEXT NOT NULL, version INTEGER NOT NULL, issued_at INTEGER NOT NULL, sections TEXT NOT NULL,
    doc BLOB NOT NULL, note TEXT, files TEXT, PRIMARY KEY (kit_id, version));
CREATE TABLE IF NOT EXISTS commands (
    cmd_id TEXT PRIMARY KEY, kit_id TEXT NOT NULL, name TEXT NOT NULL, args TEXT NOT NULL,
    issued_at INTEGER NOT NULL, expires_at INTEGER NOT NULL, result TEXT, result_at INTEGER);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY, at INTEGER NOT NULL, kit_id TEXT, kind TEXT NOT NULL, detail TEXT);
CREATE TABLE IF NOT EXISTS shards (
    name TEXT PRIMARY KEY, relay TEXT NOT NULL, control TEXT NOT NULL, state TEXT NOT NULL, note TEXT,
    added_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS kit_shards (
    kit_id TEXT PRIMARY KEY, primary_shard TEXT, failover_shard TEXT, config_version INTEGER,
    pin_primary TEXT, pin_failover TEXT, at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS clock_corrections (
    id INTEGER PRIMARY KEY, kit_id TEXT NOT NULL, boot_id TEXT NOT NULL, source TEXT NOT NULL, issued TEXT NOT NULL,
    reason TEXT, sig TEXT NOT NULL, doc TEXT NOT NULL, verified_key TEXT NOT NULL, received_at INTEGER NOT NULL,
    UNIQUE (kit_id, sig));
CREATE TABLE IF NOT EXISTS clock_segments (
    kit_id TEXT NOT NULL, boot_id TEXT NOT NULL, first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL,
    records INTEGER, offset_s REAL, correction_id INTEGER NOT NULL, PRIMARY KEY (kit_id, boot_id, first_seq));
CREATE INDEX IF NOT EXISTS clock_segments_seq ON clock_segments (kit_id, first_seq);
CREATE INDEX IF NOT EXISTS kits_pending ON kits (state, claimed_at);
CREATE INDEX IF NOT EXISTS kits_serial ON kits (hardware_serial);
CREATE INDEX IF NOT EXISTS events_at ON events (at);
CREATE TABLE IF NOT EXISTS claim_certs (
    kit_id TEXT PRIMARY KEY, cert_serial TEXT NOT NULL, cert_key TEXT NOT NULL, cert_pem TEXT NOT NULL,
    not_after INTEGER NOT NULL, issued_at INTEGER NOT NULL, claim_nonce TEXT NOT NULL,
    claim_issued_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS allowlist_uses (
    entry TEXT PRIMARY KEY, kit_id TEXT NOT NULL, at INTEGER NOT NULL);
"""

MIGRATION_LOCK = 0x666C656574  # pg_advisory_xact_lock key of the registry's migrations ("fleet")
WRITE_LOCK = 0x666C656575  # ... of one write transaction (config versions)

#: (version, name, SQL) of the PostgreSQL registry, applied in order, each once. Never edit one that shipped.
MIGRATIONS: list[tuple[int, str, str]] = [
    (1, "fleet registry: kits, configs, commands, events, shards", """
        CREATE TABLE kits (
            kit_id text PRIMARY KEY, public_key text NOT NULL, hardware_serial text, software_version text,
            state text NOT NULL, claim_user text, claimed_at bigint, approved_at bigint, revoked_at bigint,
            cert_serial text, last_seen bigint, online text, telemetry text, config_state text, note text);
        CREATE TABLE configs (
            kit_id text NOT NULL, version integer NOT NULL, issued_at bigint NOT NULL, sections text NOT NULL,
            doc bytea NOT NULL, note text, files text, PRIMARY KEY (kit_id, version));
        CREATE TABLE commands (
            cmd_id text PRIMARY KEY, kit_id text NOT NULL, name text NOT NULL, args text NOT NULL,
            issued_at bigint NOT NULL, expires_at bigint NOT NULL, result text, result_at bigint);
        CREATE INDEX commands_kit ON commands (kit_id);
        CREATE TABLE events (
            id bigserial PRIMARY KEY, at bigint NOT NULL, kit_id text, kind text NOT NULL, detail text);
        CREATE INDEX events_at ON events (at);
        CREATE TABLE shards (
            name text PRIMARY KEY, relay text NOT NULL, control text NOT NULL, state text NOT NULL, note text,
            added_at bigint NOT NULL);
        CREATE TABLE kit_shards (
            kit_id text PRIMARY KEY, primary_shard text, failover_shard text, config_version integer,
            pin_primary text, pin_failover text, at bigint NOT NULL);
    """),
    (2, "clock corrections kits report in telemetry (issue #18)", """
        CREATE TABLE clock_corrections (
            id bigserial PRIMARY KEY, kit_id text NOT NULL, boot_id text NOT NULL, source text NOT NULL,
            issued text NOT NULL, reason text, sig text NOT NULL, doc text NOT NULL, verified_key text NOT NULL,
            received_at bigint NOT NULL, UNIQUE (kit_id, sig));
        CREATE TABLE clock_segments (
            kit_id text NOT NULL, boot_id text NOT NULL, first_seq bigint NOT NULL, last_seq bigint NOT NULL,
            records bigint, offset_s double precision, correction_id bigint NOT NULL,
            PRIMARY KEY (kit_id, boot_id, first_seq));
        CREATE INDEX clock_segments_seq ON clock_segments (kit_id, first_seq);
    """),
    (3, "claims: pending-expiry and serial indexes, the certificate each kit was given, one-use allowlist entries", """
        CREATE INDEX kits_pending ON kits (state, claimed_at);
        CREATE INDEX kits_serial ON kits (hardware_serial);
        CREATE TABLE claim_certs (
            kit_id text PRIMARY KEY, cert_serial text NOT NULL, cert_key text NOT NULL, cert_pem text NOT NULL,
            not_after bigint NOT NULL, issued_at bigint NOT NULL, claim_nonce text NOT NULL,
            claim_issued_at bigint NOT NULL);
        CREATE TABLE allowlist_uses (entry text PRIMARY KEY, kit_id text NOT NULL, at bigint NOT NULL);
    """),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def is_dsn(text: str | None) -> bool:
    """True if `text` names a PostgreSQL registry (``postgresql://`` or ``postgres://``)."""
    return bool(text) and str(text).startswith(("postgresql://", "postgres://"))


class _Nesting:
    """Re-entrant write transactions: the outermost `write()` begins and commits, inner ones join it."""

    _depth = 0

    @contextmanager
    def _joined(self) -> Iterator[bool]:
        """Yields True if a write transaction is already open on this handle (the caller just runs inside it)."""
        if not self._depth:
            yield False
            return
        self._depth += 1
        try:
            yield True
        finally:
            self._depth -= 1


class SqliteDb(_Nesting):
    """The embedded registry: ``fleet.db`` (see module doc)."""

    IntegrityError = sqlite3.IntegrityError

    def __init__(self, path: Path) -> None:
        self.conn = connect_wal(path, 10)  # `rekam-fleet` commands and the fleet service may open it together
        self.conn.row_factory = sqlite3.Row
        self.conn.executescript(SQLITE_SCHEMA)
        self._lock = threading.RLock()

    def execute(self, sql: str, params: Any = ()) -> Any:
        return self.conn.execute(sql, params)

    @contextmanager
    def write(self) -> Iterator[None]:
        """One write transaction (``BEGIN IMMEDIATE``: other processes' writers wait); nested calls join it."""
        with self._lock, self._joined() as inside:
            if inside:
                yield
                return
            self.conn.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield
            except BaseException:
                self._depth = 0
                self.conn.execute("ROLLBACK")
                raise
            self._depth = 0
            self.conn.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()


class _Row(dict):  # type: ignore[type-arg]
    """A PostgreSQL row as the registry reads rows: by column name, by index, or as a dict."""

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, int):
            return list(self.values())[key]
        return super().__getitem__(key)


def _row_factory(cursor: Any) -> Any:
    names = [d.name for d in cursor.description] if cursor.description else []

    def make(values: Any) -> _Row:
        return _Row(zip(names, values, strict=True))

    return make


class PostgresDb(_Nesting):
    """The registry in PostgreSQL (see module doc). One connection per process (autocommit; explicit transactions
    for writes that go together), re-opened on the next call after the server restarted; psycopg errors become
    `FleetError` (the operator's command fails and can be re-run)."""

    def __init__(self, dsn: str, connect_timeout_s: float = 5.0) -> None:
        try:
            import psycopg
        except ImportError as e:
            raise FleetError(f"a PostgreSQL registry needs psycopg 3 (pip install 'psycopg[binary]'): {e}") from None
        self.psycopg = psycopg
        self.IntegrityError = psycopg.IntegrityError
        self.dsn = dsn
        self.connect_timeout_s = connect_timeout_s
        self._conn: Any = None
        self._lock = threading.RLock()
        self._connection()  # fail at open, with the reason, not at the first query

    def _connection(self) -> Any:
        if self._conn is None or self._conn.closed or self._conn.broken:
            try:
                c = self.psycopg.connect(self.dsn, autocommit=True, connect_timeout=max(1, int(self.connect_timeout_s)),
                                         application_name="rekam-fleet")
            except self.psycopg.Error as e:
                raise FleetError(f"fleet registry {_redact(self.dsn)}: {str(e).strip()}") from None
            c.row_factory = _row_factory
            migrate(c)
            self._conn = c
        return self._conn

    def execute(self, sql: str, params: Any = ()) -> Any:
        with self._lock:
            conn = self._connection()
            try:
                return conn.execute(sql.replace("?", "%s"), tuple(params))
            except self.psycopg.IntegrityError:
                raise
            except self.psycopg.Error as e:
                if conn.broken or isinstance(e, self.psycopg.OperationalError):
                    conn.close()
                raise FleetError(f"fleet registry: {type(e).__name__}: {str(e).strip()}") from e

    @contextmanager
    def write(self) -> Iterator[None]:
        """One write transaction under the registry's write lock (processes on any host take turns)."""
        with self._lock, self._joined() as inside:
            if inside:
                yield
                return
            conn = self._connection()
            try:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
                    self._depth = 1
                    try:
                        yield
                    finally:
                        self._depth = 0
            except self.psycopg.IntegrityError:
                raise
            except self.psycopg.Error as e:
                if conn.broken or isinstance(e, self.psycopg.OperationalError):
                    conn.close()
                raise FleetError(f"fleet registry: {type(e).__name__}: {str(e).strip()}") from e

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def migrate(conn: Any) -> int:
    """Apply the registry migrations this database lacks (`provisioning.pgschema`); returns the schema version."""
    from provisioning import pgschema

    return pgschema.migrate(conn, MIGRATIONS, table="fleet_schema_migrations", lock=MIGRATION_LOCK,
                            what="fleet registry", error=FleetError)


def _redact(dsn: str) -> str:
    """`dsn` without a password (it may be in the URL)."""
    from urllib.parse import urlsplit, urlunsplit

    u = urlsplit(dsn)
    if u.password:
        netloc = f"{u.username}:***@{u.hostname}" + (f":{u.port}" if u.port else "")
        return urlunsplit(u._replace(netloc=netloc))
    return dsn


def dsn_has_password(dsn: str) -> bool:
    """True if the connection string `dsn` carries a password: in the URL (``user:secret@``), as a ``password=``
    query parameter, or as a ``password=`` key of a key/value connection string."""
    import re
    from urllib.parse import parse_qs, urlsplit

    if is_dsn(dsn):
        u = urlsplit(dsn)
        return bool(u.password) or any(k.lower() == "password" for k in parse_qs(u.query, keep_blank_values=True))
    return re.search(r"(?:^|\s)password\s*=", dsn, re.IGNORECASE) is not None


def open_registry(data: Path, registry: str | None) -> SqliteDb | PostgresDb:
    """The registry of the fleet folder `data`: PostgreSQL if `registry` is a DSN, else ``data/fleet.db``."""
    if is_dsn(registry):
        return PostgresDb(str(registry))
    return SqliteDb(Path(data) / "fleet.db")
