"""memslice: memory-aware attention slicing for stable-diffusion-webui.

Everything in this package except ``webui.py`` runs without the webui, so it can be planned, tested and
benchmarked on its own.
"""

__version__ = "0.1.0"
