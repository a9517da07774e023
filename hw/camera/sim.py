"""Simulated camera: serves image files (by default the clear corpus portraits) or queued arrays.

Tests and the enrollment workflow choose the next shot with `serve(path_or_array, ...)`; once the
queue is empty the camera cycles through its default images.
"""

from __future__ import annotations

import csv
import logging
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from hw.camera.base import Camera, CameraError, to_bgr

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}


def _read(path: Path) -> np.ndarray:
    import cv2

    data = np.fromfile(path, dtype=np.uint8) if path.is_file() else None
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data is not None and data.size else None
    if img is None:
        raise CameraError(f"sim camera: cannot read image {path}")
    return img


def clear_portraits(folder: Path) -> list[Path]:
    """Corpus faces whose MANIFEST kind is `face` and whose notes say "single clear"; falls back
    to every image in `folder` when there is no manifest (any test folder)."""
    manifest = folder.parent / "MANIFEST.tsv"
    if manifest.is_file():
        picked = []
        with manifest.open(encoding="utf-8", newline="") as f:
            for row in csv.reader(f, delimiter="\t"):
                if len(row) > 8 and row[7] == "face" and "single clear" in row[8]:
                    p = folder.parent / row[0]
                    if p.parent.resolve() == folder.resolve() and p.is_file():
                        picked.append(p)
        if picked:
            return sorted(picked)
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


class SimCamera(Camera):
    """Serves queued images first, then cycles `files` (default: the clear portraits of `folder`)."""

    name = "sim"

    def __init__(self, folder: str | Path, files: Iterable[str | Path] | None = None) -> None:
        super().__init__()
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CameraError(f"sim camera: folder not found: {self.folder}")
        paths = [self.folder / p for p in files] if files is not None else clear_portraits(self.folder)
        if not paths:
            raise CameraError(f"sim camera: no images in {self.folder}")
        self.cycle = paths
        self._next = 0
        self._queue: deque[np.ndarray | Path] = deque()
        self.last_source: str | None = None

    def serve(self, *items: str | Path | np.ndarray) -> None:
        """Queue images for the next captures: file paths (relative to the folder or absolute)
        or BGR uint8 arrays. Paths are checked now so a typo fails at the call, not mid-capture."""
        for item in items:
            if isinstance(item, np.ndarray):
                self._queue.append(to_bgr(item, "sim camera serve()").copy())
                continue
            p = Path(item)
            p = p if p.is_absolute() or p.exists() else self.folder / p
            if not p.is_file():
                raise CameraError(f"sim camera: serve(): no such image {p}")
            self._queue.append(p)

    def pending(self) -> int:
        """Number of queued shots not yet captured."""
        return len(self._queue)

    def _capture(self) -> np.ndarray:
        if self._queue:
            item = self._queue.popleft()
        else:
            item = self.cycle[self._next % len(self.cycle)]
            self._next += 1
        if isinstance(item, np.ndarray):
            self.last_source = "<array>"
            return item.copy()
        self.last_source = str(item)
        return _read(item)

    def health(self) -> dict[str, Any]:
        """Base health plus the folder, the cycle length, queued images and the last image served."""
        return {**super().health(), "folder": str(self.folder), "cycle": len(self.cycle),
                "queued": len(self._queue), "last_source": self.last_source}
