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


class QualityReadiness:
    """Which on-device quality checks loaded, for the daemon's status (and so the update self-test).

    Each check is ``ready``, ``unavailable`` (it failed to load: the error says why; the capture it guards is
    refused, so an update that breaks a model is rolled back) or ``unused`` (no device it would judge).
    """

    def __init__(self) -> None:
        self.checks: dict[str, dict[str, str]] = {}

    def note(self, name: str, loaded: Any, error: str, used: bool = True) -> None:
        """Record check `name`: `loaded` (the object, or None) and the load `error`; `used` = a device needs it."""
        if not used:
            self.checks[name] = {"state": "unused"}
        elif loaded is not None:
            self.checks[name] = {"state": "ready"}
        else:
            self.checks[name] = {"state": "unavailable", "error": error[:300]}

    def status(self) -> dict[str, Any]:
        return {name: dict(c) for name, c in self.checks.items()}


def open_devices(cfg: Config, sim: bool, state_dir: Path) -> tuple[Devices, dict[str, Any]]:
    """Build the `Devices` for enrollment and return them with the objects to close on stop; the closables
    hold the `QualityReadiness` under ``quality`` and the iris check (its helper process) under ``iris_quality``."""
    hw = open_hardware(cfg, sim, state_dir)
    readiness = QualityReadiness()
    face, err = None, ""
    try:
        from firmware.quality.face.assess import FaceAssessor, FaceThresholds

        face = FaceAssessor(FaceThresholds.from_mapping(cfg.quality_face))
    except Exception as e:
        err = f"{type(e).__name__}: {e}"
        log.error("face quality models unavailable error=%s", e)
    readiness.note("face", face, err, used=hw.camera is not None)
    fq, err = None, ""
    try:
        fq = finger_quality_checker(cfg)
    except Exception as e:
        err = f"{type(e).__name__}: {e}"
        log.error("fingerprint quality model unavailable error=%s", e)
    readiness.note("finger", fq, err, used=hw.sensor is not None)
    qf = cfg.quality_finger
    qface = cfg.quality_face
    # typed by the config models: no casts or fallbacks needed
    iris_assessor, err = None, ""
    if hw.iris_camera is not None:
        try:
            from firmware.quality.iris.assess import IrisAssessor

            iris_assessor = IrisAssessor(cfg.iris)
        except Exception as e:  # iris-iqm is the optional extra `iris`
            err = f"{type(e).__name__}: {e}"
            log.error("iris quality unavailable error=%s; install rekam[iris]", e)
    readiness.note("iris", iris_assessor, err, used=hw.iris_camera is not None)
    present_eye = getattr(hw.iris_camera, "present", None) if sim else None
    aliases = hw.closables.get("sim_aliases", {})
    dev = Devices(sensor=hw.sensor, camera=hw.camera, finger_quality=fq, face_assessor=face,
                  finger_threshold=qf.threshold, finger_attempts=qf.max_attempts,
                  finger_thresholds=dict(qf.finger_thresholds),
                  face_threshold=qface.accept_score, face_attempts=qface.max_attempts,
                  present_finger=hw.present_finger, iris_camera=hw.iris_camera, iris_assessor=iris_assessor,
                  iris_threshold=cfg.iris.accept_score, iris_attempts=cfg.iris.max_attempts,
                  present_eye=(lambda nik: present_eye(aliases.get(nik, nik))) if present_eye else None)
    extra = {"iris_quality": iris_assessor} if iris_assessor is not None else {}  # its helper process
    return dev, {**hw.closables, "quality": readiness, **extra}
