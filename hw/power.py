"""The kit's power: battery level, voltage, charging state and mains loss, behind one interface.

Sources: a MAX17048 fuel gauge (I2C 0x36; state of charge from the chip's ModelGauge), an INA219 current/voltage
monitor (I2C 0x40..0x4F, as on UPS HATs; level estimated from the pack voltage between `empty_v` and `full_v`),
a power-loss GPIO pin (a UPS HAT's "power lost" output, gpiozero `DigitalInputDevice`), and a simulator (start
level, drain per minute, power loss at T). `PowerMonitor.read()` combines a gauge and the pin into one
`PowerReading`. What to do about a low battery is decided above hw (firmware/enrollment/power.py).

Register maps (datasheets): MAX17048 VCELL 0x02 (78.125 uV/LSB), SOC 0x04 (1/256 %/LSB), MODE 0x06,
VERSION 0x08 (0x001_), CRATE 0x16 (signed, 0.208 %/h per LSB; > 0 is charging). INA219 configuration 0x00,
shunt voltage 0x01 (signed, 10 uV/LSB), bus voltage 0x02 (bits 15..3, 4 mV/LSB; bit 1 CNVR, bit 0 OVF),
current 0x04 (signed, current_lsb per LSB once calibrated), calibration 0x05 (0.04096 / (current_lsb * R_shunt)).
Both chips send the most significant byte first; SMBus word reads are little-endian, so words are swapped.
smbus2 is imported when a gauge is opened; tests pass any object with ``read_word_data``/``write_word_data``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from firmware.errors import HardwareError

log = logging.getLogger(__name__)

MAX17048_ADDR = 0x36
MAX17048_VCELL, MAX17048_SOC, MAX17048_MODE, MAX17048_VERSION, MAX17048_CRATE = 0x02, 0x04, 0x06, 0x08, 0x16
INA219_ADDR = 0x40
INA219_CONFIG, INA219_SHUNT, INA219_BUS, INA219_POWER, INA219_CURRENT, INA219_CALIBRATION = 0, 1, 2, 3, 4, 5
# 32 V bus range, /8 gain (320 mV shunt), 12-bit ADCs, shunt and bus continuous (the chip's reset value 0x399F)
INA219_CONFIG_DEFAULT = 0x399F


@dataclass(frozen=True)
class PowerReading:
    """One reading. `percent` None: unknown (no gauge). `power_lost`: the mains/USB supply is gone (pin or
    simulation); `charging`: the battery is being charged (None: cannot tell)."""

    percent: float | None = None
    voltage_v: float | None = None
    current_ma: float | None = None
    charging: bool | None = None
    power_lost: bool = False
    source: str = ""
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, nd in (("percent", 1), ("voltage_v", 3), ("current_ma", 1)):
            if d[k] is not None:
                d[k] = round(d[k], nd)
        return d


class PowerSource(Protocol):
    """What the power monitor needs of a gauge."""

    def read(self) -> PowerReading: ...
    def close(self) -> None: ...


class WordBus(Protocol):
    """The part of `smbus2.SMBus` the gauges use."""

    def read_word_data(self, i2c_addr: int, register: int) -> int: ...
    def write_word_data(self, i2c_addr: int, register: int, value: int) -> None: ...


def swap16(w: int) -> int:
    """SMBus words are little-endian on the wire; these chips send the high byte first."""
    return ((w & 0xFF) << 8) | ((w >> 8) & 0xFF)


def signed16(v: int) -> int:
    return v - 0x10000 if v & 0x8000 else v


# --- register decoding (pure: tested against the datasheets' examples) ----------------------------------------


def max17048_voltage(vcell: int) -> float:
    """VCELL register (big-endian value) -> cell volts: 78.125 uV per LSB."""
    return vcell * 78.125e-6


def max17048_percent(soc: int) -> float:
    """SOC register -> percent: the high byte is whole %, the low byte 1/256 %."""
    return soc / 256.0


def max17048_crate(crate: int) -> float:
    """CRATE register -> %/hour (signed, 0.208 %/h per LSB; positive while charging)."""
    return signed16(crate) * 0.208


def ina219_bus_voltage(reg: int) -> float:
    """Bus voltage register -> volts (bits 15..3, 4 mV per LSB)."""
    return (reg >> 3) * 0.004


def ina219_calibration(current_lsb_a: float, shunt_ohm: float) -> int:
    """Calibration register value for a current LSB (A) and shunt (ohm): trunc(0.04096 / (lsb * R))."""
    cal = int(0.04096 / (current_lsb_a * shunt_ohm))
    if not 0 < cal <= 0xFFFE:
        raise ValueError(f"INA219 calibration {cal} out of range (current_lsb={current_lsb_a}, shunt={shunt_ohm})")
    return cal & 0xFFFE  # bit 0 is read-only


def ina219_current_ma(reg: int, current_lsb_a: float) -> float:
    """Current register (signed) -> mA."""
    return signed16(reg) * current_lsb_a * 1000.0


def level_from_voltage(v: float, empty_v: float, full_v: float) -> float:
    """A rough state of charge from the pack voltage (linear between empty and full; a gauge chip does better)."""
    return max(0.0, min(100.0, (v - empty_v) / (full_v - empty_v) * 100.0))


def _open_bus(bus: int) -> Any:
    try:
        from smbus2 import SMBus
    except ImportError as e:
        raise HardwareError(f"I2C gauges need smbus2 ({e})") from e
    try:
        return SMBus(bus)
    except OSError as e:
        raise HardwareError(f"cannot open /dev/i2c-{bus}: {e} (enable I2C: dtparam=i2c_arm=on)") from e


class Max17048:
    """MAX17048/MAX17049 fuel gauge: percent and cell voltage from the chip, charging from CRATE."""

    def __init__(self, bus: int | WordBus = 1, address: int = MAX17048_ADDR) -> None:
        self.bus = _open_bus(bus) if isinstance(bus, int) else bus
        self.address = address
        version = self._word(MAX17048_VERSION)
        if version & 0xFFF0 != 0x0010:  # 0x001_ per the datasheet: anything else is not this chip
            raise HardwareError(f"no MAX17048 at 0x{address:02x} (VERSION 0x{version:04x})")
        self.version = version

    def _word(self, reg: int) -> int:
        return swap16(self.bus.read_word_data(self.address, reg))

    def read(self) -> PowerReading:
        try:
            v = max17048_voltage(self._word(MAX17048_VCELL))
            pct = min(100.0, max17048_percent(self._word(MAX17048_SOC)))
            rate = max17048_crate(self._word(MAX17048_CRATE))
        except OSError as e:
            return PowerReading(source="max17048", error=f"i2c read failed: {e}")
        return PowerReading(pct, v, None, rate > 0.0, source="max17048")

    def close(self) -> None:
        close = getattr(self.bus, "close", None)
        if callable(close):
            close()


class Ina219:
    """INA219 on a UPS HAT: pack voltage and current; level from the voltage curve; charging when current flows
    into the pack (`charge_positive`: the sign of the current register when charging, wiring dependent)."""

    def __init__(self, bus: int | WordBus = 1, address: int = INA219_ADDR, shunt_ohm: float = 0.1,
                 current_lsb_a: float = 0.0001, empty_v: float = 3.0, full_v: float = 4.2,
                 charge_positive: bool = True) -> None:
        if not 0x40 <= address <= 0x4F:
            raise HardwareError(f"INA219 address must be 0x40..0x4f, got 0x{address:02x}")
        if not full_v > empty_v > 0:
            raise HardwareError(f"INA219 voltage curve needs full_v > empty_v > 0 (got {empty_v}, {full_v})")
        self.bus = _open_bus(bus) if isinstance(bus, int) else bus
        self.address = address
        self.current_lsb_a = current_lsb_a
        self.empty_v, self.full_v, self.charge_positive = empty_v, full_v, charge_positive
        self.calibration = ina219_calibration(current_lsb_a, shunt_ohm)
        try:
            self._write(INA219_CONFIG, INA219_CONFIG_DEFAULT)
            self._write(INA219_CALIBRATION, self.calibration)
        except OSError as e:
            raise HardwareError(f"no INA219 at 0x{address:02x}: {e}") from e

    def _write(self, reg: int, value: int) -> None:
        self.bus.write_word_data(self.address, reg, swap16(value))

    def _word(self, reg: int) -> int:
        return swap16(self.bus.read_word_data(self.address, reg))

    def read(self) -> PowerReading:
        try:
            # The calibration is lost on a brown-out reset: write it again before every current read.
            self._write(INA219_CALIBRATION, self.calibration)
            v = ina219_bus_voltage(self._word(INA219_BUS))
            ma = ina219_current_ma(self._word(INA219_CURRENT), self.current_lsb_a)
        except OSError as e:
            return PowerReading(source="ina219", error=f"i2c read failed: {e}")
        charging = (ma > 5.0) if self.charge_positive else (ma < -5.0)  # a few mA of noise is neither
        return PowerReading(level_from_voltage(v, self.empty_v, self.full_v), v, ma, charging, source="ina219")

    def close(self) -> None:
        close = getattr(self.bus, "close", None)
        if callable(close):
            close()


class PowerLossPin:
    """A UPS HAT's power-lost output on a GPIO pin (BCM number); `active_high`: high means the supply is gone."""

    def __init__(self, pin: int, active_high: bool = True, pin_factory: Any = None) -> None:
        try:
            from gpiozero import DigitalInputDevice
        except ImportError as e:
            raise HardwareError(f"power-loss pin needs gpiozero ({e})") from e
        kw = {"pin_factory": pin_factory} if pin_factory is not None else {}
        try:
            # No pull resistor: the HAT drives the line. active_state says which level means "lost".
            self.dev = DigitalInputDevice(pin, pull_up=None, active_state=active_high, **kw)
        except Exception as e:  # gpiozero: BadPinFactory, GPIOPinInUse...
            raise HardwareError(f"power-loss pin {pin}: cannot claim it: {type(e).__name__}: {e}") from e
        self.pin = pin

    @property
    def lost(self) -> bool:
        return bool(self.dev.is_active)

    def close(self) -> None:
        self.dev.close()


class SimulatedPower:
    """A battery for `rekamd --sim`: `start_percent`, falling `drain_per_min` % a minute from `start()`; the
    supply lost from `loss_at_s` seconds on (None: never); a Li-ion cell voltage that follows the level."""

    def __init__(self, start_percent: float = 100.0, drain_per_min: float = 0.0, loss_at_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.start_percent, self.drain_per_min, self.loss_at_s = start_percent, drain_per_min, loss_at_s
        self.clock = clock
        self.t0 = clock()

    def start(self) -> None:
        """Start the simulated day now (the daemon calls it once the kit is up)."""
        self.t0 = self.clock()

    def read(self) -> PowerReading:
        t = self.clock() - self.t0
        pct = max(0.0, min(100.0, self.start_percent - self.drain_per_min * t / 60.0))
        lost = self.loss_at_s is not None and t >= self.loss_at_s
        return PowerReading(pct, 3.0 + 1.2 * pct / 100.0, -350.0 if self.drain_per_min > 0 else 0.0,
                            self.drain_per_min < 0, lost, source="sim")

    def close(self) -> None:
        pass


class Unavailable:
    """A configured gauge that could not be opened: every reading says why (the kit runs on, blind to its level)."""

    def __init__(self, source: str, error: str) -> None:
        self.source, self.error = source, error

    def read(self) -> PowerReading:
        return PowerReading(source=self.source, error=self.error)

    def close(self) -> None:
        pass


class PowerMonitor:
    """One gauge (or none) and one power-loss pin (or none) read as one `PowerReading`; thread safe."""

    def __init__(self, gauge: PowerSource | None = None, loss_pin: PowerLossPin | None = None) -> None:
        self.gauge, self.loss_pin = gauge, loss_pin
        self._lock = threading.Lock()
        self.last = PowerReading(source="none")

    def read(self) -> PowerReading:
        with self._lock:
            r = self.gauge.read() if self.gauge is not None else PowerReading(source="none")
            if self.loss_pin is not None:
                try:
                    lost = self.loss_pin.lost
                except Exception as e:  # a pin read must not stop the monitor
                    lost, r = r.power_lost, PowerReading(**{**asdict(r), "error": f"power-loss pin: {e}"})
                if lost != r.power_lost:
                    r = PowerReading(**{**asdict(r), "power_lost": lost or r.power_lost})
            self.last = r
            return r

    def start(self) -> None:
        start = getattr(self.gauge, "start", None)
        if callable(start):
            start()

    def close(self) -> None:
        for part in (self.loss_pin, self.gauge):
            if part is not None:
                try:
                    part.close()
                except Exception as e:
                    log.warning("closing power part failed part=%s error=%s", part, e)
