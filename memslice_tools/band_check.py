"""The VAE's bands against the live-tensor tracker at the published size: ``python -m memslice_tools.band_check``.

Builds the SD VAE's Decoder and Encoder (ch 128, ch_mult 1,2,4,4, 2 ResnetBlocks: SD1.x, SD2.x and SDXL share it)
on the meta device, where :class:`memslice_tools.memtrack.PeakTracker` counts the shapes every op allocates (the
same allocations a real run makes; tests/test_bands.py checks that at small sizes), and prints per band count the
tracker's peak of the banded part, the cost model's prediction and their ratio, beside the stock module's.
``--real`` runs the computation on the CPU instead (minutes per pass at 1024 px).
"""

from __future__ import annotations

import argparse
import contextlib
import io

import torch

from lib_memslice import band_costs, bands

from .configs import SD15_DECODER
from .memtrack import PeakTracker

MiB = 1 << 20


def build(device: str, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module]:
    with contextlib.redirect_stdout(io.StringIO()):
        from ldm.modules.diffusionmodules.model import Decoder, Encoder

        with torch.device(device):
            return Decoder(**SD15_DECODER).eval().to(dtype), Encoder(**SD15_DECODER).eval().to(dtype)


def measure(kind: str, module: torch.nn.Module, x: torch.Tensor, bands_: int) -> int:
    meta = x.device.type == "meta"
    with torch.no_grad():
        if kind == "decode":
            mid = [bands.decoder_mid(module, x)]
            with PeakTracker(meta=meta) as tracker:
                out = bands.decode_up(module, mid, bands_)
        else:
            with PeakTracker(meta=meta) as tracker:
                out = bands.encode_down(module, x, bands_)
        del out
    return tracker.peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=(1024, 1024), metavar=("W", "H"))
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--bands", type=int, nargs="*", default=[1, 2, 4, 8, 16])
    parser.add_argument("--real", action="store_true", help="compute on the CPU instead of tracing on meta")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    device = "cpu" if args.real else "meta"
    width, height = args.size
    lat_w, lat_h = width // 8, height // 8
    es = torch.finfo(dtype).bits // 8
    dec, enc = build(device, dtype)
    inputs = {
        "decode": (dec, torch.zeros(1, 4, lat_h, lat_w, device=device, dtype=dtype)),
        "encode": (enc, torch.zeros(1, 3, lat_h * 8, lat_w * 8, device=device, dtype=dtype)),
    }
    worst = 0.0
    print(f"SD VAE at {width}x{height} {args.dtype} ({'CPU' if args.real else 'meta-traced'}), banded part's peak")
    print(f"{'pass':<7} {'bands':>5} {'measured MiB':>13} {'predicted MiB':>14} {'ratio':>7} {'per px':>7}")
    for kind, (module, x) in inputs.items():
        net = bands.decoder_net(module) if kind == "decode" else bands.encoder_net(module)
        assert net is not None
        untiled = band_costs.untiled_peak_bytes(net, lat_h, lat_w, 1, es)
        print(f"{kind:<7} {'stock':>5} {'':>13} {untiled / MiB:>14.1f} {'':>7} {untiled / es / (width * height):>7.0f}")
        for n in args.bands:
            if n > lat_h:
                continue
            measured = measure(kind, module, x, n)
            predicted = band_costs.banded_peak_bytes(net, lat_h, lat_w, 1, es, n)
            ratio = predicted / measured
            worst = max(worst, abs(ratio - 1))
            print(f"{kind:<7} {n:>5} {measured / MiB:>13.1f} {predicted / MiB:>14.1f} {ratio:>7.4f} "
                  f"{predicted / es / (width * height):>7.0f}")  # fmt: skip
    print(f"largest deviation of the prediction: {100 * worst:.3f} %")
    return 0 if worst <= 0.10 else 1


if __name__ == "__main__":
    raise SystemExit(main())
