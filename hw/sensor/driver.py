"""`FingerprintSensor`: the command API of EF01 sensors (ZFM-20, R305/R307, AS608, R503) over a link.

The link (`hw.sensor.link.SensorLink`) owns the serial port, its reopen after an unplug, the baud
search and framed I/O with deadlines. This module is the commands: start-up (parameters, security
level, product info, raising the baud), images, templates, the library, LED, notepad, finger waits.
Errors are typed (`hw.sensor.protocol`) while "no finger", "no match" and "not found" are plain
results; one lock per transaction so several threads may share a sensor.

A little over 600 lines on purpose: one short method per EF01 command; splitting them by theme
would scatter one API over several files.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from hw.sensor.image import GEOMETRIES, Geometry, geometry_for_bytes, pack_4bit, unpack_4bit
from hw.sensor.link import (
    COMMON_BAUDS,
    DEFAULT_BAUD,
    DEFAULT_PORT,
    MAX_BULK_BYTES,
    UPCHAR_BUDGET_BYTES,
    BulkSizeError,
    SensorLink,
    u32,
)
from hw.sensor.protocol import (
    DEFAULT_ADDRESS,
    PACKET_SIZES,
    Code,
    CommandError,
    Instruction,
    Packet,
    PacketReceiveError,
    SensorTimeout,
    SysParam,
    UnexpectedReply,
    UnsupportedCommand,
    baud_from_n,
    n_from_baud,
)
from hw.sensor.results import (
    LedColor,
    LedMode,
    MatchResult,
    ProductInfo,
    SearchResult,
    SensorInfo,
    SystemParameters,
    WaitResult,
)

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

__all__ = [  # the result types live in hw.sensor.results; importing them from here keeps working
    "FingerprintSensor", "LedColor", "LedMode", "MatchResult", "ProductInfo", "SearchResult", "SensorInfo",
    "SystemParameters", "Touch", "WaitResult",
]


Touch = Callable[[], bool] | threading.Event


def _u16(v: int, what: str) -> bytes:
    if not isinstance(v, int) or not 0 <= v <= 0xFFFF:
        raise ValueError(f"{what} must be an integer 0..65535, got {v!r}")
    return struct.pack(">H", v)


def _buffer_id(b: int) -> bytes:
    if not isinstance(b, int) or not 1 <= b <= 6:
        raise ValueError(f"char buffer must be 1..6 (1 or 2 on ZFM/R30x), got {b!r}")
    return bytes([b])



class FingerprintSensor:
    """An EF01-protocol fingerprint sensor on a serial port.

    ``FingerprintSensor("/dev/serial0").open()`` finds the sensor (trying the common baud rates),
    verifies the password, reads the system parameters and raises the link to `target_baud`.
    Every public method is one locked transaction; after the port disappears, calls raise
    `SensorUnavailable` until a reopen (attempted on a call, with `reopen_backoff` = (lo, hi)
    seconds of `firmware.system.backoff.Backoff` between failed attempts) succeeds.
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
        if security_level is not None and security_level not in range(1, 6):
            raise ValueError(f"security level must be 1..5, got {security_level!r}")
        if target_baud is not None:
            n_from_baud(target_baud)
        self.link = SensorLink(port, baud, password=password, address=address, auto_baud=auto_baud,
                               baud_candidates=baud_candidates, settle_s=settle_s,
                               reopen_backoff=reopen_backoff, max_bulk_bytes=max_bulk_bytes)
        self.target_baud = target_baud
        self.bulk_retries = bulk_retries
        self.security_level = security_level
        self.params: SystemParameters | None = None
        self.product: ProductInfo | None = None
        self.geometry: Geometry | None = None
        # True once an image's byte count showed `geometry`; until then (ReadProdInfo's word) it is only a hint
        self._geometry_seen = False
        self._product_problem = ""  # what was wrong with ReadProdInfo's reply (warned once per distinct problem)
        self._lock = threading.RLock()

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

    @property
    def port(self) -> str:
        """The serial port path (or pyserial URL)."""
        return self.link.port

    @property
    def baud(self) -> int:
        """The link rate in use (after the baud search and any raise)."""
        return self.link.baud

    @property
    def password(self) -> int:
        """The module password the driver verifies with."""
        return self.link.password

    @property
    def address(self) -> int:
        """The module address (change it with `set_address`)."""
        return self.link.address

    # --- lifecycle -----------------------------------------------------------------------

    def open(self) -> SystemParameters:
        """Connect: open the port, find the baud, verify the password, read parameters, raise the baud."""
        with self._lock:
            try:
                self.link.connect(self._setup)
            except BaseException:
                self.link.close()  # do not keep the port (and its exclusive lock) after a failed open
                raise
            assert self.params is not None
            return self.params

    def close(self) -> None:
        """Close the port (a later call reopens it)."""
        with self._lock:
            self.link.close()

    def __enter__(self) -> FingerprintSensor:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def is_open(self) -> bool:
        """Whether the serial port is open now."""
        return self.link.is_open

    def _setup(self) -> None:
        """Start-up after the link found the baud: parameters, security level, product, baud raise."""
        self.params = self._read_sys_para()
        if self.params.address != self.address:
            log.warning("sensor address mismatch configured=0x%08X reported=0x%08X",
                        self.address, self.params.address)
        if self.security_level and self.params.security_level != self.security_level:
            self.link.command(Instruction.SET_SYS_PARA, bytes([SysParam.SECURITY, self.security_level]))
            if not self.link.verify_after_change():
                raise SensorTimeout("sensor silent after setting the security level")
            self.params = self._read_sys_para()
            log.info("security level set level=%d", self.security_level)
        self.geometry, self._geometry_seen = None, False  # re-learned: the module may have been swapped
        self._probe_product()
        if self.target_baud and self.target_baud > self.baud:
            self._raise_baud(self.target_baud)
        p = self.params
        log.info("sensor ready port=%s baud=%d capacity=%d packet=%d security=%d model=%s",
                 self.port, self.baud, p.capacity, p.packet_size, p.security_level,
                 self.product.model if self.product else "EF01")

    def _raise_baud(self, target: int) -> None:
        try:
            self._change_baud(target)
        except CommandError as e:
            log.warning("sensor refused baud change target=%d error=%s", target, e)

    def _change_baud(self, target: int) -> int:
        rate = self.link.change_baud(target)
        if rate == target:
            self.params = self._read_sys_para()
        return rate

    def _probe_product(self) -> None:
        """ReadProdInfo: the model, and its image size as a hint until an image confirms it.

        No answer, or one that does not decode: the product is unknown (a decoding problem is warned about once)
        and the sensor opens as one without ReadProdInfo, with ReadSysPara's parameters, learning its geometry
        from the first image.
        """
        try:
            ack = self.link.command(Instruction.READ_PROD_INFO, quick=True, reply_len=47)
        except (UnsupportedCommand, PacketReceiveError, SensorTimeout, UnexpectedReply):
            self.product = None  # not an R503-class module (or no usable answer); not an error
            return
        try:
            product = ProductInfo.decode(ack.content[1:])
        except (UnexpectedReply, ValueError, struct.error) as e:
            # inside the try: a reply of another length must not stop the sensor from opening (nor make every
            # later transaction rerun the start-up and fail the same way)
            self.product = None
            problem = str(e)
            if problem != self._product_problem:
                self._product_problem = problem
                log.warning("sensor product info unusable, model unknown error=%s (opening without it; image "
                            "size learned from the first image)", problem)
            return
        self.product = product
        g = Geometry(product.width, product.height)
        if self._geometry_seen:
            pass  # an image already showed the geometry: it outranks what the module says about itself
        elif g in GEOMETRIES:
            self.geometry = g
        else:  # learn it from the first image's byte count
            log.info("ReadProdInfo geometry %s not a known UART image size; learning it from an image", g)

    def _command(self, instruction: int, params: bytes = b"", *, reply_len: int = 1,
                 allow: Iterable[int] = ()) -> Packet:
        return self.link.command(instruction, params, reply_len=reply_len, allow=allow)

    def _read_sys_para(self) -> SystemParameters:
        ack = self.link.command(Instruction.READ_SYS_PARA, reply_len=17)
        return SystemParameters.decode(ack.content[1:17])

    def _send_bulk(self, data: bytes) -> None:
        self.link.send_bulk(data, self.params.packet_size if self.params else 128)

    def _transaction(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` under the lock with the link ready (opened, reopened or re-checked as needed)."""
        with self._lock:
            self.link.ensure(self._setup)
            return fn()

    # --- system -----------------------------------------------------------------------------

    def handshake(self) -> bool:
        """Liveness probe (VfyPwd with the configured password); False on timeout."""
        try:
            self._transaction(lambda: self.link.verify_password(quick=False))
        except SensorTimeout:
            return False
        return True

    def verify_password(self, password: int | None = None) -> None:
        """VfyPwd; raises PasswordError(0x13) if wrong. A given password becomes the configured one."""
        if password is not None:
            u32(password, "password")
            self.link.password = password
        self._transaction(lambda: self.link.verify_password(quick=False))

    def set_password(self, password: int) -> None:
        """SetPwd (takes effect at once); the driver keeps using the new password."""
        pw = u32(password, "password")
        self._transaction(lambda: self._command(Instruction.SET_PWD, pw))
        self.link.password = password

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
            if not self.link.verify_after_change():
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
        new = u32(address, "address")

        def go() -> None:
            # the command goes to the old address; the ACK comes from the new one, so accept any
            framer = self.link.framer
            framer.address = None
            try:
                ack = self._command(Instruction.SET_ADDER, new)
            finally:
                framer.address = self.address
            if ack.address != address:
                log.warning("SetAdder ACK from 0x%08X, expected 0x%08X", ack.address, address)
            self.link.address = address
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
            time.sleep(self.link.settle_s)
            self.link.needs_sync = True
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

    def _packet_size(self) -> int:
        """The module's data packet size (the smallest, 32, when unknown: the most generous deadline)."""
        return self.params.packet_size if self.params else 32

    def upload_image(self) -> np.ndarray:
        """UpImage: the image buffer as an 8-bit array (256x288 or 192x192, 16 gray levels).

        A transfer damaged in transit is retried (`bulk_retries`) since the buffer is unchanged. The geometry
        is the one the image's byte count shows: ReadProdInfo's is only a hint until then, and an image of
        another known size than before makes the driver forget the old one and learn it again.
        """
        def go() -> np.ndarray:
            for attempt in range(self.bulk_retries + 1):
                # only a geometry an image showed bounds the transfer (and its deadline): one stated by
                # ReadProdInfo may be wrong, and then would refuse every image
                expected = self.geometry.packed_bytes if self.geometry and self._geometry_seen else None
                try:
                    self._command(Instruction.UP_IMAGE)
                    payload = self.link.receive_bulk("UpImage", expected, packet_size=self._packet_size(),
                                                     budget=max(g.packed_bytes for g in GEOMETRIES))
                    break
                except BulkSizeError as e:
                    # another size than the last image's: re-learn from the retry's (or next call's) byte count
                    self._geometry_seen = False
                    if attempt == self.bulk_retries:
                        raise
                    log.warning("image size changed, re-learning the geometry believed=%s attempt=%d error=%s",
                                self.geometry, attempt + 1, e)
                except (UnexpectedReply, SensorTimeout) as e:
                    if attempt == self.bulk_retries:
                        raise
                    log.warning("image upload damaged, retrying attempt=%d error=%s", attempt + 1, e)
            try:
                geometry = geometry_for_bytes(len(payload))
            except ValueError as e:
                raise UnexpectedReply(f"UpImage: {e}") from e
            if self.geometry is not None and geometry != self.geometry:
                log.warning("sensor image size does not match the geometry believed geometry=%s image=%s "
                            "(ReadProdInfo or an earlier image); using the image's", self.geometry, geometry)
            self.geometry, self._geometry_seen = geometry, True
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
                    return self.link.receive_bulk("UpChar", packet_size=self._packet_size(),
                                                  budget=UPCHAR_BUDGET_BYTES)
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

