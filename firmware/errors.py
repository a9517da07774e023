"""The one error tree of rekam: every error the kit, its drivers and the data center raise on purpose.

Rooted at `RekamError`, one family per layer; leaves also inherit the builtin a caller would
naturally catch (`ValueError` for bad input, `OSError` for a medium, `TimeoutError`...), as gpiozero
does. A module raises the leaf defined here (or, for the sensor's many confirmation codes, a leaf in
`hw.sensor.protocol` under `SensorError`); the CLIs map families to messages and exit codes in one
place (`firmware.cli.main`, `provisioning.cli`).

This module imports nothing from the tree when loaded: `hw`, every `firmware` stage and `provisioning` may use
it (`Problem.translated` loads the message catalog, `firmware.system.i18n`, only when a problem is shown).
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

#: Exit status of every program stopped by a bad configuration (sysexits EX_CONFIG).
EX_CONFIG = 78


class RekamError(Exception):
    """Base class of every error rekam raises on purpose."""


# --- configuration -------------------------------------------------------------------------------


class Problem(str):
    """One problem line: its value is the English text (logs, tests, ``str(error)``); `translated()` words it in
    the current language. Built from a catalog msgid with ``{name}`` placeholders; a placeholder's value may be
    a `Problem` too (translated with it)."""

    msgid: str
    params: dict[str, Any]

    def __new__(cls, msgid: str, **params: Any) -> Problem:
        self = super().__new__(cls, msgid.format(**{k: str(v) for k, v in params.items()}) if params else msgid)
        self.msgid = msgid
        self.params = params
        return self

    def translated(self) -> str:
        """The text in the current language (`firmware.system.i18n`), English where no translation exists."""
        from firmware.system.i18n import gettext  # lazy: hw imports this module and needs no catalog

        kw = {k: v.translated() if isinstance(v, Problem) else v for k, v in self.params.items()}
        return gettext(self.msgid, **kw)


def translated(text: str) -> str:
    """`text` in the current language if it is a `Problem`, else as is."""
    return text.translated() if isinstance(text, Problem) else text


class ConfigError(RekamError, ValueError):
    """The configuration is invalid; `problems` holds one line per bad key (key = value: what is allowed)."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        self.source = source
        super().__init__(f"{source}: " + "; ".join(problems))

    def report(self, stream: TextIO | None = None, log: logging.Logger | None = None) -> int:
        """Print every problem as ``source: problem`` (to stderr by default) and return `EX_CONFIG`.

        The one printout of a bad configuration, for every program that loads one, in the current language
        (Indonesian first). Daemons pass their `log` instead: one ``config error file=... : problem`` line per
        problem, at error priority, in English (the journal is for technicians).
        """
        for p in self.problems:
            if log is not None:
                log.error("config error file=%s: %s", self.source, p)
            else:
                print(f"{self.source}: {translated(p)}", file=stream if stream is not None else sys.stderr)
        return EX_CONFIG


# --- untrusted media ------------------------------------------------------------------------------


class UntrustedFile(RekamError, OSError):
    """A file on an untrusted medium (a USB stick, an upload) that is not a plain regular file within bounds.

    Raised by `firmware.system.fsutil.open_untrusted` for symlinks, FIFOs, devices, paths that leave
    their root, and files over their size cap; `errno` says which (ELOOP, EINVAL, EFBIG...).
    """


# --- hardware (hw/) ------------------------------------------------------------------------------


class HardwareError(RekamError):
    """A device of the kit cannot be used (sensor, camera, GPIO, stick mount)."""


class SensorError(HardwareError):
    """The fingerprint sensor or its serial link failed; leaves in `hw.sensor.protocol`."""


class CameraError(HardwareError, RuntimeError):
    """The camera cannot be opened or did not deliver a usable frame."""


# --- quality -------------------------------------------------------------------------------------


class QualityError(RekamError):
    """A quality check cannot judge its input."""


class ImageFormatError(QualityError, ValueError):
    """The input is not an image the quality check can use; the message says what is wrong."""


class ModelError(QualityError, RuntimeError):
    """A model file is missing, has the wrong hash, or cannot be loaded."""


# --- wire formats (firmware/wire/) ---------------------------------------------------------------


class WireError(RekamError, ValueError):
    """Bytes from outside (a record file, an MQTT message) are not in the expected format."""


class ProtocolError(WireError):
    """A relay or control message is malformed, too large, or badly signed.

    `reason` is one word for logs, telemetry and answers (``malformed`` unless the raiser names one).
    """

    def __init__(self, reason: str, message: str = "") -> None:
        if message:
            self.reason = reason
            super().__init__(f"{reason}: {message}")
        else:
            self.reason = "malformed"
            super().__init__(reason)


class BundleError(ProtocolError):
    """An update bundle (`firmware.wire.update_bundle`) is malformed, too large, badly signed or does not match its
    signed manifest; `reason` is one word (bad_magic, too_large, malformed, bad_signature, size_mismatch,
    hash_mismatch, not_json, too_deep)."""


class RecordFormatError(WireError):
    """A sealed record could not be parsed, verified or opened."""


class TruncatedRecord(RecordFormatError):
    """The file is shorter than its own layout says (an interrupted copy)."""


class BadSignature(RecordFormatError):
    """The kit signature does not verify: the file was altered or signed by another key."""


class WrongKey(RecordFormatError):
    """None of the given data-center keys can open this record."""


# --- seal ----------------------------------------------------------------------------------------


class SealError(RekamError):
    """A record cannot be sealed: the kit's keys or the data center's keys are unusable."""


class IdentityError(SealError):
    """The identity files exist but cannot be used (corrupt, wrong permissions)."""


# --- store ---------------------------------------------------------------------------------------


class StoreError(RekamError):
    """The store cannot take this record; nothing was confirmed."""


class StoreLocked(StoreError):
    """Another process (normally rekamd) owns this state directory."""


class RecordTooLarge(StoreError, ValueError):
    """A record exceeds store.max_record_mb."""


class CaptureHalted(StoreError):
    """A new enrollment cannot start: `reason` says why, for the operator."""

    def __init__(self, reason: str, code: str = "halted", codes: list[str] | None = None) -> None:
        self.reason = reason  # in the current language (the guard renders it through the catalog)
        self.code = code  # stable machine code of the (first) reason: "sd_full", "usb_record_does_not_fit", ...
        self.codes = codes or [code]
        super().__init__(reason)


class StickError(StoreError, OSError):
    """The USB stick cannot be used: not mountable, went away, or failed while being written."""


class HostileStick(StickError):
    """The stick holds something the kit will not touch: a symlink, FIFO or device where a rekam file or folder
    belongs, a file over its size cap, or JSON nested too deep. The stick is not used; nothing is written to it."""

    def __str__(self) -> str:  # shown in `rekam status` and the console as is: no "[Errno 40]" in front
        return str(self.strerror or super().__str__())


class ReadbackMismatch(StoreError, OSError):
    """A file read back from the medium does not hash to what was written."""


# --- enrollment ----------------------------------------------------------------------------------


class EnrollmentError(RekamError):
    """A request the session cannot accept now; `code` for programs, message for the operator."""

    def __init__(self, code: str, message: str, status: int = 409, **extra: Any) -> None:
        self.code = code
        self.status = status
        self.extra = extra
        super().__init__(message)


class NikError(RekamError, ValueError):
    """The NIK is invalid; `code` is stable for programs, the message is for the operator."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


class SignInError(RekamError):
    """Sign-in refused; `code` is one of unknown, bad_pin, locked."""

    def __init__(self, code: str, message: str, retry_after_s: float = 0, tries_left: int | None = None) -> None:
        self.code = code
        self.retry_after_s = retry_after_s
        self.tries_left = tries_left  # bad_pin: wrong PINs left before the lockout (the console words it)
        super().__init__(message)


# --- relay ---------------------------------------------------------------------------------------


class RelayError(RekamError):
    """The uplink to the data center cannot be used (no broker, refused connection, bad TLS files)."""


# --- control -------------------------------------------------------------------------------------


class ControlError(RekamError):
    """A fleet control action failed; `reason` is one word for logs, telemetry and answers."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {message}")


class Refused(ControlError):
    """A control message (config, command) is refused."""


class ClaimError(ControlError):
    """A claim attempt failed (rejected, timeout, bad_response, connect, ...)."""


# --- local API client ----------------------------------------------------------------------------


class ApiError(RekamError):
    """The daemon's local API answered with an error; `status` is the HTTP status, `detail` its text."""

    def __init__(self, status: int, detail: Any) -> None:
        self.status = status
        self.detail = detail
        super().__init__(f"HTTP {status}: {detail}")


# --- data center (provisioning/) -----------------------------------------------------------------


class DataCenterError(RekamError):
    """The data center's tools cannot do what was asked."""


class ArchiveError(DataCenterError):
    """The archive cannot take a record for a transient reason (disk, database)."""


class ArchivedRecordMissing(ArchiveError):
    """An indexed record's bytes are gone from the archive's disk or object store (not a transient error)."""


class ArchivedRecordCorrupt(ArchiveError):
    """An indexed record's stored bytes no longer match the hash its index row was written with."""


class UnknownKit(ArchiveError):
    """No public key is registered for this kit (and trust-on-first-use is off)."""


class KitRevoked(UnknownKit):
    """The fleet registry says this kit is revoked: its records are not archived (not acknowledged either, so a
    kit revoked by mistake keeps them; a supervisor can still import its stick)."""


class FleetError(DataCenterError):
    """A fleet operation cannot be done (unknown kit, revoked kit, no broker...)."""


class CaError(DataCenterError):
    """The CA cannot do what was asked (missing files, a CSR that does not match, ...)."""


class ExportError(DataCenterError):
    """An archived record cannot be turned into an ABIS interchange record; `code` names why (stable, for
    scripts and logs: bad_finger_code, image_too_large, missing_attachment, bad_manifest, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class IsoRecordError(ExportError):
    """An ISO/IEC 19794-4/-5 record does not follow the standard's byte layout (the reader names the field)."""

    def __init__(self, message: str) -> None:
        super().__init__("bad_iso_record", message)
