"""Faults: missing pieces of the environment and concurrent use degrade to clear messages and correct results."""

from __future__ import annotations

import re
import subprocess
import sys
import threading

import pytest
import torch

from lib_memslice import kernels, probe
from lib_memslice.costs import AttentionShape
from lib_memslice.forwards import BasicHost, attend
from lib_memslice.limits import NotEnoughMemory
from lib_memslice.settings import Settings
from lib_memslice.slicing import smallest_need

from .conftest import ROOT, projected_qkv, reference, torch_threads
from .test_webui import TITLES, select


def test_core_works_without_the_webui_and_the_glue_says_what_is_missing():
    code = (
        "import lib_memslice.slicing, lib_memslice.kernels, lib_memslice.forwards, lib_memslice.cli, sys\n"
        "assert 'modules' not in sys.modules\n"
        "try:\n    import lib_memslice.webui\nexcept ImportError as e:\n    print('glue:', e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "glue: No module named 'modules'" in done.stdout


def test_extension_script_without_a_working_glue_logs_and_does_not_raise(webui, monkeypatch, caplog):
    import builtins

    from .webui_env import load_script, purge  # noqa: F401

    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name == "lib_memslice" and args and args[2] and "webui" in args[2]:
            raise ImportError("simulated: the glue cannot import")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken)
    module = load_script()
    assert module.memslice is None
    script = module.MemsliceScript()
    script.process(object())  # inert, not crashing
    script.postprocess(object(), object())


def test_missing_sgm_patches_ldm_only(webui, monkeypatch):
    for name in ("sgm", "sgm.modules", "sgm.modules.attention", "sgm.modules.diffusionmodules",
                 "sgm.modules.diffusionmodules.model"):  # fmt: skip
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if the repository were absent
    select(webui, TITLES["auto"])
    assert webui.ldm_attention.CrossAttention.forward.__memslice__ == "auto"
    layer = webui.ldm_attention.CrossAttention(query_dim=32, heads=2, dim_head=16)
    assert layer(torch.randn(1, 5, 32)).shape == (1, 5, 32)


OOM = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


class Failing:
    """Fault injection: wrap a kernel step and raise ``error`` on the chosen calls (1-based), else behave."""

    def __init__(self, real, fail_at, error):
        self.real, self.fail_at, self.error, self.calls = real, set(fail_at), error, 0
        self.lock = threading.Lock()  # the CPU einsum kernel's workers call it from several threads

    def __call__(self, *args, **kwargs):
        with self.lock:
            self.calls += 1
            call = self.calls
        if call in self.fail_at:
            raise self.error
        return self.real(*args, **kwargs)


def test_no_output_when_nothing_fits_after_retries(monkeypatch):
    q, k, v = projected_qkv(1, 2, 64, 64, 8)
    fake = Failing(kernels._slice, range(1, 10_000), OOM("CUDA out of memory"))
    monkeypatch.setattr(kernels, "_slice", fake)
    host = BasicHost(Settings(budget_gb=64, slice_cap=8, kernel="einsum"))
    result = None
    with pytest.raises(
        NotEnoughMemory, match=r"einsum (\(\d workers\) )?kernel at 2, 4 and 8 slices \(predicted "
    ) as info:
        result = attend(q, k, v, scale=1.0, strategy="auto", host=host)
    assert result is None and host.stats.total_failures == 1
    assert "twice the slices would pass the slice cap (8)" in str(info.value)
    # the attention budget (64 GiB) was evidently more than the device had: no size from it, and the advice says so
    assert "lower it to what is free" in str(info.value) and "fit: about" not in str(info.value)
    # 2 (one head per slice), 4 and 8 slices: each attempt fails at its first slice (per worker on CPUs); then 8
    # slices on the leaner kernels of the chain (one worker, the leanest)
    assert listed_attempts(str(info.value))[:3] == [2, 4, 8]
    assert 3 <= fake.calls <= 3 * torch.get_num_threads() + 2


def test_a_call_that_cannot_be_cut_further_says_so_after_trying_the_leaner_kernels(monkeypatch):
    """The review's case: a 2 x 2 call (two rows of batch x heads, two queries) ran out at every plan, and the error
    said no plan with twice the slices fit the free memory, when the call could not be cut further and the
    one-worker kernel's smaller peak had never been tried."""
    q, k, v = projected_qkv(1, 2, 2, 64, 8)
    fake = Failing(kernels._slice, range(1, 10_000), OOM("CUDA out of memory"))
    monkeypatch.setattr(kernels, "_slice", fake)
    attempts = []
    real_run = kernels.run_plan
    monkeypatch.setattr(kernels, "run_plan", lambda *a, **k: attempts.append(a[3]) or real_run(*a, **k))
    with torch_threads(2), pytest.raises(NotEnoughMemory) as info:
        attend(q, k, v, scale=1.0, strategy="auto", host=BasicHost(Settings(budget_gb=64, kernel="einsum")))
    text = str(info.value)
    assert "the call cannot be cut further (2 rows of batch x heads x 2 queries" in text
    assert "twice the slices" not in text and "raise the slice cap" not in text
    assert [plan.slices for plan in attempts][-1] == 4 and {plan.kernel.workers for plan in attempts} == {1, 2}
    assert attempts[-1].peak_bytes < min(p.peak_bytes for p in attempts if p.kernel.workers == 2)
    assert "einsum (2 workers) kernel at" in text and "on the einsum kernel at 4 slices" in text


def listed_attempts(text):
    """The slice counts an out-of-memory error lists, kernel by kernel, in order."""
    found = []
    for match in re.finditer(r"kernel at ([\d, and]+?) slices? \(predicted", text):
        found += [int(n) for n in match.group(1).replace(" and ", ", ").split(", ")]
    return found


def test_a_plan_over_the_safety_margin_that_runs_out_says_only_what_was_tried(monkeypatch):
    """The reported case: the smallest-peak plan (run because only the safety factor refused) ran out once, and
    the error claimed every slice count had been tried and advised a higher slice cap although memory bound."""
    q, k, v = projected_qkv(1, 2, 64, 64, 8)
    shape = AttentionShape(2, 64, 64, 8, heads=2)
    need = smallest_need(shape, slice_cap=64, kernel=kernels.einsum_kernel("cpu", torch.float32))
    free = shape.input_bytes + int(need * 1.5)  # over the room (free / 3.3), within free memory itself
    monkeypatch.setattr(probe, "free_memory", lambda device, precise=False: probe.FreeMemory(free, "test"))
    fake = Failing(kernels._slice, range(1, 10_000), OOM("CUDA out of memory"))
    monkeypatch.setattr(kernels, "_slice", fake)
    attempts = []
    real_run = kernels.run_plan
    monkeypatch.setattr(kernels, "run_plan", lambda *a, **k: attempts.append(a[3].slices) or real_run(*a, **k))
    with pytest.raises(NotEnoughMemory) as info:
        attend(q, k, v, scale=1.0, strategy="auto", host=BasicHost(Settings(slice_cap=64, kernel="einsum")))
    text = str(info.value)
    assert listed_attempts(text) == attempts  # exactly the plans that ran out, no more
    assert "every slice count" not in text
    if "free now" in text:  # memory stopped the retries: a higher cap is not the remedy
        assert "raise the slice cap" not in text
    else:
        assert "pass the slice cap (64)" in text


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("error", [
    OOM("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("MPS backend out of memory (MPS allocated: 9 GB)"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
    RuntimeError("Could not allocate tensor with 1073741824 bytes. There is not enough GPU video memory available!"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    MemoryError(),
], ids=lambda e: type(e).__name__ + str(len(str(e))))  # fmt: skip
def test_an_einsum_slice_that_runs_out_of_memory_is_retried_with_twice_the_slices(monkeypatch, where, error):
    q, k, v = projected_qkv(2, 4, 300, 300, 16)
    host = BasicHost(Settings(budget_gb=1 / 1024, kernel="einsum", slice_cap=4096))
    attend(q, k, v, scale=0.25, strategy="auto", host=host)
    slices = host.stats.recent()[-1].slices
    assert slices >= 4
    fail_at = {"first": 1, "middle": slices // 2, "last": slices}[where]
    monkeypatch.setattr(kernels, "_slice", Failing(kernels._slice, [fail_at], error))
    out = attend(q, k, v, scale=0.25, strategy="auto", host=host)
    record = host.stats.recent()[-1]
    assert record.retries == 1 and record.slices >= 2 * slices and record.kernel_used == "einsum"
    assert (out.double() - reference(q, k, v, 0.25)).abs().max() < 1e-5


def test_a_fused_call_that_runs_out_of_memory_goes_to_einsum_after_one_try(monkeypatch):
    """Slicing a fused call never needs less than its output: no doubling up to the cap, einsum instead."""
    q, k, v = projected_qkv(2, 4, 300, 300, 16)
    fake = Failing(kernels._sdpa, range(1, 10_000), OOM("CUDA out of memory"))
    monkeypatch.setattr(kernels, "_sdpa", fake)
    host = BasicHost(Settings(budget_gb=1))
    out = attend(q, k, v, scale=0.25, strategy="auto", host=host)
    record = host.stats.recent()[-1]
    assert fake.calls == 1 and record.kernel_used == "einsum" and record.retries == 1
    assert (out.double() - reference(q, k, v, 0.25)).abs().max() < 1e-5


def test_a_fused_call_that_copies_its_inputs_is_retried_sliced_once(monkeypatch):
    q, k, v = projected_qkv(2, 4, 300, 300, 16, dtype=torch.bfloat16)  # upcast: the fused call casts q, k, v
    fake = Failing(kernels._sdpa, [1], OOM("CUDA out of memory"))
    monkeypatch.setattr(kernels, "_sdpa", fake)
    host = BasicHost(Settings(budget_gb=1))
    attend(q, k, v, scale=0.25, strategy="auto", host=host, upcast=True)
    record = host.stats.recent()[-1]
    assert record.kernel_used == "fused" and record.slices == 2 and record.retries == 1


def test_a_fused_call_with_no_einsum_to_go_to_says_the_output_does_not_fit(monkeypatch):
    q, k, v = projected_qkv(2, 4, 300, 300, 16)
    monkeypatch.setattr(kernels, "_sdpa", Failing(kernels._sdpa, range(1, 100), OOM("CUDA out of memory")))
    with pytest.raises(NotEnoughMemory, match="more slices cannot shrink a fused call's output") as info:
        attend(q, k, v, scale=0.25, strategy="auto", host=BasicHost(Settings(budget_gb=1, kernel="sdpa")))
    assert "on the fused kernel at 1 slice (predicted" in str(info.value)
    assert "einsum" not in str(info.value)  # kernel=sdpa: never tried, never named


def test_after_a_fused_oom_the_einsum_kernel_gets_one_try_not_a_loop(monkeypatch):
    """A real CUDA run (make gpu-check) went fused -> einsum -> 12 doublings to 8192 slices: now one einsum try."""
    q, k, v = projected_qkv(2, 4, 300, 300, 16)
    fused = Failing(kernels._sdpa, range(1, 100), OOM("CUDA out of memory"))
    einsum = Failing(kernels._slice, range(1, 10_000), OOM("CUDA out of memory"))
    monkeypatch.setattr(kernels, "_sdpa", fused)
    monkeypatch.setattr(kernels, "_slice", einsum)
    with pytest.raises(NotEnoughMemory, match="more slices cannot shrink a fused call's output") as info:
        attend(q, k, v, scale=0.25, strategy="auto", host=BasicHost(Settings()))
    assert fused.calls == 1 and einsum.calls == 1
    assert "fused kernel at 1 slice" in str(info.value) and "and on the einsum kernel at " in str(info.value)


def test_retry_off_reraises_the_original_error(monkeypatch):
    q, k, v = projected_qkv(1, 2, 64, 64, 8)
    monkeypatch.setattr(kernels, "_slice", Failing(kernels._slice, [1], OOM("out of memory")))
    with pytest.raises(OOM):
        attend(q, k, v, scale=1.0, strategy="auto", host=BasicHost(Settings(kernel="einsum", oom_retry=False)))


@pytest.mark.parametrize("threads", [1, 2])
def test_errors_that_are_not_out_of_memory_are_not_retried(monkeypatch, threads):
    """Every slice fails: a retry would run the kernel again. With two workers both may have started a slice before
    the first error stops the pool, so one attempt is at most one call per worker."""
    q, k, v = projected_qkv(1, 2, 64, 64, 8)
    fake = Failing(kernels._slice, range(1, 10_000), RuntimeError("shape mismatch"))
    monkeypatch.setattr(kernels, "_slice", fake)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with pytest.raises(RuntimeError, match="shape mismatch"):
            attend(q, k, v, scale=1.0, strategy="auto", host=BasicHost(Settings(kernel="einsum")))
    finally:
        torch.set_num_threads(before)
    assert 1 <= fake.calls <= threads


def test_concurrent_attention_calls_share_a_host_safely():
    host = BasicHost(Settings(budget_gb=1 / 1024, kernel="einsum"))
    results, errors = {}, []

    def worker(i):
        try:
            q, k, v = projected_qkv(1, 2, 200 + i, 77, 16, seed=i)
            out = attend(q, k, v, scale=0.25, strategy="auto", host=host, site=f"t{i}")
            results[i] = (out.double() - reference(q, k, v, 0.25)).abs().max().item()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 8 and max(results.values()) < 1e-5
    assert sorted(r.site for r in host.stats.recent()) == sorted(f"t{i}" for i in range(8))
