"""The job planner with the VAE in exact bands (issue 23): a VAE pass planned in the fewest bands that fit its room,
as the runtime plans it; what a banded pass holds, against the tracker on the real ldm modules; the largest sizes;
the CLI's column, the plan JSON's ``bands``, ``job_fits`` and the plan route."""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace

import pytest
import torch

from lib_memslice import activations, band_costs, bands, cli, kernels
from lib_memslice.costs import GiB, MiB
from lib_memslice.job_plan import (
    ALLOCATOR_OVERHEAD,
    VAE_NETS,
    Job,
    allocator_overhead,
    max_square,
    passes,
    plan_job,
    plan_pass,
    weight_bytes,
)
from lib_memslice.models import BUILTIN
from lib_memslice.settings import Settings

from .test_api import client  # noqa: F401 (the routes' fixture)


def job(model="sd15", side=512, gib=4, **kwargs):
    kwargs.setdefault("element_size", 2)
    kwargs.setdefault("device_kind", "cuda")
    return Job(BUILTIN[model], model, side, side, kwargs.pop("batch", 1), int(gib * GiB), **kwargs)


def cuda_kernels(site, element_size):
    dtype = torch.float16 if element_size == 2 else torch.float32
    return kernels.expected_kernels("cuda", dtype, site.head_dim, "auto")


def decode_of(result, name="VAE decode"):
    return next(p for p in result["passes"] if p["name"] == name)


def room_of(j, p):
    """The band planner's room for a pass (see job_plan.plan_bands): free beside weights and inputs over the
    allocator's largest share, less the decoder's input latent."""
    planned = plan_pass(j, p, cuda_kernels)
    free = j.memory_bytes - planned["weight_bytes"] - planned["input_bytes"]
    extra = 4 * (p.width // 8) * (p.height // 8) * j.vae_element if p.kind == "vae_decode" else 0
    return int(free / (1 + allocator_overhead(j.device_kind).high)) - extra, planned


# --- planned, not guessed ---------------------------------------------------------------------------------------


def test_a_vae_pass_that_fits_runs_whole():
    result = plan_job(job(side=512, gib=8), cuda_kernels)
    decode = decode_of(result)
    assert decode["bands"] == 0 and not decode["streamed"] and decode["bands_reason"].startswith("fits untiled")
    assert all(p["bands"] == 0 and p["bands_reason"] == "" for p in result["passes"] if p["kind"] == "unet")


@pytest.mark.parametrize(
    ("model", "side", "gib", "medvram"),
    [("sd15", 1024, 4, False), ("sd15", 1536, 6, False), ("sdxl", 2048, 8, True), ("sd15", 1280, 4, False)],
)
def test_the_decode_runs_in_the_fewest_bands_that_fit_its_room(model, side, gib, medvram):
    j = job(model, side, gib, medvram=medvram)
    p = passes(j)[1]
    room, planned = room_of(j, p)
    n = planned["bands"]
    net, lat = VAE_NETS["vae_decode"], side // 8
    assert n > 0 and not planned["streamed"] and planned["verdict"] == "fits"
    assert band_costs.banded_peak_bytes(net, lat, lat, 1, 2, n) <= room
    assert band_costs.untiled_peak_bytes(net, lat, lat, 1, 2) > room
    assert all(band_costs.banded_peak_bytes(net, lat, lat, 1, 2, m) > room for m in range(1, n))
    assert planned["bands_reason"].startswith(f"{n} bands: the fewest that fit")


@pytest.mark.parametrize(("side", "gib"), [(1024, 4), (1536, 4), (2048, 6), (3072, 8), (2560, 12)])
@pytest.mark.parametrize("kind", ["vae_decode", "vae_encode"])
def test_the_job_planner_plans_the_bands_the_runtime_runs(monkeypatch, side, gib, kind):
    """At the free memory the module's forward would read (the weights, the pass's inputs and, for the decoder, its
    input latent taken), the runtime's plan is the job planner's (its room is at most a fifth of the latent
    larger: never another band count at these sizes)."""
    from lib_memslice import probe

    j = job("sd15", side, gib, img2img=True)
    p = next(q for q in passes(j) if q.kind == kind)
    planned = plan_pass(j, p, cuda_kernels)
    lat = side // 8
    latent = 4 * lat * lat * 2 if kind == "vae_decode" else 0
    free = j.memory_bytes - planned["weight_bytes"] - planned["input_bytes"] - latent
    monkeypatch.setattr(probe, "free_memory", lambda device, precise=False: probe.FreeMemory(free, "test"))
    net = VAE_NETS[kind]
    shape = (1, 4 if kind == "vae_decode" else 3, lat, lat)
    plan, _ = bands.plan_pass(net, shape, 2, torch.device("cuda"), Settings())
    assert (0 if plan.stock else plan.bands, plan.streamed) == (planned["bands"], planned["streamed"])


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_a_pass_planned_in_bands_is_one_the_verdict_calls_fits_at_the_edge(n):
    """Where ``n`` bands would fit only without the allocator's share of the whole pass (the decoder's input latent
    counted too), the planner takes more bands and the pass fits, rather than ``n`` and a tight verdict."""
    j = job("sd15", 1536, 64)
    p = passes(j)[1]
    planned = plan_pass(j, p, cuda_kernels)
    net, lat = VAE_NETS["vae_decode"], 1536 // 8
    latent = 4 * lat * lat * 2
    share = 1 + allocator_overhead("cuda").high
    edge = int(share * (band_costs.banded_peak_bytes(net, lat, lat, 1, 2, n) + latent)) - 1
    at = replace(j, memory_bytes=planned["weight_bytes"] + planned["input_bytes"] + edge)
    decode = plan_pass(at, p, cuda_kernels)
    assert decode["bands"] == n + 1 and decode["verdict"] == "fits"


def test_the_pass_margin_is_the_allocator_share_the_job_planner_adds():
    for kind, margin in bands.PASS_MARGIN.items():
        assert margin == pytest.approx(1 + ALLOCATOR_OVERHEAD[kind].high)
    assert pytest.approx(1 + allocator_overhead("xpu").high) == bands.PASS_MARGIN_UNMEASURED


def test_with_no_resident_plan_the_pass_streams_through_host_memory(capsys):
    j = job("sd15", 2048, 4, hires=None)
    decode = decode_of(plan_job(j, cuda_kernels))
    assert decode["streamed"] and decode["bands"] > 0 and decode["host_bytes"] > GiB
    assert decode["verdict"] in ("fits", "tight")
    assert "streamed through the device, the lists in host memory" in decode["bands_reason"]
    assert cli.main(["plan", "--width", "2048", "--height", "2048", "--memory", "4GiB", "--device", "cuda"]) in (0, 1)
    out = capsys.readouterr().out
    assert f"{decode['bands']} streamed" in out and "VAE decode: " in out


def test_a_pass_no_plan_fits_does_not_fit_and_says_why():
    """In a 30 MiB attention budget (the pass's room, fixed) not even the most bands streamed fit a 1024 px decode
    (35 MiB on the device): refused before it runs, as the runtime refuses it."""
    result = plan_job(job("sd15", 1024, 64, attention_budget=30 * MiB), cuda_kernels)
    decode = decode_of(result)
    assert decode["verdict"] == "does not fit" and decode["bands"] == 0 and not decode["streamed"]
    assert decode["bands_reason"] == ("no plan fits: even in 64 bands, streamed through host memory the VAE needs "
                                      "35.0 MiB on the device")  # fmt: skip
    assert result["limit"] == "VAE decode" and result["advice"] == (
        "the VAE decode at 1024x1024 does not fit: even in 64 bands, streamed through host memory the VAE needs "
        "35.0 MiB on the device; lower the size or the batch"
    )


def test_with_the_vae_setting_attention_or_off_nothing_is_banded_and_the_advice_says_how_to():
    for setting in ("attention", "off"):
        result = plan_job(job("sd15", 1280, 4, vae=setting), cuda_kernels)
        decode = decode_of(result)
        assert decode["bands"] == 0 and decode["bands_reason"] == "" and decode["verdict"] == "does not fit"
        assert result["limit"] == "VAE decode"
        if setting == "attention":
            assert "set the VAE setting to auto to run it in exact bands" in result["advice"]
    assert plan_job(job("sd15", 1280, 4), cuda_kernels)["fits"]


def test_an_attention_budget_is_the_passs_room_as_the_runtime_plans_it():
    j = job("sd15", 1024, 64, attention_budget=GiB)
    decode = decode_of(plan_job(j, cuda_kernels))
    net = VAE_NETS["vae_decode"]
    n = decode["bands"]
    assert n > 1 and not decode["streamed"] and band_costs.banded_peak_bytes(net, 128, 128, 1, 2, n) <= GiB
    assert band_costs.banded_peak_bytes(net, 128, 128, 1, 2, n - 1) > GiB


def test_a_one_side_odd_encode_runs_whole_as_the_runtime_does():
    j = job("sd15", 1020, 64, img2img=True)
    encode = plan_pass(replace(j, memory_bytes=int(2.5 * GiB), medvram=True), passes(j)[0], cuda_kernels)
    assert encode["bands"] == 0 and encode["bands_reason"] == ""


# --- the largest sizes ------------------------------------------------------------------------------------------

#: the largest square SD1.5 fp16 job on CUDA per card before bands (the decode bound it) and with them
SD15_BEFORE = {4: 896, 6: 1280, 8: 1536}


@pytest.mark.parametrize("gib", sorted(SD15_BEFORE))
def test_the_largest_square_size_counts_the_bands(gib):
    j = job("sd15", 512, gib)
    before, after = max_square(replace(j, vae="attention"), cuda_kernels), max_square(j, cuda_kernels)
    assert before == SD15_BEFORE[gib]
    unet = max_square(j, cuda_kernels, kind="unet")
    assert 1.9 * before <= after <= unet  # the job's grows until the UNet (nearly) binds
    assert max_square(j, cuda_kernels, kind="vae_decode") >= 4 * before  # the decode's own
    fits = plan_job(job("sd15", after, gib), cuda_kernels)
    assert fits["fits"] and decode_of(fits)["bands"] > 0


@pytest.mark.parametrize("gib", [4, 6, 8])
def test_sdxl_with_medvram_the_decode_grows_at_least_twice_in_side_and_the_unet_binds(gib):
    j = job("sdxl", 512, gib, medvram=True)
    before = max_square(replace(j, vae="attention"), cuda_kernels, kind="vae_decode")
    after = max_square(j, cuda_kernels, kind="vae_decode")
    assert after >= 2 * before > 0
    unet = max_square(j, cuda_kernels, kind="unet")
    assert max_square(j, cuda_kernels) == unet  # the whole job: the UNet binds, not the decode


# --- what a banded pass holds, measured -------------------------------------------------------------------------


@contextlib.contextmanager
def banded_forwards(n, streamed=False):
    """ldm's Decoder and Encoder forwards replaced by memslice's, every pass forced to ``n`` bands (0: stock)."""
    from lib_memslice.forwards import BasicHost
    from memslice_tools import fit_activations as fa

    _, model, *_ = fa.import_ldm()
    saved = (model.Decoder.forward, model.Encoder.forward)
    host = BasicHost()
    model.Decoder.forward = bands.make_decoder_forward("auto", host)
    model.Encoder.forward = bands.make_encoder_forward("auto", host)
    try:
        with bands.forced(n, streamed):
            yield
    finally:
        model.Decoder.forward, model.Encoder.forward = saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["vae_decode", "vae_encode"])
def test_a_banded_pass_holds_what_the_job_planner_counts(kind, dtype):
    """The whole pass (post_quant_conv + Decoder; Encoder + quant_conv + sampling) on the real ldm modules at a
    quarter of the SD width, at sizes and band counts the model was not fitted on, streamed too: the tracker's
    peak and what is live at the mid attention against the planner's terms (activations.banded_mid_bytes, the
    decoder's input latent, band_costs' banded part)."""
    from memslice_tools import fit_activations as fa

    ch, es = 32, torch.finfo(dtype).bits // 8
    module = fa.build(kind, ch, dtype)
    net = band_costs.decoder_net(ch=ch) if kind == "vae_decode" else band_costs.encoder_net(ch=ch)
    for (w, h), n, streamed in (((192, 320), 3, False), ((384, 128), 5, False), ((256, 192), 6, False)):
        lat_h, lat_w = h // 8, w // 8
        with banded_forwards(n, streamed):
            measured = fa.measure_pass(module, kind, ch, w, h, 1, dtype=dtype)
        mid, live = activations.banded_mid_bytes(kind, w, h, 1, es, channels=ch)
        extra = 4 * lat_h * lat_w * es if kind == "vae_decode" else 0
        part = band_costs.banded_peak(net, lat_h, lat_w, 1, es, n, streamed).device
        predicted = max(mid, extra + part)
        assert measured.peak_bytes <= predicted <= 1.02 * measured.peak_bytes + 4096, (w, h, n, streamed)
        assert measured.live_bytes["vae.mid"] <= live["vae.mid"] <= 1.02 * measured.live_bytes["vae.mid"] + 4096


# --- the CLI, job_fits, the route -------------------------------------------------------------------------------


def test_the_cli_table_has_a_bands_column_and_the_json_a_bands_field(capsys):
    args = ["plan", "--width", "1024", "--height", "1024", "--memory", "4GiB", "--device", "cuda"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("pass ") and "verdict" in line)
    assert header.split()[:4] == ["pass", "size", "batch", "bands"]
    decode_line = next(line for line in out.splitlines() if line.startswith("VAE decode "))
    assert "VAE decode: 2 bands: the fewest that fit" in out and decode_line.split()[3] == "2"
    assert cli.main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [(p["name"], p["bands"], p["streamed"]) for p in result["passes"]] == [
        ("UNet", 0, False),
        ("VAE decode", 2, False),
    ]
    assert cli.main([*args, "--vae", "attention", "--json"]) == 1
    assert decode_of(json.loads(capsys.readouterr().out))["bands"] == 0


def test_job_fits_shows_the_bands():
    from lib_memslice.api import job_fits

    plan = job_fits(1024, 1024, model="sd15", memory_bytes=4 * GiB, device="cuda")
    assert plan.fits and [(p.name, p.bands, p.streamed) for p in plan.passes] == [
        ("UNet", 0, False),
        ("VAE decode", 2, False),
    ]


def test_the_plan_route_carries_the_bands(client, monkeypatch):  # noqa: F811
    from lib_memslice import probe

    monkeypatch.setattr(probe, "free_memory", lambda device, precise=False: probe.FreeMemory(3 << 30, "test"))
    for prefix in ("/memslice/v1", "/internal/memslice/v1"):
        answer = client.get(f"{prefix}/plan", params={"width": 1536, "height": 1536}).json()
        decode = decode_of(answer)
        assert decode["bands"] > 0 and "bands" in decode["bands_reason"]
        assert all(p["bands"] == 0 for p in answer["passes"] if p["kind"] == "unet")
    off = client.get("/memslice/v1/plan", params={"width": 1536, "height": 1536, "vae": "attention"})
    if off.status_code == 200:  # the route takes the page's unsaved VAE choice
        assert decode_of(off.json())["bands"] == 0


def test_weights_under_medvram_are_the_vaes_alone_during_a_vae_pass():
    j = job("sdxl", 1024, 8, medvram=True)
    assert weight_bytes(j, "vae_decode") < weight_bytes(j, "unet")
