"""The optimizer entries and the settings section: what the webui lists, applies, undoes and shows.

Contract (webui 1.10.x, see shared/design.md section 2): entries are listed through
``script_callbacks.on_list_optimizers``; ``sd_hijack.apply_optimizations`` restores the stock forwards, calls the
previous entry's ``undo()`` and our ``apply()``. ``apply()`` also installs the failure context on the webui's
``process_images_inner`` and ``undo()`` removes it, so under a built-in optimization no memslice frame is in any
traceback. Everything that runs at startup is wrapped so a failure here is a logged message, never a dead webui.

The VAE's ``Decoder.forward`` and ``Encoder.forward`` (ldm's, and sgm's where it imports) are memslice's while an
entry is applied: they run the module's own forward when the pass fits (and with the VAE setting ``attention`` or
``off``), else the exact bands of :mod:`lib_memslice.bands`. The webui's ``undo_optimizations`` never touches them,
so ``undo()`` puts back the forward each class had before, only where the class's forward is still memslice's (an
extension that replaced it since keeps its own). A forward set on a module *instance* (the Tiled VAE extension's
hook) is what torch calls: memslice's class forward is never reached for that module. TAESD and the approximate
previews are other classes, and nothing here moves a module between devices (--medvram/--lowvram place them).
"""

from __future__ import annotations

import logging
from typing import Any

from modules import sd_hijack_optimizations, shared  # type: ignore[import-not-found]

from .. import strategies
from ..bands import make_decoder_forward, make_encoder_forward
from ..forwards import make_attnblock_forward, make_cross_attention_forward
from ..settings import CATEGORY_ID, SECTION, SPECS, coerce, warn_once
from . import jobs, sd3
from .host import HOST, device_kind
from .patching import put, take_back, underlying

log = logging.getLogger("memslice")

LABELS = {
    "auto": "memslice automatic planner",
    "doggettx": "memslice Doggettx (query slices)",
    "invokeai": "memslice InvokeAI (heads, then queries)",
    "mps": "memslice MPS (Metal-safe slices)",
    "heads": "memslice per-head (diffusers style)",
}
assert tuple(LABELS) == strategies.NAMES
CMD_OPT = "opt_memslice"  # --opt-memslice, added by preload.py


def _ldm_sgm() -> list[Any]:
    """(CrossAttention class, AttnBlock class, saved original AttnBlock forward) pairs for ldm, then sgm."""
    import ldm.modules.attention
    import ldm.modules.diffusionmodules.model

    pairs = [
        (
            ldm.modules.attention.CrossAttention,
            ldm.modules.diffusionmodules.model.AttnBlock,
            getattr(sd_hijack_optimizations, "diffusionmodules_model_AttnBlock_forward", None),
        )
    ]
    try:
        import sgm.modules.attention
        import sgm.modules.diffusionmodules.model
    except ImportError:  # webui without the SDXL repository: ldm alone
        return pairs
    pairs.append(
        (
            sgm.modules.attention.CrossAttention,
            sgm.modules.diffusionmodules.model.AttnBlock,
            getattr(sd_hijack_optimizations, "sgm_diffusionmodules_model_AttnBlock_forward", None),
        )
    )
    return pairs


def _vae_classes() -> list[tuple[Any, Any]]:
    """(Decoder class, Encoder class) of ldm, then of sgm when it imports and has them."""
    import ldm.modules.diffusionmodules.model

    found = [(ldm.modules.diffusionmodules.model.Decoder, ldm.modules.diffusionmodules.model.Encoder)]
    try:
        import sgm.modules.diffusionmodules.model as sgm_model
    except ImportError:  # webui without the SDXL repository: ldm alone
        return found
    decoder, encoder = getattr(sgm_model, "Decoder", None), getattr(sgm_model, "Encoder", None)
    if decoder is not None and encoder is not None:
        found.append((decoder, encoder))
    return found


def install_vae_forwards(strategy: str) -> None:
    """memslice's banded forwards on the Decoder and Encoder classes, each falling back on the class's own forward
    (the one before memslice's: a memslice forward already there hands on the one it keeps)."""
    for decoder, encoder in _vae_classes():
        for cls, make in ((decoder, make_decoder_forward), (encoder, make_encoder_forward)):
            if underlying(cls.__dict__.get("forward")) is not None:
                put(cls, "forward", lambda original, make=make: make(strategy, HOST, original))


def remove_vae_forwards() -> None:
    """Put back each class's own forward where memslice's is still the class's."""
    for decoder, encoder in _vae_classes():
        for cls in (decoder, encoder):
            take_back(cls, "forward")


class MemsliceOptimization(sd_hijack_optimizations.SdOptimization):
    """One dropdown entry per strategy. Titles (``name - label``) are what config.json stores: keep them stable."""

    is_memslice = True  # how :func:`lib_memslice.webui.host.active_entry` knows its own

    def __init__(self, strategy: str) -> None:
        self.strategy = strategy
        self.name = f"memslice-{strategy}"
        self.label = LABELS[strategy]
        self.cmd_opt = CMD_OPT if strategy == "auto" else None

    @property
    def priority(self) -> int:  # type: ignore[override]
        """memslice-auto wins 'Automatic' on CUDA, XPU and CPU, where its fused-kernel plans are at least as fast
        as every built-in and never run out of memory silently. On MPS sub-quadratic (1000) keeps its place and on
        unknown backends (DirectML) the free memory cannot be measured, so memslice waits to be chosen. The
        other strategies never win 'Automatic'. Evaluated at startup without try/except by the webui: never raises.
        """
        try:
            if self.strategy != "auto":
                return 1
            return {"cuda": 95, "xpu": 95, "cpu": 1001}.get(device_kind(), 5)
        except Exception:
            return 1

    def is_available(self) -> bool:
        return True

    def apply(self) -> None:
        """memslice's forwards in place of the webui's, SD3's last. If anything raises, everything memslice set is
        put back before the error goes on: the webui's own cleanup after a failed ``apply()``
        (``undo_optimizations``) restores only the four ldm/sgm attributes, and never calls this entry's ``undo()``."""
        try:
            self._apply()
        except BaseException:
            try:
                self.undo()
            except Exception as exc:  # the error that stopped apply() is the one to see
                log.warning("memslice: could not put back what a failed apply() set: %s", exc)
            raise

    def _apply(self) -> None:
        for cross_attention, attn_block, original in _ldm_sgm():
            cross_attention.forward = make_cross_attention_forward(self.strategy, HOST)
            fallback = original if original is not None else attn_block.forward
            if getattr(fallback, "__memslice__", None):  # never fall back onto ourselves
                fallback = None
            attn_block.forward = make_attnblock_forward(self.strategy, HOST, fallback)
        try:
            install_vae_forwards(self.strategy)
        except Exception as exc:  # the VAE then runs as the webui runs it: attention sliced, no bands
            log.warning("memslice: could not install the banded VAE forwards: %s", exc)
        try:
            jobs.install_failure_context()
        except Exception as exc:  # a webui without it loses only the pass name on out-of-memory errors
            log.warning("memslice: out-of-memory errors will not name the failing pass: %s", exc)
        sd3.install(self.strategy, HOST)

    def undo(self) -> None:
        super().undo()
        remove_vae_forwards()
        jobs.remove_failure_context()
        sd3.remove()


ENTRIES = tuple(MemsliceOptimization(s) for s in strategies.NAMES)


def list_optimizers(res: list) -> None:
    """``on_list_optimizers`` callback: the same instances every time, so Reload UI keeps identities."""
    res.extend(ENTRIES)


# --- settings --------------------------------------------------------------------------------------------


def _component(spec: Any) -> tuple[Any, dict[str, Any] | None]:
    import gradio as gr

    if spec.kind == "float" and spec.step is not None:
        return gr.Slider, {"minimum": spec.lo, "maximum": spec.hi, "step": spec.step}
    if spec.kind == "float":
        return gr.Number, {"precision": 2, "minimum": spec.lo, "maximum": spec.hi}
    if spec.kind == "int":
        return gr.Slider, {"minimum": int(spec.lo), "maximum": int(spec.hi), "step": 1}
    if spec.kind == "choice":
        return gr.Radio, {"choices": list(spec.choices)}
    return None, None  # bool: the webui picks a Checkbox


def _repairer(spec: Any) -> Any:
    """An ``onchange`` that replaces an invalid stored value with its clamped or default form.

    The webui feeds stored values straight into gradio components (a string in a Number box stops the settings
    page from being built at startup) and into the pydantic model of ``GET /sdapi/v1/options``. The webui calls
    ``onchange`` after every UI or API change, before config.json is saved; per-request ``override_settings``
    skip it and are validated where they are read.
    """

    def repair() -> None:
        data = getattr(shared.opts, "data", None)
        if not isinstance(data, dict) or spec.key not in data:
            return
        raw = data[spec.key]
        value, problem = coerce(spec, raw)
        if problem is not None:
            warn_once(spec.key, raw, problem)
        if problem is not None or type(value) is not type(raw):  # "0.005" is a fine budget, stored as 0.005
            data[spec.key] = value

    return repair


def on_ui_settings() -> None:
    """Register the Memory slicing section; repair hand-edited config.json values before components are built."""
    for spec in SPECS:
        component, args = _component(spec)
        repair = _repairer(spec)
        info = shared.OptionInfo(
            spec.default, spec.label, component, args, onchange=repair, section=SECTION, category_id=CATEGORY_ID
        ).info(spec.info)
        shared.opts.add_option(spec.key, info)
        repair()
