"""The only module that touches the webui: optimizer entries, settings, HTTP routes, infotext, site tags.

Contract (webui 1.10.x, see shared/design.md section 2): entries are listed through
``script_callbacks.on_list_optimizers``; ``sd_hijack.apply_optimizations`` restores the stock forwards, calls the
previous entry's ``undo()`` and our ``apply()``; the base ``SdOptimization.undo()`` restores exactly what the
webui expects, so it is inherited untouched. Everything that runs at startup is wrapped so a failure here is a
logged message, never a dead webui.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import weakref
from typing import Any

import torch
from modules import script_callbacks, sd_hijack_optimizations, shared  # type: ignore[import-not-found]

from . import __version__, kernels, probe
from .costs import KernelChoice, format_bytes
from .forwards import make_attnblock_forward, make_cross_attention_forward
from .job_plan import UPSCALERS, Job, hires_size, plan_job
from .models import BUILTIN, MODEL_NAMES, ModelSpec, Weights, sites_from_modules
from .settings import CATEGORY_ID, SECTION, SPECS, Settings, coerce, read_settings, warn_once
from .slicing import STRATEGY_NAMES, NotEnoughMemory
from .stats import CallRecord, Stats

# Records go through the webui's own logging configuration (it sets the root level from --loglevel or
# SD_WEBUI_LOG_LEVEL); memslice only asks for INFO on its own logger so the one-line job summary is not dropped
# by Python's default WARNING threshold, and adds no handler of its own.
log = logging.getLogger("memslice")
if log.level == logging.NOTSET:
    log.setLevel(logging.INFO)

LABELS = {
    "auto": "memslice automatic planner",
    "doggettx": "memslice Doggettx (query slices)",
    "invokeai": "memslice InvokeAI (heads, then queries)",
    "mps": "memslice MPS (Metal-safe slices)",
    "heads": "memslice per-head (diffusers style)",
}
CMD_OPT = "opt_memslice"  # --opt-memslice, added by preload.py

STATS = Stats()
_loaded: dict[str, Any] = {"spec": None, "kind": None, "weights": None}
_running: dict[str, Any] = {"p": None}  # a weak reference to the running job's processing object


def _ldm_sgm() -> list[Any]:
    """(CrossAttention class, AttnBlock class, saved original AttnBlock forward) pairs for ldm, then sgm."""
    import ldm.modules.attention
    import ldm.modules.diffusionmodules.model

    pairs = [
        (
            ldm.modules.attention.CrossAttention,
            ldm.modules.diffusionmodules.model.AttnBlock,
            getattr(sd_hijack_optimizations, "diffusionmodules_model_AttnBlock_forward", None),
        )
    ]
    try:
        import sgm.modules.attention
        import sgm.modules.diffusionmodules.model
    except ImportError:  # webui without the SDXL repository: ldm alone
        return pairs
    pairs.append(
        (
            sgm.modules.attention.CrossAttention,
            sgm.modules.diffusionmodules.model.AttnBlock,
            getattr(sd_hijack_optimizations, "sgm_diffusionmodules_model_AttnBlock_forward", None),
        )
    )
    return pairs


class WebuiHost:
    """The Host the forwards use inside the webui: options, hypernetworks, upcast and autocast from ``modules``."""

    def settings(self) -> Settings:
        opts = getattr(shared, "opts", None)
        return read_settings(lambda key, default: getattr(opts, key, default))

    def apply_hypernetworks(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from modules.hypernetworks import hypernetwork  # type: ignore[import-not-found]

        return hypernetwork.apply_hypernetworks(shared.loaded_hypernetworks, context)

    def upcast(self) -> bool:
        return bool(getattr(shared.opts, "upcast_attn", False))

    def without_autocast(self) -> Any:
        from modules import devices  # type: ignore[import-not-found]

        return devices.without_autocast()

    def record(self, record: CallRecord) -> None:
        STATS.record(record)

    def record_failure(self, error: NotEnoughMemory) -> None:
        STATS.record_failure()
        context = job_context(error)
        if context:  # the webui shows the exception's text: name the pass and what would fit there
            error.args = (f"{error.args[0]} {context}", *error.args[1:])


HOST = WebuiHost()


def _device_kind() -> str:
    try:
        return probe.device_kind(shared.device)
    except Exception:
        return "unknown"


class MemsliceOptimization(sd_hijack_optimizations.SdOptimization):
    """One dropdown entry per strategy. Titles (``name - label``) are what config.json stores: keep them stable."""

    def __init__(self, strategy: str) -> None:
        self.strategy = strategy
        self.name = f"memslice-{strategy}"
        self.label = LABELS[strategy]
        self.cmd_opt = CMD_OPT if strategy == "auto" else None

    @property
    def priority(self) -> int:  # type: ignore[override]
        """memslice-auto wins 'Automatic' on CUDA, XPU and CPU, where its fused-kernel plans are at least as fast
        as every built-in and never run out of memory silently. On MPS sub-quadratic (1000) keeps its place and on
        unknown backends (DirectML) the free memory cannot be measured, so memslice waits to be chosen. The
        other strategies never win 'Automatic'. Evaluated at startup without try/except by the webui: never raises.
        """
        try:
            if self.strategy != "auto":
                return 1
            return {"cuda": 95, "xpu": 95, "cpu": 1001}.get(_device_kind(), 5)
        except Exception:
            return 1

    def is_available(self) -> bool:
        return True

    def apply(self) -> None:
        for cross_attention, attn_block, original in _ldm_sgm():
            cross_attention.forward = make_cross_attention_forward(self.strategy, HOST)
            fallback = original if original is not None else attn_block.forward
            if getattr(fallback, "__memslice__", None):  # never fall back onto ourselves
                fallback = None
            attn_block.forward = make_attnblock_forward(self.strategy, HOST, fallback)


ENTRIES = tuple(MemsliceOptimization(s) for s in STRATEGY_NAMES)


def list_optimizers(res: list) -> None:
    """``on_list_optimizers`` callback: the same instances every time, so Reload UI keeps identities."""
    res.extend(ENTRIES)


def active_entry() -> MemsliceOptimization | None:
    """The memslice entry the webui applied last, if any."""
    from modules import sd_hijack  # type: ignore[import-not-found]

    current = getattr(sd_hijack, "current_optimizer", None)
    return current if isinstance(current, MemsliceOptimization) else None


# --- settings --------------------------------------------------------------------------------------------


def _component(spec: Any) -> tuple[Any, dict[str, Any] | None]:
    import gradio as gr

    if spec.kind == "float" and spec.step is not None:
        return gr.Slider, {"minimum": spec.lo, "maximum": spec.hi, "step": spec.step}
    if spec.kind == "float":
        return gr.Number, {"precision": 2, "minimum": spec.lo, "maximum": spec.hi}
    if spec.kind == "int":
        return gr.Slider, {"minimum": int(spec.lo), "maximum": int(spec.hi), "step": 1}
    if spec.kind == "choice":
        return gr.Radio, {"choices": list(spec.choices)}
    return None, None  # bool: the webui picks a Checkbox


def _repairer(spec: Any) -> Any:
    """An ``onchange`` that replaces an invalid stored value with its clamped or default form.

    The webui feeds stored values straight into gradio components (a string in a Number box stops the settings
    page from being built at startup) and into the pydantic model of ``GET /sdapi/v1/options``. The webui calls
    ``onchange`` after every UI or API change, before config.json is saved; per-request ``override_settings``
    skip it and are validated where they are read.
    """

    def repair() -> None:
        data = getattr(shared.opts, "data", None)
        if not isinstance(data, dict) or spec.key not in data:
            return
        raw = data[spec.key]
        value, problem = coerce(spec, raw)
        if problem is not None:
            warn_once(spec.key, raw, problem)
        if problem is not None or type(value) is not type(raw):  # "0.005" is a fine budget, stored as 0.005
            data[spec.key] = value

    return repair


def on_ui_settings() -> None:
    """Register the Memory slicing section; repair hand-edited config.json values before components are built."""
    for spec in SPECS:
        component, args = _component(spec)
        repair = _repairer(spec)
        info = shared.OptionInfo(
            spec.default, spec.label, component, args, onchange=repair, section=SECTION, category_id=CATEGORY_ID
        ).info(spec.info)
        shared.opts.add_option(spec.key, info)
        repair()


# --- model sites -----------------------------------------------------------------------------------------


def _model_kind(sd_model: Any) -> str:
    if getattr(sd_model, "is_sdxl", False):
        return "sdxl"
    if getattr(sd_model, "is_sd2", False):
        return "sd2"
    return "sd15"


def on_model_loaded(sd_model: Any) -> None:
    """Tag every attention module with its site (runs after hijack: never inside ``apply()``, see design.md)."""
    try:
        unet = getattr(getattr(sd_model, "model", None), "diffusion_model", None)
        vae = getattr(sd_model, "first_stage_model", None)
        spec = sites_from_modules(unet, vae)
        _loaded["spec"] = ModelSpec(_model_kind(sd_model), f"loaded {_model_kind(sd_model)} model", spec.sites)
        _loaded["kind"] = _model_kind(sd_model)
        _loaded["weights"] = Weights(
            _parameter_bytes(unet), _parameter_bytes(vae), _parameter_bytes(getattr(sd_model, "cond_stage_model", None))
        )
    except Exception as exc:  # a model we cannot read still generates, just without site names
        log.warning("memslice: could not read the model's attention layout: %s", exc)
        _loaded["spec"] = None


def _parameter_bytes(module: Any) -> int:
    try:
        return sum(p.numel() * p.element_size() for p in module.parameters()) if module is not None else 0
    except Exception:  # a module without parameters() (a stub), or one that fails to list them
        return 0


def loaded_spec() -> ModelSpec | None:
    return _loaded["spec"]


# --- per-job summary and infotext --------------------------------------------------------------------------


def _infotext(**_: Any) -> str | None:
    job = STATS.current_job()
    return job.infotext() if job.calls else None


def on_job_start(p: Any) -> None:
    """From the AlwaysVisible script's ``process``: reset the job summary and promise an infotext field."""
    if active_entry() is None:
        return
    STATS.start_job()
    try:
        _running["p"] = weakref.ref(p)
    except TypeError:
        _running["p"] = None
    try:
        p.extra_generation_params["Memslice"] = _infotext  # evaluated per image, after that image's attention ran
    except Exception as exc:
        log.warning("memslice: could not add the infotext field: %s", exc)


def on_job_end(p: Any = None, processed: Any = None) -> None:
    if active_entry() is None:
        return
    _running["p"] = None
    job = STATS.finish_job()
    if job.calls and HOST.settings().log != "off":
        log.info("%s", job.line())


def _failed_pass(
    error: NotEnoughMemory, p: Any, first: tuple[int, int], hires: tuple[int, int] | None
) -> tuple[str, tuple[int, int]]:
    """The job planner's name of the pass a failing call belongs to, and that pass's size. The UNet's hires pass
    is flagged by the webui (``p.is_hr_pass``); the VAE runs outside it, so its size tells (latent tokens = h*w/64)."""
    hires_now = hires is not None and bool(getattr(p, "is_hr_pass", False))
    img2img = getattr(p, "init_images", None) is not None
    if not error.site.startswith("vae"):
        return ("UNet (hires)", hires) if hires_now and hires else ("UNet", first)
    at_hires = hires is not None and error.q_tokens == (hires[0] // 8) * (hires[1] // 8)
    size = hires if at_hires and hires else first
    final = size == (hires or first)
    name = "VAE decode" if final and not img2img else "VAE (encode or decode)"
    return (f"{name} (hires)" if at_hires else name), size


def _job_of(p: Any) -> tuple[tuple[int, int], int, tuple[int, int] | None, str, bool]:
    """(first-pass size, batch, hires size or None, upscaler kind, img2img) as the webui holds them on ``p``."""
    first = (int(p.width), int(p.height))
    batch = max(1, int(getattr(p, "batch_size", 1) or 1))
    hires = None
    if getattr(p, "enable_hr", False) and getattr(p, "hr_upscale_to_x", 0) and getattr(p, "hr_upscale_to_y", 0):
        hires = (int(p.hr_upscale_to_x), int(p.hr_upscale_to_y))
    # the webui's latent upscale modes are all named "Latent..." (None: its default, "Latent")
    upscaler = "latent" if str(getattr(p, "hr_upscaler", None) or "Latent").startswith("Latent") else "image"
    return first, batch, hires, upscaler, getattr(p, "init_images", None) is not None


def _context(where: Any) -> str:
    """``where(p, first, hires) -> (pass name, size)`` names the failing pass; the job planner then gives the
    largest size at which the whole job fits with the memory free now. Empty outside a job or when anything fails:
    the original error must reach the user unchanged."""
    ref = _running.get("p")
    p = ref() if ref is not None else None
    if p is None:
        return ""
    try:
        first, batch, hires, upscaler, img2img = _job_of(p)
        name, size = where(p, first, hires)
        plan = plan_for(*first, batch, hr_width=hires[0] if hires else None, hr_height=hires[1] if hires else None,
                        hr_upscaler=upscaler, img2img=img2img)  # fmt: skip
    except Exception as exc:
        log.debug("memslice: no job context for the error: %s", exc)
        return ""
    side = plan["max_square_resolution"]
    scaled = " (first pass; hires scaled alike)" if hires else ""
    fits = (f"with the memory free now the whole job fits up to {side}x{side}{scaled}" if side
            else f"with the memory free now no size of this job fits (its binding pass: {plan['limit']})")  # fmt: skip
    return f"In this job: the {name} pass at {size[0]}x{size[1]} failed; {fits}."


def job_context(error: NotEnoughMemory) -> str:
    """For memslice's own error inside a generation: the failing call's site and token count name the pass."""
    return _context(lambda p, first, hires: _failed_pass(error, p, first, hires))


#: the modules whose forward marks a pass, and the factor from their first tensor's last two dims to pixels
_PASS_MODULES = {"UNetModel": ("UNet", 8), "Decoder": ("VAE decode", 8), "Encoder": ("VAE encode", 1)}


def failing_module(tb: Any) -> tuple[str, tuple[int, int]] | None:
    """The innermost ldm/sgm UNet, VAE decoder or encoder ``forward`` in a traceback, and the image size its input
    tensor stands for: where an out-of-memory error outside attention (a convolution, a ResBlock) happened."""
    found = None
    while tb is not None:
        frame = tb.tb_frame
        module = frame.f_locals.get("self")
        kind = _PASS_MODULES.get(type(module).__name__)
        if kind and frame.f_code.co_name == "forward" and type(module).__module__.split(".")[0] in ("ldm", "sgm"):
            names = frame.f_code.co_varnames[1 : frame.f_code.co_argcount]
            x = frame.f_locals.get(names[0]) if names else None
            if isinstance(x, torch.Tensor) and x.dim() == 4:
                found = (kind[0], (int(x.shape[-1]) * kind[1], int(x.shape[-2]) * kind[1]))
        tb = tb.tb_next
    return found


def _named(module_pass: str, size: tuple[int, int], p: Any, first: tuple[int, int],
           hires: tuple[int, int] | None) -> str:  # fmt: skip
    """The job planner's name: the webui flags the hires UNet pass (``p.is_hr_pass``); a VAE pass at the hires
    size is the hires one."""
    if module_pass == "UNet" and hires is not None and getattr(p, "is_hr_pass", False):
        return "UNet (hires)"
    at_hires = hires is not None and size == hires and hires != first
    return f"{module_pass} (hires)" if at_hires else module_pass


def annotate_oom(exc: BaseException) -> None:
    """An out-of-memory error that leaves a generation (a convolution as often as attention) names its pass and
    what would fit, as memslice's own error does. Only while a memslice entry plans the job; never raises."""
    try:
        if active_entry() is None or not kernels.is_oom(exc) or getattr(exc, "_memslice_job_context", False):
            return
        where = failing_module(exc.__traceback__)
        if where is None or not exc.args or not isinstance(exc.args[0], str):
            return
        module_pass, size = where
        context = _context(lambda p, first, hires: (_named(module_pass, size, p, first, hires), size))
        if context:
            exc.args = (f"{exc.args[0]} {context}", *exc.args[1:])
            exc._memslice_job_context = True  # type: ignore[attr-defined]
    except Exception as err:  # the original error must still reach the user
        log.debug("memslice: no job context for the error: %s", err)


_WRAPPED = "_memslice_annotates_oom"


def install_failure_context() -> None:
    """Wrap the webui's ``processing.process_images_inner``: ``process_images`` calls it through the module, so
    txt2img, img2img and the API all pass through the wrapper. It only annotates an error on its way out."""
    from modules import processing  # type: ignore[import-not-found]

    inner = getattr(processing, "process_images_inner", None)
    if inner is None or getattr(inner, _WRAPPED, False):
        return

    @functools.wraps(inner)
    def process_images_inner(p: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return inner(p, *args, **kwargs)
        except Exception as exc:
            annotate_oom(exc)
            raise

    setattr(process_images_inner, _WRAPPED, True)
    processing.process_images_inner = process_images_inner


# --- HTTP API ----------------------------------------------------------------------------------------------

MAX_SIDE = 16384
MAX_BATCH = 64
MAX_RECENT = 256
_apps_with_routes: set[int] = set()
_routes_lock = threading.Lock()


def _budget(settings: Settings) -> probe.Budget:
    device = getattr(shared, "device", torch.device("cpu"))
    return probe.device_budget(device, settings)


def status(limit: int = 32) -> dict[str, Any]:
    """What memslice is doing: device, memory, budget, active entry, settings, recent plans, the last job."""
    settings = HOST.settings()
    device = getattr(shared, "device", torch.device("cpu"))
    free = None if settings.budget_gb > 0 else probe.free_memory(device)
    budget = probe.budget_for(free, settings)
    entry = active_entry()
    last = STATS.last_job
    return {
        "version": __version__,
        "device": str(device),
        "device_kind": probe.device_kind(device),
        "free_bytes": free.bytes if free else None,
        "free_source": free.source if free else None,
        "budget_bytes": budget.bytes,
        "budget_source": budget.explanation,
        "active": entry.title() if entry else None,
        "strategy": entry.strategy if entry else None,
        "settings": settings.as_options(),
        "model": _loaded["kind"],
        "totals": {
            "calls": STATS.total_calls,
            "oom_retries": STATS.total_retries,
            "not_enough_memory": STATS.total_failures,
        },
        "last_job": last.as_dict() | {"line": last.line(), "infotext": last.infotext()} if last else None,
        "current_job": STATS.current_job().as_dict(),
        "recent": [r.as_dict() for r in STATS.recent(limit)],
    }


def _settings_with(overrides: dict[str, Any]) -> Settings:
    """The saved settings with the planner panel's unsaved slider values on top (validated the same way)."""
    base = HOST.settings().as_options()
    base.update({k: v for k, v in overrides.items() if v is not None})
    return read_settings(lambda key, default: base.get(key, default))


def _resident_weights() -> tuple[Weights | None, bool]:
    """(bytes of the loaded model's UNet, VAE and text encoders, whether --medvram/--lowvram keep them off)."""
    opts = getattr(shared, "cmd_opts", None)
    low = bool(getattr(opts, "medvram", False) or getattr(opts, "lowvram", False))
    if getattr(opts, "medvram_sdxl", False) and _loaded["kind"] == "sdxl":
        low = True
    return _loaded.get("weights"), low


def plan_for(
    width: int,
    height: int,
    batch: int = 1,
    model: str | None = None,
    strategy: str | None = None,
    overrides: dict[str, Any] | None = None,
    hr_scale: float | None = None,
    hr_width: int | None = None,
    hr_height: int | None = None,
    hr_upscaler: str = "latent",
    img2img: bool = False,
) -> dict[str, Any]:
    """The CLI planner's answer for the loaded model (or a named one) and the whole job, with the memory free now
    plus the loaded weights; arithmetic only."""
    settings = _settings_with(overrides or {})
    arch = model or _loaded["kind"] or "sd15"
    spec = BUILTIN[model] if model else (loaded_spec() or BUILTIN[arch])
    entry = active_entry()
    strategy = strategy or (entry.strategy if entry else "auto")
    device_kind = _device_kind()
    from modules import devices  # type: ignore[import-not-found]

    dtype = getattr(devices, "dtype", torch.float16)
    vae_dtype = getattr(devices, "dtype_vae", dtype)  # float32 with --no-half-vae
    upcast = HOST.upcast()
    sizes = {2: dtype if dtype != torch.float32 else torch.float16, 4: torch.float32}

    def kernels_for(site: Any, element_size: int) -> tuple[KernelChoice, ...]:
        chosen = vae_dtype if site.vae and element_size == torch.finfo(vae_dtype).bits // 8 else sizes[element_size]
        return kernels.expected_kernels(device_kind, chosen, site.head_dim, settings.kernel)

    device = getattr(shared, "device", torch.device("cpu"))
    free = probe.free_memory(device)
    weights, medvram = _resident_weights() if not model else (None, _resident_weights()[1])
    resident = 0 if medvram or weights is None else weights.unet + weights.vae + weights.text
    job = Job(
        spec,
        arch,
        width,
        height,
        batch,
        free.bytes + resident,
        hires=hires_size(width, height, hr_scale, hr_width, hr_height),
        hires_upscaler=hr_upscaler,
        img2img=img2img,
        element_size=torch.finfo(dtype).bits // 8,
        vae_element_size=torch.finfo(vae_dtype).bits // 8,
        upcast_attention=upcast,
        weights=weights,
        medvram=medvram,
        strategy=strategy,
        slice_cap=settings.slice_cap,
        safety_factor=settings.safety_factor,
        fixed_budget=int(settings.budget_gb * (1 << 30)) if settings.budget_gb > 0 else None,
        device_kind=device_kind,
        include_vae=settings.vae,
    )
    result = plan_job(job, kernels_for)
    budget = probe.budget_for(None if settings.budget_gb > 0 else free, settings)
    result.update(
        model_source="named" if model else ("loaded" if loaded_spec() else "default (no model loaded yet)"),
        memory_source=f"{free.source} + the loaded weights" if resident else free.source,
        budget_bytes=budget.bytes,
        budget_source=budget.explanation,
        budget=format_bytes(budget.bytes),
        settings=settings.as_options(),
    )
    return result


def add_routes(app: Any) -> None:
    """``GET /memslice/v1/status`` and ``GET /memslice/v1/plan``; bounded arithmetic, no GPU work, no queue lock."""
    from fastapi import HTTPException, Query

    with _routes_lock:
        if id(app) in _apps_with_routes:
            return
        _apps_with_routes.add(id(app))

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
        if model is not None and model not in MODEL_NAMES:
            raise HTTPException(400, f"model must be one of {', '.join(MODEL_NAMES)} (or omitted for the loaded one)")
        if strategy is not None and strategy not in STRATEGY_NAMES:
            raise HTTPException(400, f"strategy must be one of {', '.join(STRATEGY_NAMES)}")
        for name, value in (("safety_factor", safety_factor), ("budget_gb", budget_gb), ("hr_scale", hr_scale)):
            if value is not None and not math.isfinite(value):
                raise HTTPException(400, f"{name} must be a finite number")
        if hr_upscaler not in UPSCALERS:
            raise HTTPException(400, f"hr_upscaler must be one of {', '.join(UPSCALERS)}")
        overrides = {"memslice_safety_factor": safety_factor, "memslice_slice_cap": slice_cap}
        overrides["memslice_budget_gb"] = budget_gb
        return plan_for(width, height, batch, model, strategy, overrides, hr_scale, hr_width, hr_height, hr_upscaler,
                        img2img)  # fmt: skip

    app.add_api_route("/memslice/v1/status", get_status, methods=["GET"])
    app.add_api_route("/memslice/v1/plan", get_plan, methods=["GET"])


def on_app_started(demo: Any, app: Any) -> None:
    try:
        add_routes(app)
    except Exception as exc:
        log.warning("memslice: could not add the HTTP routes: %s", exc)


# --- registration ------------------------------------------------------------------------------------------


def _registered(category: str, fn: Any) -> bool:
    """Whether ``fn`` is already in the webui's callback list (a script executed twice without a reload)."""
    try:
        return any(c.callback is fn for c in script_callbacks.callback_map[f"callbacks_{category}"])
    except Exception:
        return False


def register() -> None:
    """Called at the top level of scripts/memslice.py, on every (re)load of the extension's scripts."""
    for category, hook, fn in (
        ("list_optimizers", script_callbacks.on_list_optimizers, list_optimizers),
        ("ui_settings", script_callbacks.on_ui_settings, on_ui_settings),
        ("app_started", script_callbacks.on_app_started, on_app_started),
        ("model_loaded", script_callbacks.on_model_loaded, on_model_loaded),
    ):
        if not _registered(category, fn):
            hook(fn, name=f"memslice {category}")
    try:
        install_failure_context()
    except Exception as exc:  # a webui without it loses only the pass name on out-of-memory errors
        log.warning("memslice: out-of-memory errors will not name the failing pass: %s", exc)
