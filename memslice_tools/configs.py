"""The published SD1.5 configs (``v1-inference.yaml``) as ldm's constructors take them: UNet and VAE decoder."""

from __future__ import annotations

from typing import Any

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
