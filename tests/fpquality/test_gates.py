"""Each hard-reject code fires on an image made to trigger it, and no code fires on good prints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from firmware.capture import sensor_image
from firmware.quality.finger import dataset, gates, quality


def sensor(corpus_dir: Path, name: str, spec: str) -> np.ndarray:
    return dataset.Item(name, "x", spec).image(corpus_dir)


def test_no_code_on_good_prints(sensor_prints: dict[str, np.ndarray]) -> None:
    for name, img in sensor_prints.items():
        q = quality.assess(img)
        assert q.codes == [], f"{name}: {q.codes}"
        assert not q.rejected and q.score > 30, f"{name}: score {q.score}"


def test_no_finger_on_empty_glass() -> None:
    for img in (np.full((288, 256), 255, np.uint8), np.full((192, 192), 238, np.uint8)):
        q = quality.assess(img)
        assert q.codes == ["no_finger"] and q.rejected and q.score < 5


def test_press_flatter_on_a_small_centred_contact(sensor_prints: dict[str, np.ndarray]) -> None:
    img = sensor_prints["nbisrs-p1_1.png"].copy()
    yy, xx = np.mgrid[0:288, 0:256]
    small = ((yy - 144) / 80.0) ** 2 + ((xx - 128) / 70.0) ** 2 > 1  # ~24 % of the window left
    img[small] = 255
    q = quality.assess(img)
    assert "press_flatter" in q.codes and "centre_finger" not in q.codes, q.codes


def test_centre_finger_when_the_print_sits_on_one_side(sensor_prints: dict[str, np.ndarray]) -> None:
    img = sensor_prints["sourceafis-probe.png"].copy()
    img[:, 115:] = 255  # finger only on the left 45 % of the window
    q = quality.assess(img)
    assert "centre_finger" in q.codes and "press_flatter" not in q.codes, (q.codes, q.features["fg_fraction"])


def test_too_wet_on_a_dark_merged_print(corpus_dir: Path) -> None:
    q = quality.assess(sensor(corpus_dir, "nfiq2-SFinGe_Test01.pgm", "wet:3"))
    assert "too_wet" in q.codes and q.rejected


def test_clean_glass_on_a_smeared_image(corpus_dir: Path) -> None:
    q = quality.assess(sensor(corpus_dir, "nbisrs-p2_1.png", "blur:3.5"))
    assert "clean_glass" in q.codes, q.codes


def test_too_dry_on_broken_faint_ridges(corpus_dir: Path) -> None:
    q = quality.assess(sensor(corpus_dir, "nbisrs-p1_1.png", "dry:1.5"))
    assert "too_dry" in q.codes, q.codes


def test_few_minutiae_on_perfect_parallel_ridges() -> None:
    # A clean ridge pattern with no ending or bifurcation anywhere: every other gate passes.
    yy, xx = np.mgrid[0:288, 0:256]
    img = sensor_image.quantise16((128 + 100 * np.cos(2 * np.pi * (xx + 0.15 * yy) / 9.0)).astype(np.uint8))
    q = quality.assess(img)
    assert q.codes == ["few_minutiae"], q.codes


def test_limits_come_from_config() -> None:
    from firmware import config

    cfg = config.defaults(quality_finger={"min_minutiae": 0, "max_centre_offset": 0.5})
    lim = gates.Limits.from_config(cfg.quality_finger)
    assert lim.min_minutiae == 0 and lim.max_centre_offset == 0.5
    yy, xx = np.mgrid[0:288, 0:256]
    img = sensor_image.quantise16((128 + 100 * np.cos(2 * np.pi * (xx + 0.15 * yy) / 9.0)).astype(np.uint8))
    assert quality.assess(img, lim).codes == []


def test_every_code_has_a_message() -> None:
    assert set(gates.ORDER) == set(gates.MESSAGES)
    assert all(m and m[0].isupper() for m in gates.MESSAGES.values())


def test_assess_refuses_non_sensor_images() -> None:
    with pytest.raises(sensor_image.ImageFormatError, match="256x288"):
        quality.assess(np.zeros((300, 300), np.uint8))
    with pytest.raises(sensor_image.ImageFormatError, match="uint8"):
        quality.assess(np.zeros((288, 256, 3), np.uint8))


def test_r503_geometry_is_judged(sensor_prints: dict[str, np.ndarray]) -> None:
    # R503 delivers 192x192; no training image has that geometry (see docs), but it must work.
    img = sensor_image.crop_or_pad(sensor_prints["nbisrs-p2_2.png"], 192, 192)
    q = quality.assess(img)
    assert q.codes == [] and 0 <= q.score <= 100 and q.features["minutiae"] >= 12
