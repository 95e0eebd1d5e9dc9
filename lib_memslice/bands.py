"""The VAE's decode and encode in exact bands of rows, when a pass would not fit in its room.

:mod:`lib_memslice.band_costs` describes the schedule and counts its bytes; this module runs it on the real ldm /
sgm ``Decoder`` and ``Encoder`` (the same classes in both packages). The decoder runs ``conv_in`` and its mid block
whole, through the modules' own forwards (the mid attention is memslice's sliced ``AttnBlock`` where memslice is
applied), then the up path band by band; the encoder bands ``conv_in`` and its down path, then runs its mid block
and ``conv_out`` whole.

Between two GroupNorms each band is a tensor of its own core rows; a segment reads a band's rows and the one (or,
after an upsampling, two) rows its convolution needs from each neighbour, calls the modules themselves (their
convolutions, ``Upsample``, ``Downsample``: whatever patches them still applies), and crops the rows computed past
the band's edge. A GroupNorm is applied from the statistics of the whole tensor: per band, count, mean and M2 of
each batch item and group in float32 over the band's core rows, merged with Chan's parallel formula (biased
variance, the module's eps), then ``x * scale + shift`` per channel (in float32 for half precision, cast once).
Nothing is approximated: the result is the untiled module's up to rounding.

Planning: the pass's room (:func:`pass_room`) and :func:`lib_memslice.band_costs.plan_bands`: the stock forward when
it fits, else the fewest resident bands, else bands streamed through the device with the lists in host memory
(pinned on CUDA). An out-of-memory error frees the attempt and retries with twice the bands (then streamed), up to
the cap; the last error names the pass, the band counts tried and the free memory.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from . import kernels, probe
from .band_costs import (
    BAND_CAP,
    MIN_RESIDENT_BANDS,
    BandPlan,
    Op,
    VaeNet,
    band_count,
    band_cuts,
    banded_peak,
    max_bands,
    plan_bands,
    scaled_cuts,
    smallest_band_need,
    untiled_peak_bytes,
)
from .costs import GiB, format_bytes
from .limits import NotEnoughMemory

log = logging.getLogger("memslice")

Tensor = torch.Tensor

#: the device's allocator may hold more than the live tensors a plan counts: the shares job_plan measured
#: (``job_plan.ALLOCATOR_OVERHEAD``'s largest: CUDA 25 %, CPU 4 %; devices never measured take CUDA's)
PASS_MARGIN = {"cpu": 1.04, "cuda": 1.25}
PASS_MARGIN_UNMEASURED = 1.25


# --- the module's structure ------------------------------------------------------------------------------------


def _is_groupnorm(m: Any) -> bool:
    return isinstance(m, torch.nn.GroupNorm)


def _is_conv(m: Any, kernel: int, stride: int = 1, padding: int | None = None) -> bool:
    if not isinstance(m, torch.nn.Conv2d):
        return False
    pad = (kernel // 2) if padding is None else padding
    return (
        tuple(m.kernel_size) == (kernel, kernel)
        and tuple(m.stride) == (stride, stride)
        and tuple(m.padding) == (pad, pad)
        and tuple(m.dilation) == (1, 1)
        and m.groups == 1
        and m.padding_mode == "zeros"
    )


def _block_op(block: Any, groups: set[int]) -> Op | None:
    """A ResnetBlock memslice can band: GroupNorms, 3x3 convs, an identity or 1x1 skip, no time embedding."""
    for name in ("norm1", "conv1", "norm2", "conv2"):
        if not hasattr(block, name):
            return None
    if not (_is_groupnorm(block.norm1) and _is_groupnorm(block.norm2)):
        return None
    if not (_is_conv(block.conv1, 3) and _is_conv(block.conv2, 3)):
        return None
    dropout = getattr(block, "dropout", None)
    if block.training and dropout is not None and getattr(dropout, "p", 0) > 0:
        return None
    cin, cout = block.conv1.in_channels, block.conv2.out_channels
    if cin != cout and not _is_conv(getattr(block, "nin_shortcut", None), 1):
        return None  # conv_shortcut (3x3) is not banded
    groups.update((block.norm1.num_groups, block.norm2.num_groups))
    return Op("res", cin, cout)


def _resample_op(m: Any, kind: str) -> Op | None:
    name = type(m).__name__
    if name != {"up": "Upsample", "down": "Downsample"}[kind]:
        return None
    conv = bool(getattr(m, "with_conv", False))
    if conv and not _is_conv(m.conv, 3, 2 if kind == "down" else 1, 0 if kind == "down" else 1):
        return None
    channels = m.conv.in_channels if conv else 0
    return Op(kind, channels, channels, conv)


def _channels_of(m: Any) -> int:
    return int(getattr(m, "out_channels", 0) or 0)


def decoder_net(decoder: Any) -> VaeNet | None:
    """The banded part of this ``Decoder`` as the cost model sees it, or None when memslice cannot band it
    (attention in the up path, a 3x3 shortcut, a time embedding, dropout while training, unknown blocks)."""
    try:
        groups: set[int] = set()
        ops: list[Op] = []
        for level in reversed(range(decoder.num_resolutions)):
            up = decoder.up[level]
            if len(getattr(up, "attn", ())) > 0:
                return None
            for block in up.block:
                op = _block_op(block, groups)
                if op is None:
                    return None
                ops.append(op)
            if level != 0:
                op = _resample_op(up.upsample, "up")
                if op is None:
                    return None
                ops.append(Op("up", ops[-1].cout, ops[-1].cout, op.conv))
        if getattr(decoder, "temb_ch", 0) or not _is_groupnorm(decoder.norm_out) or not _is_conv(decoder.conv_out, 3):
            return None
        groups.add(decoder.norm_out.num_groups)
        ops.append(Op("out", ops[-1].cout, decoder.conv_out.out_channels))
        if len(groups) != 1 or any(a.cin != b.cout for a, b in zip(ops[1:], ops[:-1], strict=True)):
            return None
        mid = _channels_of(decoder.conv_in)
        return VaeNet("decode", tuple(ops), mid, groups.pop(), bool(getattr(decoder, "tanh_out", False)),
                      bool(getattr(decoder, "give_pre_end", False)))  # fmt: skip
    except (AttributeError, TypeError, IndexError):
        return None


def encoder_net(encoder: Any) -> VaeNet | None:
    """The banded part of this ``Encoder`` (conv_in and the down path), or None when memslice cannot band it."""
    try:
        groups: set[int] = set()
        if getattr(encoder, "temb_ch", 0) or not _is_conv(encoder.conv_in, 3):
            return None
        ops = [Op("conv_in", encoder.conv_in.in_channels, encoder.conv_in.out_channels)]
        for level in range(encoder.num_resolutions):
            down = encoder.down[level]
            if len(getattr(down, "attn", ())) > 0:
                return None
            for block in down.block:
                op = _block_op(block, groups)
                if op is None:
                    return None
                ops.append(op)
            if level != encoder.num_resolutions - 1:
                op = _resample_op(down.downsample, "down")
                if op is None:
                    return None
                ops.append(Op("down", ops[-1].cout, ops[-1].cout, op.conv))
        ops.append(Op("concat", ops[-1].cout, ops[-1].cout))
        if len(groups) != 1 or any(a.cin != b.cout for a, b in zip(ops[1:], ops[:-1], strict=True)):
            return None
        return VaeNet("encode", tuple(ops), ops[-1].cout, groups.pop())
    except (AttributeError, TypeError, IndexError):
        return None


#: the classes whose ``forward`` memslice's entries replace: ldm's and sgm's ``Decoder`` and ``Encoder``
PATCHED = {"vae_decode": "Decoder", "vae_encode": "Encoder"}
_PACKAGES = ("ldm.", "sgm.")


def vae_layout(vae: Any) -> dict[str, Any]:
    """What the job planner needs of a loaded VAE (``ModelSpec.vae_nets`` and ``vae_channels``): the banded part
    of its ``decoder`` and ``encoder`` as the banded forwards will read it when the pass runs (None where memslice
    cannot band the module, or where its class is not one whose forward memslice replaces: its own forward runs),
    and the decoder's ``ch``. Nothing for a VAE without them."""
    nets = []
    for kind, attr in (("vae_decode", "decoder"), ("vae_encode", "encoder")):
        module = getattr(vae, attr, None)
        if module is None:
            continue
        cls = type(module)
        ours = cls.__name__ == PATCHED[kind] and f"{cls.__module__}.".startswith(_PACKAGES)
        nets.append((kind, (decoder_net if kind == "vae_decode" else encoder_net)(module) if ours else None))
    ch = getattr(getattr(vae, "decoder", None), "ch", 0)
    return {"vae_nets": tuple(nets), "vae_channels": ch if isinstance(ch, int) and ch > 0 else 0}


def _blocks(module: Any, kind: str) -> list[tuple[str, Any]]:
    """The modules behind a net's ops, in order (ops ``res``/``up``/``down``/``conv_in``/``out``)."""
    found: list[tuple[str, Any]] = []
    if kind == "decode":
        for level in reversed(range(module.num_resolutions)):
            found.extend(("res", b) for b in module.up[level].block)
            if level != 0:
                found.append(("up", module.up[level].upsample))
        found.append(("out", module))
    else:
        found.append(("conv_in", module.conv_in))
        for level in range(module.num_resolutions):
            found.extend(("res", b) for b in module.down[level].block)
            if level != module.num_resolutions - 1:
                found.append(("down", module.down[level].downsample))
        found.append(("concat", None))
    return found


# --- GroupNorm over bands -----------------------------------------------------------------------------------------


class Moments:
    """A GroupNorm's statistics over a tensor given band by band: count, mean and M2 per batch item and group, in
    float32 over each band's core rows, merged with Chan et al.'s parallel formula."""

    def __init__(self, groups: int) -> None:
        self.groups = groups
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def add(self, band: Tensor) -> None:
        c = band.shape[1]
        grouped = band.unflatten(1, (self.groups, c // self.groups))
        if grouped.dtype != torch.float32:
            # the float32 copy is the band's own: centred and squared in place, two passes of plain reductions
            # (torch's CPU var_mean is a Welford loop several times slower than a mean), no more memory
            grouped = grouped.float()
            mean = grouped.mean(dim=(2, 3, 4))
            var = grouped.sub_(mean[:, :, None, None, None]).square_().mean(dim=(2, 3, 4))
        else:
            var, mean = torch.var_mean(grouped, dim=(2, 3, 4), correction=0)
        del grouped
        count = (c // self.groups) * band.shape[2] * band.shape[3]
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = count, mean, var * count
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + var * count + delta * delta * (self.count * count / total)
        self.count = total

    def affine(self, norm: torch.nn.GroupNorm) -> tuple[Tensor, Tensor]:
        """``(scale, shift)`` per batch item and channel, float32 ``[B, C, 1, 1]``: the GroupNorm of the whole
        tensor is ``x * scale + shift`` (biased variance, the module's eps, its affine weight and bias)."""
        assert self.mean is not None and self.m2 is not None, "no band was added"
        per_group = norm.num_channels // norm.num_groups
        rstd = torch.rsqrt(self.m2 / self.count + norm.eps)
        scale = rstd.repeat_interleave(per_group, dim=1)
        mean = self.mean.repeat_interleave(per_group, dim=1)
        if norm.weight is not None:
            scale = scale * norm.weight.float()
        shift = -mean * scale
        if norm.bias is not None:
            shift = shift + norm.bias.float()
        return scale[:, :, None, None], shift[:, :, None, None]


def _norm_silu(box: list[Tensor], affine: tuple[Tensor, Tensor]) -> Tensor:
    """GroupNorm (from the whole tensor's statistics) and SiLU of one band. float32: ``x * scale + shift`` and an
    in-place SiLU. Half precision rounds as the stock modules do: the normalisation computed in float32 and cast
    once (torch's GroupNorm), then ``x * sigmoid(x)`` in the dtype (ldm's swish). Takes the only reference to a
    freshly gathered band out of ``box`` (a one-element list the caller builds around the gather), so it dies as
    soon as it is read: an argument passed straight in stays referenced by the caller's frame during the call on
    Python 3.10 (the webui's), which kept every gathered band alive through its normalisation."""
    gathered = box.pop()
    scale, shift = affine
    if gathered.dtype == torch.float32:
        y = torch.addcmul(shift, gathered, scale)
        del gathered
        return F.silu(y, inplace=True)
    dtype = gathered.dtype
    wide = gathered.float()
    del gathered
    wide.mul_(scale).add_(shift)
    y = wide.to(dtype)
    del wide
    return y.mul_(torch.sigmoid(y))


# --- one banded part -----------------------------------------------------------------------------------------------


class _Lists:
    """Where the lists between GroupNorms live: on the device, or parked in host memory (pinned on CUDA) with
    each band's rows copied to the device when a segment reads them."""

    def __init__(self, device: torch.device, streamed: bool) -> None:
        self.device = device
        self.streamed = streamed
        self.pinned = streamed and device.type == "cuda"

    def park(self, t: Tensor) -> Tensor:
        if not self.streamed or t.device.type == "cpu":
            return t
        if self.pinned:
            host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
            host.copy_(t, non_blocking=True)
            return host
        return t.to("cpu")

    def fetch(self, t: Tensor) -> Tensor:
        return t.to(self.device, non_blocking=self.pinned) if t.device != self.device else t

    def gather(self, bands: list[Tensor | None], cuts: list[int], j: int, before: int, after: int) -> Tensor:
        """Rows ``cuts[j] - before`` .. ``cuts[j + 1] + after`` (within the tensor) of a list of bands, on the
        device (:func:`_top` says how many precede the band's core). A band read alone is the band itself."""
        lo, hi = max(0, cuts[j] - before), min(cuts[-1], cuts[j + 1] + after)
        pieces: list[tuple[Tensor, int, int]] = []  # (band, first row, last row) in the band's own rows
        k = j
        while k > 0 and cuts[k] > lo:
            k -= 1
        while k < len(bands) and cuts[k] < hi:
            band = bands[k]
            assert band is not None, "a band read after it was freed"
            pieces.append((band, max(lo, cuts[k]) - cuts[k], min(hi, cuts[k + 1]) - cuts[k]))
            k += 1
        if not self.streamed:
            views = [b[:, :, a:z] for b, a, z in pieces]
            return views[0] if len(views) == 1 else torch.cat(views, dim=2)
        if len(pieces) == 1:
            band, a, z = pieces[0]
            return self.fetch(band[:, :, a:z] if (a, z) != (0, band.shape[2]) else band)
        first = pieces[0][0]
        out = torch.empty((first.shape[0], first.shape[1], hi - lo, first.shape[3]), dtype=first.dtype,
                          device=self.device)  # fmt: skip
        row = 0
        for band, a, z in pieces:
            out[:, :, row : row + z - a].copy_(band[:, :, a:z], non_blocking=self.pinned)
            row += z - a
        return out


def _top(cuts: list[int], j: int, before: int) -> int:
    """Rows a gather with ``before`` rows of halo puts ahead of band ``j``'s core."""
    return cuts[j] - max(0, cuts[j] - before)


def _core(t: Tensor, top: int, rows: int) -> Tensor:
    """A segment's output cropped to its band's core rows (a contiguous copy when rows were computed past it)."""
    if top == 0 and t.shape[2] == rows:
        return t
    return t[:, :, top : top + rows].clone(memory_format=torch.contiguous_format)


@dataclass
class _State:
    """The list entering the next op, its cuts, and its statistics (when a GroupNorm reads it next)."""

    bands: list[Tensor | None]
    cuts: list[int]
    moments: Moments | None


def _moments_of(bands: list[Tensor | None], groups: int) -> Moments:
    m = Moments(groups)
    for band in bands:
        assert band is not None
        m.add(band)
    return m


def _res(block: Any, st: _State, lists: _Lists, next_norm: int) -> _State:
    """One ResnetBlock in two segments (norm1 -> SiLU -> conv1, then norm2 -> SiLU -> conv2 + skip)."""
    xs, cuts, n = st.bands, st.cuts, len(st.bands)
    assert st.moments is not None
    affine = st.moments.affine(block.norm1)
    st.moments = None  # each GroupNorm's statistics live until its scale and shift are made
    nin = block.conv1.in_channels != block.conv2.out_channels
    hs: list[Tensor | None] = []
    skips: list[Tensor | None] = []
    moments = Moments(block.norm2.num_groups)
    for j in range(n):
        y = _norm_silu([lists.gather(xs, cuts, j, 1, 1)], affine)
        top = _top(cuts, j, 1)
        h = block.conv1(y)
        del y
        h = _core(h, top, cuts[j + 1] - cuts[j])
        moments.add(h)
        hs.append(lists.park(h))
        del h
        if nin:
            x = xs[j]
            assert x is not None
            s = block.nin_shortcut(lists.fetch(x))
            del x
            skips.append(lists.park(s))
            del s
            if j >= 1:
                xs[j - 1] = None
    if nin:
        xs.clear()
    else:
        skips = xs
    del xs
    st.bands = []
    affine = moments.affine(block.norm2)
    del moments
    outs: list[Tensor | None] = []
    moments_out = Moments(next_norm) if next_norm else None
    for j in range(n):
        y = _norm_silu([lists.gather(hs, cuts, j, 1, 1)], affine)
        top = _top(cuts, j, 1)
        o = block.conv2(y)
        del y
        o = _core(o, top, cuts[j + 1] - cuts[j])
        skip = skips[j]
        skips[j] = None
        assert skip is not None
        o.add_(lists.fetch(skip))
        del skip
        if moments_out is not None:
            moments_out.add(o)
        outs.append(lists.park(o))
        del o
        if j >= 1:
            hs[j - 1] = None
    hs.clear()
    return _State(outs, cuts, moments_out)


def _up(upsample: Any, st: _State, lists: _Lists, next_norm: int) -> _State:
    cuts, n = st.cuts, len(st.bands)
    outs: list[Tensor | None] = []
    moments = Moments(next_norm) if next_norm else None
    for j in range(n):
        u = upsample(lists.gather(st.bands, cuts, j, 1, 1))
        u = _core(u, 2 * _top(cuts, j, 1), 2 * (cuts[j + 1] - cuts[j]))
        if moments is not None:
            moments.add(u)
        outs.append(lists.park(u))
        del u
        if j >= 1:
            st.bands[j - 1] = None
    st.bands.clear()
    return _State(outs, [2 * c for c in cuts], moments)


def _down(downsample: Any, st: _State, lists: _Lists, next_norm: int, out_cuts: list[int]) -> _State:
    cuts, n = st.cuts, len(st.bands)
    after = 1 if getattr(downsample, "with_conv", False) else 0
    outs: list[Tensor | None] = []
    moments = Moments(next_norm) if next_norm else None
    for j in range(n):
        d = downsample(lists.gather(st.bands, cuts, j, 0, after))
        assert d.shape[2] == out_cuts[j + 1] - out_cuts[j], "a downsampled band's rows"
        if moments is not None:
            moments.add(d)
        outs.append(lists.park(d))
        del d
        st.bands[j] = None
    st.bands.clear()
    return _State(outs, out_cuts, moments)


def _conv_in(conv: Any, image: Tensor, cuts: list[int], lists: _Lists, next_norm: int) -> _State:
    n = len(cuts) - 1
    outs: list[Tensor | None] = []
    moments = Moments(next_norm)
    for j in range(n):
        lo, hi = max(0, cuts[j] - 1), min(cuts[-1], cuts[j + 1] + 1)
        c = conv(image[:, :, lo:hi].contiguous())
        c = _core(c, cuts[j] - lo, cuts[j + 1] - cuts[j])
        moments.add(c)
        outs.append(lists.park(c))
        del c
    return _State(outs, cuts, moments)


def _out(decoder: Any, st: _State, lists: _Lists, out_channels: int) -> Tensor:
    """norm_out -> SiLU -> conv_out band by band, into the image."""
    cuts, n = st.cuts, len(st.bands)
    first = st.bands[0]
    assert first is not None and st.moments is not None
    b, _, _, w = first.shape
    image = torch.empty((b, out_channels, cuts[-1], w), dtype=first.dtype, device=lists.device)
    del first
    affine = st.moments.affine(decoder.norm_out)
    st.moments = None
    for j in range(n):
        y = _norm_silu([lists.gather(st.bands, cuts, j, 1, 1)], affine)
        top = _top(cuts, j, 1)
        o = decoder.conv_out(y)
        del y
        rows = cuts[j + 1] - cuts[j]
        image[:, :, cuts[j] : cuts[j + 1]].copy_(o[:, :, top : top + rows])
        del o
        if j >= 1:
            st.bands[j - 1] = None
    st.bands.clear()
    if getattr(decoder, "tanh_out", False):
        image.tanh_()
    return image


def _join(st: _State, lists: _Lists) -> Tensor:
    """The bands as one tensor on the device (the encoder's mid-block input)."""
    bands = st.bands
    if len(bands) == 1 and not lists.streamed:
        only = bands[0]
        st.bands = []
        assert only is not None
        return only
    if not lists.streamed:
        whole = torch.cat(bands, dim=2)  # type: ignore[arg-type]
        bands.clear()
        return whole
    first = bands[0]
    assert first is not None
    b, c, _, w = first.shape
    whole = torch.empty((b, c, st.cuts[-1], w), dtype=first.dtype, device=lists.device)
    del first
    for j, band in enumerate(bands):
        assert band is not None
        whole[:, :, st.cuts[j] : st.cuts[j + 1]].copy_(band, non_blocking=lists.pinned)
        bands[j] = None
    del band
    bands.clear()
    return whole


def _next_norm(ops: list[tuple[str, Any]], i: int) -> int:
    """The group count of the GroupNorm that reads op ``i``'s output next (0: none does)."""
    if i + 1 >= len(ops):
        return 0
    kind, m = ops[i + 1]
    if kind == "res":
        return int(m.norm1.num_groups)
    if kind == "out":
        return int(m.norm_out.num_groups)
    return 0


def decode_up(decoder: Any, mid: list[Tensor], bands: int, streamed: bool = False,
              on_op: Callable[[int], None] | None = None) -> Tensor:  # fmt: skip
    """The decoder's up path and end in ``bands`` bands, from the mid block's output (``mid``: a one-item list
    whose item this function takes, so the caller holds no reference and the tensor dies with its last band).
    ``on_op(i)`` is called before op ``i`` of :func:`decoder_net`'s ops and with their count at the end."""
    h = mid.pop()
    lists = _Lists(h.device, streamed)
    ops = _blocks(decoder, "decode")
    step = on_op or (lambda i: None)
    cuts = band_cuts(h.shape[2], bands)
    step(0)
    st = _State([h[:, :, cuts[j] : cuts[j + 1]] for j in range(bands)], cuts, None)
    del h
    st.moments = _moments_of(st.bands, int(ops[0][1].norm1.num_groups))
    for i, (kind, m) in enumerate(ops):
        if i:
            step(i)
        if kind == "res":
            st = _res(m, st, lists, _next_norm(ops, i))
        elif kind == "up":
            st = _up(m, st, lists, _next_norm(ops, i))
        else:
            out = _join(st, lists) if getattr(decoder, "give_pre_end", False) else _out(
                decoder, st, lists, decoder.conv_out.out_channels)  # fmt: skip
            step(len(ops))
            return out
    raise AssertionError("a decoder ends with its out op")


def encode_down(encoder: Any, image: Tensor, bands: int, streamed: bool = False,
                on_op: Callable[[int], None] | None = None) -> Tensor:  # fmt: skip
    """The encoder's conv_in and down path in ``bands`` bands: the mid block's input, whole (``on_op``: see
    :func:`decode_up`)."""
    lists = _Lists(image.device, streamed)
    ops = _blocks(encoder, "encode")
    step = on_op or (lambda i: None)
    downs = sum(kind == "down" for kind, _ in ops)
    rows = [image.shape[2]]
    for _ in range(downs):
        rows.append(rows[-1] // 2)
    base = band_cuts(rows[-1], bands)
    level = 0
    st = _State([], [], None)
    for i, (kind, m) in enumerate(ops):
        step(i)
        if kind == "conv_in":
            st = _conv_in(m, image, scaled_cuts(base, 1 << downs, rows[0]), lists, _next_norm(ops, i))
        elif kind == "res":
            st = _res(m, st, lists, _next_norm(ops, i))
        elif kind == "down":
            level += 1
            st = _down(m, st, lists, _next_norm(ops, i), scaled_cuts(base, 1 << (downs - level), rows[level]))
        else:
            out = _join(st, lists)
            step(len(ops))
            return out
    raise AssertionError("an encoder ends with its concat op")


def _nonlinearity(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)  # ldm's and sgm's swish, as the stock forwards compute it


def decoder_mid(decoder: Any, z: Tensor) -> Tensor:
    """conv_in and the mid block, whole, through the modules' own forwards (as the stock forward runs them)."""
    decoder.last_z_shape = z.shape
    h = decoder.conv_in(z)
    h = decoder.mid.block_1(h, None)
    h = decoder.mid.attn_1(h)
    return decoder.mid.block_2(h, None)


def encoder_mid(encoder: Any, box: list[Tensor]) -> Tensor:
    """The encoder's mid block and end, whole (as the stock forward runs them), on the tensor in ``box`` (taken out:
    a banded pass's mid input dies after the first ResnetBlock, on Python 3.10 too; see :func:`_norm_silu`)."""
    h = box.pop()
    h = encoder.mid.block_1(h, None)
    h = encoder.mid.attn_1(h)
    h = encoder.mid.block_2(h, None)
    h = encoder.norm_out(h)
    h = _nonlinearity(h)
    return encoder.conv_out(h)


def stock_decode(decoder: Any, z: Tensor) -> Tensor:
    """ldm's ``Decoder.forward`` step for step (what runs when no fallback is given and the pass fits)."""
    h = decoder_mid(decoder, z)
    for level in reversed(range(decoder.num_resolutions)):
        up = decoder.up[level]
        for i, block in enumerate(up.block):
            h = block(h, None)
            if len(up.attn) > 0:
                h = up.attn[i](h)
        if level != 0:
            h = up.upsample(h)
    if decoder.give_pre_end:
        return h
    h = decoder.norm_out(h)
    h = _nonlinearity(h)
    h = decoder.conv_out(h)
    return torch.tanh(h) if decoder.tanh_out else h


def stock_encode(encoder: Any, x: Tensor) -> Tensor:
    """ldm's ``Encoder.forward`` step for step (every block's output kept until the mid block, as ldm does)."""
    hs = [encoder.conv_in(x)]
    for level in range(encoder.num_resolutions):
        down = encoder.down[level]
        for i, block in enumerate(down.block):
            h = block(hs[-1], None)
            if len(down.attn) > 0:
                h = down.attn[i](h)
            hs.append(h)
        if level != encoder.num_resolutions - 1:
            hs.append(down.downsample(hs[-1]))
    return encoder_mid(encoder, [hs[-1]])


def decode_in_bands(decoder: Any, z: Tensor, bands: int, streamed: bool = False) -> Tensor:
    """The whole decode with the up path in ``bands`` bands (``streamed``: the lists in host memory)."""
    mid = [decoder_mid(decoder, z)]
    return decode_up(decoder, mid, bands, streamed)


def encode_in_bands(encoder: Any, x: Tensor, bands: int, streamed: bool = False) -> Tensor:
    """The whole encode with conv_in and the down path in ``bands`` bands."""
    return encoder_mid(encoder, [encode_down(encoder, x, bands, streamed)])


# --- planning and running a pass ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BandRecord:
    """What one VAE pass ran: its plan, the band counts tried (out-of-memory retries), and the room."""

    site: str  # "vae.decode" | "vae.encode"
    bands: int  # 0: the stock forward
    streamed: bool
    peak_bytes: int
    untiled_bytes: int
    room_bytes: int
    reason: str
    tried: tuple[tuple[int, bool], ...] = ()


#: tests and tools: force a plan on every pass while set (see :func:`forced`)
FORCE: tuple[int, bool] | None = None


@contextlib.contextmanager
def forced(bands: int, streamed: bool = False) -> Iterator[None]:
    """Every pass through a forward made here runs ``bands`` bands (0: the stock forward), ``streamed`` or not,
    while inside (at most one latent row per band; one band on the device is the whole pass: the stock forward)."""
    global FORCE
    before, FORCE = FORCE, (int(bands), bool(streamed))
    try:
        yield
    finally:
        FORCE = before


def enabled(settings: Any) -> bool:
    """Whether the settings ask for bands: the VAE mode ``auto`` (an older boolean ``True`` reads as it)."""
    mode = getattr(settings, "vae", "auto")
    return mode is True or mode == "auto"


def band_cap(settings: Any) -> int:
    """The most bands a pass may have (``Settings.band_cap`` where the settings have it)."""
    try:
        return max(1, int(getattr(settings, "band_cap", BAND_CAP)))
    except (TypeError, ValueError):
        return BAND_CAP


def pass_room(device: torch.device, settings: Any, precise: bool = False) -> tuple[int, int | None, int]:
    """``(room, over_margin, free)``: the bytes a VAE pass plans in. The attention budget when set (fixed, no
    second chance); else free memory over the allocator's measured share for the device (the live tensors the
    model counts are what the allocator holds beyond it), and free memory itself as the room past that margin."""
    budget = float(getattr(settings, "budget_gb", 0.0) or 0.0)
    if budget > 0:
        room = int(budget * GiB)
        return room, None, room
    free = probe.free_memory(device, precise).bytes
    margin = PASS_MARGIN.get(probe.device_kind(device), PASS_MARGIN_UNMEASURED)
    return int(max(0, free) / margin), max(0, free), free


def _planned(net: VaeNet, shape: tuple[int, int, int, int], element_size: int, bands: int, streamed: bool,
             room: int, reason: str) -> BandPlan:  # fmt: skip
    batch, _, lat_h, lat_w = shape
    untiled = untiled_peak_bytes(net, lat_h, lat_w, batch, element_size)
    if bands <= 0:
        return BandPlan(1, False, untiled, untiled, room, reason, stock=True)
    found = banded_peak(net, lat_h, lat_w, batch, element_size, bands, streamed)
    return BandPlan(bands, streamed, found.device, untiled, room, reason, found.host)


def plan_pass(net: VaeNet, shape: tuple[int, int, int, int], element_size: int, device: torch.device,
              settings: Any) -> tuple[BandPlan | None, int]:  # fmt: skip
    """The plan for a pass over a latent of ``shape`` (B, C, h, w; the encoder's image divided by ``net.scale``)
    and the free memory read (0 when forced or budgeted). A forced plan (:func:`forced`) wins."""
    if FORCE is not None:
        bands = min(FORCE[0], max_bands(shape[2], 1 << 30))
        if bands <= 0 and FORCE[1]:
            bands = 1
        if bands < MIN_RESIDENT_BANDS and not FORCE[1]:
            bands = 0  # the whole pass on the device: the module's own forward
        return _planned(net, shape, element_size, bands, FORCE[1], 0, f"forced: {band_count(bands, FORCE[1])}"), 0
    room, over, free = pass_room(device, settings, precise=device.type == "cuda")
    batch, _, lat_h, lat_w = shape
    plan = plan_bands(net, lat_h, lat_w, batch, element_size, room, band_cap=band_cap(settings), over_margin=over)
    return plan, free


def _latent_shape(net: VaeNet, x: Tensor) -> tuple[int, int, int, int]:
    b, c, h, w = x.shape
    if net.kind == "decode":
        return b, c, h, w
    return b, c, h // net.scale, w // net.scale


def _tried_text(tried: list[tuple[int, bool]]) -> str:
    words = [band_count(n, s) for n, s in tried]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def out_of_memory(kind: str, tried: list[tuple[int, bool]], free: int | None, need: int) -> NotEnoughMemory:
    """The error once a pass's retries stop: the pass, every plan that ran out, and the free memory now."""
    have = f"{format_bytes(free)} is free now" if free is not None else "the attention budget is set"
    text = (f"memslice: out of memory in the VAE {kind} at {_tried_text(tried)} (no more bands under the band cap); "
            f"{have}. To fit: lower the resolution or batch size or free memory on the device.")  # fmt: skip
    return NotEnoughMemory(text, need=need, have=free or 0, site=f"vae.{kind}", fixed_budget=free is None)


def _refused(kind: str, net: VaeNet, shape: tuple[int, ...], element_size: int, free: int,
             settings: Any) -> NotEnoughMemory:  # fmt: skip
    batch, _, lat_h, lat_w = shape
    need = smallest_band_need(net, lat_h, lat_w, batch, element_size, band_cap=band_cap(settings))
    top = max_bands(lat_h, band_cap(settings))
    budgeted = float(getattr(settings, "budget_gb", 0) or 0) > 0
    have = f"the attention budget is {format_bytes(free)}" if budgeted else f"{format_bytes(free)} is free"
    advice = "raise the attention budget, " if budgeted else ""
    text = (f"memslice: not enough memory for the VAE {kind}: its smallest plan ({band_count(top, True)} "
            f"through the device) needs {format_bytes(need)}, {have}. To fit: {advice}"
            "lower the resolution or batch size or free memory on the device.")  # fmt: skip
    return NotEnoughMemory(text, need=need, have=free, site=f"vae.{kind}", fixed_budget=budgeted)


def next_after_oom(plan: BandPlan, latent_rows: int, cap: int) -> tuple[int, bool] | None:
    """The plan after an out-of-memory error: the stock forward -> two bands (one band on the device is the whole
    pass; a latent of one row under the cap: streamed); then twice the bands up to the cap (and one latent row per
    band); then the most bands streamed; then nothing."""
    top = max_bands(latent_rows, cap)
    if plan.stock:
        return (MIN_RESIDENT_BANDS, False) if top >= MIN_RESIDENT_BANDS else (top, True)
    if plan.bands < top:
        return min(top, 2 * plan.bands), plan.streamed
    if not plan.streamed:
        return top, True
    return None


def run_pass(kind: str, x: Tensor, net: VaeNet, host: Any, run: Callable[[int, bool], Tensor],
             stock: Callable[[], Tensor]) -> Tensor:  # fmt: skip
    """Plan a pass, run it (``stock()`` when it fits untiled, else ``run(bands, streamed)``), retry out-of-memory
    errors with more bands (each attempt's tensors freed first), record what ran."""
    settings = host.settings()
    element_size = x.element_size()
    shape = _latent_shape(net, x)
    plan, free = plan_pass(net, shape, element_size, x.device, settings)
    if plan is None:
        error = _refused(kind, net, shape, element_size, free, settings)
        _record_failure(host, error)
        raise error
    tried: list[tuple[int, bool]] = []
    while True:
        try:
            out = stock() if plan.stock else run(plan.bands, plan.streamed)
            break
        except Exception as exc:
            if not getattr(settings, "oom_retry", True) or not kernels.is_oom(exc):
                raise
            # keep only the text: the traceback's frames hold the attempt's bands
            failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            exc.__traceback__ = None
            del exc
        kernels.release_after_oom(x.device)
        tried.append((0 if plan.stock else plan.bands, plan.streamed))
        following = next_after_oom(plan, shape[2], band_cap(settings))
        if following is None:
            budgeted = float(getattr(settings, "budget_gb", 0) or 0) > 0
            free_now = None if budgeted else probe.free_memory(x.device, precise=x.device.type == "cuda").bytes
            error = out_of_memory(kind, tried, free_now, plan.peak_bytes)
            _record_failure(host, error)
            raise error
        plan = _planned(net, shape, element_size, *following, plan.room_bytes, f"after out of memory ({failed})")
        log.info("memslice: VAE %s ran out of memory (%s); retrying: %s", kind, failed,
                 band_count(plan.bands, plan.streamed))  # fmt: skip
    record = BandRecord(f"vae.{kind}", 0 if plan.stock else plan.bands, plan.streamed, plan.peak_bytes,
                        plan.untiled_bytes, plan.room_bytes, plan.reason, tuple(tried))  # fmt: skip
    sink = getattr(host, "record_bands", None)
    if callable(sink):
        sink(record)
    if plan.banded:
        log.info("memslice: VAE %s %s%s", kind, "in " if plan.bands > 1 else "", plan.reason)
    return out


def _record_failure(host: Any, error: NotEnoughMemory) -> None:
    sink = getattr(host, "record_failure", None)
    if callable(sink):
        sink(error)


def _active(host: Any) -> bool:
    """Whether the host still wants bands (the webui's: while a memslice entry is applied; a forward kept by another
    extension after memslice's was removed then runs the stock one). Hosts without the question always do."""
    active = getattr(host, "bands_active", None)
    return bool(active()) if callable(active) else True


def make_decoder_forward(
    strategy: str, host: Any, fallback: Callable[..., Tensor] | None = None
) -> Callable[..., Tensor]:
    """A ``Decoder.forward`` (ldm and sgm) that runs the pass in exact bands when it would not fit its room.
    ``fallback``: the forward it replaces (the stock one when None), run when the pass fits untiled, when the VAE
    mode is not ``auto`` (or the host no longer wants bands), when the call passes keywords, or when the module is
    not one memslice can band."""

    def forward(self: Any, z: Tensor, **kwargs: Any) -> Tensor:
        def stock() -> Tensor:
            return fallback(self, z, **kwargs) if fallback is not None else stock_decode(self, z)

        if kwargs or not enabled(host.settings()) or not _active(host):
            return stock()
        net = decoder_net(self)
        if net is None:
            return stock()
        return run_pass("decode", z, net, host, lambda n, s: decode_in_bands(self, z, n, s), stock)

    forward.__memslice__ = strategy  # type: ignore[attr-defined]
    return forward


def make_encoder_forward(
    strategy: str, host: Any, fallback: Callable[..., Tensor] | None = None
) -> Callable[..., Tensor]:
    """An ``Encoder.forward`` (ldm and sgm) that runs the pass in exact bands when it would not fit its room (see
    :func:`make_decoder_forward`)."""

    def forward(self: Any, x: Tensor, **kwargs: Any) -> Tensor:
        def stock() -> Tensor:
            return fallback(self, x, **kwargs) if fallback is not None else stock_encode(self, x)

        if kwargs or not enabled(host.settings()) or not _active(host):
            return stock()
        net = encoder_net(self)
        if net is None or x.shape[2] % net.scale or x.shape[3] % net.scale:
            return stock()
        return run_pass("encode", x, net, host, lambda n, s: encode_in_bands(self, x, n, s), stock)

    forward.__memslice__ = strategy  # type: ignore[attr-defined]
    return forward
