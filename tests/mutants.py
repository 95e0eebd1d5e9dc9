"""``make mutants``: deliberate breaks of the runtime, each of which the suite must catch.

For every mutant the project is copied to a temporary folder, one line of the runtime is changed there, and the
tests that guard it run; the mutant is caught when they fail. The run fails unless every mutant is caught and
every mutation still applies (a mutation whose text no longer exists is an error, not a pass). tests/README.md
lists them with the tests that catch them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
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


_BANDS = "tests/test_bands.py::"
_SD3_WEBUI = "tests/test_sd3_webui.py::"
_SD3_PLAN = "tests/test_sd3_plan.py::"
_BAND_PEAK = _BANDS + "test_the_predicted_peak_covers_the_measured_one_at_every_band_count"
_JOB_BANDS = "tests/test_job_bands.py::"
_WEBUI_BANDS = "tests/test_webui_bands.py::"

MUTANTS = (
    # --- the cost model -----------------------------------------------------------------------------------------
    Mutant("fused CPU scratch set to 0", "lib_memslice/cpu_scratch.py",
           "    return threads * total\n", "    return 0\n", ("tests/test_cpu_scratch.py",)),
    Mutant("fused CPU scratch halved", "lib_memslice/cpu_scratch.py",
           "    return threads * total\n", "    return threads * total // 2\n", ("tests/test_cpu_scratch.py",)),
    Mutant("einsum score buffer counted at half", "lib_memslice/costs.py",
           "    return s_c * ces + o_c * kernel.output_extra", "    return s_c * ces // 2 + o_c * kernel.output_extra",
           ("tests/test_kernels.py",)),
    Mutant("fused log-sum-exp term dropped", "lib_memslice/costs.py",
           "            + rows * queries_per_slice * LSE_BYTES\n", "", ("tests/test_kernels.py",)),
    Mutant("fused input-copy term dropped", "lib_memslice/costs.py",
           "            + copies * (q_c + kv_c) * ces\n", "", ("tests/test_kernels.py",)),
    Mutant("SDPA math path's float32 computation of half precision dropped", "lib_memslice/costs.py",
           "        mes = max(ces, 4)\n", "        mes = ces\n", ("tests/test_kernels.py",)),
    # --- the search and the rules -------------------------------------------------------------------------------
    Mutant("ceil division of query slices becomes floor", "lib_memslice/slicing.py",
           "    return SlicePlan(rows, queries, c.head_slices(rows), ceil_div(c.shape.q_tokens, queries),",
           "    return SlicePlan(rows, queries, c.head_slices(rows), c.shape.q_tokens // queries,",
           ("tests/test_slicing.py",)),
    Mutant("Metal's multiple-of-4096 rule removed", "lib_memslice/slicing.py",
           "            if queries_per_slice % MPS_BAD_MULTIPLE == 0 and queries_per_slice < s.q_tokens:\n"
           "                return False\n", "", ("tests/test_slicing.py",)),
    Mutant("Metal's 2^31-element limit removed", "lib_memslice/slicing.py",
           "            return biggest < MPS_MAX_ELEMENTS and biggest", "            return biggest",
           ("tests/test_slicing.py",)),
    Mutant("SD3: Metal's limit on a whole SDPA call counted per batch item", "lib_memslice/costs.py",
           '    return min(rows, shape.heads) if kernel == "einsum" else rows',
           "    return min(rows, shape.heads)", ("tests/test_joint.py::test_metals_limits_at_sd3s_shapes",)),
    Mutant("exact query search: Metal's one-step move forgotten", "lib_memslice/slicing.py",
           "            if hi % MPS_BAD_MULTIPLE == 0 and hi < nq:\n                hi -= 1\n", "",
           ("tests/test_slicing.py",)),
    Mutant("the floor not lowered to the smallest-peak plan's count (the cap's fallback)", "lib_memslice/slicing.py",
           "    floor = min(max(aim.slices, c.min_slices), c.slices(*smallest))",
           "    floor = max(aim.slices, c.min_slices)",
           ("tests/test_strategies.py::test_the_published_counterexamples",)),
    Mutant("CPU einsum: the aim keeps the cache size in a smaller room", "lib_memslice/strategies.py",
           "        queries, why = max(1, fitting), f\"{why}, fewer queries to fit the room\"",
           "        why = f\"{why}, fewer queries to fit the room\"",
           ("tests/test_strategies.py::test_the_einsum_kernel_on_cpus_aims_at_cache_sized_one_head_slices_and_"
            "gpus_at_the_fewest",)),
    Mutant("the webui's rules plan in more than free memory at a low safety factor", "lib_memslice/slicing.py",
           "    return Room(int(free_bytes) + int(inputs_bytes), max(1.0, divisor), ceiling=ceiling)",
           "    return Room(int(free_bytes) + int(inputs_bytes), divisor, ceiling=ceiling)",
           ("tests/test_strategies.py::test_no_strategys_room_is_more_than_free_memory",)),
    # --- probes -------------------------------------------------------------------------------------------------
    Mutant("the room not divided by the safety factor", "lib_memslice/slicing.py",
           "    divisor = factor / strategies.WEBUI_MARGIN if strategy in strategies.WEBUI_RULES else factor",
           "    divisor = factor / strategies.WEBUI_MARGIN if strategy in strategies.WEBUI_RULES else 1.0",
           ("tests/test_probe.py", "tests/test_strategies.py::test_no_strategys_room_is_more_than_free_memory")),
    Mutant("a probe reading of 0 read as plenty", "lib_memslice/probe.py",
           '        return FreeMemory(0, f"{found.source} (nothing free)", found.trusted, found.ceiling)',
           '        return _fallback(kind, "zero", "zero")', ("tests/test_probe.py",)),
    Mutant("CUDA's precise probe never asked", "lib_memslice/forwards.py",
           'and call.device_kind == "cuda" and free is not None:',
           'and call.device_kind == "never" and free is not None:', ("tests/test_probe.py",)),
    Mutant("MPS: the allocator's cached pools counted as used", "lib_memslice/probe.py",
           "    tensors = int(mps.current_allocated_memory())", "    tensors = int(mps.driver_allocated_memory())",
           ("tests/test_probe.py",)),
    Mutant("MPS: the high watermark ratio ignored", "lib_memslice/probe.py",
           "    granted = int(ratio * recommended) - tensors if ratio > 0 else ram",
           "    granted = int(recommended) - tensors if ratio > 0 else ram", ("tests/test_probe.py",)),
    Mutant("cgroups: the parents of the own cgroup not read", "lib_memslice/probe.py",
           "            here = os.path.dirname(here)\n", "            break\n", ("tests/test_probe.py",)),
    Mutant("cgroups: v1's memory controller not read", "lib_memslice/probe.py",
           '        elif after[0] == "cgroup" and "memory" in after[2].split(","):',
           '        elif False:', ("tests/test_probe.py",)),
    # --- running a call -----------------------------------------------------------------------------------------
    Mutant("OOM retry does not double the slices", "lib_memslice/forwards.py",
           "        again = _plan_in(call, tail, planned.room_bytes, plan.slices * 2)",
           "        again = _plan_in(call, tail, planned.room_bytes, plan.slices)",
           ("tests/test_faults.py",)),
    Mutant("fused OOM retried in a loop instead of once", "lib_memslice/forwards.py",
           '        if stage != "einsum-last" and call.settings.kernel == "auto":',
           '        if call.settings.kernel == "auto":', ("tests/test_faults.py",)),
    Mutant("the retry error names plans that were never tried", "lib_memslice/forwards.py",
           "        attempts.append(Attempt(_label(before.kernel, planned.chain), before.slices, before.peak_bytes))\n",
           "        attempts.append(Attempt(\"einsum\", 2 * before.slices, before.peak_bytes))\n",
           ("tests/test_faults.py",)),
    Mutant("the retry error blames the slice cap when memory stopped it", "lib_memslice/forwards.py",
           'raise _stopped(call, attempts, "cap" if plan.slices * 2 > cap else',
           'raise _stopped(call, attempts, "cap" if plan.slices * 2 > 0 else', ("tests/test_faults.py",)),
    Mutant("hypernetwork context ignored", "lib_memslice/forwards.py",
           "        context_k, context_v = host.apply_hypernetworks(x if context is None else context)",
           "        context_k = context_v = x if context is None else context", ("tests/test_webui.py",)),
    Mutant("upcast ignored", "lib_memslice/forwards.py",
           "    compute_dtype = torch.float32 if upcast and dtype in kernels.HALF else dtype",
           "    compute_dtype = dtype", ("tests/test_webui.py",)),
    Mutant("fully masked rows left to SDPA (NaN in half precision)", "lib_memslice/kernels.py",
           "        if mask is not None and mask.any_dead:", "        if False:", ("tests/test_kernels.py",)),
    Mutant("autocast left on inside the kernels", "lib_memslice/kernels.py",
           "    if _autocast_enabled(device_type):\n        return torch.autocast(device_type, enabled=False)",
           "    if False:\n        return torch.autocast(device_type, enabled=False)", ("tests/test_kernels.py",)),
    Mutant("the unnormalised softmax without its division by the row sums", "lib_memslice/kernels.py",
           "            torch.div(wide[..., :dv], wide[..., dv:], out=target)",
           "            target.copy_(wide[..., :dv])", ("tests/test_kernels.py",)),
    Mutant("the unnormalised path's wider values and output not counted", "lib_memslice/costs.py",
           "        copies = (kv_c + q_c + o_c) * ces + wide + norms\n    else:\n"
           "        copies = wide * (dv + 1) + norms\n",
           "        copies = (kv_c + q_c + o_c) * ces + norms\n    else:\n        copies = norms\n",
           ("tests/test_kernels.py",)),
    Mutant("strided half-precision operands not staged (cloned inside every GEMM)", "lib_memslice/kernels.py",
           "        self.copies = self.cast or staged", "        self.copies = self.cast", ("tests/test_kernels.py",)),
    Mutant("the staged copies not counted", "lib_memslice/costs.py",
           "            copies += (rows * nk * (d if unnormalised else d + dv) + q_c) * ces\n",
           "            copies += 0\n",
           ("tests/test_kernels.py",)),
    Mutant("the staged values counted beside the widened ones", "lib_memslice/costs.py",
           "(rows * nk * (d if unnormalised else d + dv) + q_c)", "(rows * nk * (d + dv) + q_c)",
           ("tests/test_kernels.py",)),
    Mutant("the VAE's contiguous copies previewed as staged", "lib_memslice/kernels.py",
           "site.head_dim, not site.vae)", "site.head_dim, True)", ("tests/test_kernels.py",)),
    Mutant("exp2 without log2(e) folded into the score scale", "lib_memslice/kernels.py",
           "alpha=scale * LOG2_E if two else scale)", "alpha=scale)", ("tests/test_kernels.py",)),
    Mutant("no lean einsum kernel at the edge of memory", "lib_memslice/kernels.py",
           '    if found[-1].kind == "einsum" and found[-1].unnormalised:\n', "    if False:\n",
           ("tests/test_kernels.py",)),
    Mutant("a half-precision GEMM's in-op scratch not counted on CPUs", "lib_memslice/costs.py",
           "HALF_GEMM_SCRATCH = 4 * 1024 * 1024", "HALF_GEMM_SCRATCH = 0", ("tests/test_kernels.py",)),
    Mutant("a half-precision GEMM's scratch bound without its fixed part", "lib_memslice/costs.py",
           "HALF_GEMM_FIXED = 128 * 1024", "HALF_GEMM_FIXED = 0", ("tests/test_kernels.py",)),
    Mutant("a half-precision GEMM's scratch bound below what mid-sized GEMMs take", "lib_memslice/costs.py",
           "HALF_GEMM_PER_OPERAND_BYTE = 2", "HALF_GEMM_PER_OPERAND_BYTE = 0", ("tests/test_kernels.py",)),
    Mutant("the unnormalised softmax where logits are not bounded", "lib_memslice/kernels.py",
           "LOGIT_BOUND = 60.0", "LOGIT_BOUND = 1e30", ("tests/test_kernels.py",)),
    Mutant("the unnormalised softmax's norms not counted", "lib_memslice/costs.py",
           "    norms = wide + 2 * rows * ces if unnormalised else 0\n", "    norms = 0\n", ("tests/test_kernels.py",)),
    Mutant("the logits' bound taken in float32 (a float32 copy of each head in the norm)", "lib_memslice/kernels.py",
           "    torch.linalg.vector_norm(x, dim=-1, out=every)\n",
           "    every.copy_(torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32))\n",
           ("tests/test_kernels.py::test_only_the_buffers_and_the_gemms_allocate",)),
    Mutant("the logits' bound without the norms' rounding", "lib_memslice/kernels.py",
           "    widen = (1 + 2 * torch.finfo(qq.dtype).eps) ** 2 * abs(scale)\n", "    widen = abs(scale)\n",
           ("tests/test_kernels.py::test_the_logits_bound_holds_at_its_edge",)),
    Mutant("workers take slices of any run (each worker copies every run's keys)", "lib_memslice/kernels.py",
           "            if held is None or not self.left[held]:\n", "            if True:\n",
           ("tests/test_kernels.py::test_workers_copy_each_runs_keys_once",)),
    Mutant("cuBLAS allocation failures not read as out-of-memory", "lib_memslice/kernels.py",
           '    "cublas_status_alloc_failed",\n', "", ("tests/test_kernels.py",)),
    Mutant("fast path reuses plans with no headroom", "lib_memslice/forwards.py",
           "FAST_PATH_HEADROOM = 4", "FAST_PATH_HEADROOM = 0", ("tests/test_forwards.py",)),
    Mutant("a call's record without the time it ran", "lib_memslice/forwards.py",
           "            timestamp=time.time(),\n", "",
           ("tests/test_api.py::test_status_reports_device_budget_entry_settings_and_recent_plans",)),
    Mutant("the same call's lane runs a plan it may not (a sliced or einsum one)", "lib_memslice/forwards.py",
           '    if (plan.kernel.kind != "fused" or plan.sliced', '    if (False',
           ("tests/test_forwards.py::test_the_same_call_again_skips_the_full_path_and_gives_its_bits_and_record",)),
    Mutant("the same call's lane records the first call's site", "lib_memslice/forwards.py",
           "    host.record(CallRecord(site, *memo.again, time.time()))",
           "    host.record(CallRecord(*memo.again[:0], 'a', *memo.again, time.time()))",
           ("tests/test_forwards.py::test_the_same_call_again_skips_the_full_path_and_gives_its_bits_and_record",)),
    Mutant("the same call's lane runs on an old reading without its headroom", "lib_memslice/forwards.py",
           "    if _room_in(free, strategy, settings, shape)",
           "    if False and _room_in(free, strategy, settings, shape)",
           ("tests/test_forwards.py::test_an_old_reading_in_the_same_call_lane_is_read_again_and_followed",)),
    Mutant("the lane's shared reading used past its age", "lib_memslice/forwards.py",
           "    if last is not None and now - last[0] < FAST_PATH_MAX_AGE_S:", "    if last is not None:",
           ("tests/test_forwards.py::test_the_lane_shares_one_recent_reading_between_layers_and_reads_again_once_it_is_old",)),
    Mutant("a layer that used the shared reading counts it as its own, new", "lib_memslice/forwards.py",
           "    memo.probed_at = read_at  #", "    memo.probed_at = time.perf_counter()  #",
           ("tests/test_forwards.py::test_the_lane_shares_one_recent_reading_between_layers_and_reads_again_once_it_is_old",)),
    Mutant("an out-of-memory error in the same call's lane reaches the user", "lib_memslice/forwards.py",
           "        if not (settings.oom_retry and kernels.is_oom(exc)):", "        if True:",
           ("tests/test_forwards.py::test_an_out_of_memory_error_in_the_same_call_lane_is_retried_by_the_full_path",)),
    Mutant("an old reading's plan found again in a smaller room", "lib_memslice/forwards.py",
           "        and room.bytes_for(call.shape) >= last.room_bytes\n", "",
           ("tests/test_forwards.py::test_an_old_reading_reprobes_but_finds_an_unsliced_first_kernel_plan_again_without_searching",)),
    Mutant("an old reading's plan searched for again", "lib_memslice/forwards.py",
           "    if last is not None and _found_again(last, choices, room, call):",
           "    if False:",
           ("tests/test_forwards.py::test_an_old_reading_reprobes_but_finds_an_unsliced_first_kernel_plan_again_without_searching",)),
    # --- the VAE's bands ----------------------------------------------------------------------------------------
    Mutant("bands: the float32 copy a half-precision band is normalised in not counted", "lib_memslice/band_costs.py",
           "        return max(gathered + rows * frow, rows * frow + rows * row)\n",
           "        return gathered + rows * row\n", (_BAND_PEAK,)),
    Mutant("bands: the float32 copy a half-precision band's statistics take not counted", "lib_memslice/band_costs.py",
           "    return rows * row + (rows * frow if half else 0)\n", "    return rows * row\n", (_BAND_PEAK,)),
    Mutant("bands: conv1's input and output not counted together", "lib_memslice/band_costs.py",
           "                    a * rin + a * rout,\n", "                    a * rout,\n", (_BAND_PEAK,)),
    Mutant("bands: the upsampled band's crop not counted beside its convolution", "lib_memslice/band_costs.py",
           "                    2 * a * r2 + 2 * m * r2 if t + b > 0 else 0,\n", "                    0,\n",
           (_BAND_PEAK,)),
    Mutant("bands: the input band a neighbour still reads counted as freed", "lib_memslice/band_costs.py",
           "                held = tail[0] if (cur_whole or not nin) else tail[max(0, j - 1)]\n",
           "                held = tail[0] if (cur_whole or not nin) else tail[j]\n", (_BAND_PEAK,)),
    Mutant("bands: the Downsample's padded copy not counted", "lib_memslice/band_costs.py",
           "                padded = (a + 1) * batch * op.cin * (width + 1) * es if op.conv else 0\n",
           "                padded = 0\n", (_BAND_PEAK,)),
    Mutant("bands: the GroupNorms' scale, shift and running statistics not counted", "lib_memslice/band_costs.py",
           "            return FLOAT_BYTES * batch * (2 * norm_channels + (8 * net.groups if merging else 0))\n",
           "            return 0\n", (_BAND_PEAK,)),
    Mutant("bands: the stock ResnetBlock's SiLU copies not counted (untiled peak)", "lib_memslice/band_costs.py",
           "    return max(3 * cin, cin + cout, 2 * cout, 3 * cout, 3 * cout if cin != cout else 2 * cout)\n",
           "    return max(cin + cout, 2 * cout)\n",
           (_BANDS + "test_the_untiled_peak_is_the_stock_modules",
            _BANDS + "test_the_model_is_within_ten_percent_at_1024px_with_the_published_config")),
    Mutant("bands: streamed lists counted on the device", "lib_memslice/band_costs.py",
           "    dev = 0 if streamed else 1", "    dev = 1",
           (_BANDS + "test_streamed_bands_hold_only_a_bands_working_set_on_the_device",
            _BANDS + "test_a_room_below_every_resident_plan_streams_the_bands_and_is_exact")),
    Mutant("bands: the encoder's Downsample halo symmetric", "lib_memslice/band_costs.py",
           "            before, after = 2 * before, 2 * after + (1 if op.conv else 0)",
           "            before, after = 2 * before + (1 if op.conv else 0), 2 * after + (1 if op.conv else 0)",
           (_BANDS + "test_the_receptive_field_is_the_one_design_md_counted",
            _BANDS + "test_the_counted_receptive_field_is_the_real_modules")),
    Mutant("bands: a pass that fits untiled planned untiled whatever the room", "lib_memslice/band_costs.py",
           "        if min_bands <= 0 and untiled <= where:", "        if min_bands <= 0:",
           (_BANDS + "test_the_plan_is_the_fewest_bands_that_fit",)),
    Mutant("bands: no streamed plan when no resident plan fits", "lib_memslice/band_costs.py",
           "    if stream:\n", "    if False:\n",
           (_BANDS + "test_a_room_below_every_resident_plan_streams_the_bands_and_is_exact",)),
    Mutant("bands: GroupNorm statistics merged without Chan's correction for the bands' means",
           "lib_memslice/bands.py",
           "        self.m2 = self.m2 + var * count + delta * delta * (self.count * count / total)\n",
           "        self.m2 = self.m2 + var * count\n",
           (_BANDS + "test_the_merged_statistics_are_the_whole_tensors",
            _BANDS + "test_a_banded_decode_equals_the_untiled_module_at_every_band_count")),
    Mutant("bands: GroupNorm statistics with the unbiased variance", "lib_memslice/bands.py",
           "        var, mean = torch.var_mean(grouped, dim=(2, 3, 4), correction=0)",
           "        var, mean = torch.var_mean(grouped, dim=(2, 3, 4), correction=1)",
           (_BANDS + "test_the_merged_statistics_are_the_whole_tensors",)),
    Mutant("bands: a half-precision band's variance taken about zero, not its mean", "lib_memslice/bands.py",
           "            var = grouped.sub_(mean[:, :, None, None, None]).square_().mean(dim=(2, 3, 4))",
           "            var = grouped.square_().mean(dim=(2, 3, 4))",
           ("tests/test_bands.py",)),
    Mutant("bands: GroupNorm statistics taken over the halo rows too", "lib_memslice/bands.py",
           "        h = _core(h, top, cuts[j + 1] - cuts[j])\n        moments.add(h)\n",
           "        moments.add(h)\n        h = _core(h, top, cuts[j + 1] - cuts[j])\n",
           (_BANDS + "test_a_banded_decode_equals_the_untiled_module_at_every_band_count",)),
    Mutant("bands: conv1 reads no rows of the neighbouring bands", "lib_memslice/bands.py",
           "        y = _norm_silu([lists.gather(xs, cuts, j, 1, 1)], affine)",
           "        y = _norm_silu([lists.gather(xs, cuts, j, 0, 0)], affine)",
           (_BANDS + "test_a_banded_decode_equals_the_untiled_module_at_every_band_count",)),
    Mutant("bands: an out-of-memory retry jumps to the most bands", "lib_memslice/bands.py",
           "        return min(top, 2 * plan.bands), plan.streamed", "        return top, plan.streamed",
           (_BANDS + "test_out_of_memory_retries_with_more_bands_and_stays_exact",)),
    Mutant("bands: the retry error names a band count for the untiled attempt", "lib_memslice/bands.py",
           "        tried.append((0 if plan.stock else plan.bands, plan.streamed))",
           "        tried.append((plan.bands, plan.streamed))",
           (_BANDS + "test_the_last_error_names_the_pass_the_counts_tried_and_free_memory",)),
    Mutant("bands: one band planned on the device (the whole pass through the banded schedule)",
           "lib_memslice/band_costs.py",
           "        for n in range(max(MIN_RESIDENT_BANDS, min_bands), top + 1):",
           "        for n in range(max(1, min_bands), top + 1):",
           (_BANDS + "test_the_plan_is_the_fewest_bands_that_fit",
            _WEBUI_BANDS + "test_a_pass_that_would_fit_in_one_band_runs_in_two_and_one_band_on_the_device_is_the_"
            "modules_own")),
    Mutant("bands: one band forced on the device runs the banded schedule, not the module's own forward",
           "lib_memslice/bands.py", "            bands = 0  # the whole pass on the device: the module's own forward",
           "            pass",
           (_WEBUI_BANDS + "test_a_pass_that_would_fit_in_one_band_runs_in_two_and_one_band_on_the_device_is_the_"
            "modules_own",)),
    Mutant("bands: an out-of-memory retry after the stock forward tries one band on the device",
           "lib_memslice/bands.py",
           "        return (MIN_RESIDENT_BANDS, False) if top >= MIN_RESIDENT_BANDS else (top, True)",
           "        return 1, False",
           (_BANDS + "test_out_of_memory_retries_with_more_bands_and_stays_exact",)),
    Mutant("bands: one band streamed said as '1 bands'", "lib_memslice/band_costs.py",
           "    if bands == 1:\n", "    if False:\n",
           ("tests/test_stats.py::test_no_wording_says_one_band_and_a_failed_job_says_what_stopped_it",)),
    # --- the VAE's bands in the job planner and the webui -------------------------------------------------------
    Mutant("job plan: a VAE pass's bands planned in free memory without the allocator's share",
           "lib_memslice/job_plan.py",
           "        margin = 1.0 + allocator_overhead(job.device_kind).high\n", "        margin = 1.0\n",
           (_JOB_BANDS + "test_the_decode_runs_in_the_fewest_bands_that_fit_its_room",
            _JOB_BANDS + "test_the_job_planner_plans_the_bands_the_runtime_runs")),
    Mutant("job plan: the decoder's input latent left out of the bands' room", "lib_memslice/job_plan.py",
           "        room, over = int(max(0, free) / margin) - extra, max(0, free) - extra\n",
           "        room, over = int(max(0, free) / margin), max(0, free)\n",
           (_JOB_BANDS + "test_a_pass_planned_in_bands_is_one_the_verdict_calls_fits_at_the_edge",)),
    Mutant("job plan: a banded pass counted as the untiled one", "lib_memslice/job_plan.py",
           "        peak = max(mid, found.extra + part)\n", "",
           (_JOB_BANDS + "test_the_largest_square_size_counts_the_bands",)),
    Mutant("job plan: the banded encoder's mid block counted with the stock encoder's list",
           "lib_memslice/activations.py",
           '    "vae_encode": PassModel(Linear(32.0, 0.0), {"vae.mid": Linear(20.0, 0.0)}),',
           '    "vae_encode": PassModel(Linear(32.0, 0.0), {"vae.mid": Linear(344.0, 0.0)}),',
           (_JOB_BANDS + "test_a_banded_pass_holds_what_the_job_planner_counts",)),
    Mutant("job plan: a pass no band plan fits called fits", "lib_memslice/job_plan.py",
           "    refused = found is not None and band_plan is None\n", "    refused = False\n",
           (_JOB_BANDS + "test_a_pass_no_plan_fits_does_not_fit_and_says_why",)),
    Mutant("job plan: the loaded VAE's bands planned as the published VAE's", "lib_memslice/webui/planner.py",
           "            published = replace(published, **bands.vae_layout(vae))\n", "            pass\n",
           (_WEBUI_BANDS + "test_the_plan_route_predicts_the_bands_the_run_records",
            _WEBUI_BANDS + "test_a_loaded_vae_memslice_cannot_band_is_planned_and_run_whole")),
    Mutant("job plan: a loaded VAE memslice cannot band planned in bands", "lib_memslice/job_plan.py",
           "    if net is None:\n        return False\n    return p.kind", "    return p.kind",
           (_WEBUI_BANDS + "test_a_loaded_vae_memslice_cannot_band_is_planned_and_run_whole",)),
    Mutant("job plan: a loaded VAE's activations counted at the published width", "lib_memslice/job_plan.py",
           "    return job.spec.vae_channels or activations.VAE_CHANNELS\n", "    return activations.VAE_CHANNELS\n",
           (_WEBUI_BANDS + "test_the_plan_route_predicts_the_bands_the_run_records",)),
    Mutant("webui: undo leaves memslice's VAE forwards on the classes", "lib_memslice/webui/entries.py",
           "        remove_vae_forwards()\n", "",
           (_WEBUI_BANDS + "test_a_memslice_entry_installs_the_banded_vae_forwards_and_undo_restores_the_originals",)),
    Mutant("webui: a memslice VAE forward kept by another extension still bands with no memslice entry",
           "lib_memslice/bands.py",
           "    return bool(active()) if callable(active) else True\n", "    return True\n",
           (_WEBUI_BANDS + "test_undo_leaves_a_forward_another_extension_installed_since",)),
    Mutant("webui: the infotext and the console line do not say the bands", "lib_memslice/stats.py",
           "                found.append(f\"VAE {kind} {'in ' if bands > 1 else ''}{words}\")\n", "",
           (_WEBUI_BANDS + "test_a_decode_that_would_not_fit_runs_in_the_fewest_bands_and_says_so",
            _WEBUI_BANDS + "test_an_encode_that_would_not_fit_runs_in_bands")),
    Mutant("webui: a failed job's summary left open (last_job shows the job before)", "lib_memslice/webui/jobs.py",
           "                on_job_failed(p, exc)\n", "                pass\n",
           (_WEBUI_BANDS + "test_a_refused_job_is_the_last_job_the_status_shows",
            _WEBUI_BANDS + "test_a_decode_out_of_memory_is_retried_with_more_bands_and_the_last_error_reaches_the_"
            "user")),
    Mutant("webui: a job's line names no strategy until a call records one", "lib_memslice/webui/jobs.py",
           '    STATS.start_job(entry.strategy)\n    _running["open"] = True',
           '    STATS.start_job()\n    _running["open"] = True',
           (_WEBUI_BANDS + "test_a_refused_job_is_the_last_job_the_status_shows",)),
    Mutant("webui: a job failed before process() closed with calls made between jobs", "lib_memslice/webui/jobs.py",
           "        STATS.start_job(entry.strategy)  # nothing of this job was recorded",
           "        pass  # nothing of this job was recorded",
           (_WEBUI_BANDS + "test_a_refused_job_is_the_last_job_the_status_shows",)),
    Mutant("webui: a VAE pass refused under the attention budget reads as free memory", "lib_memslice/bands.py",
           "    return NotEnoughMemory(text, need=need, have=free, site=f\"vae.{kind}\", fixed_budget=budgeted)",
           "    return NotEnoughMemory(text, need=need, have=free, site=f\"vae.{kind}\")",
           ("tests/test_webui.py::test_a_generation_that_fails_names_the_pass_and_what_would_fit",)),
    # --- the job planner ----------------------------------------------------------------------------------------
    Mutant("'fits' without what the allocator adds", "lib_memslice/job_plan.py",
           "    total = tensors + most\n", "    total = tensors\n",
           ("tests/test_cli.py::test_a_job_at_the_edge_of_the_card_is_not_called_fits", "tests/test_job_plan.py")),
    Mutant("upcast previews without the cast copy of q, k and v", "lib_memslice/kernels.py",
           "        if chosen is wanted or found[0].kind != \"fused\":", "        if True:",
           ("tests/test_job_plan.py",)),
    # --- the webui glue -----------------------------------------------------------------------------------------
    Mutant("an out-of-memory error not annotated", "lib_memslice/webui/jobs.py",
           "            annotate(exc)\n", "", ("tests/test_webui.py",)),
    Mutant("a VAE encode named a decode", "lib_memslice/webui/jobs.py",
           '"Encoder": ("VAE encode", 1),', '"Encoder": ("VAE decode", 1),', ("tests/test_webui.py",)),
    Mutant("'fits up to' read while the failing pass still holds memory", "lib_memslice/webui/jobs.py",
           'free=_running.get("free"), **job.request)', "free=None, **job.request)", ("tests/test_webui.py",)),
    Mutant("no word that the reading may have been optimistic", "lib_memslice/webui/jobs.py",
           "        if max(first) <= side:", "        if False:", ("tests/test_webui.py",)),
    Mutant("a built-in optimization keeps memslice's wrapper", "lib_memslice/webui/entries.py",
           "        jobs.remove_failure_context()\n", "", ("tests/test_webui.py",)),
    Mutant("a named model counts the loaded weights twice", "lib_memslice/webui/planner.py",
           "    resident = 0 if medvram or weights is None else weights.unet + weights.vae + weights.text",
           "    resident = 0 if medvram or weights is None or model else weights.unet + weights.vae + weights.text",
           ("tests/test_api.py",)),
    Mutant("SD3 planned as SD1.5", "lib_memslice/webui/planner.py",
           '    for flag, kind in (("is_sd3", "sd3"), ("is_sdxl", "sdxl"), ("is_sd2", "sd2")):',
           '    for flag, kind in (("is_sdxl", "sdxl"), ("is_sd2", "sd2")):', ("tests/test_api.py",)),
    Mutant("--api-auth ignored by the API routes", "lib_memslice/webui/routes.py",
           "        api = [_api_auth()] if _credentials() else []", "        api = []",
           ("tests/test_api.py::test_api_auth_protects_the_api_routes_as_it_protects_sdapi",)),
    Mutant("the page's routes served without the page's login", "lib_memslice/webui/routes.py",
           "        page = [_page_session(app)]", "        page = []",
           ("tests/test_api.py::test_the_pages_copy_wants_the_pages_gradio_login",)),
    Mutant("a page login asked by the command line not enforced where no gradio session can be verified",
           "lib_memslice/webui/routes.py", '    return asked or getattr(app, "auth", None) is not None',
           '    return getattr(app, "auth", None) is not None',
           ("tests/test_api.py::test_a_page_login_that_cannot_be_verified_is_refused",)),
    Mutant("cached plans made in the exact reading (one step lower would reuse more than is free)",
           "lib_memslice/webui/routes.py", "    rounded = max(0, free.bytes) // FREE_STEP * FREE_STEP",
           "    rounded = free.bytes",
           ("tests/test_api.py::test_a_cached_plan_never_counts_memory_that_is_no_longer_free",)),
    Mutant("the status's room as free / safety factor under every strategy", "lib_memslice/webui/routes.py",
           "    room = room_for(strategy, free_bytes, settings.safety_factor)",
           '    room = room_for("auto", free_bytes, settings.safety_factor)',
           ("tests/test_api.py::test_status_reports_the_room_the_active_strategy_plans_in",)),
    Mutant("the page's failed-job line reads the running job, not the failed one", "javascript/memslice.js",
           "            var job = status.last_job;\n", "            var job = status.current_job;\n",
           ("tests/test_browser.py::test_status_line_after_a_job_that_did_not_fit",)),
    Mutant("the page keeps the last job's line after a failed job", "javascript/memslice.js",
           '        var failed = !!(log && log.querySelector(".error"));', "        var failed = false;",
           ("tests/test_browser.py",)),
    Mutant("the planner panel misses a gradio dropdown's choice (no re-plan after a UI update)",
           "javascript/memslice.js", "        else check();\n", "\n",
           ("tests/test_browser.py::test_the_hires_upscaler_dropdown_replans_with_the_image_upscalers_passes",)),
    Mutant("the planner panel's largest squares asked at 512 px, not at the user's first pass",
           "javascript/memslice.js", 'getJSON("plan", Object.assign({}, job.params, {batch: b})));',
           'getJSON("plan", Object.assign({}, job.params, {batch: b, width: 512, height: 512})));',
           ("tests/test_browser.py::test_the_largest_squares_are_for_the_users_job_with_a_hires_target",)),
    Mutant("the planner panel's pass table without column headings", "javascript/memslice.js",
           "        table.appendChild(thead);\n", "\n",
           ("tests/test_browser.py::test_the_pass_table_has_column_headings",)),
    Mutant("a pass's bar draws its largest attention transient, not the one live at its peak",
           "javascript/memslice.js", 'typeof p.attention_at_peak_bytes === "number"', "false",
           ("tests/test_browser.py::test_each_bar_is_its_passes_parts_in_proportion_against_the_jobs_memory",)),
    Mutant("the planner panel shows an answer for a job the page no longer shows", "javascript/memslice.js",
           "            if (readJob().key !== job.key) {", "            if (false) {",
           ("tests/test_browser.py::test_a_late_answer_for_an_earlier_job_is_never_shown",)),
    Mutant("the planner panel shows a late answer over a newer request's", "javascript/memslice.js",
           "            if (mine !== sequence) return; // a newer request is under way\n", "\n",
           ("tests/test_browser.py::test_a_late_answer_for_an_earlier_job_is_never_shown",)),
    Mutant("the planner panel shows the old model's numbers while a checkpoint loads", "javascript/memslice.js",
           "        if (loading) job.waiting", "        if (false) job.waiting",
           ("tests/test_browser.py::test_the_panel_follows_the_checkpoint_once_it_is_loaded",)),
    Mutant("a pass's attention at its peak is its largest transient", "lib_memslice/job_plan.py",
           "if live.get(s, peak) + a == tensors - weights - inputs), default=0", "), default=0",
           ("tests/test_job_plan.py::test_a_pass_names_the_attention_live_at_its_peak",)),
    # --- issue 25: every "fits" true -----------------------------------------------------------------------------
    Mutant("a call takes the first kernel of its chain that fits, not the fewest slices", "lib_memslice/slicing.py",
           "        if plan is not None and (best is None or plan.slices < best.slices):",
           "        if plan is not None and best is None:",
           ("tests/test_strategies.py::test_no_call_slices_more_with_more_free_memory_over_its_kernel_chain",)),
    Mutant("InvokeAI's aim falls past the query count (the webui's own count)", "lib_memslice/strategies.py",
           "    return by_queries if by_queries.slices >= by_rows.slices else by_rows",
           "    return by_queries", ("tests/test_strategies.py::test_the_invokeai_aim_past_the_query_count",)),
    Mutant("the stock VAE attention's scores counted once", "lib_memslice/costs.py",
           "STOCK_SCORE_COPIES = 2", "STOCK_SCORE_COPIES = 1",
           ("tests/test_job_plan.py::test_the_stock_vae_attentions_term_is_what_the_real_attnblock_allocates",)),
    Mutant("the VAE setting off planned as memslice's sliced attention", "lib_memslice/job_plan.py",
           '    stock = site.vae and job.vae == "off"', "    stock = False",
           ("tests/test_job_plan.py::test_the_vae_attention_is_planned_as_the_webui_runs_it",)),
    Mutant("the old VAE switch's true/false read as unusable", "lib_memslice/settings.py",
           '        was_bool=("auto", "off"),\n', "", ("tests/test_settings.py",)),
    Mutant("Apple: fits up to the allocator's limit, not the working set", "lib_memslice/probe.py",
           "    return FreeMemory(min(recommended - tensors, ceiling),", "    return FreeMemory(ceiling,",
           ("tests/test_probe.py",)),
    Mutant("Apple: the ceiling past the Mac's RAM", "lib_memslice/probe.py",
           "    ceiling = min(granted, ram)", "    ceiling = granted",
           ("tests/test_probe.py::test_an_8_gib_mac_never_reads_more_than_it_has",)),
    Mutant("Apple: past the working set read as does not fit, not tight", "lib_memslice/job_plan.py",
           "tensors + least > job.memory_bytes + job.beyond:", "tensors + least > job.memory_bytes:",
           ("tests/test_job_plan.py::test_on_apple_fits_is_the_working_set_and_tight_is_up_to_the_ceiling",)),
    Mutant("SDPA math's input copies x3 -> x1 (CUDA only)", "lib_memslice/costs.py",
           "+ 3 * (q_c + kv_c) * mes", "+ 1 * (q_c + kv_c) * mes", ("tests/test_gpu_record.py",)),
    Mutant("the einsum kernel's accelerator term dropped (MPS, DirectML)", "lib_memslice/kernels.py",
           '    return KernelChoice("einsum", output_extra=torch.finfo(dtype).bits // 8 + 1)',
           '    return KernelChoice("einsum")', ("tests/test_gpu_record.py",)),
    Mutant("torch 2.1's 0-d flash outputs not counted", "lib_memslice/costs.py",
           "FUSED_SCALARS = 64", "FUSED_SCALARS = 0",
           ("tests/test_kernels.py::test_the_fused_calls_live_tensors_are_its_terms_to_the_byte",)),
    Mutant("an image upscaler's encode planned at the target, not the cover size", "lib_memslice/job_plan.py",
           "            cw, ch = job.hires_cover or job.hires", "            cw, ch = job.hires",
           ("tests/test_webui.py::test_hires_with_both_target_sides_names_the_passes_at_their_real_sizes",)),
    Mutant("a retry that cannot double never tries the leaner kernels", "lib_memslice/forwards.py",
           "        if leaner is not None and leaner.peak_bytes < plan.peak_bytes:", "        if False:",
           ("tests/test_faults.py::test_a_call_that_cannot_be_cut_further_says_so_after_trying_the_leaner_kernels",)),
    Mutant("previews read the driver's free memory only", "lib_memslice/webui/planner.py",
           "    free = free or probe.free_memory(device(), precise=True)",
           "    free = free or probe.free_memory(device())",
           ("tests/test_api.py::test_previews_count_torchs_cached_blocks_as_the_calls_do",)),
    Mutant("SD3's weights not read when it loads", "lib_memslice/webui/planner.py",
           '    _loaded["weights"] = Weights(_parameter_bytes(unet), _parameter_bytes(vae), _parameter_bytes(text))',
           '    _loaded["weights"] = None if kind == "sd3" else Weights(_parameter_bytes(unet), _parameter_bytes(vae),'
           " _parameter_bytes(text))",
           ("tests/test_api.py::test_with_sd3_loaded_a_named_model_credits_sd3s_weights",)),
    Mutant("the loaded model's buffers left out of its weights (SD3's pos_embed)", "lib_memslice/webui/planner.py",
           "        tensors = (*module.parameters(), *module.buffers())\n",
           "        tensors = (*module.parameters(),)\n",
           ("tests/test_api.py::test_with_sd3_loaded_a_named_model_credits_sd3s_weights",)),
    # --- SD3 (issue 24) ------------------------------------------------------------------------------------------
    Mutant("SD3: the joint attention left as the webui's", "lib_memslice/webui/sd3.py",
           '        put(mmdit, "attention",', '        (lambda *_: None)(mmdit, "attention",',
           (_SD3_WEBUI + "test_every_entry_slices_sd3s_joint_and_vae_attention",)),
    Mutant("SD3: the VAE's AttnBlock left as the webui's", "lib_memslice/webui/sd3.py",
           '        put(sd3_impls.AttnBlock, "forward",', '        (lambda *_: None)(sd3_impls.AttnBlock, "forward",',
           (_SD3_WEBUI + "test_every_entry_slices_sd3s_joint_and_vae_attention",)),
    Mutant("SD3: undo restores over another extension's function", "lib_memslice/webui/patching.py",
           "    if current is not None and current is _installed.get((id(owner), name)) and",
           '    if current is not None and getattr(current, "__memslice__", None) and',
           (_SD3_WEBUI + "test_undo_switching_none_and_a_checkpoint_change_restore_only_what_is_memslices",)),
    Mutant("a switch hands memslice's own function on as the webui's (SD3's attention, the VAE's forwards)",
           "lib_memslice/webui/patching.py",
           '    return getattr(current, ORIGINAL, None) if getattr(current, "__memslice__", None) else current',
           "    return current",
           (_SD3_WEBUI + "test_undo_switching_none_and_a_checkpoint_change_restore_only_what_is_memslices",
            _WEBUI_BANDS + "test_an_entry_applied_twice_still_puts_back_the_classes_own_forwards")),
    Mutant("SD3: a failed apply leaves its patches", "lib_memslice/webui/entries.py",
           "            try:\n                self.undo()\n", "            try:\n                pass\n",
           (_SD3_WEBUI + "test_an_apply_that_raises_leaves_nothing_half_patched",)),
    Mutant("SD3: undo leaves the joint attention patched", "lib_memslice/webui/entries.py",
           "        sd3.remove()\n", "",
           (_SD3_WEBUI + "test_undo_switching_none_and_a_checkpoint_change_restore_only_what_is_memslices",)),
    Mutant("SD3: the joint call's scale over the whole width", "lib_memslice/joint.py",
           "scale=d**-0.5,", "scale=inner**-0.5,", ("tests/test_joint.py",)),
    Mutant("SD3: v taken as 3-D only", "lib_memslice/joint.py",
           "        qh, kh, vh = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))",
           "        qh, kh = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k))\n"
           "        vh = v.reshape(b, -1, heads, v.shape[-1] // heads).transpose(1, 2)",
           ("tests/test_joint.py::test_every_strategy_equals_sdpa_within_its_predicted_peak",)),
    Mutant("SD3: any mask taken as a keep-mask", "lib_memslice/joint.py",
           "            if keep is None:\n                return stock(q, k, v, heads, mask)\n",
           "            if keep is None:\n                keep = mask\n",
           ("tests/test_joint.py::test_masks_pass_through",)),
    Mutant("SD3: the prompt's tokens left out of the joint site", "lib_memslice/models.py",
           "    return Geometry(SD3_PATCH_PX, True, extra_tokens=text_tokens, size_step=SD3_PATCH_PX)",
           "    return Geometry(SD3_PATCH_PX, True, extra_tokens=0, size_step=SD3_PATCH_PX)", ("tests/test_joint.py",)),
    Mutant("SD3: sizes not cut to 16 px", "lib_memslice/limits.py",
           "        if self.size_step > 8:\n", "        if False:\n",
           ("tests/test_joint.py::test_the_joint_site_counts_the_prompt_and_the_patches",)),
    Mutant("SD3: the prompt's chunks not counted in the joint site", "lib_memslice/models.py",
           "        if not self.geometry.extra_tokens or prompt_chunks <= 1:", "        if True:",
           ("tests/test_joint.py::test_the_joint_site_counts_the_prompt_and_the_patches",)),
    Mutant("SD3: T5 counted when off", "lib_memslice/job_plan.py",
           "    text = counts.text + (counts.t5 if job.t5 else 0)", "    text = counts.text + counts.t5",
           (_SD3_PLAN + "test_the_passes_are_named_for_the_mmdit_and_count_sd3s_inputs_and_weights",)),
    Mutant("SD3: the latent counted with 4 channels", "lib_memslice/job_plan.py",
           "    latent = job.spec.latent_channels\n", "    latent = 4\n",
           (_SD3_PLAN + "test_the_passes_are_named_for_the_mmdit_and_count_sd3s_inputs_and_weights",)),
    Mutant("SD3: the MMDiT's image tokens counted at 18 bytes", "lib_memslice/activations.py",
           "    4: MmditModel(JointLinear(19.0, 10.0, 14.0)", "    4: MmditModel(JointLinear(18.0, 10.0, 14.0)",
           (_SD3_PLAN + "test_the_mmdit_activation_model_holds_where_it_was_not_fitted_on_the_fake",)),
    Mutant("SD3: the MMDiT's text tokens counted at the live rate", "lib_memslice/activations.py",
           "    2: MmditModel(JointLinear(20.0, 10.0, 14.0)", "    2: MmditModel(JointLinear(20.0, 8.0, 14.0)",
           (_SD3_PLAN + "test_the_mmdit_activation_model_holds_where_it_was_not_fitted_on_the_fake",)),
    Mutant("SD3: the largest square searched in 64 px", "lib_memslice/job_plan.py",
           "    step = job.spec.cut_to or step\n", "",
           (_SD3_PLAN + "test_the_largest_square_is_a_multiple_of_16_and_a_boundary",)),
    Mutant("SD3: past 3072 px planned", "lib_memslice/job_plan.py",
           'if p.kind == "unet" and side and max(p.width, p.height) > side else "")',
           'if False else "")',
           (_SD3_PLAN + "test_past_3072_px_the_mmdit_does_not_take_it_and_the_largest_size_stops_there",)),
    Mutant("SD3: its VAE planned in bands", "lib_memslice/job_plan.py",
           ' or not job.spec.vae_bands:\n', ":\n",
           (_SD3_PLAN + "test_the_passes_are_named_for_the_mmdit_and_count_sd3s_inputs_and_weights",)),
    Mutant("SD3: its own VAE planned with ldm's VAE model", "lib_memslice/job_plan.py",
           "    if job.arch in activations.MMDITS:  # SD3's own VAE classes\n", "    if False:\n",
           (_SD3_PLAN + "test_the_passes_are_named_for_the_mmdit_and_count_sd3s_inputs_and_weights",)),
    Mutant("SD3: its VAE decode's float32 copies under autocast left out", "lib_memslice/activations.py",
           '        2: PassModel(Linear(640.0, 4.0), {"vae.mid": Linear(24.0, 0.0)}),',
           '        2: PassModel(Linear(320.0, 4.0), {"vae.mid": Linear(24.0, 0.0)}),',
           (_SD3_PLAN + "test_sd3s_vae_model_holds_where_it_was_not_fitted_on_the_fake",)),
    Mutant("SD3: errors do not name the MMDiT's pass", "lib_memslice/webui/jobs.py",
           '_PASS_PACKAGES = ("ldm.", "sgm.", "modules.models.sd3.")', '_PASS_PACKAGES = ("ldm.", "sgm.")',
           (_SD3_WEBUI + "test_a_failing_sd3_job_names_the_mmdit_or_vae_pass",)),
    Mutant("SD3: the prompt's length not watched", "lib_memslice/webui/planner.py",
           "    sd3.on_model_loaded(sd_model)\n", "",
           (_SD3_WEBUI + "test_the_loaded_model_is_planned_as_sd3_and_its_prompt_length_is_watched",)),
    Mutant("SD3: the loaded MMDiT's sites not read", "lib_memslice/models.py",
           "    if joint_blocks is not None and len(joint_blocks):", "    if False:",
           (_SD3_WEBUI + "test_the_loaded_model_is_planned_as_sd3_and_its_prompt_length_is_watched",)),
    Mutant("SD3: upcast not honoured", "lib_memslice/joint.py",
           "        upcast = host.upcast()\n", "        upcast = False\n",
           (_SD3_WEBUI + "test_the_webuis_sd3_attention_ignores_upcast_memslices_honours_it",)),
    Mutant("an unsliced fused call computes in float32 whatever sdp does", "lib_memslice/kernels.py",
           "    if q.dtype != dtype:  # upcasting (sdp's q.float(), k.float(), v.float())\n"
           "        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)",
           "    if True:\n        q, k, v = q.float(), k.float(), v.float()", ("tests/test_same_bits.py",)),
)  # fmt: skip


def _copy(dest: str) -> None:
    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {".git", "bench-out", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis", "node_modules"}
        return {n for n in names if n in skip or n.startswith(".venv") or n in (".whl", ".gl")}

    shutil.copytree(ROOT, dest, ignore=ignore, symlinks=True)


def stale(mutant: Mutant, text: str) -> str | None:
    """Why ``mutant`` no longer applies to its file's ``text`` (its text must occur exactly once); None if it does."""
    found = text.count(mutant.old)
    return None if found == 1 else f"the text to change occurs {found} times"


def run(mutant: Mutant, python: str, timeout: int) -> tuple[str, float]:
    with tempfile.TemporaryDirectory(prefix="memslice-mutant-") as tmp:
        copy = os.path.join(tmp, "project")
        _copy(copy)
        path = os.path.join(copy, mutant.path)
        with open(path) as f:
            text = f.read()
        why = stale(mutant, text)
        if why:
            return f"STALE ({why})", 0.0
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
    parser.add_argument("--jobs", type=int, default=2, help="mutants run at once, each in its own copy (CI: 2 cores)")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if args.only.lower() in m.name.lower()]
    failures = 0
    missed: list[str] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        verdicts = pool.map(lambda m: run(m, args.python, args.timeout), chosen)
        for i, (mutant, (verdict, took)) in enumerate(zip(chosen, verdicts, strict=True), 1):
            if not verdict.startswith("caught"):
                failures += 1
                missed.append(f"{verdict}: {mutant.name} ({mutant.path})")
            print(
                f"[{i}/{len(chosen)}] {verdict:<9} {mutant.name}  ({' '.join(mutant.tests)}, {took:.0f} s)", flush=True
            )
    for line in missed:  # again at the end, where a log's tail shows it
        print(f"not caught: {line}")
    print(f"{len(chosen) - failures} of {len(chosen)} mutants caught")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
