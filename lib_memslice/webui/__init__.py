"""The webui glue, in rooms: ``entries`` (optimizer entries and the settings section), ``planner`` (the loaded
model and the job planner for it), ``jobs`` (a generation's summary, infotext and failure context), ``routes``
(HTTP), and ``host`` (what they share). The only code in lib_memslice that imports the webui's ``modules``.

:func:`register` runs at the top level of scripts/memslice.py, on every (re)load of the extension's scripts.
"""

from __future__ import annotations

from typing import Any

from modules import script_callbacks  # type: ignore[import-not-found]

from .entries import ENTRIES, LABELS, MemsliceOptimization, list_optimizers, on_ui_settings
from .host import HOST, STATS, active_entry
from .jobs import on_job_end, on_job_start
from .planner import on_model_loaded, plan_for
from .routes import add_routes, on_app_started, status

__all__ = ["ENTRIES", "HOST", "LABELS", "STATS", "MemsliceOptimization", "active_entry", "add_routes",
           "on_job_end", "on_job_start", "plan_for", "register", "status"]  # fmt: skip


def _registered(category: str, fn: Any) -> bool:
    """Whether ``fn`` is already in the webui's callback list (a script executed twice without a reload)."""
    try:
        return any(c.callback is fn for c in script_callbacks.callback_map[f"callbacks_{category}"])
    except Exception:
        return False


def register() -> None:
    for category, hook, fn in (
        ("list_optimizers", script_callbacks.on_list_optimizers, list_optimizers),
        ("ui_settings", script_callbacks.on_ui_settings, on_ui_settings),
        ("app_started", script_callbacks.on_app_started, on_app_started),
        ("model_loaded", script_callbacks.on_model_loaded, on_model_loaded),
    ):
        if not _registered(category, fn):
            hook(fn, name=f"memslice {category}")
