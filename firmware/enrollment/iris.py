"""The enrollment's iris and signature steps (issue #20), mixed into `EnrollmentService` (their part of the
record's manifest, schema `rekam.enrollment/3`, is `payload.iris_signature_manifest`).

Irises: one step per eye in `[iris] eyes` order (left, then right), after the face and before the fingers; each
shot is assessed (`firmware.quality.iris`) under the same retake / keep-best / forced policy as fingers and
face; an eye that cannot be captured (missing, blind, prosthesis, disease) is an exception with a reason.
Signature: after the fingers, drawn on the console's pad and sent as strokes (points with pressure); the kit
renders them itself (a client never sends pixels), checks them (not empty, enough ink, not a single line)
and keeps a grey, trimmed PNG and the strokes; a resident who cannot sign is an exception (the thumbprint
in the record stands for it, as in field practice).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from firmware.enrollment.payload import jpeg, png
from firmware.errors import EnrollmentError, QualityError
from firmware.quality.policy import Attempt, CaptureState
from firmware.system.i18n import N_, gettext

log = logging.getLogger(__name__)

EYE_LABELS = {"left": N_("left eye"), "right": N_("right eye")}
#: Signature codes -> hint (English msgid).
SIGNATURE_CODES = {
    "SIGNATURE_EMPTY": N_("The signature pad is empty: ask the resident to sign"),
    "SIGNATURE_TOO_LITTLE": N_("Too little ink: ask the resident to sign in full"),
    "SIGNATURE_LINE": N_("A single line is not a signature: ask the resident to sign in full"),
}
MAX_STROKES = 200
MAX_POINTS = 20000
PAD_MAX = 2000
INK_PX = 3  # stroke width on the kit's rendering, px


@dataclass
class IrisState(CaptureState):
    """One eye's progress."""

    eye: str


@dataclass
class SignatureState:
    """The signature: the kit's PNG and the strokes, or an exception; attempts that failed the check."""

    png: bytes = b""
    strokes: list[list[list[float]]] = field(default_factory=list)
    width: int = 0
    height: int = 0
    codes: list[str] = field(default_factory=list)
    attempts: int = 0
    exception: str = ""

    @property
    def done(self) -> bool:
        return bool(self.exception or self.png)


def eye_label(eye: str) -> str:
    return gettext(EYE_LABELS[eye])


def render_signature(strokes: list[list[list[float]]], width: int, height: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Draw `strokes` (each a list of [x, y, pressure?...] in pad pixels) black on white; the image and its
    measures (ink share of the pad, the inked box)."""
    import cv2

    img = np.full((height, width), 255, np.uint8)
    for s in strokes:
        pts = np.array([[p[0], p[1]] for p in s], np.float64)
        pts = np.clip(np.round(pts), [0, 0], [width - 1, height - 1]).astype(np.int32)
        if len(pts) == 1:
            cv2.circle(img, tuple(int(v) for v in pts[0]), INK_PX // 2 + 1, 0, -1, cv2.LINE_AA)
        else:
            cv2.polylines(img, [pts.reshape(-1, 1, 2)], False, 0, INK_PX, cv2.LINE_AA)
    ink = img < 128
    ys, xs = np.nonzero(ink)
    box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())) if xs.size else None
    return img, {"ink": float(ink.mean()), "box": box}


def check_signature(strokes: list[list[list[float]]], width: int, height: int, cfg: Any) -> tuple[list[str],
                                                                                               np.ndarray | None]:
    """The signature's codes under `[iris]` (signature_min_*), and the trimmed grey image when it passes."""
    if not strokes or not any(strokes):
        return ["SIGNATURE_EMPTY"], None
    img, m = render_signature(strokes, width, height)
    if m["box"] is None:
        return ["SIGNATURE_EMPTY"], None
    x0, y0, x1, y1 = m["box"]
    codes = []
    if len(strokes) < cfg.signature_min_strokes or m["ink"] < cfg.signature_min_ink:
        codes.append("SIGNATURE_TOO_LITTLE")
    bw, bh = x1 - x0 + 1, y1 - y0 + 1
    if min(bw, bh) / max(bw, bh) < cfg.signature_min_extent:
        codes.append("SIGNATURE_LINE")
    if codes:
        return codes, None
    pad = 8
    crop = img[max(0, y0 - pad):y1 + pad + 1, max(0, x0 - pad):x1 + pad + 1]
    return [], crop


def _strokes(raw: Any) -> list[list[list[float]]]:
    """Validate the console's strokes: bounded counts, finite numbers, [x, y, pressure, t_ms] per point."""
    if not isinstance(raw, list) or len(raw) > MAX_STROKES:
        raise EnrollmentError("bad_signature", gettext("the signature data is not valid"), 422)
    out, n = [], 0
    for s in raw:
        if not isinstance(s, list):
            raise EnrollmentError("bad_signature", gettext("the signature data is not valid"), 422)
        stroke = []
        for p in s:
            n += 1
            if (n > MAX_POINTS or not isinstance(p, list) or not 2 <= len(p) <= 4
                    or not all(isinstance(v, int | float) and not isinstance(v, bool) and abs(v) < 1e9 for v in p)):
                raise EnrollmentError("bad_signature", gettext("the signature data is not valid"), 422)
            stroke.append([float(v) for v in p])
        if stroke:
            out.append(stroke)
    return out


class IrisSignatureSteps:
    """The iris and signature methods of `EnrollmentService` (uses its `_current`, `_busy`, `_audit`, `_emit`,
    `_feedback`, `dev`, `cfg`)."""

    # --- irises ---------------------------------------------------------------------------

    def _iris(self: Any, e: Any, eye: str) -> IrisState:
        st = e.irises.get(eye)
        if st is None:
            raise EnrollmentError("unknown_eye", gettext("the {eye} is not captured at this kit",
                                                          eye=repr(eye)), 422)
        return st

    def iris_attempt(self: Any, token: str, eye: str) -> dict[str, Any]:
        """Take one NIR shot of `eye`, assess it, say whether to retake; move on when done."""
        from firmware.quality.iris.assess import hints

        _, e = self._current(token)
        st = self._iris(e, eye)
        if st.done:
            raise EnrollmentError("iris_done", gettext("the {eye} is already captured", eye=eye_label(eye)))
        if self.dev.iris_camera is None or self.dev.iris_assessor is None:
            raise EnrollmentError("no_iris_camera", gettext("no iris camera is available on this kit"), 503)
        with self._busy(e):
            if self.dev.present_eye:
                self.dev.present_eye(e.nik.value)
            try:
                frame = self.dev.iris_camera.capture(eye)
            except Exception as ex:
                raise EnrollmentError("iris_camera_error", gettext("iris camera error: {error}", error=ex),
                                      503) from None
            a = self._assess_iris(frame)
            outcome = st.policy.add(Attempt(a.score, list(a.codes), rejected=a.rejected, data=(frame, a)))
            st.outcome = outcome
            e.previews[f"iris-{eye}.jpg"] = jpeg(frame, 640)
        result = self._feedback(outcome, a.score, list(a.codes), hints(list(a.codes)))
        result.update(eye=eye, position=a.position)
        if outcome.done:
            result["next"] = e.step(self.cfg.enrollment.capture_face)
        self._emit("iris", eye=eye, accepted=result["accepted"], done=outcome.done)
        return result

    def iris_preview(self: Any, token: str, eye: str) -> dict[str, Any]:
        """A live frame of `eye` for the console (stored as preview `iris-live.jpg`) with where the eye is:
        offset from the centre and distance (too_far / ok / too_close), and the hints; nothing is recorded."""
        from firmware.quality.iris.assess import hints

        _, e = self._current(token)
        self._iris(e, eye)
        if self.dev.iris_camera is None or self.dev.iris_assessor is None:
            raise EnrollmentError("no_iris_camera", gettext("no iris camera is available on this kit"), 503)
        if self.dev.present_eye:
            self.dev.present_eye(e.nik.value)
        try:
            frame = self.dev.iris_camera.capture(eye)
        except Exception as ex:
            raise EnrollmentError("iris_camera_error", gettext("iris camera error: {error}", error=ex),
                                  503) from None
        a = self._assess_iris(frame)
        e.previews["iris-live.jpg"] = jpeg(frame, 640, quality=70)
        return {"eye": eye, "preview": "iris-live.jpg", "position": a.position, "codes": list(a.codes),
                "hints": hints(list(a.codes)), "score": round(a.score, 1)}

    def _assess_iris(self: Any, frame: Any) -> Any:
        """The iris check's verdict on `frame`; its helper failing is a 503 for this shot (the next starts anew)."""
        try:
            return self.dev.iris_assessor.assess(frame)
        except QualityError as ex:
            log.error("iris quality check failed error=%s", ex)
            raise EnrollmentError("iris_quality_error", gettext("iris quality check failed: {error}", error=ex),
                                  503) from None

    def iris_exception(self: Any, token: str, eye: str, reason: str) -> None:
        """Record why `eye` is not captured (missing, blind, prosthesis, disease...)."""
        s, e = self._current(token)
        st = self._iris(e, eye)
        reason = reason.strip()
        if not reason:
            raise EnrollmentError("reason_required", gettext("give a reason (missing, blind, prosthesis...)"), 422)
        st.exception = reason
        self._audit("iris_exception", s.operator.id, enrollment=e.id, eye=eye, reason=reason)

    # --- signature ------------------------------------------------------------------------

    def signature(self: Any, token: str, strokes: Any, width: int, height: int) -> dict[str, Any]:
        """Check and keep the resident's signature drawn on a `width` x `height` pad."""

        _, e = self._current(token)
        if e.signature is None:
            raise EnrollmentError("no_signature_step", gettext("this kit does not capture signatures"), 422)
        if any(not f.done for f in e.fingers.values()) or any(not i.done for i in e.irises.values()):
            raise EnrollmentError("fingers_pending", gettext("capture every finger (or record an exception) first"))
        if not (50 <= width <= PAD_MAX and 50 <= height <= PAD_MAX):
            raise EnrollmentError("bad_signature", gettext("the signature data is not valid"), 422)
        parsed = _strokes(strokes)
        sig = e.signature
        sig.attempts += 1
        codes, img = check_signature(parsed, width, height, self.cfg.iris)
        sig.codes = codes
        if img is not None:
            sig.png, sig.strokes, sig.width, sig.height = png(img), parsed, int(img.shape[1]), int(img.shape[0])
            sig.exception = ""
            e.previews["signature.png"] = sig.png
        hint = [gettext(SIGNATURE_CODES[c]) for c in codes]
        self._emit("signature", accepted=img is not None)
        return {"accepted": img is not None, "codes": codes, "hints": hint, "attempt": sig.attempts,
                "strokes": len(parsed), "message": gettext("signature kept") if img is not None
                else "; ".join(hint), "next": e.step(self.cfg.enrollment.capture_face)}

    def signature_exception(self: Any, token: str, reason: str) -> None:
        """The resident cannot sign (e.g. illiterate, injured hand): the reason goes into the record."""
        s, e = self._current(token)
        if e.signature is None:
            raise EnrollmentError("no_signature_step", gettext("this kit does not capture signatures"), 422)
        reason = reason.strip()
        if not reason:
            raise EnrollmentError("reason_required", gettext("give a reason"), 422)
        e.signature.exception = reason
        e.signature.png = b""
        self._audit("signature_exception", s.operator.id, enrollment=e.id, reason=reason)


def describe(e: Any) -> dict[str, Any]:
    """The irises and the signature for the console's review (no images)."""
    irises = []
    for st in e.irises.values():
        best = st.outcome.accepted if st.outcome and st.outcome.done else None
        irises.append({"eye": st.eye, "done": st.done, "exception": st.exception,
                       "attempts": len(st.policy.attempts), "score": round(best.score, 1) if best else None,
                       "forced": bool(st.outcome and st.outcome.forced),
                       "preview": f"iris-{st.eye}.jpg" if f"iris-{st.eye}.jpg" in e.previews else None})
    sig = None
    if e.signature is not None:
        s = e.signature
        sig = {"done": s.done, "exception": s.exception, "attempts": s.attempts, "codes": s.codes,
               "preview": "signature.png" if s.png else None}
    return {"irises": irises, "signature": sig}
