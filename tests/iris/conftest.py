"""Fixtures of the iris and signature tests: the console tests' real `rekamd --sim` and Chromium, reused."""

from __future__ import annotations

from typing import Any

import httpx

# Fixtures, and the console tests' enrollment driver and signature strokes (re-exported for the iris tests).
from tests.console.conftest import browser, enroll, make_daemon, signature_strokes  # noqa: F401

#: The `[iris]` block of a kit that captures both irises and the signature (the simulator's retakes at 0.25).
IRIS_TOML = "[iris]\ncapture_iris = true\ncapture_signature = true\n"


def drive(c: httpx.Client, nik: str, sign: bool = True) -> dict[str, Any]:
    """Drive the enrollment in progress through face, irises, fingers, signature (unless `sign` is False) and
    dupcheck to review (`tests.console.conftest.enroll`, which also checks every iris answer carries the eye's
    position); returns the state where it stopped. `nik` names the resident for the reader only."""
    return enroll(c, nik, commit=False, start=False, sign=sign)
