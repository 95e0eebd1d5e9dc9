"""The benchmark: a smoke run writes a complete report; its traced sizes match real runs; its targets can fail."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lib_memslice.costs import MiB
from memslice_tools import largest
from memslice_tools import parity as parity_mod
from memslice_tools import report as report_mod
from memslice_tools.contenders import all_contenders, make_case
from memslice_tools.run import judge_targets, main


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main(["--smoke", "--out", str(out)]) == 0
    return out, json.loads((out / "bench-report.json").read_text())


def test_a_smoke_run_writes_a_complete_report(smoke):
    out, report = smoke
    assert (out / "bench-report.md").read_text().startswith("# memslice benchmark")
    for key in ("meta", "contenders", "cases", "speed", "limits", "overhead", "parity", "vae", "targets"):
        assert key in report
    meta = report["meta"]
    assert meta["allocator"] and meta["torch"] == torch.__version__ and meta["threads"] >= 1
    regimes = {(r["fused"], r["budget_bytes"] is None) for case in report["cases"] for r in case["regimes"]}
    assert regimes == {(False, False), (True, False), (True, True)}  # no-fused budgets, fused budgets, fused ample
    names = {t["name"] for t in report["targets"]}
    assert names == {"no_fused_vs_best", "no_fused_vs_fused", "steady", "contended", "slice_size_rule",
                     "fused_vs_sdpa", "peak_within_budget", "largest_square_vs_physical", "parity",
                     "vae_speed", "vae_memory", "vae_error", "overhead"}  # fmt: skip
    assert all(t["status"] in ("PASS", "FAIL", "N/A") for t in report["targets"])
    speed = report["speed"]
    assert speed["cases"] and speed["contended"] and speed["sweeps"]
    for case in speed["cases"] + speed["contended"]:
        names = [e["name"] for e in case["entries"]]
        assert names[0] == "fused SDPA" and "memslice-auto" in names and len(names) >= 3  # built-ins keep it too
        for entry in case["entries"]:
            assert len(entry["wall_ms"]) == len(entry["cpu_ms"]) == len(entry["others_share"]) >= 2
            assert all(0 <= share <= 1 for share in entry["others_share"])
        for row in case["by_free"].values():
            assert row["vs_fused"] > 0 and row["memslice_plan"]
            if case in speed["cases"] and "einsum" in row["memslice_plan"]:  # the floor in the same rounds
                assert row["floor_vs_fused"] > 0 and row["vs_floor"] > 0 and row["floor_ms"] > 0, row
                assert "torch ops floor" in names
    assert "## No fused kernel: speed" in (out / "bench-report.md").read_text()


def test_every_result_is_measured_and_exact(smoke):
    _, report = smoke
    ran = 0
    for case in report["cases"]:
        for regime in case["regimes"]:
            for row in regime["results"]:
                if row.get("status") != "ok":
                    assert row.get("message"), row
                    continue
                ran += 1
                assert row["measured_peak_bytes"] > 0
                assert row["max_abs_error"] < 1e-4, row  # every contender computes the same attention
                if row["contender"].startswith(
                    "memslice-"
                ):  # the prediction bounds the measurement (in-op scratch too)
                    assert row["measured_peak_bytes"] <= row["predicted_peak_bytes"], row
                    if regime["budget_bytes"] is not None:
                        assert row["predicted_peak_bytes"] <= regime["budget_bytes"], row
    assert ran > 40


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("site", ["unet.level0.self", "vae.mid"])
def test_traced_peaks_match_real_runs(site, fused):
    """The largest-size search traces on meta tensors; here each contender's traced whole call is compared with a
    real CPU run's allocation events at the same size and free memory."""
    case = make_case("sd15", site, 128)
    for contender in all_contenders():
        if (case.site.vae and not contender.vae) or contender.name in ("sdp-no-mem", "sdpa"):
            continue
        for free in (64 * MiB, 8 * MiB):
            traced, real = largest.traced_vs_real(contender, case, free, fused)
            if traced is None:  # refused when traced: the real call must refuse too, or need more than free
                continue
            assert abs(traced - real) <= 64 * 1024 + 0.02 * real, (contender.name, free, traced, real)


def test_the_largest_square_size_is_a_boundary():
    case = make_case("sd15", "unet.level0.self", 512)
    contender = next(c for c in all_contenders() if c.name == "memslice-auto")
    found = largest.largest_square(contender, case, 64 * MiB, fused=False, hi=2048)
    side = found["largest_side"]
    assert side > 0 and found["peak_bytes"] <= 64 * MiB
    over = largest.whole_call_peak(contender, case, side + 64, 64 * MiB, False)
    assert over is None or over > 64 * MiB
    assert side <= largest.physical_limit(case, 64 * MiB)


def _report(rows_by_regime, limits_rows=(), overhead=3.0, speed=None):
    return {
        "cases": [
            {
                "key": "c",
                "regimes": [
                    {"name": name, "fused": fused, "budget_bytes": budget, "results": rows}
                    for name, fused, budget, rows in rows_by_regime
                ],
            }
        ],
        "speed": speed or {},
        "limits": list(limits_rows),
        "overhead": {"per_call_us": overhead, "min_us": overhead, "calls": 1},
    }


def _speed_case(vs_fused, vs_best, fused_vs_best=0.5, walls=(10.0, 11.0), floor_vs_fused=None,
                fused_walls=(8.0, 8.1), dtype="float32", site="unet.level0.self"):  # fmt: skip
    def entry(name, walls):
        return {"name": name, "plan": "p", "frees": [1 << 30], "wall_ms": list(walls), "median_ms": min(walls),
                "steadiness": max(walls) / min(walls), "others_share": [0.0] * len(walls)}  # fmt: skip

    row = {"vs_fused": vs_fused, "best_builtin": "Doggettx", "vs_best_builtin": vs_best, "memslice_plan": "p",
           "fused_vs_best_builtin": fused_vs_best, "floor_vs_fused": floor_vs_fused}  # fmt: skip
    entries = [entry("fused SDPA", fused_walls), entry("memslice-auto", walls), entry("Doggettx", (20.0, 20.0))]
    return {"site": site, "pixels": 512, "threads": 2, "dtype": dtype, "entries": entries,
            "by_free": {str(1 << 30): row}}  # fmt: skip


def test_targets_fail_when_their_numbers_do():
    budget = 100
    rows = [{"contender": "memslice-auto", "median_ms": 10, "vs_fused": 3.0, "measured_peak_bytes": 101,
             "status": "ok"}]  # fmt: skip
    fused = [{"contender": "memslice-auto", "median_ms": 1, "vs_fused": 1.05, "status": "ok"}]
    limit = {"site": "unet.level0.self", "free_bytes": 1 << 30, "regime": "fused", "physical_limit": 2000,
             "contenders": {"memslice-auto": {"largest_side": 1000}, "Doggettx": {"largest_side": 500}}}  # fmt: skip
    speed = {"cases": [_speed_case(1.25, 0.95, walls=(10.0, 14.0))], "contended": [_speed_case(1.1, 0.95)],
             "sweeps": [{"site": "unet.level0.self", "pixels": 512, "rule": "~4 MiB: 1x256", "best_mib": 8,
                         "rule_ms": 1.2, "rule_vs_best": 1.2, "median_ms": {8: 1.0, 16: 1.3}}]}  # fmt: skip
    report = _report([("no fused kernel, 100 B", False, budget, rows), ("fused, ample", True, None, fused)], [limit],
                     12.0, speed)  # fmt: skip
    targets = {t["name"]: t for t in judge_targets(report)}
    assert {name: t["status"] for name, t in targets.items()} == {
        "no_fused_vs_best": "FAIL", "no_fused_vs_fused": "FAIL", "steady": "FAIL", "contended": "FAIL",
        "slice_size_rule": "FAIL", "fused_vs_sdpa": "FAIL", "peak_within_budget": "FAIL",
        "largest_square_vs_physical": "FAIL", "overhead": "FAIL"}  # fmt: skip
    good = {"cases": [_speed_case(1.1, 0.5)], "contended": [_speed_case(1.1, 0.8)],
            "sweeps": [{"site": "vae.mid", "pixels": 512, "rule": "~4 MiB: 1x256", "best_mib": 16, "rule_ms": 1.0,
                        "rule_vs_best": 1.0, "median_ms": {16: 1.0}}]}  # fmt: skip
    passed = {t["name"]: t["status"] for t in judge_targets(_report([], [], 3.0, good))}
    for name in ("no_fused_vs_best", "no_fused_vs_fused", "steady", "contended", "slice_size_rule", "overhead"):
        assert passed[name] == "PASS", name


def _judge(*cases):
    speed = {"cases": list(cases), "contended": [], "sweeps": []}
    targets = judge_targets(_report([], [], 3.0, speed))
    return {t["name"]: t for t in targets}, "\n".join(report_mod.targets_lines(targets))


def test_where_the_fused_kernel_misses_0_9x_the_best_built_in_its_own_ratio_is_the_target():
    """The VAE in fp32: the fused kernel itself takes over 0.9x the best built-in, so no method reaches 0.9x there;
    the target is the fused kernel's own ratio, the report says why, and memslice slower than that still fails."""
    meets, lines = _judge(_speed_case(1.0, 0.935, fused_vs_best=0.94, site="vae.mid"))
    target = meets["no_fused_vs_best"]
    assert target["status"] == "PASS"
    assert target["numbers"]["cases"]["VAE 512 px 2t float32 1 GiB"]["threshold"] == 0.94
    assert target["numbers"]["restated"] == ["VAE 512 px 2t float32 1 GiB"]
    assert "the fused kernel itself took 0.940x Doggettx: its own ratio" in lines
    assert "closest to failing: VAE 512 px 2t float32 1 GiB Doggettx 0.935x of <= 0.940x (+0.5 % headroom" in lines
    regressed, lines = _judge(_speed_case(1.02, 0.96, fused_vs_best=0.94, site="vae.mid"))
    assert regressed["no_fused_vs_best"]["status"] == "FAIL"
    assert "over: VAE 512 px 2t float32 1 GiB Doggettx 0.960x > 0.940x" in lines
    # where the fused kernel is under 0.9x the built-in, 0.9x stands: memslice at 0.95x fails
    stated, _ = _judge(_speed_case(1.0, 0.95, fused_vs_best=0.85))
    assert stated["no_fused_vs_best"]["status"] == "FAIL" and stated["no_fused_vs_best"]["numbers"]["threshold"] == 0.9


def test_where_torchs_own_ops_are_slower_than_the_fused_kernel_the_target_is_stated_against_them():
    """bf16 on torch 2.13: the einsum kernel's unavoidable torch ops alone (measured in the same rounds) take
    1.07x the fused call, so 1.2x the fused kernel is out of reach; the target is 1.2x that floor, with the
    measured bound in the report, and a memslice that regresses past it fails."""
    meets, lines = _judge(_speed_case(1.25, 0.7, floor_vs_fused=1.07, dtype="bfloat16"))
    target = meets["no_fused_vs_fused"]
    assert target["status"] == "PASS"
    assert target["numbers"]["threshold"] == pytest.approx(1.2 * 1.07)
    assert "alone took 1.070x the fused call: 1.2x those" in lines
    assert "closest to failing: UNet L0 512 px 2t bfloat16 1 GiB 1.250x of <= 1.284x (+2.7 % headroom" in lines
    regressed, lines = _judge(_speed_case(1.35, 0.7, floor_vs_fused=1.07, dtype="bfloat16"))
    assert regressed["no_fused_vs_fused"]["status"] == "FAIL"
    assert "over: UNet L0 512 px 2t bfloat16 1 GiB 1.350x > 1.284x" in lines
    # a floor under the fused kernel's time leaves 1.2x the fused kernel as the target
    stated, _ = _judge(_speed_case(1.25, 0.7, floor_vs_fused=0.6))
    assert (
        stated["no_fused_vs_fused"]["status"] == "FAIL" and stated["no_fused_vs_fused"]["numbers"]["threshold"] == 1.2
    )


def test_steadiness_is_judged_against_the_fused_kernels_own_spread_in_the_same_case():
    """A noisy machine moves the fused kernel too (one torch call no contender has any part in): a contender's
    spread is judged against 1.3x the fused kernel's own; memslice unsteady on a steady machine fails."""
    noisy, lines = _judge(_speed_case(1.0, 0.7, walls=(10.0, 14.0), fused_walls=(8.0, 8.8)))
    assert noisy["steady"]["status"] == "PASS"
    assert noisy["steady"]["numbers"]["cases"]["unet.level0.self 512 px 2t float32 memslice-auto (p)"][
        "threshold"] == pytest.approx(1.3 * 1.1)  # fmt: skip
    assert "the fused kernel's own rounds in this case: 1.10" in lines
    steady, lines = _judge(_speed_case(1.0, 0.7, walls=(10.0, 14.0), fused_walls=(8.0, 8.08)))
    assert steady["steady"]["status"] == "FAIL"
    assert "over: unet.level0.self 512 px 2t float32 memslice-auto (p) 1.400 > 1.313" in lines


def test_every_judged_target_prints_how_close_it_came_to_failing():
    """Each target's row names its closest case against that case's own threshold, with the headroom."""
    targets, lines = _judge(_speed_case(1.1, 0.8, floor_vs_fused=0.9))
    for name in ("no_fused_vs_fused", "no_fused_vs_best", "steady"):
        assert targets[name]["status"] == "PASS" and "closest to failing:" in targets[name]["detail"], name
    assert "| 1.1 vs <= 1.2 |" in lines and "| 0.8 vs <= 0.9 |" in lines


def test_a_peak_check_that_cannot_fail_is_not_a_pass():
    """Every strategy must come within half of its budget somewhere, or the check proves nothing."""
    rows = [{"contender": "memslice-auto", "measured_peak_bytes": 10, "status": "ok"}]
    targets = {t["name"]: t for t in judge_targets(_report([("no fused kernel, 1000 B", False, 1000, rows)]))}
    assert targets["peak_within_budget"]["status"] == "FAIL"


@pytest.mark.skipif(not os.environ.get("WEBUI_DIR"), reason="WEBUI_DIR is not set: no webui checkout to load from")
def test_with_a_webui_checkout_its_real_functions_compete():
    found = {c.name: c for c in all_contenders(os.environ["WEBUI_DIR"])}
    assert found["Doggettx"].label.startswith("webui (real)")


def test_a_timed_call_the_heap_grew_under_is_run_again_and_counted(monkeypatch):
    """With glibc keeping freed memory, a call that takes more fresh pages than FRESH_PAGES_LIMIT measured the
    OS, not the computation: it runs again in its slot (at most twice) and the repeats are reported; a call that
    takes none is timed once, and with glibc's defaults (faults on every call by design) nothing is repeated."""
    import mmap

    from memslice_tools import speed

    def fresh() -> None:  # 80 MiB of fresh pages on every call, whatever malloc keeps
        pages = mmap.mmap(-1, 80 << 20)
        for offset in range(0, 80 << 20, mmap.PAGESIZE):
            pages[offset] = 1
        pages.close()

    monkeypatch.setattr(speed, "_keeps_freed_memory", True)
    grows = speed.Timed("grows", fresh, True, [0])
    grows.run_once()
    assert grows.repeats == 2 and len(grows.wall) == 1 and grows.faults[0] > speed.FRESH_PAGES_LIMIT
    assert grows.summary()["repeats"] == 2
    kept = torch.empty(1 << 20)
    steady = speed.Timed("steady", lambda: kept.fill_(1), True, [0])
    steady.run_once()
    assert steady.repeats == 0 and len(steady.wall) == 1
    monkeypatch.setattr(speed, "_keeps_freed_memory", False)
    defaults = speed.Timed("defaults", fresh, True, [0])
    defaults.run_once()
    assert defaults.repeats == 0 and len(defaults.wall) == 1


def test_a_round_runs_its_calls_back_to_back_and_keeps_per_call_numbers():
    from memslice_tools import speed

    made = []
    entry = speed.Timed("short", lambda: made.append(1), True, [0], calls=4)
    entry.run_once()
    entry.run_once()
    assert len(made) == 8 and len(entry.wall) == 2 and entry.summary()["calls_per_round"] == 4


# --- parity: memslice's forward against the webui's sdp forward on the real ldm modules -----------------------


def test_the_smoke_run_times_memslices_forward_against_the_webuis_sdp_forward(smoke):
    out, report = smoke
    parity = report["parity"]
    assert parity["webui"].startswith("re-implemented")  # no --webui: said so
    assert [c["case"] for c in parity["cases"]] == [case.label for case in parity_mod.SMOKE.cases]
    for c in parity["cases"]:
        assert c["rounds"] >= parity_mod.SMOKE.min_rounds and c["webui_us"] > 0
        assert c["ratio_applies"] is (c["webui_us"] >= parity_mod.SHORT_CALL_MS * 1e3)
        assert set(c["memslice"]) == {"memslice-auto", "memslice-doggettx"}
        for row in c["memslice"].values():
            assert row["kernel"] in ("fused", "einsum", "sdpa-math") and row["slices"] >= 1
            assert isinstance(row["bit_equal"], bool) and row["max_abs_diff"] < 1e-5
            assert row["ratio_iqr"][0] <= row["ratio"] <= row["ratio_iqr"][1] and row["ratio"] > 0
            assert row["overhead_iqr_us"][0] <= row["overhead_us"] <= row["overhead_iqr_us"][1]
            # the host work is the round less its computation: less than the whole call, as its ratio says
            assert 0 < row["host_us"] < row["us"] and row["host_ratio"] == pytest.approx(
                (c["webui_us"] + row["overhead_us"]) / c["webui_us"]
            )
            assert row["computation_ratio_iqr"][0] <= row["computation_ratio"] <= row["computation_ratio_iqr"][1]
        assert 0 < c["webui_host_us"] < c["webui_us"]
        profile = c["profile"]
        pieces = profile["us_per_call"]
        assert set(pieces) == {"the forward's own (layout) over sdp's", "options read", "record", "probe",
                               "the lane's own (memo key, checks, the SDPA call's glue)"}  # fmt: skip
        assert profile["over_webui_us"] == c["memslice"]["memslice-auto"]["overhead_us"]
        assert pieces["the lane's own (memo key, checks, the SDPA call's glue)"] == pytest.approx(
            profile["attend_us"] - pieces["options read"] - pieces["record"] - pieces["probe"]
        )
    target = next(t for t in report["targets"] if t["name"] == "parity")
    assert target["status"] in ("PASS", "FAIL", "N/A") and "webui sdp: re-implemented" in target["detail"]
    text = (out / "bench-report.md").read_text()
    assert "## Fused kernel, the real modules: memslice's forward vs the webui's sdp forward" in text
    assert "Where memslice-auto's host work goes" in text and "| memslice-doggettx |" in text


def test_the_parity_section_runs_alone_and_leaves_the_runtime_as_it_was(tmp_path):
    """``bench --parity`` writes a report of that section alone; its timers and knockouts are taken off again."""
    import torch.nn.functional as F

    from lib_memslice import forwards, probe

    before = (forwards.attend, F.linear, F.scaled_dot_product_attention, forwards.time, probe.free_memory)
    assert main(["--parity", "--smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench-report.json").read_text())
    assert [t["name"] for t in report["targets"]] == ["parity"] and len(report["parity"]["cases"]) == 2
    text = (tmp_path / "bench-report.md").read_text()
    assert "speed" not in report and "## Fused kernel, the real modules" in text
    warm = report["parity"]["warm"]  # the warm loop's host work, on the step's clock too: the real clock put back
    assert set(warm) == {"same_layer_us", "step_us", "sdpa_us"} and warm["sdpa_us"] > 0
    assert f"the same layer again {warm['same_layer_us']:.1f} us a call" in text
    after = (forwards.attend, F.linear, F.scaled_dot_product_attention, forwards.time, probe.free_memory)
    assert all(a is b for a, b in zip(before, after, strict=True))


def test_the_sd3_section_runs_alone_with_its_plan_and_judges_the_speed_targets(tmp_path, monkeypatch):
    """``bench --sd3`` runs the speed section on its own plan (SD3's joint case; the sweeps where the rule was
    chosen) and judges only the speed targets. The section is replaced by its recorded shape here: the real one
    takes minutes (docs/benchmarks.md)."""
    from memslice_tools import speed as speed_mod

    seen = []
    case = _speed_case(1.07, 0.8)
    case["model"] = "sd3"
    sweep = {"site": "mmdit.joint", "pixels": 1024, "model": "sd3", "dtype": "float32", "median_ms": {8: 1.0},
             "best_mib": 8, "rule": "~8 MiB: 1x493", "rule_ms": 1.0, "rule_vs_best": 1.0}  # fmt: skip
    monkeypatch.setattr(speed_mod, "section", lambda plan, *a: seen.append(plan) or {
        "cases": [case], "contended": [], "sweeps": [sweep], "profiles": [], "skipped": []})  # fmt: skip
    assert main(["--sd3", "--out", str(tmp_path)]) == 0
    assert seen == [speed_mod.SD3] and speed_mod.SD3.cases == (speed_mod.SD3_JOINT,)
    report = json.loads((tmp_path / "bench-report.json").read_text())
    assert {t["name"]: t["status"] for t in report["targets"]} == dict.fromkeys(
        ("no_fused_vs_fused", "no_fused_vs_best", "steady", "slice_size_rule"), "PASS"
    )
    assert "SD3 1024 px joint attention" in (tmp_path / "bench-report.md").read_text()


def test_the_bit_equality_column_sees_a_different_output():
    case = parity_mod.SMOKE.cases[1]
    plan = parity_mod.Plan((case,), (torch.float32,), (1,), 2, 2, 0.1, 0.0)

    def off_by_a_little(self, x, context=None, **kwargs):
        return parity_mod.reimplemented_sdp_forward(self, x, context) * (1 + 2**-20)

    found = parity_mod.measure(case, torch.float32, 1, plan, off_by_a_little, lambda _: None)
    for row in found["memslice"].values():
        assert row["bit_equal"] is False and 0 < row["max_abs_diff"] < 1e-3


def _parity(ratio, webui_us=5000.0, whole=None):
    """A parity section of one case: ``ratio`` its host-work ratio, ``whole`` the whole forward's (noisier)."""
    whole = ratio if whole is None else whole
    row = {"ratio": whole, "ratio_iqr": [whole, whole], "overhead_us": (ratio - 1) * webui_us, "host_ratio": ratio,
           "overhead_iqr_us": [0.0, 0.0], "bit_equal": True, "kernel": "fused", "slices": 1}  # fmt: skip
    return {"webui": "re-implemented", "cases": [{"case": "256 tokens self", "dtype": "float32", "threads": 2,
            "webui_us": webui_us, "ratio_applies": webui_us >= parity_mod.SHORT_CALL_MS * 1e3,
            "memslice": {"memslice-auto": row}}]}  # fmt: skip


def test_the_parity_target_fails_past_its_ratio_and_states_the_overhead_of_calls_too_short_for_one():
    assert parity_mod.judge(_parity(1.004))["status"] == "PASS"
    # the host work's ratio is judged; the whole forward's, which the host's noise moves by percents, is stated
    noisy = parity_mod.judge(_parity(1.004, whole=1.03))
    assert noisy["status"] == "PASS" and "the whole forward's ratios (noisier): median 1.0300x, 1 of 1 over" in noisy[
        "detail"]  # fmt: skip
    assert parity_mod.judge(_parity(1.01, whole=0.99))["status"] == "FAIL"
    regressed = parity_mod.judge(_parity(1.01))
    assert regressed["status"] == "FAIL" and "over: 256 tokens self float32 2t memslice-auto 1.0100x" in regressed[
        "detail"]  # fmt: skip
    assert "closest to failing: 256 tokens self float32 2t memslice-auto 1.0100x of <= 1.005x" in regressed["detail"]
    assert "| **FAIL** | 1.01 vs <= 1.005 |" in "\n".join(report_mod.targets_lines([regressed]))
    short = parity_mod.judge(_parity(1.2, webui_us=100.0))  # 20 us over a 0.1 ms call: no ratio judged, stated
    assert short["status"] == "N/A" and "memslice-auto +20.0 us" in short["detail"] and "0.10 ms call" in short[
        "detail"]  # fmt: skip


@pytest.mark.skipif(not os.environ.get("WEBUI_DIR"), reason="WEBUI_DIR is not set: no webui checkout to load from")
def test_the_parity_sections_webui_forward_is_the_real_one_with_a_checkout():
    forward, which = parity_mod.webui_forward(os.environ["WEBUI_DIR"])
    assert which.startswith("real: scaled_dot_product_attention_forward from")
    for case in parity_mod.SMOKE.cases:
        layer, x, ctx = parity_mod.build(case, torch.float32)
        with torch.no_grad():
            assert torch.equal(forward(layer, x, context=ctx), parity_mod.reimplemented_sdp_forward(layer, x, ctx))
