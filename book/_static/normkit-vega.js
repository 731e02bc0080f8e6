// Draw the book's altair charts with the vendored vega-embed (see book/_ext/normkit_book.py).
// Each chart is <div class="normkit-vega"> with a <script type="application/json"> holding
// {"spec": <vega-lite spec>, "embed_options": {...}}.
(function () {
  "use strict";
  function draw() {
    document.querySelectorAll("div.normkit-vega").forEach(function (box) {
      if (box.dataset.normkitDrawn) return;
      box.dataset.normkitDrawn = "1";
      var view = box.querySelector(".normkit-vega-view");
      try {
        var payload = JSON.parse(box.querySelector("script.normkit-vega-spec").textContent);
        // No "open in the Vega editor" link: the book works offline.
        var options = Object.assign({ mode: "vega-lite" }, payload.embed_options || {});
        options.actions = { export: true, source: false, compiled: false, editor: false };
        vegaEmbed(view, payload.spec, options).then(function (result) {
          box.normkitView = result.view; // for tests/test_browser.py
          box.dataset.normkitStatus = "drawn";
        }).catch(function (err) {
          box.dataset.normkitStatus = "failed";
          view.textContent = "This chart could not be drawn: " + err.message;
          console.error(err);
        });
      } catch (err) {
        box.dataset.normkitStatus = "failed";
        view.textContent = "This chart could not be drawn: " + err.message;
        console.error(err);
      }
    });
  }
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", draw);
  } else {
    draw();
  }
})();
