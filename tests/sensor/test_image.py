"""4-bit UART image packing, geometries, and the corpus-to-sensor conversion."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from hw.sensor.image import (
    R307_GEOMETRY,
    R503_GEOMETRY,
    fit_to_geometry,
    geometry_for_bytes,
    pack_4bit,
    to_sensor_image,
    unpack_4bit,
)


def test_nibble_order_high_nibble_is_left_pixel() -> None:
    payload = bytes([0xF0, 0x1E]) + bytes(R503_GEOMETRY.packed_bytes - 2)
    img = unpack_4bit(payload)
    assert img.shape == (192, 192)
    assert list(img[0, :4]) == [255, 0, 17, 238]


@pytest.mark.parametrize("geometry", [R307_GEOMETRY, R503_GEOMETRY])
def test_pack_unpack_is_byte_exact(geometry) -> None:
    rng = np.random.default_rng(1)
    payload = rng.integers(0, 256, geometry.packed_bytes, dtype=np.uint8).tobytes()
    img = unpack_4bit(payload)
    assert img.shape == (geometry.height, geometry.width)
    assert pack_4bit(img) == payload
    assert set(np.unique(img)) <= {v * 17 for v in range(16)}


def test_geometry_from_size_and_errors() -> None:
    assert geometry_for_bytes(36864) == R307_GEOMETRY
    assert geometry_for_bytes(18432) == R503_GEOMETRY
    with pytest.raises(ValueError, match="36864 B"):
        geometry_for_bytes(1000)
    with pytest.raises(ValueError, match="2-D uint8"):
        pack_4bit(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="needs 18432 bytes"):
        unpack_4bit(bytes(100), R503_GEOMETRY)


def test_fit_crops_centre_and_pads_white() -> None:
    big = np.arange(400 * 500, dtype=np.uint32).reshape(500, 400).astype(np.uint8)
    out = fit_to_geometry(big, R307_GEOMETRY)
    y0, x0 = (500 - 288) // 2, (400 - 256) // 2
    assert np.array_equal(out, big[y0:y0 + 288, x0:x0 + 256])
    small = np.zeros((100, 50), np.uint8)
    out = fit_to_geometry(small, R307_GEOMETRY)
    assert out.shape == (288, 256)
    assert out[0, 0] == 255 and out[144, 128] == 0
    assert int((out == 0).sum()) == 100 * 50


def test_corpus_print_conversion_matches_the_manifest_recipe(corpus_dir: Path) -> None:
    """Gray, centre crop/pad, v = (v >> 4) * 17: the `nfiq2_sensor` preparation of the corpus."""
    src = cv2.imread(str(corpus_dir / "fingerprints" / "nbisrs-p1_1.png"), cv2.IMREAD_UNCHANGED)
    out = to_sensor_image(src, R307_GEOMETRY)
    gray = src[:, :, 0]  # R=G=B in this file
    h, w = gray.shape
    ref = gray[(h - 288) // 2:(h - 288) // 2 + 288, (w - 256) // 2:(w - 256) // 2 + 256]
    assert np.array_equal(out, (ref >> 4) * 17)
