"""What the CPU allocator adds to a pass beyond its live tensors: the number behind ``ALLOCATOR_OVERHEAD["cpu"]``.

``python -m memslice_tools.overhead`` runs real ldm UNet, VAE decode and VAE encode passes (reduced widths, SD1.5
configs, memslice-auto's attention, float32) three ways: under the live-tensor tracker (what the activation model
predicts), under the profiler's replay of every allocation and free (in-op scratch included), and as the growth of
the process's resident-set peak (``VmHWM``, reset through ``/proc/self/clear_refs`` before each pass; Linux only).
It prints each as a share over the tracker's peak; the job planner counts the largest share it printed. CUDA's
shares come from ``make gpu-check`` (its whole-job section).
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Sequence

import torch

from lib_memslice.forwards import BasicHost
from lib_memslice.models import sites_from_modules

from . import fit_activations as fit
from .inop import inop_peak_bytes
from .memtrack import PeakTracker

CASES = (("sd15", 64, 512), ("sd15", 64, 768), ("vae_decode", 64, 512), ("vae_decode", 128, 512),
         ("vae_encode", 64, 512))  # fmt: skip


def _status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(kind: str, channels: int, side: int) -> dict[str, float | None]:
    """Shares over the tracker's peak for one pass: the profiler replay and the resident-set peak."""
    module = fit.build(kind, channels)
    if kind in fit.UNET_KINDS:
        sites_from_modules(unet=module)
    else:
        sites_from_modules(vae=module)
    inputs = fit.make_inputs(kind, side, side, 2 if kind in fit.UNET_KINDS else 1, torch.float32, "cpu")
    host = BasicHost()

    def run() -> torch.Tensor:
        with fit.memslice_patched(host), torch.no_grad():
            return fit._call(module, kind, inputs)

    run()  # warm-up
    tracker = PeakTracker()
    with fit.memslice_patched(host), torch.no_grad(), tracker:
        out = fit._call(module, kind, inputs)
        del out
    live = tracker.peak
    replay = inop_peak_bytes(run)
    gc.collect()
    resident = None
    before = _status("VmRSS:")
    if before is not None and _reset_peak():
        out = run()
        del out
        peak = _status("VmHWM:")
        resident = None if peak is None else (peak - before) / live - 1
    return {"live_bytes": live, "replay_share": replay / live - 1, "resident_share": resident}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m memslice_tools.overhead", description=__doc__)
    parser.parse_args(argv)
    torch.manual_seed(0)
    shares = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32")
    for kind, channels, side in CASES:
        found = measure(kind, channels, side)
        shares += [s for s in (found["replay_share"], found["resident_share"]) if s is not None]
        resident = "-" if found["resident_share"] is None else f"{found['resident_share']:+.3f}"
        print(f"{kind:10} ch {channels:3} {side} px: live {found['live_bytes'] / 2**20:8.1f} MiB, "
              f"replay {found['replay_share']:+.3f}, resident-set peak {resident}")  # fmt: skip
    print(f"largest share over live tensors: {max(shares):+.3f} (ALLOCATOR_OVERHEAD['cpu'].high)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
