"""Fake of modules/script_callbacks.py: callback storage, registration and the runners memslice relies on."""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any

callback_map: dict[str, list] = dict(
    callbacks_app_started=[],
    callbacks_model_loaded=[],
    callbacks_ui_settings=[],
    callbacks_script_unloaded=[],
    callbacks_list_optimizers=[],
    callbacks_infotext_pasted=[],
    callbacks_before_image_saved=[],
)
errors: list[str] = []


@dataclass
class ScriptCallback:
    script: str
    callback: Any
    name: str = "unnamed"


def add_callback(callbacks, fun, *, name=None, category="unknown", filename=None):
    if filename is None:
        stack = [x for x in inspect.stack() if x.filename != __file__]
        filename = stack[0].filename if stack else "unknown file"
    unique = f"base/{os.path.basename(filename)}/{category}" + (f"/{name}" if name else "")
    taken = {c.name for c in callbacks}
    final, n = unique, 0
    while final in taken:
        n += 1
        final = f"{unique}-{n}"
    callbacks.append(ScriptCallback(filename, fun, final))


def clear_callbacks():
    for callback_list in callback_map.values():
        callback_list.clear()


def _run(category, *args):
    for c in callback_map["callbacks_" + category]:
        try:
            c.callback(*args)
        except Exception as e:  # the webui reports and carries on
            errors.append(f"Error executing callback {c.name} for {c.script}: {e!r}")


def app_started_callback(demo, app):
    _run("app_started", demo, app)


def model_loaded_callback(sd_model):
    _run("model_loaded", sd_model)


def ui_settings_callback():
    _run("ui_settings")


def script_unloaded_callback():
    for c in reversed(callback_map["callbacks_script_unloaded"]):
        try:
            c.callback()
        except Exception as e:
            errors.append(repr(e))


def list_optimizers_callback():
    res = []
    for c in callback_map["callbacks_list_optimizers"]:
        try:
            c.callback(res)
        except Exception as e:
            errors.append(repr(e))
    return res


def on_app_started(callback, *, name=None):
    add_callback(callback_map["callbacks_app_started"], callback, name=name, category="app_started")


def on_model_loaded(callback, *, name=None):
    add_callback(callback_map["callbacks_model_loaded"], callback, name=name, category="model_loaded")


def on_ui_settings(callback, *, name=None):
    add_callback(callback_map["callbacks_ui_settings"], callback, name=name, category="ui_settings")


def on_script_unloaded(callback, *, name=None):
    add_callback(callback_map["callbacks_script_unloaded"], callback, name=name, category="script_unloaded")


def on_list_optimizers(callback, *, name=None):
    add_callback(callback_map["callbacks_list_optimizers"], callback, name=name, category="list_optimizers")


def on_infotext_pasted(callback, *, name=None):
    add_callback(callback_map["callbacks_infotext_pasted"], callback, name=name, category="infotext_pasted")


def on_before_image_saved(callback, *, name=None):
    add_callback(callback_map["callbacks_before_image_saved"], callback, name=name, category="before_image_saved")
