"""HTTP routes: ``/memslice/v1/status`` and ``/memslice/v1/plan``, and the page's copy of both under
``/internal/memslice/v1/``. Bounded arithmetic, no GPU work, no queue lock.

Who may ask. One rule: each copy is protected by what protects its own users.

- The API (``/memslice/v1/``) by ``--api-auth``, exactly as ``/sdapi``: HTTP Basic, checked the way
  ``modules/api/api.py`` checks it. Without ``--api-auth`` it is open, as ``/sdapi`` is.
- The page's copy (``/internal/memslice/v1/``, for javascript/memslice.js) by the page's login. With
  ``--gradio-auth`` or ``--gradio-auth-path`` (the webui hands them to gradio's ``launch(auth=...)``) it wants
  gradio 3.41.2's session: the ``access-token`` cookie (else ``access-token-unsecure``) that gradio's ``/login``
  sets, looked up in the app's ``tokens`` as gradio's ``get_current_user`` does. It fails closed: a login asked for
  by the command line or by the app, and a session that cannot be verified (no cookie, an unknown one, an app
  without gradio's ``tokens``) is a 401. Without a page login it is open, as the page and the webui's own
  ``/internal`` routes are.
- The page's copy serves only the page's view, whatever the flags: the status line's part of the status (version,
  active entry, the last and the current job; no recent calls, settings, device or memory) and plans of the loaded
  model with the active entry (``model`` and ``strategy`` are refused). With ``--api-auth`` and no page login it is
  therefore open, as the page itself is, but it answers only what the open page shows anyway: it is not a way
  around ``--api-auth``. The page cannot know API credentials, so refusing it would only break the panel.

Bounded, both copies alike: sizes as the webui's sliders allow (``modules/ui.py``): batch 8, hires scale 4, hires
"Resize width/height to" 2048 px, and no pass larger than 8192 px a side (2048 x 4: txt2img's largest hires target,
img2img's "Resize by" 4 of a 2048 px image; the first pass may be one, the page sends img2img's computed size);
larger jobs: the CLI or ``api.job_fits``. One plan computed at a time, up
to :data:`MAX_WAITING` requests waiting (the page asks four at once) at most :data:`WAIT_S` each, the rest 503 with
``Retry-After``; the last :data:`CACHE_SIZE` answers kept, keyed by :class:`planner.PlanInputs` (every input of a
plan: request, settings, loaded model, dtypes, entry, free memory). Free memory is read in :data:`FREE_STEP` steps,
rounded down, and planned in that reading, so every request in the same step gets the same answer and a cached
"fits" never counts memory the reading now does not show. Added to every app the webui creates: whether an app has
the routes is read off its routes, never off an id that a new app could reuse.
"""

from __future__ import annotations

import math
import secrets
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from fastapi import Depends, HTTPException, Query, Request
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from modules import shared  # type: ignore[import-not-found]

from .. import __version__, probe, strategies
from ..costs import AttentionShape
from ..job_plan import UPSCALERS, hires_size
from ..models import MODEL_NAMES
from ..settings import SPEC_BY_KEY, coerce
from ..slicing import budget_room, room_for
from . import planner
from .host import HOST, STATS, active_entry, device

MAX_SIDE = 2048  # the webui's Width/Height and hires "Resize width/height to" sliders (modules/ui.py)
MAX_BATCH = 8  # its Batch size slider
MAX_HR_SCALE = 4.0  # its hires "Upscale by" and img2img's "Resize by" sliders
MAX_PASS_SIDE = int(MAX_SIDE * MAX_HR_SCALE)  # the largest pass those make: a hires target, an img2img resized by 4
MAX_RECENT = 256
FREE_STEP = 32 << 20  # free memory is planned in these steps, rounded down
CACHE_SIZE = 64
MAX_WAITING = 8  # plan requests computing or waiting for the one computing; more get 503
WAIT_S = 10.0
API = "/memslice/v1"
PAGE = "/internal/memslice/v1"
#: the cookies gradio 3.41.2's ``/login`` sets, in the order its ``get_current_user`` reads them (gradio/routes.py)
SESSION_COOKIES = ("access-token", "access-token-unsecure")
PAGE_STATUS = ("version", "active", "last_job", "current_job")  # what javascript/memslice.js reads
NO_INPUTS = AttentionShape(0, 0, 0, 0)  # the room before any call's own inputs
_lock = threading.Lock()
_planning = threading.Lock()
_waiting = threading.BoundedSemaphore(MAX_WAITING)
_answers: OrderedDict[planner.PlanInputs, dict[str, Any]] = OrderedDict()
_answers_lock = threading.Lock()


def status(limit: int = 32) -> dict[str, Any]:
    """What memslice is doing: device, free memory, room, active entry, settings, recent plans, the last job."""
    settings = HOST.settings()
    free = probe.free_memory(device(), precise=True)
    budget = int(settings.budget_gb * (1 << 30)) if settings.budget_gb > 0 else None
    entry = active_entry()
    room, why = active_room(entry.strategy if entry else None, free.bytes, settings)
    last = STATS.last_job
    return {
        "version": __version__,
        "device": str(device()),
        "device_kind": probe.device_kind(device()),
        "free_bytes": free.bytes,
        "free_source": free.source,
        "attention_budget_bytes": budget,
        "room_bytes": room,
        "room": why,
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


def active_room(strategy: str | None, free_bytes: int, settings: Any) -> tuple[int | None, str]:
    """(bytes, how) of the room the active strategy plans a call in before its own inputs, with the planner's own
    functions (the webui's rules: free x 3.3 / safety factor, at most free); (None, why) with no memslice entry
    active, since then the webui's own optimization runs attention and memslice plans nothing."""
    if strategy is None:
        return None, "no memslice entry is active: the webui's own cross attention optimization runs"
    if settings.budget_gb > 0:
        return budget_room(int(settings.budget_gb * (1 << 30))).bytes_for(NO_INPUTS), "the attention budget"
    room = room_for(strategy, free_bytes, settings.safety_factor)
    return room.bytes_for(NO_INPUTS), f"{strategy}: free memory / {room.divisor:g}"


def page_status() -> dict[str, Any]:
    """The page's view of :func:`status`: what the status line under each generation reads, and no more."""
    found = status(0)
    return {key: found[key] for key in PAGE_STATUS}


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

    def auth(credentials: HTTPBasicCredentials = Depends(HTTPBasic())) -> bool:  # noqa: B008 (FastAPI's idiom)
        known = _credentials()
        if credentials.username in known and secrets.compare_digest(credentials.password, known[credentials.username]):
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})  # fmt: skip

    return Depends(auth)


def page_login(app: Any) -> bool:
    """Whether the page has a login: gradio's app holds ``auth`` (``launch(auth=...)``), or the command line asks
    for one (``--gradio-auth``, ``--gradio-auth-path``: then an app without gradio's login still needs one)."""
    opts = getattr(shared, "cmd_opts", None)
    asked = bool(getattr(opts, "gradio_auth", None) or getattr(opts, "gradio_auth_path", None))
    return asked or getattr(app, "auth", None) is not None


def session_user(app: Any, cookies: Mapping[str, str]) -> Any | None:
    """The user of a gradio 3.41.2 session, as its ``get_current_user`` finds it (the ``access-token`` cookie, else
    ``access-token-unsecure``, in ``app.tokens``); None when that cannot be verified."""
    tokens = getattr(app, "tokens", None)
    if not isinstance(tokens, dict):
        return None
    token = cookies.get(SESSION_COOKIES[0]) or cookies.get(SESSION_COOKIES[1])
    return tokens.get(token) if token else None


def _page_session(app: Any) -> Any:
    """A FastAPI dependency: the page's login, when it has one (read at each request: gradio may reset its tokens)."""

    def session(request: Request) -> None:
        if page_login(app) and session_user(app, request.cookies) is None:
            raise HTTPException(status_code=401, detail="Not authenticated: log in to the page first")

    return Depends(session)


def coarse(free: probe.FreeMemory) -> probe.FreeMemory:
    """A reading in :data:`FREE_STEP` steps, rounded down (its ceiling too): what plans (and their cache) are
    computed in."""
    rounded = max(0, free.bytes) // FREE_STEP * FREE_STEP
    ceiling = None if free.ceiling is None else max(0, free.ceiling) // FREE_STEP * FREE_STEP
    return replace(free, bytes=rounded, ceiling=ceiling, source=f"{free.source}, in {FREE_STEP >> 20} MiB steps")


def _recall(inputs: planner.PlanInputs) -> dict[str, Any] | None:
    with _answers_lock:
        found = _answers.get(inputs)
        if found is not None:
            _answers.move_to_end(inputs)
        return found


def cached_plan(inputs: planner.PlanInputs) -> dict[str, Any]:
    """The answer for ``inputs``, from the cache or computed, one at a time; 503 when too many wait."""
    found = _recall(inputs)
    if found is not None:
        return found
    busy = HTTPException(status_code=503, detail="memslice is planning other requests; retry in a second",
                         headers={"Retry-After": "1"})  # fmt: skip
    if not _waiting.acquire(blocking=False):
        raise busy
    try:
        if not _planning.acquire(timeout=WAIT_S):
            raise busy
        try:
            found = _recall(inputs)  # answered while this request waited
            if found is None:
                found = planner.plan_inputs(inputs)
                with _answers_lock:
                    _answers[inputs] = found
                    while len(_answers) > CACHE_SIZE:
                        _answers.popitem(last=False)
        finally:
            _planning.release()
    finally:
        _waiting.release()
    return found


def _plan_route(page: bool) -> Any:
    """The plan route of one copy: the page's refuses ``model`` and ``strategy`` (it plans what the page runs)."""

    def get_plan(
        width: int = Query(512, ge=8, le=MAX_PASS_SIDE),
        height: int = Query(512, ge=8, le=MAX_PASS_SIDE),
        batch: int = Query(1, ge=1, le=MAX_BATCH),
        model: str | None = Query(None, max_length=16),
        strategy: str | None = Query(None, max_length=16),
        safety_factor: float | None = Query(None, ge=1.0, le=10.0),
        slice_cap: int | None = Query(None, ge=1, le=65536),
        budget_gb: float | None = Query(None, ge=0.0, le=4096.0),
        hr_scale: float | None = Query(None, ge=1.0, le=MAX_HR_SCALE),
        hr_width: int | None = Query(None, ge=8, le=MAX_SIDE),
        hr_height: int | None = Query(None, ge=8, le=MAX_SIDE),
        hr_upscaler: str = Query("latent", max_length=16),
        img2img: bool = Query(False),
        kernel: str | None = Query(None, max_length=16),
        vae: str | None = Query(None, max_length=16),
    ) -> dict[str, Any]:
        if page and (model is not None or strategy is not None):
            raise HTTPException(400, f"the page's planner plans the loaded model with the active entry; {API}/plan "
                                     "takes model and strategy")  # fmt: skip
        if model is not None and model not in MODEL_NAMES:
            raise HTTPException(400, f"model must be one of {', '.join(MODEL_NAMES)} (or omitted for the loaded one)")
        if strategy is not None and strategy not in strategies.NAMES:
            raise HTTPException(400, f"strategy must be one of {', '.join(strategies.NAMES)}")
        for name, value in (("safety_factor", safety_factor), ("budget_gb", budget_gb), ("hr_scale", hr_scale)):
            if value is not None and not math.isfinite(value):
                raise HTTPException(400, f"{name} must be a finite number")
        if hr_upscaler not in UPSCALERS:
            raise HTTPException(400, f"hr_upscaler must be one of {', '.join(UPSCALERS)}")
        hires = hires_size(width, height, hr_scale, hr_width, hr_height)
        if hires is not None and max(hires) > MAX_PASS_SIDE:
            raise HTTPException(400, f"the hires pass would be {hires[0]}x{hires[1]}: at most {MAX_PASS_SIDE} px a "
                                     "side")  # fmt: skip
        for key, value in (("memslice_kernel", kernel), ("memslice_vae", vae)):  # the page's radios, unsaved
            if value is not None and coerce(SPEC_BY_KEY[key], value)[1] is not None:
                raise HTTPException(400, f"{key[9:]} must be one of {', '.join(SPEC_BY_KEY[key].choices)}")
        overrides = {"memslice_safety_factor": safety_factor, "memslice_slice_cap": slice_cap,
                     "memslice_budget_gb": budget_gb, "memslice_kernel": kernel, "memslice_vae": vae}  # fmt: skip
        free = coarse(probe.free_memory(device(), precise=True))
        return cached_plan(planner.inputs_for(width, height, batch, model, strategy, overrides, hr_scale, hr_width,
                                              hr_height, hr_upscaler, img2img, free))  # fmt: skip

    return get_plan


def add_routes(app: Any) -> None:
    """Both copies of both routes, once per app."""

    def get_status(limit: int = Query(32, ge=0, le=MAX_RECENT)) -> dict[str, Any]:
        return status(limit)

    def get_page_status() -> dict[str, Any]:
        return page_status()

    with _lock:
        present = {getattr(route, "path", None) for route in getattr(app, "routes", ())}
        if f"{API}/status" in present:
            return
        api = [_api_auth()] if _credentials() else []
        page = [_page_session(app)]
        app.add_api_route(f"{API}/status", get_status, methods=["GET"], dependencies=api)
        app.add_api_route(f"{API}/plan", _plan_route(False), methods=["GET"], dependencies=api)
        app.add_api_route(f"{PAGE}/status", get_page_status, methods=["GET"], dependencies=page)
        app.add_api_route(f"{PAGE}/plan", _plan_route(True), methods=["GET"], dependencies=page)


def on_app_started(demo: Any, app: Any) -> None:
    try:
        add_routes(app)
    except Exception as exc:
        import logging

        logging.getLogger("memslice").warning("memslice: could not add the HTTP routes: %s", exc)
