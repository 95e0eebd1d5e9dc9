"""Shape + room + strategy -> SlicePlan: the one exact search every strategy shares. Pure arithmetic.

A plan cuts one attention call into ``head_slices x query_slices`` slices: runs of ``heads_per_slice`` rows of the
flattened ``batch x heads`` dimension (a run may cross from one batch item into the next, as the webui's InvokeAI
and diffusers' sliced attention do) times ``queries_per_slice`` query tokens. Sizes are ceil-divided: the last
slice may be short, and no size ever makes a call run unsliced because it does not divide.

The plan of a strategy is always the same construction (:func:`plan_attention`):

1. the *smallest-peak plan* under the slice cap; if it does not fit the room, nothing does and there is no plan;
2. the strategy's rule (:mod:`lib_memslice.strategies`) names the slice count it aims for;
3. the *floor* is that aim, lowered to the smallest-peak plan's count when the cap leaves less;
4. the plan is the fitting plan with the fewest slices at or above the floor (rows per slice as the rule prefers
   among equally few).

The smallest-peak plan does not depend on the room, the aim never rises with the room, and step 4's count never
rises with the room nor falls with the floor: so a strategy's slice count never grows when its room does, and it
refuses only when no plan under the cap fits at all. For one head chunk every constraint on the query chunk is
monotone (the peak is affine in it, Metal's limits cap it), so step 4 solves for the largest query chunk instead of
searching; the only non-monotone rule (Metal: no query slice a multiple of 4096) moves it by one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from . import strategies
from .costs import (
    EINSUM,
    AttentionShape,
    KernelChoice,
    ceil_div,
    chunk_rows,
    format_bytes,
    peak_bytes,
    plural,
    queries_in_room,
)

MPS_MAX_ELEMENTS = 1 << 31  # Metal cannot index a tensor with more elements
MPS_MAX_BYTES = 4 << 30  # nor one buffer larger than this
MPS_BAD_MULTIPLE = 4096  # query slices that are multiples of this produce wrong results on some macOS versions


@dataclass(frozen=True)
class SlicePlan:
    """How to run one attention call: slices over batch x heads rows and over query tokens.

    ``stable``: the same plan in any larger room (the fast path may reuse it while memory only grows)."""

    heads_per_slice: int
    queries_per_slice: int
    head_slices: int
    query_slices: int
    peak_bytes: int
    kernel: KernelChoice
    strategy: str
    reason: str
    stable: bool = False

    @property
    def slices(self) -> int:
        return self.head_slices * self.query_slices

    @property
    def sliced(self) -> bool:
        return self.slices > 1


@dataclass(frozen=True)
class Chunkings:
    """The plans of one call: which fit ``room``, and the exact searches over them."""

    shape: AttentionShape
    room: int
    cap: int
    kernel: KernelChoice
    min_slices: int
    metal: bool

    def head_slices(self, heads_per_slice: int) -> int:
        return ceil_div(self.shape.batch_heads, heads_per_slice)

    def slices(self, heads_per_slice: int, queries_per_slice: int) -> int:
        return self.head_slices(heads_per_slice) * ceil_div(self.shape.q_tokens, queries_per_slice)

    def head_options(self) -> Iterator[tuple[int, int]]:
        """``(heads_per_slice, head_slices)`` for every distinct head slice count, fewest slices first; each is
        the smallest run of rows with that count (the cheapest)."""
        rows = self.shape.batch_heads
        per = rows
        while per >= 1:
            slices = ceil_div(rows, per)
            smallest = ceil_div(rows, slices)
            yield smallest, slices
            per = smallest - 1

    def peak(self, heads_per_slice: int, queries_per_slice: int) -> int:
        return peak_bytes(self.shape, heads_per_slice, queries_per_slice, self.kernel)

    def _metal_elements(self, heads_per_slice: int) -> int:
        s = self.shape
        return chunk_rows(s, heads_per_slice, self.kernel.kind) * max(s.k_tokens, s.v_dim, s.head_dim)

    def valid(self, heads_per_slice: int, queries_per_slice: int) -> bool:
        """Every rule but the room: sizes in range, slice count within ``min_slices``..cap, Metal's limits."""
        s = self.shape
        if not 1 <= heads_per_slice <= s.batch_heads or not 1 <= queries_per_slice <= s.q_tokens:
            return False
        if not self.min_slices <= self.slices(heads_per_slice, queries_per_slice) <= self.cap:
            return False
        if self.metal:
            if queries_per_slice % MPS_BAD_MULTIPLE == 0 and queries_per_slice < s.q_tokens:
                return False
            biggest = self._metal_elements(heads_per_slice) * queries_per_slice
            return biggest < MPS_MAX_ELEMENTS and biggest * s.element_size <= MPS_MAX_BYTES
        return True

    def fits(self, heads_per_slice: int, queries_per_slice: int) -> bool:
        """The definition every search below must agree with (tests compare them by brute force)."""
        return (
            self.valid(heads_per_slice, queries_per_slice)
            and self.peak(heads_per_slice, queries_per_slice) <= self.room
        )

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
        need_query_slices = ceil_div(at_least, head_slices)
        if need_query_slices > max_query_slices:
            return None
        if head_slices == 1 and need_query_slices <= 1 and self.fits(heads_per_slice, nq):
            return nq  # one piece (a fused call returns its own output: a different formula)
        hi = nq - 1 if head_slices == 1 else nq
        fitting = queries_in_room(s, heads_per_slice, self.kernel, self.room)
        if fitting is None:
            return None
        hi = min(hi, fitting)
        if need_query_slices > 1:
            hi = min(hi, ceil_div(nq, need_query_slices - 1) - 1)
        if self.metal:
            per = self._metal_elements(heads_per_slice)
            hi = min(hi, (MPS_MAX_ELEMENTS - 1) // per, MPS_MAX_BYTES // (per * s.element_size))
            if hi % MPS_BAD_MULTIPLE == 0 and hi < nq:
                hi -= 1
        lo = ceil_div(nq, max_query_slices)
        if hi < max(lo, 1):
            return None
        even = ceil_div(nq, ceil_div(nq, hi))  # same slice count, evenly sized, smaller peak
        if self.metal and even % MPS_BAD_MULTIPLE == 0 and even < nq:
            even += 1  # still <= hi, and still the same slice count
        return even

    def fewest(self, at_least: int = 1, heads_per_slice: int = 0) -> tuple[int, int] | None:
        """The fitting chunking with the fewest slices at or above ``at_least``; among equally few, rows per slice
        closest to ``heads_per_slice`` (0: the most rows), then the most rows."""
        best: tuple[int, tuple[int, int], tuple[int, int]] | None = None  # (slices, preference key, chunking)
        for rows, head_slices in self.head_options():
            if best is not None and head_slices > best[0]:
                break
            queries = self.largest_queries(rows, at_least)
            if queries is None:
                continue
            total = head_slices * ceil_div(self.shape.q_tokens, queries)
            key = (abs(rows - heads_per_slice) if heads_per_slice else 0, -rows)
            if best is None or (total, key) < best[:2]:
                best = (total, key, (rows, queries))
        return None if best is None else best[2]

    def smallest_peak(self) -> tuple[int, int] | None:
        """The valid chunking with the smallest peak (ties: fewer slices), whatever the room; None if no chunking
        is valid (a cap below the head slices Metal needs)."""
        nq = self.shape.q_tokens
        best: tuple[int, int, int, int] | None = None
        for rows, head_slices in self.head_options():
            if head_slices > self.cap:
                break
            queries = ceil_div(nq, min(nq, self.cap // head_slices))
            for candidate in (queries, queries + 1):  # Metal's 4096 rule may move it by one
                if candidate <= nq and self.valid(rows, candidate):
                    key = (self.peak(rows, candidate), self.slices(rows, candidate))
                    if best is None or key < best[:2]:
                        best = (*key, rows, candidate)
                    break
        return None if best is None else (best[2], best[3])


def _clean_room(value: float) -> int:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return 0
    if value != value or value <= 0:  # NaN or nothing
        return 0
    return int(min(value, 1 << 62))


def chunkings(
    shape: AttentionShape,
    room: float,
    *,
    strategy: str = "auto",
    slice_cap: int = 4096,
    kernel: KernelChoice = EINSUM,
    device_kind: str = "cpu",
    min_slices: int = 1,
) -> Chunkings:
    if strategy not in strategies.RULES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {strategies.NAMES}")
    if not isinstance(kernel, KernelChoice):
        raise TypeError(f"kernel must be a KernelChoice, got {kernel!r}")
    metal = device_kind == "mps" or strategy == "mps"
    return Chunkings(shape, _clean_room(room), max(1, int(slice_cap)), kernel, max(1, int(min_slices)), metal)


def _plan(c: Chunkings, chunking: tuple[int, int], strategy: str, reason: str, stable: bool = False) -> SlicePlan:
    rows, queries = chunking
    return SlicePlan(rows, queries, c.head_slices(rows), ceil_div(c.shape.q_tokens, queries), c.peak(rows, queries),
                     c.kernel, strategy, reason, stable)  # fmt: skip


def _trivial(c: Chunkings, strategy: str) -> SlicePlan | None:
    """No queries or no keys: the output (zeros when there are no keys) is all that is allocated."""
    sh = c.shape
    if sh.output_bytes > c.room:
        return None
    return SlicePlan(max(sh.batch_heads, 1), max(sh.q_tokens, 1), 1, 1, sh.output_bytes, c.kernel, strategy, "empty")


def _search(c: Chunkings, strategy: str, device_kind: str) -> tuple[tuple[int, int], strategies.Aim, int] | None:
    """Steps 1-4 of the module docstring: (chunking, aim, floor), or None when no plan under the cap fits."""
    smallest = c.smallest_peak()
    if smallest is None or c.peak(*smallest) > c.room:
        return None
    aim = strategies.RULES[strategy](c.shape, c.room, c.kernel, device_kind)
    floor = min(max(aim.slices, c.min_slices), c.slices(*smallest))
    found = c.fewest(floor, aim.heads_per_slice)
    assert found is not None, "the smallest-peak plan fits with at least the floor's slices"
    return found, aim, floor


def plan_attention(
    shape: AttentionShape,
    room: float,
    *,
    strategy: str = "auto",
    slice_cap: int = 4096,
    kernel: KernelChoice = EINSUM,
    device_kind: str = "cpu",
    min_slices: int = 1,
) -> SlicePlan | None:
    """The strategy's plan for one attention call in ``room`` bytes, or None when no plan under the cap fits (see
    :func:`lib_memslice.limits.not_enough_memory` for the error a caller raises then)."""
    c = chunkings(shape, room, strategy=strategy, slice_cap=slice_cap, kernel=kernel, device_kind=device_kind,
                  min_slices=min_slices)  # fmt: skip
    if shape.empty or shape.k_tokens == 0:
        return _trivial(c, strategy)
    searched = _search(c, strategy, device_kind)
    if searched is None:
        return None
    found, aim, floor = searched
    count = c.slices(*found)
    if count == aim.slices:
        reason = f"{aim.why}: {plural(count, 'slice')}"
    elif count > aim.slices:
        reason = f"{aim.why}; {plural(count, 'slice')}: the fewest that fit {format_bytes(c.room)}"
    else:
        reason = (
            f"{aim.why}; {plural(count, 'slice')}: the fewest that fit at or above {floor} (the slice cap, {c.cap})"
        )
    stable = False
    if aim.settled and count == floor:  # the same plan in any larger room, if it is the one an unlimited room gets
        unlimited = _search(Chunkings(shape, 1 << 62, c.cap, kernel, c.min_slices, c.metal), strategy, device_kind)
        stable = unlimited is not None and unlimited[0] == found
    return _plan(c, found, strategy, reason, stable)


def smallest_peak_plan(
    shape: AttentionShape,
    room: float,
    *,
    strategy: str = "auto",
    slice_cap: int = 4096,
    kernel: KernelChoice = EINSUM,
    device_kind: str = "cpu",
    min_slices: int = 1,
) -> SlicePlan | None:
    """The plan with the smallest peak under the cap, if it fits ``room``: what runs when only the safety factor
    refuses every plan (the strategy's room is free memory over it; this room is free memory itself)."""
    c = chunkings(shape, room, strategy=strategy, slice_cap=slice_cap, kernel=kernel, device_kind=device_kind,
                  min_slices=min_slices)  # fmt: skip
    if shape.empty or shape.k_tokens == 0:
        return _trivial(c, strategy)
    found = c.smallest_peak()
    if found is None or c.peak(*found) > c.room:
        return None
    return _plan(c, found, strategy, "over the safety margin: the smallest-peak plan within free memory")


def plan_chain(
    shape: AttentionShape,
    room: float,
    kernels: tuple[KernelChoice, ...],
    *,
    strategy: str = "auto",
    slice_cap: int = 4096,
    device_kind: str = "cpu",
    min_slices: int = 1,
    smallest_peak: bool = False,
) -> SlicePlan | None:
    """The plan a call runs over its chain of kernels (fastest first): the fewest slices among the kernels whose
    plan fits ``room``, the fastest among equally few. Each kernel's count never rises with the room, so neither
    does their minimum: a faster kernel that starts to fit in a larger room (a second CPU worker) never brings
    more slices. ``smallest_peak``: each kernel's smallest-peak plan instead of the strategy's."""
    make = smallest_peak_plan if smallest_peak else plan_attention
    best = None
    for kernel in kernels:
        plan = make(shape, room, strategy=strategy, slice_cap=slice_cap, kernel=kernel, device_kind=device_kind,
                    min_slices=min_slices)  # fmt: skip
        if plan is not None and (best is None or plan.slices < best.slices):
            best = plan
            if plan.slices <= max(1, min_slices):
                break  # no later kernel has fewer
    return best


def plan_in(
    shape: AttentionShape,
    room: Room,
    kernels: tuple[KernelChoice, ...],
    *,
    strategy: str = "auto",
    slice_cap: int = 4096,
    device_kind: str = "cpu",
) -> tuple[SlicePlan | None, bool]:
    """``(plan, over_margin)``: the strategy's plan in the room; else, when only the safety factor refuses (the room
    is a margin for slicing, not a refusal threshold), the smallest-peak plan within free memory itself, as sdp
    would simply run; ``(None, False)`` when nothing fits. The one rule for calls and previews alike."""
    options = {"strategy": strategy, "slice_cap": slice_cap, "device_kind": device_kind}
    plan = plan_chain(shape, room.bytes_for(shape), kernels, **options)
    if plan is not None or room.fixed:
        return plan, False
    plan = plan_chain(shape, room.limit().bytes_for(shape), kernels, smallest_peak=True, **options)
    return plan, plan is not None


def smallest_need(
    shape: AttentionShape, *, slice_cap: int, kernel: KernelChoice, device_kind: str = "cpu", strategy: str = "auto"
) -> int:
    """The smallest predicted peak of any plan under the cap: what the call needs at least."""
    if shape.empty or shape.k_tokens == 0:
        return shape.output_bytes
    c = chunkings(shape, 0, strategy=strategy, slice_cap=slice_cap, kernel=kernel, device_kind=device_kind)
    found = c.smallest_peak()
    return c.peak(*found) if found is not None else c.peak(shape.batch_heads, shape.q_tokens)


# --- the room --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Room:
    """The room an attention call plans in, at any size of its layer.

    Probed: what was free before the call's own q, k and v existed, less those inputs at the size asked, divided by
    ``divisor`` (the safety factor; for the webui's rules, which keep their own margin, the safety factor / 3.3,
    never below 1: no strategy plans in more than free memory). Fixed: the attention budget, the same at any size.
    At the size it was made for it is exactly the room the call planned in; at other sizes it is the room the same
    call would get there, so "the largest square size that fits" counts the layer's own inputs.
    """

    free: int  # free memory before the call's inputs existed (or the attention budget)
    divisor: float = 1.0  # >= 1 (room_for makes it so): no room is more than free memory
    fixed: bool = False
    ceiling: int | None = None  # past free memory, what the device still grants (Apple: tight, see probe.FreeMemory)

    def bytes_for(self, shape: AttentionShape) -> int:
        if self.fixed:
            return self.free
        return int(max(0, self.free - shape.input_bytes) / self.divisor)

    def limit(self) -> Room:
        """Past this nothing runs: free memory itself (no safety margin; on Apple up to what the device still
        grants), or the attention budget."""
        if self.fixed:
            return self
        return Room(max(self.free, self.ceiling if self.ceiling is not None else self.free), 1.0)


def room_for(
    strategy: str, free_bytes: int, safety_factor: float = 1.0, inputs_bytes: int = 0, ceiling_bytes: int | None = None
) -> Room:
    """The room of a strategy from a probe's reading ``free_bytes`` (taken after the call's inputs existed, which
    ``inputs_bytes`` adds back; 0 for previews made before a job) and its ``ceiling`` (see
    :class:`lib_memslice.probe.FreeMemory`)."""
    factor = safety_factor if safety_factor == safety_factor and safety_factor >= 1.0 else 1.0
    divisor = factor / strategies.WEBUI_MARGIN if strategy in strategies.WEBUI_RULES else factor
    ceiling = None if ceiling_bytes is None else int(ceiling_bytes) + int(inputs_bytes)
    return Room(int(free_bytes) + int(inputs_bytes), max(1.0, divisor), ceiling=ceiling)


def budget_room(budget_bytes: int) -> Room:
    """The attention budget: the same room at every size, for every strategy."""
    return Room(int(budget_bytes), fixed=True)
