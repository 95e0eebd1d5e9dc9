"""Memory probes: right sources, and a failing or absurd probe degrades to a stated fallback."""

from __future__ import annotations

import logging

import pytest
import torch

from lib_memslice import probe
from lib_memslice.forwards import BasicHost, attend
from lib_memslice.plan import GiB
from lib_memslice.settings import Settings

from .conftest import projected_qkv, reference


@pytest.fixture(autouse=True)
def fresh():
    probe._warned.clear()
    yield


def test_cpu_probe_reads_available_memory():
    found = probe.free_memory(torch.device("cpu"))
    assert found.trusted and found.bytes > 0
    assert "MemAvailable" in found.source or "psutil" in found.source or "cgroup" in found.source
    import psutil

    assert abs(found.bytes - psutil.virtual_memory().available) < 0.1 * psutil.virtual_memory().total


def test_cgroup_limit_caps_the_cpu_number(monkeypatch, tmp_path):
    (tmp_path / "max").write_text("1073741824\n")
    (tmp_path / "current").write_text("268435456\n")
    monkeypatch.setattr(probe, "_CGROUP_MAX", str(tmp_path / "max"))
    monkeypatch.setattr(probe, "_CGROUP_CURRENT", str(tmp_path / "current"))
    monkeypatch.setattr(probe, "_cgroup_limit", False)
    found = probe.cpu_free()
    assert found.bytes == 768 * 1024 * 1024 and "cgroup" in found.source
    monkeypatch.setattr(probe, "_cgroup_limit", False)
    (tmp_path / "max").write_text("max\n")
    assert "cgroup" not in probe.cpu_free().source


@pytest.mark.parametrize("device", ["privateuseone:0", "dml", "meta"])
def test_unknown_backends_fall_back_and_say_so(device, caplog):
    with caplog.at_level(logging.WARNING, logger="memslice"):
        found = probe.free_memory(device)
        probe.free_memory(device)
    assert not found.trusted and found.bytes == probe.FALLBACK_FREE
    assert sum("assuming" in r.getMessage() for r in caplog.records) == 1  # said once, not per call


def lying_cpu_probe(monkeypatch, garbage):
    """Make the CPU probe raise ``garbage`` (an exception) or return it as the free byte count."""

    def fake():
        if isinstance(garbage, Exception):
            raise garbage
        return probe.FreeMemory(garbage, "fake")

    monkeypatch.setattr(probe, "cpu_free", fake)


@pytest.mark.parametrize("garbage", [-1, 0, float("nan"), None, "lots", RuntimeError("driver gone")])
def test_garbage_probe_results_fall_back(monkeypatch, garbage):
    lying_cpu_probe(monkeypatch, garbage)
    found = probe.free_memory(torch.device("cpu"))
    assert found.bytes == probe.FALLBACK_FREE and not found.trusted


@pytest.mark.parametrize("garbage", [-1, 0, float("nan"), RuntimeError("boom")])
def test_attention_stays_correct_when_the_probe_lies(monkeypatch, garbage):
    lying_cpu_probe(monkeypatch, garbage)
    q, k, v = projected_qkv(2, 4, 128, 128, 16)
    out = attend(q, k, v, scale=0.25, strategy="auto", host=BasicHost())
    assert (out.double() - reference(q, k, v, 0.25)).abs().max() < 1e-5


def test_budget_is_free_over_safety_factor_or_the_override():
    free = probe.FreeMemory(33 * GiB, "test")
    assert probe.budget_for(free, Settings()).bytes == int(33 * GiB / 3.3)
    assert probe.budget_for(free, Settings(safety_factor=1.0)).bytes == 33 * GiB
    fixed = probe.budget_for(free, Settings(budget_gb=2.5))
    assert fixed.bytes == int(2.5 * GiB) and "fixed" in fixed.explanation
    assert probe.device_budget("privateuseone:0", Settings(budget_gb=1)).bytes == GiB  # no probe needed


def test_device_kinds():
    assert probe.device_kind(torch.device("cpu")) == "cpu"
    assert probe.device_kind(torch.device("cuda:1")) == "cuda"
    assert probe.device_kind("mps") == "mps"
    assert probe.device_kind("privateuseone:0") == "unknown"
