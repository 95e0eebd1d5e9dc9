"""SD3's MMDiT off the webui: diffusers' stand-in, the webui's own classes from a checkout, and their activations.

Two ways to run SD3's MMDiT without the webui, for two different checks:

- **diffusers' ``SD3Transformer2DModel``** (0.29 and later; the webui's pin, 0.27.2, predates it) builds the same
  network at any width with random weights (a webui state dict converts to it with no missing or unexpected keys
  and reproduces its output to 5e-7 in float32, shared/sd3.md section 4). :class:`JointProcessor` makes its
  attention call as the webui's MMDiT does (q and k ``[B, N, H*d]``, v ``[B, N, H, d]``, the prompt's tokens first)
  and hands it to a function of the webui's signature: the stand-in for *results* (memslice's joint attention in a
  whole model against the stock one).
- **the webui's own ``mmdit.py`` and ``sd3_impls.py``**, executed from a checkout (:func:`load_webui_sd3`, nothing
  copied) under our own stand-in for what they import from ``other_impls`` (``attention``, ``Mlp``): the source of
  the activation model. diffusers cannot stand in for *memory*: its separate q/k/v projections die at the
  concatenation, while the webui's fused qkv projection and the q and k copies ``pre_attention`` makes stay alive
  until the block returns, so the webui's MMDiT peaks at 1.44-1.61x the stand-in's live tensors (the table
  below).

``python -m memslice_tools.sd3_standin --webui-dir DIR`` measures the webui's MMDiT as
:mod:`memslice_tools.fit_activations` measures the UNets (live tensors under
:class:`~memslice_tools.memtrack.PeakTracker`, weights and inputs not counted, memslice's joint attention in place;
half precision under CUDA autocast, emulated on the CPU), fits bytes per (element x batch x hidden) against the
image's patch tokens and the prompt's text tokens at 2-4 heads, validates at other sizes, prompt lengths and a
wider model under two attention regimes (exit status 0 when every case is within +-15 %), prints the stand-in's
numbers beside, and the coefficients for ``lib_memslice/activations.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
from torch import nn

from lib_memslice import activations
from lib_memslice.activations import JointLinear, MmditModel
from lib_memslice.forwards import BasicHost
from lib_memslice.joint import make_joint_attention
from lib_memslice.models import JOINT, SD3_PATCH_PX, SD3_TEXT_TOKENS
from lib_memslice.settings import Settings

from .fit_activations import AMPLE, EINSUM, _round_up, _without_gemm_scratch, cuda_autocast_on_cpu
from .memtrack import PeakTracker

MiB = 1 << 20
CONTEXT_DIM = 4096  # the prompt embedding's width (CLIP-L/G padded to T5's)
POOLED_DIM = 2048  # the pooled CLIP-L + CLIP-G vector
Attention = Callable[..., torch.Tensor]


def has_sd3() -> bool:
    """Whether this stack's diffusers has ``SD3Transformer2DModel`` (0.29+; the webui's pin, 0.27.2, does not)."""
    try:
        from diffusers import SD3Transformer2DModel  # noqa: F401
    except Exception:
        return False
    return True


# --- diffusers' stand-in ---------------------------------------------------------------------------------------


def build_standin(heads: int, depth: int = 2, *, patches: int = 32, dtype: torch.dtype = torch.float32,
                  seed: int = 0) -> nn.Module:  # fmt: skip
    """diffusers' MMDiT shaped as the webui builds SD3 Medium's (heads of 64, ``heads`` wide; SD3 Medium: 24 heads,
    depth 24) with random weights, ``patches`` a side at most."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(sample_size=patches * 2, patch_size=2, in_channels=16, num_layers=depth,
                                  attention_head_dim=64, num_attention_heads=heads, joint_attention_dim=CONTEXT_DIM,
                                  caption_projection_dim=64 * heads, pooled_projection_dim=POOLED_DIM,
                                  out_channels=16, pos_embed_max_size=patches)  # fmt: skip
    return model.to(dtype=dtype).eval()


class JointProcessor:
    """diffusers' joint attention with the call made as webui 1.10.1's ``block_mixing`` makes it: q and k
    ``[B, N, H*d]``, v a ``[B, N, H, d]`` view (``v_4d``; else ``[B, N, H*d]``), the prompt's tokens first, and
    ``attention(q, k, v, heads)`` doing the rest."""

    def __init__(self, attention: Attention, v_4d: bool = True) -> None:
        self.attention, self.v_4d = attention, v_4d

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:  # fmt: skip
        b = hidden_states.shape[0]
        streams = [(attn.to_q, attn.to_k, attn.to_v, hidden_states)]
        if encoder_hidden_states is not None:
            streams.insert(0, (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, encoder_hidden_states))
        q, k, v = (torch.cat([s[i](s[3]) for s in streams], dim=1) for i in range(3))
        if self.v_4d:
            v = v.view(b, v.shape[1], attn.heads, -1)
        out = self.attention(q, k, v, attn.heads)
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](out))
        text = encoder_hidden_states.shape[1]
        image = attn.to_out[1](attn.to_out[0](out[:, text:]))
        context = out[:, :text] if attn.context_pre_only else attn.to_add_out(out[:, :text])
        return image, context


def route(model: nn.Module, attention: Attention, v_4d: bool = True) -> None:
    """Every joint attention of diffusers' ``model`` through ``attention`` (the webui's signature)."""
    model.set_attn_processor(JointProcessor(attention, v_4d))


def standin_inputs(width: int, height: int, batch: int, text_tokens: int = SD3_TEXT_TOKENS, *,
                   dtype: torch.dtype = torch.float32, seed: int = 1) -> dict[str, torch.Tensor]:  # fmt: skip
    """diffusers' keyword inputs for an image of ``width x height`` (cut to 16 px as the webui cuts it)."""
    x, t, y, context = mmdit_inputs(width, height, batch, text_tokens, dtype=dtype, seed=seed)
    return dict(hidden_states=x, encoder_hidden_states=context, pooled_projections=y, timestep=t)


# --- the webui's own classes -------------------------------------------------------------------------------------


def _webui_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: Any = None) -> torch.Tensor:
    """The attention ``other_impls`` gives the MMDiT, as the webui's calling convention defines it: one SDPA call
    over the heads (memslice's :func:`lib_memslice.joint._sdpa` is the same function)."""
    b, _, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, -1, heads * d)


class _Mlp(nn.Module):
    """``other_impls.Mlp``'s shape: linear, the activation module given, linear."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer: Any = nn.GELU, bias: bool = True, **where: Any) -> None:  # fmt: skip
        super().__init__()
        hidden = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden, bias=bias, **where)  # where: dtype and device
        self.act = act_layer
        self.fc2 = nn.Linear(hidden, out_features or in_features, bias=bias, **where)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def load_webui_sd3(webui_dir: str) -> tuple[ModuleType, ModuleType]:
    """``(mmdit, sd3_impls)`` executed from ``webui_dir``'s ``modules/models/sd3`` (read, never copied or imported
    as the webui's package), ``other_impls`` replaced by a stand-in of ours; ``sys.modules`` is put back after."""
    names = ("modules", "modules.models", "modules.models.sd3", "modules.models.sd3.other_impls",
             "modules.models.sd3.mmdit")  # fmt: skip
    saved = {n: sys.modules.get(n) for n in names}
    try:
        for n in names[:3]:
            package = ModuleType(n)
            package.__path__ = []
            sys.modules[n] = package
        other = ModuleType(names[3])
        other.attention, other.Mlp = _webui_attention, _Mlp  # type: ignore[attr-defined]
        sys.modules[names[3]] = other
        loaded = []
        for name in ("mmdit", "sd3_impls"):
            path = os.path.join(webui_dir, "modules", "models", "sd3", f"{name}.py")
            spec = importlib.util.spec_from_file_location(f"modules.models.sd3.{name}", path)
            module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
            sys.modules[spec.name] = module  # type: ignore[union-attr]
            spec.loader.exec_module(module)  # type: ignore[union-attr]
            loaded.append(module)
        return loaded[0], loaded[1]
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def build_mmdit(mmdit: ModuleType, heads: int, *, patches: int = 64, dtype: torch.dtype = torch.float32,
                seed: int = 0) -> nn.Module:  # fmt: skip
    """The MMDiT class of the module ``mmdit`` (the webui's, or a fake of it) built as ``sd3_impls.BaseModel``
    builds it from SD3 Medium's checkpoint, at ``heads`` heads (= depth) and ``patches`` patches a side, with random
    weights and a random ``pos_embed`` (the module makes it zeros)."""
    torch.manual_seed(seed)
    hidden = 64 * heads
    model = mmdit.MMDiT(input_size=None, pos_embed_scaling_factor=None, pos_embed_offset=None,
                        pos_embed_max_size=patches, patch_size=2, in_channels=16, depth=heads,
                        num_patches=patches * patches, adm_in_channels=POOLED_DIM,
                        context_embedder_config={"target": "torch.nn.Linear",
                                                 "params": {"in_features": CONTEXT_DIM, "out_features": hidden}},
                        dtype=dtype)  # fmt: skip
    with torch.no_grad():
        model.pos_embed.normal_(0, 0.5)
    return model.to(dtype).eval()


def mmdit_inputs(width: int, height: int, batch: int, text_tokens: int = SD3_TEXT_TOKENS, *,
                 dtype: torch.dtype = torch.float32, seed: int = 1) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """``(x, t, y, context)`` as ``BaseModel.apply_model`` hands them to the MMDiT for a ``width x height`` image
    (cut to 16 px as the webui cuts it): the latent, ``sigma * 1000``, the pooled vector, the prompt."""
    g = torch.Generator().manual_seed(seed)
    h, w = height // SD3_PATCH_PX * 2, width // SD3_PATCH_PX * 2

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    return (
        randn(batch, 16, h, w),
        torch.full((batch,), 500.0),
        randn(batch, POOLED_DIM),
        randn(batch, text_tokens, CONTEXT_DIM),
    )


# --- measuring -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    """One MMDiT forward measured: the peak of its live tensors, what was live at its joint calls, the transient."""

    hidden: int
    width: int
    height: int
    text_tokens: int
    batch: int
    element_size: int
    peak_bytes: int
    live_bytes: int
    attention_peaks: dict[str, int] = field(default_factory=dict)

    @property
    def image_tokens(self) -> int:
        return (self.width // SD3_PATCH_PX) * (self.height // SD3_PATCH_PX)

    @property
    def unit(self) -> int:
        return self.element_size * self.batch * self.hidden


@contextlib.contextmanager
def _attention_of(mmdit: ModuleType, attention: Attention) -> Iterator[None]:
    saved = mmdit.__dict__["attention"]
    mmdit.attention = attention  # type: ignore[attr-defined]
    try:
        yield
    finally:
        mmdit.attention = saved  # type: ignore[attr-defined]


def measure(mmdit: ModuleType, model: nn.Module, width: int, height: int, batch: int = 2,
            text_tokens: int = SD3_TEXT_TOKENS, *, settings: Settings = AMPLE) -> Measurement:  # fmt: skip
    """One forward of ``model`` (built by :func:`build_mmdit` from ``mmdit``) under the tracker, memslice's joint
    attention (``settings``) bound in ``mmdit`` as the webui entry binds it: a half-precision MMDiT under CUDA
    autocast as the webui runs it (emulated on the CPU), float32 without."""
    dtype = next(model.parameters()).dtype
    host = BasicHost(settings)
    tracker = PeakTracker()
    live = [0]
    joint = make_joint_attention("auto", host)

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: Any = None) -> torch.Tensor:
        live[0] = max(live[0], int(tracker.current))
        return joint(q, k, v, heads, mask)

    x, t, y, context = mmdit_inputs(width, height, batch, text_tokens, dtype=dtype)
    cast = cuda_autocast_on_cpu(model, dtype) if dtype != torch.float32 else contextlib.nullcontext()
    with _attention_of(mmdit, attention), torch.no_grad(), cast, _without_gemm_scratch(), tracker:
        out = model(x, t, y=y, context=context)
        del out
    return Measurement(64 * model.num_heads, width, height, text_tokens, batch, torch.finfo(dtype).bits // 8,
                       int(tracker.peak), live[0], activations.attention_peaks(host.stats.recent()))  # fmt: skip


def measure_standin(model: nn.Module, width: int, height: int, batch: int = 2,
                    text_tokens: int = SD3_TEXT_TOKENS) -> int:  # fmt: skip
    """The stand-in's peak of live tensors in one forward (memslice's joint attention, ample room)."""
    dtype = next(model.parameters()).dtype
    route(model, make_joint_attention("auto", BasicHost(AMPLE)))
    given = standin_inputs(width, height, batch, text_tokens, dtype=dtype)
    tracker = PeakTracker()
    cast = cuda_autocast_on_cpu(model, dtype) if dtype != torch.float32 else contextlib.nullcontext()
    with torch.no_grad(), cast, tracker:
        out = model(**given, return_dict=False)
        del out
    return int(tracker.peak)


# --- fitting and validating ------------------------------------------------------------------------------------

FIT_HEADS = (2, 3, 4)
#: (width, height, text tokens): two image sizes and two prompt lengths, enough for image, text and fixed terms
FIT_CASES = ((256, 256, SD3_TEXT_TOKENS), (512, 384, SD3_TEXT_TOKENS), (512, 384, 2 * SD3_TEXT_TOKENS))
VALIDATION = ((384, 640, SD3_TEXT_TOKENS), (640, 512, 3 * SD3_TEXT_TOKENS), (1024, 1024, SD3_TEXT_TOKENS))
VALIDATION_HEADS = 5
FIT_DTYPES = {4: torch.float32, 2: torch.bfloat16}


def _solve(ms: Sequence[Measurement], value: Callable[[Measurement], int]) -> JointLinear:
    """``bytes / unit = per_image_token x image + per_text_token x text + fixed`` through the three fit cases."""
    a, b, c = ms
    per_image = (value(b) / b.unit - value(a) / a.unit) / (b.image_tokens - a.image_tokens)
    per_text = (value(c) / c.unit - value(b) / b.unit) / (c.text_tokens - b.text_tokens)
    fixed = value(a) / a.unit - per_image * a.image_tokens - per_text * a.text_tokens
    return JointLinear(per_image, per_text, fixed)


def fit(ms: Sequence[Measurement]) -> MmditModel:
    """The coefficients per width through the fit cases; stored: the largest over the widths, rounded up."""
    found: dict[str, list[JointLinear]] = {"peak": [], "live": []}
    for hidden in sorted({m.hidden for m in ms}):
        at = [m for m in ms if m.hidden == hidden]
        found["peak"].append(_solve(at, lambda m: m.peak_bytes))
        found["live"].append(_solve(at, lambda m: m.live_bytes))

    def upper(lines: list[JointLinear]) -> JointLinear:
        return JointLinear(_round_up(max(x.per_image_token for x in lines)),
                           _round_up(max(x.per_text_token for x in lines)),
                           _round_up(max(0.0, *(x.fixed for x in lines))))  # fmt: skip

    return MmditModel(upper(found["peak"]), upper(found["live"]))


def predicted(model: MmditModel, m: Measurement) -> int:
    """The pass's peak as the job planner combines it: the activations, or what is live at the joint calls plus
    their largest transient."""
    args = (m.image_tokens, m.text_tokens, m.batch, m.hidden, m.element_size)
    return activations.pass_peak_bytes(model.peak.bytes(*args), m.attention_peaks, {JOINT: model.live.bytes(*args)})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m memslice_tools.sd3_standin", description=__doc__.split("\n")[0])
    parser.add_argument("--webui-dir", default=os.environ.get("WEBUI_DIR", ""),
                        help="a webui 1.10.1 checkout (default: $WEBUI_DIR)")  # fmt: skip
    parser.add_argument("--validate-only", action="store_true", help="check lib_memslice/activations.py's model")
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.webui_dir, "modules", "models", "sd3", "mmdit.py")):
        print("no webui 1.10.1 checkout: pass --webui-dir (or set WEBUI_DIR)")
        return 2
    torch.set_num_threads(min(2, torch.get_num_threads()))
    mmdit, _ = load_webui_sd3(args.webui_dir)
    start = time.perf_counter()
    models: dict[int, MmditModel] = {}
    for element, dtype in FIT_DTYPES.items():
        if args.validate_only:
            models[element] = activations.MMDIT[element]
            continue
        ms = []
        for heads in FIT_HEADS:
            model = build_mmdit(mmdit, heads, dtype=dtype)
            for w, h, text in FIT_CASES:
                m = measure(mmdit, model, w, h, text_tokens=text)
                ms.append(m)
                print(f"fit   {str(dtype)[6:]:<8} hidden {m.hidden:4} {w}x{h} text {text}: peak "
                      f"{m.peak_bytes / m.unit:8.2f} live {m.live_bytes / m.unit:8.2f} bytes/unit")  # fmt: skip
        models[element] = fit(ms)
        print(f"  -> {models[element]}")
    worst = 1.0
    print(f"\n{'dtype':<8} {'hidden':>6} {'size':>9} {'text':>4} {'regime':<6} {'measured MiB':>12} "
          f"{'predicted MiB':>13} {'ratio':>6} {'diffusers MiB':>13}")  # fmt: skip
    for element, dtype in FIT_DTYPES.items():
        model = build_mmdit(mmdit, VALIDATION_HEADS, dtype=dtype)
        standin = build_standin(VALIDATION_HEADS, patches=64, dtype=dtype) if has_sd3() else None
        for w, h, text in VALIDATION:
            other = measure_standin(standin, w, h, text_tokens=text) / MiB if standin is not None else float("nan")
            for regime, settings in (("ample", AMPLE), ("einsum", EINSUM)):
                m = measure(mmdit, model, w, h, text_tokens=text, settings=settings)
                guess = predicted(models[element], m)
                worst = max(worst, abs(guess / m.peak_bytes - 1) + 1)
                print(f"{str(dtype)[6:]:<8} {m.hidden:>6} {f'{w}x{h}':>9} {text:>4} {regime:<6} "
                      f"{m.peak_bytes / MiB:12.2f} {guess / MiB:13.2f} {guess / m.peak_bytes:6.3f} "
                      f"{other:13.2f}")  # fmt: skip
    print("\nMMDIT: dict[int, MmditModel] = {")
    for element, model in models.items():
        print(f"    {element}: MmditModel({model.peak!r}, {model.live!r}),")
    print("}")
    print(f"\n{time.perf_counter() - start:.0f} s; worst deviation {100 * (worst - 1):.1f} %")
    return 0 if worst <= 1.15 else 1


if __name__ == "__main__":
    sys.exit(main())
