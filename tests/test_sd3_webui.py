"""SD3 in the (fake) webui 1.10.1: every memslice entry routes the MMDiT's joint attention and the SD3 VAE's attention
through attend(), and every way the webui leaves an entry puts back only what is still memslice's.

The fakes of ``modules.models.sd3`` (tests/fakes, checked against the real files with WEBUI_DIR: test_fakes.py and
test_sd3_plan.py) keep the webui's calling convention: ``block_mixing`` looks the module global ``attention`` up at
every call, q and k ``[B, N, H*64]``, v ``[B, N, H, 64]``; the VAE's own ``AttnBlock``.
"""

from __future__ import annotations

import functools
import importlib

import pytest
import torch

from lib_memslice.limits import NotEnoughMemory

from .test_webui import TITLES, _failing_job, select

DEPTH = 2  # joint blocks = heads (of 64)


def sd3_modules():
    names = ("mmdit", "sd3_impls", "other_impls")
    return tuple(importlib.import_module(f"modules.models.sd3.{name}") for name in names)


def tiny_mmdit(seed: int = 0):
    """An MMDiT as ``sd3_impls.BaseModel`` builds one from a checkpoint (2 joint blocks of 2 heads, 16 patches a
    side), its zero-initialised ``pos_embed`` filled."""
    mmdit, _, _ = sd3_modules()
    torch.manual_seed(seed)
    context = {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 64 * DEPTH}}
    model = mmdit.MMDiT(input_size=None, pos_embed_scaling_factor=None, pos_embed_offset=None, pos_embed_max_size=16,
                        patch_size=2, in_channels=16, depth=DEPTH, num_patches=256, adm_in_channels=2048,
                        context_embedder_config=context)  # fmt: skip
    with torch.no_grad():
        model.pos_embed.normal_()
    return model.eval()


def mmdit_inputs(size: int = 128, text: int = 154, batch: int = 2):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 16, size // 8, size // 8, generator=g), torch.full((batch,), 500.0),
            torch.randn(batch, 2048, generator=g), torch.randn(batch, text, 4096, generator=g))  # fmt: skip


def loaded_sd3(webui):
    """A loaded SD3 model as the webui holds it (``is_sd3``, the MMDiT under ``model.diffusion_model``, its VAE),
    with on_model_loaded run."""
    _, sd3_impls, _ = sd3_modules()
    mmdit = tiny_mmdit()
    vae = torch.nn.Module()
    vae.encoder, vae.decoder = sd3_impls.VAEEncoder(ch=32), sd3_impls.VAEDecoder(ch=32)
    model = type("SD3", (), {"is_sd3": True, "is_sdxl": False, "is_sd2": False})()
    model.model = type("BaseModel", (), {"diffusion_model": mmdit})()
    model.first_stage_model = vae
    webui.script_callbacks.model_loaded_callback(model)
    return model


def run_mmdit(model, size: int = 128, text: int = 154):
    """One MMDiT forward of a loaded SD3 model, called as ``BaseModel.apply_model`` calls it."""
    x, t, y, context = mmdit_inputs(size, text)
    with torch.no_grad():
        return model.model.diffusion_model(x, t, context=context, y=y)


def originals():
    mmdit, sd3_impls, _ = sd3_modules()
    return mmdit.__dict__["attention"], sd3_impls.AttnBlock.__dict__["forward"]


@pytest.mark.parametrize("strategy", list(TITLES))
def test_every_entry_slices_sd3s_joint_and_vae_attention(webui, strategy):
    """Under each entry's rule (the budget makes every one slice): the joint calls and the VAE's reach attend(),
    the MMDiT's output equals the webui's own attention's."""
    mmdit_module, sd3_impls, other_impls = sd3_modules()
    model = loaded_sd3(webui)
    stock = run_mmdit(model)
    vae_block = sd3_impls.AttnBlock(64).eval()
    h = torch.randn(1, 64, 16, 16)
    with torch.no_grad():
        stock_vae = vae_block(h)
    assert select(webui, TITLES[strategy]) == f"memslice-{strategy}"
    assert mmdit_module.attention.__memslice__ == strategy and sd3_impls.AttnBlock.forward.__memslice__ == strategy
    assert other_impls.attention is not mmdit_module.attention  # the text encoders' (masked) calls stay the webui's
    webui.shared.opts.set("memslice_budget_gb", 400 / 1024**2)  # 400 KiB: a whole joint call is 960 KiB
    webui.shared.opts.set("memslice_kernel", "einsum")
    webui.memslice.STATS.start_job()
    sliced = run_mmdit(model)
    with torch.no_grad():
        sliced_vae = vae_block(h)
    records = webui.memslice.STATS.recent()
    joint = [r for r in records if r.site == "mmdit.joint"]
    assert len(joint) == DEPTH and all(r.slices > 1 for r in joint)
    assert (joint[0].batch_heads, joint[0].q_tokens, joint[0].head_dim) == (2 * DEPTH, 64 + 154, 64)
    assert [r.site for r in records if r.site == "vae.mid"] == ["vae.mid"]
    assert (sliced - stock).abs().max().item() < 1e-4
    assert (sliced_vae - stock_vae).abs().max().item() < 1e-4


def test_undo_switching_none_and_a_checkpoint_change_restore_only_what_is_memslices(webui):
    mmdit, sd3_impls, _ = sd3_modules()
    stock = originals()
    select(webui, TITLES["auto"])
    auto = originals()
    assert all(f.__memslice__ == "auto" for f in auto)
    select(webui, TITLES["heads"])  # switching: the previous entry's undo, then this one's apply
    assert all(f.__memslice__ == "heads" for f in originals())
    assert [f.__memslice_original__ for f in originals()] == list(stock)  # the webui's own handed on, never auto's
    webui.sd_hijack.undo_optimizations()  # a checkpoint change (undo_hijack): only the four ldm/sgm attributes
    assert all(f.__memslice__ == "heads" for f in originals())
    select(webui, TITLES["heads"])  # hijack() re-applies: the entry's undo, then its apply again
    assert all(f.__memslice__ == "heads" for f in originals())
    select(webui, "None")
    assert originals() == stock
    select(webui, TITLES["doggettx"])
    select(webui, "sdp - scaled dot product")  # a built-in: memslice's undo runs, SD3 is the webui's own again
    assert originals() == stock

    select(webui, TITLES["auto"])
    webui.sd_hijack.current_optimizer.apply()  # applied again without its undo (as another extension might)
    assert [f.__memslice_original__ for f in originals()] == list(stock)
    select(webui, "None")
    assert originals() == stock

    select(webui, TITLES["auto"])
    memslices = mmdit.attention

    @functools.wraps(memslices)  # another extension wraps memslice's function: it carries memslice's attributes
    def other(*args, **kwargs):
        return memslices(*args, **kwargs)

    mmdit.attention = other
    select(webui, "None")
    assert mmdit.attention is other  # not the function memslice set: left as it is
    assert sd3_impls.AttnBlock.__dict__["forward"] is stock[1]


def test_an_apply_that_raises_leaves_nothing_half_patched(webui, monkeypatch):
    """The SD3 VAE's forward fails to install after the joint attention was bound: the error reaches the webui,
    which then restores only the four ldm/sgm attributes (``undo_optimizations``); memslice has put back the rest."""
    from lib_memslice.webui import sd3

    stock = originals()
    ldm_decoder = webui.ldm_model.Decoder.forward
    inner = webui.processing.process_images_inner

    def broken(*args, **kwargs):
        raise RuntimeError("cannot build the VAE forward")

    monkeypatch.setattr(sd3, "make_attnblock_forward", broken)
    with pytest.raises(RuntimeError, match="cannot build"):
        select(webui, TITLES["auto"])
    webui.sd_hijack.undo_optimizations()  # StableDiffusionModelHijack.apply_optimizations' except
    assert webui.sd_hijack.current_optimizer is None
    assert originals() == stock
    assert webui.ldm_model.Decoder.forward is ldm_decoder
    assert webui.processing.process_images_inner is inner
    assert webui.memslice.active_entry() is None


def test_a_failing_sd3_job_names_the_mmdit_or_vae_pass(webui):
    """The failure context finds SD3's own modules in the traceback: the MMDiT (its latent input, 8 px a pixel)
    and SD3's VAEDecoder, and plans the whole job for the loaded SD3 model."""
    model = loaded_sd3(webui)
    select(webui, TITLES["auto"])
    webui.shared.opts.set("memslice_budget_gb", 1 / 4096)  # 256 KiB: a joint call's output at 256 px is 410 KiB

    def sample(p):
        run_mmdit(model, size=256)

    text = _failing_job(webui, "StableDiffusionProcessingTxt2Img", sample, width=256, height=256)
    assert text.startswith("memslice: not enough memory for attention at mmdit.joint")
    assert "the largest square image this attention layer alone fits is" in text  # the prompt length is known
    assert "In this job: the MMDiT pass at 256x256 failed" in text
    plan = webui.memslice.plan_for(256, 256, 1)
    assert plan["model"] == "sd3" and [p["name"] for p in plan["passes"]] == ["MMDiT", "VAE decode"]

    def decode(p):
        with torch.no_grad():
            model.first_stage_model.decoder(torch.randn(1, 16, 64, 64))

    webui.shared.opts.set("memslice_budget_gb", 1 / 4096)
    text = _failing_job(webui, "StableDiffusionProcessingTxt2Img", decode, width=512, height=512)
    assert text.startswith("memslice: not enough memory for attention at vae.mid")
    assert "In this job: the VAE decode pass at 512x512 failed" in text


def test_the_loaded_model_is_planned_as_sd3_and_its_prompt_length_is_watched(webui):
    from lib_memslice.webui import sd3

    model = loaded_sd3(webui)
    spec = webui.memslice.planner.loaded_spec()
    assert spec.name == "sd3" and spec.latent_channels == 16 and spec.denoiser == "MMDiT"
    joint = next(s for s in spec.sites if s.name == "mmdit.joint")
    assert (joint.heads, joint.head_dim, joint.count) == (DEPTH, 64, DEPTH) and spec.context_dim == 4096
    assert next(s for s in spec.sites if s.name == "vae.mid").count == 2  # SD3's own AttnBlock, in both halves
    plan = webui.memslice.plan_for(1000, 1000, 1)  # the webui cuts the sizes to 16 px: the plan says the real ones
    assert [(p["name"], p["width"]) for p in plan["passes"]] == [("MMDiT", 992), ("VAE decode", 992)]
    assert plan["max_square_resolution"] % 16 == 0 and spec.max_side == 256  # its pos_embed: 16 patches a side
    assert plan["max_square_resolution"] <= 256 and webui.memslice.plan_for(272, 256, 1)["verdict"] == "does not fit"
    select(webui, TITLES["auto"])
    run_mmdit(model, text=308)
    assert sd3.text_tokens() == 308
    webui.script_callbacks.model_loaded_callback(type("SDXL", (), {"is_sdxl": True})())  # the hook goes
    run_mmdit(model, text=154)
    assert sd3.text_tokens() == 308


def test_the_webuis_sd3_attention_ignores_upcast_memslices_honours_it(webui, monkeypatch):
    """'Upcast cross attention layer to float32': memslice's joint call is planned and computed in float32 and hands
    back the input's dtype (the webui's own SD3 attention ignores the option)."""
    from lib_memslice import joint

    mmdit, _, _ = sd3_modules()
    select(webui, TITLES["auto"])
    asked = []

    def attend(*args, **kwargs):
        asked.append(kwargs["upcast"])
        return joint_attend(*args, **kwargs)

    joint_attend = joint.attend
    monkeypatch.setattr(joint, "attend", attend)
    q, k = (torch.randn(2, 218, 128).bfloat16() for _ in range(2))
    v = torch.randn(2, 218, 2, 64).bfloat16()
    for upcast in (False, True):
        webui.shared.opts.set("upcast_attn", upcast)
        webui.memslice.STATS.start_job()
        out = mmdit.attention(q, k, v, 2)
        assert out.dtype == torch.bfloat16 and out.shape == (2, 218, 128)
        assert webui.memslice.STATS.recent()[-1].site == "mmdit.joint"
    assert asked == [False, True]


def test_no_sd3_modules_means_nothing_to_patch(webui, monkeypatch):
    """A webui before 1.10 has no modules.models.sd3: the entries apply and undo as before."""
    import sys

    from lib_memslice.webui import sd3

    monkeypatch.setitem(sys.modules, "modules.models.sd3", None)  # import fails
    assert sd3.modules() is None
    assert select(webui, TITLES["auto"]) == "memslice-auto"
    assert select(webui, "None") == ""


def test_not_enough_memory_is_what_the_joint_call_raises(webui):
    """The joint call's refusal is memslice's NotEnoughMemory (the failure wrapper annotates that type)."""
    mmdit, _, _ = sd3_modules()
    select(webui, TITLES["auto"])
    webui.shared.opts.set("memslice_budget_gb", 1 / 2**20)
    with pytest.raises(NotEnoughMemory):
        mmdit.attention(torch.randn(2, 300, 128), torch.randn(2, 300, 128), torch.randn(2, 300, 2, 64), 2)
