"""No fused kernel, near-fused speed: memslice-auto against the fused kernel and the webui's built-ins.

Where no fused SDPA kernel runs (Apple MPS, DirectML, ROCm without fused attention, masks, upcast), memslice runs its
einsum kernel. On a CPU that regime is reproduced with the fused backends off (``sdpa_kernel([SDPBackend.MATH])``);
the fused kernel's own time at the same shape, with the backends on, is the limit no slicing can beat. Per case
(site, size), threads and dtype, and for each free-memory number every contender is told:

- **memslice-auto** with that number as its attention budget;
- every **webui 1.10.1 built-in** whose traced peak keeps that number (the others would not run on such a device);
- the **fused kernel** (plain SDPA on 4-D views);
- the **torch ops floor** (:func:`ops_floor`): memslice's plan reduced to the torch ops its einsum kernel cannot do
  without. Where those alone are slower than the fused kernel (bfloat16 on torch 2.13), the fused kernel is out of
  reach by any kernel built from them, and the report's target is stated against the floor, measured in the same
  rounds, instead of against a constant.

A contender whose plan is the same at both numbers (its slice count) is timed once and reused. All run in
interleaved rounds; a round runs a contender's call back to back for about ``ROUND_S`` (the count fixed from its
warm-up call) and samples wall time, the CPU time of this process (all its threads) and the share of the machine
other processes used meanwhile (``/proc/stat``); times are per call. A ratio is the median of per-round ratios.
The **contended** cases run the same with a background process keeping one core busy, started and stopped here.
The **slice-size sweep** times memslice-auto's einsum kernel with other score-buffer targets than its rule's, so the
report shows how far the rule is from the best size measured.

Cases are SD1.5's, and SD3 Medium's joint attention (``mmdit.joint``: 24 heads of 64 over the prompt's 154 tokens and
the image's patches, one image's cond + uncond: 48 rows of 4250 tokens at 1024 px), which no webui built-in touches
in the webui (its SD3 runs plain SDPA): the built-ins' rules are applied to its q, k and v as they would be to a
UNet layer's, the best of them what memslice-auto is compared with.
"""

from __future__ import annotations

import contextlib
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from lib_memslice import forwards, strategies
from lib_memslice.costs import GiB, MiB, takes_unnormalised
from lib_memslice.kernels import LOG2_E

from .contenders import MEMSLICE_AUTO, SDPA, Case, Contender, make_case, make_inputs
from .largest import sdpa_math_only, traced_peak

Tensor = torch.Tensor
FREES = (256 * MiB, 1 * GiB)
#: memslice's einsum kernel reduced to the torch ops it cannot do without (:func:`ops_floor`), timed in the same
#: rounds: where these alone are slower than the fused kernel (bfloat16 on torch 2.13, whose elementwise ops on
#: CPUs take about a cycle per element), the fused kernel is out of reach and they are the bound instead
FLOOR = "torch ops floor"
BUILTINS = ("Doggettx", "InvokeAI-cpu", "InvokeAI-cuda", "sub-quadratic", "V1", "sdp")
SWEEP_MIB = (2, 4, 8, 16, 32)
#: A timed call that takes more fresh pages than this from the OS (minor page faults, 4 KiB each: 64 MiB) while
#: glibc keeps freed memory is run again in the same slot, up to twice: the heap grew under it (a block larger
#: than any free one), which a warmed-up caching allocator does once, not per call; the times measure the
#: computation, and the report counts the repeats per contender. Measured on torch 2.1.2: one such round of a
#: built-in took 2628 ms against 529-537 ms, with 196608 faults (768 MiB) in it and none in the others.
FRESH_PAGES_LIMIT = 16384
#: A round times back-to-back calls for at least this long (at most MAX_CALLS of them; how many is set from the
#: warm-up call, the same for every round): a 20 ms call timed once per round moved up to 2.2x between rounds on
#: this shared host (torch 2.13, the VAE at 512 px in bf16: 17.9-39.8 ms), its process CPU time with it.
ROUND_S = 0.2
MAX_CALLS = 16
_keeps_freed_memory = False


def caching_allocator() -> str:
    """Make glibc's malloc keep freed memory, as a warmed-up caching allocator does (tcmalloc, which the webui's
    launcher preloads when installed): no mapping and page-faulting of every fresh large block. With glibc's
    defaults every fresh tensor over its mmap threshold (128 KiB, raised up to 32 MiB as blocks are freed) is mapped
    and page-faulted on each call, which makes the built-ins that allocate fresh 32 MiB score tensors per slice
    about 3x slower (a faster memslice by comparison, but not the strongest baseline). Returns what ran."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        gnu = ctypes.CFUNCTYPE(ctypes.c_char_p)(("gnu_get_libc_version", libc))()
    except (OSError, AttributeError):
        return "the system allocator (not glibc: left as it is)"
    m_trim_threshold, m_mmap_max = -1, -4
    if libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1):
        global _keeps_freed_memory
        _keeps_freed_memory = True
        return f"glibc {gnu.decode()} malloc, set to keep freed memory (mmap and trimming off, mallopt)"
    return f"glibc {gnu.decode()} malloc (mallopt refused: defaults)"


def cpu_sample() -> tuple[float, float, float]:
    """(wall, this process's CPU seconds, the machine's busy CPU seconds)."""
    own = os.times()
    busy = 0.0
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        pass
    return time.perf_counter(), own.user + own.system, busy


@dataclass
class Timed:
    """One contender at one plan: the call, and per round wall ms, process CPU ms, others' share of the machine."""

    name: str
    call: Callable[[], Any]
    fused: bool
    frees: list[int]
    plan: str = ""
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    others: list[float] = field(default_factory=list)
    faults: list[int] = field(default_factory=list)
    repeats: int = 0  # calls run again because the heap grew under them (FRESH_PAGES_LIMIT)
    calls: int = 1  # back-to-back calls per round (ROUND_S); the times are per call

    def run_once(self) -> None:
        cpus = os.cpu_count() or 1
        with contextlib.nullcontext() if self.fused else sdpa_math_only():
            for attempt in range(3):
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                w0, c0, b0 = cpu_sample()
                for _ in range(self.calls):
                    self.call()
                w1, c1, b1 = cpu_sample()
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
                if not _keeps_freed_memory or faults <= FRESH_PAGES_LIMIT or attempt == 2:
                    break
                self.repeats += 1
            self.faults.append(faults)
        wall = w1 - w0
        self.wall.append(wall * 1e3 / self.calls)
        self.cpu.append((c1 - c0) * 1e3 / self.calls)
        # /proc/stat counts in clock ticks (10 ms): a short call's share is coarse, so it is clamped to 0-1
        self.others.append(min(1.0, max(0.0, (b1 - b0) - (c1 - c0)) / max(wall * cpus, 1e-9)))

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "plan": self.plan, "frees": self.frees, "wall_ms": self.wall, "cpu_ms": self.cpu,
                "others_share": self.others, "page_faults": self.faults, "repeats": self.repeats,
                "calls_per_round": self.calls, "median_ms": statistics.median(self.wall),
                "steadiness": max(self.wall) / min(self.wall)}  # fmt: skip


def _ratio(a: Timed, b: Timed) -> float:
    return statistics.median(x / y for x, y in zip(a.wall, b.wall, strict=False))


def _memslice_plan(call: Callable[[], Any]) -> str:
    record = call.host.stats.recent()[-1]  # type: ignore[attr-defined]
    return f"{record.slices} slices of {record.heads_per_slice}x{record.queries_per_slice} ({record.kernel_used})"


def ops_floor(case: Case, record: Any) -> Callable[[], None] | None:
    """The einsum kernel's unavoidable torch ops for the plan of ``record`` (a :class:`CallRecord` of memslice's
    call), and nothing else: per slice the score GEMM into a worker's buffer, the passes over the scores (``exp2`` and
    the row sums where the kernel takes the unnormalised path, else the in-place softmax) and the value GEMM, on the
    kernel's slice sizes
    (a run's last slice shorter), on as many single-threaded workers of memslice's own pool as the kernel uses. No
    copies, norms, division or Python beyond the loop: a kernel built from these ops cannot be faster. None where
    memslice did not run its einsum kernel."""
    if record.kernel_used != "einsum":
        return None
    from lib_memslice import kernels

    s, dtype = case.shape, case.dtype
    unnormalised = takes_unnormalised(kernels.einsum_kernel("cpu", dtype))
    rows, qps = record.heads_per_slice, min(record.queries_per_slice, s.q_tokens)
    sizes = [min(qps, s.q_tokens - n0) for _ in range(-(-s.batch_heads // rows)) for n0 in range(0, s.q_tokens, qps)]
    workers = max(1, min(torch.get_num_threads(), len(sizes)))
    alpha = s.head_dim**-0.5 * (LOG2_E if unnormalised else 1.0)
    g = torch.Generator().manual_seed(1)

    def buffers() -> tuple[Tensor, ...]:
        q = torch.randn(rows, qps, s.head_dim, generator=g).to(dtype)
        k = torch.randn(rows, s.k_tokens, s.head_dim, generator=g).to(dtype)
        v = torch.randn(rows, s.k_tokens, s.v_dim, generator=g).to(dtype)
        scores = torch.empty(rows * qps * s.k_tokens, dtype=dtype)
        out = torch.empty(rows * qps * s.v_dim, dtype=dtype)
        sums = torch.empty(rows * qps, dtype=dtype)
        return q, k.transpose(-1, -2), v, scores, out, sums

    held = [buffers() for _ in range(workers)]

    def one(m: int, q: Tensor, kt: Tensor, v: Tensor, scores: Tensor, out: Tensor, sums: Tensor) -> None:
        sc = scores[: rows * m * s.k_tokens].view(rows, m, s.k_tokens)
        sc.baddbmm_(q[:, :m], kt, beta=0, alpha=alpha)
        if unnormalised:
            sc.exp2_()
            torch.sum(sc, -1, keepdim=True, out=sums[: rows * m].view(rows, m, 1))
        else:
            torch._softmax(sc, -1, False, out=sc)
        torch.bmm(sc, v, out=out[: rows * m * s.v_dim].view(rows, m, s.v_dim))

    if workers == 1:

        def serial() -> None:
            for m in sizes:
                one(m, *held[0])

        return serial
    lock = threading.Lock()

    def parallel() -> None:
        left = sizes[::-1]

        def work(buf: tuple[Tensor, ...]) -> None:
            with torch.no_grad():
                while True:
                    with lock:
                        if not left:
                            return
                        m = left.pop()
                    one(m, *buf)

        pool = kernels._pool(workers)
        for future in [pool.submit(work, buf) for buf in held]:
            future.result()

    return parallel


def _entries(
    case: Case, contenders: dict[str, Contender], qkv: list[Tensor], only: set[str] | None, floor: bool = False
) -> list[Timed]:
    """The fused reference, memslice-auto at each number (with ``floor``, each of its plans' :func:`ops_floor`),
    and the built-ins that keep it (deduplicated by plan; ``only``: just these built-ins, the fastest at a smaller
    size)."""
    fused = Timed("fused SDPA", contenders[SDPA].prepare(case, list(qkv), None), True, list(FREES), "one call")
    found = [fused]
    auto = contenders[MEMSLICE_AUTO]
    by_plan: dict[tuple[str, str], Timed] = {}
    for free in FREES:
        call = auto.prepare(case, list(qkv), free)
        with sdpa_math_only():
            call()
        key = (MEMSLICE_AUTO, _memslice_plan(call))
        if key in by_plan:
            by_plan[key].frees.append(free)
            if (FLOOR, key[1]) in by_plan:
                by_plan[(FLOOR, key[1])].frees.append(free)
            continue
        by_plan[key] = Timed(MEMSLICE_AUTO, call, False, [free], key[1])
        least = ops_floor(case, call.host.stats.recent()[-1]) if floor else None  # type: ignore[attr-defined]
        if least is not None:
            by_plan[(FLOOR, key[1])] = Timed(FLOOR, least, False, [free], key[1])
    for name in BUILTINS:
        if only is not None and name not in only:
            continue
        contender = contenders.get(name)
        if contender is None or (case.site.vae and not contender.vae):
            continue
        for free in FREES:
            peak = traced_peak(contender, case, case.pixels, free, False, free, inputs=False)
            if peak is None or peak > free:
                continue  # it would not run on a device with this much free: not a contender at this number
            slices = _webui_slices(name, case, free)
            key = (name, f"{slices} slices")
            if key in by_plan:
                by_plan[key].frees.append(free)
            else:
                by_plan[key] = Timed(name, contender.prepare(case, list(qkv), free), False, [free], key[1])
    return found + list(by_plan.values())


def _webui_slices(name: str, case: Case, free: int) -> int:
    from . import webui_attention

    contender = next(c for c in webui_attention.reimplemented() if c.name == name)
    s = case.shape
    info = {"batch_heads": s.batch_heads, "q_tokens": s.q_tokens, "k_tokens": s.k_tokens, "head_dim": s.head_dim,
            "element_size": s.element_size, "free_bytes": free, "device_type": "cpu", "vae": case.site.vae}  # fmt: skip
    return contender.slices(info) if contender.slices else 1


def measure(
    contenders: dict[str, Contender], site: str, pixels: int, threads: int, dtype: torch.dtype, rounds: int,
    log: Callable[[str], None], only: set[str] | None = None, warm_up: bool = True, floor: bool = False,
    model: str = "sd15",
) -> dict[str, Any]:  # fmt: skip
    """One case at one thread count and dtype: every entry timed in interleaved rounds; the ratios per number
    (``floor``: memslice's :func:`ops_floor` timed in the same rounds, and memslice and the fused kernel against it)."""
    torch.set_num_threads(threads)
    forwards._memo.clear()
    case = make_case(model, site, pixels, dtype)
    qkv = make_inputs(case, "cpu")
    entries = _entries(case, contenders, qkv, only, floor)
    with torch.no_grad():
        for entry in entries if warm_up else ():  # memslice's pool starts, allocators settle
            entry.run_once()
            entry.calls = max(1, min(MAX_CALLS, round(ROUND_S * 1e3 / max(entry.wall[-1], 1e-3))))
            entry.wall.clear(), entry.cpu.clear(), entry.others.clear(), entry.faults.clear()
            entry.repeats = 0
        for r in range(rounds):
            for entry in entries[r % len(entries) :] + entries[: r % len(entries)]:  # rotated: no fixed position
                entry.run_once()
    fused = entries[0]
    result: dict[str, Any] = {"model": model, "site": site, "pixels": pixels, "threads": threads,
                              "dtype": str(dtype)[6:], "entries": [e.summary() for e in entries],
                              "by_free": {}}  # fmt: skip
    for free in FREES:
        mine = next(e for e in entries if e.name == MEMSLICE_AUTO and free in e.frees)
        builtins = [e for e in entries[1:] if e.name not in (MEMSLICE_AUTO, FLOOR) and free in e.frees]
        best = min(builtins, key=lambda e: statistics.median(e.wall)) if builtins else None
        least = next((e for e in entries if e.name == FLOOR and free in e.frees), None)
        result["by_free"][str(free)] = {
            "memslice_plan": mine.plan,
            "vs_fused": _ratio(mine, fused),
            "best_builtin": best.name if best else None,
            "best_builtin_plan": best.plan if best else None,
            "vs_best_builtin": _ratio(mine, best) if best else None,
            "fused_vs_best_builtin": _ratio(fused, best) if best else None,
            "floor_ms": statistics.median(least.wall) if least else None,
            "floor_vs_fused": _ratio(least, fused) if least else None,
            "vs_floor": _ratio(mine, least) if least else None,
        }
        row = result["by_free"][str(free)]
        log(f"    {free // MiB} MiB: memslice-auto {statistics.median(mine.wall):.0f} ms ({mine.plan}), "
            f"{row['vs_fused']:.3f}x fused, " + (f"{row['vs_best_builtin']:.3f}x {best.name}" if best else
                                                 "no built-in keeps it")
            + (f"; torch ops floor {row['floor_vs_fused']:.3f}x fused" if least else ""))  # fmt: skip
    return result


@contextlib.contextmanager
def one_core_busy() -> Iterator[None]:
    """A background process keeping one core busy for as long as the block runs."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        yield
    finally:
        spinner.kill()
        spinner.wait()


def sweep(site: str, pixels: int, threads: int, rounds: int, dtype: torch.dtype = torch.float32,
          kind: str = "sd15") -> dict[str, Any]:  # fmt: skip
    """memslice-auto's einsum kernel under its rule and at plain score-buffer targets (no fewest queries),
    interleaved."""
    torch.set_num_threads(threads)
    case = make_case(kind, site, pixels, dtype)
    qkv = make_inputs(case, "cpu")
    from .contenders import _memslice

    key = strategies.cpu_einsum_target_key(case.shape.element_size)
    targets, fewest = dict(strategies.CPU_EINSUM_TARGET_BYTES), strategies.CPU_EINSUM_MIN_QUERIES
    calls = {size: _memslice("auto").prepare(case, list(qkv), GiB) for size in ("rule", *SWEEP_MIB)}
    times: dict[Any, list[float]] = {size: [] for size in calls}
    try:
        with torch.no_grad(), sdpa_math_only():
            for r in range(rounds + 1):
                for size, call in calls.items():
                    strategies.CPU_EINSUM_TARGET_BYTES = targets if size == "rule" else {**targets, key: size * MiB}
                    strategies.CPU_EINSUM_MIN_QUERIES = fewest if size == "rule" else 1
                    forwards._memo.clear()
                    start = time.perf_counter()
                    call()
                    if r:  # the first round warms up
                        times[size].append((time.perf_counter() - start) * 1e3)
    finally:
        strategies.CPU_EINSUM_TARGET_BYTES, strategies.CPU_EINSUM_MIN_QUERIES = targets, fewest
        forwards._memo.clear()
    medians = {size: statistics.median(t) for size, t in times.items()}
    rule_ms = medians.pop("rule")
    best = min(medians, key=medians.__getitem__)
    rule = f"{strategies.cpu_einsum_rule(key)}: 1x{strategies.cpu_einsum_queries(case.shape)}"
    return {"site": site, "pixels": pixels, "threads": threads, "dtype": str(dtype)[6:], "model": kind,
            "median_ms": medians, "best_mib": best, "rule": rule,
            "rule_ms": rule_ms, "rule_vs_best": rule_ms / min(rule_ms, medians[best])}  # fmt: skip


def profile(site: str, pixels: int, dtype: torch.dtype, reps: int = 5) -> dict[str, Any]:
    """Where memslice's einsum kernel spends its time, one thread, one slice of its plan: the score GEMM, the
    softmax (or, unnormalised, exp and the row sums), the value GEMM and the division, each op timed alone (best of
    ``reps``), against the fused kernel's time for the same share of the call."""
    import torch.nn.functional as F

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        case = make_case("sd15", site, pixels, dtype)
        s = case.shape
        kernel = _single_worker(dtype, strided=not case.site.vae)  # the UNet's heads are views of projections
        rows, queries = 1, strategies.cpu_einsum_queries(s)
        g = torch.Generator().manual_seed(0)
        q = torch.randn(rows, queries, s.head_dim, generator=g).to(dtype)
        k = torch.randn(rows, s.k_tokens, s.head_dim, generator=g).to(dtype)
        v = torch.randn(rows, s.k_tokens, s.v_dim, generator=g).to(dtype)
        scores = torch.empty(rows, queries, s.k_tokens, dtype=dtype)
        out = torch.empty(rows, queries, s.v_dim, dtype=dtype)
        scale = s.head_dim**-0.5

        def best(fn: Callable[[], Any]) -> float:
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            return min(times) * 1e3

        parts = {}
        unnormalised = takes_unnormalised(kernel)
        if kernel.staged:  # copies from heads of [1, N, H*d] projections, the keys' (and values') shared by a run

            def head(tokens: int) -> Tensor:
                return torch.randn(1, tokens, s.heads * s.head_dim, generator=g).to(dtype)[..., : s.head_dim]

            hq, hk = head(queries), head(s.k_tokens)
            runs = -(-s.q_tokens // queries)
            per_run = best(lambda: k.copy_(hk)) * 2  # the values too
            parts["staged copies (a slice's queries; keys and values once per run)"] = (
                best(lambda: q.copy_(hq)) + per_run / runs)  # fmt: skip
        alpha = scale * LOG2_E if unnormalised else scale
        parts["score GEMM"] = best(lambda: scores.baddbmm_(q, k.transpose(-1, -2), beta=0, alpha=alpha))
        if unnormalised:
            sums = torch.empty(rows, queries, 1, dtype=dtype)
            parts["exp2 in place"] = (
                best(lambda: (scores.baddbmm_(q, k.transpose(-1, -2), beta=0, alpha=alpha), scores.exp2_()))
                - parts["score GEMM"]
            )
            parts["row sums"] = best(lambda: torch.sum(scores, -1, keepdim=True, out=sums))
            parts["value GEMM"] = best(lambda: torch.bmm(scores, v, out=out))
            divided = torch.empty_like(out)  # not in place: repeated divisions would reach subnormals
            parts["division"] = best(lambda: torch.div(out, sums, out=divided))
        else:
            parts["softmax"] = best(lambda: torch._softmax(scores, -1, False, out=scores))
            parts["value GEMM"] = best(lambda: torch.bmm(scores, v, out=out))
        q4, k4, v4 = (t.unsqueeze(0) for t in (q, k, v))
        fused = best(lambda: F.scaled_dot_product_attention(q4, k4, v4))
        total = sum(parts.values())
        return {"site": site, "pixels": pixels, "dtype": str(dtype)[6:], "slice": f"{rows}x{queries}",
                "parts_ms": parts, "total_ms": total, "fused_ms": fused, "vs_fused": total / fused}  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def _single_worker(dtype: torch.dtype, strided: bool) -> Any:
    from lib_memslice import kernels

    return kernels.einsum_kernel("cpu", dtype, strided)


@dataclass(frozen=True)
class Plan:
    """What the speed section runs: (site, pixels, rounds, warm up) cases of SD1.5 and (site, pixels, rounds, warm up,
    model) cases of another model, thread counts, dtypes, contended cases (2 threads, fp32, one core busy) and
    slice-size sweeps (2 threads, in each dtype)."""

    cases: tuple[tuple[str, int, int, bool] | tuple[str, int, int, bool, str], ...]
    threads: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    contended: tuple[tuple[str, int, int], ...]
    sweeps: tuple[tuple[Any, ...], ...]  # (site, pixels, rounds[, model kind])
    profiles: tuple[tuple[str, int], ...] = (("unet.level0.self", 512),)


#: SD3 Medium's joint attention at 1024 px (issue 24): 48 rows of 4250 tokens, d 64
SD3_JOINT = ("mmdit.joint", 1024, 2, True, "sd3")
FULL = Plan(
    cases=(("unet.level0.self", 512, 3, True), ("vae.mid", 512, 3, True), ("unet.level0.self", 768, 2, True),
           ("vae.mid", 1024, 2, True), ("unet.level0.self", 1024, 2, False), SD3_JOINT),
    threads=(2, 1), dtypes=(torch.float32, torch.bfloat16),
    contended=(("unet.level0.self", 512, 3), ("unet.level0.self", 768, 2)),
    sweeps=(("unet.level0.self", 512, 2), ("vae.mid", 512, 2), ("unet.level0.self", 768, 2),
            ("unet.level0.self", 1024, 2), ("mmdit.joint", 1024, 2, "sd3")),
)  # fmt: skip
#: ``bench --sd3``: SD3's joint call, the slice-size sweeps where the rule was chosen, the kernel's profile
SD3 = Plan(
    cases=(SD3_JOINT,),
    threads=(2, 1),
    dtypes=(torch.float32, torch.bfloat16),
    contended=(),
    sweeps=(("mmdit.joint", 1024, 2, "sd3"), ("unet.level0.self", 512, 2), ("unet.level0.self", 1024, 2)),
)
QUICK = Plan(cases=(("unet.level0.self", 512, 3, True), ("vae.mid", 512, 3, True)), threads=(2,),
             dtypes=(torch.float32,), contended=(("unet.level0.self", 512, 2),),
             sweeps=(("unet.level0.self", 512, 2),))  # fmt: skip
SMOKE = Plan(cases=(("unet.level0.self", 128, 2, True), ("mmdit.joint", 128, 2, True, "sd3")), threads=(2,),
             dtypes=(torch.float32,),
             contended=(("unet.level0.self", 128, 2),), sweeps=(("unet.level0.self", 128, 1),))  # fmt: skip


def bf16_runs() -> bool:
    """Whether this CPU and torch run bfloat16 attention (matmul and softmax)."""
    try:
        x = torch.randn(2, 8, 8, dtype=torch.bfloat16)
        torch.softmax(x @ x.transpose(1, 2), -1)
        return True
    except Exception:
        return False


def section(plan: Plan, contenders: dict[str, Contender], log: Callable[[str], None]) -> dict[str, Any]:
    """Every case of ``plan``, sizes in order: at a larger size only the built-ins that were the two fastest at the
    smaller size of the same site, threads and dtype are timed (the others were slower by then)."""
    threads_before = torch.get_num_threads()
    dtypes = [d for d in plan.dtypes if d != torch.bfloat16 or bf16_runs()]
    skipped = [] if len(dtypes) == len(plan.dtypes) else ["bf16: this CPU and torch do not run it"]
    result: dict[str, Any] = {"cases": [], "contended": [], "sweeps": [], "profiles": [], "skipped": skipped}
    fastest: dict[tuple[str, int, str], set[str]] = {}
    try:
        for threads in plan.threads:
            for dtype in dtypes:
                for site, pixels, rounds, warm_up, *rest in plan.cases:
                    model = rest[0] if rest else "sd15"
                    key = (site, threads, str(dtype))
                    log(f"  no fused kernel: {model} {site} {pixels} px, {threads} thread(s), {str(dtype)[6:]}")
                    found = measure(contenders, site, pixels, threads, dtype, rounds, log, fastest.get(key), warm_up,
                                    floor=True, model=model)  # fmt: skip
                    result["cases"].append(found)
                    ranked = sorted((e for e in found["entries"]
                                     if e["name"] not in (MEMSLICE_AUTO, "fused SDPA", FLOOR)),
                                    key=lambda e: e["median_ms"])  # fmt: skip
                    fastest[key] = {e["name"] for e in ranked[:2]}
        for site, pixels, rounds in plan.contended:
            log(f"  contended (one core busy): {site} {pixels} px, 2 threads")
            with one_core_busy():
                found = measure(contenders, site, pixels, 2, torch.float32, rounds, log,
                                fastest.get((site, 2, str(torch.float32))))  # fmt: skip
            result["contended"].append(found)
        for dtype in dtypes:  # the rule is one for every dtype: proved in each
            for site, pixels, rounds, *kind in plan.sweeps:
                found = sweep(site, pixels, 2, rounds, dtype, *kind)
                log(f"  slice-size sweep {site} {pixels} px {found['dtype']}: " + ", ".join(
                    f"{mib} MiB {ms:.0f} ms" for mib, ms in found["median_ms"].items())
                    + f"; the rule {found['rule_ms']:.0f} ms")  # fmt: skip
                result["sweeps"].append(found)
        for site, pixels in plan.profiles:
            for dtype in dtypes:
                found = profile(site, pixels, dtype)
                parts = ", ".join(f"{k} {v:.2f}" for k, v in found["parts_ms"].items())
                log(f"  profile {site} {pixels} px {found['dtype']}: {parts} ms; fused {found['fused_ms']:.2f} ms")
                result["profiles"].append(found)
    finally:
        torch.set_num_threads(threads_before)
    return result
