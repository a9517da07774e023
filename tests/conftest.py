"""Shared fixtures. Services the tests need are real (mosquitto, Chromium); a missing one fails
the test with the package to install, never a silent skip."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import Mosquitto, Rekamd, Tmpfs

REPO = Path(__file__).resolve().parent.parent


def _find_corpus() -> Path:
    env = os.environ.get("REKAM_CORPUS")
    candidates = [Path(env)] if env else []
    candidates += [REPO.parent / "shared" / "corpus", REPO / ".." / "shared" / "corpus"]
    for c in candidates:
        if (c / "MANIFEST.tsv").exists():
            return c.resolve()
    pytest.fail("biometric corpus not found: set REKAM_CORPUS or place shared/corpus next to the checkout")


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
