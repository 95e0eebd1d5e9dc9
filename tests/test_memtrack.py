"""The CPU peak tracker must reproduce analytic sizes before any memory claim rests on it."""

from __future__ import annotations

import torch

from lib_memslice.memtrack import PeakTracker


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
    assert t.peak == 0
    del y, z


def test_tracker_releases_freed_tensors():
    with PeakTracker() as t:
        for _ in range(10):
            a = torch.empty(1 << 20, dtype=torch.uint8)
            del a
    assert t.peak == 1 << 20
    assert t.current == 0
