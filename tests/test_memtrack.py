"""The CPU peak tracker must reproduce analytic sizes before any memory claim rests on it."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading

import pytest
import torch

from memslice_tools import memtrack
from memslice_tools.memtrack import PeakTracker

MiB = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tracker_counts_a_naive_attention_peak_exactly():
    bh, n, d = 4, 512, 16
    q = torch.randn(bh, n, d)
    score = bh * n * n * 4
    with PeakTracker() as t:
        s = torch.bmm(q, q.transpose(1, 2))  # one score matrix
        p = s.softmax(-1)  # a second while the first is alive
        del s
        out = torch.bmm(p, q)
        del p
    assert t.peak == 2 * score + 0 * out.numel()
    # what is still alive at the end: only the output
    assert t.current == bh * n * d * 4


def test_tracker_ignores_views_and_inplace_ops():
    x = torch.randn(1024, 1024)
    with PeakTracker() as t:
        y = x.view(-1)[:10]
        x.mul_(2)
        z = x.t()
        torch.mul(x, 2, out=x)  # an out= op whose output is already big enough
    assert t.peak == 0
    del y, z


def test_tracker_releases_freed_tensors():
    with PeakTracker() as t:
        for _ in range(10):
            a = torch.empty(1 << 20, dtype=torch.uint8)
            del a
    assert t.peak == 1 << 20
    assert t.current == 0


def test_current_drops_when_tensors_die_inside_the_block():
    with PeakTracker() as t:
        a = torch.empty(MiB, dtype=torch.uint8)
        b = torch.empty(2 * MiB, dtype=torch.uint8)
        assert t.current == 3 * MiB
        view = b[:10]
        del b  # the view keeps the storage alive
        assert t.current == 3 * MiB
        del view
        assert t.current == MiB
        c = torch.empty(MiB, dtype=torch.uint8)  # fits where b was: the peak does not move
        assert (t.current, t.peak) == (2 * MiB, 3 * MiB)
        del a, c
        assert t.current == 0
    assert (t.peak, t.current) == (3 * MiB, 0)


def test_resize_in_place_counts_the_growth():
    before = torch.empty(0, dtype=torch.uint8)  # allocated before the block: only its growth counts
    with PeakTracker() as t:
        before.resize_(MiB)
        inside = torch.empty(16, dtype=torch.uint8)
        inside.resize_(4 * MiB)  # 16 bytes when created, then grown
        assert t.current == 5 * MiB
        inside.resize_(8)  # tensor resize_ never shrinks a storage
        before.add_(1)
    assert (t.peak, t.current) == (5 * MiB, 5 * MiB)
    del inside
    assert t.current == MiB  # read after exit: still follows deaths
    del before
    assert t.current == 0
    assert t.peak == 5 * MiB


def test_out_argument_that_grows_counts_the_growth():
    a, b = torch.randn(256, 128), torch.randn(128, 512)
    out = torch.empty(0)
    with PeakTracker() as t:
        torch.mm(a, b, out=out)  # resized from 0 to 256 x 512 floats
        torch.mm(a, b, out=out)  # already big enough: nothing new
        small = torch.empty(4)
        torch.add(a, 1, out=small)  # created inside (16 bytes), grown to a's size
    assert t.peak == 256 * 512 * 4 + 256 * 128 * 4
    assert t.current == t.peak
    del out, small
    assert t.current == 0


@pytest.mark.skipif(
    not hasattr(torch.ops.inductor, "resize_storage_bytes_"), reason="this torch has no op that shrinks a storage"
)
def test_storage_shrunk_in_place_gives_back_what_was_counted():
    resize_storage = torch.ops.inductor.resize_storage_bytes_
    old = torch.empty(MiB, dtype=torch.uint8)
    with PeakTracker() as t:
        fresh = torch.empty(MiB, dtype=torch.uint8)
        resize_storage(fresh, 0)
        assert t.current == 0
        resize_storage(old, 3 * MiB)  # grows by 2 MiB, which counts
        assert t.current == 2 * MiB
        resize_storage(old, 0)  # the entry level was MiB: never below it
        assert t.current == 0
        resize_storage(fresh, 100)
    assert (t.peak, t.current) == (2 * MiB, 100)
    del fresh, old


def test_storage_death_not_a_python_wrapper():
    """torch 2.1 makes a new Python wrapper per ``untyped_storage()`` call: the wrapper dying frees nothing."""
    with PeakTracker() as t:
        x = torch.empty(MiB, dtype=torch.uint8)
        wrapper = x.untyped_storage()
        del wrapper
        gc.collect()
        x.add_(1)  # any op sweeps
        assert t.current == MiB
        del x
        torch.empty(0)
        assert t.current == 0
    assert t.peak == MiB


def test_memory_from_before_the_block_is_the_baseline():
    old = torch.empty(4 * MiB, dtype=torch.uint8)
    with PeakTracker() as t:
        del old  # freeing what existed at entry takes nothing off
        y = torch.empty(MiB, dtype=torch.uint8)
    assert (t.peak, t.current) == (MiB, MiB)
    del y


def test_trackers_in_two_threads_count_their_own_ops():
    results: dict[int, tuple[int, int]] = {}
    barrier = threading.Barrier(2)

    def work(i: int) -> None:
        with PeakTracker() as t:
            barrier.wait()
            keep = [torch.empty((i + 1) * MiB, dtype=torch.uint8) for _ in range(20)]
            del keep[:10]
            barrier.wait()
            torch.empty(0)
        results[i] = (t.peak, t.current)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert results == {i: (20 * (i + 1) * MiB, 10 * (i + 1) * MiB) for i in range(2)}


_probe = torch.zeros(1)
WRAPPERS_KEPT = _probe.untyped_storage() is _probe.untyped_storage()


@pytest.mark.skipif(not WRAPPERS_KEPT, reason="this torch makes a new storage wrapper per call: no fallback here")
def test_python_weakref_fallback_where_wrappers_are_kept(monkeypatch):
    monkeypatch.setattr(memtrack, "_StorageRef", memtrack._PyStorageRef)
    with PeakTracker() as t:
        a = torch.empty(MiB, dtype=torch.uint8)
        del a
        b = torch.empty(MiB, dtype=torch.uint8)
    assert (t.peak, t.current) == (MiB, MiB)
    del b
    assert t.current == 0


def test_interpreter_exits_cleanly_with_live_tracked_storages():
    code = (
        "import torch\n"
        "from memslice_tools.memtrack import PeakTracker\n"
        "t = PeakTracker()\n"
        "with t:\n"
        "    keep = [torch.empty(1000) for _ in range(50)]\n"
        "    keep.append(torch.empty(0).resize_(100))\n"
        "    gone = torch.empty(10); del gone\n"
        "assert t.current == 50 * 4000 + 400, t.current\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr[-2000:]
