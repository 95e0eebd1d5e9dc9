"""The benchmark's report: markdown (targets first, the no-fused regime before the fused one), JSON, a plot."""

from __future__ import annotations

import json
import os
from typing import Any

from lib_memslice.costs import format_bytes

from . import parity as parity_mod
from . import vae_bench

STATUS_PASS, STATUS_FAIL, STATUS_NA = "PASS", "FAIL", "N/A"


def _margin(t: dict[str, Any]) -> str:
    """How close a target came to failing: the measured value against its threshold."""
    n = t["numbers"]
    worst, threshold = n.get("worst"), n.get("threshold")
    if not isinstance(worst, (int, float)) or not threshold:
        return "-"
    return f"{worst:.4g} vs <= {threshold:.4g}"


def targets_lines(targets: list[dict[str, Any]]) -> list[str]:
    """One row per target; where a target judges each case against its own threshold, the column is the case
    closest to failing, and the detail says why any threshold was restated (out of reach by any method there)."""
    lines = ["| target | result | closest case vs its threshold | detail |", "| --- | --- | --- | --- |"]
    for t in targets:
        lines.append(f"| {t['title']} | **{t['status']}** | {_margin(t)} | {t['detail']} |")
    return lines


def _ms(row: dict[str, Any]) -> str:
    if row.get("median_ms") is None:
        return "-"
    return f"{row['median_ms']:.1f} ({row['min_ms']:.0f}-{row['max_ms']:.0f})"


def _results_table(regime: dict[str, Any]) -> list[str]:
    budget = regime["budget_bytes"]
    lines = [
        "| contender | time ms, median (min-max) | vs fused kernel | memslice-auto / this | peak | "
        "within budget | slices | max abs err | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in regime["results"]:
        peak = r.get("measured_peak_bytes")
        within = "-" if budget is None or peak is None else ("yes" if peak <= budget else "**no**")
        ratio = r.get("memslice_auto_vs_this")
        vs_fused = r.get("vs_fused")
        note = r.get("message", "") if r.get("status") != "ok" else (r.get("kernel_used") or "")
        err = r.get("max_abs_error")
        lines.append(
            f"| {r['contender']} | {_ms(r)} | {'-' if vs_fused is None else f'{vs_fused:.2f}x'} | "
            f"{'-' if ratio is None else f'{ratio:.2f}x'} | {'-' if peak is None else format_bytes(peak)} | {within} "
            f"| {r.get('slices', '-')} | {'-' if err is None else f'{err:.1e}'} | {note} |"
        )
    return lines


def markdown(report: dict[str, Any]) -> str:
    m = report["meta"]
    other = m.get("other_processes_share")
    lines = [
        "# memslice benchmark",
        "",
        f"`{m['command']}` ({m['mode']} mode{': ' + m['mode_note'] if m['mode_note'] else ''}), {m['date']}, "
        f"{m['wall_s']:.0f} s",
        "",
        f"{m['cpu']}; torch {m['torch']}, {m['threads']} threads, {m['allocator']}, Python {m['python']}; "
        f"webui contenders: {m['webui']}"
        + (f"; other processes took {100 * other:.0f} % of the machine during the run" if other is not None else ""),
        "",
        "## Targets",
        "",
        *targets_lines(report["targets"]),
        "",
    ]
    lines += speed_lines(report.get("speed"))
    for fused in (False, True):
        lines += [
            f"## {'Fused kernel allowed' if fused else 'No fused kernel (MPS, DirectML, ROCm without fused)'}: "
            "every contender's memory at 512 px",
            "",
        ]
        for case in report["cases"]:
            for regime in case["regimes"]:
                if regime["fused"] != fused:
                    continue
                lines += [f"### {case['label']}, {regime['name']}", "", *_results_table(regime), ""]
    lines += [
        "## Largest square size under a fixed free memory (whole call: q, k, v, output, working memory)",
        "",
        "Traced on meta tensors, the fused kernel's allocations modelled from measurements (see "
        "`memslice_tools/largest.py`); each contender is told the memory left after q, k, v.",
        "",
        "| site | free memory | regime | " + " | ".join(_limit_names(report)) + " | inputs + output alone |",
        "| --- | --- | --- | " + " | ".join("---:" for _ in _limit_names(report)) + " | ---: |",
    ]
    for row in report.get("limits", []):
        cells = [str(row["contenders"].get(n, {}).get("largest_side", "-")) for n in _limit_names(report)]
        lines.append(
            f"| {row['site']} | {format_bytes(row['free_bytes'])} | {row['regime']} | {' | '.join(cells)} | "
            f"{row['physical_limit']} |"
        )
    o = report.get("overhead")
    if o:
        lines += ["", f"Per-call overhead on the fast path: {o['per_call_us']:.2f} us (fastest batch "
                  f"{o['min_us']:.2f} us)."]  # fmt: skip
    lines += [
        "",
        *parity_mod.markdown_lines(report.get("parity")),
        *vae_bench.markdown_lines(report.get("vae")),
        "## Contenders",
        "",
        "| name | what it is | what it does with the free-memory number |",
        "| --- | --- | --- |",
    ]
    for c in report["contenders"]:
        lines.append(f"| {c['name']} | {c['label']} | {c['free_rule']} |")
    return "\n".join(lines) + "\n"


def _where(case: dict[str, Any]) -> str:
    if case.get("model") == "sd3":
        return f"SD3 {case['pixels']} px joint attention"
    site = "UNet level 0" if case["site"].startswith("unet") else "VAE mid block"
    return f"SD1.5 {case['pixels']} px {site}"


def _free(free: str) -> str:
    n = int(free)
    return f"{n >> 30} GiB" if n >= 1 << 30 else f"{n >> 20} MiB"


def speed_lines(speed: dict[str, Any] | None) -> list[str]:
    """The no-fused speed section: one row per case, thread count, dtype and free number."""
    if not speed:
        return []
    lines = [
        "## No fused kernel: speed (MPS, DirectML, ROCm without fused attention, masks, upcast)",
        "",
        "SDPA limited to its math path, as on those backends; the fused kernel (backends on) is the limit. Wall ms,"
        " medians of interleaved rounds; ratios are medians of per-round ratios; `steady` is a contender's slowest"
        " round over its fastest; `others` the largest share of the machine other processes took during one of its"
        " calls.",
        "",
        "`floor` is memslice's plan reduced to the torch ops its kernel cannot do without (score GEMM, the passes "
        "over the scores, value GEMM), timed in the same rounds, over the fused kernel's time.",
        "",
        "| case | threads | dtype | free | memslice-auto: ms, plan | fused ms | fastest built-in keeping it: ms "
        "| memslice / fused | floor / fused | memslice / built-in | steady (memslice / fused) | others |",
        "| --- | ---: | --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for group, title in ((speed.get("cases", []), ""), (speed.get("contended", []), " (one core busy)")):
        for case in group:
            entries = case["entries"]
            fused = entries[0]
            for free, row in case["by_free"].items():
                mine = next(e for e in entries if e["name"] == "memslice-auto" and int(free) in e["frees"])
                best = next((e for e in entries if e["name"] == row["best_builtin"] and int(free) in e["frees"]),
                            None)  # fmt: skip
                others = max(max(e["others_share"]) for e in entries)
                lines.append(
                    f"| {_where(case)}{title} | {case['threads']} | {case['dtype']} | {_free(free)} | "
                    f"{mine['median_ms']:.0f}, {mine['plan']} | {fused['median_ms']:.0f} | "
                    + (f"{best['name']} {best['median_ms']:.0f}" if best else "none keeps it")
                    + f" | {row['vs_fused']:.3f}x | "
                    + (f"{row['floor_vs_fused']:.3f}x" if row.get("floor_vs_fused") is not None else "-")
                    + " | "
                    + (f"{row['vs_best_builtin']:.3f}x" if row["vs_best_builtin"] is not None else "-")
                    + f" | {mine['steadiness']:.2f} / {fused['steadiness']:.2f} | {100 * others:.0f} % |"
                )
    if speed.get("sweeps"):
        lines += ["", "Slice-size sweep (memslice-auto's einsum kernel, 2 threads; ms per call by score buffer per "
                  "worker):", ""]  # fmt: skip
        for s in speed["sweeps"]:
            sizes = ", ".join(f"{mib} MiB {ms:.0f}" for mib, ms in s["median_ms"].items())
            lines.append(f"- {_where(s)} {s.get('dtype', 'float32')}: {sizes}; the rule ({s['rule']}) "
                         f"{s['rule_ms']:.0f}, {s['rule_vs_best']:.3f}x the best")  # fmt: skip
    if speed.get("profiles"):
        lines += ["", "Where the einsum kernel's time goes (one thread, one slice of its plan, each op alone, best of "
                  "5; the fused kernel on the same slice):", ""]  # fmt: skip
        for p in speed["profiles"]:
            parts = ", ".join(f"{k} {v:.2f} ms" for k, v in p["parts_ms"].items())
            lines.append(f"- {_where(p)} {p['dtype']}, slice {p['slice']}: {parts}; total {p['total_ms']:.2f} ms, "
                         f"fused {p['fused_ms']:.2f} ms ({p['vs_fused']:.2f}x)")  # fmt: skip
    if speed.get("skipped"):
        lines += ["", f"Not run: {'; '.join(speed['skipped'])}."]
    return [*lines, ""]


def _limit_names(report: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for row in report.get("limits", []):
        for n in row["contenders"]:
            if n not in names:
                names.append(n)
    return names


def plot(report: dict[str, Any], path: str) -> str | None:
    """Times of the no-fused regime per contender and case (matplotlib, if present)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    series: dict[str, list[float]] = {}
    labels = []
    for case in report["cases"]:
        for regime in case["regimes"]:
            if regime["fused"] or regime["budget_bytes"] is None or "tight" in regime["name"]:
                continue
            labels.append(f"{case['key']}\n{regime['name'].split(', ')[-1]}")
            for r in regime["results"]:
                series.setdefault(r["contender"], [])
            for name, values in series.items():
                row = next((r for r in regime["results"] if r["contender"] == name), None)
                values.append(row["median_ms"] if row and row.get("median_ms") else float("nan"))
    if not labels:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(labels)), 4))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        values = values + [float("nan")] * (len(labels) - len(values))
        ax.bar([x + i * width for x in range(len(labels))], values, width, label=name)
    ax.set_xticks([x + 0.4 for x in range(len(labels))])
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("ms (median)")
    ax.set_title("no fused kernel: time per attention call")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(report: dict[str, Any], out: str) -> dict[str, str]:
    os.makedirs(out, exist_ok=True)
    paths = {"markdown": os.path.join(out, "bench-report.md"), "json": os.path.join(out, "bench-report.json")}
    with open(paths["markdown"], "w") as f:
        f.write(markdown(report))
    with open(paths["json"], "w") as f:
        json.dump(report, f, indent=1, default=str)
    drawn = plot(report, os.path.join(out, "bench-plot.png"))
    if drawn:
        paths["plot"] = drawn
    return paths
