"""Value types of the sensor API: decoded parameter tables, command results, LED codes, wait outcomes."""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from hw.sensor.protocol import PACKET_SIZES, UnexpectedReply, baud_from_n


class WaitResult(enum.Enum):
    """Outcome of waiting for a finger to be placed or lifted."""

    CAPTURED = "captured"  # a finger image is in the sensor's image buffer
    LIFTED = "lifted"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"


class LedMode(enum.IntEnum):
    """R503 AuraLedConfig control codes."""

    BREATHING = 1
    FLASHING = 2
    ON = 3
    OFF = 4
    FADE_IN = 5
    FADE_OUT = 6


class LedColor(enum.IntEnum):
    """R503 ring colours (4..7 from manual V1.2 on)."""

    RED = 1
    BLUE = 2
    PURPLE = 3
    GREEN = 4
    YELLOW = 5
    CYAN = 6
    WHITE = 7


@dataclass(frozen=True)
class SystemParameters:
    """The 16-byte ReadSysPara table, decoded."""

    status: int
    system_id: int
    capacity: int
    security_level: int
    address: int
    packet_size: int  # bytes (32/64/128/256)
    baud: int  # bits per second

    @property
    def busy(self) -> bool:
        """Status bit 0: the module is busy."""
        return bool(self.status & 1)

    @property
    def password_verified(self) -> bool:
        """Status bit 2: the password has been verified."""
        return bool(self.status & 4)

    @property
    def image_in_buffer(self) -> bool:
        """Status bit 3: a valid image is in the image buffer."""
        return bool(self.status & 8)

    @classmethod
    def decode(cls, table: bytes) -> SystemParameters:
        """Decode the table; UnexpectedReply if it is malformed."""
        if len(table) != 16:
            raise UnexpectedReply(f"ReadSysPara table must be 16 bytes, got {len(table)}")
        status, sysid, cap, sec, addr, pkt, n = struct.unpack(">HHHHIHH", table)
        if pkt > 3:
            raise UnexpectedReply(f"ReadSysPara: packet size code {pkt} not in 0..3")
        if not 1 <= n <= 12:
            raise UnexpectedReply(f"ReadSysPara: baud multiplier {n} not in 1..12")
        return cls(status, sysid, cap, sec, addr, PACKET_SIZES[pkt], baud_from_n(n))


@dataclass(frozen=True)
class ProductInfo:
    """R503 ReadProdInfo (46 bytes)."""

    model: str
    batch: str
    serial: str
    hw_version: str
    sensor_type: str
    width: int
    height: int
    template_size: int
    database_size: int

    @classmethod
    def decode(cls, raw: bytes) -> ProductInfo:
        """Decode the 46 result bytes; UnexpectedReply if the length is wrong."""
        if len(raw) != 46:
            raise UnexpectedReply(f"ReadProdInfo must return 46 bytes, got {len(raw)}")

        def text(b: bytes) -> str:
            return b.split(b"\0", 1)[0].decode("ascii", "replace").strip()

        hw = f"{raw[28]}.{raw[29]}"
        w, h, tsize, dbsize = struct.unpack(">HHHH", raw[38:46])
        return cls(text(raw[0:16]), text(raw[16:20]), text(raw[20:28]), hw, text(raw[30:38]),
                   w, h, tsize, dbsize)


@dataclass(frozen=True)
class SearchResult:
    """A library hit."""

    page: int
    score: int


@dataclass(frozen=True)
class MatchResult:
    """CharBuffer1 vs CharBuffer2."""

    matched: bool
    score: int


@dataclass(frozen=True)
class SensorInfo:
    """What `rekam sensor info` shows."""

    model: str
    capacity: int
    templates: int
    baud: int
    packet_size: int
    security_level: int
    address: int
    geometry: str
    port: str
