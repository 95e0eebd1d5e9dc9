"""Kernels: exact against an fp64 reference on every strategy and plan, and within their predicted memory.

The einsum kernel is predicted exactly (measured == predicted), so every term of its cost model is checked; the
fused kernel's live tensors (output, log-sum-exp, input copies) are checked tightly against the prediction, its
in-op scratch in test_workspace.py.
"""

from __future__ import annotations

import math
import threading
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lib_memslice import kernels
from lib_memslice.costs import EINSUM, FUSED_SCALARS, AttentionShape, KernelChoice, MiB, peak_bytes
from lib_memslice.slicing import plan_attention
from lib_memslice.strategies import NAMES as STRATEGY_NAMES
from memslice_tools.memtrack import PeakTracker

from .conftest import CPU_HALF, projected_qkv, reference, requires_cpu_half, sdpa_math_only, torch_threads

DTYPE_TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 2e-3, torch.bfloat16: 2e-2}
OOM = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


HALVES = [torch.bfloat16] + ([torch.float16] if CPU_HALF else [])  # torch 2.1 has no float16 attention on CPU


def shape_of(q, k, v, compute_dtype):
    b, h, nq, d = q.shape
    return AttentionShape(b * h, nq, k.shape[2], d, v.shape[-1], element_size=torch.finfo(compute_dtype).bits // 8,
                          io_element_size=q.element_size(), heads=h)  # fmt: skip


def run(q, k, v, budget, strategy="auto", setting="auto", cap=4096, compute_dtype=None, mask=None, min_slices=1):
    """Plan and run like attend does, measuring live tensors; returns (out, plan, measured peak)."""
    compute_dtype = compute_dtype or q.dtype
    keep = None if mask is None else kernels.keep_mask(mask, q.shape[0], k.shape[2], compute_dtype)
    kernel = kernels.choose_kernel(setting, q, k, v, compute_dtype, None if keep is None else keep.bias)
    plan = plan_attention(shape_of(q, k, v, compute_dtype), budget, strategy=strategy, kernel=kernel, slice_cap=cap,
                          min_slices=min_slices)  # fmt: skip
    if plan is None:
        return None, None, 0
    with PeakTracker() as tracker:
        out = kernels.run_plan(q, k, v, plan, q.shape[-1] ** -0.5, keep, compute_dtype)
    return out, plan, tracker.peak


@settings(max_examples=80, deadline=None)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 5),
    q_tokens=st.integers(1, 200),
    k_tokens=st.sampled_from([1, 7, 77, 154, 199]),
    head_dim=st.sampled_from([8, 40]),
    budget_frac=st.floats(0.05, 1.5),
    strategy=st.sampled_from(STRATEGY_NAMES),
    setting=st.sampled_from(["auto", "sdpa", "einsum"]),
    upcast=st.booleans(),
    dtype=st.sampled_from([torch.float32, *HALVES]),
)
def test_sliced_equals_reference_within_predicted_peak(
    batch, heads, q_tokens, k_tokens, head_dim, budget_frac, strategy, setting, upcast, dtype
):
    q, k, v = projected_qkv(batch, heads, q_tokens, k_tokens, head_dim, dtype=dtype, seed=q_tokens)
    compute = torch.float32 if upcast else dtype
    kernel = kernels.choose_kernel(setting, q, k, v, compute)
    shape = shape_of(q, k, v, compute)
    budget = max(1, int(peak_bytes(shape, shape.batch_heads, q_tokens, kernel) * budget_frac))
    out, plan, measured = run(q, k, v, budget, strategy, setting, compute_dtype=compute)
    if plan is None:
        return
    assert measured <= plan.peak_bytes <= budget, (measured, plan)
    if plan.kernel.kind == "einsum":  # the einsum kernel allocates what the model counts: one buffer per worker
        # (live tensors: a half-precision GEMM's in-op scratch is counted per worker but seen only by the profiler)
        live = replace(plan.kernel, scratch=0)
        one = peak_bytes(shape, plan.heads_per_slice, plan.queries_per_slice, replace(live, workers=1))
        full = peak_bytes(shape, plan.heads_per_slice, plan.queries_per_slice, live)
        assert measured == full or (plan.kernel.workers > 1 and one <= measured), (measured, one, plan)
    assert out.dtype == q.dtype and out.shape == (batch, heads, q_tokens, v.shape[-1])
    ref = reference(q.to(compute), k.to(compute), v.to(compute), head_dim**-0.5)
    tol = DTYPE_TOL[dtype]  # the output is rounded to the io dtype even when computed in float32
    assert (out.double() - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
@pytest.mark.parametrize("setting", ["auto", "sdpa", "einsum"])
def test_fp32_error_below_1e5_on_sd_like_shapes(strategy, setting):
    for batch, heads, nq, nk, d in [(2, 8, 1024, 1024, 40), (2, 8, 1024, 77, 40), (1, 1, 1024, 1024, 512)]:
        q, k, v = projected_qkv(batch, heads, nq, nk, d)
        ref = reference(q, k, v, d**-0.5)
        for frac in (1.0, 0.3, 0.05):
            kernel = kernels.choose_kernel(setting, q, k, v, q.dtype)
            budget = int(peak_bytes(shape_of(q, k, v, q.dtype), batch * heads, nq, kernel) * frac)
            out, plan, measured = run(q, k, v, budget, strategy, setting)
            if plan is None:
                continue
            assert measured <= plan.peak_bytes <= budget
            assert (out.double() - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("unnormalised", [False, True])
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("inputs", ["float32", "bfloat16 upcast", "bfloat16 staged"])
@pytest.mark.parametrize("plan_shape", [(1, 64), (3, 50), (8, 333), (16, 1000)])
def test_einsum_kernel_allocates_exactly_the_prediction(plan_shape, inputs, workers, unnormalised):
    """Output + one score buffer (+ the reused cast buffers, + the unnormalised path's wider values and output and
    the call's norms, + in half precision on strided heads the staged copies of a run's keys, its values unless the
    widened ones hold them, and a slice's queries) per worker: a dropped or doubled term shows here. The workers run
    under the caller's tracker (dispatch modes are carried over to them); a half-precision GEMM's scratch is in-op,
    unseen by live tensors, so it is left out here."""
    dtype = torch.float32 if inputs == "float32" else torch.bfloat16
    q, k, v = projected_qkv(2, 8, 1000, 300, 40, dtype=dtype, v_dim=24)
    compute = torch.bfloat16 if inputs == "bfloat16 staged" else torch.float32
    shape = shape_of(q, k, v, compute)
    hps, qps = plan_shape
    from lib_memslice.slicing import SlicePlan

    kernel = replace(kernels.choose_kernel("einsum", q, k, v, compute), scratch=0, workers=workers,
                     unnormalised=unnormalised)  # fmt: skip
    assert kernel.staged == (inputs != "bfloat16 upcast")  # strided heads, not cast: staged in any dtype
    plan = SlicePlan(hps, qps, math.ceil(16 / hps), math.ceil(1000 / qps), peak_bytes(shape, hps, qps, kernel),
                     kernel, "auto", "test")  # fmt: skip
    with PeakTracker() as tracker:
        out = kernels.run_plan(q, k, v, plan, 40**-0.5, None, compute)
    assert tracker.peak == plan.peak_bytes
    assert (out.double() - reference(q.float(), k.float(), v.float(), 40**-0.5)).abs().max() < DTYPE_TOL[dtype]


@pytest.mark.parametrize("unnormalised", [False, True], ids=["softmax", "unnormalised"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, pytest.param(torch.float16, marks=requires_cpu_half)])
def test_einsum_kernel_in_op_allocations_stay_within_the_prediction(unnormalised, dtype):
    """The profiler sees every allocation, also ones an op frees before returning: in float32 none happen per
    slice (the unnormalised path's GEMM into a wider output and its division write into buffers allocated up
    front); a half-precision GEMM allocates its own scratch, which the CPU kernel's choice counts per worker."""
    from memslice_tools.inop import inop_peak_bytes

    q, k, v = projected_qkv(2, 8, 512, 512, 40, dtype=dtype)
    # one worker: a second worker's buffers would hide a missing scratch term
    kernel = replace(kernels.einsum_kernel("cpu", dtype), unnormalised=unnormalised, workers=1)
    plan = plan_attention(shape_of(q, k, v, q.dtype), 64 * MiB, kernel=kernel)
    assert plan.slices > 1
    expected = plan.peak_bytes
    assert inop_peak_bytes(lambda: kernels.run_plan(q, k, v, plan, 0.1)) <= expected


@pytest.mark.parametrize("upcast", [False, True])
def test_fused_kernel_live_tensors_match_the_prediction(upcast):
    """The fused call's live tensors are its output, its float32 log-sum-exp and the input copies it makes; the
    prediction adds the in-op scratch (test_workspace.py) and nothing else."""
    dtype = torch.bfloat16 if upcast else torch.float32
    q, k, v = projected_qkv(2, 8, 2048, 2048, 40, dtype=dtype)
    compute = torch.float32
    kernel = kernels.choose_kernel("auto", q, k, v, compute)
    assert kernel.kind == "fused"
    assert kernel.input_copies == (1 if upcast else 0)  # the cast; projections viewed as [B, H, N, d] are read in place
    shape = shape_of(q, k, v, compute)
    for slices in (1, 4):
        plan = plan_attention(shape, 1 << 40, kernel=kernel, min_slices=slices)
        with PeakTracker() as tracker:
            kernels.run_plan(q, k, v, plan, 40**-0.5, None, compute)
        assert tracker.peak <= plan.peak_bytes - kernel.scratch
        assert plan.peak_bytes - kernel.scratch - tracker.peak <= 0.02 * plan.peak_bytes


#: torch 2.1's CPU flash op returns four 0-d int64 and one 0-d float32 tensor besides its output and log-sum-exp
#: (measured with the tracker on torch 2.1.2: 34-36 bytes; none on 2.3.1 and 2.13)
TORCH21_FLASH_SCALARS = 36


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_calls_live_tensors_are_its_terms_to_the_byte(dtype):
    """Output, float32 log-sum-exp and the op's scalars: what the tracker sees of a fused call is the prediction less
    its in-op scratch, less the scalar term's share that this torch's op does not return."""
    q, k, v = projected_qkv(2, 8, 512, 512, 40, dtype=dtype)
    kernel = kernels.choose_kernel("auto", q, k, v, dtype)
    assert kernel.kind == "fused"
    shape = shape_of(q, k, v, dtype)
    returned = TORCH21_FLASH_SCALARS if torch.__version__ < "2.2" else 0
    assert FUSED_SCALARS >= TORCH21_FLASH_SCALARS  # the term covers what torch 2.1's op returns
    for slices in (1, 4):
        plan = plan_attention(shape, 1 << 40, kernel=kernel, min_slices=slices)
        with PeakTracker() as tracker:
            kernels.run_plan(q, k, v, plan, 40**-0.5, None, dtype)
        unseen = plan.peak_bytes - kernel.scratch - tracker.peak
        assert FUSED_SCALARS - returned <= unseen <= FUSED_SCALARS - returned + 8, (slices, unseen)


def test_sdpa_math_half_precision_is_predicted_in_float32():
    q, k, v = projected_qkv(2, 4, 300, 300, 16, dtype=torch.bfloat16)
    kernel = KernelChoice("sdpa-math")
    plan = plan_attention(shape_of(q, k, v, q.dtype), 1 << 40, kernel=kernel)
    with sdpa_math_only(), PeakTracker() as tracker:
        kernels.run_plan(q, k, v, plan, 0.25)
    # at 2-byte scores the model would predict half of what the math path holds
    half_model = peak_bytes(AttentionShape(8, 300, 300, 16, element_size=2, heads=4), 8, 300, EINSUM) * 2
    assert tracker.peak <= plan.peak_bytes
    assert tracker.peak > half_model


def test_cpu_fused_kernel_runs_only_for_4d_and_is_detected():
    q, k, v = projected_qkv(1, 2, 64, 64, 16)
    assert kernels.sdpa_backend(q, k, v) == "flash"
    flat = q.reshape(2, 64, 16)
    assert kernels.sdpa_backend(flat, flat, flat) == "math"
    assert kernels.choose_kernel("auto", q, k, v, q.dtype).kind == "fused"
    assert kernels.choose_kernel("einsum", q, k, v, q.dtype).kind == "einsum"
    with sdpa_math_only():
        assert kernels.choose_kernel("auto", q, k, v, q.dtype).kind == "einsum"
        assert kernels.choose_kernel("sdpa", q, k, v, q.dtype).kind == "sdpa-math"


def test_cuda_previews_follow_torchs_rules():
    """Without a device: flash for half precision up to 128, memory-efficient above (the VAE's 512), its float32
    accumulator counted (output_extra) for half precision over 128."""
    vae = kernels.expected_kernel("cuda", torch.float16, 512)
    assert vae.kind == "fused" and vae.backend == "efficient" and vae.output_extra == 4
    assert kernels.expected_kernel("cuda", torch.float32, 512).output_extra == 0
    unet = kernels.expected_kernel("cuda", torch.float16, 40)
    assert unet.kind == "fused" and unet.output_extra == 0
    assert kernels.expected_kernel("cuda", torch.float16, 44).kind == "einsum"  # not a multiple of 8
    assert [k.kind for k in kernels.expected_kernels("cuda", torch.float16, 64)] == ["fused", "einsum"]
    # the float32 accumulator (output_extra) is in the prediction: twice a half output
    shape = AttentionShape(1, 4096, 4096, 512, element_size=2, heads=1)
    assert peak_bytes(shape, 1, 4096, vae) - peak_bytes(shape, 1, 4096, unet) == 2 * shape.output_bytes


def test_rectangles_cover_every_row_once():
    for batch, heads in ((1, 1), (2, 8), (3, 5), (4, 3)):
        for rows in range(1, batch * heads + 2):
            seen = []
            for pieces in kernels.rectangles(batch, heads, rows):
                size = sum((b1 - b0) * (h1 - h0) for b0, b1, h0, h1 in pieces)
                assert size <= rows
                for b0, b1, h0, h1 in pieces:
                    seen += [b * heads + h for b in range(b0, b1) for h in range(h0, h1)]
            assert seen == list(range(batch * heads))


@pytest.mark.parametrize("setting", ["auto", "sdpa", "einsum"])
@pytest.mark.parametrize("dtype", [torch.float32, *HALVES])
def test_keep_mask_matches_ldm_semantics_without_nan(setting, dtype):
    q, k, v = projected_qkv(2, 4, 33, 20, 8, dtype=dtype)
    keep = torch.rand(2, 20, generator=torch.Generator().manual_seed(1)) > 0.3
    keep[1] = False  # every key dropped: ldm's masked_fill(-max) gives uniform weights, the mean of v
    ldm_like = reference(q, k, v, 8**-0.5, kernels.keep_mask(keep, 2, 20, torch.float64).bias)
    assert torch.allclose(ldm_like[1], v.double()[1].mean(dim=1, keepdim=True).expand_as(ldm_like[1]), atol=1e-2)
    for min_slices in (1, 6):
        out, plan, _ = run(q, k, v, 1 << 40, setting=setting, mask=keep, min_slices=min_slices)
        assert not torch.isnan(out).any(), (setting, plan.kernel.kind)
        assert (out.double() - ldm_like).abs().max() < 20 * DTYPE_TOL[dtype]


def test_mask_errors_are_clear():
    with pytest.raises(TypeError, match="boolean keep-mask"):
        kernels.keep_mask(torch.ones(2, 5), 2, 5, torch.float32)
    with pytest.raises(ValueError, match="does not match"):
        kernels.keep_mask(torch.ones(3, 5, dtype=torch.bool), 2, 5, torch.float32)


@pytest.mark.parametrize("kind", ["einsum", "sdpa-math"])
def test_kernels_keep_their_dtype_under_autocast(kind):
    """CPU autocast would run the matmuls in bfloat16 (and CUDA's its softmax in float32): the plan's dtype runs."""
    q, k, v = projected_qkv(2, 4, 128, 128, 16)
    plan = plan_attention(shape_of(q, k, v, q.dtype), 1 << 40, kernel=KernelChoice(kind), min_slices=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kernels.run_plan(q, k, v, plan, 0.25)
    assert out.dtype == torch.float32
    assert (out.double() - reference(q, k, v, 0.25)).abs().max() < 1e-5


@pytest.mark.parametrize("dims", [(0, 2, 5, 5), (2, 2, 0, 5), (2, 2, 5, 0), (1, 1, 1, 1)])
def test_empty_and_single_token_inputs(dims):
    b, h, nq, nk = dims
    q, k, v = projected_qkv(b, h, nq, nk, 8) if b else (torch.empty(0, h, nq, 8),) * 3
    if not b:
        k = v = torch.empty(0, h, nk, 8)
    for kernel in (EINSUM, KernelChoice("fused")):
        plan = plan_attention(shape_of(q, k, v, q.dtype), 1 * MiB, kernel=kernel)
        out = kernels.run_plan(q, k, v, plan, 8**-0.5)
        assert out.shape == (b, h, nq, 8)
        if nk == 0:
            assert torch.count_nonzero(out) == 0
        elif out.numel():
            assert torch.allclose(out.double(), reference(q, k, v, 8**-0.5), atol=1e-6)


OOMS = [
    OOM("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried 9 GB"),
    RuntimeError("Could not allocate tensor with 1073741824 bytes. There is not enough GPU video memory available!"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    MemoryError(),
]


def test_is_oom_knows_every_backends_words_and_nothing_else():
    from lib_memslice.limits import NotEnoughMemory

    assert all(kernels.is_oom(e) for e in OOMS)
    assert not kernels.is_oom(NotEnoughMemory("memslice: not enough memory for attention: out of memory"))
    assert not kernels.is_oom(ValueError("out of memory"))
    assert not kernels.is_oom(RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED"))


def test_input_copies_follow_the_layout():
    q, k, v = projected_qkv(1, 2, 16, 16, 8)
    assert kernels.fused_input_copies(q, k, v, q.dtype) == 0
    assert kernels.fused_input_copies(q.half(), k.half(), v.half(), torch.float32) == 1  # the cast
    strided = q.transpose(-1, -2)[..., :8, :]
    assert kernels.fused_input_copies(strided, k, v, q.dtype) == 1  # a contiguous copy
    assert kernels.fused_input_copies(strided.half(), k.half(), v.half(), torch.float32) == 2


def test_a_call_without_fused_kernels_does_not_change_what_previews_promise():
    """Previews remember what real calls got; a call inside a fused-off context must not poison them."""
    q, k, v = projected_qkv(1, 1, 16, 16, 48)
    assert kernels.expected_kernel("cpu", torch.float32, 48).kind == "fused"
    with sdpa_math_only():
        chosen = kernels.choose_kernel("auto", q, k, v, q.dtype)
        kernels.observe("cpu", torch.float32, 48, "auto", chosen)
        assert kernels.expected_kernel("cpu", torch.float32, 48).kind == "einsum"
    assert kernels.expected_kernel("cpu", torch.float32, 48).kind == "fused"


def test_the_cpu_worker_pool_gives_the_serial_result_and_leaves_the_callers_threads():
    """One single-threaded worker per torch thread, each with its own buffers: the same output as the serial
    kernel, in inference mode too (its tensors may only be written under inference mode), and the caller keeps its
    own thread count."""
    from lib_memslice.slicing import SlicePlan

    q, k, v = projected_qkv(2, 8, 700, 700, 40)
    threads = torch.get_num_threads()
    outs = []
    for workers in (1, 2, 3):
        kernel = KernelChoice("einsum", workers=workers)
        plan = SlicePlan(1, 100, 16, 7, 0, kernel, "auto", "test")
        with torch.inference_mode():
            outs.append(kernels.run_plan(q, k, v, plan, 40**-0.5))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert torch.get_num_threads() == threads
    assert kernels._pool(2).submit(torch.get_num_threads).result() == 1


@pytest.mark.parametrize("workers", [2, 3])
def test_workers_copy_each_runs_keys_once(workers, monkeypatch):
    """Workers take the slices of the run whose keys they hold before starting another, so a run's keys and values
    are copied (and their norms taken) once, not once per worker that touches it: only once every run has started
    may an idle worker join one already started, and a worker never copies a run twice. Every slice still runs
    exactly once. (How many joins the end takes depends on the threads' timing: the decisions are checked, in the
    order the queue's lock made them, not a count.)"""
    from lib_memslice.slicing import SlicePlan

    q, k, v = projected_qkv(2, 4, 700, 300, 40, dtype=torch.bfloat16)
    kernel = kernels.choose_kernel("einsum", q, k, v, q.dtype)
    assert kernel.staged
    plan = SlicePlan(1, 100, 8, 7, 0, replace(kernel, workers=workers), "auto", "test")
    staged, sliced, decisions = [], [], []
    real_keys, real_slice, real_take = kernels._keys, kernels._slice, kernels._Queue.take
    monkeypatch.setattr(kernels, "_keys", lambda *a: staged.append(a[2:5]) or real_keys(*a))
    monkeypatch.setattr(kernels, "_slice", lambda *a: sliced.append(a[3:7]) or real_slice(*a))

    real_init = kernels._Queue.__init__

    def init(queue, *args):
        real_init(queue, *args)
        queue.lock = threading.RLock()  # so that the decision and its record are one critical section

    def take(queue, held):
        with queue.lock:
            started = queue.started  # how many runs had started when this decision was made
            taken = real_take(queue, held)
            if taken is not None and taken[0] != held:
                decisions.append((threading.get_ident(), taken[0], started))
            return taken

    monkeypatch.setattr(kernels._Queue, "__init__", init)
    monkeypatch.setattr(kernels._Queue, "take", take)
    out = kernels.run_plan(q, k, v, plan, 40**-0.5)
    assert sorted(sliced) == sorted((b, h, h + 1, n0) for b in range(2) for h in range(4) for n0 in range(0, 700, 100))
    assert set(staged) == {(b, h, h + 1) for b in range(2) for h in range(4)} and len(staged) == len(decisions)
    runs = [run for _, run, _ in decisions]
    assert len(set(zip([w for w, _, _ in decisions], runs, strict=True))) == len(decisions)  # never a run twice
    firsts = [runs.index(r) for r in range(8)]
    joins = [i for i in range(len(runs)) if i not in firsts]
    assert all(decisions[i][2] == 8 for i in joins), decisions  # a join only once every run had started
    assert (out.double() - reference(q.float(), k.float(), v.float(), 40**-0.5)).abs().max() < DTYPE_TOL[q.dtype]


def test_an_error_in_a_worker_reaches_the_caller(monkeypatch):
    from lib_memslice.slicing import SlicePlan

    q, k, v = projected_qkv(1, 2, 64, 64, 8)
    calls = []

    def failing(s):
        calls.append(1)
        raise RuntimeError("CUDA out of memory (simulated in a worker)")

    monkeypatch.setattr(kernels, "_softmax_", failing)
    plan = SlicePlan(1, 8, 2, 8, 0, KernelChoice("einsum", workers=2), "auto", "test")
    with pytest.raises(RuntimeError, match="simulated in a worker"):
        kernels.run_plan(q, k, v, plan, 0.1)
    assert len(calls) <= 2  # the first error stops every worker


def test_a_sliced_fused_call_that_casts_holds_one_rectangles_casts_at_a_time():
    """Upcast on the fused kernel casts each rectangle's keys and values once; the last rectangle's casts must die
    before the next one's are made, or two sets are live where the plan counts one (found by the property test
    above: bfloat16 inputs, float32 compute, 2 x 4 heads of one query against 199 keys, in two slices)."""
    from lib_memslice.slicing import SlicePlan

    q, k, v = projected_qkv(2, 4, 1, 199, 40, dtype=torch.bfloat16, seed=1)
    kernel = kernels.choose_kernel("sdpa", q, k, v, torch.float32)
    shape = shape_of(q, k, v, torch.float32)
    plan = SlicePlan(4, 1, 2, 1, peak_bytes(shape, 4, 1, kernel), kernel, "auto", "test")
    with PeakTracker() as tracker:
        out = kernels.run_plan(q, k, v, plan, 40**-0.5, None, torch.float32)
    casts = 4 * 199 * 40 * 4 * 2  # one rectangle's keys and values in float32
    # the tracker sees live tensors, not the fused kernel's in-op scratch (which alone exceeds a second set of casts)
    assert casts < tracker.peak <= plan.peak_bytes - kernel.scratch
    ref = reference(q.float(), k.float(), v.float(), 40**-0.5)
    assert (out.double() - ref).abs().max().item() <= DTYPE_TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gain", [1.0, 40.0])
def test_the_unnormalised_softmax_runs_only_where_the_logits_are_bounded(gain, dtype, monkeypatch):
    """float32 and bfloat16 on CPUs: heads whose logits are provably within +-60 skip the softmax's passes (the
    value GEMM sums the rows through a column of ones; the output is divided by it); heads with larger logits (here
    q and k scaled up, up to 40 * 40 * 64 / 8) take the max-subtracting softmax. Both equal the float64 reference;
    neither overflows."""
    from lib_memslice.slicing import SlicePlan

    q, k, v = projected_qkv(2, 4, 300, 280, 64, dtype=dtype)
    q, k = q * gain, k * gain
    kernel = kernels.einsum_kernel("cpu", dtype)
    assert kernel.unnormalised
    taken = []
    real = kernels._slice
    monkeypatch.setattr(kernels, "_slice", lambda *a, **kw: taken.append(a[-1]) or real(*a, **kw))
    plan = SlicePlan(1, 64, 8, 5, 0, kernel, "auto", "test")
    out = kernels.run_plan(q, k, v, plan, 64**-0.5)
    assert set(taken) == {gain == 1.0}  # the bound decides the path, head by head
    assert torch.isfinite(out).all()
    if dtype == torch.bfloat16 and gain > 1:
        return  # bfloat16 logits of about +-1000 are rounded by +-2: no reference to compare with
    ref = reference(q.float(), k.float(), v.float(), 64**-0.5)
    # float32 logits of about +-1000 carry float32's own rounding; bfloat16 rounds the probabilities and output
    tol = (1e-4 if gain == 1.0 else 1e-2) if dtype == torch.float32 else DTYPE_TOL[dtype]
    assert (out.double() - ref).abs().max().item() <= tol * max(1.0, ref.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_logits_bound_holds_at_its_edge(dtype):
    """The bound comes from norms rounded to the compute dtype (bfloat16: 8 bits): it must stay above the true one.
    A query of norm sqrt(6^2 + b^2) against a key of norm 7.5: wherever the kernel calls the slice bounded, the
    float64 product is within LOGIT_BOUND, and well inside it the slice is bounded."""
    d = 8
    k = torch.zeros(1, 1, 4, d, dtype=dtype)
    k[..., 0] = 7.5
    seen = set()
    for b in torch.linspace(4.0, 6.0, 65).tolist():
        q = torch.zeros(1, 1, 3, d, dtype=dtype)
        q[..., 0], q[..., 1] = 6.0, b
        buf = kernels._Buffers(1, 3, q, k, k, dtype, unnormalised=True)
        *_, key_norms = kernels._keys(k, k, 0, 0, 1, buf, True)
        bounded = kernels._bounded(q[0], key_norms, 1.0, buf)
        true = q[0, 0, 0].double().norm().item() * k[0, 0, 0].double().norm().item()
        assert not bounded or true <= kernels.LOGIT_BOUND, (b, true)
        seen.add(bounded)
        if true < 0.95 * kernels.LOGIT_BOUND:
            assert bounded, (b, true)
    assert seen == {True, False}


@pytest.mark.parametrize("v_dim", [40, 81, 512])
def test_every_value_dim_takes_the_unnormalised_path(v_dim, monkeypatch):
    """The row sums are their own pass, not a wider value GEMM, so the unnormalised path pays nothing that grows with
    the value dims: it runs at every width where the logits are bounded (the VAE's 512 too), its live peak is the
    cost model's exactly, and it equals the float64 reference."""
    from lib_memslice.costs import takes_unnormalised
    from lib_memslice.slicing import SlicePlan

    q, k, v = projected_qkv(1, 2, 100, 90, 40, v_dim=v_dim)
    kernel = replace(kernels.einsum_kernel("cpu", torch.float32), workers=1)
    taken = []
    real = kernels._slice
    monkeypatch.setattr(kernels, "_slice", lambda *a, **kw: taken.append(a[-1]) or real(*a, **kw))
    shape = shape_of(q, k, v, q.dtype)
    plan = SlicePlan(1, 50, 2, 2, peak_bytes(shape, 1, 50, kernel), kernel, "auto", "test")
    with PeakTracker() as tracker:
        out = kernels.run_plan(q, k, v, plan, 40**-0.5)
    assert set(taken) == {True} and takes_unnormalised(kernel)
    assert tracker.peak == plan.peak_bytes
    assert (out.double() - reference(q, k, v, 40**-0.5)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float16, marks=requires_cpu_half)])
@pytest.mark.parametrize(
    "rows,queries,keys,dim",
    [
        (1, 7, 300, 24),
        (4, 64, 77, 40),
        (1, 256, 300, 40),
        (1, 1024, 1024, 40),
        (8, 256, 1024, 80),
        (1, 1024, 4096, 40),
        (1, 256, 4096, 512),
    ],
)
def test_half_precision_gemm_scratch_is_bounded(rows, queries, keys, dim, dtype):
    """A half-precision GEMM on a CPU allocates scratch inside the op (oneDNN, or fp16's float32 blocks): the
    bound the cost model adds per worker holds for both of a slice's GEMMs, on whichever torch runs this."""
    from lib_memslice.costs import gemm_scratch
    from memslice_tools.inop import inop_peak_bytes

    q, k = torch.randn(rows, queries, dim).to(dtype), torch.randn(rows, keys, dim).to(dtype)
    vx = torch.randn(rows, keys, dim + 1).to(dtype)
    s, ox = torch.empty(rows, queries, keys, dtype=dtype), torch.empty(rows, queries, dim + 1, dtype=dtype)
    with torch_threads(2):  # oneDNN's scratch grows with threads: one (a one-core CI runner) never reaches the bound
        measured = max(inop_peak_bytes(lambda: s.baddbmm_(q, k.transpose(-1, -2), beta=0, alpha=0.1)),
                       inop_peak_bytes(lambda: torch.bmm(s, vx, out=ox)))  # fmt: skip
    shape = AttentionShape(rows, queries, keys, dim, dim, 2)
    bound = gemm_scratch(shape, rows, queries, kernels.einsum_kernel("cpu", dtype))
    assert measured <= bound, (measured, bound)


def test_at_the_edge_of_memory_the_cpu_einsum_kernel_drops_its_extra_buffers():
    """In a room too small for the staged copies and the unnormalised path's buffers of every worker the call still
    runs: the leanest einsum kernel (one worker, plain softmax, float32 heads read in place) is the last one tried,
    and it fits."""
    from lib_memslice.forwards import BasicHost, attend
    from lib_memslice.settings import Settings
    from lib_memslice.slicing import smallest_need

    q, k, v = projected_qkv(1, 2, 64, 4096, 40)
    shape = shape_of(q, k, v, q.dtype)
    strided = kernels.strided_operands(q, k, v, q.dtype)
    choices = kernels.kernels_after(kernels.einsum_kernel("cpu", q.dtype, strided), "auto", "cpu", q.dtype, strided)
    lean = choices[-1]
    assert lean.workers == 1 and not lean.unnormalised and not lean.staged and choices[0].staged
    needs = [smallest_need(shape, slice_cap=4096, kernel=kernel) for kernel in choices]
    assert needs[-1] < min(needs[:-1])
    room = (needs[-1] + min(needs[:-1])) // 2
    with PeakTracker() as tracker:
        out = attend(q, k, v, scale=40**-0.5, strategy="auto", host=BasicHost(Settings(budget_gb=room / 2**30)))
    assert tracker.peak <= room  # the call's own allocations, its output included
    assert (out.double() - reference(q, k, v, 40**-0.5)).abs().max().item() <= 1e-5


def _clones(call) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::clone")


def _allocating_ops(call) -> set[str]:
    """The outermost op around every allocation ``call`` makes on this thread (profiler memory records; torch 2.3
    stamps them in whole microseconds, one after the end of the ``aten::empty`` that made them: 1 us of slack)."""
    from memslice_tools.inop import memory_timeline

    memory, spans = memory_timeline(call)
    ops = [s for s in spans if s.name.startswith("aten::")]
    found = set()
    for at, nbytes in memory:
        if nbytes <= 0:
            continue
        around = [s for s in ops if s.start_ns <= at <= s.end_ns]
        before = [s for s in ops if at - 1000 <= s.end_ns <= at]  # the op that ended just before it
        if around:
            found.add(max(around, key=lambda s: s.end_ns - s.start_ns).name)
        else:
            found.add(max(before, key=lambda s: s.end_ns).name if before else "(none)")
    return found


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_only_the_buffers_and_the_gemms_allocate(dtype):
    """Everything the einsum kernel allocates is its up-front buffers (``aten::empty``) or a GEMM's in-op scratch
    (bounded per worker by the cost model): the norms that bound the logits are taken in the compute dtype into
    the workers' buffers (a norm asked for in float32 of bfloat16 heads would copy each head to float32 inside the
    op: 2.5 MiB at 1024 px, uncounted), the division and copies write into buffers. One worker: the profiler
    records the calling thread's memory."""
    q, k, v = projected_qkv(2, 4, 700, 300, 40, dtype=dtype)
    kernel = replace(kernels.choose_kernel("einsum", q, k, v, dtype), workers=1)
    assert kernel.unnormalised
    plan = plan_attention(shape_of(q, k, v, dtype), 64 * MiB, kernel=kernel, min_slices=8)
    assert plan.slices >= 8
    with torch.no_grad():
        found = _allocating_ops(lambda: kernels.run_plan(q, k, v, plan, 40**-0.5))
    gemms = {"aten::baddbmm_", "aten::bmm"} if dtype in HALVES else set()
    assert found <= {"aten::empty"} | gemms, found


@pytest.mark.parametrize("dtype", [torch.float32, *HALVES])
def test_no_gemm_clones_its_operands_on_strided_heads(dtype):
    """Heads viewed out of ``[B, N, H*d]`` projections: a CPU GEMM in half precision would clone each strided
    operand inside the op on every slice (memory no tracker sees: 5.9 MiB at 65536 keys, over the GEMM scratch
    bound); the staged kernel copies them into its counted buffers once per run instead. Float32 GEMMs read them
    in place, but slower: they are staged too. The clone check is asked of torch first, so it follows the torch."""
    q, k, v = projected_qkv(1, 2, 256, 1024, 40, dtype=dtype)
    scores = torch.empty(1, 256, 1024, dtype=dtype)
    raw = _clones(lambda: scores.baddbmm_(q[0, :1], k[0, :1].transpose(-1, -2), beta=0, alpha=0.1))
    kernel = kernels.choose_kernel("einsum", q, k, v, dtype)
    assert kernel.staged
    # where this torch's GEMM clones, the rule stages (some CPUs' float16 GEMMs read strided heads in place: staging
    # is then a counted copy that was not needed, never an uncounted one)
    assert raw == 0 or kernel.staged
    for unnormalised in (False, True):
        chosen = replace(kernel, workers=1, unnormalised=unnormalised)
        plan = plan_attention(shape_of(q, k, v, dtype), 64 * MiB, kernel=chosen, min_slices=8)
        assert plan.slices >= 8
        assert _clones(lambda plan=plan: kernels.run_plan(q, k, v, plan, 0.1)) == 0


def test_strided_layouts_are_staged_and_contiguous_or_cast_ones_are_not():
    q, k, v = projected_qkv(2, 4, 64, 77, 40, dtype=torch.bfloat16)
    assert kernels.strided_operands(q, k, v, torch.bfloat16)
    assert not kernels.strided_operands(q, k, v, torch.float32)  # upcast: the cast copies are contiguous already
    contiguous = [t.contiguous() for t in (q, k, v)]
    assert not kernels.strided_operands(*contiguous, torch.bfloat16)
    one_head = projected_qkv(2, 1, 64, 77, 40, dtype=torch.bfloat16)  # a view of one head is contiguous
    assert not kernels.strided_operands(*one_head, torch.bfloat16)
    mixed = (contiguous[0], contiguous[1], v)
    assert kernels.strided_operands(*mixed, torch.bfloat16)
    assert kernels.choose_kernel("einsum", q, k, v, torch.bfloat16).staged
    assert not kernels.choose_kernel("einsum", *contiguous, torch.bfloat16).staged
    assert not kernels.choose_kernel("einsum", q, k, v, torch.float32).staged
    # every fallback of a strided call stages too (the leanest included: a clone would cost the same, uncounted)
    first = kernels.choose_kernel("auto", q, k, v, torch.bfloat16)
    for kernel in kernels.kernels_after(first, "auto", "cpu", torch.bfloat16, True):
        assert kernel.kind != "einsum" or kernel.staged


def test_job_previews_stage_the_unets_heads_and_not_the_vaes_copies():
    from lib_memslice.models import BUILTIN

    kernels_for = kernels.kernels_for_job("cpu", torch.bfloat16, torch.bfloat16, "einsum")
    sites = BUILTIN["sd15"].sites
    unet = next(s for s in sites if not s.vae)
    vae = next(s for s in sites if s.vae)
    assert all(kernel.staged for kernel in kernels_for(unet, 2))
    assert not any(kernel.staged for kernel in kernels_for(vae, 2))
    *staged, lean = kernels_for(unet, 4)  # float32 GEMMs read strided heads, slower: staged but the leanest
    assert staged and all(kernel.staged for kernel in staged) and not lean.staged
