"""The daemon's local HTTP API (FastAPI; OpenAPI at /api/v1/openapi.json).

Used by the `rekam` CLI and the web console. Every input is validated by its model; errors are
JSON with a `detail` naming what was wrong, never a 500 for a bad body (see `guard`).

Every route needs a credential except `/healthz` (which says only that the kit answers), the
sign-in route and the console's static files: an operator session (`Authorization: Bearer`, or the
console's same-site cookie) or the kit's local token (`X-Rekam-Token`, the `rekam` CLI; the token
is in `api.token` in the state directory, mode 0640 in the 0700 state directory: root and the daemon's user).
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from firmware.console.port import KitPort
from firmware.store.capacity import CaptureHalted
from firmware.store.journal import STATES
from firmware.store.store import StoreError
from firmware.system import i18n


class SimCommit(BaseModel):
    """Commit simulated enrollments (simulation mode only)."""

    count: int = Field(1, ge=1, le=10_000)
    operator_id: str = Field("sim-operator", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    pad_to_kb: int = Field(0, ge=0, le=8192)


LOCAL_TOKEN_HEADER = "X-Rekam-Token"
#: The language a client reads (the console's choice, the CLI's $REKAM_LANG): the API words its answers
#: (guard reasons, error messages) in it; without it, in the kit's language. Codes never change with it.
LANG_HEADER = "X-Rekam-Lang"


class LanguageMiddleware:
    """Each request speaks the language its `X-Rekam-Lang` header names (the catalog's per-context language
    reaches the worker thread that runs the handler)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        lang = None
        if scope.get("type") == "http":
            for k, v in scope.get("headers") or ():
                if k == b"x-rekam-lang":
                    lang = v.decode("latin-1").strip()
                    break
        with i18n.use_language(lang or None):  # an unknown language: the kit's
            await self.app(scope, receive, send)
NOT_SIGNED_IN = {"code": "not_signed_in",
                 "message": "silakan masuk dulu / sign in first (or run rekam as root: sudo rekam ...)"}


def kit_language(kit: KitPort) -> str:
    """The language in the kit's config (`[kit] language`), else the catalog's default."""
    svc = kit.enrollment
    lang = getattr(getattr(getattr(svc, "cfg", None), "kit", None), "language", None)
    return i18n.normalize(lang) if isinstance(lang, str) else i18n.get_language()


def session_checker(kit: KitPort, local_token: str) -> Any:
    """A FastAPI dependency: the request carries the local token or a live operator session, else 401.

    Checking does not count as operator activity (status polls must not hold off the idle sign-out).
    """

    def check(request: Request) -> str:
        got = request.headers.get(LOCAL_TOKEN_HEADER, "")
        if local_token and got and hmac.compare_digest(got.encode(), local_token.encode()):
            return "local"
        auth = request.headers.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else request.cookies.get("rekam_session", "")
        svc = kit.enrollment
        if token and svc is not None:
            info = svc.idle_info(token)
            if info.get("signed_in") and info.get("signout_in_s", 0) > 0:
                return str(info["operator_id"])
        raise HTTPException(401, NOT_SIGNED_IN)

    return check


def create_app(kit: KitPort, local_token: str = "", tls: Any = None) -> FastAPI:
    """Build the API bound to a running kit (through its console port).

    `local_token`: the CLI's credential (empty: only operator sessions); `tls`: the console certificate
    (`firmware.console.tls.ConsoleCert`) whose fingerprint `/api/v1/tls` shows, or None.
    """
    # The schema and its viewer need a credential too (served by our own routes below, not FastAPI's open ones).
    app = FastAPI(title="rekam kit API", version="1", openapi_url=None, docs_url=None, redoc_url=None)
    app.add_middleware(LanguageMiddleware)
    signed_in = Depends(session_checker(kit, local_token))

    @app.get("/api/v1/openapi.json", dependencies=[signed_in], include_in_schema=False)
    def openapi() -> dict[str, Any]:
        return app.openapi()

    # No Swagger UI / ReDoc on the console port (issue #16 item 3): they load their scripts from a CDN, and a
    # field kit is offline; the schema above (with a credential) and docs/protocol.md describe the API, and
    # the console keeps one strict CSP with no inline-script exception.

    @app.get("/api/v1/i18n", include_in_schema=False)
    def i18n_default() -> dict[str, Any]:
        """The console's texts in the kit's configured language (public: the sign-in page needs them)."""
        return _catalog(None)

    @app.get("/api/v1/i18n/{lang}", include_in_schema=False)
    def i18n_lang(lang: str = Path(pattern=r"^[a-z]{2}$")) -> dict[str, Any]:
        """The console's texts in `lang` (one of the kit's languages; others get the default)."""
        return _catalog(lang)

    def _catalog(lang: str | None) -> dict[str, Any]:
        default = kit_language(kit)
        chosen = i18n.normalize(lang) if lang in i18n.LANGUAGES else default
        return {"lang": chosen, "default": default, "languages": list(i18n.LANGUAGES),
                "messages": i18n.catalog(chosen, "console")}

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Only where and what: the rejected input itself may not be JSON-serialisable (and is the caller's anyway).
        errors = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
                  for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        """The kit answers (nothing else: no id, no counts)."""
        return {"ok": True}

    @app.get("/api/v1/tls", dependencies=[signed_in])
    def tls_info() -> dict[str, Any]:
        """The HTTPS console's certificate fingerprint (SHA-256) and a QR code of it, for the operator to compare."""
        if tls is None:
            return {"https": False}
        return {"https": True, "sha256": tls.sha256, "fingerprint": tls.fingerprint, "qr": "/api/v1/tls/qr.svg"}

    @app.get("/api/v1/tls/qr.svg", dependencies=[signed_in])
    def tls_qr() -> Response:
        """The fingerprint as a QR code (SVG) for the console's status page."""
        if tls is None:
            raise HTTPException(404, {"code": "no_https", "message": "no HTTPS console ([api] https_bind unset)"})
        from firmware.console.tls import qr_svg

        return Response(qr_svg(tls), media_type="image/svg+xml", headers={"Cache-Control": "no-store"})

    @app.get("/api/v1/status", dependencies=[signed_in])
    def status() -> dict[str, Any]:
        """Records per state, media capacity and guard state, stick, mirror lag, services."""
        return kit.status()

    @app.get("/api/v1/records", dependencies=[signed_in])
    def records(state: str | None = Query(None, description="one of " + ", ".join(STATES)),
                limit: int = Query(100, ge=1, le=10_000)) -> list[dict[str, Any]]:
        """The newest records (optionally of one state)."""
        if state is not None and state not in STATES:
            raise HTTPException(422, f"state {state!r} is not one of {', '.join(STATES)}")
        return kit.records(state=state, limit=limit)

    @app.post("/api/v1/usb/eject", dependencies=[signed_in])
    def usb_eject() -> dict[str, Any]:
        """Flush and release the stick so it can be pulled safely."""
        ok = kit.eject_usb()
        if not ok:
            raise HTTPException(500, "the stick was flushed but could not be unmounted; do not pull it yet")
        return {"ok": True}

    @app.post("/api/v1/usb/export", dependencies=[signed_in])
    def usb_export(limit: int | None = Query(None, ge=1, le=100_000,
                                             description="copy at most this many (callers loop for progress)")
                   ) -> dict[str, Any]:
        """Copy every live record the mounted stick lacks now (backfill); returns copied and remaining counts."""
        res = kit.export_usb(limit)
        if res is None:
            raise HTTPException(409, {"code": "no_stick", "message": "no USB stick is mounted: insert the stick"})
        return res

    @app.post("/api/v1/sim/commit", dependencies=[signed_in])
    def sim_commit(req: SimCommit) -> dict[str, Any]:
        """Commit `count` simulated enrollments through the real store."""
        if not kit.simulation:
            raise HTTPException(409, "simulated commits are only accepted in simulation mode (rekamd --sim)")
        done: list[dict[str, Any]] = []
        try:  # the port stops early when the daemon is stopping: report what was committed
            for res in kit.commit_simulated(req.count, req.operator_id, pad_to=req.pad_to_kb * 1024):
                done.append(res)
        except CaptureHalted as e:
            raise HTTPException(507, {"error": "capture halted", "code": e.code, "reason": e.reason,
                                     "committed": done}) from None
        except StoreError as e:
            raise HTTPException(500, {"error": str(e), "committed": done}) from None
        return {"committed": done}

    if kit.enrollment is not None:
        from firmware.console.api_enroll import router

        app.include_router(router(kit.enrollment, kit, kit.sim_aliases, signed_in))
    _mount_console(app)
    return app


CSP = "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"


def _mount_console(app: FastAPI) -> None:
    """Serve the web console (firmware/console/web, static, no build step) at / with a strict CSP (mounted last)."""
    from pathlib import Path as FsPath

    from fastapi.staticfiles import StaticFiles

    @app.middleware("http")
    async def security_headers(request: Any, call_next: Any) -> Any:
        response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    web = FsPath(__file__).resolve().parent / "web"
    if web.is_dir():
        app.mount("/", StaticFiles(directory=web, html=True), name="console")
