"""One way to put a memslice function in place of a webui function, and to take it back.

Why one: several rooms replace something the webui owns (SD3's joint attention and VAE attention, the VAE's
``Decoder``/``Encoder`` forwards), and each must hand the webui's own function on when entries are applied one
after another, and must put back only what is still its own: an extension that replaced memslice's function since
keeps its own, even one that wraps memslice's with ``functools.wraps`` and so carries its attributes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: where a memslice function keeps the one it replaced (put back by :func:`take_back`)
ORIGINAL = "__memslice_original__"

_installed: dict[tuple[int, str], Any] = {}  # (id of the owner, name) -> the function put() set there last


def underlying(current: Any) -> Any:
    """What a new memslice function should fall back on: the webui's (or another extension's) function, never one
    of memslice's own."""
    return getattr(current, ORIGINAL, None) if getattr(current, "__memslice__", None) else current


def put(owner: Any, name: str, make: Callable[[Any], Any]) -> Any:
    """``owner.name = make(what it replaces)``, the replaced function kept on it; returns the new function."""
    original = underlying(owner.__dict__.get(name))
    new = make(original)
    setattr(new, ORIGINAL, original)
    setattr(owner, name, new)
    _installed[(id(owner), name)] = new
    return new


def take_back(owner: Any, name: str) -> None:
    """Put back what :func:`put` replaced, where the function it set is still the one in place."""
    current = owner.__dict__.get(name)
    if current is not None and current is _installed.get((id(owner), name)) and getattr(current, ORIGINAL, None):
        setattr(owner, name, getattr(current, ORIGINAL))
