"""Free memory per device kind: what the next allocation can really get.

A probe runs whenever a call is planned, so each one is a handful of microseconds: no ``memory_stats()`` dict
on CUDA unless the cheap number would make a plan slice or fail, and ``/proc/meminfo`` (not psutil) on Linux CPUs.

A number is the truth: a reading of 0 or less means nothing is free (a cgroup at its limit, Metal's working set
overcommitted, CUDA's driver memory exhausted) and planning then refuses cleanly. Only a probe that raises or
answers something that is not a number is replaced by a stated assumption, warned once per device kind and cause.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Any

from .costs import GiB

log = logging.getLogger("memslice")

#: What memslice assumes is free where nothing can be measured (DirectML and other out-of-tree backends).
FALLBACK_FREE = 4 * GiB

DEVICE_KINDS = ("cuda", "mps", "xpu", "cpu", "unknown")


@dataclass(frozen=True)
class FreeMemory:
    """Bytes free on a device and where the number came from (shown in logs, status and the CLI).

    ``ceiling``: where a device grants more than it runs well with (Apple's unified memory: Metal's recommended
    working set is ``bytes``, the allocator grants more until the Mac swaps), the most that can be had at all; a
    plan past ``bytes`` but within it is *tight*. None: ``bytes`` is the limit."""

    bytes: int
    source: str
    trusted: bool = True
    ceiling: int | None = None


def device_kind(device: Any) -> str:
    """``cuda`` / ``mps`` / ``xpu`` / ``cpu``, or ``unknown`` for backends without a trustworthy probe."""
    kind = getattr(device, "type", None) or str(device).split(":")[0]
    return kind if kind in DEVICE_KINDS else "unknown"


_warned: set[str] = set()


def _warn_once(key: str, message: str, *args: object) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


# --- CPU ---------------------------------------------------------------------------------------------------

#: Where the kernel says this process's cgroups are, and where their hierarchies are mounted (tests point these at
#: a fake tree).
PROC_SELF = "/proc/self"


def _read(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 65536)
    finally:
        os.close(fd)


def _number(path: str) -> int | None:
    """A byte count from a cgroup file; None for "max", a missing file or garbage."""
    try:
        text = _read(path).strip()
    except OSError:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _stat(path: str, key: bytes) -> int:
    try:
        text = _read(path)
        start = text.index(b"\n" + key + b" ") + len(key) + 2 if not text.startswith(key + b" ") else len(key) + 1
        return int(text[start : text.index(b"\n", start)])
    except (OSError, ValueError):
        return 0


@dataclass(frozen=True)
class CgroupLevel:
    """One cgroup directory with a memory limit: the files that say how much of it is used."""

    path: str
    limit: int
    v2: bool

    def headroom(self) -> int | None:
        """Bytes left under the limit; reclaimable page cache (inactive file pages) counts as free, as the kernel
        reclaims it before it kills for the limit (and kubelet's working set leaves it out)."""
        usage = _number(os.path.join(self.path, "memory.current" if self.v2 else "memory.usage_in_bytes"))
        if usage is None:
            return None
        cache = _stat(os.path.join(self.path, "memory.stat"), b"inactive_file" if self.v2 else b"total_inactive_file")
        return max(0, self.limit - usage + cache)


def _mounts() -> list[tuple[str, str, bool]]:
    """(hierarchy root, mount point, v2) of the cgroup v2 hierarchy and the v1 memory controller."""
    found = []
    try:
        lines = _read(os.path.join(PROC_SELF, "mountinfo")).decode(errors="replace").splitlines()
    except OSError:
        return found
    for line in lines:
        head, _, tail = line.partition(" - ")
        fields, after = head.split(), tail.split()
        if len(fields) < 5 or len(after) < 3:
            continue
        if after[0] == "cgroup2":
            found.append((fields[3], fields[4], True))
        elif after[0] == "cgroup" and "memory" in after[2].split(","):
            found.append((fields[3], fields[4], False))
    return found


def cgroup_levels() -> list[CgroupLevel]:
    """Every cgroup with a memory limit from this process's own cgroup up to its hierarchy's mounted root, v2 and
    v1 (``/proc/self/cgroup`` gives the path, ``/proc/self/mountinfo`` where each hierarchy is mounted and which of
    its directories the mount shows: inside a container's cgroup namespace the own path is ``/``)."""
    try:
        lines = _read(os.path.join(PROC_SELF, "cgroup")).decode(errors="replace").splitlines()
    except OSError:
        return []
    own = {}
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[0] == "0" and parts[1] == "":
            own[True] = parts[2]
        elif len(parts) == 3 and "memory" in parts[1].split(","):
            own[False] = parts[2]
    levels = []
    for root, mount, v2 in _mounts():
        path = own.get(v2)
        if path is None:
            continue
        relative = os.path.relpath(path, root) if path.startswith(root) else "."
        here = os.path.normpath(os.path.join(mount, relative))
        if not os.path.isdir(here):
            here = mount  # a path from another namespace: the mount shows our own cgroup
        while True:
            limit = _number(os.path.join(here, "memory.max" if v2 else "memory.limit_in_bytes"))
            if limit is not None and limit < 1 << 60:  # v1 says "no limit" with a huge number
                levels.append(CgroupLevel(here, limit, v2))
            if os.path.normpath(here) == os.path.normpath(mount) or len(here) <= len(mount):
                break
            here = os.path.dirname(here)
    return levels


_levels: list[CgroupLevel] | None = None


def _cgroup_headroom() -> tuple[int, str] | None:
    """The tightest headroom of any limited cgroup this process is in (looked up once), or None without limits."""
    global _levels
    if _levels is None:
        try:
            _levels = cgroup_levels()
        except Exception:  # an unreadable tree: no limit known
            _levels = []
    best = None
    for level in _levels:
        room = level.headroom()
        if room is not None and (best is None or room < best[0]):
            best = (room, f"cgroup {'v2' if level.v2 else 'v1'} limit of {level.path}")
    return best


def _meminfo_available() -> int | None:
    try:
        text = _read("/proc/meminfo")
        start = text.index(b"MemAvailable:") + 13
        return int(text[start : text.index(b"kB", start)]) * 1024
    except (OSError, ValueError):
        return None


def cpu_free() -> FreeMemory:
    """Available system memory (Linux: MemAvailable, capped by a cgroup limit; elsewhere psutil)."""
    if sys.platform.startswith("linux"):
        available = _meminfo_available()
        if available is not None:
            headroom = _cgroup_headroom()
            if headroom is not None and headroom[0] < available:
                return FreeMemory(headroom[0], f"{headroom[1]} - usage + inactive file cache")
            return FreeMemory(available, "/proc/meminfo MemAvailable")
    import psutil  # the webui ships it; imported lazily because Linux never needs it

    return FreeMemory(int(psutil.virtual_memory().available), "psutil available")


# --- accelerators ----------------------------------------------------------------------------------------


def cuda_free(device: Any, precise: bool = False) -> FreeMemory:
    """Driver free memory; with ``precise``, plus what torch's caching allocator holds but does not use.

    The allocator's spare blocks need ``memory_stats()`` (a large dict), so callers ask for them only when the
    cheap number would make them slice.
    """
    import torch

    free, _total = torch.cuda.mem_get_info(device)
    if not precise:
        return FreeMemory(int(free), "cuda driver free")
    stats = torch.cuda.memory_stats(device)
    spare = stats.get("reserved_bytes.all.current", 0) - stats.get("active_bytes.all.current", 0)
    return FreeMemory(int(free) + max(0, int(spare)), "cuda driver free + torch reserved-but-inactive")


#: torch's MPS allocator refuses allocations past this many times Metal's recommended working set (its default
#: ``default_high_watermark_ratio``; ``PYTORCH_MPS_HIGH_WATERMARK_RATIO`` overrides it, 0.0 = no limit). Read from
#: ``aten/src/ATen/mps/MPSAllocator.h`` / ``.mm`` (torch 2.1-2.13: ``m_max_total_allowed_size = ratio x
#: max_device_size()``, and cached blocks are released and the allocation retried before it fails).
MPS_HIGH_WATERMARK_RATIO = 1.7


def mps_watermark_ratio() -> float:
    """The ratio torch's MPS allocator runs with: the environment's, parsed as ``strtod`` would (a number prefix,
    else 0.0: no limit), or the default."""
    text = os.environ.get("PYTORCH_MPS_HIGH_WATERMARK_RATIO")
    if text is None:
        return MPS_HIGH_WATERMARK_RATIO
    match = re.match(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", text)
    return float(match.group(0)) if match else 0.0


def _physical_memory() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def mps_recommended() -> tuple[int, str]:
    """Metal's recommended working set: torch's own answer (``torch.mps.recommended_max_memory``, torch >= 2.5), or
    on older torch (the webui's Apple pin is 2.3.1) the rule macOS applies on Apple Silicon: two thirds of the RAM
    up to 36 GB, three quarters above (what ``recommendedMaxWorkingSetSize`` reports on 8-192 GB Macs)."""
    import torch

    ask = getattr(torch.mps, "recommended_max_memory", None)
    if ask is not None:
        return int(ask()), "recommended working set"
    ram = _physical_memory()
    share = 2 / 3 if ram <= 36 * 10**9 else 3 / 4
    return int(
        ram * share
    ), f"recommended working set ({'2/3' if share < 0.7 else '3/4'} of RAM: this torch cannot read it)"


def _resident_bytes() -> int:
    """This process's resident CPU memory (psutil, which the webui ships); 0 where it cannot be read."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:
        return 0


def mps_free() -> FreeMemory:
    """Apple's unified memory: what fits is Metal's recommended working set less what tensors occupy (blocks the
    allocator caches for reuse count as free: it releases them before refusing). Past it torch's allocator still
    grants up to its limit (the watermark ratio x the working set; ratio 0.0: no limit), but the GPU then pages and
    the Mac swaps: that is the ``ceiling`` (a tight plan), and never more than the physical memory less what this
    process holds (its resident CPU memory and its tensors; on unified memory the two may overlap, which only
    lowers the ceiling)."""
    import torch

    mps = torch.mps
    if not hasattr(mps, "current_allocated_memory"):
        _warn_once("mps", "memslice: this torch cannot report Metal memory; using available system memory")
        return FreeMemory(cpu_free().bytes, "system available (old torch on mps)", trusted=False)
    tensors = int(mps.current_allocated_memory())
    recommended, source = mps_recommended()
    ratio = mps_watermark_ratio()
    ram = _physical_memory() - _resident_bytes() - tensors
    granted = int(ratio * recommended) - tensors if ratio > 0 else ram
    ceiling = min(granted, ram)
    limit = f"MPS limit {ratio:g} x the working set" if ratio > 0 else "no MPS limit (watermark ratio 0)"
    return FreeMemory(min(recommended - tensors, ceiling), f"{source} - tensors (tight up to {limit}, within RAM)",
                      ceiling=max(0, ceiling))  # fmt: skip


def xpu_free(device: Any) -> FreeMemory:
    import torch

    xpu = torch.xpu
    if hasattr(xpu, "mem_get_info"):
        free, _total = xpu.mem_get_info(device)
        spare = int(xpu.memory_reserved(device)) - int(xpu.memory_allocated(device))
        return FreeMemory(int(free) + max(0, spare), "xpu free + torch reserved-but-unused")
    total = int(xpu.get_device_properties(device).total_memory)
    return FreeMemory(total - int(xpu.memory_allocated(device)), "xpu total - torch allocated", trusted=False)


def _fallback(kind: str, cause: str, why: str) -> FreeMemory:
    """The stated assumption, warned once per device kind and cause (not per value: readings fluctuate)."""
    _warn_once(
        f"{kind}:{cause}",
        "memslice: %s; assuming %d GiB free. Set 'Attention budget (GiB)' in Settings > Memory slicing for a real "
        "number.",
        why,
        FALLBACK_FREE // GiB,
    )
    return FreeMemory(FALLBACK_FREE, f"assumed ({why})", trusted=False)


def _as_bytes(value: Any) -> int | None:
    """An integral byte count from a probe's answer; None for anything that is not a finite number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return int(value)
    return None


def free_memory(device: Any, precise: bool = False) -> FreeMemory:
    """Free bytes on ``device``. Never raises. A reading of 0 or less is 0 free (trusted); a probe that raises or
    answers a non-number becomes the stated assumption."""
    kind = device_kind(device)
    try:
        if kind == "cuda":
            found = cuda_free(device, precise)
        elif kind == "mps":
            found = mps_free()
        elif kind == "xpu":
            found = xpu_free(device)
        elif kind == "cpu":
            found = cpu_free()
        else:
            return _fallback(kind, "no probe", f"no memory probe for device {device}")
    except Exception as exc:  # a probe must never cost a generation
        return _fallback(kind, type(exc).__name__, f"the {kind} memory probe failed ({type(exc).__name__}: {exc})")
    value = _as_bytes(found.bytes)
    if value is None:
        return _fallback(kind, "not a number", f"the {kind} memory probe answered {found.bytes!r}")
    if value <= 0:
        return FreeMemory(0, f"{found.source} (nothing free)", found.trusted, found.ceiling)
    return (
        found
        if value == found.bytes and type(found.bytes) is int
        else FreeMemory(value, found.source, found.trusted, found.ceiling)
    )
