"""Command line: ``plan`` (what fits, before you generate), ``doctor`` (what this machine offers), ``bench``."""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import sys
import time
from dataclasses import replace
from typing import Any

import torch

from . import __version__, kernels, probe
from .costs import GiB, format_bytes, plural
from .job_plan import DTYPE_BYTES, UPSCALERS, make_job, plan_job
from .models import BUILTIN, MODEL_NAMES
from .settings import KERNELS, SPEC_BY_KEY, VAE_MODES, Settings, coerce
from .strategies import NAMES as STRATEGY_NAMES

#: binary units only: every memory number memslice prints is in GiB/MiB (2^30 / 2^20 bytes)
_UNITS = {"": 1 << 30, "gib": 1 << 30, "g": 1 << 30, "mib": 1 << 20, "m": 1 << 20, "kib": 1 << 10, "tib": 1 << 40}
_DECIMAL = {"gb", "mb", "kb", "tb", "b"}


def parse_size(text: str) -> int:
    """``4GiB``, ``512MiB``, ``1.5G`` or a plain number of GiB. Decimal units are refused: ``4GB`` would be
    3.73 GiB, and every number memslice prints is binary."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if match and unit in _DECIMAL:
        raise argparse.ArgumentTypeError(
            f"{text!r}: memslice counts in binary units; write {match.group(1)}GiB (or {match.group(1)}MiB)"
        )
    if not match or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 4GiB, 512MiB, or 4 for 4 GiB)")
    value = float(match.group(1)) * _UNITS[unit]
    if not 1 <= value < 1 << 60:
        raise argparse.ArgumentTypeError(f"size out of range: {text!r}")
    return int(value)


def _bounded_int(lo: int, hi: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value} is outside {lo}..{hi}")
        return value

    return parse


#: what the CLI and the HTTP routes accept as a hires scale (the webui's slider runs 1 to 4)
HIRES_SCALE = (1.0, 8.0)


def _hires_scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not HIRES_SCALE[0] <= value <= HIRES_SCALE[1]:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"expected a number from {HIRES_SCALE[0]:g} to {HIRES_SCALE[1]:g}")
    return value


def best_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def allocator() -> str:
    """Which C allocator this process runs on: CPU timings depend on it (design.md section 4)."""
    try:
        with open("/proc/self/maps") as maps:
            text = maps.read()
    except OSError:
        return "unknown"
    for name in ("tcmalloc", "jemalloc", "mimalloc"):
        if f"lib{name}" in text:
            return name
    return "glibc" if sys.platform.startswith("linux") else "system"


# --- plan ---------------------------------------------------------------------------------------------------


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]


def cmd_plan(args: argparse.Namespace) -> int:
    settings = _settings(args)
    device_kind = args.device
    io = DTYPE_BYTES[args.dtype]
    compute = {2: torch.bfloat16 if args.dtype == "bf16" else torch.float16, 4: torch.float32}
    if args.budget is not None and args.safety_factor is not None:
        print("warning: --safety-factor has no effect with --budget (the attention budget is not divided)",
              file=sys.stderr)  # fmt: skip
    ceiling = None
    if args.memory is not None:
        memory, source = args.memory, f"--memory {format_bytes(args.memory)}"
    elif device_kind == best_device() or device_kind == "cpu":
        free = probe.free_memory(torch.device(device_kind), precise=True)  # torch's cached blocks count, as in calls
        memory, ceiling, source = (
            free.bytes,
            free.ceiling,
            f"{free.source} on this machine (nothing of the model loaded)",
        )
    else:
        print(f"error: no {device_kind} device here to measure; pass --memory (e.g. --memory 8GiB)", file=sys.stderr)
        return 2

    if args.budget is not None:
        settings = replace(settings, budget_gb=args.budget / GiB)
    job = make_job(BUILTIN[args.model], args.model, args.width, args.height, args.batch, memory, settings,
                   hr_scale=args.hires_scale, hr_width=args.hires_width, hr_height=args.hires_height,
                   hr_upscaler=args.hires_upscaler, img2img=args.img2img, strategy=args.strategy, element_size=io,
                   vae_element_size=4 if args.no_half_vae else io, upcast_attention=args.upcast, medvram=args.medvram,
                   prompt_chunks=args.prompt_chunks, device_kind=device_kind, ceiling_bytes=ceiling,
                   t5=args.t5)  # fmt: skip
    hires = job.hires
    unet_dtype = compute[io]
    kernels_for = kernels.kernels_for_job(device_kind, unet_dtype, torch.float32 if args.no_half_vae else unet_dtype,
                                          settings.kernel, ask_device=True)  # fmt: skip
    result = plan_job(job, kernels_for)
    result.update(memory_source=source, device=device_kind)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0 if result["fits"] else 1
    hr = f", hires {hires[0]}x{hires[1]} ({args.hires_upscaler} upscaler)" if hires else ""
    print(
        f"{BUILTIN[args.model].title}, {'img2img' if args.img2img else 'txt2img'} {args.width}x{args.height}{hr}, "
        f"batch {args.batch}, {args.dtype}{' upcast to fp32' if args.upcast else ''}"
        f"{', VAE fp32' if args.no_half_vae else ''}, strategy {args.strategy}, device {device_kind}"
    )
    room = f"attention budget {format_bytes(args.budget)}" if args.budget else (
        f"attention room: what each call finds free / safety factor {settings.safety_factor:g}")  # fmt: skip
    print(f"memory for the whole job {format_bytes(memory)} ({source}); {room}; slice cap {settings.slice_cap}")
    print("\nattention per site")
    rows = [("pass", "site", "layers", "B*H", "q", "k", "d", "kernel used", "heads/slice", "queries/slice", "slices",
             "peak")]  # fmt: skip
    for row in result["layers"]:
        rows.append((row["pass"], row["site"], str(row["layers"]), str(row["batch_heads"]), str(row["q_tokens"]),
                     str(row["k_tokens"]), str(row["head_dim"]), row["kernel_used"],
                     str(row["heads_per_slice"]) if row["fits"] else "-",
                     str(row["queries_per_slice"]) if row["fits"] else "-",
                     str(row["slices"]) if row["fits"] else "no fit", format_bytes(row["peak_bytes"])))  # fmt: skip
    print("\n".join(_table(rows)))
    print(f"\npasses (allocator: {result['allocator_overhead']['source']})")
    rows = [("pass", "size", "batch", "bands", "attention peak", "other activations", "inputs", "weights",
             "allocator", "total", "verdict")]  # fmt: skip
    for p in result["passes"]:
        rows.append((p["name"], f"{p['width']}x{p['height']}", str(p["batch"]), _bands_cell(p),
                     format_bytes(p["attention_bytes"]), format_bytes(p["activation_bytes"]),
                     format_bytes(p["input_bytes"]), format_bytes(p["weight_bytes"]),
                     format_bytes(p["allocator_bytes"]), format_bytes(p["total_bytes"]), p["verdict"]))  # fmt: skip
    print("\n".join(_table(rows)))
    for p in result["passes"]:
        if p["bands_reason"] and (p["bands"] or p["verdict"] != "fits"):
            print(f"  {p['name']}: {p['bands_reason']}")
    side = result["max_square_resolution"]
    verdict = {"fits": "fits in", "tight": "is TIGHT in", "does not fit": "does NOT fit in"}[result["verdict"]]
    print(f"\nthe whole job {verdict} {format_bytes(memory)}: {result['advice']}")
    scaled = " (hires scaled alike)" if hires else ""
    print(f"largest square first-pass size at which the whole job fits{scaled}: {side}x{side}" if side
          else "no square size fits")  # fmt: skip
    return 0 if result["fits"] else 1


def _bands_cell(p: dict[str, Any]) -> str:
    """The passes table's bands column: ``-`` for a pass run whole (the UNet, an untiled VAE pass), else the count
    (``streamed``: through host memory)."""
    if not p["bands"]:
        return "-"
    if p["streamed"]:
        return f"{p['bands']} streamed" if p["bands"] > 1 else "streamed"
    return str(p["bands"])


def _settings(args: argparse.Namespace) -> Settings:
    values = {}
    given = (("safety_factor", args.safety_factor), ("slice_cap", args.slice_cap), ("kernel", args.kernel),
             ("vae", args.vae))  # fmt: skip
    for field, raw in given:
        if raw is not None:
            spec = SPEC_BY_KEY[f"memslice_{field}"]
            value, problem = coerce(spec, raw)
            if problem:
                allowed = f"a number in {spec.lo:g}..{spec.hi:g}" if spec.lo is not None else ", ".join(spec.choices)
                raise SystemExit(f"error: --{field.replace('_', '-')} {raw!r} is not usable: expected {allowed}")
            values[field] = value
    return Settings(**values)


# --- doctor -------------------------------------------------------------------------------------------------


def _probe_cost(device: torch.device, n: int = 2000) -> float:
    probe.free_memory(device)
    start = time.perf_counter()
    for _ in range(n):
        probe.free_memory(device)
    return (time.perf_counter() - start) / n * 1e6


def sdpa_backends() -> dict[str, Any]:
    """Which SDPA backends torch has enabled (CUDA flags) and whether the CPU's fused kernel runs."""
    info: dict[str, Any] = {
        "scaled_dot_product_attention": hasattr(torch.nn.functional, "scaled_dot_product_attention")
    }
    cuda = torch.backends.cuda
    for name in ("flash_sdp_enabled", "mem_efficient_sdp_enabled", "math_sdp_enabled", "cudnn_sdp_enabled"):
        fn = getattr(cuda, name, None)
        if fn is not None:
            info[name.replace("_enabled", "")] = bool(fn())
    return info


def doctor(device_name: str | None = None) -> dict[str, Any]:
    device = torch.device(device_name or best_device())
    kind = probe.device_kind(device)
    settings = Settings()
    free = probe.free_memory(device)
    fused = {}
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for head_dim in (40, 64, 80, 160, 512):
            kernel = kernels.expected_kernel(kind, dtype, head_dim, "auto", ask_device=True)
            fused[f"{str(dtype).removeprefix('torch.')} d{head_dim}"] = kernel.kind
    picks = {}
    dtype = torch.float16 if kind == "cuda" else torch.float32
    kernels_for = kernels.kernels_for_job(kind, dtype, dtype, "auto", ask_device=True)
    for model, side in (("sd15", 512), ("sd15", 1024), ("sdxl", 1024)):
        job = make_job(BUILTIN[model], model, side, side, 1, free.bytes, settings,
                       element_size=torch.finfo(dtype).bits // 8, device_kind=kind)  # fmt: skip
        result = plan_job(job, kernels_for)
        picks[f"{model} {side}px"] = {
            "verdict": result["verdict"],
            "limit": result["limit"],
            "max_slices": result["max_slices"],
            "max_square_resolution": result["max_square_resolution"],
        }
    automatic = {
        "cuda": "memslice-auto",
        "xpu": "memslice-auto",
        "cpu": "memslice-auto",
        "mps": "sub-quadratic (memslice-auto only with --opt-memslice)",
    }.get(kind, "a built-in (select memslice by hand)")
    return {
        "memslice": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "device_kind": kind,
        "cpu_threads": torch.get_num_threads(),
        "allocator": allocator(),
        "sdpa": sdpa_backends(),
        "kernel_per_dtype_and_head_dim": fused,
        "free_bytes": free.bytes,
        "free_source": free.source,
        "free_trusted": free.trusted,
        "probe_cost_us": round(_probe_cost(device), 2),
        "default_room_bytes": int(free.bytes / settings.safety_factor),
        "safety_factor": settings.safety_factor,
        "automatic_picks": automatic,
        "plans": picks,
    }


def cmd_doctor(args: argparse.Namespace) -> int:
    info = doctor(args.device)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"memslice {info['memslice']}  python {info['python']}  torch {info['torch']}")
    print(
        f"device: {info['device']} ({info['device_kind']}), CPU threads {info['cpu_threads']}, "
        f"allocator {info['allocator']}"
    )
    print("SDPA: " + ", ".join(f"{k}={v}" for k, v in info["sdpa"].items()))
    fused = sorted({k for k, v in info["kernel_per_dtype_and_head_dim"].items() if v == "fused"})
    print(f"fused SDPA kernel runs for: {', '.join(fused) if fused else 'nothing (memslice slices einsum)'}")
    print(
        f"free memory: {format_bytes(info['free_bytes'])} ({info['free_source']}"
        f"{'' if info['free_trusted'] else ', NOT measured'}); probe costs {info['probe_cost_us']} us"
    )
    print(f"memslice-auto's room at the default safety factor: {format_bytes(info['default_room_bytes'])} "
          f"(free memory / {info['safety_factor']:g})")  # fmt: skip
    print(f"'Automatic' in Cross attention optimization picks: {info['automatic_picks']}")
    for name, plan in info["plans"].items():
        print(
            f"  {name}: {plan['verdict']}, at most {plural(plan['max_slices'], 'slice')}; "
            f"largest square: {plan['max_square_resolution']} px"
        )
    return 0


# --- main ---------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lib_memslice", description="memslice: memory-aware attention")
    parser.add_argument("--version", action="version", version=f"memslice {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    plan = sub.add_parser("plan", help="plan every attention site of a model at a size: what fits, how sliced")
    plan.add_argument("--model", choices=MODEL_NAMES, default="sd15",
                      help="which published config (default sd15)")  # fmt: skip
    plan.add_argument("--width", type=_bounded_int(8, 65536), default=512, help="image width in pixels (default 512)")
    plan.add_argument("--height", type=_bounded_int(8, 65536), default=512, help="image height in pixels (default 512)")
    plan.add_argument("--batch", type=_bounded_int(1, 1024), default=1, help="images per batch (default 1)")
    plan.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="fp16", help="model precision (default fp16)")
    plan.add_argument("--upcast", action="store_true", help="plan for 'Upcast cross attention layer to float32'")
    plan.add_argument("--no-half-vae", dest="no_half_vae", action="store_true", help="the VAE runs in fp32")
    plan.add_argument("--t5", action="store_true", help="SD3: the webui's 'Enable T5' is on (its T5-XXL is loaded)")
    plan.add_argument(
        "--budget",
        type=parse_size,
        help="the attention budget (a fixed room per call) in GiB or with a unit: 4, 4GiB, 512MiB (default: probe)",
    )
    plan.add_argument("--strategy", choices=STRATEGY_NAMES, default="auto", help="which memslice entry (default auto)")
    plan.add_argument(
        "--safety-factor",
        dest="safety_factor",
        help="each call plans in the memory it finds free / this (default 3.3; not with --budget)",
    )
    plan.add_argument("--slice-cap", dest="slice_cap", help="most slices per attention call (default 4096)")
    plan.add_argument("--kernel", choices=KERNELS, default=None, help="the 'Kernel per slice' setting (default auto)")
    plan.add_argument("--vae", choices=VAE_MODES, default=None,
                      help="the 'VAE' setting (default auto: sliced attention, decode and encode in exact bands "
                           "when a pass would not fit; attention: sliced attention only; off: the webui's own "
                           "VAE)")  # fmt: skip
    plan.add_argument(
        "--device",
        choices=("cuda", "mps", "xpu", "cpu", "unknown"),
        default=best_device(),
        help="the device to plan for (default: the best one here); others need --memory",
    )
    plan.add_argument(
        "--prompt-chunks",
        dest="prompt_chunks",
        type=_bounded_int(1, 64),
        default=1,
        help="75-token prompt chunks (77 keys each; SD3: 154 text tokens each)",
    )
    plan.add_argument(
        "--memory", type=parse_size, help="memory the whole job may use, weights included (default: free here)"
    )
    plan.add_argument("--hires-scale", dest="hires_scale", type=_hires_scale, default=None,
                      help=f"hires fix: upscale by ({HIRES_SCALE[0]:g} to {HIRES_SCALE[1]:g})")  # fmt: skip
    plan.add_argument("--hires-width", dest="hires_width", type=_bounded_int(8, 65536), help="hires fix: width")
    plan.add_argument("--hires-height", dest="hires_height", type=_bounded_int(8, 65536), help="hires fix: height")
    plan.add_argument(
        "--hires-upscaler",
        dest="hires_upscaler",
        choices=UPSCALERS,
        default="latent",
        help="latent (default) or image (decode, upscale the picture, encode again)",
    )
    plan.add_argument("--img2img", action="store_true", help="img2img: the job starts with a VAE encode")
    plan.add_argument("--medvram", action="store_true", help="only the running module's weights are on the device")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON (exit code 1 when it does not fit)")
    plan.set_defaults(func=cmd_plan)

    doc = sub.add_parser("doctor", help="device, torch, SDPA backends, memory, and what memslice would pick")
    doc.add_argument("--device", default=None, help="a torch device name (default: the best one here)")
    doc.add_argument("--json", action="store_true", help="print the report as JSON")
    doc.set_defaults(func=cmd_doctor)

    bench = sub.add_parser("bench", help="side-by-side benchmark (see --help of the bench itself)", add_help=False)
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=lambda args: _bench(args.rest))
    return parser


def _bench(rest: list[str]) -> int:
    try:
        from memslice_tools.run import main as bench_main  # the tools live apart: imported only for this command
    except ModuleNotFoundError as exc:
        missing = exc.name or str(exc)
        tools = missing.split(".")[0] == "memslice_tools"
        where = ("memslice_tools (this repository's folder beside lib_memslice: run from a clone's root)" if tools
                 else f"the benchmark's dependency {missing!r}")  # fmt: skip
        print(f"error: the benchmark needs {where}. In a clone of this repository `make bench` builds .venv "
              "with everything it needs (torch, the real ldm package, matplotlib) and runs it.",
              file=sys.stderr)  # fmt: skip
        return 2
    return bench_main(rest)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # everything after 'bench' belongs to the bench's own parser
        return _bench(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
