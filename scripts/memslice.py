"""The file the webui executes: registers memslice's callbacks and the per-generation infotext hook.

The extension folder is on sys.path only while this file runs, so lib_memslice is imported here, at top level.
"""

from __future__ import annotations

from typing import Any

from modules import scripts  # type: ignore[import-not-found]

try:
    from lib_memslice import webui as memslice
except Exception as exc:  # never take the webui down with us
    import logging

    logging.getLogger("memslice").error("memslice: failed to load, the extension is disabled: %s", exc)
    memslice = None
else:
    memslice.register()


class MemsliceScript(scripts.Script):
    """Always on, no UI: opens and closes each job's slicing summary (infotext field and console line)."""

    def title(self) -> str:
        return "memslice"

    def show(self, is_img2img: bool) -> object:
        return scripts.AlwaysVisible

    def ui(self, is_img2img: bool) -> list:
        return []

    def process(self, p: Any, *args: Any) -> None:
        if memslice is not None:
            memslice.on_job_start(p)

    def postprocess(self, p: Any, processed: Any, *args: Any) -> None:
        if memslice is not None:
            memslice.on_job_end(p, processed)
