"""``make mutants``: deliberate breaks of the runtime, each of which the suite must catch.

For every mutant the project is copied to a temporary folder, one line of the runtime is changed there, and the
tests that guard it run; the mutant is caught when they fail. The run fails unless every mutant is caught and
every mutation still applies (a mutation whose text no longer exists is an error, not a pass). tests/README.md
lists them with the tests that catch them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the project root
    old: str  # replaced once; must occur exactly once
    new: str
    tests: tuple[str, ...]  # pytest node ids or files that must fail


MUTANTS = (
    Mutant("fused CPU scratch set to 0", "lib_memslice/workspace.py",
           "    return threads * total\n", "    return 0\n", ("tests/test_workspace.py",)),
    Mutant("fused CPU scratch halved", "lib_memslice/workspace.py",
           "    return threads * total\n", "    return threads * total // 2\n", ("tests/test_workspace.py",)),
    Mutant("einsum score buffer counted at half", "lib_memslice/costs.py",
           "    return s_c * ces + o_c * kernel.accumulator", "    return s_c * ces // 2 + o_c * kernel.accumulator",
           ("tests/test_kernels.py",)),
    Mutant("fused log-sum-exp term dropped", "lib_memslice/costs.py",
           "            + rows * queries_per_slice * LSE_BYTES\n", "", ("tests/test_kernels.py",)),
    Mutant("fused input-copy term dropped", "lib_memslice/costs.py",
           "            + copies * (q_c + kv_c) * ces\n", "", ("tests/test_kernels.py",)),
    Mutant("SDPA math path's float32 computation of half precision dropped", "lib_memslice/costs.py",
           "        mes = max(ces, 4)\n", "        mes = ces\n", ("tests/test_kernels.py",)),
    Mutant("ceil division of query slices becomes floor", "lib_memslice/slicing.py",
           "        query_slices=_ceil_div(sh.q_tokens, qps),", "        query_slices=sh.q_tokens // qps,",
           ("tests/test_slicing.py",)),
    Mutant("Metal's multiple-of-4096 rule removed", "lib_memslice/slicing.py",
           "            if queries_per_slice % MPS_BAD_MULTIPLE == 0 and queries_per_slice < s.q_tokens:\n"
           "                return False\n", "", ("tests/test_slicing.py",)),
    Mutant("Metal's 2^31-element limit removed", "lib_memslice/slicing.py",
           "            return biggest < MPS_MAX_ELEMENTS and biggest", "            return biggest",
           ("tests/test_slicing.py",)),
    Mutant("exact query search: Metal's one-step move forgotten", "lib_memslice/slicing.py",
           "            if hi % MPS_BAD_MULTIPLE == 0 and hi < nq:\n                hi -= 1\n", "",
           ("tests/test_slicing.py",)),
    Mutant("OOM retry does not double the slices", "lib_memslice/forwards.py",
           "    again = _plan_with(call, (plan.kernel,), planned.budget, plan.slices * 2)\n    if again is None:",
           "    again = _plan_with(call, (plan.kernel,), planned.budget, plan.slices)\n    if again is None:",
           ("tests/test_faults.py",)),
    Mutant("budget not divided by the safety factor", "lib_memslice/probe.py",
           "    return Budget(int(free.bytes / factor),", "    return Budget(int(free.bytes),",
           ("tests/test_probe.py",)),
    Mutant("a probe reading of 0 read as plenty", "lib_memslice/probe.py",
           '        return FreeMemory(0, f"{found.source} (nothing free)", found.trusted)',
           '        return _fallback(kind, "zero", "zero")', ("tests/test_probe.py",)),
    Mutant("CUDA's precise probe never asked", "lib_memslice/forwards.py",
           'and call.device_kind == "cuda" and not budget.fixed:',
           'and call.device_kind == "never" and not budget.fixed:', ("tests/test_probe.py",)),
    Mutant("hypernetwork context ignored", "lib_memslice/forwards.py",
           "        context_k, context_v = host.apply_hypernetworks(x if context is None else context)",
           "        context_k = context_v = x if context is None else context", ("tests/test_webui.py",)),
    Mutant("upcast ignored", "lib_memslice/forwards.py",
           "    compute_dtype = torch.float32 if upcast and dtype in _HALF else dtype",
           "    compute_dtype = dtype", ("tests/test_webui.py",)),
    Mutant("fully masked rows left to SDPA (NaN in half precision)", "lib_memslice/kernels.py",
           "        if mask is not None and mask.any_dead:", "        if False:", ("tests/test_kernels.py",)),
    Mutant("autocast left on inside the kernels", "lib_memslice/kernels.py",
           "    if _autocast_enabled(device_type):\n        return torch.autocast(device_type, enabled=False)",
           "    if False:\n        return torch.autocast(device_type, enabled=False)", ("tests/test_kernels.py",)),
    Mutant("cuBLAS allocation failures not read as out-of-memory", "lib_memslice/kernels.py",
           '    "cublas_status_alloc_failed",\n', "", ("tests/test_kernels.py",)),
    Mutant("fast path reuses plans with no headroom", "lib_memslice/forwards.py",
           "FAST_PATH_HEADROOM = 4", "FAST_PATH_HEADROOM = 0", ("tests/test_forwards.py",)),
    Mutant("fused OOM retried in a loop instead of once", "lib_memslice/forwards.py",
           '        if stage != "einsum-last" and call.settings.kernel == "auto":',
           '        if call.settings.kernel == "auto":', ("tests/test_faults.py",)),
    Mutant("an out-of-memory error outside attention not annotated", "lib_memslice/webui.py",
           "            annotate_oom(exc)\n", "", ("tests/test_webui.py",)),
)  # fmt: skip


def _copy(dest: str) -> None:
    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {".git", "bench-out", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis", "node_modules"}
        return {n for n in names if n in skip or n.startswith(".venv") or n in (".whl", ".gl")}

    shutil.copytree(ROOT, dest, ignore=ignore, symlinks=True)


def run(mutant: Mutant, python: str, timeout: int) -> tuple[str, float]:
    with tempfile.TemporaryDirectory(prefix="memslice-mutant-") as tmp:
        copy = os.path.join(tmp, "project")
        _copy(copy)
        path = os.path.join(copy, mutant.path)
        with open(path) as f:
            text = f.read()
        if text.count(mutant.old) != 1:
            return f"STALE (the text to change occurs {text.count(mutant.old)} times)", 0.0
        with open(path, "w") as f:
            f.write(text.replace(mutant.old, mutant.new))
        start = time.perf_counter()
        try:
            done = subprocess.run(
                [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests],
                cwd=copy,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return "caught (the tests hang)", time.perf_counter() - start
        took = time.perf_counter() - start
        if done.returncode == 0:
            return "SURVIVED", took
        if done.returncode not in (1,):  # 2+: collection or usage error: the tests did not judge the mutant
            return f"ERROR (pytest exit {done.returncode}: {done.stdout[-300:]})", took
        return "caught", took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="deliberate breaks the suite must catch")
    parser.add_argument("--python", default=sys.executable, help="the interpreter with the test dependencies")
    parser.add_argument("--only", default="", help="a substring of the mutants to run")
    parser.add_argument("--timeout", type=int, default=900)
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if args.only.lower() in m.name.lower()]
    failures = 0
    for i, mutant in enumerate(chosen, 1):
        verdict, took = run(mutant, args.python, args.timeout)
        failures += verdict != "caught" and not verdict.startswith("caught")
        print(f"[{i}/{len(chosen)}] {verdict:<9} {mutant.name}  ({' '.join(mutant.tests)}, {took:.0f} s)", flush=True)
    print(f"{len(chosen) - failures} of {len(chosen)} mutants caught")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
