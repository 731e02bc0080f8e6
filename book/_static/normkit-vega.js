// Draw the book's altair charts with the vendored vega-embed (see book/_ext/normkit_book.py).
// Each chart is <div class="normkit-vega"> with a <script type="application/json"> holding
// {"spec": <vega-lite spec>, "embed_options": {...}}.
// In the theme's dark mode a chart is drawn with vega's dark theme on the page's own background,
// and drawn again when the reader switches the mode.
(function () {
  "use strict";
  // Over vega's "dark" theme: no grey box of its own (the page is the background), and light
  // text for text marks (e.g. a "no data yet" message), which that theme leaves black.
  var LIGHT_INK = "#e6e6e6";
  var DARK = { background: "transparent", text: { color: LIGHT_INK } };
  var BLACK = { black: 1, "#000": 1, "#000000": 1 };
  // A copy of a spec whose marks drawn in black (e.g. the summary's mean tick and bar) are drawn
  // in the light ink instead: black on the dark page would not be seen.
  function inked(x) {
    if (Array.isArray(x)) return x.map(inked);
    if (!x || typeof x !== "object") return x;
    var out = {};
    Object.keys(x).forEach(function (k) {
      var v = x[k];
      out[k] = (k === "color" || k === "fill" || k === "stroke") && typeof v === "string" && BLACK[v.toLowerCase()]
        ? LIGHT_INK : inked(v);
    });
    return out;
  }
  function mode() {
    return document.documentElement.dataset.theme === "dark" ? "dark" : "light";
  }
  function fail(box, view, err) {
    box.dataset.normkitStatus = "failed";
    view.textContent = "This chart could not be drawn: " + err.message;
    console.error(err);
  }
  function draw() {
    var now = mode();
    document.querySelectorAll("div.normkit-vega").forEach(function (box) {
      if (box.dataset.normkitDrawn === now) return;
      box.dataset.normkitDrawn = now;
      delete box.dataset.normkitStatus;
      if (box.normkitView) {
        box.normkitView.finalize();
        box.normkitView = null;
      }
      var view = box.querySelector(".normkit-vega-view");
      view.textContent = "";
      try {
        var payload = JSON.parse(box.querySelector("script.normkit-vega-spec").textContent);
        // No "open in the Vega editor" link: the book works offline.
        var options = Object.assign({ mode: "vega-lite" }, payload.embed_options || {});
        options.actions = { export: true, source: false, compiled: false, editor: false };
        if (now === "dark") {
          options.theme = "dark";
          options.config = Object.assign({}, options.config || {}, DARK);
        }
        vegaEmbed(view, now === "dark" ? inked(payload.spec) : payload.spec, options).then(function (result) {
          if (box.dataset.normkitDrawn !== now) {  // the mode changed while it was drawn
            result.view.finalize();
            return;
          }
          box.normkitView = result.view; // for tests/test_browser.py
          box.dataset.normkitStatus = "drawn";
        }).catch(function (err) {
          fail(box, view, err);
        });
      } catch (err) {
        fail(box, view, err);
      }
    });
  }
  function start() {
    draw();
    new MutationObserver(draw).observe(document.documentElement, { attributes: true, attributeFilter: ["data-theme"] });
  }
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
