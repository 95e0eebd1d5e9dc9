"""One generation: its slicing summary (infotext, console line) and, when it fails for memory, what the error says.

A memslice entry's ``apply()`` wraps the webui's ``processing.process_images_inner`` (txt2img, img2img and the API
reach it through ``process_images``) and its ``undo()`` unwraps it. For an out-of-memory error on its way out, from
memslice's own planner or from torch (a VAE decoder convolution, a hires UNet ResBlock), the wrapper reads the
innermost ldm/sgm ``UNetModel``, ``Decoder`` or ``Encoder`` forward in the traceback and the size of its input,
names the pass as the job planner does, and adds the largest size at which the whole job fits, planned with the
memory free when the job started (read precisely at its start). Any error on its way out also closes the job's
summary (the webui runs no ``postprocess`` then): the status's ``last_job`` is the failed job, with what stopped it.
"""

from __future__ import annotations

import functools
import logging
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from .. import kernels, probe
from ..costs import format_bytes
from ..limits import NotEnoughMemory
from . import planner
from .host import HOST, STATS, active_entry, device

log = logging.getLogger("memslice")

#: a weak reference to the running job, its starting free memory, and whether its summary is open (started by
#: ``process``, not yet closed by ``postprocess`` or a failure)
_running: dict[str, Any] = {"p": None, "free": None, "open": False}


def _infotext(**_: Any) -> str | None:
    job = STATS.current_job()
    return job.infotext() if job.ran else None


def on_job_start(p: Any) -> None:
    """From the AlwaysVisible script's ``process``: reset the job summary, read free memory (precisely) for the
    failure context, promise an infotext field."""
    entry = active_entry()
    if entry is None:
        return
    STATS.start_job(entry.strategy)
    _running["open"] = True
    try:
        _running["p"] = weakref.ref(p)
    except TypeError:
        _running["p"] = None
    try:
        _running["free"] = probe.free_memory(device(), precise=True)
    except Exception:  # never costs a generation
        _running["free"] = None
    try:
        p.extra_generation_params["Memslice"] = _infotext  # evaluated per image, after that image's attention ran
    except Exception as exc:
        log.warning("memslice: could not add the infotext field: %s", exc)


def on_job_end(p: Any = None, processed: Any = None) -> None:
    if active_entry() is None:
        return
    _running.update(p=None, open=False)
    job = STATS.finish_job()
    if job.ran and HOST.settings().log != "off":
        log.info("%s", job.line())


def error_words(exc: BaseException) -> str:
    """What stopped a job, in a few words: memslice's refusal or error up to its first clause (``not enough memory
    for the VAE encode``), another error's type and first clause (``OutOfMemoryError: CUDA out of memory``)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    ours = isinstance(exc, NotEnoughMemory)
    if ours:
        text = text.removeprefix("memslice: ")
    cut = min((i for i in map(text.find, (": ", "; ", ". ", " (")) if i >= 0), default=len(text))
    text = text[:cut].rstrip(".")
    if len(text) > 120:
        text = text[:119] + "\u2026"
    if ours:
        return text or "not enough memory"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def on_job_failed(p: Any, exc: BaseException) -> None:
    """A job that raised (memslice refused a pass, torch ran out of memory, anything): the webui runs no
    ``postprocess`` then, so the job is closed here and ``last_job`` is this job with what stopped it, never the one
    before. A job that failed before ``process`` opened its summary is closed empty."""
    entry = active_entry()
    if entry is None:
        return
    if not _running.get("open"):
        STATS.start_job(entry.strategy)  # nothing of this job was recorded: what was recorded since belongs to no job
    _running.update(p=None, open=False)
    job = STATS.finish_job(error_words(exc))
    if HOST.settings().log != "off":
        log.info("%s", job.line())


# --- the failing pass -------------------------------------------------------------------------------------

#: the modules whose forward marks a pass, and the factor from their first tensor's last two dims to pixels: ldm's
#: and sgm's UNet and VAE, SD3's MMDiT and its own VAE classes (``modules.models.sd3``)
_PASS_MODULES = {"UNetModel": ("UNet", 8), "Decoder": ("VAE decode", 8), "Encoder": ("VAE encode", 1),
                 "MMDiT": ("MMDiT", 8), "VAEDecoder": ("VAE decode", 8), "VAEEncoder": ("VAE encode", 1)}  # fmt: skip
_PASS_PACKAGES = ("ldm.", "sgm.", "modules.models.sd3.")


def failing_module(tb: Any) -> tuple[str, tuple[int, int]] | None:
    """The innermost UNet (ldm/sgm) or MMDiT (SD3), VAE decoder or encoder ``forward`` in a traceback, and the image
    size its input tensor stands for: which pass an out-of-memory error (in attention or anywhere else) happened
    in."""
    found = None
    while tb is not None:
        frame = tb.tb_frame
        module = frame.f_locals.get("self")
        kind = _PASS_MODULES.get(type(module).__name__)
        if kind and frame.f_code.co_name == "forward" and f"{type(module).__module__}.".startswith(_PASS_PACKAGES):
            names = frame.f_code.co_varnames[1 : frame.f_code.co_argcount]
            x = frame.f_locals.get(names[0]) if names else None
            if isinstance(x, torch.Tensor) and x.dim() == 4:
                found = (kind[0], (int(x.shape[-1]) * kind[1], int(x.shape[-2]) * kind[1]))
        tb = tb.tb_next
    return found


def pass_name(module_pass: str, size: tuple[int, int], p: Any, first: tuple[int, int],
              hires: tuple[int, int] | None, cover: tuple[int, int] | None = None) -> str:  # fmt: skip
    """The job planner's name of a pass: the webui flags the hires UNet pass (``p.is_hr_pass``); a VAE pass at the
    hires size (the final decode) or at the size the picture was upscaled to (an image upscaler's encode) is the
    hires one."""
    if module_pass in ("UNet", "MMDiT"):
        return f"{module_pass} (hires)" if hires is not None and getattr(p, "is_hr_pass", False) else module_pass
    at_hires = hires is not None and size in (hires, cover or hires) and size != first
    return f"{module_pass} (hires)" if at_hires else module_pass


@dataclass(frozen=True)
class JobSizes:
    """A running job's sizes as the webui holds them on ``p``, and the hires request to plan it with."""

    first: tuple[int, int]
    batch: int
    hires: tuple[int, int] | None  # the hires pass's size (the latent cropped to the target)
    cover: tuple[int, int] | None  # the size the picture was upscaled to (``hr_upscale_to_x/y``)
    request: dict[str, Any]  # hr_scale / hr_width / hr_height as the user gave them
    upscaler: str
    img2img: bool


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def job_sizes(p: Any) -> JobSizes:
    """webui 1.10.1's ``calculate_target_resolution`` leaves the cover size in ``hr_upscale_to_x/y`` and the latent
    rows and columns ``sample_hr_pass`` crops away in ``truncate_x/y``: the hires pass runs at the cover less them."""
    first = (int(p.width), int(p.height))
    batch = max(1, _int(getattr(p, "batch_size", 1)) or 1)
    hires = cover = None
    ux, uy = _int(getattr(p, "hr_upscale_to_x", 0)), _int(getattr(p, "hr_upscale_to_y", 0))
    if getattr(p, "enable_hr", False) and ux and uy:
        cover = (ux, uy)
        tx, ty = _int(getattr(p, "truncate_x", 0)), _int(getattr(p, "truncate_y", 0))
        hires = (8 * (ux // 8 - tx), 8 * (uy // 8 - ty)) if tx or ty else cover
    rx, ry = _int(getattr(p, "hr_resize_x", 0)), _int(getattr(p, "hr_resize_y", 0))
    request: dict[str, Any] = {"hr_width": rx or None, "hr_height": ry or None}
    if hires is not None and not (rx or ry):
        request = {"hr_width": hires[0], "hr_height": hires[1]}  # a scale: the webui's own rounding, as it ran
    # the webui's latent upscale modes are all named "Latent..." (None: its default, "Latent")
    upscaler = "latent" if str(getattr(p, "hr_upscaler", None) or "Latent").startswith("Latent") else "image"
    return JobSizes(first, batch, hires, cover, request if hires else {}, upscaler,
                    getattr(p, "init_images", None) is not None)  # fmt: skip


VERDICT_WORDS = {"fits": "this job fits", "tight": "this job is tight", "does not fit": "this job does not fit"}


def failure_context(exc: BaseException) -> str:
    """The sentence an out-of-memory error gets: the pass that failed, and what fits. Empty outside a memslice
    job, or when anything goes wrong (the original error must reach the user)."""
    ref = _running.get("p")
    p = ref() if ref is not None else None
    if p is None:
        return ""
    job = job_sizes(p)
    first, hires = job.first, job.hires
    where = failing_module(exc.__traceback__)
    if where is None and isinstance(exc, NotEnoughMemory) and exc.site.startswith(("unet.", "mmdit.")):
        # a denoiser's layer called outside its model's forward: the webui's hires flag still tells the pass
        where = ("MMDiT" if exc.site.startswith("mmdit.") else "UNet",
                 hires if hires is not None and getattr(p, "is_hr_pass", False) else first)  # fmt: skip
    if where is None:  # a VAE encode and decode share one site: without their module, say nothing
        return ""
    module_pass, size = where
    name = pass_name(module_pass, size, p, first, hires, job.cover)
    plan = planner.plan_for(*first, job.batch, hr_upscaler=job.upscaler, img2img=job.img2img,
                            free=_running.get("free"), **job.request)  # fmt: skip
    side = plan["max_square_resolution"]
    scaled = " (first pass; hires scaled alike)" if hires else ""
    budget = HOST.settings().budget_gb
    if isinstance(exc, NotEnoughMemory) and exc.fixed_budget:
        basis = f"with the attention budget of {format_bytes(budget * (1 << 30))}, which refused this call,"
    else:
        basis = f"with the {format_bytes(plan['free_bytes'])} free when this job started"
    verdict = VERDICT_WORDS.get(plan["verdict"], f"this job: {plan['verdict']}")
    if side:
        fits = f"{basis} {verdict} and the whole job (every pass) fits up to {side}x{side}{scaled}"
        if max(first) <= side:
            fits += (": this size was within it, so that reading may be optimistic (memory taken after the job "
                     "started, or more allocator overhead than measured)")  # fmt: skip
    else:
        fits = f"{basis} {verdict} and no size of this job fits (its binding pass: {plan['limit']})"
    return f"In this job: the {name} pass at {size[0]}x{size[1]} failed; {fits}."


def annotate(exc: BaseException) -> None:
    """Add the failure context to an out-of-memory error or memslice's NotEnoughMemory; never raises."""
    try:
        if active_entry() is None or getattr(exc, "_memslice_job_context", False):
            return
        if not (isinstance(exc, NotEnoughMemory) or kernels.is_oom(exc)):
            return
        if not exc.args or not isinstance(exc.args[0], str):
            return
        context = failure_context(exc)
        if context:
            exc.args = (f"{exc.args[0]} {context}", *exc.args[1:])
            exc._memslice_job_context = True  # type: ignore[attr-defined]
    except Exception as err:  # the original error must still reach the user
        log.debug("memslice: no job context for the error: %s", err)


_WRAPPED = "_memslice_annotates_oom"


def install_failure_context() -> None:
    """Wrap ``processing.process_images_inner`` once: it only annotates an error on its way out and closes the
    failed job's summary."""
    from modules import processing  # type: ignore[import-not-found]

    inner = getattr(processing, "process_images_inner", None)
    if inner is None or getattr(inner, _WRAPPED, False):
        return

    @functools.wraps(inner)
    def process_images_inner(p: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return inner(p, *args, **kwargs)
        except Exception as exc:
            annotate(exc)
            try:
                on_job_failed(p, exc)
            except Exception as err:  # the original error must still reach the user
                log.debug("memslice: could not close the failed job: %s", err)
            raise

    setattr(process_images_inner, _WRAPPED, True)
    processing.process_images_inner = process_images_inner


def remove_failure_context() -> None:
    """Unwrap ``process_images_inner`` if the wrapper on it is ours (another extension's wrapper on top stays, and
    ours then passes errors through unchanged: no memslice entry is active)."""
    from modules import processing  # type: ignore[import-not-found]

    current = getattr(processing, "process_images_inner", None)
    if getattr(current, _WRAPPED, False):
        processing.process_images_inner = current.__wrapped__
