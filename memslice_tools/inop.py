"""What a kernel allocates *inside* one call: a replay of the profiler's memory events.

Why this exists: the dispatch-level tracker (:mod:`.memtrack`) sees only the tensors an op returns, and the
profiler's per-op ``cpu_memory_usage`` is allocations *minus* frees, so scratch that a kernel allocates and frees
before returning nets to zero in both. On CPU, ``scaled_dot_product_attention`` with 4-D ``[B, H, N, d]`` inputs
runs the fused flash kernel (``aten/src/ATen/native/cpu/FlashAttentionKernel.cpp``), which allocates per-thread
buffers in exactly that way. :func:`inop_peak_bytes` replays the profiler's individual ``[memory]`` events in time
order to see that peak; :func:`lib_memslice.cpu_scratch.cpu_fused_scratch` is the runtime's formula for it, checked
against this replay (``tests/test_cpu_scratch.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: The profiler's name for an allocation (+bytes) or free (-bytes) record.
MEMORY_EVENT = "[memory]"


@dataclass(frozen=True)
class OpSpan:
    """One profiled op call: its name and the nanosecond interval the memory records are matched against."""

    name: str
    start_ns: int
    end_ns: int


def _start_ns(event: Any) -> int:
    # torch 2.13 stamps kineto events in ns; 2.1 has only start_us(). Records sharing a microsecond keep the
    # profiler's recording order (seen on 2.1.2), which the stable sort in memory_timeline preserves.
    if hasattr(event, "start_ns"):
        return int(event.start_ns())
    return int(event.start_us()) * 1000


def _duration_ns(event: Any) -> int:
    if hasattr(event, "duration_ns"):
        return int(event.duration_ns())
    return int(event.duration_us()) * 1000


def _is_cpu(event: Any) -> bool:
    device_type = getattr(event, "device_type", None)
    if device_type is None:
        return True
    return str(device_type()).split(".")[-1].upper() == "CPU"


def _kineto_events(fn: Callable[[], Any]) -> list[Any]:
    """The raw profiler records of one ``fn()`` call: ops (with start and duration) and ``[memory]`` records.

    ``prof.events()`` / ``key_averages()`` fold each in-op memory record into its op's net ``cpu_memory_usage``;
    the kineto result underneath keeps every record with its own timestamp and signed byte count, on torch 2.1.2,
    2.11 and 2.13 alike (``prof.profiler.kineto_results.events()``).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    del result
    inner = getattr(prof, "profiler", None)
    kineto = getattr(inner, "kineto_results", None)
    if kineto is None:
        raise RuntimeError("this torch profiler keeps no kineto results: cannot replay memory events")
    return list(kineto.events())


def memory_timeline(fn: Callable[[], Any]) -> tuple[list[tuple[int, int]], list[OpSpan]]:
    """``fn()``'s CPU memory records as ``(time_ns, signed bytes)`` in time order, and its op spans.

    Records with equal timestamps keep the order the profiler reported them in (a stable sort).
    """
    events = _kineto_events(fn)
    memory: list[tuple[int, int]] = []
    spans: list[OpSpan] = []
    for event in events:
        name = event.name()
        if name == MEMORY_EVENT:
            if _is_cpu(event):
                memory.append((_start_ns(event), int(event.nbytes())))
        else:
            start = _start_ns(event)
            spans.append(OpSpan(name, start, start + _duration_ns(event)))
    memory.sort(key=lambda record: record[0])
    return memory, spans


def _replay_peak(records: list[tuple[int, int]]) -> int:
    level = peak = 0
    for _, nbytes in records:
        level += nbytes
        peak = max(peak, level)
    return peak


def inop_peak_bytes(fn: Callable[[], Any], op: str | None = None) -> int:
    """Peak CPU bytes allocated while ``fn()`` runs, above the level at entry, counting memory freed before return.

    Runs ``fn`` once under ``torch.profiler.profile(activities=[CPU], profile_memory=True)`` and replays every
    ``[memory]`` record (allocation +bytes, free -bytes) in time order. With ``op`` (an exact profiler name such as
    ``"aten::scaled_dot_product_attention"``) only records inside that op's calls count, each call replayed from
    zero at its entry, and the largest call's peak is returned. Only allocations made through torch's CPU allocator
    are seen: a kernel that ``malloc``s directly (``std::make_unique`` buffers) is invisible here too.
    """
    memory, spans = memory_timeline(fn)
    if op is None:
        return _replay_peak(memory)
    peak = 0
    for span in spans:
        if span.name == op:
            inside = [r for r in memory if span.start_ns <= r[0] <= span.end_ns]
            peak = max(peak, _replay_peak(inside))
    return peak


def call_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes of ``fn()`` from every thread it uses: the profiler's replay sees in-op scratch but only the
    calling thread (its memory events are recorded per thread), the live-tensor tracker sees the tensors of the
    workers a call starts too (memslice's CPU einsum workers run under the caller's dispatch modes) but nothing an
    op frees before returning. Each is a lower bound of the true peak and exact where the other is blind; the larger
    is taken."""
    from .memtrack import PeakTracker

    tracker = PeakTracker()

    def tracked() -> Any:
        with tracker:
            return fn()

    return max(inop_peak_bytes(tracked), tracker.peak)
