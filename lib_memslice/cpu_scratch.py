"""The fused CPU SDPA kernel's in-op scratch: a formula read from torch's source, measured by a profiler replay.

The kernel (``aten/src/ATen/native/cpu/FlashAttentionKernel.cpp``) allocates per-thread buffers after its output
and log-sum-exp and frees them before returning, so no live-tensor tracker sees them, yet they are resident at the
call's peak: the cost model adds them. ``memslice_tools.inop.inop_peak_bytes`` replays the profiler's memory events
to measure them; ``tests/test_cpu_scratch.py`` checks this formula against it.
"""

from __future__ import annotations

import re
from functools import lru_cache

import torch

#: Up to this torch: the blocked kernel without any packing (checked on 2.1.2 and, on an AMX-BF16 CPU, 2.3.1: the
#: webui's default pin and its Apple pin; 2.2 between them is taken to be the same).
NEVER_PACKS = (2, 3)
#: From this torch on: the same blocks, plus K/V packing through torch's allocator for bf16 / fp16 on AMX CPUs
#: (checked on 2.11 with AMX-BF16 and on 2.13 without AMX). Releases between are bounded conservatively.
PACKS_CHECKED = (2, 11)

_ACCUM = 4  # the kernel's accumulator is fp32 (at::opmath_type) for fp32, bf16 and fp16 alike


def _torch_minor(version: str | None) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version if version is not None else torch.__version__)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _ceil_to(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _splits(q_rows: int | None, kv_tokens: int | None) -> tuple[int, int]:
    """The kernel's query and key block sizes; unknown counts take the largest blocks."""
    q_split = 256 if q_rows is None or q_rows >= 768 else 64 if q_rows >= 192 else 32
    if q_rows is not None:
        q_split = min(q_split, max(q_rows, 1))
    kv_split = 512 if kv_tokens is None else min(512, max(kv_tokens, 1))
    return q_split, kv_split


@lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _probe(name: str) -> bool:
    probe = getattr(getattr(torch, "cpu", None), name, None)
    try:
        return bool(probe()) if probe is not None else False
    except Exception:  # a probe this build cannot answer: /proc/cpuinfo decides alone
        return False


def cpu_fused_can_pack(element_size: int, dtype: torch.dtype | None = None, version: str | None = None) -> bool:
    """Whether the fused kernel of this torch, on this CPU, could take its packed (oneDNN brgemm) path.

    torch >= 2.11 packs K and V when oneDNN is enabled and the CPU has AMX: AMX-BF16 for bfloat16, AMX-FP16 for
    float16 (``cpublas::could_pack``); torch 2.1 to 2.3 never pack. With ``dtype`` unknown a 2-byte type counts as
    packable if either AMX kind is present, so the bound errs high; ``ONEDNN_MAX_CPU_ISA`` can switch packing off,
    which only makes the bound loose.
    """
    if element_size != 2 or _torch_minor(version) <= NEVER_PACKS:
        return False
    mkldnn = getattr(torch.backends, "mkldnn", None)
    if mkldnn is not None and not getattr(mkldnn, "enabled", True):
        return False
    flags = _cpu_flags()
    bf16 = "amx_bf16" in flags or _probe("_is_amx_tile_supported")
    fp16 = "amx_fp16" in flags or _probe("_is_amx_fp16_supported")
    if dtype == torch.bfloat16:
        return bf16
    if dtype == torch.float16:
        return fp16
    return bf16 or fp16


def _packs(
    element_size: int,
    dtype: torch.dtype | None,
    threads: int,
    q_rows: int | None,
    kv_tokens: int | None,
    batch_heads: int | None,
    version: str | None,
) -> bool:
    """The kernel's ``need_pack`` decision (torch >= 2.11 rule); anything unknown answers yes (more memory)."""
    if not cpu_fused_can_pack(element_size, dtype, version):
        return False
    if _torch_minor(version) < PACKS_CHECKED:
        return True  # older packing rules were not checked: assume the packed footprint wherever it could occur
    bf16 = dtype == torch.bfloat16  # unknown dtype: float16's lower thresholds, which pack more often
    threshold = 64 if bf16 else 16
    if (q_rows is not None and q_rows < threshold) or (kv_tokens is not None and kv_tokens < threshold):
        return False
    if q_rows is None or batch_heads is None:
        return True
    q_split, _ = _splits(q_rows, kv_tokens)
    blocks_per_thread = (batch_heads * -(-q_rows // q_split) + threads - 1) // threads
    # GEMM work per thread over packing work: (blocks * qS * kv * d) / (B * H * kv * d), non-causal, H == kv heads
    return blocks_per_thread * q_split / batch_heads >= (4 if bf16 else 1)


def cpu_fused_scratch(
    head_dim: int,
    v_dim: int,
    element_size: int,
    threads: int,
    q_rows: int | None = None,
    kv_tokens: int | None = None,
    *,
    batch_heads: int | None = None,
    dtype: torch.dtype | None = None,
    version: str | None = None,
) -> int:
    """Upper bound of the per-thread scratch torch's fused CPU flash-attention kernel allocates inside one call.

    Why a formula: the kernel allocates this after its output and logsumexp and frees it before returning, so no
    live-tensor tracker sees it, yet it is resident at the call's peak. It is sized by the thread count
    (``threads`` = ``torch.get_num_threads()``), the block sizes and the head dims, not by batch or heads. A plan
    adds it, and :func:`cpu_fused_pack_copies` (K/V copies on AMX CPUs), to the output and the fp32 logsumexp.

    Bytes (read from ``aten/src/ATen/native/cpu/FlashAttentionKernel.cpp``), with ``acc`` = 4 (the fp32
    accumulator of every dtype), ``e`` = ``element_size``::

        qS = 256 if q_rows >= 768 else 64 if q_rows >= 192 else 32, capped at q_rows;   kS = min(512, kv_tokens)
        threads * (acc * (qS*kS + 2*qS + qS*v_dim)          # scores, row max, row sum, output accumulator
                   + e * qS * kS'                           # bf16 / fp16 only: the probabilities in 2 bytes
                   + packed: e * kS * head_dim              # K block transpose buffer
                   + packed and head_dim odd: e * qS * (head_dim + 1))   # padded query block

    ``kS'`` is ``kS`` rounded up to even on the packed path, else ``kS``. Packed: bf16 on AMX-BF16 / fp16 on
    AMX-FP16 CPUs with both sequences >= 64 (bf16) / 16 (fp16) tokens and enough query blocks per thread; see
    :func:`cpu_fused_can_pack`. E.g. fp32 at qS 256, kS 512: 0.54 MiB per thread at d 40, 0.56 at 64, 0.66 at
    160, 1.00 at 512; bf16 and fp16 add 0.25 MiB. Unknown ``q_rows`` / ``kv_tokens`` take the largest blocks
    (256 x 512); unknown ``batch_heads`` / ``dtype`` assume the packed path wherever the CPU could take it.

    Checked equal, byte for byte, to ``memslice_tools.inop.inop_peak_bytes`` minus output and logsumexp on torch
    2.1.2 (never packs; fp32 and bf16, its CPU kernel has no fp16), 2.13 (AVX-512 CPU without AMX: fp32, bf16,
    fp16) and 2.11 (AMX-BF16 CPU: bf16 packed), over head dims 8-512, 1-16 threads, 1-4096 query rows and 5-2048
    keys, and 2.3.1 (AMX-BF16 CPU, never packs: fp32 and bf16). For the releases between (2.4-2.10, unchecked;
    their fp16 packing padded blocks to 64 columns and allocated outside torch's allocator), where the CPU could pack
    the bound pads every block instead. The kernels checked require ``v_dim == head_dim``; SDPA runs the math path
    otherwise.
    """
    threads = max(int(threads), 1)
    q_split, kv_split = _splits(q_rows, kv_tokens)
    pack = _packs(element_size, dtype, threads, q_rows, kv_tokens, batch_heads, version)
    exact = _torch_minor(version) >= PACKS_CHECKED or not pack
    qk_cols = kv_split if exact else _ceil_to(kv_split, 64)
    total = _ACCUM * (q_split * qk_cols + 2 * q_split + q_split * v_dim)
    if element_size < _ACCUM:
        total += element_size * q_split * (kv_split + kv_split % 2 if pack else kv_split)
    if pack:
        # exact: the K transpose buffer; unchecked releases: their per-thread 64-wide transpose and V copy blocks
        total += element_size * (kv_split * head_dim if exact else (kv_split + 64) * (head_dim + 64))
        if head_dim % 2 or not exact:
            total += element_size * q_split * (head_dim + 1)
    return threads * total


def cpu_fused_pack_copies(
    batch_heads: int,
    kv_tokens: int,
    head_dim: int,
    element_size: int,
    threads: int,
    q_rows: int | None = None,
    *,
    dtype: torch.dtype | None = None,
    version: str | None = None,
) -> int:
    """Bytes of the packed K and V copies the fused CPU kernel makes on its packed path (0 where it does not pack).

    Why separate: unlike :func:`cpu_fused_scratch` these scale with the inputs (``batch_heads`` = batch x heads
    of the call; K/V heads equal query heads, as in Stable Diffusion), like an input copy, and live through the
    whole call. torch >= 2.11 (checked equal on 2.11 with AMX-BF16, 1-16 threads)::

        e * batch_heads * ((head_dim rounded up to even) * kv_tokens + kv_padded * head_dim)

    where ``kv_padded`` rounds every key block of ``kS`` (see :func:`cpu_fused_scratch`) up to even. torch 2.1
    never packs. For unchecked releases between, whose fp16 packing padded to 64 and allocated outside torch's
    allocator (invisible to the profiler), a padded bound.
    """
    if not _packs(element_size, dtype, threads, q_rows, kv_tokens, batch_heads, version):
        return 0
    _, kv_split = _splits(q_rows, kv_tokens)
    blocks = -(-kv_tokens // kv_split)
    if _torch_minor(version) >= PACKS_CHECKED:
        tail = (kv_tokens - 1) % kv_split + 1
        kv_padded = (blocks - 1) * (kv_split + kv_split % 2) + tail + tail % 2
        return element_size * batch_heads * ((head_dim + head_dim % 2) * kv_tokens + kv_padded * head_dim)
    keys = (head_dim + 1) * _ceil_to(kv_split, 64) * (blocks + 1)
    values = (kv_tokens + blocks) * _ceil_to(head_dim, 64)
    return element_size * batch_heads * (keys + values)
