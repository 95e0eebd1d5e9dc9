"""The slicing planner: pure arithmetic, so its promises are checked against brute force."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lib_memslice.costs import EINSUM, FUSED, GiB, KernelChoice, MiB, peak_bytes
from lib_memslice.costs import AttentionShape as Shape
from lib_memslice.slicing import (
    MAX_SLICE_CAP,
    MPS_BAD_MULTIPLE,
    MPS_MAX_ELEMENTS,
    SEED_SAFETY,
    STRATEGY_NAMES,
    Geometry,
    NotEnoughMemory,
    Room,
    _search,
    finest_need,
    max_square_resolution,
    not_enough_memory,
    plan_attention,
    shape_at_resolution,
    strategy_room,
)

SD15_SELF = Shape(16, 4096, 4096, 40, heads=8)  # SD1.5 512 px level 0, cond + uncond
KERNELS = (
    EINSUM,
    FUSED,
    KernelChoice("fused", workspace=3000, input_copies=1),
    KernelChoice("sdpa-math"),
    KernelChoice("einsum", accumulator=5),
    KernelChoice("fused", accumulator=4, input_copies=0),
)
DEVICES = ("cpu", "cuda", "mps")


def search(shape, budget, strategy="auto", cap=4096, kernel=EINSUM, device="cpu", min_slices=1):
    return _search(shape, budget, strategy=strategy, slice_cap=cap, kernel=kernel, device_kind=device,
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
    budget=st.integers(1, 2 * MiB),
    strategy=st.sampled_from(STRATEGY_NAMES),
    kernel=st.sampled_from(KERNELS),
    cap=st.integers(1, 80),
    device=st.sampled_from(DEVICES),
    min_slices=st.sampled_from([1, 1, 2, 5]),
)


@settings(max_examples=250, deadline=None)
@given(shape=shapes, **common)
def test_a_plan_fits_and_none_is_refused_while_any_fits(shape, budget, strategy, kernel, cap, device, min_slices):
    """Exactness, every strategy (Metal's rules included): a plan fits; None only when no chunking fits."""
    plan = plan_attention(shape, budget, strategy=strategy, kernel=kernel, slice_cap=cap, device_kind=device,
                          min_slices=min_slices)  # fmt: skip
    s = search(shape, budget, strategy, cap, kernel, device, min_slices)
    if plan is None:
        assert next(fitting(s), None) is None
        return
    assert s.fits(plan.heads_per_slice, plan.queries_per_slice)
    assert plan.peak_bytes == peak_bytes(shape, plan.heads_per_slice, plan.queries_per_slice, kernel) <= budget
    assert min_slices <= plan.slices <= cap
    # ceil division: the slices cover the tensor, the last one may be short
    assert plan.query_slices == math.ceil(shape.q_tokens / plan.queries_per_slice)
    assert plan.head_slices == math.ceil(shape.batch_heads / plan.heads_per_slice)


@settings(max_examples=200, deadline=None)
@given(shape=shapes, budget=common["budget"], kernel=common["kernel"], cap=common["cap"],
       device=st.sampled_from(["cuda", "mps"]), at_least=st.integers(1, 40))  # fmt: skip
def test_fewest_is_the_true_minimum(shape, budget, kernel, cap, device, at_least):
    s = search(shape, budget, "auto", cap, kernel, device)
    found = s.fewest(at_least)
    best = min((n for _h, _q, n in fitting(s) if n >= at_least), default=None)
    assert (None if found is None else s.slices(*found)) == best
    if found is not None:
        assert s.fits(*found)


@settings(max_examples=150, deadline=None)
@given(shape=shapes, strategy=common["strategy"], kernel=common["kernel"], cap=common["cap"],
       device=common["device"], budgets=st.lists(st.integers(1, 2 * MiB), min_size=2, max_size=8))  # fmt: skip
def test_slice_counts_never_grow_with_the_budget(shape, strategy, kernel, cap, device, budgets):
    counts = []
    for budget in sorted(budgets):
        plan = plan_attention(shape, budget, strategy=strategy, kernel=kernel, slice_cap=cap, device_kind=device)
        counts.append(None if plan is None else plan.slices)
    fitted = [n for n in counts if n is not None]
    assert fitted == sorted(fitted, reverse=True), counts
    assert counts[counts.index(fitted[0]) :] == fitted if fitted else True  # once it fits, it keeps fitting


@pytest.mark.parametrize(
    ("strategy", "kernel"),
    [("doggettx", EINSUM), ("mps", EINSUM), ("doggettx", FUSED), ("auto", EINSUM), ("invokeai", EINSUM)],
)
def test_slice_counts_at_sd15_1304px_fall_as_the_budget_grows(strategy, kernel):
    """The reported regression: at 16 x 26569 x 26569 the counts went 496 -> 2044 from 256 to 384 MiB."""
    shape = Shape(16, 26569, 26569, 40, heads=8)
    counts = []
    for mib in (128, 192, 256, 320, 384, 512, 768, 1024, 2048, 8192):
        plan = plan_attention(shape, mib * MiB, strategy=strategy, kernel=kernel, device_kind="cuda")
        counts.append(None if plan is None else plan.slices)
    fitted = [n for n in counts if n is not None]
    assert fitted and fitted == sorted(fitted, reverse=True), counts


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


def test_fused_kernel_needs_no_slicing_at_sd15_512():
    plan = plan_attention(SD15_SELF, 64 * MiB, kernel=FUSED)
    assert plan.slices == 1 and plan.stable


def test_einsum_on_cpu_prefers_cache_sized_slices_and_gpus_the_fewest():
    cpu = plan_attention(SD15_SELF, 64 * GiB, kernel=EINSUM, device_kind="cpu")
    assert cpu.heads_per_slice == 1 and cpu.queries_per_slice * 4096 * 4 <= 8 * MiB and cpu.stable
    gpu = plan_attention(SD15_SELF, 64 * GiB, kernel=EINSUM, device_kind="cuda")
    assert gpu.slices == 1
    # a tighter budget keeps one head per slice (the fast shape) with fewer queries
    tight = plan_attention(SD15_SELF, 4 * MiB + SD15_SELF.output_bytes, kernel=EINSUM, device_kind="cpu")
    assert tight.heads_per_slice == 1 and tight.slices > cpu.slices
    assert tight.peak_bytes <= 4 * MiB + SD15_SELF.output_bytes


# --- the seed rules, reproduced -------------------------------------------------------------------------------


def seed_doggettx_slices(shape, free):
    """webui 1.10.1 split_cross_attention_forward: slices it runs for this free memory (facts, our code)."""
    modifier = 3 if shape.element_size == 2 else 2.5
    required = shape.score_bytes * modifier
    steps = 1 if required <= free else 2 ** math.ceil(math.log2(required / free))
    size = shape.q_tokens // steps
    return math.ceil(shape.q_tokens / size)


def seed_invokeai_slices(shape, free):
    """webui 1.10.1 einsum_op_cuda / einsum_op_tensor_mem with a tensor budget of free / 3.3."""
    max_mb = free / 3.3 / MiB
    size_mb = shape.score_bytes // MiB
    if size_mb <= max_mb:
        return 1
    div = 1 << int((size_mb - 1) / max_mb).bit_length()
    if div <= shape.batch_heads:
        return math.ceil(shape.batch_heads / (shape.batch_heads // div))
    return math.ceil(shape.q_tokens / max(shape.q_tokens // div, 1))


SD_SHAPES = [Shape(2 * 8, t * t, t * t, 40, element_size=es, heads=8) for t in (64, 96, 128, 163) for es in (2, 4)] + [
    Shape(2 * 5, t * t, t * t, 64, element_size=2, heads=5) for t in (96, 120)
]


@pytest.mark.parametrize("shape", SD_SHAPES, ids=lambda s: f"{s.batch_heads}x{s.q_tokens}x{s.element_size}B")
def test_doggettx_and_invokeai_reproduce_the_seed_at_default_settings(shape):
    for free_gib in (0.5, 1, 2, 3, 6, 12, 24):
        free = int(free_gib * GiB)
        budget = int(free / SEED_SAFETY)  # the default safety factor
        for strategy, seed in (("doggettx", seed_doggettx_slices), ("invokeai", seed_invokeai_slices)):
            room = strategy_room(strategy, budget, free_bytes=free, safety_factor=3.3, inputs_bytes=shape.input_bytes)
            plan = plan_attention(shape, room.budget(shape), strategy=strategy, kernel=EINSUM, device_kind="cuda")
            expected = seed(shape, free)
            if expected <= 4096:
                assert plan is not None and plan.slices == expected, (strategy, free_gib, plan)


def test_seed_strategies_see_free_memory_unless_the_budget_is_fixed():
    tiny = Shape(1, 1, 1, 1)
    for strategy, expected in (("doggettx", 330), ("invokeai", 330), ("auto", 100), ("heads", 100)):
        assert strategy_room(strategy, 100, inputs_bytes=tiny.input_bytes).budget(tiny) == expected
    assert strategy_room("doggettx", 100, fixed=True).budget(tiny) == 100
    assert strategy_room("doggettx", 303, free_bytes=1000, safety_factor=3.3).budget(Shape(0, 0, 0, 0)) == 1000
    assert strategy_room("invokeai", 151, free_bytes=1000, safety_factor=6.6).budget(Shape(0, 0, 0, 0)) == 500
    assert strategy_room("auto", 303, free_bytes=1000, safety_factor=3.3).budget(Shape(0, 0, 0, 0)) == 303


def test_a_probed_room_shrinks_with_the_layers_inputs_a_fixed_one_does_not():
    room = strategy_room("auto", 0, free_bytes=GiB, safety_factor=2.0, inputs_bytes=SD15_SELF.input_bytes)
    assert room.budget(SD15_SELF) == GiB // 2
    bigger = shape_at_resolution(SD15_SELF, Geometry(8, True), 1024, 1024)
    assert room.budget(bigger) == (GiB + SD15_SELF.input_bytes - bigger.input_bytes) // 2
    assert Room(GiB, fixed=True).budget(bigger) == GiB


def test_seed_strategies_on_a_fused_kernel_slice_only_as_the_cost_model_needs():
    for strategy in ("doggettx", "invokeai"):
        assert plan_attention(SD15_SELF, 256 * MiB, strategy=strategy, kernel=FUSED).slices == 1


def test_heads_strategy_is_half_the_heads_then_one():
    plan = plan_attention(SD15_SELF, 8 * GiB, strategy="heads", kernel=EINSUM, device_kind="cuda")
    assert plan.heads_per_slice == 4 and plan.slices == 4  # diffusers: slices of heads // 2 rows
    plan = plan_attention(SD15_SELF, 200 * MiB, strategy="heads", kernel=EINSUM, device_kind="cuda")
    assert plan.heads_per_slice == 1


def test_mps_rules():
    small = Shape(16, 4096, 4096, 40, heads=8)  # 16 x 4096 = 2^16 rows: the seed never slices
    assert plan_attention(small, 8 * GiB, strategy="mps", kernel=EINSUM, device_kind="mps").slices == 1
    big = Shape(16, 16384, 16384, 40, heads=8)
    for strategy in ("mps", "auto"):
        plan = plan_attention(big, 64 * GiB, strategy=strategy, kernel=EINSUM, device_kind="mps")
        assert plan.queries_per_slice % 4096 != 0
        assert min(plan.heads_per_slice, 8) * plan.queries_per_slice * 16384 < 2**31


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
    room = strategy_room("auto", GiB, inputs_bytes=shape.input_bytes)
    einsum_only = not_enough_memory(shape, room, (EINSUM,), slice_cap=64, geometry=Geometry(8, True))
    small = strategy_room("auto", 64 * MiB, inputs_bytes=shape.input_bytes)
    both = not_enough_memory(shape, small, (FUSED, EINSUM), slice_cap=64, geometry=Geometry(8, True))
    assert einsum_only.kernel == "einsum" and einsum_only.need > 4 * GiB
    assert both.kernel == "fused" and both.need == finest_need(shape, slice_cap=64, kernel=FUSED)
    assert both.max_resolution > 1000 and "largest query token count" not in str(both)


@pytest.mark.parametrize("kernels", [(EINSUM,), (FUSED, EINSUM)])
@pytest.mark.parametrize("mib", [16, 256, 1024])
@pytest.mark.parametrize("safety", [1.0, 3.3])
def test_the_largest_square_size_counts_the_layers_inputs_and_output(kernels, mib, safety):
    """At the size the error names, the layer's inputs plus its attention fit in what was free before them."""
    geometry = Geometry(8, True)
    free_after_inputs = mib * MiB
    room = strategy_room("auto", 0, free_bytes=free_after_inputs, safety_factor=safety,
                         inputs_bytes=SD15_SELF.input_bytes)  # fmt: skip
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
    budget = Room(512 * MiB, fixed=True)
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


def test_advice_depends_on_how_the_budget_was_set():
    probed = str(not_enough_memory(SD15_SELF, strategy_room("auto", 16 * MiB), (EINSUM,), slice_cap=64))
    fixed = str(not_enough_memory(SD15_SELF, 16 * MiB, (EINSUM,), slice_cap=64))
    # a probed budget is refused only past free memory itself: the safety factor is not the obstacle then
    assert "is free" in probed and "free memory on the device" in probed and "safety factor" not in probed
    assert "the budget is" in fixed and "Memory budget (GiB)" in fixed and "safety factor" not in fixed
    # when finer slicing cannot help (the output alone is over), it is not suggested
    tiny = str(not_enough_memory(SD15_SELF, 1024, (EINSUM,), slice_cap=65536))
    assert "slice cap" not in tiny.split("To fit:")[1]


def test_retries_are_named_in_the_error():
    e = not_enough_memory(SD15_SELF, 8 * GiB, (EINSUM,), slice_cap=64, min_slices=128)
    assert "retries" in str(e)


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
    e = NotEnoughMemory(2 * GiB, GiB, site="x", slice_cap=64)
    assert isinstance(e, RuntimeError) and e.need == 2 * GiB and e.have == GiB and "2.0 GiB" in str(e)


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
