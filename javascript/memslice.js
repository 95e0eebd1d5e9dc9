// memslice: a live planner in Settings > Memory slicing, and a one-line slicing summary under each generation.
// Loaded by the webui as a classic script; uses its onUiLoaded()/onAfterUiUpdate()/onOptionsChanged()/gradioApp()
// and talks only to this server's page routes (/internal/memslice/v1). Styles: style.css (the webui's and gradio's
// CSS variables, light and dark). No external assets.
(function () {
    "use strict";

    var API = "internal/memslice/v1/";
    // the Memory slicing settings that change a plan, read from the settings page before Apply settings
    var SETTINGS = [["memslice_safety_factor", "safety_factor"], ["memslice_slice_cap", "slice_cap"],
        ["memslice_budget_gb", "budget_gb"], ["memslice_kernel", "kernel"], ["memslice_vae", "vae"]];
    var BATCHES = [1, 2, 4];
    var VERDICTS = {"fits": "fits", "tight": "tight", "does not fit": "fails"};
    // a pass's bar: what its peak is made of, in this order (they add up to its total)
    var PARTS = [["weights", "weights"], ["inputs", "inputs"], ["activations", "other activations"],
        ["attention", "attention"], ["allocator", "allocator (measured share)"]];
    var TIMES = " \u00d7 ";
    var sequence = 0;
    var requested = null; // the key of the job last asked for
    var lastTab = "txt2img";
    var panelVisible = false;

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

    function plural(n, word) {
        if (n === 1) return n + " " + word;
        return n + " " + (word.slice(-1) === "y" ? word.slice(0, -1) + "ies" : word + "s");
    }

    function numberIn(id) {
        var el = app().querySelector("#" + id + " input[type=number]") || app().querySelector("#" + id + " input");
        if (!el || el.value === "") return null;
        var value = Number(el.value);
        return isFinite(value) ? value : null;
    }

    // a setting's unsaved value: a number box or slider, a radio group's checked choice, or a checkbox
    function settingIn(id) {
        var radio = app().querySelector("#" + id + " input[type=radio]:checked");
        if (radio) return radio.value;
        var box = app().querySelector("#" + id + " input[type=checkbox]");
        if (box) return String(box.checked);
        return numberIn(id);
    }

    function textIn(id) {
        var el = app().querySelector("#" + id + " input, #" + id + " textarea");
        return el ? el.value : null;
    }

    // a gradio tab item is the open one of its tabs (gradio 3.41 sets display: none on the others); its parents
    // may be hidden (img2img's Resize by stays the chosen tab while Settings is open)
    function shown(el) {
        return !!el && el.style.display !== "none";
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

    function describe(detail) {
        if (Array.isArray(detail)) {
            return detail.map(function (d) {
                return (d.loc ? d.loc[d.loc.length - 1] + ": " : "") + d.msg;
            }).join("; ");
        }
        return typeof detail === "string" ? detail : JSON.stringify(detail);
    }

    // GET a route; a 503 (the server is planning other requests) is retried after its Retry-After, twice at most
    function getJSON(path, params, tries) {
        tries = tries || 0;
        var url = API + path + "?" + query(params || {});
        return fetch(url, {credentials: "same-origin"}).then(function (r) {
            if (r.status === 503 && tries < 2) {
                var wait = 1000 * (Number(r.headers.get("Retry-After")) || 1);
                return new Promise(function (resolve) {
                    setTimeout(resolve, wait);
                }).then(function () {
                    return getJSON(path, params, tries + 1);
                });
            }
            return r.json().then(function (body) {
                if (!r.ok) throw new Error(body.detail ? describe(body.detail) : "HTTP " + r.status);
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

    // --- the job on the page ------------------------------------------------------------------------------

    function settingsParams() {
        var params = {};
        SETTINGS.forEach(function (pair) {
            params[pair[1]] = settingIn("setting_" + pair[0]);
        });
        return params;
    }

    // Hires. fix as txt2img shows it: the InputAccordion's hidden checkbox (or its open state), scale or target
    // size, and whether the upscaler works on latents (the webui's "Latent ..." modes) or on the picture (decode,
    // upscale, encode)
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
        var name = textIn("txt2img_hr_upscaler") || "";
        params.hr_upscaler = name === "" || name.indexOf("Latent") === 0 ? "latent" : "image";
        params.upscaler_name = name || "Latent";
        return params;
    }

    // the generation tab the job is for: the one open, else the one open last
    function generationTab() {
        ["txt2img", "img2img"].forEach(function (tab) {
            if (shown(app().querySelector("#tab_" + tab))) lastTab = tab;
        });
        return lastTab;
    }

    // img2img's size as the webui computes it: Resize to's width and height, or Resize by: the image's size
    // (the image of the open mode tab) times the scale, truncated
    function img2imgSize() {
        var byTab = app().querySelector("#img2img_tab_resize_by");
        if (!shown(byTab)) return {width: numberIn("img2img_width") || 512, height: numberIn("img2img_height") || 512};
        var scale = numberIn("img2img_scale") || 1;
        var img = app().querySelector("#mode_img2img > div[style*='display: block'] img");
        if (!img || !img.naturalWidth) return {waiting: "img2img resizes by " + scale + ": no image is loaded yet"};
        return {width: Math.floor(img.naturalWidth * scale), height: Math.floor(img.naturalHeight * scale),
            from: img.naturalWidth + TIMES + img.naturalHeight, scale: scale};
    }

    // the checkpoint chosen in its dropdown, while the webui has not loaded it (opts follow settings_json, which
    // the webui returns once the model is loaded)
    function checkpointLoading() {
        var chosen = textIn("setting_sd_model_checkpoint");
        var options = typeof opts === "object" && opts ? opts : {};
        var loaded = options.sd_model_checkpoint;
        return chosen && typeof loaded === "string" && loaded !== "" && chosen !== loaded ? chosen : null;
    }

    // everything the plan depends on, as the page shows it now
    function readJob() {
        var tab = generationTab();
        var job = {tab: tab, count: numberIn(tab + "_batch_count") || 1, checkpoint: textIn("setting_sd_model_checkpoint")};
        var params = {batch: numberIn(tab + "_batch_size") || 1};
        if (tab === "img2img") {
            var size = img2imgSize();
            if (size.waiting) job.waiting = size.waiting;
            job.resize = size.from ? {from: size.from, scale: size.scale} : null;
            params.width = size.width;
            params.height = size.height;
            params.img2img = true;
        } else {
            params.width = numberIn("txt2img_width") || 512;
            params.height = numberIn("txt2img_height") || 512;
            var hires = hiresParams();
            job.upscaler = hires.upscaler_name || null;
            delete hires.upscaler_name;
            Object.assign(params, hires);
        }
        Object.assign(params, settingsParams());
        var loading = checkpointLoading();
        if (loading) job.waiting = "loading the checkpoint " + loading + ": the plan follows once it is loaded";
        job.params = params;
        job.key = JSON.stringify(job);
        return job;
    }

    // --- the planner panel --------------------------------------------------------------------------------

    function column() {
        return app().querySelector("#column_settings_memslice") || app().querySelector("#settings_memslice");
    }

    function panel() {
        var existing = app().querySelector("#memslice_planner");
        if (existing) return existing;
        var where = column();
        if (!where) return null;
        var box = element("section", {id: "memslice_planner", "class": "memslice-planner", "data-state": "updating",
            "aria-labelledby": "memslice_planner_title"});
        var head = element("div", {"class": "memslice-head"});
        head.appendChild(element("h3", {id: "memslice_planner_title"}, "memslice planner"));
        head.appendChild(element("span", {"class": "memslice-note"}, "the job on the page, unsaved values included"));
        box.appendChild(head);
        box.appendChild(element("p", {"class": "memslice-answer", role: "status", "aria-live": "polite"}, "..."));
        box.appendChild(element("p", {"class": "memslice-advice"}));
        box.appendChild(element("p", {"class": "memslice-job"}));
        box.appendChild(element("div", {"class": "memslice-chart"}));
        var details = element("details", {"class": "memslice-details"});
        details.appendChild(element("summary", {}, "Numbers per pass"));
        details.appendChild(element("div", {"class": "memslice-table-wrap"}));
        details.appendChild(element("p", {"class": "memslice-reason"}));
        details.appendChild(element("p", {"class": "memslice-room"}));
        box.appendChild(details);
        box.appendChild(element("div", {"class": "memslice-error", role: "alert"}, ""));
        where.insertBefore(box, where.firstChild);
        return box;
    }

    function sizeText(w, h) {
        return w + TIMES + h;
    }

    // what a pass's bar is made of: weights, inputs, the rest of its peak, the attention transient live at that
    // peak, and the allocator's measured share; the parts add up to its total (tensor_bytes + allocator_bytes)
    function segments(p) {
        var peak = p.tensor_bytes - p.weight_bytes - p.input_bytes;
        var attention = typeof p.attention_at_peak_bytes === "number" ? p.attention_at_peak_bytes :
            Math.min(p.attention_bytes || 0, peak);
        attention = Math.max(0, Math.min(attention, peak));
        return [p.weight_bytes, p.input_bytes, peak - attention, attention, p.allocator_bytes];
    }

    // a VAE pass the planner runs in bands of rows (its `bands`; 0: in one piece), streamed through host memory
    // when even the bands do not fit on the device (one band is only ever streamed: "streamed", never "1 band")
    function bandsText(p) {
        if (p.bands < 2) return "streamed";
        return plural(p.bands, "band") + (p.streamed ? ", streamed" : "");
    }

    // why a pass does not fit whatever its total: past the model's largest side, its attention refused (under the
    // attention budget), or no band plan for the VAE; "" for a pass that fits or only lacks memory
    function refusal(p, current) {
        if (p.verdict !== "does not fit") return "";
        if (p.too_large) return p.too_large;
        var rows = (current.layers || []).filter(function (row) {
            return row.pass === p.name && !row.fits;
        });
        if (rows.length) return String(rows[0].reason).replace(/^memslice: /, "").split(";")[0];
        var bands = String(p.bands_reason || "");
        return bands.indexOf("no plan fits") === 0 ? bands : "";
    }

    function passSummary(p, current) {
        var memory = current.memory_bytes;
        var parts = segments(p);
        var words = PARTS.map(function (part, i) {
            return part[1] + " " + formatBytes(parts[i]);
        });
        if (parts[3] === 0 && p.attention_bytes > 0) {
            words[3] = "attention 0 B at the pass's peak (its largest call, " + formatBytes(p.attention_bytes) +
                ", runs with less else live)";
        }
        var why = refusal(p, current);
        var spare = ", " + formatBytes(p.headroom_bytes) + " to spare";
        if (p.headroom_bytes < 0) spare = ", " + formatBytes(-p.headroom_bytes) + " too much" + (why ? "; also " + why : "");
        else if (why) spare = ", but " + why; // within the memory, and still does not fit
        return p.name + ", " + sizeText(p.width, p.height) + ", batch " + p.batch +
            (p.bands > 0 ? (p.bands > 1 ? ", in " : ", ") + bandsText(p) : "") + ": " + p.verdict + ". " + words.join(", ") +
            "; total " + formatBytes(p.total_bytes) + " of " + formatBytes(memory) + spare + ".";
    }

    function renderBars(box, current) {
        var chart = box.querySelector(".memslice-chart");
        chart.textContent = "";
        var passes = current.passes || [];
        if (!passes.length) return;
        var memory = current.memory_bytes;
        var scale = Math.max(memory, Math.max.apply(null, passes.map(function (p) { return p.total_bytes; })));
        var at = 100 * memory / scale;
        var axis = element("div", {"class": "memslice-axis", "aria-hidden": "true"});
        var mark = element("span", {"class": "memslice-limit-label" + (at > 50 ? " memslice-left" : ""),
            style: "left: " + at + "%"}, formatBytes(memory) + " for this job");
        axis.appendChild(mark);
        chart.appendChild(axis);
        var list = element("ul", {"class": "memslice-bars", "aria-label": "memory per pass, against the " +
            formatBytes(memory) + " this job may use"});
        passes.forEach(function (p) {
            var binding = p.name === current.limit;
            var item = element("li", {"class": "memslice-pass", "data-verdict": p.verdict,
                "data-class": VERDICTS[p.verdict] || "none", "data-binding": String(binding), tabindex: "0",
                title: passSummary(p, current)});
            var label = element("div", {"class": "memslice-pass-label"});
            label.appendChild(element("span", {"class": "memslice-pass-name"}, p.name));
            label.appendChild(element("span", {"class": "memslice-pass-size"}, sizeText(p.width, p.height)));
            if (p.bands > 0) label.appendChild(element("span", {"class": "memslice-pass-bands"}, bandsText(p)));
            if (binding) label.appendChild(element("span", {"class": "memslice-pass-binding"}, "binding"));
            label.appendChild(element("span", {"class": "memslice-pass-total"}, formatBytes(p.total_bytes)));
            label.appendChild(element("span", {"class": "memslice-pass-verdict"}, p.verdict));
            item.appendChild(label);
            var track = element("div", {"class": "memslice-track", "aria-hidden": "true"});
            segments(p).forEach(function (bytes, i) {
                track.appendChild(element("span", {"class": "memslice-seg", "data-part": PARTS[i][0],
                    "data-bytes": String(bytes), style: "width: " + (100 * bytes / scale) + "%"}));
            });
            track.appendChild(element("span", {"class": "memslice-limit", style: "left: " + at + "%"}));
            item.appendChild(track);
            item.appendChild(element("span", {"class": "memslice-pass-detail"}, passSummary(p, current)));
            list.appendChild(item);
        });
        chart.appendChild(list);
        var legend = element("ul", {"class": "memslice-legend", "data-class": VERDICTS[current.verdict] || "none",
            "aria-hidden": "true"});
        PARTS.forEach(function (part) {
            var key = element("li", {"data-part": part[0]});
            key.appendChild(element("span", {"class": "memslice-swatch"}));
            key.appendChild(document.createTextNode(part[1]));
            legend.appendChild(key);
        });
        chart.appendChild(legend);
    }

    function renderTable(box, current) {
        var wrap = box.querySelector(".memslice-table-wrap");
        wrap.textContent = "";
        if (!(current.passes || []).length) return;
        var table = element("table", {"class": "memslice-passes"});
        table.appendChild(element("caption", {}, "Each pass against " + formatBytes(current.memory_bytes) +
            " (" + current.memory_source + ")"));
        var headings = ["pass", "size", "batch", "weights", "inputs", "other activations", "attention",
            "allocator", "total", "headroom", "verdict"];
        var head = element("tr");
        headings.forEach(function (text) {
            head.appendChild(element("th", {scope: "col"}, text));
        });
        var thead = element("thead");
        thead.appendChild(head);
        table.appendChild(thead);
        var body = element("tbody");
        (current.passes || []).forEach(function (p) {
            var row = element("tr", {"data-verdict": p.verdict});
            row.appendChild(element("th", {scope: "row"}, p.name));
            row.appendChild(element("td", {}, sizeText(p.width, p.height) + (p.bands > 0 ? ", " + bandsText(p) : "")));
            row.appendChild(element("td", {}, String(p.batch)));
            segments(p).concat([p.total_bytes, p.headroom_bytes]).forEach(function (bytes) {
                row.appendChild(element("td", {"class": "memslice-num"}, formatBytes(bytes)));
            });
            row.appendChild(element("td", {}, p.verdict));
            body.appendChild(row);
        });
        table.appendChild(body);
        wrap.appendChild(table);
    }

    // "1088 px at batch 1 and 2, 832 px at 4": sizes in batch order, batches with the same size named together
    function squares(sizes) {
        var groups = [];
        BATCHES.forEach(function (b, i) {
            var last = groups[groups.length - 1];
            if (last && last.size === sizes[i]) last.batches.push(b);
            else groups.push({size: sizes[i], batches: [b]});
        });
        return groups.map(function (g, i) {
            var names = g.batches.length > 1 ? g.batches.slice(0, -1).join(", ") + " and " +
                g.batches[g.batches.length - 1] : String(g.batches[0]);
            var size = g.size > 0 ? g.size + " px" : "nothing";
            return size + " at " + (i === 0 ? "batch " : "") + names;
        }).join(", ");
    }

    // one short sentence: what to change when the job does not fit, or leaves no margin
    function change(current, job, sizes) {
        if (current.verdict === "tight") return "Tight: it may run out of memory; a smaller size or batch leaves a margin.";
        if (current.verdict !== "does not fit") return "";
        var params = job.params;
        var own = current.max_square_resolution;
        var refused = (current.layers || []).some(function (row) { return !row.fits; });
        var budget = params.budget_gb > 0;
        if (own === 0 && sizes[0] === 0) {
            return "Nothing fits at any size: " + (refused && budget ? "try a larger attention budget." :
                String(current.advice).replace(/\.$/, "") + ".");
        }
        var levers = [own > 0 ? "a smaller size (up to " + own + " px square at batch " + params.batch + ")" :
            "a smaller size"];
        if (params.batch > 1 && sizes[0] > own) levers.push("batch 1 (up to " + sizes[0] + " px)");
        if (params.hr_width || params.hr_height) levers.push("a smaller hires target");
        else if (params.hr_scale) levers.push("a lower hires scale");
        if (refused && budget) levers.push("a larger attention budget");
        if (String(current.memory_source || "").indexOf("assumed") === 0) {
            levers.push("an attention budget (free memory cannot be read on this device, e.g. DirectML)");
        }
        var last = levers.pop();
        return "To fit, try " + (levers.length ? levers.join(", ") + " or " : "") + last + ".";
    }

    function jobText(job, current) {
        var p = job.params;
        var text = job.tab + " " + sizeText(p.width, p.height);
        if (job.resize) text += " (" + job.resize.from + " resized by " + job.resize.scale + ")";
        if (current.hires) {
            text += ", hires " + sizeText(current.hires[0], current.hires[1]) + " by " + (job.upscaler || "Latent");
        }
        text += ", batch " + p.batch + (job.count > 1 ? " (" + job.count + " batches, one at a time)" : "");
        return text + " \u00b7 model: " + current.model + " (" + current.model_source + ")";
    }

    function render(box, job, current, sizes) {
        box.querySelector(".memslice-error").textContent = "";
        var cls = VERDICTS[current.verdict] || "none";
        var answer = box.querySelector(".memslice-answer");
        answer.textContent = "";
        answer.appendChild(element("strong", {"class": "memslice-badge", "data-class": cls}, current.verdict));
        var words = "binding pass: " + current.limit + " \u00b7 largest square" +
            (current.hires ? " first pass (hires scaled alike)" : "") + ": " + squares(sizes);
        answer.appendChild(document.createTextNode(" " + words));
        box.querySelector(".memslice-advice").textContent = change(current, job, sizes);
        box.querySelector(".memslice-job").textContent = jobText(job, current);
        renderBars(box, current);
        renderTable(box, current);
        box.querySelector(".memslice-reason").textContent = "The planner: " + current.advice;
        box.querySelector(".memslice-room").textContent =
            "room: " + current.room + ", slice cap " + current.slice_cap + ", " +
            plural(current.max_slices, "slice") + " at most; memory for the job " + formatBytes(current.memory_bytes) +
            " (" + current.memory_source + ")";
        box.setAttribute("data-verdict", current.verdict);
        box.setAttribute("data-class", cls);
        box.setAttribute("data-fits", String(current.fits));
        box.setAttribute("data-limit", current.limit);
        box.setAttribute("data-max-slices", String(current.max_slices));
    }

    function clear(box, message, state) {
        ["memslice-advice", "memslice-job", "memslice-chart", "memslice-table-wrap", "memslice-reason",
            "memslice-room"].forEach(function (name) {
            box.querySelector("." + name).textContent = "";
        });
        box.querySelector(".memslice-answer").textContent = message;
        box.setAttribute("data-state", state);
        box.removeAttribute("data-verdict");
        box.removeAttribute("data-class");
    }

    // Plan the job on the page (unless it is the one already asked for and `force` is not set). The answer is
    // shown only if it is the newest request's and the page still shows that job: never another job's numbers.
    function refreshPlanner(force) {
        var box = panel();
        if (!box) return Promise.resolve();
        var job = readJob();
        if (!force && job.key === requested) return Promise.resolve();
        requested = job.key;
        var mine = ++sequence;
        box.setAttribute("aria-busy", "true");
        if (job.waiting) {
            clear(box, job.waiting, "waiting");
            box.setAttribute("data-job", job.key);
            box.removeAttribute("aria-busy");
            return Promise.resolve();
        }
        box.setAttribute("data-state", "updating");
        var requests = [getJSON("plan", job.params)];
        BATCHES.forEach(function (b) {
            // the same job at batch b: the user's sizes and hires, so the sizes answer for this job's shape
            requests.push(b === job.params.batch ? requests[0] :
                getJSON("plan", Object.assign({}, job.params, {batch: b})));
        });
        return Promise.all(requests).then(function (results) {
            if (mine !== sequence) return; // a newer request is under way
            if (readJob().key !== job.key) { // the page changed since: its own request follows
                requested = null;
                scheduleCheck();
                return;
            }
            render(box, job, results[0], results.slice(1).map(function (r) {
                return r.max_square_resolution;
            }));
            box.setAttribute("data-job", job.key);
            box.setAttribute("data-state", "ready");
            box.removeAttribute("aria-busy");
        }).catch(function (error) {
            if (mine !== sequence) return; // a newer request's outcome counts
            clear(box, "", "error"); // not retried until the job changes: a refused job stays refused
            box.setAttribute("data-job", job.key);
            box.removeAttribute("aria-busy");
            box.querySelector(".memslice-error").textContent = "memslice: " + error.message;
        });
    }

    function debounce(fn, ms) {
        var timer = null;
        return function () {
            clearTimeout(timer);
            timer = setTimeout(fn, ms);
        };
    }

    // re-plan when the job on the page differs from the one asked for
    function check() {
        if (app().querySelector("#memslice_planner")) refreshPlanner(false);
    }

    var scheduleCheck = debounce(check, 250);

    // --- the status line under each generation ------------------------------------------------------------

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
            // a failed job is closed on its way out: it is the last job, with what stopped it
            var job = status.last_job;
            var refused = !!(job && job.failures > 0 && job.error);
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
                    "memslice: the job failed: " + job.error + "; the error names the pass and the largest size " +
                    "that fits" : "memslice: the job failed (see the error)";
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

    // Build the panel and watchers whenever they are missing (gradio may render a tab's content when it first opens);
    // plan afresh when the panel comes into view (free memory moves); after any other change of the page, re-plan
    // if the job on it changed. A gradio 3.41 dropdown (the hires upscaler,
    // the checkpoint) sends no DOM input or change event: its choice shows in the DOM only as the option list
    // closing, which is what the webui's onAfterUiUpdate() follows (javascript/hints.js reads the same change).
    function ensure() {
        var box = app().querySelector("#memslice_planner");
        var visible = !!box && box.offsetParent !== null;
        if (column() && (!box || (visible && !panelVisible))) refreshPlanner(true); // built, or opened: plan afresh
        else check();
        panelVisible = visible;
        watchOutputs();
    }

    function setup() {
        // typed and dragged values count before Apply (number boxes, sliders, radios, checkboxes)
        ["input", "change"].forEach(function (type) {
            app().addEventListener(type, scheduleCheck, true);
        });
        if (typeof onAfterUiUpdate === "function") {
            onAfterUiUpdate(ensure);
        } else {
            new MutationObserver(debounce(ensure, 200)).observe(app(), {childList: true, subtree: true});
        }
        // the generation tab open last, however briefly: onAfterUiUpdate() runs only once the page has been still
        // for 200 ms, so a tab passed through on the way to Settings would go unseen; the webui's onUiTabChange()
        // runs at once
        if (typeof onUiTabChange === "function") onUiTabChange(generationTab);
        // the webui's settings_json changed: a checkpoint finished loading, or settings were applied
        if (typeof onOptionsChanged === "function") {
            onOptionsChanged(function () {
                if (app().querySelector("#memslice_planner")) refreshPlanner(true);
            });
        }
        ensure();
    }

    window.memslice = {refreshPlanner: refreshPlanner, showStatus: showStatus, formatBytes: formatBytes,
        hiresParams: hiresParams, readJob: readJob, segments: segments};

    if (typeof onUiLoaded === "function") {
        onUiLoaded(setup);
    } else {
        document.addEventListener("DOMContentLoaded", setup);
    }
})();
