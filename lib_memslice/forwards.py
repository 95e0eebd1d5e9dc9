"""CrossAttention (ldm, sgm) and AttnBlock forwards built on the planner and kernels.

Nothing here imports the webui: what a forward needs from it (settings, hypernetworks, the upcast flag, an
autocast-off context, a stats sink) comes through a :class:`Host`. Tests and the benchmark pass
:class:`BasicHost`; ``webui.py`` passes one built from ``modules.*``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch

from . import kernels, probe
from .models import LATENT_DOWNSCALE, site_of
from .plan import AttentionShape, Geometry, NotEnoughMemory, SlicePlan, format_bytes, plan_attention
from .settings import Settings
from .stats import CallRecord, Stats, plural

log = logging.getLogger("memslice")

Tensor = torch.Tensor

_HALF = (torch.float16, torch.bfloat16)


class Host(Protocol):
    """What a forward needs from its environment."""

    def settings(self) -> Settings: ...

    def apply_hypernetworks(self, context: Tensor) -> tuple[Tensor, Tensor]: ...

    def upcast(self) -> bool: ...

    def without_autocast(self) -> AbstractContextManager[Any]: ...

    def record(self, record: CallRecord) -> None: ...

    def record_failure(self, error: NotEnoughMemory) -> None: ...


class BasicHost:
    """A Host with fixed settings and no webui: no hypernetworks, records into its own :class:`Stats`."""

    def __init__(self, settings: Settings | None = None, upcast: bool = False, stats: Stats | None = None) -> None:
        self._settings = settings or Settings()
        self._upcast = upcast
        self.stats = stats or Stats()

    def settings(self) -> Settings:
        return self._settings

    def apply_hypernetworks(self, context: Tensor) -> tuple[Tensor, Tensor]:
        return context, context

    def upcast(self) -> bool:
        return self._upcast

    def without_autocast(self) -> AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def record(self, record: CallRecord) -> None:
        self.stats.record(record)

    def record_failure(self, error: NotEnoughMemory) -> None:
        self.stats.record_failure()


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    strategy: str,
    host: Host,
    mask: Tensor | None = None,
    upcast: bool = False,
    site: str = "attention",
    geometry: Geometry | None = None,
) -> Tensor:
    """Plan and run one attention call over ``[B, H, N, d]`` tensors; returns ``[B, H, Nq, dv]`` in q's dtype.

    Raises :class:`NotEnoughMemory` when no plan under the slice cap fits (also after OOM retries).
    """
    settings = host.settings()
    batch, heads, q_tokens, head_dim = q.shape
    compute_dtype = torch.float32 if upcast and q.dtype in _HALF else q.dtype
    bias = None
    if mask is not None:
        bias = kernels.keep_mask_to_bias(mask, batch, k.shape[2], compute_dtype)
    kind, workspace = kernels.resolve_kernel(settings.kernel, q, k, v, compute_dtype, bias)
    shape = AttentionShape(
        batch_heads=batch * heads,
        q_tokens=q_tokens,
        k_tokens=k.shape[2],
        head_dim=head_dim,
        v_dim=v.shape[-1],
        element_size=torch.finfo(compute_dtype).bits // 8,
        io_element_size=q.element_size(),
        heads=max(heads, 1),
    )
    device_kind = probe.device_kind(q.device)
    options = dict(
        strategy=strategy,
        slice_cap=settings.slice_cap,
        kernel=kind,
        workspace_bytes=workspace,
        device_kind=device_kind,
        geometry=geometry,
        site=site,
        input_copies=kernels.fused_input_copies(q, k, v, compute_dtype) if kind == "fused" else None,
    )
    budget = probe.device_budget(q.device, settings)

    def replan(min_steps: int = 1) -> SlicePlan:
        return plan_attention(shape, budget.bytes, min_steps=min_steps, **options)

    try:
        try:
            plan = replan()
            if plan.sliced and device_kind == "cuda" and settings.budget_gb <= 0:
                # the cheap probe ignores torch's cached-but-free blocks; count them before slicing for nothing
                budget = probe.device_budget(q.device, settings, precise=True)
                plan = replan()
        except NotEnoughMemory:
            if not (kind == "fused" and settings.kernel == "auto"):
                raise
            # the fused kernel's fixed workspace can exceed a tiny budget that fine einsum slices still meet
            kind = "einsum"
            options.update(kernel=kind, workspace_bytes=0, input_copies=None)
            plan = replan()
        out, plan, retries = kernels.run_with_retry(
            q, k, v, plan, replan, kind, scale, bias, compute_dtype, retry=settings.oom_retry
        )
    except NotEnoughMemory as error:
        host.record_failure(error)
        raise
    record = CallRecord(
        site=site,
        strategy=strategy,
        kernel=kind,
        batch_heads=shape.batch_heads,
        q_tokens=q_tokens,
        k_tokens=shape.k_tokens,
        head_dim=head_dim,
        head_chunk=plan.head_chunk,
        query_chunk=plan.query_chunk,
        steps=plan.steps,
        peak_bytes=plan.peak_bytes,
        budget_bytes=budget.bytes,
        retries=retries,
    )
    host.record(record)
    if settings.log == "every call":
        log.info(
            "memslice: %s %s [%d x %d x %d, d %d] %s (%d heads x %d queries), peak %s of %s (%s)%s",
            site,
            strategy,
            shape.batch_heads,
            q_tokens,
            shape.k_tokens,
            head_dim,
            plural(plan.steps, "slice"),
            plan.head_chunk,
            plan.query_chunk,
            format_bytes(plan.peak_bytes),
            format_bytes(budget.bytes),
            budget.explanation,
            f", {retries} OOM retries" if retries else "",
        )
    return out


def _heads_view(t: Tensor, batch: int, heads: int) -> Tensor:
    """``[B, N, H*d]`` -> ``[B, H, N, d]`` as a view (no copy)."""
    return t.view(batch, t.shape[1], heads, t.shape[2] // heads).transpose(1, 2)


def make_cross_attention_forward(strategy: str, host: Host) -> Callable[..., Tensor]:
    """A ``CrossAttention.forward`` for ldm and sgm that plans every call with ``strategy``."""

    def forward(
        self: Any,
        x: Tensor,
        context: Tensor | None = None,
        mask: Tensor | None = None,
        additional_tokens: Tensor | None = None,
        n_times_crossframe_attn_in_self: int = 0,
        **kwargs: Any,
    ) -> Tensor:
        prefix = 0
        if additional_tokens is not None:  # sgm: extra tokens attend and are dropped from the output
            prefix = additional_tokens.shape[1]
            x = torch.cat([additional_tokens, x], dim=1)
        self_attention = context is None
        context_k, context_v = host.apply_hypernetworks(x if context is None else context)
        q = self.to_q(x)
        k = self.to_k(context_k)
        v = self.to_v(context_v)
        if n_times_crossframe_attn_in_self:  # sgm's cross-frame self-attention, with sgm's exact repeat rule
            n = int(n_times_crossframe_attn_in_self)
            if x.shape[0] % n:
                raise ValueError(
                    f"memslice: batch {x.shape[0]} is not a multiple of n_times_crossframe_attn_in_self={n}"
                )
            k = k[::n].repeat_interleave(x.shape[0] // n, dim=0)
            v = v[::n].repeat_interleave(x.shape[0] // n, dim=0)
        batch, heads = q.shape[0], self.heads
        q, k, v = (_heads_view(t, batch, heads) for t in (q, k, v))
        upcast = host.upcast()
        name, geometry = site_of(self, "attention.self" if self_attention else "attention.cross")
        scale = getattr(self, "scale", q.shape[-1] ** -0.5)
        with host.without_autocast() if upcast else contextlib.nullcontext():
            out = attend(
                q,
                k,
                v,
                scale=scale,
                strategy=strategy,
                host=host,
                mask=mask,
                upcast=upcast,
                site=name,
                geometry=geometry,
            )
        out = self.to_out(out.transpose(1, 2).reshape(batch, out.shape[2], out.shape[1] * out.shape[3]))
        return out[:, prefix:] if prefix else out

    forward.__memslice__ = strategy  # type: ignore[attr-defined]
    return forward


def make_attnblock_forward(
    strategy: str, host: Host, fallback: Callable[..., Tensor] | None = None
) -> Callable[..., Tensor]:
    """An ``AttnBlock.forward`` (the VAE's single-head attention). With the VAE setting off, runs ``fallback``."""

    def forward(self: Any, x: Tensor, **kwargs: Any) -> Tensor:
        if fallback is not None and not host.settings().vae:
            return fallback(self, x, **kwargs)
        h_ = self.norm(x)
        q, k, v = self.q(h_), self.k(h_), self.v(h_)
        b, c, h, w = q.shape
        # [b, 1, hw, c], contiguous: the CPU fused kernel refuses a strided last dim (it would fall back to einsum,
        # whose two score matrices are the largest allocation of a VAE decode)
        q, k, v = (t.reshape(b, c, h * w).transpose(1, 2).contiguous().unsqueeze(1) for t in (q, k, v))
        upcast = host.upcast()
        name, geometry = site_of(self, "vae.mid", Geometry(LATENT_DOWNSCALE, True))
        with host.without_autocast() if upcast else contextlib.nullcontext():
            out = attend(
                q, k, v, scale=int(c) ** -0.5, strategy=strategy, host=host, upcast=upcast, site=name, geometry=geometry
            )
        out = out[:, 0].transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)

    forward.__memslice__ = strategy  # type: ignore[attr-defined]
    return forward
