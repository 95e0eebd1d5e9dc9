"""Boot the fake webui with memslice loaded the way webui 1.10.1 loads an extension."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType, SimpleNamespace

from .conftest import ROOT, import_ldm

FAKES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fakes")
SCRIPT = os.path.join(ROOT, "scripts", "memslice.py")


def purge() -> None:
    for name in list(sys.modules):
        if name in ("modules", "sgm", "lib_memslice.webui") or name.startswith(
            ("modules.", "sgm.", "lib_memslice.webui.")
        ):
            del sys.modules[name]
    package = sys.modules.get("lib_memslice")
    if package is not None and hasattr(package, "webui"):
        delattr(package, "webui")  # else ``from lib_memslice import webui`` returns the stale module


def load_script() -> ModuleType:
    """Like ``script_loading.load_module``: exec by path under the bare file name, extension root on sys.path."""
    spec = importlib.util.spec_from_file_location(os.path.basename(SCRIPT), SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, ROOT)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(ROOT)
    return module


def start_webui() -> SimpleNamespace:
    """Startup order of the webui: load scripts, register built-ins, list optimizers, build settings."""
    purge()
    if FAKES not in sys.path:
        sys.path.insert(0, FAKES)
    attention, model, _ = import_ldm()
    env = SimpleNamespace(ldm_attention=attention, ldm_model=model)
    env.originals = (attention.CrossAttention.forward, model.AttnBlock.forward)
    env.vae_originals = (model.Decoder.forward, model.Encoder.forward)  # ldm's own: memslice's apply() patches them
    for name in ("script_callbacks", "shared", "devices", "sd_hijack", "sd_hijack_optimizations", "processing"):
        setattr(env, name, importlib.import_module(f"modules.{name}"))
    env.hypernetwork = importlib.import_module("modules.hypernetworks.hypernetwork")
    env.sgm_attention = importlib.import_module("sgm.modules.attention")
    env.sgm_model = importlib.import_module("sgm.modules.diffusionmodules.model")
    env.sgm_original_forward = env.sgm_attention.CrossAttention.forward  # sgm's own, before any patching
    env.script_callbacks.clear_callbacks()
    env.script = load_script()
    env.sd_hijack.register_builtin_optimizers()
    env.sd_hijack.list_optimizers()
    env.script_callbacks.ui_settings_callback()
    env.memslice = sys.modules["lib_memslice.webui"]
    return env


def reload_ui(env: SimpleNamespace) -> None:
    """Settings > Reload UI: unload callbacks, clear, re-exec every script, rebuild the optimizer list."""
    env.script_callbacks.script_unloaded_callback()
    env.script_callbacks.clear_callbacks()
    env.script = load_script()
    env.sd_hijack.register_builtin_optimizers()
    env.sd_hijack.list_optimizers()
    env.script_callbacks.ui_settings_callback()


def stop_webui(env: SimpleNamespace) -> None:
    env.ldm_attention.CrossAttention.forward, env.ldm_model.AttnBlock.forward = env.originals
    env.ldm_model.Decoder.forward, env.ldm_model.Encoder.forward = env.vae_originals
    purge()
    if FAKES in sys.path:
        sys.path.remove(FAKES)
