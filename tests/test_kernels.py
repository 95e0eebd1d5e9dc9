"""Kernels: exact against an fp64 reference on every strategy and plan, within their predicted memory."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lib_memslice import kernels
from lib_memslice.forwards import BasicHost, attend
from lib_memslice.memtrack import PeakTracker
from lib_memslice.plan import STRATEGY_NAMES, AttentionShape, MiB, NotEnoughMemory, peak_bytes, plan_attention
from lib_memslice.settings import Settings

from .conftest import projected_qkv, reference

DTYPE_TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def shape_of(q, k, v, compute_dtype):
    b, h, nq, d = q.shape
    return AttentionShape(
        b * h,
        nq,
        k.shape[2],
        d,
        v.shape[-1],
        element_size=torch.finfo(compute_dtype).bits // 8,
        io_element_size=q.element_size(),
        heads=h,
    )


def run(q, k, v, budget, strategy, setting="auto", cap=4096, compute_dtype=None, bias=None):
    compute_dtype = compute_dtype or q.dtype
    kind, workspace = kernels.resolve_kernel(setting, q, k, v, compute_dtype, bias)
    shape = shape_of(q, k, v, compute_dtype)
    copies = kernels.fused_input_copies(q, k, v, compute_dtype) if kind == "fused" else None
    plan = plan_attention(
        shape, budget, strategy=strategy, kernel=kind, slice_cap=cap, workspace_bytes=workspace, input_copies=copies
    )
    scale = q.shape[-1] ** -0.5
    with PeakTracker() as tracker:
        out = kernels.run_plan(q, k, v, plan, kind, scale, bias, compute_dtype)
    return out, plan, tracker.peak, kind


@settings(max_examples=80, deadline=None)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 5),
    q_tokens=st.integers(1, 200),
    k_tokens=st.sampled_from([1, 7, 77, 154, 231, 199]),
    head_dim=st.sampled_from([8, 40]),
    budget_frac=st.floats(0.05, 1.5),
    strategy=st.sampled_from(STRATEGY_NAMES),
    setting=st.sampled_from(["auto", "sdpa", "einsum"]),
    upcast=st.booleans(),
    half=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_sliced_equals_reference_within_predicted_peak(
    batch, heads, q_tokens, k_tokens, head_dim, budget_frac, strategy, setting, upcast, half
):
    q, k, v = projected_qkv(batch, heads, q_tokens, k_tokens, head_dim, dtype=half, seed=q_tokens)
    compute = torch.float32 if upcast else half
    kind, _ = kernels.resolve_kernel(setting, q, k, v, compute)
    shape = shape_of(q, k, v, compute)
    budget = max(1, int(peak_bytes(shape, shape.batch_heads, q_tokens, kind) * budget_frac))
    try:
        out, plan, measured, kind = run(q, k, v, budget, strategy, setting, compute_dtype=compute)
    except NotEnoughMemory:
        return
    assert measured <= plan.peak_bytes <= budget, (measured, plan)
    assert out.dtype == q.dtype and out.shape == (batch, heads, q_tokens, v.shape[-1])
    ref = reference(q.to(compute), k.to(compute), v.to(compute), head_dim**-0.5)
    tol = DTYPE_TOL[half]  # the output is rounded to the io dtype even when computed in float32
    assert (out.double() - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
@pytest.mark.parametrize("setting", ["auto", "sdpa", "einsum"])
def test_fp32_error_below_1e5_on_sd_like_shapes(strategy, setting):
    for batch, heads, nq, nk, d in [(2, 8, 1024, 1024, 40), (2, 8, 1024, 77, 40), (1, 1, 1024, 1024, 512)]:
        q, k, v = projected_qkv(batch, heads, nq, nk, d)
        ref = reference(q, k, v, d**-0.5)
        for frac in (1.0, 0.3, 0.05):
            shape = shape_of(q, k, v, q.dtype)
            kind, _ = kernels.resolve_kernel(setting, q, k, v, q.dtype)
            budget = int(peak_bytes(shape, shape.batch_heads, nq, kind) * frac)
            try:
                out, plan, measured, _ = run(q, k, v, budget, strategy, setting)
            except NotEnoughMemory:
                continue
            assert measured <= plan.peak_bytes <= budget
            assert (out.double() - ref).abs().max().item() <= 1e-5


def test_cpu_fused_kernel_runs_only_for_4d_and_is_detected():
    q, k, v = projected_qkv(1, 2, 64, 64, 16)
    assert kernels.fused_sdpa_available(q, k, v)
    flat = q.reshape(2, 64, 16)
    assert not kernels.fused_sdpa_available(flat, flat, flat)
    assert kernels.resolve_kernel("auto", q, k, v, q.dtype)[0] == "fused"
    assert kernels.resolve_kernel("einsum", q, k, v, q.dtype)[0] == "einsum"


def test_fused_cpu_workspace_is_covered_by_the_prediction():
    """The fused kernel's scratch is invisible to the dispatch tracker; the profiler sees every allocation."""
    from torch.profiler import ProfilerActivity, profile

    q, k, v = projected_qkv(2, 8, 2048, 2048, 40)
    kind, workspace = kernels.resolve_kernel("auto", q, k, v, q.dtype)
    assert kind == "fused"
    shape = shape_of(q, k, v, q.dtype)
    copies = kernels.fused_input_copies(q, k, v, q.dtype)
    assert copies == 0  # projections viewed as [B, H, N, d] are read in place
    plan = plan_attention(shape, 1 << 40, kernel=kind, workspace_bytes=workspace, input_copies=copies)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        kernels.run_plan(q, k, v, plan, kind, 40**-0.5)
    allocated = max(e.cpu_memory_usage for e in prof.key_averages() if "scaled_dot_product" in e.key)
    assert 0 < allocated <= plan.peak_bytes


@pytest.mark.parametrize("min_steps", [2, 5, 16])
def test_sliced_fused_kernel_is_exact_and_within_prediction(min_steps):
    q, k, v = projected_qkv(2, 3, 300, 231, 40)
    kind, workspace = kernels.resolve_kernel("sdpa", q, k, v, q.dtype)
    shape = shape_of(q, k, v, q.dtype)
    copies = kernels.fused_input_copies(q, k, v, q.dtype)
    for strategy in STRATEGY_NAMES:
        plan = plan_attention(
            shape, 1 << 40, strategy=strategy, kernel=kind, workspace_bytes=workspace, min_steps=min_steps,
            input_copies=copies,
        )  # fmt: skip
        with PeakTracker() as tracker:
            out = kernels.run_plan(q, k, v, plan, kind, 40**-0.5)
        assert plan.steps >= min_steps and tracker.peak <= plan.peak_bytes
        assert (out.double() - reference(q, k, v, 40**-0.5)).abs().max() < 1e-5


def test_keep_mask_matches_ldm_semantics():
    q, k, v = projected_qkv(2, 4, 33, 20, 8)
    keep = torch.rand(2, 20) > 0.3
    keep[1] = False  # a row with every key dropped averages v, as ldm's masked_fill(-max) does
    bias = kernels.keep_mask_to_bias(keep, 2, 20, torch.float32)
    ref = reference(q, k, v, 8**-0.5, bias)
    assert torch.allclose(ref[1], v.double()[1].mean(dim=1, keepdim=True).expand_as(ref[1]), atol=1e-6)
    for setting in ("auto", "einsum"):
        shape = shape_of(q, k, v, q.dtype)
        plan = plan_attention(shape, 1 << 40, kernel="einsum", slice_cap=64, min_steps=6)
        out = kernels.run_plan(q, k, v, plan, kernels.resolve_kernel(setting, q, k, v, q.dtype, bias)[0], 8**-0.5, bias)
        assert (out.double() - ref).abs().max() < 1e-5


def test_mask_errors_are_clear():
    with pytest.raises(TypeError, match="boolean keep-mask"):
        kernels.keep_mask_to_bias(torch.ones(2, 5), 2, 5, torch.float32)
    with pytest.raises(ValueError, match="does not match"):
        kernels.keep_mask_to_bias(torch.ones(3, 5, dtype=torch.bool), 2, 5, torch.float32)


@pytest.mark.parametrize("dims", [(0, 2, 5, 5), (2, 2, 0, 5), (2, 2, 5, 0), (1, 1, 1, 1)])
def test_empty_and_single_token_inputs(dims):
    b, h, nq, nk = dims
    q, k, v = projected_qkv(b, h, nq, nk, 8) if b else (torch.empty(0, h, nq, 8),) * 3
    if not b:
        k = v = torch.empty(0, h, nk, 8)
    plan = plan_attention(shape_of(q, k, v, q.dtype), 1 * MiB)
    out = kernels.run_plan(q, k, v, plan, "fused", 8**-0.5)
    assert out.shape == (b, h, nq, 8)
    if nk == 0:
        assert torch.count_nonzero(out) == 0
    elif out.numel():
        assert torch.allclose(out.double(), reference(q, k, v, 8**-0.5), atol=1e-6)


class FailingChunks:
    """Fault injection: raise an out-of-memory error on chosen chunk calls, then behave."""

    def __init__(self, fail_at, error):
        self.calls = 0
        self.fail_at = set(fail_at)
        self.error = error
        self.real = kernels._chunk

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls in self.fail_at:
            raise self.error
        return self.real(*args, **kwargs)


OOMS = [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried 9 GB"),
    RuntimeError("Could not allocate tensor with 1073741824 bytes. There is not enough GPU video memory available!"),
    MemoryError(),
]


@pytest.mark.parametrize("error", OOMS, ids=lambda e: type(e).__name__ + str(len(str(e))))
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_oom_retries_with_more_slices(monkeypatch, error, where):
    q, k, v = projected_qkv(2, 4, 256, 256, 16)
    shape = shape_of(q, k, v, q.dtype)
    plan = plan_attention(shape, 1 << 40, kernel="einsum", min_steps=4, slice_cap=64)
    fail_at = {"first": 1, "middle": plan.steps // 2 + 1, "last": plan.steps}[where]
    fake = FailingChunks([fail_at], error)
    monkeypatch.setattr(kernels, "_chunk", fake)

    def replan(n):
        return plan_attention(shape, 1 << 40, kernel="einsum", min_steps=n, slice_cap=64)

    out, final, retries = kernels.run_with_retry(q, k, v, plan, replan, "einsum", 16**-0.5)
    assert retries == 1 and final.steps >= 2 * plan.steps
    assert (out.double() - reference(q, k, v, 16**-0.5)).abs().max() < 1e-5


def test_oom_past_the_cap_is_not_enough_memory(monkeypatch):
    q, k, v = projected_qkv(1, 2, 64, 64, 8)
    shape = shape_of(q, k, v, q.dtype)
    fake = FailingChunks(range(1, 10_000), torch.OutOfMemoryError("out of memory"))
    monkeypatch.setattr(kernels, "_chunk", fake)
    plan = plan_attention(shape, 1 << 40, kernel="einsum", slice_cap=8)
    with pytest.raises(NotEnoughMemory, match="retries"):
        kernels.run_with_retry(
            q,
            k,
            v,
            plan,
            lambda n: plan_attention(shape, 1 << 40, kernel="einsum", slice_cap=8, min_steps=n),
            "einsum",
            1.0,
        )
    assert fake.calls >= 4  # 1, 2, 4, 8 steps were all tried


def test_oom_retry_off_reraises_the_original(monkeypatch):
    q, k, v = projected_qkv(1, 2, 64, 64, 8)
    monkeypatch.setattr(kernels, "_chunk", FailingChunks([1], torch.OutOfMemoryError("out of memory")))
    plan = plan_attention(shape_of(q, k, v, q.dtype), 1 << 40, kernel="einsum")
    with pytest.raises(torch.OutOfMemoryError):
        kernels.run_with_retry(q, k, v, plan, lambda n: plan, "einsum", 1.0, retry=False)


def test_non_oom_errors_are_not_retried(monkeypatch):
    q, k, v = projected_qkv(1, 2, 64, 64, 8)
    monkeypatch.setattr(kernels, "_chunk", FailingChunks([1], RuntimeError("shape mismatch")))
    plan = plan_attention(shape_of(q, k, v, q.dtype), 1 << 40, kernel="einsum")
    with pytest.raises(RuntimeError, match="shape mismatch"):
        kernels.run_with_retry(q, k, v, plan, lambda n: plan, "einsum", 1.0)


def test_is_oom_does_not_mistake_not_enough_memory():
    assert not kernels.is_oom(NotEnoughMemory(2, 1))
    assert all(kernels.is_oom(e) for e in OOMS)
    assert not kernels.is_oom(ValueError("out of memory"))


def test_attend_records_plans_and_honours_budget_setting():
    host = BasicHost(Settings(budget_gb=4 / 1024, kernel="einsum"))  # 4 MiB
    q, k, v = projected_qkv(2, 4, 512, 512, 16)
    out = attend(q, k, v, scale=0.25, strategy="auto", host=host, site="t")
    rec = host.stats.recent()[-1]
    assert rec.steps > 1 and rec.peak_bytes <= 4 * MiB and rec.site == "t"
    assert (out.double() - reference(q, k, v, 0.25)).abs().max() < 1e-5


def test_input_copies_follow_the_layout():
    q, k, v = projected_qkv(1, 2, 16, 16, 8)
    assert kernels.fused_input_copies(q, k, v, q.dtype) == 0
    assert kernels.fused_input_copies(q.half(), k.half(), v.half(), torch.float32) == 1  # the cast
    strided = q.transpose(-1, -2)[..., :8, :]
    assert kernels.fused_input_copies(strided, k, v, q.dtype) == 1  # a contiguous copy
    assert kernels.fused_input_copies(strided.half(), k.half(), v.half(), torch.float32) == 2
