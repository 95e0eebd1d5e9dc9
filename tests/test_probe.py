"""Memory probes: right sources; a number is the truth (0 means exhausted); only failures become an assumption."""

from __future__ import annotations

import logging
import os

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


def cgroup_tree(monkeypatch, tmp_path, levels, *, v2=True, own="/kubepods/pod1/ctr", root="/"):
    """A fake /proc/self and cgroup hierarchy: ``levels`` maps cgroup paths (relative to the hierarchy's root) to
    (limit or "max", usage, inactive file bytes). The hierarchy is mounted at ``<tmp>/cg`` showing ``root``."""
    proc = tmp_path / "proc"
    proc.mkdir(exist_ok=True)
    mount = tmp_path / "cg"
    kind = "cgroup2 cgroup2 rw" if v2 else "cgroup cgroup rw,memory"
    (proc / "mountinfo").write_text(
        f"22 1 0:21 / /proc rw,nosuid - proc proc rw\n30 25 0:26 {root} {mount} rw,nosuid,nodev - {kind}\n"
    )
    (proc / "cgroup").write_text(f"0::{own}\n" if v2 else f"5:cpu:/\n4:memory:{own}\n2:pids:/\n")
    for path, (limit, usage, inactive) in levels.items():
        relative = os.path.relpath(path, root) if path.startswith(root) else None
        if relative is None:
            continue
        here = mount / relative
        here.mkdir(parents=True, exist_ok=True)
        if v2:
            (here / "memory.max").write_text(f"{limit}\n")
            (here / "memory.current").write_text(f"{usage}\n")
            (here / "memory.stat").write_text(f"anon 1\ninactive_file {inactive}\nactive_file 7\n")
        else:
            (here / "memory.limit_in_bytes").write_text(f"{(1 << 63) - 4096 if limit == 'max' else limit}\n")
            (here / "memory.usage_in_bytes").write_text(f"{usage}\n")
            (here / "memory.stat").write_text(f"cache 5\ninactive_file 9\ntotal_inactive_file {inactive}\n")
    monkeypatch.setattr(probe, "PROC_SELF", str(proc))
    monkeypatch.setattr(probe, "_levels", None)


@pytest.mark.parametrize("v2", [True, False], ids=["v2", "v1"])
def test_the_tightest_cgroup_limit_on_the_own_path_or_a_parent_caps_the_cpu_number(monkeypatch, tmp_path, v2):
    """A limit on the pod (a parent) and one on the container itself: the smaller headroom wins, whichever level."""
    levels = {"/": ("max", 9 * GiB, 0), "/kubepods": ("max", 8 * GiB, 0),
              "/kubepods/pod1": (2 * GiB, GiB, 0), "/kubepods/pod1/ctr": (3 * GiB, GiB + 512 * MiB, 0)}  # fmt: skip
    cgroup_tree(monkeypatch, tmp_path, levels, v2=v2)
    found = probe.cpu_free()
    assert found.bytes == GiB and "pod1" in found.source and "ctr" not in found.source
    levels["/kubepods/pod1/ctr"] = (GiB + 768 * MiB, GiB + 512 * MiB, 0)
    cgroup_tree(monkeypatch, tmp_path, levels, v2=v2)
    found = probe.cpu_free()
    assert found.bytes == 256 * MiB and found.source.split(" - ")[0].endswith("ctr")


def test_no_cgroup_limit_leaves_meminfo(monkeypatch, tmp_path):
    cgroup_tree(monkeypatch, tmp_path, {"/": ("max", GiB, 0), "/kubepods/pod1/ctr": ("max", GiB, 0)})
    assert "MemAvailable" in probe.cpu_free().source


def test_inside_a_cgroup_namespace_the_mount_shows_the_own_cgroup(monkeypatch, tmp_path):
    """In a container with its own cgroup namespace /proc/self/cgroup says "/" and the mount is the container's."""
    cgroup_tree(monkeypatch, tmp_path, {"/": (GiB, 256 * MiB, 0)}, own="/")
    assert probe.cpu_free().bytes == 768 * MiB
    # a path from the host's namespace that this mount does not show: the mounted root is the own cgroup
    cgroup_tree(monkeypatch, tmp_path, {"/": (GiB, 512 * MiB, 0)}, own="/docker/abc123")
    assert probe.cpu_free().bytes == 512 * MiB


@pytest.mark.parametrize("v2", [True, False], ids=["v2", "v1"])
def test_cgroup_page_cache_counts_as_free(monkeypatch, tmp_path, v2):
    """At its limit with reclaimable cache (mmapped model files), a container is not out of memory."""
    cgroup_tree(monkeypatch, tmp_path, {"/kubepods/pod1/ctr": (GiB, GiB, 300 * MiB)}, v2=v2)
    assert probe.cpu_free().bytes == 300 * MiB
    cgroup_tree(monkeypatch, tmp_path, {"/kubepods/pod1/ctr": (GiB, GiB + 10 * MiB, 0)}, v2=v2)  # over, nothing
    found = probe.free_memory(torch.device("cpu"))
    assert found.bytes == 0 and found.trusted


# --- Apple MPS: what torch's allocator will still grant -----------------------------------------------------


class FakeMps:
    """torch.mps's memory functions: Metal's recommended working set (torch >= 2.5 only), what the driver holds
    (tensors plus the allocator's cached pools) and what tensors occupy."""

    def __init__(self, recommended, driver, tensors, old=False):
        self.driver, self.tensors = driver, tensors
        if not old:
            self.recommended_max_memory = lambda: recommended

    def driver_allocated_memory(self):
        return self.driver

    def current_allocated_memory(self):
        return self.tensors


def on_mps(monkeypatch, fake, ratio=None, ram=64 * GiB, resident=GiB):
    monkeypatch.setattr(torch, "mps", fake, raising=False)
    monkeypatch.setattr(probe, "_physical_memory", lambda: ram)
    monkeypatch.setattr(probe, "_resident_bytes", lambda: resident)
    if ratio is None:
        monkeypatch.delenv("PYTORCH_MPS_HIGH_WATERMARK_RATIO", raising=False)
    else:
        monkeypatch.setenv("PYTORCH_MPS_HIGH_WATERMARK_RATIO", ratio)
    return probe.free_memory("mps")


def test_mps_fits_within_the_recommended_working_set_with_cached_pools_free(monkeypatch):
    """The reported case: recommended 10.7 GiB, driver 11 GiB (cached pools included), tensors 8 GiB. A probe of the
    driver's memory said 0 free and refused every call; the cached pools are free (the allocator releases them
    before refusing). Past the working set torch still grants up to 1.7 x it: tight, not free."""
    found = on_mps(monkeypatch, FakeMps(int(10.7 * GiB), 11 * GiB, 8 * GiB))
    assert found.bytes == int(10.7 * GiB) - 8 * GiB and found.trusted
    assert found.ceiling == int(1.7 * int(10.7 * GiB)) - 8 * GiB and "1.7" in found.source


def test_an_8_gib_mac_never_reads_more_than_it_has(monkeypatch):
    """The review's case: an 8 GiB Mac read 9.07 GiB free (1.7 x its working set) and SDXL at 1024 "fit"."""
    ram = 8 * GiB
    found = on_mps(monkeypatch, FakeMps(int(ram * 2 / 3), GiB, GiB // 2), ram=ram, resident=2 * GiB)
    assert found.bytes == int(ram * 2 / 3) - GiB // 2  # the working set less the tensors
    assert found.ceiling == ram - 2 * GiB - GiB // 2 < int(1.7 * int(ram * 2 / 3)) - GiB // 2  # RAM binds
    assert found.bytes <= found.ceiling < ram


def test_mps_honours_the_watermark_ratio(monkeypatch):
    fake = FakeMps(10 * GiB, 9 * GiB, 6 * GiB)
    assert on_mps(monkeypatch, fake, "1.0").ceiling == 4 * GiB == on_mps(monkeypatch, fake, "1.0").bytes
    two = on_mps(monkeypatch, fake, "2.0")
    assert two.ceiling == 14 * GiB and two.bytes == 4 * GiB
    unlimited = on_mps(monkeypatch, fake, "0.0", ram=32 * GiB)  # no limit: RAM less what the process holds
    assert unlimited.ceiling == 32 * GiB - GiB - 6 * GiB and unlimited.bytes == 4 * GiB
    assert "no MPS limit" in unlimited.source
    assert on_mps(monkeypatch, fake, "0.5").bytes == 0  # the allocator refuses before the working set


def test_mps_over_the_recommended_working_set_is_tight_up_to_the_limit(monkeypatch):
    found = on_mps(monkeypatch, FakeMps(10 * GiB, 14 * GiB, 13 * GiB))
    assert found.bytes == 0 and found.ceiling == 17 * GiB - 13 * GiB
    at_limit = on_mps(monkeypatch, FakeMps(10 * GiB, 18 * GiB, 18 * GiB))
    assert at_limit.bytes == 0 and at_limit.ceiling == 0


def test_mps_on_the_apple_pins_torch_estimates_the_working_set_from_ram(monkeypatch):
    """torch 2.3.1 (the webui's Apple pin) has no recommended_max_memory: 2/3 of RAM up to 36 GB, 3/4 above."""
    found = on_mps(monkeypatch, FakeMps(0, 2 * GiB, GiB, old=True), ram=16 * 10**9)
    assert found.bytes == int(16 * 10**9 * 2 / 3) - GiB and "2/3 of RAM" in found.source
    assert found.ceiling == 16 * 10**9 - GiB - GiB < int(1.7 * int(16 * 10**9 * 2 / 3)) - GiB  # RAM binds
    assert on_mps(monkeypatch, FakeMps(0, 0, 0, old=True), ram=64 * 10**9).bytes == int(64 * 10**9 * 3 / 4)


@pytest.mark.parametrize(("text", "ratio"), [("1.5", 1.5), ("0", 0.0), ("2.0x", 2.0), ("abc", 0.0), (" 1e0", 1.0)])
def test_the_watermark_ratio_is_parsed_as_torch_parses_it(monkeypatch, text, ratio):
    monkeypatch.setenv("PYTORCH_MPS_HIGH_WATERMARK_RATIO", text)
    assert probe.mps_watermark_ratio() == ratio


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
    assert record.room_bytes == int((4 * MiB + 8 * GiB) / 3.3)
    if setting != "einsum":
        assert record.kernel_used == "fused" and record.slices == 1


def test_cuda_skips_the_precise_probe_when_the_cheap_number_is_plenty(monkeypatch):
    fake = FakeCuda(40 * GiB, 8 * GiB, 0)
    record = cuda_attend(monkeypatch, fake, "auto")
    assert fake.stats_calls == 0 and record.slices == 1
