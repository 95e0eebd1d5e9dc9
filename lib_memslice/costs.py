"""The cost model: bytes one attention call allocates beyond its inputs, per kernel and per chunking.

Every term was measured on the real kernels (live-tensor tracker plus the profiler's in-op events), not copied
from the webui's rules' multipliers:

- ``fused`` (SDPA flash / memory-efficient / cuDNN): the output, a float32 log-sum-exp per query row, the kernel's
  own scratch (per thread on CPU, see :mod:`lib_memslice.cpu_scratch`), CUDA's memory-efficient kernel's float32
  output accumulator for half precision head dims over 128, and only the copies of the inputs the call really makes
  (a cast to the compute dtype, a contiguous or padded copy).
- ``einsum`` (memslice's own matmul kernel): one score buffer reused by every chunk (scores are computed into it,
  soft-maxed in place and multiplied into the preallocated output), plus reused cast buffers when computing in a
  wider dtype than the inputs. A chunk of several batch items is run one item at a time through the same buffer.
- ``sdpa-math`` (torch's SDPA reference path): the scores twice (scaled scores and softmax), computed in float32
  for half precision inputs, plus the copies the math path makes.
- ``stock`` (ldm's own ``AttnBlock``: bmm, scale, softmax, bmm; what the webui runs with memslice's VAE setting
  ``off``): the scores twice. Planned, never run by memslice.

Pure arithmetic: no torch here, so the planner, the CLI and the HTTP API share it without touching a device.
"""

from __future__ import annotations

from dataclasses import dataclass

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

#: What can run one chunk. "fused": SDPA flash / memory-efficient / cuDNN (no score matrix); "sdpa-math": SDPA's
#: reference path; "einsum": memslice's matmul + in-place softmax + matmul into one reused score buffer; "stock":
#: ldm's AttnBlock as the webui runs it when memslice leaves the VAE alone (planned only, in one piece).
KERNEL_KINDS = ("fused", "sdpa-math", "einsum", "stock")
#: ldm's stock AttnBlock holds the scaled scores and their softmax at once: 2 x the scores beyond its q, k, v (live
#: tensors and the profiler's in-op replay on CPU, torch 2.1.2 and 2.13, fp32 and bf16: 2.000 x, the output later).
STOCK_SCORE_COPIES = 2

LSE_BYTES = 4  # the fused kernels keep one float32 log-sum-exp per query row
FUSED_SCALARS = 64  # torch 2.1's CPU flash op also returns four 0-d int64 and one 0-d float32 tensor (36 bytes)


def format_bytes(n: float) -> str:
    """Human-readable binary size, e.g. ``1.5 GiB``."""
    n = float(n)
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def plural(n: int, word: str) -> str:
    """``1 slice``, ``8 slices``; ``retry`` becomes ``retries``."""
    if n == 1:
        return f"{n} {word}"
    return f"{n} {word[:-1]}ies" if word.endswith("y") else f"{n} {word}s"


@dataclass(frozen=True)
class AttentionShape:
    """One attention call: ``batch_heads`` rows (batch items x heads) of ``q_tokens`` queries against ``k_tokens``
    keys. ``element_size`` is the compute element size (after upcast), ``io_element_size`` that of q/k/v and the
    output; ``heads`` is the number of heads per batch item."""

    batch_heads: int
    q_tokens: int
    k_tokens: int
    head_dim: int
    v_dim: int = 0
    element_size: int = 4
    io_element_size: int = 0
    heads: int = 0

    def __post_init__(self) -> None:
        for name in ("batch_heads", "q_tokens", "k_tokens", "head_dim", "v_dim", "heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"AttentionShape.{name} must be a non-negative int, got {value!r}")
        for name in ("element_size", "io_element_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value > 16:
                raise ValueError(f"AttentionShape.{name} must be an int in 0..16, got {value!r}")
        if self.element_size == 0:
            raise ValueError("AttentionShape.element_size must be positive")
        if self.v_dim == 0:
            object.__setattr__(self, "v_dim", self.head_dim)
        if self.io_element_size == 0:
            object.__setattr__(self, "io_element_size", self.element_size)
        if self.heads == 0:
            object.__setattr__(self, "heads", max(self.batch_heads, 1))
        elif self.batch_heads % self.heads:
            raise ValueError(f"AttentionShape.heads ({self.heads}) must divide batch_heads ({self.batch_heads})")

    @property
    def batch(self) -> int:
        return self.batch_heads // self.heads if self.batch_heads else 0

    @property
    def empty(self) -> bool:
        return self.batch_heads == 0 or self.q_tokens == 0

    @property
    def cast(self) -> bool:
        """Whether the call computes in a wider dtype than its inputs (upcast)."""
        return self.element_size != self.io_element_size

    @property
    def score_bytes(self) -> int:
        """Bytes of the full score matrix at the compute element size."""
        return self.batch_heads * self.q_tokens * self.k_tokens * self.element_size

    @property
    def output_bytes(self) -> int:
        return self.batch_heads * self.q_tokens * self.v_dim * self.io_element_size

    @property
    def input_bytes(self) -> int:
        """q, k and v as the call receives them (they grow with the image like the output does)."""
        b, q, k = self.batch_heads, self.q_tokens, self.k_tokens
        return (b * q * self.head_dim + b * k * (self.head_dim + self.v_dim)) * self.io_element_size


@dataclass(frozen=True)
class KernelChoice:
    """The kernel that runs a call and the cost terms only it has.

    ``scratch``: bytes allocated and freed inside the kernel per call (CPU flash: per-thread buffers; CUDA: library
    scratch), or per running slice on the einsum kernel (a half-precision GEMM's scratch on CPUs).
    ``output_extra``: bytes per element of a slice's output the kernel allocates besides the output (CUDA's
    memory-efficient kernel: a float32 accumulator in half precision for value dims over 128; the einsum kernel on
    accelerators: a possible contiguous temporary of the slice's output and the softmax's row statistics).
    ``input_copies``: copies of a chunk's q/k/v the fused call makes (cast, contiguous or padded copy); ``None``
    assumes the worst (one, two when casting). ``backend`` names the SDPA backend for reports ("flash",
    "efficient", "cudnn", "math", or "" when unknown). ``workers``: slices run at once, each with its own buffers
    (memslice's einsum kernel on CPUs: one single-threaded worker per torch thread). ``unnormalised``: the einsum
    kernel may skip the softmax's max and scaling passes for heads whose logits are bounded (float32 and bfloat16 on
    CPUs, see :func:`takes_unnormalised`). ``staged``: the einsum kernel copies each run's keys and values and each
    slice's queries into contiguous buffers first (a CPU GEMM in half precision clones strided operands inside the
    op on every slice, unseen and uncounted otherwise: q, k and v viewed as heads of ``[B, N, H*d]`` projections are
    strided).
    """

    kind: str
    scratch: int = 0
    output_extra: int = 0
    input_copies: int | None = None
    backend: str = ""
    workers: int = 1
    unnormalised: bool = False
    staged: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KERNEL_KINDS:
            raise ValueError(f"unknown kernel {self.kind!r}; expected one of {KERNEL_KINDS}")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"KernelChoice.workers must be a positive int, got {self.workers!r}")


def takes_unnormalised(kernel: KernelChoice) -> bool:
    """Whether an einsum call allocates the unnormalised path's buffers: per worker each slice row's sum, and the
    norms of a run's keys and a slice's queries. The kernel runs the path where this holds and the cost model counts
    it: one rule for both. At every value dim measured (40-512, one thread, 1024 queries x 4096 keys, torch 2.1.2 and
    2.13) ``exp2``, a row sum, the value GEMM and the division took 0.83-0.98x the softmax and its value GEMM."""
    return kernel.kind == "einsum" and kernel.unnormalised


#: What one half-precision (bf16 / fp16) GEMM of memslice's einsum kernel allocates and frees inside the op on a
#: CPU (oneDNN's packing and scratch; fp16 converts blocks to float32). In a profiler replay over slices of 1-16
#: rows, 7-4096 queries, 77-16384 keys and head dims 16-512 with 1 and 2 threads on torch 2.1.2, 2.3.1 and 2.13: at
#: most 128 KiB + 1.75 x the float32 size of the GEMM's operands (fp16's smallest blocks take 170 KiB; some tiny
#: GEMMs take nothing), and never over 3.66 MiB (the GEMM's blocking: 16384 keys take what 4096 do). float32 GEMMs
#: allocate nothing (MKL). The einsum kernel's ``scratch`` on CPUs in half precision is the cap; each worker runs
#: one GEMM at a time.
HALF_GEMM_SCRATCH = 4 * 1024 * 1024
HALF_GEMM_FIXED = 128 * 1024
HALF_GEMM_PER_OPERAND_BYTE = 2


def gemm_scratch(shape: AttentionShape, rows: int, queries_per_slice: int, kernel: KernelChoice,
                 capped: bool | None = None) -> int:  # fmt: skip
    """In-op scratch of one einsum slice's GEMMs (``kernel.scratch`` is its cap; 0 where they allocate none).
    ``capped``: None the bound, True the cap alone, False the growing term alone (the bound is the smaller of the
    two, so the planner can solve each as a line)."""
    if kernel.kind != "einsum" or kernel.scratch <= 0:
        return 0
    # the larger of the two GEMMs' operands in float32: the scores, and queries and keys or values and output
    width = max(shape.head_dim, shape.v_dim)
    operands = 4 * rows * (queries_per_slice * shape.k_tokens + (queries_per_slice + shape.k_tokens) * width)
    grows = HALF_GEMM_FIXED + HALF_GEMM_PER_OPERAND_BYTE * operands
    if capped is None:
        return min(kernel.scratch, grows)
    return kernel.scratch if capped else grows


EINSUM = KernelChoice("einsum")
FUSED = KernelChoice("fused")


def chunk_rows(shape: AttentionShape, heads_per_slice: int, kernel: str) -> int:
    """Rows of batch x heads one chunk computes at once. The einsum kernel runs a chunk one batch item at a time
    through one buffer, so its rows never exceed one item's heads."""
    rows = min(heads_per_slice, shape.batch_heads)
    return min(rows, shape.heads) if kernel == "einsum" else rows


def chunk_bytes(shape: AttentionShape, heads_per_slice: int, queries_per_slice: int, kernel: KernelChoice,
                capped: bool | None = None) -> int:  # fmt: skip
    """Bytes allocated while one chunk runs, excluding the preallocated output (an upper bound, per kernel);
    ``capped``: see :func:`gemm_scratch`."""
    ces = shape.element_size
    d, dv, nk = shape.head_dim, shape.v_dim, shape.k_tokens
    rows = chunk_rows(shape, heads_per_slice, kernel.kind)
    q_c = rows * queries_per_slice * d
    kv_c = rows * nk * (d + dv)
    o_c = rows * queries_per_slice * dv
    s_c = rows * queries_per_slice * nk
    if kernel.kind == "fused":
        copies = (2 if shape.cast else 1) if kernel.input_copies is None else kernel.input_copies
        return (
            o_c * ces
            + rows * queries_per_slice * LSE_BYTES
            + o_c * kernel.output_extra
            + kernel.scratch
            + FUSED_SCALARS
            + copies * (q_c + kv_c) * ces
        )
    if kernel.kind == "stock":
        return STOCK_SCORE_COPIES * s_c * ces
    if kernel.kind == "sdpa-math":
        # torch computes half precision in float32 on this path; since 2.5 its safe softmax also keeps a boolean
        # per score (which rows are fully masked): 9 bytes per score measured on CUDA in every dtype
        mes = max(ces, 4)
        return 2 * s_c * mes + s_c + 3 * (q_c + kv_c) * mes + o_c * (mes + ces)
    # einsum: the score buffer; when casting, reused buffers for the cast k, v, q and the chunk's output; on
    # accelerators a possible contiguous temporary of one slice's output and the softmax's row statistics; the
    # unnormalised path's row sums and the norms of a run's keys and a slice's queries with each row's largest;
    # staged, the contiguous copies of one run's keys and values and one slice's queries
    unnormalised = rows * (nk + 2 * queries_per_slice + 2) * ces if takes_unnormalised(kernel) else 0
    if shape.cast:
        copies = (kv_c + q_c + o_c) * ces + unnormalised
    else:
        copies = unnormalised + ((kv_c + q_c) * ces if kernel.staged else 0)
    return s_c * ces + o_c * kernel.output_extra + copies + gemm_scratch(shape, rows, queries_per_slice, kernel, capped)


def peak_bytes(shape: AttentionShape, heads_per_slice: int, queries_per_slice: int, kernel: KernelChoice) -> int:
    """Predicted peak of the whole attention call for this chunking: the output plus the largest chunk.

    An SDPA call in one piece returns the kernel's own output (cast back afterwards when computing wider); every
    other plan writes into an output allocated up front.
    """
    if shape.empty:
        return shape.output_bytes
    heads_per_slice = min(heads_per_slice, shape.batch_heads)
    queries_per_slice = min(queries_per_slice, shape.q_tokens)
    chunk = chunk_bytes(shape, heads_per_slice, queries_per_slice, kernel)
    whole = heads_per_slice >= shape.batch_heads and queries_per_slice >= shape.q_tokens
    if whole and kernel.kind != "einsum":
        if not shape.cast:
            return chunk
        # the cast back to the io dtype runs once the kernel's inputs and scratch are gone
        wide = shape.batch_heads * shape.q_tokens * shape.v_dim * shape.element_size
        return max(chunk, wide + shape.output_bytes)
    # a sliced plan runs ``workers`` slices at once, each in its own buffers (one slice: one worker)
    return shape.output_bytes + (1 if whole else kernel.workers) * chunk


def queries_in_room(shape: AttentionShape, heads_per_slice: int, kernel: KernelChoice, room: int) -> int | None:
    """The most queries per slice a *sliced* plan with these rows may take in ``room`` (None: not even 0 fit;
    a huge number where queries cost nothing), solved instead of searched. The peak is affine in the query chunk
    except the GEMM scratch, which is the smaller of a cap and a line: so the peak is the smaller of two lines,
    and a chunk fits when it fits under either. Never falls as the room grows."""
    fixed = shape.output_bytes
    best = None
    for capped in (None,) if gemm_scratch(shape, 1, 0, kernel) == 0 else (False, True):
        zero = fixed + kernel.workers * chunk_bytes(shape, heads_per_slice, 0, kernel, capped)
        one = fixed + kernel.workers * chunk_bytes(shape, heads_per_slice, 1, kernel, capped)
        if zero > room:
            continue
        fitting = (room - zero) // (one - zero) if one > zero else 1 << 62
        best = fitting if best is None else max(best, fitting)
    return best
