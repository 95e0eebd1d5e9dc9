// Stand-ins for the webui 1.10.1 helpers extension scripts rely on (script.js: gradioApp(), onUiLoaded(),
// onAfterUiUpdate(), onUiUpdate(), onUiTabChange(); javascript/ui.js: opts, onOptionsChanged(), updateInput(); the InputAccordion
// of javascript/inputAccordion.js). onUiLoaded fires once the txt2img prompt exists, as in the webui. Written for
// these tests from the behaviour of those files, no code copied.
function gradioApp() {
    var elems = document.getElementsByTagName("gradio-app");
    var elem = elems.length === 0 ? document : elems[0];
    if (elem !== document) {
        elem.getElementById = function (id) {
            return document.getElementById(id);
        };
    }
    return elem.shadowRoot ? elem.shadowRoot : elem;
}

var uiLoadedCallbacks = [];
var uiAfterUpdateCallbacks = [];
var uiLoadedFired = false;
var uiAfterUpdateTimeout = null;

function onUiLoaded(callback) {
    uiLoadedCallbacks.push(callback);
}

// like the webui: called (debounced by 200 ms) after the DOM changed
function onAfterUiUpdate(callback) {
    uiAfterUpdateCallbacks.push(callback);
}

function runCallbacks(callbacks) {
    callbacks.forEach(function (callback) {
        try {
            callback();
        } catch (e) {
            console.error("error running callback", e);
        }
    });
}

// like the webui: called at once (no debounce) from the same observer when the selected top-level tab changed
var uiTabChangeCallbacks = [];
var uiCurrentTab = null;
function onUiTabChange(callback) {
    uiTabChangeCallbacks.push(callback);
}

document.addEventListener("DOMContentLoaded", function () {
    var observer = new MutationObserver(function () {
        if (!uiLoadedFired && gradioApp().querySelector("#txt2img_prompt")) {
            uiLoadedFired = true;
            runCallbacks(uiLoadedCallbacks);
        }
        clearTimeout(uiAfterUpdateTimeout);
        uiAfterUpdateTimeout = setTimeout(function () {
            runCallbacks(uiAfterUpdateCallbacks);
        }, 200);
        var tab = gradioApp().querySelector("#tabs > .tab-nav > button.selected");
        if (tab && tab !== uiCurrentTab) {
            uiCurrentTab = tab;
            runCallbacks(uiTabChangeCallbacks);
        }
    });
    observer.observe(gradioApp(), {childList: true, subtree: true});
});

// Like the webui: called with the MutationRecords of each DOM change (javascript/hints.js reads them to notice a
// gradio dropdown's options list closing, the only trace a selection leaves in the DOM)
var uiUpdateCallbacks = [];
function onUiUpdate(callback) {
    uiUpdateCallbacks.push(callback);
}

document.addEventListener("DOMContentLoaded", function () {
    new MutationObserver(function (records) {
        uiUpdateCallbacks.forEach(function (callback) {
            try {
                callback(records);
            } catch (e) {
                console.error("error running callback", e);
            }
        });
    }).observe(gradioApp(), {childList: true, subtree: true});
});

// Stand-in for the webui's javascript/ui.js options: `opts` holds the parsed #settings_json (a hidden gradio
// Textbox the settings calls return as an output, e.g. after a checkpoint change has loaded the model), and
// onOptionsChanged() callbacks run whenever gradio writes that textbox's value.
var opts = {};
var optionsChangedCallbacks = [];
function onOptionsChanged(callback) {
    optionsChangedCallbacks.push(callback);
}

onAfterUiUpdate(function () {
    var box = gradioApp().querySelector("#settings_json textarea");
    if (!box || box.memsliceFakeHooked) return;
    box.memsliceFakeHooked = true;
    var native = Object.getOwnPropertyDescriptor(HTMLTextAreaElement.prototype, "value");
    var changed = function () {
        try {
            opts = JSON.parse(native.get.call(box) || "{}");
        } catch (e) {
            opts = {};
        }
        runCallbacks(optionsChangedCallbacks);
    };
    Object.defineProperty(box, "value", {
        get: function () {
            return native.get.call(box);
        },
        set: function (text) {
            native.set.call(box, text);
            changed();
        },
    });
    changed();
});

// Stand-in for the webui's updateInput(): an "input" event on a gradio input, so that gradio reads its new value
function updateInput(target) {
    var event = new Event("input", {bubbles: true});
    Object.defineProperty(event, "target", {value: target});
    target.dispatchEvent(event);
}

// Stand-in for the webui's javascript/inputAccordion.js. An InputAccordion (modules/ui_components.py) is a gradio
// Accordion with the class "input-accordion" and a hidden gradio Checkbox "<id>-checkbox" that the job reads; the
// page adds a visible checkbox "<id>-visible-checkbox" to the accordion's label. Opening the accordion ticks it
// (until the user clicks the checkbox itself); either way the hidden checkbox follows, with an "input" event.
function inputAccordionChecked(id, checked) {
    var accordion = gradioApp().getElementById(id);
    accordion.visibleCheckbox.checked = checked;
    accordion.syncHidden();
}

onUiLoaded(function () {
    gradioApp().querySelectorAll(".input-accordion").forEach(function (accordion) {
        var header = accordion.querySelector(".label-wrap");
        var hidden = gradioApp().querySelector("#" + accordion.id + "-checkbox input");
        var visible = document.createElement("input");
        var followsOpen = true;
        var isOpen = function () {
            return header.classList.contains("open");
        };
        visible.type = "checkbox";
        visible.id = accordion.id + "-visible-checkbox";
        visible.className = "input-accordion-checkbox";
        visible.checked = isOpen();
        header.querySelector("span").prepend(visible);
        accordion.visibleCheckbox = visible;
        accordion.syncHidden = function () {
            if (followsOpen && isOpen() !== visible.checked) header.click();
            hidden.checked = visible.checked;
            updateInput(hidden);
        };
        new MutationObserver(function () {
            accordion.classList.toggle("input-accordion-open", isOpen());
            if (followsOpen) {
                visible.checked = isOpen();
                accordion.syncHidden();
            }
        }).observe(header, {attributes: true, attributeFilter: ["class"]});
        visible.addEventListener("click", function (event) {
            followsOpen = false;
            event.stopPropagation();
        });
        visible.addEventListener("input", accordion.syncHidden);
    });
});
