"""Measuring: regimes, peaks (every CPU allocation, in-op scratch included), and interleaved timing rounds.

A regime is whether torch's fused SDPA kernels may run and how much free memory every contender is told. The
no-fused regime turns the fused backends off (``sdpa_kernel([SDPBackend.MATH])``; the CPU flash kernel obeys the
same switches), which reproduces on a CPU the situation of Apple MPS, DirectML and ROCm without fused attention.

Peaks: :func:`lib_memslice.inop.inop_peak_bytes` replays the profiler's allocation events, so what a kernel
allocates and frees inside an op counts too; the output is allocated inside the call and counts; the inputs do
not (the largest-size search in :mod:`.limits` counts them). Times: all contenders of a case and regime run one
after another in each round, rounds repeated, so drift and busy neighbours hit them alike; a ratio is the median
of per-round ratios.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from lib_memslice.costs import MiB, format_bytes

from . import inop
from .contenders import Call, Case, Contender, make_inputs
from .largest import sdpa_math_only, traced_cpu, traced_peak

Tensor = torch.Tensor


@dataclass(frozen=True)
class Regime:
    """Fused kernels allowed or not, and the free memory every contender is told (None: ample)."""

    fused: bool
    free: int | None
    label: str

    @property
    def name(self) -> str:
        return f"{'fused' if self.fused else 'no fused kernel'}, {self.label}"

    @property
    def budgeted(self) -> bool:
        return self.free is not None

    def context(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext() if self.fused else sdpa_math_only()


def budget_label(free: int) -> str:
    return f"{free / 1024**3:g} GiB" if free >= 1024**3 else f"{free / MiB:g} MiB"


def applicable(contender: Contender, case: Case, regime: Regime) -> str:
    """Why a contender does not run here ("" when it does)."""
    if case.site.vae and not contender.vae:
        return "leaves the VAE's attention alone"
    if contender.family != "memslice" and regime.label.startswith("tight"):
        return "the tight budget checks memslice's plans only"
    if contender.family == "webui" and regime.fused and regime.free is not None:
        return "runs as with no fused kernel (sdp: as plain SDPA); measured there and with ample memory"
    if not regime.fused and contender.name == "sdp-no-mem":
        return "switches the fused flash kernel back on (on MPS/DirectML it equals sdp)"
    if not regime.fused and contender.name == "sdpa":
        return "the fused reference (timed in the fused regime)"
    return ""


@dataclass
class Entry:
    """One contender prepared for one case and regime."""

    contender: Contender
    regime: Regime
    call: Call
    row: dict[str, Any] = field(default_factory=dict)
    times: list[float] = field(default_factory=list)

    def run(self) -> Tensor:
        with self.regime.context():
            return self.call()


def does_not_fit(exc: BaseException) -> bool:
    """memslice's NotEnoughMemory, the webui's RuntimeError, an allocator's out-of-memory: a result, not a crash."""
    return isinstance(exc, (RuntimeError, MemoryError))


def short_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def available_ram() -> int:
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return int(psutil.virtual_memory().available)


def guard(contender: Contender, case: Case, regime: Regime) -> str:
    """A real run that would not fit this machine's memory is not started: its traced peak says so."""
    traced = traced_peak(contender, case, case.pixels, regime.free, regime.fused, available_ram(), inputs=False)
    if traced is not None and traced > 0.6 * available_ram():
        return f"would need {format_bytes(traced)}, more than this machine can spare: not run"
    return ""


def prepare(contender: Contender, case: Case, regime: Regime, qkv: list[Tensor]) -> Entry:
    return Entry(contender, regime, contender.prepare(case, list(qkv), regime.free))  # its own list: see contenders


def measure(entry: Entry, reference: Tensor | None) -> None:
    """The peak run (also the first warm-up and the error check); fills ``entry.row``."""
    row = entry.row
    row.update(contender=entry.contender.name, regime=entry.regime.name, budget_bytes=entry.regime.free)
    out: list[Tensor] = []
    try:
        with entry.regime.context(), profiler_chatter_hidden():
            peak = inop.inop_peak_bytes(lambda: out.append(entry.call()))
    except Exception as exc:
        if not does_not_fit(exc):
            raise
        exc.__traceback__ = None
        row.update(status="does not fit", message=short_error(exc))
        return
    row.update(status="ok", measured_peak_bytes=peak)
    host = getattr(entry.call, "host", None)
    if host is not None and host.stats.recent():
        r = host.stats.recent()[-1]
        row.update(slices=r.slices, kernel_used=r.kernel_used, predicted_peak_bytes=r.peak_bytes,
                   plan_room_bytes=r.room_bytes, heads_per_slice=r.heads_per_slice,
                   queries_per_slice=r.queries_per_slice)  # fmt: skip
    if reference is not None:
        row["max_abs_error"] = float((as_layout(out[0], reference).float() - reference.float()).abs().max())
    out.clear()


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's thread count set to ``n`` for the block, then put back (the CPU einsum kernel: a worker a thread;
    the fused kernel's and oneDNN's scratch grow with threads). The tools' and the tests' one."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def profiler_chatter_hidden() -> Iterator[None]:
    """torch 2.13's profiler writes two 'USDT: ... profiler_start/stop' lines to stderr per use: keep the
    benchmark's log readable, pass anything else through."""
    import os
    import sys
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            for line in sink.read().decode(errors="replace").splitlines():
                if not line.startswith("USDT:"):
                    print(line, file=sys.stderr)


@contextlib.contextmanager
def quiet_gc() -> Iterator[None]:
    """No cycle collection inside timed calls (it runs between rounds)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def time_rounds(entries: list[Entry], rounds: int, budget_s: float, log: Callable[[str], None]) -> None:
    """Interleaved rounds: each entry once per round, in turn; fewer rounds (at least 2) when the time runs out."""
    started = time.perf_counter()
    for r in range(rounds):
        gc.collect()
        with quiet_gc():
            for entry in entries[r % len(entries) :] + entries[: r % len(entries)]:  # rotated: no fixed position
                start = time.perf_counter()
                entry.run()
                entry.times.append(time.perf_counter() - start)
        if r >= 1 and time.perf_counter() - started > budget_s:
            log(f"      time budget spent after {r + 1} rounds")
            break
    for entry in entries:
        ms = sorted(t * 1e3 for t in entry.times)
        entry.row.update(median_ms=statistics.median(ms), min_ms=ms[0], max_ms=ms[-1], rounds=len(ms), times_ms=ms)


def paired_ratio(a: Entry, b: Entry) -> float | None:
    """Median over rounds of a's time / b's time in the same round."""
    pairs = list(zip(a.times, b.times, strict=False))
    return statistics.median(x / y for x, y in pairs) if pairs else None


def as_layout(out: Tensor, reference: Tensor) -> Tensor:
    """VAE results come as ``[b, c, h, w]`` (the webui's) or ``[b, 1, hw, c]`` (memslice, SDPA): compare alike."""
    if out.shape == reference.shape:
        return out
    b, _, n, c = out.shape
    side = round(n**0.5)
    return out[:, 0].transpose(1, 2).reshape(b, c, side, n // side)


def reference_output(case: Case, qkv: list[Tensor], contenders: dict[str, Contender]) -> Tensor:
    """Plain SDPA's output (fused, as the CPU runs it) every other result is compared with, in the webui's layout."""
    out = contenders["sdpa"].prepare(case, list(qkv), None)()
    if case.site.vae:
        b, c, h, w = qkv[0].shape
        out = out[:, 0].transpose(1, 2).reshape(b, c, h, w)
    return out


def run_case(
    case: Case,
    contenders: list[Contender],
    regimes: list[Regime],
    timed: Callable[[Contender, Regime], bool],
    rounds: int,
    budget_s: float,
    log: Callable[[str], None],
    fused_rounds: int | None = None,
) -> dict[str, Any]:
    """Every contender in every regime at one case: a peak run each, then timing rounds per regime (``fused_rounds``
    in the fused regime with ample memory, where memslice-auto and plain SDPA differ by a few microseconds)."""
    by_name = {c.name: c for c in contenders}
    qkv = make_inputs(case, "cpu")
    reference = reference_output(case, qkv, by_name)
    fused_reference = prepare(by_name["sdpa"], case, Regime(True, None, "ample"), qkv)
    measure(fused_reference, reference)
    s = case.shape
    result: dict[str, Any] = {
        "key": case.key,
        "label": case.label,
        "site": case.site.name,
        "pixels": case.pixels,
        "shape": {
            "batch_heads": s.batch_heads,
            "heads": s.heads,
            "q_tokens": s.q_tokens,
            "k_tokens": s.k_tokens,
            "head_dim": s.head_dim,
            "score_bytes": s.score_bytes,
            "output_bytes": s.output_bytes,
        },
        "regimes": [],
    }
    for regime in regimes:
        entries: list[Entry] = []
        rows = []
        for contender in contenders:
            why = applicable(contender, case, regime)
            if not why and contender.family != "memslice" and contender.name != "sdpa" and not timed(contender, regime):
                why = "not measured in this mode"
            why = why or guard(contender, case, regime)
            if why:
                rows.append({"contender": contender.name, "regime": regime.name, "status": "not run", "message": why})
                continue
            entry = prepare(contender, case, regime, qkv)
            measure(entry, reference)
            rows.append(entry.row)
            if entry.row.get("status") == "ok" and timed(contender, regime):
                entries.append(entry)
        group = [*entries, fused_reference]
        log(f"    {regime.name}: {len(rows)} contenders, {len(entries)} timed")
        ample = regime.fused and regime.free is None
        time_rounds(group, fused_rounds or rounds if ample else rounds, budget_s, log)
        auto = next((e for e in entries if e.contender.name == "memslice-auto"), None)
        for entry in entries:
            entry.row["vs_fused"] = paired_ratio(entry, fused_reference)
            if auto is not None and entry is not auto:
                entry.row["memslice_auto_vs_this"] = paired_ratio(auto, entry)
        for row in rows:
            line = f"      {row['contender']:<20} {row.get('status', '')}"
            if row.get("median_ms") is not None:
                line += f" {row['median_ms']:9.1f} ms"
            if row.get("measured_peak_bytes") is not None:
                line += f"  peak {format_bytes(row['measured_peak_bytes'])}"
            log(line)
        fused_reference.times.clear()
        result["regimes"].append({"name": regime.name, "fused": regime.fused, "budget_bytes": regime.free,
                                  "results": rows})  # fmt: skip
    result["fused_reference"] = {k: v for k, v in fused_reference.row.items() if k != "times_ms"}
    del qkv
    gc.collect()
    return result


__all__ = ["Regime", "budget_label", "run_case", "traced_cpu"]
