// memslice: a live planner in Settings > Memory slicing, and a one-line slicing summary under each generation.
// Loaded by the webui as a classic script; uses its onUiLoaded()/gradioApp() and talks only to this server's
// page routes (/internal/memslice/v1: outside --api-auth, like the webui's own /internal/progress). No external assets.
(function () {
    "use strict";

    var API = "internal/memslice/v1/";
    var KEYS = ["memslice_safety_factor", "memslice_slice_cap", "memslice_budget_gb"];
    var BATCHES = [1, 2, 4];
    var sequence = 0;

    function app() {
        return typeof gradioApp === "function" ? gradioApp() : document;
    }

    function formatBytes(n) {
        var units = [["GiB", 1073741824], ["MiB", 1048576], ["KiB", 1024]];
        for (var i = 0; i < units.length; i++) {
            if (Math.abs(n) >= units[i][1]) return (n / units[i][1]).toFixed(1) + " " + units[i][0];
        }
        return Math.round(n) + " B";
    }

    function numberIn(id) {
        var el = app().querySelector("#" + id + " input[type=number]") || app().querySelector("#" + id + " input");
        if (!el || el.value === "") return null;
        var value = Number(el.value);
        return isFinite(value) ? value : null;
    }

    function query(params) {
        var parts = [];
        Object.keys(params).forEach(function (key) {
            if (params[key] !== null && params[key] !== undefined) {
                parts.push(encodeURIComponent(key) + "=" + encodeURIComponent(params[key]));
            }
        });
        return parts.join("&");
    }

    function getJSON(path, params) {
        return fetch(API + path + "?" + query(params || {}), {credentials: "same-origin"}).then(function (r) {
            return r.json().then(function (body) {
                if (!r.ok) throw new Error(body.detail ? JSON.stringify(body.detail) : "HTTP " + r.status);
                return body;
            });
        });
    }

    function element(tag, attrs, text) {
        var el = document.createElement(tag);
        Object.keys(attrs || {}).forEach(function (key) {
            el.setAttribute(key, attrs[key]);
        });
        if (text !== undefined) el.textContent = text;
        return el;
    }

    // --- the planner panel --------------------------------------------------------------------------------

    function panel() {
        var existing = app().querySelector("#memslice_planner");
        if (existing) return existing;
        var column = app().querySelector("#column_settings_memslice") || app().querySelector("#settings_memslice");
        if (!column) return null;
        var box = element("div", {id: "memslice_planner", "class": "memslice-planner"});
        box.appendChild(element("h3", {}, "memslice planner (unsaved values included)"));
        box.appendChild(element("div", {"class": "memslice-room"}, "..."));
        var table = element("table", {"class": "memslice-table"});
        var head = element("tr");
        head.appendChild(element("th", {}, "batch"));
        head.appendChild(element("th", {"class": "memslice-max-label"}, "largest square size the whole job fits"));
        table.appendChild(head);
        BATCHES.forEach(function (batch) {
            var row = element("tr", {"data-batch": String(batch)});
            row.appendChild(element("td", {}, String(batch)));
            row.appendChild(element("td", {"class": "memslice-max"}, "..."));
            table.appendChild(row);
        });
        box.appendChild(table);
        box.appendChild(element("div", {"class": "memslice-current"}, "..."));
        box.appendChild(element("table", {"class": "memslice-passes"}));
        box.appendChild(element("div", {"class": "memslice-error"}, ""));
        column.insertBefore(box, column.firstChild);
        return box;
    }

    function planParams() {
        return {
            safety_factor: numberIn("setting_memslice_safety_factor"),
            slice_cap: numberIn("setting_memslice_slice_cap"),
            budget_gb: numberIn("setting_memslice_budget_gb"),
        };
    }

    // Hires. fix as txt2img shows it: the InputAccordion's checkbox (or its open state), scale or target size,
    // and whether the upscaler works on latents ("Latent ...") or on the picture (decode, upscale, encode)
    function hiresParams() {
        var box = app().querySelector("#txt2img_hr-checkbox input[type=checkbox]");
        var accordion = app().querySelector("#txt2img_hr");
        var enabled = box ? box.checked : !!(accordion && accordion.classList.contains("input-accordion-open"));
        if (!enabled) return {};
        var params = {hr_scale: numberIn("txt2img_hr_scale") || 2};
        var x = numberIn("txt2img_hr_resize_x");
        var y = numberIn("txt2img_hr_resize_y");
        if (x) params.hr_width = x;
        if (y) params.hr_height = y;
        var upscaler = app().querySelector("#txt2img_hr_upscaler input");
        var name = upscaler ? upscaler.value || "" : "";
        params.hr_upscaler = name === "" || name.indexOf("Latent") === 0 ? "latent" : "image";
        return params;
    }

    function refreshPlanner() {
        var box = panel();
        if (!box) return Promise.resolve();
        var mine = ++sequence;
        var base = planParams();
        var hires = hiresParams();
        var width = numberIn("txt2img_width") || 512;
        var height = numberIn("txt2img_height") || 512;
        var batch = numberIn("txt2img_batch_size") || 1;
        var job = Object.assign({width: width, height: height, batch: batch}, base, hires);
        var requests = [getJSON("plan", job)];
        BATCHES.forEach(function (b) {
            requests.push(getJSON("plan", Object.assign({width: 512, height: 512, batch: b}, base, hires)));
        });
        return Promise.all(requests).then(function (results) {
            if (mine !== sequence) return; // a newer refresh is under way
            var current = results[0];
            box.querySelector(".memslice-error").textContent = "";
            box.querySelector(".memslice-room").textContent =
                "room: " + current.room + ", slice cap " + current.slice_cap + ", memory for a job " +
                formatBytes(current.memory_bytes) + " (" + current.memory_source + "), model: " + current.model +
                " (" + current.model_source + ")";
            box.querySelector(".memslice-max-label").textContent = current.hires ?
                "largest square first-pass size the whole job fits (hires scaled alike)" :
                "largest square size the whole job fits";
            BATCHES.forEach(function (b, i) {
                var answer = results[i + 1];
                box.querySelector("tr[data-batch='" + b + "'] .memslice-max").textContent = !answer.planned ?
                    "not planned" : answer.max_square_resolution > 0 ?
                    answer.max_square_resolution + " x " + answer.max_square_resolution : "nothing fits";
            });
            var hr = current.hires ? ", hires " + current.hires[0] + " x " + current.hires[1] : "";
            box.querySelector(".memslice-current").textContent =
                "txt2img " + width + " x " + height + hr + ", batch " + batch + ": " + current.verdict +
                (current.verdict === "fits" ? " (" + plural(current.max_slices, "slice") + " at most)" : "") +
                "; " + current.advice;
            var passes = box.querySelector(".memslice-passes");
            passes.textContent = "";
            (current.passes || []).forEach(function (p) {
                var row = element("tr", {"data-verdict": p.verdict});
                row.appendChild(element("td", {}, p.name));
                row.appendChild(element("td", {}, p.width + " x " + p.height));
                row.appendChild(element("td", {}, formatBytes(p.total_bytes)));
                row.appendChild(element("td", {}, p.verdict));
                passes.appendChild(row);
            });
            box.setAttribute("data-verdict", current.verdict);
            box.setAttribute("data-fits", String(current.fits));
            box.setAttribute("data-limit", current.limit);
            box.setAttribute("data-max-slices", String(current.max_slices));
        }).catch(function (error) {
            if (mine === sequence) box.querySelector(".memslice-error").textContent = "memslice: " + error.message;
        });
    }

    function debounce(fn, ms) {
        var timer = null;
        return function () {
            clearTimeout(timer);
            timer = setTimeout(fn, ms);
        };
    }

    // --- the status line under each generation ------------------------------------------------------------

    function plural(n, word) {
        if (n === 1) return n + " " + word;
        return n + " " + (word.slice(-1) === "y" ? word.slice(0, -1) + "ies" : word + "s");
    }

    function compact(job) {
        return "memslice: " + plural(job.max_slices, "slice") + " max, predicted peak " +
            formatBytes(job.max_peak_bytes) + ", " + plural(job.retries, "retry");
    }

    // After a job the webui fills #html_info_<tab> with the infotext; after a failed one it empties it and puts the
    // error in #html_log_<tab> (modules/call_queue.py): the line then says the job failed, never the last job's plan.
    function showStatus(tab) {
        var info = app().querySelector("#html_info_" + tab);
        var log = app().querySelector("#html_log_" + tab);
        var failed = !!(log && log.querySelector(".error"));
        if (!info || (!failed && !info.textContent.trim())) return Promise.resolve();
        return getJSON("status", {limit: 0}).then(function (status) {
            var line = app().querySelector("#memslice_status_" + tab);
            var refused = status.current_job && status.current_job.failures > 0;
            if (!status.active || (!failed && (!status.last_job || !status.last_job.calls))) {
                if (line) line.remove();
                return;
            }
            if (!line) {
                line = element("div", {id: "memslice_status_" + tab, "class": "memslice-status"});
                info.parentNode.insertBefore(line, info.nextSibling);
            }
            line.title = "";
            if (failed) {
                line.textContent = refused ?
                    "memslice: the job failed: " + plural(status.current_job.failures, "attention call") +
                    " did not fit; the error names the pass and the largest size that fits" :
                    "memslice: the job failed (see the error)";
                line.setAttribute("data-failed", "true");
            } else {
                line.textContent = compact(status.last_job);
                line.title = status.last_job.line;
                line.removeAttribute("data-failed");
            }
        }).catch(function () {});
    }

    function watchOutputs() {
        ["txt2img", "img2img"].forEach(function (tab) {
            var info = app().querySelector("#html_info_" + tab);
            var log = app().querySelector("#html_log_" + tab);
            var update = debounce(function () {
                showStatus(tab);
            }, 150);
            [info, log].forEach(function (node) {
                if (!node || node.getAttribute("data-memslice-watched")) return;
                node.setAttribute("data-memslice-watched", "1");
                new MutationObserver(update).observe(node, {childList: true, subtree: true, characterData: true});
            });
        });
    }

    // gradio renders a tab's content when it first opens: build the panel and watchers whenever they are missing
    function ensure() {
        var column = app().querySelector("#column_settings_memslice") || app().querySelector("#settings_memslice");
        if (column && !app().querySelector("#memslice_planner")) refreshPlanner();
        watchOutputs();
    }

    function setup() {
        var refresh = debounce(refreshPlanner, 250);
        // typed values count before Apply: listen to the inputs inside the watched components
        var watched = KEYS.map(function (key) { return "#setting_" + key; })
            .concat(["#txt2img_width", "#txt2img_height", "#txt2img_batch_size", "#txt2img_hr", "#txt2img_hr-checkbox",
                "#txt2img_hr_scale", "#txt2img_hr_resize_x", "#txt2img_hr_resize_y", "#txt2img_hr_upscaler"]).join(", ");
        ["input", "change"].forEach(function (type) {
            app().addEventListener(type, function (event) {
                var target = event.target;
                if (target && target.closest && target.closest(watched)) refresh();
            }, true);
        });
        if (typeof onAfterUiUpdate === "function") {
            onAfterUiUpdate(ensure);
        } else {
            new MutationObserver(debounce(ensure, 200)).observe(app(), {childList: true, subtree: true});
        }
        ensure();
    }

    window.memslice = {refreshPlanner: refreshPlanner, showStatus: showStatus, formatBytes: formatBytes,
        hiresParams: hiresParams};

    if (typeof onUiLoaded === "function") {
        onUiLoaded(setup);
    } else {
        document.addEventListener("DOMContentLoaded", setup);
    }
})();
