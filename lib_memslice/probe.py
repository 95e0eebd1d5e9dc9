"""Free memory per device kind, and the attention budget derived from it.

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
import sys
from dataclasses import dataclass
from typing import Any

from .costs import GiB
from .settings import Settings

log = logging.getLogger("memslice")

#: What memslice assumes is free where nothing can be measured (DirectML and other out-of-tree backends).
FALLBACK_FREE = 4 * GiB

DEVICE_KINDS = ("cuda", "mps", "xpu", "cpu", "unknown")


@dataclass(frozen=True)
class FreeMemory:
    """Bytes free on a device and where the number came from (shown in logs, status and the CLI)."""

    bytes: int
    source: str
    trusted: bool = True


def device_kind(device: Any) -> str:
    """``cuda`` / ``mps`` / ``xpu`` / ``cpu``, or ``unknown`` for backends without a trustworthy probe."""
    kind = getattr(device, "type", None) or str(device).split(":")[0]
    return kind if kind in DEVICE_KINDS else "unknown"


_warned: set[str] = set()


def _warn_once(key: str, message: str, *args: object) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


# --- CPU -------------------------------------------------------------------------------------------------

_CGROUP_MAX = "/sys/fs/cgroup/memory.max"
_CGROUP_CURRENT = "/sys/fs/cgroup/memory.current"
_CGROUP_STAT = "/sys/fs/cgroup/memory.stat"
_cgroup_limit: int | bool | None = False  # False: not looked up yet


def _read(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 8192)
    finally:
        os.close(fd)


def _inactive_file() -> int:
    """Page cache the kernel reclaims before it kills for the cgroup's limit (counted in memory.current)."""
    try:
        text = _read(_CGROUP_STAT)
        start = text.index(b"inactive_file ") + 14
        return int(text[start : text.index(b"\n", start)])
    except (OSError, ValueError):
        return 0


def _cgroup_headroom() -> int | None:
    """Bytes left under a cgroup v2 memory limit (containers), or None where there is no limit. Reclaimable page
    cache (``inactive_file``) counts as free, as the kernel and kubelet's working set count it."""
    global _cgroup_limit
    if _cgroup_limit is False:
        try:
            text = _read(_CGROUP_MAX).strip()
            _cgroup_limit = None if text == b"max" else int(text)
        except (OSError, ValueError):
            _cgroup_limit = None
    if _cgroup_limit is None:
        return None
    try:
        used = int(_read(_CGROUP_CURRENT).strip())
    except (OSError, ValueError):
        return None
    return max(0, int(_cgroup_limit) - used + _inactive_file())


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
            if headroom is not None and headroom < available:
                return FreeMemory(headroom, "cgroup memory.max - memory.current + inactive_file")
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


def mps_free() -> FreeMemory:
    """Metal's recommended working set minus what the driver has allocated (unified memory)."""
    import torch

    mps = torch.mps
    if hasattr(mps, "recommended_max_memory") and hasattr(mps, "driver_allocated_memory"):
        return FreeMemory(
            int(mps.recommended_max_memory()) - int(mps.driver_allocated_memory()),
            "mps recommended working set - driver allocated",
        )
    _warn_once("mps", "memslice: this torch cannot report Metal memory; using available system memory")
    return FreeMemory(cpu_free().bytes, "system available (old torch on mps)", trusted=False)


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
        "memslice: %s; assuming %d GiB free. Set 'Memory budget (GiB)' in Settings > Memory slicing for a real number.",
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
        return FreeMemory(0, f"{found.source} (nothing free)", found.trusted)
    return (
        found if value == found.bytes and type(found.bytes) is int else FreeMemory(value, found.source, found.trusted)
    )


@dataclass(frozen=True)
class Budget:
    """Bytes one attention call may allocate, how that number was reached, and whether the user fixed it."""

    bytes: int
    free: FreeMemory | None
    explanation: str
    fixed: bool = False
    safety_factor: float = 1.0


def budget_for(free: FreeMemory | None, settings: Settings) -> Budget:
    """The user's fixed budget if set, else free memory divided by the safety factor."""
    if settings.budget_gb > 0:
        value = int(settings.budget_gb * GiB)
        return Budget(value, free, f"fixed budget {settings.budget_gb:g} GiB", fixed=True)
    if free is None:
        free = _fallback("any", "no number", "no free-memory number was given")
    factor = settings.safety_factor if math.isfinite(settings.safety_factor) else 3.3
    factor = max(factor, 1.0)
    return Budget(int(free.bytes / factor), free, f"{free.source} / safety factor {factor:g}", safety_factor=factor)


def device_budget(device: Any, settings: Settings, precise: bool = False) -> Budget:
    """Probe ``device`` (unless the budget is fixed) and derive the budget."""
    if settings.budget_gb > 0:
        return budget_for(None, settings)
    return budget_for(free_memory(device, precise), settings)
