"""Side-by-side benchmark of memslice against plain SDPA, plain einsum, the Doggettx seed and diffusers.

Entry point: :func:`memslice_tools.run.main` (``python -m lib_memslice bench``, ``make bench``). Not imported
by the extension at runtime: it needs matplotlib for its plot and, optionally, diffusers and ldm.
"""
