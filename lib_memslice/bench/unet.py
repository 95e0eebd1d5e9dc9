"""Moved: the configs live in :mod:`lib_memslice.bench.configs` (this name is kept for a caller being updated)."""

from .configs import SD15_DECODER, SD15_UNET

__all__ = ["SD15_DECODER", "SD15_UNET"]
