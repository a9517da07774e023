"""Shared fixtures. Services the tests need are real (mosquitto, Chromium); a missing one fails
the test with the package to install, never a silent skip."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
