"""Attention shape + budget + strategy -> SlicePlan, or NotEnoughMemory. Pure arithmetic, no tensors.

The cost model below predicts the bytes an attention call allocates beyond its inputs. It was measured, not
copied: stock attention holds the scores twice at its peak (scores and softmax), the fused SDPA kernels hold
only their output and a float32 log-sum-exp per query row, and torch's SDPA "math" fallback computes half
precision inputs in float32. Every strategy is a different *order* in which to try plans; every plan is
checked against the same model, so a returned plan always fits its budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

#: Per-chunk kernels the model knows. "fused": SDPA flash / memory-efficient (no score matrix);
#: "sdpa-math": SDPA's reference path; "einsum": matmul + softmax + matmul.
KERNEL_KINDS = ("fused", "sdpa-math", "einsum")

MPS_MAX_ELEMENTS = 1 << 31  # Metal cannot index a tensor with more elements
MPS_MAX_BYTES = 4 * GiB  # nor one buffer larger than this
MPS_UNSLICED_ROWS = 1 << 16  # the seed never slices batch*heads*q_tokens up to this
MPS_BAD_MULTIPLE = 4096  # slice sizes that are multiples of this produce wrong results on some macOS versions


class NotEnoughMemory(RuntimeError):
    """No plan under the slice cap fits the budget. Carries the numbers a user needs to act on."""

    def __init__(
        self,
        need: int,
        have: int,
        *,
        site: str = "",
        slice_cap: int = 0,
        max_resolution: int | None = None,
        max_q_tokens: int = 0,
        detail: str = "",
    ) -> None:
        self.need = int(need)
        self.have = int(have)
        self.site = site
        self.slice_cap = slice_cap
        self.max_resolution = max_resolution
        self.max_q_tokens = max_q_tokens
        where = f" at {site}" if site else ""
        if max_resolution is not None:
            hint = (
                f"largest square size that fits this layer: {max_resolution}x{max_resolution}"
                if max_resolution > 0
                else "no resolution fits this layer with this budget"
            )
        else:
            hint = f"largest query token count that fits: {max_q_tokens}"
        text = (
            f"memslice: not enough memory for attention{where}: the finest plan under the slice cap "
            f"({slice_cap}) needs {format_bytes(self.need)}, the budget is {format_bytes(self.have)}; {hint}."
            " Lower the resolution or batch size, raise the slice cap, or lower the safety factor."
        )
        if detail:
            text += f" ({detail})"
        super().__init__(text)


def format_bytes(n: float) -> str:
    """Human-readable binary size, e.g. ``1.5 GiB``."""
    n = float(n)
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class AttentionShape:
    """One attention call: ``batch_heads`` rows of ``q_tokens`` queries against ``k_tokens`` keys.

    ``heads`` is the number of heads per batch item: head chunks never straddle two items unless they hold whole
    items, so every chunk is one rectangular slice of a ``[B, H, N, d]`` tensor. ``element_size`` is the
    compute element size (after upcast), ``io_element_size`` that of q/k/v and the output.
    """

    batch_heads: int
    q_tokens: int
    k_tokens: int
    head_dim: int
    v_dim: int = 0
    element_size: int = 4
    io_element_size: int = 0
    heads: int = 0

    def __post_init__(self) -> None:
        for name in ("batch_heads", "q_tokens", "k_tokens", "head_dim", "v_dim", "heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"AttentionShape.{name} must be a non-negative int, got {value!r}")
        for name in ("element_size", "io_element_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0 or value > 16:
                raise ValueError(f"AttentionShape.{name} must be an int in 0..16, got {value!r}")
        if self.element_size == 0:
            raise ValueError("AttentionShape.element_size must be positive")
        if self.v_dim == 0:
            object.__setattr__(self, "v_dim", self.head_dim)
        if self.io_element_size == 0:
            object.__setattr__(self, "io_element_size", self.element_size)
        if self.heads == 0:
            object.__setattr__(self, "heads", max(self.batch_heads, 1))
        elif self.batch_heads % self.heads:
            raise ValueError(f"AttentionShape.heads ({self.heads}) must divide batch_heads ({self.batch_heads})")

    @property
    def batch(self) -> int:
        return self.batch_heads // self.heads if self.batch_heads else 0

    @property
    def empty(self) -> bool:
        return self.batch_heads == 0 or self.q_tokens == 0

    @property
    def score_bytes(self) -> int:
        """Bytes of the full score matrix at the compute element size."""
        return self.batch_heads * self.q_tokens * self.k_tokens * self.element_size

    @property
    def output_bytes(self) -> int:
        return self.batch_heads * self.q_tokens * self.v_dim * self.io_element_size


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
    """How to run one attention call: chunks over batch*heads and over query tokens."""

    head_chunk: int
    query_chunk: int
    head_steps: int
    query_steps: int
    peak_bytes: int
    kernel: str
    strategy: str
    reason: str

    @property
    def steps(self) -> int:
        return self.head_steps * self.query_steps

    @property
    def sliced(self) -> bool:
        return self.steps > 1


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def chunk_bytes(
    shape: AttentionShape,
    head_chunk: int,
    query_chunk: int,
    kernel: str,
    workspace: int = 0,
    input_copies: int | None = None,
) -> int:
    """Bytes allocated while one chunk runs, excluding the preallocated output (upper bound, per kernel).

    ``input_copies`` is how many copies of the chunk's q/k/v the fused kernel's caller makes (a cast to the compute
    dtype, a contiguous or padded copy); ``None`` assumes the worst: one, two when casting.
    """
    ces = shape.element_size
    d, dv, nk = shape.head_dim, shape.v_dim, shape.k_tokens
    q_c = head_chunk * query_chunk * d
    kv_c = head_chunk * nk * (d + dv)
    o_c = head_chunk * query_chunk * dv
    s_c = head_chunk * query_chunk * nk
    cast = ces != shape.io_element_size
    if kernel == "fused":
        # output + float32 log-sum-exp per row + the kernel's own workspace + any copies of the chunk's inputs
        copies = (2 if cast else 1) if input_copies is None else input_copies
        return o_c * ces + head_chunk * query_chunk * 4 + workspace + copies * (q_c + kv_c) * ces
    if kernel == "sdpa-math":
        mes = max(ces, 4)  # torch computes half precision in float32 on this path
        return 2 * s_c * mes + 3 * (q_c + kv_c) * mes + o_c * (mes + ces)
    if kernel == "einsum":
        # scores + softmax output; inputs cast and/or made contiguous for bmm
        return 2 * s_c * ces + 2 * (q_c + kv_c) * ces + o_c * ces
    raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNEL_KINDS}")


def peak_bytes(
    shape: AttentionShape,
    head_chunk: int,
    query_chunk: int,
    kernel: str,
    workspace: int = 0,
    input_copies: int | None = None,
) -> int:
    """Predicted peak of the whole attention call for this chunking (the first chunk is the largest)."""
    if shape.empty:
        return shape.output_bytes
    head_chunk = min(head_chunk, shape.batch_heads)
    query_chunk = min(query_chunk, shape.q_tokens)
    one_step = head_chunk >= shape.batch_heads and query_chunk >= shape.q_tokens
    chunk = chunk_bytes(shape, head_chunk, query_chunk, kernel, workspace, input_copies)
    if one_step:
        # the kernel's own output is returned; a cast back to the io dtype adds one output copy
        cast = shape.element_size != shape.io_element_size
        return chunk + (shape.output_bytes if cast else 0)
    return shape.output_bytes + chunk


def head_options(shape: AttentionShape) -> list[tuple[int, int]]:
    """(head_chunk, head_steps) pairs, fewest steps first: whole items per chunk, then heads within an item."""
    b, h = shape.batch, shape.heads
    seen: dict[int, int] = {}
    for k in range(1, b + 1):
        items = _ceil_div(b, k)
        seen.setdefault(items * h, _ceil_div(b, items))
    for k in range(2, h + 1):
        hc = _ceil_div(h, k)
        seen.setdefault(hc, b * _ceil_div(h, hc))
    return sorted(seen.items(), key=lambda item: (item[1], -item[0]))


@dataclass(frozen=True)
class _Rules:
    shape: AttentionShape
    budget: int
    cap: int
    kernel: str
    workspace: int
    min_steps: int
    mps: bool
    input_copies: int | None = None

    def query_chunk(self, query_steps: int) -> int:
        qc = _ceil_div(self.shape.q_tokens, max(query_steps, 1))
        if self.mps and qc > 1 and qc % MPS_BAD_MULTIPLE == 0 and qc < self.shape.q_tokens:
            qc -= 1
        return qc

    def steps(self, head_chunk: int, query_chunk: int) -> tuple[int, int]:
        s = self.shape
        if head_chunk >= s.heads:
            head_steps = _ceil_div(s.batch, head_chunk // s.heads)
        else:
            head_steps = s.batch * _ceil_div(s.heads, head_chunk)
        return head_steps, _ceil_div(s.q_tokens, query_chunk)

    def peak(self, head_chunk: int, query_chunk: int) -> int:
        return peak_bytes(self.shape, head_chunk, query_chunk, self.kernel, self.workspace, self.input_copies)

    def mps_ok(self, head_chunk: int, query_chunk: int) -> bool:
        s = self.shape
        biggest = head_chunk * query_chunk * max(s.k_tokens, s.v_dim, s.head_dim)
        return biggest < MPS_MAX_ELEMENTS and biggest * max(s.element_size, 4) <= MPS_MAX_BYTES

    def fits(self, head_chunk: int, query_chunk: int) -> bool:
        head_steps, query_steps = self.steps(head_chunk, query_chunk)
        if not self.min_steps <= head_steps * query_steps <= self.cap:
            return False
        if self.peak(head_chunk, query_chunk) > self.budget:
            return False
        return not self.mps or self.mps_ok(head_chunk, query_chunk)

    def make(self, head_chunk: int, query_chunk: int, strategy: str, reason: str) -> SlicePlan:
        head_steps, query_steps = self.steps(head_chunk, query_chunk)
        return SlicePlan(
            head_chunk=head_chunk,
            query_chunk=query_chunk,
            head_steps=head_steps,
            query_steps=query_steps,
            peak_bytes=self.peak(head_chunk, query_chunk),
            kernel=self.kernel,
            strategy=strategy,
            reason=reason,
        )

    def finest_query(self, head_chunk: int, head_steps: int) -> int | None:
        """Smallest query-step count for this head chunk whose plan fits, or None."""
        hi = min(self.shape.q_tokens, self.cap // head_steps)
        lo = max(1, _ceil_div(self.min_steps, head_steps))
        if lo > hi or not self.fits(head_chunk, self.query_chunk(hi)):
            return None
        while lo < hi:  # fits() is monotone in the query-step count
            mid = (lo + hi) // 2
            if self.fits(head_chunk, self.query_chunk(mid)):
                hi = mid
            else:
                lo = mid + 1
        return lo

    def fewest_steps(self) -> tuple[int, int] | None:
        """The fitting (head_chunk, query_chunk) with the fewest steps; ties go to head chunks."""
        best: tuple[int, int, int] | None = None
        for head_chunk, head_steps in head_options(self.shape):
            if head_steps > self.cap or (best is not None and head_steps > best[0]):
                break
            query_steps = self.finest_query(head_chunk, head_steps)
            if query_steps is None:
                continue
            qc = self.query_chunk(query_steps)
            total = head_steps * self.steps(head_chunk, qc)[1]
            if best is None or total < best[0]:
                best = (total, head_chunk, qc)
        return None if best is None else (best[1], best[2])


def _pow2_at_least(x: float) -> int:
    return 1 if x <= 1 else 1 << math.ceil(math.log2(x))


def _auto(r: _Rules) -> Iterator[tuple[int, int, str]]:
    s = r.shape
    if r.kernel == "fused":
        yield s.batch_heads, s.q_tokens, "fused kernel holds no score matrix: no slicing needed"
    found = r.fewest_steps()
    if found:
        yield found[0], found[1], "fewest slices that fit the budget"


def _doggettx(r: _Rules) -> Iterator[tuple[int, int, str]]:
    s = r.shape
    modifier = 3.0 if s.element_size == 2 else 2.5
    estimate = s.score_bytes * modifier
    steps = _pow2_at_least(estimate / max(r.budget, 1))
    steps = max(steps, _pow2_at_least(r.min_steps))
    why = f"score x{modifier:g} = {format_bytes(estimate)} vs budget {format_bytes(r.budget)}"
    while steps <= min(r.cap, max(s.q_tokens, 1)):
        yield s.batch_heads, r.query_chunk(steps), f"{why}: {steps} query steps"
        steps *= 2
        why = "doubled until the measured cost model fits"


def _invokeai(r: _Rules) -> Iterator[tuple[int, int, str]]:
    s = r.shape
    div = _pow2_at_least(s.score_bytes / max(r.budget, 1))
    div = max(div, _pow2_at_least(r.min_steps))
    why = f"score {format_bytes(s.score_bytes)} vs tensor budget {format_bytes(r.budget)}"
    # batch*heads first, then query tokens
    for head_chunk, head_steps in head_options(s):
        if head_steps >= div:
            yield head_chunk, s.q_tokens, f"{why}: {head_steps} head slices"
    query_steps = _ceil_div(div, s.batch_heads)
    while query_steps <= min(r.cap, max(s.q_tokens, 1)):
        yield 1, r.query_chunk(query_steps), f"{why}: heads, then {query_steps} query slices each"
        query_steps *= 2


def _mps(r: _Rules) -> Iterator[tuple[int, int, str]]:
    s = r.shape
    if s.batch_heads * s.q_tokens <= MPS_UNSLICED_ROWS:
        yield s.batch_heads, s.q_tokens, "small enough for Metal unsliced"
    lo = max(1, r.min_steps)
    hi = min(r.cap, max(s.q_tokens, 1))
    if lo <= hi:
        # least query slicing that fits, slice sizes never a multiple of 4096, no tensor over Metal's limits
        steps = lo
        while steps <= hi:
            qc = r.query_chunk(steps)
            if r.fits(s.batch_heads, qc):
                yield s.batch_heads, qc, "query slices within Metal's tensor limits"
                break
            steps = max(steps + 1, int(steps * 1.25))


def _heads(r: _Rules) -> Iterator[tuple[int, int, str]]:
    s = r.shape
    half = _ceil_div(s.heads, 2)
    yield half, s.q_tokens, "half the heads per slice"
    yield 1, s.q_tokens, "one head per slice"
    head_steps = s.batch_heads
    query_steps = r.finest_query(1, head_steps)
    if query_steps:
        yield 1, r.query_chunk(query_steps), "one head per slice, then query slices"


_STRATEGIES = {"auto": _auto, "doggettx": _doggettx, "invokeai": _invokeai, "mps": _mps, "heads": _heads}
STRATEGY_NAMES = tuple(_STRATEGIES)


def _clean_budget(value: float) -> int:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return 0
    if value != value or value <= 0:  # NaN or nothing
        return 0
    return int(min(value, 1 << 62))


def _rules(
    shape: AttentionShape,
    budget_bytes: float,
    *,
    strategy: str = "auto",
    slice_cap: int = 64,
    kernel: str = "fused",
    workspace_bytes: int = 0,
    device_kind: str = "cpu",
    min_steps: int = 1,
    input_copies: int | None = None,
) -> _Rules:
    if strategy not in _STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGY_NAMES}")
    if kernel not in KERNEL_KINDS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNEL_KINDS}")
    mps = device_kind == "mps" or strategy == "mps"
    return _Rules(
        shape,
        _clean_budget(budget_bytes),
        max(1, int(slice_cap)),
        kernel,
        max(0, int(workspace_bytes)),
        max(1, int(min_steps)),
        mps,
        None if input_copies is None else max(0, int(input_copies)),
    )


def _choose(r: _Rules, strategy: str) -> tuple[SlicePlan | None, bool]:
    """The plan, and whether it was the strategy's first candidate."""
    s = r.shape
    if s.empty or s.k_tokens == 0:
        # nothing to slice: the output (zeros when there are no keys) is all that is allocated
        if s.output_bytes > r.budget:
            return None, False
        plan = SlicePlan(max(s.batch_heads, 1), max(s.q_tokens, 1), 1, 1, s.output_bytes, r.kernel, strategy, "empty")
        return plan, True
    for i, (head_chunk, query_chunk, reason) in enumerate(_STRATEGIES[strategy](r)):
        if r.fits(head_chunk, query_chunk):
            return r.make(head_chunk, query_chunk, strategy, reason), i == 0
    found = r.fewest_steps()
    if found is not None:
        return r.make(found[0], found[1], strategy, f"{strategy} rule did not fit; fewest slices that fit"), False
    return None, False


_first_choices: dict[tuple, SlicePlan] = {}
_FIRST_CHOICES_SIZE = 512


def plan_attention(
    shape: AttentionShape,
    budget_bytes: float,
    *,
    strategy: str = "auto",
    slice_cap: int = 64,
    kernel: str = "fused",
    workspace_bytes: int = 0,
    device_kind: str = "cpu",
    min_steps: int = 1,
    geometry: Geometry | None = None,
    site: str = "",
    input_copies: int | None = None,
) -> SlicePlan:
    """Choose how to slice one attention call so its predicted peak stays within ``budget_bytes``.

    Raises :class:`NotEnoughMemory` only when no plan with at most ``slice_cap`` steps (and at least
    ``min_steps``, which the out-of-memory retry raises) fits, whatever the strategy.
    """
    kwargs = dict(
        strategy=strategy,
        slice_cap=slice_cap,
        kernel=kernel,
        workspace_bytes=workspace_bytes,
        device_kind=device_kind,
        min_steps=min_steps,
        input_copies=input_copies,
    )
    key = (shape, strategy, slice_cap, kernel, workspace_bytes, device_kind, input_copies)
    budget = _clean_budget(budget_bytes)
    cached = _first_choices.get(key) if min_steps <= 1 else None
    if cached is not None and cached.peak_bytes <= budget:
        return cached  # the common case: same layer, plenty of memory
    r = _rules(shape, budget_bytes, **kwargs)
    found, first = _choose(r, strategy)
    if found is not None:
        # reusable at any larger budget only where the choice cannot depend on the budget: an unsliced plan
        # under auto/mps (nothing has fewer steps), or heads' fixed first candidate. Doggettx and InvokeAI
        # compare their estimates with the budget, so their plans are never reused.
        reusable = (strategy in ("auto", "mps") and found.steps == 1) or (strategy == "heads" and first)
        if reusable and min_steps <= 1:
            if len(_first_choices) >= _FIRST_CHOICES_SIZE:
                _first_choices.clear()
            _first_choices[key] = found
        return found
    if shape.empty or shape.k_tokens == 0:
        raise NotEnoughMemory(
            shape.output_bytes, r.budget, site=site, slice_cap=r.cap, detail="the output alone exceeds the budget"
        )
    resolution = None
    if geometry is not None:
        resolution = max_square_resolution(shape, geometry, r.budget, **kwargs)
    detail = f"after out-of-memory retries reached {r.min_steps} slices" if r.min_steps > 1 else ""
    raise NotEnoughMemory(
        _finest_need(r),
        r.budget,
        site=site,
        slice_cap=r.cap,
        max_resolution=resolution,
        max_q_tokens=max_query_tokens(shape, r.budget, **kwargs),
        detail=detail,
    )


def _finest_need(r: _Rules) -> int:
    """Predicted peak of the finest chunking under the cap (what the call would need at best)."""
    best = None
    for head_chunk, head_steps in head_options(r.shape):
        if head_steps > r.cap:
            continue
        query_steps = min(r.shape.q_tokens, r.cap // head_steps)
        peak = r.peak(head_chunk, r.query_chunk(query_steps))
        best = peak if best is None else min(best, peak)
    return best if best is not None else r.peak(r.shape.batch_heads, r.shape.q_tokens)


def _fits(shape: AttentionShape, budget: float, **kwargs: object) -> bool:
    strategy = str(kwargs.get("strategy", "auto"))
    return _choose(_rules(shape, budget, **kwargs), strategy)[0] is not None  # type: ignore[arg-type]


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


def max_query_tokens(shape: AttentionShape, budget: float, **kwargs: object) -> int:
    """Largest query-token count (keys unchanged) that still gets a plan."""
    return max(0, _largest(1, 1 << 24, lambda n: _fits(replace(shape, q_tokens=n), budget, **kwargs)))


MAX_RESOLUTION = 65536


def shape_at_resolution(shape: AttentionShape, geometry: Geometry, width: int, height: int) -> AttentionShape:
    """The same layer at another image size."""
    tokens = geometry.tokens(width, height)
    return replace(shape, q_tokens=tokens, k_tokens=tokens if geometry.self_attention else shape.k_tokens)


def max_square_resolution(shape: AttentionShape, geometry: Geometry, budget: float, **kwargs: object) -> int:
    """Largest square image side (a multiple of 8) at which this layer still gets a plan; 0 if none."""

    def ok(side8: int) -> bool:
        return _fits(shape_at_resolution(shape, geometry, side8 * 8, side8 * 8), budget, **kwargs)

    return max(0, _largest(1, MAX_RESOLUTION // 8, ok)) * 8
