"""The power monitor's drivers (hw/power.py). This kernel (a Firecracker VM, no /lib/modules) has no `i2c-stub`
module and no /dev/i2c-*, so the real bus is tried only for its failure; the MAX17048 and INA219 register
decoding is checked against the datasheets' figures, through a register file that answers SMBus word reads
the way the bus does (little-endian words of chips that send the high byte first). The power-loss pin runs on
gpiozero's MockFactory, as the panel's tests do."""

from __future__ import annotations

from pathlib import Path

import pytest

from firmware.errors import HardwareError
from hw import power
from hw.power import (
    Ina219,
    Max17048,
    PowerLossPin,
    PowerMonitor,
    PowerReading,
    SimulatedPower,
    ina219_bus_voltage,
    ina219_calibration,
    ina219_current_ma,
    max17048_crate,
    max17048_percent,
    max17048_voltage,
)


class Registers:
    """Word registers of one or more chips as an SMBus adapter returns them (low byte first on the wire)."""

    def __init__(self, chips: dict[int, dict[int, int]]) -> None:
        self.chips = chips
        self.writes: list[tuple[int, int, int]] = []

    def read_word_data(self, addr: int, reg: int) -> int:
        if addr not in self.chips:
            raise OSError(121, "Remote I/O error")  # what the kernel answers for a missing chip (NACK)
        return power.swap16(self.chips[addr].get(reg, 0))

    def write_word_data(self, addr: int, reg: int, value: int) -> None:
        if addr not in self.chips:
            raise OSError(121, "Remote I/O error")
        self.writes.append((addr, reg, value))
        self.chips[addr][reg] = power.swap16(value)


def test_max17048_register_decoding_datasheet_values() -> None:
    # VCELL: 78.125 uV/LSB; SOC: 1/256 % per LSB; CRATE: 0.208 %/h per LSB, signed
    assert max17048_voltage(0xD000) == pytest.approx(4.16)  # 53248 * 78.125 uV
    assert max17048_voltage(0xFFFF) == pytest.approx(5.11992, abs=1e-5)  # full scale 5.12 V
    assert max17048_percent(0x6400) == 100.0 and max17048_percent(0x3A80) == 58.5
    assert max17048_crate(0x0001) == pytest.approx(0.208) and max17048_crate(0xFFFF) == pytest.approx(-0.208)


def test_max17048_reads_through_the_bus() -> None:
    bus = Registers({0x36: {0x08: 0x0012, 0x02: 0xCA00, 0x04: 0x1F80, 0x16: 0xFFE0}})  # discharging at 6.7 %/h
    g = Max17048(bus)
    r = g.read()
    assert r.source == "max17048" and r.percent == 31.5 and r.voltage_v == pytest.approx(4.04)
    assert r.charging is False
    bus.chips[0x36][0x16] = 0x0030  # +10 %/h: charging
    assert g.read().charging is True
    with pytest.raises(HardwareError, match="no MAX17048"):
        Max17048(Registers({0x36: {0x08: 0x1234}}))  # another chip answers at 0x36
    del bus.chips[0x36]
    assert "i2c read failed" in g.read().error


def test_ina219_register_decoding_datasheet_values() -> None:
    # The datasheet's programming example: 100 uA current LSB, 0.1 ohm shunt -> calibration 4096
    assert ina219_calibration(0.0001, 0.1) == 4096
    assert ina219_bus_voltage(0x5D98) == pytest.approx(11.98)  # bits 15..3 = 2995, 4 mV each
    assert ina219_bus_voltage(0x1F42) == pytest.approx(4.0)  # 1000 * 4 mV, CNVR set (bit 1)
    assert ina219_current_ma(0x2710, 0.0001) == pytest.approx(1000.0)
    assert ina219_current_ma(0xFC18, 0.0001) == pytest.approx(-100.0)
    with pytest.raises(ValueError):
        ina219_calibration(1e-9, 0.1)


def test_ina219_reads_through_the_bus() -> None:
    bus = Registers({0x42: {0x02: 1900 << 3, 0x04: 0xF830}})  # 7.6 V on a 2S pack, -200 mA (discharging)
    g = Ina219(bus, 0x42, 0.1, 0.0001, empty_v=6.0, full_v=8.4)
    assert (0x42, 0x05, power.swap16(4096)) in bus.writes  # calibration written (high byte first)
    r = g.read()
    assert r.voltage_v == pytest.approx(7.6) and r.current_ma == pytest.approx(-200.0)
    assert r.percent == pytest.approx(66.7, abs=0.1) and r.charging is False
    bus.chips[0x42][0x04] = 0x1388  # +500 mA into the pack
    assert g.read().charging is True
    with pytest.raises(HardwareError):
        Ina219(Registers({}), 0x40)
    with pytest.raises(HardwareError):
        Ina219(bus, 0x36)


def test_real_i2c_bus_absent_is_a_hardware_error() -> None:
    if Path("/dev/i2c-7").exists():
        pytest.skip("this machine has /dev/i2c-7")  # the point is the failure path of a missing bus
    with pytest.raises(HardwareError, match="i2c-7"):
        Max17048(7)


def test_power_loss_pin_on_mock_gpio() -> None:
    from gpiozero.pins.mock import MockFactory

    factory = MockFactory()
    pin = PowerLossPin(6, active_high=True, pin_factory=factory)
    mon = PowerMonitor(SimulatedPower(50.0), pin)
    assert pin.lost is False and mon.read().power_lost is False
    factory.pin(6).drive_high()
    assert pin.lost is True
    r = mon.read()
    assert r.power_lost is True and r.percent == 50.0
    factory.pin(6).drive_low()
    assert mon.read().power_lost is False
    mon.close()
    low = PowerLossPin(13, active_high=False, pin_factory=factory)
    factory.pin(13).drive_low()
    assert low.lost is True
    low.close()


def test_simulated_battery() -> None:
    now = [0.0]
    s = SimulatedPower(50.0, drain_per_min=6.0, loss_at_s=30.0, clock=lambda: now[0])
    s.start()
    now[0] = 10.0
    r = s.read()
    assert r.percent == pytest.approx(49.0) and not r.power_lost and r.source == "sim"
    now[0] = 30.0
    assert s.read().power_lost is True
    now[0] = 10_000.0
    assert s.read().percent == 0.0
    assert PowerReading(12.345, 3.71234).as_dict()["percent"] == 12.3
