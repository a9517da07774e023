"""`SensorLink`: the serial link to an EF01 sensor, below the command API of `hw.sensor.driver`.

It owns the port (pyserial, opened exclusively), its reopen after the device vanished (on the next
call, on the schedule of `firmware.system.backoff.Backoff`), the baud search and the baud change,
and framed I/O with deadlines: one command and its ACK (resend once, skip late replies of earlier
commands, re-verify the password after a module reboot, typed error for a failure code) and bulk
transfers of data packets (size-capped, corruption-aware). It is not thread-safe on its own: the
driver serialises transactions with its lock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import serial

try:
    from termios import error as _TermiosError
except ImportError:  # not POSIX
    class _TermiosError(Exception):  # type: ignore[no-redef]
        pass

from firmware.system.backoff import Backoff
from hw.sensor.protocol import (
    DEFAULT_ADDRESS,
    Code,
    CommandError,
    Framer,
    Instruction,
    Packet,
    Pid,
    SensorError,
    SensorTimeout,
    SensorUnavailable,
    SysParam,
    UnexpectedReply,
    command_frame,
    data_frames,
    n_from_baud,
)

log = logging.getLogger(__name__)

DEFAULT_PORT = "/dev/serial0"
DEFAULT_BAUD = 57600
# What pyserial lets escape when the device vanishes (USB-TTL pulled, pty closed): SerialException,
# OSError (EIO), termios.error from tcflush/tcsetattr, TypeError when its fd was closed under it.
PORT_ERRORS = (serial.SerialException, OSError, TypeError, _TermiosError)
COMMON_BAUDS = (57600, 115200, 9600, 19200, 38400)
READ_SLICE_S = 0.02  # serial read timeout: short, the deadline is enforced around it
MAX_BULK_BYTES = 128 * 1024  # larger than any image or template; stops a runaway stream
BULK_GAP_S = 0.5  # max silence between two data packets
# A whole bulk transfer must end within BULK_WIRE_FACTOR x its wire time (frame overhead included)
# + BULK_GAP_S + BULK_MARGIN_S: a device trickling 1-byte packets just inside the gap cannot keep an
# UpImage going for hours. Real modules stream at (close to) the wire rate; 2x leaves room for a slow UART.
BULK_WIRE_FACTOR = 2.0
BULK_MARGIN_S = 1.0
MAX_BULK_STRAY = 8  # non-data frames (duplicated or late ACKs) tolerated inside one transfer
UPCHAR_BUDGET_BYTES = 4096  # deadline basis for a template of unknown size (largest known: 1536, R503)
# A noisy line can produce hundreds of stale frames a second (~480/s at 57600 baud): the first is logged in
# full, the rest as one count at most every this many seconds, so journald is not flooded.
STALE_LOG_INTERVAL_S = 60.0

# Processing allowance per instruction, seconds (wire time is added on top).
_PROCESSING_S: dict[int, float] = {
    Instruction.GEN_IMG: 1.5, Instruction.GET_IMAGE_EX: 1.5, Instruction.IMG2TZ: 1.0,
    Instruction.SEARCH: 2.0, Instruction.HIGH_SPEED_SEARCH: 2.0, Instruction.REG_MODEL: 1.0,
    Instruction.STORE: 2.0, Instruction.DELETE_CHAR: 2.0, Instruction.EMPTY: 2.0,
    Instruction.SET_SYS_PARA: 2.0, Instruction.SET_PWD: 2.0, Instruction.SET_ADDER: 2.0,
    Instruction.WRITE_NOTEPAD: 2.0, Instruction.LOAD_CHAR: 1.0, Instruction.SOFT_RST: 1.0,
}
_DEFAULT_PROCESSING_S = 0.5
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


class BulkSizeError(UnexpectedReply):
    """A bulk transfer intact but of another length than expected (more bytes, or fewer before its end)."""


def instruction_name(instruction: int) -> str:
    """The instruction's name for messages and logs (``instruction 0x..`` when unknown)."""
    try:
        return Instruction(instruction).name
    except ValueError:
        return f"instruction 0x{instruction:02X}"


def u32(v: int, what: str) -> bytes:
    """`v` as a big-endian u32 parameter; ValueError naming `what` if out of range."""
    if not isinstance(v, int) or not 0 <= v <= 0xFFFFFFFF:
        raise ValueError(f"{what} must be an integer 0..0xFFFFFFFF, got {v!r}")
    return v.to_bytes(4, "big")


class SensorLink:
    """The serial link to one EF01 module: port, reopen schedule, baud, framed I/O with deadlines.

    `connect(setup)` opens the port if needed, finds the baud and runs the caller's `setup` (read
    parameters, raise the baud...); `ensure(setup)` does the same only when the link is closed or
    must be re-checked (`needs_sync`), honouring the reopen backoff after a failure.
    """

    def __init__(
        self,
        port: str = DEFAULT_PORT,
        baud: int = DEFAULT_BAUD,
        *,
        password: int = 0,
        address: int = DEFAULT_ADDRESS,
        auto_baud: bool = True,
        baud_candidates: Iterable[int] = COMMON_BAUDS,
        settle_s: float = 0.3,
        reopen_backoff: tuple[float, float] = (0.5, 10.0),
        max_bulk_bytes: int = MAX_BULK_BYTES,
    ) -> None:
        n_from_baud(baud)  # validates
        u32(password, "password")
        u32(address, "address")
        self.port = port
        self.baud = baud
        self.password = password
        self.framer = Framer(address)
        self._address = address
        self.auto_baud = auto_baud
        self.baud_candidates = tuple(baud_candidates)
        self.settle_s = settle_s
        self.reopen_backoff = reopen_backoff
        self.reopen = Backoff(*reopen_backoff)
        self.max_bulk_bytes = max_bulk_bytes
        self.ser: serial.SerialBase | None = None
        self.unavailable_reason = ""
        # the module must be re-checked (baud search, VfyPwd) before the next command
        self.needs_sync = True
        self.stale_log_interval_s = STALE_LOG_INTERVAL_S
        self.stale_skipped = 0  # stale frames skipped since the port was created (all of them, logged or not)
        self._stale_pending = 0  # skipped since the last line logged about them
        self._stale_logged_at: float | None = None  # when that line was logged (None: none in the last window)

    @property
    def address(self) -> int:
        """The module address commands go to and replies must come from."""
        return self._address

    @address.setter
    def address(self, value: int) -> None:
        """Change the address; the framer accepts only replies from the new one."""
        u32(value, "address")
        self._address = self.framer.address = value

    @property
    def is_open(self) -> bool:
        """Whether the serial port is open now."""
        return self.ser is not None

    # --- port and reopen ---------------------------------------------------------------

    def open_port(self, baud: int) -> None:
        """Open the port at `baud`; SensorUnavailable if it cannot be opened."""
        try:
            self.ser = serial.serial_for_url(self.port, baudrate=baud, timeout=READ_SLICE_S,
                                             write_timeout=10.0, exclusive=True)
        except (serial.SerialException, OSError, ValueError) as e:
            self.ser = None
            raise SensorUnavailable(f"cannot open sensor port {self.port}: {e}") from e
        self.framer.reset()
        log.info("sensor port opened port=%s baud=%d", self.port, baud)

    def close(self) -> None:
        """Close the port (a later `ensure` reopens it); never raises."""
        ser, self.ser = self.ser, None
        self.needs_sync = True
        self._flush_stale(force=True)  # the count of a flood that ended with the port is not lost
        if ser is not None:
            try:
                ser.close()
            except (serial.SerialException, OSError):
                pass

    def lost(self, exc: BaseException) -> SensorUnavailable:
        """The port failed under us: close it, allow a reopen at once, return the error to raise."""
        self.close()
        self.unavailable_reason = f"{type(exc).__name__}: {exc}"
        self.reopen.reset()  # first reopen attempt on the very next call
        log.warning("sensor port lost port=%s error=%s", self.port, self.unavailable_reason)
        return SensorUnavailable(f"sensor port {self.port} lost: {self.unavailable_reason}")

    def connect(self, setup: Callable[[], None]) -> None:
        """Open the port if closed, find the baud, then run `setup` (the driver's start-up commands)."""
        if self.ser is None:
            self.open_port(self.baud)
        self.needs_sync = False
        try:
            self.find_baud()
            setup()
        except SensorError:
            self.needs_sync = True
            raise
        self.reopen.reset()
        self.unavailable_reason = ""

    def ensure(self, setup: Callable[[], None]) -> None:
        """`connect(setup)` if the link is closed or must be re-checked, honouring the reopen backoff.

        A failure that leaves the port closed (or unopenable) raises SensorUnavailable and delays the
        next attempt (``Backoff(*reopen_backoff)``); other SensorErrors propagate as they are.
        """
        if self.ser is not None and not self.needs_sync:
            return
        if self.ser is None and not self.reopen.ready():
            raise SensorUnavailable(
                f"sensor on {self.port} unavailable ({self.unavailable_reason or 'not opened'}); "
                f"next reopen attempt in {self.reopen.wait_s():.1f} s")
        try:
            self.connect(setup)
        except SensorError as e:
            if self.ser is None or isinstance(e, SensorUnavailable):
                self.close()
                self.unavailable_reason = str(e)
                self.reopen.next()
                raise SensorUnavailable(str(e)) from e
            raise

    # --- baud ---------------------------------------------------------------------------

    def set_host_baud(self, baud: int) -> None:
        """Change the host side's rate only (the module is not told)."""
        assert self.ser is not None
        try:
            self.ser.baudrate = baud
        except PORT_ERRORS as e:
            raise self.lost(e) from e

    def find_baud(self) -> None:
        """VfyPwd at the configured baud, then at the other common rates; `baud` is the one that answered."""
        order = [self.baud] + ([b for b in self.baud_candidates if b != self.baud] if self.auto_baud else [])
        last: SensorTimeout | UnexpectedReply | None = None
        for b in order:
            if self.ser is not None and self.ser.baudrate != b:
                self.set_host_baud(b)
            try:
                self.verify_password(quick=True)
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

    def change_baud(self, target: int) -> int:
        """SetSysPara(baud) and follow it; returns the rate in use afterwards (the old one if it did not take)."""
        old = self.baud
        n = n_from_baud(target)
        self.command(Instruction.SET_SYS_PARA, bytes([SysParam.BAUD, n]))
        self.set_host_baud(target)
        if self.verify_after_change():
            self.baud = target
            log.info("link raised old_baud=%d baud=%d", old, target)
            return target
        # Many modules apply the new rate only after a power cycle: go back and check.
        self.set_host_baud(old)
        if self.verify_after_change():
            log.warning("baud change did not take effect now old_baud=%d target=%d "
                        "(module will use it after a power cycle; auto-baud will find it)", old, target)
            return old
        raise SensorTimeout(f"sensor silent at {target} and {old} baud after a baud change")

    def verify_after_change(self) -> bool:
        """Wait out the post-SetSysPara busy window, then VfyPwd until answered or 1.5 s."""
        time.sleep(self.settle_s)
        end = time.monotonic() + 1.5
        while True:
            try:
                self.verify_password(quick=True)
                return True
            except (SensorTimeout, UnexpectedReply):
                if time.monotonic() >= end:
                    return False

    def verify_password(self, quick: bool) -> None:
        """VfyPwd with the configured password (PasswordError 0x13 if wrong)."""
        self.command(Instruction.VFY_PWD, u32(self.password, "password"), quick=quick)

    # --- framed I/O ----------------------------------------------------------------------

    def wire_s(self, nbytes: int) -> float:
        """Seconds `nbytes` take on the wire at the current baud (8N1: 10 bits a byte)."""
        return nbytes * 10 / self.baud

    def write(self, frame: bytes) -> None:
        """Send bytes; SensorTimeout if the port does not take them, SensorUnavailable if it is gone."""
        assert self.ser is not None
        log.debug("tx %s", frame.hex(" "))
        try:
            self.ser.write(frame)
        except serial.SerialTimeoutException as e:
            raise SensorTimeout(f"write to {self.port} timed out") from e
        except PORT_ERRORS as e:
            raise self.lost(e) from e

    def read_packet(self, deadline: float, what: str) -> Packet:
        """The next valid frame, or SensorTimeout at `deadline` (a `time.monotonic` value)."""
        ser = self.ser
        assert ser is not None
        framer = self.framer
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
                raise self.lost(e) from e
            if data:
                framer.feed(data)

    def _read_ack(self, deadline: float, name: str, instruction: int = -1, reply_len: int = 1) -> Packet:
        """Wait for this command's ACK.

        Gives up early when the reply arrived damaged (rejected, then silence), and skips an ACK
        that cannot be this command's (a code it never returns, or an OK shorter than its results):
        that is a late reply to an earlier command.
        """
        plausible = _PLAUSIBLE.get(instruction)
        rejected0 = self.framer.rejected
        while True:
            try:
                pkt = self.read_packet(min(deadline, time.monotonic() + 0.1), name)
            except SensorTimeout:
                fr = self.framer
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
                self._note_stale(name, code, len(pkt.content))
                continue
            self._flush_stale()
            return pkt

    def _note_stale(self, name: str, code: int, length: int) -> None:
        """Log a skipped stale frame: in full if none was logged in the last `stale_log_interval_s`, else counted
        into the next summary."""
        self.stale_skipped += 1
        now = time.monotonic()
        self._flush_stale(now)
        if self._stale_logged_at is None:
            log.warning("skipping a reply that is not for this command command=%s code=0x%02X len=%d (a late "
                        "reply to an earlier command, or line noise; more are counted every %.1f s)",
                        name, code, length, self.stale_log_interval_s)
            self._stale_logged_at = now
        else:
            self._stale_pending += 1
            log.debug("skipping stale reply command=%s code=0x%02X len=%d", name, code, length)

    def _flush_stale(self, now: float | None = None, *, force: bool = False) -> None:
        """Once `stale_log_interval_s` has passed since the last stale-frame line (or `force`): log the count
        skipped since (if any), and after a quiet window let the next stale frame be logged in full again."""
        if self._stale_logged_at is None:
            return
        now = time.monotonic() if now is None else now
        window = now - self._stale_logged_at
        if window < self.stale_log_interval_s and not force:
            return
        if self._stale_pending:
            log.warning("skipped stale replies count=%d window_s=%.1f port=%s (late replies or line noise)",
                        self._stale_pending, window, self.port)
            self._stale_pending, self._stale_logged_at = 0, now
        else:
            self._stale_logged_at = None

    def flush_input(self) -> None:
        """Drop whatever the port and the framer hold (before a command, so old bytes cannot answer it)."""
        assert self.ser is not None
        try:
            self.ser.reset_input_buffer()
        except PORT_ERRORS as e:
            raise self.lost(e) from e
        self.framer.reset()

    def command(self, instruction: int, params: bytes = b"", *, quick: bool = False,
                reply_len: int = 1, allow: Iterable[int] = (), _reverified: bool = False) -> Packet:
        """Send one command and return its ACK; raise the typed error for a failure code.

        `allow` lists non-zero codes that are results, not errors (no finger, not found...).
        `quick` uses a short deadline (probing at a possibly wrong baud).
        """
        if self.ser is None:
            raise SensorUnavailable(f"sensor port {self.port} is not open")
        name = instruction_name(instruction)
        frame = command_frame(instruction, params, self.address)
        processing = 0.3 if quick else _PROCESSING_S.get(instruction, _DEFAULT_PROCESSING_S)
        retries = 0 if quick or instruction in _NOT_RETRIED else 1
        for attempt in range(retries + 1):
            self.flush_input()
            self.write(frame)
            deadline = time.monotonic() + processing + 2 * self.wire_s(len(frame) + 11 + reply_len)
            try:
                pkt = self._read_ack(deadline, name, instruction, reply_len)
                break
            except (SensorTimeout, UnexpectedReply) as e:
                if attempt == retries:
                    if not quick:
                        # unanswered even after a resend: re-check the link (baud search, VfyPwd)
                        # on the next call; cheap (one VfyPwd) when the module is fine
                        self.needs_sync = True
                    raise
                log.warning("no valid reply, resending command=%s error=%s", name, e)
        code = pkt.code
        if (code == Code.PASSWORD_REQUIRED and instruction != Instruction.VFY_PWD and self.password
                and not _reverified):
            # the module rebooted and forgot the verification: verify and retry once
            log.info("module asks for the password again (rebooted?); verifying command=%s", name)
            self.verify_password(quick=False)
            return self.command(instruction, params, quick=quick, reply_len=reply_len, allow=allow,
                                _reverified=True)
        if code != Code.OK and code not in allow:
            raise CommandError.for_code(code, name)
        if code == Code.OK and len(pkt.content) < reply_len:
            raise UnexpectedReply(f"{name}: ACK has {len(pkt.content)} content bytes, expected {reply_len}")
        return pkt

    def bulk_deadline_s(self, nbytes: int, packet_size: int = 128) -> float:
        """Seconds a bulk transfer of `nbytes` in packets of `packet_size` may take in all, at the current baud."""
        packets = -(-max(nbytes, 1) // max(packet_size, 1))
        return BULK_WIRE_FACTOR * self.wire_s(nbytes + 11 * packets) + BULK_GAP_S + BULK_MARGIN_S

    def receive_bulk(self, what: str, expected: int | None = None, *, packet_size: int = 128,
                     budget: int | None = None) -> bytes:
        """Collect DATA packets until the END packet; iterative, size-capped, time-capped, corruption-aware.

        The whole transfer has a deadline (`bulk_deadline_s` of `expected`, else of `budget`, else of the
        size cap) on top of the gap allowed between two packets; non-data frames inside it are skipped up
        to `MAX_BULK_STRAY`, then refused. Raises SensorTimeout or UnexpectedReply.
        """
        out = bytearray()
        rejected0, discarded0 = self.framer.rejected, self.framer.discarded
        packets = strays = 0
        allowed = self.bulk_deadline_s(expected or budget or self.max_bulk_bytes, packet_size)
        end = time.monotonic() + allowed
        while True:
            now = time.monotonic()
            if now >= end:
                raise SensorTimeout(f"{what}: transfer not finished within {allowed:.1f} s "
                                    f"({len(out)} bytes in {packets} packets)")
            deadline = min(end, now + BULK_GAP_S + self.wire_s(2 * 267))
            try:
                pkt = self.read_packet(deadline, f"{what} data packet {packets + 1}")
            except SensorTimeout as e:
                if time.monotonic() >= end:
                    raise SensorTimeout(f"{what}: transfer not finished within {allowed:.1f} s "
                                        f"({len(out)} bytes in {packets} packets)") from e
                raise
            if pkt.pid == Pid.ACK:
                # a duplicated or late ACK (seen on real modules, adafruit#31): not data; a few at most
                strays += 1
                if strays > MAX_BULK_STRAY:
                    raise UnexpectedReply(f"{what}: {strays} ACK frames inside the data (at most {MAX_BULK_STRAY})")
                log.debug("skipping ACK code=0x%02X inside %s data", pkt.code, what)
                continue
            if pkt.pid not in (Pid.DATA, Pid.END):
                raise UnexpectedReply(f"{what}: expected a data packet, got pid 0x{pkt.pid:02X}")
            out += pkt.content
            packets += 1
            if len(out) > self.max_bulk_bytes:
                raise UnexpectedReply(f"{what}: more than {self.max_bulk_bytes} bytes without an end packet")
            if expected is not None and len(out) > expected:
                raise BulkSizeError(f"{what}: more than the {expected} bytes expected")
            if pkt.pid == Pid.END:
                break
        lost = self.framer.discarded - discarded0
        if lost or self.framer.rejected != rejected0:
            raise UnexpectedReply(f"{what}: {lost} bytes lost in transit ({self.framer.last_reject}); "
                                  f"received {len(out)} bytes in {packets} packets")
        if expected is not None and len(out) != expected:
            raise BulkSizeError(f"{what}: received {len(out)} bytes, expected {expected}")
        log.debug("bulk %s bytes=%d packets=%d", what, len(out), packets)
        return bytes(out)

    def send_bulk(self, data: bytes, packet_size: int) -> None:
        """Send a bulk payload as DATA packets of `packet_size` bytes, the last one END (no ACK follows)."""
        for frame in data_frames(data, packet_size, self.address):
            self.write(frame)
