"""Whole-model cases: the real ldm UNet (and, on CUDA, the VAE decoder) with each contender patched in.

The attention table isolates the attention core; this checks that the differences survive inside a real
forward, where projections, convolutions and the allocator's state around them also count. Weights are random:
ldm's ``zero_module`` leaves output layers at zero (design.md section 4), so those are re-initialised, otherwise
every contender would produce the same all-zero output and the error check would be vacuous.
"""

from __future__ import annotations

import contextlib
import io
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .. import probe
from ..costs import GiB, format_bytes
from ..forwards import BasicHost, make_attnblock_forward, make_cross_attention_forward
from ..kernels import is_oom
from ..memtrack import CudaPeak, peak_tracker
from ..settings import Settings
from ..slicing import NotEnoughMemory
from .harness import (
    DOGGETTX_REF,
    MEMSLICE_AUTO,
    SDPA,
    Core,
    TimingPolicy,
    doggettx_ref_core,
    einsum_core,
    is_does_not_fit,
    release_memory,
    sdpa_core,
    short_error,
    summarize,
    synchronize,
    time_call,
    time_calls,
)

Tensor = torch.Tensor

#: SD1.5's UNet (v1-inference.yaml) as ldm's UNetModel takes it
SD15_UNET: dict[str, Any] = dict(
    image_size=32,
    in_channels=4,
    out_channels=4,
    model_channels=320,
    attention_resolutions=[4, 2, 1],
    num_res_blocks=2,
    channel_mult=[1, 2, 4, 4],
    num_heads=8,
    use_spatial_transformer=True,
    transformer_depth=1,
    context_dim=768,
    legacy=False,
)
#: SD1.5's VAE decoder (ddconfig of v1-inference.yaml)
SD15_DECODER: dict[str, Any] = dict(
    double_z=True,
    z_channels=4,
    resolution=256,
    in_channels=3,
    out_ch=3,
    ch=128,
    ch_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_resolutions=[],
    dropout=0.0,
)
UNET_CONTENDERS = (MEMSLICE_AUTO, "memslice-doggettx", SDPA, "einsum", DOGGETTX_REF)


def import_ldm() -> tuple[Any, Any, Any]:
    """ldm's attention, VAE model and UNet modules (sdkit prints notes on import; keep the progress clean)."""
    with contextlib.redirect_stdout(io.StringIO()):
        import ldm.modules.attention as attention
        import ldm.modules.diffusionmodules.model as model
        import ldm.modules.diffusionmodules.openaimodel as openaimodel
    return attention, model, openaimodel


@contextlib.contextmanager
def _plain_ldm_modules() -> Iterator[None]:
    """Build with ldm's plain CrossAttention/AttnBlock even where xformers is installed: those are the classes
    the webui patches, and the ones this benchmark patches."""
    attention, model, _ = import_ldm()
    saved = [(m, getattr(m, "XFORMERS_IS_AVAILBLE", None)) for m in (attention, model)]
    for m, _ in saved:
        m.XFORMERS_IS_AVAILBLE = False
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for m, value in saved:
            if value is not None:
                m.XFORMERS_IS_AVAILBLE = value


def reinit_zeroed(module: torch.nn.Module) -> int:
    """Give every layer that ``zero_module`` left at zero its default initialisation; returns how many."""
    count = 0
    with torch.no_grad():
        for m in module.modules():
            weight = getattr(m, "weight", None)
            if isinstance(weight, torch.nn.Parameter) and hasattr(m, "reset_parameters") and not weight.any():
                m.reset_parameters()
                count += 1
    return count


def build_unet(model_channels: int = 320, seed: int = 0) -> torch.nn.Module:
    """SD1.5's UNet with random (non-degenerate) weights; ``model_channels`` 32 keeps the token counts."""
    _, _, openaimodel = import_ldm()
    torch.manual_seed(seed)
    with _plain_ldm_modules():
        unet = openaimodel.UNetModel(**{**SD15_UNET, "model_channels": model_channels}).eval()
    reinit_zeroed(unet)
    return unet


def build_decoder(seed: int = 0) -> torch.nn.Module:
    """SD1.5's VAE decoder with random weights."""
    _, model, _ = import_ldm()
    torch.manual_seed(seed)
    with _plain_ldm_modules():
        decoder = model.Decoder(**SD15_DECODER).eval()
    reinit_zeroed(decoder)
    return decoder


def cross_attention_forward(core: Core) -> Callable[..., Tensor]:
    """A ``CrossAttention.forward`` around a bench core: projections, the core, ``to_out``."""

    def forward(self: Any, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None, **kwargs: Any):
        if mask is not None:
            raise ValueError("the benchmark forwards do not take a mask (the webui never passes one)")
        context = x if context is None else context
        return self.to_out(core(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, self.scale))

    return forward


def attnblock_forward(core: Core) -> Callable[..., Tensor]:
    """An ``AttnBlock.forward`` around a bench core: single-head attention over ``h*w`` tokens."""

    def forward(self: Any, x: Tensor, **kwargs: Any) -> Tensor:
        h_ = self.norm(x)
        q, k, v = self.q(h_), self.k(h_), self.v(h_)
        b, c, h, w = q.shape
        q, k, v = (t.reshape(b, c, h * w).transpose(1, 2) for t in (q, k, v))
        out = core(q, k, v, 1, int(c) ** -0.5)
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))

    return forward


def _seed_free(device: torch.device) -> Callable[[], float]:
    """What the webui's ``get_available_vram()`` reads, probed on every call like the seed does."""
    precise = device.type == "cuda"
    return lambda: float(probe.free_memory(device, precise=precise).bytes)


def model_contenders(device: torch.device) -> list[tuple[str, Callable[..., Tensor], Callable[..., Tensor], Any]]:
    """(name, CrossAttention.forward, AttnBlock.forward, memslice host or None) for whole-model runs.

    memslice runs with default settings (probe free memory, safety factor 3.3), as a user would; the seed probes
    free memory on every call as the webui does.
    """
    out: list[tuple[str, Callable[..., Tensor], Callable[..., Tensor], Any]] = []
    cores = {SDPA: sdpa_core, "einsum": einsum_core, DOGGETTX_REF: doggettx_ref_core(_seed_free(device))}
    for name in (SDPA, MEMSLICE_AUTO, "memslice-doggettx", DOGGETTX_REF, "einsum"):
        if name.startswith("memslice-"):
            host = BasicHost(Settings())
            strategy = name.removeprefix("memslice-")
            cross = make_cross_attention_forward(strategy, host)
            block = make_attnblock_forward(strategy, host)
            out.append((name, cross, block, host))
        else:
            out.append((name, cross_attention_forward(cores[name]), attnblock_forward(cores[name]), None))
    return out


@contextlib.contextmanager
def patched(cross: Callable[..., Tensor] | None = None, block: Callable[..., Tensor] | None = None) -> Iterator[None]:
    """Patch ldm's CrossAttention / AttnBlock forwards (as a webui optimizer does) and always restore them."""
    attention, model, _ = import_ldm()
    saved = (attention.CrossAttention.forward, model.AttnBlock.forward)
    try:
        if cross is not None:
            attention.CrossAttention.forward = cross
        if block is not None:
            model.AttnBlock.forward = block
        yield
    finally:
        attention.CrossAttention.forward, model.AttnBlock.forward = saved


def _plan_summary(host: Any) -> dict[str, Any]:
    if host is None:
        return {}
    recent = host.stats.recent()
    if not recent:
        return {}
    return {
        "max_steps": max(r.slices for r in recent),
        "max_predicted_peak_bytes": max(r.peak_bytes for r in recent),
        "attention_calls": len(recent),
    }


def run_unet(
    device: torch.device,
    model_channels: int,
    pixels: int,
    runs: int,
    log: Callable[[str], None],
    timed_peak_run: bool = False,
) -> dict[str, Any]:
    """One SD1.5 UNet forward (cond + uncond batch) per contender: peak run (doubles as warm-up), then ``runs``
    timed forwards.

    ``timed_peak_run`` (--quick, where unsliced einsum forwards take ~10 s each on 2 cores): one untracked SDPA
    forward warms the model up, then each contender's single forward is both its peak run and its timing; the
    tracker's cost is measured on SDPA and reported.
    """
    start = time.perf_counter()
    unet = build_unet(model_channels).to(device)
    params = sum(p.numel() for p in unet.parameters())
    log(
        f"  built UNet (model_channels {model_channels}, {params / 1e6:.1f} M parameters) in "
        f"{time.perf_counter() - start:.1f} s"
    )
    g = torch.Generator().manual_seed(1)
    side = pixels // 8
    x = torch.randn(2, 4, side, side, generator=g).to(device)
    t = torch.tensor([10, 500], device=device)
    context = torch.randn(2, 77, SD15_UNET["context_dim"], generator=g).to(device)
    policy = TimingPolicy(warmup=1, repeats=runs, min_repeats=runs, min_time_s=0.0, max_time_s=0.0)
    contenders = [c for c in model_contenders(device) if c[0] in UNET_CONTENDERS]
    plain_sdpa_s = None
    if timed_peak_run:
        with patched(cross_attention_forward(sdpa_core)), torch.no_grad():
            unet(x, t, context=context)  # one-time lazy initialisation (oneDNN primitives, caches)
            plain_sdpa_s = time_call(lambda: unet(x, t, context=context), device, policy_once(), warmed=1)[0]
        log(f"    UNet warm-up done, untracked SDPA forward {plain_sdpa_s:.2f} s")
    rows: list[dict[str, Any]] = []
    reference: Tensor | None = None
    for name, cross, _block, host in contenders:
        row: dict[str, Any] = {"contender": name, "status": "ok", "message": ""}
        begin = time.perf_counter()
        try:
            with patched(cross), torch.no_grad():
                release_memory(device)
                synchronize(device)
                tracked_start = time.perf_counter()
                with peak_tracker(device) as tracker:
                    out = unet(x, t, context=context)
                synchronize(device)
                tracked_s = time.perf_counter() - tracked_start
                row["measured_peak_bytes"] = int(tracker.peak)
                if name == SDPA:
                    reference = out.detach().clone()
                    row["output_max_abs"] = float(out.abs().max().item())
                ref = reference
                row["max_abs_error"] = None if ref is None else float((out.float() - ref.float()).abs().max().item())
                del out
                if timed_peak_run:
                    times = [tracked_s]
                else:
                    times = time_call(lambda: unet(x, t, context=context), device, policy, warmed=1)
            row.update(summarize(times))
            row.update(_plan_summary(host))
        except Exception as exc:
            if not is_does_not_fit(exc):
                raise
            exc.__traceback__ = None
            row.update(status="does not fit", message=short_error(exc))
        rows.append(row)
        text = f"{row['median_ms'] / 1e3:7.2f} s" if row["status"] == "ok" else row["status"]
        log(f"    UNet {name:<18} {text} [{time.perf_counter() - begin:.1f} s]")
    if not timed_peak_run:
        _pair_with_sdpa(unet, (x, t, context), contenders, rows, device, runs + 1, log)
    medians = {r["contender"]: r.get("median_ms") for r in rows if r["status"] == "ok"}
    for r in rows:
        m = r.get("median_ms")
        r["ratio_sdpa"] = m / medians[SDPA] if m and medians.get(SDPA) else None
        r["ratio_doggettx_ref"] = m / medians[DOGGETTX_REF] if m and medians.get(DOGGETTX_REF) else None
    overhead = None
    if plain_sdpa_s and medians.get(SDPA):
        overhead = medians[SDPA] / 1e3 / plain_sdpa_s - 1
    return {
        "model_channels": model_channels,
        "parameters": params,
        "pixels": pixels,
        "input": {"x": list(x.shape), "context": list(context.shape)},
        "runs": 1 if timed_peak_run else runs,
        "timed_peak_run": timed_peak_run,
        "untracked_sdpa_s": plain_sdpa_s,
        "tracker_overhead": overhead,
        "memslice_settings": "defaults: probed free memory / safety factor 3.3",
        "results": rows,
    }


def _pair_with_sdpa(
    unet: torch.nn.Module,
    inputs: tuple[Tensor, Tensor, Tensor],
    contenders: list[tuple[str, Callable[..., Tensor], Callable[..., Tensor], Any]],
    rows: list[dict[str, Any]],
    device: torch.device,
    rounds: int,
    log: Callable[[str], None],
) -> None:
    """Plain SDPA and memslice-auto forwards in alternating rounds: a 10 s forward drifts by more than the
    difference being measured, and each round's ratio cancels that drift."""
    crosses = {name: cross for name, cross, _block, _host in contenders}
    by_name = {r["contender"]: r for r in rows if r["status"] == "ok"}
    if SDPA not in by_name or MEMSLICE_AUTO not in by_name:
        return
    x, t, context = inputs

    def forward_with(cross: Callable[..., Tensor]) -> Callable[[], Tensor]:
        def call() -> Tensor:
            with patched(cross), torch.no_grad():
                return unet(x, t, context=context)

        return call

    policy = TimingPolicy(warmup=0, repeats=rounds, min_repeats=rounds, min_time_s=0.0, max_time_s=0.0)
    sdpa_t, auto_t = time_calls([forward_with(crosses[SDPA]), forward_with(crosses[MEMSLICE_AUTO])], device, policy)
    ratio = statistics.median(a / b for a, b in zip(auto_t, sdpa_t, strict=True))
    by_name[MEMSLICE_AUTO]["paired_ratio_sdpa"] = ratio
    by_name[MEMSLICE_AUTO]["notes"] = f"{rounds} rounds interleaved with SDPA: median per-round ratio {ratio:.3f}x"
    log(f"    UNet memslice-auto vs SDPA, {rounds} interleaved rounds: median per-round ratio {ratio:.3f}x")


def policy_once() -> TimingPolicy:
    """Exactly one timed run."""
    return TimingPolicy(warmup=1, repeats=1, min_repeats=1, min_time_s=0.0, max_time_s=0.0)


# --- CUDA only: fp16 pipeline peak and the largest resolution within 4 GiB --------------------------------


def _unet_inputs(device: torch.device, pixels: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    side = pixels // 8
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, side, side, generator=g).to(device, dtype)
    context = torch.randn(2, 77, SD15_UNET["context_dim"], generator=g).to(device, dtype)
    return x, torch.tensor([10, 500], device=device), context


def _latent(device: torch.device, pixels: int, dtype: torch.dtype) -> Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randn(1, SD15_DECODER["z_channels"], pixels // 8, pixels // 8, generator=g).to(device, dtype)


def _try(fn: Callable[[], Any]) -> str | None:
    """Run ``fn``; None on success, the message if it did not fit (OOM or NotEnoughMemory)."""
    try:
        fn()
    except Exception as exc:
        if not is_does_not_fit(exc):
            raise
        exc.__traceback__ = None
        oom = isinstance(exc, NotEnoughMemory) or is_oom(exc) or "not enough memory" in str(exc).lower()
        return short_error(exc) if oom else f"error, not out of memory: {short_error(exc)}"
    return None


def largest_side(
    fits: Callable[[int], str | None], device: torch.device, start: int, limit: int, time_limit_s: float
) -> tuple[int, str]:
    """Largest multiple of 64 px in [start, limit] where ``fits(side)`` succeeds (None), and what stopped it.

    Doubles from ``start`` to the first failure, then bisects on the 64 px grid: ~8 forwards instead of ~50 for
    a linear scan (success is assumed monotone in size). 0 when even ``start`` fails.
    """
    began = time.perf_counter()

    def attempt(side: int) -> str | None:
        failed = fits(side)
        release_memory(device)
        return failed

    failed = attempt(start)
    if failed:
        return 0, f"{start} px: {failed}"
    good, bad, stop = start, None, f"reached the search limit {limit} px"
    while good < limit:  # doubling
        side = min(limit, good * 2)
        failed = attempt(side)
        if failed:
            bad, stop = side, f"{side} px: {failed}"
            break
        good = side
        if time.perf_counter() - began > time_limit_s:
            return good, f"search stopped after {time_limit_s:g} s"
    while bad is not None and bad - good > 64:  # bisection on the 64 px grid
        mid = (good + bad) // 2 // 64 * 64
        failed = attempt(mid)
        if failed:
            bad, stop = mid, f"{mid} px: {failed}"
        else:
            good = mid
        if time.perf_counter() - began > time_limit_s:
            return good, f"search stopped after {time_limit_s:g} s (a fit lies below {bad} px)"
    return good, stop


def cuda_pipeline(
    device: torch.device,
    log: Callable[[str], None],
    *,
    budget_bytes: int = 4 * GiB,
    pixels: int = 512,
    max_side: int = 4096,
    search_limit_s: float = 90.0,
    dtype: torch.dtype = torch.float16,
) -> dict[str, Any]:
    """SD1.5 fp16 UNet forward + VAE decode at ``pixels``: peak allocated per contender; then, with all but
    ``budget_bytes`` of the device's free memory held by a filler tensor (a small card, simulated), the largest
    square size (64 px grid, :func:`largest_side`) each contender reaches for the UNet and for the decoder. Runs
    under autocast like the webui.
    """
    unet = build_unet(320).to(device, dtype)
    decoder = build_decoder().to(device, dtype)

    def autocast() -> Any:
        if device.type in ("cuda", "cpu"):
            return torch.autocast(device.type, dtype=dtype)
        return contextlib.nullcontext()

    rows: list[dict[str, Any]] = []
    contenders = model_contenders(device)
    with torch.no_grad():
        for name, cross, block, _host in contenders:
            row: dict[str, Any] = {"contender": name}
            with patched(cross, block), autocast():
                x, t, context = _unet_inputs(device, pixels, dtype)
                for part, fn in (
                    ("unet", lambda x=x, t=t, c=context: unet(x, t, context=c)),
                    ("vae_decode", lambda: decoder(_latent(device, pixels, dtype))),
                ):
                    release_memory(device)
                    tracker = CudaPeak(device) if device.type == "cuda" else peak_tracker(device)
                    with tracker:
                        failed = _try(fn)
                    row[f"{part}_peak_bytes"] = None if failed else int(tracker.peak)
                    if failed:
                        row[f"{part}_message"] = failed
            rows.append(row)
            log(f"    pipeline {name:<18} UNet peak {row['unet_peak_bytes']}  VAE peak {row['vae_decode_peak_bytes']}")

        filler = None
        release_memory(device)
        if device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(device)
            if free > budget_bytes:
                filler = torch.empty(free - budget_bytes, dtype=torch.uint8, device=device)
            log(f"    {format_bytes(torch.cuda.mem_get_info(device)[0])} left free for the size search")
        try:
            for (name, cross, block, _host), row in zip(contenders, rows, strict=True):
                with patched(cross, block), autocast():

                    def unet_fits(side: int) -> str | None:
                        x, t, context = _unet_inputs(device, side, dtype)
                        return _try(lambda: unet(x, t, context=context))

                    def vae_fits(side: int) -> str | None:
                        return _try(lambda: decoder(_latent(device, side, dtype)))

                    for part, fits in (("unet", unet_fits), ("vae_decode", vae_fits)):
                        best, stop = largest_side(fits, device, pixels, max_side, search_limit_s)
                        row[f"{part}_max_side"] = best
                        row[f"{part}_stop"] = stop
                log(
                    f"    within {budget_bytes / GiB:g} GiB: {name:<18} UNet {row['unet_max_side']} px, "
                    f"VAE {row['vae_decode_max_side']} px"
                )
        finally:
            del filler
            release_memory(device)
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "pixels": pixels,
        "budget_bytes": budget_bytes,
        "budget_note": "free device memory left after loading the UNet and VAE decoder (a filler tensor "
        "holds the rest); memslice probes it, the seed reads it per call",
        "results": rows,
    }
