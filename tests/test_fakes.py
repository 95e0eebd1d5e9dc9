"""The fakes must keep the webui 1.10.1 / sgm signatures: a drifting fake would make the glue tests meaningless."""

from __future__ import annotations

import inspect

import pytest

EXPECTED = {
    "modules.script_callbacks.add_callback": "(callbacks, fun, *, name=None, category='unknown', filename=None)",
    "modules.script_callbacks.on_list_optimizers": "(callback, *, name=None)",
    "modules.script_callbacks.on_ui_settings": "(callback, *, name=None)",
    "modules.script_callbacks.on_app_started": "(callback, *, name=None)",
    "modules.script_callbacks.on_model_loaded": "(callback, *, name=None)",
    "modules.script_callbacks.on_script_unloaded": "(callback, *, name=None)",
    "modules.script_callbacks.app_started_callback": "(demo, app)",
    "modules.script_callbacks.model_loaded_callback": "(sd_model)",
    "modules.options.OptionInfo.__init__": (
        "(self, default=None, label='', component=None, component_args=None, onchange=None, section=None,"
        " refresh=None, comment_before='', comment_after='', infotext=None, restrict_api=False, category_id=None)"
    ),
    "modules.options.Options.set": "(self, key, value, is_api=False, run_callbacks=True)",
    "modules.options.Options.add_option": "(self, key, info)",
    "modules.options.Options.onchange": "(self, key, func, call=True)",
    "modules.sd_hijack_optimizations.SdOptimization.title": "(self)",
    "modules.sd_hijack_optimizations.SdOptimization.apply": "(self)",
    "modules.sd_hijack_optimizations.SdOptimization.undo": "(self)",
    "modules.sd_hijack_optimizations.SdOptimization.is_available": "(self)",
    "modules.sd_hijack.apply_optimizations": "(option=None)",
    "modules.sd_hijack.undo_optimizations": "()",
    "modules.sd_hijack.list_optimizers": "()",
    "modules.devices.without_autocast": "(disable=False)",
    "modules.hypernetworks.hypernetwork.apply_hypernetworks": "(hypernetworks, context, layer=None)",
    "modules.hypernetworks.hypernetwork.attention_CrossAttention_forward": (
        "(self, x, context=None, mask=None, **kwargs)"
    ),
    "modules.scripts.Script.process": "(self, p, *args)",
    "modules.scripts.Script.postprocess": "(self, p, processed, *args)",
    "modules.scripts.Script.show": "(self, is_img2img)",
    "sgm.modules.attention.CrossAttention.__init__": (
        "(self, query_dim, context_dim=None, heads=8, dim_head=64, dropout=0.0, backend=None)"
    ),
    "sgm.modules.attention.CrossAttention.forward": (
        "(self, x, context=None, mask=None, additional_tokens=None, n_times_crossframe_attn_in_self=0)"
    ),
    "sgm.modules.attention.BasicTransformerBlock.__init__": (
        "(self, dim, n_heads, d_head, dropout=0.0, context_dim=None, gated_ff=True, checkpoint=True,"
        " disable_self_attn=False, attn_mode='softmax', sdp_backend=None)"
    ),
    "sgm.modules.attention.BasicTransformerBlock.forward": (
        "(self, x, context=None, additional_tokens=None, n_times_crossframe_attn_in_self=0)"
    ),
    "sgm.modules.diffusionmodules.model.AttnBlock.forward": "(self, x, **kwargs)",
    "sgm.modules.diffusionmodules.model.AttnBlock.attention": "(self, h_: torch.Tensor) -> torch.Tensor",
}


def resolve(env, dotted):
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


@pytest.mark.parametrize("dotted", sorted(EXPECTED))
def test_fake_signature_matches_1_10_1(webui, dotted):
    assert str(inspect.signature(resolve(webui, dotted))) == EXPECTED[dotted]


def test_builtin_entries_have_the_1_10_1_titles_and_priorities(webui):
    entries = {e.title(): e for e in webui.sd_hijack.optimizers}
    assert entries["sdp - scaled dot product"].priority == 70
    assert entries["Doggettx"].priority == 90
    assert entries["InvokeAI"].priority == 1000  # no CUDA, not MPS
    assert entries["sub-quadratic"].priority == 10
    base = webui.sd_hijack_optimizations.SdOptimization
    assert (base.name, base.label, base.cmd_opt, base.priority) == (None, None, None, 0)
