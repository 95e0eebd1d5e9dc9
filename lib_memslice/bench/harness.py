"""Cases, contenders and the measuring loop of the side-by-side benchmark.

Every contender implements one call: q, k, v projections ``[B, N, H*d]`` in, ``[B, Nq, H*dv]`` out. Each is
timed (median of repeats after warm-up) and, in a separate run, its peak transient bytes are measured with
:mod:`lib_memslice.memtrack`; its output is checked against plain SDPA. A contender that raises
``NotEnoughMemory`` or an out-of-memory error is a result ("does not fit"), not a crash.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from .. import probe
from ..costs import AttentionShape, MiB, format_bytes
from ..forwards import BasicHost, attend
from ..memtrack import peak_tracker
from ..models import BUILTIN, Site
from ..settings import Settings
from ..slicing import STRATEGY_NAMES, NotEnoughMemory
from . import doggettx_reference

Tensor = torch.Tensor
Core = Callable[[Tensor, Tensor, Tensor, int, float], Tensor]

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
AMPLE_GB = 64.0  # memslice's budget in the "ample" regime


# --- cases and regimes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One attention shape: a built-in model's site at an image size, in one dtype."""

    model: str
    site: Site
    pixels: int
    dtype: torch.dtype = torch.float32

    @property
    def key(self) -> str:
        return f"{self.model}-{self.pixels}-{self.site.name}-{DTYPE_NAMES.get(self.dtype, str(self.dtype))}"

    @property
    def label(self) -> str:
        kind = "VAE mid-block" if self.site.vae else self.site.name.replace("unet.", "UNet ")
        return f"{self.model.upper()} {self.pixels} px {kind} ({DTYPE_NAMES.get(self.dtype, self.dtype)})"

    @property
    def shape(self) -> AttentionShape:
        size = torch.finfo(self.dtype).bits // 8
        return self.site.shape(self.pixels, self.pixels, batch=1, element_size=size)


def make_case(model: str, site_name: str, pixels: int, dtype: torch.dtype = torch.float32) -> Case:
    """A case from the built-in model specs (shapes are never typed by hand)."""
    sites = {s.name: s for s in BUILTIN[model].sites}
    return Case(model, sites[site_name], pixels, dtype)


@dataclass(frozen=True)
class Regime:
    """A memory situation: ``budget_bytes`` None means ample (memslice gets 64 GiB, the seed real free memory)."""

    name: str
    budget_bytes: int | None = None

    @property
    def budgeted(self) -> bool:
        return self.budget_bytes is not None


def budget_regime(mib: float) -> Regime:
    name = f"{mib / 1024:g} GiB" if mib >= 1024 else f"{mib:g} MiB"
    return Regime(name, int(mib * MiB))


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Random q, k, v projections ``[B, N, H*d]`` (fixed seed, generated on the CPU for reproducibility)."""
    s = case.shape
    g = torch.Generator().manual_seed(seed)
    hd, hv = s.heads * s.head_dim, s.heads * s.v_dim
    dims = ((s.q_tokens, hd), (s.k_tokens, hd), (s.k_tokens, hv))
    return tuple(torch.randn(s.batch, n, c, generator=g).to(device=device, dtype=case.dtype) for n, c in dims)


# --- contender cores ([B, N, H*d] in, [B, Nq, H*dv] out) -----------------------------------------------


def heads_view(t: Tensor, heads: int) -> Tensor:
    """``[B, N, H*d]`` -> ``[B, H, N, d]`` as a view (what the webui's sdp optimizer and memslice do)."""
    b, n, hd = t.shape
    return t.view(b, n, heads, hd // heads).transpose(1, 2)


def merge_heads(out: Tensor) -> Tensor:
    """``[B, H, N, dv]`` -> ``[B, N, H*dv]``."""
    b, h, n, dv = out.shape
    return out.transpose(1, 2).reshape(b, n, h * dv)


def sdpa_core(q: Tensor, k: Tensor, v: Tensor, heads: int, scale: float) -> Tensor:
    """One ``scaled_dot_product_attention`` on the 4-D views: the webui's sdp optimizer."""
    out = F.scaled_dot_product_attention(heads_view(q, heads), heads_view(k, heads), heads_view(v, heads), scale=scale)
    return merge_heads(out)


def einsum_core(q: Tensor, k: Tensor, v: Tensor, heads: int, scale: float) -> Tensor:
    """Stock ldm attention, unsliced, on 3-D ``(b h) n d`` tensors."""
    q, k, v = (doggettx_reference.to_rows(t, heads) for t in (q, k, v))
    sim = torch.einsum("b i d, b j d -> b i j", q, k) * scale
    del q, k
    sim = sim.softmax(dim=-1)
    out = torch.einsum("b i j, b j d -> b i d", sim, v)
    return doggettx_reference.from_rows(out, heads)


def doggettx_ref_core(free: Callable[[], float]) -> Core:
    """The seed's core with free memory from ``free()`` (a fixed budget, or a probe called per call)."""

    def core(q: Tensor, k: Tensor, v: Tensor, heads: int, scale: float) -> Tensor:
        return doggettx_reference.split_attention(q, k, v, heads, scale, free())

    return core


def diffusers_status() -> tuple[bool, str]:
    """Whether diffusers' SlicedAttnProcessor can be used here, and its version or why not."""
    try:
        import diffusers
        from diffusers.models.attention_processor import Attention, SlicedAttnProcessor  # noqa: F401
    except Exception as exc:  # any import failure makes the contender unavailable, not the benchmark
        return False, f"diffusers failed to import: {type(exc).__name__}: {exc}"
    return True, f"diffusers {diffusers.__version__}"


class _ValueOf(torch.nn.Module):
    """``to_v`` for the diffusers contender: diffusers projects k and v from the same input, so an Identity
    would force v = k. This returns the case's own v when given the case's k."""

    def __init__(self, k: Tensor, v: Tensor) -> None:
        super().__init__()
        self.k, self.v = k, v

    def forward(self, x: Tensor) -> Tensor:
        if x is not self.k:
            raise ValueError("the diffusers contender must be called with the case's k as encoder_hidden_states")
        return self.v


def diffusers_call(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Callable[[], Tensor]:
    """diffusers' own ``Attention`` with ``SlicedAttnProcessor(heads // 2)`` (``set_attention_slice("auto")``),
    projections replaced so only the attention core runs on these q, k, v."""
    from diffusers.models.attention_processor import Attention, SlicedAttnProcessor

    d = q.shape[-1] // heads
    attn = Attention(query_dim=heads * d, heads=heads, dim_head=d).eval()
    attn.to_q, attn.to_k, attn.to_v = torch.nn.Identity(), torch.nn.Identity(), _ValueOf(k, v)
    attn.to_out[0] = torch.nn.Identity()
    attn.set_processor(SlicedAttnProcessor(slice_size=max(1, heads // 2)))
    attn.to(device=q.device, dtype=q.dtype)

    def call() -> Tensor:
        return attn(q, encoder_hidden_states=k)

    return call


# --- contenders ------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """A contender bound to one case and regime."""

    call: Callable[[], Tensor]
    #: identity of the work done, known before running (None: only after the first call, via ``info``)
    key: tuple[Any, ...] | None = None
    #: after a call: plan facts (steps, predicted peak, kernel...) and the key of the work it did
    info: Callable[[], dict[str, Any]] = lambda: {}


@dataclass
class Contender:
    name: str
    label: str
    family: str  # "memslice" | "baseline" | "reference"
    budget_aware: bool
    prepare: Callable[[Case, Regime, tuple[Tensor, Tensor, Tensor], torch.device], Prepared]
    available: bool = True
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "label": self.label,
            "family": self.family,
            "budget_aware": self.budget_aware,
            "available": self.available,
            "reason": self.reason,
        }


def memslice_settings(regime: Regime) -> Settings:
    gb = AMPLE_GB if regime.budget_bytes is None else regime.budget_bytes / (1 << 30)
    return Settings(budget_gb=gb)


def _memslice(strategy: str) -> Contender:
    def prepare(case: Case, regime: Regime, qkv: tuple[Tensor, Tensor, Tensor], device: torch.device) -> Prepared:
        q, k, v = qkv
        heads, site = case.site.heads, case.site
        host = BasicHost(memslice_settings(regime))
        scale = case.shape.head_dim**-0.5

        def call() -> Tensor:
            out = attend(
                heads_view(q, heads),
                heads_view(k, heads),
                heads_view(v, heads),
                scale=scale,
                strategy=strategy,
                host=host,
                site=site.name,
                geometry=site.geometry,
            )
            return merge_heads(out)

        def info() -> dict[str, Any]:
            recent = host.stats.recent()
            if not recent:
                return {}
            r = recent[-1]
            return {
                "steps": r.slices,
                "predicted_peak_bytes": r.peak_bytes,
                "plan_budget_bytes": r.budget_bytes,
                "kernel": r.kernel_used,
                "head_chunk": r.heads_per_slice,
                "query_chunk": r.queries_per_slice,
                "retries": r.retries,
                "work": ("memslice", r.kernel_used, r.heads_per_slice, r.queries_per_slice),
            }

        return Prepared(call, None, info)

    return Contender(f"memslice-{strategy}", f"memslice {strategy}", "memslice", True, prepare)


def _core_contender(name: str, label: str, family: str, core: Core) -> Contender:
    def prepare(case: Case, regime: Regime, qkv: tuple[Tensor, Tensor, Tensor], device: torch.device) -> Prepared:
        q, k, v = qkv
        heads, scale = case.site.heads, case.shape.head_dim**-0.5
        return Prepared(lambda: core(q, k, v, heads, scale), (name,))

    return Contender(name, label, family, False, prepare)


def _doggettx_ref() -> Contender:
    def prepare(case: Case, regime: Regime, qkv: tuple[Tensor, Tensor, Tensor], device: torch.device) -> Prepared:
        q, k, v = qkv
        heads, s = case.site.heads, case.shape
        free = float(regime.budget_bytes) if regime.budgeted else float(probe.free_memory(device).bytes)
        steps = doggettx_reference.split_steps(s.batch_heads, s.q_tokens, s.k_tokens, q.element_size(), free)
        core = doggettx_ref_core(lambda: free)

        def info() -> dict[str, Any]:
            return {"steps": steps, "free_bytes_given": int(free)}

        return Prepared(lambda: core(q, k, v, heads, s.head_dim**-0.5), ("doggettx-ref", steps), info)

    return Contender(
        "doggettx-ref", "Doggettx reference (seed, webui 1.10.1 split attention)", "reference", True, prepare
    )


def _diffusers() -> Contender:
    ok, why = diffusers_status()

    def prepare(case: Case, regime: Regime, qkv: tuple[Tensor, Tensor, Tensor], device: torch.device) -> Prepared:
        q, k, v = qkv
        return Prepared(diffusers_call(q, k, v, case.site.heads), ("diffusers-sliced",))

    label = f"diffusers SlicedAttnProcessor (slice_size = heads // 2; {why})" if ok else "diffusers SlicedAttnProcessor"
    return Contender("diffusers-sliced", label, "baseline", False, prepare, available=ok, reason="" if ok else why)


SDPA = "sdpa"
DOGGETTX_REF = "doggettx-ref"
MEMSLICE_AUTO = "memslice-auto"


def all_contenders() -> list[Contender]:
    """Plain SDPA first (every ratio refers to it), then memslice-auto, the seed, and the rest."""
    memslice = [_memslice(s) for s in STRATEGY_NAMES]
    return [
        _core_contender(SDPA, "plain SDPA (one fused call on 4-D views)", "baseline", sdpa_core),
        *memslice,
        _doggettx_ref(),
        _core_contender("einsum", "plain einsum (stock ldm, unsliced)", "baseline", einsum_core),
        _diffusers(),
    ]


# --- measuring -------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    """Wait for queued device work so wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@dataclass(frozen=True)
class TimingPolicy:
    """How long to time one contender: ``repeats`` runs, more (up to 20x) for calls faster than ``min_time_s``
    in total, fewer (down to ``min_repeats``) once ``max_time_s`` is spent, so slow CPU cases stay bounded."""

    warmup: int = 1
    repeats: int = 5
    min_repeats: int = 3
    min_time_s: float = 0.5
    max_time_s: float = 6.0
    #: plain SDPA vs memslice-auto (the 1.05x target): at least this long in total and this many interleaved
    #: rounds, for a median that one noisy run cannot decide
    pair_min_time_s: float = 0.0
    pair_min_repeats: int = 3


def time_calls(
    calls: list[Callable[[], Tensor]], device: torch.device, policy: TimingPolicy, warmed: int = 0
) -> list[list[float]]:
    """Seconds per call for each of ``calls``, timed in interleaved rounds (A, B, A, B...) so that drift and busy
    neighbours hit them alike. ``warmed`` warm-up runs already happened (the peak-measurement run counts as one).
    """
    for _ in range(max(0, policy.warmup - warmed)):
        for call in calls:
            call()
    synchronize(device)
    times: list[list[float]] = [[] for _ in calls]
    min_n = max(1, min(policy.min_repeats, policy.repeats))
    while True:
        for call, ts in zip(calls, times, strict=True):
            start = time.perf_counter()
            call()
            synchronize(device)
            ts.append(time.perf_counter() - start)
        n, spent = len(times[0]), max(sum(ts) for ts in times)
        if n >= max(policy.repeats, 1) * 20:
            break
        if n >= policy.repeats and spent >= policy.min_time_s:
            break
        if n >= min_n and spent >= policy.max_time_s:
            break
    return times


def time_call(call: Callable[[], Tensor], device: torch.device, policy: TimingPolicy, warmed: int = 0) -> list[float]:
    """Seconds per call of one contender (see :func:`time_calls`)."""
    return time_calls([call], device, policy, warmed)[0]


def is_does_not_fit(exc: BaseException) -> bool:
    """``NotEnoughMemory``, the seed's RuntimeError, out-of-memory of any backend: the case does not fit."""
    return isinstance(exc, (NotEnoughMemory, RuntimeError, MemoryError))


def short_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:400]


def release_memory(device: torch.device, collect: bool = True) -> None:
    """Free what earlier runs left behind so each measurement starts alike. ``collect=False`` skips the
    cycle collector (~0.1 s with diffusers loaded); refcounting already frees tensors on the CPU."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class CaseRun:
    """State shared by all contenders of one case: inputs, the SDPA reference output, measured work."""

    case: Case
    device: torch.device
    qkv: tuple[Tensor, Tensor, Tensor]
    reference: Tensor | None = None
    timings: dict[tuple[Any, ...], tuple[list[float], str]] = field(default_factory=dict)
    rows: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    #: time plain SDPA interleaved with memslice-auto in the ample regime (the 1.05x target compares them)
    pair_sdpa: bool = False
    deferred: tuple[Callable[[], Tensor], dict[str, Any], tuple[Any, ...]] | None = None


def measure(run: CaseRun, contender: Contender, regime: Regime, policy: TimingPolicy) -> dict[str, Any]:
    """One result row: peak run (also the first warm-up and the error check), then timed runs.

    Work already measured in this case (same key: a budget-blind baseline, the seed at the same step count,
    a memslice plan identical to an earlier one) reuses that timing instead of running again.
    """
    row: dict[str, Any] = {
        "contender": contender.name,
        "regime": regime.name,
        "budget_bytes": regime.budget_bytes,
        "status": "ok",
        "message": "",
    }
    if not contender.available:
        row.update(status="unavailable", message=contender.reason)
        return row
    if not contender.budget_aware and (contender.name, "ample") in run.rows and regime.budgeted:
        base = run.rows[(contender.name, "ample")]
        row.update({k: v for k, v in base.items() if k not in ("regime", "budget_bytes", "notes")})
        row["notes"] = ["ignores the budget: same measurement as the ample regime"]
        return row
    try:
        prepared = contender.prepare(run.case, regime, run.qkv, run.device)
    except Exception as exc:
        if not is_does_not_fit(exc):
            raise
        row.update(status="does not fit", message=short_error(exc))
        return row
    if prepared.key is not None and prepared.key in run.timings and contender.budget_aware:
        for (name, rname), earlier in run.rows.items():
            if name == contender.name and earlier.get("work") == prepared.key and earlier["status"] == "ok":
                row.update({k: v for k, v in earlier.items() if k not in ("regime", "budget_bytes", "notes")})
                row["notes"] = [f"same steps as the {rname} regime: same measurement"]
                row.update(prepared.info())
                return row
    row["notes"] = []
    try:
        release_memory(run.device, collect=False)
        with peak_tracker(run.device) as tracker:
            out = prepared.call()
        synchronize(run.device)
        row["measured_peak_bytes"] = int(tracker.peak)
        row.update(prepared.info())
        if contender.name == SDPA:
            run.reference = out.detach().clone()
            row["max_abs_error"] = 0.0
        elif run.reference is not None:
            row["max_abs_error"] = float((out.float() - run.reference.float()).abs().max().item())
        else:
            row["max_abs_error"] = None
            row["notes"].append("no plain SDPA output to compare with")
        del out
        work = prepared.key or row.get("work") or (contender.name, regime.name)
        row["work"] = work
        if work in run.timings:
            times, source = run.timings[work]
            row["notes"].append(f"same plan as {source}: timing reused")
        elif contender.name == SDPA and run.pair_sdpa and not regime.budgeted:
            run.deferred = (prepared.call, row, work)  # timed together with memslice-auto, next
            return row
        elif contender.name == MEMSLICE_AUTO and run.deferred is not None:
            sdpa_call, sdpa_row, sdpa_work = run.deferred
            run.deferred = None
            paired = replace(
                policy,
                min_time_s=max(policy.min_time_s, policy.pair_min_time_s),
                repeats=max(policy.repeats, policy.pair_min_repeats),
                min_repeats=max(policy.min_repeats, policy.pair_min_repeats),
            )
            sdpa_times, times = time_calls([sdpa_call, prepared.call], run.device, paired, warmed=1)
            run.timings[sdpa_work] = (sdpa_times, f"{SDPA} ({regime.name})")
            sdpa_row.update(summarize(sdpa_times))
            # the same rounds side by side: drift and busy neighbours cancel in each round's ratio
            paired_ratio = statistics.median(a / b for a, b in zip(times, sdpa_times, strict=True))
            row["paired_ratio_sdpa"] = paired_ratio
            row["notes"].append(f"median per-round ratio to plain SDPA {paired_ratio:.3f}x")
            sdpa_row["notes"].append("timed interleaved with memslice-auto")
            row["notes"].append("timed interleaved with plain SDPA")
            run.timings[work] = (times, f"{contender.name} ({regime.name})")
        else:
            times = time_call(prepared.call, run.device, policy, warmed=1)
            run.timings[work] = (times, f"{contender.name} ({regime.name})")
    except Exception as exc:
        if not is_does_not_fit(exc):
            raise
        exc.__traceback__ = None
        row.update(status="does not fit", message=short_error(exc))
        row.pop("work", None)
        release_memory(run.device)
        return row
    row.update(summarize(times))
    return row


def summarize(times: list[float]) -> dict[str, Any]:
    ms = sorted(t * 1e3 for t in times)
    n = len(ms)
    median = ms[n // 2] if n % 2 else (ms[n // 2 - 1] + ms[n // 2]) / 2
    return {"median_ms": median, "min_ms": ms[0], "max_ms": ms[-1], "runs": n, "times_ms": ms}


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Ratios to plain SDPA and to the seed within one case and regime (None where either did not run)."""
    by_name = {r["contender"]: r for r in rows}

    def median(name: str) -> float | None:
        r = by_name.get(name)
        return r.get("median_ms") if r and r.get("status") == "ok" else None

    sdpa, ref = median(SDPA), median(DOGGETTX_REF)
    for r in rows:
        m = r.get("median_ms") if r.get("status") == "ok" else None
        r["ratio_sdpa"] = m / sdpa if m is not None and sdpa else None
        r["ratio_doggettx_ref"] = m / ref if m is not None and ref else None
        budget = r.get("budget_bytes")
        peak = r.get("measured_peak_bytes")
        r["over_budget"] = bool(budget is not None and peak is not None and peak > budget)


def run_case(
    case: Case,
    contenders: list[Contender],
    regimes: list[Regime],
    device: torch.device,
    policy: TimingPolicy,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """All contenders in all regimes at one case; plain SDPA runs first and provides the reference output."""
    run = CaseRun(case, device, make_inputs(case, device))
    run.pair_sdpa = any(c.name == MEMSLICE_AUTO and c.available for c in contenders)
    s = case.shape
    result: dict[str, Any] = {
        "key": case.key,
        "label": case.label,
        "model": case.model,
        "site": case.site.name,
        "pixels": case.pixels,
        "dtype": DTYPE_NAMES.get(case.dtype, str(case.dtype)),
        "shape": {
            "batch": s.batch,
            "heads": s.heads,
            "batch_heads": s.batch_heads,
            "q_tokens": s.q_tokens,
            "k_tokens": s.k_tokens,
            "head_dim": s.head_dim,
            "v_dim": s.v_dim,
            "score_bytes": s.score_bytes,
        },
        "regimes": [],
    }
    for regime in regimes:
        rows = []
        for contender in contenders:
            start = time.perf_counter()
            row = measure(run, contender, regime, policy)
            run.rows[(contender.name, regime.name)] = row
            rows.append(row)
            took = f"[{time.perf_counter() - start:.1f} s]"
            log(f"    {regime.name:>8} {contender.name:<18} {describe(row)} {took}")
            if contender.name == MEMSLICE_AUTO and "timed interleaved with plain SDPA" in row.get("notes", ()):
                log(f"    {regime.name:>8} {SDPA:<18} {describe(run.rows[(SDPA, regime.name)])} (interleaved)")
        if run.deferred is not None:  # memslice-auto did not run: time SDPA alone
            call, row, work = run.deferred
            run.deferred = None
            times = time_call(call, device, policy, warmed=1)
            run.timings[work] = (times, f"{SDPA} ({regime.name})")
            row.update(summarize(times))
            log(f"    {regime.name:>8} {SDPA:<18} {describe(row)}")
        add_ratios(rows)
        result["regimes"].append({"name": regime.name, "budget_bytes": regime.budget_bytes, "results": rows})
    del run
    release_memory(device)
    return result


def describe(row: dict[str, Any]) -> str:
    """One progress line for a result row."""
    if row["status"] != "ok":
        return f"{row['status']}: {row['message'][:100]}"
    if row.get("median_ms") is None:
        return f"peak {format_bytes(row.get('measured_peak_bytes', 0))}; timed next, interleaved with memslice-auto"
    text = f"{row['median_ms']:9.1f} ms  peak {format_bytes(row.get('measured_peak_bytes', 0)):>10}"
    if row.get("steps") is not None:
        text += f"  steps {row['steps']}"
    return text
