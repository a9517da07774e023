"""hw/files: the wiring table matches the [gpio] defaults and the header; config.txt has the UART/camera lines."""

from __future__ import annotations

import re

from firmware import config
from tests.system.conftest import REPO

HW = REPO / "hw" / "files"
# BCM GPIO -> physical header pin on every 40-pin Raspberry Pi (B+ and later).
HEADER = {2: 3, 3: 5, 4: 7, 5: 29, 6: 31, 7: 26, 8: 24, 9: 21, 10: 19, 11: 23, 12: 32, 13: 33, 14: 8, 15: 10,
          16: 36, 17: 11, 18: 12, 19: 35, 20: 38, 21: 40, 22: 15, 23: 16, 24: 18, 25: 22, 26: 37, 27: 13}
GND = {6, 9, 14, 20, 25, 30, 34, 39}


def _rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|") and not line.startswith("|---")]


def test_panel_table_matches_gpio_defaults() -> None:
    rows = _rows((HW / "wiring.md").read_text())
    panel = {r[1].strip("`"): r for r in rows if len(r) == 5 and re.fullmatch(r"`\w+`", r[1])}
    gpio = {k: v.default for k, v in config.SCHEMA["gpio"].items() if k not in ("enabled", "sensor_touch")}
    assert set(panel) == set(gpio)
    for key, pin in gpio.items():
        _, _, bcm, phys, _ = panel[key]
        assert bcm == f"GPIO{pin}", (key, bcm, pin)
        assert int(phys) == HEADER[pin], (key, phys, HEADER[pin])


def test_sensor_rows() -> None:
    rows = _rows((HW / "wiring.md").read_text())
    by_wire = {r[0].split()[1]: r for r in rows if len(r) == 4 and r[0][:1].isdigit()}
    assert by_wire["TXD"][1].startswith("GPIO15") and int(by_wire["TXD"][2]) == HEADER[15]  # crossed over
    assert by_wire["RXD"][1].startswith("GPIO14") and int(by_wire["RXD"][2]) == HEADER[14]
    touch = config.SCHEMA["gpio"]["sensor_touch"].default
    assert f"GPIO{touch}" in by_wire["WAKEUP"][1] and int(by_wire["WAKEUP"][2]) == HEADER[touch]
    assert by_wire["VCC"][1] == "3.3 V" and int(by_wire["VCC"][2]) in (1, 17)  # R503 datasheet: 3.3 V
    assert int(by_wire["GND"][2]) in GND
    # No panel pin collides with the UART, I2C or each other.
    pins = [v.default for k, v in config.SCHEMA["gpio"].items() if k != "enabled"]
    assert len(set(pins)) == len(pins) and not set(pins) & {2, 3, 14, 15}


def test_config_txt_lines() -> None:
    lines = {ln.split("#")[0].strip() for ln in (HW / "config.txt").read_text().splitlines()}
    assert "enable_uart=1" in lines
    assert lines & {"dtoverlay=disable-bt", "dtoverlay=miniuart-bt"}
    assert "camera_auto_detect=1" in lines
    assert re.search(r"^\[all\]$", (HW / "config.txt").read_text(), re.M)
