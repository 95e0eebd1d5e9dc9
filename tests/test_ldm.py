"""The real ldm modules (random weights, small configs) give the same output with every strategy as stock."""

from __future__ import annotations

import pytest
import torch

from lib_memslice.forwards import BasicHost, make_attnblock_forward, make_cross_attention_forward
from lib_memslice.models import sites_from_modules
from lib_memslice.settings import Settings
from lib_memslice.strategies import NAMES as STRATEGY_NAMES

from .conftest import torch_threads


def hosts():
    yield "ample", BasicHost(Settings(budget_gb=64))
    # 256 KiB: einsum must slice; auto cannot fit the fused CPU kernel's per-thread workspace (two threads, see
    # test_cross_attention_matches_stock) and falls back to einsum
    for kernel in ("auto", "einsum"):
        yield f"tight-{kernel}", BasicHost(Settings(budget_gb=1 / 1024 / 4, kernel=kernel, slice_cap=4096))
    yield "sdpa", BasicHost(Settings(budget_gb=3 / 1024, kernel="sdpa", slice_cap=4096))


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_cross_attention_matches_stock(ldm, strategy):
    attention, _, _ = ldm
    torch.manual_seed(0)
    cross = attention.CrossAttention(query_dim=64, context_dim=48, heads=4, dim_head=16).eval()
    self_attention = attention.CrossAttention(query_dim=64, heads=4, dim_head=16).eval()
    x = torch.randn(2, 300, 64)  # 300 tokens: divides by nothing convenient
    for layer_, context in ((self_attention, None), (cross, torch.randn(2, 77, 48))):
        # the fused kernel's scratch grows with threads: with one (a one-core CI runner) it fits the tight room
        with torch.no_grad(), torch_threads(2):
            expected = layer_(x, context=context)
            for label, host in hosts():
                got = make_cross_attention_forward(strategy, host)(layer_, x, context=context)
                assert (got - expected).abs().max().item() < 1e-5, label
                if label.startswith("tight"):
                    assert host.stats.recent()[-1].slices > 1, label


def test_cross_attention_keep_mask_matches_stock(ldm):
    attention, _, _ = ldm
    torch.manual_seed(1)
    layer = attention.CrossAttention(query_dim=32, context_dim=16, heads=2, dim_head=16).eval()
    x, context = torch.randn(2, 50, 32), torch.randn(2, 77, 16)
    mask = torch.rand(2, 77) > 0.5
    with torch.no_grad():
        expected = layer(x, context=context, mask=mask)
        for _, host in hosts():
            got = make_cross_attention_forward("auto", host)(layer, x, context=context, mask=mask)
            assert (got - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_attnblock_matches_stock(ldm, strategy):
    _, model, _ = ldm
    torch.manual_seed(2)
    block = model.AttnBlock(64).eval()
    x = torch.randn(1, 64, 15, 17)  # 255 tokens, odd sides
    with torch.no_grad():
        expected = block(x)
        for label, host in hosts():
            got = make_attnblock_forward(strategy, host)(block, x)
            assert (got - expected).abs().max().item() < 1e-5, label


def test_attnblock_vae_setting_off_runs_the_fallback(ldm):
    _, model, _ = ldm
    block = model.AttnBlock(32).eval()
    calls = []

    def fallback(self, x, **kwargs):
        calls.append(x.shape)
        return x

    forward = make_attnblock_forward("auto", BasicHost(Settings(vae="off")), fallback)
    x = torch.randn(1, 32, 4, 4)
    assert forward(block, x) is x and calls == [x.shape]


def small_unet(openaimodel, **overrides):
    config = dict(
        image_size=32,
        in_channels=4,
        out_channels=4,
        model_channels=32,
        attention_resolutions=[4, 2, 1],
        num_res_blocks=1,
        channel_mult=[1, 2, 4, 4],
        num_heads=8,
        use_spatial_transformer=True,
        transformer_depth=1,
        context_dim=64,
        legacy=False,
    )
    config.update(overrides)
    torch.manual_seed(3)
    unet = openaimodel.UNetModel(**config).eval()
    # zero_module() leaves the output conv, ResBlock out convs and every proj_out at zero: a random UNet would
    # output exactly zero whatever attention does. Re-initialise them so the comparison can fail.
    with torch.no_grad():
        for p in unet.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.2)
    return unet


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_unet_output_matches_stock(ldm, strategy, monkeypatch):
    attention, _, openaimodel = ldm
    unet = small_unet(openaimodel)
    x, t, context = torch.randn(2, 4, 24, 16), torch.tensor([10, 500]), torch.randn(2, 77, 64)
    with torch.no_grad():
        expected = unet(x, t, context=context)
        assert expected.abs().max() > 0.1  # the comparison below is not vacuous
        host = BasicHost(Settings(budget_gb=1 / 1024 / 8, slice_cap=4096))
        monkeypatch.setattr(attention.CrossAttention, "forward", make_cross_attention_forward(strategy, host))
        got = unet(x, t, context=context)
    assert (got - expected).abs().max().item() < 1e-4 * max(1.0, expected.abs().max().item())
    assert any(r.slices > 1 for r in host.stats.recent())


def test_unet_forward_is_sensitive_to_attention(ldm, monkeypatch):
    """Guard against a vacuous comparison: breaking attention must change the UNet output."""
    attention, _, openaimodel = ldm
    unet = small_unet(openaimodel)
    x, t, context = torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 77, 64)
    with torch.no_grad():
        expected = unet(x, t, context=context)
        real = make_cross_attention_forward("auto", BasicHost())

        def broken(self, x, context=None, mask=None, **kw):
            return real(self, x, context=context, mask=mask) * 0.5

        monkeypatch.setattr(attention.CrossAttention, "forward", broken)
        assert (unet(x, t, context=context) - expected).abs().max() > 1e-3


def test_unet_sites_are_tagged_with_their_geometry(ldm):
    attention, _, openaimodel = ldm
    unet = small_unet(openaimodel)
    spec = sites_from_modules(unet)
    names = {s.name: s for s in spec.sites}
    assert set(names) == {f"unet.level{i}.{k}" for i in range(3) for k in ("self", "cross")} | {
        "unet.mid.self",
        "unet.mid.cross",
    }
    assert names["unet.level1.self"].geometry.downscale == 16
    assert names["unet.mid.cross"].geometry.downscale == 64
    # tags: each layer knows its site, and the recorded site name comes from it
    host = BasicHost()
    x, t, context = torch.randn(1, 4, 16, 16), torch.tensor([1]), torch.randn(1, 77, 64)
    original = attention.CrossAttention.forward
    attention.CrossAttention.forward = make_cross_attention_forward("auto", host)
    try:
        with torch.no_grad():
            unet(x, t, context=context)
    finally:
        attention.CrossAttention.forward = original
    seen = {r.site: r for r in host.stats.recent()}
    assert seen["unet.level0.self"].q_tokens == 16 * 16 == seen["unet.level0.self"].k_tokens
    assert seen["unet.level0.cross"].k_tokens == 77
    assert seen["unet.mid.self"].q_tokens == 2 * 2
