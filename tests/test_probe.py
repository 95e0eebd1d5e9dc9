"""Memory probes: right sources; a number is the truth (0 means exhausted); only failures become an assumption."""

from __future__ import annotations

import logging

import pytest
import torch

from lib_memslice import forwards, probe
from lib_memslice.costs import GiB, MiB
from lib_memslice.forwards import BasicHost, attend
from lib_memslice.limits import NotEnoughMemory
from lib_memslice.settings import Settings

from .conftest import projected_qkv, reference


@pytest.fixture(autouse=True)
def fresh():
    probe._warned.clear()
    forwards._memo.clear()
    yield
    forwards._memo.clear()


def test_cpu_probe_reads_available_memory():
    found = probe.free_memory(torch.device("cpu"))
    assert found.trusted and found.bytes > 0
    assert "MemAvailable" in found.source or "psutil" in found.source or "cgroup" in found.source
    import psutil

    assert abs(found.bytes - psutil.virtual_memory().available) < 0.1 * psutil.virtual_memory().total


def fake_cgroup(monkeypatch, tmp_path, limit, current, inactive=None):
    (tmp_path / "max").write_text(f"{limit}\n")
    (tmp_path / "current").write_text(f"{current}\n")
    stat = "anon 1\n" + ("" if inactive is None else f"inactive_file {inactive}\n") + "active_file 7\n"
    (tmp_path / "stat").write_text(stat)
    monkeypatch.setattr(probe, "_CGROUP_MAX", str(tmp_path / "max"))
    monkeypatch.setattr(probe, "_CGROUP_CURRENT", str(tmp_path / "current"))
    monkeypatch.setattr(probe, "_CGROUP_STAT", str(tmp_path / "stat"))
    monkeypatch.setattr(probe, "_cgroup_limit", False)


def test_cgroup_limit_caps_the_cpu_number(monkeypatch, tmp_path):
    fake_cgroup(monkeypatch, tmp_path, GiB, 256 * MiB)
    found = probe.cpu_free()
    assert found.bytes == 768 * MiB and "cgroup" in found.source
    fake_cgroup(monkeypatch, tmp_path, "max", 0)
    assert "cgroup" not in probe.cpu_free().source


def test_cgroup_page_cache_counts_as_free(monkeypatch, tmp_path):
    """At its limit with reclaimable cache (mmapped model files), a container is not out of memory."""
    fake_cgroup(monkeypatch, tmp_path, GiB, GiB, inactive=300 * MiB)
    assert probe.cpu_free().bytes == 300 * MiB
    fake_cgroup(monkeypatch, tmp_path, GiB, GiB + 10 * MiB)  # over the limit, nothing reclaimable
    found = probe.free_memory(torch.device("cpu"))
    assert found.bytes == 0 and found.trusted


@pytest.mark.parametrize("device", ["privateuseone:0", "dml", "meta"])
def test_unknown_backends_fall_back_and_say_so_once(device, caplog):
    with caplog.at_level(logging.WARNING, logger="memslice"):
        found = probe.free_memory(device)
        probe.free_memory(device)
    assert not found.trusted and found.bytes == probe.FALLBACK_FREE
    assert sum("assuming" in r.getMessage() for r in caplog.records) == 1  # said once, not per call


def lying_cpu_probe(monkeypatch, answer):
    """Make the CPU probe raise ``answer`` (an exception) or return it as the free byte count."""

    def fake():
        if isinstance(answer, Exception):
            raise answer
        return probe.FreeMemory(answer, "fake")

    monkeypatch.setattr(probe, "cpu_free", fake)


@pytest.mark.parametrize("reading", [0, -1, -5 * GiB])
def test_a_reading_of_zero_or_less_is_exhaustion_not_plenty(monkeypatch, reading):
    lying_cpu_probe(monkeypatch, reading)
    found = probe.free_memory(torch.device("cpu"))
    assert found.bytes == 0 and found.trusted
    q, k, v = projected_qkv(2, 4, 128, 128, 16)
    with pytest.raises(NotEnoughMemory, match="nothing free"):
        attend(q, k, v, scale=0.25, strategy="auto", host=BasicHost())


@pytest.mark.parametrize("answer", [float("nan"), None, "lots", True, RuntimeError("driver gone")])
def test_only_failures_and_non_numbers_become_the_stated_assumption(monkeypatch, answer):
    lying_cpu_probe(monkeypatch, answer)
    found = probe.free_memory(torch.device("cpu"))
    assert found.bytes == probe.FALLBACK_FREE and not found.trusted and "assumed" in found.source
    q, k, v = projected_qkv(2, 4, 128, 128, 16)
    out = attend(q, k, v, scale=0.25, strategy="auto", host=BasicHost())
    assert (out.double() - reference(q, k, v, 0.25)).abs().max() < 1e-5


def test_float_readings_are_numbers(monkeypatch):
    lying_cpu_probe(monkeypatch, 1.5 * GiB)
    found = probe.free_memory(torch.device("cpu"))
    assert found.bytes == int(1.5 * GiB) and found.trusted and isinstance(found.bytes, int)


def test_a_failing_probe_warns_once_per_cause_not_per_value(monkeypatch, caplog):
    """Readings fluctuate: keyed on the value, the warning would repeat on every call."""
    with caplog.at_level(logging.WARNING, logger="memslice"):
        for i in range(5):
            lying_cpu_probe(monkeypatch, RuntimeError(f"driver gone after {i} ms"))
            probe.free_memory(torch.device("cpu"))
        for value in (float("nan"), "x", None):
            lying_cpu_probe(monkeypatch, value)
            probe.free_memory(torch.device("cpu"))
    warnings = [r.getMessage() for r in caplog.records if "assuming" in r.getMessage()]
    assert len(warnings) == 2  # one for the RuntimeError cause, one for "not a number"


def test_budget_is_free_over_safety_factor_or_the_override():
    free = probe.FreeMemory(33 * GiB, "test")
    assert probe.budget_for(free, Settings()).bytes == int(33 * GiB / 3.3)
    assert probe.budget_for(free, Settings(safety_factor=1.0)).bytes == 33 * GiB
    fixed = probe.budget_for(free, Settings(budget_gb=2.5))
    assert fixed.bytes == int(2.5 * GiB) and "fixed" in fixed.explanation and fixed.fixed
    assert probe.device_budget("privateuseone:0", Settings(budget_gb=1)).bytes == GiB  # no probe needed


def test_device_kinds():
    assert probe.device_kind(torch.device("cpu")) == "cpu"
    assert probe.device_kind(torch.device("cuda:1")) == "cuda"
    assert probe.device_kind("mps") == "mps"
    assert probe.device_kind("privateuseone:0") == "unknown"


# --- CUDA: the precise probe before slicing, refusing or degrading ---------------------------------------------


class FakeCuda:
    """torch.cuda's memory functions as seen on a GPU after a VAE decode: the driver reports little free while
    torch's caching allocator holds gigabytes it is not using."""

    def __init__(self, driver_free, reserved, active):
        self.driver_free, self.reserved, self.active = driver_free, reserved, active
        self.stats_calls = 0

    def mem_get_info(self, device=None):
        return self.driver_free, 80 * GiB

    def memory_stats(self, device=None):
        self.stats_calls += 1
        return {"reserved_bytes.all.current": self.reserved, "active_bytes.all.current": self.active}


def cuda_attend(monkeypatch, fake, setting, strategy="auto"):
    """attend() as on CUDA, run on CPU tensors: the device kind and the probe are CUDA's, the kernel choice the
    CPU's fused kernel (what a CUDA device offers too)."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", fake.mem_get_info)
    monkeypatch.setattr(torch.cuda, "memory_stats", fake.memory_stats)
    monkeypatch.setattr(probe, "device_kind", lambda device: "cuda")
    q, k, v = projected_qkv(2, 8, 1024, 1024, 40)
    host = BasicHost(Settings(kernel=setting))
    out = attend(q, k, v, scale=40**-0.5, strategy=strategy, host=host)
    assert (out.double() - reference(q, k, v, 40**-0.5)).abs().max() < 1e-5
    return host.stats.recent()[-1]


@pytest.mark.parametrize("setting", ["auto", "einsum", "sdpa"])
def test_cuda_asks_the_precise_probe_before_refusing_or_degrading(monkeypatch, setting):
    """Cheap 4 MiB, precise 8 GiB: every setting plans against 8 GiB / 3.3 (the hires pass after a VAE decode)."""
    fake = FakeCuda(4 * MiB, 8 * GiB, 0)
    record = cuda_attend(monkeypatch, fake, setting)
    assert fake.stats_calls >= 1
    assert record.budget_bytes == int((4 * MiB + 8 * GiB) / 3.3)
    if setting != "einsum":
        assert record.kernel_used == "fused" and record.slices == 1


def test_cuda_skips_the_precise_probe_when_the_cheap_number_is_plenty(monkeypatch):
    fake = FakeCuda(40 * GiB, 8 * GiB, 0)
    record = cuda_attend(monkeypatch, fake, "auto")
    assert fake.stats_calls == 0 and record.slices == 1
