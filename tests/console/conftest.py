"""Fixtures for the operator interfaces: a real `rekamd --sim` subprocess with a temp config.

The daemon runs the simulated sensor on a real pty (wire speed 0: no emulated UART time) and the
simulated camera on corpus faces; tests talk to it over HTTP like the console and the CLI do.
"""

from __future__ import annotations

import math
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import Rekamd, write_daemon_config

REPO = Path(__file__).resolve().parents[2]
SIM_TOML = REPO / "config" / "rekam-sim.toml"
OPERATOR = ("demo", "123456")
SUPERVISOR = ("spv", "654321")
# Valid NIKs (province 32 Jawa Barat / 35 Jawa Timur); each test uses its own residents.
NIK_MALE = "3201011505900001"  # born 15.05.1990
NIK_FEMALE = "3578015505900002"  # day 55 = 15 + 40: a woman born 15.05.1990


def _operators_block() -> str:
    """The demo operators of config/rekam-sim.toml (PIN hashes only), reused verbatim."""
    text = SIM_TOML.read_text()
    return text[text.index("[operators]"):]


@dataclass
class Daemon:
    """A running rekamd (tests/support.Rekamd) under `root` and an HTTP client on its API."""

    rekamd: Rekamd
    root: Path

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        assert self.rekamd.proc is not None
        return self.rekamd.proc

    @property
    def cfg(self) -> Path:
        return self.rekamd.cfg

    @property
    def url(self) -> str:
        return self.rekamd.url

    @property
    def sd(self) -> Path:
        return self.root / "sd"

    @property
    def usb(self) -> Path:
        return self.root / "usb"

    @property
    def local_token(self) -> str:
        """The daemon's local credential (the CLI's), from `api.token` in its state directory."""
        return (self.rekamd.state_dir / "api.token").read_text().strip()

    def client(self) -> httpx.Client:
        """A client with the local token (as the `rekam` CLI sends it)."""
        return httpx.Client(base_url=self.url, timeout=60, headers={"X-Rekam-Token": self.local_token})

    def anon(self) -> httpx.Client:
        """A client without any credential."""
        return httpx.Client(base_url=self.url, timeout=60)

    def signin(self, who: tuple[str, str] = OPERATOR) -> httpx.Client:
        """A client signed in as `who` (Bearer token, no local token)."""
        c = self.anon()
        r = c.post("/api/v1/auth/signin", json={"operator_id": who[0], "pin": who[1]})
        assert r.status_code == 200, r.text
        c.headers["Authorization"] = f"Bearer {r.json()['token']}"
        return c

    def stop(self) -> str:
        """Stop the daemon (SIGTERM, then SIGKILL after 10 s); returns its log."""
        self.rekamd.stop(10)
        return self.rekamd.log_text()


def write_config(root: Path, dc_pub: Path, corpus: Path, fingers: list[str] | None = None,
                 dedup: list[str] | None = None, extra: str = "", sd: Path | None = None,
                 max_record_mb: int = 8, api: dict[str, Any] | None = None,
                 simulation: dict[str, Any] | None = None) -> Path:
    """The shared sim config (tests/support.py) for the console tests: SD = root/sd unless `sd`, the sim camera,
    the sensor without emulated UART time (plus `simulation`'s keys), the demo operators."""
    fingers = fingers if fingers is not None else ["R1", "R2"]
    dedup = dedup if dedup is not None else ["R2"]
    return write_daemon_config(
        root, dc_pub, corpus, f"{extra}\n{_operators_block()}",
        kit={"state_dir": str(sd or root / "sd"), "site": "test-site"},
        store={"journal_reserve_mb": 1, "max_record_mb": max_record_mb},
        simulation={"sensor_wire_speed": 0, **(simulation or {})},
        camera={"backend": "sim"},
        enrollment={"fingers": fingers, "dedup_fingers": dedup},
        api=api or {},
    )


CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture
def browser() -> Iterator[Any]:
    """A real headless Chromium (Playwright) for the console tests."""
    if not CHROMIUM.exists():
        pytest.fail("Chromium is not installed: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def make_daemon(tmp_path: Path, dc_keys: dict[str, Any], corpus_dir: Path,
                rekamd_factory: Callable[..., Rekamd]) -> Callable[..., Daemon]:
    """`make_daemon(fingers=[...], dedup=[...], extra="toml", sd=Path, api={...})` starts a daemon and waits for
    its API; stopped at teardown (rekamd_factory)."""

    def make(**kw: Any) -> Daemon:
        cfg = write_config(tmp_path, dc_keys["pub_path"], corpus_dir, **kw)
        return Daemon(rekamd_factory(cfg), tmp_path)

    return make


@pytest.fixture
def daemon(make_daemon: Any) -> Daemon:
    """A daemon capturing R1 and R2 (R2 in the duplicate library)."""
    return make_daemon()


def signature_strokes(width: int = 600, height: int = 200) -> list[list[list[float]]]:
    """A plausible hand signature on a `width` x `height` pad: a looped first name and an underline."""
    first = [[60 + 4.5 * t, height / 2 + 50 * math.sin(t / 6) * math.cos(t / 17), 0.5, 10.0 * t] for t in range(80)]
    loop = [[200 + 60 * math.cos(t / 8), 90 + 40 * math.sin(t / 8), 0.6, 10.0 * t] for t in range(50)]
    line = [[70 + 7 * t, height - 35 + (t % 3), 0.4, 10.0 * t] for t in range(60)]
    return [first, loop, line]


def enroll(c: httpx.Client, nik: str, override_reason: str = "", commit: bool = True,
           start: bool = True, sign: bool = True) -> dict[str, Any]:
    """Drive one whole enrollment through the API (`start=False`: the one in progress); returns the receipt,
    or the state where it stopped (review, supervisor, or the signature when `sign` is False) when `commit` is
    False. Every iris answer is checked to carry the eye's position."""
    if start:
        r = c.post("/api/v1/enrollment", json={"nik": nik, "override_reason": override_reason})
        assert r.status_code == 200, r.text
        state = r.json()
    else:
        state = c.get("/api/v1/enrollment").json()
    for _ in range(60):
        step = state["step"]
        if step == "face":
            r = c.post("/api/v1/enrollment/face")
        elif step.startswith("iris:"):
            r = c.post(f"/api/v1/enrollment/iris/{step[5:]}")
            assert r.status_code == 200, r.text
            assert "distance" in r.json()["position"] or r.json()["codes"] == ["NO_IRIS"], r.json()
        elif step.startswith("finger:"):
            r = c.post(f"/api/v1/enrollment/fingers/{step[7:]}")
        elif step == "signature" and sign:
            r = c.post("/api/v1/enrollment/signature", json={"strokes": signature_strokes(), "width": 600,
                                                              "height": 200})
            assert r.json()["accepted"], r.json()
        elif step == "dupcheck":
            r = c.post("/api/v1/enrollment/dupcheck")
        else:
            break
        assert r.status_code == 200, r.text
        state = c.get("/api/v1/enrollment").json()
    else:
        pytest.fail(f"enrollment did not reach review: {state}")
    if not commit:
        return state
    assert state["step"] == "review", state
    r = c.post("/api/v1/enrollment/commit")
    assert r.status_code == 200, r.text
    return r.json()
