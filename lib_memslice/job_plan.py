"""Will this whole job fit? Every pass of a generation, in the order the webui runs them, before Generate.

A txt2img job is a UNet pass at the first size (the webui batches cond + uncond: twice the image batch), a VAE
decode, and with hires fix a UNet pass at the hires size and a VAE decode there; an image upscaler adds a VAE
decode at the first size and a VAE encode at the hires size in between; img2img starts with a VAE encode. A pass
needs the resident weights, its inputs, and its peak besides them: the other activations (the measured model of
:mod:`lib_memslice.activations`) combined with every attention call's transient, planned for the memory that call
would find free (what the pass holds live at that moment, measured too) exactly as memslice plans it at run time.

``memory`` is what the whole job may use, weights included: in the webui the free memory plus the loaded model's
weights; in the CLI the device's memory (``--memory``) or what is free on this machine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from . import activations, band_costs
from .band_costs import BandPlan, VaeNet
from .costs import AttentionShape, GiB, KernelChoice, format_bytes, peak_bytes, plural
from .limits import MAX_RESOLUTION, max_square_resolution, not_enough_memory
from .models import WEIGHTS, ModelSpec, Site, Weights
from .settings import Settings
from .slicing import Room, budget_room, plan_in, room_for

#: the kernels a site's attention call may use, fastest first: (site, compute element size) -> choices
KernelsFor = Callable[[Site, int], tuple[KernelChoice, ...]]

DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
UPSCALERS = ("latent", "image")


@dataclass(frozen=True)
class AllocatorOverhead:
    """What a device's allocator held beyond a pass's live tensors, as a share of the pass's activations: the
    smallest and the largest share measured. A pass *fits* with the largest, is *tight* when it fits only with the
    smallest, and *does not fit* otherwise."""

    low: float
    high: float
    source: str


#: Measured per device kind. CUDA: ``torch.cuda.max_memory_allocated`` against the live-tensor tracker on an H200
#: (torch 2.11, ``python -m memslice_tools.fit_activations --device cuda`` and ``make gpu-check``, 2026-11-30): SDXL
#: UNet 0.2 %, VAE decode 6-8 %, SD1.5 fp16 UNet at 512 px 25 %. CPU: the profiler's replay of every allocation and
#: the resident-set peak against the tracker (``python -m memslice_tools.overhead``, 2026-12-03, torch 2.13): 0-3.7 %.
#: Devices never measured take the widest range measured (CUDA's).
ALLOCATOR_OVERHEAD: dict[str, AllocatorOverhead] = {
    "cuda": AllocatorOverhead(0.0, 0.25, "CUDA caching allocator, measured on an H200: 0-25 % of activations"),
    "cpu": AllocatorOverhead(0.0, 0.04, "CPU allocator, measured with the tracker: 0-4 % of activations"),
}
VERDICTS = ("fits", "tight", "does not fit")


def allocator_overhead(device_kind: str) -> AllocatorOverhead:
    known = ALLOCATOR_OVERHEAD.get(device_kind)
    if known is not None:
        return known
    cuda = ALLOCATOR_OVERHEAD["cuda"]
    return AllocatorOverhead(cuda.low, cuda.high, f"not measured on {device_kind}: CUDA's range, 0-25 % of activations")


@dataclass(frozen=True)
class Job:
    """One generation as the webui runs it, and how memslice plans its attention."""

    spec: ModelSpec
    arch: str  # which activation model: sd15 | sd2 | sdxl | sd3
    width: int
    height: int
    batch: int
    memory_bytes: int  # what the whole job may use, weights included
    hires: tuple[int, int] | None = None  # the hires pass's size
    hires_cover: tuple[int, int] | None = None  # the size the picture is upscaled to, when not the hires size
    hires_upscaler: str = "latent"  # "image": decode, upscale the picture, encode again
    img2img: bool = False
    element_size: int = 2  # the UNet's (and the text encoder's) element size
    vae_element_size: int = 0  # 0: the UNet's (--no-half-vae: 4)
    upcast_attention: bool = False  # 'Upcast cross attention layer to float32': attention computes in float32
    weights: Weights | None = None  # bytes per part as read off a loaded model; None: the published configs
    medvram: bool = False  # only the running module's weights are resident
    prompt_chunks: int = 1
    strategy: str = "auto"
    slice_cap: int = 4096
    safety_factor: float = 3.3
    attention_budget: int | None = None  # 'Attention budget (GiB)': every attention call's room, fixed
    device_kind: str = "cuda"
    vae: str = "auto"  # the VAE setting: "off" leaves the webui's stock VAE attention, planned as it runs
    ceiling_bytes: int | None = None  # past memory_bytes, what the device still grants (Apple): plans there are tight
    t5: bool = False  # SD3's 'Enable T5': its T5-XXL encoder is loaded (counted where the weights are not read)

    @property
    def beyond(self) -> int:
        """Bytes the device grants past ``memory_bytes`` (0 but on Apple's unified memory)."""
        return max(0, self.ceiling_bytes - self.memory_bytes) if self.ceiling_bytes is not None else 0

    @property
    def unet_element(self) -> int:
        return self.element_size

    @property
    def vae_element(self) -> int:
        return self.vae_element_size or self.element_size


@dataclass(frozen=True)
class Pass:
    name: str
    kind: str  # "unet" | "vae_decode" | "vae_encode"
    width: int
    height: int
    batch: int


def hires_sizes(
    width: int, height: int, scale: float | None, hr_width: int | None, hr_height: int | None
) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """``(the hires pass's size, the size the picture is upscaled to)`` as webui 1.10.1 computes them
    (``calculate_target_resolution``, then the crop in ``sample_hr_pass``): a target size wins over the scale; one
    side given keeps the first pass's aspect ratio; both given, the picture is upscaled to cover the target (the
    image upscaler's encode runs there) and its latent cropped to it (the pass runs at the target, to 8 px)."""
    if hr_width and hr_height:
        if width / height < hr_width / hr_height:
            cover = (hr_width, hr_width * height // width)
        else:
            cover = (hr_height * width // height, hr_height)
        crop = (8 * (cover[0] // 8 - (cover[0] - hr_width) // 8), 8 * (cover[1] // 8 - (cover[1] - hr_height) // 8))
        return crop, cover
    if hr_width:
        size = (hr_width, hr_width * height // width)
    elif hr_height:
        size = (hr_height * width // height, hr_height)
    elif scale and scale != 1:
        size = (int(width * scale), int(height * scale))
    else:
        return None
    return size, size


def hires_size(
    width: int, height: int, scale: float | None, hr_width: int | None, hr_height: int | None
) -> tuple[int, int] | None:
    """The hires pass's size (see :func:`hires_sizes`)."""
    sizes = hires_sizes(width, height, scale, hr_width, hr_height)
    return sizes[0] if sizes else None


def passes(job: Job) -> list[Pass]:
    """The passes in the order the webui 1.10.1 runs them (decode and encode go one image at a time). The denoising
    passes are of kind ``unet`` and named after the model's denoiser (SD3: ``MMDiT``)."""
    w, h = job.width, job.height
    denoiser = job.spec.denoiser
    found = []
    if job.img2img:
        found.append(Pass("VAE encode", "vae_encode", w, h, 1))
    found.append(Pass(denoiser, "unet", w, h, 2 * job.batch))
    if job.hires:
        hw, hh = job.hires
        if job.hires_upscaler == "image":
            cw, ch = job.hires_cover or job.hires
            found.append(Pass("VAE decode", "vae_decode", w, h, 1))
            found.append(Pass("VAE encode (hires)", "vae_encode", cw, ch, 1))
        found.append(Pass(f"{denoiser} (hires)", "unet", hw, hh, 2 * job.batch))
        found.append(Pass("VAE decode (hires)", "vae_decode", hw, hh, 1))
    else:
        found.append(Pass("VAE decode", "vae_decode", w, h, 1))
    return found


def part_bytes(job: Job) -> Weights:
    """Bytes of the UNet (SD3: the MMDiT), the VAE and the text encoders: as loaded, or from the published
    parameter counts (SD3's T5-XXL encoder with the text encoders when the job says it is loaded)."""
    if job.weights is not None:
        return job.weights
    counts = WEIGHTS[job.arch]
    text = counts.text + (counts.t5 if job.t5 else 0)
    return Weights(counts.unet * job.unet_element, counts.vae * job.vae_element, text * job.unet_element)


def weight_bytes(job: Job, kind: str) -> int:
    """Resident weights during a pass: all of the model's (the webui keeps them on the device), or with
    ``medvram`` only the running module's."""
    parts = part_bytes(job)
    if job.medvram:
        return parts.unet if kind == "unet" else parts.vae
    return parts.unet + parts.vae + parts.text


def _input_bytes(job: Job, p: Pass) -> int:
    tokens = activations.latent_tokens(p.width, p.height)
    latent = job.spec.latent_channels
    if p.kind == "unet":
        context = max(1, job.prompt_chunks) * job.spec.prompt_tokens * job.spec.context_dim
        return p.batch * (latent * tokens + context) * job.unet_element
    if p.kind == "vae_decode":
        return latent * tokens * job.vae_element
    return 3 * p.width * p.height * job.vae_element  # the image to encode


def _activations(job: Job, p: Pass) -> tuple[int, dict[str, int]]:
    if p.kind == "unet" and job.arch in activations.MMDITS:
        args = (p.width, p.height, p.batch, job.unet_element)
        text = max(1, job.prompt_chunks) * job.spec.prompt_tokens
        return (activations.mmdit_activation_bytes(*args, text_tokens=text),
                activations.mmdit_live_bytes(*args, text_tokens=text))  # fmt: skip
    if p.kind == "unet":
        args = (job.arch, p.width, p.height, p.batch, job.unet_element)
        return activations.unet_activation_bytes(*args), activations.unet_live_bytes(*args)
    if job.arch in activations.MMDITS:  # SD3's own VAE classes
        return activations.sd3_vae_bytes(p.kind, p.width, p.height, p.batch, job.vae_element)
    args = (p.width, p.height, p.batch, job.vae_element)
    ch = vae_channels(job)
    if p.kind == "vae_decode":
        return (activations.vae_decode_activation_bytes(*args, channels=ch),
                activations.vae_decode_live_bytes(*args, channels=ch))  # fmt: skip
    return (activations.vae_encode_activation_bytes(*args, channels=ch),
            activations.vae_encode_live_bytes(*args, channels=ch))  # fmt: skip


def _room(job: Job, free_at_call: int, shape: AttentionShape) -> Room:
    """The room the call would get: what is free when it runs (its own q, k, v exist by then) over the safety
    factor, or the attention budget."""
    if job.attention_budget is not None:
        return budget_room(job.attention_budget)
    ceiling = max(0, free_at_call) + job.beyond if job.ceiling_bytes is not None else None
    return room_for(job.strategy, max(0, free_at_call), job.safety_factor, shape.input_bytes, ceiling)


def stock_vae_kernel(job: Job, chain: tuple[KernelChoice, ...]) -> KernelChoice:
    """The VAE attention the webui runs with the VAE setting ``off``: ldm's ``AttnBlock`` (SD1.x, SD2.x: bmm and
    softmax, the scores twice), sgm's (SDXL) and SD3's own (one SDPA call, fused where torch runs it, else its math
    path)."""
    if job.arch not in ("sdxl", "sd3"):
        return KernelChoice("stock")
    return replace(chain[0], workers=1) if chain[0].kind == "fused" else KernelChoice("sdpa-math")


def plan_site(
    job: Job, p: Pass, site: Site, kernels_for: KernelsFor, free_at_call: int, site_limit: bool = True
) -> dict[str, Any]:
    """One attention site of a pass: its shape, the plan memslice would make (or why none fits), the largest
    square size its own call reaches with that memory. With the VAE setting ``off`` the VAE's attention is the
    webui's own, in one piece, in whatever is free."""
    stock = site.vae and job.vae == "off"
    io = job.vae_element if site.vae else job.unet_element
    element = 4 if job.upcast_attention and not stock else io  # the webui's own VAE attention never upcasts
    shape = site.shape(p.width, p.height, batch=p.batch // 2 if p.kind == "unet" else 1, element_size=element,
                       io_element_size=io, prompt_chunks=job.prompt_chunks)  # fmt: skip
    choices = kernels_for(site, element)
    if stock:
        choices = (stock_vae_kernel(job, choices),)
        room = Room(max(0, free_at_call) + job.beyond + shape.input_bytes)  # no slicing, no budget: it simply runs
        options = dict(strategy="auto", slice_cap=1, device_kind=job.device_kind)
    else:
        room = _room(job, free_at_call, shape)
        options = dict(strategy=job.strategy, slice_cap=job.slice_cap, device_kind=job.device_kind)
    plan, over_margin = plan_in(shape, room, choices, **options)  # type: ignore[arg-type]
    row: dict[str, Any] = {
        "pass": p.name,
        "site": site.name,
        "layers": site.count,
        "batch_heads": shape.batch_heads,
        "q_tokens": shape.q_tokens,
        "k_tokens": shape.k_tokens,
        "head_dim": shape.head_dim,
        "element_size": element,
        "room_bytes": room.bytes_for(shape),
    }
    if plan is not None:
        row.update(kernel_used=plan.kernel.kind, heads_per_slice=plan.heads_per_slice,
                   queries_per_slice=plan.queries_per_slice, slices=plan.slices, peak_bytes=plan.peak_bytes,
                   reason=plan.reason, fits=True, over_margin=over_margin)  # fmt: skip
    elif stock:
        need = peak_bytes(shape, shape.batch_heads, shape.q_tokens, choices[0])
        reason = (f"the VAE setting is off: the webui's own VAE attention runs in one piece and needs "
                  f"{format_bytes(need)}, {format_bytes(room.bytes_for(shape))} is free; set 'VAE' to auto to slice "
                  "it")  # fmt: skip
        row.update(kernel_used=choices[0].kind, heads_per_slice=0, queries_per_slice=0, slices=0, peak_bytes=need,
                   reason=reason, fits=False, over_margin=False)  # fmt: skip
    else:
        error = not_enough_memory(shape, room, choices, geometry=site.geometry_at(job.prompt_chunks), site=site.name,
                                  **options)  # type: ignore[arg-type]  # fmt: skip
        row.update(kernel_used=error.kernel or choices[0].kind, heads_per_slice=0, queries_per_slice=0, slices=0,
                   peak_bytes=error.need, reason=str(error), fits=False, over_margin=False)  # fmt: skip
    row["tight"] = bool(row["fits"] and row["peak_bytes"] > max(0, free_at_call))  # only past free memory (Apple)
    if site_limit:
        row["max_square_resolution"] = max_square_resolution(shape, site.geometry_at(job.prompt_chunks), room.limit(),
                                                             choices, **options)  # fmt: skip
    return row


#: the SD VAE's Decoder and Encoder as the bands see them (SD1.x, SD2.x and SDXL share the geometry)
VAE_NETS = {"vae_decode": band_costs.decoder_net(), "vae_encode": band_costs.encoder_net()}


def vae_net(job: Job, kind: str) -> VaeNet | None:
    """The banded part the runtime's forward finds for a VAE pass of this kind: the loaded VAE's as read off its
    modules (``ModelSpec.vae_nets``; None where memslice cannot band the module and its own forward runs), else the
    published SD VAE's. The loaded model's VAE need not be the published one (a fine-tune's is; a small test model's
    is not), and the band counts depend on its widths."""
    loaded = dict(job.spec.vae_nets)
    return loaded[kind] if kind in loaded else VAE_NETS[kind]


def vae_channels(job: Job) -> int:
    """The VAE's ``ch``, which its activation model scales with: the loaded VAE's, else the published width."""
    return job.spec.vae_channels or activations.VAE_CHANNELS


@dataclass(frozen=True)
class PassBands:
    """How a VAE pass runs with the VAE setting ``auto``: ``plan`` (None: no plan under the band cap fits, not even
    streamed) and ``extra``, what the pass holds beside the banded part's peak (the decoder's input, the
    post_quant_conv output; the encoder's image is an input)."""

    plan: BandPlan | None
    extra: int
    need: int  # the smallest device peak of any plan (what the part needs at least)
    top: int  # the most bands this pass may have


def banded(job: Job, p: Pass) -> bool:
    """Whether the pass may run in bands: a VAE pass with the VAE setting ``auto`` whose module memslice can band
    (an encode only of an image whose sides are whole latent pixels, as the runtime's forward requires)."""
    if p.kind == "unet" or job.vae != "auto" or not job.spec.vae_bands:
        return False
    net = vae_net(job, p.kind)
    if net is None:
        return False
    return p.kind == "vae_decode" or (p.width % net.scale == 0 and p.height % net.scale == 0)


def plan_bands(job: Job, p: Pass, free: int) -> PassBands:
    """The band plan the runtime makes for this pass (:func:`lib_memslice.bands.run_pass`) with ``free`` bytes free
    beside the weights and the pass's inputs: the stock forward when it fits, else the fewest bands, else streamed.
    The room is free memory over the allocator's largest measured share (the attention budget when set), less what
    the pass holds beside its banded part, so that a pass planned to fit is one the verdict calls ``fits``; past
    that margin, free memory itself (then ``tight``). The runtime reads the free memory at the module's forward, where
    the decoder's input already exists: its room is at most a fifth of that latent larger than this one."""
    net = vae_net(job, p.kind)
    assert net is not None, "planned in bands only where the module can be banded (see banded())"
    lat_h, lat_w = -(-p.height // 8), -(-p.width // 8)
    extra = job.spec.latent_channels * lat_h * lat_w * job.vae_element * p.batch if p.kind == "vae_decode" else 0
    over: int | None
    if job.attention_budget is not None:
        room, over = job.attention_budget, None
    else:
        margin = 1.0 + allocator_overhead(job.device_kind).high
        room, over = int(max(0, free) / margin) - extra, max(0, free) - extra
    plan = band_costs.plan_bands(net, lat_h, lat_w, p.batch, job.vae_element, room, over_margin=over)
    need = band_costs.smallest_band_need(net, lat_h, lat_w, p.batch, job.vae_element)
    return PassBands(plan, extra, need, band_costs.max_bands(lat_h))


def band_words(bands: int, streamed: bool) -> str:
    """``in 8 bands`` / ``in 64 bands, streamed through host memory`` / ``streamed through host memory`` (one band
    streamed: never "in 1 band") for the CLI, the advice and the panel."""
    if bands <= 1:
        return "streamed through host memory" if streamed else "whole"
    return f"in {plural(bands, 'band')}" + (", streamed through host memory" if streamed else "")


def plan_pass(job: Job, p: Pass, kernels_for: KernelsFor, site_limits: bool = True) -> dict[str, Any]:
    """One pass: weights + inputs + its peak (activations combined with each attention transient), plus what the
    allocator was measured to add; its verdict against the job's memory. A VAE pass with the VAE setting ``auto``
    is planned in bands as the runtime runs it: ``bands`` is 0 when the module's own forward runs (untiled, and
    every UNet pass), else the band count (``streamed``: its lists parked in host memory, ``host_bytes`` of them)."""
    weights = weight_bytes(job, p.kind)
    inputs = _input_bytes(job, p)
    peak, live = _activations(job, p)
    side = job.spec.max_side
    too_large = (f"the {p.name.split(' ')[0]} takes at most {side} px a side"
                 if p.kind == "unet" and side and max(p.width, p.height) > side else "")  # fmt: skip
    base = job.memory_bytes - weights - inputs
    found = plan_bands(job, p, base) if banded(job, p) else None
    band_plan = found.plan if found is not None else None
    if found is not None and (band_plan is None or band_plan.banded):
        args = (p.kind, p.width, p.height, p.batch, job.vae_element)
        mid, live = activations.banded_mid_bytes(*args, channels=vae_channels(job))
        part = band_plan.peak_bytes if band_plan is not None else found.need
        peak = max(mid, found.extra + part)
    sites = [s for s in job.spec.sites if s.vae == (p.kind != "unet")]
    rows = [plan_site(job, p, site, kernels_for, base - live.get(site.name, peak), site_limits) for site in sites]
    attention = {row["site"]: row["peak_bytes"] for row in rows}
    tensors = weights + inputs + activations.pass_peak_bytes(peak, attention, live)
    overhead = allocator_overhead(job.device_kind)
    least, most = int(peak * overhead.low), int(peak * overhead.high)
    total = tensors + most
    over = any(row["tight"] for row in rows)
    refused = found is not None and band_plan is None
    if too_large or refused or not all(row["fits"] for row in rows) or tensors + least > job.memory_bytes + job.beyond:
        verdict = "does not fit"
    else:
        verdict = "fits" if total <= job.memory_bytes and not over else "tight"
    return {
        "name": p.name,
        "kind": p.kind,
        "width": p.width,
        "height": p.height,
        "batch": p.batch,
        "attention_bytes": max(attention.values(), default=0),
        "attention_at_peak_bytes": max(  # the attention transient live at the pass's peak (0: it peaks elsewhere)
            (a for s, a in attention.items() if live.get(s, peak) + a == tensors - weights - inputs), default=0
        ),
        "activation_bytes": peak,
        "input_bytes": inputs,
        "weight_bytes": weights,
        "tensor_bytes": tensors,
        "allocator_bytes": most,
        "total_bytes": total,
        "headroom_bytes": job.memory_bytes - total,
        "verdict": verdict,
        "fits": verdict == "fits",
        "bands": band_plan.bands if band_plan is not None and band_plan.banded else 0,
        "streamed": bool(band_plan is not None and band_plan.streamed),
        "host_bytes": band_plan.host_bytes if band_plan is not None else 0,
        "bands_reason": _bands_reason(found),
        "too_large": too_large,
        "layers": rows,
    }


def _bands_reason(found: PassBands | None) -> str:
    """Why the pass runs as planned: the band planner's reason, or why nothing fits; empty for a pass memslice does
    not band (the UNet, the VAE setting ``attention`` or ``off``)."""
    if found is None:
        return ""
    if found.plan is None:
        return (f"no plan fits: even {band_words(found.top, True)} the VAE needs {format_bytes(found.need)} on the "
                "device")  # fmt: skip
    return found.plan.reason


def _binding(planned: list[dict[str, Any]]) -> dict[str, Any]:
    """The first pass that does not fit, else the first tight one, else the largest."""
    for verdict in ("does not fit", "tight"):
        found = [p for p in planned if p["verdict"] == verdict]
        if found:
            return found[0]
    return max(planned, key=lambda p: p["total_bytes"])


def advice(job: Job, limit: dict[str, Any]) -> str:
    """What to do about the pass that binds, in a user's words (one sentence, naming the pass once)."""
    size = f"{limit['width']}x{limit['height']}"
    if limit.get("bands"):
        size += f" {band_words(limit['bands'], limit['streamed'])}"
    memory = format_bytes(job.memory_bytes)
    need = f"{format_bytes(limit['total_bytes'])} of {memory}"
    refused = [row for row in limit["layers"] if not row["fits"]]
    overhead = allocator_overhead(job.device_kind)
    if limit["verdict"] == "fits":
        return (f"the largest pass is the {limit['name']} at {size}: {need}, {format_bytes(limit['headroom_bytes'])} "
                f"to spare")  # fmt: skip
    if limit["verdict"] == "tight":
        return (f"tight: the {limit['name']} at {size} needs {need} with the most the allocator was measured to add "
                f"({overhead.source}), {format_bytes(limit['tensor_bytes'])} of tensors without it: it may run out "
                "of memory; a smaller size or batch leaves a margin")  # fmt: skip
    if limit["too_large"]:
        return f"the {limit['name']} at {size}: {limit['too_large']}; lower the size"
    if limit["weight_bytes"] + limit["input_bytes"] >= job.memory_bytes:
        return (f"the weights alone ({format_bytes(limit['weight_bytes'])}) take the {memory}"
                + (": --medvram keeps only the running module on the device" if not job.medvram else ""))  # fmt: skip
    if refused:
        return f"the {limit['name']} at {size}: {refused[0]['reason']}"
    if limit["kind"] != "unet" and job.vae == "auto":
        if limit["bands_reason"].startswith("no plan fits"):
            how = limit["bands_reason"].removeprefix("no plan fits: ")
            return f"the {limit['name']} at {size} does not fit: {how}; lower the size or the batch"
        return f"the {limit['name']} at {size} needs {need}: lower the size"
    if limit["kind"] != "unet":
        return (f"the {limit['name']} at {size} needs {need}, mostly its convolutions at full resolution, not "
                "attention: set the VAE setting to auto to run it in exact bands, or lower the size")  # fmt: skip
    return (f"the {limit['name']} at {size} needs {need}: lower the size or the batch"
            + (", or use --medvram" if not job.medvram else ""))  # fmt: skip


def _at(job: Job, side: int) -> Job:

    def scaled(size: tuple[int, int] | None) -> tuple[int, int] | None:
        if size is None:
            return None
        return (max(8, round(size[0] * side / job.width / 8) * 8), max(8, round(size[1] * side / job.height / 8) * 8))

    return replace(job, width=side, height=side, hires=scaled(job.hires), hires_cover=scaled(job.hires_cover))


def job_fits(job: Job, kernels_for: KernelsFor, kind: str | None = None) -> bool:
    """Every pass fits (with ``kind``: every pass of that kind), the most the allocator was measured to add
    included."""
    return all(plan_pass(job, p, kernels_for, site_limits=False)["fits"] for p in passes(job)
               if kind is None or p.kind == kind)  # fmt: skip


def max_square(job: Job, kernels_for: KernelsFor, step: int = 64, kind: str | None = None) -> int:
    """The largest square first-pass size (hires scaled alike) at which every pass fits (not tight); 0 if none.
    ``kind`` (``unet``, ``vae_decode``, ``vae_encode``): the largest at which that kind of pass fits, the others
    ignored (a pass's own largest size). A model whose sizes the webui cuts (SD3: to 16 px) is searched in that
    step, up to the largest side it takes (a hires pass past it does not fit)."""
    step = job.spec.cut_to or step
    lo, hi = 0, (job.spec.max_side or MAX_RESOLUTION // 4) // step
    if not job_fits(_at(job, step), kernels_for, kind):
        return 0
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if job_fits(_at(job, mid * step), kernels_for, kind):
            lo = mid
        else:
            hi = mid - 1
    return lo * step


def plan_job(job: Job, kernels_for: KernelsFor) -> dict[str, Any]:
    """Every pass with its attention sites, whether the job fits, the pass that binds and the largest square size
    at which the whole job fits."""
    planned = [plan_pass(job, p, kernels_for) for p in passes(job)]
    limit = _binding(planned)
    verdict = next((v for v in reversed(VERDICTS) if any(p["verdict"] == v for p in planned)), "fits")
    overhead = allocator_overhead(job.device_kind)
    return {
        "model": job.spec.name,
        "width": job.width,
        "height": job.height,
        "batch": job.batch,
        "hires": list(job.hires) if job.hires else None,
        "hires_cover": list(job.hires_cover) if job.hires_cover else None,
        "hires_upscaler": job.hires_upscaler if job.hires else None,
        "img2img": job.img2img,
        "memory_bytes": job.memory_bytes,
        "strategy": job.strategy,
        "slice_cap": job.slice_cap,
        "verdict": verdict,
        "fits": verdict == "fits",
        "limit": limit["name"],
        "advice": advice(job, limit),
        "max_square_resolution": max_square(job, kernels_for),
        "max_slices": max((row["slices"] for p in planned for row in p["layers"]), default=0),
        "allocator_overhead": {"low": overhead.low, "high": overhead.high, "source": overhead.source},
        "passes": [{k: v for k, v in p.items() if k != "layers"} for p in planned],
        "layers": [row for p in planned for row in p["layers"]],
    }


def make_job(
    spec: ModelSpec,
    arch: str,
    width: int,
    height: int,
    batch: int,
    memory_bytes: int,
    settings: Settings,
    *,
    hr_scale: float | None = None,
    hr_width: int | None = None,
    hr_height: int | None = None,
    hr_upscaler: str = "latent",
    img2img: bool = False,
    strategy: str = "auto",
    **model: Any,
) -> Job:
    """The one builder of a Job from (model, sizes, hires, memory, settings), for the CLI, the Python API and the
    HTTP routes. ``model`` holds what the caller knows of how the model runs: ``element_size``,
    ``vae_element_size``, ``upcast_attention``, ``weights``, ``medvram``, ``prompt_chunks``, ``device_kind``."""
    if spec.cut_to:  # the webui's fix_dimensions, before the hires sizes are worked out from the first pass's
        width, height = width // spec.cut_to * spec.cut_to, height // spec.cut_to * spec.cut_to
    sizes = hires_sizes(width, height, hr_scale, hr_width, hr_height)
    return Job(
        spec,
        arch,
        width,
        height,
        batch,
        int(memory_bytes),
        hires=sizes[0] if sizes else None,
        hires_cover=sizes[1] if sizes and sizes[1] != sizes[0] else None,
        hires_upscaler=hr_upscaler,
        img2img=img2img,
        strategy=strategy,
        slice_cap=settings.slice_cap,
        safety_factor=settings.safety_factor,
        attention_budget=int(settings.budget_gb * GiB) if settings.budget_gb > 0 else None,
        vae=settings.vae,
        **model,
    )
