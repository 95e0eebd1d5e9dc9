"""For other extensions: "will this job fit?" without the settings page, the HTTP API or gradio.

Inside the webui, with memslice installed, ``job_fits`` answers for the loaded model, the memory free now plus its
loaded weights, the active memslice entry and the saved settings, exactly as the live planner does. Outside it (a
script, a test) it answers for a built-in model's published config with this machine's free memory, or with
``memory_bytes`` given. It plans; it never touches the device or the model.

    from lib_memslice.api import job_fits
    plan = job_fits(1024, 1024, hr_scale=2)
    if plan.verdict != "fits":
        print(plan.limit, plan.advice, plan.max_square_resolution)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PassPlan:
    """One pass of the job: its size, its parts in bytes (``allocator_bytes``: the most the device's allocator was
    measured to add), its verdict (``fits``, ``tight`` or ``does not fit``), and for a VAE pass memslice runs in
    exact bands their count (``bands``; 0: the pass runs whole) and whether they stream through host memory."""

    name: str
    width: int
    height: int
    batch: int
    attention_bytes: int
    activation_bytes: int
    input_bytes: int
    weight_bytes: int
    allocator_bytes: int
    total_bytes: int
    verdict: str
    fits: bool
    bands: int = 0
    streamed: bool = False


@dataclass(frozen=True)
class JobPlan:
    """The whole job: its verdict (``fits``, ``tight`` or ``does not fit``), the pass that binds, what to do, and
    the largest square first-pass size at which the job fits (hires scaled alike). ``details`` is the planner's full
    answer (sites and slices)."""

    verdict: str
    fits: bool
    limit: str
    advice: str
    max_square_resolution: int
    memory_bytes: int
    passes: tuple[PassPlan, ...]
    details: dict[str, Any]


def _from(result: dict[str, Any]) -> JobPlan:
    fields = PassPlan.__dataclass_fields__
    return JobPlan(
        verdict=result["verdict"],
        fits=bool(result["fits"]),
        limit=result["limit"],
        advice=result["advice"],
        max_square_resolution=int(result["max_square_resolution"]),
        memory_bytes=int(result["memory_bytes"]),
        passes=tuple(PassPlan(**{k: p[k] for k in fields if k in p}) for p in result["passes"]),
        details=result,
    )


def _inside_webui() -> bool:
    return "lib_memslice.webui" in sys.modules


def job_fits(
    width: int,
    height: int,
    batch: int = 1,
    *,
    hr_scale: float | None = None,
    hr_width: int | None = None,
    hr_height: int | None = None,
    hr_upscaler: str = "latent",
    img2img: bool = False,
    model: str | None = None,
    memory_bytes: int | None = None,
    dtype: str = "fp16",
    device: str | None = None,
) -> JobPlan:
    """Plan a txt2img (optionally with hires fix) or img2img job; see the module docstring for what it plans for.

    ``model`` is ``sd15``, ``sd2``, ``sdxl`` or ``sd3`` (inside the webui: None = the loaded model); ``hr_upscaler`` is
    ``latent`` or ``image``; ``memory_bytes``, ``dtype`` and ``device`` apply outside the webui only.
    """
    if _inside_webui() and memory_bytes is None:
        from .webui import plan_for

        return _from(plan_for(width, height, batch, model, None, {}, hr_scale, hr_width, hr_height, hr_upscaler,
                              img2img))  # fmt: skip
    import torch

    from . import kernels, probe
    from .job_plan import DTYPE_BYTES, make_job, plan_job
    from .models import BUILTIN
    from .settings import Settings

    name = model or "sd15"
    if name not in BUILTIN:
        raise ValueError(f"model must be one of {', '.join(BUILTIN)}, got {name!r}")
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ceiling = None
    if memory_bytes is None:  # the calls count torch's cached blocks as free: so does the preview
        free = probe.free_memory(torch.device(kind), precise=True)
        memory_bytes, ceiling = free.bytes, free.ceiling
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    settings = Settings()
    device_kind = probe.device_kind(torch.device(kind))
    job = make_job(BUILTIN[name], name, width, height, batch, int(memory_bytes), settings, hr_scale=hr_scale,
                   hr_width=hr_width, hr_height=hr_height, hr_upscaler=hr_upscaler, img2img=img2img,
                   element_size=DTYPE_BYTES[dtype], device_kind=device_kind, ceiling_bytes=ceiling)  # fmt: skip
    kernels_for = kernels.kernels_for_job(device_kind, dtypes[dtype], dtypes[dtype], settings.kernel)
    return _from(plan_job(job, kernels_for))
