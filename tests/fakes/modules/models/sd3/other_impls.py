"""Fake of ``modules/models/sd3/other_impls.py`` (webui 1.10.1): the two names the MMDiT imports from it.

The real file also holds the CLIP and T5 encoders (their attention calls this same ``attention`` with a causal
mask or T5's position bias); memslice never touches them, so they are not faked.
"""

import torch
from torch import nn


def attention(q, k, v, heads, mask=None):
    """The webui's SD3 attention: heads split off the last dim (``view``, so v may come 3-D or as ``[B, N, H, d]``),
    one SDPA call with SDPA's default scale and the mask as given, heads joined again: ``[B, N, H*d]``."""
    b, _, width = q.shape
    d = width // heads
    q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(b, -1, heads * d)


class Mlp(nn.Module):
    """Linear, the activation module given, linear."""

    def __init__(
        self,
        in_features,
        hidden_features=None,
        out_features=None,
        act_layer=nn.GELU,
        bias=True,
        dtype=None,
        device=None,
    ):
        super().__init__()
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias, dtype=dtype, device=device)
        self.act = act_layer
        self.fc2 = nn.Linear(hidden_features, out_features or in_features, bias=bias, dtype=dtype, device=device)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))
