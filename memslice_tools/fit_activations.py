"""Measure the activation memory of whole passes on the real ldm modules and fit ``lib_memslice.activations``.

``python -m memslice_tools.fit_activations`` (about 6 minutes on 2 idle cores, under 2 GiB) builds SD1.x, SD2.x
and SDXL-shaped UNets and the SD VAE's decode and encode at reduced widths, runs each forward under
:class:`~memslice_tools.memtrack.PeakTracker` with memslice's attention forwards patched in, and prints:

1. the scaling-law evidence: per width the fitted elements per (channel x latent token) and the per-channel
   constant, the batch, element-size and head-count checks, and (``--full-width``) the published width itself;
2. the coefficients as Python, to paste into ``lib_memslice/activations.py``;
3. measured vs predicted peaks at sizes NOT used for fitting, through
   :func:`lib_memslice.activations.pass_peak_bytes`, under three attention regimes (:func:`measure_regimes`):
   memslice-auto with an ample budget (the fused kernel), unsliced einsum, and einsum forced into two slices; with
   a "sum rule" column (activations + largest transient) for comparison. Exit status 0 when every case lies within
   1.00-1.15x.

Element size 4 is measured in fp32, element size 2 in bf16 (fp16 convolutions are far slower on CPU; an fp16 run
gave the same bytes), with half-precision UNets run as the webui runs them on CUDA: under autocast, whose float32
norm outputs the CPU reproduces with :func:`cuda_autocast_on_cpu`.

``--full-width`` adds SD1.5 and SD2 at model_channels 320 (3.5 GB of fp32 weights, ~1 min). ``--device cuda``
checks activations.py's model there instead: the published widths at real sizes, UNet fp16 under real
``torch.autocast`` (and without, and fp32), VAE fp16 and fp32, printing the tracker's live-tensor peak (what the
model predicts) next to the CUDA caching allocator's peak (which also holds cuDNN/cuBLAS workspaces).

What one measurement is: the peak of live tensor bytes created inside the forward (weights and the inputs exist
before and are not counted), and per attention site the bytes live once that call's q, k and v exist (forward hooks
on the projections read the tracker). Fitting divides bytes by ``element_size x batch x channels`` and fits
``per_token x latent_tokens + fixed`` per width; the stored coefficient is the largest over the widths, rounded up.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lib_memslice import activations
from lib_memslice.activations import Linear, PassModel, latent_tokens
from lib_memslice.forwards import BasicHost, make_attnblock_forward, make_cross_attention_forward
from lib_memslice.models import SITE_ATTR, sites_from_modules
from lib_memslice.settings import Settings

from .configs import SD15_DECODER, SD15_UNET
from .memtrack import CudaPeak, PeakTracker
from .sdxl_unet import build_sdxl_unet

MiB = 1 << 20
GiB = 1 << 30

KINDS: tuple[str, ...] = ("sd15", "sd2", "sdxl", "vae_decode", "vae_encode")
UNET_KINDS: tuple[str, ...] = ("sd15", "sd2", "sdxl")
#: v2-inference-v.yaml's UNet: SD1.x's with 64-channel heads, a 1024-wide context and linear projections
SD2_UNET: dict[str, Any] = {
    **SD15_UNET,
    "num_heads": -1,
    "num_head_channels": 64,
    "context_dim": 1024,
    "use_linear_in_transformer": True,
}
CONTEXT_DIM = {"sd15": 768, "sd2": 1024, "sdxl": 2048}
ADM_IN_CHANNELS = 2816  # SDXL's pooled text embedding + size/crop conditioning
PROMPT_TOKENS = 77
LATENT_SCALE = 0.18215  # SD's latent scale factor; its value does not matter for memory

FULL_WIDTH = {"sd15": 320, "sd2": 320, "sdxl": 320, "vae_decode": 128, "vae_encode": 128}
FIT_WIDTHS = {"sd15": (32, 64, 96), "sd2": (32, 64, 96), "sdxl": (32, 64, 96), "vae_decode": (32, 64, 128)}
FIT_WIDTHS["vae_encode"] = FIT_WIDTHS["vae_decode"]
#: (width, height) in image pixels; validation sizes are disjoint from these
FIT_SIZES: tuple[tuple[int, int], ...] = ((128, 128), (256, 192))
VALIDATION_SIZES: tuple[tuple[int, int], ...] = ((192, 320), (320, 256))
#: widths of the validation runs: a half-precision UNet at 32 channels and these sizes holds ~2-3 MiB, and the fused
#: kernel's in-op scratch (~2 MiB, in the planner's transient, invisible to the tracker) would dominate the check
VALIDATION_WIDTHS = {"sd15": 64, "sd2": 64, "sdxl": 64, "vae_decode": 32, "vae_encode": 32}
UNET_BATCH = 2  # cond + uncond of one image
VAE_BATCH = 1  # the webui decodes and encodes one image at a time

AMPLE = Settings(budget_gb=64.0, slice_cap=4096)


def head_channels(channels: int) -> int:
    """num_head_channels for SD2/SDXL at a width: 64 at the published 320, else channels // 4 (4/8/16 heads).

    Heads change only the attention call, not the activations around it (``--heads-check`` shows it)."""
    return 64 if channels == 320 else max(8, channels // 4)


# --- building ----------------------------------------------------------------------------------------------


def import_ldm() -> tuple[Any, Any, Any, Any, Any]:
    """ldm's attention, VAE model, UNet, util and distributions modules, imported quietly."""
    with contextlib.redirect_stdout(io.StringIO()):
        import ldm.modules.attention as attention
        import ldm.modules.diffusionmodules.model as model
        import ldm.modules.diffusionmodules.openaimodel as openaimodel
        import ldm.modules.diffusionmodules.util as util
        import ldm.modules.distributions.distributions as distributions
    return attention, model, openaimodel, util, distributions


@contextlib.contextmanager
def _plain_ldm_classes() -> Iterator[None]:
    """Build with ldm's plain CrossAttention / AttnBlock (the classes the webui patches) even with xformers."""
    attention, model, *_ = import_ldm()
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


class VaeDecode(nn.Module):
    """The webui's decode pass: latent / scale factor -> post_quant_conv -> ldm Decoder (v1-inference ddconfig)."""

    def __init__(self, ch: int = 128) -> None:
        super().__init__()
        _, model, *_ = import_ldm()
        config = {**SD15_DECODER, "ch": ch}
        self.post_quant_conv = nn.Conv2d(config["z_channels"], config["z_channels"], 1)
        self.decoder = model.Decoder(**config)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z / LATENT_SCALE))


class VaeEncode(nn.Module):
    """The webui's encode pass: ldm Encoder -> quant_conv -> sample the diagonal Gaussian -> times the scale."""

    def __init__(self, ch: int = 128) -> None:
        super().__init__()
        _, model, _, _, distributions = import_ldm()
        config = {**SD15_DECODER, "ch": ch}
        self.encoder = model.Encoder(**config)
        self.quant_conv = nn.Conv2d(2 * config["z_channels"], 2 * config["z_channels"], 1)
        self._gaussian = distributions.DiagonalGaussianDistribution

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self._gaussian(self.quant_conv(self.encoder(image))).sample() * LATENT_SCALE


def build(
    kind: str, channels: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0
) -> nn.Module:
    """One pass's module at a width (model_channels for UNets, ch for the VAE), random weights, ``eval()``.

    Half precision keeps ldm's GroupNorm32 (the UNet's norms) in float32, as CUDA autocast computes group_norm and
    as ldm's own ``x.float()`` inside it expects; the CPU has no mixed-dtype group_norm."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    _, _, openaimodel, util, _ = import_ldm()
    torch.manual_seed(seed)
    with _plain_ldm_classes(), torch.device(device):  # initialise on the device: fast on a GPU
        if kind == "sdxl":
            module: nn.Module = build_sdxl_unet(channels, head_channels(channels), seed=seed)
        elif kind in UNET_KINDS:
            config = {**(SD15_UNET if kind == "sd15" else SD2_UNET), "model_channels": channels}
            if kind == "sd2":
                config["num_head_channels"] = head_channels(channels)
            module = openaimodel.UNetModel(**config)
        elif kind == "vae_decode":
            module = VaeDecode(channels)
        else:
            module = VaeEncode(channels)
    module = module.eval().to(device=device, dtype=dtype)
    if dtype != torch.float32:
        for m in module.modules():
            if isinstance(m, util.GroupNorm32):
                m.float()
        if isinstance(module, openaimodel.UNetModel):
            module.dtype = dtype  # ldm's forward casts the latent to this
    return module


def make_inputs(
    kind: str, width: int, height: int, batch: int, dtype: torch.dtype, device: str | torch.device, seed: int = 1
) -> tuple[torch.Tensor, ...]:
    """The pass's inputs, created outside the tracked region (they are not counted)."""
    g = torch.Generator().manual_seed(seed)
    lat_h, lat_w = -(-height // 8), -(-width // 8)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    if kind == "vae_decode":
        return (randn(batch, 4, lat_h, lat_w),)
    if kind == "vae_encode":
        return (randn(batch, 3, lat_h * 8, lat_w * 8),)
    x = randn(batch, 4, lat_h, lat_w)
    t = torch.full((batch,), 500, dtype=torch.long, device=device)
    context = randn(batch, PROMPT_TOKENS, CONTEXT_DIM[kind])
    if kind == "sdxl":
        return x, t, context, randn(batch, ADM_IN_CHANNELS)
    return x, t, context


def _call(module: nn.Module, kind: str, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    if kind in ("sd15", "sd2"):
        x, t, context = inputs
        return module(x, t, context=context)
    return module(*inputs)


@contextlib.contextmanager
def _timestep_embedding_in(dtype: torch.dtype) -> Iterator[None]:
    """ldm's UNet makes a float32 sinusoidal embedding; the webui casts it to the UNet's dtype (its hijack)."""
    _, _, openaimodel, _, _ = import_ldm()
    original = openaimodel.timestep_embedding
    if dtype != torch.float32:
        openaimodel.timestep_embedding = lambda *a, **k: original(*a, **k).to(dtype)
    try:
        yield
    finally:
        openaimodel.timestep_embedding = original


@contextlib.contextmanager
def memslice_patched(host: BasicHost, strategy: str = "auto") -> Iterator[None]:
    """ldm's CrossAttention and AttnBlock forwards replaced by memslice's (as the webui optimizer does)."""
    attention, model, *_ = import_ldm()
    saved = (attention.CrossAttention.forward, model.AttnBlock.forward)
    attention.CrossAttention.forward = make_cross_attention_forward(strategy, host)
    model.AttnBlock.forward = make_attnblock_forward(strategy, host)
    try:
        yield
    finally:
        attention.CrossAttention.forward, model.AttnBlock.forward = saved


@contextlib.contextmanager
def cuda_autocast_on_cpu(module: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """A CPU stand-in for ``torch.autocast("cuda", dtype=half)`` where it changes what is live, so the CPU fit
    covers the webui's CUDA UNet (half weights under autocast).

    CUDA autocast runs ``layer_norm`` and ``group_norm`` in float32 and RETURNS float32 (SpatialTransformer's norm,
    each BasicTransformerBlock's norm1/2/3), and casts float32 inputs of linear and convolution layers back to half
    (a copy that lives for that op). On CPU, autocast keeps layer_norm in half, so this context does it at the module
    level: plain ``LayerNorm`` / ``GroupNorm`` layers run on float32 (parameters converted for the duration, input
    cast inside the call) and ``Linear`` / ``Conv2d`` layers cast a float32 input to ``dtype`` inside the call. ldm's
    GroupNorm32 already normalises a float32 copy and returns the input dtype, with or without autocast. Enter it
    before the tracker so the copies are counted. Checked on an H200 under real autocast: the same bytes per channel
    x token (see activations.py).
    """
    norms = [m for m in module.modules() if type(m) in (nn.LayerNorm, nn.GroupNorm)]
    layers = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]  # SD3's QkvLinear too

    def casting(forward: Callable[..., Any], source: torch.dtype, target: torch.dtype) -> Callable[..., Any]:
        # the cast copy is a local of this call: it dies when the op returns, before any forward hook, as in autocast
        def call(x: torch.Tensor, *rest: Any, **kwargs: Any) -> Any:
            return forward(x.to(target) if x.dtype == source else x, *rest, **kwargs)

        return call

    for m in norms:
        m.float()
        m.forward = casting(m.forward, dtype, torch.float32)  # type: ignore[method-assign]
    for m in layers:
        m.forward = casting(m.forward, torch.float32, dtype)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for m in norms + layers:
            del m.forward  # the class's forward again
        for m in norms:
            m.to(dtype)


# --- measuring ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    """One pass measured: its peak, what was live at each attention site, the planner's transients."""

    kind: str
    channels: int
    width: int
    height: int
    batch: int
    element_size: int
    peak_bytes: int
    live_bytes: dict[str, int] = field(default_factory=dict)
    attention_peaks: dict[str, int] = field(default_factory=dict)
    max_slices: int = 1
    allocator_peak_bytes: int | None = None  # CUDA only: the caching allocator's peak (workspaces included)

    @property
    def unit(self) -> int:
        """Bytes of one element per channel per latent token for this batch: the model's unit."""
        return self.element_size * self.batch * self.channels


def _slices(record: Any) -> int:
    return int(getattr(record, "slices", getattr(record, "steps", 1)))


def _attention_modules(module: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """(site, its q/k/v projection modules) for every tagged attention layer."""
    out = []
    for m in module.modules():
        tag = getattr(m, SITE_ATTR, None)
        if not tag:
            continue
        projections = [getattr(m, name) for name in ("to_q", "to_k", "to_v", "q", "k", "v") if hasattr(m, name)]
        out.append((tag[0], projections))
    return out


@contextlib.contextmanager
def _without_gemm_scratch() -> Iterator[None]:
    """On a CPU the tracker sees live tensors only, and the passes stand for the webui's CUDA runs: the plans'
    transients leave out a half-precision CPU GEMM's in-op scratch (which the runtime counts on CPUs, and CUDA's
    einsum kernel does not have), so both sides count the same bytes."""
    from lib_memslice import forwards, kernels

    cap, kernels.HALF_GEMM_SCRATCH = kernels.HALF_GEMM_SCRATCH, 0
    forwards._memo.clear()
    try:
        yield
    finally:
        kernels.HALF_GEMM_SCRATCH = cap
        forwards._memo.clear()


def measure_pass(
    module: nn.Module,
    kind: str,
    channels: int,
    width: int,
    height: int,
    batch: int,
    *,
    settings: Settings = AMPLE,
    strategy: str = "auto",
    dtype: torch.dtype = torch.float32,
    autocast: bool | None = None,
) -> Measurement:
    """Run one forward of ``module`` (from :func:`build`) under the tracker; see the module docstring.

    ``autocast`` None = as the webui runs the pass: a half-precision UNet under CUDA autocast (real on CUDA,
    :func:`cuda_autocast_on_cpu` on CPU), the VAE without."""
    device = next(module.parameters()).device
    inputs = make_inputs(kind, width, height, batch, dtype, device)
    if kind in UNET_KINDS:
        sites_from_modules(unet=module)
    else:
        sites_from_modules(vae=module)
    host = BasicHost(settings)
    tracker = PeakTracker()
    live: dict[str, int] = {}

    def hook_for(site: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, _out: Any) -> None:
            live[site] = max(live.get(site, 0), int(tracker.current))

        return hook

    hooks = [p.register_forward_hook(hook_for(site)) for site, ps in _attention_modules(module) for p in ps]
    if autocast is None:
        autocast = kind in UNET_KINDS
    autocast = autocast and dtype != torch.float32
    cuda = device.type == "cuda"
    allocator = CudaPeak(device) if cuda else contextlib.nullcontext()
    cast = torch.autocast("cuda", dtype=dtype) if autocast and cuda else contextlib.nullcontext()
    emulated = cuda_autocast_on_cpu(module, dtype) if autocast and not cuda else contextlib.nullcontext()
    try:
        patches = (memslice_patched(host, strategy), _timestep_embedding_in(dtype), torch.no_grad(), cast, emulated)
        live_only = contextlib.nullcontext() if cuda else _without_gemm_scratch()
        with patches[0], patches[1], patches[2], patches[3], patches[4], live_only, allocator, tracker:  # tracker last
            out = _call(module, kind, inputs)
            del out
    finally:
        for h in hooks:
            h.remove()
    records = host.stats.recent()
    if len(records) >= 256:
        raise RuntimeError("more attention calls than Stats keeps: the per-site transients would be incomplete")
    return Measurement(
        kind=kind,
        channels=channels,
        width=width,
        height=height,
        batch=batch,
        element_size=torch.finfo(dtype).bits // 8,
        peak_bytes=int(tracker.peak),
        live_bytes=live,
        attention_peaks=activations.attention_peaks(records),
        max_slices=max((_slices(r) for r in records), default=1),
        allocator_peak_bytes=int(allocator.peak) if isinstance(allocator, CudaPeak) else None,
    )


# --- the model's predictions -------------------------------------------------------------------------------


def predicted_activation_bytes(kind: str, m: Measurement, model: PassModel | None = None) -> tuple[int, dict[str, int]]:
    """(activation bytes, live bytes per site) for ``m``: from ``model`` if given, else through the public functions
    of :mod:`lib_memslice.activations` (what the tests check)."""
    if model is not None:
        tokens = latent_tokens(m.width, m.height, activations.UNET_GRID.get(kind, 1))
        peak = model.peak.bytes(tokens, m.batch, m.channels, m.element_size)
        live = {s: c.bytes(tokens, m.batch, m.channels, m.element_size) for s, c in model.live.items()}
        return peak, live
    args = (m.width, m.height, m.batch, m.element_size)
    if kind in UNET_KINDS:
        return (
            activations.unet_activation_bytes(kind, *args, model_channels=m.channels),
            activations.unet_live_bytes(kind, *args, model_channels=m.channels),
        )
    if kind == "vae_decode":
        return (
            activations.vae_decode_activation_bytes(*args, channels=m.channels),
            activations.vae_decode_live_bytes(*args, channels=m.channels),
        )
    return (
        activations.vae_encode_activation_bytes(*args, channels=m.channels),
        activations.vae_encode_live_bytes(*args, channels=m.channels),
    )


def predicted_pass_peak(kind: str, m: Measurement, model: PassModel | None = None) -> tuple[int, str]:
    """The model's pass peak for ``m`` with the transients memslice predicted in that run, and which term won."""
    peak, live = predicted_activation_bytes(kind, m, model)
    total = activations.pass_peak_bytes(peak, m.attention_peaks, live)
    winner = "activations"
    for site, transient in m.attention_peaks.items():
        if live.get(site, peak) + transient == total and total > peak:
            winner = site
    return total, winner


# --- fitting -----------------------------------------------------------------------------------------------

#: the dtype measured for each element size (bf16 stands for fp16 too: same layers, and fp16 convolutions are
#: 10-40x slower on CPU; an fp16 run gave the same bytes per element as bf16 on SD1.5). Half-precision UNets are
#: measured as the webui runs them on CUDA, under autocast (emulated on CPU: :func:`cuda_autocast_on_cpu`).
FIT_DTYPES: dict[int, torch.dtype] = {4: torch.float32, 2: torch.bfloat16}


def _round_up(x: float, places: int = 4) -> float:
    return math.ceil(x * 10**places - 1e-9) / 10**places


def fit_line(points: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares ``value = per_token x tokens + fixed`` over (tokens, value) points."""
    n = len(points)
    if n < 2:
        raise ValueError("need two sizes to fit")
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    slope = sum((p[0] - mx) * (p[1] - my) for p in points) / sxx
    return slope, my - slope * mx


def fit_width(kind: str, measurements: Sequence[Measurement]) -> PassModel:
    """Coefficients at one width from measurements at several sizes (bytes / unit against latent tokens)."""
    grid = activations.UNET_GRID.get(kind, 1)

    def line(values: Sequence[tuple[Measurement, int]]) -> Linear:
        per_token, fixed = fit_line([(latent_tokens(m.width, m.height, grid), v / m.unit) for m, v in values])
        return Linear(per_token, fixed)

    peak = line([(m, m.peak_bytes) for m in measurements])
    sites = sorted({s for m in measurements for s in m.live_bytes})
    live = {s: line([(m, m.live_bytes[s]) for m in measurements]) for s in sites}
    return PassModel(peak, live)


def combine(models: Sequence[PassModel]) -> PassModel:
    """The coefficient stored: the largest over the widths, rounded up (never below any measurement's fit)."""

    def upper(lines: Sequence[Linear]) -> Linear:
        return Linear(_round_up(max(x.per_token for x in lines)), _round_up(max(max(x.fixed for x in lines), 0.0)))

    sites = sorted({s for m in models for s in m.live})
    return PassModel(upper([m.peak for m in models]), {s: upper([m.live[s] for m in models]) for s in sites})


def _batch(kind: str) -> int:
    return UNET_BATCH if kind in UNET_KINDS else VAE_BATCH


def fit_kind(
    kind: str, widths: Sequence[int], dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> tuple[PassModel, dict[int, PassModel]]:
    """The stored model of one pass at one dtype, and the per-width fits it combines."""
    per_width: dict[int, PassModel] = {}
    for channels in widths:
        module = build(kind, channels, dtype=dtype, device=device)
        ms = [measure_pass(module, kind, channels, w, h, _batch(kind), dtype=dtype) for w, h in FIT_SIZES]
        per_width[channels] = fit_width(kind, ms)
        del module
    return combine(list(per_width.values())), per_width


# --- validating --------------------------------------------------------------------------------------------

#: einsum with an ample budget and ONE slice allowed: the unsliced score matrices (the planner would otherwise cut
#: einsum into cache-sized slices on CPU, budget or not)
EINSUM = Settings(budget_gb=64.0, kernel="einsum", slice_cap=1)
REGIMES: tuple[str, ...] = ("ample", "einsum", "sliced")


def sliced_settings(unsliced_transient: int) -> Settings:
    """A budget that forces slicing: 3/4 of the largest unsliced einsum transient, at most two slices. The largest
    call then runs in exactly two slices, its transient about half the unsliced one: as large as slicing leaves it,
    so what is live at that call plus the transient still competes with the pass's own peak."""
    return Settings(budget_gb=max(unsliced_transient * 3 // 4, 64 * 1024) / GiB, kernel="einsum", slice_cap=2)


def measure_regimes(
    module: nn.Module,
    kind: str,
    channels: int,
    width: int,
    height: int,
    batch: int,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Measurement]:
    """The pass under three attention regimes: ``ample`` (memslice-auto, ample budget: the fused kernel on CPU),
    ``einsum`` (einsum kernel, one slice: the unsliced score matrices) and ``sliced`` (einsum under
    :func:`sliced_settings`)."""
    out = {"ample": measure_pass(module, kind, channels, width, height, batch, dtype=dtype)}
    out["einsum"] = measure_pass(module, kind, channels, width, height, batch, settings=EINSUM, dtype=dtype)
    settings = sliced_settings(max(out["einsum"].attention_peaks.values(), default=0))
    out["sliced"] = measure_pass(module, kind, channels, width, height, batch, settings=settings, dtype=dtype)
    return out


def _mib(n: float) -> str:
    return f"{n / MiB:9.2f}"


def validate(
    kinds: Sequence[str],
    models: dict[str, dict[int, PassModel]] | None,
    log: Callable[[str], None],
    *,
    widths: dict[str, int] | None = None,
    sizes: Sequence[tuple[int, int]] = VALIDATION_SIZES,
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16),
    device: str = "cpu",
) -> list[tuple[str, float]]:
    """Measured vs predicted at sizes not used for fitting; returns (label, predicted / measured)."""
    log(
        f"{'pass':<11} {'dtype':<8} {'C':>4} {'size':>9} {'regime':<7} {'slices':>6} {'measured MiB':>12} "
        f"{'predicted MiB':>13} {'ratio':>6}  {'sum rule':>8}  winning term"
    )
    ratios = []
    for kind in kinds:
        channels = (widths or VALIDATION_WIDTHS)[kind]
        for dtype in dtypes:
            e = torch.finfo(dtype).bits // 8
            model = None if models is None else models[kind][e]
            module = build(kind, channels, dtype=dtype, device=device)
            for w, h in sizes:
                for regime, m in measure_regimes(module, kind, channels, w, h, _batch(kind), dtype).items():
                    predicted, winner = predicted_pass_peak(kind, m, model)
                    activation, _ = predicted_activation_bytes(kind, m, model)
                    summed = activation + max(m.attention_peaks.values(), default=0)
                    ratio = predicted / m.peak_bytes
                    ratios.append((f"{kind} {dtype} C{channels} {w}x{h} {regime}", ratio))
                    log(
                        f"{kind:<11} {str(dtype)[6:]:<8} {channels:>4} {f'{w}x{h}':>9} {regime:<7} "
                        f"{m.max_slices:>6} {_mib(m.peak_bytes):>12} {_mib(predicted):>13} {ratio:6.3f}  "
                        f"{summed / m.peak_bytes:8.3f}  {winner}"
                    )
            del module
    return ratios


def scaling_checks(log: Callable[[str], None], device: str = "cpu") -> None:
    """Batch and head count must not move bytes per unit; element size moves them only where GroupNorm32's
    float32 copy sets the peak."""
    w, h = FIT_SIZES[1]
    for kind, channels, batches in (("sd15", 32, (1, 2, 3)), ("sdxl", 32, (1, 2)), ("vae_decode", 32, (1, 2))):
        module = build(kind, channels, device=device)
        for b in batches:
            m = measure_pass(module, kind, channels, w, h, b)
            log(f"  batch   {kind:<10} C{channels} {w}x{h} batch {b}: {m.peak_bytes / m.unit:10.1f} bytes/unit")
        del module
    for kind in KINDS:
        unet = kind in UNET_KINDS
        for dtype in (torch.float32, torch.bfloat16):
            module = build(kind, 32, dtype=dtype, device=device)
            for autocast in (True, False) if unet and dtype != torch.float32 else (False,):
                m = measure_pass(module, kind, 32, w, h, _batch(kind), dtype=dtype, autocast=autocast)
                label = str(dtype)[6:] + (" autocast" if autocast else "")
                log(f"  dtype   {kind:<10} C32 {w}x{h} {label:<17}: {m.peak_bytes / m.unit:10.1f} bytes/unit")
            del module
    _, _, openaimodel, _, _ = import_ldm()
    for nhc in (16, 8):
        torch.manual_seed(0)
        with _plain_ldm_classes():
            module = openaimodel.UNetModel(**{**SD2_UNET, "model_channels": 64, "num_head_channels": nhc}).eval()
        m = measure_pass(module, "sd2", 64, w, h, UNET_BATCH)
        log(f"  heads   sd2        C64 {w}x{h} head channels {nhc:>2}: {m.peak_bytes / m.unit:10.1f} bytes/unit")
        del module


def full_width_check(
    log: Callable[[str], None], models: dict[str, dict[int, PassModel]], device: str = "cpu"
) -> list[tuple[str, float]]:
    """SD1.5 and SD2 at the published width (320, fp32): the reduced-width coefficients must predict them."""
    ratios = []
    for kind in ("sd15", "sd2"):
        if kind not in models:
            continue
        started = time.perf_counter()
        module = build(kind, 320, device=device)
        w, h = 256, 256
        m = measure_pass(module, kind, 320, w, h, UNET_BATCH)
        predicted, _ = predicted_pass_peak(kind, m, models[kind][4])
        ratios.append((f"{kind} C320 {w}x{h}", predicted / m.peak_bytes))
        log(
            f"  full width {kind} C320 {w}x{h} fp32: measured {_mib(m.peak_bytes)} MiB, predicted "
            f"{_mib(predicted)} MiB, ratio {predicted / m.peak_bytes:.4f} ({m.peak_bytes / m.unit:.1f} bytes/unit)"
            f" [{time.perf_counter() - started:.0f} s]"
        )
        del module
    return ratios


CUDA_CASES: tuple[tuple[str, tuple[tuple[int, int], ...]], ...] = (
    ("sd15", ((512, 512), (768, 768))),
    ("sd2", ((768, 768),)),
    ("sdxl", ((1024, 1024), (832, 1216))),
    ("vae_decode", ((1024, 1024), (512, 512))),
    ("vae_encode", ((1024, 1024), (512, 512))),
)


def cuda_check(
    log: Callable[[str], None],
    device: str = "cuda",
    cases: Sequence[tuple[str, Sequence[tuple[int, int]]]] = CUDA_CASES,
    widths: dict[str, int] | None = None,
) -> list[tuple[str, float]]:
    """The published widths at real sizes on CUDA, as the webui runs them: UNet fp16 weights under
    ``torch.autocast`` (also without, and fp32), VAE fp16 and fp32 without autocast; the first size of each pass in
    the webui's dtype also under the einsum and sliced regimes. Prints the live-tensor peak (the tracker: what the
    model predicts) and the caching allocator's peak (which also holds cuDNN/cuBLAS workspaces). ``widths`` (default
    the published ones) and ``cases`` exist for a smoke test on CPU."""
    widths = widths or FULL_WIDTH
    log(
        f"{'pass':<11} {'dtype':<16} {'size':>9} {'regime':<7} {'slices':>6} {'live MiB':>10} {'allocator MiB':>13} "
        f"{'predicted MiB':>13} {'ratio':>6} {'alloc/pred':>10}  winning term"
    )
    ratios = []
    for kind, sizes in cases:
        unet = kind in UNET_KINDS
        variants = ((torch.float16, True), (torch.float16, False), (torch.float32, False)) if unet else None
        for dtype, autocast in variants or ((torch.float16, False), (torch.float32, False)):
            module = build(kind, widths[kind], dtype=dtype, device=device)
            for i, (w, h) in enumerate(sizes):
                if torch.device(device).type == "cuda":
                    torch.cuda.empty_cache()
                args = (module, kind, widths[kind], w, h, _batch(kind))
                runs = {"ample": measure_pass(*args, dtype=dtype, autocast=autocast)}
                if i == 0 and dtype == torch.float16 and (autocast or not unet):  # as the webui runs it
                    runs["einsum"] = measure_pass(*args, settings=EINSUM, dtype=dtype, autocast=autocast)
                    largest = max(runs["einsum"].attention_peaks.values(), default=0)
                    runs["sliced"] = measure_pass(
                        *args, settings=sliced_settings(largest), dtype=dtype, autocast=autocast
                    )
                label = f"{str(dtype)[6:]}{' autocast' if autocast else ''}"
                for regime, m in runs.items():
                    predicted, winner = predicted_pass_peak(kind, m)
                    ratios.append((f"cuda {kind} {label} {w}x{h} {regime}", predicted / m.peak_bytes))
                    alloc = m.allocator_peak_bytes or 0
                    log(
                        f"{kind:<11} {label:<16} {f'{w}x{h}':>9} {regime:<7} {m.max_slices:>6} "
                        f"{_mib(m.peak_bytes):>10} {_mib(alloc):>13} {_mib(predicted):>13} "
                        f"{predicted / m.peak_bytes:6.3f} {alloc / predicted:10.3f}  {winner}"
                    )
                m = runs["ample"]
                tokens = latent_tokens(w, h, activations.UNET_GRID.get(kind, 1))
                per_unit = {s: round(v / m.unit / tokens, 3) for s, v in m.live_bytes.items()}
                log(f"    per channel x token: peak {m.peak_bytes / m.unit / tokens:.3f}, live {per_unit}")
            del module
    return ratios


def model_literal(models: dict[str, dict[int, PassModel]]) -> str:
    """``MODELS = {...}`` as Python source for activations.py."""

    def lit(line: Linear) -> str:
        return f"Linear({line.per_token!r}, {line.fixed!r})"

    lines = ["MODELS: dict[str, dict[int, PassModel]] = {"]
    for kind, by_size in models.items():
        lines.append(f'    "{kind}": {{')
        for e, model in sorted(by_size.items(), reverse=True):
            lines.append(f"        {e}: PassModel(")
            lines.append(f"            {lit(model.peak)},")
            lines.append("            {")
            lines += [f'                "{s}": {lit(c)},' for s, c in model.live.items()]
            lines.append("            },")
            lines.append("        ),")
        lines.append("    },")
    lines.append("}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m memslice_tools.fit_activations", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {', '.join(KINDS)}")
    parser.add_argument("--quick", action="store_true", help="two widths per pass, fp32 validation only, no checks")
    parser.add_argument("--full-width", action="store_true", help="also SD1.5 and SD2 at model_channels 320")
    parser.add_argument("--no-scaling", action="store_true", help="skip the batch / dtype / heads checks")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cuda: check activations.py's model at published widths")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device != "cpu":
        print(f"# fit_activations --device {args.device}: torch {torch.__version__}", flush=True)
        ratios = cuda_check(lambda text: print(text, flush=True), args.device)
        low, high = min(r for _, r in ratios), max(r for _, r in ratios)
        print(f"predicted / measured (live tensors): {low:.3f} .. {high:.3f} over {len(ratios)} cases", flush=True)
        return 0 if low >= 1.0 and high <= 1.15 else 1
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    for k in kinds:
        if k not in KINDS:
            parser.error(f"unknown pass {k!r}")

    def log(text: str) -> None:
        print(text, flush=True)

    began = time.perf_counter()
    today = datetime.date.today().isoformat()
    log(f"# fit_activations {today}: torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    log("# bytes per unit = bytes / (element_size x batch x channels); N = latent tokens (at the UNet's grid)")
    models: dict[str, dict[int, PassModel]] = {}
    for kind in kinds:
        widths = FIT_WIDTHS[kind][:2] if args.quick else FIT_WIDTHS[kind]
        models[kind] = {}
        for e, dtype in FIT_DTYPES.items():
            model, per_width = fit_kind(kind, widths, dtype)
            models[kind][e] = model
            log(f"\n## {kind} {str(dtype)[6:]}: per width, elements per channel: peak = a x N + b; live a per site")
            for channels, m in per_width.items():
                sites = "  ".join(f"{s.split('.', 1)[1]} {c.per_token:.4f}" for s, c in m.live.items())
                log(f"  C{channels:<4} peak {m.peak.per_token:8.4f} x N + {m.peak.fixed:8.3f}   live: {sites}")
            values = [m.peak.per_token for m in per_width.values()]
            log(f"  peak a: max/min across widths {max(values) / min(values):.5f} (1 = proportional to channels)")
    if not (args.quick or args.no_scaling):
        log("\n## scaling checks")
        scaling_checks(log)
    ratios: list[tuple[str, float]] = []
    if args.full_width:
        log("\n## the published width")
        ratios += full_width_check(log, models)
    log(f"\n## coefficients (paste into lib_memslice/activations.py), {today}")
    log(model_literal(models))
    log("\n## validation at sizes not used for fitting (predicted = pass_peak_bytes of the fitted model)")
    dtypes = (torch.float32,) if args.quick else tuple(FIT_DTYPES.values())
    ratios += validate(kinds, models, log, dtypes=dtypes)
    low = min(r for _, r in ratios)
    high = max(r for _, r in ratios)
    log(f"\npredicted / measured: {low:.3f} .. {high:.3f} over {len(ratios)} cases")
    log(f"done in {time.perf_counter() - began:.0f} s")
    return 0 if low >= 1.0 and high <= 1.15 else 1


if __name__ == "__main__":
    sys.exit(main())
