"""memslice: memory-aware attention slicing for stable-diffusion-webui.

Everything in this package except ``webui/`` runs without the webui, so it can be planned, tested and used from the
command line on its own; the benchmark and measurement tools live apart, in ``memslice_tools`` (never imported here).
"""

#: The one version string: pyproject.toml reads it (``[tool.setuptools.dynamic]``), the status route reports it,
#: and the newest CHANGELOG.md heading names it (tests/test_cli.py checks both).
__version__ = "0.4.0"
