"""The whole-job planner: the passes the webui runs, the weights they keep, and answers that hold together."""

from __future__ import annotations

import contextlib
import io
from dataclasses import replace

import pytest
import torch

from lib_memslice import activations, kernels
from lib_memslice.costs import GiB, MiB
from lib_memslice.job_plan import (
    ALLOCATOR_OVERHEAD,
    Job,
    hires_size,
    hires_sizes,
    max_square,
    passes,
    plan_job,
    plan_pass,
    weight_bytes,
)
from lib_memslice.models import BUILTIN, WEIGHTS, clip_text_parameters


def builtin_job(model, width, height, **kwargs):
    """A Job for a built-in model (its activation model is the model's own name)."""
    return Job(BUILTIN[model], model, width, height, **kwargs)


def cuda_kernels(site, element_size):
    dtype = torch.float16 if element_size == 2 else torch.float32
    return kernels.expected_kernels("cuda", dtype, site.head_dim, "auto")


def einsum_only(site, element_size):
    return (kernels.einsum_kernel("cuda", torch.float16 if element_size == 2 else torch.float32),)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, ["UNet", "VAE decode"]),
        ({"hires": (1024, 1024)}, ["UNet", "UNet (hires)", "VAE decode (hires)"]),
        ({"hires": (1024, 1024), "hires_upscaler": "image"},
         ["UNet", "VAE decode", "VAE encode (hires)", "UNet (hires)", "VAE decode (hires)"]),
        ({"img2img": True}, ["VAE encode", "UNet", "VAE decode"]),
    ],
)  # fmt: skip
def test_the_passes_come_in_the_webuis_order(options, expected):
    job = builtin_job("sd15", 512, 512, batch=3, memory_bytes=8 * GiB, **options)
    found = passes(job)
    assert [p.name for p in found] == expected
    assert all(p.batch == (6 if p.kind == "unet" else 1) for p in found)  # cond + uncond; decode one at a time


def test_hires_sizes_follow_the_webui():
    assert hires_size(512, 768, 2.0, None, None) == (1024, 1536)
    assert hires_size(512, 768, 1.5, None, None) == (768, 1152)
    assert hires_size(512, 768, 2.0, 1024, None) == (1024, 1536)  # one side: the aspect ratio is kept
    assert hires_size(512, 768, 2.0, None, 1000) == (666, 1000)
    # both: upscaled to cover the target (the image upscaler's encode runs there), the latent cropped to it, in
    # whole latent pixels (900 px: a 1350 px cover's 168 latent rows less (1350 - 900) // 8 = 56 cropped: 896)
    assert hires_size(512, 768, 2.0, 900, 900) == (896, 896)
    assert hires_sizes(512, 768, None, 1024, 1024) == ((1024, 1024), (1024, 1536))
    assert hires_sizes(768, 512, None, 1024, 1024) == ((1024, 1024), (1536, 1024))
    assert hires_size(512, 512, 1.0, None, None) is None


def test_published_weights_match_the_real_modules():
    """UNet and VAE parameter counts, counted off ldm's own modules built on the meta device."""
    with contextlib.redirect_stdout(io.StringIO()):
        from ldm.modules.diffusionmodules.model import Decoder, Encoder
        from ldm.modules.diffusionmodules.openaimodel import UNetModel

        from memslice_tools.configs import SD15_DECODER, SD15_UNET
        from memslice_tools.sdxl_unet import build_sdxl_unet

        def count(module):
            return sum(p.numel() for p in module.parameters())

        with torch.device("meta"):
            sd2 = {**SD15_UNET, "num_heads": -1, "num_head_channels": 64, "context_dim": 1024,
                   "use_linear_in_transformer": True}  # fmt: skip
            assert count(UNetModel(**SD15_UNET)) == WEIGHTS["sd15"].unet
            assert count(UNetModel(**sd2)) == WEIGHTS["sd2"].unet
            assert count(build_sdxl_unet()) == WEIGHTS["sdxl"].unet
            vae = count(Encoder(**SD15_DECODER)) + count(Decoder(**SD15_DECODER)) + (8 * 8 + 8) + (4 * 4 + 4)
            assert vae == WEIGHTS["sd15"].vae
    assert clip_text_parameters(49408, 768, 12, 3072) == 123_060_480  # openai/clip-vit-large-patch14's text model


def test_weights_resident_by_default_and_per_module_with_medvram():
    job = builtin_job("sdxl", 1024, 1024, batch=1, memory_bytes=12 * GiB, element_size=2)
    w = WEIGHTS["sdxl"]
    assert weight_bytes(job, "unet") == weight_bytes(job, "vae_decode") == 2 * (w.unet + w.vae + w.text)
    low = builtin_job("sdxl", 1024, 1024, batch=1, memory_bytes=12 * GiB, element_size=2, medvram=True)
    assert weight_bytes(low, "unet") == 2 * w.unet and weight_bytes(low, "vae_decode") == 2 * w.vae
    fp32_vae = builtin_job("sd15", 512, 512, batch=1, memory_bytes=8 * GiB, element_size=2, vae_element_size=4)
    assert (
        weight_bytes(fp32_vae, "unet") == 2 * WEIGHTS["sd15"].unet + 4 * WEIGHTS["sd15"].vae + 2 * WEIGHTS["sd15"].text
    )


def test_a_pass_is_weights_inputs_and_its_measured_peak():
    job = builtin_job("sd15", 768, 768, batch=1, memory_bytes=64 * GiB, element_size=2)
    unet = plan_pass(job, passes(job)[0], cuda_kernels)
    peak = activations.unet_activation_bytes("sd15", 768, 768, 2, 2)
    live = activations.unet_live_bytes("sd15", 768, 768, 2, 2)
    attention = {row["site"]: row["peak_bytes"] for row in unet["layers"]}
    assert unet["activation_bytes"] == peak
    tensors = unet["weight_bytes"] + unet["input_bytes"] + activations.pass_peak_bytes(peak, attention, live)
    assert unet["tensor_bytes"] == tensors
    assert unet["allocator_bytes"] == int(peak * ALLOCATOR_OVERHEAD["cuda"].high) > 0  # measured: activations only
    assert unet["total_bytes"] == tensors + unet["allocator_bytes"] and unet["verdict"] == "fits"
    assert unet["fits"] and all(row["slices"] == 1 and row["kernel_used"] == "fused" for row in unet["layers"])


@pytest.mark.parametrize("kernels_for", [cuda_kernels, einsum_only])
def test_a_pass_names_the_attention_live_at_its_peak(kernels_for):
    """The panel's bar: weights, inputs, other activations and the attention transient live at the pass's peak add up
    to its tensors. The transient is the one of the site whose call sets the peak, or 0 where the other activations
    peak elsewhere (a sliced or fused call: its largest transient is then not part of the peak)."""
    job = builtin_job("sd15", 1024, 1024, batch=1, memory_bytes=64 * GiB, element_size=2, slice_cap=1)
    seen = set()
    for p in passes(job):
        planned = plan_pass(job, p, kernels_for)
        peak = planned["tensor_bytes"] - planned["weight_bytes"] - planned["input_bytes"]
        at_peak = planned["attention_at_peak_bytes"]
        if at_peak == 0:
            assert peak == planned["activation_bytes"]
        else:
            live = (activations.unet_live_bytes("sd15", 1024, 1024, 2, 2) if p.kind == "unet"
                    else activations.vae_decode_live_bytes(1024, 1024, 1, 2))  # fmt: skip
            sites = [row["site"] for row in planned["layers"] if row["peak_bytes"] == at_peak]
            assert any(live[site] + at_peak == peak for site in sites) and peak > planned["activation_bytes"]
        seen.add(at_peak > 0)
    assert seen == ({False} if kernels_for is cuda_kernels else {False, True})  # the UNet's one-piece einsum binds


def test_attention_is_planned_for_what_its_call_finds_free():
    """Memory just above weights + activations: no fused kernel offered, einsum slices to fit what is left."""
    base = builtin_job("sd15", 1024, 1024, batch=1, memory_bytes=64 * GiB, element_size=2)
    unet = plan_pass(base, passes(base)[0], einsum_only)
    roomy = max(row["slices"] for row in unet["layers"])
    tight_memory = unet["weight_bytes"] + unet["input_bytes"] + unet["activation_bytes"] + 256 * MiB
    tight = builtin_job("sd15", 1024, 1024, batch=1, memory_bytes=tight_memory, element_size=2)
    planned = plan_pass(tight, passes(tight)[0], einsum_only)
    level0 = next(row for row in planned["layers"] if row["site"] == "unet.level0.self")
    assert planned["fits"] and level0["slices"] > roomy
    assert level0["room_bytes"] < 256 * MiB  # what is left at that moment, over the safety factor


def test_when_the_vae_decode_binds_the_advice_says_bands_not_slices():
    """With the VAE setting attention the hires decode's convolutions bind: the advice is the bands, not slicing;
    with auto the same decode runs in exact bands and the job fits."""
    job = builtin_job("sd15", 1024, 1024, batch=1, memory_bytes=8 * GiB, element_size=2, hires=(2048, 2048),
                      vae="attention")  # fmt: skip
    result = plan_job(job, cuda_kernels)
    assert not result["fits"] and result["limit"] == "VAE decode (hires)"
    assert "exact bands" in result["advice"] and "slice" not in result["advice"]
    unet = next(p for p in result["passes"] if p["name"] == "UNet (hires)")
    assert unet["fits"]
    banded = plan_job(replace(job, vae="auto"), cuda_kernels)
    assert banded["fits"] and banded["passes"][-1]["bands"] > 1


def test_when_attention_refuses_the_advice_is_its_own():
    job = builtin_job("sd15", 2048, 2048, batch=1, memory_bytes=3 * GiB, element_size=2, slice_cap=4)
    result = plan_job(job, einsum_only)
    assert not result["fits"] and result["limit"] == "UNet"
    assert "not enough memory for attention" in result["advice"]


@pytest.mark.parametrize(("model", "gib"), [("sd15", 4), ("sd15", 8), ("sdxl", 8), ("sdxl", 12)])
def test_the_largest_square_size_fits_and_one_step_more_does_not(model, gib):
    job = builtin_job(model, 512, 512, batch=1, memory_bytes=gib * GiB, element_size=2, hires=(1024, 1024))
    side = max_square(job, cuda_kernels)
    assert side > 0 and side % 64 == 0
    fits = plan_job(builtin_job(model, side, side, batch=1, memory_bytes=gib * GiB, element_size=2,
                                hires=(2 * side, 2 * side)), cuda_kernels)  # fmt: skip
    over = plan_job(builtin_job(model, side + 64, side + 64, batch=1, memory_bytes=gib * GiB, element_size=2,
                                hires=(2 * side + 128, 2 * side + 128)), cuda_kernels)  # fmt: skip
    assert fits["fits"] and not over["fits"]


def test_weights_alone_over_the_memory_fit_nothing():
    """SDXL's fp16 weights are 6.9 GB: in 6 GiB no size fits unless --medvram keeps only the UNet (5.1 GB)."""
    job = builtin_job("sdxl", 512, 512, batch=1, memory_bytes=6 * GiB, element_size=2)
    assert max_square(job, cuda_kernels) == 0
    assert max_square(builtin_job("sdxl", 512, 512, batch=1, memory_bytes=6 * GiB, element_size=2, medvram=True),
                      cuda_kernels) > 0  # fmt: skip


def test_the_job_json_names_every_pass_and_the_one_that_binds():
    result = plan_job(builtin_job("sdxl", 1024, 1024, batch=1, memory_bytes=6 * GiB, element_size=2), cuda_kernels)
    for p in result["passes"]:
        for key in ("name", "width", "height", "attention_bytes", "activation_bytes", "weight_bytes", "total_bytes",
                    "fits"):  # fmt: skip
            assert key in p
    assert result["limit"] in [p["name"] for p in result["passes"]]
    assert result["fits"] == all(p["fits"] for p in result["passes"])


def test_the_api_for_other_extensions_outside_the_webui():
    from lib_memslice.api import JobPlan, job_fits

    plan = job_fits(1024, 1024, hr_scale=2, model="sd15", memory_bytes=4 * GiB, device="cuda")
    assert isinstance(plan, JobPlan) and not plan.fits and plan.limit == "UNet (hires)"
    assert [p.name for p in plan.passes] == ["UNet", "UNet (hires)", "VAE decode (hires)"]
    assert plan.passes[-1].bands > 1  # the hires decode in exact bands
    assert plan.max_square_resolution == plan.details["max_square_resolution"] > 0
    assert job_fits(512, 512, model="sd15", memory_bytes=8 * GiB, device="cuda").fits


def test_the_api_inside_the_webui_plans_for_the_loaded_model(webui):
    from lib_memslice.api import job_fits

    plan = job_fits(512, 512, hr_scale=2, model="sd15")
    assert [p.name for p in plan.passes] == ["UNet", "UNet (hires)", "VAE decode (hires)"]
    assert "loaded" in plan.details["memory_source"] or plan.details["model_source"] == "named"


def test_upcast_previews_count_the_cast_copy_a_call_makes():
    """'Upcast cross attention layer to float32': the preview's fused kernel must count the float32 copy of q, k
    and v that the real call makes (choose_kernel's fused_input_copies), or the job plan understates it."""
    q = torch.randn(1, 2, 64, 40, dtype=torch.bfloat16)
    runtime = kernels.choose_kernel("auto", q, q, q, torch.float32)
    site = next(s for s in BUILTIN["sd15"].sites if s.name == "unet.level0.self")
    preview = kernels.kernels_for_job("cpu", torch.bfloat16, torch.bfloat16, "auto")(site, 4)[0]
    assert runtime.kind == preview.kind == "fused" and runtime.input_copies >= 1
    assert preview.input_copies == runtime.input_copies
    plain = kernels.kernels_for_job("cpu", torch.float32, torch.float32, "auto")(site, 4)[0]
    assert plain.input_copies == preview.input_copies - 1  # a float32 model's call: no cast copy


def _decode_row(result, name="VAE decode (hires)"):
    return next(row for row in result["layers"] if row["pass"] == name)


def test_the_vae_attention_is_planned_as_the_webui_runs_it():
    """With the VAE setting off the webui runs its stock VAE attention, in one piece and in whatever is free (no
    safety factor, no attention budget): the review's case, 768 px with hires x2 on an 8 GiB card, "fit" with
    memslice's sliced attention planned while ldm's stock attention alone took 5 GiB."""
    job = builtin_job("sd15", 768, 768, batch=1, memory_bytes=8 * GiB, element_size=2, hires=(1536, 1536))
    sliced, stock = plan_job(job, cuda_kernels), plan_job(replace(job, vae="off"), cuda_kernels)
    tokens = (1536 // 8) ** 2
    row = _decode_row(stock)
    assert row["kernel_used"] == "stock" and row["slices"] == 1
    assert row["peak_bytes"] == 2 * tokens * tokens * 2  # the scaled scores and their softmax, fp16
    assert _decode_row(sliced)["peak_bytes"] < row["peak_bytes"] // 40
    assert sliced["fits"] and stock["verdict"] != "fits" and stock["limit"] == "VAE decode (hires)"

    def unbanded(result):
        return [{k: v for k, v in p.items() if k != "bands_reason"} for p in result["passes"]]

    assert sliced["passes"][-1]["bands_reason"].startswith("fits untiled")  # auto: the same pass, run whole
    assert [p["bands"] for p in sliced["passes"]] == [0, 0, 0]
    assert unbanded(plan_job(replace(job, vae="attention"), cuda_kernels)) == unbanded(sliced)
    budget = plan_job(replace(job, vae="off", attention_budget=64 * MiB), cuda_kernels)
    assert (
        _decode_row(budget)["room_bytes"] == row["room_bytes"] > 64 * MiB
    )  # the budget is memslice's, not the webui's
    assert max_square(replace(job, vae="off"), cuda_kernels) < max_square(job, cuda_kernels)


def test_sdxls_stock_vae_attention_is_one_sdpa_call():
    """sgm's AttnBlock calls SDPA on the whole latent: the fused kernel where torch runs it, else its math path."""
    job = builtin_job("sdxl", 1024, 1024, batch=1, memory_bytes=64 * GiB, element_size=2, vae="off")
    fused = _decode_row(plan_job(job, cuda_kernels), "VAE decode")
    math_path = _decode_row(plan_job(job, einsum_only), "VAE decode")
    assert fused["kernel_used"] == "fused" and fused["slices"] == 1
    assert math_path["kernel_used"] == "sdpa-math" and math_path["slices"] == 1
    assert math_path["peak_bytes"] > 2 * (1024 // 8) ** 4 * 4  # the scores twice, in float32


def test_a_stock_vae_attention_that_does_not_fit_says_why():
    job = builtin_job("sd15", 2048, 2048, batch=1, memory_bytes=12 * GiB, element_size=2, vae="off")
    row = _decode_row(plan_job(job, cuda_kernels), "VAE decode")
    assert not row["fits"] and "VAE setting is off" in row["reason"] and "one piece" in row["reason"]
    assert "slice cap" not in row["reason"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_stock_vae_attentions_term_is_what_the_real_attnblock_allocates(dtype):
    """ldm's own AttnBlock.forward, measured (live tensors and the profiler's in-op replay): its peak beyond the
    norm's output and q, k, v is the cost model's stock term."""
    from ldm.modules.diffusionmodules.model import AttnBlock

    from lib_memslice.costs import AttentionShape, KernelChoice, peak_bytes
    from memslice_tools.inop import call_peak_bytes

    torch.manual_seed(0)
    channels, side = 32, 40
    block = AttnBlock(channels).to(dtype).eval()
    x = torch.randn(1, channels, side, side, dtype=dtype)
    tokens, size = side * side, x.element_size()
    with torch.no_grad():
        measured = call_peak_bytes(lambda: block(x)) - 4 * tokens * channels * size
    shape = AttentionShape(1, tokens, tokens, channels, element_size=size)
    predicted = peak_bytes(shape, 1, tokens, KernelChoice("stock"))
    assert predicted == measured or abs(predicted - measured) <= 64, (predicted, measured)


def test_on_apple_fits_is_the_working_set_and_tight_is_up_to_the_ceiling(monkeypatch):
    """Unified memory: a job fits within Metal's recommended working set, is tight past it up to what the allocator
    grants within RAM (the GPU pages, the Mac swaps), and does not fit beyond. The review's case: an 8 GiB Mac read
    9.07 GiB free and SDXL at 1024 px "fit"."""
    from .test_probe import FakeMps, on_mps

    ram = 8 * GiB
    free = on_mps(monkeypatch, FakeMps(int(ram * 2 / 3), 0, 0), ram=ram, resident=GiB)
    sdxl = builtin_job("sdxl", 1024, 1024, batch=1, memory_bytes=free.bytes, ceiling_bytes=free.ceiling,
                       element_size=2, device_kind="mps")  # fmt: skip
    assert plan_job(sdxl, einsum_only)["verdict"] != "fits"
    need = plan_pass(replace(sdxl, ceiling_bytes=None, memory_bytes=64 * GiB), passes(sdxl)[0], einsum_only)
    total = need["total_bytes"]
    low = need["weight_bytes"] + need["input_bytes"] + need["activation_bytes"] - 256 * MiB
    cases = ((64 * GiB, None, "fits"), (64 * GiB, 128 * GiB, "fits"), (low, None, "does not fit"),
             (low, 2 * total, "tight"), (low, low + MiB, "does not fit"))  # fmt: skip
    for memory, ceiling, verdict in cases:
        job = replace(sdxl, memory_bytes=memory, ceiling_bytes=ceiling)
        assert plan_pass(job, passes(job)[0], einsum_only)["verdict"] == verdict, (memory, ceiling)
    stock = builtin_job("sd15", 1024, 1024, batch=1, memory_bytes=64 * GiB, element_size=2, vae="off",
                        device_kind="mps")  # fmt: skip
    decode = passes(stock)[1]
    ample = plan_pass(stock, decode, einsum_only)
    live = activations.vae_decode_live_bytes(1024, 1024, 1, 2)["vae.mid"]
    short = ample["weight_bytes"] + ample["input_bytes"] + live + ample["attention_bytes"] // 2  # fits past free only
    planned = plan_pass(replace(stock, memory_bytes=short, ceiling_bytes=2 * ample["total_bytes"]), decode, einsum_only)
    assert planned["verdict"] == "tight" and any(row["tight"] for row in planned["layers"])
