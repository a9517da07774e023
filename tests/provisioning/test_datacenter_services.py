"""The scale backend's real services as the tests run them (tests/support.py `Postgres`, `SeaweedS3`): a kill -9
of PostgreSQL loses no committed row, the S3 gateway refuses a second conditional put of a key (412) and keeps the
first object across a kill -9 of the object store."""

from __future__ import annotations

import psycopg
import pytest
from botocore.exceptions import ClientError


def test_postgres_keeps_commits_across_kill_and_restart(postgres, pg_database):
    with psycopg.connect(pg_database, autocommit=True) as c:
        c.execute("CREATE TABLE t (v int)")
        c.execute("INSERT INTO t VALUES (1)")
    postgres.kill()
    assert not postgres.running
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(pg_database, connect_timeout=2)
    postgres.start()
    with psycopg.connect(pg_database) as c:
        assert c.execute("SELECT v FROM t").fetchall() == [(1,)]
    postgres.restart()
    with psycopg.connect(pg_database) as c:
        assert c.execute("SELECT count(*) FROM t").fetchone() == (1,)
    assert postgres.execute("SHOW listen_addresses") == [("127.0.0.1",)]


def test_seaweed_conditional_put_and_kill(seaweed, s3_objects):
    bucket, _, rest = s3_objects.removeprefix("s3://").partition("/")
    key = rest.split("?")[0] + "/x"
    c = seaweed.client()
    c.put_object(Bucket=bucket, Key=key, Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as e:
        c.put_object(Bucket=bucket, Key=key, Body=b"second", IfNoneMatch="*")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    seaweed.kill()
    seaweed.start()
    assert seaweed.client().get_object(Bucket=bucket, Key=key)["Body"].read() == b"first"
