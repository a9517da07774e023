"""A simulated EF01 fingerprint sensor on a pseudo-terminal.

The driver opens the pty's slave path with pyserial exactly as it would open /dev/serial0. The
simulator thread reads the master side, parses frames with the same framer as the driver, and
answers like the chosen model (`profiles`): confirmation codes, ACK lengths, bulk transfers in the
configured packet size, busy window after SetSysPara, 0x55 after power-up and SoftRst.

Wire time: a pty has no bit timing, so each reply frame is delayed by its wire time at the
sensor's baud (``bytes * 10 / baud * wire_speed``), on an absolute schedule so the pacing does not
drift. The baud the driver set on the slave is read back with ``tcgetattr(master)``; when it
differs from the sensor's rate, traffic in both directions is garbled (as on a real wire).

Templates are opaque bytes to the host. The simulator's template format (documented in
docs/sensor.md) carries a magic, the finger's key digest and a 256-value feature vector (the
finger's identity vector plus per-impression noise); matching scores are the cosine between
vectors, scaled to the 0..300 range of real modules. This is not minutiae matching: it models the
outcomes (same finger matches, different fingers do not, poor impressions score lower).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import select
import struct
import termios
import threading
import time
import tty
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hw.sensor import synth
from hw.sensor.image import pack_4bit, unpack_4bit
from hw.sensor.profiles import SensorProfile, get_profile
from hw.sensor.protocol import (
    DEFAULT_ADDRESS,
    PACKET_SIZES,
    Code,
    Framer,
    Packet,
    Pid,
    baud_from_n,
    build_frame,
    n_from_baud,
)
from hw.sensor.protocol import Instruction as I  # noqa: N817

log = logging.getLogger(__name__)

TEMPLATE_MAGIC = b"RKS1"
SECURITY_THRESHOLDS = {1: 30, 2: 40, 3: 50, 4: 65, 5: 80}  # Match/Search score needed per level
_BAUD_CONST = {getattr(termios, f"B{b}"): b for b in (
    1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600)
    if hasattr(termios, f"B{b}")}


@dataclass
class Faults:
    """Fault knobs. Counters (`*_next`) apply to that many upcoming events, then reset themselves."""

    corrupt_checksum_next: int = 0  # reply frames sent with a wrong checksum
    drop_bytes_next: int = 0  # reply frames that lose `drop_count` bytes in the middle
    drop_count: int = 3
    stray_bytes_next: int = 0  # replies preceded by `stray_payload`
    stray_payload: bytes = b"\x55"
    duplicate_ack_next: int = 0  # ACKs sent twice (adafruit#31)
    late_ack_next: int = 0  # replies preceded by a late ACK of an earlier command (code `late_ack_code`)
    late_ack_code: int = 0x02
    error_ack_next: int = 0  # commands answered with a short 0x01 ACK
    no_reply_next: int = 0  # commands left unanswered
    dead: bool = False  # answer nothing at all
    reply_delay_s: float = 0.0  # added before every reply (slow sensor)
    busy_after_set_s: float = 0.5  # input ignored after SetSysPara (scaled by time_scale)
    capture_removed_next: int = 0  # GenImg with a finger returns 03 (finger removed mid-capture)
    library_full: bool = False  # Store returns 0x1F
    flash_fail_next: int = 0  # Store returns 0x18
    corrupt_data_next: int = 0  # bulk uploads with one damaged data packet
    bulk_gap_s: float = 0.0  # extra silence between data packets


@dataclass
class _Char:
    """A char buffer / library entry: the opaque template bytes as the host sees them."""

    data: bytes


@dataclass
class _Finger:
    key: str
    quality: str
    image: np.ndarray | None = None  # a fixed image (present_image)


@dataclass
class SimStats:
    """Counters a test or demo can look at."""

    commands: int = 0
    replies: int = 0
    bad_frames: int = 0
    garbled_bytes: int = 0
    dropped_output: int = 0
    captures: int = 0
    by_instruction: dict[str, int] = field(default_factory=dict)


def _sum16(b: bytes) -> int:
    return sum(b) & 0xFFFF


def encode_template(key: str, vector: np.ndarray, size: int, kind: int = 2, quality: int = 200) -> bytes:
    """Simulator template: magic, key digest, kind, quality, int8 vector, opaque filler, sum16."""
    if size < 16 + synth.FEATURE_DIM:
        raise ValueError(f"template size {size} too small for the simulator format "
                         f"(>= {16 + synth.FEATURE_DIM})")
    v = np.clip(np.round(vector / (np.abs(vector).max() or 1) * 127), -127, 127).astype(np.int8)
    head = TEMPLATE_MAGIC + hashlib.sha256(key.encode()).digest()[:8] + bytes([kind, quality]) + v.tobytes()
    filler = bytearray()
    seed = hashlib.sha256(head).digest()
    while len(head) + len(filler) < size - 2:
        seed = hashlib.sha256(seed).digest()
        filler += seed
    body = head + bytes(filler[:size - 2 - len(head)])
    return body + struct.pack(">H", _sum16(body))


def decode_template(data: bytes) -> tuple[bytes, np.ndarray] | None:
    """(key digest, unit feature vector) of a simulator template, or None if it is not one."""
    if len(data) < 16 + synth.FEATURE_DIM or data[:4] != TEMPLATE_MAGIC:
        return None
    if struct.unpack(">H", data[-2:])[0] != _sum16(data[:-2]):
        return None
    v = np.frombuffer(data[14:14 + synth.FEATURE_DIM], dtype=np.int8).astype(np.float32)
    n = np.linalg.norm(v)
    return (data[4:12], v / n) if n else None


def match_score(a: bytes | None, b: bytes | None) -> int:
    """0..300 score between two templates (0 if either is not a valid simulator template)."""
    da = decode_template(a) if a else None
    db = decode_template(b) if b else None
    if da is None or db is None:
        return 0
    c = float(np.dot(da[1], db[1]))
    return int(round(max(0.0, c - 0.3) / 0.7 * 300))


def image_quality(img: np.ndarray) -> tuple[float, float]:
    """(fraction of 16x16 blocks with ridges, median ridge contrast of those blocks), from pixels."""
    h, w = img.shape
    bh, bw = h // 16, w // 16
    blocks = img[:bh * 16, :bw * 16].astype(np.float32).reshape(bh, 16, bw, 16).swapaxes(1, 2)
    std = blocks.std(axis=(2, 3))
    mean = blocks.mean(axis=(2, 3))
    fg = (std > 25) & (mean < 215)
    frac = float(fg.mean())
    contrast = float(np.median(std[fg])) if fg.any() else 0.0
    return frac, contrast


class SensorSimulator:
    """An EF01 sensor on a pty. Start it, hand `port` (or `link`) to the driver, drive it from tests.

    Control API (thread-safe): `present_finger`, `lift_finger`, `present_image`, `set_auto_finger`,
    `power_cycle`, `set_sensor_baud` (baud-mismatch fault), `unplug`/`replug`, `faults`.
    """

    def __init__(
        self,
        profile: str | SensorProfile = "r307",
        *,
        corpus_dir: str | Path | None = None,
        wire_speed: float = 1.0,
        time_scale: float = 1.0,
        seed: int = 0,
        password: int = 0,
        address: int = DEFAULT_ADDRESS,
        baud: int = 57600,
        packet_size: int = 128,
        security: int = 3,
        capacity: int | None = None,
        library_path: str | Path | None = None,
        link: str | Path | None = None,
        auto_present: bool = False,
        baud_apply: str = "immediate",
        power_on_byte: bool = True,
        bank: synth.FingerBank | None = None,
    ) -> None:
        self.profile = profile if isinstance(profile, SensorProfile) else get_profile(profile)
        if baud_apply not in ("immediate", "power_cycle"):
            raise ValueError(f"baud_apply must be 'immediate' or 'power_cycle', got {baud_apply!r}")
        if packet_size not in PACKET_SIZES:
            raise ValueError(f"packet size must be one of {PACKET_SIZES}, got {packet_size}")
        n_from_baud(baud)
        self.wire_speed = wire_speed
        self.fifo_bytes = 32  # bytes handed to the host at a time when wire timing is on
        self.time_scale = time_scale
        self.faults = Faults()
        self.stats = SimStats()
        self.bank = bank or synth.FingerBank(corpus_dir)
        self.link = Path(link) if link else None
        self.library_path = Path(library_path) if library_path else None
        self.baud_apply = baud_apply
        self.power_on_byte = power_on_byte
        self._rng = np.random.default_rng(seed)
        # "flash": survives power cycles
        self._flash = {
            "baud_n": n_from_baud(baud), "security": security, "packet_code": PACKET_SIZES.index(packet_size),
            "password": password, "address": address,
            "capacity": capacity or self.profile.capacity,
        }
        self.library: dict[int, bytes] = {}
        self.notepad = [bytes(32) for _ in range(16)]
        self._load_flash()
        self.led: tuple[int, int, int, int] | None = None
        self._lock = threading.RLock()
        self._fault_lock = threading.Lock()
        self._finger: _Finger | None = None
        self._auto_key: tuple[str, int] | None = None
        self.auto_present = auto_present
        self.auto_hold_s = 1.2
        self.auto_gap_s = 1.5
        self._auto_changed = time.monotonic()
        self._demo_index = 0
        self._auto_next: str | None = None
        self._warming = False
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._master = -1
        self._slave = -1
        self.port = ""
        self._reset_volatile()

    @classmethod
    def from_config(cls, section: Mapping[str, Any], corpus_dir: str | Path | None, **overrides: Any
                    ) -> SensorSimulator:
        """A simulator matching a `[sensor]` config section (profile, password, address); for `--sim`.

        The module starts at 57600 like a factory module; the driver raises it to target_baud.
        """
        kw: dict[str, Any] = {"corpus_dir": corpus_dir}
        for k in ("password", "address"):
            if k in section:
                kw[k] = section[k]
        kw.update(overrides)
        return cls(section.get("profile", "r307"), **kw)

    # --- lifecycle ------------------------------------------------------------------------

    def _reset_volatile(self) -> None:
        f = self._flash
        self.sensor_baud = baud_from_n(f["baud_n"])
        self.security = f["security"]
        self.packet_size = PACKET_SIZES[f["packet_code"]]
        self.password = f["password"]
        self.address = f["address"]
        self.capacity = f["capacity"]
        self.pw_verified = self.password == 0
        self.image: np.ndarray | None = None
        self.image_key: str | None = None
        self.image_noise = 0.3
        self.chars: dict[int, bytes | None] = {i: None for i in range(1, 7)}
        self._busy_until = 0.0
        self._rx_bulk: tuple[str, int, bytearray] | None = None
        self._framer = Framer(address=None)

    def start(self) -> SensorSimulator:
        """Create the pty, start the sensor thread, emit the power-up byte. Returns self."""
        self._open_pty()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="sensor-sim", daemon=True)
        self._thread.start()
        if self.power_on_byte:
            self._emit_later(b"\x55", 0.05)
        log.info("sensor simulator started profile=%s port=%s link=%s baud=%d", self.profile.name,
                 self.port, self.link, self.sensor_baud)
        return self

    def stop(self) -> None:
        """Stop the thread and close the pty (and remove the link)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._close_pty()
        self._save_flash()

    def __enter__(self) -> SensorSimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _open_pty(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)  # at once: bytes written before the driver opens must not be cooked
        tty.setraw(master)
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        self.port = os.ttyname(slave)
        if self.link:
            tmp = self.link.with_name(self.link.name + ".tmp")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            tmp.symlink_to(self.port)
            os.replace(tmp, self.link)

    def _close_pty(self) -> None:
        for fd in (self._master, self._slave):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._master = self._slave = -1
        if self.link and self.link.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                self.link.unlink()

    def unplug(self) -> None:
        """Emulate pulling the USB-TTL adapter: the port vanishes (driver reads fail)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._close_pty()
        log.info("sensor simulator unplugged")

    def replug(self) -> None:
        """Plug back in: a new pty (new path; `link` follows it) and a power-up."""
        with self._lock:
            self._reset_volatile()
            self._finger = None
        self.start()

    def power_cycle(self) -> None:
        """Reboot the module: volatile state lost, pending flash settings (baud) applied, 0x55 sent."""
        with self._lock:
            self._reset_volatile()
        if self.power_on_byte:
            self._emit_later(b"\x55", 0.05)

    # --- control API --------------------------------------------------------------------------

    def present_finger(self, resident_id: str, finger: int = 0, quality: str = "good") -> None:
        """Put a finger on the glass. `resident_id` ``corpus:<name>`` uses a real corpus print."""
        if quality not in synth.QUALITIES:
            raise ValueError(f"quality must be one of {synth.QUALITIES}, got {quality!r}")
        key = synth.finger_key(resident_id, finger)
        with self._lock:
            self._finger = _Finger(key, quality)
        if not key.startswith(synth.CORPUS_PREFIX):
            self.bank.master(key)  # grow it now, not during the first GenImg

    def present_image(self, image: np.ndarray, key: str | None = None) -> None:
        """Put a fixed image on the glass (gray, sensor geometry); identity = its content digest."""
        a = np.asarray(image)
        g = self.profile.geometry
        if a.shape != (g.height, g.width) or a.dtype != np.uint8:
            raise ValueError(f"image must be uint8 {g.height}x{g.width} (rows x cols) for "
                             f"{self.profile.model}, "
                             f"got {a.dtype} {a.shape}")
        q = unpack_4bit(pack_4bit(a), g)
        with self._lock:
            self._finger = _Finger(key or _image_key(q), "good", q)

    def lift_finger(self) -> None:
        """Take the finger off the glass."""
        with self._lock:
            self._finger = None
            self._auto_changed = time.monotonic()

    @property
    def finger_present(self) -> bool:
        """Whether a finger is on the glass now."""
        return self._finger is not None

    def set_auto_finger(self, resident_id: str | None, finger: int = 0) -> None:
        """Auto mode's finger (None: cycle through demo residents and the corpus fingers)."""
        if resident_id is not None:
            synth.finger_key(resident_id, finger)
        with self._lock:
            self._auto_key = (resident_id, finger) if resident_id is not None else None
            self._auto_next = None

    def set_sensor_baud(self, baud: int) -> None:
        """Force the module's UART rate without telling the driver (baud-mismatch fault)."""
        n_from_baud(baud)
        with self._lock:
            self.sensor_baud = baud

    def host_baud(self) -> int | None:
        """The baud the driver configured on the slave side (None if unknown)."""
        try:
            speed = termios.tcgetattr(self._master)[5]
        except (termios.error, OSError):
            return None
        return _BAUD_CONST.get(speed)

    def _take(self, name: str) -> bool:
        with self._fault_lock:
            n = getattr(self.faults, name)
            if n > 0:
                setattr(self.faults, name, n - 1)
                return True
            return False

    # --- flash persistence ---------------------------------------------------------------------

    def _load_flash(self) -> None:
        if not self.library_path or not self.library_path.exists():
            return
        try:
            doc = json.loads(self.library_path.read_text())
            self._flash.update({k: int(v) for k, v in doc.get("params", {}).items()})
            self.library = {int(k): bytes.fromhex(v) for k, v in doc.get("library", {}).items()}
        except (ValueError, OSError) as e:
            log.warning("simulated flash unreadable path=%s error=%s (starting empty)", self.library_path, e)

    def _save_flash(self) -> None:
        if not self.library_path:
            return
        doc = {"params": self._flash, "library": {str(k): v.hex() for k, v in sorted(self.library.items())}}
        tmp = self.library_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.library_path)

    # --- I/O thread -------------------------------------------------------------------------

    def _run(self) -> None:
        master = self._master
        while not self._stop.is_set():
            try:
                r, _, _ = select.select([master], [], [], 0.05)
            except (OSError, ValueError):
                return
            self._auto_tick()
            if not r:
                continue
            try:
                data = os.read(master, 65536)
            except BlockingIOError:
                continue
            except OSError:
                return  # pty closed under us
            if not data:
                continue
            self._on_bytes(data)

    def _auto_tick(self) -> None:
        """Auto mode: the finger comes and goes on its own (demos)."""
        if not self.auto_present:
            return
        now = time.monotonic()
        with self._lock:
            if self._finger is None and now - self._auto_changed >= self.auto_gap_s * self.time_scale:
                if self._auto_next is None:
                    resident, finger = self._auto_key or self._next_demo_finger()
                    self._auto_next = synth.finger_key(resident, finger)
                key = self._auto_next
                if not self.bank.has_master(key):
                    # grow it off the I/O thread: a GenImg must not wait for it
                    if not self._warming:
                        self._warming = True
                        threading.Thread(target=self._warm, args=(key,), daemon=True).start()
                    return
                self._auto_next = None
                self._finger = _Finger(key, "good")
                self._auto_changed = now
            elif self._finger is not None and now - self._auto_changed >= self.auto_hold_s * self.time_scale:
                self._finger = None
                self._auto_changed = now

    def _warm(self, key: str) -> None:
        try:
            self.bank.master(key)
        finally:
            self._warming = False

    def _next_demo_finger(self) -> tuple[str, int]:
        corpus = self.bank.corpus_fingers()
        i = self._demo_index
        self._demo_index += 1
        if corpus and i % 3 == 2:
            return corpus[(i // 3) % len(corpus)], 0
        return f"demo-{i // 10 % 50:03d}", i % 10

    def _on_bytes(self, data: bytes) -> None:
        host = self.host_baud()
        if host is not None and host != self.sensor_baud:
            self.stats.garbled_bytes += len(data)
            data = _garble(data)
        if time.monotonic() < self._busy_until:
            log.debug("sim busy, ignoring %d bytes", len(data))
            return
        fr = self._framer
        rejected = fr.rejected
        fr.feed(data)
        while True:
            pkt = fr.next_packet()
            if fr.rejected != rejected:
                rejected = fr.rejected
                self.stats.bad_frames += 1
                if fr.last_reject.startswith("checksum") and self._rx_bulk is None:
                    self._reply(Code.PACKET_ERROR)  # the documented answer to a bad frame
            if pkt is None:
                break
            if pkt.address != self.address:
                log.debug("sim: frame for address 0x%08X ignored", pkt.address)
                continue
            self._on_packet(pkt)

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._stop.wait(seconds)

    def _process(self, seconds: float) -> None:
        self._sleep(seconds * self.time_scale)

    def _write(self, data: bytes) -> None:
        """Write to the master without ever blocking for long (a real UART does not wait)."""
        host = self.host_baud()
        if host is not None and host != self.sensor_baud:
            data = _garble(data)
        view = memoryview(data)
        end = time.monotonic() + 1.0
        while view and not self._stop.is_set():
            try:
                n = os.write(self._master, view)
                view = view[n:]
                continue
            except BlockingIOError:
                pass
            except OSError:
                return
            if time.monotonic() > end:
                self.stats.dropped_output += len(view)
                log.debug("sim: host not reading, %d bytes lost", len(view))
                return
            select.select([], [self._master], [], 0.05)

    def _send_paced(self, frames: list[bytes], gap_s: float = 0.0, delay_s: float = 0.0) -> None:
        """Send frames at the sensor baud: each `fifo_bytes` chunk after its wire time (absolute schedule).

        Chunks, not whole frames, because a host UART hands bytes over a FIFO-load at a time, so
        the driver sees partial frames as on real hardware.
        """
        t = time.monotonic() + delay_s
        per_byte = 10.0 / self.sensor_baud * self.wire_speed
        if per_byte == 0:
            self._sleep(delay_s)
            for f in frames:
                if gap_s:
                    self._sleep(gap_s)
                self._write(f)
            return
        step = self.fifo_bytes
        for f in frames:
            t += gap_s
            for i in range(0, len(f), step):
                chunk = f[i:i + step]
                t += len(chunk) * per_byte
                delay = t - time.monotonic()
                if delay > 0:
                    self._sleep(delay)
                if self._stop.is_set():
                    return
                self._write(chunk)

    def _emit_later(self, data: bytes, delay: float) -> None:
        def go() -> None:
            self._sleep(delay * self.time_scale)
            if not self._stop.is_set() and self._master >= 0:
                self._write(data)
        threading.Thread(target=go, daemon=True).start()

    # --- replies --------------------------------------------------------------------------------

    def _ack_frame(self, code: int, payload: bytes = b"") -> bytes:
        return build_frame(Pid.ACK, bytes([code]) + payload, self.address)

    def _mangle(self, frame: bytes) -> bytes:
        if self._take("corrupt_checksum_next"):
            frame = frame[:-1] + bytes([frame[-1] ^ 0x5A])
        if self._take("drop_bytes_next"):
            mid = len(frame) // 2
            frame = frame[:mid] + frame[mid + self.faults.drop_count:]
        if self._take("stray_bytes_next"):
            frame = self.faults.stray_payload + frame
        return frame

    def _reply(self, code: int, payload: bytes = b"", data: bytes | None = None) -> None:
        """Send an ACK (and, for uploads, the data packets) with faults and wire timing applied."""
        if self.faults.dead or self._take("no_reply_next"):
            return
        self.stats.replies += 1
        frames = [self._mangle(self._ack_frame(code, payload))]
        if self._take("late_ack_next"):
            frames.insert(0, self._ack_frame(self.faults.late_ack_code))
        if self._take("duplicate_ack_next"):
            frames.append(self._ack_frame(code, payload))
        if data is not None:
            chunks = [data[i:i + self.packet_size] for i in range(0, len(data), self.packet_size)]
            damaged = len(chunks) // 2 if self._take("corrupt_data_next") else -1
            for k, c in enumerate(chunks):
                f = build_frame(Pid.END if k == len(chunks) - 1 else Pid.DATA, c, self.address)
                if k == damaged:
                    f = f[:20] + bytes([f[20] ^ 0xFF]) + f[21:]
                frames.append(self._mangle(f) if k == damaged else f)
        n_acks = 2 if len(frames) > 1 and frames[1][6] == Pid.ACK else 1
        self._send_paced(frames[:n_acks], delay_s=self.faults.reply_delay_s)
        self._send_paced(frames[n_acks:], self.faults.bulk_gap_s)

    # --- command handling ---------------------------------------------------------------------

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
        if self._take("error_ack_next"):
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
            self.image_key = _image_key(self.image)
            self.image_noise = 0.3

    def _capture(self, ex: bool) -> None:
        finger = self._finger
        if finger is None:
            self._process(self.profile.no_finger_s)
            self._reply(Code.NO_FINGER)
            return
        if self._take("capture_removed_next"):
            self._process(self.profile.capture_s / 2)
            self._finger = None
            self._reply(Code.CAPTURE_FAILED)
            return
        t0 = time.monotonic()
        if finger.image is not None:
            img, key, noise = finger.image, finger.key, 0.3
        else:
            imp = self.bank.impression(finger.key, self.profile.geometry, finger.quality, self._rng)
            img, key, noise = imp.image, imp.key, imp.noise
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
        # features: identity + noise that grows as less of the finger is usable
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(self.image.tobytes()).digest()[:8], "big"))
        noise = self.image_noise + 0.6 * max(0.0, 0.6 - frac)
        ident = synth.identity_vector(self.image_key)
        jitter = rng.standard_normal(synth.FEATURE_DIM).astype(np.float32) / np.sqrt(synth.FEATURE_DIM)
        v = ident + jitter * noise
        self.chars[buf] = encode_template(self.image_key, v, self.profile.template_size, kind=1,
                                          quality=int(min(255, frac * 255)))
        self._reply(Code.OK)

    def _cmd_reg_model(self, p: bytes) -> None:
        self._process(0.1)
        a, b = self.chars.get(1), self.chars.get(2)
        da = decode_template(a) if a else None
        db = decode_template(b) if b else None
        if da is None or db is None or match_score(a, b) < SECURITY_THRESHOLDS[self.security]:
            self._reply(Code.MERGE_FAILED)
            return
        merged = encode_template("model", da[1] + db[1], self.profile.template_size, kind=2)
        # keep the key digest of the first impression (diagnostics only)
        merged = merged[:4] + a[4:12] + merged[12:-2]  # type: ignore[index]
        merged += struct.pack(">H", _sum16(merged))
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
        elif self._take("flash_fail_next"):
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

        def pad(s: str, n: int) -> bytes:
            return s.encode("ascii")[:n].ljust(n, b"\0")

        info = (pad(self.profile.model, 16) + pad("SIM1", 4) + pad("00000001", 8) + bytes([1, 2])
                + pad(self.profile.sensor_type, 8)
                + struct.pack(">HHHH", g.width, g.height, self.profile.template_size, self.capacity))
        self._reply(Code.OK, info)

    def _cmd_soft_rst(self, p: bytes) -> None:
        self._reply(Code.OK)
        self._reset_volatile()
        self._emit_later(b"\x55", 0.1)


def _image_key(img: np.ndarray) -> str:
    return "image:" + hashlib.sha256(np.ascontiguousarray(img).tobytes()).hexdigest()[:16]


def _garble(data: bytes) -> bytes:
    """What a UART sampling at the wrong rate makes of a byte stream: fewer, wrong bytes."""
    return bytes(((b * 167) ^ 0x5A) & 0xFF for i, b in enumerate(data) if i % 3 != 2)
