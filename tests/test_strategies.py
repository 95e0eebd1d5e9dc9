"""The strategies' rules and the promise built on them: no strategy slices more when it gets more room.

The promise holds by construction (slicing.py's module docstring): each rule's aim never rises with the room, the
smallest-peak plan does not depend on the room, and the search's count never rises with the room nor falls with
its floor. The tests check each part alone and the whole exhaustively on the published models' real call shapes.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lib_memslice import strategies
from lib_memslice.costs import EINSUM, FUSED, GiB, KernelChoice, MiB
from lib_memslice.costs import AttentionShape as Shape
from lib_memslice.models import BUILTIN
from lib_memslice.slicing import chunkings, plan_attention, plan_in, room_for, smallest_need

from .conftest import torch_threads
from .test_slicing import KERNELS, shapes

DEVICES = ("cpu", "cuda", "mps")
#: the einsum kernel as the device kinds run it (CPUs: a worker per thread, here two, each with its own buffers;
#: accelerators: a temporary and row statistics per output element)
EINSUM_ON = {
    "cpu": KernelChoice("einsum", workers=2),
    "cuda": KernelChoice("einsum", output_extra=3),
    "mps": KernelChoice("einsum", output_extra=3),
}


# --- each rule alone: its aim never rises with the room -----------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(shape=shapes, strategy=st.sampled_from(strategies.NAMES), kernel=st.sampled_from(KERNELS),
       device=st.sampled_from(DEVICES), rooms=st.lists(st.integers(0, 1 << 34), min_size=2, max_size=12))  # fmt: skip
def test_every_rules_aim_never_rises_with_the_room(shape, strategy, kernel, device, rooms):
    rule = strategies.RULES[strategy]
    aims = [rule(shape, room, kernel, device).slices for room in sorted(rooms)]
    assert aims == sorted(aims, reverse=True), aims
    settled = [room for room in sorted(rooms) if rule(shape, room, kernel, device).settled]
    if settled:  # once settled, every larger room gives the same aim
        assert len({rule(shape, room, kernel, device).slices for room in sorted(rooms) if room >= settled[0]}) == 1


# --- the search alone: monotone in the room and in its floor -----------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(shape=shapes, kernel=st.sampled_from(KERNELS), cap=st.integers(1, 80), device=st.sampled_from(DEVICES),
       floors=st.lists(st.integers(1, 60), min_size=2, max_size=5), rooms=st.lists(st.integers(1, 2 * MiB),
       min_size=2, max_size=5), prefer=st.integers(0, 6))  # fmt: skip
def test_the_searchs_count_never_rises_with_the_room_nor_falls_with_the_floor(shape, kernel, cap, device, floors,
                                                                               rooms, prefer):  # fmt: skip
    def count(room, floor):
        c = chunkings(shape, room, slice_cap=cap, kernel=kernel, device_kind=device)
        found = c.fewest(floor, prefer)
        return math.inf if found is None else c.slices(*found)

    for floor in floors:
        by_room = [count(room, floor) for room in sorted(rooms)]
        assert by_room == sorted(by_room, reverse=True)
    for room in rooms:
        by_floor = [count(room, floor) for floor in sorted(floors)]
        assert by_floor == sorted(by_floor)


def test_the_smallest_peak_plan_does_not_depend_on_the_room():
    shape = Shape(16, 9216, 9216, 40, heads=8)
    found = {chunkings(shape, room, slice_cap=1000, device_kind="mps").smallest_peak() for room in (0, MiB, 1 << 40)}
    assert len(found) == 1


# --- the whole: exhaustive over the published models' call shapes ------------------------------------------------


def _site_shapes():
    """Every distinct attention call of SD1.5, SD2 and SDXL (UNet and VAE) at 256-4096 px, fp16 and fp32."""
    seen = set()
    for name, spec in BUILTIN.items():
        for site in spec.sites:
            for side in (256, 512, 768, 1024, 1536, 2048, 3072, 4096):
                for element in (2, 4):
                    shape = site.shape(side, side, element_size=element)
                    key = (shape, site.name.split(".")[0])
                    if key not in seen:
                        seen.add(key)
                        yield pytest.param(shape, id=f"{name}-{site.name}-{side}px-{element}B")


LADDER = 2 ** (1 / 16)  # about 4.4 % a step


def _ladder(shape, kernel, cap, device):
    """Rooms from half the smallest need to twice the unsliced peak, 16 steps per doubling."""
    low = max(1, smallest_need(shape, slice_cap=cap, kernel=kernel, device_kind=device) // 2)
    high = 2 * (shape.score_bytes * 3 + shape.output_bytes + (1 << 20))
    steps = int(math.log(high / low, LADDER)) + 1
    return [int(low * LADDER**i) for i in range(steps + 1)]


@pytest.mark.parametrize("shape", list(_site_shapes()))
def test_no_strategy_slices_more_with_more_room_on_any_published_call(shape):
    """Sizes 256-4096 px, every UNet and VAE site of SD1.5 / SD2 / SDXL, fp16 and fp32, the einsum and fused
    kernels, caps 64 / 1000 / 4096, every strategy and device kind, rooms on a 4.4 % geometric ladder."""
    for device in DEVICES:
        for kernel in (EINSUM_ON[device], FUSED):
            for cap in (64, 1000, 4096):
                rooms = _ladder(shape, kernel, cap, device)
                for strategy in strategies.NAMES:
                    counts = []
                    for room in rooms:
                        plan = plan_attention(shape, room, strategy=strategy, slice_cap=cap, kernel=kernel,
                                              device_kind=device)  # fmt: skip
                        counts.append(math.inf if plan is None else plan.slices)
                    assert counts == sorted(counts, reverse=True), (strategy, device, kernel.kind, cap, counts)


@pytest.mark.parametrize(
    ("strategy", "element", "kernel", "device", "cap", "rooms"),
    [
        ("heads", 2, EINSUM_ON["cuda"], "cuda", 4096, (22, 23)),  # was 2341 slices at 22 MiB, 2768 at 23
        ("auto", 4, EINSUM, "cpu", 1000, (56, 57)),  # was 512 slices at 56 MiB, 1000 at 57
    ],
)
def test_the_published_counterexamples(strategy, element, kernel, device, cap, rooms):
    """SD1.5 1024 px level-0 self-attention, where the old interplay of preferences and fallbacks sliced more with
    more memory."""
    shape = Shape(16, 16384, 16384, 40, element_size=element, heads=8)
    plans = [plan_attention(shape, mib * MiB, strategy=strategy, kernel=kernel, device_kind=device, slice_cap=cap)
             for mib in range(rooms[0] - 4, rooms[1] + 5)]  # fmt: skip
    counts = [math.inf if plan is None else plan.slices for plan in plans]
    assert counts == sorted(counts, reverse=True), counts
    assert all(plan is not None for plan in plans[4:])


# --- the rules' own plans -----------------------------------------------------------------------------------------


def webui_doggettx_slices(shape, free):
    """webui 1.10.1 split_cross_attention_forward: slices it runs for this free memory (facts, our code)."""
    modifier = 3 if shape.element_size == 2 else 2.5
    required = shape.score_bytes * modifier
    steps = 1 if required <= free else 2 ** math.ceil(math.log2(required / free))
    size = shape.q_tokens // steps
    return math.ceil(shape.q_tokens / size)


def webui_invokeai_slices(shape, free):
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
def test_the_webuis_rules_give_the_webuis_slice_counts(shape):
    """At the default safety factor memslice-doggettx and memslice-invokeai run the webui's own slice counts for
    the same free memory (the room is all of it: the rules keep their own margin)."""
    for free_gib in (0.5, 1, 2, 3, 6, 12, 24):
        free = int(free_gib * GiB)
        for strategy, webui in (("doggettx", webui_doggettx_slices), ("invokeai", webui_invokeai_slices)):
            room = room_for(strategy, free, 3.3, shape.input_bytes)
            plan = plan_attention(shape, room.bytes_for(shape), strategy=strategy, kernel=EINSUM, device_kind="cuda")
            expected = webui(shape, free)
            if expected <= 4096:
                assert plan is not None and plan.slices == expected, (strategy, free_gib, plan)


@pytest.mark.parametrize("safety", [1.0, 2.0, 3.3, 6.6])
def test_no_strategys_room_is_more_than_free_memory(safety):
    """The webui's rules plan in free x 3.3 / safety factor, but never in more than free memory; memslice's own
    strategies in free / safety factor."""
    tiny = Shape(1, 1, 1, 1)
    free = 1000 * MiB
    for strategy in strategies.NAMES:
        room = room_for(strategy, free, safety).bytes_for(tiny)
        divisor = max(1.0, safety / 3.3) if strategy in strategies.WEBUI_RULES else safety
        assert room == int((free - tiny.input_bytes) / divisor) <= free


@pytest.mark.parametrize("strategy", ["doggettx", "invokeai"])
def test_at_a_safety_factor_of_one_the_webuis_rules_peak_within_free_memory(strategy):
    """The reported case: peaks of 1.12-1.16 x free memory when these rules planned in free x 3.3."""
    for shape in SD_SHAPES:
        for free in (64 * MiB, 256 * MiB, GiB):
            room = room_for(strategy, free, 1.0, shape.input_bytes)
            plan = plan_attention(shape, room.bytes_for(shape), strategy=strategy, kernel=EINSUM, device_kind="cuda")
            assert plan is None or plan.peak_bytes + shape.input_bytes <= free + shape.input_bytes


def test_the_einsum_kernel_on_cpus_aims_at_cache_sized_one_head_slices_and_gpus_at_the_fewest():
    shape = Shape(16, 4096, 4096, 40, heads=8)
    cpu = plan_attention(shape, 64 * GiB, kernel=EINSUM, device_kind="cpu")
    assert cpu.heads_per_slice == 1 and cpu.stable
    target = strategies.CPU_EINSUM_TARGET_BYTES[4]
    assert cpu.queries_per_slice * 4096 * 4 <= target < 2 * cpu.queries_per_slice * 4096 * 4
    # at least CPU_EINSUM_MIN_QUERIES queries where the keys would fill the buffer with fewer; bfloat16's own target
    long = plan_attention(Shape(16, 16384, 16384, 40, heads=8), 64 * GiB, kernel=EINSUM, device_kind="cpu")
    assert long.heads_per_slice == 1 and long.queries_per_slice == strategies.CPU_EINSUM_MIN_QUERIES
    half = plan_attention(Shape(16, 4096, 4096, 40, 40, 2, heads=8), 64 * GiB, kernel=EINSUM, device_kind="cpu")
    assert half.queries_per_slice * 4096 * 2 == strategies.CPU_EINSUM_TARGET_BYTES[2]
    assert plan_attention(shape, 64 * GiB, kernel=EINSUM, device_kind="cuda").slices == 1
    tight = plan_attention(shape, 2 * MiB + shape.output_bytes, kernel=EINSUM, device_kind="cpu")
    assert tight.heads_per_slice == 1 and tight.slices > cpu.slices  # still one head per slice, fewer queries
    assert tight.peak_bytes <= 2 * MiB + shape.output_bytes and not tight.stable


def test_the_heads_rule_is_half_the_heads_per_slice():
    shape = Shape(16, 4096, 4096, 40, heads=8)
    plan = plan_attention(shape, 8 * GiB, strategy="heads", kernel=EINSUM, device_kind="cuda")
    assert plan.heads_per_slice == 4 and plan.slices == 4 and plan.stable  # diffusers: slices of heads // 2 rows
    for mib in (200, 50, 20):  # fewest slices that fit, rows as close to half the heads as fit
        tighter = plan_attention(shape, mib * MiB, strategy="heads", kernel=EINSUM, device_kind="cuda")
        assert tighter.slices >= 4 and tighter.peak_bytes <= mib * MiB
    assert tighter.slices > 4


def test_the_mps_rule_keeps_metals_limits_on_any_device():
    big = Shape(16, 16384, 16384, 40, heads=8)
    for device in DEVICES:
        plan = plan_attention(big, 64 * GiB, strategy="mps", kernel=EINSUM, device_kind=device)
        assert plan.queries_per_slice % 4096 != 0
        assert min(plan.heads_per_slice, 8) * plan.queries_per_slice * 16384 < 2**31


def test_fused_kernels_are_sliced_only_as_the_cost_model_needs():
    """Every strategy but the per-head one, whose rule is the slice shape itself (diffusers slices heads)."""
    shape = Shape(16, 4096, 4096, 40, heads=8)
    for strategy in strategies.NAMES:
        plan = plan_attention(shape, 256 * MiB, strategy=strategy, kernel=FUSED)
        assert plan.slices == (4 if strategy == "heads" else 1), strategy


# --- whole calls: the chain of kernels and the rules' large-score branches ----------------------------------------

#: shapes whose scores reach tens of MiB to GiB with few queries: every branch of every rule (InvokeAI's budget in
#: whole MB, its divisor past the rows and past the queries)
big_scores = st.builds(
    lambda b, h, nq, nk, es: Shape(b * h, nq, nk, 8, element_size=es, heads=h),
    st.integers(1, 4),
    st.integers(1, 8),
    st.integers(1, 64),
    st.integers(1 << 14, 1 << 21),
    st.sampled_from([2, 4]),
)


@settings(max_examples=300, deadline=None)
@given(shape=big_scores, strategy=st.sampled_from(strategies.NAMES), device=st.sampled_from(DEVICES),
       rooms=st.lists(st.floats(20, 36), min_size=2, max_size=10))  # fmt: skip
def test_every_rules_aim_never_rises_with_the_room_at_large_scores(shape, strategy, device, rooms):
    """Rooms from 1 MiB to 64 GiB (log-uniform) against scores of up to GiB: the rules' branches that scores
    under 1 MiB never reach."""
    rule = strategies.RULES[strategy]
    aims = [rule(shape, int(2**r), EINSUM_ON[device], device).slices for r in sorted(rooms)]
    assert aims == sorted(aims, reverse=True), aims


def test_the_invokeai_aim_past_the_query_count():
    """The webui's InvokeAI divides queries once its divisor passes the rows: with 2 queries and 3 rows a divisor
    of 4 gave 2 slices and, in a larger room, a divisor of 2 gave 3 (the published counterexample)."""
    shape = Shape(3, 2, 1048576, 8, heads=3)
    counts = []
    for kib in range(30000, 42000, 128):
        plan = plan_attention(shape, kib * 1024, strategy="invokeai", kernel=EINSUM_ON["cuda"], device_kind="cuda")
        counts.append(math.inf if plan is None else plan.slices)
    assert counts == sorted(counts, reverse=True), counts
    assert strategies.invokeai(shape, 38656 * 1024, EINSUM_ON["cuda"], "cuda").slices == 3


def _cpu_chain(first, threads=2):
    """The chain a CPU call tries (kernels.kernels_after) with a worker per thread."""
    import torch

    from lib_memslice import kernels

    with torch_threads(threads):
        einsum = kernels.einsum_kernel("cpu", torch.float32)
        return kernels.kernels_after(einsum if first == "einsum" else FUSED, "auto", "cpu", torch.float32, False)


CHAIN_SHAPES = [Shape(16, 4096, 4096, 40, heads=8), Shape(16, 16384, 16384, 40, heads=8), Shape(1, 16384, 16384, 512)]


@pytest.mark.parametrize("first", ["einsum", "fused"])
@pytest.mark.parametrize("shape", CHAIN_SHAPES, ids=lambda s: f"{s.batch_heads}x{s.q_tokens}")
def test_no_call_slices_more_with_more_free_memory_over_its_kernel_chain(first, shape):
    """What a call runs (slicing.plan_in over the whole chain: a worker per thread, one worker, the leanest; the
    over-margin plan where only the safety factor refuses) never has more slices with more free memory. It did:
    SD1.5's level-0 self-attention at 512 px went from 912 slices (one worker) to 4096 (two) when 16 KiB more
    were free, since the first kernel that fit was taken."""
    chain = _cpu_chain(first)
    assert len(chain) >= 3
    low = smallest_need(shape, slice_cap=4096, kernel=chain[-1], device_kind="cpu") // 2
    frees = [int(low * LADDER**i) for i in range(int(math.log(64 * shape.score_bytes / low, LADDER)))]
    frees += list(range(40878080 - 64 * 1024, 40894464 + 64 * 1024, 4096))
    for strategy in strategies.NAMES:
        for cap in (1000, 4096):
            counts = []
            for free in sorted(frees):
                room = room_for(strategy, free, 3.3)
                plan, _ = plan_in(shape, room, chain, strategy=strategy, slice_cap=cap, device_kind="cpu")
                counts.append(math.inf if plan is None else plan.slices)
            assert counts == sorted(counts, reverse=True), (strategy, cap, counts)
