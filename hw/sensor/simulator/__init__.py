"""A simulated EF01 fingerprint sensor on a pseudo-terminal, for tests, demos and `--sim`.

    from hw.sensor.simulator import SensorSimulator
    with SensorSimulator("r307", corpus_dir=...) as sim:
        fp = FingerprintSensor(sim.port)

A package, not one module, because it has four jobs: `device` (the pty, pacing, wire-time
emulation, baud garbling, control API), `commands` (what the module does with each instruction),
`templates` (template/feature format, matcher, flash persistence) and `faults` (fault knobs);
`state` holds the records device and commands share. The public names are re-exported here, so
``from hw.sensor.simulator import ...`` keeps working.
The simulator imports numpy/OpenCV; `hw.sensor` does not import it.
"""

from hw.sensor.simulator.device import SensorSimulator
from hw.sensor.simulator.faults import Faults
from hw.sensor.simulator.state import Finger, SimStats
from hw.sensor.simulator.templates import (
    SECURITY_THRESHOLDS,
    TEMPLATE_MAGIC,
    decode_template,
    encode_template,
    image_quality,
    match_score,
)

__all__ = [
    "SECURITY_THRESHOLDS", "TEMPLATE_MAGIC", "Faults", "Finger", "SensorSimulator", "SimStats",
    "decode_template", "encode_template", "image_quality", "match_score",
]
