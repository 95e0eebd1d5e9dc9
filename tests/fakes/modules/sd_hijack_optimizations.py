"""Fake of modules/sd_hijack_optimizations.py: SdOptimization and the seven built-in entries with the 1.10.1
metadata (names, labels, flags, priorities, class hierarchy, which attributes each apply() patches and with which
forward's name).

The built-ins' forwards are simple stand-ins (plain SDPA / the unoptimized einsum / ldm's stock AttnBlock); what
matters to memslice is how the entries are named, prioritised, applied and undone.
"""

from __future__ import annotations

import ldm.modules.attention
import ldm.modules.diffusionmodules.model
import sgm.modules.attention
import sgm.modules.diffusionmodules.model
import torch

from modules import shared
from modules.hypernetworks import hypernetwork

diffusionmodules_model_AttnBlock_forward = ldm.modules.diffusionmodules.model.AttnBlock.forward
sgm_diffusionmodules_model_AttnBlock_forward = sgm.modules.diffusionmodules.model.AttnBlock.forward


class SdOptimization:
    name: str = None
    label: str | None = None
    cmd_opt: str | None = None
    priority: int = 0

    def title(self):
        if self.label is None:
            return self.name
        return f"{self.name} - {self.label}"

    def is_available(self):
        return True

    def apply(self):
        pass

    def undo(self):
        ldm.modules.attention.CrossAttention.forward = hypernetwork.attention_CrossAttention_forward
        ldm.modules.diffusionmodules.model.AttnBlock.forward = diffusionmodules_model_AttnBlock_forward
        sgm.modules.attention.CrossAttention.forward = hypernetwork.attention_CrossAttention_forward
        sgm.modules.diffusionmodules.model.AttnBlock.forward = sgm_diffusionmodules_model_AttnBlock_forward


def scaled_dot_product_attention_forward(self, x, context=None, mask=None, **kwargs):
    batch_size, sequence_length, inner_dim = x.shape
    h = self.heads
    q_in = self.to_q(x)
    context = x if context is None else context
    context_k, context_v = hypernetwork.apply_hypernetworks(shared.loaded_hypernetworks, context)
    k_in = self.to_k(context_k)
    v_in = self.to_v(context_v)
    head_dim = inner_dim // h
    q, k, v = (t.view(batch_size, -1, h, head_dim).transpose(1, 2) for t in (q_in, k_in, v_in))
    dtype = q.dtype
    if shared.opts.upcast_attn:
        q, k, v = q.float(), k.float(), v.float()
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(batch_size, -1, h * head_dim).to(dtype)
    return self.to_out(out)


def sdp_attnblock_forward(self, x):
    h_ = self.norm(x)
    q, k, v = self.q(h_), self.k(h_), self.v(h_)
    b, c, h, w = q.shape
    q, k, v = (t.reshape(b, c, h * w).transpose(1, 2).contiguous() for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


def split_cross_attention_forward(self, x, context=None, mask=None, **kwargs):
    return hypernetwork.attention_CrossAttention_forward(self, x, context, mask)


def cross_attention_attnblock_forward(self, x):
    return diffusionmodules_model_AttnBlock_forward(self, x)


def scaled_dot_product_no_mem_attention_forward(self, x, context=None, mask=None, **kwargs):
    return scaled_dot_product_attention_forward(self, x, context, mask)


def sdp_no_mem_attnblock_forward(self, x):
    return sdp_attnblock_forward(self, x)


def split_cross_attention_forward_v1(self, x, context=None, mask=None, **kwargs):
    return hypernetwork.attention_CrossAttention_forward(self, x, context, mask)


def split_cross_attention_forward_invokeAI(self, x, context=None, mask=None, **kwargs):
    return hypernetwork.attention_CrossAttention_forward(self, x, context, mask)


def sub_quad_attention_forward(self, x, context=None, mask=None, **kwargs):
    return hypernetwork.attention_CrossAttention_forward(self, x, context, mask)


def sub_quad_attnblock_forward(self, x):
    return diffusionmodules_model_AttnBlock_forward(self, x)


def xformers_attention_forward(self, x, context=None, mask=None, **kwargs):
    return scaled_dot_product_attention_forward(self, x, context, mask)


def xformers_attnblock_forward(self, x):
    return sdp_attnblock_forward(self, x)


class SdOptimizationXformers(SdOptimization):
    name = "xformers"
    cmd_opt = "xformers"
    priority = 100

    def is_available(self):
        return shared.cmd_opts.force_enable_xformers or (
            shared.xformers_available
            and torch.cuda.is_available()
            and (6, 0) <= torch.cuda.get_device_capability(shared.device) <= (9, 0)
        )

    def apply(self):
        ldm.modules.attention.CrossAttention.forward = xformers_attention_forward
        ldm.modules.diffusionmodules.model.AttnBlock.forward = xformers_attnblock_forward
        sgm.modules.attention.CrossAttention.forward = xformers_attention_forward
        sgm.modules.diffusionmodules.model.AttnBlock.forward = xformers_attnblock_forward


class SdOptimizationSdpNoMem(SdOptimization):
    name = "sdp-no-mem"
    label = "scaled dot product without memory efficient attention"
    cmd_opt = "opt_sdp_no_mem_attention"
    priority = 80

    def is_available(self):
        return hasattr(torch.nn.functional, "scaled_dot_product_attention") and callable(
            torch.nn.functional.scaled_dot_product_attention
        )

    def apply(self):
        ldm.modules.attention.CrossAttention.forward = scaled_dot_product_no_mem_attention_forward
        ldm.modules.diffusionmodules.model.AttnBlock.forward = sdp_no_mem_attnblock_forward
        sgm.modules.attention.CrossAttention.forward = scaled_dot_product_no_mem_attention_forward
        sgm.modules.diffusionmodules.model.AttnBlock.forward = sdp_no_mem_attnblock_forward


class SdOptimizationSdp(SdOptimizationSdpNoMem):
    name = "sdp"
    label = "scaled dot product"
    cmd_opt = "opt_sdp_attention"
    priority = 70

    def apply(self):
        ldm.modules.attention.CrossAttention.forward = scaled_dot_product_attention_forward
        ldm.modules.diffusionmodules.model.AttnBlock.forward = sdp_attnblock_forward
        sgm.modules.attention.CrossAttention.forward = scaled_dot_product_attention_forward
        sgm.modules.diffusionmodules.model.AttnBlock.forward = sdp_attnblock_forward


class SdOptimizationSubQuad(SdOptimization):
    name = "sub-quadratic"
    cmd_opt = "opt_sub_quad_attention"

    @property
    def priority(self):
        return 1000 if shared.device.type == "mps" else 10

    def apply(self):
        ldm.modules.attention.CrossAttention.forward = sub_quad_attention_forward
        ldm.modules.diffusionmodules.model.AttnBlock.forward = sub_quad_attnblock_forward
        sgm.modules.attention.CrossAttention.forward = sub_quad_attention_forward
        sgm.modules.diffusionmodules.model.AttnBlock.forward = sub_quad_attnblock_forward


class SdOptimizationV1(SdOptimization):
    name = "V1"
    label = "original v1"
    cmd_opt = "opt_split_attention_v1"
    priority = 10

    def apply(self):
        ldm.modules.attention.CrossAttention.forward = split_cross_attention_forward_v1
        sgm.modules.attention.CrossAttention.forward = split_cross_attention_forward_v1


class SdOptimizationInvokeAI(SdOptimization):
    name = "InvokeAI"
    cmd_opt = "opt_split_attention_invokeai"

    @property
    def priority(self):
        return 1000 if shared.device.type != "mps" and not torch.cuda.is_available() else 10

    def apply(self):
        ldm.modules.attention.CrossAttention.forward = split_cross_attention_forward_invokeAI
        sgm.modules.attention.CrossAttention.forward = split_cross_attention_forward_invokeAI


class SdOptimizationDoggettx(SdOptimization):
    name = "Doggettx"
    cmd_opt = "opt_split_attention"
    priority = 90

    def apply(self):
        ldm.modules.attention.CrossAttention.forward = split_cross_attention_forward
        ldm.modules.diffusionmodules.model.AttnBlock.forward = cross_attention_attnblock_forward
        sgm.modules.attention.CrossAttention.forward = split_cross_attention_forward
        sgm.modules.diffusionmodules.model.AttnBlock.forward = cross_attention_attnblock_forward


def list_optimizers(res):
    res.extend(
        [
            SdOptimizationXformers(),
            SdOptimizationSdpNoMem(),
            SdOptimizationSdp(),
            SdOptimizationSubQuad(),
            SdOptimizationV1(),
            SdOptimizationInvokeAI(),
            SdOptimizationDoggettx(),
        ]
    )
