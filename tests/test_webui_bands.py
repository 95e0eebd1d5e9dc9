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

import pytest
import torch

from lib_memslice import band_costs, bands
from lib_memslice.limits import NotEnoughMemory

from .test_webui import TITLES, _failing_job, generate, select

CONFIG = dict(ch=32, out_ch=3, ch_mult=(1, 2, 4, 4), num_res_blocks=1, attn_resolutions=[], in_channels=3,
              resolution=256, z_channels=4, dropout=0.0)  # fmt: skip


def vae(module, seed=0):
    """(Encoder, Decoder) of ``module`` (ldm's or the fake sgm's) at the SD geometry, a quarter of its width."""
    torch.manual_seed(seed)
    with contextlib.redirect_stdout(io.StringIO()):
        return module.Encoder(double_z=True, **CONFIG).eval(), module.Decoder(**CONFIG).eval()


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
        "memslice: out of memory in the VAE decode at untiled, 1 band, 2 bands, 4 bands, "
        "8 bands and 8 bands streamed (no more bands under the band cap); 6.0 GiB is free now."
    )
    assert "In this job: the VAE decode pass at 64x64 failed; with the 6.0 GiB free when this job started" in text
    assert env.memslice.STATS.current_job().failures == 1


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
