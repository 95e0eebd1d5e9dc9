"""Fake of modules/hypernetworks/hypernetwork.py: hypernetwork application and the unoptimized forward."""

from __future__ import annotations

import torch
from einops import rearrange

from modules import shared


class Hypernetwork:
    """Minimal stand-in: ``layers`` maps a context width to a (k, v) pair of modules, as the webui's does."""

    def __init__(self, layers):
        self.layers = layers


def apply_single_hypernetwork(hypernetwork, context_k, context_v, layer=None):
    hypernetwork_layers = (hypernetwork.layers if hypernetwork is not None else {}).get(context_k.shape[2], None)
    if hypernetwork_layers is None:
        return context_k, context_v
    if layer is not None:
        layer.hyper_k = hypernetwork_layers[0]
        layer.hyper_v = hypernetwork_layers[1]
    context_k = hypernetwork_layers[0](context_k)
    context_v = hypernetwork_layers[1](context_v)
    return context_k, context_v


def apply_hypernetworks(hypernetworks, context, layer=None):
    context_k = context
    context_v = context
    for hypernetwork in hypernetworks:
        context_k, context_v = apply_single_hypernetwork(hypernetwork, context_k, context_v, layer)
    return context_k, context_v


def attention_CrossAttention_forward(self, x, context=None, mask=None, **kwargs):
    """The webui's unoptimized CrossAttention forward: hypernetworks, einsum attention, ldm keep-mask."""
    h = self.heads
    q = self.to_q(x)
    context = x if context is None else context
    context_k, context_v = apply_hypernetworks(shared.loaded_hypernetworks, context, self)
    k = self.to_k(context_k)
    v = self.to_v(context_v)
    q, k, v = (rearrange(t, "b n (h d) -> (b h) n d", h=h) for t in (q, k, v))
    sim = torch.einsum("b i d, b j d -> b i j", q, k) * self.scale
    if mask is not None:
        mask = rearrange(mask, "b ... -> b (...)")
        max_neg_value = -torch.finfo(sim.dtype).max
        mask = mask[:, None, :].repeat_interleave(h, dim=0)
        sim.masked_fill_(~mask, max_neg_value)
    attn = sim.softmax(dim=-1)
    out = torch.einsum("b i j, b j d -> b i d", attn, v)
    out = rearrange(out, "(b h) n d -> b n (h d)", h=h)
    return self.to_out(out)
