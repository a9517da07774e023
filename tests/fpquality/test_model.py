"""The boosted-tree model: deterministic fit, file format, and the committed model file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from firmware.quality.finger import features, gbt, quality


def data(n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    r = np.random.default_rng(7)
    x = r.normal(size=(n, 6))
    return x, 50 + 10 * np.tanh(x[:, 0]) + 5 * (x[:, 1] > 0) * x[:, 2] + r.normal(0, 0.5, n)


def test_fit_is_deterministic_and_learns() -> None:
    x, y = data()
    a = gbt.fit(x[:200], y[:200], n_trees=60)
    b = gbt.fit(x[:200], y[:200], n_trees=60)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    pred = gbt.predict(a, x[200:])
    assert np.corrcoef(pred, y[200:])[0, 1] > 0.8


def test_save_load_roundtrip_has_no_pickle(tmp_path: Path) -> None:
    x, y = data()
    m = gbt.fit(x, y, n_trees=20)
    p = tmp_path / "m.npz"
    gbt.save(m, p)
    m2 = gbt.load(p)
    assert np.array_equal(gbt.predict(m, x), gbt.predict(m2, x))
    bad = tmp_path / "bad.npz"
    np.savez(bad, format=np.array(99))
    with pytest.raises(ValueError, match="format"):
        gbt.load(bad)


def test_committed_model_matches_the_feature_list() -> None:
    m = quality.load_model()
    assert tuple(str(s) for s in m["feature_names"]) == features.MODEL_FEATURES
    assert m["feature"].max() < len(features.MODEL_FEATURES)
    assert quality.MODEL_PATH.stat().st_size < 100_000  # a small data file, not a 50 MB forest
    assert float(m["cv_spearman"]) >= 0.85  # held-out (leave-one-finger-out) figure at training time


def test_allocator_tuning_on_glibc() -> None:
    import platform

    from firmware.quality.finger import alloc

    if platform.libc_ver()[0] == "glibc":
        assert alloc.tune() is True and alloc.tune() is True  # idempotent


def test_trainer_writes_the_model_file_the_checker_loads() -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "tools" / "train_fpquality.py"
    spec = importlib.util.spec_from_file_location("train_fpquality", path)
    assert spec is not None and spec.loader is not None
    trainer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trainer)
    assert trainer.MODEL == quality.MODEL_PATH
