"""The exact search, the room and the error: pure arithmetic, so their promises are checked against brute force.

The rules of the strategies and the promise that no strategy slices more with more room: test_strategies.py."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lib_memslice.costs import EINSUM, FUSED, GiB, KernelChoice, MiB, peak_bytes
from lib_memslice.costs import AttentionShape as Shape
from lib_memslice.limits import (
    Attempt,
    Geometry,
    NotEnoughMemory,
    max_square_resolution,
    not_enough_memory,
    out_of_memory,
    shape_at_resolution,
)
from lib_memslice.settings import MAX_SLICE_CAP
from lib_memslice.slicing import (
    MPS_BAD_MULTIPLE,
    MPS_MAX_ELEMENTS,
    budget_room,
    chunkings,
    plan_attention,
    room_for,
    smallest_need,
    smallest_peak_plan,
)
from lib_memslice.strategies import NAMES as STRATEGY_NAMES

SD15_SELF = Shape(16, 4096, 4096, 40, heads=8)  # SD1.5 512 px level 0, cond + uncond
KERNELS = (
    EINSUM,
    FUSED,
    KernelChoice("fused", scratch=3000, input_copies=1),
    KernelChoice("sdpa-math"),
    KernelChoice("einsum", output_extra=5),
    KernelChoice("fused", output_extra=4, input_copies=0),
)
DEVICES = ("cpu", "cuda", "mps")


def search(shape, room, strategy="auto", cap=4096, kernel=EINSUM, device="cpu", min_slices=1):
    return chunkings(shape, room, strategy=strategy, slice_cap=cap, kernel=kernel, device_kind=device,
                     min_slices=min_slices)  # fmt: skip


def fitting(s):
    """Every (heads_per_slice, queries_per_slice, slices) that fits, by brute force over all chunkings."""
    sh = s.shape
    for hps in range(1, sh.batch_heads + 1):
        for qps in range(1, sh.q_tokens + 1):
            if s.fits(hps, qps):
                yield hps, qps, s.slices(hps, qps)


shapes = st.builds(
    lambda b, h, nq, nk, d, dv, es, up: Shape(
        b * h, nq, nk, d, dv, element_size=4 if up else es, io_element_size=es, heads=h
    ),
    st.integers(1, 3),
    st.integers(1, 6),
    st.integers(1, 120),
    st.integers(1, 120),
    st.sampled_from([1, 8, 40]),
    st.sampled_from([0, 8, 24]),
    st.sampled_from([2, 4]),
    st.booleans(),
)
common = dict(
    room=st.integers(1, 2 * MiB),
    strategy=st.sampled_from(STRATEGY_NAMES),
    kernel=st.sampled_from(KERNELS),
    cap=st.integers(1, 80),
    device=st.sampled_from(DEVICES),
    min_slices=st.sampled_from([1, 1, 2, 5]),
)


@settings(max_examples=250, deadline=None)
@given(shape=shapes, **common)
def test_a_plan_fits_and_none_is_refused_while_any_fits(shape, room, strategy, kernel, cap, device, min_slices):
    """Exactness, every strategy (Metal's rules included): a plan fits; None only when no chunking fits."""
    plan = plan_attention(shape, room, strategy=strategy, kernel=kernel, slice_cap=cap, device_kind=device,
                          min_slices=min_slices)  # fmt: skip
    s = search(shape, room, strategy, cap, kernel, device, min_slices)
    if plan is None:
        assert next(fitting(s), None) is None
        return
    assert s.fits(plan.heads_per_slice, plan.queries_per_slice)
    assert plan.peak_bytes == peak_bytes(shape, plan.heads_per_slice, plan.queries_per_slice, kernel) <= room
    assert min_slices <= plan.slices <= cap
    # ceil division: the slices cover the tensor, the last one may be short
    assert plan.query_slices == math.ceil(shape.q_tokens / plan.queries_per_slice)
    assert plan.head_slices == math.ceil(shape.batch_heads / plan.heads_per_slice)


@settings(max_examples=200, deadline=None)
@given(shape=shapes, room=common["room"], kernel=common["kernel"], cap=common["cap"],
       device=st.sampled_from(["cuda", "mps"]), at_least=st.integers(1, 40))  # fmt: skip
def test_fewest_is_the_true_minimum(shape, room, kernel, cap, device, at_least):
    s = search(shape, room, "auto", cap, kernel, device)
    found = s.fewest(at_least)
    best = min((n for _h, _q, n in fitting(s) if n >= at_least), default=None)
    assert (None if found is None else s.slices(*found)) == best
    if found is not None:
        assert s.fits(*found)


@pytest.mark.parametrize(
    ("strategy", "kernel"),
    [("doggettx", EINSUM), ("mps", EINSUM), ("doggettx", FUSED), ("auto", EINSUM), ("invokeai", EINSUM)],
)
def test_slice_counts_at_sd15_1304px_fall_as_the_room_grows(strategy, kernel):
    """An early regression: at 16 x 26569 x 26569 the counts went 496 -> 2044 from 256 to 384 MiB."""
    shape = Shape(16, 26569, 26569, 40, heads=8)
    counts = []
    for mib in (128, 192, 256, 320, 384, 512, 768, 1024, 2048, 8192):
        plan = plan_attention(shape, mib * MiB, strategy=strategy, kernel=kernel, device_kind="cuda")
        counts.append(math.inf if plan is None else plan.slices)
    assert counts == sorted(counts, reverse=True), counts


def _exists_large(s):
    """Existence of a fitting chunking without enumerating every query chunk: within one query slice count the
    peak grows with the chunk, so the smallest chunk with that count (or the next, Metal's 4096 rule) decides."""
    sh = s.shape
    for hps, head_slices in s.head_options():
        for m in range(1, s.cap // head_slices + 1):
            lo = math.ceil(sh.q_tokens / m)
            if any(s.fits(hps, q) for q in (lo, lo + 1) if math.ceil(sh.q_tokens / q) == m):
                return True
    return False


@pytest.mark.parametrize("cap", [16, 63, 64, 256])
@pytest.mark.parametrize("mib", [64, 256, 1024, 4096])
def test_metal_search_is_exact_at_sd15_4096px(cap, mib):
    """The reported case: memslice-mps refusing at 4096 px although a 63-slice plan fit."""
    shape = Shape(16, 512 * 512, 512 * 512, 40, element_size=2, heads=8)
    for strategy in ("mps", "auto"):
        s = search(shape, mib * MiB, strategy, cap, EINSUM, "mps")
        plan = plan_attention(shape, mib * MiB, strategy=strategy, slice_cap=cap, kernel=EINSUM, device_kind="mps")
        assert (plan is not None) == _exists_large(s)
        if plan is not None:
            assert plan.queries_per_slice % MPS_BAD_MULTIPLE or plan.queries_per_slice == shape.q_tokens


def test_metal_element_limit_is_strict():
    """A slice of exactly 2^31 elements is refused on Metal even where 4 GiB of half precision would be allowed."""
    shape = Shape(1, 2**16, 2**15, 64, element_size=2, heads=1)  # one query row of scores: 2^15 elements
    s = search(shape, 1 << 50, "mps", 1 << 20, EINSUM, "mps")
    assert not s.fits(1, MPS_MAX_ELEMENTS // 2**15)
    assert s.fits(1, MPS_MAX_ELEMENTS // 2**15 - 1)


def test_a_probed_room_shrinks_with_the_layers_inputs_an_attention_budget_does_not():
    room = room_for("auto", GiB, 2.0, SD15_SELF.input_bytes)
    assert room.bytes_for(SD15_SELF) == GiB // 2
    bigger = shape_at_resolution(SD15_SELF, Geometry(8, True), 1024, 1024)
    assert room.bytes_for(bigger) == (GiB + SD15_SELF.input_bytes - bigger.input_bytes) // 2
    assert budget_room(GiB).bytes_for(bigger) == GiB
    assert room.limit().bytes_for(SD15_SELF) == GiB and budget_room(GiB).limit() == budget_room(GiB)


def test_the_smallest_peak_plan_runs_only_within_its_room():
    need = smallest_need(SD15_SELF, slice_cap=64, kernel=EINSUM)
    plan = smallest_peak_plan(SD15_SELF, need, slice_cap=64, kernel=EINSUM)
    assert plan is not None and plan.peak_bytes == need and plan.slices <= 64
    assert smallest_peak_plan(SD15_SELF, need - 1, slice_cap=64, kernel=EINSUM) is None
    assert plan_attention(SD15_SELF, need - 1, slice_cap=64, kernel=EINSUM) is None


@pytest.mark.parametrize("tokens", [77, 154, 231, 4097, 9801, 15625, 163 * 163])
def test_sizes_that_do_not_divide_still_slice(tokens):
    shape = Shape(16, tokens, tokens, 40, heads=8)
    budget = int(peak_bytes(shape, 16, tokens, EINSUM) * 0.6)
    for strategy in STRATEGY_NAMES:
        plan = plan_attention(shape, budget, strategy=strategy, kernel=EINSUM, device_kind="cuda")
        assert plan.slices > 1 and plan.peak_bytes <= budget, strategy


# --- what the error says ------------------------------------------------------------------------------------------


def test_the_error_carries_the_best_kernels_numbers():
    """SD1.5 2880 px level 0 with 1 GiB: einsum cannot fit under a cap of 64, the fused kernel can."""
    t = 360 * 360
    shape = Shape(16, t, t, 40, heads=8)
    room = room_for("auto", GiB, 1.0, shape.input_bytes)
    einsum_only = not_enough_memory(shape, room, (EINSUM,), slice_cap=64, geometry=Geometry(8, True))
    small = room_for("auto", 64 * MiB, 1.0, shape.input_bytes)
    both = not_enough_memory(shape, small, (FUSED, EINSUM), slice_cap=64, geometry=Geometry(8, True))
    assert einsum_only.kernel == "einsum" and einsum_only.need > 4 * GiB
    assert both.kernel == "fused" and both.need == smallest_need(shape, slice_cap=64, kernel=FUSED)
    assert both.max_resolution > 1000 and "largest query token count" not in str(both)


@pytest.mark.parametrize("kernels", [(EINSUM,), (FUSED, EINSUM)])
@pytest.mark.parametrize("mib", [16, 256, 1024])
@pytest.mark.parametrize("safety", [1.0, 3.3])
def test_the_largest_square_size_counts_the_layers_inputs_and_output(kernels, mib, safety):
    """At the size the error names, the layer's inputs plus its attention fit in what was free before them."""
    geometry = Geometry(8, True)
    free_after_inputs = mib * MiB
    room = room_for("auto", free_after_inputs, safety, SD15_SELF.input_bytes)
    free_before = free_after_inputs + SD15_SELF.input_bytes
    side = max_square_resolution(SD15_SELF, geometry, room, kernels, slice_cap=4096)
    assert side > 0 and side % 8 == 0

    def whole_call(px):  # inputs + the best plan's peak (output included) at the budget it would get, or None
        other = shape_at_resolution(SD15_SELF, geometry, px, px)
        budget = int((free_before - other.input_bytes) / safety)
        plans = [plan_attention(other, budget, kernel=k, slice_cap=4096) for k in kernels] if budget > 0 else []
        peaks = [p.peak_bytes for p in plans if p is not None]
        return other.input_bytes + min(peaks) if peaks else None

    assert whole_call(side) is not None and whole_call(side) <= free_before
    assert whole_call(side + 8) is None


def test_max_resolution_depends_on_the_layer_shape():
    budget = budget_room(512 * MiB)
    kernels = (EINSUM,)
    self_l0 = max_square_resolution(SD15_SELF, Geometry(8, True), budget, kernels, slice_cap=64)
    self_l1 = max_square_resolution(Shape(16, 1024, 1024, 80, heads=8), Geometry(16, True), budget, kernels,
                                    slice_cap=64)  # fmt: skip
    cross_l0 = max_square_resolution(Shape(16, 4096, 77, 40, heads=8), Geometry(8, False), budget, kernels,
                                     slice_cap=64)  # fmt: skip
    assert self_l0 < self_l1 < cross_l0


def test_an_untagged_call_gets_advice_it_can_act_on():
    e = not_enough_memory(SD15_SELF, 16 * MiB, (EINSUM,), slice_cap=64)
    text = str(e)
    assert "4096 query tokens" in text and "% of this image's area" in text and e.max_q_tokens < 4096
    assert "largest query token count" not in text


def test_advice_depends_on_where_the_room_came_from():
    probed = str(not_enough_memory(SD15_SELF, room_for("auto", 16 * MiB, 3.3, SD15_SELF.input_bytes), (EINSUM,),
                                   slice_cap=64))  # fmt: skip
    fixed = str(not_enough_memory(SD15_SELF, 16 * MiB, (EINSUM,), slice_cap=64))
    # a probed room is refused only past free memory itself: the safety factor is not the obstacle then
    assert "16.0 MiB is free" in probed and "free memory on the device" in probed and "safety factor" not in probed
    assert "the attention budget is" in fixed and "Attention budget (GiB)" in fixed and "safety factor" not in fixed
    # when finer slicing cannot help (the output alone is over), it is not suggested
    tiny = str(not_enough_memory(SD15_SELF, 1024, (EINSUM,), slice_cap=65536))
    assert "slice cap" not in tiny.split("To fit:")[1]


def test_the_error_after_retries_names_exactly_what_was_tried_and_what_stopped():
    tried = [Attempt("einsum", 16, 40 * MiB), Attempt("einsum", 32, 20 * MiB)]
    capped = str(out_of_memory(SD15_SELF, tried, "cap", free=GiB, slice_cap=32))
    assert "einsum kernel at 16 and 32 slices (predicted 40.0 MiB, 20.0 MiB)" in capped
    assert "slice cap (32)" in capped and "raise the slice cap" in capped
    memory = str(out_of_memory(SD15_SELF, tried, "memory", free=GiB, slice_cap=4096))
    assert "1.0 GiB free now" in memory and "raise the slice cap" not in memory
    fused = str(out_of_memory(SD15_SELF, [Attempt("fused", 1, 6 * MiB)], "output", free=GiB, slice_cap=4096))
    assert "fused kernel at 1 slice " in fused and "einsum" not in fused and "raise the slice cap" not in fused
    both = str(out_of_memory(SD15_SELF, [Attempt("fused", 1, 6 * MiB), Attempt("einsum", 1024, 7 * MiB)], "output",
                             free=None, slice_cap=4096))  # fmt: skip
    assert "fused kernel at 1 slice (predicted 6.0 MiB) and on the einsum kernel at 1024 slices" in both
    assert "Attention budget (GiB)" in both


@pytest.mark.parametrize("budget", [float("nan"), -5, 0, "x", None])
def test_garbage_budget_plans_nothing_but_never_crashes(budget):
    assert plan_attention(SD15_SELF, budget, kernel=EINSUM) is None


def test_empty_shapes_plan_trivially():
    for shape in (Shape(0, 10, 10, 8), Shape(4, 0, 10, 8), Shape(4, 10, 0, 8)):
        plan = plan_attention(shape, 1 * MiB)
        assert plan.slices == 1


def test_bad_shapes_and_names_are_rejected_clearly():
    with pytest.raises(ValueError, match="non-negative"):
        Shape(-1, 1, 1, 1)
    with pytest.raises(ValueError, match="divide"):
        Shape(10, 1, 1, 1, heads=3)
    with pytest.raises(ValueError, match="strategy"):
        plan_attention(SD15_SELF, GiB, strategy="nope")
    with pytest.raises(ValueError, match="kernel"):
        KernelChoice("cuda-magic")
    with pytest.raises(TypeError):
        plan_attention(SD15_SELF, GiB, kernel="einsum")


def test_not_enough_memory_is_a_runtime_error_with_numbers():
    e = not_enough_memory(SD15_SELF, 2 * MiB, (EINSUM,), slice_cap=64, site="x")
    assert isinstance(e, NotEnoughMemory) and isinstance(e, RuntimeError)
    assert e.need == smallest_need(SD15_SELF, slice_cap=64, kernel=EINSUM) and e.have == 2 * MiB
    assert e.site == "x" and e.q_tokens == 4096 and "at x:" in str(e)


def test_the_error_advises_a_higher_slice_cap_only_where_one_would_fit():
    """einsum under a low cap: a higher cap fits, so the advice names it; the fused kernel's output does not shrink
    with more slices, so there it must not (nor at the highest cap the settings allow)."""
    shape = SD15_SELF
    geometry = Geometry(8, True)
    low = not_enough_memory(shape, 32 * MiB, (EINSUM,), slice_cap=16, geometry=geometry)
    assert "raise the slice cap" in str(low)
    fused = not_enough_memory(shape, shape.output_bytes // 2, (FUSED,), slice_cap=16, geometry=geometry)
    assert "raise the slice cap" not in str(fused)
    top = not_enough_memory(shape, MiB // 4, (EINSUM,), slice_cap=MAX_SLICE_CAP, geometry=geometry)
    assert "raise the slice cap" not in str(top)


def test_metal_refuses_query_slices_that_are_multiples_of_4096():
    """The definition itself (what every search is checked against), and the solved search at the exact budget
    where 8192 queries would be the largest chunk: it must step down to 8191 (then even out), never up past the
    budget."""
    shape = Shape(1, 4 * MPS_BAD_MULTIPLE, 64, 8, heads=1)
    budget = peak_bytes(shape, 1, 2 * MPS_BAD_MULTIPLE, EINSUM)
    assert peak_bytes(shape, 1, 2 * MPS_BAD_MULTIPLE + 1, EINSUM) > budget
    metal, cuda = (search(shape, budget, "auto", 64, EINSUM, device) for device in ("mps", "cuda"))
    assert cuda.fits(1, 2 * MPS_BAD_MULTIPLE) and not metal.fits(1, 2 * MPS_BAD_MULTIPLE)
    assert metal.fits(1, 2 * MPS_BAD_MULTIPLE - 1)
    assert cuda.largest_queries(1) == 2 * MPS_BAD_MULTIPLE
    queries = metal.largest_queries(1)
    assert queries is not None and metal.fits(1, queries) and queries % MPS_BAD_MULTIPLE
    assert math.ceil(shape.q_tokens / queries) == 3  # 8191 -> 3 slices, evened out to 5462
    for strategy in ("mps", "auto"):
        plan = plan_attention(shape, budget, strategy=strategy, kernel=EINSUM, slice_cap=64, device_kind="mps")
        assert plan is not None and plan.peak_bytes <= budget and plan.queries_per_slice % MPS_BAD_MULTIPLE
