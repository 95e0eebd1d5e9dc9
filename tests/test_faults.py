"""Faults: missing pieces of the environment and concurrent use degrade to clear messages and correct results."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch

from lib_memslice import kernels
from lib_memslice.forwards import BasicHost, attend
from lib_memslice.plan import NotEnoughMemory
from lib_memslice.settings import Settings

from .conftest import ROOT, projected_qkv, reference
from .test_webui import TITLES, select


def test_core_works_without_the_webui_and_the_glue_says_what_is_missing():
    code = (
        "import lib_memslice.plan, lib_memslice.kernels, lib_memslice.forwards, lib_memslice.cli, sys\n"
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


def test_no_output_when_nothing_fits_after_retries(monkeypatch):
    q, k, v = projected_qkv(1, 2, 64, 64, 8)
    attempts = []

    def failing(*args, **kwargs):
        attempts.append(1)
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(kernels, "_chunk", failing)
    host = BasicHost(Settings(budget_gb=64, slice_cap=8, kernel="einsum"))
    result = None
    with pytest.raises(NotEnoughMemory):
        result = attend(q, k, v, scale=1.0, strategy="auto", host=host)
    assert result is None and host.stats.total_failures == 1
    assert len(attempts) == 4  # 1, 2, 4 and 8 slices were each tried once


def failing_at(fail_at, real):
    calls = []

    def chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("MPS backend out of memory (MPS allocated: 9 GB)")
        return real(*args, **kwargs)

    return chunk


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_first_middle_last_chunk_oom_through_attend(monkeypatch, where):
    q, k, v = projected_qkv(2, 4, 300, 300, 16)
    host = BasicHost(Settings(budget_gb=1 / 1024, kernel="einsum", slice_cap=256))
    attend(q, k, v, scale=0.25, strategy="auto", host=host)
    steps = host.stats.recent()[-1].steps
    assert steps >= 4
    fail_at = {"first": 1, "middle": steps // 2, "last": steps}[where]
    monkeypatch.setattr(kernels, "_chunk", failing_at(fail_at, kernels._chunk))
    out = attend(q, k, v, scale=0.25, strategy="auto", host=host)
    record = host.stats.recent()[-1]
    assert record.retries == 1 and record.steps >= 2 * steps
    assert (out.double() - reference(q, k, v, 0.25)).abs().max() < 1e-5


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
