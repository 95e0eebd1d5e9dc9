"""REFERENCE ONLY: the webui 1.10.1's own cross-attention optimizations as benchmark and test contenders.

Not part of the extension runtime; nothing in memslice imports this module. Each contender is our own
re-implementation of the attention core of one entry of stable-diffusion-webui 1.10.1's
``modules/sd_hijack_optimizations.py`` (and ``modules/sub_quadratic_attention.py``), written from what that code
does (names, numbers, order of operations) so that memslice is measured against the webui's behaviour, not against
memslice's own strategies of the same names. :func:`memslice_tools.webui_real.from_webui` offers the same
contenders driven through the real functions of a user's webui checkout, to check these against.

Left to the caller, as everything outside the attention core: the projections (``to_q``/``to_k``/``to_v``/
``to_out``), hypernetworks, ``proj_out`` and the residual add of the VAE's ``AttnBlock``. The upcast option is
off. Where the webui probes free memory (``get_available_vram()``: on CUDA the driver's free memory plus what
torch's caching allocator reserves but does not use, on every other device ``psutil.virtual_memory().available``)
each contender uses the ``free_bytes`` it is given, so every contender sees the same number.

What each contender does with ``free_bytes`` (the webui's behaviour per device in brackets):

- ``sdp``, ``sdp-no-mem``: nothing. One ``scaled_dot_product_attention`` call on 4-D ``[B, H, N, d]`` views
  in the UNet and on 3-D ``[b, hw, c]`` tensors in the VAE; torch's fused kernels need 4-D inputs, so the
  webui's VAE attention always takes the math path (which holds the whole score matrix), on CPU and CUDA alike.
  ``sdp-no-mem`` runs under ``torch.backends.cuda.sdp_kernel(enable_flash=True, enable_math=True,
  enable_mem_efficient=False)``, which only affects CUDA. Seen with torch 2.11 on an H200: 3-D inputs get the math
  path in fp16, bf16 and fp32; under ``sdp-no-mem`` fp32 UNet attention and the VAE's head size 512 (4-D or not)
  fall to math as well (flash needs half precision and head sizes up to 256), while fp16/bf16 UNet attention takes
  cuDNN, which ``sdp_kernel`` leaves enabled (the webui's pinned torch 2.1.2 has no cuDNN backend).
- ``Doggettx``: UNet (``split_cross_attention_forward``): the score tensor ``batch*heads x q x k x element``
  times 3 (2-byte elements) or 2.5 (others) is compared with free memory as is; steps = the next power of two of
  the ratio; more than 64 steps raises ``RuntimeError``; query slices of ``q // steps`` tokens plus a remainder
  slice. VAE (``cross_attention_attnblock_forward``): x2.5 for every dtype, no step cap, and no slicing at all
  when the token count does not divide by the steps. [all devices alike]
- ``InvokeAI-cpu``, ``InvokeAI-cuda`` (``split_cross_attention_forward_invokeAI`` / ``einsum_op``): a largest
  tensor size in MiB; scores at or under it run unsliced, else slices over batch*heads, then over query tokens,
  sized by a power-of-two divisor. The webui picks the size by the tensor's device: CUDA = free memory / 3.3
  (its own probe, same formula as ``get_available_vram``); MPS = rules on total system RAM instead
  (:func:`invokeai_mps_plan`); every other device (CPU, XPU, DirectML) = a fixed 32 MiB. ``InvokeAI-cpu`` always
  applies the fixed 32 MiB (it ignores ``free_bytes``); ``InvokeAI-cuda`` always applies ``free_bytes / 3.3``,
  so a budget matters on a CPU bench too. No ``AttnBlock`` patch: the VAE runs ldm's stock attention.
- ``sub-quadratic`` (``sub_quad_attention`` + ``efficient_dot_product_attention``, the webui's defaults: query
  chunk 1024, kv chunk None, chunk threshold None): threshold = ``int(0.7 * free_bytes)`` [on MPS a fixed
  256 MiB x element size (x2 on i386), not free memory]; when the ``q x k`` score matrix fits the threshold the
  keys are not chunked, else key/value chunks of ``max(isqrt(k_tokens), threshold // (batch*heads * element *
  (d_k + d_v)))`` tokens; queries always run in chunks of 1024 tokens. Its peak therefore does not follow free
  memory down. UNet and VAE paths.
- ``V1`` (``split_cross_attention_forward_v1``): nothing; always slices of 2 rows of batch*heads. No
  ``AttnBlock`` patch.

Where the webui assumes ``d_v == d_k`` (``sdp``'s views, ``sub-quadratic``'s output buffer) these use each
tensor's own head size: the same result wherever the webui's code works.
"""

from __future__ import annotations

import contextlib
import math
import platform
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
CrossAttention = Callable[[Tensor, Tensor, Tensor, int, float, int], Tensor]
AttnBlockCore = Callable[[Tensor, Tensor, Tensor, int], Tensor]

MiB = 1 << 20
#: Doggettx (UNet) gives up beyond this many query slices
DOGGETTX_MAX_STEPS = 64
#: InvokeAI's fixed tensor size for devices other than CUDA and MPS, in MiB
INVOKEAI_CPU_TENSOR_MB = 32
#: InvokeAI's divisor of free CUDA memory ("copying and fragmentation")
INVOKEAI_CUDA_SAFETY = 3.3
#: sub-quadratic's defaults in webui 1.10.1 (``--sub-quad-q-chunk-size``, ``--sub-quad-kv-chunk-size``,
#: ``--sub-quad-chunk-threshold``)
SUBQUAD_Q_CHUNK = 1024
SUBQUAD_KV_CHUNK: int | None = None
SUBQUAD_THRESHOLD: int | None = None
#: share of free memory under which sub-quadratic skips key/value chunking (threshold None)
SUBQUAD_FREE_SHARE = 0.7
#: sub-quadratic's fixed MPS threshold per byte of element (256 MiB)
SUBQUAD_MPS_THRESHOLD = 268435456


@dataclass(frozen=True)
class WebuiContender:
    """One webui cross-attention optimization, reduced to its attention core."""

    name: str
    label: str
    free_rule: str
    #: (q, k, v projections ``[B, N, H*d]``, heads, scale, free_bytes) -> ``[B, Nq, H*dv]``
    cross_attention: CrossAttention | None
    #: (q, k, v conv outputs ``[b, c, h, w]``, free_bytes) -> attention output ``[b, c, h, w]`` (before
    #: ``proj_out`` and the residual add); None where the webui entry leaves ``AttnBlock`` stock
    attn_block: AttnBlockCore | None
    #: how many chunks it runs for a dict with batch_heads, q_tokens, k_tokens, head_dim, element_size,
    #: free_bytes, device_type, vae
    slices: Callable[[dict], int] | None


# --- layouts ---------------------------------------------------------------------------------------------


def to_rows(t: Tensor, heads: int) -> Tensor:
    """``b n (h d) -> (b h) n d`` as a contiguous copy (einops' ``rearrange``, which the webui uses)."""
    b, n, hd = t.shape
    return t.reshape(b, n, heads, hd // heads).permute(0, 2, 1, 3).reshape(b * heads, n, hd // heads)


def from_rows(t: Tensor, heads: int) -> Tensor:
    """``(b h) n d -> b n (h d)``."""
    bh, n, d = t.shape
    return t.reshape(bh // heads, heads, n, d).permute(0, 2, 1, 3).reshape(bh // heads, n, heads * d)


def _tokens_last(t: Tensor) -> Tensor:
    """``b c h w -> b (h w) c``, contiguous: the layout every webui AttnBlock forward hands to attention."""
    return t.flatten(2).transpose(1, 2).contiguous()


def _channels_first(t: Tensor, h: int, w: int) -> Tensor:
    """``b (h w) c -> b c h w`` as a view."""
    b, _, c = t.shape
    return t.view(b, h, w, c).permute(0, 3, 1, 2)


def _count(total: int, size: int) -> int:
    """How many iterations ``range(0, total, size)`` runs; like ``range`` it rejects a zero step."""
    if size == 0:
        raise ValueError("range() arg 3 must not be zero")
    return len(range(0, total, size))


# --- sdp / sdp-no-mem --------------------------------------------------------------------------------------


def sdp_cross_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, scale: float, free_bytes: int) -> Tensor:
    """``scaled_dot_product_attention_forward``: 4-D views, SDPA's own scale (``head_dim ** -0.5``, which is
    ``CrossAttention.scale``; the given ``scale`` is ignored, as the webui ignores ``self.scale``)."""
    b = q.shape[0]
    views = [t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*views, attn_mask=None, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(b, -1, heads * out.shape[-1]).to(q.dtype)


def sdp_attn_block(q: Tensor, k: Tensor, v: Tensor, free_bytes: int) -> Tensor:
    """``sdp_attnblock_forward``: one SDPA call on 3-D ``[b, hw, c]`` tensors (never a fused kernel)."""
    h, w = q.shape[2:]
    out = F.scaled_dot_product_attention(
        _tokens_last(q), _tokens_last(k), _tokens_last(v), dropout_p=0.0, is_causal=False
    )
    return _channels_first(out.to(q.dtype), h, w)


@contextlib.contextmanager
def no_mem_efficient() -> Iterator[None]:
    """What ``sdp-no-mem`` wraps its call in: flash and math allowed, memory-efficient off (CUDA only).

    Uses ``torch.backends.cuda.sdp_kernel`` with the webui's arguments where this torch has it (silencing its
    deprecation warning); otherwise the same choice through ``torch.nn.attention.sdpa_kernel``; otherwise nothing.
    """
    legacy = getattr(torch.backends.cuda, "sdp_kernel", None)
    if legacy is not None:
        with warnings.catch_warnings():  # the deprecation warning is raised when the manager is created
            warnings.simplefilter("ignore", FutureWarning)
            manager = legacy(enable_flash=True, enable_math=True, enable_mem_efficient=False)
        with manager:
            yield
        return
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        yield
        return
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):  # sdp_kernel left cuDNN on by default
        backends.append(SDPBackend.CUDNN_ATTENTION)
    with sdpa_kernel(backends):
        yield


def sdp_no_mem_cross_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, scale: float, free_bytes: int) -> Tensor:
    """``scaled_dot_product_no_mem_attention_forward``."""
    with no_mem_efficient():
        return sdp_cross_attention(q, k, v, heads, scale, free_bytes)


def sdp_no_mem_attn_block(q: Tensor, k: Tensor, v: Tensor, free_bytes: int) -> Tensor:
    """``sdp_no_mem_attnblock_forward``."""
    with no_mem_efficient():
        return sdp_attn_block(q, k, v, free_bytes)


# --- Doggettx ----------------------------------------------------------------------------------------------


def _power_of_two_steps(mem_required: float, free_bytes: float) -> int:
    """Both Doggettx forwards: 1, or 2 ** ceil(log2(required / free)) when the estimate exceeds free memory."""
    if mem_required > free_bytes:
        return 2 ** math.ceil(math.log(mem_required / free_bytes, 2))
    return 1


def doggettx_steps(batch_heads: int, q_tokens: int, k_tokens: int, element_size: int, free_bytes: float) -> int:
    """UNet Doggettx steps (score x3 for 2-byte, x2.5 otherwise); ``RuntimeError`` past 64 like the webui."""
    mem_required = batch_heads * q_tokens * k_tokens * element_size * (3 if element_size == 2 else 2.5)
    steps = _power_of_two_steps(mem_required, free_bytes)
    if steps > DOGGETTX_MAX_STEPS:
        side = math.floor(math.sqrt(math.sqrt(free_bytes / 2.5)) / 8) * 64
        raise RuntimeError(
            f"Doggettx (webui 1.10.1): {steps} query slices needed, more than {DOGGETTX_MAX_STEPS}; "
            f"{mem_required / 2**30:.1f} GiB estimated, {free_bytes / 2**30:.1f} GiB free; "
            f"the webui suggests at most about {side}x{side}"
        )
    return steps


def doggettx_cross_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, scale: float, free_bytes: int) -> Tensor:
    """``split_cross_attention_forward``: k scaled first, query slices of ``q // steps`` plus a remainder."""
    dtype = q.dtype
    k = k * scale
    q, k, v = (to_rows(t, heads) for t in (q, k, v))
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], device=q.device, dtype=q.dtype)
    steps = doggettx_steps(q.shape[0], q.shape[1], k.shape[1], q.element_size(), free_bytes)
    size = q.shape[1] // steps
    for start in range(0, q.shape[1], size):
        stop = min(start + size, q.shape[1])
        scores = torch.einsum("b i d, b j d -> b i j", q[:, start:stop], k)
        probs = scores.softmax(dim=-1, dtype=q.dtype)
        del scores
        out[:, start:stop] = torch.einsum("b i j, b j d -> b i d", probs, v)
        del probs
    return from_rows(out.to(dtype), heads)


def doggettx_vae_slice(batch: int, tokens: int, element_size: int, free_bytes: float) -> int:
    """Query tokens per slice of the VAE Doggettx: ``tokens // steps``, or all of them when that does not divide."""
    steps = _power_of_two_steps(batch * tokens * tokens * element_size * 2.5, free_bytes)
    return tokens // steps if tokens % steps == 0 else tokens


def doggettx_attn_block(q: Tensor, k: Tensor, v: Tensor, free_bytes: int) -> Tensor:
    """``cross_attention_attnblock_forward``: bmm on ``[b, hw, c] x [b, c, hw]``, scores scaled after."""
    b, c, h, w = q.shape
    rows = q.reshape(b, c, h * w).permute(0, 2, 1)
    keys = k.reshape(b, c, h * w)
    values = v.reshape(b, c, h * w)
    out = torch.zeros_like(keys)
    size = doggettx_vae_slice(b, h * w, rows.element_size(), free_bytes)
    for start in range(0, h * w, size):
        scores = torch.bmm(rows[:, start : start + size], keys) * (int(c) ** (-0.5))
        probs = F.softmax(scores, dim=2, dtype=q.dtype)
        del scores
        out[:, :, start : start + size] = torch.bmm(values, probs.permute(0, 2, 1))
        del probs
    return out.reshape(b, c, h, w)


def doggettx_slices(info: dict) -> int:
    """Chunks the Doggettx forwards run (raises where the webui raises)."""
    bh, nq = info["batch_heads"], info["q_tokens"]
    if info["vae"]:
        return _count(nq, doggettx_vae_slice(bh, nq, info["element_size"], info["free_bytes"]))
    steps = doggettx_steps(bh, nq, info["k_tokens"], info["element_size"], info["free_bytes"])
    return _count(nq, nq // steps)


# --- InvokeAI ----------------------------------------------------------------------------------------------


def _einsum_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """InvokeAI's unsliced kernel (``einsum_op_compvis``); k is already scaled."""
    s = torch.einsum("b i d, b j d -> b i j", q, k)
    s = s.softmax(dim=-1, dtype=s.dtype)
    return torch.einsum("b i j, b j d -> b i d", s, v)


def _run_plan(q: Tensor, k: Tensor, v: Tensor, plan: tuple[str, int]) -> Tensor:
    """Run an InvokeAI plan: ``("none", 0)``, ``("heads", rows per slice)`` or ``("queries", tokens per slice)``."""
    how, size = plan
    if how == "none":
        return _einsum_attention(q, k, v)
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], device=q.device, dtype=q.dtype)
    if how == "heads":
        for start in range(0, q.shape[0], size):
            stop = start + size
            out[start:stop] = _einsum_attention(q[start:stop], k[start:stop], v[start:stop])
    else:
        for start in range(0, q.shape[1], size):
            stop = start + size
            out[:, start:stop] = _einsum_attention(q[:, start:stop], k, v)
    return out


def invokeai_tensor_plan(
    batch_heads: int, q_tokens: int, k_tokens: int, element_size: int, max_tensor_mb: float
) -> tuple[str, int]:
    """``einsum_op_tensor_mem``: unsliced up to ``max_tensor_mb``, else a power-of-two divisor over batch*heads
    when it does not exceed them, else over query tokens."""
    size_mb = batch_heads * q_tokens * k_tokens * element_size // MiB
    if size_mb <= max_tensor_mb:
        return ("none", 0)
    div = 1 << int((size_mb - 1) / max_tensor_mb).bit_length()
    if div <= batch_heads:
        return ("heads", batch_heads // div)
    return ("queries", max(q_tokens // div, 1))


def invokeai_mps_plan(batch_heads: int, q_tokens: int, mem_total_gb: int) -> tuple[str, int]:
    """``einsum_op`` on MPS (``einsum_op_mps_v1`` / ``_v2``), from the machine's total RAM in whole GiB."""
    rows = batch_heads * q_tokens
    if mem_total_gb >= 32 and batch_heads % 32 != 0 and rows < 2**18:
        if rows <= 2**16:
            return ("none", 0)
        size = math.floor(2**30 / rows)
        if size % 4096 == 0:
            size -= 1
        return ("queries", size)
    if mem_total_gb > 8 and rows <= 2**16:
        return ("none", 0)
    return ("heads", 1)


def invokeai_cuda_tensor_mb(free_bytes: float) -> float:
    """``einsum_op_cuda``'s largest tensor: free memory / 3.3, in MiB."""
    return free_bytes / INVOKEAI_CUDA_SAFETY / MiB


def _invokeai_cross(max_tensor_mb: Callable[[int], float]) -> CrossAttention:
    def cross_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, scale: float, free_bytes: int) -> Tensor:
        """``split_cross_attention_forward_invokeAI``: k scaled, rows layout, ``einsum_op_tensor_mem``."""
        dtype = q.dtype
        k = k * scale
        q, k, v = (to_rows(t, heads) for t in (q, k, v))
        plan = invokeai_tensor_plan(q.shape[0], q.shape[1], k.shape[1], q.element_size(), max_tensor_mb(free_bytes))
        return from_rows(_run_plan(q, k, v, plan).to(dtype), heads)

    return cross_attention


def invokeai_einsum_op(
    q: Tensor, k: Tensor, v: Tensor, device_type: str, free_bytes: float, mem_total_gb: int
) -> Tensor:
    """``einsum_op`` with the rule ``device_type`` selects (q, k, v in rows layout, k scaled)."""
    if device_type == "cuda":
        plan = invokeai_tensor_plan(
            q.shape[0], q.shape[1], k.shape[1], q.element_size(), invokeai_cuda_tensor_mb(free_bytes)
        )
    elif device_type == "mps":
        plan = invokeai_mps_plan(q.shape[0], q.shape[1], mem_total_gb)
    else:
        plan = invokeai_tensor_plan(q.shape[0], q.shape[1], k.shape[1], q.element_size(), INVOKEAI_CPU_TENSOR_MB)
    return _run_plan(q, k, v, plan)


def _plan_slices(plan: tuple[str, int], batch_heads: int, q_tokens: int) -> int:
    how, size = plan
    if how == "none":
        return 1
    return _count(batch_heads if how == "heads" else q_tokens, size)


def _invokeai_slices(max_tensor_mb: Callable[[int], float]) -> Callable[[dict], int]:
    def slices(info: dict) -> int:
        if info["vae"]:
            return 1  # InvokeAI does not patch AttnBlock: ldm's stock, unsliced attention runs
        bh, nq = info["batch_heads"], info["q_tokens"]
        plan = invokeai_tensor_plan(bh, nq, info["k_tokens"], info["element_size"], max_tensor_mb(info["free_bytes"]))
        return _plan_slices(plan, bh, nq)

    return slices


# --- sub-quadratic -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubQuadChunks:
    """What ``sub_quad_attention`` hands to ``efficient_dot_product_attention``."""

    query_chunk_size: int
    kv_chunk_size: int | None
    kv_chunk_size_min: int | None


def subquad_chunks(
    batch_heads: int,
    q_tokens: int,
    k_tokens: int,
    k_dim: int,
    v_dim: int,
    element_size: int,
    free_bytes: float,
    device_type: str,
    q_chunk_size: int = SUBQUAD_Q_CHUNK,
    kv_chunk_size: int | None = SUBQUAD_KV_CHUNK,
    chunk_threshold: int | None = SUBQUAD_THRESHOLD,
) -> SubQuadChunks:
    """``sub_quad_attention``'s threshold and chunk sizes (``kv_chunk_size_min`` is never given by the webui)."""
    if chunk_threshold is None:
        if device_type == "mps":
            threshold = SUBQUAD_MPS_THRESHOLD * (2 if platform.processor() == "i386" else element_size)
        else:
            threshold = int(free_bytes * SUBQUAD_FREE_SHARE)
    elif chunk_threshold == 0:
        threshold = None
    else:
        threshold = int(0.01 * chunk_threshold * free_bytes)
    kv_min = None if threshold is None else threshold // (batch_heads * element_size * (k_dim + v_dim))
    if threshold is not None and batch_heads * element_size * q_tokens * k_tokens <= threshold:
        kv_chunk_size = k_tokens  # the whole score matrix fits: no key/value chunking
    return SubQuadChunks(q_chunk_size, kv_chunk_size, kv_min)


def _effective_kv_chunk(k_tokens: int, chunks: SubQuadChunks) -> int:
    size = min(chunks.kv_chunk_size or int(math.sqrt(k_tokens)), k_tokens)
    return size if chunks.kv_chunk_size_min is None else max(size, chunks.kv_chunk_size_min)


def _scores(q: Tensor, k: Tensor, scale: float) -> Tensor:
    zero = torch.zeros(1, 1, 1, device=q.device, dtype=q.dtype)
    return torch.baddbmm(zero, q, k.transpose(1, 2), alpha=scale, beta=0)


def _bmm_values(weights: Tensor, v: Tensor) -> Tensor:
    if weights.device.type == "mps":
        return torch.bmm(weights, v)
    return torch.bmm(weights, v.to(weights.dtype)).to(v.dtype)


def _subquad_unchunked(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    probs = _scores(q, k, scale).softmax(dim=-1)
    return _bmm_values(probs, v)


def _subquad_kv_chunked(q: Tensor, k: Tensor, v: Tensor, scale: float, kv_chunk: int) -> Tensor:
    """Per key/value chunk: scores, their max, exp, exp @ v and the exp sums; then rescaled to a common max."""
    n = k.shape[1]
    values, sums, maxima = [], [], []
    for start in range(0, n, kv_chunk):
        length = min(kv_chunk, n - start)
        scores = _scores(q, k.narrow(1, start, length), scale)
        top = torch.max(scores, -1, keepdim=True).values.detach()
        weights = torch.exp(scores - top)
        values.append(_bmm_values(weights, v.narrow(1, start, length)))
        sums.append(weights.sum(dim=-1))
        maxima.append(top.squeeze(-1))
    chunk_values, chunk_sums, chunk_max = torch.stack(values), torch.stack(sums), torch.stack(maxima)
    global_max = torch.max(chunk_max, 0, keepdim=True).values
    factors = torch.exp(chunk_max - global_max)
    chunk_values *= torch.unsqueeze(factors, -1)
    chunk_sums *= factors
    return chunk_values.sum(dim=0) / torch.unsqueeze(chunk_sums, -1).sum(dim=0)


def efficient_attention(q: Tensor, k: Tensor, v: Tensor, chunks: SubQuadChunks) -> Tensor:
    """``efficient_dot_product_attention`` (inference: no checkpointing) on ``[batch*heads, N, d]``."""
    bh, nq, d = q.shape
    nk = k.shape[1]
    scale = d**-0.5
    kv_chunk = _effective_kv_chunk(nk, chunks)

    def attend(part: Tensor) -> Tensor:
        if nk <= kv_chunk:
            return _subquad_unchunked(part, k, v, scale)
        return _subquad_kv_chunked(part, k, v, scale, kv_chunk)

    if nq <= chunks.query_chunk_size:
        return attend(q)
    out = torch.zeros(bh, nq, v.shape[2], device=q.device, dtype=q.dtype)
    step = chunks.query_chunk_size
    for start in range(0, nq, step):
        part = attend(q.narrow(1, start, min(step, nq - start)))
        out[:, start : start + part.shape[1]] = part
    return out


def _subquad(q: Tensor, k: Tensor, v: Tensor, free_bytes: int) -> Tensor:
    """``sub_quad_attention`` on ``[batch*heads, N, d]`` tensors."""
    chunks = subquad_chunks(
        q.shape[0],
        q.shape[1],
        k.shape[1],
        k.shape[2],
        v.shape[2],
        torch.finfo(q.dtype).bits // 8,
        free_bytes,
        q.device.type,
    )
    return efficient_attention(q, k, v, chunks)


def subquad_cross_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, scale: float, free_bytes: int) -> Tensor:
    """``sub_quad_attention_forward``: heads into the batch, scale ``d ** -0.5`` (the given one is ignored)."""
    b = q.shape[0]
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2).flatten(end_dim=1) for t in (q, k, v))
    if q.device.type == "mps":
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = _subquad(q, k, v, free_bytes).to(q.dtype)
    return out.unflatten(0, (b, heads)).transpose(1, 2).flatten(start_dim=2)


def subquad_attn_block(q: Tensor, k: Tensor, v: Tensor, free_bytes: int) -> Tensor:
    """``sub_quad_attnblock_forward``: single head over ``h*w`` tokens of ``c`` channels."""
    h, w = q.shape[2:]
    out = _subquad(_tokens_last(q), _tokens_last(k), _tokens_last(v), free_bytes)
    return _channels_first(out, h, w)


def subquad_slices(info: dict) -> int:
    """Score chunks sub-quadratic computes: query chunks x key/value chunks per query chunk."""
    bh, nq, nk, d = info["batch_heads"], info["q_tokens"], info["k_tokens"], info["head_dim"]
    chunks = subquad_chunks(bh, nq, nk, d, d, info["element_size"], info["free_bytes"], info["device_type"])
    kv_chunk = _effective_kv_chunk(nk, chunks)
    per_query_chunk = 1 if nk <= kv_chunk else _count(nk, kv_chunk)
    query_chunks = 1 if nq <= chunks.query_chunk_size else math.ceil(nq / chunks.query_chunk_size)
    return query_chunks * per_query_chunk


# --- V1 ----------------------------------------------------------------------------------------------------


def v1_cross_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, scale: float, free_bytes: int) -> Tensor:
    """``split_cross_attention_forward_v1``: two rows of batch*heads at a time, scores scaled in place."""
    dtype = q.dtype
    q, k, v = (to_rows(t, heads) for t in (q, k, v))
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], device=q.device, dtype=q.dtype)
    for start in range(0, q.shape[0], 2):
        stop = start + 2
        scores = torch.einsum("b i d, b j d -> b i j", q[start:stop], k[start:stop])
        scores *= scale
        probs = scores.softmax(dim=-1)
        del scores
        out[start:stop] = torch.einsum("b i j, b j d -> b i d", probs, v[start:stop])
        del probs
    return from_rows(out.to(dtype), heads)


def v1_slices(info: dict) -> int:
    return 1 if info["vae"] else _count(info["batch_heads"], 2)


# --- the list ----------------------------------------------------------------------------------------------

FREE_RULES: dict[str, str] = {
    "sdp": "ignores free memory: one scaled_dot_product_attention call (3-D, so never fused, in the VAE)",
    "sdp-no-mem": "ignores free memory: as sdp, with CUDA's memory-efficient kernel disabled",
    "Doggettx": (
        "compares score bytes x3 (2-byte) / x2.5 (else) with free memory as is and takes power-of-two query "
        "steps (UNet: remainder slice, RuntimeError past 64; VAE: x2.5, no cap, unsliced when steps do not divide)"
    ),
    "InvokeAI-cpu": "ignores free memory: largest score tensor a fixed 32 MiB (the webui's rule off CUDA and MPS)",
    "InvokeAI-cuda": "largest score tensor = free memory / 3.3 (the webui's rule on CUDA)",
    "sub-quadratic": (
        "threshold = 0.7 x free memory: no key/value chunking when the scores fit it, else kv chunks of at least "
        "threshold / (batch*heads x element x (d_k + d_v)) tokens; queries always in chunks of 1024"
    ),
    "V1": "ignores free memory: always slices of 2 rows of batch*heads",
}

FUNCTIONS: dict[str, str] = {
    "sdp": "scaled_dot_product_attention_forward, sdp_attnblock_forward",
    "sdp-no-mem": "scaled_dot_product_no_mem_attention_forward, sdp_no_mem_attnblock_forward",
    "Doggettx": "split_cross_attention_forward, cross_attention_attnblock_forward",
    "InvokeAI-cpu": "split_cross_attention_forward_invokeAI, einsum_op (CPU rule: einsum_op_tensor_mem at 32 MiB)",
    "InvokeAI-cuda": "split_cross_attention_forward_invokeAI, einsum_op (CUDA rule: einsum_op_cuda)",
    "sub-quadratic": (
        "sub_quad_attention_forward, sub_quad_attnblock_forward, sub_quad_attention, efficient_dot_product_attention"
    ),
    "V1": "split_cross_attention_forward_v1",
}

NAMES = tuple(FREE_RULES)


def _one(info: dict[str, Any]) -> int:
    return 1


def reimplemented() -> list[WebuiContender]:
    """Our re-implementations of the webui 1.10.1 optimizations, in the webui's order of the list."""

    def make(name: str, cross: CrossAttention, block: AttnBlockCore | None, slices: Callable[[dict], int]):
        label = f"re-implementation of webui 1.10.1 {FUNCTIONS[name]}"
        return WebuiContender(name, label, FREE_RULES[name], cross, block, slices)

    return [
        make("sdp", sdp_cross_attention, sdp_attn_block, _one),
        make("sdp-no-mem", sdp_no_mem_cross_attention, sdp_no_mem_attn_block, _one),
        make("Doggettx", doggettx_cross_attention, doggettx_attn_block, doggettx_slices),
        make(
            "InvokeAI-cpu",
            _invokeai_cross(lambda free: INVOKEAI_CPU_TENSOR_MB),
            None,
            _invokeai_slices(lambda free: INVOKEAI_CPU_TENSOR_MB),
        ),
        make(
            "InvokeAI-cuda",
            _invokeai_cross(invokeai_cuda_tensor_mb),
            None,
            _invokeai_slices(invokeai_cuda_tensor_mb),
        ),
        make("sub-quadratic", subquad_cross_attention, subquad_attn_block, subquad_slices),
        make("V1", v1_cross_attention, None, v1_slices),
    ]


def from_webui(webui_dir: str) -> list[WebuiContender]:
    """The same contenders driven through the real functions of a webui checkout (see :mod:`.webui_real`)."""
    from .webui_real import from_webui as load

    return load(webui_dir)
