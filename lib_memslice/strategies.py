"""The strategies, each one rule: a pure function from a call to the slice count it aims for.

A rule answers two things and nothing else: how many slices it wants for this call in this room (its *aim*), and
which rows per slice it prefers among plans with equally few slices. It never looks at the search, the slice cap or
the other strategies. The one exact search in :mod:`lib_memslice.slicing` then returns the fitting plan with the
fewest slices at or above the aim. Every rule here gives an aim that never rises when the room grows (a constant,
or a count of steps that falls as the room grows), and the search's answer never rises with the room nor falls
with its floor, so no strategy slices more when it gets more memory: by construction, and checked exhaustively in
``tests/test_strategies.py``.

The webui's rules (Doggettx and InvokeAI, as webui 1.10.1 computes them) keep their own margin, their multipliers:
they plan in free memory itself at the default safety factor, so at the same free memory they run the webui's
slice counts exactly (``tests/test_strategies.py::test_the_webuis_rules_give_the_webuis_slice_counts``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from .costs import AttentionShape, KernelChoice, MiB, ceil_div, format_bytes, queries_in_room

#: The webui's InvokeAI rule takes a tensor budget of free memory / 3.3; its Doggettx rule multiplies the scores by
#: 2.5 or 3. Both are their margin, so they plan in ``free x WEBUI_MARGIN / safety factor``, at most free memory.
WEBUI_MARGIN = 3.3
WEBUI_RULES = ("doggettx", "invokeai")

#: The einsum kernel's score buffer per worker on CPUs, by element size (4: float32, 2: half precision), and the
#: fewest queries per slice it takes (docs/benchmarks.md, `bench --sd3`). Float32 slices are cache-bound: on an AMD
#: EPYC, 2 workers sharing 32 MiB of L3 with the host's other tenants, 4 MiB was within 5 % of the best size in four
#: runs over SD3's joint call and SD1.5's UNet at 512 px, while 8 MiB, the best on a quiet host, fell 12-26 %
#: behind it on a loaded one. Half-precision slices are bound by their elementwise ops (about a cycle per element):
#: on the quiet host 8 MiB was the best or within 1 % of it in 5 of 6 sweeps, 4 MiB 1-9 % slower. Below 256 queries
#: the score GEMM and per-slice costs lose more than the cache gains: 1024 px SD1.5 keys (16384) fill 4 MiB with 64
#: queries, 7-26 % slower than 128 in three runs. GPUs get the fewest slices instead: they want large kernels.
CPU_EINSUM_TARGET_BYTES = {4: 4 * MiB, 2: 8 * MiB}
CPU_EINSUM_MIN_QUERIES = 256


def cpu_einsum_target_key(element_size: int) -> int:
    """The key of CPU_EINSUM_TARGET_BYTES a call of this element size takes (float64 takes float32's)."""
    return 2 if element_size <= 2 else 4


def _target(element_size: int) -> int:
    return CPU_EINSUM_TARGET_BYTES[cpu_einsum_target_key(element_size)]


def cpu_einsum_queries(shape: AttentionShape) -> int:
    """Queries per one-head slice the einsum kernel runs fastest with on a CPU, by the rule above."""
    by_bytes = _target(shape.element_size) // max(1, shape.k_tokens * shape.element_size)
    return max(1, min(shape.q_tokens, max(CPU_EINSUM_MIN_QUERIES, by_bytes)))


def cpu_einsum_rule(element_size: int) -> str:
    """The rule in words, for plan reasons and the benchmark's report."""
    target = format_bytes(_target(element_size))
    return f"~{target} score buffer per worker, at least {CPU_EINSUM_MIN_QUERIES} queries"


@dataclass(frozen=True)
class Aim:
    """A rule's answer: at least ``slices`` slices; among plans with equally few, rows per slice closest to
    ``heads_per_slice`` (0: as many as possible); ``why`` for the plan's reason. ``settled``: no larger room changes
    the aim (so a plan made at it stays the plan while the room only grows: the fast path may reuse it)."""

    slices: int
    heads_per_slice: int
    why: str
    settled: bool


Rule = Callable[[AttentionShape, int, KernelChoice, str], Aim]


def _pow2_at_least(x: float) -> int:
    return 1 if x <= 1 else 1 << math.ceil(math.log2(x))


def auto(shape: AttentionShape, room: int, kernel: KernelChoice, device_kind: str) -> Aim:
    """The fastest plan that fits. A fused kernel holds no score matrix and GPUs want large kernels: the fewest
    slices. On CPUs memslice's einsum kernel is fastest with one head per slice and a cache-sized score buffer (at
    least CPU_EINSUM_MIN_QUERIES queries), or as many queries as the room holds when that is less (fewer queries in
    a smaller room: the aim only falls as the room grows)."""
    if kernel.kind != "einsum" or device_kind != "cpu":
        return Aim(1, 0, "fewest slices that fit", True)
    queries = cpu_einsum_queries(shape)
    why = f"one head per slice, {cpu_einsum_rule(shape.element_size)} (the rule the benchmark's sweep checks)"
    fitting = queries_in_room(shape, 1, kernel, room) or 0
    settled = fitting >= queries
    if not settled:
        queries, why = max(1, fitting), f"{why}, fewer queries to fit the room"
    return Aim(shape.batch_heads * ceil_div(shape.q_tokens, queries), 1, why, settled)


def doggettx(shape: AttentionShape, room: int, kernel: KernelChoice, device_kind: str) -> Aim:
    """The webui's Doggettx rule: the scores times 3 (2-byte) or 2.5 against the room, in power-of-two query
    steps of ``q_tokens // steps`` queries (the last slice takes the remainder), all of batch x heads at once."""
    if kernel.kind == "fused":
        return Aim(1, 0, "fused kernel: fewest slices the cost model needs", True)
    modifier = 3.0 if shape.element_size == 2 else 2.5
    estimate = shape.score_bytes * modifier
    steps = min(_pow2_at_least(estimate / max(room, 1)), max(shape.q_tokens, 1))
    slices = ceil_div(shape.q_tokens, max(1, shape.q_tokens // steps))
    why = f"Doggettx rule: scores x{modifier:g} = {format_bytes(estimate)} in {format_bytes(room)}: {steps} steps"
    return Aim(slices, shape.batch_heads, why, steps == 1)


def invokeai(shape: AttentionShape, room: int, kernel: KernelChoice, device_kind: str) -> Aim:
    """The webui's InvokeAI rule (its CUDA form): the score tensor in MB against a tensor budget of room / 3.3;
    over it, a power-of-two divisor slices batch x heads first, then queries. Where the divisor passes the query
    count the webui's count falls (one query per slice is fewer slices than the rows were): the aim keeps the
    count of the rows' largest divisor then, so it never rises with the room."""
    if kernel.kind == "fused":
        return Aim(1, 0, "fused kernel: fewest slices the cost model needs", True)
    tensor_mb = room / WEBUI_MARGIN / MiB
    size_mb = shape.score_bytes // MiB
    why = f"InvokeAI rule: scores {size_mb} MB vs tensor budget {tensor_mb:.0f} MB"
    if size_mb <= tensor_mb:
        return Aim(1, shape.batch_heads, why, True)
    div = 1 << int((size_mb - 1) / max(tensor_mb, 1e-9)).bit_length()
    rows_div = min(div, 1 << (max(shape.batch_heads, 1).bit_length() - 1))  # the largest power of two <= rows
    rows = max(shape.batch_heads // rows_div, 1)
    by_rows = Aim(ceil_div(shape.batch_heads, rows), rows, f"{why}: batch x heads in {rows_div}", False)
    if div <= shape.batch_heads:
        return by_rows
    queries = max(shape.q_tokens // div, 1)
    by_queries = Aim(ceil_div(shape.q_tokens, queries), shape.batch_heads, f"{why}: queries in {div}", False)
    return by_queries if by_queries.slices >= by_rows.slices else by_rows


def mps(shape: AttentionShape, room: int, kernel: KernelChoice, device_kind: str) -> Aim:
    """Apple Metal's limits on every plan (the search enforces them for this strategy on any device): no tensor
    of 2^31 elements or 4 GiB, no query slice a multiple of 4096; otherwise the fewest slices that fit."""
    return Aim(1, 0, "fewest slices within Metal's tensor limits", True)


def heads(shape: AttentionShape, room: int, kernel: KernelChoice, device_kind: str) -> Aim:
    """diffusers' head slicing: half of each item's heads per slice; more slices where that does not fit, rows per
    slice still as close to half the heads as the room allows."""
    half = max(1, shape.heads // 2)
    return Aim(ceil_div(shape.batch_heads, half), half, "diffusers: half the heads per slice", True)


RULES: dict[str, Rule] = {"auto": auto, "doggettx": doggettx, "invokeai": invokeai, "mps": mps, "heads": heads}
NAMES: tuple[str, ...] = tuple(RULES)
