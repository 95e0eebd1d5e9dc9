"""Command line: ``plan`` (what fits, before you generate), ``doctor`` (what this machine offers), ``bench``."""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from typing import Any

import torch

from . import __version__, kernels, probe
from .models import BUILTIN, MODEL_NAMES
from .plan import STRATEGY_NAMES, format_bytes
from .planner import DTYPE_BYTES, Request, plan_model
from .settings import KERNELS, SPEC_BY_KEY, Settings, coerce

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6, "mib": 1 << 20}
_UNITS |= {"g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tb": 10**12, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """``4GiB``, ``512MiB``, ``1.5G`` (binary), ``4GB`` (decimal) or plain bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 4GiB, 512MiB or a byte count)")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if not 0 < value < 1 << 60:
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


def cmd_plan(args: argparse.Namespace) -> int:
    settings = _settings(args)
    device_kind = args.device
    io = DTYPE_BYTES[args.dtype]
    element = 4 if args.upcast else io
    compute_dtype = {2: torch.float16, 4: torch.float32}[element]
    if args.dtype == "bf16" and not args.upcast:
        compute_dtype = torch.bfloat16
    if args.budget is not None:
        budget = probe.Budget(args.budget, None, f"--budget {format_bytes(args.budget)}")
    elif device_kind == best_device() or device_kind == "cpu":
        budget = probe.device_budget(torch.device(device_kind), settings)
    else:
        print(f"error: no {device_kind} device here to measure; pass --budget (e.g. --budget 4GiB)", file=sys.stderr)
        return 2

    def kernel_for(site: Any, element_size: int) -> tuple[str, int]:
        return kernels.expected_kernel(device_kind, compute_dtype, site.head_dim, settings.kernel, ask_device=True)

    request = Request(
        BUILTIN[args.model],
        args.width,
        args.height,
        args.batch,
        budget.bytes,
        strategy=args.strategy,
        slice_cap=settings.slice_cap,
        element_size=element,
        io_element_size=io,
        device_kind=device_kind,
        prompt_chunks=args.prompt_chunks,
        include_vae=not args.no_vae,
    )
    result = plan_model(request, kernel_for)
    result["budget_source"] = budget.explanation
    result["device"] = device_kind
    if args.json:
        print(json.dumps(result, indent=2))
        return 0 if result["fits"] else 1
    print(
        f"{BUILTIN[args.model].title}, {args.width}x{args.height}, batch {args.batch} (x2 cond/uncond in the UNet), "
        f"{args.dtype}{' upcast to fp32' if args.upcast else ''}, strategy {args.strategy}, device {device_kind}"
    )
    print(f"attention budget {format_bytes(budget.bytes)} ({budget.explanation}), slice cap {settings.slice_cap}")
    header = ("site", "layers", "B*H", "q", "k", "d", "kernel", "heads/slice", "queries/slice", "slices", "peak")
    rows = [header]
    for row in result["layers"]:
        rows.append(
            (
                row["site"],
                str(row["layers"]),
                str(row["batch_heads"]),
                str(row["q_tokens"]),
                str(row["k_tokens"]),
                str(row["head_dim"]),
                row["kernel"],
                str(row["head_chunk"]) if row["fits"] else "-",
                str(row["query_chunk"]) if row["fits"] else "-",
                str(row["steps"]) if row["fits"] else "no fit",
                format_bytes(row["peak_bytes"]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        print(
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    verdict = "fits" if result["fits"] else "does NOT fit"
    print(
        f"\nthe whole generation {verdict}; largest square size that fits: "
        f"{result['max_square_resolution']}x{result['max_square_resolution']}"
    )
    for row in result["layers"]:
        if not row["fits"]:
            print(f"  {row['site']}: {row['reason']}")
    return 0 if result["fits"] else 1


def _settings(args: argparse.Namespace) -> Settings:
    values = {}
    for field, raw in (("safety_factor", args.safety_factor), ("slice_cap", args.slice_cap), ("kernel", args.kernel)):
        if raw is not None:
            value, problem = coerce(SPEC_BY_KEY[f"memslice_{field}"], raw)
            if problem:
                raise SystemExit(f"error: --{field.replace('_', '-')} {raw!r} is {problem}")
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
    budget = probe.budget_for(free, settings)
    fused = {}
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for head_dim in (40, 64, 80, 160, 512):
            kernel, _ = kernels.expected_kernel(kind, dtype, head_dim, "auto", ask_device=True)
            fused[f"{str(dtype).removeprefix('torch.')} d{head_dim}"] = kernel
    picks = {}
    for model, side in (("sd15", 512), ("sd15", 1024), ("sdxl", 1024)):
        request = Request(
            BUILTIN[model], side, side, 1, budget.bytes, element_size=2 if kind == "cuda" else 4, device_kind=kind
        )
        dtype = torch.float16 if kind == "cuda" else torch.float32
        result = plan_model(
            request, lambda s, e, dtype=dtype: kernels.expected_kernel(kind, dtype, s.head_dim, "auto", ask_device=True)
        )
        picks[f"{model} {side}px"] = {
            "fits": result["fits"],
            "max_steps": result["max_steps"],
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
        "default_budget_bytes": budget.bytes,
        "default_budget": budget.explanation,
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
    print(f"default attention budget: {format_bytes(info['default_budget_bytes'])} ({info['default_budget']})")
    print(f"'Automatic' in Cross attention optimization picks: {info['automatic_picks']}")
    for name, plan in info["plans"].items():
        fit = "fits" if plan["fits"] else "does not fit"
        print(
            f"  {name}: {fit}, at most {plan['max_steps']} slices; largest square: {plan['max_square_resolution']} px"
        )
    return 0


# --- main ---------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lib_memslice", description="memslice: memory-aware attention")
    parser.add_argument("--version", action="version", version=f"memslice {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    plan = sub.add_parser("plan", help="plan every attention site of a model at a size: what fits, how sliced")
    plan.add_argument("--model", choices=MODEL_NAMES, default="sd15")
    plan.add_argument("--width", type=_bounded_int(8, 65536), default=512)
    plan.add_argument("--height", type=_bounded_int(8, 65536), default=512)
    plan.add_argument("--batch", type=_bounded_int(1, 1024), default=1)
    plan.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="fp16")
    plan.add_argument("--upcast", action="store_true", help="plan for 'Upcast cross attention layer to float32'")
    plan.add_argument("--budget", type=parse_size, help="fixed attention budget, e.g. 4GiB (default: probe)")
    plan.add_argument("--strategy", choices=STRATEGY_NAMES, default="auto")
    plan.add_argument("--safety-factor", dest="safety_factor", help="free memory / this = budget (default 3.3)")
    plan.add_argument("--slice-cap", dest="slice_cap", help="most slices per attention call (default 64)")
    plan.add_argument("--kernel", choices=KERNELS, default=None)
    plan.add_argument("--device", choices=("cuda", "mps", "xpu", "cpu", "unknown"), default=best_device())
    plan.add_argument(
        "--prompt-chunks",
        dest="prompt_chunks",
        type=_bounded_int(1, 64),
        default=1,
        help="75-token prompt chunks (77 keys each)",
    )
    plan.add_argument("--no-vae", dest="no_vae", action="store_true", help="leave out the VAE's attention")
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(func=cmd_plan)

    doc = sub.add_parser("doctor", help="device, torch, SDPA backends, memory, and what memslice would pick")
    doc.add_argument("--device", default=None)
    doc.add_argument("--json", action="store_true")
    doc.set_defaults(func=cmd_doctor)

    bench = sub.add_parser("bench", help="side-by-side benchmark (see --help of the bench itself)", add_help=False)
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=lambda args: _bench(args.rest))
    return parser


def _bench(rest: list[str]) -> int:
    from .bench.run import main as bench_main

    return bench_main(rest)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # everything after 'bench' belongs to the bench's own parser
        return _bench(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
