"""The HTTP routes, through a real FastAPI app (webui 1.10.1 pins: fastapi 0.94, pydantic 1.10) and the fake webui."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from .test_webui import TITLES, select


@pytest.fixture
def client(webui):
    app = FastAPI()
    webui.script_callbacks.app_started_callback(None, app)  # --nowebui passes demo=None
    webui.script_callbacks.app_started_callback(None, app)  # twice (Reload UI on the same app): no duplicates
    with TestClient(app) as c:
        c.webui = webui
        yield c


def test_routes_are_added_once(client):
    paths = [r.path for r in client.app.routes]
    for prefix in ("/memslice/v1", "/internal/memslice/v1"):
        assert paths.count(f"{prefix}/status") == 1 and paths.count(f"{prefix}/plan") == 1


def test_every_new_app_gets_the_routes_even_at_a_reused_address(webui):
    """Reload UI makes a new app; one at the address of a collected one (CPython reuses them) still gets routes."""
    import gc

    for _ in range(20):
        app = FastAPI()
        webui.script_callbacks.app_started_callback(None, app)
        assert "/memslice/v1/plan" in [r.path for r in app.routes]
        del app
        gc.collect()


def test_api_auth_protects_the_api_routes_as_it_protects_sdapi(webui):
    """--api-auth: the API routes want the same credentials (HTTP Basic), the page's routes stay as the webui's own
    /internal routes are."""
    webui.shared.cmd_opts.api_auth = "alice:secret,bob:pa:ss"
    try:
        app = FastAPI()
        webui.script_callbacks.app_started_callback(None, app)
        with TestClient(app) as c:
            assert c.get("/memslice/v1/status").status_code == 401
            assert c.get("/memslice/v1/plan", auth=("alice", "wrong")).status_code == 401
            assert c.get("/memslice/v1/plan", auth=("alice", "secret")).status_code == 200
            assert c.get("/memslice/v1/status", auth=("bob", "pa:ss")).status_code == 200
            assert c.get("/internal/memslice/v1/status").status_code == 200
    finally:
        webui.shared.cmd_opts.api_auth = None


def test_the_pages_copy_serves_only_what_the_page_shows(webui, monkeypatch):
    """With --api-auth and no page login the page's copy is open (as the page is) but no way around --api-auth: the
    status line's part of the status only, and plans of the loaded model with the active entry."""
    from lib_memslice import probe
    from lib_memslice.webui import routes

    # one reading for both copies (this machine's free memory moves between two requests)
    monkeypatch.setattr(probe, "free_memory", lambda device, precise=False: probe.FreeMemory(8 << 30, "test"))

    webui.shared.cmd_opts.api_auth = "alice:secret"
    try:
        app = FastAPI()
        webui.script_callbacks.app_started_callback(None, app)
        with TestClient(app) as c:
            page = c.get("/internal/memslice/v1/status", params={"limit": 200}).json()
            assert set(page) == set(routes.PAGE_STATUS) == {"version", "active", "last_job", "current_job"}
            full = c.get("/memslice/v1/status", auth=("alice", "secret")).json()
            assert {"recent", "settings", "free_bytes", "device"} <= set(full)
            for refused in ({"model": "sdxl"}, {"strategy": "heads"}):
                response = c.get("/internal/memslice/v1/plan", params=refused)
                assert response.status_code == 400 and "/memslice/v1/plan" in response.json()["detail"]
            asked = dict(width=768, height=512, batch=2, hr_scale=2)
            assert (
                c.get("/internal/memslice/v1/plan", params=asked).json()
                == c.get("/memslice/v1/plan", params=asked, auth=("alice", "secret")).json()
            )
    finally:
        webui.shared.cmd_opts.api_auth = None


def test_the_page_reads_only_the_pages_view():
    """javascript/memslice.js reads no status field the page's copy leaves out (that it sends no model or strategy,
    which the page's copy refuses, the browser tests show: its panel would say so)."""
    import os
    import re

    from .conftest import ROOT

    with open(os.path.join(ROOT, "javascript", "memslice.js")) as f:
        script = f.read()
    read = set(re.findall(r"\bstatus\.(\w+)", script))
    assert read and read <= {"version", "active", "last_job", "current_job"}, read


def gradio_app(webui, users=(("alice", "secret"),)):
    """The app webui 1.10.1 gets from ``demo.launch(auth=...)`` (gradio 3.41.2's ``App``, built by ``create_app``
    after ``launch`` set ``demo.auth``), with memslice's routes added by app_started as the webui adds them."""
    import gradio as gr
    from gradio.routes import App

    with gr.Blocks(analytics_enabled=False) as demo:
        gr.Markdown("page")
    demo.auth = list(users) or None  # what launch(auth=[(user, password), ...]) sets
    app = App.create_app(demo)
    webui.script_callbacks.app_started_callback(demo, app)
    return app


PAGE_ROUTES = ("/internal/memslice/v1/status", "/internal/memslice/v1/plan")


def test_the_pages_copy_wants_the_pages_gradio_login(webui):
    """--gradio-auth: the page's copy answers a gradio 3.41.2 session (gradio's own /login, its cookies) and
    nothing else, exactly where gradio's own /login_check does; the API copy keeps to --api-auth, as /sdapi."""
    webui.shared.cmd_opts.gradio_auth = "alice:secret"
    try:
        app = gradio_app(webui)
        c = TestClient(app)
        for path in PAGE_ROUTES:
            assert c.get(path).status_code == 401
        assert c.get("/memslice/v1/status").status_code == 200  # no --api-auth: open, as /sdapi is then
        assert c.post("/login", data={"username": "alice", "password": "wrong"}).status_code == 400
        assert c.get(PAGE_ROUTES[0]).status_code == 401
        assert c.post("/login", data={"username": "alice", "password": "secret"}).status_code == 200
        for path in PAGE_ROUTES:  # over http only the unsecure cookie comes back, as in a browser
            assert c.get(path).status_code == 200, path
        token = c.cookies["access-token-unsecure"]
        fresh = TestClient(app, base_url="https://testserver")
        for cookies in ({"access-token": token}, {"access-token-unsecure": token}, {"access-token": "forged"},
                        {"access-token": token, "access-token-unsecure": "forged"},
                        {"access-token": "forged", "access-token-unsecure": token}, {}):  # fmt: skip
            fresh.cookies.clear()
            for name, value in cookies.items():
                fresh.cookies.set(name, value)
            gradio_says = fresh.get("/login_check").status_code
            assert gradio_says in (200, 401)
            assert fresh.get(PAGE_ROUTES[0]).status_code == gradio_says, cookies
    finally:
        webui.shared.cmd_opts.gradio_auth = None


@pytest.mark.parametrize("flag", ["gradio_auth", "gradio_auth_path"])
def test_a_page_login_that_cannot_be_verified_is_refused(webui, flag):
    """Fail closed: the command line asks for a page login, and an app without gradio's sessions (a plain FastAPI,
    as under --nowebui, or tokens that are not gradio's) cannot tell who is logged in: 401, even with a cookie."""
    setattr(webui.shared.cmd_opts, flag, "alice:secret" if flag == "gradio_auth" else "/somewhere/auth.txt")
    try:
        app = FastAPI()
        webui.script_callbacks.app_started_callback(None, app)
        with TestClient(app, cookies={"access-token": "anything"}) as c:
            for path in PAGE_ROUTES:
                assert c.get(path).status_code == 401
        app.tokens = ["anything"]
        with TestClient(app, cookies={"access-token": "anything"}) as c:
            assert c.get(PAGE_ROUTES[0]).status_code == 401
    finally:
        setattr(webui.shared.cmd_opts, flag, None)


def test_without_a_page_login_the_pages_copy_is_open(webui):
    """No --gradio-auth: the page's copy is as open as the page and the webui's own /internal routes, on gradio's
    app and on a plain one."""
    for app in (gradio_app(webui, users=()), FastAPI()):
        webui.script_callbacks.app_started_callback(None, app)
        c = TestClient(app)
        for path in PAGE_ROUTES:
            assert c.get(path).status_code == 200, (app, path)


def test_status_reports_device_budget_entry_settings_and_recent_plans(client):
    webui = client.webui
    select(webui, TITLES["doggettx"])
    webui.shared.opts.set("memslice_budget_gb", 1 / 4096)  # 256 KiB: under the fused kernel's scratch
    layer = webui.ldm_attention.CrossAttention(query_dim=64, heads=4, dim_head=16)
    with torch.no_grad():
        layer(torch.randn(2, 300, 64))
    ran = time.time()
    body = client.get("/memslice/v1/status", params={"limit": 5}).json()
    from lib_memslice import __version__

    assert body["device_kind"] == "cpu" and body["active"] == TITLES["doggettx"] and body["version"] == __version__
    assert body["attention_budget_bytes"] == body["room_bytes"] == 1 << 18 and body["free_bytes"] > 0
    assert body["settings"]["memslice_budget_gb"] == 1 / 4096
    last = body["recent"][-1]
    for key in ("site", "batch_heads", "q_tokens", "k_tokens", "slices", "peak_bytes", "timestamp", "retries"):
        assert key in last
    assert last["slices"] > 1 and last["peak_bytes"] <= 1 << 18
    assert ran - 60 < last["timestamp"] <= ran  # when the call ran
    assert body["totals"]["calls"] >= 1


def test_plan_matches_the_cli_for_a_named_model(client, capsys, monkeypatch):
    import json

    from lib_memslice import cli, probe

    fixed = probe.FreeMemory(20 << 30, "test")  # both read the same free memory (no model loaded: no weights)
    monkeypatch.setattr(probe, "free_memory", lambda device, precise=False: fixed)

    client.webui.shared.opts.set("memslice_budget_gb", 2.0)
    client.webui.devices.dtype = client.webui.devices.dtype_vae = torch.float32
    api = client.get("/memslice/v1/plan", params=dict(width=1024, height=1024, batch=2, model="sd15")).json()
    cli.main(["plan", "--model", "sd15", "--width", "1024", "--height", "1024", "--batch", "2", "--budget", "2GiB",
              "--dtype", "fp32", "--json"])  # fmt: skip
    local = json.loads(capsys.readouterr().out)
    keys = (
        "site",
        "batch_heads",
        "q_tokens",
        "k_tokens",
        "heads_per_slice",
        "queries_per_slice",
        "slices",
        "peak_bytes",
    )
    assert [[row[k] for k in keys] for row in api["layers"]] == [[row[k] for k in keys] for row in local["layers"]]
    assert api["fits"] == local["fits"] and api["max_square_resolution"] == local["max_square_resolution"]


def test_the_vae_is_planned_in_its_own_dtype(client, capsys):
    """--no-half-vae: the UNet runs in half precision, the VAE in float32; the preview plans each in its own."""
    import json

    from lib_memslice import cli

    client.webui.shared.opts.set("memslice_budget_gb", 2.0)
    client.webui.devices.dtype, client.webui.devices.dtype_vae = torch.float16, torch.float32
    api = client.get("/memslice/v1/plan", params=dict(width=1024, height=1024, model="sd15")).json()
    sizes = {row["site"]: row["element_size"] for row in api["layers"]}
    assert sizes["vae.mid"] == 4 and sizes["unet.level0.self"] == 2
    cli.main(["plan", "--model", "sd15", "--width", "1024", "--height", "1024", "--budget", "2GiB", "--dtype", "fp16",
              "--no-half-vae", "--json"])  # fmt: skip
    local = json.loads(capsys.readouterr().out)
    assert [r["peak_bytes"] for r in api["layers"]] == [r["peak_bytes"] for r in local["layers"]]


def test_plan_previews_unsaved_slider_values(client):
    client.webui.devices.dtype = torch.float32
    base = client.get("/memslice/v1/plan", params=dict(width=2048, height=2048, budget_gb=1)).json()
    tighter = client.get("/memslice/v1/plan", params=dict(width=2048, height=2048, budget_gb=0.25)).json()
    assert "attention budget 256.0 MiB" in tighter["room"] and "attention budget 1.0 GiB" in base["room"]
    assert tighter["max_square_resolution"] < base["max_square_resolution"]
    capped = client.get("/memslice/v1/plan", params=dict(width=2048, height=2048, budget_gb=1, slice_cap=2)).json()
    assert capped["slice_cap"] == 2 and capped["max_slices"] <= 2
    assert client.webui.shared.opts.memslice_budget_gb == 0.0  # preview only: nothing saved


def test_plan_previews_the_unsaved_kernel_and_vae_choices(client):
    """The panel sends every Memory slicing setting that changes a plan, before Apply: the kernel and the VAE too."""
    for route in ("/memslice/v1/plan", "/internal/memslice/v1/plan"):
        base = client.get(route, params=dict(width=1024, height=1024)).json()
        einsum = client.get(route, params=dict(width=1024, height=1024, kernel="einsum")).json()
        stock = client.get(route, params=dict(width=1024, height=1024, vae="off")).json()
        assert base["settings"]["memslice_kernel"] == "auto" and einsum["settings"]["memslice_kernel"] == "einsum"
        assert {r["kernel_used"] for r in einsum["layers"]} == {"einsum"}  # (torch 2.1's CPU runs einsum anyway)
        assert base["settings"]["memslice_vae"] == "auto" and stock["settings"]["memslice_vae"] == "off"
        assert [r["kernel_used"] for r in stock["layers"] if r["site"] == "vae.mid"] == ["stock"]  # the webui's own
        assert [r["kernel_used"] for r in base["layers"] if r["site"] == "vae.mid"] != ["stock"]
        for key, value in (("kernel", "fastest"), ("vae", "sometimes")):
            refused = client.get(route, params={"width": 512, key: value})
            assert refused.status_code == 400 and key in refused.json()["detail"]
    assert client.webui.shared.opts.memslice_kernel == "auto"  # preview only: nothing saved


def test_plan_uses_the_loaded_model_when_model_is_omitted(client, ldm):
    _, _, openaimodel = ldm
    unet = openaimodel.UNetModel(
        image_size=32, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1],
        num_res_blocks=1, channel_mult=[1, 2], num_head_channels=8, use_spatial_transformer=True,
        transformer_depth=1, context_dim=32, legacy=False,
    )  # fmt: skip
    model = type("M", (), {"model": type("W", (), {"diffusion_model": unet})(), "is_sdxl": False, "is_sd2": True})()
    body = client.get("/memslice/v1/plan").json()
    assert body["model_source"].startswith("default")
    client.webui.script_callbacks.model_loaded_callback(model)
    body = client.get("/memslice/v1/plan").json()
    assert body["model_source"] == "loaded" and body["model"] == "sd2"
    assert {row["site"] for row in body["layers"]} == {"unet.level0.self", "unet.level0.cross", "unet.mid.self",
                                                       "unet.mid.cross"}  # fmt: skip


@pytest.mark.parametrize(
    "params",
    [
        {"width": 0},
        {"width": 100000},
        {"height": -8},
        {"batch": 0},
        {"batch": 10**9},
        {"width": "abc"},
        {"model": "sd9"},
        {"model": "x" * 1000},
        {"strategy": "fastest"},
        {"safety_factor": 0.5},
        {"safety_factor": "nan"},
        {"safety_factor": "inf"},
        {"slice_cap": 0},
        {"slice_cap": 10**12},
        {"budget_gb": -1},
        {"budget_gb": "nan"},
        {"hr_scale": 0.5},
        {"hr_scale": 100},
        {"hr_scale": "nan"},
        {"hr_width": 4},
        {"hr_height": 10**6},
        {"hr_upscaler": "ESRGAN_4x"},
        {"img2img": "perhaps"},
    ],
)
def test_malformed_and_oversized_parameters_are_4xx(client, params):
    response = client.get("/memslice/v1/plan", params=params)
    assert 400 <= response.status_code < 500, (params, response.status_code)
    assert response.json()["detail"]


@pytest.mark.parametrize("limit", [-1, 100000, "x"])
def test_status_limit_is_bounded(client, limit):
    assert 400 <= client.get("/memslice/v1/status", params={"limit": limit}).status_code < 500


def test_the_largest_request_is_bounded_work(client, monkeypatch):
    """The worst requests the validation admits (the webui's slider limits: batch 8, hires x4 of 2048 px, no pass
    over 8192 px) plan a fixed, small number of times (no timing assert); one step past any limit is refused."""
    from lib_memslice import slicing

    calls = []
    real = slicing._search
    monkeypatch.setattr(slicing, "_search", lambda *a, **k: calls.append(1) or real(*a, **k))
    largest = dict(width=2048, height=2048, batch=8, model="sdxl", slice_cap=4096, hr_scale=4)
    body = client.get("/memslice/v1/plan", params=largest).json()
    assert body["fits"] in (True, False) and body["hires"] == [8192, 8192]
    assert 0 < len(calls) < 2000  # passes x sites x (plan + binary searches): 1337 for this one in 0.4.0
    resized = dict(width=8192, height=8192, batch=8, model="sdxl", img2img=True)  # img2img "Resize by" 4 of 2048 px
    assert client.get("/memslice/v1/plan", params=resized).status_code == 200
    past = [("width", 8200), ("height", 8200), ("batch", 9), ("hr_scale", 4.05), ("hr_width", 2056),
            ("hr_height", 2056)]  # fmt: skip
    for key, value in past:
        for prefix in ("/memslice/v1", "/internal/memslice/v1"):
            asked = {**largest, key: value}
            asked.pop("model") if prefix.startswith("/internal") else None
            assert client.get(f"{prefix}/plan", params=asked).status_code == 422, (prefix, key)
    # a hires target past 8192 px a side, from sizes each within their limits: one side keeps the aspect ratio
    for asked in (dict(width=8, height=2048, hr_width=2048), dict(width=4096, height=512, hr_scale=2.5),
                  dict(width=2048, height=2048, hr_height=2048, hr_width=2048, hr_scale=4)):  # fmt: skip
        response = client.get("/internal/memslice/v1/plan", params=asked)
        assert response.status_code == (200 if "hr_height" in asked else 400), asked
        assert response.status_code == 200 or "8192 px" in response.json()["detail"]


def test_the_size_limits_are_the_webuis_sliders(webui):
    """With WEBUI_DIR: the limits are the maxima of txt2img's Width, Height, Batch size, hires Upscale by and
    Resize width/height to sliders in the real modules/ui.py, and of img2img's size, batch and Resize by sliders."""
    import ast
    import os

    webui_dir = os.environ.get("WEBUI_DIR")
    if not webui_dir:
        pytest.skip("WEBUI_DIR is not set: point it at a stable-diffusion-webui 1.10.1 checkout")
    from lib_memslice.webui import routes

    with open(os.path.join(webui_dir, "modules", "ui.py"), encoding="utf8") as f:
        tree = ast.parse(f.read())
    maxima = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "gr.Slider":
            kw = {k.arg: k.value for k in node.keywords}
            if "elem_id" in kw and "maximum" in kw and isinstance(kw["elem_id"], ast.Constant):
                maxima[kw["elem_id"].value] = ast.literal_eval(kw["maximum"])
    assert maxima["txt2img_width"] == maxima["txt2img_height"] == routes.MAX_SIDE
    assert maxima["img2img_width"] == maxima["img2img_height"] == routes.MAX_SIDE
    assert maxima["txt2img_hr_resize_x"] == maxima["txt2img_hr_resize_y"] == routes.MAX_SIDE
    assert maxima["txt2img_batch_size"] == maxima["img2img_batch_size"] == routes.MAX_BATCH
    assert maxima["txt2img_hr_scale"] == maxima["img2img_scale"] == routes.MAX_HR_SCALE
    assert routes.MAX_PASS_SIDE == routes.MAX_SIDE * routes.MAX_HR_SCALE


def test_the_page_login_flags_are_what_the_webui_gives_gradio():
    """With WEBUI_DIR: webui.py launches gradio with ``auth=`` from ``get_gradio_auth_creds``, which reads exactly
    --gradio-auth and --gradio-auth-path (the two flags :func:`routes.page_login` reads)."""
    import ast
    import os

    webui_dir = os.environ.get("WEBUI_DIR")
    if not webui_dir:
        pytest.skip("WEBUI_DIR is not set: point it at a stable-diffusion-webui 1.10.1 checkout")
    with open(os.path.join(webui_dir, "modules", "initialize_util.py"), encoding="utf8") as f:
        tree = ast.parse(f.read())
    creds = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "get_gradio_auth_creds")
    read = {n.attr for n in ast.walk(creds) if isinstance(n, ast.Attribute) and ast.unparse(n.value) == "cmd_opts"}
    assert read == {"gradio_auth", "gradio_auth_path"}
    with open(os.path.join(webui_dir, "webui.py"), encoding="utf8") as f:
        source = f.read()
    assert "gradio_auth_creds = list(initialize_util.get_gradio_auth_creds()) or None" in source
    launch = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call)
                  and ast.unparse(n.func) == "shared.demo.launch")  # fmt: skip
    assert {k.arg: ast.unparse(k.value) for k in launch.keywords}["auth"] == "gradio_auth_creds"


def test_status_does_not_wait_for_a_running_generation(client):
    """A generation holds the webui's queue lock; the status route must not take it."""
    from modules import call_queue

    release = threading.Event()

    def generation():
        with call_queue.queue_lock:
            release.wait(10)

    worker = threading.Thread(target=generation)
    worker.start()
    try:
        while not call_queue.queue_lock.locked():
            time.sleep(0.01)
        assert client.get("/memslice/v1/status").status_code == 200
        assert client.get("/memslice/v1/plan").status_code == 200
    finally:
        release.set()
        worker.join()


def test_the_plan_route_plans_the_whole_job_with_hires_and_img2img(client):
    client.webui.devices.dtype = torch.float32
    body = client.get("/memslice/v1/plan", params=dict(width=512, height=512, model="sd15", hr_scale=2)).json()
    assert [(p["name"], p["width"]) for p in body["passes"]] == [("UNet", 512), ("UNet (hires)", 1024),
                                                                  ("VAE decode (hires)", 1024)]  # fmt: skip
    assert body["limit"] in [p["name"] for p in body["passes"]] and body["advice"]
    body = client.get("/memslice/v1/plan", params=dict(model="sd15", hr_width=768, hr_upscaler="image",
                                                         img2img=True)).json()  # fmt: skip
    assert [p["name"] for p in body["passes"]][:3] == ["VAE encode", "UNet", "VAE decode"]
    assert body["passes"][3]["name"] == "VAE encode (hires)" and body["passes"][3]["width"] == 768


def test_a_named_model_counts_the_loaded_weights_once(client, monkeypatch):
    """SD1.5 loaded, 3 GiB free: the loaded model's plan and the same model named plan in the same memory (free +
    the loaded weights, which switching model would unload) and agree."""
    from lib_memslice import probe
    from lib_memslice.api import job_fits
    from lib_memslice.models import Weights

    monkeypatch.setattr(probe, "free_memory", lambda device, precise=False: probe.FreeMemory(3 << 30, "test"))
    planner = __import__("lib_memslice.webui.planner", fromlist=["_loaded"])
    published = Weights(859_520_964 * 2, 83_653_863 * 2, 123_060_480 * 2)
    monkeypatch.setitem(planner._loaded, "kind", "sd15")
    monkeypatch.setitem(planner._loaded, "weights", published)
    client.webui.devices.dtype = client.webui.devices.dtype_vae = torch.float16
    loaded = client.get("/memslice/v1/plan", params=dict(width=512, height=512)).json()
    named = client.get("/memslice/v1/plan", params=dict(width=512, height=512, model="sd15")).json()
    total = (3 << 30) + published.unet + published.vae + published.text
    assert loaded["memory_bytes"] == named["memory_bytes"] == total
    assert loaded["max_square_resolution"] == named["max_square_resolution"] > 0
    assert loaded["verdict"] == named["verdict"] == job_fits(512, 512, model="sd15").verdict


def test_sd3_is_detected_and_planned(client, monkeypatch):
    """webui 1.10 loads SD3 Medium (``is_sd3``): the routes plan SD3 (its MMDiT and its VAE, in multiples of 16 px),
    never SD1.5 numbers; a model whose modules cannot be read is planned with the published SD3 Medium's sites."""
    from lib_memslice import probe

    monkeypatch.setattr(probe, "free_memory", lambda device, precise=False: probe.FreeMemory(16 << 30, "test"))
    model = type("SD3", (), {"is_sd3": True, "is_sdxl": False, "is_sd2": False})()
    client.webui.script_callbacks.model_loaded_callback(model)
    body = client.get("/memslice/v1/plan", params=dict(width=1024, height=1024)).json()
    assert body["model"] == "sd3" and body["verdict"] in ("fits", "tight", "does not fit")
    assert [p["name"] for p in body["passes"]] == ["MMDiT", "VAE decode"]
    assert {row["site"] for row in body["layers"]} == {"mmdit.joint", "vae.mid"}
    assert body["max_square_resolution"] % 16 == 0 and 1024 <= body["max_square_resolution"] <= 3072
    assert client.get("/memslice/v1/status").json()["model"] == "sd3"
    named = client.get("/memslice/v1/plan", params=dict(width=1024, height=1024, model="sd3")).json()
    assert named["model"] == "sd3" and named["max_square_resolution"] % 16 == 0


def test_with_sd3_loaded_a_named_model_credits_sd3s_weights(client, monkeypatch):
    """Switching to the named model unloads SD3: its weights (read off the loaded model like any other's) count as
    memory the named model's job may use."""
    import torch.nn as nn

    from lib_memslice import probe

    monkeypatch.setattr(probe, "free_memory", lambda device, precise=False: probe.FreeMemory(3 << 30, "test"))
    mmdit = nn.Linear(1000, 1000)
    mmdit.register_buffer("pos_embed", torch.zeros(1, 64, 1000))  # the MMDiT's position table is a buffer
    parts = {"model": type("Inner", (), {"diffusion_model": mmdit})(),
             "first_stage_model": nn.Linear(100, 100), "cond_stage_model": nn.Linear(300, 300)}  # fmt: skip
    sd3 = type("SD3", (), {"is_sd3": True, "is_sdxl": False, "is_sd2": False, **parts})()
    client.webui.script_callbacks.model_loaded_callback(sd3)
    weights = sum(t.numel() * 4 for m in (mmdit, parts["first_stage_model"], parts["cond_stage_model"])
                  for t in (*m.parameters(), *m.buffers()))  # fmt: skip
    assert weights == (1000 * 1000 + 1000 + 64 * 1000 + 100 * 100 + 100 + 300 * 300 + 300) * 4
    named = client.get("/memslice/v1/plan", params=dict(width=512, height=512, model="sd15")).json()
    assert named["memory_bytes"] == (3 << 30) + weights


def test_previews_count_torchs_cached_blocks_as_the_calls_do(client, monkeypatch):
    """CUDA: 1 GiB driver free with 5.5 GiB cached by torch read "does not fit" in the panel, the API and job_fits
    while the calls themselves (the precise probe) had 6.5 GiB."""
    from lib_memslice import probe

    asked = []

    def reading(device, precise=False):
        asked.append(precise)
        return probe.FreeMemory((13 if precise else 2) << 29, "test")

    monkeypatch.setattr(probe, "free_memory", reading)
    body = client.get("/memslice/v1/plan", params=dict(width=512, height=512, model="sd15")).json()
    assert body["free_bytes"] >= 6 << 30 and asked and all(asked)
    assert client.get("/memslice/v1/status").json()["free_bytes"] == 13 << 29
    from lib_memslice.api import job_fits

    assert job_fits(512, 512, model="sd15").details["free_bytes"] == 13 << 29  # inside the webui: the planner's own
    assert all(asked)


def counting_plans(monkeypatch, gate=None):
    """Count the plans computed (and how many at once); ``gate``: each plan waits for it first."""
    from lib_memslice.webui import planner

    seen = {"plans": 0, "now": 0, "most": 0}
    real = planner.plan_inputs
    lock = threading.Lock()

    def plan(inputs):
        with lock:
            seen["plans"] += 1
            seen["now"] += 1
            seen["most"] = max(seen["most"], seen["now"])
        try:
            if gate is not None:
                gate.wait(10)
            time.sleep(0.02)
            return real(inputs)
        finally:
            with lock:
                seen["now"] -= 1

    monkeypatch.setattr(planner, "plan_inputs", plan)
    return seen


def test_one_plan_at_a_time_and_repeated_plans_are_answered_from_the_cache(client, monkeypatch):
    """The page asks four plans at once: they are computed one at a time (none refused), and asked again they are
    not computed again, on either copy."""
    from concurrent.futures import ThreadPoolExecutor

    from lib_memslice import probe

    fixed = probe.FreeMemory(8 << 30, "test")  # the live reading may cross a step between the rounds
    monkeypatch.setattr(probe, "free_memory", lambda device, precise=False: fixed)
    seen = counting_plans(monkeypatch)
    asks = [dict(width=512, height=512, batch=b) for b in (1, 2, 4)] + [dict(width=768, height=640, batch=1)]

    def ask(params):
        return client.get("/internal/memslice/v1/plan", params=params)

    with ThreadPoolExecutor(4) as pool:
        first = list(pool.map(ask, asks))
    assert [r.status_code for r in first] == [200] * 4
    assert seen["plans"] == 4 and seen["most"] == 1
    with ThreadPoolExecutor(4) as pool:
        again = list(pool.map(ask, asks))
    assert [r.json() for r in again] == [r.json() for r in first] and seen["plans"] == 4
    assert client.get("/memslice/v1/plan", params=asks[0]).json() == first[0].json() and seen["plans"] == 4


def test_a_busy_planner_answers_503_with_retry_after(client, monkeypatch):
    """More requests than may wait are refused at once, and one that waits too long gives up: 503, Retry-After."""
    from lib_memslice.webui import routes

    gate = threading.Event()
    counting_plans(monkeypatch, gate)
    monkeypatch.setattr(routes, "_waiting", threading.BoundedSemaphore(2))
    monkeypatch.setattr(routes, "WAIT_S", 0.2)
    first = []
    worker = threading.Thread(target=lambda: first.append(client.get("/memslice/v1/plan", params={"width": 640})))
    worker.start()
    try:
        while not routes._planning.locked():
            time.sleep(0.01)
        waited = client.get("/memslice/v1/plan", params={"width": 704})  # waits 0.2 s for the one computing
        assert waited.status_code == 503 and waited.headers["retry-after"] == "1"
        routes._waiting.acquire()  # a second request waiting: no place left
        try:
            refused = client.get("/internal/memslice/v1/plan", params={"width": 768})
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        finally:
            routes._waiting.release()
    finally:
        gate.set()
        worker.join()
    assert first[0].status_code == 200
    assert client.get("/memslice/v1/plan", params={"width": 704}).status_code == 200  # free again


def test_a_cached_plan_never_counts_memory_that_is_no_longer_free(client, monkeypatch):
    """Plans are made in free memory read in 32 MiB steps, rounded down: readings within a step share one answer,
    which never counts more than the reading at the request; a lower step is planned again."""
    from lib_memslice import probe

    MiB = 1 << 20
    seen = counting_plans(monkeypatch)
    reading = {"bytes": 0}
    monkeypatch.setattr(probe, "free_memory", lambda device, precise=False: probe.FreeMemory(reading["bytes"], "t"))
    client.webui.devices.dtype = client.webui.devices.dtype_vae = torch.float16
    answers = []
    for free in (3072 * MiB + 31 * MiB, 3072 * MiB + 5 * MiB, 3072 * MiB, 3072 * MiB - 1, 3040 * MiB + 7):
        reading["bytes"] = free
        body = client.get("/internal/memslice/v1/plan", params=dict(width=1024, height=1024)).json()
        assert body["free_bytes"] <= free and body["memory_bytes"] <= free, (free, body["memory_bytes"])
        assert "in 32 MiB steps" in body["memory_source"]
        answers.append((body["free_bytes"], seen["plans"]))
    assert answers == [(3072 * MiB, 1), (3072 * MiB, 1), (3072 * MiB, 1), (3040 * MiB, 2), (3040 * MiB, 2)]
    from lib_memslice.webui import routes

    apple = routes.coarse(probe.FreeMemory(3072 * MiB + 5, "t", ceiling=5120 * MiB + 31 * MiB))  # its ceiling too
    assert (apple.bytes, apple.ceiling) == (3072 * MiB, 5120 * MiB)
    assert routes.coarse(probe.FreeMemory(-1, "t")).bytes == 0
    assert routes.coarse(probe.FreeMemory(1, "t")).ceiling is None


def test_a_cached_plan_follows_the_settings_the_entry_and_the_model(client, monkeypatch):
    """Whatever makes a plan differ makes a new one: saved settings, the active entry, the dtypes, the model."""
    from lib_memslice import probe

    fixed = probe.FreeMemory(8 << 30, "test")
    monkeypatch.setattr(probe, "free_memory", lambda device, precise=False: fixed)
    seen = counting_plans(monkeypatch)
    webui = client.webui

    def plan():
        return client.get("/internal/memslice/v1/plan", params=dict(width=1024, height=1024)).json()

    base = plan()
    webui.shared.opts.set("memslice_safety_factor", 6.0)
    assert plan()["settings"]["memslice_safety_factor"] == 6.0 and seen["plans"] == 2
    select(webui, TITLES["heads"])
    assert plan()["strategy"] == "heads" and seen["plans"] == 3
    webui.devices.dtype = torch.float32 if webui.devices.dtype != torch.float32 else torch.float16
    plan()
    assert seen["plans"] == 4
    webui.script_callbacks.model_loaded_callback(type("M", (), {"is_sdxl": True, "is_sd2": False})())
    assert plan()["model"] != base["model"] and seen["plans"] == 5


@pytest.mark.parametrize(
    ("title", "safety_factor", "share"),
    [("doggettx", 3.3, 1.0), ("doggettx", 6.6, 0.5), ("invokeai", 1.0, 1.0), ("auto", 3.3, 1 / 3.3),
     ("heads", 2.0, 0.5)],
)  # fmt: skip
def test_status_reports_the_room_the_active_strategy_plans_in(client, monkeypatch, title, safety_factor, share):
    """The webui's rules plan in free x 3.3 / safety factor, never more than free; the others in free / safety
    factor. The status says the room a call of the active entry plans in, and it is the room such a call records."""
    from lib_memslice import probe

    free = 1 << 30
    monkeypatch.setattr(probe, "free_memory", lambda device, precise=False: probe.FreeMemory(free, "test"))
    webui = client.webui
    select(webui, TITLES[title])
    webui.shared.opts.set("memslice_safety_factor", safety_factor)
    body = client.get("/memslice/v1/status").json()
    assert body["room_bytes"] == int(free * share) and body["room"].startswith(title)
    layer = webui.ldm_attention.CrossAttention(query_dim=64, heads=4, dim_head=16)
    with torch.no_grad():
        layer(torch.randn(1, 64, 64))
    assert webui.memslice.STATS.recent()[-1].room_bytes == body["room_bytes"]


def test_status_says_there_is_no_room_without_a_memslice_entry(client):
    client.webui.shared.opts.set("memslice_budget_gb", 1.0)
    body = client.get("/memslice/v1/status").json()
    assert body["active"] is None and body["room_bytes"] is None and "no memslice entry" in body["room"]
    select(client.webui, TITLES["auto"])
    body = client.get("/memslice/v1/status").json()
    assert body["room_bytes"] == 1 << 30 and body["room"] == "the attention budget"


@pytest.mark.skipif(
    not (__import__("shutil").which("chromium") or __import__("shutil").which("chromium-browser")),
    reason="no Chromium here: install Debian's chromium (.ci/run does) to run the browser tests",
)
def test_the_panel_works_behind_the_pages_login(webui):
    """--gradio-auth in a real headless Chromium: the page launched as webui.py launches it (``demo.launch(auth=...)``,
    then app_started adds the routes), logged in through gradio's own /login; memslice.js's requests carry the
    session (same-origin cookies) and the panel fills in. Before the login the page's copy refuses."""
    import os
    import shutil
    import socket

    import gradio as gr
    from playwright.sync_api import sync_playwright

    from .conftest import ROOT

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    webui.shared.opts.set("memslice_budget_gb", 2.0)  # a fixed budget: the live free memory moves under the test
    webui.shared.cmd_opts.gradio_auth = "alice:secret"
    with gr.Blocks(analytics_enabled=False, title="page behind a login") as demo:
        gr.Textbox(label="Prompt", elem_id="txt2img_prompt")
        gr.Slider(64, 2048, value=512, step=8, label="Width", elem_id="txt2img_width")
        gr.Slider(64, 2048, value=512, step=8, label="Height", elem_id="txt2img_height")
        with gr.Column(elem_id="column_settings_memslice"):
            gr.Number(2.0, label="Attention budget (GiB)", elem_id="setting_memslice_budget_gb")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app, url, _ = demo.launch(auth=[("alice", "secret")], prevent_thread_lock=True, server_name="127.0.0.1",
                              server_port=port, quiet=True)  # fmt: skip
    webui.script_callbacks.app_started_callback(demo, app)
    with open(os.path.join(ROOT, "javascript", "memslice.js")) as f:
        tag = f"<script>{f.read()}</script>"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=shutil.which("chromium") or shutil.which("chromium-browser"),
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                      "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"],
            )  # fmt: skip
            context = browser.new_context()

            def inject(route):  # a classic script at the end of <head>, as the webui injects extension javascript
                response = route.fetch()
                route.fulfill(response=response, body=response.text().replace("</head>", tag + "</head>", 1))

            context.route(url, inject)
            errors, answers = [], []
            tab = context.new_page()
            tab.on("pageerror", lambda e: errors.append(str(e)))
            tab.on("response", lambda r: answers.append(r.status) if "/internal/memslice/v1/" in r.url else None)
            assert context.request.get(f"{url}internal/memslice/v1/status").status == 401
            assert context.request.post(f"{url}login", form={"username": "alice", "password": "secret"}).ok
            with tab.expect_response(lambda r: "/internal/memslice/v1/plan" in r.url, timeout=60_000) as first:
                tab.goto(url)
            assert first.value.status == 200
            tab.wait_for_selector("#memslice_planner", timeout=30_000)
            assert tab.evaluate("fetch('internal/memslice/v1/status?limit=0').then(r => r.status)") == 200
            assert tab.evaluate("window.memslice.refreshPlanner().then(() => 'done')") == "done"
            assert answers and set(answers) == {200}, answers
            assert "memslice:" not in tab.inner_text("#memslice_planner")  # the panel's error line stays empty
            assert not errors
            browser.close()
    finally:
        demo.close()
        webui.shared.cmd_opts.gradio_auth = None
