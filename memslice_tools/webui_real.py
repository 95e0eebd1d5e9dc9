"""REFERENCE ONLY: the webui's REAL attention functions, loaded read-only from a user's checkout.

Nothing of the webui is copied: :func:`from_webui` executes ``modules/sub_quadratic_attention.py`` and
``modules/sd_hijack_optimizations.py`` of the given directory with importlib, under stand-ins of our own for what
they import (``modules.shared`` with ``opts.upcast_attn=False`` and the sub-quadratic command-line defaults read from
that checkout's ``modules/cmd_args.py``, ``modules.devices``, ``modules.errors``, ``modules.hypernetworks``, and
``sgm`` where it is not importable; the real ``ldm`` is imported), then puts ``sys.modules`` back as it was.

Each contender drives the real forward through a tiny stand-in ``self`` whose ``to_q``/``to_k``/``to_v``/``to_out``
(and ``norm``/``q``/``k``/``v``/``proj_out`` for ``AttnBlock``) hand back the given tensors, so only the attention
core runs; the VAE forward gets a zero ``x`` so that its residual add leaves the attention output unchanged. Free
memory: the loaded module's ``get_available_vram`` (which sub-quadratic's threshold also reads) is replaced before
every call by one returning the caller's ``free_bytes``; InvokeAI's ``einsum_op`` is replaced by the real
``einsum_op_tensor_mem`` with the CPU rule (32 MiB) or the CUDA rule (``free_bytes / 3.3`` MiB, what
``einsum_op_cuda`` computes from its own probe). Calls patch module globals, so one loaded set of contenders is not
thread-safe.

``slices`` runs the real function on ``meta`` tensors (no memory, no arithmetic) and counts its chunk calls:
softmax calls (Doggettx, InvokeAI, V1), ``baddbmm`` calls (sub-quadratic), SDPA calls (sdp). The webui's MPS
branches cannot be reproduced off a Mac, so sub-quadratic's ``slices`` rejects ``device_type="mps"``.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import io
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from types import ModuleType, SimpleNamespace
from typing import Any, ClassVar

import torch
from torch.overrides import TorchFunctionMode

from .webui_attention import (
    FREE_RULES,
    FUNCTIONS,
    INVOKEAI_CPU_TENSOR_MB,
    SUBQUAD_KV_CHUNK,
    SUBQUAD_Q_CHUNK,
    SUBQUAD_THRESHOLD,
    WebuiContender,
    invokeai_cuda_tensor_mb,
)

Tensor = torch.Tensor
_MISSING = object()
DTYPES = {2: torch.float16, 4: torch.float32, 8: torch.float64}


# --- stand-ins for what the two files import -----------------------------------------------------------------


def _package(name: str) -> ModuleType:
    module = ModuleType(name)
    module.__path__ = []  # a package: submodules resolve through sys.modules only
    return module


def _without_autocast(disable: bool = False) -> Any:
    """``devices.without_autocast``: autocast off inside, unless ``disable`` or autocast is not on."""
    if torch.is_autocast_enabled() and not disable:
        return torch.autocast("cuda", enabled=False)
    return contextlib.nullcontext()


def _apply_hypernetworks(hypernetworks: list, context: Tensor, layer: Any = None) -> tuple[Tensor, Tensor]:
    """No hypernetworks loaded: the context goes to ``to_k`` and ``to_v`` unchanged."""
    return context, context


def _unoptimized_forward(self: Any, x: Tensor, context: Tensor | None = None, mask: Any = None, **kwargs: Any):
    raise NotImplementedError("stand-in: only referenced by SdOptimization.undo(), which the contenders never call")


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


def read_sub_quad_defaults(webui_dir: str) -> dict[str, Any]:
    """The ``--sub-quad-*`` defaults from the checkout's ``modules/cmd_args.py`` (parsed, not executed)."""
    found = {
        "sub_quad_q_chunk_size": SUBQUAD_Q_CHUNK,
        "sub_quad_kv_chunk_size": SUBQUAD_KV_CHUNK,
        "sub_quad_chunk_threshold": SUBQUAD_THRESHOLD,
    }
    path = os.path.join(webui_dir, "modules", "cmd_args.py")
    if not os.path.exists(path):
        return found
    with open(path, encoding="utf8") as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument" and node.args):
            continue
        flag = node.args[0]
        if not (isinstance(flag, ast.Constant) and isinstance(flag.value, str)):
            continue
        key = flag.value.lstrip("-").replace("-", "_")
        if key in found:
            default = [kw.value for kw in node.keywords if kw.arg == "default"]
            found[key] = ast.literal_eval(default[0]) if default else None
    return found


def _stand_ins(webui_dir: str) -> dict[str, ModuleType]:
    modules = _package("modules")
    shared = ModuleType("modules.shared")
    shared.opts = SimpleNamespace(upcast_attn=False)
    shared.cmd_opts = argparse.Namespace(
        xformers=False, force_enable_xformers=False, xformers_flash_attention=False, **read_sub_quad_defaults(webui_dir)
    )
    shared.loaded_hypernetworks = []
    shared.device = torch.device("cpu")  # only read by get_available_vram, which every call replaces
    shared.xformers_available = False
    errors = ModuleType("modules.errors")
    errors.report = errors.display = errors.display_once = _ignore
    devices = ModuleType("modules.devices")
    devices.without_autocast = _without_autocast
    hypernetworks = _package("modules.hypernetworks")
    hypernetwork = ModuleType("modules.hypernetworks.hypernetwork")
    hypernetwork.apply_hypernetworks = _apply_hypernetworks
    hypernetwork.attention_CrossAttention_forward = _unoptimized_forward
    hypernetworks.hypernetwork = hypernetwork
    for sub in (shared, errors, devices, hypernetworks):
        setattr(modules, sub.__name__.rsplit(".", 1)[1], sub)
    found = {m.__name__: m for m in (modules, shared, errors, devices, hypernetworks, hypernetwork)}
    try:
        importlib.import_module("sgm.modules.attention")
        importlib.import_module("sgm.modules.diffusionmodules.model")
    except ImportError:
        found.update(_sgm_stand_ins())
    return found


def _sgm_stand_ins() -> dict[str, ModuleType]:
    """Only ``CrossAttention.forward`` and ``AttnBlock.forward`` are read (at import, and by apply/undo)."""
    sgm, sgm_modules, diffusionmodules = (
        _package("sgm"),
        _package("sgm.modules"),
        _package("sgm.modules.diffusionmodules"),
    )
    attention, model = ModuleType("sgm.modules.attention"), ModuleType("sgm.modules.diffusionmodules.model")
    attention.CrossAttention = type("CrossAttention", (), {"forward": _unoptimized_forward})
    model.AttnBlock = type("AttnBlock", (), {"forward": _unoptimized_forward})
    sgm.modules, sgm_modules.attention, sgm_modules.diffusionmodules = sgm_modules, attention, diffusionmodules
    diffusionmodules.model = model
    return {m.__name__: m for m in (sgm, sgm_modules, diffusionmodules, attention, model)}


def _exec_file(name: str, path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_webui_attention(webui_dir: str) -> ModuleType:
    """Execute the checkout's ``sd_hijack_optimizations.py`` (and ``sub_quadratic_attention.py``) read-only;
    returns the loaded ``sd_hijack_optimizations`` module. ``sys.modules`` is restored afterwards."""
    files = {
        "modules.sub_quadratic_attention": os.path.join(webui_dir, "modules", "sub_quadratic_attention.py"),
        "modules.sd_hijack_optimizations": os.path.join(webui_dir, "modules", "sd_hijack_optimizations.py"),
    }
    for path in files.values():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"not a stable-diffusion-webui checkout: {path} is missing")
    with contextlib.redirect_stdout(io.StringIO()):  # sdkit's ldm prints a note about xformers on import
        importlib.import_module("ldm.util")
        importlib.import_module("ldm.modules.attention")
        importlib.import_module("ldm.modules.diffusionmodules.model")
    stand_ins = _stand_ins(webui_dir)
    saved = {name: sys.modules.get(name, _MISSING) for name in (*stand_ins, *files)}
    try:
        sys.modules.update(stand_ins)
        sub_quad = _exec_file("modules.sub_quadratic_attention", files["modules.sub_quadratic_attention"])
        stand_ins["modules"].sub_quadratic_attention = sub_quad
        return _exec_file("modules.sd_hijack_optimizations", files["modules.sd_hijack_optimizations"])
    finally:
        for name, module in saved.items():
            if module is _MISSING:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


# --- driving the real forwards -------------------------------------------------------------------------------


class _Returns:
    """A module stand-in that returns ``value`` when called with ``expect`` (and refuses anything else, so a
    contender cannot silently attend over the wrong tensor)."""

    __slots__ = ("expect", "value")

    def __init__(self, value: Any, expect: Any) -> None:
        self.value, self.expect = value, expect

    def __call__(self, x: Any) -> Any:
        if x is not self.expect:
            raise ValueError("webui stand-in called with an unexpected input")
        return self.value


def _identity(x: Tensor) -> Tensor:
    return x


class _Out(tuple):
    """``to_out``: indexable (``to_out[0]``), unpackable (``out_proj, dropout = to_out``) and callable."""

    def __call__(self, x: Tensor) -> Tensor:
        return x


_TO_OUT = _Out((_identity, _identity))


def _cross_self(q: Tensor, k: Tensor, v: Tensor, heads: int, scale: float) -> SimpleNamespace:
    return SimpleNamespace(
        heads=heads,
        scale=scale,
        training=False,
        to_q=_Returns(q, q),
        to_k=_Returns(k, k),
        to_v=_Returns(v, k),  # called with the context, which the forward received as k
        to_out=_TO_OUT,
    )


def _block_self(q: Tensor, k: Tensor, v: Tensor, x: Tensor) -> SimpleNamespace:
    normed = object()
    return SimpleNamespace(
        training=False,
        norm=_Returns(normed, x),
        q=_Returns(q, normed),
        k=_Returns(k, normed),
        v=_Returns(v, normed),
        proj_out=_identity,
    )


def run_cross(forward: Callable, q: Tensor, k: Tensor, v: Tensor, heads: int, scale: float) -> Tensor:
    """A real CrossAttention forward on projections ``[B, N, H*d]``: x = q, context = k."""
    return forward(_cross_self(q, k, v, heads, scale), q, context=k)


def run_block(forward: Callable, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """A real AttnBlock forward on conv outputs ``[b, c, h, w]``; x is zero so ``x + proj_out(out)`` is ``out``."""
    x = torch.zeros((), device=q.device, dtype=q.dtype).expand(q.shape)
    return forward(_block_self(q, k, v, x), x)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():  # sdp-no-mem's torch.backends.cuda.sdp_kernel is deprecated in newer torch
        warnings.simplefilter("ignore", FutureWarning)
        yield


class ChunkCounter(TorchFunctionMode):
    """Counts calls of one torch function (softmax, baddbmm or SDPA) made inside it: the chunks a forward ran."""

    KINDS: ClassVar[dict[str, tuple[Callable, ...]]] = {
        "softmax": (torch.Tensor.softmax, torch.nn.functional.softmax, torch.softmax),
        "baddbmm": (torch.baddbmm, torch.Tensor.baddbmm),
        "sdpa": (torch.nn.functional.scaled_dot_product_attention,),
    }

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.funcs = self.KINDS[kind]
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.funcs:
            self.count += 1
        return func(*args, **(kwargs or {}))


#: which torch call marks one chunk of each contender
CHUNK_KIND = {
    "sdp": "sdpa",
    "sdp-no-mem": "sdpa",
    "Doggettx": "softmax",
    "InvokeAI-cpu": "softmax",
    "InvokeAI-cuda": "softmax",
    "sub-quadratic": "baddbmm",
    "V1": "softmax",
}


def _meta_slices(name: str, contender_cross: Callable | None, contender_block: Callable | None) -> Callable:
    """``slices`` for a real contender: run it on meta tensors and count its chunk calls."""

    def slices(info: dict) -> int:
        block = bool(info["vae"])
        if block and contender_block is None:
            return 1  # the entry leaves AttnBlock stock: ldm's unsliced attention runs
        if name == "sub-quadratic" and info["device_type"] == "mps":
            raise ValueError("sub-quadratic's MPS threshold cannot be reproduced off a Mac")
        dtype = DTYPES[info["element_size"]]
        bh, nq, nk, d = info["batch_heads"], info["q_tokens"], info["k_tokens"], info["head_dim"]
        free = info["free_bytes"]
        with ChunkCounter(CHUNK_KIND[name]) as counter:
            if block:
                q, k, v = (torch.empty(bh, d, nq, 1, device="meta", dtype=dtype) for _ in range(3))
                contender_block(q, k, v, free)
            else:
                q = torch.empty(1, nq, bh * d, device="meta", dtype=dtype)
                k, v = (torch.empty(1, nk, bh * d, device="meta", dtype=dtype) for _ in range(2))
                contender_cross(q, k, v, bh, d**-0.5, free)
        return counter.count

    return slices


def from_webui(webui_dir: str) -> list[WebuiContender]:
    """The contenders of :func:`memslice_tools.webui_attention.reimplemented`, running the real functions."""
    mod = load_webui_attention(webui_dir)

    def with_free(free_bytes: int) -> None:
        mod.get_available_vram = lambda: free_bytes

    def invokeai_rule(max_tensor_mb: Callable[[int], float]) -> Callable[[int], None]:
        def route(free_bytes: int) -> None:
            mb = max_tensor_mb(free_bytes)
            mod.einsum_op = lambda q, k, v: mod.einsum_op_tensor_mem(q, k, v, mb)
            with_free(free_bytes)

        return route

    def cross(forward: Callable, prepare: Callable[[int], None] = with_free) -> Callable:
        def call(q: Tensor, k: Tensor, v: Tensor, heads: int, scale: float, free_bytes: int) -> Tensor:
            prepare(free_bytes)
            with _quiet():
                return run_cross(forward, q, k, v, heads, scale)

        return call

    def block(forward: Callable) -> Callable:
        def call(q: Tensor, k: Tensor, v: Tensor, free_bytes: int) -> Tensor:
            with_free(free_bytes)
            with _quiet():
                return run_block(forward, q, k, v)

        return call

    cpu_rule = invokeai_rule(lambda free: INVOKEAI_CPU_TENSOR_MB)
    cuda_rule = invokeai_rule(invokeai_cuda_tensor_mb)
    parts: dict[str, tuple[Callable, Callable | None]] = {
        "sdp": (cross(mod.scaled_dot_product_attention_forward), block(mod.sdp_attnblock_forward)),
        "sdp-no-mem": (
            cross(mod.scaled_dot_product_no_mem_attention_forward),
            block(mod.sdp_no_mem_attnblock_forward),
        ),
        "Doggettx": (cross(mod.split_cross_attention_forward), block(mod.cross_attention_attnblock_forward)),
        "InvokeAI-cpu": (cross(mod.split_cross_attention_forward_invokeAI, cpu_rule), None),
        "InvokeAI-cuda": (cross(mod.split_cross_attention_forward_invokeAI, cuda_rule), None),
        "sub-quadratic": (cross(mod.sub_quad_attention_forward), block(mod.sub_quad_attnblock_forward)),
        "V1": (cross(mod.split_cross_attention_forward_v1), None),
    }
    where = os.path.abspath(webui_dir)
    return [
        WebuiContender(
            name,
            f"webui (real): {FUNCTIONS[name]} from {where}",
            FREE_RULES[name],
            cross_fn,
            block_fn,
            _meta_slices(name, cross_fn, block_fn),
        )
        for name, (cross_fn, block_fn) in parts.items()
    ]
