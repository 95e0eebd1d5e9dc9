"""The bench's VAE section (memslice_tools/vae_bench.py): the banded decode timed against the untiled one, its memory
traced against the prediction, the overlap-blend tiler's error beside memslice's, a heat map; targets that fail."""

from __future__ import annotations

import json

import torch

from memslice_tools import vae_bench
from memslice_tools.run import main


def test_the_full_plan_is_the_issues():
    """1024x1024, the SD width, fp32 and bf16, 1 and 2 threads; the tiler's tiles 64 latent px overlapping by 16."""
    plan = vae_bench.FULL
    assert (plan.side, plan.ch, plan.threads) == (1024, 128, (1, 2))
    assert plan.dtypes == (torch.float32, torch.bfloat16) and plan.rounds >= 2
    assert (plan.tile, plan.overlap) == (64, 16) and vae_bench.RATIO == 1.15


def test_the_section_runs_alone_and_writes_its_report_and_heat_map(tmp_path):
    """``bench --vae``: the section alone (three targets), its heat map where asked, ldm's Decoder untouched."""
    from ldm.modules.diffusionmodules.model import Decoder

    before = Decoder.forward
    heatmap = tmp_path / "map.png"
    assert main(["--vae", "--smoke", "--out", str(tmp_path), "--heatmap", str(heatmap)]) == 0
    assert Decoder.forward is before
    report = json.loads((tmp_path / "bench-report.json").read_text())
    assert [t["name"] for t in report["targets"]] == ["vae_speed", "vae_memory", "vae_error"]
    vae = report["vae"]
    (case,) = vae["time"]
    assert case["untiled_s"] > 0 and case["banded"]["2 bands"]["median_s"] > 0
    assert len(case["banded"]["2 bands"]["ratios"]) == vae_bench.SMOKE.rounds
    counts = [(r["dtype"], r["bands"]) for r in vae["memory"]]
    assert counts == [(d, n) for d in ("float32", "bfloat16") for n in (0, 1, 2, 4)]
    assert all(1.0 <= r["ratio"] <= 1 + vae_bench.MEMORY_SLACK for r in vae["memory"])
    error = vae["error"]
    ours, tiler = error["methods"]["memslice, 2 bands"], error["methods"]["overlap-blend tiler"]
    assert ours["max"] < vae_bench.EXACT < tiler["max"] and ours["pixels_off_by_a_level"] == 0
    assert error["heatmap"] == str(heatmap) and heatmap.stat().st_size > 10_000
    statuses = {t["name"]: t["status"] for t in report["targets"]}
    assert statuses["vae_memory"] == statuses["vae_error"] == "PASS"
    text = (tmp_path / "bench-report.md").read_text()
    assert "## The VAE decode in exact bands" in text and "| overlap-blend tiler |" in text


def test_the_tiler_blends_to_the_untiled_result_where_the_decode_is_local():
    """Feathered weights over every layout sum to one: a decode that maps each latent pixel to its own 8x8 block
    comes out of the tiler exactly; one with a per-call statistic (GroupNorm's) does not, at the tiles' seams."""
    z = torch.randn(1, 4, 40, 24)

    def local(t):
        return torch.nn.functional.interpolate(t[:, :3], scale_factor=8, mode="nearest")

    def normed(t):
        return local(t - t.mean())

    assert torch.allclose(vae_bench.overlap_blend_decode(local, z, 16, 4), local(z), atol=1e-6)
    assert (vae_bench.overlap_blend_decode(normed, z, 16, 4) - normed(z)).abs().max() > 1e-3
    starts, length = vae_bench._starts(40, 16, 4)
    assert starts == [0, 12, 24] and length == 16  # every tile - overlap, the last flush with the edge
    assert vae_bench._starts(8, 16, 4) == ([0], 8)


def test_the_targets_fail_when_their_numbers_do():
    ok = {"time": [{"side": 1024, "dtype": "float32", "threads": 2, "untiled_s": 10.0,
                    "banded": {"8 bands": {"median_s": 11.0, "ratio": 1.1, "ratios": [1.1]}}}],
          "memory": [{"dtype": "float32", "bands": 8, "measured_bytes": 100, "predicted_bytes": 101, "ratio": 1.01}],
          "error": {"untiled_s": 1.0, "tiler_s": 6.0, "methods": {
              "memslice, 8 bands": {"max": 0.01, "mean": 0.001, "pixels_off_by_a_level": 0.0},
              "overlap-blend tiler": {"max": 9.0, "mean": 1.0, "pixels_off_by_a_level": 0.3}}}}  # fmt: skip
    assert [t["status"] for t in vae_bench.judge(ok)] == ["PASS", "PASS", "PASS"]
    slow = json.loads(json.dumps(ok))
    slow["time"][0]["banded"]["8 bands"]["ratio"] = 1.2
    assert vae_bench.judge(slow)[0]["status"] == "FAIL" and "1.200x" in vae_bench.judge(slow)[0]["detail"]
    under = json.loads(json.dumps(ok))
    under["memory"][0]["ratio"] = 0.99  # the prediction below the traced peak
    assert vae_bench.judge(under)[1]["status"] == "FAIL"
    over = json.loads(json.dumps(ok))
    over["memory"][0]["ratio"] = 1.2
    assert vae_bench.judge(over)[1]["status"] == "FAIL"
    wrong = json.loads(json.dumps(ok))
    wrong["error"]["methods"]["memslice, 8 bands"]["max"] = 0.6
    assert vae_bench.judge(wrong)[2]["status"] == "FAIL"
    assert [t["status"] for t in vae_bench.judge(None)] == ["N/A"] * 3
