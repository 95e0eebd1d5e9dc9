"""CrossAttention (ldm, sgm) and AttnBlock forwards built on the planner and kernels.

Nothing here imports the webui: what a forward needs from it (settings, hypernetworks, the upcast flag, an
autocast-off context, a stats sink) comes through a :class:`Host`. Tests and the benchmark pass
:class:`BasicHost`; ``webui.py`` passes one built from ``modules.*``.

One attention call is a short pipeline (:func:`attend`): describe the call -> plan it (choose the kernel, read
the room, plan the slices; :func:`plan_call`) -> run it, handling out-of-memory (:func:`run_call`) -> record it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from . import kernels, probe
from .costs import AttentionShape, GiB, KernelChoice, format_bytes, plural
from .limits import Attempt, Geometry, NotEnoughMemory, not_enough_memory, out_of_memory
from .models import LATENT_DOWNSCALE, site_of
from .settings import Settings
from .slicing import Room, SlicePlan, budget_room, plan_chain, plan_in, room_for, smallest_peak_plan
from .stats import CallRecord, Stats

#: ``torch.compiler.disable`` where torch has it (2.1 has it; the identity otherwise): planning, probing and the
#: memo's checks read files, Python state and the clock, which must stay out of ``torch.compile`` graphs.
_outside_graphs: Callable[[Any], Any] = getattr(getattr(torch, "compiler", None), "disable", lambda f: f)
#: True while dynamo traces (it folds these to True), False when eager, in one Python call:
#: ``torch.compiler.is_dynamo_compiling`` (2.3 on; ``is_compiling`` makes two), ``torch._utils.is_compiling``
#: (2.1). :func:`attend` asks it (see :data:`_attend_outside_graphs`).
_compiling: Callable[[], bool] = (getattr(getattr(torch, "compiler", None), "is_dynamo_compiling", None)
                                  or getattr(torch._utils, "is_compiling", None) or (lambda: False))  # fmt: skip

log = logging.getLogger("memslice")

_get_num_threads = torch.get_num_threads
_new_record = tuple.__new__
#: whether any device's autocast is on (torch 2.1-2.13): one C call, where asking one device parses its name
_any_autocast: Callable[[], bool] | None = getattr(torch._C, "_is_any_autocast_enabled", None)

Tensor = torch.Tensor


class Host(Protocol):
    """What a forward needs from its environment."""

    def settings(self) -> Settings: ...

    def apply_hypernetworks(self, context: Tensor) -> tuple[Tensor, Tensor]: ...

    def upcast(self) -> bool: ...

    def without_autocast(self) -> AbstractContextManager[Any]: ...

    def record(self, record: CallRecord) -> None: ...

    def record_failure(self, error: NotEnoughMemory) -> None: ...


class BasicHost:
    """A Host with fixed settings and no webui: no hypernetworks, records into its own :class:`Stats`."""

    def __init__(self, settings: Settings | None = None, upcast: bool = False, stats: Stats | None = None) -> None:
        self._settings = settings or Settings()
        self._upcast = upcast
        self.stats = stats or Stats()

    def settings(self) -> Settings:
        return self._settings

    def apply_hypernetworks(self, context: Tensor) -> tuple[Tensor, Tensor]:
        return context, context

    def upcast(self) -> bool:
        return self._upcast

    def without_autocast(self) -> AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def record(self, record: CallRecord) -> None:
        self.stats.record(record)

    def record_failure(self, error: NotEnoughMemory) -> None:
        self.stats.record_failure()

    def record_bands(self, record: Any) -> None:
        self.stats.record_bands(record)


# --- 1. describe ----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Call:
    """One attention call as planned: the tensors, their shape in the planner's terms, and what governs it."""

    q: Tensor
    k: Tensor
    v: Tensor
    mask: kernels.KeepMask | None
    shape: AttentionShape
    compute_dtype: torch.dtype
    device_kind: str
    strategy: str
    settings: Settings
    site: str
    geometry: Geometry | None
    static: tuple[Any, ...]  # what decides the shape: the memo key's first part


_shapes: dict[tuple[Any, ...], tuple[AttentionShape, torch.dtype]] = {}


def _shape_of(static: tuple[Any, ...], upcast: bool) -> tuple[AttentionShape, torch.dtype]:
    (batch, heads, q_tokens, head_dim), k_tokens, v_dim, dtype = static[:4]
    compute_dtype = torch.float32 if upcast and dtype in kernels.HALF else dtype
    shape = AttentionShape(
        batch_heads=batch * heads,
        q_tokens=q_tokens,
        k_tokens=k_tokens,
        head_dim=head_dim,
        v_dim=v_dim,
        element_size=torch.finfo(compute_dtype).bits // 8,
        io_element_size=torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 1,
        heads=max(heads, 1),
    )
    return shape, compute_dtype


def describe(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    strategy: str,
    settings: Settings,
    mask: Tensor | None = None,
    upcast: bool = False,
    site: str = "attention",
    geometry: Geometry | None = None,
) -> Call:
    static = (q.shape, k.shape[2], v.shape[-1], q.dtype, upcast)
    known = _shapes.get(static)
    if known is None:
        if len(_shapes) >= _MEMO_SIZE:
            _shapes.clear()
        known = _shapes[static] = _shape_of(static, upcast)
    shape, compute_dtype = known
    prepared = None if mask is None else kernels.keep_mask(mask, q.shape[0], k.shape[2], compute_dtype)
    kind = probe.device_kind(q.device)
    return Call(q, k, v, prepared, shape, compute_dtype, kind, strategy, settings, site, geometry, static)


# --- 2. plan ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    """A call's plan, the room it was planned in, and where that room came from."""

    plan: SlicePlan
    room: Room  # the call's room at any size of its layer
    room_bytes: int  # the room the plan was made in (free memory itself for a plan over the safety margin)
    free: probe.FreeMemory | None  # the probe's reading; None when the attention budget is set
    over_margin: bool = False  # only the safety factor refused: planned in free memory itself
    retries: int = 0
    chain: tuple[KernelChoice, ...] = ()  # the kernels the call may use, fastest first (retries move down it)

    def explain(self) -> str:
        """Where the room came from, for logs."""
        if self.free is None:
            return f"attention budget {format_bytes(self.room.free)}"
        divided = " (over the safety margin: free memory itself)" if self.over_margin else (
            f" / {self.room.divisor:g}" if self.room.divisor != 1 else "")  # fmt: skip
        return f"{format_bytes(self.free.bytes)} free ({self.free.source}){divided}"


def _kernels_to_try(call: Call) -> tuple[KernelChoice, ...]:
    """Fastest first: the fused kernel where torch runs it, then (``kernel = auto``) memslice's einsum kernel, on CPUs
    with a worker per thread, then with one (one score buffer), then without the unnormalised path's buffers."""
    first = kernels.choose_kernel(call.settings.kernel, call.q, call.k, call.v, call.compute_dtype, _bias(call))
    if call.mask is None:
        kernels.observe(call.q.device.type, call.compute_dtype, call.shape.head_dim, call.settings.kernel, first)
    # only a fused kernel's einsum fallback is chosen here; an einsum choice already carries its staging
    strided = first.kind == "fused" and kernels.strided_operands(call.q, call.k, call.v, call.compute_dtype)
    return kernels.kernels_after(first, call.settings.kernel, call.q.device.type, call.compute_dtype, strided)


def _bias(call: Call) -> Tensor | None:
    return None if call.mask is None else call.mask.bias


def read_room(call: Call, precise: bool = False) -> tuple[Room, probe.FreeMemory | None]:
    """The call's room: the attention budget when set, else the probe's reading (taken after this call's inputs
    existed, so they are added back: at any other size the room counts the inputs there)."""
    settings = call.settings
    if settings.budget_gb > 0:
        return budget_room(int(settings.budget_gb * GiB)), None
    free = probe.free_memory(call.q.device, precise)
    return _room_in(free, call.strategy, settings, call.shape), free


def _room_in(free: probe.FreeMemory, strategy: str, settings: Settings, shape: AttentionShape) -> Room:
    """A reading's room for a call of ``shape`` (one rule for the full path and the same call's lane)."""
    return room_for(strategy, free.bytes, settings.safety_factor, shape.input_bytes, free.ceiling)


def _plan_in(call: Call, choices: tuple[KernelChoice, ...], room_bytes: int, min_slices: int) -> SlicePlan | None:
    return plan_chain(call.shape, room_bytes, choices, strategy=call.strategy, slice_cap=call.settings.slice_cap,
                      device_kind=call.device_kind, min_slices=min_slices)  # fmt: skip


def _planned(
    call: Call, choices: tuple[KernelChoice, ...], room: Room, free: probe.FreeMemory | None
) -> Planned | None:
    """The call's plan (:func:`lib_memslice.slicing.plan_in`: in the room, or over the margin in free memory)."""
    plan, over_margin = plan_in(call.shape, room, choices, strategy=call.strategy,
                                slice_cap=call.settings.slice_cap, device_kind=call.device_kind)  # fmt: skip
    if plan is None:
        return None
    limit = room.limit().bytes_for(call.shape) if over_margin else room.bytes_for(call.shape)
    return Planned(plan, room, limit, free, over_margin=over_margin, chain=choices)


def _refused(
    call: Call, choices: tuple[KernelChoice, ...], room: Room, free: probe.FreeMemory | None
) -> NotEnoughMemory:
    detail = ""
    if free is not None and free.bytes <= 0:
        detail = f"the memory probe reports nothing free ({free.source}); 'Attention budget (GiB)' overrides it"
    return not_enough_memory(call.shape, room, choices, strategy=call.strategy, slice_cap=call.settings.slice_cap,
                             device_kind=call.device_kind, geometry=call.geometry, site=call.site,
                             detail=detail)  # fmt: skip


@dataclass
class _Memo:
    settings: Settings
    choices: tuple[KernelChoice, ...]
    planned: Planned | None = None
    probed_at: float = 0.0
    #: the record of ``planned`` after its site (its strategy .. retries) when :func:`attend` may run it through
    #: :func:`_same_call_again`: one slice on a fused kernel in the inputs' own dtype; else None
    again: tuple[Any, ...] | None = None
    #: with ``again`` and a probed plan: the least free bytes in which the plan still leaves the fast path's
    #: headroom (:func:`_least_free`), what :func:`_still_ample` compares a reading with
    least_free: int = 0


#: Plans are reused without probing while they left this much headroom in a room read this recently.
FAST_PATH_HEADROOM = 4
FAST_PATH_MAX_AGE_S = 0.25
_memo: dict[tuple[Any, ...], _Memo] = {}
_MEMO_SIZE = 512


def _key(
    static: tuple[Any, ...], q: Tensor, k: Tensor, v: Tensor, strategy: str, settings: Settings
) -> tuple[Any, ...]:
    """What a layer's plan depends on besides free memory: the memo's key (one function for both lanes)."""
    return (static, q.device, q.stride(-1), k.stride(-1), v.stride(-1), strategy, id(settings), _get_num_threads(),
            kernels.sdp_flags())  # fmt: skip


def _memo_key(call: Call) -> tuple[Any, ...]:
    return _key(call.static, call.q, call.k, call.v, call.strategy, call.settings)


def _reusable(memo: _Memo) -> bool:
    """The last plan of this layer still stands: it is the same plan in any larger room, and the room is the
    attention budget or was read recently with room to spare."""
    last = memo.planned
    if last is None or not last.plan.stable:
        return False
    if last.free is None:
        return True
    ample = last.room_bytes >= FAST_PATH_HEADROOM * last.plan.peak_bytes
    return ample and time.perf_counter() - memo.probed_at < FAST_PATH_MAX_AGE_S


def _found_again(last: Planned, choices: tuple[KernelChoice, ...], room: Room, call: Call) -> bool:
    """The search would find the layer's last plan again, without running it: one slice on the chain's first
    kernel, and a room at least as large as the one it was planned in (more memory never means more slices). Why:
    on a CPU a step takes longer than the fast path's age, so every call probes; the search itself is then the
    larger part of memslice's host work per call (tens of microseconds)."""
    plan = last.plan
    return (
        not last.over_margin
        and not last.retries
        and plan.slices == 1
        and plan.kernel == choices[0]
        and room.bytes_for(call.shape) >= last.room_bytes
    )


def _plan_call(call: Call) -> Planned:
    memo = None
    if call.mask is None:
        key = _memo_key(call)
        memo = _memo.get(key)
        if memo is None or memo.settings is not call.settings:
            if len(_memo) >= _MEMO_SIZE:
                _memo.clear()
            memo = _memo[key] = _Memo(call.settings, _kernels_to_try(call))
        if _reusable(memo):
            return memo.planned  # type: ignore[return-value]  # the same layer again, with plenty of memory
        choices = memo.choices
    else:
        choices = _kernels_to_try(call)
    room, free = read_room(call)
    last = memo.planned if memo is not None else None
    if last is not None and _found_again(last, choices, room, call):
        planned: Planned | None = replace(last, room=room, room_bytes=room.bytes_for(call.shape), free=free)
    else:
        planned = _planned(call, choices, room, free)
    if (planned is None or planned.plan.sliced) and call.device_kind == "cuda" and free is not None:
        # the cheap probe ignores torch's cached-but-free blocks: count them before slicing or refusing
        room, free = read_room(call, precise=True)
        planned = _planned(call, choices, room, free)
    if planned is None:
        raise _refused(call, choices, room, free)
    if memo is not None:
        memo.planned, memo.probed_at = planned, time.perf_counter()
        memo.again = _again(call, planned)
        if memo.again is not None and planned.free is not None:
            memo.least_free = _least_free(call, FAST_PATH_HEADROOM * planned.plan.peak_bytes)
    return planned


def _least_free(call: Call, needed: int) -> int:
    """The least free bytes whose room, as :func:`read_room` makes it for this call, holds ``needed``: a binary
    search of that rule (monotone in the free bytes), once per plan, so that the same call's lane compares a
    reading with one number rather than making its room (tens of microseconds with the caches cold). Past any
    reading where no room holds it."""

    def holds(free: int) -> bool:
        return (
            _room_in(probe.FreeMemory(free, ""), call.strategy, call.settings, call.shape).bytes_for(call.shape)
            >= needed
        )

    lo, hi = 0, 1 << 62
    if not holds(hi):
        return 1 << 63
    while lo < hi:
        mid = (lo + hi) // 2
        if holds(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _again(call: Call, planned: Planned) -> tuple[Any, ...] | None:
    """The record a plan's repeats take in :func:`_same_call_again` (after the site), or None where the full path
    must run them: only one slice on a fused kernel in the inputs' own dtype, logged per job (not per call)."""
    plan, shape = planned.plan, call.shape
    if (plan.kernel.kind != "fused" or plan.sliced or call.compute_dtype != call.q.dtype or shape.empty
            or shape.k_tokens == 0 or planned.retries or call.settings.log == "every call"):  # fmt: skip
        return None
    if not plan.stable or (planned.free is not None and planned.room_bytes < FAST_PATH_HEADROOM * plan.peak_bytes):
        return None  # not reusable at any age (:func:`_reusable`): the lane checks only the reading's age
    return (call.strategy, plan.kernel.kind, shape.batch_heads, shape.q_tokens, shape.k_tokens, shape.head_dim,
            plan.heads_per_slice, plan.queries_per_slice, plan.slices, plan.peak_bytes,
            planned.room_bytes, 0)  # fmt: skip


plan_call: Callable[[Call], Planned] = _outside_graphs(_plan_call)


# --- 3. run -----------------------------------------------------------------------------------------------------


def _stopped(call: Call, attempts: list[Attempt], bound: str) -> NotEnoughMemory:
    """The error once retries stop, with a fresh reading of free memory (the one planned with was wrong)."""
    free = None
    if call.settings.budget_gb <= 0:
        free = probe.free_memory(call.q.device, precise=call.device_kind == "cuda").bytes
    return out_of_memory(call.shape, attempts, bound, free=free, slice_cap=call.settings.slice_cap, site=call.site)


def _after_oom(call: Call, planned: Planned, stage: str, attempts: list[Attempt]) -> tuple[Planned, str]:
    """The plan to try after an out-of-memory error and the retry stage it starts, or NotEnoughMemory.

    Einsum and SDPA-math plans double their slices (in the room they were planned in) up to the cap, on their
    kernel or a leaner one further down the call's chain (one CPU worker instead of several); where the slices
    cannot double (the cap, or a call already cut into every row and query), a leaner kernel's smaller peak at as
    many slices. A fused plan holds little more than its output, and slicing never shrinks that: it is retried
    sliced at most once, and only when slicing shrinks its input copies; then (``kernel = auto``) the einsum
    kernel's smallest-peak plan runs once; if that also runs out, the output itself does not fit.
    """
    plan = planned.plan
    cap = call.settings.slice_cap
    if plan.kernel.kind == "fused" or stage == "einsum-last":
        if stage == "first" and plan.kernel.input_copies and plan.slices * 2 <= cap:
            again = _plan_in(call, (plan.kernel,), planned.room_bytes, plan.slices * 2)
            if again is not None:
                return replace(planned, plan=again, retries=planned.retries + 1), "fused-sliced"
        if stage != "einsum-last" and call.settings.kernel == "auto":
            einsum = replace(kernels.einsum_kernel(call.q.device.type, call.compute_dtype), workers=1)
            last = smallest_peak_plan(call.shape, 1 << 62, strategy=call.strategy, slice_cap=cap, kernel=einsum,
                                      device_kind=call.device_kind)  # fmt: skip
            if last is not None:
                return replace(planned, plan=last, retries=planned.retries + 1), "einsum-last"
        raise _stopped(call, attempts, "output")
    chain = planned.chain or (plan.kernel,)
    tail = chain[chain.index(plan.kernel) :] if plan.kernel in chain else (plan.kernel,)
    pieces = call.shape.batch_heads * call.shape.q_tokens  # a slice is at least one row and one query
    again = None
    if plan.slices * 2 <= min(cap, pieces):
        again = _plan_in(call, tail, planned.room_bytes, plan.slices * 2)
    if again is None:
        leaner = _plan_in(call, tail[1:], planned.room_bytes, plan.slices)
        if leaner is not None and leaner.peak_bytes < plan.peak_bytes:
            again = leaner
    if again is None:
        raise _stopped(call, attempts, "cap" if plan.slices * 2 > cap else "pieces" if plan.slices * 2 > pieces
                       else "memory")  # fmt: skip
    return replace(planned, plan=again, retries=planned.retries + 1), stage


def _label(kernel: KernelChoice, chain: tuple[KernelChoice, ...]) -> str:
    """A kernel as an error names it: the CPU einsum kernel's workers, and its leanest form, told apart."""
    if kernel.workers > 1:
        return f"{kernel.kind} ({kernel.workers} workers)"
    if kernel.kind == "einsum" and not kernel.unnormalised and any(k.unnormalised for k in chain):
        return f"{kernel.kind} (leanest)"
    return kernel.kind


def run_call(call: Call, planned: Planned, scale: float) -> tuple[Tensor, Planned]:
    """Run the plan; on out-of-memory drop everything the attempt held and follow :func:`_after_oom`.

    A failed attempt's partial output is never returned: each attempt writes a fresh buffer.
    """
    stage = "first"
    attempts: list[Attempt] = []
    while True:
        try:
            out = kernels.run_plan(call.q, call.k, call.v, planned.plan, scale, call.mask, call.compute_dtype)
            return out, planned
        except Exception as exc:
            if not call.settings.oom_retry or not kernels.is_oom(exc):
                raise
            # keep only the text: the traceback's frames hold the slice tensors
            failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            exc.__traceback__ = None
            del exc
        kernels.release_after_oom(call.q.device)
        before = planned.plan
        attempts.append(Attempt(_label(before.kernel, planned.chain), before.slices, before.peak_bytes))
        planned, stage = _after_oom(call, planned, stage, attempts)
        log.info(
            "memslice: out of memory at %s on the %s kernel (%s); retrying with %s on the %s kernel",
            plural(before.slices, "slice"),
            _label(before.kernel, planned.chain),
            failed,
            plural(planned.plan.slices, "slice"),
            _label(planned.plan.kernel, planned.chain),
        )


# --- 4. record --------------------------------------------------------------------------------------------------


def record(call: Call, planned: Planned, host: Host) -> None:
    plan, shape = planned.plan, call.shape
    host.record(
        CallRecord(
            site=call.site,
            strategy=call.strategy,
            kernel_used=plan.kernel.kind,
            batch_heads=shape.batch_heads,
            q_tokens=shape.q_tokens,
            k_tokens=shape.k_tokens,
            head_dim=shape.head_dim,
            heads_per_slice=plan.heads_per_slice,
            queries_per_slice=plan.queries_per_slice,
            slices=plan.slices,
            peak_bytes=plan.peak_bytes,
            room_bytes=planned.room_bytes,
            retries=planned.retries,
            timestamp=time.time(),
        )
    )
    if call.settings.log == "every call":
        log.info(
            "memslice: %s %s [%d x %d x %d, d %d] %s (%d heads x %d queries each) on the %s kernel, "
            "peak %s of %s (%s)%s",
            call.site,
            call.strategy,
            shape.batch_heads,
            shape.q_tokens,
            shape.k_tokens,
            shape.head_dim,
            plural(plan.slices, "slice"),
            plan.heads_per_slice,
            plan.queries_per_slice,
            plan.kernel.kind,
            format_bytes(plan.peak_bytes),
            format_bytes(planned.room_bytes),
            planned.explain(),
            f", {plural(planned.retries, 'OOM retry')}" if planned.retries else "",
        )


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    strategy: str,
    host: Host,
    mask: Tensor | None = None,
    upcast: bool = False,
    site: str = "attention",
    geometry: Geometry | None = None,
) -> Tensor:
    """Plan and run one attention call over ``[B, H, N, d]`` tensors; returns ``[B, H, Nq, dv]`` in q's dtype.

    Raises :class:`NotEnoughMemory` when no plan under the slice cap fits (also after out-of-memory retries).
    """
    if _compiling():  # traced: the whole call runs outside the graph, as it runs eagerly
        return _attend_outside_graphs(q, k, v, scale=scale, strategy=strategy, host=host, mask=mask, upcast=upcast,
                                      site=site, geometry=geometry)  # fmt: skip
    settings = host.settings()
    if mask is None:
        out = _same_call_again(q, k, v, scale, strategy, settings, upcast, host, site)
        if out is not None:
            return out
    call = describe(
        q, k, v, strategy=strategy, settings=settings, mask=mask, upcast=upcast, site=site, geometry=geometry
    )
    try:
        planned = plan_call(call)
        out, planned = run_call(call, planned, scale)
    except NotEnoughMemory as error:
        host.record_failure(error)
        raise
    record(call, planned, host)
    return out


#: :func:`attend` for a call dynamo meets while tracing: its planning, memo and record read files, Python state and
#: the clock, which must stay out of ``torch.compile`` graphs (torch 2.1's dynamo also failed inside them, on the
#: slotted ``Call``). Eagerly :func:`attend` asks :data:`_compiling` instead of being wrapped: the wrapper's Python
#: calls cost 15 us a call with the caches cold (``bench --parity``).
_attend_outside_graphs: Callable[..., Tensor] = _outside_graphs(attend)


#: The lane's last free-memory reading per device and when it was taken, shared by every layer.
_recent_free: dict[Any, tuple[float, probe.FreeMemory]] = {}


def _still_ample(memo: _Memo, device: torch.device) -> bool:
    """An old reading (a CPU step outlasts the fast path's age): take a recent one, and the plan stands while it
    still leaves the fast path's headroom over its peak (``memo.least_free``, from the room :func:`read_room`
    makes). Only for a memo with ``again`` and a probed plan: :func:`_again` gave it ``again`` only where the plan
    is stable and left that headroom when it was made (else the full path reads again: one reading a call, not
    two). The reading is the last one taken on ``device`` while it is at most :data:`FAST_PATH_MAX_AGE_S` old
    (:data:`_recent_free`). Why shared: a CPU step outlasts that age, so each layer's own reading is always old,
    and the 32 layers of a step would each read ``/proc`` (10-40 us a read); the rule that makes a reading good
    enough (its age, the headroom over the plan's peak) does not depend on which layer took it."""
    now = time.perf_counter()
    reading = _recent_free.get(device)
    if reading is None or now - reading[0] >= FAST_PATH_MAX_AGE_S:
        reading = _recent_free[device] = (now, probe.free_memory(device))
    if reading[1].bytes < memo.least_free:
        return False
    memo.probed_at = reading[0]  # the reading's age, not this call's: it is good for the rest of its age only
    return True


def _same_call_again(q: Tensor, k: Tensor, v: Tensor, scale: float, strategy: str, settings: Settings,
                     upcast: bool, host: Host, site: str) -> Tensor | None:  # fmt: skip
    """A layer's call again while its plan stands (see :func:`_reusable`) and runs whole on a fused kernel: the
    SDPA call :func:`lib_memslice.kernels.run_plan` would make, and its record, without the layers between them.
    Why: between two 10-40 ms calls on a CPU the caches are cold, and every Python call costs 3-10 us there
    (``bench --parity``'s profile), so the checks are written out here rather than called: the memo's key
    (:func:`_key`'s, written out: a lane keyed otherwise never runs, which tests/test_forwards.py catches),
    :func:`_reusable`'s age, the SDPA call of :func:`lib_memslice.kernels._sdpa`. None where the full path must
    run (a new plan, slices, a cast, an old reading that no longer leaves the headroom, an out-of-memory error:
    its retries are the full path's)."""
    static = (q.shape, k.shape[2], v.shape[-1], q.dtype, upcast)
    device = q.device
    memo = _memo.get((static, device, q.stride(-1), k.stride(-1), v.stride(-1), strategy, id(settings),
                      _get_num_threads(), tuple([flag() for flag in kernels._SDP_FLAG_FNS])))  # fmt: skip
    if memo is None or memo.again is None or memo.settings is not settings:
        return None
    old = memo.planned.free is not None and time.perf_counter() - memo.probed_at >= FAST_PATH_MAX_AGE_S  # type: ignore[union-attr]
    if old and not _still_ample(memo, device):
        return None
    given = None if scale == q.shape[-1] ** -0.5 else scale  # as kernels._sdpa gives it: sdp's call, to the bit
    try:
        # off, as run_plan turns it off (the dtype planned runs); asked per device only under some autocast
        if (_any_autocast is None or _any_autocast()) and kernels._autocast_enabled(device.type):
            with torch.autocast(device.type, enabled=False):
                out = F.scaled_dot_product_attention(q, k, v, scale=given)
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=given)
    except Exception as exc:
        if not (settings.oom_retry and kernels.is_oom(exc)):
            raise
        exc.__traceback__ = None  # its frames would keep the attempt's tensors alive through the full path's retry
        return None
    # tuple.__new__: a named tuple's own __new__ is a Python call (8 us cold here), the fields are the same
    host.record(_new_record(CallRecord, (site, *memo.again, time.time())))
    return out


# --- the forwards ------------------------------------------------------------------------------------------------


def make_cross_attention_forward(strategy: str, host: Host) -> Callable[..., Tensor]:
    """A ``CrossAttention.forward`` for ldm and sgm that plans every call with ``strategy``.

    Unsliced on a fused kernel it is the webui's ``sdp`` forward to the bit (the same views, the same SDPA call,
    the same casts: tests/test_same_bits.py). It differs where it must: in slices (each a smaller SDPA call, or
    memslice's own kernel), with a mask (sdp's forward cannot take one for ldm's and sgm's modules), and with
    'Upcast cross attention layer to float32' under autocast, which memslice turns off for the call so that it
    really computes in float32 whatever autocast's policy for SDPA (sdp leaves autocast on)."""

    def forward(
        self: Any,
        x: Tensor,
        context: Tensor | None = None,
        mask: Tensor | None = None,
        additional_tokens: Tensor | None = None,
        n_times_crossframe_attn_in_self: int = 0,
        **kwargs: Any,
    ) -> Tensor:
        prefix = 0
        if additional_tokens is not None:  # sgm: extra tokens attend and are dropped from the output
            prefix = additional_tokens.shape[1]
            x = torch.cat([additional_tokens, x], dim=1)
        self_attention = context is None
        context_k, context_v = host.apply_hypernetworks(x if context is None else context)
        q = self.to_q(x)
        k = self.to_k(context_k)
        v = self.to_v(context_v)
        if n_times_crossframe_attn_in_self:  # sgm's cross-frame self-attention, with sgm's exact repeat rule
            n = int(n_times_crossframe_attn_in_self)
            if x.shape[0] % n:
                raise ValueError(
                    f"memslice: batch {x.shape[0]} is not a multiple of n_times_crossframe_attn_in_self={n}"
                )
            k = k[::n].repeat_interleave(x.shape[0] // n, dim=0)
            v = v[::n].repeat_interleave(x.shape[0] // n, dim=0)
        # written out, as sdp's forward does (no generator, no context manager unless upcast): each Python call
        # costs 3-10 us here with the caches cold between two calls on a CPU (``bench --parity``)
        batch, heads = q.shape[0], self.heads
        q = q.view(batch, q.shape[1], heads, q.shape[2] // heads).transpose(1, 2)
        k = k.view(batch, k.shape[1], heads, k.shape[2] // heads).transpose(1, 2)
        v = v.view(batch, v.shape[1], heads, v.shape[2] // heads).transpose(1, 2)
        upcast = host.upcast()
        name, geometry = site_of(self, "attention.self" if self_attention else "attention.cross")
        scale = getattr(self, "scale", q.shape[-1] ** -0.5)
        if upcast:
            with host.without_autocast():
                out = attend(q, k, v, scale=scale, strategy=strategy, host=host, mask=mask, upcast=True, site=name,
                             geometry=geometry)  # fmt: skip
        else:
            out = attend(q, k, v, scale=scale, strategy=strategy, host=host, mask=mask, site=name, geometry=geometry)
        out = self.to_out(out.transpose(1, 2).reshape(batch, out.shape[2], out.shape[1] * out.shape[3]))
        return out[:, prefix:] if prefix else out

    forward.__memslice__ = strategy  # type: ignore[attr-defined]
    return forward


def _tokens_last(t: Tensor) -> Tensor:
    """``[b, c, h, w]`` -> ``[b, 1, hw, c]`` contiguous: fused kernels refuse a strided last dim (the CPU would
    fall back to einsum). One tensor at a time, so the convolution's output is freed before the next copy."""
    b, c, h, w = t.shape
    return t.reshape(b, c, h * w).transpose(1, 2).contiguous().unsqueeze(1)


def make_attnblock_forward(
    strategy: str, host: Host, fallback: Callable[..., Tensor] | None = None
) -> Callable[..., Tensor]:
    """An ``AttnBlock.forward`` (the VAE's single-head attention). With the VAE setting ``off``, runs ``fallback``.

    Not the webui's ``sdp`` call on purpose: sdp hands SDPA ``[b, hw, c]`` tensors, and torch's fused kernels take
    only 4-D ones, so sdp's VAE attention always runs SDPA's math path with its whole score matrix (1 GiB per copy
    at 1024 px in float32); memslice's ``[b, 1, hw, c]`` reaches the fused kernel, which holds none. The results
    agree to rounding (float32 within 3e-7, bfloat16 one unit in the last place), not to the bit."""

    def forward(self: Any, x: Tensor, **kwargs: Any) -> Tensor:
        if fallback is not None and host.settings().vae == "off":
            return fallback(self, x, **kwargs)
        h_ = self.norm(x)
        q = _tokens_last(self.q(h_))
        k = _tokens_last(self.k(h_))
        v = _tokens_last(self.v(h_))
        del h_
        b, _, _, c = q.shape
        h, w = x.shape[-2:]
        upcast = host.upcast()
        name, geometry = site_of(self, "vae.mid", Geometry(LATENT_DOWNSCALE, True))
        with host.without_autocast() if upcast else contextlib.nullcontext():
            out = attend(
                q, k, v, scale=int(c) ** -0.5, strategy=strategy, host=host, upcast=upcast, site=name, geometry=geometry
            )
        out = out[:, 0].transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)

    forward.__memslice__ = strategy  # type: ignore[attr-defined]
    return forward
