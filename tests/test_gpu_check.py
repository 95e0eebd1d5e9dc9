"""The GPU validation kit: one line and exit 0 without CUDA; every section runs (as a CPU dry run) and reports."""

from __future__ import annotations

import json

import pytest
import torch

from memslice_tools import gpu_check
from memslice_tools.run import main as bench_main


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the check would run for real")
def test_without_cuda_it_says_so_in_one_line_and_exits_0(capsys, tmp_path):
    assert bench_main(["--gpu-check", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "no CUDA device" in out[0]
    assert not list(tmp_path.iterdir())


def test_every_section_runs_as_a_cpu_dry_run_and_writes_its_report(tmp_path):
    assert gpu_check.main(["--device", "cpu", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu-report.json").read_text())
    sections = ("kernel_memory", "oom_retry", "whole_job", "vae_bands", "sd3_joint", "no_fused", "pipeline",
                "max_square", "parity")  # fmt: skip
    for section in sections:
        assert section in report and "error" not in report[section], (section, report[section])
    km = report["kernel_memory"]
    assert km["checked"] > 0 and km["pass"] and km["max_ratio"] <= 1.0
    assert report["oom_retry"]["einsum"]["max_abs_error"] < 1e-4
    assert set(report["pipeline"]["contenders"]) == set(gpu_check.CONTENDERS)
    assert all("error" not in row for row in report["pipeline"]["contenders"].values())
    assert report["max_square"]["sites"]["vae.mid"]["memslice-auto"]["largest_side"] > 0
    job = report["whole_job"]
    assert {r["model"] for r in job["rows"]} == {"sd15", "sdxl"} and job["planned_sizes_ran"]
    assert all(r["planned_side"] > 0 and len(r["at"]["passes"]) == 2 for r in job["rows"])
    assert "# memslice GPU check" in (tmp_path / "gpu-report.md").read_text()
    assert "## 5. Whole jobs on emulated cards" in (tmp_path / "gpu-report.md").read_text()
    bands = report["vae_bands"]  # memslice's banded decoder forward under the card; the stock decode beside it
    assert [r["side"] for r in bands["rows"]] == [64, 128] and bands["pass"]
    assert all(not r["memslice"]["oom"] and not r["stock"]["oom"] for r in bands["rows"])
    big = bands["rows"][-1]["plan"]  # the dry run's 16 MiB card bands the 128 px decode: the plan that ran
    assert big["bands"] > 1 and big["predicted"] <= big["room"] < big["untiled"] and bands["max_ratio"] <= 1.0
    assert "## 6. The SD decoder in bands on an emulated card" in (tmp_path / "gpu-report.md").read_text()
    sd3 = report["sd3_joint"]  # SD3's joint calls, both regimes: memslice's kernel where no fused one runs
    assert [(r["tokens"], r["regime"]) for r in sd3["rows"]] == [(218, "fused"), (218, "math"), (410, "fused"),
                                                                 (410, "math")] and sd3["pass"]  # fmt: skip
    assert [r["memslice"]["kernel"] for r in sd3["rows"]] == ["fused", "einsum"] * 2
    assert all(r["memslice"]["max_abs_error"] < 1e-4 and "measured" in r["webui"] for r in sd3["rows"])
    assert "## 7. SD3's joint attention" in (tmp_path / "gpu-report.md").read_text()
    par = report["parity"]  # memslice's forward against the webui's sdp forward per call, its outputs bit-equal
    assert len(par["rows"]) == 2 and par["not_bit_equal"] == [] and "webui 1.10.1 captures no CUDA graph" in par[
        "cuda_graphs"]  # fmt: skip
    for r in par["rows"]:
        assert (
            r["webui_us"] > 0
            and r["webui_launch_us"] > 0
            and set(r["memslice"]) == {"memslice-auto", "memslice-doggettx"}
        )
        for m in r["memslice"].values():
            assert m["bit_equal"] and m["kernel"] == "fused" and m["ratio_iqr"][0] <= m["ratio"] <= m["ratio_iqr"][1]
    assert "## 8. Parity: memslice's forward vs the webui's sdp forward" in (tmp_path / "gpu-report.md").read_text()
