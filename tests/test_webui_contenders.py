"""The benchmark's webui 1.10.1 contenders: exact attention, the webui's slicing rules, and (with WEBUI_DIR set to a
webui checkout) the same output and slice counts as the real functions of that checkout."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

from memslice_tools import webui_attention as W
from memslice_tools import webui_real as R

from .conftest import CPU_HALF, CPU_HALF_ERROR, projected_qkv, reference

NAMES = ["sdp", "sdp-no-mem", "Doggettx", "InvokeAI-cpu", "InvokeAI-cuda", "sub-quadratic", "V1"]
CONTENDERS = {c.name: c for c in W.reimplemented()}
AMPLE = 1 << 40
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def info(bh, nq, nk, d, free, *, es=4, vae=False, device="cpu"):
    return {
        "batch_heads": bh,
        "q_tokens": nq,
        "k_tokens": nk,
        "head_dim": d,
        "element_size": es,
        "free_bytes": free,
        "device_type": device,
        "vae": vae,
    }


def projections(batch, heads, nq, nk, d, seed=0, v_dim=None):
    """q, k, v as ``to_q``/``to_k``/``to_v`` return them (``[B, N, H*d]``) and the fp64 reference output."""
    q4, k4, v4 = projected_qkv(batch, heads, nq, nk, d, seed=seed, v_dim=v_dim)
    flat = [t.transpose(1, 2).reshape(batch, t.shape[2], heads * t.shape[3]) for t in (q4, k4, v4)]
    ref = reference(q4, k4, v4, d**-0.5)
    return (*flat, ref.transpose(1, 2).reshape(batch, nq, -1))


def conv_outputs(b, c, h, w, seed=0):
    """q, k, v as the VAE's 1x1 convs return them (``[b, c, h, w]``) and the fp64 reference attention output."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, c, h, w, generator=g) for _ in range(3))
    rows = [t.flatten(2).transpose(1, 2) for t in (q, k, v)]
    ref = reference(*rows, c**-0.5)
    return q, k, v, ref.transpose(1, 2).reshape(b, c, h, w)


def score_bytes(bh, nq, nk, es=4):
    return bh * nq * nk * es


def counted(name, call):
    """Run ``call`` and count the chunk calls of contender ``name`` (see ``webui_real.CHUNK_KIND``)."""
    with R.ChunkCounter(R.CHUNK_KIND[name]) as counter:
        out = call()
    return out, counter.count


# --- the list ------------------------------------------------------------------------------------------------


def test_names_labels_and_entry_points():
    contenders = W.reimplemented()
    assert [c.name for c in contenders] == NAMES
    for c in contenders:
        assert c.label.startswith("re-implementation of webui 1.10.1 "), c.label
        assert c.free_rule and c.cross_attention is not None and c.slices is not None
        # V1 and InvokeAI do not patch AttnBlock in the webui
        assert (c.attn_block is None) == (c.name in ("V1", "InvokeAI-cpu", "InvokeAI-cuda"))


# --- exactness ---------------------------------------------------------------------------------------------

CROSS_SHAPES = [(2, 3, 50, 23, 8, None), (1, 5, 1100, 77, 8, None), (2, 2, 33, 33, 16, 12)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", CROSS_SHAPES, ids=lambda s: "x".join(str(x) for x in s))
@pytest.mark.parametrize("tightness", [None, 3, 12, 2000])
def test_cross_attention_is_exact(device, name, shape, tightness):
    """fp32 output within 1e-5 of fp64 attention, with ample free memory and with free memory that slices."""
    batch, heads, nq, nk, d, dv = shape
    q, k, v, ref = projections(batch, heads, nq, nk, d, v_dim=dv)
    q, k, v = (t.to(device) for t in (q, k, v))
    free = AMPLE if tightness is None else score_bytes(batch * heads, nq, nk) // tightness
    if name == "Doggettx" and tightness == 2000:
        with pytest.raises(RuntimeError, match="more than 64"):
            CONTENDERS[name].cross_attention(q, k, v, heads, d**-0.5, free)
        return
    out = CONTENDERS[name].cross_attention(q, k, v, heads, d**-0.5, free)
    assert out.shape == ref.shape and out.dtype == torch.float32 and out.device.type == device
    assert (out.double().cpu() - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["sdp", "sdp-no-mem", "Doggettx", "sub-quadratic"])
@pytest.mark.parametrize("hw", [(6, 8), (6, 7), (40, 30)])
@pytest.mark.parametrize("tightness", [None, 3, 100, 10**6])
def test_attn_block_is_exact(device, name, hw, tightness):
    q, k, v, ref = conv_outputs(1, 16, *hw)
    q, k, v = (t.to(device) for t in (q, k, v))
    n = hw[0] * hw[1]
    free = AMPLE if tightness is None else max(1, score_bytes(1, n, n) // tightness)
    out = CONTENDERS[name].attn_block(q, k, v, free)
    assert out.shape == ref.shape and out.device.type == device
    assert (out.double().cpu() - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", NAMES)
def test_half_precision_is_close(device, name):
    if device == "cpu" and not CPU_HALF:
        pytest.skip(f"this torch has no float16 attention on the CPU: {CPU_HALF_ERROR}")
    """fp16 in, fp16 out, within fp16 rounding of fp64 attention (Doggettx then budgets x3 per score byte)."""
    q, k, v, ref = projections(1, 4, 300, 77, 16)
    q, k, v = (t.to(device, torch.float16) for t in (q, k, v))
    out = CONTENDERS[name].cross_attention(q, k, v, 4, 0.25, score_bytes(4, 300, 77, es=2))
    assert out.dtype == torch.float16
    assert (out.double().cpu() - ref).abs().max().item() < 5e-3
    c = CONTENDERS[name]
    if c.attn_block is not None:
        q, k, v, ref = conv_outputs(1, 16, 6, 8)
        q, k, v = (t.to(device, torch.float16) for t in (q, k, v))
        out = c.attn_block(q, k, v, score_bytes(1, 48, 48, es=2))
        assert out.dtype == torch.float16
        assert (out.double().cpu() - ref).abs().max().item() < 5e-3


def sdpa_inputs(call):
    """The q, k, v a contender hands to ``scaled_dot_product_attention``."""
    seen = []

    class Capture(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.nn.functional.scaled_dot_product_attention:
                seen.append(args[:3])
            return func(*args, **(kwargs or {}))

    with Capture():
        call()
    assert len(seen) == 1
    return seen[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sdp_vae_path_never_gets_a_fused_kernel(device, dtype):
    """The webui's sdp passes 3-D ``[b, hw, c]`` tensors in the VAE: torch's fused kernels need 4-D, so the math
    path runs; its UNet path passes 4-D views and gets one."""
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:  # torch 2.1: the same enum lived here
        from torch.backends.cuda import SDPBackend

    if not hasattr(torch, "_fused_sdp_choice"):
        pytest.skip("this torch cannot say which SDPA backend it would pick")
    if device == "cpu" and dtype == torch.float16 and not CPU_HALF:
        pytest.skip(f"this torch has no float16 attention on the CPU: {CPU_HALF_ERROR}")
    q, k, v, _ = conv_outputs(1, 512, 16, 16)
    q, k, v = (t.to(device, dtype) for t in (q, k, v))
    block = sdpa_inputs(lambda: CONTENDERS["sdp"].attn_block(q, k, v, AMPLE))
    assert block[0].dim() == 3
    assert torch._fused_sdp_choice(*block) == SDPBackend.MATH.value
    # the same attention as one head of a 4-D batch is fused
    assert torch._fused_sdp_choice(*(t.unsqueeze(1) for t in block)) != SDPBackend.MATH.value
    q, k, v, _ = projections(2, 8, 256, 77, 40)
    q, k, v = (t.to(device, dtype) for t in (q, k, v))
    unet = sdpa_inputs(lambda: CONTENDERS["sdp"].cross_attention(q, k, v, 8, 40**-0.5, AMPLE))
    assert unet[0].dim() == 4
    assert torch._fused_sdp_choice(*unet) != SDPBackend.MATH.value


def test_scale_is_used_where_the_webui_uses_it():
    """Doggettx, InvokeAI and V1 use ``self.scale``; sdp and sub-quadratic use ``head_dim ** -0.5`` whatever it is."""
    batch, heads, nq, nk, d = 1, 2, 9, 5, 8
    q, k, v, ref = projections(batch, heads, nq, nk, d)
    q4, k4, v4 = projected_qkv(batch, heads, nq, nk, d)
    other = reference(q4, k4, v4, 0.5).transpose(1, 2).reshape(batch, nq, -1)
    for name in NAMES:
        out = CONTENDERS[name].cross_attention(q, k, v, heads, 0.5, AMPLE).double()
        expected = ref if name in ("sdp", "sdp-no-mem", "sub-quadratic") else other
        assert (out - expected).abs().max().item() < 1e-5, name


# --- slicing rules -----------------------------------------------------------------------------------------


def test_doggettx_unet_slices_a_remainder():
    """26569 tokens (1304 px) at 16 steps: slices of 26569 // 16 = 1660 tokens, the 17th holds the 9 left over."""
    required = score_bytes(1, 26569, 8) * 2.5
    assert W.doggettx_steps(1, 26569, 8, 4, required / 16) == 16
    assert CONTENDERS["Doggettx"].slices(info(1, 26569, 8, 4, required / 16)) == 17
    q, k, v, ref = projections(1, 1, 26569, 8, 4)
    out, n = counted("Doggettx", lambda: CONTENDERS["Doggettx"].cross_attention(q, k, v, 1, 0.5, required / 16))
    assert n == 17
    assert (out.double() - ref).abs().max().item() < 1e-5
    # SD1.5 at 1304 px, UNet level 0 self-attention (16 x 26569 x 26569 fp32 = 45 GB, x2.5) with 8 GiB free
    assert CONTENDERS["Doggettx"].slices(info(16, 26569, 26569, 40, 8 << 30)) == 17


def test_doggettx_unet_multiplier_is_3_for_two_byte_elements():
    tensor = score_bytes(1, 1000, 100, es=2)
    assert W.doggettx_steps(1, 1000, 100, 2, tensor * 3) == 1
    assert W.doggettx_steps(1, 1000, 100, 2, tensor * 2.99) == 2
    assert W.doggettx_steps(1, 1000, 100, 4, score_bytes(1, 1000, 100) * 2.5) == 1
    assert W.doggettx_steps(1, 1000, 100, 4, score_bytes(1, 1000, 100) * 2.49) == 2


def test_doggettx_unet_raises_past_64_steps():
    required = score_bytes(16, 4096, 4096) * 2.5
    assert CONTENDERS["Doggettx"].slices(info(16, 4096, 4096, 40, required / 64)) == 64
    with pytest.raises(RuntimeError, match="more than 64"):
        CONTENDERS["Doggettx"].slices(info(16, 4096, 4096, 40, required / 65))
    q, k, v, _ = projections(1, 2, 100, 10, 4)
    with pytest.raises(RuntimeError, match="more than 64"):
        CONTENDERS["Doggettx"].cross_attention(q, k, v, 2, 0.5, score_bytes(2, 100, 10) * 2.5 / 65)


def test_doggettx_vae_runs_unsliced_when_the_count_does_not_divide():
    required = score_bytes(1, 42, 42) * 2.5
    c = CONTENDERS["Doggettx"]
    assert c.slices(info(1, 42, 42, 16, required / 4, vae=True)) == 1  # 42 % 4 != 0: the whole score matrix
    assert c.slices(info(1, 48, 48, 16, score_bytes(1, 48, 48) * 2.5 / 4, vae=True)) == 4
    assert c.slices(info(1, 26569, 26569, 512, 1 << 30, vae=True)) == 1  # 1304 px, 8 steps do not divide 26569
    q, k, v, _ = conv_outputs(1, 16, 6, 7)
    assert counted("Doggettx", lambda: c.attn_block(q, k, v, required / 4))[1] == 1
    q, k, v, _ = conv_outputs(1, 16, 6, 8)
    assert counted("Doggettx", lambda: c.attn_block(q, k, v, score_bytes(1, 48, 48) * 2.5 / 4))[1] == 4


def test_doggettx_vae_has_no_cap_and_uses_2_5_for_every_dtype():
    c = CONTENDERS["Doggettx"]
    required = score_bytes(1, 256, 256) * 2.5
    assert c.slices(info(1, 256, 256, 8, required / 128, vae=True)) == 128
    q, k, v, _ = conv_outputs(1, 8, 16, 16)
    assert counted("Doggettx", lambda: c.attn_block(q, k, v, required / 128))[1] == 128
    half = score_bytes(1, 256, 256, es=2)
    assert c.slices(info(1, 256, 256, 8, half * 2.5, es=2, vae=True)) == 1  # x3 would need 2 steps
    assert c.slices(info(1, 256, 256, 8, half * 2.49, es=2, vae=True)) == 2


def test_invokeai_cpu_rule_is_a_fixed_32_mib():
    c = CONTENDERS["InvokeAI-cpu"]
    for free in (1, 1 << 20, AMPLE):  # free memory plays no part
        assert c.slices(info(2, 2048, 2048, 4, free)) == 1  # exactly 32 MiB of scores
        assert c.slices(info(2, 2112, 2048, 4, free)) == 2  # 33 MiB: two slices over batch*heads
    assert W.invokeai_tensor_plan(2, 2048, 2048, 4, 32) == ("none", 0)
    assert W.invokeai_tensor_plan(2, 2112, 2048, 4, 32) == ("heads", 1)
    assert W.invokeai_tensor_plan(2, 4096, 4096, 4, 32) == ("queries", 4096 // 4)  # 128 MiB: div 4 > 2 rows
    q, k, v, ref = projections(1, 2, 2112, 2048, 4)
    out, n = counted("InvokeAI-cpu", lambda: c.cross_attention(q, k, v, 2, 0.5, 1))
    assert n == 2
    assert (out.double() - ref).abs().max().item() < 1e-5


def test_invokeai_cuda_rule_is_free_over_3_3():
    c = CONTENDERS["InvokeAI-cuda"]
    free = 3.3 * 16 * (1 << 20)  # a 16 MiB largest tensor
    assert c.slices(info(2, 2048, 1024, 4, free)) == 1  # 16 MiB of scores
    assert c.slices(info(2, 2048, 2048, 4, free)) == 2  # 32 MiB
    assert c.slices(info(2, 2048, 2048, 4, free * 2)) == 1
    # 32 MiB of scores: the divisor is 1 << int(31 / limit).bit_length(), so a limit above 31 MiB still runs
    # one chunk (through the sliced path), one below 31 MiB two
    assert W.invokeai_tensor_plan(2, 2048, 2048, 4, 31.5) == ("heads", 2)
    assert c.slices(info(2, 2048, 2048, 4, 3.3 * 31.5 * (1 << 20))) == 1
    assert c.slices(info(2, 2048, 2048, 4, 3.3 * 30.9 * (1 << 20))) == 2
    q, k, v, _ = projections(1, 2, 2048, 2048, 4)
    assert counted("InvokeAI-cuda", lambda: c.cross_attention(q, k, v, 2, 0.5, free))[1] == 2


def test_invokeai_mps_rules():
    # v1 (32 GiB or more, batch*heads not a multiple of 32, fewer than 2^18 rows), then v2
    assert W.invokeai_mps_plan(8, 8192, 64) == ("none", 0)  # 2^16 rows
    assert W.invokeai_mps_plan(8, 8193, 64) == ("queries", math.floor(2**30 / (8 * 8193)))
    assert W.invokeai_mps_plan(16, 16384, 64) == ("heads", 1)  # 2^18 rows: v2, over 2^16
    assert W.invokeai_mps_plan(32, 1024, 64) == ("none", 0)  # multiple of 32: v2
    assert W.invokeai_mps_plan(8, 8192, 8) == ("heads", 1)  # v2 needs more than 8 GiB
    assert W.invokeai_mps_plan(2, 32768, 16) == ("none", 0)
    assert W.invokeai_mps_plan(2, 32769, 16) == ("heads", 1)
    assert W.invokeai_mps_plan(4, 2**15, 32) == ("queries", 8191)  # 2^30 / 2^17 rows = 8192: never a multiple of 4096


def test_sub_quadratic_fast_path_when_the_scores_fit_0_7_of_free():
    """Scores of 2 x 4 x 300 fp32 = 9600 bytes: threshold 9600 skips kv chunking; 9599 makes kv chunks of
    9599 // (2 x 4 x 16) = 74 tokens (above isqrt(300) = 17), 5 of them."""
    c = CONTENDERS["sub-quadratic"]
    fits, short = 13715, 13713  # int(0.7 x free) = 9600 and 9599
    assert int(fits * 0.7) == score_bytes(2, 4, 300) and int(short * 0.7) == score_bytes(2, 4, 300) - 1
    assert c.slices(info(2, 4, 300, 8, fits)) == 1
    assert c.slices(info(2, 4, 300, 8, short)) == 5
    q, k, v, ref = projections(1, 2, 4, 300, 8)
    assert counted("sub-quadratic", lambda: c.cross_attention(q, k, v, 2, 0.5, fits))[1] == 1
    out, n = counted("sub-quadratic", lambda: c.cross_attention(q, k, v, 2, 0.5, short))
    assert n == 5
    assert (out.double() - ref).abs().max().item() < 1e-5


def test_sub_quadratic_query_chunks_do_not_follow_free_memory():
    c = CONTENDERS["sub-quadratic"]
    for free in (1 << 28, 1 << 30, AMPLE):
        assert c.slices(info(16, 4096, 4096, 40, free)) == 4  # 1024-token query chunks, kv unchunked
    # at small free memory the key/value chunks grow from isqrt(k_tokens) to the threshold's minimum
    assert W.subquad_chunks(16, 4096, 4096, 40, 40, 4, 1 << 20, "cpu").kv_chunk_size_min == int(0.7 * (1 << 20)) // (
        16 * 4 * 80
    )
    assert c.slices(info(16, 4096, 4096, 40, 1 << 20)) == 4 * math.ceil(4096 / 143)
    assert W.subquad_chunks(1, 10, 10, 8, 8, 4, 0, "mps").kv_chunk_size_min is not None  # fixed MPS threshold


def test_v1_slices_two_rows_of_batch_heads():
    c = CONTENDERS["V1"]
    assert c.slices(info(16, 4096, 4096, 40, 1)) == 8
    assert c.slices(info(5, 10, 10, 8, AMPLE)) == 3
    q, k, v, _ = projections(1, 5, 10, 10, 8)
    assert counted("V1", lambda: c.cross_attention(q, k, v, 5, 8**-0.5, 1))[1] == 3


SLICE_CASES = [
    # (batch, heads, q_tokens, k_tokens, head_dim, free as a fraction of the score bytes)
    (1, 2, 1100, 77, 8, None),
    (1, 2, 1100, 77, 8, 0.4),
    (2, 3, 300, 300, 8, 0.01),
    (1, 4, 2200, 150, 4, 0.001),
    (1, 3, 700, 700, 8, 1e-5),
    (1, 1, 97, 97, 8, 0.02),
]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", SLICE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_slices_match_the_chunks_really_run(name, case):
    """``slices()`` equals the chunk calls the cross-attention makes (and raises where it raises)."""
    batch, heads, nq, nk, d, fraction = case
    free = AMPLE if fraction is None else max(1, int(score_bytes(batch * heads, nq, nk) * fraction))
    c = CONTENDERS[name]
    q, k, v, _ = projections(batch, heads, nq, nk, d)
    try:
        expected = c.slices(info(batch * heads, nq, nk, d, free))
    except (RuntimeError, ValueError) as exc:
        with pytest.raises(type(exc)):
            c.cross_attention(q, k, v, heads, d**-0.5, free)
        return
    assert counted(name, lambda: c.cross_attention(q, k, v, heads, d**-0.5, free))[1] == expected


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("hw,fraction", [((16, 16), None), ((16, 16), 0.1), ((16, 16), 0.004), ((12, 11), 0.1)])
def test_vae_slices_match_the_chunks_really_run(name, hw, fraction):
    n = hw[0] * hw[1]
    free = AMPLE if fraction is None else int(score_bytes(1, n, n) * fraction)
    c = CONTENDERS[name]
    expected = c.slices(info(1, n, n, 8, free, vae=True))
    if c.attn_block is None:
        assert expected == 1  # the stock AttnBlock runs
        return
    q, k, v, _ = conv_outputs(1, 8, *hw)
    assert counted(name, lambda: c.attn_block(q, k, v, free))[1] == expected


# --- against the real webui ------------------------------------------------------------------------------------

WEBUI_DIR = os.environ.get("WEBUI_DIR", "")
REAL_FILES = ("modules/sd_hijack_optimizations.py", "modules/sub_quadratic_attention.py")


def webui_dir() -> str:
    if not WEBUI_DIR:
        pytest.skip(
            "WEBUI_DIR is not set: point it at a stable-diffusion-webui 1.10.1 checkout to compare the "
            "re-implementations with the real functions"
        )
    missing = [f for f in REAL_FILES if not os.path.isfile(os.path.join(WEBUI_DIR, f))]
    if missing:
        pytest.fail(f"WEBUI_DIR={WEBUI_DIR} is not a webui checkout: {', '.join(missing)} missing")
    return WEBUI_DIR


@pytest.fixture(scope="module")
def real():
    return {c.name: c for c in R.from_webui(webui_dir())}


def test_loading_the_webui_leaves_sys_modules_as_it_was():
    before = {k: v for k, v in sys.modules.items() if k == "modules" or k.startswith(("modules.", "sgm"))}
    contenders = R.from_webui(webui_dir())
    after = {k: v for k, v in sys.modules.items() if k == "modules" or k.startswith(("modules.", "sgm"))}
    assert before == after
    assert [c.name for c in contenders] == NAMES
    assert all(c.label.startswith("webui (real): ") for c in contenders)


def test_sub_quad_defaults_come_from_the_checkout():
    assert R.read_sub_quad_defaults(webui_dir()) == {
        "sub_quad_q_chunk_size": W.SUBQUAD_Q_CHUNK,
        "sub_quad_kv_chunk_size": W.SUBQUAD_KV_CHUNK,
        "sub_quad_chunk_threshold": W.SUBQUAD_THRESHOLD,
    }


REAL_CROSS = [(2, 3, 50, 23, 8), (1, 5, 1100, 77, 8), (2, 8, 64, 64, 16), (1, 2, 4, 300, 8)]
FRACTIONS = [None, 0.4, 0.05, 0.004, 1e-4]


def run_or_error(call):
    try:
        return call()
    except Exception as exc:  # the real code may raise (Doggettx past 64 steps, range() step 0): compare that too
        return exc


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", REAL_CROSS, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fraction", FRACTIONS)
def test_cross_attention_matches_the_real_webui(real, name, shape, fraction):
    batch, heads, nq, nk, d = shape
    free = AMPLE if fraction is None else max(1, int(score_bytes(batch * heads, nq, nk) * fraction))
    q, k, v, _ = projections(batch, heads, nq, nk, d, seed=1)
    ours, our_count = counted(
        name, lambda: run_or_error(lambda: CONTENDERS[name].cross_attention(q, k, v, heads, 0.3, free))
    )
    theirs, their_count = counted(
        name, lambda: run_or_error(lambda: real[name].cross_attention(q, k, v, heads, 0.3, free))
    )
    if isinstance(theirs, Exception) or isinstance(ours, Exception):
        assert type(ours) is type(theirs), (ours, theirs)
        return
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-6), (ours - theirs).abs().max()
    assert our_count == their_count
    assert real[name].slices(info(batch * heads, nq, nk, d, free)) == their_count


@pytest.mark.parametrize("name", ["sdp", "sdp-no-mem", "Doggettx", "sub-quadratic"])
@pytest.mark.parametrize("shape", [(1, 16, 6, 8), (2, 8, 6, 7), (1, 8, 40, 30)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fraction", [None, 0.3, 0.01, 1e-7])
def test_attn_block_matches_the_real_webui(real, name, shape, fraction):
    b, c, h, w = shape
    free = AMPLE if fraction is None else max(1, int(score_bytes(b, h * w, h * w) * fraction))
    q, k, v, _ = conv_outputs(b, c, h, w, seed=2)
    ours, our_count = counted(name, lambda: CONTENDERS[name].attn_block(q, k, v, free))
    theirs, their_count = counted(name, lambda: real[name].attn_block(q, k, v, free))
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-6), (ours - theirs).abs().max()
    assert our_count == their_count
    assert real[name].slices(info(b, h * w, h * w, c, free, vae=True)) == their_count


LARGE = [
    info(16, 26569, 26569, 40, (16 * 26569 * 26569 * 4) * 2.5 / 16),
    info(16, 26569, 26569, 40, 8 << 30),
    info(16, 4096, 77, 40, 1 << 20),
    info(20, 9216, 9216, 64, 1 << 28, es=2),
    info(16, 3077, 3000, 40, 1 << 24),
    info(40, 16384, 16384, 64, 6 << 30, es=2),
    info(1, 26569, 26569, 512, 1 << 30, vae=True),
    info(1, 16384, 16384, 512, 1 << 28, vae=True),
    info(1, 4096, 4096, 512, 1 << 20, vae=True, es=2),
]


@pytest.mark.parametrize("case", LARGE, ids=lambda i: f"{i['batch_heads']}x{i['q_tokens']}x{i['k_tokens']}-{i['vae']}")
def test_slices_match_the_real_webui_at_full_size(real, case):
    """The real functions run on meta tensors (no memory) at SD sizes: same slice counts, same errors."""
    for name in NAMES:
        ours, theirs = (
            run_or_error(lambda name=name: CONTENDERS[name].slices(case)),
            run_or_error(lambda name=name: real[name].slices(case)),
        )
        if isinstance(ours, Exception) or isinstance(theirs, Exception):
            assert type(ours) is type(theirs), (name, ours, theirs)
        else:
            assert ours == theirs, name


def test_real_einsum_op_on_cpu_applies_the_32_mib_rule():
    """The webui's own dispatcher (not our routing) on CPU tensors: what InvokeAI-cpu re-implements."""
    mod = R.load_webui_attention(webui_dir())
    for bh, nq, nk in [(2, 2048, 2048), (2, 2112, 2048), (1, 4096, 2100)]:
        g = torch.Generator().manual_seed(3)
        q, k, v = (torch.randn(bh, n, 4, generator=g) for n in (nq, nk, nk))
        theirs, their_count = counted("InvokeAI-cpu", lambda q=q, k=k, v=v: mod.einsum_op(q, k, v))
        ours, our_count = counted("InvokeAI-cpu", lambda q=q, k=k, v=v: W.invokeai_einsum_op(q, k, v, "cpu", 1, 0))
        assert our_count == their_count
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-6)


def test_real_einsum_op_cuda_uses_free_over_3_3(monkeypatch):
    """``einsum_op_cuda`` with torch's CUDA probes answered by hand: driver free + reserved - active, / 3.3."""
    mod = R.load_webui_attention(webui_dir())
    stats = {"active_bytes.all.current": 3 << 20, "reserved_bytes.all.current": 5 << 20}
    for driver_free in (10 << 20, int(3.3 * 14 * (1 << 20)), 100 << 20):
        monkeypatch.setattr(torch.cuda, "memory_stats", lambda device=None: stats)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, f=driver_free: (f, 1 << 40))
        free = driver_free + (2 << 20)
        for bh, nq, nk in [(2, 2048, 1024), (2, 2048, 2048), (1, 1024, 700)]:
            q, k, v = (torch.randn(bh, n, 4) for n in (nq, nk, nk))
            _, their_count = counted("InvokeAI-cuda", lambda q=q, k=k, v=v: mod.einsum_op_cuda(q, k, v))
            assert CONTENDERS["InvokeAI-cuda"].slices(info(bh, nq, nk, 4, free)) == their_count


@pytest.mark.parametrize("mem_total_gb", [8, 16, 32, 64])
def test_invokeai_mps_rules_match_the_real_webui(mem_total_gb):
    """``einsum_op_mps_v1``/``_v2`` on meta tensors, with the module's total-RAM figure set by hand."""
    mod = R.load_webui_attention(webui_dir())
    mod.mem_total_gb = mem_total_gb
    for bh, nq in [(8, 8192), (8, 8193), (16, 16384), (32, 1024), (2, 65536), (5, 20000), (3, 40000)]:
        q = torch.empty(bh, nq, 4, device="meta")
        k = v = torch.empty(bh, 7, 4, device="meta")
        with R.ChunkCounter("softmax") as counter:
            if mem_total_gb >= 32 and bh % 32 != 0 and bh * nq < 2**18:
                mod.einsum_op_mps_v1(q, k, v)
            else:
                mod.einsum_op_mps_v2(q, k, v)
        how, size = W.invokeai_mps_plan(bh, nq, mem_total_gb)
        expected = 1 if how == "none" else len(range(0, bh if how == "heads" else nq, size))
        assert counter.count == expected, (bh, nq)
