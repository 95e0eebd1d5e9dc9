"""Where a fused kernel runs unsliced, memslice is the webui's ``sdp`` to the bit (issue 27).

The webui's ``scaled_dot_product_attention_forward``: the real one from ``WEBUI_DIR`` when it is set (read-only,
through ``memslice_tools.webui_real``), else the fake's (``tests/fakes``, which mirrors it). Outputs are compared with
``torch.equal``. The VAE's ``AttnBlock`` differs on purpose (see ``forwards.make_attnblock_forward``): the test holds
it to rounding and checks that the reason stays true (sdp's 3-D call never reaches a fused kernel).
"""

from __future__ import annotations

import os

import pytest
import torch

from lib_memslice import kernels
from lib_memslice.forwards import BasicHost, make_attnblock_forward, make_cross_attention_forward

from .conftest import import_ldm
from .test_webui import TITLES, make_cross, select

WEBUI_DIR = os.environ.get("WEBUI_DIR", "")
DTYPES = [torch.float32, torch.bfloat16]
CASES = [(256, None), (1024, None), (1024, 77)]  # self-attention, and cross-attention over 77 context tokens


def sdp_module(webui):
    """The webui's sd_hijack_optimizations: the real file with WEBUI_DIR, else the fake."""
    if WEBUI_DIR:
        from memslice_tools.webui_real import load_webui_attention

        return load_webui_attention(WEBUI_DIR)
    return webui.sd_hijack_optimizations


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("tokens", "context"), CASES, ids=["self-256", "self-1024", "cross-77"])
def test_an_unsliced_fused_call_is_sdps_to_the_bit(webui, dtype, tokens, context):
    attention, _, _ = import_ldm()
    sdp = sdp_module(webui).scaled_dot_product_attention_forward
    host = BasicHost()
    forward = make_cross_attention_forward("auto", host)
    torch.manual_seed(0)
    layer = attention.CrossAttention(query_dim=320, heads=8, dim_head=40,
                                     context_dim=768 if context else None).eval().to(dtype)  # fmt: skip
    x = torch.randn(2, tokens, 320).to(dtype)
    ctx = torch.randn(2, context, 768).to(dtype) if context else None
    with torch.no_grad():
        expected, got = sdp(layer, x, context=ctx), forward(layer, x, context=ctx)
    record = host.stats.recent()[-1]
    assert record.kernel_used == "fused" and record.slices == 1
    assert torch.equal(got, expected)


@pytest.mark.parametrize("sgm", [False, True], ids=["ldm", "sgm"])
@pytest.mark.parametrize("upcast", [False, True], ids=["no-upcast", "upcast"])
def test_the_entries_are_sdp_to_the_bit_with_hypernetworks_and_upcast(webui, sgm, upcast):
    """Through the fake webui: a memslice entry applied, a hypernetwork loaded, 'Upcast cross attention layer to
    float32' on or off (no autocast on CPU), ldm's and sgm's CrossAttention in bfloat16, self and cross."""
    torch.manual_seed(5)

    def pair(n):
        return torch.nn.Linear(n, n).to(torch.bfloat16), torch.nn.Linear(n, n).to(torch.bfloat16)

    hn = webui.hypernetwork.Hypernetwork({64: pair(64), 48: pair(48)})
    webui.shared.loaded_hypernetworks.append(hn)
    webui.shared.opts.upcast_attn = upcast
    sdp = webui.sd_hijack_optimizations.scaled_dot_product_attention_forward
    try:
        for context_dim in (None, 48):
            layer = make_cross(webui, sgm=sgm, context_dim=context_dim).to(torch.bfloat16)
            x = torch.randn(2, 256, 64).to(torch.bfloat16)
            ctx = torch.randn(2, 77, 48).to(torch.bfloat16) if context_dim else None
            with torch.no_grad():
                expected = sdp(layer, x, context=ctx)
                select(webui, TITLES["auto"])
                got = layer(x, context=ctx)
            assert torch.equal(got, expected), (sgm, upcast, context_dim)
    finally:
        webui.shared.loaded_hypernetworks.clear()
        webui.shared.opts.upcast_attn = False


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_vae_attention_differs_from_sdps_only_by_rounding_and_for_its_stated_reason(webui, dtype):
    _, model, _ = import_ldm()
    sdp = sdp_module(webui).sdp_attnblock_forward
    host = BasicHost()
    forward = make_attnblock_forward("auto", host)
    torch.manual_seed(0)
    block = model.AttnBlock(64).eval().to(dtype)
    x = torch.randn(1, 64, 24, 24).to(dtype)
    with torch.no_grad():
        expected, got = sdp(block, x), forward(block, x)
    assert host.stats.recent()[-1].kernel_used == "fused"
    tolerance = 1e-6 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps * expected.abs().max().item()
    assert (got.float() - expected.float()).abs().max().item() <= tolerance
    flat = torch.randn(1, 576, 64, dtype=dtype)  # sdp's [b, hw, c]: no fused kernel takes a 3-D call
    assert kernels.sdpa_backend(flat, flat, flat) == "math"
