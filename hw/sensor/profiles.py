"""Sensor model profiles: geometry, capacity, template size, command set and timings.

Used by the simulator to behave like a given model, and by the driver to name the model it found.
Figures from the implementer's reference (vendor manuals; see docs/sensor.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from hw.sensor.image import R307_GEOMETRY, R503_GEOMETRY, Geometry
from hw.sensor.protocol import Instruction as I  # noqa: N817

_COMMON = frozenset({
    I.GEN_IMG, I.IMG2TZ, I.MATCH, I.SEARCH, I.REG_MODEL, I.STORE, I.LOAD_CHAR, I.UP_CHAR, I.DOWN_CHAR,
    I.UP_IMAGE, I.DOWN_IMAGE, I.DELETE_CHAR, I.EMPTY, I.SET_SYS_PARA, I.READ_SYS_PARA, I.SET_PWD,
    I.VFY_PWD, I.GET_RANDOM_CODE, I.SET_ADDER, I.WRITE_NOTEPAD, I.READ_NOTEPAD, I.HIGH_SPEED_SEARCH,
    I.TEMPLATE_NUM, I.READ_INDEX_TABLE,
})
_R503_EXTRA = frozenset({
    I.GET_IMAGE_EX, I.AURA_LED_CONFIG, I.CHECK_SENSOR, I.READ_PROD_INFO, I.SOFT_RST, I.HANDSHAKE,
})


@dataclass(frozen=True)
class SensorProfile:
    """What distinguishes one EF01 sensor model from another."""

    name: str
    model: str  # as ReadProdInfo would report it
    geometry: Geometry
    capacity: int  # library slots
    template_size: int  # bytes of an UpChar after RegModel
    commands: frozenset[int]
    unsupported_code: int  # 0x01 on older firmware, 0xFC on R503
    allowed_baud_n: frozenset[int]
    system_id: int
    capture_s: float  # GenImg with a finger on the glass
    no_finger_s: float  # GenImg without a finger
    img2tz_s: float
    search_s: float
    flash_write_s: float
    sensor_type: str

    def supports(self, instruction: int) -> bool:
        """Whether this model implements an instruction."""
        return instruction in self.commands


R307 = SensorProfile(
    name="r307", model="R307", geometry=R307_GEOMETRY, capacity=1000, template_size=512,
    commands=_COMMON | {I.GET_ECHO}, unsupported_code=0x01, allowed_baud_n=frozenset(range(1, 13)),
    system_id=0x0000, capture_s=0.3, no_finger_s=0.03, img2tz_s=0.25, search_s=0.3,
    flash_write_s=0.1, sensor_type="optical",
)
R503 = SensorProfile(
    name="r503", model="R503", geometry=R503_GEOMETRY, capacity=200, template_size=1536,
    commands=_COMMON | _R503_EXTRA, unsupported_code=0xFC, allowed_baud_n=frozenset({1, 2, 4, 6, 12}),
    system_id=0x0009, capture_s=0.2, no_finger_s=0.02, img2tz_s=0.3, search_s=0.1,
    flash_write_s=0.08, sensor_type="capacitive",
)
PROFILES: dict[str, SensorProfile] = {p.name: p for p in (R307, R503)}


def get_profile(name: str) -> SensorProfile:
    """Profile by name (case-insensitive); ValueError listing the known ones."""
    try:
        return PROFILES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown sensor profile {name!r} (known: {', '.join(PROFILES)})") from None
