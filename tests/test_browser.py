"""javascript/memslice.js in a real headless Chromium, on a page of real gradio 3.41.2 components that carry the
webui's element ids, served with memslice's routes from the fake webui."""

from __future__ import annotations

import os
import re
import shutil
import socket
import threading
import time

import pytest
import torch

from .conftest import ROOT, import_ldm
from .test_webui import TITLES, generate, select

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium here: install Debian's chromium (.ci/run does) to run the browser tests"
)

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call_queue_outputs(fn):
    """What the webui's ``wrap_gradio_call`` (modules/call_queue.py) gives the page for txt2img: on success the
    function's (generation_info, infotext html, log html) with the "Time taken" div appended to the log; on an error
    ``extra_outputs`` ``[None, '', '']`` (gallery, generation info, infotext: emptied) and the escaped error in a
    ``<div class='error'>`` as the log, the timing appended. The gallery is left out of this page."""
    import html as html_module

    performance = ("<div class='performance'><p class='time'>Time taken: <wbr><span class='measurement'>0.1 sec."
                   "</span></p></div>")  # fmt: skip

    def wrapped():
        try:
            res = list(fn())
        except Exception as e:
            res = ["", "", f"<div class='error'>{html_module.escape(f'{type(e).__name__}: {e}')}</div>"]
        res[-1] += performance
        return tuple(res)

    return wrapped


#: the checkpoints of the fake quicksettings dropdown: the first is what the page starts with (no model loaded yet:
#: memslice plans the default SD1.5), choosing the second loads a small SD2-layout UNet (``tiny_sd2``)
CHECKPOINTS = ("v1-5-pruned-emaonly.safetensors [6ce0161689]", "tiny-sd2.safetensors [0123456789]")
#: the hires upscaler's choices: the webui's latent modes (``shared.latent_upscale_modes``) and image upscalers
UPSCALERS = ("Latent", "Latent (nearest-exact)", "None", "Lanczos", "R-ESRGAN 4x+")
#: elem_ids of the page that the webui does not have (checked in test_fakes.py): the test's own buttons
FAKE_ONLY_IDS = ("generate_too_large", "generate_torch_oom")


def tiny_sd2(env):
    """A loaded model as ``on_model_loaded`` reads it: a small ldm UNet with SD2's flags."""
    _, _, openaimodel = import_ldm()
    unet = openaimodel.UNetModel(
        image_size=32, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1],
        num_res_blocks=1, channel_mult=[1, 2], num_head_channels=8, use_spatial_transformer=True,
        transformer_depth=1, context_dim=32, legacy=False,
    )  # fmt: skip
    return type("M", (), {"model": type("W", (), {"diffusion_model": unet})(), "is_sdxl": False, "is_sd2": True})()


def build_page(env, load_delay=1.0):
    """The webui 1.10.1 controls a job is made of, with their element ids and kinds (``modules/ui.py``,
    ``ui_settings.py``, ``ui_components.py``; checked in test_fakes.py with WEBUI_DIR): the quicksettings checkpoint
    dropdown (its change loads the model, then returns the hidden ``settings_json``), txt2img's size, batch and
    Hires. fix (an InputAccordion: a hidden checkbox ``txt2img_hr-checkbox`` and an accordion ``txt2img_hr``, the
    upscaler a gradio dropdown), img2img's image, Resize to / Resize by tabs and batch, the output infotext and
    log boxes (``modules/ui_common.py``: ``html_info_<tab>`` and ``html_log_<tab>`` in one group), and the Memory
    slicing settings column."""
    import json

    import gradio as gr

    opts = env.shared.opts

    def run_generation():
        select(env, TITLES["doggettx"])
        opts.set("memslice_budget_gb", 1 / 4096)  # 256 KiB: under the fused kernel's scratch, einsum slices
        layer = env.ldm_attention.CrossAttention(query_dim=64, heads=4, dim_head=16)

        def sample(p):
            with torch.no_grad():
                layer(torch.randn(2, 300, 64))

        try:
            _, processed = generate(env, sample)
        finally:
            opts.set("memslice_budget_gb", 2.0)
        return "{}", "<p>" + processed.infotexts[0].replace("\n", "<br>") + "</p>", "<p class='comments'></p>"

    def run_failing_generation():
        select(env, TITLES["auto"])
        opts.set("memslice_budget_gb", 1 / 1024 / 1024)  # 1 KiB: nothing fits
        layer = env.ldm_attention.CrossAttention(query_dim=64, heads=4, dim_head=16)

        def sample(p):
            with torch.no_grad():
                layer(torch.randn(2, 300, 64))

        try:
            generate(env, sample)
        finally:
            opts.set("memslice_budget_gb", 2.0)
        return "{}", "<p>unexpectedly fitted</p>", ""

    def run_torch_oom():
        """A job that a memslice entry runs and torch's allocator stops outside attention (no memslice failure)."""
        select(env, TITLES["auto"])

        def sample(p):
            raise MemoryError("out of memory in a convolution (simulated)")

        generate(env, sample)
        return "{}", "<p>unexpectedly ran</p>", ""

    def load_checkpoint(title):
        """The webui's quicksettings change: ``opts.set`` loads the model (``on_model_loaded`` runs), then the
        dropdown and ``settings_json`` are returned."""
        time.sleep(load_delay)
        if title == CHECKPOINTS[1]:
            env.script_callbacks.model_loaded_callback(tiny_sd2(env))
        return title, json.dumps({"sd_model_checkpoint": title})

    def apply_settings(title):
        """Apply settings after ticking the webui's "Upcast cross attention layer to float32" (another section):
        saved, then ``settings_json`` returned. Nothing of the job on the page changes."""
        opts.set("upcast_attn", True)
        return json.dumps({"sd_model_checkpoint": title, "upcast_attn": True})

    slider = dict(interactive=True)
    with gr.Blocks(analytics_enabled=False, title="fake webui") as demo:
        with gr.Row(elem_id="quicksettings"):
            checkpoint = gr.Dropdown(list(CHECKPOINTS), value=CHECKPOINTS[0], label="Stable Diffusion checkpoint",
                                     elem_id="setting_sd_model_checkpoint", interactive=True)  # fmt: skip
        with gr.Tabs(elem_id="tabs"):
            with gr.TabItem("txt2img", elem_id="tab_txt2img"):
                gr.Textbox(label="Prompt", elem_id="txt2img_prompt")
                gr.Slider(64, 2048, value=512, step=8, label="Width", elem_id="txt2img_width", **slider)
                gr.Slider(64, 2048, value=512, step=8, label="Height", elem_id="txt2img_height", **slider)
                gr.Slider(1, 100, value=1, step=1, label="Batch count", elem_id="txt2img_batch_count", **slider)
                gr.Slider(1, 8, value=1, step=1, label="Batch size", elem_id="txt2img_batch_size", **slider)
                # the webui's InputAccordion: a hidden checkbox, an accordion whose opening ticks it (fakes/script.js)
                enable_hr = gr.Checkbox(False, label="Hires. fix", elem_id="txt2img_hr-checkbox", visible=False)
                enable_hr.change(fn=None, _js="function(checked){ inputAccordionChecked('txt2img_hr', checked); }",
                                 inputs=[enable_hr])  # fmt: skip
                with gr.Accordion("Hires. fix", open=False, elem_id="txt2img_hr", elem_classes=["input-accordion"]):
                    gr.Dropdown(list(UPSCALERS), value="Latent", label="Upscaler", elem_id="txt2img_hr_upscaler",
                                interactive=True)  # fmt: skip
                    gr.Slider(1.0, 4.0, value=2.0, step=0.05, label="Upscale by", elem_id="txt2img_hr_scale", **slider)
                    gr.Slider(0, 2048, value=0, step=8, label="Resize width to", elem_id="txt2img_hr_resize_x",
                              **slider)  # fmt: skip
                    gr.Slider(0, 2048, value=0, step=8, label="Resize height to", elem_id="txt2img_hr_resize_y",
                              **slider)  # fmt: skip
                button = gr.Button("Generate", elem_id="txt2img_generate")
                failing = gr.Button("Generate too large", elem_id="generate_too_large")
                oom = gr.Button("Generate into a torch OOM", elem_id="generate_torch_oom")
                with gr.Group():
                    info = gr.HTML(elem_id="html_info_txt2img", elem_classes="infotext")
                    log = gr.HTML(elem_id="html_log_txt2img", elem_classes="html-log")
                    generation_info = gr.Textbox(visible=False, elem_id="generation_info_txt2img")
            with gr.TabItem("img2img", elem_id="tab_img2img"):
                gr.Textbox(label="Prompt", elem_id="img2img_prompt")
                with (
                    gr.Tabs(elem_id="mode_img2img"),
                    gr.TabItem("img2img", id="img2img", elem_id="img2img_img2img_tab"),
                ):
                    gr.Image(label="Image for img2img", elem_id="img2img_image", show_label=False, source="upload",
                             interactive=True, type="pil")  # fmt: skip
                with gr.Tabs(elem_id="img2img_tabs_resize"):
                    with gr.Tab(label="Resize to", id="to", elem_id="img2img_tab_resize_to"):
                        gr.Slider(64, 2048, value=512, step=8, label="Width", elem_id="img2img_width", **slider)
                        gr.Slider(64, 2048, value=512, step=8, label="Height", elem_id="img2img_height", **slider)
                    with gr.Tab(label="Resize by", id="by", elem_id="img2img_tab_resize_by"):
                        gr.Slider(0.05, 4.0, value=1.0, step=0.05, label="Scale", elem_id="img2img_scale", **slider)
                gr.Slider(1, 100, value=1, step=1, label="Batch count", elem_id="img2img_batch_count", **slider)
                gr.Slider(1, 8, value=1, step=1, label="Batch size", elem_id="img2img_batch_size", **slider)
            with (
                gr.TabItem("Settings", elem_id="tab_settings"),
                gr.Tabs(elem_id="settings"),
                gr.TabItem("Memory slicing", elem_id="settings_memslice"),
                gr.Column(elem_id="column_settings_memslice"),
            ):
                for key, option in opts.data_labels.items():
                    if option.section != ("memslice", "Memory slicing"):
                        continue
                    component = option.component or gr.Checkbox
                    args = dict(option.component_args or {}, interactive=True)  # inputs of Apply in the webui
                    component(label=option.label, value=getattr(opts, key), elem_id=f"setting_{key}", **args)
                apply = gr.Button("Apply settings", elem_id="settings_submit")
        settings_json = gr.Textbox(json.dumps({"sd_model_checkpoint": CHECKPOINTS[0]}), elem_id="settings_json",
                                   visible=False)  # fmt: skip
        checkpoint.change(fn=load_checkpoint, inputs=[checkpoint], outputs=[checkpoint, settings_json])
        apply.click(fn=apply_settings, inputs=[checkpoint], outputs=[settings_json])
        outputs = [generation_info, info, log]
        button.click(fn=call_queue_outputs(run_generation), outputs=outputs)
        failing.click(fn=call_queue_outputs(run_failing_generation), outputs=outputs)
        oom.click(fn=call_queue_outputs(run_torch_oom), outputs=outputs)
    return demo


@pytest.fixture
def server(webui):
    import asyncio

    import gradio as gr
    import uvicorn
    from fastapi import FastAPI

    webui.shared.opts.set("memslice_budget_gb", 2.0)  # a fixed budget: the live free memory moves under the test
    app = FastAPI()
    app.state.slow_widths = {}  # plan requests for these widths: planned at once, answered this many seconds late
    app.state.busy_widths = {}  # ... answered 503 (busy, as the routes answer when too many wait) this many times
    app.state.refused_widths = {}  # ... answered 400 with this detail

    @app.middleware("http")
    async def misbehave(request, call_next):
        from starlette.responses import JSONResponse

        width = request.query_params.get("width") if request.url.path.endswith("/plan") else None
        if app.state.busy_widths.get(width, 0) > 0:
            app.state.busy_widths[width] -= 1
            return JSONResponse({"detail": "busy"}, status_code=503, headers={"Retry-After": "1"})
        if width in app.state.refused_widths:
            return JSONResponse({"detail": app.state.refused_widths[width]}, status_code=400)
        response = await call_next(request)  # planned now, answered late
        await asyncio.sleep(app.state.slow_widths.get(width, 0))
        return response

    webui.script_callbacks.app_started_callback(None, app)
    app = gr.mount_gradio_app(app, build_page(webui), path="/")
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "the test server did not start"
    webui.app = app
    try:
        yield f"http://127.0.0.1:{port}/", webui
    finally:
        srv.should_exit = True
        thread.join(10)


@pytest.fixture
def card(server, monkeypatch):
    """A CUDA card with 6 GiB free (no model loaded: the job's memory; the default SD1.5's 2 GiB of weights count
    against it): the verdicts stop moving with this machine's free RAM, and CUDA's measured allocator share (up to
    25 %) leaves room for a tight job. (Ask for it before ``page``: the panel plans as soon as the page loads.)"""
    from lib_memslice import probe

    _, env = server
    free = probe.FreeMemory(6 << 30, "cuda free (the test's card)")
    monkeypatch.setattr(probe, "free_memory", lambda device, precise=False: free)
    monkeypatch.setattr(env.memslice.planner, "device_kind", lambda: "cuda")
    return free


@pytest.fixture
def page(server):
    from playwright.sync_api import sync_playwright

    url, env = server
    scripts = []
    for path in (("tests", "fakes", "script.js"), ("javascript", "memslice.js")):
        with open(os.path.join(ROOT, *path)) as f:
            scripts.append(f.read())
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--no-first-run", "--disable-quic", "--disable-sync",
                  "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"],
        )  # fmt: skip
        context = browser.new_context()
        outside = []
        # classic scripts in global scope, at the end of <head>, as the webui injects extension javascript; the
        # webui's own rules that reach the panel (fakes/style.css) and the extension's style.css at the end of
        # <body>, in that order, as the webui links its style.css and then every extension's (ui_gradio_extensions.py)
        tags = "".join(f"<script>{script}</script>" for script in scripts)
        css = ""
        for path in (("tests", "fakes", "style.css"), ("style.css",)):  # the webui's rules first, as it links them
            with open(os.path.join(ROOT, *path)) as f:
                css += f"<style>{f.read()}</style>"

        def inject(route):
            response = route.fetch()
            body = response.text().replace("</head>", tags + "</head>", 1).replace("</body>", css + "</body>", 1)
            route.fulfill(response=response, body=body)

        # Only the document is routed: a sync-API route handler (and a callable URL matcher) runs only while the
        # test thread is inside a Playwright call, so routing the page's API requests would stall them. Foreign
        # hosts are cut off by the browser's resolver instead, and requests are observed through events.
        context.route(
            re.compile("^" + re.escape(url) + r"(\?__theme=(dark|light))?$"), inject
        )  # the page, either theme
        context.on("request", lambda r: None if r.url.startswith(url) else outside.append(r.url))

        tab = context.new_page()
        errors = []
        tab.on("pageerror", lambda e: errors.append(str(e)))
        tab.goto(url)
        tab.wait_for_selector("#txt2img_prompt", timeout=60_000)
        tab.env, tab.base_url, tab.js_errors, tab.outside = env, url, errors, outside
        yield tab
        browser.close()


def open_settings(tab):
    """Open Settings, where the panel is, and wait for the plan it makes as it comes into view."""
    tab.wait_for_selector("#memslice_planner", state="attached", timeout=30_000)  # built as the page loads
    watch_plans(tab)
    tab.click("#tabs > .tab-nav button:has-text('Settings')")
    wait_for_replan(tab)


def open_tab(tab, name):
    tab.click(f"#tabs > .tab-nav button:has-text('{name}')")


def planner_text(tab, selector):
    return tab.inner_text(f"#memslice_planner {selector}")


def wait_for_text(tab, selector, predicate, timeout=20.0):
    deadline = time.time() + timeout
    text = ""
    while time.time() < deadline:
        text = planner_text(tab, selector) if selector.startswith(".") or selector.startswith("tr") else (
            tab.inner_text(selector))  # fmt: skip
        if predicate(text):
            return text
        time.sleep(0.1)
    raise AssertionError(f"{selector} never satisfied the condition; last text: {text!r}")


def api(tab, path, **params):
    import json
    from urllib.parse import urlencode
    from urllib.request import urlopen

    with urlopen(f"{tab.base_url}memslice/v1/{path}?{urlencode(params)}") as response:
        return json.load(response)


def shown_job(tab):
    """The job whose plan the panel shows (its data-job: the tab, batch count, checkpoint and the request's
    parameters), or None."""
    import json

    text = tab.get_attribute("#memslice_planner", "data-job")
    return json.loads(text) if text else None


def wait_for_job(tab, timeout=20.0, state="ready", absent=(), checkpoint=None, **params):
    """Wait until the panel shows a plan (``state``) of a job whose request has ``params`` and none of ``absent``
    (and is of ``checkpoint``, when given)."""
    deadline = time.time() + timeout
    job = None
    while time.time() < deadline:
        job = shown_job(tab)
        if (tab.get_attribute("#memslice_planner", "data-state") == state and job is not None
                and all(job["params"].get(k) == v for k, v in params.items())
                and not any(k in job["params"] for k in absent)
                and checkpoint in (None, job.get("checkpoint"))):  # fmt: skip
            return job
        time.sleep(0.1)
    raise AssertionError(f"the panel never showed {params} without {absent}; it shows {job}")


def watch_plans(tab):
    """Log the panel's states from now on (``window.planStates``: "updating ...", "ready <job> <first bar's
    title>", ..., and "options" where the webui's settings_json changed, after the panel's own callback ran)."""
    tab.evaluate(
        """() => { window.planStates = []; if (window.planWatcher) return;
            onOptionsChanged(() => window.planStates.push('options'));
            const box = document.querySelector('#memslice_planner'), bar = () => box.querySelector('.memslice-pass');
            window.planWatcher = new MutationObserver(() => window.planStates.push(
                box.dataset.state + ' ' + (box.dataset.job || '') + ' ' + (bar() ? bar().title : '')));
            window.planWatcher.observe(box, {attributes: true, attributeFilter: ['data-job', 'data-state']}); }"""
    )


def wait_for_replan(tab, after_options=False):
    """Wait until the panel, watched by :func:`watch_plans`, planned again and shows it; ``after_options``: a plan
    started after the webui's settings_json changed (a plan already under way when Apply was clicked was asked
    before the server applied the settings, and its answer is the old one)."""
    if after_options:
        tab.evaluate("""() => onOptionsChanged(() => window.planStates.push('options'))""")
    tab.wait_for_function(
        """(after) => { const s = window.planStates, o = after ? s.indexOf('options') : 0;
            const i = o < 0 ? -1 : s.findIndex((x, j) => j >= o && x.startsWith('updating'));
            return i >= 0 && s.slice(i).some(x => x.startsWith('ready'))
                && document.querySelector('#memslice_planner').dataset.state === 'ready'; }""",
        arg=after_options,
    )


def plan_of(tab, job, **changes):
    """The API's answer for the job the panel shows (with ``changes``)."""
    params = {k: v for k, v in dict(job["params"], **changes).items() if v is not None}
    return api(tab, "plan", **params)


def bars(tab):
    """Each pass's bar as drawn: its texts, attributes, its segments' bytes and pixel widths, the track's width and
    the 100 % line's position, and the colours the page computed."""
    return tab.evaluate(
        """() => [...document.querySelectorAll('#memslice_planner .memslice-pass')].map(li => {
            const track = li.querySelector('.memslice-track');
            const box = track.getBoundingClientRect();
            const line = li.querySelector('.memslice-limit').getBoundingClientRect();
            return {
                name: li.querySelector('.memslice-pass-name').textContent,
                label: li.querySelector('.memslice-pass-label').innerText,
                verdict: li.dataset.verdict, cls: li.dataset.class, binding: li.dataset.binding,
                title: li.title, focusable: li.tabIndex === 0,
                detail: li.querySelector('.memslice-pass-detail').textContent,
                hidden: track.getAttribute('aria-hidden'),
                border: track.clientLeft,  // the segments' widths are shares of the track's content box
                width: box.width - 2 * track.clientLeft, line: line.left + line.width / 2 - box.left - track.clientLeft,
                segments: [...track.querySelectorAll('.memslice-seg')].map(seg => ({
                    part: seg.dataset.part, bytes: Number(seg.dataset.bytes),
                    width: seg.getBoundingClientRect().width,
                    colour: getComputedStyle(seg).backgroundColor,
                    tint: getComputedStyle(seg).backgroundImage,
                })),
            };
        })"""
    )


def palette(tab, name):
    """A gradio palette colour as the page computes it (e.g. ``--color-green-500`` -> ``rgb(34, 197, 94)``)."""
    return tab.evaluate(
        """name => { const el = document.createElement('div'); el.style.color = `var(${name})`;
            document.body.appendChild(el); const c = getComputedStyle(el).color; el.remove(); return c; }""",
        name,
    )


def contrast(foreground, background):
    """WCAG's contrast ratio of two computed ``rgb(...)`` colours."""

    def luminance(colour):
        channels = [int(c) / 255 for c in re.findall(r"\d+", colour)[:3]]
        r, g, b = (c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels)
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    light, dark = sorted((luminance(foreground), luminance(background)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


def words_on_colours(tab):
    """(text colour, background colour) of every verdict word drawn on its verdict's colour: the answer's badge and
    each pass's label."""
    return tab.evaluate(
        """() => [...document.querySelectorAll('#memslice_planner .memslice-badge, .memslice-pass-verdict')]
            .map(el => { const s = getComputedStyle(el); return [el.textContent, s.color, s.backgroundColor]; })"""
    )


def set_number(tab, elem_id, value):
    box = tab.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def choose(tab, elem_id, option):
    """Pick a gradio 3.41 dropdown's option as a user does: open the list, click the option (no DOM input or change
    event reaches the page: only the list closing)."""
    tab.click(f"#{elem_id} input")
    tab.click(f"#{elem_id} ul.options li[data-value='{option}']")


def enable_hires(tab):
    """Open the Hires. fix accordion: the webui ticks its checkbox (fakes/script.js, as inputAccordion.js)."""
    tab.click("#txt2img_hr .label-wrap")
    tab.wait_for_function("document.querySelector('#txt2img_hr-checkbox input').checked")


def assert_shows(tab, job, expected=None):
    """The panel shows ``expected`` (default: the API's answer for ``job``): one bar per pass, its verdict, the pass
    that binds, the answer line."""
    expected = expected or plan_of(tab, job)
    drawn = bars(tab)
    assert [b["name"] for b in drawn] == [p["name"] for p in expected["passes"]]
    assert [b["verdict"] for b in drawn] == [p["verdict"] for p in expected["passes"]]
    assert [b["binding"] for b in drawn] == [str(p["name"] == expected["limit"]).lower() for p in expected["passes"]]
    for bar, p in zip(drawn, expected["passes"], strict=True):
        assert sum(s["bytes"] for s in bar["segments"]) == p["total_bytes"]
        assert [s["bytes"] for s in bar["segments"]][:2] == [p["weight_bytes"], p["input_bytes"]]
        largest = tab.evaluate(f"window.memslice.formatBytes({p['attention_bytes']})")
        assert (
            p["attention_at_peak_bytes"] > 0 or p["attention_bytes"] == 0 or f"largest call, {largest}" in bar["title"]
        )
    assert tab.get_attribute("#memslice_planner", "data-verdict") == expected["verdict"]
    answer = planner_text(tab, ".memslice-answer")
    assert answer.lower().startswith(expected["verdict"]) and f"binding pass: {expected['limit']}" in answer
    return expected


def sizes_text(sizes):
    """The answer line's largest squares: batches with the same size named together."""
    groups = []
    for batch, side in zip((1, 2, 4), sizes, strict=True):
        if groups and groups[-1][0] == side:
            groups[-1][1].append(batch)
        else:
            groups.append((side, [batch]))
    words = []
    for i, (side, batches) in enumerate(groups):
        names = ", ".join(map(str, batches[:-1])) + " and " + str(batches[-1]) if len(batches) > 1 else str(batches[0])
        words.append(f"{side} px at {'batch ' if i == 0 else ''}{names}" if side else f"nothing at {names}")
    return ", ".join(words)


def find_side(tab, verdict, **params):
    """The smallest square first-pass size (64 px steps) at which the job has ``verdict``."""
    for side in range(512, 2049, 64):
        if api(tab, "plan", width=side, height=side, **params)["verdict"] == verdict:
            return side
    raise AssertionError(f"no size up to 2048 px is {verdict!r} with {params}")


def test_the_webui_conventions_are_used(page):
    assert page.evaluate("typeof gradioApp === 'function' && typeof onUiLoaded === 'function'")
    assert page.evaluate("typeof window.memslice.refreshPlanner") == "function"


def test_the_answer_line_says_the_verdict_the_binding_pass_and_the_largest_squares(card, page):
    open_settings(page)
    job = wait_for_job(page, width=512, height=512, batch=1)
    expected = assert_shows(page, job)
    sizes = [plan_of(page, job, batch=b)["max_square_resolution"] for b in (1, 2, 4)]
    answer = planner_text(page, ".memslice-answer")
    assert answer.endswith("largest square: " + sizes_text(sizes)), answer
    assert planner_text(page, ".memslice-advice") == "" and expected["verdict"] == "fits"  # nothing to change
    assert page.get_attribute("#memslice_planner .memslice-answer", "role") == "status"
    assert not page.js_errors


def test_the_largest_squares_are_for_the_users_job_with_a_hires_target(card, page, monkeypatch):
    """Issue 25 (8.2): with a hires target size the batch sizes were asked for a 512 px first pass plus that target
    (a 4x upscale) instead of the user's first pass. (On a 3 GiB card, where the job does not fit.)"""
    from lib_memslice import probe

    monkeypatch.setattr(probe, "free_memory", lambda device, precise=False: probe.FreeMemory(3 << 30, "cuda free"))
    set_number(page, "txt2img_width", 1024)
    set_number(page, "txt2img_height", 1024)
    enable_hires(page)
    set_number(page, "txt2img_hr_resize_x", 1536)
    set_number(page, "txt2img_hr_resize_y", 1536)
    open_settings(page)
    job = wait_for_job(page, width=1024, height=1024, hr_width=1536, hr_height=1536)
    sizes = [plan_of(page, job, batch=b)["max_square_resolution"] for b in (1, 2, 4)]
    wrong = [plan_of(page, job, batch=b, width=512, height=512)["max_square_resolution"] for b in (1, 2, 4)]
    assert sizes != wrong  # the test tells the two apart
    answer = planner_text(page, ".memslice-answer")
    assert answer.endswith("largest square first pass (hires scaled alike): " + sizes_text(sizes)), answer
    assert plan_of(page, job)["verdict"] == "does not fit"
    advice = planner_text(page, ".memslice-advice")
    assert advice.endswith(" or a smaller hires target.") and "hires scale" not in advice
    assert not page.js_errors


def test_the_pass_table_has_column_headings(card, page):
    enable_hires(page)
    open_settings(page)
    job = wait_for_job(page, hr_scale=2)
    expected = plan_of(page, job)
    page.click("#memslice_planner .memslice-details summary")  # the numbers, one click away
    headings = page.locator("#memslice_planner .memslice-passes thead th[scope=col]").all_inner_texts()
    assert headings == ["pass", "size", "batch", "weights", "inputs", "other activations", "attention", "allocator",
                        "total", "headroom", "verdict"]  # fmt: skip
    rows = page.locator("#memslice_planner .memslice-passes tbody tr")
    assert rows.locator("th[scope=row]").all_inner_texts() == [p["name"] for p in expected["passes"]]
    assert [r.split("\t")[-1] for r in rows.all_inner_texts()] == [p["verdict"] for p in expected["passes"]]
    assert not page.js_errors


def test_each_bar_is_its_passes_parts_in_proportion_against_the_jobs_memory(card, page):
    enable_hires(page)
    choose(page, "txt2img_hr_upscaler", "R-ESRGAN 4x+")
    open_settings(page)
    job = wait_for_job(page, hr_upscaler="image")
    expected = assert_shows(page, job)
    memory = expected["memory_bytes"]
    scale = max(memory, *(p["total_bytes"] for p in expected["passes"]))
    for bar, p in zip(bars(page), expected["passes"], strict=True):
        parts = {s["part"]: s["bytes"] for s in bar["segments"]}
        assert list(parts) == ["weights", "inputs", "activations", "attention", "allocator"]
        peak = p["tensor_bytes"] - p["weight_bytes"] - p["input_bytes"]
        assert parts == {"weights": p["weight_bytes"], "inputs": p["input_bytes"], "attention":
                         p["attention_at_peak_bytes"], "activations": peak - p["attention_at_peak_bytes"],
                         "allocator": p["allocator_bytes"]}  # fmt: skip
        assert sum(parts.values()) == p["total_bytes"] == p["tensor_bytes"] + p["allocator_bytes"]
        for segment in bar["segments"]:  # widths in proportion to the bytes, on one scale for every pass
            assert segment["width"] == pytest.approx(bar["width"] * segment["bytes"] / scale, abs=0.6)
        assert bar["line"] == pytest.approx(bar["width"] * memory / scale, abs=1.0)  # the 100 % mark
        assert bar["hidden"] == "true" and bar["focusable"]  # the bar is drawn; its words are the text
        for words in (bar["title"], bar["detail"]):
            assert words.startswith(
                f"{p['name']}, {p['width']} \u00d7 {p['height']}, batch {p['batch']}: {p['verdict']}"
            )
            assert "weights " in words and "allocator (measured share) " in words and " to spare" in words
        assert p["name"] in bar["label"] and p["verdict"] in bar["label"]
    label = planner_text(page, ".memslice-limit-label")
    assert label.startswith(page.evaluate(f"window.memslice.formatBytes({memory})"))
    assert not page.js_errors


def test_the_colours_and_words_follow_the_verdict(card, page, monkeypatch):
    """A fitting, a tight and a failing job: every bar in its verdict's colour, with the verdict in words too; the
    sentence says what to change."""
    green, yellow, red = (palette(page, f"--color-{c}-500") for c in ("green", "yellow", "red"))
    assert len({green, yellow, red}) == 3
    hires = dict(hr_scale=2, hr_upscaler="latent", budget_gb=2)
    tight = find_side(page, "tight", **hires)
    enable_hires(page)
    for side, verdict, colour in ((512, "fits", green), (tight, "tight", yellow), (tight + 256, "does not fit", red)):
        open_tab(page, "txt2img")
        set_number(page, "txt2img_width", side)
        set_number(page, "txt2img_height", side)
        open_tab(page, "Settings")
        job = wait_for_job(page, width=side, height=side)
        expected = assert_shows(page, job)
        assert expected["verdict"] == verdict
        drawn = bars(page)
        for bar, p in zip(drawn, expected["passes"], strict=True):
            colours = {s["colour"] for s in bar["segments"]}
            assert colours == {green if p["verdict"] == "fits" else yellow if p["verdict"] == "tight" else red}
            tints = [s["tint"] for s in bar["segments"]]  # from solid to light: weights, ..., the allocator's share
            assert tints[0] == "none" and "0.7)" in tints[-1] and "0.2)" in tints[1] and "0.4)" in tints[2]
            assert p["verdict"] in bar["label"]
        badge = page.locator("#memslice_planner .memslice-badge")
        assert (
            badge.inner_text().lower() == verdict
            and page.evaluate(
                "getComputedStyle(document.querySelector('#memslice_planner .memslice-badge')).backgroundColor"
            )
            == colour
        )
        advice = planner_text(page, ".memslice-advice")
        if verdict == "fits":
            assert advice == ""
        elif verdict == "tight":
            assert advice.startswith("Tight:") and "smaller size or batch" in advice
        else:
            assert advice.startswith("To fit, try a smaller size (up to ") and advice.endswith(
                " or a lower hires scale."
            )
            assert f"up to {expected['max_square_resolution']} px square at batch 1" in advice
    from lib_memslice import probe  # a device whose free memory cannot be read (DirectML): an assumed reading

    monkeypatch.setattr(probe, "free_memory", lambda device, precise=False: probe.FreeMemory(
        6 << 30, "assumed (no memory probe for device privateuseone:0)", trusted=False))  # fmt: skip
    open_tab(page, "txt2img")
    page.wait_for_timeout(600)  # the panel is out of view; opening it plans again
    open_settings(page)
    assert planner_text(page, ".memslice-advice").endswith(
        " or an attention budget (free memory cannot be read on this device, e.g. DirectML)."
    )
    assert not page.js_errors


def test_the_hires_upscaler_dropdown_replans_with_the_image_upscalers_passes(card, page):
    """Issue 25 (8.1): a gradio 3.41 dropdown sends no DOM input or change event, so the panel stayed stale when the
    hires upscaler changed. It follows the DOM change the webui's own onAfterUiUpdate() sees (the option list
    closing), with the panel's tab closed and nothing else touched."""
    open_settings(page)
    open_tab(page, "txt2img")
    enable_hires(page)
    job = wait_for_job(page, hr_upscaler="latent")
    assert [b["name"] for b in bars(page)] == ["UNet", "UNet (hires)", "VAE decode (hires)"]
    choose(page, "txt2img_hr_upscaler", "R-ESRGAN 4x+")
    job = wait_for_job(page, hr_upscaler="image")
    assert job["upscaler"] == "R-ESRGAN 4x+"
    expected = assert_shows(page, job)
    assert [p["name"] for p in expected["passes"]] == ["UNet", "VAE decode", "VAE encode (hires)", "UNet (hires)",
                                                       "VAE decode (hires)"]  # fmt: skip
    choose(page, "txt2img_hr_upscaler", "Latent (nearest-exact)")  # every "Latent ..." mode works on latents
    assert_shows(page, wait_for_job(page, hr_upscaler="latent"))
    assert "by Latent (nearest-exact)" in planner_text(page, ".memslice-job")
    assert not page.js_errors


def test_the_panel_follows_every_txt2img_control(card, page):
    """Each control of a txt2img job re-plans it. (768 px is answered "busy" twice first: the panel asks again after
    the Retry-After the routes send.)"""
    page.env.app.state.busy_widths["768"] = 2
    open_settings(page)
    open_tab(page, "txt2img")
    steps = [
        (lambda: set_number(page, "txt2img_width", 768), dict(width=768), ()),
        (lambda: set_number(page, "txt2img_height", 640), dict(height=640), ()),
        (lambda: set_number(page, "txt2img_batch_size", 3), dict(batch=3), ()),
        (lambda: enable_hires(page), dict(hr_scale=2, hr_upscaler="latent"), ()),
        (lambda: set_number(page, "txt2img_hr_scale", 1.5), dict(hr_scale=1.5), ("hr_width",)),
        (lambda: set_number(page, "txt2img_hr_resize_x", 1024), dict(hr_width=1024), ("hr_height",)),
        (lambda: set_number(page, "txt2img_hr_resize_y", 1024), dict(hr_width=1024, hr_height=1024), ()),
        (lambda: choose(page, "txt2img_hr_upscaler", "Lanczos"), dict(hr_upscaler="image"), ()),
    ]
    for act, params, absent in steps:
        act()
        job = wait_for_job(page, absent=absent, **params)
        assert_shows(page, job)
    assert planner_text(page, ".memslice-job").startswith(
        "txt2img 768 \u00d7 640, hires 1024 \u00d7 1024 by Lanczos, batch 3"
    )
    set_number(page, "txt2img_batch_count", 4)  # batches run one at a time: the same plan, said in the job line
    wait_for_job(page, width=768)
    page.wait_for_function("document.querySelector('#memslice_planner').dataset.job.includes('\"count\":4')")
    assert "batch 3 (4 batches, one at a time)" in planner_text(page, ".memslice-job")
    page.click("#txt2img_hr-visible-checkbox")  # Hires. fix off with its own checkbox
    job = wait_for_job(page, absent=("hr_scale", "hr_width", "hr_upscaler"))
    assert [b["name"] for b in bars(page)] == ["UNet", "VAE decode"] and assert_shows(page, job)
    page.env.app.state.refused_widths["896"] = "width: the page plans sides up to 2048 px"
    set_number(page, "txt2img_width", 896)  # a refused job: its reason, no numbers (never the last job's)
    job = wait_for_job(page, state="error", width=896)
    assert planner_text(page, ".memslice-error") == "memslice: width: the page plans sides up to 2048 px"
    assert bars(page) == [] and page.get_attribute("#memslice_planner", "data-verdict") is None
    set_number(page, "txt2img_width", 832)
    assert_shows(page, wait_for_job(page, width=832))
    assert not page.js_errors


def test_the_panel_follows_img2img_and_its_image_size(card, page, tmp_path):
    from PIL import Image

    open_settings(page)
    open_tab(page, "img2img")
    job = wait_for_job(page, img2img=True, width=512, height=512)
    assert job["tab"] == "img2img"
    assert [b["name"] for b in bars(page)] == ["VAE encode", "UNet", "VAE decode"]
    assert_shows(page, job)
    set_number(page, "img2img_width", 832)
    set_number(page, "img2img_batch_size", 2)
    assert_shows(page, wait_for_job(page, img2img=True, width=832, batch=2))
    page.click("#img2img_tabs_resize > .tab-nav button:has-text('Resize by')")
    wait_for_job(page, state="waiting")  # no image to resize yet: no numbers
    assert "no image is loaded yet" in planner_text(page, ".memslice-answer") and bars(page) == []
    Image.new("RGB", (640, 480), "gray").save(tmp_path / "init.png")
    page.set_input_files("#img2img_image input[type=file]", str(tmp_path / "init.png"))
    assert_shows(page, wait_for_job(page, img2img=True, width=640, height=480))
    set_number(page, "img2img_scale", 1.5)
    job = wait_for_job(page, img2img=True, width=960, height=720)
    assert_shows(page, job)
    assert planner_text(page, ".memslice-job").startswith("img2img 960 \u00d7 720 (640 \u00d7 480 resized by 1.5)")
    watch_plans(page)
    open_tab(page, "Settings")  # the job stays img2img's, resized by, while the planner's own tab is open
    wait_for_replan(page)
    assert shown_job(page)["tab"] == "img2img" and shown_job(page)["params"]["width"] == 960
    open_tab(page, "txt2img")
    assert wait_for_job(page, absent=("img2img",), width=512)["tab"] == "txt2img"
    assert not page.js_errors


def test_a_generation_tab_passed_through_on_the_way_to_settings_is_the_job(card, page):
    """The job is the generation tab open last, however briefly: img2img open for 50 ms on the way to Settings
    (under the 200 ms after which the webui runs its onAfterUiUpdate() callbacks) is img2img's job. Seen in the real
    webui 1.10.1: up to about 200 ms in img2img and the panel planned txt2img's job."""
    open_settings(page)
    assert wait_for_job(page, width=512)["tab"] == "txt2img"
    page.click("#tabs > .tab-nav button:has-text('txt2img')")
    page.wait_for_timeout(600)  # settled on txt2img
    page.evaluate(
        """() => new Promise(resolve => { const tab = name => [...document.querySelectorAll('#tabs > .tab-nav button')]
                .find(b => b.textContent.trim() === name);
            tab('img2img').click(); setTimeout(() => { tab('Settings').click(); resolve(); }, 50); })"""
    )
    job = wait_for_job(page, img2img=True)
    assert job["tab"] == "img2img"
    assert page.evaluate("document.querySelector('#memslice_planner').offsetParent !== null")  # Settings is open
    assert_shows(page, job)
    assert not page.js_errors


def test_the_panel_follows_every_memslice_setting_before_apply(card, page):
    open_settings(page)
    wait_for_job(page, budget_gb=2)
    budget = page.locator("#setting_memslice_budget_gb input[type=number]")
    budget.fill("0.05")  # typed, not applied: nothing is saved
    job = wait_for_job(page, budget_gb=0.05)
    assert_shows(page, job)
    page.click("#memslice_planner .memslice-details summary")
    wait_for_text(page, ".memslice-room", lambda t: "attention budget 51.2 MiB" in t)
    assert page.env.shared.opts.memslice_budget_gb == 2.0  # typed values are previews; nothing was saved
    set_number(page, "setting_memslice_slice_cap", 1)
    assert_shows(page, wait_for_job(page, budget_gb=0.05, slice_cap=1))
    budget.fill("0.0001")  # 105 KiB: attention in one piece does not fit in it
    assert assert_shows(page, wait_for_job(page, budget_gb=0.0001))["verdict"] == "does not fit"
    assert planner_text(page, ".memslice-advice") == "Nothing fits at any size: try a larger attention budget."
    budget.fill("0.01")  # 10 MiB: attention in one piece fits only smaller sizes
    expected = assert_shows(page, wait_for_job(page, budget_gb=0.01))
    assert expected["verdict"] == "does not fit" and expected["max_square_resolution"] > 0
    assert planner_text(page, ".memslice-advice") == (f"To fit, try a smaller size (up to "
        f"{expected['max_square_resolution']} px square at batch 1) or a larger attention budget.")  # fmt: skip
    set_number(page, "setting_memslice_safety_factor", 5)
    assert_shows(page, wait_for_job(page, safety_factor=5))
    for key, value in (("memslice_kernel", "einsum"), ("memslice_vae", "off")):
        choices = page.env.shared.opts.data_labels[key].component_args["choices"]
        assert value in choices
        page.click(f"#setting_{key} label:has-text('{value}')")
        assert_shows(page, wait_for_job(page, **{key.removeprefix("memslice_"): value}))
    assert not page.js_errors


def test_the_panel_follows_the_checkpoint_once_it_is_loaded(card, page):
    """The quicksettings checkpoint: while the webui loads the new model the panel shows no numbers (they would be
    the old model's); when the webui returns settings_json (onOptionsChanged) it plans the loaded model."""
    open_settings(page)
    first = wait_for_job(page)
    assert "default (no model loaded yet)" in planner_text(page, ".memslice-job")
    choose(page, "setting_sd_model_checkpoint", CHECKPOINTS[1])
    # the new checkpoint's waiting state (on a loaded host the panel may still be in another's when polled first)
    wait_for_job(page, state="waiting", checkpoint=CHECKPOINTS[1])
    assert bars(page) == []
    assert planner_text(page, ".memslice-answer").startswith(f"loading the checkpoint {CHECKPOINTS[1]}")
    page.wait_for_function("document.querySelector('#memslice_planner').dataset.state === 'ready'", timeout=30_000)
    job = shown_job(page)
    assert job["checkpoint"] == CHECKPOINTS[1] and job["params"] == first["params"]
    expected = assert_shows(page, job)
    assert expected["model"] == "sd2" and expected["model_source"] == "loaded"
    assert "model: sd2 (loaded)" in planner_text(page, ".memslice-job")
    assert not page.js_errors


def test_opening_the_panel_plans_afresh(card, page, monkeypatch):
    """Free memory moves while the panel is out of view: opening it plans the same job again."""
    from lib_memslice import probe

    open_settings(page)
    wait_for_job(page)
    assert planner_text(page, ".memslice-limit-label") == "6.0 GiB for this job"
    open_tab(page, "txt2img")
    page.wait_for_timeout(600)  # the page's onAfterUiUpdate (200 ms after a change) sees the panel out of view
    monkeypatch.setattr(probe, "free_memory", lambda device, precise=False: probe.FreeMemory(3 << 30, "cuda free"))
    open_tab(page, "Settings")
    wait_for_text(page, ".memslice-limit-label", lambda t: t == "3.0 GiB for this job")
    assert_shows(page, wait_for_job(page))
    assert not page.js_errors


def test_a_late_answer_for_an_earlier_job_is_never_shown(card, page):
    """Answers that come late are never shown: (1) the 1000 px job's, after the 768 px job's; (2) the same job's,
    planned before Apply settings changed what the server plans with; (3) one for a width the page no longer shows
    (set without any event, as gradio sets a value the server sends): the panel plans the width on the page."""
    page.env.app.state.slow_widths["1000"] = 3.0
    open_settings(page)
    wait_for_job(page, width=512)
    watch_plans(page)
    open_tab(page, "txt2img")
    set_number(page, "txt2img_width", 1000)
    page.wait_for_function("window.planStates.some(s => s.startsWith('updating'))")  # 1000 px asked for
    set_number(page, "txt2img_width", 768)
    wait_for_job(page, width=768)
    time.sleep(3.5)  # the 1000 px answer has arrived by now
    assert shown_job(page)["params"]["width"] == 768 and wait_for_job(page, width=768)
    shown = page.evaluate("window.planStates")
    assert not any('"width":1000' in s for s in shown if s.startswith("ready")), shown

    set_number(page, "txt2img_width", 1000)
    wait_for_job(page, width=1000, timeout=30)
    before = bars(page)[0]["title"]
    watch_plans(page)
    open_tab(page, "Settings")  # in view: planned again, answered 3 s late
    page.wait_for_function("window.planStates.some(s => s.startsWith('updating'))")
    page.click("#settings_submit")  # the server plans in float32 from now on: the same job, planned again
    page.wait_for_function("window.planStates.some(s => s.startsWith('ready'))", timeout=30_000)
    time.sleep(3.5)  # both answers have arrived
    shown = page.evaluate("window.planStates")
    after = bars(page)[0]["title"]
    assert after != before and not any(s.endswith(before) for s in shown if s.startswith("ready")), shown

    page.env.app.state.slow_widths.clear()
    watch_plans(page)
    open_tab(page, "txt2img")
    set_number(page, "txt2img_width", 1024)
    wait_for_job(page, width=1024)
    page.evaluate(
        """() => { const fetched = window.fetch; window.held = [];  // 1000 px answers wait for release()
            window.fetch = (url, options) => fetched(url, options).then(r => !/plan.*width=1000/.test(url) ? r :
                new Promise(resolve => window.held.push(() => resolve(r)))); }"""
    )
    set_number(page, "txt2img_width", 1000)
    page.wait_for_function("window.held.length === 3")  # the job at batch 1, and at 2 and 4
    page.evaluate(
        """() => { document.querySelector('#txt2img_width input[type=number]').value = '640';  // no event
            window.held.forEach(release => release()); }"""
    )
    wait_for_job(page, width=640, timeout=10)
    shown = page.evaluate("window.planStates")
    assert not any('"width":1000' in s for s in shown if s.startswith("ready")), shown
    assert not page.js_errors


def test_applied_settings_replan_the_same_job(card, page):
    """Apply settings (here: the webui's float32 attention, another section) changes what the server plans with,
    not the job on the page: the webui's onOptionsChanged() has the panel plan again."""
    open_settings(page)
    job = wait_for_job(page)
    before = assert_shows(page, job)
    watch_plans(page)
    page.click("#settings_submit")
    wait_for_replan(page, after_options=True)
    after = assert_shows(page, shown_job(page))
    assert shown_job(page) == job and after != before  # the same job, planned anew
    assert [p["attention_bytes"] for p in after["passes"]] != [p["attention_bytes"] for p in before["passes"]]
    assert not page.js_errors


@pytest.fixture
def vae_in_bands(server, monkeypatch):
    """The planner's answer with each VAE decode in 4 bands (its ``bands``; 0: in one piece), the hires one streamed
    through host memory. Ask for it before ``page``: the panel plans as the page loads, and the route keeps its
    answers."""
    planner = server[1].memslice.planner
    plan_job = planner.plan_job

    def with_bands(job, kernels_for):
        result = plan_job(job, kernels_for)
        for p in result["passes"]:
            p.update(bands=4 if p["kind"] == "vae_decode" else 0, streamed=p["name"] == "VAE decode (hires)")
        return result

    monkeypatch.setattr(planner, "plan_job", with_bands)


def test_a_vae_pass_in_bands_says_so(card, vae_in_bands, page):
    """Where the planner runs a VAE pass in bands, the bar and the table name the count."""
    open_settings(page)
    wait_for_job(page)
    labels = {b["name"]: b["label"] for b in bars(page)}
    assert "4 bands" in labels["VAE decode"] and "bands" not in labels["UNet"]
    assert "in 4 bands" in bars(page)[1]["title"]
    page.click("#memslice_planner .memslice-details summary")
    assert "512 \u00d7 512, 4 bands" in page.locator("#memslice_planner .memslice-passes tbody tr").all_inner_texts()[1]
    open_tab(page, "txt2img")
    enable_hires(page)
    open_tab(page, "Settings")
    wait_for_job(page, hr_scale=2)
    labels = {b["name"]: b["label"] for b in bars(page)}
    assert "4 bands, streamed" in labels["VAE decode (hires)"] and "band" not in labels["UNet (hires)"]
    assert not page.js_errors


@pytest.fixture
def hires_too_large(server, monkeypatch):
    """The planner's answer with the hires UNet past the model's largest side (as an SD3 MMDiT is past its position
    embedding's): it does not fit whatever the memory. Ask for it before ``page``."""
    planner = server[1].memslice.planner
    plan_job = planner.plan_job

    def too_large(job, kernels_for):
        result = plan_job(job, kernels_for)
        for p in result["passes"]:
            if p["name"] == "UNet (hires)":
                p.update(verdict="does not fit", too_large="the UNet takes at most 768 px a side")
        return result

    monkeypatch.setattr(planner, "plan_job", too_large)


def test_a_pass_that_does_not_fit_in_the_memory_it_has_says_why(card, hires_too_large, page):
    """A pass can fail with memory to spare: past the model's largest side, or its attention refused under the
    attention budget. Its numbers say why, never "... to spare" beside "does not fit" (seen in the real webui 1.10.1
    with a tiny SD3 at 1024 px: "MMDiT ...: does not fit. ...; total 4.3 GiB of 21.7 GiB, 17.4 GiB to spare.")."""
    enable_hires(page)
    open_settings(page)
    wait_for_job(page, hr_scale=2)
    drawn = {b["name"]: b for b in bars(page)}
    hires = drawn["UNet (hires)"]
    assert hires["verdict"] == "does not fit"
    for words in (hires["title"], hires["detail"]):
        assert words.endswith(", but the UNet takes at most 768 px a side.") and "to spare" not in words, words
    assert " to spare." in drawn["UNet"]["title"]  # a pass that fits keeps its margin
    page.locator("#setting_memslice_budget_gb input[type=number]").fill("0.0001")  # 105 KiB: attention refused
    job = wait_for_job(page, budget_gb=0.0001)
    expected = plan_of(page, job)
    for bar in bars(page):
        assert bar["verdict"] == "does not fit" and "to spare" not in bar["title"], bar["title"]
        refused = [r for r in expected["layers"] if r["pass"] == bar["name"] and not r["fits"]]
        if bar["name"] == "UNet (hires)":
            continue  # past its largest side first
        assert refused
        assert f", but not enough memory for attention at {refused[0]['site']}: " in bar["title"], bar["title"]
        assert "the attention budget is 104.9 KiB." in bar["title"]
    assert not page.js_errors


def test_the_panel_reads_at_phone_width_and_by_keyboard(card, page):
    page.set_viewport_size({"width": 360, "height": 800})
    enable_hires(page)
    open_settings(page)
    wait_for_job(page, hr_scale=2)
    page.click("#memslice_planner .memslice-details summary")
    fits = page.evaluate(
        """() => [...document.querySelectorAll('#memslice_planner, #memslice_planner > *, .memslice-pass')]
            .filter(el => el.scrollWidth > el.clientWidth + 1).map(el => el.className)"""
    )
    assert fits == []  # nothing wider than the column but the numbers' table, which scrolls in its own box
    right = page.evaluate("document.querySelector('#memslice_planner').getBoundingClientRect().right")
    assert right <= 360
    page.focus("#memslice_planner .memslice-pass")
    detail = page.locator("#memslice_planner .memslice-pass:focus .memslice-pass-detail")
    assert detail.bounding_box()["height"] > 10 and detail.inner_text().startswith(
        "UNet, 512 \u00d7 512, batch 2: fits"
    )
    page.keyboard.press("Tab")  # every bar is a stop for the keyboard, in order
    assert page.evaluate("document.activeElement.querySelector('.memslice-pass-name').textContent") == "UNet (hires)"
    assert not page.js_errors


SCREENSHOTS = os.environ.get("MEMSLICE_SCREENSHOTS")


@pytest.mark.parametrize("theme", ["light", "dark"])
def test_the_panel_in_both_themes(card, page, theme, tmp_path):
    """The panel on the webui's light and dark themes (gradio's CSS variables): a fitting, a tight and a failing job.
    With ``MEMSLICE_SCREENSHOTS=docs`` it saves them there (README shows them)."""
    hires = dict(hr_scale=2, hr_upscaler="latent", budget_gb=2)
    tight = find_side(page, "tight", **hires)
    page.goto(page.base_url + f"?__theme={theme}")
    page.wait_for_selector("#txt2img_prompt", timeout=60_000)
    assert page.evaluate("document.body.classList.contains('dark')") == (theme == "dark")
    page.set_viewport_size({"width": 760, "height": 900})
    enable_hires(page)
    colours = set()
    for side, verdict in ((512, "fits"), (tight, "tight"), (1024, "does not fit")):
        open_tab(page, "txt2img")
        set_number(page, "txt2img_width", side)
        set_number(page, "txt2img_height", side)
        if verdict == "does not fit":
            set_number(page, "txt2img_batch_size", 2)
        open_settings(page)  # the panel plans the job as it comes into view
        job = wait_for_job(page, width=side, hr_scale=2)
        expected = assert_shows(page, job)
        assert expected["verdict"] == verdict
        if verdict == "does not fit":  # batch 1 named as a way out only where it allows a larger size
            alone = plan_of(page, job, batch=1)["max_square_resolution"]
            smaller = f"batch 1 (up to {alone} px)"
            assert (smaller in planner_text(page, ".memslice-advice")) == (alone > expected["max_square_resolution"])
        page.wait_for_timeout(400)  # settled: no other plan under way (it would be drawn dimmed)
        assert wait_for_job(page, width=side, hr_scale=2) == job
        panel = page.locator("#memslice_planner")
        text, background = page.evaluate(
            """() => { const s = getComputedStyle(document.querySelector('#memslice_planner'));
                return [s.color, s.backgroundColor]; }"""
        )
        colours.add((text, background))
        # the verdict in words on its colour stays readable on both themes (the webui's "#settings span" rule
        # gave the pass labels the theme's text colour: light on green, yellow and red in the dark theme)
        words = words_on_colours(page)
        assert len(words) == 1 + len(expected["passes"])
        assert all(contrast(fg, bg) >= 4.5 for _, fg, bg in words), words
        note = page.evaluate("getComputedStyle(document.querySelector('#memslice_planner .memslice-note')).color")
        assert note == palette(page, "--block-title-text-color")  # the secondary text's colour, not the body's
        name = f"planner-{verdict.replace(' ', '-')}-{theme}.png"
        panel.screenshot(path=str(tmp_path / name))
        assert (tmp_path / name).stat().st_size > 10_000
        if SCREENSHOTS:
            panel.screenshot(path=os.path.join(ROOT, SCREENSHOTS, name))
    ((text, background),) = colours  # the theme's, whatever the verdict
    dark = sum(int(c) for c in re.findall(r"\d+", background)[:3]) < 3 * 128
    assert dark == (theme == "dark") and text != background
    assert not page.js_errors


def test_status_line_after_a_generation(page):
    page.click("#txt2img_generate")
    line = wait_for_text(page, "#memslice_status_txt2img", lambda t: t.startswith("memslice:"), timeout=60)
    job = page.env.memslice.STATS.last_job
    assert job.max_slices > 1
    assert line.startswith(f"memslice: {job.max_slices} slices max, predicted peak ")
    assert line.endswith(f", {job.retries} retries")
    assert f"Memslice: doggettx, max {job.max_slices} slices" in page.inner_text("#html_info_txt2img")
    assert not page.js_errors
    # the only foreign requests are gradio 3.41's own (fonts, iframe resizer): memslice.js asks nothing elsewhere
    gradio_assets = ("https://fonts.googleapis.com/", "https://cdnjs.cloudflare.com/ajax/libs/iframe-resizer/")
    assert all(u.startswith(gradio_assets) for u in page.outside), page.outside


def test_status_line_after_a_job_that_did_not_fit(page):
    """The real page after a failed job: the infotext is empty and the error is in the log box. The line must say
    the job failed, never keep showing the previous job's plan."""
    page.click("#txt2img_generate")
    wait_for_text(page, "#memslice_status_txt2img", lambda t: "slices max" in t, timeout=60)
    page.click("#generate_too_large")
    line = wait_for_text(page, "#memslice_status_txt2img", lambda t: "failed" in t, timeout=60)
    assert line.startswith("memslice: the job failed: not enough memory for attention at ")  # the job's own error
    assert "not enough memory" in page.inner_text("#html_log_txt2img")
    assert page.inner_text("#html_info_txt2img").strip() == ""
    assert not page.js_errors


def test_status_line_after_a_job_torch_stopped(page):
    page.click("#txt2img_generate")
    wait_for_text(page, "#memslice_status_txt2img", lambda t: "slices max" in t, timeout=60)
    page.click("#generate_torch_oom")
    line = wait_for_text(page, "#memslice_status_txt2img", lambda t: "failed" in t, timeout=60)
    assert line == "memslice: the job failed (see the error)"
    assert "MemoryError" in page.inner_text("#html_log_txt2img")
    assert not page.js_errors
