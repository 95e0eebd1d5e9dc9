"""The VAE in exact bands: its geometry, the bytes a banded pass holds, and the planner. Pure arithmetic.

A banded pass (:mod:`lib_memslice.bands` runs it) cuts the VAE's full-resolution part into bands of rows. The
decoder runs ``conv_in`` and its mid block whole (the latent grid, 1/64 of the pixels; the mid attention is memslice's
sliced one) and bands the up path and ``norm_out``/``conv_out``; the encoder bands ``conv_in`` and the down path and
runs its mid block and ``conv_out`` whole. Every GroupNorm needs the statistics of the whole tensor, so a banded pass
moves from barrier to barrier: each *segment* (the ops between two GroupNorms: normalise, SiLU, one 3x3 convolution,
the residual add or a resampling) runs band by band, reading its band's rows plus the few rows its convolution needs
from the neighbouring bands (1 row; 2 after an upsampling), and keeps every band's result as a list until the next
GroupNorm, whose statistics (count, mean, M2 per batch item and group, float32) are merged from the bands' core rows.
No row is computed from anything but exact inputs, so the result is the untiled one; the only recompute is the one
or two rows each convolution computes past a band's edge.

The cost model counts the live tensors of that schedule exactly, in the order :mod:`lib_memslice.bands` allocates
them: at each band of each segment, what is stored (the input list's bands a later band still reads, the output
lists' finished bands) plus the band's working set (the gathered rows, the normalised copy, the convolution's output,
its cropped core, the float32 copy a half-precision band's statistics take). Bytes are counted above the banded
part's input (the decoder's mid-block output, the encoder's image), as :class:`memslice_tools.memtrack.PeakTracker`
counts them; the part's output is included. Measured against the tracker on the real ldm classes: at most 4 KiB
over it at every band count (the small per-group statistics are counted conservatively; tests/test_bands.py), and
with the published SD config at 1024 px (``python -m memslice_tools.band_check``).

``untiled`` is the same part as the stock module runs it (ldm's ``x * sigmoid(x)`` holds three copies beside a
block's input: about 1024 elements per output pixel in the decoder's first full-resolution block; the stock encoder
keeps every block's output until its mid block). A banded pass holds about 256 elements per output pixel plus one
band's working set.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

#: the most bands a pass may be cut into unless told otherwise (bands are also never thinner than one latent row)
BAND_CAP = 64
#: bytes of the float32 statistics copy a half-precision band takes
FLOAT_BYTES = 4
OP_KINDS = ("conv_in", "res", "up", "down", "out", "concat")


@dataclass(frozen=True)
class Op:
    """One step of a banded part: ``res`` a ResnetBlock (``cin`` -> ``cout``, a 1x1 ``nin_shortcut`` when they
    differ), ``up`` nearest 2x (+ a 3x3 conv), ``down`` the (0,1,0,1)-padded stride-2 3x3 conv (or 2x2 average
    pooling), ``conv_in`` the encoder's first conv, ``out`` the decoder's norm_out + SiLU + conv_out, ``concat``
    the encoder's bands joined into the mid block's input."""

    kind: str
    cin: int
    cout: int
    conv: bool = True

    def __post_init__(self) -> None:
        if self.kind not in OP_KINDS:
            raise ValueError(f"unknown op {self.kind!r}; expected one of {OP_KINDS}")


@dataclass(frozen=True)
class VaeNet:
    """The banded part of a VAE ``Decoder`` (``kind="decode"``) or ``Encoder`` (``"encode"``): its ops in order,
    the mid block's width and the GroupNorms' group count. ``scale``: image pixels per latent pixel (2 ** resamples).
    """

    kind: str
    ops: tuple[Op, ...]
    mid_channels: int
    groups: int = 32
    tanh: bool = False
    pre_end: bool = False

    @property
    def scale(self) -> int:
        return 1 << sum(op.kind in ("up", "down") for op in self.ops)


def decoder_net(ch: int = 128, ch_mult: tuple[int, ...] = (1, 2, 4, 4), num_res_blocks: int = 2, out_ch: int = 3,
                groups: int = 32, tanh: bool = False, pre_end: bool = False,
                resamp_with_conv: bool = True) -> VaeNet:  # fmt: skip
    """ldm's / sgm's ``Decoder`` with these constructor arguments (the SD1.x/SD2.x/SDXL VAE by default)."""
    block_in = ch * ch_mult[-1]
    ops: list[Op] = []
    for level in reversed(range(len(ch_mult))):
        block_out = ch * ch_mult[level]
        for _ in range(num_res_blocks + 1):
            ops.append(Op("res", block_in, block_out))
            block_in = block_out
        if level != 0:
            ops.append(Op("up", block_in, block_in, resamp_with_conv))
    ops.append(Op("out", block_in, out_ch))
    return VaeNet("decode", tuple(ops), ch * ch_mult[-1], groups, tanh, pre_end)


def encoder_net(ch: int = 128, ch_mult: tuple[int, ...] = (1, 2, 4, 4), num_res_blocks: int = 2, in_channels: int = 3,
                groups: int = 32, resamp_with_conv: bool = True) -> VaeNet:  # fmt: skip
    """ldm's / sgm's ``Encoder`` with these constructor arguments (the SD VAE's by default)."""
    ops = [Op("conv_in", in_channels, ch)]
    block_in = ch
    for level, mult in enumerate(ch_mult):
        block_out = ch * mult
        for _ in range(num_res_blocks):
            ops.append(Op("res", block_in, block_out))
            block_in = block_out
        if level != len(ch_mult) - 1:
            ops.append(Op("down", block_in, block_in, resamp_with_conv))
    ops.append(Op("concat", block_in, block_in))
    return VaeNet("encode", tuple(ops), block_in, groups)


def net_from_config(config: dict, kind: str) -> VaeNet:
    """A ``ddconfig`` (``ch``, ``ch_mult``, ``num_res_blocks``, ...) as a decoder or encoder net."""
    common = dict(ch=int(config["ch"]), ch_mult=tuple(config["ch_mult"]), num_res_blocks=int(config["num_res_blocks"]),
                  resamp_with_conv=bool(config.get("resamp_with_conv", True)))  # fmt: skip
    if kind == "decode":
        return decoder_net(out_ch=int(config.get("out_ch", 3)), tanh=bool(config.get("tanh_out", False)),
                           pre_end=bool(config.get("give_pre_end", False)), **common)  # fmt: skip
    if kind == "encode":
        return encoder_net(in_channels=int(config.get("in_channels", 3)), **common)
    raise ValueError(f"kind must be 'decode' or 'encode', got {kind!r}")


# --- bands ---------------------------------------------------------------------------------------------------


def band_cuts(rows: int, bands: int) -> list[int]:
    """Row boundaries of ``bands`` bands over ``rows`` rows, as even as whole rows allow (no two bands more than one
    row apart); every band has at least one row."""
    if not 1 <= bands <= rows:
        raise ValueError(f"bands must be in 1..{rows} for {rows} rows, got {bands}")
    return [i * rows // bands for i in range(bands + 1)]


def scaled_cuts(cuts: list[int], factor: int, rows: int) -> list[int]:
    """The same bands at a resolution ``factor`` times finer; the last band takes every row to ``rows`` (an
    encoder level with an odd row count keeps its last row in the last band)."""
    return [c * factor for c in cuts[:-1]] + [rows]


def max_bands(latent_rows: int, cap: int = BAND_CAP) -> int:
    """The most bands a pass of this latent height may have: the cap, and one latent row per band."""
    return max(1, min(int(cap), int(latent_rows)))


@dataclass(frozen=True)
class Sizes:
    """Rows and width of each op's input, from the latent size (the encoder's image is ``scale`` times it)."""

    rows: tuple[int, ...]
    widths: tuple[int, ...]
    out_rows: int
    out_width: int


def sizes(net: VaeNet, latent_h: int, latent_w: int) -> Sizes:
    h, w = (latent_h, latent_w) if net.kind == "decode" else (latent_h * net.scale, latent_w * net.scale)
    rows, widths = [], []
    for op in net.ops:
        rows.append(h)
        widths.append(w)
        if op.kind == "up":
            h, w = 2 * h, 2 * w
        elif op.kind == "down":
            h, w = h // 2, w // 2
    return Sizes(tuple(rows), tuple(widths), h, w)


def _halo(j: int, n: int) -> tuple[int, int]:
    """Rows a band reads beyond its core for one 3x3 convolution: one from each neighbour (none past the edges)."""
    return (1 if j > 0 else 0), (1 if j < n - 1 else 0)


# --- the cost model --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BandPeak:
    """Predicted bytes of one banded part: ``device`` (what the device holds at most), ``host`` (the lists parked in
    host memory when streamed; 0 otherwise), where the device peak sits (op index and kind), and the device peak
    of each op (from its start to the next op's)."""

    device: int
    host: int
    op: int
    where: str
    per_op: tuple[int, ...] = ()


class _Ledger:
    """The largest bytes seen, overall and per op."""

    def __init__(self, ops: int) -> None:
        self.peak = 0
        self.at = (-1, "")
        self.per_op = [0] * ops

    def see(self, value: int, op: int, where: str) -> None:
        self.per_op[op] = max(self.per_op[op], value)
        if value > self.peak:
            self.peak, self.at = value, (op, where)


def _norm_ws(rows: int, row: int, frow: int, fresh: bool, half: bool) -> int:
    """A band's gather + normalise + SiLU: the gathered rows (when they are a new tensor), the normalised band; in
    half precision the float32 copy it is computed in, then cast back (the gathered rows freed first)."""
    gathered = rows * row if fresh else 0
    if half:
        return max(gathered + rows * frow, rows * frow + rows * row)
    return gathered + rows * row


def _stats_ws(rows: int, row: int, frow: int, half: bool) -> int:
    """A finished band and the float32 copy its statistics are taken over in half precision."""
    return rows * row + (rows * frow if half else 0)


@functools.lru_cache(maxsize=4096)
def banded_peak(net: VaeNet, latent_h: int, latent_w: int, batch: int, element_size: int, bands: int,
                streamed: bool = False) -> BandPeak:  # fmt: skip
    """The banded part's peak, counted as :mod:`lib_memslice.bands` allocates (see the module docstring).

    Per band ``j`` of each segment: what is stored (the input list's bands from ``j - 1`` on, or all of it while
    it is a ResnetBlock's identity skip or views of the part's input; the output lists' bands before ``j``; on the
    host instead when streamed) plus the band's working set, the largest of its steps in allocation order."""
    es, half = element_size, element_size < 4
    n = bands
    sz = sizes(net, latent_h, latent_w)
    base = band_cuts(latent_h, n)
    led = _Ledger(len(net.ops))
    host_peak = 0
    dev = 0 if streamed else 1  # stored lists count on the device only when resident
    cur: list[int] = [0] * n  # the list entering the op, bytes per band (the decoder's input views: 0)
    cur_whole = net.kind == "decode"  # views of one input tensor: alive until the last one dies
    ops = net.ops
    for i, op in enumerate(ops):
        rows, width = sz.rows[i], sz.widths[i]
        factor = rows // latent_h if net.kind == "decode" else (1 << _downs_after(ops, i))
        cuts = scaled_cuts(base, factor, rows)
        core = [cuts[j + 1] - cuts[j] for j in range(n)]
        stats = i + 1 < len(ops) and ops[i + 1].kind in ("res", "out")
        rin, rout = batch * op.cin * width * es, batch * op.cout * width * es
        fin, fout = batch * op.cin * width * FLOAT_BYTES, batch * op.cout * width * FLOAT_BYTES
        # from band j - 1 on: what a segment whose bands read one neighbour row still holds of its input
        tail = _suffix(cur)

        def small(norm_channels: int, merging: bool) -> int:
            # a GroupNorm's scale and shift per channel, the next one's running mean and M2 per group and the
            # Chan merge's temporaries (float32, per batch item)
            return FLOAT_BYTES * batch * (2 * norm_channels + (8 * net.groups if merging else 0))

        if i == 0 and net.kind == "decode" and half:  # the input's statistics, band by band, in float32
            led.see(max(core) * fin + small(0, True), i, "input statistics")
        if op.kind == "res":
            nin = op.cin != op.cout
            # segment 1: norm1, SiLU, conv1 -> h (and the skip through nin_shortcut)
            done = 0  # h and skip bands finished
            for j in range(n):
                t, b = _halo(j, n)
                a, m = core[j] + t + b, core[j]
                held = tail[0] if (cur_whole or not nin) else tail[max(0, j - 1)]
                fresh = streamed or t + b > 0
                fetch = m * rin if streamed and t + b > 0 else 0  # a neighbour's piece copied beside the band
                ws = max(
                    _norm_ws(a, rin, fin, fresh, half) + fetch,
                    a * rin + a * rout,
                    a * rout + (m * rout if t + b > 0 else 0),
                    _stats_ws(m, rout, fout, half),
                    # the skip: h_j stored (or parked), the skip and, streamed, x_j fetched
                    dev * m * rout + m * rout + (m * rin if streamed else 0) if nin else 0,
                )
                led.see(dev * (held + done) + ws + small(op.cin, True), i, "res.conv1")
                done += m * rout * (2 if nin else 1)
            hs = [m * rout for m in core]
            skips = hs if nin else cur
            skip_whole = cur_whole and not nin
            host_peak = max(host_peak, sum(cur) + done)
            # segment 2: norm2, SiLU, conv2, + skip -> out
            h_tail, skip_tail = _suffix(hs), _suffix(skips)
            done = 0
            for j in range(n):
                t, b = _halo(j, n)
                a, m = core[j] + t + b, core[j]
                held = h_tail[max(0, j - 1)] + (skip_tail[0] if skip_whole else skip_tail[j])
                fresh = streamed or t + b > 0
                fetch = m * rout if streamed and t + b > 0 else 0
                # the skip is freed before the statistics (views of the input: not until the last one)
                freed = 0 if skip_whole else dev * skips[j]
                ws = max(
                    _norm_ws(a, rout, fout, fresh, half) + fetch,
                    2 * a * rout,
                    a * rout + (m * rout if t + b > 0 else 0),
                    m * rout + (m * rout if streamed else 0),  # the core and the fetched skip it adds
                    _stats_ws(m, rout, fout, half) - freed if stats else 0,
                )
                led.see(dev * (held + done) + ws + small(op.cout, stats), i, "res.conv2")
                done += m * rout
            host_peak = max(host_peak, sum(hs) + sum(skips) + done)
            cur, cur_whole = [m * rout for m in core], False
        elif op.kind == "up":
            r2, f2 = 2 * rin, 2 * fin  # bytes per row at twice the width
            done = 0
            for j in range(n):
                t, b = _halo(j, n)
                a, m = core[j] + t + b, core[j]
                held = tail[0] if cur_whole else tail[max(0, j - 1)]
                fresh = streamed or t + b > 0
                gathered = (a * rin if fresh else 0) + (m * rin if streamed and t + b > 0 else 0)
                ws = max(
                    gathered + 2 * a * r2 + (2 * a * r2 if op.conv else 0),  # interpolated, then convolved
                    2 * a * r2 + 2 * m * r2 if t + b > 0 else 0,
                    _stats_ws(2 * m, r2, f2, half) if stats else 2 * m * r2,
                )
                led.see(dev * (held + done) + ws + small(0, stats), i, "up")
                done += 2 * m * r2
            host_peak = max(host_peak, sum(cur) + done)
            cur, cur_whole = [2 * m * r2 for m in core], False
        elif op.kind == "down":
            out_cuts = scaled_cuts(base, factor // 2, rows // 2)
            w2 = width // 2
            ro, fo = batch * op.cout * w2 * es, batch * op.cout * w2 * FLOAT_BYTES
            done = 0
            for j in range(n):
                m_in = core[j]
                extra = 1 if (op.conv and cuts[j + 1] < rows) else 0
                a = m_in + extra
                m = out_cuts[j + 1] - out_cuts[j]
                fresh = streamed or extra > 0
                gathered = (a * rin if fresh else 0) + (m_in * rin if streamed and extra else 0)
                padded = (a + 1) * batch * op.cin * (width + 1) * es if op.conv else 0
                ws = max(gathered + padded + m * ro, _stats_ws(m, ro, fo, half) if stats else m * ro)
                led.see(dev * (tail[j] + done) + ws + small(0, stats), i, "down")
                done += m * ro
            host_peak = max(host_peak, sum(cur) + done)
            cur, cur_whole = [(out_cuts[j + 1] - out_cuts[j]) * ro for j in range(n)], False
        elif op.kind == "conv_in":
            done = 0
            for j in range(n):
                t, b = _halo(j, n)
                a, m = core[j] + t + b, core[j]
                gathered = a * rin if n > 1 and batch * op.cin > 1 else 0  # a row slice of the image, copied
                ws = max(
                    gathered + a * rout,
                    a * rout + (m * rout if t + b > 0 else 0),
                    _stats_ws(m, rout, fout, half) if stats else m * rout,
                )
                led.see(dev * done + ws + small(0, stats), i, "conv_in")
                done += m * rout
            host_peak = max(host_peak, done)
            cur, cur_whole = [m * rout for m in core], False
        elif op.kind == "out":
            if net.pre_end:
                whole = batch * op.cin * rows * width * es
                led.see(sum(cur) + whole, i, "pre_end")  # resident: the list; streamed: each band fetched
                continue
            image = batch * op.cout * rows * width * es
            for j in range(n):
                t, b = _halo(j, n)
                a = core[j] + t + b
                held = tail[0] if cur_whole else tail[max(0, j - 1)]
                fresh = streamed or t + b > 0
                fetch = core[j] * rin if streamed and t + b > 0 else 0
                ws = max(_norm_ws(a, rin, fin, fresh, half) + fetch, a * rin + a * rout)
                led.see(dev * held + image + ws + small(op.cin, False), i, "out")
        elif op.kind == "concat":
            whole = batch * op.cin * rows * width * es
            if n > 1 or streamed:
                # resident: torch.cat beside the list; streamed: each band's copy beside the whole tensor
                led.see(dev * sum(cur) + whole + (max(cur) if streamed else 0), i, "concat")
            else:
                led.see(sum(cur), i, "concat")
    return BandPeak(led.peak, host_peak if streamed else 0, *led.at, tuple(led.per_op))


def _suffix(values: list[int]) -> list[int]:
    """``out[k] = sum(values[k:])`` (and 0 past the end)."""
    out = [0] * (len(values) + 1)
    for k in range(len(values) - 1, -1, -1):
        out[k] = out[k + 1] + values[k]
    return out


def _downs_after(ops: tuple[Op, ...], i: int) -> int:
    """Downsamplings from op ``i`` on (an encoder op's rows per latent row, as a power of two)."""
    return sum(op.kind == "down" for op in ops[i:])


def banded_peak_bytes(net: VaeNet, latent_h: int, latent_w: int, batch: int, element_size: int, bands: int,
                      streamed: bool = False) -> int:  # fmt: skip
    """Device bytes the banded part holds at most beyond its input (see :func:`banded_peak`)."""
    return banded_peak(net, latent_h, latent_w, batch, element_size, bands, streamed).device


def _stock_res(cin: int, cout: int) -> int:
    """Elements per pixel a stock ResnetBlock holds beside its input: ``x * sigmoid(x)`` keeps the normalised
    tensor, the sigmoid and the product at once; the residual add keeps the conv output, the skip and the sum."""
    return max(3 * cin, cin + cout, 2 * cout, 3 * cout, 3 * cout if cin != cout else 2 * cout)


def untiled_peak_bytes(net: VaeNet, latent_h: int, latent_w: int, batch: int, element_size: int) -> int:
    """The same part as the stock module runs it, in the same terms (beyond its input): the decoder's up path and
    end; the encoder's conv_in and down path with every output kept (ldm's Encoder holds them in a list until it
    returns) and, since they are still held there, its mid block's ResnetBlocks (the mid attention's own bytes are
    the attention planner's, as in the activation model)."""
    sz = sizes(net, latent_h, latent_w)
    unit = batch * element_size
    peak = 0
    held = 0  # the stored outputs (the encoder keeps every one)
    prev = 0  # the decoder's previous output (freed when the next is made)
    for i, op in enumerate(net.ops):
        px = sz.rows[i] * sz.widths[i]
        if op.kind == "res":
            peak = max(peak, held + prev + _stock_res(op.cin, op.cout) * px * unit)
            out = op.cout * px * unit
        elif op.kind == "up":
            out = 4 * op.cin * px * unit
            peak = max(peak, held + prev + (2 if op.conv else 1) * out)
        elif op.kind == "down":
            padded = op.cin * (sz.rows[i] + 1) * (sz.widths[i] + 1) * unit if op.conv else 0
            out = op.cout * (sz.rows[i] // 2) * (sz.widths[i] // 2) * unit
            peak = max(peak, held + prev + padded + out)
        elif op.kind == "conv_in":
            out = op.cout * px * unit
            peak = max(peak, held + out)
        elif op.kind == "out":
            if net.pre_end:
                break
            # norm_out's output beside the last block's, which then dies; SiLU's three copies; conv_out's output
            # beside the product; tanh's beside conv_out's
            image = op.cout * px * unit
            normed = op.cin * px * unit
            peak = max(peak, prev + normed, 3 * normed, normed + image, 2 * image if net.tanh else 0)
            break
        else:  # concat: the stock encoder's mid block reads its last output; block_1's output is block_2's input
            peak = max(peak, held + op.cin * px * unit + _stock_res(op.cin, op.cin) * px * unit)
            break
        if net.kind == "encode":
            held += out
        else:
            prev = out
    return peak


def mid_input_bytes(net: VaeNet, latent_h: int, latent_w: int, batch: int, element_size: int) -> int:
    """The mid block's output (the decoder's banded part's input; the encoder's mid input is its banded output)."""
    return batch * net.mid_channels * latent_h * latent_w * element_size


# --- the planner ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BandPlan:
    """How one VAE pass runs: ``stock`` (the module's own forward, untiled) or the barrier schedule in ``bands``
    bands, ``streamed`` (its lists parked in host memory, the bands streamed through the device); the predicted
    device peak of the part that would be banded, the untiled one, the room, and why. A plan on the device has at
    least :data:`MIN_RESIDENT_BANDS` bands: one band kept on the device would be the whole pass run through the
    banded schedule (merged statistics, SiLU in place), not the module's own forward, so it is never planned; one
    band streamed (the lists in host memory) is."""

    bands: int
    streamed: bool
    peak_bytes: int
    untiled_bytes: int
    room_bytes: int
    reason: str
    host_bytes: int = 0
    stock: bool = False

    @property
    def banded(self) -> bool:
        return not self.stock


#: the fewest bands a plan keeps on the device (see :class:`BandPlan`)
MIN_RESIDENT_BANDS = 2


def band_count(bands: int, streamed: bool) -> str:
    """A pass's plan in words: ``untiled`` (0: the module's own forward), ``4 bands``, ``4 bands streamed``, and a
    pass streamed through the device in one band just ``streamed``. No plan is one band kept on the device, and no
    wording says "1 band"."""
    if bands <= 0:
        return "untiled"
    if bands == 1:
        return "streamed" if streamed else "whole, through the bands' schedule"
    return f"{bands} bands" + (" streamed" if streamed else "")


def plan_bands(net: VaeNet, latent_h: int, latent_w: int, batch: int, element_size: int, room: int, *,
               band_cap: int = BAND_CAP, min_bands: int = 0, stream: bool = True,
               over_margin: int | None = None) -> BandPlan | None:  # fmt: skip
    """The stock forward when it fits ``room`` (bands cost time), else the fewest bands (at least two: see
    :class:`BandPlan`) whose predicted peak fits, at least ``min_bands`` (0: the stock forward may run; an
    out-of-memory retry asks for more), at most ``band_cap`` and one latent row per band; else the same within
    ``over_margin`` (free memory itself, when the room is free memory over a margin); else, with ``stream``, the
    fewest bands (one too) whose device working set fits when the lists live in host memory; None when nothing
    fits."""
    from .costs import format_bytes

    untiled = untiled_peak_bytes(net, latent_h, latent_w, batch, element_size)
    top = max_bands(latent_h, band_cap)
    rooms = [(room, "")]
    if over_margin is not None and over_margin > room:
        rooms.append((over_margin, " (over the margin)"))
    for where, margin in rooms:
        if min_bands <= 0 and untiled <= where:
            return BandPlan(1, False, untiled, untiled, where, f"fits untiled in {format_bytes(where)}{margin}",
                            stock=True)  # fmt: skip
        for n in range(max(MIN_RESIDENT_BANDS, min_bands), top + 1):
            peak = banded_peak_bytes(net, latent_h, latent_w, batch, element_size, n)
            if peak <= where:
                why = f"{n} bands: the fewest that fit {format_bytes(where)}{margin} (untiled {format_bytes(untiled)})"
                return BandPlan(n, False, peak, untiled, where, why)
    if stream:
        for where, margin in rooms:
            for n in range(max(1, min_bands), top + 1):
                found = banded_peak(net, latent_h, latent_w, batch, element_size, n, streamed=True)
                if found.device <= where:
                    parked = format_bytes(found.host)
                    how = f"{n} bands streamed" if n > 1 else "streamed"
                    why = (f"{how} through the device, the lists in host memory ({parked}): "
                           f"no resident plan fits {format_bytes(where)}{margin}")  # fmt: skip
                    return BandPlan(n, True, found.device, untiled, where, why, found.host)
    return None


def smallest_band_need(net: VaeNet, latent_h: int, latent_w: int, batch: int, element_size: int, *,
                       band_cap: int = BAND_CAP, stream: bool = True) -> int:  # fmt: skip
    """The smallest device peak of any plan under the cap: what the pass needs at least."""
    top = max_bands(latent_h, band_cap)
    need = banded_peak_bytes(net, latent_h, latent_w, batch, element_size, top, streamed=stream)
    return min(need, untiled_peak_bytes(net, latent_h, latent_w, batch, element_size))


# --- the receptive field ---------------------------------------------------------------------------------------


def receptive_rows(net: VaeNet, first: int = 0, last: int | None = None) -> tuple[float, float]:
    """Rows of context one output row needs through ops ``first``..``last`` (exclusive), before and after it, in
    rows of op ``first``'s input: what a band computed from its own rows alone (no exchange at the barriers) would
    need as a halo. Counted from the ops' geometry: a 3x3 conv adds one row each side, a nearest 2x upsampling
    halves what follows, the encoder's padded stride-2 conv doubles it (and its (0,1,0,1) padding makes it
    asymmetric)."""
    ops = net.ops[first:last]
    before = after = 0.0
    for op in reversed(ops):
        if op.kind == "res":
            before, after = before + 2, after + 2
        elif op.kind in ("conv_in", "out"):
            before, after = before + 1, after + 1
        elif op.kind == "up":
            # output rows [2a - before', ...) need input rows floor((2a - before' - conv) / 2)
            c = 1 if op.conv else 0
            before, after = (before + c + 1) // 2, (after + c + 1) // 2
        elif op.kind == "down":
            # output row r (core input rows 2r, 2r + 1) reads padded input rows 2r .. 2r + 2 (conv) or
            # 2r .. 2r + 1 (pooling)
            before, after = 2 * before, 2 * after + (1 if op.conv else 0)
    return before, after
