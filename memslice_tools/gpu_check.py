"""``make gpu-check`` / ``python -m lib_memslice bench --gpu-check``: the claims only a CUDA device can check.

1. kernel memory: ``torch.cuda.max_memory_allocated`` against memslice's predicted peak for every kernel torch
   offers (flash, memory-efficient, cuDNN, math, and memslice's einsum) x fp16/bf16/fp32 x head dims 40, 64, 80,
   160, 512, in one piece and sliced (budgets that force slicing), each output checked against a float32 reference;
2. a real out-of-memory error under ``torch.cuda.set_per_process_memory_fraction``: the einsum retry doubles its
   slices until it fits; a fused call whose output cannot fit ends in a clear ``NotEnoughMemory``;
3. an SD1.5-config fp16 UNet forward (cond + uncond) and a VAE decode at 512 px per contender (memslice-auto and
   the webui 1.10.1 optimizations re-implemented in :mod:`.webui_attention`): peak and time;
4. the largest square size each contender's SD1.5 level-0 self-attention and VAE attention reach within 4 GiB
   (the whole call: q, k, v, output and working memory, under a 4 GiB cap above what is already allocated);
5. the job planner against whole jobs run the way the webui runs them (:func:`whole_job`): real-size random-weight
   SD1.5 and SDXL UNets (fp16 under autocast, cond + uncond) and VAE decoders (without autocast, fp16 and fp32, one
   image), on emulated 4, 6 and 8 GiB cards (``set_per_process_memory_fraction``, memslice's probe reading the
   card's room): the planner's largest square size must run without an out-of-memory error; the next size, which it
   calls tight or too large, is run and its outcome recorded; each pass's predicted total against the measured
   ``max_memory_allocated`` (weights included), and the allocator's share over the live-tensor prediction.

Writes ``gpu-report.md`` and ``gpu-report.json`` under ``--out`` after every section, so a run cut short still
leaves what it measured. Without a CUDA device it says so in one line and exits 0. ``--device cpu`` is a dry run
of the same code on tiny shapes (the tests use it; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from lib_memslice import kernels
from lib_memslice.costs import AttentionShape, GiB, MiB, format_bytes
from lib_memslice.forwards import BasicHost, attend
from lib_memslice.limits import NotEnoughMemory
from lib_memslice.settings import Settings
from lib_memslice.slicing import plan_attention

from . import webui_attention
from .largest import probe_reads, sdpa_math_only
from .memtrack import PeakTracker

Tensor = torch.Tensor
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
HEAD_DIMS = (40, 64, 80, 160, 512)
CAP_BYTES = 4 * GiB
#: CUDA's caching allocator rounds every block up to a multiple of 512 bytes: a few blocks per call
ALLOCATOR_SLACK = 8 * 512


class Ctx:
    """The device, the sizes for this run (full on CUDA, tiny for the CPU dry run) and the report so far."""

    def __init__(self, device: torch.device, out: str) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.out = out
        self.tokens = 4096 if self.cuda else 64
        self.vae_tokens = 4096 if self.cuda else 64
        self.pixels = 512 if self.cuda else 64
        self.sides = (512, 768, 1024, 1536, 2048, 2560, 3072, 3584, 4096, 5120, 6144) if self.cuda else (64, 96)
        self.cap = CAP_BYTES if self.cuda else 64 * MiB
        self.limit: int | None = None  # bytes this process may hold under memory_cap
        self.per_search_s = 12.0 if self.cuda else 5.0
        self.half = torch.float16 if self.cuda else torch.float32  # the CPU dry run: torch 2.1 has no fp16 matmul

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def peak(self) -> Iterator[dict[str, int]]:
        """Bytes allocated above the level at entry, at the peak (CUDA allocator counters; the tracker on CPU)."""
        result = {"peak": 0}
        if self.cuda:
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            yield result
            self.sync()
            result["peak"] = torch.cuda.max_memory_allocated(self.device) - base
        else:
            with PeakTracker() as tracker:
                yield result
            result["peak"] = tracker.peak

    def release(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()


def _backends() -> list[tuple[str, Any]]:
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:  # torch < 2.3: the older switches
        return [("math", "math")]
    found = [("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)]
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        found.append(("cudnn", SDPBackend.CUDNN_ATTENTION))
    return [*found, ("math", SDPBackend.MATH)]


@contextlib.contextmanager
def only_backend(backend: Any) -> Iterator[None]:
    if backend is None:
        yield
        return
    try:
        from torch.nn.attention import sdpa_kernel
    except ImportError:
        yield
        return
    with sdpa_kernel([backend]):
        yield


def _qkv(ctx: Ctx, batch: int, heads: int, tokens: int, d: int, dtype: torch.dtype, seed: int = 0) -> list[Tensor]:
    g = torch.Generator(device=ctx.device).manual_seed(seed)
    return [
        torch.randn(batch, tokens, heads * d, generator=g, device=ctx.device, dtype=dtype)
        .view(batch, tokens, heads, d)
        .transpose(1, 2)
        for _ in range(3)
    ]


def _shape(q: Tensor, k: Tensor, v: Tensor) -> AttentionShape:
    b, h, n, d = q.shape
    e = q.element_size()
    return AttentionShape(b * h, n, k.shape[2], d, v.shape[-1], element_size=e, io_element_size=e, heads=h)


def kernel_memory(ctx: Ctx) -> dict[str, Any]:
    rows = []
    for name, backend in [*_backends(), ("einsum", None)]:
        for dname, dtype in DTYPES.items():
            for d in HEAD_DIMS:
                batch, heads = (1, 1) if d == 512 else (2, 8)
                tokens = ctx.vae_tokens if d == 512 else ctx.tokens
                row: dict[str, Any] = {"kernel": name, "dtype": dname, "head_dim": d, "shape": [batch * heads, tokens]}
                try:
                    q, k, v = _qkv(ctx, batch, heads, tokens, d, dtype)
                    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
                    with only_backend(backend):
                        if name == "einsum":
                            choice = kernels.einsum_kernel(ctx.device.type, dtype)
                        else:
                            choice = kernels.choose_kernel("sdpa", q, k, v, dtype)
                            offered = choice.backend == name or (name == "math" and choice.kind == "sdpa-math")
                            if not offered:
                                row.update(status="not offered", note=f"torch picks {choice.backend or choice.kind}")
                                rows.append(row)
                                continue
                        row["backend"] = choice.backend
                        shape = _shape(q, k, v)
                        whole = plan_attention(shape, 1 << 50, kernel=choice, slice_cap=65536, device_kind="cuda")
                        forced = max(1, int(whole.peak_bytes * 0.3))
                        sliced = plan_attention(shape, forced, kernel=choice, slice_cap=65536, device_kind="cuda")
                        if sliced is None or not sliced.sliced:
                            sliced = plan_attention(shape, 1 << 50, kernel=choice, slice_cap=65536,
                                                    device_kind="cuda", min_slices=4)  # fmt: skip
                        for label, plan in (("one piece", whole), ("sliced", sliced)):
                            kernels.run_plan(q, k, v, plan, d**-0.5)  # warm-up: library workspaces, autotuning
                            with ctx.peak() as measured:
                                out = kernels.run_plan(q, k, v, plan, d**-0.5)
                            err = float((out.float() - ref).abs().max())
                            row[label] = {
                                "slices": plan.slices,
                                "predicted": plan.peak_bytes,
                                "measured": measured["peak"],
                                "ratio": measured["peak"] / plan.peak_bytes,
                                "max_abs_error": err,
                            }
                            del out
                        row["status"] = "ok"
                except Exception as exc:  # one case must not end the check
                    row.update(status="error", note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                rows.append(row)
                ctx.release()
    rows += _upcast_rows(ctx)
    checked = [r[p] for r in rows if r.get("status") == "ok" for p in ("one piece", "sliced")]
    over = [
        f"{r['kernel']} {r['dtype']} d{r['head_dim']} {p}: {r[p]['ratio']:.3f}"
        for r in rows
        if r.get("status") == "ok"
        for p in ("one piece", "sliced")
        if r[p]["measured"] > r[p]["predicted"] + ALLOCATOR_SLACK
    ]
    tol = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 1e-1}
    wrong = [
        f"{r['kernel']} {r['dtype']} d{r['head_dim']} {p}: {r[p]['max_abs_error']:.2e}"
        for r in rows
        if r.get("status") == "ok"
        for p in ("one piece", "sliced")
        if not r[p]["max_abs_error"] <= tol[r["dtype"]]
    ]
    return {
        "rows": rows,
        "checked": len(checked),
        "max_ratio": max((c["ratio"] for c in checked), default=None),
        "over_prediction": over,
        "wrong_output": wrong,
        "pass": bool(checked) and not over and not wrong,
    }


def _upcast_rows(ctx: Ctx) -> list[dict[str, Any]]:
    """'Upcast cross attention layer to float32': half-precision q, k, v computed in float32 by SDPA in one piece.
    With a value dim well over the head dim and few keys the cast back to half precision, after the kernel's inputs
    are gone, is the call's peak (costs.peak_bytes' cast-back term): a case where only that term keeps the
    prediction over the measurement."""
    rows = []
    for d, dv, keys in ((40, 40, ctx.tokens), (16, 128, 77)):
        row: dict[str, Any] = {"kernel": "upcast sdpa", "dtype": "fp16->fp32", "head_dim": f"{d}/{dv}"}
        try:
            g = torch.Generator(device=ctx.device).manual_seed(1)
            q = torch.randn(2, 8, ctx.tokens, d, generator=g, device=ctx.device, dtype=torch.float16)
            k = torch.randn(2, 8, keys, d, generator=g, device=ctx.device, dtype=torch.float16)
            v = torch.randn(2, 8, keys, dv, generator=g, device=ctx.device, dtype=torch.float16)
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
            choice = kernels.choose_kernel("sdpa", q, k, v, torch.float32)
            shape = AttentionShape(16, ctx.tokens, keys, d, dv, element_size=4, io_element_size=2, heads=8)
            row["backend"] = choice.backend or choice.kind
            for label, cap in (("one piece", 1), ("sliced", 4)):
                plan = plan_attention(shape, 1 << 50, kernel=choice, slice_cap=65536, device_kind="cuda",
                                      min_slices=cap)  # fmt: skip
                kernels.run_plan(q, k, v, plan, d**-0.5, None, torch.float32)
                with ctx.peak() as measured:
                    out = kernels.run_plan(q, k, v, plan, d**-0.5, None, torch.float32)
                row[label] = {"slices": plan.slices, "predicted": plan.peak_bytes, "measured": measured["peak"],
                              "ratio": measured["peak"] / plan.peak_bytes,
                              "max_abs_error": float((out.float() - ref).abs().max())}  # fmt: skip
                del out
            row["status"] = "ok"
            row["dtype"] = "fp16"  # the tolerance of its inputs
        except Exception as exc:
            row.update(status="error", note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        rows.append(row)
        ctx.release()
    return rows


@contextlib.contextmanager
def memory_cap(ctx: Ctx, extra: int) -> Iterator[int]:
    """Cap this process at what it holds now plus ``extra`` bytes (CUDA; on the CPU dry run only ``ctx.limit``, what
    :func:`card_probe` reads); yields the cap's headroom."""
    if not ctx.cuda:
        ctx.limit = extra
        try:
            yield extra
        finally:
            ctx.limit = None
        return
    ctx.release()
    total = torch.cuda.get_device_properties(ctx.device).total_memory
    held = torch.cuda.memory_reserved(ctx.device)
    ctx.limit = held + extra
    torch.cuda.set_per_process_memory_fraction(min(1.0, ctx.limit / total), ctx.device)
    try:
        yield extra
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, ctx.device)
        ctx.limit = None
        ctx.release()


@contextlib.contextmanager
def card_probe(ctx: Ctx) -> Iterator[None]:
    """memslice's probe reads the emulated card's room for the block: ``ctx.limit`` less what is allocated (the
    driver's free memory knows nothing of a per-process cap)."""
    from lib_memslice import probe

    real = probe.free_memory

    def card_room(device: Any, precise: bool = False) -> probe.FreeMemory:
        held = torch.cuda.memory_allocated(ctx.device) if ctx.cuda else 0
        return probe.FreeMemory(max(0, (ctx.limit or 0) - held), "the emulated card")

    probe.free_memory = card_room
    try:
        yield
    finally:
        probe.free_memory = real


def oom_retry(ctx: Ctx) -> dict[str, Any]:
    result: dict[str, Any] = {}
    heads, tokens, d = 8, (16384 if ctx.cuda else 256), 40
    dtype = torch.float16 if ctx.cuda else torch.float32
    q, k, v = _qkv(ctx, 2, heads, tokens, d, dtype)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    # the budget says plenty (64 GiB), the cap says 1 GiB: one einsum piece (4 GiB of scores) runs out of memory
    host = BasicHost(Settings(budget_gb=64, kernel="einsum"))
    with memory_cap(ctx, GiB if ctx.cuda else 0):
        try:
            out = attend(q, k, v, scale=d**-0.5, strategy="auto", host=host)
            record = host.stats.recent()[-1]
            result["einsum"] = {
                "retries": record.retries,
                "slices": record.slices,
                "max_abs_error": float((out.float() - ref).abs().max()),
                "pass": (record.retries >= 1 or not ctx.cuda) and float((out.float() - ref).abs().max()) < 2e-2,
            }
            del out
        except Exception as exc:
            result["einsum"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}", "pass": False}
    # a fused call whose output (20 MiB) cannot fit a 4 MiB cap: a clear error, not a retry loop to the cap
    host = BasicHost(Settings(budget_gb=64))
    with memory_cap(ctx, 4 * MiB if ctx.cuda else 0):
        start = time.perf_counter()
        try:
            attend(q, k, v, scale=d**-0.5, strategy="auto", host=host)
            result["fused"] = {"error": "no out-of-memory error under the cap", "pass": not ctx.cuda}
        except NotEnoughMemory as exc:
            result["fused"] = {"message": str(exc)[:400], "pass": "cannot shrink a fused call's output" in str(exc)}
        except Exception as exc:
            result["fused"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}", "pass": False}
        result["fused"]["seconds"] = time.perf_counter() - start
    result["pass"] = all(part.get("pass") for part in result.values() if isinstance(part, dict))
    return result


# --- whole models ------------------------------------------------------------------------------------------


def _free_for_contenders(ctx: Ctx) -> int:
    """What the webui's get_available_vram would answer: driver free + torch's reserved-but-inactive; under a cap,
    the cap's remaining room (the driver knows nothing of it)."""
    if not ctx.cuda:
        return ctx.cap
    if ctx.limit is not None:
        return max(0, ctx.limit - torch.cuda.memory_allocated(ctx.device))
    stats = torch.cuda.memory_stats(ctx.device)
    free, _ = torch.cuda.mem_get_info(ctx.device)
    return int(free + stats["reserved_bytes.all.current"] - stats["active_bytes.all.current"])


def _patch(contender: str, ctx: Ctx, free: Callable[[], int]) -> tuple[Callable[..., Tensor], Callable[..., Tensor]]:
    """(CrossAttention.forward, AttnBlock.forward) for a contender."""
    from lib_memslice.forwards import make_attnblock_forward, make_cross_attention_forward

    if contender == "memslice-auto":
        host = BasicHost(Settings())
        return make_cross_attention_forward("auto", host), make_attnblock_forward("auto", host)
    webui = {c.name: c for c in webui_attention.reimplemented()}[contender]
    _, model, _ = _import_ldm()
    stock_block = model.AttnBlock.forward  # entries that leave the VAE alone (InvokeAI, V1) run ldm's own

    def cross(self: Any, x: Tensor, context: Tensor | None = None, mask: Any = None, **kwargs: Any) -> Tensor:
        context = x if context is None else context
        out = webui.cross_attention(
            self.to_q(x), self.to_k(context), self.to_v(context), self.heads, self.scale, free()
        )
        return self.to_out(out)

    def block(self: Any, x: Tensor, **kwargs: Any) -> Tensor:
        h = self.norm(x)
        out = webui.attn_block(self.q(h), self.k(h), self.v(h), free())
        return x + self.proj_out(out)

    return cross, (block if webui.attn_block is not None else stock_block)


CONTENDERS = ("memslice-auto", "sdp", "Doggettx", "InvokeAI-cuda", "sub-quadratic")


def _import_ldm() -> tuple[Any, Any, Any]:
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        import ldm.modules.attention as attention
        import ldm.modules.diffusionmodules.model as model
        import ldm.modules.diffusionmodules.openaimodel as openaimodel
    return attention, model, openaimodel


@contextlib.contextmanager
def patched(
    attention: Any,
    model: Any,
    forwards: tuple[Callable[..., Tensor], Callable[..., Tensor]],
    decoder_forward: Callable[..., Tensor] | None = None,
) -> Iterator[None]:
    """ldm's attention forwards replaced by ``forwards`` (and the ``Decoder``'s by ``decoder_forward``, memslice's
    banded one, where given) for the block."""
    saved = attention.CrossAttention.forward, model.AttnBlock.forward, model.Decoder.forward
    attention.CrossAttention.forward, model.AttnBlock.forward = forwards
    if decoder_forward is not None:
        model.Decoder.forward = decoder_forward
    try:
        yield
    finally:
        attention.CrossAttention.forward, model.AttnBlock.forward, model.Decoder.forward = saved


def _timed(ctx: Ctx, fn: Callable[[], Any], reps: int = 3) -> float:
    """The median seconds of ``reps`` calls of ``fn`` (after the caller's warm-up), synchronised."""
    times = []
    for _ in range(reps):
        ctx.sync()
        start = time.perf_counter()
        fn()
        ctx.sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def pipeline(ctx: Ctx) -> dict[str, Any]:
    from .configs import SD15_DECODER, SD15_UNET

    attention, model, openaimodel = _import_ldm()
    dtype = torch.float16 if ctx.cuda else torch.float32
    unet_config = {**SD15_UNET} if ctx.cuda else {**SD15_UNET, "model_channels": 32}
    decoder_config = {**SD15_DECODER} if ctx.cuda else {**SD15_DECODER, "ch": 32}
    with torch.device(ctx.device):
        unet = openaimodel.UNetModel(**unet_config).to(dtype).eval()
        decoder = model.Decoder(**decoder_config).to(dtype).eval()
    weights = sum(p.numel() * p.element_size() for m in (unet, decoder) for p in m.parameters())
    latent = ctx.pixels // 8
    g = torch.Generator(device=ctx.device).manual_seed(0)
    x = torch.randn(2, 4, latent, latent, generator=g, device=ctx.device, dtype=dtype)
    t = torch.tensor([500, 500], device=ctx.device)
    context = torch.randn(2, 77, 768, generator=g, device=ctx.device, dtype=dtype)
    z = torch.randn(1, 4, latent, latent, generator=g, device=ctx.device, dtype=dtype)

    def autocast() -> Any:  # as the webui runs a half-precision model
        return torch.autocast("cuda", dtype=dtype) if ctx.cuda else contextlib.nullcontext()

    def unet_run() -> Tensor:
        with autocast():
            return unet(x, t, context=context)

    def decode_run() -> Tensor:
        with autocast():
            return decoder(z)

    runs = (("unet", unet_run), ("vae_decode", decode_run))
    rows = {}
    for contender in CONTENDERS:
        row: dict[str, Any] = {}
        try:
            with patched(attention, model, _patch(contender, ctx, lambda: _free_for_contenders(ctx))), torch.no_grad():
                for part, run in runs:
                    run()  # warm-up
                    with ctx.peak() as measured:
                        run()
                    row[part] = {"peak_bytes": measured["peak"], "ms": _timed(ctx, run) * 1e3}
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        rows[contender] = row
        ctx.release()
    return {"pixels": ctx.pixels, "dtype": str(dtype), "weight_bytes": weights, "contenders": rows}


def _site_call(contender: str, site: str, ctx: Ctx, side: int) -> None:
    """One attention call of a site at ``side`` px, q/k/v allocated inside (the whole call is measured)."""
    dtype = torch.float16 if ctx.cuda else torch.float32
    tokens = (side // 8) ** 2
    if site == "unet.level0.self":
        batch, heads, d = 2, 8, 40
    else:
        batch, heads, d = 1, 1, 512
    q, k, v = _qkv(ctx, batch, heads, tokens, d, dtype)
    free = _free_for_contenders(ctx)
    if contender == "memslice-auto":  # default settings, its probe reading the same number
        with probe_reads(free):
            out = attend(q, k, v, scale=d**-0.5, strategy="auto", host=BasicHost(Settings()))
    else:
        webui = {c.name: c for c in webui_attention.reimplemented()}[contender]
        merge = [t.transpose(1, 2).reshape(batch, tokens, heads * d) for t in (q, k, v)]
        if site == "unet.level0.self":
            out = webui.cross_attention(*merge, heads, d**-0.5, free)
        else:
            side8 = side // 8
            conv = [t.transpose(1, 2).reshape(batch, side8, side8, d).permute(0, 3, 1, 2) for t in merge]
            if webui.attn_block is None:
                raise RuntimeError("not patched in the VAE")
            out = webui.attn_block(*conv, free)
    del out


def max_square(ctx: Ctx) -> dict[str, Any]:
    result: dict[str, Any] = {"cap_bytes": ctx.cap, "sides": list(ctx.sides), "sites": {}}
    for site in ("unet.level0.self", "vae.mid"):
        per = {}
        for contender in CONTENDERS:
            best, note = 0, ""
            started = time.perf_counter()
            for side in ctx.sides:
                if time.perf_counter() - started > ctx.per_search_s:
                    note = f"stopped after {ctx.per_search_s:g} s at {side} px"
                    break
                ok = False
                with memory_cap(ctx, ctx.cap):
                    try:
                        with ctx.peak() as measured:
                            _site_call(contender, site, ctx, side)
                        ok = measured["peak"] <= ctx.cap
                        if not ok:
                            note = f"{side} px took {format_bytes(measured['peak'])}"
                    except Exception as exc:
                        note = f"{side} px: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                if not ok:
                    break
                best = side
            per[contender] = {"largest_side": best, "note": note}
            ctx.release()
        result["sites"][site] = per
    return result


CARDS_GIB = (4, 6, 8)


def _whole_job_models(ctx: Ctx) -> dict[str, tuple[Any, Any, int]]:
    """(UNet, VAE decoder, text encoders' bytes) per model: published sizes on CUDA, narrow ones for the dry run."""
    from lib_memslice.models import WEIGHTS

    from .configs import SD15_DECODER, SD15_UNET
    from .sdxl_unet import build_sdxl_unet

    _, model, openaimodel = _import_ldm()
    width = 320 if ctx.cuda else 32
    found = {}
    with torch.device(ctx.device):
        torch.manual_seed(0)
        sd15 = openaimodel.UNetModel(**{**SD15_UNET, "model_channels": width}).to(ctx.half).eval()
        sdxl = build_sdxl_unet(width, 64 if ctx.cuda else 8).to(ctx.half).eval()
        decoder = model.Decoder(**{**SD15_DECODER, "ch": 128 if ctx.cuda else 32}).eval()
    found["sd15"] = (sd15, decoder, 2 * WEIGHTS["sd15"].text if ctx.cuda else 0)
    found["sdxl"] = (sdxl, decoder, 2 * WEIGHTS["sdxl"].text if ctx.cuda else 0)
    return found


def _bytes(module: Any) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _run_pass(ctx: Ctx, kind: str, module: Any, side: int, vae_dtype: torch.dtype) -> int:
    """One pass at ``side`` px as the webui runs it; the allocator's peak (absolute: weights included)."""
    g = torch.Generator(device=ctx.device).manual_seed(0)
    latent = side // 8
    torch.cuda.reset_peak_memory_stats(ctx.device) if ctx.cuda else None
    with torch.no_grad():
        if kind == "unet":
            x = torch.randn(2, 4, latent, latent, generator=g, device=ctx.device, dtype=ctx.half)
            t = torch.tensor([500, 500], device=ctx.device)
            dim = 2048 if hasattr(module, "label_emb") else 768
            context = torch.randn(2, 77, dim, generator=g, device=ctx.device, dtype=ctx.half)
            extra = {"y": torch.randn(2, 2816, device=ctx.device, dtype=ctx.half)} if dim == 2048 else {}
            with torch.autocast("cuda", dtype=torch.float16) if ctx.cuda else contextlib.nullcontext():
                out = module(x, t, context=context, **extra)
        else:
            z = torch.randn(1, 4, latent, latent, generator=g, device=ctx.device, dtype=vae_dtype)
            out = module(z)  # the webui decodes without autocast (devices.without_autocast)
    del out
    ctx.sync()
    return int(torch.cuda.max_memory_allocated(ctx.device)) if ctx.cuda else 0


def whole_job(ctx: Ctx) -> dict[str, Any]:
    """See the module docstring, section 5."""
    from lib_memslice.job_plan import make_job, plan_job
    from lib_memslice.models import BUILTIN, Weights

    _, model_module, _ = _import_ldm()
    attention = _import_ldm()[0]
    from lib_memslice.bands import make_decoder_forward
    from lib_memslice.forwards import make_attnblock_forward, make_cross_attention_forward

    host = BasicHost(Settings())
    forwards = (make_cross_attention_forward("auto", host), make_attnblock_forward("auto", host))
    decoder_forward = make_decoder_forward("auto", host)  # the decode runs as planned: in bands where it must
    total = torch.cuda.get_device_properties(ctx.device).total_memory if ctx.cuda else 0
    rows: list[dict[str, Any]] = []
    for arch, (unet, decoder, text_bytes) in _whole_job_models(ctx).items():
        for vae_name, vae_dtype in (
            (("fp16", torch.float16), ("fp32", torch.float32)) if ctx.cuda else (("fp32", torch.float32),)
        ):
            decoder.to(vae_dtype)
            weights = Weights(_bytes(unet), _bytes(decoder), text_bytes)
            for card_gib in CARDS_GIB if ctx.cuda else CARDS_GIB[:1]:
                card = card_gib * GiB if ctx.cuda else card_gib * 64 * MiB
                medvram = weights.unet + weights.vae + weights.text > 0.8 * card  # as a user of such a card would
                kernels_for = kernels.kernels_for_job("cuda", torch.float16, vae_dtype)  # the planner plans for CUDA
                row: dict[str, Any] = {"model": arch, "vae": vae_name, "card_gib": card_gib, "medvram": medvram}

                def job_at(side: int) -> dict[str, Any]:
                    job = make_job(BUILTIN[arch], arch, side, side, 1, card, Settings(), element_size=2,  # noqa: B023
                                   vae_element_size=torch.finfo(vae_dtype).bits // 8, weights=weights,  # noqa: B023
                                   medvram=medvram, device_kind="cuda")  # noqa: B023  # fmt: skip
                    return plan_job(job, kernels_for)  # noqa: B023

                side = job_at(512)["max_square_resolution"]
                row["planned_side"] = side
                for label, size in (("at", side), ("next", side + 64)):
                    if size <= 0 or (label == "next" and side == 0):
                        continue
                    plan = job_at(size)
                    outcome: dict[str, Any] = {"size": size, "verdict": plan["verdict"], "passes": []}
                    text = torch.empty(text_bytes // 2 or 1, dtype=torch.float16, device=ctx.device)
                    ctx.release()
                    ctx.limit = card
                    if ctx.cuda:
                        torch.cuda.set_per_process_memory_fraction(min(1.0, card / total), ctx.device)
                    try:
                        with card_probe(ctx), patched(attention, model_module, forwards, decoder_forward):
                            for p in plan["passes"]:
                                kind = "unet" if p["kind"] == "unet" else "vae"
                                running, idle = (unet, decoder) if kind == "unet" else (decoder, unet)
                                if medvram:
                                    idle.to("cpu")
                                running.to(ctx.device)
                                entry = {"pass": p["name"], "predicted_total": p["total_bytes"],
                                         "predicted_tensors": p["tensor_bytes"], "verdict": p["verdict"]}  # fmt: skip
                                try:
                                    measured = _run_pass(ctx, kind, running, p["width"], vae_dtype)
                                    entry.update(measured=measured, oom=False,
                                                 allocator_share=(measured - p["tensor_bytes"])
                                                 / max(1, p["activation_bytes"]) if ctx.cuda else None)  # fmt: skip
                                except Exception as exc:  # torch's OOM or memslice's refusal: the outcome
                                    entry.update(oom=True, error=f"{type(exc).__name__}: {str(exc)[:160]}")
                                    exc.__traceback__ = None
                                outcome["passes"].append(entry)
                                ctx.release()
                    finally:
                        ctx.limit = None
                        if ctx.cuda:
                            torch.cuda.set_per_process_memory_fraction(1.0, ctx.device)
                        del text
                        unet.to(ctx.device)
                        decoder.to(ctx.device)
                        ctx.release()
                    outcome["oom"] = any(e["oom"] for e in outcome["passes"])
                    row[label] = outcome
                rows.append(row)
        del unet
        ctx.release()
    fitted = [r for r in rows if r.get("at")]
    ran = all(not r["at"]["oom"] for r in fitted)
    shares = [e["allocator_share"] for r in fitted for e in r["at"]["passes"] if e.get("allocator_share") is not None]
    return {
        "rows": rows,
        "planned_sizes_ran": ran,
        "allocator_share": {"min": min(shares, default=None), "max": max(shares, default=None)},
        "pass": bool(fitted) and ran,
    }


#: section 6: the SD decoder's image sides under an emulated 4 GiB card (fp16); tiny ones for the CPU dry run
VAE_SIDES = (1024, 2048, 4096)
VAE_CARD = 4 * GiB


def vae_bands(ctx: Ctx) -> dict[str, Any]:
    """Section 6 (issue 23): memslice's banded ``Decoder`` forward on the SD decoder (ch 128, fp16, random weights)
    at 1024, 2048 and 4096 px on an emulated 4 GiB card (the process capped by ``set_per_process_memory_fraction``,
    memslice's probe reading the card's room), its attention memslice's too: the plan it chose (the stock forward,
    bands on the device, or bands streamed through pinned host memory), the allocator's peak above the pass's input
    against the plan's predicted device peak, the time, and no out-of-memory error. The stock decode is tried at
    each size too (it runs out of memory where the card is too small). The CPU dry run: ch 32, 64 and 128 px, a
    16 MiB card (numbers without meaning)."""
    from lib_memslice.bands import make_decoder_forward
    from lib_memslice.forwards import make_attnblock_forward, make_cross_attention_forward

    from .configs import SD15_DECODER

    attention, model, _ = _import_ldm()
    with torch.device(ctx.device):
        torch.manual_seed(0)
        decoder = model.Decoder(**{**SD15_DECODER, "ch": 128 if ctx.cuda else 32}).to(ctx.half).eval()
    host = _BandsHost()
    forwards = (make_cross_attention_forward("auto", host), make_attnblock_forward("auto", host))
    banded = make_decoder_forward("auto", host)
    rows: list[dict[str, Any]] = []
    card = VAE_CARD if ctx.cuda else 16 * MiB
    for side in VAE_SIDES if ctx.cuda else (64, 128):
        row: dict[str, Any] = {"side": side, "card": card}
        g = torch.Generator(device=ctx.device).manual_seed(0)
        z = torch.randn(1, 4, side // 8, side // 8, generator=g, device=ctx.device, dtype=ctx.half)
        with memory_cap(ctx, card), card_probe(ctx):
            for name, patch in (("memslice", True), ("stock", False)):
                start = time.perf_counter()
                try:
                    memslice = patched(attention, model, forwards, banded) if patch else contextlib.nullcontext()
                    with torch.no_grad(), ctx.peak() as peak, memslice:
                        decoder(z)
                    row[name] = {"measured": peak["peak"], "seconds": time.perf_counter() - start, "oom": False}
                except Exception as exc:  # torch's OOM or memslice's refusal: the outcome
                    row[name] = {"oom": True, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
                    exc.__traceback__ = None
                ctx.release()
        if host.bands and not row["memslice"]["oom"]:
            record = host.bands[-1]
            row["plan"] = {"bands": record.bands, "streamed": record.streamed, "predicted": record.peak_bytes,
                           "untiled": record.untiled_bytes, "room": record.room_bytes, "reason": record.reason,
                           "tried": [list(t) for t in record.tried]}  # fmt: skip
            measured = row["memslice"]["measured"]
            row["memslice"]["ratio"] = measured / record.peak_bytes if record.peak_bytes else None
        host.bands.clear()
        del z
        rows.append(row)
    ratios = [r["memslice"]["ratio"] for r in rows if r["memslice"].get("ratio") is not None]
    ran = all(not r["memslice"]["oom"] for r in rows)
    return {"rows": rows, "max_ratio": max(ratios, default=None), "pass": ran and all(x <= 1.0 for x in ratios)}


class _BandsHost(BasicHost):
    """:class:`BasicHost` keeping each VAE pass's band record (the plan it ran)."""

    def __init__(self) -> None:
        super().__init__(Settings())
        self.bands: list[Any] = []

    def record_bands(self, record: Any) -> None:
        super().record_bands(record)
        self.bands.append(record)


#: section 7: SD3 Medium's joint attention at 1024 and 2048 px: 2 x 24 heads of 64 over 154 text tokens + patches
SD3_TOKENS = (4250, 16538)
SD3_HEADS, SD3_HEAD_DIM = 24, 64


def sd3_joint(ctx: Ctx) -> dict[str, Any]:
    """Section 7 (issue 24): SD3-shaped joint calls as the MMDiT makes them (q and k ``[2, N, 24 x 64]``, v
    ``[2, N, 24, 64]``, fp16) through memslice's joint function with ample memory, with the fused kernels on and
    with SDPA's math path only (the regime where memslice's own kernel runs): the allocator's peak above the inputs
    against the call's predicted peak (the joint function's own layout included), the time
    against the webui's own call (one SDPA call on the same views; under the math path it may run out of memory:
    that is its outcome), and the largest difference from the fused call. CPU dry run: 154 text tokens + 64 and
    + 256 patches, float32."""
    from lib_memslice.joint import make_joint_attention

    host = BasicHost(Settings())
    joint = make_joint_attention("auto", host)
    rows: list[dict[str, Any]] = []
    for n in SD3_TOKENS if ctx.cuda else (218, 410):
        g = torch.Generator(device=ctx.device).manual_seed(0)
        q, k = (torch.randn(2, n, SD3_HEADS * SD3_HEAD_DIM, generator=g, device=ctx.device, dtype=ctx.half)
                for _ in range(2))  # fmt: skip
        v = torch.randn(2, n, SD3_HEADS, SD3_HEAD_DIM, generator=g, device=ctx.device, dtype=ctx.half)
        for regime in ("fused", "math"):
            rows.append(_sd3_case(ctx, host, joint, (q, k, v), regime))
            ctx.release()
        del q, k, v
        ctx.release()
    mine = [r["memslice"] for r in rows if "memslice" in r]
    within = all(m["measured"] <= m["predicted"] + ALLOCATOR_SLACK for m in mine)
    return {"rows": rows, "max_ratio": max((m["ratio"] for m in mine), default=None),
            "pass": len(mine) == len(rows) and within}  # fmt: skip


def _webui_joint(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The webui's SD3 attention: one SDPA call on head views, the output back to ``[B, N, H x d]``."""
    b, n = q.shape[:2]
    qh, kh, vh = (t.reshape(b, n, SD3_HEADS, SD3_HEAD_DIM).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).reshape(b, n, SD3_HEADS * SD3_HEAD_DIM)


def _sd3_case(ctx: Ctx, host: BasicHost, joint: Callable[..., Tensor], qkv: tuple[Tensor, Tensor, Tensor],
              regime: str) -> dict[str, Any]:  # fmt: skip
    """One row of section 7: memslice's joint call and the webui's, in ``regime`` ("fused" or "math")."""
    q, k, v = qkv
    row: dict[str, Any] = {"tokens": q.shape[1], "regime": regime}
    try:
        with torch.no_grad():
            reference = _webui_joint(q, k, v)  # the fused call (the default backends)
            with contextlib.nullcontext() if regime == "fused" else sdpa_math_only():
                joint(q, k, v, SD3_HEADS)  # warm-up: library workspaces, the plan
                with ctx.peak() as peak:
                    out = joint(q, k, v, SD3_HEADS)
                record = host.stats.recent()[-1]
                error = float((out.float() - reference.float()).abs().max())
                del out, reference
                row["memslice"] = {
                    "kernel": record.kernel_used, "slices": record.slices, "predicted": record.peak_bytes,
                    "measured": peak["peak"], "ratio": peak["peak"] / record.peak_bytes,
                    "max_abs_error": error, "seconds": _timed(ctx, lambda: joint(q, k, v, SD3_HEADS)),
                }  # fmt: skip
                ctx.release()
                try:
                    _webui_joint(q, k, v)
                    with ctx.peak() as theirs:
                        _webui_joint(q, k, v)
                    row["webui"] = {"measured": theirs["peak"], "seconds": _timed(ctx, lambda: _webui_joint(q, k, v))}
                except Exception as exc:  # the webui's math call at 2048 px may not fit: that is its outcome
                    row["webui"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
                    exc.__traceback__ = None
    except Exception as exc:  # one case must not end the check
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        exc.__traceback__ = None
    return row


def no_fused(ctx: Ctx) -> dict[str, Any]:
    """Where no fused kernel runs (forced off: the regime of MPS, DirectML, ROCm without fused attention, fp32 upcast
    on old GPUs): time and peak of SD1.5 level-0 self-attention per contender, every one told 4 GiB are free."""
    rows: dict[str, Any] = {}
    free = ctx.cap
    for side in (512, 1024) if ctx.cuda else (64,):
        tokens = (side // 8) ** 2
        q, k, v = _qkv(ctx, 2, 8, tokens, 40, torch.float16 if ctx.cuda else torch.float32)
        merged = [t.transpose(1, 2).reshape(2, tokens, 320) for t in (q, k, v)]
        host = BasicHost(Settings())

        def memslice(q: Tensor = q, k: Tensor = k, v: Tensor = v, host: BasicHost = host) -> Tensor:
            with probe_reads(free):  # default settings, its probe reading the same number as the others get
                return attend(q, k, v, scale=40**-0.5, strategy="auto", host=host)

        calls: dict[str, Callable[[], Any]] = {"memslice-auto": memslice}
        for c in webui_attention.reimplemented():
            if c.name in ("sdp", "Doggettx", "InvokeAI-cuda", "sub-quadratic"):
                calls[c.name] = lambda c=c, m=merged: c.cross_attention(*m, 8, 40**-0.5, free)
        per = {}
        with sdpa_math_only():  # torch.nn.attention where it exists, else torch 2.1's torch.backends.cuda switches
            for name, call in calls.items():
                try:
                    call()
                    with ctx.peak() as measured:
                        call()
                    per[name] = {"ms": _timed(ctx, call, reps=5) * 1e3, "peak_bytes": measured["peak"]}
                except Exception as exc:
                    per[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
                ctx.release()
        rows[f"{side}px"] = per
    return {"free_bytes": free, "sizes": rows}


# --- report ------------------------------------------------------------------------------------------------


def _rows_section(section: dict[str, Any] | None, title: str, claim: str, head: str, align: str,
                  row: Callable[[dict[str, Any]], str]) -> list[str]:  # fmt: skip
    """A section's report: its title, the claim with its verdict and largest measured / predicted, one table row a
    case (none where the section did not run or failed)."""
    if not section or "rows" not in section:
        return []
    verdict = "PASS" if section["pass"] else "FAIL"
    summary = f"{claim}: **{verdict}** (largest measured / predicted {section['max_ratio']})."
    return [title, "", summary, "", head, align, *(row(r) for r in section["rows"]), ""]


def _vae_row(r: dict[str, Any]) -> str:
    """One row of section 6's table."""
    mine, stock, plan = r["memslice"], r["stock"], r.get("plan")
    if not plan:
        what, predicted = "-", "-"
    else:
        what = "the stock forward" if plan["bands"] == 0 else f"{plan['bands']} bands" + " streamed" * plan["streamed"]
        predicted = format_bytes(plan["predicted"])
    measured = f"OOM: {mine['error']}" if mine["oom"] else format_bytes(mine["measured"])
    theirs = (
        f"OOM: {stock['error'][:80]}"
        if stock["oom"]
        else f"{format_bytes(stock['measured'])}, {stock['seconds']:.1f} s"
    )
    return (f"| {r['side']} | {format_bytes(r['card'])} | {what} | {predicted} | {measured} | "
            f"{mine.get('seconds', 0.0):.1f} s | {theirs} |")  # fmt: skip


def _sd3_row(r: dict[str, Any]) -> str:
    """One row of section 7's table."""
    if "memslice" not in r:
        return f"| {r['tokens']} | {r['regime']} | {r.get('error', '-')} | | | | | |"
    m, w = r["memslice"], r.get("webui", {})
    theirs = w["error"] if "error" in w else f"{format_bytes(w['measured'])}, {1e3 * w['seconds']:.1f} ms"
    return (f"| {r['tokens']} | {r['regime']} | {m['kernel']}, {m['slices']} | {format_bytes(m['predicted'])} | "
            f"{format_bytes(m['measured'])} | {1e3 * m['seconds']:.1f} ms | {m['max_abs_error']:.1e} | "
            f"{theirs} |")  # fmt: skip


#: section 8: interleaved rounds per case, a round's calls run back to back for about this long, then synchronised
PARITY_ROUNDS = 31
PARITY_ROUND_S = 0.02


def parity(ctx: Ctx) -> dict[str, Any]:
    """Section 8 (issue 27): memslice-auto's and memslice-doggettx's ``CrossAttention`` forward against the webui's
    sdp forward (:func:`.parity.reimplemented_sdp_forward`, which the tests hold bit-equal to the real one) on the
    real ldm modules of SD1.5's UNet at 512 px, fp16 and bf16, per call: interleaved rounds of calls run back to
    back and synchronised (the median of per-round ratios), the CPU's time to hand a call to the device (the
    median of unsynchronised calls: where it outlasts the device's work the forward is host-bound), and whether
    the outputs are bit-equal. CUDA graphs of a step: webui 1.10.1 captures none (its code has no
    ``torch.compile`` and no CUDA graph), so none are timed. The dry run: the parity section's smoke cases."""
    from . import parity as parity_mod

    cases = parity_mod._SD15_CASES if ctx.cuda else parity_mod.SMOKE.cases
    dtypes = (torch.float16, torch.bfloat16) if ctx.cuda else (torch.float32,)
    rows = [_parity_case(ctx, parity_mod, case, dtype) for dtype in dtypes for case in cases]
    ratios = [m["ratio"] for r in rows if r["ratio_applies"] for m in r["memslice"].values()]
    unequal = [r["case"] for r in rows for m in r["memslice"].values() if not m["bit_equal"]]
    return {"rows": rows, "max_ratio": max(ratios) if ratios else None, "not_bit_equal": unequal,
            "pass": all(x <= parity_mod.RATIO for x in ratios) and not unequal,
            "ratio_target": parity_mod.RATIO, "short_call_ms": parity_mod.SHORT_CALL_MS,
            "cuda_graphs": "none: webui 1.10.1 captures no CUDA graph and compiles nothing"}  # fmt: skip


def _parity_case(ctx: Ctx, parity_mod: Any, case: Any, dtype: torch.dtype) -> dict[str, Any]:
    from lib_memslice.forwards import make_cross_attention_forward

    layer, x, context = parity_mod.build(case, dtype)
    layer = layer.to(ctx.device)
    x = x.to(ctx.device)
    context = None if context is None else context.to(ctx.device)
    hosts = {s: parity_mod.WebuiLikeHost() for s in parity_mod.STRATEGIES}
    fns = {parity_mod.WEBUI: parity_mod.reimplemented_sdp_forward,
           **{f"memslice-{s}": make_cross_attention_forward(s, hosts[s]) for s in parity_mod.STRATEGIES}}  # fmt: skip
    row: dict[str, Any] = {"case": case.label, "dtype": str(dtype)[6:], "memslice": {}}
    calls: dict[str, int] = {}
    us: dict[str, list[float]] = {name: [] for name in fns}
    launch: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        reference = fns[parity_mod.WEBUI](layer, x, context=context)
        for name, fn in fns.items():
            out = fn(layer, x, context=context)
            if name != parity_mod.WEBUI:
                row["memslice"][name] = {"bit_equal": bool(torch.equal(out, reference))}
            ctx.sync()
            start = time.perf_counter()
            fn(layer, x, context=context)
            ctx.sync()
            calls[name] = max(1, min(1000, round(PARITY_ROUND_S / max(time.perf_counter() - start, 1e-7))))
        names = list(fns)
        for r in range(PARITY_ROUNDS):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                fn = fns[name]
                ctx.sync()
                start = time.perf_counter()
                fn(layer, x, context=context)
                launch[name].append((time.perf_counter() - start) * 1e6)
                for _ in range(calls[name] - 1):
                    fn(layer, x, context=context)
                ctx.sync()
                us[name].append((time.perf_counter() - start) / calls[name] * 1e6)
    webui_us = us[parity_mod.WEBUI]
    row["webui_us"] = statistics.median(webui_us)
    row["webui_launch_us"] = statistics.median(launch[parity_mod.WEBUI])
    row["ratio_applies"] = row["webui_us"] >= parity_mod.SHORT_CALL_MS * 1e3
    for name, mine in row["memslice"].items():
        lo, mid, hi = parity_mod._quartiles([a / b for a, b in zip(us[name], webui_us, strict=True)])
        mine.update({"us": statistics.median(us[name]), "ratio": mid, "ratio_iqr": [lo, hi],
                     "overhead_us": statistics.median([a - b for a, b in zip(us[name], webui_us, strict=True)]),
                     "launch_us": statistics.median(launch[name]),
                     "kernel": hosts[name.removeprefix("memslice-")].stats.recent()[-1].kernel_used})  # fmt: skip
    del layer, x, context
    ctx.release()
    return row


def _parity_row(r: dict[str, Any]) -> str:
    """One row of section 8's table."""
    cells = []
    for m in r["memslice"].values():
        lo, hi = m["ratio_iqr"]
        bits = "bit-equal" if m["bit_equal"] else "NOT bit-equal"
        cells.append(f"{m['ratio']:.4f}x ({lo:.4f}-{hi:.4f}), {m['overhead_us']:+.1f} us, launch "
                     f"{m['launch_us']:.0f} us, {m['kernel']}, {bits}")  # fmt: skip
    return (f"| {r['case']} | {r['dtype']} | {r['webui_us']:.0f} | {r['webui_launch_us']:.0f} | "
            + " | ".join(cells) + " |")  # fmt: skip


def markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    lines = [
        "# memslice GPU check",
        "",
        f"{meta['device_name']}, torch {meta['torch']}, CUDA {meta['cuda']}, {meta['date']}",
        f"command: `{meta['command']}`",
        "",
    ]
    km = report.get("kernel_memory")
    if km and "rows" in km:
        lines += [
            "## 1. Kernel memory: measured (max_memory_allocated) vs predicted",
            "",
            f"{km['checked']} runs, largest measured/predicted {km['max_ratio'] or 0:.3f}; "
            f"over the prediction: {', '.join(km['over_prediction']) or 'none'}; "
            f"wrong output: {', '.join(km['wrong_output']) or 'none'}. **{'PASS' if km['pass'] else 'FAIL'}**",
            "",
            "| kernel | dtype | d | one piece: measured / predicted | sliced: slices, measured / predicted | note |",
            "| --- | --- | ---: | --- | --- | --- |",
        ]
        for r in km["rows"]:
            if r.get("status") != "ok":
                lines.append(f"| {r['kernel']} | {r['dtype']} | {r['head_dim']} | - | - | {r.get('note', '')} |")
                continue
            one, sl = r["one piece"], r["sliced"]
            lines.append(
                f"| {r['kernel']} ({r.get('backend') or '-'}) | {r['dtype']} | {r['head_dim']} | "
                f"{format_bytes(one['measured'])} / {format_bytes(one['predicted'])} ({one['ratio']:.3f}) | "
                f"{sl['slices']}: {format_bytes(sl['measured'])} / {format_bytes(sl['predicted'])} "
                f"({sl['ratio']:.3f}) | |"
            )
        lines.append("")
    wj = report.get("whole_job")
    if wj and "rows" in wj:
        lines += [
            "## 5. Whole jobs on emulated cards: the planner's largest size, predicted vs measured",
            "",
            f"Planned sizes ran without out-of-memory: **{'PASS' if wj['pass'] else 'FAIL'}**; the allocator's share "
            f"over the live-tensor prediction, per pass at the planned size: {wj['allocator_share']}.",
            "",
            "| model | VAE | card | medvram | size | pass | verdict | predicted total | measured | OOM |",
            "| --- | --- | ---: | --- | ---: | --- | --- | ---: | ---: | --- |",
        ]
        for r in wj["rows"]:
            for label in ("at", "next"):
                outcome = r.get(label)
                if not outcome:
                    continue
                for e in outcome["passes"]:
                    measured = format_bytes(e["measured"]) if e.get("measured") is not None else "-"
                    lines.append(f"| {r['model']} | {r['vae']} | {r['card_gib']} GiB | {r['medvram']} | "
                                 f"{outcome['size']} ({'planned' if label == 'at' else 'next'}) | {e['pass']} | "
                                 f"{e['verdict']} | {format_bytes(e['predicted_total'])} | {measured} | "
                                 f"{'yes' if e['oom'] else 'no'} |")  # fmt: skip
        lines.append("")
    lines += _rows_section(
        report.get("vae_bands"), "## 6. The SD decoder in bands on an emulated card: predicted vs measured",
        "memslice's decode ran at every size within its predicted device peak",
        "| side | card | memslice's plan | predicted | measured | time | the stock decode |",
        "| ---: | ---: | --- | ---: | ---: | ---: | --- |", _vae_row)  # fmt: skip
    lines += _rows_section(
        report.get("sd3_joint"), "## 7. SD3's joint attention: memslice's joint function vs the webui's call",
        "Every call within its predicted peak",
        "| tokens | regime | memslice: kernel, slices | predicted | measured | time | error vs fused "
        "| the webui's call |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | --- |", _sd3_row)  # fmt: skip
    par = report.get("parity")
    if par and "rows" in par:
        lines += _rows_section(
            par, "## 8. Parity: memslice's forward vs the webui's sdp forward, per call",
            f"Every call long enough for a ratio within {par['ratio_target']}x of sdp's and every output bit-equal "
            f"(CUDA graphs of a step: {par['cuda_graphs']}; calls under {par['short_call_ms']:g} ms: the overhead in "
            "us, stated)",
            "| case | dtype | sdp us | sdp launch us | memslice-auto | memslice-doggettx |",
            "| --- | --- | ---: | ---: | --- | --- |", _parity_row)  # fmt: skip
    for key, title in (("oom_retry", "## 2. A real out-of-memory error"), ("no_fused", "## No fused kernel"),
                       ("pipeline", "## 3. SD1.5 fp16 UNet + VAE"),
                       ("max_square", "## 4. Largest square size within 4 GiB")):  # fmt: skip
        if key in report:
            lines += [title, "", "```json", json.dumps(report[key], indent=1)[:6000], "```", ""]
    return "\n".join(lines)


def write(ctx: Ctx, report: dict[str, Any]) -> None:
    os.makedirs(ctx.out, exist_ok=True)
    with open(os.path.join(ctx.out, "gpu-report.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(os.path.join(ctx.out, "gpu-report.md"), "w") as f:
        f.write(markdown(report))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib_memslice bench --gpu-check")
    parser.add_argument("--gpu-check", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="bench-out", help="where gpu-report.md/.json go (default bench-out)")
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # "cpu": the tests' dry run
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated sections (kernel_memory,oom_retry,whole_job,vae_bands,sd3_joint,no_fused,pipeline,"
        "max_square,parity)",
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"memslice gpu-check: no CUDA device here (torch {torch.__version__} sees none); nothing to check")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    ctx = Ctx(device, args.out)
    report: dict[str, Any] = {
        "meta": {
            "device_name": torch.cuda.get_device_name(ctx.device)
            if ctx.cuda
            else f"CPU dry run ({platform.machine()})",
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(
                ["python", "-m", "lib_memslice", "bench", *(argv if argv is not None else sys.argv[1:])]
            ),
        }
    }
    sections = {
        "kernel_memory": kernel_memory,
        "oom_retry": oom_retry,
        "whole_job": whole_job,
        "vae_bands": vae_bands,
        "sd3_joint": sd3_joint,
        "no_fused": no_fused,
        "pipeline": pipeline,
        "max_square": max_square,
        "parity": parity,
    }
    only = [s for s in args.only.split(",") if s] or list(sections)
    began = time.perf_counter()
    for name in only:
        start = time.perf_counter()
        try:
            report[name] = sections[name](ctx)
        except Exception as exc:
            report[name] = {"error": f"{type(exc).__name__}: {exc}"}
        report[name]["seconds"] = time.perf_counter() - start
        print(f"memslice gpu-check: {name} done in {report[name]['seconds']:.1f} s", flush=True)
        report["meta"]["seconds"] = time.perf_counter() - began
        write(ctx, report)
    km = report.get("kernel_memory", {})
    print(f"memslice gpu-check: kernel memory {'PASS' if km.get('pass') else 'FAIL'} "
          f"(max measured/predicted {km.get('max_ratio')}); wrote {ctx.out}/gpu-report.md")  # fmt: skip
    return 0
