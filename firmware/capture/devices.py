"""Opening the kit's capture hardware from config: the fingerprint sensor and the camera.

In simulation (`rekamd --sim`) the fingerprint simulator runs in-process on a real
pseudo-terminal and the real driver opens it through pyserial; the camera serves corpus faces.
On a Pi the same code opens /dev/serial0 and the Pi camera. Hardware is opened lazily and
re-opened after a failure, so an unplugged sensor never stops the daemon.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firmware.config import Config

log = logging.getLogger(__name__)

#: Finger code (R1 right thumb .. L5 left little) -> 0-based position, as the simulator numbers fingers.
FINGER_INDEX = {f"{h}{n}": i for i, (h, n) in enumerate((h, n) for h in "RL" for n in "12345")}


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


@dataclass
class Hardware:
    """The opened capture hardware: sensor handle, camera (None if it failed) and, in simulation, the
    simulator with its resident aliases. `closables` lists what the daemon closes on stop."""

    sensor: SensorHandle
    camera: Any = None
    present_finger: Callable[[str, str], None] | None = None
    closables: dict[str, Any] = field(default_factory=dict)
    iris_camera: Any = None  # hw.iris_camera backend (None: irises not captured, or the camera failed)


def open_hardware(cfg: Config, sim: bool, state_dir: Path) -> Hardware:
    """Open the sensor (lazily) and the camera from config; in simulation start the sensor simulator."""
    closables: dict[str, Any] = {}
    corpus = cfg.path(cfg.simulation.corpus_dir)
    port = cfg.sensor.port
    present = None
    if sim:
        from hw.sensor.simulator import SensorSimulator

        simulator = SensorSimulator(cfg.sensor.profile, corpus_dir=corpus, wire_speed=cfg.simulation.sensor_wire_speed,
                                    time_scale=cfg.simulation.sensor_time_scale,
                                    library_path=state_dir / "sim-sensor-library.json",
                                    finger_conditions=dict(cfg.simulation.finger_conditions))
        simulator.start()
        port = simulator.port
        closables["simulator"] = simulator
        aliases: dict[str, str] = {}
        closables["sim_aliases"] = aliases  # NIK -> the resident whose fingers are really presented (tests, demos)

        def present(nik: str, finger: str) -> None:
            # quality None: this placement's condition (dry, wet, partial, moved or good) is drawn from
            # [simulation] finger_conditions, seeded, so retakes happen as in the field and runs repeat.
            simulator.present_finger(aliases.get(nik, nik), FINGER_INDEX[finger], quality=None)
        log.info("simulated fingerprint sensor profile=%s port=%s", cfg.sensor.profile, port)
    sensor = SensorHandle(cfg, port)
    closables["sensor"] = sensor
    camera = None
    try:
        from hw.camera import open_camera

        cam_cfg = dict(cfg.camera)
        if sim:
            cam_cfg["backend"] = "sim"
        camera = open_camera(cam_cfg, sim_folder=corpus / "faces")
        closables["camera"] = camera
    except Exception as e:
        log.error("camera unavailable error=%s; enrollments need a face exception until it is fixed", e)
    iris = open_iris(cfg, sim)
    if iris is not None:
        closables["iris_camera"] = iris
    return Hardware(sensor=sensor, camera=camera, present_finger=present, closables=closables, iris_camera=iris)


def open_iris(cfg: Config, sim: bool) -> Any:
    """The NIR iris camera of `[iris]` when irises are captured (the synthetic eyes in simulation); None when
    they are not, or when it fails (enrollments then need an iris exception per eye until it is fixed)."""
    if not cfg.iris.capture_iris:
        return None
    try:
        from hw.iris_camera import open_iris_camera

        settings = dict(cfg.iris)
        if sim:
            settings["camera"] = "sim"
        return open_iris_camera(settings)
    except Exception as e:
        log.error("iris camera unavailable error=%s; enrollments need an iris exception until it is fixed", e)
        return None
