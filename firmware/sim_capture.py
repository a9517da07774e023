"""A simple simulated capture source: enrollment payloads built from the test corpus.

Stands in for the real enrollment workflow (sensor + camera + quality) behind the same
interface (`capture() -> Payload`), so the store, relay and benchmarks can be exercised from
the command line (`rekam sim commit N`) before or without the real capture path.
"""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path

from firmware import record_format
from firmware.clock import iso

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
        self.fingers = sorted((corpus_dir / "fingerprints").glob("*.p[ngm]*")) if corpus_dir else []
        self.faces = sorted((corpus_dir / "faces").glob("*.jpg")) if corpus_dir else []

    def capture(self, operator_id: str = "sim-operator") -> record_format.Payload:
        """One enrollment: a NIK, a face photo and ten fingerprints (corpus files, or random bytes)."""
        rng = self.rng
        atts = []
        face = rng.choice(self.faces).read_bytes() if self.faces else rng.randbytes(60_000)
        atts.append(record_format.Attachment("face.jpg", "image/jpeg", face))
        for f in FINGERS:
            img = rng.choice(self.fingers).read_bytes() if self.fingers else rng.randbytes(20_000)
            atts.append(record_format.Attachment(f"finger-{f}.img", "application/octet-stream", img))
        size = sum(len(a.data) for a in atts)
        if self.pad_to > size:
            atts.append(record_format.Attachment("padding.bin", "application/octet-stream",
                                                 rng.randbytes(self.pad_to - size)))
        manifest = {
            "schema": "rekam.enrollment/1", "simulated": True, "operator_id": operator_id,
            "nik": random_nik(rng), "captured_at": iso(),
            "face": {"attachment": "face.jpg", "quality": {"score": round(rng.uniform(60, 95), 1)}},
            "fingers": [{"finger": f, "attachment": f"finger-{f}.img",
                         "quality": {"score": round(rng.uniform(35, 90), 1)}} for f in FINGERS],
        }
        return record_format.Payload(manifest, atts)
