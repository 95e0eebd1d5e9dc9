"""Run q, k, v through a SlicePlan: head and query chunks into a preallocated output, retrying on OOM.

Tensors are ``[B, H, N, d]`` (any strides, typically the free ``view(B, N, H, d).transpose(1, 2)`` of a
projection). That layout matters on CPU, where ``scaled_dot_product_attention`` takes its fused kernel only for
4-D inputs; slicing a 4-D view along heads or queries keeps it 4-D.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from .plan import NotEnoughMemory, SlicePlan

log = logging.getLogger("memslice")

Tensor = torch.Tensor

#: Bytes of per-thread scratch the fused CPU kernel allocates outside torch's dispatcher (measured ~0.6 MiB).
CPU_FUSED_WORKSPACE_PER_THREAD = 1 << 20


def _sdpa_has_scale() -> bool:
    import inspect

    try:
        return "scale" in inspect.signature(F.scaled_dot_product_attention).parameters
    except (TypeError, ValueError):  # a builtin without a signature: torch >= 2.1 documents ``scale``
        return True


_HAS_SDPA = hasattr(F, "scaled_dot_product_attention")
_HAS_SCALE = _HAS_SDPA and _sdpa_has_scale()


def fused_sdpa_available(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> bool:
    """Whether SDPA would pick a fused kernel (flash / memory-efficient / cuDNN) for these inputs.

    Asks torch's own dispatcher choice (``torch._fused_sdp_choice``, 0 = math) so backend flags and dtype or
    head-dim limits are honoured exactly. Older torch without it: assume fused only on CUDA half precision.
    """
    if not _HAS_SDPA:
        return False
    choose = getattr(torch, "_fused_sdp_choice", None)
    if choose is not None:
        try:
            return int(choose(q, k, v, attn_mask=mask)) > 0
        except Exception:  # unknown signature or unsupported input: be conservative
            return False
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


#: What resolve_kernel answered per (device type, compute dtype, head dim, setting): lets the planner API and
#: UI preview the kernel a generation really uses without touching the device themselves.
_observed: dict[tuple[str, torch.dtype, int, str], tuple[str, int]] = {}


_SDP_FLAG_FNS = tuple(
    getattr(torch.backends.cuda, name)
    for name in ("flash_sdp_enabled", "mem_efficient_sdp_enabled", "math_sdp_enabled", "cudnn_sdp_enabled")
    if hasattr(torch.backends.cuda, name)
)


def _sdp_flags() -> tuple[bool, ...]:
    """torch's global SDPA backend switches (also set by ``sdpa_kernel``/``sdp_kernel`` contexts)."""
    return tuple(fn() for fn in _SDP_FLAG_FNS)


_resolved: dict[tuple, tuple[str, int]] = {}
_RESOLVED_SIZE = 256


def resolve_kernel(
    setting: str, q: Tensor, k: Tensor, v: Tensor, compute_dtype: torch.dtype, mask: Tensor | None = None
) -> tuple[str, int]:
    """The planner's kernel kind for this call and the fused kernel's hidden workspace in bytes.

    ``setting`` is ``auto`` (fused SDPA where it runs, else einsum, whose memory is predictable), ``sdpa``
    (always SDPA; its math fallback when nothing fused applies) or ``einsum``. Answers are cached per shape,
    dtypes, layout and torch's backend switches, so a generation asks torch once per distinct layer.
    """
    if setting == "einsum" or not _HAS_SDPA:
        return "einsum", 0
    key = (
        setting,
        q.device,
        q.dtype,
        compute_dtype,
        tuple(q.shape),
        k.shape[2],
        v.shape[-1],
        (q.stride(-1), k.stride(-1), v.stride(-1)),
        None if mask is None else (mask.dtype, tuple(mask.shape)),
        torch.get_num_threads(),
        _sdp_flags(),
    )
    found = _resolved.get(key)
    if found is None:
        found = _resolve(setting, q, k, v, compute_dtype, mask)
        if len(_resolved) >= _RESOLVED_SIZE:
            _resolved.clear()
        _resolved[key] = found
    return found


def _resolve(
    setting: str, q: Tensor, k: Tensor, v: Tensor, compute_dtype: torch.dtype, mask: Tensor | None
) -> tuple[str, int]:
    probe = [t[:1, :1, :1] for t in (q, k, v)]
    if compute_dtype != q.dtype:
        probe = [t.to(compute_dtype) for t in probe]
    small_mask = None if mask is None else mask[:1, :, :1]
    if fused_sdpa_available(*probe, mask=small_mask):
        workspace = CPU_FUSED_WORKSPACE_PER_THREAD * torch.get_num_threads() if q.device.type == "cpu" else 0
        found = "fused", workspace
    else:
        found = ("sdpa-math" if setting == "sdpa" else "einsum"), 0
    if mask is None:
        key = (q.device.type, compute_dtype, q.shape[-1], setting)
        if key not in _observed and len(_observed) < 256:
            _observed[key] = found
    return found


def expected_kernel(
    device_kind: str, dtype: torch.dtype, head_dim: int, setting: str = "auto", ask_device: bool = False
) -> tuple[str, int]:
    """The kernel a call would get, for previews: what a real call answered, else the CPU (or, with
    ``ask_device``, a present accelerator) asked with tiny tensors, else a conservative assumption: fused SDPA on
    CUDA for head dims up to 256 in multiples of 8, einsum elsewhere. Without ``ask_device`` it never touches an
    accelerator, so the HTTP API can call it while a generation runs.
    """
    if setting == "einsum" or not _HAS_SDPA:
        return "einsum", 0
    seen = _observed.get((device_kind, dtype, head_dim, setting))
    if seen is not None:
        return seen
    if device_kind == "cpu" or (ask_device and device_kind in ("cuda", "mps", "xpu")):
        try:
            t = torch.empty(1, 1, 1, head_dim, dtype=dtype, device=device_kind)
        except Exception:  # that device is not present here (torch raises AssertionError for CUDA)
            pass
        else:
            return resolve_kernel(setting, t, t, t, dtype)
    if device_kind == "cuda" and head_dim % 8 == 0 and head_dim <= 256:
        return "fused", 0
    return ("sdpa-math" if setting == "sdpa" else "einsum"), 0


def fused_input_copies(q: Tensor, k: Tensor, v: Tensor, compute_dtype: torch.dtype) -> int:
    """How many copies of a chunk's q/k/v a fused call makes: the cast to the compute dtype, and a contiguous or
    padded copy when the last dim is strided or (on accelerators) not a multiple of 8. The CPU kernel reads
    last-dim-contiguous 4-D views in place."""
    copies = int(compute_dtype != q.dtype)
    strided = q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1
    padded = q.device.type != "cpu" and (q.shape[-1] % 8 != 0 or v.shape[-1] % 8 != 0)
    return copies + int(strided or padded)


def keep_mask_to_bias(mask: Tensor, batch: int, k_tokens: int, dtype: torch.dtype) -> Tensor:
    """ldm's boolean keep-mask (``[B, ...]`` flattening to ``[B, k_tokens]``) as an additive ``[B,1,1,K]`` bias.

    Dropped keys get ``-finfo.max`` like ldm's ``masked_fill``, so a row that masks every key averages ``v``
    instead of turning into NaN.
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"memslice: attention mask must be a boolean keep-mask (ldm semantics), got {mask.dtype}")
    flat = mask.reshape(mask.shape[0], -1)
    if flat.shape != (batch, k_tokens):
        raise ValueError(
            f"memslice: attention mask of shape {tuple(mask.shape)} does not match batch {batch} x {k_tokens} keys"
        )
    bias = torch.zeros(batch, 1, 1, k_tokens, dtype=dtype, device=mask.device)
    return bias.masked_fill_(~flat[:, None, None, :], -torch.finfo(dtype).max)


def _chunk(q: Tensor, k: Tensor, v: Tensor, kind: str, scale: float, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """Attention for one chunk in ``dtype``; returns ``[b, h, n, dv]``."""
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)  # no-ops unless upcasting
    if kind != "einsum":
        if _HAS_SCALE:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
        return F.scaled_dot_product_attention(q * (scale * q.shape[-1] ** 0.5), k, v, attn_mask=bias)
    scores = torch.matmul(q * scale, k.transpose(-1, -2))
    if bias is not None:
        scores.add_(bias)
    scores = scores.softmax(dim=-1)
    return torch.matmul(scores, v)


def head_ranges(batch: int, heads: int, head_chunk: int) -> Iterator[tuple[int, int, int, int]]:
    """``(b0, b1, h0, h1)`` rectangles: whole items when ``head_chunk >= heads``, else head runs per item."""
    if head_chunk >= heads:
        items = max(1, head_chunk // heads)
        for b0 in range(0, batch, items):
            yield b0, min(b0 + items, batch), 0, heads
        return
    for b in range(batch):
        for h0 in range(0, heads, head_chunk):
            yield b, b + 1, h0, min(h0 + head_chunk, heads)


def run_plan(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    plan: SlicePlan,
    kind: str,
    scale: float,
    bias: Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> Tensor:
    """Execute ``plan``; returns ``[B, H, Nq, dv]`` in ``q.dtype`` (a view of a ``[B, Nq, H, dv]`` buffer)."""
    batch, heads, q_tokens, _ = q.shape
    dv = v.shape[-1]
    dtype = compute_dtype or q.dtype
    if q.numel() == 0 or k.shape[2] == 0:
        # no queries: nothing to do; no keys: the empty weighted sum is zero (as ldm's einsum gives)
        return q.new_zeros(batch, q_tokens, heads, dv).permute(0, 2, 1, 3)
    if not plan.sliced:
        out = _chunk(q, k, v, kind, scale, bias, dtype)
        return out if out.dtype == q.dtype else out.to(q.dtype)
    out = torch.empty(batch, q_tokens, heads, dv, dtype=q.dtype, device=q.device).permute(0, 2, 1, 3)
    qc = plan.query_chunk
    for b0, b1, h0, h1 in head_ranges(batch, heads, plan.head_chunk):
        kk, vv = k[b0:b1, h0:h1].to(dtype), v[b0:b1, h0:h1].to(dtype)  # cast once per head range, not per slice
        bb = None if bias is None else bias[b0:b1]
        for n0 in range(0, q_tokens, qc):
            n1 = min(n0 + qc, q_tokens)
            out[b0:b1, h0:h1, n0:n1] = _chunk(q[b0:b1, h0:h1, n0:n1], kk, vv, kind, scale, bb, dtype)
    return out


_OOM_TYPES: tuple[type[BaseException], ...] = tuple(
    t
    for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None), MemoryError)
    if isinstance(t, type)
)
_OOM_TEXT = (
    "out of memory",
    "can't allocate memory",
    "cannot allocate memory",
    "failed to allocate",
    "could not allocate tensor",
    "not enough gpu video memory",
    "defaultcpuallocator",
)


def is_oom(exc: BaseException) -> bool:
    """Out-of-memory from any backend: torch's OOM types, MemoryError, or their runtime-error messages."""
    if isinstance(exc, NotEnoughMemory):
        return False
    if isinstance(exc, _OOM_TYPES):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc).lower() for text in _OOM_TEXT)


def run_with_retry(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    plan: SlicePlan,
    replan: Callable[[int], SlicePlan],
    kind: str,
    scale: float,
    bias: Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
    retry: bool = True,
) -> tuple[Tensor, SlicePlan, int]:
    """Run ``plan``; on out-of-memory drop everything the attempt held and run ``replan(2 * steps)``.

    ``replan`` raises :class:`NotEnoughMemory` once the doubled step count passes the slice cap. Returns the
    output, the plan that succeeded and how many retries it took. A failed attempt's partial output is never
    returned: each attempt writes a fresh buffer.
    """
    retries = 0
    while True:
        failed = None
        try:
            return run_plan(q, k, v, plan, kind, scale, bias, compute_dtype), plan, retries
        except Exception as exc:
            if not retry or not is_oom(exc):
                raise
            # keep only the text: the traceback's frames hold the chunk tensors
            failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            exc.__traceback__ = None
            del exc
        _empty_cache(q.device)
        retries += 1
        log.info("memslice: out of memory at %d slices (%s); retrying with %d", plan.steps, failed, plan.steps * 2)
        plan = replan(plan.steps * 2)


def _empty_cache(device: torch.device) -> None:
    """Return cached blocks after an OOM so the retry sees the memory the failed attempt released."""
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        elif device.type == "mps":
            torch.mps.empty_cache()
    except Exception:  # best effort
        pass
