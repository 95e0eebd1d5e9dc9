"""The attention sites of Stable Diffusion models: what each layer's attention call looks like at a given size.

Built-in specs carry the numbers of the published configs (SD1.x ``v1-inference.yaml``, SD2.x
``v2-inference-v.yaml``, SDXL ``sd_xl_base.yaml``, SD3 Medium as webui 1.10.1 builds it from the checkpoint);
:func:`sites_from_modules` reads the same facts off a live UNet or MMDiT and VAE, so the webui plans for whatever
model is loaded. No torch imports at module level: the CLI and the planner API use this without touching tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .costs import AttentionShape
from .limits import Geometry

LATENT_DOWNSCALE = 8  # every SD VAE here: 2 ** (len(ch_mult) - 1)
PROMPT_TOKENS = 77  # one 75-token chunk plus start/end


@dataclass(frozen=True)
class Site:
    """One distinct attention shape in a model (several identical layers share a site)."""

    name: str
    heads: int
    head_dim: int
    geometry: Geometry
    context_tokens: int = 0  # cross-attention keys (0 for self-attention)
    count: int = 1
    vae: bool = False

    def geometry_at(self, prompt_chunks: int = 1) -> Geometry:
        """The site's geometry for a prompt of ``prompt_chunks`` chunks (SD3's joint attention holds every chunk's
        text tokens beside the image's)."""
        if not self.geometry.extra_tokens or prompt_chunks <= 1:
            return self.geometry
        return replace(self.geometry, extra_tokens=self.geometry.extra_tokens * prompt_chunks)

    def shape(
        self,
        width: int,
        height: int,
        batch: int = 1,
        element_size: int = 4,
        io_element_size: int = 0,
        cond_uncond: bool = True,
        prompt_chunks: int = 1,
    ) -> AttentionShape:
        """The attention call at this image size. UNet batches hold cond + uncond; the VAE decodes one image."""
        tokens = self.geometry_at(prompt_chunks).tokens(width, height)
        items = 1 if self.vae else batch * (2 if cond_uncond else 1)
        keys = tokens if self.geometry.self_attention else self.context_tokens * max(1, prompt_chunks)
        return AttentionShape(
            batch_heads=items * self.heads,
            q_tokens=tokens,
            k_tokens=keys,
            head_dim=self.head_dim,
            element_size=element_size,
            io_element_size=io_element_size,
            heads=self.heads,
        )


@dataclass(frozen=True)
class ModelSpec:
    name: str
    title: str
    sites: tuple[Site, ...] = field(default_factory=tuple)
    context_dim: int = 768  # width of the prompt's token embeddings (the cross-attention keys' input)
    prompt_tokens: int = PROMPT_TOKENS  # the prompt's tokens per 75-token chunk (SD3: CLIP's and T5's, 154)
    latent_channels: int = 4  # the VAE's latent (SD3: 16)
    cut_to: int = 0  # the webui cuts the first pass's sides down to a multiple of this (SD3: 16); 0: as given
    max_side: int = 0  # the most pixels a side the model takes (SD3's MMDiT: 3072); 0: no limit but memory
    vae_bands: bool = True  # memslice may run the VAE in exact bands (ldm's and sgm's; not SD3's own VAE classes)
    #: the loaded VAE's banded parts, ``(pass kind, band_costs.VaeNet or None)`` (None: memslice cannot band that
    #: module, its own forward runs), as the banded forwards read them off the modules; empty: the published SD VAE's
    vae_nets: tuple[tuple[str, Any], ...] = ()
    vae_channels: int = 0  # the loaded VAE's ``ch`` (its activations scale with it); 0: the published 128
    denoiser: str = "UNet"  # what its denoising pass is called (SD3: its MMDiT)


def unet_sites(
    *,
    model_channels: int,
    channel_mult: Sequence[int],
    attention_resolutions: Sequence[int],
    num_heads: int = -1,
    num_head_channels: int = -1,
    transformer_depth: int | Sequence[int] = 1,
    transformer_depth_middle: int | None = None,
    num_res_blocks: int = 2,
    context_tokens: int = PROMPT_TOKENS,
) -> list[Site]:
    """Sites of an ldm/sgm ``UNetModel`` from its config, following its constructor's rules.

    Level ``i`` runs at downscale ``2**i`` (latent pixels per token) with ``model_channels * channel_mult[i]``
    channels; it has attention when ``2**i`` is in ``attention_resolutions``; the middle block sits at the
    deepest level and always has attention. Heads are ``num_heads`` or ``channels // num_head_channels``.
    """
    depths = (
        list(transformer_depth) if isinstance(transformer_depth, Sequence) else [transformer_depth] * len(channel_mult)
    )

    def heads_and_dim(channels: int) -> tuple[int, int]:
        if num_head_channels == -1:
            return num_heads, channels // num_heads
        return channels // num_head_channels, num_head_channels

    sites: list[Site] = []
    for level, mult in enumerate(channel_mult):
        ds = 2**level
        if ds not in attention_resolutions or depths[level] == 0:
            continue
        heads, dim = heads_and_dim(model_channels * mult)
        # input blocks: num_res_blocks transformers; output blocks: num_res_blocks + 1
        layers = depths[level] * (2 * num_res_blocks + 1)
        sites += _pair(f"unet.level{level}", heads, dim, LATENT_DOWNSCALE * ds, layers, context_tokens)
    deepest = len(channel_mult) - 1
    heads, dim = heads_and_dim(model_channels * channel_mult[-1])
    middle = transformer_depth_middle if transformer_depth_middle is not None else depths[-1]
    sites += _pair("unet.mid", heads, dim, LATENT_DOWNSCALE * 2**deepest, middle, context_tokens)
    return sites


def _pair(prefix: str, heads: int, dim: int, downscale: int, count: int, context: int) -> list[Site]:
    return [
        Site(f"{prefix}.self", heads, dim, Geometry(downscale, True), count=count),
        Site(f"{prefix}.cross", heads, dim, Geometry(downscale, False), context_tokens=context, count=count),
    ]


def vae_sites(channels: int = 512, downscale: int = LATENT_DOWNSCALE) -> list[Site]:
    """The VAE's single-head mid-block attention (encoder and decoder have one each)."""
    return [Site("vae.mid", 1, channels, Geometry(downscale, True), count=2, vae=True)]


#: SD3's MMDiT in webui 1.10.1 (``modules/models/sd3``): 16 image pixels per token a side (latent 8 x patch 2; the
#: webui cuts sizes down to multiples of 16), 154 text tokens per prompt chunk (77 CLIP-L/G + 77 T5, zeros with T5
#: off) joined before the image's in one attention call per joint block, ``depth`` heads of 64 (hidden 64 x depth),
#: at most 192 patches a side (its ``pos_embed``).
JOINT = "mmdit.joint"
SD3_PATCH_PX = 16
SD3_TEXT_TOKENS = 2 * PROMPT_TOKENS
SD3_HEAD_DIM = 64
SD3_MAX_SIDE = 3072


def joint_geometry(text_tokens: int = SD3_TEXT_TOKENS) -> Geometry:
    """The joint attention's geometry with ``text_tokens`` of the prompt's beside the image's patches."""
    return Geometry(SD3_PATCH_PX, True, extra_tokens=text_tokens, size_step=SD3_PATCH_PX)


def mmdit_sites(depth: int = 24) -> list[Site]:
    """SD3's joint attention: one call per joint block, all of one shape (``depth`` heads of 64)."""
    return [Site(JOINT, depth, SD3_HEAD_DIM, joint_geometry(), count=depth)]


BUILTIN: dict[str, ModelSpec] = {
    "sd15": ModelSpec(
        "sd15",
        "Stable Diffusion 1.x (v1-inference.yaml)",
        tuple(
            unet_sites(model_channels=320, channel_mult=(1, 2, 4, 4), attention_resolutions=(4, 2, 1), num_heads=8)
            + vae_sites()
        ),
        context_dim=768,
    ),
    "sd2": ModelSpec(
        "sd2",
        "Stable Diffusion 2.x (v2-inference-v.yaml)",
        tuple(
            unet_sites(
                model_channels=320,
                channel_mult=(1, 2, 4, 4),
                attention_resolutions=(4, 2, 1),
                num_head_channels=64,
            )
            + vae_sites()
        ),
        context_dim=1024,
    ),
    "sdxl": ModelSpec(
        "sdxl",
        "Stable Diffusion XL base (sd_xl_base.yaml)",
        tuple(
            unet_sites(
                model_channels=320,
                channel_mult=(1, 2, 4),
                attention_resolutions=(4, 2),
                num_head_channels=64,
                transformer_depth=(1, 2, 10),
            )
            + vae_sites()
        ),
        context_dim=2048,
    ),
    "sd3": ModelSpec(
        "sd3",
        "Stable Diffusion 3 Medium (sd3-inference.yaml, webui 1.10.1)",
        tuple(mmdit_sites(24) + vae_sites()),
        context_dim=4096,
        prompt_tokens=SD3_TEXT_TOKENS,
        latent_channels=16,
        cut_to=SD3_PATCH_PX,
        max_side=SD3_MAX_SIDE,
        vae_bands=False,
        denoiser="MMDiT",
    ),
}
MODEL_NAMES = tuple(BUILTIN)


def clip_text_parameters(vocab: int, width: int, layers: int, mlp: int, context: int = 77, projection: int = 0) -> int:
    """Parameters of a CLIP / OpenCLIP text transformer from its published config: token and position embeddings,
    per layer two LayerNorms, q/k/v/out projections and the MLP (all with biases), the final LayerNorm, and the
    text projection OpenCLIP keeps (the webui loads the text tower only)."""
    per_layer = 2 * 2 * width + 4 * (width * width + width) + (width * mlp + mlp) + (mlp * width + width)
    return vocab * width + context * width + layers * per_layer + 2 * width + projection


@dataclass(frozen=True)
class Weights:
    """Parameter counts of a model's parts (bytes = count x element size). ``unet`` is the denoiser (SD3: the
    MMDiT); ``t5`` is SD3's optional T5-XXL encoder, resident only with the webui's 'Enable T5' option."""

    unet: int
    vae: int
    text: int
    t5: int = 0


_CLIP_L = clip_text_parameters(49408, 768, 12, 3072)  # openai/clip-vit-large-patch14, 123,060,480
_OPENCLIP_H = clip_text_parameters(49408, 1024, 24, 4096, projection=1024 * 1024)  # ViT-H-14 text tower
_OPENCLIP_BIGG = clip_text_parameters(49408, 1280, 32, 5120, projection=1280 * 1280)  # ViT-bigG-14 text tower
_VAE = 83_653_863  # AutoencoderKL of the ddconfig above: encoder, decoder and the two 1x1 quant convs

#: From the published configs; the UNet and VAE counts are checked against ldm's own modules built on the meta
#: device (tests/test_job_plan.py), SDXL's against the faithful SDXL-shaped UNet of memslice_tools/sdxl_unet.py.
#: SD3 Medium as webui 1.10.1 builds it, counted on the meta device (tests/test_sd3_plan.py checks the MMDiT against
#: diffusers' SD3Transformer2DModel and, with WEBUI_DIR, every part against the webui's own modules): the MMDiT's
#: parameters and its ``pos_embed`` buffer (2,028,328,000 + 56,623,104), ``SDVAE`` (encoder and decoder, no quant
#: convs), the CLIP-L (with its identity ``text_projection``) and CLIP-G text towers, the T5-XXL encoder.
SD3_WEIGHTS = Weights(2_028_328_000 + 56_623_104, 83_819_683, 123_650_305 + 694_659_841, t5=4_762_310_657)
WEIGHTS: dict[str, Weights] = {
    "sd15": Weights(859_520_964, _VAE, _CLIP_L),
    "sd2": Weights(865_910_724, _VAE, _OPENCLIP_H),
    "sdxl": Weights(2_567_463_684, _VAE, _CLIP_L + _OPENCLIP_BIGG),
    "sd3": SD3_WEIGHTS,
}


# --- live modules ----------------------------------------------------------------------------------------

SITE_ATTR = "_memslice_site"


def _is_cross_attention(module: Any) -> bool:
    return type(module).__name__ in ("CrossAttention", "MemoryEfficientCrossAttention") and hasattr(module, "to_q")


def _is_attn_block(module: Any) -> bool:
    return type(module).__name__ in ("AttnBlock", "MemoryEfficientAttnBlock") and hasattr(module, "proj_out")


def _walk_unet(unet: Any) -> Iterable[tuple[str, int, Any, bool]]:
    """(prefix, latent downscale, CrossAttention module, self-attention?) in execution order."""
    ds = 1
    blocks = [("in", b) for b in getattr(unet, "input_blocks", [])]
    blocks += [("mid", getattr(unet, "middle_block", None))]
    blocks += [("out", b) for b in getattr(unet, "output_blocks", [])]
    for part, block in blocks:
        if block is None:
            continue
        if part == "in" and any(type(m).__name__ == "Downsample" for m in block.modules()):
            ds *= 2
        for name, module in block.named_modules():
            if _is_cross_attention(module):
                parent = block.get_submodule(name.rsplit(".", 1)[0]) if "." in name else block
                self_attn = name.endswith("attn1") and not getattr(parent, "disable_self_attn", False)
                yield ("unet.mid" if part == "mid" else f"unet.level{int(math.log2(ds))}"), ds, module, self_attn
        if part == "out" and any(type(m).__name__ == "Upsample" for m in block.modules()):
            ds //= 2


def sites_from_modules(unet: Any = None, vae: Any = None, *, tag: bool = True) -> ModelSpec:
    """Read the attention sites off a live UNet (ldm or sgm) or MMDiT (SD3) and VAE; optionally tag each module
    with its site.

    Tags let a forward name its site and turn a failing token count back into an image size (SD3's joint attention
    is a function, not a module: it names its own site).
    """
    found: dict[str, Site] = {}
    context_dim = 768
    if unet is not None:
        for prefix, ds, module, self_attn in _walk_unet(unet):
            if not self_attn and hasattr(getattr(module, "to_k", None), "in_features"):
                context_dim = int(module.to_k.in_features)
            inner = module.to_q.out_features
            kind = "self" if self_attn else "cross"
            site = Site(
                f"{prefix}.{kind}",
                module.heads,
                inner // module.heads,
                Geometry(LATENT_DOWNSCALE * ds, self_attn),
                context_tokens=0 if self_attn else PROMPT_TOKENS,
            )
            old = found.get(site.name)
            found[site.name] = site if old is None else Site(**{**old.__dict__, "count": old.count + 1})
            if tag:
                setattr(module, SITE_ATTR, (site.name, site.geometry))
    joint_blocks = getattr(unet, "joint_blocks", None)
    max_side = 0
    if joint_blocks is not None and len(joint_blocks):  # SD3's MMDiT: one joint call per block, one shape
        attn = joint_blocks[0].x_block.attn
        found[JOINT] = Site(JOINT, attn.num_heads, attn.head_dim, joint_geometry(), count=len(joint_blocks))
        context_dim = int(getattr(getattr(unet, "context_embedder", None), "in_features", context_dim))
        patches = getattr(unet, "pos_embed_max_size", None)  # its position table: the most patches a side
        max_side = int(patches) * SD3_PATCH_PX if isinstance(patches, int) else 0
    if vae is not None:
        blocks = [m for m in vae.modules() if _is_attn_block(m)]
        for module in blocks:
            site = Site("vae.mid", 1, module.q.out_channels, Geometry(LATENT_DOWNSCALE, True), vae=True)
            old = found.get(site.name)
            found[site.name] = site if old is None else Site(**{**old.__dict__, "count": old.count + 1})
            if tag:
                setattr(module, SITE_ATTR, (site.name, site.geometry))
    return ModelSpec("loaded", "the loaded model", tuple(found.values()), context_dim, max_side=max_side)


def site_of(module: Any, default_name: str, default_geometry: Geometry | None = None) -> tuple[str, Geometry | None]:
    """The (name, geometry) a module was tagged with, or the defaults. The tag is read from the instance's own
    ``__dict__`` (where ``setattr`` put it): on an untagged ``nn.Module``, ``getattr`` would first run
    ``Module.__getattr__`` and its AttributeError, once per attention call."""
    try:
        tagged = module.__dict__.get(SITE_ATTR)
    except AttributeError:  # an object without a __dict__
        tagged = getattr(module, SITE_ATTR, None)
    if isinstance(tagged, tuple) and len(tagged) == 2:
        return tagged
    return default_name, default_geometry
