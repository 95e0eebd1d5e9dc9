"""Fake of the optimizer selection in modules/sd_hijack.py, with 1.10.1's exact order of undo and apply."""

from __future__ import annotations

import ldm.modules.attention
import ldm.modules.diffusionmodules.model
import sgm.modules.attention
import sgm.modules.diffusionmodules.model

from modules import script_callbacks, sd_hijack_optimizations, shared
from modules.hypernetworks import hypernetwork

attention_CrossAttention_forward = ldm.modules.attention.CrossAttention.forward
diffusionmodules_model_AttnBlock_forward = ldm.modules.diffusionmodules.model.AttnBlock.forward

optimizers = []
current_optimizer = None


def list_optimizers():
    new_optimizers = script_callbacks.list_optimizers_callback()
    new_optimizers = [x for x in new_optimizers if x.is_available()]
    new_optimizers = sorted(new_optimizers, key=lambda x: x.priority, reverse=True)
    optimizers.clear()
    optimizers.extend(new_optimizers)


def apply_optimizations(option=None):
    global current_optimizer
    undo_optimizations()
    if len(optimizers) == 0:
        current_optimizer = None
        return ""
    if current_optimizer is not None:
        current_optimizer.undo()
        current_optimizer = None
    selection = option or shared.opts.cross_attention_optimization
    if selection == "Automatic" and len(optimizers) > 0:
        matching = [x for x in optimizers if x.cmd_opt and getattr(shared.cmd_opts, x.cmd_opt, False)]
        matching_optimizer = next(iter(matching), optimizers[0])
    else:
        matching_optimizer = next(iter([x for x in optimizers if x.title() == selection]), None)
    if selection == "None":
        matching_optimizer = None
    elif selection == "Automatic" and shared.cmd_opts.disable_opt_split_attention:
        matching_optimizer = None
    elif matching_optimizer is None:
        matching_optimizer = optimizers[0]
    if matching_optimizer is not None:
        matching_optimizer.apply()
        current_optimizer = matching_optimizer
        return current_optimizer.name
    return ""


def undo_optimizations():
    ldm.modules.attention.CrossAttention.forward = hypernetwork.attention_CrossAttention_forward
    ldm.modules.diffusionmodules.model.AttnBlock.forward = diffusionmodules_model_AttnBlock_forward
    sgm.modules.attention.CrossAttention.forward = hypernetwork.attention_CrossAttention_forward
    sgm.modules.diffusionmodules.model.AttnBlock.forward = diffusionmodules_model_AttnBlock_forward


def register_builtin_optimizers():
    """What modules/initialize.py does after loading extension scripts."""
    script_callbacks.on_list_optimizers(sd_hijack_optimizations.list_optimizers)
