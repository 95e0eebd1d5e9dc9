"""Peak live-tensor bytes of a block of code, on any device, CPU included.

On CUDA ``torch.cuda.max_memory_allocated`` answers this; elsewhere there is no allocator counter, so
:class:`PeakTracker` watches every aten op through a ``TorchDispatchMode``: each new storage an op returns adds
its bytes, and a weakref finalizer subtracts them when the storage dies. Outputs that alias an input (views,
in-place ops) are not new memory. Allocations a fused kernel makes internally and frees before returning are
invisible here; the planner adds them as a separate workspace term.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storages(tree: Any) -> list[torch.UntypedStorage]:
    return [t.untyped_storage() for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


class PeakTracker(TorchDispatchMode):
    """``with PeakTracker() as t: ...`` then ``t.peak`` (bytes above the level at entry) and ``t.current``."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}
        self._lock = threading.Lock()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {s.data_ptr() for s in _storages((args, kwargs))}
        for storage in _storages(out):
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in inputs or key in self._live:
                continue
            with self._lock:
                self._live[key] = size
                self.current += size
                self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._release, key)
        return out

    def _release(self, key: int) -> None:
        with self._lock:
            self.current -= self._live.pop(key, 0)


class CudaPeak:
    """The same interface on CUDA, from the caching allocator's own counters."""

    def __init__(self, device: torch.device | str = "cuda") -> None:
        self.device = torch.device(device)
        self.peak = 0
        self._base = 0

    def __enter__(self) -> CudaPeak:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        torch.cuda.synchronize(self.device)
        self.peak = torch.cuda.max_memory_allocated(self.device) - self._base


def peak_tracker(device: torch.device | str) -> PeakTracker | CudaPeak:
    """The right tracker for ``device``."""
    return CudaPeak(device) if torch.device(device).type == "cuda" else PeakTracker()
