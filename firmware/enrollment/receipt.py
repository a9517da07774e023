"""The resident's receipt: record id, date, what was captured, and a QR code of record id + hash.

The resident keeps it as proof of enrollment until the card is printed; the data center can
check the QR against its archive. It carries no personal data. PNG for the screen, PDF (A6)
for a printer.
"""

from __future__ import annotations

import io
import json
from typing import Any

import segno

from firmware.system.i18n import N_, gettext

KIT_TITLE = "Bukti Perekaman KTP-el / Enrollment receipt"
# Each label in Bahasa Indonesia first, then English: the resident reads Indonesian, a checker may read English.
LABELS = {"record": N_("Record"), "date": N_("Date"), "kit": N_("Kit"), "site": N_("Site"),
          "unsynced": N_("kit clock not synchronised"), "face": N_("Face"), "iris": N_("Iris"),
          "fingers": N_("Fingers"), "signature": N_("Signature"), "captured": N_("captured"),
          "exception": N_("exception")}
#: The modalities a receipt lists, in the order of the enrollment.
MODALITIES = ("face", "iris", "fingers", "signature")


def _both(key: str) -> str:
    """'Indonesian / English' for one label (the same text once if there is no translation)."""
    msgid = LABELS[key]
    ind = gettext(msgid, lang="id")
    return ind if ind == msgid else f"{ind} / {msgid}"


def qr_payload(record_id: str, sha256: str) -> str:
    """The QR's content: compact JSON with the record id and its SHA-256."""
    return json.dumps({"r": record_id, "h": sha256}, separators=(",", ":"))


def _qr(record_id: str, sha256: str) -> segno.QRCode:
    return segno.make(qr_payload(record_id, sha256), error="m", micro=False)


def lines(info: dict[str, Any]) -> list[str]:
    """The receipt's text lines, Bahasa Indonesia first (ASCII only: the PDF's Helvetica and the PNG's font)."""
    return [
        KIT_TITLE,
        f"{_both('record')}: {info['record_id']}",
        f"{_both('date')}: {info['created']}" + ("" if info.get("clock_synced", True) else f" ({_both('unsynced')})"),
        f"{_both('kit')}: {info['kit_id']}" + (f"  {_both('site')}: {info['site']}" if info.get("site") else ""),
        *_biometric_lines(info.get("biometrics") or {}),
        f"SHA-256: {info['sha256'][:32]}",
        f"         {info['sha256'][32:]}",
    ]


def _biometric_lines(bio: dict[str, Any]) -> list[str]:
    """One line per modality the kit captured: how many were taken and how many are exceptions (the resident
    sees what was recorded of them, e.g. a missing finger noted instead of forgotten)."""
    out = []
    for m in MODALITIES:
        n = bio.get(m)
        if not isinstance(n, dict):
            continue
        text = f"{_both(m)}: {int(n.get('captured', 0))} {_both('captured')}"
        if n.get("exception"):
            text += f", {int(n['exception'])} {_both('exception')}"
        out.append(text)
    return out


def png(info: dict[str, Any], scale: int = 6) -> bytes:
    """Receipt as a PNG: the QR code above the text lines."""
    import cv2
    import numpy as np

    qr = np.array(list(_qr(info["record_id"], info["sha256"]).matrix_iter(scale=scale, border=4)), dtype=np.uint8)
    qr = np.where(qr > 0, 0, 255).astype(np.uint8)
    text = lines(info)
    width = max(qr.shape[1], 640)
    canvas = np.full((qr.shape[0] + 28 * len(text) + 20, width), 255, np.uint8)
    canvas[: qr.shape[0], (width - qr.shape[1]) // 2: (width - qr.shape[1]) // 2 + qr.shape[1]] = qr
    y = qr.shape[0] + 20
    for t in text:
        cv2.putText(canvas, t, (12, y), cv2.FONT_HERSHEY_SIMPLEX, 0.5, 0, 1, cv2.LINE_AA)
        y += 28
    ok, buf = cv2.imencode(".png", canvas)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def pdf(info: dict[str, Any]) -> bytes:
    """Receipt as a one-page A6 PDF (the QR drawn as vector squares, Helvetica text)."""
    w, h = 298, 420  # A6 in points
    qr = _qr(info["record_id"], info["sha256"])
    rows = list(qr.matrix_iter(scale=1, border=0))
    n = len(rows)
    module = 160 / n
    x0, y0 = (w - 160) / 2, h - 40 - 160
    ops = ["0 g"]
    for r, row in enumerate(rows):
        for c, v in enumerate(row):
            if v:
                ops.append(f"{x0 + c * module:.2f} {y0 + (n - 1 - r) * module:.2f} {module:.2f} {module:.2f} re f")
    y = y0 - 24
    for i, t in enumerate(lines(info)):
        size = 9 if i == 0 else 7
        safe = t.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        ops.append(f"BT /F1 {size} Tf 16 {y:.1f} Td ({safe}) Tj ET")
        y -= 14
    content = "\n".join(ops).encode("latin-1", "replace")
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {w} {h}] /Contents 4 0 R "
        "/Resources << /Font << /F1 5 0 R >> >> >>".encode(),
        b"<< /Length " + str(len(content)).encode() + b" >>\nstream\n" + content + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for i, o in enumerate(objs, 1):
        offsets.append(out.tell())
        out.write(f"{i} 0 obj\n".encode() + o + b"\nendobj\n")
    xref = out.tell()
    out.write(f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode())
    for off in offsets:
        out.write(f"{off:010d} 00000 n \n".encode())
    out.write(f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode())
    return out.getvalue()
