"""Opening the kit's capture hardware from config: the sensor, the camera, the quality checks.

In simulation (`rekamd --sim`) the fingerprint simulator runs in-process on a real
pseudo-terminal and the real driver opens it through pyserial; the camera serves corpus faces.
On a Pi the same code opens /dev/serial0 and the Pi camera. Hardware is opened lazily and
re-opened after a failure, so an unplugged sensor never stops the daemon.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from firmware.config import Config
from firmware.enrollment import Devices

log = logging.getLogger(__name__)


class SensorHandle:
    """Opens the fingerprint sensor on first use and hands out the open driver."""

    def __init__(self, cfg: Config, port: str) -> None:
        self.cfg = cfg
        self.port = port
        self._sensor: Any = None
        self._lock = threading.Lock()
        self.error = ""

    def __call__(self) -> Any:
        with self._lock:
            if self._sensor is None:
                from hw.sensor.driver import FingerprintSensor

                drv = FingerprintSensor.from_config(self.cfg.sensor, port=self.port)
                try:
                    params = drv.open()
                except Exception as e:
                    self.error = str(e)
                    drv.close()
                    raise
                self.error = ""
                log.info("fingerprint sensor ready port=%s capacity=%s baud=%s", self.port,
                         getattr(params, "capacity", "?"), getattr(drv, "baud", "?"))
                self._sensor = drv
            return self._sensor

    @property
    def capacity(self) -> int:
        try:
            return int(self().params.capacity)
        except Exception:
            return 0

    def status(self) -> dict[str, Any]:
        return {"port": self.port, "open": self._sensor is not None, "error": self.error}

    def close(self) -> None:
        with self._lock:
            if self._sensor is not None:
                self._sensor.close()
                self._sensor = None


def finger_quality_checker(cfg: Config) -> Any:
    """`image -> assessment` (score, codes, rejected, summary()) from firmware.fpquality."""
    from firmware.fpquality import quality

    return quality.checker_from_config(cfg.quality_finger)


def open_devices(cfg: Config, sim: bool, state_dir: Path) -> tuple[Devices, dict[str, Any]]:
    """Build the `Devices` for enrollment and return them with the objects to close on stop."""
    extra: dict[str, Any] = {}
    corpus = cfg.path(cfg.simulation.corpus_dir)
    port = cfg.sensor.port
    present = None
    if sim:
        from hw.sensor.simulator import SensorSimulator

        simulator = SensorSimulator(cfg.sensor.profile, corpus_dir=corpus, wire_speed=cfg.simulation.sensor_wire_speed,
                                    library_path=state_dir / "sim-sensor-library.json")
        simulator.start()
        port = simulator.port
        extra["simulator"] = simulator
        aliases: dict[str, str] = {}
        extra["sim_aliases"] = aliases  # NIK -> the resident whose fingers are really presented (tests, demos)

        def present(nik: str, finger: str) -> None:
            from firmware.enrollment import FINGER_INDEX

            simulator.present_finger(aliases.get(nik, nik), FINGER_INDEX[finger])
        present = present
        log.info("simulated fingerprint sensor profile=%s port=%s", cfg.sensor.profile, port)
    sensor = SensorHandle(cfg, port)
    extra["sensor"] = sensor
    camera = None
    try:
        from hw.camera import open_camera

        cam_cfg = dict(cfg.camera)
        if sim:
            cam_cfg["backend"] = "sim"
        camera = open_camera(cam_cfg, sim_folder=corpus / "faces")
        extra["camera"] = camera
    except Exception as e:
        log.error("camera unavailable error=%s; enrollments need a face exception until it is fixed", e)
    face = None
    try:
        from firmware.facequality.assess import FaceAssessor, FaceThresholds

        face = FaceAssessor(FaceThresholds.from_mapping(cfg.quality_face))
    except Exception as e:
        log.error("face quality models unavailable error=%s", e)
    fq = None
    try:
        fq = finger_quality_checker(cfg)
    except Exception as e:
        log.error("fingerprint quality model unavailable error=%s", e)
    qf = cfg.raw.get("quality_finger", {})
    qface = cfg.quality_face
    dev = Devices(sensor=sensor, camera=camera, finger_quality=fq, face_assessor=face,
                  finger_threshold=float(qf.get("threshold", 40)), finger_attempts=int(qf.get("max_attempts", 3)),
                  finger_thresholds={k: float(v) for k, v in (qf.get("finger_thresholds") or {}).items()},
                  face_threshold=float(qface.get("accept_score", 50)), face_attempts=int(qface.get("max_attempts", 3)),
                  present_finger=present)
    return dev, extra
