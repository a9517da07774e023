"""The enrollment session: sign-in, NIK, face, ten fingers, duplicate check, review, commit.

One enrollment at a time per kit. Each capture *attempt* is one call that returns immediate
feedback (score, codes, what to do next), so the console, the CLI and the GPIO panel can all
drive it. The session holds the kit's space reservation from the start, so a HALT stops a new
enrollment from starting but never one already under way. Cancel at any step releases the
reservation and leaves nothing behind (nothing touches a disk before commit, and then only
sealed).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from firmware.config.models import QualityFaceConfig, QualityFingerConfig
from firmware.enrollment import iris as irismod
from firmware.enrollment import nik as nikmod
from firmware.enrollment.dedup import DuplicateChecker, FingerHit
from firmware.enrollment.operators import Operators, SignedIn, SignInError
from firmware.enrollment.payload import build_payload, face_hints, jpeg, png
from firmware.errors import EnrollmentError
from firmware.quality.finger import gates
from firmware.quality.policy import Attempt, CapturePolicy, CaptureState, Outcome
from firmware.store.capacity import CaptureHalted, Reservation
from firmware.store.store import CommitResult, Store
from firmware.system.clock import clock_synchronised, iso
from firmware.system.i18n import N_, gettext

log = logging.getLogger(__name__)

FINGER_NAMES = {"1": "thumb", "2": "index", "3": "middle", "4": "ring", "5": "little"}
#: Feedback for codes the enrollment adds itself (the quality gates' own are `gates.MESSAGES`).
SESSION_HINTS = {"sensor_rejected": N_("The sensor could not use this impression: lift the finger and press again")}


def finger_hints(codes: list[str]) -> list[str]:
    """The operator's hints for a finger's quality codes, in the current language, most actionable first (a
    code with no hint of its own is left to the `codes` of the answer)."""
    texts = [gates.MESSAGES.get(c) or SESSION_HINTS.get(c) for c in codes]
    return [gettext(t) for t in texts if t]


def finger_label(code: str) -> str:
    return ("right " if code[0] == "R" else "left ") + FINGER_NAMES[code[1]]


class FingerSensor(Protocol):
    """What enrollment needs from the fingerprint driver (`hw.sensor.driver.FingerprintSensor`)."""

    def wait_for_finger(self, timeout: float = ..., cancel: threading.Event | None = ..., poll_s: float = ...,
                        touch: Any = ...) -> Any: ...
    def wait_for_lift(self, timeout: float = ..., cancel: threading.Event | None = ..., poll_s: float = ...,
                      touch: Any = ...) -> Any: ...
    def upload_image(self) -> np.ndarray: ...
    def image_to_template(self, buffer: int = 1) -> None: ...
    def upload_template(self, buffer: int = 1) -> bytes: ...
    def download_template(self, data: bytes, buffer: int = 1) -> None: ...
    def search(self, buffer: int = 1, start: int = 0, count: int | None = None, high_speed: bool = False) -> Any: ...
    def store(self, page: int, buffer: int = 1) -> None: ...


_FINGER = QualityFingerConfig()  # policy defaults live once, in the config models
_FACE = QualityFaceConfig()


@dataclass
class Devices:
    """The capture hardware and quality checks the session uses (real or simulated)."""

    sensor: Callable[[], FingerSensor] | None = None  # returns an open sensor or raises
    camera: Any = None  # hw.camera backend: capture() -> BGR ndarray
    finger_quality: Callable[[np.ndarray], Any] | None = None  # -> .score .codes .rejected .summary()
    face_assessor: Any = None  # firmware.quality.face.assess.FaceAssessor
    finger_threshold: float = _FINGER.threshold
    finger_thresholds: dict[str, float] = field(default_factory=dict)  # per-finger overrides
    finger_attempts: int = _FINGER.max_attempts
    face_threshold: float = _FACE.accept_score
    face_attempts: int = _FACE.max_attempts
    library_capacity: int = 0
    # Simulation only: called before waiting for a finger, to put the resident's finger on the simulator.
    present_finger: Callable[[str, str], None] | None = None
    iris_camera: Any = None  # hw.iris_camera backend: capture(eye) -> grey ndarray
    iris_assessor: Any = None  # firmware.quality.iris.assess.IrisAssessor
    iris_threshold: float = 50.0
    iris_attempts: int = 3
    present_eye: Callable[[str], None] | None = None  # simulation: the resident (NIK) in front of the iris camera


@dataclass
class FingerState(CaptureState):
    """One finger's progress."""

    code: str


@dataclass
class Enrollment:
    """One resident's enrollment in progress."""

    id: str
    operator_id: str
    nik: nikmod.Nik
    reservation: Reservation
    started: str
    fingers: dict[str, FingerState]
    override_reason: str = ""
    previous_records: list[str] = field(default_factory=list)
    face_policy: CapturePolicy | None = None
    face_outcome: Outcome | None = None
    face_exception: str = ""
    dup_hits: list[FingerHit] | None = None
    supervisor: dict[str, Any] | None = None
    position: dict[str, Any] | None = None  # the GNSS fix at commit (issue #18), when positions are recorded
    cancel: threading.Event = field(default_factory=threading.Event)
    previews: dict[str, bytes] = field(default_factory=dict)  # PNG/JPEG previews for the console (RAM only)
    busy: bool = False
    irises: dict[str, irismod.IrisState] = field(default_factory=dict)  # eye -> progress ([iris] capture_iris)
    signature: irismod.SignatureState | None = None  # None: the site does not capture signatures
    touched: float = 0.0  # the service clock when its owner or a supervisor last acted on it (`expire_idle`)

    def step(self, capture_face: bool) -> str:
        """What the operator does next: face, iris:<eye>, finger:<code>, signature, dupcheck, supervisor, review."""
        if capture_face and not (self.face_exception or (self.face_outcome and self.face_outcome.done)):
            return "face"
        for i in self.irises.values():
            if not i.done:
                return f"iris:{i.eye}"
        for f in self.fingers.values():
            if not f.done:
                return f"finger:{f.code}"
        if self.signature is not None and not self.signature.done:
            return "signature"
        if self.dup_hits is None:
            return "dupcheck"
        if self.dup_hits and self.supervisor is None:
            return "supervisor"
        return "review"


class EnrollmentService(irismod.IrisSignatureSteps):
    """Drives enrollments for one kit; thread safe (one enrollment at a time)."""

    def __init__(self, store: Store, cfg: Any, operators: Operators, dedup: DuplicateChecker, devices: Devices,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.cfg = cfg
        self.operators = operators
        self.dedup = dedup
        self.dev = devices
        self.clock = clock
        self.sessions: dict[str, SignedIn] = {}
        self.active: Enrollment | None = None
        self._lock = threading.RLock()
        self.last_receipt: dict[str, Any] | None = None
        self._last_receipt_by: str | None = None  # who committed it: only they (or a supervisor) see it again
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []  # GPIO panel, console events
        self.lock_reason = ""  # set by the control plane (fleet `lock` command); non-empty refuses new enrollments
        # Set by the power guard (issue #18): a code (power_critical) refuses new enrollments; the one under way
        # may finish. Separate from lock_reason so a fleet lock and a power stop never undo each other.
        self.power_lock = ""
        # Set by the control plane when the fleet asked for a restart or a reboot: refuses new enrollments while the
        # one under way may finish (`firmware.control.plane.ControlPlane.request_exit`).
        self.exit_lock = ""
        self.position: Callable[[], dict[str, Any] | None] | None = None  # the fix for the manifest, or None

    # --- operators ------------------------------------------------------------------------

    def _audit(self, kind: str, actor: str = "", **detail: Any) -> None:
        self.store.audit(kind, actor, **detail)

    def _emit(self, event: str, **data: Any) -> None:
        for cb in list(self.listeners):
            try:
                cb(event, data)
            except Exception:
                log.exception("enrollment listener failed event=%s", event)

    def sign_in(self, operator_id: str, pin: str) -> SignedIn:
        """Check the PIN; a wrong one counts towards the lockout."""
        try:
            op = self.operators.authenticate(operator_id, pin)
        except SignInError as e:
            self._audit("signin_failed", operator_id, reason=e.code)
            log.warning("sign-in refused operator=%s reason=%s", operator_id, e.code)
            raise
        s = SignedIn(op, last_active=self.clock())
        with self._lock:
            self.sessions[s.token] = s
        self._audit("signin", op.id)
        log.info("operator signed in operator=%s", op.id)
        return s

    def session(self, token: str) -> SignedIn:
        """The signed-in operator for a token; expired after `idle_signout_s` without activity, and ended when the
        operator was removed, their role changed or their PIN was changed since they signed in."""
        with self._lock:
            s = self.sessions.get(token)
            if s is None or not self._still_valid(s):
                raise EnrollmentError("not_signed_in", gettext("sign in first"), 401)
            now = self.clock()
            if now - s.last_active > self.cfg.operators.idle_signout_s:
                self._sign_out(s, "idle")
                raise EnrollmentError("signed_out_idle", gettext("signed out after inactivity; sign in again"), 401)
            s.touch(now)
            return s

    def idle_info(self, token: str) -> dict[str, Any]:
        """Seconds until idle sign-out, and whether the console should warn."""
        with self._lock:
            s = self.sessions.get(token)
            if s is None or not self._still_valid(s):
                return {"signed_in": False}
            idle = self.clock() - s.last_active
        left = self.cfg.operators.idle_signout_s - idle
        return {"signed_in": True, "operator_id": s.operator.id, "name": s.operator.name, "role": s.operator.role,
                "signout_in_s": max(0, int(left)), "warn": idle >= self.cfg.operators.idle_warning_s}

    def sign_out(self, token: str) -> None:
        with self._lock:
            s = self.sessions.get(token)
            if s:
                self._sign_out(s, "operator")

    def _sign_out(self, s: SignedIn, why: str) -> None:
        self.sessions.pop(s.token, None)
        if self.active and self.active.operator_id == s.operator.id and not self.active.busy:
            self._cancel(self.active, f"operator signed out ({why})")
        self._audit("signout", s.operator.id, reason=why)

    def _revoked(self, s: SignedIn) -> str:
        """Why the session's credential no longer holds ('' while it does): the operator list was replaced (live
        config `operators.list`, fleet `set_operators`) after the sign-in."""
        now = self.operators.by_id.get(s.operator.id)
        if now is None:
            return "operator_removed"
        if now.role != s.operator.role:
            return "role_changed"
        if now.pin_hash != s.operator.pin_hash:
            return "pin_changed"  # a re-hashed, unchanged PIN ends the session too: signing in again is cheap
        return ""

    def _still_valid(self, s: SignedIn) -> bool:
        """False (and the session ended) when its operator's credential changed; call with `_lock` held.

        Unlike an idle or operator sign-out, the operator's enrollment is *kept*: the resident is still at the
        kit with captures done, and the change came from the office, not from the operator walking away. The
        operator (new PIN, new role) may sign in again and continue it; the enrollment of a removed operator
        waits for a supervisor, who may continue and store it or cancel it (`_current`); left alone for
        `idle_signout_s`, it is cancelled (`expire_idle`).
        """
        why = self._revoked(s)
        if not why:
            s.operator = self.operators.by_id[s.operator.id]  # same credential: pick up a new display name
            return True
        self.sessions.pop(s.token, None)
        e = self.active
        kept = e is not None and e.operator_id == s.operator.id
        self._audit("signout", s.operator.id, reason=why, **({"enrollment": e.id} if kept and e else {}))
        log.warning("operator session ended operator=%s role=%s reason=%s", s.operator.id, s.operator.role, why)
        if kept and e:
            log.warning("enrollment kept for its operator or a supervisor enrollment=%s operator=%s reason=%s "
                        "step=%s", e.id, e.operator_id, why, e.step(self.cfg.enrollment.capture_face))
        return False

    def active_token(self) -> str | None:
        """The session token of the operator who owns the enrollment in progress (None: none, or signed out).

        For a second input on the kit (the GPIO panel's confirm button) acting as that operator.
        """
        with self._lock:
            e = self.active
            if e is None:
                return None
            for token, s in list(self.sessions.items()):
                if s.operator.id == e.operator_id and self._still_valid(s):
                    return token
        return None

    def add_listener(self, cb: Callable[[str, dict[str, Any]], None]) -> None:
        """Call `cb(event, data)` on enrollment events (busy, face, finger, committed...)."""
        if cb not in self.listeners:
            self.listeners.append(cb)

    def remove_listener(self, cb: Callable[[str, dict[str, Any]], None]) -> None:
        """Stop calling `cb` (no error if it was not registered)."""
        if cb in self.listeners:
            self.listeners.remove(cb)

    def expire_idle(self) -> None:
        """Sign out idle operators (called periodically by the daemon)."""
        with self._lock:
            now = self.clock()
            for s in list(self.sessions.values()):
                if not self._still_valid(s):  # a removed or changed operator: ended (and logged) now, not later
                    continue
                if now - s.last_active > self.cfg.operators.idle_signout_s:
                    self._sign_out(s, "idle")
            e = self.active
            # An enrollment kept after its operator's credential changed (`_still_valid`) ends like any other
            # left alone: nobody (its re-signed-in operator, a supervisor) acted on it for `idle_signout_s`.
            # Without this a removed operator's enrollment blocks the kit until a supervisor comes.
            if (e is not None and not e.busy and now - e.touched > self.cfg.operators.idle_signout_s
                    and not any(x.operator.id == e.operator_id for x in self.sessions.values())):
                log.warning("enrollment left without its operator cancelled enrollment=%s operator=%s idle_s=%d",
                            e.id, e.operator_id, int(now - e.touched))
                self._cancel(e, "abandoned: its operator's sign-in ended and nobody continued it")

    # --- start / cancel -------------------------------------------------------------------

    def start(self, token: str, nik: str, override_reason: str = "") -> Enrollment:
        """Begin an enrollment: validate the NIK, check it against this kit, reserve space."""
        s = self.session(token)
        if self.lock_reason:
            self._audit("start_refused", s.operator.id, reason="locked")
            raise EnrollmentError("locked", gettext("capture is locked by the office: {reason}",
                                                    reason=self.lock_reason), 423)
        if self.power_lock:
            self._audit("start_refused", s.operator.id, reason=self.power_lock)
            raise EnrollmentError(self.power_lock, gettext("the battery is almost empty: the kit is shutting down "
                                                           "safely; no new enrollment can start. Connect the "
                                                           "charger."), 423)
        if self.exit_lock:
            self._audit("start_refused", s.operator.id, reason=self.exit_lock)
            raise EnrollmentError(self.exit_lock, gettext("the kit restarts shortly (a request from the office): "
                                                          "no new enrollment can start until it is back"), 423)
        parsed = nikmod.parse(nik)  # NikError -> 422 by the API
        with self._lock:
            if self.active is not None:
                raise EnrollmentError("busy", gettext("an enrollment is already in progress (by {operator})",
                                                      operator=self.active.operator_id))
            previous = self.dedup.nik_enrolled(parsed.value)
            override_reason = override_reason.strip()
            if previous and not override_reason:
                raise EnrollmentError("nik_enrolled", gettext("this NIK was already enrolled on this kit ({n} time(s), "
                                                              "last {last}); give a reason to enroll again",
                                                              n=len(previous), last=previous[-1]), previous=previous)
            try:
                res = self.store.begin()
            except CaptureHalted as e:
                self._audit("start_refused", s.operator.id, reason=e.code)  # the journal keeps the code
                raise EnrollmentError("halted", gettext("capture is halted: {reason}", reason=e.reason), 507,
                                      reasons=e.codes) from None
            fingers = {c: FingerState(code=c, policy=CapturePolicy(
                self.dev.finger_thresholds.get(c, self.dev.finger_threshold), self.dev.finger_attempts))
                       for c in self.cfg.enrollment.fingers}
            e = Enrollment(uuid.uuid4().hex[:12], s.operator.id, parsed, res, iso(), fingers,
                           override_reason=override_reason if previous else "", previous_records=previous,
                           touched=self.clock())
            if self.cfg.enrollment.capture_face:
                e.face_policy = CapturePolicy(self.dev.face_threshold, self.dev.face_attempts)
            if self.cfg.iris.capture_iris:
                e.irises = {eye: irismod.IrisState(eye=eye, policy=CapturePolicy(self.dev.iris_threshold,
                                                                                 self.dev.iris_attempts))
                            for eye in self.cfg.iris.eyes}
            if self.cfg.iris.capture_signature:
                e.signature = irismod.SignatureState()
            self.active = e
        if previous:
            self._audit("nik_override", s.operator.id, enrollment=e.id, previous=previous, reason=override_reason)
        self._audit("enrollment_start", s.operator.id, enrollment=e.id)
        log.info("enrollment started enrollment=%s operator=%s", e.id, s.operator.id)
        if e.irises and self.dev.iris_assessor is not None and hasattr(self.dev.iris_assessor, "prepare"):
            self.dev.iris_assessor.prepare()  # the iris check's helper starts while the face is taken
        self._emit("started", enrollment=e.id)
        return e

    def _current(self, token: str) -> tuple[SignedIn, Enrollment]:
        """The caller's session and the enrollment in progress, which they must own (or be a supervisor).

        Another operator signing in sees whose enrollment it is (`describe`) but may not continue or
        cancel it: only its owner or a supervisor may (issue #16 item 10).
        """
        s = self.session(token)
        e = self.active
        if e is None:
            raise EnrollmentError("no_enrollment",
                                  gettext("no enrollment in progress; start one with the resident's NIK"))
        self._require_owner(s, e)
        e.touched = self.clock()
        return s, e

    @staticmethod
    def _may_act(s: SignedIn, e: Enrollment) -> bool:
        """The enrollment's owner or a supervisor: the only ones who act on it or see the resident's data."""
        return e.operator_id == s.operator.id or s.operator.role == "supervisor"

    def _require_owner(self, s: SignedIn, e: Enrollment) -> None:
        """Refuse (403 not_owner, audited) anyone but the enrollment's owner or a supervisor."""
        if not self._may_act(s, e):
            self._audit("not_owner", s.operator.id, enrollment=e.id, owner=e.operator_id)
            raise EnrollmentError("not_owner", gettext("this enrollment belongs to operator {owner}: only they or a "
                                                       "supervisor may continue or cancel it", owner=e.operator_id),
                                  403, owner=e.operator_id,
                                  owner_name=self._operator_name(e.operator_id))

    def _operator_name(self, operator_id: str) -> str:
        op = getattr(self.operators, "by_id", {}).get(operator_id)
        return str(getattr(op, "name", "") or operator_id)

    def cancel(self, token: str, reason: str = "cancelled by operator") -> None:
        """Abandon the enrollment; nothing is kept, the reservation is released."""
        s, e = self._current(token)
        e.cancel.set()  # stops a wait for a finger in progress
        with self._lock:
            self._cancel(e, reason, s.operator.id)

    def cancel_active(self, reason: str) -> bool:
        """Cancel the enrollment under way for the kit itself (power stop); False while a capture or the commit
        is running (cancel it after: a commit is never cut in half) or when there is none."""
        with self._lock:
            e = self.active
            if e is None or e.busy:
                return e is None
            self._cancel(e, reason, "kit")
            return True

    def _cancel(self, e: Enrollment, reason: str, actor: str = "") -> None:
        if self.active is not e:
            return
        self.active = None
        e.cancel.set()
        self.store.release(e.reservation)
        e.previews.clear()
        self._audit("enrollment_cancel", actor or e.operator_id, enrollment=e.id, reason=reason,
                    step=e.step(self.cfg.enrollment.capture_face))
        log.info("enrollment cancelled enrollment=%s reason=%s", e.id, reason)
        self._emit("cancelled", enrollment=e.id)

    # --- face -----------------------------------------------------------------------------

    def face_attempt(self, token: str) -> dict[str, Any]:
        """Take one photo, assess it, and say whether to retake."""
        _, e = self._current(token)
        if e.face_policy is None or (e.face_outcome and e.face_outcome.done):
            raise EnrollmentError("face_done", gettext("the face photo is already taken"))
        if self.dev.camera is None:
            raise EnrollmentError("no_camera", gettext("no camera is available on this kit"), 503)
        if self.dev.face_assessor is None:  # the models did not load (the daemon's status says why)
            raise EnrollmentError("no_face_quality", gettext("the face photo check does not work on this kit"), 503)
        with self._busy(e):
            try:
                frame = self.dev.camera.capture()
            except Exception as ex:
                raise EnrollmentError("camera_error", gettext("camera error: {error}", error=ex), 503) from None
            a = self.dev.face_assessor.assess(frame)
            outcome = e.face_policy.add(Attempt(a.score, list(a.codes), rejected=bool(a.rejects), data=(frame, a)))
            e.face_outcome = outcome
            e.previews["face-last.jpg"] = jpeg(frame, 640)
        result = self._feedback(outcome, a.score, list(a.codes), face_hints(a))
        self._emit("face", accepted=result["accepted"], done=outcome.done)
        return result

    def face_exception(self, token: str, reason: str) -> None:
        """Record why no face photo is taken (e.g. camera broken, resident refuses)."""
        s, e = self._current(token)
        if not reason.strip():
            raise EnrollmentError("reason_required", gettext("give a reason"), 422)
        e.face_exception = reason.strip()
        self._audit("face_exception", s.operator.id, enrollment=e.id, reason=e.face_exception)

    # --- fingers --------------------------------------------------------------------------

    def finger_attempt(self, token: str, code: str) -> dict[str, Any]:
        """Wait for the finger, capture, assess; say whether to retake, and move on when done."""
        _, e = self._current(token)
        f = self._finger(e, code)
        if f.done:
            raise EnrollmentError("finger_done", gettext("{finger} is already captured", finger=finger_label(code)))
        if self.dev.sensor is None:
            raise EnrollmentError("no_sensor", gettext("no fingerprint sensor is configured"), 503)
        if self.dev.finger_quality is None:
            raise EnrollmentError("no_finger_quality",
                                  gettext("the fingerprint quality check does not work on this kit"), 503)
        with self._busy(e):
            try:
                sensor = self.dev.sensor()
                if self.dev.present_finger:
                    self.dev.present_finger(e.nik.value, code)
                r = sensor.wait_for_finger(self.cfg.sensor.capture_timeout_s, e.cancel)
                if getattr(r, "name", str(r)) != "CAPTURED":
                    if e.cancel.is_set():
                        raise EnrollmentError("cancelled", gettext("the enrollment was cancelled"))
                    return {"finger": code, "status": "timeout", "done": False,
                            "message": gettext("no finger on the sensor: place the {finger} flat on the glass",
                                               finger=finger_label(code))}
                img = sensor.upload_image()
                q = self.dev.finger_quality(img)
                template = b""
                if not q.rejected:
                    try:
                        sensor.image_to_template(1)
                        template = sensor.upload_template(1)
                    except Exception as ex:  # the module refused the image: treat as a retake
                        log.info("sensor could not make a template finger=%s error=%s", code, ex)
                        q.rejected = True
                        q.codes = [*q.codes, "sensor_rejected"]
                outcome = f.policy.add(Attempt(q.score, list(q.codes), rejected=q.rejected,
                                               data=(img, template, q)))
                f.outcome = outcome
                e.previews[f"finger-{code}.png"] = png(img)
                if not outcome.done and self.dev.present_finger is None:
                    sensor.wait_for_lift(5.0, e.cancel)
            except EnrollmentError:
                raise
            except Exception as ex:
                log.warning("sensor error finger=%s error=%s", code, ex)
                raise EnrollmentError("sensor_error", gettext("fingerprint sensor error: {error}", error=ex),
                                      503) from None
        hints = finger_hints(list(q.codes))
        result = self._feedback(outcome, q.score, list(q.codes), hints)
        result["finger"] = code
        if outcome.done:
            nxt = next((x.code for x in e.fingers.values() if not x.done), None)
            result["next"] = f"finger:{nxt}" if nxt else e.step(self.cfg.enrollment.capture_face)
        self._emit("finger", finger=code, accepted=result["accepted"], done=outcome.done)
        return result

    def finger_exception(self, token: str, code: str, reason: str) -> None:
        """Record a missing, bandaged or injured finger instead of capturing it."""
        s, e = self._current(token)
        f = self._finger(e, code)
        reason = reason.strip()
        if not reason:
            raise EnrollmentError("reason_required", gettext("give a reason (missing, bandaged, injured...)"), 422)
        f.exception = reason
        self._audit("finger_exception", s.operator.id, enrollment=e.id, finger=code, reason=reason)

    def _finger(self, e: Enrollment, code: str) -> FingerState:
        f = e.fingers.get(code)
        if f is None:
            raise EnrollmentError("unknown_finger",
                                  gettext("finger {code} is not captured at this kit (fingers: {fingers})",
                                          code=repr(code), fingers=", ".join(e.fingers)), 422)
        return f

    # --- duplicate check, supervisor, commit ------------------------------------------------

    def _templates(self, e: Enrollment, only: list[str] | None = None) -> dict[str, bytes]:
        out = {}
        for code, f in e.fingers.items():
            if only is not None and code not in only:
                continue
            if f.outcome and f.outcome.accepted and f.outcome.accepted.data[1]:
                out[code] = f.outcome.accepted.data[1]
        return out

    def dup_check(self, token: str) -> dict[str, Any]:
        """Search the new prints in this kit's earlier enrollments; flag a hit under another NIK."""
        s, e = self._current(token)
        if any(not f.done for f in e.fingers.values()):
            raise EnrollmentError("fingers_pending", gettext("capture every finger (or record an exception) first"))
        if any(not i.done for i in e.irises.values()) or (e.signature is not None and not e.signature.done):
            raise EnrollmentError("not_ready", gettext("not ready to commit: next step is {step}",
                                                       step=e.step(self.cfg.enrollment.capture_face)))
        hits: list[FingerHit] = []
        if self.dev.sensor is not None and self.dedup.capacity:
            with self._busy(e):
                try:
                    hits = self.dedup.search_fingers(self.dev.sensor(), e.nik.value, self._templates(e))
                except Exception as ex:
                    raise EnrollmentError("sensor_error", gettext("duplicate check failed: {error}", error=ex),
                                          503) from None
        records = {h.record_id for h in hits}
        flagged = len(hits) >= self.cfg.enrollment.dedup_min_hits
        e.dup_hits = hits if flagged else []
        if flagged:
            self._audit("duplicate_flagged", s.operator.id, enrollment=e.id, records=sorted(records),
                        fingers=[h.finger for h in hits])
            log.warning("likely double enrollment enrollment=%s matches=%s", e.id, sorted(records))
        return {"flagged": flagged, "matches": [h.__dict__ for h in hits], "records": sorted(records),
                "next": "supervisor" if flagged else "review"}

    def supervisor_decision(self, token: str, supervisor_id: str, pin: str, decision: str, reason: str) -> None:
        """A supervisor accepts (enroll anyway, e.g. twins' data error) or rejects a flagged enrollment."""
        _, e = self._current(token)
        if not e.dup_hits:
            raise EnrollmentError("not_flagged", gettext("this enrollment is not flagged"))
        if decision not in ("accept", "reject"):
            raise EnrollmentError("bad_decision", gettext("decision must be accept or reject"), 422)
        if not reason.strip():
            raise EnrollmentError("reason_required", gettext("the supervisor must give a reason"), 422)
        try:
            sup = self.operators.authenticate(supervisor_id, pin, role="supervisor")
        except SignInError as ex:
            raise EnrollmentError("supervisor_auth", str(ex), 403) from None
        if decision == "accept" and sup.id == e.operator_id:
            # Four eyes: whoever captured a likely double enrollment may not be the one who waves it through
            # (rejecting their own is fine: it stores nothing).
            self._audit("supervisor_refused", sup.id, enrollment=e.id, decision=decision, why="own_enrollment")
            raise EnrollmentError("own_enrollment",
                                  gettext("a supervisor may not accept an enrollment they captured themselves: "
                                          "ask another supervisor"), 403)
        e.supervisor = {"supervisor_id": sup.id, "decision": decision, "reason": reason.strip(), "at": iso()}
        self._audit("supervisor_decision", sup.id, enrollment=e.id, decision=decision, reason=reason.strip())
        if decision == "reject":
            with self._lock:
                self._cancel(e, f"rejected by supervisor {sup.id}: {reason.strip()}", sup.id)

    def review(self, token: str) -> dict[str, Any]:
        """Everything the operator checks before committing."""
        _, e = self._current(token)
        return self.describe(e)

    def _biometrics(self, e: Enrollment) -> dict[str, dict[str, int]]:
        """Per modality the site captures: how many were captured and how many recorded as exceptions."""
        def count(items: list[Any]) -> dict[str, int]:
            exc = sum(1 for x in items if x.exception)
            return {"captured": len(items) - exc, "exception": exc}

        out: dict[str, dict[str, int]] = {}
        if self.cfg.enrollment.capture_face:
            out["face"] = {"captured": int(not e.face_exception), "exception": int(bool(e.face_exception))}
        if e.irises:
            out["iris"] = count(list(e.irises.values()))
        out["fingers"] = count(list(e.fingers.values()))
        if e.signature is not None:
            out["signature"] = count([e.signature])
        return out

    def commit(self, token: str) -> dict[str, Any]:
        """Seal and store the enrollment; returns the receipt information."""
        s, e = self._current(token)
        step = e.step(self.cfg.enrollment.capture_face)
        if step != "review":
            raise EnrollmentError("not_ready", gettext("not ready to commit: next step is {step}", step=step))
        with self._busy(e):
            if self.position is not None:
                try:
                    e.position = self.position()
                except Exception as ex:  # a position is metadata: it never stops a commit
                    log.warning("position unavailable error=%s", ex)
                    e.position = {"fix": "none", "reason": "error"}
            payload = self._payload(e)
            try:
                res: CommitResult = self.store.commit(payload, e.reservation, operator_id=s.operator.id)
            except Exception as ex:
                # Nothing was confirmed; the enrollment (and its reservation) stays open so the operator can retry.
                log.error("commit failed enrollment=%s error=%s", e.id, ex)
                raise EnrollmentError("store_error",
                                      gettext("could not store the record, try again: {error}", error=ex),
                                      500) from None
        with self._lock:
            self.active = None  # stored: from here on nothing may leave it open (a retry would store it twice)
        sensor = None
        if self.dev.sensor is not None:
            try:
                sensor = self.dev.sensor()
            except Exception as ex:
                log.warning("sensor unavailable for the duplicate library error=%s", ex)
        try:
            self.dedup.remember(sensor, e.nik.value, res.record_id,
                                self._templates(e, list(self.cfg.enrollment.dedup_fingers)))
        except Exception:  # the record is sealed and stored; only later duplicate checks are weakened
            log.exception("could not index the record for the duplicate check record_id=%s", res.record_id)
        info = {"record_id": res.record_id, "sha256": res.sha256, "created": iso(),
                "kit_id": self.store.identity.kit_id, "site": self.cfg.kit.site,
                "clock_synced": clock_synchronised(), "mirrored": res.stick_id is not None,
                "biometrics": self._biometrics(e)}
        self.last_receipt, self._last_receipt_by = info, s.operator.id
        self._audit("enrollment_commit", s.operator.id, enrollment=e.id, record_id=res.record_id,
                    mirrored=res.stick_id is not None)
        log.info("enrollment committed enrollment=%s record_id=%s", e.id, res.record_id)
        self._emit("committed", record_id=res.record_id, seq=res.seq)
        return info

    # --- helpers --------------------------------------------------------------------------

    def _busy(self, e: Enrollment) -> Any:
        svc = self

        class _Busy:
            def __enter__(self) -> None:
                with svc._lock:
                    if e.busy:
                        raise EnrollmentError("busy", gettext("a capture is already running"))
                    e.busy = True
                svc._emit("busy", on=True)

            def __exit__(self, *exc: object) -> None:
                e.busy = False
                svc._emit("busy", on=False)
        return _Busy()

    @staticmethod
    def _feedback(outcome: Outcome, score: float, codes: list[str], hints: list[str]) -> dict[str, Any]:
        accepted = outcome.done and not outcome.forced
        if outcome.done and outcome.forced:
            msg = gettext("kept the best of {n} attempts (quality below the threshold)", n=len(outcome.attempts))
        elif outcome.done:
            msg = gettext("good capture")
        else:
            msg = gettext("retake: {hints}", hints="; ".join(hints) if hints else gettext("quality too low"))
        return {"status": "captured", "score": round(float(score), 1), "codes": codes, "hints": hints,
                "accepted": accepted, "forced": outcome.forced, "done": outcome.done,
                "attempt": len(outcome.attempts), "message": msg}

    def describe(self, e: Enrollment | None = None) -> dict[str, Any]:
        """The enrollment's state for the console and CLI (no images; the full NIK only at review), as its owner or
        a supervisor sees it: `describe_for` answers a request by whoever asks."""
        e = e or self.active
        if e is None:
            # No caller here: the last receipt is shown only by `describe_for`, to whoever committed it.
            return {"active": False, "last_receipt": None}
        fingers = []
        for f in e.fingers.values():
            best = f.outcome.accepted if f.outcome and f.outcome.done else None
            fingers.append({"finger": f.code, "label": finger_label(f.code), "done": f.done,
                            "exception": f.exception,
                            "attempts": len(f.policy.attempts), "score": round(best.score, 1) if best else None,
                            "forced": bool(f.outcome and f.outcome.forced), "preview": f"finger-{f.code}.png"
                            if f"finger-{f.code}.png" in e.previews else None})
        face = None
        if e.face_outcome:
            face = {"attempts": len(e.face_outcome.attempts), "done": e.face_outcome.done,
                    "forced": e.face_outcome.forced,
                    "score": round(e.face_outcome.accepted.score, 1) if e.face_outcome.accepted else None,
                    "preview": "face-last.jpg" if "face-last.jpg" in e.previews else None}
        step = e.step(self.cfg.enrollment.capture_face)
        # At review the full NIK and the birth date it encodes are shown, for the resident to confirm (a typo in
        # digits 7-12 is a wrong birth date); before that, masked (the screen may be seen by the queue).
        resident = ({"nik": e.nik.value, "birth_date": e.nik.birth_date.isoformat(), "female": e.nik.female}
                    if step == "review" else {})
        return {"active": True, "id": e.id, "operator_id": e.operator_id,
                "operator_name": self._operator_name(e.operator_id), **resident,
                "nik_masked": e.nik.value[:6] + "******"
                + e.nik.value[12:], "started": e.started, "step": step,
                "face": face, "face_exception": e.face_exception, "fingers": fingers, "busy": e.busy,
                **irismod.describe(e),
                "override_reason": e.override_reason,
                "duplicates": None if e.dup_hits is None else [h.__dict__ for h in e.dup_hits],
                "supervisor": e.supervisor}

    def describe_for(self, token: str) -> dict[str, Any]:
        """`describe` for the signed-in caller: in full for the enrollment's owner or a supervisor; another operator
        learns only that the kit is busy, whose enrollment it is and how far it got (`_busy_view`)."""
        s = self.session(token)
        e = self.active
        if e is None:
            mine = s.operator.id == self._last_receipt_by or s.operator.role == "supervisor"
            return {"active": False, "last_receipt": self.last_receipt if mine else None}
        if self._may_act(s, e):
            return self.describe(e)
        return self._busy_view(self.describe(e))

    @staticmethod
    def _busy_view(full: dict[str, Any]) -> dict[str, Any]:
        """An enrollment in progress as another operator may see it: whose, which step, the progress of each capture
        (what the console's step list shows), but not the resident: no full NIK, birth date, sex, exception reasons
        (they can be medical), previews, override reason, duplicate matches or supervisor decision."""
        def item(d: dict[str, Any]) -> dict[str, Any]:
            return {**d, "preview": None, **({"exception": bool(d["exception"])} if "exception" in d else {})}

        view = {k: full[k] for k in ("active", "id", "operator_id", "operator_name", "nik_masked", "started", "step",
                                     "busy")}
        dups = full["duplicates"]
        view.update({
            "face": item(full["face"]) if full["face"] else None, "face_exception": bool(full["face_exception"]),
            "fingers": [item(f) for f in full["fingers"]], "irises": [item(i) for i in full["irises"]],
            "signature": item(full["signature"]) if full["signature"] else None,
            "duplicates": None if dups is None else [{"finger": h["finger"]} for h in dups],  # done or not
            "restricted": True})
        return view

    def preview(self, token: str, name: str) -> bytes | None:
        """A capture preview (face, finger, iris, signature image) of the enrollment in progress, for its owner or
        a supervisor only (403 not_owner otherwise); None when there is no enrollment or no such preview."""
        s = self.session(token)
        e = self.active
        if e is None:
            return None
        self._require_owner(s, e)
        return e.previews.get(name)

    def _payload(self, e: Enrollment) -> bytes:
        return build_payload(e, self.cfg)
