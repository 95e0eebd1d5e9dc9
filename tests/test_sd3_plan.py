"""SD3 planned: its joint site and VAE, its weights per part, the MMDiT's activation model, its sizes, its passes.

The activation model (lib_memslice/activations.py ``MMDIT``) was fitted on the webui's own MMDiT; here it is checked
at sizes, prompt lengths and a width it was not fitted on, against the webui's classes when WEBUI_DIR is set and
against their fake (tests/fakes, the same tensors live at the same moments) always. diffusers' stand-in checks the
results of a whole model routed through memslice (skipped where the stack's diffusers predates SD3).
"""

from __future__ import annotations

import importlib
import json
import os

import pytest
import torch

from lib_memslice import activations, cli, kernels
from lib_memslice.api import job_fits
from lib_memslice.costs import GiB
from lib_memslice.forwards import BasicHost
from lib_memslice.job_plan import make_job, max_square, passes, plan_job
from lib_memslice.joint import _sdpa, make_joint_attention
from lib_memslice.models import BUILTIN, JOINT, SD3_WEIGHTS, WEIGHTS
from lib_memslice.settings import Settings
from memslice_tools import sd3_standin
from memslice_tools.fit_activations import EINSUM

WEBUI_DIR = os.environ.get("WEBUI_DIR", "")
SD3 = BUILTIN["sd3"]
cuda_fp16 = kernels.kernels_for_job("cuda", torch.float16, torch.float16)


def sd3_job(width=1024, height=1024, batch=1, memory=12 * GiB, **model):
    return make_job(SD3, "sd3", width, height, batch, memory, Settings(), element_size=2, device_kind="cuda", **model)


# --- the model -----------------------------------------------------------------------------------------------


def test_the_spec_is_sd3_medium_as_the_webui_builds_it():
    joint = next(s for s in SD3.sites if s.name == JOINT)
    vae = next(s for s in SD3.sites if s.name == "vae.mid")
    assert (joint.heads, joint.head_dim, joint.count, joint.vae) == (24, 64, 24, False)
    assert (vae.heads, vae.head_dim, vae.count, vae.vae) == (1, 512, 2, True)  # the SD/SDXL VAE's geometry
    assert (SD3.latent_channels, SD3.context_dim, SD3.prompt_tokens, SD3.cut_to, SD3.max_side) == (16, 4096, 154, 16,
                                                                                                     3072)  # fmt: skip
    assert WEIGHTS["sd3"] is SD3_WEIGHTS and SD3_WEIGHTS.t5 == 4_762_310_657


def test_the_mmdits_weights_are_diffusers_sd3_transformers():
    """SD3 Medium's MMDiT on the meta device: diffusers' SD3Transformer2DModel at the Medium config has the webui's
    parameters (a checkpoint converts one to one) and its 192 x 192 ``pos_embed`` buffer."""
    if not sd3_standin.has_sd3():
        pytest.skip("this stack's diffusers predates SD3Transformer2DModel (0.29+)")
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        model = SD3Transformer2DModel(sample_size=128, num_layers=24, num_attention_heads=24, attention_head_dim=64,
                                      caption_projection_dim=1536, pos_embed_max_size=192)  # fmt: skip
    counted = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    assert counted == SD3_WEIGHTS.unet


def real_sd3():
    if not WEBUI_DIR:
        pytest.skip("WEBUI_DIR is not set: point it at a stable-diffusion-webui 1.10.1 checkout")
    return sd3_standin.load_webui_sd3(WEBUI_DIR)


def test_every_parts_weights_are_the_webuis_modules():
    """With WEBUI_DIR: the webui's MMDiT (as BaseModel builds SD3 Medium's) and SDVAE counted on the meta device;
    CLIP-L/G and T5 from the same files' fixed configs (``sd3_cond.py``) are the published towers."""
    mmdit, sd3_impls = real_sd3()
    with torch.device("meta"):
        context = {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 1536}}
        model = mmdit.MMDiT(input_size=None, pos_embed_scaling_factor=None, pos_embed_offset=None,
                            pos_embed_max_size=192, patch_size=2, in_channels=16, depth=24, num_patches=192 * 192,
                            adm_in_channels=2048, context_embedder_config=context)  # fmt: skip
        vae = sd3_impls.SDVAE()
    assert sum(p.numel() for p in model.parameters()) + model.pos_embed.numel() == SD3_WEIGHTS.unet
    assert sum(p.numel() for p in vae.parameters()) == SD3_WEIGHTS.vae
    with open(os.path.join(WEBUI_DIR, "modules", "models", "sd3", "sd3_cond.py")) as f:
        cond = f.read()
    for fact in ('"hidden_size": 1280', '"num_hidden_layers": 32', '"hidden_size": 768', '"num_hidden_layers": 12',
                 '"d_model": 4096', '"num_layers": 24', '"d_ff": 10240', '"vocab_size": 32128'):  # fmt: skip
        assert fact in cond, fact


# --- the MMDiT's activations ---------------------------------------------------------------------------------------


def fake_mmdit_module(webui):
    return importlib.import_module("modules.models.sd3.mmdit")


#: (width, height, text tokens, heads): sizes, prompt lengths and a width not in the fit (256x256 and 512x384 with
#: 154 and 308 text tokens at 2-4 heads)
UNFITTED = [(320, 448, 154, 3), (512, 512, 462, 2), (448, 320, 154, 5)]


def check_activation_model(mmdit, dtype):
    for width, height, text, heads in UNFITTED:
        model = sd3_standin.build_mmdit(mmdit, heads, patches=48, dtype=dtype)
        for settings in (sd3_standin.AMPLE, EINSUM):
            m = sd3_standin.measure(mmdit, model, width, height, text_tokens=text, settings=settings)
            predicted = sd3_standin.predicted(activations.MMDIT[m.element_size], m)
            ratio = predicted / m.peak_bytes
            assert 1.0 <= ratio <= 1.15, (width, height, text, heads, dtype, settings.kernel, ratio)
            live = activations.mmdit_live_bytes(width, height, m.batch, m.element_size, text_tokens=text,
                                                hidden=m.hidden)[JOINT]  # fmt: skip
            assert 1.0 <= live / m.live_bytes <= 1.15


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_mmdit_activation_model_holds_where_it_was_not_fitted_on_the_fake(webui, dtype):
    check_activation_model(fake_mmdit_module(webui), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_mmdit_activation_model_holds_where_it_was_not_fitted_on_the_webuis_mmdit(dtype):
    mmdit, _ = real_sd3()
    check_activation_model(mmdit, dtype)


def check_vae_model(sd3_impls, dtype):
    """SD3's own VAE decode and encode at sizes and a width not in the fit (ch 32/64 at 256x256, 320x192, 192x320):
    the pass's peak as the planner combines it (activations, or what is live at the mid block's attention plus its
    transient) within 1.00-1.15x the tracker's, memslice's AttnBlock forward in place, half precision under CUDA
    autocast as ``SDVAE.decode``/``encode`` run it (emulated on the CPU)."""
    import contextlib

    from lib_memslice.forwards import make_attnblock_forward
    from memslice_tools.fit_activations import _without_gemm_scratch, cuda_autocast_on_cpu
    from memslice_tools.memtrack import PeakTracker

    host = BasicHost(sd3_standin.AMPLE)
    saved = sd3_impls.AttnBlock.forward
    sd3_impls.AttnBlock.forward = make_attnblock_forward("auto", host)
    es, ch = torch.finfo(dtype).bits // 8, 96
    try:
        for kind, net in (("vae_decode", sd3_impls.VAEDecoder(ch=ch)), ("vae_encode", sd3_impls.VAEEncoder(ch=ch))):
            net = net.eval().to(dtype)
            for w, h in ((320, 256), (256, 384)):
                x = (torch.randn(1, 16, h // 8, w // 8) if kind == "vae_decode" else torch.randn(1, 3, h, w)).to(dtype)
                cast = cuda_autocast_on_cpu(net, dtype) if dtype != torch.float32 else contextlib.nullcontext()
                host.stats.start_job()
                with torch.no_grad(), cast, _without_gemm_scratch(), PeakTracker() as tracker:  # the input exists
                    out = net(x)
                    del out
                peak, live = activations.sd3_vae_bytes(kind, w, h, 1, es, channels=ch)
                transient = activations.attention_peaks(host.stats.recent())
                ratio = activations.pass_peak_bytes(peak, transient, live) / tracker.peak
                assert 1.0 <= ratio <= 1.15, (kind, w, h, dtype, ratio)
    finally:
        sd3_impls.AttnBlock.forward = saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sd3s_vae_model_holds_where_it_was_not_fitted_on_the_fake(webui, dtype):
    check_vae_model(importlib.import_module("modules.models.sd3.sd3_impls"), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sd3s_vae_model_holds_where_it_was_not_fitted_on_the_webuis_classes(dtype):
    _, sd3_impls = real_sd3()
    check_vae_model(sd3_impls, dtype)


def test_the_fake_mmdit_is_the_webuis_to_the_bit_and_calls_attention_as_it_does(webui):
    """With WEBUI_DIR: the same weights in the fake and the real MMDiT give the same output; the real one looks the
    module global ``attention`` up once per joint block, q/k 3-D, v 4-D, the prompt first; the fake the same."""
    real, real_impls = real_sd3()
    fake = fake_mmdit_module(webui)
    fake_impls = importlib.import_module("modules.models.sd3.sd3_impls")
    theirs, ours = sd3_standin.build_mmdit(real, 2, patches=16), sd3_standin.build_mmdit(fake, 2, patches=16)
    ours.load_state_dict(theirs.state_dict())
    x, t, y, context = sd3_standin.mmdit_inputs(192, 128, 2)
    calls = {}
    for name, module, model in (("real", real, theirs), ("fake", fake, ours)):
        seen = calls[name] = []

        def spy(q, k, v, heads, mask=None, seen=seen, module=module):
            seen.append((tuple(q.shape), tuple(k.shape), tuple(v.shape), heads, mask))
            return _sdpa(q, k, v, heads, mask)

        saved, module.attention = module.attention, spy
        try:
            with torch.no_grad():
                calls[name + "_out"] = model(x, t, y=y, context=context)
        finally:
            module.attention = saved
    assert calls["real"] == calls["fake"] == [((2, 154 + 96, 128), (2, 250, 128), (2, 250, 2, 64), 2, None)] * 2
    assert torch.equal(calls["real_out"], calls["fake_out"])
    theirs_vae, ours_vae = real_impls.VAEDecoder(ch=32), fake_impls.VAEDecoder(ch=32)
    ours_vae.load_state_dict(theirs_vae.state_dict())
    z = torch.randn(1, 16, 12, 10)
    with torch.no_grad():
        assert torch.equal(theirs_vae(z), ours_vae(z))
    block = real_impls.AttnBlock(64)
    fake_block = fake_impls.AttnBlock(64)
    fake_block.load_state_dict(block.state_dict())
    h = torch.randn(1, 64, 8, 6)
    with torch.no_grad():
        assert torch.equal(block(h), fake_block(h))


def test_a_tiny_diffusers_sd3_transformer_routed_through_memslice_equals_the_stock_model():
    """diffusers' stand-in with its joint attention made as the webui makes it (v 4-D and 3-D), through memslice's
    function under a budget that slices every call, against diffusers' own processor."""
    if not sd3_standin.has_sd3():
        pytest.skip("this stack's diffusers predates SD3Transformer2DModel (0.29+)")
    model = sd3_standin.build_standin(2, depth=2, patches=16)
    given = sd3_standin.standin_inputs(256, 192, 2, 308)
    with torch.no_grad():
        stock = model(**given, return_dict=False)[0]
    for v_4d in (True, False):
        host = BasicHost(Settings(budget_gb=1 / 1024, kernel="einsum"))  # 1 MiB: a whole call (4 x 500^2) is 4 MiB
        sd3_standin.route(model, make_joint_attention("auto", host), v_4d=v_4d)
        with torch.no_grad():
            routed = model(**given, return_dict=False)[0]
        records = host.stats.recent()
        assert len(records) == 2 and all(r.slices > 1 and r.q_tokens == 192 + 308 for r in records)
        assert (routed - stock).abs().max().item() < 1e-4


# --- the job ---------------------------------------------------------------------------------------------------


def test_the_passes_are_named_for_the_mmdit_and_count_sd3s_inputs_and_weights():
    hires = sd3_job(hr_scale=1.5, hr_upscaler="image")
    assert [(p.name, p.kind, p.width, p.batch) for p in passes(hires)] == [
        ("MMDiT", "unet", 1024, 2), ("VAE decode", "vae_decode", 1024, 1),
        ("VAE encode (hires)", "vae_encode", 1536, 1), ("MMDiT (hires)", "unet", 1536, 2),
        ("VAE decode (hires)", "vae_decode", 1536, 1)]  # fmt: skip
    job = sd3_job()
    result = plan_job(job, cuda_fp16)
    mmdit, decode = result["passes"][:2]
    latent = 16 * 128 * 128 * 2
    assert mmdit["input_bytes"] == 2 * (latent + 154 * 4096 * 2) and decode["input_bytes"] == latent
    weights = (SD3_WEIGHTS.unet + SD3_WEIGHTS.vae + SD3_WEIGHTS.text) * 2
    assert mmdit["weight_bytes"] == weights  # T5 off: the webui's default
    with_t5 = plan_job(sd3_job(t5=True), cuda_fp16)["passes"][0]
    assert with_t5["weight_bytes"] == weights + SD3_WEIGHTS.t5 * 2
    assert mmdit["activation_bytes"] == activations.mmdit_activation_bytes(1024, 1024, 2, 2)
    assert decode["activation_bytes"] == activations.sd3_vae_bytes("vae_decode", 1024, 1024, 1, 2)[0]  # SD3's own
    joint = next(r for r in result["layers"] if r["site"] == JOINT and r["pass"] == "MMDiT")
    assert (joint["batch_heads"], joint["q_tokens"], joint["k_tokens"], joint["layers"]) == (48, 4250, 4250, 24)
    assert decode["bands"] == 0 and not decode["bands_reason"]  # SD3's own VAE classes are not banded
    chunks = plan_job(sd3_job(prompt_chunks=2), cuda_fp16)
    assert next(r for r in chunks["layers"] if r["site"] == JOINT)["q_tokens"] == 4096 + 308


def test_the_first_pass_is_cut_to_16_px_as_the_webui_cuts_it():
    job = sd3_job(1000, 1030, hr_scale=2)
    assert (job.width, job.height, job.hires) == (992, 1024, (1984, 2048))


def test_the_largest_square_is_a_multiple_of_16_and_a_boundary():
    """Without a fused kernel (fp32 on a CPU-like device), in 24 GiB: the largest square first-pass size is a
    multiple of 16 at which the job fits, and 16 px more does not."""
    einsum = kernels.kernels_for_job("mps", torch.float16, torch.float16)
    job = make_job(SD3, "sd3", 1024, 1024, 1, 24 * GiB, Settings(), element_size=2, device_kind="mps")
    side = max_square(job, einsum)
    assert side % 16 == 0 and 1024 < side < 3072
    assert plan_job(make_job(SD3, "sd3", side, side, 1, 24 * GiB, Settings(), element_size=2, device_kind="mps"),
                    einsum)["fits"]  # fmt: skip
    bigger = make_job(SD3, "sd3", side + 16, side + 16, 1, 24 * GiB, Settings(), element_size=2, device_kind="mps")
    assert not plan_job(bigger, einsum)["fits"]


def test_past_3072_px_the_mmdit_does_not_take_it_and_the_largest_size_stops_there():
    result = plan_job(sd3_job(3072, 3088, memory=1 << 40), cuda_fp16)
    assert result["verdict"] == "does not fit" and result["limit"] == "MMDiT"
    assert "takes at most 3072 px a side" in result["advice"]
    assert plan_job(sd3_job(3072, 3072, memory=1 << 40), cuda_fp16)["fits"]
    assert max_square(sd3_job(memory=1 << 40), cuda_fp16) == 3072


def test_the_vae_setting_off_plans_sd3s_own_vae_attention_as_one_sdpa_call():
    job = make_job(SD3, "sd3", 1024, 1024, 1, 12 * GiB, Settings(vae="off"), element_size=2, device_kind="cuda")
    row = next(r for r in plan_job(job, cuda_fp16)["layers"] if r["site"] == "vae.mid")
    assert row["kernel_used"] == "fused" and row["slices"] == 1


# --- the CLI and the Python API ----------------------------------------------------------------------------------


def test_plan_model_sd3_gives_a_verdict_and_the_largest_square(capsys):
    args = ["plan", "--model", "sd3", "--width", "1024", "--height", "1024", "--memory", "12GiB", "--device", "cuda",
            "--json"]  # fmt: skip
    assert cli.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "sd3" and out["verdict"] == "fits" and out["limit"]
    assert 1024 <= out["max_square_resolution"] <= 3072 and out["max_square_resolution"] % 16 == 0
    assert [p["name"] for p in out["passes"]] == ["MMDiT", "VAE decode"]
    assert cli.main([*args[:-1], "--t5", "--memory", "8GiB", "--json"]) == 1  # 8.9 GiB of T5 alone
    assert json.loads(capsys.readouterr().out)["verdict"] == "does not fit"
    assert cli.main(args[:-1]) == 0
    text = capsys.readouterr().out
    assert "Stable Diffusion 3 Medium" in text and "mmdit.joint" in text


def test_job_fits_plans_sd3():
    plan = job_fits(1024, 1024, model="sd3", memory_bytes=12 * GiB, device="cuda")
    assert plan.verdict == "fits" and plan.max_square_resolution % 16 == 0 and plan.passes[0].name == "MMDiT"
    assert not job_fits(1024, 1024, model="sd3", memory_bytes=4 * GiB, device="cuda").fits  # 5.6 GiB of weights


def test_sd3s_activation_model_is_not_the_unets():
    with pytest.raises(ValueError):
        activations.unet_activation_bytes("sd3", 512, 512, 2, 2)
    assert "sd3" in activations.MMDITS
