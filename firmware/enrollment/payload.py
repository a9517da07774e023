"""The sealed record's payload: the manifest (NIK, operator, scores, exceptions, duplicate check) and its
images, built from a finished enrollment; and the image encoders the session's previews share."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from firmware import __version__
from firmware.config import Config
from firmware.system.clock import clock_synchronised, iso
from firmware.system.i18n import gettext
from firmware.wire import record_format

#: Manifest schema written by this build. 2 added `ppi` per captured finger (the sensor's resolution, for the
#: ABIS export) and the optional ``position`` (issue #18): the GNSS fix at commit
#: (``{"fix": "3d"|"2d", "lat", "lon", "alt_m", "accuracy_m", "satellites_used", "age_s", "source"}``) or
#: ``{"fix": "none", "reason": "no_fix"|"stale"|"no_receiver"}``, absent when positions are not recorded;
#: 3 added `irises` and `signature` (issue #20; empty list / null where the site does not capture them).
#: Readers take 1 and 2 as well (docs/interchange.md says what an older record lacks).
SCHEMA = "rekam.enrollment/3"
#: Resolution of the kit's sensors by image geometry (height, width): R30x/AS608 image at 500 ppi, R503 at 508.
SENSOR_PPI = {(288, 256): 500, (192, 192): 508}


def build_payload(e: Any, cfg: Config) -> bytes:
    """The encoded payload of enrollment `e` (a `firmware.enrollment.session.Enrollment`) ready to seal."""
    atts: list[record_format.Attachment] = []
    face_doc: dict[str, Any] = {"exception": e.face_exception} if e.face_exception else {}
    if e.face_outcome and e.face_outcome.accepted:
        frame, a = e.face_outcome.accepted.data
        atts.append(record_format.Attachment("face.jpg", "image/jpeg", portrait(frame, a)))
        face_doc = {"attachment": "face.jpg", **e.face_outcome.summary(),
                    "attempt_details": [x.data[1].summary() for x in e.face_outcome.attempts]}
        if cfg.camera.store_full_frame:
            atts.append(record_format.Attachment("face-full.jpg", "image/jpeg", jpeg(frame)))
            face_doc["full_frame"] = "face-full.jpg"
    fingers = []
    for f in e.fingers.values():
        doc: dict[str, Any] = {"finger": f.code}
        if f.exception:
            doc["exception"] = f.exception
        elif f.outcome and f.outcome.accepted:
            img, tpl, q = f.outcome.accepted.data
            atts.append(record_format.Attachment(f"finger-{f.code}.png", "image/png", png(img)))
            doc.update({"image": f"finger-{f.code}.png", "width": int(img.shape[1]), "height": int(img.shape[0]),
                        "ppi": sensor_ppi(img),
                        **f.outcome.summary(),
                        "attempt_details": [summary(x.data[2]) for x in f.outcome.attempts]})
            if tpl:
                atts.append(record_format.Attachment(f"finger-{f.code}.tpl", "application/octet-stream", tpl))
                doc["template"] = f"finger-{f.code}.tpl"
        fingers.append(doc)
    manifest = {
        "schema": SCHEMA, "nik": e.nik.value, "operator_id": e.operator_id,
        "site": cfg.kit.site, "started": e.started, "committed": iso(),
        "clock_synced": clock_synchronised(), "software": f"rekam {__version__}",
        "nik_override": {"reason": e.override_reason, "previous_records": e.previous_records}
        if e.override_reason else None,
        "face": face_doc, "fingers": fingers,
        "duplicate_check": {"matches": [h.__dict__ for h in e.dup_hits or []], "supervisor": e.supervisor},
    }
    # field (issue #18): where it was captured, if the kit reads a receiver and records positions
    position = getattr(e, "position", None)
    if position is not None:
        manifest["position"] = position
    manifest.update(iris_signature_manifest(e, atts))
    return record_format.Payload(manifest, atts).encode()


def sensor_ppi(img: np.ndarray) -> int:
    """The capture resolution of a sensor image, from its geometry (the kit's sensors have fixed geometries;
    `firmware.capture.sensor_image.SENSOR_SHAPES`); 500 for any other image (the corpus is taken as 500 ppi)."""
    return SENSOR_PPI.get((int(img.shape[0]), int(img.shape[1])), 500)


def summary(q: Any) -> dict[str, Any]:
    """A quality result as stored per attempt (score and codes)."""
    if hasattr(q, "summary"):
        return q.summary()
    return {"score": float(getattr(q, "score", 0)), "codes": list(getattr(q, "codes", []))}


def face_hints(a: Any) -> list[str]:
    """What to tell the resident for each face quality code, in the current language (the codes stay in
    the answer's `codes`)."""
    try:
        from firmware.quality.face.assess import CODES

        return [gettext(CODES[c][1]) for c in a.codes if c in CODES]  # in the operator's language
    except Exception:
        return list(a.codes)


def png(img: np.ndarray) -> bytes:
    """Lossless PNG of a fingerprint image."""
    import cv2

    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def jpeg(frame: np.ndarray, max_width: int | None = None, quality: int = 90) -> bytes:
    """JPEG of a camera frame, scaled down to `max_width` if given."""
    import cv2

    if max_width and frame.shape[1] > max_width:
        f = max_width / frame.shape[1]
        frame = cv2.resize(frame, (max_width, int(frame.shape[0] * f)), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def portrait(frame: np.ndarray, a: Any) -> bytes:
    """The ICAO-proportioned portrait JPEG (centred crop when no landmarks were found)."""
    from firmware.quality.face.portrait import PortraitSpec, centre_portrait, encode_jpeg, make_portrait

    spec = PortraitSpec()
    if getattr(a, "landmarks", None) is not None:
        img, _ = make_portrait(frame, a.landmarks, spec)
    else:
        img = centre_portrait(frame, spec)
    return encode_jpeg(img)


# --- iris and signature (schema 3, issue #20) ---------------------------------------------

def iris_signature_manifest(e: Any, atts: list[record_format.Attachment]) -> dict[str, Any]:
    """The manifest's `irises` and `signature` (schema 3), adding their attachments to `atts`. Iris images are
    lossless PNG of the whole 640x480 frame (ISO/IEC 19794-6 K_VGA); the export re-encodes them to lossless
    JPEG 2000 inside the IIR."""
    irises = []
    for st in e.irises.values():
        doc: dict[str, Any] = {"eye": st.eye}
        if st.exception:
            doc["exception"] = st.exception
        elif st.outcome and st.outcome.accepted:
            frame, a = st.outcome.accepted.data
            name = f"iris-{st.eye}.png"
            atts.append(record_format.Attachment(name, "image/png", png(frame)))
            doc.update({"image": name, "width": int(frame.shape[1]), "height": int(frame.shape[0]),
                        **st.outcome.summary(), "position": a.position,
                        "attempt_details": [x.data[1].summary() for x in st.outcome.attempts]})
        irises.append(doc)
    sig: dict[str, Any] | None = None
    if e.signature is not None:
        s = e.signature
        if s.exception:
            sig = {"exception": s.exception, "attempts": s.attempts}
        elif s.png:
            atts.append(record_format.Attachment("signature.png", "image/png", s.png))
            atts.append(record_format.Attachment("signature-strokes.json", "application/json",
                                                 json.dumps({"strokes": s.strokes}, separators=(",", ":")).encode()))
            sig = {"image": "signature.png", "strokes": "signature-strokes.json", "width": s.width,
                   "height": s.height, "stroke_count": len(s.strokes), "attempts": s.attempts}
    return {"irises": irises, "signature": sig}
