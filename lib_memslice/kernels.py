"""Run q, k, v through a SlicePlan: the kernel choice, the slices, and what counts as out-of-memory.

Tensors are ``[B, H, N, d]`` (any strides, typically the free ``view(B, N, H, d).transpose(1, 2)`` of a
projection). That layout matters on CPU, where ``scaled_dot_product_attention`` takes its fused kernel only for
4-D inputs; slicing a 4-D view along heads or queries keeps it 4-D.

Two ways to run a slice:
- ``fused`` / ``sdpa-math``: one ``scaled_dot_product_attention`` per rectangle of the slice;
- ``einsum``: memslice's own kernel for where no fused kernel runs. One score buffer per call, reused by every
  slice: scores are written into it (``baddbmm_``), soft-maxed in place, and multiplied straight into the
  preallocated output (``bmm(out=)``). Nothing is allocated per slice, so the speed does not depend on the C
  allocator (glibc maps and page-faults every fresh tensor of 32 MiB or more), and slices sized to the cache run
  close to the fused kernel on CPUs.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from . import cpu_scratch
from .costs import HALF_GEMM_SCRATCH, KernelChoice, takes_unnormalised
from .slicing import SlicePlan

log = logging.getLogger("memslice")

Tensor = torch.Tensor
HALF = (torch.float16, torch.bfloat16)


#: torch's SDPBackend numbering, as ``torch._fused_sdp_choice`` answers it
_BACKENDS = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}


def sdpa_backend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> str:
    """The SDPA backend torch would pick for these inputs: "flash", "efficient", "cudnn", "math"; "" if unknown.

    Asks torch's own dispatcher choice (``torch._fused_sdp_choice``), so backend switches and dtype or head-dim
    limits are honoured exactly. Older torch without it: assume a fused kernel only on CUDA half precision.
    """
    choose = getattr(torch, "_fused_sdp_choice", None)
    if choose is not None:
        try:
            return _BACKENDS.get(int(choose(q, k, v, attn_mask=mask)), "")
        except Exception:  # unknown signature or unsupported input: be conservative
            return "math"
    return "" if q.is_cuda and q.dtype in HALF else "math"


_SDP_FLAGS = (
    "_get_flash_sdp_enabled",
    "_get_mem_efficient_sdp_enabled",
    "_get_math_sdp_enabled",
    "_get_cudnn_sdp_enabled",
)
#: torch's own getters (the torch.backends.cuda wrappers add a Python call each)
_SDP_FLAG_FNS = tuple(getattr(torch._C, name) for name in _SDP_FLAGS if hasattr(torch._C, name))


def sdp_flags() -> tuple[bool, ...]:
    """torch's global SDPA backend switches (also set by ``sdpa_kernel`` / ``sdp_kernel`` contexts)."""
    return tuple([fn() for fn in _SDP_FLAG_FNS])  # a list, not a generator: a third of the time


def fused_input_copies(q: Tensor, k: Tensor, v: Tensor, compute_dtype: torch.dtype) -> int:
    """How many copies of a chunk's q/k/v a fused call makes: the cast to the compute dtype, and a contiguous or
    padded copy when the last dim is strided or (on accelerators) not a multiple of 8. The CPU kernel reads
    last-dim-contiguous 4-D views in place."""
    copies = int(compute_dtype != q.dtype)
    strided = q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1
    padded = q.device.type != "cpu" and (q.shape[-1] % 8 != 0 or v.shape[-1] % 8 != 0)
    return copies + int(strided or padded)


#: What CUDA's fused kernels allocated beyond their output and log-sum-exp, at most, on an H200 (torch 2.11): 0.75 MiB
#: in bfloat16 at head dim 40 when sliced, nothing elsewhere (``make gpu-check``, kernel memory).
CUDA_FUSED_SCRATCH = 1 << 20


def fused_costs(
    device_type: str,
    backend: str,
    head_dim: int,
    v_dim: int,
    dtype: torch.dtype,
    kv_tokens: int | None = None,
    batch_heads: int | None = None,
) -> tuple[int, int, int]:
    """``(scratch bytes, extra bytes per output element, extra input copies)`` of a fused SDPA call.

    CPU: per-thread scratch, and on AMX CPUs packed K/V copies that grow with the inputs (counted as one more
    input copy), both measured (:mod:`lib_memslice.cpu_scratch`). CUDA: up to 1 MiB of library scratch (measured),
    and the memory-efficient kernel in half precision with value dims over 128 allocates a float32 output
    accumulator (twice a half output).
    """
    element = torch.finfo(dtype).bits // 8
    if device_type == "cpu":
        threads = torch.get_num_threads()
        scratch = cpu_scratch.cpu_fused_scratch(
            head_dim, v_dim, element, threads, kv_tokens=kv_tokens, batch_heads=batch_heads, dtype=dtype
        )
        packs = cpu_scratch.cpu_fused_can_pack(element, dtype) and cpu_scratch.cpu_fused_pack_copies(
            batch_heads or 1, kv_tokens or 512, head_dim, element, threads, dtype=dtype
        )
        return scratch, 0, int(bool(packs))
    if device_type == "cuda":
        extra = 4 if backend in ("efficient", "") and dtype in HALF and v_dim > 128 else 0
        return CUDA_FUSED_SCRATCH, extra, 0
    return 0, 0, 0


def einsum_kernel(device_type: str, dtype: torch.dtype, strided: bool = False) -> KernelChoice:
    """memslice's einsum kernel on this device. On CPU it allocates nothing per slice besides a half-precision
    GEMM's own scratch (checked with the profiler's in-op events); elsewhere ``bmm(out=)`` may go through a
    contiguous temporary of one slice's output and the softmax runs as elementwise ops with two row statistics:
    counted as one element plus one byte per output. ``strided``: see :func:`strided_operands`; a CPU kernel then
    stages its operands (``KernelChoice.staged``): in half precision its GEMMs would clone them on every slice, and
    float32 GEMMs read rows ``H*d`` apart slower (SD3's joint call, 24 heads of 64: 1.19x the time at 2 threads,
    1.05x at one, on an AMD EPYC; SD1.5's 8 heads of 40: the same time)."""
    if device_type == "cpu":
        # unnormalised where exp cannot overflow the type: float32's range, which bfloat16 shares (not float16's)
        unnormalised = dtype in (torch.float32, torch.bfloat16)
        half = dtype in HALF
        scratch = HALF_GEMM_SCRATCH if half else 0  # the cap of a half-precision GEMM's in-op scratch
        return KernelChoice("einsum", scratch, workers=torch.get_num_threads(), unnormalised=unnormalised,
                            staged=strided)  # fmt: skip
    return KernelChoice("einsum", output_extra=torch.finfo(dtype).bits // 8 + 1)


def strided_operands(q: Tensor, k: Tensor, v: Tensor, compute_dtype: torch.dtype) -> bool:
    """Whether the einsum kernel's GEMMs would read q, k or v in a layout a CPU GEMM in half precision clones
    (measured with the profiler on torch 2.1.2, 2.3.1 and 2.13: a head of a ``[B, N, H*d]`` projection, rows
    ``H*d`` apart, is cloned inside ``baddbmm``/``bmm`` on every call; float32 GEMMs read it in place, slower): not
    contiguous within each batch item, and not cast (a cast copies them into contiguous buffers anyway)."""
    if compute_dtype != q.dtype:
        return False
    return not all(t.shape[0] == 0 or t[0].is_contiguous() for t in (q, k, v))


def choose_kernel(
    setting: str, q: Tensor, k: Tensor, v: Tensor, compute_dtype: torch.dtype, mask: Tensor | None = None
) -> KernelChoice:
    """The kernel for this call under the ``kernel`` setting: ``auto`` (fused SDPA where torch runs it, else
    memslice's einsum kernel), ``sdpa`` (always SDPA; its math path where nothing fused applies) or ``einsum``.
    Asks torch with the real shapes (its rules look at sequence lengths too: cuDNN refuses a single key), so it
    costs microseconds; a cast to the compute dtype is asked with a broadcast view of one element, not a copy."""
    if setting == "einsum":
        return einsum_kernel(q.device.type, compute_dtype, strided_operands(q, k, v, compute_dtype))
    samples = [q, k, v]
    if compute_dtype != q.dtype:
        samples = [t[:1, :1, :1].to(compute_dtype).expand(t.shape) for t in samples]
    backend = sdpa_backend(*samples, mask=mask)
    if backend == "math":
        return (
            KernelChoice("sdpa-math", backend="math")
            if setting == "sdpa"
            else einsum_kernel(q.device.type, compute_dtype, strided_operands(q, k, v, compute_dtype))
        )
    batch_heads = q.shape[0] * q.shape[1]
    scratch, extra, packed = fused_costs(
        q.device.type, backend, q.shape[-1], v.shape[-1], compute_dtype, k.shape[2], batch_heads
    )
    copies = fused_input_copies(q, k, v, compute_dtype) + packed
    return KernelChoice("fused", scratch, extra, copies, backend)


#: What choose_kernel answered per (device type, compute dtype, head dim, setting) in real calls: lets the planner
#: API and UI preview the kernel a generation really uses without touching the device themselves.
_observed: dict[tuple[Any, ...], KernelChoice] = {}


def observe(device_type: str, dtype: torch.dtype, head_dim: int, setting: str, kernel: KernelChoice) -> None:
    """Remember what a real call got, under torch's SDPA switches of that moment (a call inside a context that
    turns fused kernels off must not change what previews promise outside it)."""
    key = (device_type, dtype, head_dim, setting, sdp_flags())
    if key not in _observed and len(_observed) < 256:
        _observed[key] = kernel


def expected_kernel(
    device_kind: str,
    dtype: torch.dtype,
    head_dim: int,
    setting: str = "auto",
    ask_device: bool = False,
    v_dim: int | None = None,
    strided: bool = True,
) -> KernelChoice:
    """The kernel a call would get, for previews: what a real call answered, else the CPU (or, with
    ``ask_device``, a present accelerator) asked with tiny tensors, else torch's rules for CUDA: the fused
    memory-efficient kernel for head dims that are multiples of 8 (any dtype; flash only up to 256 in half
    precision, so the VAE's 512 runs memory-efficient, with its float32 accumulator counted), the math path
    elsewhere. Without ``ask_device`` it never touches an accelerator, so the HTTP API can call it while a
    generation runs. ``strided``: whether the call's q, k, v are (:func:`strided_operands`; the UNet's heads of
    its projections are, the VAE's contiguous copies are not).
    """
    v_dim = v_dim or head_dim
    einsum = einsum_kernel(device_kind, dtype, strided)
    if setting == "einsum":
        return einsum
    seen = _observed.get((device_kind, dtype, head_dim, setting, sdp_flags()))
    if seen is not None:
        return replace(seen, staged=einsum.staged) if seen.kind == "einsum" else seen
    if device_kind == "cpu" or (ask_device and device_kind in ("cuda", "mps", "xpu")):
        try:
            q = torch.empty(1, 1, 1, head_dim, dtype=dtype, device=device_kind)
            v = q if v_dim == head_dim else torch.empty(1, 1, 1, v_dim, dtype=dtype, device=device_kind)
        except Exception:  # that device is not present here (torch raises AssertionError for CUDA)
            pass
        else:
            found = choose_kernel(setting, q, q, v, dtype)
            if found.kind == "einsum":
                return einsum
            if found.kind != "fused":
                return found
            # sized for any call (the tiny probe tensors would understate the block-sized scratch)
            scratch, extra, packed = fused_costs(device_kind, found.backend, head_dim, v_dim, dtype)
            return replace(found, scratch=scratch, output_extra=extra, input_copies=packed)
    if device_kind == "cuda" and head_dim % 8 == 0 and v_dim % 8 == 0:
        backend = "flash" if dtype in HALF and max(head_dim, v_dim) <= 128 else "efficient"
        scratch, extra, _ = fused_costs("cuda", backend, head_dim, v_dim, dtype)
        return KernelChoice("fused", scratch, extra, 0, backend)
    return KernelChoice("sdpa-math", backend="math") if setting == "sdpa" else einsum


def expected_kernels(
    device_kind: str,
    dtype: torch.dtype,
    head_dim: int,
    setting: str = "auto",
    ask_device: bool = False,
    v_dim: int | None = None,
    strided: bool = True,
) -> tuple[KernelChoice, ...]:
    """The kernels a call may use, fastest first, as :func:`lib_memslice.forwards.plan_call` tries them."""
    first = expected_kernel(device_kind, dtype, head_dim, setting, ask_device, v_dim, strided)
    return kernels_after(first, setting, device_kind, dtype, strided)


def kernels_after(first: KernelChoice, setting: str, device_type: str, dtype: torch.dtype,
                  strided: bool = True) -> tuple[KernelChoice, ...]:  # fmt: skip
    """``first`` and what a call falls back to when no plan of it fits: with ``kernel = auto`` a fused kernel's
    memslice's einsum kernel (staged when ``strided``, see :func:`strided_operands`); a CPU einsum kernel with several
    workers (one buffer each), the same with one, then without the unnormalised path's buffers (the row sums and
    the norms) and, in float32, without the staged copies: the leanest."""
    found = [first]
    if first.kind == "fused" and setting == "auto":
        found.append(einsum_kernel(device_type, dtype, strided))
    if found[-1].kind == "einsum" and found[-1].workers > 1:
        found.append(replace(found[-1], workers=1))
    if found[-1].kind == "einsum" and found[-1].unnormalised:
        # float32 GEMMs read strided heads in place (only slower): the leanest drops the staged copies there
        found.append(replace(found[-1], unnormalised=False, staged=found[-1].staged and dtype in HALF))
    return tuple(found)


def kernels_for_job(
    device_kind: str, dtype: torch.dtype, vae_dtype: torch.dtype, setting: str = "auto", ask_device: bool = False
) -> Callable[[Any, int], tuple[KernelChoice, ...]]:
    """The job planner's ``kernels_for(site, compute element size)``: the kernels a site's calls would get with
    the UNet in ``dtype`` and the VAE in ``vae_dtype`` (4 bytes: float32, as with upcast or --no-half-vae)."""
    half = dtype if dtype in HALF else torch.float16

    def kernels_for(site: Any, element_size: int) -> tuple[KernelChoice, ...]:
        wanted = vae_dtype if site.vae else dtype
        chosen = (
            wanted if torch.finfo(wanted).bits // 8 == element_size else (half if element_size == 2 else torch.float32)
        )
        # the UNet's heads are strided views of its projections; the VAE hands over contiguous copies
        found = expected_kernels(device_kind, chosen, site.head_dim, setting, ask_device, site.head_dim, not site.vae)
        if chosen is wanted or found[0].kind != "fused":
            return found
        # upcast: the call casts its q, k and v to the compute dtype first (fused_input_copies counts it at run time)
        return (replace(found[0], input_copies=(found[0].input_copies or 0) + 1), *found[1:])

    return kernels_for


# --- masks ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeepMask:
    """ldm's boolean keep-mask, prepared once per call.

    ``drop``: ``[B, 1, 1, K]`` True where a key is masked out (the einsum kernel fills those scores with
    ``-finfo.max`` exactly as ldm's ``masked_fill`` does, so a row with every key masked averages ``v``);
    ``bias``: the same as an additive bias for SDPA; ``dead``: batch items with every key masked (SDPA would give
    NaN there: their output is set to the mean of ``v``, ldm's result).
    """

    drop: Tensor
    bias: Tensor
    dead: Tensor
    any_dead: bool


def keep_mask(mask: Tensor, batch: int, k_tokens: int, dtype: torch.dtype) -> KeepMask:
    """Validate ldm's ``[B, ...]`` boolean keep-mask (flattening to ``[B, k_tokens]``) and prepare it."""
    if mask.dtype != torch.bool:
        raise TypeError(f"memslice: attention mask must be a boolean keep-mask (ldm semantics), got {mask.dtype}")
    flat = mask.reshape(mask.shape[0], -1)
    if flat.shape != (batch, k_tokens):
        raise ValueError(
            f"memslice: attention mask of shape {tuple(mask.shape)} does not match batch {batch} x {k_tokens} keys"
        )
    drop = (~flat)[:, None, None, :]
    bias = torch.zeros(batch, 1, 1, k_tokens, dtype=dtype, device=mask.device).masked_fill_(
        drop, -torch.finfo(dtype).max
    )
    dead = drop.reshape(batch, k_tokens).all(dim=1) if k_tokens else torch.zeros(batch, dtype=torch.bool)
    return KeepMask(drop, bias, dead, bool(dead.any()))


# --- running a plan ----------------------------------------------------------------------------------------


def rectangles(batch: int, heads: int, rows_per_slice: int) -> Iterator[list[tuple[int, int, int, int]]]:
    """Each slice of ``rows_per_slice`` rows of the flattened batch x heads, as ``(b0, b1, h0, h1)`` rectangles:
    a slice that starts or ends inside a batch item becomes a partial item, whole items, and a partial item."""
    total = batch * heads
    for r0 in range(0, total, rows_per_slice):
        r1 = min(r0 + rows_per_slice, total)
        pieces = []
        r = r0
        while r < r1:
            b, h = divmod(r, heads)
            if h == 0 and r1 - r >= heads:
                items = (r1 - r) // heads
                pieces.append((b, b + items, 0, heads))
                r += items * heads
            else:
                end = min(heads, h + (r1 - r))
                pieces.append((b, b + 1, h, end))
                r += end - h
        yield pieces


def _softmax_(s: Tensor) -> None:
    """Softmax over the last dim, in place (the score buffer becomes the probabilities)."""
    if s.device.type in ("cpu", "cuda"):
        torch._softmax(s, -1, False, out=s)
    else:  # elementwise in-place ops only: safe on every backend
        s.sub_(s.amax(dim=-1, keepdim=True)).exp_()
        s.div_(s.sum(dim=-1, keepdim=True))


class _Buffers:
    """One worker's reused storage: the score buffer, and when computing wider than the inputs (or ``staged``) the
    k, v and q copied in the compute dtype, contiguous, and when casting one slice's output. Flat, viewed per slice
    as contiguous blocks: the in-place softmax is only correct on contiguous tensors, and the last slice may be
    shorter than the others.

    ``unnormalised``: each slice row's sum of probabilities, and the norms that bound the logits: of
    a run's keys and of a slice's queries, in the compute dtype (a norm asked for in float32 of bfloat16 rows copies
    them to float32 inside the op), each with one element per row for its maximum."""

    def __init__(self, rows: int, qps: int, q: Tensor, k: Tensor, v: Tensor, dtype: torch.dtype,
                 unnormalised: bool = False, staged: bool = False) -> None:  # fmt: skip
        k_tokens, d, dv = k.shape[2], q.shape[-1], v.shape[-1]
        device = q.device
        self.scores = torch.empty(rows * qps * k_tokens, dtype=dtype, device=device)
        self.cast = dtype != q.dtype
        self.copies = self.cast or staged  # q, k and v are copied into the buffers below before their GEMMs
        self.sums = None
        if unnormalised:
            self.sums = torch.empty(rows * qps, dtype=dtype, device=device)
            # the norms of a run's keys and of a slice's queries, and each row's largest of them
            self.kn = torch.empty(rows * (k_tokens + 1), dtype=dtype, device=device)
            self.qn = torch.empty(rows * (qps + 1), dtype=dtype, device=device)
        if self.copies:
            self.kb = torch.empty(rows, k_tokens, d, dtype=dtype, device=device)
            self.qb = torch.empty(rows * qps * d, dtype=dtype, device=device)
            self.vb = torch.empty(rows, k_tokens, dv, dtype=dtype, device=device)
        if self.cast:
            self.ob = torch.empty(rows * qps * dv, dtype=dtype, device=device)


def _queries(q: Tensor, b: int, h0: int, h1: int, n0: int, m: int, buf: _Buffers) -> Tensor:
    """A slice's queries as its score GEMM reads them: copied into the worker's buffer when casting or staged."""
    qq = q[b, h0:h1, n0 : n0 + m]
    if buf.copies:
        qq = buf.qb[: qq.numel()].view(qq.shape).copy_(qq)
    return qq


def _largest_norms(x: Tensor, norms: Tensor) -> list[float]:
    """Each row's largest vector norm of ``x`` ``[n, m, d]`` (``m`` >= 1), through ``norms`` (``n * (m + 1)``
    elements: no temporaries)."""
    n, m = x.shape[0], x.shape[1]
    every = norms[: n * m].view(n, m)
    torch.linalg.vector_norm(x, dim=-1, out=every)
    return torch.amax(every, dim=-1, out=norms[n * m : n * m + n]).tolist()


def _bounded(qq: Tensor, key_norms: list[float], scale: float, buf: _Buffers) -> bool:
    """Whether every logit of this slice lies within +-LOGIT_BOUND: ``|scale| x |q| x |k|`` (Cauchy-Schwarz) per
    row, from the largest norms of its queries and of its run's keys. The norms are rounded to the compute dtype
    (a relative error of at most eps / 2 each): the bound is widened by ``1 + 2 eps`` per norm to stay above the
    true one."""
    widen = (1 + 2 * torch.finfo(qq.dtype).eps) ** 2 * abs(scale)
    found = _largest_norms(qq, buf.qn)
    return all(a * b * widen <= LOGIT_BOUND for a, b in zip(found, key_norms, strict=True))


def _slice(qq: Tensor, kk: Tensor, vv: Tensor, b: int, h0: int, h1: int, n0: int, scale: float,
           mask: KeepMask | None, out: Tensor, buf: _Buffers, bounded: bool = False) -> None:  # fmt: skip
    """One slice: queries ``qq`` (rows h0:h1 of batch item b from query n0 on) against keys ``kk`` and values
    ``vv``, all in the compute dtype: scores into the buffer, softmax in place, multiplied straight into the output.

    ``bounded``: every logit of these rows lies within +-LOGIT_BOUND (:func:`_bounded`), so ``exp`` can neither
    overflow nor underflow to zero: the scores are exponentiated in place without subtracting their row maximum, as
    ``exp2(x log2 e)`` with log2 e folded into the score GEMM's scale (see LOG2_E), each row summed, multiplied by
    the values and the output divided by the sums (the same result; two passes over the score buffer fewer)."""
    n, m, k_tokens, dv = qq.shape[0], qq.shape[1], kk.shape[1], vv.shape[-1]
    s = buf.scores[: n * m * k_tokens].view(n, m, k_tokens)
    s.baddbmm_(qq, kk.transpose(-1, -2), beta=0, alpha=scale * LOG2_E if bounded else scale)
    if mask is not None:
        s.masked_fill_(mask.drop[b, 0], -torch.finfo(s.dtype).max)
    target = out[b, h0:h1, n0 : n0 + m]
    if bounded:
        s.exp2_()
        sums = torch.sum(s, -1, keepdim=True, out=buf.sums[: n * m].view(n, m, 1))  # type: ignore[index]
        if buf.cast:
            target.copy_(torch.bmm(s, vv, out=buf.ob[: n * m * dv].view(n, m, dv)).div_(sums))
        else:
            torch.bmm(s, vv, out=target).div_(sums)
        return
    _softmax_(s)
    if buf.cast:
        target.copy_(torch.bmm(s, vv, out=buf.ob[: n * m * dv].view(n, m, dv)))
    else:
        torch.bmm(s, vv, out=target)


#: |logit| at most this: exp stays within float32's (and bfloat16's) range with room for a sum over 2^24 keys
LOGIT_BOUND = 60.0
#: The unnormalised path computes ``exp(x)`` as ``exp2(x log2 e)``, log2 e folded into the score GEMM's scale: on
#: CPUs torch's ``exp2`` took 0.78-0.86x the time of its ``exp`` in bfloat16 and 0.27-0.38x in float32 (AMD EPYC
#: Zen 4, torch 2.1.2, 2.3.1 and 2.13, one thread, 0.25-8 M scores; float32 ``exp`` goes through MKL's vector math
#: there). An Intel Xeon measured float32 ``exp2`` 1.06-1.08x slower than ``exp`` (0.3.x, 8 M scores): about 2 % of
#: a slice, against 20-30 % gained on the AMD CPU (docs/benchmarks.md).
LOG2_E = 1.4426950408889634


def _keys(k: Tensor, v: Tensor, b: int, h0: int, h1: int, buf: _Buffers,
          bounding: bool) -> tuple[Tensor, Tensor, list[float] | None]:  # fmt: skip
    """One run's keys and values in the compute dtype (copied into the worker's buffers when casting or staged); with
    ``bounding`` each row's largest key norm is taken too (see :func:`_bounded`)."""
    n = h1 - h0
    kk, vv = k[b, h0:h1], v[b, h0:h1]
    if buf.copies:
        kk, vv = buf.kb[:n].copy_(kk), buf.vb[:n].copy_(vv)
    return kk, vv, _largest_norms(kk, buf.kn) if bounding else None


def _runs(batch: int, heads: int, plan: SlicePlan) -> list[tuple[int, int, int]]:
    """(batch item, first row, end row) in plan order: a run of rows that crosses batch items is run one item at a
    time through the same buffer."""
    return [(b, h0, h1) for pieces in rectangles(batch, heads, plan.heads_per_slice)
            for b0, b1, h0, h1 in pieces for b in range(b0, b1)]  # fmt: skip


class _Queue:
    """The slices of a call, handed out run by run: a worker keeps taking slices of the run whose keys it holds
    and, when that is done, starts a run nobody has started, so each run's keys are copied (and their norms taken)
    once; only at the end does an idle worker join the run with the most slices left. Thread-safe."""

    def __init__(self, runs: list[tuple[int, int, int]], q_tokens: int, queries_per_slice: int) -> None:
        self.runs = runs
        self.queries_per_slice = queries_per_slice
        self.left = [list(range(0, q_tokens, queries_per_slice))[::-1] for _ in runs]
        self.started = 0
        self.lock = threading.Lock()

    def take(self, held: int | None) -> tuple[int, int] | None:
        """(run index, first query) of the next slice for a worker holding run ``held``; None when none is left."""
        with self.lock:
            if held is None or not self.left[held]:
                if self.started < len(self.runs):
                    held = self.started
                    self.started += 1
                else:
                    held = max(range(len(self.runs)), key=lambda r: len(self.left[r]))
                    if not self.left[held]:
                        return None
            return held, self.left[held].pop()


def _work(queue: _Queue, q: Tensor, k: Tensor, v: Tensor, scale: float, mask: KeepMask | None, out: Tensor,
          buf: _Buffers, bounding: bool, stop: Callable[[], bool] = lambda: False) -> None:  # fmt: skip
    """Run slices from ``queue`` through one worker's buffers until none is left (or ``stop`` says so)."""
    held = None
    kk = vv = q
    key_norms: list[float] | None = None
    q_tokens = q.shape[2]
    while not stop():
        taken = queue.take(held)
        if taken is None:
            return
        run, n0 = taken
        b, h0, h1 = queue.runs[run]
        if run != held:
            kk, vv, key_norms = _keys(k, v, b, h0, h1, buf, bounding)
            held = run
        qq = _queries(q, b, h0, h1, n0, min(queue.queries_per_slice, q_tokens - n0), buf)
        fast = key_norms is not None and _bounded(qq, key_norms, scale, buf)
        _slice(qq, kk, vv, b, h0, h1, n0, scale, mask, out, buf, fast)


def _run_einsum(q: Tensor, k: Tensor, v: Tensor, plan: SlicePlan, scale: float, mask: KeepMask | None,
                dtype: torch.dtype, out: Tensor) -> None:  # fmt: skip
    batch, heads, q_tokens, _ = q.shape
    rows, qps = min(plan.heads_per_slice, heads), min(plan.queries_per_slice, q_tokens)
    workers = min(plan.kernel.workers, plan.slices)
    unnormalised = takes_unnormalised(plan.kernel)
    # every worker's buffers allocated here, before any starts: the peak is the cost model's, whatever the timing
    buffers = [_Buffers(rows, qps, q, k, v, dtype, unnormalised, plan.kernel.staged) for _ in range(workers)]
    if q.device.type == "meta":
        # shape tracing (memory only: meta tensors hold no values): the buffers are all a call allocates, since
        # every slice writes into them in place, so the slices themselves are not run
        return
    # a mask's fully masked rows rely on the max subtraction (ldm averages v there): no unnormalised path with one
    bounding = unnormalised and mask is None
    queue = _Queue(_runs(batch, heads, plan), q_tokens, qps)
    if workers > 1 and q.device.type == "cpu" and _may_use_threads(q, k, v):
        _run_parallel(queue, q, k, v, scale, mask, out, buffers, bounding)
        return
    _work(queue, q, k, v, scale, mask, out, buffers[0], bounding)


# --- memslice's CPU worker pool -----------------------------------------------------------------------------------
#
# On CPUs torch runs each op on all its threads, with a barrier at the end of every op: thousands of slices pay it
# thousands of times, and when another process holds a core every barrier waits for the thread that lost it. So the
# einsum kernel runs its slices on a pool of single-threaded workers instead, one per torch thread, each with its
# own buffers, taking the next slice when it is done: no barrier between slices, and a worker on a busy core simply
# takes fewer of them. The cost model counts one buffer per worker (KernelChoice.workers).

_pools: dict[int, Any] = {}
_pools_lock = threading.Lock()


def _single_threaded() -> None:
    """A worker's initializer. torch sets a thread's OpenMP threads from its global default the first time the
    thread asks (get_num_threads does): ask first, then set this thread's own (OpenMP's and MKL's are per thread)."""
    torch.get_num_threads()
    torch.set_num_threads(1)


def _pool(workers: int) -> Any:
    """A pool of ``workers`` single-threaded workers, started once (the global default torch.set_num_threads also
    sets is restored once every worker has set its own)."""
    from concurrent.futures import ThreadPoolExecutor

    with _pools_lock:
        pool = _pools.get(workers)
        if pool is None:
            threads = torch.get_num_threads()
            pool = ThreadPoolExecutor(workers, thread_name_prefix="memslice", initializer=_single_threaded)
            started = threading.Barrier(workers)
            for future in [pool.submit(started.wait) for _ in range(workers)]:
                future.result()
            torch.set_num_threads(threads)
            _pools[workers] = pool
        return pool


def _may_use_threads(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Threads only for plain inference: not while torch.compile traces, not when autograd records."""
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if compiling is None:
        compiling = getattr(getattr(torch, "_dynamo", None), "is_compiling", None)
    if compiling is not None and compiling():
        return False
    return not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))


def _dispatch_modes() -> list[Any]:
    try:
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

        return list(_get_current_dispatch_mode_stack())
    except Exception:  # a torch without it: none to carry over
        return []


def _run_parallel(queue: _Queue, q: Tensor, k: Tensor, v: Tensor, scale: float, mask: KeepMask | None,
                  out: Tensor, buffers: list[_Buffers], bounding: bool) -> None:  # fmt: skip
    errors: list[BaseException] = []
    inference = torch.is_inference_mode_enabled()
    modes = _dispatch_modes()

    def work(buf: _Buffers) -> None:
        # what the caller's thread runs under is per thread: inference mode, and dispatch modes (a memory tracker)
        with torch.inference_mode(inference), torch.no_grad(), contextlib.ExitStack() as stack:
            for mode in modes:
                stack.enter_context(mode)
            try:
                _work(queue, q, k, v, scale, mask, out, buf, bounding, stop=lambda: bool(errors))
            except BaseException as exc:  # the first error stops every worker; the caller re-raises it
                errors.append(exc)

    pool = _pool(len(buffers))
    for future in [pool.submit(work, buf) for buf in buffers]:
        future.result()
    if errors:
        raise errors[0]


def _sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """One SDPA call as the webui's ``sdp`` forward makes it: q, k and v viewed as heads of their projections, cast
    to the compute dtype only when upcasting, SDPA's own default scale where the module's is the default (it always
    is in ldm and sgm), so an unsliced call gives sdp's bits exactly (tests/test_same_bits.py)."""
    if q.dtype != dtype:  # upcasting (sdp's q.float(), k.float(), v.float())
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    default = scale == q.shape[-1] ** -0.5
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=None if default else scale)


def _autocast_takes_a_device() -> bool:
    """torch >= 2.4 has ``is_autocast_enabled(device_type)``; older ones one function per device type. Decided once:
    a TypeError caught per call would break a ``torch.compile`` graph on torch 2.1 (dynamo raises on it)."""
    try:
        torch.is_autocast_enabled("cpu")
    except TypeError:
        return False
    except Exception:  # any other answer still means it takes the argument
        return True
    return True


_AUTOCAST_BY_DEVICE = _autocast_takes_a_device()


def _autocast_enabled(device_type: str) -> bool:
    if not _AUTOCAST_BY_DEVICE:
        if device_type == "cpu":
            return bool(torch.is_autocast_cpu_enabled())
        return device_type == "cuda" and bool(torch.is_autocast_enabled())
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except RuntimeError:  # a device type autocast does not know (DirectML's privateuseone, meta): no autocast
        return False


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast would change the dtype under the plan (CUDA autocast runs ``softmax`` in float32 and matmuls in
    half): the kernel runs in exactly the dtype it was planned for."""
    if _autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def run_plan(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    plan: SlicePlan,
    scale: float,
    mask: KeepMask | None = None,
    compute_dtype: torch.dtype | None = None,
) -> Tensor:
    """Execute ``plan``; returns ``[B, H, Nq, dv]`` in ``q.dtype`` (a view of a ``[B, Nq, H, dv]`` buffer)."""
    batch, heads, q_tokens, _ = q.shape
    dv = v.shape[-1]
    dtype = compute_dtype or q.dtype
    if q.numel() == 0 or k.shape[2] == 0:
        # no queries: nothing to do; no keys: the empty weighted sum is zero (as ldm's einsum gives)
        return q.new_zeros(batch, q_tokens, heads, dv).permute(0, 2, 1, 3)
    kind = plan.kernel.kind
    with _no_autocast(q.device.type):
        if kind == "einsum":
            out = torch.empty(batch, q_tokens, heads, dv, dtype=q.dtype, device=q.device).permute(0, 2, 1, 3)
            _run_einsum(q, k, v, plan, scale, mask, dtype, out)
            return out
        bias = None if mask is None else mask.bias
        if not plan.sliced:
            out = _sdpa(q, k, v, scale, bias, dtype)
            out = out if out.dtype == q.dtype else out.to(q.dtype)
        else:
            out = torch.empty(batch, q_tokens, heads, dv, dtype=q.dtype, device=q.device).permute(0, 2, 1, 3)
            qps = plan.queries_per_slice
            for pieces in rectangles(batch, heads, plan.heads_per_slice):
                for b0, b1, h0, h1 in pieces:
                    kk = vv = None  # the last rectangle's casts die before this one's are made (the plan holds one)
                    kk, vv = k[b0:b1, h0:h1].to(dtype), v[b0:b1, h0:h1].to(dtype)  # cast once per rectangle
                    bb = None if bias is None else bias[b0:b1]
                    for n0 in range(0, q_tokens, qps):
                        n1 = min(n0 + qps, q_tokens)
                        out[b0:b1, h0:h1, n0:n1] = _sdpa(q[b0:b1, h0:h1, n0:n1], kk, vv, scale, bb, dtype)
        if mask is not None and mask.any_dead:  # ldm: every key masked -> uniform weights -> mean of v
            out[mask.dead] = v[mask.dead].mean(dim=2, keepdim=True).to(out.dtype)
        return out


# --- out of memory -------------------------------------------------------------------------------------------

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
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
    "hiperroroutofmemory",
)


def is_oom(exc: BaseException) -> bool:
    """Out-of-memory from any backend: torch's OOM types, MemoryError, or their runtime-error messages
    (cuBLAS and cuDNN report a failed workspace allocation as a status, not as torch's OOM type)."""
    from .limits import NotEnoughMemory

    if isinstance(exc, NotEnoughMemory):
        return False
    if isinstance(exc, _OOM_TYPES):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc).lower() for text in _OOM_TEXT)


def release_after_oom(device: torch.device) -> None:
    """Return cached blocks after an OOM so the retry sees the memory the failed attempt released."""
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        elif device.type == "mps":
            torch.mps.empty_cache()
    except Exception:  # best effort
        pass
