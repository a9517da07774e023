"""HTTP API of the enrollment session (used by the web console and `rekam enroll`).

Authentication: `POST /api/v1/auth/signin` returns a token; send it as `Authorization: Bearer
<token>` (the console keeps it in a same-site cookie). Errors are JSON:
``{"detail": {"code": "...", "message": "..."}}`` with a stable code for programs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Cookie, Header, HTTPException, Path, Request, Response
from pydantic import BaseModel, Field

from firmware.enrollment.nik import NikError
from firmware.enrollment.operators import SignInError
from firmware.enrollment.session import EnrollmentError
from firmware.wire.ids import RECORD_ID_PATTERN

if TYPE_CHECKING:
    from firmware.console.port import KitPort
    from firmware.enrollment.session import EnrollmentService

ID = r"^[A-Za-z0-9._-]{1,64}$"
FINGER = r"^[RL][1-5]$"
EYE = r"^(left|right)$"


class SignIn(BaseModel):
    operator_id: str = Field(pattern=ID)
    pin: str = Field(pattern=r"^\d{4,12}$")


class Start(BaseModel):
    nik: str = Field(min_length=1, max_length=32)
    override_reason: str = Field("", max_length=500)


class Reason(BaseModel):
    reason: str = Field(min_length=1, max_length=500)


class Supervisor(BaseModel):
    supervisor_id: str = Field(pattern=ID)
    pin: str = Field(pattern=r"^\d{4,12}$")
    decision: Literal["accept", "reject"]
    reason: str = Field(min_length=1, max_length=500)


class Signature(BaseModel):
    """The signature pad's strokes: per stroke, points [x, y, pressure, t_ms] in pad pixels."""

    strokes: list[list[list[float]]] = Field(max_length=200)
    width: int = Field(ge=50, le=2000)
    height: int = Field(ge=50, le=2000)


class Alias(BaseModel):
    nik: str = Field(pattern=r"^\d{16}$")
    same_person_as: str = Field(pattern=r"^\d{16}$")


def _err(e: Exception) -> HTTPException:
    if isinstance(e, EnrollmentError):
        return HTTPException(e.status, {"code": e.code, "message": str(e), **e.extra})
    if isinstance(e, NikError):
        return HTTPException(422, {"code": f"nik_{e.code}", "message": str(e)})
    if isinstance(e, SignInError):
        extra = {"tries_left": e.tries_left} if e.tries_left is not None else {}
        # 423 locked, 503 pin_busy (too many PINs being checked at once: try again, nothing counted), else 401
        return HTTPException(423 if e.code == "locked" else 503 if e.code == "pin_busy" else 401,
                             {"code": e.code, "message": str(e), "retry_after_s": int(e.retry_after_s), **extra})
    raise e


def router(svc: EnrollmentService, kit: KitPort, sim_aliases: dict[str, str] | None = None,
           signed_in: Any = None) -> APIRouter:
    """Routes bound to one enrollment service (`kit` answers for records, receipts and the audit log).

    `signed_in`: the dependency that admits the local token or an operator session (routes without an
    operator of their own, i.e. the simulation helpers).
    """
    r = APIRouter(prefix="/api/v1")
    # A credential is checked before the body is even validated: nobody learns more than 401 without one.
    deps = [signed_in] if signed_in is not None else []

    def token(authorization: str | None, cookie: str | None) -> str:
        if authorization and authorization.lower().startswith("bearer "):
            return authorization[7:].strip()
        if cookie:
            return cookie
        raise HTTPException(401, {"code": "not_signed_in", "message": "sign in first"})

    def call(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except (EnrollmentError, NikError, SignInError) as e:
            raise _err(e) from None

    Auth = Header(None)
    Sess = Cookie(None, alias="rekam_session")

    @r.post("/auth/signin")
    def signin(req: SignIn, response: Response, request: Request) -> dict[str, Any]:
        """Sign in with operator id and PIN; 5 wrong PINs lock the operator out for 15 minutes."""
        s = call(svc.sign_in, req.operator_id, req.pin)
        # Secure over the LAN's HTTPS listener (the cookie then never travels in clear); the kiosk's own
        # loopback listener is plain HTTP and must still get it.
        response.set_cookie("rekam_session", s.token, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")
        return {"token": s.token, "operator_id": s.operator.id, "name": s.operator.name, "role": s.operator.role}

    @r.post("/auth/signout")
    def signout(response: Response, authorization: str | None = Auth, rekam_session: str | None = Sess) -> dict:
        svc.sign_out(token(authorization, rekam_session))
        response.delete_cookie("rekam_session")
        return {"ok": True}

    @r.get("/auth/me")
    def me(authorization: str | None = Auth, rekam_session: str | None = Sess) -> dict[str, Any]:
        """Who is signed in and how long until the idle sign-out (does not count as activity)."""
        return svc.idle_info(token(authorization, rekam_session))

    @r.post("/enrollment", dependencies=deps)
    def start(req: Start, authorization: str | None = Auth, rekam_session: str | None = Sess) -> dict[str, Any]:
        """Start an enrollment for a NIK (refused while capture is halted)."""
        call(svc.start, token(authorization, rekam_session), req.nik, req.override_reason)
        return svc.describe()

    @r.get("/enrollment", dependencies=deps)
    def current(authorization: str | None = Auth, rekam_session: str | None = Sess) -> dict[str, Any]:
        """The enrollment in progress; another operator's shows whose it is and its step, not the resident."""
        return call(svc.describe_for, token(authorization, rekam_session))

    @r.post("/enrollment/face", dependencies=deps)
    def face(authorization: str | None = Auth, rekam_session: str | None = Sess) -> dict[str, Any]:
        """Take one face photo and return its quality feedback."""
        return call(svc.face_attempt, token(authorization, rekam_session))

    @r.post("/enrollment/face/exception", dependencies=deps)
    def face_exc(req: Reason, authorization: str | None = Auth, rekam_session: str | None = Sess) -> dict:
        call(svc.face_exception, token(authorization, rekam_session), req.reason)
        return svc.describe()

    @r.post("/enrollment/fingers/{code}", dependencies=deps)
    def finger(code: str = Path(pattern=FINGER), authorization: str | None = Auth,
               rekam_session: str | None = Sess) -> dict[str, Any]:
        """Wait for the finger, capture it and return its quality feedback."""
        return call(svc.finger_attempt, token(authorization, rekam_session), code)

    @r.post("/enrollment/fingers/{code}/exception", dependencies=deps)
    def finger_exc(req: Reason, code: str = Path(pattern=FINGER), authorization: str | None = Auth,
                   rekam_session: str | None = Sess) -> dict[str, Any]:
        """Record a missing, bandaged or injured finger."""
        call(svc.finger_exception, token(authorization, rekam_session), code, req.reason)
        return svc.describe()

    @r.post("/enrollment/iris/{eye}", dependencies=deps)
    def iris(eye: str = Path(pattern=EYE), authorization: str | None = Auth,
             rekam_session: str | None = Sess) -> dict[str, Any]:
        """Take one NIR shot of the eye and return its quality feedback and the eye's position."""
        return call(svc.iris_attempt, token(authorization, rekam_session), eye)

    @r.get("/enrollment/iris/{eye}/live", dependencies=deps)
    def iris_live(eye: str = Path(pattern=EYE), authorization: str | None = Auth,
                  rekam_session: str | None = Sess) -> dict[str, Any]:
        """A live frame (preview `iris-live.jpg`) with the eye's offset and distance; nothing is recorded."""
        return call(svc.iris_preview, token(authorization, rekam_session), eye)

    @r.post("/enrollment/iris/{eye}/exception", dependencies=deps)
    def iris_exc(req: Reason, eye: str = Path(pattern=EYE), authorization: str | None = Auth,
                 rekam_session: str | None = Sess) -> dict[str, Any]:
        """Record a missing, blind or prosthetic eye."""
        call(svc.iris_exception, token(authorization, rekam_session), eye, req.reason)
        return svc.describe()

    @r.post("/enrollment/signature", dependencies=deps)
    def signature(req: Signature, authorization: str | None = Auth,
                  rekam_session: str | None = Sess) -> dict[str, Any]:
        """The resident's signature as pad strokes; the kit renders and checks it."""
        return call(svc.signature, token(authorization, rekam_session), req.strokes, req.width, req.height)

    @r.post("/enrollment/signature/exception", dependencies=deps)
    def signature_exc(req: Reason, authorization: str | None = Auth, rekam_session: str | None = Sess) -> dict:
        """The resident cannot sign (the reason is recorded; the thumbprint stands for it)."""
        call(svc.signature_exception, token(authorization, rekam_session), req.reason)
        return svc.describe()

    @r.post("/enrollment/dupcheck", dependencies=deps)
    def dupcheck(authorization: str | None = Auth, rekam_session: str | None = Sess) -> dict[str, Any]:
        """Search the new prints against this kit's earlier enrollments."""
        return call(svc.dup_check, token(authorization, rekam_session))

    @r.post("/enrollment/supervisor", dependencies=deps)
    def supervisor(req: Supervisor, authorization: str | None = Auth, rekam_session: str | None = Sess) -> dict:
        """A supervisor's decision on a flagged enrollment (with their own PIN)."""
        call(svc.supervisor_decision, token(authorization, rekam_session), req.supervisor_id, req.pin,
             req.decision, req.reason)
        return svc.describe()

    @r.post("/enrollment/commit", dependencies=deps)
    def commit(authorization: str | None = Auth, rekam_session: str | None = Sess) -> dict[str, Any]:
        """Seal and store the enrollment; returns the receipt data."""
        return call(svc.commit, token(authorization, rekam_session))

    @r.post("/enrollment/cancel", dependencies=deps)
    def cancel(authorization: str | None = Auth, rekam_session: str | None = Sess) -> dict[str, Any]:
        call(svc.cancel, token(authorization, rekam_session))
        return svc.describe()

    @r.get("/enrollment/preview/{name}", dependencies=deps)
    def preview(name: str = Path(pattern=r"^[A-Za-z0-9.-]{1,40}$"), authorization: str | None = Auth,
                rekam_session: str | None = Sess) -> Response:
        """A capture preview (biometric image): only for the enrollment's owner or a supervisor (403 not_owner)."""
        data = call(svc.preview, token(authorization, rekam_session), name)
        if data is None:
            raise HTTPException(404, {"code": "no_preview", "message": f"no preview {name}"})
        return Response(data, media_type="image/png" if name.endswith(".png") else "image/jpeg",
                        headers={"Cache-Control": "no-store"})

    @r.get("/receipts/{record_id}.{fmt}", dependencies=deps)
    def receipt(record_id: str = Path(pattern=rf"^{RECORD_ID_PATTERN}$"),
                fmt: str = Path(pattern=r"^(png|pdf)$"), authorization: str | None = Auth,
                rekam_session: str | None = Sess) -> Response:
        """The resident's receipt (record id, date, QR of id + hash) as PNG or PDF."""
        call(svc.session, token(authorization, rekam_session))
        row = kit.record(record_id)
        if row is None:
            raise HTTPException(404, {"code": "no_record", "message": f"no record {record_id}"})
        from firmware.enrollment import receipt as rc

        info = {"record_id": row["id"], "sha256": row["sha256"], "created": row["created"],
                "clock_synced": row["clock_synced"], "kit_id": kit.kit_id, "site": kit.site}
        if fmt == "png":
            return Response(rc.png(info), media_type="image/png")
        return Response(rc.pdf(info), media_type="application/pdf",
                        headers={"Content-Disposition": f'inline; filename="{record_id}.pdf"'})

    @r.get("/audit", dependencies=deps)
    def audit(limit: int = 100, authorization: str | None = Auth, rekam_session: str | None = Sess) -> list:
        """The newest audit events (operator actions, overrides, cancels, quarantines)."""
        call(svc.session, token(authorization, rekam_session))
        return kit.audit_events(limit=max(1, min(limit, 1000)))

    if sim_aliases is not None:
        @r.post("/sim/alias", dependencies=deps)
        def alias(req: Alias) -> dict[str, Any]:
            """Simulation: the resident with `nik` presents the fingers of `same_person_as` (a double enrollment)."""
            sim_aliases[req.nik] = req.same_person_as
            return {"ok": True}

    return r
