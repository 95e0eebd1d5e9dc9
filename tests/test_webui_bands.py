"""The VAE in exact bands inside the webui (issue 23): the entries install and remove the banded Decoder/Encoder
forwards, generations run and report them, and what the webui does around its VAE (another extension's instance
hook, --medvram/--lowvram, the NaN retry in float32, one image at a time, TAESD) still works.

Driven through the fake webui 1.10.1 with the real ldm classes (the fake sgm's Decoder and Encoder for sgm)."""

from __future__ import annotations

import ast
import contextlib
import io
import logging
import os
from types import SimpleNamespace

import pytest
import torch

from lib_memslice import activations, band_costs, bands
from lib_memslice.limits import NotEnoughMemory

from .test_api import client  # noqa: F401 (the routes' fixture)
from .test_webui import TITLES, _failing_job, generate, select

CONFIG = dict(ch=32, out_ch=3, ch_mult=(1, 2, 4, 4), num_res_blocks=1, attn_resolutions=[], in_channels=3,
              resolution=256, z_channels=4, dropout=0.0)  # fmt: skip


def vae(module, seed=0, config=CONFIG):
    """(Encoder, Decoder) of ``module`` (ldm's or the fake sgm's) at the SD geometry, a quarter of its width."""
    torch.manual_seed(seed)
    with contextlib.redirect_stdout(io.StringIO()):
        return module.Encoder(double_z=True, **config).eval(), module.Decoder(**config).eval()


def classes(env):
    return ((env.ldm_model.Decoder, env.ldm_model.Encoder), (env.sgm_model.Decoder, env.sgm_model.Encoder))


def forwards(env):
    return tuple(cls.__dict__["forward"] for pair in classes(env) for cls in pair)


def stock(module, *args):
    """The module's own class forward, whatever is installed (the ground truth)."""
    with torch.no_grad():
        return forwards_before[type(module)](module, *args)


forwards_before: dict[type, object] = {}


@pytest.fixture
def env(webui):
    forwards_before.clear()
    for pair in classes(webui):
        for cls in pair:
            forwards_before[cls] = cls.__dict__["forward"]
    return webui


def budget_for(net, lat_h, lat_w, bands_wanted):
    """An attention budget (GiB) in which the pass's fewest fitting bands are ``bands_wanted``: the banded part's
    peak at that count (the runtime plans in the budget as is)."""
    peak = band_costs.banded_peak_bytes(net, lat_h, lat_w, 1, 4, bands_wanted)
    assert band_costs.banded_peak_bytes(net, lat_h, lat_w, 1, 4, bands_wanted - 1) > peak
    return peak / (1 << 30)


# --- apply, undo, and what others install ---------------------------------------------------------------------


def test_a_memslice_entry_installs_the_banded_vae_forwards_and_undo_restores_the_originals(env):
    originals = forwards(env)
    for title in (*TITLES.values(), "Doggettx", TITLES["auto"], "None", TITLES["heads"], "sdp - scaled dot product"):
        select(env, title)
        entry = env.sd_hijack.current_optimizer
        if entry is not None and getattr(entry, "is_memslice", False):
            assert all(getattr(f, "__memslice__", None) == entry.strategy for f in forwards(env)), title
            assert [f.__memslice_original__ for f in forwards(env)] == list(originals)  # never one of ours
        else:
            assert forwards(env) == originals, title  # a built-in or None: the classes' own forwards
    select(env, TITLES["auto"])
    env.sd_hijack.undo_optimizations()  # the webui's own undo never touches the VAE
    assert all(getattr(f, "__memslice__", None) == "auto" for f in forwards(env))
    env.sd_hijack.current_optimizer.undo()
    assert forwards(env) == originals


def test_an_entry_applied_twice_still_puts_back_the_classes_own_forwards(env):
    """apply() over memslice's own forwards (an entry applied again without its undo) never falls back onto them."""
    originals = forwards(env)
    entry = next(e for e in env.memslice.ENTRIES if e.strategy == "auto")
    entry.apply()
    entry.apply()
    assert [f.__memslice_original__ for f in forwards(env)] == list(originals)
    entry.undo()
    assert forwards(env) == originals


def test_undo_leaves_a_forward_another_extension_installed_since(env):
    select(env, TITLES["auto"])
    ours = env.ldm_model.Decoder.forward

    def theirs(self, z):
        return ours(self, z)

    env.ldm_model.Decoder.forward = theirs
    select(env, "Doggettx")
    assert env.ldm_model.Decoder.__dict__["forward"] is theirs  # theirs stays
    assert env.ldm_model.Encoder.__dict__["forward"] is forwards_before[env.ldm_model.Encoder]
    # theirs still calls memslice's forward: with no memslice entry applied it runs the stock decode, no bands
    _, decoder = vae(env.ldm_model)
    z = torch.randn(1, 4, 8, 8)
    env.shared.opts.set("memslice_budget_gb", 1e-6)  # no plan fits: would refuse if memslice still planned
    with torch.no_grad():
        assert torch.equal(decoder(z), stock(decoder, z))


def test_without_sgm_the_ldm_classes_alone_are_patched(env, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sgm.modules.diffusionmodules.model", None)  # import fails
    select(env, TITLES["auto"])
    assert getattr(env.ldm_model.Decoder.forward, "__memslice__", None) == "auto"
    assert env.sgm_model.Decoder.__dict__["forward"] is forwards_before[env.sgm_model.Decoder]


def test_a_forward_set_on_the_instance_is_what_runs(env):
    """The Tiled VAE extension sets ``decoder.forward`` (and ``encoder.forward``) on the module instance, keeping
    the bound class forward as ``original_forward`` for small inputs: torch calls the instance's, so memslice's
    class forward is never reached for that module (no bands, nothing recorded), unless the hook calls it."""
    select(env, TITLES["auto"])
    _, decoder = vae(env.ldm_model)
    z = torch.randn(1, 4, 16, 16)
    calls = []
    decoder.original_forward = decoder.forward  # what the Tiled VAE extension keeps: memslice's, bound

    def tiled(x):
        calls.append(x.shape)
        return torch.zeros(1, 3, 8 * x.shape[2], 8 * x.shape[3])

    decoder.forward = tiled
    env.shared.opts.set("memslice_budget_gb", 1e-6)  # memslice's forward would refuse this pass
    with bands.forced(4):
        records = []
        env.memslice.HOST.record_bands = records.append
        try:
            with torch.no_grad():
                assert torch.equal(decoder(z), torch.zeros(1, 3, 128, 128))
        finally:
            del env.memslice.HOST.record_bands
        assert calls == [z.shape] and records == []
        env.shared.opts.set("memslice_budget_gb", 0.0)
        with torch.no_grad():  # the hook's own fallback for small inputs: memslice's forward, forced to 4 bands
            assert (decoder.original_forward(z) - stock(decoder, z)).abs().max() < 1e-5


# --- generations ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _logged(caplog):
    logger = logging.getLogger("memslice")
    logger.addHandler(caplog.handler)
    try:
        yield
    finally:
        logger.removeHandler(caplog.handler)


@pytest.mark.parametrize("package", ["ldm", "sgm"])
def test_a_decode_that_would_not_fit_runs_in_the_fewest_bands_and_says_so(env, caplog, package):
    """The planner's fewest fitting bands in the room (here the attention budget, planned in as is), equal to the
    module's own decode, one image at a time as ``decode_latent_batch`` runs them; the infotext and the console line
    say ``VAE decode in N bands``."""
    select(env, TITLES["auto"])
    _, decoder = vae(env.ldm_model if package == "ldm" else env.sgm_model)
    net = bands.decoder_net(decoder)
    latents = torch.randn(2, 4, 24, 16)
    env.shared.opts.set("memslice_budget_gb", budget_for(net, 24, 16, 3))
    expected = [stock(decoder, latents[i : i + 1]) for i in range(2)]
    out = []

    def sample(p):  # decode_latent_batch: decode_first_stage per image
        for i in range(latents.shape[0]):
            with torch.no_grad():
                out.append(decoder(latents[i : i + 1]))

    with _logged(caplog):
        _, processed = generate(env, sample, width=128, height=192, batch_size=2)
    for got, want in zip(out, expected, strict=True):
        assert (got - want).abs().max() < 1e-4
    assert "VAE decode in 3 bands" in processed.infotexts[0] and "VAE decode in 3 bands" in processed.infotexts[1]
    line = env.memslice.STATS.last_job.line()
    assert line.endswith("; VAE decode in 3 bands")
    assert any(r.getMessage() == line for r in caplog.records)
    assert env.memslice.STATS.last_job.decode_bands == 3 and env.memslice.STATS.last_job.encode_bands == 0


def test_an_encode_that_would_not_fit_runs_in_bands(env):
    select(env, TITLES["auto"])
    encoder, _ = vae(env.ldm_model)
    net = bands.encoder_net(encoder)
    image = torch.randn(1, 3, 160, 128)
    env.shared.opts.set("memslice_budget_gb", budget_for(net, 20, 16, 4))
    expected = stock(encoder, image)
    out = []

    def sample(p):
        with torch.no_grad():
            out.append(encoder(image))

    _, processed = generate(env, sample, width=128, height=160)
    assert (out[0] - expected).abs().max() < 1e-4
    assert "VAE encode in 4 bands" in processed.infotexts[0] and "decode in" not in processed.infotexts[0]


def test_a_pass_that_fits_and_the_attention_and_off_settings_run_the_modules_own_forward(env):
    select(env, TITLES["auto"])
    _, decoder = vae(env.ldm_model)
    z = torch.randn(1, 4, 16, 16)
    for vae_setting, budget in (("auto", 0.0), ("attention", 2e-3), ("off", 2e-3)):  # 2 MiB: auto would band
        env.shared.opts.set("memslice_vae", vae_setting)
        env.shared.opts.set("memslice_budget_gb", budget)
        out = []
        with torch.no_grad():
            _, processed = generate(env, lambda p, out=out: out.append(decoder(z)))
        assert (out[0] - stock(decoder, z)).abs().max() < 1e-5
        assert "bands" not in processed.infotexts[0], vae_setting
    env.shared.opts.set("memslice_vae", "auto")


def test_the_nan_retry_in_float32_replans_the_pass(env):
    """``decode_latent_batch``'s NaN retry: the VAE converted to float32 (``first_stage_model.to``) and the latent
    with it, decoded again through the same forward: planned for float32's bytes, exact in float32."""
    select(env, TITLES["auto"])
    _, decoder = vae(env.ldm_model)
    z = torch.randn(1, 4, 16, 16)
    net = bands.decoder_net(decoder)
    records = []
    env.memslice.HOST.record_bands = records.append
    try:
        env.shared.opts.set("memslice_budget_gb", band_costs.banded_peak_bytes(net, 16, 16, 1, 2, 4) / (1 << 30))
        with torch.no_grad():
            decoder.to(torch.bfloat16)(z.to(torch.bfloat16))
            decoder.to(torch.float32)
            out = decoder(z)
    finally:
        del env.memslice.HOST.record_bands
    first, retry = records
    assert (first.bands, first.streamed) == (4, False)
    assert retry.untiled_bytes == 2 * first.untiled_bytes  # planned for float32's bytes, in the same room
    assert retry.peak_bytes <= retry.room_bytes == first.room_bytes and (retry.bands, retry.streamed) != (4, False)
    assert (out - stock(decoder, z)).abs().max() < 1e-5


def test_bands_never_move_a_module_under_medvram_or_lowvram(env, monkeypatch):
    """--medvram/--lowvram: the webui moves the whole first stage model before its ``decode`` (a wrapper and a
    forward pre-hook on it); the bands call its submodules where they are and move nothing."""
    select(env, TITLES["auto"])
    _, decoder = vae(env.ldm_model)
    z = torch.randn(1, 4, 16, 16)
    moved = []

    def recording(name):
        original = getattr(torch.nn.Module, name)
        return lambda self, *args, **kwargs: moved.append(name) or original(self, *args, **kwargs)

    for name in ("to", "cuda", "cpu", "_apply"):
        monkeypatch.setattr(torch.nn.Module, name, recording(name))
    hooked = []
    handles = [m.register_forward_pre_hook(lambda m, _: hooked.append(m)) for m in (decoder,)]
    with bands.forced(4), torch.no_grad():
        out = decoder(z)
    for handle in handles:
        handle.remove()
    monkeypatch.undo()
    assert moved == [] and hooked == [decoder]  # the pre-hook on the module itself still runs, once
    assert (out - stock(decoder, z)).abs().max() < 1e-5


# --- failures ---------------------------------------------------------------------------------------------------


def test_a_decode_out_of_memory_is_retried_with_more_bands_and_the_last_error_reaches_the_user(env, monkeypatch):
    """torch's out-of-memory error in the decode: the attempt is freed and retried with twice the bands, then
    streamed; the error after the last try names the pass, the band counts tried and the free memory, and the
    webui's failure context adds the pass's name in the job and the largest size that fits."""
    from lib_memslice import probe

    select(env, TITLES["auto"])
    _, decoder = vae(env.ldm_model)

    def oom(*_args, **_kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")

    decoder.up[0].block[0].conv1.forward = oom
    monkeypatch.setattr(probe, "free_memory", lambda device, precise=False: probe.FreeMemory(6 << 30, "test"))

    def decode(p):
        with torch.no_grad():
            decoder(torch.randn(1, 4, 8, 8))

    text = _failing_job(env, "StableDiffusionProcessingTxt2Img", decode, width=64, height=64)
    assert text.startswith(
        "memslice: out of memory in the VAE decode at untiled, 2 bands, 4 bands, "
        "8 bands and 8 bands streamed (no more bands under the band cap); 6.0 GiB is free now."
    )
    assert "In this job: the VAE decode pass at 64x64 failed; with the 6.0 GiB free when this job started" in text
    last = env.memslice.STATS.last_job  # the failed job, closed (no postprocess ran)
    assert last.failures == 1 and last.error.startswith("out of memory in the VAE decode at untiled, 2 bands")


def test_a_decode_no_plan_fits_is_refused_before_it_runs(env, monkeypatch):
    from lib_memslice import probe

    select(env, TITLES["auto"])
    _, decoder = vae(env.ldm_model)
    monkeypatch.setattr(probe, "free_memory", lambda device, precise=False: probe.FreeMemory(1 << 16, "test"))
    ran = []
    decoder.conv_in.register_forward_pre_hook(lambda m, _: ran.append(m))

    def decode(p):
        with torch.no_grad():
            decoder(torch.randn(1, 4, 16, 16))

    with pytest.raises(NotEnoughMemory) as info:
        generate(env, decode, width=128, height=128)
    assert str(info.value).startswith("memslice: not enough memory for the VAE decode: its smallest plan (16 bands "
                                      "streamed through the device) needs")  # fmt: skip
    assert "64.0 KiB is free" in str(info.value) and ran == []


# --- what memslice leaves alone ---------------------------------------------------------------------------------


def test_taesd_and_the_approximate_previews_are_other_classes():
    """The webui's TAESD and approximate-preview decoders are classes of their own (no ldm/sgm Decoder or Encoder
    among their bases): the class forwards memslice replaces never run for them."""
    webui_dir = os.environ.get("WEBUI_DIR", "")
    if not webui_dir:
        pytest.skip("WEBUI_DIR is not set: point it at a stable-diffusion-webui 1.10.1 checkout")
    for rel in ("modules/sd_vae_taesd.py", "modules/sd_vae_approx.py"):
        with open(os.path.join(webui_dir, rel), encoding="utf8") as f:
            tree = ast.parse(f.read())
        classes_ = [n for n in tree.body if isinstance(n, ast.ClassDef)]
        assert classes_, rel
        for cls in classes_:
            assert [ast.unparse(b) for b in cls.bases] == ["nn.Module"], (rel, cls.name)
            assert cls.name not in ("Decoder", "Encoder")


def test_the_webui_decodes_and_encodes_one_image_at_a_time():
    """What the job planner and these tests assume (``decode_latent_batch`` and ``images_tensor_to_samples``)."""
    webui_dir = os.environ.get("WEBUI_DIR", "")
    if not webui_dir:
        pytest.skip("WEBUI_DIR is not set: point it at a stable-diffusion-webui 1.10.1 checkout")
    with open(os.path.join(webui_dir, "modules/processing.py"), encoding="utf8") as f:
        processing = f.read()
    assert "decode_first_stage(model, batch[i:i + 1])" in processing
    with open(os.path.join(webui_dir, "modules/sd_samplers_common.py"), encoding="utf8") as f:
        common = f.read()
    assert "model.encode_first_stage(torch.unsqueeze(img, 0))" in common


# --- the plan predicts the run ----------------------------------------------------------------------------------

#: the VAE of docs/e2e-webui-1.10.1.md's tiny SD1 model: v1-inference.yaml's with ``ch`` 32 (the published 128)
E2E_VAE = dict(CONFIG, num_res_blocks=2)


def load_model(env, encoder, decoder):
    """The webui's model_loaded callback for a model whose first stage model holds these modules (no UNet)."""
    first_stage = torch.nn.Module()
    first_stage.encoder, first_stage.decoder = encoder, decoder
    sd_model = SimpleNamespace(model=SimpleNamespace(diffusion_model=None), first_stage_model=first_stage,
                               cond_stage_model=None)  # fmt: skip
    env.script_callbacks.model_loaded_callback(sd_model)


#: (attention budget GiB or None, free memory MiB when unbudgeted) -> (decode, encode) as (bands, streamed): the
#: e2e run's budgets (0.15, 0.05 and 0.01 GiB: where the plan route said 3/1, 4/3 streamed and 32/11 streamed while
#: the run ran untiled/untiled, 1 band/untiled and 6/3 streamed), and free memory read by the probe
PREDICTED = {
    (0.15, None): ((0, False), (0, False)),
    (0.05, None): ((2, False), (0, False)),  # one band on the device is never planned: two
    (0.01, None): ((6, True), (3, True)),
    (0.0, 64): ((2, False), (0, False)),
    (0.0, 32): ((4, False), (2, False)),
}


@pytest.mark.parametrize(("budget", "free_mib"), list(PREDICTED))
def test_the_plan_route_predicts_the_bands_the_run_records(client, monkeypatch, budget, free_mib):  # noqa: F811
    """img2img at 256x256 with the e2e run's tiny VAE loaded, float32 (``--no-half``): ``/memslice/v1/plan`` for the
    job, then the job itself (its encode and its decode through memslice's forwards on the real ldm modules) under
    the same settings: every VAE pass runs in the bands, streamed or not, that the plan said. Unbudgeted, the run's
    probe reads what the plan left free at each pass's forward (its inputs and the decoder's input latent taken)."""
    from lib_memslice import probe

    env = client.webui
    for name in ("dtype", "dtype_vae"):
        monkeypatch.setattr(env.devices, name, torch.float32)
    select(env, TITLES["auto"])
    encoder, decoder = vae(env.ldm_model, config=E2E_VAE)
    load_model(env, encoder, decoder)
    free = {"bytes": (free_mib or 8192) << 20}
    monkeypatch.setattr(probe, "free_memory", lambda device, precise=False: probe.FreeMemory(free["bytes"], "test"))
    params = {"width": 256, "height": 256, "img2img": "true", "budget_gb": budget}
    answer = client.get("/memslice/v1/plan", params=params).json()
    passes = {p["kind"]: p for p in answer["passes"] if p["kind"] != "unet"}
    planned = tuple((passes[k]["bands"], passes[k]["streamed"]) for k in ("vae_decode", "vae_encode"))
    assert planned == PREDICTED[(budget, free_mib)], planned
    if budget == 0.15:  # untiled: the activation model at the loaded VAE's width
        expected = activations.vae_decode_activation_bytes(256, 256, 1, 4, channels=E2E_VAE["ch"])
        assert passes["vae_decode"]["activation_bytes"] == expected
    records = []
    monkeypatch.setattr(env.memslice.HOST, "record_bands", records.append, raising=False)
    image, z = torch.rand(1, 3, 256, 256) * 2 - 1, torch.randn(1, 4, 32, 32)
    latent = 4 * 32 * 32 * 4  # the decoder's input (post_quant_conv's output), beside the sample it came from

    def sample(p):
        with torch.no_grad():
            free["bytes"] = ((free_mib or 0) << 20) - passes["vae_encode"]["input_bytes"]
            encoder(image)
            free["bytes"] = ((free_mib or 0) << 20) - passes["vae_decode"]["input_bytes"] - latent
            decoder(z)

    generate(env, sample, width=256, height=256, override_settings={"memslice_budget_gb": budget})
    ran = {r.site: (r.bands, r.streamed) for r in records}
    assert (ran["vae.decode"], ran["vae.encode"]) == planned


def test_a_pass_that_would_fit_in_one_band_runs_in_two_and_one_band_on_the_device_is_the_modules_own(env, caplog):
    """Between one band's peak and the untiled one (the e2e run's 0.05 GiB) the decode runs in two bands and says
    so; one band forced on the device is the whole pass: the module's own forward, to the bit; no line says
    "1 band"."""
    select(env, TITLES["auto"])
    _, decoder = vae(env.ldm_model, config=E2E_VAE)
    net = bands.decoder_net(decoder)
    one, untiled = band_costs.banded_peak_bytes(net, 32, 32, 1, 4, 1), band_costs.untiled_peak_bytes(net, 32, 32, 1, 4)
    assert one < untiled
    env.shared.opts.set("memslice_budget_gb", (one + untiled) / 2 / (1 << 30))
    z = torch.randn(1, 4, 32, 32)
    out = []
    with _logged(caplog), torch.no_grad():
        _, processed = generate(env, lambda p: out.append(decoder(z)))
    assert "VAE decode in 2 bands" in processed.infotexts[0]
    assert (out[0] - stock(decoder, z)).abs().max() < 1e-4
    env.shared.opts.set("memslice_budget_gb", 0.0)
    with bands.forced(1), torch.no_grad():
        _, processed = generate(env, lambda p: out.append(decoder(z)))
    assert torch.equal(out[1], stock(decoder, z)) and "band" not in processed.infotexts[0]
    assert not any("1 band" in r.getMessage() for r in caplog.records)


def test_a_refused_job_is_the_last_job_the_status_shows(client, monkeypatch):  # noqa: F811
    """After a job in bands, a job memslice refuses (its encode: no plan fits the budget), then one that fails
    otherwise: ``/memslice/v1/status``'s ``last_job`` is each failed job, with what stopped it, never the one
    before."""
    env = client.webui
    select(env, TITLES["auto"])
    encoder, decoder = vae(env.ldm_model)
    net = bands.decoder_net(decoder)

    def decode(p):
        with torch.no_grad():
            decoder(torch.randn(1, 4, 16, 16))

    generate(env, decode, override_settings={"memslice_budget_gb": budget_for(net, 16, 16, 3)})
    before = client.get("/memslice/v1/status").json()["last_job"]
    assert before["decode_bands"] == 3 and before["line"].endswith("; VAE decode in 3 bands")

    def encode(p):
        with torch.no_grad():
            encoder(torch.randn(1, 3, 128, 128))

    env.shared.opts.set("memslice_budget_gb", 1e-6)
    _failing_job(env, "StableDiffusionProcessingImg2Img", encode, width=128, height=128)
    last = client.get("/memslice/v1/status").json()["last_job"]
    assert last["decode_bands"] == 0 and last["error"] == "not enough memory for the VAE encode"
    assert "VAE decode in 3 bands" not in last["line"]
    assert last["line"].endswith("; failed: not enough memory for the VAE encode")
    assert last["line"].startswith("memslice: auto, 0 slices max over 0 attention calls")  # no call ran: the entry's
    env.shared.opts.set("memslice_budget_gb", 0.0)

    def boom(p):
        raise RuntimeError("boom: the sampler broke")

    _failing_job(env, "StableDiffusionProcessingTxt2Img", boom, raises=RuntimeError)
    last = client.get("/memslice/v1/status").json()["last_job"]
    assert last["error"] == "RuntimeError: boom" and last["calls"] == 0
    # a job that fails before memslice's process() opened its summary: closed empty, not with calls made between
    with torch.no_grad():
        decoder.mid.attn_1(torch.randn(1, 128, 4, 4))  # an attention call outside any job
    env.memslice.jobs.on_job_failed(object(), RuntimeError("the checkpoint did not load"))
    last = client.get("/memslice/v1/status").json()["last_job"]
    assert last["calls"] == 0 and last["error"] == "RuntimeError: the checkpoint did not load"


def test_a_loaded_vae_memslice_cannot_band_is_planned_and_run_whole(client):  # noqa: F811
    """A loaded VAE with attention in its up and down paths: the banded forwards run the modules' own, and the plan
    bands neither pass (it does not plan the published VAE's bands for it)."""
    env = client.webui
    select(env, TITLES["auto"])
    encoder, decoder = vae(env.ldm_model, config=dict(CONFIG, attn_resolutions=[32]))
    assert bands.decoder_net(decoder) is None and bands.encoder_net(encoder) is None
    load_model(env, encoder, decoder)
    params = {"width": 128, "height": 128, "img2img": "true", "budget_gb": 0.001}
    answer = client.get("/memslice/v1/plan", params=params).json()
    assert [(p["kind"], p["bands"], p["bands_reason"]) for p in answer["passes"] if p["kind"] != "unet"] == [
        ("vae_encode", 0, ""), ("vae_decode", 0, "")]  # fmt: skip
    records = []
    env.memslice.HOST.record_bands = records.append
    try:
        with torch.no_grad():
            generate(env, lambda p: (encoder(torch.randn(1, 3, 128, 128)), decoder(torch.randn(1, 4, 16, 16))),
                     override_settings={"memslice_budget_gb": 0.001})  # fmt: skip
    finally:
        del env.memslice.HOST.record_bands
    assert records == []
