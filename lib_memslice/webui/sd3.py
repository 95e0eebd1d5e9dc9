"""SD3 in webui 1.10.1: memslice's joint attention and VAE attention in place of the webui's, and back.

No webui optimization touches SD3 (its MMDiT and VAE live in ``modules.models.sd3``, not in ldm or sgm). A memslice
entry's ``apply()`` rebinds the MMDiT's module global ``modules.models.sd3.mmdit.attention`` (the name every joint
block looks up at call time; ``other_impls.attention``, which the text encoders call with their masks, is left as
it is) and sets ``sd3_impls.AttnBlock.forward`` (the SD3 VAE's own class); ``undo()`` puts back what was there
before, and only where the function memslice set is still the one in place (both through
:mod:`lib_memslice.webui.patching`, so entries applied one after another hand the webui's own function on). A webui
without ``modules.models.sd3`` (before 1.10) has nothing to patch.

``on_model_loaded`` registers a forward pre-hook on a loaded SD3 model's MMDiT that records its context's length
(the prompt's text tokens), so that a joint call that fits nothing names the largest square image size.
"""

from __future__ import annotations

import logging
from typing import Any

from ..forwards import Host, make_attnblock_forward
from ..joint import make_joint_attention, text_tokens_recorder
from .patching import put, take_back

log = logging.getLogger("memslice")

_hook, _text_tokens = text_tokens_recorder()
_handles: list[Any] = []


def modules() -> tuple[Any, Any] | None:
    """``(modules.models.sd3.mmdit, modules.models.sd3.sd3_impls)``, or None in a webui without SD3."""
    try:
        from modules.models.sd3 import mmdit, sd3_impls  # type: ignore[import-not-found]
    except ImportError:
        return None
    return mmdit, sd3_impls


def install(strategy: str, host: Host) -> None:
    """memslice's joint attention and SD3 VAE attention; on any error, what it set is put back and the error raised."""
    found = modules()
    if found is None:
        return
    mmdit, sd3_impls = found
    try:
        put(mmdit, "attention", lambda stock: make_joint_attention(strategy, host, stock, text_tokens=_text_tokens))
        put(sd3_impls.AttnBlock, "forward", lambda stock: make_attnblock_forward(strategy, host, fallback=stock))
    except BaseException:
        remove()
        raise


def remove() -> None:
    """Put back what memslice replaced, where memslice's function is still the one in place."""
    found = modules()
    if found is None:
        return
    mmdit, sd3_impls = found
    take_back(mmdit, "attention")
    take_back(sd3_impls.AttnBlock, "forward")


def on_model_loaded(sd_model: Any) -> None:
    """Record a loaded SD3 model's prompt length at every MMDiT forward (for the errors' largest size)."""
    while _handles:
        _handles.pop().remove()
    if getattr(sd_model, "is_sd3", False) is not True:
        return
    mmdit = getattr(getattr(sd_model, "model", None), "diffusion_model", None)
    try:
        _handles.append(mmdit.register_forward_pre_hook(_hook, with_kwargs=True))
    except Exception as exc:  # the errors then name the share of the call's tokens that fits, not a size
        log.warning("memslice: could not watch SD3's prompt length: %s", exc)


def text_tokens() -> int | None:
    """The prompt tokens of the loaded SD3 model's last MMDiT forward (None before one ran)."""
    return _text_tokens()
