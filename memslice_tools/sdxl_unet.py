"""An SDXL-shaped UNet assembled from the real ldm blocks: OUR OWN construction, not Stability AI's code.

Why it exists: the SDXL UNet lives in ``sgm`` (Stability-AI/generative-models), which is neither installed here nor
on PyPI, and ldm's ``UNetModel`` cannot take SDXL's config (per-level transformer depth, a "sequential" label
embedding). For measuring activation memory we need the same layer graph, not sgm's code, so this module builds
it from ldm's ``ResBlock``, ``SpatialTransformer``, ``Downsample``, ``Upsample`` and ``TimestepEmbedSequential``,
following the constructor rules of sgm's ``UNetModel`` (``sgm/modules/diffusionmodules/openaimodel.py``), with the
numbers of ``configs/inference/sd_xl_base.yaml`` as defaults:

- model_channels 320, channel_mult (1, 2, 4), num_res_blocks 2, attention_resolutions (4, 2) (downscale factors
  inside the UNet), num_head_channels 64 (heads = channels // 64), transformer_depth (0, 2, 10) per level, the
  middle block's depth = the last level's (10), context_dim 2048, use_linear_in_transformer True, legacy False;
- time embedding: linear(C, 4C), SiLU, linear(4C, 4C); ``num_classes="sequential"`` with adm_in_channels 2816:
  label embedding linear(2816, 4C), SiLU, linear(4C, 4C), added to the time embedding;
- input blocks: conv 3x3 (4 -> C); per level ``num_res_blocks`` x [ResBlock to C*mult, plus a SpatialTransformer
  of that level's depth when the level's downscale is in attention_resolutions]; a conv Downsample after every
  level but the last;
- middle: ResBlock, SpatialTransformer (depth of the last level), ResBlock;
- output blocks: levels in reverse, ``num_res_blocks + 1`` x [ResBlock(ch + skip channels -> C*mult), the
  level's SpatialTransformer as above], a conv Upsample closing every level but level 0;
- out: GroupNorm32, SiLU, conv 3x3 (C -> 4). Forward: time (+ label) embedding, input blocks pushing every output
  on a skip stack, middle, output blocks each concatenating the popped skip on channels.

What differs from sgm, and why it does not matter for memory: ldm's ``SpatialTransformer`` indexes one context
per transformer block (sgm reuses a single context), so :meth:`SDXLUNet.forward` passes the same tensor object
``depth`` times (no copies); ldm's block classes are otherwise the same computations as sgm's (ResBlock,
BasicTransformerBlock with GEGLU feed-forward, GroupNorm32 that normalises in float32). Weights are random.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

#: ``sd_xl_base.yaml``'s UNet (network_config params), as this builder takes them
SDXL_BASE: dict[str, Any] = dict(
    in_channels=4,
    out_channels=4,
    model_channels=320,
    channel_mult=(1, 2, 4),
    attention_resolutions=(4, 2),
    num_res_blocks=2,
    num_head_channels=64,
    transformer_depth=(0, 2, 10),
    context_dim=2048,
    adm_in_channels=2816,
    use_linear_in_transformer=True,
)


def _ldm() -> tuple[Any, Any, Any]:
    """ldm's attention, openaimodel and util modules (sdkit prints a note on import: keep it quiet)."""
    with contextlib.redirect_stdout(io.StringIO()):
        import ldm.modules.attention as attention
        import ldm.modules.diffusionmodules.openaimodel as openaimodel
        import ldm.modules.diffusionmodules.util as util
    return attention, openaimodel, util


class SDXLUNet(nn.Module):
    """SDXL base's UNet layer graph from ldm blocks (module docstring); ``forward(x, timesteps, context, y)``."""

    def __init__(
        self,
        *,
        in_channels: int = 4,
        out_channels: int = 4,
        model_channels: int = 320,
        channel_mult: Sequence[int] = (1, 2, 4),
        attention_resolutions: Sequence[int] = (4, 2),
        num_res_blocks: int = 2,
        num_head_channels: int = 64,
        transformer_depth: Sequence[int] = (0, 2, 10),
        transformer_depth_middle: int | None = None,
        context_dim: int = 2048,
        adm_in_channels: int = 2816,
        use_linear_in_transformer: bool = True,
    ) -> None:
        super().__init__()
        attention, openaimodel, util = _ldm()
        depths = list(transformer_depth)
        if len(depths) != len(channel_mult):
            raise ValueError("transformer_depth needs one entry per level of channel_mult")
        middle_depth = depths[-1] if transformer_depth_middle is None else transformer_depth_middle
        self.model_channels = model_channels
        self._timestep_embedding = util.timestep_embedding
        self.max_depth = max([*depths, middle_depth, 1])
        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(util.linear(model_channels, emb_dim), nn.SiLU(), util.linear(emb_dim, emb_dim))
        self.label_emb = nn.Sequential(
            nn.Sequential(util.linear(adm_in_channels, emb_dim), nn.SiLU(), util.linear(emb_dim, emb_dim))
        )

        def res(ch_in: int, ch_out: int) -> nn.Module:
            return openaimodel.ResBlock(ch_in, emb_dim, 0.0, out_channels=ch_out, dims=2, use_checkpoint=False)

        def transformer(ch: int, depth: int) -> nn.Module:
            return attention.SpatialTransformer(
                ch,
                ch // num_head_channels,
                num_head_channels,
                depth=depth,
                context_dim=[context_dim] * depth,  # ldm wants one context_dim per block when depth > 1
                use_linear=use_linear_in_transformer,
                use_checkpoint=False,
            )

        seq = openaimodel.TimestepEmbedSequential
        self.input_blocks = nn.ModuleList([seq(util.conv_nd(2, in_channels, model_channels, 3, padding=1))])
        skip_channels = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions and depths[level] > 0:
                    layers.append(transformer(ch, depths[level]))
                self.input_blocks.append(seq(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(seq(openaimodel.Downsample(ch, True, dims=2, out_channels=ch)))
                skip_channels.append(ch)
                ds *= 2
        self.middle_block = seq(res(ch, ch), transformer(ch, middle_depth), res(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions and depths[level] > 0:
                    layers.append(transformer(ch, depths[level]))
                if level and i == num_res_blocks:
                    layers.append(openaimodel.Upsample(ch, True, dims=2, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(seq(*layers))
        self.out = nn.Sequential(
            util.normalization(ch), nn.SiLU(), util.conv_nd(2, model_channels, out_channels, 3, padding=1)
        )

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x`` [B, 4, h, w] latents, ``timesteps`` [B], ``context`` [B, 77, 2048], ``y`` [B, 2816]."""
        dtype = self.time_embed[0].weight.dtype
        # the webui casts the sinusoidal embedding to the UNet's dtype (its timestep_embedding hijack)
        emb = self.time_embed(self._timestep_embedding(timesteps, self.model_channels).to(dtype))
        emb = emb + self.label_emb(y)
        contexts = [context] * self.max_depth  # the same tensor for every block, as sgm uses it
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, contexts)
            skips.append(h)
        h = self.middle_block(h, emb, contexts)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, contexts)
        return self.out(h.type(x.dtype))


def build_sdxl_unet(
    model_channels: int = 320, num_head_channels: int = 64, seed: int = 0, **overrides: Any
) -> SDXLUNet:
    """The SDXL-shaped UNet with random weights (``eval()`` mode). Narrower ``model_channels`` keep every token count
    (and, with ``num_head_channels`` scaled alike, every head count); channel widths must stay multiples of 32
    (GroupNorm's 32 groups)."""
    torch.manual_seed(seed)
    config = {**SDXL_BASE, "model_channels": model_channels, "num_head_channels": num_head_channels, **overrides}
    return SDXLUNet(**config).eval()
