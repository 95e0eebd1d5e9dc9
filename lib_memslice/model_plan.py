"""Plan every attention site of a model at an image size: the one answer the CLI, the API and the UI share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .models import ModelSpec, Site
from .plan import MAX_RESOLUTION, NotEnoughMemory, max_square_resolution, plan_attention

#: kernel kind and workspace bytes for a site's attention call (head_dim, element_size) -> (kind, workspace)
KernelFor = Callable[[Site, int], tuple[str, int]]

DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


@dataclass(frozen=True)
class Request:
    """What to plan: a model at a size, a budget and the planner's knobs."""

    spec: ModelSpec
    width: int
    height: int
    batch: int
    budget_bytes: int
    strategy: str = "auto"
    slice_cap: int = 64
    element_size: int = 2
    io_element_size: int = 0
    device_kind: str = "cuda"
    prompt_chunks: int = 1
    include_vae: bool = True


def _kwargs(req: Request, site: Site, kernel_for: KernelFor) -> dict[str, Any]:
    kind, workspace = kernel_for(site, req.element_size)
    copies = None
    if kind == "fused":  # the forwards hand the kernel last-dim-contiguous views: copies only to cast or pad
        cast = req.io_element_size not in (0, req.element_size)
        copies = int(cast) + int(req.device_kind != "cpu" and site.head_dim % 8 != 0)
    return dict(
        strategy=req.strategy,
        slice_cap=req.slice_cap,
        kernel=kind,
        workspace_bytes=workspace,
        device_kind=req.device_kind,
        input_copies=copies,
    )


def plan_model(req: Request, kernel_for: KernelFor) -> dict[str, Any]:
    """The plan of every distinct attention site, whether all fit, and the largest square size that fits."""
    layers = []
    fits = True
    max_side = MAX_RESOLUTION
    for site in req.spec.sites:
        if site.vae and not req.include_vae:
            continue
        shape = site.shape(
            req.width,
            req.height,
            batch=req.batch,
            element_size=req.element_size,
            io_element_size=req.io_element_size,
            prompt_chunks=req.prompt_chunks,
        )
        kwargs = _kwargs(req, site, kernel_for)
        row: dict[str, Any] = {
            "site": site.name,
            "layers": site.count,
            "batch_heads": shape.batch_heads,
            "q_tokens": shape.q_tokens,
            "k_tokens": shape.k_tokens,
            "head_dim": shape.head_dim,
            "kernel": kwargs["kernel"],
        }
        try:
            plan = plan_attention(shape, req.budget_bytes, site=site.name, **kwargs)
            row.update(
                head_chunk=plan.head_chunk,
                query_chunk=plan.query_chunk,
                steps=plan.steps,
                peak_bytes=plan.peak_bytes,
                reason=plan.reason,
                fits=True,
            )
        except NotEnoughMemory as e:
            fits = False
            row.update(head_chunk=0, query_chunk=0, steps=0, peak_bytes=e.need, reason=str(e), fits=False)
        # the same site at a square size, batch kept
        side = max_square_resolution(shape, site.geometry, req.budget_bytes, **kwargs)
        row["max_square_resolution"] = side
        max_side = min(max_side, side)
        layers.append(row)
    return {
        "model": req.spec.name,
        "width": req.width,
        "height": req.height,
        "batch": req.batch,
        "strategy": req.strategy,
        "slice_cap": req.slice_cap,
        "budget_bytes": req.budget_bytes,
        "element_size": req.element_size,
        "fits": fits,
        "max_square_resolution": max_side if layers else 0,
        "max_steps": max((row["steps"] for row in layers), default=0),
        "layers": layers,
    }
