"""The fakes must keep the webui 1.10.1 / sgm signatures: a drifting fake would make the glue tests meaningless."""

from __future__ import annotations

import ast
import copy
import inspect
import os
from typing import Any

import pytest

EXPECTED = {
    "modules.script_callbacks.add_callback": "(callbacks, fun, *, name=None, category='unknown', filename=None)",
    "modules.script_callbacks.on_list_optimizers": "(callback, *, name=None)",
    "modules.script_callbacks.on_ui_settings": "(callback, *, name=None)",
    "modules.script_callbacks.on_app_started": "(callback, *, name=None)",
    "modules.script_callbacks.on_model_loaded": "(callback, *, name=None)",
    "modules.script_callbacks.on_script_unloaded": "(callback, *, name=None)",
    "modules.script_callbacks.app_started_callback": "(demo, app)",
    "modules.script_callbacks.model_loaded_callback": "(sd_model)",
    "modules.options.OptionInfo.__init__": (
        "(self, default=None, label='', component=None, component_args=None, onchange=None, section=None,"
        " refresh=None, comment_before='', comment_after='', infotext=None, restrict_api=False, category_id=None)"
    ),
    "modules.options.Options.set": "(self, key, value, is_api=False, run_callbacks=True)",
    "modules.options.Options.add_option": "(self, key, info)",
    "modules.options.Options.onchange": "(self, key, func, call=True)",
    "modules.sd_hijack_optimizations.SdOptimization.title": "(self)",
    "modules.sd_hijack_optimizations.SdOptimization.apply": "(self)",
    "modules.sd_hijack_optimizations.SdOptimization.undo": "(self)",
    "modules.sd_hijack_optimizations.SdOptimization.is_available": "(self)",
    "modules.sd_hijack.apply_optimizations": "(option=None)",
    "modules.sd_hijack.undo_optimizations": "()",
    "modules.sd_hijack.list_optimizers": "()",
    "modules.devices.without_autocast": "(disable=False)",
    "modules.hypernetworks.hypernetwork.apply_hypernetworks": "(hypernetworks, context, layer=None)",
    "modules.hypernetworks.hypernetwork.attention_CrossAttention_forward": (
        "(self, x, context=None, mask=None, **kwargs)"
    ),
    "modules.scripts.Script.process": "(self, p, *args)",
    "modules.scripts.Script.postprocess": "(self, p, processed, *args)",
    "modules.scripts.Script.show": "(self, is_img2img)",
    "sgm.modules.attention.CrossAttention.__init__": (
        "(self, query_dim, context_dim=None, heads=8, dim_head=64, dropout=0.0, backend=None)"
    ),
    "sgm.modules.attention.CrossAttention.forward": (
        "(self, x, context=None, mask=None, additional_tokens=None, n_times_crossframe_attn_in_self=0)"
    ),
    "sgm.modules.attention.BasicTransformerBlock.__init__": (
        "(self, dim, n_heads, d_head, dropout=0.0, context_dim=None, gated_ff=True, checkpoint=True,"
        " disable_self_attn=False, attn_mode='softmax', sdp_backend=None)"
    ),
    "sgm.modules.attention.BasicTransformerBlock.forward": (
        "(self, x, context=None, additional_tokens=None, n_times_crossframe_attn_in_self=0)"
    ),
    "sgm.modules.diffusionmodules.model.AttnBlock.forward": "(self, x, **kwargs)",
    "sgm.modules.diffusionmodules.model.AttnBlock.attention": "(self, h_: torch.Tensor) -> torch.Tensor",
}


def resolve(env, dotted):
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


@pytest.mark.parametrize("dotted", sorted(EXPECTED))
def test_fake_signature_matches_1_10_1(webui, dotted):
    assert str(inspect.signature(resolve(webui, dotted))) == EXPECTED[dotted]


def test_builtin_entries_have_the_1_10_1_titles_and_priorities(webui):
    entries = {e.title(): e for e in webui.sd_hijack.optimizers}
    assert entries["sdp - scaled dot product"].priority == 70
    assert entries["Doggettx"].priority == 90
    assert entries["InvokeAI"].priority == 1000  # no CUDA, not MPS
    assert entries["sub-quadratic"].priority == 10
    base = webui.sd_hijack_optimizations.SdOptimization
    assert (base.name, base.label, base.cmd_opt, base.priority) == (None, None, None, 0)


def test_builtin_entries_complete_the_1_10_1_list(webui):
    entries = {e.name: e for e in webui.sd_hijack.optimizers}
    assert "xformers" not in entries  # unavailable without xformers
    assert entries["sdp-no-mem"].title() == "sdp-no-mem - scaled dot product without memory efficient attention"
    assert entries["sdp-no-mem"].priority == 80
    assert entries["V1"].title() == "V1 - original v1" and entries["V1"].priority == 10
    builtin = [e.name for e in webui.sd_hijack.optimizers if not e.name.startswith("memslice")]
    assert builtin == ["InvokeAI", "Doggettx", "sdp-no-mem", "sdp", "sub-quadratic", "V1"]  # stable sort


# --- against the real source (WEBUI_DIR) --------------------------------------------------------------------
#
# Parsed with ``ast``, never imported. Every function, class and method a fake defines must exist in the real
# file with the same parameters (names, order, defaults, kinds; annotations are not compared) and decorators;
# classes with the same bases and the same constant class attributes; SdOptimization entries with the same
# ``priority`` properties and the same assignments in ``apply()``. Fake-only helpers and deliberate
# simplifications are listed below with their reasons, and the test fails when one of them stops being true.

WEBUI_DIR = os.environ.get("WEBUI_DIR", "")
FAKES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fakes")
SGM_REPO = os.path.join("repositories", "generative-models")  # where the webui clones Stability-AI's sgm

#: defined by a fake only, for the tests
FAKE_ONLY = {
    "modules/devices.py": {"without_autocast_calls": "log of without_autocast() calls for assertions"},
    "modules/script_callbacks.py": {"_run": "the fake's one runner behind the *_callback functions"},
    "modules/sd_hijack.py": {
        "register_builtin_optimizers": "what modules/initialize.py does after loading extension scripts (checked "
        "by test_register_builtin_optimizers_is_what_initialize_does)"
    },
    "modules/processing.py": {
        "StableDiffusionProcessing.__init__": "the real class is a dataclass",
        "StableDiffusionProcessingTxt2Img.__init__": "the real class is a dataclass",
        "StableDiffusionProcessingImg2Img.__init__": "the real class is a dataclass",
    },
}

#: same name as the real one, different signature or decorators on purpose
DELIBERATE = {
    "modules/processing.py": {
        "StableDiffusionProcessing": "a plain class taking only what memslice reads, not the 60-field dataclass",
        "StableDiffusionProcessingTxt2Img": "a plain class: size, batch and the Hires. fix fields memslice reads",
        "StableDiffusionProcessingImg2Img": "a plain class: init_images only",
        "Processed.__init__": "built from the infotexts alone: no images are made",
        "create_infotext": "per image index, from extra_generation_params: no prompts or seeds",
        "process_images": "takes the sampling step as a callable: there is no model",
        "process_images_inner": "takes the sampling step as a callable: there is no model",
    },
    "modules/hypernetworks/hypernetwork.py": {"Hypernetwork.__init__": "takes its layers, does not load a file"},
}


def fake_files() -> list[tuple[str, str]]:
    """(path under tests/fakes, path under WEBUI_DIR) for every fake module but the package markers."""
    pairs = []
    for root, _, files in os.walk(FAKES):
        for name in sorted(files):
            if not name.endswith(".py") or name == "__init__.py":
                continue
            rel = os.path.relpath(os.path.join(root, name), FAKES).replace(os.sep, "/")
            pairs.append((rel, rel if rel.startswith("modules/") else f"{SGM_REPO}/{rel}".replace(os.sep, "/")))
    return sorted(pairs)


def real_path(real_rel: str) -> str:
    if not WEBUI_DIR:
        pytest.skip("WEBUI_DIR is not set: point it at a stable-diffusion-webui 1.10.1 checkout to check the fakes")
    path = os.path.join(WEBUI_DIR, real_rel)
    if real_rel.startswith(SGM_REPO) and not os.path.isfile(path):
        pytest.skip(f"{real_rel} is not in WEBUI_DIR: sgm is cloned there on the webui's first launch")
    assert os.path.isfile(path), f"WEBUI_DIR={WEBUI_DIR} has no {real_rel}: not a webui 1.10.1 checkout?"
    return path


def parse(path: str) -> ast.Module:
    with open(path, encoding="utf8") as f:
        return ast.parse(f.read(), path)


def parameters(fn: ast.FunctionDef) -> str:
    """The parameter list as source, without annotations: names, order, defaults and kinds (/, *, **)."""
    args = copy.deepcopy(fn.args)
    for a in (*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg):
        if a is not None:
            a.annotation = None
    return f"({ast.unparse(args)})"


def decorators(node: ast.FunctionDef | ast.ClassDef) -> list[str]:
    return [ast.unparse(d).removeprefix("dataclasses.") for d in node.decorator_list]


def surface(tree: ast.Module, imports: bool = True) -> dict[str, tuple[str, Any]]:
    """Qualified name -> (kind, what is compared) for what a module defines at top level and in its classes
    (and, with ``imports``, the names it imports)."""
    found: dict[str, tuple[str, Any]] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            found[node.name] = ("function", (parameters(node), decorators(node)))
        elif isinstance(node, ast.ClassDef):
            found[node.name] = ("class", ([ast.unparse(b) for b in node.bases], decorators(node)))
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    found[f"{node.name}.{item.name}"] = ("function", (parameters(item), decorators(item)))
                elif isinstance(item, ast.Assign):
                    for t in item.targets:
                        if isinstance(t, ast.Name):
                            found[f"{node.name}.{t.id}"] = ("attribute", ast.unparse(item.value))
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    value = None if item.value is None else ast.unparse(item.value)
                    found[f"{node.name}.{item.target.id}"] = ("attribute", value)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(t, ast.Name):
                    found[t.id] = ("name", None)
        elif imports and isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                found[(alias.asname or alias.name).split(".")[0]] = ("name", None)
    return found


def method(tree: ast.Module, qualname: str) -> ast.FunctionDef | None:
    cls, name = qualname.split(".")
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == name:
                    return item
    return None


@pytest.mark.parametrize("fake_rel,real_rel", fake_files(), ids=[f for f, _ in fake_files()])
def test_fake_matches_the_real_source(fake_rel, real_rel):
    real_tree = parse(real_path(real_rel))
    fake_tree = parse(os.path.join(FAKES, fake_rel))
    fake, real = surface(fake_tree, imports=False), surface(real_tree)
    fake_only, deliberate = FAKE_ONLY.get(fake_rel, {}), DELIBERATE.get(fake_rel, {})
    problems = []
    for name, (kind, value) in fake.items():
        if name in fake_only:
            if name in real:
                problems.append(f"{name} is listed as fake-only but the real file defines it: check it instead")
            continue
        if name not in real:
            problems.append(f"{name}: defined by the fake, not by {real_rel}")
            continue
        if kind == "name" or (kind == "attribute" and real[name][0] != "attribute"):
            continue  # module-level names, and a class attribute the real class computes: existence only
        same = real[name] == (kind, value)
        if name in deliberate:
            if same:
                problems.append(f"{name} is listed as a deliberate difference but now matches: drop it from the list")
        elif not same:
            problems.append(f"{name}: fake {kind} {value!r} != real {real[name][0]} {real[name][1]!r}")
    # SdOptimization entries: the priority rules and what apply() patches, with which forward
    for name, (kind, _) in fake.items():
        if kind != "function" or not name.endswith((".priority", ".apply")) or name not in real:
            continue
        body = [ast.unparse(s) for s in method(fake_tree, name).body if not isinstance(s, ast.Expr)]
        real_body = [ast.unparse(s) for s in method(real_tree, name).body if not isinstance(s, ast.Expr)]
        if (name.endswith(".priority") or name.split(".")[0].startswith("SdOptimization")) and body != real_body:
            problems.append(f"{name}: fake body {body} != real {real_body}")
    assert not problems, "\n".join(problems)


def test_fake_lists_the_real_builtin_optimizers_in_order():
    def listed(tree: ast.Module) -> list[str]:
        fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "list_optimizers")
        return [ast.unparse(c.func) for c in ast.walk(fn) if isinstance(c, ast.Call) and not c.args and not c.keywords]

    real = listed(parse(real_path("modules/sd_hijack_optimizations.py")))
    fake = listed(parse(os.path.join(FAKES, "modules/sd_hijack_optimizations.py")))
    assert fake == real and len(real) == 7


def test_register_builtin_optimizers_is_what_initialize_does():
    calls = [ast.unparse(n) for n in ast.walk(parse(real_path("modules/initialize.py"))) if isinstance(n, ast.Call)]
    assert "script_callbacks.on_list_optimizers(sd_hijack_optimizations.list_optimizers)" in calls


def real_options() -> dict[str, dict[str, Any]]:
    """Every option of modules/shared_options.py: default, label, section and category as options_section sets them."""
    options: dict[str, dict[str, Any]] = {}
    for node in ast.walk(parse(real_path("modules/shared_options.py"))):
        if not (isinstance(node, ast.Call) and ast.unparse(node.func) == "options_section" and len(node.args) == 2):
            continue
        ident, table = node.args
        if not isinstance(table, ast.Dict):
            continue
        ident = ast.literal_eval(ident)
        for key, value in zip(table.keys, table.values, strict=True):
            while isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute):
                value = value.func.value  # OptionInfo(...).info(...).link(...) and the like
            if isinstance(value, ast.Call) and ast.unparse(value.func) == "OptionInfo":
                options[ast.literal_eval(key)] = option_info(value, ident)  # (OptionHTML texts are not options)
    return options


def option_info(call: ast.Call, ident: tuple | None = None) -> dict[str, Any]:
    names = ["default", "label", "component", "component_args", "onchange", "section", "refresh"]
    given = {names[i]: a for i, a in enumerate(call.args)} | {k.arg: k.value for k in call.keywords}
    info = {
        "default": literal(given["default"]) if "default" in given else None,
        "label": literal(given["label"]) if "label" in given else "",
        "section": literal(given["section"]) if "section" in given else None,
        "category_id": literal(given["category_id"]) if "category_id" in given else None,
    }
    if ident is not None:  # options_section overrides section (and category_id for 3-tuples)
        info["section"] = tuple(ident[:2])
        if len(ident) == 3:
            info["category_id"] = ident[2]
    return info


def test_fake_options_match_the_real_ones():
    real = real_options()
    tree = parse(os.path.join(FAKES, "modules/shared.py"))
    table = next(
        n.value for n in tree.body if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "options_templates"
    )
    assert isinstance(table, ast.Dict) and table.keys
    for key, value in zip(table.keys, table.values, strict=True):
        key = ast.literal_eval(key)
        assert key in real, key
        assert option_info(value) == real[key], key


def literal(node: ast.expr) -> Any:
    """A literal's value, else its source (a default computed at import, e.g. a path)."""
    try:
        return ast.literal_eval(node)
    except ValueError:
        return ast.unparse(node)


def test_fake_cmd_opts_are_real_flags_with_their_defaults():
    flags = {}
    for node in ast.walk(parse(real_path("modules/cmd_args.py"))):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument" and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and str(first.value).startswith("--"):
                kw = {k.arg: k.value for k in node.keywords}
                default = literal(kw["default"]) if "default" in kw else None
                if "action" in kw and ast.literal_eval(kw["action"]) == "store_true":
                    default = False
                flags[first.value.lstrip("-").replace("-", "_")] = default
    tree = parse(os.path.join(FAKES, "modules/shared.py"))
    call = next(n.value for n in tree.body if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "cmd_opts")
    fake = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    assert fake.pop("opt_memslice") is False  # memslice's own flag, added by its preload.py
    assert fake == {k: flags[k] for k in fake}, {k: flags.get(k, "missing") for k in fake}


def _dataclass_fields(tree: ast.Module, cls: str) -> set[str]:
    """A real dataclass's fields, its bases' in the same file included."""
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    found: set[str] = set()
    while cls in classes:
        node = classes[cls]
        found |= {i.target.id for i in node.body if isinstance(i, ast.AnnAssign) and isinstance(i.target, ast.Name)}
        bases = [ast.unparse(b) for b in node.bases]
        cls = bases[0] if bases else ""
    return found


def test_fake_dataclass_stand_ins_set_only_real_fields():
    """A fake that replaces a webui dataclass with a plain ``__init__`` may only set attributes the real dataclass
    declares (memslice reads them off the real objects: ``is_hr_pass``, ``hr_upscale_to_x``, ``init_images``...)."""
    tree = parse(real_path("modules/processing.py"))
    fake_tree = parse(os.path.join(FAKES, "modules/processing.py"))
    stand_ins = [n.split(".")[0] for n, why in FAKE_ONLY["modules/processing.py"].items() if "dataclass" in why]
    assert len(stand_ins) == 3
    problems = []
    for node in fake_tree.body:
        if not isinstance(node, ast.ClassDef) or node.name not in stand_ins:
            continue
        real = _dataclass_fields(tree, node.name)
        assigned = {t.attr for t in ast.walk(node) if isinstance(t, ast.Attribute) and isinstance(t.ctx, ast.Store)
                    and isinstance(t.value, ast.Name) and t.value.id == "self"}  # fmt: skip
        assigned -= {"alwayson_scripts"}  # fake-only: the real p.scripts is a ScriptRunner the fake does without
        problems += [f"{node.name}.{a} is not a field of the real class" for a in sorted(assigned - real)]
    assert not problems, "\n".join(problems)


def test_the_fake_pages_outputs_are_the_webuis():
    """With WEBUI_DIR: the output boxes and the error path the browser test's page reproduces
    (``test_browser.call_queue_outputs``, ``build_page``) are the real 1.10.1 ones."""
    webui_dir = os.environ.get("WEBUI_DIR")
    if not webui_dir:
        pytest.skip("WEBUI_DIR is not set: the fake page's outputs are checked against the real source only with it")
    with open(os.path.join(webui_dir, "modules", "ui_common.py")) as f:
        ui_common = f.read()
    assert """gr.HTML(elem_id=f'html_info_{tabname}', elem_classes="infotext")""" in ui_common
    assert """gr.HTML(elem_id=f'html_log_{tabname}', elem_classes="html-log")""" in ui_common
    with open(os.path.join(webui_dir, "modules", "call_queue.py")) as f:
        call_queue = f.read()
    assert """res = extra_outputs_array + [f"<div class='error'>{html.escape(error_message)}</div>"]""" in call_queue
    assert "error_message = f'{type(e).__name__}: {e}'" in call_queue
    assert """res[-1] += f"<div class='performance'>""" in call_queue
    with open(os.path.join(webui_dir, "modules", "ui.py")) as f:
        ui = f.read()
    assert "fn=wrap_gradio_gpu_call(modules.txt2img.txt2img, extra_outputs=[None, '', ''])" in ui
    tree = ast.parse(ui)
    outputs = [ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.keyword) and node.arg == "outputs"]
    assert any("output_panel.generation_info, output_panel.infotext, output_panel.html_log" in o for o in outputs)


#: The browser test's element ids that the real page makes from a template (the rest are literals of modules/ui.py):
#: where, the fragments of the real source that make it, and the gradio component it is.
TEMPLATED_IDS = {
    "quicksettings": ("modules/ui_settings.py", ['with gr.Row(elem_id="quicksettings"'], "Row"),
    "setting_sd_model_checkpoint": ("modules/ui_settings.py", ['elem_id = f"setting_{key}"'], "Dropdown"),
    "tab_txt2img": ("modules/ui.py", ['elem_id=f"tab_{ifid}"', '(txt2img_interface, "txt2img", "txt2img")'], "TabItem"),
    "tab_img2img": ("modules/ui.py", ['elem_id=f"tab_{ifid}"', '(img2img_interface, "img2img", "img2img")'], "TabItem"),
    "tab_settings": ("modules/ui.py", ['elem_id=f"tab_{ifid}"', '(settings.interface, "Settings", "settings")'],
                     "TabItem"),
    "txt2img_prompt": ("modules/ui_toprow.py", ['gr.Textbox(label="Prompt", elem_id=f"{self.id_part}_prompt"'],
                       "Textbox"),
    "img2img_prompt": ("modules/ui_toprow.py", ['gr.Textbox(label="Prompt", elem_id=f"{self.id_part}_prompt"'],
                       "Textbox"),
    "txt2img_generate": ("modules/ui_toprow.py", ["gr.Button('Generate', elem_id=f\"{self.id_part}_generate\""],
                         "Button"),
    "txt2img_hr-checkbox": ("modules/ui_components.py", ['"elem_id": f"{self.accordion_id}-checkbox"',
                                                          '"visible": False'], "Checkbox"),
    "html_info_txt2img": ("modules/ui_common.py", ["gr.HTML(elem_id=f'html_info_{tabname}', "
                                                   "elem_classes=\"infotext\")"], "HTML"),
    "html_log_txt2img": ("modules/ui_common.py", ["gr.HTML(elem_id=f'html_log_{tabname}', elem_classes=\"html-log\")"],
                         "HTML"),
    "generation_info_txt2img": ("modules/ui_common.py", ["gr.Textbox(visible=False, elem_id=f'generation_info_{"],
                                "Textbox"),
    "settings": ("modules/ui_settings.py", ['with gr.Tabs(elem_id="settings")'], "Tabs"),
    "settings_memslice": ("modules/ui_settings.py", ['gr.TabItem(elem_id=f"settings_{elem_id}", label=text)'],
                          "TabItem"),
    "column_settings_memslice": ("modules/ui_settings.py", ['gr.Column(elem_id=f"column_settings_{elem_id}"'],
                                 "Column"),
    "settings_submit": ("modules/ui_settings.py", ['gr.Button(value="Apply settings", variant=\'primary\', '
                                                   'elem_id="settings_submit")'], "Button"),
    "settings_json": ("modules/ui_settings.py", ['gr.Textbox(elem_id="settings_json", value=lambda: opts.dumpjson(), '
                                                 "visible=False)"], "Textbox"),
}  # fmt: skip

#: What the page's stand-ins (tests/fakes/script.js, tests/fakes/style.css) follow in the real scripts and
#: stylesheet: file -> fragments it holds.
REAL_SCRIPTS = {
    "script.js": ["function onUiUpdate(callback)", "function onAfterUiUpdate(callback)",
                  "function onOptionsChanged(callback)", "executeCallbacks(uiUpdateCallbacks, m);",
                  "mutationObserver.observe(gradioApp(), {childList: true, subtree: true});",
                  "function onUiTabChange(callback)",
                  "return gradioApp().querySelector('#tabs > .tab-nav > button.selected');",
                  "if (newTab && (newTab !== uiCurrentTab)) {\n            uiCurrentTab = newTab;\n"
                  "            executeCallbacks(uiTabChangeCallbacks);"],
    "javascript/ui.js": ["var json_elem = gradioApp().getElementById('settings_json');",
                         "Object.defineProperty(textarea, 'value', {", "executeCallbacks(optionsChangedCallbacks);",
                         "function updateInput(target) {", "let e = new Event(\"input\", {bubbles: true});",
                         """gradioApp().querySelector('#mode_img2img > div[style="display: block;"] img');"""],
    "javascript/inputAccordion.js": ['visibleCheckbox.id = accordion.id + "-visible-checkbox";',
                                     "accordion.classList.toggle('input-accordion-open', isOpen());",
                                     "updateInput(gradioCheckbox);", "labelWrap.click();"],
    "javascript/hints.js": ['record.target.classList.contains("options")'],
    "modules/ui_settings.py": ["methods = [component.change]", "outputs=[component, self.text_settings],"],
    "modules/ui_components.py": ["\"elem_classes\": ['input-accordion'],",
                                 "self.change(fn=None, _js='function(checked){ inputAccordionChecked(\"'"],
    "modules/ui.py": ['InputAccordion(False, label="Hires. fix", elem_id="txt2img_hr")'],
    # the rules of the webui's own stylesheet that fakes/style.css stands in for (they reach the planner panel)
    "style.css": ["#settings > div{\n    border: none;\n    margin-left: 10em;\n    padding: 0 var(--spacing-xl);\n}",
                  "#settings > div.tab-nav{\n    float: left;\n    display: block;\n    margin-left: 0;\n"
                  "    width: 10em;\n}",
                  "#settings span{\n    color: var(--body-text-color);\n}"],
}  # fmt: skip


def test_the_fake_pages_controls_are_the_webuis(webui):
    """With WEBUI_DIR: every element id of the browser test's page (``test_browser.build_page``) but its own test
    buttons is one the real 1.10.1 page makes, with the same kind of gradio component (the literals of
    ``modules/ui.py`` read off its syntax tree, the rest from their templates); the hires upscalers the page offers
    as latent are the webui's latent modes; the real scripts and stylesheet do what ``fakes/script.js`` and
    ``fakes/style.css`` stand in for."""
    from .test_browser import FAKE_ONLY_IDS, UPSCALERS, build_page

    def read(rel: str) -> str:
        with open(real_path(rel), encoding="utf8") as f:
            return f.read()

    literal = {}
    for node in ast.walk(ast.parse(read("modules/ui.py"))):
        if isinstance(node, ast.Call):
            for kw in node.keywords:
                if kw.arg == "elem_id" and isinstance(kw.value, ast.Constant):
                    literal[kw.value.value] = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
    same = {"TabItem": "Tab", "InputAccordion": "Accordion"}  # gr.TabItem is gr.Tab; InputAccordion's id: its accordion
    blocks = [b for b in build_page(webui).blocks.values() if getattr(b, "elem_id", None)]
    problems = []
    for block in blocks:
        elem_id, kind = block.elem_id, type(block).__name__
        if elem_id in FAKE_ONLY_IDS:
            continue
        if elem_id in literal:
            real = literal[elem_id]
        elif elem_id in TEMPLATED_IDS or elem_id.startswith("setting_memslice_"):
            rel, fragments, real = TEMPLATED_IDS.get(elem_id, ("modules/ui_settings.py", ['elem_id = f"setting_{key}"'],
                                                                kind))  # fmt: skip
            text = read(rel)
            problems += [f"{elem_id}: {rel} has no {f!r}" for f in fragments if f not in text]
        else:
            problems.append(f"{elem_id}: the real page has no such element")
            continue
        if same.get(real, real) != same.get(kind, kind):
            problems.append(f"{elem_id}: a {kind} here, a {real} in the webui")
    ids = {b.elem_id: b for b in blocks}
    assert ids["txt2img_hr-checkbox"].visible is False and "input-accordion" in ids["txt2img_hr"].elem_classes
    checkpoint = '"sd_model_checkpoint": OptionInfo(None, "Stable Diffusion checkpoint", gr.Dropdown'
    assert checkpoint in read("modules/shared_options.py")
    shared = ast.parse(read("modules/shared.py"))
    modes = next(n.value for n in shared.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "")
                 == "latent_upscale_modes")  # fmt: skip
    latent = {k.value for k in modes.keys}
    assert latent and all(name.startswith("Latent") for name in latent)  # what memslice.js tells latents by
    assert {u for u in UPSCALERS if u.startswith("Latent")} <= latent
    for rel, fragments in REAL_SCRIPTS.items():
        text = read(rel)
        problems += [f"{rel} has no {f!r}" for f in fragments if f not in text]
    assert not problems, "\n".join(problems)
