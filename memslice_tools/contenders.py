"""The benchmark's contenders: one attention call each, on the same inputs, told the same free-memory number.

Inputs are what the webui's forwards hold when attention starts: for a UNet site the projections ``to_q(x)``,
``to_k(ctx)``, ``to_v(ctx)`` as ``[B, N, H*d]``; for the VAE's mid block the convolutions ``q(h)``, ``k(h)``, ``v(h)``
as ``[b, c, h, w]``. Each contender returns the attention output before ``to_out`` / ``proj_out``.

- memslice strategies: ``forwards.attend`` with a fixed budget of the regime's number (``Attention budget (GiB)``), or
  with default settings reading the machine's free memory in the ample regime;
- the webui 1.10.1 optimizations (:mod:`.webui_attention`, or the real functions of a checkout with ``--webui``),
  each given the regime's number as free memory (what their ``get_available_vram()`` would answer);
- plain SDPA: one fused call on 4-D views, the fused regime's reference time;
- diffusers' own ``SlicedAttnProcessor`` (half the heads per slice), if diffusers imports.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lib_memslice.costs import GiB
from lib_memslice.forwards import BasicHost, attend
from lib_memslice.joint import make_joint_attention
from lib_memslice.models import BUILTIN, JOINT, Site
from lib_memslice.settings import Settings
from lib_memslice.strategies import NAMES as STRATEGY_NAMES

from . import webui_attention

Tensor = torch.Tensor
Call = Callable[[], Tensor]

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Case:
    """One attention site of a built-in model at a square size, in one dtype."""

    model: str
    site: Site
    pixels: int
    dtype: torch.dtype = torch.float32

    @property
    def key(self) -> str:
        return f"{self.model}-{self.pixels}-{self.site.name}-{DTYPE_NAMES.get(self.dtype, self.dtype)}"

    @property
    def label(self) -> str:
        where = "VAE mid block" if self.site.vae else self.site.name.replace("unet.", "UNet ")
        return f"{self.model.upper()} {self.pixels} px {where}"

    def shape_at(self, pixels: int) -> Any:
        size = torch.finfo(self.dtype).bits // 8
        return self.site.shape(pixels, pixels, batch=1, element_size=size)

    @property
    def shape(self) -> Any:
        return self.shape_at(self.pixels)


def make_case(model: str, site_name: str, pixels: int, dtype: torch.dtype = torch.float32) -> Case:
    """A case from the built-in model specs (shapes are never typed by hand)."""
    sites = {s.name: s for s in BUILTIN[model].sites}
    return Case(model, sites[site_name], pixels, dtype)


def make_inputs(case: Case, device: torch.device | str, pixels: int | None = None, seed: int = 0) -> list[Tensor]:
    """q, k, v as the webui's forwards hold them (fixed seed; ``meta`` gives shapes only)."""
    s = case.shape_at(pixels or case.pixels)
    device = torch.device(device)
    if case.site.vae:
        side = (pixels or case.pixels) // 8
        dims = [(s.batch, s.head_dim, side, side)] * 3
    else:
        dims = [(s.batch, s.q_tokens, s.heads * s.head_dim), (s.batch, s.k_tokens, s.heads * s.head_dim),
                (s.batch, s.k_tokens, s.heads * s.v_dim)]  # fmt: skip
    if device.type == "meta":
        return [torch.empty(d, device=device, dtype=case.dtype) for d in dims]
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(d, generator=g).to(device=device, dtype=case.dtype) for d in dims]


def heads_view(t: Tensor, heads: int) -> Tensor:
    """``[B, N, H*d]`` -> ``[B, H, N, d]`` as a view (what the webui's sdp optimizer and memslice do)."""
    b, n, hd = t.shape
    return t.view(b, n, heads, hd // heads).transpose(1, 2)


def merge_heads(out: Tensor) -> Tensor:
    b, h, n, dv = out.shape
    return out.transpose(1, 2).reshape(b, n, h * dv)


def vae_view(t: Tensor) -> Tensor:
    """``[b, c, h, w]`` -> ``[b, 1, hw, c]`` contiguous, as memslice's AttnBlock forward hands it over."""
    b, c, h, w = t.shape
    return t.reshape(b, c, h * w).transpose(1, 2).contiguous().unsqueeze(1)


@dataclass(frozen=True)
class Contender:
    """``prepare(case, qkv, free_bytes)`` -> a call; ``free_bytes`` None: the ample regime (memslice probes)."""

    name: str
    label: str
    family: str  # "memslice" | "webui" | "baseline"
    budget_aware: bool
    free_rule: str
    prepare: Callable[[Case, list[Tensor], int | None], Call]
    vae: bool = True  # runs the VAE case (webui entries that leave AttnBlock alone do not)


def _memslice(strategy: str) -> Contender:
    def prepare(case: Case, qkv: list[Tensor], free: int | None) -> Call:
        settings = Settings() if free is None else Settings(budget_gb=free / GiB)
        host = BasicHost(settings)
        q, k, v = qkv
        site = case.site
        if site.vae:
            # memslice's AttnBlock forward hands attention contiguous [b, 1, hw, c] copies of the convolutions (the
            # fused kernels need a contiguous last dim), one at a time, each convolution output freed once copied:
            # so here, replacing the caller's list entries (a caller that keeps its own references keeps them)
            c = q.shape[1]
            del q, k, v
            for i in range(3):
                qkv[i] = vae_view(qkv[i])
            views = list(qkv)

            def call() -> Tensor:
                return attend(*views, scale=c**-0.5, strategy=strategy, host=host, site=site.name,
                              geometry=site.geometry)  # fmt: skip

            call.host = host  # type: ignore[attr-defined]
            return call
        if site.name == JOINT:  # SD3: the MMDiT's own call, v a [B, N, H, d] view as the webui hands it over
            joint, v4 = make_joint_attention(strategy, host), v.view(*v.shape[:2], site.heads, -1)

            def call() -> Tensor:
                return joint(q, k, v4, site.heads)

            call.host = host  # type: ignore[attr-defined]
            return call
        views = [heads_view(t, site.heads) for t in (q, k, v)]

        def call() -> Tensor:
            out = attend(*views, scale=site.head_dim**-0.5, strategy=strategy, host=host, site=site.name,
                         geometry=site.geometry)  # fmt: skip
            return merge_heads(out)

        call.host = host  # type: ignore[attr-defined]  # the plan behind the last call, for the report
        return call

    rule = "Attention budget (GiB) = the number; ample: default settings, probed"
    return Contender(f"memslice-{strategy}", f"memslice {strategy}", "memslice", True, rule, prepare)


def _webui(contender: webui_attention.WebuiContender) -> Contender:
    def prepare(case: Case, qkv: list[Tensor], free: int | None) -> Call:
        number = free if free is not None else 64 * GiB
        q, k, v = qkv
        if case.site.vae:
            block = contender.attn_block
            assert block is not None
            return lambda: block(q, k, v, number)
        cross = contender.cross_attention
        assert cross is not None
        return lambda: cross(q, k, v, case.site.heads, case.site.head_dim**-0.5, number)

    aware = contender.name in ("Doggettx", "InvokeAI-cuda", "sub-quadratic")
    return Contender(contender.name, contender.label, "webui", aware, contender.free_rule, prepare,
                     vae=contender.attn_block is not None)  # fmt: skip


def _sdpa() -> Contender:
    def prepare(case: Case, qkv: list[Tensor], free: int | None) -> Call:
        q, k, v = qkv
        if case.site.vae:
            views = [vae_view(t) for t in (q, k, v)]
            return lambda: F.scaled_dot_product_attention(*views)
        views = [heads_view(t, case.site.heads) for t in (q, k, v)]
        return lambda: merge_heads(F.scaled_dot_product_attention(*views))

    return Contender("sdpa", "plain SDPA (one call on 4-D views)", "baseline", False, "ignores free memory", prepare)


class _ValueOf(torch.nn.Module):
    """``to_v`` for the diffusers contender: diffusers projects k and v from one input, so an Identity would make
    v = k. This returns the case's own v when handed the case's k."""

    def __init__(self, k: Tensor, v: Tensor) -> None:
        super().__init__()
        self.k, self.v = k, v

    def forward(self, x: Tensor) -> Tensor:
        if x is not self.k:
            raise ValueError("the diffusers contender must be called with the case's k")
        return self.v


def diffusers_status() -> tuple[bool, str]:
    try:
        import diffusers
        from diffusers.models.attention_processor import Attention, SlicedAttnProcessor  # noqa: F401
    except Exception as exc:  # any failure makes the contender unavailable, not the benchmark
        return False, f"diffusers failed to import: {type(exc).__name__}: {exc}"
    return True, f"diffusers {diffusers.__version__}"


def _diffusers() -> Contender | None:
    ok, why = diffusers_status()
    if not ok:
        return None

    def prepare(case: Case, qkv: list[Tensor], free: int | None) -> Call:
        from diffusers.models.attention_processor import Attention, SlicedAttnProcessor

        q, k, v = qkv
        heads, d = case.site.heads, case.site.head_dim
        attn = Attention(query_dim=heads * d, heads=heads, dim_head=d).eval()
        attn.to_q, attn.to_k, attn.to_v = torch.nn.Identity(), torch.nn.Identity(), _ValueOf(k, v)
        attn.to_out[0] = torch.nn.Identity()
        attn.set_processor(SlicedAttnProcessor(slice_size=max(1, heads // 2)))
        attn.to(device=q.device, dtype=q.dtype)
        return lambda: attn(q, encoder_hidden_states=k)

    label = f"diffusers SlicedAttnProcessor, slice_size = heads // 2 ({why})"
    return Contender("diffusers", label, "baseline", False, "ignores free memory: half the heads per slice", prepare,
                     vae=False)  # fmt: skip


MEMSLICE_AUTO = "memslice-auto"
SDPA = "sdpa"


def all_contenders(webui_dir: str | None = None) -> list[Contender]:
    """memslice's strategies, plain SDPA, the webui's optimizations (re-implemented, or real from ``webui_dir``),
    and diffusers' sliced attention."""
    if webui_dir:
        from .webui_real import from_webui

        webui = from_webui(webui_dir)
    else:
        webui = webui_attention.reimplemented()
    found = [_memslice(s) for s in STRATEGY_NAMES] + [_sdpa()] + [_webui(c) for c in webui]
    extra = _diffusers()
    return found + ([extra] if extra else [])
