"""Versioned PostgreSQL schema migrations, for any part of the data center that keeps tables in PostgreSQL.

`migrate(conn, migrations, table=..., lock=..., what=..., error=...)` applies the migrations a database lacks, in
order, each once, in one transaction under an advisory lock (processes starting at once wait for each other; the
second finds nothing to do), records each in `table`, and refuses a database migrated by newer code. Each user
has its own table and lock key, so several schemas (the fleet registry, the archive) can share one database.
The connection is a psycopg 3 connection; this module imports nothing of it.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def migrate(conn: Any, migrations: list[tuple[int, str, str]], *, table: str, lock: int, what: str,
            error: type[Exception]) -> int:
    """Apply the missing (version, name, SQL) `migrations`; returns the schema version. `error(message)` is raised
    for a database at a newer version than `migrations` knows."""
    newest = migrations[-1][0]
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock,))
        conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (version integer PRIMARY KEY, name text NOT NULL, "
                     "applied_at timestamptz NOT NULL DEFAULT now())")
        done = {int(r[0]) for r in conn.execute(f"SELECT version FROM {table}")}
        if done and max(done) > newest:
            raise error(f"the {what} database is at schema version {max(done)}, newer than this code's {newest}: "
                        "upgrade rekam on this host")
        for version, name, sql in migrations:
            if version in done:
                continue
            conn.execute(sql.encode())  # several statements: simple query protocol
            conn.execute(f"INSERT INTO {table} (version, name) VALUES (%s, %s)", (version, name))
            log.info("%s schema migrated version=%d name=%s", what, version, name)
    return newest
