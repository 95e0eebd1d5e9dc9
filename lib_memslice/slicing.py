"""Shape + budget + strategy -> SlicePlan, or NotEnoughMemory. Pure arithmetic over :mod:`lib_memslice.costs`.

A plan cuts one attention call into ``head_slices x query_slices`` slices: runs of ``heads_per_slice`` rows of the
flattened ``batch x heads`` dimension (a run may cross from one batch item into the next, as the webui's InvokeAI
and diffusers' sliced attention do) times ``queries_per_slice`` query tokens. Sizes are ceil-divided: the last
slice may be short, and no size ever makes a call run unsliced because it does not divide.

The search is exact. For one head chunk every constraint on the query chunk is monotone (the predicted peak is
affine in it, the slice count falls as it grows, Metal's limits cap it), so the largest query chunk that fits is
solved for, not searched; the only non-monotone rule (Metal: no slice size that is a multiple of 4096) moves it by
one. Strategies differ only in the slice count they aim for (a floor ``T``, e.g. the Doggettx rule's count for the
given free memory) and in the plan they prefer at that count; the chosen plan is always the fitting plan with the
fewest slices at or above ``T``. So no strategy reports ``NotEnoughMemory`` while any plan under the cap fits, and
no strategy's slice count grows when the budget does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from .costs import (
    EINSUM,
    AttentionShape,
    KernelChoice,
    MiB,
    chunk_rows,
    fixed_and_per_query,
    format_bytes,
    peak_bytes,
)

MPS_MAX_ELEMENTS = 1 << 31  # Metal cannot index a tensor with more elements
MPS_MAX_BYTES = 4 << 30  # nor one buffer larger than this
MPS_UNSLICED_ROWS = 1 << 16  # the seed never slices batch*heads*q_tokens up to this
MPS_BAD_MULTIPLE = 4096  # slice sizes that are multiples of this produce wrong results on some macOS versions

#: The webui's InvokeAI divides free memory by this. memslice's Doggettx and InvokeAI strategies plan against
#: ``budget x SEED_SAFETY`` (= free memory at the default safety factor of 3.3, as the seed rules see it); their own
#: multipliers are their margin. A fixed budget is used as is.
SEED_SAFETY = 3.3
SEED_STRATEGIES = ("doggettx", "invokeai")

#: The einsum kernel's fastest score buffer on CPUs, per 64 channels of head dim (measured on 2 cores, fp32:
#: one head per slice with 4-16 MiB of scores ran 1.1-1.2x the fused kernel; larger buffers fall out of cache and
#: whole-item slices re-read every head's keys). GPUs get the fewest slices instead: they want large kernels.
CPU_EINSUM_TARGET_BYTES = 8 * MiB

STRATEGY_NAMES = ("auto", "doggettx", "invokeai", "mps", "heads")


class NotEnoughMemory(RuntimeError):
    """No plan under the slice cap fits the budget. Carries the numbers a user needs to act on."""

    def __init__(
        self,
        need: int,
        have: int,
        *,
        site: str = "",
        slice_cap: int = 0,
        kernel: str = "",
        max_resolution: int | None = None,
        q_tokens: int = 0,
        max_q_tokens: int | None = None,
        fixed_budget: bool = False,
        finer_helps: bool = True,
        ran_out: bool = False,
        detail: str = "",
    ) -> None:
        self.need = int(need)
        self.have = int(have)
        self.site = site
        self.slice_cap = slice_cap
        self.kernel = kernel
        self.max_resolution = max_resolution
        self.q_tokens = q_tokens
        self.max_q_tokens = max_q_tokens
        self.fixed_budget = fixed_budget
        self.detail = detail
        where = f" at {site}" if site else ""
        if max_resolution is not None:
            hint = (
                f"the largest square image this layer fits is {max_resolution}x{max_resolution} "
                + (
                    "(its output counted; a fixed budget leaves the inputs out)"
                    if fixed_budget
                    else "(its inputs and output counted)"
                )
                if max_resolution > 0
                else "no image size fits this layer with this budget"
            )
        elif max_q_tokens is not None and q_tokens > 0 and max_q_tokens < q_tokens:
            share = max_q_tokens / q_tokens
            hint = (
                f"this call has {q_tokens} query tokens and at most {max_q_tokens} fit: about "
                f"{100 * share:.0f} % of this image's area (each side about {100 * math.sqrt(share):.0f} %)"
                if max_q_tokens > 0
                else "not even one query token fits"
            )
        else:
            hint = ""
        advice = ["lower the resolution or batch size"]
        if finer_helps and not ran_out:
            advice.append("raise the slice cap")
        if ran_out and fixed_budget:  # the device ran out below the user's number
            advice.append("lower 'Memory budget (GiB)' to what the device really has free")
        else:
            advice.append("raise 'Memory budget (GiB)'" if fixed_budget else "free memory on the device")
        have = f"the budget is {format_bytes(self.have)}" if fixed_budget else f"{format_bytes(self.have)} is free"
        text = (
            f"memslice: not enough memory for attention{where}: the finest plan under the slice cap ({slice_cap})"
            f"{f' on the {kernel} kernel' if kernel else ''} needs {format_bytes(self.need)}, {have}"
            f"{'; ' + hint if hint else ''}. To fit: {', '.join(advice[:-1])} or {advice[-1]}."
        )
        if detail:
            text += f" ({detail})"
        super().__init__(text)


@dataclass(frozen=True)
class Geometry:
    """Where a layer sits in the model, so a token count can be turned back into an image size.

    ``downscale`` is image pixels per token along one side (8 * 2**level in a UNet, 8 in the VAE's mid block);
    in self-attention the key tokens grow with the image too.
    """

    downscale: int
    self_attention: bool

    def tokens(self, width: int, height: int) -> int:
        return math.ceil(width / self.downscale) * math.ceil(height / self.downscale)


@dataclass(frozen=True)
class SlicePlan:
    """How to run one attention call: slices over batch x heads rows and over query tokens."""

    heads_per_slice: int
    queries_per_slice: int
    head_slices: int
    query_slices: int
    peak_bytes: int
    kernel: KernelChoice
    strategy: str
    reason: str
    #: the strategy's first choice whatever the budget (reusable at any budget >= peak_bytes)
    stable: bool = False

    @property
    def slices(self) -> int:
        return self.head_slices * self.query_slices

    @property
    def sliced(self) -> bool:
        return self.slices > 1


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class _Search:
    """Everything that decides whether a chunking fits, and the exact searches over chunkings."""

    shape: AttentionShape
    budget: int
    cap: int
    kernel: KernelChoice
    min_slices: int
    mps: bool

    def head_slices(self, heads_per_slice: int) -> int:
        return _ceil_div(self.shape.batch_heads, heads_per_slice)

    def slices(self, heads_per_slice: int, queries_per_slice: int) -> int:
        return self.head_slices(heads_per_slice) * _ceil_div(self.shape.q_tokens, queries_per_slice)

    def head_options(self) -> Iterator[tuple[int, int]]:
        """``(heads_per_slice, head_slices)`` for every distinct head slice count, fewest slices first; each is
        the smallest run of rows with that count (the cheapest)."""
        rows = self.shape.batch_heads
        per = rows
        while per >= 1:
            slices = _ceil_div(rows, per)
            smallest = _ceil_div(rows, slices)
            yield smallest, slices
            per = smallest - 1

    def peak(self, heads_per_slice: int, queries_per_slice: int) -> int:
        return peak_bytes(self.shape, heads_per_slice, queries_per_slice, self.kernel)

    def _metal_elements(self, heads_per_slice: int) -> int:
        s = self.shape
        return chunk_rows(s, heads_per_slice, self.kernel.kind) * max(s.k_tokens, s.v_dim, s.head_dim)

    def fits(self, heads_per_slice: int, queries_per_slice: int) -> bool:
        """The definition every search below must agree with (tests compare them by brute force)."""
        s = self.shape
        if not 1 <= heads_per_slice <= s.batch_heads or not 1 <= queries_per_slice <= s.q_tokens:
            return False
        if not self.min_slices <= self.slices(heads_per_slice, queries_per_slice) <= self.cap:
            return False
        if self.peak(heads_per_slice, queries_per_slice) > self.budget:
            return False
        if self.mps:
            if queries_per_slice % MPS_BAD_MULTIPLE == 0 and queries_per_slice < s.q_tokens:
                return False
            biggest = self._metal_elements(heads_per_slice) * queries_per_slice
            return biggest < MPS_MAX_ELEMENTS and biggest * s.element_size <= MPS_MAX_BYTES
        return True

    def largest_queries(self, heads_per_slice: int, at_least: int = 1) -> int | None:
        """The largest (then evened out) query chunk that fits with this head chunk and at least ``at_least``
        slices in all; None if none does. Solved from the monotone constraints, not searched."""
        s = self.shape
        nq = s.q_tokens
        head_slices = self.head_slices(heads_per_slice)
        at_least = max(at_least, self.min_slices)
        max_query_slices = self.cap // head_slices
        if max_query_slices < 1:
            return None
        need_query_slices = _ceil_div(at_least, head_slices)
        if need_query_slices > max_query_slices:
            return None
        if head_slices == 1 and need_query_slices <= 1 and self.fits(heads_per_slice, nq):
            return nq  # one piece (a fused call returns its own output: a different formula)
        hi = nq - 1 if head_slices == 1 else nq
        fixed, per_query = fixed_and_per_query(s, heads_per_slice, self.kernel)
        if fixed > self.budget:
            return None
        if per_query > 0:
            hi = min(hi, (self.budget - fixed) // per_query)
        if need_query_slices > 1:
            hi = min(hi, _ceil_div(nq, need_query_slices - 1) - 1)
        if self.mps:
            per = self._metal_elements(heads_per_slice)
            hi = min(hi, (MPS_MAX_ELEMENTS - 1) // per, MPS_MAX_BYTES // (per * s.element_size))
            if hi % MPS_BAD_MULTIPLE == 0 and hi < nq:
                hi -= 1
        lo = _ceil_div(nq, max_query_slices)
        if hi < max(lo, 1):
            return None
        even = _ceil_div(nq, _ceil_div(nq, hi))  # same slice count, evenly sized, smaller peak
        if self.mps and even % MPS_BAD_MULTIPLE == 0 and even < nq:
            even += 1  # still <= hi, and still the same slice count
        return even

    def fewest(self, at_least: int = 1) -> tuple[int, int] | None:
        """The fitting chunking with the fewest slices at or above ``at_least``; ties go to larger head chunks."""
        best: tuple[int, int, int] | None = None
        for heads_per_slice, head_slices in self.head_options():
            if best is not None and head_slices > best[0]:
                break
            queries = self.largest_queries(heads_per_slice, at_least)
            if queries is None:
                continue
            total = head_slices * _ceil_div(self.shape.q_tokens, queries)
            if best is None or total < best[0]:
                best = (total, heads_per_slice, queries)
        return None if best is None else (best[1], best[2])

    def finest(self) -> tuple[int, int] | None:
        """The fitting chunking with the smallest peak under the cap (ties: fewer slices), or None."""
        nq = self.shape.q_tokens
        best: tuple[int, int, int, int] | None = None
        for heads_per_slice, head_slices in self.head_options():
            if head_slices > self.cap:
                break
            queries = _ceil_div(nq, min(nq, self.cap // head_slices))
            for candidate in (queries, queries + 1):  # Metal's 4096 rule may move it by one
                if candidate <= nq and self.fits(heads_per_slice, candidate):
                    key = (self.peak(heads_per_slice, candidate), self.slices(heads_per_slice, candidate))
                    if best is None or key < best[:2]:
                        best = (*key, heads_per_slice, candidate)
                    break
        return None if best is None else (best[2], best[3])

    def finest_need(self) -> int:
        """The smallest predicted peak of any chunking under the cap (what the call needs at best)."""
        best = None
        nq = self.shape.q_tokens
        for heads_per_slice, head_slices in self.head_options():
            if head_slices > self.cap:
                break
            queries = _ceil_div(nq, min(nq, self.cap // head_slices))
            peak = self.peak(heads_per_slice, queries)
            best = peak if best is None else min(best, peak)
        return best if best is not None else self.peak(self.shape.batch_heads, nq)


# --- strategies: the slice count each aims for, and the chunkings it prefers at that count ---------------------


@dataclass(frozen=True)
class _Aim:
    at_least: int  # the strategy's slice count floor (its rule's count)
    preferred: tuple[tuple[int, int, str], ...]  # (heads_per_slice, queries_per_slice, reason), tried in order
    why: str  # how the floor was chosen, for the plan's reason
    stable: bool  # the aim does not depend on the budget
    #: the first fitting preferred chunking wins even over one with fewer slices (a faster shape of slice)
    first_fit: bool = False


def _whole(s: _Search) -> tuple[int, int, str]:
    return s.shape.batch_heads, s.shape.q_tokens, "one piece"


def _pow2_at_least(x: float) -> int:
    return 1 if x <= 1 else 1 << math.ceil(math.log2(x))


def _einsum_speed(s: _Search) -> tuple[int, int, str]:
    """One head per slice, as many queries as fill the cache-sized score buffer (bigger for wide heads)."""
    sh = s.shape
    target = CPU_EINSUM_TARGET_BYTES * max(1.0, sh.head_dim / 64)
    queries = max(1, min(sh.q_tokens, int(target // max(1, sh.k_tokens * sh.element_size))))
    queries = _ceil_div(sh.q_tokens, _ceil_div(sh.q_tokens, queries))
    return 1, queries, f"one head per slice, ~{format_bytes(target)} score buffer (fastest on CPUs)"


def _aim_auto(s: _Search, device_kind: str) -> _Aim:
    if s.kernel.kind == "einsum" and device_kind == "cpu":
        hps, qps, why = _einsum_speed(s)
        floor = min(s.slices(hps, qps), s.cap)
        # one head per slice stays the fastest shape under a tighter budget: the largest query chunk that fits
        fitting = s.largest_queries(1, floor)
        preferred = () if fitting is None else ((1, fitting, why if fitting == qps else f"{why}, fewer queries"),)
        return _Aim(floor, preferred, "cache-sized slices", fitting == qps, first_fit=True)
    return _Aim(1, (_whole(s),), "fewest slices that fit", True)


def _aim_doggettx(s: _Search, device_kind: str) -> _Aim:
    sh = s.shape
    if s.kernel.kind == "fused":
        return _Aim(1, (_whole(s),), "fused kernel: fewest slices the cost model needs", True)
    modifier = 3.0 if sh.element_size == 2 else 2.5
    estimate = sh.score_bytes * modifier
    steps = _pow2_at_least(estimate / max(s.budget, 1))
    queries = max(1, sh.q_tokens // min(steps, sh.q_tokens))  # the seed's slice size (last slice the remainder)
    why = f"Doggettx rule: scores x{modifier:g} = {format_bytes(estimate)} vs {format_bytes(s.budget)}: {steps} steps"
    return _Aim(s.slices(sh.batch_heads, queries), ((sh.batch_heads, queries, why),), why, steps == 1)


def _aim_invokeai(s: _Search, device_kind: str) -> _Aim:
    sh = s.shape
    if s.kernel.kind == "fused":
        return _Aim(1, (_whole(s),), "fused kernel: fewest slices the cost model needs", True)
    tensor_mb = s.budget / SEED_SAFETY / MiB
    size_mb = sh.score_bytes // MiB
    why = f"InvokeAI rule: scores {size_mb} MB vs tensor budget {tensor_mb:.0f} MB"
    if size_mb <= tensor_mb:
        return _Aim(1, ((*_whole(s)[:2], why),), why, False)
    div = 1 << int((size_mb - 1) / max(tensor_mb, 1e-9)).bit_length()
    if div <= sh.batch_heads:
        candidate = (sh.batch_heads // div, sh.q_tokens, f"{why}: batch x heads in {div}")
    else:
        candidate = (sh.batch_heads, max(sh.q_tokens // div, 1), f"{why}: queries in {div}")
    return _Aim(s.slices(*candidate[:2]), (candidate,), why, False)


def _aim_mps(s: _Search, device_kind: str) -> _Aim:
    sh = s.shape
    small = sh.batch_heads * sh.q_tokens <= MPS_UNSLICED_ROWS
    preferred = ((*_whole(s)[:2], "small enough for Metal unsliced"),) if small else ()
    return _Aim(1, preferred, "fewest slices within Metal's tensor limits", True)


def _aim_heads(s: _Search, device_kind: str) -> _Aim:
    sh = s.shape
    half = max(1, sh.heads // 2)
    preferred = [(half, sh.q_tokens, "half the heads per slice"), (1, sh.q_tokens, "one head per slice")]
    queries = s.largest_queries(1)
    if queries is not None:
        preferred.append((1, queries, "one head per slice, then query slices"))
    floor = min(s.slices(half, sh.q_tokens), s.cap)
    return _Aim(floor, tuple(preferred), "diffusers: half the heads per slice", True, first_fit=True)


_AIMS: dict[str, Callable[[_Search, str], _Aim]] = {
    "auto": _aim_auto,
    "doggettx": _aim_doggettx,
    "invokeai": _aim_invokeai,
    "mps": _aim_mps,
    "heads": _aim_heads,
}
assert tuple(_AIMS) == STRATEGY_NAMES


def _clean_budget(value: float) -> int:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return 0
    if value != value or value <= 0:  # NaN or nothing
        return 0
    return int(min(value, 1 << 62))


def _search(
    shape: AttentionShape,
    budget_bytes: float,
    *,
    strategy: str,
    slice_cap: int,
    kernel: KernelChoice,
    device_kind: str,
    min_slices: int,
) -> _Search:
    if strategy not in _AIMS:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGY_NAMES}")
    if not isinstance(kernel, KernelChoice):
        raise TypeError(f"kernel must be a KernelChoice, got {kernel!r}")
    mps = device_kind == "mps" or strategy == "mps"
    return _Search(shape, _clean_budget(budget_bytes), max(1, int(slice_cap)), kernel, max(1, int(min_slices)), mps)


def _choose(s: _Search, strategy: str, device_kind: str) -> SlicePlan | None:
    sh = s.shape
    if sh.empty or sh.k_tokens == 0:
        # nothing to slice: the output (zeros when there are no keys) is all that is allocated
        if sh.output_bytes > s.budget:
            return None
        return SlicePlan(
            max(sh.batch_heads, 1), max(sh.q_tokens, 1), 1, 1, sh.output_bytes, s.kernel, strategy, "empty"
        )
    aim = _AIMS[strategy](s, device_kind)
    floor = min(aim.at_least, s.cap)
    found = s.fewest(floor)
    why = f"{aim.why}; fewest slices that fit at or above {floor}"
    if found is None:
        found = s.fewest()  # nothing at or above the rule's count fits under the cap: fewer slices may
        why = f"{aim.why}; fewest slices that fit"
    best = None if found is None else s.slices(*found)
    for heads_per_slice, queries_per_slice, reason in aim.preferred:
        if not s.fits(heads_per_slice, queries_per_slice):
            continue
        if aim.first_fit or best is None or s.slices(heads_per_slice, queries_per_slice) <= best:
            found, why = (heads_per_slice, queries_per_slice), reason
            break
    if found is None:
        return None
    hps, qps = found
    stable = bool(aim.preferred) and aim.stable and found == aim.preferred[0][:2]
    return SlicePlan(
        heads_per_slice=hps,
        queries_per_slice=qps,
        head_slices=s.head_slices(hps),
        query_slices=_ceil_div(sh.q_tokens, qps),
        peak_bytes=s.peak(hps, qps),
        kernel=s.kernel,
        strategy=strategy,
        reason=why,
        stable=stable,
    )


@dataclass(frozen=True)
class Room:
    """The budget a layer's call gets at any size: a fixed budget stays fixed; a probed one is what was free before
    the call's own q, k and v existed, less those inputs at that size, over the divisor (the safety factor; the
    seed rules divide by ``safety factor / 3.3``, so they see all free memory at the default).

    At the size it was built for it gives exactly the budget the call planned against; at other sizes it is the
    budget the same call would get then, so "the largest square size that fits" counts the layer's own inputs.
    """

    free: int  # free memory before the call's inputs (or the fixed budget)
    divisor: float = 1.0
    fixed: bool = False

    def budget(self, shape: AttentionShape) -> int:
        if self.fixed:
            return self.free
        return int(max(0, self.free - shape.input_bytes) / self.divisor)

    def hard(self) -> Room:
        """The limit past which nothing runs: free memory itself (no safety margin), or the fixed budget."""
        return self if self.fixed else Room(self.free, 1.0)


def strategy_room(
    strategy: str,
    budget_bytes: int,
    *,
    fixed: bool = False,
    free_bytes: int | None = None,
    safety_factor: float | None = None,
    inputs_bytes: int = 0,
) -> Room:
    """The Room a strategy plans in. ``free_bytes`` is the probe's reading and ``inputs_bytes`` the call's inputs
    that already existed when it was read (0 for previews before a job). Without a reading the budget itself is
    taken as free memory over a safety factor of 1. The seed rules (Doggettx, InvokeAI) see free memory as the
    webui's do, scaled by the user's safety factor: ``free x 3.3 / safety factor`` (all of it at the default)."""
    if fixed:
        return Room(int(budget_bytes), fixed=True)
    if free_bytes is None or not safety_factor:
        free_bytes, safety_factor = int(budget_bytes), 1.0
    divisor = safety_factor / SEED_SAFETY if strategy in SEED_STRATEGIES else safety_factor
    return Room(int(free_bytes) + int(inputs_bytes), divisor)


def plan_attention(
    shape: AttentionShape,
    budget_bytes: float,
    *,
    strategy: str = "auto",
    slice_cap: int = 4096,
    kernel: KernelChoice = EINSUM,
    device_kind: str = "cpu",
    min_slices: int = 1,
) -> SlicePlan | None:
    """The plan for one attention call within ``budget_bytes``, or None when nothing under the cap fits (see
    :func:`not_enough_memory` for the error a caller raises then)."""
    s = _search(
        shape,
        budget_bytes,
        strategy=strategy,
        slice_cap=slice_cap,
        kernel=kernel,
        device_kind=device_kind,
        min_slices=min_slices,
    )
    return _choose(s, strategy, device_kind)


def finest_plan(
    shape: AttentionShape,
    limit_bytes: float,
    *,
    strategy: str = "auto",
    slice_cap: int = 4096,
    kernel: KernelChoice = EINSUM,
    device_kind: str = "cpu",
    min_slices: int = 1,
) -> SlicePlan | None:
    """The plan with the smallest peak under the cap, if it fits ``limit_bytes``: what runs when only the safety
    margin refuses every plan (the budget is free memory over the safety factor; the limit is free memory)."""
    if shape.empty or shape.k_tokens == 0:
        return plan_attention(shape, limit_bytes, strategy=strategy, slice_cap=slice_cap, kernel=kernel)
    s = _search(shape, limit_bytes, strategy=strategy, slice_cap=slice_cap, kernel=kernel, device_kind=device_kind,
                min_slices=min_slices)  # fmt: skip
    found = s.finest()
    if found is None:
        return None
    hps, qps = found
    return SlicePlan(hps, qps, s.head_slices(hps), _ceil_div(shape.q_tokens, qps), s.peak(hps, qps), kernel,
                     strategy, "over the safety margin: the finest plan within free memory")  # fmt: skip


def finest_need(
    shape: AttentionShape, *, slice_cap: int, kernel: KernelChoice, device_kind: str = "cpu", strategy: str = "auto"
) -> int:
    """The smallest predicted peak of any plan under the cap."""
    if shape.empty or shape.k_tokens == 0:
        return shape.output_bytes
    s = _search(shape, 0, strategy=strategy, slice_cap=slice_cap, kernel=kernel, device_kind=device_kind, min_slices=1)
    return s.finest_need()


# --- the largest size that fits -------------------------------------------------------------------------------


MAX_RESOLUTION = 65536
#: the highest slice cap the settings accept
MAX_SLICE_CAP = 65536


def shape_at_resolution(shape: AttentionShape, geometry: Geometry, width: int, height: int) -> AttentionShape:
    """The same layer at another image size."""
    tokens = geometry.tokens(width, height)
    return replace(shape, q_tokens=tokens, k_tokens=tokens if geometry.self_attention else shape.k_tokens)


def _largest(lo: int, hi: int, ok: Callable[[int], bool]) -> int:
    """Largest n in [lo, hi] with ok(n), assuming ok is monotone decreasing; lo - 1 if none."""
    if not ok(lo):
        return lo - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _fits_in(other: AttentionShape, room: Room, kernels: tuple[KernelChoice, ...], **kwargs: object) -> bool:
    budget = room.budget(other)
    return budget > 0 and any(plan_attention(other, budget, kernel=k, **kwargs) is not None for k in kernels)  # type: ignore[arg-type]


def max_square_resolution(
    shape: AttentionShape, geometry: Geometry, room: Room, kernels: tuple[KernelChoice, ...], **kwargs: object
) -> int:
    """Largest square image side (a multiple of 8) at which this layer gets a plan on any of ``kernels`` with the
    budget it would have there (its own inputs counted); 0 if none."""

    def ok(side8: int) -> bool:
        return _fits_in(shape_at_resolution(shape, geometry, side8 * 8, side8 * 8), room, kernels, **kwargs)

    return max(0, _largest(1, MAX_RESOLUTION // 8, ok)) * 8


def max_query_tokens(shape: AttentionShape, room: Room, kernels: tuple[KernelChoice, ...], **kwargs: object) -> int:
    """Largest query-token count that gets a plan (keys grow with it when the call looks like self-attention)."""
    grow_keys = shape.q_tokens == shape.k_tokens

    def ok(n: int) -> bool:
        other = replace(shape, q_tokens=n, k_tokens=n if grow_keys else shape.k_tokens)
        return _fits_in(other, room, kernels, **kwargs)

    return max(0, _largest(1, 1 << 26, ok))


def not_enough_memory(
    shape: AttentionShape,
    room: Room | float,
    kernels: tuple[KernelChoice, ...],
    *,
    strategy: str = "auto",
    slice_cap: int = 4096,
    device_kind: str = "cpu",
    min_slices: int = 1,
    geometry: Geometry | None = None,
    site: str = "",
    detail: str = "",
) -> NotEnoughMemory:
    """The error for a call no plan fits, with the numbers of the best of ``kernels`` (the smallest need) and the
    largest size any of them reaches. A plain number is a fixed budget."""
    if not isinstance(room, Room):
        room = Room(_clean_budget(room), fixed=True)
    room = room.hard()  # refused only past free memory itself (or a fixed budget): measure against that
    budget = room.budget(shape)
    fixed_budget = room.fixed
    kwargs = dict(strategy=strategy, slice_cap=slice_cap, device_kind=device_kind)
    if shape.empty or shape.k_tokens == 0:
        return NotEnoughMemory(
            shape.output_bytes,
            budget,
            site=site,
            slice_cap=slice_cap,
            fixed_budget=fixed_budget,
            finer_helps=False,
            detail="the output alone exceeds the budget",
        )
    needs = {k: finest_need(shape, kernel=k, **kwargs) for k in kernels}  # type: ignore[arg-type]
    best = min(kernels, key=lambda k: needs[k])
    # "raise the slice cap" only where some allowed cap would make it fit (a fused call's output never shrinks)
    finest_allowed = finest_need(shape, kernel=best, **{**kwargs, "slice_cap": MAX_SLICE_CAP})  # type: ignore[arg-type]
    resolution = tokens = None
    if geometry is not None:
        resolution = max_square_resolution(shape, geometry, room, kernels, **kwargs, min_slices=min_slices)
    else:
        tokens = max_query_tokens(shape, room, kernels, **kwargs, min_slices=min_slices)
    if min_slices > 1:
        detail = "; ".join(filter(None, (detail, f"after out-of-memory retries reached {min_slices} slices")))
    return NotEnoughMemory(
        needs[best],
        budget,
        site=site,
        slice_cap=slice_cap,
        kernel=best.kind,
        max_resolution=resolution,
        q_tokens=shape.q_tokens,
        max_q_tokens=tokens,
        fixed_budget=fixed_budget,
        finer_helps=slice_cap < MAX_SLICE_CAP and finest_allowed <= budget,
        detail=detail,
    )
