// Stand-in for the webui 1.10.1 script.js helpers extension scripts rely on: gradioApp() and onUiLoaded(),
// which fires once the txt2img prompt exists (as in the webui). Written for these tests.
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
    });
    observer.observe(gradioApp(), {childList: true, subtree: true});
});
