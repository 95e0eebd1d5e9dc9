"""Odd shapes, layouts and dtypes through the whole attention path: correct output, no crash."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lib_memslice.forwards import BasicHost, attend, make_attnblock_forward, make_cross_attention_forward
from lib_memslice.settings import Settings
from lib_memslice.strategies import NAMES as STRATEGY_NAMES

from .conftest import reference, requires_cpu_half

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
HOSTS = {
    "ample": Settings(budget_gb=64),
    "tight": Settings(budget_gb=1 / 1024 / 4, slice_cap=4096),
    "tight-einsum": Settings(budget_gb=1 / 1024 / 4, slice_cap=4096, kernel="einsum"),
}


def check(q, k, v, strategy="auto", settings=HOSTS["tight"], upcast=False):
    out = attend(q, k, v, scale=q.shape[-1] ** -0.5, strategy=strategy, host=BasicHost(settings), upcast=upcast)
    assert out.shape == (*q.shape[:3], v.shape[-1]) and out.dtype == q.dtype
    if out.numel():
        ref = reference(q, k, v, q.shape[-1] ** -0.5)
        assert (out.double() - ref).abs().max().item() <= TOL[q.dtype] * max(1.0, ref.abs().max().item())
    return out


@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, pytest.param(torch.float16, marks=requires_cpu_half), torch.bfloat16]
)
@pytest.mark.parametrize("host", HOSTS)
def test_dtypes(dtype, host):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 97, 16, generator=g).to(dtype) for _ in range(3))
    settings = HOSTS[host]
    if host != "ample" and dtype in (torch.float16, torch.bfloat16):
        # a half-precision GEMM on a CPU may take 128 KiB of scratch per worker (costs.HALF_GEMM_FIXED): still
        # tight (the call is sliced), no longer below what one slice may really take
        settings = replace(settings, budget_gb=1 / 1024 / 2)
    check(q, k, v, settings=settings)


@pytest.mark.parametrize(
    "dims",
    [
        (1, 1, 1, 1, 8),  # batch*heads of 1, one query, one key
        (1, 1, 313, 1, 8),  # k_tokens of 1
        (2, 5, 211, 77, 8),  # prime query count, one prompt chunk
        (2, 5, 211, 231, 8),  # three prompt chunks
        (1, 7, 1009, 154, 4),  # prime heads and queries
        (3, 1, 97, 97, 64),  # single head (the VAE's layout)
    ],
)
@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_token_and_head_counts(dims, strategy):
    b, h, nq, nk, d = dims
    g = torch.Generator().manual_seed(nq)
    q = torch.randn(b, h, nq, d, generator=g)
    k = torch.randn(b, h, nk, d, generator=g)
    v = torch.randn(b, h, nk, d, generator=g)
    check(q, k, v, strategy)


@pytest.mark.parametrize("dims", [(0, 2, 5, 5), (2, 2, 0, 5), (2, 2, 5, 0), (0, 0, 0, 0)])
def test_zero_length_batches_and_tokens(dims):
    b, h, nq, nk = dims
    q, k, v = torch.randn(b, h, nq, 8), torch.randn(b, h, nk, 8), torch.randn(b, h, nk, 8)
    out = check(q, k, v)
    if nk == 0:
        assert torch.count_nonzero(out) == 0


def test_non_contiguous_and_transposed_views():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(2, 130, 4, 24, generator=g)
    views = {
        "transposed projection": base.transpose(1, 2),  # [B, H, N, d] over [B, N, H, d]
        "every other token": torch.randn(2, 4, 260, 24, generator=g)[:, :, ::2],
        "sliced head dim": torch.randn(2, 4, 130, 48, generator=g)[..., :24],
        "permuted batch and heads": torch.randn(4, 2, 130, 24, generator=g).transpose(0, 1),
        "channels last": torch.randn(2, 24, 4, 130, generator=g).permute(0, 2, 3, 1),
    }
    for name, q in views.items():
        assert not q.is_contiguous(), name
        for host in HOSTS.values():
            check(q, q.flip(2), q * 0.5, settings=host)


def test_upcast_half_inputs():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 150, 32, generator=g).half() for _ in range(3))
    check(q, k, v, upcast=True)


def test_forwards_take_zero_length_batches(ldm):
    attention, model, _ = ldm
    layer = attention.CrossAttention(query_dim=32, context_dim=16, heads=2, dim_head=16)
    forward = make_cross_attention_forward("auto", BasicHost())
    assert forward(layer, torch.randn(0, 10, 32), context=torch.randn(0, 77, 16)).shape == (0, 10, 32)
    assert forward(layer, torch.randn(2, 0, 32), context=torch.randn(2, 77, 16)).shape == (2, 0, 32)
    block = model.AttnBlock(32)
    assert make_attnblock_forward("auto", BasicHost())(block, torch.randn(0, 32, 4, 4)).shape == (0, 32, 4, 4)
