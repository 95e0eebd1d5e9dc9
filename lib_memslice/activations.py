"""Memory a whole generation pass needs besides attention: a measured model of the other activations.

A txt2img / img2img job runs these passes one after the other: the UNet at the first size (the webui batches
cond + uncond, so ``unet_batch = 2 x batch``), the VAE decode, optionally the VAE encode (img2img, or hires fix
with an image upscaler), the UNet at the hires size and the VAE decode at the hires size. Each pass's peak has
three parts: (a) the attention transient of each attention call (the planner predicts it: ``CallRecord.peak_bytes``),
(b) the pass's OTHER activations (this module), (c) the resident weights (not here).

What is counted: the live tensors a pass's forward creates, weights excluded, measured as the peak of
:class:`memslice_tools.memtrack.PeakTracker` around the forward under ``torch.no_grad()``, memslice's attention
forwards patched in. The pass's inputs (latents, timesteps, prompt context and SDXL's ``y`` for the UNet; the
latent for the decode; the image for the encode) exist before the pass and are NOT counted; everything the pass
allocates is (its output included). Allocations made and freed inside one op (fused-kernel scratch, cuDNN/cuBLAS
workspaces) are invisible to the tracker and not in these numbers: on an H200 the CUDA caching allocator's peak
was 0-8 % above the live tensors (VAE 6-8 %, SDXL 0.2 %), 25 % for SD1.5 fp16 at 512 px.

The model. Every activation of these networks is ``channels x tokens`` (model_channels of the UNet, ch of the VAE;
tokens of the latent, ``ceil(width/8) x ceil(height/8)``) times the batch times the element size, plus a small
per-channel constant (the prompt's key/value projections, the time embedding), so per pass and element size::

    bytes = element_size x batch x channels x (per_token x latent_tokens + fixed)

with two such lines per pass: ``peak``, the peak of its other activations, and ``live[site]``, what is live while
an attention site runs (its q, k and v computed; the largest over the layers sharing the site name, e.g.
``unet.level0.self`` in the encoder and the decoder). The numbers below were fitted on the real ldm modules by
``python -m memslice_tools.fit_activations`` at reduced widths, where it also prints the evidence for the
scaling law: per_token identical (to 1e-4) at widths 32, 64, 96 (VAE 32, 64, 128), bytes per unit identical at
batch 1, 2, 3 and with 4 or 8 heads; the published width (model_channels 320) measured 25605.0 bytes per unit for
SD1.5 and SD2 at 256 px, exactly the prediction. Where the peaks sit (fp32):

- SD1.x / SD2.x: the level-0 feed-forward (GEGLU) of the first decoder block, 25 x C x N; the level-0
  self-attention runs with 11 x C x N live;
- SDXL: the level-1 feed-forward of its first decoder block, 16.25 x C x N (no transformer at level 0);
- VAE decode: the first full-resolution up block (its input has 2 x ch channels, SiLU as ``x * sigmoid(x)``),
  512 x ch x N = 8 x ch x pixels; its only attention (mid block, latent grid) runs with 20 x ch x N live;
- VAE encode: ldm's Encoder keeps every block's output in a list until it returns, so 344 x ch x N is live at the
  mid-block attention and the peak, 356 x ch x N, is that attention's residual add.

How (a) and (b) combine, measured: :func:`pass_peak_bytes` = ``max(peak, max over sites of live[site] +
attention[site])``, which met every validation pass within 0-6 % (fit_activations' table). A transient adds to
what is live at its call, not to the pass's peak: adding the largest transient to the peak instead over-predicted
the same passes by up to 1.5x (SD2 fp32, its level-0 self-attention in two einsum slices), and more where a large
transient meets little live memory (the VAE decoder's mid-block attention runs with 4 % of its peak live).

Element size: 4 (fp32) and 2 (fp16/bf16) have their own coefficients. Half-precision UNets are modelled as the
webui runs them on CUDA: fp16 weights under ``torch.autocast``, where layer_norm and group_norm return float32, so
every transformer block's normalised input takes twice the bytes (SD1.x peak 26 instead of 25, its level-0
self-attention 12 instead of 11 x C x N). In SDXL the half-precision peak moves: ldm's GroupNorm32 normalises a
float32 copy (``x.float()``, a float32 output, the cast back), three times the input's bytes at once, in the
first level-0 decoder ResBlock (``output_blocks.6``, no transformer at level 0): 19 instead of 16.25 x C x N, with
or without autocast.
The fit emulates CUDA autocast on CPU; on an H200 under real autocast the tracker read the same numbers (SD1.5
512/768 px: 130.01/292.51 MiB, SDXL 1024x1024: 380.01 MiB). Without autocast (the webui's manual cast on MPS/XPU)
half-precision SD1.x needs 25: the model is 4 % high there. The VAE runs without autocast, and its plain GroupNorm
keeps the dtype: the same elements at both sizes.

Sizes: UNet activations are taken at the latent size rounded up to the UNet's grid (64 px for SD1.x/2.x with three
downsamples, 32 px for SDXL with two): exact on the grid, an upper bound between grid points (where the webui's
``cat`` resizes mismatched skips). The VAE works at any multiple of 8 px. Batch: the webui decodes and encodes one
image at a time (``decode_latent_batch``, ``images_tensor_to_samples``), so those passes take ``batch=1``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .models import LATENT_DOWNSCALE

ARCHS: tuple[str, ...] = ("sd15", "sd2", "sdxl")

#: published widths (model_channels of the UNet, ch of the VAE)
UNET_CHANNELS: dict[str, int] = {"sd15": 320, "sd2": 320, "sdxl": 320}
VAE_CHANNELS = 128
#: latent pixels per token at each UNet's deepest level (2 ** downsamples)
UNET_GRID: dict[str, int] = {"sd15": 8, "sd2": 8, "sdxl": 4}


@dataclass(frozen=True)
class Linear:
    """``element_size x batch x channels x (per_token x tokens + fixed)`` bytes."""

    per_token: float
    fixed: float = 0.0

    def bytes(self, tokens: int, batch: int, channels: int, element_size: int) -> int:
        return math.ceil(element_size * batch * channels * (self.per_token * tokens + self.fixed))


@dataclass(frozen=True)
class PassModel:
    """One pass: the peak of its other activations and what is live at each attention site."""

    peak: Linear
    live: Mapping[str, Linear] = field(default_factory=dict)


# --- fitted coefficients ---------------------------------------------------------------------------------
# Elements per (channel x latent token) and per channel, by pass and element size. Regenerated on 2026-11-30 by
#     python -m memslice_tools.fit_activations --full-width
# (torch 2.13.0+cpu, 2 threads; ldm from stable-diffusion-sdkit 2.1.5; widths 32/64/96 for the UNets and
# 32/64/128 for the VAE, sizes 128x128 and 256x192; validated by the same run at 192x320 and 320x256 under three
# attention regimes, 62 cases within 1.000-1.062x, and at model_channels 320 for SD1.5 / SD2: 1.0000x).
# Checked on CUDA (H200, torch 2.11, ``--device cuda``) at the published widths and real sizes.
MODELS: dict[str, dict[int, PassModel]] = {
    "sd15": {
        4: PassModel(
            Linear(25.0, 5.0),
            {
                "unet.level0.cross": Linear(10.0, 159.0),
                "unet.level0.self": Linear(11.0, 5.0),
                "unet.level1.cross": Linear(7.75, 313.0),
                "unet.level1.self": Linear(8.25, 5.0),
                "unet.level2.cross": Linear(6.375, 621.0),
                "unet.level2.self": Linear(6.625, 5.0),
                "unet.mid.cross": Linear(5.375, 621.0),
                "unet.mid.self": Linear(5.4375, 5.0),
            },
        ),
        2: PassModel(
            Linear(26.0, 5.0),
            {
                "unet.level0.cross": Linear(11.0, 159.0),
                "unet.level0.self": Linear(12.0, 5.0),
                "unet.level1.cross": Linear(8.25, 313.0),
                "unet.level1.self": Linear(8.75, 5.0),
                "unet.level2.cross": Linear(6.625, 621.0),
                "unet.level2.self": Linear(6.875, 5.0),
                "unet.mid.cross": Linear(5.4375, 621.0),
                "unet.mid.self": Linear(5.5, 5.0),
            },
        ),
    },
    "sd2": {
        4: PassModel(
            Linear(25.0, 5.0),
            {
                "unet.level0.cross": Linear(10.0, 159.0),
                "unet.level0.self": Linear(11.0, 5.0),
                "unet.level1.cross": Linear(7.75, 313.0),
                "unet.level1.self": Linear(8.25, 5.0),
                "unet.level2.cross": Linear(6.375, 621.0),
                "unet.level2.self": Linear(6.625, 5.0),
                "unet.mid.cross": Linear(5.375, 621.0),
                "unet.mid.self": Linear(5.4375, 5.0),
            },
        ),
        2: PassModel(
            Linear(26.0, 5.0),
            {
                "unet.level0.cross": Linear(11.0, 159.0),
                "unet.level0.self": Linear(12.0, 5.0),
                "unet.level1.cross": Linear(8.25, 313.0),
                "unet.level1.self": Linear(8.75, 5.0),
                "unet.level2.cross": Linear(6.625, 621.0),
                "unet.level2.self": Linear(6.875, 5.0),
                "unet.mid.cross": Linear(5.4375, 621.0),
                "unet.mid.self": Linear(5.5, 5.0),
            },
        ),
    },
    "sdxl": {
        4: PassModel(
            Linear(16.25, 4.0),
            {
                "unet.level1.cross": Linear(8.75, 312.0),
                "unet.level1.self": Linear(9.25, 4.0),
                "unet.level2.cross": Linear(6.625, 620.0),
                "unet.level2.self": Linear(6.875, 4.0),
                "unet.mid.cross": Linear(6.125, 620.0),
                "unet.mid.self": Linear(6.375, 4.0),
            },
        ),
        2: PassModel(
            Linear(19.0, 8.0),
            {
                "unet.level1.cross": Linear(9.25, 312.0),
                "unet.level1.self": Linear(9.75, 4.0),
                "unet.level2.cross": Linear(6.875, 620.0),
                "unet.level2.self": Linear(7.125, 4.0),
                "unet.mid.cross": Linear(6.375, 620.0),
                "unet.mid.self": Linear(6.625, 4.0),
            },
        ),
    },
    "vae_decode": {
        4: PassModel(
            Linear(512.125, 0.0),
            {
                "vae.mid": Linear(20.125, 0.0),
            },
        ),
        2: PassModel(
            Linear(512.125, 0.0),
            {
                "vae.mid": Linear(20.125, 0.0),
            },
        ),
    },
    "vae_encode": {
        4: PassModel(
            Linear(356.0, 0.0),
            {
                "vae.mid": Linear(344.0, 0.0),
            },
        ),
        2: PassModel(
            Linear(356.0, 0.0),
            {
                "vae.mid": Linear(344.0, 0.0),
            },
        ),
    },
}  # ---------------------------------------------------------------------------------------------------------

PASSES: tuple[str, ...] = (*ARCHS, "vae_decode", "vae_encode")

#: A VAE pass run in bands (:mod:`lib_memslice.bands`): the part it runs whole, in the same terms. The decoder's
#: conv_in and mid block run as in the stock pass (its live at the mid attention is the stock one; the mid part's own
#: peak, ResnetBlocks at 512 channels on the latent grid, stays under it). The encoder's down path no longer leaves
#: every block's output in a list: 20 x ch x N is live at its mid attention (stock: 344), 32 x ch x N is its mid
#: part's peak (the stock peak less the list). The banded part itself is :func:`lib_memslice.band_costs.banded_peak`'s.
#: Measured with the tracker on the real ldm modules, memslice's forwards installed and the band count forced
#: (ch 32, fp32 and bf16, 256x256 and 320x192, 1-8 bands; tests/test_job_bands.py checks it at other sizes).
BANDED_MID: dict[str, PassModel] = {
    "vae_decode": PassModel(Linear(20.125, 0.0), {"vae.mid": Linear(20.125, 0.0)}),
    "vae_encode": PassModel(Linear(32.0, 0.0), {"vae.mid": Linear(20.0, 0.0)}),
}


def banded_mid_bytes(
    kind: str, width: int, height: int, batch: int, element_size: int, *, channels: int = VAE_CHANNELS
) -> tuple[int, dict[str, int]]:
    """``(peak, live)`` of the part of a banded VAE pass that runs whole (see :data:`BANDED_MID`)."""
    _check(width, height, batch, element_size)
    model = BANDED_MID[kind]
    tokens = latent_tokens(width, height)
    peak = model.peak.bytes(tokens, batch, channels, element_size)
    return peak, {site: m.bytes(tokens, batch, channels, element_size) for site, m in model.live.items()}


def pass_model(kind: str, element_size: int) -> PassModel:
    """The fitted model of one pass (an arch's UNet, ``vae_decode`` or ``vae_encode``) at an element size.

    Coefficients exist for 4 (fp32) and 2 (fp16/bf16) bytes: half precision has its own because ldm's GroupNorm32
    normalises a float32 copy, which sets the peak where no feed-forward dominates (SDXL's level 0). Wider elements
    use the fp32 numbers, narrower ones the half-precision numbers (fp8 weights compute in half precision).
    """
    if kind not in MODELS:
        raise ValueError(f"unknown pass {kind!r}; expected one of {PASSES}")
    return MODELS[kind][4 if element_size >= 4 else 2]


def _check(width: int, height: int, batch: int, element_size: int) -> None:
    for name, value in (("width", width), ("height", height), ("batch", batch), ("element_size", element_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def latent_tokens(width: int, height: int, grid: int = 1) -> int:
    """Latent tokens of an image, each latent side rounded up to a multiple of ``grid`` latent pixels."""
    side_w = -(-width // LATENT_DOWNSCALE)
    side_h = -(-height // LATENT_DOWNSCALE)
    return (-(-side_w // grid) * grid) * (-(-side_h // grid) * grid)


def _evaluate(
    kind: str, width: int, height: int, batch: int, element_size: int, channels: int | None
) -> tuple[int, dict[str, int]]:
    _check(width, height, batch, element_size)
    model = pass_model(kind, element_size)
    if kind in ARCHS:
        tokens = latent_tokens(width, height, UNET_GRID[kind])
        width_ = channels or UNET_CHANNELS[kind]
    else:
        tokens = latent_tokens(width, height)
        width_ = channels or VAE_CHANNELS
    peak = model.peak.bytes(tokens, batch, width_, element_size)
    return peak, {site: m.bytes(tokens, batch, width_, element_size) for site, m in model.live.items()}


def unet_activation_bytes(
    arch: str, width: int, height: int, unet_batch: int, element_size: int, *, model_channels: int | None = None
) -> int:
    """Peak bytes of one UNet forward's activations besides attention transients and weights.

    ``unet_batch`` is the batch the UNet runs (the webui's cond + uncond: 2 x the image batch); ``element_size``
    the UNet's compute dtype size (4 fp32, 2 fp16/bf16). ``model_channels`` defaults to the published width.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    return _evaluate(arch, width, height, unet_batch, element_size, model_channels)[0]


def unet_live_bytes(
    arch: str, width: int, height: int, unet_batch: int, element_size: int, *, model_channels: int | None = None
) -> dict[str, int]:
    """Per attention site (``unet.level0.self`` ...): the other activations live while that site's attention runs."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    return _evaluate(arch, width, height, unet_batch, element_size, model_channels)[1]


def vae_decode_activation_bytes(
    width: int, height: int, batch: int, element_size: int, *, channels: int = VAE_CHANNELS
) -> int:
    """Peak bytes of a VAE decode (post_quant_conv + Decoder) of ``batch`` latents besides attention and weights.

    The webui 1.10.1 decodes one image at a time (``decode_latent_batch`` loops over the batch and moves each
    image to the CPU), so a generation's decode pass is ``batch=1`` whatever the image batch. The peak sits in the
    first full-resolution up block (its input has 2 x ch channels), before ``conv_out``.
    """
    return _evaluate("vae_decode", width, height, batch, element_size, channels)[0]


def vae_decode_live_bytes(
    width: int, height: int, batch: int, element_size: int, *, channels: int = VAE_CHANNELS
) -> dict[str, int]:
    """``{"vae.mid": bytes}``: what is live while the decoder's mid-block attention runs."""
    return _evaluate("vae_decode", width, height, batch, element_size, channels)[1]


def vae_encode_activation_bytes(
    width: int, height: int, batch: int, element_size: int, *, channels: int = VAE_CHANNELS
) -> int:
    """Peak bytes of a VAE encode (Encoder + quant_conv + sampling the latent) besides attention and weights.

    The webui 1.10.1 encodes one image at a time when given several (``images_tensor_to_samples``): ``batch=1``.
    ldm's Encoder keeps every block's output in a list until it returns, so its peak sits at the mid block, around
    its attention, where almost all of it is live.
    """
    return _evaluate("vae_encode", width, height, batch, element_size, channels)[0]


def vae_encode_live_bytes(
    width: int, height: int, batch: int, element_size: int, *, channels: int = VAE_CHANNELS
) -> dict[str, int]:
    """``{"vae.mid": bytes}``: what is live while the encoder's mid-block attention runs."""
    return _evaluate("vae_encode", width, height, batch, element_size, channels)[1]


# --- SD3's MMDiT ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JointLinear:
    """``element_size x batch x hidden x (per_image_token x image tokens + per_text_token x text tokens + fixed)``
    bytes: an MMDiT carries the image's patch tokens and the prompt's text tokens through the same blocks, but holds
    them at different rates (the last block's prompt half is ``pre_only``, the image alone is unpatchified)."""

    per_image_token: float
    per_text_token: float
    fixed: float = 0.0

    def bytes(self, image_tokens: int, text_tokens: int, batch: int, channels: int, element_size: int) -> int:
        units = self.per_image_token * image_tokens + self.per_text_token * text_tokens + self.fixed
        return math.ceil(element_size * batch * channels * units)


@dataclass(frozen=True)
class MmditModel:
    """An MMDiT forward: the peak of its other activations, and what is live at its joint attention calls."""

    peak: JointLinear
    live: JointLinear


#: SD3's MMDiT in webui 1.10.1 (``modules/models/sd3/mmdit.py``), per (element x batch x hidden): its fused qkv
#: projection and the q and k copies ``pre_attention`` makes stay alive until each joint block returns, beside the
#: concatenated q, k and v of the call; the peak is the image stream's MLP with all of them live. Measured on the
#: webui's own classes (executed from a 1.10.1 checkout) by ``python -m memslice_tools.sd3_standin`` (2026-12-06,
#: torch 2.13.0+cpu, 2 threads): 2, 3 and 4 heads of 64, 256x256 and 512x384 with 154 and 308 text tokens; validated
#: by the same run at 384x640, 640x512 (462 text tokens) and 1024x1024 with 5 heads, memslice-auto and unsliced
#: einsum, every case exact; tests/test_sd3_plan.py checks it at other sizes on the webui's classes (WEBUI_DIR) or
#: their fake. Half precision is measured as the webui runs it on CUDA, under autocast (LayerNorm returns float32).
#: diffusers' ``SD3Transformer2DModel`` holds a third less (the webui's MMDiT peaks at 1.44-1.61x its peak: its q/k/v
#: projections die at the concatenation), so it is not the model of the webui's memory.
MMDIT: dict[int, MmditModel] = {
    4: MmditModel(JointLinear(19.0, 10.0, 14.0), JointLinear(8.0, 8.0, 14.0)),
    2: MmditModel(JointLinear(20.0, 10.0, 14.0), JointLinear(8.0, 8.0, 14.0)),
}
#: the archs whose denoiser is an MMDiT: their UNet pass is :func:`mmdit_activation_bytes`
MMDITS: tuple[str, ...] = ("sd3",)
MMDIT_HIDDEN = 1536  # SD3 Medium: 24 heads of 64
MMDIT_PATCH_PX = 16  # image pixels per patch token a side (latent 8 x patch 2)


def _mmdit(width: int, height: int, batch: int, element_size: int, text_tokens: int, hidden: int
           ) -> tuple[MmditModel, tuple[int, int, int, int, int]]:  # fmt: skip
    _check(width, height, batch, element_size)
    image = (width // MMDIT_PATCH_PX) * (height // MMDIT_PATCH_PX)
    return MMDIT[4 if element_size >= 4 else 2], (image, text_tokens, batch, hidden, element_size)


def mmdit_activation_bytes(
    width: int, height: int, batch: int, element_size: int, *, text_tokens: int = 154, hidden: int = MMDIT_HIDDEN
) -> int:
    """Peak bytes of one MMDiT forward's activations besides attention transients and weights: ``batch`` as it runs
    (the webui's cond + uncond: 2 x the image batch), ``text_tokens`` the prompt's (154 per 75-token chunk), image
    sides cut to 16 px as the webui cuts them."""
    model, args = _mmdit(width, height, batch, element_size, text_tokens, hidden)
    return model.peak.bytes(*args)


def mmdit_live_bytes(
    width: int, height: int, batch: int, element_size: int, *, text_tokens: int = 154, hidden: int = MMDIT_HIDDEN
) -> dict[str, int]:
    """``{"mmdit.joint": bytes}``: what is live while a joint attention call runs."""
    model, args = _mmdit(width, height, batch, element_size, text_tokens, hidden)
    return {"mmdit.joint": model.live.bytes(*args)}


#: SD3's own VAE classes (``sd3_impls.VAEDecoder``/``VAEEncoder``: the SD VAE's geometry, ch 128, 16 latent
#: channels), in the same terms as ``MODELS["vae_decode"]``/``["vae_encode"]``. Their ResnetBlocks run SiLU in place,
#: so in float32 the decoder holds 320 x ch x N at its peak (ldm's: 512); ``SDVAE.decode``/``encode`` turn CUDA
#: autocast on in float16, where every GroupNorm returns float32 and the in-place SiLU works on that copy, so in half
#: precision the decoder holds 640 elements' worth (1280 bytes) per channel and latent token: more than ldm's.
#: Measured with the tracker on the webui's own classes (``memslice_tools.sd3_standin.load_webui_sd3``; ch 32 and 64,
#: 256x256, 320x192, 192x320, fp32 plain and bf16 under emulated CUDA autocast, memslice's AttnBlock forward in
#: place; tests/test_sd3_plan.py checks them at other sizes). Off CUDA (MPS) half precision runs without autocast and
#: holds the float32 model's elements: the model is 2x high there.
SD3_VAE: dict[str, dict[int, PassModel]] = {
    "vae_decode": {
        4: PassModel(Linear(320.0, 0.0), {"vae.mid": Linear(20.0, 0.0)}),
        2: PassModel(Linear(640.0, 4.0), {"vae.mid": Linear(24.0, 0.0)}),
    },
    "vae_encode": {
        4: PassModel(Linear(352.0, 0.0), {"vae.mid": Linear(344.0, 0.0)}),
        2: PassModel(Linear(448.0, 4.0), {"vae.mid": Linear(348.0, 0.0)}),
    },
}


def sd3_vae_bytes(
    kind: str, width: int, height: int, batch: int, element_size: int, *, channels: int = VAE_CHANNELS
) -> tuple[int, dict[str, int]]:
    """``(peak, live)`` of a VAE pass of SD3's own classes (``kind``: ``vae_decode`` or ``vae_encode``)."""
    _check(width, height, batch, element_size)
    model = SD3_VAE[kind][4 if element_size >= 4 else 2]
    tokens = latent_tokens(width, height)
    peak = model.peak.bytes(tokens, batch, channels, element_size)
    return peak, {site: m.bytes(tokens, batch, channels, element_size) for site, m in model.live.items()}


def attention_peaks(records: Iterable[Any]) -> dict[str, int]:
    """The largest predicted attention transient per site from records with ``.site`` and ``.peak_bytes``
    (``Stats.recent()``'s CallRecords, or the planner's per-site plans)."""
    peaks: dict[str, int] = {}
    for record in records:
        peaks[record.site] = max(peaks.get(record.site, 0), int(record.peak_bytes))
    return peaks


def pass_peak_bytes(
    activation_bytes: int,
    attention_peaks: Mapping[str, int] | Iterable[int],
    live_bytes: Mapping[str, int] | None = None,
) -> int:
    """Peak bytes of a pass (weights excluded): its other activations combined with its attention transients.

    ``activation_bytes``: the ``*_activation_bytes`` peak; ``attention_peaks``: predicted attention transient per
    site (a mapping; see :func:`attention_peaks`) or just the transients; ``live_bytes``: the ``*_live_bytes`` of
    the same pass. The rule (measured, see the module docstring)::

        max(activation_bytes, max over sites of live_bytes[site] + attention_peaks[site])

    A site missing from ``live_bytes`` (or no ``live_bytes``, or plain transients) is charged the pass's full
    ``activation_bytes`` instead: ``activation_bytes + transient``, an upper bound that never under-predicts.
    """
    peak = int(activation_bytes)
    live = live_bytes or {}
    items = attention_peaks.items() if isinstance(attention_peaks, Mapping) else ((None, t) for t in attention_peaks)
    for site, transient in items:
        base = live.get(site, activation_bytes) if site is not None else activation_bytes
        peak = max(peak, int(base) + int(transient))
    return peak
