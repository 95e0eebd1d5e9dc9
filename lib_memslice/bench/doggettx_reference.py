"""REFERENCE ONLY: not part of the extension runtime. Nothing in memslice imports this module.

A re-implementation of the attention core of stable-diffusion-webui 1.10.1's ``split_cross_attention_forward``
(the "Doggettx" optimisation, the seed that memslice replaces), written for the benchmark so that speed and
memory claims are measured against the seed's own behaviour, not against memslice's ``doggettx`` strategy.

Differences from the webui, all outside the core: the projections (``to_q``/``to_k``/``to_v``/``to_out``),
hypernetworks and the upcast option are left to the caller, and the free memory that the webui probes
(``get_available_vram()``) is a parameter, so a fixed budget can stand in for it.
"""

from __future__ import annotations

import math

import torch

GB = 1024**3
#: the seed gives up beyond this many query slices
MAX_STEPS = 64


def split_steps(q_rows: int, q_tokens: int, k_tokens: int, element_size: int, mem_free_total: float) -> int:
    """The seed's slice count: power-of-two query steps so that ``score bytes x modifier`` fits free memory.

    Raises ``RuntimeError`` like the seed once more than :data:`MAX_STEPS` slices would be needed.
    """
    tensor_size = q_rows * q_tokens * k_tokens * element_size
    modifier = 3 if element_size == 2 else 2.5
    mem_required = tensor_size * modifier
    steps = 1
    if mem_required > mem_free_total:
        steps = 2 ** math.ceil(math.log(mem_required / mem_free_total, 2))
    if steps > MAX_STEPS:
        max_res = math.floor(math.sqrt(math.sqrt(mem_free_total / 2.5)) / 8) * 64
        raise RuntimeError(
            f"Not enough memory, use lower resolution (max approx. {max_res}x{max_res}). "
            f"Need: {mem_required / 64 / GB:0.1f}GB free, Have: {mem_free_total / GB:0.1f}GB free"
        )
    return steps


def to_rows(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``b n (h d) -> (b h) n d`` as einops' rearrange does it (a contiguous copy)."""
    b, n, hd = t.shape
    return t.reshape(b, n, heads, hd // heads).permute(0, 2, 1, 3).reshape(b * heads, n, hd // heads)


def from_rows(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``(b h) n d -> b n (h d)``."""
    bh, n, d = t.shape
    return t.reshape(bh // heads, heads, n, d).permute(0, 2, 1, 3).reshape(bh // heads, n, heads * d)


def split_attention(
    q_in: torch.Tensor, k_in: torch.Tensor, v_in: torch.Tensor, heads: int, scale: float, mem_free_total: float
) -> torch.Tensor:
    """The seed's sliced attention on projections ``[B, N, H*d]``; returns ``[B, Nq, H*dv]``.

    Order of operations follows the seed: k is scaled before the head split, every tensor is copied into the
    3-D ``(b h) n d`` layout, the output buffer is zero-filled, then each query slice runs einsum, softmax,
    einsum. ``mem_free_total`` is what the seed would have read from the device.
    """
    dtype = q_in.dtype
    k_in = k_in * scale
    q, k, v = (to_rows(t, heads) for t in (q_in, k_in, v_in))
    del q_in, k_in, v_in

    r1 = torch.zeros(q.shape[0], q.shape[1], v.shape[2], device=q.device, dtype=q.dtype)
    steps = split_steps(q.shape[0], q.shape[1], k.shape[1], q.element_size(), mem_free_total)
    slice_size = q.shape[1] // steps
    for i in range(0, q.shape[1], slice_size):
        end = min(i + slice_size, q.shape[1])
        s1 = torch.einsum("b i d, b j d -> b i j", q[:, i:end], k)
        s2 = s1.softmax(dim=-1, dtype=q.dtype)
        del s1
        r1[:, i:end] = torch.einsum("b i j, b j d -> b i d", s2, v)
        del s2
    del q, k, v

    return from_rows(r1.to(dtype), heads)
