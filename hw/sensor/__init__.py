"""Fingerprint sensor: EF01-protocol UART driver (R30x/ZFM/AS608/R503) and its pty simulator.

    from hw.sensor import FingerprintSensor
    with FingerprintSensor("/dev/serial0") as fp:
        img = fp.capture(timeout=10)          # 8-bit numpy array, or None

The simulator (`hw.sensor.simulator.SensorSimulator`) imports numpy/OpenCV; import it explicitly.
"""

from hw.sensor.driver import (
    FingerprintSensor,
    LedColor,
    LedMode,
    MatchResult,
    ProductInfo,
    SearchResult,
    SensorInfo,
    SystemParameters,
    WaitResult,
)
from hw.sensor.protocol import (
    Code,
    CommandError,
    FrameError,
    SensorError,
    SensorTimeout,
    SensorUnavailable,
    UnexpectedReply,
)

__all__ = [
    "Code", "CommandError", "FingerprintSensor", "FrameError", "LedColor", "LedMode", "MatchResult",
    "ProductInfo", "SearchResult", "SensorError", "SensorInfo", "SensorTimeout", "SensorUnavailable",
    "SystemParameters", "UnexpectedReply", "WaitResult",
]
