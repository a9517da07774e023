"""Fixtures of the iris and signature tests: the console tests' real `rekamd --sim` and Chromium, reused."""

from __future__ import annotations

import math
from typing import Any

import httpx
import pytest

from tests.console.conftest import browser, dc_keys, make_daemon  # noqa: F401  (fixtures)

#: The `[iris]` block of a kit that captures both irises and the signature (the simulator's retakes at 0.25).
IRIS_TOML = "[iris]\ncapture_iris = true\ncapture_signature = true\n"


def signature_strokes(width: int = 600, height: int = 200) -> list[list[list[float]]]:
    """A plausible hand signature on a `width` x `height` pad: a looped first name and an underline."""
    first = [[60 + 4.5 * t, height / 2 + 50 * math.sin(t / 6) * math.cos(t / 17), 0.5, 10.0 * t] for t in range(80)]
    loop = [[200 + 60 * math.cos(t / 8), 90 + 40 * math.sin(t / 8), 0.6, 10.0 * t] for t in range(50)]
    line = [[70 + 7 * t, height - 35 + (t % 3), 0.4, 10.0 * t] for t in range(60)]
    return [first, loop, line]


def drive(c: httpx.Client, nik: str, sign: bool = True) -> dict[str, Any]:
    """Drive a started enrollment through face, irises, fingers, signature and dupcheck to review; returns the
    state at review. Every iris answer is checked to carry the eye's position."""
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
    return state
