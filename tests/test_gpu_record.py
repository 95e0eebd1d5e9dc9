"""Cost terms only a CUDA device shows, pinned against the recorded measurement (docs/gpu-check-*.md).

No CPU test can see these terms bind: SDPA's math path's input copies (x3) and boolean per score on CUDA, and the
einsum kernel's accelerator term (a possible contiguous temporary of a slice's output and the softmax's row
statistics: MPS, DirectML and CUDA without a fused kernel). A GPU check measured them; this test recomputes each
recorded case's prediction from today's cost model and requires the recorded prediction (which the measurement
never exceeded). Changing such a term therefore means measuring it again on a GPU (``make gpu-check``) and
recording the new report.
"""

from __future__ import annotations

import glob
import os
import re

import pytest
import torch

from lib_memslice import kernels
from lib_memslice.costs import GiB, KernelChoice, MiB
from lib_memslice.slicing import plan_attention

from .conftest import ROOT

RECORDS = sorted(glob.glob(os.path.join(ROOT, "docs", "gpu-check-*.md")))
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
ROW = re.compile(
    r"^\| (?P<kernel>einsum|math) \((?:-|math)\) \| (?P<dtype>\w+) \| (?P<d>\d+) \| "
    r"(?P<m1>[\d.]+) (?P<u1>\w+) / (?P<p1>[\d.]+) (?P<v1>\w+) \([\d.]+\) \| "
    r"(?P<slices>\d+): (?P<m2>[\d.]+) (?P<u2>\w+) / (?P<p2>[\d.]+) (?P<v2>\w+) \([\d.]+\) \|"
)
UNITS = {"MiB": MiB, "GiB": GiB, "KiB": 1024, "B": 1}


def recorded_rows() -> list[tuple[str, dict[str, str]]]:
    found = []
    for path in RECORDS:
        with open(path) as f:
            for line in f:
                match = ROW.match(line)
                if match:
                    found.append((os.path.basename(path), match.groupdict()))
    return found


ROWS = recorded_rows()


def test_a_gpu_record_is_there_to_pin_against():
    assert RECORDS and len(ROWS) >= 20, "docs/gpu-check-*.md: the recorded CUDA measurement is missing"


def _bytes(number: str, unit: str) -> float:
    return float(number) * UNITS[unit]


def _case(row: dict[str, str]):
    """The shape and kernel the GPU check ran (memslice_tools/gpu_check.kernel_memory): [B, H, N, d] q, k, v of
    4096 tokens, two items of eight heads, or one of one at the VAE's 512 dims."""
    from lib_memslice.costs import AttentionShape

    d, dtype = int(row["d"]), DTYPES[row["dtype"]]
    rows, heads = (1, 1) if d == 512 else (16, 8)
    size = torch.finfo(dtype).bits // 8
    shape = AttentionShape(rows, 4096, 4096, d, d, element_size=size, io_element_size=size, heads=heads)
    kernel = kernels.einsum_kernel("cuda", dtype) if row["kernel"] == "einsum" else KernelChoice("sdpa-math")
    return shape, kernel


@pytest.mark.parametrize(("record", "row"), ROWS, ids=[f"{r['kernel']}-{r['dtype']}-d{r['d']}" for _, r in ROWS])
def test_the_cuda_only_terms_predict_what_was_recorded(record, row):
    shape, kernel = _case(row)
    whole = plan_attention(shape, 1 << 50, kernel=kernel, slice_cap=65536, device_kind="cuda")
    forced = plan_attention(shape, max(1, int(whole.peak_bytes * 0.3)), kernel=kernel, slice_cap=65536,
                            device_kind="cuda")  # fmt: skip
    if forced is None or not forced.sliced:
        forced = plan_attention(shape, 1 << 50, kernel=kernel, slice_cap=65536, device_kind="cuda", min_slices=4)
    cases = ((whole, row["m1"], row["p1"], row["u1"], row["v1"]), (forced, row["m2"], row["p2"], row["u2"], row["v2"]))
    for plan, measured, predicted, m_unit, p_unit in cases:
        rounding = UNITS[p_unit] * 0.05 + 1
        assert abs(plan.peak_bytes - _bytes(predicted, p_unit)) <= rounding, (record, plan.slices, plan.peak_bytes)
        assert _bytes(measured, m_unit) <= plan.peak_bytes + UNITS[m_unit] * 0.05  # the record itself was safe
    assert forced.slices == int(row["slices"])


@pytest.mark.parametrize("backend", ["flash", "efficient"])
def test_an_upcast_fused_call_in_one_piece_holds_both_outputs_while_it_casts_back(backend):
    """The cast back to half precision after an upcast SDPA call in one piece (CUDA only: a CPU fused kernel
    refuses value dims unlike the head dims, where this binds) allocates the half output while the float32 output
    still lives; no measurement was recorded for it, so the prediction is held to that arithmetic."""
    from lib_memslice.costs import AttentionShape

    shape = AttentionShape(16, 4096, 77, 16, 128, element_size=4, io_element_size=2, heads=8)
    kernel = KernelChoice("fused", input_copies=1, backend=backend)
    plan = plan_attention(shape, 1 << 50, kernel=kernel, device_kind="cuda")
    wide, half = 16 * 4096 * 128 * 4, 16 * 4096 * 128 * 2
    assert plan.slices == 1 and plan.peak_bytes >= wide + half
