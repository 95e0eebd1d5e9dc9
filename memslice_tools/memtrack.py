"""Peak live-tensor bytes of a block of code, on any device, CPU included.

On CUDA ``torch.cuda.max_memory_allocated`` answers this; elsewhere there is no allocator counter, so
:class:`PeakTracker` watches every aten op through a ``TorchDispatchMode`` and keeps its own count:

- each new storage an op returns adds its bytes;
- a storage that grows in place (``resize_``, an ``out=`` tensor resized to fit) adds the growth: the tracker reads
  the size of every storage an op receives before the op runs and compares it with the size after;
- outputs that alias an input without growing it (views, in-place ops) add nothing;
- a storage's counted bytes are released when the storage itself dies. Storages are keyed by their C++
  ``StorageImpl`` (``_cdata``), not by a Python wrapper (torch 2.1 makes a new wrapper on every
  ``untyped_storage()`` call, so a finalizer on one fires at once or never), and held through a C++ weak reference,
  which frees nothing but keeps the key from being reused; dead storages are swept at every op and whenever
  ``current`` is read (so it keeps following deaths after the block).

Only memory allocated inside the block counts: ``peak`` and ``current`` are bytes above the level at entry, so a
storage that existed at entry adds its growth, and its death subtracts only that growth. The mode sees the ops of
the thread that entered it (torch keeps dispatch modes per thread). Allocations a kernel makes internally and frees
before returning (a fused attention kernel's scratch, a matmul's packing buffers) are invisible here; the planner
adds them as a separate workspace term.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# C++ weak references to a StorageImpl: on torch 2.1 and 2.13 alike (torch.multiprocessing uses them the same way).
_EXPIRED = getattr(torch.UntypedStorage, "_expired", None)
_FREE_WEAK_REF = getattr(torch.UntypedStorage, "_free_weak_ref", None)
_HAS_CXX_WEAK_REF = _EXPIRED is not None and _FREE_WEAK_REF is not None and hasattr(torch.UntypedStorage, "_weak_ref")


class _CxxStorageRef:
    """A weak reference to one ``StorageImpl``: does not keep its memory alive, keeps its address from reuse."""

    __slots__ = ("_free", "cdata")

    def __init__(self, storage: torch.UntypedStorage) -> None:
        self.cdata = storage._weak_ref()
        # a direct reference: module globals may already be cleared when this dies at interpreter exit
        self._free = _FREE_WEAK_REF

    def expired(self) -> bool:
        return bool(_EXPIRED(self.cdata))  # type: ignore[misc]

    def __del__(self) -> None:
        free, self._free = self._free, None
        if free is not None:
            free(self.cdata)


class _PyStorageRef:
    """Fallback for a torch without the C++ weak-reference calls: a weakref to the Python storage object, which is
    only right where torch keeps one Python object per storage (2.13 does, 2.1 does not; 2.1 has the C++ calls)."""

    __slots__ = ("_ref",)

    def __init__(self, storage: torch.UntypedStorage) -> None:
        self._ref = weakref.ref(storage)

    def expired(self) -> bool:
        return self._ref() is None


_StorageRef: type[_CxxStorageRef] | type[_PyStorageRef] = _CxxStorageRef if _HAS_CXX_WEAK_REF else _PyStorageRef


def _storages(tree: Any, meta: bool = False) -> dict[int, torch.UntypedStorage]:
    """The distinct storages in ``tree`` (tensors and bare storages), keyed by ``StorageImpl`` identity; ``meta``
    storages (which hold no memory) only when ``meta``."""
    found: dict[int, torch.UntypedStorage] = {}
    for leaf in tree_flatten(tree)[0]:
        if isinstance(leaf, torch.Tensor):
            try:
                storage = leaf.untyped_storage()
            except (RuntimeError, NotImplementedError, TypeError):  # sparse, nested, storage-less subclasses
                continue
        elif isinstance(leaf, torch.UntypedStorage):
            storage = leaf
        else:
            continue
        if meta or storage.device.type != "meta":
            found.setdefault(storage._cdata, storage)
    return found


class PeakTracker(TorchDispatchMode):
    """``with PeakTracker() as t: ...`` then ``t.peak`` (bytes above the level at entry) and ``t.current``.

    ``meta=True`` also counts ``meta`` tensors as if they held their bytes: the same code traced on shapes alone
    (the benchmark's largest-size search) allocates exactly what it would allocate for real. ``limit`` makes an
    allocation past that many live bytes raise ``MemoryError``, as a device that size would.
    """

    def __init__(self, meta: bool = False, limit: int | None = None) -> None:
        super().__init__()
        self.meta = meta
        self.limit = limit  # raise MemoryError as soon as more than this is live (a traced call that cannot fit)
        self.peak = 0
        self._current = 0
        # StorageImpl identity -> [weak reference, bytes counted for it]
        self._live: dict[int, list[Any]] = {}
        self._lock = threading.Lock()

    @property
    def current(self) -> int:
        """Bytes allocated inside the block that are still alive (storages that died since the last op swept)."""
        with self._lock:
            self._sweep()
            return self._current

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        inputs = _storages((args, kwargs), self.meta)
        before = {key: storage.nbytes() for key, storage in inputs.items()}
        out = func(*args, **kwargs)
        after = _storages((args, kwargs, out), self.meta)  # the inputs again: an op may repoint a tensor
        for key, storage in inputs.items():
            after.setdefault(key, storage)
        with self._lock:
            self._sweep()  # first: storages that died since the last op no longer count at this op's peak
            for key, storage in after.items():
                size = storage.nbytes()
                if key in before:
                    if size != before[key]:
                        self._grow(key, storage, size - before[key])
                elif size and key not in self._live:
                    self._live[key] = [_StorageRef(storage), size]
                    self._current += size
            self.peak = max(self.peak, self._current)
            over = self.limit is not None and self._current > self.limit
        if over:
            raise MemoryError(f"traced allocation over the limit: {self._current} > {self.limit} bytes")
        return out

    def _grow(self, key: int, storage: torch.UntypedStorage, delta: int) -> None:
        """In-place size change of a storage (caller holds the lock); shrinking never goes below what was counted."""
        entry = self._live.get(key)
        if entry is None:
            if delta <= 0:
                return  # memory from before the block got smaller: not ours to count
            entry = self._live[key] = [_StorageRef(storage), 0]
        delta = max(delta, -entry[1])
        entry[1] += delta
        self._current += delta

    def _sweep(self) -> None:
        """Release the bytes of every storage that died (caller holds the lock)."""
        dead = [key for key, entry in self._live.items() if entry[0].expired()]
        for key in dead:
            self._current -= self._live.pop(key)[1]


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
