"""javascript/memslice.js in a real headless Chromium, on a page of real gradio 3.41.2 components that carry the
webui's element ids, served with memslice's routes from the fake webui."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time

import pytest
import torch

from .conftest import ROOT
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


def build_page(env):
    """The webui's txt2img size controls, its output infotext and log boxes (``modules/ui_common.py``:
    ``html_info_<tab>`` and ``html_log_<tab>`` in one group), and the Memory slicing settings column."""
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

    with gr.Blocks(analytics_enabled=False, title="fake webui") as demo:
        with gr.Tabs(elem_id="tabs"):
            with gr.TabItem("txt2img", elem_id="tab_txt2img"):
                gr.Textbox(label="Prompt", elem_id="txt2img_prompt")
                gr.Slider(64, 2048, value=512, step=8, label="Width", elem_id="txt2img_width", interactive=True)
                gr.Slider(64, 2048, value=512, step=8, label="Height", elem_id="txt2img_height", interactive=True)
                gr.Slider(1, 8, value=1, step=1, label="Batch size", elem_id="txt2img_batch_size", interactive=True)
                # the webui's Hires. fix: an InputAccordion (its checkbox carries "-checkbox"), scale, target size
                gr.Checkbox(False, label="Hires. fix", elem_id="txt2img_hr-checkbox", interactive=True)
                gr.Dropdown(["Latent", "R-ESRGAN 4x+"], value="Latent", label="Upscaler", elem_id="txt2img_hr_upscaler",
                            interactive=True)  # fmt: skip
                gr.Slider(
                    1.0, 4.0, value=2.0, step=0.05, label="Upscale by", elem_id="txt2img_hr_scale", interactive=True
                )
                gr.Slider(0, 2048, value=0, step=8, label="Resize width to", elem_id="txt2img_hr_resize_x",
                          interactive=True)  # fmt: skip
                gr.Slider(0, 2048, value=0, step=8, label="Resize height to", elem_id="txt2img_hr_resize_y",
                          interactive=True)  # fmt: skip
                button = gr.Button("Generate", elem_id="txt2img_generate")
                failing = gr.Button("Generate too large", elem_id="generate_too_large")
                oom = gr.Button("Generate into a torch OOM", elem_id="generate_torch_oom")
                with gr.Group():
                    info = gr.HTML(elem_id="html_info_txt2img", elem_classes="infotext")
                    log = gr.HTML(elem_id="html_log_txt2img", elem_classes="html-log")
                    generation_info = gr.Textbox(visible=False, elem_id="generation_info_txt2img")
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
        outputs = [generation_info, info, log]
        button.click(fn=call_queue_outputs(run_generation), outputs=outputs)
        failing.click(fn=call_queue_outputs(run_failing_generation), outputs=outputs)
        oom.click(fn=call_queue_outputs(run_torch_oom), outputs=outputs)
    return demo


@pytest.fixture
def server(webui):
    import gradio as gr
    import uvicorn
    from fastapi import FastAPI

    webui.shared.opts.set("memslice_budget_gb", 2.0)  # a fixed budget: the live free memory moves under the test
    app = FastAPI()
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
    try:
        yield f"http://127.0.0.1:{port}/", webui
    finally:
        srv.should_exit = True
        thread.join(10)


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
        # classic scripts in global scope, at the end of <head>, as the webui injects extension javascript
        tags = "".join(f"<script>{script}</script>" for script in scripts)

        def inject(route):
            response = route.fetch()
            route.fulfill(response=response, body=response.text().replace("</head>", tags + "</head>", 1))

        # Only the document is routed: a sync-API route handler (and a callable URL matcher) runs only while the
        # test thread is inside a Playwright call, so routing the page's API requests would stall them. Foreign
        # hosts are cut off by the browser's resolver instead, and requests are observed through events.
        context.route(url, inject)
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
    tab.click("button:has-text('Settings')")
    tab.wait_for_selector("#memslice_planner .memslice-max", timeout=30_000)


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


def test_the_webui_conventions_are_used(page):
    assert page.evaluate("typeof gradioApp === 'function' && typeof onUiLoaded === 'function'")
    assert page.evaluate("typeof window.memslice.refreshPlanner") == "function"


def test_planner_panel_shows_largest_sizes_per_batch(page):
    open_settings(page)
    for batch in (1, 2, 4):
        expected = api(page, "plan", width=512, height=512, batch=batch)["max_square_resolution"]
        wait_for_text(page, f"tr[data-batch='{batch}'] .memslice-max", lambda t, e=expected: t == f"{e} x {e}")
    assert "room" in planner_text(page, ".memslice-room")
    assert not page.js_errors


def test_planner_recomputes_from_unsaved_inputs(page):
    open_settings(page)
    wait_for_text(page, "tr[data-batch='1'] .memslice-max", lambda t: "x" in t)
    budget = page.locator("#setting_memslice_budget_gb input[type=number]")
    budget.fill("0.05")  # typed, not applied: nothing is saved
    expected = api(page, "plan", width=512, height=512, batch=1, budget_gb=0.05)["max_square_resolution"]
    wait_for_text(page, "tr[data-batch='1'] .memslice-max", lambda t: t == f"{expected} x {expected}")
    wait_for_text(page, ".memslice-room", lambda t: "attention budget 51.2 MiB" in t)
    assert page.env.shared.opts.memslice_budget_gb == 2.0  # typed values are previews; nothing was saved
    cap = page.locator("#setting_memslice_slice_cap input[type=number]")
    cap.fill("1")
    cap.press("Enter")
    expected = api(page, "plan", width=512, height=512, batch=1, budget_gb=0.05, slice_cap=1)["max_square_resolution"]
    wait_for_text(page, "tr[data-batch='1'] .memslice-max", lambda t: t == f"{expected} x {expected}")
    assert not page.js_errors


def test_planner_follows_the_txt2img_size(page):
    page.locator("#txt2img_width input[type=number]").fill("2048")
    page.locator("#txt2img_height input[type=number]").fill("1536")
    open_settings(page)
    budget = page.locator("#setting_memslice_budget_gb input[type=number]")
    budget.fill("0.01")
    expected = api(page, "plan", width=2048, height=1536, batch=1, budget_gb=0.01)
    wait_for_text(page, ".memslice-current", lambda t: "2048 x 1536" in t)
    text = planner_text(page, ".memslice-current")
    assert expected["verdict"] in text and expected["advice"] in text
    if expected["fits"]:
        assert f"{expected['max_slices']} slices at most" in text


def test_planner_reads_hires_fix_and_names_the_binding_pass(page):
    page.locator("#txt2img_hr-checkbox input[type=checkbox]").check()
    page.locator("#txt2img_hr_scale input[type=number]").fill("2")
    open_settings(page)
    expected = api(page, "plan", width=512, height=512, batch=1, hr_scale=2, hr_upscaler="latent")
    assert [p["name"] for p in expected["passes"]] == ["UNet", "UNet (hires)", "VAE decode (hires)"]
    text = wait_for_text(page, ".memslice-current", lambda t: "hires 1024 x 1024" in t)
    assert expected["limit"] in text and text.count(expected["limit"]) == 1  # named once, not repeated
    assert page.get_attribute("#memslice_planner", "data-limit") == expected["limit"]
    rows = page.locator("#memslice_planner .memslice-passes tr").all_inner_texts()
    assert [r.split("\t")[0] for r in rows] == [p["name"] for p in expected["passes"]]
    assert [r.split("\t")[-1] for r in rows] == [p["verdict"] for p in expected["passes"]]
    assert "first-pass size" in planner_text(page, ".memslice-max-label")
    side = api(page, "plan", width=512, height=512, batch=1, hr_scale=2)["max_square_resolution"]
    wait_for_text(page, "tr[data-batch='1'] .memslice-max", lambda t: t == f"{side} x {side}")
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
    assert line.startswith("memslice: the job failed: 1 attention call did not fit")
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
