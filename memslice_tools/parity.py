"""Fused kernel, the real modules: memslice's CrossAttention forward against the webui's sdp forward, per call.

With fused attention (the webui's default ``sdp`` on CUDA, and on CPUs with torch's flash kernel) memslice must
be the webui's sdp forward plus almost nothing. Here both run on the real ``ldm`` ``CrossAttention`` modules of the
SD1.5 UNet at 512 px (random weights): self-attention at 256, 1024 and 4096 tokens (levels 2, 1 and 0: 1280, 640
and 320 channels, 8 heads) and cross-attention of the same layers against 77 keys, in float32 and bfloat16, on 1
and 2 threads, with ample memory (nobody slices). The contenders, each a whole ``forward(self, x, context)``:

- the webui's ``scaled_dot_product_attention_forward``: the real function of a webui checkout (``--webui`` /
  ``WEBUI_DIR``, loaded read-only by :mod:`.webui_real`), else our re-implementation
  (:func:`.webui_attention.sdp_cross_attention` between the module's own projections); the report says which;
- ``memslice-auto`` and ``memslice-doggettx``: :func:`lib_memslice.forwards.make_cross_attention_forward` with a
  host that reads its options on every call as the webui's ``WebuiHost`` does (through ``read_settings``), with
  the default settings (no budget: the free memory is probed).

Every call is timed in interleaved rounds (the order rotated each round; a round runs one contender back to back
for about ``ROUND_S``, the count fixed from its warm-up, and times it per call). A case's ratio is the median of
per-round ratios memslice / webui with its interquartile range, and its overhead the median of per-round
differences in microseconds. The target is a ratio of at most ``RATIO``; where a call is too short for one (under
``SHORT_CALL_MS``, where 0.5 % of it is less than the fast path's host budget of ``HOST_BUDGET_US``) the overhead
in microseconds is stated instead. Each case also says whether memslice's output is bit-identical to the webui's
(``torch.equal``) and which kernel memslice ran.

The host-work profile (:func:`host_profile`) runs each forward again with timers around the pieces of its path,
patched in here (nothing in the runtime is changed): the options read, ``describe``, ``plan_call`` (the memo and
the planning glue), ``plan_attention`` (planning), the probe, ``run_call`` and ``run_plan`` (the kernel's host
work), ``record``, ``attend``'s own, and the forward's own (layout: the head views, the site, the output's
transpose and reshape, ``to_out``); the projections and SDPA are the computation both forwards share. The timers'
own cost is measured and taken off.
"""

from __future__ import annotations

import contextlib
import io
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from lib_memslice import forwards, kernels, probe
from lib_memslice.forwards import BasicHost, make_cross_attention_forward
from lib_memslice.settings import SPECS, read_options

from . import webui_attention
from .harness import torch_threads

Tensor = torch.Tensor
#: memslice's forward within this ratio of the webui's sdp forward (median of per-round ratios)
RATIO = 1.005
#: the fast path's host budget per call (the report's per-call overhead target)
HOST_BUDGET_US = 10.0
#: calls shorter than this are too short for a ratio: 0.5 % of them is under HOST_BUDGET_US
SHORT_CALL_MS = HOST_BUDGET_US / (RATIO - 1) / 1e3
#: a round runs a contender back to back for about this long (at least one call, at most MAX_CALLS)
ROUND_S = 0.03
MAX_CALLS = 2000
STRATEGIES = ("auto", "doggettx")
WEBUI = "webui sdp"
#: SD1.5's UNet at 512 px: channels of the attention layers by their token count (8 heads; context 768)
SD15_CHANNELS = {256: 1280, 1024: 640, 4096: 320}
CONTEXT_TOKENS, CONTEXT_DIM = 77, 768


@dataclass(frozen=True)
class Case:
    tokens: int
    channels: int
    heads: int
    context: int | None  # key tokens of a cross-attention (its context), None: self-attention
    context_dim: int = CONTEXT_DIM

    @property
    def label(self) -> str:
        kind = "self" if self.context is None else f"cross, {self.context} keys"
        return f"{self.tokens} tokens {kind} ({self.channels} ch, {self.heads} heads)"


@dataclass(frozen=True)
class Plan:
    """What the parity section runs: cases, dtypes, thread counts, rounds (at most; at least ``min_rounds``, then
    a case stops past ``case_budget_s``)."""

    cases: tuple[Case, ...]
    dtypes: tuple[torch.dtype, ...]
    threads: tuple[int, ...]
    rounds: int
    min_rounds: int
    case_budget_s: float
    profile_s: float  # how long each forward runs under the profile's timers (at least PROFILE_MIN_CALLS calls)
    warm_reps: int = 200  # :func:`warm_host_work`'s passes over its layers per round


def _sd15(tokens: int, context: int | None) -> Case:
    return Case(tokens, SD15_CHANNELS[tokens], 8, context)


_SD15_CASES = tuple(_sd15(n, c) for n in (256, 1024, 4096) for c in (None, CONTEXT_TOKENS))
FULL = Plan(_SD15_CASES, (torch.float32, torch.bfloat16), (1, 2), 21, 7, 6.0, 0.3)
QUICK = Plan(tuple(c for c in _SD15_CASES if c.tokens < 4096), (torch.float32,), (2,), 11, 5, 2.0, 0.2)
SMOKE = Plan((Case(64, 64, 2, None, 32), Case(64, 64, 2, CONTEXT_TOKENS, 32)), (torch.float32,), (1,), 3, 2, 1.0,
             0.02, warm_reps=2)  # fmt: skip
PROFILE_MIN_CALLS = 3


# --- the contenders ---------------------------------------------------------------------------------------------


class WebuiLikeHost(BasicHost):
    """:class:`BasicHost`, but its options are read on every call through ``read_options`` from an options
    object's ``data`` dict, as ``lib_memslice/webui/host.py``'s ``WebuiHost`` reads ``shared.opts.data`` (the
    read's cost is part of memslice's host work in the webui); the default options, which the webui's
    ``Options.add_option`` puts in ``data`` when an extension registers them."""

    def __init__(self) -> None:
        super().__init__()
        self.opts = SimpleNamespace(data={spec.key: spec.default for spec in SPECS})

    def settings(self) -> Any:
        return read_options(self.opts)


def reimplemented_sdp_forward(self: Any, x: Tensor, context: Tensor | None = None, mask: Any = None, **kwargs: Any):
    """The webui's ``scaled_dot_product_attention_forward`` re-implemented: :func:`webui_attention.
    sdp_cross_attention` between the module's own projections (no mask, no hypernetworks, no upcast)."""
    context = x if context is None else context
    out = webui_attention.sdp_cross_attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads,
                                              self.scale, 0)  # fmt: skip
    return self.to_out[1](self.to_out[0](out))


def webui_forward(webui_dir: str | None) -> tuple[Callable[..., Tensor], str]:
    """The webui's sdp forward and what it is: the real one of a checkout, or the re-implementation."""
    if webui_dir:
        from .webui_real import load_webui_attention

        real = load_webui_attention(webui_dir).scaled_dot_product_attention_forward
        return real, f"real: scaled_dot_product_attention_forward from {webui_dir}"
    return reimplemented_sdp_forward, "re-implemented (memslice_tools/parity.py, webui_attention.sdp_cross_attention)"


def _ldm_attention() -> Any:
    with contextlib.redirect_stdout(io.StringIO()):  # sdkit's ldm prints a note about xformers on import
        import ldm.modules.attention as attention
    return attention


def build(case: Case, dtype: torch.dtype, seed: int = 0) -> tuple[Any, Tensor, Tensor | None]:
    """The real ldm ``CrossAttention`` of the case (random weights, eval, in ``dtype``), its input and context."""
    torch.manual_seed(seed)
    layer = _ldm_attention().CrossAttention(query_dim=case.channels, heads=case.heads,
                                            dim_head=case.channels // case.heads,
                                            context_dim=case.context_dim if case.context else None)  # fmt: skip
    layer = layer.eval().to(dtype)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, case.tokens, case.channels, generator=g).to(dtype)
    ctx = None if case.context is None else torch.randn(1, case.context, case.context_dim, generator=g).to(dtype)
    return layer, x, ctx


# --- timing -----------------------------------------------------------------------------------------------------


@dataclass
class _Entry:
    name: str
    call: Callable[[], Tensor]
    calls: int = 1
    us: list[float] | None = None

    def round(self) -> None:
        call = self.call
        start = time.perf_counter()
        for _ in range(self.calls):
            call()
        assert self.us is not None
        self.us.append((time.perf_counter() - start) / self.calls * 1e6)


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


def measure(case: Case, dtype: torch.dtype, threads: int, plan: Plan, webui: Callable[..., Tensor],
            log: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    """One case at one dtype and thread count: bit-equality, interleaved rounds, the host-work profile."""
    torch.set_num_threads(threads)
    forwards._memo.clear()
    layer, x, ctx = build(case, dtype)
    hosts = {s: WebuiLikeHost() for s in STRATEGIES}
    fns = {WEBUI: webui, **{f"memslice-{s}": make_cross_attention_forward(s, hosts[s]) for s in STRATEGIES}}
    entries = [_Entry(name, (lambda f=f: f(layer, x, context=ctx)), us=[]) for name, f in fns.items()]
    result: dict[str, Any] = {"case": case.label, "tokens": case.tokens, "keys": case.context or case.tokens,
                              "channels": case.channels, "heads": case.heads, "dtype": str(dtype)[6:],
                              "threads": threads, "memslice": {}}  # fmt: skip
    with torch.no_grad():
        reference = entries[0].call()
        for entry in entries[1:]:
            out = entry.call()
            record = hosts[entry.name.removeprefix("memslice-")].stats.recent()[-1]
            result["memslice"][entry.name] = {
                "bit_equal": bool(torch.equal(out, reference)),
                "max_abs_diff": float((out.float() - reference.float()).abs().max()),
                "kernel": record.kernel_used,
                "slices": record.slices,
            }
        for entry in entries:  # warm-up, and how many calls make a round
            start = time.perf_counter()
            entry.call()
            once = time.perf_counter() - start
            entry.calls = max(1, min(MAX_CALLS, round(ROUND_S / max(once, 1e-7))))
        began = time.perf_counter()
        for r in range(plan.rounds):
            if r >= plan.min_rounds and time.perf_counter() - began > plan.case_budget_s:
                break
            for entry in entries[r % len(entries) :] + entries[: r % len(entries)]:
                entry.round()
    webui_us = entries[0].us or []
    result["rounds"] = len(webui_us)
    result["webui_us"] = statistics.median(webui_us)
    result["webui_calls_per_round"] = entries[0].calls
    result["ratio_applies"] = result["webui_us"] >= SHORT_CALL_MS * 1e3
    for entry in entries[1:]:
        mine = entry.us or []
        lo, mid, hi = _quartiles([a / b for a, b in zip(mine, webui_us, strict=False)])
        dlo, dmid, dhi = _quartiles([a - b for a, b in zip(mine, webui_us, strict=False)])
        result["memslice"][entry.name].update({
            "us": statistics.median(mine), "calls_per_round": entry.calls, "ratio": mid, "ratio_iqr": [lo, hi],
            "overhead_us": dmid, "overhead_iqr_us": [dlo, dhi],
        })  # fmt: skip
    result["profile"] = host_profile(layer, x, ctx, fns, hosts, plan.profile_s)
    parts = []
    for name, row in result["memslice"].items():
        told = f"{row['ratio']:.4f}x" if result["ratio_applies"] else f"{row['overhead_us']:+.1f} us"
        parts.append(f"{name} {told}{'' if row['bit_equal'] else ' (not bit-equal)'}")
    log(f"    {case.label}, {str(dtype)[6:]}, {threads}t: webui sdp {result['webui_us']:.0f} us; " + ", ".join(parts))
    return result


# --- the host-work profile --------------------------------------------------------------------------------------

#: the pieces that are computation both forwards share (not host work)
COMPUTE = ("projections", "SDPA")


class _Timers:
    """Inclusive and child time per named piece (nanoseconds), from timers wrapped around functions."""

    def __init__(self) -> None:
        self.total: dict[str, int] = defaultdict(int)
        self.children: dict[str, int] = defaultdict(int)
        self.child_calls: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self.stack: list[str] = []

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        clock, stack = time.perf_counter_ns, self.stack

        def timed(*args: Any, **kwargs: Any) -> Any:
            stack.append(name)
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = clock() - start
                stack.pop()
                self.total[name] += spent
                self.calls[name] += 1
                if stack:
                    self.children[stack[-1]] += spent
                    self.child_calls[stack[-1]] += 1

        return timed

    def snapshot(self) -> tuple[dict[str, int], ...]:
        return dict(self.total), dict(self.children), dict(self.calls), dict(self.child_calls)

    @staticmethod
    def own_ns(before: tuple[dict[str, int], ...], after: tuple[dict[str, int], ...], name: str, inside: float,
               outside: float) -> float:  # fmt: skip
        """A piece's own time between two snapshots: less its children's, and the timers' cost inside its own
        window and outside its children's."""
        pairs = zip(after, before, strict=True)
        total, children, calls, child_calls = (a.get(name, 0) - b.get(name, 0) for a, b in pairs)
        return total - children - inside * calls - outside * child_calls


def _timer_cost(reps: int = 20000) -> tuple[float, float]:
    """(ns a timer adds inside the window it measures, ns it adds to its parent outside that window)."""
    timers = _Timers()

    def nothing() -> None:
        return None

    child = timers.wrap("child", nothing)

    def parent_timed() -> None:
        for _ in range(100):
            child()

    def parent_bare() -> None:
        for _ in range(100):
            nothing()

    parent = timers.wrap("parent", parent_timed)
    bare = []
    for _ in range(reps // 100):
        start = time.perf_counter_ns()
        parent_bare()
        bare.append(time.perf_counter_ns() - start)
    for _ in range(reps // 100):
        parent()
    inside = timers.total["child"] / timers.calls["child"]
    outside = timers.total["parent"] - timers.children["parent"] - statistics.median(bare) * timers.calls["parent"]
    return max(0.0, inside - 40.0), max(0.0, outside / timers.calls["child"])  # 40 ns: the bare call itself


@contextlib.contextmanager
def _patched(targets: list[tuple[Any, str, str]], timers: _Timers) -> Iterator[None]:
    saved = []
    try:
        for owner, attr, name in targets:
            original = getattr(owner, attr, None)
            if original is None:
                continue  # a piece this version of the runtime does not have: left out of the profile
            saved.append((owner, attr, original))
            setattr(owner, attr, timers.wrap(name, original))
        yield
    finally:
        for owner, attr, original in reversed(saved):
            if attr in getattr(owner, "__dict__", {}) and isinstance(owner, (torch.nn.Module, BasicHost)):
                delattr(owner, attr)  # an instance's patched method: the class's shows again
            else:
                setattr(owner, attr, original)


def _projections(layer: Any) -> list[tuple[Any, str, str]]:
    mods = [layer.to_q, layer.to_k, layer.to_v, *layer.to_out]
    return [(m, "forward", "projections") for m in mods]


def host_profile(layer: Any, x: Tensor, ctx: Tensor | None, fns: dict[str, Callable[..., Tensor]],
                 hosts: dict[str, BasicHost], seconds: float) -> dict[str, Any]:  # fmt: skip
    """Each forward run for about ``seconds`` under timers; per forward the median over calls of each piece's
    microseconds (its own time, children and timers' cost taken off; a probe's, taken on few calls, is its mean),
    the median of each call's host work (every piece but :data:`COMPUTE`) and how many probes a call took."""
    inside, outside = _timer_cost()
    found: dict[str, Any] = {"timer_cost_ns": {"inside": inside, "outside": outside}}
    for name, fn in fns.items():
        timers = _Timers()
        host = hosts.get(name.removeprefix("memslice-"))
        targets = [
            (F, "scaled_dot_product_attention", "SDPA"),
            (forwards, "attend", "attend (own)"),
            (forwards, "_same_call_again", "the same call again (its lane)"),
            (forwards, "describe", "describe"),
            (forwards, "plan_call", "plan_call: memo and planning glue"),
            (forwards, "plan_attention", "planning (plan_attention)"),
            (forwards, "smallest_peak_plan", "planning (plan_attention)"),
            (probe, "free_memory", "probe"),
            (forwards, "run_call", "run_call (own)"),
            (kernels, "run_plan", "run_plan (own)"),
            (kernels, "_sdpa", "kernels._sdpa (own: its casts)"),
            (forwards, "record", "record"),
            *_projections(layer),
        ]
        if host is not None:
            targets.append((host, "settings", "options read (read_settings)"))
        forward = timers.wrap("forward: layout and glue (own)", fn)
        per_call: list[dict[str, float]] = []
        with torch.no_grad(), _patched(targets, timers):
            start = time.perf_counter()
            while len(per_call) < PROFILE_MIN_CALLS or time.perf_counter() - start < seconds:
                before = timers.snapshot()
                forward(layer, x, context=ctx)
                after = timers.snapshot()
                ran = [p for p in after[2] if after[2][p] > before[2].get(p, 0)]
                per_call.append({p: _Timers.own_ns(before, after, p, inside, outside) / 1e3 for p in ran})
        names = list(dict.fromkeys(p for call in per_call for p in call))
        pieces = {}
        for p in names:  # a piece of every call: its median; of some calls (the probe, planning): its mean per call
            values = [call.get(p, 0.0) for call in per_call]
            every = all(p in call for call in per_call)
            pieces[p] = statistics.median(values) if every else statistics.fmean(values)
        host = [sum(us for p, us in call.items() if p not in COMPUTE) for call in per_call]
        found[name] = {"calls": len(per_call), "us_per_call": pieces, "host_us": statistics.median(host),
                       "probes_per_call": timers.calls.get("probe", 0) / len(per_call)}  # fmt: skip
    webui_host = found[WEBUI]["host_us"]
    for name in fns:
        if name != WEBUI:
            found[name]["host_us_over_webui"] = found[name]["host_us"] - webui_host
    return found


# --- the section ------------------------------------------------------------------------------------------------


#: :func:`warm_host_work`: layers called in turn (a step's attention layers), the clock advanced per call
WARM_LAYERS = 16
WARM_STEP_S = 0.02
WARM_ROUNDS = 15


class _StepClock:
    """``forwards.time`` while :func:`warm_host_work` runs: ``perf_counter`` advanced by hand, ``time`` real."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now

    time = staticmethod(time.time)


def warm_host_work(reps: int = 200) -> dict[str, float]:
    """memslice's host work per call where the caches stay warm (a CUDA device's case: the CPU only launches
    kernels): ``attend`` against the bare SDPA call it makes, one thread, tiny calls (1 x 8 x 16-31 x 8), the best
    of ``WARM_ROUNDS`` rounds, two ways. ``same layer``: one layer again and again, its reading fresh.
    ``a step``: ``WARM_LAYERS`` layers in turn with the clock advanced ``WARM_STEP_S`` a call, as on a CPU, where
    each layer's own reading is old at its next call (the lane then checks the reading the layers share)."""
    host, clock = WebuiLikeHost(), _StepClock()
    gen = torch.Generator().manual_seed(0)
    layers = [tuple(torch.randn(1, 8, 16 + i, 8, generator=gen) for _ in range(3)) for i in range(WARM_LAYERS)]

    def att(calls: list[tuple[Tensor, ...]], step: float) -> Callable[[], None]:
        def run() -> None:
            for q, k, v in calls:
                clock.now += step
                forwards.attend(q, k, v, scale=0.125, strategy="auto", host=host)

        return run

    def bare(calls: list[tuple[Tensor, ...]]) -> Callable[[], None]:
        def run() -> None:
            for q, k, v in calls:
                F.scaled_dot_product_attention(q, k, v)

        return run

    same = layers[:1] * WARM_LAYERS

    saved = forwards.time
    forwards.time = clock  # type: ignore[assignment]
    try:
        with torch_threads(1), torch.no_grad():
            fns = {"same layer": att(same, 0.0), "same layer sdpa": bare(same), "a step": att(layers, WARM_STEP_S),
                   "a step sdpa": bare(layers)}  # fmt: skip
            best = dict.fromkeys(fns, float("inf"))
            for fn in fns.values():
                fn()
            for _ in range(WARM_ROUNDS):
                for name, fn in fns.items():
                    start = time.perf_counter()
                    for _ in range(reps):
                        fn()
                    best[name] = min(best[name], (time.perf_counter() - start) / reps / WARM_LAYERS * 1e6)
    finally:
        forwards.time = saved  # type: ignore[assignment]
        forwards._memo.clear()
        forwards._recent_free.clear()
    return {"same_layer_us": best["same layer"] - best["same layer sdpa"],
            "step_us": best["a step"] - best["a step sdpa"], "sdpa_us": best["a step sdpa"]}  # fmt: skip


def section(plan: Plan, webui_dir: str | None, log: Callable[[str], None]) -> dict[str, Any]:
    """Every case of ``plan``; the threads as they were afterwards."""
    from .speed import bf16_runs

    threads_before = torch.get_num_threads()
    webui, which = webui_forward(webui_dir)
    dtypes = [d for d in plan.dtypes if d != torch.bfloat16 or bf16_runs()]
    skipped = [] if len(dtypes) == len(plan.dtypes) else ["bf16: this CPU and torch do not run it"]
    result: dict[str, Any] = {"webui": which, "ratio_target": RATIO, "short_call_ms": SHORT_CALL_MS,
                              "host_budget_us": HOST_BUDGET_US, "cases": [], "skipped": skipped}  # fmt: skip
    try:
        for threads in plan.threads:
            for dtype in dtypes:
                for case in plan.cases:
                    result["cases"].append(measure(case, dtype, threads, plan, webui, log))
        result["warm"] = warm_host_work(plan.warm_reps)
    finally:
        torch.set_num_threads(threads_before)
        forwards._memo.clear()
    return result


def judge(parity: dict[str, Any] | None) -> dict[str, Any]:
    """The parity target: every case long enough for a ratio within ``RATIO``; the others' overhead stated."""
    from .report import STATUS_FAIL, STATUS_NA, STATUS_PASS

    title = (f"fused kernel, the real ldm modules: memslice-auto's and memslice-doggettx's forward <= {RATIO}x the "
             f"webui's sdp forward (median of per-round ratios; calls under {SHORT_CALL_MS:g} ms: the overhead in "
             "us, stated)")  # fmt: skip
    if not parity or not parity.get("cases"):
        return {"name": "parity", "title": title, "status": STATUS_NA, "detail": "not measured",
                "numbers": {"worst": None, "threshold": RATIO}}  # fmt: skip
    ratios, short = {}, {}
    for c in parity["cases"]:
        for name, row in c["memslice"].items():
            key = f"{c['case']} {c['dtype']} {c['threads']}t {name}"
            if c["ratio_applies"]:
                ratios[key] = row["ratio"]
            else:
                short[key] = (row["overhead_us"], row["overhead_iqr_us"], c["webui_us"])
    over = {k: v for k, v in ratios.items() if v > RATIO}
    worst = max(ratios, key=ratios.__getitem__) if ratios else None
    parts = [f"webui sdp: {parity['webui']}", f"{len(ratios)} ratios"]
    if over:
        parts.append("over: " + "; ".join(f"{k} {v:.4f}x" for k, v in over.items()))
    if worst is not None:
        parts.append(f"closest to failing: {worst} {ratios[worst]:.4f}x of <= {RATIO}x "
                     f"({100 * (RATIO / ratios[worst] - 1):+.2f} % headroom)")  # fmt: skip
    if short:
        parts.append(f"too short for a ratio ({len(short)}): " + "; ".join(
            f"{k} {us:+.1f} us (IQR {lo:+.1f} to {hi:+.1f}) on a {webui / 1e3:.2f} ms call"
            for k, (us, (lo, hi), webui) in short.items()))  # fmt: skip
    unequal = [f"{c['case']} {c['dtype']} {c['threads']}t {n}" for c in parity["cases"]
               for n, row in c["memslice"].items() if not row["bit_equal"]]  # fmt: skip
    parts.append(f"not bit-equal to the webui's output in {len(unequal)} of "
                 f"{sum(len(c['memslice']) for c in parity['cases'])}")  # fmt: skip
    status = STATUS_NA if not ratios else STATUS_FAIL if over else STATUS_PASS
    return {"name": "parity", "title": title, "status": status, "detail": "; ".join(parts),
            "numbers": {"worst": ratios.get(worst) if worst else None, "threshold": RATIO, "closest": worst,
                        "ratios": ratios, "short_overhead_us": {k: v[0] for k, v in short.items()},
                        "not_bit_equal": unequal}}  # fmt: skip


def markdown_lines(parity: dict[str, Any] | None) -> list[str]:
    """The parity section of the report: one row per case, thread count, dtype and memslice strategy; then each
    case's host-work profile."""
    if not parity:
        return []
    lines = [
        "## Fused kernel, the real modules: memslice's forward vs the webui's sdp forward",
        "",
        f"The webui's sdp forward: {parity['webui']}. The real ldm `CrossAttention` of SD1.5's UNet at 512 px (random"
        " weights), ample memory, per call in interleaved rounds; the ratio is the median of per-round ratios with its"
        " interquartile range, the overhead the median of per-round differences. Calls under "
        f"{parity['short_call_ms']:g} ms are too short for a {parity['ratio_target']}x ratio (0.5 % of them is under "
        f"the host budget of {parity['host_budget_us']:g} us): their overhead is the number.",
        "",
        "| case | dtype | threads | memslice | kernel | webui sdp us | memslice us | ratio (IQR) | overhead us (IQR) "
        "| bit-equal |",
        "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for c in parity["cases"]:
        for name, row in c["memslice"].items():
            lo, hi = row["ratio_iqr"]
            dlo, dhi = row["overhead_iqr_us"]
            ratio = f"{row['ratio']:.4f}x ({lo:.4f}-{hi:.4f})"
            overhead = f"{row['overhead_us']:+.1f} ({dlo:+.1f} to {dhi:+.1f})"
            if c["ratio_applies"]:
                ratio = f"**{ratio}**"
            else:
                overhead = f"**{overhead}**"
            lines.append(
                f"| {c['case']} | {c['dtype']} | {c['threads']} | {name} | {row['kernel']}, {row['slices']} | "
                f"{c['webui_us']:.0f} | {row['us']:.0f} | {ratio} | {overhead} | "
                f"{'yes' if row['bit_equal'] else 'no (max ' + format(row['max_abs_diff'], '.1e') + ')'} |"
            )
    lines += ["", "Host work per call (us, each piece's own time; the timers' cost taken off; projections and SDPA "
              "are the computation both forwards share):", ""]  # fmt: skip
    for c in parity["cases"]:
        p = c["profile"]
        for name in c["memslice"]:
            mine = p[name]
            pieces = ", ".join(f"{k} {v:.2f}" for k, v in mine["us_per_call"].items() if k not in COMPUTE)
            measured = c["memslice"][name]["overhead_us"]
            lines.append(
                f"- {c['case']} {c['dtype']} {c['threads']}t, {name}: {pieces}; {mine['probes_per_call']:.2f} probes "
                f"per call; host work {mine['host_us']:.1f} us, the webui forward's own {p[WEBUI]['host_us']:.1f} us:"
                f" {mine['host_us_over_webui']:+.1f} us over it (timed overhead {measured:+.1f} us)"
            )
    warm = parity.get("warm")
    if warm:
        lines += ["", "Host work in a warm loop (`attend` over the bare SDPA call it makes, one thread, 1 x 8 x 16-31 "
                  f"x 8, best of {WARM_ROUNDS} rounds): the same layer again {warm['same_layer_us']:.1f} us a call; "
                  f"{WARM_LAYERS} layers in turn on a step's clock ({1e3 * WARM_STEP_S:g} ms a call, each layer's own "
                  f"reading old at its next call) {warm['step_us']:.1f} us a call (SDPA itself "
                  f"{warm['sdpa_us']:.1f} us)."]  # fmt: skip
    if parity.get("skipped"):
        lines += ["", f"Not run: {'; '.join(parity['skipped'])}."]
    return [*lines, ""]
