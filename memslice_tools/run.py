"""``python -m lib_memslice bench``: memslice side by side with the webui 1.10.1's attention optimizations.

Two regimes, reported separately: **no fused kernel** (torch's fused SDPA backends off: the situation of Apple MPS,
DirectML, ROCm without fused attention, masks and fp32 upcast on old GPUs, where slicing decides speed and whether
an image comes out at all; :mod:`.speed` times it over sizes, thread counts, dtypes and a busy machine) and **fused**
(CUDA flash / memory-efficient, the CPU's 4-D flash kernel: memslice must be plain SDPA plus near-zero overhead).
Each contender is told the same free-memory number. Memory (every strategy's peak against its budget, the largest
size) is measured at 512 px and traced on meta tensors. Targets are judged here from the measured numbers and
printed PASS/FAIL with how close each came to failing; nothing asserts on time. ``--gpu-check`` runs
:mod:`.gpu_check` instead.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lib_memslice.costs import GiB, MiB, format_bytes
from lib_memslice.forwards import describe, plan_call
from lib_memslice.settings import Settings

from . import parity as parity_mod
from . import report as report_mod
from . import speed as speed_mod
from . import vae_bench
from .contenders import MEMSLICE_AUTO, SDPA, Contender, all_contenders, heads_view, make_case, make_inputs
from .harness import Regime, budget_label, run_case
from .largest import largest_square, physical_limit

#: (model, site, pixels) per mode for the memory and fused-regime section: SD1.5 level-0 self-attention and the
#: VAE's mid block (larger sizes are timed by the speed section; their memory is traced by the largest-size search)
FULL_CASES = (("sd15", "unet.level0.self", 512), ("sd15", "vae.mid", 512))
QUICK_CASES = (("sd15", "unet.level0.self", 512), ("sd15", "vae.mid", 512))
SMOKE_CASES = (("sd15", "unet.level0.self", 128), ("sd15", "vae.mid", 128))
BUDGETS = (256 * MiB, 1 * GiB)
LIMIT_FREE = (256 * MiB, 1 * GiB)
LIMIT_CONTENDERS = (MEMSLICE_AUTO, "Doggettx", "InvokeAI-cuda", "sub-quadratic", "sdp")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository (docs/ for the VAE heat map)


@dataclass(frozen=True)
class Mode:
    name: str
    cases: tuple[tuple[str, str, int], ...]
    budgets: tuple[int, ...]
    rounds: int
    case_budget_s: float  # timing rounds stop early (after 2) past this many seconds per regime
    time_all_strategies: bool
    limit_free: tuple[int, ...]
    overhead_calls: int
    note: str = ""
    timed_budgets: tuple[int, ...] | None = None  # None: every budget; else the others are peak runs only
    fused_timed: tuple[str, ...] | None = None  # None: everyone in the fused ample regime; else only these
    limit_sites: tuple[str, ...] = ("unet.level0.self", "vae.mid")
    limit_contenders: tuple[str, ...] = LIMIT_CONTENDERS
    speed: speed_mod.Plan = speed_mod.FULL
    limit_regimes: tuple[bool, ...] = (False, True)  # fused kernels allowed?
    parity: parity_mod.Plan = parity_mod.FULL
    vae: vae_bench.Plan = vae_bench.FULL


def make_mode(name: str, rounds: int | None) -> Mode:
    if name == "smoke":
        mode = Mode("smoke", SMOKE_CASES, (2 * MiB, 8 * MiB), 2, 5.0, True, (8 * MiB,), 500,
                    "test-only: 128 px cases, budgets of 2 and 8 MiB", speed=speed_mod.SMOKE,
                    parity=parity_mod.SMOKE, vae=vae_bench.SMOKE)  # fmt: skip
    elif name == "quick":
        mode = Mode(
            "quick", QUICK_CASES[:1], BUDGETS, 2, 20.0, False, (256 * MiB,), 20000,
            "SD1.5 512 px; speed: UNet level 0 and VAE, 2 threads, fp32; memory and the fused regime: UNet level 0 "
            "(timed at 256 MiB); largest size without a fused kernel at 256 MiB, UNet level 0; parity with the "
            "webui's sdp forward at 256 and 1024 tokens, 2 threads, fp32",
            timed_budgets=(256 * MiB,), fused_timed=(MEMSLICE_AUTO, SDPA), limit_sites=("unet.level0.self",),
            limit_contenders=(MEMSLICE_AUTO, "Doggettx"), speed=speed_mod.QUICK, limit_regimes=(False,),
            parity=parity_mod.QUICK, vae=vae_bench.QUICK,
        )  # fmt: skip
    else:
        mode = Mode("full", FULL_CASES, BUDGETS, 3, 40.0, True, LIMIT_FREE, 50000,
                    "no fused kernel: SD1.5 UNet level 0 at 512, 768, 1024 px and the VAE at 512, 1024 px, 1 and 2 "
                    "threads, fp32 and bf16, 256 MiB and 1 GiB; memory and the fused regime at 512 px; parity "
                    "with the webui's sdp forward at 256, 1024, 4096 tokens and 77 keys, 1 and 2 threads, fp32 "
                    "and bf16; the VAE decode in bands at 1024 px",
                    timed_budgets=(256 * MiB,), fused_timed=(MEMSLICE_AUTO, SDPA))  # fmt: skip
    if rounds is not None:
        mode = Mode(**{**mode.__dict__, "rounds": max(2, rounds)})
    return mode


def tight_budget(case_output: int) -> int:
    """A budget that presses every strategy hard: the output plus 4 MiB of working memory."""
    return case_output + 4 * MiB


def regimes_for(mode: Mode, output_bytes: int) -> list[Regime]:
    found = []
    for fused in (False, True):
        budgets = mode.budgets if not fused or mode.timed_budgets is None else ()  # quick: fused budgets skipped
        found += [Regime(fused, free, budget_label(free)) for free in budgets]
        found.append(Regime(fused, tight_budget(output_bytes), "tight (output + 4 MiB)"))
    found.append(Regime(True, None, "ample"))
    return found


def timed_for(mode: Mode) -> Callable[[Contender, Regime], bool]:
    def timed(contender: Contender, regime: Regime) -> bool:
        if regime.label.startswith("tight"):
            return False  # the peak check only
        if (
            regime.free is not None
            and mode.timed_budgets is not None
            and (regime.fused or regime.free not in mode.timed_budgets)
        ):
            return False
        if regime.fused and regime.free is None and mode.fused_timed is not None:
            return contender.name in mode.fused_timed
        if contender.family == "memslice":
            return contender.name == MEMSLICE_AUTO or mode.time_all_strategies
        # the webui contenders: timed where they compete (no fused kernel), and once with fused kernels allowed
        return not regime.fused or regime.free is None

    return timed


# --- machine facts ---------------------------------------------------------------------------------------------


def cpu_allocator() -> str:
    """Which malloc serves torch's CPU tensors: it decides what fresh large tensors cost (design.md section 4)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            maps = f.read()
    except OSError:
        return f"system malloc ({platform.system()})"
    for lib, name in (("libtcmalloc", "tcmalloc"), ("libjemalloc", "jemalloc"), ("libmimalloc", "mimalloc")):
        if lib in maps:
            return f"{name} (preloaded)"
    return "glibc malloc"


def cpu_busy() -> tuple[float, float] | None:
    """(CPU-seconds the machine was busy, CPU-seconds of this process): their difference is other processes."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None
    own = os.times()
    return (sum(fields[:8]) - fields[3] - fields[4]) / hz, own.user + own.system


# --- overhead --------------------------------------------------------------------------------------------------


def planning_overhead(calls: int) -> dict[str, Any]:
    """What memslice adds per call on the fast path (the same layer, settings and kernel; ample memory): describe
    the call, look up its plan. Timed on the real functions; nothing here re-implements them."""
    case = make_case("sd15", "unet.level0.self", 512)
    q, k, v = (heads_view(t, 8) for t in make_inputs(case, "cpu"))
    settings = Settings()

    def once() -> Any:
        return plan_call(describe(q, k, v, strategy="auto", settings=settings, site=case.site.name))

    for _ in range(200):
        once()
    samples = []
    per = max(1, calls // 50)
    for _ in range(50):
        start = time.perf_counter()
        for _ in range(per):
            once()
        samples.append((time.perf_counter() - start) / per * 1e6)
    return {"per_call_us": statistics.median(samples), "min_us": min(samples), "calls": per * 50}


# --- the largest size -------------------------------------------------------------------------------------------


def limits_section(contenders: dict[str, Contender], mode: Mode, log: Callable[[str], None]) -> list[dict[str, Any]]:
    rows = []
    for site in mode.limit_sites:
        case = make_case("sd15", site, 512)
        for free in mode.limit_free:
            for fused in mode.limit_regimes:
                row: dict[str, Any] = {
                    "site": site,
                    "free_bytes": free,
                    "regime": "fused" if fused else "no fused kernel",
                    "physical_limit": physical_limit(case, free),
                    "contenders": {},
                }
                for name in mode.limit_contenders:
                    c = contenders.get(name)
                    if c is None or (case.site.vae and not c.vae):
                        continue
                    row["contenders"][name] = largest_square(c, case, free, fused, hi=8192)
                log(f"    {site} {budget_label(free)} {row['regime']}: " + ", ".join(
                    f"{n} {r['largest_side']}" for n, r in row["contenders"].items()))  # fmt: skip
                rows.append(row)
    return rows


# --- targets ------------------------------------------------------------------------------------------------------


def _target(name: str, title: str, status: str, detail: str, **numbers: Any) -> dict[str, Any]:
    return {"name": name, "title": title, "status": status, "detail": detail, "numbers": numbers}


#: The no-fused targets' stated thresholds (each case may restate its own, see :func:`judge_targets`)
VS_FUSED, VS_BEST, STEADY = 1.2, 0.9, 1.3


def _judged(name: str, title: str, cases: dict[str, tuple[float, float, str]], fmt: Callable[[float], str],
            extra: dict[str, str] | None = None, always_reason: bool = False) -> dict[str, Any]:  # fmt: skip
    """A target judged case by case against each case's own threshold (value, threshold, why it is restated or
    ""): FAIL where any value is over its threshold; the detail names the cases over, the case closest to failing
    (the largest value / threshold, and its headroom) and every restated threshold with its reason; ``numbers``
    keep every case's value, threshold and reason."""
    P, F_, NA = report_mod.STATUS_PASS, report_mod.STATUS_FAIL, report_mod.STATUS_NA
    if not cases:
        return _target(name, title, NA, "not measured", worst=None, threshold=None, cases={}, restated=[])
    label = {k: f"{k}{' ' + extra[k] if extra and k in extra else ''}" for k in cases}
    over = {k: c for k, c in cases.items() if c[0] > c[1]}
    closest = max(cases, key=lambda k: cases[k][0] / cases[k][1])
    value, threshold, why = cases[closest]
    restated = {} if always_reason else {k: c for k, c in cases.items() if c[2]}
    parts = [f"{len(cases)} cases"]
    if over:
        parts.append("over: " + "; ".join(f"{label[k]} {fmt(v)} > {fmt(t)}" for k, (v, t, _) in over.items()))
    parts.append(f"closest to failing: {label[closest]} {fmt(value)} of <= {fmt(threshold)} "
                 f"({100 * (threshold / value - 1):+.1f} % headroom{'; ' + why if why else ''})")  # fmt: skip
    if restated:
        parts.append(f"threshold restated in {len(restated)} of the cases, where no method reaches the stated one: "
                     + "; ".join(f"{k}: <= {fmt(t)} ({w})" for k, (_, t, w) in restated.items()))  # fmt: skip
    numbers = {k: {"value": v, "threshold": t, "reason": w} for k, (v, t, w) in cases.items()}
    return _target(name, title, F_ if over else P, "; ".join(parts), worst=value, threshold=threshold,
                   closest=closest, cases=numbers, restated=sorted(restated))  # fmt: skip


def _rows(report: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
    return [(case, regime, row) for case in report["cases"] for regime in case["regimes"] for row in regime["results"]]


def judge_speed(speed: dict[str, Any]) -> list[dict[str, Any]]:
    """The no-fused speed section's targets (SPEED_TARGETS and the contended one), judged as judge_targets does."""
    P, F_, NA = report_mod.STATUS_PASS, report_mod.STATUS_FAIL, report_mod.STATUS_NA
    targets: list[dict[str, Any]] = []

    # 1-4: no fused kernel (the speed section): vs the fused kernel, vs the fastest built-in, steadiness, contended.
    # Each case has its own threshold: the stated one, or where no method can reach it (the fused kernel itself, or
    # the torch ops memslice's kernel cannot do without, measured in the same rounds, are past it) one restated from
    # those measurements, with the reason; a regression of memslice still fails it.
    vs_fused: dict[str, tuple[float, float, str]] = {}
    vs_best: dict[str, tuple[float, float, str]] = {}
    best_of: dict[str, str] = {}
    for case in speed.get("cases", []):
        name = f"{case['site'].replace('unet.level0.self', 'UNet L0').replace('vae.mid', 'VAE')} {case['pixels']} px " \
               f"{case['threads']}t {case['dtype']}"  # fmt: skip
        for free, row in case["by_free"].items():
            key = f"{name} {budget_label(int(free))}"
            floor = row.get("floor_vs_fused")
            if floor is not None and floor > 1:
                why = (f"torch's own ops of memslice's plan (score GEMM, the passes over the scores, value GEMM) alone "
                       f"took {floor:.3f}x the fused call: {VS_FUSED}x those")  # fmt: skip
                vs_fused[key] = (row["vs_fused"], VS_FUSED * floor, why)
            else:
                vs_fused[key] = (row["vs_fused"], VS_FUSED, "")
            if row["vs_best_builtin"] is not None:
                best_of[key] = row["best_builtin"]
                own = row["fused_vs_best_builtin"]
                if own is not None and own > VS_BEST:
                    why = f"the fused kernel itself took {own:.3f}x {row['best_builtin']}: its own ratio"
                    vs_best[key] = (row["vs_best_builtin"], own, why)
                else:
                    vs_best[key] = (row["vs_best_builtin"], VS_BEST, "")
    targets.append(_judged(
        "no_fused_vs_fused",
        f"no fused kernel: memslice-auto <= {VS_FUSED}x the fused kernel's time at the same shape (or {VS_FUSED}x "
        "the torch ops floor of its plan, where those ops alone are slower than the fused kernel)",
        vs_fused, lambda v: f"{v:.3f}x",
    ))  # fmt: skip
    targets.append(_judged(
        "no_fused_vs_best",
        f"no fused kernel: memslice-auto <= {VS_BEST}x the fastest webui built-in that keeps the budget (or the "
        f"fused kernel's own ratio, where that is over {VS_BEST}x)",
        vs_best, lambda v: f"{v:.3f}x", best_of,
    ))  # fmt: skip
    steadiness: dict[str, tuple[float, float, str]] = {}
    for c in speed.get("cases", []):
        fused = next((e for e in c["entries"] if e["name"] == "fused SDPA" and len(e["wall_ms"]) >= 2), None)
        own = fused["steadiness"] if fused else 1.0
        for e in c["entries"]:
            if e["name"] in ("fused SDPA", speed_mod.FLOOR) or len(e["wall_ms"]) < 2:
                continue
            key = f"{c['site']} {c['pixels']} px {c['threads']}t {c['dtype']} {e['name']} ({e['plan']})"
            why = f"the fused kernel's own rounds in this case: {own:.2f}" if fused else "no fused kernel timed"
            steadiness[key] = (e["steadiness"], STEADY * own, why)
    repeated = {f"{e['name']} {c['pixels']} px {c['threads']}t {c['dtype']}": e.get("repeats", 0)
                for c in speed.get("cases", []) for e in c["entries"] if e.get("repeats")}  # fmt: skip
    steady = _judged(
        "steady",
        f"no fused kernel: every contender's slowest round over its fastest <= {STEADY}x the fused kernel's own in "
        "the same case (the machine's spread, which no contender causes)",
        steadiness, lambda v: f"{v:.3f}", always_reason=True,
    )  # fmt: skip
    steady["detail"] += (
        f"; calls run again after the heap grew under them: {', '.join(f'{k} {n}' for k, n in repeated.items())}"
        if repeated else "; no call was run again (the heap never grew under one)"
    )  # fmt: skip
    targets.append(steady)
    contended = {f"{c['site']} {c['pixels']} px {budget_label(int(free))}":
                 (row["vs_best_builtin"], row["best_builtin"]) for c in speed.get("contended", [])
                 for free, row in c["by_free"].items() if row["vs_best_builtin"] is not None}  # fmt: skip
    values = [v for v, _ in contended.values()]
    targets.append(_target(
        "contended", "one core busy with another process: memslice-auto <= 0.9x the fastest built-in",
        (P if max(values) <= 0.9 else F_) if values else NA,
        "; ".join(f"{k}: {v:.3f}x {w}" for k, (v, w) in contended.items()) or "not measured",
        worst=max(values, default=None), threshold=0.9,
    ))  # fmt: skip
    sweeps = speed.get("sweeps", [])
    values = [s["rule_vs_best"] for s in sweeps]
    targets.append(_target(
        "slice_size_rule", "the einsum kernel's score-buffer rule within 5 % of the best size swept",
        (P if max(values) <= 1.05 else F_) if values else NA,
        "; ".join(f"{s['site']} {s['pixels']} px {s.get('dtype', 'float32')}: rule {s['rule']}, "
                  f"best {s['best_mib']} MiB, "
                  f"{s['rule_vs_best']:.3f}x" for s in sweeps) or "not measured",
        worst=max(values, default=None), threshold=1.05,
    ))  # fmt: skip
    return targets


def judge_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target PASS/FAIL (N/A where it cannot be judged) with its numbers and how close it came to failing."""
    P, F_, NA = report_mod.STATUS_PASS, report_mod.STATUS_FAIL, report_mod.STATUS_NA
    targets = judge_speed(report.get("speed", {}))

    # 3: fused, ample memory: memslice-auto vs plain SDPA, interleaved
    ratios = {}
    for case in report["cases"]:
        for regime in case["regimes"]:
            if regime["fused"] and regime["budget_bytes"] is None:
                auto = next((r for r in regime["results"] if r["contender"] == MEMSLICE_AUTO), None)
                if auto and auto.get("vs_fused") is not None:
                    ratios[case["key"]] = auto["vs_fused"]
    values = list(ratios.values())
    targets.append(_target(
        "fused_vs_sdpa", "fused kernel, ample memory: memslice-auto <= 1.02x plain SDPA (median of per-round ratios)",
        (P if max(values) <= 1.02 else F_) if values else NA,
        "; ".join(f"{k}: {v:.3f}x" for k, v in ratios.items()) or "not measured",
        worst=max(values, default=None), threshold=1.02,
    ))  # fmt: skip

    # 4: measured peak <= budget, every budgeted memslice result; the largest ratio per strategy
    worst: dict[str, float] = {}
    over = []
    checked = 0
    for case, regime, row in _rows(report):
        if regime["budget_bytes"] is None or not row["contender"].startswith("memslice-") or row.get("status") != "ok":
            continue
        checked += 1
        ratio = row["measured_peak_bytes"] / regime["budget_bytes"]
        worst[row["contender"]] = max(worst.get(row["contender"], 0.0), ratio)
        if ratio > 1:
            over.append(f"{case['key']} {regime['name']} {row['contender']} {ratio:.3f}")
    can_fail = all(v >= 0.5 for v in worst.values())
    status = NA if not checked else F_ if over or not can_fail else P
    targets.append(_target(
        "peak_within_budget",
        "measured peak <= budget in every budgeted case (largest measured/budget per strategy >= 0.5 somewhere)",
        status,
        f"{checked} results; largest measured/budget per strategy: "
        + ", ".join(f"{k} {v:.3f}" for k, v in sorted(worst.items()))
        + (f"; over: {', '.join(over)}" if over else ""),
        worst=worst, over=over,
    ))  # fmt: skip

    # 5: the largest square size under a fixed free memory, whole call
    factors = {}
    for row in report.get("limits", []):
        mine = row["contenders"].get(MEMSLICE_AUTO, {}).get("largest_side")
        theirs = row["contenders"].get("Doggettx", {}).get("largest_side")
        if mine is not None and theirs:
            factors[f"{row['site']} {budget_label(row['free_bytes'])} {row['regime']}"] = (
                mine / theirs,
                mine,
                theirs,
                row["physical_limit"],
            )
    # 5b: no call can fit past the size where its own inputs and output fill the memory: how close memslice gets
    gaps = {k: (p - m, m, p) for k, (_, m, _, p) in factors.items()}
    targets.append(_target(
        "largest_square_vs_physical",
        "largest square size under a fixed free memory: memslice-auto within 64 px of the physical limit "
        "(where the layer's inputs and output alone fill the memory)",
        (P if max(g for g, *_ in gaps.values()) <= 64 else F_) if gaps else NA,
        "; ".join(f"{k}: {m} of {p} px" for k, (_, m, p) in gaps.items()) or "not measured",
        worst=max((g for g, *_ in gaps.values()), default=None), threshold=64,
    ))  # fmt: skip

    # 6: the fused kernel on the real modules: memslice's forward against the webui's sdp forward
    if "parity" in report:
        targets.append(parity_mod.judge(report["parity"]))
    if "vae" in report:
        targets.extend(vae_bench.judge(report["vae"]))

    # 7: per-call overhead on the fast path
    o = report["overhead"]
    targets.append(_target(
        "overhead", "per-call planning + probing on the fast path <= 10 us",
        P if o["per_call_us"] <= 10 else F_,
        f"{o['per_call_us']:.2f} us per call (median of 50 batches, {o['calls']} calls; fastest batch "
        f"{o['min_us']:.2f} us): describe + plan_call, the real functions",
        worst=o["per_call_us"], threshold=10,
    ))  # fmt: skip
    return targets


# --- main --------------------------------------------------------------------------------------------------------


#: The targets the no-fused speed section alone judges
SPEED_TARGETS = ("no_fused_vs_fused", "no_fused_vs_best", "steady", "slice_size_rule")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lib_memslice bench",
        description="memslice side by side with the webui 1.10.1's attention optimizations, with and without fused "
        "kernels; writes bench-report.md/.json (and a plot) under --out. --gpu-check: the CUDA checks instead.",
    )
    parser.add_argument("--quick", action="store_true", help="SD1.5 512 px only, fewer rounds (under 2 min, 2 cores)")
    parser.add_argument("--out", default="bench-out", help="output directory (default: bench-out)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds of the memory section "
                        "(default 3, quick 2; the speed section sets its own per case)")  # fmt: skip
    parser.add_argument("--webui", default=None, help="a webui checkout: run its real functions (read-only)")
    parser.add_argument("--gpu-check", action="store_true", help="the CUDA checks (see make gpu-check)")
    parser.add_argument("--parity", action="store_true", help="only the parity section: memslice's forward against "
                        "the webui's sdp forward on the real ldm modules (with --quick: fewer cases)")  # fmt: skip
    parser.add_argument("--vae", action="store_true", help="only the VAE section: the decode in exact bands against "
                        "the untiled decode and an overlap-blend tiler (with --quick: 512 px, half width)")  # fmt: skip
    parser.add_argument("--sd3", action="store_true", help="only SD3's joint call without a fused kernel: its speed "
                        "case, the slice-size sweeps (SD3's and SD1.5's UNet) and the kernel's profile")  # fmt: skip
    parser.add_argument("--heatmap", default=None, help="where the VAE section draws its error map (default: "
                        f"{vae_bench.HEATMAP} in a full run, else under --out)")  # fmt: skip
    parser.add_argument(
        "--glibc-defaults",
        dest="glibc_defaults",
        action="store_true",
        help="leave glibc's malloc as it starts (maps and page-faults every fresh large tensor)",
    )
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its report; returns 0 (targets are reported, never turned into failures)."""
    if "--gpu-check" in (sys.argv[1:] if argv is None else argv):
        from .gpu_check import main as gpu_check

        return gpu_check(argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    mode = make_mode("smoke" if args.smoke else "quick" if args.quick else "full", args.rounds)
    began = time.perf_counter()
    busy = cpu_busy()

    def log(text: str) -> None:
        print(text, flush=True)

    malloc = speed_mod.caching_allocator() if not args.glibc_defaults else cpu_allocator()
    contenders = all_contenders(args.webui)
    by_name = {c.name: c for c in contenders}
    log(f"memslice bench ({mode.name}): torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{malloc}; writing to {args.out}")  # fmt: skip
    report: dict[str, Any] = {
        "meta": {
            "mode": mode.name,
            "mode_note": mode.note,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs",
            "threads": torch.get_num_threads(),
            "allocator": malloc,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": "python -m lib_memslice bench " + " ".join(argv if argv is not None else sys.argv[1:]),
            "rounds": mode.rounds,
            "webui": args.webui or "re-implemented (memslice_tools/webui_attention.py)",
        },
        "contenders": [
            {
                "name": c.name,
                "label": c.label,
                "family": c.family,
                "budget_aware": c.budget_aware,
                "free_rule": c.free_rule,
            }
            for c in contenders
        ],
        "cases": [],
    }
    if args.parity:  # the parity section alone
        log(f"fused kernel, the real modules: memslice's forward vs the webui's sdp forward [{mode.parity.rounds} "
            "rounds at most]")  # fmt: skip
        report["parity"] = parity_mod.section(mode.parity, args.webui, log)
        report["targets"] = [parity_mod.judge(report["parity"])]
        return _finish(report, args.out, began, busy, log)
    if args.sd3:  # SD3's joint call and the slice-size rule alone
        note = "no fused kernel: SD3's joint call at 1024 px, the slice-size sweeps, the kernel's profile"
        report["meta"].update(mode="sd3", mode_note=note)
        log(note)
        report["speed"] = speed_mod.section(speed_mod.SD3, by_name, log)
        report["targets"] = [t for t in judge_speed(report["speed"]) if t["name"] in SPEED_TARGETS]
        return _finish(report, args.out, began, busy, log)
    heatmap = args.heatmap or (os.path.join(ROOT, vae_bench.HEATMAP) if mode.name == "full"
                               else os.path.join(args.out, os.path.basename(vae_bench.HEATMAP)))  # fmt: skip
    if args.vae:  # the VAE section alone
        log(f"the VAE decode in exact bands: {mode.vae.note}")
        report["vae"] = vae_bench.section(mode.vae, log, heatmap)
        report["targets"] = vae_bench.judge(report["vae"])
        return _finish(report, args.out, began, busy, log)
    with torch.no_grad():
        for index, (model, site, pixels) in enumerate(mode.cases, 1):
            case = make_case(model, site, pixels)
            s = case.shape
            log(
                f"[{index}/{len(mode.cases)}] {case.label}: {s.batch_heads} x {s.q_tokens} x {s.k_tokens}, "
                f"d {s.head_dim}, scores {format_bytes(s.score_bytes)} [{time.perf_counter() - began:.0f} s]"
            )
            regimes = regimes_for(mode, s.output_bytes)
            report["cases"].append(run_case(case, contenders, regimes, timed_for(mode), mode.rounds,
                                            mode.case_budget_s, log, fused_rounds=max(mode.rounds, 9)))  # fmt: skip
        log(f"no fused kernel: speed [{time.perf_counter() - began:.0f} s]")
        report["speed"] = speed_mod.section(mode.speed, by_name, log)
        log(f"largest square sizes (traced) [{time.perf_counter() - began:.0f} s]")
        report["limits"] = limits_section(by_name, mode, log)
    log(f"per-call overhead [{time.perf_counter() - began:.0f} s]")
    report["overhead"] = planning_overhead(mode.overhead_calls)
    log(f"fused kernel, the real modules: memslice's forward vs the webui's sdp forward "
        f"[{time.perf_counter() - began:.0f} s]")  # fmt: skip
    report["parity"] = parity_mod.section(mode.parity, args.webui, log)
    log(f"the VAE decode in exact bands: {mode.vae.note} [{time.perf_counter() - began:.0f} s]")
    report["vae"] = vae_bench.section(mode.vae, log, heatmap)
    report["targets"] = judge_targets(report)
    return _finish(report, args.out, began, busy, log)


def _finish(report: dict[str, Any], out: str, began: float, busy: tuple[float, float] | None,
            log: Callable[[str], None]) -> int:  # fmt: skip
    """The run's wall time and the other processes' share into the report; the report written; the targets
    printed."""
    wall = time.perf_counter() - began
    report["meta"]["wall_s"] = wall
    end = cpu_busy()
    if busy and end and wall > 0:
        other = max(0.0, (end[0] - busy[0]) - (end[1] - busy[1]))
        report["meta"]["other_processes_share"] = other / (wall * (os.cpu_count() or 1))
    paths = report_mod.write_all(report, out)
    log("")
    for line in report_mod.targets_lines(report["targets"]):
        log(line)
    log(f"wrote {', '.join(paths.values())} in {wall:.0f} s")
    return 0


__all__ = ["SDPA", "main"]
