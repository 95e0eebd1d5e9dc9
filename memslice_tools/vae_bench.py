"""The VAE decode in exact bands against the untiled decode, and against the tiling users have today.

``python -m lib_memslice bench`` runs it as its VAE section; ``python -m lib_memslice bench --vae`` runs it alone
(with ``--quick``: 512 px at half the SD width, fp32, 2 threads, one round). On the real ldm ``Decoder`` at the SD
config (ch 128, ch_mult 1,2,4,4, 2 ResnetBlocks: SD1.x, SD2.x and SDXL share it), random weights and a random
latent:

- **time**: memslice's banded decode (:func:`lib_memslice.bands.decode_in_bands`) against the module's own forward,
  at 1024x1024 in float32 and bfloat16 on 1 and 2 threads, in interleaved rounds (the order rotated each round; each
  timed call one whole decode); a case's ratio is the median of per-round ratios banded / untiled. Target: at most
  ``RATIO``. Both run the same ``conv_in`` and mid block (their attention the module's own): only the up path
  differs, by the rows each band's convolutions compute past its edge and the barriers' bookkeeping.
- **memory**: the banded part's peak and the stock up path's, traced on the meta device with
  :class:`memslice_tools.memtrack.PeakTracker` (it counts the allocations a real run makes from shapes alone;
  tests/test_bands.py checks that at small sizes), against :mod:`lib_memslice.band_costs`' prediction, float32 and
  bfloat16, every band count from 1 to 32.
- **error**, for the picture: the banded decode and an overlap-blend tiler, both against the untiled decode in
  float32, in the webui's 8-bit units (``(x + 1) / 2 * 255``, unclamped). The tiler is the method users have today,
  written here from ComfyUI's published description of its tiled VAE decode (no code of it is used): the whole
  decoder per tile of 64 latent pixels overlapping by 16, feathered linearly across the overlap, in three tile
  layouts (64x64, 32x128, 128x32) averaged. A PNG heat map of both errors, on one colour scale, goes to docs/ (a
  full run) or the output folder.
"""

from __future__ import annotations

import contextlib
import copy
import io
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lib_memslice import band_costs, bands

from .configs import SD15_DECODER
from .harness import torch_threads
from .memtrack import PeakTracker

Tensor = torch.Tensor
#: the banded decode within this ratio of the untiled one (median of per-round ratios)
RATIO = 1.15
#: the banded part's predicted peak at least the traced one and within this share above it
MEMORY_SLACK = 0.10
#: the banded decode's largest error against the untiled one (8-bit units): under half a level, the same image
EXACT = 0.5
#: the overlap-blend tiler's tiles and overlap, in latent pixels
TILE, OVERLAP = 64, 16
HEATMAP = "docs/vae-bands-error.png"


@dataclass(frozen=True)
class Plan:
    side: int  # the image's side in pixels (the latent's is side / 8)
    ch: int  # the decoder's width (128: the SD VAE)
    dtypes: tuple[torch.dtype, ...]
    threads: tuple[int, ...]
    bands: tuple[int, ...]  # the band counts timed (the last also drawn in the error map)
    rounds: int
    memory_bands: tuple[int, ...]
    tile: int = TILE
    overlap: int = OVERLAP
    note: str = ""


FULL = Plan(1024, 128, (torch.float32, torch.bfloat16), (1, 2), (8,), 2, (1, 2, 4, 8, 16, 32),
            note="the SD VAE decoder at 1024x1024, fp32 and bf16, 1 and 2 threads, 8 bands, 2 rounds")  # fmt: skip
QUICK = Plan(512, 64, (torch.float32,), (2,), (4,), 1, (1, 2, 4, 8),
             note="512x512 at half the SD width, fp32, 2 threads, 4 bands, 1 round")  # fmt: skip
SMOKE = Plan(128, 32, (torch.float32,), (1,), (2,), 2, (1, 2, 4), tile=8, overlap=2,
             note="test-only: 128 px at a quarter of the SD width, tiles of 8 latent px")  # fmt: skip


def build(ch: int, seed: int = 0) -> torch.nn.Module:
    """ldm's Decoder at the SD config and width ``ch``, random weights, ``eval()``, float32."""
    with contextlib.redirect_stdout(io.StringIO()):
        from ldm.modules.diffusionmodules.model import Decoder

        torch.manual_seed(seed)
        return Decoder(**{**SD15_DECODER, "ch": ch}).eval()


def latent(side: int, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, side // 8, side // 8, generator=g)


# --- time ---------------------------------------------------------------------------------------------------------


def _timed(fn: Callable[[], Tensor]) -> float:
    start = time.perf_counter()
    out = fn()
    elapsed = time.perf_counter() - start
    del out
    return elapsed


def measure_time(decoder: torch.nn.Module, z: Tensor, dtype: torch.dtype, threads: int, plan: Plan,
                 log: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    """One case: the untiled decode and each band count, interleaved over ``plan.rounds`` rounds (a warm-up first)."""
    module = decoder if dtype == torch.float32 else copy.deepcopy(decoder).to(dtype)
    z = z.to(dtype)
    runs: dict[str, Callable[[], Tensor]] = {"untiled": lambda: bands.stock_decode(module, z)}
    for n in plan.bands:
        runs[f"{n} bands"] = lambda n=n: bands.decode_in_bands(module, z, n)
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    with torch_threads(threads), torch.no_grad():
        for name in names:  # warm-up: the allocator's pages, the kernels' first calls
            _timed(runs[name])
        for r in range(plan.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                times[name].append(_timed(runs[name]))
    untiled = times["untiled"]
    row: dict[str, Any] = {"dtype": str(dtype).removeprefix("torch."), "threads": threads, "side": z.shape[-1] * 8,
                           "untiled_s": statistics.median(untiled), "banded": {}}  # fmt: skip
    for name in names[1:]:
        ratios = [b / u for b, u in zip(times[name], untiled, strict=True)]
        row["banded"][name] = {"median_s": statistics.median(times[name]), "ratio": statistics.median(ratios),
                               "ratios": ratios}  # fmt: skip
    log(f"  {row['dtype']} {threads}t: untiled {row['untiled_s']:.2f} s; " + ", ".join(
        f"{k} {v['median_s']:.2f} s ({v['ratio']:.3f}x)" for k, v in row["banded"].items()))  # fmt: skip
    return row


# --- memory -------------------------------------------------------------------------------------------------------


def _stock_up(decoder: Any, h: Tensor) -> Tensor:
    """The part the bands replace, as the stock forward runs it: the up path, norm_out, SiLU, conv_out."""
    for level in reversed(range(decoder.num_resolutions)):
        for block in decoder.up[level].block:
            h = block(h, None)
        if level != 0:
            h = decoder.up[level].upsample(h)
    h = decoder.norm_out(h)
    h = h * torch.sigmoid(h)
    return decoder.conv_out(h)


def measure_memory(plan: Plan, dtype: torch.dtype) -> list[dict[str, Any]]:
    """The up path's peak, stock and banded at every count of ``plan.memory_bands``, traced on meta, against the
    prediction (bytes above the mid block's output, which both count from)."""
    with contextlib.redirect_stdout(io.StringIO()), torch.device("meta"):
        from ldm.modules.diffusionmodules.model import Decoder

        decoder = Decoder(**{**SD15_DECODER, "ch": plan.ch}).eval().to(dtype)
    net = bands.decoder_net(decoder)
    assert net is not None
    lat = plan.side // 8
    es = torch.finfo(dtype).bits // 8
    rows = []
    with torch.no_grad():
        h = torch.empty(1, net.mid_channels, lat, lat, device="meta", dtype=dtype)
        with PeakTracker(meta=True) as tracker:
            out = _stock_up(decoder, h)
            del out
        predicted = band_costs.untiled_peak_bytes(net, lat, lat, 1, es)
        rows.append({"dtype": str(dtype).removeprefix("torch."), "bands": 0, "measured_bytes": tracker.peak,
                     "predicted_bytes": predicted})  # fmt: skip
        for n in plan.memory_bands:
            if n > lat:
                continue
            mid = [torch.empty(1, net.mid_channels, lat, lat, device="meta", dtype=dtype)]
            with PeakTracker(meta=True) as tracker:
                out = bands.decode_up(decoder, mid, n)
                del out
            predicted = band_costs.banded_peak_bytes(net, lat, lat, 1, es, n)
            rows.append({"dtype": str(dtype).removeprefix("torch."), "bands": n, "measured_bytes": tracker.peak,
                         "predicted_bytes": predicted})  # fmt: skip
    for row in rows:
        row["ratio"] = row["predicted_bytes"] / row["measured_bytes"] if row["measured_bytes"] else None
    return rows


# --- error: the overlap-blend tiler ------------------------------------------------------------------------------


def _starts(size: int, tile: int, overlap: int) -> tuple[list[int], int]:
    """Tile starts along one side (every ``tile - overlap``, the last flush with the edge) and the tile's length."""
    if size <= tile:
        return [0], size
    stride = max(1, tile - overlap)
    starts = [*range(0, size - tile, stride), size - tile]
    return sorted(set(starts)), tile


def _ramp(length: int, feather: int, start: bool, end: bool) -> Tensor:
    """1 across a tile, falling linearly to 1 / (feather + 1) over ``feather`` pixels at each side that meets
    another tile (``start``/``end``); image borders are not feathered."""
    w = torch.ones(length)
    steps = torch.arange(1, feather + 1, dtype=torch.float32) / (feather + 1)
    n = min(feather, length)
    if start:
        w[:n] = torch.minimum(w[:n], steps[:n])
    if end:
        w[length - n :] = torch.minimum(w[length - n :], steps[:n].flip(0))
    return w


def tiled_decode(decode: Callable[[Tensor], Tensor], z: Tensor, tile_w: int, tile_h: int, overlap: int,
                 scale: int = 8) -> Tensor:  # fmt: skip
    """One layout: the whole decoder per tile, the tiles blended with feathered weights, divided by their sum."""
    _, _, lat_h, lat_w = z.shape
    ys, th = _starts(lat_h, tile_h, overlap)
    xs, tw = _starts(lat_w, tile_w, overlap)
    acc: Tensor | None = None
    weight = torch.zeros(1, 1, lat_h * scale, lat_w * scale)
    for y in ys:
        for x in xs:
            tile = decode(z[:, :, y : y + th, x : x + tw]).float()
            rows = _ramp(th * scale, overlap * scale, y > 0, y + th < lat_h)
            cols = _ramp(tw * scale, overlap * scale, x > 0, x + tw < lat_w)
            mask = (rows[:, None] * cols[None, :])[None, None]
            if acc is None:
                acc = torch.zeros(tile.shape[0], tile.shape[1], lat_h * scale, lat_w * scale)
            region = (slice(None), slice(None), slice(y * scale, (y + th) * scale), slice(x * scale, (x + tw) * scale))
            acc[region] += tile * mask
            weight[region] += mask
    assert acc is not None
    return acc / weight


def overlap_blend_decode(decode: Callable[[Tensor], Tensor], z: Tensor, tile: int = TILE,
                         overlap: int = OVERLAP) -> Tensor:  # fmt: skip
    """Three layouts (tile x tile, tile/2 x 2 tile, 2 tile x tile/2: width x height) decoded and averaged."""
    layouts = ((tile, tile), (tile // 2, tile * 2), (tile * 2, tile // 2))
    return sum(tiled_decode(decode, z, w, h, overlap) for w, h in layouts) / len(layouts)  # type: ignore[return-value]


def _error(x: Tensor, reference: Tensor) -> Tensor:
    """Per pixel, the largest error over the channels, in the webui's 8-bit units."""
    return ((x.float() - reference.float()).abs() * 127.5).amax(dim=1)[0]


def measure_error(decoder: torch.nn.Module, z: Tensor, plan: Plan, heatmap: str | None,
                  log: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    n = plan.bands[-1]
    with torch.no_grad():
        start = time.perf_counter()
        untiled = bands.stock_decode(decoder, z)
        untiled_s = time.perf_counter() - start
        banded = bands.decode_in_bands(decoder, z, n)
        start = time.perf_counter()
        tiled = overlap_blend_decode(lambda t: bands.stock_decode(decoder, t), z, plan.tile, plan.overlap)
        tiler_s = time.perf_counter() - start
    maps = {f"memslice, {n} bands": _error(banded, untiled), "overlap-blend tiler": _error(tiled, untiled)}
    result: dict[str, Any] = {"side": plan.side, "bands": n, "tile": plan.tile, "overlap": plan.overlap,
                              "untiled_s": untiled_s, "tiler_s": tiler_s, "methods": {}}  # fmt: skip
    for name, err in maps.items():
        result["methods"][name] = {"max": float(err.max()), "mean": float(err.mean()),
                                   "pixels_off_by_a_level": float((err >= 0.5).float().mean())}  # fmt: skip
    log("  error vs untiled (8-bit units): " + "; ".join(
        f"{k} max {v['max']:.3g}, mean {v['mean']:.3g}" for k, v in result["methods"].items()))  # fmt: skip
    if heatmap:
        result["heatmap"] = draw(maps, heatmap, plan)
    return result


def draw(maps: dict[str, Tensor], path: str, plan: Plan) -> str | None:
    """Both error maps side by side, one logarithmic colour scale (matplotlib, if present)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import LogNorm
    except Exception:
        return None
    import os

    floor = 1e-4
    top = max(float(m.max()) for m in maps.values())
    norm = LogNorm(vmin=floor, vmax=max(top, 10 * floor))
    fig, axes = plt.subplots(1, len(maps), figsize=(5 * len(maps), 4.6))
    image = None
    for ax, (name, err) in zip(axes, maps.items(), strict=True):
        image = ax.imshow(err.clamp(min=floor).numpy(), norm=norm, cmap="magma")
        ax.set_title(f"{name}\nmax {float(err.max()):.2g}, mean {float(err.mean()):.2g} levels", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=list(axes), label="|error| vs the untiled decode (8-bit levels, log scale)", shrink=0.85)
    fig.suptitle(f"SD VAE decoder (random weights, ch {plan.ch}), {plan.side}x{plan.side}, float32", fontsize=10)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- the section, its targets, its report ----------------------------------------------------------------------


def section(plan: Plan, log: Callable[[str], None], heatmap: str | None = None) -> dict[str, Any]:
    """Time, memory and error of ``plan``; the threads as they were afterwards."""
    from .speed import bf16_runs

    dtypes = [d for d in plan.dtypes if d != torch.bfloat16 or bf16_runs()]
    result: dict[str, Any] = {"note": plan.note, "ratio_target": RATIO, "time": [], "memory": [],
                              "skipped": [] if len(dtypes) == len(plan.dtypes) else ["bf16: not run here"]}  # fmt: skip
    decoder = build(plan.ch)
    z = latent(plan.side)
    for threads in plan.threads:
        for dtype in dtypes:
            result["time"].append(measure_time(decoder, z, dtype, threads, plan, log))
    for dtype in (torch.float32, torch.bfloat16):
        result["memory"] += measure_memory(plan, dtype)
    with torch_threads(max(plan.threads)):
        result["error"] = measure_error(decoder, z, plan, heatmap, log)
    return result


def judge(vae: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Three targets: banded time, predicted memory, the banded decode's error."""
    from .report import STATUS_FAIL, STATUS_NA, STATUS_PASS

    speed_title = f"VAE decode in exact bands <= {RATIO}x the untiled decode (median of per-round ratios)"
    memory_title = (f"VAE bands: the predicted peak covers the traced one, within {100 * MEMORY_SLACK:.0f} % "
                    "(and the stock up path's)")  # fmt: skip
    error_title = f"VAE bands: the same image as the untiled decode (largest error < {EXACT} of an 8-bit level)"
    if not vae:
        return [{"name": name, "title": title, "status": STATUS_NA, "detail": "not measured", "numbers": {}}
                for name, title in (("vae_speed", speed_title), ("vae_memory", memory_title),
                                    ("vae_error", error_title))]  # fmt: skip
    ratios = {f"{c['side']} px {c['dtype']} {c['threads']}t {name}": row["ratio"]
              for c in vae["time"] for name, row in c["banded"].items()}  # fmt: skip
    worst = max(ratios, key=ratios.__getitem__) if ratios else None
    over = {k: v for k, v in ratios.items() if v > RATIO}
    detail = [f"{len(ratios)} ratios"] + (["over: " + "; ".join(f"{k} {v:.3f}x" for k, v in over.items())]
                                          if over else [])  # fmt: skip
    if worst:
        detail.append(f"closest to failing: {worst} {ratios[worst]:.3f}x ({100 * (RATIO / ratios[worst] - 1):+.1f} % "
                      "headroom)")  # fmt: skip
    targets = [
        {
            "name": "vae_speed",
            "title": speed_title,
            "status": STATUS_NA if not ratios else STATUS_FAIL if over else STATUS_PASS,
            "detail": "; ".join(detail),
            "numbers": {"worst": ratios.get(worst) if worst else None, "threshold": RATIO, "ratios": ratios},
        }
    ]
    rows = [r for r in vae["memory"] if r["ratio"] is not None]
    bad = [r for r in rows if not 1.0 <= r["ratio"] <= 1 + MEMORY_SLACK]
    far = max(rows, key=lambda r: abs(r["ratio"] - 1), default=None)
    targets.append({"name": "vae_memory", "title": memory_title,
                    "status": STATUS_NA if not rows else STATUS_FAIL if bad else STATUS_PASS,
                    "detail": f"{len(rows)} counts traced" + ("; off: " + "; ".join(
                        f"{r['dtype']} {r['bands'] or 'stock'} {r['ratio']:.4f}" for r in bad) if bad else "")
                    + (f"; furthest: {far['dtype']} {far['bands'] or 'stock'} {far['ratio']:.4f}" if far else ""),
                    "numbers": {"worst": far["ratio"] if far else None, "threshold": 1 + MEMORY_SLACK}})  # fmt: skip
    err = vae.get("error") or {}
    ours = next((v for k, v in err.get("methods", {}).items() if k.startswith("memslice")), None)
    tiler = err.get("methods", {}).get("overlap-blend tiler")
    detail = "not measured" if ours is None else (
        f"memslice max {ours['max']:.3g}, mean {ours['mean']:.3g}; the overlap-blend tiler max {tiler['max']:.3g}, "
        f"mean {tiler['mean']:.3g}, {100 * tiler['pixels_off_by_a_level']:.1f} % of pixels off by half a level or "
        f"more, in {err['tiler_s'] / max(err['untiled_s'], 1e-9):.1f}x the untiled decode's time")  # fmt: skip
    targets.append({"name": "vae_error", "title": error_title,
                    "status": STATUS_NA if ours is None else STATUS_PASS if ours["max"] < EXACT else STATUS_FAIL,
                    "detail": detail, "numbers": {"worst": None if ours is None else ours["max"],
                                                  "threshold": EXACT}})  # fmt: skip
    return targets


def markdown_lines(vae: dict[str, Any] | None) -> list[str]:
    """The VAE section of the report: time per case, memory per band count, the error of both methods."""
    if not vae:
        return []
    from lib_memslice.costs import format_bytes

    lines = [f"## The VAE decode in exact bands ({vae['note']})", "",
             "| size | dtype | threads | untiled s | banded | banded s | ratio (median of rounds) |",
             "| --- | --- | --- | ---: | --- | ---: | ---: |"]  # fmt: skip
    for c in vae["time"]:
        for name, row in c["banded"].items():
            lines.append(f"| {c['side']} px | {c['dtype']} | {c['threads']} | {c['untiled_s']:.2f} | {name} | "
                         f"{row['median_s']:.2f} | {row['ratio']:.3f}x |")  # fmt: skip
    lines += [
        "",
        "Memory of the up path (traced on meta; bytes above the mid block's output):",
        "",
        "| dtype | bands | measured | predicted | predicted / measured |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in vae["memory"]:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.4f}"
        lines.append(f"| {r['dtype']} | {r['bands'] or 'stock'} | {format_bytes(r['measured_bytes'])} | "
                     f"{format_bytes(r['predicted_bytes'])} | {ratio} |")  # fmt: skip
    err = vae.get("error")
    if err:
        lines += [
            "",
            f"Error against the untiled decode at {err['side']} px, float32, 8-bit levels (overlap-blend "
            f"tiler: tiles of {err['tile']} latent px overlapping by {err['overlap']}, three layouts averaged; "
            f"{err['tiler_s']:.1f} s against the untiled decode's {err['untiled_s']:.1f} s):",
            "",
            "| method | largest | mean | pixels off by half a level or more |",
            "| --- | ---: | ---: | ---: |",
        ]
        for name, m in err["methods"].items():
            lines.append(f"| {name} | {m['max']:.3g} | {m['mean']:.3g} | {100 * m['pixels_off_by_a_level']:.2f} % |")
        if err.get("heatmap"):
            lines += ["", f"Heat map: `{err['heatmap']}`."]
    return [*lines, ""]
