"""A simple simulated capture source: enrollment payloads built from the test corpus.

Stands in for the real enrollment workflow (sensor + camera + quality) behind the same
interface (`capture() -> Payload`), so the store, relay and benchmarks can be exercised from
the command line (`rekam sim commit N`) before or without the real capture path.
"""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path

from firmware.system.clock import iso
from firmware.wire import record_format

FINGERS = ["R1", "R2", "R3", "R4", "R5", "L1", "L2", "L3", "L4", "L5"]  # thumb..little, right then left


def random_nik(rng: random.Random) -> str:
    """A NIK with a valid structure (Jawa Barat / Kota Bandung), random birth date and serial."""
    born = dt.date(1950, 1, 1) + dt.timedelta(days=rng.randrange(0, 365 * 55))
    day = born.day + (40 if rng.random() < 0.5 else 0)
    return f"3273{rng.randint(1, 30):02d}{day:02d}{born.month:02d}{born.year % 100:02d}{rng.randint(1, 9999):04d}"


class SimulatedCapture:
    """Builds enrollment payloads from corpus images (no sensor, no camera)."""

    def __init__(self, corpus_dir: Path | None, seed: int | None = None, pad_to: int = 0) -> None:
        self.rng = random.Random(seed)
        self.pad_to = pad_to
        self.fingers = sorted(p for p in (corpus_dir / "fingerprints").glob("*")
                              if p.suffix in (".png", ".pgm", ".jpg")) if corpus_dir else []
        self.faces = sorted((corpus_dir / "faces").glob("*.jpg")) if corpus_dir else []

    def _face(self) -> bytes:
        # A portrait-sized JPEG (413x531, as the real capture stores), so records have a realistic size.
        import cv2

        img = cv2.imread(str(self.rng.choice(self.faces)))
        h, w = img.shape[:2]
        side = min(w, int(h * 413 / 531))
        x0 = (w - side) // 2
        crop = img[: int(side * 531 / 413), x0: x0 + side]
        ok, buf = cv2.imencode(".jpg", cv2.resize(crop, (413, 531), interpolation=cv2.INTER_AREA),
                               [cv2.IMWRITE_JPEG_QUALITY, 90])
        return buf.tobytes()

    def _finger(self) -> bytes:
        # The sensor's format: 256x288, 16 gray levels, PNG (as the real capture stores).
        import cv2

        from firmware.capture.sensor_image import load_sensor_file

        ok, buf = cv2.imencode(".png", load_sensor_file(self.rng.choice(self.fingers)))
        return buf.tobytes()

    def capture(self, operator_id: str = "sim-operator") -> record_format.Payload:
        """One enrollment: a NIK, a face portrait and ten fingerprints (from the corpus, or random bytes)."""
        rng = self.rng
        atts = []
        face = self._face() if self.faces else rng.randbytes(60_000)
        atts.append(record_format.Attachment("face.jpg", "image/jpeg", face))
        for f in FINGERS:
            img = self._finger() if self.fingers else rng.randbytes(40_000)
            atts.append(record_format.Attachment(f"finger-{f}.png", "image/png", img))
        size = sum(len(a.data) for a in atts)
        if self.pad_to > size:
            atts.append(record_format.Attachment("padding.bin", "application/octet-stream",
                                                 rng.randbytes(self.pad_to - size)))
        manifest = {
            "schema": "rekam.enrollment/1", "simulated": True, "operator_id": operator_id,
            "nik": random_nik(rng), "captured_at": iso(),
            "face": {"attachment": "face.jpg", "quality": {"score": round(rng.uniform(60, 95), 1)}},
            "fingers": [{"finger": f, "attachment": f"finger-{f}.png",
                         "quality": {"score": round(rng.uniform(35, 90), 1)}} for f in FINGERS],
        }
        return record_format.Payload(manifest, atts)
