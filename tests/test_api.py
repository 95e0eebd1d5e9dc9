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


def test_status_reports_device_budget_entry_settings_and_recent_plans(client):
    webui = client.webui
    select(webui, TITLES["doggettx"])
    webui.shared.opts.set("memslice_budget_gb", 1 / 4096)  # 256 KiB: under the fused kernel's scratch
    layer = webui.ldm_attention.CrossAttention(query_dim=64, heads=4, dim_head=16)
    with torch.no_grad():
        layer(torch.randn(2, 300, 64))
    body = client.get("/memslice/v1/status", params={"limit": 5}).json()
    from lib_memslice import __version__

    assert body["device_kind"] == "cpu" and body["active"] == TITLES["doggettx"] and body["version"] == __version__
    assert body["attention_budget_bytes"] == body["room_bytes"] == 1 << 18 and body["free_bytes"] > 0
    assert body["settings"]["memslice_budget_gb"] == 1 / 4096
    last = body["recent"][-1]
    for key in ("site", "batch_heads", "q_tokens", "k_tokens", "slices", "peak_bytes", "timestamp", "retries"):
        assert key in last
    assert last["slices"] > 1 and last["peak_bytes"] <= 1 << 18
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
    """The worst request the validation admits plans a fixed, small number of times (no timing assert)."""
    from lib_memslice import slicing

    calls = []
    real = slicing._search
    monkeypatch.setattr(slicing, "_search", lambda *a, **k: calls.append(1) or real(*a, **k))
    body = client.get(
        "/memslice/v1/plan", params=dict(width=16384, height=16384, batch=64, model="sdxl", slice_cap=4096)
    ).json()
    assert body["fits"] in (True, False)
    assert 0 < len(calls) < 1000  # sites x (plan + binary searches), independent of the size asked for


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


def test_sd3_is_detected_and_not_planned(client):
    """webui 1.10 loads SD3 Medium (``is_sd3``): memslice says it does not plan it, never SD1.5 numbers."""
    model = type("SD3", (), {"is_sd3": True, "is_sdxl": False, "is_sd2": False})()
    client.webui.script_callbacks.model_loaded_callback(model)
    body = client.get("/memslice/v1/plan").json()
    assert body["verdict"] == "not planned" and "SD3" in body["advice"] and body["passes"] == []
    assert body["max_square_resolution"] == 0 and not body["fits"]
    assert client.get("/memslice/v1/status").json()["model"] == "sd3"
    named = client.get("/memslice/v1/plan", params=dict(model="sd3")).json()
    assert named["verdict"] == "not planned"
