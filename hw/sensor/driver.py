"""`FingerprintSensor`: a robust pyserial driver for EF01 sensors (ZFM-20, R305/R307, AS608, R503).

What it does that the common libraries do not: parses by the length field with a re-synchronising
framer and verifies every checksum and address; gives every command a deadline
(`time.monotonic`); iterates over data packets of any size with a size cap; raises typed errors
(`hw.sensor.protocol`) while "no finger", "no match" and "not found" are plain results; finds the
baud rate and raises the link to 115200; survives the port disappearing (reopens with backoff on
the next call); one lock per transaction so several threads may share it.
"""

from __future__ import annotations

import enum
import logging
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import serial

try:
    from termios import error as _TermiosError
except ImportError:  # not POSIX
    class _TermiosError(Exception):  # type: ignore[no-redef]
        pass

from hw.sensor.image import GEOMETRIES, Geometry, geometry_for_bytes, pack_4bit, unpack_4bit
from hw.sensor.protocol import (
    DEFAULT_ADDRESS,
    PACKET_SIZES,
    Code,
    CommandError,
    Framer,
    Instruction,
    Packet,
    PacketReceiveError,
    Pid,
    SensorError,
    SensorTimeout,
    SensorUnavailable,
    SysParam,
    UnexpectedReply,
    UnsupportedCommand,
    baud_from_n,
    command_frame,
    data_frames,
    n_from_baud,
)

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

DEFAULT_PORT = "/dev/serial0"
DEFAULT_BAUD = 57600
# What pyserial lets escape when the device vanishes (USB-TTL pulled, pty closed): SerialException,
# OSError (EIO), termios.error from tcflush/tcsetattr, TypeError when its fd was closed under it.
PORT_ERRORS = (serial.SerialException, OSError, TypeError, _TermiosError)
COMMON_BAUDS = (57600, 115200, 9600, 19200, 38400)
READ_SLICE_S = 0.02  # serial read timeout: short, the deadline is enforced around it
MAX_BULK_BYTES = 128 * 1024  # larger than any image or template; stops a runaway stream

# Processing allowance per instruction, seconds (wire time is added on top).
_PROCESSING_S: dict[int, float] = {
    Instruction.GEN_IMG: 1.5, Instruction.GET_IMAGE_EX: 1.5, Instruction.IMG2TZ: 1.0,
    Instruction.SEARCH: 2.0, Instruction.HIGH_SPEED_SEARCH: 2.0, Instruction.REG_MODEL: 1.0,
    Instruction.STORE: 2.0, Instruction.DELETE_CHAR: 2.0, Instruction.EMPTY: 2.0,
    Instruction.SET_SYS_PARA: 2.0, Instruction.SET_PWD: 2.0, Instruction.SET_ADDER: 2.0,
    Instruction.WRITE_NOTEPAD: 2.0, Instruction.LOAD_CHAR: 1.0, Instruction.SOFT_RST: 1.0,
}
_DEFAULT_PROCESSING_S = 0.5
BULK_GAP_S = 0.5  # max silence between two data packets
# Confirmation codes each instruction can answer with, besides 00 and the generic ones. The protocol
# has no sequence numbers: a late reply to an earlier command (after a timeout) can only be told
# apart from the real one by a code or a length the current command never produces.
_GENERIC_CODES = frozenset({0x01, 0x20, 0x21, 0xFC, 0xFD, 0xFE})
_PLAUSIBLE: dict[int, frozenset[int]] = {
    Instruction.GEN_IMG: frozenset({0x02, 0x03}),
    Instruction.GET_IMAGE_EX: frozenset({0x02, 0x03, 0x07}),
    Instruction.IMG2TZ: frozenset({0x04, 0x05, 0x06, 0x07, 0x15}),
    Instruction.MATCH: frozenset({0x08}),
    Instruction.SEARCH: frozenset({0x09, 0x24}),
    Instruction.HIGH_SPEED_SEARCH: frozenset({0x09, 0x24}),
    Instruction.REG_MODEL: frozenset({0x0A}),
    Instruction.STORE: frozenset({0x0B, 0x18, 0x1F, 0x22}),
    Instruction.LOAD_CHAR: frozenset({0x0B, 0x0C}),
    Instruction.UP_CHAR: frozenset({0x0D, 0x22}),
    Instruction.DOWN_CHAR: frozenset({0x0E}),
    Instruction.UP_IMAGE: frozenset({0x0F, 0x15}),
    Instruction.DOWN_IMAGE: frozenset({0x0E}),
    Instruction.DELETE_CHAR: frozenset({0x0B, 0x10, 0x18}),
    Instruction.EMPTY: frozenset({0x11, 0x18}),
    Instruction.SET_SYS_PARA: frozenset({0x18, 0x1A, 0x1B}),
    Instruction.READ_SYS_PARA: frozenset({0x18}),
    Instruction.VFY_PWD: frozenset({0x13}),
    Instruction.SET_PWD: frozenset({0x18}),
    Instruction.WRITE_NOTEPAD: frozenset({0x18, 0x1C}),
    Instruction.READ_NOTEPAD: frozenset({0x1C}),
    Instruction.READ_INDEX_TABLE: frozenset({0x1C}),
    Instruction.GET_ECHO: frozenset({0x55}),
    Instruction.CHECK_SENSOR: frozenset({0x29}),
    Instruction.AURA_LED_CONFIG: frozenset(),
}
# Resending these after a lost reply could do harm or confuse the module's state machine.
_NOT_RETRIED = frozenset({Instruction.DOWN_CHAR, Instruction.DOWN_IMAGE, Instruction.SET_SYS_PARA,
                          Instruction.SOFT_RST, Instruction.SET_PWD, Instruction.SET_ADDER,
                          Instruction.UP_IMAGE, Instruction.UP_CHAR, Instruction.GET_RANDOM_CODE})


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


Touch = Callable[[], bool] | threading.Event


def _u16(v: int, what: str) -> bytes:
    if not isinstance(v, int) or not 0 <= v <= 0xFFFF:
        raise ValueError(f"{what} must be an integer 0..65535, got {v!r}")
    return struct.pack(">H", v)


def _u32(v: int, what: str) -> bytes:
    if not isinstance(v, int) or not 0 <= v <= 0xFFFFFFFF:
        raise ValueError(f"{what} must be an integer 0..0xFFFFFFFF, got {v!r}")
    return struct.pack(">I", v)


def _buffer_id(b: int) -> bytes:
    if not isinstance(b, int) or not 1 <= b <= 6:
        raise ValueError(f"char buffer must be 1..6 (1 or 2 on ZFM/R30x), got {b!r}")
    return bytes([b])


class FingerprintSensor:
    """An EF01-protocol fingerprint sensor on a serial port.

    ``FingerprintSensor("/dev/serial0").open()`` finds the sensor (trying the common baud rates),
    verifies the password, reads the system parameters and raises the link to `target_baud`.
    Every public method is one locked transaction; after the port disappears, calls raise
    `SensorUnavailable` until a reopen (attempted on a call, with exponential backoff) succeeds.
    """

    def __init__(
        self,
        port: str = DEFAULT_PORT,
        baud: int = DEFAULT_BAUD,
        *,
        password: int = 0,
        address: int = DEFAULT_ADDRESS,
        target_baud: int | None = 115200,
        auto_baud: bool = True,
        baud_candidates: Iterable[int] = COMMON_BAUDS,
        settle_s: float = 0.3,
        reopen_backoff: tuple[float, float] = (0.5, 10.0),
        max_bulk_bytes: int = MAX_BULK_BYTES,
        bulk_retries: int = 1,
        security_level: int | None = None,
    ) -> None:
        n_from_baud(baud)  # validates
        if security_level is not None and security_level not in range(1, 6):
            raise ValueError(f"security level must be 1..5, got {security_level!r}")
        if target_baud is not None:
            n_from_baud(target_baud)
        _u32(password, "password")
        _u32(address, "address")
        self.port = port
        self.baud = baud
        self.password = password
        self.address = address
        self.target_baud = target_baud
        self.auto_baud = auto_baud
        self.baud_candidates = tuple(baud_candidates)
        self.settle_s = settle_s
        self.reopen_backoff = reopen_backoff
        self.max_bulk_bytes = max_bulk_bytes
        self.bulk_retries = bulk_retries
        self.security_level = security_level
        self.params: SystemParameters | None = None
        self.product: ProductInfo | None = None
        self.geometry: Geometry | None = None
        self._ser: serial.SerialBase | None = None
        self._framer = Framer(address)
        self._lock = threading.RLock()
        self._retry_at = 0.0
        self._backoff = reopen_backoff[0]
        self._unavailable_reason = ""
        self._needs_sync = True

    @classmethod
    def from_config(cls, section: Mapping[str, Any], **overrides: Any) -> FingerprintSensor:
        """Build from a `[sensor]` config section (port, baud, target_baud (0 keeps the found rate),
        password, address, security_level); keyword arguments override it (e.g. port=sim.port)."""
        kw: dict[str, Any] = {k: section[k] for k in ("port", "baud", "password", "address", "security_level")
                              if k in section}
        if "target_baud" in section:
            kw["target_baud"] = section["target_baud"] or None
        kw.update(overrides)
        return cls(**kw)

    # --- lifecycle -----------------------------------------------------------------------

    def open(self) -> SystemParameters:
        """Connect: open the port, find the baud, verify the password, read parameters, raise the baud."""
        with self._lock:
            try:
                self._connect()
            except BaseException:
                self._close_port()  # do not keep the port (and its exclusive lock) after a failed open
                raise
            assert self.params is not None
            return self.params

    def close(self) -> None:
        """Close the port (a later call reopens it)."""
        with self._lock:
            self._close_port()
            self._needs_sync = True

    def __enter__(self) -> FingerprintSensor:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def is_open(self) -> bool:
        """Whether the serial port is open now."""
        return self._ser is not None

    def _open_port(self, baud: int) -> None:
        try:
            self._ser = serial.serial_for_url(self.port, baudrate=baud, timeout=READ_SLICE_S,
                                              write_timeout=10.0, exclusive=True)
        except (serial.SerialException, OSError, ValueError) as e:
            self._ser = None
            raise SensorUnavailable(f"cannot open sensor port {self.port}: {e}") from e
        self._framer.reset()
        log.info("sensor port opened port=%s baud=%d", self.port, baud)

    def _close_port(self) -> None:
        ser, self._ser = self._ser, None
        if ser is not None:
            try:
                ser.close()
            except (serial.SerialException, OSError):
                pass

    def _lost(self, exc: BaseException) -> SensorUnavailable:
        """The port failed under us: close it, schedule a reopen, return the error to raise."""
        self._close_port()
        self._needs_sync = True
        self._unavailable_reason = f"{type(exc).__name__}: {exc}"
        self._retry_at = time.monotonic()  # first reopen attempt on the very next call
        self._backoff = self.reopen_backoff[0]
        log.warning("sensor port lost port=%s error=%s", self.port, self._unavailable_reason)
        return SensorUnavailable(f"sensor port {self.port} lost: {self._unavailable_reason}")

    def _ensure_ready(self) -> None:
        """Open and synchronise if needed, honouring the reopen backoff."""
        if self._ser is not None and not self._needs_sync:
            return
        now = time.monotonic()
        if self._ser is None and now < self._retry_at:
            raise SensorUnavailable(
                f"sensor on {self.port} unavailable ({self._unavailable_reason or 'not opened'}); "
                f"next reopen attempt in {self._retry_at - now:.1f} s")
        try:
            self._connect()
        except SensorError as e:
            if self._ser is None or isinstance(e, SensorUnavailable):
                self._close_port()
                self._unavailable_reason = str(e)
                self._retry_at = time.monotonic() + self._backoff
                self._backoff = min(self._backoff * 2, self.reopen_backoff[1])
                raise SensorUnavailable(str(e)) from e
            raise

    def _connect(self) -> None:
        if self._ser is None:
            self._open_port(self.baud)
        self._needs_sync = False
        try:
            self._find_baud()
            self.params = self._read_sys_para()
            if self.params.address != self.address:
                log.warning("sensor address mismatch configured=0x%08X reported=0x%08X",
                            self.address, self.params.address)
            if self.security_level and self.params.security_level != self.security_level:
                self._command(Instruction.SET_SYS_PARA, bytes([SysParam.SECURITY, self.security_level]))
                if not self._verify_after_change():
                    raise SensorTimeout("sensor silent after setting the security level")
                self.params = self._read_sys_para()
                log.info("security level set level=%d", self.security_level)
            self.geometry = None  # re-learned: the module may have been swapped while unplugged
            self._probe_product()
            if self.target_baud and self.target_baud > self.baud:
                self._raise_baud(self.target_baud)
        except SensorError:
            self._needs_sync = True
            raise
        self._backoff = self.reopen_backoff[0]
        self._unavailable_reason = ""
        p = self.params
        log.info("sensor ready port=%s baud=%d capacity=%d packet=%d security=%d model=%s",
                 self.port, self.baud, p.capacity, p.packet_size, p.security_level,
                 self.product.model if self.product else "EF01")

    def _set_host_baud(self, baud: int) -> None:
        assert self._ser is not None
        try:
            self._ser.baudrate = baud
        except PORT_ERRORS as e:
            raise self._lost(e) from e

    def _find_baud(self) -> None:
        """VfyPwd at the configured baud, then at the other common rates."""
        order = [self.baud] + ([b for b in self.baud_candidates if b != self.baud] if self.auto_baud else [])
        last: SensorTimeout | UnexpectedReply | None = None
        for b in order:
            if self._ser is not None and self._ser.baudrate != b:
                self._set_host_baud(b)
            try:
                self._verify_password(quick=True)
            except (SensorTimeout, UnexpectedReply) as e:  # silence or garbled bytes: wrong rate
                last = e
                log.debug("no answer at baud=%d", b)
                continue
            if b != self.baud:
                log.info("sensor found at baud=%d (configured %d)", b, self.baud)
            self.baud = b
            return
        tried = ", ".join(str(b) for b in order)
        raise SensorTimeout(f"no EF01 sensor answered on {self.port} at {tried} baud (check power, TX/RX "
                            f"wiring, that the serial console is off, and the address) ") from last

    def _raise_baud(self, target: int) -> None:
        try:
            self._change_baud(target)
        except CommandError as e:
            log.warning("sensor refused baud change target=%d error=%s", target, e)

    def _change_baud(self, target: int) -> int:
        old = self.baud
        n = n_from_baud(target)
        self._command(Instruction.SET_SYS_PARA, bytes([SysParam.BAUD, n]))
        self._set_host_baud(target)
        if self._verify_after_change():
            self.baud = target
            self.params = self._read_sys_para()
            log.info("link raised old_baud=%d baud=%d", old, target)
            return target
        # Many modules apply the new rate only after a power cycle: go back and check.
        self._set_host_baud(old)
        if self._verify_after_change():
            log.warning("baud change did not take effect now old_baud=%d target=%d "
                        "(module will use it after a power cycle; auto-baud will find it)", old, target)
            return old
        raise SensorTimeout(f"sensor silent at {target} and {old} baud after a baud change")

    def _verify_after_change(self) -> bool:
        """Wait out the post-SetSysPara busy window, then VfyPwd until answered or 1.5 s."""
        time.sleep(self.settle_s)
        end = time.monotonic() + 1.5
        while True:
            try:
                self._verify_password(quick=True)
                return True
            except (SensorTimeout, UnexpectedReply):
                if time.monotonic() >= end:
                    return False

    def _probe_product(self) -> None:
        try:
            ack = self._command(Instruction.READ_PROD_INFO, quick=True, reply_len=47)
        except (UnsupportedCommand, PacketReceiveError, SensorTimeout, UnexpectedReply):
            self.product = None  # not an R503-class module (or no usable answer); not an error
            return
        self.product = ProductInfo.decode(ack.content[1:])
        g = Geometry(self.product.width, self.product.height)
        if g in GEOMETRIES:  # otherwise learn it from the first image's byte count
            self.geometry = g
        else:
            log.info("ReadProdInfo geometry %s not a known UART image size; learning it from an image", g)

    # --- transport -----------------------------------------------------------------------

    def _wire_s(self, nbytes: int) -> float:
        return nbytes * 10 / self.baud

    def _write(self, frame: bytes) -> None:
        assert self._ser is not None
        log.debug("tx %s", frame.hex(" "))
        try:
            self._ser.write(frame)
        except serial.SerialTimeoutException as e:
            raise SensorTimeout(f"write to {self.port} timed out") from e
        except PORT_ERRORS as e:
            raise self._lost(e) from e

    def _read_packet(self, deadline: float, what: str) -> Packet:
        """The next valid frame, or SensorTimeout at `deadline`."""
        ser = self._ser
        assert ser is not None
        framer = self._framer
        while True:
            pkt = framer.next_packet()
            if pkt is not None:
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("rx pid=0x%02X %s", pkt.pid, pkt.content[:32].hex(" "))
                return pkt
            if time.monotonic() >= deadline:
                raise SensorTimeout(f"{what}: no complete reply from the sensor on {self.port} "
                                    f"(buffered={framer.buffered} discarded={framer.discarded})")
            try:
                n = max(framer.needed(), min(ser.in_waiting, 4096))
                data = ser.read(n)
            except PORT_ERRORS as e:
                # TypeError: pyserial on a vanished pty/USB device (fd closed under it)
                raise self._lost(e) from e
            if data:
                framer.feed(data)

    def _read_ack(self, deadline: float, name: str, instruction: int = -1, reply_len: int = 1) -> Packet:
        """Wait for this command's ACK.

        Gives up early when the reply arrived damaged (rejected, then silence), and skips an ACK
        that cannot be this command's (a code it never returns, or an OK shorter than its results):
        that is a late reply to an earlier command.
        """
        plausible = _PLAUSIBLE.get(instruction)
        rejected0 = self._framer.rejected
        while True:
            try:
                pkt = self._read_packet(min(deadline, time.monotonic() + 0.1), name)
            except SensorTimeout:
                fr = self._framer
                if fr.rejected != rejected0 and fr.buffered == 0:
                    raise UnexpectedReply(f"{name}: reply damaged in transit ({fr.last_reject})") from None
                if time.monotonic() >= deadline:
                    raise
                continue
            if pkt.pid != Pid.ACK:
                log.debug("skipping stray pid=0x%02X while waiting for the ACK of %s", pkt.pid, name)
                continue
            code = pkt.code
            stale = (code == Code.OK and len(pkt.content) < reply_len) or (
                plausible is not None and code != Code.OK and code not in plausible
                and code not in _GENERIC_CODES)
            if stale:
                log.warning("skipping a reply that is not for %s (code=0x%02X len=%d): late reply to an "
                            "earlier command", name, code, len(pkt.content))
                continue
            return pkt

    def _flush_input(self) -> None:
        assert self._ser is not None
        try:
            self._ser.reset_input_buffer()
        except PORT_ERRORS as e:
            raise self._lost(e) from e
        self._framer.reset()

    def _command(self, instruction: int, params: bytes = b"", *, quick: bool = False,
                 reply_len: int = 1, allow: Iterable[int] = (), _reverified: bool = False) -> Packet:
        """Send one command and return its ACK; raise the typed error for a failure code.

        `allow` lists non-zero codes that are results, not errors (no finger, not found...).
        `quick` uses a short deadline (probing at a possibly wrong baud).
        """
        if self._ser is None:
            raise SensorUnavailable(f"sensor port {self.port} is not open")
        name = _name(instruction)
        frame = command_frame(instruction, params, self.address)
        processing = 0.3 if quick else _PROCESSING_S.get(instruction, _DEFAULT_PROCESSING_S)
        retries = 0 if quick or instruction in _NOT_RETRIED else 1
        for attempt in range(retries + 1):
            self._flush_input()
            self._write(frame)
            deadline = time.monotonic() + processing + 2 * self._wire_s(len(frame) + 11 + reply_len)
            try:
                pkt = self._read_ack(deadline, name, instruction, reply_len)
                break
            except (SensorTimeout, UnexpectedReply) as e:
                if attempt == retries:
                    if not quick:
                        # unanswered even after a resend: re-check the link (baud search, VfyPwd)
                        # on the next call; cheap (one VfyPwd) when the module is fine
                        self._needs_sync = True
                    raise
                log.warning("no valid reply, resending command=%s error=%s", name, e)
        code = pkt.code
        if (code == Code.PASSWORD_REQUIRED and instruction != Instruction.VFY_PWD and self.password
                and not _reverified):
            # the module rebooted and forgot the verification: verify and retry once
            log.info("module asks for the password again (rebooted?); verifying command=%s", name)
            self._verify_password(quick=False)
            return self._command(instruction, params, quick=quick, reply_len=reply_len, allow=allow,
                                 _reverified=True)
        if code != Code.OK and code not in allow:
            raise CommandError.for_code(code, name)
        if code == Code.OK and len(pkt.content) < reply_len:
            raise UnexpectedReply(f"{name}: ACK has {len(pkt.content)} content bytes, expected {reply_len}")
        return pkt

    def _verify_password(self, quick: bool) -> None:
        self._command(Instruction.VFY_PWD, _u32(self.password, "password"), quick=quick)

    def _read_sys_para(self) -> SystemParameters:
        ack = self._command(Instruction.READ_SYS_PARA, reply_len=17)
        return SystemParameters.decode(ack.content[1:17])

    def _receive_bulk(self, what: str, expected: int | None = None) -> bytes:
        """Collect DATA packets until the END packet; iterative, size-capped, corruption-aware."""
        out = bytearray()
        rejected0, discarded0 = self._framer.rejected, self._framer.discarded
        packets = 0
        while True:
            deadline = time.monotonic() + BULK_GAP_S + self._wire_s(2 * 267)
            pkt = self._read_packet(deadline, f"{what} data packet {packets + 1}")
            if pkt.pid == Pid.ACK:
                # a duplicated or late ACK (seen on real modules, adafruit#31): not data
                log.debug("skipping ACK code=0x%02X inside %s data", pkt.code, what)
                continue
            if pkt.pid not in (Pid.DATA, Pid.END):
                raise UnexpectedReply(f"{what}: expected a data packet, got pid 0x{pkt.pid:02X}")
            out += pkt.content
            packets += 1
            if len(out) > self.max_bulk_bytes:
                raise UnexpectedReply(f"{what}: more than {self.max_bulk_bytes} bytes without an end packet")
            if pkt.pid == Pid.END:
                break
        lost = self._framer.discarded - discarded0
        if lost or self._framer.rejected != rejected0:
            raise UnexpectedReply(f"{what}: {lost} bytes lost in transit ({self._framer.last_reject}); "
                                f"received {len(out)} bytes in {packets} packets")
        if expected is not None and len(out) != expected:
            raise UnexpectedReply(f"{what}: received {len(out)} bytes, expected {expected}")
        log.debug("bulk %s bytes=%d packets=%d", what, len(out), packets)
        return bytes(out)

    def _send_bulk(self, data: bytes) -> None:
        size = self.params.packet_size if self.params else 128
        for frame in data_frames(data, size, self.address):
            self._write(frame)

    def _transaction(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` under the lock with the link ready."""
        with self._lock:
            self._ensure_ready()
            return fn()

    # --- system -----------------------------------------------------------------------------

    def handshake(self) -> bool:
        """Liveness probe (VfyPwd with the configured password); False on timeout."""
        try:
            self._transaction(lambda: self._verify_password(quick=False))
        except SensorTimeout:
            return False
        return True

    def verify_password(self, password: int | None = None) -> None:
        """VfyPwd; raises PasswordError(0x13) if wrong. A given password becomes the configured one."""
        if password is not None:
            _u32(password, "password")
            self.password = password
        self._transaction(lambda: self._verify_password(quick=False))

    def set_password(self, password: int) -> None:
        """SetPwd (takes effect at once); the driver keeps using the new password."""
        pw = _u32(password, "password")
        self._transaction(lambda: self._command(Instruction.SET_PWD, pw))
        self.password = password

    def read_system_parameters(self) -> SystemParameters:
        """ReadSysPara (and refresh `params`)."""
        def go() -> SystemParameters:
            self.params = self._read_sys_para()
            return self.params
        return self._transaction(go)

    def set_system_parameter(self, param: SysParam | int, value: int) -> None:
        """SetSysPara with the post-write busy window handled; use the typed setters below."""
        if param == SysParam.BAUD:
            self.set_baud(baud_from_n(value))
            return
        if not isinstance(value, int) or not 0 <= value <= 255:
            raise ValueError(f"SetSysPara value must be 0..255, got {value!r}")

        def go() -> None:
            self._command(Instruction.SET_SYS_PARA, bytes([int(param), value]))
            if not self._verify_after_change():
                raise SensorTimeout(f"sensor silent after SetSysPara({int(param)}, {value})")
            self.params = self._read_sys_para()
        self._transaction(go)

    def set_security_level(self, level: int) -> None:
        """Matching threshold 1 (most permissive) .. 5 (strictest)."""
        if not isinstance(level, int) or not 1 <= level <= 5:
            raise ValueError(f"security level must be 1..5, got {level!r}")
        self.set_system_parameter(SysParam.SECURITY, level)

    def set_packet_size(self, size: int) -> None:
        """Data packet payload size: 32, 64, 128 or 256 bytes."""
        if size not in PACKET_SIZES:
            raise ValueError(f"packet size must be one of {PACKET_SIZES}, got {size!r}")
        self.set_system_parameter(SysParam.PACKET_SIZE, PACKET_SIZES.index(size))

    def set_baud(self, baud: int) -> int:
        """Change the link rate; returns the rate in use afterwards (the old one if it did not take)."""
        n_from_baud(baud)
        return self._transaction(lambda: self._change_baud(baud))

    def template_count(self) -> int:
        """TemplateNum: number of stored templates."""
        ack = self._transaction(lambda: self._command(Instruction.TEMPLATE_NUM, reply_len=3))
        return struct.unpack(">H", ack.content[1:3])[0]

    def read_index_table(self, page: int) -> list[int]:
        """ReadIndexTable: used slot numbers in index page `page` (256 slots per page)."""
        if not isinstance(page, int) or not 0 <= page <= 3:
            raise ValueError(f"index page must be 0..3, got {page!r}")
        ack = self._transaction(lambda: self._command(Instruction.READ_INDEX_TABLE, bytes([page]),
                                                      reply_len=33))
        bitmap = ack.content[1:33]
        return [page * 256 + i * 8 + bit for i, byte in enumerate(bitmap) for bit in range(8)
                if byte >> bit & 1]

    def used_slots(self) -> list[int]:
        """All used library slots (reads as many index pages as the capacity needs)."""
        cap = self.params.capacity if self.params else 256
        pages = min(4, max(1, -(-cap // 256)))
        return [s for p in range(pages) for s in self.read_index_table(p)]

    def read_product_info(self) -> ProductInfo | None:
        """R503 ReadProdInfo, or None on models without it."""
        self._transaction(self._probe_product)
        return self.product

    def info(self) -> SensorInfo:
        """Model, capacity, templates stored, baud, packet size (for `rekam sensor info`)."""
        with self._lock:
            params = self.read_system_parameters()
            count = self.template_count()
            model = self.product.model if self.product else "EF01 (ZFM/R30x/AS608 class)"
            geom = str(self.geometry) if self.geometry else "256x288 or 192x192 (from image size)"
            return SensorInfo(model, params.capacity, count, self.baud, params.packet_size,
                              params.security_level, params.address, geom, self.port)

    def set_led(self, mode: LedMode | int, speed: int = 0x80, color: LedColor | int = LedColor.BLUE,
                count: int = 0) -> None:
        """R503 AuraLedConfig; UnsupportedCommand/PacketReceiveError on models without a ring."""
        for v, what in ((mode, "mode"), (speed, "speed"), (color, "colour"), (count, "count")):
            if not isinstance(v, int) or not 0 <= v <= 255:
                raise ValueError(f"LED {what} must be 0..255, got {v!r}")
        params = bytes([int(mode), speed, int(color), count])
        self._transaction(lambda: self._command(Instruction.AURA_LED_CONFIG, params))

    def read_notepad(self, page: int) -> bytes:
        """ReadNotepad: 32 bytes of user flash page 0..15 (e.g. a kit identifier)."""
        if not isinstance(page, int) or not 0 <= page <= 15:
            raise ValueError(f"notepad page must be 0..15, got {page!r}")
        ack = self._transaction(lambda: self._command(Instruction.READ_NOTEPAD, bytes([page]), reply_len=33))
        return bytes(ack.content[1:33])

    def write_notepad(self, page: int, data: bytes) -> None:
        """WriteNotepad: store up to 32 bytes (zero-padded) in user flash page 0..15."""
        if not isinstance(page, int) or not 0 <= page <= 15:
            raise ValueError(f"notepad page must be 0..15, got {page!r}")
        if not isinstance(data, bytes | bytearray) or len(data) > 32:
            raise ValueError(f"notepad data must be at most 32 bytes, got {type(data).__name__} "
                             f"{data[:40]!r}")
        params = bytes([page]) + bytes(data).ljust(32, b"\0")
        self._transaction(lambda: self._command(Instruction.WRITE_NOTEPAD, params))

    def random_number(self) -> int:
        """GetRandomCode: a 32-bit number from the module's hardware RNG."""
        ack = self._transaction(lambda: self._command(Instruction.GET_RANDOM_CODE, reply_len=5))
        return struct.unpack(">I", ack.content[1:5])[0]

    def set_address(self, address: int) -> None:
        """SetAdder: give the module a new address (its ACK already comes from the new one)."""
        new = _u32(address, "address")

        def go() -> None:
            # the command goes to the old address; the ACK comes from the new one, so accept any
            self._framer.address = None
            try:
                ack = self._command(Instruction.SET_ADDER, new)
            finally:
                self._framer.address = self.address
            if ack.address != address:
                log.warning("SetAdder ACK from 0x%08X, expected 0x%08X", ack.address, address)
            self.address = self._framer.address = address
        self._transaction(go)

    def check_sensor(self) -> bool:
        """R503 CheckSensor: True if the sensing array is fine (False on 0x29 sensor abnormal)."""
        ack = self._transaction(lambda: self._command(Instruction.CHECK_SENSOR,
                                                      allow=(Code.SENSOR_ABNORMAL,)))
        return ack.code == Code.OK

    def soft_reset(self) -> None:
        """R503 SoftRst: the module reboots (and emits a 0x55 byte, which the framer skips)."""
        def go() -> None:
            self._command(Instruction.SOFT_RST)
            time.sleep(self.settle_s)
            self._needs_sync = True
        self._transaction(go)

    # --- images -------------------------------------------------------------------------

    def capture_image(self, quality_check: bool = False) -> bool:
        """GenImg: True if a finger image is now in the image buffer, False if no finger.

        Raises CaptureFailed (0x03) when the finger moved or was removed during the capture. With
        `quality_check` (R503 GetImageEx) a poor image raises ImageQualityError (0x07) instead of
        passing as a capture.
        """
        instr = Instruction.GET_IMAGE_EX if quality_check else Instruction.GEN_IMG
        ack = self._transaction(lambda: self._command(instr, allow=(Code.NO_FINGER,)))
        return ack.code == Code.OK

    def upload_image(self) -> np.ndarray:
        """UpImage: the image buffer as an 8-bit array (256x288 or 192x192, 16 gray levels).

        A transfer damaged in transit is retried (`bulk_retries`) since the buffer is unchanged.
        """
        def go() -> np.ndarray:
            expected = self.geometry.packed_bytes if self.geometry else None
            for attempt in range(self.bulk_retries + 1):
                try:
                    self._command(Instruction.UP_IMAGE)
                    payload = self._receive_bulk("UpImage", expected)
                    break
                except (UnexpectedReply, SensorTimeout) as e:
                    if attempt == self.bulk_retries:
                        raise
                    log.warning("image upload damaged, retrying attempt=%d error=%s", attempt + 1, e)
            try:
                geometry = self.geometry or geometry_for_bytes(len(payload))
            except ValueError as e:
                raise UnexpectedReply(f"UpImage: {e}") from e
            self.geometry = geometry  # learned from the first image on modules without ReadProdInfo
            return unpack_4bit(payload, geometry)
        return self._transaction(go)

    def download_image(self, image: np.ndarray) -> None:
        """DownImage: put an 8-bit image (sensor geometry) into the image buffer (4-bit on the wire)."""
        payload = pack_4bit(image)
        if self.geometry and len(payload) != self.geometry.packed_bytes:
            raise ValueError(f"image must be {self.geometry} for this sensor, got "
                             f"{image.shape[1]}x{image.shape[0]}")
        geometry_for_bytes(len(payload))

        def go() -> None:
            self._command(Instruction.DOWN_IMAGE)
            self._send_bulk(payload)
        self._transaction(go)

    def wait_for_finger(self, timeout: float = 10.0, cancel: threading.Event | None = None,
                        poll_s: float = 0.1, touch: Touch | None = None) -> WaitResult:
        """Poll GenImg until a finger image is captured, `timeout` passes, or `cancel` is set.

        With `touch` (a callable returning True while touched, or an Event set by a GPIO edge
        callback) the UART stays quiet until the touch line says a finger is there.
        """
        end = time.monotonic() + timeout
        while True:
            if cancel is not None and cancel.is_set():
                return WaitResult.CANCELLED
            remaining = end - time.monotonic()
            if remaining <= 0:
                return WaitResult.TIMEOUT
            if touch is not None and not _touched(touch, min(poll_s, remaining)):
                if isinstance(touch, threading.Event):
                    continue  # already waited inside _touched
                _sleep(cancel, min(poll_s / 2, remaining))
                continue
            try:
                if self.capture_image():
                    return WaitResult.CAPTURED
            except CommandError as e:
                if e.code != Code.CAPTURE_FAILED:
                    raise
                log.info("capture failed (finger moved or lifted), polling again")
            _sleep(cancel, min(poll_s, max(0.0, end - time.monotonic())))

    def wait_for_lift(self, timeout: float = 10.0, cancel: threading.Event | None = None,
                      poll_s: float = 0.1, touch: Callable[[], bool] | None = None) -> WaitResult:
        """Poll until the finger is off the glass (GenImg says no finger, or `touch()` is False)."""
        end = time.monotonic() + timeout
        while True:
            if cancel is not None and cancel.is_set():
                return WaitResult.CANCELLED
            if time.monotonic() >= end:
                return WaitResult.TIMEOUT
            if touch is not None:
                if not touch():
                    return WaitResult.LIFTED
            else:
                try:
                    if not self.capture_image():
                        return WaitResult.LIFTED
                except CommandError as e:
                    if e.code != Code.CAPTURE_FAILED:
                        raise
            _sleep(cancel, min(poll_s, max(0.0, end - time.monotonic())))

    def capture(self, timeout: float = 10.0, cancel: threading.Event | None = None,
                poll_s: float = 0.1, touch: Touch | None = None) -> np.ndarray | None:
        """Wait for a finger and return its 8-bit image; None on timeout or cancel."""
        if self.wait_for_finger(timeout, cancel, poll_s, touch) is not WaitResult.CAPTURED:
            return None
        return self.upload_image()

    # --- templates and library -----------------------------------------------------------------

    def image_to_template(self, buffer: int = 1) -> None:
        """Img2Tz: features of the image buffer into a char buffer (ImageQualityError if unusable)."""
        b = _buffer_id(buffer)
        self._transaction(lambda: self._command(Instruction.IMG2TZ, b))

    def create_model(self) -> None:
        """RegModel: merge char buffers 1 and 2 (MergeFailed if they are different fingers)."""
        self._transaction(lambda: self._command(Instruction.REG_MODEL))

    def store(self, page: int, buffer: int = 1) -> None:
        """Store a char buffer into library slot `page`."""
        params = _buffer_id(buffer) + _u16(page, "page")
        self._transaction(lambda: self._command(Instruction.STORE, params))

    def load(self, page: int, buffer: int = 1) -> None:
        """LoadChar: library slot `page` into a char buffer."""
        params = _buffer_id(buffer) + _u16(page, "page")
        self._transaction(lambda: self._command(Instruction.LOAD_CHAR, params))

    def upload_template(self, buffer: int = 1) -> bytes:
        """UpChar: a char buffer's bytes (512 on R30x, 1536 on R503, whatever the module sends)."""
        b = _buffer_id(buffer)

        def go() -> bytes:
            for attempt in range(self.bulk_retries + 1):
                try:
                    self._command(Instruction.UP_CHAR, b)
                    return self._receive_bulk("UpChar")
                except (UnexpectedReply, SensorTimeout) as e:
                    if attempt == self.bulk_retries:
                        raise
                    log.warning("template upload damaged, retrying attempt=%d error=%s", attempt + 1, e)
            raise AssertionError("unreachable")
        return self._transaction(go)

    def download_template(self, data: bytes, buffer: int = 1) -> None:
        """DownChar: send template bytes into a char buffer (the module sends no ACK after the data)."""
        if not isinstance(data, bytes | bytearray) or not 0 < len(data) <= 4096:
            raise ValueError(f"template must be 1..4096 bytes, got {type(data).__name__} "
                             f"of {len(data) if hasattr(data, '__len__') else '?'}")
        b = _buffer_id(buffer)

        def go() -> None:
            self._command(Instruction.DOWN_CHAR, b)
            self._send_bulk(bytes(data))
        self._transaction(go)

    def search(self, buffer: int = 1, start: int = 0, count: int | None = None,
               high_speed: bool = False) -> SearchResult | None:
        """1:N search of a char buffer in slots [start, start+count); None when not found."""
        if count is None:
            count = self.params.capacity if self.params else 0xFFFF
        params = _buffer_id(buffer) + _u16(start, "start") + _u16(count, "count")
        instr = Instruction.HIGH_SPEED_SEARCH if high_speed else Instruction.SEARCH
        ack = self._transaction(lambda: self._command(instr, params, reply_len=5,
                                                      allow=(Code.NOT_FOUND, Code.LIBRARY_EMPTY)))
        if ack.code != Code.OK:
            return None
        page, score = struct.unpack(">HH", ack.content[1:5])
        return SearchResult(page, score)

    def match(self) -> MatchResult:
        """Match char buffer 1 against 2; a mismatch is a result (matched=False), not an error."""
        ack = self._transaction(lambda: self._command(Instruction.MATCH, reply_len=3, allow=(Code.NO_MATCH,)))
        score = struct.unpack(">H", ack.content[1:3])[0] if len(ack.content) >= 3 else 0
        return MatchResult(ack.code == Code.OK, score)

    def delete(self, page: int, count: int = 1) -> None:
        """DeletChar: remove `count` templates starting at slot `page`."""
        params = _u16(page, "page") + _u16(count, "count")
        self._transaction(lambda: self._command(Instruction.DELETE_CHAR, params))

    def empty(self) -> None:
        """Empty: clear the whole library."""
        self._transaction(lambda: self._command(Instruction.EMPTY))

    def enroll(self, page: int, timeout: float = 15.0, cancel: threading.Event | None = None,
               poll_s: float = 0.1) -> WaitResult:
        """Two-impression enrolment into `page`: capture, lift, capture, RegModel, Store."""
        for buf in (1, 2):
            r = self.wait_for_finger(timeout, cancel, poll_s)
            if r is not WaitResult.CAPTURED:
                return r
            self.image_to_template(buf)
            if buf == 1:
                r = self.wait_for_lift(timeout, cancel, poll_s)
                if r is not WaitResult.LIFTED:
                    return r
        self.create_model()
        self.store(page, 1)
        return WaitResult.CAPTURED


def _name(instruction: int) -> str:
    try:
        return Instruction(instruction).name
    except ValueError:
        return f"instruction 0x{instruction:02X}"


def _touched(touch: Touch, wait_s: float) -> bool:
    if isinstance(touch, threading.Event):
        return touch.wait(wait_s)
    return bool(touch())


def _sleep(cancel: threading.Event | None, seconds: float) -> None:
    if seconds <= 0:
        return
    if cancel is not None:
        cancel.wait(seconds)
    else:
        time.sleep(seconds)
