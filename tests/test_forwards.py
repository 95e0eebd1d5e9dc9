"""The attend pipeline: the per-layer fast path never serves a stale plan, and planning stays out of compiled graphs."""

from __future__ import annotations

import pytest
import torch

from lib_memslice import forwards, probe
from lib_memslice.costs import GiB
from lib_memslice.forwards import BasicHost, attend
from lib_memslice.settings import Settings

from .conftest import projected_qkv, reference, sdpa_math_only


@pytest.fixture(autouse=True)
def fresh_memo():
    forwards._memo.clear()
    yield
    forwards._memo.clear()


class CountingProbe:
    def __init__(self, free):
        self.free, self.calls = free, 0

    def __call__(self, device, precise=False):
        self.calls += 1
        return probe.FreeMemory(self.free, "test")


def run(host, q, k, v):
    out = attend(q, k, v, scale=0.25, strategy="auto", host=host, site="t")
    assert (out.double() - reference(q, k, v, 0.25)).abs().max() < 1e-5
    return host.stats.recent()[-1]


def test_the_same_layer_with_ample_memory_skips_probe_and_plan(monkeypatch):
    fake = CountingProbe(64 * GiB)
    monkeypatch.setattr(probe, "free_memory", fake)
    monkeypatch.setattr(forwards.time, "perf_counter", lambda: 100.0)  # the reading stays fresh on a loaded machine
    q, k, v = projected_qkv(2, 4, 128, 128, 16)
    host = BasicHost(Settings())
    first = run(host, q, k, v)
    for _ in range(5):
        again = run(host, q, k, v)
    assert fake.calls == 1 and again.slices == first.slices and again.kernel_used == first.kernel_used


def test_the_fast_path_reprobes_when_the_reading_is_old(monkeypatch):
    fake = CountingProbe(64 * GiB)
    monkeypatch.setattr(probe, "free_memory", fake)
    q, k, v = projected_qkv(2, 4, 128, 128, 16)
    host = BasicHost(Settings())
    run(host, q, k, v)
    clock = [forwards.time.perf_counter()]
    monkeypatch.setattr(forwards.time, "perf_counter", lambda: clock[0])
    clock[0] += forwards.FAST_PATH_MAX_AGE_S + 0.01
    run(host, q, k, v)
    assert fake.calls == 2


def test_an_old_reading_reprobes_but_finds_an_unsliced_first_kernel_plan_again_without_searching(monkeypatch):
    """A CPU step outlasts the fast path's age, so every call probes: with a room at least as large, the last plan
    (one slice, the chain's first kernel) is what the search would find, and the search is not run; with less room
    (a rule may slice sooner in a smaller room) it is, and the plan follows. Logged every call, so the same call's
    lane (which does not log a call) leaves these calls to the full path, as it leaves calls in another dtype."""
    fake = CountingProbe(64 * GiB)
    monkeypatch.setattr(probe, "free_memory", fake)
    searches = []
    search = forwards.plan_in
    monkeypatch.setattr(forwards, "plan_in", lambda *a, **kw: searches.append(1) or search(*a, **kw))
    described = []
    describe = forwards.describe
    monkeypatch.setattr(forwards, "describe", lambda *a, **kw: described.append(1) or describe(*a, **kw))
    q, k, v = projected_qkv(2, 4, 256, 256, 16)
    host = BasicHost(Settings(log="every call"))
    clock = [forwards.time.perf_counter()]
    monkeypatch.setattr(forwards.time, "perf_counter", lambda: clock[0])
    first = run(host, q, k, v)
    assert first.slices == 1 and first.kernel_used == "fused" and len(searches) == 1
    for free in (64 * GiB, 96 * GiB):
        clock[0] += forwards.FAST_PATH_MAX_AGE_S + 0.01
        fake.free = free
        again = run(host, q, k, v)
        assert len(searches) == 1 and again.slices == 1 and again.room_bytes >= first.room_bytes
    assert fake.calls == 3 and len(described) == 3  # each call took the full path
    clock[0] += forwards.FAST_PATH_MAX_AGE_S + 0.01
    fake.free = 3 * first.peak_bytes  # still room for one slice, under the safety factor's margin
    smaller = run(host, q, k, v)
    assert len(searches) == 2 and smaller.room_bytes < first.room_bytes and smaller.peak_bytes <= smaller.room_bytes


def test_a_plan_without_ample_headroom_is_planned_again_and_follows_the_memory(monkeypatch):
    """Memory shrinks between calls: the plan must follow, not be reused."""
    fake = CountingProbe(64 * GiB)
    monkeypatch.setattr(probe, "free_memory", fake)
    q, k, v = projected_qkv(2, 4, 256, 256, 16)
    host = BasicHost(Settings(kernel="einsum", safety_factor=1.0))
    roomy = run(host, q, k, v)
    clock = [forwards.time.perf_counter()]
    monkeypatch.setattr(forwards.time, "perf_counter", lambda: clock[0])
    clock[0] += forwards.FAST_PATH_MAX_AGE_S + 0.01  # the ample reading is old: the next call reads again
    fake.free = 300 * 1024  # 300 KiB: under the einsum plan's needs a moment ago
    tight = run(host, q, k, v)
    assert tight.slices > roomy.slices and tight.peak_bytes <= 300 * 1024
    calls = fake.calls
    run(host, q, k, v)  # no time has passed, but this plan left no ample headroom: read again
    assert fake.calls == calls + 1


def test_changed_settings_or_sdpa_switches_plan_again():
    q, k, v = projected_qkv(2, 4, 128, 128, 16)
    assert run(BasicHost(Settings(budget_gb=1)), q, k, v).kernel_used == "fused"
    assert run(BasicHost(Settings(budget_gb=1, kernel="einsum")), q, k, v).kernel_used == "einsum"
    host = BasicHost(Settings(budget_gb=1))
    assert run(host, q, k, v).kernel_used == "fused"
    with sdpa_math_only():  # the no-fused regime: torch offers no fused kernel, memslice's einsum runs
        assert run(host, q, k, v).kernel_used == "einsum"
    assert run(host, q, k, v).kernel_used == "fused"


def test_only_the_safety_margin_refusing_runs_the_smallest_peak_plan_within_free_memory(monkeypatch):
    """Free 256 KiB, safety factor 3.3: the 128 KiB output alone is over 78 KiB, yet the smallest-peak plan fits
    256 KiB: it runs (as sdp would), planned in free memory itself."""
    monkeypatch.setattr(probe, "free_memory", CountingProbe(256 * 1024))
    q, k, v = projected_qkv(2, 4, 256, 256, 16)
    record = run(BasicHost(Settings(kernel="einsum")), q, k, v)
    assert record.peak_bytes <= 256 * 1024 and record.room_bytes == 256 * 1024
    with pytest.raises(forwards.NotEnoughMemory, match="is free"):  # and past free memory itself, a clean refusal
        monkeypatch.setattr(probe, "free_memory", CountingProbe(64 * 1024))
        run(BasicHost(Settings(kernel="einsum")), q, k, v)


def test_planning_stays_out_of_compiled_graphs():
    dynamo = pytest.importorskip("torch._dynamo")
    if not hasattr(dynamo, "explain"):
        pytest.skip("this torch has no torch._dynamo.explain")
    q, k, v = projected_qkv(1, 2, 64, 64, 16)
    host = BasicHost(Settings())

    def f(q, k, v):
        return attend(q * 1.0, k, v, scale=0.25, strategy="auto", host=host) * 2

    explained = dynamo.explain(f)(q, k, v)
    reasons = " ".join(str(getattr(b, "reason", b)) for b in explained.break_reasons)
    # attend runs outside the graph (its torch.compiler.disable'd self): planning, memo, lane are never traced
    assert "attend" in reasons and explained.graph_break_count >= 1, reasons
    out = torch.compile(f, backend="eager")(q, k, v)
    assert (out.double() - 2 * reference(q, k, v, 0.25)).abs().max() < 1e-5


def test_the_same_calls_lane_is_never_traced_so_each_compiled_call_is_recorded():
    """With the layer's plan in the memo (an eager call first), a compiled call must not trace the lane: traced, its
    memo checks and its record (a list append, as the webui's host notes it) would run once, at tracing, and
    never again. Each compiled call is recorded, as each eager call is."""
    pytest.importorskip("torch._dynamo")
    q, k, v = projected_qkv(1, 2, 64, 64, 16)
    host = BasicHost(Settings())
    host.record = host.stats.note  # as WebuiHost records

    def f(q, k, v):
        return attend(q * 1.0, k, v, scale=0.25, strategy="auto", host=host) * 2

    f(q, k, v)
    compiled = torch.compile(f, backend="eager")
    for _ in range(3):
        out = compiled(q, k, v)
    assert host.stats.total_calls == 4
    assert (out.double() - 2 * reference(q, k, v, 0.25)).abs().max() < 1e-5


def test_a_stable_plan_is_reused_only_with_four_times_its_peak_free(monkeypatch):
    """The fused one-piece plan is the same at any budget above its peak; it is still re-read while the budget is
    under 4x that peak (memory may be about to run out), and reused without a probe above it."""
    fake = CountingProbe(64 * GiB)
    monkeypatch.setattr(probe, "free_memory", fake)
    q, k, v = projected_qkv(2, 4, 128, 128, 16)
    host = BasicHost(Settings(safety_factor=1.0))
    peak = run(host, q, k, v).peak_bytes
    clock = [forwards.time.perf_counter()]
    monkeypatch.setattr(forwards.time, "perf_counter", lambda: clock[0])  # no time passes from here on
    for free, probes_per_call in ((2 * peak, 1), (5 * peak, 0)):
        forwards._memo.clear()
        fake.free = free
        first = run(host, q, k, v)
        assert first.kernel_used == "fused" and first.slices == 1
        calls = fake.calls
        run(host, q, k, v)
        run(host, q, k, v)
        assert fake.calls == calls + 2 * probes_per_call, (free / peak, fake.calls - calls)


def test_the_same_call_again_skips_the_full_path_and_gives_its_bits_and_record(monkeypatch):
    """A layer's call whose plan stands and runs whole on the fused kernel takes the short lane: the same SDPA call
    (bit-equal to the full path), a record with the call's own site and time, and no describe/plan/run layers."""
    monkeypatch.setattr(forwards.time, "perf_counter", lambda: 100.0)  # the reading stays fresh
    q, k, v = projected_qkv(2, 4, 128, 77, 16)
    host = BasicHost(Settings())
    first = attend(q, k, v, scale=0.25, strategy="auto", host=host, site="a")
    described = []
    describe = forwards.describe
    monkeypatch.setattr(forwards, "describe", lambda *a, **kw: described.append(1) or describe(*a, **kw))
    again = attend(q, k, v, scale=0.25, strategy="auto", host=host, site="b")
    assert described == [] and torch.equal(again, first)
    one, two = host.stats.recent()[-2:]
    assert two.site == "b" and two._replace(site="a", timestamp=0) == one._replace(timestamp=0)
    assert two.kernel_used == "fused" and two.slices == 1 and two.timestamp >= one.timestamp > 0
    sliced = BasicHost(Settings(kernel="einsum"))  # a plan the lane does not run: the full path every time
    attend(q, k, v, scale=0.25, strategy="auto", host=sliced, site="c")
    attend(q, k, v, scale=0.25, strategy="auto", host=sliced, site="c")
    assert len(described) == 2


def test_a_plan_without_the_headroom_is_left_to_the_full_path_however_fresh_its_reading(monkeypatch):
    """The lane checks only a reading's age: a plan made where the room was under four times its peak is never
    the lane's (the full path reads free memory again at every call, as ``_reusable`` says)."""
    fake = CountingProbe(64 * GiB)
    monkeypatch.setattr(probe, "free_memory", fake)
    monkeypatch.setattr(forwards.time, "perf_counter", lambda: 100.0)  # every reading stays fresh
    q, k, v = projected_qkv(2, 4, 128, 128, 16)
    host = BasicHost(Settings(safety_factor=1.0))
    peak = run(host, q, k, v).peak_bytes
    forwards._memo.clear()
    fake.free = 3 * peak  # room for one slice, under the headroom
    assert run(host, q, k, v).slices == 1
    described = []
    describe = forwards.describe
    monkeypatch.setattr(forwards, "describe", lambda *a, **kw: described.append(1) or describe(*a, **kw))
    calls = fake.calls
    assert run(host, q, k, v).slices == 1
    assert described == [1] and fake.calls == calls + 1


def test_the_same_call_lane_runs_in_the_dtype_planned_under_autocast(monkeypatch):
    """Under autocast (torch 2.3 and later cast SDPA to bfloat16 under the CPU's) the lane turns it off for its
    SDPA call, as the full path does: a float32 layer's repeated call stays float32 and bit-equal to its first."""
    monkeypatch.setattr(forwards.time, "perf_counter", lambda: 100.0)
    q, k, v = projected_qkv(2, 4, 64, 64, 16)
    host = BasicHost(Settings())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = attend(q, k, v, scale=0.25, strategy="auto", host=host, site="a")
        monkeypatch.setattr(forwards, "describe", None)  # the lane only
        again = attend(q, k, v, scale=0.25, strategy="auto", host=host, site="a")
    assert again.dtype == first.dtype == torch.float32 and torch.equal(again, first)
    assert host.stats.recent()[-1].kernel_used == "fused"


def test_an_out_of_memory_error_in_the_same_call_lane_is_retried_by_the_full_path(monkeypatch):
    monkeypatch.setattr(forwards.time, "perf_counter", lambda: 100.0)
    q, k, v = projected_qkv(1, 2, 64, 64, 16)
    host = BasicHost(Settings())
    attend(q, k, v, scale=0.25, strategy="auto", host=host, site="a")
    real, failures = torch.nn.functional.scaled_dot_product_attention, []

    def once(*a, **kw):
        if not failures:
            failures.append(1)
            raise MemoryError("out of memory (simulated)")
        return real(*a, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", once)
    out = attend(q, k, v, scale=0.25, strategy="auto", host=host, site="a")
    assert failures == [1] and (out.double() - reference(q, k, v, 0.25)).abs().max() < 1e-5


def test_an_old_reading_in_the_same_call_lane_is_read_again_and_followed(monkeypatch):
    """A CPU step outlasts the fast path's age: the lane reads free memory again itself (one probe), runs while
    the room is still four times the plan's peak, and hands the call to the full path once it is not."""
    fake = CountingProbe(64 * GiB)
    monkeypatch.setattr(probe, "free_memory", fake)
    clock = [100.0]
    monkeypatch.setattr(forwards.time, "perf_counter", lambda: clock[0])
    q, k, v = projected_qkv(2, 4, 128, 128, 16)
    host = BasicHost(Settings(safety_factor=1.0))
    peak = run(host, q, k, v).peak_bytes
    described = []
    describe = forwards.describe
    monkeypatch.setattr(forwards, "describe", lambda *a, **kw: described.append(1) or describe(*a, **kw))
    clock[0] += forwards.FAST_PATH_MAX_AGE_S + 0.01
    calls = fake.calls
    run(host, q, k, v)
    assert described == [] and fake.calls == calls + 1
    run(host, q, k, v)  # read just now: no probe
    assert described == [] and fake.calls == calls + 1
    clock[0] += forwards.FAST_PATH_MAX_AGE_S + 0.01
    fake.free = 2 * peak  # under the headroom: the full path plans in what is free now
    record = run(host, q, k, v)
    assert described == [1] and record.room_bytes <= 2 * peak


@pytest.mark.parametrize("strategy", ["auto", "doggettx", "invokeai", "mps", "heads"])
@pytest.mark.parametrize("safety_factor", [1.0, 1.7, 3.3, 10.0])
def test_the_lanes_least_free_is_exactly_where_the_room_stops_holding_the_headroom(strategy, safety_factor):
    """The lane compares a reading with one number, found once per plan: it must be exactly the least free bytes
    whose room (as read_room makes it) holds the headroom, neither a byte over nor a byte under."""
    q, k, v = projected_qkv(2, 4, 96, 77, 16)
    call = forwards.describe(q, k, v, strategy=strategy, settings=Settings(safety_factor=safety_factor))
    for needed in (1, 4 * 1234567, 4 * 10**9 + 7):
        least = forwards._least_free(call, needed)

        def holds(free, call=call, needed=needed):
            return forwards._room_in(probe.FreeMemory(free, ""), strategy, call.settings, call.shape).bytes_for(
                call.shape) >= needed  # fmt: skip

        assert holds(least) and not holds(least - 1), (needed, least)


def test_the_lane_shares_one_recent_reading_between_layers_and_reads_again_once_it_is_old(monkeypatch):
    """A CPU step outlasts the fast path's age, so every layer's own reading is old at its next call: the layers of
    a step share one reading instead of each reading free memory, a layer that used it is good only for the rest
    of its age, and once it is old the next call reads again and follows what it finds."""
    fake = CountingProbe(64 * GiB)
    monkeypatch.setattr(probe, "free_memory", fake)
    clock = [100.0]
    monkeypatch.setattr(forwards.time, "perf_counter", lambda: clock[0])
    host = BasicHost(Settings(safety_factor=1.0))
    layers = [projected_qkv(2, 4, n, n, 16) for n in (64, 128, 192)]
    first = [run(host, *qkv) for qkv in layers]
    clock[0] += forwards.FAST_PATH_MAX_AGE_S + 0.01
    read_at, calls = clock[0], fake.calls
    again = []
    for qkv in layers:
        again.append(run(host, *qkv))
        clock[0] += 0.01
    assert fake.calls == calls + 1  # one reading for the three layers
    assert [r.room_bytes for r in again] == [r.room_bytes for r in first]
    fake.free = 2 * first[2].peak_bytes
    clock[0] = read_at + forwards.FAST_PATH_MAX_AGE_S + 0.005  # the reading is old; the last layer used it later
    assert run(host, *layers[2]).room_bytes <= 2 * first[2].peak_bytes
