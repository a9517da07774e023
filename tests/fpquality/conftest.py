"""Fixtures for the fingerprint quality tests: corpus prints in sensor format (read-only corpus)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from firmware.capture import sensor_image
from firmware.quality.finger import dataset


@pytest.fixture(scope="session")
def prints(corpus_dir: Path) -> list[str]:
    """Names of the 16 corpus fingerprint images."""
    names = dataset.corpus_prints(corpus_dir)
    assert len(names) >= 10, f"expected the corpus fingerprints, found {names}"
    return names


@pytest.fixture(scope="session")
def sensor_prints(corpus_dir: Path, prints: list[str]) -> dict[str, np.ndarray]:
    """Every corpus print converted to the sensor format (256x288, 16 levels)."""
    return {n: sensor_image.load_sensor_file(corpus_dir / "fingerprints" / n) for n in prints}


def golden(corpus_dir: Path, k: int) -> dict[str, float]:
    """NIST's published NFIQ 2 output for SFinGe_Test0k."""
    out = {}
    for line in (corpus_dir / "fingerprints" / f"nfiq2-SFinGe_Test0{k}_output.txt").read_text().splitlines():
        name, _, value = line.partition(": ")
        out[name] = float(value)
    return out
