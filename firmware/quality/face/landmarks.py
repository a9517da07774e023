"""FaceMesh (468 points) and iris/eye-contour landmarks on rotated ROIs, mapped back to the frame.

The ROI logic follows MediaPipe's graphs: the face ROI is the detection box made square on its
long side, scaled 1.5x and rotated so the eye keypoints are level
(face_detection_front_detection_to_roi); a second pass uses the mesh's own bounding box and
eye corners 33/263 (face_landmarks_to_roi), which tightens the fit for turned or rolled heads.
Each eye ROI is the square around its two corners scaled 2.3x (iris_landmark_landmarks_to_roi);
the right eye is mirrored because the iris model is trained on left eyes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import cv2
import numpy as np

from firmware.quality.face.detect import KP_LEFT_EYE, KP_RIGHT_EYE, Detection
from firmware.quality.face.models import TFLiteModel

FACE_ROI_SCALE = 1.5
IRIS_ROI_SCALE = 2.3
MESH_PRESENCE_MIN = 0.5  # sigmoid of the mesh model's face flag

# Mesh indices (MediaPipe canonical face mesh). "right" = the subject's right (image left).
RIGHT_EYE_OUTER, RIGHT_EYE_INNER = 33, 133
LEFT_EYE_INNER, LEFT_EYE_OUTER = 362, 263
# 16-point eye contours in the iris model's order: lower lid 0-8 (corner to corner), upper lid
# 9-15 (without corners); upper point i sits above lower point i+1.
RIGHT_EYE_CONTOUR = [33, 7, 163, 144, 145, 153, 154, 155, 133, 246, 161, 160, 159, 158, 157, 173]
LEFT_EYE_CONTOUR = [263, 249, 390, 373, 374, 380, 381, 382, 362, 466, 388, 387, 386, 385, 384, 398]


@dataclass(frozen=True)
class Roi:
    """A rotated square region: centre (px), side (px) and angle (radians, image y down)."""

    cx: float
    cy: float
    side: float
    angle: float

    def axes(self) -> tuple[np.ndarray, np.ndarray]:
        """Unit vectors of the square's x and y sides (computed once per ROI: crop and to_image reuse them)."""
        return self._axes

    @cached_property
    def _axes(self) -> tuple[np.ndarray, np.ndarray]:
        c, s = np.cos(self.angle), np.sin(self.angle)
        return np.array([c, s]), np.array([-s, c])

    def crop(self, bgr: np.ndarray, size: int, flip: bool = False, out: np.ndarray | None = None) -> np.ndarray:
        """The ROI resampled to `size` x `size` RGB float32 in [0, 1] (mirrored if `flip`), written into
        `out` when given (a model's input buffer)."""
        ex, ey = self.axes()
        k = self.side / size
        origin = np.array([self.cx, self.cy]) - (ex + ey) * self.side / 2
        # src = origin + k*(u*ex + v*ey); warpAffine wants the dst->src map with WARP_INVERSE_MAP
        m = np.array([[k * ex[0], k * ey[0], origin[0]], [k * ex[1], k * ey[1], origin[1]]])
        patch = cv2.warpAffine(bgr, m, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                               borderMode=cv2.BORDER_CONSTANT)
        if flip:
            patch = patch[:, ::-1]
        # one pass uint8 -> float32 / 255 (the same float32 division as astype() then / 255.0)
        return np.divide(cv2.cvtColor(patch, cv2.COLOR_BGR2RGB), np.float32(255.0), out=out, dtype=np.float32)

    def to_image(self, pts: np.ndarray, size: int, flip: bool = False) -> np.ndarray:
        """Map (N, 3) model-pixel points (x, y, z) back to frame pixels; z is scaled like x."""
        p = pts.astype(np.float64)  # a new array: flipped in place below
        if flip:
            p[:, 0] = size - p[:, 0]
        ex, ey = self.axes()
        k = self.side / size
        u, v = p[:, 0] * k - self.side / 2, p[:, 1] * k - self.side / 2
        out = np.empty_like(p)
        out[:, 0] = self.cx + u * ex[0] + v * ey[0]
        out[:, 1] = self.cy + u * ex[1] + v * ey[1]
        out[:, 2] = p[:, 2] * k
        return out


def roi_from_points(pts: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float,
                    box: tuple[float, float, float, float] | None = None) -> Roi:
    """Square ROI around `pts` (or `box`), side = long side x `scale`, rotated to level a->b."""
    if box is None:
        (x0, y0), (x1, y1) = pts[:, :2].min(axis=0), pts[:, :2].max(axis=0)
    else:
        x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0) * scale
    angle = float(np.arctan2(b[1] - a[1], b[0] - a[0]))
    return Roi((x0 + x1) / 2, (y0 + y1) / 2, float(side), angle)


@dataclass
class FaceLandmarks:
    """Mesh (468, 3) and optional refined eye contours/irises, all in frame pixels."""

    mesh: np.ndarray
    presence: float
    roi: Roi
    right_eye: np.ndarray | None = None  # (16, 2) contour from the iris model
    left_eye: np.ndarray | None = None
    right_iris: np.ndarray | None = None  # (5, 2): centre then 4 edge points
    left_iris: np.ndarray | None = None

    def eye_contour(self, side: str) -> np.ndarray:
        """16-point eye contour for 'right' or 'left' (iris-model refined if available)."""
        refined = self.right_eye if side == "right" else self.left_eye
        if refined is not None:
            return refined
        idx = RIGHT_EYE_CONTOUR if side == "right" else LEFT_EYE_CONTOUR
        return self.mesh[idx, :2]


class LandmarkModel:
    """FaceMesh + iris models; `landmarks(bgr, detection)` returns `FaceLandmarks` or None."""

    def __init__(self, folder: str | Path | None = None, threads: int = 1, iris: bool = True,
                 refine_passes: int = 1) -> None:
        self.mesh_model = TFLiteModel.load("face_landmark.tflite", folder, threads)
        self.iris_model = TFLiteModel.load("iris_landmark.tflite", folder, threads) if iris else None
        self.refine_passes = refine_passes

    def _mesh(self, bgr: np.ndarray, roi: Roi) -> tuple[np.ndarray, float]:
        model = self.mesh_model
        size = model.size
        view = model.input_view()
        roi.crop(bgr, size, out=view)  # straight into the model's input: no tensor, no set_tensor copy
        del view  # LiteRT runs only when no array refers to its buffers
        raw, flag = model.invoke()
        v = flag.ravel()[0]  # float32, clipped like np.clip(v, -80, 80) (NaN stays NaN) without its call overhead
        presence = float(1.0 / (1.0 + np.exp(-min(max(v, np.float32(-80)), np.float32(80)))))
        return roi.to_image(raw.reshape(-1, 3)[:468], size), presence

    def _eye(self, bgr: np.ndarray, mesh: np.ndarray, a: int, b: int, flip: bool
             ) -> tuple[np.ndarray, np.ndarray]:
        assert self.iris_model is not None
        size = self.iris_model.size
        pa, pb = mesh[a, :2], mesh[b, :2]
        roi = roi_from_points(np.stack([pa, pb]), pa, pb, IRIS_ROI_SCALE)
        view = self.iris_model.input_view()
        roi.crop(bgr, size, flip, out=view)
        del view
        contour, iris = self.iris_model.invoke()
        contour_px = roi.to_image(contour.reshape(-1, 3)[:16], size, flip)[:, :2]
        iris_px = roi.to_image(iris.reshape(-1, 3), size, flip)[:, :2]
        return contour_px, iris_px

    def landmarks(self, bgr: np.ndarray, det: Detection) -> FaceLandmarks | None:
        """Landmarks of face `det` in `bgr`; None when the mesh model says there is no face."""
        out = self.face_mesh(bgr, det)
        if out is not None:
            self.refine_eyes(bgr, out)
        return out

    def face_mesh(self, bgr: np.ndarray, det: Detection) -> FaceLandmarks | None:
        """The mesh passes of `landmarks` (no eye refinement yet: `refine_eyes`)."""
        kp = det.keypoints
        roi = roi_from_points(kp, kp[KP_RIGHT_EYE], kp[KP_LEFT_EYE], FACE_ROI_SCALE, det.box)
        mesh, presence = self._mesh(bgr, roi)
        for _ in range(self.refine_passes):
            if presence < MESH_PRESENCE_MIN:
                break
            roi = roi_from_points(mesh[:, :2], mesh[RIGHT_EYE_OUTER, :2], mesh[LEFT_EYE_OUTER, :2],
                                  FACE_ROI_SCALE)
            mesh, presence = self._mesh(bgr, roi)
        if presence < MESH_PRESENCE_MIN:
            return None
        return FaceLandmarks(mesh, presence, roi)

    def refine_eyes(self, bgr: np.ndarray, lm: FaceLandmarks) -> None:
        """Eye contours and irises of `lm` from the iris model (nothing without one)."""
        if self.iris_model is None:
            return
        # The iris model is trained on the image-left eye (33/133, the subject's right); the
        # other eye is mirrored in and out, so both contours come back in the same order.
        mesh = lm.mesh
        lm.right_eye, lm.right_iris = self._eye(bgr, mesh, RIGHT_EYE_OUTER, RIGHT_EYE_INNER, False)
        lm.left_eye, lm.left_iris = self._eye(bgr, mesh, LEFT_EYE_INNER, LEFT_EYE_OUTER, True)
