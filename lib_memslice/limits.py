"""The largest size a layer fits, and the error when a call fits nothing: numbers a user can act on.

Everything here is arithmetic over :mod:`lib_memslice.slicing`: "the largest square image this layer fits" is the
largest size at which some kernel gets a plan in the room the same call would have there (its own inputs counted).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from .costs import AttentionShape, KernelChoice, format_bytes
from .settings import MAX_SLICE_CAP
from .slicing import Room, budget_room, plan_attention, smallest_need

MAX_RESOLUTION = 65536


class NotEnoughMemory(RuntimeError):
    """No plan under the slice cap fits, or every plan tried ran out of memory. Carries the numbers behind its
    text: ``need`` (the smallest peak under the cap), ``have`` (free memory or the attention budget), the site and
    its query tokens (the webui glue names the pass from them)."""

    def __init__(
        self,
        text: str,
        *,
        need: int = 0,
        have: int = 0,
        site: str = "",
        q_tokens: int = 0,
        kernel: str = "",
        fixed_budget: bool = False,
        max_resolution: int | None = None,
        max_q_tokens: int | None = None,
    ) -> None:
        super().__init__(text)
        self.need, self.have, self.site, self.q_tokens = int(need), int(have), site, q_tokens
        self.kernel, self.fixed_budget = kernel, fixed_budget
        self.max_resolution, self.max_q_tokens = max_resolution, max_q_tokens


@dataclass(frozen=True)
class Geometry:
    """Where a layer sits in the model, so a token count can be turned back into an image size.

    ``downscale`` is image pixels per token along one side (8 * 2**level in a UNet, 8 in the VAE's mid block, 16 in
    SD3's MMDiT); in self-attention the key tokens grow with the image too. ``extra_tokens`` join the image's at
    every size (SD3's joint attention: the prompt's text tokens); ``size_step`` is the step of the largest square
    size, and past 8 px (SD3's 16) the multiple the webui cuts image sides down to before the layer sees them.
    """

    downscale: int
    self_attention: bool
    extra_tokens: int = 0
    size_step: int = 8

    def tokens(self, width: int, height: int) -> int:
        if self.size_step > 8:
            width, height = width // self.size_step * self.size_step, height // self.size_step * self.size_step
        return math.ceil(width / self.downscale) * math.ceil(height / self.downscale) + self.extra_tokens


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


def _fits_in(other: AttentionShape, room: Room, kernels: Sequence[KernelChoice], **options: object) -> bool:
    space = room.bytes_for(other)
    return space > 0 and any(plan_attention(other, space, kernel=k, **options) is not None for k in kernels)  # type: ignore[arg-type]


def max_square_resolution(
    shape: AttentionShape, geometry: Geometry, room: Room, kernels: Sequence[KernelChoice], **options: object
) -> int:
    """Largest square image side (a multiple of the geometry's size step, 8 px or SD3's 16) at which this layer
    gets a plan on any of ``kernels`` in the room it would have there (its own inputs counted); 0 if none."""
    step = geometry.size_step

    def ok(sides: int) -> bool:
        return _fits_in(shape_at_resolution(shape, geometry, sides * step, sides * step), room, kernels, **options)

    return max(0, _largest(1, MAX_RESOLUTION // step, ok)) * step


def max_query_tokens(shape: AttentionShape, room: Room, kernels: Sequence[KernelChoice], **options: object) -> int:
    """Largest query-token count that gets a plan (keys grow with it when the call looks like self-attention)."""
    grow_keys = shape.q_tokens == shape.k_tokens

    def ok(n: int) -> bool:
        other = replace(shape, q_tokens=n, k_tokens=n if grow_keys else shape.k_tokens)
        return _fits_in(other, room, kernels, **options)

    return max(0, _largest(1, 1 << 26, ok))


def _size_hint(shape: AttentionShape, room: Room, kernels: Sequence[KernelChoice], geometry: Geometry | None,
               options: dict[str, object]) -> tuple[str, int | None, int | None]:  # fmt: skip
    """What fits instead: the largest square size for a tagged layer, else the share of its area."""
    if geometry is not None:
        side = max_square_resolution(shape, geometry, room, kernels, **options)
        if side <= 0:
            return "no image size fits this attention layer", side, None
        counted = "its output counted; the attention budget leaves the inputs out" if room.fixed else (
            "its inputs and output counted")  # fmt: skip
        return f"the largest square image this attention layer alone fits is {side}x{side} ({counted})", side, None
    tokens = max_query_tokens(shape, room, kernels, **options)
    if shape.q_tokens <= 0 or tokens >= shape.q_tokens:
        return "", None, tokens
    if tokens <= 0:
        return "not even one query token fits", None, tokens
    share = tokens / shape.q_tokens
    return (f"this call has {shape.q_tokens} query tokens and at most {tokens} fit: about {100 * share:.0f} % of "
            f"this image's area (each side about {100 * math.sqrt(share):.0f} %)"), None, tokens  # fmt: skip


def _advice(*, fixed: bool, higher_cap_helps: bool) -> str:
    advice = ["lower the resolution or batch size"]
    if higher_cap_helps:
        advice.append("raise the slice cap")
    advice.append("raise 'Attention budget (GiB)'" if fixed else "free memory on the device")
    return f"To fit: {', '.join(advice[:-1])} or {advice[-1]}."


def not_enough_memory(
    shape: AttentionShape,
    room: Room | float,
    kernels: Sequence[KernelChoice],
    *,
    strategy: str = "auto",
    slice_cap: int = 4096,
    device_kind: str = "cpu",
    geometry: Geometry | None = None,
    site: str = "",
    detail: str = "",
) -> NotEnoughMemory:
    """The error for a call no plan fits: the smallest need among ``kernels`` against free memory itself (the
    safety factor is a margin, never the refusal) or the attention budget, and the largest size that fits. A
    plain number is an attention budget."""
    room = budget_room(int(room)) if not isinstance(room, Room) else room.limit()
    have = room.bytes_for(shape)
    options: dict[str, object] = dict(strategy=strategy, slice_cap=slice_cap, device_kind=device_kind)
    where = f" at {site}" if site else ""
    have_text = f"the attention budget is {format_bytes(have)}" if room.fixed else f"{format_bytes(have)} is free"
    if shape.empty or shape.k_tokens == 0:
        advice = _advice(fixed=room.fixed, higher_cap_helps=False)
        text = (f"memslice: not enough memory for attention{where}: its output alone needs "
                f"{format_bytes(shape.output_bytes)}, {have_text}. {advice}")  # fmt: skip
        return NotEnoughMemory(text, need=shape.output_bytes, have=have, site=site, fixed_budget=room.fixed)
    needs = {k: smallest_need(shape, kernel=k, **options) for k in kernels}  # type: ignore[arg-type]
    best = min(kernels, key=lambda k: needs[k])
    # "raise the slice cap" only where some allowed cap would make it fit (a fused call's output never shrinks)
    at_top_cap = smallest_need(shape, kernel=best, **{**options, "slice_cap": MAX_SLICE_CAP})  # type: ignore[arg-type]
    hint, side, tokens = _size_hint(shape, room, kernels, geometry, options)
    text = (
        f"memslice: not enough memory for attention{where}: the smallest peak of any plan under the slice cap "
        f"({slice_cap}) on the {best.kind} kernel is {format_bytes(needs[best])}, {have_text}"
        f"{'; ' + hint if hint else ''}. "
        f"{_advice(fixed=room.fixed, higher_cap_helps=slice_cap < MAX_SLICE_CAP and at_top_cap <= have)}"
        f"{f' ({detail})' if detail else ''}"
    )
    return NotEnoughMemory(text, need=needs[best], have=have, site=site, q_tokens=shape.q_tokens, kernel=best.kind,
                           fixed_budget=room.fixed, max_resolution=side, max_q_tokens=tokens)  # fmt: skip


@dataclass(frozen=True)
class Attempt:
    """One plan that ran out of memory: its kernel, slice count and predicted peak."""

    kernel: str
    slices: int
    peak_bytes: int


def _attempts_text(attempts: Sequence[Attempt]) -> str:
    by_kernel: dict[str, list[Attempt]] = {}
    for a in attempts:
        by_kernel.setdefault(a.kernel, []).append(a)
    parts = []
    for kernel, tried in by_kernel.items():
        counts = [str(a.slices) for a in tried]
        listed = counts[0] if len(counts) == 1 else f"{', '.join(counts[:-1])} and {counts[-1]}"
        peaks = ", ".join(format_bytes(a.peak_bytes) for a in tried)
        parts.append(f"the {kernel} kernel at {listed} slice{'s' if counts != ['1'] else ''} (predicted {peaks})")
    return " and on ".join(parts)


def out_of_memory(
    shape: AttentionShape,
    attempts: Sequence[Attempt],
    bound: str,
    *,
    free: int | None,
    slice_cap: int,
    site: str = "",
) -> NotEnoughMemory:
    """The error once out-of-memory retries stop: exactly the plans that ran out, and what stopped the retries.

    ``bound``: ``cap`` (the next slice count is over the slice cap), ``pieces`` (the call is already cut into every
    row and query it has), ``memory`` (no plan with more slices, nor a leaner kernel, fits what is free now), or
    ``output`` (a fused call: more slices cannot shrink its output, and the einsum kernel's
    smallest-peak plan ran out too or was not allowed). ``free`` is a fresh reading (None: an attention budget)."""
    where = f" at {site}" if site else ""
    stop = {
        "cap": f"twice the slices would pass the slice cap ({slice_cap})",
        "pieces": f"the call cannot be cut further ({shape.batch_heads} rows of batch x heads x {shape.q_tokens} "
        "queries, one each per slice at most)",
        "memory": "no plan with twice the slices, nor a leaner kernel, fits "
        + (f"the {format_bytes(free)} free now" if free is not None else "the attention budget"),
        "output": f"more slices cannot shrink a fused call's output ({format_bytes(shape.output_bytes)})",
    }[bound]
    advice = _advice(fixed=free is None, higher_cap_helps=bound == "cap" and slice_cap < MAX_SLICE_CAP)
    if free is None:
        advice += " The attention budget may be more than the device really has free: lower it to what is free."
    text = (f"memslice: out of memory in attention{where} on {_attempts_text(attempts)}; {stop}. "
            f"{advice}")  # fmt: skip
    have = free if free is not None else 0
    need = min((a.peak_bytes for a in attempts), default=0)
    return NotEnoughMemory(text, need=need, have=have, site=site, q_tokens=shape.q_tokens,
                           kernel=attempts[-1].kernel if attempts else "", fixed_budget=free is None)  # fmt: skip
