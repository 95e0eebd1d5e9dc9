"""SD3's joint attention built on the planner: the MMDiT's ``attention(q, k, v, heads, mask=None)`` through attend().

webui 1.10.1's MMDiT (``modules.models.sd3.mmdit``) looks the module global ``attention`` up at every call, once per
joint block: the prompt's text tokens and the image's patch tokens concatenated (text first), one call over all of
them. q and k arrive as ``[B, N, H*d]``, v as ``[B, N, H, d]`` (the MMDiT leaves it a 4-D view) or ``[B, N, H*d]``;
the answer is ``[B, N, H*d]``. Nothing here imports the webui: ``webui/sd3.py`` rebinds the global to the function
made here and puts the webui's back.

Same as the webui's own function where it can be: the same head views, SDPA's default scale ``d ** -0.5``, one
call over ``[B, H, N, d]``; memslice plans it (slices, kernel, out-of-memory retries) like every other call.
Differences, on purpose: no hypernetworks (SD3 has no context to hand them); 'Upcast cross attention layer to
float32' is honoured (the webui's SD3 ignores it), as in every attention memslice runs; a mask memslice's kernels
cannot take as it is (anything but a boolean keep-mask over the keys per batch item) runs the webui's own function,
mask and all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from .forwards import Host, attend
from .limits import Geometry
from .models import JOINT, joint_geometry

Tensor = torch.Tensor
Attention = Callable[..., Tensor]


def _sdpa(q: Tensor, k: Tensor, v: Tensor, heads: int, mask: Tensor | None = None) -> Tensor:
    """The webui's own SD3 attention, as its calling convention defines it: one SDPA call over the head views."""
    b, _, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, -1, heads * d)


def keys_mask(mask: Tensor, batch: int, keys: int) -> Tensor | None:
    """The mask as memslice's keep-mask (``[B, K]``, True keeps a key) when SDPA would read it that way: boolean,
    one row of keys per batch item for every head and query (``[B, 1, 1, K]``, or ``[1, 1, 1, K]`` for all items);
    None for any other mask (per head or query, an additive bias), which memslice does not slice."""
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1:3] != (1, 1) or mask.shape[-1] != keys:
        return None
    if mask.shape[0] not in (1, batch):
        return None
    return mask[:, 0, 0, :].expand(batch, keys)


def make_joint_attention(
    strategy: str,
    host: Host,
    fallback: Attention | None = None,
    text_tokens: Callable[[], int | None] | None = None,
) -> Attention:
    """An SD3 ``attention(q, k, v, heads, mask=None)`` that plans every call with ``strategy``.

    ``fallback`` runs a mask memslice cannot take (the webui's function; one SDPA call without it);
    ``text_tokens`` says how many of the call's tokens are the prompt's (the MMDiT's context length, recorded as the
    model runs), so that an error can name the largest square image size; without it the error names the share of
    the call's tokens that fits."""
    stock = fallback or _sdpa

    def attention(q: Tensor, k: Tensor, v: Tensor, heads: int, mask: Tensor | None = None) -> Tensor:
        b, _, inner = q.shape
        d = inner // heads
        keep = None
        if mask is not None:
            keep = keys_mask(mask, b, k.shape[1])
            if keep is None:
                return stock(q, k, v, heads, mask)
        qh, kh, vh = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
        text = text_tokens() if text_tokens is not None else None
        geometry: Geometry | None = joint_geometry(text) if text else None
        upcast = host.upcast()
        with host.without_autocast() if upcast else contextlib.nullcontext():
            out = attend(qh, kh, vh, scale=d**-0.5, strategy=strategy, host=host, mask=keep, upcast=upcast,
                         site=JOINT, geometry=geometry)  # fmt: skip
        return out.transpose(1, 2).reshape(b, -1, heads * d)

    attention.__memslice__ = strategy  # type: ignore[attr-defined]
    return attention


def text_tokens_recorder() -> tuple[Callable[..., Any], Callable[[], int | None]]:
    """A forward pre-hook for the MMDiT (``register_forward_pre_hook(hook, with_kwargs=True)``) that records its
    context's length, and the reader :func:`make_joint_attention` takes as ``text_tokens``."""
    seen: dict[str, int | None] = {"tokens": None}

    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        context = kwargs.get("context", args[3] if len(args) > 3 else None)
        seen["tokens"] = int(context.shape[1]) if isinstance(context, Tensor) and context.dim() == 3 else None

    return hook, lambda: seen["tokens"]
