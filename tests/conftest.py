"""Shared helpers: the fp64 reference attention, q/k/v laid out as the forwards lay them out, a quiet ldm import."""

from __future__ import annotations

import contextlib
import io
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(min(2, torch.get_num_threads()))

from memslice_tools.harness import torch_threads  # noqa: E402,F401  (the tests' and the tools' one; on sys.path now)


@pytest.fixture(autouse=True)
def _no_shared_reading_between_tests():
    """The same call's lane shares one recent free-memory reading between layers (``forwards._recent_free``): a
    reading one test took (a real probe, or its fake) must not answer the next test's."""
    from lib_memslice import forwards

    forwards._recent_free.clear()
    yield


# torch 2.1 (the webui's pin, `make test-webui-stack`) against the current torch (`make test`): decided by probing.
OOM_ERROR = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError  # torch.OutOfMemoryError: 2.2+


def _cpu_half_attention_error() -> str | None:
    """Why float16 attention cannot run on this torch's CPU (torch 2.1 has no Half matmul or softmax), or None."""
    x = torch.ones(1, 2, 2, dtype=torch.float16)
    try:
        torch.bmm(x, x).softmax(-1)
    except RuntimeError as exc:
        return str(exc)
    return None


CPU_HALF_ERROR = _cpu_half_attention_error()
CPU_HALF = CPU_HALF_ERROR is None
requires_cpu_half = pytest.mark.skipif(
    not CPU_HALF, reason=f"torch {torch.__version__} cannot run float16 attention on CPU: {CPU_HALF_ERROR}"
)


def sdpa_math_only():
    """A context that leaves ``scaled_dot_product_attention`` only its math backend, on CPU and CUDA alike:
    ``torch.nn.attention.sdpa_kernel`` where it exists (2.3+), else torch 2.1's ``torch.backends.cuda.sdp_kernel``,
    whose global switches the CPU backend choice reads too."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return torch.backends.cuda.sdp_kernel(enable_flash=False, enable_math=True, enable_mem_efficient=False)
    return sdpa_kernel([SDPBackend.MATH])


def import_ldm():
    """Import the real ldm modules (sdkit prints a note about xformers on import)."""
    with contextlib.redirect_stdout(io.StringIO()):
        import ldm.modules.attention as attention
        import ldm.modules.diffusionmodules.model as model
        import ldm.modules.diffusionmodules.openaimodel as openaimodel
    return attention, model, openaimodel


def reference(q, k, v, scale, bias=None):
    """Unsliced attention in float64: the ground truth every kernel is compared against."""
    s = torch.matmul(q.double() * scale, k.double().transpose(-1, -2))
    if bias is not None:
        s = s + bias.double()
    return torch.matmul(s.softmax(-1), v.double())


def projected_qkv(batch, heads, q_tokens, k_tokens, head_dim, dtype=torch.float32, seed=0, v_dim=None):
    """q/k/v as ``view(B, N, H, d).transpose(1, 2)`` of projections, the strides the forwards produce."""
    g = torch.Generator().manual_seed(seed)
    v_dim = v_dim or head_dim

    def make(n, d):
        return torch.randn(batch, n, heads * d, generator=g).to(dtype).view(batch, n, heads, d).transpose(1, 2)

    return make(q_tokens, head_dim), make(k_tokens, head_dim), make(k_tokens, v_dim)


@pytest.fixture
def ldm():
    return import_ldm()


@pytest.fixture
def webui():
    """The fake webui 1.10.1 with memslice loaded as an extension; torn down (forwards restored) afterwards."""
    from . import webui_env

    env = webui_env.start_webui()
    try:
        yield env
    finally:
        webui_env.stop_webui(env)
