"""The activation model (``lib_memslice/activations.py``) against the real ldm modules, measured.

Every pass is built at a reduced width (model_channels 64, VAE ch 32; activations are proportional to the width,
which :func:`test_scaling_law` checks) and run at a size NOT used for fitting (the fit used 128x128 and 256x192) under
three attention regimes: memslice-auto with an ample budget (the fused kernel), einsum with an ample budget
(unsliced score matrices) and einsum under a budget that forces slicing. The model's pass peak —
``pass_peak_bytes`` of the predicted activations, the predicted live bytes per site and the attention transients
memslice itself predicted in that run — must lie in [measured, 1.15 x measured]. About 40 s on 2 cores.

Why 64 channels for the UNets: the planner's fused-kernel transient includes the kernel's in-op scratch (~1-2 MiB,
invisible to the tracker), which at 32 channels and these sizes rivals a whole half-precision pass.
"""

from __future__ import annotations

import types

import pytest
import torch

from lib_memslice import activations as act
from lib_memslice.models import BUILTIN
from memslice_tools import fit_activations as fit

WIDTHS = {"sd15": 64, "sd2": 64, "sdxl": 64, "vae_decode": 32, "vae_encode": 32}
#: (width, height) px per pass, none of them a fit size; large enough that an unsliced score matrix outgrows the
#: pass's activations (so what is live at that call decides the peak), small enough for a quick test
SIZES = {
    "sd15": (320, 192),
    "sd2": (192, 384),
    "sdxl": (288, 384),
    "vae_decode": (448, 448),
    "vae_encode": (256, 320),
}
TOLERANCE = 1.15


@pytest.fixture(scope="module")
def modules():
    """Built passes, shared by the tests of this file: (kind, width, dtype) -> module."""
    cache: dict[tuple[str, int, torch.dtype], torch.nn.Module] = {}

    def get(kind: str, width: int | None = None, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        width = width or WIDTHS[kind]
        key = (kind, width, dtype)
        if key not in cache:
            cache[key] = fit.build(kind, width, dtype=dtype)
        return cache[key]

    return get


def assert_bounded(kind: str, m: fit.Measurement, label: str) -> str:
    predicted, winner = fit.predicted_pass_peak(kind, m)
    assert m.peak_bytes <= predicted <= TOLERANCE * m.peak_bytes, (
        f"{kind} {label}: predicted {predicted} B vs measured {m.peak_bytes} B "
        f"({predicted / m.peak_bytes:.3f}x; winning term {winner})"
    )
    return winner


@pytest.mark.parametrize("kind", fit.KINDS)
def test_pass_peak_is_bounded_by_the_model(kind, modules):
    w, h = SIZES[kind]
    batch = fit.UNET_BATCH if kind in fit.UNET_KINDS else fit.VAE_BATCH
    regimes = fit.measure_regimes(modules(kind), kind, WIDTHS[kind], w, h, batch)
    winners = {regime: assert_bounded(kind, m, regime) for regime, m in regimes.items()}
    # each site's live bytes on its own (a live term matters only where its transient is large, so a wrong one can
    # hide inside the pass's tolerance)
    m = regimes["ample"]
    _, live = fit.predicted_activation_bytes(kind, m)
    assert set(live) == set(m.live_bytes)
    for site, measured in m.live_bytes.items():
        assert measured <= live[site] <= TOLERANCE * measured, (site, live[site], measured)
    assert regimes["sliced"].max_slices > 1, "the forcing budget did not slice"
    assert regimes["einsum"].max_slices == 1
    if kind == "vae_decode":
        # the decoder's attention runs on the latent grid, far from its full-resolution peak: the pass peak is the
        # max, not the sum, of activations and transient (the sum would overshoot here)
        m = regimes["einsum"]
        summed = fit.predicted_activation_bytes(kind, m)[0] + max(m.attention_peaks.values())
        assert summed > TOLERANCE * m.peak_bytes
    else:
        # what is live at a site plus its transient sets the peak somewhere: the combination is exercised
        assert set(winners.values()) - {"activations"}, winners


def test_half_precision_has_its_own_coefficients(modules):
    """Half precision as the webui runs it on CUDA (autocast, emulated on CPU): SDXL's peak moves to GroupNorm32's
    float32 copy at level 0, so the fp32 coefficients would under-predict it; the half-precision ones bound it, and
    a half-precision UNet without autocast (the webui's manual cast on MPS/XPU) too."""
    kind, (w, h) = "sdxl", (288, 384)
    module = modules(kind, dtype=torch.bfloat16)
    ample, einsum = (
        fit.measure_pass(module, kind, WIDTHS[kind], w, h, fit.UNET_BATCH, settings=settings, dtype=torch.bfloat16)
        for settings in (fit.AMPLE, fit.EINSUM)
    )
    for label, m in (("ample", ample), ("einsum", einsum)):
        assert m.element_size == 2
        assert_bounded(kind, m, f"bf16 autocast {label}")
    _, live = fit.predicted_activation_bytes(kind, ample)
    for site, measured in ample.live_bytes.items():
        assert measured <= live[site] <= TOLERANCE * measured, (site, live[site], measured)
    as_if_fp32, _ = fit.predicted_pass_peak(kind, ample, act.pass_model(kind, 4))
    assert as_if_fp32 < ample.peak_bytes
    kind, (w, h) = "sd15", SIZES["sd15"]
    module = modules(kind, dtype=torch.bfloat16)
    autocast = fit.measure_pass(module, kind, WIDTHS[kind], w, h, 2, dtype=torch.bfloat16)
    assert_bounded(kind, autocast, "bf16 autocast")  # autocast's float32 norm outputs: 26 x C x N, not 25
    plain = fit.measure_pass(module, kind, WIDTHS[kind], w, h, 2, dtype=torch.bfloat16, autocast=False)
    assert_bounded(kind, plain, "bf16 without autocast")
    assert plain.peak_bytes < autocast.peak_bytes


def test_scaling_law(modules):
    """Activations are proportional to the width, the batch and the element size (the model's premise), and
    affine in the latent tokens; the model follows each."""
    kind, (w, h) = "sd15", SIZES["sd15"]
    base = fit.measure_pass(modules(kind, 64), kind, 64, w, h, 2)
    double_width = fit.measure_pass(modules(kind, 128), kind, 128, w, h, 2)
    assert double_width.peak_bytes / base.peak_bytes == pytest.approx(2.0, rel=1e-3)
    for site, live in base.live_bytes.items():
        assert double_width.live_bytes[site] / live == pytest.approx(2.0, rel=2e-3), site
    one = fit.measure_pass(modules(kind, 64), kind, 64, w, h, 1)
    assert one.peak_bytes * 2 == pytest.approx(base.peak_bytes, rel=1e-4)
    half = fit.measure_pass(modules(kind, 64, torch.bfloat16), kind, 64, w, h, 2, dtype=torch.bfloat16, autocast=False)
    assert half.peak_bytes * 2 == pytest.approx(base.peak_bytes, rel=1e-4)  # autocast adds to this: its own test
    # tokens: a second size, per token almost the same (the per-channel constant is all that differs)
    big = fit.measure_pass(modules(kind, 64), kind, 64, 384, 320, 2)
    n_small, n_big = act.latent_tokens(w, h), act.latent_tokens(384, 320)
    assert (big.peak_bytes / n_big) / (base.peak_bytes / n_small) == pytest.approx(1.0, rel=1e-3)
    for m in (double_width, one, half, big):
        assert_bounded(kind, m, f"C{m.channels} batch {m.batch} e{m.element_size} {m.width}x{m.height}")
    # the VAE: proportional to ch
    dec32 = fit.measure_pass(modules("vae_decode", 32), "vae_decode", 32, 128, 128, 1)
    dec64 = fit.measure_pass(modules("vae_decode", 64), "vae_decode", 64, 128, 128, 1)
    assert dec64.peak_bytes / dec32.peak_bytes == pytest.approx(2.0, rel=1e-3)
    assert_bounded("vae_decode", dec64, "ch 64")


# --- the arithmetic, no modules ----------------------------------------------------------------------------


def test_combination_rule():
    live = {"a": 10, "b": 50}
    assert act.pass_peak_bytes(100, {"a": 20, "b": 30}, live) == 100  # activations win
    assert act.pass_peak_bytes(100, {"a": 95, "b": 30}, live) == 105  # live at a + its transient
    assert act.pass_peak_bytes(100, {"a": 20, "b": 60}, live) == 110
    assert act.pass_peak_bytes(100, {"unknown": 5}, live) == 105  # unknown site: charged the full activations
    assert act.pass_peak_bytes(100, [5, 7]) == 107  # plain transients: the upper bound
    assert act.pass_peak_bytes(100, {}, live) == 100


def test_a_pass_peak_combines_activations_live_bytes_and_transients():
    peaks = {"unet.level0.self": 900 << 20, "unet.level1.self": 10 << 20}
    live = act.unet_live_bytes("sd15", 768, 512, 4, 2)
    expected = act.pass_peak_bytes(act.unet_activation_bytes("sd15", 768, 512, 4, 2), peaks, live)
    assert expected == live["unet.level0.self"] + peaks["unet.level0.self"]
    decode = act.pass_peak_bytes(act.vae_decode_activation_bytes(1024, 1024, 1, 4), {"vae.mid": 2 << 30},
                                 act.vae_decode_live_bytes(1024, 1024, 1, 4))  # fmt: skip
    assert decode == act.vae_decode_activation_bytes(1024, 1024, 1, 4)  # 4 GiB of activations beat 2 GiB + live
    with pytest.raises(ValueError):
        act.pass_model("vae", 2)


def test_attention_peaks_takes_the_largest_per_site():
    records = [types.SimpleNamespace(site=s, peak_bytes=b) for s, b in (("x", 3), ("y", 5), ("x", 9), ("x", 1))]
    assert act.attention_peaks(records) == {"x": 9, "y": 5}


def test_every_planner_site_has_a_live_coefficient():
    """The consumer plans attention per site with models.BUILTIN: each of those names must be known here."""
    for arch in act.ARCHS:
        unet_sites = {s.name for s in BUILTIN[arch].sites if not s.vae}
        assert unet_sites == set(act.unet_live_bytes(arch, 512, 512, 2, 2))
    assert set(act.vae_decode_live_bytes(512, 512, 1, 2)) == {"vae.mid"}
    assert set(act.vae_encode_live_bytes(512, 512, 1, 2)) == {"vae.mid"}


def test_sizes_round_up_to_the_unet_grid():
    assert act.latent_tokens(512, 512) == 64 * 64
    assert act.latent_tokens(520, 512, 8) == 72 * 64  # 65 latent pixels round up to 72 (three downsamples)
    assert act.latent_tokens(520, 512, 4) == 68 * 64  # SDXL: two downsamples
    assert act.unet_activation_bytes("sd15", 520, 512, 2, 2) == act.unet_activation_bytes("sd15", 576, 512, 2, 2)
    assert act.unet_activation_bytes("sdxl", 1024, 1056, 2, 2) > act.unet_activation_bytes("sdxl", 1024, 1024, 2, 2)
    assert act.vae_decode_activation_bytes(520, 512, 1, 2) < act.vae_decode_activation_bytes(576, 512, 1, 2)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        act.unet_activation_bytes("sd3", 512, 512, 2, 2)
    for args in ((0, 512, 1, 2), (512, 512, 0, 2), (512, 512, 1, 0), (512.0, 512, 1, 2)):
        with pytest.raises(ValueError):
            act.vae_decode_activation_bytes(*args)


def test_vae_decode_matches_the_independent_measurement_in_design_md():
    """design.md section 5 (another engineer, another tracker run): the SD VAE Decoder held 256 MiB of live tensors
    at 256 px and 1024 MiB at 512 px (fp32, batch 1). The Decoder alone; the model adds post_quant_conv's latent."""
    mib = 1 << 20
    assert act.vae_decode_activation_bytes(256, 256, 1, 4) / mib == pytest.approx(256, rel=0.01)
    assert act.vae_decode_activation_bytes(512, 512, 1, 4) / mib == pytest.approx(1024, rel=0.01)
