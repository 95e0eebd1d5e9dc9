"""Fake of ``modules/models/sd3/mmdit.py`` (webui 1.10.1): SD3's MMDiT as the webui runs it, for SD3 Medium's
options only (no register tokens, LayerNorm, GELU MLP, no qk norm, no sin-cos tables: ``pos_embed`` is a buffer
the checkpoint fills).

What memslice depends on, as the real file does it: ``attention`` is imported by name from ``other_impls`` and looked
up in this module's globals at every call; :func:`block_mixing` makes the one call per joint block over the
prompt's tokens and the image's, the prompt's first; q and k reach it as ``[B, N, H*d]`` (``pre_attention``
reshapes them, which copies them out of the qkv projection), v as the ``[B, N, H, d]`` view ``split_qkv`` left; the
last block's context half is ``pre_only``; the head dim is 64 and the heads are ``depth`` (hidden ``64 * depth``);
a ``pos_embed`` of ``P * P`` patches caps the image at ``P`` patches a side.
"""

import math

import torch
import torch.nn as nn
from einops import rearrange

from modules.models.sd3.other_impls import Mlp, attention


class PatchEmbed(nn.Module):
    """A strided convolution, flattened to ``[B, patches, embed_dim]``."""

    def __init__(
        self,
        img_size: int | None = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        flatten: bool = True,
        bias: bool = True,
        strict_img_size: bool = True,
        dynamic_img_pad: bool = False,
        dtype=None,
        device=None,
    ):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.flatten = flatten
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size, bias=bias, dtype=dtype, device=device)

    def forward(self, x):
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2) if self.flatten else x


def modulate(x, shift, scale):
    shift = torch.zeros_like(scale) if shift is None else shift
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the timestep through a two-layer MLP."""

    def __init__(self, hidden_size, frequency_embedding_size=256, dtype=None, device=None):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True, dtype=dtype, device=device),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True, dtype=dtype, device=device),
        )

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
        angles = t[:, None].float() * freqs[None]
        out = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
        if dim % 2:
            out = torch.cat([out, torch.zeros_like(out[:, :1])], dim=-1)
        return out.to(t.dtype) if torch.is_floating_point(t) else out

    def forward(self, t, dtype, **kwargs):
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size).to(dtype))


class VectorEmbedder(nn.Module):
    """The pooled prompt vector through a two-layer MLP."""

    def __init__(self, input_dim: int, hidden_size: int, dtype=None, device=None):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(input_dim, hidden_size, bias=True, dtype=dtype, device=device),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True, dtype=dtype, device=device),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class QkvLinear(torch.nn.Linear):
    pass


def split_qkv(qkv, head_dim):
    """``[B, L, 3*H*d]`` -> q, k, v each a ``[B, L, H, d]`` view."""
    parts = qkv.reshape(qkv.shape[0], qkv.shape[1], 3, -1, head_dim).movedim(2, 0)
    return parts[0], parts[1], parts[2]


def optimized_attention(qkv, num_heads):
    return attention(qkv[0], qkv[1], qkv[2], num_heads)


class SelfAttention(nn.Module):
    ATTENTION_MODES = ("xformers", "torch", "torch-hb", "math", "debug")

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        attn_mode: str = "xformers",
        pre_only: bool = False,
        qk_norm: str | None = None,
        rmsnorm: bool = False,
        dtype=None,
        device=None,
    ):
        super().__init__()
        if qk_norm is not None:
            raise NotImplementedError("the fake MMDiT has SD3 Medium's options only (no qk norm)")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = QkvLinear(dim, dim * 3, bias=qkv_bias, dtype=dtype, device=device)
        if not pre_only:
            self.proj = nn.Linear(dim, dim, dtype=dtype, device=device)
        self.attn_mode = attn_mode
        self.pre_only = pre_only

    def pre_attention(self, x: torch.Tensor):
        q, k, v = split_qkv(self.qkv(x), self.head_dim)
        # q and k flattened (a copy: the views are strided), v left as the 4-D view
        return q.reshape(q.shape[0], q.shape[1], -1), k.reshape(q.shape[0], q.shape[1], -1), v

    def post_attention(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.pre_attention(x)
        return self.post_attention(attention(q, k, v, self.num_heads))


class DismantledBlock(nn.Module):
    """One stream of a joint block (adaLN-modulated attention and MLP), split around its attention call."""

    ATTENTION_MODES = ("xformers", "torch", "torch-hb", "math", "debug")

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        attn_mode: str = "xformers",
        qkv_bias: bool = False,
        pre_only: bool = False,
        rmsnorm: bool = False,
        scale_mod_only: bool = False,
        swiglu: bool = False,
        qk_norm: str | None = None,
        dtype=None,
        device=None,
        **block_kwargs,
    ):
        super().__init__()
        if rmsnorm or scale_mod_only or swiglu:
            raise NotImplementedError("the fake MMDiT has SD3 Medium's options only")
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6, dtype=dtype, device=device)
        self.attn = SelfAttention(hidden_size, num_heads, qkv_bias=qkv_bias, attn_mode=attn_mode, pre_only=pre_only,
                                  qk_norm=qk_norm, dtype=dtype, device=device)  # fmt: skip
        if not pre_only:
            self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6, dtype=dtype, device=device)
            self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=nn.GELU(approximate="tanh"),
                           dtype=dtype, device=device)  # fmt: skip
        mods = 2 if pre_only else 6
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden_size, mods * hidden_size, bias=True, dtype=dtype, device=device)
        )
        self.scale_mod_only = scale_mod_only
        self.pre_only = pre_only

    def pre_attention(self, x: torch.Tensor, c: torch.Tensor):
        if self.pre_only:
            shift_msa, scale_msa = self.adaLN_modulation(c).chunk(2, dim=1)
            return self.attn.pre_attention(modulate(self.norm1(x), shift_msa, scale_msa)), None
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        qkv = self.attn.pre_attention(modulate(self.norm1(x), shift_msa, scale_msa))
        return qkv, (x, gate_msa, shift_mlp, scale_mlp, gate_mlp)

    def post_attention(self, attn, x, gate_msa, shift_mlp, scale_mlp, gate_mlp):
        x = x + gate_msa.unsqueeze(1) * self.attn.post_attention(attn)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        (q, k, v), intermediates = self.pre_attention(x, c)
        return self.post_attention(attention(q, k, v, self.attn.num_heads), *intermediates)


def block_mixing(context, x, context_block, x_block, c):
    """One joint block: both streams' q, k, v joined (the prompt's tokens first), one ``attention`` call (the module
    global, looked up now), the result split back."""
    context_qkv, context_intermediates = context_block.pre_attention(context, c)
    x_qkv, x_intermediates = x_block.pre_attention(x, c)
    q, k, v = (torch.cat((context_qkv[i], x_qkv[i]), dim=1) for i in range(3))
    attn = attention(q, k, v, x_block.attn.num_heads)
    text = context_qkv[0].shape[1]
    context_attn, x_attn = attn[:, :text], attn[:, text:]
    context = None if context_block.pre_only else context_block.post_attention(context_attn, *context_intermediates)
    return context, x_block.post_attention(x_attn, *x_intermediates)


class JointBlock(nn.Module):
    def __init__(self, *args, **kwargs):
        super().__init__()
        pre_only = kwargs.pop("pre_only")
        qk_norm = kwargs.pop("qk_norm", None)
        self.context_block = DismantledBlock(*args, pre_only=pre_only, qk_norm=qk_norm, **kwargs)
        self.x_block = DismantledBlock(*args, pre_only=False, qk_norm=qk_norm, **kwargs)

    def forward(self, *args, **kwargs):
        return block_mixing(*args, context_block=self.context_block, x_block=self.x_block, **kwargs)


class FinalLayer(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        patch_size: int,
        out_channels: int,
        total_out_channels: int | None = None,
        dtype=None,
        device=None,
    ):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6, dtype=dtype, device=device)
        out = patch_size * patch_size * out_channels if total_out_channels is None else total_out_channels
        self.linear = nn.Linear(hidden_size, out, bias=True, dtype=dtype, device=device)
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True, dtype=dtype, device=device)
        )

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class MMDiT(nn.Module):
    def __init__(
        self,
        input_size: int | None = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        depth: int = 28,
        mlp_ratio: float = 4.0,
        learn_sigma: bool = False,
        adm_in_channels: int | None = None,
        context_embedder_config: dict | None = None,
        register_length: int = 0,
        attn_mode: str = "torch",
        rmsnorm: bool = False,
        scale_mod_only: bool = False,
        swiglu: bool = False,
        out_channels: int | None = None,
        pos_embed_scaling_factor: float | None = None,
        pos_embed_offset: float | None = None,
        pos_embed_max_size: int | None = None,
        num_patches=None,
        qk_norm: str | None = None,
        qkv_bias: bool = True,
        dtype=None,
        device=None,
    ):
        super().__init__()
        if register_length or learn_sigma:
            raise NotImplementedError("the fake MMDiT has SD3 Medium's options only")
        self.dtype = dtype
        self.in_channels = in_channels
        self.out_channels = out_channels if out_channels is not None else in_channels
        self.patch_size = patch_size
        self.pos_embed_max_size = pos_embed_max_size
        hidden_size = 64 * depth  # the head dim is always 64
        self.num_heads = depth
        strict = pos_embed_max_size is None
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, True, strict_img_size=strict,
                                     dtype=dtype, device=device)  # fmt: skip
        self.t_embedder = TimestepEmbedder(hidden_size, dtype=dtype, device=device)
        if adm_in_channels is not None:
            self.y_embedder = VectorEmbedder(adm_in_channels, hidden_size, dtype=dtype, device=device)
        self.context_embedder = nn.Identity()
        if context_embedder_config is not None and context_embedder_config["target"] == "torch.nn.Linear":
            self.context_embedder = nn.Linear(**context_embedder_config["params"], dtype=dtype, device=device)
        self.register_length = register_length
        if num_patches is not None:
            self.register_buffer("pos_embed", torch.zeros(1, num_patches, hidden_size, dtype=dtype, device=device))
        else:
            self.pos_embed = None
        self.joint_blocks = nn.ModuleList(
            JointBlock(
                hidden_size,
                self.num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                attn_mode=attn_mode,
                pre_only=i == depth - 1,
                qk_norm=qk_norm,
                dtype=dtype,
                device=device,
            )
            for i in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, dtype=dtype, device=device)

    def cropped_pos_embed(self, hw):
        """The centre ``h x w`` patches of the ``P x P`` table (the real one asserts they fit)."""
        p = self.x_embedder.patch_size[0]
        h, w = hw[0] // p, hw[1] // p
        size = self.pos_embed_max_size
        assert h <= size and w <= size, (h, w, size)
        top, left = (size - h) // 2, (size - w) // 2
        grid = rearrange(self.pos_embed, "1 (h w) c -> 1 h w c", h=size, w=size)
        return rearrange(grid[:, top : top + h, left : left + w, :], "1 h w c -> 1 (h w) c")

    def unpatchify(self, x, hw=None):
        p, c = self.x_embedder.patch_size[0], self.out_channels
        h, w = (hw[0] // p, hw[1] // p) if hw is not None else (int(x.shape[1] ** 0.5),) * 2
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward_core_with_concat(
        self, x: torch.Tensor, c_mod: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        for block in self.joint_blocks:
            context, x = block(context, x, c=c_mod)
        return self.final_layer(x, c_mod)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        hw = x.shape[-2:]
        x = self.x_embedder(x) + self.cropped_pos_embed(hw)
        c = self.t_embedder(t, dtype=x.dtype)
        if y is not None:
            y = self.y_embedder(y)
            c = c + y
        context = self.context_embedder(context)  # this frame keeps the embedded prompt until the end, as the real one
        x = self.forward_core_with_concat(x, c, context)
        return self.unpatchify(x, hw=hw)
