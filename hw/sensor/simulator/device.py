"""A simulated EF01 fingerprint sensor on a pseudo-terminal.

The driver opens the pty's slave path with pyserial exactly as it would open /dev/serial0. The
simulator thread reads the master side, parses frames with the same framer as the driver, and
answers like the chosen model (`profiles`): confirmation codes, ACK lengths, bulk transfers in the
configured packet size, busy window after SetSysPara, 0x55 after power-up and SoftRst.

Wire time: a pty has no bit timing, so each reply frame is delayed by its wire time at the
sensor's baud (``bytes * 10 / baud * wire_speed``), on an absolute schedule so the pacing does not
drift. The baud the driver set on the slave is read back with ``tcgetattr(master)``; when it
differs from the sensor's rate, traffic in both directions is garbled (as on a real wire).

This module is the device: the pty, its I/O thread, pacing, garbling, the control API and the
module state. What the module does with each instruction is in `commands`, the template format
and the flash file in `templates`, the fault knobs in `faults`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import termios
import threading
import time
import tty
from collections.abc import Mapping
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
    Pid,
    baud_from_n,
    build_frame,
    n_from_baud,
)
from hw.sensor.simulator import conditions
from hw.sensor.simulator.commands import CommandHandlers
from hw.sensor.simulator.faults import Faults, damage_data_frame
from hw.sensor.simulator.state import Finger, SimStats
from hw.sensor.simulator.templates import image_key, load_flash, save_flash

log = logging.getLogger(__name__)

#: What a placed finger may be like: the renderer's qualities and a finger that moved (conditions.moved).
QUALITIES = (*synth.QUALITIES, "moved")

_BAUD_CONST = {getattr(termios, f"B{b}"): b for b in (
    1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600)
    if hasattr(termios, f"B{b}")}


class SensorSimulator(CommandHandlers):
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
        finger_conditions: Mapping[str, float] | None = None,
        auto_repeat: int = 1,
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
        self.seed = seed
        # How fingers lie on the glass (conditions.py): None = the field defaults; {} = always good.
        self.finger_conditions = conditions.check_rates(
            conditions.DEFAULT_RATES if finger_conditions is None else finger_conditions)
        self._placements: dict[str, int] = {}  # placements per finger, for the seeded condition draw
        if auto_repeat < 1:
            raise ValueError(f"auto_repeat must be >= 1, got {auto_repeat}")
        self.auto_repeat = auto_repeat  # auto mode: placements of one finger before the next (2 for an enrol)
        self._auto_left = 0
        self._auto_current: str | None = None
        # "flash": survives power cycles
        self._flash = {
            "baud_n": n_from_baud(baud), "security": security, "packet_code": PACKET_SIZES.index(packet_size),
            "password": password, "address": address,
            "capacity": capacity or self.profile.capacity,
        }
        self.library: dict[int, bytes] = {}
        self.notepad = [bytes(32) for _ in range(16)]
        saved = load_flash(self.library_path)
        if saved is not None:
            self._flash.update(saved[0])
            self.library = saved[1]
        self.led: tuple[int, int, int, int] | None = None
        self._lock = threading.RLock()
        self._finger: Finger | None = None
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

    def present_finger(self, resident_id: str, finger: int = 0, quality: str | None = "good") -> None:
        """Put a finger on the glass. `resident_id` ``corpus:<name>`` uses a real corpus print.

        `quality`: good, dry, wet, partial or moved; None draws it from `finger_conditions` (seeded: the
        same placements in the same order get the same conditions)."""
        if quality is not None and quality not in QUALITIES:
            raise ValueError(f"quality must be one of {QUALITIES}, got {quality!r}")
        key = synth.finger_key(resident_id, finger)
        with self._lock:
            self._finger = Finger(key, quality or self._draw(key))
        if not key.startswith(synth.CORPUS_PREFIX):
            self.bank.master(key)  # grow it now, not during the first GenImg

    def _draw(self, key: str) -> str:
        """The condition of this placement of `key` (caller holds the lock); counted in `stats.conditions`."""
        n = self._placements.get(key, 0)
        self._placements[key] = n + 1
        c = conditions.draw(self.finger_conditions, self.seed, key, n)
        self.stats.conditions[c] = self.stats.conditions.get(c, 0) + 1
        if c != "good":
            log.info("sim finger placed key=%s placement=%d condition=%s", key, n + 1, c)
        return c

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
            self._finger = Finger(key or image_key(q), "good", q)

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
            self._auto_current, self._auto_left = None, 0

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

    def _save_flash(self) -> None:
        save_flash(self.library_path, self._flash, self.library)

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
                    if self._auto_current is not None and self._auto_left > 0:  # hold the same finger
                        self._auto_next = self._auto_current
                    else:
                        resident, finger = self._auto_key or self._next_demo_finger()
                        self._auto_next = synth.finger_key(resident, finger)
                        self._auto_left = self.auto_repeat
                key = self._auto_next
                if not self.bank.has_master(key):
                    # grow it off the I/O thread: a GenImg must not wait for it
                    if not self._warming:
                        self._warming = True
                        threading.Thread(target=self._warm, args=(key,), daemon=True).start()
                    return
                self._auto_next = None
                self._auto_current = key
                self._auto_left -= 1
                self._finger = Finger(key, self._draw(key))
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

    def _reply(self, code: int, payload: bytes = b"", data: bytes | None = None) -> None:
        """Send an ACK (and, for uploads, the data packets) with faults and wire timing applied."""
        faults = self.faults
        if faults.dead or faults.take("no_reply_next"):
            return
        self.stats.replies += 1
        frames = [faults.mangle(self._ack_frame(code, payload))]
        if faults.take("late_ack_next"):
            frames.insert(0, self._ack_frame(faults.late_ack_code))
        if faults.take("duplicate_ack_next"):
            frames.append(self._ack_frame(code, payload))
        if data is not None:
            chunks = [data[i:i + self.packet_size] for i in range(0, len(data), self.packet_size)]
            damaged = len(chunks) // 2 if faults.take("corrupt_data_next") else -1
            for k, c in enumerate(chunks):
                f = build_frame(Pid.END if k == len(chunks) - 1 else Pid.DATA, c, self.address)
                frames.append(faults.mangle(damage_data_frame(f)) if k == damaged else f)
        n_acks = 2 if len(frames) > 1 and frames[1][6] == Pid.ACK else 1
        self._send_paced(frames[:n_acks], delay_s=faults.reply_delay_s)
        if data is not None and (faults.bulk_trickle_s or faults.bulk_ack_flood_s):
            self._send_hostile(data, code)
            return
        self._send_paced(frames[n_acks:], faults.bulk_gap_s)

    def _send_hostile(self, data: bytes, code: int) -> None:
        """A hostile module's data phase: 1-byte packets trickled, or a stream of ACKs; stops when cleared."""
        faults = self.faults
        if faults.bulk_ack_flood_s:
            self._write(build_frame(Pid.DATA, data[:self.packet_size], self.address))
            while faults.bulk_ack_flood_s and not self._stop.is_set():
                self._sleep(faults.bulk_ack_flood_s)
                self._write(self._ack_frame(code))
            return
        for i, b in enumerate(data):
            if not faults.bulk_trickle_s or self._stop.is_set():
                return
            self._write(build_frame(Pid.END if i == len(data) - 1 else Pid.DATA, bytes([b]), self.address))
            self._sleep(faults.bulk_trickle_s)


def _garble(data: bytes) -> bytes:
    """What a UART sampling at the wrong rate makes of a byte stream: fewer, wrong bytes."""
    return bytes(((b * 167) ^ 0x5A) & 0xFF for i, b in enumerate(data) if i % 3 != 2)
