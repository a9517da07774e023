"""Command handlers of the simulated sensor: what the module does with each instruction.

`CommandHandlers` is mixed into `SensorSimulator` (hw.sensor.simulator.device): the handlers read
and change the module state the device holds (declared below) and answer through the device's
`_reply`, which applies wire timing and faults. One handler per instruction, ``_cmd_<name>``,
found by name from `Instruction`; an instruction without one is answered as unsupported.
"""

from __future__ import annotations

import logging
import struct
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from hw.sensor.image import pack_4bit, unpack_4bit
from hw.sensor.protocol import PACKET_SIZES, Code, Packet, Pid, baud_from_n
from hw.sensor.protocol import Instruction as I  # noqa: N817
from hw.sensor.simulator import conditions
from hw.sensor.simulator.templates import (
    SECURITY_THRESHOLDS,
    extract_features,
    image_key,
    image_quality,
    match_score,
    merge_templates,
)

if TYPE_CHECKING:
    from hw.sensor import synth
    from hw.sensor.profiles import SensorProfile
    from hw.sensor.simulator.faults import Faults
    from hw.sensor.simulator.state import Finger, SimStats

log = logging.getLogger(__name__)


class CommandHandlers:
    """The instruction handlers of `SensorSimulator`; see the module docstring."""

    # module state, owned and initialised by the device
    profile: SensorProfile
    faults: Faults
    stats: SimStats
    bank: synth.FingerBank
    time_scale: float
    wire_speed: float
    sensor_baud: int
    baud_apply: str
    security: int
    packet_size: int
    password: int
    address: int
    capacity: int
    pw_verified: bool
    image: np.ndarray | None
    image_key: str | None
    image_noise: float
    chars: dict[int, bytes | None]
    library: dict[int, bytes]
    notepad: list[bytes]
    led: tuple[int, int, int, int] | None
    _flash: dict[str, Any]
    _finger: Finger | None
    _rng: np.random.Generator
    _busy_until: float
    _rx_bulk: tuple[str, int, bytearray] | None

    # device services (SensorSimulator implements them)
    def _reply(self, code: int, payload: bytes = b"", data: bytes | None = None) -> None:
        raise NotImplementedError

    def _sleep(self, seconds: float) -> None:
        raise NotImplementedError

    def _process(self, seconds: float) -> None:
        raise NotImplementedError

    def _emit_later(self, data: bytes, delay: float) -> None:
        raise NotImplementedError

    def _reset_volatile(self) -> None:
        raise NotImplementedError

    def _save_flash(self) -> None:
        raise NotImplementedError

    def _on_packet(self, pkt: Packet) -> None:
        if self._rx_bulk is not None:
            if pkt.pid in (Pid.DATA, Pid.END):
                self._on_bulk_data(pkt)
                return
            log.debug("sim: command during a host bulk transfer, transfer abandoned")
            self._rx_bulk = None
        if pkt.pid != Pid.COMMAND:
            return
        # wire time of the host's frame
        self._sleep(len(pkt.to_bytes()) * 10.0 / self.sensor_baud * self.wire_speed)
        instr, params = pkt.content[0], pkt.content[1:]
        self.stats.commands += 1
        try:
            name = I(instr).name
        except ValueError:
            name = f"0x{instr:02X}"
        self.stats.by_instruction[name] = self.stats.by_instruction.get(name, 0) + 1
        if self.faults.take("error_ack_next"):
            self._reply(Code.PACKET_ERROR)
            return
        if not self.profile.supports(instr):
            self._reply(self.profile.unsupported_code)
            return
        if not self.pw_verified and instr != I.VFY_PWD:
            self._reply(Code.PASSWORD_REQUIRED)
            return
        handler = getattr(self, f"_cmd_{name.lower()}", None)
        if handler is None:
            self._reply(self.profile.unsupported_code)
            return
        try:
            handler(params)
        except (IndexError, struct.error):
            self._reply(Code.PACKET_ERROR)  # parameters too short for the instruction

    def _on_bulk_data(self, pkt: Packet) -> None:
        target, buf_id, buf = self._rx_bulk  # type: ignore[misc]
        self._sleep(len(pkt.to_bytes()) * 10.0 / self.sensor_baud * self.wire_speed)
        buf += pkt.content
        if len(buf) > 128 * 1024:
            self._rx_bulk = None
            return
        if pkt.pid != Pid.END:
            return
        self._rx_bulk = None
        data = bytes(buf)
        if target == "char":
            self.chars[buf_id] = data
        else:
            g = self.profile.geometry
            if len(data) != g.packed_bytes:
                log.debug("sim: DownImage of %d bytes ignored (want %d)", len(data), g.packed_bytes)
                self.image = None
                return
            self.image = unpack_4bit(data, g)
            self.image_key = image_key(self.image)
            self.image_noise = 0.3

    def _capture(self, ex: bool) -> None:
        finger = self._finger
        if finger is None:
            self._process(self.profile.no_finger_s)
            self._reply(Code.NO_FINGER)
            return
        if self.faults.take("capture_removed_next"):
            self._process(self.profile.capture_s / 2)
            self._finger = None
            self._reply(Code.CAPTURE_FAILED)
            return
        t0 = time.monotonic()
        if finger.image is not None:
            img, key, noise = finger.image, finger.key, 0.3
        else:
            moved = finger.quality == "moved"  # rendered good, then smeared as the finger slid
            imp = self.bank.impression(finger.key, self.profile.geometry, "good" if moved else finger.quality,
                                       self._rng)
            img, key, noise = imp.image, imp.key, imp.noise
            if moved:
                img, noise = conditions.moved(img, self._rng), 0.65
        self._process(max(0.0, self.profile.capture_s - (time.monotonic() - t0) / max(self.time_scale, 1e-9)))
        self.image, self.image_key, self.image_noise = img, key, noise
        self.stats.captures += 1
        if ex:
            frac, contrast = image_quality(img)
            if frac < 0.3 or contrast < 30:
                self._reply(Code.TOO_FEW_FEATURES)
                return
        self._reply(Code.OK)

    def _cmd_gen_img(self, p: bytes) -> None:
        self._capture(ex=False)

    def _cmd_get_image_ex(self, p: bytes) -> None:
        self._capture(ex=True)

    def _cmd_up_image(self, p: bytes) -> None:
        if self.image is None:
            self._reply(Code.IMAGE_UPLOAD_ERROR)
            return
        self._reply(Code.OK, data=pack_4bit(self.image))

    def _cmd_down_image(self, p: bytes) -> None:
        self._reply(Code.OK)
        self._rx_bulk = ("image", 0, bytearray())

    def _buf(self, b: int) -> int:
        # ZFM/R30x: any id other than 1 means buffer 2; the R503 has 1..6
        if self.profile.name == "r503":
            return b if 1 <= b <= 6 else 2
        return 1 if b == 1 else 2

    def _cmd_img2tz(self, p: bytes) -> None:
        buf = self._buf(p[0])
        self._process(self.profile.img2tz_s)
        if self.image is None or self.image_key is None:
            self._reply(Code.NO_VALID_IMAGE)
            return
        frac, contrast = image_quality(self.image)
        if frac < 0.35:
            self._reply(Code.TOO_FEW_FEATURES)
            return
        if contrast < 30:
            self._reply(Code.TOO_MESSY)
            return
        self.chars[buf] = extract_features(self.image, self.image_key, self.image_noise, frac,
                                           self.profile.template_size)
        self._reply(Code.OK)

    def _cmd_reg_model(self, p: bytes) -> None:
        self._process(0.1)
        merged = merge_templates(self.chars.get(1), self.chars.get(2), self.profile.template_size,
                                 SECURITY_THRESHOLDS[self.security])
        if merged is None:
            self._reply(Code.MERGE_FAILED)
            return
        self.chars[1] = self.chars[2] = merged
        self._reply(Code.OK)

    def _cmd_match(self, p: bytes) -> None:
        self._process(0.05)
        score = match_score(self.chars.get(1), self.chars.get(2))
        ok = score >= SECURITY_THRESHOLDS[self.security]
        self._reply(Code.OK if ok else Code.NO_MATCH, struct.pack(">H", score))

    def _search(self, p: bytes) -> None:
        buf = self._buf(p[0])
        start, count = struct.unpack(">HH", p[1:5])
        self._process(self.profile.search_s)
        probe = self.chars.get(buf)
        best, best_page = 0, 0
        for page in range(start, min(start + count, self.capacity)):
            t = self.library.get(page)
            if t is None:
                continue
            s = match_score(probe, t)
            if s > best:
                best, best_page = s, page
        if best >= SECURITY_THRESHOLDS[self.security]:
            self._reply(Code.OK, struct.pack(">HH", best_page, best))
        else:
            self._reply(Code.NOT_FOUND, struct.pack(">HH", 0, 0))

    _cmd_search = _search
    _cmd_high_speed_search = _search

    def _cmd_store(self, p: bytes) -> None:
        buf = self._buf(p[0])
        (page,) = struct.unpack(">H", p[1:3])
        self._process(self.profile.flash_write_s)
        if page >= self.capacity:
            self._reply(Code.BAD_LOCATION)
        elif self.faults.library_full:
            self._reply(Code.LIBRARY_FULL)
        elif self.faults.take("flash_fail_next"):
            self._reply(Code.FLASH_ERROR)
        elif self.chars.get(buf) is None:
            self._reply(Code.TEMPLATE_EMPTY if self.profile.name == "r503" else Code.PACKET_ERROR)
        else:
            self.library[page] = self.chars[buf]  # type: ignore[assignment]
            self._save_flash()
            self._reply(Code.OK)

    def _cmd_load_char(self, p: bytes) -> None:
        buf = self._buf(p[0])
        (page,) = struct.unpack(">H", p[1:3])
        self._process(0.05)
        if page >= self.capacity:
            self._reply(Code.BAD_LOCATION)
        elif page not in self.library:
            self._reply(Code.TEMPLATE_READ_ERROR)
        else:
            self.chars[buf] = self.library[page]
            self._reply(Code.OK)

    def _cmd_up_char(self, p: bytes) -> None:
        data = self.chars.get(self._buf(p[0]))
        if data is None:
            self._reply(Code.TEMPLATE_UPLOAD_ERROR)
            return
        self._reply(Code.OK, data=data)

    def _cmd_down_char(self, p: bytes) -> None:
        buf = self._buf(p[0])
        self._reply(Code.OK)
        self._rx_bulk = ("char", buf, bytearray())

    def _cmd_delete_char(self, p: bytes) -> None:
        page, n = struct.unpack(">HH", p[0:4])
        self._process(self.profile.flash_write_s)
        if n == 0 or page + n > self.capacity:
            self._reply(Code.DELETE_FAILED)
            return
        for k in range(page, page + n):
            self.library.pop(k, None)
        self._save_flash()
        self._reply(Code.OK)

    def _cmd_empty(self, p: bytes) -> None:
        self._process(self.profile.flash_write_s * 2)
        self.library.clear()
        self._save_flash()
        self._reply(Code.OK)

    def _cmd_template_num(self, p: bytes) -> None:
        self._reply(Code.OK, struct.pack(">H", len(self.library)))

    def _cmd_read_index_table(self, p: bytes) -> None:
        page = p[0]
        if page > 3:
            self._reply(Code.BAD_NOTEPAD_PAGE)
            return
        bitmap = bytearray(32)
        for slot in self.library:
            if page * 256 <= slot < page * 256 + 256:
                i = slot - page * 256
                bitmap[i // 8] |= 1 << (i % 8)
        self._reply(Code.OK, bytes(bitmap))

    def _status(self) -> int:
        return (4 if self.pw_verified else 0) | (8 if self.image is not None else 0)

    def _cmd_read_sys_para(self, p: bytes) -> None:
        table = struct.pack(">HHHHIHH", self._status(), self.profile.system_id, self.capacity, self.security,
                            self.address, PACKET_SIZES.index(self.packet_size), self.sensor_baud // 9600)
        self._reply(Code.OK, table)

    def _cmd_set_sys_para(self, p: bytes) -> None:
        reg, value = p[0], p[1]
        if reg == 4:
            if value not in self.profile.allowed_baud_n:
                self._reply(Code.BAD_REGISTER_CONFIG)
                return
            self._reply(Code.OK)  # at the old rate
            self._flash["baud_n"] = value
            if self.baud_apply == "immediate":
                self.sensor_baud = baud_from_n(value)
        elif reg == 5:
            if not 1 <= value <= 5:
                self._reply(Code.BAD_REGISTER_CONFIG)
                return
            self._reply(Code.OK)
            self._flash["security"] = self.security = value
        elif reg == 6:
            if value > 3:
                self._reply(Code.BAD_REGISTER_CONFIG)
                return
            self._reply(Code.OK)
            self._flash["packet_code"] = value
            self.packet_size = PACKET_SIZES[value]
        else:
            self._reply(Code.INVALID_REGISTER)
            return
        self._save_flash()
        self._busy_until = time.monotonic() + self.faults.busy_after_set_s * self.time_scale

    def _cmd_vfy_pwd(self, p: bytes) -> None:
        (pw,) = struct.unpack(">I", p[0:4])
        if pw == self.password:
            self.pw_verified = True
            self._reply(Code.OK)
        else:
            self._reply(Code.WRONG_PASSWORD)

    def _cmd_set_pwd(self, p: bytes) -> None:
        (pw,) = struct.unpack(">I", p[0:4])
        self._process(self.profile.flash_write_s)
        self._flash["password"] = self.password = pw
        self._save_flash()
        self._reply(Code.OK)

    def _cmd_set_adder(self, p: bytes) -> None:
        (addr,) = struct.unpack(">I", p[0:4])
        self._flash["address"] = self.address = addr
        self._save_flash()
        self._reply(Code.OK)  # already from the new address

    def _cmd_get_random_code(self, p: bytes) -> None:
        self._reply(Code.OK, struct.pack(">I", int(self._rng.integers(0, 2**32))))

    def _cmd_write_notepad(self, p: bytes) -> None:
        page = p[0]
        if page > 15 or len(p) < 33:
            self._reply(Code.BAD_NOTEPAD_PAGE)
            return
        self.notepad[page] = bytes(p[1:33])
        self._reply(Code.OK)

    def _cmd_read_notepad(self, p: bytes) -> None:
        page = p[0]
        if page > 15:
            self._reply(Code.BAD_NOTEPAD_PAGE)
            return
        self._reply(Code.OK, self.notepad[page])

    def _cmd_get_echo(self, p: bytes) -> None:
        self._reply(Code.ECHO_OK)

    def _cmd_handshake(self, p: bytes) -> None:
        self._reply(Code.OK)

    def _cmd_check_sensor(self, p: bytes) -> None:
        self._reply(Code.OK)

    def _cmd_aura_led_config(self, p: bytes) -> None:
        self.led = (p[0], p[1], p[2], p[3])
        self._reply(Code.OK)

    def _cmd_read_prod_info(self, p: bytes) -> None:
        g = self.profile.geometry
        width, height = self.faults.prod_info_geometry or (g.width, g.height)

        def pad(s: str, n: int) -> bytes:
            return s.encode("ascii")[:n].ljust(n, b"\0")

        info = (pad(self.profile.model, 16) + pad("SIM1", 4) + pad("00000001", 8) + bytes([1, 2])
                + pad(self.profile.sensor_type, 8)
                + struct.pack(">HHHH", width, height, self.profile.template_size, self.capacity))
        self._reply(Code.OK, info + self.faults.prod_info_extra)

    def _cmd_soft_rst(self, p: bytes) -> None:
        self._reply(Code.OK)
        self._reset_volatile()
        self._emit_later(b"\x55", 0.1)

