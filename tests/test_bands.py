"""The VAE in exact bands (lib_memslice/bands.py, band_costs.py): equal to the untiled module, its peak counted
exactly, planned in its room, retried on out-of-memory, streamed when even the bands do not fit.

Small ldm configs (ch 32, ch_mult 1,2,4,4: the SD geometry at a quarter of its width) at odd latent sizes no band
count divides; the published width (ch 128) only traced on the meta device, where the tracker counts shapes alone.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import types

import pytest
import torch

from lib_memslice import band_costs as bc
from lib_memslice import bands
from lib_memslice.limits import NotEnoughMemory
from memslice_tools.configs import SD15_DECODER
from memslice_tools.memtrack import PeakTracker

from .conftest import OOM_ERROR, import_ldm, requires_cpu_half

MiB = 1 << 20
SMALL = dict(SD15_DECODER, ch=32, num_res_blocks=1)


def build(config=SMALL, device="cpu", dtype=torch.float32, seed=0):
    _, model, _ = import_ldm()
    torch.manual_seed(seed)
    with contextlib.redirect_stdout(io.StringIO()), torch.device(device):
        dec = model.Decoder(**config).eval().to(dtype)
        enc = model.Encoder(**config).eval().to(dtype)
    return dec, enc


@pytest.fixture(scope="module")
def small():
    return build()


@pytest.fixture(scope="module")
def geometry():
    """The SD geometry (2 ResnetBlocks per level) at a quarter of the width."""
    return build(dict(SD15_DECODER, ch=32))


def image(x):
    """[-1, 1] -> [0, 1]: the picture the webui saves (times 255)."""
    return (x.float().clamp(-1, 1) + 1) / 2


class Host:
    """What the band forwards read of a host: settings, and sinks for records and failures."""

    def __init__(self, budget_gb=0.0, vae="auto", oom_retry=True, band_cap=bc.BAND_CAP):
        self._settings = types.SimpleNamespace(budget_gb=budget_gb, vae=vae, oom_retry=oom_retry, band_cap=band_cap)
        self.records, self.failures = [], []

    def settings(self):
        return self._settings

    def record_bands(self, record):
        self.records.append(record)

    def record_failure(self, error):
        self.failures.append(error)


def install(module, make, host, fallback=None):
    module.forward = types.MethodType(make("auto", host, fallback), module)
    return module


# --- the halo is the module's receptive field -------------------------------------------------------------------


def test_the_receptive_field_is_the_one_design_md_counted():
    """Counted from the geometry: 13 latent rows at up[3]'s input, 7 full-resolution rows (0.875 latent) at up[0]'s,
    10 rows at 4x (2.5 latent) at up[1]'s, 12 rows at 2x (6 latent, not 3) at up[2]'s; the encoder's down path 61
    rows before and 68 after a latent row's 8 image rows, 101 / 108 with the mid block's four convs and conv_out."""
    dec, enc = bc.decoder_net(), bc.encoder_net()
    assert bc.receptive_rows(dec) == (13, 13)
    ups = [i for i, op in enumerate(dec.ops) if op.kind == "up"]
    assert [bc.receptive_rows(dec, i + 1) for i in ups] == [(12, 12), (10, 10), (7, 7)]
    before, after = bc.receptive_rows(enc, 0, len(enc.ops) - 1)
    assert (before, after) == (61, 68)
    assert (before + 5 * enc.scale, after + 5 * enc.scale) == (101, 108)


def _without_groupnorm(module):
    for name, child in module.named_children():
        if isinstance(child, torch.nn.GroupNorm):
            setattr(module, name, torch.nn.Identity())
        else:
            _without_groupnorm(child)
    return module


def test_the_counted_receptive_field_is_the_real_modules(geometry):
    """With the GroupNorms removed (the only global op) and in float64, one changed row of the up path's input
    changes exactly the output rows the counted halo says, and no others; the same for the encoder's down path."""
    import copy

    dec, enc = (_without_groupnorm(copy.deepcopy(m)).double() for m in geometry)
    net, enet = bands.decoder_net(geometry[0]), bands.encoder_net(geometry[1])
    halo = bc.receptive_rows(net)
    h = torch.randn(1, dec.conv_in.out_channels, 40, 3, dtype=torch.float64)
    r = 20
    moved = h.clone()
    moved[:, :, r] += 1

    def up_path(x):
        for level in reversed(range(dec.num_resolutions)):
            for block in dec.up[level].block:
                x = block(x, None)
            if level:
                x = dec.up[level].upsample(x)
        return dec.conv_out(torch.nn.functional.silu(x))

    with torch.no_grad():
        changed = (up_path(moved) - up_path(h)).abs().amax(dim=(0, 1, 3)).nonzero().flatten()
    # the counted halo suffices and one latent row less would not: the change reaches into the 13th row each side
    scale = net.scale
    assert scale * (r - halo[1]) <= changed.min().item() < scale * (r - halo[1] + 1)
    assert scale * (r + halo[0]) <= changed.max().item() < scale * (r + halo[0] + 1)

    before, after = bc.receptive_rows(enet, 0, len(enet.ops) - 1)
    x = torch.randn(1, 3, 320, 16, dtype=torch.float64)
    p = 161
    moved = x.clone()
    moved[:, :, p] += 1

    def down_path(x):
        x = enc.conv_in(x)
        for level in range(enc.num_resolutions):
            for block in enc.down[level].block:
                x = block(x, None)
            if level != enc.num_resolutions - 1:
                x = enc.down[level].downsample(x)
        return x

    with torch.no_grad():
        changed = (down_path(moved) - down_path(x)).abs().amax(dim=(0, 1, 3)).nonzero().flatten()
    # latent row r reads image rows 8r - before .. 8r + 7 + after
    assert changed.min().item() == -(-(p - 7 - after) // 8) and changed.max().item() == (p + before) // 8


# --- exact --------------------------------------------------------------------------------------------------------


def _border_rows(cuts, scale, rows):
    """Output rows within half a latent row of a band border."""
    near = torch.zeros(rows, dtype=torch.bool)
    for c in cuts[1:-1]:
        near[max(0, c * scale - scale // 2) : c * scale + scale // 2] = True
    return near


@pytest.mark.parametrize("batch", [1, 2])
def test_a_banded_decode_equals_the_untiled_module_at_every_band_count(small, batch):
    """Latent 5x7 (every count 1-5, and streamed) and 13x21 (1304x816's shape scaled down: no count divides 13) in
    float32: within 1e-4 of the stock forward on the [-1, 1] output. The seam check against the float64 module:
    on the rows next to a band border the banded result is no further from the truth than the stock float32
    module is anywhere (a seam would be a systematic error far above rounding)."""
    import copy

    dec = small[0]
    dec64 = copy.deepcopy(dec).double()
    for lat, counts in (((5, 7), (1, 2, 3, 4, 5)), ((13, 21), (13,) if batch == 1 else ())):
        z = torch.randn(batch, 4, *lat, generator=torch.Generator().manual_seed(batch)) * 2
        with torch.no_grad():
            ref = dec(z)
            truth = dec64(z.double()) if lat == (5, 7) else None
            stock = (ref - truth).abs().max().item() if truth is not None else 0.0
            for n in counts:
                for streamed in (False, True) if n == 3 else (False,):
                    out = bands.decode_in_bands(dec, z, n, streamed)
                    assert (out - ref).abs().max().item() < 1e-4, (lat, n, streamed)
                    near = _border_rows(bc.band_cuts(lat[0], n), 8, ref.shape[2])
                    if near.any() and truth is not None:
                        border = (out - truth)[:, :, near].abs().max().item()
                        assert border <= 2 * stock + 1e-7, (lat, n, border, stock)


@pytest.mark.parametrize("batch", [1, 2])
def test_a_banded_encode_equals_the_untiled_module_at_every_band_count(small, batch):
    enc = small[1]
    for lat, counts in (((5, 7), (1, 2, 3, 4, 5)), ((13, 21), (13,) if batch == 1 else ())):
        x = torch.rand(batch, 3, lat[0] * 8, lat[1] * 8, generator=torch.Generator().manual_seed(batch)) * 2 - 1
        with torch.no_grad():
            ref = enc(x)
            for n in counts:
                for streamed in (False, True) if n == 2 else (False,):
                    out = bands.encode_in_bands(enc, x, n, streamed)
                    assert (out - ref).abs().max().item() < 1e-4, (lat, n, streamed)


def test_bfloat16_bands_are_as_accurate_as_the_untiled_module():
    """bfloat16 keeps 8 bits: on these random weights one ulp in five inputs moves the stock decoder's output by
    about 6/255 (so no schedule that is not bit for bit the stock one can promise 1/255 against it). The banded
    result is held to the stock module's own accuracy instead: against the float32 result, the decode within the
    stock error + 1/255 in image space, the encode (latents) within twice the stock error + 1/255 (two draws of the
    same rounding noise)."""
    dec, enc = build(dtype=torch.float32)
    z = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(3)) * 2
    x = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        ref32, eref32 = dec(z), enc(x)
        dec, enc = dec.to(torch.bfloat16), enc.to(torch.bfloat16)
        zb, xb = z.to(torch.bfloat16), x.to(torch.bfloat16)
        stock = (image(dec(zb)) - image(ref32)).abs().max().item()
        estock = (enc(xb).float() - eref32).abs().max().item()
        for n in (1, 2, 5):
            banded = (image(bands.decode_in_bands(dec, zb, n)) - image(ref32)).abs().max().item()
            assert banded <= stock + 1 / 255, (n, banded * 255, stock * 255)
            ebanded = (bands.encode_in_bands(enc, xb, n).float() - eref32).abs().max().item()
            assert ebanded <= 2 * estock + 1 / 255, (n, ebanded, estock)


@requires_cpu_half
def test_float16_bands_equal_the_untiled_module_within_one_level():
    dec, enc = build(dtype=torch.float16)
    z = (torch.randn(2, 4, 5, 3, generator=torch.Generator().manual_seed(5)) * 2).half()
    x = (torch.rand(2, 3, 40, 24, generator=torch.Generator().manual_seed(6)) * 2 - 1).half()
    with torch.no_grad():
        ref, eref = image(dec(z)), enc(x).float()
        for n in (1, 3):
            assert (image(bands.decode_in_bands(dec, z, n)) - ref).abs().max().item() <= 1 / 255, n
            assert (bands.encode_in_bands(enc, x, n).float() - eref).abs().max().item() <= 2 / 255, n


def test_the_merged_statistics_are_the_whole_tensors():
    """Chan's merge of per-band count, mean and M2 (float32): the whole tensor's biased variance and mean."""
    x = torch.randn(2, 64, 23, 9, dtype=torch.float64) * 3 + torch.linspace(-5, 5, 23)[:, None]
    whole = x.unflatten(1, (32, 2))
    var, mean = torch.var_mean(whole, dim=(2, 3, 4), correction=0)
    for cuts in ([0, 23], [0, 1, 23], [0, 5, 6, 17, 23]):
        m = bands.Moments(32)
        for a, b in itertools.pairwise(cuts):
            m.add(x[:, :, a:b].float())
        assert m.count == 2 * 23 * 9
        assert torch.allclose(m.mean.double(), mean, atol=1e-5)
        assert torch.allclose((m.m2 / m.count).double(), var, rtol=1e-5)


# --- the cost model -------------------------------------------------------------------------------------------------


def _traced(run, meta):
    """The tracker's peak of ``run(on_op)`` per op of the banded part (the tracker's count restarts at each op)."""
    per_op, at = {}, [None]
    with PeakTracker(meta=meta) as tracker:

        def on_op(i):
            if at[0] is not None:
                per_op[at[0]] = tracker.peak
            tracker.peak, at[0] = tracker.current, i

        out = run(on_op)
        del out
    return [per_op[i] for i in sorted(per_op)]


def _decode_peaks(dec, z, n, streamed=False):
    with torch.no_grad():
        mid = [bands.decoder_mid(dec, z)]
        return _traced(lambda on_op: bands.decode_up(dec, mid, n, streamed, on_op), z.device.type == "meta")


def _encode_peaks(enc, x, n, streamed=False):
    with torch.no_grad():
        return _traced(lambda on_op: bands.encode_down(enc, x, n, streamed, on_op), x.device.type == "meta")


def _decode_peak(dec, z, n, streamed=False):
    return max(_decode_peaks(dec, z, n, streamed))


def _encode_peak(enc, x, n, streamed=False):
    return max(_encode_peaks(enc, x, n, streamed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_predicted_peak_covers_the_measured_one_at_every_band_count(dtype):
    """Every count the planner can choose at latent 5x7 and 13x9 (no count divides 13), batch 1 and 2, and the
    nearest-only resampling (``resamp_with_conv=False``): the live-tensor tracker's peak of every op of the banded
    part (from the op's start to the next's: each cost term binds in some op) is at most the prediction, and within
    4 KiB of it (the small per-group statistics are counted conservatively). The sweep is traced on the meta device
    (shapes only, the same allocations); a few counts also run for real on the CPU."""
    es = torch.finfo(dtype).bits // 8
    for device, config, cases in (
        ("meta", SMALL, ((1, (5, 7), range(1, 6)), (2, (5, 7), (1, 3, 5)), (1, (13, 9), (2, 4, 7, 13)))),
        ("meta", dict(SMALL, resamp_with_conv=False), ((1, (5, 7), (1, 2, 5)),)),
        ("cpu", SMALL, ((2, (5, 3), (3,)),)),
    ):
        dec, enc = build(config, device=device, dtype=dtype)
        net, enet = bands.decoder_net(dec), bands.encoder_net(enc)
        for batch, (h, w), counts in cases:
            z = torch.randn(batch, 4, h, w, device=device).to(dtype)
            x = torch.randn(batch, 3, 8 * h, 8 * w, device=device).to(dtype)
            for n in counts:
                for kind, measured, model in (
                    ("decode", _decode_peaks(dec, z, n), bc.banded_peak(net, h, w, batch, es, n)),
                    ("encode", _encode_peaks(enc, x, n), bc.banded_peak(enet, h, w, batch, es, n)),
                ):
                    assert len(measured) == len(model.per_op) and max(model.per_op) == model.device
                    for i, (got, predicted) in enumerate(zip(measured, model.per_op, strict=True)):
                        where = (kind, device, batch, h, n, i, got, predicted)
                        assert got <= predicted <= got + 4096, where


def test_the_untiled_peak_is_the_stock_modules(small):
    dec, enc = small
    net, enet = bands.decoder_net(dec), bands.encoder_net(enc)
    z, x = torch.randn(1, 4, 5, 7), torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        mid = bands.decoder_mid(dec, z)
        with PeakTracker() as tracker:
            h = mid
            for level in reversed(range(dec.num_resolutions)):
                for block in dec.up[level].block:
                    h = block(h, None)
                if level:
                    h = dec.up[level].upsample(h)
            h = dec.norm_out(h)
            h = h * torch.sigmoid(h)
            h = dec.conv_out(h)
            del h
    assert tracker.peak == bc.untiled_peak_bytes(net, 5, 7, 1, 4)
    attn, enc.mid.attn_1 = enc.mid.attn_1, torch.nn.Identity()  # the mid attention is the attention planner's
    try:
        with torch.no_grad(), PeakTracker() as tracker:
            hs = [enc.conv_in(x)]
            for level in range(enc.num_resolutions):
                for block in enc.down[level].block:
                    hs.append(block(hs[-1], None))
                if level != enc.num_resolutions - 1:
                    hs.append(enc.down[level].downsample(hs[-1]))
            h = enc.mid.block_1(hs[-1], None)
            h = enc.mid.block_2(enc.mid.attn_1(h), None)
            del h, hs
    finally:
        enc.mid.attn_1 = attn
    assert tracker.peak <= bc.untiled_peak_bytes(enet, 5, 7, 1, 4) <= tracker.peak * 1.01


def test_the_model_is_within_ten_percent_at_1024px_with_the_published_config():
    """The SD VAE (ch 128, ch_mult 1,2,4,4, 2 ResnetBlocks) at 1024x1024, float32, traced on the meta device (the
    tracker counts shapes: the same allocations as a real run, checked above at small sizes): the stock up path
    4096 MiB, the banded part within 10 % (in fact a few KiB) of the prediction, and about 256 elements per output
    pixel plus one band's working set."""
    dec, enc = build(SD15_DECODER, device="meta")
    net, enet = bands.decoder_net(dec), bands.encoder_net(enc)
    assert net == bc.decoder_net() and enet == bc.encoder_net()
    z = torch.empty(1, 4, 128, 128, device="meta")
    x = torch.empty(1, 3, 1024, 1024, device="meta")
    assert bc.untiled_peak_bytes(net, 128, 128, 1, 4) == 4096 * MiB
    for n in (1, 2, 4, 8):
        decode = (_decode_peak(dec, z, n), bc.banded_peak_bytes(net, 128, 128, 1, 4, n))
        encode = (_encode_peak(enc, x, n), bc.banded_peak_bytes(enet, 128, 128, 1, 4, n))
        for measured, predicted in (decode, encode):
            assert measured <= predicted <= 1.1 * measured, (n, measured / MiB, predicted / MiB)
    per_pixel = bc.banded_peak_bytes(net, 128, 128, 1, 4, 8) / (1024 * 1024 * 4)
    assert 256 < per_pixel < 256 + 1024 / 8


def test_streamed_bands_hold_only_a_bands_working_set_on_the_device(small):
    net = bands.decoder_net(small[0])
    resident = bc.banded_peak(net, 13, 21, 1, 4, 13)
    streamed = bc.banded_peak(net, 13, 21, 1, 4, 13, streamed=True)
    assert streamed.device < resident.device / 3 and streamed.host > resident.device / 2


# --- planned --------------------------------------------------------------------------------------------------------


def test_the_plan_is_the_fewest_bands_that_fit(small):
    net = bands.decoder_net(small[0])
    untiled = bc.untiled_peak_bytes(net, 13, 21, 1, 4)
    plan = bc.plan_bands(net, 13, 21, 1, 4, untiled)
    assert plan.stock and not plan.banded  # a pass that fits untiled runs untiled
    # one band on the device would be the whole pass through the banded schedule: never planned (two at least)
    peaks = {n: bc.banded_peak_bytes(net, 13, 21, 1, 4, n) for n in range(2, 14)}
    assert bc.banded_peak_bytes(net, 13, 21, 1, 4, 1) < untiled
    for room in [*sorted(set(peaks.values())), untiled - 1]:
        plan = bc.plan_bands(net, 13, 21, 1, 4, room, stream=False)
        fitting = [n for n, peak in peaks.items() if peak <= room]
        assert plan is not None and not plan.stock and plan.bands == min(fitting) and plan.peak_bytes <= room
    capped = bc.plan_bands(net, 13, 21, 1, 4, min(peaks.values()), band_cap=4, stream=False)
    assert capped is None or capped.bands <= 4
    assert bc.plan_bands(net, 13, 21, 1, 4, min(peaks.values()) - 1, stream=False) is None
    over = bc.plan_bands(net, 13, 21, 1, 4, 0, over_margin=peaks[3], stream=False)
    assert over.bands == min(n for n, p in peaks.items() if p <= peaks[3]) and "over the margin" in over.reason


def test_a_room_below_every_resident_plan_streams_the_bands_and_is_exact(small):
    """On the CPU host and device memory are one: the streamed path is taken (lists parked, bands fetched) and its
    result is the untiled one."""
    dec = small[0]
    net = bands.decoder_net(dec)
    smallest_resident = min(bc.banded_peak_bytes(net, 13, 5, 1, 4, n) for n in range(1, 14))
    streamed = bc.banded_peak_bytes(net, 13, 5, 1, 4, 13, streamed=True)
    room = (smallest_resident + streamed) // 2
    host = Host(budget_gb=room / (1 << 30))
    z = torch.randn(1, 4, 13, 5)
    with torch.no_grad():
        ref = bands.stock_decode(dec, z)
        install(dec, bands.make_decoder_forward, host)
        try:
            out = dec(z)
        finally:
            del dec.forward
    (record,) = host.records
    assert record.streamed and record.peak_bytes <= room and record.site == "vae.decode"
    assert (out - ref).abs().max().item() < 1e-4


def test_the_forwards_run_stock_when_the_pass_fits_or_bands_are_off(small):
    dec, enc = small
    z, x = torch.randn(1, 4, 5, 7), torch.randn(1, 3, 40, 56)
    calls = []

    def fallback(self, value, **kwargs):
        calls.append(type(self).__name__)
        return torch.zeros(1)

    for mode in ("auto", "attention", "off"):
        host = Host(vae=mode)
        for module, make, value in ((dec, bands.make_decoder_forward, z), (enc, bands.make_encoder_forward, x)):
            install(module, make, host, fallback)
            try:
                with torch.no_grad():
                    module(value)
            finally:
                del module.forward
        if mode == "auto":  # planned: free memory holds the untiled pass
            assert [r.bands for r in host.records] == [0, 0] and all(r.reason.startswith("fits") for r in host.records)
    assert calls == ["Decoder", "Encoder"] * 3


def test_a_forced_count_runs_and_a_module_memslice_cannot_band_runs_stock(small):
    dec = small[0]
    host = Host()
    z = torch.randn(1, 4, 5, 7)
    with torch.no_grad():
        ref = bands.stock_decode(dec, z)
        install(dec, bands.make_decoder_forward, host)
        try:
            with bands.forced(3):
                out = dec(z)
            assert host.records[-1].bands == 3 and (out - ref).abs().max().item() < 1e-4
            attn, dec.up[0].attn = dec.up[0].attn, torch.nn.ModuleList([torch.nn.Identity()] * 2)
            try:
                assert bands.decoder_net(dec) is None
                with bands.forced(3):
                    dec(z)
                assert len(host.records) == 1  # the stock forward ran, unplanned
            finally:
                dec.up[0].attn = attn
        finally:
            del dec.forward


# --- out of memory ------------------------------------------------------------------------------------------------


class _RowLimit:
    """conv1 of the first full-resolution block runs out of memory on more than ``rows`` rows."""

    def __init__(self, conv, rows):
        self.conv, self.rows, self.sizes = conv, rows, []

    def __call__(self, x):
        self.sizes.append(x.shape[2])
        if x.shape[2] > self.rows:
            raise OOM_ERROR("CUDA out of memory. Tried to allocate 2.00 GiB")
        return torch.nn.Conv2d.forward(self.conv, x)


def test_out_of_memory_retries_with_more_bands_and_stays_exact(small):
    dec = small[0]
    conv = dec.up[0].block[0].conv1
    limit = _RowLimit(conv, 18)
    host = Host()
    z = torch.randn(1, 4, 5, 3)
    with torch.no_grad():
        ref = bands.stock_decode(dec, z)
        conv.forward = limit
        install(dec, bands.make_decoder_forward, host)
        try:
            out = dec(z)
        finally:
            del dec.forward, conv.forward
    (record,) = host.records
    # untiled (planned: it fits), then 2 bands (never one: the whole pass); 5 latent rows in 4 bands are at most 2
    # (16 + 2 halo rows)
    assert record.tried == ((0, False), (2, False)) and record.bands == 4
    assert (out - ref).abs().max().item() < 1e-4


def test_the_last_error_names_the_pass_the_counts_tried_and_free_memory(small):
    dec = small[0]
    conv = dec.up[0].block[0].conv1
    host = Host(band_cap=4)
    z = torch.randn(1, 4, 5, 3)
    with torch.no_grad():
        conv.forward = _RowLimit(conv, 0)
        install(dec, bands.make_decoder_forward, host)
        try:
            with pytest.raises(NotEnoughMemory) as caught:
                dec(z)
        finally:
            del dec.forward, conv.forward
    text = str(caught.value)
    assert "VAE decode" in text and "untiled, 2 bands, 4 bands and 4 bands streamed" in text
    assert "free now" in text and caught.value.site == "vae.decode" and host.failures == [caught.value]
    retry_off = Host(oom_retry=False)
    with torch.no_grad():
        conv.forward = _RowLimit(conv, 0)
        install(dec, bands.make_decoder_forward, retry_off)
        try:
            with pytest.raises(OOM_ERROR):
                dec(z)
        finally:
            del dec.forward, conv.forward
