"""A bounded, thread-safe record of recent attention plans, and a per-job summary.

Forwards record from the generation thread; the status API and the UI read from others. Reads copy under the
lock and never wait on a generation for longer than a list copy. A record may also be noted (:attr:`Stats.note`:
one C-level list append, the webui's attention calls' way) and is then folded into the recent calls and the job
by the next read, the next :meth:`Stats.record` or a job's start or end: the webui reads the job once per batch
(its infotext), so what waits there is one batch's calls at most.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

from .band_costs import band_count
from .costs import format_bytes, plural


class CallRecord(NamedTuple):
    """One attention call as planned and run. A named tuple: one is made per attention call, and a frozen
    dataclass's ``__init__`` took four times as long (about 2 us)."""

    site: str
    strategy: str
    kernel_used: str  # fused | sdpa-math | einsum: what ran (the ``kernel`` setting is what was asked for)
    batch_heads: int
    q_tokens: int
    k_tokens: int
    head_dim: int
    heads_per_slice: int
    queries_per_slice: int
    slices: int
    peak_bytes: int  # predicted peak of the call's attention
    room_bytes: int  # the room the plan was made in
    retries: int = 0
    timestamp: float = 0.0  # time.time() when the call ran (the forwards set it; 0: not given)

    def as_dict(self) -> dict[str, Any]:
        return self._asdict()


@dataclass
class JobSummary:
    """What one generation (job) did, for its infotext and status line. ``decode_bands`` / ``encode_bands``: the
    most bands a VAE decode / encode of the job ran in (0: none ran in bands), ``streamed`` when one of them
    streamed its bands through host memory; ``error``: what stopped a job that failed (memslice's refusal, an
    out-of-memory error), empty for one that finished."""

    strategy: str = ""
    calls: int = 0
    sliced_calls: int = 0
    max_slices: int = 0
    max_peak_bytes: int = 0
    retries: int = 0
    failures: int = 0
    decode_bands: int = 0
    encode_bands: int = 0
    decode_streamed: bool = False
    encode_streamed: bool = False
    error: str = ""

    def add(self, record: CallRecord) -> None:
        self.strategy = record.strategy
        self.calls += 1
        self.sliced_calls += record.slices > 1
        self.max_slices = max(self.max_slices, record.slices)
        self.max_peak_bytes = max(self.max_peak_bytes, record.peak_bytes)
        self.retries += record.retries

    def add_bands(self, record: Any) -> None:
        """A VAE pass's band record (``site`` ``vae.decode`` or ``vae.encode``, ``bands``: 0 for the module's own
        forward, ``streamed``, ``tried``: the plans that ran out of memory before it)."""
        self.retries += len(getattr(record, "tried", ()))
        kind = "decode" if record.site == "vae.decode" else "encode"
        if record.bands > getattr(self, f"{kind}_bands"):
            setattr(self, f"{kind}_bands", int(record.bands))
            setattr(self, f"{kind}_streamed", bool(record.streamed))

    def banded(self) -> list[str]:
        """``VAE decode in 4 bands`` (``streamed`` when through host memory; ``VAE decode streamed`` when streamed
        in one band) per VAE pass kind that ran in bands."""
        found = []
        for kind in ("decode", "encode"):
            bands = getattr(self, f"{kind}_bands")
            if bands:
                words = band_count(bands, getattr(self, f"{kind}_streamed"))
                found.append(f"VAE {kind} {'in ' if bands > 1 else ''}{words}")
        return found

    @property
    def ran(self) -> bool:
        """Whether memslice planned anything in this job (an attention call or a VAE pass in bands)."""
        return bool(self.calls or self.decode_bands or self.encode_bands)

    def infotext(self) -> str:
        """The value of the ``Memslice`` infotext field, e.g. ``doggettx, max 8 slices, VAE decode in 4 bands``."""
        text = f"{self.strategy}, max {plural(self.max_slices, 'slice')}"
        for part in self.banded():
            text += f", {part}"
        if self.retries:
            text += f", {plural(self.retries, 'OOM retry')}"
        return text

    def line(self) -> str:
        """The one-line console/UI summary."""
        text = (
            f"memslice: {self.strategy}, {plural(self.max_slices, 'slice')} max over "
            f"{plural(self.calls, 'attention call')} ({self.sliced_calls} sliced), "
            f"predicted peak {format_bytes(self.max_peak_bytes)}, {plural(self.retries, 'retry')}"
        )
        if self.failures:
            text += f", {plural(self.failures, 'call')} did not fit"
        if self.banded():
            text += "; " + ", ".join(self.banded())
        if self.error:
            text += f"; failed: {self.error}"
        return text

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Stats:
    """Recent calls (bounded) plus the running job's summary and the last finished one."""

    def __init__(self, capacity: int = 256) -> None:
        self._lock = threading.Lock()
        self._recent: deque[CallRecord] = deque(maxlen=max(1, capacity))
        self._job = JobSummary()
        self._last_job: JobSummary | None = None
        self._calls = 0
        self._retries = 0
        self._failures = 0
        self._noted: list[CallRecord] = []
        #: record a call without folding it in yet (see the module's docstring). Why: a bound ``list.append`` is
        #: no Python call; :meth:`record`'s lock and summary cost 20 us an attention call with the caches cold.
        self.note: Callable[[CallRecord], None] = self._noted.append

    def _fold(self) -> None:
        """Fold the noted records in, oldest first (the caller holds the lock). Safe beside the generation thread's
        appends without it: the copy and the deletion each take the first ``n`` records in one step."""
        noted = self._noted
        n = len(noted)
        if not n:
            return
        records = noted[:n]
        del noted[:n]
        recent, job = self._recent, self._job
        for record in records:
            recent.append(record)
            job.add(record)
            self._retries += record.retries
        self._calls += n

    def record(self, record: CallRecord) -> None:
        with self._lock:
            self._noted.append(record)
            self._fold()

    @property
    def total_calls(self) -> int:
        with self._lock:
            self._fold()
            return self._calls

    @property
    def total_retries(self) -> int:
        with self._lock:
            self._fold()
            return self._retries

    @property
    def total_failures(self) -> int:
        with self._lock:
            return self._failures

    def record_bands(self, record: Any) -> None:
        """A VAE pass's band record (see :meth:`JobSummary.add_bands`)."""
        with self._lock:
            self._fold()
            self._job.add_bands(record)
            self._retries += len(getattr(record, "tried", ()))

    def record_failure(self) -> None:
        with self._lock:
            self._fold()
            self._job.failures += 1
            self._failures += 1

    def recent(self, limit: int | None = None) -> list[CallRecord]:
        with self._lock:
            self._fold()
            items = list(self._recent)
        return items if limit is None else items[-limit:] if limit > 0 else []

    def start_job(self, strategy: str = "") -> None:
        """Open a new job's summary (``strategy``: the active entry's, until a call records its own)."""
        with self._lock:
            self._fold()  # what was noted before belongs to the job before
            self._job = JobSummary(strategy=strategy)

    def finish_job(self, error: str = "") -> JobSummary:
        """Close the running job and return its summary (also kept as ``last_job``); ``error``: what stopped it."""
        with self._lock:
            self._fold()
            done, self._job = self._job, JobSummary()
            done.error = error
            self._last_job = done
            return JobSummary(**asdict(done))

    def current_job(self) -> JobSummary:
        with self._lock:
            self._fold()
            return JobSummary(**asdict(self._job))

    @property
    def last_job(self) -> JobSummary | None:
        with self._lock:
            return None if self._last_job is None else JobSummary(**asdict(self._last_job))
