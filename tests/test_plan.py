"""The planner: pure arithmetic, so its promises are checked exhaustively against brute force."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lib_memslice.plan import (
    KERNEL_KINDS,
    MPS_BAD_MULTIPLE,
    STRATEGY_NAMES,
    AttentionShape,
    Geometry,
    GiB,
    MiB,
    NotEnoughMemory,
    head_options,
    max_square_resolution,
    peak_bytes,
    plan_attention,
)

SD15_SELF = AttentionShape(16, 4096, 4096, 40, heads=8)  # SD1.5 512 px, cond + uncond


def all_chunkings(shape, cap):
    """Every (head_chunk, query_chunk) the kernels can run with at most ``cap`` steps."""
    for head_chunk, head_steps in head_options(shape):
        for query_steps in range(1, shape.q_tokens + 1):
            qc = math.ceil(shape.q_tokens / query_steps)
            if head_steps * math.ceil(shape.q_tokens / qc) <= cap:
                yield head_chunk, qc, head_steps * math.ceil(shape.q_tokens / qc)


shapes = st.builds(
    lambda b, h, nq, nk, d, es, up: AttentionShape(
        b * h, nq, nk, d, element_size=4 if up else es, io_element_size=es, heads=h
    ),
    st.integers(1, 3),
    st.integers(1, 6),
    st.integers(1, 300),
    st.integers(1, 300),
    st.sampled_from([1, 8, 40, 64]),
    st.sampled_from([2, 4, 8]),
    st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(
    shape=shapes,
    budget=st.integers(1, 8 * MiB),
    strategy=st.sampled_from(STRATEGY_NAMES),
    kernel=st.sampled_from(KERNEL_KINDS),
    cap=st.integers(1, 64),
    device=st.sampled_from(["cpu", "cuda", "mps"]),
)
def test_plan_fits_or_nothing_fits(shape, budget, strategy, kernel, cap, device):
    """A returned plan fits; NotEnoughMemory only when no chunking under the cap fits (any strategy)."""
    try:
        plan = plan_attention(shape, budget, strategy=strategy, kernel=kernel, slice_cap=cap, device_kind=device)
    except NotEnoughMemory as e:
        assert e.have == budget
        assert e.need > budget
        for hc, qc, _steps in all_chunkings(shape, cap):
            assert peak_bytes(shape, hc, qc, kernel) > budget or (device == "mps" or strategy == "mps")
        return
    assert plan.peak_bytes <= budget
    assert plan.steps <= cap
    assert plan.peak_bytes == peak_bytes(shape, plan.head_chunk, plan.query_chunk, kernel)
    # ceil division: the chunks cover the tensor, the last one may be short
    assert plan.query_steps == math.ceil(shape.q_tokens / plan.query_chunk)
    assert (plan.query_steps - 1) * plan.query_chunk < shape.q_tokens
    assert plan.head_chunk <= shape.heads or plan.head_chunk % shape.heads == 0
    if device == "mps" or strategy == "mps":
        assert plan.query_chunk % MPS_BAD_MULTIPLE != 0 or plan.query_chunk == shape.q_tokens


@settings(max_examples=200, deadline=None)
@given(shape=shapes, budget=st.integers(1, 4 * MiB), kernel=st.sampled_from(KERNEL_KINDS), cap=st.integers(1, 64))
def test_auto_takes_the_fewest_steps(shape, budget, kernel, cap):
    try:
        plan = plan_attention(shape, budget, strategy="auto", kernel=kernel, slice_cap=cap)
    except NotEnoughMemory:
        return
    best = min(
        (steps for hc, qc, steps in all_chunkings(shape, cap) if peak_bytes(shape, hc, qc, kernel) <= budget),
        default=None,
    )
    if kernel == "fused" and plan.steps == 1:
        return
    assert plan.steps == best


def test_fused_kernel_needs_no_slicing_at_sd15_512():
    plan = plan_attention(SD15_SELF, 64 * MiB, strategy="auto", kernel="fused")
    assert plan.steps == 1
    assert "fused" in plan.reason


def test_einsum_at_sd15_512_slices_to_fit():
    plan = plan_attention(SD15_SELF, 256 * MiB, strategy="auto", kernel="einsum")
    assert 1 < plan.steps <= 64
    assert plan.peak_bytes <= 256 * MiB
    # the stock peak would be two 1 GiB score matrices
    assert peak_bytes(SD15_SELF, 16, 4096, "einsum") >= 2 * GiB


def test_doggettx_uses_power_of_two_query_steps_from_its_estimate():
    # score 1 GiB x 2.5 (4-byte) = 2.5 GiB over a 1 GiB budget -> 4 steps
    plan = plan_attention(SD15_SELF, 1 * GiB, strategy="doggettx", kernel="einsum")
    assert plan.head_chunk == 16 and plan.query_steps == 4
    # 2-byte elements use the 3x estimate: 0.5 GiB x 3 = 1.5 GiB over 1 GiB -> 2 steps
    half = AttentionShape(16, 4096, 4096, 40, element_size=2, heads=8)
    assert plan_attention(half, 1 * GiB, strategy="doggettx", kernel="einsum").query_steps == 2


def test_invokeai_slices_heads_before_queries():
    plan = plan_attention(SD15_SELF, 256 * MiB, strategy="invokeai", kernel="einsum")
    assert plan.query_steps == 1 and plan.head_steps > 1
    tight = plan_attention(SD15_SELF, 50 * MiB, strategy="invokeai", kernel="einsum")
    assert tight.head_chunk == 1 and tight.query_steps > 1


def test_heads_strategy_is_half_the_heads_then_one():
    plan = plan_attention(SD15_SELF, 8 * GiB, strategy="heads", kernel="einsum")
    assert plan.head_chunk == 4 and plan.steps == 4  # half of 8 heads, for each of 2 items
    plan = plan_attention(SD15_SELF, 200 * MiB, strategy="heads", kernel="einsum")
    assert plan.head_chunk == 1


def test_mps_rules():
    small = AttentionShape(16, 4096, 4096, 40, heads=8)  # 16 x 4096 = 2^16 rows: the seed never slices
    assert plan_attention(small, 8 * GiB, strategy="mps", kernel="einsum").steps == 1
    big = AttentionShape(16, 16384, 16384, 40, heads=8)
    plan = plan_attention(big, 64 * GiB, strategy="mps", kernel="einsum")
    assert plan.query_chunk % 4096 != 0
    assert plan.head_chunk * plan.query_chunk * 16384 < 2**31  # Metal's per-tensor limit
    # the limits hold on an mps device whatever the strategy
    plan = plan_attention(big, 64 * GiB, strategy="auto", kernel="einsum", device_kind="mps")
    assert plan.head_chunk * plan.query_chunk * 16384 < 2**31


@pytest.mark.parametrize("tokens", [77, 154, 231, 4097, 9801, 15625])
def test_sizes_that_do_not_divide_still_slice(tokens):
    shape = AttentionShape(16, tokens, tokens, 40, heads=8)
    budget = int(peak_bytes(shape, 16, tokens, "einsum") * 0.6)
    for strategy in STRATEGY_NAMES:
        plan = plan_attention(shape, budget, strategy=strategy, kernel="einsum", slice_cap=4096)
        assert plan.steps > 1, strategy
        assert plan.peak_bytes <= budget


def test_hires_upscale_2_55x_does_not_fall_back_to_unsliced():
    # 512 px x 2.55 = 1305.6 -> 1304 px; latent 163 x 163 tokens: the seed's Doggettx could not divide this
    tokens = 163 * 163
    shape = AttentionShape(16, tokens, tokens, 40, heads=8)
    plan = plan_attention(shape, 2 * GiB, strategy="doggettx", kernel="einsum", slice_cap=64)
    assert plan.steps > 1 and plan.peak_bytes <= 2 * GiB


def test_not_enough_memory_message_has_need_have_and_resolution():
    geometry = Geometry(8, True)
    with pytest.raises(NotEnoughMemory) as info:
        plan_attention(SD15_SELF, 16 * MiB, kernel="einsum", geometry=geometry, site="unet.level0.self")
    e = info.value
    assert e.need > e.have == 16 * MiB
    assert e.max_resolution is not None and 0 < e.max_resolution < 512 and e.max_resolution % 8 == 0
    text = str(e)
    assert "unet.level0.self" in text and "16.0 MiB" in text and f"{e.max_resolution}x{e.max_resolution}" in text
    # the resolution it names really fits, and one step (8 px) more does not
    fits = AttentionShape(16, (e.max_resolution // 8) ** 2, (e.max_resolution // 8) ** 2, 40, heads=8)
    plan_attention(fits, 16 * MiB, kernel="einsum")
    over = AttentionShape(16, (e.max_resolution // 8 + 1) ** 2, (e.max_resolution // 8 + 1) ** 2, 40, heads=8)
    with pytest.raises(NotEnoughMemory):
        plan_attention(over, 16 * MiB, kernel="einsum")


def test_max_resolution_depends_on_the_layer_shape():
    budget = 512 * MiB
    self_l0 = max_square_resolution(SD15_SELF, Geometry(8, True), budget, kernel="einsum")
    self_l1 = max_square_resolution(
        AttentionShape(16, 1024, 1024, 80, heads=8), Geometry(16, True), budget, kernel="einsum"
    )
    cross_l0 = max_square_resolution(
        AttentionShape(16, 4096, 77, 40, heads=8), Geometry(8, False), budget, kernel="einsum"
    )
    assert self_l0 < self_l1 < cross_l0


def test_larger_cap_never_hurts():
    shape = AttentionShape(16, 9216, 9216, 40, heads=8)
    with pytest.raises(NotEnoughMemory):
        plan_attention(shape, 64 * MiB, kernel="einsum", slice_cap=16)
    assert plan_attention(shape, 64 * MiB, kernel="einsum", slice_cap=4096).steps > 16


def test_min_steps_forces_finer_plans_for_oom_retry():
    plan = plan_attention(SD15_SELF, 8 * GiB, kernel="einsum")
    assert plan.steps == 1
    finer = plan_attention(SD15_SELF, 8 * GiB, kernel="einsum", min_steps=2 * plan.steps)
    assert finer.steps >= 2
    with pytest.raises(NotEnoughMemory, match="retries"):
        plan_attention(SD15_SELF, 8 * GiB, kernel="einsum", min_steps=128, slice_cap=64)


@pytest.mark.parametrize("budget", [float("nan"), -5, 0, "x", None])
def test_garbage_budget_plans_nothing_but_never_crashes(budget):
    with pytest.raises(NotEnoughMemory):
        plan_attention(SD15_SELF, budget, kernel="einsum")


def test_empty_shapes_plan_trivially():
    for shape in (AttentionShape(0, 10, 10, 8), AttentionShape(4, 0, 10, 8), AttentionShape(4, 10, 0, 8)):
        plan = plan_attention(shape, 1 * MiB)
        assert plan.steps == 1


def test_bad_shapes_are_rejected_clearly():
    with pytest.raises(ValueError, match="non-negative"):
        AttentionShape(-1, 1, 1, 1)
    with pytest.raises(ValueError, match="divide"):
        AttentionShape(10, 1, 1, 1, heads=3)
    with pytest.raises(ValueError, match="strategy"):
        plan_attention(SD15_SELF, GiB, strategy="nope")


@settings(max_examples=300, deadline=None)
@given(
    shape=shapes,
    budgets=st.lists(st.integers(1, 8 * MiB), min_size=2, max_size=6),
    strategy=st.sampled_from(STRATEGY_NAMES),
    kernel=st.sampled_from(KERNEL_KINDS),
)
def test_reused_plans_equal_fresh_ones(shape, budgets, strategy, kernel):
    """The per-layer plan cache must never change an answer, whatever order budgets arrive in."""
    from lib_memslice import plan as plan_module

    for budget in budgets:
        try:
            cached = plan_attention(shape, budget, strategy=strategy, kernel=kernel)
        except NotEnoughMemory:
            cached = None
        saved = dict(plan_module._first_choices)
        plan_module._first_choices.clear()
        try:
            fresh = plan_attention(shape, budget, strategy=strategy, kernel=kernel)
        except NotEnoughMemory:
            fresh = None
        assert cached == fresh
        plan_module._first_choices.update(saved)  # keep the warm cache for the next budget
