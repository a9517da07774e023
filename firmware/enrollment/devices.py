"""The enrollment's devices: the opened capture hardware joined with the quality checks from config."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from firmware.capture.devices import open_hardware
from firmware.config import Config
from firmware.enrollment.session import Devices

log = logging.getLogger(__name__)


def finger_quality_checker(cfg: Config) -> Any:
    """`image -> assessment` (score, codes, rejected, summary()) from firmware.quality.finger."""
    from firmware.quality.finger import quality

    return quality.checker_from_config(cfg.quality_finger)


def open_devices(cfg: Config, sim: bool, state_dir: Path) -> tuple[Devices, dict[str, Any]]:
    """Build the `Devices` for enrollment and return them with the objects to close on stop."""
    hw = open_hardware(cfg, sim, state_dir)
    face = None
    try:
        from firmware.quality.face.assess import FaceAssessor, FaceThresholds

        face = FaceAssessor(FaceThresholds.from_mapping(cfg.quality_face))
    except Exception as e:
        log.error("face quality models unavailable error=%s", e)
    fq = None
    try:
        fq = finger_quality_checker(cfg)
    except Exception as e:
        log.error("fingerprint quality model unavailable error=%s", e)
    qf = cfg.quality_finger
    qface = cfg.quality_face
    dev = Devices(sensor=hw.sensor, camera=hw.camera, finger_quality=fq, face_assessor=face,
                  finger_threshold=float(qf.threshold), finger_attempts=int(qf.max_attempts),
                  finger_thresholds={k: float(v) for k, v in (qf.finger_thresholds or {}).items()},
                  face_threshold=float(qface.accept_score), face_attempts=int(qface.max_attempts),
                  present_finger=hw.present_finger)
    return dev, hw.closables
