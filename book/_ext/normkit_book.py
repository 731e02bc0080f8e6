"""Sphinx extension for the book: every script its pages load is served by the book itself.

1. At the start of an HTML build, copy the pinned npm packages (``package.json``, installed
   with ``npm ci --ignore-scripts``) into ``book/_static/vendor/`` (see ``vendor_assets.py``);
   the build stops with a clear message if they are not installed or do not match the
   Python packages. ``_config.yml`` points myst-nb's widget manager and Sphinx's MathJax there.
2. Render altair charts with the vendored vega, vega-lite and vega-embed. Altair 6's
   default renderer emits ``text/html`` whose script loads vega from jsDelivr; its
   ``mimetype`` renderer emits ``application/vnd.vegalite.v6+json``, which myst-nb cannot
   render at all. Both become a ``<div class="normkit-vega">`` holding the spec as JSON,
   drawn by ``_static/normkit-vega.js`` on the pages that have a chart.
3. Drop duplicated inline scripts (sphinx-thebe's configuration is added twice and
   throws in the browser).
4. After the build, fail (a warning, an error under ``-W``) if any page still loads a
   script or stylesheet from another host.
"""

from __future__ import annotations

import html
import json
import re
import sys
from pathlib import Path
from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.errors import ExtensionError
from sphinx.util import logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vendor_assets  # noqa: E402

logger = logging.getLogger(__name__)

# "+json" is the registered form; altair 6.3's "mimetype" renderer writes ".json" (which nbformat
# rejects when saving, so executed notebooks only hold the default renderer's text/html).
VEGALITE_MIMES = tuple(f"application/vnd.vegalite.v{v}{s}" for v in (6, 5, 4) for s in ("+json", ".json"))
NORMKIT_VEGA_JS = "normkit-vega.js"


# -- 1. vendoring ---------------------------------------------------------------------------

def _vendor(app: Sphinx) -> None:
    if app.builder.format != "html":
        return
    try:
        files = vendor_assets.vendor()
    except vendor_assets.VendorError as e:
        raise ExtensionError(f"normkit_book: {e}") from None
    logger.info(f"normkit_book: {len(files)} vendored files in {vendor_assets.VENDOR}")


# -- 2. altair charts -----------------------------------------------------------------------

def _altair_html_spec(text: str) -> tuple[dict, dict] | None:
    """(spec, embed options) of the HTML altair's default renderer writes; None if not altair's."""
    if "altair-viz-" not in text or "vegaEmbed(" not in text:
        return None
    # the template ends with `})(SPEC, EMBED_OPTIONS);` right before </script>
    start = text.rfind("})(")
    if start < 0:
        raise ValueError("no `})(` spec call found")
    dec = json.JSONDecoder()
    spec, end = dec.raw_decode(text, start + 3)
    rest = text[end:].lstrip()
    if not rest.startswith(","):
        raise ValueError("no embed options after the spec")
    rest = rest[1:].lstrip()
    options, end = dec.raw_decode(rest)
    if not rest[end:].lstrip().startswith(");"):
        raise ValueError("unexpected text after the embed options")
    return spec, options


def _json_for_script(obj: Any) -> str:
    """JSON that is safe inside a <script> element."""
    return json.dumps(obj, separators=(",", ":")).replace("</", "<\\/").replace("<!--", "<\\!--")


def _chart_node(spec: dict, options: dict) -> nodes.raw:
    payload = _json_for_script({"spec": spec, "embed_options": options})
    text = (f'<div class="normkit-vega">'
            f'<div class="normkit-vega-view"></div>'
            f'<script type="application/json" class="normkit-vega-spec">{payload}</script></div>')
    return nodes.raw(text=text, format="html", classes=["output", "text_html"])


class VegaMimeRenderer:
    """A myst-nb mime render plugin (``myst_nb.core.render.MimeRenderPlugin``) for altair charts."""

    mime_priority_overrides = [(b, m, 5) for b in ("html", "dirhtml", "singlehtml") for m in VEGALITE_MIMES]

    @staticmethod
    def handle_mime(renderer, data, inline: bool):
        if data.mime_type in VEGALITE_MIMES:
            spec = data.content if isinstance(data.content, dict) else json.loads(data.string)
            options = dict((data.output_metadata or {}).get(data.mime_type, {}).get("embed_options", {}))
        elif data.mime_type == "text/html":
            try:
                found = _altair_html_spec(data.string)
            except ValueError as e:
                renderer.logger.warning(f"normkit_book: an altair chart's HTML could not be read ({e}); it would load "
                                        f"vega from a CDN", subtype="altair", line=data.line)
                return None
            if found is None:
                return None
            spec, options = found
        else:
            return None
        schema = str(spec.get("$schema", ""))
        want = json.loads((vendor_assets.REPO / "package.json").read_text())["dependencies"]["vega-lite"]
        m = re.search(r"/vega-lite/v(\d+)", schema)
        if m and m.group(1) != want.split(".")[0]:
            renderer.logger.warning(f"normkit_book: chart spec {schema} is not vega-lite {want} (the vendored one)",
                                    subtype="altair", line=data.line)
        for i, path in enumerate([*vendor_assets.VEGA_SCRIPTS, NORMKIT_VEGA_JS]):
            renderer.add_js_file(f"normkit_vega_{i}", path, {})
        return [_chart_node(spec, options)]


def _register_mime_renderer() -> None:
    """Add VegaMimeRenderer to myst-nb's mime render plugins.

    myst-nb finds plugins through the ``myst_nb.mime_renderers`` entry point group, i.e. only
    in installed distributions; the book's extension is not one, so it is appended to the
    list myst-nb loads (``load_mime_renders``, read at call time by both the renderer and the
    mime priority).
    """
    from myst_nb.core import render

    original = getattr(render, "load_mime_renders", None)
    if original is None:
        raise ExtensionError("normkit_book: myst_nb.core.render.load_mime_renders is gone; this myst-nb "
                             "version is not supported by book/_ext/normkit_book.py")
    if getattr(original, "_normkit", False):
        return

    def load_mime_renders():
        return [*original(), VegaMimeRenderer]

    load_mime_renders._normkit = True
    render.load_mime_renders = load_mime_renders


# -- 3. no external scripts -----------------------------------------------------------------

_TAG = re.compile(r"<(script|link)\b[^>]*>", re.IGNORECASE)
_ATTR = re.compile(r"""\b(src|href|rel)\s*=\s*("[^"]*"|'[^']*'|[^\s>]+)""", re.IGNORECASE)


def external_resources(page: str) -> list[str]:
    """The URLs of scripts and stylesheets (or preloads) a page loads from another host."""
    found = []
    for tag in _TAG.finditer(page):
        attrs = {k.lower(): html.unescape(v.strip("\"'")) for k, v in _ATTR.findall(tag.group(0))}
        if tag.group(1).lower() == "script":
            url = attrs.get("src", "")
        elif {"stylesheet", "preload", "modulepreload"} & set(attrs.get("rel", "").lower().split()):
            url = attrs.get("href", "")
        else:
            continue
        if re.match(r"^(https?:)?//", url, re.IGNORECASE):
            found.append(url)
    return found


def _check_no_external(app: Sphinx, exception: Exception | None) -> None:
    if exception is not None or app.builder.format != "html":
        return
    outdir = Path(app.outdir)
    for page in sorted(outdir.rglob("*.html")):
        urls = external_resources(page.read_text(encoding="utf-8", errors="replace"))
        if urls:
            logger.warning(f"normkit_book: {page.relative_to(outdir)} loads from another host: {', '.join(sorted(set(urls)))}",
                           type="normkit", subtype="cdn")


def _dedupe_scripts(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    """Drop repeated identical <script> entries from a page.

    sphinx-thebe (loaded by Jupyter Book) adds its inline configuration, which declares
    ``const THEBE_JS_URL``, once per read phase; a page with it twice throws "Identifier
    'THEBE_JS_URL' has already been declared" in the browser.
    """
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, unique = set(), []
    for js in scripts:
        attrs = getattr(js, "attributes", {})
        key = (getattr(js, "filename", js) or None, getattr(js, "priority", None), tuple(sorted(attrs.items())))
        if key not in seen:  # an inline script's filename is None or "" depending on who added it
            seen.add(key)
            unique.append(js)
    scripts[:] = unique


def setup(app: Sphinx) -> dict[str, Any]:
    _register_mime_renderer()
    app.connect("builder-inited", _vendor)
    app.connect("html-page-context", _dedupe_scripts, priority=900)
    app.connect("build-finished", _check_no_external)
    return {"version": "0.1", "parallel_read_safe": True, "parallel_write_safe": True}
