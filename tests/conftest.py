"""Shared fixtures. Services the tests need are real (mosquitto, Chromium); a missing one fails
the test with the package to install, never a silent skip."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from firmware.wire import record_format
from tests.support import Mosquitto, Postgres, Rekamd, SeaweedS3, Tmpfs

REPO = Path(__file__).resolve().parent.parent


def _find_corpus() -> Path:
    env = os.environ.get("REKAM_CORPUS")
    candidates = [Path(env)] if env else []
    candidates += [REPO.parent / "shared" / "corpus", REPO / ".." / "shared" / "corpus"]
    for c in candidates:
        if (c / "MANIFEST.tsv").exists():
            return c.resolve()
    pytest.fail("biometric corpus not found: set REKAM_CORPUS or place shared/corpus next to the checkout")


@pytest.fixture(scope="session", autouse=True)
def shared_finger_masters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One folder of simulated finger masters for the session (`hw.sensor.synth.DISK_CACHE_ENV`), inherited by
    every `rekamd --sim` and `rekam` child: the same residents' fingers are grown once, not once per daemon."""
    from hw.sensor.synth import DISK_CACHE_ENV

    d = tmp_path_factory.mktemp("finger-masters")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(DISK_CACHE_ENV, str(d))
        yield d


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """`../shared/corpus` (fingerprints/, faces/, MANIFEST.tsv)."""
    return _find_corpus()


@pytest.fixture(scope="session")
def shared_dir(corpus_dir: Path) -> Path:
    """`../shared` (corpus/, reference/, tools/)."""
    return corpus_dir.parent


# --- shared set-up (tests/support.py): brokers, daemons, tmpfs -------------------------------------------------

_BROKERS = pytest.StashKey[list[Mosquitto]]()
_DAEMONS = pytest.StashKey[list[Rekamd]]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    """A failed test's report ends with the log of every broker (the factory's and fixture values) and every
    rekamd (rekamd_factory's) it used."""
    outcome = yield
    rep = outcome.get_result()
    if not rep.failed:
        return
    brokers = list(item.stash.get(_BROKERS, []))
    brokers += [v for v in getattr(item, "funcargs", {}).values() if isinstance(v, Mosquitto) and v not in brokers]
    for b in brokers:
        rep.sections.append((f"mosquitto log ({b.dir})", b.log_tail()))
    for d in item.stash.get(_DAEMONS, []):
        rep.sections.append((f"rekamd log ({d.log})", d.log_tail()))
    for v in getattr(item, "funcargs", {}).values():
        if isinstance(v, (Postgres, SeaweedS3)):
            rep.sections.append((f"{type(v).__name__} log ({v.log})", v.log_tail()))


@pytest.fixture
def mosquitto_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Mosquitto]]:
    """Make (and start unless `start=False`) brokers, stopped at teardown: `mosquitto_factory(tls=BrokerTls(...),
    claim_listener=..., acl=..., persistence=..., message_size_limit=..., max_packet_size=..., extra=...)`."""
    made = request.node.stash.setdefault(_BROKERS, [])

    def make(start: bool = True, **kw: Any) -> Mosquitto:
        m = Mosquitto(tmp_path / f"mosquitto-{len(made)}", **kw)
        made.append(m)
        return m.start() if start else m

    yield make
    for m in made:
        m.stop()


@pytest.fixture
def mosquitto(mosquitto_factory: Callable[..., Mosquitto]) -> Mosquitto:
    """One running broker on a free local port (persistence off, anonymous)."""
    return mosquitto_factory()


@pytest.fixture
def rekamd_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Rekamd]]:
    """Start `rekamd --sim` processes, each stopped at teardown: `rekamd_factory(cfg, log_path=None,
    state_dir=None, wait=True, timeout=60, extra_args=(), env=None, command=None)` (see tests/support.Rekamd);
    the log is tmp_path/rekamd-N.log unless `log_path`."""
    made = request.node.stash.setdefault(_DAEMONS, [])

    def make(cfg: Path | str, log_path: Path | str | None = None, *, wait: bool = True, timeout: float = 60.0,
             **kw: Any) -> Rekamd:
        d = Rekamd(cfg, log_path or tmp_path / f"rekamd-{len(made)}.log", **kw)
        made.append(d)
        return d.start(wait, timeout)

    yield make
    for d in made:
        d.stop()


@pytest.fixture
def tmpfs() -> Iterator[Tmpfs]:
    """Real tmpfs mounts: `tmpfs.mount(path, size_kb)`; whatever is still mounted is unmounted at teardown."""
    t = Tmpfs()
    try:
        yield t
    finally:
        t.cleanup()


# --- the data center's scale backend: PostgreSQL and an S3 object store (one server each per session) -----------


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One real PostgreSQL 15 server for the whole session (127.0.0.1, a free port, its own temp folder); tests
    take a fresh database each from `pg_database`. A test that stops, kills or restarts it must leave it running."""
    pg = Postgres()
    try:
        yield pg.start()
    finally:
        pg.cleanup()


@pytest.fixture
def pg_database(postgres: Postgres, request: pytest.FixtureRequest) -> Iterator[str]:
    """The DSN of a fresh, empty database on the session's server, dropped after the test."""
    name = "t_" + "".join(ch if ch.isalnum() else "_" for ch in request.node.name.lower())[:50] + f"_{os.getpid()}"
    if not postgres.running:
        postgres.start()
    dsn = postgres.create_database(name)
    yield dsn
    if not postgres.running:
        postgres.start()
    postgres.drop_database(name)


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """One real SeaweedFS (`weed server -s3`) for the whole session; its access key is exported as the standard
    AWS variables (boto3, and every child process, reads them). Tests take a fresh key prefix each from `s3_objects`.
    A test that stops or kills it must leave it running."""
    s3 = SeaweedS3(tmp_path_factory.mktemp("seaweed"))
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3.env.items():
            mp.setenv(k, v)
        s3.start()
        try:
            yield s3
        finally:
            s3.stop()


_PREFIXES = iter(range(1, 1 << 30))
TEST_BUCKET = "rekam-test"


@pytest.fixture
def s3_objects(seaweed: SeaweedS3) -> str:
    """The `--objects` URL (s3://rekam-test/PREFIX?endpoint=...) of a fresh, empty key prefix in the session's
    bucket (a bucket per test would cost SeaweedFS a set of volumes each)."""
    if not seaweed.running:
        seaweed.start()
    seaweed.create_bucket(TEST_BUCKET)
    return seaweed.objects_url(TEST_BUCKET, f"t{os.getpid()}-{next(_PREFIXES)}")


@pytest.fixture(scope="session")
def dc_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One data-center key pair for the whole session (defined here once: a module that imports a fixture
    makes its own copy of it, and the session-wide kits keyed by it would be built again)."""
    d = tmp_path_factory.mktemp("dc")
    priv, pub = record_format.generate_datacenter_keypair()
    (d / "datacenter.key").write_bytes(priv)
    (d / "datacenter.pub").write_bytes(pub)
    return {"dir": d, "priv": priv, "pub": pub, "pub_path": d / "datacenter.pub", "key_path": d / "datacenter.key",
            "sk": record_format.load_datacenter_private_key(priv)}
