"""SD3's joint attention through memslice (lib_memslice/joint.py): the webui's calling convention, same results.

The webui 1.10.1 MMDiT calls ``attention(q, k, v, heads, mask=None)`` with q and k ``[B, N, H*64]`` and v
``[B, N, H, 64]`` (3-D from other callers), N = the prompt's 154 tokens per chunk + the image's patches. memslice's
function must equal one SDPA call over the heads (float64 reference) for every strategy, and allocate no more than
its plan predicts (the live-tensor tracker), plus the ``[B, N, H*d]`` copy the webui's own function also returns.
"""

from __future__ import annotations

import pytest
import torch

from lib_memslice import kernels, strategies
from lib_memslice.costs import AttentionShape
from lib_memslice.forwards import BasicHost
from lib_memslice.joint import _sdpa, keys_mask, make_joint_attention, text_tokens_recorder
from lib_memslice.limits import NotEnoughMemory
from lib_memslice.models import BUILTIN, JOINT, joint_geometry
from lib_memslice.settings import Settings
from lib_memslice.slicing import plan_attention
from memslice_tools.memtrack import PeakTracker

from .conftest import reference

HEADS, D = 2, 64


def joint_qkv(image: int, text: int, batch: int = 2, v_4d: bool = True, dtype=torch.float32, seed: int = 0):
    """q, k, v as ``block_mixing`` hands them over: the prompt's rows then the image's, concatenated (contiguous),
    v the 4-D view ``split_qkv`` left (or the 3-D tensor)."""
    g = torch.Generator().manual_seed(seed)
    n = text + image
    q, k, v = (torch.randn(batch, n, HEADS * D, generator=g).to(dtype) for _ in range(3))
    return q, k, (v.view(batch, n, HEADS, D) if v_4d else v)


def heads_of(t: torch.Tensor) -> torch.Tensor:
    b, n = t.shape[:2]
    return t.reshape(b, n, HEADS, D).transpose(1, 2)


def expected(q, k, v) -> torch.Tensor:
    out = reference(heads_of(q), heads_of(k), heads_of(v), D**-0.5)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], HEADS * D)


#: (image tokens, text tokens): 20 x 16 patches beside one and two prompt chunks
SIZES = [(320, 154), (320, 308)]


@pytest.mark.parametrize("strategy", strategies.NAMES)
@pytest.mark.parametrize(("image", "text"), SIZES, ids=["154-text", "308-text"])
@pytest.mark.parametrize("v_4d", [True, False], ids=["v-4d", "v-3d"])
def test_every_strategy_equals_sdpa_within_its_predicted_peak(strategy, image, text, v_4d):
    """A room a fifth of the unsliced einsum call's: every strategy slices (the fused kernel still runs whole)."""
    q, k, v = joint_qkv(image, text, v_4d=v_4d)
    n = image + text
    whole = 2 * HEADS * n * n * 4
    host = BasicHost(Settings(budget_gb=whole / 5 / 2**30, kernel="einsum"))
    attention = make_joint_attention(strategy, host)
    with PeakTracker() as tracker:
        out = attention(q, k, v, HEADS)
    record = host.stats.recent()[-1]
    assert record.site == JOINT and record.slices > 1
    assert (record.batch_heads, record.q_tokens, record.k_tokens, record.head_dim) == (2 * HEADS, n, n, D)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert (out.double() - expected(q, k, v)).abs().max().item() < 2e-5
    returned = out.numel() * out.element_size()  # the [B, N, H*d] copy the webui's own function returns too
    assert tracker.peak <= record.peak_bytes + returned


@pytest.mark.parametrize("v_4d", [True, False], ids=["v-4d", "v-3d"])
def test_unsliced_on_the_fused_kernel_it_is_the_webuis_function_to_the_bit(v_4d):
    q, k, v = joint_qkv(320, 154, v_4d=v_4d)
    host = BasicHost()
    out = make_joint_attention("auto", host)(q, k, v, HEADS)
    assert host.stats.recent()[-1].kernel_used == "fused" and host.stats.recent()[-1].slices == 1
    assert torch.equal(out, _sdpa(q, k, v, HEADS))


def test_bfloat16_and_upcast():
    """bfloat16 in bfloat16 out; 'Upcast cross attention layer to float32' (honoured for SD3: the webui's own SD3
    ignores it) computes in float32 and is planned with 4-byte scores."""
    q, k, v = joint_qkv(64, 154, dtype=torch.bfloat16)
    for upcast in (False, True):
        host = BasicHost(Settings(kernel="einsum"), upcast=upcast)
        out = make_joint_attention("auto", host)(q, k, v, HEADS)
        assert out.dtype == torch.bfloat16
        assert (out.double() - expected(q, k, v)).abs().max().item() < 0.05
    q32, k32, v32 = (t.float() for t in (q, k, v))
    upcast_out = make_joint_attention("auto", BasicHost(Settings(kernel="einsum"), upcast=True))(q, k, v, HEADS)
    assert (upcast_out.float() - expected(q32, k32, v32).float()).abs().max().item() <= 2**-7


def test_masks_pass_through():
    """A boolean mask over the keys per batch item (SDPA's ``[B, 1, 1, K]``) is memslice's keep-mask and slices; any
    other mask (an additive bias, a mask per query) runs the webui's own function with the mask as given."""
    q, k, v = joint_qkv(96, 154)
    n = q.shape[1]
    keep = torch.rand(2, 1, 1, n, generator=torch.Generator().manual_seed(3)) > 0.3
    host = BasicHost(Settings(budget_gb=2 * HEADS * n * n * 4 / 2 / 2**30, kernel="einsum"))
    out = make_joint_attention("auto", host)(q, k, v, HEADS, keep)
    assert host.stats.recent()[-1].slices > 1
    want = _sdpa(q.double(), k.double(), v.double(), HEADS, keep)
    assert (out.double() - want).abs().max().item() < 2e-5
    calls = []

    def webui_attention(*args):
        calls.append(args)
        return _sdpa(*args)

    bias = torch.randn(2, HEADS, n, n)
    host = BasicHost()
    out = make_joint_attention("auto", host, fallback=webui_attention)(q, k, v, HEADS, bias)
    assert len(calls) == 1 and calls[0][4] is bias and host.stats.recent() == []
    assert torch.equal(out, _sdpa(q, k, v, HEADS, bias))
    assert keys_mask(torch.ones(1, 1, 1, n, dtype=torch.bool), 2, n).shape == (2, n)
    assert keys_mask(torch.ones(2, 1, n, n, dtype=torch.bool), 2, n) is None


def test_the_error_names_the_largest_square_size_from_the_prompt_length():
    """With the prompt's length known (the MMDiT's pre-hook), a call that fits nothing names the largest square
    image, a multiple of 16 px; without it, the share of its tokens that fits."""
    hook, tokens = text_tokens_recorder()
    hook(None, (torch.zeros(2, 16, 8, 8), torch.zeros(2)), {"context": torch.zeros(2, 154, 4096)})
    assert tokens() == 154
    q, k, v = joint_qkv(40 * 40, 154, batch=1)
    host = BasicHost(Settings(budget_gb=4 / 1024, slice_cap=4, kernel="einsum"))
    with pytest.raises(NotEnoughMemory) as named:
        make_joint_attention("auto", host, text_tokens=tokens)(q, k, v, HEADS)
    side = named.value.max_resolution
    assert side and side % 16 == 0 and side < 640 and f"{side}x{side}" in str(named.value)
    with pytest.raises(NotEnoughMemory) as unnamed:
        make_joint_attention("auto", host)(q, k, v, HEADS)
    assert unnamed.value.max_resolution is None and "query tokens" in str(unnamed.value)


def test_the_joint_site_counts_the_prompt_and_the_patches():
    site = next(s for s in BUILTIN["sd3"].sites if s.name == JOINT)
    assert (site.heads, site.head_dim, site.count) == (24, 64, 24)
    assert site.shape(1024, 1024).q_tokens == 4096 + 154 == site.shape(1024, 1024).k_tokens
    assert site.shape(1024, 1024, prompt_chunks=2).q_tokens == 4096 + 308
    assert site.shape(1032, 1039).q_tokens == 64 * 64 + 154  # the webui cuts sides to 16 px
    assert site.shape(1024, 1024, batch=1).batch_heads == 48  # cond + uncond
    assert site.shape(2048, 2048).q_tokens == 16538
    assert joint_geometry(308).tokens(1280, 1280) == 6400 + 308


def test_metals_limits_at_sd3s_shapes():
    """A whole joint call (48 rows at once, fp16: SDPA, as the webui's own SD3 runs it) breaks Metal's 2^31-element
    limit from N = 6689: under the mps rule 1280 px (6554 tokens) runs whole, 1296 px (6715) is sliced, whatever
    the room. memslice's einsum kernel computes one batch item (24 rows) at a time: whole up to 1536 px."""
    site = next(s for s in BUILTIN["sd3"].sites if s.name == JOINT)
    (sdpa,) = kernels.expected_kernels("mps", torch.float16, 64, "sdpa", False, 64, True)
    (einsum,) = kernels.expected_kernels("mps", torch.float16, 64, "auto", False, 64, True)
    assert (sdpa.kind, einsum.kind) == ("sdpa-math", "einsum")
    for kernel, side, sliced in ((sdpa, 1280, False), (sdpa, 1296, True), (einsum, 1536, False), (einsum, 1552, True)):
        shape = site.shape(side, side, batch=1, element_size=2, io_element_size=2)
        plan = plan_attention(shape, 1 << 40, strategy="mps", device_kind="mps", kernel=kernel)
        assert plan is not None and (plan.slices > 1) == sliced, (kernel.kind, side, plan)
    for n, sliced in ((6688, False), (6689, True)):
        shape = AttentionShape(48, n, n, 64, element_size=2, io_element_size=2, heads=24)
        assert (plan_attention(shape, 1 << 40, strategy="mps", device_kind="mps", kernel=sdpa).slices > 1) == sliced
