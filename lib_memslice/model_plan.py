"""Plan every attention site of a model at an image size: the one answer the CLI, the API and the UI share.

:mod:`lib_memslice.slicing` plans one call; this walks a model's distinct attention shapes (from the published
configs or read off the loaded model), plans each with the kernel it would use, and reports the largest square
size at which every site still gets a plan.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .costs import KernelChoice
from .models import ModelSpec, Site
from .slicing import (
    MAX_RESOLUTION,
    finest_plan,
    max_square_resolution,
    not_enough_memory,
    plan_attention,
    strategy_room,
)

#: the kernels a site's attention call may use, fastest first (site, compute element size) -> choices
KernelsFor = Callable[[Site, int], tuple[KernelChoice, ...]]

DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


@dataclass(frozen=True)
class Request:
    """What to plan: a model at a size, a budget and the planner's knobs.

    ``vae_element_size`` / ``vae_io_element_size`` are the VAE's (``--no-half-vae`` runs it in float32 while the
    UNet is half precision); 0 means the UNet's.
    """

    spec: ModelSpec
    width: int
    height: int
    batch: int
    budget_bytes: int
    strategy: str = "auto"
    slice_cap: int = 4096
    element_size: int = 2
    io_element_size: int = 0
    device_kind: str = "cuda"
    prompt_chunks: int = 1
    include_vae: bool = True
    fixed_budget: bool = False
    #: the probe's reading before the job (previews), and the safety factor that divides it
    free_bytes: int | None = None
    safety_factor: float = 1.0
    vae_element_size: int = 0
    vae_io_element_size: int = 0


def _sizes(req: Request, site: Site) -> tuple[int, int]:
    """(compute, io) element sizes of a site: the VAE may run in another dtype than the UNet."""
    if site.vae and req.vae_element_size:
        return req.vae_element_size, req.vae_io_element_size or req.vae_element_size
    return req.element_size, req.io_element_size


def plan_site(req: Request, site: Site, kernels_for: KernelsFor, width: int, height: int) -> dict[str, Any]:
    """One site's row: its shape at this size, the plan (or why none fits) and the largest square size."""
    element, io = _sizes(req, site)
    shape = site.shape(width, height, batch=req.batch, element_size=element, io_element_size=io,
                       prompt_chunks=req.prompt_chunks)  # fmt: skip
    choices = kernels_for(site, element)
    # before a job nothing of it exists yet: the layer's inputs come out of the free memory read now
    room = strategy_room(req.strategy, req.budget_bytes, fixed=req.fixed_budget, free_bytes=req.free_bytes,
                         safety_factor=req.safety_factor)  # fmt: skip
    budget = room.budget(shape)
    options = dict(strategy=req.strategy, slice_cap=req.slice_cap, device_kind=req.device_kind)
    plan = None
    for kernel in choices:
        plan = plan_attention(shape, budget, kernel=kernel, **options)  # type: ignore[arg-type]
        if plan is not None:
            break
    over_margin = False
    if plan is None and not room.fixed:  # as at run time: the finest plan if free memory itself holds it
        for kernel in choices:
            plan = finest_plan(shape, room.hard().budget(shape), kernel=kernel, **options)  # type: ignore[arg-type]
            if plan is not None:
                over_margin = True
                break
    row: dict[str, Any] = {
        "site": site.name,
        "layers": site.count,
        "batch_heads": shape.batch_heads,
        "q_tokens": shape.q_tokens,
        "k_tokens": shape.k_tokens,
        "head_dim": shape.head_dim,
        "element_size": element,
        "budget_bytes": budget,
    }
    if plan is not None:
        row.update(
            kernel_used=plan.kernel.kind,
            heads_per_slice=plan.heads_per_slice,
            queries_per_slice=plan.queries_per_slice,
            slices=plan.slices,
            peak_bytes=plan.peak_bytes,
            reason=plan.reason,
            fits=True,
            over_margin=over_margin,
        )
    else:
        error = not_enough_memory(shape, room, choices, geometry=site.geometry, site=site.name,
                                  **options)  # type: ignore[arg-type]  # fmt: skip
        row.update(
            kernel_used=error.kernel or choices[0].kind,
            heads_per_slice=0,
            queries_per_slice=0,
            slices=0,
            peak_bytes=error.need,
            reason=str(error),
            fits=False,
            over_margin=False,
        )
    row["max_square_resolution"] = max_square_resolution(shape, site.geometry, room.hard(), choices, **options)
    return row


def plan_model(req: Request, kernels_for: KernelsFor) -> dict[str, Any]:
    """The plan of every distinct attention site, whether all fit, and the largest square size that fits."""
    layers = [
        plan_site(req, site, kernels_for, req.width, req.height)
        for site in req.spec.sites
        if not (site.vae and not req.include_vae)
    ]
    max_side = min((row["max_square_resolution"] for row in layers), default=0) if layers else 0
    return {
        "model": req.spec.name,
        "width": req.width,
        "height": req.height,
        "batch": req.batch,
        "strategy": req.strategy,
        "slice_cap": req.slice_cap,
        "budget_bytes": req.budget_bytes,
        "element_size": req.element_size,
        "fits": all(row["fits"] for row in layers),
        "max_square_resolution": min(max_side, MAX_RESOLUTION),
        "max_slices": max((row["slices"] for row in layers), default=0),
        "layers": layers,
    }
