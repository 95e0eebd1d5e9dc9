"""HTTP routes: ``/memslice/v1/status`` and ``/memslice/v1/plan``. Bounded arithmetic, no GPU work, no queue lock.

Two copies of each, as the webui itself has: the API under ``/memslice/v1/`` requires the ``--api-auth``
credentials exactly as ``/sdapi`` does (HTTP Basic, checked the way ``modules/api/api.py`` checks them), and the
page's own under ``/internal/memslice/v1/`` (the live planner cannot know API credentials; the webui's page routes
such as ``/internal/progress`` are outside ``--api-auth`` too). Added to every app the webui creates: whether an
app has them is read off its routes, never off an id that a new app could reuse.
"""

from __future__ import annotations

import math
import secrets
import threading
from typing import Any

from modules import shared  # type: ignore[import-not-found]

from .. import __version__, probe, strategies
from ..job_plan import NOT_PLANNED, UPSCALERS
from ..models import MODEL_NAMES
from . import planner
from .host import HOST, STATS, active_entry, device

MAX_SIDE = 16384
MAX_BATCH = 64
MAX_RECENT = 256
API = "/memslice/v1"
PAGE = "/internal/memslice/v1"
_lock = threading.Lock()


def status(limit: int = 32) -> dict[str, Any]:
    """What memslice is doing: device, free memory, room, active entry, settings, recent plans, the last job."""
    settings = HOST.settings()
    free = probe.free_memory(device())
    budget = int(settings.budget_gb * (1 << 30)) if settings.budget_gb > 0 else None
    entry = active_entry()
    last = STATS.last_job
    return {
        "version": __version__,
        "device": str(device()),
        "device_kind": probe.device_kind(device()),
        "free_bytes": free.bytes,
        "free_source": free.source,
        "attention_budget_bytes": budget,
        "room_bytes": budget if budget is not None else int(free.bytes / settings.safety_factor),
        "active": entry.title() if entry else None,
        "strategy": entry.strategy if entry else None,
        "settings": settings.as_options(),
        "model": planner.loaded_kind(),
        "totals": {
            "calls": STATS.total_calls,
            "oom_retries": STATS.total_retries,
            "not_enough_memory": STATS.total_failures,
        },
        "last_job": last.as_dict() | {"line": last.line(), "infotext": last.infotext()} if last else None,
        "current_job": STATS.current_job().as_dict(),
        "recent": [r.as_dict() for r in STATS.recent(limit)],
    }


def _credentials() -> dict[str, str]:
    """``--api-auth "user:password,user2:password2"`` as the webui's Api class parses it."""
    text = getattr(getattr(shared, "cmd_opts", None), "api_auth", None)
    found = {}
    for pair in str(text).split(",") if text else ():
        user, _, password = pair.partition(":")
        found[user] = password
    return found


def _api_auth() -> Any:
    """A FastAPI dependency that accepts the ``--api-auth`` credentials (HTTP Basic), as ``/sdapi`` does."""
    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPBasic

    # no annotation: with postponed annotations FastAPI could not resolve a locally imported type
    def auth(credentials=Depends(HTTPBasic())) -> bool:  # noqa: B008 (FastAPI's idiom)
        known = _credentials()
        if credentials.username in known and secrets.compare_digest(credentials.password, known[credentials.username]):
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})  # fmt: skip

    return Depends(auth)


def add_routes(app: Any) -> None:
    """Both copies of both routes, once per app."""
    from fastapi import HTTPException, Query

    def get_status(limit: int = Query(32, ge=0, le=MAX_RECENT)) -> dict[str, Any]:
        return status(limit)

    def get_plan(
        width: int = Query(512, ge=8, le=MAX_SIDE),
        height: int = Query(512, ge=8, le=MAX_SIDE),
        batch: int = Query(1, ge=1, le=MAX_BATCH),
        model: str | None = Query(None, max_length=16),
        strategy: str | None = Query(None, max_length=16),
        safety_factor: float | None = Query(None, ge=1.0, le=10.0),
        slice_cap: int | None = Query(None, ge=1, le=65536),
        budget_gb: float | None = Query(None, ge=0.0, le=4096.0),
        hr_scale: float | None = Query(None, ge=1.0, le=8.0),
        hr_width: int | None = Query(None, ge=8, le=MAX_SIDE),
        hr_height: int | None = Query(None, ge=8, le=MAX_SIDE),
        hr_upscaler: str = Query("latent", max_length=16),
        img2img: bool = Query(False),
    ) -> dict[str, Any]:
        if model is not None and model not in MODEL_NAMES and model not in NOT_PLANNED:
            raise HTTPException(400, f"model must be one of {', '.join(MODEL_NAMES)} (or omitted for the loaded one)")
        if strategy is not None and strategy not in strategies.NAMES:
            raise HTTPException(400, f"strategy must be one of {', '.join(strategies.NAMES)}")
        for name, value in (("safety_factor", safety_factor), ("budget_gb", budget_gb), ("hr_scale", hr_scale)):
            if value is not None and not math.isfinite(value):
                raise HTTPException(400, f"{name} must be a finite number")
        if hr_upscaler not in UPSCALERS:
            raise HTTPException(400, f"hr_upscaler must be one of {', '.join(UPSCALERS)}")
        overrides = {"memslice_safety_factor": safety_factor, "memslice_slice_cap": slice_cap,
                     "memslice_budget_gb": budget_gb}  # fmt: skip
        return planner.plan_for(width, height, batch, model, strategy, overrides, hr_scale, hr_width, hr_height,
                                hr_upscaler, img2img)  # fmt: skip

    with _lock:
        present = {getattr(route, "path", None) for route in getattr(app, "routes", ())}
        if f"{API}/status" in present:
            return
        protected = {"dependencies": [_api_auth()]} if _credentials() else {}
        for prefix, extra in ((API, protected), (PAGE, {})):
            app.add_api_route(f"{prefix}/status", get_status, methods=["GET"], **extra)
            app.add_api_route(f"{prefix}/plan", get_plan, methods=["GET"], **extra)


def on_app_started(demo: Any, app: Any) -> None:
    try:
        add_routes(app)
    except Exception as exc:
        import logging

        logging.getLogger("memslice").warning("memslice: could not add the HTTP routes: %s", exc)
