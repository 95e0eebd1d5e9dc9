"""The loaded model as memslice sees it, and the whole-job planner for it (routes, Python API, failure context).

``on_model_loaded`` tags every attention module with its site and reads the model's kind, layout and weights.
:func:`plan_for` answers "will this job fit?" for the loaded model (or a named built-in one) with the memory free
now plus the loaded weights: switching model unloads the current one, so its weights count as memory once, and the
planned model's own weights count against it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import torch
from modules import shared  # type: ignore[import-not-found]

from .. import bands, kernels, probe
from ..costs import format_bytes
from ..job_plan import Job, make_job, plan_job
from ..models import BUILTIN, ModelSpec, Weights, sites_from_modules
from ..settings import Settings, read_settings
from . import sd3
from .host import HOST, active_entry, device, device_kind

log = logging.getLogger("memslice")

_loaded: dict[str, Any] = {"spec": None, "kind": None, "weights": None}


def model_kind(sd_model: Any) -> str:
    """sd15 | sd2 | sdxl | sd3, from the flags the webui sets on the model it loads."""
    for flag, kind in (("is_sd3", "sd3"), ("is_sdxl", "sdxl"), ("is_sd2", "sd2")):
        if getattr(sd_model, flag, False) is True:
            return kind
    return "sd15"


def _parameter_bytes(module: Any) -> int:
    """Bytes of a module's parameters and buffers: both stay on the device with it (SD3's MMDiT holds a 56.6 M
    element ``pos_embed`` buffer)."""
    try:
        if module is None:
            return 0
        tensors = (*module.parameters(), *module.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)
    except Exception:  # a module without parameters() (a stub), or one that fails to list them
        return 0


def on_model_loaded(sd_model: Any) -> None:
    """Tag every attention module with its site (runs after hijack: never inside ``apply()``, see design.md)."""
    kind = model_kind(sd_model)
    _loaded.update(spec=None, kind=kind, weights=None)
    unet = getattr(getattr(sd_model, "model", None), "diffusion_model", None)
    vae = getattr(sd_model, "first_stage_model", None)
    text = getattr(sd_model, "cond_stage_model", None) or getattr(sd_model, "conditioner", None)
    # every model's weights, SD3's too: a plan for another model counts them as freed when it loads
    _loaded["weights"] = Weights(_parameter_bytes(unet), _parameter_bytes(vae), _parameter_bytes(text))
    sd3.on_model_loaded(sd_model)
    try:
        spec = sites_from_modules(unet, vae)
        published = BUILTIN[kind]  # its sizes, latent and prompt; the sites and widths as loaded, where found
        if spec.sites:
            published = replace(published, sites=spec.sites, context_dim=spec.context_dim,
                                max_side=spec.max_side or published.max_side)  # fmt: skip
        if published.vae_bands and vae is not None:  # the VAE's bands planned as the loaded modules run them
            published = replace(published, **bands.vae_layout(vae))
        _loaded["spec"] = replace(published, name=kind, title=f"loaded {kind} model")
    except Exception as exc:  # a model we cannot read still generates, just without site names
        log.warning("memslice: could not read the model's attention layout: %s", exc)
        _loaded["spec"] = None


def loaded_kind() -> str | None:
    return _loaded["kind"]


def loaded_spec() -> ModelSpec | None:
    return _loaded["spec"]


def _resident_weights() -> tuple[Weights | None, bool]:
    """(bytes of the loaded model's UNet, VAE and text encoders, whether --medvram/--lowvram keep them off)."""
    opts = getattr(shared, "cmd_opts", None)
    low = bool(getattr(opts, "medvram", False) or getattr(opts, "lowvram", False))
    if getattr(opts, "medvram_sdxl", False) and _loaded["kind"] == "sdxl":
        low = True
    return _loaded.get("weights"), low


def settings_with(overrides: dict[str, Any]) -> Settings:
    """The saved settings with the planner panel's unsaved slider values on top (validated the same way)."""
    base = HOST.settings().as_options()
    base.update({k: v for k, v in overrides.items() if v is not None})
    return read_settings(lambda key, default: base.get(key, default))


@dataclass(frozen=True)
class PlanInputs:
    """Everything a plan answer depends on, read once: :func:`plan_inputs` computes the answer from it alone, so it
    is the routes' cache key (hashable; a new input of the planner goes here or the cache could serve a stale
    answer)."""

    job: Job
    kind: str
    width: int
    height: int
    batch: int
    memory: int
    free: probe.FreeMemory
    resident: int  # the loaded weights counted in ``memory``
    model_source: str
    settings: Settings
    device_kind: str
    dtype: torch.dtype
    vae_dtype: torch.dtype


def inputs_for(
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
    free: probe.FreeMemory | None = None,
) -> PlanInputs:
    """What :func:`plan_for` plans from: the request, the settings, the loaded model, the dtypes, free memory."""
    settings = settings_with(overrides or {})
    kind = model or _loaded["kind"] or "sd15"
    free = free or probe.free_memory(device(), precise=True)  # torch's cached blocks count, as in the calls
    weights, medvram = _resident_weights()
    resident = 0 if medvram or weights is None else weights.unet + weights.vae + weights.text
    memory = free.bytes + resident
    from modules import devices  # type: ignore[import-not-found]

    dtype = getattr(devices, "dtype", torch.float16)
    vae_dtype = getattr(devices, "dtype_vae", dtype)  # float32 with --no-half-vae
    found = dict(kind=kind, width=width, height=height, batch=batch, memory=memory, free=free, resident=resident,
                 settings=settings, device_kind=device_kind(), dtype=dtype, vae_dtype=vae_dtype)  # fmt: skip
    named = model is not None
    spec = BUILTIN[kind] if named else (loaded_spec() or BUILTIN[kind])
    entry = active_entry()
    job = make_job(spec, kind, width, height, batch, memory, settings, hr_scale=hr_scale, hr_width=hr_width,
                   hr_height=hr_height, hr_upscaler=hr_upscaler, img2img=img2img,
                   strategy=strategy or (entry.strategy if entry else "auto"),
                   element_size=torch.finfo(dtype).bits // 8, vae_element_size=torch.finfo(vae_dtype).bits // 8,
                   upcast_attention=HOST.upcast(), weights=None if named else weights, medvram=medvram,
                   t5=bool(getattr(shared.opts, "sd3_enable_t5", False)), device_kind=found["device_kind"],
                   ceiling_bytes=None if free.ceiling is None else free.ceiling + resident)  # fmt: skip
    source = "named" if named else ("loaded" if loaded_spec() else "default (no model loaded yet)")
    return PlanInputs(job=job, model_source=source, **found)  # type: ignore[arg-type]


def plan_inputs(inputs: PlanInputs) -> dict[str, Any]:
    """The job planner's answer for ``inputs``: arithmetic only, and nothing read but ``inputs``."""
    free, settings, job = inputs.free, inputs.settings, inputs.job
    kernels_for = kernels.kernels_for_job(inputs.device_kind, inputs.dtype, inputs.vae_dtype, settings.kernel)
    result = plan_job(job, kernels_for)
    budget = settings.budget_gb > 0
    result.update(
        model_source=inputs.model_source,
        memory_source=f"{free.source} + the loaded model's weights" if inputs.resident else free.source,
        free_bytes=free.bytes,
        room=(f"attention budget {format_bytes(settings.budget_gb * (1 << 30))}" if budget
              else f"what each call finds free / safety factor {settings.safety_factor:g}"),
        settings=settings.as_options(),
    )  # fmt: skip
    return result


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
    free: probe.FreeMemory | None = None,
) -> dict[str, Any]:
    """The job planner's answer for the loaded model (or a named built-in one): arithmetic only. ``free`` is a
    reading already taken (the failure context passes the one from the job's start); None reads it now."""
    return plan_inputs(inputs_for(width, height, batch, model, strategy, overrides, hr_scale, hr_width, hr_height,
                                  hr_upscaler, img2img, free))  # fmt: skip
