"""The daemon's local HTTP API (FastAPI; OpenAPI at /api/v1/openapi.json).

Used by the `rekam` CLI and the web console. Every input is validated by its model; errors are
JSON with a `detail` naming what was wrong.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, HTTPException, Query
from pydantic import BaseModel, Field

from firmware.console.port import KitPort
from firmware.store.capacity import CaptureHalted
from firmware.store.journal import STATES
from firmware.store.store import StoreError


class SimCommit(BaseModel):
    """Commit simulated enrollments (simulation mode only)."""

    count: int = Field(1, ge=1, le=10_000)
    operator_id: str = Field("sim-operator", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    pad_to_kb: int = Field(0, ge=0, le=8192)


def create_app(kit: KitPort) -> FastAPI:
    """Build the API bound to a running kit (through its console port)."""
    app = FastAPI(title="rekam kit API", version="1", openapi_url="/api/v1/openapi.json", docs_url="/api/v1/docs",
                  redoc_url=None)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"ok": True, "kit_id": kit.kit_id}

    @app.get("/api/v1/status")
    def status() -> dict[str, Any]:
        """Records per state, media capacity and guard state, stick, mirror lag, services."""
        return kit.status()

    @app.get("/api/v1/records")
    def records(state: str | None = Query(None, description="one of " + ", ".join(STATES)),
                limit: int = Query(100, ge=1, le=10_000)) -> list[dict[str, Any]]:
        """The newest records (optionally of one state)."""
        if state is not None and state not in STATES:
            raise HTTPException(422, f"state {state!r} is not one of {', '.join(STATES)}")
        return kit.records(state=state, limit=limit)

    @app.post("/api/v1/usb/eject")
    def usb_eject() -> dict[str, Any]:
        """Flush and release the stick so it can be pulled safely."""
        ok = kit.eject_usb()
        if not ok:
            raise HTTPException(500, "the stick was flushed but could not be unmounted; do not pull it yet")
        return {"ok": True}

    @app.post("/api/v1/usb/export")
    def usb_export(limit: int | None = Query(None, ge=1, le=100_000,
                                             description="copy at most this many (callers loop for progress)")
                   ) -> dict[str, Any]:
        """Copy every live record the mounted stick lacks now (backfill); returns copied and remaining counts."""
        res = kit.export_usb(limit)
        if res is None:
            raise HTTPException(409, {"code": "no_stick", "message": "no USB stick is mounted: insert the stick"})
        return res

    @app.post("/api/v1/sim/commit")
    def sim_commit(req: SimCommit) -> dict[str, Any]:
        """Commit `count` simulated enrollments through the real store."""
        if not kit.simulation:
            raise HTTPException(409, "simulated commits are only accepted in simulation mode (rekamd --sim)")
        done: list[dict[str, Any]] = []
        try:  # the port stops early when the daemon is stopping: report what was committed
            for res in kit.commit_simulated(req.count, req.operator_id, pad_to=req.pad_to_kb * 1024):
                done.append(res)
        except CaptureHalted as e:
            raise HTTPException(507, {"error": "capture halted", "reason": e.reason, "committed": done}) from None
        except StoreError as e:
            raise HTTPException(500, {"error": str(e), "committed": done}) from None
        return {"committed": done}

    if kit.enrollment is not None:
        from firmware.console.api_enroll import router

        app.include_router(router(kit.enrollment, kit, kit.sim_aliases))
    _mount_console(app)
    return app


CSP = "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"


def _mount_console(app: FastAPI) -> None:
    """Serve the web console (firmware/console/web, static, no build step) at / with a strict CSP (mounted last)."""
    from pathlib import Path

    from fastapi.staticfiles import StaticFiles

    @app.middleware("http")
    async def security_headers(request: Any, call_next: Any) -> Any:
        response = await call_next(request)
        if not request.url.path.startswith("/api/v1/docs"):  # Swagger UI needs its own inline script
            response.headers.setdefault("Content-Security-Policy", CSP)
            response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    web = Path(__file__).resolve().parent / "web"
    if web.is_dir():
        app.mount("/", StaticFiles(directory=web, html=True), name="console")
