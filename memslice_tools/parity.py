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
for about ``ROUND_S``, the count fixed from its warm-up, and times it per call). The computation both forwards
share, the projections (``F.linear``) and the SDPA call, is timed inside the same rounds by timers around those two
functions (the same timers in every forward); the rest of a round is its host work. Per case:

- the host work's ratio: the sdp forward's time plus memslice's host work over it (the median of per-round
  differences), against the sdp forward's time. The target: at most ``RATIO``; where a call is too short for one
  (under ``SHORT_CALL_MS``, where 0.5 % of it is less than the fast path's host budget of ``HOST_BUDGET_US``) the
  overhead in microseconds is stated instead. Why this ratio: the forwards' computation is the same op on the same
  arguments (bit-identical outputs) and varies by 2-5 % from round to round with the host's other tenants, which
  hides a 0.5 % difference; the host work is what differs, and is timed to a few microseconds;
- the whole forward's ratio (the median of per-round ratios, with its interquartile range) and the computation's
  ratio, beside it: that memslice's host work does not slow the computation itself;
- whether memslice's output is bit-identical to the webui's (``torch.equal``) and which kernel memslice ran.

The profile of memslice's host work (:data:`KNOCKOUTS`) runs memslice-auto in the same rounds with one piece
taken out at a time: the options read (read once, before the round), the record (dropped), the probe (its answer
from memory: it runs where a layer's reading is older than the fast path's age, which the long calls' rounds
reach), the whole of ``attend`` (a bare SDPA call in its place: what is left over the sdp forward is the forward's
own layout). A piece's cost is the host work it takes out, timed in place, with the caches as cold as they are
between two calls; the lane's own (its memo key, checks and the SDPA call's glue) is what ``attend`` costs besides
the options, the record and the probe. Planning runs on a layer's first call only (the lane reuses its plan).
memslice-doggettx runs the same lane.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from lib_memslice import forwards, probe
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
ROUND_S = 0.01
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
    warm_reps: int = 200  # :func:`warm_host_work`'s passes over its layers per round


def _sd15(tokens: int, context: int | None) -> Case:
    return Case(tokens, SD15_CHANNELS[tokens], 8, context)


_SD15_CASES = tuple(_sd15(n, c) for n in (256, 1024, 4096) for c in (None, CONTEXT_TOKENS))
FULL = Plan(_SD15_CASES, (torch.float32, torch.bfloat16), (1, 2), 121, 7, 8.0)
QUICK = Plan(tuple(c for c in _SD15_CASES if c.tokens < 4096), (torch.float32,), (2,), 41, 5, 3.0)
SMOKE = Plan((Case(64, 64, 2, None, 32), Case(64, 64, 2, CONTEXT_TOKENS, 32)), (torch.float32,), (1,), 3, 2, 1.0,
             warm_reps=2)  # fmt: skip


# --- the contenders ---------------------------------------------------------------------------------------------


class WebuiLikeHost(BasicHost):
    """:class:`BasicHost`, but as ``lib_memslice/webui/host.py``'s ``WebuiHost``: its options are read on every
    call through ``read_options`` from an options object's ``data`` dict, as it reads ``shared.opts.data`` (the
    read's cost is part of memslice's host work in the webui), and its records are noted (``Stats.note``); the
    default options, which the webui's ``Options.add_option`` puts in ``data`` when an extension registers them."""

    def __init__(self) -> None:
        super().__init__()
        self.opts = SimpleNamespace(data={spec.key: spec.default for spec in SPECS})
        self.record = self.stats.note  # type: ignore[method-assign]  # as WebuiHost notes its records

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


class _Computation:
    """The computation both forwards share, timed: ``F.linear`` (the projections) and the SDPA call, summed."""

    def __init__(self) -> None:
        self.ns = 0

    def _timed(self, fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        clock = time.perf_counter_ns

        def timed(*args: Any, **kwargs: Any) -> Tensor:
            start = clock()
            out = fn(*args, **kwargs)
            self.ns += clock() - start
            return out

        return timed

    @contextlib.contextmanager
    def timing(self) -> Iterator[None]:
        linear, sdpa = F.linear, F.scaled_dot_product_attention
        F.linear, F.scaled_dot_product_attention = self._timed(linear), self._timed(sdpa)
        try:
            yield
        finally:
            F.linear, F.scaled_dot_product_attention = linear, sdpa


@dataclass
class _Entry:
    name: str
    call: Callable[[], Tensor]
    #: a knockout: puts its stand-in in before a round and returns what takes it out again
    knockout: Callable[[], Callable[[], None]] | None = None
    calls: int = 1
    us: list[float] = field(default_factory=list)
    host_us: list[float] = field(default_factory=list)

    def round(self, computation: _Computation) -> None:
        call, undo = self.call, self.knockout() if self.knockout else None
        try:
            computation.ns = 0
            start = time.perf_counter_ns()
            for _ in range(self.calls):
                call()
            spent = time.perf_counter_ns() - start
        finally:
            if undo is not None:
                undo()
        self.us.append(spent / self.calls / 1e3)
        self.host_us.append((spent - computation.ns) / self.calls / 1e3)


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


def _swap(owner: Any, attr: str, stand_in: Any) -> Callable[[], None]:
    """Put ``stand_in`` in for ``owner.attr``; returns what puts the original back (an instance's own attribute
    is put back as it was, a class's method shows again)."""
    had, original = attr in vars(owner), getattr(owner, attr)
    setattr(owner, attr, stand_in)

    def undo() -> None:
        if had:
            setattr(owner, attr, original)
        else:
            delattr(owner, attr)

    return undo


def _bare_attend(q: Tensor, k: Tensor, v: Tensor, **kwargs: Any) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v)


#: memslice-auto's host work with one piece taken out: (name, the piece, how it is taken out)
KNOCKOUTS = (
    # a C-level callable giving the settings read once, so that no Python call stands in for the read
    (
        "options read once",
        "options read",
        lambda host: _swap(host, "settings", itertools.repeat(host.settings()).__next__),
    ),
    ("record dropped", "record", lambda host: _swap(host, "record", id)),  # id: a C call taking one argument
    # the probe's answer from memory: one reading taken before the round, given by a C-level dict lookup
    ("probe from memory", "probe", lambda host: _swap(probe, "free_memory", {_CPU: probe.free_memory(_CPU)}.get)),
    ("attend bare", "attend", lambda host: _swap(forwards, "attend", _bare_attend)),
)
_CPU = torch.device("cpu")
AUTO = "memslice-auto"


def measure(case: Case, dtype: torch.dtype, threads: int, plan: Plan, webui: Callable[..., Tensor],
            log: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    """One case at one dtype and thread count: bit-equality, then interleaved rounds of the contenders and of
    memslice-auto's knockouts."""
    torch.set_num_threads(threads)
    forwards._memo.clear()
    layer, x, ctx = build(case, dtype)
    hosts = {s: WebuiLikeHost() for s in STRATEGIES}
    fns = {WEBUI: webui, **{f"memslice-{s}": make_cross_attention_forward(s, hosts[s]) for s in STRATEGIES}}
    entries = [_Entry(name, (lambda f=f: f(layer, x, context=ctx))) for name, f in fns.items()]
    entries += [_Entry(f"{AUTO}, {name}", entries[1].call, (lambda make=make: make(hosts["auto"])))
                for name, _, make in KNOCKOUTS]  # fmt: skip
    result: dict[str, Any] = {"case": case.label, "tokens": case.tokens, "keys": case.context or case.tokens,
                              "channels": case.channels, "heads": case.heads, "dtype": str(dtype)[6:],
                              "threads": threads, "memslice": {}}  # fmt: skip
    computation = _Computation()
    with torch.no_grad():
        reference = entries[0].call()
        for entry in entries[1:3]:
            out = entry.call()
            record = hosts[entry.name.removeprefix("memslice-")].stats.recent()[-1]
            result["memslice"][entry.name] = {
                "bit_equal": bool(torch.equal(out, reference)),
                "max_abs_diff": float((out.float() - reference.float()).abs().max()),
                "kernel": record.kernel_used,
                "slices": record.slices,
            }
        with computation.timing():
            for entry in entries:  # warm-up, and how many calls make a round
                start = time.perf_counter()
                entry.round(computation)
                entry.calls = max(1, min(MAX_CALLS, round(ROUND_S / max(time.perf_counter() - start, 1e-7))))
                entry.us.clear()
                entry.host_us.clear()
            began = time.perf_counter()
            for r in range(plan.rounds):
                if r >= plan.min_rounds and time.perf_counter() - began > plan.case_budget_s:
                    break
                for entry in entries[r % len(entries) :] + entries[: r % len(entries)]:
                    entry.round(computation)
    webui_entry = entries[0]
    result["rounds"] = len(webui_entry.us)
    result["webui_us"] = webui_us = statistics.median(webui_entry.us)
    result["webui_host_us"] = statistics.median(webui_entry.host_us)
    result["webui_calls_per_round"] = webui_entry.calls
    result["ratio_applies"] = webui_us >= SHORT_CALL_MS * 1e3

    def over(mine: _Entry, theirs: _Entry) -> tuple[float, float, float]:
        return _quartiles([a - b for a, b in zip(mine.host_us, theirs.host_us, strict=True)])

    def computation_of(e: _Entry) -> list[float]:
        return [us - host for us, host in zip(e.us, e.host_us, strict=True)]

    for entry in entries[1:3]:
        lo, mid, hi = _quartiles([a / b for a, b in zip(entry.us, webui_entry.us, strict=True)])
        hlo, hmid, hhi = over(entry, webui_entry)
        clo, cmid, chi = _quartiles([a / b for a, b in zip(computation_of(entry), computation_of(webui_entry),
                                                            strict=True)])  # fmt: skip
        result["memslice"][entry.name].update({
            "us": statistics.median(entry.us), "calls_per_round": entry.calls, "ratio": mid, "ratio_iqr": [lo, hi],
            "host_us": statistics.median(entry.host_us), "overhead_us": hmid, "overhead_iqr_us": [hlo, hhi],
            "host_ratio": (webui_us + hmid) / webui_us, "computation_ratio": cmid,
            "computation_ratio_iqr": [clo, chi],
        })  # fmt: skip
    auto, knocked = entries[1], dict(zip((piece for _, piece, _ in KNOCKOUTS), entries[3:], strict=True))
    inside = [piece for piece in knocked if piece != "attend"]  # the pieces of attend taken out one by one
    pieces = {"the forward's own (layout) over sdp's": over(knocked["attend"], webui_entry)[1]}
    pieces.update({piece: over(auto, knocked[piece])[1] for piece in inside})
    attend = over(auto, knocked["attend"])[1]
    pieces["the lane's own (memo key, checks, the SDPA call's glue)"] = attend - sum(pieces[p] for p in inside)
    result["profile"] = {"us_per_call": pieces, "attend_us": attend,
                         "over_webui_us": result["memslice"][AUTO]["overhead_us"]}  # fmt: skip
    parts = []
    for name, row in result["memslice"].items():
        told = f"{row['host_ratio']:.4f}x" if result["ratio_applies"] else f"{row['overhead_us']:+.1f} us"
        parts.append(f"{name} {told} ({row['overhead_us']:+.1f} us host work; the whole forward "
                     f"{row['ratio']:.4f}x){'' if row['bit_equal'] else ' (not bit-equal)'}")  # fmt: skip
    log(f"    {case.label}, {str(dtype)[6:]}, {threads}t: webui sdp {webui_us:.0f} us; " + ", ".join(parts))
    return result


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
    """The parity target: every case long enough for a ratio within ``RATIO`` (its host work's ratio); the
    others' overhead stated; the whole forward's ratios beside them."""
    from .report import STATUS_FAIL, STATUS_NA, STATUS_PASS

    title = (f"fused kernel, the real ldm modules: memslice-auto's and memslice-doggettx's forward <= {RATIO}x the "
             "webui's sdp forward (the sdp forward plus memslice's host work over its own, timed in the same "
             f"interleaved rounds; calls under {SHORT_CALL_MS:g} ms: the overhead in us, stated)")  # fmt: skip
    if not parity or not parity.get("cases"):
        return {"name": "parity", "title": title, "status": STATUS_NA, "detail": "not measured",
                "numbers": {"worst": None, "threshold": RATIO}}  # fmt: skip
    ratios, short, whole = {}, {}, []
    for c in parity["cases"]:
        for name, row in c["memslice"].items():
            key = f"{c['case']} {c['dtype']} {c['threads']}t {name}"
            whole.append(row["ratio"])
            if c["ratio_applies"]:
                ratios[key] = row["host_ratio"]
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
    parts.append(f"the whole forward's ratios (noisier): median {statistics.median(whole):.4f}x, "
                 f"{sum(r > RATIO for r in whole)} of {len(whole)} over {RATIO}x")  # fmt: skip
    unequal = [f"{c['case']} {c['dtype']} {c['threads']}t {n}" for c in parity["cases"]
               for n, row in c["memslice"].items() if not row["bit_equal"]]  # fmt: skip
    parts.append(f"not bit-equal to the webui's output in {len(unequal)} of "
                 f"{sum(len(c['memslice']) for c in parity['cases'])}")  # fmt: skip
    status = STATUS_NA if not ratios else STATUS_FAIL if over else STATUS_PASS
    return {"name": "parity", "title": title, "status": status, "detail": "; ".join(parts),
            "numbers": {"worst": ratios.get(worst) if worst else None, "threshold": RATIO, "closest": worst,
                        "ratios": ratios, "short_overhead_us": {k: v[0] for k, v in short.items()},
                        "whole_forward_median": statistics.median(whole), "not_bit_equal": unequal}}  # fmt: skip


def markdown_lines(parity: dict[str, Any] | None) -> list[str]:
    """The parity section of the report: one row per case, thread count, dtype and memslice strategy; then each
    case's profile of memslice-auto's host work."""
    if not parity:
        return []
    lines = [
        "## Fused kernel, the real modules: memslice's forward vs the webui's sdp forward",
        "",
        f"The webui's sdp forward: {parity['webui']}. The real ldm `CrossAttention` of SD1.5's UNet at 512 px (random"
        " weights), ample memory, per call in interleaved rounds. Host work: each round's time less its computation"
        " (the projections' `F.linear` and the SDPA call, timed in place); memslice's over sdp's is the median of"
        " per-round differences, and the host-work ratio is the sdp forward plus it, over the sdp forward. The whole"
        " forward's and the computation's ratios are medians of per-round ratios with their interquartile ranges. "
        f"Calls under {parity['short_call_ms']:g} ms are too short for a {parity['ratio_target']}x ratio (0.5 % of"
        f" them is under the host budget of {parity['host_budget_us']:g} us): their overhead is the number.",
        "",
        "| case | dtype | threads | memslice | kernel | webui sdp us | host work over sdp's, us (IQR) "
        "| host-work ratio | whole forward (IQR) | computation (IQR) | bit-equal |",
        "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for c in parity["cases"]:
        for name, row in c["memslice"].items():
            lo, hi = row["ratio_iqr"]
            dlo, dhi = row["overhead_iqr_us"]
            clo, chi = row["computation_ratio_iqr"]
            ratio = f"{row['host_ratio']:.4f}x"
            overhead = f"{row['overhead_us']:+.1f} ({dlo:+.1f} to {dhi:+.1f})"
            if c["ratio_applies"]:
                ratio = f"**{ratio}**"
            else:
                overhead = f"**{overhead}**"
            lines.append(
                f"| {c['case']} | {c['dtype']} | {c['threads']} | {name} | {row['kernel']}, {row['slices']} | "
                f"{c['webui_us']:.0f} | {overhead} | {ratio} | {row['ratio']:.4f}x ({lo:.4f}-{hi:.4f}) | "
                f"{row['computation_ratio']:.4f}x ({clo:.4f}-{chi:.4f}) | "
                f"{'yes' if row['bit_equal'] else 'no (max ' + format(row['max_abs_diff'], '.1e') + ')'} |"
            )
    lines += ["", f"Where {AUTO}'s host work goes (us a call; each piece the host work it takes out when it alone is "
              "taken out, in the same rounds: the options read once, the record dropped, the probe answered from "
              "memory, `attend` a bare SDPA call; medians of per-round differences, so they need not add up exactly; "
              "planning runs on a layer's first call only):", ""]  # fmt: skip
    for c in parity["cases"]:
        prof = c["profile"]
        pieces = ", ".join(f"{k} {v:+.1f}" for k, v in prof["us_per_call"].items())
        lines.append(f"- {c['case']} {c['dtype']} {c['threads']}t: {pieces}; `attend` {prof['attend_us']:+.1f}; "
                     f"over sdp's {prof['over_webui_us']:+.1f} (the sdp forward's own host work "
                     f"{c['webui_host_us']:.0f})")  # fmt: skip
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
