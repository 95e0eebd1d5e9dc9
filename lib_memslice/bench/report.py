"""The benchmark's outputs: ``bench-report.md`` for people, ``bench-report.json`` with every number, and
``bench-plot.png`` (time ratio to plain SDPA and measured peak, per case and regime)."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from ..costs import format_bytes

STATUS_PASS, STATUS_FAIL, STATUS_NA = "PASS", "FAIL", "N/A"


def _ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _bytes(x: int | None) -> str:
    return "-" if x is None else format_bytes(x)


def _err(x: float | None) -> str:
    return "-" if x is None else "0" if x == 0 else f"{x:.1e}"


def case_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown rows of one case and regime."""
    lines = [
        "| contender | median ms | min-max ms | runs | vs SDPA | vs Doggettx ref | measured peak | predicted peak "
        "| budget | steps | max abs err | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        notes = list(r.get("notes") or [])
        if r.get("kernel"):
            notes.insert(0, f"kernel {r['kernel']} ({r.get('head_chunk')} rows x {r.get('query_chunk')} queries)")
        if r.get("over_budget"):
            notes.insert(0, "**over budget**")
        if r["status"] != "ok":
            notes.insert(0, f"{r['status']}: {r.get('message', '')}")
        budget = r.get("budget_bytes")
        if budget is None and r.get("plan_budget_bytes") is not None:
            budget = r["plan_budget_bytes"]
        span = "-" if r.get("min_ms") is None else f"{_ms(r['min_ms'])}-{_ms(r['max_ms'])}"
        lines.append(
            f"| {r['contender']} | {_ms(r.get('median_ms'))} | {span} | {r.get('runs', '-')} "
            f"| {_ratio(r.get('ratio_sdpa'))} | {_ratio(r.get('ratio_doggettx_ref'))} "
            f"| {_bytes(r.get('measured_peak_bytes'))} | {_bytes(r.get('predicted_peak_bytes'))} "
            f"| {_bytes(budget) if r.get('budget_bytes') is not None else 'ample'} | {r.get('steps', '-')} "
            f"| {_err(r.get('max_abs_error'))} | {'; '.join(str(n) for n in notes).replace('|', '/')} |"
        )
    return lines


def contention_line(other: dict[str, Any] | None) -> str:
    if not other:
        return "- other processes: not measurable here"
    share = other["fraction_of_machine"] * 100
    warn = (
        " - **timings are noisy**: with few cores a busy neighbour stalls every multi-threaded kernel"
        if share > 5
        else ""
    )
    used = f"{other['other_cpu_s']:.1f} CPU-s during the run ({share:.0f} % of the machine)"
    return f"- other processes used {used}{warn}"


def targets_section(targets: list[dict[str, Any]]) -> list[str]:
    lines = ["## Targets", ""]
    for t in targets:
        lines.append(f"- **{t['status']}** {t['title']}: {t['detail']}")
    return [*lines, ""]


def markdown(report: dict[str, Any]) -> str:
    """The whole report as markdown."""
    meta = report["meta"]
    lines = [
        "# memslice side-by-side attention benchmark",
        "",
        f"- mode: {meta['mode']}" + (f" ({meta['mode_note']})" if meta.get("mode_note") else ""),
        f"- device: {meta['device']} ({meta['device_name']})",
        f"- torch {meta['torch']}, python {meta['python']}, {meta['threads']} threads, {meta['platform']}",
        f"- CPU allocator: {meta['allocator']}",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}`".replace("\n", " "),
        f"- wall time: {meta.get('wall_s', 0):.1f} s; load average at start {meta.get('loadavg_start')}, "
        f"at end {meta.get('loadavg_end')}",
        contention_line(meta.get("other_processes")),
        f"- timing: median of repeats after {meta['warmup']} warm-up run(s) (the first warm-up is the separate "
        f"peak-measurement run); {meta['repeats']} repeats, extended up to 20x for calls under "
        f"{meta['min_time_s']:g} s in total, cut to {meta['min_repeats']} once {meta['max_time_s']:g} s are spent; "
        f"plain SDPA and memslice-auto (ample) are timed in interleaved rounds, at least {meta['pair_min_repeats']} "
        f"and {meta['pair_min_time_s']:g} s",
        "- peak: bytes allocated during the call above what was live before it "
        + ("(torch.cuda.max_memory_allocated)" if meta["device"] == "cuda" else "(lib_memslice.memtrack.PeakTracker)"),
        "",
    ]
    lines += targets_section(report["targets"])
    lines += ["## Contenders", ""]
    for c in report["contenders"]:
        extra = "" if c["available"] else f" - **unavailable**: {c['reason']}"
        lines.append(f"- `{c['name']}`: {c['label']}{extra}")
    lines += [
        "",
        "Budget-blind contenders (plain SDPA, plain einsum, diffusers) run once per case; the budgeted tables repeat "
        "that measurement so their peak can be read against the budget. Work that is identical to an earlier run in "
        "the same case (the seed at the same step count, a memslice plan with the same kernel and chunks) reuses its "
        "timing; its own peak run still happens.",
        "",
        "## Attention cases",
        "",
    ]
    for case in report["cases"]:
        s = case["shape"]
        lines += [
            f"### {case['label']}",
            "",
            f"`{case['key']}`: batch x heads {s['batch']} x {s['heads']}, {s['q_tokens']} queries x {s['k_tokens']} "
            f"keys, head dim {s['head_dim']}; full score matrix {format_bytes(s['score_bytes'])}",
            "",
        ]
        for regime in case["regimes"]:
            title = regime["name"]
            if regime["budget_bytes"] is None:
                title += " (memslice budget 64 GiB; the seed is given the machine's available memory)"
            else:
                title += " budget (memslice fixed budget; the seed is given it as its free memory)"
            lines += [f"#### {title}", "", *case_table(regime["results"]), ""]
    if report.get("unet"):
        lines += unet_section(report["unet"])
    if report.get("cuda_pipeline"):
        lines += pipeline_section(report["cuda_pipeline"])
    lines += overhead_section(report)
    return "\n".join(lines) + "\n"


def unet_section(unet: dict[str, Any]) -> list[str]:
    note = (
        ""
        if unet["model_channels"] == 320
        else f" **model_channels {unet['model_channels']} instead of 320** (same attention token counts, "
        "smaller head dims, ~1 % of the parameters) to keep this mode fast."
    )
    lines = [
        "## Whole SD1.5 UNet forward",
        "",
        f"Real ldm `UNetModel`, SD1.5 config, random weights ({unet['parameters'] / 1e6:.1f} M parameters), "
        f"{unet['pixels']} px: x {unet['input']['x']}, context {unet['input']['context']}; each contender patched "
        f"into `CrossAttention.forward`; {_unet_method(unet)}.{note} "
        f"memslice: {unet['memslice_settings']}; the seed reads available memory on every call.",
        "",
        "| contender | median s | min-max s | vs SDPA | vs Doggettx ref | measured peak | max steps | max abs err "
        "vs SDPA | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in unet["results"]:
        ok = r["status"] == "ok"
        med = f"{r['median_ms'] / 1e3:.2f}" if ok else "-"
        span = f"{r['min_ms'] / 1e3:.2f}-{r['max_ms'] / 1e3:.2f}" if ok else "-"
        lines.append(
            f"| {r['contender']} | {med} | {span} | {_ratio(r.get('ratio_sdpa'))} "
            f"| {_ratio(r.get('ratio_doggettx_ref'))} | {_bytes(r.get('measured_peak_bytes'))} "
            f"| {r.get('max_steps', '-')} | {_err(r.get('max_abs_error'))} "
            f"| {r.get('notes', '') if ok else r['status'] + ': ' + r['message']} |"
        )
    return [*lines, ""]


def _unet_method(unet: dict[str, Any]) -> str:
    if not unet.get("timed_peak_run"):
        return f"1 warm-up (the peak run) + {unet['runs']} timed run(s)"
    overhead = unet.get("tracker_overhead")
    cost = "" if overhead is None else f" (the tracker's cost, measured on SDPA: {overhead * 100:+.0f} %)"
    return (
        f"one untracked SDPA forward ({unet['untracked_sdpa_s']:.2f} s) warms the model up, then each contender runs "
        f"**one** forward that is both its peak run and its timing{cost}"
    )


def pipeline_section(p: dict[str, Any]) -> list[str]:
    lines = [
        f"## CUDA: SD1.5 {p['dtype']} UNet forward + VAE decode",
        "",
        f"Peak allocated at {p['pixels']} px, and the largest square size (64 px steps) within "
        f"{format_bytes(p['budget_bytes'])}: {p['budget_note']}.",
        "",
        "| contender | UNet peak | VAE decode peak | UNet max px | VAE max px | stopped by |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in p["results"]:
        stop = f"UNet: {r.get('unet_stop', '')}; VAE: {r.get('vae_decode_stop', '')}".replace("|", "/")
        lines.append(
            f"| {r['contender']} | {_bytes(r.get('unet_peak_bytes'))} | {_bytes(r.get('vae_decode_peak_bytes'))} "
            f"| {r.get('unet_max_side', '-')} | {r.get('vae_decode_max_side', '-')} | {stop} |"
        )
    return [*lines, ""]


def overhead_section(report: dict[str, Any]) -> list[str]:
    o, p = report["overhead"], report["probe"]
    lines = [
        "## Planning overhead and probe cost",
        "",
        f"- per-call planning + probing: the real `forwards.attend` with the kernel stubbed out (settings, probe, "
        f"kernel choice, plan, stats record) at `{o['case']}`: median {o['per_call_us']:.1f} us (mean "
        f"{o['mean_us']:.1f} us over {o['iterations']} calls); attention ({o['attention_source']}) "
        f"{_ms(o['attention_ms'])} ms -> {(o.get('fraction') or 0) * 100:.3f} %",
    ]
    for name, d in p.items():
        lines.append(
            f"- `probe.free_memory({name!r})` ({d['source']}): median {d['median_us']:.1f} us, mean "
            f"{d['mean_us']:.1f} us over {d['calls']} calls"
        )
    return [*lines, ""]


def _clean(obj: Any) -> Any:
    """JSON-safe copy: tuples as lists, NaN/infinity as null, anything exotic as its string."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)


def write_json(report: dict[str, Any], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_clean(report), f, indent=1, allow_nan=False)
        f.write("\n")


def write_plot(report: dict[str, Any], path: str) -> str | None:
    """Grouped bars per case: time ratio to plain SDPA (top) and measured peak (bottom), one column per regime.

    Returns None, or why no plot was written (matplotlib missing).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FormatStrFormatter
    except Exception as exc:  # the report must not depend on the plot
        return f"matplotlib unavailable: {exc}"
    cases = report["cases"]
    regimes = [r["name"] for r in cases[0]["regimes"]] if cases else []
    names = [c["name"] for c in report["contenders"] if c["available"]]
    fig, axes = plt.subplots(2, max(1, len(regimes)), figsize=(6 * max(1, len(regimes)), 9), squeeze=False)
    width = 0.8 / max(1, len(names))
    colors = plt.get_cmap("tab10")
    for col, regime in enumerate(regimes):
        for row_index, (metric, ylabel) in enumerate(
            (("ratio_sdpa", "time / plain SDPA"), ("measured_peak_bytes", "measured peak (MiB)"))
        ):
            ax = axes[row_index][col]
            for i, name in enumerate(names):
                xs, ys = [], []
                for j, case in enumerate(cases):
                    rows = {r["contender"]: r for r in case["regimes"][col]["results"]}
                    value = rows.get(name, {}).get(metric)
                    if value is None or rows[name].get("status") != "ok":
                        continue
                    xs.append(j + (i - (len(names) - 1) / 2) * width)
                    ys.append(value / (1 << 20) if metric == "measured_peak_bytes" else value)
                ax.bar(xs, [max(y, 1e-3) for y in ys], width, label=name, color=colors(i % 10))
            budget = cases[0]["regimes"][col]["budget_bytes"] if cases else None
            if metric == "measured_peak_bytes" and budget:
                ax.axhline(budget / (1 << 20), color="red", linestyle="--", linewidth=1, label="budget")
            if metric == "ratio_sdpa":
                ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%g") if metric == "ratio_sdpa" else "")
            ax.tick_params(axis="y", which="minor", labelsize=6)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{regime}: {ylabel}")
            ax.set_xticks(range(len(cases)))
            ax.set_xticklabels([_short_case(c) for c in cases], rotation=40, ha="right", fontsize=7)
    if names:
        axes[0][0].legend(fontsize=7, ncol=2)
    meta = report["meta"]
    fig.suptitle(f"memslice bench ({meta['mode']}, {meta['device']}, {meta['allocator']}, torch {meta['torch']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _short_case(case: dict[str, Any]) -> str:
    site = case["site"].replace("unet.", "").replace(".mid", "")
    return f"{case['model']} {case['pixels']} {site} {case['dtype']}"


def write_all(report: dict[str, Any], out_dir: str) -> dict[str, str]:
    """Write the three files; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "markdown": os.path.join(out_dir, "bench-report.md"),
        "json": os.path.join(out_dir, "bench-report.json"),
        "plot": os.path.join(out_dir, "bench-plot.png"),
    }
    problem = write_plot(report, paths["plot"])
    if problem:
        report["meta"]["plot"] = problem
    write_json(report, paths["json"])
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write(markdown(report))
    return paths
