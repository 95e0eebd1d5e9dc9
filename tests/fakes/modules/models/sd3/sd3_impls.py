"""Fake of ``modules/models/sd3/sd3_impls.py`` (webui 1.10.1): SD3's own VAE classes.

What memslice depends on, as the real file does it: ``AttnBlock`` is its own class (not ldm's or sgm's, so the
webui's optimizations never reach it) with ldm's attribute names (``norm``, ``q``, ``k``, ``v``, ``proj_out``) and
``forward(self, x)``: one SDPA call on contiguous ``[b, 1, h*w, c]`` tensors with SDPA's default scale, then the
residual; one sits in the encoder's mid block and one in the decoder's (ch 128, ch_mult 1, 2, 4, 4, 16 latent
channels); ``SDVAE.decode``/``encode`` turn CUDA autocast on in float16. The MMDiT wrapper (``BaseModel``) and the
samplers are not faked.
"""

import einops
import torch

from modules.models.sd3.mmdit import MMDiT  # noqa: F401  (the real file imports it here)


def Normalize(in_channels, num_groups=32, dtype=torch.float32, device=None):
    return torch.nn.GroupNorm(num_groups, in_channels, eps=1e-6, affine=True, dtype=dtype, device=device)


class ResnetBlock(torch.nn.Module):
    """GroupNorm, SiLU (in place), 3x3 conv, twice; a 1x1 shortcut when the channels change."""

    def __init__(self, *, in_channels, out_channels=None, dtype=torch.float32, device=None):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels, dtype=dtype, device=device)
        self.conv1 = torch.nn.Conv2d(in_channels, out_channels, 3, 1, 1, dtype=dtype, device=device)
        self.norm2 = Normalize(out_channels, dtype=dtype, device=device)
        self.conv2 = torch.nn.Conv2d(out_channels, out_channels, 3, 1, 1, dtype=dtype, device=device)
        shortcut = in_channels != out_channels
        self.nin_shortcut = (
            torch.nn.Conv2d(in_channels, out_channels, 1, 1, 0, dtype=dtype, device=device) if shortcut else None
        )
        self.swish = torch.nn.SiLU(inplace=True)

    def forward(self, x):
        hidden = self.conv1(self.swish(self.norm1(x)))
        hidden = self.conv2(self.swish(self.norm2(hidden)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + hidden


class AttnBlock(torch.nn.Module):
    def __init__(self, in_channels, dtype=torch.float32, device=None):
        super().__init__()
        self.norm = Normalize(in_channels, dtype=dtype, device=device)
        self.q, self.k, self.v, self.proj_out = (
            torch.nn.Conv2d(in_channels, in_channels, 1, 1, 0, dtype=dtype, device=device) for _ in range(4)
        )

    def forward(self, x):
        hidden = self.norm(x)
        q, k, v = self.q(hidden), self.k(hidden), self.v(hidden)
        b, c, h, w = q.shape
        q, k, v = (einops.rearrange(t, "b c h w -> b 1 (h w) c").contiguous() for t in (q, k, v))
        hidden = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        hidden = einops.rearrange(hidden, "b 1 (h w) c -> b c h w", h=h, w=w, c=c, b=b)
        return x + self.proj_out(hidden)


class Downsample(torch.nn.Module):
    """Pad one row and column after, then a stride-2 3x3 conv."""

    def __init__(self, in_channels, dtype=torch.float32, device=None):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, in_channels, 3, 2, 0, dtype=dtype, device=device)

    def forward(self, x):
        return self.conv(torch.nn.functional.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample(torch.nn.Module):
    """Nearest 2x, then a 3x3 conv."""

    def __init__(self, in_channels, dtype=torch.float32, device=None):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, in_channels, 3, 1, 1, dtype=dtype, device=device)

    def forward(self, x):
        return self.conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))


class VAEEncoder(torch.nn.Module):
    def __init__(
        self,
        ch=128,
        ch_mult=(1, 2, 4, 4),
        num_res_blocks=2,
        in_channels=3,
        z_channels=16,
        dtype=torch.float32,
        device=None,
    ):
        super().__init__()
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        self.conv_in = torch.nn.Conv2d(in_channels, ch, 3, 1, 1, dtype=dtype, device=device)
        self.down = torch.nn.ModuleList()
        block_in = ch
        for level, mult in enumerate(ch_mult):
            down = torch.nn.Module()
            down.block = torch.nn.ModuleList()
            for _ in range(num_res_blocks):
                down.block.append(ResnetBlock(in_channels=block_in, out_channels=ch * mult, dtype=dtype, device=device))
                block_in = ch * mult
            down.attn = torch.nn.ModuleList()
            if level != len(ch_mult) - 1:
                down.downsample = Downsample(block_in, dtype=dtype, device=device)
            self.down.append(down)
        self.mid = torch.nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, dtype=dtype, device=device)
        self.mid.attn_1 = AttnBlock(block_in, dtype=dtype, device=device)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, dtype=dtype, device=device)
        self.norm_out = Normalize(block_in, dtype=dtype, device=device)
        self.conv_out = torch.nn.Conv2d(block_in, 2 * z_channels, 3, 1, 1, dtype=dtype, device=device)
        self.swish = torch.nn.SiLU(inplace=True)

    def forward(self, x):
        # every block's output stays listed until the mid block, as in the real encoder
        hs = [self.conv_in(x)]
        for level in range(self.num_resolutions):
            for block in self.down[level].block:
                hs.append(block(hs[-1]))
            if level != self.num_resolutions - 1:
                hs.append(self.down[level].downsample(hs[-1]))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1])))
        return self.conv_out(self.swish(self.norm_out(h)))


class VAEDecoder(torch.nn.Module):
    def __init__(
        self,
        ch=128,
        out_ch=3,
        ch_mult=(1, 2, 4, 4),
        num_res_blocks=2,
        resolution=256,
        z_channels=16,
        dtype=torch.float32,
        device=None,
    ):
        super().__init__()
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        block_in = ch * ch_mult[-1]
        self.conv_in = torch.nn.Conv2d(z_channels, block_in, 3, 1, 1, dtype=dtype, device=device)
        self.mid = torch.nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, dtype=dtype, device=device)
        self.mid.attn_1 = AttnBlock(block_in, dtype=dtype, device=device)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, dtype=dtype, device=device)
        self.up = torch.nn.ModuleList()
        for level in reversed(range(len(ch_mult))):
            up = torch.nn.Module()
            up.block = torch.nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                up.block.append(ResnetBlock(in_channels=block_in, out_channels=ch * ch_mult[level], dtype=dtype,
                                            device=device))  # fmt: skip
                block_in = ch * ch_mult[level]
            if level != 0:
                up.upsample = Upsample(block_in, dtype=dtype, device=device)
            self.up.insert(0, up)
        self.norm_out = Normalize(block_in, dtype=dtype, device=device)
        self.conv_out = torch.nn.Conv2d(block_in, out_ch, 3, 1, 1, dtype=dtype, device=device)
        self.swish = torch.nn.SiLU(inplace=True)

    def forward(self, z):
        hidden = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(range(self.num_resolutions)):
            for block in self.up[level].block:
                hidden = block(hidden)
            if level != 0:
                hidden = self.up[level].upsample(hidden)
        return self.conv_out(self.swish(self.norm_out(hidden)))


class SDVAE(torch.nn.Module):
    def __init__(self, dtype=torch.float32, device=None):
        super().__init__()
        self.encoder = VAEEncoder(dtype=dtype, device=device)
        self.decoder = VAEDecoder(dtype=dtype, device=device)

    @torch.autocast("cuda", dtype=torch.float16)
    def decode(self, latent):
        return self.decoder(latent)

    @torch.autocast("cuda", dtype=torch.float16)
    def encode(self, image):
        mean, logvar = torch.chunk(self.encoder(image), 2, dim=1)
        std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
        return mean + std * torch.randn_like(mean)
