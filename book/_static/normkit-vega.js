// Draw the book's altair charts with the vendored vega-embed (see book/_ext/normkit_book.py).
// Each chart is <div class="normkit-vega"> with a <script type="application/json"> holding
// {"spec": <vega-lite spec>, "embed_options": {...}}.
// In the theme's dark mode a chart is drawn with vega's dark theme on the page's own background,
// and drawn again when the reader switches the mode.
// In a column too narrow for it (a phone), a chart is laid out again to fit: see narrow().
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
  // Laying a chart out for a narrow column. Titles wrap at spaces, measured in vega's default
  // title fonts, and start at the left; panels side by side (a wrapped facet's columns, hconcat)
  // go one under the other; legends go below the plot, two entries a row; and each panel's
  // width shrinks by `shrink` px (what the chart still overflowed by when laid out narrow),
  // never under MIN_WIDTH.
  var FONTS = { text: "bold 13px sans-serif", subtitle: "12px sans-serif" };
  var MIN_WIDTH = 120;
  var ACTIONS_ROOM = 44;  // titles wrap short of vega-embed's "..." menu, at the chart's top right
  var ruler = document.createElement("canvas").getContext("2d");
  function wrap(text, font, width) {
    if (typeof text !== "string") return text;
    ruler.font = font;
    var lines = [], line = "";
    text.split(" ").forEach(function (word) {
      var longer = line ? line + " " + word : word;
      if (line && ruler.measureText(longer).width > width) {
        lines.push(line);
        line = word;
      } else {
        line = longer;
      }
    });
    lines.push(line);
    return lines.length > 1 ? lines : text;
  }
  function wrapTitle(title, width) {
    if (typeof title === "string") return wrap(title, FONTS.text, width);
    if (!title || typeof title !== "object" || Array.isArray(title)) return title;
    var out = Object.assign({}, title);
    Object.keys(FONTS).forEach(function (k) { out[k] = wrap(out[k], FONTS[k], width); });
    return out;
  }
  function relaid(x, width, shrink) {
    if (Array.isArray(x)) return x.map(function (v) { return relaid(v, width, shrink); });
    if (!x || typeof x !== "object") return x;
    var out = {};
    Object.keys(x).forEach(function (k) {
      var v = x[k];
      if (k === "data" || k === "datasets" || k === "config") out[k] = v;
      else if (k === "hconcat") out.vconcat = relaid(v, width, shrink);
      else if (k === "columns" && typeof v === "number") out[k] = 1;
      else if (k === "title") out[k] = wrapTitle(v, width);
      else if (k === "width" && typeof v === "number") out[k] = Math.max(MIN_WIDTH, v - shrink);
      else out[k] = relaid(v, width, shrink);
    });
    return out;
  }
  function narrow(spec, width, shrink) {
    var out = relaid(spec, width - ACTIONS_ROOM, shrink);
    var config = Object.assign({}, spec.config || {});
    config.legend = Object.assign({}, config.legend || {}, { orient: "bottom", direction: "horizontal", columns: 2 });
    config.title = Object.assign({}, config.title || {}, { anchor: "start" });  // not centred under the menu
    out.config = config;
    return out;
  }
  function drawnWidth(view) {
    var surface = view.querySelector("svg.marks, canvas.marks");
    return surface ? surface.getBoundingClientRect().width : 0;
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
      var view = box.querySelector(".normkit-vega-view");
      var room = view.clientWidth;
      var key = now + " " + room;  // drawn again when the mode or the column's width changes
      if (box.dataset.normkitDrawn === key) return;
      box.dataset.normkitDrawn = key;
      delete box.dataset.normkitStatus;
      if (box.normkitView) {
        box.normkitView.finalize();
        box.normkitView = null;
      }
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
        var spec = now === "dark" ? inked(payload.spec) : payload.spec;
        // as designed; if wider than the column, laid out narrow; if still wider, panels narrowed too
        var attempt = function (layout, shrink) {
          return vegaEmbed(view, layout ? narrow(spec, room, shrink) : spec, options).then(function (result) {
            if (box.dataset.normkitDrawn !== key) {  // the mode or the width changed while it was drawn
              result.view.finalize();
              return;
            }
            var over = Math.ceil(drawnWidth(view) - room);
            if (over > 0 && layout < 2) {
              result.view.finalize();
              view.textContent = "";
              return attempt(layout + 1, layout ? over : 0);
            }
            box.normkitView = result.view; // for tests/test_browser.py
            box.dataset.normkitLayout = layout ? "narrow" : "as designed";
            box.dataset.normkitStatus = "drawn";
          });
        };
        attempt(0, 0).catch(function (err) {
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
    var pending = null;
    window.addEventListener("resize", function () {  // e.g. a phone turned sideways
      clearTimeout(pending);
      pending = setTimeout(draw, 250);
    });
  }
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
