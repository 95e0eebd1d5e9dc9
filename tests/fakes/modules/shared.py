"""Fake of modules/shared.py: the globals memslice reads."""

from __future__ import annotations

import argparse

import torch

from modules.options import OptionInfo, Options

options_templates = {
    "upcast_attn": OptionInfo(
        False, "Upcast cross attention layer to float32", section=("sd", "Stable Diffusion"), category_id="sd"
    ),
    "cross_attention_optimization": OptionInfo(
        "Automatic", "Cross attention optimization", section=("optimizations", "Optimizations"), category_id="sd"
    ),
}
opts = Options(dict(options_templates), set())

cmd_opts = argparse.Namespace(
    xformers=False,
    force_enable_xformers=False,
    opt_split_attention=False,
    opt_sdp_attention=False,
    opt_sdp_no_mem_attention=False,
    opt_split_attention_v1=False,
    opt_sub_quad_attention=False,
    opt_split_attention_invokeai=False,
    disable_opt_split_attention=False,
    api_auth=None,
    gradio_auth=None,
    gradio_auth_path=None,
    opt_memslice=False,
)
device = torch.device("cpu")
xformers_available = False
loaded_hypernetworks: list = []
sd_model = None
