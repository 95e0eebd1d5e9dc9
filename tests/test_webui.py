"""The webui glue, driven through the fake webui 1.10.1 with the real ldm classes."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

from lib_memslice import settings as settings_module
from lib_memslice.models import sites_from_modules

from .conftest import ROOT, import_ldm
from .webui_env import reload_ui

TITLES = {
    "auto": "memslice-auto - memslice automatic planner",
    "doggettx": "memslice-doggettx - memslice Doggettx (query slices)",
    "invokeai": "memslice-invokeai - memslice InvokeAI (heads, then queries)",
    "mps": "memslice-mps - memslice MPS (Metal-safe slices)",
    "heads": "memslice-heads - memslice per-head (diffusers style)",
}


def select(env, title):
    env.shared.opts.set("cross_attention_optimization", title)
    return env.sd_hijack.apply_optimizations()


def ldm_forwards(env):
    return (
        env.ldm_attention.CrossAttention.forward,
        env.ldm_model.AttnBlock.forward,
        env.sgm_attention.CrossAttention.forward,
        env.sgm_model.AttnBlock.forward,
    )


def test_entries_are_listed_with_stable_titles(webui):
    titles = [e.title() for e in webui.sd_hijack.optimizers]
    for title in TITLES.values():
        assert titles.count(title) == 1
    names = {e.name for e in webui.memslice.ENTRIES}
    assert names == {"memslice-auto", "memslice-doggettx", "memslice-invokeai", "memslice-mps", "memslice-heads"}


def test_auto_wins_automatic_on_cpu_and_cuda_but_not_mps(webui, monkeypatch):
    assert webui.sd_hijack.optimizers[0].name == "memslice-auto"  # CPU: 1001 beats InvokeAI's 1000
    assert select(webui, "Automatic") == "memslice-auto"
    for device, expected in (("cuda", "memslice-auto"), ("mps", "sub-quadratic")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda device=device: device == "cuda")
        webui.shared.device = torch.device(device)
        webui.sd_hijack.list_optimizers()
        assert select(webui, "Automatic") == expected, device
    webui.shared.cmd_opts.opt_memslice = True  # --opt-memslice picks it whatever the device
    assert select(webui, "Automatic") == "memslice-auto"


def test_priority_and_availability_never_raise(webui):
    webui.shared.device = object()  # garbage where a torch.device should be
    for entry in webui.memslice.ENTRIES:
        assert isinstance(entry.priority, int)
        assert entry.is_available() is True
    del webui.shared.device
    for entry in webui.memslice.ENTRIES:
        assert isinstance(entry.priority, int)


def test_preload_adds_the_flag():
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("preload.py", f"{ROOT}/preload.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parser = argparse.ArgumentParser()
    module.preload(parser)
    assert parser.parse_args(["--opt-memslice"]).opt_memslice is True
    assert parser.parse_args([]).opt_memslice is False


@pytest.mark.parametrize("strategy", list(TITLES))
def test_selection_by_title_patches_all_four_attributes(webui, strategy):
    assert select(webui, TITLES[strategy]) == f"memslice-{strategy}"
    for forward in ldm_forwards(webui):
        assert getattr(forward, "__memslice__", None) == strategy


def test_apply_undo_cycles_restore_exact_originals(webui):
    stock = ldm_forwards(webui)  # what the webui's undo_optimizations leaves: its hypernetwork forward etc.
    webui.sd_hijack.undo_optimizations()
    stock = ldm_forwards(webui)
    titles = [e.title() for e in webui.sd_hijack.optimizers]
    seen_builtin = set()
    for i in range(1000):
        title = titles[i % len(titles)]
        select(webui, title)
        entry = webui.sd_hijack.current_optimizer
        if not title.startswith("memslice"):
            seen_builtin.add(ldm_forwards(webui))
        else:
            assert all(f.__memslice__ == entry.strategy for f in ldm_forwards(webui))
        webui.sd_hijack.undo_optimizations()
        entry.undo()
        assert ldm_forwards(webui)[0] is stock[0] and ldm_forwards(webui)[2] is stock[2]
        assert ldm_forwards(webui)[1] is stock[1]
        # base undo puts sgm's own original AttnBlock forward back
        assert ldm_forwards(webui)[3] is webui.sd_hijack_optimizations.sgm_diffusionmodules_model_AttnBlock_forward
    assert seen_builtin  # the cycle really went through built-ins too


def test_reload_ui_registers_nothing_twice_and_keeps_the_forward(webui):
    select(webui, TITLES["doggettx"])
    applied = webui.sd_hijack.current_optimizer
    layer = webui.ldm_attention.CrossAttention(query_dim=32, heads=2, dim_head=16)
    x = torch.randn(1, 10, 32)
    before = layer(x)
    reload_ui(webui)
    reload_ui(webui)
    titles = [e.title() for e in webui.sd_hijack.optimizers]
    assert all(titles.count(t) == 1 for t in TITLES.values())
    assert webui.sd_hijack.current_optimizer is applied  # the webui keeps the old instance: same object as listed
    assert applied in webui.sd_hijack.optimizers
    assert torch.allclose(layer(x), before)
    assert webui.ldm_attention.CrossAttention.forward.__memslice__ == "doggettx"
    # executing the script again without the webui clearing callbacks must not double-register
    webui.script = __import__("tests.webui_env", fromlist=["load_script"]).load_script()
    webui.sd_hijack.list_optimizers()
    titles = [e.title() for e in webui.sd_hijack.optimizers]
    assert all(titles.count(t) == 1 for t in TITLES.values())


def test_settings_section_registers_every_option(webui):
    labels = webui.shared.opts.data_labels
    for spec in settings_module.SPECS:
        info = labels[spec.key]
        assert info.section == ("memslice", "Memory slicing") and info.category_id == "sd"
        assert info.default == spec.default
        if spec.kind == "float":
            assert info.component is not None  # floats need an explicit Slider/Number in the webui
    assert labels["memslice_safety_factor"].component_args == {"minimum": 1.0, "maximum": 10.0, "step": 0.1}
    assert labels["memslice_slice_cap"].component_args["maximum"] == 65536
    assert labels["memslice_kernel"].component_args == {"choices": ["auto", "sdpa", "einsum"]}


def test_options_are_read_with_defaults_before_settings_register(webui):
    for spec in settings_module.SPECS:
        del webui.shared.opts.data_labels[spec.key]
        webui.shared.opts.data.pop(spec.key, None)
    assert webui.memslice.HOST.settings() == settings_module.Settings()


@pytest.mark.parametrize("value", [3, "einsum", None, [1, 2], {"a": 1}, True, -1.5])
def test_options_read_from_opts_data_equal_the_webuis_getattr_for_every_key(webui, value):
    """The host reads an option held in ``opts.data`` from it (each ``getattr`` on the webui's Options fails the
    normal lookup first): the settings must be the ones ``getattr`` gives, for saved values of any JSON type and
    for keys only registered (their default) or absent everywhere."""
    opts = webui.shared.opts
    opts.data["memslice_slice_cap"] = value
    opts.data["memslice_kernel"] = value
    opts.data.pop("memslice_safety_factor", None)  # registered, not saved: its registered default
    opts.data_labels["memslice_safety_factor"].default = 2.5
    del opts.data_labels["memslice_log"]  # nowhere: memslice's own default
    opts.data.pop("memslice_log", None)
    expected = settings_module.read_settings(lambda key, default: getattr(opts, key, default))
    assert webui.memslice.HOST.settings() == expected and expected.safety_factor == 2.5


@pytest.mark.parametrize("value", [3, "einsum", [1, 2], {"a": 1}, True, -1.5, 0.0])
def test_options_all_held_in_opts_data_are_read_in_one_pass_as_getattr_reads_them(webui, value):
    """Every key in ``opts.data`` (as the webui's ``add_option`` puts each registered one there): the host reads
    them in one pass over the dict (``read_settings``' ``data``), which must give what ``getattr`` gives, key by key:
    non-default values for every key, and values of any JSON type in two of them."""
    opts = webui.shared.opts
    saved = {"memslice_safety_factor": 2.5, "memslice_slice_cap": value, "memslice_budget_gb": 1.5,
             "memslice_kernel": value, "memslice_oom_retry": False, "memslice_vae": "off",
             "memslice_log": "every call"}  # fmt: skip
    assert set(saved) == {spec.key for spec in settings_module.SPECS}
    opts.data.update(saved)
    expected = settings_module.read_settings(lambda key, default: getattr(opts, key, default))
    assert webui.memslice.HOST.settings() == expected
    assert (expected.safety_factor, expected.budget_gb, expected.oom_retry, expected.log) == (2.5, 1.5, False,
                                                                                            "every call")  # fmt: skip


def make_cross(env, sgm=False, query_dim=64, context_dim=None, heads=4, dim_head=16):
    cls = env.sgm_attention.CrossAttention if sgm else env.ldm_attention.CrossAttention
    torch.manual_seed(0)
    return cls(query_dim=query_dim, context_dim=context_dim, heads=heads, dim_head=dim_head).eval()


def run_stock(env, layer, *args, **kwargs):
    """The output of the webui's own unoptimized forward (hypernetworks included)."""
    env.sd_hijack.undo_optimizations()
    with torch.no_grad():
        return layer(*args, **kwargs)


def test_hypernetworks_are_applied_in_self_and_cross_attention(webui):
    torch.manual_seed(5)
    hn = webui.hypernetwork.Hypernetwork(
        {64: (torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)), 48: (torch.nn.Linear(48, 48), torch.nn.Linear(48, 48))}
    )
    webui.shared.loaded_hypernetworks.append(hn)
    x, context = torch.randn(2, 40, 64), torch.randn(2, 77, 48)
    for layer, ctx in ((make_cross(webui), None), (make_cross(webui, context_dim=48), context)):
        expected = run_stock(webui, layer, x, context=ctx)
        webui.shared.loaded_hypernetworks.clear()
        without = run_stock(webui, layer, x, context=ctx)
        webui.shared.loaded_hypernetworks.append(hn)
        assert (expected - without).abs().max() > 1e-3  # the hypernetwork matters
        select(webui, TITLES["auto"])
        with torch.no_grad():
            got = layer(x, context=ctx)
        assert (got - expected).abs().max() < 1e-5


def test_lora_style_patched_linear_layers_are_called_as_modules(webui, monkeypatch):
    """The webui's Lora patches torch.nn.Linear.forward; memslice must call to_q/k/v/out as modules."""
    layer = make_cross(webui, context_dim=32)
    delta = {id(layer.to_q): 0.5, id(layer.to_k): -0.25, id(layer.to_v): 0.75, id(layer.to_out[0]): 0.1}
    real = torch.nn.Linear.forward

    def lora_forward(self, input):
        return real(self, input) + delta.get(id(self), 0.0) * input.sum(-1, keepdim=True)

    monkeypatch.setattr(torch.nn.Linear, "forward", lora_forward)
    x, context = torch.randn(2, 30, 64), torch.randn(2, 77, 32)
    expected = run_stock(webui, layer, x, context=context)
    select(webui, TITLES["heads"])
    scale = expected.abs().max()  # the deltas make outputs ~100: compare relative to that
    with torch.no_grad():
        assert (layer(x, context=context) - expected).abs().max() < 1e-6 * scale
    monkeypatch.setattr(torch.nn.Linear, "forward", real)
    with torch.no_grad():
        assert (layer(x, context=context) - expected).abs().max() > 1e-3 * scale


def test_upcast_computes_in_float32_under_autocast_off(webui):
    layer = make_cross(webui).to(torch.bfloat16)
    x = torch.randn(1, 64, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        exact = make_cross(webui).eval()(x.float())  # float32 weights: same values (bf16 rounding aside)
    select(webui, TITLES["auto"])
    webui.devices.without_autocast_calls.clear()
    webui.shared.opts.upcast_attn = True
    with torch.no_grad():
        up = layer(x)
    assert up.dtype == torch.bfloat16
    assert webui.devices.without_autocast_calls == [False]
    webui.shared.opts.upcast_attn = False
    with torch.no_grad():
        down = layer(x)
    assert webui.devices.without_autocast_calls == [False]  # not entered without upcast
    assert not torch.equal(up, down)
    assert (up.float() - exact).abs().mean() <= (down.float() - exact).abs().mean()


def test_keep_mask_is_supported(webui):
    layer = make_cross(webui, context_dim=32)
    x, context, mask = torch.randn(2, 20, 64), torch.randn(2, 77, 32), torch.rand(2, 77) > 0.4
    expected = run_stock(webui, layer, x, context=context, mask=mask)
    select(webui, TITLES["invokeai"])
    with torch.no_grad():
        assert (layer(x, context=context, mask=mask) - expected).abs().max() < 1e-5
    with pytest.raises(TypeError, match="boolean keep-mask"):
        layer(x, context=context, mask=mask.float())


def test_sgm_keywords_are_honoured(webui):
    """sgm passes additional_tokens / n_times_crossframe_attn_in_self by keyword: same result as sgm's forward."""
    layer = make_cross(webui, sgm=True)
    x, extra = torch.randn(4, 25, 64), torch.randn(4, 3, 64)
    cases = (
        dict(additional_tokens=None, n_times_crossframe_attn_in_self=0),
        dict(additional_tokens=extra, n_times_crossframe_attn_in_self=0),
        dict(additional_tokens=None, n_times_crossframe_attn_in_self=2),
    )
    with torch.no_grad():
        expected = [webui.sgm_original_forward(layer, x, **kwargs) for kwargs in cases]
    select(webui, TITLES["auto"])
    for kwargs, want in zip(cases, expected, strict=True):
        with torch.no_grad():
            got = layer(x, **kwargs)
        assert got.shape == want.shape == x.shape
        assert (got - want).abs().max() < 1e-5, kwargs


def test_sd15_and_sdxl_shaped_blocks_match_stock(webui, ldm):
    attention, _, _ = ldm
    torch.manual_seed(0)
    # SD1.5 level 0: 320 channels, 8 heads x 40, context 768 (ldm SpatialTransformer)
    sd15 = attention.SpatialTransformer(320, 8, 40, depth=1, context_dim=768).eval()
    with torch.no_grad():
        for p in sd15.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    x, context = torch.randn(2, 320, 16, 12), torch.randn(2, 77, 768)
    expected = run_stock(webui, sd15, x, context=context)
    # SDXL level 1: 640 channels, 10 heads x 64, context 2048 (sgm BasicTransformerBlock)
    sdxl = webui.sgm_attention.BasicTransformerBlock(640, 10, 64, context_dim=2048).eval()
    y, ctx_xl = torch.randn(2, 96, 640), torch.randn(2, 77, 2048)
    with torch.no_grad():
        webui.sd_hijack.undo_optimizations()
        webui.sgm_attention.CrossAttention.forward = webui.sgm_original_forward
        expected_xl = sdxl(y, context=ctx_xl)
    for title in TITLES.values():
        select(webui, title)
        webui.shared.opts.set("memslice_budget_gb", 1 / 1024)  # 1 MiB: forces slicing on both shapes
        with torch.no_grad():
            assert (sd15(x, context=context) - expected).abs().max() < 1e-4, title
            assert (sdxl(y, context=ctx_xl) - expected_xl).abs().max() < 1e-4, title
    assert any(r.slices > 1 for r in webui.memslice.STATS.recent())


def test_vae_attnblock_is_planned_and_gated_by_the_setting(webui):
    torch.manual_seed(0)
    for cls in (webui.ldm_model.AttnBlock, webui.sgm_model.AttnBlock):
        block = cls(64).eval()
        x = torch.randn(1, 64, 9, 11)
        expected = run_stock(webui, block, x)
        select(webui, TITLES["doggettx"])
        webui.shared.opts.set("memslice_budget_gb", 1 / 4096)
        n = webui.memslice.STATS.total_calls
        with torch.no_grad():
            assert (block(x) - expected).abs().max() < 1e-5
        assert webui.memslice.STATS.total_calls == n + 1
        webui.shared.opts.set("memslice_vae", "off")
        with torch.no_grad():
            assert (block(x) - expected).abs().max() < 1e-5
        assert webui.memslice.STATS.total_calls == n + 1  # the stock forward ran
        webui.shared.opts.set("memslice_vae", "auto")


def generate(env, sample, **p_kwargs):
    script = env.script.MemsliceScript()
    p = env.processing.StableDiffusionProcessing(scripts=[script], **p_kwargs)
    return p, env.processing.process_images(p, sample)


def test_override_settings_apply_per_request(webui):
    select(webui, TITLES["auto"])
    layer = make_cross(webui)
    x = torch.randn(2, 256, 64)
    seen = []

    def sample(p):
        with torch.no_grad():
            layer(x)
        seen.append(webui.memslice.STATS.recent()[-1])

    generate(webui, sample, override_settings={"memslice_budget_gb": 1 / 2048, "memslice_kernel": "einsum"})
    generate(webui, sample)
    assert seen[0].slices > 1 and seen[0].kernel_used == "einsum" and seen[0].room_bytes == 1 << 19
    assert seen[1].slices == 1  # restored afterwards
    assert webui.shared.opts.memslice_budget_gb == 0.0


def test_infotext_and_console_summary(webui, caplog):
    select(webui, TITLES["doggettx"])
    webui.shared.opts.set("memslice_budget_gb", 1 / 4096)  # 256 KiB: under the fused kernel's scratch
    layer = make_cross(webui)

    def sample(p):
        with torch.no_grad():
            layer(torch.randn(2, 300, 64))

    logger = logging.getLogger("memslice")
    logger.addHandler(caplog.handler)
    try:
        _, processed = generate(webui, sample)
    finally:
        logger.removeHandler(caplog.handler)
    steps = webui.memslice.STATS.last_job.max_slices
    assert steps > 1
    assert f"Memslice: doggettx, max {steps} slices" in processed.infotexts[0]
    assert any("memslice: doggettx" in r.getMessage() and "slices max" in r.getMessage() for r in caplog.records)
    # a built-in optimizer: no memslice field
    select(webui, "sdp - scaled dot product")
    _, processed = generate(webui, sample)
    assert "Memslice" not in processed.infotexts[0]


@pytest.mark.parametrize(
    "value",
    [None, True, "garbage", [1, 2], {"a": 1}, float("nan"), float("inf"), -float("inf"), -5, 1e308, "3.5", 0],
)
def test_bad_option_values_never_fail_a_generation(webui, value, caplog):
    select(webui, TITLES["auto"])
    layer = make_cross(webui)
    x = torch.randn(1, 50, 64)
    expected = run_stock(webui, layer, x)
    select(webui, TITLES["auto"])
    settings_module._warned.clear()
    for spec in settings_module.SPECS:
        webui.shared.opts.set(spec.key, value)  # as POST /sdapi/v1/options would
    with torch.no_grad():
        assert (layer(x) - expected).abs().max() < 1e-5


def test_model_loaded_tags_sites(webui, ldm):
    _, _, openaimodel = ldm
    unet = openaimodel.UNetModel(
        image_size=32,
        in_channels=4,
        out_channels=4,
        model_channels=32,
        attention_resolutions=[2, 1],
        num_res_blocks=1,
        channel_mult=[1, 2],
        num_heads=4,
        use_spatial_transformer=True,
        transformer_depth=1,
        context_dim=32,
        legacy=False,
    )
    sd_model = type("M", (), {"model": type("W", (), {"diffusion_model": unet})(), "is_sdxl": False, "is_sd2": True})()
    webui.script_callbacks.model_loaded_callback(sd_model)
    spec = webui.memslice.planner.loaded_spec()
    assert spec.name == "sd2" and {s.name for s in spec.sites} >= {"unet.level0.self", "unet.level1.cross"}
    assert unet.input_blocks[1][1].transformer_blocks[0].attn1._memslice_site[0] == "unet.level0.self"
    webui.script_callbacks.model_loaded_callback(object())  # unreadable model: logged, not raised
    assert not webui.script_callbacks.errors


def test_install_py_installs_nothing_and_is_quiet():
    with open(f"{ROOT}/install.py") as f:
        text = f.read()
    for forbidden in ("run_pip", "pip install", "import subprocess", "os.system", "torch=="):
        assert forbidden not in text
    done = subprocess.run([sys.executable, f"{ROOT}/install.py"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == ""


def test_vae_attention_gets_the_fused_kernel_the_preview_promises(webui):
    """The VAE's q/k/v must reach SDPA last-dim contiguous, or the CPU runs einsum while the planner said fused."""
    from lib_memslice import kernels

    block = webui.ldm_model.AttnBlock(512).eval()
    select(webui, TITLES["auto"])
    with torch.no_grad():
        block(torch.randn(1, 512, 16, 16))
    record = webui.memslice.STATS.recent()[-1]
    assert record.site == "vae.mid" and record.kernel_used == "fused"
    preview = kernels.expected_kernel("cpu", torch.float32, 512, "auto")
    assert preview.kind == record.kernel_used


@pytest.mark.parametrize("garbage", ["0.005", "abc", [1, 2], {"a": 1}, None, float("nan"), -3, 1e308, True])
def test_stored_garbage_is_repaired_to_the_types_the_webui_needs(webui, garbage):
    """A hand-edited config.json or a POST /sdapi/v1/options value must not break the settings page (gradio
    rounds Number values) or GET /sdapi/v1/options (pydantic checks each value against its default's type)."""

    opts = webui.shared.opts
    for spec in settings_module.SPECS:
        opts.data[spec.key] = garbage  # as loaded from config.json at startup
    webui.script_callbacks.ui_settings_callback()  # registration repairs before any component is built
    for spec in settings_module.SPECS:
        value = opts.data[spec.key]
        assert type(value) is type(spec.default), (spec.key, value)
        info = opts.data_labels[spec.key]
        if info.component is not None:  # what the settings page does with the stored value
            component = info.component(value=value, **(info.component_args or {}))
            component.postprocess(value)
    for spec in settings_module.SPECS:
        opts.set(spec.key, garbage, is_api=True)  # POST /sdapi/v1/options runs onchange, then saves
        assert type(opts.data[spec.key]) is type(spec.default), spec.key
    opts.set("memslice_budget_gb", "0.005", is_api=True)
    assert opts.data["memslice_budget_gb"] == 0.005


def test_console_wording_is_singular_for_one(webui):
    from lib_memslice.stats import JobSummary

    job = JobSummary(strategy="auto", calls=1, max_slices=1, retries=1)
    assert "1 slice max over 1 attention call" in job.line() and "1 retry" in job.line()
    assert job.infotext() == "auto, max 1 slice, 1 OOM retry"


def _failing_job(env, p_class, sample, raises=None, **p_kwargs):
    """The text the webui would show for a generation whose sampling raises (memslice's error unless ``raises``)."""
    script = env.script.MemsliceScript()
    p = getattr(env.processing, p_class)(scripts=[script], **p_kwargs)
    from lib_memslice.limits import NotEnoughMemory

    with pytest.raises(raises or NotEnoughMemory) as info:
        env.processing.process_images(p, sample)
    return str(info.value)


def test_a_generation_that_fails_names_the_pass_and_what_would_fit(webui):
    """memslice's own error inside the real ldm modules: the pass is named from the innermost UNetModel, Decoder
    or Encoder forward in the traceback (the webui's ``p.is_hr_pass`` for the hires UNet pass, the size for the
    VAE's), with the job planner's largest size for the whole job, planned with the memory free at the job's start."""
    select(webui, TITLES["auto"])
    webui.shared.opts.set("memslice_budget_gb", 1 / 4096)  # 256 KiB: the layers' outputs alone do not fit
    hires = dict(width=512, height=512, enable_hr=True, hr_upscale_to_x=1024, hr_upscale_to_y=1024)
    expected = webui.memslice.plan_for(512, 512, 1, hr_width=1024, hr_height=1024)["max_square_resolution"]
    scaled = " (first pass; hires scaled alike)"
    basis = "with the attention budget of 256.0 KiB, which refused this call,"
    verdict = webui.memslice.plan_for(512, 512, 1, hr_width=1024, hr_height=1024)["verdict"]
    from lib_memslice.webui.jobs import VERDICT_WORDS

    said = f"{basis} {VERDICT_WORDS[verdict]} and"
    fits = (
        f"{said} the whole job (every pass) fits up to {expected}x{expected}{scaled}" if expected else f"{said} no size"
    )
    unet = _small_unet(webui)
    sites_from_modules(unet=unet)  # as on_model_loaded tags the loaded model

    def unet_hires(p):
        p.is_hr_pass = True
        with torch.no_grad():
            unet(torch.randn(2, 4, 128, 128), torch.tensor([1, 1]), context=torch.randn(2, 77, 32))

    text = _failing_job(webui, "StableDiffusionProcessingTxt2Img", unet_hires, **hires)
    assert text.startswith("memslice: not enough memory for attention at unet.level0.self")
    assert "In this job: the UNet (hires) pass at 1024x1024 failed" in text and fits in text

    encoder, decoder = _small_vae(webui)

    def decode_after_hires(p):
        p.is_hr_pass = False  # the webui resets it before the final decode
        with torch.no_grad():
            decoder(torch.randn(1, 4, 128, 128))

    text = _failing_job(webui, "StableDiffusionProcessingTxt2Img", decode_after_hires, **hires)
    # the VAE setting auto plans the pass in bands first: in a 256 KiB budget not even its smallest plan fits
    assert text.startswith("memslice: not enough memory for the VAE decode: its smallest plan (64 bands streamed")
    assert "the attention budget is 256.0 KiB" in text and "raise the attention budget" in text
    assert "In this job: the VAE decode (hires) pass at 1024x1024 failed" in text and basis in text
    webui.shared.opts.set("memslice_vae", "attention")  # attention only: the mid block's call refuses
    text = _failing_job(webui, "StableDiffusionProcessingTxt2Img", decode_after_hires, **hires)
    assert text.startswith("memslice: not enough memory for attention at vae.mid")
    assert "In this job: the VAE decode (hires) pass at 1024x1024 failed" in text
    webui.shared.opts.set("memslice_vae", "auto")

    def encode_for_an_image_upscaler(p):  # the reported case: the hires encode was called a decode
        with torch.no_grad():
            encoder(torch.randn(1, 3, 1024, 1024))

    text = _failing_job(webui, "StableDiffusionProcessingTxt2Img", encode_for_an_image_upscaler,
                        hr_upscaler="R-ESRGAN 4x+", **hires)  # fmt: skip
    assert "In this job: the VAE encode (hires) pass at 1024x1024 failed" in text and "decode" not in text

    layer = make_cross(webui)  # a UNet layer outside a UNetModel forward: the hires flag and its site tell
    from lib_memslice.limits import Geometry
    from lib_memslice.models import SITE_ATTR

    setattr(layer, SITE_ATTR, ("unet.level0.self", Geometry(8, True)))

    def first_pass(p):
        with torch.no_grad():
            layer(torch.randn(2, 4096, 64))

    text = _failing_job(webui, "StableDiffusionProcessingImg2Img", first_pass, width=512, height=512)
    assert "In this job: the UNet pass at 512x512 failed" in text


def test_hires_with_both_target_sides_names_the_passes_at_their_real_sizes(webui):
    """Both hires sides given: webui 1.10.1 upscales the picture to cover the target (``hr_upscale_to_x/y``: the
    image upscaler's encode runs there) and crops the latent to the target (``truncate_x/y``: the hires UNet and the
    final decode run there). The review's case: 512x768 to 1024x1024, a 1024x1024 decode was named "VAE decode"."""
    select(webui, TITLES["auto"])
    webui.shared.opts.set("memslice_budget_gb", 1 / 4096)
    both = dict(
        width=512,
        height=768,
        enable_hr=True,
        hr_resize_x=1024,
        hr_resize_y=1024,
        hr_upscale_to_x=1024,
        hr_upscale_to_y=1536,
        truncate_x=0,
        truncate_y=64,
    )  # as calculate_target_resolution sets them
    encoder, decoder = _small_vae(webui)

    def decode(p):
        with torch.no_grad():
            decoder(torch.randn(1, 4, 128, 128))

    text = _failing_job(webui, "StableDiffusionProcessingTxt2Img", decode, **both)
    assert "In this job: the VAE decode (hires) pass at 1024x1024 failed" in text

    def encode(p):
        with torch.no_grad():
            encoder(torch.randn(1, 3, 1536, 1024))

    text = _failing_job(webui, "StableDiffusionProcessingTxt2Img", encode, hr_upscaler="R-ESRGAN 4x+", **both)
    assert "In this job: the VAE encode (hires) pass at 1024x1536 failed" in text
    planned = webui.memslice.plan_for(512, 768, 1, hr_width=1024, hr_height=1024, hr_upscaler="image")
    sizes = {p["name"]: (p["width"], p["height"]) for p in planned["passes"]}
    assert sizes["VAE encode (hires)"] == (1024, 1536) and sizes["UNet (hires)"] == (1024, 1024)
    assert sizes["VAE decode (hires)"] == (1024, 1024)


def test_the_fits_up_to_reading_comes_from_the_jobs_start_and_says_when_it_was_optimistic(webui, monkeypatch):
    """The size is planned with the precise reading taken when the job started (not with what the failing pass
    still holds); when the failed size was within it, the text says that reading may have been optimistic."""
    from lib_memslice import probe

    select(webui, TITLES["auto"])
    readings = []

    def reading(device, precise=False):
        readings.append(precise)
        return probe.FreeMemory((64 if len(readings) == 1 else 32) * 1024**3, "test")

    monkeypatch.setattr(probe, "free_memory", reading)
    _encoder, decoder = _small_vae(webui)
    decoder.up[0].block[0].conv1.forward = _oom

    def decode(p):
        with torch.no_grad():
            decoder(torch.randn(1, 4, 16, 16))

    webui.shared.opts.set("memslice_vae", "attention")  # the stock decode: torch's own error reaches the wrapper
    text = _failing_oom(webui, "StableDiffusionProcessingTxt2Img", decode, width=128, height=128)
    assert readings[0] is True  # read precisely at the job's start
    assert "In this job: the VAE decode pass at 128x128 failed; with the 64.0 GiB free when this job started" in text
    assert "this job fits and the whole job (every pass) fits up to" in text
    assert "this size was within it, so that reading may be optimistic" in text


def _oom(*_args, **_kwargs):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")  # torch 2.1.2 and 2.13


def _small_unet(env):
    _, _, openaimodel = import_ldm()
    return openaimodel.UNetModel(
        image_size=32, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1],
        num_res_blocks=1, channel_mult=[1, 2], num_head_channels=8, use_spatial_transformer=True,
        transformer_depth=1, context_dim=32, legacy=False,
    ).eval()  # fmt: skip


def _small_vae(env):
    import contextlib
    import io

    config = dict(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=[], in_channels=3,
                  resolution=64, z_channels=4, dropout=0.0)  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        return env.ldm_model.Encoder(double_z=True, **config).eval(), env.ldm_model.Decoder(**config).eval()


def _failing_oom(env, p_class, sample, **p_kwargs):
    return _failing_job(env, p_class, sample, raises=torch.cuda.OutOfMemoryError, **p_kwargs)


def test_an_out_of_memory_error_outside_attention_names_its_pass(webui):
    """A convolution that runs out of memory inside the real ldm Decoder, Encoder or UNetModel: the webui shows
    the error's text, so it names the pass (from the innermost model forward and its input's size) and what fits."""
    select(webui, TITLES["auto"])
    hires = dict(width=512, height=512, enable_hr=True, hr_upscale_to_x=1024, hr_upscale_to_y=1024)
    encoder, decoder = _small_vae(webui)
    decoder.up[0].block[0].conv1.forward = _oom  # inside the decoder's up blocks, where a 2k decode fails

    def decode(p):
        with torch.no_grad():
            decoder(torch.randn(1, 4, 128, 128))  # 1024 px of latent

    webui.shared.opts.set("memslice_vae", "attention")  # the stock decode: torch's error is annotated as it is
    expected = webui.memslice.plan_for(512, 512, 1, hr_width=1024, hr_height=1024)["max_square_resolution"]
    text = _failing_oom(webui, "StableDiffusionProcessingTxt2Img", decode, **hires)
    assert text.startswith("CUDA out of memory. Tried to allocate 2.00 GiB. In this job: the VAE decode (hires) pass")
    assert "at 1024x1024 failed" in text and f"fits up to {expected}x{expected} (first pass" in text
    webui.shared.opts.set("memslice_vae", "auto")

    encoder.down[0].block[0].conv1.forward = _oom

    def encode(p):
        with torch.no_grad():
            encoder(torch.randn(1, 3, 64, 96))

    webui.shared.opts.set("memslice_vae", "attention")
    text = _failing_oom(webui, "StableDiffusionProcessingImg2Img", encode, width=96, height=64)
    assert "In this job: the VAE encode pass at 96x64 failed" in text
    webui.shared.opts.set("memslice_vae", "auto")

    unet = _small_unet(webui)
    unet.output_blocks[0][0].in_layers[2].forward = _oom  # a ResBlock convolution on the way up

    def unet_hires(p):
        p.is_hr_pass = True
        with torch.no_grad():
            unet(torch.randn(2, 4, 16, 16), torch.tensor([1, 1]), context=torch.randn(2, 77, 32))

    text = _failing_oom(webui, "StableDiffusionProcessingTxt2Img", unet_hires, width=64, height=64, enable_hr=True,
                        hr_upscale_to_x=128, hr_upscale_to_y=128)  # fmt: skip
    assert "In this job: the UNet (hires) pass at 128x128 failed" in text


def test_out_of_memory_errors_are_left_alone_where_memslice_cannot_say_more(webui):
    """Not memslice's job (a built-in optimization runs), not inside a model, not out of memory: unchanged."""
    _, decoder = _small_vae(webui)
    decoder.up[0].block[0].conv1.forward = _oom

    def decode(p):
        with torch.no_grad():
            decoder(torch.randn(1, 4, 16, 16))

    select(webui, TITLES["auto"])
    assert "In this job" not in _failing_oom(webui, "StableDiffusionProcessingTxt2Img", lambda p: _oom())
    select(webui, "Doggettx")
    assert "In this job" not in _failing_oom(webui, "StableDiffusionProcessingTxt2Img", decode)
    select(webui, TITLES["auto"])
    decoder.up[0].block[0].conv1.forward = lambda *a: 1 / 0
    script = webui.script.MemsliceScript()
    with pytest.raises(ZeroDivisionError) as info:
        webui.processing.process_images(webui.processing.StableDiffusionProcessingTxt2Img(scripts=[script]), decode)
    assert "In this job" not in str(info.value)


def test_the_failure_wrapper_is_a_memslice_entrys_alone(webui):
    """A memslice entry's apply() wraps the webui's process_images_inner once (Reload UI and re-applying keep one
    wrapper); a built-in's selection undoes memslice and unwraps it: no memslice frame in its tracebacks."""
    original = webui.processing.process_images_inner
    assert not getattr(original, "_memslice_annotates_oom", False)  # before any memslice entry is applied
    select(webui, TITLES["auto"])
    first = webui.processing.process_images_inner
    assert getattr(first, "_memslice_annotates_oom", False) and first.__wrapped__ is original
    reload_ui(webui)
    select(webui, TITLES["doggettx"])
    again = webui.processing.process_images_inner
    assert again.__wrapped__ is original  # one wrapper, never a wrapper of a wrapper
    select(webui, "Doggettx")
    assert webui.processing.process_images_inner is original

    def sample(p):
        raise MemoryError("out of memory")

    with pytest.raises(MemoryError) as info:
        generate(webui, sample)
    frames = []
    tb = info.value.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    assert not any("lib_memslice" in f for f in frames)
