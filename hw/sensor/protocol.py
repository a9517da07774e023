"""The ZhianTec/Synochip "EF01" wire protocol: frames, a streaming framer, codes and typed errors.

Frame (all multi-byte fields big-endian)::

    EF 01 | address u32 | PID u8 | length u16 (= len(content) + 2) | content | sum16(PID..content)

The checksum covers PID, both length bytes and the content, not the header or the address.
This module has no I/O: the driver and the simulator both use it, so they agree on every byte.
"""

from __future__ import annotations

import enum
import logging
import struct
from dataclasses import dataclass

from firmware.errors import SensorError

log = logging.getLogger(__name__)

HEADER = b"\xef\x01"
DEFAULT_ADDRESS = 0xFFFFFFFF
HEADER_LEN = 9  # EF 01 + address(4) + PID(1) + length(2)
MIN_LENGTH = 3  # one content byte + checksum
MAX_LENGTH = 258  # 256-byte data packets + checksum (the manual's "256" would forbid them)
PACKET_SIZES = (32, 64, 128, 256)  # SysPara "data package length" codes 0..3
BAUD_UNIT = 9600


class Pid(enum.IntEnum):
    """Package identifier."""

    COMMAND = 0x01
    DATA = 0x02
    ACK = 0x07
    END = 0x08


class Instruction(enum.IntEnum):
    """Instruction codes of the command packets this package speaks."""

    GEN_IMG = 0x01
    IMG2TZ = 0x02
    MATCH = 0x03
    SEARCH = 0x04
    REG_MODEL = 0x05
    STORE = 0x06
    LOAD_CHAR = 0x07
    UP_CHAR = 0x08
    DOWN_CHAR = 0x09
    UP_IMAGE = 0x0A
    DOWN_IMAGE = 0x0B
    DELETE_CHAR = 0x0C
    EMPTY = 0x0D
    SET_SYS_PARA = 0x0E
    READ_SYS_PARA = 0x0F
    SET_PWD = 0x12
    VFY_PWD = 0x13
    GET_RANDOM_CODE = 0x14
    SET_ADDER = 0x15
    WRITE_NOTEPAD = 0x18
    READ_NOTEPAD = 0x19
    HIGH_SPEED_SEARCH = 0x1B
    TEMPLATE_NUM = 0x1D
    READ_INDEX_TABLE = 0x1F
    GET_IMAGE_EX = 0x28
    AURA_LED_CONFIG = 0x35
    CHECK_SENSOR = 0x36
    READ_PROD_INFO = 0x3C
    SOFT_RST = 0x3D
    HANDSHAKE = 0x40
    GET_ECHO = 0x53


class SysParam(enum.IntEnum):
    """SetSysPara register numbers."""

    BAUD = 4
    SECURITY = 5
    PACKET_SIZE = 6


class Code(enum.IntEnum):
    """Confirmation codes (first content byte of every ACK), union of ZFM/R30x, AS608 and R503."""

    OK = 0x00
    PACKET_ERROR = 0x01
    NO_FINGER = 0x02
    CAPTURE_FAILED = 0x03
    TOO_DRY = 0x04
    TOO_WET = 0x05
    TOO_MESSY = 0x06
    TOO_FEW_FEATURES = 0x07
    NO_MATCH = 0x08
    NOT_FOUND = 0x09
    MERGE_FAILED = 0x0A
    BAD_LOCATION = 0x0B
    TEMPLATE_READ_ERROR = 0x0C
    TEMPLATE_UPLOAD_ERROR = 0x0D
    CANNOT_RECEIVE = 0x0E
    IMAGE_UPLOAD_ERROR = 0x0F
    DELETE_FAILED = 0x10
    CLEAR_FAILED = 0x11
    LOW_POWER_FAILED = 0x12
    WRONG_PASSWORD = 0x13
    RESET_FAILED = 0x14
    NO_VALID_IMAGE = 0x15
    UPGRADE_FAILED = 0x16
    RESIDUAL_FINGER = 0x17
    FLASH_ERROR = 0x18
    UNDEFINED_ERROR = 0x19
    INVALID_REGISTER = 0x1A
    BAD_REGISTER_CONFIG = 0x1B
    BAD_NOTEPAD_PAGE = 0x1C
    PORT_OP_FAILED = 0x1D
    AUTO_ENROLL_FAILED = 0x1E
    LIBRARY_FULL = 0x1F
    BAD_ADDRESS = 0x20
    PASSWORD_REQUIRED = 0x21
    TEMPLATE_EMPTY = 0x22
    LIBRARY_EMPTY = 0x24
    TIMEOUT = 0x26
    ALREADY_EXISTS = 0x27
    SENSOR_ABNORMAL = 0x29
    ECHO_OK = 0x55
    AUTO_LOGIN_OK1 = 0x56
    AUTO_LOGIN_OK2 = 0x57
    UNSUPPORTED = 0xFC
    HARDWARE_ERROR = 0xFD
    EXECUTION_FAILED = 0xFE


CODE_TEXT: dict[int, str] = {
    0x00: "ok",
    0x01: "error receiving packet (bad checksum/format, or command not supported by this model)",
    0x02: "no finger on the sensor",
    0x03: "failed to capture the finger image",
    0x04: "image too dry / too light",
    0x05: "image too wet / too dark",
    0x06: "image too messy to generate a character file",
    0x07: "too few feature points (or image too small / poor quality)",
    0x08: "fingers do not match",
    0x09: "no matching finger in the library",
    0x0A: "failed to combine character files (different fingers?)",
    0x0B: "page ID beyond the library",
    0x0C: "error reading template from the library, or invalid template",
    0x0D: "error uploading template",
    0x0E: "module cannot receive the following data packets",
    0x0F: "error uploading image",
    0x10: "failed to delete template",
    0x11: "failed to clear the library",
    0x12: "cannot enter low-power state",
    0x13: "wrong password",
    0x14: "reset failed",
    0x15: "no valid primary image in the image buffer",
    0x16: "online upgrade failed",
    0x17: "residual fingerprint / finger not moved between captures",
    0x18: "error writing/reading flash",
    0x19: "undefined error",
    0x1A: "invalid register number",
    0x1B: "incorrect register configuration",
    0x1C: "wrong notepad page number",
    0x1D: "failed to operate the communication port",
    0x1E: "automatic enrollment failed",
    0x1F: "fingerprint library is full",
    0x20: "address code incorrect",
    0x21: "password must be verified first",
    0x22: "fingerprint template is empty",
    0x24: "fingerprint library is empty",
    0x26: "timeout",
    0x27: "fingerprint already exists",
    0x29: "sensor hardware error",
    0x55: "module ready (GetEcho)",
    0x56: "auto-login first press ok",
    0x57: "auto-login second press ok",
    0xFC: "unsupported command",
    0xFD: "hardware error",
    0xFE: "command execution failure",
}


def code_text(code: int) -> str:
    """Human meaning of a confirmation code (unknown codes are named by value)."""
    return CODE_TEXT.get(code, f"unknown confirmation code 0x{code:02X}")


# --- typed errors ------------------------------------------------------------------------


class SensorUnavailable(SensorError, OSError):
    """The serial port cannot be opened or has gone (USB-TTL unplugged, wrong path, no permission)."""


class SensorTimeout(SensorError, TimeoutError):
    """No (complete) reply within the command's deadline: wiring, baud mismatch, dead or busy sensor."""


class FrameError(SensorError):
    """Bytes that are not a valid frame (bad header, length, address, PID or checksum)."""


class UnexpectedReply(SensorError):
    """A well-formed frame that is not what the transaction expects (wrong PID, short ACK, lost data).

    Not `firmware.errors.ProtocolError`: that one is about relay/control messages, this one about
    sensor replies on the UART.
    """


class CommandError(SensorError):
    """The sensor answered with a confirmation code that means failure; `code` tells which."""

    code_value: int = -1

    def __init__(self, code: int, command: str = "", detail: str = "") -> None:
        self.code = code
        self.command = command
        msg = f"{command}: " if command else ""
        msg += f"confirmation 0x{code:02X} ({code_text(code)})"
        if detail:
            msg += f"; {detail}"
        super().__init__(msg)

    @staticmethod
    def for_code(code: int, command: str = "", detail: str = "") -> CommandError:
        """The most specific `CommandError` subclass for a confirmation code."""
        cls = _ERROR_CLASSES.get(code, CommandError)
        return cls(code, command, detail)


class PacketReceiveError(CommandError):
    """0x01: the sensor did not understand the packet (or does not support the command)."""


class UnsupportedCommand(CommandError):
    """0xFC: command not supported by this model (R503 style)."""


class CaptureFailed(CommandError):
    """0x03: the image capture failed (finger moved or removed during the capture)."""


class ImageQualityError(CommandError):
    """0x04/0x05/0x06/0x07: the image cannot yield features (dry, wet, messy, too few minutiae)."""


class NoImage(CommandError):
    """0x15: no valid image in the image buffer."""


class MergeFailed(CommandError):
    """0x0A: RegModel could not combine the two character files (different fingers)."""


class BadLocation(CommandError):
    """0x0B: page ID beyond the library capacity."""


class TemplateError(CommandError):
    """0x0C/0x0D/0x0E/0x22: template read, upload or receive error, or empty template."""


class ImageTransferError(CommandError):
    """0x0F: the sensor could not upload the image."""


class LibraryError(CommandError):
    """0x10/0x11/0x1F/0x24/0x27: delete, clear, library full/empty, duplicate."""


class LibraryFull(LibraryError):
    """0x1F: the fingerprint library is full."""


class FlashError(CommandError):
    """0x18: flash write or read error in the module."""


class PasswordError(CommandError):
    """0x13 wrong password, 0x21 password must be verified first."""


class RegisterError(CommandError):
    """0x1A/0x1B/0x1C: invalid register number, configuration or notepad page."""


class SensorHardwareError(CommandError):
    """0x29/0xFD/0xFE/0x12/0x14/0x16/0x19/0x1D/0x1E/0x20/0x26: the module reports an internal failure."""


_ERROR_CLASSES: dict[int, type[CommandError]] = {
    0x01: PacketReceiveError,
    0x03: CaptureFailed,
    0x04: ImageQualityError,
    0x05: ImageQualityError,
    0x06: ImageQualityError,
    0x07: ImageQualityError,
    0x0A: MergeFailed,
    0x0B: BadLocation,
    0x0C: TemplateError,
    0x0D: TemplateError,
    0x0E: TemplateError,
    0x0F: ImageTransferError,
    0x10: LibraryError,
    0x11: LibraryError,
    0x13: PasswordError,
    0x15: NoImage,
    0x17: CaptureFailed,
    0x18: FlashError,
    0x1A: RegisterError,
    0x1B: RegisterError,
    0x1C: RegisterError,
    0x1F: LibraryFull,
    0x21: PasswordError,
    0x22: TemplateError,
    0x24: LibraryError,
    0x27: LibraryError,
    0xFC: UnsupportedCommand,
}
for _c in (0x12, 0x14, 0x16, 0x19, 0x1D, 0x1E, 0x20, 0x26, 0x29, 0xFD, 0xFE):
    _ERROR_CLASSES[_c] = SensorHardwareError


# --- frames --------------------------------------------------------------------------------


def checksum(pid: int, content: bytes) -> int:
    """sum16 of PID, both length bytes and the content."""
    length = len(content) + 2
    return (pid + (length >> 8) + (length & 0xFF) + sum(content)) & 0xFFFF


@dataclass(frozen=True)
class Packet:
    """One decoded frame."""

    address: int
    pid: int
    content: bytes

    @property
    def code(self) -> int:
        """Confirmation code (ACK) or instruction code (command): the first content byte."""
        return self.content[0]

    def to_bytes(self) -> bytes:
        """The frame as it goes on the wire."""
        return build_frame(self.pid, self.content, self.address)


def build_frame(pid: int, content: bytes, address: int = DEFAULT_ADDRESS) -> bytes:
    """Encode one frame. Raises ValueError for content the protocol cannot carry."""
    if not 1 <= len(content) <= MAX_LENGTH - 2:
        raise ValueError(f"frame content must be 1..{MAX_LENGTH - 2} bytes, got {len(content)}")
    if not 0 <= address <= 0xFFFFFFFF:
        raise ValueError(f"address must be a u32, got {address!r}")
    length = len(content) + 2
    return (HEADER + struct.pack(">IBH", address, pid, length) + bytes(content)
            + struct.pack(">H", checksum(pid, content)))


def command_frame(instruction: int, params: bytes = b"", address: int = DEFAULT_ADDRESS) -> bytes:
    """A command packet: instruction code followed by its parameters."""
    return build_frame(Pid.COMMAND, bytes([instruction]) + params, address)


def parse_frame(data: bytes, address: int | None = None) -> Packet:
    """Decode exactly one complete frame; raises `FrameError` naming what is wrong."""
    if len(data) < HEADER_LEN + 2:
        raise FrameError(f"frame too short: {len(data)} bytes")
    if data[:2] != HEADER:
        raise FrameError(f"bad header {data[:2].hex(' ')} (want ef 01)")
    addr, pid, length = struct.unpack_from(">IBH", data, 2)
    if pid not in _PIDS:
        raise FrameError(f"unknown package identifier 0x{pid:02X}")
    if not MIN_LENGTH <= length <= MAX_LENGTH:
        raise FrameError(f"length field {length} outside {MIN_LENGTH}..{MAX_LENGTH}")
    if len(data) != HEADER_LEN + length:
        raise FrameError(f"length field says {HEADER_LEN + length} bytes, frame has {len(data)}")
    if address is not None and addr != address:
        raise FrameError(f"address 0x{addr:08X} is not 0x{address:08X}")
    content = bytes(data[HEADER_LEN:HEADER_LEN + length - 2])
    (got,) = struct.unpack_from(">H", data, HEADER_LEN + length - 2)
    want = checksum(pid, content)
    if got != want:
        raise FrameError(f"checksum 0x{got:04X} != computed 0x{want:04X}")
    return Packet(addr, pid, content)


_PIDS = frozenset(int(p) for p in Pid)


class Framer:
    """Streaming frame parser that hunts for ``EF 01`` and re-synchronises after any garbage.

    Feed it whatever the port delivered; `next_packet()` returns complete, checksum-valid frames.
    A candidate frame that fails a check costs exactly one byte: the search restarts one byte after
    its header, so a valid frame hidden behind a bogus header is still found. The framer never raises
    on input; it counts what it threw away (`discarded`, `rejected`) so callers can tell that data
    was lost (e.g. a bulk transfer with a corrupt packet).
    """

    def __init__(self, address: int | None = DEFAULT_ADDRESS) -> None:
        self.address = address
        self._buf = bytearray()
        self.discarded = 0  # bytes dropped while hunting or after a rejected candidate
        self.rejected = 0  # candidate frames rejected (bad length, address, PID or checksum)
        self.last_reject = ""

    def reset(self) -> None:
        """Forget buffered bytes (after flushing the port); counters are kept."""
        self._buf.clear()

    @property
    def buffered(self) -> int:
        """Bytes waiting for the rest of a frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        """Append received bytes."""
        self._buf += data

    def _drop(self, n: int, why: str = "") -> None:
        del self._buf[:n]
        self.discarded += n
        if why:
            self.rejected += 1
            self.last_reject = why
            log.debug("framer reject=%s dropped=1", why)

    def needed(self) -> int:
        """How many more bytes would complete the frame being assembled (at least 1)."""
        buf = self._buf
        if len(buf) < HEADER_LEN or buf[:2] != HEADER:
            return max(1, HEADER_LEN - len(buf))
        length = (buf[7] << 8) | buf[8]
        return max(1, HEADER_LEN + length - len(buf))

    def next_packet(self) -> Packet | None:
        """The next valid frame in the buffer, or None if more bytes are needed."""
        buf = self._buf
        while True:
            i = buf.find(HEADER)
            if i < 0:
                # keep a trailing 0xEF: it may be the first half of a header
                keep = 1 if buf and buf[-1] == 0xEF else 0
                if len(buf) - keep:
                    self._drop(len(buf) - keep)
                return None
            if i:
                self._drop(i)
            if len(buf) < HEADER_LEN:
                return None
            addr, pid, length = struct.unpack_from(">IBH", buf, 2)
            if pid not in _PIDS:
                self._drop(1, f"pid=0x{pid:02X}")
                continue
            if not MIN_LENGTH <= length <= MAX_LENGTH:
                self._drop(1, f"length={length}")
                continue
            if self.address is not None and addr != self.address:
                self._drop(1, f"address=0x{addr:08X}")
                continue
            total = HEADER_LEN + length
            if len(buf) < total:
                return None
            content = bytes(buf[HEADER_LEN:total - 2])
            got = (buf[total - 2] << 8) | buf[total - 1]
            if got != checksum(pid, content):
                self._drop(1, f"checksum pid=0x{pid:02X} len={length}")
                continue
            del buf[:total]
            return Packet(addr, pid, content)


def data_frames(data: bytes, packet_size: int, address: int = DEFAULT_ADDRESS) -> list[bytes]:
    """Split a bulk payload into DATA frames of `packet_size` bytes, the last one marked END."""
    if packet_size not in PACKET_SIZES:
        raise ValueError(f"packet size must be one of {PACKET_SIZES}, got {packet_size}")
    if not data:
        raise ValueError("bulk payload is empty")
    chunks = [data[i:i + packet_size] for i in range(0, len(data), packet_size)]
    return [build_frame(Pid.END if k == len(chunks) - 1 else Pid.DATA, c, address)
            for k, c in enumerate(chunks)]


def wire_bytes_for_bulk(payload_len: int, packet_size: int) -> int:
    """Bytes on the wire for a bulk payload: 11 bytes of framing per packet plus the payload."""
    packets = -(-payload_len // packet_size)
    return payload_len + 11 * packets


def baud_from_n(n: int) -> int:
    """Baud rate for the SysPara multiplier N (baud = 9600 * N)."""
    return BAUD_UNIT * n


def n_from_baud(baud: int) -> int:
    """SysPara multiplier for a baud rate; ValueError if it is not 9600 * N with N in 1..12."""
    n, rem = divmod(baud, BAUD_UNIT)
    if rem or not 1 <= n <= 12:
        raise ValueError(f"baud must be 9600 * N with N in 1..12, got {baud}")
    return n
