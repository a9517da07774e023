"""Conversion to the sensor format, exactly as the corpus README and nfiq2-reference --sensor do it."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from firmware.capture import sensor_image as si


def test_quantise_to_16_levels() -> None:
    v = np.arange(256, dtype=np.uint8)
    q = si.quantise16(v)
    assert set(np.unique(q)) == {17 * k for k in range(16)}
    assert q[15] == 0 and q[16] == 17 and q[255] == 255


def test_centre_crop_uses_floor_offsets() -> None:
    # 261 x 291: x0 = (261-256)//2 = 2, y0 = (291-288)//2 = 1.
    img = (np.arange(291)[:, None] * 1000 + np.arange(261)[None, :]) % 251
    out = si.crop_or_pad(img.astype(np.uint8))
    assert out.shape == (288, 256)
    assert out[0, 0] == img[1, 2] and out[-1, -1] == img[288, 257]


def test_small_image_is_padded_with_white_centred() -> None:
    img = np.zeros((200, 250), np.uint8)
    out = si.crop_or_pad(img)
    # Pillow paste at (-x0, -y0) with x0 = (250-256)//2 = -3, y0 = (200-288)//2 = -44.
    assert out[44:244, 3:253].max() == 0
    assert out[:44].min() == 255 and out[244:].min() == 255 and out[:, :3].min() == 255
    assert out[:, 253:].min() == 255


def test_sensor_geometries_pass_through() -> None:
    for shape in ((288, 256), (192, 192)):
        img = np.full(shape, 200, np.uint8)
        assert si.to_sensor(img).shape == shape
        assert (si.to_sensor(img) == (200 >> 4) * 17).all()


def test_colour_and_alpha_become_gray(tmp_path: Path) -> None:
    bgra = np.zeros((300, 300, 4), np.uint8)
    bgra[..., :3] = 120
    bgra[..., 3] = 255
    p = tmp_path / "rgba.png"
    cv2.imwrite(str(p), bgra)
    g = si.load_file(p)
    assert g.shape == (300, 300) and (g == 120).all()


def test_bad_inputs_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(si.ImageFormatError, match="no such file"):
        si.load_file(tmp_path / "missing.png")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(si.ImageFormatError, match="not an image"):
        si.load_file(junk)
    with pytest.raises(si.ImageFormatError, match="uint8"):
        si.to_sensor(np.zeros((288, 256), np.float32))
    with pytest.raises(si.ImageFormatError, match="too small"):
        si.to_sensor(np.zeros((8, 8), np.uint8))


def test_matches_reference_sensor_transform_on_corpus(corpus_dir: Path) -> None:
    # Independent re-statement of the README recipe (crop offsets (w-256)//2, (h-288)//2, v>>4*17).
    p = corpus_dir / "fingerprints" / "sourceafis-probe.png"
    g = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
    h, w = g.shape
    x0, y0 = (w - 256) // 2, (h - 288) // 2
    expect = (g[y0:y0 + 288, x0:x0 + 256] >> 4) * 17
    assert np.array_equal(si.load_sensor_file(p), expect)
