"""The largest square size each contender reaches under a fixed free memory: the whole call, q, k and v included.

On a 2-core CPU a real call at 2,000+ px takes minutes, so the search traces instead: the same code runs on
``meta`` tensors (shapes only, no arithmetic) under the live-tensor tracker with meta storages counted, so every
tensor any contender allocates is counted at its real size. What ``meta`` cannot reproduce is modelled from
measurements, as the CPU does it:

- torch's SDPA on meta tensors always takes its math path; where the CPU would run its fused kernel (4-D inputs,
  last dims contiguous, float32/bfloat16, ``d_k == d_v``, fused backends on) the tracer allocates what that kernel
  allocates instead: the output, a float32 log-sum-exp per row and its per-thread scratch
  (:func:`lib_memslice.cpu_scratch.cpu_fused_scratch`, checked byte for byte against the profiler's in-op events);
- memslice's probe reads the same free-memory number every contender is told.

tests/test_bench.py checks that a traced peak equals a real CPU run's (profiler) peak for every contender at small
sizes, in both regimes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from lib_memslice import cpu_scratch, forwards, kernels, probe

from . import inop
from .contenders import Case, Contender, make_inputs
from .memtrack import PeakTracker

Tensor = torch.Tensor
_FUSED_DTYPES = (torch.float32, torch.bfloat16)
SAFE_SOFTMAX = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def _fused_on_cpu(q: Tensor, k: Tensor, v: Tensor, mask: Any, fused: bool) -> bool:
    """Whether the CPU would run its fused kernel for these (meta) inputs."""
    return (
        fused
        and mask is None
        and q.dim() == 4
        and q.dtype in _FUSED_DTYPES
        and q.shape[-1] == v.shape[-1]
        and all(t.stride(-1) == 1 for t in (q, k, v))
    )


@contextlib.contextmanager
def traced_cpu(fused: bool) -> Iterator[None]:
    """Meta tensors behave, memory-wise, as CPU tensors would (see the module docstring)."""
    real_sdpa, real_choice, real_costs = (
        F.scaled_dot_product_attention,
        getattr(torch, "_fused_sdp_choice", None),
        kernels.fused_costs,
    )

    def sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Any = None, *args: Any, **kwargs: Any) -> Tensor:
        if q.device.type != "meta":
            return real_sdpa(q, k, v, attn_mask, *args, **kwargs)
        if not _fused_on_cpu(q, k, v, attn_mask, fused):
            # the math path; on the CPU its safe softmax (torch >= 2.5) also holds a boolean per score
            flags = torch.empty(q.shape[:-1].numel() * k.shape[-2] if SAFE_SOFTMAX else 0, dtype=torch.bool,
                                device="meta")  # fmt: skip
            out = real_sdpa(q, k, v, attn_mask, *args, **kwargs)
            del flags
            return out
        b, h, n, _ = q.shape
        scratch = cpu_scratch.cpu_fused_scratch(q.shape[-1], v.shape[-1], q.element_size(), torch.get_num_threads(),
                                                q_rows=n, kv_tokens=k.shape[-2])  # fmt: skip
        # the CPU kernel writes a [B, N, H, d] buffer and returns it as [B, H, N, d]
        out = torch.empty(b, n, h, v.shape[-1], dtype=q.dtype, device="meta").transpose(1, 2)
        lse = torch.empty(b, h, n, dtype=torch.float32, device="meta")
        transient = torch.empty(scratch, dtype=torch.uint8, device="meta")
        del lse, transient
        return out

    def choice(q: Tensor, k: Tensor, v: Tensor, attn_mask: Any = None, *args: Any, **kwargs: Any) -> int:
        if q.device.type != "meta":
            return real_choice(q, k, v, attn_mask, *args, **kwargs)  # type: ignore[misc]
        return 1 if _fused_on_cpu(q, k, v, attn_mask, fused) else 0

    def costs(device_type: str, *args: Any, **kwargs: Any) -> tuple[int, int, int]:
        return real_costs("cpu" if device_type == "meta" else device_type, *args, **kwargs)

    real_kind = probe.device_kind

    def kind(device: Any) -> str:
        return "cpu" if getattr(device, "type", device) == "meta" else real_kind(device)

    real_einsum = kernels.einsum_kernel

    def einsum(device_type: str, dtype: torch.dtype, strided: bool = False) -> Any:  # the CPU's: a worker per thread
        return real_einsum("cpu" if device_type == "meta" else device_type, dtype, strided)

    F.scaled_dot_product_attention = sdpa
    torch._fused_sdp_choice = choice
    kernels.fused_costs = costs
    kernels.einsum_kernel = einsum
    probe.device_kind = kind  # memslice plans for the CPU it stands in for
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real_sdpa
        if real_choice is not None:
            torch._fused_sdp_choice = real_choice
        kernels.fused_costs = real_costs
        kernels.einsum_kernel = real_einsum
        probe.device_kind = real_kind


@contextlib.contextmanager
def probe_reads(free_bytes: int) -> Iterator[None]:
    """memslice's probe answers the number every contender is told."""
    real = probe.free_memory
    probe.free_memory = lambda device, precise=False: probe.FreeMemory(int(free_bytes), "the benchmark's number")
    try:
        yield
    finally:
        probe.free_memory = real


def traced_peak(
    contender: Contender,
    case: Case,
    pixels: int,
    told: int | None,
    fused: bool,
    probe_free: int,
    inputs: bool = True,
    limit: int | None = None,
) -> int | None:
    """Traced peak of one call at ``pixels`` (its q, k, v counted when ``inputs``): the contender is told ``told``
    (None: memslice's default settings) and memslice's probe reads ``probe_free``; past ``limit`` live bytes an
    allocation fails as on a device that size (memslice then retries, as it would). None when it refuses or fails."""
    forwards._memo.clear()  # every size and number planned afresh
    with traced_cpu(fused), probe_reads(probe_free):
        qkv = None if inputs else make_inputs(case, "meta", pixels)
        with PeakTracker(meta=True, limit=limit) as tracker:
            qkv = qkv or make_inputs(case, "meta", pixels)
            try:
                out = contender.prepare(case, qkv, told)()
            except Exception:  # NotEnoughMemory, the webui's RuntimeError, a failed allocation: does not fit
                return None
            del out
    return tracker.peak


def whole_call_peak(contender: Contender, case: Case, pixels: int, free_bytes: int, fused: bool) -> int | None:
    """Traced peak of one whole call at ``pixels``: q, k, v allocated, then the contender told the free memory left
    after them. None when the contender refuses or fails (its own 'not enough memory')."""
    left = free_bytes - case.shape_at(pixels).input_bytes
    if left <= 0:
        return None
    return traced_peak(contender, case, pixels, _told(contender, left), fused, left, limit=free_bytes)


def _told(contender: Contender, left: int) -> int | None:
    """memslice runs with default settings (its probe reads ``left``); every other contender is given ``left``."""
    return None if contender.family == "memslice" else left


def largest_square(contender: Contender, case: Case, free_bytes: int, fused: bool, hi: int = 16384) -> dict[str, Any]:
    """Largest side (a multiple of 64 px) whose whole call fits ``free_bytes``, by bisection on traced peaks."""

    def fits(side: int) -> bool:
        peak = whole_call_peak(contender, case, side, free_bytes, fused)
        return peak is not None and peak <= free_bytes

    # nothing fits past the size where the layer's inputs and output alone fill the memory
    lo_side, hi_side = 0, max(1, min(hi, physical_limit(case, free_bytes)) // 64)
    if not fits(64):
        return {"largest_side": 0}
    lo_side = 1
    while lo_side < hi_side:
        mid = (lo_side + hi_side + 1) // 2
        if fits(mid * 64):
            lo_side = mid
        else:
            hi_side = mid - 1
    side = lo_side * 64
    return {"largest_side": side, "peak_bytes": whole_call_peak(contender, case, side, free_bytes, fused)}


def physical_limit(case: Case, free_bytes: int) -> int:
    """The side past which the layer's inputs and its output alone exceed the free memory (no attention at all)."""

    def ok(side: int) -> bool:
        s = case.shape_at(side)
        return s.input_bytes + s.output_bytes <= free_bytes

    side = 64
    while ok(side + 64) and side < 65536:
        side += 64
    return side if ok(side) else 0


def traced_vs_real(contender: Contender, case: Case, free_bytes: int, fused: bool) -> tuple[int | None, int]:
    """(traced peak, real CPU peak from the profiler's allocation events) of one whole call at the case's size."""
    traced = whole_call_peak(contender, case, case.pixels, free_bytes, fused)
    forwards._memo.clear()

    def real() -> None:
        qkv = make_inputs(case, "cpu")
        left = free_bytes - sum(t.numel() * t.element_size() for t in qkv)
        with probe_reads(left):
            contender.prepare(case, qkv, _told(contender, left))()

    with contextlib.nullcontext() if fused else sdpa_math_only():
        measured = inop.call_peak_bytes(real)
    return traced, measured


def sdpa_math_only() -> Any:
    """The no-fused regime: torch's fused SDPA backends off (the CPU flash kernel obeys the same switches)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])
    except ImportError:  # torch < 2.3
        return torch.backends.cuda.sdp_kernel(enable_flash=False, enable_math=True, enable_mem_efficient=False)
