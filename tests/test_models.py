"""Model attention sites: the built-in specs agree with the real ldm UNet built from the same config."""

from __future__ import annotations

import pytest
import torch

from lib_memslice.models import BUILTIN, Site, sites_from_modules, unet_sites, vae_sites

CONFIGS = {
    # the published configs' attention layout, with model_channels scaled down 10x (heads kept)
    "sd15": dict(attention_resolutions=(4, 2, 1), channel_mult=(1, 2, 4, 4), num_heads=8),
    "sd2": dict(attention_resolutions=(4, 2, 1), channel_mult=(1, 2, 4, 4), num_head_channels=8),
    "sdxl-layout": dict(attention_resolutions=(4, 2), channel_mult=(1, 2, 4), num_head_channels=8),
}


def as_table(sites):
    return {s.name: (s.heads, s.head_dim, s.geometry, s.count) for s in sites}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("depth", [1, 2])
def test_config_sites_match_the_real_unet(ldm, name, depth):
    _, _, openaimodel = ldm
    config = dict(CONFIGS[name], model_channels=32, transformer_depth=depth)
    unet = openaimodel.UNetModel(
        image_size=32,
        in_channels=4,
        out_channels=4,
        num_res_blocks=2,
        use_spatial_transformer=True,
        context_dim=[32] * depth,  # this ldm indexes context_dim per transformer block when depth > 1
        legacy=False,
        use_linear_in_transformer=name != "sd15",
        num_heads=config.pop("num_heads", -1),
        num_head_channels=config.pop("num_head_channels", -1),
        **config,
    )
    expected = unet_sites(
        model_channels=32,
        channel_mult=CONFIGS[name]["channel_mult"],
        attention_resolutions=CONFIGS[name]["attention_resolutions"],
        num_heads=CONFIGS[name].get("num_heads", -1),
        num_head_channels=CONFIGS[name].get("num_head_channels", -1),
        transformer_depth=depth,
    )
    assert as_table(sites_from_modules(unet).sites) == as_table(expected)


def test_vae_sites_match_the_real_decoder(ldm):
    _, model, _ = ldm
    torch.manual_seed(0)
    ddconfig = dict(
        ch=32,
        out_ch=3,
        ch_mult=(1, 2, 4, 4),
        num_res_blocks=1,
        attn_resolutions=[],
        in_channels=3,
        resolution=64,
        z_channels=4,
        dropout=0.0,
    )
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        enc = model.Encoder(double_z=True, **ddconfig)
        dec = model.Decoder(**ddconfig)
    vae = torch.nn.ModuleDict({"encoder": enc, "decoder": dec})
    (site,) = sites_from_modules(None, vae).sites
    assert (site.name, site.heads, site.head_dim, site.count) == ("vae.mid", 1, 32 * 4, 2)
    assert site.geometry.downscale == 8


def test_builtin_specs_have_the_published_numbers():
    sd15 = as_table(BUILTIN["sd15"].sites)
    assert sd15["unet.level0.self"][:2] == (8, 40)
    assert sd15["unet.level2.cross"][:2] == (8, 160)
    assert sd15["unet.mid.self"][2].downscale == 64
    sd2 = as_table(BUILTIN["sd2"].sites)
    assert sd2["unet.level0.self"][:2] == (5, 64) and sd2["unet.level2.self"][:2] == (20, 64)
    sdxl = as_table(BUILTIN["sdxl"].sites)
    assert "unet.level0.self" not in sdxl
    assert sdxl["unet.level1.self"][:2] == (10, 64) and sdxl["unet.level1.self"][3] == 10
    assert sdxl["unet.level2.self"][3] == 50 and sdxl["unet.mid.self"][3] == 10
    total = sum(s.count for s in BUILTIN["sdxl"].sites if not s.vae)
    assert total == 140  # CrossAttention modules in SDXL base
    assert sum(s.count for s in BUILTIN["sd15"].sites if not s.vae) == 32


def test_site_shapes_at_a_resolution():
    sd15 = {s.name: s for s in BUILTIN["sd15"].sites}
    shape = sd15["unet.level0.self"].shape(512, 512, batch=1)
    assert (shape.batch_heads, shape.q_tokens, shape.k_tokens, shape.head_dim) == (16, 4096, 4096, 40)
    shape = sd15["unet.level1.cross"].shape(1000, 1000, batch=2, prompt_chunks=2)
    assert (shape.batch_heads, shape.q_tokens, shape.k_tokens) == (32, 63 * 63, 154)  # ceil(125/2) = 63
    vae = sd15["vae.mid"].shape(1024, 1024, batch=4)
    assert (vae.batch_heads, vae.q_tokens, vae.head_dim) == (1, 16384, 512)


def test_sites_are_plain_data():
    site = vae_sites()[0]
    assert isinstance(site, Site) and site.vae
